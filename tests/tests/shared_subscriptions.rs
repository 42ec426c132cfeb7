//! `$share/{group}/{filter}` is cluster-wide (issue 12): each message goes to one member of
//! the group across all nodes, and the share of a member on a dead node goes to the others.
//!
//! Every publish reaches every node through the mesh; each node's router serves its local
//! members of a group only the messages the group's rendezvous order gives that node, among the
//! nodes that have members (what each node learns from its peers' SHARE_GROUPS frames).

use std::collections::BTreeMap;
use std::time::Duration;

#[path = "conformance/harness.rs"]
mod harness;

use bytes::BytesMut;
use harness::{connect4_session, Ended, Raw, V4};
use mqlb_broker::mesh::frame;
use mqlb_tests::{metric, wait_until, Client, Cluster, QoS};
use rumqttc::mqttbytes::v4;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(20);
const FILTER: &str = "$share/g/share/t";
const TOPIC: &str = "share/t";

/// Waits until node `at` knows that node `of` has `n` shared groups with members.
async fn knows(cluster: &Cluster, at: usize, of: &str, n: f64) -> anyhow::Result<()> {
    let node = cluster
        .node(at)
        .ok_or_else(|| anyhow::anyhow!("node {at} is not running"))?;
    wait_until(
        &format!("node {at} knows {of}'s {n} shared groups"),
        DEADLINE,
        || async { metric(&node.metrics_text(), "mqlb_share_groups", &[("node", of)]) == n },
    )
    .await
    .map(|_| ())
}

/// The decisions (served or skipped) node `at` has taken for shared-group messages.
fn decisions(cluster: &Cluster, at: usize) -> f64 {
    cluster.node(at).map_or(0.0, |n| {
        metric(&n.metrics_text(), "mqlb_share_messages_total", &[])
    })
}

fn served(cluster: &Cluster, at: usize) -> f64 {
    cluster.node(at).map_or(0.0, |n| {
        metric(
            &n.metrics_text(),
            "mqlb_share_messages_total",
            &[("decision", "served")],
        )
    })
}

/// How many times each payload was received, over all `members`.
fn tally(members: &[&Client]) -> BTreeMap<Vec<u8>, usize> {
    let mut t = BTreeMap::new();
    for m in members {
        for msg in m.received() {
            *t.entry(msg.payload).or_default() += 1;
        }
    }
    t
}

async fn publish(p: &Client, prefix: &str, n: usize) -> anyhow::Result<()> {
    for i in 0..n {
        p.publish_qos1(TOPIC, format!("{prefix}{i}").as_bytes())
            .await?;
    }
    Ok(())
}

/// Members on n1 and n2, publisher on n3: each of 100 messages delivered once, to one
/// member, and both nodes' members get some (the rendezvous is per message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_reaches_one_member_across_nodes() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    cluster.wait_meshed().await?;
    let a = Client::connect(cluster.mqtt(0), "share-once-a").await?;
    let b = Client::connect(cluster.mqtt(1), "share-once-b").await?;
    a.subscribe(FILTER, QoS::AtLeastOnce).await?;
    b.subscribe(FILTER, QoS::AtLeastOnce).await?;
    knows(&cluster, 0, "n2", 1.0).await?;
    knows(&cluster, 1, "n1", 1.0).await?;
    knows(&cluster, 2, "n1", 1.0).await?;

    let p = Client::connect(cluster.mqtt(2), "share-once-p").await?;
    publish(&p, "m", 100).await?;
    wait_until("every message delivered", DEADLINE, || async {
        tally(&[&a, &b]).len() == 100
            && decisions(&cluster, 0) >= 100.0
            && decisions(&cluster, 1) >= 100.0
    })
    .await?;
    // Every decision is taken: whatever was served was handed to a member's connection.
    let served = served(&cluster, 0) + served(&cluster, 1);
    wait_until("served messages received", DEADLINE, || async {
        a.received_count() + b.received_count() >= served as usize
    })
    .await?;
    let t = tally(&[&a, &b]);
    let twice: Vec<_> = t.iter().filter(|(_, n)| **n > 1).collect();
    anyhow::ensure!(
        twice.is_empty() && served == 100.0,
        "{} of 100 delivered more than once ({} deliveries, {served} served)",
        twice.len(),
        a.received_count() + b.received_count()
    );
    anyhow::ensure!(
        a.received_count() > 0 && b.received_count() > 0,
        "one node served everything: n1 {}, n2 {}",
        a.received_count(),
        b.received_count()
    );
    Ok(())
}

