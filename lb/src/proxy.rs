//! One task per client connection: read the CONNECT when the rule routes by client ID, pick a
//! backend, connect (trying the next choice when one fails before any byte went back), replay
//! the buffered bytes, then copy both ways until one side is done, the connection idles out,
//! the backend goes down (if the rule says so) or shutdown's grace runs out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mqlb_config::{Distribution, Fallback, Rule};
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::copy::{Bidi, Dir, Peer};
use crate::lb::Shared;
use crate::mqtt::{self, parse_connect, ConnectError, ProtocolLevel};
use crate::select::Key;
use crate::snapshot::{Member, RuleRt};
use crate::state::ConnInfo;

/// TCP keepalive on both legs, so a peer that vanished without a FIN is noticed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How a connection ended; the `outcome` label of `mqlb_connections_total`. Names say who
/// ended or failed it: the client, the backend, or mqlb itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides closed normally.
    Closed,
    ClientError,
    BackendError,
    IdleTimeout,
    /// Closed because its backend's probe went down (rule `close_on_backend_down`).
    BackendDown,
    /// Cut when shutdown's grace period ran out.
    Shutdown,
    /// Every backend tried refused or timed out.
    ConnectFailed,
    /// No backend eligible (all down or draining).
    NoBackend,
    /// The CONNECT could not be used (malformed, oversized, too slow, fallback = reject).
    Rejected,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::ClientError => "client_error",
            Outcome::BackendError => "backend_error",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::BackendDown => "backend_down",
            Outcome::Shutdown => "shutdown",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::NoBackend => "no_backend",
            Outcome::Rejected => "rejected",
        }
    }
}

/// What inspecting the first bytes decided.
struct Inspected {
    buffered: Vec<u8>,
    level: Option<ProtocolLevel>,
    client_id: Option<String>,
}

/// Why the inspection gave up; the `reason` label of `mqlb_mqtt_connect_errors_total`.
#[derive(Debug, thiserror::Error)]
enum InspectFail {
    #[error(transparent)]
    Parse(ConnectError),
    #[error("no CONNECT within the inspect byte limit")]
    Oversized,
    #[error("no CONNECT within the inspect timeout")]
    Timeout,
    #[error("client closed before its CONNECT was complete")]
    Eof,
    #[error("reading the CONNECT: {0}")]
    Io(std::io::Error),
}

impl InspectFail {
    fn reason(&self) -> &'static str {
        match self {
            InspectFail::Parse(e) => e.reason(),
            InspectFail::Oversized => "oversized",
            InspectFail::Timeout => "timeout",
            InspectFail::Eof => "eof",
            InspectFail::Io(_) => "io_error",
        }
    }
}

/// Reads until the client ID is known, the bytes prove not to be a CONNECT, or a limit is hit.
async fn read_connect(
    client: &mut TcpStream,
    max_bytes: usize,
) -> Result<(Vec<u8>, Result<mqtt::Connect, ConnectError>), InspectFail> {
    let mut buf = Vec::with_capacity(256.min(max_bytes));
    // On the heap, not in the task: the task lives as long as the connection.
    let mut chunk = vec![0u8; 1024];
    loop {
        let room = (max_bytes - buf.len()).min(chunk.len());
        let n = client
            .read(&mut chunk[..room])
            .await
            .map_err(InspectFail::Io)?;
        if n == 0 {
            return Err(InspectFail::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_connect(&buf) {
            Ok(Some(c)) => return Ok((buf, Ok(c))),
            Ok(None) if buf.len() >= max_bytes => return Err(InspectFail::Oversized),
            Ok(None) => {}
            Err(e @ ConnectError::NotMqtt(_)) => return Ok((buf, Err(e))),
            Err(e) => return Err(InspectFail::Parse(e)),
        }
    }
}

pub(crate) fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
}

/// TCP_NODELAY and keepalive on one leg (a client socket inherits them from a listener mqlb
/// bound itself).
pub(crate) fn set_socket_options(s: &TcpStream) {
    if let Err(e) = s.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    if let Err(e) = SockRef::from(s).set_tcp_keepalive(&keepalive()) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
}

fn tuple_key(d: Distribution, peer: SocketAddr, local: SocketAddr) -> Key<'static> {
    match d {
        Distribution::SourceIp => Key::SourceIp {
            src: peer.ip(),
            dst: local.ip(),
        },
        Distribution::SourceIpProtocol => Key::SourceIpProtocol {
            src: peer.ip(),
            dst: local.ip(),
        },
        _ => Key::FiveTuple {
            src: peer,
            dst: local,
        },
    }
}

