//! Cross-node delivery: messages/s and latency from a publisher on node A to a subscriber on
//! node B, against publisher and subscriber on the same node, in one run. Then what a QoS 1
//! publisher waits for its PUBACK on a node with 0, 1 and 2 peers (issue 12: the PUBACK waits
//! until the peers hold the message).
//!
//! `--tls` (issue 15): the cross-node figures over plaintext links and over mutual TLS links
//! (`[cluster] tls`), two clusters in the same run, interleaved: the cost of encrypting the mesh.
//!
//! `cargo run --release -p mqlb-benches --bin mesh-bench [-- --quick] [--puback-only | --tls]`

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

/// PUBACKs as a publisher on `addr` sees them: `seq` publishes one at a time (each waits for
/// its PUBACK: p50 and p99 of that wait), then `flood` with rumqttc's window of 100 in flight
/// (msg/s until the last PUBACK).
async fn pubacks(
    addr: std::net::SocketAddr,
    seq: usize,
    flood: usize,
    tag: &str,
) -> anyhow::Result<Run> {
    let mut po = MqttOptions::new(format!("bench-puback-{tag}"), "127.0.0.1", addr.port());
    po.set_keep_alive(Duration::from_secs(30));
    let (publ, mut pub_loop) = AsyncClient::new(po, 1000);
    let topic = format!("bench/puback/{tag}");
    let payload = vec![0u8; 100];
    // Polls until `acks` more PUBACKs came (20 s without one is a stall).
    async fn acked(pub_loop: &mut rumqttc::EventLoop, acks: usize) -> anyhow::Result<()> {
        let mut got = 0;
        while got < acks {
            match tokio::time::timeout(Duration::from_secs(20), pub_loop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => got += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => anyhow::bail!("publisher: {e}"),
                Err(_) => anyhow::bail!("publisher: {got} of {acks} PUBACKs before a 20 s stall"),
            }
        }
        Ok(())
    }
    let mut lat = Vec::with_capacity(seq);
    for _ in 0..seq {
        let start = Instant::now();
        publ.publish(&topic, QoS::AtLeastOnce, false, payload.clone())
            .await?;
        acked(&mut pub_loop, 1).await?;
        lat.push(start.elapsed());
    }
    let start = Instant::now();
    let sender = {
        let (publ, topic, payload) = (publ.clone(), topic.clone(), payload.clone());
        tokio::spawn(async move {
            for _ in 0..flood {
                publ.publish(&topic, QoS::AtLeastOnce, false, payload.clone())
                    .await?;
            }
            anyhow::Ok(())
        })
    };
    acked(&mut pub_loop, flood).await?;
    sender.await??;
    let rate = flood as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    Ok(Run {
        rate,
        p50: pct(0.5),
        p99: pct(0.99),
    })
}

