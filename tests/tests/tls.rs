//! TLS termination on an LB frontend (issue 15): real TLS clients (mosquitto's, rustls) through
//! an in-process LB to mosquitto brokers, the CONNECT read inside TLS and routed by client ID,
//! and what is not a handshake refused and counted. Certificates are made per test: a CA and a
//! leaf for 127.0.0.1 and localhost, in the test's own directory.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::{backend_of, candidates, mqtt_connect, ping, read_until_closed, DEADLINE};
use mqlb_config::Config;
use mqlb_lb::{Lb, Listeners};
use mqlb_mqtt::{encode_connect, ConnectOptions};
use mqlb_tests::pki::{Pki, BOTH};
use mqlb_tests::{connections, metric, mosquitto_pub_with, wait_until, Mosquitto, MosquittoSub};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A TLS client case: client ID, ALPN offered, the one version spoken, ALPN negotiated.
type Case = (
    &'static str,
    &'static [&'static str],
    &'static rustls::SupportedProtocolVersion,
    Option<&'static [u8]>,
);

/// An LB with a TLS frontend `mqtts` (rule `tls`) and a plain one `mqtt` (rule `plain`), both
/// routing by client ID to the same brokers.
struct TlsTopo {
    _brokers: Vec<Mosquitto>,
    lb: Lb,
    tls: SocketAddr,
    plain: SocketAddr,
    admin: SocketAddr,
    pki: Pki,
}

impl TlsTopo {
    async fn start(n: usize, tls_rule_extra: &str) -> anyhow::Result<TlsTopo> {
        Self::start_with(n, tls_rule_extra, "watch_config = false\n", |_| {
            Ok(String::new())
        })
        .await
    }

    /// With `lb_extra` keys in `[lb]` (which set `watch_config`), and the keys `tls_extra`
    /// returns (given the PKI, which it may add files to) in the frontend's `tls`.
    async fn start_with(
        n: usize,
        tls_rule_extra: &str,
        lb_extra: &str,
        tls_extra: impl FnOnce(&Pki) -> anyhow::Result<String>,
    ) -> anyhow::Result<TlsTopo> {
        let pki = Pki::new()?;
        let tls_extra = tls_extra(&pki)?;
        let mut brokers = Vec::new();
        for _ in 0..n {
            brokers.push(Mosquitto::start().await?);
        }
        let mut t = format!(
            "[lb]\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n{lb_extra}\
             [[frontend]]\nname = \"mqtts\"\nbind = \"127.0.0.1:0\"\n\
             tls = {{ cert = {:?}, key = {:?}{tls_extra} }}\n\
             [[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
             [[pool]]\nname = \"brokers\"\nprobe = \"alive\"\n",
            pki.path_str("chain.pem"),
            pki.path_str("key.pem"),
            lb_extra = lb_extra,
            tls_extra = tls_extra,
        );
        for (i, b) in brokers.iter().enumerate() {
            t += &format!(
                "[[pool.backend]]\nid = \"b{}\"\naddr = \"{}\"\n",
                i + 1,
                b.addr()
            );
        }
        t += &format!(
            "[[probe]]\nname = \"alive\"\nprotocol = \"tcp\"\nport = \"traffic\"\n\
             interval = \"1s\"\ntimeout = \"500ms\"\nthreshold = 1\n\
             [[rule]]\nname = \"tls\"\nfrontend = \"mqtts\"\npool = \"brokers\"\n\
             distribution = \"mqtt-client-id\"\n{tls_rule_extra}\n\
             [[rule]]\nname = \"plain\"\nfrontend = \"mqtt\"\npool = \"brokers\"\n\
             distribution = \"mqtt-client-id\"\n"
        );
        let file = pki.path("lb.toml");
        std::fs::write(&file, t)?;
        let lb = Lb::start(Config::load(&file)?, Listeners::default()).await?;
        let addr = |name: &str| {
            lb.frontend_addr(name)
                .ok_or_else(|| anyhow::anyhow!("frontend {name} not open"))
        };
        Ok(TlsTopo {
            tls: addr("mqtts")?,
            plain: addr("mqtt")?,
            admin: lb.admin_addr(),
            _brokers: brokers,
            lb,
            pki,
        })
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.lb.metrics_text(), name, labels)
    }

    async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
    ) -> anyhow::Result<()> {
        wait_until(
            &format!("{name} {labels:?} == {want}"),
            DEADLINE,
            || async { self.metric(name, labels) == want },
        )
        .await
        .map(|_| ())
    }

    /// A TLS connection to the TLS frontend by `connector`, verifying the name 127.0.0.1.
    async fn tls_connect<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        connector: &tokio_rustls::TlsConnector,
        socket: S,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<S>> {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        tokio::time::timeout(DEADLINE, connector.connect(name, socket))
            .await
            .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
    }
}

