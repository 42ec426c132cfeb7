//! A TLS connection on a stream over rustls's unbuffered API, for both sides mqlb speaks: the
//! server side of what it terminates (an LB frontend, a broker's `mqtts` listener) and the
//! client side it opens to a `pool.tls` backend. An idle connection holds no buffer: only its
//! keys and handshake state (about 3.4 KiB).
//!
//! rustls's buffered connection (what tokio-rustls wraps) keeps a 4 KiB receive buffer for
//! its whole life once it has read, and most connections are idle devices: that buffer was more
//! than half of what an idle TLS connection cost. Here the received records, the records to send
//! and the decrypted bytes not taken yet each live in a buffer that exists only while it holds
//! something, the promise the LB's plain copy keeps too ("no buffer while idle").
//!
//! The state machine is written once, over [`Side`]: rustls gives the client and the server
//! the same states (`UnbufferedConnectionCommon<Data>`), the server's alone may offer early
//! data (refused here), and the client's first state is its ClientHello to encode and send.
//!
//! The stream is polled by the connection's one task, reads and writes alike; records rustls
//! queues on its own (session tickets, a TLS 1.3 key update's answer, alerts) are sent in order
//! with the application's.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
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

/// The side of a session: rustls's unbuffered client or server connection, whose
/// `process_tls_records` are two inherent methods of the same shape.
pub trait Side: Unpin {
    type Data;

    /// rustls's next state, given the received bytes not yet processed.
    fn process_tls_records<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;

    /// The session's state: versions, the peer's certificates, ALPN.
    fn common(&self) -> &rustls::CommonState;
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;

    fn process_tls_records<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        (**self).process_tls_records(incoming)
    }

    fn common(&self) -> &rustls::CommonState {
        self
    }
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;

    fn process_tls_records<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        (**self).process_tls_records(incoming)
    }

    fn common(&self) -> &rustls::CommonState {
        self
    }
}

/// The server side of a TLS connection mqlb terminates.
pub type TlsServerStream<S> = TlsStream<S, UnbufferedServerConnection>;

/// The client side of a TLS connection mqlb opens (to a `pool.tls` backend).
pub type TlsClientStream<S> = TlsStream<S, UnbufferedClientConnection>;

