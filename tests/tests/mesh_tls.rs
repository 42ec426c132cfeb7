//! TLS on the mesh links between broker nodes (issue 15, `[cluster] tls`): in-process nodes
//! whose every link, dialed and accepted, runs over mutual TLS with certificates of a CA made
//! for the test (`mqlb_tests::Pki`, leaves for 127.0.0.1, the address the peers dial).
//! Publishes and replicated sessions cross such links; the bytes on the wire (a relay in the
//! test copies and keeps them) never show a payload; a node with a stranger's certificate, or
//! without TLS, never links, and both sides count why.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use mqlb_tests::{metric, wait_until, Client, Cluster, Persistent, Pki, Protocol, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(10);

/// A payload no frame header or certificate contains by chance.
const MARKER: &[u8] = b"meter-reading-7c1f-plaintext-on-the-wire";

/// The mesh TLS of node `n{i + 1}`: a certificate of `pki` for 127.0.0.1, trusting `pki`.
fn node_tls(pki: &Pki, i: usize) -> anyhow::Result<mqlb_config::MeshTls> {
    pki.mesh_tls(&format!("n{}", i + 1), &["127.0.0.1"], &pki.path("ca.pem"))
}

fn metric_of(c: &Cluster, i: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
    c.node(i)
        .map_or(0.0, |n| metric(&n.metrics_text(), name, labels))
}

fn rejected(c: &Cluster, i: usize, reason: &str) -> f64 {
    metric_of(c, i, "mqlb_mesh_rejected_total", &[("reason", reason)])
}

/// Whether any link of node `i` is up.
fn any_link_up(c: &Cluster, i: usize) -> bool {
    c.node(i)
        .is_some_and(|n| n.links().iter().any(|(_, up)| *up))
}