/// Serves one client connection from accept to close.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    rule: Arc<RuleRt>,
    mut client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let cfg = &rule.cfg;
    let m = &shared.metrics;

    // 1. Decide the key: inspect the CONNECT for client-ID rules.
    let mut inspected = Inspected {
        buffered: Vec::new(),
        level: None,
        client_id: None,
    };
    let mut method = cfg.distribution.name();
    if cfg.distribution == Distribution::MqttClientId {
        let read = tokio::time::timeout(
            cfg.inspect_timeout,
            read_connect(&mut client, cfg.inspect_max_bytes as usize),
        )
        .await
        .unwrap_or(Err(InspectFail::Timeout));
        let fallback_reason = match read {
            Ok((buf, Ok(c))) => {
                inspected.buffered = buf;
                inspected.level = Some(c.level);
                if c.client_id.is_empty() {
                    Some("empty_client_id")
                } else {
                    inspected.client_id = Some(c.client_id);
                    None
                }
            }
            Ok((buf, Err(e))) => {
                inspected.buffered = buf;
                tracing::debug!(rule = cfg.name, %peer, error = %e, "first bytes are not MQTT");
                Some(e.reason())
            }
            Err(fail) => {
                tracing::debug!(rule = cfg.name, %peer, reason = fail.reason(), error = %fail, "closing: unusable CONNECT");
                m.mqtt_connect_errors_total
                    .with_label_values(&[&cfg.name, fail.reason()])
                    .inc();
                finish(&shared, cfg, "", Outcome::Rejected);
                return;
            }
        };
        if let Some(reason) = fallback_reason {
            m.mqtt_connect_errors_total
                .with_label_values(&[&cfg.name, reason])
                .inc();
            match cfg.fallback {
                Fallback::FiveTuple => method = "fallback-five-tuple",
                Fallback::Reject => {
                    if reason == "empty_client_id" {
                        if let Some(level) = inspected.level {
                            write_best_effort(
                                &mut client,
                                mqtt::connack_identifier_rejected(level),
                            )
                            .await;
                        }
                    }
                    finish(&shared, cfg, "", Outcome::Rejected);
                    return;
                }
            }
        }
    }
    m.route_decisions_total
        .with_label_values(&[&cfg.name, method])
        .inc();
    let order = match &inspected.client_id {
        Some(id) => rule.pool.order(cfg.distribution, &Key::ClientId(id)),
        None => rule
            .pool
            .order(cfg.distribution, &tuple_key(cfg.distribution, peer, local)),
    };
    if order.is_empty() {
        tracing::debug!(rule = cfg.name, %peer, "no backend up; refusing");
        if let Some(level) = inspected.level {
            write_best_effort(&mut client, mqtt::connack_refusal(level)).await;
        }
        finish(&shared, cfg, "", Outcome::NoBackend);
        return;
    }

    // 2. Connect, trying the next choice when one fails (nothing was sent to the client yet).
    let mut backend = None;
    for &idx in order.iter().take(cfg.max_connect_attempts.get() as usize) {
        let member = &rule.pool.members[idx];
        let addr = member.cfg.addr_for_level(inspected.level.map(|l| l as u8));
        match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                backend = Some((member, addr, s));
                break;
            }
            Ok(Err(e)) => passive_failure(&shared, &rule, member, addr, &e.to_string()),
            Err(_) => passive_failure(&shared, &rule, member, addr, "connect timeout"),
        }
    }
    let Some((member, backend_addr, mut server)) = backend else {
        if let Some(level) = inspected.level {
            write_best_effort(&mut client, mqtt::connack_refusal(level)).await;
        }
        finish(&shared, cfg, "", Outcome::ConnectFailed);
        return;
    };
    set_socket_options(&server);

    // 3. Proxy.
    let bid = member.cfg.id.as_str();
    let info = Arc::new(ConnInfo {
        id: shared.conns.next_id(),
        rule: cfg.name.clone(),
        peer,
        backend: bid.to_string(),
        backend_addr,
        client_id: inspected.client_id.clone(),
        since: SystemTime::now(),
        started: Instant::now(),
        bytes_in: AtomicU64::new(0),
        bytes_out: AtomicU64::new(0),
    });
    member.state.conn_opened();
    shared.conns.insert(info.clone());
    let active = m.connections_active.with_label_values(&[&cfg.name, bid]);
    active.inc();
    tracing::debug!(rule = cfg.name, %peer, backend = bid, %backend_addr, client_id = ?info.client_id, "proxying");

    let outcome = if let Err(e) = server.write_all(&inspected.buffered).await {
        tracing::debug!(backend = bid, error = %e, "backend failed while replaying the CONNECT");
        Outcome::BackendError
    } else {
        info.bytes_in
            .fetch_add(inspected.buffered.len() as u64, Ordering::Relaxed);
        inspected.buffered = Vec::new();
        relay(&shared, cfg, member, &info, client, server).await
    };

    active.dec();
    shared.conns.remove(info.id);
    member.state.conn_closed();
    finish(&shared, cfg, bid, outcome);
}

