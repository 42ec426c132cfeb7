//! Every default value of every key, and every bound a key is checked against, in one place:
//! validation (`validate/`) and the model's `Default` impls read them from here, so the
//! value a key takes when it is left out is written once and documented beside its reason.
//!
//! Grouped by the TOML table the key sits in; the bounds come last. A key whose absence means
//! "none" or "off" (`lb.data_threads`, `pool.slow_start`, `broker.mesh`, ...) has no entry
//! here: the model's doc of its field says what the absence means.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::num::NonZeroU32;
use std::time::Duration;

use crate::model::{Distribution, Fallback, NonMqtt, ProbeProtocol, TcpKeepalive};

/// A count's default, checked at compile time to be at least 1 (a zero fails the build).
const fn nz(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => panic!("a count's default must be at least 1"),
    }
}

/// The built-in default file: a loopback cluster (LB on 1883, admin on 9883, three brokers).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../examples/mqlb.toml");

// ---- [lb] ----------------------------------------------------------------------------------

/// `lb.admin`: loopback, so the admin API is not reachable from elsewhere without a token.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9883";
/// `lb.admin` as an address ([`DEFAULT_ADMIN`] parsed), also what stands in for an `lb.admin`
/// that does not parse so validation goes on.
pub const DEFAULT_ADMIN_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 9883));
/// `lb.shutdown_grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// `lb.watch_config`: a changed file is reloaded without a SIGHUP.
pub const DEFAULT_WATCH_CONFIG: bool = true;
/// `lb.watch_interval`.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(2);

// ---- [[frontend]] and [[broker]] ------------------------------------------------------------

/// `frontend.backlog` and `broker.backlog`: the listen backlog.
pub const DEFAULT_BACKLOG: NonZeroU32 = nz(1024);

/// `frontend.tls.alpn`: the protocol name MQTT over TLS registers for ALPN (IANA's `mqtt`).
/// A client offering none is still accepted (mosquitto's clients offer none).
pub const DEFAULT_TLS_ALPN: &[&str] = &["mqtt"];

/// `frontend.accept_proxy`: no source is trusted to send a PROXY header; a header is data.
pub const DEFAULT_ACCEPT_PROXY: Vec<ipnet::IpNet> = Vec::new();

/// `frontend.source_burst`: one second's worth of `source_rate` unless said otherwise.
pub fn default_source_burst(source_rate: NonZeroU32) -> NonZeroU32 {
    source_rate
}

// ---- [[pool]] -------------------------------------------------------------------------------

/// `pool.send_proxy`: backends see the LB's address, no PROXY header is sent.
pub const DEFAULT_SEND_PROXY: Option<crate::model::ProxyVersion> = None;

/// `pool.backend.weight`.
pub const DEFAULT_WEIGHT: NonZeroU32 = nz(1);
/// `pool.backend.drain`: a backend takes new connections from the start.
pub const DEFAULT_DRAIN: bool = false;
/// `pool.max_pending`: connects in flight per backend: a quarter of a broker's default listen
/// backlog, so a burst through the LB never overflows it.
pub const DEFAULT_MAX_PENDING: NonZeroU32 = nz(256);
/// `pool.max_queue`.
pub const DEFAULT_MAX_QUEUE: u32 = 10_000;
/// `pool.queue_timeout`.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// `pool.remove_after`: a member that left a discovery pool stays listed (down) this long: long
/// enough for an alert's `for:` and a person to look, short enough that autoscaled pools do not
/// pile up.
pub const DEFAULT_REMOVE_AFTER: Duration = Duration::from_secs(600);

// ---- [[probe]] ------------------------------------------------------------------------------

/// The name of the probe a pool without `probe` gets.
pub const DEFAULT_PROBE_NAME: &str = "default";
/// `probe.protocol`: a TCP connect, as Azure's default probe.
pub const DEFAULT_PROBE_PROTOCOL: ProbeProtocol = ProbeProtocol::Tcp;
/// `probe.path` of an `http` probe.
pub const DEFAULT_PROBE_PATH: &str = "/";
/// `probe.port`: Azure's model probes a fixed port on the backend's IP.
pub const DEFAULT_PROBE_PORT: u16 = 8883;
/// `probe.interval`.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// `probe.timeout`, unless the interval is shorter (see [`default_probe_timeout`]).
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// `probe.up_threshold` and `probe.down_threshold` (and `probe.threshold`, which sets both).
pub const DEFAULT_THRESHOLD: NonZeroU32 = nz(1);

