//! The validated configuration: real types only, so nothing downstream re-checks or panics.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

/// A whole validated configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was loaded from (`None` for the built-in default or a string).
    pub source: Option<PathBuf>,
    pub lb: LbSettings,
    pub frontends: Vec<Frontend>,
    pub pools: Vec<Pool>,
    pub rules: Vec<Rule>,
    /// Settings shared by every broker node of the cluster.
    pub cluster: ClusterSettings,
    /// The broker nodes; each is also every other node's mesh peer.
    pub brokers: Vec<BrokerNode>,
    /// The HA servers and the membership timing they enforce.
    pub ha: HaSettings,
    /// MQTT logins and ACLs of every broker node (`[auth]`).
    pub auth: crate::AuthSettings,
    /// Non-fatal findings (e.g. an idle timeout shorter than 1.5× the MQTT keep-alive).
    pub warnings: Vec<Problem>,
}

/// Process-wide settings of the load balancer.
#[derive(Debug, Clone, PartialEq)]
pub struct LbSettings {
    /// Admin/metrics HTTP server address. Loopback by default.
    pub admin: SocketAddr,
    /// On shutdown, how long live connections may take to finish before they are cut.
    pub shutdown_grace: Duration,
    /// Reload automatically when the config file changes (SIGHUP always reloads).
    pub watch_config: bool,
    /// How often the file is checked for changes.
    pub watch_interval: Duration,
    /// Data-path threads (HAProxy's `nbthread`); `None`: one per core. Fixed at start.
    pub data_threads: Option<NonZeroU32>,
    /// The bearer token of `admin` (`admin_token_file`, read at load): needed for every write,
    /// and off loopback for reads too (`/healthz` excepted). Without one, writes are taken only
    /// on a loopback `admin`, and a non-loopback `admin` is refused at load.
    pub admin_token: Option<Secret>,
    /// Live connections of all frontends together; beyond, new ones are reset at accept.
    pub max_connections: Option<NonZeroU32>,
    /// Where the admin API's drain/enable/evacuate decisions are kept across restarts
    /// (`state_file`); `None`: beside the config file (`FILE.state.json`), or nowhere for a
    /// config without a file.
    pub state_file: Option<PathBuf>,
    /// The address the LB's own connections come from (`source`: to pool members, probes and
    /// HA servers), on a host with several; `None`: the one the kernel's route picks.
    pub source: Option<IpAddr>,
}

/// Per-frontend connection limits, checked at accept (a refused connection is reset before
/// any byte is read, and counted by reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrontendLimits {
    pub max_connections: Option<NonZeroU32>,
    /// Live connections from one client address.
    pub max_connections_per_source: Option<NonZeroU32>,
    /// New connections per second from one client address (a token bucket).
    pub source_rate: Option<SourceRate>,
}

/// A token bucket: `per_second` new connections a second, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

/// A listening address (Azure: frontend IP configuration + frontend port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    pub name: String,
    pub bind: SocketAddr,
    pub backlog: NonZeroU32,
    pub limits: FrontendLimits,
    /// TLS terminated here (`tls = { cert, key }`); `None`: the bytes are passed as they come.
    pub tls: Option<crate::tls::FrontendTls>,
    /// Sources trusted to start their connections with a PROXY header (another LB in front):
    /// the address it carries is then the client's. Empty: no header is read from anyone.
    pub accept_proxy: Vec<ipnet::IpNet>,
}

impl Frontend {
    /// Whether a connection from `ip` must start with a PROXY header.
    pub fn trusts_proxy(&self, ip: std::net::IpAddr) -> bool {
        trusts_proxy(&self.accept_proxy, ip)
    }
}

/// Whether `ip` is in `nets` (an IPv4 client seen on an IPv6 socket as `::ffff:a.b.c.d`
/// matches its IPv4 network).
pub fn trusts_proxy(nets: &[ipnet::IpNet], ip: std::net::IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

/// The PROXY protocol version a pool's backends are sent (`send_proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 ...\r\n`): addresses only.
    V1,
    /// The binary header, with TLVs (the TLS version when the frontend terminated TLS).
    V2,
}

impl ProxyVersion {
    pub const NAMES: [&'static str; 2] = ["v1", "v2"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "v1" => Some(Self::V1),
            "v2" => Some(Self::V2),
            _ => None,
        }
    }
}