/// A TCP relay on loopback to `target` (set before a connection comes) that keeps a copy of
/// every byte it carries, both ways.
struct Relay {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    wire: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start() -> anyhow::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target = Arc::new(Mutex::new(None::<SocketAddr>));
        let wire = Arc::new(Mutex::new(Vec::new()));
        let (t, w) = (target.clone(), wire.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let to = *t.lock().unwrap_or_else(|e| e.into_inner());
                let Some(to) = to else { continue };
                let Ok(outbound) = TcpStream::connect(to).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(copy_keeping(ri, wo, w.clone()));
                tokio::spawn(copy_keeping(ro, wi, w.clone()));
            }
        });
        Ok(Relay {
            addr,
            target,
            wire,
            task,
        })
    }

    fn wire(&self) -> Vec<u8> {
        self.wire.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn copy_keeping(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    wire: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        wire.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // The other side learns of the end; an error here only means it is gone already.
    if let Err(e) = to.shutdown().await {
        eprintln!("relay: shutdown after the copy: {e}");
    }
}

/// Two nodes, with TLS when `pki` is given, n1's link to n2 through a [`Relay`]: a QoS 1
/// publish of [`MARKER`] on n1 reaches a subscriber on n2. Returns what the relay carried.
async fn a_publish_through_a_relay(pki: Option<&Pki>) -> anyhow::Result<Vec<u8>> {
    let relay = Relay::start().await?;
    let tls = match pki {
        Some(p) => vec![Some(node_tls(p, 0)?), Some(node_tls(p, 1)?)],
        None => vec![None, None],
    };
    let c = Cluster::start_edited(2, |i, s| {
        if let Some(m) = &mut s.mesh {
            m.tls = tls[i].clone();
        }
        if i == 0 {
            for (_, addr) in &mut s.peers {
                *relay.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(*addr);
                *addr = relay.addr;
            }
        }
    })
    .await?;
    c.wait_meshed().await?;
    let sub = Client::connect(c.mqtt(1), "wire-sub").await?;
    sub.subscribe("wire/t", QoS::AtLeastOnce).await?;
    let publisher = Client::connect(c.mqtt(0), "wire-pub").await?;
    publisher.publish_qos1("wire/t", MARKER).await?;
    wait_until(
        "the publish on n1 reaches n2's subscriber",
        DEADLINE,
        || async { sub.received().iter().any(|m| m.payload == MARKER) },
    )
    .await?;
    Ok(relay.wire())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Over TLS links a publish crosses the mesh and its payload is not on the wire; the same
/// relay on plaintext links shows it (so the relay's copy is the link's bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_crosses_tls_links_and_the_wire_never_shows_it() -> anyhow::Result<()> {
    let plain = a_publish_through_a_relay(None).await?;
    ensure!(
        contains(&plain, MARKER),
        "the relay did not carry the plaintext link ({} bytes)",
        plain.len()
    );
    let pki = Pki::new()?;
    let wire = a_publish_through_a_relay(Some(&pki)).await?;
    ensure!(
        wire.len() > MARKER.len(),
        "{} bytes on the wire",
        wire.len()
    );
    ensure!(
        wire.first() == Some(&0x16),
        "the link does not start with a TLS handshake record: {:?}",
        &wire[..wire.len().min(8)]
    );
    ensure!(!contains(&wire, MARKER), "the payload is on the wire");
    ensure!(!contains(&wire, b"wire/t"), "the topic is on the wire");
    Ok(())
}

/// A persistent session whose node dies like a machine losing power: its replica, held by a
/// peer over TLS links, gives the client back its session and what was published meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_replicated_over_tls_survives_its_nodes_death() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let mut c = Cluster::start_tls(3, &pki).await?;
    let sub = Persistent::connect(c.mqtt(0), "tls-session", Protocol::V311).await?;
    sub.subscribe("tls/session").await?;
    sub.stop();
    // The peers learn the session from n1's links, the publishes come on n2's: what they
    // hold is counted once both know it.
    wait_until("the peers know the session", DEADLINE, || async {
        [1, 2]
            .iter()
            .all(|i| metric_of(&c, *i, "mqlb_session_replicas", &[]) >= 1.0)
    })
    .await?;
    let publisher = Persistent::connect(c.mqtt(1), "tls-session-pub", Protocol::V311).await?;
    for i in 0..5u8 {
        let acked = publisher
            .publish_acked("tls/session", vec![b'0' + i], DEADLINE)
            .await?;
        ensure!(acked, "publish {i} not acknowledged");
    }
    wait_until(
        "a peer holds the session's 5 messages",
        DEADLINE,
        || async {
            let held: f64 = [1, 2]
                .iter()
                .map(|i| metric_of(&c, *i, "mqlb_session_replica_messages", &[]))
                .sum();
            held >= 5.0
        },
    )
    .await
    .with_context(|| {
        let of = |name| [1, 2].map(|i| metric_of(&c, i, name, &[]));
        format!(
            "held {:?}, queueing {:?}, replicas {:?}, links {:?}",
            of("mqlb_session_replica_messages"),
            of("mqlb_session_replicas_queueing"),
            of("mqlb_session_replicas"),
            [0, 1, 2].map(|i| c.node(i).map(|n| n.links()))
        )
    })?;
    c.crash(0);
    let back = Persistent::connect(c.mqtt(2), "tls-session", Protocol::V311).await?;
    ensure!(
        back.session_present().first() == Some(&true),
        "Session Present {:?} after its node died",
        back.session_present()
    );
    wait_until("the 5 messages", DEADLINE, || async {
        back.received_count() >= 5
    })
    .await
    .with_context(|| format!("got {}", back.received_count()))?;
    Ok(())
}

/// n3 trusts the cluster's CA but carries a certificate of another: n1 and n2 refuse it both
/// ways (as the dialer, its certificate is not the CA's; as the acceptor, its client
/// certificate is not), count it, and link with each other; n3 links with no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_cas_certificate_never_joins() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let stranger = Pki::new()?;
    let tls = [
        node_tls(&pki, 0)?,
        node_tls(&pki, 1)?,
        stranger.mesh_tls("n3", &["127.0.0.1"], &pki.path("ca.pem"))?,
    ];
    let c = Cluster::start_edited(3, |i, s| {
        if let Some(m) = &mut s.mesh {
            m.tls = Some(tls[i].clone());
        }
    })
    .await?;
    wait_until(
        "n1 and n2 refused n3 both ways, twice",
        DEADLINE,
        || async { rejected(&c, 0, "certificate") >= 4.0 && rejected(&c, 1, "certificate") >= 4.0 },
    )
    .await?;
    let links = |i: usize| c.node(i).map(|n| n.links()).unwrap_or_default();
    for i in 0..2 {
        let up: Vec<String> = links(i)
            .into_iter()
            .filter(|(_, up)| *up)
            .map(|(p, _)| p)
            .collect();
        ensure!(
            up == [if i == 0 { "n2" } else { "n1" }],
            "n{} links up: {up:?}",
            i + 1
        );
    }
    ensure!(!any_link_up(&c, 2), "n3 linked: {:?}", links(2));
    Ok(())
}

