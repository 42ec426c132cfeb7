//! Test helpers shared by the frame families' tests: one table-driven check of what a peer
//! may send wrong, the byte-by-byte round trip, and the drivers of the arbitrary-input tests.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::sample::Index;

use super::{decode, encode, Frame, FrameError, MeshPublish};

/// A publish with every property set.
pub(super) fn full() -> MeshPublish {
    MeshPublish {
        topic: Bytes::from_static(b"site/1/temp"),
        payload: Bytes::from_static(b"21.5"),
        retain: true,
        qos: 2,
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01")),
        user_properties: vec![("a".into(), "1".into()), ("b".into(), "".into())],
        content_type: Some("text/plain".into()),
    }
}

/// A frame of `kind` with `body` after it, its length right.
pub(super) fn framed(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = BytesMut::new();
    f.put_u32(u32::try_from(1 + body.len()).expect("a test frame is small"));
    f.put_u8(kind);
    f.put_slice(body);
    f.to_vec()
}

/// Each input of the table (truncated, malformed, lying about its counts), decoded alone, is
/// refused with exactly the error beside it.
pub(super) fn assert_refused(cases: &[(&[u8], FrameError)]) {
    assert!(!cases.is_empty(), "an empty table checks nothing");
    for (bytes, want) in cases {
        assert_eq!(
            decode(&mut BytesMut::from(*bytes), 1 << 20),
            Err(want.clone()),
            "{bytes:?}"
        );
    }
}

/// Every truncation of the encoded frame `bytes` (its length made to match what is left) is
/// refused, never a panic.
pub(super) fn assert_truncations_refused(bytes: &[u8]) {
    for cut in 5..bytes.len() {
        let mut short = BytesMut::from(&bytes[..cut]);
        short[..4].copy_from_slice(&u32::try_from(cut - 4).unwrap_or(0).to_be_bytes());
        assert!(decode(&mut short, 1 << 20).is_err(), "cut at {cut}");
    }
}

/// `frames`, encoded one after the other and fed to the decoder one byte at a time, come out
/// exactly, in order, and nothing is left.
pub(super) fn assert_round_trip_byte_by_byte(frames: &[Frame]) {
    let mut wire = BytesMut::new();
    for f in frames {
        wire.extend_from_slice(&encode(f).expect("encodes"));
    }
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for byte in wire {
        buf.put_u8(byte);
        while let Some(f) = decode(&mut buf, 1 << 20).expect("valid") {
            got.push(f);
        }
    }
    assert_eq!(got, frames);
    assert!(buf.is_empty());
}

/// Decodes `buf` until it is refused or needs more: never a panic, never a frame that
/// consumed nothing.
pub(super) fn decode_all(mut buf: BytesMut, max: usize) {
    loop {
        let before = buf.len();
        match decode(&mut buf, max) {
            Ok(Some(_)) => assert!(buf.len() < before, "a frame consumed nothing"),
            Ok(None) => return,
            Err(_) => return,
        }
    }
}

/// `f` encoded, one byte (at `at`) set to `byte`, cut at `cut`, then decoded as
/// [`decode_all`] does.
pub(super) fn decode_damaged(f: &Frame, at: Index, byte: u8, cut: Index) {
    let mut wire = encode(f).expect("encodes").to_vec();
    let i = at.index(wire.len());
    wire[i] = byte;
    let keep = cut.index(wire.len() + 1);
    decode_all(BytesMut::from(&wire[..keep]), 1 << 20);
}
