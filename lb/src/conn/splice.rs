//! Zero-copy relay for bulk streams on Linux: `splice(2)` moves a socket's received pages into
//! a pipe and from the pipe into the other socket, so the payload never crosses into user
//! space. Pipes are pooled per thread and taken only while a bulk stream has bytes in flight,
//! so idle connections hold no descriptors beyond their two sockets. The system calls go
//! through `rustix`, which gives them safe, typed signatures (no `unsafe` here).

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::pipe::{fcntl_setpipe_size, pipe_with, PipeFlags, SpliceFlags};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe capacity asked for: room for a burst of socket pages per splice. The kernel may give
/// less (`/proc/sys/fs/pipe-max-size`); the default 64 KiB works too, only with more calls.
const PIPE_SIZE: usize = 1 << 20;
/// Empty pipes kept per thread; beyond this they are closed.
const KEEP: usize = 16;

thread_local! {
    static FREE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A non-blocking pipe and how many bytes it holds.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// At most PIPE_SIZE.
    pending: u32,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // A larger pipe is an optimisation only; its failure (a lowered limit) is not an error.
        if let Err(e) = fcntl_setpipe_size(&write, PIPE_SIZE) {
            tracing::debug!(error = %e, "pipe size not raised");
        }
        Ok(Pipe {
            read,
            write,
            pending: 0,
        })
    }

    /// An empty pipe from this thread's pool, or a new one; `None` when none can be made
    /// (out of descriptors): the caller copies through its buffer instead.
    pub(crate) fn take() -> Option<Pipe> {
        if let Some(p) = FREE.with(|f| f.borrow_mut().pop()) {
            return Some(p);
        }
        match Pipe::new() {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::debug!(error = %e, "no pipe for splice; copying through a buffer");
                None
            }
        }
    }

    /// Returns an empty pipe to the pool.
    pub(crate) fn give(self) {
        debug_assert_eq!(self.pending, 0);
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(self);
            }
        });
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending as usize
    }

    /// Moves what `from` has received, at most `max` bytes, into the (empty) pipe. `Ok(0)` is
    /// EOF; `WouldBlock` clears the socket's readiness, like a read would.
    pub(crate) fn fill(&mut self, from: &TcpStream, max: usize) -> io::Result<usize> {
        debug_assert_eq!(self.pending, 0);
        let len = PIPE_SIZE.min(max);
        let n = from.try_io(Interest::READABLE, || splice(from, &self.write, len))?;
        // splice moves at most the `len` asked for, PIPE_SIZE
        self.pending = n as u32;
        Ok(n)
    }

    /// Moves bytes from the pipe into `to`; returns how many.
    pub(crate) fn drain(&mut self, to: &TcpStream) -> io::Result<usize> {
        let n = to.try_io(Interest::WRITABLE, || {
            splice(&self.read, to, self.pending as usize)
        })?;
        self.pending -= n as u32;
        Ok(n)
    }
}

/// No offsets: they must be `None` for sockets and pipes.
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    Ok(rustix::pipe::splice(from, None, to, None, len, flags)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes spliced through a pipe between two loopback connections arrive intact.
    #[tokio::test]
    async fn splices_between_sockets() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut a_out = TcpStream::connect(addr).await.unwrap();
        let (a_in, _) = l.accept().await.unwrap();
        let b_out = TcpStream::connect(addr).await.unwrap();
        let (mut b_in, _) = l.accept().await.unwrap();

        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a_out.write_all(&sent).await.unwrap();
            a_out.shutdown().await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b_in.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut pipe = Pipe::take().unwrap();
        loop {
            a_in.readable().await.unwrap();
            match pipe.fill(&a_in, usize::MAX) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
            while pipe.pending() > 0 {
                b_out.writable().await.unwrap();
                match pipe.drain(&b_out) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
        drop(b_out);
        writer.await.unwrap();
        assert_eq!(reader.await.unwrap(), data);
        pipe.give();
    }
}