/// A TLS node and a plaintext node never link: each refuses the other's link at its first
/// bytes, and counts it by its own reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_node_and_a_tls_node_do_not_link() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let tls = node_tls(&pki, 0)?;
    let c = Cluster::start_edited(2, |i, s| {
        if let Some(m) = &mut s.mesh {
            m.tls = (i == 0).then(|| tls.clone());
        }
    })
    .await?;
    wait_until("each refused the other's link", DEADLINE, || async {
        rejected(&c, 0, "plaintext") >= 1.0 && rejected(&c, 1, "unexpected_tls") >= 1.0
    })
    .await?;
    ensure!(
        !any_link_up(&c, 0) && !any_link_up(&c, 1),
        "a link is up: {:?} {:?}",
        c.node(0).map(|n| n.links()),
        c.node(1).map(|n| n.links())
    );
    Ok(())
}

/// At a TLS node, bytes that are not TLS end at once, and a handshake that stalls after its
/// first byte ends at the handshake timeout (5 s): each counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_a_stalled_handshake_at_a_tls_node_are_refused_and_counted(
) -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let c = Cluster::start_tls(1, &pki).await?;
    let mesh = c
        .node(0)
        .and_then(|n| n.mesh_addr)
        .context("mesh address")?;
    let ended = |mut s: TcpStream| async move {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut rest)).await
    };
    let mut garbage = TcpStream::connect(mesh).await?;
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
    // Closed (a reset, too: the refused bytes were never read) well before the timeout.
    let started = std::time::Instant::now();
    ensure!(ended(garbage).await.is_ok(), "garbage not closed");
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "garbage kept open for {:?}",
        started.elapsed()
    );
    wait_until("garbage counted", DEADLINE, || async {
        rejected(&c, 0, "plaintext") == 1.0
    })
    .await?;
    let mut stalled = TcpStream::connect(mesh).await?;
    stalled.write_all(b"\x16\x03\x01").await?;
    let started = std::time::Instant::now();
    ensure!(
        ended(stalled).await.is_ok(),
        "a stalled handshake still open after 8 s"
    );
    ensure!(
        started.elapsed() >= Duration::from_secs(4),
        "closed before the handshake timeout"
    );
    wait_until("the stall counted", DEADLINE, || async {
        rejected(&c, 0, "timeout") == 1.0
    })
    .await?;
    Ok(())
}

