//! mqlb's broker nodes serve MQTT over TLS themselves and read PROXY headers from the LBs in
//! front (issue 15): mosquitto's clients (and rustls) straight to a node's `mqtts` /
//! `mqtts_v5` listeners, with and without client certificates; a cluster of `mqlb` processes
//! whose LB pool sends PROXY v2, where the node lists the client's own address; headers from
//! sources not in `accept_proxy`, malformed or missing ones, garbage and a stalled handshake,
//! each refused and counted by reason. Certificates are made per test ([`Pki`]).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{read_until_closed, DEADLINE};
use mqlb_config::BrokerNode;
use mqlb_mqtt::{encode_connect, ConnectOptions, ProtocolLevel};
use mqlb_tests::pki::{Pki, BOTH};
use mqlb_tests::{
    free_port, http, loopback, metric, mosquitto_pub_with, wait_until, Cluster, MosquittoSub,
    Shape, Topology,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// `tls = { cert, key ... }` of a broker, as a user writes it, with `extra` keys
/// (`client_ca = ...`).
fn tls_table(pki: &Pki, extra: &str) -> String {
    format!(
        "{{ cert = {:?}, key = {:?}{extra} }}",
        pki.path_str("chain.pem"),
        pki.path_str("key.pem")
    )
}

/// What `[[broker]]` with these TLS and PROXY keys loads as: the config's own checks and
/// builder, as `mqlb broker -c` would run them.
fn loaded(tls: &str, accept_proxy: &str, timeout: &str) -> anyhow::Result<BrokerNode> {
    let text = format!(
        "[[broker]]\nid = \"n\"\nmqtt = \"127.0.0.1:1\"\nmqtts = \"127.0.0.1:2\"\n\
         mqtts_v5 = \"127.0.0.1:3\"\ntls = {tls}\naccept_proxy = {accept_proxy}\n\
         handshake_timeout = \"{timeout}\"\n"
    );
    let c = mqlb_config::Config::parse(&text, "broker.toml")?;
    c.brokers
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no broker"))
}

/// One in-process node with `mqtts` and `mqtts_v5` on free ports, the TLS and PROXY keys of
/// [`loaded`].
async fn tls_node(tls: &str, accept_proxy: &str, timeout: &str) -> anyhow::Result<Cluster> {
    let want = loaded(tls, accept_proxy, timeout)?;
    Cluster::start_shaped(1, |n| {
        n.mqtts = Some(loopback(free_port()?));
        n.mqtts_v5 = Some(loopback(free_port()?));
        n.tls = want.tls.clone();
        n.accept_proxy = want.accept_proxy.clone();
        n.handshake_timeout = want.handshake_timeout;
        Ok(())
    })
    .await
}

fn node_metric(c: &Cluster, name: &str, labels: &[(&str, &str)]) -> f64 {
    c.node(0)
        .map_or(0.0, |n| metric(&n.metrics_text(), name, labels))
}

async fn wait_node_metric(
    c: &Cluster,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) -> anyhow::Result<()> {
    wait_until(
        &format!("{name} {labels:?} == {want}"),
        DEADLINE,
        || async { node_metric(c, name, labels) == want },
    )
    .await
    .map(|_| ())
}

/// A TCP connection to `to` from the loopback address `from` (any of 127.0.0.0/8): a client
/// whose address differs from the LB's.
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    Ok(tokio::time::timeout(DEADLINE, s.connect(to)).await??)
}

/// Sends a CONNECT (`client_id`, 3.1.1 or 5.0) and returns its CONNACK's return / reason code.
async fn mqtt_connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    client_id: &str,
    level: ProtocolLevel,
) -> anyhow::Result<u8> {
    let connect = encode_connect(&ConnectOptions {
        level,
        client_id: client_id.into(),
        keep_alive: 60,
        ..ConnectOptions::default()
    });
    s.write_all(&connect).await?;
    tokio::time::timeout(DEADLINE, async {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await?;
        anyhow::ensure!(head[0] == 0x20, "not a CONNACK: {head:?}");
        let mut body = vec![0u8; usize::from(head[1])];
        s.read_exact(&mut body).await?;
        Ok(body[1])
    })
    .await?
}

