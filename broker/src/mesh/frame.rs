//! The node-to-node wire format. Pure: encode and decode, no I/O, so every malformed input is
//! testable without sockets.
//!
//! ```text
//! frame   := len:u32 (bytes after it) kind:u8 body
//! HELLO   := "MQLB" version:u8 id_len:u16 id nonce:[u8; 16]
//! AUTH    := mac:[u8; 32]                      HMAC-SHA256, see `auth`
//! PUBLISH := flags:u8 (bit 0 retain, bits 1-2 QoS) topic_len:u16 topic props_len:u32 props payload
//! props   := (tag:u8 value)*                   v5 properties worth carrying
//! CONNECTED := flags:u8 (bit 0 clean start) id_len:u16 client_id
//! SEQUENCED := epoch:u64 seq:u64 frame        a numbered frame (a whole PUBLISH frame inside)
//! ACK     := epoch:u64 seq:u64                 receiver to sender: all up to seq accepted
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const MAGIC: &[u8; 4] = b"MQLB";
/// Bumped when the format changes; a peer with another version is refused at HELLO.
/// 2: the CONNECTED frame (a version 1 node would close the link on it).
/// 3: SEQUENCED and ACK (issue 12): the receiver writes ACKs back on the link, which a
/// version 2 sender takes for a broken link.
/// 4: SHARE_GROUPS (issue 12), sent on every link as it comes up: a version 3 node would
/// close the link on it.
/// 6: session replicas (issue 12): REPLICA_META, REPLICA_ACKS, REPLICA_CLOSE, SESSION_REPLICA.
pub const VERSION: u8 = 6;
pub const NONCE_LEN: usize = 16;
pub const MAC_LEN: usize = 32;

const KIND_HELLO: u8 = 1;
const KIND_AUTH: u8 = 2;
const KIND_PUBLISH: u8 = 3;
const KIND_CONNECTED: u8 = 4;
// Acknowledged delivery (issue 12): kinds 16 and up.
const KIND_SEQUENCED: u8 = 16;
const KIND_ACK: u8 = 17;
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    // Sessions across the cluster (issue 12; see `crate::session` and the layouts below).
    /// "Send me the session of `client_id`, if you have it": a client connected with Clean
    /// Start 0 to the sending node, which waits for the answers before its CONNACK.
    SessionRequest {
        request: u64,
        client_id: String,
    },
    /// The answer to `request`: the session, taken out of the answering node (its live
    /// connection closed), or `None`.
    Session {
        request: u64,
        session: Option<Box<MeshSession>>,
    },
    Hello {
        version: u8,
        node_id: String,
        nonce: [u8; NONCE_LEN],
    },
    Auth {
        mac: [u8; MAC_LEN],
    },
    Publish(MeshPublish),
    /// A client connected to the sending node: a delayed will of an earlier connection with
    /// this client ID is cancelled (or, with a clean start, which ends the old session,
    /// published now) on every node (MQTT-3.1.3-9), and a live connection with this client ID
    /// is taken over, unless it is the newer one: `at` (the CONNACK's time, microseconds since
    /// the Unix epoch, on the sender's clock) settles a race of two nodes (issue 12).
    Connected {
        client_id: String,
        clean_start: bool,
        at: u64,
    },
    // Acknowledged delivery (issue 12; see `mesh::reliable`).
    /// Frame `seq` of the sender's stream `epoch` to this peer (only a PUBLISH is numbered).
    Sequenced {
        epoch: u64,
        seq: u64,
        inner: Box<Frame>,
    },
    /// Receiver to sender: every numbered frame of `epoch` up to `seq` was accepted.
    Ack {
        epoch: u64,
        seq: u64,
    },
    /// Shared subscriptions across the cluster (issue 12; `crate::share`): every shared group
    /// (`{ShareName}/{filter}`) the sending node has members of, the whole list, sent when a
    /// link comes up and whenever it changes.
    ShareGroups {
        groups: Vec<String>,
    },
    // Session replicas (issue 12; `crate::replica`, layouts at the end of this file).
    /// The sender owns this persistent session: a replica is made or updated.
    ReplicaMeta(Box<ReplicaMeta>),
    /// The sender's clients acknowledged these messages: their replicas forget them.
    ReplicaAcks {
        acks: Vec<(String, Vec<MsgId>)>,
    },
    /// The sender's session ended or left it: its replica goes.
    ReplicaClose {
        client_id: String,
    },
    /// An answer to `request` with the sender's replica of the session (not the session
    /// itself: the asking node merges it with the other copies).
    SessionReplica {
        request: u64,
        session: Box<MeshSession>,
    },
}

/// Why bytes from a peer are refused. The label names the defect in metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("not an mqlb mesh peer (bad magic)")]
    BadMagic,
}

impl FrameError {
    pub fn label(&self) -> &'static str {
        match self {
            FrameError::TooLarge(..) => "too_large",
            FrameError::UnknownKind(_) => "unknown_kind",
            FrameError::Malformed(_) => "malformed",
            FrameError::BadMagic => "bad_magic",
        }
    }
}

fn put_str16(out: &mut BytesMut, s: &[u8]) -> Result<(), FrameError> {
    let len =
        u16::try_from(s.len()).map_err(|_| FrameError::Malformed("string over 65535 bytes"))?;
    out.put_u16(len);
    out.put_slice(s);
    Ok(())
}

