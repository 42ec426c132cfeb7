//! A persistent session's queued messages between the shape the cluster holds them in (a
//! [`MeshSession`]: the owner's router export, a replica's copy) and the rows the HA servers
//! keep ([`QueuedEntry`], see `mqlb_ha_api::queued`). Pure: the caller gives the times.
//!
//! A message is keyed by its cluster-wide tag (`crate::replica::Tag`), so the copies several
//! nodes write of one session are one row each. A message without a tag (published while the
//! node had no peers) gets an id of the writer's own (`fresh`): only its owner holds it, so it
//! is written once anyway. Read back, every message carries its id as a tag again, so the
//! client's acknowledgements name it and a restore merges it with the replicas' copies.

use bytes::Bytes;
use mqlb_ha_api::queued::{QueuedEntry, QueuedMessage};
use mqlb_ha_api::retained::RetainedProps;

use crate::mesh::frame::{MeshPublish, MeshSession, MsgId};
use crate::replica::{Tag, TAG_KEY};

/// `session`'s queue as written at `at_ms`; `replace`: the writer is its owner (see
/// [`QueuedEntry::replace`]). `None` when there is nothing to keep.
pub(crate) fn entry_of(
    session: MeshSession,
    at_ms: i64,
    replace: bool,
    mut fresh: impl FnMut() -> MsgId,
) -> Option<QueuedEntry> {
    if session.pending.is_empty() && session.pubrels.is_empty() && !replace {
        return None;
    }
    let messages = session
        .pending
        .into_iter()
        .filter(|(_, p)| (1..=2).contains(&p.qos))
        .map(|(pkid, mut p)| {
            let id = Tag::take(&mut p.user_properties).map_or_else(&mut fresh, |t| t.id);
            QueuedMessage {
                origin: id.origin,
                seq: id.seq,
                pkid,
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
                qos: p.qos,
                retain: p.retain,
                props: RetainedProps {
                    payload_format_indicator: p.payload_format_indicator,
                    message_expiry_interval: p.message_expiry_interval,
                    response_topic: p.response_topic,
                    correlation_data: p.correlation_data.map(|c| c.to_vec()),
                    user_properties: p.user_properties,
                    content_type: p.content_type,
                },
            }
        })
        .collect();
    Some(QueuedEntry {
        client_id: session.client_id,
        at_ms,
        replace,
        messages,
        acked: Vec::new(),
        last_pkid: session.last_pkid,
        pubrels: session.pubrels,
    })
}

