//! TLS from the LB to the brokers (`pool.tls`, issue 15): mosquitto brokers that serve MQTT
//! over TLS only, behind an in-process LB whose frontends are plain or terminate TLS; the
//! members' certificates verified (another CA, another name: never used), the LB's client
//! certificate for brokers that ask for one, the `tls` and `mqtts` probes, a reload that
//! rotates the files under live connections, and a PROXY header in clear before the handshake;
//! and mqlb's own broker node behind it, on its `mqtts` listener with PROXY v2.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::{backend_of, candidates, mqtt_connect, ping, DEADLINE};
use mqlb_config::Config;
use mqlb_lb::select::{rendezvous_order, Key};
use mqlb_lb::{Lb, Listeners};
use mqlb_tests::pki::{Pki, BOTH};
use mqlb_tests::{
    backend_state, metric, mosquitto_pub_with, wait_until, Mosquitto, MosquittoSub, MosquittoTls,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A mosquitto broker serving MQTT over TLS with the certificate `cert`/`key` of `pki`.
async fn tls_broker(
    pki: &Pki,
    (cert, key): (&str, &str),
    require_certificate: bool,
    refuse_connect: bool,
) -> anyhow::Result<Mosquitto> {
    Mosquitto::start_tls(&MosquittoTls {
        ca: &pki.path("ca.pem"),
        cert: &pki.path(cert),
        key: &pki.path(key),
        require_certificate,
        refuse_connect,
    })
    .await
}

/// The certificate every [`Pki`] has for 127.0.0.1 and localhost.
const LEAF: (&str, &str) = ("chain.pem", "key.pem");

/// An LB with a plain frontend `mqtt` (rule `plain`) and a TLS one `mqtts` (rule `tls`, the
/// certificate of `pki`), both routing by client ID to the pool `brokers` of `addrs` (b1,
/// b2, ...), which it reaches over TLS as `pool_tls` says, probed by `probe`.
struct Topo {
    lb: Lb,
    plain: SocketAddr,
    tls: SocketAddr,
    admin: SocketAddr,
    file: std::path::PathBuf,
}

fn lb_toml(pki: &Pki, addrs: &[SocketAddr], pool_tls: &str, probe: &str) -> String {
    let mut t = format!(
        "[lb]\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\nwatch_config = false\n\
         [[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
         [[frontend]]\nname = \"mqtts\"\nbind = \"127.0.0.1:0\"\n\
         tls = {{ cert = {:?}, key = {:?} }}\n\
         [[pool]]\nname = \"brokers\"\nprobe = \"p\"\ntls = {pool_tls}\n",
        pki.path_str("chain.pem"),
        pki.path_str("key.pem"),
    );
    for (i, a) in addrs.iter().enumerate() {
        t += &format!("[[pool.backend]]\nid = \"b{}\"\naddr = \"{a}\"\n", i + 1);
    }
    t += &format!(
        "[[probe]]\nname = \"p\"\nprotocol = \"{probe}\"\nport = \"traffic\"\n\
         interval = \"500ms\"\ntimeout = \"400ms\"\nthreshold = 1\n\
         [[rule]]\nname = \"plain\"\nfrontend = \"mqtt\"\npool = \"brokers\"\n\
         distribution = \"mqtt-client-id\"\n\
         [[rule]]\nname = \"tls\"\nfrontend = \"mqtts\"\npool = \"brokers\"\n\
         distribution = \"mqtt-client-id\"\n"
    );
    t
}

impl Topo {
    async fn start(
        pki: &Pki,
        addrs: &[SocketAddr],
        pool_tls: &str,
        probe: &str,
    ) -> anyhow::Result<Topo> {
        let file = pki.path("lb.toml");
        std::fs::write(&file, lb_toml(pki, addrs, pool_tls, probe))?;
        let lb = Lb::start(Config::load(&file)?, Listeners::default()).await?;
        let addr = |name: &str| {
            lb.frontend_addr(name)
                .ok_or_else(|| anyhow::anyhow!("frontend {name} not open"))
        };
        Ok(Topo {
            plain: addr("mqtt")?,
            tls: addr("mqtts")?,
            admin: lb.admin_addr(),
            file,
            lb,
        })
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.lb.metrics_text(), name, labels)
    }

    /// Waits until the admin API shows backend `id` in `state` (`up`, `down`).
    async fn wait_state(&self, id: &str, state: &str) -> anyhow::Result<()> {
        let admin = self.admin;
        wait_until(&format!("{id} {state}"), DEADLINE, || async move {
            backend_state(admin, id).await.is_ok_and(|s| s == state)
        })
        .await
        .map(|_| ())
    }

    /// The count of failed TLS handshakes with `backend` for `reason`.
    fn tls_errors(&self, backend: &str, reason: &str) -> f64 {
        self.metric(
            "mqlb_backend_tls_handshake_errors_total",
            &[
                ("pool", "brokers"),
                ("backend", backend),
                ("reason", reason),
            ],
        )
    }
}

