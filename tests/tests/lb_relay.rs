//! The LB as a TCP relay (no MQTT): half-close, bulk streams both ways, connections cut when
//! shutdown's grace runs out, and listeners opened and closed by reload while a relayed
//! connection lives on.

mod common;

use std::time::Duration;

use common::{count_then_reply_server, tcp_lb_toml, DEADLINE};
use mqlb_config::Config;
use mqlb_lb::{Lb, Listeners};
use mqlb_tests::{metric, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_passes_the_fin_and_keeps_the_other_direction() -> anyhow::Result<()> {
    let backend = count_then_reply_server().await?;
    let lb = Lb::start(
        Config::parse(&tcp_lb_toml(backend, ""), "test")?,
        Listeners::default(),
    )
    .await?;
    let front = lb
        .frontend_addr("f")
        .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
    let mut s = TcpStream::connect(front).await?;
    let payload = vec![7u8; 300_000];
    s.write_all(&payload).await?;
    s.shutdown().await?; // FIN: "I am done sending", still reading
    let mut reply = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut reply)).await??;
    assert_eq!(reply, "got 300000");
    let m = lb.metrics_text();
    wait_until("bytes counted", DEADLINE, || async {
        let m = lb.metrics_text();
        // The data-path probe's own connections add "got 0" (5 bytes) each, nothing inbound.
        let out = metric(&m, "mqlb_bytes_total", &[("direction", "out")]) as u64;
        metric(&m, "mqlb_bytes_total", &[("direction", "in")]) == 300_000.0
            && out >= 10
            && (out - 10).is_multiple_of(5)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{m}"))?;
    lb.shutdown().await;
    Ok(())
}

/// An echo backend: writes back everything it reads, then closes after the client's FIN.
async fn echo_server() -> anyhow::Result<std::net::SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if let Err(e) = tokio::io::copy(&mut r, &mut w).await {
                    eprintln!("echo server: {e}");
                }
            });
        }
    });
    Ok(addr)
}

/// Bulk streams (which the copy moves with splice(2) on Linux once a read fills a whole
/// buffer) arrive intact and in order both ways, small messages after them too, and every
/// byte is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_streams_are_relayed_intact_both_ways() -> anyhow::Result<()> {
    const LEN: usize = 24 << 20;
    let lb = Lb::start(
        Config::parse(&tcp_lb_toml(echo_server().await?, ""), "test")?,
        Listeners::default(),
    )
    .await?;
    let front = lb
        .frontend_addr("f")
        .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
    let mut streams = Vec::new();
    for seed in 0..3u32 {
        streams.push(tokio::spawn(async move {
            let data: Vec<u8> = (0..LEN as u32)
                .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as u8)
                .collect();
            let (mut r, mut w) = TcpStream::connect(front).await?.into_split();
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&sent).await?;
                // A small write after the bulk one: it must not be stuck behind a pipe.
                w.write_all(b"tail").await?;
                w.shutdown().await?;
                anyhow::Ok(())
            });
            let mut got = Vec::with_capacity(LEN + 4);
            tokio::time::timeout(DEADLINE * 2, r.read_to_end(&mut got)).await??;
            writer.await??;
            anyhow::ensure!(
                got.len() == LEN + 4,
                "got {} bytes of {}",
                got.len(),
                LEN + 4
            );
            anyhow::ensure!(got[..LEN] == data[..], "bulk bytes differ");
            anyhow::ensure!(&got[LEN..] == b"tail", "tail differs");
            anyhow::Ok(())
        }));
    }
    for s in streams {
        s.await??;
    }
    let total = 3.0 * (LEN + 4) as f64;
    wait_until("bytes counted", DEADLINE, || async {
        let m = lb.metrics_text();
        metric(&m, "mqlb_bytes_total", &[("direction", "in")]) == total
            && metric(&m, "mqlb_bytes_total", &[("direction", "out")]) >= total
    })
    .await?;
    lb.shutdown().await;
    Ok(())
}

/// When shutdown's grace runs out, connections still open are cut (both peers see the close),
/// counted, and shutdown returns how many it cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_what_outlives_the_grace_period() -> anyhow::Result<()> {
    let toml = tcp_lb_toml(echo_server().await?, "").replace(
        "watch_config = false\n",
        "watch_config = false\nshutdown_grace = \"300ms\"\n",
    );
    let lb = Lb::start(Config::parse(&toml, "test")?, Listeners::default()).await?;
    let front = lb
        .frontend_addr("f")
        .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(front).await?;
        s.write_all(b"hi").await?;
        let mut b = [0u8; 2];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut b)).await??;
        held.push(s);
    }
    let started = std::time::Instant::now();
    let cut = tokio::time::timeout(DEADLINE, lb.shutdown()).await?;
    assert_eq!(cut, 3);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "cut before the grace ran out"
    );
    for mut s in held {
        let mut b = [0u8; 8];
        let n = tokio::time::timeout(DEADLINE, s.read(&mut b)).await??;
        assert_eq!(n, 0, "the client sees the close");
    }
    let m = lb.metrics_text();
    assert_eq!(
        metric(&m, "mqlb_connections_total", &[("outcome", "shutdown")]),
        3.0,
        "{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_opens_and_closes_listeners_without_touching_the_others() -> anyhow::Result<()> {
    let backend = count_then_reply_server().await?;
    let base = tcp_lb_toml(backend, "");
    let lb = Lb::start(Config::parse(&base, "test")?, Listeners::default()).await?;
    let first = lb
        .frontend_addr("f")
        .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
    let mut live = TcpStream::connect(first).await?;
    live.write_all(b"before").await?;

    let with_second = format!(
        "{base}[[frontend]]\nname = \"g\"\nbind = \"127.0.0.1:0\"\n\
         [[rule]]\nname = \"r2\"\nfrontend = \"g\"\npool = \"p\"\n"
    );
    lb.apply(Config::parse(&with_second, "test")?).await?;
    let second = lb
        .frontend_addr("g")
        .ok_or_else(|| anyhow::anyhow!("g not opened"))?;
    assert_eq!(
        lb.frontend_addr("f"),
        Some(first),
        "unchanged frontend keeps its socket"
    );
    let mut s = TcpStream::connect(second).await?;
    s.write_all(b"abc").await?;
    s.shutdown().await?;
    let mut reply = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut reply)).await??;
    assert_eq!(reply, "got 3");

    lb.apply(Config::parse(&base, "test")?).await?;
    assert_eq!(lb.frontend_addr("g"), None);
    wait_until("g refuses", DEADLINE, || async {
        TcpStream::connect(second).await.is_err()
    })
    .await?;
    // The connection opened before both reloads is intact.
    live.write_all(b"after").await?;
    live.shutdown().await?;
    let mut reply = String::new();
    tokio::time::timeout(DEADLINE, live.read_to_string(&mut reply)).await??;
    assert_eq!(reply, "got 11");
    lb.shutdown().await;
    Ok(())
}
