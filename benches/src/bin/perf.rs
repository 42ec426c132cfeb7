//! The performance table of issue 6: each workload directly, through `mqlb lb` and through
//! HAProxy (when installed), interleaved, repeated, medians and ratios from the same run.
//!
//! `cargo run --release -p mqlb-benches --bin perf [-- [--quick] [--reps N]]`
//! (memory per idle connection: `--bin idle-mem`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqlb_benches::*;
use mqlb_tests::{Mosquitto, TempDir};
use rumqttc::{AsyncClient, Event, Packet, QoS};

/// 10 publishers → 2 subscribers, 64-byte payloads: messages delivered per second.
async fn publish_rate(
    addr: SocketAddr,
    qos: QoS,
    per_pub: usize,
    tag: &str,
) -> anyhow::Result<f64> {
    let topic = format!("perf/{tag}");
    let got = Arc::new(AtomicUsize::new(0));
    let want = 2 * 10 * per_pub;
    let mut subs = Vec::new();
    for s in 0..2 {
        let (c, mut el) = AsyncClient::new(opts(format!("{tag}-sub{s}"), addr), 1000);
        c.subscribe(&topic, qos).await?;
        // Wait for the SUBACK before anyone publishes.
        loop {
            if let Event::Incoming(Packet::SubAck(_)) =
                tokio::time::timeout(Duration::from_secs(10), el.poll()).await??
            {
                break;
            }
        }
        let got = got.clone();
        subs.push((
            c,
            tokio::spawn(async move {
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::Publish(_))) => {
                            got.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }),
        ));
    }
    let start = Instant::now();
    let mut pubs = Vec::new();
    for p in 0..10 {
        let (c, mut el) = AsyncClient::new(opts(format!("{tag}-pub{p}"), addr), 1000);
        let driver = tokio::spawn(async move { while el.poll().await.is_ok() {} });
        let topic = topic.clone();
        pubs.push(tokio::spawn(async move {
            let payload = vec![7u8; 64];
            for _ in 0..per_pub {
                c.publish(&topic, qos, false, payload.clone()).await?;
            }
            anyhow::Ok((c, driver))
        }));
    }
    let mut held = Vec::new();
    for p in pubs {
        held.push(p.await??);
    }
    // QoS 0 may lose messages under overload: stop when delivery stalls for a second.
    let mut last = (0, Instant::now());
    let done_at = loop {
        let n = got.load(Ordering::Relaxed);
        if n >= want {
            break Instant::now();
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(1) {
            break last.1;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let elapsed = done_at.duration_since(start).max(Duration::from_millis(1));
    let delivered = got.load(Ordering::Relaxed);
    if delivered < want {
        eprintln!("{tag}: {delivered} of {want} delivered (QoS 0 drops under overload)");
    }
    for (_, d) in held {
        d.abort();
    }
    for (_, t) in subs {
        t.abort();
    }
    Ok(delivered as f64 / elapsed.as_secs_f64())
}

struct Row {
    name: &'static str,
    unit: &'static str,
    direct: Vec<f64>,
    mqlb: Vec<f64>,
    haproxy: Vec<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = reps_arg(if quick { 1 } else { 3 });
    let (bulk, conns, per_pub, lat_n) = if quick {
        (64 << 20, 1000, 500, 300)
    } else {
        (256 << 20, 3000, 2000, 1000)
    };
    let dir = TempDir::new("perf")?;
    let sink = discard_server()?;
    let broker = Mosquitto::start().await?;
    let (_m1, mqlb_tcp) = start_mqlb(dir.path(), &[sink], "five-tuple").await?;
    let (_m2, mqlb_mqtt) = start_mqlb(dir.path(), &[broker.addr()], "mqtt-client-id").await?;
    let hp_tcp = start_haproxy(dir.path(), &[sink]).await?;
    // HAProxy's MQTT rules (read CONNECT, hash the client ID): the same work as mqlb's rule.
    let hp_mqtt = start_haproxy_with(dir.path(), &[broker.addr()], true).await?;
    let mut rows = vec![
        Row {
            name: "bulk TCP, 1 stream",
            unit: "MiB/s",
            direct: vec![],
            mqlb: vec![],
            haproxy: vec![],
        },
        Row {
            name: "MQTT connects (mqtt-client-id)",
            unit: "conn/s",
            direct: vec![],
            mqlb: vec![],
            haproxy: vec![],
        },
        Row {
            name: "publish QoS0 10->2, 64 B",
            unit: "msg/s",
            direct: vec![],
            mqlb: vec![],
            haproxy: vec![],
        },
        Row {
            name: "publish QoS1 10->2, 64 B",
            unit: "msg/s",
            direct: vec![],
            mqlb: vec![],
            haproxy: vec![],
        },
        Row {
            name: "QoS1 paced latency p50",
            unit: "us",
            direct: vec![],
            mqlb: vec![],
            haproxy: vec![],
        },
    ];
    for rep in 0..reps {
        let targets: Vec<(usize, SocketAddr, SocketAddr)> = {
            let mut t = vec![(0, sink, broker.addr()), (1, mqlb_tcp, mqlb_mqtt)];
            if let (Some((_, a)), Some((_, b))) = (&hp_tcp, &hp_mqtt) {
                t.push((2, *a, *b));
            }
            t
        };
        for (who, tcp, mqtt) in targets {
            let tag = format!("r{rep}w{who}");
            let vals = [
                bulk_mib_s(tcp, 1, bulk).await?,
                mqtt_connect_rate(mqtt, conns, 16, &tag).await?.0,
                publish_rate(mqtt, QoS::AtMostOnce, per_pub, &format!("{tag}q0")).await?,
                publish_rate(mqtt, QoS::AtLeastOnce, per_pub, &format!("{tag}q1")).await?,
                paced_latency_us(mqtt, lat_n, &tag).await?,
            ];
            for (row, v) in rows.iter_mut().zip(vals) {
                match who {
                    0 => row.direct.push(v),
                    1 => row.mqlb.push(v),
                    _ => row.haproxy.push(v),
                }
            }
        }
        eprintln!("repetition {} of {reps} done", rep + 1);
    }
    println!(
        "mqlb perf: medians of {reps} interleaved repetitions, loopback, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<32} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "workload", "direct", "mqlb", "haproxy", "mqlb/dir", "hap/dir", "mqlb/hap"
    );
    for r in &rows {
        let (d, m) = (median(r.direct.clone()), median(r.mqlb.clone()));
        let h = (!r.haproxy.is_empty()).then(|| median(r.haproxy.clone()));
        println!(
            "{:<32} {:>10.0} {:>10.0} {:>10} {:>9.2} {:>9} {:>9}   {}",
            r.name,
            d,
            m,
            h.map_or("-".into(), |h| format!("{h:.0}")),
            m / d,
            h.map_or("-".into(), |h| format!("{:.2}", h / d)),
            h.map_or("-".into(), |h| format!("{:.2}", m / h)),
            r.unit
        );
    }
    if reps > 1 && hp_mqtt.is_some() {
        // The spread behind the medians: one mqlb/haproxy ratio per repetition.
        println!("per-repetition mqlb/haproxy (min..max):");
        for r in &rows {
            let ratios: Vec<f64> = r.mqlb.iter().zip(&r.haproxy).map(|(m, h)| m / h).collect();
            let (lo, hi) = ratios
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
            println!("  {:<32} {lo:.2}..{hi:.2}", r.name);
        }
    }
    if let (Some(lat), true) = (rows.last(), hp_mqtt.is_some()) {
        let (d, m, h) = (
            median(lat.direct.clone()),
            median(lat.mqlb.clone()),
            median(lat.haproxy.clone()),
        );
        println!(
            "added p50 latency: mqlb {:.0} us, haproxy {:.0} us (mqlb/haproxy {:.2})",
            m - d,
            h - d,
            (m - d) / (h - d)
        );
    }
    Ok(())
}
