//! Live state of one backend: health (fed by probes and passive failures through the pure
//! [`machine`]), load, drain, membership, and connect admission ([`pending`]). An `Arc` carried
//! from one config snapshot to the next for backends that did not change, so a reload keeps
//! health and counts. A bottom module: the data path, the probe loop and the admin API read it;
//! the first two also make the TLS handshake with a member of a `pool.tls` pool through it
//! ([`tls`]).

pub mod machine;
pub mod pending;
pub(crate) mod tls;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use machine::{HealthMachine, Transition};
use mqlb_http::lock;

/// The last probe result of a backend, for `/api/backends`.
#[derive(Debug, Clone)]
pub struct ProbeRecord {
    pub ok: bool,
    pub detail: String,
    pub at: SystemTime,
    pub duration: std::time::Duration,
}

/// What a health result came from: why a backend is down, as `/api/backends` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Its health probe.
    Probe,
    /// Failed connects of client traffic (passive health).
    Passive,
    /// It left the pool (removed from the config, or dropped after `remove_after`).
    Left,
    /// It left the HA server's membership (down or gone there) and is kept listed, down,
    /// until the pool's `remove_after`.
    LeftMembership,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Probe => "probe",
            Source::Passive => "passive",
            Source::Left => "left_pool",
            Source::LeftMembership => "left_membership",
        }
    }
}

/// Health and load of one backend, shared by the data path, the probe loop and the admin API.
#[derive(Debug)]
pub struct BackendState {
    up: AtomicBool,
    draining: AtomicBool,
    active: AtomicU64,
    machine: Mutex<HealthMachine>,
    last_probe: Mutex<Option<ProbeRecord>>,
    /// Connects in flight and waiting (the pool's admission).
    pub pending: pending::PendingGate,
    /// When it last came back up (a probe or passive result flipped it), for slow start.
    went_up: Mutex<Option<Instant>>,
    /// What took it down and when, while it is down.
    down_by: Mutex<Option<(Source, SystemTime)>>,
    /// Out of the membership (kept listed until `remove_after`): down whatever its health
    /// machine says, so a late probe result cannot bring it back.
    left: AtomicBool,
}

impl BackendState {
    pub fn new(draining: bool) -> Self {
        BackendState {
            up: AtomicBool::new(true),
            draining: AtomicBool::new(draining),
            active: AtomicU64::new(0),
            machine: Mutex::new(HealthMachine::new(true)),
            last_probe: Mutex::new(None),
            pending: pending::PendingGate::default(),
            went_up: Mutex::new(None),
            down_by: Mutex::new(None),
            left: AtomicBool::new(false),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire) && !self.left.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Release);
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub(crate) fn conn_opened(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn conn_closed(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// `up`, `down` or `draining`, as the admin API reports it.
    pub fn state_name(&self) -> &'static str {
        if !self.is_up() {
            "down"
        } else if self.is_draining() {
            "draining"
        } else {
            "up"
        }
    }

    /// Feeds one health result (a probe, or a failed connect of client traffic).
    pub(crate) fn observe(
        &self,
        ok: bool,
        up_threshold: u32,
        down_threshold: u32,
        from: Source,
    ) -> Option<Transition> {
        let t = lock(&self.machine).observe(ok, up_threshold, down_threshold);
        match t {
            Some(Transition::WentUp) => {
                *lock(&self.went_up) = Some(Instant::now());
                if !self.has_left() {
                    *lock(&self.down_by) = None;
                }
                self.up.store(true, Ordering::Release);
            }
            Some(Transition::WentDown) => {
                if !self.has_left() {
                    *lock(&self.down_by) = Some((from, SystemTime::now()));
                }
                self.up.store(false, Ordering::Release);
            }
            None => {}
        }
        t
    }

    /// Why it takes no new connections, if it takes none: `probe`, `passive`, `left_pool`
    /// (down), or `drain`.
    pub fn why_not(&self) -> Option<&'static str> {
        if !self.is_up() {
            Some(lock(&self.down_by).map_or("probe", |(s, _)| s.name()))
        } else if self.is_draining() {
            Some("drain")
        } else {
            None
        }
    }

    /// The backend left the pool (removed from the config, or reported down by the HA
    /// server): no snapshot refers to this state any more, only its live connections, which
    /// see it down and end under `close_on_backend_down`.
    pub(crate) fn retire(&self) {
        *lock(&self.down_by) = Some((Source::Left, SystemTime::now()));
        self.up.store(false, Ordering::Release);
    }

    /// The member left the membership at `since`: down, with that reason, until it
    /// [`rejoin`](Self::rejoin)s or is removed. Idempotent (every membership change repeats
    /// it); true only the first time, when its connections are to be told.
    pub(crate) fn leave(&self, since: SystemTime) -> bool {
        let first = !self.left.swap(true, Ordering::AcqRel);
        if first {
            *lock(&self.down_by) = Some((Source::LeftMembership, since));
        }
        first
    }

    /// Back in the membership: its health is what its probe says again.
    pub(crate) fn rejoin(&self) {
        if self.left.swap(false, Ordering::AcqRel) {
            let mut by = lock(&self.down_by);
            *by = if self.up.load(Ordering::Acquire) {
                None
            } else {
                Some((Source::Probe, SystemTime::now())) // it was down by its probe when it left
            };
        }
    }

    pub(crate) fn has_left(&self) -> bool {
        self.left.load(Ordering::Acquire)
    }

    /// Since when it is down, while it is.
    pub fn down_since(&self) -> Option<SystemTime> {
        if self.is_up() {
            return None;
        }
        lock(&self.down_by).map(|(_, at)| at)
    }

    /// How long ago it came back up, if it ever went down and came back.
    pub fn since_up(&self) -> Option<std::time::Duration> {
        lock(&self.went_up).map(|t| t.elapsed())
    }

    pub(crate) fn record_probe(&self, rec: ProbeRecord) {
        *lock(&self.last_probe) = Some(rec);
    }

    pub fn last_probe(&self) -> Option<ProbeRecord> {
        lock(&self.last_probe).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_says_why_it_takes_no_connections() {
        let s = BackendState::new(false);
        assert_eq!(s.why_not(), None);
        s.observe(false, 1, 1, Source::Passive);
        assert_eq!(s.why_not(), Some("passive"));
        s.observe(true, 1, 1, Source::Probe);
        assert_eq!(s.why_not(), None);
        s.observe(false, 1, 1, Source::Probe);
        assert_eq!(s.why_not(), Some("probe"));
        s.observe(true, 1, 1, Source::Probe);
        s.set_draining(true);
        assert_eq!(s.why_not(), Some("drain"));
        s.retire();
        assert_eq!(s.why_not(), Some("left_pool"));
    }

    #[test]
    fn a_member_that_left_stays_down_until_it_rejoins() {
        let s = BackendState::new(false);
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        s.leave(at);
        s.leave(SystemTime::now()); // repeated by the next membership change: same since
        assert!(!s.is_up());
        assert_eq!(s.state_name(), "down");
        assert_eq!(s.why_not(), Some("left_membership"));
        assert_eq!(s.down_since(), Some(at));
        // Late probe results neither bring it back nor change why it is down.
        s.observe(false, 1, 1, Source::Probe);
        s.observe(true, 1, 1, Source::Probe);
        assert!(!s.is_up());
        assert_eq!(s.why_not(), Some("left_membership"));
        assert_eq!(s.down_since(), Some(at));
        s.rejoin();
        assert!(s.is_up());
        assert_eq!(s.why_not(), None);
        assert_eq!(s.down_since(), None);
    }
}
