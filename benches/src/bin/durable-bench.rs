//! The cost of durable retained messages (issue 18): two `mqlb broker` nodes registered with one
//! `mqlb haserver` (SQLite), one with `cluster.durable_retained` on and one with it off,
//! measured interleaved in the same run: the rate of retained QoS 1 publishes (10 publishers,
//! each message a topic of its own, so every one is written to the database), how long after
//! the last PUBACK the database held them all, and plain QoS 1 msg/s (10 -> 2); medians and
//! the on/off ratios.
//!
//! Then what a clean stop costs when it writes persistent sessions' queued messages: a node
//! with `--sessions` (100) persistent sessions whose clients are away and `--queued` (100)
//! QoS 1 messages queued for each gets SIGTERM; the time until it exited, store on and off.
//!
//! `cargo run --release -p mqlb-benches --bin durable-bench [-- --quick] [--reps N] [--per-pub N]
//! [--sessions N] [--queued N]`

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mqlb_benches::*;
use mqlb_tests::{free_port, http, metric, TempDir};
use rumqttc::{AsyncClient, Event, Packet, QoS};

const SECRET: &str = "mqlb-bench-secret-0123456789";
const PUBLISHERS: usize = 10;
const DEADLINE: Duration = Duration::from_secs(120);

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `[ha]` and `[[haserver]]` of every process's file.
fn ha_toml(ha: SocketAddr, db: &Path) -> String {
    format!(
        "[ha]\nheartbeat_interval = \"1s\"\nmember_timeout = \"3s\"\n\
         [[haserver]]\nid = \"ha1\"\nlisten = \"{ha}\"\ndb = \"{}\"\n",
        db.display()
    )
}

struct Node {
    _proc: Proc,
    mqtt: SocketAddr,
    http: SocketAddr,
}

async fn start_node(dir: &Path, id: &str, durable: bool, ha: &str) -> anyhow::Result<Node> {
    let (mqtt, web) = (loopback(free_port()?), loopback(free_port()?));
    let file = dir.join(format!("{id}.toml"));
    std::fs::write(
        &file,
        format!(
            "[cluster]\nsecret = \"{SECRET}\"\ndurable_retained = {durable}\n\
             [[broker]]\nid = \"{id}\"\nmqtt = \"{mqtt}\"\nhttp = \"{web}\"\n{ha}"
        ),
    )?;
    let child = Command::new(mqlb_release_bin()?)
        .args(["broker", "--id", id, "-c"])
        .arg(&file)
        .env("RUST_LOG", "warn")
        .spawn()
        .with_context(|| format!("starting broker {id}"))?;
    let mut p = Proc(child);
    wait_listening(mqtt, &mut p).await?;
    Ok(Node {
        _proc: p,
        mqtt,
        http: web,
    })
}

async fn node_metric(node: &Node, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let (status, text) = http(node.http, "GET", "/metrics").await?;
    anyhow::ensure!(status == 200, "GET /metrics: {status}");
    Ok(metric(&text, name, labels))
}

async fn queue_dropped(node: &Node) -> anyhow::Result<f64> {
    node_metric(
        node,
        "mqlb_broker_retained_store_dropped_total",
        &[("reason", "queue_full")],
    )
    .await
}

async fn stored_total(node: &Node) -> anyhow::Result<f64> {
    node_metric(node, "mqlb_broker_retained_stored_total", &[]).await
}

