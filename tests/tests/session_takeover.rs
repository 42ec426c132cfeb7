//! One live session per client ID across the cluster, and the session moves with its client
//! (issue 12): a client ID that connects on another node takes its session over there. The
//! old connection is closed (MQTT 5: DISCONNECT 0x8E Session taken over, MQTT-3.1.4-3; 3.1.1:
//! closed, MQTT-3.1.4-2), and with Clean Start 0 the new node gets the session itself: its
//! subscriptions, its queued messages and those sent but not acknowledged (again, with DUP 1
//! and their packet ids, MQTT-4.4.0-1), so CONNACK says Session Present 1 (MQTT-3.2.2-2).
//!
//! Two meshed nodes; raw clients (the conformance harness's) on each node directly.

#[path = "conformance/harness.rs"]
mod harness;

use std::time::Duration;

use anyhow::{bail, ensure, Context};
use harness::{
    connect4_session, connect5_session, filter5, publish4, publish5, Ended, QoS, Raw, DEADLINE, V4,
    V5,
};
use mqlb_tests::{metric, wait_until, Cluster};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

const DAY: u32 = 86_400;

async fn connect5_at(
    c: &Cluster,
    node: usize,
    connect: v5::Connect,
) -> anyhow::Result<(Raw<V5>, v5::ConnAck)> {
    let addr = c.mqtt_v5(node).context("no MQTT 5 listener")?;
    let mut raw = Raw::<V5>::open(addr).await?;
    raw.send(v5::Packet::Connect(connect, None, None)).await?;
    match raw.recv().await? {
        v5::Packet::ConnAck(ack) => Ok((raw, ack)),
        other => bail!("expected a CONNACK, got {other:?}"),
    }
}

async fn connect4_at(
    c: &Cluster,
    node: usize,
    connect: v4::Connect,
) -> anyhow::Result<(Raw<V4>, v4::ConnAck)> {
    let mut raw = Raw::<V4>::open(c.mqtt(node)).await?;
    raw.send(v4::Packet::Connect(connect)).await?;
    match raw.recv().await? {
        v4::Packet::ConnAck(ack) => Ok((raw, ack)),
        other => bail!("expected a CONNACK, got {other:?}"),
    }
}

/// Publishes `payload` at QoS 1 from node `node` until `sub` receives it (the mesh link may
/// still be coming up), acknowledging nothing; returns what `sub` got first.
async fn publish_until_received(
    c: &Cluster,
    node: usize,
    topic: &str,
    sub: &mut Raw<V5>,
) -> anyhow::Result<v5::Publish> {
    let (mut publisher, _) = connect5_at(c, node, connect5_session("st-pub", true, None)).await?;
    let start = std::time::Instant::now();
    for i in 1..=50u16 {
        let mut p = publish5(topic, QoS::AtLeastOnce, &format!("probe{i}"));
        p.pkid = i;
        publisher.publish(p).await?;
        match sub.next(Duration::from_millis(200)).await? {
            Ok(v5::Packet::Publish(p)) => return Ok(p),
            Ok(other) => bail!("expected a PUBLISH, got {other:?}"),
            Err(Ended::Closed) => bail!("the subscriber was closed"),
            Err(Ended::Silent) if start.elapsed() < DEADLINE => {}
            Err(Ended::Silent) => break,
        }
    }
    bail!("no publish from node {node} reached the subscriber")
}

/// MQTT-3.1.4-3 (5.0) across nodes: a client ID connected on node 1 that connects on node 2
/// closes the first connection with DISCONNECT 0x8E Session taken over; a message is then
/// delivered once, to the new connection. Before, both connections stayed live and both got
/// every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_on_another_node_takes_the_client_id_over_v5() -> anyhow::Result<()> {
    let c = Cluster::start(2).await?;
    let (mut old, ack) = connect5_at(&c, 0, connect5_session("to5", true, None)).await?;
    ensure!(!ack.session_present, "{ack:?}");
    old.subscribe(1, vec![filter5("to5/t", QoS::AtLeastOnce)], None)
        .await?;
    let (mut new, _) = connect5_at(&c, 1, connect5_session("to5", true, None)).await?;
    new.subscribe(1, vec![filter5("to5/t", QoS::AtLeastOnce)], None)
        .await?;
    match old.next(DEADLINE).await? {
        Ok(v5::Packet::Disconnect(d))
            if d.reason_code == v5::DisconnectReasonCode::SessionTakenOver => {}
        other => bail!("the old connection: expected DISCONNECT 0x8E, got {other:?}"),
    }
    old.expect_closed(|_| false).await?;
    // Published on the old node: only the new connection gets it, once.
    let got = publish_until_received(&c, 0, "to5/t", &mut new).await?;
    ensure!(got.qos == QoS::AtLeastOnce, "{got:?}");
    new.send(v5::Packet::PubAck(v5::PubAck::new(got.pkid, None)))
        .await?;
    new.expect_none().await?;
    Ok(())
}

