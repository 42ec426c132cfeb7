//! `mqlb lb` as a process under connection churn: every kind of short life a client can give a
//! connection (a full MQTT session, a hang-up half-way through the CONNECT, a reset after the
//! CONNACK, a connect with no bytes, bytes that are not MQTT) ends with nothing left behind in
//! the LB (descriptors back to where they were, no live connection listed or gauged) and
//! with exactly one outcome counted per connection. The same for bulk streams on the
//! zero-copy path, some of them reset half-way.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use mqlb_mqtt::{encode_connect, ConnectOptions};
use mqlb_tests::{
    discard_server, free_port, get_json, http, metric, mqlb_bin, wait_listening, wait_until,
    KillOnDrop, Mosquitto, TempDir,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

fn connect_packet(id: &str) -> Vec<u8> {
    encode_connect(&ConnectOptions {
        client_id: id.into(),
        ..Default::default()
    })
}

/// One connection's short life, of kind `i % 5`.
async fn one_life(front: SocketAddr, i: usize) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(front).await?;
    let id = format!("churn-{i}");
    match i % 5 {
        // A whole session: CONNECT, CONNACK, a QoS0 PUBLISH, DISCONNECT.
        0 => {
            s.write_all(&connect_packet(&id)).await?;
            let mut ack = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack)).await??;
            anyhow::ensure!(ack == [0x20, 2, 0, 0], "{id}: CONNACK {ack:02x?}");
            s.write_all(&[0x30, 0x05, 0x00, 0x01, b't', b'h', b'i'])
                .await?;
            s.write_all(&[0xe0, 0x00]).await?;
        }
        // Hangs up half-way through the CONNECT.
        1 => {
            let c = connect_packet(&id);
            s.write_all(&c[..c.len() / 2]).await?;
        }
        // Resets the connection after the CONNACK.
        2 => {
            s.write_all(&connect_packet(&id)).await?;
            let mut ack = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack)).await??;
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
        }
        // Connects and leaves without a byte.
        3 => {}
        // Speaks something that is not MQTT.
        _ => {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        }
    }
    drop(s);
    Ok(())
}

/// Starts `mqlb lb` with [`DATA_THREADS`] data threads (`lb.data_threads`, checked), a
/// frontend to `backend` under `distribution`, and probes once an hour. Returns the process,
/// the frontend and the admin address once the LB's own data-path check has gone through the
/// frontend (which the LB does not count as a client connection; the test waits on the admin
/// port, not the frontend, to add none of its own).
async fn start_lb(
    tmp: &TempDir,
    backend: SocketAddr,
    distribution: &str,
) -> anyhow::Result<(KillOnDrop, SocketAddr, SocketAddr)> {
    let file = tmp.path().join(format!("lb-{distribution}.toml"));
    let (front, admin): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{}", free_port()?).parse()?,
        format!("127.0.0.1:{}", free_port()?).parse()?,
    );
    std::fs::write(
        &file,
        format!(
            "[lb]\nadmin = \"{admin}\"\nwatch_config = false\ndata_threads = {DATA_THREADS}\n\
             [[frontend]]\nname = \"f\"\nbind = \"{front}\"\n\
             [[pool]]\nname = \"p\"\nprobe = \"own-port\"\n[[pool.backend]]\nid = \"b1\"\naddr = \"{backend}\"\n\
             [[probe]]\nname = \"own-port\"\nport = \"traffic\"\ninterval = \"1h\"\n\
             [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\ndistribution = \"{distribution}\"\ninspect_timeout = \"2s\"\n"
        ),
    )?;
    let mut lb = KillOnDrop(
        Command::new(mqlb_bin()?)
            .args(["lb", "-c", file.to_str().unwrap_or_default()])
            // The config's thread count, not an override from the caller's environment.
            .env_remove("MQLB_DATA_THREADS")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_listening(admin, &mut lb.0, Duration::from_secs(20)).await?;
    wait_until("the data-path check", Duration::from_secs(10), || async {
        http(admin, "GET", "/metrics")
            .await
            .is_ok_and(|(_, t)| metric(&t, "mqlb_data_path_up", &[("rule", "r")]) == 1.0)
    })
    .await?;
    // `lb.data_threads` took effect: that many data-path threads, by name.
    let data_threads = std::fs::read_dir(format!("/proc/{}/task", lb.0.id()))?
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("mqlb-data-"))
        .count();
    anyhow::ensure!(
        data_threads == DATA_THREADS,
        "{data_threads} data threads, {DATA_THREADS} configured"
    );
    Ok((lb, front, admin))
}

/// Not the core count of a usual test machine, so the check shows the setting took effect.
const DATA_THREADS: usize = 3;

