//! The queue of a persistent session whose client is away is bounded (`broker.max_queued_messages`,
//! 1000 in the test cluster, as by default): when the client comes back it gets at most that
//! many of the messages published meanwhile, QoS 0 ones dropped first, then the oldest, and
//! the node counts what it dropped (`mqlb_broker_messages_dropped_total{reason="queue_full"}`).

use std::time::Duration;

use anyhow::{ensure, Context};
use mqlb_tests::{http, metric, wait_until, Client, Cluster, Persistent, Protocol, QoS};

const DEADLINE: Duration = Duration::from_secs(30);
/// `max_queued_messages` of the harness's nodes.
const LIMIT: usize = 1000;
/// Published while the subscribers are away: every fifth at QoS 0 (300), the rest at QoS 1
/// (1200, the last one among them).
const PUBLISHED: usize = 1500;

fn is_qos0(i: usize) -> bool {
    i.is_multiple_of(5)
}

async fn node_metrics(cluster: &Cluster) -> anyhow::Result<String> {
    let addr = cluster.http(0).context("the node has no http listener")?;
    let (status, body) = http(addr, "GET", "/metrics").await?;
    ensure!(status == 200, "/metrics: {status}");
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_session_gets_at_most_its_queue_bound_qos0_dropped_first() -> anyhow::Result<()>
{
    let cluster = Cluster::start(1).await?;
    let node = cluster.mqtt(0);
    let node5 = cluster.mqtt_v5(0).context("no MQTT 5 listener")?;
    let clients = [
        ("queue-311", Protocol::V311, node),
        ("queue-5", Protocol::V5, node5),
    ];
    for (id, protocol, addr) in clients {
        let s = Persistent::connect(addr, id, protocol).await?;
        s.subscribe("queue/t").await?;
        s.stop();
    }
    wait_until("both sessions saved offline", DEADLINE, || async {
        node_metrics(&cluster)
            .await
            .is_ok_and(|m| metric(&m, "mqlb_broker_sessions", &[("state", "offline")]) == 2.0)
    })
    .await?;

    let publisher = Client::connect(node, "queue-pub").await?;
    for i in 0..PUBLISHED {
        let (qos, kind) = if is_qos0(i) {
            (QoS::AtMostOnce, "q0")
        } else {
            (QoS::AtLeastOnce, "q1")
        };
        publisher
            .publish("queue/t", qos, format!("{kind}-{i}").as_bytes())
            .await?;
    }
    // Publishes of one connection are taken in order: once the last QoS 1 one is
    // acknowledged, all of them are in the node's log.
    let qos1 = (0..PUBLISHED).filter(|i| !is_qos0(*i)).count();
    wait_until("every QoS 1 publish acknowledged", DEADLINE, || async {
        publisher.pubacks() >= qos1
    })
    .await?;

    // What each session must get: the newest LIMIT QoS 1 messages, in order.
    let want: Vec<String> = (0..PUBLISHED)
        .filter(|i| !is_qos0(*i))
        .skip(qos1 - LIMIT)
        .map(|i| format!("q1-{i}"))
        .collect();
    let mut back = Vec::new();
    for (id, protocol, addr) in clients {
        let s = Persistent::connect(addr, id, protocol).await?;
        ensure!(
            s.session_present() == vec![true],
            "{id}: Session Present {:?}",
            s.session_present()
        );
        back.push((id, s));
    }
    // A marker published once both are back comes after everything queued: once it is in,
    // all that is coming has come.
    publisher.publish_qos1("queue/t", b"marker").await?;
    for (id, s) in &back {
        wait_until(&format!("{id}: the marker"), DEADLINE, || async {
            s.with_received(|r| r.iter().any(|d| d.payload == b"marker"))
        })
        .await?;
        let got: Vec<String> = s.with_received(|r| {
            r.iter()
                .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
                .filter(|p| p != "marker")
                .collect()
        });
        ensure!(
            got == want,
            "{id}: got {} messages (first {:?}, last {:?}), want the newest {LIMIT} QoS 1 ({:?} to {:?})",
            got.len(),
            got.first(),
            got.last(),
            want.first(),
            want.last()
        );
        s.stop();
    }

    let m = node_metrics(&cluster).await?;
    let dropped = |qos: &str| {
        metric(
            &m,
            "mqlb_broker_messages_dropped_total",
            &[("qos", qos), ("reason", "queue_full")],
        )
    };
    let qos0 = (PUBLISHED - qos1) as f64;
    ensure!(
        dropped("0") == 2.0 * qos0 && dropped("1") == 2.0 * (qos1 - LIMIT) as f64,
        "dropped: QoS 0 {} (want {}), QoS 1 {} (want {})",
        dropped("0"),
        2.0 * qos0,
        dropped("1"),
        2 * (qos1 - LIMIT)
    );
    Ok(())
}
