//! Paced evacuation: a backend is drained *and* its live connections are moved off it at a
//! set rate, so that the other brokers take its clients a few at a time instead of all at
//! once (`POST /api/backends/{id}/evacuate?rate=N`).
//!
//! One task per evacuated backend ID asks its connections to leave (`ConnInfo::evacuate`), as
//! many a second as a token bucket allows ([`TokenBucket`]: pure, no clock of its own). The
//! relay of each connection does the rest (`conn::relay`): an MQTT 5 client gets DISCONNECT
//! 0x9C (Use another server) with the pool's `server_reference` between two packets, any other
//! connection is closed. A connection still open [`GRACE`] after it was told is closed. The
//! clients reconnect through the LB, which no longer sends them to the drained backend. The
//! progress is in `/api/backends` and in `mqlb_evacuated_total`, `mqlb_evacuation_remaining`.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use tokio_util::sync::CancellationToken;

use crate::state::{ConnInfo, ConnRegistry, Evacuation};
use mqlb_http::lock;

/// How long a told connection may stay open (an MQTT 5 client closes it on the DISCONNECT)
/// before it is closed.
pub const GRACE: Duration = Duration::from_secs(2);

/// How often the backend's connections are listed again: a connection whose connect was under
/// way when the drain began arrives a little later.
const RESCAN: Duration = Duration::from_millis(500);

/// A token bucket: `rate` tokens a second, at most `burst` saved up. Time is passed in.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket of `rate` a second, holding one token now. The burst is a twentieth of a
    /// second's worth (at least one), so the pace holds over any 50 ms, not only on average.
    pub fn new(rate: NonZeroU32, now: Instant) -> TokenBucket {
        let rate = f64::from(rate.get());
        TokenBucket {
            rate,
            burst: (rate / 20.0).max(1.0),
            tokens: 1.0,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }

    /// Takes up to `want` whole tokens; returns how many it got.
    pub fn take(&mut self, now: Instant, want: usize) -> usize {
        self.refill(now);
        // tokens <= burst, a u32's worth
        let n = (self.tokens.floor() as usize).min(want);
        self.tokens -= n as f64;
        n
    }

    /// How long until the next whole token.
    pub fn next_in(&self) -> Duration {
        let missing = (1.0 - self.tokens).max(0.0);
        Duration::from_secs_f64(missing / self.rate)
    }
}

/// One evacuation's progress, as `/api/backends` shows it.
#[derive(Debug)]
pub struct Progress {
    pub rate: u32,
    pub started: SystemTime,
    /// Connections asked to leave so far.
    pub told: AtomicU64,
    /// Connections of the backend still open (told or not yet).
    pub remaining: AtomicU64,
    /// Every connection left (a new one could still be listed by a later rescan).
    pub done: AtomicBool,
    stop: CancellationToken,
}

/// The evacuations of one LB, by backend ID, and their metrics.
pub struct Evacuations {
    running: Mutex<HashMap<String, Arc<Progress>>>,
    evacuated: IntCounterVec,
    remaining: IntGaugeVec,
}

impl Evacuations {
    pub fn new(registry: &prometheus::Registry) -> Result<Evacuations, prometheus::Error> {
        let evacuated = IntCounterVec::new(
            Opts::new(
                "mqlb_evacuated_total",
                "Connections an evacuation asked to leave their backend.",
            ),
            &["backend"],
        )?;
        let remaining = IntGaugeVec::new(
            Opts::new(
                "mqlb_evacuation_remaining",
                "Connections still on a backend being evacuated.",
            ),
            &["backend"],
        )?;
        registry.register(Box::new(evacuated.clone()))?;
        registry.register(Box::new(remaining.clone()))?;
        Ok(Evacuations {
            running: Mutex::new(HashMap::new()),
            evacuated,
            remaining,
        })
    }

    /// The evacuation of backend `id`, running or finished, if one was started.
    pub fn get(&self, id: &str) -> Option<Arc<Progress>> {
        lock(&self.running).get(id).cloned()
    }

    /// Starts (or restarts at another rate) the evacuation of backend `id`, over the
    /// connections in `conns`, until `stopping` (the LB's shutdown) or a cancel. The caller
    /// drains it first, so no new connection lands there meanwhile.
    pub(crate) fn start(
        &self,
        conns: &Arc<ConnRegistry>,
        stopping: &CancellationToken,
        id: &str,
        rate: NonZeroU32,
    ) -> Arc<Progress> {
        let progress = Arc::new(Progress {
            rate: rate.get(),
            started: SystemTime::now(),
            told: AtomicU64::new(0),
            remaining: AtomicU64::new(0),
            done: AtomicBool::new(false),
            stop: stopping.child_token(),
        });
        let old = lock(&self.running).insert(id.to_string(), progress.clone());
        if let Some(old) = old {
            old.stop.cancel();
        }
        let gauges = (
            self.evacuated.with_label_values(&[id]),
            self.remaining.with_label_values(&[id]),
        );
        tokio::spawn(run(conns.clone(), id.to_string(), progress.clone(), gauges));
        progress
    }

