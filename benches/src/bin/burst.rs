//! A connection burst: N MQTT devices connect at the same instant (a failover, a fleet
//! powering up), straight to three `mqlb broker` nodes and through `mqlb lb` routing by client
//! ID to the same nodes, in the same run. Prints, for each path, how many got their CONNACK
//! within the deadline, the p50/p99/max CONNECT → CONNACK time, and the ratios mqlb/direct.
//!
//! `cargo run --release -p mqlb-benches --bin burst [-- --clients 8000 --reps 3]`
//! `--max-pending N` and `--broker-backlog N` set the LB pool's `max_pending` (default 256) and
//! the brokers' `backlog` (default 1024), for A/B runs against the old behaviour (no bound on
//! connects in flight, backlog 128: `--max-pending 1000000 --broker-backlog 128`).
//! The program raises its own open-files limit to the hard limit (each device is one
//! descriptor here, two in the LB, one in a broker; the children inherit the limit).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use mqlb_benches::{arg, median, mqlb_release_bin, reps_arg, wait_listening, Proc};
use mqlb_mqtt::{encode_connect, ConnectOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a device waits for its CONNACK before it counts as failed.
const DEADLINE: Duration = Duration::from_secs(20);

fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                eprintln!("could not raise the open-files limit");
            }
        }
    }
}

/// One burst's result.
struct Burst {
    ok: usize,
    failed: usize,
    /// CONNECT → CONNACK of the devices that got one, sorted.
    times: Vec<Duration>,
}

