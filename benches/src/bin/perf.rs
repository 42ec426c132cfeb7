//! The performance table of issue 6: each workload directly, through `mqlb lb` and through
//! HAProxy (when installed), interleaved, repeated, medians and ratios from the same run.
//!
//! `cargo run --release -p mqlb-benches --bin perf [-- [--quick] [--reps N] [--baseline BIN]]`
//!
//! `--baseline BIN`: another `mqlb` binary (e.g. a build of an earlier commit) run beside this
//! one in the same repetitions, for a before/after in one run.
//! (memory per idle connection: `--bin idle-mem`).

use std::net::SocketAddr;

use mqlb_benches::*;
use mqlb_tests::{Mosquitto, TempDir};
use rumqttc::QoS;

struct Row {
    name: &'static str,
    unit: &'static str,
    direct: Vec<f64>,
    mqlb: Vec<f64>,
    haproxy: Vec<f64>,
    baseline: Vec<f64>,
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
    let baseline = arg("--baseline", String::new());
    let base = if baseline.is_empty() {
        None
    } else {
        let bin = std::path::Path::new(&baseline);
        let (p1, tcp) = start_mqlb_bin(bin, dir.path(), &[sink], "five-tuple").await?;
        let (p2, mqtt) =
            start_mqlb_bin(bin, dir.path(), &[broker.addr()], "mqtt-client-id").await?;
        Some((p1, p2, tcp, mqtt))
    };
    let mut rows = vec![
        Row {
            name: "bulk TCP, 1 stream",
            unit: "MiB/s",
            direct: vec![],
            mqlb: vec![],
            haproxy: vec![],
            baseline: vec![],
        },
        Row {
            name: "MQTT connects (mqtt-client-id)",
            unit: "conn/s",
            direct: vec![],
            mqlb: vec![],
            haproxy: vec![],
            baseline: vec![],
        },
        Row {
            name: "publish QoS0 10->2, 64 B",
            unit: "msg/s",
            direct: vec![],
            mqlb: vec![],
            haproxy: vec![],
            baseline: vec![],
        },
        Row {
            name: "publish QoS1 10->2, 64 B",
            unit: "msg/s",
            direct: vec![],
            mqlb: vec![],
            haproxy: vec![],
            baseline: vec![],
        },
        Row {
            name: "QoS1 paced latency p50",
            unit: "us",
            direct: vec![],
            mqlb: vec![],
            haproxy: vec![],
            baseline: vec![],
        },
    ];
    for rep in 0..reps {
        let targets: Vec<(usize, SocketAddr, SocketAddr)> = {
            let mut t = vec![(0, sink, broker.addr()), (1, mqlb_tcp, mqlb_mqtt)];
            if let (Some((_, a)), Some((_, b))) = (&hp_tcp, &hp_mqtt) {
                t.push((2, *a, *b));
            }
            if let Some((_, _, tcp, mqtt)) = &base {
                t.push((3, *tcp, *mqtt));
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
                    2 => row.haproxy.push(v),
                    _ => row.baseline.push(v),
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
    if base.is_some() {
        // Before/after: this build against the baseline binary, same repetitions.
        println!("this build against --baseline {baseline} (medians; per-repetition min..max):");
        for r in &rows {
            let (m, b) = (median(r.mqlb.clone()), median(r.baseline.clone()));
            let ratios: Vec<f64> = r.mqlb.iter().zip(&r.baseline).map(|(m, b)| m / b).collect();
            let (lo, hi) = ratios
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
            println!(
                "  {:<32} {m:>10.0} {b:>10.0}  this/base {:.2} ({lo:.2}..{hi:.2})   {}",
                r.name,
                m / b,
                r.unit
            );
        }
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
