//! CONNECT and CONNACK: who may connect and with what.

use std::sync::Arc;

use anyhow::ensure;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use crate::harness::{connect4, connect5, Role, Target};
use crate::rule;

/// MQTT 3.1.1 and 5.0, 3.1.2.10: a Keep Alive of 0 turns the keep alive mechanism off. Several
/// client libraries send it by default; rumqttd closed such a CONNECT without a CONNACK.
async fn keep_alive_zero_is_accepted(t: Arc<Target>) -> anyhow::Result<()> {
    let mut c = connect4("ka0-v4");
    c.keep_alive = 0;
    let (mut c4, ack) = t.connect4(Role::Subscriber, c).await?;
    ensure!(ack.code == v4::ConnectReturnCode::Success, "3.1.1: {ack:?}");
    // The link lives on: a PINGREQ is answered (with keep alive 0 taken as a zero timeout,
    // the broker would have dropped it at once).
    c4.send(v4::Packet::PingReq).await?;
    let pong = c4.recv().await?;
    ensure!(pong == v4::Packet::PingResp, "3.1.1: {pong:?}");

    let mut c = connect5("ka0-v5");
    c.keep_alive = 0;
    let (mut c5, ack) = t.connect5(Role::Subscriber, c).await?;
    ensure!(ack.code == v5::ConnectReturnCode::Success, "5.0: {ack:?}");
    c5.send(v5::Packet::PingReq(v5::PingReq)).await?;
    let pong = c5.recv().await?;
    ensure!(pong == v5::Packet::PingResp(v5::PingResp), "5.0: {pong:?}");
    Ok(())
}
rule!(keep_alive_zero_is_accepted);
