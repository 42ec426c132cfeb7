//! The health state machine of one backend: consecutive results flip the state (Azure's
//! `probeThreshold`, separately for up and down). Pure: probe loop and passive failures feed it.

/// Consecutive-result counter with hysteresis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthMachine {
    up: bool,
    successes: u32,
    failures: u32,
}

/// A change of state caused by one observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    WentUp,
    WentDown,
}

impl HealthMachine {
    /// New backends start up: traffic flows at once, and a failed connect (passive health) or
    /// the first probe (run immediately) takes a dead one out.
    pub fn new(up: bool) -> Self {
        HealthMachine {
            up,
            successes: 0,
            failures: 0,
        }
    }

    #[cfg(test)]
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Feeds one result; returns the transition it caused, if any.
    pub fn observe(
        &mut self,
        ok: bool,
        up_threshold: u32,
        down_threshold: u32,
    ) -> Option<Transition> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= up_threshold {
                self.up = true;
                return Some(Transition::WentUp);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= down_threshold {
                self.up = false;
                return Some(Transition::WentDown);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_one_flips_at_once() {
        let mut h = HealthMachine::new(true);
        assert_eq!(h.observe(false, 1, 1), Some(Transition::WentDown));
        assert_eq!(h.observe(false, 1, 1), None);
        assert_eq!(h.observe(true, 1, 1), Some(Transition::WentUp));
    }

    #[test]
    fn thresholds_need_consecutive_results() {
        let mut h = HealthMachine::new(true);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), None); // resets the failure run
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), Some(Transition::WentDown));
        assert!(!h.is_up());
        assert_eq!(h.observe(true, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), Some(Transition::WentUp));
    }
}
