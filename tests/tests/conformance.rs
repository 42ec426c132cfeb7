//! MQTT rules every broker node keeps (issue 11), one test per rule, against a node directly
//! (3.1.1 and 5.0 listeners).

use std::time::Duration;

use mqlb_lb::mqtt::{encode_connect, ConnectOptions, ProtocolLevel};
use mqlb_tests::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(10);

/// MQTT 3.1.1 and 5.0, 3.1.2.10: a Keep Alive of 0 turns the keep alive mechanism off. Several
/// client libraries send it by default; rumqttd closed such a CONNECT without a CONNACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_accepted_and_the_session_stays() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let v5 = cluster
        .mqtt_v5(0)
        .ok_or_else(|| anyhow::anyhow!("no MQTT 5 listener"))?;
    for (level, addr) in [
        (ProtocolLevel::V311, cluster.mqtt(0)),
        (ProtocolLevel::V5, v5),
    ] {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(&encode_connect(&ConnectOptions {
            level,
            client_id: format!("ka0-{}", level as u8),
            keep_alive: 0,
            ..ConnectOptions::default()
        }))
        .await?;
        let mut head = [0u8; 2];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut head)).await??;
        let mut rest = vec![0u8; usize::from(head[1])];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut rest)).await??;
        assert_eq!(head[0], 0x20, "{level:?}: a CONNACK");
        assert_eq!(rest.get(1), Some(&0), "{level:?}: accepted");
        // The link lives on: a PINGREQ is answered (with keep alive 0 taken as a zero timeout,
        // the broker would have dropped it at once).
        s.write_all(&[0xc0, 0x00]).await?;
        let mut pong = [0u8; 2];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut pong)).await??;
        assert_eq!(pong, [0xd0, 0x00], "{level:?}: PINGRESP");
    }
    Ok(())
}
