//! More end-to-end LB behaviour: the tuple and counting distributions, half-close, HTTP
//! probes, closing connections of a backend that goes down, listeners added by reload.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{lb_toml, topo, DEADLINE};
use mqlb_config::{Config, ProbeProtocol};
use mqlb_lb::mqtt::{encode_connect, ConnectOptions};
use mqlb_lb::{probe_once, Lb, Listeners, ProbeError};
use mqlb_tests::{backend_state, get_json, metric, wait_until, Mosquitto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Opens an MQTT session through `front` (raw CONNECT → CONNACK) and keeps the socket.
async fn mqtt_session(front: std::net::SocketAddr, id: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(front).await?;
    s.write_all(&encode_connect(&ConnectOptions {
        client_id: id.into(),
        ..Default::default()
    }))
    .await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut ack)).await??;
    anyhow::ensure!(ack == [0x20, 2, 0, 0], "{id}: CONNACK {ack:02x?}");
    Ok(s)
}

async fn per_backend(
    admin: std::net::SocketAddr,
    want_total: usize,
) -> anyhow::Result<HashMap<String, usize>> {
    wait_until("connections listed", DEADLINE, || async {
        get_json(admin, "/api/connections")
            .await
            .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == want_total))
    })
    .await?;
    let mut count = HashMap::new();
    for c in get_json(admin, "/api/connections")
        .await?
        .as_array()
        .into_iter()
        .flatten()
    {
        *count
            .entry(c["backend"].as_str().unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    Ok(count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_least_connections_and_source_ip_distribute_as_named() -> anyhow::Result<()> {
    // Round robin: 30 connections, 10 per backend. The data-path probe's own connection
    // (one a second, through the same frontend) takes a turn too, so allow one off.
    let t = topo(3, "distribution = \"round-robin\"\n").await?;
    let mut held = Vec::new();
    for i in 0..30 {
        held.push(mqtt_session(t.front, &format!("rr-{i}")).await?);
    }
    let counts = per_backend(t.admin, 30).await?;
    assert!(
        counts.len() == 3 && counts.values().all(|n| (9..=11).contains(n)),
        "round-robin: {counts:?}"
    );
    drop(held);
    t.lb.shutdown().await;

    // Least connections: held connections fill the backends evenly.
    let t = topo(3, "distribution = \"least-connections\"\n").await?;
    let mut held = Vec::new();
    for i in 0..12 {
        held.push(mqtt_session(t.front, &format!("lc-{i}")).await?);
        // Each new connection must see the previous one counted.
        let want = i + 1;
        wait_until("counted", DEADLINE, || async {
            get_json(t.admin, "/api/connections")
                .await
                .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == want))
        })
        .await?;
    }
    let counts = per_backend(t.admin, 12).await?;
    assert!(
        counts.len() == 3 && counts.values().all(|n| *n == 4),
        "least-connections: {counts:?}"
    );
    drop(held);
    t.lb.shutdown().await;

    // Source IP: every connection from 127.0.0.1 lands on one backend, whatever the port.
    let t = topo(3, "distribution = \"source-ip\"\n").await?;
    let mut held = Vec::new();
    for i in 0..10 {
        held.push(mqtt_session(t.front, &format!("sip-{i}")).await?);
    }
    let counts = per_backend(t.admin, 10).await?;
    assert_eq!(counts.len(), 1, "source-ip: {counts:?}");
    let m = t.lb.metrics_text();
    assert!(metric(&m, "mqlb_route_decisions_total", &[("method", "source-ip")]) >= 10.0);
    drop(held);
    t.lb.shutdown().await;
    Ok(())
}

/// A backend that reads until EOF, then answers with the byte count and closes: it only
/// answers if the client's FIN got through while the other direction stayed open.
async fn count_then_reply_server() -> anyhow::Result<std::net::SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut n = 0usize;
                let mut buf = [0u8; 8192];
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                if let Err(e) = s.write_all(format!("got {n}").as_bytes()).await {
                    eprintln!("count server: {e}");
                }
            });
        }
    });
    Ok(addr)
}

