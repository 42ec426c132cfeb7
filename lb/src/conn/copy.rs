//! The bidirectional copy of a proxied connection, written as plain readiness polling instead
//! of nested futures: most connections are idle MQTT sessions and this state is all they hold,
//! so it is kept small and holds no buffer while idle.
//!
//! Small messages go through a per-thread pool of 64 KiB buffers (read, then write). A
//! direction that fills a whole buffer in one read is a bulk stream; on Linux it switches to
//! `splice(2)` through a pooled pipe, so the payload moves socket → pipe → socket as page
//! references and is never copied through user space (what HAProxy does with `option
//! splice-auto`, which is off there by default; here it is always on).
//!
//! A client leg whose TLS mqlb terminates, or a backend leg it speaks TLS on (`pool.tls`)
//! ([`Leg`] with `RAW = false`), always goes through the buffer: the bytes on its socket are
//! records, not the stream, so neither readiness of the socket nor `splice` can stand for its
//! reads and writes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Copy buffer per direction, held only while data flows (idle connections hold none), so it
/// can be large: 64 KiB moved bulk data ~1.3x faster than 16 KiB (lb-bench).
const COPY_BUF: usize = 64 * 1024;

/// Who failed when a copy ends with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    Client,
    Backend,
}

/// Which side failed in one direction of the copy.
enum Side {
    Reader,
    Writer,
}

impl Side {
    /// The peer that failed, for a direction reading `reader` and writing `writer`.
    fn of(self, reader: Peer, writer: Peer) -> Peer {
        match self {
            Side::Reader => reader,
            Side::Writer => writer,
        }
    }
}

/// Copy buffers not in use, per worker thread: a busy connection reuses them without an
/// allocation per packet.
mod pool {
    use std::cell::RefCell;

    /// Buffers kept per thread; beyond this they are freed.
    const KEEP: usize = 64;

    thread_local! {
        static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn take(size: usize) -> Box<[u8]> {
        FREE.with(|f| f.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; size].into_boxed_slice())
    }

    pub(super) fn give(buf: Box<[u8]>) {
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(buf);
            }
        });
    }
}

/// One side of a copy: the client's socket or the backend's, plain or TLS (terminated here,
/// or spoken to the backend).
pub(crate) trait Leg: AsyncRead + AsyncWrite + Unpin {
    /// The stream's bytes are the socket's bytes (no TLS): the socket's readiness tells when a
    /// read can make progress, and `splice` may move them.
    const RAW: bool;

    /// The TCP socket under the stream (socket options, readiness, `splice`).
    fn tcp(&self) -> &TcpStream;

    /// Passes on the end of this direction: a FIN (TLS: a close_notify first, then the FIN).
    fn poll_half_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Leg for TcpStream {
    const RAW: bool = true;

    fn tcp(&self) -> &TcpStream {
        self
    }

    fn poll_half_close(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(SockRef::from(&*self).shutdown(std::net::Shutdown::Write))
    }
}

/// A TLS leg: a client's TLS terminated here, or TLS this LB speaks to a member of a
/// `pool.tls` pool. Boxed: the TLS session's state (keys, handshake state) is large, and the
/// task of every connection, plain ones too, is as large as its largest variant.
impl<C: mqlb_config::tls_stream::Side> Leg
    for Box<mqlb_config::tls_stream::TlsStream<TcpStream, C>>
{
    const RAW: bool = false;

    fn tcp(&self) -> &TcpStream {
        self.socket()
    }

    fn poll_half_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut **self).poll_shutdown(cx)
    }
}

use super::frames::Framer;
#[cfg(target_os = "linux")]
use super::splice::Pipe;

/// Stand-in where there is no `splice(2)`: a bulk stream keeps using the buffer.
#[cfg(not(target_os = "linux"))]
struct Pipe;