/// MQTT-3.1.4-2 (3.1.1) across nodes: the first connection of a client ID is closed when it
/// connects on another node (3.1.1 has no DISCONNECT from the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_on_another_node_takes_the_client_id_over_v311() -> anyhow::Result<()> {
    let c = Cluster::start(2).await?;
    let (mut old, _) = connect4_at(&c, 0, connect4_session("to4", true)).await?;
    old.subscribe(1, "to4/t", rumqttc::QoS::AtLeastOnce).await?;
    let (_new, ack) = connect4_at(&c, 1, connect4_session("to4", true)).await?;
    ensure!(!ack.session_present, "{ack:?}");
    old.expect_closed(|_| false)
        .await
        .context("the old connection")?;
    Ok(())
}

/// A 5.0 session (Session Expiry Interval a day) on node 1 with a QoS 1 subscription: one
/// message delivered and not acknowledged, two queued while the client is away. The client
/// reconnects on node 2 with Clean Start 0: Session Present 1, the unacknowledged message again
/// (DUP 1, same packet id), the queued ones, and later publications without a new SUBSCRIBE.
/// Before, node 2 started a new session (Session Present 0) and all of it was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_to_the_node_its_client_connects_to_v5() -> anyhow::Result<()> {
    let c = Cluster::start(2).await?;
    let (mut sub, _) = connect5_at(&c, 0, connect5_session("mv5", false, Some(DAY))).await?;
    sub.subscribe(1, vec![filter5("mv5/t", QoS::AtLeastOnce)], None)
        .await?;
    let (mut publisher, _) = connect5_at(&c, 0, connect5_session("mv5-pub", true, None)).await?;
    publisher
        .publish(publish5("mv5/t", QoS::AtLeastOnce, "m0"))
        .await?;
    let unacked = sub.recv_publish().await?;
    ensure!(&unacked.payload[..] == b"m0", "{unacked:?}");
    sub.drop_connection().await?;
    for (i, m) in ["m1", "m2"].into_iter().enumerate() {
        let mut p = publish5("mv5/t", QoS::AtLeastOnce, m);
        p.pkid = 2 + i as u16;
        publisher.publish(p).await?;
    }

    let (mut sub, ack) = connect5_at(&c, 1, connect5_session("mv5", false, Some(DAY))).await?;
    ensure!(
        ack.session_present,
        "Clean Start 0 on another node: {ack:?}"
    );
    let again = sub.recv_publish().await?;
    ensure!(
        &again.payload[..] == b"m0" && again.dup && again.pkid == unacked.pkid,
        "the unacknowledged message again, DUP 1, packet id {}: {again:?}",
        unacked.pkid
    );
    let node = c.node(1).context("node 1 is not running")?;
    let redelivered = metric(
        &node.metrics_text(),
        "mqlb_broker_messages_redelivered_total",
        &[],
    );
    ensure!(redelivered == 1.0, "redeliveries counted: {redelivered}");
    sub.send(v5::Packet::PubAck(v5::PubAck::new(again.pkid, None)))
        .await?;
    for m in ["m1", "m2"] {
        let got = sub.recv_publish().await?;
        ensure!(
            got.payload == m.as_bytes() && got.qos == QoS::AtLeastOnce,
            "queued {m}: {got:?}"
        );
        sub.send(v5::Packet::PubAck(v5::PubAck::new(got.pkid, None)))
            .await?;
    }
    // The subscription lives on node 2 now: a message published on node 1 reaches it over the
    // mesh, once.
    let got = publish_until_received(&c, 0, "mv5/t", &mut sub).await?;
    sub.send(v5::Packet::PubAck(v5::PubAck::new(got.pkid, None)))
        .await?;
    sub.expect_none().await?;
    // The session left node 1: a connection there finds none.
    let (_back, ack) = connect5_at(&c, 0, connect5_session("mv5-other", false, Some(DAY))).await?;
    ensure!(!ack.session_present, "{ack:?}");
    Ok(())
}

/// The same for a 3.1.1 session (Clean Session 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_to_the_node_its_client_connects_to_v311() -> anyhow::Result<()> {
    let c = Cluster::start(2).await?;
    let (mut sub, _) = connect4_at(&c, 0, connect4_session("mv4", false)).await?;
    sub.subscribe(1, "mv4/t", rumqttc::QoS::AtLeastOnce).await?;
    sub.disconnect().await?;
    let (mut publisher, _) = connect4_at(&c, 0, connect4_session("mv4-pub", true)).await?;
    for (i, m) in ["q1", "q2", "q3"].into_iter().enumerate() {
        let mut p = publish4("mv4/t", rumqttc::QoS::AtLeastOnce, m);
        p.pkid = 1 + i as u16;
        publisher.publish(p).await?;
    }
    let (mut sub, ack) = connect4_at(&c, 1, connect4_session("mv4", false)).await?;
    ensure!(
        ack.session_present,
        "Clean Session 0 on another node: {ack:?}"
    );
    for m in ["q1", "q2", "q3"] {
        let got = sub.recv_publish().await?;
        ensure!(
            got.payload == m.as_bytes() && got.qos == rumqttc::QoS::AtLeastOnce,
            "queued {m}: {got:?}"
        );
        sub.send(v4::Packet::PubAck(v4::PubAck::new(got.pkid)))
            .await?;
    }
    // Subscribed on node 2 without a SUBSCRIBE: a publication from node 1 arrives.
    let mut arrived = false;
    for i in 0..50u16 {
        let mut p = publish4("mv4/t", rumqttc::QoS::AtLeastOnce, "later");
        p.pkid = 10 + i;
        publisher.publish(p).await?;
        match sub.next(Duration::from_millis(200)).await? {
            Ok(v4::Packet::Publish(p)) if &p.payload[..] == b"later" => {
                arrived = true;
                break;
            }
            Ok(other) => bail!("expected the later publication, got {other:?}"),
            Err(Ended::Closed) => bail!("the subscriber was closed"),
            Err(Ended::Silent) => {}
        }
    }
    ensure!(arrived, "a later publication did not arrive on node 2");
    Ok(())
}

