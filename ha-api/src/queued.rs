//! Persistent sessions' queued QoS 1/2 messages as the HA server keeps them for a
//! whole-cluster restart (issue 18). At a clean stop every node writes what it holds of each
//! session: the owner the messages its router has for it (with the packet ids they went out
//! under), each replica holder its copy. They overlap, so a message is one row per client ID
//! and cluster-wide message id (`origin`, `seq`: the tag the replicas already key by), written
//! once whoever writes it. A node that restores a session the database held (after the whole
//! cluster restarted) reads its rows and writes them back under its own time; the client's
//! acknowledgements then delete them one by one. A session's end, or its client connecting
//! again, deletes the rows written before (see `SessionEntry`).

use serde::{Deserialize, Serialize};

use crate::retained::RetainedProps;

/// One message of a session's queue, as the subscription delivers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuedMessage {
    /// The message's cluster-wide id (the node it entered by and its number there).
    pub origin: u64,
    pub seq: u64,
    /// The packet id it went out under and was not acknowledged with; 0: not sent yet.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pkid: u16,
    pub topic: String,
    #[serde(with = "crate::retained::b64", default)]
    pub payload: Vec<u8>,
    /// 1 or 2: what the subscription delivers it with.
    pub qos: u8,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retain: bool,
    /// MQTT 5 properties; the expiry interval as it was left at `at_ms` of its entry.
    #[serde(default, skip_serializing_if = "RetainedProps::is_empty")]
    pub props: RetainedProps,
}

fn is_zero(v: &u16) -> bool {
    *v == 0
}

/// What one node writes of one session's queue: messages to keep (added to what the store
/// holds, once per id), and ids to forget (the client acknowledged them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuedEntry {
    pub client_id: String,
    /// When its node took it (Unix ms, never going back on that node).
    pub at_ms: i64,
    /// The writer is the session's owner and has all of it: the rows written before
    /// `at_ms` are replaced by these (a replica's older copy may hold acknowledged ones).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<QueuedMessage>,
    /// `(origin, seq)` of messages the client acknowledged: their rows go.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acked: Vec<(u64, u64)>,
    /// The last packet id the session's owner used, and the ids whose PUBREL it owes
    /// (MQTT-4.4.0-1), as far as the writer knows.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub last_pkid: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pubrels: Vec<u16>,
}

impl QueuedEntry {
    /// Checks an entry from the network.
    pub fn validate(&self) -> Result<(), String> {
        if self.client_id.is_empty() || self.client_id.len() > 65_535 {
            return Err(format!("client ID {:?}: 1-65535 bytes", self.client_id));
        }
        for m in &self.messages {
            if m.topic.is_empty() || m.topic.contains(['+', '#', '\0']) {
                return Err(format!(
                    "client ID {:?}: topic {:?} is not a topic name",
                    self.client_id, m.topic
                ));
            }
            if !(1..=2).contains(&m.qos) {
                return Err(format!(
                    "client ID {:?}: a queued message of QoS {}",
                    self.client_id, m.qos
                ));
            }
        }
        Ok(())
    }

    /// Bytes it takes, roughly (what batches are bounded by).
    pub fn size(&self) -> usize {
        self.client_id.len()
            + self
                .messages
                .iter()
                .map(|m| m.topic.len() + m.payload.len() + 48)
                .sum::<usize>()
            + self.acked.len() * 16
            + self.pubrels.len() * 2
            + 48
    }
}

/// `POST /api/queued`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuedBatch {
    pub entries: Vec<QueuedEntry>,
}

/// `GET /api/queued?client=…` (the client ID base64url): what the store holds of one
/// session's queue, messages by id, as one entry (`at_ms`: the latest write's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedPage {
    #[serde(default)]
    pub entry: Option<QueuedEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_are_checked() {
        let e = QueuedEntry {
            client_id: "c1".into(),
            at_ms: 5,
            replace: true,
            messages: vec![QueuedMessage {
                origin: u64::MAX,
                seq: 7,
                pkid: 3,
                topic: "a/b".into(),
                payload: vec![0, 1],
                qos: 2,
                retain: false,
                props: RetainedProps::default(),
            }],
            acked: vec![(1, 2)],
            last_pkid: 3,
            pubrels: vec![9],
        };
        let json = serde_json::to_string(&e).expect("serializes");
        assert_eq!(
            serde_json::from_str::<QueuedEntry>(&json).expect("parses"),
            e
        );
        assert!(e.validate().is_ok());
        let mut bad = e.clone();
        bad.messages[0].qos = 0;
        assert!(bad.validate().is_err(), "QoS 0 is never queued");
        let mut bad = e;
        bad.messages[0].topic = "a/#".into();
        assert!(bad.validate().is_err());
    }
}
