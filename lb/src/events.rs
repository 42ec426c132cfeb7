//! Health events (`/api/events`): what Azure's resource health shows an operator, and what a
//! person reading the status page wants first: a backend went down or came back and why, a
//! pool has no healthy backend left, a member left the membership or was removed, a reload was
//! applied or refused, a rule's data-path availability fell below 90 % or 25 % (or recovered). Kept in a bounded ring in memory (the newest [`CAPACITY`]); the log has
//! them all (the producers log each one).
//!
//! The ring and the pool check are pure and unit-tested; [`Events`] stamps the wall clock and
//! takes the lock. Producers call it from the one place each change happens (`observe_health`,
//! the reload executor), one line each.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::backend::machine::Transition;
use crate::backend::Source;
use crate::snapshot::Snapshot;
use mqlb_http::lock;

/// Events kept in memory.
pub const CAPACITY: usize = 256;

/// A bounded ring numbering what it holds: the oldest go first, sequence numbers never repeat,
/// so a poller asks for what came after the last one it saw.
#[derive(Debug)]
pub struct Ring<T> {
    cap: usize,
    items: VecDeque<(u64, T)>,
    next: u64,
}

impl<T> Ring<T> {
    pub fn new(cap: usize) -> Ring<T> {
        Ring {
            cap: cap.max(1),
            items: VecDeque::with_capacity(cap.max(1)),
            next: 1,
        }
    }

    /// Adds `item`, dropping the oldest when full; returns its sequence number.
    pub fn push(&mut self, item: T) -> u64 {
        if self.items.len() == self.cap {
            self.items.pop_front();
        }
        let seq = self.next;
        self.next += 1;
        self.items.push_back((seq, item));
        seq
    }

    /// What was pushed after `seq`, oldest first.
    pub fn after(&self, seq: u64) -> impl Iterator<Item = &(u64, T)> {
        self.items.iter().filter(move |(s, _)| *s > seq)
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    BackendUp,
    BackendDown,
    /// No backend of a pool is up: its rules refuse every connection.
    NoHealthyBackends,
    /// A pool that had none has one up again.
    PoolRecovered,
    /// A discovered member left the membership: listed as down until `remove_after`.
    MemberLeft,
    /// It came back before `remove_after`.
    MemberReturned,
    /// `remove_after` passed: it is no longer listed.
    MemberRemoved,
    ReloadApplied,
    ReloadRefused,
    /// A rule's data path succeeded in less than 90 % of the last probes (Azure: degraded).
    DataPathDegraded,
    /// ... in less than 25 % (Azure: unavailable).
    DataPathDown,
    /// ... in 90 % or more again.
    DataPathRecovered,
    /// The admin API drained a backend (or started its evacuation): it takes no new client.
    BackendDrained,
    /// The admin API enabled it again.
    BackendEnabled,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::BackendUp => "backend_up",
            Kind::BackendDown => "backend_down",
            Kind::NoHealthyBackends => "no_healthy_backends",
            Kind::PoolRecovered => "pool_recovered",
            Kind::MemberLeft => "member_left",
            Kind::MemberReturned => "member_returned",
            Kind::MemberRemoved => "member_removed",
            Kind::ReloadApplied => "reload_applied",
            Kind::ReloadRefused => "reload_refused",
            Kind::DataPathDegraded => "data_path_degraded",
            Kind::DataPathDown => "data_path_down",
            Kind::DataPathRecovered => "data_path_recovered",
            Kind::BackendDrained => "backend_drained",
            Kind::BackendEnabled => "backend_enabled",
        }
    }

    /// `info`, `warning` or `error`, for the page's colours and for filtering.
    pub fn level(self) -> &'static str {
        match self {
            Kind::BackendDown | Kind::MemberLeft | Kind::ReloadRefused | Kind::DataPathDegraded => {
                "warning"
            }
            Kind::NoHealthyBackends | Kind::DataPathDown => "error",
            _ => "info",
        }
    }
}

/// One event as `/api/events` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: SystemTime,
    pub kind: Kind,
    pub pool: Option<String>,
    pub backend: Option<String>,
    /// Why: `probe`, `passive`, `left_membership`, or the reload's error.
    pub reason: Option<String>,
}

impl Event {
    fn json(&self, seq: u64) -> Value {
        json!({
            "seq": seq,
            "time": self.at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
            "kind": self.kind.name(),
            "level": self.kind.level(),
            "pool": self.pool,
            "backend": self.backend,
            "reason": self.reason,
        })
    }
}

/// Data-path availability over the last probes of a rule, graded as Azure's health events do:
/// healthy at 90 % or more, degraded below, down below 25 %. Graded once the window is full
/// (a single failed probe at start is no outage).
#[derive(Debug)]
pub struct Availability {
    results: VecDeque<bool>,
    window: usize,
    kind: Kind,
}

impl Availability {
    pub fn new(window: usize) -> Availability {
        Availability {
            results: VecDeque::with_capacity(window.max(1)),
            window: window.max(1),
            kind: Kind::DataPathRecovered,
        }
    }

