//! The harness from outside mqlb's workspace: two in-process broker nodes meshed on loopback
//! ports, rumqttc clients on each, and a publish on one node that reaches a subscriber on the
//! other; then a whole topology of `mqlb` processes with the clients through its LB.

use std::time::Duration;

use mqlb_tests::{wait_until, Client, Cluster, QoS, Topology};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_one_node_reaches_a_subscriber_on_the_other() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?; // waits until the mesh links are up
    let sub = Client::connect(cluster.mqtt(1), "harness-user-sub").await?;
    sub.subscribe("user/#", QoS::AtLeastOnce).await?;
    let publisher = Client::connect(cluster.mqtt(0), "harness-user-pub").await?;
    publisher.publish_qos1("user/hello", b"from node 1").await?;
    wait_until("the message on node 2", Duration::from_secs(10), || async {
        sub.received_count() >= 1
    })
    .await?;
    let got = sub.received();
    assert_eq!(got[0].topic, "user/hello");
    assert_eq!(got[0].payload, b"from node 1");
    publisher.disconnect().await;
    sub.disconnect().await;
    Ok(())
}

/// The whole topology as `mqlb` processes (an HA server, two brokers, the LB), clients through
/// the LB's frontend as devices connect: a publish reaches the subscriber whichever broker each
/// client was routed to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_through_the_lb_reaches_a_subscriber() -> anyhow::Result<()> {
    let t = Topology::start(2).await?; // waits until the LB sees both brokers up
    let sub = Client::connect(t.front, "harness-user-lb-sub").await?;
    sub.subscribe("user/lb/#", QoS::AtLeastOnce).await?;
    let publisher = Client::connect(t.front, "harness-user-lb-pub").await?;
    // The subscription may take a mesh hop to reach the publisher's broker: publish until seen.
    wait_until(
        "the message through the LB",
        Duration::from_secs(15),
        || async {
            let _ = publisher.publish_qos1("user/lb/hello", b"via the LB").await;
            sub.received_count() >= 1
        },
    )
    .await?;
    assert_eq!(sub.received()[0].payload, b"via the LB");
    Ok(())
}