/// A backend pool with the probe that decides its members' health.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub probe: Probe,
    /// Members come from the HA server's membership (`discovery = "haserver"`); the static
    /// `backends` are used until the HA server first answers.
    pub discovery: bool,
    pub backends: Vec<Backend>,
    /// The MQTT 5 Server Reference an evacuation's DISCONNECT (0x9C, Use another server)
    /// names, e.g. the LB's public `host:port`; `None`: the DISCONNECT carries none.
    pub server_reference: Option<String>,
    /// How long a member that left the membership (down or gone at the HA server) stays
    /// listed as `down`, taking no traffic, before it is removed for good: alerts on
    /// `mqlb_backend_up == 0` see a dead broker instead of its series vanishing.
    pub remove_after: Duration,
    /// How fast each member takes new connections (HAProxy's server `maxconn`, `maxqueue`,
    /// `timeout queue`, `slowstart`).
    pub admission: Admission,
    /// Each connection to a member starts with a PROXY header carrying the client's address
    /// (HAProxy's `send-proxy`/`send-proxy-v2`); `None`: the member sees the LB's address.
    pub send_proxy: Option<ProxyVersion>,
    /// TLS to every member (`tls = { ca = ... }`): each connection, probe `tls` and `mqtts`
    /// included, verifies the member's certificate; `None`: plaintext.
    pub tls: Option<PoolTls>,
    /// The address connections to the members and their probes come from: the pool's
    /// `source`, else `lb.source`; `None`: the kernel's choice (HAProxy's `source`).
    pub source: Option<IpAddr>,
}

/// `pool.tls`: how the LB connects to a pool's members over TLS, read and built at load so a
/// missing file or a CA file without a certificate is refused naming the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolTls {
    /// The PEM file of the CA certificates a member's certificate must chain to (or a
    /// member's own self-signed certificate): the only ones trusted, never the system's.
    pub ca: PathBuf,
    /// The name every member's certificate is verified against, and sent as SNI; `None`: the
    /// member's IP address, verified as an IP address SAN (no SNI is sent for an address).
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
    /// The LB's client certificate chain and key, shown when a member asks for one (mTLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// ALPN protocols offered (none by default: a broker that knows no ALPN ignores it, one
    /// that requires `mqtt` gets it by `alpn = ["mqtt"]`).
    pub alpn: Vec<String>,
    /// The client side built from the files when they were read.
    pub client: crate::tls::TlsClient,
}

impl PoolTls {
    /// The name the certificate of the member at `ip` is verified against.
    pub fn server_name_for(&self, ip: std::net::IpAddr) -> rustls::pki_types::ServerName<'static> {
        match &self.server_name {
            Some(n) => n.clone(),
            None => rustls::pki_types::ServerName::IpAddress(ip.into()),
        }
    }
}

/// Admission of new connections to each member of a pool. A burst (a failover moves thousands
/// of devices at once) opened every backend connection at the same instant, overflowed the
/// brokers' listen backlog and waited seconds for SYN retries, or failed over to the next broker
/// and counted as passive failures; with a bound on connects in flight the rest wait their turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Admission {
    /// Connects to one backend in flight at once (SYN sent, CONNECT not yet replayed).
    pub max_pending: NonZeroU32,
    /// Connections waiting for one of those slots; beyond, a new one is refused at once.
    pub max_queue: u32,
    /// The longest a connection waits in that queue before it is refused.
    pub queue_timeout: Duration,
    /// After a backend comes (back) up, its `max_pending` grows from 1 to the full value over
    /// this long, so it is not flooded the instant it answers. `None`: at once.
    pub slow_start: Option<Duration>,
}

/// One member of a pool. `id` is the stable identity the hash is computed on: keep it
/// unchanged when a broker moves to another address and its clients stay with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    pub id: String,
    pub addr: SocketAddr,
    pub weight: NonZeroU32,
    /// Start in the draining state (no new connections).
    pub drain: bool,
    pub mqtt_ports: MqttPorts,
}

/// Per-MQTT-level ports: rumqttd serves 3.1.1 and 5.0 on separate listeners.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct MqttPorts {
    pub v3: Option<u16>,
    pub v4: Option<u16>,
    pub v5: Option<u16>,
}

