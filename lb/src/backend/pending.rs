//! Admission of connects to one backend (HAProxy's server `maxconn` + queue + `slowstart`):
//! at most `max_pending` connects in flight; the next ones wait in a bounded queue for a slot,
//! at most `queue_timeout`; after the backend comes (back) up the limit grows from 1 to
//! `max_pending` over `slow_start`.
//!
//! Why: a burst of thousands of clients (a failover) opened every backend connection at the
//! same instant. The brokers' listen backlogs overflowed, each dropped SYN waited 1 s, 3 s, 7 s
//! for its retry, connects timed out, counted as passive failures and sent clients on to other
//! brokers. A few hundred in flight per broker keep every SYN in its backlog, and the rest are
//! served as fast as the broker accepts.
//!
//! The limit is pure ([`limit`]); the gate is two atomics and a `Notify`, touched only in the
//! connect phase, never per packet.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mqlb_config::Admission;
use tokio::sync::Notify;

/// The connects allowed in flight `since_up` after the backend came up (`None`: long ago, or
/// no slow start): grows linearly from 1 to `max_pending` over `slow_start`.
pub fn limit(a: &Admission, since_up: Option<Duration>) -> u32 {
    let max = a.max_pending.get();
    match (a.slow_start, since_up) {
        (Some(ramp), Some(t)) if t < ramp => {
            let share = t.as_secs_f64() / ramp.as_secs_f64();
            ((f64::from(max) * share) as u32).clamp(1, max)
        }
        _ => max,
    }
}

/// Why a connection was not admitted; the `outcome` it ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_queue` connections were waiting already.
    QueueFull,
    /// No slot came free within `queue_timeout`.
    QueueTimeout,
}

/// The in-flight connects of one backend.
#[derive(Debug, Default)]
pub struct PendingGate {
    pending: AtomicU32,
    queued: AtomicU32,
    freed: Notify,
}

/// A slot in flight; freed on drop, which wakes one waiter.
pub struct Slot<'a>(&'a PendingGate);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// Counts one waiter until dropped.
struct Queued<'a>(&'a AtomicU32);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PendingGate {
    /// Connects in flight now.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Acquire)
    }

    /// Connections waiting now.
    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::Acquire)
    }

    fn try_take(&self, limit: u32) -> bool {
        self.pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Waits for a slot. `since_up` says how long ago the backend came up (for slow start);
    /// it is asked again while waiting, since a ramping limit grows without any slot freed.
    pub async fn admit(
        &self,
        a: &Admission,
        since_up: impl Fn() -> Option<Duration>,
    ) -> Result<Slot<'_>, Refused> {
        if self.try_take(limit(a, since_up())) {
            return Ok(Slot(self));
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= a.max_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::QueueFull);
        }
        let _queued = Queued(&self.queued);
        let deadline = Instant::now() + a.queue_timeout;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so a slot freed in between wakes this waiter.
            freed.as_mut().enable();
            if self.try_take(limit(a, since_up())) {
                return Ok(Slot(self));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Refused::QueueTimeout);
            }
            // While the limit ramps up, look again every 50 ms even if nothing is freed.
            let ramping = a.slow_start.is_some() && limit(a, since_up()) < a.max_pending.get();
            let wake = if ramping {
                deadline.min(now + Duration::from_millis(50))
            } else {
                deadline
            };
            // Either a slot was freed (look again) or it is time to look again.
            tokio::time::timeout_at(wake.into(), freed).await.ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn adm(max: u32, queue: u32, timeout_ms: u64, slow_ms: Option<u64>) -> Admission {
        Admission {
            max_pending: NonZeroU32::new(max).expect("non-zero"),
            max_queue: queue,
            queue_timeout: Duration::from_millis(timeout_ms),
            slow_start: slow_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn slow_start_ramps_from_one_to_the_full_limit() {
        let a = adm(100, 0, 0, Some(10_000));
        let at = |s: u64| limit(&a, Some(Duration::from_secs(s)));
        assert_eq!(at(0), 1);
        assert_eq!(at(5), 50);
        assert_eq!(at(10), 100);
        assert_eq!(limit(&a, None), 100);
        assert_eq!(limit(&adm(100, 0, 0, None), Some(Duration::ZERO)), 100);
    }

    #[tokio::test]
    async fn at_most_max_pending_in_flight_and_the_rest_wait_their_turn() {
        let gate = PendingGate::default();
        let a = adm(2, 1, 5_000, None);
        let s1 = gate.admit(&a, || None).await.expect("slot 1");
        let _s2 = gate.admit(&a, || None).await.expect("slot 2");
        assert_eq!(gate.pending(), 2);
        // The third waits in the queue (of one), the fourth is refused at once.
        let third = gate.admit(&a, || None);
        tokio::pin!(third);
        assert!(
            tokio::time::timeout(Duration::from_millis(30), third.as_mut())
                .await
                .is_err(),
            "waits while both slots are taken"
        );
        assert_eq!(gate.queued(), 1);
        assert_eq!(
            gate.admit(&a, || None).await.err(),
            Some(Refused::QueueFull)
        );
        drop(s1);
        let s3 = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("admitted once a slot is freed");
        assert!(s3.is_ok());
        assert_eq!((gate.pending(), gate.queued()), (2, 0));
    }

    #[tokio::test]
    async fn a_waiter_gives_up_at_the_queue_timeout() {
        let gate = PendingGate::default();
        let a = adm(1, 10, 50, None);
        let _held = gate.admit(&a, || None).await.expect("slot");
        let started = Instant::now();
        assert_eq!(
            gate.admit(&a, || None).await.err(),
            Some(Refused::QueueTimeout)
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(gate.queued(), 0, "the waiter left the queue");
    }

    #[tokio::test]
    async fn a_ramping_limit_admits_waiters_without_any_slot_freed() {
        let gate = PendingGate::default();
        let a = adm(10, 10, 5_000, Some(200));
        let up = Instant::now();
        let since = move || Some(up.elapsed());
        let _first = gate.admit(&a, since).await.expect("the first slot");
        // At the start the limit is 1; a second slot opens as the ramp grows.
        let second = tokio::time::timeout(Duration::from_secs(2), gate.admit(&a, since)).await;
        assert!(matches!(second, Ok(Ok(_))));
    }
}
