//! Opening the backend leg: a socket tuned for MQTT, connected, with the bytes the inspection
//! read replayed on it.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// TCP keepalive on both legs, so a peer that vanished without a FIN is noticed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

pub(crate) fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
}

/// TCP_NODELAY and keepalive on one leg (a client socket inherits them from a listener mqlb
/// bound itself).
pub(crate) fn set_socket_options(s: &TcpStream) {
    if let Err(e) = s.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    if let Err(e) = SockRef::from(s).set_tcp_keepalive(&keepalive()) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
}

/// Opens the backend leg and sends it the bytes read while inspecting.
///
/// The socket is made by hand rather than by `TcpStream::connect`: TCP_NODELAY is set on it
/// (MQTT packets are small and latency matters) and TCP keepalive (a backend host that
/// vanished is noticed on a quiet connection too) before connecting and, when there are bytes
/// to replay, the replay itself reports a refused or failed connect, which saves the `SO_ERROR`
/// query per connection.
pub(crate) async fn connect_and_replay(
    addr: SocketAddr,
    replay: &[u8],
) -> std::io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&keepalive())?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        // Under way: a non-blocking connect answers EINPROGRESS.
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    // Writable once the handshake is done, or once it failed (the error is then reported by
    // the write below or by take_error).
    stream.writable().await?;
    if replay.is_empty() {
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    } else {
        stream.write_all(replay).await?;
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// The backend leg gets TCP_NODELAY and keepalive, and carries the replayed bytes.
    #[tokio::test]
    async fn backend_leg_is_tuned_and_replays() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let s = connect_and_replay(addr, b"CONNECT").await.unwrap();
        assert!(s.nodelay().unwrap());
        assert!(SockRef::from(&s).keepalive().unwrap());
        let (mut a, _) = l.accept().await.unwrap();
        let mut got = [0u8; 7];
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"CONNECT");
    }

    /// A refused connect is an error, whether or not there are bytes to replay (the replay or
    /// SO_ERROR reports it), so the next backend is tried.
    #[tokio::test]
    async fn refused_connect_is_an_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(connect_and_replay(addr, b"CONNECT").await.is_err());
        assert!(connect_and_replay(addr, b"").await.is_err());
    }
}
