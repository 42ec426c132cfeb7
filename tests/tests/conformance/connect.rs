//! CONNECT and CONNACK: who may connect, with what, and the limits they set for the connection
//! (topic aliases, packet sizes).

use std::sync::Arc;

use anyhow::{bail, ensure, Context};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use crate::harness::{
    connect4, connect4_session, connect5, connect5_session, filter5, publish5, Ended, Kind, QoS,
    Raw, Role, Target, Version, DEADLINE, V4, V5,
};
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

/// MQTT 5.0, 3.1.3.1: a Server that allows a zero-length Client Identifier "MUST then process
/// the CONNECT packet as if the Client had provided that unique ClientID, and MUST return the
/// Assigned Client Identifier in the CONNACK" (MQTT-3.1.3-6, -7), with Clean Start 0 as with 1:
/// refusing it with Clean Session 0 is 3.1.1's rule (its MQTT-3.1.3-8, return code 0x02), which
/// stays for 3.1.1 clients. rumqttd applied the 3.1.1 rule to both versions (found by the Paho
/// interoperability suite, client_test5's `test_zero_length_clientid`).
async fn zero_length_client_id_is_assigned_one(t: Arc<Target>) -> anyhow::Result<()> {
    for clean_start in [true, false] {
        let connect = connect5_session("", clean_start, None);
        let (mut c, ack) = t.connect5(Role::Subscriber, connect).await?;
        ensure!(
            ack.code == v5::ConnectReturnCode::Success,
            "5.0, clean start {clean_start}: {ack:?}"
        );
        let assigned = ack
            .properties
            .as_ref()
            .and_then(|p| p.assigned_client_identifier.as_deref())
            .unwrap_or_default();
        ensure!(
            !assigned.is_empty(),
            "5.0, clean start {clean_start}: no Assigned Client Identifier in {ack:?}"
        );
        c.send(v5::Packet::PingReq(v5::PingReq)).await?;
        let pong = c.recv().await?;
        ensure!(
            pong == v5::Packet::PingResp(v5::PingResp),
            "5.0, clean start {clean_start}: {pong:?}"
        );
    }
    for (clean, want) in [
        (false, v4::ConnectReturnCode::BadClientId),
        (true, v4::ConnectReturnCode::Success),
    ] {
        let (_, ack) = t
            .connect4(Role::Subscriber, connect4_session("", clean))
            .await?;
        ensure!(ack.code == want, "3.1.1, clean session {clean}: {ack:?}");
    }
    Ok(())
}
rule!(zero_length_client_id_is_assigned_one);

/// A hand-made MQTT 5 CONNECT (clean start, keep alive 60) with `props` as its properties and,
/// if given, a will on topic `w` with `will_props` as the will's properties.
fn connect5_bytes(client_id: &str, props: &[u8], will_props: Option<&[u8]>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5];
    body.push(if will_props.is_some() { 0x06 } else { 0x02 });
    body.extend_from_slice(&[0, 60]);
    push_varint(&mut body, props.len());
    body.extend_from_slice(props);
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    if let Some(w) = will_props {
        push_varint(&mut body, w.len());
        body.extend_from_slice(w);
        body.extend_from_slice(&[0, 1, b'w', 0, 1, b'x']);
    }
    let mut packet = vec![0x10];
    push_varint(&mut packet, body.len());
    packet.extend_from_slice(&body);
    packet
}

/// MQTT's variable byte integer.
fn push_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

