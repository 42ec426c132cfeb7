//! Where the CPU goes: runs two of `perf`'s workloads directly, through `mqlb lb` and through
//! HAProxy, and prints the CPU time each process spent per unit of work, split into user and
//! kernel time (from `/proc/<pid>/stat`):
//!
//! - MQTT connects (CONNECT → CONNACK → DISCONNECT through a `mqtt-client-id` rule, 16 at a
//!   time, to mosquitto): µs per connection for the client, the broker and the proxy;
//! - bulk TCP (one stream into a discard server): µs per MiB for the endpoints (client and
//!   server live in this process) and the proxy.
//!
//! On a machine where the load generator, the backend and the proxy share the cores, a
//! proxy's rate is bounded by its CPU per unit next to the endpoints': this shows how much of
//! it is the proxy's own code and how much the kernel's TCP work that every proxy does.
//!
//! `cargo run --release -p mqlb-benches --bin cpu-cost [-- --reps N]`

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Context;
use mqlb_benches::*;
use mqlb_tests::{Mosquitto, TempDir};

/// CPU time (user, kernel) of a process so far, in microseconds.
fn cpu_us(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces: count fields from the ')' that ends it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc stat format")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks = |i: usize| -> anyhow::Result<f64> {
        let v: f64 = f.get(i).context("short /proc stat")?.parse()?;
        Ok(v * 1e6 / hz)
    };
    // utime and stime: fields 14 and 15, the 12th and 13th after the name.
    Ok((ticks(11)?, ticks(12)?))
}

/// One way to the backends: direct, or through a proxy process.
struct Via {
    name: &'static str,
    proxy: Option<u32>,
    mqtt: SocketAddr,
    tcp: SocketAddr,
}

/// Runs `work` (which returns its rate and how many units it did) and prints one row: the
/// rate, then per unit the CPU of each process in `pids` (None: not in this row).
async fn measure<F, Fut>(label: &str, pids: [Option<u32>; 3], work: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(f64, f64)>>,
{
    let before: Vec<Option<(f64, f64)>> = pids
        .iter()
        .map(|p| p.map(cpu_us).transpose())
        .collect::<anyhow::Result<_>>()?;
    let t = Instant::now();
    let (rate, units) = work().await?;
    let secs = t.elapsed().as_secs_f64();
    let (mut cells, mut sum) = (Vec::new(), 0.0);
    for (p, b) in pids.iter().zip(&before) {
        match (p, b) {
            (Some(p), Some((u0, k0))) => {
                let (u1, k1) = cpu_us(*p)?;
                let (u, k) = ((u1 - u0) / units, (k1 - k0) / units);
                sum += u + k;
                cells.push(format!("{:.0} ({:.0}+{:.0})", u + k, u, k));
            }
            _ => cells.push("-".into()),
        }
    }
    println!(
        "{label:<18} {rate:>9.0} {:>15} {:>15} {:>15} {sum:>7.0}   (CPU {:.0}% of one core)",
        cells[0],
        cells[1],
        cells[2],
        sum * units / secs / 1e4
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let reps = reps_arg(3);
    let (conns, mib) = (20_000usize, 1024usize);
    let dir = TempDir::new("cpu-cost")?;
    let sink = discard_server()?;
    let broker = Mosquitto::start().await?;
    let broker_pid = broker.pid().context("mosquitto has no pid")?;
    let (m_mqtt, mqlb_mqtt) = start_mqlb(dir.path(), &[broker.addr()], "mqtt-client-id").await?;
    let (m_tcp, mqlb_tcp) = start_mqlb(dir.path(), &[sink], "five-tuple").await?;
    let hp_mqtt = start_haproxy_with(dir.path(), &[broker.addr()], true).await?;
    let hp_tcp = start_haproxy(dir.path(), &[sink]).await?;
    let mut vias = vec![
        Via {
            name: "direct",
            proxy: None,
            mqtt: broker.addr(),
            tcp: sink,
        },
        Via {
            name: "mqlb",
            proxy: Some(m_mqtt.0.id()),
            mqtt: mqlb_mqtt,
            tcp: mqlb_tcp,
        },
    ];
    let hp_tcp_pid = hp_tcp.as_ref().map(|(p, _)| p.0.id());
    if let (Some((p, a)), Some((_, t))) = (&hp_mqtt, &hp_tcp) {
        vias.push(Via {
            name: "haproxy",
            proxy: Some(p.0.id()),
            mqtt: *a,
            tcp: *t,
        });
    }
    let me = std::process::id();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "CPU per unit of work, user+kernel, {cores} cores; {reps} runs of each, every run printed"
    );
    println!(
        "{:<18} {:>9} {:>15} {:>15} {:>15} {:>7}",
        "", "rate", "client", "broker", "proxy", "total"
    );
    println!("MQTT connects ({conns} per run; rate in conn/s, CPU in us per connection)");
    for rep in 0..reps {
        for v in &vias {
            let tag = format!("c{rep}{}", v.name);
            measure(v.name, [Some(me), Some(broker_pid), v.proxy], || async {
                let (rate, _, _) = mqtt_connect_rate(v.mqtt, conns, 16, &tag).await?;
                Ok((rate, conns as f64))
            })
            .await?;
        }
    }
    println!("bulk TCP, 1 stream ({mib} MiB per run; rate in MiB/s, CPU in us per MiB; client = both endpoints)");
    for _ in 0..reps {
        for v in &vias {
            let proxy = match v.name {
                "mqlb" => Some(m_tcp.0.id()),
                "haproxy" => hp_tcp_pid,
                _ => None,
            };
            measure(v.name, [Some(me), None, proxy], || async {
                let rate = bulk_mib_s(v.tcp, 1, mib << 20).await?;
                Ok((rate, mib as f64))
            })
            .await?;
        }
    }
    Ok(())
}