impl Burst {
    fn pct(&self, p: f64) -> Duration {
        self.times
            .get(((self.times.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(DEADLINE)
    }
}

/// `n` devices connect at once; device `i` goes to `target(i)`. Every connection is held until
/// all are done, as devices hold their sessions.
async fn burst(n: usize, tag: &str, target: impl Fn(usize) -> SocketAddr) -> Burst {
    let go = std::sync::Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (addr, go) = (target(i), go.clone());
        let connect = encode_connect(&ConnectOptions {
            client_id: format!("{tag}-{i}"),
            // Not 0: the brokers refused 0 when docs/measurements/burst.md was measured (fixed
            // since, bfcfaa2); the burst ends well within it.
            keep_alive: 120,
            ..ConnectOptions::default()
        });
        tasks.push(tokio::spawn(async move {
            go.wait().await;
            let t0 = Instant::now();
            let attempt = async {
                let mut s = TcpStream::connect(addr).await?;
                s.write_all(&connect).await?;
                let mut ack = [0u8; 4];
                s.read_exact(&mut ack).await?;
                anyhow::ensure!(ack[0] == 0x20 && ack[3] == 0, "refused: {ack:02x?}");
                anyhow::Ok(s)
            };
            match tokio::time::timeout(DEADLINE, attempt).await {
                Ok(Ok(s)) => Some((t0.elapsed(), s)),
                _ => None,
            }
        }));
    }
    go.wait().await;
    let mut held = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    for t in tasks {
        if let Ok(Some((took, s))) = t.await {
            times.push(took);
            held.push(s);
        }
    }
    times.sort();
    Burst {
        ok: times.len(),
        failed: n - times.len(),
        times,
    }
}

/// Starts three standalone `mqlb broker` nodes; returns them and their MQTT addresses.
async fn start_brokers(dir: &Path, backlog: usize) -> anyhow::Result<(Vec<Proc>, Vec<SocketAddr>)> {
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for i in 1..=3 {
        let mqtt: SocketAddr = format!("127.0.0.1:{}", mqlb_tests::free_port()?).parse()?;
        let file = dir.join(format!("b{i}.toml"));
        std::fs::write(
            &file,
            format!(
                "[[broker]]\nid = \"b{i}\"\nmqtt = \"{mqtt}\"\nmax_connections = 20000\nbacklog = {backlog}\n"
            ),
        )?;
        let child = Command::new(mqlb_release_bin()?)
            .args(["broker", "--id", &format!("b{i}"), "-c"])
            .arg(&file)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting mqlb broker")?;
        let mut p = Proc(child);
        wait_listening(mqtt, &mut p).await?;
        procs.push(p);
        addrs.push(mqtt);
    }
    Ok((procs, addrs))
}

async fn start_lb(
    dir: &Path,
    brokers: &[SocketAddr],
    max_pending: usize,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let front: SocketAddr = format!("127.0.0.1:{}", mqlb_tests::free_port()?).parse()?;
    let admin = mqlb_tests::free_port()?;
    let mut t = format!(
        "[lb]\nadmin = \"127.0.0.1:{admin}\"\nwatch_config = false\n\
         [[frontend]]\nname = \"f\"\nbind = \"{front}\"\nbacklog = 4096\n\
         [[pool]]\nname = \"p\"\nprobe = \"t\"\nmax_pending = {max_pending}\n"
    );
    for (i, b) in brokers.iter().enumerate() {
        t += &format!("[[pool.backend]]\nid = \"b{i}\"\naddr = \"{b}\"\n");
    }
    t += "[[probe]]\nname = \"t\"\nport = \"traffic\"\n\
          [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\ndistribution = \"mqtt-client-id\"\n\
          inspect_timeout = \"20s\"\n";
    let file = dir.join("lb.toml");
    std::fs::write(&file, t)?;
    let child = Command::new(mqlb_release_bin()?)
        .args(["lb", "-c"])
        .arg(&file)
        .env("RUST_LOG", "error")
        .spawn()
        .context("starting mqlb lb")?;
    let mut p = Proc(child);
    wait_listening(front, &mut p).await?;
    Ok((p, front))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    raise_nofile();
    let n = arg("--clients", 8000);
    let reps = reps_arg(3);
    let (max_pending, backlog) = (arg("--max-pending", 256), arg("--broker-backlog", 1024));
    let dir = mqlb_tests::TempDir::new("burst")?;
    println!(
        "mqlb burst: {n} devices connect at once, {reps} repetitions, deadline {DEADLINE:?}, \
         LB max_pending {max_pending}, broker backlog {backlog}; loopback, 2 cores"
    );
    let mut rows: Vec<(&str, Vec<Burst>)> = vec![("direct", Vec::new()), ("mqlb", Vec::new())];
    for rep in 0..reps {
        // Fresh brokers and LB each repetition: no session of an earlier burst is left.
        let (_brokers, addrs) = start_brokers(dir.path(), backlog).await?;
        let (_lb, front) = start_lb(dir.path(), &addrs, max_pending).await?;
        // Alternate which path goes first: the second finds brokers that just served a burst.
        let (direct, through) = if rep % 2 == 0 {
            let d = burst(n, &format!("d{rep}"), |i| addrs[i % addrs.len()]).await;
            (d, burst(n, &format!("m{rep}"), |_| front).await)
        } else {
            let m = burst(n, &format!("m{rep}"), |_| front).await;
            (
                burst(n, &format!("d{rep}"), |i| addrs[i % addrs.len()]).await,
                m,
            )
        };
        for (row, b) in rows.iter_mut().zip([direct, through]) {
            println!(
                "  rep {rep} {:<7} ok {:>5}  failed {:>5}  p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
                row.0,
                b.ok,
                b.failed,
                ms(b.pct(0.5)),
                ms(b.pct(0.99)),
                ms(b.pct(1.0))
            );
            row.1.push(b);
        }
    }
    println!("path       failed %   p50 ms    p99 ms    max ms   (medians of {reps})");
    let summary: Vec<(f64, f64, f64, f64)> = rows
        .iter()
        .map(|(name, bursts)| {
            let m = |f: &dyn Fn(&Burst) -> f64| median(bursts.iter().map(f).collect());
            let row = (
                m(&|b| 100.0 * b.failed as f64 / n as f64),
                m(&|b| ms(b.pct(0.5))),
                m(&|b| ms(b.pct(0.99))),
                m(&|b| ms(b.pct(1.0))),
            );
            println!(
                "{name:<10} {:>8.2} {:>8.1} {:>9.1} {:>9.1}",
                row.0, row.1, row.2, row.3
            );
            row
        })
        .collect();
    let (d, m) = (summary[0], summary[1]);
    println!(
        "mqlb/direct: p50 {:.2}, p99 {:.2}, max {:.2}; failed {:.2} % vs {:.2} %",
        m.1 / d.1,
        m.2 / d.2,
        m.3 / d.3,
        m.0,
        d.0
    );
    Ok(())
}
