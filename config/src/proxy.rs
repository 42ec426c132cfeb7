//! PROXY protocol headers (HAProxy's v1 text and v2 binary): the one an LB pool with
//! `send_proxy` writes to its backends before the replayed CONNECT (the client's address, the
//! frontend's, and on a TLS frontend the SSL TLV), the LOCAL one its probes send, and the
//! parse of one a trusted LB in front (`accept_proxy`, on a frontend or a broker) starts its
//! connections with. The codec is the `ppp` crate's; this module only decides what goes in and
//! what a parse means. Here, not in the LB, because the LB and the broker nodes both read them
//! ([`read`], the one I/O step, generic over the stream).

use std::io;
use std::net::SocketAddr;

use crate::model::ProxyVersion;
use ppp::v2::{self, Builder, Command, Protocol, Type, WriteToHeader, Writer};
use ppp::{v1, HeaderResult, PartialResult};

/// The most a received header may take, TLVs included. v1 is at most 107 bytes; a v2 header
/// from an LB carries a few TLVs (ALPN, authority, SSL, AWS's VPC endpoint) in well under a
/// kilobyte, and the protocol's own bound (64 KiB) is more than a connection should buffer.
pub const MAX_HEADER: usize = 4096;

/// The longest v1 line (the spec's 107 bytes, CRLF included).
const V1_MAX: usize = 107;

/// `PP2_CLIENT_SSL`: the client connected over SSL/TLS (the `client` field of the SSL TLV).
const PP2_CLIENT_SSL: u8 = 0x01;
/// `PP2_CLIENT_CERT_CONN`: it presented a certificate on this connection.
const PP2_CLIENT_CERT_CONN: u8 = 0x02;

/// What a terminated TLS session tells the backend (the v2 SSL TLV).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsFacts<'a> {
    /// As OpenSSL names it (`TLSv1.3`), which is what HAProxy sends and backends expect.
    pub version: &'a str,
    /// The verified client certificate's subject CN (`PP2_SUBTYPE_SSL_CN`). `None` until the
    /// frontend verifies client certificates (mTLS): then `verify` is 0 and the CN is sent.
    pub client_cn: Option<&'a str>,
}

/// OpenSSL's name of a TLS version, as the SSL TLV carries it.
pub fn tls_version_name(v: rustls::ProtocolVersion) -> &'static str {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        rustls::ProtocolVersion::TLSv1_1 => "TLSv1.1",
        rustls::ProtocolVersion::TLSv1_0 => "TLSv1",
        _ => "unknown",
    }
}

/// Both addresses in one family, as a header needs them: an IPv4 client on an IPv6 socket
/// (`::ffff:a.b.c.d`) is IPv4 again; a mix that is left (an IPv4 client of a frontend that
/// claims an IPv6 destination) is written as IPv6, the IPv4 side mapped.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (src, dst) = (canonical(src), canonical(dst));
    let mapped = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    };
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (mapped(src), mapped(dst))
    }
}

/// The header a backend of a `send_proxy` pool gets first: `src` the client (its socket's
/// address, or the one a trusted header claimed), `dst` the address it connected to.
pub fn encode(
    version: ProxyVersion,
    src: SocketAddr,
    dst: SocketAddr,
    tls: Option<TlsFacts<'_>>,
) -> io::Result<Vec<u8>> {
    let addrs = same_family(src, dst);
    match version {
        ProxyVersion::V1 => Ok(v1::Addresses::from(addrs).to_string().into_bytes()),
        ProxyVersion::V2 => {
            let b =
                Builder::with_addresses(v2::Version::Two | Command::Proxy, Protocol::Stream, addrs);
            match tls {
                None => b.build(),
                Some(t) => b.write_tlv(Type::SSL, &ssl_tlv(t)?)?.build(),
            }
        }
    }
}

