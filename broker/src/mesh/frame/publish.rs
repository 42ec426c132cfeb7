//! PUBLISH, a message as it travels between nodes (its expiry interval rewritten in place as
//! it waits in a queue), and its acknowledged delivery: SEQUENCED numbers a PUBLISH, ACK
//! says what the receiver's router accepted (see `mesh::reliable`).
//!
//! ```text
//! PUBLISH := flags:u8 (bit 0 retain, bits 1-2 QoS) topic_len:u16 topic props_len:u32 props payload
//! props   := (tag:u8 value)*                   v5 properties worth carrying
//! SEQUENCED := epoch:u64 seq:u64 frame        a numbered frame (a whole PUBLISH frame inside)
//! ACK     := epoch:u64 seq:u64                 receiver to sender: all up to seq accepted
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{
    encode, frame, get_bytes16, get_string16, need, put_str16, Frame, FrameError, KIND_PUBLISH,
    KIND_SEQUENCED,
};

/// The bytes of a SEQUENCED frame before the frame it numbers.
pub const SEQUENCED_HEADER: usize = 4 + 1 + 8 + 8;

const TAG_PAYLOAD_FORMAT: u8 = 1;
const TAG_EXPIRY: u8 = 2;
const TAG_RESPONSE_TOPIC: u8 = 3;
const TAG_CORRELATION: u8 = 4;
const TAG_USER_PROPERTY: u8 = 5;
const TAG_CONTENT_TYPE: u8 = 6;

/// A publish as it travels between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshPublish {
    pub topic: Bytes,
    pub payload: Bytes,
    pub retain: bool,
    /// The QoS it was published with (0, 1 or 2): the receiving node delivers at the minimum
    /// of it and each subscription's (MQTT-3.8.4-8). A node of an older mesh format sends 0 in
    /// these bits and ignores them, so the links of mixed versions still work.
    pub qos: u8,
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
}

/// The header that makes the already encoded frame of `inner_len` bytes that follows it frame
/// `seq` of stream `epoch` (the hot path: the frame's bytes are shared by all peers, the
/// number is each peer's own).
pub fn sequenced_header(
    epoch: u64,
    seq: u64,
    inner_len: usize,
) -> Result<[u8; SEQUENCED_HEADER], FrameError> {
    let len = u32::try_from(inner_len + SEQUENCED_HEADER - 4)
        .map_err(|_| FrameError::Malformed("frame over 4 GiB"))?;
    let mut h = [0u8; SEQUENCED_HEADER];
    h[..4].copy_from_slice(&len.to_be_bytes());
    h[4] = KIND_SEQUENCED;
    h[5..13].copy_from_slice(&epoch.to_be_bytes());
    h[13..].copy_from_slice(&seq.to_be_bytes());
    Ok(h)
}

/// Encodes a PUBLISH frame (the hot path: once per local publish, shared by all peers).
pub fn encode_publish(p: &MeshPublish) -> Result<Bytes, FrameError> {
    encode_publish_expiry_at(p).map(|(b, _)| b)
}

/// Encodes a PUBLISH frame and says where in it the message expiry interval's 4 bytes are, if
/// it has one, so a sender can count down the time the frame waited ([`with_expiry`]).
pub fn encode_publish_expiry_at(p: &MeshPublish) -> Result<(Bytes, Option<usize>), FrameError> {
    if p.qos > 2 {
        return Err(FrameError::Malformed("publish qos"));
    }
    let mut expiry_at = None;
    let bytes = frame(KIND_PUBLISH, |o| {
        o.put_u8(u8::from(p.retain) | (p.qos << 1));
        put_str16(o, &p.topic)?;
        let mut props = BytesMut::new();
        if let Some(v) = p.payload_format_indicator {
            props.put_u8(TAG_PAYLOAD_FORMAT);
            props.put_u8(v);
        }
        if let Some(v) = p.message_expiry_interval {
            props.put_u8(TAG_EXPIRY);
            // after the 4-byte properties length written below
            expiry_at = Some(o.len() + 4 + props.len());
            props.put_u32(v);
        }
        if let Some(v) = &p.response_topic {
            props.put_u8(TAG_RESPONSE_TOPIC);
            put_str16(&mut props, v.as_bytes())?;
        }
        if let Some(v) = &p.correlation_data {
            props.put_u8(TAG_CORRELATION);
            put_str16(&mut props, v)?;
        }
        for (k, v) in &p.user_properties {
            props.put_u8(TAG_USER_PROPERTY);
            put_str16(&mut props, k.as_bytes())?;
            put_str16(&mut props, v.as_bytes())?;
        }
        if let Some(v) = &p.content_type {
            props.put_u8(TAG_CONTENT_TYPE);
            put_str16(&mut props, v.as_bytes())?;
        }
        let props_len = u32::try_from(props.len())
            .map_err(|_| FrameError::Malformed("properties over 4 GiB"))?;
        o.put_u32(props_len);
        o.put_slice(&props);
        o.put_slice(&p.payload);
        Ok(())
    })?;
    Ok((bytes, expiry_at))
}