fn frame(
    kind: u8,
    body: impl FnOnce(&mut BytesMut) -> Result<(), FrameError>,
) -> Result<Bytes, FrameError> {
    let mut out = BytesMut::with_capacity(64);
    out.put_u32(0);
    out.put_u8(kind);
    body(&mut out)?;
    let len =
        u32::try_from(out.len() - 4).map_err(|_| FrameError::Malformed("frame over 4 GiB"))?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out.freeze())
}

pub fn encode(f: &Frame) -> Result<Bytes, FrameError> {
    match f {
        Frame::SessionRequest { request, client_id } => frame(KIND_SESSION_REQUEST, |o| {
            o.put_u64(*request);
            put_str16(o, client_id.as_bytes())
        }),
        Frame::Session { request, session } => frame(KIND_SESSION, |o| {
            o.put_u64(*request);
            match session {
                None => {
                    o.put_u8(0);
                    Ok(())
                }
                Some(s) => {
                    o.put_u8(1);
                    put_session(o, s)
                }
            }
        }),
        Frame::Hello {
            version,
            node_id,
            nonce,
        } => frame(KIND_HELLO, |o| {
            o.put_slice(MAGIC);
            o.put_u8(*version);
            put_str16(o, node_id.as_bytes())?;
            o.put_slice(nonce);
            Ok(())
        }),
        Frame::Auth { mac } => frame(KIND_AUTH, |o| {
            o.put_slice(mac);
            Ok(())
        }),
        Frame::Publish(p) => encode_publish(p),
        Frame::Connected {
            client_id,
            clean_start,
            at,
        } => frame(KIND_CONNECTED, |o| {
            o.put_u8(u8::from(*clean_start));
            put_str16(o, client_id.as_bytes())?;
            o.put_u64(*at);
            Ok(())
        }),
        Frame::Sequenced { epoch, seq, inner } => {
            let inner = encode(inner)?;
            let mut out = BytesMut::with_capacity(SEQUENCED_HEADER + inner.len());
            out.put_slice(&sequenced_header(*epoch, *seq, inner.len())?);
            out.put_slice(&inner);
            Ok(out.freeze())
        }
        Frame::Ack { epoch, seq } => frame(KIND_ACK, |o| {
            o.put_u64(*epoch);
            o.put_u64(*seq);
            Ok(())
        }),
        Frame::ShareGroups { groups } => frame(KIND_SHARE_GROUPS, |o| put_share_groups(o, groups)),
        Frame::ReplicaMeta(m) => frame(KIND_REPLICA_META, |o| put_replica_meta(o, m)),
        Frame::ReplicaAcks { acks } => frame(KIND_REPLICA_ACKS, |o| put_replica_acks(o, acks)),
        Frame::ReplicaClose { client_id } => {
            frame(KIND_REPLICA_CLOSE, |o| put_str16(o, client_id.as_bytes()))
        }
        Frame::SessionReplica { request, session } => frame(KIND_SESSION_REPLICA, |o| {
            o.put_u64(*request);
            put_session(o, session)
        }),
    }
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

fn need(b: &Bytes, n: usize, what: &'static str) -> Result<(), FrameError> {
    if b.remaining() < n {
        Err(FrameError::Malformed(what))
    } else {
        Ok(())
    }
}

fn get_bytes16(b: &mut Bytes, what: &'static str) -> Result<Bytes, FrameError> {
    need(b, 2, what)?;
    let len = b.get_u16() as usize;
    need(b, len, what)?;
    Ok(b.split_to(len))
}

fn get_string16(b: &mut Bytes, what: &'static str) -> Result<String, FrameError> {
    String::from_utf8(get_bytes16(b, what)?.to_vec()).map_err(|_| FrameError::Malformed(what))
}

/// The body of a PUBLISH frame (after its kind).
fn decode_publish(mut b: Bytes) -> Result<MeshPublish, FrameError> {
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

/// Takes one whole frame off the front of `buf`. `Ok(None)`: more bytes needed. The length is
/// checked against `max` before anything is buffered beyond the header.
pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge(len, max));
    }
    if len == 0 {
        return Err(FrameError::Malformed("empty frame"));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let mut b = buf.split_to(len).freeze();
    let kind = b.get_u8();
    let f = match kind {
        KIND_SESSION_REQUEST => {
            need(&b, 8, "session request")?;
            let request = b.get_u64();
            let client_id = get_string16(&mut b, "session request client id")?;
            if client_id.is_empty() {
                return Err(FrameError::Malformed("session request client id"));
            }
            Frame::SessionRequest { request, client_id }
        }
        KIND_SESSION => {
            need(&b, 9, "session header")?;
            let request = b.get_u64();
            let session = match b.get_u8() {
                0 => None,
                1 => Some(Box::new(get_session(&mut b)?)),
                _ => return Err(FrameError::Malformed("session flag")),
            };
            Frame::Session { request, session }
        }
        KIND_HELLO => {
            need(&b, 5, "hello header")?;
            if &b[..4] != MAGIC {
                return Err(FrameError::BadMagic);
            }
            b.advance(4);
            let version = b.get_u8();
            let node_id = get_string16(&mut b, "hello node id")?;
            need(&b, NONCE_LEN, "hello nonce")?;
            let mut nonce = [0u8; NONCE_LEN];
            b.copy_to_slice(&mut nonce);
            Frame::Hello {
                version,
                node_id,
                nonce,
            }
        }
        KIND_AUTH => {
            need(&b, MAC_LEN, "auth mac")?;
            let mut mac = [0u8; MAC_LEN];
            b.copy_to_slice(&mut mac);
            Frame::Auth { mac }
        }
        KIND_PUBLISH => return decode_publish(b).map(|p| Some(Frame::Publish(p))),
        KIND_CONNECTED => {
            need(&b, 1, "connected flags")?;
            let clean_start = b.get_u8() & 1 == 1;
            let client_id = get_string16(&mut b, "connected client id")?;
            need(&b, 8, "connected time")?;
            let at = b.get_u64();
            Frame::Connected {
                client_id,
                clean_start,
                at,
            }
        }
        KIND_SEQUENCED => {
            need(&b, 16, "sequenced header")?;
            let epoch = b.get_u64();
            let seq = b.get_u64();
            // the numbered frame, whole, and nothing after it: a PUBLISH (never nested)
            need(&b, 5, "sequenced frame truncated")?;
            let len = b.get_u32() as usize;
            if len != b.remaining() {
                return Err(FrameError::Malformed("sequenced frame length"));
            }
            if b.get_u8() != KIND_PUBLISH {
                return Err(FrameError::Malformed("sequenced frame not a publish"));
            }
            let inner = Frame::Publish(decode_publish(b)?);
            return Ok(Some(Frame::Sequenced {
                epoch,
                seq,
                inner: Box::new(inner),
            }));
        }
        KIND_ACK => {
            need(&b, 16, "ack")?;
            Frame::Ack {
                epoch: b.get_u64(),
                seq: b.get_u64(),
            }
        }
        KIND_SHARE_GROUPS => Frame::ShareGroups {
            groups: get_share_groups(&mut b)?,
        },
        KIND_REPLICA_META => Frame::ReplicaMeta(Box::new(get_replica_meta(&mut b)?)),
        KIND_REPLICA_ACKS => Frame::ReplicaAcks {
            acks: get_replica_acks(&mut b)?,
        },
        KIND_REPLICA_CLOSE => Frame::ReplicaClose {
            client_id: get_client_id(&mut b, "replica close client id")?,
        },
        KIND_SESSION_REPLICA => {
            need(&b, 8, "session replica header")?;
            let request = b.get_u64();
            Frame::SessionReplica {
                request,
                session: Box::new(get_session(&mut b)?),
            }
        }
        other => return Err(FrameError::UnknownKind(other)),
    };
    if b.has_remaining() {
        return Err(FrameError::Malformed("trailing bytes"));
    }
    Ok(Some(f))
}

