//! A persistent session outlives its broker (issue 12): every peer knows its subscriptions,
//! and one more node than its own (replication factor 2, as the harness's `Cluster` sets it) queues each QoS 1/2
//! message for it its client has not acknowledged, so when its node dies the client reconnects
//! on another node with Clean Start 0 and gets Session Present 1, its subscriptions live
//! without a SUBSCRIBE, and every message it had not acknowledged: in flight on the dead node,
//! and published while it was away.
//!
//! Three meshed nodes; raw clients (the conformance harness's) on the nodes directly, as the
//! LB would route them; the dead node is dropped without a goodbye (`Cluster::crash`).

#[path = "conformance/harness.rs"]
mod harness;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use harness::{
    connect4_session, connect5_session, filter5, publish5, Ended, QoS, Raw, DEADLINE, V4, V5,
};
use mqlb_tests::{metric, wait_until, Cluster};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

const DAY: u32 = 86_400;
const SENT: u32 = 40;
/// The subscriber acknowledges the first ACKED of them; the rest are in flight when its node
/// dies.
const ACKED: u32 = 15;
const WHILE_AWAY: u32 = 10;

async fn open5(c: &Cluster, node: usize, connect: v5::Connect) -> anyhow::Result<(Raw<V5>, bool)> {
    let addr = c.mqtt_v5(node).context("no MQTT 5 listener")?;
    let mut raw = Raw::<V5>::open(addr).await?;
    raw.send(v5::Packet::Connect(connect, None, None)).await?;
    match raw.recv().await? {
        v5::Packet::ConnAck(ack) if ack.code == v5::ConnectReturnCode::Success => {
            Ok((raw, ack.session_present))
        }
        other => bail!("expected CONNACK 0, got {other:?}"),
    }
}

async fn open4(c: &Cluster, node: usize, connect: v4::Connect) -> anyhow::Result<(Raw<V4>, bool)> {
    let mut raw = Raw::<V4>::open(c.mqtt(node)).await?;
    raw.send(v4::Packet::Connect(connect)).await?;
    match raw.recv().await? {
        v4::Packet::ConnAck(ack) if ack.code == v4::ConnectReturnCode::Success => {
            Ok((raw, ack.session_present))
        }
        other => bail!("expected CONNACK 0, got {other:?}"),
    }
}

/// Publishes `from..=to` at QoS 1 on `topic` from node `node`, each acknowledged.
async fn publish_range(
    c: &Cluster,
    node: usize,
    topic: &str,
    from: u32,
    to: u32,
) -> anyhow::Result<()> {
    let id = format!("{topic}-pub-{from}");
    let (mut p, _) = open5(c, node, connect5_session(&id.replace('/', "-"), true, None)).await?;
    for i in from..=to {
        let mut m = publish5(topic, QoS::AtLeastOnce, &i.to_string());
        m.pkid = u16::try_from(i).unwrap_or(1).max(1);
        p.publish(m).await?;
    }
    Ok(())
}

/// Receives the [`SENT`] messages and acknowledges the first [`ACKED`] of them.
async fn receive_acking_the_first(sub: &mut Raw<V5>) -> anyhow::Result<()> {
    for _ in 0..SENT {
        let p = sub.recv_publish().await?;
        let n: u32 = std::str::from_utf8(&p.payload)?.parse()?;
        if n <= ACKED {
            sub.send(v5::Packet::PubAck(v5::PubAck::new(p.pkid, None)))
                .await?;
        }
    }
    Ok(())
}

/// A subscriber's next packet within 1.5 s: `Some(Some(n))` a PUBLISH of number `n`
/// (acknowledged), `Some(None)` another packet, `None` nothing came.
trait Numbers {
    async fn next_number(&mut self) -> anyhow::Result<Option<Option<u32>>>;
}

impl Numbers for Raw<V5> {
    async fn next_number(&mut self) -> anyhow::Result<Option<Option<u32>>> {
        match self.next(Duration::from_millis(1500)).await? {
            Ok(v5::Packet::Publish(p)) => {
                if p.pkid != 0 {
                    self.send(v5::Packet::PubAck(v5::PubAck::new(p.pkid, None)))
                        .await?;
                }
                Ok(Some(Some(std::str::from_utf8(&p.payload)?.parse()?)))
            }
            Ok(_) => Ok(Some(None)),
            Err(Ended::Closed) => bail!("the subscriber was closed"),
            Err(Ended::Silent) => Ok(None),
        }
    }
}

