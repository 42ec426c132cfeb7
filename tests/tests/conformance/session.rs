//! Sessions on one node: whether one is present, what it keeps while its client is away, and
//! when it ends.
//!
//! Session clients are [`Role::Subscriber`]s: a subscriber that reconnects comes back to the
//! same node (across nodes, the second one; through the LB, the node its client ID hashes to).

use std::sync::Arc;

use anyhow::ensure;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use crate::harness::{
    connect4, connect4_session, connect5, connect5_session, filter5, publish4, publish5, QoS, Role,
    Target,
};
use crate::rule;

/// A day, as a Session Expiry Interval that outlives any test.
const DAY: u32 = 86_400;

/// MQTT-3.2.2-2, MQTT-3.2.2-3, MQTT-3.1.2-4, MQTT-3.1.2-23 (5.0): a CONNECT with Clean Start 0
/// to an existing session gets Session Present 1; with no session, or with Clean Start 1
/// (which discards the session), Session Present 0. A session outlives its network connection
/// only if the Session Expiry Interval is above 0 (absent means 0). rumqttd kept a session
/// when Clean Start was 0 whatever the interval, and none when Clean Start was 1.
async fn session_present_says_whether_the_session_was_kept(t: Arc<Target>) -> anyhow::Result<()> {
    let id = "sp5";
    // No session yet, Clean Start 0: none present.
    let (c, ack) = t
        .connect5(Role::Subscriber, connect5_session(id, false, Some(DAY)))
        .await?;
    ensure!(!ack.session_present, "a first CONNECT: {ack:?}");
    c.disconnect(None).await?;
    // The session was kept (expiry a day): present.
    let (c, ack) = t
        .connect5(Role::Subscriber, connect5_session(id, false, Some(DAY)))
        .await?;
    ensure!(
        ack.session_present,
        "Clean Start 0 after a kept session: {ack:?}"
    );
    c.disconnect(None).await?;
    // Clean Start 1 discards it: not present; this new session is kept (expiry a day).
    let (c, ack) = t
        .connect5(Role::Subscriber, connect5_session(id, true, Some(DAY)))
        .await?;
    ensure!(!ack.session_present, "Clean Start 1: {ack:?}");
    c.disconnect(None).await?;
    let (c, ack) = t
        .connect5(Role::Subscriber, connect5_session(id, false, None))
        .await?;
    ensure!(
        ack.session_present,
        "Clean Start 0 after a Clean Start 1 session with expiry a day: {ack:?}"
    );
    // This connection had no Session Expiry Interval: its session ends with it.
    c.disconnect(None).await?;
    let (c, ack) = t
        .connect5(Role::Subscriber, connect5_session(id, false, Some(0)))
        .await?;
    ensure!(
        !ack.session_present,
        "Clean Start 0 after a session without expiry: {ack:?}"
    );
    c.disconnect(None).await?;
    // Expiry 0 given explicitly: ends too.
    let (_c, ack) = t
        .connect5(Role::Subscriber, connect5_session(id, false, None))
        .await?;
    ensure!(
        !ack.session_present,
        "Clean Start 0 after a session with expiry 0: {ack:?}"
    );
    Ok(())
}
rule!(session_present_says_whether_the_session_was_kept);

/// 3.1.1 MQTT-3.2.2-2, MQTT-3.2.2-3, MQTT-3.1.2-6: Clean Session 0 resumes a session
/// (Session Present 1) if there is one, Clean Session 1 discards it (Session Present 0) and
/// its session ends with the connection.
async fn session_present_says_whether_the_session_was_kept_311(
    t: Arc<Target>,
) -> anyhow::Result<()> {
    let id = "sp4";
    let (c, ack) = t
        .connect4(Role::Subscriber, connect4_session(id, false))
        .await?;
    ensure!(!ack.session_present, "a first CONNECT: {ack:?}");
    c.disconnect().await?;
    let (c, ack) = t
        .connect4(Role::Subscriber, connect4_session(id, false))
        .await?;
    ensure!(ack.session_present, "Clean Session 0 again: {ack:?}");
    c.disconnect().await?;
    let (c, ack) = t
        .connect4(Role::Subscriber, connect4_session(id, true))
        .await?;
    ensure!(!ack.session_present, "Clean Session 1: {ack:?}");
    c.disconnect().await?;
    let (_c, ack) = t
        .connect4(Role::Subscriber, connect4_session(id, false))
        .await?;
    ensure!(
        !ack.session_present,
        "Clean Session 0 after a Clean Session 1 connection: {ack:?}"
    );
    Ok(())
}
rule!(session_present_says_whether_the_session_was_kept_311);