/// The stored queue as a copy of the session to restore at `now_ms` (no subscriptions, no
/// expiry of its own: the replica has those), each message tagged with its id, in id order;
/// a message whose expiry interval ran out since it was written is left out (MQTT-3.3.2-5).
/// Also the ids, for the acknowledgements to delete.
pub(crate) fn session_of(entry: QueuedEntry, now_ms: i64) -> (MeshSession, Vec<MsgId>) {
    let waited =
        u32::try_from(now_ms.saturating_sub(entry.at_ms).max(0) / 1000).unwrap_or(u32::MAX);
    let mut ids = Vec::with_capacity(entry.messages.len());
    let mut pending = Vec::with_capacity(entry.messages.len());
    for m in entry.messages {
        let expiry = match m.props.message_expiry_interval {
            None => None,
            Some(i) => match i.checked_sub(waited).filter(|r| *r > 0) {
                Some(left) => Some(left),
                None => continue,
            },
        };
        let id = MsgId {
            origin: m.origin,
            seq: m.seq,
        };
        let mut user_properties = m.props.user_properties;
        user_properties.push((TAG_KEY.to_owned(), Tag { id, publisher: 0 }.value()));
        ids.push(id);
        pending.push((
            m.pkid,
            MeshPublish {
                topic: Bytes::from(m.topic),
                payload: Bytes::from(m.payload),
                retain: m.retain,
                qos: m.qos.clamp(1, 2),
                payload_format_indicator: m.props.payload_format_indicator,
                message_expiry_interval: expiry,
                response_topic: m.props.response_topic,
                correlation_data: m.props.correlation_data.map(Bytes::from),
                user_properties,
                content_type: m.props.content_type,
            },
        ));
    }
    let session = MeshSession {
        client_id: entry.client_id,
        expiry: 0,
        last_pkid: entry.last_pkid,
        dropped: 0,
        subscriptions: Vec::new(),
        pubrels: entry.pubrels,
        pending,
    };
    (session, ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &'static str, qos: u8, tag: Option<MsgId>) -> MeshPublish {
        let mut user_properties = vec![("k".to_string(), "v".to_string())];
        if let Some(id) = tag {
            user_properties.push((TAG_KEY.into(), Tag { id, publisher: 5 }.value()));
        }
        MeshPublish {
            topic: Bytes::from_static(topic.as_bytes()),
            payload: Bytes::from_static(b"p"),
            qos,
            message_expiry_interval: Some(60),
            user_properties,
            ..MeshPublish::default()
        }
    }

    #[test]
    fn a_queue_is_written_by_its_tags_and_read_back_tagged() {
        let id = MsgId { origin: 3, seq: 9 };
        let session = MeshSession {
            client_id: "c".into(),
            expiry: 100,
            last_pkid: 7,
            dropped: 0,
            subscriptions: Vec::new(),
            pubrels: vec![6],
            pending: vec![
                (7, publish("a/1", 2, Some(id))),
                (0, publish("a/2", 1, None)),
            ],
        };
        let own = MsgId { origin: 1, seq: 1 };
        let e = entry_of(session, 1_000, true, || own).expect("something to keep");
        let ids: Vec<(u64, u64, u16)> = e
            .messages
            .iter()
            .map(|m| (m.origin, m.seq, m.pkid))
            .collect();
        assert_eq!(
            ids,
            [(3, 9, 7), (1, 1, 0)],
            "the untagged one gets an id of its own"
        );
        assert_eq!(
            e.messages[0].props.user_properties,
            [("k".into(), "v".into())],
            "no tag stored"
        );
        assert_eq!(
            (e.last_pkid, e.pubrels.as_slice(), e.replace),
            (7, &[6u16][..], true)
        );
        let (back, ids) = session_of(e, 21_500);
        assert_eq!(ids, [id, own]);
        assert_eq!(back.pending[0].0, 7, "sent under its packet id");
        let p = &back.pending[0].1;
        assert_eq!((p.qos, &p.topic[..]), (2, &b"a/1"[..]));
        assert_eq!(Tag::find(&p.user_properties).map(|t| t.id), Some(id));
        assert_eq!(p.message_expiry_interval, Some(40), "20 s of 60 gone");
        assert_eq!((back.last_pkid, back.pubrels.as_slice()), (7, &[6u16][..]));
    }

    #[test]
    fn nothing_to_keep_is_no_entry_and_expired_messages_are_not_restored() {
        let empty = MeshSession {
            client_id: "c".into(),
            ..MeshSession::default()
        };
        assert!(entry_of(empty.clone(), 0, false, || MsgId { origin: 0, seq: 0 }).is_none());
        assert!(
            entry_of(empty, 0, true, || MsgId { origin: 0, seq: 0 }).is_some(),
            "an owner's empty queue replaces"
        );
        let s = MeshSession {
            client_id: "c".into(),
            pending: vec![(0, publish("a", 1, Some(MsgId { origin: 1, seq: 2 })))],
            ..MeshSession::default()
        };
        let e = entry_of(s, 0, false, || MsgId { origin: 0, seq: 0 }).expect("one message");
        let (back, ids) = session_of(e, 61_000);
        assert!(
            back.pending.is_empty() && ids.is_empty(),
            "its 60 s ran out"
        );
    }
}
