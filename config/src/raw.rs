//! The file as written: serde structs with `deny_unknown_fields`, values still as text.
//!
//! Keeping durations, addresses and enums as strings here lets validation report *every*
//! problem with its key, instead of serde stopping at the first.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub lb: RawLb,
    #[serde(default, rename = "frontend")]
    pub frontends: Vec<RawFrontend>,
    #[serde(default, rename = "pool")]
    pub pools: Vec<RawPool>,
    #[serde(default, rename = "probe")]
    pub probes: Vec<RawProbe>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub cluster: RawCluster,
    #[serde(default, rename = "broker")]
    pub brokers: Vec<RawBroker>,
    #[serde(default)]
    pub ha: RawHa,
    #[serde(default, rename = "haserver")]
    pub haservers: Vec<RawHaServer>,
    #[serde(default)]
    pub auth: crate::auth::RawAuth,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHa {
    pub heartbeat_interval: Option<String>,
    pub member_timeout: Option<String>,
    pub remove_after: Option<String>,
    pub lease: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHaServer {
    pub id: String,
    pub listen: String,
    pub db: Option<String>,
    pub db_source: Option<String>,
    pub db_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub secret: Option<String>,
    pub tls: Option<RawMeshTls>,
    pub peer_queue: Option<u32>,
    pub replicate_sessions: Option<bool>,
    pub replica_max_messages: Option<u32>,
    pub replication_factor: Option<u32>,
    pub durable_retained: Option<bool>,
    pub reconnect_min: Option<String>,
    pub reconnect_max: Option<String>,
}

/// `[cluster] tls = { cert = "node.pem", key = "node.key", ca = "cluster-ca.pem",
/// server_name = "mesh.example" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeshTls {
    pub cert: String,
    pub key: String,
    pub ca: String,
    pub server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBroker {
    pub id: String,
    pub mqtt: String,
    pub mqtt_v5: Option<String>,
    pub mesh: Option<String>,
    pub http: Option<String>,
    pub max_connections: Option<u32>,
    pub max_payload_size: Option<u32>,
    pub max_inflight: Option<u32>,
    pub max_queued_messages: Option<u32>,
    pub http_token_file: Option<String>,
    pub backlog: Option<u32>,
    /// MQTT over TLS (issue 15): 3.1.1 and 5.0 listeners, with `tls` (a frontend's shape).
    pub mqtts: Option<String>,
    pub mqtts_v5: Option<String>,
    pub tls: Option<RawTls>,
    pub accept_proxy: Option<Vec<String>>,
    pub handshake_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLb {
    pub admin: Option<String>,
    pub shutdown_grace: Option<String>,
    pub watch_config: Option<bool>,
    pub watch_interval: Option<String>,
    pub data_threads: Option<u32>,
    pub admin_token_file: Option<String>,
    pub max_connections: Option<u32>,
    pub state_file: Option<String>,
    pub source: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFrontend {
    pub name: String,
    pub bind: String,
    pub backlog: Option<u32>,
    pub max_connections: Option<u32>,
    pub max_connections_per_source: Option<u32>,
    pub source_rate: Option<u32>,
    pub source_burst: Option<u32>,
    pub tls: Option<RawTls>,
    pub accept_proxy: Option<Vec<String>>,
}

/// `tls = { cert = "chain.pem", key = "key.pem", alpn = ["mqtt"], sni = [...], client_ca = ... }`
/// of a frontend.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
    pub alpn: Option<Vec<String>>,
    #[serde(default)]
    pub sni: Vec<RawSniCert>,
    /// mTLS: `client_ca = "ca.pem"`, `client_auth = "required" | "optional"`, and
    /// `client_id = "cn" | "any"`.
    pub client_ca: Option<String>,
    pub client_auth: Option<String>,
    pub client_id: Option<String>,
}

/// `{ names = ["b.example.com"], cert = "b.pem", key = "b.key" }` in a frontend's `tls.sni`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSniCert {
    pub names: Vec<String>,
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: String,
    pub probe: Option<String>,
    pub discovery: Option<String>,
    pub remove_after: Option<String>,
    pub max_pending: Option<u32>,
    pub max_queue: Option<u32>,
    pub queue_timeout: Option<String>,
    pub slow_start: Option<String>,
    pub server_reference: Option<String>,
    pub send_proxy: Option<String>,
    pub tls: Option<RawPoolTls>,
    pub source: Option<String>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<RawBackend>,
}

/// `tls = { ca = "brokers-ca.pem", server_name = "broker.internal", cert = "lb.pem",
/// key = "lb.key", alpn = ["mqtt"] }` of a pool: TLS to its members.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPoolTls {
    pub ca: String,
    pub server_name: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub alpn: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub id: String,
    pub addr: String,
    pub weight: Option<u32>,
    pub drain: Option<bool>,
    pub mqtt_ports: Option<RawMqttPorts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqttPorts {
    pub v3: Option<u16>,
    pub v4: Option<u16>,
    pub v5: Option<u16>,
}

/// `port = 8883` or `port = "traffic"` (probe the backend's own traffic port).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawPort {
    Number(i64),
    Word(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    pub name: String,
    pub protocol: Option<String>,
    pub port: Option<RawPort>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub threshold: Option<u32>,
    pub up_threshold: Option<u32>,
    pub down_threshold: Option<u32>,
    pub path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    pub frontend: String,
    pub pool: String,
    pub distribution: Option<String>,
    pub idle_timeout: Option<String>,
    pub reset_on_idle: Option<bool>,
    pub connect_timeout: Option<String>,
    pub max_connect_attempts: Option<u32>,
    pub inspect_timeout: Option<String>,
    pub inspect_max_bytes: Option<u32>,
    pub fallback: Option<String>,
    pub non_mqtt: Option<String>,
    pub close_on_backend_down: Option<bool>,
    pub mqtt_keep_alive: Option<String>,
    pub tcp_keepalive_time: Option<String>,
    pub tcp_keepalive_interval: Option<String>,
    pub tcp_keepalive_count: Option<u32>,
}
