//! The cluster checker's pure half (issue 12): a seeded chaos plan, the history a run records
//! (what each publisher had acknowledged, what each subscriber received, every CONNACK's
//! Session Present, samples of the LB's live connections) and the check over it. No sockets
//! and no clock: `tests/tests/cluster_checker.rs` and `benches/src/bin/failover.rs` do the I/O
//! and hand the record here, so every rule of the check is unit-tested on hand-made histories.
//!
//! The rules, Jepsen-style, over what clients saw rather than what the brokers say:
//! - **0 lost**: every sequence number a publisher got a PUBACK for reached every subscriber;
//! - duplicates are counted, not failed (QoS 1 is at least once);
//! - **Session Present 1** on every reconnect of a persistent session;
//! - **never two live connections** for one client ID in one sample of the LB's list.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

/// SplitMix64: a few lines, seeded, the same sequence on every machine; enough to pick
/// moments and victims (not for anything secret).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// A duration in `lo..=hi`, to the millisecond.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let (lo, hi) = (
            lo.as_millis() as u64,
            hi.as_millis().max(lo.as_millis()) as u64,
        );
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// What is done to a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, restarted on the same ports after `hold`.
    Kill,
    /// SIGSTOP, SIGCONT after `hold`.
    Pause,
}

/// One fault of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChaosEvent {
    /// From the start of the chaos phase.
    pub at: Duration,
    /// Which broker: its rank by the clients it holds when the fault comes, 0 the busiest (a
    /// broker whose clients all left already would be a fault that tests nothing).
    pub rank: usize,
    pub fault: Fault,
    /// How long the broker stays dead or paused.
    pub hold: Duration,
}

/// The shape of a plan: how many faults, how long each lasts, the quiet time after each (so
/// clients settle before the next one).
#[derive(Debug, Clone)]
pub struct ChaosShape {
    pub events: usize,
    pub kill_hold: (Duration, Duration),
    pub pause_hold: (Duration, Duration),
    pub quiet: (Duration, Duration),
}

/// The faults of one run, from its seed, for a cluster of `brokers`: one broker at a time, each after the quiet time that
/// followed the previous one. The first is a kill, and a plan of two or more has a pause (a
/// run that drew only one kind would leave half the promise unchecked).
pub fn chaos_plan(seed: u64, brokers: usize, shape: &ChaosShape) -> Vec<ChaosEvent> {
    let mut rng = Rng::new(seed);
    let mut at = rng.between(Duration::ZERO, shape.quiet.0);
    let mut plan = Vec::with_capacity(shape.events);
    for i in 0..shape.events {
        let fault = match i {
            0 => Fault::Kill,
            _ if i + 1 == shape.events
                && !plan.iter().any(|e: &ChaosEvent| e.fault == Fault::Pause) =>
            {
                Fault::Pause
            }
            _ if rng.below(2) == 0 => Fault::Kill,
            _ => Fault::Pause,
        };
        let hold = match fault {
            Fault::Kill => rng.between(shape.kill_hold.0, shape.kill_hold.1),
            Fault::Pause => rng.between(shape.pause_hold.0, shape.pause_hold.1),
        };
        // The busiest or the next: each fault moves clients.
        let rank = rng.below(brokers.clamp(1, 2) as u64) as usize;
        plan.push(ChaosEvent {
            at,
            rank,
            fault,
            hold,
        });
        at += hold + rng.between(shape.quiet.0, shape.quiet.1);
    }
    plan
}

/// A client's connection history: Session Present of each CONNACK, in order (the first is a
/// new session's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientLog {
    pub id: String,
    pub session_present: Vec<bool>,
}

impl ClientLog {
    pub fn reconnects(&self) -> usize {
        self.session_present.len().saturating_sub(1)
    }

    /// Reconnects answered with Session Present 0: the session was lost.
    pub fn sessions_lost(&self) -> usize {
        self.session_present.iter().skip(1).filter(|p| !**p).count()
    }
}

/// A publisher's record: how many sequence numbers it sent and which it got a PUBACK for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublisherLog {
    pub client: ClientLog,
    pub sent: u64,
    pub acked: Vec<u64>,
}

/// A subscriber's record: each delivery as (publisher index, sequence number), in arrival
/// order, duplicates included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriberLog {
    pub client: ClientLog,
    pub received: Vec<(usize, u64)>,
}

