//! How the LB spreads clients over backends and judges them: the round-robin,
//! least-connections and source-IP distributions; HTTP, MQTT and TCP probes against real
//! servers; live connections cut when their backend goes down, only when so configured.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{count_then_reply_server, lb_toml, tcp_lb_toml, topo, DEADLINE};
use mqlb_config::{Config, ProbeProtocol};
use mqlb_lb::{probe_once, Lb, Listeners, ProbeError};
use mqlb_mqtt::{encode_connect, ConnectOptions};
use mqlb_tests::{backend_state, get_json, http, metric, wait_until, Mosquitto};
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

/// A broker that dies stays in `/api/backends` as `down` (why `left_membership`, since when)
/// and at `mqlb_backend_up 0`, taking no connection, until its pool's `remove_after`; then it
/// is gone, series too (issue 17: it vanished ~1 s after dying, so an alert on
/// `mqlb_backend_up == 0` never fired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_died_stays_listed_down_until_remove_after() -> anyhow::Result<()> {
    use mqlb_tests::{fast_ha_timing, start_haserver, Client, Cluster, TempDir, TEST_SECRET};
    let dir = TempDir::new("dead-member")?;
    let ha = start_haserver("ha1", &dir.path().join("ha.sqlite"), fast_ha_timing()).await?;
    let ha_addr = ha.addr();
    let mut cluster = Cluster::start_with_ha(2, &[ha_addr]).await?;
    let cfg = Config::parse(
        &format!(
            "[lb]\nadmin = \"127.0.0.1:0\"\nwatch_config = false\nshutdown_grace = \"1s\"\n\
             [cluster]\nsecret = \"{TEST_SECRET}\"\n\
             [[haserver]]\nid = \"ha1\"\nlisten = \"{ha_addr}\"\n\
             [[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
             [[pool]]\nname = \"brokers\"\nprobe = \"p\"\ndiscovery = \"haserver\"\nremove_after = \"4s\"\n\
             [[probe]]\nname = \"p\"\nport = \"traffic\"\ninterval = \"500ms\"\ntimeout = \"300ms\"\n\
             [[rule]]\nname = \"mqtt\"\nfrontend = \"mqtt\"\npool = \"brokers\"\n"
        ),
        "test",
    )?;
    let lb = Lb::start(cfg, Listeners::default()).await?;
    let front = lb
        .frontend_addr("mqtt")
        .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
    let admin = lb.admin_addr();
    let listed = || async {
        let v = get_json(admin, "/api/backends").await.unwrap_or_default();
        let mut rows: Vec<serde_json::Value> = v.as_array().cloned().unwrap_or_default();
        rows.sort_by_key(|b| b["id"].as_str().map(str::to_string));
        rows
    };
    let up_series = |id: &str| {
        let want = format!("backend=\"{id}\"");
        lb.metrics_text()
            .lines()
            .find(|l| l.starts_with("mqlb_backend_up{") && l.contains(&want))
            .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
    };
    wait_until("n1 and n2 listed up", DEADLINE, || async {
        let rows = listed().await;
        rows.len() == 2 && rows.iter().all(|b| b["state"] == "up")
    })
    .await?;

    cluster.crash(1);
    let crashed = std::time::Instant::now();
    wait_until("n2 listed down, left the membership", DEADLINE, || async {
        listed()
            .await
            .iter()
            .any(|b| b["id"] == "n2" && b["state"] == "down" && b["why"] == "left_membership")
    })
    .await?;
    // It stays so (here for 2 s of the 4 s), with since when, at mqlb_backend_up 0.
    for _ in 0..10 {
        let rows = listed().await;
        let n2 = rows.iter().find(|b| b["id"] == "n2");
        let n2 = n2.ok_or_else(|| anyhow::anyhow!("n2 no longer listed: {rows:?}"))?;
        assert_eq!(n2["state"], "down", "{n2}");
        assert_eq!(n2["why"], "left_membership", "{n2}");
        assert!(n2["down_since"].as_f64().is_some_and(|t| t > 1.0e9), "{n2}");
        assert_eq!(up_series("n2"), Some(0.0), "mqlb_backend_up of n2");
        assert_eq!(up_series("n1"), Some(1.0), "mqlb_backend_up of n1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // It takes no traffic.
    let to_n2 = || {
        metric(
            &lb.metrics_text(),
            "mqlb_connections_total",
            &[("backend", "n2")],
        )
    };
    let before = to_n2();
    for i in 0..20 {
        let c = Client::connect(front, &format!("after-death-{i}")).await?;
        c.disconnect().await;
    }
    assert_eq!(to_n2(), before, "no connection went to the dead broker");
    let events = get_json(admin, "/api/events").await?;
    let left = events.as_array().into_iter().flatten().any(|e| {
        e["kind"] == "member_left" && e["backend"] == "n2" && e["reason"] == "left_membership"
    });
    assert!(left, "member_left event: {events:#}");

    // After remove_after it is gone, its series too.
    wait_until("n2 removed after remove_after", DEADLINE, || async {
        listed().await.iter().all(|b| b["id"] != "n2") && up_series("n2").is_none()
    })
    .await?;
    assert!(
        crashed.elapsed() >= Duration::from_secs(4),
        "removed {:?} after the crash, before remove_after",
        crashed.elapsed()
    );
    assert_eq!(listed().await.len(), 1);
    let events = get_json(admin, "/api/events").await?;
    let removed = events
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["kind"] == "member_removed" && e["backend"] == "n2");
    assert!(removed, "member_removed event: {events:#}");
    assert_eq!(lb.shutdown().await, 0);
    ha.stop().await;
    Ok(())
}

