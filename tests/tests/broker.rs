//! The broker cluster end to end: in-process rumqttd nodes on ephemeral loopback ports, meshed,
//! with real MQTT clients (rumqttc) on different nodes.

use std::collections::BTreeSet;
use std::time::Duration;

use mqlb_tests::{free_port, metric, mqlb_bin, wait_until, Client, Client5, Cluster, QoS, TempDir};

const DEADLINE: Duration = Duration::from_secs(20);

/// Waits until `sub` got `n` messages, then checks they are exactly payloads `0..n`, once each.
async fn expect_exactly(sub: &Client, n: usize, what: &str) -> anyhow::Result<()> {
    let got = wait_until(
        &format!("{what}: {n} messages at {}", sub.id),
        DEADLINE,
        || async { sub.received_count() >= n },
    )
    .await;
    let msgs = sub.received();
    got.map_err(|e| anyhow::anyhow!("{e}; got {}", msgs.len()))?;
    let seqs: Vec<usize> = msgs
        .iter()
        .filter_map(|m| std::str::from_utf8(&m.payload).ok()?.parse().ok())
        .collect();
    let unique: BTreeSet<usize> = seqs.iter().copied().collect();
    anyhow::ensure!(
        seqs.len() == n,
        "{what}: {} got {} messages, want {n}",
        sub.id,
        seqs.len()
    );
    anyhow::ensure!(
        unique == (0..n).collect(),
        "{what}: {} got a wrong set",
        sub.id
    );
    Ok(())
}

