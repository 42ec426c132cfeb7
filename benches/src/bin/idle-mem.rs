//! Memory per idle proxied MQTT connection, and the connection rate while many are held:
//! through `mqlb lb` and (where installed) HAProxy, both routing by MQTT client ID to one
//! mosquitto broker.
//!
//! First the same rates straight to the broker (how much it slows down itself with many
//! sessions). Then for each LB: hold 100 MQTT sessions (CONNECT → CONNACK, then silent), measure the connect
//! rate (CONNECT/CONNACK/DISCONNECT, 16 at a time, median of 3), open N more sessions
//! (9 000 by default), measure the rate again, and report the LB process's RSS growth / N.
//!
//! `cargo run --release -p mqlb-benches --bin idle-mem [-- --quick]`
//! The program raises its own open-files limit to the hard limit (each held connection costs
//! one descriptor here, two in the LB and one in the broker, which inherits the limit).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mqlb_benches::{median, mqlb_release_bin, mqtt_connect_rate, rss_kib, wait_listening, Proc};
use mqlb_mqtt::{encode_connect, ConnectOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens `n` MQTT sessions through `addr` (64 at a time): CONNECT with keep-alive 0 (no
/// pings: the sessions stay silent), wait for the CONNACK, keep the socket.
async fn open_sessions(addr: SocketAddr, n: usize, tag: &str) -> anyhow::Result<Vec<TcpStream>> {
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let batch = (n - all.len()).min(64);
        let mut tasks = Vec::new();
        for i in all.len()..all.len() + batch {
            let id = format!("{tag}-{i}");
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await?;
                s.write_all(&encode_connect(&ConnectOptions {
                    client_id: id,
                    keep_alive: 0,
                    ..ConnectOptions::default()
                }))
                .await?;
                let mut ack = [0u8; 4];
                tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ack)).await??;
                if ack[0] != 0x20 || ack[3] != 0 {
                    bail!("CONNACK refused: {ack:02x?}");
                }
                anyhow::Ok(s)
            }));
        }
        for t in tasks {
            all.push(t.await??);
        }
    }
    Ok(all)
}

/// Connect rate through `front`, median of 3 runs of `total` connections.
async fn rate(front: SocketAddr, total: usize, tag: &str) -> anyhow::Result<f64> {
    let mut v = Vec::new();
    for r in 0..3 {
        v.push(
            mqtt_connect_rate(front, total, 16, &format!("{tag}-r{r}"))
                .await?
                .0,
        );
    }
    Ok(median(v))
}

/// `program args` under a shell that first raises the open-files limit to the hard limit.
fn unlimited(program: &str, args: &[String]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "ulimit -n $(ulimit -Hn) && exec \"$0\" \"$@\"",
        program,
    ])
    .args(args);
    cmd
}