/// Retained QoS 1 publishes from 10 publishers, each to a topic of its own; returns msg/s until
/// the last PUBACK.
async fn retained_rate(addr: SocketAddr, per_pub: usize, tag: &str) -> anyhow::Result<f64> {
    let acks = Arc::new(AtomicUsize::new(0));
    let want = PUBLISHERS * per_pub;
    let start = Instant::now();
    let mut held = Vec::new();
    for p in 0..PUBLISHERS {
        let (c, mut el) = AsyncClient::new(opts(format!("{tag}-rpub{p}"), addr), 1000);
        let acks = acks.clone();
        let driver = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        let tag = tag.to_string();
        let publisher = tokio::spawn({
            let c = c.clone();
            async move {
                let payload = vec![7u8; 64];
                for i in 0..per_pub {
                    c.publish(
                        format!("ret/{tag}/{p}/{i}"),
                        QoS::AtLeastOnce,
                        true,
                        payload.clone(),
                    )
                    .await?;
                }
                anyhow::Ok(())
            }
        });
        held.push((c, driver, publisher));
    }
    while acks.load(Ordering::Relaxed) < want {
        anyhow::ensure!(
            start.elapsed() < DEADLINE,
            "{tag}: {} of {want} PUBACKs",
            acks.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = want as f64 / start.elapsed().as_secs_f64();
    for (c, driver, publisher) in held {
        publisher.await??;
        c.disconnect().await.ok();
        driver.abort();
    }
    Ok(rate)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = reps_arg(if quick { 1 } else { 3 });
    let per_pub = arg("--per-pub", if quick { 500 } else { 5000 });
    let dir = TempDir::new("durable-bench")?;
    let ha = loopback(free_port()?);
    let ha_part = ha_toml(ha, &dir.path().join("ha.sqlite"));
    let ha_file = dir.path().join("ha.toml");
    std::fs::write(
        &ha_file,
        format!("[cluster]\nsecret = \"{SECRET}\"\n{ha_part}"),
    )?;
    let mut ha_proc = Proc(
        Command::new(mqlb_release_bin()?)
            .args(["haserver", "--id", "ha1", "-c"])
            .arg(&ha_file)
            .env("RUST_LOG", "warn")
            .spawn()
            .context("starting the HA server")?,
    );
    wait_listening(ha, &mut ha_proc).await?;
    let on = start_node(dir.path(), "on", true, &ha_part).await?;
    let off = start_node(dir.path(), "off", false, &ha_part).await?;
    let nodes = [("store on", &on), ("store off", &off)];

    // [place] per repetition
    let mut retained = vec![Vec::new(); 2];
    let mut qos1 = vec![Vec::new(); 2];
    let mut lag_ms = Vec::new();
    for rep in 0..reps {
        for (p, (_, node)) in nodes.iter().enumerate() {
            let before = stored_total(node).await? + queue_dropped(node).await?;
            let tag = format!("r{rep}p{p}");
            retained[p].push(retained_rate(node.mqtt, per_pub, &tag).await?);
            if p == 0 {
                // How long after the last PUBACK the database held them all.
                let acked = Instant::now();
                let want = before + (PUBLISHERS * per_pub) as f64;
                // (what the queue's bound dropped never comes: counted, printed below)
                while stored_total(node).await? + queue_dropped(node).await? < want {
                    anyhow::ensure!(acked.elapsed() < DEADLINE, "not all stored");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                lag_ms.push(acked.elapsed().as_secs_f64() * 1000.0);
            }
        }
        for (p, (_, node)) in nodes.iter().enumerate() {
            let tag = format!("q{rep}p{p}");
            qos1[p].push(publish_rate(node.mqtt, QoS::AtLeastOnce, per_pub, &tag).await?);
        }
        eprintln!("repetition {} of {reps} done", rep + 1);
    }
    println!(
        "mqlb durable-bench: medians of {reps} interleaved repetitions, loopback, {} cores, \
         HA server on SQLite",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<40} {:>10} {:>10} {:>8}",
        "workload", "store on", "store off", "on/off"
    );
    for (name, rates) in [
        (
            format!("retained QoS1 publish, 10 pubs x {per_pub} topics"),
            &retained,
        ),
        ("publish QoS1 10->2, 64 B (not retained)".to_string(), &qos1),
    ] {
        let m: Vec<f64> = rates.iter().map(|r| median(r.clone())).collect();
        println!(
            "{:<40} {:>10.0} {:>10.0} {:>8.2}   msg/s",
            name,
            m[0],
            m[1],
            m[0] / m[1]
        );
    }
    println!(
        "all {} retained messages in the database {:.0} ms after the last PUBACK (median; runs: {:?})",
        PUBLISHERS * per_pub,
        median(lag_ms.clone()),
        lag_ms.iter().map(|v| v.round()).collect::<Vec<_>>()
    );
    let dropped = queue_dropped(&on).await?;
    let errors = node_metric(&on, "mqlb_broker_retained_store_errors_total", &[]).await?;
    println!("store on: {dropped} dropped (queue full), {errors} failed batches");

    // What a clean stop costs when it writes the persistent sessions' queues.
    let (sessions, per) = (arg("--sessions", 100usize), arg("--queued", 100usize));
    let mut stops = vec![Vec::new(); 2];
    for rep in 0..reps {
        for (p, durable) in [true, false].into_iter().enumerate() {
            let id = format!("stop{rep}{p}");
            let node = start_node(dir.path(), &id, durable, &ha_part).await?;
            stops[p].push(stop_with_queues(node, &id, sessions, per).await?);
            if durable {
                let kept = stored_queues(ha, &id, sessions).await?;
                anyhow::ensure!(
                    kept == sessions * per,
                    "{kept} of {} queued stored",
                    sessions * per
                );
            }
        }
    }
    let m: Vec<f64> = stops.iter().map(|r| median(r.clone())).collect();
    println!(
        "SIGTERM to exit, {sessions} persistent sessions away x {per} QoS1 queued: store on {:.0} ms, \
         off {:.0} ms (medians; on: {:?})",
        m[0],
        m[1],
        stops[0].iter().map(|v| v.round()).collect::<Vec<_>>()
    );
    Ok(())
}

/// Queued messages the HA server keeps for the sessions of `stop_with_queues(.., tag, ..)`.
async fn stored_queues(ha: SocketAddr, tag: &str, sessions: usize) -> anyhow::Result<usize> {
    let mut n = 0;
    for s in 0..sessions {
        let path = format!(
            "/api/queued?client={}",
            mqlb_ha_api::retained::encode_after(&format!("{tag}-s{s}"))
        );
        let headers = mqlb_tests::ha_auth_headers(
            SECRET.as_bytes(),
            "GET",
            &path,
            mqlb_tests::unix_ms(),
            b"",
        );
        let (status, body) = mqlb_tests::http_with_headers(ha, "GET", &path, &headers, b"").await?;
        anyhow::ensure!(status == 200, "GET {path}: {status} {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        n += v["entry"]["messages"].as_array().map_or(0, Vec::len);
    }
    Ok(n)
}

/// `sessions` persistent sessions on `node`, their clients away, `per` QoS 1 messages queued
/// for each; then SIGTERM: the ms until the process exited (with the store on, it wrote the
/// queues to the HA server first).
async fn stop_with_queues(
    mut node: Node,
    tag: &str,
    sessions: usize,
    per: usize,
) -> anyhow::Result<f64> {
    for s in 0..sessions {
        let mut o = opts(format!("{tag}-s{s}"), node.mqtt);
        o.set_clean_session(false);
        let (c, mut el) = AsyncClient::new(o, 16);
        c.subscribe(format!("q/{tag}/{s}"), QoS::AtLeastOnce)
            .await?;
        let deadline = Instant::now() + DEADLINE;
        loop {
            anyhow::ensure!(Instant::now() < deadline, "no SUBACK for session {s}");
            if let Event::Incoming(Packet::SubAck(_)) = el.poll().await? {
                break;
            }
        }
        c.disconnect().await?;
        while el.poll().await.is_ok() {}
    }
    let (c, mut el) = AsyncClient::new(opts(format!("{tag}-pub"), node.mqtt), 1000);
    let want = sessions * per;
    let publisher = tokio::spawn({
        let (c, tag) = (c.clone(), tag.to_string());
        async move {
            for i in 0..want {
                c.publish(
                    format!("q/{tag}/{}", i % sessions),
                    QoS::AtLeastOnce,
                    false,
                    vec![7u8; 64],
                )
                .await?;
            }
            anyhow::Ok(())
        }
    });
    let mut acks = 0;
    let deadline = Instant::now() + DEADLINE;
    while acks < want {
        anyhow::ensure!(Instant::now() < deadline, "{acks} of {want} PUBACKs");
        if let Event::Incoming(Packet::PubAck(_)) = el.poll().await? {
            acks += 1;
        }
    }
    publisher.await??;
    let pid = node._proc.0.id();
    let at = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?
        .success();
    anyhow::ensure!(ok, "kill -TERM {pid}");
    while node._proc.0.try_wait()?.is_none() {
        anyhow::ensure!(
            at.elapsed() < DEADLINE,
            "the node did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(at.elapsed().as_secs_f64() * 1000.0)
}