fn tcp_lb_toml(backend: std::net::SocketAddr, extra_rule: &str) -> String {
    format!(
        "[lb]\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n\
         [[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\n\
         [[pool]]\nname = \"p\"\nprobe = \"t\"\n[[pool.backend]]\nid = \"only\"\naddr = \"{backend}\"\n\
         [[probe]]\nname = \"t\"\nport = \"traffic\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n\
         [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n{extra_rule}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_passes_the_fin_and_keeps_the_other_direction() -> anyhow::Result<()> {
    let backend = count_then_reply_server().await?;
    let lb = Lb::start(
        Config::parse(&tcp_lb_toml(backend, ""), "test")?,
        Listeners::default(),
    )
    .await?;
    let front = lb
        .frontend_addr("f")
        .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
    let mut s = TcpStream::connect(front).await?;
    let payload = vec![7u8; 300_000];
    s.write_all(&payload).await?;
    s.shutdown().await?; // FIN: "I am done sending", still reading
    let mut reply = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut reply)).await??;
    assert_eq!(reply, "got 300000");
    let m = lb.metrics_text();
    wait_until("bytes counted", DEADLINE, || async {
        let m = lb.metrics_text();
        // The data-path probe's own connections add "got 0" (5 bytes) each, nothing inbound.
        let out = metric(&m, "mqlb_bytes_total", &[("direction", "out")]) as u64;
        metric(&m, "mqlb_bytes_total", &[("direction", "in")]) == 300_000.0
            && out >= 10
            && (out - 10).is_multiple_of(5)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{m}"))?;
    lb.shutdown().await;
    Ok(())
}

/// An echo backend: writes back everything it reads, then closes after the client's FIN.
async fn echo_server() -> anyhow::Result<std::net::SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if let Err(e) = tokio::io::copy(&mut r, &mut w).await {
                    eprintln!("echo server: {e}");
                }
            });
        }
    });
    Ok(addr)
}

/// Bulk streams (which the copy moves with splice(2) on Linux once a read fills a whole
/// buffer) arrive intact and in order both ways, small messages after them too, and every
/// byte is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_streams_are_relayed_intact_both_ways() -> anyhow::Result<()> {
    const LEN: usize = 24 << 20;
    let lb = Lb::start(
        Config::parse(&tcp_lb_toml(echo_server().await?, ""), "test")?,
        Listeners::default(),
    )
    .await?;
    let front = lb
        .frontend_addr("f")
        .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
    let mut streams = Vec::new();
    for seed in 0..3u32 {
        streams.push(tokio::spawn(async move {
            let data: Vec<u8> = (0..LEN as u32)
                .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as u8)
                .collect();
            let (mut r, mut w) = TcpStream::connect(front).await?.into_split();
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&sent).await?;
                // A small write after the bulk one: it must not be stuck behind a pipe.
                w.write_all(b"tail").await?;
                w.shutdown().await?;
                anyhow::Ok(())
            });
            let mut got = Vec::with_capacity(LEN + 4);
            tokio::time::timeout(DEADLINE * 2, r.read_to_end(&mut got)).await??;
            writer.await??;
            anyhow::ensure!(
                got.len() == LEN + 4,
                "got {} bytes of {}",
                got.len(),
                LEN + 4
            );
            anyhow::ensure!(got[..LEN] == data[..], "bulk bytes differ");
            anyhow::ensure!(&got[LEN..] == b"tail", "tail differs");
            anyhow::Ok(())
        }));
    }
    for s in streams {
        s.await??;
    }
    let total = 3.0 * (LEN + 4) as f64;
    wait_until("bytes counted", DEADLINE, || async {
        let m = lb.metrics_text();
        metric(&m, "mqlb_bytes_total", &[("direction", "in")]) == total
            && metric(&m, "mqlb_bytes_total", &[("direction", "out")]) >= total
    })
    .await?;
    lb.shutdown().await;
    Ok(())
}

