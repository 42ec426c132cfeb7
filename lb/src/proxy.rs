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

use crate::lb::Shared;
use crate::mqtt::{self, parse_connect, ConnectError, ProtocolLevel};
use crate::select::Key;
use crate::snapshot::{Member, RuleRt};
use crate::state::ConnInfo;

/// Copy buffer per direction, held only while data flows (idle connections hold none, see
/// `pool`), so it can be large: 64 KiB moved bulk data ~1.3x faster than 16 KiB (lb-bench).
const COPY_BUF: usize = 64 * 1024;
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

/// Which side failed in one direction of the copy.
enum Side {
    Reader,
    Writer,
}

/// Copy buffers not in use, per worker thread: an idle connection holds none (it waits for
/// readiness first, see `Dir::poll`), and a busy one reuses them without an allocation per
/// packet.
mod pool {
    use std::cell::RefCell;

    /// Buffers kept per thread; beyond this they are freed.
    const KEEP: usize = 64;

    thread_local! {
        static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn take(size: usize) -> Vec<u8> {
        FREE.with(|f| f.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; size])
    }

    pub(super) fn give(buf: Vec<u8>) {
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(buf);
            }
        });
    }
}

/// One direction of a connection: a buffer only while bytes are in flight.
#[derive(Default)]
struct Dir {
    buf: Option<Vec<u8>>,
    pos: usize,
    len: usize,
    done: bool,
}

impl Dir {
    fn release(&mut self) {
        if let Some(b) = self.buf.take() {
            pool::give(b);
        }
    }

    /// Moves bytes `from` → `to` until EOF (then half-closes `to`) or until neither side is
    /// ready. Plain readiness polling instead of nested futures keeps a connection's task
    /// small: most connections are idle MQTT sessions, and this state is all they hold.
    fn poll(
        &mut self,
        cx: &mut std::task::Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        counter: &AtomicU64,
    ) -> std::task::Poll<Result<(), (Side, std::io::Error)>> {
        use std::io::ErrorKind::WouldBlock;
        use std::task::Poll;
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some(buf) = &self.buf {
                if self.pos < self.len {
                    match to.poll_write_ready(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err((Side::Writer, e))),
                        Poll::Ready(Ok(())) => {}
                    }
                    match to.try_write(&buf[self.pos..self.len]) {
                        Ok(n) => {
                            self.pos += n;
                            counter.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == WouldBlock => {}
                        Err(e) => return Poll::Ready(Err((Side::Writer, e))),
                    }
                    continue;
                }
            }
            match from.poll_read_ready(cx) {
                Poll::Pending => {
                    // Idle: the buffer goes back to the pool until the next data.
                    self.release();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err((Side::Reader, e))),
                Poll::Ready(Ok(())) => {}
            }
            let buf = self.buf.get_or_insert_with(|| pool::take(COPY_BUF));
            match from.try_read(buf) {
                Ok(0) => {
                    self.release();
                    self.done = true;
                    // Half-close: pass the FIN on and keep the other direction running.
                    return Poll::Ready(
                        SockRef::from(to)
                            .shutdown(std::net::Shutdown::Write)
                            .map_err(|e| (Side::Writer, e)),
                    );
                }
                Ok(n) => (self.pos, self.len) = (0, n),
                Err(e) if e.kind() == WouldBlock => self.release(),
                Err(e) => return Poll::Ready(Err((Side::Reader, e))),
            }
        }
    }
}

/// Both directions of a proxied connection; done when both saw EOF, failed when either failed
/// (the outcome names who).
struct Bidi<'a> {
    client: &'a TcpStream,
    server: &'a TcpStream,
    up: Dir,
    down: Dir,
    info: &'a ConnInfo,
}

impl std::future::Future for Bidi<'_> {
    type Output = Result<(), (Outcome, std::io::Error)>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let me = &mut *self;
        if let Poll::Ready(Err((side, e))) = me.up.poll(cx, me.client, me.server, &me.info.bytes_in)
        {
            let o = match side {
                Side::Reader => Outcome::ClientError,
                Side::Writer => Outcome::BackendError,
            };
            return Poll::Ready(Err((o, e)));
        }
        if let Poll::Ready(Err((side, e))) =
            me.down.poll(cx, me.server, me.client, &me.info.bytes_out)
        {
            let o = match side {
                Side::Reader => Outcome::BackendError,
                Side::Writer => Outcome::ClientError,
            };
            return Poll::Ready(Err((o, e)));
        }
        if me.up.done && me.down.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Bidi<'_> {
    fn drop(&mut self) {
        self.up.release();
        self.down.release();
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
        info,
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
                Err((o, e)) => {
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