/// The PUBLISH frame `frame` with its message expiry interval (at `at`, from
/// [`encode_publish_expiry_at`]) set to `remaining`. `None` if `at` is not inside the frame.
pub fn with_expiry(frame: &Bytes, at: usize, remaining: u32) -> Option<Bytes> {
    let end = at.checked_add(4)?;
    if end > frame.len() {
        return None;
    }
    let mut b = BytesMut::from(&frame[..]);
    b[at..end].copy_from_slice(&remaining.to_be_bytes());
    Some(b.freeze())
}

/// A SEQUENCED frame written whole (the hot path writes [`sequenced_header`] before the
/// shared bytes instead).
pub(super) fn encode_sequenced(epoch: u64, seq: u64, inner: &Frame) -> Result<Bytes, FrameError> {
    let inner = encode(inner)?;
    let mut out = BytesMut::with_capacity(SEQUENCED_HEADER + inner.len());
    out.put_slice(&sequenced_header(epoch, seq, inner.len())?);
    out.put_slice(&inner);
    Ok(out.freeze())
}

/// The body of a SEQUENCED frame (after its kind): the numbered frame, whole, and nothing
/// after it: a PUBLISH (never nested).
pub(super) fn decode_sequenced(mut b: Bytes) -> Result<Frame, FrameError> {
    need(&b, 16, "sequenced header")?;
    let epoch = b.get_u64();
    let seq = b.get_u64();
    need(&b, 5, "sequenced frame truncated")?;
    let len = b.get_u32() as usize;
    if len != b.remaining() {
        return Err(FrameError::Malformed("sequenced frame length"));
    }
    if b.get_u8() != KIND_PUBLISH {
        return Err(FrameError::Malformed("sequenced frame not a publish"));
    }
    let inner = Frame::Publish(decode_publish(b)?);
    Ok(Frame::Sequenced {
        epoch,
        seq,
        inner: Box::new(inner),
    })
}

pub(super) fn put_ack(o: &mut BytesMut, epoch: u64, seq: u64) -> Result<(), FrameError> {
    o.put_u64(epoch);
    o.put_u64(seq);
    Ok(())
}

pub(super) fn get_ack(b: &mut Bytes) -> Result<Frame, FrameError> {
    need(b, 16, "ack")?;
    Ok(Frame::Ack {
        epoch: b.get_u64(),
        seq: b.get_u64(),
    })
}

