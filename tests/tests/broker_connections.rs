//! A broker node's connections end only by their own doing: one client's end never closes
//! another client's connection.

use std::time::Duration;

use mqlb_mqtt::{encode_connect, ConnectOptions, ProtocolLevel};
use mqlb_tests::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(10);

async fn connect(addr: std::net::SocketAddr, id: &str) -> anyhow::Result<TcpStream> {
    connect_with(addr, id, true).await
}

/// A 3.1.1 CONNECT (clean session or not), checked for CONNACK 0.
async fn connect_with(
    addr: std::net::SocketAddr,
    id: &str,
    clean_session: bool,
) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&encode_connect(&ConnectOptions {
        level: ProtocolLevel::V311,
        client_id: id.to_string(),
        keep_alive: 60,
        clean_start: clean_session,
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

/// A persistent member of a shared group that leaves with a delivery unacknowledged: rumqttd
/// saved its session, found its group already gone (it was the last member) and panicked
/// (`expect("group must exists")`) on the router thread, after which the node answered no
/// CONNECT at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_member_leaving_unacknowledged_does_not_stop_the_node() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let addr = cluster.mqtt(0);
    let mut member = connect_with(addr, "share-member", false).await?;
    // SUBSCRIBE $share/g/share/t QoS 1, packet id 1.
    let filter = b"$share/g/share/t";
    let mut sub = vec![
        0x82,
        (2 + 2 + filter.len() + 1) as u8,
        0,
        1,
        0,
        filter.len() as u8,
    ];
    sub.extend_from_slice(filter);
    sub.push(1);
    member.write_all(&sub).await?;
    let mut suback = [0u8; 5];
    tokio::time::timeout(DEADLINE, member.read_exact(&mut suback)).await??;
    anyhow::ensure!(suback == [0x90, 0x03, 0, 1, 1], "SUBACK {suback:?}");
    // A QoS 1 publish it receives and does not acknowledge.
    let mut publisher = connect(addr, "share-publisher").await?;
    let topic = b"share/t";
    let mut publish = vec![0x32, (2 + topic.len() + 2 + 1) as u8, 0, topic.len() as u8];
    publish.extend_from_slice(topic);
    publish.extend_from_slice(&[0, 1, b'x']);
    publisher.write_all(&publish).await?;
    let mut head = [0u8; 2];
    tokio::time::timeout(DEADLINE, member.read_exact(&mut head)).await??;
    anyhow::ensure!(head[0] & 0xf0 == 0x30, "expected a PUBLISH, got {head:?}");
    drop(member);
    // The node still serves: new clients are answered (the wait covers the router handling
    // the member's end, whenever that is).
    for i in 0..20 {
        connect(addr, &format!("share-after-{i}")).await?;
    }
    Ok(())
}
