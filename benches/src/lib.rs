//! Shared pieces of the benchmark programs: a discard server for bulk throughput, an MQTT
//! connect/CONNACK round trip, and running `mqlb lb` (and HAProxy where installed) as real
//! processes, so the LB under test does not share a runtime with the load generator.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mqlb_mqtt::{encode_connect, ConnectOptions};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The bulk sink. It runs on threads of its own, not on the load generator's runtime: there,
/// the writer and the reader of a direct connection sometimes shared a worker thread and
/// handed data over without a wake-up, which made the direct baseline swing 2x between
/// repetitions (3131 to 7066 MiB/s in one run).
pub use mqlb_tests::discard_server;

/// Sends `bytes` on each of `conns` connections to `addr` and waits for the server's ack;
/// returns the aggregate rate in MiB/s.
pub async fn bulk_mib_s(addr: SocketAddr, conns: usize, bytes: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            send_and_ack(&mut s, bytes).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((conns * bytes) as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64())
}

/// Writes `bytes` on `s` in 256 KiB chunks, closes its write side and waits for the discard
/// server's one-byte ack: one bulk transfer, plain or TLS.
pub async fn send_and_ack(
    s: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin),
    bytes: usize,
) -> anyhow::Result<()> {
    let chunk = vec![0x5au8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await?;
        left -= n;
    }
    s.shutdown().await?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await?;
    Ok(())
}

/// Opens `total` MQTT connections (CONNECT → CONNACK → DISCONNECT) with `concurrency` at a
/// time; returns connections per second and the p50/p99 CONNACK latency.
pub async fn mqtt_connect_rate(
    addr: SocketAddr,
    total: usize,
    concurrency: usize,
    tag: &str,
) -> anyhow::Result<(f64, Duration, Duration)> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for i in (w..total).step_by(concurrency) {
                let t0 = Instant::now();
                let mut s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                let c = encode_connect(&ConnectOptions {
                    client_id: format!("{tag}-{i}"),
                    ..ConnectOptions::default()
                });
                s.write_all(&c).await?;
                let mut ack = [0u8; 4];
                s.read_exact(&mut ack).await?;
                if ack[0] != 0x20 || ack[3] != 0 {
                    bail!("CONNACK refused: {ack:02x?}");
                }
                lat.push(t0.elapsed());
                s.write_all(&[0xe0, 0x00]).await?;
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    Ok((rate, pct(0.5), pct(0.99)))
}

/// A child process killed on drop.
pub use mqlb_tests::KillOnDrop as Proc;

/// Waits until `addr` accepts TCP connections; fails at once if the process exits.
pub async fn wait_listening(addr: SocketAddr, p: &mut Proc) -> anyhow::Result<()> {
    mqlb_tests::wait_listening(addr, &mut p.0, Duration::from_secs(10)).await
}

pub use mqlb_tests::mqlb_release_bin;

/// Runs `mqlb lb` with one frontend in front of `backends`; returns the process and the
/// frontend address.
pub async fn start_mqlb(
    dir: &Path,
    backends: &[SocketAddr],
    distribution: &str,
) -> anyhow::Result<(Proc, SocketAddr)> {
    start_mqlb_bin(&mqlb_release_bin()?, dir, backends, distribution).await
}

/// [`start_mqlb`] with another `mqlb` binary (a baseline build to compare against).
pub async fn start_mqlb_bin(
    bin: &Path,
    dir: &Path,
    backends: &[SocketAddr],
    distribution: &str,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let front: SocketAddr = format!("127.0.0.1:{}", mqlb_tests::free_port()?).parse()?;
    let admin = mqlb_tests::free_port()?;
    let mut t = format!(
        "[lb]\nadmin = \"127.0.0.1:{admin}\"\nwatch_config = false\n\
         [[frontend]]\nname = \"f\"\nbind = \"{front}\"\n[[pool]]\nname = \"p\"\nprobe = \"t\"\n"
    );
    for (i, b) in backends.iter().enumerate() {
        t += &format!("[[pool.backend]]\nid = \"b{i}\"\naddr = \"{b}\"\n");
    }
    t += &format!(
        "[[probe]]\nname = \"t\"\nport = \"traffic\"\n\
         [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\ndistribution = \"{distribution}\"\n"
    );
    let file = dir.join(format!("mqlb-{distribution}-{}.toml", front.port()));
    std::fs::write(&file, t)?;
    let child = Command::new(bin)
        .args(["lb", "-c"])
        .arg(&file)
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting mqlb lb")?;
    let mut p = Proc(child);
    wait_listening(front, &mut p).await?;
    Ok((p, front))
}

/// Runs one `mqlb broker` node (no peers) as its own process; returns it with its MQTT 3.1.1
/// and MQTT 5 addresses.
pub async fn start_mqlb_broker(dir: &Path) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let (v4, v5) = (
        addr(mqlb_tests::free_port()?),
        addr(mqlb_tests::free_port()?),
    );
    let file = dir.join("broker.toml");
    std::fs::write(
        &file,
        format!(
            "[cluster]\nsecret = \"mqlb-bench-secret-0123456789\"\n\
             [[broker]]\nid = \"b1\"\nmqtt = \"{v4}\"\nmqtt_v5 = \"{v5}\"\n"
        ),
    )?;
    let child = Command::new(mqlb_release_bin()?)
        .args(["broker", "--id", "b1", "-c"])
        .arg(&file)
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting mqlb broker")?;
    let mut p = Proc(child);
    wait_listening(v4, &mut p).await?;
    wait_listening(v5, &mut p).await?;
    Ok((p, v4, v5))
}