/// The body of a PUBLISH frame (after its kind).
pub(super) fn decode_publish(mut b: Bytes) -> Result<MeshPublish, FrameError> {
    need(&b, 1, "publish flags")?;
    let flags = b.get_u8();
    let retain = flags & 1 == 1;
    let qos = (flags >> 1) & 0b11;
    if qos > 2 {
        return Err(FrameError::Malformed("publish qos"));
    }
    let topic = get_bytes16(&mut b, "publish topic")?;
    if topic.is_empty() || std::str::from_utf8(&topic).is_err() {
        return Err(FrameError::Malformed("publish topic"));
    }
    need(&b, 4, "publish properties length")?;
    let props_len = b.get_u32() as usize;
    need(&b, props_len, "publish properties")?;
    let mut props = b.split_to(props_len);
    let mut p = MeshPublish {
        topic,
        retain,
        qos,
        ..MeshPublish::default()
    };
    while props.has_remaining() {
        match props.get_u8() {
            TAG_PAYLOAD_FORMAT => {
                need(&props, 1, "payload format")?;
                p.payload_format_indicator = Some(props.get_u8());
            }
            TAG_EXPIRY => {
                need(&props, 4, "message expiry")?;
                p.message_expiry_interval = Some(props.get_u32());
            }
            TAG_RESPONSE_TOPIC => {
                p.response_topic = Some(get_string16(&mut props, "response topic")?)
            }
            TAG_CORRELATION => {
                p.correlation_data = Some(get_bytes16(&mut props, "correlation data")?)
            }
            TAG_USER_PROPERTY => {
                let k = get_string16(&mut props, "user property")?;
                let v = get_string16(&mut props, "user property")?;
                p.user_properties.push((k, v));
            }
            TAG_CONTENT_TYPE => p.content_type = Some(get_string16(&mut props, "content type")?),
            _ => return Err(FrameError::Malformed("unknown property tag")),
        }
    }
    p.payload = b;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::super::check::{assert_refused, full};
    use super::super::decode;
    use super::*;

    #[test]
    fn qos_travels_in_the_flags() {
        for qos in 0..=2 {
            let p = MeshPublish {
                topic: Bytes::from_static(b"t"),
                qos,
                ..Default::default()
            };
            let wire = encode_publish(&p).expect("encodes");
            assert_eq!(wire[5], qos << 1, "flags of QoS {qos}");
            let got = decode(&mut BytesMut::from(&wire[..]), 1 << 20).expect("valid");
            assert_eq!(got, Some(Frame::Publish(p)));
        }
        let bad = MeshPublish {
            topic: Bytes::from_static(b"t"),
            qos: 3,
            ..Default::default()
        };
        assert_eq!(
            encode_publish(&bad),
            Err(FrameError::Malformed("publish qos"))
        );
        assert_refused(&[
            // flags 0b110: QoS 3
            (
                b"\x00\x00\x00\x09\x03\x06\x00\x01t\x00\x00\x00\x00",
                FrameError::Malformed("publish qos"),
            ),
        ]);
    }

    #[test]
    fn a_publish_without_a_topic_is_refused() {
        assert_refused(&[(
            b"\x00\x00\x00\x04\x03\x00\x00\x00",
            FrameError::Malformed("publish topic"),
        )]);
    }

    #[test]
    fn the_expiry_interval_can_be_rewritten_in_place() {
        let p = full();
        let (wire, at) = encode_publish_expiry_at(&p).expect("encodes");
        let at = at.expect("full() has an expiry");
        let counted = with_expiry(&wire, at, 3599).expect("inside");
        let got = decode(&mut BytesMut::from(&counted[..]), 1 << 20).expect("valid");
        assert_eq!(
            got,
            Some(Frame::Publish(MeshPublish {
                message_expiry_interval: Some(3599),
                ..p
            }))
        );
        let none = MeshPublish {
            topic: Bytes::from_static(b"t"),
            ..Default::default()
        };
        assert_eq!(encode_publish_expiry_at(&none).expect("encodes").1, None);
        assert_eq!(with_expiry(&wire, wire.len() - 3, 1), None);
        assert_eq!(with_expiry(&wire, usize::MAX, 1), None);
    }

    /// The hot path writes the header, then the PUBLISH frame's shared bytes: the same as
    /// encoding the whole frame. Only a PUBLISH is numbered, never nested, exactly framed.
    #[test]
    fn a_sequenced_frame_is_a_header_before_a_publish() {
        let publish = encode_publish(&full()).expect("encodes");
        let mut wire = sequenced_header(9, 42, publish.len())
            .expect("fits")
            .to_vec();
        wire.extend_from_slice(&publish);
        let whole = encode(&Frame::Sequenced {
            epoch: 9,
            seq: 42,
            inner: Box::new(Frame::Publish(full())),
        })
        .expect("encodes");
        assert_eq!(wire, whole.to_vec());
        let wrap = |inner: &[u8]| {
            let mut w = sequenced_header(1, 1, inner.len()).expect("fits").to_vec();
            w.extend_from_slice(inner);
            w
        };
        let ack = encode(&Frame::Ack { epoch: 1, seq: 1 }).expect("encodes");
        // nested: refused at once, no recursion however deep
        let mut nested = publish.to_vec();
        for _ in 0..10_000 {
            nested = wrap(&nested);
        }
        assert_eq!(
            decode(&mut BytesMut::from(&nested[..]), usize::MAX),
            Err(FrameError::Malformed("sequenced frame not a publish"))
        );
        // the inner frame claims more (or less) than there is
        let mut long = wrap(&publish);
        long[SEQUENCED_HEADER + 3] += 1;
        let mut short_ack = ack.to_vec();
        short_ack[3] -= 1;
        short_ack.truncate(ack.len() - 1);
        assert_refused(&[
            (
                &wrap(&ack)[..],
                FrameError::Malformed("sequenced frame not a publish"),
            ),
            (&long[..], FrameError::Malformed("sequenced frame length")),
            (
                &wrap(&publish[..3])[..],
                FrameError::Malformed("sequenced frame truncated"),
            ),
            (
                &wrap(&[])[..],
                FrameError::Malformed("sequenced frame truncated"),
            ),
            (&short_ack[..], FrameError::Malformed("ack")),
        ]);
    }
}
