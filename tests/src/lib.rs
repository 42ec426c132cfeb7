//! mqlb's integration-test harness: real brokers and a real LB on ephemeral loopback ports,
//! real MQTT clients, failure injection (kill and restart a broker), and waits with deadlines.
//! Users can drive the same harness from their own tests (`examples/harness-user/`).
//!
//! One module per concern; everything is also re-exported here, as `mqlb_tests::Name`:
//!
//! - [`wait`]: waits with deadlines ([`wait_until`], [`wait_listening`]);
//! - [`ports`]: free loopback ports and thread-served backends ([`free_port`], [`serve_threads`]);
//! - [`process`]: the `mqlb` binary and child processes ([`mqlb_bin`], [`KillOnDrop`]);
//! - [`scratch`]: scratch directories ([`TempDir`]);
//! - [`mosquitto`]: a mosquitto broker and its command-line clients ([`Mosquitto`]);
//! - [`client`]: rumqttc 3.1.1 and 5 clients that record what they get ([`Client`], [`Client5`]);
//! - [`cluster`]: in-process broker nodes, meshed ([`Cluster`]);
//! - [`ha`]: the HA server in-process, and signed requests to it ([`start_haserver`]);
//! - [`http`], [`http_host`]: the admin APIs over HTTP/1.1 ([`get_json`], [`backend_state`]);
//! - [`metrics`]: Prometheus samples ([`metric`]);
//! - [`history`], [`persistent`]: the cluster checker's history check and its clients with
//!   persistent sessions ([`Persistent`]);
//! - [`topology`], [`up`]: whole topologies as `mqlb` processes ([`Topology`], [`Up`]);
//! - [`hosts`]: simulated machines, each its own loopback address, with nftables partitions
//!   between them ([`Hosts`]);
//! - [`pki`]: a CA of the test's own and the certificates it signs ([`Pki`]);
//! - [`postgres`]: a PostgreSQL server of the test's own, in a scratch directory ([`Postgres`]).

pub mod client;
pub mod cluster;
pub mod ha;
pub mod history;
pub mod hosts;
pub mod http;
pub mod http_host;
pub mod metrics;
pub mod mosquitto;
pub mod persistent;
pub mod pki;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod scratch;
pub mod topology;
pub mod up;
pub mod wait;

pub use client::{Client, Client5, Msg, QoS};
pub use cluster::{Cluster, TEST_SECRET};
pub use ha::{
    fast_ha_timing, ha_auth_headers, ha_get_json, ha_options, ha_request, start_haserver,
    start_haserver_at, unix_ms,
};
pub use hosts::{Host, Hosts};
pub use http::{
    backend_state, backend_states, connections, get_json, http, http_body, http_request,
    http_with_headers,
};
pub use metrics::metric;
pub use mosquitto::{
    mosquitto_installed, mosquitto_pub, mosquitto_pub_with, Mosquitto, MosquittoSub, MosquittoTls,
};
pub use persistent::{Persistent, Protocol};
pub use pki::Pki;
pub use ports::{discard_server, free_port, loopback, serve_threads};
pub use postgres::Postgres;
pub use process::{mqlb_bin, mqlb_release_bin, KillOnDrop};
pub use scratch::TempDir;
pub use topology::{Shape, Topology, TopologyFile};
pub use up::Up;
pub use wait::{wait_listening, wait_until};

/// Locks `m`, also when a panicking test poisoned it: what it guards is still read.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