/// Azure's data-path availability as health events (issue 17): the LB's own probe through the
/// frontend fails once the only broker is gone, and `/api/events` says the rule's data path is
/// degraded, then down; when the broker is back, recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_path_availability_becomes_health_events() -> anyhow::Result<()> {
    let mut broker = Mosquitto::start().await?;
    let toml = lb_toml(&[&broker], "distribution = \"mqtt-client-id\"\n", false)
        .replace("interval = \"1s\"", "interval = \"100ms\"")
        .replace("timeout = \"500ms\"", "timeout = \"80ms\"");
    let lb = Lb::start(Config::parse(&toml, "test")?, Listeners::default()).await?;
    let admin = lb.admin_addr();
    let kinds = || async move {
        let events = get_json(admin, "/api/events").await.ok()?;
        Some(
            events
                .as_array()?
                .iter()
                .filter_map(|e| e["kind"].as_str().map(str::to_string))
                .filter(|k| k.starts_with("data_path"))
                .collect::<Vec<_>>(),
        )
    };
    broker.kill();
    wait_until("data_path_down", DEADLINE, || async {
        kinds()
            .await
            .is_some_and(|k| k.iter().any(|k| k == "data_path_down"))
    })
    .await?;
    broker.restart().await?;
    wait_until("data_path_recovered", DEADLINE, || async {
        kinds()
            .await
            .is_some_and(|k| k.last().is_some_and(|k| k == "data_path_recovered"))
    })
    .await?;
    // On the way back up the grade passes through degraded (25 to 90 %).
    let k = kinds().await.unwrap_or_default();
    let at = |kind: &str| k.iter().rposition(|x| x == kind);
    assert!(
        at("data_path_down") < at("data_path_degraded") && at("data_path_degraded").is_some(),
        "down, degraded, recovered: {k:?}"
    );
    lb.shutdown().await;
    Ok(())
}

/// The admin API's drain and enable are health events too (issue 17).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_enable_are_health_events() -> anyhow::Result<()> {
    let broker = Mosquitto::start().await?;
    let toml = lb_toml(&[&broker], "distribution = \"mqtt-client-id\"\n", false);
    let lb = Lb::start(Config::parse(&toml, "test")?, Listeners::default()).await?;
    let admin = lb.admin_addr();
    for action in ["drain", "enable"] {
        let (code, body) = http(admin, "POST", &format!("/api/backends/b1/{action}")).await?;
        assert_eq!(code, 200, "{body}");
    }
    let events = get_json(admin, "/api/events").await?;
    let mine: Vec<(String, String)> = events
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["backend"] == "b1")
        .filter_map(|e| Some((e["kind"].as_str()?.into(), e["pool"].as_str()?.into())))
        .filter(|(k, _): &(String, String)| k == "backend_drained" || k == "backend_enabled")
        .collect();
    assert_eq!(
        mine,
        [
            ("backend_drained".to_string(), "brokers".to_string()),
            ("backend_enabled".to_string(), "brokers".to_string())
        ],
        "{events:#}"
    );
    lb.shutdown().await;
    Ok(())
}
