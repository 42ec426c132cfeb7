//! The first steps of every client connection on the node's MQTT listeners (issue 15), run by
//! rumqttd on the connection's own task before MQTT (`rumqttd::Accept`, a patch): from a source
//! in `accept_proxy` (the LBs in front) a PROXY v1/v2 header, whose address is then the
//! client's; then, on `mqtts` / `mqtts_v5`, the TLS handshake with the node's certificate.
//! Both are bounded together by `handshake_timeout`; a failure closes the socket and is counted
//! by reason, never reaching rumqttd. The header's read and parse and the handshake are
//! [`mqlb_config::proxy`]'s and [`mqlb_config::handshake`]'s, the LB's own.
//!
//! A source not in `accept_proxy` has no header read; one whose first byte starts a header
//! anyway (`P` of v1, `\r` of v2's signature, neither the first byte of an MQTT CONNECT nor of
//! a TLS record) is refused as `untrusted` rather than handed to the MQTT decoder.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mqlb_config::handshake::{self, HandshakeFail};
use mqlb_config::proxy::{self, HeaderFail};
use prometheus::{IntCounterVec, Opts, Registry};
use rumqttd::N;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The `reason` a header from a source not in `accept_proxy` is counted under.
const UNTRUSTED: &str = "untrusted";

/// `mqlb_broker_proxy_header_errors_total` and `mqlb_broker_tls_handshake_errors_total`.
#[derive(Clone)]
pub(crate) struct FrontMetrics {
    proxy_errors: IntCounterVec,
    tls_errors: IntCounterVec,
}

impl FrontMetrics {
    /// Registers both in `registry`, every label of each listener the node has at 0.
    pub(crate) fn register(
        registry: &Registry,
        listeners: &[&'static str],
    ) -> prometheus::Result<FrontMetrics> {
        let m = FrontMetrics {
            proxy_errors: IntCounterVec::new(
                Opts::new(
                    "mqlb_broker_proxy_header_errors_total",
                    "Connections refused before MQTT for their PROXY header, by listener and reason: missing, malformed, too_large, timeout, eof, io_error (from a source in broker.accept_proxy), untrusted (a header from any other source).",
                ),
                &["listener", "reason"],
            )?,
            tls_errors: IntCounterVec::new(
                Opts::new(
                    "mqlb_broker_tls_handshake_errors_total",
                    "TLS handshakes that failed on the node's mqtts / mqtts_v5 listeners, by listener and reason: not_tls, timeout (broker.handshake_timeout), alert (e.g. the client does not trust the certificate), protocol (no common version or ALPN, a client certificate refused), eof, io_error.",
                ),
                &["listener", "reason"],
            )?,
        };
        registry.register(Box::new(m.proxy_errors.clone()))?;
        registry.register(Box::new(m.tls_errors.clone()))?;
        for l in listeners {
            for r in HeaderFail::REASONS.iter().chain([&UNTRUSTED]) {
                m.proxy_errors.with_label_values(&[l, r]);
            }
            if l.starts_with("mqtts") {
                for r in HandshakeFail::REASONS {
                    m.tls_errors.with_label_values(&[l, r]);
                }
            }
        }
        Ok(m)
    }
}

/// One listener's first steps (the `rumqttd::Accept` of its server).
pub(crate) struct Front {
    pub(crate) node: String,
    /// `mqtt`, `mqtt_v5`, `mqtts`, `mqtts_v5`: the config key, and the metrics' label.
    pub(crate) listener: &'static str,
    /// The TLS server configuration (`mqtts*`), built at load by `config::tls`; swapped by a
    /// reload (each handshake takes the one current at its start).
    pub(crate) tls: Option<Arc<arc_swap::ArcSwap<rustls::ServerConfig>>>,
    pub(crate) accept_proxy: Vec<ipnet::IpNet>,
    pub(crate) timeout: Duration,
    pub(crate) metrics: FrontMetrics,
}

impl rumqttd::Accept for Front {
    fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Option<(Box<dyn N>, SocketAddr)>> + Send + '_>> {
        Box::pin(self.first_steps(stream, peer))
    }
}

impl Front {
    async fn first_steps(
        &self,
        mut stream: TcpStream,
        socket: SocketAddr,
    ) -> Option<(Box<dyn N>, SocketAddr)> {
        let deadline = Instant::now() + self.timeout;
        let (client, early) = if mqlb_config::trusts_proxy(&self.accept_proxy, socket.ip()) {
            match proxy::read(&mut stream, deadline).await {
                // LOCAL (the LB's own probe) or no IP address: the socket's stays.
                Ok((header, early)) => (header.addrs.map_or(socket, |(src, _)| src), early),
                Err(e) => {
                    self.proxy_refused(socket, e.reason(), &e);
                    return None;
                }
            }
        } else {
            if self.starts_a_header(&stream, deadline).await {
                self.proxy_refused(
                    socket,
                    UNTRUSTED,
                    &"a PROXY header from a source not in accept_proxy",
                );
                return None;
            }
            (socket, Vec::new())
        };
        let Some(tls) = &self.tls else {
            return Some((Box::new(Rewind::new(early, stream)), client));
        };
        match handshake::accept(&tls.load_full(), stream, deadline, &early).await {
            Ok(s) => Some((Box::new(s), client)),
            Err(e) => {
                self.metrics
                    .tls_errors
                    .with_label_values(&[self.listener, e.reason()])
                    .inc();
                tracing::debug!(node = self.node, listener = self.listener, peer = %client, %socket, error = %e, "TLS handshake failed");
                None
            }
        }
    }

    /// Whether the first byte (waited for until `deadline`) starts a PROXY header. A client
    /// that sends nothing by then is left to the TLS handshake's or rumqttd's own timeout.
    async fn starts_a_header(&self, stream: &TcpStream, deadline: Instant) -> bool {
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
            Ok(Ok(1)) => first[0] == b'P' || first[0] == b'\r',
            _ => false,
        }
    }

    fn proxy_refused(&self, socket: SocketAddr, reason: &str, why: &dyn std::fmt::Display) {
        self.metrics
            .proxy_errors
            .with_label_values(&[self.listener, reason])
            .inc();
        tracing::info!(node = self.node, listener = self.listener, peer = %socket, reason, "connection refused: {why}");
    }
}

/// A plain stream whose first bytes were read already (past a PROXY header): they are read
/// again first, then the socket.
struct Rewind {
    early: Vec<u8>,
    at: usize,
    inner: TcpStream,
}

impl Rewind {
    fn new(early: Vec<u8>, inner: TcpStream) -> Rewind {
        Rewind {
            early,
            at: 0,
            inner,
        }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.at < me.early.len() {
            let n = buf.remaining().min(me.early.len() - me.at);
            buf.put_slice(&me.early[me.at..me.at + n]);
            me.at += n;
            if me.at == me.early.len() {
                me.early = Vec::new();
                me.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What came after the header in the same read is read first, then the socket's bytes.
    #[tokio::test]
    async fn rewind_reads_the_early_bytes_first() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (mut c, s) = (c.expect("connect"), s.expect("accept").0);
        c.write_all(b"cd").await.expect("write");
        let mut r = Rewind::new(b"ab".to_vec(), s);
        let mut got = [0u8; 4];
        let mut n = 0;
        while n < 4 {
            n += r.read(&mut got[n..]).await.expect("read");
        }
        assert_eq!(&got, b"abcd");
    }
}
