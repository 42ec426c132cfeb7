//! A client connection's path, one task per connection, in the order it happens: on a TLS
//! frontend [`tls`] completes the handshake first; [`inspect`] reads the first bytes (the
//! CONNECT, on a client-ID rule), [`route`] decides from them what to do (pure), [`connect`]
//! opens the backend leg (TLS again on a `pool.tls` pool) and replays what was read
//! (trying the next choice when one fails before any byte went back), [`relay`] copies both ways
//! until one side is done, the connection idles out, its backend goes down (if the rule says so)
//! or shutdown's grace runs out; [`Outcome`] names how it ended.

mod accept_proxy;
pub(crate) mod connect;
mod copy;
mod frames;
mod inspect;
mod relay;
mod route;
#[cfg(target_os = "linux")]
mod splice;
mod sweep;
mod tls;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mqlb_config::{Distribution, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend::Source;
use crate::limits::{Admitted, SourcePlace};
use crate::mqtt::{self, Refusal};
pub use crate::outcome::Outcome;
use crate::shared::Shared;
use crate::snapshot::{Member, RuleRt};
use crate::state::ConnInfo;
pub(crate) use accept_proxy::HeaderFail;
pub(crate) use connect::{keepalive, set_keepalive, set_socket_options};
use connect::{ConnectFail, Replay, ServerLeg, Upstream};
use copy::Leg;
use inspect::Inspection;
use relay::Relay;
use route::{Decision, Method};
pub(crate) use sweep::sweep_idle;
use tls::ClientLeg;
pub(crate) use tls::HandshakeFail;

/// Serves one client connection from accept to close: the future of its task. `place` is its
/// place in the connection limits' counts, held to the end (boxed: a frontend without limits
/// has none, and its idle connections pay one pointer for it, not the counts' handles).
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
    mut place: Option<Box<Admitted>>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    // The LB's own data-path probe: served like a client, counted as nothing.
    let client_traffic = !shared.own_probes.contains(peer);
    if client_traffic {
        rule.opened(&shared.metrics).inc();
    }
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
        let Some((mut client, mut server, info, source)) = connect.await else {
            return;
        };
        // A client a PROXY header named holds its place among its source's connections.
        if let (Some(p), Some(s)) = (place.as_mut(), source) {
            p.source = Some(s);
        }
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
        match (client, server) {
            (ClientLeg::Plain(c), ServerLeg::Plain(s)) => proxy(&shared, &info, c, s).await,
            (ClientLeg::Plain(c), ServerLeg::Tls(s)) => proxy(&shared, &info, c, s).await,
            (ClientLeg::Tls(c), ServerLeg::Plain(s)) => proxy(&shared, &info, c, s).await,
            (ClientLeg::Tls(c), ServerLeg::Tls(s)) => proxy(&shared, &info, c, s).await,
        }
    }
}

/// The established connection, counted while it lives: the relay until it ends.
async fn proxy(shared: &Shared, info: &Arc<ConnInfo>, client: impl Leg, server: impl Leg) {
    let cfg = &info.rule.cfg;
    let member = &info.rule.pool.members[info.member];
    member.state.conn_opened();
    shared.conns.insert(info.clone());
    let mm = info.rule.member_metrics(&shared.metrics, info.member);
    mm.active.inc();
    let outcome = Relay::new(shared, info, client, server).await;
    mm.active.dec();
    shared.conns.remove(info.id);
    member.state.conn_closed();
    mm.finish(&shared.metrics, cfg, info.backend(), outcome);
}

/// What the connect phase hands the relay: both legs, the connection's entry, and the place
/// among its source's connections of a client a PROXY header named.
type Established = (ClientLeg, ServerLeg, Arc<ConnInfo>, Option<SourcePlace>);