/// Where `/api/clients` of the node at `http` lists `client_id`: `(listener, peer)`.
async fn listed(
    http_addr: SocketAddr,
    client_id: &str,
) -> anyhow::Result<Option<(String, String)>> {
    let (status, body) = http(http_addr, "GET", "/api/clients").await?;
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

/// Waits until the node lists `client_id` (its CONNACK is out before the listing is read).
async fn wait_listed(http_addr: SocketAddr, client_id: &str) -> anyhow::Result<(String, String)> {
    let start = Instant::now();
    loop {
        if let Some(found) = listed(http_addr, client_id).await? {
            return Ok(found);
        }
        anyhow::ensure!(
            start.elapsed() < DEADLINE,
            "{client_id} not in /api/clients within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TLS handshake with the node's listener by a client trusting the test CA.
async fn tls_connect<S: AsyncRead + AsyncWrite + Unpin>(
    pki: &Pki,
    socket: S,
) -> anyhow::Result<tokio_rustls::client::TlsStream<S>> {
    let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let connector = pki.client(&["mqtt"], BOTH)?;
    Ok(tokio::time::timeout(DEADLINE, connector.connect(name, socket)).await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_publish_and_subscribe_on_a_brokers_tls_listeners_in_3_1_1_and_5(
) -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let c = tls_node(&tls_table(&pki, ""), "[]", "10s").await?;
    let (Some(mqtts), Some(mqtts_v5)) = c.mqtts(0) else {
        anyhow::bail!("no TLS listeners");
    };
    let ca = pki.path_str("ca.pem");
    let v311 = ["--cafile", ca.as_str()];
    let v5 = ["--cafile", ca.as_str(), "-V", "mqttv5"];
    // A 3.1.1 subscriber on mqtts, a 5.0 publisher on mqtts_v5.
    let mut sub = MosquittoSub::start_with(mqtts, "tls-sub", "tls/#", &v311)?;
    sub.wait_subscribed("tls/ping", || {
        mosquitto_pub_with(mqtts_v5, "tls-ping", "tls/ping", "ping", &v5)
    })
    .await?;
    mosquitto_pub_with(mqtts_v5, "tls-pub-5", "tls/five", "over-tls-5", &v5)?;
    mosquitto_pub_with(mqtts, "tls-pub-311", "tls/four", "over-tls-311", &v311)?;
    let mut got = sub.lines(2, "tls/ping", DEADLINE);
    got.sort();
    assert_eq!(got, ["tls/five over-tls-5", "tls/four over-tls-311"]);
    // The node lists the subscriber on its TLS listener, with its own address.
    let http = c.http(0).ok_or_else(|| anyhow::anyhow!("no http"))?;
    let (listener, peer) = wait_listed(http, "tls-sub").await?;
    assert_eq!(listener, "mqtts");
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");
    // rustls, MQTT 5.0 over TLS 1.3 or 1.2: a CONNACK 0.
    let mut s = tls_connect(&pki, TcpStream::connect(mqtts_v5).await?).await?;
    assert_eq!(
        mqtt_connect(&mut s, "rustls-5", ProtocolLevel::V5).await?,
        0
    );
    assert_eq!(wait_listed(http, "rustls-5").await?.0, "mqtts_v5");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_client_ca_takes_only_certificates_of_that_ca() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    pki.client_cert("device-1")?;
    let other = Pki::new()?;
    other.client_cert("intruder")?;
    let extra = format!(", client_ca = {:?}", pki.path_str("ca.pem"));
    let c = tls_node(&tls_table(&pki, &extra), "[]", "10s").await?;
    let (Some(mqtts), _) = c.mqtts(0) else {
        anyhow::bail!("no TLS listener");
    };
    let (ca, cert, key) = (
        pki.path_str("ca.pem"),
        pki.path_str("device-1.pem"),
        pki.path_str("device-1-key.pem"),
    );
    mosquitto_pub_with(
        mqtts,
        "device-1",
        "devices/1",
        "hello",
        &["--cafile", &ca, "--cert", &cert, "--key", &key],
    )?;
    // Once each, no retry: without a certificate, and with another CA's.
    let (icert, ikey) = (
        other.path_str("intruder.pem"),
        other.path_str("intruder-key.pem"),
    );
    for extra in [vec![], vec!["--cert", &icert, "--key", &ikey]] {
        let ok = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &mqtts.port().to_string()])
            .args(["-i", "no-cert", "-t", "t", "-m", "m", "--cafile", &ca])
            .args(&extra)
            .stderr(Stdio::null())
            .status()?
            .success();
        assert!(!ok, "mosquitto_pub {extra:?} got through");
    }
    let refused = || {
        ["protocol", "alert", "eof", "io_error"]
            .iter()
            .map(|r| {
                node_metric(
                    &c,
                    "mqlb_broker_tls_handshake_errors_total",
                    &[("listener", "mqtts"), ("reason", r)],
                )
            })
            .sum::<f64>()
    };
    wait_until("two handshakes refused", DEADLINE, || async {
        refused() >= 2.0
    })
    .await?;
    Ok(())
}

/// PROXY headers on a plain listener: read from `accept_proxy`'s sources only, the address
/// taken from them, LOCAL keeping the socket's; anything else from a trusted source, and a
/// header from any other source, refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_are_taken_from_trusted_sources_only() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let c = tls_node(&tls_table(&pki, ""), "[\"127.0.0.2/32\"]", "1s").await?;
    let (mqtt, http) = (
        c.mqtt(0),
        c.http(0).ok_or_else(|| anyhow::anyhow!("no http"))?,
    );
    let lb = Ipv4Addr::new(127, 0, 0, 2);
    let errors = |reason: &str| {
        node_metric(
            &c,
            "mqlb_broker_proxy_header_errors_total",
            &[("listener", "mqtt"), ("reason", reason)],
        )
    };

    // From the LB: a v1 header claiming a client, then its CONNECT in the same write.
    let mut s = connect_from(lb, mqtt).await?;
    s.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 1883\r\n")
        .await?;
    assert_eq!(
        mqtt_connect(&mut s, "behind-lb", ProtocolLevel::V311).await?,
        0
    );
    assert_eq!(
        wait_listed(http, "behind-lb").await?,
        ("mqtt".into(), "203.0.113.9:40000".into())
    );
    // A v2 LOCAL (the LB's probe): the socket's address stays.
    let mut probe = connect_from(lb, mqtt).await?;
    probe
        .write_all(&mqlb_config::proxy::local(mqlb_config::ProxyVersion::V2))
        .await?;
    assert_eq!(
        mqtt_connect(&mut probe, "lb-probe", ProtocolLevel::V311).await?,
        0
    );
    let (_, peer) = wait_listed(http, "lb-probe").await?;
    assert_eq!(peer, probe.local_addr()?.to_string());

    // From the LB without a header, or with a broken one: refused before MQTT, by reason.
    for (sent, reason) in [
        (encode_connect(&ConnectOptions::default()), "missing"),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 99999\r\n".to_vec(),
            "malformed",
        ),
    ] {
        let mut s = connect_from(lb, mqtt).await?;
        s.write_all(&sent).await?;
        assert!(
            read_until_closed(&mut s).await?.is_empty(),
            "{reason}: answered"
        );
        wait_node_metric(
            &c,
            "mqlb_broker_proxy_header_errors_total",
            &[("listener", "mqtt"), ("reason", reason)],
            1.0,
        )
        .await?;
    }
    // Stalled half-way: cut at handshake_timeout (1 s).
    let mut s = connect_from(lb, mqtt).await?;
    s.write_all(b"PROXY TCP4 1.2").await?;
    let at = Instant::now();
    assert!(read_until_closed(&mut s).await?.is_empty());
    assert!(
        at.elapsed() >= Duration::from_millis(900),
        "{:?}",
        at.elapsed()
    );
    wait_node_metric(
        &c,
        "mqlb_broker_proxy_header_errors_total",
        &[("listener", "mqtt"), ("reason", "timeout")],
        1.0,
    )
    .await?;

    // From anywhere else a header is no client's: refused, never taken.
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 3), mqtt).await?;
    let mut spoof = b"PROXY TCP4 198.51.100.1 127.0.0.1 4000 1883\r\n".to_vec();
    spoof.extend(encode_connect(&ConnectOptions {
        client_id: "spoofer".into(),
        ..ConnectOptions::default()
    }));
    s.write_all(&spoof).await?;
    assert!(
        read_until_closed(&mut s).await?.is_empty(),
        "untrusted header answered"
    );
    wait_node_metric(
        &c,
        "mqlb_broker_proxy_header_errors_total",
        &[("listener", "mqtt"), ("reason", "untrusted")],
        1.0,
    )
    .await?;
    assert_eq!(listed(http, "spoofer").await?, None);
    // ... and a plain client there is served with its own address.
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 3), mqtt).await?;
    assert_eq!(
        mqtt_connect(&mut s, "direct", ProtocolLevel::V311).await?,
        0
    );
    assert_eq!(
        wait_listed(http, "direct").await?.1,
        s.local_addr()?.to_string()
    );
    assert_eq!(
        errors("eof") + errors("io_error") + errors("too_large"),
        0.0
    );
    Ok(())
}

