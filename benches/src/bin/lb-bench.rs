//! End-to-end benchmark: bulk TCP throughput and MQTT connection rate, directly, through
//! `mqlb lb` and (where installed) through HAProxy, all in the same run on loopback.
//!
//! `cargo run --release -p mqlb-benches --bin lb-bench [-- --quick]`

use std::time::Duration;

use mqlb_benches::*;
use mqlb_tests::{Mosquitto, TempDir};

fn ratio(x: f64, base: f64) -> String {
    format!("{:.2}x direct", x / base)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let (bulk_bytes, conn_total) = if quick {
        (64 << 20, 1_000)
    } else {
        (512 << 20, 5_000)
    };
    let dir = TempDir::new("bench")?;
    println!(
        "mqlb lb-bench ({} cores, loopback)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    // Bulk TCP throughput to a discard server.
    let sink = discard_server()?;
    let (_mqlb, via_mqlb) = start_mqlb(dir.path(), &[sink], "five-tuple").await?;
    let haproxy = start_haproxy(dir.path(), &[sink]).await?;
    println!(
        "\n== bulk TCP throughput ({} MiB per run, split over the connections) ==",
        bulk_bytes >> 20
    );
    for conns in [1usize, 8] {
        let per = bulk_bytes / conns;
        let direct = bulk_mib_s(sink, conns, per).await?;
        let mqlb = bulk_mib_s(via_mqlb, conns, per).await?;
        print!(
            "{conns} conn(s): direct {direct:>8.0} MiB/s | mqlb {mqlb:>8.0} MiB/s ({})",
            ratio(mqlb, direct)
        );
        if let Some((_, hp)) = &haproxy {
            let h = bulk_mib_s(*hp, conns, per).await?;
            print!(" | haproxy {h:>8.0} MiB/s ({})", ratio(h, direct));
        }
        println!();
    }
    drop(haproxy);

    // MQTT connection rate against a real broker.
    let broker = Mosquitto::start().await?;
    let (_mqlb2, via_mqlb_mqtt) =
        start_mqlb(dir.path(), &[broker.addr()], "mqtt-client-id").await?;
    let haproxy = start_haproxy_with(dir.path(), &[broker.addr()], true).await?;
    println!("\n== MQTT connection rate ({conn_total} CONNECT/CONNACK/DISCONNECT, 16 at a time, mosquitto backend) ==");
    let report = |name: &str, (rate, p50, p99): (f64, Duration, Duration), base: f64| {
        println!(
            "{name:<28} {rate:>8.0} conn/s  p50 {:>7.3} ms  p99 {:>7.3} ms  ({})",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            ratio(rate, base)
        );
    };
    let direct = mqtt_connect_rate(broker.addr(), conn_total, 16, "direct").await?;
    report("direct", direct, direct.0);
    let m = mqtt_connect_rate(via_mqlb_mqtt, conn_total, 16, "mqlb").await?;
    report("mqlb (mqtt-client-id)", m, direct.0);
    if let Some((_, hp)) = &haproxy {
        let h = mqtt_connect_rate(*hp, conn_total, 16, "haproxy").await?;
        report("haproxy (MQTT client-id hash)", h, direct.0);
    } else {
        println!("haproxy not installed: no comparison");
    }
    Ok(())
}