/// A member that leaves (UNSUBSCRIBE or disconnect) takes no share with it: its node stops
/// being a candidate and the other members get every later message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_leaves_takes_no_share_with_it() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    cluster.wait_meshed().await?;
    let a = Client::connect(cluster.mqtt(0), "share-leave-a").await?;
    let b = Client::connect(cluster.mqtt(1), "share-leave-b").await?;
    a.subscribe(FILTER, QoS::AtLeastOnce).await?;
    b.subscribe(FILTER, QoS::AtLeastOnce).await?;
    knows(&cluster, 0, "n2", 1.0).await?;
    knows(&cluster, 1, "n1", 1.0).await?;
    b.client.unsubscribe(FILTER).await?;
    knows(&cluster, 0, "n2", 0.0).await?;

    let p = Client::connect(cluster.mqtt(1), "share-leave-p").await?;
    publish(&p, "m", 50).await?;
    wait_until(
        "every message reaches the member left",
        DEADLINE,
        || async { tally(&[&a]).len() == 50 },
    )
    .await?;
    anyhow::ensure!(b.received_count() == 0, "b got {}", b.received_count());
    Ok(())
}

/// Members on n1 and n2, publisher on n3; n2 dies: its share of later messages goes to n1's
/// member, not to the void.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_share_goes_to_the_others() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    cluster.wait_meshed().await?;
    let a = Client::connect(cluster.mqtt(0), "share-dead-a").await?;
    let b = Client::connect(cluster.mqtt(1), "share-dead-b").await?;
    a.subscribe(FILTER, QoS::AtLeastOnce).await?;
    b.subscribe(FILTER, QoS::AtLeastOnce).await?;
    knows(&cluster, 0, "n2", 1.0).await?;
    knows(&cluster, 1, "n1", 1.0).await?;
    let p = Client::connect(cluster.mqtt(2), "share-dead-p").await?;
    publish(&p, "before", 40).await?;
    wait_until("the first messages delivered", DEADLINE, || async {
        tally(&[&a, &b]).len() == 40
    })
    .await?;
    anyhow::ensure!(a.received_count() < 40, "n1 served all before the death");

    cluster.kill(1).await;
    knows(&cluster, 0, "n2", 0.0).await?;
    let before = a.received_count();
    publish(&p, "after", 50).await?;
    wait_until("n1's member gets every later message", DEADLINE, || async {
        a.received()
            .iter()
            .filter(|m| m.payload.starts_with(b"after"))
            .count()
            == 50
    })
    .await?;
    anyhow::ensure!(a.received_count() == before + 50);
    Ok(())
}

/// A peer's SHARE_GROUPS counts while its link lives; one over the bounds closes the link and
/// is counted, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_share_groups_count_while_its_link_lives_and_bad_ones_close_it(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let node = cluster
        .node(0)
        .ok_or_else(|| anyhow::anyhow!("node 0 is not running"))?;
    let rejected = || {
        metric(
            &node.metrics_text(),
            "mqlb_mesh_rejected_total",
            &[("reason", "malformed")],
        )
    };

    let mut good = cluster.raw_peer(0, "n7").await?;
    let groups = frame::Frame::ShareGroups {
        groups: vec!["g/share/t".into(), "h/a/#".into()],
    };
    good.write_all(&frame::encode(&groups)?).await?;
    knows(&cluster, 0, "n7", 2.0).await?;
    drop(good);
    knows(&cluster, 0, "n7", 0.0).await?;

    // 4097 groups: refused as the frame is read.
    let mut bad = cluster.raw_peer(0, "n8").await?;
    let mut body = BytesMut::new();
    body.extend_from_slice(&(1 + 4 + 4097 * 5u32).to_be_bytes());
    body.extend_from_slice(&[48]);
    body.extend_from_slice(&4097u32.to_be_bytes());
    for _ in 0..4097 {
        body.extend_from_slice(&3u16.to_be_bytes());
        body.extend_from_slice(b"g/t");
    }
    let before = rejected();
    bad.write_all(&body).await?;
    wait_until("the bad frame counted", DEADLINE, || async {
        rejected() > before
    })
    .await?;
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, bad.read_to_end(&mut sink)).await;
    anyhow::ensure!(closed.is_ok(), "the link stayed open");
    anyhow::ensure!(
        metric(&node.metrics_text(), "mqlb_share_groups", &[("node", "n8")]) == 0.0,
        "the bad list was taken"
    );
    Ok(())
}

