//! The node-to-node wire format. Pure: encode and decode, no I/O, so every malformed input is
//! testable without sockets.
//!
//! ```text
//! frame   := len:u32 (bytes after it) kind:u8 body
//! ```
//!
//! This file holds what every frame shares: the [`Frame`] enum, [`FrameError`], the
//! [`encode`] / [`decode`] dispatch on the kind, and the put/get helpers of the bodies. Each
//! family of frames has its file, with its layouts, its codec and its tests:
//! - `handshake`: HELLO, AUTH, how a link starts;
//! - `publish`: PUBLISH (a message, its expiry rewritten as it waits), SEQUENCED and ACK (its
//!   acknowledged delivery);
//! - `session`: CONNECTED, SESSION_REQUEST, SESSION (a client and its session across nodes);
//! - `share`: SHARE_GROUPS (shared subscriptions across the cluster);
//! - `replica`: REPLICA_META, REPLICA_ACKS, REPLICA_PKIDS, REPLICA_CLOSE, SESSION_REPLICA
//!   (session replicas).

use bytes::{Buf, BufMut, Bytes, BytesMut};

#[cfg(test)]
mod check;
mod handshake;
mod publish;
mod replica;
mod session;
mod share;

pub use handshake::{MAC_LEN, MAGIC, NONCE_LEN};
pub use publish::{
    encode_publish, encode_publish_expiry_at, sequenced_header, with_expiry, MeshPublish,
    SEQUENCED_HEADER,
};
pub use replica::{MeshWill, MsgId, PkidEvent, ReplicaMeta};
pub use session::{MeshSession, MeshSubscription};
pub use share::{valid_share_group, MAX_SHARE_GROUPS, MAX_SHARE_GROUPS_BYTES, MAX_SHARE_GROUP_LEN};

/// Bumped when the format changes; a peer with another version is refused at HELLO.
/// 2: the CONNECTED frame (a version 1 node would close the link on it).
/// 3: SEQUENCED and ACK (issue 12): the receiver writes ACKs back on the link, which a
/// version 2 sender takes for a broken link.
/// 4: SHARE_GROUPS (issue 12), sent on every link as it comes up: a version 3 node would
/// close the link on it.
/// 6: session replicas (issue 12): REPLICA_META, REPLICA_ACKS, REPLICA_CLOSE, SESSION_REPLICA.
/// 7: REPLICA_PKIDS (issue 12): a version 6 node would close the link on it.
pub const VERSION: u8 = 7;

// The frame kinds, in one table so that no two families take the same number; each family
// has a range of its own.
const KIND_HELLO: u8 = 1;
const KIND_AUTH: u8 = 2;
const KIND_PUBLISH: u8 = 3;
const KIND_CONNECTED: u8 = 4;
// Acknowledged delivery (issue 12): kinds 16 and up.
const KIND_SEQUENCED: u8 = 16;
const KIND_ACK: u8 = 17;
// Sessions across the cluster (issue 12): kinds 32 and up.
const KIND_SESSION_REQUEST: u8 = 32;
const KIND_SESSION: u8 = 33;
// Shared subscriptions across the cluster (issue 12): kinds 48 and up.
const KIND_SHARE_GROUPS: u8 = 48;
// Session replicas (issue 12): kinds 64 and up.
const KIND_REPLICA_META: u8 = 64;
const KIND_REPLICA_ACKS: u8 = 65;
const KIND_REPLICA_CLOSE: u8 = 66;
const KIND_SESSION_REPLICA: u8 = 67;
const KIND_REPLICA_PKIDS: u8 = 68;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    // Sessions across the cluster (issue 12; see `crate::session`, layouts in `session.rs`).
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
    // Session replicas (issue 12; `crate::replica`, layouts in `replica.rs`).
    /// The sender owns this persistent session: a replica is made or updated.
    ReplicaMeta(Box<ReplicaMeta>),
    /// The sender's clients acknowledged these messages: their replicas forget them.
    ReplicaAcks {
        acks: Vec<(String, Vec<MsgId>)>,
    },
    /// What became of the packet ids of the sender's clients' deliveries: a restored session
    /// resends under the same ids.
    ReplicaPkids {
        pkids: Vec<(String, Vec<PkidEvent>)>,
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

pub fn encode(f: &Frame) -> Result<Bytes, FrameError> {
    match f {
        Frame::SessionRequest { request, client_id } => frame(KIND_SESSION_REQUEST, |o| {
            session::put_session_request(o, *request, client_id)
        }),
        Frame::Session { request, session } => frame(KIND_SESSION, |o| {
            session::put_session_answer(o, *request, session.as_deref())
        }),
        Frame::Hello {
            version,
            node_id,
            nonce,
        } => frame(KIND_HELLO, |o| {
            handshake::put_hello(o, *version, node_id, nonce)
        }),
        Frame::Auth { mac } => frame(KIND_AUTH, |o| handshake::put_auth(o, mac)),
        Frame::Publish(p) => encode_publish(p),
        Frame::Connected {
            client_id,
            clean_start,
            at,
        } => frame(KIND_CONNECTED, |o| {
            session::put_connected(o, client_id, *clean_start, *at)
        }),
        Frame::Sequenced { epoch, seq, inner } => publish::encode_sequenced(*epoch, *seq, inner),
        Frame::Ack { epoch, seq } => frame(KIND_ACK, |o| publish::put_ack(o, *epoch, *seq)),
        Frame::ShareGroups { groups } => {
            frame(KIND_SHARE_GROUPS, |o| share::put_share_groups(o, groups))
        }
        Frame::ReplicaMeta(m) => frame(KIND_REPLICA_META, |o| replica::put_replica_meta(o, m)),
        Frame::ReplicaAcks { acks } => {
            frame(KIND_REPLICA_ACKS, |o| replica::put_replica_acks(o, acks))
        }
        Frame::ReplicaPkids { pkids } => {
            frame(KIND_REPLICA_PKIDS, |o| replica::put_replica_pkids(o, pkids))
        }
        Frame::ReplicaClose { client_id } => {
            frame(KIND_REPLICA_CLOSE, |o| put_str16(o, client_id.as_bytes()))
        }
        Frame::SessionReplica { request, session } => frame(KIND_SESSION_REPLICA, |o| {
            replica::put_session_replica(o, *request, session)
        }),
    }
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
        KIND_SESSION_REQUEST => session::get_session_request(&mut b)?,
        KIND_SESSION => session::get_session_answer(&mut b)?,
        KIND_HELLO => handshake::get_hello(&mut b)?,
        KIND_AUTH => handshake::get_auth(&mut b)?,
        // A PUBLISH's payload and a SEQUENCED's frame run to the end: nothing can trail them.
        KIND_PUBLISH => return publish::decode_publish(b).map(|p| Some(Frame::Publish(p))),
        KIND_CONNECTED => session::get_connected(&mut b)?,
        KIND_SEQUENCED => return publish::decode_sequenced(b).map(Some),
        KIND_ACK => publish::get_ack(&mut b)?,
        KIND_SHARE_GROUPS => Frame::ShareGroups {
            groups: share::get_share_groups(&mut b)?,
        },
        KIND_REPLICA_META => Frame::ReplicaMeta(Box::new(replica::get_replica_meta(&mut b)?)),
        KIND_REPLICA_ACKS => Frame::ReplicaAcks {
            acks: replica::get_replica_acks(&mut b)?,
        },
        KIND_REPLICA_PKIDS => Frame::ReplicaPkids {
            pkids: replica::get_replica_pkids(&mut b)?,
        },
        KIND_REPLICA_CLOSE => Frame::ReplicaClose {
            client_id: get_client_id(&mut b, "replica close client id")?,
        },
        KIND_SESSION_REPLICA => replica::get_session_replica(&mut b)?,
        other => return Err(FrameError::UnknownKind(other)),
    };
    if b.has_remaining() {
        return Err(FrameError::Malformed("trailing bytes"));
    }
    Ok(Some(f))
}