/// MQTT-3.1.2-4, MQTT-4.1.0-1 (3.1.1: MQTT-3.1.2-4): the session state a server keeps includes
/// the client's subscriptions, so after a reconnect to a present session a publish reaches
/// the client with no new SUBSCRIBE. 5.0 and 3.1.1.
async fn subscriptions_survive_a_reconnect(t: Arc<Target>) -> anyhow::Result<()> {
    let (mut c, _) = t
        .connect5(Role::Subscriber, connect5_session("subs5", true, Some(DAY)))
        .await?;
    c.subscribe(1, vec![filter5("subs/v5", QoS::AtLeastOnce)], None)
        .await?;
    c.disconnect(None).await?;
    let (mut c, ack) = t
        .connect5(
            Role::Subscriber,
            connect5_session("subs5", false, Some(DAY)),
        )
        .await?;
    ensure!(ack.session_present, "5.0 reconnect: {ack:?}");
    let (mut p, _) = t.connect5(Role::Publisher, connect5("subs5-pub")).await?;
    p.publish(publish5("subs/v5", QoS::AtLeastOnce, "five"))
        .await?;
    let got = c.recv_publish().await?;
    ensure!(&got.payload[..] == b"five", "5.0: {got:?}");

    let (mut c, _) = t
        .connect4(Role::Subscriber, connect4_session("subs4", false))
        .await?;
    c.subscribe(1, "subs/v4", rumqttc::QoS::AtLeastOnce).await?;
    c.disconnect().await?;
    let (mut c, ack) = t
        .connect4(Role::Subscriber, connect4_session("subs4", false))
        .await?;
    ensure!(ack.session_present, "3.1.1 reconnect: {ack:?}");
    let (mut p, _) = t.connect4(Role::Publisher, connect4("subs4-pub")).await?;
    p.publish(publish4("subs/v4", rumqttc::QoS::AtLeastOnce, "four"))
        .await?;
    let got = c.recv_publish().await?;
    ensure!(&got.payload[..] == b"four", "3.1.1: {got:?}");
    Ok(())
}
rule!(subscriptions_survive_a_reconnect);

