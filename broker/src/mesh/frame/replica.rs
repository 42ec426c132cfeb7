//! Session replicas (issue 12; `crate::replica`): the owner of a persistent session tells
//! every peer its subscriptions and will (REPLICA_META), what its clients acknowledged
//! (REPLICA_ACKS), the packet ids of its deliveries (REPLICA_PKIDS) and when it ends
//! (REPLICA_CLOSE); a replica answers a restore with its copy (SESSION_REPLICA).
//!
//! ```text
//! REPLICA_META    := id_len:u16 client_id expiry:u32 flags:u8 (bit 0 online, bit 1 fresh)
//!                    n:u32 (filter_len:u16 filter qos:u8 options:u8)*
//!                    will:u8 (0: none; 1: then) delay:u32 len:u32 PUBLISH frame
//! REPLICA_ACKS    := n:u32 (id_len:u16 client_id m:u32 (origin:u64 seq:u64)*)*
//! REPLICA_PKIDS   := n:u32 (id_len:u16 client_id m:u32 (kind:u8 pkid:u16 [origin:u64 seq:u64])*)*
//!                    (kind 0 sent, with the message's id; 1 released; 2 completed)
//! REPLICA_CLOSE   := id_len:u16 client_id
//! SESSION_REPLICA := request:u64 (a SESSION's body after its found flag)
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::session::{get_session, get_subscriptions, put_session, put_subscriptions};
use super::{
    encode_publish, get_client_id, get_count, get_inner_publish, need, put_count, put_str16, Frame,
    FrameError, MeshPublish, MeshSession, MeshSubscription,
};

/// A QoS 1/2 message's cluster-wide id (see `crate::replica`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId {
    pub origin: u64,
    pub seq: u64,
}

/// What became of a packet id of a persistent session's deliveries (MQTT-4.4.0-1: a resumed
/// session resends with the same ids), in the order it happened on the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PkidEvent {
    /// The message `id` went out to the client under `pkid`.
    Sent { id: MsgId, pkid: u16 },
    /// The client answered `pkid` with PUBREC: the node owes it a PUBREL.
    Released(u16),
    /// The client answered the PUBREL of `pkid` with PUBCOMP: the id is free.
    Completed(u16),
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

pub(super) fn put_replica_meta(o: &mut BytesMut, m: &ReplicaMeta) -> Result<(), FrameError> {
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

pub(super) fn get_replica_meta(b: &mut Bytes) -> Result<ReplicaMeta, FrameError> {
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
            let publish = get_inner_publish(b, len).ok_or(FrameError::Malformed("replica will"))?;
            Some(MeshWill { publish, delay })
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

pub(super) fn put_replica_acks(
    o: &mut BytesMut,
    acks: &[(String, Vec<MsgId>)],
) -> Result<(), FrameError> {
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

pub(super) fn get_replica_acks(b: &mut Bytes) -> Result<Vec<(String, Vec<MsgId>)>, FrameError> {
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

pub(super) fn put_replica_pkids(
    o: &mut BytesMut,
    pkids: &[(String, Vec<PkidEvent>)],
) -> Result<(), FrameError> {
    put_count(o, pkids.len())?;
    for (client, events) in pkids {
        put_str16(o, client.as_bytes())?;
        put_count(o, events.len())?;
        for e in events {
            match e {
                PkidEvent::Sent { id, pkid } => {
                    o.put_u8(0);
                    o.put_u16(*pkid);
                    o.put_u64(id.origin);
                    o.put_u64(id.seq);
                }
                PkidEvent::Released(pkid) => {
                    o.put_u8(1);
                    o.put_u16(*pkid);
                }
                PkidEvent::Completed(pkid) => {
                    o.put_u8(2);
                    o.put_u16(*pkid);
                }
            }
        }
    }
    Ok(())
}

pub(super) fn get_replica_pkids(
    b: &mut Bytes,
) -> Result<Vec<(String, Vec<PkidEvent>)>, FrameError> {
    let n = get_count(b, 7, "replica pkids")?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let client = get_client_id(b, "replica pkids client id")?;
        let m = get_count(b, 3, "replica pkids events")?;
        let mut events = Vec::with_capacity(m);
        for _ in 0..m {
            need(b, 3, "replica pkid event")?;
            let (kind, pkid) = (b.get_u8(), b.get_u16());
            if pkid == 0 {
                return Err(FrameError::Malformed("replica pkid 0"));
            }
            events.push(match kind {
                0 => {
                    need(b, 16, "replica pkid message id")?;
                    let id = MsgId {
                        origin: b.get_u64(),
                        seq: b.get_u64(),
                    };
                    PkidEvent::Sent { id, pkid }
                }
                1 => PkidEvent::Released(pkid),
                2 => PkidEvent::Completed(pkid),
                _ => return Err(FrameError::Malformed("replica pkid event kind")),
            });
        }
        out.push((client, events));
    }
    Ok(out)
}

pub(super) fn put_session_replica(
    o: &mut BytesMut,
    request: u64,
    session: &MeshSession,
) -> Result<(), FrameError> {
    o.put_u64(request);
    put_session(o, session)
}

pub(super) fn get_session_replica(b: &mut Bytes) -> Result<Frame, FrameError> {
    need(b, 8, "session replica header")?;
    let request = b.get_u64();
    Ok(Frame::SessionReplica {
        request,
        session: Box::new(get_session(b)?),
    })
}

#[cfg(test)]
mod tests {
    use super::super::check::{assert_refused, assert_truncations_refused, framed};
    use super::super::{decode, encode, KIND_REPLICA_ACKS, KIND_REPLICA_META};
    use super::*;

    fn round_trip(f: Frame) {
        let bytes = encode(&f).expect("encodes");
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(decode(&mut buf, 1 << 20), Ok(Some(f)));
        assert!(buf.is_empty());
        // every truncation is an error, never a panic
        assert_truncations_refused(&bytes);
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
        round_trip(Frame::ReplicaPkids {
            pkids: vec![
                (
                    "c1".into(),
                    vec![
                        PkidEvent::Sent {
                            id: MsgId { origin: 1, seq: 2 },
                            pkid: 7,
                        },
                        PkidEvent::Released(7),
                        PkidEvent::Completed(7),
                    ],
                ),
                ("c2".into(), vec![PkidEvent::Released(65535)]),
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
        let mut cases = vec![(
            framed(KIND_REPLICA_ACKS, &u32::MAX.to_be_bytes()),
            FrameError::Malformed("replica acks"),
        )];
        // unknown flags, an empty client id
        for (flags, id, want) in [(4u8, "c", "replica flags"), (0, "", "replica client id")] {
            let mut body = BytesMut::new();
            put_str16(&mut body, id.as_bytes()).expect("fits");
            body.put_u32(1);
            body.put_u8(flags);
            body.put_u32(0);
            body.put_u8(0);
            cases.push((
                framed(KIND_REPLICA_META, &body),
                FrameError::Malformed(want),
            ));
        }
        let cases: Vec<(&[u8], FrameError)> =
            cases.iter().map(|(b, e)| (&b[..], e.clone())).collect();
        assert_refused(&cases);
    }
}
