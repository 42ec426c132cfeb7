//! One task per client connection: read the CONNECT when the rule routes by client ID, pick a
//! backend, connect (trying the next choice when one fails before any byte went back), replay
//! the buffered bytes, then copy both ways until one side is done, the connection idles out,
//! the backend goes down (if the rule says so) or shutdown's grace runs out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mqlb_config::{Distribution, Fallback, NonMqtt, Rule};
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::lb::Shared;
use crate::metrics::Metrics;
use crate::mqtt::{self, parse_connect, ConnectError, ProtocolLevel, Refusal};
use crate::relay::Relay;
use crate::select::Key;
use crate::snapshot::{Member, RuleRt};
use crate::state::{ConnInfo, Source};

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
    /// The backend's admission queue was full (`max_queue`).
    QueueFull,
    /// No connect slot of the backend came free within `queue_timeout`.
    QueueTimeout,
}

impl Outcome {
    pub const ALL: [Outcome; 11] = [
        Outcome::Closed,
        Outcome::ClientError,
        Outcome::BackendError,
        Outcome::IdleTimeout,
        Outcome::BackendDown,
        Outcome::Shutdown,
        Outcome::ConnectFailed,
        Outcome::NoBackend,
        Outcome::Rejected,
        Outcome::QueueFull,
        Outcome::QueueTimeout,
    ];

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
            Outcome::QueueFull => "queue_full",
            Outcome::QueueTimeout => "queue_timeout",
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
    /// A CONNECT the LB must refuse (the level, once it was read).
    #[error("{0}")]
    Parse(ConnectError, Option<ProtocolLevel>),
    /// The client ID had not ended within the limit (the level, once it was read).
    #[error("no client ID within the inspect byte limit")]
    Oversized(Option<ProtocolLevel>),
    #[error("no CONNECT within the inspect timeout")]
    Timeout,
    #[error("client closed before its CONNECT was complete")]
    Eof,
    #[error("reading the CONNECT: {0}")]
    Io(std::io::Error),
}

