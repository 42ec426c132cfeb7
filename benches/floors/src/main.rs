//! mqlb against the floors of this machine: what the simplest user-space relay and a relay in
//! the kernel give, measured in the same run as mqlb, HAProxy and a direct connection.
//!
//! - latency: 1-byte ping-pong over one TCP connection (`TCP_NODELAY`) to an echo server, each
//!   round trip crossing the proxy twice, as a paced QoS1 publish does (publisher → broker,
//!   broker → subscriber); the added median round trip is compared with HAProxy's;
//! - MQTT latency: `perf`'s paced QoS1 latency (publisher and subscriber through the path to
//!   one mosquitto, a message per millisecond), whose added p50 is what issue 6's latency
//!   target is about; each relay here forwards to the broker (one backend: no routing needed);
//! - bulk: one stream into a discard server, MiB/s, compared with the direct stream.
//!
//! The floors: the simplest user-space relay there is (two blocking threads per connection,
//! read then write, 64 KiB buffer: no event loop, no parsing, no metrics), and a relay in the
//! kernel (eBPF sockmap, where this process may load BPF programs: root or CAP_BPF), in which
//! no user-space code runs per message (a kernel worker thread sends the redirected segments).
//!
//! Research code, outside mqlb's workspace (it is no part of what mqlb runs): from the
//! repository's root, with the workspace's lock file,
//! `cp Cargo.lock benches/floors/ && cargo run --release --manifest-path benches/floors/Cargo.toml [-- --reps N]`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mqlb_benches::*;
use mqlb_tests::{serve_threads, Mosquitto, TempDir};
use sockmap::{relayed, SockMap};

mod sockmap;

fn echo(mut s: TcpStream) -> anyhow::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        s.write_all(&buf[..n])?;
    }
}

/// Copies `from` → `to` until EOF, then half-closes `to`.
fn copy(mut from: TcpStream, mut to: TcpStream) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            to.shutdown(std::net::Shutdown::Write)?;
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}

/// The user-space floor: one blocking thread per direction.
fn user_relay(backend: SocketAddr) -> anyhow::Result<SocketAddr> {
    serve_threads("user-relay", move |c| {
        let b = TcpStream::connect(backend)?;
        c.set_nodelay(true)?;
        b.set_nodelay(true)?;
        let (c2, b2) = (c.try_clone()?, b.try_clone()?);
        let up = std::thread::spawn(move || copy(c2, b2));
        copy(b, c)?;
        up.join()
            .map_err(|_| anyhow::anyhow!("copy thread panicked"))?
    })
}

/// Waits until the peer of `fd` has closed its side.
///
/// An `EPIPE` on a socket is not the end: the kernel relays the segment that carries the FIN
/// too, an empty one, and when its worker sends it after the relay has shut the other socket
/// down, that socket reports `EPIPE` although every byte went through.
fn wait_hangup(fd: &TcpStream) -> anyhow::Result<()> {
    loop {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut p, 1, -1) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if p.revents & libc::POLLRDHUP != 0 {
            return Ok(());
        }
        match fd.take_error()? {
            Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => continue,
            Some(e) => anyhow::bail!("socket error while relaying in the kernel: {e}"),
            None if p.revents & libc::POLLHUP != 0 => return Ok(()),
            None => continue,
        }
    }
}