// Sessions across the cluster (issue 12).
//
// SESSION_REQUEST := request:u64 id_len:u16 client_id
// SESSION := request:u64 found:u8 (0: no session; 1: then)
//            id_len:u16 client_id expiry:u32 last_pkid:u16 dropped:u32
//            n:u32 (filter_len:u16 filter qos:u8 options:u8 (bit 0 no local, bit 1 retain as
//                   published))*
//            n:u32 (pkid:u16)*                    PUBRELs to send again
//            n:u32 (pkid:u16 len:u32 PUBLISH frame)*   pending messages, oldest first
//
// The session is plain data (no node's log positions), so a replica can keep one as it is.
const KIND_SESSION_REQUEST: u8 = 32;
const KIND_SESSION: u8 = 33;

/// A session on its way from one node to another (rumqttd's `SessionExport`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshSession {
    pub client_id: String,
    /// Seconds left of its Session Expiry Interval (`u32::MAX`: never ends).
    pub expiry: u32,
    pub last_pkid: u16,
    /// Pending messages the sender left out (size bound).
    pub dropped: u32,
    pub subscriptions: Vec<MeshSubscription>,
    pub pubrels: Vec<u16>,
    /// `(packet id, message)`: the packet id it was sent with and not acknowledged, 0 if not
    /// sent yet; the message's QoS (1 or 2) and RETAIN as it is to be delivered.
    pub pending: Vec<(u16, MeshPublish)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshSubscription {
    pub filter: String,
    pub qos: u8,
    pub nolocal: bool,
    pub preserve_retain: bool,
}

fn put_count(o: &mut BytesMut, n: usize) -> Result<(), FrameError> {
    o.put_u32(u32::try_from(n).map_err(|_| FrameError::Malformed("count over 4 G"))?);
    Ok(())
}

fn put_session(o: &mut BytesMut, s: &MeshSession) -> Result<(), FrameError> {
    put_str16(o, s.client_id.as_bytes())?;
    o.put_u32(s.expiry);
    o.put_u16(s.last_pkid);
    o.put_u32(s.dropped);
    put_subscriptions(o, &s.subscriptions)?;
    put_count(o, s.pubrels.len())?;
    for pkid in &s.pubrels {
        o.put_u16(*pkid);
    }
    put_count(o, s.pending.len())?;
    for (pkid, m) in &s.pending {
        if m.qos == 0 {
            return Err(FrameError::Malformed("pending qos"));
        }
        let inner = encode_publish(m)?;
        o.put_u16(*pkid);
        put_count(o, inner.len())?;
        o.put_slice(&inner);
    }
    Ok(())
}

/// A count of elements of at least `each` bytes, checked against what is left (so a count
/// cannot make the decoder allocate more than the frame holds).
fn get_count(b: &mut Bytes, each: usize, what: &'static str) -> Result<usize, FrameError> {
    need(b, 4, what)?;
    let n = b.get_u32() as usize;
    if n.saturating_mul(each) > b.remaining() {
        return Err(FrameError::Malformed(what));
    }
    Ok(n)
}

