//! PUBLISH delivery to subscribers: QoS, subscription options, message properties.

use std::sync::Arc;

use anyhow::{bail, ensure};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use crate::harness::{connect4, connect5, filter5, publish5, QoS, Raw, Role, Target, V4, V5};
use crate::rule;

/// The next PUBLISH to `sub`, checked to be `payload` at `qos`, with its QoS flow completed
/// by the subscriber (PUBACK, or PUBREC/PUBREL/PUBCOMP).
async fn receive5(sub: &mut Raw<V5>, qos: QoS, payload: &str) -> anyhow::Result<v5::Publish> {
    let got = sub.recv_publish().await?;
    ensure!(
        got.qos == qos && got.payload[..] == *payload.as_bytes(),
        "expected {payload:?} at {qos:?}, got {got:?}"
    );
    match qos {
        QoS::AtMostOnce => {}
        QoS::AtLeastOnce => {
            ensure!(
                got.pkid != 0,
                "a QoS 1 delivery without a packet id: {got:?}"
            );
            sub.send(v5::Packet::PubAck(v5::PubAck::new(got.pkid, None)))
                .await?;
        }
        QoS::ExactlyOnce => {
            ensure!(
                got.pkid != 0,
                "a QoS 2 delivery without a packet id: {got:?}"
            );
            sub.send(v5::Packet::PubRec(v5::PubRec::new(got.pkid, None)))
                .await?;
            match sub.recv().await? {
                v5::Packet::PubRel(r) if r.pkid == got.pkid => {}
                other => bail!("expected PUBREL {}, got {other:?}", got.pkid),
            }
            sub.send(v5::Packet::PubComp(v5::PubComp::new(got.pkid, None)))
                .await?;
        }
    }
    Ok(got)
}

/// MQTT-3.8.4-8: a message is delivered at the minimum of the QoS it was published with and
/// the QoS the subscription was granted. rumqttd delivered at the subscription's QoS, so a
/// QoS 0 publication reached a QoS 2 subscriber as QoS 2 (with a packet id and an inflight
/// slot the subscriber never acknowledges: the next PUBACK was "out of order" and closed the
/// subscriber). Covers 0 to a QoS 2 subscription, 1 to 2, 2 to 1 and 2 to 2, in one session,
/// each acknowledged as its delivered QoS asks; the last delivery proves the session survived.
async fn delivered_qos_is_the_minimum_of_publication_and_subscription(
    t: Arc<Target>,
) -> anyhow::Result<()> {
    let (mut sub, _) = t.connect5(Role::Subscriber, connect5("qos-sub")).await?;
    sub.subscribe(
        1,
        vec![
            filter5("qos/min/2", QoS::ExactlyOnce),
            filter5("qos/min/1", QoS::AtLeastOnce),
        ],
        None,
    )
    .await?;
    let (mut publisher, _) = t.connect5(Role::Publisher, connect5("qos-pub")).await?;
    let cases = [
        ("qos/min/2", QoS::AtMostOnce, "0 to 2", QoS::AtMostOnce),
        ("qos/min/2", QoS::AtLeastOnce, "1 to 2", QoS::AtLeastOnce),
        ("qos/min/1", QoS::ExactlyOnce, "2 to 1", QoS::AtLeastOnce),
        (
            "qos/min/2",
            QoS::AtMostOnce,
            "0 to 2 again",
            QoS::AtMostOnce,
        ),
        ("qos/min/2", QoS::ExactlyOnce, "2 to 2", QoS::ExactlyOnce),
        ("qos/min/1", QoS::AtLeastOnce, "1 to 1", QoS::AtLeastOnce),
    ];
    for (pkid, (topic, qos, payload, delivered)) in (1..).zip(cases) {
        let mut p = publish5(topic, qos, payload);
        if qos != QoS::AtMostOnce {
            p.pkid = pkid;
        }
        publisher.publish(p).await?;
        receive5(&mut sub, delivered, payload).await?;
    }
    Ok(())
}
rule!(
    delivered_qos_is_the_minimum_of_publication_and_subscription,
    pending_mesh = "the mesh injects every forwarded publish at QoS 0 (node.rs injector)"
);

