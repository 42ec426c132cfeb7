//! The first step of a connection from a source its frontend trusts (`accept_proxy`, another
//! LB in front): its PROXY header, read on the connection's own task by the deadline that also
//! bounds the TLS handshake and the CONNECT, before either. The address it carries becomes the
//! connection's client for everything after (routing, limits, the connection table, logs).
//! I/O only; the parse is [`crate::proxy_protocol`]'s.
//!
//! What the client sent past the header in the same read is handed on: to the TLS handshake,
//! or to the inspection of the CONNECT (and the replay), so nothing is read twice or lost.

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::proxy_protocol::{self, HeaderError, Received, MAX_HEADER};

/// Why a trusted source's connection was refused before its header was read: the `reason`
/// label of `mqlb_proxy_header_errors_total`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeaderFail {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("no complete PROXY header within the inspect timeout")]
    Timeout,
    #[error("closed before its PROXY header was complete")]
    Eof,
    #[error("reading the PROXY header: {0}")]
    Io(std::io::Error),
}

impl HeaderFail {
    pub(crate) const REASONS: [&'static str; 6] = [
        "missing",
        "malformed",
        "too_large",
        "timeout",
        "eof",
        "io_error",
    ];

    pub(crate) fn reason(&self) -> &'static str {
        match self {
            HeaderFail::Header(e) => e.reason(),
            HeaderFail::Timeout => "timeout",
            HeaderFail::Eof => "eof",
            HeaderFail::Io(_) => "io_error",
        }
    }
}

/// Reads the header by `deadline`; returns it and the bytes after it that came in the same
/// reads (the client's first).
pub(crate) async fn read(
    client: &mut TcpStream,
    deadline: Instant,
) -> Result<(Received, Vec<u8>), HeaderFail> {
    tokio::time::timeout_at(deadline, read_header(client))
        .await
        .unwrap_or(Err(HeaderFail::Timeout))
}

async fn read_header(client: &mut TcpStream) -> Result<(Received, Vec<u8>), HeaderFail> {
    // A v1 line fits in 107 bytes and a v2 header without TLVs in 28: most headers take one
    // read; a longer one grows the buffer up to MAX_HEADER.
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    loop {
        let room = (MAX_HEADER - buf.len()).min(chunk.len());
        let n = client
            .read(&mut chunk[..room])
            .await
            .map_err(HeaderFail::Io)?;
        if n == 0 {
            return Err(HeaderFail::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(h) = proxy_protocol::parse(&buf)? {
            let rest = buf.split_off(h.len);
            return Ok((h, rest));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// A header in 1-byte writes, then the client's bytes in the same stream: the header is
    /// read whole, and what came after it is handed on.
    #[tokio::test]
    async fn a_header_in_one_byte_writes_is_read_and_the_rest_kept() {
        let (mut c, mut s) = pair().await;
        let sent = b"PROXY TCP4 198.51.100.1 127.0.0.1 4000 1883\r\n";
        let writer = tokio::spawn(async move {
            for b in sent.iter() {
                c.write_all(&[*b]).await.expect("write");
                c.flush().await.expect("flush");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            c.write_all(b"\x10\x0c").await.expect("write");
            c
        });
        let (h, mut rest) = read(&mut s, soon()).await.expect("a header");
        assert_eq!(h.len, sent.len());
        assert_eq!(
            h.addrs.map(|(src, _)| src.to_string()),
            Some("198.51.100.1:4000".into())
        );
        let _c = writer.await.expect("writer");
        while rest.len() < 2 {
            let mut more = [0u8; 2];
            let n = s.read(&mut more).await.expect("read");
            rest.extend_from_slice(&more[..n]);
        }
        assert_eq!(rest, b"\x10\x0c");
    }

    #[tokio::test]
    async fn a_stalled_header_is_cut_at_the_deadline_and_a_close_is_eof() {
        let (mut c, mut s) = pair().await;
        c.write_all(b"PROXY TCP4 1.2").await.expect("write");
        let at = Instant::now() + Duration::from_millis(200);
        let fail = read(&mut s, at).await.expect_err("stalled");
        assert_eq!(fail.reason(), "timeout");
        assert!(Instant::now() >= at);
        drop(c);
        let fail = read(&mut s, soon()).await.expect_err("closed");
        assert_eq!(fail.reason(), "eof");
    }

    #[tokio::test]
    async fn no_header_and_a_bad_one_are_refused_at_once() {
        for (sent, reason) in [
            (&b"\x10\x0c\x00\x04MQTT"[..], "missing"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 99999\r\n", "malformed"),
        ] {
            let (mut c, mut s) = pair().await;
            c.write_all(sent).await.expect("write");
            let fail = read(&mut s, soon()).await.expect_err("refused");
            assert_eq!(fail.reason(), reason);
            assert!(HeaderFail::REASONS.contains(&fail.reason()));
        }
    }
}
