//! The mesh hop is acknowledged for QoS >= 1 (issue 12): a QoS 1 message a node accepted
//! (PUBACK sent) reaches the peer that needs it even if the link between them loses what is
//! in flight and breaks; the receiver drops what it already delivered.
//!
//! The link from n1 to n2 runs through a proxy in this test that can swallow bytes (a
//! partition: n1's writes succeed, nothing arrives) and then cut the connection, so the loss
//! is certain, not a race.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mqlb_tests::{free_port, loopback, metric, wait_until, Client, QoS, TEST_SECRET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(20);

/// A TCP proxy for one mesh link: forwards both ways, or swallows both ways, and can close
/// every connection it carries.
struct Proxy {
    addr: SocketAddr,
    swallow: Arc<AtomicBool>,
    /// Bytes swallowed from the sender (the node that connects to the proxy).
    swallowed: Arc<AtomicU64>,
    /// Bumped to close every connection open at that moment.
    cut: watch::Sender<u64>,
    connections: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(to: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind(loopback(0)).await?;
        let addr = listener.local_addr()?;
        let swallow = Arc::new(AtomicBool::new(false));
        let swallowed = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (cut, cut_rx) = watch::channel(0u64);
        let (sw, swd, conns) = (swallow.clone(), swallowed.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((from, _)) = listener.accept().await {
                let Ok(to) = TcpStream::connect(to).await else {
                    continue;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let (fr, fw) = from.into_split();
                let (tr, tw) = to.into_split();
                let mut cut = cut_rx.clone();
                cut.borrow_and_update();
                let (sw, swd) = (sw.clone(), swd.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = pump(fr, tw, sw.clone(), Some(swd)) => {}
                        _ = pump(tr, fw, sw, None) => {}
                        _ = cut.changed() => {}
                    }
                    // dropping both halves of both sockets closes the link
                });
            }
        });
        Ok(Proxy {
            addr,
            swallow,
            swallowed,
            cut,
            connections,
        })
    }

    fn swallow(&self, on: bool) {
        self.swallow.store(on, Ordering::SeqCst);
    }

    fn swallowed(&self) -> u64 {
        self.swallowed.load(Ordering::SeqCst)
    }

    fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    swallow: Arc<AtomicBool>,
    swallowed: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if swallow.load(Ordering::SeqCst) {
            if let Some(s) = &swallowed {
                s.fetch_add(n as u64, Ordering::SeqCst);
            }
            continue;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn node(id: &str) -> anyhow::Result<mqlb_config::BrokerNode> {
    let n = |v| std::num::NonZeroU32::new(v).context("non-zero");
    Ok(mqlb_config::BrokerNode {
        id: id.into(),
        mqtt: loopback(free_port()?),
        mqtt_v5: Some(loopback(free_port()?)),
        mesh: Some(loopback(free_port()?)),
        http: Some(loopback(free_port()?)),
        http_token: None,
        max_connections: n(1000)?,
        max_payload_size: n(1 << 20)?,
        max_inflight: n(100)?,
        backlog: n(1024)?,
    })
}

fn spec(node: &mqlb_config::BrokerNode, peers: Vec<(String, SocketAddr)>) -> mqlb_broker::NodeSpec {
    mqlb_broker::NodeSpec {
        node: node.clone(),
        peers,
        mesh: Some(mqlb_broker::MeshSettings {
            secret: mqlb_config::Secret::new(TEST_SECRET),
            peer_queue: 10_000,
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(200),
            max_payload: 1 << 20,
            replicate_sessions: true,
            replica_max_messages: 100_000,
        }),
        ha: Vec::new(),
        heartbeat_interval: Duration::from_millis(200),
        auth: mqlb_config::AuthSettings::default(),
    }
}

/// n1 and n2, n1's link to n2 through a proxy (n2's to n1 direct).
async fn two_nodes_with_proxy() -> anyhow::Result<(mqlb_broker::Node, mqlb_broker::Node, Proxy)> {
    let mut last = None;
    // A port picked free may be taken before a node binds it: try again with new ports.
    for _ in 0..3 {
        let (a, b) = (node("n1")?, node("n2")?);
        let (a_mesh, b_mesh) = (a.mesh.context("mesh")?, b.mesh.context("mesh")?);
        let proxy = Proxy::start(b_mesh).await?;
        let n2 = match mqlb_broker::Node::start(spec(&b, vec![("n1".into(), a_mesh)])).await {
            Ok(n) => n,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let n1 = match mqlb_broker::Node::start(spec(&a, vec![("n2".into(), proxy.addr)])).await {
            Ok(n) => n,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        wait_until("mesh links up", DEADLINE, || async {
            n1.links().iter().all(|l| l.1) && n2.links().iter().all(|l| l.1)
        })
        .await?;
        return Ok((n1, n2, proxy));
    }
    Err(anyhow::anyhow!("nodes did not start: {last:?}"))
}

/// Payloads are `seq` padded to 32 bytes.
fn payload(seq: usize) -> Vec<u8> {
    format!("{seq:032}").into_bytes()
}

/// How many times each sequence number arrived.
fn tally(sub: &Client) -> BTreeMap<usize, usize> {
    let mut t = BTreeMap::new();
    for m in sub.received() {
        if let Some(seq) = std::str::from_utf8(&m.payload)
            .ok()
            .and_then(|s| s.parse().ok())
        {
            *t.entry(seq).or_insert(0) += 1;
        }
    }
    t
}

/// QoS 1 messages n1 acknowledged while its link to n2 swallowed everything, then broke,
/// reach n2's subscriber after the link is back: every one, duplicates allowed and counted.
/// (Before issue 12 the hop was fire-and-forget: the swallowed ones were lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_survive_a_broken_link() -> anyhow::Result<()> {
    let (n1, n2, proxy) = two_nodes_with_proxy().await?;
    let sub = Client::connect(n2.mqtt, "md-sub").await?;
    sub.subscribe("md/seq", QoS::AtLeastOnce).await?;
    let publisher = Client::connect(n1.mqtt, "md-pub").await?;
    let (before, during, after) = (50, 100, 50);
    let total = before + during + after;

    // the link works
    for seq in 0..before {
        publisher.publish_qos1("md/seq", &payload(seq)).await?;
    }
    wait_until("the first messages at n2", DEADLINE, || async {
        tally(&sub).len() >= before
    })
    .await?;

    // the link swallows: n1 accepts (PUBACK) and writes each message into the link, n2
    // gets none of them, nor n1 any acknowledgement
    proxy.swallow(true);
    let swallowed_before = proxy.swallowed();
    for seq in before..before + during {
        publisher.publish_qos1("md/seq", &payload(seq)).await?;
    }
    wait_until("n1 to acknowledge every publish", DEADLINE, || async {
        publisher.pubacks() >= before + during
    })
    .await?;
    // A frame is at least len, kind, flags, topic length, topic, properties length, payload.
    let frame = (4 + 1 + 1 + 2 + "md/seq".len() + 4 + 32) as u64;
    wait_until("n1 to write them all into the link", DEADLINE, || async {
        proxy.swallowed() - swallowed_before >= during as u64 * frame
    })
    .await?;
    assert_eq!(
        tally(&sub).len(),
        before,
        "nothing passed the swallowing link"
    );

    // the link breaks and comes back
    let links = proxy.connections();
    proxy.cut();
    proxy.swallow(false);
    wait_until("n1's link to n2 again", DEADLINE, || async {
        proxy.connections() > links && n1.links().iter().all(|l| l.1)
    })
    .await?;
    for seq in before + during..total {
        publisher.publish_qos1("md/seq", &payload(seq)).await?;
    }

    let arrived = wait_until("every message at n2", DEADLINE, || async {
        tally(&sub).len() >= total
    })
    .await;
    let t = tally(&sub);
    let missing: Vec<usize> = (0..total).filter(|s| !t.contains_key(s)).collect();
    let duplicates: usize = t.values().map(|n| n - 1).sum();
    let (m1, m2) = (n1.metrics_text(), n2.metrics_text());
    let peer = |p| [("peer", p)];
    eprintln!(
        "{} of {total} arrived, {} missing, {duplicates} duplicates; n1 resent {}, \
         unacked_full {}; n2 dropped {} duplicates",
        t.len(),
        missing.len(),
        metric(&m1, "mqlb_mesh_resent_total", &peer("n2")),
        metric(
            &m1,
            "mqlb_mesh_dropped_total",
            &[("peer", "n2"), ("reason", "unacked_full")]
        ),
        metric(&m2, "mqlb_mesh_duplicates_total", &peer("n1")),
    );
    anyhow::ensure!(
        missing.is_empty(),
        "lost {} of {total} QoS 1 messages across the broken link: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    arrived?;
    // what n1 sent again was what the link swallowed, at least
    anyhow::ensure!(metric(&m1, "mqlb_mesh_resent_total", &peer("n2")) >= during as f64);
    anyhow::ensure!(
        metric(
            &m1,
            "mqlb_mesh_dropped_total",
            &[("peer", "n2"), ("reason", "unacked_full")]
        ) == 0.0
    );
    // and once n2 acknowledged everything, n1 keeps nothing
    wait_until("n1 to keep nothing for n2", DEADLINE, || async {
        metric(&n1.metrics_text(), "mqlb_mesh_unacked", &peer("n2")) == 0.0
    })
    .await?;
    Ok(())
}
