//! The server side of a TLS connection mqlb terminates (an LB frontend, a broker's `mqtts`
//! listener), over rustls's unbuffered API, so an idle connection holds no buffer: only its
//! keys and handshake state (about 3.4 KiB).
//!
//! rustls's buffered connection (what tokio-rustls wraps) keeps a 4 KiB receive buffer for
//! its whole life once it has read, and most connections are idle devices: that buffer was more
//! than half of what an idle TLS connection cost. Here the received records, the records to send
//! and the decrypted bytes not taken yet each live in a buffer that exists only while it holds
//! something, the promise the LB's plain copy keeps too ("no buffer while idle").
//!
//! The stream is polled by the connection's one task, reads and writes alike; records rustls
//! queues on its own (session tickets, a TLS 1.3 key update's answer, alerts) are sent in order
//! with the application's.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The receive buffer's first size: one record of the largest size a peer may send (16 KiB of
/// plaintext and its overhead), so a read takes a whole record.
const RECORD: usize = 16 * 1024 + 2048 + 5;

/// The most the receive buffer grows to: a handshake message split over records is joined in
/// it (rustls accepts handshake messages up to 64 KiB: a long client certificate chain).
const MAX_INCOMING: usize = 64 * 1024 + 4 * RECORD;

/// Plaintext encrypted per write: four full records.
const MAX_WRITE: usize = 64 * 1024;

/// Bounds one processing pass: each step of rustls's state machine consumes a record, a queued
/// message or a state; more steps than this without needing I/O is a defect, not a peer.
const MAX_STEPS: usize = 1024;

/// What one processing pass of the received records left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Decrypted bytes wait in `plain`.
    Data,
    /// Nothing more can be done without more bytes from the peer.
    Read,
    /// Both sides sent close_notify: no more records either way.
    Closed,
}