impl Numbers for Raw<V4> {
    async fn next_number(&mut self) -> anyhow::Result<Option<Option<u32>>> {
        match self.next(Duration::from_millis(1500)).await? {
            Ok(v4::Packet::Publish(p)) => {
                if p.pkid != 0 {
                    self.send(v4::Packet::PubAck(v4::PubAck::new(p.pkid)))
                        .await?;
                }
                Ok(Some(Some(std::str::from_utf8(&p.payload)?.parse()?)))
            }
            Ok(_) => Ok(Some(None)),
            Err(Ended::Closed) => bail!("the subscriber was closed"),
            Err(Ended::Silent) => Ok(None),
        }
    }
}

/// The numbers a subscriber gets until it has all of `want` or has been silent for a while.
async fn drain(raw: &mut impl Numbers, want: &BTreeSet<u32>) -> anyhow::Result<Vec<u32>> {
    let mut got = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed() < DEADLINE && !want.iter().all(|n| got.contains(n)) {
        match raw.next_number().await? {
            Some(Some(n)) => got.push(n),
            Some(None) => {}
            None => break,
        }
    }
    Ok(got)
}

/// The peers `nodes` of one session's node heard of `acked` acknowledgements (every peer
/// does), and one of them (replication factor 2) queues the session's `n` messages.
async fn replicas_hold(c: &Cluster, nodes: &[usize], acked: u32, n: u32) -> anyhow::Result<()> {
    wait_until("replicas caught up", DEADLINE, || async {
        let texts: Vec<String> = nodes
            .iter()
            .filter_map(|i| Some(c.node(*i)?.metrics_text()))
            .collect();
        let sum = |name| texts.iter().map(|t| metric(t, name, &[])).sum::<f64>();
        texts.len() == nodes.len()
            && texts.iter().all(|t| {
                // the gauges refreshed since the meta came, so `queueing` is this session's
                metric(t, "mqlb_session_replicas", &[]) >= 1.0
                    && metric(t, "mqlb_session_replica_acks_total", &[]) >= f64::from(acked)
            })
            && sum("mqlb_session_replica_messages") == f64::from(n)
            && sum("mqlb_session_replicas_queueing") == 1.0
    })
    .await
    .map(|_| ())
}

fn queueing(c: &Cluster, i: usize) -> f64 {
    c.node(i).map_or(-1.0, |n| {
        metric(&n.metrics_text(), "mqlb_session_replicas_queueing", &[])
    })
}

/// Replication factor 2: of the two peers of the session's node, one queues its messages
/// (the other knows its subscriptions); that one dies, and the other queues from then on, so
/// when the session's node dies too the client gets what was published since. Before the
/// factor, every peer queued every message (the first wait fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_copies_a_holders_death_hands_its_sessions_to_the_next_node() -> anyhow::Result<()>
{
    let mut c = Cluster::start(3).await?;
    c.wait_meshed().await?;
    let (mut sub, _) = open5(&c, 0, connect5_session("rf", false, Some(DAY))).await?;
    sub.subscribe(1, vec![filter5("rf/t", QoS::AtLeastOnce)], None)
        .await?;
    drop(sub);
    publish_range(&c, 1, "rf/t", 1, 10).await?;
    replicas_hold(&c, &[1, 2], 0, 10).await?;
    let (holder, other) = if queueing(&c, 1) == 1.0 {
        (1, 2)
    } else {
        (2, 1)
    };
    ensure!(queueing(&c, other) == 0.0, "both peers queue");
    c.crash(holder);
    wait_until("the next node queues", DEADLINE, || async {
        queueing(&c, other) == 1.0
    })
    .await?;
    publish_range(&c, other, "rf/t", 11, 20).await?;
    wait_until("the next node holds what came since", DEADLINE, || async {
        c.node(other).is_some_and(|n| {
            metric(&n.metrics_text(), "mqlb_session_replica_messages", &[]) >= 10.0
        })
    })
    .await?;
    c.crash(0);
    let (mut back, present) = open5(&c, other, connect5_session("rf", false, Some(DAY))).await?;
    ensure!(present, "Session Present 0 after both deaths");
    let want: BTreeSet<u32> = (11..=20).collect();
    let got = drain(&mut back, &want).await?;
    check(&got, &want)
}