/// A TLS connection on a stream, a TCP socket (see the module doc), of either [`Side`].
pub struct TlsStream<S, C> {
    sock: S,
    conn: C,
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

impl<S> TlsServerStream<S> {
    /// A connection that has not shaken hands yet; `early` are its first bytes, read before.
    pub fn new(
        config: Arc<rustls::ServerConfig>,
        sock: S,
        early: &[u8],
    ) -> Result<Self, rustls::Error> {
        let conn = UnbufferedServerConnection::new(config)?;
        Ok(TlsStream::with(sock, conn, early))
    }
}

impl<S> TlsClientStream<S> {
    /// A connection to `name` (verified against the configuration's roots, sent as SNI when it
    /// is a DNS name) that has not shaken hands yet: its ClientHello goes out with the first
    /// [`TlsStream::poll_handshake`].
    pub fn new(
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
        sock: S,
    ) -> Result<Self, rustls::Error> {
        let conn = UnbufferedClientConnection::new(config, name)?;
        Ok(TlsStream::with(sock, conn, &[]))
    }
}

impl<S, C> TlsStream<S, C> {
    fn with(sock: S, conn: C, early: &[u8]) -> Self {
        let mut incoming = Vec::new();
        if !early.is_empty() {
            incoming = vec![0; early.len().max(RECORD)];
            incoming[..early.len()].copy_from_slice(early);
        }
        TlsStream {
            sock,
            conn,
            incoming,
            used: early.len(),
            outgoing: Vec::new(),
            sent: 0,
            plain: Vec::new(),
            taken: 0,
            eof: false,
            cut: false,
            close_sent: false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, C: Side> TlsStream<S, C> {
    /// The stream under the session.
    pub fn socket(&self) -> &S {
        &self.sock
    }

    /// The session's state: versions, the peer's certificates, ALPN.
    pub fn session(&self) -> &rustls::CommonState {
        self.conn.common()
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
            if !self.conn.common().is_handshaking() {
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
                // Early data is not enabled (a server's `max_early_data_size` 0, a client's
                // `enable_early_data` false): none is accepted, none is sent.
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

impl<S: AsyncRead + AsyncWrite + Unpin, C: Side> AsyncRead for TlsStream<S, C> {
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

impl<S: AsyncRead + AsyncWrite + Unpin, C: Side> AsyncWrite for TlsStream<S, C> {
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
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A server configuration for `localhost` and a client trusting it, speaking `version`.
    /// Each call's certificate is self-signed by a CA of its own name, so a client of one
    /// call does not know another's issuer.
    fn configs(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signing_key = rcgen::KeyPair::generate().expect("key pair");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("test CA {n}"));
        let cert = params.self_signed(&signing_key).expect("rcgen");
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

    fn localhost() -> ServerName<'static> {
        ServerName::try_from("localhost").expect("name")
    }

    async fn listen() -> (TcpListener, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        (listener, addr)
    }

    /// A TLS client (tokio-rustls: rustls's buffered side) and this server, handshaken; the
    /// client's first bytes are `early` for the server (read before it, as past a PROXY
    /// header).
    async fn server_pair(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (
        tokio_rustls::client::TlsStream<TcpStream>,
        TlsServerStream<TcpStream>,
    ) {
        let (server, client) = configs(version);
        let (listener, addr) = listen().await;
        let connector = tokio_rustls::TlsConnector::from(client);
        let dial = async {
            let sock = TcpStream::connect(addr).await.expect("connect");
            connector
                .connect(localhost(), sock)
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

    /// A TLS server (tokio-rustls) and this client, handshaken.
    async fn client_pair(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (
        tokio_rustls::server::TlsStream<TcpStream>,
        TlsClientStream<TcpStream>,
    ) {
        let (server, client) = configs(version);
        let (listener, addr) = listen().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let accept = async {
            let (sock, _) = listener.accept().await.expect("accept");
            acceptor.accept(sock).await.expect("server handshake")
        };
        let dial = async {
            let sock = TcpStream::connect(addr).await.expect("connect");
            let mut s = TlsClientStream::new(client, localhost(), sock).expect("client");
            poll_fn(|cx| s.poll_handshake(cx))
                .await
                .expect("client handshake");
            s
        };
        tokio::join!(accept, dial)
    }

    /// Bytes that are not all alike, so a record misplaced shows.
    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A megabyte each way between `ours` and `theirs` (rustls's buffered side, either side),
    /// then the close_notify both ways, the one of `ours_closes` side first. `ours` holds no
    /// buffer after its handshake, nor once idle again.
    async fn megabyte_each_way_then_close<C: Side>(
        mut ours: TlsStream<TcpStream, C>,
        mut theirs: impl AsyncRead + AsyncWrite + Unpin,
        ours_closes: bool,
    ) {
        assert!(!ours.holds_buffers(), "after the handshake");
        let up = pattern(1 << 20);
        let down: Vec<u8> = up.iter().rev().copied().collect();
        let (up2, down2) = (up.clone(), down.clone());
        let their_side = async move {
            let (mut r, mut w) = tokio::io::split(&mut theirs);
            let send = async {
                // Uneven writes: records of every size.
                for chunk in up2.chunks(12_345) {
                    w.write_all(chunk).await.expect("peer write");
                }
                w.flush().await.expect("flush");
            };
            let recv = async {
                let mut got = vec![0u8; down2.len()];
                r.read_exact(&mut got).await.expect("peer read");
                assert!(got == down2, "what this stream sent");
            };
            tokio::join!(send, recv);
            theirs
        };
        let our_side = async {
            let mut got = vec![0u8; up.len()];
            // Small reads: a record larger than the reader's room waits in `plain`.
            let mut at = 0;
            while at < got.len() {
                let end = (at + 1000).min(got.len());
                let n = ours.read(&mut got[at..end]).await.expect("read");
                assert!(n > 0, "no early end");
                at += n;
            }
            assert!(got == up, "what the peer sent");
            // One write of it all: encrypted 64 KiB at a time.
            ours.write_all(&down).await.expect("write");
            ours.flush().await.expect("flush");
        };
        let (mut theirs, ()) = tokio::join!(their_side, our_side);
        // Idle again: a read that waits holds no buffer.
        let mut one = [0u8; 1];
        let waited = tokio::time::timeout(Duration::from_millis(50), ours.read(&mut one)).await;
        assert!(waited.is_err(), "nothing to read");
        assert!(!ours.holds_buffers(), "idle after traffic");
        let mut rest = Vec::new();
        if ours_closes {
            ours.shutdown().await.expect("close");
            theirs
                .read_to_end(&mut rest)
                .await
                .expect("peer sees the end");
            assert!(rest.is_empty());
            theirs.shutdown().await.expect("peer close");
            assert_eq!(ours.read(&mut one).await.expect("clean end"), 0);
        } else {
            // A close_notify ends this stream's reads cleanly, and its own reaches the peer.
            theirs.shutdown().await.expect("peer close");
            assert_eq!(ours.read(&mut one).await.expect("clean end"), 0);
            ours.shutdown().await.expect("close");
            theirs
                .read_to_end(&mut rest)
                .await
                .expect("peer sees the end");
            assert!(rest.is_empty());
        }
    }

    /// The peer's writes of one byte each (a record each) all arrive, and leave no buffer.
    async fn one_byte_records<C: Side>(
        mut ours: TlsStream<TcpStream, C>,
        mut theirs: impl AsyncRead + AsyncWrite + Unpin,
    ) {
        let sent = pattern(300);
        let send = async {
            for b in &sent {
                theirs.write_all(&[*b]).await.expect("peer write");
                theirs.flush().await.expect("flush");
            }
        };
        let recv = async {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while got.len() < sent.len() {
                let n = ours.read(&mut buf).await.expect("read");
                assert!(n > 0, "no early end");
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got == sent, "what the peer sent");
        };
        tokio::join!(send, recv);
        assert!(!ours.holds_buffers(), "all taken");
    }

    #[tokio::test]
    async fn server_carries_a_megabyte_each_way_and_holds_nothing_when_idle() {
        for (version, ours_closes) in [
            (&rustls::version::TLS13, false),
            (&rustls::version::TLS12, true),
        ] {
            let (client, server) = server_pair(version).await;
            megabyte_each_way_then_close(server, client, ours_closes).await;
        }
    }

    #[tokio::test]
    async fn client_carries_a_megabyte_each_way_and_holds_nothing_when_idle() {
        for (version, ours_closes) in [
            (&rustls::version::TLS13, true),
            (&rustls::version::TLS12, false),
        ] {
            let (server, client) = client_pair(version).await;
            assert_eq!(
                client.session().protocol_version(),
                server.get_ref().1.protocol_version()
            );
            megabyte_each_way_then_close(client, server, ours_closes).await;
        }
    }

    #[tokio::test]
    async fn both_sides_read_a_peer_writing_a_byte_a_record() {
        let (client, server) = server_pair(&rustls::version::TLS13).await;
        one_byte_records(server, client).await;
        let (server, client) = client_pair(&rustls::version::TLS13).await;
        one_byte_records(client, server).await;
    }

    #[tokio::test]
    async fn a_peer_that_vanishes_without_close_notify_is_a_cut_end() {
        let (mut client, mut server) = server_pair(&rustls::version::TLS13).await;
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

    /// rustls's error inside an I/O error (what `HandshakeFail::of` and the LB's `TlsFail::of`
    /// read).
    fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    }

    #[tokio::test]
    async fn bytes_that_are_not_tls_fail_the_handshake_with_rustls_error() {
        let (server, _) = configs(&rustls::version::TLS13);
        let (listener, addr) = listen().await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let (sock, _) = listener.accept().await.expect("accept");
        c.write_all(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c")
            .await
            .expect("write");
        let mut s = TlsServerStream::new(server, sock, &[]).expect("server");
        let e = poll_fn(|cx| s.poll_handshake(cx))
            .await
            .expect_err("not TLS");
        assert!(
            matches!(rustls_error(&e), Some(rustls::Error::InvalidMessage(_))),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_server_of_another_ca_fails_the_client_handshake_and_hears_why() {
        let (_, client) = configs(&rustls::version::TLS13);
        let (stranger, _) = configs(&rustls::version::TLS13);
        let (listener, addr) = listen().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(stranger);
        let accept = async {
            let (sock, _) = listener.accept().await.expect("accept");
            acceptor.accept(sock).await.map(drop)
        };
        let dial = async {
            let sock = TcpStream::connect(addr).await.expect("connect");
            let mut s = TlsClientStream::new(client, localhost(), sock).expect("client");
            poll_fn(|cx| s.poll_handshake(cx)).await
        };
        let both = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(accept, dial)
        });
        let (heard, ours) = both.await.expect("no hang");
        let e = ours.expect_err("the certificate does not verify");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            matches!(
                rustls_error(&e),
                Some(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                ))
            ),
            "{e:?}"
        );
        // The alert rustls queued reached the server.
        let heard = heard.expect_err("the server hears an alert");
        assert!(
            matches!(
                rustls_error(&heard),
                Some(rustls::Error::AlertReceived(
                    rustls::AlertDescription::UnknownCA
                ))
            ),
            "{heard:?}"
        );
    }

    /// The client's handshake with a server that reads the ClientHello, answers `reply` and
    /// ends its side (a FIN: the socket is kept until the client is done, so no reset).
    async fn answering(reply: &'static [u8]) -> io::Result<()> {
        let (_, client) = configs(&rustls::version::TLS13);
        let (listener, addr) = listen().await;
        let serve = async {
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut header = [0u8; 5];
            sock.read_exact(&mut header).await.expect("hello");
            assert_eq!(header[0], 0x16, "a handshake record");
            let mut hello = vec![0u8; usize::from(u16::from_be_bytes([header[3], header[4]]))];
            sock.read_exact(&mut hello).await.expect("hello");
            sock.write_all(reply).await.expect("reply");
            sock.shutdown().await.expect("FIN");
            sock
        };
        let dial = async {
            let sock = TcpStream::connect(addr).await.expect("connect");
            let mut s = TlsClientStream::new(client, localhost(), sock).expect("client");
            poll_fn(|cx| s.poll_handshake(cx)).await
        };
        let both = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(serve, dial).1
        });
        both.await.expect("no hang")
    }

    #[tokio::test]
    async fn a_server_that_is_not_tls_fails_the_client_handshake() {
        let e = answering(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .expect_err("not TLS");
        assert!(
            matches!(rustls_error(&e), Some(rustls::Error::InvalidMessage(_))),
            "{e:?}"
        );
        // A CONNACK, a plain MQTT port.
        let e = answering(b"\x20\x02\x00\x00").await.expect_err("not TLS");
        assert!(
            matches!(rustls_error(&e), Some(rustls::Error::InvalidMessage(_))),
            "{e:?}"
        );
        // Nothing, then the close.
        let e = answering(b"").await.expect_err("closed");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e:?}");
    }
}
