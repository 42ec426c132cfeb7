//! Persistent sessions' subscriptions as the HA server keeps them for a whole-cluster restart
//! (issue 18): the node that owns a session writes what it becomes (its expiry and
//! subscriptions; its queued messages go to [`crate::queued`]) or that it ended, and a
//! starting node reads them all back and holds them as replicas, so a client reconnecting gets
//! Session Present 1 and its subscriptions without a SUBSCRIBE.

use serde::{Deserialize, Serialize};

/// One session as its owner last described it, or (`session: None`) its end. The store keeps
/// the latest of each client ID by `at_ms`, and an end as a tombstone, as for retained messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionEntry {
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<StoredSession>,
    /// When its node took it (Unix ms, never going back on that node).
    pub at_ms: i64,
    /// Its client connected (the session is live in a router again, its messages with it): the
    /// store drops what it kept of the session's queue before `at_ms` ([`crate::queued`]), as
    /// it does at an end. Not kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub connected: bool,
}

impl SessionEntry {
    pub fn validate(&self) -> Result<(), String> {
        if self.client_id.is_empty() || self.client_id.len() > 65_535 {
            return Err(format!("client ID {:?}: 1-65535 bytes", self.client_id));
        }
        Ok(())
    }

    pub fn size(&self) -> usize {
        self.client_id.len()
            + self.session.as_ref().map_or(0, |s| {
                s.subscriptions
                    .iter()
                    .map(|f| f.filter.len() + 16)
                    .sum::<usize>()
            })
            + 32
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredSession {
    /// Session Expiry Interval, seconds (`u32::MAX`: never, 3.1.1's clean session 0).
    pub expiry: u32,
    #[serde(default)]
    pub subscriptions: Vec<StoredSubscription>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredSubscription {
    pub filter: String,
    pub qos: u8,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nolocal: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preserve_retain: bool,
}

/// `POST /api/sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionBatch {
    pub entries: Vec<SessionEntry>,
}

/// `GET /api/sessions?after=…`: sessions (never ends) by client ID after `after`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPage {
    pub entries: Vec<SessionEntry>,
    #[serde(default)]
    pub next: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_round_trip_and_ends_are_bare() {
        let e = SessionEntry {
            client_id: "c1".into(),
            session: Some(StoredSession {
                expiry: u32::MAX,
                subscriptions: vec![StoredSubscription {
                    filter: "a/#".into(),
                    qos: 1,
                    nolocal: true,
                    preserve_retain: false,
                }],
            }),
            at_ms: 5,
            connected: false,
        };
        let json = serde_json::to_string(&e).expect("serializes");
        assert_eq!(
            serde_json::from_str::<SessionEntry>(&json).expect("parses"),
            e
        );
        let end = SessionEntry { session: None, ..e };
        assert_eq!(
            serde_json::to_string(&end).expect("serializes"),
            r#"{"client_id":"c1","at_ms":5}"#
        );
    }
}
