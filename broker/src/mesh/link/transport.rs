//! What a mesh link runs over: the TCP connection itself, or mutual TLS on it when
//! `[cluster] tls` is set (issue 15). Both ends of every link agree or the link is refused:
//! the accepting side looks at the peer's first byte before anything is answered, so a
//! plaintext peer at a TLS node, or a TLS peer at a plaintext node, is named in the log and
//! counted by its own reason instead of failing somewhere in a frame or a handshake.
//!
//! The mesh's own HELLO/AUTH handshake then runs inside, unchanged: the certificate says the
//! peer belongs to the CA's set, the HMAC over the cluster secret that it belongs to this
//! cluster (one CA often signs for more than one cluster).

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use mqlb_config::MeshTls;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::HandshakeError;
use crate::mesh::frame::{decode, Frame};

/// The first byte of a TLS record carrying a handshake message (a ClientHello). A mesh frame
/// starts with its 4-byte length, and one starting with this byte would be over 350 MB, far
/// beyond any handshake frame: the two never look alike.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What the peer's first bytes say it speaks.
#[derive(Debug, PartialEq, Eq)]
enum Speaks {
    Tls,
    /// Not TLS; the node id of its HELLO when the bytes read so far hold a whole one.
    Plain(Option<String>),
}

fn speaks(first: &[u8]) -> Speaks {
    if first.first() == Some(&TLS_HANDSHAKE_RECORD) {
        return Speaks::Tls;
    }
    let mut buf = BytesMut::from(first);
    match decode(&mut buf, 1024) {
        Ok(Some(Frame::Hello { node_id, .. })) => Speaks::Plain(Some(node_id)),
        _ => Speaks::Plain(None),
    }
}

/// A link's connection once its TLS (if any) is up.
pub(crate) enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

/// The read half of a link, for its reader; the write half goes to its writer.
pub(crate) type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

impl Transport {
    /// The accepting side: TLS when this node's links need it (the peer must present a
    /// certificate of the cluster's CA), after checking what the peer's first bytes speak.
    pub(crate) async fn accept(
        tls: Option<&MeshTls>,
        stream: TcpStream,
    ) -> Result<Transport, HandshakeError> {
        let mut first = [0u8; 512];
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Err(HandshakeError::Closed);
        }
        match (tls, speaks(&first[..n])) {
            (None, Speaks::Plain(_)) => Ok(Transport::Plain(stream)),
            (None, Speaks::Tls) => Err(HandshakeError::UnexpectedTls),
            (Some(_), Speaks::Plain(node)) => Err(HandshakeError::Plaintext(node)),
            (Some(t), Speaks::Tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(t.server.config().clone());
                let s = acceptor.accept(stream).await.map_err(HandshakeError::Tls)?;
                Ok(Transport::Tls(Box::new(s.into())))
            }
        }
    }

    /// The dialing side: TLS when this node's links need it, verifying the peer's certificate
    /// for `tls.server_name`, or else for `peer_ip`, the address dialed.
    pub(crate) async fn dial(
        tls: Option<&MeshTls>,
        stream: TcpStream,
        peer_ip: IpAddr,
    ) -> Result<Transport, HandshakeError> {
        let Some(t) = tls else {
            return Ok(Transport::Plain(stream));
        };
        let name = match &t.server_name {
            // Checked to be a DNS name at load; a name rustls refused here is named.
            Some(n) => ServerName::try_from(n.clone())
                .map_err(|e| HandshakeError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?,
            None => ServerName::IpAddress(peer_ip.into()),
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(t.client.config()));
        let s = connector
            .connect(name, stream)
            .await
            .map_err(HandshakeError::Tls)?;
        Ok(Transport::Tls(Box::new(s.into())))
    }

    /// The halves for a link's reader and writer. A plain link keeps TCP's own split (no lock
    /// between the two); a TLS session is one state, shared by both.
    pub(crate) fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Transport::Plain(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Transport::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// Whether a failed TLS handshake is about certificates (unknown CA, wrong name, none
/// presented, expired; ours refused by the peer) rather than the connection or the protocol.
pub(super) fn is_certificate(e: &io::Error) -> bool {
    use rustls::AlertDescription as A;
    let Some(e) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return false;
    };
    matches!(
        e,
        rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::AlertReceived(
                A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::CertificateRequired
                    | A::AccessDenied
            )
    )
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::frame::{encode, VERSION};

    /// The accepting side tells a ClientHello from a HELLO by its first byte, and names the
    /// node of a plaintext HELLO it has whole; bytes that are neither are plaintext too.
    #[test]
    fn the_first_bytes_tell_tls_from_a_plaintext_peer() {
        let hello = encode(&Frame::Hello {
            version: VERSION,
            node_id: "b2".into(),
            nonce: [7; 16],
        })
        .expect("encodes");
        assert_eq!(speaks(&hello), Speaks::Plain(Some("b2".into())));
        assert_eq!(speaks(&hello[..hello.len() - 1]), Speaks::Plain(None));
        // A TLS 1.2/1.3 ClientHello record: handshake (22), legacy version 3.1.
        assert_eq!(speaks(b"\x16\x03\x01\x02\x00\x01"), Speaks::Tls);
        assert_eq!(speaks(b"\x16"), Speaks::Tls);
        assert_eq!(speaks(b"GET / HTTP/1.1\r\n"), Speaks::Plain(None));
    }
}
