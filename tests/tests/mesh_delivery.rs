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
        max_queued_messages: n(1000)?,
        backlog: n(1024)?,
        mqtts: None,
        mqtts_v5: None,
        tls: None,
        accept_proxy: Vec::new(),
        handshake_timeout: Duration::from_secs(10),
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
            replication_factor: 2,
            source: None,
            tls: None,
        }),
        ha: Vec::new(),
        heartbeat_interval: Duration::from_millis(200),
        auth: mqlb_config::AuthSettings::default(),
        durable_retained: false,
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

/// Broker nodes as `mqlb broker` processes (b1..bn, one mesh), each killable (SIGKILL) and
/// pausable (SIGSTOP) like a failing machine.
struct Processes {
    _dir: mqlb_tests::TempDir,
    nodes: Vec<(mqlb_config::BrokerNode, Option<mqlb_tests::KillOnDrop>)>,
}

impl Processes {
    async fn start(n: usize) -> anyhow::Result<Processes> {
        let mut last = None;
        // A port picked free may be taken before a node binds it: try again with new ports.
        for _ in 0..3 {
            match Self::try_start(n).await {
                Ok(p) => return Ok(p),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("brokers did not start")))
    }

    async fn try_start(n: usize) -> anyhow::Result<Processes> {
        let dir = mqlb_tests::TempDir::new("mesh-delivery")?;
        let nodes = (1..=n)
            .map(|i| node(&format!("b{i}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut toml = format!(
            "[cluster]\nsecret = \"{TEST_SECRET}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n"
        );
        for b in &nodes {
            toml += &format!(
                "[[broker]]\nid = \"{}\"\nmqtt = \"{}\"\nmesh = \"{}\"\nhttp = \"{}\"\n",
                b.id,
                b.mqtt,
                b.mesh.context("mesh")?,
                b.http.context("http")?
            );
        }
        let file = dir.path().join("mqlb.toml");
        std::fs::write(&file, toml)?;
        let mut p = Processes {
            _dir: dir,
            nodes: Vec::new(),
        };
        for b in nodes {
            let mut child = mqlb_tests::KillOnDrop(
                std::process::Command::new(mqlb_tests::mqlb_bin()?)
                    .args(["broker", "--id", &b.id, "-c"])
                    .arg(&file)
                    .env("RUST_LOG", "error,rumqttd=off")
                    .stdout(std::process::Stdio::null())
                    .spawn()?,
            );
            mqlb_tests::wait_listening(b.mqtt, &mut child.0, DEADLINE).await?;
            p.nodes.push((b, Some(child)));
        }
        for i in 0..n {
            wait_until("every mesh link up", DEADLINE, || async {
                let text = p.metrics(i).await.unwrap_or_default();
                (0..n)
                    .filter(|j| *j != i)
                    .all(|j| metric(&text, "mqlb_mesh_link_up", &[("peer", p.id(j))]) == 1.0)
            })
            .await?;
        }
        Ok(p)
    }

    fn id(&self, i: usize) -> &str {
        &self.nodes[i].0.id
    }

    fn mqtt(&self, i: usize) -> SocketAddr {
        self.nodes[i].0.mqtt
    }

    async fn metrics(&self, i: usize) -> anyhow::Result<String> {
        let http = self.nodes[i].0.http.context("http")?;
        Ok(mqlb_tests::http(http, "GET", "/metrics").await?.1)
    }

    /// SIGKILL and reap node `i`.
    fn kill(&mut self, i: usize) {
        drop(self.nodes[i].1.take());
    }

    /// `kill -STOP` / `-CONT` of node `i`.
    fn signal(&self, i: usize, sig: &str) -> anyhow::Result<()> {
        let child = self.nodes[i].1.as_ref().context("not running")?;
        let ok = std::process::Command::new("kill")
            .args([sig, &child.0.id().to_string()])
            .status()?
            .success();
        anyhow::ensure!(ok, "kill {sig} {}", self.id(i));
        if sig == "-STOP" {
            // kill(1) returns once the signal is sent: the node may run on for a moment. Wait
            // (bounded) until every thread of it is stopped, so nothing it does is seen after.
            let pid = child.0.id();
            let stopped = || {
                let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                    return false;
                };
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                        // the state follows the command name's closing parenthesis
                        stat.rsplit_once(')').is_some_and(|(_, rest)| {
                            matches!(rest.trim_start().chars().next(), Some('T' | 't'))
                        })
                    })
                })
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !stopped() {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "{} did not stop",
                    self.id(i)
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        Ok(())
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        // A paused node must be resumed to die promptly.
        for i in 0..self.nodes.len() {
            if self.nodes[i].1.is_some() {
                let _ = self.signal(i, "-CONT");
            }
        }
    }
}