/// The value of `PP2_TYPE_SSL`: `client` flags, `verify` (0 only for a verified client
/// certificate), then its sub-TLVs: the version and, with a verified certificate, its CN.
fn ssl_tlv(t: TlsFacts<'_>) -> io::Result<Vec<u8>> {
    let mut w = Writer::default();
    let (client, verify) = match t.client_cn {
        Some(_) => (PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, 0u32),
        None => (PP2_CLIENT_SSL, 1u32),
    };
    client.write_to(&mut w)?;
    verify.write_to(&mut w)?;
    (Type::SSLVersion, t.version.as_bytes()).write_to(&mut w)?;
    if let Some(cn) = t.client_cn {
        (Type::SSLCommonName, cn.as_bytes()).write_to(&mut w)?;
    }
    Ok(w.finish())
}

/// The header of a connection that carries no client (the LB's own probe): v2 LOCAL, or v1
/// `UNKNOWN`. The backend then keeps the socket's own address.
pub fn local(version: ProxyVersion) -> Vec<u8> {
    match version {
        ProxyVersion::V1 => v1::Addresses::Unknown.to_string().into_bytes(),
        ProxyVersion::V2 => {
            // Signature, version 2 LOCAL, family and protocol unspecified, no address bytes:
            // ppp's builder writes exactly these 16 bytes and cannot fail on them.
            Builder::new(
                v2::Version::Two | Command::Local,
                v2::AddressFamily::Unspecified | Protocol::Unspecified,
            )
            .build()
            .unwrap_or_else(|_| {
                let mut h = v2::PROTOCOL_PREFIX.to_vec();
                h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
                h
            })
        }
    }
}

/// A received header, complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Its length: the bytes after it are the client's.
    pub len: usize,
    /// The client and the address it connected to, as the LB in front saw them; `None` for a
    /// LOCAL command or an address the LB cannot route by (v1 UNKNOWN, v2 unspecified or a
    /// UNIX socket): the socket's own addresses stay.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// Why a trusted source's connection is refused before its first byte reaches a backend: the
/// `reason` label of `mqlb_proxy_header_errors_total`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// The first bytes start neither header (a client that bypassed the LB in front, or an LB
    /// not set to send one).
    #[error("no PROXY header from a source listed in accept_proxy")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLarge,
}

impl HeaderError {
    pub fn reason(&self) -> &'static str {
        match self {
            HeaderError::Missing => "missing",
            HeaderError::Malformed(_) => "malformed",
            HeaderError::TooLarge => "too_large",
        }
    }
}