    /// Stops the evacuation of `id` (an enable); the connections already told still go.
    pub fn cancel(&self, id: &str) {
        if let Some(p) = lock(&self.running).remove(id) {
            p.stop.cancel();
            self.remaining.with_label_values(&[id]).set(0);
        }
    }
}

/// The open connections of backend `id` (in any pool) not yet asked to leave.
fn not_told(conns: &ConnRegistry, id: &str) -> VecDeque<Arc<ConnInfo>> {
    conns
        .snapshot()
        .into_iter()
        .filter(|c| c.backend() == id && c.evacuation() == Evacuation::None)
        .collect()
}

/// The evacuation's task: `evacuated` and `remaining` are its backend's series.
async fn run(
    conns: Arc<ConnRegistry>,
    id: String,
    p: Arc<Progress>,
    (evacuated, remaining): (IntCounter, IntGauge),
) {
    let Some(rate) = NonZeroU32::new(p.rate) else {
        return;
    };
    tracing::info!(backend = id, rate = p.rate, "evacuation started");
    let mut bucket = TokenBucket::new(rate, Instant::now());
    let mut queue = VecDeque::new();
    let mut told: Vec<(Arc<ConnInfo>, Instant)> = Vec::new();
    let mut scanned: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if scanned.is_none_or(|t| now.duration_since(t) >= RESCAN) {
            let ids: Vec<u64> = queue.iter().map(|c: &Arc<ConnInfo>| c.id).collect();
            queue.extend(
                not_told(&conns, &id)
                    .into_iter()
                    .filter(|c| !ids.contains(&c.id)),
            );
            scanned = Some(now);
        }
        queue.retain(|c| conns.contains(c.id));
        for c in queue.drain(..bucket.take(now, queue.len())) {
            c.evacuate(Evacuation::Asked);
            told.push((c, now));
            p.told.fetch_add(1, Ordering::Relaxed);
            evacuated.inc();
        }
        told.retain(|(c, at)| {
            let open = conns.contains(c.id);
            if open && now.duration_since(*at) >= GRACE {
                c.evacuate(Evacuation::Forced);
            }
            open
        });
        let left = (queue.len() + told.len()) as u64;
        p.remaining.store(left, Ordering::Relaxed);
        remaining.set(i64::try_from(left).unwrap_or(i64::MAX));
        // Done when nothing is left at a fresh listing.
        if left == 0 && scanned == Some(now) {
            p.done.store(true, Ordering::Release);
            tracing::info!(
                backend = id,
                told = p.told.load(Ordering::Relaxed),
                "evacuation done"
            );
            return;
        }
        let pause = if queue.is_empty() {
            Duration::from_millis(50)
        } else {
            bucket
                .next_in()
                .clamp(Duration::from_millis(1), Duration::from_millis(50))
        };
        tokio::select! {
            _ = p.stop.cancelled() => {
                // Those told have stopped hearing from their backend: closed now, not left
                // half open until their client notices.
                for (c, _) in &told {
                    c.evacuate(Evacuation::Forced);
                }
                tracing::info!(backend = id, "evacuation stopped");
                return;
            }
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    #[test]
    fn the_bucket_keeps_the_rate_over_a_long_run() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(rate(100), t0);
        // Polled every 3 ms for 10 s with plenty waiting: 100/s, plus the one at the start.
        let mut got = 0;
        for i in 0..=3334 {
            got += b.take(t0 + Duration::from_millis(3 * i), 1000);
        }
        assert!((1000..=1002).contains(&got), "{got}");
    }

    #[test]
    fn the_bucket_saves_up_only_a_small_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(rate(1000), t0);
        assert_eq!(b.take(t0, 10), 1, "one token at the start");
        // Idle for a minute: at most 1000/20 at once, not 60 000.
        assert_eq!(b.take(t0 + Duration::from_secs(60), 100_000), 50);
        assert_eq!(b.take(t0 + Duration::from_secs(60), 100_000), 0);
        let mut slow = TokenBucket::new(rate(2), t0);
        assert_eq!(slow.take(t0, 5), 1);
        assert_eq!(slow.take(t0 + Duration::from_millis(499), 5), 0);
        assert_eq!(slow.take(t0 + Duration::from_millis(500), 5), 1);
        assert_eq!(slow.take(t0 + Duration::from_secs(10), 5), 1, "burst of 1");
    }

    #[test]
    fn the_bucket_says_when_the_next_token_comes_and_takes_no_more_than_wanted() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(rate(10), t0);
        assert_eq!(b.next_in(), Duration::ZERO);
        assert_eq!(b.take(t0, 0), 0, "nothing wanted, nothing taken");
        assert_eq!(b.take(t0, 1), 1);
        let wait = b.next_in();
        assert!(
            wait > Duration::from_millis(99) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // A clock that went backwards (it cannot with Instant, but a caller may mix them up).
        assert_eq!(b.take(t0 - Duration::from_millis(1), 1), 0);
    }
}