#[cfg(not(target_os = "linux"))]
impl Pipe {
    fn take() -> Option<Pipe> {
        None
    }
    fn give(self) {}
    fn pending(&self) -> usize {
        0
    }
    fn fill(&mut self, _: &TcpStream, _: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    fn drain(&mut self, _: &TcpStream) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Where one direction is: copying, passing its end on (a TLS close_notify may take more than
/// one poll), or over.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Running,
    Closing,
    Done,
}

/// One direction of a connection: a buffer (or, for a bulk stream, a pipe) only while bytes
/// are in flight. 40 bytes: every idle connection holds two.
#[derive(Default)]
pub(crate) struct Dir {
    buf: Option<Box<[u8]>>,
    pos: u32,
    len: u32,
    pipe: Option<Pipe>,
    /// A read filled the whole buffer: this direction carries a bulk stream.
    bulk: bool,
    state: State,
    /// Stopping at a packet boundary (an evacuation): the last bytes, the DISCONNECT, are
    /// in the buffer; once they are written this direction is done.
    stopping: bool,
    /// Written to a non-raw leg (TLS) and not flushed yet: records may still wait in its
    /// session's buffer.
    unflushed: bool,
}

impl Dir {
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Gives back what an idle direction does not need: the buffer, and the pipe if empty (a
    /// pipe still holding bytes is closed with the connection, never pooled).
    pub(crate) fn release(&mut self) {
        if let Some(b) = self.buf.take() {
            pool::give(b);
        }
        if self.pipe.as_ref().is_some_and(|p| p.pending() == 0) {
            if let Some(p) = self.pipe.take() {
                p.give();
            }
        }
    }

    /// Moves bytes `from` → `to` until EOF (then half-closes `to`, unless the other direction
    /// is done too and closing will say it) or until neither side is ready.
    ///
    /// With `frames`, the packet boundaries of what passes are followed; with `stop` too, the
    /// direction ends at the next boundary, after writing `stop` (an evacuation's DISCONNECT)
    /// there: it reads no byte past the boundary, so no packet is cut or lost.
    ///
    /// Reads and writes go through tokio's `poll_read`/`poll_write`, which take a short read
    /// (or write) as proof the socket is drained (full): no extra call that would only return
    /// EAGAIN, as `try_read` needs.
    #[allow(clippy::too_many_arguments)]
    fn poll<F: Leg, T: Leg>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut F,
        to: &mut T,
        other_done: bool,
        counter: &AtomicU64,
        mut frames: Option<&mut Framer>,
        stop: Option<&[u8]>,
    ) -> Poll<Result<(), (Side, io::Error)>> {
        use io::ErrorKind::WouldBlock;
        loop {
            match self.state {
                State::Done => return Poll::Ready(Ok(())),
                State::Closing => return self.close(cx, to, other_done),
                State::Running => {}
            }
            // 1. Flush what is in flight: the buffer first, then the pipe.
            if let Some(buf) = self.buf.as_ref().filter(|_| self.pos < self.len) {
                let chunk = &buf[self.pos as usize..self.len as usize];
                match Pin::new(&mut *to).poll_write(cx, chunk) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((Side::Writer, e))),
                    Poll::Ready(Ok(n)) => {
                        // n <= len - pos < COPY_BUF
                        self.pos += n as u32;
                        self.unflushed = !T::RAW;
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                continue;
            }
            if self.unflushed {
                match Pin::new(&mut *to).poll_flush(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((Side::Writer, e))),
                    Poll::Ready(Ok(())) => self.unflushed = false,
                }
            }
            if let Some(pipe) = self.pipe.as_mut().filter(|p| p.pending() > 0) {
                let to = to.tcp();
                match to.poll_write_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((Side::Writer, e))),
                    Poll::Ready(Ok(())) => {}
                }
                match pipe.drain(to) {
                    Ok(n) => {
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == WouldBlock => {}
                    Err(e) => return Poll::Ready(Err((Side::Writer, e))),
                }
                continue;
            }
            // 2. Nothing in flight. Stopping: at a packet boundary, the last bytes go out, then
            // the direction is done (the FIN follows them).
            if let (Some(last), Some(f)) = (stop, frames.as_deref()) {
                if self.stopping {
                    return self.close(cx, to, other_done);
                }
                if f.at_boundary() {
                    let buf = self.buf.get_or_insert_with(|| pool::take(COPY_BUF));
                    let n = last.len().min(buf.len());
                    buf[..n].copy_from_slice(&last[..n]);
                    // n <= COPY_BUF
                    (self.pos, self.len) = (0, n as u32);
                    self.stopping = true;
                    continue;
                }
            }
            // 3. Wait for the next bytes holding nothing (a TLS leg's socket readiness says
            // nothing of its stream: its read below waits, and the buffer goes back if it must).
            if F::RAW {
                match from.tcp().poll_read_ready(cx) {
                    Poll::Pending => {
                        self.release();
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((Side::Reader, e))),
                    Poll::Ready(Ok(())) => {}
                }
            }
            if self.bulk && self.pipe.is_none() && F::RAW && T::RAW {
                self.pipe = Pipe::take();
            }
            // Followed packets: a splice moves body bytes only (headers are read to be seen),
            // and while stopping no read goes past the next boundary.
            let (splice_max, read_max) = match frames.as_deref() {
                None => (usize::MAX, usize::MAX),
                Some(f) if stop.is_some() => (f.splice_limit().min(f.read_limit()), f.read_limit()),
                Some(f) => (f.splice_limit(), usize::MAX),
            };
            let read = match self.pipe.as_mut().filter(|_| splice_max > 0) {
                Some(pipe) => {
                    if let Some(b) = self.buf.take() {
                        pool::give(b);
                    }
                    match pipe.fill(from.tcp(), splice_max) {
                        Ok(n) => {
                            if let Some(f) = frames.as_deref_mut() {
                                f.skip(n);
                            }
                            Poll::Ready(Ok(n))
                        }
                        Err(e) if e.kind() == WouldBlock => Poll::Pending,
                        Err(e) => Poll::Ready(Err(e)),
                    }
                }
                None => {
                    let buf = self.buf.get_or_insert_with(|| pool::take(COPY_BUF));
                    let max = buf.len().min(read_max);
                    let mut rb = ReadBuf::new(&mut buf[..max]);
                    let r = Pin::new(&mut *from).poll_read(cx, &mut rb);
                    let n = rb.filled().len();
                    if let Poll::Ready(Ok(())) = r {
                        if let Some(f) = frames.as_deref_mut() {
                            f.feed(&buf[..n]);
                        }
                        // n <= COPY_BUF
                        (self.pos, self.len) = (0, n as u32);
                        self.bulk |= n == buf.len();
                    }
                    r.map_ok(|()| n)
                }
            };
            match read {
                Poll::Ready(Ok(0)) => return self.close(cx, to, other_done),
                // A TLS client that closed without a close_notify: MQTT is framed (its
                // DISCONNECT came first, or the broker sees a cut session either way), so this
                // is the end of its stream, not a failure.
                Poll::Ready(Err(e)) if !F::RAW && e.kind() == io::ErrorKind::UnexpectedEof => {
                    return self.close(cx, to, other_done)
                }
                Poll::Ready(Ok(_)) => {}
                // Drained (readiness cleared): loop to register for the next bytes. A TLS
                // read that is pending has registered already.
                Poll::Pending if F::RAW => self.release(),
                Poll::Pending => {
                    self.release();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err((Side::Reader, e))),
            }
        }
    }

