//! Connection limits at accept: at most `lb.max_connections` live connections in all, at most
//! `max_connections` per frontend and `max_connections_per_source` per client address, and a
//! per-source connection rate (a token bucket). Beyond them a new connection is reset at once,
//! before any byte is read, so one source flooding a frontend cannot take the room of the others.
//!
//! The decision ([`decide`]) and the bucket are pure, with the time passed in; the counters are
//! atomics, and the per-source table is sharded like the connection registry (touched at
//! accept and close only).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqlb_config::FrontendLimits;

use mqlb_http::lock;

/// Why a connection was refused at accept; the `reason` label of
/// `mqlb_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Global,
    Frontend,
    Source,
    SourceRate,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Global => "max_connections",
            Refusal::Frontend => "frontend_max_connections",
            Refusal::Source => "max_connections_per_source",
            Refusal::SourceRate => "source_rate",
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst`.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(burst: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Refills for the time since the last call and takes one token if there is one.
    pub fn take(&mut self, rate: f64, burst: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// True once the bucket is full again (an idle source's entry can then go).
    fn is_full(&self, rate: f64, burst: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * rate >= f64::from(burst)
    }
}

/// Live connection counts the decision looks at (the connection itself not included).
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    pub global: u32,
    pub frontend: u32,
    pub source: u32,
}

/// Whether a new connection may come in. The rate is checked last, so a connection refused
/// for another reason does not spend its source's tokens.
pub fn decide(
    global_max: Option<u32>,
    limits: &FrontendLimits,
    counts: Counts,
    take_token: impl FnOnce() -> bool,
) -> Result<(), Refusal> {
    if global_max.is_some_and(|m| counts.global >= m) {
        return Err(Refusal::Global);
    }
    if limits
        .max_connections
        .is_some_and(|m| counts.frontend >= m.get())
    {
        return Err(Refusal::Frontend);
    }
    if limits
        .max_connections_per_source
        .is_some_and(|m| counts.source >= m.get())
    {
        return Err(Refusal::Source);
    }
    if limits.source_rate.is_some() && !take_token() {
        return Err(Refusal::SourceRate);
    }
    Ok(())
}

/// The LB-wide limit and the live counts, as the accept loop sees them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    pub global_max: Option<u32>,
    pub global: u32,
    pub frontend: u32,
}

#[derive(Debug)]
struct Source {
    live: u32,
    bucket: Option<Bucket>,
}

const SHARDS: usize = 16;

/// Per client address: live connections and the rate bucket. An entry lives while its source
/// has connections or a bucket still refilling; [`Sources::prune`] drops the others.
#[derive(Default)]
pub struct Sources {
    shards: [Mutex<HashMap<(String, IpAddr), Source>>; SHARDS],
}

fn shard_of(ip: &IpAddr) -> usize {
    let h = match ip {
        IpAddr::V4(a) => u32::from(*a) as usize,
        IpAddr::V6(a) => u128::from(*a) as usize,
    };
    (h ^ (h >> 16)) % SHARDS
}

impl Sources {
    /// Decides for a connection from `ip` on `frontend` and, if admitted, counts it.
    pub fn admit(
        &self,
        frontend: &str,
        ip: IpAddr,
        limits: &FrontendLimits,
        load: Load,
        now: Instant,
    ) -> Result<(), Refusal> {
        let mut shard = lock(&self.shards[shard_of(&ip)]);
        let entry = shard.entry((frontend.to_string(), ip)).or_insert(Source {
            live: 0,
            bucket: None,
        });
        let counts = Counts {
            global: load.global,
            frontend: load.frontend,
            source: entry.live,
        };
        let decided = decide(load.global_max, limits, counts, || {
            match limits.source_rate {
                Some(r) => entry
                    .bucket
                    .get_or_insert_with(|| Bucket::full(r.burst.get(), now))
                    .take(f64::from(r.per_second.get()), r.burst.get(), now),
                None => true,
            }
        });
        match decided {
            Ok(()) => entry.live += 1,
            Err(_) if entry.live == 0 && entry.bucket.is_none() => {
                shard.remove(&(frontend.to_string(), ip));
            }
            Err(_) => {}
        }
        decided
    }

    fn release(&self, frontend: &str, ip: IpAddr) {
        let mut shard = lock(&self.shards[shard_of(&ip)]);
        let key = (frontend.to_string(), ip);
        if let Some(s) = shard.get_mut(&key) {
            s.live = s.live.saturating_sub(1);
            if s.live == 0 && s.bucket.is_none() {
                shard.remove(&key);
            }
        }
    }

    /// Drops the entries of sources without connections whose bucket is full again.
    pub fn prune(&self, limits: impl Fn(&str) -> Option<FrontendLimits>, now: Instant) {
        for shard in &self.shards {
            lock(shard).retain(|(frontend, _), s| {
                if s.live > 0 {
                    return true;
                }
                let rate = limits(frontend).and_then(|l| l.source_rate);
                match (s.bucket, rate) {
                    (Some(b), Some(r)) => {
                        !b.is_full(f64::from(r.per_second.get()), r.burst.get(), now)
                    }
                    _ => false,
                }
            });
        }
    }

    /// Entries held (bounded by live connections plus sources still refilling).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

/// An admitted connection's place in the counts; given back on drop (moved into the
/// connection's task).
pub struct Admitted {
    pub(crate) global: Arc<AtomicU32>,
    pub(crate) frontend: Arc<AtomicU32>,
    /// Its place among its source's connections: taken at accept, or, for a connection from
    /// an LB in front (`accept_proxy`), once its PROXY header named the real client.
    pub(crate) source: Option<SourcePlace>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.global.fetch_sub(1, Ordering::AcqRel);
        self.frontend.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's place in its source's count; given back on drop.
pub struct SourcePlace {
    pub(crate) sources: Arc<Sources>,
    pub(crate) name: Arc<str>,
    pub(crate) ip: IpAddr,
}

impl Drop for SourcePlace {
    fn drop(&mut self) {
        self.sources.release(&self.name, self.ip);
    }
}

/// The limits decided at accept for a connection whose source is not known yet (it comes
/// from a trusted LB in front, whose own address is not the client's): the global and the
/// frontend ones; the per-source ones wait for the PROXY header ([`source_limits`]).
pub fn accept_limits(limits: &FrontendLimits) -> FrontendLimits {
    FrontendLimits {
        max_connections_per_source: None,
        source_rate: None,
        ..*limits
    }
}

/// The per-source half of `limits`, for a source learnt from a PROXY header.
pub fn source_limits(limits: &FrontendLimits) -> FrontendLimits {
    FrontendLimits {
        max_connections: None,
        ..*limits
    }
}

impl Sources {
    /// Decides the per-source limits for `ip` (a client a PROXY header named) on `frontend`
    /// and, if admitted, counts it until the place is dropped.
    pub fn admit_source(
        self: &Arc<Self>,
        frontend: &str,
        ip: IpAddr,
        limits: &FrontendLimits,
        now: Instant,
    ) -> Result<SourcePlace, Refusal> {
        self.admit(frontend, ip, &source_limits(limits), Load::default(), now)?;
        Ok(SourcePlace {
            sources: self.clone(),
            name: Arc::from(frontend),
            ip,
        })
    }
}

/// How often idle sources are pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use mqlb_config::SourceRate;
    use std::num::NonZeroU32;

    fn nz(n: u32) -> Option<NonZeroU32> {
        NonZeroU32::new(n)
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(3, t0);
        assert!(b.take(1.0, 3, t0) && b.take(1.0, 3, t0) && b.take(1.0, 3, t0));
        assert!(!b.take(1.0, 3, t0), "burst spent");
        assert!(!b.take(1.0, 3, t0 + Duration::from_millis(500)));
        assert!(b.take(1.0, 3, t0 + Duration::from_millis(1_000)));
        assert!(b.is_full(1.0, 3, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn each_limit_refuses_with_its_reason() {
        let limits = FrontendLimits {
            max_connections: nz(10),
            max_connections_per_source: nz(2),
            source_rate: None,
        };
        let c = |global, frontend, source| Counts {
            global,
            frontend,
            source,
        };
        assert_eq!(
            decide(Some(5), &limits, c(5, 0, 0), || true),
            Err(Refusal::Global)
        );
        assert_eq!(
            decide(None, &limits, c(50, 10, 0), || true),
            Err(Refusal::Frontend)
        );
        assert_eq!(
            decide(None, &limits, c(5, 5, 2), || true),
            Err(Refusal::Source)
        );
        assert_eq!(decide(None, &limits, c(5, 5, 1), || true), Ok(()));
        let rated = FrontendLimits {
            source_rate: Some(SourceRate {
                per_second: NonZeroU32::MIN,
                burst: NonZeroU32::MIN,
            }),
            ..limits
        };
        assert_eq!(
            decide(None, &rated, c(0, 0, 0), || false),
            Err(Refusal::SourceRate)
        );
        let mut spent = false;
        let _ = decide(Some(0), &rated, c(0, 0, 0), || {
            spent = true;
            true
        });
        assert!(!spent, "a refusal for another reason spends no token");
    }

    /// Behind an LB in front: the global and frontend limits at accept, the source's once
    /// the header named it, each counted for the source it names and given back on drop.
    #[test]
    fn a_proxied_source_is_limited_by_the_address_its_header_names() {
        let limits = FrontendLimits {
            max_connections: nz(10),
            max_connections_per_source: nz(1),
            source_rate: None,
        };
        let at_accept = accept_limits(&limits);
        let c = Counts {
            global: 0,
            frontend: 9,
            source: 5,
        };
        assert_eq!(decide(None, &at_accept, c, || false), Ok(()));
        let full = Counts { frontend: 10, ..c };
        assert_eq!(
            decide(None, &at_accept, full, || true),
            Err(Refusal::Frontend)
        );

        let s = Arc::new(Sources::default());
        let (a, b): (IpAddr, IpAddr) = (
            "198.51.100.1".parse().expect("ip"),
            "198.51.100.2".parse().expect("ip"),
        );
        let now = Instant::now();
        let first = s.admit_source("f", a, &limits, now).expect("first");
        assert_eq!(
            s.admit_source("f", a, &limits, now).err(),
            Some(Refusal::Source)
        );
        let other = s
            .admit_source("f", b, &limits, now)
            .expect("another client");
        drop(first);
        let again = s.admit_source("f", a, &limits, now).expect("given back");
        drop((again, other));
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn sources_are_counted_apart_and_forgotten_when_idle() {
        let s = Sources::default();
        let limits = FrontendLimits {
            max_connections: None,
            max_connections_per_source: nz(2),
            source_rate: None,
        };
        let (a, b): (IpAddr, IpAddr) = (
            "127.0.0.2".parse().expect("ip"),
            "127.0.0.3".parse().expect("ip"),
        );
        let now = Instant::now();
        let admit = |ip| s.admit("f", ip, &limits, Load::default(), now);
        assert!(admit(a).is_ok() && admit(a).is_ok());
        assert_eq!(admit(a), Err(Refusal::Source));
        assert!(admit(b).is_ok(), "another source still gets in");
        s.release("f", a);
        assert!(admit(a).is_ok());
        for ip in [a, a, b] {
            s.release("f", ip);
        }
        assert_eq!(s.len(), 0, "no entry without connections or a bucket");
    }
}