/// The connect phase: the PROXY header (from a source the frontend trusts), TLS (on a frontend
/// that terminates it), inspect, route, connect. `None` when the connection ended here
/// (counted already).
async fn establish(
    shared: Arc<Shared>,
    rule: Arc<RuleRt>,
    mut client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    set_options: bool,
    client_traffic: bool,
) -> Option<Established> {
    let (shared, rule) = (&*shared, &rule);
    let cfg = &rule.cfg;
    if set_options {
        set_socket_options(&client, &cfg.tcp_keepalive);
    } else if cfg.tcp_keepalive != TcpKeepalive::default() {
        // The client socket inherited the listener's keepalive, which is the default one.
        set_keepalive(&client, &cfg.tcp_keepalive);
    }
    let tally = Tally {
        shared,
        rule,
        client_traffic,
    };

    // One deadline for the PROXY header, the TLS handshake and the CONNECT after them.
    let deadline = tokio::time::Instant::now() + cfg.inspect_timeout;
    let (peer, local, early, source) = if client_traffic && rule.trusts_proxy(peer.ip()) {
        proxied(tally, &mut client, peer, local, deadline).await?
    } else {
        (peer, local, Vec::new(), None)
    };
    let (mut client, early) = terminate(tally, client, peer, deadline, early).await?;
    let (buffered, inspection) = inspect::inspect(cfg, &mut client, deadline, early).await;
    match &inspection {
        Inspection::NotMqtt(e) => {
            tracing::debug!(rule = cfg.name, %peer, error = %e, "first bytes are not MQTT")
        }
        Inspection::Unusable(fail) => {
            tracing::debug!(rule = cfg.name, %peer, reason = fail.reason(), error = %fail, "refusing: unusable CONNECT")
        }
        _ => {}
    }
    // The client certificate's CN, read (from its DER) only where something uses it.
    let cn = (rule.client_id_is_cn || rule.pool.cfg.send_proxy.is_some())
        .then(|| client.peer_cn())
        .flatten();
    let verdict = rule
        .client_id_is_cn
        .then(|| route::check_cn(&inspection, cn.as_deref()))
        .flatten()
        .unwrap_or_else(|| route::decide(cfg, &inspection, peer, local));
    if let Some(reason) = verdict.connect_error {
        tally.connect_error(reason);
    }
    let (key, method) = match verdict.decision {
        Decision::Route { key, method } => (key, method),
        Decision::Refuse { connack, outcome } => {
            refuse(&mut client, connack).await;
            tally.end(outcome);
            return None;
        }
    };
    tally.routed(method);
    let level = inspection.level();
    let order = rule.pool.order(cfg.distribution, &key);
    if order.is_empty() {
        tracing::debug!(rule = cfg.name, %peer, "no backend up; refusing");
        let no = level.and_then(|l| mqtt::connack(l, Refusal::ServerUnavailable));
        refuse(&mut client, no).await;
        tally.end(Outcome::NoBackend);
        return None;
    }

    // A `send_proxy` pool's backends get the client's address first, whichever one is tried.
    let replay = match replay(rule, &client, cn.as_deref(), (peer, local), &buffered) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(rule = cfg.name, %peer, error = %e, "PROXY header not built; refusing");
            tally.end(Outcome::Rejected);
            return None;
        }
    };

    // Connect and replay what the inspection read, trying the next choice when either fails
    // (nothing was sent to the client yet). Each connect waits for a slot of its backend's
    // admission first: a burst queues here instead of flooding the broker.
    let mut backend = None;
    let mut outcome = Outcome::ConnectFailed;
    let admission = &rule.pool.cfg.admission;
    let tls = rule.pool.cfg.tls.as_ref();
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
                    crate::backend::pending::Refused::QueueFull => Outcome::QueueFull,
                    crate::backend::pending::Refused::QueueTimeout => Outcome::QueueTimeout,
                };
                break;
            }
        };
        let addr = member.cfg.addr_for_level(level.map(|l| l as u8));
        let upstream = tls.map(|t| Upstream {
            config: t.client.config(),
            name: t.server_name_for(addr.ip()),
        });
        let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
        let ka = &cfg.tcp_keepalive;
        let from = rule.pool.cfg.source;
        match connect::connect(addr, from, &replay, ka, upstream, deadline).await {
            Ok(s) => {
                backend = Some((idx, addr, s));
                break;
            }
            Err(e) => tally.connect_failed(member, addr, &e),
        }
    }
    let Some((idx, backend_addr, server)) = backend else {
        let no = level.and_then(|l| mqtt::connack(l, Refusal::ServerUnavailable));
        refuse(&mut client, no).await;
        tally.end(outcome);
        return None;
    };
    // Listed as the connection's client ID: the CONNECT's, or on an `sni` rule the server name.
    let client_id = match inspection {
        Inspection::Connect { client_id, .. } if method == Method::Rule => {
            Some(client_id.into_boxed_str())
        }
        Inspection::Hello { sni: Some(name) } if method == Method::Rule => {
            Some(name.into_boxed_str())
        }
        _ => None,
    };
    let mut info = ConnInfo::new(
        shared.conns.next_id(),
        rule.clone(),
        idx,
        peer,
        level.map(|l| l as u8),
        client_id,
        buffered.len() as u64,
    );
    info.tls = client.tls_version();
    let info = Arc::new(info);
    tracing::debug!(rule = cfg.name, %peer, backend = info.backend(), %backend_addr, client_id = ?info.client_id, "proxying");
    Some((client, server, info, source))
}