impl InspectFail {
    /// What the client is told before the close, if its version has a word for it.
    fn refusal(&self) -> Option<&'static [u8]> {
        let (level, why) = match self {
            InspectFail::Parse(ConnectError::UnsupportedLevel(_), _) => {
                (ProtocolLevel::V311, Refusal::UnsupportedVersion)
            }
            InspectFail::Parse(ConnectError::Malformed(_), level) => {
                ((*level)?, Refusal::Malformed)
            }
            InspectFail::Parse(ConnectError::Protocol(_), level) => {
                ((*level)?, Refusal::ProtocolError)
            }
            InspectFail::Oversized(level) => ((*level)?, Refusal::PacketTooLarge),
            _ => return None,
        };
        mqtt::connack(level, why)
    }

    fn reason(&self) -> &'static str {
        match self {
            InspectFail::Parse(e, _) => e.reason(),
            InspectFail::Oversized(_) => "oversized",
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
            Ok(None) if buf.len() >= max_bytes => {
                return Err(InspectFail::Oversized(mqtt::level_of(&buf)))
            }
            Ok(None) => {}
            Err(e @ ConnectError::NotMqtt(_)) => return Ok((buf, Err(e))),
            Err(e) => return Err(InspectFail::Parse(e, mqtt::level_of(&buf))),
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

/// Serves one client connection from accept to close: the future of its task.
///
/// The connect phase runs boxed, so its state (inspect buffers, connect attempts and their
/// timers, the accepted addresses) is freed once the backend answers; the task then holds only
/// what the copy needs, which is what thousands of idle MQTT sessions cost. (A plain `fn`, so
/// the arguments live in the box, not also in the task.)
pub(crate) fn handle(
    shared: Arc<Shared>,
    rule: Arc<RuleRt>,
    client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    set_options: bool,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    // The LB's own data-path probe: served like a client, counted as nothing.
    let client_traffic = !shared.own_probes.contains(peer);
    let rule_is_raw = rule.cfg.distribution != Distribution::MqttClientId;
    let connect = Box::pin(establish(
        shared.clone(),
        rule,
        client,
        peer,
        local,
        set_options,
        client_traffic,
    ));
    // Its raw-TCP form only checks that the frontend accepts: closed here, no backend bothered.
    let probe_only = !client_traffic && rule_is_raw;
    async move {
        if probe_only {
            return;
        }
        let Some((mut client, mut server, info)) = connect.await else {
            return;
        };
        if !client_traffic {
            let limit = info.rule.pool.cfg.probe.timeout;
            // The probe hangs up after its CONNACK; a broken one is cut at its own timeout.
            if let Ok(Err(e)) = tokio::time::timeout(
                limit,
                tokio::io::copy_bidirectional(&mut client, &mut server),
            )
            .await
            {
                tracing::debug!(error = %e, "data-path probe connection ended with an error");
            }
            return;
        }
        let cfg = &info.rule.cfg;
        let member = &info.rule.pool.members[info.member];
        member.state.conn_opened();
        shared.conns.insert(info.clone());
        let mm = info.rule.member_metrics(&shared.metrics, info.member);
        mm.active.inc();
        let outcome = Relay::new(&shared, &info, client, server).await;
        mm.active.dec();
        shared.conns.remove(info.id);
        member.state.conn_closed();
        mm.finish(&shared.metrics, cfg, info.backend(), outcome);
    }
}

/// The connect phase: inspects the CONNECT (client-ID rules), picks a backend, connects
/// (trying the next choice when one fails before any byte went back) and replays the
/// buffered bytes. `None` when the connection ended here (counted already).
async fn establish(
    shared: Arc<Shared>,
    rule: Arc<RuleRt>,
    mut client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    set_options: bool,
    client_traffic: bool,
) -> Option<(TcpStream, TcpStream, Arc<ConnInfo>)> {
    if set_options {
        set_socket_options(&client);
    }
    let (shared, rule) = (&*shared, &rule);
    let cfg = &rule.cfg;
    let tally = Tally {
        shared,
        rule,
        client_traffic,
    };

    // 1. Decide the key: inspect the CONNECT for client-ID rules.
    let mut inspected = Inspected {
        buffered: Vec::new(),
        level: None,
        client_id: None,
    };
    // The rule's own distribution unless the CONNECT forces the fallback.
    let mut fallback = None;
    if cfg.distribution == Distribution::MqttClientId {
        let read = tokio::time::timeout(
            cfg.inspect_timeout,
            read_connect(&mut client, cfg.inspect_max_bytes as usize),
        )
        .await
        .unwrap_or(Err(InspectFail::Timeout));
        match read {
            Ok((buf, Ok(c))) => {
                inspected.buffered = buf;
                inspected.level = Some(c.level);
                if c.client_id.is_empty() {
                    tally.connect_error("empty_client_id");
                    match cfg.fallback {
                        Fallback::FiveTuple => fallback = Some("fallback-five-tuple"),
                        Fallback::Reject => {
                            let no = mqtt::connack(c.level, Refusal::IdentifierRejected);
                            refuse(&mut client, no).await;
                            tally.end(Outcome::Rejected);
                            return None;
                        }
                    }
                } else {
                    inspected.client_id = Some(c.client_id);
                }
            }
            Ok((buf, Err(e))) => {
                tracing::debug!(rule = cfg.name, %peer, error = %e, "first bytes are not MQTT");
                tally.connect_error(e.reason());
                match cfg.non_mqtt {
                    NonMqtt::Forward => {
                        inspected.buffered = buf;
                        fallback = Some("non-mqtt-five-tuple");
                    }
                    NonMqtt::Refuse => {
                        refuse(&mut client, None).await;
                        tally.end(Outcome::Rejected);
                        return None;
                    }
                }
            }
            Err(fail) => {
                tracing::debug!(rule = cfg.name, %peer, reason = fail.reason(), error = %fail, "refusing: unusable CONNECT");
                tally.connect_error(fail.reason());
                refuse(&mut client, fail.refusal()).await;
                tally.end(Outcome::Rejected);
                return None;
            }
        }
    }
    tally.routed(fallback);
    let order = match &inspected.client_id {
        Some(id) => rule.pool.order(cfg.distribution, &Key::ClientId(id)),
        None => rule
            .pool
            .order(cfg.distribution, &tuple_key(cfg.distribution, peer, local)),
    };
    if order.is_empty() {
        tracing::debug!(rule = cfg.name, %peer, "no backend up; refusing");
        let no = inspected
            .level
            .and_then(|l| mqtt::connack(l, Refusal::ServerUnavailable));
        refuse(&mut client, no).await;
        tally.end(Outcome::NoBackend);
        return None;
    }

    // 2. Connect and replay what the inspection read, trying the next choice when either
    //    fails (nothing was sent to the client yet). Each connect waits for a slot of its
    //    backend's admission first: a burst queues here instead of flooding the broker.
    let mut backend = None;
    let mut outcome = Outcome::ConnectFailed;
    let admission = &rule.pool.cfg.admission;
    for &idx in order.iter().take(cfg.max_connect_attempts.get() as usize) {
        let member = &rule.pool.members[idx];
        let state = &member.state;
        let _slot = match state.pending.admit(admission, || state.since_up()).await {
            Ok(slot) => slot,
            Err(refused) => {
                // The backend is busy, not broken: no passive failure, and not the next
                // backend either (the client belongs on this one); it may retry.
                tracing::debug!(rule = cfg.name, %peer, backend = member.cfg.id, ?refused, "admission refused");
                outcome = match refused {
                    crate::pending::Refused::QueueFull => Outcome::QueueFull,
                    crate::pending::Refused::QueueTimeout => Outcome::QueueTimeout,
                };
                break;
            }
        };
        let addr = member.cfg.addr_for_level(inspected.level.map(|l| l as u8));
        let attempt = connect_and_replay(addr, &inspected.buffered);
        match tokio::time::timeout(cfg.connect_timeout, attempt).await {
            Ok(Ok(s)) => {
                backend = Some((idx, addr, s));
                break;
            }
            Ok(Err(e)) => tally.connect_failed(member, addr, &e.to_string()),
            Err(_) => tally.connect_failed(member, addr, "connect timeout"),
        }
    }
    let Some((idx, backend_addr, server)) = backend else {
        let no = inspected
            .level
            .and_then(|l| mqtt::connack(l, Refusal::ServerUnavailable));
        refuse(&mut client, no).await;
        tally.end(outcome);
        return None;
    };
    let info = Arc::new(ConnInfo::new(
        shared.conns.next_id(),
        rule.clone(),
        idx,
        peer,
        inspected.level.map(|l| l as u8),
        inspected.client_id.map(String::into_boxed_str),
        inspected.buffered.len() as u64,
    ));
    tracing::debug!(rule = cfg.name, %peer, backend = info.backend(), %backend_addr, client_id = ?info.client_id, "proxying");
    Some((client, server, info))
}

/// Opens the backend leg and sends it the bytes read while inspecting.
///
/// The socket is made by hand rather than by `TcpStream::connect`: TCP_NODELAY is set on it
/// (MQTT packets are small and latency matters) and TCP keepalive (a backend host that
/// vanished is noticed on a quiet connection too) before connecting and, when there are bytes
/// to replay, the replay itself reports a refused or failed connect, which saves the `SO_ERROR`
/// query per connection.
async fn connect_and_replay(addr: SocketAddr, replay: &[u8]) -> std::io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&keepalive())?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        // Under way: a non-blocking connect answers EINPROGRESS.
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    // Writable once the handshake is done, or once it failed (the error is then reported by
    // the write below or by take_error).
    stream.writable().await?;
    if replay.is_empty() {
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    } else {
        stream.write_all(replay).await?;
    }
    Ok(stream)
}

