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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_101st_connection_of_one_source_is_refused_while_another_source_gets_in(
) -> anyhow::Result<()> {
    let backend = discard_server()?;
    let cfg = toml(backend, "max_connections_per_source = 100");
    let lb = Lb::start(Config::parse(&cfg, "test")?, Listeners::default()).await?;
    let front = lb.frontend_addr("f").context("frontend")?;
    let mut held = Vec::new();
    for _ in 0..100 {
        let mut s = connect_from([127, 0, 0, 2], front).await?;
        s.write_all(b"x").await?;
        held.push(s);
    }
    wait_until("100 relayed", DEADLINE, || async {
        lb.connection_count() == 100
    })
    .await?;
    assert!(
        refused([127, 0, 0, 2], front).await,
        "the 101st from 127.0.0.2 is reset"
    );
    let mut other = connect_from([127, 0, 0, 3], front).await?;
    other.write_all(b"y").await?;
    wait_until("127.0.0.3 relayed", DEADLINE, || async {
        lb.connection_count() == 101
    })
    .await?;
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
    let mut again = connect_from([127, 0, 0, 2], front).await?;
    again.write_all(b"z").await?;
    wait_until("the freed place is taken", DEADLINE, || async {
        lb.connection_count() == 101
    })
    .await?;
    drop((held, other, again));
    lb.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_beyond_its_connection_rate_is_refused() -> anyhow::Result<()> {
    let backend = discard_server()?;
    // 1 a second, 5 at once: six connects in a row, the sixth refused.
    let cfg = toml(backend, "source_rate = 1\nsource_burst = 5");
    let lb = Lb::start(Config::parse(&cfg, "test")?, Listeners::default()).await?;
    let front = lb.frontend_addr("f").context("frontend")?;
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut s = connect_from([127, 0, 0, 4], front).await?;
        s.write_all(b"x").await?;
        held.push(s);
    }
    wait_until("5 relayed", DEADLINE, || async {
        lb.connection_count() == 5
    })
    .await?;
    assert!(refused([127, 0, 0, 4], front).await, "the sixth is reset");
    let mut other = connect_from([127, 0, 0, 5], front).await?;
    other.write_all(b"y").await?;
    wait_until("another source relayed", DEADLINE, || async {
        lb.connection_count() == 6
    })
    .await?;
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