/// Connections ended (all outcomes) and open, from the LB's metrics.
async fn ended_and_active(admin: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let (_, text) = http(admin, "GET", "/metrics").await?;
    Ok((
        metric(&text, "mqlb_connections_total", &[]),
        metric(&text, "mqlb_connections_active", &[]),
    ))
}

/// Waits until `want` connections have ended and none is open, then checks that none is
/// listed and that the process holds at most `fd_limit` descriptors again.
async fn wait_all_ended(
    admin: SocketAddr,
    pid: u32,
    want: f64,
    fd_limit: usize,
) -> anyhow::Result<()> {
    let counted = wait_until(
        "every connection to be counted",
        Duration::from_secs(15),
        || async { matches!(ended_and_active(admin).await, Ok((t, 0.0)) if t == want) },
    )
    .await;
    if counted.is_err() {
        anyhow::bail!(
            "(ended, active) = {:?}, want ({want}, 0)",
            ended_and_active(admin).await?
        );
    }
    let listed = get_json(admin, "/api/connections").await?;
    anyhow::ensure!(
        listed.as_array().map(Vec::len) == Some(0),
        "still listed: {listed}"
    );
    let fds = wait_until(
        "descriptors back to the baseline",
        Duration::from_secs(10),
        || async { open_fds(pid).is_ok_and(|f| f <= fd_limit) },
    )
    .await;
    anyhow::ensure!(
        fds.is_ok(),
        "descriptors: at most {fd_limit} expected, {:?} now",
        open_fds(pid)
    );
    Ok(())
}

/// Runs `warm` lives of `life` one by one (so pools and runtimes hold what they keep), takes
/// the baselines, runs `n` more 20 at a time, and waits until all `n` ended, are counted once,
/// and the LB holds at most `fd_slack` descriptors more than at the baseline.
async fn churn<F, Fut>(
    lb: &KillOnDrop,
    front: SocketAddr,
    admin: SocketAddr,
    warm: usize,
    n: usize,
    fd_slack: usize,
    life: F,
) -> anyhow::Result<()>
where
    F: Fn(SocketAddr, usize) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let pid = lb.0.id();
    for i in 0..warm {
        life(front, i).await?;
    }
    // Counted: the warm-up alone (the LB's data-path check is not client traffic).
    wait_until("the warm-up to end", Duration::from_secs(10), || async {
        matches!(ended_and_active(admin).await, Ok((t, 0.0)) if t == warm as f64)
    })
    .await?;
    let (ended_before, _) = ended_and_active(admin).await?;
    let baseline = open_fds(pid)?;
    let mut tasks = Vec::new();
    for w in 0..20 {
        tasks.push(tokio::spawn(async move {
            for i in (warm + w..warm + n).step_by(20) {
                life(front, i).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    wait_all_ended(admin, pid, ended_before + n as f64, baseline + fd_slack).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_nothing_behind_and_counts_every_connection_once() -> anyhow::Result<()> {
    let broker = Mosquitto::start().await?;
    let tmp = TempDir::new("lb-churn")?;
    let (lb, front, admin) = start_lb(&tmp, broker.addr(), "mqtt-client-id").await?;
    // Warm up every kind twice, then 1 000 more; every descriptor comes back.
    churn(&lb, front, admin, 10, 1000, 0, one_life).await?;
    // And the LB still serves.
    one_life(front, 0).await?;
    Ok(())
}

/// One bulk stream of kind `i % 3`: 1 MiB then a half-close and the backend's answer; 512 KiB
/// then a reset; 1 MiB then a plain close without waiting.
async fn one_stream(front: SocketAddr, i: usize) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(front).await?;
    let chunk = vec![0x5a_u8; 64 * 1024];
    let chunks = if i % 3 == 1 { 8 } else { 16 };
    for _ in 0..chunks {
        s.write_all(&chunk).await?;
    }
    match i % 3 {
        0 => {
            s.shutdown().await?;
            let mut k = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut k)).await??;
        }
        1 => socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?,
        _ => {}
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_churn_with_resets_leaves_no_socket_or_pipe_behind() -> anyhow::Result<()> {
    let tmp = TempDir::new("lb-bulk-churn")?;
    let (lb, front, admin) = start_lb(&tmp, discard_server()?, "five-tuple").await?;
    // Each data thread may keep up to 16 empty pipes (two descriptors each) for later bulk
    // streams; a leak per stream would be hundreds of descriptors. 120 streams: about 100 MiB.
    let pooled = 2 * 16 * DATA_THREADS;
    churn(&lb, front, admin, 3, 120, pooled, one_stream).await?;
    one_stream(front, 0).await?;
    Ok(())
}