/// A TLS server connection on a stream, a TCP socket (see the module doc).
pub struct TlsServerStream<S> {
    sock: S,
    conn: UnbufferedServerConnection,
    /// Received TLS bytes not yet processed (`..used`, a partial record); freed when empty.
    incoming: Vec<u8>,
    used: usize,
    /// Records waiting for the socket (`sent..`); freed once all are sent.
    outgoing: Vec<u8>,
    sent: usize,
    /// Decrypted bytes a read had no room for (`taken..`); freed once taken.
    plain: Vec<u8>,
    taken: usize,
    /// The peer's close_notify came, or its socket ended: reads end.
    eof: bool,
    /// The peer's socket ended without a close_notify.
    cut: bool,
    close_sent: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsServerStream<S> {
    /// A connection that has not shaken hands yet; `early` are its first bytes, read before.
    pub fn new(
        config: Arc<rustls::ServerConfig>,
        sock: S,
        early: &[u8],
    ) -> Result<Self, rustls::Error> {
        let mut incoming = Vec::new();
        if !early.is_empty() {
            incoming = vec![0; early.len().max(RECORD)];
            incoming[..early.len()].copy_from_slice(early);
        }
        Ok(TlsServerStream {
            sock,
            conn: UnbufferedServerConnection::new(config)?,
            incoming,
            used: early.len(),
            outgoing: Vec::new(),
            sent: 0,
            plain: Vec::new(),
            taken: 0,
            eof: false,
            cut: false,
            close_sent: false,
        })
    }

    /// The stream under the session.
    pub fn socket(&self) -> &S {
        &self.sock
    }

    /// The session's state: versions, the client's certificates, ALPN.
    pub fn session(&self) -> &rustls::CommonState {
        &self.conn
    }

    /// Drives the handshake until it is complete and what it sent is on the socket. On an error
    /// rustls has queued its alert, which is written if the socket takes it at once.
    pub fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Err(e) = self.process() {
                self.send_alert();
                return Poll::Ready(Err(tls_error(e)));
            }
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Processes the received records: decrypted data goes to `plain`, records rustls wants to
    /// send go to `outgoing`.
    fn process(&mut self) -> Result<Next, rustls::Error> {
        self.encrypt_then(None).map(|(next, _)| next)
    }

    /// [`Self::process`], then encrypts `data` (when given; empty: the close_notify) into
    /// `outgoing`: how many of its bytes were taken.
    fn encrypt_then(&mut self, data: Option<&[u8]>) -> Result<(Next, usize), rustls::Error> {
        let Self {
            conn,
            incoming,
            used,
            outgoing,
            plain,
            eof,
            ..
        } = self;
        for _ in 0..MAX_STEPS {
            let status = conn.process_tls_records(&mut incoming[..*used]);
            let mut discard = status.discard;
            let next = match status.state? {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record?;
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    append(outgoing, |buf| match encode.encode(buf) {
                        Ok(n) => Ok(Ok(n)),
                        Err(EncodeError::InsufficientSize(InsufficientSizeError {
                            required_size,
                        })) => Ok(Err(required_size)),
                        Err(e) => Err(rustls::Error::General(e.to_string())),
                    })?;
                    None
                }
                // The bytes are `outgoing`'s now, and go out before anything encoded later.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    *eof = true;
                    None
                }
                ConnectionState::Closed => Some((Next::Closed, 0)),
                ConnectionState::BlockedHandshake => Some((Next::Read, 0)),
                ConnectionState::WriteTraffic(mut write) => match data {
                    Some(data) if !data.is_empty() => {
                        let n = data.len().min(MAX_WRITE);
                        append(outgoing, |buf| match write.encrypt(&data[..n], buf) {
                            Ok(n) => Ok(Ok(n)),
                            Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => Ok(Err(required_size)),
                            Err(e) => Err(rustls::Error::General(e.to_string())),
                        })?;
                        Some((Next::Read, n))
                    }
                    // An empty `data`: the close_notify.
                    Some(_) => {
                        append(outgoing, |buf| match write.queue_close_notify(buf) {
                            Ok(n) => Ok(Ok(n)),
                            Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => Ok(Err(required_size)),
                            Err(e) => Err(rustls::Error::General(e.to_string())),
                        })?;
                        Some((Next::Read, 0))
                    }
                    None => Some((Next::Read, 0)),
                },
                // Early data is not enabled (`max_early_data_size` 0): none is accepted.
                _ => {
                    return Err(rustls::Error::General(
                        "unexpected TLS state (early data?)".into(),
                    ))
                }
            };
            incoming.copy_within(discard..*used, 0);
            *used -= discard;
            if *used == 0 {
                *incoming = Vec::new();
            }
            if let Some(done) = next {
                let next = if plain.is_empty() { done.0 } else { Next::Data };
                return Ok((next, done.1));
            }
            if !plain.is_empty() && data.is_none() {
                return Ok((Next::Data, 0));
            }
        }
        Err(rustls::Error::General(
            "the TLS state machine made no progress".into(),
        ))
    }

    /// The alert rustls queued with an error, written if the socket takes it now (the
    /// connection is closed after; nothing waits for it).
    fn send_alert(&mut self) {
        let status = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state {
            let mut alert = [0u8; 64];
            if let Ok(n) = encode.encode(&mut alert) {
                let mut now = Context::from_waker(std::task::Waker::noop());
                let _ = Pin::new(&mut self.sock).poll_write(&mut now, &alert[..n]);
            }
        }
    }

    /// Writes `outgoing` to the socket; ready when all of it is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.sock).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if !self.outgoing.is_empty() {
            (self.outgoing, self.sent) = (Vec::new(), 0);
        }
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has into `incoming` (allocated for it): how many bytes, 0 at its
    /// end. Pending with nothing received frees the buffer.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.used == self.incoming.len() {
            let size = (self.incoming.len() * 2).clamp(RECORD, MAX_INCOMING);
            if size <= self.used {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS record or handshake message too large",
                )));
            }
            self.incoming.resize(size, 0);
        }
        let mut rb = ReadBuf::new(&mut self.incoming[self.used..]);
        match Pin::new(&mut self.sock).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.used += n;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.used == 0 {
                    self.incoming = Vec::new();
                }
                Poll::Pending
            }
        }
    }

    /// Whether any buffer is held (none is while the connection is idle).
    #[cfg(test)]
    fn holds_buffers(&self) -> bool {
        self.incoming.capacity() + self.outgoing.capacity() + self.plain.capacity() > 0
    }
}