/// The PUBACK table: one node with no peer, with 1, with 2, interleaved `reps` times, medians.
async fn puback_table(quick: bool) -> anyhow::Result<()> {
    let (seq, flood, reps) = if quick {
        (500, 5_000, 1)
    } else {
        (2_000, 20_000, 3)
    };
    let clusters = [
        Cluster::start(1).await?,
        Cluster::start(2).await?,
        Cluster::start(3).await?,
    ];
    let mut runs: Vec<Vec<Run>> = (0..clusters.len()).map(|_| Vec::new()).collect();
    for rep in 0..reps {
        for (i, c) in clusters.iter().enumerate() {
            runs[i].push(pubacks(c.mqtt(0), seq, flood, &format!("r{rep}p{i}")).await?);
        }
    }
    println!(
        "-- PUBACK of QoS 1 on node A: {seq} one at a time (wait), then {flood} with 100 in flight; medians of {reps} --"
    );
    let mut base = None;
    for (i, r) in runs.iter().enumerate() {
        let p50 = median(r.iter().map(|x| x.p50.as_secs_f64() * 1e3).collect());
        let p99 = median(r.iter().map(|x| x.p99.as_secs_f64() * 1e3).collect());
        let rate = median(r.iter().map(|x| x.rate).collect());
        let (b50, brate) = *base.get_or_insert((p50, rate));
        println!(
            "{i} peer(s)   wait p50 {p50:>7.3} ms  p99 {p99:>7.3} ms   {rate:>8.0} msg/s   p50 x{:.2}  msg/s x{:.2}",
            p50 / b50,
            rate / brate
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The TLS table: a 2-node cluster with plaintext links and one with TLS links (a certificate
/// per node, of one test CA), each measured cross-node `reps` times, interleaved: flood
/// msg/s, paced latency, and a QoS 1 publisher's PUBACK wait (which includes a mesh round
/// trip); medians, and TLS / plain.
async fn tls_table(quick: bool) -> anyhow::Result<()> {
    let (n, paced_n, seq, flood, reps) = if quick {
        (5_000, 500, 500, 5_000, 1)
    } else {
        (50_000, 2_000, 2_000, 20_000, 5)
    };
    let pki = mqlb_tests::Pki::new()?;
    let clusters = [
        ("plain", Cluster::start(2).await?),
        ("tls", Cluster::start_tls(2, &pki).await?),
    ];
    let mut runs: Vec<[Vec<Run>; 3]> = (0..2).map(|_| [vec![], vec![], vec![]]).collect();
    let paced = Some(Duration::from_millis(1));
    for rep in 0..reps {
        for (i, (name, c)) in clusters.iter().enumerate() {
            let tag = format!("tls-r{rep}-{name}");
            let (a, b) = (c.mqtt(0), c.mqtt(1));
            runs[i][0].push(run(a, b, n, None, &tag).await?);
            runs[i][1].push(run(a, b, paced_n, paced, &format!("{tag}-paced")).await?);
            runs[i][2].push(pubacks(a, seq, flood, &tag).await?);
        }
    }
    println!(
        "mqlb mesh-bench --tls: cross node (A -> B), 2 in-process nodes, loopback, plaintext links against TLS links; medians of {reps}"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut rows = Vec::new();
    for (i, (name, _)) in clusters.iter().enumerate() {
        let [f, p, a] = &runs[i];
        let row = [
            median(f.iter().map(|r| r.rate).collect()),
            median(p.iter().map(|r| ms(r.p50)).collect()),
            median(p.iter().map(|r| ms(r.p99)).collect()),
            median(a.iter().map(|r| ms(r.p50)).collect()),
            median(a.iter().map(|r| r.rate).collect()),
        ];
        println!(
            "{name:<6} flood {:>8.0} msg/s ({n} QoS 1)   paced p50 {:>6.3} ms p99 {:>6.3} ms   PUBACK wait p50 {:>6.3} ms, {:>7.0} msg/s with 100 in flight",
            row[0], row[1], row[2], row[3], row[4]
        );
        rows.push(row);
    }
    let (plain, tls) = (&rows[0], &rows[1]);
    println!(
        "tls/plain: flood msg/s x{:.2}   paced p50 x{:.2}   PUBACK wait p50 x{:.2}, msg/s x{:.2}",
        tls[0] / plain[0],
        tls[1] / plain[1],
        tls[3] / plain[3],
        tls[4] / plain[4]
    );
    let spread = |i: usize, k: usize| {
        let v: Vec<f64> = runs[i][k].iter().map(|r| r.rate).collect();
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        format!("{lo:.0}-{hi:.0}")
    };
    println!(
        "flood msg/s range: plain {}, tls {}",
        spread(0, 0),
        spread(1, 0)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::args().any(|a| a == "--puback-only") {
        return puback_table(quick).await;
    }
    if std::env::args().any(|a| a == "--tls") {
        return tls_table(quick).await;
    }
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
    drop(cluster);
    puback_table(quick).await
}