/// A pool's `tls` table trusting `pki`'s CA, with `extra` keys.
fn pool_tls(pki: &Pki, extra: &str) -> String {
    format!("{{ ca = {:?}{extra} }}", pki.path_str("ca.pem"))
}

/// A client ID whose first choice among `ids` is `want`, starting with `prefix`.
fn id_on(ids: &[&str], want: &str, prefix: &str) -> String {
    let cands = candidates(ids);
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| ids[rendezvous_order(Key::ClientId(id).hash(), &cands)[0]] == want)
        .expect("some ID hashes to each backend")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_clients_reach_tls_brokers_routed_by_client_id() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let mut brokers = Vec::new();
    for _ in 0..3 {
        brokers.push(tls_broker(&pki, LEAF, false, false).await?);
    }
    let addrs: Vec<SocketAddr> = brokers.iter().map(Mosquitto::addr).collect();
    // The brokers speak TLS only: a plaintext CONNECT gets no CONNACK.
    let mut direct = TcpStream::connect(addrs[0]).await?;
    assert!(mqtt_connect(&mut direct, "plain-direct").await.is_err());

    let t = Topo::start(&pki, &addrs, &pool_tls(&pki, ""), "tls").await?;
    let ids = ["b1", "b2", "b3"];
    for id in ids {
        t.wait_state(id, "up").await?;
    }
    // mosquitto's clients through the plain frontend: a subscriber and a publisher whose
    // client IDs put them on the same broker.
    let sub_id = "up-sub";
    let want = ids[rendezvous_order(Key::ClientId(sub_id).hash(), &candidates(&ids))[0]];
    let pub_id = id_on(&ids, want, "up-pub");
    let mut sub = MosquittoSub::start(t.plain, sub_id, "up/#")?;
    let front = t.plain;
    sub.wait_subscribed("up/ping", || {
        mosquitto_pub_with(front, &pub_id, "up/ping", "ping", &[])
    })
    .await?;
    mosquitto_pub_with(t.plain, &pub_id, "up/hello", "through-tls", &[])?;
    assert_eq!(sub.lines(1, "up/ping", DEADLINE), ["up/hello through-tls"]);
    assert_eq!(backend_of(t.admin, sub_id).await?, want);

    // Each client ID lands where rendezvous hashing puts it, every time.
    let mut chosen = std::collections::HashSet::new();
    for i in 0..8 {
        let id = format!("up-dev-{i}");
        let want = ids[rendezvous_order(Key::ClientId(&id).hash(), &candidates(&ids))[0]];
        chosen.insert(want);
        for round in 0..2 {
            let mut s = TcpStream::connect(t.plain).await?;
            assert_eq!(mqtt_connect(&mut s, &id).await?, [0x20, 2, 0, 0], "{id}");
            assert_eq!(backend_of(t.admin, &id).await?, want, "{id} round {round}");
        }
    }
    assert!(chosen.len() >= 2, "8 IDs all hash to {chosen:?}");
    for b in ids {
        assert_eq!(t.tls_errors(b, "certificate"), 0.0, "{b}");
    }
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_reach_tls_brokers_with_tls_on_both_legs() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let broker = tls_broker(&pki, LEAF, false, false).await?;
    let t = Topo::start(&pki, &[broker.addr()], &pool_tls(&pki, ""), "mqtts").await?;
    t.wait_state("b1", "up").await?;
    let ca = pki.path_str("ca.pem");
    let tls_opts = ["--cafile", ca.as_str()];
    let mut sub = MosquittoSub::start_with(t.tls, "both-sub", "both/#", &tls_opts)?;
    let front = t.tls;
    sub.wait_subscribed("both/ping", || {
        mosquitto_pub_with(front, "both-ping", "both/ping", "ping", &tls_opts)
    })
    .await?;
    mosquitto_pub_with(t.tls, "both-pub", "both/hello", "tls-twice", &tls_opts)?;
    assert_eq!(
        sub.lines(1, "both/ping", DEADLINE),
        ["both/hello tls-twice"]
    );
    assert_eq!(backend_of(t.admin, "both-sub").await?, "b1");
    assert!(t.metric("mqlb_tls_handshakes_total", &[("frontend", "mqtts")]) >= 3.0);

    // Megabytes both ways: the copy moves records, never splices, on both TLS legs.
    let connector = pki.client(&["mqtt"], BOTH)?;
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut a = connector
        .connect(name.clone(), TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(mqtt_connect(&mut a, "bulk-sub").await?, [0x20, 2, 0, 0]);
    // SUBSCRIBE bulk/# QoS 0, then a 1 MiB PUBLISH from a second client.
    a.write_all(&[0x82, 11, 0, 1, 0, 6, b'b', b'u', b'l', b'k', b'/', b'#', 0])
        .await?;
    let mut suback = [0u8; 5];
    tokio::time::timeout(DEADLINE, a.read_exact(&mut suback)).await??;
    assert_eq!(suback, [0x90, 3, 0, 1, 0]);
    let mut b = connector
        .connect(name, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(mqtt_connect(&mut b, "bulk-pub").await?, [0x20, 2, 0, 0]);
    let payload: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let publish = publish_packet("bulk/x", &payload);
    b.write_all(&publish).await?;
    b.flush().await?;
    let mut got = vec![0u8; publish.len()];
    tokio::time::timeout(DEADLINE, a.read_exact(&mut got)).await??;
    assert!(got == publish, "the 1 MiB PUBLISH arrived intact");
    t.lb.shutdown().await;
    Ok(())
}

/// A QoS 0 PUBLISH of `payload` to `topic`.
fn publish_packet(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(payload);
    let mut p = vec![0x30];
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        p.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    p.extend_from_slice(&body);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_a_certificate_of_another_ca_or_name_is_never_used() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let stranger = Pki::new()?;
    pki.leaf(
        &["elsewhere.example"],
        (4096, 1, 1),
        "elsewhere.pem",
        "elsewhere-key.pem",
    )?;
    let good = tls_broker(&pki, LEAF, false, false).await?;
    // Its CA's certificate for 127.0.0.1, but the LB trusts the other CA only.
    let foreign = tls_broker(&stranger, LEAF, false, false).await?;
    // The right CA, but a certificate for another name than its address.
    let misnamed = tls_broker(&pki, ("elsewhere.pem", "elsewhere-key.pem"), false, false).await?;
    let addrs = [good.addr(), foreign.addr(), misnamed.addr()];
    // A TCP probe finds them all up: the client connects find out.
    let t = Topo::start(&pki, &addrs, &pool_tls(&pki, ""), "tcp").await?;
    let ids = ["b1", "b2", "b3"];
    for id in ids {
        t.wait_state(id, "up").await?;
    }
    for bad in ["b2", "b3"] {
        let id = id_on(&ids, bad, &format!("to-{bad}"));
        let mut s = TcpStream::connect(t.plain).await?;
        // Failed over to the one broker that verifies.
        assert_eq!(mqtt_connect(&mut s, &id).await?, [0x20, 2, 0, 0], "{id}");
        assert_eq!(backend_of(t.admin, &id).await?, "b1", "{id}");
        assert!(t.tls_errors(bad, "certificate") >= 1.0, "{bad} counted");
        let passive = t.metric(
            "mqlb_backend_connect_failures_total",
            &[("pool", "brokers"), ("backend", bad)],
        );
        assert!(passive >= 1.0, "{bad}: a failed connect");
    }
    assert_eq!(t.tls_errors("b1", "certificate"), 0.0);

    // A `tls` probe marks them down, and keeps them down.
    let toml = lb_toml(&pki, &addrs, &pool_tls(&pki, ""), "tls");
    std::fs::write(&t.file, toml)?;
    t.lb.reload().await?;
    t.wait_state("b2", "down").await?;
    t.wait_state("b3", "down").await?;
    let probed = |b: &str| {
        t.metric(
            "mqlb_probes_total",
            &[("pool", "brokers"), ("backend", b), ("result", "tls_error")],
        )
    };
    wait_until("two failed tls probes each", DEADLINE, || async {
        probed("b2") >= 2.0 && probed("b3") >= 2.0
    })
    .await?;
    assert_eq!(backend_state(t.admin, "b1").await?, "up");
    assert_eq!(probed("b1"), 0.0);
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_asks_for_a_client_certificate_gets_the_lbs() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    pki.client_cert("lb")?;
    pki.leaf(
        &["broker.internal"],
        (4096, 1, 1),
        "named.pem",
        "named-key.pem",
    )?;
    // mTLS, and a certificate for a name: the LB verifies it for `server_name` (and sends it
    // as SNI).
    let broker = tls_broker(&pki, ("named.pem", "named-key.pem"), true, false).await?;
    let with_cert = pool_tls(
        &pki,
        &format!(
            ", server_name = \"broker.internal\", cert = {:?}, key = {:?}",
            pki.path_str("lb.pem"),
            pki.path_str("lb-key.pem")
        ),
    );
    let t = Topo::start(&pki, &[broker.addr()], &with_cert, "tls").await?;
    t.wait_state("b1", "up").await?;
    let mut s = TcpStream::connect(t.plain).await?;
    assert_eq!(mqtt_connect(&mut s, "mtls-1").await?, [0x20, 2, 0, 0]);
    ping(&mut s).await?;

    // Without the LB's certificate the broker refuses the session: the `tls` probe sees its
    // alert and marks it down, so clients are refused by the LB (CONNACK 3) instead of cut.
    let without = pool_tls(&pki, ", server_name = \"broker.internal\"");
    std::fs::write(&t.file, lb_toml(&pki, &[broker.addr()], &without, "tls"))?;
    t.lb.reload().await?;
    t.wait_state("b1", "down").await?;
    let mut refused = TcpStream::connect(t.plain).await?;
    assert_eq!(mqtt_connect(&mut refused, "mtls-2").await?, [0x20, 2, 0, 3]);
    // The connection made with the certificate goes on.
    ping(&mut s).await?;
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtts_probe_marks_a_tls_broker_up_and_one_refusing_the_connect_down(
) -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let accepting = tls_broker(&pki, LEAF, false, false).await?;
    let refusing = tls_broker(&pki, LEAF, false, true).await?;
    let addrs = [accepting.addr(), refusing.addr()];
    let t = Topo::start(&pki, &addrs, &pool_tls(&pki, ""), "mqtts").await?;
    t.wait_state("b1", "up").await?;
    t.wait_state("b2", "down").await?;
    let refused = |t: &Topo| {
        t.metric(
            "mqlb_probes_total",
            &[
                ("pool", "brokers"),
                ("backend", "b2"),
                ("result", "mqtt_refused"),
            ],
        )
    };
    wait_until("b2's CONNACK refusals counted", DEADLINE, || async {
        refused(&t) >= 2.0
    })
    .await?;
    assert_eq!(backend_state(t.admin, "b1").await?, "up");
    // Every client goes to the broker that accepts, whatever its ID.
    let id = id_on(&["b1", "b2"], "b2", "would-be-b2");
    let mut s = TcpStream::connect(t.plain).await?;
    assert_eq!(mqtt_connect(&mut s, &id).await?, [0x20, 2, 0, 0]);
    assert_eq!(backend_of(t.admin, &id).await?, "b1");
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_the_lbs_certificate_and_ca_under_live_connections() -> anyhow::Result<()>
{
    let pki = Pki::new()?;
    pki.client_cert("lb")?;
    let broker = tls_broker(&pki, LEAF, true, false).await?;
    // The pool's files are copies, rotated in place as a secrets agent would.
    let (ca, cert, key) = (
        pki.path("pool-ca.pem"),
        pki.path("c.pem"),
        pki.path("k.pem"),
    );
    std::fs::copy(pki.path("ca.pem"), &ca)?;
    std::fs::copy(pki.path("lb.pem"), &cert)?;
    std::fs::copy(pki.path("lb-key.pem"), &key)?;
    let files = format!(
        "{{ ca = {:?}, cert = {:?}, key = {:?} }}",
        ca.display().to_string(),
        cert.display().to_string(),
        key.display().to_string()
    );
    let t = Topo::start(&pki, &[broker.addr()], &files, "tcp").await?;
    t.wait_state("b1", "up").await?;
    let mut live = TcpStream::connect(t.plain).await?;
    assert_eq!(mqtt_connect(&mut live, "live").await?, [0x20, 2, 0, 0]);

    // A new client certificate of the same CA: taken by the reload, the live connection kept.
    pki.client_cert("lb2")?;
    std::fs::copy(pki.path("lb2.pem"), &cert)?;
    std::fs::copy(pki.path("lb2-key.pem"), &key)?;
    t.lb.reload().await?;
    let mut fresh = TcpStream::connect(t.plain).await?;
    assert_eq!(mqtt_connect(&mut fresh, "fresh").await?, [0x20, 2, 0, 0]);
    ping(&mut live).await?;

    // A CA that did not sign the broker: new connections are refused (counted), the live
    // ones go on.
    let other = Pki::new()?;
    std::fs::copy(other.path("ca.pem"), &ca)?;
    t.lb.reload().await?;
    let mut refused = TcpStream::connect(t.plain).await?;
    assert_eq!(
        mqtt_connect(&mut refused, "refused").await?,
        [0x20, 2, 0, 3]
    );
    assert!(t.tls_errors("b1", "certificate") >= 1.0);
    ping(&mut live).await?;
    ping(&mut fresh).await?;

    // A CA file that is gone is refused at reload, naming the pool; the running config stays.
    std::fs::remove_file(&ca)?;
    let e = t.lb.reload().await.expect_err("a missing CA file");
    let why = e.to_string();
    assert!(
        why.contains("pool[0].tls.ca")
            && why.contains("\"brokers\"")
            && why.contains("pool-ca.pem"),
        "{why}"
    );
    ping(&mut live).await?;
    assert!(t.metric("mqlb_config_reloads_total", &[("result", "error")]) >= 1.0);
    t.lb.shutdown().await;
    Ok(())
}

/// A backend that reads a PROXY v2 header in clear, then serves TLS with `pki`'s certificate
/// and answers a CONNECT with an accepting CONNACK; sends the header's source address of each
/// connection on `seen`.
async fn proxy_then_tls_backend(
    pki: &Pki,
) -> anyhow::Result<(SocketAddr, tokio::sync::mpsc::UnboundedReceiver<SocketAddr>)> {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(pki.path("chain.pem"))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(pki.path("key.pem"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(BOTH)?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let served = async {
                    // 16 bytes, the last two the length of the addresses and TLVs after them.
                    let mut header = vec![0u8; 16];
                    s.read_exact(&mut header).await?;
                    let len = u16::from_be_bytes([header[14], header[15]]) as usize;
                    header.resize(16 + len, 0);
                    s.read_exact(&mut header[16..]).await?;
                    let parsed = ppp::v2::Header::try_from(&header[..])?;
                    if let ppp::v2::Addresses::IPv4(a) = parsed.addresses {
                        let source = SocketAddr::from((a.source_address, a.source_port));
                        tx.send(source)?;
                    }
                    let mut tls = acceptor.accept(s).await?;
                    let mut connect = [0u8; 2];
                    tls.read_exact(&mut connect).await?;
                    let mut rest = vec![0u8; connect[1] as usize];
                    tls.read_exact(&mut rest).await?;
                    tls.write_all(&[0x20, 2, 0, 0]).await?;
                    tls.flush().await?;
                    // Held open until the LB closes it.
                    while tls.read(&mut connect).await? > 0 {}
                    anyhow::Ok(())
                };
                if let Err(e) = served.await {
                    eprintln!("proxy-then-tls backend: {e}");
                }
            });
        }
    });
    Ok((addr, rx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_sends_the_header_in_clear_before_the_tls_handshake() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let (backend, mut seen) = proxy_then_tls_backend(&pki).await?;
    let file = pki.path("lb.toml");
    let toml = lb_toml(&pki, &[backend], &pool_tls(&pki, ""), "tls")
        .replace("tls = { ca", "send_proxy = \"v2\"\ntls = { ca");
    std::fs::write(&file, toml)?;
    let lb = Lb::start(Config::load(&file)?, Listeners::default()).await?;
    let front = lb.frontend_addr("mqtt").expect("open");
    wait_until("b1 up", DEADLINE, || async {
        backend_state(lb.admin_addr(), "b1")
            .await
            .is_ok_and(|s| s == "up")
    })
    .await?;
    let mut s = TcpStream::connect(front).await?;
    let me = s.local_addr()?;
    assert_eq!(mqtt_connect(&mut s, "proxied").await?, [0x20, 2, 0, 0]);
    // The probes' LOCAL headers name no source; the client's names it.
    let source = tokio::time::timeout(DEADLINE, async {
        loop {
            match seen.recv().await {
                Some(a) if a == me => return Some(a),
                Some(_) => {}
                None => return None,
            }
        }
    })
    .await?;
    assert_eq!(source, Some(me));
    lb.shutdown().await;
    Ok(())
}

/// An mqlb broker node serving MQTT over TLS on `mqtts` (the certificate of `pki`) and taking
/// PROXY headers from loopback (the LB).
async fn mqlb_tls_node(pki: &Pki) -> anyhow::Result<mqlb_tests::Cluster> {
    let text = format!(
        "[[broker]]\nid = \"n\"\nmqtt = \"127.0.0.1:1\"\nmqtts = \"127.0.0.1:2\"\n\
         tls = {{ cert = {:?}, key = {:?} }}\naccept_proxy = [\"127.0.0.1/32\"]\n",
        pki.path_str("chain.pem"),
        pki.path_str("key.pem")
    );
    let want = Config::parse(&text, "broker.toml")?
        .brokers
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no broker"))?;
    mqlb_tests::Cluster::start_shaped(1, |n| {
        n.mqtts = Some(mqlb_tests::loopback(mqlb_tests::free_port()?));
        n.tls = want.tls.clone();
        n.accept_proxy = want.accept_proxy.clone();
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqlb_brokers_mqtts_listener_behind_the_lb_with_tls_and_proxy_v2() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let node = mqlb_tls_node(&pki).await?;
    let mqtts = node
        .node(0)
        .and_then(|n| n.mqtts)
        .ok_or_else(|| anyhow::anyhow!("no mqtts listener"))?;
    let http = node.http(0).ok_or_else(|| anyhow::anyhow!("no http"))?;
    let file = pki.path("lb.toml");
    let toml = lb_toml(&pki, &[mqtts], &pool_tls(&pki, ""), "mqtts")
        .replace("tls = { ca", "send_proxy = \"v2\"\ntls = { ca");
    std::fs::write(&file, toml)?;
    let lb = Lb::start(Config::load(&file)?, Listeners::default()).await?;
    let admin = lb.admin_addr();
    wait_until("b1 up by its mqtts probe", DEADLINE, || async {
        backend_state(admin, "b1").await.is_ok_and(|s| s == "up")
    })
    .await?;
    // A client from another loopback address than the LB's: the node lists it by that address,
    // on its TLS listener.
    let client = tokio::net::TcpSocket::new_v4()?;
    client.bind("127.0.0.9:0".parse()?)?;
    let front = lb.frontend_addr("mqtt").expect("open");
    let mut s = client.connect(front).await?;
    assert_eq!(mqtt_connect(&mut s, "via-lb").await?, [0x20, 2, 0, 0]);
    let me = s.local_addr()?.to_string();
    let start = std::time::Instant::now();
    let listed = loop {
        if let Some(found) = node_lists(http, "via-lb").await? {
            break found;
        }
        anyhow::ensure!(start.elapsed() < DEADLINE, "via-lb not listed by the node");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(listed, ("mqtts".to_string(), me));
    ping(&mut s).await?;
    lb.shutdown().await;
    Ok(())
}

/// Where the node's `/api/clients` at `http` lists `client_id`: `(listener, peer)`.
async fn node_lists(http: SocketAddr, client_id: &str) -> anyhow::Result<Option<(String, String)>> {
    let (status, body) = mqlb_tests::http(http, "GET", "/api/clients").await?;
    anyhow::ensure!(status == 200, "/api/clients: {status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v["clients"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["client_id"] == client_id)
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("listener"), s("peer"))
        }))
}
