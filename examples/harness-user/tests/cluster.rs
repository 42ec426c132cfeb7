//! The harness from outside mqlb's workspace: two in-process broker nodes meshed on loopback
//! ports, rumqttc clients on each, and a publish on one node that reaches a subscriber on the
//! other.

use std::time::Duration;

use mqlb_tests::{wait_until, Client, Cluster, QoS};

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
