//! TLS to a backend (`pool.tls`): the client handshake every connection to a member of such a
//! pool makes, and its probes `tls` and `mqtts`, and why one failed. A bottom module: the
//! connection path (`conn::connect`) and the probe loop (`health::probe`) both use it, so the
//! member is verified the same way by both.
//!
//! The rustls client configuration is built at config load (`mqlb_config::PoolTls`: the CA
//! files are read there) and shared through the snapshot; a handshake costs no file read. The
//! session is a [`TlsClientStream`] (rustls's unbuffered API, as the frontends' sessions), so
//! an idle connection to a TLS pool holds no buffer on its backend leg either.

use std::io;
use std::sync::Arc;

use mqlb_config::tls_stream::TlsClientStream;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

/// Why the handshake with a member failed: the `reason` label of
/// `mqlb_backend_tls_handshake_errors_total`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsFail {
    /// The member's certificate did not verify: another CA, not valid for the name (or
    /// address) it was checked against, expired.
    #[error("the member's certificate did not verify: {0}")]
    Certificate(rustls::Error),
    /// The member ended it with an alert (it refused the LB's client certificate, or has no
    /// protocol, version or cipher in common with it).
    #[error("the member sent an alert: {0}")]
    Alert(rustls::Error),
    /// The member answered, but not with a TLS handshake the LB can complete (a plaintext
    /// port, a malformed message).
    #[error("TLS handshake: {0}")]
    Protocol(rustls::Error),
    #[error("no TLS handshake within the connect timeout")]
    Timeout,
    #[error("the member closed during the TLS handshake")]
    Eof,
    #[error("TLS handshake: {0}")]
    Io(io::Error),
}

impl TlsFail {
    pub(crate) const REASONS: [&'static str; 6] = [
        "certificate",
        "alert",
        "protocol",
        "timeout",
        "eof",
        "io_error",
    ];

    pub(crate) fn reason(&self) -> &'static str {
        match self {
            TlsFail::Certificate(_) => "certificate",
            TlsFail::Alert(_) => "alert",
            TlsFail::Protocol(_) => "protocol",
            TlsFail::Timeout => "timeout",
            TlsFail::Eof => "eof",
            TlsFail::Io(_) => "io_error",
        }
    }

    /// What a failed connect's error was: the session wraps rustls's own error in an
    /// `InvalidData` one (as tokio-rustls does), and reports a close mid-handshake as
    /// `UnexpectedEof`.
    pub(crate) fn of(e: io::Error) -> TlsFail {
        use rustls::Error;
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return TlsFail::Eof;
        }
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
            return TlsFail::Io(e);
        };
        match tls {
            Error::InvalidCertificate(_) => TlsFail::Certificate(tls.clone()),
            Error::AlertReceived(_) => TlsFail::Alert(tls.clone()),
            _ => TlsFail::Protocol(tls.clone()),
        }
    }
}

/// The client handshake with a member over `io` (connected, and past any PROXY header, which
/// goes in clear before it), verifying its certificate for `name` (sent as SNI when it is a
/// DNS name). Unbounded: the caller bounds it (the rule's connect timeout, the probe's).
pub(crate) async fn connect<IO: AsyncRead + AsyncWrite + Unpin>(
    config: &Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    io: IO,
) -> Result<TlsClientStream<IO>, TlsFail> {
    let mut session = TlsClientStream::new(config.clone(), name, io)
        .map_err(|e| TlsFail::of(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    std::future::poll_fn(|cx| session.poll_handshake(cx))
        .await
        .map_err(TlsFail::of)?;
    Ok(session)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{AlertDescription, CertificateError, Error, InvalidMessage};

    fn wrapped(e: Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn failures_are_told_apart_by_what_rustls_saw() {
        let cases = [
            (
                wrapped(Error::InvalidCertificate(CertificateError::UnknownIssuer)),
                "certificate",
            ),
            (
                wrapped(Error::InvalidCertificate(CertificateError::NotValidForName)),
                "certificate",
            ),
            (
                wrapped(Error::AlertReceived(AlertDescription::CertificateRequired)),
                "alert",
            ),
            (
                wrapped(Error::InvalidMessage(InvalidMessage::InvalidContentType)),
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
            let fail = TlsFail::of(e);
            assert_eq!(fail.reason(), reason, "{what}");
            assert!(TlsFail::REASONS.contains(&fail.reason()));
        }
        assert!(TlsFail::REASONS.contains(&TlsFail::Timeout.reason()));
    }
}
