//! Sessions on one node: whether one is present, what it keeps while its client is away, and
//! when it ends.
//!
//! Session clients are [`Role::Subscriber`]s: a subscriber that reconnects comes back to the
//! same node (across nodes, the second one; through the LB, the node its client ID hashes to).

use std::sync::Arc;

use anyhow::ensure;

use crate::harness::{connect4_session, connect5_session, Role, Target};
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