fn put_subscriptions(o: &mut BytesMut, subs: &[MeshSubscription]) -> Result<(), FrameError> {
    put_count(o, subs.len())?;
    for sub in subs {
        if sub.qos > 2 {
            return Err(FrameError::Malformed("subscription qos"));
        }
        put_str16(o, sub.filter.as_bytes())?;
        o.put_u8(sub.qos);
        o.put_u8(u8::from(sub.nolocal) | u8::from(sub.preserve_retain) << 1);
    }
    Ok(())
}

fn get_subscriptions(b: &mut Bytes) -> Result<Vec<MeshSubscription>, FrameError> {
    let n = get_count(b, 4, "session subscriptions")?;
    let mut subs = Vec::with_capacity(n);
    for _ in 0..n {
        let filter = get_string16(b, "session subscription filter")?;
        need(b, 2, "session subscription options")?;
        let qos = b.get_u8();
        let options = b.get_u8();
        if filter.is_empty() || qos > 2 || options > 0b11 {
            return Err(FrameError::Malformed("session subscription"));
        }
        subs.push(MeshSubscription {
            filter,
            qos,
            nolocal: options & 1 == 1,
            preserve_retain: options & 2 == 2,
        });
    }
    Ok(subs)
}

/// A client ID that is not empty.
fn get_client_id(b: &mut Bytes, what: &'static str) -> Result<String, FrameError> {
    let id = get_string16(b, what)?;
    if id.is_empty() {
        return Err(FrameError::Malformed(what));
    }
    Ok(id)
}