/// A TLS listener: garbage is refused at once, a stalled handshake at handshake_timeout while
/// other clients get through, and behind a trusted LB the PROXY header comes before TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_a_stalled_handshake_are_refused_and_counted_holding_up_no_one(
) -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let c = tls_node(&tls_table(&pki, ""), "[\"127.0.0.2/32\"]", "1s").await?;
    let (Some(mqtts), _) = c.mqtts(0) else {
        anyhow::bail!("no TLS listener");
    };
    let http = c.http(0).ok_or_else(|| anyhow::anyhow!("no http"))?;
    let tls_errors = &[("listener", "mqtts"), ("reason", "not_tls")];

    let mut garbage = TcpStream::connect(mqtts).await?;
    let at = Instant::now();
    garbage.write_all(b"hello, not TLS\r\n\r\n").await?;
    read_until_closed(&mut garbage).await?;
    assert!(
        at.elapsed() < Duration::from_millis(900),
        "{:?}",
        at.elapsed()
    );
    wait_node_metric(
        &c,
        "mqlb_broker_tls_handshake_errors_total",
        tls_errors,
        1.0,
    )
    .await?;
    // A plain MQTT CONNECT is no TLS either.
    let mut plain = TcpStream::connect(mqtts).await?;
    plain
        .write_all(&encode_connect(&ConnectOptions::default()))
        .await?;
    read_until_closed(&mut plain).await?;
    wait_node_metric(
        &c,
        "mqlb_broker_tls_handshake_errors_total",
        tls_errors,
        2.0,
    )
    .await?;

    // Stalled: the socket is open and silent; meanwhile a real client connects at once.
    let mut stalled = TcpStream::connect(mqtts).await?;
    stalled.write_all(&[0x16, 0x03, 0x01]).await?;
    let at = Instant::now();
    let mut s = tls_connect(&pki, TcpStream::connect(mqtts).await?).await?;
    assert_eq!(
        mqtt_connect(&mut s, "not-held-up", ProtocolLevel::V311).await?,
        0
    );
    assert!(
        at.elapsed() < Duration::from_millis(900),
        "held up {:?}",
        at.elapsed()
    );
    read_until_closed(&mut stalled).await?;
    assert!(
        at.elapsed() >= Duration::from_millis(900),
        "{:?}",
        at.elapsed()
    );
    wait_node_metric(
        &c,
        "mqlb_broker_tls_handshake_errors_total",
        &[("listener", "mqtts"), ("reason", "timeout")],
        1.0,
    )
    .await?;

    // Behind the LB: v2 header first (in the clear), then TLS, then MQTT.
    let mut lb = connect_from(Ipv4Addr::new(127, 0, 0, 2), mqtts).await?;
    let header = mqlb_config::proxy::encode(
        mqlb_config::ProxyVersion::V2,
        "192.0.2.44:5555".parse()?,
        mqtts,
        None,
    )?;
    lb.write_all(&header).await?;
    let mut s = tls_connect(&pki, lb).await?;
    assert_eq!(
        mqtt_connect(&mut s, "tls-behind-lb", ProtocolLevel::V311).await?,
        0
    );
    assert_eq!(
        wait_listed(http, "tls-behind-lb").await?,
        ("mqtts".into(), "192.0.2.44:5555".into())
    );
    assert_eq!(
        node_metric(&c, "mqlb_broker_proxy_header_errors_total", &[]),
        0.0
    );
    Ok(())
}