/// MQTT 5.0, 3.1.2.11: "It is a Protocol Error to include the Receive Maximum value more than
/// once or for it to have the value 0" (3.1.2.11.3), likewise the Maximum Packet Size
/// (3.1.2.11.4), the Session Expiry Interval (3.1.2.11.2), a Request Problem Information other
/// than 0 or 1 (3.1.2.11.7) and the Will Delay Interval (3.1.3.2.2). The server answers a
/// CONNECT that is a Protocol Error by closing the connection, after a CONNACK 0x82 if it
/// sends one (MQTT-3.1.4-1, MQTT-3.2.2-8, 4.13.1; mqlb sends it, mosquitto does not). rumqttd
/// accepted every one of them.
async fn connect_property_protocol_errors_are_refused(t: Arc<Target>) -> anyhow::Result<()> {
    let addr = t.addr(Role::Subscriber, Version::V5)?;
    // The hand-made CONNECT is right: a valid one is accepted.
    let mut c = Raw::<V5>::open(addr).await?;
    c.send_bytes(&connect5_bytes("cpe-ok", &[0x21, 0, 10], None))
        .await?;
    match c.recv().await? {
        v5::Packet::ConnAck(a) if a.code == v5::ConnectReturnCode::Success => {}
        other => bail!("a valid hand-made CONNECT: {other:?}"),
    }
    // (what is wrong, CONNECT properties, will properties)
    type Case = (&'static str, &'static [u8], Option<&'static [u8]>);
    let cases: [Case; 6] = [
        ("Receive Maximum 0", &[0x21, 0, 0], None),
        ("Maximum Packet Size 0", &[0x27, 0, 0, 0, 0], None),
        ("Receive Maximum twice", &[0x21, 0, 10, 0x21, 0, 10], None),
        (
            "Session Expiry Interval twice",
            &[0x11, 0, 0, 0, 10, 0x11, 0, 0, 0, 10],
            None,
        ),
        ("Request Problem Information 2", &[0x17, 2], None),
        (
            "Will Delay Interval twice",
            &[],
            Some(&[0x18, 0, 0, 0, 1, 0x18, 0, 0, 0, 1]),
        ),
    ];
    for (i, (what, props, will)) in cases.into_iter().enumerate() {
        let mut c = Raw::<V5>::open(addr).await?;
        c.send_bytes(&connect5_bytes(&format!("cpe-{i}"), props, will))
            .await?;
        // The CONNACK is a MAY (mosquitto closes without one); a successful one is wrong.
        match c.next(DEADLINE).await? {
            Ok(v5::Packet::ConnAck(a)) if a.code == v5::ConnectReturnCode::ProtocolError => {
                c.expect_closed(|_| false)
                    .await
                    .with_context(|| format!("{what}: after CONNACK 0x82"))?;
            }
            Err(Ended::Closed) => {}
            other => bail!("{what}: expected CONNACK 0x82 or a close, got {other:?}"),
        }
    }
    Ok(())
}
rule!(connect_property_protocol_errors_are_refused);

/// A hand-made MQTT 3.1 CONNECT (protocol name "MQIsdp", level 3), clean session, keep alive
/// 60 s.
fn connect31_bytes(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10];
    push_varint(&mut packet, body.len());
    packet.extend_from_slice(&body);
    packet
}

/// Connects an MQTT 3.1 client of `role` and checks its CONNACK is 0x00 Connection Accepted.
async fn connect31(t: &Target, role: Role, client_id: &str) -> anyhow::Result<Raw<V4>> {
    let mut c = Raw::<V4>::open(t.addr(role, Version::V311)?).await?;
    c.send_bytes(&connect31_bytes(client_id)).await?;
    match c.recv().await? {
        v4::Packet::ConnAck(a) if a.code == v4::ConnectReturnCode::Success => Ok(c),
        other => bail!("MQTT 3.1 CONNECT of {client_id}: {other:?}"),
    }
}

/// MQTT 3.1 (protocol name "MQIsdp", level 3), which MQTT 3.1.1 succeeds and whose packets it
/// keeps: a server that supports it accepts the CONNECT (3.1.1's MQTT-3.1.2-2 lets a server
/// answer an unsupported level with 0x01; mosquitto and the LB accept 3.1). rumqttd closed the
/// connection without a CONNACK. A 3.1 subscriber gets a 3.1 publisher's messages.
async fn mqtt31_clients_are_accepted(t: Arc<Target>) -> anyhow::Result<()> {
    let mut sub = connect31(&t, Role::Subscriber, "mqtt31-sub").await?;
    let mut subscribe = v4::Subscribe::new("mqtt31/t", rumqttc::QoS::AtLeastOnce);
    subscribe.pkid = 1;
    sub.send(v4::Packet::Subscribe(subscribe)).await?;
    match sub.recv().await? {
        v4::Packet::SubAck(a) => ensure!(
            a.return_codes == vec![v4::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)],
            "SUBACK: {a:?}"
        ),
        other => bail!("expected a SUBACK, got {other:?}"),
    }
    let mut publisher = connect31(&t, Role::Publisher, "mqtt31-pub").await?;
    let mut p = v4::Publish::new("mqtt31/t", rumqttc::QoS::AtLeastOnce, "hello");
    p.pkid = 1;
    publisher.send(v4::Packet::Publish(p)).await?;
    match publisher.recv().await? {
        v4::Packet::PubAck(a) if a.pkid == 1 => {}
        other => bail!("expected PUBACK 1, got {other:?}"),
    }
    match sub.recv().await? {
        v4::Packet::Publish(p) => ensure!(
            &p.payload[..] == b"hello" && p.qos == rumqttc::QoS::AtLeastOnce,
            "{p:?}"
        ),
        other => bail!("expected a PUBLISH, got {other:?}"),
    }
    Ok(())
}
rule!(mqtt31_clients_are_accepted);

