//! End-to-end tests of the load balancer: three mosquitto brokers on ephemeral loopback ports,
//! an in-process LB, rumqttc clients and raw sockets through it.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{backend_of, topo, topo_with, DEADLINE};
use mqlb_mqtt::{encode_connect, ConnectOptions, ProtocolLevel};
use mqlb_tests::{backend_state, connections, get_json, http, metric, wait_until, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENT_ID: &str = "distribution = \"mqtt-client-id\"\n";

/// Reads until EOF or error; returns what was read and whether it ended in a reset.
async fn read_until_closed(s: &mut TcpStream) -> anyhow::Result<(Vec<u8>, bool)> {
    let mut all = Vec::new();
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return false,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(_) => return true,
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("connection not closed within {DEADLINE:?}"))?;
    Ok((all, ended))
}

/// Waits until a metric of `lb` reaches `min`.
async fn wait_metric(
    lb: &mqlb_lb::Lb,
    name: &str,
    labels: &[(&str, &str)],
    min: f64,
) -> anyhow::Result<()> {
    wait_until(&format!("{name} {labels:?} >= {min}"), DEADLINE, || async {
        metric(&lb.metrics_text(), name, labels) >= min
    })
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_client_id_lands_on_the_same_backend_every_time() -> anyhow::Result<()> {
    let t = topo(3, CLIENT_ID).await?;
    let mut seen = HashMap::new();
    for id in ["sensor-1", "sensor-2", "sensor-3", "sensor-4"] {
        for round in 0..4 {
            let c = Client::connect(t.front, id).await?;
            let b = backend_of(t.admin, id).await?;
            let first = seen.entry(id).or_insert_with(|| b.clone());
            assert_eq!(*first, b, "{id} moved on round {round}");
            c.disconnect().await;
            wait_until("client gone", DEADLINE, || async {
                connections(t.admin)
                    .await
                    .is_ok_and(|c| c.iter().all(|(i, _, _)| i != id))
            })
            .await?;
        }
    }
    let m = t.lb.metrics_text();
    assert!(
        metric(
            &m,
            "mqlb_route_decisions_total",
            &[("method", "mqtt-client-id")]
        ) >= 16.0
    );
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_client_ids_spread_over_three_backends() -> anyhow::Result<()> {
    let t = topo(3, CLIENT_ID).await?;
    let mut clients = Vec::new();
    for i in 0..300 {
        clients.push(Client::connect(t.front, &format!("fleet-{i:04}")).await?);
    }
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    wait_until("300 connections listed", DEADLINE, || async {
        connections(t.admin).await.is_ok_and(|c| c.len() == 300)
    })
    .await?;
    for (_, b, _) in connections(t.admin).await? {
        *per_backend.entry(b).or_default() += 1;
    }
    eprintln!("300 client IDs per backend: {per_backend:?}");
    assert_eq!(per_backend.len(), 3, "{per_backend:?}");
    for (b, n) in &per_backend {
        // Fair is 100; the hash spread of 300 keys stays well inside 65..135.
        assert!((65..=135).contains(n), "{b} got {n} of 300");
    }
    // The LB's own count agrees with the listing.
    let backends = get_json(t.admin, "/api/backends").await?;
    let total: u64 = backends
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["active_connections"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    assert!(total >= 300, "active_connections sum {total}");
    for c in clients {
        c.disconnect().await;
    }
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_is_marked_down_in_time_and_only_its_clients_move() -> anyhow::Result<()> {
    let mut t = topo(3, CLIENT_ID).await?;
    let mut clients = Vec::new();
    for i in 0..30 {
        clients.push(Client::connect(t.front, &format!("dev-{i}")).await?);
    }
    wait_until("30 connections", DEADLINE, || async {
        connections(t.admin).await.is_ok_and(|c| c.len() == 30)
    })
    .await?;
    let before = connections(t.admin).await?;
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (_, b, _) in &before {
        *count.entry(b.as_str()).or_default() += 1;
    }
    let (victim, _) = count
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(b, n)| (b.to_string(), *n))
        .ok_or_else(|| anyhow::anyhow!("no connections"))?;
    let idx: usize = victim.trim_start_matches('b').parse::<usize>()? - 1;

    let killed_at = Instant::now();
    t.brokers[idx].kill();
    // interval (1 s) × threshold (1) + 1 s.
    wait_until("victim marked down", Duration::from_secs(2), || async {
        backend_state(t.admin, &victim)
            .await
            .is_ok_and(|s| s == "down")
    })
    .await?;
    let took = killed_at.elapsed();
    eprintln!("{victim} marked down {took:?} after the kill");

    // Every client is connected again, none to the victim; the others kept their connection.
    wait_until("all 30 clients reconnected elsewhere", DEADLINE, || async {
        connections(t.admin)
            .await
            .is_ok_and(|c| c.len() == 30 && c.iter().all(|(_, b, _)| *b != victim))
    })
    .await?;
    let after = connections(t.admin).await?;
    let after_by_id: HashMap<_, _> = after
        .iter()
        .map(|(i, b, c)| (i.clone(), (b.clone(), *c)))
        .collect();
    for (id, b, conn) in &before {
        let (nb, nconn) = &after_by_id[id];
        if *b == victim {
            assert_ne!(nb, &victim);
        } else {
            assert_eq!(
                (b, conn),
                (nb, nconn),
                "{id} was on a live backend and must not move"
            );
        }
    }
    for c in &clients {
        let moved = before.iter().any(|(i, b, _)| *i == c.id && *b == victim);
        assert_eq!(
            c.connacks() > 1,
            moved,
            "{}: connacks {}",
            c.id,
            c.connacks()
        );
    }

    // It comes back: up again, and new connections of its keys return to it.
    t.brokers[idx].restart().await?;
    wait_until("victim up again", Duration::from_secs(3), || async {
        backend_state(t.admin, &victim)
            .await
            .is_ok_and(|s| s == "up")
    })
    .await?;
    let returner = before
        .iter()
        .find(|(_, b, _)| *b == victim)
        .map(|(i, _, _)| i.clone())
        .ok_or_else(|| anyhow::anyhow!("victim had no client"))?;
    let pos = clients.iter().position(|c| c.id == returner).unwrap_or(0);
    clients.remove(pos).disconnect().await;
    let c = Client::connect(t.front, &returner).await?;
    assert_eq!(backend_of(t.admin, &returner).await?, victim);
    c.disconnect().await;
    // Clients reconnecting found it dead before the probe did (passive health).
    let m = t.lb.metrics_text();
    let passive = metric(
        &m,
        "mqlb_backend_connect_failures_total",
        &[("backend", &victim)],
    );
    let probed = metric(
        &m,
        "mqlb_probes_total",
        &[("backend", &victim), ("result", "connect_error")],
    );
    assert!(
        passive + probed >= 1.0,
        "passive {passive}, probes {probed}"
    );
    for c in clients {
        c.disconnect().await;
    }
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_backend_gets_no_new_clients_and_keeps_its_old_ones() -> anyhow::Result<()> {
    let t = topo(3, CLIENT_ID).await?;
    // Find a client that lands on b1, and keep it connected across the drain.
    let mut old = None;
    for i in 0..50 {
        let id = format!("old-{i}");
        let c = Client::connect(t.front, &id).await?;
        if backend_of(t.admin, &id).await? == "b1" {
            old = Some(c);
            break;
        }
        c.disconnect().await;
    }
    let old = old.ok_or_else(|| anyhow::anyhow!("no client hashed to b1 in 50 tries"))?;
    let (status, body) = http(t.admin, "POST", "/api/backends/b1/drain").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(backend_state(t.admin, "b1").await?, "draining");
    let (status, _) = http(t.admin, "POST", "/api/backends/nope/drain").await?;
    assert_eq!(status, 404);

    let mut fresh = Vec::new();
    for i in 0..60 {
        fresh.push(Client::connect(t.front, &format!("new-{i}")).await?);
    }
    wait_until("61 connections", DEADLINE, || async {
        connections(t.admin).await.is_ok_and(|c| c.len() == 61)
    })
    .await?;
    let conns = connections(t.admin).await?;
    let on_b1: Vec<_> = conns.iter().filter(|(_, b, _)| b == "b1").collect();
    assert_eq!(
        on_b1.len(),
        1,
        "only the pre-drain client stays on b1: {on_b1:?}"
    );
    assert_eq!(on_b1[0].0, old.id);
    assert_eq!(
        old.connacks(),
        1,
        "the drained backend's client was not disturbed"
    );

    // Enabled again, b1 takes its share of new clients.
    let (status, _) = http(t.admin, "POST", "/api/backends/b1/enable").await?;
    assert_eq!(status, 200);
    let mut more = Vec::new();
    for i in 0..30 {
        more.push(Client::connect(t.front, &format!("later-{i}")).await?);
    }
    wait_until("91 connections", DEADLINE, || async {
        connections(t.admin).await.is_ok_and(|c| c.len() == 91)
    })
    .await?;
    let later_on_b1 = connections(t.admin)
        .await?
        .iter()
        .filter(|(i, b, _)| i.starts_with("later-") && b == "b1")
        .count();
    assert!(
        later_on_b1 > 0,
        "b1 got none of 30 new clients after enable"
    );
    for c in fresh.into_iter().chain(more) {
        c.disconnect().await;
    }
    old.disconnect().await;
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_traffic_drops_nothing_and_bad_config_is_refused() -> anyhow::Result<()> {
    let t = topo(3, CLIENT_ID).await?;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(Client::connect(t.front, &format!("pub-{i}")).await?);
    }
    wait_until("20 connections", DEADLINE, || async {
        connections(t.admin).await.is_ok_and(|c| c.len() == 20)
    })
    .await?;
    let before: HashSet<u64> = connections(t.admin).await?.iter().map(|c| c.2).collect();

    // Publish QoS 1 from every client while the config is reloaded several times.
    let original = std::fs::read_to_string(&t.config_file)?;
    let per_client = 50;
    let publishing = async {
        for n in 0..per_client {
            for c in &clients {
                c.publish_qos1("load/test", format!("{n}").as_bytes())
                    .await?;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        anyhow::Ok(())
    };
    let reloading = async {
        for round in 0..4 {
            // Change the rule's idle timeout and a backend's weight: a real change each time.
            let changed = original
                .replace(
                    "distribution = \"mqtt-client-id\"",
                    &format!(
                        "distribution = \"mqtt-client-id\"\nidle_timeout = \"{}m\"",
                        5 + round
                    ),
                )
                .replacen(
                    "id = \"b3\"\n",
                    &format!("id = \"b3\"\nweight = {}\n", 1 + round),
                    1,
                );
            std::fs::write(&t.config_file, changed)?;
            t.lb.reload().await?;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        // A broken file is refused, and the running config stays.
        std::fs::write(&t.config_file, "[[frontend]]\nname = 1\n")?;
        assert!(t.lb.reload().await.is_err());
        std::fs::write(
            &t.config_file,
            original.replace("interval = \"1s\"", "interval = \"-1s\""),
        )?;
        let err =
            t.lb.reload()
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
        assert!(
            err.contains("probe[0].interval"),
            "error names the key: {err}"
        );
        anyhow::Ok(())
    };
    let (p, r) = tokio::join!(publishing, reloading);
    p?;
    r?;
    let want = per_client * clients.len();
    let acked = wait_until("every QoS 1 publish acknowledged", DEADLINE, || async {
        clients.iter().map(Client::pubacks).sum::<usize>() >= want
    })
    .await;
    let got: usize = clients.iter().map(Client::pubacks).sum();
    acked.map_err(|e| anyhow::anyhow!("{e}: {got}/{want} acked"))?;
    let after: HashSet<u64> = connections(t.admin).await?.iter().map(|c| c.2).collect();
    assert_eq!(
        before, after,
        "a reload must not drop or replace any connection"
    );
    for c in &clients {
        assert_eq!(c.connacks(), 1, "{} reconnected", c.id);
        assert_eq!(c.errors(), 0, "{} saw a connection error", c.id);
    }
    let m = t.lb.metrics_text();
    assert_eq!(
        metric(&m, "mqlb_config_reloads_total", &[("result", "ok")]),
        4.0
    );
    assert_eq!(
        metric(&m, "mqlb_config_reloads_total", &[("result", "error")]),
        2.0
    );
    // The last good config (weight 4 on b3, idle 8m) is in force.
    let cfg = t.lb.config();
    assert_eq!(cfg.pools[0].backends[2].weight.get(), 4);
    assert_eq!(cfg.rules[0].idle_timeout, Duration::from_secs(480));
    for c in clients {
        c.disconnect().await;
    }
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_foreign_bytes_are_closed_while_good_clients_work() -> anyhow::Result<()> {
    let t = topo(
        3,
        "distribution = \"mqtt-client-id\"\nfallback = \"reject\"\ninspect_timeout = \"300ms\"\ninspect_max_bytes = 512\n",
    )
    .await?;
    let good = Client::connect(t.front, "good-one").await?;
    // What each gets back before the close: nothing, or a CONNACK that says why.
    let mut bad_cases: Vec<(&str, Vec<u8>, &[u8])> = vec![
        (
            "5-byte remaining length",
            vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x01],
            b"",
        ),
        ("HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), b""),
        (
            "TLS ClientHello",
            vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01],
            b"",
        ),
        (
            "stalled half CONNECT",
            encode_connect(&ConnectOptions {
                client_id: "slow".into(),
                ..Default::default()
            })[..8]
                .to_vec(),
            b"",
        ),
        // A valid CONNECT whose client ID ends beyond the 512-byte inspect limit: 3.1.1's
        // "identifier rejected".
        (
            "oversized",
            encode_connect(&ConnectOptions {
                client_id: "x".repeat(600),
                ..Default::default()
            }),
            &[0x20, 0x02, 0x00, 0x02],
        ),
    ];
    let mut bad_level = encode_connect(&ConnectOptions {
        client_id: "lvl".into(),
        ..Default::default()
    });
    bad_level[8] = 9;
    bad_cases.push(("protocol level 9", bad_level, &[0x20, 0x02, 0x00, 0x01]));
    for (what, bytes, want) in &bad_cases {
        let mut s = TcpStream::connect(t.front).await?;
        // The oversized case may be cut while still writing; that is the point.
        if let Err(e) = s.write_all(bytes).await {
            eprintln!("{what}: write ended early: {e}");
        }
        let (reply, _) = read_until_closed(&mut s)
            .await
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        assert_eq!(reply, *want, "{what}");
        // The good client is unaffected.
        good.publish_qos1("still/here", what.as_bytes()).await?;
    }
    // An empty client ID with fallback = reject gets "identifier rejected".
    let mut s = TcpStream::connect(t.front).await?;
    s.write_all(&encode_connect(&ConnectOptions::default()))
        .await?;
    let (reply, _) = read_until_closed(&mut s).await?;
    assert_eq!(reply, vec![0x20, 0x02, 0x00, 0x02]);

    wait_until("good client's publishes acked", DEADLINE, || async {
        good.pubacks() >= bad_cases.len()
    })
    .await?;
    assert_eq!(good.connacks(), 1);
    let m = t.lb.metrics_text();
    for (reason, at_least) in [
        ("malformed", 1.0),
        ("not_mqtt", 2.0),
        ("timeout", 1.0),
        ("oversized", 1.0),
        ("unsupported_level", 1.0),
        ("empty_client_id", 1.0),
    ] {
        let got = metric(&m, "mqlb_mqtt_connect_errors_total", &[("reason", reason)]);
        assert!(got >= at_least, "{reason}: {got}\n{m}");
    }
    // Outcomes are counted as the socket closes: wait rather than race it.
    wait_metric(
        &t.lb,
        "mqlb_connections_total",
        &[("outcome", "rejected")],
        7.0,
    )
    .await?;
    good.disconnect().await;
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_five_tuple_routes_empty_ids_and_each_level_reaches_its_port() -> anyhow::Result<()>
{
    let t = topo_with(3, CLIENT_ID, true).await?;
    // An MQTT 5 CONNECT goes to the broker's v5 port, 3.1.1 to `addr`.
    let mut ports = HashMap::new();
    for (level, id) in [
        (ProtocolLevel::V5, "v5-client"),
        (ProtocolLevel::V311, "v4-client"),
        (ProtocolLevel::V31, "v3-client"),
    ] {
        let mut s = TcpStream::connect(t.front).await?;
        s.write_all(&encode_connect(&ConnectOptions {
            level,
            client_id: id.into(),
            ..Default::default()
        }))
        .await?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await?;
        assert_eq!(ack[0], 0x20, "{level:?}: CONNACK");
        let conns = get_json(t.admin, "/api/connections").await?;
        let c = conns
            .as_array()
            .and_then(|a| a.iter().find(|c| c["client_id"] == id))
            .ok_or_else(|| anyhow::anyhow!("{id} not listed"))?;
        let port: u16 = c["backend_addr"]
            .as_str()
            .unwrap_or("")
            .rsplit(':')
            .next()
            .unwrap_or("")
            .parse()?;
        let b = &t.brokers[c["backend"]
            .as_str()
            .unwrap_or("b0")
            .trim_start_matches('b')
            .parse::<usize>()?
            - 1];
        ports.insert(id, (port, b.port, b.alt_port));
    }
    let (p, main, alt) = ports["v5-client"];
    assert_eq!(p, alt, "v5 to the v5 port ({main}/{alt})");
    for id in ["v4-client", "v3-client"] {
        let (p, main, _) = ports[id];
        assert_eq!(p, main, "{id} to the main port");
    }
    // Empty client ID: five-tuple fallback, still served.
    let mut s = TcpStream::connect(t.front).await?;
    s.write_all(&encode_connect(&ConnectOptions::default()))
        .await?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await?;
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    let m = t.lb.metrics_text();
    assert_eq!(
        metric(
            &m,
            "mqlb_route_decisions_total",
            &[("method", "fallback-five-tuple")]
        ),
        1.0
    );
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_refuses_with_server_unavailable() -> anyhow::Result<()> {
    let mut t = topo(2, CLIENT_ID).await?;
    // Wait for the first probes, so the kill lands mid-interval like in production.
    wait_until("first probes, data path up", DEADLINE, || async {
        let m = t.lb.metrics_text();
        metric(&m, "mqlb_probes_total", &[("result", "ok")]) >= 2.0
            && metric(&m, "mqlb_data_path_up", &[("rule", "mqtt")]) == 1.0
    })
    .await?;
    for b in &mut t.brokers {
        b.kill();
    }
    // No client traffic: the probes alone must notice, within interval (1 s) × threshold (1) + 1 s.
    let took = wait_until("both down", Duration::from_secs(2), || async {
        backend_state(t.admin, "b1")
            .await
            .is_ok_and(|s| s == "down")
            && backend_state(t.admin, "b2")
                .await
                .is_ok_and(|s| s == "down")
    })
    .await?;
    eprintln!("probes marked both backends down {took:?} after the kill");
    for (level, want) in [
        (ProtocolLevel::V311, vec![0x20, 0x02, 0x00, 0x03]),
        (ProtocolLevel::V5, vec![0x20, 0x03, 0x00, 0x88, 0x00]),
    ] {
        let mut s = TcpStream::connect(t.front).await?;
        s.write_all(&encode_connect(&ConnectOptions {
            level,
            client_id: "lonely".into(),
            ..Default::default()
        }))
        .await?;
        let (reply, _) = read_until_closed(&mut s).await?;
        assert_eq!(reply, want, "{level:?}");
    }
    // Two refusals here, plus those of the data-path probe, which also finds no backend.
    wait_metric(
        &t.lb,
        "mqlb_connections_total",
        &[("outcome", "no_backend")],
        2.0,
    )
    .await?;
    let m = t.lb.metrics_text();
    wait_until(
        "data path reported down",
        Duration::from_secs(3),
        || async {
            metric(
                &t.lb.metrics_text(),
                "mqlb_data_path_up",
                &[("rule", "mqtt")],
            ) == 0.0
        },
    )
    .await?;
    assert_eq!(metric(&m, "mqlb_backend_up", &[]), 0.0);
    assert!(metric(&m, "mqlb_probes_total", &[("result", "connect_error")]) >= 2.0);
    t.lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_reset_when_configured() -> anyhow::Result<()> {
    for (reset, extra) in [(false, ""), (true, "reset_on_idle = true\n")] {
        let t = topo(1, &format!("distribution = \"five-tuple\"\nidle_timeout = \"1s\"\nmqtt_keep_alive = \"500ms\"\n{extra}")).await?;
        let mut s = TcpStream::connect(t.front).await?;
        s.write_all(&encode_connect(&ConnectOptions {
            client_id: "idler".into(),
            keep_alive: 0,
            ..Default::default()
        }))
        .await?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await?;
        let idle_from = Instant::now();
        let (_, was_reset) = read_until_closed(&mut s).await?;
        let after = idle_from.elapsed();
        eprintln!("reset_on_idle={reset}: closed after {after:?}, reset={was_reset}");
        assert!(
            after >= Duration::from_millis(900),
            "closed too early: {after:?}"
        );
        assert_eq!(was_reset, reset);
        wait_metric(
            &t.lb,
            "mqlb_connections_total",
            &[("outcome", "idle_timeout")],
            1.0,
        )
        .await?;
        let m = t.lb.metrics_text();
        assert_eq!(
            metric(&m, "mqlb_connections_total", &[("outcome", "idle_timeout")]),
            1.0
        );
        t.lb.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_stops_accepting_and_lets_live_connections_finish() -> anyhow::Result<()>
{
    let t = topo(1, CLIENT_ID).await?;
    let c = Client::connect(t.front, "stayer").await?;
    let lb = t.lb.clone();
    let stopping = tokio::spawn(async move { lb.shutdown().await });
    // New connections are refused once the accept loop is gone.
    wait_until("frontend refuses", DEADLINE, || async {
        TcpStream::connect(t.front).await.is_err()
    })
    .await?;
    // The live one still works during the grace period (2 s).
    c.publish_qos1("during/shutdown", b"x").await?;
    wait_until(
        "publish acked during grace",
        Duration::from_secs(1),
        || async { c.pubacks() == 1 },
    )
    .await?;
    c.disconnect().await;
    let cut = stopping.await?;
    assert_eq!(cut, 0, "the client left by itself");
    Ok(())
}