impl Backend {
    /// The address a client speaking MQTT protocol `level` (3, 4 or 5) is sent to;
    /// `None` (not MQTT, or not inspected) means the backend's `addr`.
    pub fn addr_for_level(&self, level: Option<u8>) -> SocketAddr {
        let port = match level {
            Some(3) => self.mqtt_ports.v3,
            Some(4) => self.mqtt_ports.v4,
            Some(5) => self.mqtt_ports.v5,
            _ => None,
        };
        match port {
            Some(p) => SocketAddr::new(self.addr.ip(), p),
            None => self.addr,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProbeProtocol {
    /// Healthy when a TCP connection is accepted (Azure's TCP probe).
    Tcp,
    /// Healthy when `GET path` answers 200 (Azure's HTTP probe).
    Http { path: String },
    /// Healthy when an MQTT CONNECT is answered by a CONNACK that accepts it.
    Mqtt,
    /// Healthy when a TLS handshake with the member completes and its certificate verifies
    /// (the pool's `tls`); Azure's probes have no TLS one (their `Https` is an HTTP GET).
    Tls,
    /// [`ProbeProtocol::Mqtt`] inside TLS (the pool's `tls`).
    Mqtts,
}

impl ProbeProtocol {
    /// Whether it speaks TLS to the member, so needs its pool's `tls`.
    pub fn uses_tls(&self) -> bool {
        matches!(self, ProbeProtocol::Tls | ProbeProtocol::Mqtts)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbePort {
    /// Probe this port on the backend's IP (Azure's model; default 8883).
    Fixed(u16),
    /// Probe the backend's own traffic address (`addr`).
    Traffic,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Probe {
    pub name: String,
    pub protocol: ProbeProtocol,
    pub port: ProbePort,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up.
    pub up_threshold: NonZeroU32,
    /// Consecutive failures that bring an up backend down (Azure's `probeThreshold`).
    pub down_threshold: NonZeroU32,
}

impl Probe {
    /// The address probed for `backend`.
    pub fn target(&self, backend: &Backend) -> SocketAddr {
        match self.port {
            ProbePort::Fixed(p) => SocketAddr::new(backend.addr.ip(), p),
            ProbePort::Traffic => backend.addr,
        }
    }
}

/// How a rule picks a backend for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Distribution {
    /// Source IP, source port, destination IP, destination port, protocol (Azure default).
    FiveTuple,
    /// Source IP and destination IP (Azure "Client IP").
    SourceIp,
    /// Source IP, destination IP and protocol (Azure "Client IP and protocol").
    SourceIpProtocol,
    /// The MQTT client ID from the CONNECT packet.
    MqttClientId,
    RoundRobin,
    LeastConnections,
    /// The server name (SNI) of the TLS ClientHello, the TLS passed through as it is.
    Sni,
}

impl Distribution {
    pub const NAMES: [&'static str; 7] = [
        "five-tuple",
        "source-ip",
        "source-ip-protocol",
        "mqtt-client-id",
        "round-robin",
        "least-connections",
        "sni",
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "five-tuple" => Self::FiveTuple,
            "source-ip" => Self::SourceIp,
            "source-ip-protocol" => Self::SourceIpProtocol,
            "mqtt-client-id" => Self::MqttClientId,
            "round-robin" => Self::RoundRobin,
            "least-connections" => Self::LeastConnections,
            "sni" => Self::Sni,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::FiveTuple => "five-tuple",
            Self::SourceIp => "source-ip",
            Self::SourceIpProtocol => "source-ip-protocol",
            Self::MqttClientId => "mqtt-client-id",
            Self::RoundRobin => "round-robin",
            Self::LeastConnections => "least-connections",
            Self::Sni => "sni",
        }
    }
}

/// What an `mqtt-client-id` rule does with a CONNECT whose client ID is empty (the server is to
/// assign one, so there is nothing to hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fallback {
    FiveTuple,
    Reject,
}

/// What an `mqtt-client-id` rule does with a connection whose first bytes are not MQTT (HTTP, a
/// TLS ClientHello, random bytes, a PUBLISH before any CONNECT). Refused unless the rule says
/// otherwise: a broker must not be fed what no MQTT client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NonMqtt {
    Refuse,
    /// Forwarded, hashed on the five-tuple (a frontend that also carries another protocol).
    Forward,
}

/// Azure's load-balancing rule: frontend → pool, with distribution and timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub name: String,
    pub frontend: String,
    pub pool: String,
    pub distribution: Distribution,
    /// Close a connection with no bytes either way for this long (Azure: 4 min).
    pub idle_timeout: Duration,
    /// Send a TCP RST to both sides on idle timeout (Azure "TCP reset").
    pub reset_on_idle: bool,
    pub connect_timeout: Duration,
    /// Backends tried for one connection before giving up.
    pub max_connect_attempts: NonZeroU32,
    /// Time allowed for the client's CONNECT to arrive (mqtt-client-id rules).
    pub inspect_timeout: Duration,
    /// Bytes the LB buffers at most while looking for the client ID.
    pub inspect_max_bytes: u32,
    pub fallback: Fallback,
    pub non_mqtt: NonMqtt,
    /// Close live connections to a backend when its probe marks it down (Azure keeps them).
    pub close_on_backend_down: bool,
    /// The longest MQTT keep-alive clients are expected to use; the idle timeout must exceed
    /// 1.5× of it or idle-but-alive clients are cut (checked at load, warned).
    pub mqtt_keep_alive: Duration,
    /// TCP keepalive on both legs of the rule's connections.
    pub tcp_keepalive: TcpKeepalive,
}

/// TCP keepalive of a connection's sockets: a peer that vanished without a FIN (a host that
/// died, a NAT that forgot the flow) is found on a quiet connection after about
/// `time + interval × count`. Whole seconds, as the kernel takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpKeepalive {
    /// Quiet time before the first probe (TCP_KEEPIDLE).
    pub time: Duration,
    /// Time between unanswered probes (TCP_KEEPINTVL).
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT); `None`: the
    /// system's (9 on Linux).
    pub count: Option<u32>,
}