/// MQTT-3.3.2-12: a PUBLISH with a Topic Alias and a topic sets the alias, and one with the
/// alias and an empty topic is published to the alias's topic, within the connection.
/// MQTT-3.3.2-9 / 4.13: an alias above the Topic Alias Maximum of the server's CONNACK
/// (absent: 0, no alias allowed), or alias 0 (MQTT-3.3.2-8), is answered with DISCONNECT 0x94
/// Topic Alias invalid; an
/// alias never set, with an empty topic, with DISCONNECT 0x82 Protocol Error (3.3.2.3.4).
/// Both close the connection; the DISCONNECT before is a SHOULD (4.13.1), which mqlb keeps and
/// mosquitto does not.
async fn topic_alias_from_the_client(t: Arc<Target>) -> anyhow::Result<()> {
    let (mut sub, _) = t.connect5(Role::Subscriber, connect5("ta-sub")).await?;
    sub.subscribe(1, vec![filter5("ta/t", QoS::AtMostOnce)], None)
        .await?;
    let (mut publisher, ack) = t.connect5(Role::Publisher, connect5("ta-pub")).await?;
    let max = ack
        .properties
        .as_ref()
        .and_then(|p| p.topic_alias_max)
        .unwrap_or(0);
    ensure!(max >= 1, "the server takes no topic alias: {ack:?}");
    let aliased = |topic: &str, alias: u16, payload: &str| {
        let mut p = publish5(topic, QoS::AtMostOnce, payload);
        p.properties = Some(v5::PublishProperties {
            topic_alias: Some(alias),
            ..Default::default()
        });
        p
    };
    publisher.publish(aliased("ta/t", 1, "set")).await?;
    publisher.publish(aliased("", 1, "used")).await?;
    for want in ["set", "used"] {
        let got = sub.recv_publish().await?;
        ensure!(
            got.topic == "ta/t" && got.payload == want.as_bytes(),
            "expected {want:?} on ta/t, got {got:?}"
        );
    }

    let refused = [
        (
            "an alias above the maximum",
            aliased("ta/t", max.saturating_add(1), "x"),
            0x94,
        ),
        ("an alias never set", aliased("", 2, "x"), 0x82),
        ("alias 0", aliased("ta/t", 0, "x"), 0x94),
    ];
    for (i, (what, publish, code)) in refused.into_iter().enumerate() {
        if what.contains("above") && max == u16::MAX {
            continue;
        }
        let (mut c, _) = t
            .connect5(Role::Publisher, connect5(&format!("ta-bad-{i}")))
            .await?;
        c.send(v5::Packet::Publish(publish)).await?;
        // The DISCONNECT is a SHOULD (4.13.1): mqlb sends it, mosquitto closes without it.
        match c.next(DEADLINE).await? {
            Ok(v5::Packet::Disconnect(d)) if d.reason_code as u8 == code => {
                c.expect_closed(|_| false)
                    .await
                    .with_context(|| format!("{what}: after the DISCONNECT"))?;
            }
            Err(Ended::Closed) if t.kind == Kind::Mosquitto => {}
            other => bail!("{what}: expected DISCONNECT {code:#x}, got {other:?}"),
        }
    }
    Ok(())
}
rule!(topic_alias_from_the_client);

/// MQTT-3.1.2-24: the server never sends a client a packet larger than the Maximum Packet Size
/// of its CONNECT; MQTT-3.1.2-25: a PUBLISH that would be larger is discarded for that client
/// (as if it had been sent: its flow does not stall the later ones), and other subscribers get
/// it. rumqttd sent it regardless.
async fn maximum_packet_size_from_the_client(t: Arc<Target>) -> anyhow::Result<()> {
    let mut small = connect5("mps-small");
    small.properties = Some(v5::ConnectProperties {
        max_packet_size: Some(128),
        ..v5::ConnectProperties::new()
    });
    let (mut limited, _) = t.connect5(Role::Subscriber, small).await?;
    limited
        .subscribe(1, vec![filter5("mps/t", QoS::AtLeastOnce)], None)
        .await?;
    let (mut other, _) = t.connect5(Role::Subscriber, connect5("mps-other")).await?;
    other
        .subscribe(1, vec![filter5("mps/t", QoS::AtLeastOnce)], None)
        .await?;
    let (mut publisher, _) = t.connect5(Role::Publisher, connect5("mps-pub")).await?;
    let big = "x".repeat(200);
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce].into_iter().enumerate() {
        let mut p = publish5("mps/t", qos, &big);
        p.pkid = if qos == QoS::AtMostOnce {
            0
        } else {
            1 + i as u16
        };
        publisher.publish(p).await?;
    }
    for i in 0..3u16 {
        publisher
            .publish({
                let mut p = publish5("mps/t", QoS::AtLeastOnce, &format!("small {i}"));
                p.pkid = 10 + i;
                p
            })
            .await?;
    }
    // The other subscriber gets all five; the limited one only the small ones.
    for want in [big.clone(), big.clone()]
        .into_iter()
        .chain((0..3).map(|i| format!("small {i}")))
    {
        let got = other.recv_publish().await?;
        ensure!(got.payload == want.as_bytes(), "other subscriber: {got:?}");
        if got.qos == QoS::AtLeastOnce {
            other
                .send(v5::Packet::PubAck(v5::PubAck::new(got.pkid, None)))
                .await?;
        }
    }
    for i in 0..3 {
        let got = limited.recv_publish().await?;
        ensure!(
            got.payload == format!("small {i}").as_bytes(),
            "the client with Maximum Packet Size 128: {got:?}"
        );
        limited
            .send(v5::Packet::PubAck(v5::PubAck::new(got.pkid, None)))
            .await?;
    }
    Ok(())
}
rule!(maximum_packet_size_from_the_client);