fn check(got: &[u32], want: &BTreeSet<u32>) -> anyhow::Result<()> {
    let lost: Vec<u32> = want.iter().filter(|n| !got.contains(n)).copied().collect();
    ensure!(lost.is_empty(), "lost {lost:?} (got {got:?})");
    Ok(())
}

/// MQTT 5, Session Expiry Interval a day, on node 0; node 0 dies with 25 messages in flight;
/// 10 more are published while the client is away; it reconnects on node 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_session_survives_its_node_with_every_unacknowledged_message() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    c.wait_meshed().await?;
    let (mut sub, present) = open5(&c, 0, connect5_session("fo5", false, Some(DAY))).await?;
    ensure!(!present);
    sub.subscribe(1, vec![filter5("fo5/t", QoS::AtLeastOnce)], None)
        .await?;
    publish_range(&c, 1, "fo5/t", 1, SENT).await?;
    receive_acking_the_first(&mut sub).await?;
    replicas_hold(&c, &[1, 2], ACKED, SENT - ACKED).await?;
    c.crash(0);
    publish_range(&c, 1, "fo5/t", SENT + 1, SENT + WHILE_AWAY).await?;
    let (mut back, present) = open5(&c, 2, connect5_session("fo5", false, Some(DAY))).await?;
    ensure!(present, "Session Present 0 after the node's death");
    let want: BTreeSet<u32> = (ACKED + 1..=SENT + WHILE_AWAY).collect();
    let got = drain(&mut back, &want).await?;
    check(&got, &want)?;
    let text = c.node(2).context("node 2")?.metrics_text();
    let restored = metric(&text, "mqlb_session_replica_messages_restored_total", &[]);
    ensure!(
        restored >= want.len() as f64,
        "{restored} restored messages counted"
    );
    // the subscription is live without a SUBSCRIBE
    publish_range(&c, 1, "fo5/t", 100, 100).await?;
    let later = drain(&mut back, &BTreeSet::from([100])).await?;
    check(&later, &BTreeSet::from([100]))
}

/// A v5 session whose Client Identifier the broker assigned (an empty one in the CONNECT,
/// Clean Start 0: MQTT-3.1.3-6) outlives its node like any other: its replicas are kept under
/// the assigned ID, the one the client reconnects with. Two such clients on the same node, so
/// that a shared key (the empty CONNECT ID, as the replicas were keyed before) mixes them up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_with_an_assigned_client_id_survives_its_node() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    c.wait_meshed().await?;
    let mut assigned = Vec::new();
    for k in 0..2 {
        let addr = c.mqtt_v5(0).context("no MQTT 5 listener")?;
        let mut raw = Raw::<V5>::open(addr).await?;
        raw.send(v5::Packet::Connect(
            connect5_session("", false, Some(DAY)),
            None,
            None,
        ))
        .await?;
        let id = match raw.recv().await? {
            v5::Packet::ConnAck(ack) if ack.code == v5::ConnectReturnCode::Success => ack
                .properties
                .and_then(|p| p.assigned_client_identifier)
                .context("no Assigned Client Identifier")?,
            other => bail!("expected CONNACK 0, got {other:?}"),
        };
        raw.subscribe(
            1,
            vec![filter5(&format!("anon{k}/t"), QoS::AtLeastOnce)],
            None,
        )
        .await?;
        assigned.push((id, raw));
    }
    wait_until("the peers know both sessions", DEADLINE, || async {
        [1, 2].iter().all(|i| {
            c.node(*i)
                .is_some_and(|n| metric(&n.metrics_text(), "mqlb_session_replicas", &[]) >= 2.0)
        })
    })
    .await?;
    let ids: Vec<String> = assigned.into_iter().map(|(id, _)| id).collect();
    publish_range(&c, 1, "anon0/t", 1, 3).await?;
    publish_range(&c, 1, "anon1/t", 11, 13).await?;
    wait_until("the replicas queue the six messages", DEADLINE, || async {
        let sum: f64 = [1, 2]
            .iter()
            .filter_map(|i| {
                Some(metric(
                    &c.node(*i)?.metrics_text(),
                    "mqlb_session_replica_messages",
                    &[],
                ))
            })
            .sum();
        sum >= 6.0
    })
    .await?;
    c.crash(0);
    for (k, id) in ids.iter().enumerate() {
        let (mut back, present) = open5(&c, 2, connect5_session(id, false, Some(DAY))).await?;
        ensure!(present, "{id}: Session Present 0 after the node's death");
        let base = 10 * k as u32;
        let want: BTreeSet<u32> = (base + 1..=base + 3).collect();
        let got = drain(&mut back, &want).await?;
        check(&got, &want)?;
    }
    Ok(())
}