fn get_session(b: &mut Bytes) -> Result<MeshSession, FrameError> {
    let client_id = get_client_id(b, "session client id")?;
    need(b, 10, "session header")?;
    let mut s = MeshSession {
        client_id,
        expiry: b.get_u32(),
        last_pkid: b.get_u16(),
        dropped: b.get_u32(),
        ..MeshSession::default()
    };
    s.subscriptions = get_subscriptions(b)?;
    let n = get_count(b, 2, "session pubrels")?;
    s.pubrels.reserve(n);
    for _ in 0..n {
        s.pubrels.push(b.get_u16());
    }
    let n = get_count(b, 6, "session pending")?;
    s.pending.reserve(n);
    for _ in 0..n {
        need(b, 6, "session pending message")?;
        let pkid = b.get_u16();
        let len = b.get_u32() as usize;
        need(b, len, "session pending message")?;
        let mut inner = BytesMut::from(&b.split_to(len)[..]);
        let m = match decode(&mut inner, len) {
            Ok(Some(Frame::Publish(m))) if inner.is_empty() && m.qos > 0 => m,
            _ => return Err(FrameError::Malformed("session pending message")),
        };
        s.pending.push((pkid, m));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> MeshPublish {
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

    #[test]
    fn every_frame_round_trips_even_byte_by_byte() {
        let frames = [
            Frame::Hello {
                version: VERSION,
                node_id: "b1".into(),
                nonce: [7; NONCE_LEN],
            },
            Frame::Auth { mac: [9; MAC_LEN] },
            Frame::Publish(full()),
            Frame::Publish(MeshPublish {
                topic: Bytes::from_static(b"t"),
                ..Default::default()
            }),
            Frame::Connected {
                client_id: "device-7".into(),
                clean_start: true,
                at: 1_764_633_600_000_000,
            },
            Frame::Connected {
                client_id: String::new(),
                clean_start: false,
                at: 0,
            },
            Frame::Sequenced {
                epoch: u64::MAX,
                seq: 1,
                inner: Box::new(Frame::Publish(full())),
            },
            Frame::Ack {
                epoch: 3,
                seq: u64::MAX,
            },
        ];
        let mut wire = BytesMut::new();
        for f in &frames {
            wire.extend_from_slice(&encode(f).expect("encodes"));
        }
        // Fed one byte at a time, the decoder yields exactly the frames, in order.
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
        // flags 0b110: QoS 3
        assert_eq!(
            decode(
                &mut BytesMut::from(&b"\x00\x00\x00\x09\x03\x06\x00\x01t\x00\x00\x00\x00"[..]),
                1 << 20
            ),
            Err(FrameError::Malformed("publish qos"))
        );
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
            BytesMut::from(&w[..])
        };
        let ack = encode(&Frame::Ack { epoch: 1, seq: 1 }).expect("encodes");
        assert_eq!(
            decode(&mut wrap(&ack), 1 << 20),
            Err(FrameError::Malformed("sequenced frame not a publish"))
        );
        // nested: refused at once, no recursion however deep
        let mut nested = publish.to_vec();
        for _ in 0..10_000 {
            nested = wrap(&nested).to_vec();
        }
        assert_eq!(
            decode(&mut BytesMut::from(&nested[..]), usize::MAX),
            Err(FrameError::Malformed("sequenced frame not a publish"))
        );
        // the inner frame claims more (or less) than there is
        let mut long = wrap(&publish);
        long[SEQUENCED_HEADER + 3] += 1;
        assert_eq!(
            decode(&mut long, 1 << 20),
            Err(FrameError::Malformed("sequenced frame length"))
        );
        assert_eq!(
            decode(&mut wrap(&publish[..3]), 1 << 20),
            Err(FrameError::Malformed("sequenced frame truncated"))
        );
        assert_eq!(
            decode(&mut wrap(&[]), 1 << 20),
            Err(FrameError::Malformed("sequenced frame truncated"))
        );
        let mut short_ack = BytesMut::from(&ack[..]);
        short_ack[3] -= 1;
        short_ack.truncate(ack.len() - 1);
        assert_eq!(
            decode(&mut short_ack, 1 << 20),
            Err(FrameError::Malformed("ack"))
        );
    }

    #[test]
    fn limits_and_garbage_are_refused() {
        let big = encode(&Frame::Publish(MeshPublish {
            topic: Bytes::from_static(b"t"),
            payload: Bytes::from(vec![0u8; 5000]),
            ..Default::default()
        }))
        .expect("encodes");
        assert!(matches!(
            decode(&mut BytesMut::from(&big[..]), 4096),
            Err(FrameError::TooLarge(..))
        ));
        // Only the 4-byte header is needed to refuse an oversized frame.
        assert!(matches!(
            decode(&mut BytesMut::from(&big[..4]), 4096),
            Err(FrameError::TooLarge(..))
        ));
        let cases: [(&[u8], FrameError); 7] = [
            (b"\x00\x00\x00\x00", FrameError::Malformed("empty frame")),
            (b"\x00\x00\x00\x01\x09", FrameError::UnknownKind(9)),
            (
                b"\x00\x00\x00\x05\x01HTTP",
                FrameError::Malformed("hello header"),
            ),
            (b"\x00\x00\x00\x06\x01HTTP/", FrameError::BadMagic),
            (
                b"\x00\x00\x00\x04\x03\x00\x00\x00",
                FrameError::Malformed("publish topic"),
            ),
            (
                b"\x00\x00\x00\x01\x04",
                FrameError::Malformed("connected flags"),
            ),
            (
                b"\x00\x00\x00\x05\x04\x01\x00\x03a",
                FrameError::Malformed("connected client id"),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                decode(&mut BytesMut::from(bytes), 1 << 20),
                Err(want),
                "{bytes:?}"
            );
        }
        let mut auth =
            BytesMut::from(&encode(&Frame::Auth { mac: [1; MAC_LEN] }).expect("encodes")[..]);
        auth[3] += 1; // claims one more byte than a MAC
        auth.put_u8(0);
        assert_eq!(
            decode(&mut auth, 1 << 20),
            Err(FrameError::Malformed("trailing bytes"))
        );
    }

    /// Whatever a peer (or anyone who reaches the mesh port before authenticating) sends, the
    /// decoder returns a frame, asks for more, or refuses: it never panics and never returns a
    /// frame without consuming bytes.
    mod arbitrary_input {
        use super::*;
        use proptest::prelude::*;

        fn decode_all(mut buf: BytesMut, max: usize) {
            loop {
                let before = buf.len();
                match decode(&mut buf, max) {
                    Ok(Some(_)) => assert!(buf.len() < before, "a frame consumed nothing"),
                    Ok(None) => return,
                    Err(_) => return,
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
                decode_all(BytesMut::from(&bytes[..]), 512);
            }

            #[test]
            fn damaged_frames_never_panic(
                which in 0usize..6,
                at in any::<prop::sample::Index>(),
                byte in any::<u8>(),
                cut in any::<prop::sample::Index>(),
            ) {
                let frame = match which {
                    0 => Frame::Hello { version: VERSION, node_id: "b1".into(), nonce: [7; NONCE_LEN] },
                    1 => Frame::Auth { mac: [9; MAC_LEN] },
                    2 => Frame::Connected { client_id: "c1".into(), clean_start: true, at: 7 },
                    3 => Frame::Ack { epoch: 1, seq: 2 },
                    4 => Frame::Sequenced { epoch: 1, seq: 2, inner: Box::new(Frame::Publish(full())) },
                    _ => Frame::Publish(full()),
                };
                let mut wire = encode(&frame).expect("encodes").to_vec();
                let i = at.index(wire.len());
                wire[i] = byte;
                let keep = cut.index(wire.len() + 1);
                decode_all(BytesMut::from(&wire[..keep]), 1 << 20);
            }
        }
    }
}

/// Sessions across the cluster (issue 12): the SESSION_REQUEST and SESSION frames.
#[cfg(test)]
mod session_tests {
    use super::*;

    fn session() -> MeshSession {
        MeshSession {
            client_id: "dev-1".into(),
            expiry: 300,
            last_pkid: 7,
            dropped: 2,
            subscriptions: vec![
                MeshSubscription {
                    filter: "a/+/c".into(),
                    qos: 1,
                    nolocal: true,
                    preserve_retain: false,
                },
                MeshSubscription {
                    filter: "$share/g/x/#".into(),
                    qos: 2,
                    nolocal: false,
                    preserve_retain: true,
                },
            ],
            pubrels: vec![3, 4],
            pending: vec![
                (
                    6,
                    MeshPublish {
                        topic: Bytes::from_static(b"a/b/c"),
                        payload: Bytes::from_static(b"one"),
                        qos: 1,
                        message_expiry_interval: Some(60),
                        user_properties: vec![("k".into(), "v".into())],
                        ..MeshPublish::default()
                    },
                ),
                (
                    0,
                    MeshPublish {
                        topic: Bytes::from_static(b"x/y"),
                        payload: Bytes::new(),
                        qos: 2,
                        retain: true,
                        ..MeshPublish::default()
                    },
                ),
            ],
        }
    }

    fn frames() -> Vec<Frame> {
        vec![
            Frame::SessionRequest {
                request: 42,
                client_id: "dev-1".into(),
            },
            Frame::Session {
                request: 42,
                session: None,
            },
            Frame::Session {
                request: u64::MAX,
                session: Some(Box::new(session())),
            },
            Frame::Session {
                request: 1,
                session: Some(Box::new(MeshSession {
                    client_id: "c".into(),
                    ..MeshSession::default()
                })),
            },
        ]
    }

    #[test]
    fn session_frames_round_trip_even_byte_by_byte() {
        let frames = frames();
        let mut wire = BytesMut::new();
        for f in &frames {
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
    }

    #[test]
    fn bad_session_frames_are_refused() {
        let qos0 = MeshSession {
            client_id: "c".into(),
            pending: vec![(0, MeshPublish::default())],
            ..MeshSession::default()
        };
        let f = Frame::Session {
            request: 1,
            session: Some(Box::new(qos0)),
        };
        assert_eq!(encode(&f), Err(FrameError::Malformed("pending qos")));
        let cases: [(&[u8], FrameError); 5] = [
            // a request for the empty client ID
            (
                b"\x00\x00\x00\x0b\x20\0\0\0\0\0\0\0\x01\x00\x00",
                FrameError::Malformed("session request client id"),
            ),
            // found flag 2
            (
                b"\x00\x00\x00\x0a\x21\0\0\0\0\0\0\0\x01\x02",
                FrameError::Malformed("session flag"),
            ),
            // a session that ends after its client ID
            (
                b"\x00\x00\x00\x0d\x21\0\0\0\0\0\0\0\x01\x01\x00\x01c",
                FrameError::Malformed("session header"),
            ),
            // claims 2^32-1 subscriptions
            (
                b"\x00\x00\x00\x1b\x21\0\0\0\0\0\0\0\x01\x01\x00\x01c\0\0\0\0\0\0\0\0\0\0\xff\xff\xff\xff",
                FrameError::Malformed("session subscriptions"),
            ),
            // nothing after the header
            (
                b"\x00\x00\x00\x05\x21\0\0\0\0",
                FrameError::Malformed("session header"),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                decode(&mut BytesMut::from(bytes), 1 << 20),
                Err(want),
                "{bytes:?}"
            );
        }
        // A pending message that is not a QoS 1/2 PUBLISH frame.
        let mut s = session();
        s.pending.truncate(1);
        let wire = encode(&Frame::Session {
            request: 1,
            session: Some(Box::new(s)),
        })
        .expect("encodes");
        let inner = encode_publish(&session().pending[0].1).expect("encodes");
        let start = wire
            .windows(inner.len())
            .position(|w| w == &inner[..])
            .expect("the publish is inside");
        let mut bad = BytesMut::from(&wire[..]);
        assert_eq!(bad[start + 5], 0b010, "the inner publish flags");
        bad[start + 5] = 0; // QoS 0
        assert_eq!(
            decode(&mut bad, 1 << 20),
            Err(FrameError::Malformed("session pending message"))
        );
    }

    mod arbitrary_input {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// A damaged session frame is refused or decoded, never a panic, never more
            /// memory than the frame's bytes.
            #[test]
            fn damaged_session_frames_never_panic(
                which in 0usize..4,
                at in any::<prop::sample::Index>(),
                byte in any::<u8>(),
                cut in any::<prop::sample::Index>(),
            ) {
                let mut wire = encode(&frames()[which]).expect("encodes").to_vec();
                let i = at.index(wire.len());
                wire[i] = byte;
                let keep = cut.index(wire.len() + 1);
                let mut buf = BytesMut::from(&wire[..keep]);
                for _ in 0..4 {
                    match decode(&mut buf, 1 << 20) {
                        Ok(Some(_)) => continue,
                        _ => break,
                    }
                }
            }
        }
    }
}

// Shared subscriptions across the cluster (issue 12): kinds 48 and up.
//
// SHARE_GROUPS := n:u32 (len:u16 group)*      group: "{ShareName}/{filter}", n <= MAX_SHARE_GROUPS
const KIND_SHARE_GROUPS: u8 = 48;
/// The most shared groups one node advertises (more are refused from a peer, and not sent).
pub const MAX_SHARE_GROUPS: usize = 4096;
/// The longest group name advertised (a ShareName, `/` and a filter).
pub const MAX_SHARE_GROUP_LEN: usize = 1024;
/// The most bytes of group names one frame carries (so it fits any mesh frame limit).
pub const MAX_SHARE_GROUPS_BYTES: usize = 64 * 1024;

/// Whether `g` can be advertised: `{ShareName}/{filter}`, both parts non-empty, bounded.
pub fn valid_share_group(g: &str) -> bool {
    g.len() <= MAX_SHARE_GROUP_LEN
        && g.split_once('/')
            .is_some_and(|(name, filter)| !name.is_empty() && !filter.is_empty())
}

fn put_share_groups(o: &mut BytesMut, groups: &[String]) -> Result<(), FrameError> {
    let bytes: usize = groups.iter().map(String::len).sum();
    if groups.len() > MAX_SHARE_GROUPS || bytes > MAX_SHARE_GROUPS_BYTES {
        return Err(FrameError::Malformed("too many share groups"));
    }
    o.put_u32(groups.len() as u32);
    for g in groups {
        if !valid_share_group(g) {
            return Err(FrameError::Malformed("share group"));
        }
        put_str16(o, g.as_bytes())?;
    }
    Ok(())
}

fn get_share_groups(b: &mut Bytes) -> Result<Vec<String>, FrameError> {
    need(b, 4, "share groups count")?;
    let n = b.get_u32() as usize;
    if n > MAX_SHARE_GROUPS {
        return Err(FrameError::Malformed("too many share groups"));
    }
    // Each takes at least 2 bytes: a count the frame cannot hold is refused before allocating.
    need(b, n.saturating_mul(2), "share groups")?;
    let mut groups = Vec::with_capacity(n);
    let mut bytes = 0;
    for _ in 0..n {
        let g = get_string16(b, "share group")?;
        if !valid_share_group(&g) {
            return Err(FrameError::Malformed("share group"));
        }
        bytes += g.len();
        if bytes > MAX_SHARE_GROUPS_BYTES {
            return Err(FrameError::Malformed("too many share groups"));
        }
        groups.push(g);
    }
    Ok(groups)
}

#[cfg(test)]
mod share_tests {
    use super::*;

    fn decoded(bytes: &[u8]) -> Result<Option<Frame>, FrameError> {
        decode(&mut BytesMut::from(bytes), 1 << 20)
    }

    #[test]
    fn share_groups_round_trip() {
        let f = Frame::ShareGroups {
            groups: vec!["g/share/t".into(), "other/a/+/#".into()],
        };
        let bytes = encode(&f).expect("encodes");
        assert_eq!(decoded(&bytes), Ok(Some(f)));
        let empty = Frame::ShareGroups { groups: vec![] };
        let bytes = encode(&empty).expect("encodes");
        assert_eq!(decoded(&bytes), Ok(Some(empty)));
    }

    #[test]
    fn bad_share_groups_are_refused() {
        let body = |b: &[u8]| {
            let mut f = BytesMut::new();
            f.put_u32(1 + b.len() as u32);
            f.put_u8(KIND_SHARE_GROUPS);
            f.put_slice(b);
            f
        };
        // A count over the bound.
        let mut over = BytesMut::new();
        over.put_u32(MAX_SHARE_GROUPS as u32 + 1);
        assert_eq!(
            decoded(&body(&over)),
            Err(FrameError::Malformed("too many share groups"))
        );
        // A count the frame cannot hold.
        let mut short = BytesMut::new();
        short.put_u32(3);
        short.put_u16(1);
        short.put_slice(b"g");
        assert!(decoded(&body(&short)).is_err());
        // Not `{ShareName}/{filter}`, not UTF-8, too long.
        for g in [&b"nofilter"[..], b"/t", b"g/", b"\xff/t", &[b'a'; 1100][..]] {
            let mut one = BytesMut::new();
            one.put_u32(1);
            one.put_u16(g.len() as u16);
            one.put_slice(g);
            assert!(decoded(&body(&one)).is_err(), "{g:?}");
        }
        // Missing the count, trailing bytes.
        assert!(decoded(&body(&[0, 0])).is_err());
        assert!(decoded(&body(&[0, 0, 0, 0, 7])).is_err());
        // Too many or bad groups are not sent either.
        let many = vec!["g/t".to_string(); MAX_SHARE_GROUPS + 1];
        assert!(encode(&Frame::ShareGroups { groups: many }).is_err());
        let long = vec!["g/".to_string() + &"t".repeat(1000); 70];
        assert!(encode(&Frame::ShareGroups { groups: long }).is_err());
        let bad = vec!["g".to_string()];
        assert!(encode(&Frame::ShareGroups { groups: bad }).is_err());
    }
}

// Session replicas (issue 12; `crate::replica`).
//
// REPLICA_META    := id_len:u16 client_id expiry:u32 flags:u8 (bit 0 online, bit 1 fresh)
//                    n:u32 (filter_len:u16 filter qos:u8 options:u8)*
// REPLICA_ACKS    := n:u32 (id_len:u16 client_id m:u32 (origin:u64 seq:u64)*)*
// REPLICA_CLOSE   := id_len:u16 client_id
// SESSION_REPLICA := request:u64 (a SESSION's body after its found flag)
const KIND_REPLICA_META: u8 = 64;
const KIND_REPLICA_ACKS: u8 = 65;
const KIND_REPLICA_CLOSE: u8 = 66;
const KIND_SESSION_REPLICA: u8 = 67;

/// A QoS 1/2 message's cluster-wide id (see `crate::replica`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId {
    pub origin: u64,
    pub seq: u64,
}

/// What the owner of a persistent session tells the nodes that replicate it, whole, on every
/// change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicaMeta {
    pub client_id: String,
    /// The Session Expiry Interval, seconds (`u32::MAX`: never).
    pub expiry: u32,
    /// A client is connected to it now (the expiry counts only while it is not).
    pub online: bool,
    /// A new session (Clean Start 1): what a replica queued for the old one is dropped.
    pub fresh: bool,
    pub subscriptions: Vec<MeshSubscription>,
    /// The client's last will, which the cluster publishes should the owner die first.
    pub will: Option<MeshWill>,
}

