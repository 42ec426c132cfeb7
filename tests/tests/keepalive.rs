//! A rule's `tcp_keepalive_*` reach both legs of its connections: the client's socket (which
//! otherwise inherits the listener's default) and the socket to the backend. The LB runs in
//! this process, so its sockets are found among the process's own descriptors.

mod common;

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use common::{topo, DEADLINE};
use mqlb_tests::wait_until;
use socket2::SockRef;
use tokio::net::TcpStream;

/// (peer address, keepalive on, time, interval, count) of every TCP socket of this process.
fn tcp_sockets() -> Vec<(SocketAddr, bool, Duration, Duration, u32)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return out;
    };
    for entry in dir.flatten().take(10_000) {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor is open (listed just now) and only borrowed for the
        // getsockopt calls below; one closed meanwhile makes them fail, which is skipped.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let s = SockRef::from(&fd);
        let Some(peer) = s.peer_addr().ok().and_then(|a| a.as_socket()) else {
            continue;
        };
        if let (Ok(on), Ok(time), Ok(interval), Ok(count)) = (
            s.keepalive(),
            s.tcp_keepalive_time(),
            s.tcp_keepalive_interval(),
            s.tcp_keepalive_retries(),
        ) {
            out.push((peer, on, time, interval, count));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_tcp_keepalive_is_set_on_both_legs() -> anyhow::Result<()> {
    let t = topo(
        1,
        "tcp_keepalive_time = \"7s\"\ntcp_keepalive_interval = \"3s\"\ntcp_keepalive_count = 4\n",
    )
    .await?;
    let backend = t.brokers[0].addr();
    let client = TcpStream::connect(t.front).await?;
    let me = client.local_addr()?;
    // Proxied: the LB holds a socket of this client and one to the backend.
    wait_until("the connection is proxied", DEADLINE, || async {
        let s = tcp_sockets();
        s.iter().any(|s| s.0 == me) && s.iter().any(|s| s.0 == backend && s.1)
    })
    .await?;
    let want = (true, Duration::from_secs(7), Duration::from_secs(3), 4);
    let sockets = tcp_sockets();
    let client_leg: Vec<_> = sockets.iter().filter(|s| s.0 == me).collect();
    assert_eq!(
        client_leg.len(),
        1,
        "the LB's socket of this client: {sockets:?}"
    );
    let c = client_leg[0];
    assert_eq!((c.1, c.2, c.3, c.4), want, "client leg");
    let backend_legs: Vec<_> = sockets
        .iter()
        .filter(|s| s.0 == backend && s.1)
        .map(|s| (s.1, s.2, s.3, s.4))
        .collect();
    assert!(!backend_legs.is_empty(), "no backend leg: {sockets:?}");
    assert!(backend_legs.iter().all(|b| *b == want), "{backend_legs:?}");
    drop(client);
    Ok(())
}