/// MQTT 3.1.1, Clean Session 0, on node 1; node 1 dies; the client reconnects on node 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v311_session_survives_its_node_with_every_unacknowledged_message() -> anyhow::Result<()>
{
    let mut c = Cluster::start(3).await?;
    c.wait_meshed().await?;
    let (mut sub, _) = open4(&c, 1, connect4_session("fo4", false)).await?;
    sub.subscribe(1, "fo4/t", rumqttc::QoS::AtLeastOnce).await?;
    publish_range(&c, 2, "fo4/t", 1, SENT).await?;
    for _ in 0..SENT {
        let p = sub.recv_publish().await?;
        let n: u32 = std::str::from_utf8(&p.payload)?.parse()?;
        if n <= ACKED {
            sub.send(v4::Packet::PubAck(v4::PubAck::new(p.pkid)))
                .await?;
        }
    }
    replicas_hold(&c, &[0, 2], ACKED, SENT - ACKED).await?;
    c.crash(1);
    publish_range(&c, 2, "fo4/t", SENT + 1, SENT + WHILE_AWAY).await?;
    let (mut back, present) = open4(&c, 0, connect4_session("fo4", false)).await?;
    ensure!(present, "Session Present 0 after the node's death");
    let want: BTreeSet<u32> = (ACKED + 1..=SENT + WHILE_AWAY).collect();
    let got = drain(&mut back, &want).await?;
    check(&got, &want)
}

/// Two of three nodes die at once, the session's own and one holder, with replication factor
/// 3 (the default): the last node restores the session with every message its client had not
/// acknowledged and those published while it was away (the README's "two of three brokers at
/// once" row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_survives_two_of_three_nodes_dying_at_once() -> anyhow::Result<()> {
    let mut c = Cluster::start_replicated(3, 3).await?;
    let (mut sub, _) = open5(&c, 0, connect5_session("fo-two", false, Some(DAY))).await?;
    sub.subscribe(1, vec![filter5("fo-two/t", QoS::AtLeastOnce)], None)
        .await?;
    publish_range(&c, 1, "fo-two/t", 1, SENT).await?;
    receive_acking_the_first(&mut sub).await?;
    // Both peers queue the session's messages (factor 3) and forgot the acknowledged ones.
    wait_until("both replicas caught up", DEADLINE, || async {
        [1, 2].iter().all(|i| {
            c.node(*i).is_some_and(|n| {
                let t = n.metrics_text();
                metric(&t, "mqlb_session_replicas_queueing", &[]) == 1.0
                    && metric(&t, "mqlb_session_replica_messages", &[]) == f64::from(SENT - ACKED)
            })
        })
    })
    .await?;
    c.crash(0);
    c.crash(1);
    publish_range(&c, 2, "fo-two/t", SENT + 1, SENT + WHILE_AWAY).await?;
    let (mut back, present) = open5(&c, 2, connect5_session("fo-two", false, Some(DAY))).await?;
    ensure!(present, "Session Present 0 after two nodes died");
    let want: BTreeSet<u32> = (ACKED + 1..=SENT + WHILE_AWAY).collect();
    let got = drain(&mut back, &want).await?;
    check(&got, &want)
}

