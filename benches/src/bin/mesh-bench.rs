//! Cross-node delivery: messages/s and latency from a publisher on node A to a subscriber on
//! node B, against publisher and subscriber on the same node, in one run.
//!
//! `cargo run --release -p mqlb-benches --bin mesh-bench [-- --quick]`

use std::time::{Duration, Instant};

use mqlb_tests::Cluster;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

struct Run {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

async fn run(
    pub_addr: std::net::SocketAddr,
    sub_addr: std::net::SocketAddr,
    n: usize,
    pace: Option<Duration>,
    tag: &str,
) -> anyhow::Result<Run> {
    let epoch = Instant::now();
    let mut so = MqttOptions::new(format!("bench-sub-{tag}"), "127.0.0.1", sub_addr.port());
    so.set_keep_alive(Duration::from_secs(30));
    so.set_inflight(1000);
    let (sub, mut sub_loop) = AsyncClient::new(so, 1000);
    let topic = format!("bench/{tag}");
    sub.subscribe(&topic, QoS::AtLeastOnce).await?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let receiver = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut lat = Vec::with_capacity(n);
        let mut last = epoch;
        while lat.len() < n {
            match tokio::time::timeout(Duration::from_secs(20), sub_loop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                    if let Some(r) = ready.take() {
                        if r.send(()).is_err() {
                            eprintln!("bench: nobody waits for the SUBACK any more");
                        }
                    }
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&p.payload[..8]);
                    let sent = Duration::from_nanos(u64::from_le_bytes(b));
                    last = Instant::now();
                    lat.push(last.duration_since(epoch).saturating_sub(sent));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => anyhow::bail!("subscriber: {e}"),
                Err(_) => anyhow::bail!(
                    "subscriber got {} of {n} messages before a 20 s stall",
                    lat.len()
                ),
            }
        }
        Ok((lat, last))
    });
    ready_rx.await?;
    let mut po = MqttOptions::new(format!("bench-pub-{tag}"), "127.0.0.1", pub_addr.port());
    po.set_keep_alive(Duration::from_secs(30));
    po.set_inflight(1000);
    let (publ, mut pub_loop) = AsyncClient::new(po, 1000);
    let driver = tokio::spawn(async move {
        loop {
            if pub_loop.poll().await.is_err() {
                return;
            }
        }
    });
    let start = Instant::now();
    let mut payload = vec![0u8; 100];
    for _ in 0..n {
        let t = epoch.elapsed().as_nanos() as u64;
        payload[..8].copy_from_slice(&t.to_le_bytes());
        publ.publish(&topic, QoS::AtLeastOnce, false, payload.clone())
            .await?;
        if let Some(p) = pace {
            tokio::time::sleep(p).await;
        }
    }
    let (mut lat, last) = receiver.await??;
    driver.abort();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    Ok(Run {
        rate: n as f64 / last.duration_since(start).as_secs_f64(),
        p50: pct(0.5),
        p99: pct(0.99),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 5_000 } else { 50_000 };
    let cluster = Cluster::start(2).await?;
    println!("mqlb mesh-bench: {n} QoS 1 messages of 100 bytes, 2 in-process nodes, loopback");
    let same = run(cluster.mqtt(0), cluster.mqtt(0), n, None, "same").await?;
    let cross = run(cluster.mqtt(0), cluster.mqtt(1), n, None, "cross").await?;
    // Latency without queueing: one message per millisecond.
    let paced = Some(Duration::from_millis(1));
    let same_l = run(cluster.mqtt(0), cluster.mqtt(0), 2000, paced, "same-paced").await?;
    let cross_l = run(cluster.mqtt(0), cluster.mqtt(1), 2000, paced, "cross-paced").await?;
    println!("-- flood (throughput; latency includes queueing) --");
    for (name, r) in [
        ("same node (A -> A)", &same),
        ("cross node (A -> B)", &cross),
    ] {
        println!(
            "{name:<22} {:>9.0} msg/s  p50 {:>8.3} ms  p99 {:>8.3} ms",
            r.rate,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3
        );
    }
    println!("cross/same throughput ratio: {:.2}", cross.rate / same.rate);
    println!("-- paced, 2000 messages at 1 per ms (latency) --");
    for (name, r) in [
        ("same node (A -> A)", &same_l),
        ("cross node (A -> B)", &cross_l),
    ] {
        println!(
            "{name:<22} p50 {:>7.3} ms  p99 {:>7.3} ms",
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3
        );
    }
    println!(
        "cross/same p50 latency ratio: {:.2}",
        cross_l.p50.as_secs_f64() / same_l.p50.as_secs_f64()
    );
    Ok(())
}