/// `probe.timeout` given the probe's `interval`: [`DEFAULT_PROBE_TIMEOUT`], but never longer
/// than the interval (a probe must end before the next one starts).
pub fn default_probe_timeout(interval: Duration) -> Duration {
    DEFAULT_PROBE_TIMEOUT.min(interval)
}

// ---- [[rule]] -------------------------------------------------------------------------------

/// `rule.distribution`: Azure's default.
pub const DEFAULT_DISTRIBUTION: Distribution = Distribution::FiveTuple;
/// `rule.idle_timeout`: Azure's 4 minutes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(240);
/// `rule.reset_on_idle`.
pub const DEFAULT_RESET_ON_IDLE: bool = false;
/// `rule.connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// `rule.max_connect_attempts`.
pub const DEFAULT_MAX_CONNECT_ATTEMPTS: NonZeroU32 = nz(3);
/// `rule.inspect_timeout`.
pub const DEFAULT_INSPECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `rule.inspect_max_bytes`.
pub const DEFAULT_INSPECT_MAX_BYTES: u32 = 4096;
/// `rule.fallback`.
pub const DEFAULT_FALLBACK: Fallback = Fallback::FiveTuple;
/// `rule.non_mqtt`: a broker must not be fed what no MQTT client sends.
pub const DEFAULT_NON_MQTT: NonMqtt = NonMqtt::Refuse;
/// `rule.close_on_backend_down`: Azure keeps live connections to a backend marked down.
pub const DEFAULT_CLOSE_ON_BACKEND_DOWN: bool = false;
/// `rule.mqtt_keep_alive`.
pub const DEFAULT_MQTT_KEEP_ALIVE: Duration = Duration::from_secs(60);
/// `rule.tcp_keepalive_time`, `rule.tcp_keepalive_interval` and `rule.tcp_keepalive_count`
/// (`None`: the system's count, 9 on Linux).
pub const DEFAULT_TCP_KEEPALIVE: TcpKeepalive = TcpKeepalive {
    time: Duration::from_secs(60),
    interval: Duration::from_secs(10),
    count: None,
};

// ---- [cluster] ------------------------------------------------------------------------------

/// `cluster.peer_queue`.
pub const DEFAULT_PEER_QUEUE: NonZeroU32 = nz(10_000);
/// `cluster.replicate_sessions`: a node's death loses no persistent session.
pub const DEFAULT_REPLICATE_SESSIONS: bool = true;
/// `cluster.replica_max_messages`.
pub const DEFAULT_REPLICA_MAX_MESSAGES: NonZeroU32 = nz(100_000);
/// `cluster.replication_factor`: copies of a persistent session's messages, the owner's among
/// them: in a cluster of up to three brokers every broker, so even two deaths at once lose
/// none; 2 halves the memory and covers one death at a time.
pub const DEFAULT_REPLICATION_FACTOR: NonZeroU32 = nz(3);
/// `cluster.durable_retained` when `[[haserver]]`s are configured (without, there is nowhere to
/// write: off).
pub const DEFAULT_DURABLE_RETAINED: bool = true;
/// Not keys: how a broker writes retained messages through (`cluster.durable_retained`). A
/// batch goes every `DURABLE_FLUSH_EVERY`, or sooner once `DURABLE_BATCH_ENTRIES` topics wait;
/// a batch holds at most `DURABLE_BATCH_BYTES` of messages (one larger message goes alone);
/// at most `DURABLE_QUEUE_TOPICS` topics wait (a new topic beyond it is dropped and counted;
/// a topic already waiting is always replaced).
pub const DURABLE_FLUSH_EVERY: Duration = Duration::from_millis(100);
pub const DURABLE_BATCH_ENTRIES: usize = 500;
pub const DURABLE_BATCH_BYTES: usize = 4 * 1024 * 1024;
pub const DURABLE_QUEUE_TOPICS: usize = 100_000;
/// `cluster.reconnect_min`.
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(100);
/// `cluster.reconnect_max`.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(5);
/// The secret of the shipped example (`mqlb up`'s default `cluster.secret`): fine on loopback,
/// refused as soon as a bind that takes it (or an admin endpoint) is reachable from elsewhere.
pub const EXAMPLE_SECRET: &str = "mqlb-dev-secret-change-me";