/// The whole path as a user runs it: `mqlb` processes (HA server, two brokers, the LB), the
/// pool sending PROXY v2 and the brokers trusting the LB's address. A client from another
/// address is listed by its broker with that address; the LB's probes (LOCAL) keep both
/// brokers up; and each broker's own TLS listener serves mosquitto_pub straight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_lb_sending_proxy_v2_the_broker_shows_the_clients_own_address(
) -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let tls = tls_table(&pki, "");
    let t = Topology::start_shaped(
        2,
        &Shape {
            pool: "send_proxy = \"v2\"",
            broker: "accept_proxy = [\"127.0.0.1/32\"]",
            broker_tls: Some(&tls),
            ..Shape::default()
        },
    )
    .await?;
    let device = Ipv4Addr::new(127, 0, 0, 9);
    let mut s = connect_from(device, t.front).await?;
    assert_eq!(
        mqtt_connect(&mut s, "device-9", ProtocolLevel::V311).await?,
        0
    );
    let me = s.local_addr()?.to_string();
    let start = Instant::now();
    let (on, found) = 'found: loop {
        for b in &t.brokers {
            if let Some(found) = listed(b.http, "device-9").await? {
                break 'found (b.id.clone(), found);
            }
        }
        anyhow::ensure!(start.elapsed() < DEADLINE, "device-9 listed by no broker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(found, ("mqtt".to_string(), me), "on {on}");
    for b in &t.brokers {
        let (_, text) = http(b.http, "GET", "/metrics").await?;
        for reason in ["missing", "malformed", "untrusted", "timeout"] {
            let labels = [("listener", "mqtt"), ("reason", reason)];
            assert_eq!(
                metric(&text, "mqlb_broker_proxy_header_errors_total", &labels),
                0.0,
                "{} {reason}",
                b.id
            );
        }
        let mqtts = b.mqtts.ok_or_else(|| anyhow::anyhow!("no mqtts"))?;
        let ca = pki.path_str("ca.pem");
        // From another address than the LB's, which the node wants a header from.
        let opts = ["--cafile", ca.as_str(), "-A", "127.0.0.9"];
        mosquitto_pub_with(mqtts, &format!("tls-{}", b.id), "t/tls", "m", &opts)?;
    }
    Ok(())
}