/// Subscribers on every node, one publisher on node `from`: everyone gets every message once.
async fn fan_out(cluster: &Cluster, from: usize, topic: &str, n: usize) -> anyhow::Result<()> {
    let mut subs = Vec::new();
    for i in 0..cluster.len() {
        let s = Client::connect(
            cluster.mqtt(i),
            &format!("sub-{}-{i}", topic.replace('/', "-")),
        )
        .await?;
        s.subscribe(topic, QoS::AtLeastOnce).await?;
        subs.push(s);
    }
    let publisher = Client::connect(
        cluster.mqtt(from),
        &format!("pub-{}", topic.replace('/', "-")),
    )
    .await?;
    for seq in 0..n {
        publisher
            .publish_qos1(topic, seq.to_string().as_bytes())
            .await?;
    }
    wait_until("all publishes acked", DEADLINE, || async {
        publisher.pubacks() >= n
    })
    .await?;
    for s in &subs {
        expect_exactly(s, n, topic).await?;
    }
    // Every peer link carried each message once; nothing arrived twice after the fact.
    let sender = cluster
        .node(from)
        .ok_or_else(|| anyhow::anyhow!("node {from} not running"))?;
    wait_until("forwarded counted", DEADLINE, || async {
        metric(&sender.metrics_text(), "mqlb_mesh_forwarded_total", &[])
            >= ((cluster.len() - 1) * n) as f64
    })
    .await?;
    for s in &subs {
        anyhow::ensure!(
            s.received_count() == n,
            "{} got duplicates: {}",
            s.id,
            s.received_count()
        );
    }
    for s in subs {
        s.disconnect().await;
    }
    publisher.disconnect().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_every_subscriber_gets_every_message_exactly_once() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    fan_out(&cluster, 0, "fleet/a", 1000).await?;
    fan_out(&cluster, 2, "fleet/b", 1000).await?;
    for i in 0..3 {
        let m = cluster
            .node(i)
            .map(|n| n.metrics_text())
            .unwrap_or_default();
        assert_eq!(
            metric(&m, "mqlb_mesh_dropped_total", &[]),
            0.0,
            "node {i} dropped"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_five_node_clusters() -> anyhow::Result<()> {
    let two = Cluster::start(2).await?;
    fan_out(&two, 1, "pair", 300).await?;
    drop(two);
    let five = Cluster::start(5).await?;
    fan_out(&five, 3, "five", 300).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_retained_and_mqtt5_across_nodes() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let plus = Client::connect(cluster.mqtt(1), "plus").await?;
    plus.subscribe("site/+/temp", QoS::AtLeastOnce).await?;
    let hash = Client::connect(cluster.mqtt(2), "hash").await?;
    hash.subscribe("site/#", QoS::AtMostOnce).await?;
    let p = Client::connect(cluster.mqtt(0), "site-pub").await?;
    for (topic, body) in [
        ("site/a/temp", "1"),
        ("site/b/hum", "2"),
        ("site/c/temp", "3"),
        ("other/x", "4"),
    ] {
        p.publish_qos1(topic, body.as_bytes()).await?;
    }
    wait_until("wildcard deliveries", DEADLINE, || async {
        plus.received_count() >= 2 && hash.received_count() >= 3
    })
    .await?;
    let topics = |c: &Client| {
        c.received()
            .into_iter()
            .map(|m| m.topic)
            .collect::<Vec<_>>()
    };
    assert_eq!(topics(&plus), vec!["site/a/temp", "site/c/temp"]);
    assert_eq!(
        topics(&hash),
        vec!["site/a/temp", "site/b/hum", "site/c/temp"]
    );

    // Retained on node 1, new subscriber on node 3 gets it with the retain flag.
    p.client
        .publish("config/device-7", QoS::AtLeastOnce, true, b"v42".to_vec())
        .await?;
    wait_until("retained publish acked", DEADLINE, || async {
        p.pubacks() >= 5
    })
    .await?;
    let late = Client::connect(cluster.mqtt(2), "late").await?;
    let found = wait_until("retained message on another node", DEADLINE, || async {
        late.subscribe("config/#", QoS::AtLeastOnce).await.is_ok()
            && late.received().iter().any(|m| m.topic == "config/device-7")
    })
    .await;
    let msgs = late.received();
    found.map_err(|e| anyhow::anyhow!("{e}: {msgs:?}"))?;
    let m = msgs
        .iter()
        .find(|m| m.topic == "config/device-7")
        .ok_or_else(|| anyhow::anyhow!("missing"))?;
    assert_eq!((m.payload.as_slice(), m.retain), (&b"v42"[..], true));

    // MQTT 5 on one node, 3.1.1 and 5 on the others: payload everywhere, user properties
    // wherever the subscriber speaks 5.
    let v5_addr = |i: usize| {
        cluster
            .mqtt_v5(i)
            .ok_or_else(|| anyhow::anyhow!("no v5 port"))
    };
    let v5_sub = Client5::connect(v5_addr(2)?, "v5-sub").await?;
    v5_sub.subscribe("v5/#").await?;
    let v4_sub = Client::connect(cluster.mqtt(1), "v4-sub").await?;
    v4_sub.subscribe("v5/#", QoS::AtLeastOnce).await?;
    // Same node as the MQTT 5 publisher: rumqttd's own 3.1.1 codec would panic on the
    // properties; the node strips them for 3.1.1 clients.
    let v4_same = Client::connect(cluster.mqtt(0), "v4-same-node").await?;
    v4_same.subscribe("v5/#", QoS::AtLeastOnce).await?;
    let v5_pub = Client5::connect(v5_addr(0)?, "v5-pub").await?;
    v5_pub
        .publish(
            "v5/hello",
            b"five",
            &[("origin", "sensor-9"), ("unit", "C")],
        )
        .await?;
    wait_until("MQTT 5 publish on both other nodes", DEADLINE, || async {
        !v5_sub.received().is_empty()
            && v4_sub.received_count() >= 1
            && v4_same.received_count() >= 1
    })
    .await?;
    let got = &v5_sub.received()[0];
    assert_eq!(got.payload, b"five");
    assert_eq!(
        got.user_properties,
        vec![
            ("origin".to_string(), "sensor-9".to_string()),
            ("unit".to_string(), "C".to_string())
        ]
    );
    assert_eq!(v4_sub.received()[0].payload, b"five");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_rejoins_and_its_subscribers_receive_again() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let sub1 = Client::connect(cluster.mqtt(1), "survivor").await?;
    sub1.subscribe("alive/#", QoS::AtLeastOnce).await?;
    cluster.kill(2).await;
    // The others keep serving each other while node 3 is gone.
    let p = Client::connect(cluster.mqtt(0), "pub-during").await?;
    for seq in 0..50 {
        p.publish_qos1("alive/during", seq.to_string().as_bytes())
            .await?;
    }
    expect_exactly(&sub1, 50, "while a node is down").await?;
    wait_until("link to the dead node reported down", DEADLINE, || async {
        cluster
            .node(0)
            .is_some_and(|n| n.links().iter().any(|(id, up)| id == "n3" && !up))
    })
    .await?;

    cluster.restart(2).await?;
    cluster.wait_meshed().await?;
    let sub3 = Client::connect(cluster.mqtt(2), "returner").await?;
    sub3.subscribe("alive/#", QoS::AtLeastOnce).await?;
    for seq in 0..50 {
        p.publish_qos1("alive/after", seq.to_string().as_bytes())
            .await?;
    }
    expect_exactly(&sub3, 50, "after the restart").await?;
    // And the restarted node's own publishes reach the others.
    let p3 = Client::connect(cluster.mqtt(2), "pub-restarted").await?;
    p3.publish_qos1("alive/from-n3", b"hello").await?;
    wait_until("publish from the restarted node", DEADLINE, || async {
        sub1.received().iter().any(|m| m.topic == "alive/from-n3")
    })
    .await?;
    Ok(())
}

/// rumqttd 0.20 panics and poisons the listener when a refused client ID connects twice
/// (rumqtt #1062); the node refuses such IDs before rumqttd sees them, and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_client_ids_cannot_take_a_node_down() -> anyhow::Result<()> {
    use mqlb_mqtt::{encode_connect, ConnectOptions};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(1).await?;
    for round in 0..3 {
        for id in ["bad/id", "bad+id", "$bad"] {
            let mut s = tokio::net::TcpStream::connect(cluster.mqtt(0)).await?;
            s.write_all(&encode_connect(&ConnectOptions {
                client_id: id.into(),
                ..Default::default()
            }))
            .await?;
            let mut buf = Vec::new();
            let n = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf)).await??;
            assert_eq!(
                n, 0,
                "round {round}: {id} must be closed without a CONNACK, got {buf:?}"
            );
        }
    }
    let good = Client::connect(cluster.mqtt(0), "still-welcome").await?;
    good.subscribe("ok", QoS::AtLeastOnce).await?;
    good.publish_qos1("ok", b"0").await?;
    expect_exactly(&good, 1, "after refused IDs").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_wrong_secret_peers_are_refused_and_the_mesh_keeps_working(
) -> anyhow::Result<()> {
    use bytes::BytesMut;
    use mqlb_broker::mesh::{auth, frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(2).await?;
    let mesh = cluster.specs[0]
        .node
        .mesh
        .ok_or_else(|| anyhow::anyhow!("no mesh address"))?;
    let rejected = |reason: &str| {
        metric(
            &cluster
                .node(0)
                .map(|n| n.metrics_text())
                .unwrap_or_default(),
            "mqlb_mesh_rejected_total",
            &[("reason", reason)],
        )
    };

    // Not a peer at all: an HTTP request.
    let mut s = tokio::net::TcpStream::connect(mesh).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let mut sink = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut sink)).await??;
    wait_until("garbage counted", DEADLINE, || async {
        rejected("too_large") >= 1.0
    })
    .await?;

    // A peer with the wrong secret: a correct handshake, a wrong MAC, then a publish.
    let watcher = Client::connect(cluster.mqtt(0), "watcher").await?;
    watcher.subscribe("forged/#", QoS::AtLeastOnce).await?;
    let mut s = tokio::net::TcpStream::connect(mesh).await?;
    // Each side sends its HELLO at once, as nodes do (the accepting node reads the first
    // bytes before it answers: TLS or not).
    let hello = frame::Frame::Hello {
        version: frame::VERSION,
        node_id: "intruder".into(),
        nonce: auth::nonce(),
    };
    s.write_all(&frame::encode(&hello)?).await?;
    let mut buf = BytesMut::new();
    let their_nonce = loop {
        if let Some(f) = frame::decode(&mut buf, 1024)? {
            match f {
                frame::Frame::Hello { nonce, .. } => break nonce,
                other => anyhow::bail!("expected HELLO, got {other:?}"),
            }
        }
        anyhow::ensure!(s.read_buf(&mut buf).await? > 0, "closed before HELLO");
    };
    let mac = auth::mac(b"not-the-cluster-secret", &their_nonce, "intruder");
    s.write_all(&frame::encode(&frame::Frame::Auth { mac })?)
        .await?;
    // A publish it would like injected: must never arrive.
    let sneaky = frame::MeshPublish {
        topic: bytes::Bytes::from_static(b"forged/t"),
        payload: bytes::Bytes::from_static(b"forged"),
        ..Default::default()
    };
    if let Err(e) = s
        .write_all(&frame::encode(&frame::Frame::Publish(sneaky))?)
        .await
    {
        eprintln!("write after refusal: {e}");
    }
    wait_until("wrong secret refused", DEADLINE, || async {
        rejected("auth") >= 1.0
    })
    .await?;

    // The real mesh still carries messages (sent after the forged one), and the forged one
    // never showed up.
    fan_out(&cluster, 1, "mesh/t", 100).await?;
    assert_eq!(watcher.received_count(), 0, "forged publish was injected");
    let m = cluster
        .node(0)
        .map(|n| n.metrics_text())
        .unwrap_or_default();
    assert_eq!(
        metric(&m, "mqlb_mesh_received_total", &[("peer", "intruder")]),
        0.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_will_reaches_subscribers_on_every_node() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let mut subs = Vec::new();
    for i in 0..3 {
        let s = Client::connect(cluster.mqtt(i), &format!("will-watch-{i}")).await?;
        s.subscribe("wills/#", QoS::AtLeastOnce).await?;
        subs.push(s);
    }
    // A clean DISCONNECT sends no will anywhere.
    let polite =
        Client::connect_with_will(cluster.mqtt(0), "polite", Some(("wills/polite", b"gone")))
            .await?;
    polite.disconnect().await;
    // Dropped without DISCONNECT (a device losing power): the will fires on every node.
    let doomed =
        Client::connect_with_will(cluster.mqtt(0), "doomed", Some(("wills/doomed", b"lost")))
            .await?;
    drop(doomed);
    for s in &subs {
        wait_until(&format!("will at {}", s.id), DEADLINE, || async {
            s.received_count() >= 1
        })
        .await?;
    }
    // A later message proves the links are flowing; still exactly one will each.
    let p = Client::connect(cluster.mqtt(0), "after-will").await?;
    p.publish_qos1("wills/marker", b"end").await?;
    for s in &subs {
        wait_until("marker", DEADLINE, || async { s.received_count() >= 2 }).await?;
        let topics: Vec<String> = s.received().into_iter().map(|m| m.topic).collect();
        assert_eq!(topics, vec!["wills/doomed", "wills/marker"], "{}", s.id);
    }
    Ok(())
}

/// A peer that completes the handshake and then never reads: the node keeps serving its own
/// clients at full speed, and what the peer cannot take is dropped and counted. The link to it
/// is cut after about 3 s without progress (the mesh's `TCP_USER_TIMEOUT`, which also finds a
/// partition) and dialed again, no faster than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_peer_cannot_stall_the_node() -> anyhow::Result<()> {
    use bytes::BytesMut;
    use mqlb_broker::mesh::{auth, frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let fake_addr = fake.local_addr()?;
    let held = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = fake.accept().await {
            let mut buf = BytesMut::new();
            let nonce = auth::nonce();
            let hello = frame::Frame::Hello {
                version: frame::VERSION,
                node_id: "stuck".into(),
                nonce,
            };
            if s.write_all(&frame::encode(&hello).unwrap_or_default())
                .await
                .is_err()
            {
                continue;
            }
            let mut peer_nonce = None;
            while peer_nonce.is_none() {
                if let Ok(Some(frame::Frame::Hello { nonce, .. })) = frame::decode(&mut buf, 1024) {
                    peer_nonce = Some(nonce);
                } else if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    break;
                }
            }
            let Some(pn) = peer_nonce else { continue };
            let mac = auth::mac(mqlb_tests::TEST_SECRET.as_bytes(), &pn, "stuck");
            if s.write_all(&frame::encode(&frame::Frame::Auth { mac }).unwrap_or_default())
                .await
                .is_ok()
            {
                keep.lock().await.push(s); // never read again
            }
        }
    });
    let mut cluster_spec = Cluster::start(1).await?.specs.remove(0);
    // Restart that node's spec with the stalled peer and a small queue.
    cluster_spec.peers = vec![("stuck".into(), fake_addr)];
    if let Some(m) = cluster_spec.mesh.as_mut() {
        m.peer_queue = 100;
    }
    let node = {
        let mut last = None;
        let mut started = None;
        for _ in 0..50 {
            match mqlb_broker::Node::start(cluster_spec.clone()).await {
                Ok(n) => {
                    started = Some(n);
                    break;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        started.ok_or_else(|| anyhow::anyhow!("node did not start: {last:?}"))?
    };
    wait_until("link to the stalled peer up", DEADLINE, || async {
        node.links().iter().any(|(id, up)| id == "stuck" && *up)
    })
    .await?;
    let sub = Client::connect(node.mqtt, "local-sub").await?;
    sub.subscribe("bulk", QoS::AtLeastOnce).await?;
    let p = Client::connect(node.mqtt, "local-pub").await?;
    let started = std::time::Instant::now();
    let body = vec![b'x'; 4096];
    let n = 3000;
    for i in 0..n {
        let mut payload = i.to_string().into_bytes();
        payload.push(b' ');
        payload.extend_from_slice(&body);
        p.publish_qos1("bulk", &payload).await?;
    }
    wait_until("local subscriber got everything", DEADLINE, || async {
        sub.received_count() >= n
    })
    .await?;
    let m = node.metrics_text();
    let dropped = metric(
        &m,
        "mqlb_mesh_dropped_total",
        &[("peer", "stuck"), ("reason", "queue_full")],
    );
    let forwarded = metric(&m, "mqlb_mesh_forwarded_total", &[("peer", "stuck")]);
    eprintln!("stalled peer: forwarded {forwarded}, dropped {dropped} of {n}");
    assert!(
        dropped > 0.0,
        "the stalled peer's queue must overflow and be counted"
    );
    let links = held.lock().await.len();
    let bound = 2 + usize::try_from(started.elapsed().as_secs() / 3).unwrap_or(usize::MAX);
    assert!(
        (1..=bound).contains(&links),
        "{links} links to the stalled peer in {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_and_qos2_publishes_cross_nodes_too() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let sub = Client::connect(cluster.mqtt(1), "qos-sub").await?;
    sub.subscribe("qos/#", QoS::ExactlyOnce).await?;
    let p = Client::connect(cluster.mqtt(0), "qos-pub").await?;
    for seq in 0..100 {
        p.client
            .publish(
                "qos/2",
                QoS::ExactlyOnce,
                false,
                seq.to_string().into_bytes(),
            )
            .await?;
    }
    expect_exactly(&sub, 100, "QoS 2 across nodes").await?;
    for seq in 0..100 {
        p.client
            .publish(
                "qos/0",
                QoS::AtMostOnce,
                false,
                seq.to_string().into_bytes(),
            )
            .await?;
    }
    // QoS 0 may be dropped by design, but on an idle loopback none are.
    wait_until("QoS 0 across nodes", DEADLINE, || async {
        sub.received_count() >= 200
    })
    .await?;
    let qos0: BTreeSet<String> = sub
        .received()
        .into_iter()
        .filter(|m| m.topic == "qos/0")
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(qos0.len(), 100);
    assert_eq!(sub.received_count(), 200, "no duplicates");
    Ok(())
}

/// rumqttd 0.20 poisons a listener when a client that hung up before its CONNACK connects
/// again with the same ID (rumqtt #1062); mqlb builds a patched rumqttd (vendor/rumqttd). The
/// same client ID hanging up twice leaves the listener answering at once, with no help from the
/// watchdog (which would replace a poisoned listener within ~2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_before_its_connack_does_not_poison_the_listener() -> anyhow::Result<()>
{
    use mqlb_mqtt::{encode_connect, ConnectOptions};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(1).await?;
    let addr = cluster.mqtt(0);
    let node = cluster.node(0).ok_or_else(|| anyhow::anyhow!("no node"))?;
    let connect = encode_connect(&ConnectOptions {
        client_id: "flaky-device".into(),
        ..Default::default()
    });
    // Hang up with a reset right after CONNECT, three times with the same ID.
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(&connect).await?;
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
        drop(s);
    }
    // The same ID, and then a new one, get their CONNACK at once (one try each, no waiting
    // for the watchdog).
    for id in ["flaky-device", "after-attack"] {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(&encode_connect(&ConnectOptions {
            client_id: id.into(),
            ..Default::default()
        }))
        .await?;
        let mut ack = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut ack)).await??;
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "{id}: CONNACK accepted");
    }
    let restarts = metric(
        &node.metrics_text(),
        "mqlb_broker_listener_restarts_total",
        &[],
    );
    assert_eq!(restarts, 0.0, "the listener never had to be replaced");
    Ok(())
}

