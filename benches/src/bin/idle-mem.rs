//! Memory per idle proxied connection: hold N idle TCP connections through `mqlb lb` (and
//! HAProxy where installed) and divide the growth of the LB process's RSS by N.
//!
//! `cargo run --release -p mqlb-benches --bin idle-mem [-- --quick]`
//! The program raises its own open-files limit to the hard limit (each held connection costs
//! two descriptors here and two in the LB).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mqlb_benches::{mqlb_release_bin, wait_listening, Proc};
use tokio::net::{TcpListener, TcpStream};

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// A server that holds each connection until its peer closes it.
async fn holder() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 64];
                while matches!(tokio::io::AsyncReadExt::read(&mut s, &mut b).await, Ok(n) if n > 0)
                {
                }
            });
        }
    });
    Ok(addr)
}

/// Opens `n` idle connections to `addr` (64 at a time) and returns them.
async fn open(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let batch = (n - all.len()).min(64);
        let mut tasks = Vec::new();
        for _ in 0..batch {
            tasks.push(tokio::spawn(TcpStream::connect(addr)));
        }
        for t in tasks {
            all.push(t.await??);
        }
    }
    Ok(all)
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

async fn measure(name: &str, mut lb: Proc, front: SocketAddr, n: usize) -> anyhow::Result<f64> {
    wait_listening(front, &mut lb).await?;
    let pid = lb.0.id();
    // Warm up: allocator arenas, first task stacks.
    let warm = open(front, 100).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid)?;
    let start = Instant::now();
    let held = open(front, n).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!(
        "{name:<8} {n} idle connections opened in {:>6.2} s; RSS {before} KiB -> {after} KiB: {per:>7.0} bytes/connection",
        start.elapsed().as_secs_f64()
    );
    drop(held);
    drop(warm);
    drop(lb);
    // Let the holder see every close before the next LB opens as many again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(per)
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
    let hold = holder().await?;
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
             [[pool]]\nname = \"p\"\nprobe = \"t\"\n[[pool.backend]]\nid = \"h\"\naddr = \"{hold}\"\n\
             [[probe]]\nname = \"t\"\nport = \"traffic\"\n[[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n"
        ),
    )?;
    println!("idle-mem: {n} idle TCP connections through each LB, loopback");
    let bin = mqlb_release_bin()?;
    let mqlb = spawn_unlimited(
        &bin.display().to_string(),
        &["lb".into(), "-c".into(), cfg.display().to_string()],
    )?;
    let m = measure("mqlb", mqlb, front, n).await?;
    if Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .status()
        .is_ok()
    {
        let hfront = port(())?;
        let hcfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &hcfg,
            format!(
                "global\n  maxconn {}\ndefaults\n  mode tcp\n  timeout connect 3s\n  timeout client 4m\n  timeout server 4m\n\
                 frontend f\n  bind {hfront}\n  default_backend b\nbackend b\n  server s {hold}\n",
                n + 200
            ),
        )?;
        let hp = spawn_unlimited(
            "haproxy",
            &["-db".into(), "-f".into(), hcfg.display().to_string()],
        )?;
        let h = measure("haproxy", hp, hfront, n).await?;
        println!("mqlb / haproxy memory per idle connection: {:.2}", m / h);
    } else {
        println!("haproxy not installed: no comparison");
    }
    if m <= 0.0 {
        bail!("no memory growth measured; is the LB holding the connections?");
    }
    Ok(())
}