/// The replicas forget what the client acknowledged, and a Clean Start ends them: a client
/// that starts clean on another node after the death gets nothing of the old session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_and_ended_sessions_are_not_restored() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    c.wait_meshed().await?;
    let (mut sub, _) = open5(&c, 0, connect5_session("fo-ack", false, Some(DAY))).await?;
    sub.subscribe(1, vec![filter5("fo-ack/t", QoS::AtLeastOnce)], None)
        .await?;
    publish_range(&c, 1, "fo-ack/t", 1, 10).await?;
    for _ in 0..10 {
        let p = sub.recv_publish().await?;
        sub.send(v5::Packet::PubAck(v5::PubAck::new(p.pkid, None)))
            .await?;
    }
    replicas_hold(&c, &[1, 2], 10, 0).await?;
    // one node restores it, with nothing to deliver again
    c.crash(0);
    let (mut back, present) = open5(&c, 1, connect5_session("fo-ack", false, Some(DAY))).await?;
    ensure!(present, "Session Present 0 after the node's death");
    back.expect_none().await?;
    // a clean start ends the session everywhere: no replica is restored later
    drop(back);
    let (_clean, present) = open5(&c, 2, connect5_session("fo-ack", true, None)).await?;
    ensure!(!present);
    wait_until("the replicas are gone", DEADLINE, || async {
        [1, 2].iter().all(|i| {
            c.node(*i)
                .is_some_and(|n| metric(&n.metrics_text(), "mqlb_session_replicas", &[]) == 0.0)
        })
    })
    .await?;
    Ok(())
}