/// Appends to `out` what `encode` writes into the room it is given; it answers `Err(size)` when
/// it needs `size` bytes of room, and is then called once more with them.
fn append(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<Result<usize, usize>, rustls::Error>,
) -> Result<(), rustls::Error> {
    let start = out.len();
    let mut room = 512;
    for _ in 0..2 {
        out.resize(start + room, 0);
        match encode(&mut out[start..])? {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(size) => room = size,
        }
    }
    out.truncate(start);
    Err(rustls::Error::General(
        "TLS record did not fit the room it asked for".into(),
    ))
}

/// rustls's error as the I/O error tokio-rustls would give (what
/// [`crate::handshake::HandshakeFail::of`] reads).
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsServerStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            if me.taken < me.plain.len() {
                let n = buf.remaining().min(me.plain.len() - me.taken);
                buf.put_slice(&me.plain[me.taken..me.taken + n]);
                me.taken += n;
                if me.taken == me.plain.len() {
                    (me.plain, me.taken) = (Vec::new(), 0);
                }
                return Poll::Ready(Ok(()));
            }
            if me.eof {
                return Poll::Ready(if me.cut {
                    Err(io::ErrorKind::UnexpectedEof.into())
                } else {
                    Ok(())
                });
            }
            // Records rustls queued (a key update's answer) go out as the socket takes them;
            // a full socket has registered this task and does not hold up the read.
            if let Poll::Ready(Err(e)) = me.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            match me.process().map_err(tls_error)? {
                Next::Data => continue,
                Next::Closed => me.eof = true,
                Next::Read => {
                    if me.eof {
                        continue;
                    }
                    if ready!(me.poll_fill(cx))? == 0 {
                        (me.eof, me.cut) = (true, true);
                    }
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsServerStream<S> {
    /// Encrypts up to 64 KiB of `data` once the records of the last write are on the socket:
    /// at most one write's records wait in the stream.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        ready!(me.poll_send(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let (_, n) = me.encrypt_then(Some(data)).map_err(tls_error)?;
        if n == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS session is closed",
            )));
        }
        if let Poll::Ready(Err(e)) = me.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_send(cx))?;
        Pin::new(&mut me.sock).poll_flush(cx)
    }

    /// Sends a close_notify, then the FIN.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.close_sent {
            me.close_sent = true;
            me.encrypt_then(Some(&[])).map_err(tls_error)?;
        }
        ready!(me.poll_send(cx))?;
        Pin::new(&mut me.sock).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A server configuration for `localhost` and a client trusting it, speaking `version`.
    fn configs(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(signing_key.serialize_der()).expect("key");
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("server");
        server.ticketer = rustls::crypto::ring::Ticketer::new().expect("ticketer");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .expect("version")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A TLS client (tokio-rustls: rustls's buffered side) and this server, handshaken; the
    /// client's first bytes are `early` for the server (read before it, as past a PROXY
    /// header) when `split` is set.
    async fn pair(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (
        tokio_rustls::client::TlsStream<TcpStream>,
        TlsServerStream<TcpStream>,
    ) {
        let (server, client) = configs(version);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connector = tokio_rustls::TlsConnector::from(client);
        let dial = async {
            let sock = TcpStream::connect(addr).await.expect("connect");
            connector
                .connect("localhost".try_into().expect("name"), sock)
                .await
                .expect("client handshake")
        };
        let accept = async {
            let (sock, _) = listener.accept().await.expect("accept");
            // Its first bytes read before, as past a PROXY header.
            let mut first = [0u8; 7];
            let n = sock.peek(&mut first).await.expect("peek");
            let mut sock = sock;
            sock.read_exact(&mut first[..n]).await.expect("read");
            let mut s = TlsServerStream::new(server, sock, &first[..n]).expect("server");
            poll_fn(|cx| s.poll_handshake(cx))
                .await
                .expect("server handshake");
            s
        };
        tokio::join!(dial, accept)
    }

    /// Bytes that are not all alike, so a record misplaced shows.
    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn carries_a_megabyte_each_way_and_holds_nothing_when_idle() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut client, mut server) = pair(version).await;
            assert!(!server.holds_buffers(), "after the handshake");
            let up = pattern(1 << 20);
            let down: Vec<u8> = up.iter().rev().copied().collect();
            let (up2, down2) = (up.clone(), down.clone());
            let client_side = async move {
                let (mut r, mut w) = tokio::io::split(&mut client);
                let send = async {
                    // Uneven writes: records of every size.
                    for chunk in up2.chunks(12_345) {
                        w.write_all(chunk).await.expect("client write");
                    }
                    w.flush().await.expect("flush");
                };
                let recv = async {
                    let mut got = vec![0u8; down2.len()];
                    r.read_exact(&mut got).await.expect("client read");
                    assert!(got == down2, "what the server sent");
                };
                tokio::join!(send, recv);
                client
            };
            let server_side = async {
                let mut got = vec![0u8; up.len()];
                // Small reads: a record larger than the reader's room waits in `plain`.
                let mut at = 0;
                while at < got.len() {
                    let end = (at + 1000).min(got.len());
                    let n = server.read(&mut got[at..end]).await.expect("server read");
                    assert!(n > 0, "no early end");
                    at += n;
                }
                assert!(got == up, "what the client sent");
                server.write_all(&down).await.expect("server write");
                server.flush().await.expect("flush");
            };
            let (mut client, ()) = tokio::join!(client_side, server_side);
            // Idle again: a read that waits holds no buffer.
            let mut one = [0u8; 1];
            let waited =
                tokio::time::timeout(std::time::Duration::from_millis(50), server.read(&mut one))
                    .await;
            assert!(waited.is_err(), "nothing to read");
            assert!(!server.holds_buffers(), "idle after traffic ({version:?})");
            // A close_notify ends the server's reads cleanly, and its own reaches the client.
            client.shutdown().await.expect("client close");
            assert_eq!(server.read(&mut one).await.expect("clean end"), 0);
            server.shutdown().await.expect("server close");
            let mut rest = Vec::new();
            client
                .read_to_end(&mut rest)
                .await
                .expect("client sees the end");
            assert!(rest.is_empty());
        }
    }

    #[tokio::test]
    async fn a_peer_that_vanishes_without_close_notify_is_a_cut_end() {
        let (mut client, mut server) = pair(&rustls::version::TLS13).await;
        // One exchange, so the client has read the session tickets (unread bytes would make
        // its close a reset).
        let mut one = [0u8; 1];
        client.write_all(b"x").await.expect("write");
        server.read_exact(&mut one).await.expect("read");
        server.write_all(b"y").await.expect("write");
        client.read_exact(&mut one).await.expect("read");
        drop(client);
        let e = server.read(&mut one).await.expect_err("no close_notify");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn bytes_that_are_not_tls_fail_the_handshake_with_rustls_error() {
        let (server, _) = configs(&rustls::version::TLS13);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let (sock, _) = listener.accept().await.expect("accept");
        c.write_all(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c")
            .await
            .expect("write");
        let mut s = TlsServerStream::new(server, sock, &[]).expect("server");
        let e = poll_fn(|cx| s.poll_handshake(cx))
            .await
            .expect_err("not TLS");
        let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
        assert!(
            matches!(tls, Some(rustls::Error::InvalidMessage(_))),
            "{e:?}"
        );
    }
}
