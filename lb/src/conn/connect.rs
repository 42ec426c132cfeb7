//! Opening the backend leg: a socket tuned for MQTT, connected, with the bytes the inspection
//! read replayed on it.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// TCP keepalive on both legs, so a peer that vanished without a FIN is noticed: the rule's
/// `tcp_keepalive_*` (60 s, then every 10 s, by default).
pub(crate) fn keepalive(cfg: &mqlb_config::TcpKeepalive) -> TcpKeepalive {
    let k = TcpKeepalive::new()
        .with_time(cfg.time)
        .with_interval(cfg.interval);
    match cfg.count {
        Some(n) => k.with_retries(n),
        None => k,
    }
}

/// TCP_NODELAY and keepalive on one leg (a client socket inherits them from a listener mqlb
/// bound itself).
pub(crate) fn set_socket_options(s: &TcpStream, ka: &mqlb_config::TcpKeepalive) {
    if let Err(e) = s.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    set_keepalive(s, ka);
}

/// The rule's keepalive on a socket that inherited another (the listener's default).
pub(crate) fn set_keepalive(s: &TcpStream, ka: &mqlb_config::TcpKeepalive) {
    if let Err(e) = SockRef::from(s).set_tcp_keepalive(&keepalive(ka)) {
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
    ka: &mqlb_config::TcpKeepalive,
) -> std::io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&keepalive(ka))?;
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
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// The backend leg gets TCP_NODELAY and the rule's keepalive, and carries the replayed bytes.
    #[tokio::test]
    async fn backend_leg_is_tuned_and_replays() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let ka = mqlb_config::TcpKeepalive {
            time: Duration::from_secs(7),
            interval: Duration::from_secs(3),
            count: Some(4),
        };
        let s = connect_and_replay(addr, b"CONNECT", &ka).await.unwrap();
        assert!(s.nodelay().unwrap());
        let sock = SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(3)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 4);
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
        let ka = mqlb_config::TcpKeepalive::default();
        assert!(connect_and_replay(addr, b"CONNECT", &ka).await.is_err());
        assert!(connect_and_replay(addr, b"", &ka).await.is_err());
    }
}