/// One look at the LB's `/api/connections`: (client ID, backend, connection id) of each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sample {
    /// From the start of the run.
    pub at: Duration,
    pub connections: Vec<(String, String, u64)>,
}

/// Everything a run recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    pub publishers: Vec<PublisherLog>,
    pub subscribers: Vec<SubscriberLog>,
    pub samples: Vec<Sample>,
}

/// A broken promise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Acknowledged to the publisher, never delivered to the subscriber.
    Lost {
        subscriber: String,
        publisher: String,
        count: usize,
        /// The first few, for a look at the logs.
        first: Vec<u64>,
    },
    /// A reconnect of a persistent session answered with Session Present 0.
    SessionLost { client: String, connack: usize },
    /// One client ID live on two connections at once.
    TwoLive {
        client: String,
        at: Duration,
        backends: Vec<String>,
    },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Lost {
                subscriber,
                publisher,
                count,
                first,
            } => write!(
                f,
                "{subscriber} lost {count} acknowledged messages of {publisher} (first {first:?})"
            ),
            Violation::SessionLost { client, connack } => {
                write!(f, "{client}: CONNACK #{connack} had Session Present 0")
            }
            Violation::TwoLive {
                client,
                at,
                backends,
            } => write!(f, "{client} live twice at {at:?}: on {backends:?}"),
        }
    }
}

/// One subscriber's line of the summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberRow {
    pub id: String,
    pub received: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub reconnects: usize,
    pub sessions_lost: usize,
}

/// One publisher's line of the summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherRow {
    pub id: String,
    pub sent: u64,
    pub acked: usize,
    pub reconnects: usize,
    pub sessions_lost: usize,
}

/// The check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub subscribers: Vec<SubscriberRow>,
    pub publishers: Vec<PublisherRow>,
    pub violations: Vec<Violation>,
    /// Samples of the LB's list the check looked at.
    pub samples: usize,
}

/// Checks `h` against every rule (module doc).
pub fn check(h: &History) -> Verdict {
    let mut violations = Vec::new();
    let acked: Vec<BTreeSet<u64>> = h
        .publishers
        .iter()
        .map(|p| p.acked.iter().copied().collect())
        .collect();
    let mut subscribers = Vec::new();
    for s in &h.subscribers {
        let mut got: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
        let mut duplicates = 0;
        for (p, seq) in &s.received {
            if !got.entry(*p).or_default().insert(*seq) {
                duplicates += 1;
            }
        }
        let mut lost = 0;
        for (i, want) in acked.iter().enumerate() {
            let empty = BTreeSet::new();
            let have = got.get(&i).unwrap_or(&empty);
            let missing: Vec<u64> = want.difference(have).copied().collect();
            if !missing.is_empty() {
                lost += missing.len();
                violations.push(Violation::Lost {
                    subscriber: s.client.id.clone(),
                    publisher: h.publishers[i].client.id.clone(),
                    count: missing.len(),
                    first: missing.into_iter().take(5).collect(),
                });
            }
        }
        subscribers.push(SubscriberRow {
            id: s.client.id.clone(),
            received: s.received.len(),
            lost,
            duplicates,
            reconnects: s.client.reconnects(),
            sessions_lost: s.client.sessions_lost(),
        });
    }
    let clients = h
        .subscribers
        .iter()
        .map(|s| &s.client)
        .chain(h.publishers.iter().map(|p| &p.client));
    for c in clients {
        for (n, present) in c.session_present.iter().enumerate().skip(1) {
            if !present {
                violations.push(Violation::SessionLost {
                    client: c.id.clone(),
                    connack: n + 1,
                });
            }
        }
    }
    violations.extend(two_live(&h.samples));
    Verdict {
        publishers: h
            .publishers
            .iter()
            .zip(&acked)
            .map(|(p, a)| PublisherRow {
                id: p.client.id.clone(),
                sent: p.sent,
                acked: a.len(),
                reconnects: p.client.reconnects(),
                sessions_lost: p.client.sessions_lost(),
            })
            .collect(),
        subscribers,
        violations,
        samples: h.samples.len(),
    }
}

