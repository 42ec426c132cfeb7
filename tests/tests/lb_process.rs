//! `mqlb lb` as a process under connection churn: every kind of short life a client can give a
//! connection (a full MQTT session, a hang-up half-way through the CONNECT, a reset after the
//! CONNACK, a connect with no bytes, bytes that are not MQTT) ends with nothing left behind in
//! the LB (descriptors back to where they were, no live connection listed or gauged) and
//! with exactly one outcome counted per connection.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use mqlb_lb::mqtt::{encode_connect, ConnectOptions};
use mqlb_tests::{
    free_port, get_json, http, metric, mqlb_bin, wait_listening, wait_until, Mosquitto, TempDir,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill() {
            eprintln!("killing mqlb: {e}");
        }
        if let Err(e) = self.0.wait() {
            eprintln!("reaping mqlb: {e}");
        }
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_nothing_behind_and_counts_every_connection_once() -> anyhow::Result<()> {
    let broker = Mosquitto::start().await?;
    let tmp = TempDir::new("lb-churn")?;
    let file = tmp.path().join("lb.toml");
    let (front, admin): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{}", free_port()?).parse()?,
        format!("127.0.0.1:{}", free_port()?).parse()?,
    );
    std::fs::write(
        &file,
        format!(
            "[lb]\nadmin = \"{admin}\"\nwatch_config = false\n\
             [[frontend]]\nname = \"mqtt\"\nbind = \"{front}\"\n\
             [[pool]]\nname = \"p\"\nprobe = \"own-port\"\n[[pool.backend]]\nid = \"b1\"\naddr = \"{}\"\n\
             [[probe]]\nname = \"own-port\"\nport = \"traffic\"\ninterval = \"1h\"\n\
             [[rule]]\nname = \"r\"\nfrontend = \"mqtt\"\npool = \"p\"\ndistribution = \"mqtt-client-id\"\ninspect_timeout = \"2s\"\n",
            broker.addr()
        ),
    )?;
    let mut lb = KillOnDrop(
        Command::new(mqlb_bin()?)
            .args(["lb", "-c", file.to_str().unwrap_or_default()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_listening(front, &mut lb.0, Duration::from_secs(20)).await?;
    let pid = lb.0.id();
    let total_ended = || async {
        let (_, text) = http(admin, "GET", "/metrics").await?;
        anyhow::Ok((
            metric(&text, "mqlb_connections_total", &[]),
            metric(&text, "mqlb_connections_active", &[]),
        ))
    };

    // The LB's own data-path check goes through the frontend too: once at start (interval 1h).
    wait_until("the data-path check", Duration::from_secs(10), || async {
        http(admin, "GET", "/metrics")
            .await
            .is_ok_and(|(_, t)| metric(&t, "mqlb_data_path_up", &[("rule", "r")]) == 1.0)
    })
    .await?;
    // Warm up every kind twice, so pools and runtimes hold what they keep; then the baselines.
    let warm = 10;
    for i in 0..warm {
        one_life(front, i).await?;
    }
    wait_until("the warm-up to end", Duration::from_secs(10), || async {
        matches!(total_ended().await, Ok((t, 0.0)) if t >= warm as f64)
    })
    .await?;
    let (ended_before, _) = total_ended().await?;
    let baseline = open_fds(pid)?;

    // 1 000 more, 20 at a time.
    let n = 1000;
    let mut tasks = Vec::new();
    for w in 0..20 {
        tasks.push(tokio::spawn(async move {
            for i in (warm + w..warm + n).step_by(20) {
                one_life(front, i).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }

    // Every connection ends and is counted once; nothing stays open.
    let counted = wait_until(
        "every connection to be counted",
        Duration::from_secs(15),
        || async { matches!(total_ended().await, Ok((t, 0.0)) if t == ended_before + n as f64) },
    )
    .await;
    if counted.is_err() {
        anyhow::bail!(
            "(ended, active) = {:?}, want ({}, 0)",
            total_ended().await?,
            ended_before + n as f64
        );
    }
    let listed = get_json(admin, "/api/connections").await?;
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    let fds = wait_until(
        "descriptors back to the baseline",
        Duration::from_secs(10),
        || async { open_fds(pid).is_ok_and(|f| f <= baseline) },
    )
    .await;
    assert!(
        fds.is_ok(),
        "descriptors: {baseline} before the churn, {:?} after",
        open_fds(pid)
    );
    // And the LB still serves.
    one_life(front, 0).await?;
    Ok(())
}