/// Issue 14, item 7: an idle node is quiet at `RUST_LOG=info` too. Its own once-a-second
/// listener self-checks (a CONNECT to each of its two listeners) used to log eight lines a
/// second, half of them ERROR. Runs `mqlb broker` for four watchdog periods and counts.
#[test]
fn an_idle_node_logs_next_to_nothing_at_info() -> anyhow::Result<()> {
    use std::io::BufRead;
    use std::time::Instant;

    let dir = TempDir::new("quiet-node")?;
    let cfg = dir.path().join("mqlb.toml");
    std::fs::write(
        &cfg,
        format!(
            "[cluster]\nsecret = \"mqlb-test-secret-not-the-example\"\n\
             [[broker]]\nid = \"q1\"\nmqtt = \"127.0.0.1:{}\"\nmqtt_v5 = \"127.0.0.1:{}\"\n\
             mesh = \"127.0.0.1:{}\"\n",
            free_port()?,
            free_port()?,
            free_port()?
        ),
    )?;
    let mut child = std::process::Command::new(mqlb_bin()?)
        .args(["broker", "--id", "q1", "-c"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let result = (|| -> anyhow::Result<()> {
        // Started: from here on it is idle.
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines.recv_timeout(left)?;
            if line.contains("broker node started") {
                break;
            }
        }
        const WINDOW: Duration = Duration::from_secs(4);
        let end = Instant::now() + WINDOW;
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match lines.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                Err(e) => anyhow::bail!("the node's stderr closed: {e}"),
            }
        }
        let count = |level: &str| seen.iter().filter(|l| l.contains(level)).count();
        eprintln!(
            "idle node, {WINDOW:?} at RUST_LOG=info: {} lines ({} ERROR, {} WARN, {} INFO)",
            seen.len(),
            count(" ERROR "),
            count(" WARN "),
            count(" INFO ")
        );
        for l in seen.iter().take(12) {
            eprintln!("  {l}");
        }
        anyhow::ensure!(count(" ERROR ") == 0, "ERROR lines from an idle node");
        anyhow::ensure!(seen.len() <= 2, "{} lines from an idle node", seen.len());
        Ok(())
    })();
    if let Err(e) = child.kill() {
        eprintln!("killing the node: {e}");
    }
    child.wait()?;
    result
}

/// Prometheus 3 refuses by default a scrape whose answer has no Content-Type; the node's
/// `/metrics` sent none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_with_the_prometheus_text_content_type() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(1).await?;
    let http = cluster.specs[0]
        .node
        .http
        .ok_or_else(|| anyhow::anyhow!("no http endpoint"))?;
    let mut s = tokio::net::TcpStream::connect(http).await?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    let head = answer.split("\r\n\r\n").next().unwrap_or_default();
    anyhow::ensure!(head.starts_with("http/1.1 200"), "{head}");
    anyhow::ensure!(
        head.lines()
            .any(|l| l.starts_with("content-type: text/plain; version=0.0.4")),
        "no Prometheus text Content-Type: {head}"
    );
    Ok(())
}