fn spawn_unlimited(program: &str, args: &[String]) -> anyhow::Result<Proc> {
    Ok(Proc(
        unlimited(program, args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ))
}

struct Measured {
    /// None for the broker alone (no LB process to weigh).
    bytes_per_conn: Option<f64>,
    rate_few: f64,
    rate_many: f64,
}

/// Holds 100 sessions through `front`, measures the connect rate, holds `n` more, measures it
/// again; with an LB process (`lb`), also its RSS growth per held session. Without one,
/// `front` is the broker itself: how much of the slowdown through an LB is the broker's own.
async fn measure(
    name: &str,
    mut lb: Option<Proc>,
    front: SocketAddr,
    n: usize,
) -> anyhow::Result<Measured> {
    if let Some(lb) = &mut lb {
        wait_listening(front, lb).await?;
    }
    let rss = |lb: &Option<Proc>| lb.as_ref().map(|p| rss_kib(p.0.id())).transpose();
    let rate_total = if n >= 9_000 { 3_000 } else { 1_000 };
    // Warm up (allocator arenas, pools, first task allocations) and hold 100 sessions.
    let warm = open_sessions(front, 100, &format!("{name}-warm")).await?;
    let rate_few = rate(front, rate_total, &format!("{name}-few")).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(&lb)?;
    let start = Instant::now();
    let held = open_sessions(front, n, &format!("{name}-held")).await?;
    let opened = start.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss(&lb)?;
    let rate_many = rate(front, rate_total, &format!("{name}-many")).await?;
    let (per, memory) = match (before, after) {
        (Some(b), Some(a)) => {
            let per = a.saturating_sub(b) as f64 * 1024.0 / n as f64;
            (
                Some(per),
                format!("RSS {b} KiB -> {a} KiB: {per:>5.0} bytes/connection; "),
            )
        }
        _ => (
            None,
            "(no LB: sessions held on the broker itself); ".to_string(),
        ),
    };
    println!(
        "{name:<8} {n} idle MQTT sessions opened in {:>5.2} s; {memory}\
         connect rate {rate_few:>6.0}/s with 100 held, {rate_many:>6.0}/s with {} held ({:.2})",
        opened.as_secs_f64(),
        n + 100,
        rate_many / rate_few
    );
    drop(held);
    drop(warm);
    drop(lb);
    // Let the broker see every close before the next one opens as many again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(Measured {
        bytes_per_conn: per,
        rate_few,
        rate_many,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::var_os("MQLB_IDLE_MEM_RAISED").is_none() {
        // Re-run under a raised open-files limit.
        let exe = std::env::current_exe()?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        let status = unlimited(&exe.display().to_string(), &args)
            .env("MQLB_IDLE_MEM_RAISED", "1")
            .status()?;
        std::process::exit(status.code().unwrap_or(1));
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 2_000 } else { 9_000 };
    // Started under the raised limit, so the broker can hold every session too.
    let broker = mqlb_tests::Mosquitto::start().await?;
    let dir = mqlb_tests::TempDir::new("idle-mem")?;
    let port = |_: ()| -> anyhow::Result<SocketAddr> {
        Ok(format!("127.0.0.1:{}", mqlb_tests::free_port()?).parse()?)
    };
    let (front, admin) = (port(())?, port(())?);
    let cfg = dir.path().join("lb.toml");
    std::fs::write(
        &cfg,
        format!(
            "[lb]\nadmin = \"{admin}\"\nwatch_config = false\n[[frontend]]\nname = \"f\"\nbind = \"{front}\"\nbacklog = 4096\n\
             [[pool]]\nname = \"p\"\nprobe = \"t\"\n[[pool.backend]]\nid = \"m\"\naddr = \"{}\"\n\
             [[probe]]\nname = \"t\"\nport = \"traffic\"\n\
             [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\ndistribution = \"mqtt-client-id\"\n",
            broker.addr()
        ),
    )?;
    println!("idle-mem: {n} idle MQTT sessions through each LB (client-ID routing), mosquitto backend, loopback");
    measure("direct", None, broker.addr(), n).await?;
    let bin = mqlb_release_bin()?;
    let mqlb = spawn_unlimited(
        &bin.display().to_string(),
        &["lb".into(), "-c".into(), cfg.display().to_string()],
    )?;
    let m = measure("mqlb", Some(mqlb), front, n).await?;
    let m_mem = m.bytes_per_conn.context("no RSS measured for mqlb")?;
    if Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .status()
        .is_ok()
    {
        let hfront = port(())?;
        let hcfg = dir.path().join("haproxy.cfg");
        // HAProxy's own MQTT rules: validate the CONNECT, hash the client ID.
        std::fs::write(
            &hcfg,
            format!(
                "global\n  maxconn {}\ndefaults\n  mode tcp\n  timeout connect 3s\n  timeout client 4m\n  timeout server 4m\n\
                 frontend f\n  bind {hfront}\n  tcp-request inspect-delay 5s\n\
                 tcp-request content reject unless {{ req.payload(0,0),mqtt_is_valid }}\n  default_backend b\n\
                 backend b\n  balance hash req.payload(0,0),mqtt_field_value(connect,client_identifier)\n  server s {}\n",
                n + 500,
                broker.addr()
            ),
        )?;
        let hp = spawn_unlimited(
            "haproxy",
            &["-db".into(), "-f".into(), hcfg.display().to_string()],
        )?;
        let h = measure("haproxy", Some(hp), hfront, n).await?;
        println!(
            "mqlb / haproxy: memory per idle connection {:.2}; connect rate with {} held {:.2}, with 100 held {:.2}",
            m_mem / h.bytes_per_conn.context("no RSS measured for haproxy")?,
            n + 100,
            m.rate_many / h.rate_many,
            m.rate_few / h.rate_few
        );
    } else {
        println!("haproxy not installed: no comparison");
    }
    if m_mem <= 0.0 {
        bail!("no memory growth measured; is the LB holding the connections?");
    }
    Ok(())
}