/// When shutdown's grace runs out, connections still open are cut (both peers see the close),
/// counted, and shutdown returns how many it cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_what_outlives_the_grace_period() -> anyhow::Result<()> {
    let toml = tcp_lb_toml(echo_server().await?, "").replace(
        "watch_config = false\n",
        "watch_config = false\nshutdown_grace = \"300ms\"\n",
    );
    let lb = Lb::start(Config::parse(&toml, "test")?, Listeners::default()).await?;
    let front = lb
        .frontend_addr("f")
        .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(front).await?;
        s.write_all(b"hi").await?;
        let mut b = [0u8; 2];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut b)).await??;
        held.push(s);
    }
    let started = std::time::Instant::now();
    let cut = tokio::time::timeout(DEADLINE, lb.shutdown()).await?;
    assert_eq!(cut, 3);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "cut before the grace ran out"
    );
    for mut s in held {
        let mut b = [0u8; 8];
        let n = tokio::time::timeout(DEADLINE, s.read(&mut b)).await??;
        assert_eq!(n, 0, "the client sees the close");
    }
    let m = lb.metrics_text();
    assert_eq!(
        metric(&m, "mqlb_connections_total", &[("outcome", "shutdown")]),
        3.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_mqtt_probes_judge_real_servers() -> anyhow::Result<()> {
    let backend = count_then_reply_server().await?;
    let lb = Lb::start(
        Config::parse(&tcp_lb_toml(backend, ""), "test")?,
        Listeners::default(),
    )
    .await?;
    let admin = lb.admin_addr();
    let t = Duration::from_secs(2);
    let http = |p: &str| ProbeProtocol::Http { path: p.into() };
    probe_once(&http("/healthz"), admin, t).await?;
    match probe_once(&http("/no/such/page"), admin, t).await {
        Err(ProbeError::HttpStatus(404)) => {}
        other => anyhow::bail!("want 404, got {other:?}"),
    }
    let broker = Mosquitto::start().await?;
    probe_once(&ProbeProtocol::Mqtt, broker.addr(), t).await?;
    // A TCP server that never answers CONNECT: the MQTT probe times out, the TCP one passes.
    let silent = TcpListener::bind("127.0.0.1:0").await?;
    probe_once(&ProbeProtocol::Tcp, silent.local_addr()?, t).await?;
    match probe_once(
        &ProbeProtocol::Mqtt,
        silent.local_addr()?,
        Duration::from_millis(300),
    )
    .await
    {
        Err(ProbeError::Timeout(_)) => {}
        other => anyhow::bail!("want timeout, got {other:?}"),
    }
    lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_on_backend_down_cuts_live_connections_only_when_configured() -> anyhow::Result<()> {
    for close in [false, true] {
        let broker = Mosquitto::start().await?;
        // The probe watches a port the test controls, so the backend can "fail" its probe
        // while the broker itself (and the live connection) is still fine.
        let health = TcpListener::bind("127.0.0.1:0").await?;
        let health_port = health.local_addr()?.port();
        let toml = lb_toml(
            &[&broker],
            &format!("distribution = \"mqtt-client-id\"\nclose_on_backend_down = {close}\n"),
            false,
        )
        .replace("port = \"traffic\"", &format!("port = {health_port}"));
        let lb = Lb::start(Config::parse(&toml, "test")?, Listeners::default()).await?;
        let front = lb
            .frontend_addr("mqtt")
            .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
        let mut s = mqtt_session(front, "watched").await?;
        drop(health);
        wait_until("probe marks b1 down", DEADLINE, || async {
            backend_state(lb.admin_addr(), "b1")
                .await
                .is_ok_and(|st| st == "down")
        })
        .await?;
        // PINGREQ: answered if the connection lives, EOF if it was closed.
        let alive = async {
            s.write_all(&[0xc0, 0x00]).await?;
            let mut resp = [0u8; 2];
            s.read_exact(&mut resp).await?;
            anyhow::Ok(resp == [0xd0, 0x00])
        };
        let alive = tokio::time::timeout(DEADLINE, alive)
            .await?
            .unwrap_or(false);
        assert_eq!(alive, !close, "close_on_backend_down = {close}");
        if close {
            // Counted just after the sockets close (the data-path probe's own connection may
            // be cut too, hence at least one).
            wait_until("backend_down counted", DEADLINE, || async {
                metric(
                    &lb.metrics_text(),
                    "mqlb_connections_total",
                    &[("outcome", "backend_down")],
                ) >= 1.0
            })
            .await?;
        }
        lb.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_opens_and_closes_listeners_without_touching_the_others() -> anyhow::Result<()> {
    let backend = count_then_reply_server().await?;
    let base = tcp_lb_toml(backend, "");
    let lb = Lb::start(Config::parse(&base, "test")?, Listeners::default()).await?;
    let first = lb
        .frontend_addr("f")
        .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
    let mut live = TcpStream::connect(first).await?;
    live.write_all(b"before").await?;

    let with_second = format!(
        "{base}[[frontend]]\nname = \"g\"\nbind = \"127.0.0.1:0\"\n\
         [[rule]]\nname = \"r2\"\nfrontend = \"g\"\npool = \"p\"\n"
    );
    lb.apply(Config::parse(&with_second, "test")?).await?;
    let second = lb
        .frontend_addr("g")
        .ok_or_else(|| anyhow::anyhow!("g not opened"))?;
    assert_eq!(
        lb.frontend_addr("f"),
        Some(first),
        "unchanged frontend keeps its socket"
    );
    let mut s = TcpStream::connect(second).await?;
    s.write_all(b"abc").await?;
    s.shutdown().await?;
    let mut reply = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut reply)).await??;
    assert_eq!(reply, "got 3");

    lb.apply(Config::parse(&base, "test")?).await?;
    assert_eq!(lb.frontend_addr("g"), None);
    wait_until("g refuses", DEADLINE, || async {
        TcpStream::connect(second).await.is_err()
    })
    .await?;
    // The connection opened before both reloads is intact.
    live.write_all(b"after").await?;
    live.shutdown().await?;
    let mut reply = String::new();
    tokio::time::timeout(DEADLINE, live.read_to_string(&mut reply)).await??;
    assert_eq!(reply, "got 11");
    lb.shutdown().await;
    Ok(())
}
