//! A client across the cluster (issue 12): CONNECTED (a client connected here: its will and
//! an older connection elsewhere end), and SESSION_REQUEST / SESSION (its persistent session
//! moves to the node it reconnects to; see `crate::session`).
//!
//! ```text
//! CONNECTED := flags:u8 (bit 0 clean start) id_len:u16 client_id at:u64
//! SESSION_REQUEST := request:u64 id_len:u16 client_id
//! SESSION := request:u64 found:u8 (0: no session; 1: then)
//!            id_len:u16 client_id expiry:u32 last_pkid:u16 dropped:u32
//!            n:u32 (filter_len:u16 filter qos:u8 options:u8 (bit 0 no local, bit 1 retain as
//!                   published))*
//!            n:u32 (pkid:u16)*                    PUBRELs to send again
//!            n:u32 (pkid:u16 len:u32 PUBLISH frame)*   pending messages, oldest first
//! ```
//!
//! The session is plain data (no node's log positions), so a replica can keep one as it is.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{
    encode_publish, get_client_id, get_count, get_inner_publish, get_string16, need, put_count,
    put_str16, Frame, FrameError, MeshPublish,
};

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

pub(super) fn put_connected(
    o: &mut BytesMut,
    client_id: &str,
    clean_start: bool,
    at: u64,
) -> Result<(), FrameError> {
    o.put_u8(u8::from(clean_start));
    put_str16(o, client_id.as_bytes())?;
    o.put_u64(at);
    Ok(())
}

pub(super) fn get_connected(b: &mut Bytes) -> Result<Frame, FrameError> {
    need(b, 1, "connected flags")?;
    let clean_start = b.get_u8() & 1 == 1;
    let client_id = get_string16(b, "connected client id")?;
    need(b, 8, "connected time")?;
    let at = b.get_u64();
    Ok(Frame::Connected {
        client_id,
        clean_start,
        at,
    })
}

pub(super) fn put_session_request(
    o: &mut BytesMut,
    request: u64,
    client_id: &str,
) -> Result<(), FrameError> {
    o.put_u64(request);
    put_str16(o, client_id.as_bytes())
}

pub(super) fn get_session_request(b: &mut Bytes) -> Result<Frame, FrameError> {
    need(b, 8, "session request")?;
    let request = b.get_u64();
    let client_id = get_string16(b, "session request client id")?;
    if client_id.is_empty() {
        return Err(FrameError::Malformed("session request client id"));
    }
    Ok(Frame::SessionRequest { request, client_id })
}

/// The body of a SESSION frame: the answer to `request`, with the session or without.
pub(super) fn put_session_answer(
    o: &mut BytesMut,
    request: u64,
    session: Option<&MeshSession>,
) -> Result<(), FrameError> {
    o.put_u64(request);
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
}

pub(super) fn get_session_answer(b: &mut Bytes) -> Result<Frame, FrameError> {
    need(b, 9, "session header")?;
    let request = b.get_u64();
    let session = match b.get_u8() {
        0 => None,
        1 => Some(Box::new(get_session(b)?)),
        _ => return Err(FrameError::Malformed("session flag")),
    };
    Ok(Frame::Session { request, session })
}

/// A session, from its client ID on (also the body of a SESSION_REPLICA after its request).
pub(super) fn put_session(o: &mut BytesMut, s: &MeshSession) -> Result<(), FrameError> {
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

pub(super) fn get_session(b: &mut Bytes) -> Result<MeshSession, FrameError> {
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
        let m = get_inner_publish(b, len)
            .filter(|m| m.qos > 0)
            .ok_or(FrameError::Malformed("session pending message"))?;
        s.pending.push((pkid, m));
    }
    Ok(s)
}

/// A session's subscriptions (also a replica's, see `replica`).
pub(super) fn put_subscriptions(
    o: &mut BytesMut,
    subs: &[MeshSubscription],
) -> Result<(), FrameError> {
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

pub(super) fn get_subscriptions(b: &mut Bytes) -> Result<Vec<MeshSubscription>, FrameError> {
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

/// Sessions across the cluster (issue 12): the CONNECTED, SESSION_REQUEST and SESSION frames.
#[cfg(test)]
mod tests {
    use super::super::check::{assert_refused, assert_round_trip_byte_by_byte, decode_damaged};
    use super::super::{encode, encode_publish};
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
        assert_round_trip_byte_by_byte(&frames());
    }

    #[test]
    fn bad_connected_frames_are_refused() {
        assert_refused(&[
            (
                b"\x00\x00\x00\x01\x04",
                FrameError::Malformed("connected flags"),
            ),
            (
                b"\x00\x00\x00\x05\x04\x01\x00\x03a",
                FrameError::Malformed("connected client id"),
            ),
        ]);
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
        let mut qos0_pending = wire.to_vec();
        assert_eq!(qos0_pending[start + 5], 0b010, "the inner publish flags");
        qos0_pending[start + 5] = 0; // QoS 0
        assert_refused(&[
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
            (
                &qos0_pending[..],
                FrameError::Malformed("session pending message"),
            ),
        ]);
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
                decode_damaged(&frames()[which], at, byte, cut);
            }
        }
    }
}
