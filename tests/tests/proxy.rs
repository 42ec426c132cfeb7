//! PROXY protocol at the LB (issue 15): a `send_proxy` pool's backend — a recording one, since
//! mosquitto does not read PROXY headers — gets a v1 or v2 header with the real client address
//! (and the SSL TLV behind a TLS frontend) before the CONNECT, and its probes a LOCAL one; an
//! `accept_proxy` frontend takes the client address from a trusted LB's header for routing, the
//! connection table and the limits, and refuses what is not a good header, by reason.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{read_until_closed, DEADLINE};
use mqlb_config::Config;
use mqlb_lb::{Lb, Listeners};
use mqlb_mqtt::{encode_connect, ConnectOptions};
use mqlb_tests::{metric, serve_threads, wait_until, TempDir};
use ppp::v2;
use ppp::{HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// What one connection to the recording backend started with.
#[derive(Debug, Clone)]
struct Seen {
    /// The PROXY header, as ppp reads it (`None`: the connection did not start with one).
    header: Option<Header>,
    /// The bytes after it, up to the end of the first MQTT packet.
    first_packet: Vec<u8>,
}

/// A received header, owned: its addresses (`None`: v1 UNKNOWN, or not IP) and, for v2, its
/// command and TLVs.
#[derive(Debug, Clone, PartialEq)]
enum Header {
    V1 {
        addrs: Option<(SocketAddr, SocketAddr)>,
    },
    V2 {
        command: v2::Command,
        addrs: Option<(SocketAddr, SocketAddr)>,
        /// (type, value) of each TLV.
        tlvs: Vec<(u8, Vec<u8>)>,
    },
}

impl Header {
    fn addrs(&self) -> Option<(SocketAddr, SocketAddr)> {
        match self {
            Header::V1 { addrs } => *addrs,
            Header::V2 {
                command: v2::Command::Proxy,
                addrs,
                ..
            } => *addrs,
            Header::V2 { .. } => None,
        }
    }

    /// The client address a PROXY command carries.
    fn source(&self) -> Option<SocketAddr> {
        self.addrs().map(|(s, _)| s)
    }

    fn destination(&self) -> Option<SocketAddr> {
        self.addrs().map(|(_, d)| d)
    }

    fn is_local(&self) -> bool {
        matches!(
            self,
            Header::V2 {
                command: v2::Command::Local,
                ..
            } | Header::V1 { addrs: None }
        )
    }
}

fn v1_addrs(a: ppp::v1::Addresses) -> Option<(SocketAddr, SocketAddr)> {
    match a {
        ppp::v1::Addresses::Tcp4(a) => Some((
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        )),
        ppp::v1::Addresses::Tcp6(a) => Some((
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        )),
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_addrs(a: v2::Addresses) -> Option<(SocketAddr, SocketAddr)> {
    match a {
        v2::Addresses::IPv4(a) => Some((
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        )),
        v2::Addresses::IPv6(a) => Some((
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        )),
        _ => None,
    }
}

/// Reads a PROXY header (if the first byte starts one) and the first MQTT packet after it from
/// a blocking socket; answers a CONNECT with an accepting CONNACK.
fn record(mut s: std::net::TcpStream, seen: &Mutex<Vec<Seen>>) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    s.set_read_timeout(Some(DEADLINE))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    let mut more = |buf: &mut Vec<u8>| -> anyhow::Result<bool> {
        let n = s.read(&mut chunk)?;
        buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    };
    if !more(&mut buf)? {
        return Ok(()); // a tcp probe
    }
    let mut header = None;
    if buf[0] == b'\r' || buf[0] == b'P' {
        loop {
            let parsed = HeaderResult::parse(&buf);
            if parsed.is_incomplete() {
                anyhow::ensure!(more(&mut buf)?, "closed inside the PROXY header");
                continue;
            }
            let (h, len) = match parsed {
                HeaderResult::V1(Ok(h)) => (
                    Header::V1 {
                        addrs: v1_addrs(h.addresses),
                    },
                    h.header.len(),
                ),
                HeaderResult::V2(Ok(h)) => (
                    Header::V2 {
                        command: h.command,
                        addrs: v2_addrs(h.addresses),
                        tlvs: h
                            .tlvs()
                            .filter_map(Result::ok)
                            .map(|t| (t.kind, t.value.to_vec()))
                            .collect(),
                    },
                    h.header.len(),
                ),
                HeaderResult::V1(Err(e)) => anyhow::bail!("bad v1 header: {e}"),
                HeaderResult::V2(Err(e)) => anyhow::bail!("bad v2 header: {e}"),
            };
            header = Some(h);
            buf.drain(..len);
            break;
        }
    }
    // The first packet: a type byte and a one-byte remaining length (a small CONNECT).
    while buf.len() < 2 || buf.len() < 2 + usize::from(buf[1]) {
        anyhow::ensure!(more(&mut buf)?, "closed inside the first packet");
    }
    let first_packet = buf[..2 + usize::from(buf[1])].to_vec();
    let is_connect = first_packet[0] == 0x10;
    seen.lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .push(Seen {
            header,
            first_packet,
        });
    if is_connect {
        s.write_all(&[0x20, 0x02, 0x00, 0x00])?;
    }
    // Until the client leaves.
    while s.read(&mut chunk).is_ok_and(|n| n > 0) {}
    Ok(())
}

/// A backend that records how each connection started.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn start() -> anyhow::Result<Recorder> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let addr = serve_threads("recorder", move |s| record(s, &s2))?;
        Ok(Recorder { addr, seen })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The connection whose header names `client` as its source, once it came.
    async fn from(&self, client: SocketAddr) -> anyhow::Result<Seen> {
        let mut found = None;
        wait_until(&format!("a connection from {client}"), DEADLINE, || {
            found = self
                .seen()
                .into_iter()
                .find(|s| s.header.as_ref().and_then(Header::source) == Some(client));
            std::future::ready(found.is_some())
        })
        .await?;
        found.ok_or_else(|| anyhow::anyhow!("gone"))
    }
}

/// An in-process LB from `toml`, written to a file in `dir`.
async fn start_lb(dir: &TempDir, toml: &str) -> anyhow::Result<Lb> {
    let file = dir.path().join("lb.toml");
    std::fs::write(&file, toml)?;
    Ok(Lb::start(Config::load(&file)?, Listeners::default()).await?)
}

const LB_HEAD: &str =
    "[lb]\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\nwatch_config = false\n";

/// A pool `rec` of one recording backend sent PROXY `version`, probed by MQTT CONNECTs.
fn recorder_pool(rec: SocketAddr, version: &str) -> String {
    format!(
        "[[pool]]\nname = \"rec\"\nprobe = \"mq\"\nsend_proxy = \"{version}\"\n\
         [[pool.backend]]\nid = \"r1\"\naddr = \"{rec}\"\n\
         [[probe]]\nname = \"mq\"\nprotocol = \"mqtt\"\nport = \"traffic\"\n\
         interval = \"500ms\"\ntimeout = \"500ms\"\nthreshold = 1\n"
    )
}

fn connect_packet(client_id: &str) -> Vec<u8> {
    encode_connect(&ConnectOptions {
        client_id: client_id.into(),
        ..Default::default()
    })
}

/// Sends a CONNECT for `client_id` and reads the 4-byte CONNACK.
async fn mqtt_connect(
    s: &mut (impl AsyncRead + AsyncWrite + Unpin),
    client_id: &str,
) -> anyhow::Result<[u8; 4]> {
    s.write_all(&connect_packet(client_id)).await?;
    s.flush().await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut connack)).await??;
    Ok(connack)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_proxy_backend_gets_the_client_address_before_the_connect() -> anyhow::Result<()> {
    for version in ["v2", "v1"] {
        let rec = Recorder::start()?;
        let dir = TempDir::new("proxy")?;
        let lb = start_lb(
            &dir,
            &format!(
                "{LB_HEAD}[[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\n{}\
                 [[rule]]\nname = \"r\"\nfrontend = \"mqtt\"\npool = \"rec\"\n\
                 distribution = \"mqtt-client-id\"\n",
                recorder_pool(rec.addr, version)
            ),
        )
        .await?;
        let front = lb
            .frontend_addr("mqtt")
            .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
        let mut c = TcpStream::connect(front).await?;
        assert_eq!(mqtt_connect(&mut c, "sensor-1").await?, [0x20, 2, 0, 0]);
        let got = rec.from(c.local_addr()?).await?;
        let header = got
            .header
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no header"))?;
        match (version, header) {
            ("v1", Header::V1 { .. }) => {}
            ("v2", Header::V2 { tlvs, .. }) => assert!(tlvs.is_empty(), "plain: no TLV"),
            _ => anyhow::bail!("{version}: got {header:?}"),
        }
        assert_eq!(header.destination(), Some(front), "{version}");
        assert_eq!(got.first_packet, connect_packet("sensor-1"), "{version}");
        // The MQTT probe said LOCAL (no client) before its own CONNECT, and was answered.
        let local_probe = || {
            rec.seen()
                .into_iter()
                .find(|s| s.header.as_ref().is_some_and(Header::is_local))
        };
        wait_until("a probe with a LOCAL header", DEADLINE, || {
            std::future::ready(local_probe().is_some())
        })
        .await?;
        let probe = local_probe().ok_or_else(|| anyhow::anyhow!("{version}: no LOCAL probe"))?;
        assert_eq!(
            probe.first_packet[0], 0x10,
            "{version}: the probe's CONNECT"
        );
        wait_until("the probe answered", DEADLINE, || {
            let ok = [("pool", "rec"), ("backend", "r1"), ("result", "ok")];
            std::future::ready(metric(&lb.metrics_text(), "mqlb_probes_total", &ok) >= 1.0)
        })
        .await?;
        drop(c);
        lb.shutdown().await;
    }
    Ok(())
}

