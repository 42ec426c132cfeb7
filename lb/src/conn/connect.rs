//! Opening the backend leg: a socket tuned for MQTT, connected, TLS when the pool has
//! `tls`, with the bytes the inspection read replayed on it.
//!
//! A PROXY header goes in clear before the TLS handshake: the PROXY protocol is the first
//! thing on the TCP stream, and HAProxy's `send-proxy-v2` on an `ssl` server, AWS NLB and the
//! brokers that document PROXY with their own TLS (TBMQ) all put it there; a listener reads it
//! before its TLS (HAProxy's `accept-proxy` on a `bind ... ssl`).

use std::borrow::Cow;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use mqlb_config::tls_stream::TlsClientStream;

use crate::backend::tls::{self as upstream, TlsFail};

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

/// What a backend is sent before the client's next bytes: `clear` right after the TCP
/// connect (a PROXY header; on a plain pool the replayed CONNECT with it, in one write), then,
/// on a TLS pool, `sealed` inside TLS (the replayed CONNECT).
pub(crate) struct Replay<'b> {
    pub clear: Cow<'b, [u8]>,
    pub sealed: &'b [u8],
}

/// TLS to the backend: the pool's client configuration and the name its certificate is
/// verified against.
pub(crate) struct Upstream<'a> {
    pub config: &'a Arc<rustls::ClientConfig>,
    pub name: ServerName<'static>,
}

/// Why the backend leg could not be opened: the `why` of the passive failure it counts as.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectFail {
    #[error("connect: {0}")]
    Tcp(io::Error),
    #[error("connect timeout")]
    Timeout,
    #[error("{0}")]
    Tls(TlsFail),
    #[error("sending the buffered bytes: {0}")]
    Replay(io::Error),
}

/// Opens the backend leg by `deadline` (the rule's connect timeout, which bounds the TLS
/// handshake too) and sends it `replay`.
pub(crate) async fn connect(
    addr: SocketAddr,
    from: Option<IpAddr>,
    replay: &Replay<'_>,
    ka: &mqlb_config::TcpKeepalive,
    tls: Option<Upstream<'_>>,
    deadline: Instant,
) -> Result<ServerLeg, ConnectFail> {
    let plain =
        tokio::time::timeout_at(deadline, connect_and_replay(addr, from, &replay.clear, ka));
    let stream = match plain.await {
        Err(_) => return Err(ConnectFail::Timeout),
        Ok(Err(e)) => return Err(ConnectFail::Tcp(e)),
        Ok(Ok(s)) => s,
    };
    let Some(tls) = tls else {
        return Ok(ServerLeg::Plain(stream));
    };
    let sealed = async {
        let mut s = upstream::connect(tls.config, tls.name, stream)
            .await
            .map_err(ConnectFail::Tls)?;
        if !replay.sealed.is_empty() {
            s.write_all(replay.sealed)
                .await
                .map_err(ConnectFail::Replay)?;
            s.flush().await.map_err(ConnectFail::Replay)?;
        }
        Ok(s)
    };
    match tokio::time::timeout_at(deadline, sealed).await {
        Err(_) => Err(ConnectFail::Tls(TlsFail::Timeout)),
        Ok(r) => r.map(|s| ServerLeg::Tls(Box::new(s))),
    }
}

/// Opens the TCP connection and sends it the bytes read while inspecting.
///
/// The socket is made by hand rather than by `TcpStream::connect`: TCP_NODELAY is set on it
/// (MQTT packets are small and latency matters) and TCP keepalive (a backend host that
/// vanished is noticed on a quiet connection too) before connecting and, when there are bytes
/// to replay, the replay itself reports a refused or failed connect, which saves the `SO_ERROR`
/// query per connection.
pub(crate) async fn connect_and_replay(
    addr: SocketAddr,
    from: Option<IpAddr>,
    replay: &[u8],
    ka: &mqlb_config::TcpKeepalive,
) -> std::io::Result<TcpStream> {
    let socket = socket_from(addr, from)?;
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

/// A non-blocking TCP socket for `addr`, bound to the `from` address (`source`) when given.
///
/// A bound socket takes its port at the bind, one port per socket whatever its destination:
/// about 28 000 connections from one source in all. IP_BIND_ADDRESS_NO_PORT (Linux 4.2) leaves
/// the port to the connect, which shares ports across destinations as an unbound socket does
/// (HAProxy sets it for its `source` too).
pub(crate) fn socket_from(addr: SocketAddr, from: Option<IpAddr>) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    if let Some(ip) = from {
        #[cfg(target_os = "linux")]
        bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(ip, 0).into()).map_err(|e| {
            io::Error::new(e.kind(), format!("binding the source address {ip}: {e}"))
        })?;
    }
    Ok(socket)
}

/// IP_BIND_ADDRESS_NO_PORT on `socket` (neither socket2 nor rustix has it).
#[cfg(target_os = "linux")]
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is the open socket `socket` owns, and the value is a c_int whose
    // size is the length passed; setsockopt reads no more than that.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The backend leg: the socket, or TLS over it to a member of a `pool.tls` pool.
pub(crate) type ServerLeg = super::tls::MaybeTls<TlsClientStream<TcpStream>>;

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
        let s = connect_and_replay(addr, None, b"CONNECT", &ka)
            .await
            .unwrap();
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
        assert!(connect_and_replay(addr, None, b"CONNECT", &ka)
            .await
            .is_err());
        assert!(connect_and_replay(addr, None, b"", &ka).await.is_err());
    }

    /// With a `source`, the member sees that address (many connections from it, each to the
    /// same member, as the data path makes); one the host does not have is an error naming it.
    #[tokio::test]
    async fn the_source_address_is_the_one_the_member_sees() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let ka = mqlb_config::TcpKeepalive::default();
        let from: IpAddr = "127.0.0.77".parse().unwrap();
        let unconnected = socket_from(addr, Some(from)).unwrap();
        let bound = unconnected.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(
            bound,
            SocketAddr::new(from, 0),
            "the port is left to the connect"
        );
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(
                connect_and_replay(addr, Some(from), b"x", &ka)
                    .await
                    .unwrap(),
            );
            let (_a, peer) = l.accept().await.unwrap();
            assert_eq!(peer.ip(), from);
        }
        let absent: IpAddr = "192.0.2.1".parse().unwrap();
        let e = connect_and_replay(addr, Some(absent), b"x", &ka)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("binding the source address 192.0.2.1"),
            "{e}"
        );
    }
}
