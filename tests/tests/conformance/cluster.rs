//! What the mesh must carry so that a message forwarded to another node is delivered there as
//! it would have been on the node it was published to.

use std::sync::Arc;

use anyhow::ensure;
use rumqttc::v5::mqttbytes::v5;

use crate::harness::{connect5, filter5, publish5, QoS, Role, Target};
use crate::rule;

/// MQTT-3.8.4-8 (3.1.1: MQTT-3.8.4-6): a message is delivered at the minimum of the QoS it was
/// published with and the QoS the subscription was granted, also on a node the message reached
/// over the mesh. The mesh carried no QoS: another node delivered every forwarded message at
/// QoS 0. The message's properties travel with it.
async fn forwarded_message_keeps_its_qos(t: Arc<Target>) -> anyhow::Result<()> {
    let (mut sub1, _) = t.connect5(Role::Subscriber, connect5("fq-sub1")).await?;
    sub1.subscribe(1, vec![filter5("fq/t", QoS::AtLeastOnce)], None)
        .await?;
    let (mut sub2, _) = t.connect5(Role::Subscriber, connect5("fq-sub2")).await?;
    sub2.subscribe(1, vec![filter5("fq/t", QoS::ExactlyOnce)], None)
        .await?;
    let (mut publisher, _) = t.connect5(Role::Publisher, connect5("fq-pub")).await?;

    let mut one = publish5("fq/t", QoS::AtLeastOnce, "one");
    one.properties = Some(v5::PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    });
    publisher.publish(one).await?;
    for (name, sub) in [("QoS 1", &mut sub1), ("QoS 2", &mut sub2)] {
        let got = sub.recv_publish().await?;
        ensure!(
            got.qos == QoS::AtLeastOnce && got.pkid != 0 && &got.payload[..] == b"one",
            "a QoS 1 publication to a {name} subscription: {got:?}"
        );
        let props = got.properties.unwrap_or_default();
        ensure!(
            props.content_type.as_deref() == Some("text/plain")
                && props.user_properties == vec![("k".to_string(), "v".to_string())],
            "the properties of a QoS 1 publication to a {name} subscription: {props:?}"
        );
        sub.send(v5::Packet::PubAck(v5::PubAck::new(got.pkid, None)))
            .await?;
    }

    let mut two = publish5("fq/t", QoS::ExactlyOnce, "two");
    two.pkid = 2;
    publisher.publish(two).await?;
    for (name, sub, want) in [
        ("QoS 1", &mut sub1, QoS::AtLeastOnce),
        ("QoS 2", &mut sub2, QoS::ExactlyOnce),
    ] {
        let got = sub.recv_publish().await?;
        ensure!(
            got.qos == want && got.pkid != 0 && &got.payload[..] == b"two",
            "a QoS 2 publication to a {name} subscription: {got:?}"
        );
        if want == QoS::AtLeastOnce {
            sub.send(v5::Packet::PubAck(v5::PubAck::new(got.pkid, None)))
                .await?;
        }
    }
    // The node the messages reach over the mesh completes their QoS 2 flow with its router
    // (PUBREC, PUBREL) as they come: none stalls behind another.
    for i in 0..20u16 {
        let mut p = publish5("fq/t", QoS::ExactlyOnce, &format!("m{i}"));
        p.pkid = 10 + i;
        publisher.publish(p).await?;
        let got = sub1.recv_publish().await?;
        ensure!(
            got.payload == format!("m{i}").as_bytes(),
            "message {i} of a series: {got:?}"
        );
        sub1.send(v5::Packet::PubAck(v5::PubAck::new(got.pkid, None)))
            .await?;
    }
    Ok(())
}
rule!(forwarded_message_keeps_its_qos);
