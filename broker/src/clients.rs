//! The node's client connections as `/api/clients` lists them: each accepted connection's
//! client ID, the listener it came in on and its address, which is the one a trusted PROXY
//! header claimed when the LB in front sends one (issue 15), so the listing shows the devices,
//! not the LB. Filled by the connection's codec ([`crate::tap`]) at its successful CONNACK,
//! emptied when the connection ends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// One connection, as listed.
#[derive(Debug, Clone)]
struct Client {
    client_id: String,
    listener: &'static str,
    peer: Option<SocketAddr>,
    since_ms: u64,
}

/// Open connections by the mesh's registration number (one per accepted CONNECT).
#[derive(Default)]
pub(crate) struct Clients {
    open: Mutex<BTreeMap<u64, Client>>,
}

impl Clients {
    fn open(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Client>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn connected(
        &self,
        registration: u64,
        client_id: &str,
        listener: &'static str,
        peer: Option<SocketAddr>,
    ) {
        let since_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.open().insert(
            registration,
            Client {
                client_id: client_id.to_string(),
                listener,
                peer,
                since_ms,
            },
        );
    }

    pub(crate) fn gone(&self, registration: u64) {
        self.open().remove(&registration);
    }

    /// `{"clients": [{"client_id", "listener", "peer", "since_ms"}, ...]}`, oldest first.
    pub(crate) fn json(&self) -> serde_json::Value {
        let list: Vec<_> = self
            .open()
            .values()
            .map(|c| {
                serde_json::json!({
                    "client_id": c.client_id,
                    "listener": c.listener,
                    "peer": c.peer.map(|p| p.to_string()),
                    "since_ms": c.since_ms,
                })
            })
            .collect();
        serde_json::json!({ "clients": list })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_listed_until_it_is_gone() {
        let c = Clients::default();
        c.connected(
            7,
            "dev-1",
            "mqtts",
            Some("198.51.100.7:4000".parse().expect("addr")),
        );
        c.connected(8, "dev-2", "mqtt", None);
        let j = c.json();
        assert_eq!(j["clients"][0]["client_id"], "dev-1");
        assert_eq!(j["clients"][0]["peer"], "198.51.100.7:4000");
        assert_eq!(j["clients"][0]["listener"], "mqtts");
        assert_eq!(j["clients"][1]["peer"], serde_json::Value::Null);
        c.gone(7);
        assert_eq!(c.json()["clients"].as_array().map(Vec::len), Some(1));
    }
}