/// A persistent member (3.1.1 Clean Session 0) that comes back is in its group again, on its
/// node and across the cluster: it takes its share, no more (before, the restored subscription
/// had lost its membership: such a member alone read the filter as a plain subscription).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_member_that_comes_back_takes_its_share_again() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    cluster.wait_meshed().await?;
    let connect = || async {
        let mut raw = Raw::<V4>::open(cluster.mqtt(0)).await?;
        raw.send(v4::Packet::Connect(connect4_session("share-back-a", false)))
            .await?;
        match raw.recv().await? {
            v4::Packet::ConnAck(ack) => Ok::<_, anyhow::Error>((raw, ack)),
            other => anyhow::bail!("expected a CONNACK, got {other:?}"),
        }
    };
    let (mut a, _) = connect().await?;
    a.subscribe(1, FILTER, QoS::AtLeastOnce).await?;
    a.disconnect().await?;
    knows(&cluster, 0, "n1", 0.0).await?;
    let (mut a, ack) = connect().await?;
    anyhow::ensure!(ack.session_present, "no session: {ack:?}");
    let b = Client::connect(cluster.mqtt(1), "share-back-b").await?;
    b.subscribe(FILTER, QoS::AtLeastOnce).await?;
    knows(&cluster, 1, "n1", 1.0).await?;
    knows(&cluster, 0, "n2", 1.0).await?;

    let p = Client::connect(cluster.mqtt(1), "share-back-p").await?;
    publish(&p, "m", 60).await?;
    let mut got = Vec::new();
    let start = std::time::Instant::now();
    // Bounded by the deadline: each turn waits at most 200 ms.
    while got.len() + b.received_count() < 60 && start.elapsed() < DEADLINE {
        match a.next(Duration::from_millis(200)).await? {
            Ok(v4::Packet::Publish(m)) => {
                a.send(v4::Packet::PubAck(v4::PubAck::new(m.pkid))).await?;
                got.push(m.payload.to_vec());
            }
            Ok(other) => anyhow::bail!("expected a PUBLISH, got {other:?}"),
            Err(Ended::Closed) => anyhow::bail!("the member was closed"),
            Err(Ended::Silent) => {}
        }
    }
    let mut all: Vec<Vec<u8>> = b.received().into_iter().map(|m| m.payload).collect();
    all.extend(got.iter().cloned());
    all.sort();
    all.dedup();
    anyhow::ensure!(
        all.len() == 60 && got.len() + b.received_count() == 60,
        "{} distinct of 60 in {} deliveries (back {}, b {})",
        all.len(),
        got.len() + b.received_count(),
        got.len(),
        b.received_count()
    );
    anyhow::ensure!(
        !got.is_empty() && b.received_count() > 0,
        "back {}, b {}",
        got.len(),
        b.received_count()
    );
    Ok(())
}

/// A member that joins on another node while a member here has a backlog (it acknowledges
/// nothing, so the router reads no further than its inflight window): the backlog is not left
/// to the new node, which never had those messages in its group. Before, its share of the
/// backlog was skipped here and lost (97 of 300).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_not_left_to_a_member_that_joined_after_it() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    cluster.wait_meshed().await?;
    let mut a = Raw::<V4>::open(cluster.mqtt(0)).await?;
    a.send(v4::Packet::Connect(connect4_session(
        "share-backlog-a",
        true,
    )))
    .await?;
    let _connack = a.recv().await?;
    a.subscribe(1, FILTER, QoS::AtLeastOnce).await?;
    let p = Client::connect(cluster.mqtt(0), "share-backlog-p").await?;
    publish(&p, "m", 300).await?;
    wait_until("every publish accepted", DEADLINE, || async {
        p.pubacks() == 300
    })
    .await?;
    let b = Client::connect(cluster.mqtt(1), "share-backlog-b").await?;
    b.subscribe(FILTER, QoS::AtLeastOnce).await?;
    knows(&cluster, 0, "n2", 1.0).await?;

    let mut got = Vec::new();
    let start = std::time::Instant::now();
    // Bounded by the deadline; ends when nothing came for 300 ms.
    while start.elapsed() < DEADLINE {
        match a.next(Duration::from_millis(300)).await? {
            Ok(v4::Packet::Publish(m)) => {
                a.send(v4::Packet::PubAck(v4::PubAck::new(m.pkid))).await?;
                got.push(m.payload.to_vec());
            }
            Ok(other) => anyhow::bail!("expected a PUBLISH, got {other:?}"),
            Err(Ended::Closed) => anyhow::bail!("the member was closed"),
            Err(Ended::Silent) => break,
        }
    }
    let mut all: Vec<Vec<u8>> = b.received().into_iter().map(|m| m.payload).collect();
    all.extend(got.iter().cloned());
    let deliveries = all.len();
    all.sort();
    all.dedup();
    anyhow::ensure!(
        all.len() == 300 && deliveries == 300,
        "{} distinct of 300 in {deliveries} deliveries (backlogged member {}, new member {})",
        all.len(),
        got.len(),
        b.received_count()
    );
    Ok(())
}
