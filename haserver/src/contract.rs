//! What every [`Store`] must do, as checks any store can be put through: the SQLite unit tests
//! run them (`store::sqlite`), and `tests/tests/ha_postgres.rs` runs the same ones against a
//! real PostgreSQL, so both stores are shown to keep the same semantics for members, events,
//! versions, the lease, fencing and retained messages. Hidden from the docs: it is test code the integration
//! tests must reach. Each check gets `open`, which opens the *same* fresh database each time it
//! is called (a second server, or a restart).

use std::time::{Duration, Instant};

use crate::expiry::Cutoffs;
use crate::model::{MemberState, Registration};
use crate::queued::{QueuedEntry, QueuedMessage};
use crate::retained::{RetainedEntry, RetainedProps};
use crate::sessions::{SessionEntry, StoredSession, StoredSubscription};
use crate::store::{Registered, Store, StoreError};

pub type Failure = Box<dyn std::error::Error + Send + Sync>;
/// Opens the check's database (another handle on it each call).
pub type Open<'a> = &'a dyn Fn() -> Result<Box<dyn Store>, StoreError>;
pub type Check = fn(Open<'_>) -> Result<(), Failure>;

/// Every check, by name.
pub const CHECKS: &[(&str, Check)] = &[
    ("membership_lifecycle", membership_lifecycle),
    (
        "lease_one_holder_until_it_expires",
        lease_one_holder_until_it_expires,
    ),
    (
        "lease_same_id_elsewhere_does_not_share",
        lease_same_id_elsewhere_does_not_share,
    ),
    ("lease_race_has_one_winner", lease_race_has_one_winner),
    ("stale_epochs_are_fenced", stale_epochs_are_fenced),
    (
        "a_live_member_cannot_be_re_pointed",
        a_live_member_cannot_be_re_pointed,
    ),
    ("max_members", max_members),
    ("state_survives_reopening", state_survives_reopening),
    ("retained_messages", retained_messages),
    ("persistent_sessions", persistent_sessions),
    ("queued_messages", queued_messages),
];

/// A lease no check outlives.
const LONG: i64 = 600_000;

/// A member registration with only its ID varying, for checks and tests.
pub fn reg(id: &str) -> Registration {
    Registration {
        id: id.into(),
        mqtt: "127.0.0.1:1883".into(),
        mqtt_v5: None,
        mesh: None,
        http: None,
        pid: None,
    }
}

/// The cutoffs of a round at `now_ms` with every grace over.
fn after(now_ms: i64, down_after_ms: i64, remove_after_ms: i64) -> Cutoffs {
    Cutoffs {
        down_before_ms: Some(now_ms - down_after_ms),
        remove_before_ms: Some(now_ms - remove_after_ms),
    }
}

/// The epoch of a lease taken by "ha1" for the whole check.
fn primary(s: &dyn Store) -> Result<u64, Failure> {
    let l = s.acquire_lease("ha1", "a1", LONG)?;
    if l.holder != "ha1" {
        return Err(format!("ha1 could not take a free lease: {l:?}").into());
    }
    Ok(l.epoch)
}

/// Lets `holder`'s lease run out (renewed for 1 ms), then waits until `taker` takes it, by the
/// database's clock; returns the taker's epoch.
fn run_out(s: &dyn Store, holder: (&str, &str), taker: (&str, &str)) -> Result<u64, Failure> {
    s.acquire_lease(holder.0, holder.1, 1)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let l = s.acquire_lease(taker.0, taker.1, LONG)?;
        if l.is_held_by(taker.0, taker.1) {
            return Ok(l.epoch);
        }
        if Instant::now() > deadline {
            return Err(format!("{taker:?} never took a lease that ran out: {l:?}").into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn fenced<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) -> Result<(), Failure> {
    match r {
        Err(StoreError::Fenced { .. }) => Ok(()),
        other => Err(format!("{what}: expected a fenced refusal, got {other:?}").into()),
    }
}

pub fn membership_lifecycle(open: Open<'_>) -> Result<(), Failure> {
    let s = open()?;
    let e = primary(s.as_ref())?;
    assert_eq!(s.register(e, &reg("b1"), 1_000, 10)?, Registered::Done(1));
    assert_eq!(s.register(e, &reg("b2"), 1_000, 10)?, Registered::Done(2));
    assert_eq!(
        s.heartbeat(e, "b1", 2_000)?,
        Some(2),
        "a heartbeat of an up member changes nothing"
    );
    assert_eq!(s.heartbeat(e, "nope", 2_000)?, None);
    assert_eq!(
        s.expire(e, 99_000, Cutoffs::default())?,
        None,
        "during the grace nobody expires, however long the silence"
    );
    // b2 silent for 3 s: down; b1 heard at 2 s: still up.
    assert_eq!(s.expire(e, 4_500, after(4_500, 3_000, 10_000))?, Some(3));
    let view = s.cluster()?;
    let states: Vec<_> = view
        .members
        .iter()
        .map(|m| (m.reg.id.as_str(), m.state))
        .collect();
    assert_eq!(
        states,
        vec![("b1", MemberState::Up), ("b2", MemberState::Down)]
    );
    assert_eq!(view.version, 3);
    assert_eq!(
        s.expire(e, 4_600, after(4_600, 3_000, 10_000))?,
        None,
        "nothing new"
    );
    assert_eq!(s.heartbeat(e, "b2", 5_000)?, Some(4), "back up");
    assert_eq!(
        s.expire(e, 20_000, after(20_000, 3_000, 10_000))?,
        Some(8),
        "both down (5, 6), then removed (7, 8)"
    );
    assert!(s.cluster()?.members.is_empty());
    assert_eq!(s.version()?, 8);
    let events = s.events(0, 100)?;
    let kinds: Vec<String> = events
        .iter()
        .map(|e| format!("{}:{}@{}", e.member, e.kind, e.version))
        .collect();
    assert_eq!(
        kinds,
        [
            "b1:registered@1",
            "b2:registered@2",
            "b2:down@3",
            "b2:up@4",
            "b1:down@5",
            "b2:down@6",
            "b1:removed@7",
            "b2:removed@8"
        ]
    );
    let after_third: Vec<u64> = s
        .events(events[2].seq, 2)?
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(after_third, [4, 5], "events after a seq, limited");
    assert!(s.deregister(e, "b1", 21_000)?.is_none(), "gone already");
    Ok(())
}

pub fn lease_one_holder_until_it_expires(open: Open<'_>) -> Result<(), Failure> {
    let s = open()?;
    let first = s.acquire_lease("ha1", "a1", LONG)?;
    assert_eq!((first.holder.as_str(), first.epoch), ("ha1", 1));
    assert_eq!(
        s.acquire_lease("ha2", "a2", LONG)?,
        first,
        "not expired: unchanged"
    );
    let renewed = s.acquire_lease("ha1", "a1", LONG)?;
    assert_eq!(renewed.epoch, 1, "a renewal keeps the epoch");
    assert!(
        renewed.expires_ms >= first.expires_ms,
        "renewed: {renewed:?}"
    );
    assert_eq!(
        run_out(s.as_ref(), ("ha1", "a1"), ("ha2", "a2"))?,
        2,
        "taken over"
    );
    s.release_lease("ha1", "a1")?; // not the holder: no effect
    assert_eq!(s.acquire_lease("ha1", "a1", LONG)?.holder, "ha2");
    s.release_lease("ha2", "elsewhere")?; // the holder's id at another address: neither
    assert_eq!(s.acquire_lease("ha1", "a1", LONG)?.holder, "ha2");
    s.release_lease("ha2", "a2")?;
    let l = s.acquire_lease("ha1", "a1", LONG)?;
    assert_eq!(
        (l.holder.as_str(), l.epoch),
        ("ha1", 3),
        "released: free, and a new epoch"
    );
    Ok(())
}

/// Issue 13: a second server started by mistake with the id of the primary must not renew
/// (and so share) the primary's lease.
pub fn lease_same_id_elsewhere_does_not_share(open: Open<'_>) -> Result<(), Failure> {
    let s = open()?;
    let first = s.acquire_lease("ha1", "a1", LONG)?;
    assert_eq!(
        s.acquire_lease("ha1", "a9", LONG)?,
        first,
        "not taken, not renewed"
    );
    assert_eq!(
        run_out(s.as_ref(), ("ha1", "a1"), ("ha1", "a9"))?,
        2,
        "expired: free for anyone"
    );
    Ok(())
}

/// HA servers racing for a free lease (each with a handle of its own): exactly one wins, and
/// every one of them sees the winner.
pub fn lease_race_has_one_winner(open: Open<'_>) -> Result<(), Failure> {
    let stores = (0..4).map(|_| open()).collect::<Result<Vec<_>, _>>()?;
    let seen = std::thread::scope(|scope| {
        let racers: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(i, s)| {
                scope.spawn(move || {
                    let (id, addr) = (format!("ha{i}"), format!("a{i}"));
                    (0..10)
                        .map(|_| {
                            s.acquire_lease(&id, &addr, LONG)
                                .map(|l| (l.holder, l.epoch))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        racers
            .into_iter()
            .map(|r| r.join().map_err(|_| "a racer panicked".to_string()))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let mut all: Vec<(String, u64)> = Vec::new();
    for r in seen {
        all.extend(r?);
    }
    assert_eq!(all.len(), 40);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 1, "one holder, one epoch: {all:?}");
    assert_eq!(all[0].1, 1);
    Ok(())
}

/// Fencing: a write is accepted only with the epoch of the live lease, by the database's clock.
pub fn stale_epochs_are_fenced(open: Open<'_>) -> Result<(), Failure> {
    let s = open()?;
    fenced(
        s.register(0, &reg("b0"), 1_000, 10),
        "before anyone held the lease",
    )?;
    let e1 = primary(s.as_ref())?;
    assert_eq!(s.register(e1, &reg("b1"), 1_000, 10)?, Registered::Done(1));
    fenced(s.register(e1 + 1, &reg("b2"), 1_000, 10), "a future epoch")?;
    let e2 = run_out(s.as_ref(), ("ha1", "a1"), ("ha2", "a2"))?;
    assert!(e2 > e1);
    // The old primary, unaware, goes on writing: every kind of write is refused.
    fenced(s.register(e1, &reg("b2"), 2_000, 10), "register")?;
    fenced(s.heartbeat(e1, "b1", 2_000), "heartbeat")?;
    fenced(s.deregister(e1, "b1", 2_000), "deregister")?;
    fenced(s.expire(e1, 9_000, after(9_000, 1, 1)), "expire")?;
    assert_eq!(s.version()?, 1, "no refused write changed anything");
    assert_eq!(s.cluster()?.members.len(), 1);
    assert_eq!(
        s.heartbeat(e2, "b1", 2_000)?,
        Some(1),
        "the new primary writes"
    );
    // A lease that ran out fences its own holder too, until it is taken again.
    s.acquire_lease("ha2", "a2", 1)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match s.heartbeat(e2, "b1", 3_000) {
            Err(StoreError::Fenced { expired: true, .. }) => break,
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            other => return Err(format!("an expired lease still writes: {other:?}").into()),
        }
    }
    Ok(())
}

/// Issue 13: a registration re-pointing a live member is refused; once it is down or gone
/// (expired, deregistered), or at the same addresses (a restart), it is accepted.
pub fn a_live_member_cannot_be_re_pointed(open: Open<'_>) -> Result<(), Failure> {
    let s = open()?;
    let e = primary(s.as_ref())?;
    let at = |id: &str, mqtt: &str| Registration {
        mqtt: mqtt.into(),
        ..reg(id)
    };
    assert_eq!(s.register(e, &reg("b1"), 1_000, 10)?, Registered::Done(1));
    let trap = at("b1", "127.0.0.1:30950");
    assert_eq!(
        s.register(e, &trap, 1_100, 10)?,
        Registered::AddressHeld(reg("b1"))
    );
    let moved_mesh = Registration {
        mesh: Some("127.0.0.1:30951".into()),
        ..reg("b1")
    };
    assert!(matches!(
        s.register(e, &moved_mesh, 1_100, 10)?,
        Registered::AddressHeld(_)
    ));
    let restarted = Registration {
        pid: Some(42),
        ..reg("b1")
    };
    assert_eq!(s.register(e, &restarted, 1_200, 10)?, Registered::Done(2));
    let m = &s.cluster()?.members[0];
    assert_eq!(
        (m.reg.mqtt.as_str(), m.reg.pid),
        ("127.0.0.1:1883", Some(42))
    );
    // Down (expired): the id may move.
    assert!(s.expire(e, 9_000, after(9_000, 3_000, 60_000))?.is_some());
    assert_eq!(s.register(e, &trap, 9_100, 10)?, Registered::Done(4));
    // Deregistered: the id may move.
    assert!(s.deregister(e, "b1", 9_200)?.is_some());
    assert_eq!(s.register(e, &reg("b1"), 9_300, 10)?, Registered::Done(6));
    let kinds: Vec<String> = s.events(0, 100)?.into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            "registered",
            "re-registered",
            "down",
            "re-registered",
            "deregistered",
            "registered"
        ]
    );
    Ok(())
}

pub fn max_members(open: Open<'_>) -> Result<(), Failure> {
    let s = open()?;
    let e = primary(s.as_ref())?;
    for i in 0..3 {
        assert!(matches!(
            s.register(e, &reg(&format!("b{i}")), 1_000, 3)?,
            Registered::Done(_)
        ));
    }
    assert_eq!(s.register(e, &reg("b3"), 1_000, 3)?, Registered::Full(3));
    assert!(
        matches!(s.register(e, &reg("b0"), 1_100, 3)?, Registered::Done(_)),
        "a re-registration is not refused"
    );
    assert_eq!(s.cluster()?.members.len(), 3);
    Ok(())
}

pub fn state_survives_reopening(open: Open<'_>) -> Result<(), Failure> {
    {
        let s = open()?;
        let e = primary(s.as_ref())?;
        s.register(e, &reg("b1"), 1, 10)?;
    }
    let s = open()?;
    assert_eq!(s.version()?, 1);
    assert_eq!(s.cluster()?.members.len(), 1);
    assert_eq!(
        s.acquire_lease("ha1", "a1", LONG)?.epoch,
        1,
        "the lease too"
    );
    Ok(())
}

/// The time of the retained checks' writes: `BASE + at` for an entry written "at" `at`.
const BASE: i64 = 10_000_000;

fn retained(topic: &str, payload: &[u8], at: i64) -> RetainedEntry {
    RetainedEntry {
        topic: topic.into(),
        payload: payload.to_vec(),
        qos: 1,
        at_ms: BASE + at,
        props: RetainedProps::default(),
    }
}

/// The topics and payloads the store lists, every page.
fn listed(s: &dyn Store) -> Result<Vec<(String, Vec<u8>)>, Failure> {
    Ok(s.retained("", 1_000)?
        .into_iter()
        .map(|e| (e.topic, e.payload))
        .collect())
}

/// Issue 18: retained messages are set, replaced and cleared (MQTT-3.3.1-6/7) by the last
/// write of each topic, whatever order batches arrive in; a clearing is remembered, so an
/// older set does not bring the message back; properties and binary payloads come back as
/// written, in topic order (bytes), page by page; writes are fenced; all of it survives a
/// reopening, and writing retained messages leaves the membership version alone.
pub fn retained_messages(open: Open<'_>) -> Result<(), Failure> {
    let now = BASE;
    {
        let s = open()?;
        fenced(
            s.write_retained(0, &[retained("a", b"x", 1)], now),
            "before anyone held the lease",
        )?;
        let e = primary(s.as_ref())?;
        let mut v5 = retained("b/\u{e9}", &[0, 255, 1], 10);
        v5.qos = 2;
        v5.props = RetainedProps {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(3_600),
            response_topic: Some("r".into()),
            correlation_data: Some(vec![9, 0]),
            user_properties: vec![("k".into(), "1".into()), ("k".into(), "2".into())],
            content_type: Some("text/plain".into()),
        };
        let batch = [
            retained("a", b"one", 10),
            v5.clone(),
            retained("c", b"gone soon", 10),
            retained("a", b"two", 11),
        ];
        assert_eq!(s.write_retained(e, &batch, now)?, 4);
        assert_eq!(
            s.version()?,
            0,
            "retained writes are not membership changes"
        );
        // An older write of "a" (another broker's batch, late) loses; a clearing of "c" wins,
        // and an older set of "c" after it does not bring it back; a newer one does set "d".
        let late = [
            retained("a", b"stale", 5),
            retained("c", b"", 20),
            retained("c", b"older", 15),
            retained("d", b"new", 30),
        ];
        assert_eq!(s.write_retained(e, &late, now)?, 2, "the clearing and d");
        assert_eq!(
            listed(s.as_ref())?,
            [
                ("a".to_string(), b"two".to_vec()),
                ("b/\u{e9}".to_string(), vec![0, 255, 1]),
                ("d".to_string(), b"new".to_vec()),
            ]
        );
        let got = s.retained("a", 1)?;
        assert_eq!(
            got,
            [v5],
            "a page after a topic, limited, properties as written"
        );
        assert_eq!(s.retained("d", 10)?, [], "nothing after the last");
        // A clearing older than the tombstones are kept is forgotten at the next write.
        assert_eq!(
            s.write_retained(e, &[retained("z", b"", 1)], now)?,
            1,
            "a clearing of an unknown topic"
        );
        s.write_retained(e, &[], now + crate::store::TOMBSTONE_KEEP_MS + 100)?;
        assert_eq!(
            s.write_retained(e, &[retained("z", b"back", 2)], now)?,
            1,
            "its tombstone is gone: a set after it applies"
        );
        // A replaced primary's write is refused and changes nothing.
        let e2 = run_out(s.as_ref(), ("ha1", "a1"), ("ha2", "a2"))?;
        fenced(
            s.write_retained(e, &[retained("a", b"fenced", 99)], now),
            "a stale epoch",
        )?;
        assert_eq!(s.write_retained(e2, &[retained("y", b"y", 1)], now)?, 1);
    }
    let s = open()?;
    let topics: Vec<String> = listed(s.as_ref())?.into_iter().map(|(t, _)| t).collect();
    assert_eq!(topics, ["a", "b/\u{e9}", "d", "y", "z"], "after reopening");
    assert_eq!(listed(s.as_ref())?[0].1, b"two", "not the fenced write");
    Ok(())
}

fn session(client_id: &str, filters: &[&str], at: i64) -> SessionEntry {
    SessionEntry {
        client_id: client_id.into(),
        session: Some(StoredSession {
            expiry: u32::MAX,
            subscriptions: filters
                .iter()
                .map(|f| StoredSubscription {
                    filter: (*f).into(),
                    qos: 1,
                    nolocal: false,
                    preserve_retain: true,
                })
                .collect(),
        }),
        at_ms: BASE + at,
        connected: false,
    }
}

fn ended(client_id: &str, at: i64) -> SessionEntry {
    SessionEntry {
        session: None,
        ..session(client_id, &[], at)
    }
}

/// Issue 18: persistent sessions follow the same rules as retained messages: the latest
/// write of a client ID wins (a session moving between nodes: the old node's end and the new
/// node's session may land in any order), an end is remembered, writes are fenced, all of it
/// survives a reopening.
pub fn persistent_sessions(open: Open<'_>) -> Result<(), Failure> {
    let now = BASE;
    {
        let s = open()?;
        fenced(
            s.write_sessions(0, &[session("c", &["a"], 1)], now),
            "before anyone held the lease",
        )?;
        let e = primary(s.as_ref())?;
        let batch = [
            session("c1", &["a/#"], 10),
            session("c2", &["b", "c/+"], 10),
            session("c1", &["a/#", "d"], 11),
        ];
        assert_eq!(s.write_sessions(e, &batch, now)?, 3);
        // c2 moved: the new node's session (20) lands before the old node's end (15).
        let moved = [session("c2", &["b"], 20), ended("c2", 15), ended("c3", 5)];
        assert_eq!(
            s.write_sessions(e, &moved, now)?,
            2,
            "c2 at 20 and c3's end"
        );
        assert_eq!(
            s.write_sessions(e, &[session("c3", &["x"], 4)], now)?,
            0,
            "older than c3's end"
        );
        let all = s.sessions("", 100)?;
        assert_eq!(all, [batch[2].clone(), moved[0].clone()]);
        assert_eq!(s.sessions("c1", 100)?, [moved[0].clone()], "after c1");
        assert_eq!(s.version()?, 0, "sessions are not membership changes");
        let e2 = run_out(s.as_ref(), ("ha1", "a1"), ("ha2", "a2"))?;
        fenced(
            s.write_sessions(e, &[ended("c1", 99)], now),
            "a stale epoch",
        )?;
        assert_eq!(s.write_sessions(e2, &[ended("c2", 30)], now)?, 1);
    }
    let s = open()?;
    let ids: Vec<String> = s
        .sessions("", 100)?
        .into_iter()
        .map(|e| e.client_id)
        .collect();
    assert_eq!(
        ids,
        ["c1"],
        "after reopening: c2 ended, c1 not by the fenced write"
    );
    Ok(())
}

fn msg(origin: u64, seq: u64, pkid: u16) -> QueuedMessage {
    QueuedMessage {
        origin,
        seq,
        pkid,
        topic: format!("t/{seq}"),
        payload: vec![seq as u8, 0],
        qos: if seq.is_multiple_of(2) { 2 } else { 1 },
        retain: seq == 3,
        props: RetainedProps {
            user_properties: vec![("k".into(), "v".into())],
            ..RetainedProps::default()
        },
    }
}

fn queue(client_id: &str, at: i64, messages: Vec<QueuedMessage>) -> QueuedEntry {
    QueuedEntry {
        client_id: client_id.into(),
        at_ms: BASE + at,
        replace: false,
        messages,
        acked: Vec::new(),
        last_pkid: 0,
        pubrels: Vec::new(),
    }
}

/// `(origin, seq, pkid)` of what the store keeps of `client_id`'s queue.
fn kept(s: &dyn Store, client_id: &str) -> Result<Vec<(u64, u64, u16)>, Failure> {
    Ok(s.queued(client_id)?
        .map(|e| e.messages)
        .unwrap_or_default()
        .iter()
        .map(|m| (m.origin, m.seq, m.pkid))
        .collect())
}

/// Issue 18: sessions' queued messages. Several holders of one session write overlapping
/// copies: each message is kept once (the owner's packet id fills a replica's 0), in id
/// order, whole (QoS, RETAIN, properties, the largest u64 ids); acknowledged ones go; the
/// owner's `replace` drops what was written before it; the client connecting again or the
/// session ending drops it all; writes are fenced; it survives a reopening.
pub fn queued_messages(open: Open<'_>) -> Result<(), Failure> {
    let now = BASE;
    {
        let s = open()?;
        fenced(
            s.write_queued(0, &[queue("c", 1, vec![msg(1, 1, 0)])], now),
            "before anyone held the lease",
        )?;
        let e = primary(s.as_ref())?;
        assert_eq!(s.queued("c")?, None, "nothing kept");
        let big = u64::MAX - 1;
        let replica = queue("c", 10, vec![msg(big, 2, 0), msg(7, 1, 0), msg(7, 3, 0)]);
        let mut owner = queue("c", 11, vec![msg(7, 1, 4), msg(7, 3, 0), msg(7, 4, 0)]);
        owner.last_pkid = 4;
        owner.pubrels = vec![2];
        s.write_queued(e, &[replica, owner], now)?;
        assert_eq!(
            kept(s.as_ref(), "c")?,
            [(7, 1, 4), (7, 3, 0), (7, 4, 0), (big, 2, 0)],
            "once each, by id, the owner's packet id"
        );
        let got = s.queued("c")?.ok_or("c's queue")?;
        assert_eq!(got.messages[1], msg(7, 3, 0), "kept whole");
        assert_eq!((got.last_pkid, got.pubrels.as_slice()), (4, &[2u16][..]));
        assert_eq!(got.at_ms, BASE + 11);
        let mut later = queue("c", 12, Vec::new());
        later.acked = vec![(7, 1), (9, 9)];
        later.last_pkid = 2;
        later.pubrels = vec![5];
        assert_eq!(
            s.write_queued(e, &[later], now)?,
            1,
            "one of two acked was kept"
        );
        let got = s.queued("c")?.ok_or("c's queue")?;
        assert_eq!(got.messages.len(), 3);
        assert_eq!((got.last_pkid, got.pubrels.as_slice()), (4, &[2u16, 5][..]));
        // The owner's whole queue replaces what was written before it.
        let mut whole = queue("c", 20, vec![msg(7, 4, 1), msg(7, 5, 0)]);
        whole.replace = true;
        whole.last_pkid = 1;
        s.write_queued(e, &[whole], now)?;
        assert_eq!(kept(s.as_ref(), "c")?, [(7, 4, 1), (7, 5, 0)]);
        let got = s.queued("c")?.ok_or("c's queue")?;
        assert_eq!((got.last_pkid, got.pubrels.len()), (1, 0), "replaced too");
        s.write_queued(e, &[queue("d", 20, vec![msg(8, 1, 0)])], now)?;
        s.write_queued(e, &[queue("x", 20, vec![msg(8, 1, 0)])], now)?;
        // d's client connected at 30: its rows before are stale; x's end at 15 is older.
        let mut connected = session("d", &["a"], 30);
        connected.connected = true;
        s.write_sessions(e, &[connected, ended("x", 15)], now)?;
        assert!(kept(s.as_ref(), "d")?.is_empty(), "d connected after");
        assert_eq!(kept(s.as_ref(), "x")?, [(8, 1, 0)], "x ended before");
        assert_eq!(s.version()?, 0, "queues are not membership changes");
        let e2 = run_out(s.as_ref(), ("ha1", "a1"), ("ha2", "a2"))?;
        fenced(
            s.write_queued(e, &[queue("c", 40, vec![msg(9, 9, 0)])], now),
            "a stale epoch",
        )?;
        s.write_sessions(e2, &[ended("x", 40)], now)?;
    }
    let s = open()?;
    assert_eq!(
        kept(s.as_ref(), "c")?,
        [(7, 4, 1), (7, 5, 0)],
        "after reopening"
    );
    assert_eq!(s.queued("x")?, None, "x ended");
    Ok(())
}