/// MQTT-3.1.2-5 (5.0 and 3.1.1): the session of a client that is away keeps the QoS 1 and
/// QoS 2 messages that match its subscriptions, and they are delivered when it comes back.
/// An online subscriber on the session's node gets them first, which proves they were routed
/// there while the session's client was away (across nodes: through the mesh).
async fn offline_messages_are_queued_for_the_session(t: Arc<Target>) -> anyhow::Result<()> {
    // 5.0
    let (mut c, _) = t
        .connect5(
            Role::Subscriber,
            connect5_session("queue5", true, Some(DAY)),
        )
        .await?;
    c.subscribe(1, vec![filter5("queue/v5/#", QoS::ExactlyOnce)], None)
        .await?;
    c.disconnect(None).await?;
    let (mut watch, _) = t
        .connect5(Role::Subscriber, connect5("queue5-watch"))
        .await?;
    watch
        .subscribe(1, vec![filter5("queue/v5/#", QoS::AtMostOnce)], None)
        .await?;
    let (mut p, _) = t.connect5(Role::Publisher, connect5("queue5-pub")).await?;
    p.publish(publish5("queue/v5/a", QoS::AtLeastOnce, "one"))
        .await?;
    p.publish(publish5("queue/v5/b", QoS::ExactlyOnce, "two"))
        .await?;
    for _ in 0..2 {
        watch.recv_publish().await?;
    }
    let (mut c, ack) = t
        .connect5(
            Role::Subscriber,
            connect5_session("queue5", false, Some(DAY)),
        )
        .await?;
    ensure!(ack.session_present, "5.0 reconnect: {ack:?}");
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = c.recv_publish().await?;
        got.push((String::from_utf8_lossy(&m.payload).into_owned(), m.qos));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    ensure!(
        got == [
            ("one".to_owned(), QoS::AtLeastOnce),
            ("two".to_owned(), QoS::ExactlyOnce)
        ],
        "5.0: queued while away: {got:?}"
    );

    // 3.1.1
    let (mut c, _) = t
        .connect4(Role::Subscriber, connect4_session("queue4", false))
        .await?;
    c.subscribe(1, "queue/v4/#", rumqttc::QoS::ExactlyOnce)
        .await?;
    c.disconnect().await?;
    let (mut watch, _) = t
        .connect4(Role::Subscriber, connect4("queue4-watch"))
        .await?;
    watch
        .subscribe(1, "queue/v4/#", rumqttc::QoS::AtMostOnce)
        .await?;
    let (mut p, _) = t.connect4(Role::Publisher, connect4("queue4-pub")).await?;
    p.publish(publish4("queue/v4/a", rumqttc::QoS::AtLeastOnce, "one"))
        .await?;
    p.publish(publish4("queue/v4/b", rumqttc::QoS::ExactlyOnce, "two"))
        .await?;
    for _ in 0..2 {
        watch.recv_publish().await?;
    }
    let (mut c, ack) = t
        .connect4(Role::Subscriber, connect4_session("queue4", false))
        .await?;
    ensure!(ack.session_present, "3.1.1 reconnect: {ack:?}");
    let mut got = Vec::new();
    for _ in 0..2 {
        let m: v4::Publish = c.recv_publish().await?;
        got.push((String::from_utf8_lossy(&m.payload).into_owned(), m.qos));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    ensure!(
        got == [
            ("one".to_owned(), rumqttc::QoS::AtLeastOnce),
            ("two".to_owned(), rumqttc::QoS::ExactlyOnce)
        ],
        "3.1.1: queued while away: {got:?}"
    );
    Ok(())
}
rule!(offline_messages_are_queued_for_the_session);

/// MQTT-4.4.0-1, MQTT-3.3.1-1 (3.1.1: MQTT-4.4.0-1, MQTT-3.3.1-1): a QoS 1 PUBLISH the client
/// had not acknowledged when its connection dropped is sent again on reconnect to the session,
/// with DUP 1 and the same packet identifier. 5.0 and 3.1.1.
async fn unacknowledged_qos1_is_resent_with_dup_and_its_packet_id(
    t: Arc<Target>,
) -> anyhow::Result<()> {
    let (mut c, _) = t
        .connect5(Role::Subscriber, connect5_session("redo5", true, Some(DAY)))
        .await?;
    c.subscribe(1, vec![filter5("redo/v5", QoS::AtLeastOnce)], None)
        .await?;
    let (mut p, _) = t.connect5(Role::Publisher, connect5("redo5-pub")).await?;
    p.publish(publish5("redo/v5", QoS::AtLeastOnce, "again"))
        .await?;
    let first = c.recv_publish().await?;
    ensure!(!first.dup, "5.0 first delivery: {first:?}");
    c.drop_connection().await?;
    let (mut c, ack) = t
        .connect5(
            Role::Subscriber,
            connect5_session("redo5", false, Some(DAY)),
        )
        .await?;
    ensure!(ack.session_present, "5.0 reconnect: {ack:?}");
    let again = c.recv_publish().await?;
    ensure!(
        again.dup && again.pkid == first.pkid && again.payload == first.payload,
        "5.0: sent {first:?}, resent {again:?}"
    );
    c.send(v5::Packet::PubAck(v5::PubAck::new(again.pkid, None)))
        .await?;

    let (mut c, _) = t
        .connect4(Role::Subscriber, connect4_session("redo4", false))
        .await?;
    c.subscribe(1, "redo/v4", rumqttc::QoS::AtLeastOnce).await?;
    let (mut p, _) = t.connect4(Role::Publisher, connect4("redo4-pub")).await?;
    p.publish(publish4("redo/v4", rumqttc::QoS::AtLeastOnce, "again"))
        .await?;
    let first = c.recv_publish().await?;
    ensure!(!first.dup, "3.1.1 first delivery: {first:?}");
    c.drop_connection().await?;
    let (mut c, ack) = t
        .connect4(Role::Subscriber, connect4_session("redo4", false))
        .await?;
    ensure!(ack.session_present, "3.1.1 reconnect: {ack:?}");
    let again = c.recv_publish().await?;
    ensure!(
        again.dup && again.pkid == first.pkid && again.payload == first.payload,
        "3.1.1: sent {first:?}, resent {again:?}"
    );
    Ok(())
}
rule!(unacknowledged_qos1_is_resent_with_dup_and_its_packet_id);

/// MQTT-4.4.0-1 (5.0 and 3.1.1): on reconnect to the session, a QoS 2 PUBLISH the client had
/// not answered with PUBREC is sent again (DUP 1, same packet identifier), and a PUBREL it had
/// not answered with PUBCOMP is sent again (same packet identifier).
async fn unfinished_qos2_flows_are_resumed(t: Arc<Target>) -> anyhow::Result<()> {
    let (mut c, _) = t
        .connect5(
            Role::Subscriber,
            connect5_session("qos2s5", true, Some(DAY)),
        )
        .await?;
    c.subscribe(1, vec![filter5("qos2s/v5/#", QoS::ExactlyOnce)], None)
        .await?;
    let (mut p, _) = t.connect5(Role::Publisher, connect5("qos2s5-pub")).await?;
    // PUBLISH not PUBRECed.
    p.publish(publish5("qos2s/v5/a", QoS::ExactlyOnce, "a"))
        .await?;
    let first = c.recv_publish().await?;
    c.drop_connection().await?;
    let (mut c, _) = t
        .connect5(
            Role::Subscriber,
            connect5_session("qos2s5", false, Some(DAY)),
        )
        .await?;
    let again = c.recv_publish().await?;
    ensure!(
        again.dup && again.pkid == first.pkid && again.qos == QoS::ExactlyOnce,
        "5.0: sent {first:?}, resent {again:?}"
    );
    // PUBREC sent, PUBREL received, PUBCOMP not sent.
    c.send(v5::Packet::PubRec(v5::PubRec::new(again.pkid, None)))
        .await?;
    match c.recv().await? {
        v5::Packet::PubRel(r) if r.pkid == again.pkid => {}
        other => anyhow::bail!("5.0: expected PUBREL {}, got {other:?}", again.pkid),
    }
    c.drop_connection().await?;
    let (mut c, _) = t
        .connect5(
            Role::Subscriber,
            connect5_session("qos2s5", false, Some(DAY)),
        )
        .await?;
    match c.recv().await? {
        v5::Packet::PubRel(r) if r.pkid == again.pkid => {}
        other => anyhow::bail!("5.0: expected PUBREL {} again, got {other:?}", again.pkid),
    }
    c.send(v5::Packet::PubComp(v5::PubComp::new(again.pkid, None)))
        .await?;

    let (mut c, _) = t
        .connect4(Role::Subscriber, connect4_session("qos2s4", false))
        .await?;
    c.subscribe(1, "qos2s/v4/#", rumqttc::QoS::ExactlyOnce)
        .await?;
    let (mut p, _) = t.connect4(Role::Publisher, connect4("qos2s4-pub")).await?;
    p.publish(publish4("qos2s/v4/a", rumqttc::QoS::ExactlyOnce, "a"))
        .await?;
    let first = c.recv_publish().await?;
    c.drop_connection().await?;
    let (mut c, _) = t
        .connect4(Role::Subscriber, connect4_session("qos2s4", false))
        .await?;
    let again = c.recv_publish().await?;
    ensure!(
        again.dup && again.pkid == first.pkid && again.qos == rumqttc::QoS::ExactlyOnce,
        "3.1.1: sent {first:?}, resent {again:?}"
    );
    c.send(v4::Packet::PubRec(v4::PubRec::new(again.pkid)))
        .await?;
    match c.recv().await? {
        v4::Packet::PubRel(r) if r.pkid == again.pkid => {}
        other => anyhow::bail!("3.1.1: expected PUBREL {}, got {other:?}", again.pkid),
    }
    c.drop_connection().await?;
    let (mut c, _) = t
        .connect4(Role::Subscriber, connect4_session("qos2s4", false))
        .await?;
    match c.recv().await? {
        v4::Packet::PubRel(r) if r.pkid == again.pkid => {}
        other => anyhow::bail!("3.1.1: expected PUBREL {} again, got {other:?}", again.pkid),
    }
    Ok(())
}
rule!(unfinished_qos2_flows_are_resumed);

/// How long a test waits for a session of [`SHORT`] seconds to expire: the interval itself is
/// the rule, so this is a plain wait, with a margin.
const SHORT: u32 = 1;
const PAST_SHORT: std::time::Duration = std::time::Duration::from_millis(2_200);

/// MQTT-3.1.2-23 and 3.1.2.11.2 (5.0): a session ends when its Session Expiry Interval has
/// passed after the connection closed: a CONNECT with Clean Start 0 then gets Session Present
/// 0, and nothing queued for the old session is delivered. rumqttd ignored the interval and
/// kept sessions for ever.
async fn a_session_ends_when_its_expiry_interval_passes(t: Arc<Target>) -> anyhow::Result<()> {
    let (mut c, _) = t
        .connect5(
            Role::Subscriber,
            connect5_session("exp5", true, Some(SHORT)),
        )
        .await?;
    c.subscribe(1, vec![filter5("exp/v5", QoS::AtLeastOnce)], None)
        .await?;
    c.disconnect(None).await?;
    let (mut watch, _) = t.connect5(Role::Subscriber, connect5("exp5-watch")).await?;
    watch
        .subscribe(1, vec![filter5("exp/v5", QoS::AtMostOnce)], None)
        .await?;
    let (mut p, _) = t.connect5(Role::Publisher, connect5("exp5-pub")).await?;
    p.publish(publish5("exp/v5", QoS::AtLeastOnce, "stale"))
        .await?;
    watch.recv_publish().await?;
    tokio::time::sleep(PAST_SHORT).await;
    let (mut c, ack) = t
        .connect5(
            Role::Subscriber,
            connect5_session("exp5", false, Some(SHORT)),
        )
        .await?;
    ensure!(!ack.session_present, "after the expiry interval: {ack:?}");
    c.expect_none().await?;
    Ok(())
}
rule!(a_session_ends_when_its_expiry_interval_passes);

/// 3.14.2.2.2 (5.0): the Session Expiry Interval of a DISCONNECT replaces the CONNECT's: a
/// session of a day set to 1 s on DISCONNECT ends after 1 s, one of 1 s set to a day is kept.
/// (MQTT-3.14.2-? / 3.14.2.2.2: setting it above 0 when the CONNECT had 0 is a Protocol Error
/// and keeps no session.)
async fn disconnect_changes_the_session_expiry_interval(t: Arc<Target>) -> anyhow::Result<()> {
    let (c, _) = t
        .connect5(
            Role::Subscriber,
            connect5_session("dexp-a", true, Some(DAY)),
        )
        .await?;
    c.disconnect(Some(SHORT)).await?;
    let (c, _) = t
        .connect5(
            Role::Subscriber,
            connect5_session("dexp-b", true, Some(SHORT)),
        )
        .await?;
    c.disconnect(Some(DAY)).await?;
    let (c, _) = t
        .connect5(Role::Subscriber, connect5_session("dexp-c", true, None))
        .await?;
    c.disconnect(Some(DAY)).await?;
    tokio::time::sleep(PAST_SHORT).await;
    let (_a, ack) = t
        .connect5(
            Role::Subscriber,
            connect5_session("dexp-a", false, Some(DAY)),
        )
        .await?;
    ensure!(
        !ack.session_present,
        "a day, then 1 s on DISCONNECT: {ack:?}"
    );
    let (_b, ack) = t
        .connect5(
            Role::Subscriber,
            connect5_session("dexp-b", false, Some(DAY)),
        )
        .await?;
    ensure!(
        ack.session_present,
        "1 s, then a day on DISCONNECT: {ack:?}"
    );
    let (_c, ack) = t
        .connect5(
            Role::Subscriber,
            connect5_session("dexp-c", false, Some(DAY)),
        )
        .await?;
    ensure!(
        !ack.session_present,
        "0, then a day on DISCONNECT (a protocol error): {ack:?}"
    );
    Ok(())
}
rule!(disconnect_changes_the_session_expiry_interval);

/// 3.2.2.3.2 (5.0): a server that uses another Session Expiry Interval than the client's
/// says so in CONNACK; mqlb uses the client's (no cap, 0xFFFFFFFF never expires), so its
/// CONNACK has none or the same value.
async fn connack_states_the_session_expiry_it_uses(t: Arc<Target>) -> anyhow::Result<()> {
    for (i, asked) in [SHORT, DAY, u32::MAX].into_iter().enumerate() {
        let id = format!("connack-exp{i}");
        let (_c, ack) = t
            .connect5(Role::Subscriber, connect5_session(&id, true, Some(asked)))
            .await?;
        let used = ack
            .properties
            .as_ref()
            .and_then(|p| p.session_expiry_interval);
        ensure!(
            used.is_none_or(|u| u == asked),
            "asked for {asked}, CONNACK says {used:?} and mqlb does not cap it"
        );
    }
    Ok(())
}
rule!(connack_states_the_session_expiry_it_uses);
