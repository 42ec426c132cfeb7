//! TLS to PostgreSQL (issue 18): rustls (the workspace's, with ring) under tokio-postgres's
//! `TlsConnect`, over the socket the pool opened (bound to the HA server's address). A small
//! adapter of our own rather than another crate: tokio-postgres asks for a handshake over a
//! stream and a stream back, which tokio-rustls already is. The server's certificate is
//! verified against `haserver.db_ca` for the URL's host; no channel binding (SCRAM's `-PLUS`
//! is not offered, plain SCRAM and the others work).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

/// Connects with `config` to the server named `name`; `None`: no TLS (the store then asks
/// for none, so this is never called).
#[derive(Clone)]
pub struct Connector {
    pub config: Option<Arc<rustls::ClientConfig>>,
    pub name: ServerName<'static>,
}

/// A connection to PostgreSQL over TLS.
pub struct Stream(tokio_rustls::client::TlsStream<TcpStream>);

impl TlsConnect<TcpStream> for Connector {
    type Stream = Stream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send>>;

    fn connect(self, stream: TcpStream) -> Self::Future {
        Box::pin(async move {
            let config = self.config.ok_or_else(|| {
                io::Error::other("the server asked for TLS and no haserver.db_ca is set")
            })?;
            let s = tokio_rustls::TlsConnector::from(config)
                .connect(self.name, stream)
                .await?;
            Ok(Stream(s))
        })
    }
}

impl TlsStream for Stream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