/// The user's path: a configuration file with `[cluster] tls` and two `[[broker]]`s, each node
/// started from it as `mqlb broker` does (`NodeSpec::from_config`): they link, and their mesh
/// refuses a plaintext peer, so TLS came from the file; the certificate's expiry is a metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_started_from_a_config_with_cluster_tls_link_over_tls() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    pki.leaf(&["127.0.0.1"], (4096, 1, 1), "node.pem", "node.key")?;
    let mut text = format!(
        "[cluster]\nsecret = \"{}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n\
         tls = {{ cert = \"{}\", key = \"{}\", ca = \"{}\" }}\n",
        mqlb_tests::TEST_SECRET,
        pki.path_str("node.pem"),
        pki.path_str("node.key"),
        pki.path_str("ca.pem"),
    );
    for id in ["b1", "b2"] {
        let port = mqlb_tests::free_port;
        text.push_str(&format!(
            "[[broker]]\nid = \"{id}\"\nmqtt = \"127.0.0.1:{}\"\nmesh = \"127.0.0.1:{}\"\n",
            port()?,
            port()?
        ));
    }
    let config = mqlb_config::Config::parse(&text, "mesh-tls.toml")?;
    let mut nodes = Vec::new();
    for id in ["b1", "b2"] {
        let spec = mqlb_broker::NodeSpec::from_config(&config, id)?;
        nodes.push(mqlb_broker::Node::start(spec).await?);
    }
    wait_until("b1 and b2 linked", DEADLINE, || async {
        nodes.iter().all(|n| n.links().iter().all(|(_, up)| *up))
    })
    .await?;
    // rcgen's certificates are valid until 4096-01-01.
    let expiry = metric(
        &nodes[0].metrics_text(),
        "mqlb_mesh_tls_cert_expiry_seconds",
        &[("cert", &pki.path_str("node.pem"))],
    );
    ensure!(
        expiry == 67_090_118_400.0,
        "mesh certificate expiry {expiry}"
    );
    let mesh = nodes[0].mesh_addr.context("b1's mesh address")?;
    let mut plain = TcpStream::connect(mesh).await?;
    plain.write_all(b"\x00\x00\x00\x05\x01MQLB").await?;
    wait_until("b1 refused a plaintext peer", DEADLINE, || async {
        metric(
            &nodes[0].metrics_text(),
            "mqlb_mesh_rejected_total",
            &[("reason", "plaintext")],
        ) == 1.0
    })
    .await?;
    for n in nodes {
        n.stop().await;
    }
    Ok(())
}

/// n3's `mqlb_mesh_tls_cert_expiry_seconds` for the certificate of `tls` (0: no such series).
fn expiry(c: &Cluster, tls: &mqlb_config::MeshTls) -> f64 {
    let cert = tls.cert.display().to_string();
    metric_of(
        c,
        2,
        "mqlb_mesh_tls_cert_expiry_seconds",
        &[("cert", &cert)],
    )
}

/// A mesh certificate swapped by a reload (`Node::reload_mesh_tls`, what SIGHUP does with the
/// file's `[cluster] tls`) reaches the links made after it and not the live ones: n3 takes a
/// certificate of another CA and keeps its links; n1, restarted, then refuses n3 both ways;
/// n3 reloads a renewed certificate of the cluster's CA and n1 links with it again. The expiry
/// series follows the certificate in force. Turning TLS off by a reload is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_mesh_certificate_reaches_the_next_links() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let stranger = Pki::new()?;
    let mut c = Cluster::start_tls(3, &pki).await?;
    c.wait_meshed().await?;
    let n3 = c.node(2).context("n3")?;
    let foreign = stranger.mesh_tls("n3", &["127.0.0.1"], &pki.path("ca.pem"))?;
    ensure!(
        n3.reload_mesh_tls(Some(&foreign))?,
        "the certificate changed"
    );
    ensure!(
        !n3.reload_mesh_tls(Some(&foreign))?,
        "the same again is no change"
    );
    ensure!(
        expiry(&c, &foreign) > 0.0,
        "the expiry of the certificate in force is shown"
    );
    ensure!(
        n3.links().iter().all(|(_, up)| *up),
        "live links stay: {:?}",
        n3.links()
    );
    ensure!(
        n3.reload_mesh_tls(None).is_err(),
        "TLS is not turned off by a reload"
    );

    c.restart(0).await?;
    wait_until("n1 refused n3's new certificate", DEADLINE, || async {
        rejected(&c, 0, "certificate") >= 2.0
    })
    .await?;
    let n1_links = |c: &Cluster| c.node(0).map(|n| n.links()).unwrap_or_default();
    ensure!(
        n1_links(&c).contains(&("n3".to_string(), false)),
        "n1 and n3 linked: {:?}",
        n1_links(&c)
    );

    let renewed = pki.mesh_tls("n3-renewed", &["127.0.0.1"], &pki.path("ca.pem"))?;
    ensure!(
        c.node(2).context("n3")?.reload_mesh_tls(Some(&renewed))?,
        "renewed"
    );
    c.wait_meshed().await?;
    ensure!(
        expiry(&c, &renewed) > 0.0,
        "the renewed certificate's expiry is shown"
    );
    ensure!(
        expiry(&c, &foreign) == 0.0,
        "the replaced certificate's series is gone"
    );
    Ok(())
}