// ---- [[broker]] (and DEFAULT_BACKLOG above) -------------------------------------------------

/// `broker.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: NonZeroU32 = nz(10_000);
/// `broker.max_payload_size`, in bytes.
pub const DEFAULT_MAX_PAYLOAD: NonZeroU32 = nz(256 * 1024);
/// `broker.max_inflight`.
pub const DEFAULT_MAX_INFLIGHT: NonZeroU32 = nz(100);
/// `broker.max_queued_messages`: the default of mosquitto, EMQX and HiveMQ.
pub const DEFAULT_MAX_QUEUED: NonZeroU32 = nz(1000);
/// `broker.handshake_timeout`: a client's PROXY header and TLS handshake, together; as long as
/// the node waits for a CONNECT after them.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

// ---- [ha] and [[haserver]] ------------------------------------------------------------------

/// `ha.heartbeat_interval`.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// `ha.member_timeout`.
pub const DEFAULT_MEMBER_TIMEOUT: Duration = Duration::from_secs(3);
/// `ha.remove_after`.
pub const DEFAULT_HA_REMOVE_AFTER: Duration = Duration::from_secs(60);
/// `ha.lease`.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3);
/// `haserver.db`, relative to the working directory.
pub const DEFAULT_HA_DB: &str = "mqlb-ha.sqlite";

// ---- [auth] ---------------------------------------------------------------------------------

/// `auth.allow_anonymous` given whether every bind of the topology is loopback: the quick start
/// (everything on loopback) works without a password file; anything reachable from elsewhere
/// needs `allow_anonymous = true` said out loud.
pub fn default_allow_anonymous(all_loopback: bool) -> bool {
    all_loopback
}

/// `auth.allow_anonymous` of [`crate::AuthSettings::default`], a broker started without a
/// config: what a broker without `[auth]` did before.
pub const DEFAULT_ALLOW_ANONYMOUS_WITHOUT_CONFIG: bool = true;

// ---- Bounds ---------------------------------------------------------------------------------

/// The longest duration any key takes: timers built from longer ones would overflow clock
/// arithmetic (`Instant + interval`) in the tasks that use them.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// `lb.data_threads`: more data threads than this is a typo, not a machine.
pub const MAX_DATA_THREADS: u32 = 1024;
/// Names and ids (`frontend.name`, `pool.backend.id`, ...): at most this many characters.
pub const MAX_NAME_LEN: usize = 64;
/// `frontend.tls.alpn`: each name 1 to this many bytes (RFC 7301).
pub const MAX_ALPN_LEN: usize = 255;
/// `pool.backend.weight`.
pub const MAX_WEIGHT: u32 = 10_000;
/// `pool.server_reference`: sent in a DISCONNECT's UTF-8 string property, so short enough for
/// a small packet.
pub const MAX_SERVER_REFERENCE_LEN: usize = 1024;
/// `rule.inspect_max_bytes`, the least it takes.
pub const MIN_INSPECT_MAX_BYTES: u32 = 16;
/// `rule.inspect_max_bytes`.
pub const MAX_INSPECT_MAX_BYTES: u32 = 1 << 20;
/// `rule.tcp_keepalive_time` and `rule.tcp_keepalive_interval`, in seconds: the kernel's bound
/// of TCP_KEEPIDLE and TCP_KEEPINTVL (Linux); beyond, setsockopt fails on every connection.
pub const MAX_KEEPALIVE_SECS: u64 = 32_767;
/// `rule.tcp_keepalive_count`: the kernel's bound of TCP_KEEPCNT (Linux).
pub const MAX_KEEPALIVE_COUNT: u32 = 127;
/// `broker.max_payload_size`: the largest payload MQTT can carry (remaining length is at most
/// 256 MiB).
pub const MAX_PAYLOAD: u32 = 268_435_455;
/// `cluster.secret`, `lb.admin_token_file`, `broker.http_token_file`: at least this many
/// characters.
pub const MIN_SECRET_LEN: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_default_is_written_once_in_two_forms() {
        assert_eq!(DEFAULT_ADMIN.parse::<SocketAddr>(), Ok(DEFAULT_ADMIN_ADDR));
    }
}
