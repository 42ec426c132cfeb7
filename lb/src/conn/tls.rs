//! TLS termination on a frontend, the first step of its connections: the handshake runs on the
//! connection's own task (never in the accept loop, so a slow or stalled client holds up no
//! other), bounded by the deadline that also bounds reading the CONNECT (`inspect_timeout`).
//! What follows reads the decrypted stream exactly as a plain one: the CONNECT, the route, the
//! relay (through the copy's buffer: `splice` cannot move TLS records). The server
//! configuration comes built with the snapshot (`RuleRt::tls`), one per load, none per
//! connection; the session is a [`TlsServerStream`], which holds no buffer while idle. The
//! backend leg is plain, or TLS again on a `pool.tls` pool (`connect`).
//!
//! The LB's own data-path probe connects without TLS (the proxy knows it by its address before
//! any byte): it checks the route past the handshake, not the certificate.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

// The handshake and the session are shared with the broker nodes' TLS listeners.
pub(crate) use mqlb_config::handshake::{accept, HandshakeFail};
use mqlb_config::tls_stream::TlsServerStream;

/// A leg of a proxied connection: the socket, or TLS over it (boxed: the session's state is
/// large and only TLS connections pay for it).
pub(crate) enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// The client leg as the connect phase holds it: plain, or TLS terminated here.
pub(crate) type ClientLeg = MaybeTls<TlsServerStream<TcpStream>>;

impl ClientLeg {
    /// The TCP socket under it.
    pub(crate) fn socket(&self) -> &TcpStream {
        match self {
            ClientLeg::Plain(s) => s,
            ClientLeg::Tls(s) => s.socket(),
        }
    }

    /// The TLS version negotiated, when TLS is terminated here.
    pub(crate) fn tls_version(&self) -> Option<rustls::ProtocolVersion> {
        match self {
            ClientLeg::Plain(_) => None,
            ClientLeg::Tls(s) => s.session().protocol_version(),
        }
    }

    /// The subject CN of the client certificate the handshake verified (mTLS), if any.
    pub(crate) fn peer_cn(&self) -> Option<String> {
        match self {
            ClientLeg::Plain(_) => None,
            ClientLeg::Tls(s) => {
                let leaf = s.session().peer_certificates()?.first()?;
                mqlb_config::subject_cn(leaf)
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