/// The addresses a trusted LB's PROXY header names (the socket's own for a LOCAL one), the
/// client's bytes that came after it, and its place under the per-source limits, now that the
/// source is known. `None` when the header is missing, bad, late, or its source over a limit:
/// closed and counted (a refused source is reset, as at accept).
async fn proxied(
    tally: Tally<'_>,
    client: &mut TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<(SocketAddr, SocketAddr, Vec<u8>, Option<SourcePlace>)> {
    let (shared, rule) = (tally.shared, tally.rule);
    let cfg = &rule.cfg;
    let (header, early) = match accept_proxy::read(client, deadline).await {
        Ok(h) => h,
        Err(fail) => {
            tracing::debug!(rule = cfg.name, frontend = cfg.frontend, %peer, reason = fail.reason(), error = %fail, "refusing: PROXY header");
            shared
                .metrics
                .proxy_header_errors_total
                .with_label_values(&[&cfg.frontend, fail.reason()])
                .inc();
            tally.end(Outcome::Rejected);
            return None;
        }
    };
    let (client_addr, dst) = header.addrs.unwrap_or((peer, local));
    tracing::debug!(rule = cfg.name, via = %peer, client = %client_addr, "PROXY header read");
    let limits = &rule.limits;
    let mut source = None;
    if limits.max_connections_per_source.is_some() || limits.source_rate.is_some() {
        let now = std::time::Instant::now();
        match shared
            .sources
            .admit_source(&cfg.frontend, client_addr.ip(), limits, now)
        {
            Ok(place) => source = Some(place),
            Err(why) => {
                shared
                    .metrics
                    .refused_total
                    .with_label_values(&[&cfg.frontend, why.label()])
                    .inc();
                tracing::debug!(frontend = cfg.frontend, client = %client_addr, via = %peer, reason = why.label(), "connection refused by a limit");
                if let Err(e) = socket2::SockRef::from(&*client).set_linger(Some(Duration::ZERO)) {
                    tracing::debug!(error = %e, "SO_LINGER 0 not set; closing with FIN");
                }
                tally.end(Outcome::Rejected);
                return None;
            }
        }
    }
    Some((client_addr, dst, early, source))
}

/// What a backend of the rule's pool is sent: with `send_proxy`, a PROXY header naming `peer`
/// and the address it connected to (`local`, or the socket's own when the frontend listens on
/// a wildcard address), with the TLS facts and the client certificate's `cn` when TLS was
/// terminated, in clear; then `buffered`, in the same write on a plain pool, inside TLS on a
/// `pool.tls` one.
fn replay<'b>(
    rule: &RuleRt,
    client: &ClientLeg,
    cn: Option<&str>,
    addrs: (SocketAddr, SocketAddr),
    buffered: &'b [u8],
) -> std::io::Result<Replay<'b>> {
    let header = match rule.pool.cfg.send_proxy {
        None => None,
        Some(version) => Some(proxy_header(version, client, cn, addrs)?),
    };
    let tls = rule.pool.cfg.tls.is_some();
    Ok(match (header, tls) {
        (None, false) => Replay {
            clear: Cow::Borrowed(buffered),
            sealed: &[],
        },
        (None, true) => Replay {
            clear: Cow::Borrowed(&[]),
            sealed: buffered,
        },
        (Some(mut header), false) => {
            header.extend_from_slice(buffered);
            Replay {
                clear: Cow::Owned(header),
                sealed: &[],
            }
        }
        (Some(header), true) => Replay {
            clear: Cow::Owned(header),
            sealed: buffered,
        },
    })
}