/// A CA and a leaf for 127.0.0.1 in `dir` (chain.pem, key.pem); the CA's DER.
fn pki(dir: &TempDir) -> anyhow::Result<rustls::pki_types::CertificateDer<'static>> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let leaf_key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])?.signed_by(&leaf_key, &ca)?;
    std::fs::write(dir.path().join("chain.pem"), leaf.pem())?;
    std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem())?;
    Ok(ca.der().clone())
}

/// A rustls client trusting `ca`, speaking only `version`.
fn tls_client(
    ca: &rustls::pki_types::CertificateDer<'static>,
    version: &'static rustls::SupportedProtocolVersion,
) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

async fn tls_connect<S: AsyncRead + AsyncWrite + Unpin>(
    connector: &tokio_rustls::TlsConnector,
    socket: S,
) -> anyhow::Result<tokio_rustls::client::TlsStream<S>> {
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    Ok(tokio::time::timeout(DEADLINE, connector.connect(name, socket)).await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_tls_frontend_the_header_carries_the_ssl_tlv() -> anyhow::Result<()> {
    let rec = Recorder::start()?;
    let dir = TempDir::new("proxy-tls")?;
    let ca = pki(&dir)?;
    let cert = dir.path().join("chain.pem");
    let key = dir.path().join("key.pem");
    let lb = start_lb(
        &dir,
        &format!(
            "{LB_HEAD}[[frontend]]\nname = \"mqtts\"\nbind = \"127.0.0.1:0\"\n\
             tls = {{ cert = {:?}, key = {:?} }}\n{}\
             [[rule]]\nname = \"r\"\nfrontend = \"mqtts\"\npool = \"rec\"\n\
             distribution = \"mqtt-client-id\"\n",
            cert.display().to_string(),
            key.display().to_string(),
            recorder_pool(rec.addr, "v2")
        ),
    )
    .await?;
    let front = lb
        .frontend_addr("mqtts")
        .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
    for (version, name) in [
        (&rustls::version::TLS13, "TLSv1.3"),
        (&rustls::version::TLS12, "TLSv1.2"),
    ] {
        let socket = TcpStream::connect(front).await?;
        let local = socket.local_addr()?;
        let mut s = tls_connect(&tls_client(&ca, version)?, socket).await?;
        assert_eq!(mqtt_connect(&mut s, "tls-1").await?, [0x20, 2, 0, 0]);
        let got = rec.from(local).await?;
        assert_eq!(
            got.first_packet,
            connect_packet("tls-1"),
            "decrypted CONNECT"
        );
        let Some(Header::V2 { tlvs, .. }) = &got.header else {
            anyhow::bail!("not v2: {:?}", got.header);
        };
        let ssl = tlvs
            .iter()
            .find(|(t, _)| *t == v2::Type::SSL as u8)
            .ok_or_else(|| anyhow::anyhow!("no SSL TLV in {tlvs:?}"))?;
        // client: PP2_CLIENT_SSL; verify: non-zero (no client certificate); then sub-TLVs.
        assert_eq!(ssl.1[0], 0x01);
        assert_ne!(ssl.1[1..5], [0, 0, 0, 0]);
        let subs: Vec<_> = v2::TypeLengthValues::from(&ssl.1[5..])
            .filter_map(Result::ok)
            .map(|t| (t.kind, t.value.to_vec()))
            .collect();
        assert!(
            subs.contains(&(v2::Type::SSLVersion as u8, name.as_bytes().to_vec())),
            "{name}: {subs:?}"
        );
        drop(s);
    }
    lb.shutdown().await;
    Ok(())
}

/// An LB whose frontend `in` trusts PROXY headers from `trusted` (a CIDR), in front of three
/// recording backends with `distribution = "source-ip"`, and a frontend `other` trusting
/// only 10.0.0.0/8 (so not this test's 127.0.0.1) on the same pool, five-tuple.
struct Behind {
    recorders: Vec<Recorder>,
    lb: Lb,
    front: SocketAddr,
    other: SocketAddr,
    admin: SocketAddr,
    _dir: TempDir,
}

impl Behind {
    async fn start(frontend_extra: &str) -> anyhow::Result<Behind> {
        let recorders = (0..3)
            .map(|_| Recorder::start())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut t = format!(
            "{LB_HEAD}[[frontend]]\nname = \"in\"\nbind = \"127.0.0.1:0\"\n\
             accept_proxy = [\"127.0.0.0/8\"]\n{frontend_extra}\n\
             [[frontend]]\nname = \"other\"\nbind = \"127.0.0.1:0\"\n\
             accept_proxy = [\"10.0.0.0/8\"]\n\
             [[pool]]\nname = \"rec\"\nprobe = \"alive\"\n"
        );
        for (i, r) in recorders.iter().enumerate() {
            t += &format!(
                "[[pool.backend]]\nid = \"r{}\"\naddr = \"{}\"\n",
                i + 1,
                r.addr
            );
        }
        t += "[[probe]]\nname = \"alive\"\nprotocol = \"tcp\"\nport = \"traffic\"\n\
              interval = \"1s\"\ntimeout = \"500ms\"\nthreshold = 1\n\
              [[rule]]\nname = \"in\"\nfrontend = \"in\"\npool = \"rec\"\n\
              distribution = \"source-ip\"\ninspect_timeout = \"1s\"\n\
              [[rule]]\nname = \"other\"\nfrontend = \"other\"\npool = \"rec\"\n";
        let dir = TempDir::new("proxy-behind")?;
        let lb = start_lb(&dir, &t).await?;
        let addr = |n: &str| lb.frontend_addr(n).ok_or_else(|| anyhow::anyhow!("no {n}"));
        Ok(Behind {
            front: addr("in")?,
            other: addr("other")?,
            admin: lb.admin_addr(),
            recorders,
            lb,
            _dir: dir,
        })
    }

    /// The `/api/connections` entry whose peer is `peer`, once it is listed.
    async fn listed(&self, peer: SocketAddr) -> anyhow::Result<serde_json::Value> {
        let start = std::time::Instant::now();
        loop {
            let all = mqlb_tests::get_json(self.admin, "/api/connections").await?;
            let found = all
                .as_array()
                .and_then(|a| a.iter().find(|c| c["peer"] == peer.to_string().as_str()));
            if let Some(c) = found {
                return Ok(c.clone());
            }
            if start.elapsed() > DEADLINE {
                anyhow::bail!("{peer} not in /api/connections within {DEADLINE:?}: {all}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn errors(&self, reason: &str) -> f64 {
        metric(
            &self.lb.metrics_text(),
            "mqlb_proxy_header_errors_total",
            &[("frontend", "in"), ("reason", reason)],
        )
    }

    /// Every first packet the recorders saw.
    fn passed(&self) -> Vec<Vec<u8>> {
        self.recorders
            .iter()
            .flat_map(|r| r.seen().into_iter().map(|s| s.first_packet))
            .collect()
    }
}

/// A v1 or v2 header claiming `src` connected to `dst`.
fn claim(v1: bool, src: SocketAddr, dst: SocketAddr) -> anyhow::Result<Vec<u8>> {
    if v1 {
        return Ok(ppp::v1::Addresses::from((src, dst))
            .to_string()
            .into_bytes());
    }
    Ok(v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (src, dst),
    )
    .build()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_header_is_the_client_for_source_ip_hashing_and_the_connection_table(
) -> anyhow::Result<()> {
    use mqlb_lb::select::{backend_hash, rendezvous_order, Candidate, Key};
    let t = Behind::start("").await?;
    let ids = ["r1", "r2", "r3"];
    let cands: Vec<Candidate> = ids
        .iter()
        .map(|id| Candidate {
            hash: backend_hash(id),
            weight: 1,
            active: 0,
            eligible: true,
        })
        .collect();
    let mut chosen = std::collections::HashSet::new();
    let mut open = Vec::new();
    for i in 0..8u8 {
        let claimed = SocketAddr::from(([198, 51, 100, 10 + i], 40_000 + u16::from(i)));
        let key = Key::SourceIp {
            src: claimed.ip(),
            dst: t.front.ip(),
        };
        let want = ids[rendezvous_order(key.hash(), &cands)[0]];
        chosen.insert(want);
        let v1 = i % 2 == 0;
        let mut c = TcpStream::connect(t.front).await?;
        c.write_all(&claim(v1, claimed, t.front)?).await?;
        let id = format!("behind-{i}");
        assert_eq!(mqtt_connect(&mut c, &id).await?, [0x20, 2, 0, 0], "{id}");
        let entry = t.listed(claimed).await?;
        assert_eq!(entry["backend"], want, "{claimed} (v1: {v1})");
        open.push(c);
    }
    assert!(chosen.len() >= 2, "8 sources all hash to {chosen:?}");
    // The header went no further: the backends saw each CONNECT first.
    let passed = t.passed();
    assert_eq!(passed.len(), 8);
    assert!(passed.iter().all(|p| p[0] == 0x10), "{passed:?}");

    // From a source the frontend does not trust, a header is data, as without accept_proxy.
    let mut c = TcpStream::connect(t.other).await?;
    let claimed: SocketAddr = "198.51.100.99:1".parse()?;
    let line = claim(true, claimed, t.other)?;
    c.write_all(&line).await?;
    c.write_all(&connect_packet("untrusted")).await?;
    let entry = t.listed(c.local_addr()?).await?;
    assert_eq!(entry["rule"], "other");
    wait_until("the line reached a backend as data", DEADLINE, || {
        let seen = t.recorders.iter().flat_map(|r| r.seen()).any(|s| {
            s.header.as_ref().and_then(Header::source) == Some(claimed)
                && s.first_packet == connect_packet("untrusted")
        });
        std::future::ready(seen)
    })
    .await?;
    drop((open, c));
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_from_a_trusted_source_are_refused_and_counted_by_reason() -> anyhow::Result<()>
{
    let t = Behind::start("").await?;
    for reason in ["missing", "malformed", "too_large", "timeout", "eof"] {
        assert_eq!(t.errors(reason), 0.0, "{reason} visible at 0");
    }
    let mut too_large = v2::PROTOCOL_PREFIX.to_vec();
    too_large.extend_from_slice(&[0x21, 0x11, 0xf0, 0x00]);
    let cases: [(&str, Vec<u8>); 3] = [
        // A client that bypassed the LB in front: its CONNECT first.
        ("missing", connect_packet("bypass")),
        (
            "malformed",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 99999\r\n".to_vec(),
        ),
        ("too_large", too_large),
    ];
    for (reason, sent) in cases {
        let mut c = TcpStream::connect(t.front).await?;
        c.write_all(&sent).await?;
        c.write_all(&connect_packet("after")).await?;
        let started = std::time::Instant::now();
        assert_eq!(
            read_until_closed(&mut c).await?,
            b"",
            "{reason}: closed, nothing said"
        );
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{reason}: at once"
        );
        wait_until(&format!("{reason} counted"), DEADLINE, || {
            std::future::ready(t.errors(reason) == 1.0)
        })
        .await?;
    }
    // Closed half-way: eof. Stalled half-way: cut at the inspect timeout (1 s).
    let mut c = TcpStream::connect(t.front).await?;
    c.write_all(b"PROXY TCP4 ").await?;
    c.shutdown().await?;
    read_until_closed(&mut c).await?;
    let mut c = TcpStream::connect(t.front).await?;
    c.write_all(b"PROXY TCP4 198.51").await?;
    let started = std::time::Instant::now();
    read_until_closed(&mut c).await?;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "cut after {took:?}");
    for reason in ["eof", "timeout"] {
        wait_until(&format!("{reason} counted"), DEADLINE, || {
            std::future::ready(t.errors(reason) == 1.0)
        })
        .await?;
    }
    assert!(
        t.passed().is_empty(),
        "nothing reached a backend: {:?}",
        t.passed()
    );

    // A v2 header and the CONNECT in 1-byte writes is read like any other.
    let claimed: SocketAddr = "203.0.113.50:5000".parse()?;
    let mut c = TcpStream::connect(t.front).await?;
    c.set_nodelay(true)?;
    let all = [claim(false, claimed, t.front)?, connect_packet("slow")].concat();
    for b in &all {
        c.write_all(&[*b]).await?;
        c.flush().await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut connack = [0u8; 4];
    tokio::time::timeout(DEADLINE, c.read_exact(&mut connack)).await??;
    assert_eq!(connack, [0x20, 2, 0, 0]);
    assert_eq!(t.listed(claimed).await?["rule"], "in");
    assert_eq!(t.passed(), [connect_packet("slow")]);
    let m = t.lb.metrics_text();
    assert_eq!(
        metric(
            &m,
            "mqlb_connections_total",
            &[("rule", "in"), ("outcome", "rejected")]
        ),
        5.0
    );
    drop(c);
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_limits_count_the_address_a_header_names() -> anyhow::Result<()> {
    let t = Behind::start("max_connections_per_source = 1").await?;
    let (a, b): (SocketAddr, SocketAddr) = ("198.51.100.1:1".parse()?, "198.51.100.2:1".parse()?);
    let open = |src: SocketAddr, id: &'static str| {
        let front = t.front;
        async move {
            let mut c = TcpStream::connect(front).await?;
            c.write_all(&claim(false, src, front)?).await?;
            let ack = mqtt_connect(&mut c, id).await;
            anyhow::Ok((c, ack))
        }
    };
    let (first, ack) = open(a, "a-1").await?;
    assert_eq!(ack?, [0x20, 2, 0, 0]);
    // All come from 127.0.0.1; the second claiming `a` is over a's limit, `b` is not.
    let (_second, ack) = open(a, "a-2").await?;
    assert!(ack.is_err(), "a's second connection is refused");
    let (third, ack) = open(b, "b-1").await?;
    assert_eq!(ack?, [0x20, 2, 0, 0]);
    let m = t.lb.metrics_text();
    assert_eq!(
        metric(
            &m,
            "mqlb_connections_refused_total",
            &[("frontend", "in"), ("reason", "max_connections_per_source")]
        ),
        1.0
    );
    drop(first);
    // a's place is given back with its connection.
    wait_until("a admitted again", DEADLINE, || async {
        let Ok((_c, ack)) = open(a, "a-3").await else {
            return false;
        };
        ack.is_ok()
    })
    .await?;
    drop(third);
    t.lb.shutdown().await;
    Ok(())
}

/// A socket whose first write goes out with `prefix` before it, in one write: a PROXY header
/// and a ClientHello in the same segment, as an LB in front sends them.
struct Prefixed {
    inner: TcpStream,
    prefix: Option<Vec<u8>>,
    pending: Vec<u8>,
    claimed: usize,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Some(p) = this.prefix.take() {
            this.pending = [p.as_slice(), buf].concat();
            this.claimed = buf.len();
        }
        if this.pending.is_empty() {
            return std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        while !this.pending.is_empty() {
            match std::pin::Pin::new(&mut this.inner).poll_write(cx, &this.pending) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => drop(this.pending.drain(..n)),
                other => return other,
            }
        }
        Poll::Ready(Ok(this.claimed))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Behind an LB in front, on a TLS frontend: the header comes before the handshake (alone, or
/// in one segment with the ClientHello), its address is the client's in the connection table,
/// and a `send_proxy` pool passes that address on, with the SSL TLV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_header_comes_before_tls_and_is_passed_on() -> anyhow::Result<()> {
    let rec = Recorder::start()?;
    let dir = TempDir::new("proxy-tls-behind")?;
    let ca = pki(&dir)?;
    let lb = start_lb(
        &dir,
        &format!(
            "{LB_HEAD}[[frontend]]\nname = \"mqtts\"\nbind = \"127.0.0.1:0\"\n\
             accept_proxy = [\"127.0.0.0/8\"]\ntls = {{ cert = {:?}, key = {:?} }}\n{}\
             [[rule]]\nname = \"r\"\nfrontend = \"mqtts\"\npool = \"rec\"\n\
             distribution = \"mqtt-client-id\"\n",
            dir.path().join("chain.pem").display().to_string(),
            dir.path().join("key.pem").display().to_string(),
            recorder_pool(rec.addr, "v2")
        ),
    )
    .await?;
    let front = lb
        .frontend_addr("mqtts")
        .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
    let admin = lb.admin_addr();
    let connector = tls_client(&ca, &rustls::version::TLS13)?;
    let mut open = Vec::new();
    for (i, together) in [(0u8, false), (1, true)] {
        let claimed = SocketAddr::from(([198, 51, 100, 70 + i], 7000));
        let header = claim(false, claimed, front)?;
        let mut socket = TcpStream::connect(front).await?;
        socket.set_nodelay(true)?;
        let id = format!("behind-tls-{i}");
        let ack = if together {
            let prefixed = Prefixed {
                inner: socket,
                prefix: Some(header),
                pending: Vec::new(),
                claimed: 0,
            };
            let mut s = tls_connect(&connector, prefixed).await?;
            let ack = mqtt_connect(&mut s, &id).await?;
            open.push(tokio::spawn(async move {
                let mut b = [0u8; 1];
                let _ = tokio::time::timeout(DEADLINE, s.read(&mut b)).await;
            }));
            ack
        } else {
            socket.write_all(&header).await?;
            let mut s = tls_connect(&connector, socket).await?;
            let ack = mqtt_connect(&mut s, &id).await?;
            open.push(tokio::spawn(async move {
                let mut b = [0u8; 1];
                let _ = tokio::time::timeout(DEADLINE, s.read(&mut b)).await;
            }));
            ack
        };
        assert_eq!(
            ack,
            [0x20, 2, 0, 0],
            "{id} (with the ClientHello: {together})"
        );
        // The connection table lists the claimed client, over TLS.
        let all = mqlb_tests::get_json(admin, "/api/connections").await?;
        let entry = all
            .as_array()
            .and_then(|a| a.iter().find(|c| c["client_id"] == id.as_str()).cloned())
            .ok_or_else(|| anyhow::anyhow!("{id} not listed: {all}"))?;
        assert_eq!(entry["peer"], claimed.to_string().as_str(), "{entry}");
        assert_eq!(entry["tls"], "TLSv1.3");
        // The backend gets the claimed client, not the LB in front, and the SSL TLV.
        let got = rec.from(claimed).await?;
        assert_eq!(got.first_packet, connect_packet(&id));
        let Some(Header::V2 { tlvs, .. }) = &got.header else {
            anyhow::bail!("not v2: {:?}", got.header);
        };
        assert!(
            tlvs.iter().any(|(t, _)| *t == v2::Type::SSL as u8),
            "{tlvs:?}"
        );
    }
    // The LB's own data-path probe, known by its address, needs no header to get through.
    wait_until("mqlb_data_path_up 1", DEADLINE, || {
        let up = metric(&lb.metrics_text(), "mqlb_data_path_up", &[("rule", "r")]);
        std::future::ready(up == 1.0)
    })
    .await?;
    for t in open {
        t.abort();
    }
    lb.shutdown().await;
    Ok(())
}

/// mqlb behind mqlb: the outer LB sends PROXY v2 to the inner one, which trusts it; real MQTT
/// goes through both to mosquitto, and the inner LB lists the real client, not the outer LB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqlb_behind_mqlb_sees_the_real_client() -> anyhow::Result<()> {
    use mqlb_tests::{Client, Mosquitto, QoS};
    let broker = Mosquitto::start().await?;
    let dir = TempDir::new("proxy-chain")?;
    let inner_dir = TempDir::new("proxy-chain-inner")?;
    let inner = start_lb(
        &inner_dir,
        &format!(
            "{LB_HEAD}[[frontend]]\nname = \"in\"\nbind = \"127.0.0.1:0\"\n\
             accept_proxy = [\"127.0.0.0/8\"]\n\
             [[pool]]\nname = \"brokers\"\nprobe = \"alive\"\n\
             [[pool.backend]]\nid = \"m1\"\naddr = \"{}\"\n\
             [[probe]]\nname = \"alive\"\nprotocol = \"tcp\"\nport = \"traffic\"\n\
             interval = \"1s\"\ntimeout = \"500ms\"\nthreshold = 1\n\
             [[rule]]\nname = \"inner\"\nfrontend = \"in\"\npool = \"brokers\"\n\
             distribution = \"mqtt-client-id\"\n",
            broker.addr()
        ),
    )
    .await?;
    let inner_front = inner
        .frontend_addr("in")
        .ok_or_else(|| anyhow::anyhow!("no in"))?;
    // The outer LB's MQTT probe of the inner one sends a LOCAL header, which it takes.
    let outer = start_lb(
        &dir,
        &format!(
            "{LB_HEAD}[[frontend]]\nname = \"out\"\nbind = \"127.0.0.1:0\"\n\
             [[pool]]\nname = \"inner\"\nprobe = \"mq\"\nsend_proxy = \"v2\"\n\
             [[pool.backend]]\nid = \"lb2\"\naddr = \"{inner_front}\"\n\
             [[probe]]\nname = \"mq\"\nprotocol = \"mqtt\"\nport = \"traffic\"\n\
             interval = \"500ms\"\ntimeout = \"500ms\"\nthreshold = 1\n\
             [[rule]]\nname = \"outer\"\nfrontend = \"out\"\npool = \"inner\"\n\
             distribution = \"mqtt-client-id\"\n"
        ),
    )
    .await?;
    let front = outer
        .frontend_addr("out")
        .ok_or_else(|| anyhow::anyhow!("no out"))?;
    let sub = Client::connect(front, "chain-sub").await?;
    sub.subscribe("chain/#", QoS::AtLeastOnce).await?;
    let publisher = Client::connect(front, "chain-pub").await?;
    publisher.publish_qos1("chain/t", b"through both").await?;
    wait_until("the message through both LBs", DEADLINE, || {
        std::future::ready(sub.received().iter().any(|m| m.payload == b"through both"))
    })
    .await?;
    let peer_of = |lb: SocketAddr, id: &'static str| async move {
        let all = mqlb_tests::get_json(lb, "/api/connections").await?;
        all.as_array()
            .and_then(|a| a.iter().find(|c| c["client_id"] == id))
            .and_then(|c| c["peer"].as_str().map(String::from))
            .ok_or_else(|| anyhow::anyhow!("{id} not listed at {lb}: {all}"))
    };
    for id in ["chain-sub", "chain-pub"] {
        let real = peer_of(outer.admin_addr(), id).await?;
        assert_eq!(peer_of(inner.admin_addr(), id).await?, real, "{id}");
    }
    wait_until("the outer probe ok", DEADLINE, || {
        let ok = [("pool", "inner"), ("backend", "lb2"), ("result", "ok")];
        std::future::ready(metric(&outer.metrics_text(), "mqlb_probes_total", &ok) >= 1.0)
    })
    .await?;
    let errors = |reason| {
        metric(
            &inner.metrics_text(),
            "mqlb_proxy_header_errors_total",
            &[("frontend", "in"), ("reason", reason)],
        )
    };
    assert_eq!(errors("missing") + errors("malformed"), 0.0);
    sub.disconnect().await;
    publisher.disconnect().await;
    outer.shutdown().await;
    inner.shutdown().await;
    Ok(())
}

/// `accept_proxy` follows reloads on a listener that stays open: the next connection after
/// the reload is read by the new list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_proxy_follows_a_reload() -> anyhow::Result<()> {
    let rec = Recorder::start()?;
    let dir = TempDir::new("proxy-reload")?;
    let toml = |accept: &str| {
        format!(
            "{LB_HEAD}[[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\n{accept}\n\
             [[pool]]\nname = \"rec\"\nprobe = \"alive\"\n\
             [[pool.backend]]\nid = \"r1\"\naddr = \"{}\"\n\
             [[probe]]\nname = \"alive\"\nprotocol = \"tcp\"\nport = \"traffic\"\n\
             interval = \"1s\"\ntimeout = \"500ms\"\nthreshold = 1\n\
             [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"rec\"\n",
            rec.addr
        )
    };
    let lb = start_lb(&dir, &toml("")).await?;
    let front = lb
        .frontend_addr("f")
        .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
    // Sends a v1 header claiming `claimed`, then a CONNECT; true if the backend got the CONNECT
    // first (the header was taken), false if it got the header as data.
    let send = |claimed: SocketAddr, id: &'static str| {
        let rec = &rec;
        async move {
            let mut c = TcpStream::connect(front).await?;
            c.write_all(&claim(true, claimed, front)?).await?;
            mqtt_connect(&mut c, id).await?;
            let mut got = None;
            wait_until(&format!("{id} at the backend"), DEADLINE, || {
                got = rec
                    .seen()
                    .into_iter()
                    .find(|s| s.first_packet == connect_packet(id));
                std::future::ready(got.is_some())
            })
            .await?;
            let got = got.ok_or_else(|| anyhow::anyhow!("gone"))?;
            anyhow::Ok(got.header.is_none())
        }
    };
    let claimed: SocketAddr = "198.51.100.5:5".parse()?;
    assert!(!send(claimed, "before").await?, "not trusted yet: data");
    std::fs::write(
        dir.path().join("lb.toml"),
        toml("accept_proxy = [\"127.0.0.0/8\"]"),
    )?;
    lb.reload().await?;
    assert_eq!(lb.frontend_addr("f"), Some(front), "the listener stays");
    assert!(send(claimed, "trusted").await?, "taken after the reload");
    std::fs::write(dir.path().join("lb.toml"), toml(""))?;
    lb.reload().await?;
    assert!(!send(claimed, "after").await?, "data again");
    lb.shutdown().await;
    Ok(())
}
