//! A flood from one source while a real device connects from another: 127.0.0.2 holds up to
//! 2 000 silent connections (reopened as the LB closes them) and floods connects from 50 tasks;
//! meanwhile a device on 127.0.0.3 connects (CONNECT → CONNACK → DISCONNECT) every 200 ms.
//! Printed: the device's connect p50/p99 and failures before, during and after the flood,
//! through `mqlb lb` with the per-source limits and, in the same run, without them.
//!
//! `cargo run --release -p mqlb-benches --bin flood [-- --flood-secs 15]`
//! Bounded: loopback only, fixed durations, at most 2 050 flood sockets at a time.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mqlb_benches::{arg, mqlb_release_bin, wait_listening, Proc};
use mqlb_mqtt::{encode_connect, ConnectOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SLOW: usize = 2_000;
const FLOODERS: usize = 50;
const DEVICE_EVERY: Duration = Duration::from_millis(200);
const DEVICE_TIMEOUT: Duration = Duration::from_secs(5);

async fn connect_from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(IpAddr::from(source), 0))?;
    s.connect(to).await
}

/// One device session through `front` from 127.0.0.3: the CONNACK time, or `None` on failure.
async fn device(front: SocketAddr, i: u64) -> Option<Duration> {
    let t0 = Instant::now();
    let attempt = async {
        let mut s = connect_from([127, 0, 0, 3], front).await?;
        s.write_all(&encode_connect(&ConnectOptions {
            client_id: format!("device-{i}"),
            ..ConnectOptions::default()
        }))
        .await?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await?;
        anyhow::ensure!(ack[0] == 0x20 && ack[3] == 0, "refused: {ack:02x?}");
        s.write_all(&[0xe0, 0]).await?;
        anyhow::Ok(())
    };
    match tokio::time::timeout(DEVICE_TIMEOUT, attempt).await {
        Ok(Ok(())) => Some(t0.elapsed()),
        _ => None,
    }
}

/// The flood from 127.0.0.2 until `stop`: silent connections held (reopened when closed) and
/// connects as fast as they go. Returns how many connects it made.
fn flood(front: SocketAddr, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<u64>> {
    let mut tasks = Vec::new();
    for w in 0..SLOW + FLOODERS {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match connect_from([127, 0, 0, 2], front).await {
                    Ok(mut s) if w < SLOW => {
                        // Silent: hold it until the LB closes it (or the flood ends).
                        let mut b = [0u8; 1];
                        let until_closed = s.read(&mut b);
                        tokio::select! {
                            _ = until_closed => {}
                            _ = async { while !stop.load(Ordering::Relaxed) {
                                tokio::time::sleep(Duration::from_millis(100)).await } } => {}
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            n
        }));
    }
    tasks
}

struct Phase {
    times: Vec<Duration>,
    failed: usize,
}

impl Phase {
    fn pct(&self, p: f64) -> f64 {
        let mut t = self.times.clone();
        t.sort();
        t.get(((t.len() as f64 - 1.0) * p).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    }
}

/// The device connecting every 200 ms for `how_long`.
async fn phase(front: SocketAddr, how_long: Duration, seq: &AtomicU64) -> Phase {
    let end = Instant::now() + how_long;
    let mut tick = tokio::time::interval(DEVICE_EVERY);
    let mut tasks = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        tasks.push(tokio::spawn(device(
            front,
            seq.fetch_add(1, Ordering::Relaxed),
        )));
    }
    let mut p = Phase {
        times: Vec::new(),
        failed: 0,
    };
    for t in tasks {
        match t.await.ok().flatten() {
            Some(d) => p.times.push(d),
            None => p.failed += 1,
        }
    }
    p
}

async fn start(dir: &std::path::Path, limits: bool) -> anyhow::Result<(Vec<Proc>, SocketAddr)> {
    let port = || -> anyhow::Result<u16> { mqlb_tests::free_port() };
    let (mqtt, front, admin) = (port()?, port()?, port()?);
    let broker_file = dir.join("broker.toml");
    std::fs::write(
        &broker_file,
        format!("[[broker]]\nid = \"b1\"\nmqtt = \"127.0.0.1:{mqtt}\"\nmax_connections = 20000\n"),
    )?;
    let mut broker = Proc(
        Command::new(mqlb_release_bin()?)
            .args(["broker", "--id", "b1", "-c"])
            .arg(&broker_file)
            .env("RUST_LOG", "off")
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting mqlb broker")?,
    );
    wait_listening(SocketAddr::from(([127, 0, 0, 1], mqtt)), &mut broker).await?;
    let limit_keys = if limits {
        "max_connections_per_source = 100\nsource_rate = 50\nsource_burst = 100\n"
    } else {
        ""
    };
    let lb_file = dir.join(format!("lb-{limits}.toml"));
    std::fs::write(
        &lb_file,
        format!(
            "[lb]\nadmin = \"127.0.0.1:{admin}\"\nwatch_config = false\n\
             [[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:{front}\"\nbacklog = 4096\n{limit_keys}\
             [[pool]]\nname = \"p\"\nprobe = \"t\"\n[[pool.backend]]\nid = \"b1\"\naddr = \"127.0.0.1:{mqtt}\"\n\
             [[probe]]\nname = \"t\"\nport = \"traffic\"\n\
             [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\ndistribution = \"mqtt-client-id\"\n\
             inspect_timeout = \"5s\"\n"
        ),
    )?;
    let front = SocketAddr::from(([127, 0, 0, 1], front));
    let mut lb = Proc(
        Command::new(mqlb_release_bin()?)
            .args(["lb", "-c"])
            .arg(&lb_file)
            .env("RUST_LOG", "warn")
            .spawn()
            .context("starting mqlb lb")?,
    );
    wait_listening(front, &mut lb).await?;
    Ok((vec![broker, lb], front))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flood_secs = Duration::from_secs(arg("--flood-secs", 15u64));
    let quiet = Duration::from_secs(5);
    let dir = mqlb_tests::TempDir::new("flood")?;
    println!(
        "mqlb flood: {SLOW} silent connections + {FLOODERS} connect loops from 127.0.0.2 for \
         {flood_secs:?}; a device on 127.0.0.3 every {DEVICE_EVERY:?} (timeout {DEVICE_TIMEOUT:?})"
    );
    println!("LB                 phase    tries  failed   p50 ms   p99 ms   flood connects");
    let seq = AtomicU64::new(0);
    for limits in [true, false] {
        let (_procs, front) = start(dir.path(), limits).await?;
        let name = if limits {
            "per-source limits"
        } else {
            "no limits"
        };
        let before = phase(front, quiet, &seq).await;
        let stop = Arc::new(AtomicBool::new(false));
        let flooders = flood(front, stop.clone());
        let during = phase(front, flood_secs, &seq).await;
        stop.store(true, Ordering::Relaxed);
        let mut connects = 0;
        for t in flooders {
            connects += t.await.unwrap_or(0);
        }
        let after = phase(front, quiet, &seq).await;
        for (label, p, c) in [
            ("before", &before, None),
            ("during", &during, Some(connects)),
            ("after", &after, None),
        ] {
            println!(
                "{name:<18} {label:<7} {:>6} {:>7} {:>8.1} {:>8.1}   {}",
                p.times.len() + p.failed,
                p.failed,
                p.pct(0.5),
                p.pct(0.99),
                c.map_or(String::new(), |c| c.to_string())
            );
        }
    }
    Ok(())
}