/// The PROXY header of [`replay`].
fn proxy_header(
    version: mqlb_config::ProxyVersion,
    client: &ClientLeg,
    cn: Option<&str>,
    (peer, local): (SocketAddr, SocketAddr),
) -> std::io::Result<Vec<u8>> {
    let dst = if local.ip().is_unspecified() {
        client.socket().local_addr()?
    } else {
        local
    };
    let tls = client
        .tls_version()
        .map(|v| crate::proxy_protocol::TlsFacts {
            version: crate::proxy_protocol::tls_version_name(v),
            // The verified client certificate's CN (mTLS), when there is one.
            client_cn: cn,
        });
    crate::proxy_protocol::encode(version, peer, dst, tls)
}

/// The client leg the rest of the connection reads: the TLS stream once its handshake is done
/// on a frontend that terminates TLS, else the socket as it is. `None` when the handshake
/// failed (closed and counted). The LB's own probe speaks plain MQTT to any frontend: it is
/// known by its address before any byte, and checks the route past the handshake.
///
/// `early` is what the client sent that was read already (past a PROXY header): the start of
/// the handshake, or on a plain frontend the start of the CONNECT, returned for the inspection.
async fn terminate(
    tally: Tally<'_>,
    client: TcpStream,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    early: Vec<u8>,
) -> Option<(ClientLeg, Vec<u8>)> {
    let (rule, metrics) = (tally.rule, &tally.shared.metrics);
    let Some(server) = rule.tls.as_ref().filter(|_| tally.client_traffic) else {
        return Some((ClientLeg::Plain(client), early));
    };
    match tls::accept(server.config(), client, deadline, &early).await {
        Ok(s) => {
            rule.tls_handshakes(metrics).inc();
            Some((ClientLeg::Tls(Box::new(s)), Vec::new()))
        }
        Err(fail) => {
            let cfg = &rule.cfg;
            tracing::debug!(rule = cfg.name, frontend = cfg.frontend, %peer, reason = fail.reason(), error = %fail, "TLS handshake failed");
            metrics
                .tls_handshake_errors_total
                .with_label_values(&[&cfg.frontend, fail.reason()])
                .inc();
            tally.end(Outcome::Rejected);
            None
        }
    }
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
    fn routed(&self, method: Method) {
        if !self.client_traffic {
            return;
        }
        let m = &self.shared.metrics;
        match method.fallback_label() {
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
            self.shared
                .metrics
                .count_end(&self.rule.cfg.name, "", outcome);
        }
    }

    /// A connect to a backend failed: counted against it (passive health). A failed TLS
    /// handshake is counted by reason too, and logged as a warning: a certificate that does not
    /// verify is a misconfiguration or an impostor, not a broker that is slow.
    fn connect_failed(&self, member: &Member, addr: SocketAddr, why: &ConnectFail) {
        let (shared, pool) = (self.shared, &self.rule.pool.cfg);
        tracing::debug!(pool = pool.name, backend = member.cfg.id, %addr, %why, own_probe = !self.client_traffic, "backend connect failed");
        if !self.client_traffic {
            return;
        }
        if let ConnectFail::Tls(fail) = why {
            tracing::warn!(pool = pool.name, backend = member.cfg.id, %addr, reason = fail.reason(), error = %fail, "TLS handshake with the backend failed; trying the next");
            shared
                .metrics
                .backend_tls_handshake_errors_total
                .with_label_values(&[&pool.name, &member.cfg.id, fail.reason()])
                .inc();
        }
        shared
            .metrics
            .passive_failures_total
            .with_label_values(&[&pool.name, &member.cfg.id])
            .inc();
        let names = (pool.name.as_str(), member.cfg.id.as_str());
        if shared
            .observe_health(names, &member.state, false, &pool.probe, Source::Passive)
            .is_some()
        {
            tracing::warn!(pool = pool.name, backend = member.cfg.id, %addr, %why, "backend marked down by failed client connects");
        }
    }
}

/// Sends the refusing CONNACK, if there is one for the client's version, and closes; the
/// client may already be gone, which is fine.
async fn refuse(client: &mut (impl AsyncRead + AsyncWrite + Unpin), connack: Option<&[u8]>) {
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