/// A last will and its Will Delay Interval (seconds).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshWill {
    pub publish: MeshPublish,
    pub delay: u32,
}

fn put_replica_meta(o: &mut BytesMut, m: &ReplicaMeta) -> Result<(), FrameError> {
    put_str16(o, m.client_id.as_bytes())?;
    o.put_u32(m.expiry);
    o.put_u8(u8::from(m.online) | u8::from(m.fresh) << 1);
    put_subscriptions(o, &m.subscriptions)?;
    match &m.will {
        None => o.put_u8(0),
        Some(w) => {
            o.put_u8(1);
            o.put_u32(w.delay);
            let inner = encode_publish(&w.publish)?;
            put_count(o, inner.len())?;
            o.put_slice(&inner);
        }
    }
    Ok(())
}

fn get_replica_meta(b: &mut Bytes) -> Result<ReplicaMeta, FrameError> {
    let client_id = get_client_id(b, "replica client id")?;
    need(b, 5, "replica header")?;
    let expiry = b.get_u32();
    let flags = b.get_u8();
    if flags > 0b11 {
        return Err(FrameError::Malformed("replica flags"));
    }
    let subscriptions = get_subscriptions(b)?;
    need(b, 1, "replica will flag")?;
    let will = match b.get_u8() {
        0 => None,
        1 => {
            need(b, 8, "replica will")?;
            let delay = b.get_u32();
            let len = b.get_u32() as usize;
            need(b, len, "replica will")?;
            let mut inner = BytesMut::from(&b.split_to(len)[..]);
            match decode(&mut inner, len) {
                Ok(Some(Frame::Publish(publish))) if inner.is_empty() => {
                    Some(MeshWill { publish, delay })
                }
                _ => return Err(FrameError::Malformed("replica will")),
            }
        }
        _ => return Err(FrameError::Malformed("replica will flag")),
    };
    Ok(ReplicaMeta {
        client_id,
        expiry,
        online: flags & 1 == 1,
        fresh: flags & 2 == 2,
        subscriptions,
        will,
    })
}