/// Runs HAProxy in TCP mode in front of `backends` (round robin), if it is installed.
pub async fn start_haproxy(
    dir: &Path,
    backends: &[SocketAddr],
) -> anyhow::Result<Option<(Proc, SocketAddr)>> {
    start_haproxy_with(dir, backends, false).await
}

/// Like [`start_haproxy`]; with `mqtt`, HAProxy reads the CONNECT and hashes the client ID
/// (its MQTT rules), the same work `mqlb`'s `mqtt-client-id` rule does: the fair comparison.
pub async fn start_haproxy_with(
    dir: &Path,
    backends: &[SocketAddr],
    mqtt: bool,
) -> anyhow::Result<Option<(Proc, SocketAddr)>> {
    if !haproxy_installed() {
        return Ok(None);
    }
    let front: SocketAddr = format!("127.0.0.1:{}", mqlb_tests::free_port()?).parse()?;
    let (inspect, balance) = if mqtt {
        (
            "  tcp-request inspect-delay 5s\n  tcp-request content reject unless { req.payload(0,0),mqtt_is_valid }\n",
            "  balance hash req.payload(0,0),mqtt_field_value(connect,client_identifier)\n",
        )
    } else {
        ("", "  balance roundrobin\n")
    };
    let mut t = format!(
        "global\n  maxconn 5000\ndefaults\n  mode tcp\n  timeout connect 3s\n  timeout client 4m\n  timeout server 4m\n\
         frontend f\n  bind {front}\n{inspect}  default_backend b\nbackend b\n{balance}"
    );
    for (i, b) in backends.iter().enumerate() {
        t += &format!("  server s{i} {b}\n");
    }
    let file = dir.join(if mqtt {
        "haproxy-mqtt.cfg"
    } else {
        "haproxy.cfg"
    });
    std::fs::write(&file, t)?;
    Ok(Some((run_haproxy(&file, front).await?, front)))
}

/// Whether `haproxy` is on this machine (the benches compare with it where it is).
pub fn haproxy_installed() -> bool {
    Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .status()
        .is_ok()
}

/// Runs HAProxy with the configuration `file` and waits until it listens on `front`; its
/// complaints go to stderr.
pub async fn run_haproxy(file: &Path, front: SocketAddr) -> anyhow::Result<Proc> {
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(file)
        .stdout(Stdio::null())
        .spawn()
        .context("starting haproxy")?;
    let mut p = Proc(child);
    wait_listening(front, &mut p).await?;
    Ok(p)
}

/// MQTT options of the benchmark clients: keep-alive 30 s, 500 messages in flight.
pub fn opts(id: String, addr: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(500);
    o
}

/// QoS 1, one message per millisecond, publisher and subscriber through `addr`: median
/// end-to-end latency in microseconds.
pub async fn paced_latency_us(addr: SocketAddr, n: usize, tag: &str) -> anyhow::Result<f64> {
    let epoch = Instant::now();
    let topic = format!("lat/{tag}");
    let (sc, mut sel) = AsyncClient::new(opts(format!("{tag}-lsub"), addr), 1000);
    sc.subscribe(&topic, QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) =
            tokio::time::timeout(Duration::from_secs(10), sel.poll()).await??
        {
            break;
        }
    }
    let recv = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n);
        while lat.len() < n {
            match tokio::time::timeout(Duration::from_secs(10), sel.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&p.payload[..8]);
                    let sent = u64::from_le_bytes(b) as f64;
                    lat.push(epoch.elapsed().as_nanos() as f64 - sent);
                }
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        lat
    });
    let (pc, mut pel) = AsyncClient::new(opts(format!("{tag}-lpub"), addr), 1000);
    let driver = tokio::spawn(async move { while pel.poll().await.is_ok() {} });
    let mut payload = vec![0u8; 64];
    for _ in 0..n {
        payload[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
        pc.publish(&topic, QoS::AtLeastOnce, false, payload.clone())
            .await?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let lat = recv.await?;
    driver.abort();
    drop(sc);
    anyhow::ensure!(lat.len() == n, "latency run got {} of {n}", lat.len());
    Ok(median(lat) / 1000.0)
}

/// `--reps N` from the command line (more repetitions narrow the medians on a noisy machine),
/// or `default` when absent or not a positive number.
pub fn reps_arg(default: usize) -> usize {
    arg("--reps", default).max(1)
}

/// The value after `--name` on the command line, or `default` (also when it does not parse).
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

/// The median (upper median for an even count) of non-empty `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// 10 publishers → 2 subscribers, 64-byte payloads: messages delivered per second.
pub async fn publish_rate(
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

/// The resident memory of process `pid`, KiB (`VmRSS` of /proc).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}