/// Connects an MQTT 5 client of `role` with a Session Expiry Interval of `session` seconds
/// and, if `will_delay` is given, a will (payload `client_id`) on `wd/<client_id>` with that
/// Will Delay Interval.
async fn connect_with_will(
    t: &Target,
    role: Role,
    client_id: &str,
    session: u32,
    will_delay: Option<u32>,
) -> anyhow::Result<Raw<V5>> {
    let mut c = connect5(client_id);
    c.clean_start = false;
    c.properties = Some(v5::ConnectProperties {
        session_expiry_interval: Some(session),
        ..v5::ConnectProperties::new()
    });
    let will = will_delay.map(|delay| {
        v5::LastWill::new(
            format!("wd/{client_id}"),
            client_id.to_string(),
            QoS::AtMostOnce,
            false,
            Some(v5::LastWillProperties {
                delay_interval: Some(delay),
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
            }),
        )
    });
    let mut raw = Raw::<V5>::open(t.addr(role, Version::V5)?).await?;
    raw.send(v5::Packet::Connect(c, will, None)).await?;
    match raw.recv().await? {
        v5::Packet::ConnAck(a) if a.code == v5::ConnectReturnCode::Success => Ok(raw),
        other => bail!("CONNECT of {client_id}: {other:?}"),
    }
}

/// MQTT-3.1.3-9: the will of a connection that ends without DISCONNECT is published when its
/// Will Delay Interval passes or its session ends, whichever is first (Session Expiry 0: at
/// once), and not at all if the client connects to the session again before. The reconnection
/// may land on another node (across nodes: the first connection is on one, the second on the
/// other): each node published the will after the delay regardless, and told every other node
/// a live client was gone. (mosquitto is not checked with Session Expiry 0: it waits for the
/// Will Delay.)
async fn will_delay_interval(t: Arc<Target>) -> anyhow::Result<()> {
    let (mut watcher, _) = t.connect5(Role::Subscriber, connect5("wd-watch")).await?;
    watcher
        .subscribe(1, vec![filter5("wd/#", QoS::AtMostOnce)], None)
        .await?;
    // (delay, session, at least, at most) in seconds
    let cases = [
        ("wd-delay", 2, 60, 1.5, 8.0),
        ("wd-session", 30, 1, 0.5, 6.0),
        ("wd-now", 30, 0, 0.0, 1.5),
    ];
    for (id, delay, session, min, max) in cases {
        // mosquitto (2.0) waits for the Will Delay even when the session ended with the
        // connection (Session Expiry 0): not the rule, so not checked against it.
        if session == 0 && t.kind == Kind::Mosquitto {
            continue;
        }
        let c = connect_with_will(&t, Role::Publisher, id, session, Some(delay)).await?;
        let gone = std::time::Instant::now();
        drop(c);
        let got = watcher
            .recv_publish()
            .await
            .with_context(|| format!("the will of {id}"))?;
        let after = gone.elapsed().as_secs_f64();
        ensure!(
            got.payload == id.as_bytes() && after >= min && after <= max,
            "{id} (Will Delay {delay} s, Session Expiry {session} s): {got:?} after {after:.1} s"
        );
    }
    // Reconnecting (on the other node, across nodes) before the delay passed cancels the
    // will; a second client's later will proves the first one's time has passed.
    let back = connect_with_will(&t, Role::Publisher, "wd-back", 60, Some(2)).await?;
    let marker = connect_with_will(&t, Role::Publisher, "wd-marker", 60, Some(3)).await?;
    drop(back);
    let _back = connect_with_will(&t, Role::Subscriber, "wd-back", 60, None).await?;
    drop(marker);
    let got = watcher.recv_publish().await?;
    ensure!(
        got.payload == b"wd-marker"[..],
        "the will of a client that came back: {got:?}"
    );
    watcher.expect_none().await
}
rule!(will_delay_interval);