fn put_replica_acks(o: &mut BytesMut, acks: &[(String, Vec<MsgId>)]) -> Result<(), FrameError> {
    put_count(o, acks.len())?;
    for (client, ids) in acks {
        put_str16(o, client.as_bytes())?;
        put_count(o, ids.len())?;
        for id in ids {
            o.put_u64(id.origin);
            o.put_u64(id.seq);
        }
    }
    Ok(())
}

fn get_replica_acks(b: &mut Bytes) -> Result<Vec<(String, Vec<MsgId>)>, FrameError> {
    let n = get_count(b, 7, "replica acks")?;
    let mut acks = Vec::with_capacity(n);
    for _ in 0..n {
        let client = get_client_id(b, "replica acks client id")?;
        let m = get_count(b, 16, "replica acks ids")?;
        let ids = (0..m)
            .map(|_| MsgId {
                origin: b.get_u64(),
                seq: b.get_u64(),
            })
            .collect();
        acks.push((client, ids));
    }
    Ok(acks)
}

#[cfg(test)]
mod replica_tests {
    use super::*;

    fn round_trip(f: Frame) {
        let bytes = encode(&f).expect("encodes");
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(decode(&mut buf, 1 << 20), Ok(Some(f)));
        assert!(buf.is_empty());
        // every truncation is an error, never a panic
        for cut in 5..bytes.len() {
            let mut short = BytesMut::from(&bytes[..cut]);
            short[..4].copy_from_slice(&u32::try_from(cut - 4).unwrap_or(0).to_be_bytes());
            assert!(decode(&mut short, 1 << 20).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn replica_frames_round_trip_and_truncations_are_refused() {
        round_trip(Frame::ReplicaMeta(Box::new(ReplicaMeta {
            client_id: "c1".into(),
            expiry: u32::MAX,
            online: true,
            fresh: true,
            subscriptions: vec![MeshSubscription {
                filter: "a/+".into(),
                qos: 1,
                nolocal: true,
                preserve_retain: false,
            }],
            will: Some(MeshWill {
                publish: MeshPublish {
                    topic: Bytes::from_static(b"w"),
                    payload: Bytes::from_static(b"gone"),
                    qos: 1,
                    retain: true,
                    ..MeshPublish::default()
                },
                delay: 5,
            }),
        })));
        round_trip(Frame::ReplicaAcks {
            acks: vec![
                (
                    "c1".into(),
                    vec![MsgId { origin: 1, seq: 2 }, MsgId { origin: 3, seq: 4 }],
                ),
                ("c2".into(), vec![MsgId { origin: 5, seq: 6 }]),
            ],
        });
        round_trip(Frame::ReplicaClose {
            client_id: "c1".into(),
        });
        round_trip(Frame::SessionReplica {
            request: 9,
            session: Box::new(MeshSession {
                client_id: "c1".into(),
                expiry: 60,
                pending: vec![(
                    0,
                    MeshPublish {
                        topic: Bytes::from_static(b"t"),
                        payload: Bytes::from_static(b"p"),
                        qos: 1,
                        ..MeshPublish::default()
                    },
                )],
                ..MeshSession::default()
            }),
        });
    }

    #[test]
    fn a_replica_frame_that_lies_is_refused() {
        // a count of acks larger than the frame could hold
        let mut b = BytesMut::new();
        b.put_u32(1 + 4);
        b.put_u8(KIND_REPLICA_ACKS);
        b.put_u32(u32::MAX);
        assert!(decode(&mut b, 1 << 20).is_err());
        // unknown flags, an empty client id
        for (flags, id) in [(4u8, "c"), (0, "")] {
            let mut body = BytesMut::new();
            put_str16(&mut body, id.as_bytes()).expect("fits");
            body.put_u32(1);
            body.put_u8(flags);
            body.put_u32(0);
            body.put_u8(0);
            let mut b = BytesMut::new();
            b.put_u32(u32::try_from(body.len() + 1).expect("small"));
            b.put_u8(KIND_REPLICA_META);
            b.put_slice(&body);
            assert!(decode(&mut b, 1 << 20).is_err());
        }
    }
}