/// The certificate renewed in place (as certbot does) and the node's `tls` loaded again (what
/// `mqlb broker`'s SIGHUP does): new clients get the new certificate, a live one keeps its
/// session; loading the same files again changes nothing, and files that do not load are a
/// config error that leaves the certificate in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_a_renewed_certificate_to_new_clients_and_keeps_live_ones(
) -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let table = tls_table(&pki, "");
    let c = tls_node(&table, "[]", "10s").await?;
    let node = c.node(0).ok_or_else(|| anyhow::anyhow!("no node"))?;
    let (Some(mqtts), _) = c.mqtts(0) else {
        anyhow::bail!("no TLS listener");
    };
    let served = |s: &tokio_rustls::client::TlsStream<TcpStream>| {
        s.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
    };
    let mut live = tls_connect(&pki, TcpStream::connect(mqtts).await?).await?;
    assert_eq!(
        mqtt_connect(&mut live, "live", ProtocolLevel::V311).await?,
        0
    );
    let before = served(&live);

    let renewed = pki.leaf(
        &["127.0.0.1", "localhost"],
        (4096, 1, 1),
        "chain.pem",
        "key.pem",
    )?;
    let again = loaded(&table, "[]", "10s")?;
    assert!(node.reload_tls(again.tls.as_ref())?, "a new certificate");
    assert!(
        !node.reload_tls(again.tls.as_ref())?,
        "the same files again"
    );
    let fresh = tls_connect(&pki, TcpStream::connect(mqtts).await?).await?;
    assert_eq!(served(&fresh), Some(renewed.clone()));
    assert_ne!(before, Some(renewed.clone()));
    // The live connection still answers a PINGREQ.
    live.write_all(&[0xc0, 0x00]).await?;
    let mut pong = [0u8; 2];
    tokio::time::timeout(DEADLINE, live.read_exact(&mut pong)).await??;
    assert_eq!(pong, [0xd0, 0x00]);

    std::fs::write(pki.path("chain.pem"), "not a certificate")?;
    let err = loaded(&table, "[]", "10s").expect_err("a broken certificate loads");
    assert!(err.to_string().contains("broker[0].tls.cert"), "{err}");
    let after = tls_connect(&pki, TcpStream::connect(mqtts).await?).await?;
    assert_eq!(served(&after), Some(renewed));
    Ok(())
}