/// The will of a client whose node died is published once by the cluster (MQTT-3.1.3-9 for a
/// node's death): a 5.0 client and a 3.1.1 client with wills on node 0, subscribers on nodes 1
/// and 2; node 0 dies: each subscriber gets each will once. A third client, with a Will Delay
/// Interval of 4 s, connects again on node 1 in time: its will is not published. A fourth, with
/// a Will Delay Interval of 8 s, does not come back: its will comes once, not before the delay
/// (the others come about 5 s after the death). Before, no will of a dead node's clients was
/// ever published.
///
/// The nodes run on simulated hosts and node 0 is cut off from them before it is dropped, so
/// it dies at once as a killed process does: a node dropped in-process goes down task by task,
/// and its router (a thread that outlives the drop) saw its clients go and published their
/// wills through mesh links that were not all gone yet, reaching one peer and not the other
/// (the flake this test had, 1 run in 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wills_of_a_dead_nodes_clients_are_published_once() -> anyhow::Result<()> {
    let hosts = mqlb_tests::Hosts::new(3)?;
    let ips: Vec<std::net::IpAddr> = hosts.iter().map(|h| h.ip.into()).collect();
    let mut c = Cluster::start_on(&ips).await?;
    c.wait_meshed().await?;
    let mut subs = Vec::new();
    for (i, node) in [1, 2].into_iter().enumerate() {
        let (mut s, _) = open5(
            &c,
            node,
            connect5_session(&format!("fw-sub{i}"), true, None),
        )
        .await?;
        s.subscribe(1, vec![filter5("fw/#", QoS::AtLeastOnce)], None)
            .await?;
        subs.push(s);
    }
    let will5 = v5::LastWill::new("fw/w5", "gone5", QoS::AtLeastOnce, false, None);
    let addr = c.mqtt_v5(0).context("no MQTT 5 listener")?;
    let mut w5 = Raw::<V5>::open(addr).await?;
    w5.send(v5::Packet::Connect(
        connect5_session("fw5", true, None),
        Some(will5),
        None,
    ))
    .await?;
    ensure!(matches!(w5.recv().await?, v5::Packet::ConnAck(_)));
    let mut connect4 = connect4_session("fw4", true);
    connect4.last_will = Some(v4::LastWill::new(
        "fw/w4",
        "gone4",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (_w4, _) = open4(&c, 0, connect4).await?;
    let delayed = v5::LastWill::new(
        "fw/back",
        "wrong",
        QoS::AtLeastOnce,
        false,
        Some(v5::LastWillProperties {
            delay_interval: Some(4),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    );
    let mut back = Raw::<V5>::open(addr).await?;
    back.send(v5::Packet::Connect(
        connect5_session("fw-back", true, Some(60)),
        Some(delayed.clone()),
        None,
    ))
    .await?;
    ensure!(matches!(back.recv().await?, v5::Packet::ConnAck(_)));
    const LATE: Duration = Duration::from_secs(8);
    let mut late_will = delayed;
    late_will.topic = bytes::Bytes::from_static(b"fw/late");
    late_will.message = bytes::Bytes::from_static(b"late");
    if let Some(p) = late_will.properties.as_mut() {
        p.delay_interval = Some(8);
    }
    let mut late = Raw::<V5>::open(addr).await?;
    late.send(v5::Packet::Connect(
        connect5_session("fw-late", true, Some(60)),
        Some(late_will),
        None,
    ))
    .await?;
    ensure!(matches!(late.recv().await?, v5::Packet::ConnAck(_)));
    // the replicas know the wills (the owner's REPLICA_META reached both peers)
    wait_until("the wills are replicated", DEADLINE, || async {
        [1, 2].iter().all(|i| {
            c.node(*i)
                .is_some_and(|n| metric(&n.metrics_text(), "mqlb_session_replicas", &[]) == 4.0)
        })
    })
    .await?;
    hosts.isolate(hosts.host(0))?;
    c.crash(0);
    let died = std::time::Instant::now();
    let (_again, _) = open5(&c, 1, connect5_session("fw-back", false, Some(60))).await?;
    // The peers notice the cut (TCP_USER_TIMEOUT, about 3 s), then the will grace (2 s) runs.
    wait_until(
        "node 1 publishes the two wills",
        Duration::from_secs(30),
        || async {
            c.node(1).is_some_and(|n| {
                metric(&n.metrics_text(), "mqlb_session_replica_wills_total", &[]) >= 2.0
            })
        },
    )
    .await?;
    for (i, s) in subs.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < 2 {
            let p = s
                .recv_publish()
                .await
                .with_context(|| format!("subscriber {i}: {got:?}"))?;
            if p.pkid != 0 {
                s.send(v5::Packet::PubAck(v5::PubAck::new(p.pkid, None)))
                    .await?;
            }
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
        got.sort();
        ensure!(got == ["gone4", "gone5"], "subscriber {i}: {got:?}");
    }
    for (i, s) in subs.iter_mut().enumerate() {
        let p = s
            .recv_publish()
            .await
            .with_context(|| format!("subscriber {i}: the delayed will"))?;
        ensure!(&p.payload[..] == b"late", "subscriber {i}: {p:?}");
        ensure!(
            died.elapsed() >= LATE,
            "subscriber {i}: the 8 s delayed will came {:?} after the death",
            died.elapsed()
        );
        if p.pkid != 0 {
            s.send(v5::Packet::PubAck(v5::PubAck::new(p.pkid, None)))
                .await?;
        }
    }
    // nothing more: not a second time, not the will of the client that came back
    for s in &mut subs {
        match s.next(Duration::from_secs(5)).await? {
            Err(Ended::Silent) => {}
            other => bail!("expected nothing more, got {other:?}"),
        }
    }
    Ok(())
}

/// A broker cut off from its peers (nftables between simulated hosts, `Hosts`), its client
/// moving to another broker as the LB would send it, then the cut healed: the client's session
/// moves with it (Session Present 1, every message published meanwhile), the old connection
/// is closed once the brokers see each other again (one live session per client ID), and
/// what was published on the far side during the cut reaches the cut-off broker afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_broker_keeps_one_live_session_and_loses_nothing() -> anyhow::Result<()> {
    let hosts = mqlb_tests::Hosts::new(3)?;
    let ips: Vec<std::net::IpAddr> = hosts.iter().map(|h| h.ip.into()).collect();
    let c = Cluster::start_on(&ips).await?;
    let (mut old, _) = open5(&c, 0, connect5_session("pt", false, Some(DAY))).await?;
    old.subscribe(1, vec![filter5("pt/t", QoS::AtLeastOnce)], None)
        .await?;
    let (mut far, _) = open5(&c, 2, connect5_session("pt-far", false, Some(DAY))).await?;
    far.subscribe(1, vec![filter5("pt/t", QoS::AtLeastOnce)], None)
        .await?;
    publish_range(&c, 1, "pt/t", 1, 5).await?;
    let first: BTreeSet<u32> = (1..=5).collect();
    check(&drain(&mut old, &first).await?, &first)?;
    check(&drain(&mut far, &first).await?, &first)?;
    replicas_hold(&c, &[1, 2], 5, 0).await?;

    hosts.isolate(hosts.host(0))?;
    wait_until("the peers see node 0 cut off", DEADLINE, || async {
        [1, 2].iter().all(|i| {
            c.node(*i).is_some_and(|n| {
                n.links()
                    .iter()
                    .any(|(peer, up)| peer.as_str() == "n1" && !up)
            })
        })
    })
    .await?;
    publish_range(&c, 1, "pt/t", 6, 15).await?;
    // the client comes back on node 1 (its broker is unreachable for the LB too): node 0
    // cannot be asked, so the replicas are restored
    let (mut moved, present) = open5(&c, 1, connect5_session("pt", false, Some(DAY))).await?;
    ensure!(present, "Session Present 0 across the partition");
    let meanwhile: BTreeSet<u32> = (6..=15).collect();
    check(&drain(&mut moved, &meanwhile).await?, &meanwhile)?;

    hosts.heal_all()?;
    c.wait_meshed().await?;
    // the newer connection stays: node 0 closes the old one (0x8E, or just the socket)
    let start = std::time::Instant::now();
    loop {
        ensure!(
            start.elapsed() < DEADLINE,
            "node 0 kept the old connection live"
        );
        match old.next(Duration::from_millis(500)).await? {
            Ok(v5::Packet::Disconnect(d)) => {
                ensure!(
                    d.reason_code == v5::DisconnectReasonCode::SessionTakenOver,
                    "{d:?}"
                );
                break;
            }
            Err(Ended::Closed) => break,
            Ok(v5::Packet::Publish(p)) if p.pkid != 0 => {
                old.send(v5::Packet::PubAck(v5::PubAck::new(p.pkid, None)))
                    .await?;
            }
            Ok(_) | Err(Ended::Silent) => {}
        }
    }
    // one live session: what comes now reaches the moved one, and the far side got all
    publish_range(&c, 2, "pt/t", 16, 20).await?;
    let last: BTreeSet<u32> = (16..=20).collect();
    check(&drain(&mut moved, &last).await?, &last)?;
    let all: BTreeSet<u32> = (6..=20).collect();
    check(&drain(&mut far, &all).await?, &all)
}

/// Bad input from an authenticated peer (issue 12): a replica meta for an invalid client ID, a
/// session answer to a request never sent, and a session replica cut short each close that
/// peer's link and are counted (`mqlb_mesh_rejected_total{reason}`), and none of them makes a
/// replica or a session: the client ID they named connects afterwards with no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_bad_session_frames_close_its_link_and_make_no_session() -> anyhow::Result<()> {
    use mqlb_broker::mesh::frame::{self, Frame, MeshSession, MeshSubscription, ReplicaMeta};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(1).await?;
    let node = cluster.node(0).context("node 0 is not running")?;
    let rejected = |reason: &str| {
        metric(
            &node.metrics_text(),
            "mqlb_mesh_rejected_total",
            &[("reason", reason)],
        )
    };
    let subscription = MeshSubscription {
        filter: "victim/#".into(),
        qos: 1,
        nolocal: false,
        preserve_retain: false,
    };
    let session = MeshSession {
        client_id: "victim".into(),
        expiry: DAY,
        subscriptions: vec![subscription.clone()],
        ..MeshSession::default()
    };
    let meta = Frame::ReplicaMeta(Box::new(ReplicaMeta {
        client_id: "victim/#".into(), // not a client ID the brokers accept
        expiry: DAY,
        online: false,
        fresh: true,
        subscriptions: vec![subscription],
        will: None,
    }));
    let unasked = Frame::Session {
        request: 4242,
        session: Some(Box::new(session.clone())),
    };
    let mut cut = frame::encode(&Frame::SessionReplica {
        request: 4243,
        session: Box::new(session),
    })?
    .to_vec();
    // The frame's length prefix stays; its body loses its last bytes and the rest is zeros.
    let len = cut.len();
    cut[len - 8..].fill(0xff);
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("replica meta", frame::encode(&meta)?.to_vec(), "malformed"),
        (
            "unasked session",
            frame::encode(&unasked)?.to_vec(),
            "protocol",
        ),
        ("broken session replica", cut, "malformed"),
    ];
    for (i, (what, bytes, reason)) in cases.into_iter().enumerate() {
        let before = rejected(reason);
        let mut peer = cluster.raw_peer(0, &format!("n{}", 7 + i)).await?;
        peer.write_all(&bytes).await?;
        wait_until(
            &format!("the {what} counted as {reason}"),
            DEADLINE,
            || async { rejected(reason) > before },
        )
        .await?;
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(DEADLINE, peer.read_to_end(&mut sink)).await;
        ensure!(closed.is_ok(), "the link stayed open after the {what}");
    }
    ensure!(
        metric(&node.metrics_text(), "mqlb_session_replicas", &[]) == 0.0,
        "a replica was made"
    );
    let mut victim = Raw::<V4>::open(cluster.mqtt(0)).await?;
    victim
        .send(v4::Packet::Connect(connect4_session("victim", false)))
        .await?;
    match victim.recv().await? {
        v4::Packet::ConnAck(ack) => ensure!(!ack.session_present, "an injected session: {ack:?}"),
        other => bail!("expected a CONNACK, got {other:?}"),
    }
    Ok(())
}