/// The `tls` of `client_id` in `/api/connections`, once it is listed.
async fn tls_listed(admin: SocketAddr, client_id: &str) -> anyhow::Result<Option<String>> {
    let start = Instant::now();
    loop {
        let all = mqlb_tests::get_json(admin, "/api/connections").await?;
        let found = all
            .as_array()
            .and_then(|a| a.iter().find(|c| c["client_id"] == client_id));
        if let Some(c) = found {
            return Ok(c["tls"].as_str().map(String::from));
        }
        if start.elapsed() > DEADLINE {
            anyhow::bail!("{client_id} not in /api/connections within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_publish_and_subscribe_through_the_tls_frontend() -> anyhow::Result<()> {
    let t = TlsTopo::start(1, "").await?;
    let ca = t.pki.path_str("ca.pem");
    let tls_opts = ["--cafile", ca.as_str()];
    let mut sub = MosquittoSub::start_with(t.tls, "tls-sub", "tls/#", &tls_opts)?;
    let front = t.tls;
    sub.wait_subscribed("tls/ping", || {
        mosquitto_pub_with(front, "tls-ping", "tls/ping", "ping", &tls_opts)
    })
    .await?;
    mosquitto_pub_with(t.tls, "tls-pub", "tls/hello", "over-tls", &tls_opts)?;
    let got = sub.lines(1, "tls/ping", DEADLINE);
    assert_eq!(got, ["tls/hello over-tls"]);
    // The subscriber is routed by its client ID inside TLS.
    assert_eq!(backend_of(t.admin, "tls-sub").await?, "b1");
    assert!(t.metric("mqlb_tls_handshakes_total", &[("frontend", "mqtts")]) >= 3.0);
    assert!(
        t.metric(
            "mqlb_route_decisions_total",
            &[("rule", "tls"), ("method", "mqtt-client-id")]
        ) >= 3.0
    );
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_client_id_over_tls_lands_where_rendezvous_hashing_puts_it() -> anyhow::Result<()>
{
    use mqlb_lb::select::{rendezvous_order, Key};
    let t = TlsTopo::start(3, "").await?;
    let ids = ["b1", "b2", "b3"];
    let cands = candidates(&ids);
    let connector = t.pki.client(&["mqtt"], BOTH)?;
    let mut chosen = std::collections::HashSet::new();
    for i in 0..8 {
        let id = format!("tls-sensor-{i}");
        let want = ids[rendezvous_order(Key::ClientId(&id).hash(), &cands)[0]];
        chosen.insert(want);
        for round in 0..2 {
            let mut s = t
                .tls_connect(&connector, TcpStream::connect(t.tls).await?)
                .await?;
            assert_eq!(mqtt_connect(&mut s, &id).await?, [0x20, 2, 0, 0], "{id}");
            assert_eq!(backend_of(t.admin, &id).await?, want, "{id} round {round}");
            drop(s);
            wait_until(&format!("{id} gone"), DEADLINE, || async {
                connections(t.admin)
                    .await
                    .is_ok_and(|c| c.iter().all(|(c, _, _)| *c != id))
            })
            .await?;
        }
        // The plain frontend of the same pool puts it on the same broker.
        let mut s = TcpStream::connect(t.plain).await?;
        assert_eq!(mqtt_connect(&mut s, &id).await?, [0x20, 2, 0, 0]);
        assert_eq!(backend_of(t.admin, &id).await?, want, "{id} over plain TCP");
        assert_eq!(tls_listed(t.admin, &id).await?, None, "{id} over plain TCP");
    }
    assert!(
        chosen.len() >= 2,
        "8 IDs all hash to {chosen:?}: the test shows nothing"
    );
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rustls_clients_verify_the_chain_over_tls_1_3_and_1_2_with_or_without_alpn(
) -> anyhow::Result<()> {
    let t = TlsTopo::start(1, "").await?;
    // (client ID, ALPN offered, the one version spoken, ALPN negotiated)
    let cases: [Case; 3] = [
        (
            "v13-alpn",
            &["mqtt"],
            &rustls::version::TLS13,
            Some(b"mqtt"),
        ),
        (
            "v12-alpn",
            &["mqtt"],
            &rustls::version::TLS12,
            Some(b"mqtt"),
        ),
        ("v13-none", &[], &rustls::version::TLS13, None),
    ];
    for (id, alpn, version, negotiated) in cases {
        let connector = t.pki.client(alpn, &[version])?;
        let mut s = t
            .tls_connect(&connector, TcpStream::connect(t.tls).await?)
            .await?;
        let (_, session) = s.get_ref();
        assert_eq!(session.protocol_version(), Some(version.version), "{id}");
        assert_eq!(session.alpn_protocol(), negotiated, "{id}");
        assert_eq!(mqtt_connect(&mut s, id).await?, [0x20, 2, 0, 0], "{id}");
        let want = version.version.as_str().map(|v| v.replace('_', "."));
        let listed = tls_listed(t.admin, id).await?;
        assert_eq!(listed, want, "{id}: /api/connections tls");
    }
    assert_eq!(
        t.metric("mqlb_tls_handshakes_total", &[("frontend", "mqtts")]),
        3.0
    );

    // A client trusting another CA refuses the certificate and says so with an alert; one
    // offering only another ALPN protocol is refused by the server.
    let other = Pki::new()?;
    let stranger = other.client(&["mqtt"], BOTH)?;
    assert!(t
        .tls_connect(&stranger, TcpStream::connect(t.tls).await?)
        .await
        .is_err());
    t.wait_metric(
        "mqlb_tls_handshake_errors_total",
        &[("frontend", "mqtts"), ("reason", "alert")],
        1.0,
    )
    .await?;
    let http = t.pki.client(&["http/1.1"], BOTH)?;
    assert!(t
        .tls_connect(&http, TcpStream::connect(t.tls).await?)
        .await
        .is_err());
    t.wait_metric(
        "mqlb_tls_handshake_errors_total",
        &[("frontend", "mqtts"), ("reason", "protocol")],
        1.0,
    )
    .await?;
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_garbage_sent_to_the_tls_frontend_are_refused_and_counted_not_tls(
) -> anyhow::Result<()> {
    let t = TlsTopo::start(1, "").await?;
    let connect = encode_connect(&ConnectOptions {
        client_id: "plain-on-tls".into(),
        ..Default::default()
    });
    let inputs: [&[u8]; 2] = [&connect, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"];
    for (i, bytes) in inputs.iter().enumerate() {
        let mut s = TcpStream::connect(t.tls).await?;
        s.write_all(bytes).await?;
        let started = Instant::now();
        let answer = read_until_closed(&mut s).await?;
        // Refused at once (not at the inspect timeout), at most with a TLS alert record, never
        // a CONNACK from a broker.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(answer.first().is_none_or(|b| *b == 0x15), "{answer:?}");
        t.wait_metric(
            "mqlb_tls_handshake_errors_total",
            &[("frontend", "mqtts"), ("reason", "not_tls")],
            i as f64 + 1.0,
        )
        .await?;
    }
    // Never routed, never passed to a broker.
    assert_eq!(
        t.metric("mqlb_route_decisions_total", &[("rule", "tls")]),
        0.0
    );
    assert_eq!(
        t.metric(
            "mqlb_connections_total",
            &[("rule", "tls"), ("outcome", "rejected")]
        ),
        2.0
    );
    assert!(connections(t.admin).await?.is_empty());
    t.lb.shutdown().await;
    Ok(())
}

/// A stream that writes one byte per write, flushed, so the ClientHello reaches the LB in as
/// many TCP segments as it has bytes (TCP_NODELAY is set).
struct OneByteWrites(TcpStream);

impl AsyncRead for OneByteWrites {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for OneByteWrites {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = buf.len().min(1);
        Pin::new(&mut self.0).poll_write(cx, &buf[..n])
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_in_one_byte_writes_still_completes() -> anyhow::Result<()> {
    let t = TlsTopo::start(1, "").await?;
    let socket = TcpStream::connect(t.tls).await?;
    socket.set_nodelay(true)?;
    let connector = t.pki.client(&["mqtt"], BOTH)?;
    let mut s = t.tls_connect(&connector, OneByteWrites(socket)).await?;
    assert_eq!(mqtt_connect(&mut s, "trickle").await?, [0x20, 2, 0, 0]);
    assert_eq!(backend_of(t.admin, "trickle").await?, "b1");
    assert_eq!(
        t.metric("mqlb_tls_handshakes_total", &[("frontend", "mqtts")]),
        1.0
    );
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_cut_at_the_inspect_timeout_and_holds_up_no_one(
) -> anyhow::Result<()> {
    let t = TlsTopo::start(1, "inspect_timeout = \"2s\"\n").await?;
    // The first bytes of a ClientHello record (handshake, TLS 1.0 record version, a length),
    // then nothing.
    let mut stalled = TcpStream::connect(t.tls).await?;
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0xc8, 0x01])
        .await?;
    let started = Instant::now();
    // Meanwhile another client completes its handshake and CONNECT, while the stalled one is
    // still waited for.
    let connector = t.pki.client(&["mqtt"], BOTH)?;
    let mut s = t
        .tls_connect(&connector, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(mqtt_connect(&mut s, "not-held-up").await?, [0x20, 2, 0, 0]);
    let mut probe = [0u8; 16];
    let open = matches!(stalled.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    assert!(
        open,
        "the stalled client was cut before the other got through ({:?})",
        started.elapsed()
    );
    assert_eq!(
        t.metric(
            "mqlb_tls_handshake_errors_total",
            &[("frontend", "mqtts"), ("reason", "timeout")]
        ),
        0.0
    );

    read_until_closed(&mut stalled).await?;
    let after = started.elapsed();
    assert!(after >= Duration::from_millis(1500), "cut after {after:?}");
    assert!(after < Duration::from_secs(6), "cut after {after:?}");
    t.wait_metric(
        "mqlb_tls_handshake_errors_total",
        &[("frontend", "mqtts"), ("reason", "timeout")],
        1.0,
    )
    .await?;
    // A handshake that completes but is followed by no CONNECT is cut by the same deadline.
    let mut quiet = t
        .tls_connect(&connector, TcpStream::connect(t.tls).await?)
        .await?;
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let r = tokio::time::timeout(DEADLINE, quiet.read(&mut byte)).await?;
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let after = started.elapsed();
    assert!(after < Duration::from_secs(6), "cut after {after:?}");
    t.wait_metric(
        "mqlb_mqtt_connect_errors_total",
        &[("rule", "tls"), ("reason", "timeout")],
        1.0,
    )
    .await?;
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_the_certificate_under_live_tls_connections() -> anyhow::Result<()> {
    let t = TlsTopo::start(1, "").await?;
    let old_ca = t.pki.client(&["mqtt"], BOTH)?;
    let mut live = t
        .tls_connect(&old_ca, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(mqtt_connect(&mut live, "live").await?, [0x20, 2, 0, 0]);

    // Rotate: a leaf of another CA in the same files, then what SIGHUP does.
    let next = Pki::expiring((2031, 5, 17))?;
    for f in ["chain.pem", "key.pem"] {
        std::fs::copy(next.path(f), t.pki.path(f))?;
    }
    let expiry = |t: &TlsTopo| t.metric("mqlb_tls_cert_expiry_seconds", &[("frontend", "mqtts")]);
    // rcgen's certificates are valid until 4096-01-01.
    assert_eq!(expiry(&t), 67_090_118_400.0);
    t.lb.reload().await?;
    assert_eq!(expiry(&t), 1_936_742_400.0, "the rotated leaf's expiry");
    let new_ca = next.client(&["mqtt"], BOTH)?;
    let mut fresh = t
        .tls_connect(&new_ca, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(mqtt_connect(&mut fresh, "fresh").await?, [0x20, 2, 0, 0]);
    assert!(
        t.tls_connect(&old_ca, TcpStream::connect(t.tls).await?)
            .await
            .is_err(),
        "the old certificate is still served"
    );
    // The connection made before the rotation goes on.
    ping(&mut live).await?;

    // A broken file is refused, naming it and the frontend; the rotated certificate stays.
    std::fs::write(
        t.pki.path("chain.pem"),
        "-----BEGIN CERTIFICATE-----\nnope\n",
    )?;
    let e =
        t.lb.reload()
            .await
            .expect_err("a broken certificate is refused");
    let why = e.to_string();
    assert!(
        why.contains("chain.pem") && why.contains("\"mqtts\""),
        "{why}"
    );
    assert_eq!(
        t.metric("mqlb_config_reloads_total", &[("result", "error")]),
        1.0
    );
    assert_eq!(expiry(&t), 1_936_742_400.0);
    let mut again = t
        .tls_connect(&new_ca, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(mqtt_connect(&mut again, "again").await?, [0x20, 2, 0, 0]);
    ping(&mut live).await?;
    ping(&mut fresh).await?;
    assert_eq!(
        t.metric(
            "mqlb_connections_total",
            &[("rule", "tls"), ("outcome", "closed")]
        ),
        0.0,
        "a live connection was closed"
    );
    t.lb.shutdown().await;
    Ok(())
}

/// One MQTT packet: (first byte, body); `None` at a clean end of the stream.
async fn read_packet(s: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<Option<(u8, Vec<u8>)>> {
    let mut first = [0u8; 1];
    if s.read(&mut first).await? == 0 {
        return Ok(None);
    }
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        len |= usize::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            break;
        }
        shift += 7;
        anyhow::ensure!(shift < 28, "remaining length too long");
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok(Some((first[0], body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evacuated_mqtt5_client_is_told_inside_tls_then_closed_with_close_notify(
) -> anyhow::Result<()> {
    let t = TlsTopo::start(1, "").await?;
    let connector = t.pki.client(&["mqtt"], BOTH)?;
    let mut s = t
        .tls_connect(&connector, TcpStream::connect(t.tls).await?)
        .await?;
    s.write_all(&encode_connect(&ConnectOptions {
        level: mqlb_mqtt::ProtocolLevel::V5,
        client_id: "tls-v5".into(),
        ..Default::default()
    }))
    .await?;
    s.flush().await?;
    let connack = tokio::time::timeout(DEADLINE, read_packet(&mut s)).await??;
    assert!(
        matches!(&connack, Some((0x20, body)) if body.get(1) == Some(&0)),
        "{connack:?}"
    );
    let (code, body) = mqlb_tests::http(t.admin, "POST", "/api/backends/b1/evacuate").await?;
    assert_eq!(code, 200, "{body}");
    let told = tokio::time::timeout(DEADLINE, read_packet(&mut s)).await??;
    assert!(
        matches!(&told, Some((0xe0, body)) if body.first() == Some(&0x9c)),
        "not DISCONNECT 0x9C: {told:?}"
    );
    // Then the end of the TLS stream: a close_notify (rustls reports a bare TCP close as an
    // error, not as the end).
    let end = tokio::time::timeout(DEADLINE, read_packet(&mut s)).await?;
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(s);
    t.wait_metric(
        "mqlb_connections_total",
        &[("rule", "tls"), ("outcome", "evacuated")],
        1.0,
    )
    .await?;
    t.lb.shutdown().await;
    Ok(())
}

/// An MQTT packet: first byte, Remaining Length, body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabytes_both_ways_through_tls_arrive_intact() -> anyhow::Result<()> {
    let t = TlsTopo::start(1, "").await?;
    let connector = t.pki.client(&["mqtt"], BOTH)?;
    let mut s = t
        .tls_connect(&connector, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(mqtt_connect(&mut s, "bulk").await?, [0x20, 2, 0, 0]);
    let topic = b"bulk/echo";
    let mut sub = vec![0, 1, 0, topic.len() as u8];
    sub.extend_from_slice(topic);
    sub.push(0);
    s.write_all(&packet(0x82, &sub)).await?;
    s.flush().await?;
    let suback = tokio::time::timeout(DEADLINE, read_packet(&mut s)).await??;
    assert!(matches!(suback, Some((0x90, _))), "{suback:?}");
    // Larger than the copy buffer many times over, so both directions run as bulk streams
    // (which a plain connection would splice).
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut body = vec![0, topic.len() as u8];
    body.extend_from_slice(topic);
    body.extend_from_slice(&payload);
    let publish = packet(0x30, &body);
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        w.write_all(&publish).await?;
        w.flush().await?;
        anyhow::Ok(w)
    });
    let echoed = tokio::time::timeout(DEADLINE, read_packet(&mut r)).await??;
    let _w = writer.await??;
    let Some((first, got)) = echoed else {
        anyhow::bail!("closed before the echo");
    };
    assert_eq!(first & 0xf0, 0x30);
    assert_eq!(got.len(), body.len());
    assert!(got == body, "the echoed PUBLISH differs");
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_with_tickets_and_across_a_reload_that_keeps_the_certificate(
) -> anyhow::Result<()> {
    use rustls::HandshakeKind::{Full, Resumed};
    let t = TlsTopo::start(1, "").await?;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // One client config: its session store holds what the LB's tickets resume.
        let connector = t.pki.client(&["mqtt"], &[version])?;
        let mut kinds = Vec::new();
        for step in 0..4 {
            if step == 2 {
                // A reload that reads the same files changes nothing of the TLS.
                t.lb.reload().await?;
            }
            let mut s = t
                .tls_connect(&connector, TcpStream::connect(t.tls).await?)
                .await?;
            // The CONNACK is read after the TLS 1.3 tickets, which come right after the
            // handshake: the client has them before it reconnects.
            assert_eq!(mqtt_connect(&mut s, "resume").await?, [0x20, 2, 0, 0]);
            kinds.push(s.get_ref().1.handshake_kind());
            s.shutdown().await?;
        }
        assert_eq!(
            kinds,
            [Some(Full), Some(Resumed), Some(Resumed), Some(Resumed)],
            "{:?}",
            version.version
        );
    }
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_frontend_in_front_of_any_tcp_service_passes_half_closes_on() -> anyhow::Result<()> {
    let backend = common::count_then_reply_server().await?;
    let pki = Pki::new()?;
    // A five-tuple rule: no CONNECT is read, the decrypted bytes go to the service as they come.
    let toml = common::tcp_lb_toml(backend, "").replace(
        "bind = \"127.0.0.1:0\"\n",
        &format!(
            "bind = \"127.0.0.1:0\"\ntls = {{ cert = {:?}, key = {:?} }}\n",
            pki.path_str("chain.pem"),
            pki.path_str("key.pem")
        ),
    );
    let file = pki.path("lb.toml");
    std::fs::write(&file, toml)?;
    let lb = Lb::start(Config::load(&file)?, Listeners::default()).await?;
    let front = lb
        .frontend_addr("f")
        .ok_or_else(|| anyhow::anyhow!("frontend not open"))?;
    let connector = pki.client(&[], BOTH)?;
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut s = connector
        .connect(name, TcpStream::connect(front).await?)
        .await?;
    s.write_all(&[7u8; 100_000]).await?;
    // close_notify and FIN: the service sees its end of input, and answers on the other half.
    s.shutdown().await?;
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut answer)).await??;
    assert_eq!(answer, "got 100000");
    lb.shutdown().await;
    Ok(())
}

/// What `promtool check metrics` says of `text` (nothing: no lint); `None` when promtool is
/// missing outside CI (skipped; `.ci/run` installs it).
fn promtool_lint(text: &str) -> anyhow::Result<Option<String>> {
    use std::process::{Command, Stdio};
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: promtool not runnable ({e}; apt-get install prometheus)");
            return Ok(None);
        }
        Err(e) => anyhow::bail!("promtool not runnable, and CI is set: {e}"),
    };
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "promtool check metrics failed: {said}"
    );
    Ok(Some(said))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_series_pass_promtool() -> anyhow::Result<()> {
    let t = TlsTopo::start(1, "").await?;
    let connector = t.pki.client(&["mqtt"], BOTH)?;
    let mut s = t
        .tls_connect(&connector, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(mqtt_connect(&mut s, "scraped").await?, [0x20, 2, 0, 0]);
    let mut plain = TcpStream::connect(t.tls).await?;
    plain.write_all(b"not tls at all").await?;
    read_until_closed(&mut plain).await?;
    t.wait_metric(
        "mqlb_tls_handshake_errors_total",
        &[("frontend", "mqtts"), ("reason", "not_tls")],
        1.0,
    )
    .await?;
    // The LB's own data-path probe gets through the TLS frontend (in plain MQTT: it is known by
    // its address) without being counted as a handshake.
    t.wait_metric("mqlb_data_path_up", &[("rule", "tls")], 1.0)
        .await?;
    assert_eq!(
        t.metric("mqlb_tls_handshakes_total", &[("frontend", "mqtts")]),
        1.0
    );
    let text = t.lb.metrics_text();
    for name in [
        "mqlb_tls_handshakes_total",
        "mqlb_tls_handshake_errors_total",
        "mqlb_tls_cert_expiry_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} not exported"
        );
    }
    // Every reason is there at 0 before it first happens, so a rate() alert has a series.
    assert_eq!(
        t.metric(
            "mqlb_tls_handshake_errors_total",
            &[("frontend", "mqtts"), ("reason", "timeout")]
        ),
        0.0
    );
    assert!(
        text.contains("mqlb_tls_handshake_errors_total{frontend=\"mqtts\",reason=\"timeout\"} 0")
    );
    if let Some(lint) = promtool_lint(&text)? {
        assert!(lint.trim().is_empty(), "promtool check metrics: {lint}");
    }
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_clients_round_trip_over_tls_in_mqtt_3_1_1_and_5() -> anyhow::Result<()> {
    let t = TlsTopo::start(1, "").await?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/paho_roundtrip.py");
    for (proto, extra) in [("3.1.1", None), ("5.0", Some("v5"))] {
        let mut args = vec![
            script.display().to_string(),
            "127.0.0.1".into(),
            t.tls.port().to_string(),
            format!("paho-tls-sub-{proto}"),
            format!("paho-tls-pub-{proto}"),
            "20".into(),
        ];
        args.extend(extra.map(str::to_string));
        let ca = t.pki.path("ca.pem");
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .args(&args)
                .env("MQLB_CAFILE", ca)
                .output()
        })
        .await??;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "paho MQTT {proto} over TLS: {text} (install it: pip install paho-mqtt)"
        );
        assert!(text.contains("received 20 of 20: ok"), "{text}");
    }
    assert!(t.metric("mqlb_tls_handshakes_total", &[("frontend", "mqtts")]) >= 4.0);
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_watcher_takes_a_certificate_renewed_in_place() -> anyhow::Result<()> {
    let watch = "watch_config = true\nwatch_interval = \"100ms\"\n";
    let t = TlsTopo::start_with(1, "", watch, |_| Ok(String::new())).await?;
    let expiry = || t.metric("mqlb_tls_cert_expiry_seconds", &[("frontend", "mqtts")]);
    assert_eq!(expiry(), 67_090_118_400.0);
    // Renewed in place, the config file untouched (as certbot does): no SIGHUP.
    let next = Pki::expiring((2031, 5, 17))?;
    for f in ["key.pem", "chain.pem"] {
        std::fs::copy(next.path(f), t.pki.path(f))?;
    }
    wait_until("the renewed certificate served", DEADLINE, || async {
        expiry() == 1_936_742_400.0
    })
    .await?;
    let connector = next.client(&["mqtt"], BOTH)?;
    let mut s = t
        .tls_connect(&connector, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(mqtt_connect(&mut s, "renewed").await?, [0x20, 2, 0, 0]);
    // A key that is removed is refused (counted), and the renewed certificate stays. (The
    // watcher may have seen the new key beside the old chain above, and refused that too.)
    let refused = t.metric("mqlb_config_reloads_total", &[("result", "error")]);
    std::fs::remove_file(t.pki.path("key.pem"))?;
    t.wait_metric(
        "mqlb_config_reloads_total",
        &[("result", "error")],
        refused + 1.0,
    )
    .await?;
    assert_eq!(expiry(), 1_936_742_400.0);
    let mut again = t
        .tls_connect(&connector, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(mqtt_connect(&mut again, "still").await?, [0x20, 2, 0, 0]);
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_chosen_by_sni_with_the_first_one_for_the_rest() -> anyhow::Result<()> {
    let mut b_der = Vec::new();
    let t = TlsTopo::start_with(1, "", "watch_config = false\n", |pki| {
        b_der = pki.leaf(&["b.example.com"], (2031, 5, 17), "b.pem", "b.key")?;
        Ok(format!(
            ", sni = [{{ names = [\"b.example.com\"], cert = {:?}, key = {:?} }}]",
            pki.path_str("b.pem"),
            pki.path_str("b.key")
        ))
    })
    .await?;
    let default = {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_file(t.pki.path("chain.pem"))?.to_vec()
    };
    let connector = t.pki.client(&["mqtt"], BOTH)?;
    let served = |s: &tokio_rustls::client::TlsStream<TcpStream>| {
        s.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
    };
    for (name, want_b) in [("b.example.com", true), ("localhost", false)] {
        let server = ServerName::try_from(name.to_string())?;
        let mut s = tokio::time::timeout(
            DEADLINE,
            connector.connect(server, TcpStream::connect(t.tls).await?),
        )
        .await??;
        let leaf = served(&s).ok_or_else(|| anyhow::anyhow!("{name}: no certificate"))?;
        let want = if want_b { &b_der } else { &default };
        assert_eq!(&leaf, want, "{name}");
        assert_eq!(mqtt_connect(&mut s, name).await?, [0x20, 2, 0, 0], "{name}");
    }
    // No SNI at all (an IP address): the first certificate.
    let mut s = t
        .tls_connect(&connector, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(served(&s), Some(default.clone()));
    assert_eq!(mqtt_connect(&mut s, "by-ip").await?, [0x20, 2, 0, 0]);
    // The earliest expiry of the frontend's certificates.
    assert_eq!(
        t.metric("mqlb_tls_cert_expiry_seconds", &[("frontend", "mqtts")]),
        1_936_742_400.0
    );
    t.lb.shutdown().await;
    Ok(())
}

/// The backend port `/api/connections` lists `client_id` on.
async fn backend_port(admin: SocketAddr, client_id: &str) -> anyhow::Result<u16> {
    backend_of(admin, client_id).await?;
    let all = mqlb_tests::get_json(admin, "/api/connections").await?;
    let addr = all
        .as_array()
        .and_then(|a| a.iter().find(|c| c["client_id"] == client_id))
        .and_then(|c| c["backend_addr"].as_str().map(String::from))
        .ok_or_else(|| anyhow::anyhow!("{client_id} not listed"))?;
    Ok(addr.parse::<SocketAddr>()?.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_tls_the_version_picks_the_port_and_refusals_get_their_connack() -> anyhow::Result<()>
{
    let t = TlsTopo::start(1, "fallback = \"reject\"\n").await?;
    // The broker's second listener stands in for its MQTT 5 port.
    let (main, alt) = (t._brokers[0].port, t._brokers[0].alt_port);
    let file = t.pki.path("lb.toml");
    let toml = std::fs::read_to_string(&file)?;
    let with_ports = toml.replace(
        &format!("addr = \"{}\"\n", t._brokers[0].addr()),
        &format!(
            "addr = \"{}\"\nmqtt_ports = {{ v5 = {alt} }}\n",
            t._brokers[0].addr()
        ),
    );
    anyhow::ensure!(with_ports != toml, "mqtt_ports not written");
    std::fs::write(&file, with_ports)?;
    t.lb.reload().await?;
    let connector = t.pki.client(&["mqtt"], BOTH)?;
    let mut levels = Vec::new();
    for (id, level) in [
        ("tls-v5", mqlb_mqtt::ProtocolLevel::V5),
        ("tls-v4", mqlb_mqtt::ProtocolLevel::V311),
    ] {
        let mut s = t
            .tls_connect(&connector, TcpStream::connect(t.tls).await?)
            .await?;
        s.write_all(&encode_connect(&ConnectOptions {
            level,
            client_id: id.into(),
            ..Default::default()
        }))
        .await?;
        s.flush().await?;
        let ack = tokio::time::timeout(DEADLINE, read_packet(&mut s)).await??;
        assert!(matches!(ack, Some((0x20, _))), "{id}: {ack:?}");
        levels.push((id, backend_port(t.admin, id).await?));
        // Kept open until it is listed.
        drop(s);
    }
    assert_eq!(levels, [("tls-v5", alt), ("tls-v4", main)]);

    // An empty client ID on a rule that rejects it: CONNACK 0x02 (identifier rejected), inside
    // TLS, then the close.
    let mut s = t
        .tls_connect(&connector, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(mqtt_connect(&mut s, "").await?, [0x20, 2, 0, 2]);
    let mut rest = Vec::new();
    let r = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await?;
    assert!(r.is_ok() && rest.is_empty(), "{r:?} {rest:?}");
    t.wait_metric(
        "mqlb_mqtt_connect_errors_total",
        &[("rule", "tls"), ("reason", "empty_client_id")],
        1.0,
    )
    .await?;
    t.lb.shutdown().await;
    Ok(())
}

/// mTLS (issue 15): `client_ca` with `client_id = "cn"`. A client whose certificate the CA
/// signed and whose client ID is the certificate's CN gets through to the broker (a rustls
/// client and mosquitto_pub with --cert/--key); the same certificate with another client ID is
/// refused by the LB with CONNACK 2 (0x85 in 5.0) and counted `cn_mismatch`; no certificate, or
/// one from another CA, ends at the handshake, counted, and never reaches a broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_and_the_client_id_must_be_their_cn() -> anyhow::Result<()>
{
    let t = TlsTopo::start_with(1, "", "watch_config = false\n", |pki| {
        pki.client_cert("dev-1")?;
        Ok(format!(
            ", client_ca = {:?}, client_id = \"cn\"",
            pki.path_str("ca.pem")
        ))
    })
    .await?;
    let with_cert = t.pki.client_with_cert(&t.pki, "dev-1")?;
    let mut ok = t
        .tls_connect(&with_cert, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(
        mqtt_connect(&mut ok, "dev-1").await?,
        [0x20, 2, 0, 0],
        "its CN"
    );
    let mut other = t
        .tls_connect(&with_cert, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(
        mqtt_connect(&mut other, "dev-2").await?,
        [0x20, 2, 0, 2],
        "another client ID: identifier rejected"
    );
    t.wait_metric(
        "mqlb_mqtt_connect_errors_total",
        &[("rule", "tls"), ("reason", "cn_mismatch")],
        1.0,
    )
    .await?;
    let errors = || t.metric("mqlb_tls_handshake_errors_total", &[("frontend", "mqtts")]);
    let handshakes_failed = errors();
    // No certificate, a certificate from another CA, one of the right CA that expired: the
    // handshake fails (in TLS 1.3 the client sees it at its first read).
    let anonymous = t.pki.client(&[], BOTH)?;
    let stranger = Pki::new()?;
    stranger.client_cert("dev-1")?;
    let foreign = t.pki.client_with_cert(&stranger, "dev-1")?;
    t.pki.client_cert_until("dev-old", Some((2021, 1, 1)))?;
    let expired = t.pki.client_with_cert(&t.pki, "dev-old")?;
    for (connector, id, what) in [
        (&anonymous, "dev-1", "a client without a certificate"),
        (&foreign, "dev-1", "a certificate from another CA"),
        (&expired, "dev-old", "an expired certificate"),
    ] {
        let refused = match t
            .tls_connect(connector, TcpStream::connect(t.tls).await?)
            .await
        {
            Err(_) => true,
            Ok(mut s) => mqtt_connect(&mut s, id).await.is_err(),
        };
        assert!(refused, "{what} got a CONNACK");
    }
    wait_until("the three handshakes counted", DEADLINE, || async {
        errors() >= handshakes_failed + 3.0
    })
    .await?;
    // mosquitto_pub with the device's certificate and key, as a device would.
    let (ca, cert, key) = (
        t.pki.path_str("ca.pem"),
        t.pki.path_str("dev-1.pem"),
        t.pki.path_str("dev-1-key.pem"),
    );
    let device = [
        "--cafile",
        ca.as_str(),
        "--cert",
        cert.as_str(),
        "--key",
        key.as_str(),
    ];
    mqlb_tests::mosquitto_pub_with(t.tls, "dev-1", "devices/dev-1", "hello", &device)?;
    t.wait_metric(
        "mqlb_mqtt_connect_errors_total",
        &[("rule", "tls"), ("reason", "cn_mismatch")],
        1.0,
    )
    .await?;
    Ok(())
}

/// `client_auth = "optional"`: a client without a certificate completes the handshake; with
/// `client_id = "cn"` it is then refused at its CONNECT (it has no CN), while one with a
/// certificate gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_certificates_let_the_handshake_through_and_the_cn_rule_decides(
) -> anyhow::Result<()> {
    let t = TlsTopo::start_with(1, "", "watch_config = false\n", |pki| {
        pki.client_cert("dev-9")?;
        Ok(format!(
            ", client_ca = {:?}, client_auth = \"optional\", client_id = \"cn\"",
            pki.path_str("ca.pem")
        ))
    })
    .await?;
    let anonymous = t.pki.client(&[], BOTH)?;
    let mut s = t
        .tls_connect(&anonymous, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(
        mqtt_connect(&mut s, "dev-9").await?,
        [0x20, 2, 0, 2],
        "no CN"
    );
    let with_cert = t.pki.client_with_cert(&t.pki, "dev-9")?;
    let mut s = t
        .tls_connect(&with_cert, TcpStream::connect(t.tls).await?)
        .await?;
    assert_eq!(
        mqtt_connect(&mut s, "dev-9").await?,
        [0x20, 2, 0, 0],
        "its CN"
    );
    Ok(())
}

/// A TLS server for SNI pass-through tests: it terminates TLS with the PKI's `chain.pem` and
/// answers each connection's first line with its own `id`.
fn tls_echo_id(pki: &Pki, id: &'static str) -> anyhow::Result<SocketAddr> {
    use rustls::pki_types::pem::PemObject;
    let chain =
        CertificateDer::pem_file_iter(pki.path("chain.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(pki.path("key.pem"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(BOTH)?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut line = [0u8; 1];
                while matches!(tls.read(&mut line).await, Ok(1) if line[0] != b'\n') {}
                let _ = tls.write_all(format!("{id}\n").as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// `distribution = "sni"` (issue 15): the LB does not terminate TLS; it reads the ClientHello's
/// server name, routes by it with rendezvous hashing (each name always on the same backend, as
/// a client ID is), and passes the TLS through: the client's handshake completes with the
/// backend itself. A ClientHello without a server name falls back to the five-tuple, and
/// bytes that are not TLS are refused and counted `not_tls`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_pass_through_routes_by_server_name_and_the_backend_terminates() -> anyhow::Result<()> {
    use mqlb_lb::select::{rendezvous_order, Key};
    let pki = Pki::new()?;
    let names: Vec<String> = (0..8).map(|i| format!("dev-{i}.example")).collect();
    let all: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .chain(["127.0.0.1"])
        .collect();
    pki.leaf(&all, (4096, 1, 1), "chain.pem", "key.pem")?;
    let ids = ["s1", "s2"];
    let backends = [tls_echo_id(&pki, ids[0])?, tls_echo_id(&pki, ids[1])?];
    let toml = format!(
        "[lb]\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n\
         [[frontend]]\nname = \"pass\"\nbind = \"127.0.0.1:0\"\n\
         [[pool]]\nname = \"tls\"\nprobe = \"t\"\n\
         [[pool.backend]]\nid = \"s1\"\naddr = \"{}\"\n[[pool.backend]]\nid = \"s2\"\naddr = \"{}\"\n\
         [[probe]]\nname = \"t\"\nport = \"traffic\"\n\
         [[rule]]\nname = \"sni\"\nfrontend = \"pass\"\npool = \"tls\"\ndistribution = \"sni\"\n",
        backends[0], backends[1]
    );
    let lb = Lb::start(Config::parse(&toml, "test")?, Listeners::default()).await?;
    let front = lb
        .frontend_addr("pass")
        .ok_or_else(|| anyhow::anyhow!("frontend pass not open"))?;
    let cands = candidates(&ids);
    let connector = pki.client(&[], BOTH)?;
    let served_by = |name: String| {
        let connector = connector.clone();
        async move {
            let server = ServerName::try_from(name)?;
            let tcp = TcpStream::connect(front).await?;
            let mut tls = tokio::time::timeout(DEADLINE, connector.connect(server, tcp)).await??;
            tls.write_all(b"which?\n").await?;
            let mut answer = String::new();
            tokio::time::timeout(DEADLINE, tls.read_to_string(&mut answer)).await??;
            anyhow::Ok(answer.trim().to_string())
        }
    };
    let mut chosen = std::collections::HashSet::new();
    for name in &names {
        let want = ids[rendezvous_order(Key::ClientId(name).hash(), &cands)[0]];
        chosen.insert(want);
        for round in 0..2 {
            assert_eq!(served_by(name.clone()).await?, want, "{name} round {round}");
        }
    }
    assert!(
        chosen.len() == 2,
        "8 names all hash to {chosen:?}: the test shows nothing"
    );
    // No server name (an IP address is not sent as SNI): the five-tuple picks; it works.
    let any = served_by("127.0.0.1".to_string()).await?;
    assert!(ids.contains(&any.as_str()), "{any}");
    let decisions = metric(
        &lb.metrics_text(),
        "mqlb_route_decisions_total",
        &[("rule", "sni"), ("method", "no-sni-five-tuple")],
    );
    assert_eq!(decisions, 1.0, "counted as the fallback");
    // Not TLS at all: refused, counted.
    let mut plain = TcpStream::connect(front).await?;
    plain
        .write_all(&encode_connect(&ConnectOptions {
            client_id: "mqtt-on-tls".into(),
            ..Default::default()
        }))
        .await?;
    assert!(read_until_closed(&mut plain).await?.is_empty());
    wait_until("not_tls counted", DEADLINE, || async {
        metric(
            &lb.metrics_text(),
            "mqlb_mqtt_connect_errors_total",
            &[("rule", "sni"), ("reason", "not_tls")],
        ) == 1.0
    })
    .await?;
    lb.shutdown().await;
    Ok(())
}