impl Default for TcpKeepalive {
    /// A rule's keepalive when it sets none of the `tcp_keepalive_*` keys.
    fn default() -> Self {
        crate::defaults::DEFAULT_TCP_KEEPALIVE
    }
}

/// One finding of validation: the key (a path like `pool[0].backend[1].addr`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
    /// The 1-based line of the key in the file, where it is written in one (set by
    /// [`Config::parse`](crate::Config::parse)).
    pub line: Option<usize>,
}

impl Problem {
    /// `file:LINE: key: message`, as a compiler points at a line (`file: ...` without one).
    pub fn located(&self, file: &str) -> String {
        match self.line {
            Some(line) => format!("{file}:{line}: {self}"),
            None => format!("{file}: {self}"),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// A secret that must never reach a log: `Debug` and `Display` print it masked.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret's bytes, for the one place that needs them (the mesh handshake).
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("****")
    }
}

/// `[cluster]`: how broker nodes talk to each other.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    /// Authenticates node-to-node links (HMAC challenge-response); required with 2+ brokers.
    pub secret: Option<Secret>,
    /// `tls`: every mesh link runs over mutual TLS (issue 15); `None`: plaintext links.
    pub tls: Option<crate::MeshTls>,
    /// Messages queued per peer while its link is slow or down; beyond it they are dropped
    /// and counted, so a slow peer never stalls a node.
    pub peer_queue: NonZeroU32,
    /// Every node keeps a replica of every persistent session of the others, so a node's
    /// death loses none (issue 12). Off: a session dies with its node.
    pub replicate_sessions: bool,
    /// QoS 1/2 messages one replica holds for its client; beyond it the oldest are dropped
    /// (counted).
    pub replica_max_messages: NonZeroU32,
    /// Copies of a persistent session's QoS 1/2 messages in the cluster, the owner's among
    /// them: `replication_factor - 1` other nodes queue them (every node when there are no
    /// more). Every node knows every session's subscriptions and will whatever it is.
    pub replication_factor: NonZeroU32,
    /// Retained messages (and, replicated, persistent sessions' subscriptions) written through
    /// to the HA servers' database, so a whole-cluster restart keeps them (issue 18); on by
    /// default when `[[haserver]]`s are configured.
    pub durable_retained: bool,
    /// Reconnect back-off to a peer: starts here, doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

/// `[[broker]]`: one broker node (rumqttd) of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerNode {
    pub id: String,
    /// MQTT 3.1.1 listener.
    pub mqtt: SocketAddr,
    /// MQTT 5.0 listener (rumqttd serves 5.0 on its own port).
    pub mqtt_v5: Option<SocketAddr>,
    /// Node-to-node link listener; required when the cluster has more than one node.
    pub mesh: Option<SocketAddr>,
    /// `/metrics` and `/healthz` of the node.
    pub http: Option<SocketAddr>,
    /// The bearer token of `http` (`http_token_file`, read at load): needed for its reads off
    /// loopback (`/healthz` excepted) and for any write; required when `http` is not loopback.
    pub http_token: Option<Secret>,
    pub max_connections: NonZeroU32,
    /// Largest PUBLISH payload accepted, in bytes.
    pub max_payload_size: NonZeroU32,
    /// Unacknowledged QoS 1/2 messages per client.
    pub max_inflight: NonZeroU32,
    /// Messages queued for a persistent session while its client is away that are delivered
    /// when it comes back (QoS 0 dropped first, then the oldest; counted).
    pub max_queued_messages: NonZeroU32,
    /// Listen backlog of its MQTT listeners: connections the kernel completes while the node
    /// is busy accepting. A burst of reconnecting devices (a failover moves thousands at once)
    /// overflows a short one, and each overflowed SYN waits 1 s, 3 s, 7 s... to be retried.
    pub backlog: NonZeroU32,
    /// MQTT 3.1.1 over TLS, terminated by the node itself (end-to-end TLS); needs `tls`.
    pub mqtts: Option<SocketAddr>,
    /// MQTT 5.0 over TLS; needs `tls`.
    pub mqtts_v5: Option<SocketAddr>,
    /// The certificate, key and client CA of the TLS listeners, read and built at load (the
    /// shape and checks of a frontend's `tls`; a broker has no `client_id` rule).
    pub tls: Option<crate::tls::FrontendTls>,
    /// Sources (the LBs in front) whose connections to any of the node's MQTT listeners must
    /// start with a PROXY header: the address it carries is then the client's. Empty: none.
    pub accept_proxy: Vec<ipnet::IpNet>,
    /// Bounds a connection's PROXY header and TLS handshake, together.
    pub handshake_timeout: Duration,
}