/// A live 5.0 session on node 1 taken over by a Clean Start 0 connection on node 2: the old
/// connection gets DISCONNECT 0x8E, the new one Session Present 1 and the session's
/// subscription; the session's metrics say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_is_taken_over_with_its_state() -> anyhow::Result<()> {
    let c = Cluster::start(2).await?;
    let (mut old, _) = connect5_at(&c, 0, connect5_session("lv5", false, Some(DAY))).await?;
    old.subscribe(1, vec![filter5("lv5/t", QoS::AtLeastOnce)], None)
        .await?;
    let (mut new, ack) = connect5_at(&c, 1, connect5_session("lv5", false, Some(DAY))).await?;
    ensure!(ack.session_present, "a live session taken over: {ack:?}");
    match old.next(DEADLINE).await? {
        Ok(v5::Packet::Disconnect(d))
            if d.reason_code == v5::DisconnectReasonCode::SessionTakenOver => {}
        other => bail!("the old connection: expected DISCONNECT 0x8E, got {other:?}"),
    }
    old.expect_closed(|_| false).await?;
    let got = publish_until_received(&c, 0, "lv5/t", &mut new).await?;
    new.send(v5::Packet::PubAck(v5::PubAck::new(got.pkid, None)))
        .await?;
    new.expect_none().await?;
    let node = |i: usize| c.node(i).context("node running");
    wait_until("migration metrics", Duration::from_secs(5), || async {
        let (a, b) = match (node(0), node(1)) {
            (Ok(a), Ok(b)) => (a.metrics_text(), b.metrics_text()),
            _ => return false,
        };
        a.contains("mqlb_session_takeovers_total 1")
            && a.contains("mqlb_sessions_moved_total{direction=\"out\"} 1")
            && b.contains("mqlb_sessions_moved_total{direction=\"in\"} 1")
    })
    .await?;
    Ok(())
}

/// Whether `c` is still open: its PINGREQ answered, or nothing yet within `within` (anything
/// else sent first, such as a DISCONNECT 0x8E, is read past); `false` once it is closed.
async fn still_open(c: &mut Raw<V5>, within: Duration) -> anyhow::Result<bool> {
    if c.send(v5::Packet::PingReq(v5::PingReq)).await.is_err() {
        return Ok(false);
    }
    for _ in 0..10 {
        match c.next(within).await? {
            Ok(v5::Packet::PingResp(_)) | Err(Ended::Silent) => return Ok(true),
            Ok(_) => {}
            Err(Ended::Closed) => return Ok(false),
        }
    }
    Ok(true)
}

/// Two connections with one client ID racing on two nodes: each node hears of the other's
/// CONNACK, and both closed their own, leaving the client with no session at all. The newer
/// connection wins (its CONNACK time, then the node ID): exactly one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_connections_on_two_nodes_leave_exactly_one() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let mut both_closed = 0;
    for i in 0..20 {
        let id = format!("racer-{i}");
        let (a, b) = tokio::join!(
            connect5_at(&cluster, 0, connect5_session(&id, true, None)),
            connect5_at(&cluster, 1, connect5_session(&id, true, None)),
        );
        // A connection may be taken over before its CONNACK is read: it is closed then.
        let (mut a, mut b) = (a.ok().map(|(c, _)| c), b.ok().map(|(c, _)| c));
        // Until the takeover has settled both may still be open; then one is closed, or both.
        // Bounded by time (a ping answered at once takes no time at all: a count alone gave a
        // loaded CI machine well under a second) and, as every loop, by count.
        let step = Duration::from_millis(100);
        let settle = std::time::Instant::now() + Duration::from_secs(5);
        let mut open = (a.is_some(), b.is_some());
        for _ in 0..10_000 {
            if std::time::Instant::now() > settle {
                break;
            }
            if let Some(c) = &mut a {
                open.0 = still_open(c, step).await?;
            }
            if let Some(c) = &mut b {
                open.1 = still_open(c, step).await?;
            }
            if open != (true, true) {
                break;
            }
        }
        ensure!(open != (true, true), "{id}: both connections still live");
        if open == (false, false) {
            both_closed += 1;
        }
    }
    ensure!(
        both_closed == 0,
        "{both_closed} of 20 races left no connection at all"
    );
    Ok(())
}