/// Client IDs listed with two or more connections in one sample; each (client, set of
/// backends) once per stretch of consecutive samples, so one long overlap is one violation.
fn two_live(samples: &[Sample]) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut open: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in samples {
        let mut by_client: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (client, backend, _) in &s.connections {
            by_client
                .entry(client.as_str())
                .or_default()
                .push(backend.clone());
        }
        let mut now = BTreeMap::new();
        for (client, mut backends) in by_client.into_iter().filter(|(_, b)| b.len() > 1) {
            backends.sort();
            if open.get(client) != Some(&backends) {
                out.push(Violation::TwoLive {
                    client: client.to_string(),
                    at: s.at,
                    backends: backends.clone(),
                });
            }
            now.insert(client.to_string(), backends);
        }
        open = now;
    }
    out
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn lost(&self) -> usize {
        self.subscribers.iter().map(|s| s.lost).sum()
    }

    pub fn duplicates(&self) -> usize {
        self.subscribers.iter().map(|s| s.duplicates).sum()
    }

    pub fn sessions_lost(&self) -> usize {
        self.violations
            .iter()
            .filter(|v| matches!(v, Violation::SessionLost { .. }))
            .count()
    }

    pub fn two_live(&self) -> usize {
        self.violations
            .iter()
            .filter(|v| matches!(v, Violation::TwoLive { .. }))
            .count()
    }

    /// The summary: a line per subscriber and per publisher, the totals, and the first
    /// violations.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let w = self
            .subscribers
            .iter()
            .map(|s| s.id.len())
            .chain(self.publishers.iter().map(|p| p.id.len()))
            .max()
            .unwrap_or(6)
            .max(10);
        // Writing to a String cannot fail.
        let _ = writeln!(
            t,
            "{:<w$} {:>9} {:>7} {:>6} {:>10} {:>10}",
            "subscriber", "received", "lost", "dups", "reconnects", "sp=0"
        );
        for s in &self.subscribers {
            let _ = writeln!(
                t,
                "{:<w$} {:>9} {:>7} {:>6} {:>10} {:>10}",
                s.id, s.received, s.lost, s.duplicates, s.reconnects, s.sessions_lost
            );
        }
        let _ = writeln!(
            t,
            "{:<w$} {:>9} {:>7} {:>6} {:>10} {:>10}",
            "publisher", "sent", "acked", "", "reconnects", "sp=0"
        );
        for p in &self.publishers {
            let _ = writeln!(
                t,
                "{:<w$} {:>9} {:>7} {:>6} {:>10} {:>10}",
                p.id, p.sent, p.acked, "", p.reconnects, p.sessions_lost
            );
        }
        let _ = writeln!(
            t,
            "total: lost {}, duplicates {}, reconnects with Session Present 0: {}, \
             two live connections for one client ID: {} (in {} samples of the LB)",
            self.lost(),
            self.duplicates(),
            self.sessions_lost(),
            self.two_live(),
            self.samples
        );
        for v in self.violations.iter().take(10) {
            let _ = writeln!(t, "  {v}");
        }
        if self.violations.len() > 10 {
            let _ = writeln!(t, "  ... {} more", self.violations.len() - 10);
        }
        t
    }
}

/// Where `client` was connected around `at`, for a look at a violation: its backends in the
/// last sample at or before `at` and in the first one after (empty: not listed, or no sample).
pub fn where_at(samples: &[Sample], client: &str, at: Duration) -> (Vec<String>, Vec<String>) {
    let on = |s: &Sample| -> Vec<String> {
        s.connections
            .iter()
            .filter(|(c, _, _)| c == client)
            .map(|(_, b, _)| b.clone())
            .collect()
    };
    let before = samples.iter().rev().find(|s| s.at <= at).map(on);
    let after = samples.iter().find(|s| s.at > at).map(on);
    (before.unwrap_or_default(), after.unwrap_or_default())
}

/// What a `$share` group's members received, checked: each acknowledged message reached the
/// group (at least one member), and those of the calm before a fault exactly one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareVerdict {
    pub acked: usize,
    /// Acknowledged, received by no member.
    pub lost: Vec<u64>,
    /// Received more than once (by one member or several), sequence numbers below the calm's
    /// end: a failure of "exactly one member".
    pub twice_in_calm: Vec<u64>,
    /// Received more than once at or after it: redeliveries across the fault, allowed.
    pub twice_after: usize,
    /// (member, deliveries) of each member.
    pub per_member: Vec<(String, usize)>,
}

impl ShareVerdict {
    pub fn passed(&self) -> bool {
        self.lost.is_empty() && self.twice_in_calm.is_empty()
    }
}