/// The next PUBLISH to a 3.1.1 `sub`, checked to be `payload` at `qos`, its flow completed.
async fn receive4(sub: &mut Raw<V4>, qos: rumqttc::QoS, payload: &str) -> anyhow::Result<()> {
    let got = match sub.recv().await? {
        v4::Packet::Publish(p) => p,
        other => bail!("expected a PUBLISH, got {other:?}"),
    };
    ensure!(
        got.qos == qos && got.payload[..] == *payload.as_bytes(),
        "expected {payload:?} at {qos:?}, got {got:?}"
    );
    match qos {
        rumqttc::QoS::AtMostOnce => {}
        rumqttc::QoS::AtLeastOnce => {
            sub.send(v4::Packet::PubAck(v4::PubAck::new(got.pkid)))
                .await?
        }
        rumqttc::QoS::ExactlyOnce => {
            sub.send(v4::Packet::PubRec(v4::PubRec::new(got.pkid)))
                .await?;
            match sub.recv().await? {
                v4::Packet::PubRel(r) if r.pkid == got.pkid => {}
                other => bail!("expected PUBREL {}, got {other:?}", got.pkid),
            }
            sub.send(v4::Packet::PubComp(v4::PubComp::new(got.pkid)))
                .await?;
        }
    }
    Ok(())
}

/// Subscribes a 3.1.1 client to `filters` and waits for its SUBACK.
async fn subscribe4(
    c: &mut Raw<V4>,
    pkid: u16,
    filters: &[(&str, rumqttc::QoS)],
) -> anyhow::Result<()> {
    let mut s = v4::Subscribe::new_many(
        filters
            .iter()
            .map(|(f, q)| v4::SubscribeFilter::new(f.to_string(), *q)),
    );
    s.pkid = pkid;
    c.send(v4::Packet::Subscribe(s)).await?;
    match c.recv().await? {
        v4::Packet::SubAck(a) if a.pkid == pkid => Ok(()),
        other => bail!("expected SUBACK {pkid}, got {other:?}"),
    }
}

/// Publishes from a 3.1.1 client and completes the QoS flow.
async fn publish4(c: &mut Raw<V4>, publish: v4::Publish) -> anyhow::Result<()> {
    let (qos, pkid) = (publish.qos, publish.pkid);
    c.send(v4::Packet::Publish(publish)).await?;
    match qos {
        rumqttc::QoS::AtMostOnce => Ok(()),
        rumqttc::QoS::AtLeastOnce => match c.recv().await? {
            v4::Packet::PubAck(a) if a.pkid == pkid => Ok(()),
            other => bail!("expected PUBACK {pkid}, got {other:?}"),
        },
        rumqttc::QoS::ExactlyOnce => {
            match c.recv().await? {
                v4::Packet::PubRec(a) if a.pkid == pkid => {}
                other => bail!("expected PUBREC {pkid}, got {other:?}"),
            }
            c.send(v4::Packet::PubRel(v4::PubRel::new(pkid))).await?;
            match c.recv().await? {
                v4::Packet::PubComp(a) if a.pkid == pkid => Ok(()),
                other => bail!("expected PUBCOMP {pkid}, got {other:?}"),
            }
        }
    }
}

/// MQTT 3.1.1, MQTT-3.8.4-6: the same rule for 3.1.1 clients: "The QoS of Payload Messages
/// sent in response to a Subscription MUST be the minimum of the QoS of the originally
/// published message and the maximum QoS granted by the Server".
async fn delivered_qos_is_the_minimum_of_publication_and_subscription_v311(
    t: Arc<Target>,
) -> anyhow::Result<()> {
    use rumqttc::QoS as Q;
    let (mut sub, _) = t.connect4(Role::Subscriber, connect4("qos4-sub")).await?;
    subscribe4(
        &mut sub,
        1,
        &[
            ("qos4/min/2", Q::ExactlyOnce),
            ("qos4/min/1", Q::AtLeastOnce),
        ],
    )
    .await?;
    let (mut publisher, _) = t.connect4(Role::Publisher, connect4("qos4-pub")).await?;
    let cases = [
        ("qos4/min/2", Q::AtMostOnce, "0 to 2", Q::AtMostOnce),
        ("qos4/min/2", Q::AtLeastOnce, "1 to 2", Q::AtLeastOnce),
        ("qos4/min/1", Q::ExactlyOnce, "2 to 1", Q::AtLeastOnce),
        ("qos4/min/2", Q::AtMostOnce, "0 to 2 again", Q::AtMostOnce),
        ("qos4/min/2", Q::ExactlyOnce, "2 to 2", Q::ExactlyOnce),
        ("qos4/min/1", Q::AtLeastOnce, "1 to 1", Q::AtLeastOnce),
    ];
    for (pkid, (topic, qos, payload, delivered)) in (1..).zip(cases) {
        let mut p = v4::Publish::new(topic, qos, payload);
        if qos != Q::AtMostOnce {
            p.pkid = pkid;
        }
        publish4(&mut publisher, p).await?;
        receive4(&mut sub, delivered, payload).await?;
    }
    Ok(())
}
rule!(
    delivered_qos_is_the_minimum_of_publication_and_subscription_v311,
    pending_mesh = "the mesh injects every forwarded publish at QoS 0 (node.rs injector)"
);