/// Passes `from`'s FIN on to `to` once the kernel has relayed every byte before it.
fn pass_fin(from: &TcpStream, to: &TcpStream, to_connected: bool) -> anyhow::Result<()> {
    wait_hangup(from)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !relayed(from.as_raw_fd(), to.as_raw_fd(), to_connected)? {
        anyhow::ensure!(Instant::now() < deadline, "kernel relay not drained in 5 s");
        std::thread::sleep(Duration::from_micros(50));
    }
    to.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// The kernel floor: the pair is handed to the sockmap; the threads only pass the FINs on.
fn kernel_relay(backend: SocketAddr, map: Arc<SockMap>) -> anyhow::Result<SocketAddr> {
    serve_threads("kernel-relay", move |c| {
        let b = TcpStream::connect(backend)?;
        c.set_nodelay(true)?;
        b.set_nodelay(true)?;
        map.hand_over(c.as_raw_fd(), b.as_raw_fd())?;
        let (c2, b2) = (c.try_clone()?, b.try_clone()?);
        let up = std::thread::spawn(move || pass_fin(&c2, &b2, true));
        pass_fin(&b, &c, false)?;
        up.join()
            .map_err(|_| anyhow::anyhow!("FIN thread panicked"))?
    })
}

/// Median and mean round trip of `n` 1-byte ping-pongs through `addr`, after a warm-up.
fn ping_pong(addr: SocketAddr, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut one = [0u8; 1];
    let mut rtt = Vec::with_capacity(n);
    for i in 0..n + 200 {
        let t = Instant::now();
        s.write_all(b"p")?;
        s.read_exact(&mut one).context("no echo within 5 s")?;
        if i >= 200 {
            rtt.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let mean = rtt.iter().sum::<f64>() / n as f64;
    rtt.sort_by(f64::total_cmp);
    Ok((rtt[n / 2], mean))
}

/// One way to the backends: direct, or through a proxy (one address per backend).
struct Path {
    name: &'static str,
    echo: SocketAddr,
    sink: SocketAddr,
    mqtt: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let reps = reps_arg(3);
    let (n, mib) = (10_000, 1024);
    let dir = TempDir::new("floors")?;
    let echo_addr = serve_threads("echo", echo)?;
    let sink = discard_server()?;
    let (_m1, mqlb_echo) = start_mqlb(dir.path(), &[echo_addr], "five-tuple").await?;
    let (_m2, mqlb_sink) = start_mqlb(dir.path(), &[sink], "five-tuple").await?;
    let broker = Mosquitto::start().await?;
    let (_m3, mqlb_mqtt) = start_mqlb(dir.path(), &[broker.addr()], "mqtt-client-id").await?;
    let hp_echo = start_haproxy(dir.path(), &[echo_addr]).await?;
    let hp_sink = start_haproxy(dir.path(), &[sink]).await?;
    let hp_mqtt = start_haproxy_with(dir.path(), &[broker.addr()], true).await?;
    let mut paths = vec![
        Path {
            name: "direct",
            echo: echo_addr,
            sink,
            mqtt: broker.addr(),
        },
        Path {
            name: "mqlb",
            echo: mqlb_echo,
            sink: mqlb_sink,
            mqtt: mqlb_mqtt,
        },
    ];
    if let (Some((_, e)), Some((_, s)), Some((_, m))) = (&hp_echo, &hp_sink, &hp_mqtt) {
        paths.push(Path {
            name: "haproxy",
            echo: *e,
            sink: *s,
            mqtt: *m,
        });
    }
    paths.push(Path {
        name: "user-space floor",
        echo: user_relay(echo_addr)?,
        sink: user_relay(sink)?,
        mqtt: user_relay(broker.addr())?,
    });
    match SockMap::new(1024) {
        Ok(map) => {
            let map = Arc::new(map);
            paths.push(Path {
                name: "kernel floor",
                echo: kernel_relay(echo_addr, map.clone())?,
                sink: kernel_relay(sink, map.clone())?,
                mqtt: kernel_relay(broker.addr(), map)?,
            });
        }
        Err(e) => println!("kernel floor not measured: {e}"),
    }
    let (mut p50s, mut means, mut mqtts, mut bulks) = (
        vec![Vec::new(); paths.len()],
        vec![Vec::new(); paths.len()],
        vec![Vec::new(); paths.len()],
        vec![Vec::new(); paths.len()],
    );
    for rep in 0..reps {
        for (i, p) in paths.iter().enumerate() {
            let addr = p.echo;
            let (p50, mean) = tokio::task::spawn_blocking(move || ping_pong(addr, n))
                .await?
                .with_context(|| format!("round trips through {}", p.name))?;
            p50s[i].push(p50);
            means[i].push(mean);
            mqtts[i].push(
                paced_latency_us(p.mqtt, 1000, &format!("fl{rep}-{i}"))
                    .await
                    .with_context(|| format!("MQTT latency through {}", p.name))?,
            );
            bulks[i].push(
                bulk_mib_s(p.sink, 1, mib << 20)
                    .await
                    .with_context(|| format!("bulk through {}", p.name))?,
            );
        }
    }
    let p50: Vec<f64> = p50s.into_iter().map(median).collect();
    let mean: Vec<f64> = means.into_iter().map(median).collect();
    let mqtt: Vec<f64> = mqtts.into_iter().map(median).collect();
    let bulk: Vec<f64> = bulks.into_iter().map(median).collect();
    let hap = paths.iter().position(|p| p.name == "haproxy");
    println!(
        "medians of {reps} interleaved runs, {} cores; round trips: {n} x 1 byte; MQTT: QoS1, 1000 paced; bulk: {mib} MiB, 1 stream",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<18} {:>8} {:>8} {:>7} {:>9} | {:>8} {:>7} {:>9} | {:>7} {:>8}",
        "path",
        "rtt p50",
        "rtt avg",
        "added",
        "/ hap's",
        "MQTT p50",
        "added",
        "/ hap's",
        "MiB/s",
        "/ direct"
    );
    // Added over direct, and that as a share of HAProxy's added.
    let added = |v: &[f64], i: usize| {
        let a = v[i] - v[0];
        let share = match hap {
            Some(h) if i != 0 => format!("{:.2}", a / (v[h] - v[0])),
            _ => "-".to_string(),
        };
        (a, share)
    };
    for (i, p) in paths.iter().enumerate() {
        let (rtt_added, rtt_share) = added(&p50, i);
        let (mqtt_added, mqtt_share) = added(&mqtt, i);
        println!(
            "{:<18} {:>8.1} {:>8.1} {:>7.1} {:>9} | {:>8.0} {:>7.0} {:>9} | {:>7.0} {:>8.2}",
            p.name,
            p50[i],
            mean[i],
            rtt_added,
            rtt_share,
            mqtt[i],
            mqtt_added,
            mqtt_share,
            bulk[i],
            bulk[i] / bulk[0]
        );
    }
    Ok(())
}