/// Where the connect phase counts what happens: the metrics and the backends' passive health
/// for client traffic; nowhere for the LB's own data-path probe, which must neither inflate
/// the client counts nor count against `down_threshold` beside the real probe.
#[derive(Clone, Copy)]
struct Tally<'a> {
    shared: &'a Shared,
    rule: &'a RuleRt,
    client_traffic: bool,
}

impl Tally<'_> {
    fn connect_error(&self, reason: &str) {
        if self.client_traffic {
            self.shared
                .metrics
                .mqtt_connect_errors_total
                .with_label_values(&[&self.rule.cfg.name, reason])
                .inc();
        }
    }

    /// The routing decision: the rule's distribution, or the fallback method it fell to.
    fn routed(&self, fallback: Option<&str>) {
        if !self.client_traffic {
            return;
        }
        let m = &self.shared.metrics;
        match fallback {
            None => self.rule.routed(m).inc(),
            Some(method) => m
                .route_decisions_total
                .with_label_values(&[&self.rule.cfg.name, method])
                .inc(),
        }
    }

    /// A connection that ended before it reached a backend.
    fn end(&self, outcome: Outcome) {
        if self.client_traffic {
            count_end(&self.shared.metrics, &self.rule.cfg, "", outcome);
        }
    }

    /// A connect to a backend failed: counted against it (passive health).
    fn connect_failed(&self, member: &Member, addr: SocketAddr, why: &str) {
        let (shared, pool) = (self.shared, &self.rule.pool.cfg);
        tracing::debug!(pool = pool.name, backend = member.cfg.id, %addr, why, own_probe = !self.client_traffic, "backend connect failed");
        if !self.client_traffic {
            return;
        }
        shared
            .metrics
            .passive_failures_total
            .with_label_values(&[&pool.name, &member.cfg.id])
            .inc();
        if shared
            .observe_health(&member.state, false, &pool.probe, Source::Passive)
            .is_some()
        {
            tracing::warn!(pool = pool.name, backend = member.cfg.id, %addr, why, "backend marked down by failed client connects");
            shared
                .metrics
                .backend_up
                .with_label_values(&[&pool.name, &member.cfg.id])
                .set(0);
        }
    }
}