/// Reads a v1 or v2 header at the start of `buf`: `Ok(None)` while it may still be one and is
/// not complete (more bytes are needed; 1-byte writes are fine). The first byte tells the
/// version (`\r` starts v2's signature, `P` v1's line).
pub fn parse(buf: &[u8]) -> Result<Option<Received>, HeaderError> {
    let starts = |prefix: &[u8]| {
        let n = buf.len().min(prefix.len());
        buf[..n] == prefix[..n]
    };
    let result: HeaderResult<'_> = if buf.is_empty() {
        return Ok(None);
    } else if starts(v2::PROTOCOL_PREFIX) {
        // A v2 header says its length after 16 bytes: refused then, not after buffering it.
        if buf.len() >= 16 && 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]])) > MAX_HEADER
        {
            return Err(HeaderError::TooLarge);
        }
        v2::Header::try_from(buf).into()
    } else if starts(v1::PROTOCOL_PREFIX.as_bytes()) {
        // A v1 line is whole at its line feed: before it, ppp can take a cut field for a bad
        // one (`... 51000 ` then an empty port).
        let line = &buf[..buf.len().min(V1_MAX)];
        if !line.contains(&b'\n') && line.len() < V1_MAX {
            return Ok(None);
        }
        v1::Header::try_from(buf).into()
    } else {
        return Err(HeaderError::Missing);
    };
    if result.is_incomplete() {
        return if buf.len() >= MAX_HEADER {
            Err(HeaderError::TooLarge)
        } else {
            Ok(None)
        };
    }
    let pair = |s: SocketAddr, d: SocketAddr| Some((s, d));
    match result {
        HeaderResult::V1(Ok(h)) => Ok(Some(Received {
            len: h.header.len(),
            addrs: match h.addresses {
                v1::Addresses::Tcp4(a) => pair(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                v1::Addresses::Tcp6(a) => pair(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                v1::Addresses::Unknown => None,
            },
        })),
        HeaderResult::V2(Ok(h)) => Ok(Some(Received {
            len: h.header.len(),
            addrs: match (h.command, h.addresses) {
                (Command::Local, _) => None,
                (Command::Proxy, v2::Addresses::IPv4(a)) => pair(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                (Command::Proxy, v2::Addresses::IPv6(a)) => pair(
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                (Command::Proxy, _) => None,
            },
        })),
        HeaderResult::V1(Err(e)) => Err(HeaderError::Malformed(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(HeaderError::Malformed(e.to_string())),
    }
}

/// Why a trusted source's connection was refused before its header was read: the `reason`
/// label of `mqlb_proxy_header_errors_total` (LB) and `mqlb_broker_proxy_header_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum HeaderFail {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("no complete PROXY header within the deadline")]
    Timeout,
    #[error("closed before its PROXY header was complete")]
    Eof,
    #[error("reading the PROXY header: {0}")]
    Io(std::io::Error),
}

impl HeaderFail {
    pub const REASONS: [&'static str; 6] = [
        "missing",
        "malformed",
        "too_large",
        "timeout",
        "eof",
        "io_error",
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            HeaderFail::Header(e) => e.reason(),
            HeaderFail::Timeout => "timeout",
            HeaderFail::Eof => "eof",
            HeaderFail::Io(_) => "io_error",
        }
    }
}

/// Reads a header from `client` by `deadline`; returns it and the bytes after it that came in
/// the same reads (the client's first: the TLS handshake's or the CONNECT's, handed on so
/// nothing is read twice or lost).
pub async fn read<S: tokio::io::AsyncRead + Unpin>(
    client: &mut S,
    deadline: tokio::time::Instant,
) -> Result<(Received, Vec<u8>), HeaderFail> {
    tokio::time::timeout_at(deadline, read_header(client))
        .await
        .unwrap_or(Err(HeaderFail::Timeout))
}

async fn read_header<S: tokio::io::AsyncRead + Unpin>(
    client: &mut S,
) -> Result<(Received, Vec<u8>), HeaderFail> {
    use tokio::io::AsyncReadExt;
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
        if let Some(h) = parse(&buf)? {
            let rest = buf.split_off(h.len);
            return Ok((h, rest));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn a_v2_header_carries_both_addresses_and_reads_back() {
        let (src, dst) = (a("198.51.100.7:40001"), a("127.0.0.1:1883"));
        let h = encode(ProxyVersion::V2, src, dst, None).expect("v2");
        assert_eq!(&h[..12], v2::PROTOCOL_PREFIX);
        assert_eq!(h[12], 0x21, "version 2, PROXY");
        assert_eq!(h[13], 0x11, "TCP over IPv4");
        assert_eq!(h.len(), 16 + 12);
        let mut with_data = h.clone();
        with_data.extend_from_slice(b"\x10\x0c");
        let got = parse(&with_data).expect("parses").expect("complete");
        assert_eq!(
            got.len,
            h.len(),
            "the client's bytes after it are not taken"
        );
        assert_eq!(got.addrs, Some((src, dst)));
    }

    #[test]
    fn a_v1_header_reads_back_and_ipv6_stays_ipv6() {
        let (src, dst) = (a("[2001:db8::7]:40001"), a("[::1]:1883"));
        let h = encode(ProxyVersion::V1, src, dst, None).expect("v1");
        assert_eq!(h, b"PROXY TCP6 2001:db8::7 ::1 40001 1883\r\n");
        let got = parse(&h).expect("parses").expect("complete");
        assert_eq!((got.len, got.addrs), (h.len(), Some((src, dst))));
        let h2 = encode(ProxyVersion::V2, src, dst, None).expect("v2");
        assert_eq!(h2[13], 0x21, "TCP over IPv6");
        assert_eq!(
            parse(&h2).expect("v2").and_then(|r| r.addrs),
            Some((src, dst))
        );
    }

    #[test]
    fn mixed_families_are_written_in_one() {
        let mapped = a("[::ffff:198.51.100.7]:40001");
        let h = encode(ProxyVersion::V1, mapped, a("127.0.0.1:1883"), None).expect("v1");
        assert_eq!(h, b"PROXY TCP4 198.51.100.7 127.0.0.1 40001 1883\r\n");
        let h = encode(
            ProxyVersion::V2,
            a("198.51.100.7:1"),
            a("[2001:db8::1]:2"),
            None,
        )
        .expect("v2");
        let got = parse(&h).expect("v2").and_then(|r| r.addrs);
        assert_eq!(
            got,
            Some((a("[::ffff:198.51.100.7]:1"), a("[2001:db8::1]:2")))
        );
    }

    #[test]
    fn a_tls_frontend_adds_the_ssl_tlv_with_its_version() {
        let tls = TlsFacts {
            version: "TLSv1.3",
            client_cn: None,
        };
        let h = encode(
            ProxyVersion::V2,
            a("10.1.2.3:5"),
            a("127.0.0.1:8883"),
            Some(tls),
        )
        .expect("v2");
        let header = v2::Header::try_from(h.as_slice()).expect("ppp reads it");
        let tlvs: Vec<_> = header.tlvs().collect::<Result<_, _>>().expect("tlvs");
        assert_eq!(tlvs.len(), 1);
        assert_eq!(tlvs[0].kind, Type::SSL as u8);
        let v = &tlvs[0].value;
        assert_eq!(v[0], PP2_CLIENT_SSL);
        assert_ne!(v[1..5], [0, 0, 0, 0], "no verified client certificate");
        let subs: Vec<_> = v2::TypeLengthValues::from(&v[5..])
            .collect::<Result<_, _>>()
            .expect("sub-TLVs");
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].kind, Type::SSLVersion as u8);
        assert_eq!(&*subs[0].value, b"TLSv1.3");

        // The mTLS hook: a verified CN is flagged, verified and sent.
        let h = encode(
            ProxyVersion::V2,
            a("10.1.2.3:5"),
            a("127.0.0.1:8883"),
            Some(TlsFacts {
                version: "TLSv1.2",
                client_cn: Some("sensor-7"),
            }),
        )
        .expect("v2");
        let header = v2::Header::try_from(h.as_slice()).expect("ppp reads it");
        let tlv = header.tlvs().next().expect("one").expect("valid");
        assert_eq!(tlv.value[0], PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN);
        assert_eq!(tlv.value[1..5], [0, 0, 0, 0]);
        let cn = v2::TypeLengthValues::from(&tlv.value[5..])
            .filter_map(Result::ok)
            .find(|t| t.kind == Type::SSLCommonName as u8)
            .expect("CN sub-TLV");
        assert_eq!(&*cn.value, b"sensor-7");
    }

    #[test]
    fn local_headers_keep_the_socket_address() {
        let h = local(ProxyVersion::V2);
        assert_eq!(h.len(), 16);
        assert_eq!(h[12], 0x20, "version 2, LOCAL");
        assert_eq!(
            parse(&h),
            Ok(Some(Received {
                len: 16,
                addrs: None
            }))
        );
        let h = local(ProxyVersion::V1);
        assert_eq!(h, b"PROXY UNKNOWN\r\n");
        assert_eq!(
            parse(&h),
            Ok(Some(Received {
                len: 15,
                addrs: None
            }))
        );
    }

    /// A header written a byte at a time is incomplete until its last byte, never an error.
    #[test]
    fn every_prefix_of_a_header_is_incomplete() {
        let (src, dst) = (a("203.0.113.9:51000"), a("127.0.0.1:1883"));
        let tls = Some(TlsFacts {
            version: "TLSv1.3",
            client_cn: None,
        });
        for h in [
            encode(ProxyVersion::V1, src, dst, None).expect("v1"),
            encode(ProxyVersion::V2, src, dst, tls).expect("v2"),
            encode(
                ProxyVersion::V1,
                a("[2001:db8::1]:65535"),
                a("[::1]:1"),
                None,
            )
            .expect("v1"),
            local(ProxyVersion::V1),
            local(ProxyVersion::V2),
        ] {
            for cut in 1..h.len() {
                assert_eq!(parse(&h[..cut]), Ok(None), "{:?} cut at {cut}", &h[..cut]);
            }
            assert_eq!(parse(&h).map(|r| r.map(|r| r.len)), Ok(Some(h.len())));
        }
    }

    #[test]
    fn what_is_not_a_header_is_told_apart_from_a_broken_one() {
        // An MQTT 3.1.1 CONNECT, empty client ID.
        let connect = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00";
        assert_eq!(parse(connect), Err(HeaderError::Missing));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HeaderError::Missing));
        assert_eq!(
            parse(b"\x16\x03\x01"),
            Err(HeaderError::Missing),
            "a ClientHello"
        );
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 80 99999\r\n"[..],
            b"PROXY TCP4 not.an.ip 5.6.7.8 80 443\r\n",
            b"PROXY SCTP 1.2.3.4 5.6.7.8 80 443\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\n",
        ] {
            assert_eq!(
                parse(bad).map_err(|e| e.reason()),
                Err("malformed"),
                "{bad:?}"
            );
        }
        // A v2 signature with version 3, and one with command 0xF.
        let mut v3 = v2::PROTOCOL_PREFIX.to_vec();
        v3.extend_from_slice(&[0x31, 0x11, 0, 0]);
        assert_eq!(parse(&v3).map_err(|e| e.reason()), Err("malformed"));
        let mut cmd = v2::PROTOCOL_PREFIX.to_vec();
        cmd.extend_from_slice(&[0x2f, 0x11, 0, 12]);
        assert_eq!(parse(&cmd).map_err(|e| e.reason()), Err("malformed"));
        // A v1 line that never ends, and a v2 header declaring 60 KiB of TLVs.
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(parse(&long).map_err(|e| e.reason()), Err("malformed"));
        let mut big = v2::PROTOCOL_PREFIX.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xf0, 0x00]);
        assert_eq!(parse(&big), Err(HeaderError::TooLarge));
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        /// Bytes after either signature (or none): never a panic, and a header never claims
        /// more bytes than it was given.
        fn input() -> impl Strategy<Value = Vec<u8>> {
            let tail = proptest::collection::vec(any::<u8>(), 0..300);
            (0..3u8, tail).prop_map(|(start, tail)| {
                let head: &[u8] = match start {
                    0 => v2::PROTOCOL_PREFIX,
                    1 => b"PROXY ",
                    _ => b"",
                };
                [head, tail.as_slice()].concat()
            })
        }

        proptest! {
            #[test]
            fn any_bytes_parse_without_panic(buf in input()) {
                if let Ok(Some(h)) = parse(&buf) {
                    prop_assert!(h.len <= buf.len());
                }
            }

            /// A v2 header with any TLVs and any bytes after it reads back whole.
            #[test]
            fn v2_headers_with_tlvs_read_back(
                src in any::<std::net::SocketAddrV4>(),
                dst in any::<std::net::SocketAddrV4>(),
                tlv in proptest::collection::vec(any::<u8>(), 0..200),
                after in proptest::collection::vec(any::<u8>(), 0..50),
            ) {
                let h = Builder::with_addresses(
                    v2::Version::Two | Command::Proxy,
                    Protocol::Stream,
                    (SocketAddr::V4(src), SocketAddr::V4(dst)),
                )
                .write_tlv(Type::NoOp, &tlv)
                .and_then(|b| b.build())
                .expect("small header");
                let all = [h.as_slice(), after.as_slice()].concat();
                let got = parse(&all).expect("valid").expect("complete");
                prop_assert_eq!(got.len, h.len());
                prop_assert_eq!(got.addrs, Some((SocketAddr::V4(src), SocketAddr::V4(dst))));
            }
        }
    }
}

#[cfg(test)]
mod read_tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::Instant;

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