    /// Adds a probe's result; returns the event and the share of successes when the grade
    /// changed.
    pub fn push(&mut self, ok: bool) -> Option<(Kind, f64)> {
        if self.results.len() == self.window {
            self.results.pop_front();
        }
        self.results.push_back(ok);
        if self.results.len() < self.window {
            return None;
        }
        let share = self.results.iter().filter(|r| **r).count() as f64 / self.window as f64;
        let kind = if share >= 0.9 {
            Kind::DataPathRecovered
        } else if share >= 0.25 {
            Kind::DataPathDegraded
        } else {
            Kind::DataPathDown
        };
        if kind == self.kind {
            return None;
        }
        self.kind = kind;
        Some((kind, share))
    }
}

/// The pools whose "has a healthy backend" flipped since `last` (which is updated): `true`
/// when one recovered. A pool not seen before counts as having had one, so a pool that starts
/// with none is reported; pools gone from `now` are forgotten.
pub fn pool_flips<'a>(
    last: &mut HashMap<String, bool>,
    now: impl IntoIterator<Item = (&'a str, bool)>,
) -> Vec<(String, bool)> {
    let mut flips = Vec::new();
    let mut seen = HashMap::new();
    for (pool, healthy) in now {
        let before = last.get(pool).copied().unwrap_or(true);
        if before != healthy {
            flips.push((pool.to_string(), healthy));
        }
        seen.insert(pool.to_string(), healthy);
    }
    *last = seen;
    flips
}

struct Inner {
    ring: Ring<Event>,
    /// Whether each pool had an up backend at the last check.
    healthy: HashMap<String, bool>,
}

/// The LB's events: the ring and the pool check, behind one lock (taken on changes of state
/// and by `/api/events`, never by the data path).
pub struct Events(Mutex<Inner>);

impl Default for Events {
    fn default() -> Events {
        Events(Mutex::new(Inner {
            ring: Ring::new(CAPACITY),
            healthy: HashMap::new(),
        }))
    }
}

impl Events {
    fn push(
        inner: &mut Inner,
        kind: Kind,
        pool: Option<&str>,
        backend: Option<&str>,
        reason: Option<String>,
    ) {
        inner.ring.push(Event {
            at: SystemTime::now(),
            kind,
            pool: pool.map(str::to_string),
            backend: backend.map(str::to_string),
            reason,
        });
    }

    /// Records one event. Backend transitions and reloads are logged where they happen.
    pub fn record(
        &self,
        kind: Kind,
        pool: Option<&str>,
        backend: Option<&str>,
        reason: Option<String>,
    ) {
        Events::push(&mut lock(&self.0), kind, pool, backend, reason);
    }

    /// A backend's health transition, then the pool check on `snap`.
    pub fn health(
        &self,
        snap: &Snapshot,
        (pool, backend): (&str, &str),
        t: Transition,
        from: Source,
    ) {
        let kind = match t {
            Transition::WentUp => Kind::BackendUp,
            Transition::WentDown => Kind::BackendDown,
        };
        let reason = (t == Transition::WentDown).then(|| from.name().to_string());
        let mut inner = lock(&self.0);
        Events::push(&mut inner, kind, Some(pool), Some(backend), reason);
        Events::check(&mut inner, snap);
    }

    /// A reload's result (`Err`: the error that refused it).
    pub fn reload(&self, result: Result<(), &dyn std::fmt::Display>) {
        match result {
            Ok(()) => self.record(Kind::ReloadApplied, None, None, None),
            Err(e) => self.record(Kind::ReloadRefused, None, None, Some(e.to_string())),
        }
    }

    /// Discovered members that left, came back or were removed by a membership change (see
    /// `discovery::Departures`), then the pool check on the snapshot now in force.
    pub fn membership(&self, snap: &Snapshot, changes: &crate::discovery::Changes) {
        let mut inner = lock(&self.0);
        for (ids, kind) in [
            (&changes.left, Kind::MemberLeft),
            (&changes.returned, Kind::MemberReturned),
            (&changes.removed, Kind::MemberRemoved),
        ] {
            for id in ids {
                tracing::info!(
                    backend = id,
                    event = kind.name(),
                    "membership: {}",
                    kind.name()
                );
                let reason =
                    (kind == Kind::MemberLeft).then(|| Source::LeftMembership.name().to_string());
                Events::push(&mut inner, kind, None, Some(id), reason);
            }
        }
        Events::check(&mut inner, snap);
    }

    /// Reports pools that lost their last up backend or got one back.
    fn check(inner: &mut Inner, snap: &Snapshot) {
        let now = snap.pools.iter().map(|p| {
            (
                p.cfg.name.as_str(),
                p.members.iter().any(|m| m.state.is_up()),
            )
        });
        for (pool, healthy) in pool_flips(&mut inner.healthy, now) {
            let kind = if healthy {
                tracing::info!(pool, "pool has a healthy backend again");
                Kind::PoolRecovered
            } else {
                tracing::warn!(
                    pool,
                    "no healthy backends in pool: its rules refuse every connection"
                );
                Kind::NoHealthyBackends
            };
            Events::push(inner, kind, Some(&pool), None, None);
        }
    }