/// A frame of `kind` whose body `body` writes, its length in front.
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

// The helpers every family's codec uses. A decoder checks with `need` before each read, so a
// short or lying body is an error, never a panic.

fn put_str16(out: &mut BytesMut, s: &[u8]) -> Result<(), FrameError> {
    let len =
        u16::try_from(s.len()).map_err(|_| FrameError::Malformed("string over 65535 bytes"))?;
    out.put_u16(len);
    out.put_slice(s);
    Ok(())
}

fn put_count(o: &mut BytesMut, n: usize) -> Result<(), FrameError> {
    o.put_u32(u32::try_from(n).map_err(|_| FrameError::Malformed("count over 4 G"))?);
    Ok(())
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

/// A client ID that is not empty.
fn get_client_id(b: &mut Bytes, what: &'static str) -> Result<String, FrameError> {
    let id = get_string16(b, what)?;
    if id.is_empty() {
        return Err(FrameError::Malformed(what));
    }
    Ok(id)
}

/// A whole PUBLISH frame inside another frame's body (a session's pending message, a will),
/// `len` bytes long, and nothing after it.
fn get_inner_publish(b: &mut Bytes, len: usize) -> Option<MeshPublish> {
    let mut inner = BytesMut::from(&b.split_to(len)[..]);
    match decode(&mut inner, len) {
        Ok(Some(Frame::Publish(p))) if inner.is_empty() => Some(p),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::check::{assert_refused, assert_round_trip_byte_by_byte, full};
    use super::*;

    #[test]
    fn every_frame_round_trips_even_byte_by_byte() {
        assert_round_trip_byte_by_byte(&[
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
        ]);
    }

    /// What no kind of frame may be: too large, empty, of an unknown kind, longer than its
    /// body. (Each family's own defects are tested beside its codec.)
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
        let mut auth = encode(&Frame::Auth { mac: [1; MAC_LEN] })
            .expect("encodes")
            .to_vec();
        auth[3] += 1; // claims one more byte than a MAC
        auth.push(0);
        assert_refused(&[
            (b"\x00\x00\x00\x00", FrameError::Malformed("empty frame")),
            (b"\x00\x00\x00\x01\x09", FrameError::UnknownKind(9)),
            (&auth, FrameError::Malformed("trailing bytes")),
        ]);
    }

    /// Whatever a peer (or anyone who reaches the mesh port before authenticating) sends, the
    /// decoder returns a frame, asks for more, or refuses: it never panics and never returns a
    /// frame without consuming bytes.
    mod arbitrary_input {
        use super::super::check::{decode_all, decode_damaged};
        use super::*;
        use proptest::prelude::*;

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
                decode_damaged(&frame, at, byte, cut);
            }
        }
    }
}