/// A client-traffic connect failure: counted against the backend (passive health).
fn passive_failure(shared: &Shared, rule: &RuleRt, member: &Member, addr: SocketAddr, why: &str) {
    let pool = &rule.pool.cfg;
    tracing::debug!(pool = pool.name, backend = member.cfg.id, %addr, why, "backend connect failed");
    shared
        .metrics
        .passive_failures_total
        .with_label_values(&[&pool.name, &member.cfg.id])
        .inc();
    let t = member.state.observe(
        false,
        pool.probe.up_threshold.get(),
        pool.probe.down_threshold.get(),
    );
    if t.is_some() {
        tracing::warn!(pool = pool.name, backend = member.cfg.id, %addr, why, "backend marked down by failed client connects");
        shared
            .metrics
            .backend_up
            .with_label_values(&[&pool.name, &member.cfg.id])
            .set(0);
    }
}

fn finish(shared: &Shared, cfg: &Rule, backend: &str, outcome: Outcome) {
    shared
        .metrics
        .connections_total
        .with_label_values(&[&cfg.name, backend, outcome.label()])
        .inc();
}

/// Writes a packet the LB itself sends (a refusing CONNACK) before closing; the client may
/// already be gone, which is fine.
async fn write_best_effort(client: &mut TcpStream, bytes: &[u8]) {
    if let Err(e) = client.write_all(bytes).await {
        tracing::debug!(error = %e, "could not tell the client why it is refused");
    }
    if let Err(e) = client.shutdown().await {
        tracing::debug!(error = %e, "shutdown after refusal");
    }
}

/// Copies both ways with the rule's idle timeout, closing early on backend-down (when the
/// rule says so) or when shutdown's grace period is over.
async fn relay(
    shared: &Shared,
    cfg: &Rule,
    member: &Member,
    info: &ConnInfo,
    mut client: TcpStream,
    mut server: TcpStream,
) -> Outcome {
    let outcome = copy_until_done(shared, cfg, member, info, &mut client, &mut server).await;
    if outcome == Outcome::IdleTimeout && cfg.reset_on_idle {
        // Azure's "TCP reset on idle": both ends learn at once that the flow is gone.
        for s in [&client, &server] {
            if let Err(e) = SockRef::from(s).set_linger(Some(Duration::ZERO)) {
                tracing::debug!(error = %e, "SO_LINGER 0 not set; closing with FIN");
            }
        }
    }
    outcome
}

async fn copy_until_done(
    shared: &Shared,
    cfg: &Rule,
    member: &Member,
    info: &ConnInfo,
    client: &mut TcpStream,
    server: &mut TcpStream,
) -> Outcome {
    // The streams are only borrowed: nothing sends a FIN when the copy ends, so a reset on
    // idle reaches the peers as a plain RST.
    let copy = Bidi {
        client: &*client,
        server: &*server,
        up: Dir::default(),
        down: Dir::default(),
        bytes_in: &info.bytes_in,
        bytes_out: &info.bytes_out,
    };

    let labels_in =
        shared
            .metrics
            .bytes_total
            .with_label_values(&[&cfg.name, &member.cfg.id, "in"]);
    let labels_out =
        shared
            .metrics
            .bytes_total
            .with_label_values(&[&cfg.name, &member.cfg.id, "out"]);
    let (mut seen_in, mut seen_out) = (0u64, 0u64);
    let mut fold = |info: &ConnInfo| {
        let (i, o) = (
            info.bytes_in.load(Ordering::Relaxed),
            info.bytes_out.load(Ordering::Relaxed),
        );
        labels_in.inc_by(i - seen_in);
        labels_out.inc_by(o - seen_out);
        let moved = i != seen_in || o != seen_out;
        (seen_in, seen_out) = (i, o);
        moved
    };
    // The watchdog ticks a few times per idle period; bytes seen since the last tick reset
    // the idle clock and are folded into `mqlb_bytes_total`.
    let tick = (cfg.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_activity = tokio::time::Instant::now();
    let backend_down = member.state.down.notified();
    tokio::pin!(copy, backend_down);
    backend_down.as_mut().enable();
    let watch_down = cfg.close_on_backend_down;
    if watch_down && !member.state.is_up() {
        fold(info);
        return Outcome::BackendDown;
    }

    let outcome = loop {
        tokio::select! {
            r = &mut copy => break match r {
                Ok(()) => Outcome::Closed,
                Err((who, e)) => {
                    let o = match who {
                        Peer::Client => Outcome::ClientError,
                        Peer::Backend => Outcome::BackendError,
                    };
                    tracing::debug!(rule = cfg.name, peer = %info.peer, backend = member.cfg.id, outcome = o.label(), error = %e, "connection ended with an error");
                    o
                }
            },
            _ = ticker.tick() => {
                let now = tokio::time::Instant::now();
                if fold(info) {
                    last_activity = now;
                } else if now.duration_since(last_activity) >= cfg.idle_timeout {
                    break Outcome::IdleTimeout;
                }
            }
            _ = &mut backend_down, if watch_down => break Outcome::BackendDown,
            _ = shared.hard_stop.cancelled() => break Outcome::Shutdown,
        }
    };
    fold(info);
    outcome
}
