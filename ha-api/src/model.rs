//! What the HA server stores and serves: members, the membership view, events. These JSON
//! shapes are the API contract with brokers and load balancers.

use serde::{Deserialize, Serialize};

/// What a broker sends to register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub id: String,
    /// MQTT 3.1.1 address.
    pub mqtt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_v5: Option<String>,
    /// Cluster-link (mesh) address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl Registration {
    /// Whether `other` serves at the same addresses (its pid may differ: a restart). The store
    /// refuses to re-point a live member to other addresses (issue 13's traffic hijack).
    pub fn same_addresses(&self, other: &Registration) -> bool {
        (&self.mqtt, &self.mqtt_v5, &self.mesh, &self.http)
            == (&other.mqtt, &other.mqtt_v5, &other.mesh, &other.http)
    }

    /// Checks a registration from the network: a valid name and parseable addresses.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "id {:?}: 1-64 characters of A-Z a-z 0-9 - _ .",
                self.id
            ));
        }
        for (key, v) in [
            ("mqtt", Some(&self.mqtt)),
            ("mqtt_v5", self.mqtt_v5.as_ref()),
            ("mesh", self.mesh.as_ref()),
            ("http", self.http.as_ref()),
        ] {
            if let Some(v) = v {
                v.parse::<std::net::SocketAddr>()
                    .map_err(|_| format!("{key}: {v:?} is not IP:PORT"))?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Up,
    Down,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Up => "up",
            MemberState::Down => "down",
        }
    }

    pub fn parse(s: &str) -> MemberState {
        if s == "up" {
            MemberState::Up
        } else {
            MemberState::Down
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    #[serde(flatten)]
    pub reg: Registration,
    pub state: MemberState,
    pub registered_ms: i64,
    pub last_seen_ms: i64,
}

/// `GET /api/cluster`: the membership and its version (increases on every change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    pub version: u64,
    /// The HA server that is primary, as far as the answering server knows.
    #[serde(default)]
    pub primary: Option<String>,
    pub members: Vec<Member>,
}

/// A membership change, kept in the event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: i64,
    pub at_ms: i64,
    pub member: String,
    /// `registered`, `up`, `down`, `removed`, `deregistered`.
    pub kind: String,
    pub version: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_are_checked() {
        let mut r = Registration {
            id: "b1".into(),
            mqtt: "127.0.0.1:1883".into(),
            mqtt_v5: None,
            mesh: Some("127.0.0.1:1884".into()),
            http: None,
            pid: Some(7),
        };
        assert!(r.validate().is_ok());
        r.mesh = Some("nowhere".into());
        assert!(r.validate().unwrap_err().starts_with("mesh"));
        r.mesh = None;
        r.id = "a/b".into();
        assert!(r.validate().is_err());
        let json = r#"{"id":"b1","mqtt":"127.0.0.1:1","evil":1}"#;
        assert!(
            serde_json::from_str::<Registration>(json).is_err(),
            "unknown fields refused"
        );
    }
}