/// Checks a `$share` group's deliveries: `members` are (client ID, sequence numbers
/// received); `calm_until` the first sequence number that may have been in flight at a fault.
pub fn check_share(acked: &[u64], members: &[(String, Vec<u64>)], calm_until: u64) -> ShareVerdict {
    let mut times: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, got) in members {
        for seq in got {
            *times.entry(*seq).or_default() += 1;
        }
    }
    let twice = |calm: bool| {
        times
            .iter()
            .filter(move |(seq, n)| **n > 1 && (**seq < calm_until) == calm)
            .map(|(seq, _)| *seq)
    };
    ShareVerdict {
        acked: acked.len(),
        lost: acked
            .iter()
            .filter(|seq| !times.contains_key(seq))
            .copied()
            .collect(),
        twice_in_calm: twice(true).collect(),
        twice_after: twice(false).count(),
        per_member: members
            .iter()
            .map(|(id, got)| (id.clone(), got.len()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str, sp: &[bool]) -> ClientLog {
        ClientLog {
            id: id.into(),
            session_present: sp.to_vec(),
        }
    }

    /// Two publishers with 0..10 acknowledged, two subscribers that got all of it once.
    fn clean() -> History {
        let all: Vec<(usize, u64)> = (0..2).flat_map(|p| (0..10).map(move |s| (p, s))).collect();
        History {
            publishers: (0..2)
                .map(|i| PublisherLog {
                    client: client(&format!("p{i}"), &[false]),
                    sent: 10,
                    acked: (0..10).collect(),
                })
                .collect(),
            subscribers: (0..2)
                .map(|i| SubscriberLog {
                    client: client(&format!("s{i}"), &[false, true]),
                    received: all.clone(),
                })
                .collect(),
            samples: vec![Sample {
                at: Duration::from_millis(100),
                connections: vec![("s0".into(), "b1".into(), 1), ("s1".into(), "b2".into(), 2)],
            }],
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let v = check(&clean());
        assert!(v.passed(), "{}", v.table());
        assert_eq!(v.subscribers[0].received, 20);
        assert_eq!(v.subscribers[0].reconnects, 1);
        assert_eq!(v.publishers[1].acked, 10);
    }

    #[test]
    fn an_acknowledged_message_missing_is_lost() {
        let mut h = clean();
        h.subscribers[1].received.retain(|m| *m != (1, 7));
        let v = check(&h);
        assert_eq!(
            v.violations,
            vec![Violation::Lost {
                subscriber: "s1".into(),
                publisher: "p1".into(),
                count: 1,
                first: vec![7],
            }]
        );
        assert_eq!((v.lost(), v.subscribers[1].lost), (1, 1));
    }

    #[test]
    fn an_unacknowledged_message_may_be_missing() {
        let mut h = clean();
        h.publishers[0].sent = 11;
        assert!(check(&h).passed());
    }

    #[test]
    fn a_duplicate_is_counted_and_allowed() {
        let mut h = clean();
        h.subscribers[0].received.push((0, 3));
        h.subscribers[0].received.push((0, 3));
        let v = check(&h);
        assert!(v.passed(), "{}", v.table());
        assert_eq!((v.duplicates(), v.subscribers[0].duplicates), (2, 2));
    }

    #[test]
    fn a_reconnect_without_the_session_fails_the_first_connect_does_not() {
        let mut h = clean();
        h.subscribers[0].client.session_present = vec![false, true, false];
        h.publishers[0].client.session_present = vec![false, false];
        let v = check(&h);
        assert_eq!(
            v.violations,
            vec![
                Violation::SessionLost {
                    client: "s0".into(),
                    connack: 3
                },
                Violation::SessionLost {
                    client: "p0".into(),
                    connack: 2
                },
            ]
        );
        assert_eq!(v.subscribers[0].sessions_lost, 1);
    }

    #[test]
    fn two_live_connections_in_one_sample_fail_once_per_overlap() {
        let mut h = clean();
        let twice = Sample {
            at: Duration::from_millis(300),
            connections: vec![
                ("s0".into(), "b2".into(), 7),
                ("s1".into(), "b2".into(), 2),
                ("s0".into(), "b1".into(), 1),
            ],
        };
        let later = Sample {
            at: Duration::from_millis(500),
            ..twice.clone()
        };
        let gone = Sample {
            at: Duration::from_millis(700),
            connections: vec![("s0".into(), "b2".into(), 7)],
        };
        let again = Sample {
            at: Duration::from_millis(900),
            ..twice.clone()
        };
        h.samples.extend([twice, later, gone, again]);
        let v = check(&h);
        let at = |ms| Violation::TwoLive {
            client: "s0".into(),
            at: Duration::from_millis(ms),
            backends: vec!["b1".into(), "b2".into()],
        };
        assert_eq!(v.violations, vec![at(300), at(900)]);
        assert!(v
            .table()
            .contains("two live connections for one client ID: 2 (in 5 samples"));
    }

    #[test]
    fn the_table_has_a_line_per_client_and_the_totals() {
        let mut h = clean();
        h.subscribers[0].received.clear();
        let t = check(&h).table();
        assert_eq!(t.lines().filter(|l| l.starts_with('s')).count(), 3, "{t}");
        assert!(t.contains("total: lost 20, duplicates 0"), "{t}");
        assert!(t.contains("s0 lost 10 acknowledged messages of p0"), "{t}");
    }

    #[test]
    fn a_plan_is_the_same_for_a_seed_and_keeps_its_bounds() {
        let shape = ChaosShape {
            events: 4,
            kill_hold: (Duration::from_millis(500), Duration::from_millis(2000)),
            pause_hold: (Duration::from_millis(2000), Duration::from_millis(3000)),
            quiet: (Duration::from_secs(3), Duration::from_secs(4)),
        };
        for seed in 0..200 {
            let plan = chaos_plan(seed, 3, &shape);
            assert_eq!(plan, chaos_plan(seed, 3, &shape));
            assert_eq!(plan.len(), 4);
            assert_eq!(plan[0].fault, Fault::Kill);
            assert!(plan.iter().any(|e| e.fault == Fault::Pause), "{plan:?}");
            for (i, e) in plan.iter().enumerate() {
                assert!(e.rank < 2);
                let (lo, hi) = match e.fault {
                    Fault::Kill => shape.kill_hold,
                    Fault::Pause => shape.pause_hold,
                };
                assert!(e.hold >= lo && e.hold <= hi, "{e:?}");
                if let Some(next) = plan.get(i + 1) {
                    let gap = next.at - (e.at + e.hold);
                    assert!(gap >= shape.quiet.0 && gap <= shape.quiet.1, "{plan:?}");
                }
            }
        }
        assert_ne!(chaos_plan(1, 3, &shape), chaos_plan(2, 3, &shape));
    }

    #[test]
    fn a_share_group_gets_each_message_once_in_the_calm_at_least_once_after() {
        let members = vec![
            ("m1".to_string(), vec![0, 2, 4, 6, 8]),
            ("m2".to_string(), vec![1, 3, 5, 6, 7]),
        ];
        let acked: Vec<u64> = (0..9).collect();
        let v = check_share(&acked, &members, 6);
        assert!(v.passed(), "{v:?}");
        assert_eq!((v.twice_after, v.per_member[1].1), (1, 5));

        let lost = check_share(&(0..10).collect::<Vec<_>>(), &members, 6);
        assert_eq!(lost.lost, vec![9]);
        assert!(!lost.passed());

        let twice = check_share(&acked, &members, 7);
        assert_eq!(twice.twice_in_calm, vec![6]);
        assert!(!twice.passed());
    }

    #[test]
    fn where_a_client_was_around_a_moment() {
        let sample = |ms, conns: &[(&str, &str)]| Sample {
            at: Duration::from_millis(ms),
            connections: conns
                .iter()
                .enumerate()
                .map(|(i, (c, b))| (c.to_string(), b.to_string(), i as u64))
                .collect(),
        };
        let samples = vec![
            sample(100, &[("s0", "b1")]),
            sample(300, &[]),
            sample(500, &[("s0", "b2"), ("s1", "b1")]),
        ];
        let at = |ms| where_at(&samples, "s0", Duration::from_millis(ms));
        assert_eq!(at(200), (vec!["b1".to_string()], vec![]));
        assert_eq!(at(300), (vec![], vec!["b2".to_string()]));
        assert_eq!(at(50), (vec![], vec!["b1".to_string()]));
        assert_eq!(at(900), (vec!["b2".to_string()], vec![]));
    }
}
