//! A broker node's connections end only by their own doing: one client's end never closes
//! another client's connection.

use std::time::Duration;

use mqlb_lb::mqtt::{encode_connect, ConnectOptions, ProtocolLevel};
use mqlb_tests::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(10);

async fn connect(addr: std::net::SocketAddr, id: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&encode_connect(&ConnectOptions {
        level: ProtocolLevel::V311,
        client_id: id.to_string(),
        keep_alive: 60,
        ..ConnectOptions::default()
    }))
    .await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut ack)).await??;
    anyhow::ensure!(ack == [0x20, 0x02, 0x00, 0x00], "{id}: CONNACK {ack:?}");
    Ok(s)
}

/// rumqttd hears of a clean end twice: the DISCONNECT packet, then the closed socket. It freed
/// the connection's slot at the first, gave the slot to the next client to connect, and at
/// the second closed that client instead: a device connecting while another one said goodbye
/// was dropped right after its CONNACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_disconnect_never_closes_the_next_client() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let addr = cluster.mqtt(0);
    // Many clients leave while others arrive, so arrivals land between a leaver's two reports.
    let mut tasks = Vec::new();
    for t in 0..16 {
        tasks.push(tokio::spawn(async move {
            let mut kept = Vec::new();
            for i in 0..25 {
                let mut leaving = connect(addr, &format!("leaving-{t}-{i}")).await?;
                leaving.write_all(&[0xe0, 0x00]).await?;
                drop(leaving);
                kept.push((
                    format!("{t}-{i}"),
                    connect(addr, &format!("staying-{t}-{i}")).await?,
                ));
            }
            anyhow::Ok(kept)
        }));
    }
    let mut kept = Vec::new();
    for t in tasks {
        kept.extend(t.await??);
    }
    let mut closed = Vec::new();
    for (i, s) in &mut kept {
        s.write_all(&[0xc0, 0x00]).await?;
        let mut pong = [0u8; 2];
        match tokio::time::timeout(DEADLINE, s.read_exact(&mut pong)).await {
            Ok(Ok(_)) if pong == [0xd0, 0x00] => {}
            other => closed.push((i.clone(), format!("{other:?} {pong:?}"))),
        }
    }
    anyhow::ensure!(
        closed.is_empty(),
        "{} of {} staying clients were closed: {:?}",
        closed.len(),
        kept.len(),
        &closed[..closed.len().min(5)]
    );
    Ok(())
}
