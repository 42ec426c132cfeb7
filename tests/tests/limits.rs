//! Connection limits at accept (issue 13): per source, per-source rate; a flooding source is
//! reset at once while the others keep getting in.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use mqlb_config::Config;
use mqlb_lb::{Lb, Listeners};
use mqlb_tests::{discard_server, metric, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const DEADLINE: Duration = Duration::from_secs(10);

/// A connection to `front` from the loopback address `source`.
async fn connect_from(source: [u8; 4], front: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::from(source), 0))?;
    Ok(socket.connect(front).await?)
}

/// True when the LB resets (or closes) a connection from `source` instead of relaying it. The
/// reset can come before the client's connect has returned, which then reports it.
async fn refused(source: [u8; 4], front: SocketAddr) -> bool {
    let Ok(mut s) = connect_from(source, front).await else {
        return true;
    };
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(DEADLINE, s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn toml(backend: SocketAddr, frontend_extra: &str) -> String {
    format!(
        "[lb]\nadmin = \"127.0.0.1:0\"\nwatch_config = false\nshutdown_grace = \"1s\"\n\
         [[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\n{frontend_extra}\n\
         [[pool]]\nname = \"p\"\nprobe = \"t\"\n[[pool.backend]]\nid = \"b\"\naddr = \"{backend}\"\n\
         [[probe]]\nname = \"t\"\nport = \"traffic\"\ninterval = \"1h\"\n\
         [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n"
    )
}

/// Opens `n` connections from `source` that the LB relays (each sends a byte), and waits
/// until the LB holds `total` relayed connections.
async fn relayed(
    lb: &Lb,
    source: [u8; 4],
    n: usize,
    total: usize,
) -> anyhow::Result<Vec<TcpStream>> {
    let front = lb.frontend_addr("f").context("frontend")?;
    let mut held = Vec::new();
    for _ in 0..n {
        let mut s = connect_from(source, front).await?;
        s.write_all(b"x").await?;
        held.push(s);
    }
    wait_until(&format!("{total} relayed"), DEADLINE, || async {
        lb.connection_count() == total
    })
    .await?;
    Ok(held)
}

/// An LB in front of a discard server, with these frontend keys.
async fn lb_with(frontend_extra: &str) -> anyhow::Result<(Lb, SocketAddr)> {
    let cfg = toml(discard_server()?, frontend_extra);
    let lb = Lb::start(Config::parse(&cfg, "test")?, Listeners::default()).await?;
    let front = lb.frontend_addr("f").context("frontend")?;
    Ok((lb, front))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_101st_connection_of_one_source_is_refused_while_another_source_gets_in(
) -> anyhow::Result<()> {
    let (lb, front) = lb_with("max_connections_per_source = 100").await?;
    let mut held = relayed(&lb, [127, 0, 0, 2], 100, 100).await?;
    assert!(
        refused([127, 0, 0, 2], front).await,
        "the 101st from 127.0.0.2 is reset"
    );
    let other = relayed(&lb, [127, 0, 0, 3], 1, 101).await?;
    let text = lb.metrics_text();
    assert_eq!(
        metric(
            &text,
            "mqlb_connections_refused_total",
            &[("frontend", "f"), ("reason", "max_connections_per_source")]
        ),
        1.0,
        "{text}"
    );
    // A connection that ends gives its place back.
    held.pop();
    wait_until("99 relayed", DEADLINE, || async {
        lb.connection_count() == 100
    })
    .await?;
    let again = relayed(&lb, [127, 0, 0, 2], 1, 101).await?;
    drop((held, other, again));
    lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_beyond_its_connection_rate_is_refused() -> anyhow::Result<()> {
    // 1 a second, 5 at once: six connects in a row, the sixth refused.
    let (lb, front) = lb_with("source_rate = 1\nsource_burst = 5").await?;
    let held = relayed(&lb, [127, 0, 0, 4], 5, 5).await?;
    assert!(refused([127, 0, 0, 4], front).await, "the sixth is reset");
    let other = relayed(&lb, [127, 0, 0, 5], 1, 6).await?;
    let text = lb.metrics_text();
    assert_eq!(
        metric(
            &text,
            "mqlb_connections_refused_total",
            &[("reason", "source_rate")]
        ),
        1.0,
        "{text}"
    );
    drop((held, other));
    lb.shutdown().await;
    Ok(())
}