/// `mqlb_connections_total` by label lookup: every outcome but the common one, which
/// [`MemberMetrics::finish`](crate::snapshot::MemberMetrics) counts by a cached handle.
pub(crate) fn count_end(m: &Metrics, cfg: &Rule, backend: &str, outcome: Outcome) {
    m.connections_total
        .with_label_values(&[&cfg.name, backend, outcome.label()])
        .inc();
}

/// Sends the refusing CONNACK, if there is one for the client's version, and closes; the
/// client may already be gone, which is fine.
async fn refuse(client: &mut TcpStream, connack: Option<&[u8]>) {
    let told = match connack {
        Some(bytes) => match client.write_all(bytes).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "could not tell the client why it is refused");
                false
            }
        },
        None => false,
    };
    if let Err(e) = client.shutdown().await {
        tracing::debug!(error = %e, "shutdown after refusal");
    }
    if told {
        // A lingering close: what the client still sends (the rest of an oversized CONNECT) is
        // read and dropped until it closes, for at most 64 KiB and 1 s. Closing with unread bytes
        // sends an RST, which can destroy the CONNACK in the client's buffers before it reads it.
        let mut sink = [0u8; 2048];
        let drain = async {
            let mut total = 0;
            while total < 64 * 1024 {
                match client.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(1), drain)
            .await
            .is_err()
        {
            tracing::debug!("refused client kept its connection open; closing");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// The backend leg gets TCP_NODELAY and keepalive, and carries the replayed bytes.
    #[tokio::test]
    async fn backend_leg_is_tuned_and_replays() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let s = connect_and_replay(addr, b"CONNECT").await.unwrap();
        assert!(s.nodelay().unwrap());
        assert!(SockRef::from(&s).keepalive().unwrap());
        let (mut a, _) = l.accept().await.unwrap();
        let mut got = [0u8; 7];
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"CONNECT");
    }

    /// A refused connect is an error, whether or not there are bytes to replay (the replay or
    /// SO_ERROR reports it), so the next backend is tried.
    #[tokio::test]
    async fn refused_connect_is_an_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(connect_and_replay(addr, b"CONNECT").await.is_err());
        assert!(connect_and_replay(addr, b"").await.is_err());
    }
}