impl BrokerNode {
    /// Whether a connection from `ip` must start with a PROXY header.
    pub fn trusts_proxy(&self, ip: std::net::IpAddr) -> bool {
        trusts_proxy(&self.accept_proxy, ip)
    }
}

/// `[ha]` and `[[haserver]]`: the HA servers and the membership timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaSettings {
    pub servers: Vec<HaServer>,
    /// How often a broker heartbeats.
    pub heartbeat_interval: Duration,
    /// A member silent this long is marked down.
    pub member_timeout: Duration,
    /// A member down this long is removed.
    pub remove_after: Duration,
    /// The primary's lease: a backup takes over this long after the primary last renewed it.
    pub lease: Duration,
}

/// One `mqlb haserver` instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaServer {
    pub id: String,
    pub listen: SocketAddr,
    pub db: HaDb,
    /// PostgreSQL only: connect to it from this address (a machine with several), so the
    /// database's `pg_hba.conf` and the network see this machine's.
    pub db_source: Option<std::net::IpAddr>,
    /// PostgreSQL only: TLS to it, verifying its certificate against this CA (PEM), checked
    /// at load.
    pub db_ca: Option<std::path::PathBuf>,
}

/// `haserver.db`: where an HA server keeps its state; HA servers that back each other up share
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HaDb {
    /// A SQLite file: HA servers on one machine.
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://...`): HA servers on several machines.
    Postgres(PostgresUrl),
}

impl std::fmt::Display for HaDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HaDb::Sqlite(path) => write!(f, "{}", path.display()),
            HaDb::Postgres(url) => write!(f, "{url}"),
        }
    }
}

/// A PostgreSQL connection URL, `postgres://[user[:password]@]host[:port][/db][?params]`, as
/// checked at load; `Debug` and `Display` mask the password.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl(String);

impl PostgresUrl {
    /// Checks the parts the HA server needs (a scheme, one host, a numeric port if any); the
    /// client checks the rest when it connects.
    pub fn parse(url: &str) -> Result<PostgresUrl, String> {
        let rest = ["postgres://", "postgresql://"]
            .iter()
            .find_map(|scheme| url.strip_prefix(scheme))
            .ok_or("a PostgreSQL URL starts with postgres:// or postgresql://")?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if hostport.contains(',') {
            return Err("several hosts: name one".into());
        }
        let (host, port) = match hostport.strip_prefix('[') {
            Some(v6) => {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or("an IPv6 host needs its closing ]")?;
                (h, after.strip_prefix(':'))
            }
            None => match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            },
        };
        if host.is_empty() {
            return Err("no host: postgres://user@host:port/db".into());
        }
        if let Some(p) = port {
            p.parse::<u16>()
                .map_err(|_| format!("port {p:?} is not a number from 0 to 65535"))?;
        }
        Ok(PostgresUrl(url.to_string()))
    }

    /// The URL with its password, for the one place that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password masked.
    fn masked(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return "****".into();
        };
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        match rest[..end].rsplit_once('@') {
            Some((user, host)) if user.contains(':') => {
                let name = user.split(':').next().unwrap_or_default();
                format!("{scheme}://{name}:****@{host}{}", &rest[end..])
            }
            _ => self.0.clone(),
        }
    }
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgresUrl({})", self.masked())
    }
}

impl std::fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked())
    }
}