/// Adds `n` to a set shared with a client's event loop (also after a panic elsewhere).
fn add(set: &std::sync::Mutex<std::collections::BTreeSet<usize>>, n: usize) {
    set.lock().unwrap_or_else(|p| p.into_inner()).insert(n);
}

/// rumqttc options of a persistent (clean session 0) 3.1.1 client.
fn persistent(id: &str, addr: SocketAddr) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(false);
    o
}

/// A local client's QoS 1 PUBLISH is acknowledged only once the peers hold it (issue 12): a
/// publisher on b1 sends numbered QoS 1 messages, b1 is SIGKILLed mid-stream, the publisher
/// goes on on b2 (Clean Session 0: it sends again what b1 had not acknowledged, as rumqttc
/// does); b2's persistent subscriber ends with every number the publisher got a PUBACK for.
/// Before, b1 acknowledged a message as soon as its router had it, with the copy for b2 still
/// queued on the mesh: those were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_message_it_acknowledged() -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, Packet};
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    // Fewer than the publisher's packet ids (its inflight window): packet id = number + 1.
    const TOTAL: usize = 6_000;
    const KILL_AFTER: usize = 1_500;
    let mut p = Processes::start(2).await?;
    let (b1, b2) = (p.mqtt(0), p.mqtt(1));

    let (sub, mut sub_loop) = AsyncClient::new(persistent("md-kill-sub", b2), 1000);
    sub.subscribe("md/kill", QoS::AtLeastOnce).await?;
    let received: Arc<Mutex<BTreeSet<usize>>> = Arc::default();
    let (suback_tx, suback) = tokio::sync::oneshot::channel();
    let got = received.clone();
    let subscriber = tokio::spawn(async move {
        let mut suback_tx = Some(suback_tx);
        // Bounded: b2 stays up, the loop ends when the test aborts it.
        for _ in 0..10 * TOTAL {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = suback_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(m))) => {
                    if let Some(seq) = std::str::from_utf8(&m.payload)
                        .ok()
                        .and_then(|s| s.parse().ok())
                    {
                        add(&got, seq);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("subscriber: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    tokio::time::timeout(DEADLINE, suback).await??;

    let mut opts = persistent("md-kill-pub", b1);
    opts.set_inflight(u16::MAX);
    let (publisher, mut pub_loop) = AsyncClient::new(opts, 100);
    let acked: Arc<Mutex<BTreeSet<usize>>> = Arc::default();
    let (acks, reconnects) = (acked.clone(), Arc::new(AtomicU64::new(0)));
    let moved = reconnects.clone();
    let driver = tokio::spawn(async move {
        let mut on_b2 = false;
        for _ in 0..20 * TOTAL {
            match pub_loop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    add(&acks, usize::from(a.pkid) - 1);
                }
                Ok(_) => {}
                Err(_) => {
                    // b1 is gone: the same session goes on on b2, unacknowledged ones again
                    if !on_b2 {
                        on_b2 = true;
                        let mut o = persistent("md-kill-pub", b2);
                        o.set_inflight(u16::MAX);
                        pub_loop.mqtt_options = o;
                    }
                    moved.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    let sender = tokio::spawn(async move {
        for seq in 0..TOTAL {
            publisher
                .publish("md/kill", QoS::AtLeastOnce, false, seq.to_string())
                .await?;
        }
        anyhow::Ok(publisher)
    });
    let acked_len = || acked.lock().map_or(0, |a| a.len());
    wait_until("the first PUBACKs from b1", DEADLINE, || async {
        acked_len() >= KILL_AFTER
    })
    .await?;
    p.kill(0);
    let killed = std::time::Instant::now();
    let at_kill = acked_len();
    let _publisher = tokio::time::timeout(DEADLINE, sender).await???;
    // b2 takes the rest: a minute for a debug build on a loaded machine.
    let all_acked = wait_until("every message acknowledged", 3 * DEADLINE, || async {
        acked_len() >= TOTAL
    })
    .await;
    let acked_set = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let arrived = wait_until(
        "every acknowledged message at b2's subscriber",
        DEADLINE,
        || async {
            received
                .lock()
                .is_ok_and(|r| acked_set.iter().all(|s| r.contains(s)))
        },
    )
    .await;
    let got = received.lock().map(|r| r.clone()).unwrap_or_default();
    let lost: Vec<usize> = acked_set.difference(&got).copied().collect();
    let b2_timeouts = metric(
        &p.metrics(1).await.unwrap_or_default(),
        "mqlb_mesh_ack_wait_timeouts_total",
        &[],
    );
    eprintln!(
        "{} acknowledged ({at_kill} when b1 was killed, the rest {:?} after), {} at the \
         subscriber, {} acknowledged and lost; the publisher reconnected {} times; b2 waited \
         out {b2_timeouts} PUBACKs",
        acked_set.len(),
        killed.elapsed(),
        got.len(),
        lost.len(),
        reconnects.load(Ordering::SeqCst)
    );
    let unacked: Vec<usize> = (0..TOTAL).filter(|s| !acked_set.contains(s)).collect();
    eprintln!(
        "not acknowledged: {} (first {:?}), of which at the subscriber {}",
        unacked.len(),
        &unacked[..unacked.len().min(10)],
        unacked.iter().filter(|s| got.contains(s)).count()
    );
    driver.abort();
    subscriber.abort();
    anyhow::ensure!(
        lost.is_empty(),
        "{} messages acknowledged to the publisher never reached b2's subscriber: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    arrived?;
    all_acked?;
    Ok(())
}

/// A peer that is up but never answers (SIGSTOP) delays a local publisher's PUBACKs by the
/// bound (1 s) at most, counted; once it answers again, PUBACKs come at once again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_delays_pubacks_by_the_bound_at_most() -> anyhow::Result<()> {
    let p = Processes::start(2).await?;
    let publisher = Client::connect(p.mqtt(0), "md-stop-pub").await?;
    // One PUBLISH at a time: its PUBACK's delay.
    let puback_after = |n: usize| {
        let publisher = &publisher;
        async move {
            let start = std::time::Instant::now();
            publisher.publish_qos1("md/stop", &payload(n)).await?;
            wait_until("the PUBACK", DEADLINE, || async { publisher.pubacks() > n }).await?;
            anyhow::Ok(start.elapsed())
        }
    };
    let before = puback_after(0).await?;
    p.signal(1, "-STOP")?;
    let mut paused = Vec::new();
    for n in 1..=3 {
        paused.push(puback_after(n).await?);
    }
    let timeouts = metric(
        &p.metrics(0).await?,
        "mqlb_mesh_ack_wait_timeouts_total",
        &[],
    );
    p.signal(1, "-CONT")?;
    let after = puback_after(4).await?;
    eprintln!(
        "PUBACK after {before:?}; b2 paused: {paused:?}; b2 back: {after:?}; {timeouts} timeouts"
    );
    for d in &paused {
        // the bound, and what a loaded 2-core machine adds to it
        anyhow::ensure!(
            *d >= Duration::from_millis(900) && *d < Duration::from_millis(2500),
            "a PUBACK with b2 paused came after {d:?}, not after the 1 s bound"
        );
    }
    anyhow::ensure!(timeouts == 3.0, "{timeouts} timeouts counted, not 3");
    anyhow::ensure!(
        after < Duration::from_millis(900),
        "with b2 back the PUBACK took {after:?}"
    );
    Ok(())
}
