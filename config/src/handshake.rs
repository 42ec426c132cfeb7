//! The server side of a TLS handshake, shared by the LB's TLS frontends and the broker nodes'
//! TLS listeners: run on the connection's own task (never in an accept loop, so a slow or
//! stalled client holds up no other), bounded by a deadline, its failure told apart by reason
//! for the `..._tls_handshake_errors_total{reason}` counters. The server configuration comes
//! built ([`crate::tls::server`]), one per load, none per connection.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::tls_stream::TlsServerStream;

/// Why a handshake failed: the `reason` label of `mqlb_tls_handshake_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFail {
    /// The first bytes are not a TLS record (a plain MQTT CONNECT, garbage).
    #[error("not TLS: {0}")]
    NotTls(rustls::Error),
    /// No complete handshake within the rule's inspect timeout.
    #[error("no TLS handshake within the deadline (the LB's inspect timeout, a broker's handshake timeout)")]
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
    pub const REASONS: [&'static str; 6] =
        ["not_tls", "timeout", "alert", "protocol", "eof", "io_error"];

    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeFail::NotTls(_) => "not_tls",
            HandshakeFail::Timeout => "timeout",
            HandshakeFail::Alert(_) => "alert",
            HandshakeFail::Protocol(_) => "protocol",
            HandshakeFail::Eof => "eof",
            HandshakeFail::Io(_) => "io_error",
        }
    }

    /// What a failed accept's error was: rustls's own error wrapped in an `InvalidData` one (as
    /// tokio-rustls does too), a close mid-handshake as `UnexpectedEof`.
    pub fn of(e: io::Error) -> HandshakeFail {
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
/// when they were read already (past a PROXY header). On an error the alert rustls queued is
/// sent if the socket takes it at once; the socket is then dropped (closed).
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    server: &Arc<rustls::ServerConfig>,
    client: S,
    deadline: Instant,
    early: &[u8],
) -> Result<TlsServerStream<S>, HandshakeFail> {
    let mut stream = TlsServerStream::new(server.clone(), client, early)
        .map_err(|e| HandshakeFail::of(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    let handshake = std::future::poll_fn(|cx| stream.poll_handshake(cx));
    match tokio::time::timeout_at(deadline, handshake).await {
        Err(_) => Err(HandshakeFail::Timeout),
        Ok(Err(e)) => Err(HandshakeFail::of(e)),
        Ok(Ok(())) => Ok(stream),
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
