//! TLS termination on a frontend, the first step of its connections: the handshake runs on the
//! connection's own task (never in the accept loop, so a slow or stalled client holds up no
//! other), bounded by the deadline that also bounds reading the CONNECT (`inspect_timeout`).
//! What follows reads the decrypted stream exactly as a plain one: the CONNECT, the route, the
//! relay (through the copy's buffer: `splice` cannot move TLS records). The server
//! configuration comes built with the snapshot (`RuleRt::tls`), one per load, none per
//! connection. The backend leg stays plain.
//!
//! The LB's own data-path probe connects without TLS (the proxy knows it by its address before
//! any byte): it checks the route past the handshake, not the certificate.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Why a handshake failed: the `reason` label of `mqlb_tls_handshake_errors_total`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeFail {
    /// The first bytes are not a TLS record (a plain MQTT CONNECT, garbage).
    #[error("not TLS: {0}")]
    NotTls(rustls::Error),
    /// No complete handshake within the rule's inspect timeout.
    #[error("no TLS handshake within the inspect timeout")]
    Timeout,
    /// The client ended it with an alert (e.g. it does not trust the certificate).
    #[error("client sent an alert: {0}")]
    Alert(rustls::Error),
    /// TLS, but not a handshake mqlb can complete (no common version, cipher or ALPN, a
    /// malformed message).
    #[error("handshake failed: {0}")]
    Protocol(rustls::Error),
    #[error("client closed during the TLS handshake")]
    Eof,
    #[error("TLS handshake: {0}")]
    Io(io::Error),
}

impl HandshakeFail {
    pub(crate) const REASONS: [&'static str; 6] =
        ["not_tls", "timeout", "alert", "protocol", "eof", "io_error"];

    pub(crate) fn reason(&self) -> &'static str {
        match self {
            HandshakeFail::NotTls(_) => "not_tls",
            HandshakeFail::Timeout => "timeout",
            HandshakeFail::Alert(_) => "alert",
            HandshakeFail::Protocol(_) => "protocol",
            HandshakeFail::Eof => "eof",
            HandshakeFail::Io(_) => "io_error",
        }
    }

    /// What a failed accept's error was: tokio-rustls wraps rustls's own error in an
    /// `InvalidData` one, and reports a close mid-handshake as `UnexpectedEof`.
    fn of(e: io::Error) -> HandshakeFail {
        use rustls::{Error, InvalidMessage};
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return HandshakeFail::Eof;
        }
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
            return HandshakeFail::Io(e);
        };
        match tls {
            Error::InvalidMessage(
                InvalidMessage::InvalidContentType | InvalidMessage::UnknownProtocolVersion,
            ) => HandshakeFail::NotTls(tls.clone()),
            Error::AlertReceived(_) => HandshakeFail::Alert(tls.clone()),
            _ => HandshakeFail::Protocol(tls.clone()),
        }
    }
}

/// Completes the server handshake on `client` by `deadline`, `early` being its first bytes
/// when they were read already (past a PROXY header). On an error rustls has queued its
/// alert, which the accept sends before it returns; the socket is then dropped (closed).
pub(crate) async fn accept(
    server: &Arc<rustls::ServerConfig>,
    client: TcpStream,
    deadline: Instant,
    early: &[u8],
) -> Result<TlsStream<TcpStream>, HandshakeFail> {
    let acceptor = TlsAcceptor::from(server.clone());
    let mut fed = Ok(());
    let accept = acceptor.accept_with(client, |conn| fed = feed(conn, early));
    // Bytes that are no handshake fail here, without waiting for more.
    fed.map_err(HandshakeFail::of)?;
    match tokio::time::timeout_at(deadline, accept).await {
        Err(_) => Err(HandshakeFail::Timeout),
        Ok(Err(e)) => Err(HandshakeFail::of(e)),
        Ok(Ok(s)) => Ok(s),
    }
}

/// Gives rustls bytes of the handshake read before it started, and processes them, so the
/// handshake goes on (answers) without waiting for the socket to have more.
fn feed(conn: &mut rustls::ServerConnection, mut early: &[u8]) -> io::Result<()> {
    while !early.is_empty() {
        if conn.read_tls(&mut early)? == 0 {
            break;
        }
        conn.process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    }
    Ok(())
}

/// The client leg as the connect phase holds it: plain, or TLS terminated here (boxed: the
/// session's state is large and only TLS connections pay for it).
pub(crate) enum ClientLeg {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientLeg {
    /// The TCP socket under it.
    pub(crate) fn socket(&self) -> &TcpStream {
        match self {
            ClientLeg::Plain(s) => s,
            ClientLeg::Tls(s) => s.get_ref().0,
        }
    }

    /// The TLS version negotiated, when TLS is terminated here.
    pub(crate) fn tls_version(&self) -> Option<rustls::ProtocolVersion> {
        match self {
            ClientLeg::Plain(_) => None,
            ClientLeg::Tls(s) => s.get_ref().1.protocol_version(),
        }
    }

    /// The subject CN of the client certificate the handshake verified (mTLS), if any.
    pub(crate) fn peer_cn(&self) -> Option<String> {
        match self {
            ClientLeg::Plain(_) => None,
            ClientLeg::Tls(s) => {
                let leaf = s.get_ref().1.peer_certificates()?.first()?;
                mqlb_config::subject_cn(leaf)
            }
        }
    }
}

impl AsyncRead for ClientLeg {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientLeg::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientLeg::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientLeg {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientLeg::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientLeg::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientLeg::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientLeg::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientLeg::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientLeg::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{AlertDescription, Error, InvalidMessage};

    fn wrapped(e: Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn failures_are_told_apart_by_what_rustls_saw() {
        let cases = [
            (
                wrapped(Error::InvalidMessage(InvalidMessage::InvalidContentType)),
                "not_tls",
            ),
            (
                wrapped(Error::InvalidMessage(
                    InvalidMessage::UnknownProtocolVersion,
                )),
                "not_tls",
            ),
            (
                wrapped(Error::AlertReceived(AlertDescription::UnknownCA)),
                "alert",
            ),
            (wrapped(Error::NoApplicationProtocol), "protocol"),
            (
                wrapped(Error::InvalidMessage(InvalidMessage::MessageTooShort)),
                "protocol",
            ),
            (
                io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof"),
                "eof",
            ),
            (io::Error::from(io::ErrorKind::ConnectionReset), "io_error"),
        ];
        for (e, reason) in cases {
            let what = e.to_string();
            let fail = HandshakeFail::of(e);
            assert_eq!(fail.reason(), reason, "{what}");
            assert!(HandshakeFail::REASONS.contains(&fail.reason()));
        }
    }
}