    /// Events after `seq`, oldest first, as `/api/events` serves them.
    pub fn json(&self, after: u64) -> Value {
        let inner = lock(&self.0);
        Value::Array(inner.ring.after(after).map(|(s, e)| e.json(*s)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_and_numbers_never_repeat() {
        let mut r = Ring::new(3);
        for i in 0..5 {
            assert_eq!(r.push(i), i + 1);
        }
        let kept: Vec<_> = r.after(0).map(|(s, v)| (*s, *v)).collect();
        assert_eq!(kept, vec![(3, 2), (4, 3), (5, 4)]);
        let newer: Vec<_> = r.after(4).map(|(s, _)| *s).collect();
        assert_eq!(newer, vec![5]);
        assert_eq!(r.after(5).count(), 0);
        assert_eq!(Ring::<u8>::new(0).push(1), 1, "a zero capacity holds one");
    }

    #[test]
    fn a_pool_is_reported_when_it_loses_its_last_backend_and_when_one_returns() {
        let mut last = HashMap::new();
        assert_eq!(pool_flips(&mut last, [("a", true), ("b", true)]), vec![]);
        assert_eq!(
            pool_flips(&mut last, [("a", false), ("b", true)]),
            vec![("a".to_string(), false)]
        );
        assert_eq!(pool_flips(&mut last, [("a", false), ("b", true)]), vec![]);
        assert_eq!(
            pool_flips(&mut last, [("a", true), ("b", true)]),
            vec![("a".to_string(), true)]
        );
        // A new pool without backends is reported; a removed one is forgotten.
        assert_eq!(
            pool_flips(&mut last, [("c", false)]),
            vec![("c".to_string(), false)]
        );
        assert!(!last.contains_key("a"));
    }

    #[test]
    fn the_last_backend_going_down_empties_the_pool_and_one_coming_back_recovers_it() {
        let cfg = mqlb_config::Config::parse(
            "[[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\n[[pool]]\nname = \"p\"\n\
             [[pool.backend]]\nid = \"a\"\naddr = \"127.0.0.1:1001\"\n\
             [[pool.backend]]\nid = \"b\"\naddr = \"127.0.0.1:1002\"\n\
             [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n",
            "t",
        )
        .expect("valid");
        let snap = Snapshot::build(cfg, None);
        let ev = Events::default();
        let flip = |id: &str, ok: bool| {
            let m = snap.pools[0].member(id).expect("member");
            let t = m
                .state
                .observe(ok, 1, 1, Source::Probe)
                .expect("a transition");
            ev.health(&snap, ("p", id), t, Source::Probe);
        };
        flip("a", false);
        flip("b", false);
        flip("b", true);
        let kinds: Vec<_> = ev
            .json(0)
            .as_array()
            .expect("array")
            .iter()
            .map(|e| {
                (
                    e["kind"].as_str().unwrap_or("").to_string(),
                    e["backend"].clone(),
                )
            })
            .collect();
        let want = [
            ("backend_down", json!("a")),
            ("backend_down", json!("b")),
            ("no_healthy_backends", Value::Null),
            ("backend_up", json!("b")),
            ("pool_recovered", Value::Null),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(k, b)| (k.to_string(), b.clone()))
            .collect();
        assert_eq!(kinds, want);
        assert_eq!(ev.json(0)[0]["reason"], "probe");
    }

    #[test]
    fn events_are_listed_after_a_sequence_number_with_their_reason() {
        let ev = Events::default();
        ev.reload(Ok(()));
        ev.reload(Err(&"pool[0].name: empty"));
        let all = ev.json(0);
        let all = all.as_array().expect("array");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0]["kind"], "reload_applied");
        assert_eq!(all[1]["kind"], "reload_refused");
        assert_eq!(all[1]["level"], "warning");
        assert_eq!(all[1]["reason"], "pool[0].name: empty");
        assert!(all[1]["time"].as_f64().is_some_and(|t| t > 1.0e9));
        assert_eq!(ev.json(1).as_array().map(Vec::len), Some(1));
    }
    #[test]
    fn data_path_availability_is_graded_over_a_full_window() {
        let mut a = Availability::new(10);
        // a failure before the window is full is no event
        assert_eq!(a.push(false), None);
        for _ in 0..8 {
            assert_eq!(a.push(true), None);
        }
        // 9 of 10: healthy, as it started
        assert_eq!(a.push(true), None);
        let mut seen = Vec::new();
        for _ in 0..10 {
            if let Some((k, share)) = a.push(false) {
                seen.push((k, (share * 10.0).round() as u32));
            }
        }
        assert_eq!(
            seen,
            [(Kind::DataPathDegraded, 8), (Kind::DataPathDown, 2)],
            "below 90 %, then below 25 %"
        );
        let back: Vec<Kind> = (0..10)
            .filter_map(|_| a.push(true))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(back, [Kind::DataPathDegraded, Kind::DataPathRecovered]);
        assert_eq!(Kind::DataPathDown.level(), "error");
    }
}
