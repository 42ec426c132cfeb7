//! Retained messages as the HA server keeps them for a whole-cluster restart (issue 18): the
//! brokers write each one their own clients set or cleared, in batches, and a broker that
//! starts reads them all back. JSON, with the binary parts (payload, correlation data) in
//! base64, so the API stays one format.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Most entries in one page of `GET /api/retained`.
pub const MAX_PAGE: u32 = 1_000;
/// A page stops after the entry that takes its payloads past this many bytes, so a page of
/// large messages stays a few MiB.
pub const PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest body of `POST /api/retained` the HA server accepts (a broker's batch of entries
/// with their payloads, base64); a broker splits its batches well below it.
pub const MAX_BATCH_BODY: usize = 16 * 1024 * 1024;

/// One retained message, or (empty payload) the clearing of one: MQTT-3.3.1-6/7, an empty
/// retained PUBLISH removes the topic's retained message. The store keeps a clearing as a
/// tombstone with its time, so a set from another broker that was older but arrives later does
/// not bring the message back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetainedEntry {
    pub topic: String,
    #[serde(with = "b64", default, skip_serializing_if = "Vec::is_empty")]
    pub payload: Vec<u8>,
    /// The QoS it was published with: a subscriber gets it at the minimum of that and its own.
    pub qos: u8,
    /// When the broker took it (Unix ms, never going back on that broker): of two writes of
    /// one topic, the later one wins whatever order they reach the database in.
    pub at_ms: i64,
    /// MQTT 5 properties, as published.
    #[serde(default, skip_serializing_if = "RetainedProps::is_empty")]
    pub props: RetainedProps,
}

impl RetainedEntry {
    /// Whether this clears the topic's retained message.
    pub fn is_clear(&self) -> bool {
        self.payload.is_empty()
    }

    /// Checks an entry from the network.
    pub fn validate(&self) -> Result<(), String> {
        if self.topic.is_empty() || self.topic.contains(['+', '#']) || self.topic.contains('\0') {
            return Err(format!("topic {:?}: not a topic name", self.topic));
        }
        if self.qos > 2 {
            return Err(format!("topic {:?}: QoS {}", self.topic, self.qos));
        }
        Ok(())
    }

    /// Bytes this entry takes, roughly (what batches and pages are bounded by).
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len() + self.props.size() + 32
    }
}

/// The MQTT 5 properties a retained message keeps (those a PUBLISH carries to subscribers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetainedProps {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_format_indicator: Option<u8>,
    /// As published: the reader takes off the time since `at_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_expiry_interval: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    #[serde(with = "b64_opt", default, skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_properties: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

impl RetainedProps {
    pub fn is_empty(&self) -> bool {
        *self == RetainedProps::default()
    }

    fn size(&self) -> usize {
        self.response_topic.as_ref().map_or(0, String::len)
            + self.correlation_data.as_ref().map_or(0, Vec::len)
            + self.content_type.as_ref().map_or(0, String::len)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// `POST /api/retained`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetainedBatch {
    pub entries: Vec<RetainedEntry>,
}

/// `GET /api/retained?after=…`: retained messages (never clearings) by topic, from the one
/// after `after`; `next` is where the following page starts (`None`: this was the last).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedPage {
    pub entries: Vec<RetainedEntry>,
    #[serde(default)]
    pub next: Option<String>,
}

/// A topic as the `after` query parameter: base64url, since a topic may hold any character.
pub fn encode_after(topic: &str) -> String {
    URL_SAFE_NO_PAD.encode(topic)
}

/// The other way; `None` if it is not a base64url UTF-8 string.
pub fn decode_after(text: &str) -> Option<String> {
    String::from_utf8(URL_SAFE_NO_PAD.decode(text).ok()?).ok()
}

pub(crate) mod b64 {
    use super::*;

    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

mod b64_opt {
    use super::*;

    pub fn serialize<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&STANDARD.encode(v)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => STANDARD
                .decode(text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_with_binary_parts() {
        let e = RetainedEntry {
            topic: "a/b".into(),
            payload: vec![0, 255, 10],
            qos: 1,
            at_ms: 7,
            props: RetainedProps {
                correlation_data: Some(vec![1, 2]),
                user_properties: vec![("k".into(), "v".into())],
                message_expiry_interval: Some(60),
                ..RetainedProps::default()
            },
        };
        let json = serde_json::to_string(&e).expect("serializes");
        assert!(json.contains("\"AP8K\""), "{json}");
        let back: RetainedEntry = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, e);
        let clear = RetainedEntry {
            payload: Vec::new(),
            props: RetainedProps::default(),
            ..e
        };
        let json = serde_json::to_string(&clear).expect("serializes");
        assert_eq!(json, r#"{"topic":"a/b","qos":1,"at_ms":7}"#);
        assert!(serde_json::from_str::<RetainedEntry>(&json)
            .expect("parses")
            .is_clear());
    }

    #[test]
    fn entries_are_checked() {
        let mut e = RetainedEntry {
            topic: "a/+".into(),
            payload: vec![1],
            qos: 0,
            at_ms: 0,
            props: RetainedProps::default(),
        };
        assert!(e.validate().is_err());
        e.topic = "a/b".into();
        assert!(e.validate().is_ok());
        e.qos = 3;
        assert!(e.validate().is_err());
    }

    #[test]
    fn after_round_trips_any_topic() {
        for t in ["a/b", "x&y=z #?", "ü/€"] {
            assert_eq!(decode_after(&encode_after(t)).as_deref(), Some(t));
        }
        assert_eq!(decode_after("!!"), None);
    }
}