/// A QoS 2 session restored on another node resumes with its packet ids (MQTT-4.4.0-1): the
/// delivery its client answered with PUBREC gets its PUBREL again, and the one it had not
/// answered comes again with DUP 1 and its packet id. Before, the replicas knew no packet id:
/// no PUBREL came, and the unanswered delivery came as a new one under the new node's first
/// id, which a client still holding that id (for the PUBREC'd delivery) takes for a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_qos2_session_resumes_with_its_packet_ids() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    c.wait_meshed().await?;
    let (mut sub, _) = open5(&c, 0, connect5_session("fo-q2", false, Some(DAY))).await?;
    sub.subscribe(1, vec![filter5("fo-q2/t", QoS::ExactlyOnce)], None)
        .await?;
    let (mut publisher, _) = open5(&c, 1, connect5_session("fo-q2-pub", true, None)).await?;
    for (pkid, m) in [(1, "a"), (2, "b")] {
        let mut p = publish5("fo-q2/t", QoS::ExactlyOnce, m);
        p.pkid = pkid;
        publisher.publish(p).await?;
    }
    // "a": PUBREC sent, PUBREL received, PUBCOMP withheld; "b": not answered at all.
    let a = sub.recv_publish().await?;
    ensure!(&a.payload[..] == b"a" && a.qos == QoS::ExactlyOnce, "{a:?}");
    sub.send(v5::Packet::PubRec(v5::PubRec::new(a.pkid, None)))
        .await?;
    let mut b = None;
    for _ in 0..3 {
        match sub.recv().await? {
            v5::Packet::PubRel(r) => ensure!(r.pkid == a.pkid, "PUBREL {r:?}"),
            v5::Packet::Publish(p) => b = Some(p),
            other => bail!("unexpected {other:?}"),
        }
        if b.is_some() {
            break;
        }
    }
    let b = b.context("no second delivery")?;
    ensure!(&b.payload[..] == b"b" && b.pkid != a.pkid, "{b:?}");
    // Both replicas know both packet ids (the PUBREC'd one, the one in flight).
    wait_until("the replicas know the packet ids", DEADLINE, || async {
        [1, 2].iter().all(|i| {
            c.node(*i).is_some_and(|n| {
                metric(
                    &n.metrics_text(),
                    "mqlb_session_replica_packet_ids_total",
                    &[],
                ) >= 3.0
            })
        })
    })
    .await?;
    c.crash(0);
    let (mut back, present) = open5(&c, 2, connect5_session("fo-q2", false, Some(DAY))).await?;
    ensure!(present, "Session Present 0 after the node's death");
    let (mut pubrel, mut again) = (false, None);
    for _ in 0..4 {
        match back.next(Duration::from_secs(3)).await? {
            Ok(v5::Packet::PubRel(r)) if r.pkid == a.pkid => pubrel = true,
            Ok(v5::Packet::Publish(p)) => {
                ensure!(again.is_none(), "delivered twice: {again:?} and {p:?}");
                again = Some(p);
            }
            Ok(other) => bail!("unexpected {other:?}"),
            Err(_) => break,
        }
        if pubrel && again.is_some() {
            break;
        }
    }
    ensure!(pubrel, "no PUBREL {} after the restore", a.pkid);
    let again = again.context("\"b\" did not come again")?;
    ensure!(
        &again.payload[..] == b"b" && again.dup && again.pkid == b.pkid,
        "\"b\" again with DUP 1 and packet id {}: {again:?}",
        b.pkid
    );
    Ok(())
}
