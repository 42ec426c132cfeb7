//! Rate limits for log lines that repeat once per request or per round while something stays
//! broken (a full disk fails every write): the first line is logged, the next ones only once per
//! window, each saying how many were left out since the previous line. Pure: the caller passes
//! the time in.

use std::time::{Duration, Instant};

/// One kind of repeated log line.
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// At most one line per `every`.
    pub const fn new(every: Duration) -> LogLimiter {
        LogLimiter {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged at `now`: `Some(n)` if so, `n` being how many lines were
    /// suppressed since the last one logged; `None` (and counted) if not.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_window_with_the_count_of_the_rest() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut l = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(l.admit(at(0)), Some(0), "the first line is logged");
        let burst: Vec<_> = (1..=500).map(|ms| l.admit(at(ms))).collect();
        assert!(burst.iter().all(Option::is_none), "the burst is held back");
        assert_eq!(l.admit(at(9_999)), None);
        assert_eq!(
            l.admit(at(10_000)),
            Some(501),
            "the next window's line counts them"
        );
        assert_eq!(l.admit(at(10_001)), None);
        assert_eq!(
            l.admit(at(60_000)),
            Some(1),
            "a quiet spell logs the next at once"
        );
        assert_eq!(l.admit(at(70_000)), Some(0));
    }
}
