//! The broker's own throughput: QoS 1 (and QoS 0) publishes from 10 publishers to 2
//! subscribers on mosquitto, on one `mqlb broker` node, and on that node through `mqlb lb`,
//! interleaved in the same run, medians and ratios.
//!
//! `cargo run --release -p mqlb-benches --bin broker-bench [-- --quick] [--reps N]`

use mqlb_benches::*;
use mqlb_tests::{Mosquitto, TempDir};
use rumqttc::QoS;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = reps_arg(if quick { 1 } else { 3 });
    let per_pub = if quick { 500 } else { 2000 };
    let dir = TempDir::new("broker-bench")?;
    let mosquitto = Mosquitto::start().await?;
    let (_node, node, _) = start_mqlb_broker(dir.path()).await?;
    let (_lb, via_lb) = start_mqlb(dir.path(), &[node], "mqtt-client-id").await?;
    let places = [
        ("mosquitto", mosquitto.addr()),
        ("mqlb node", node),
        ("node via lb", via_lb),
    ];
    let workloads = [
        ("publish QoS1 10->2, 64 B", QoS::AtLeastOnce),
        ("publish QoS0 10->2, 64 B", QoS::AtMostOnce),
    ];
    // rates[workload][place]: one figure per repetition.
    let mut rates = vec![vec![Vec::new(); places.len()]; workloads.len()];
    for rep in 0..reps {
        for (w, (_, qos)) in workloads.iter().enumerate() {
            for (p, (_, addr)) in places.iter().enumerate() {
                let tag = format!("r{rep}w{w}p{p}");
                rates[w][p].push(publish_rate(*addr, *qos, per_pub, &tag).await?);
            }
        }
        eprintln!("repetition {} of {reps} done", rep + 1);
    }
    println!(
        "mqlb broker-bench: medians of {reps} interleaved repetitions, loopback, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>11} {:>10}",
        "workload", "mosquitto", "mqlb node", "node via lb", "node/mosq", "lb/node"
    );
    for (w, (name, _)) in workloads.iter().enumerate() {
        let m: Vec<f64> = rates[w].iter().map(|r| median(r.clone())).collect();
        println!(
            "{:<28} {:>10.0} {:>10.0} {:>12.0} {:>11.2} {:>10.2}   msg/s",
            name,
            m[0],
            m[1],
            m[2],
            m[1] / m[0],
            m[2] / m[1]
        );
    }
    Ok(())
}