    /// Ends this direction: passes the end on to `to` (a half-close) and keeps the other
    /// direction running. When the other is done too, the close that follows sends the FIN of a
    /// plain socket; a TLS leg still gets its close_notify, which a client that is gone may
    /// not take (not an error then: the connection is over).
    fn close<T: Leg>(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut T,
        other_done: bool,
    ) -> Poll<Result<(), (Side, io::Error)>> {
        self.release();
        if other_done && T::RAW {
            self.state = State::Done;
            return Poll::Ready(Ok(()));
        }
        self.state = State::Closing;
        let r = std::task::ready!(to.poll_half_close(cx));
        self.state = State::Done;
        match r {
            Err(e) if other_done => {
                tracing::debug!(error = %e, "close_notify not sent; the connection is over");
                Poll::Ready(Ok(()))
            }
            r => Poll::Ready(r.map_err(|e| (Side::Writer, e))),
        }
    }
}

/// Both directions of a proxied connection; done when both saw EOF, failed when either failed
/// (the error names which peer).
pub(crate) struct Bidi<C: Leg, S: Leg> {
    pub client: C,
    pub server: S,
    pub up: Dir,
    pub down: Dir,
    /// The packet boundaries of the server → client stream (`frames`), so that an evacuation
    /// can end it between two packets.
    pub down_frames: Framer,
}

impl<C: Leg, S: Leg> Bidi<C, S> {
    /// Copies what is ready; `bytes_in` (client → backend) and `bytes_out` count what moved.
    /// With `stop`, the server → client direction ends at its next packet boundary after
    /// writing `stop` there (the client → server one goes on until the client closes).
    pub(crate) fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        bytes_in: &AtomicU64,
        bytes_out: &AtomicU64,
        stop: Option<&[u8]>,
    ) -> Poll<Result<(), (Peer, io::Error)>> {
        let me = self;
        let down_done = me.down.is_done();
        if let Poll::Ready(Err((side, e))) = me.up.poll(
            cx,
            &mut me.client,
            &mut me.server,
            down_done,
            bytes_in,
            None,
            None,
        ) {
            return Poll::Ready(Err((side.of(Peer::Client, Peer::Backend), e)));
        }
        let up_done = me.up.is_done();
        if let Poll::Ready(Err((side, e))) = me.down.poll(
            cx,
            &mut me.server,
            &mut me.client,
            up_done,
            bytes_out,
            Some(&mut me.down_frames),
            stop,
        ) {
            return Poll::Ready(Err((side.of(Peer::Backend, Peer::Client), e)));
        }
        if me.up.is_done() && me.down.is_done() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

impl<C: Leg, S: Leg> Drop for Bidi<C, S> {
    fn drop(&mut self) {
        self.up.release();
        self.down.release();
    }
}

#[cfg(all(test, target_os = "linux", target_pointer_width = "64"))]
mod tests {
    /// What every idle connection holds twice (the module's promise; TLS added no byte to it).
    #[test]
    fn a_direction_is_40_bytes() {
        assert_eq!(std::mem::size_of::<super::Dir>(), 40);
    }
}
