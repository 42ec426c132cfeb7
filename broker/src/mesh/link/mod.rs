//! The links between nodes, the mesh's I/O: each node keeps one outbound link to every peer
//! (`outbound.rs`, this node's frames) and accepts one inbound link from each (`inbound.rs`,
//! theirs); both start with the handshake here, over the link's [`transport`] (TCP, or TLS
//! with `[cluster] tls`), and the kernel finds a vanished peer.

mod inbound;
mod outbound;
mod transport;

pub(crate) use inbound::serve_inbound;
pub(crate) use outbound::outbound;

use std::time::Duration;

use bytes::BytesMut;
use mqlb_config::Secret;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::mesh::frame::{decode, encode, Frame, FrameError, VERSION};
use crate::mesh::{auth, Mesh};

/// Time allowed for a link's handshake (TLS's and the mesh's together).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a link handshake failed; `label` is the `reason` of `mqlb_mesh_rejected_total`.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("peer closed the link during the handshake")]
    Closed,
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
    #[error("peer speaks mesh version {0}, this node {VERSION}")]
    Version(u8),
    #[error("expected {0}, got {1}")]
    Unexpected(&'static str, &'static str),
    #[error("peer {0:?} failed authentication (wrong cluster secret?)")]
    Auth(String),
    #[error("peer claims this node's own id {0:?}")]
    SelfLink(String),
    #[error("peer{} sent plaintext, but this node's mesh links need TLS (cluster.tls)", .0.as_ref().map(|n| format!(" {n:?}")).unwrap_or_default())]
    Plaintext(Option<String>),
    #[error("peer speaks TLS, but this node's mesh links are plaintext (no cluster.tls)")]
    UnexpectedTls,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

impl HandshakeError {
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeError::Io(_) | HandshakeError::Closed => "io",
            HandshakeError::Frame(e) => e.label(),
            HandshakeError::Timeout(_) => "timeout",
            HandshakeError::Version(_) => "version",
            HandshakeError::Unexpected(..) => "protocol",
            HandshakeError::Auth(_) => "auth",
            HandshakeError::SelfLink(_) => "self",
            HandshakeError::Plaintext(_) => "plaintext",
            HandshakeError::UnexpectedTls => "unexpected_tls",
            HandshakeError::Tls(e) if transport::is_certificate(e) => "certificate",
            HandshakeError::Tls(_) => "tls",
        }
    }

    /// A refusal about TLS: one side's configuration, not a peer that is down, so it is
    /// logged as a warning and counted on the dialing side too.
    pub fn is_tls(&self) -> bool {
        matches!(
            self,
            HandshakeError::Plaintext(_) | HandshakeError::UnexpectedTls | HandshakeError::Tls(_)
        )
    }
}

async fn read_frame(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Frame>, HandshakeError> {
    loop {
        if let Some(f) = decode(buf, max)? {
            return Ok(Some(f));
        }
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(HandshakeError::Closed)
            };
        }
    }
}

/// The symmetric handshake: HELLO both ways, then AUTH both ways. Returns the peer's id.
async fn handshake(
    mesh: &Mesh,
    secret: &Secret,
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    buf: &mut BytesMut,
) -> Result<String, HandshakeError> {
    let own_nonce = auth::nonce();
    stream
        .write_all(&encode(&Frame::Hello {
            version: VERSION,
            node_id: mesh.id.clone(),
            nonce: own_nonce,
        })?)
        .await?;
    // Handshake frames are small; a peer announcing a big one is not a peer.
    let (peer, peer_nonce) = match read_frame(stream, buf, 1024).await? {
        Some(Frame::Hello { version, .. }) if version != VERSION => {
            return Err(HandshakeError::Version(version))
        }
        Some(Frame::Hello { node_id, nonce, .. }) => (node_id, nonce),
        Some(_) => return Err(HandshakeError::Unexpected("HELLO", "another frame")),
        None => return Err(HandshakeError::Closed),
    };
    if peer == mesh.id {
        return Err(HandshakeError::SelfLink(peer));
    }
    stream
        .write_all(&encode(&Frame::Auth {
            mac: auth::mac(secret.expose(), &peer_nonce, &mesh.id),
        })?)
        .await?;
    match read_frame(stream, buf, 1024).await? {
        Some(Frame::Auth { mac }) if auth::verify(secret.expose(), &own_nonce, &peer, &mac) => {
            Ok(peer)
        }
        Some(Frame::Auth { .. }) => Err(HandshakeError::Auth(peer)),
        Some(_) => Err(HandshakeError::Unexpected("AUTH", "another frame")),
        None => Err(HandshakeError::Closed),
    }
}

/// A link whose peer vanished without a word (a partition, a host that lost power) is found
/// dead by the kernel within about this long: keepalive probes every second on an idle link,
/// and `TCP_USER_TIMEOUT` on data the peer does not acknowledge. Without it such a link stayed
/// "up" for the kernel's retransmission timeout (about 15 minutes), and the wills, the session
/// asks and the membership waited on it. (A paused peer's kernel still acknowledges: the PUBACK
/// gate's bound and the session ask's timeout cover that case.)
const LINK_DEAD_AFTER: Duration = Duration::from_secs(3);

fn watch_liveness(s: &TcpStream) -> std::io::Result<()> {
    let s = socket2::SockRef::from(s);
    let probes = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(1))
        .with_interval(Duration::from_secs(1))
        .with_retries(2);
    s.set_tcp_keepalive(&probes)?;
    s.set_tcp_user_timeout(Some(LINK_DEAD_AFTER))
}
