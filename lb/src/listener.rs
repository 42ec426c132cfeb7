//! Listening sockets and the accept loop. The accept loop does nothing but accept and hand
//! each connection to its own task: a slow client can never hold up the next one.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::conn;
use crate::limits::{accept_limits, Admitted, Refusal, SourcePlace};
use crate::shared::Shared;
use crate::snapshot::RuleRt;
use mqlb_http::lock;

/// Linux copies a listening socket's TCP_NODELAY and keepalive settings to the sockets it
/// accepts, which saves four syscalls per client connection.
pub(crate) const ACCEPTED_INHERIT_OPTIONS: bool = cfg!(target_os = "linux");

/// Binds a listening socket the way a load balancer needs it: `SO_REUSEADDR` (restart while
/// old connections sit in TIME_WAIT), the configured listen backlog, and the client-socket
/// options (TCP_NODELAY, keepalive) for accepted sockets to inherit. Not shareable: a second
/// socket on the same address fails to bind.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    TcpListener::from_std(listening_socket(addr, backlog, false)?.into())
}

fn new_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    Ok(socket)
}

/// Fails with `AddrInUse`, naming the process that holds the port where it can be found, when
/// anything listens on `addr` already. The LB's own sockets share their port among data
/// threads with `SO_REUSEPORT`, which would let a second LB (same user) bind beside a running
/// one and take part of its connections; a socket bound *without* `SO_REUSEPORT` conflicts
/// with every listener, so binding one first tells whether the port is really free.
pub fn ensure_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = new_socket(addr, false)?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            match crate::port::who_listens(addr) {
                Some(h) => format!("port {} is in use by {h}", addr.port()),
                None => format!("port {} is in use by another program", addr.port()),
            },
        )),
        Err(e) => Err(e),
    }
}

fn listening_socket(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<Socket> {
    let socket = new_socket(addr, reuse_port)?;
    if ACCEPTED_INHERIT_OPTIONS {
        socket.set_tcp_nodelay(true)?;
        // The default keepalive; a rule with its own sets it on each accepted socket.
        socket.set_tcp_keepalive(&crate::conn::keepalive(&Default::default()))?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket)
}

/// Binds one listening socket per data-path thread on `addr`, sharing the port with
/// `SO_REUSEPORT`: the kernel spreads new connections over them, so a connection wakes only
/// the thread that will serve it (one shared socket wakes every thread and all but one find
/// nothing to accept). Where SO_REUSEPORT is refused, one socket is shared by all threads.
/// `SO_REUSEPORT` is set even for one thread, so that a reload can bind a frontend's new
/// sockets before it closes the old ones; [`ensure_free`] keeps other programs out.
pub(crate) fn bind_group(
    addr: SocketAddr,
    backlog: u32,
    n: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let first = match listening_socket(addr, backlog, cfg!(unix)) {
        Ok(s) => s,
        Err(e) if e.kind() != io::ErrorKind::AddrInUse => {
            tracing::debug!(%addr, error = %e, "SO_REUSEPORT refused; one socket for all threads");
            return share(listening_socket(addr, backlog, false)?.into(), n);
        }
        Err(e) => return Err(e),
    };
    // Port 0 picked a port: the others join that one.
    let bound = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listening socket without an IP address"))?;
    let mut all: Vec<std::net::TcpListener> = vec![first.into()];
    for _ in 1..n {
        all.push(listening_socket(bound, backlog, true)?.into());
    }
    Ok(all)
}

/// `n` handles on one listening socket (the first is `l` itself), for `n` accept loops.
pub(crate) fn share(l: std::net::TcpListener, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let mut all = Vec::with_capacity(n.max(1));
    for _ in 1..n {
        all.push(l.try_clone()?);
    }
    all.push(l);
    Ok(all)
}

/// Checks the connection limits for a new connection and counts it in: `Ok(None)` where no
/// limit applies (nothing is counted then: a frontend without limits pays nothing per
/// connection), `Err(())` when refused (counted; logged at debug, so a flood floods no log).
fn admit(
    shared: &Arc<Shared>,
    frontend: &Arc<str>,
    frontend_live: &Arc<AtomicU32>,
    global_max: Option<u32>,
    rule: &RuleRt,
    peer: SocketAddr,
) -> Result<Option<Admitted>, ()> {
    let limits = &rule.limits;
    let unlimited = global_max.is_none()
        && limits.max_connections.is_none()
        && limits.max_connections_per_source.is_none()
        && limits.source_rate.is_none();
    if unlimited || shared.own_probes.contains(peer) {
        return Ok(None);
    }
    let load = crate::limits::Load {
        global_max,
        global: shared.live.load(Ordering::Acquire),
        frontend: frontend_live.load(Ordering::Acquire),
    };
    // From an LB in front the peer is that LB: its clients' limits wait for the header.
    let deferred = rule.trusts_proxy(peer.ip());
    let decided = if deferred {
        let counts = crate::limits::Counts {
            global: load.global,
            frontend: load.frontend,
            source: 0,
        };
        crate::limits::decide(global_max, &accept_limits(limits), counts, || true)
    } else {
        shared
            .sources
            .admit(frontend, peer.ip(), limits, load, Instant::now())
    };
    if let Err(why) = decided {
        shared
            .metrics
            .refused_total
            .with_label_values(&[frontend, why.label()])
            .inc();
        tracing::debug!(frontend = %frontend, %peer, reason = why.label(), "connection refused by a limit");
        return Err(());
    }
    shared.live.fetch_add(1, Ordering::AcqRel);
    frontend_live.fetch_add(1, Ordering::AcqRel);
    Ok(Some(Admitted {
        global: shared.live.clone(),
        frontend: frontend_live.clone(),
        source: (!deferred).then(|| SourcePlace {
            sources: shared.sources.clone(),
            name: frontend.clone(),
            ip: peer.ip(),
        }),
    }))
}

/// Accepts on `listener` until `stop` fires, spawning one proxy task per connection.
/// The rule is looked up in the current snapshot for each connection, so a reload that
/// changes the rule of a kept listener applies to the next connection.
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    frontend: String,
    listener: TcpListener,
    inherits_options: bool,
    stop: CancellationToken,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(frontend, error = %e, "listener has no local address; not accepting");
            return;
        }
    };
    let _listening = shared.listening.enter(&frontend);
    // Visible at 0 before the first refusal, so a rate over it (an alert) has a series.
    for why in [
        Refusal::Global,
        Refusal::Frontend,
        Refusal::Source,
        Refusal::SourceRate,
    ] {
        shared
            .metrics
            .refused_total
            .with_label_values(&[&frontend, why.label()]);
    }
    if let Some(rule) = shared.snapshot.load().rules.get(&frontend) {
        if !rule.accept_proxy.is_empty() {
            for why in conn::HeaderFail::REASONS {
                shared
                    .metrics
                    .proxy_header_errors_total
                    .with_label_values(&[&frontend, why]);
            }
        }
        if rule.tls.is_some() {
            shared
                .metrics
                .tls_handshakes_total
                .with_label_values(&[&frontend]);
            for why in conn::HandshakeFail::REASONS {
                shared
                    .metrics
                    .tls_handshake_errors_total
                    .with_label_values(&[&frontend, why]);
            }
        }
    }
    let name: Arc<str> = Arc::from(frontend.as_str());
    let frontend_live = lock(&shared.live_by_frontend)
        .entry(frontend.clone())
        .or_default()
        .clone();
    loop {
        // Accept first: the stop token (whose check takes a lock shared by every accept loop)
        // is looked at only when no connection is waiting.
        let accepted = tokio::select! {
            biased;
            r = listener.accept() => r,
            _ = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let snap = shared.snapshot.load();
                let Some(rule) = snap.rules.get(&frontend).cloned() else {
                    tracing::debug!(frontend, %peer, "no rule for this frontend any more; closing");
                    continue;
                };
                let global_max = snap.config.lb.max_connections.map(|n| n.get());
                drop(snap);
                let Ok(admitted) = admit(&shared, &name, &frontend_live, global_max, &rule, peer)
                else {
                    // Reset, not closed: the client learns at once, and no FIN handshake waits.
                    if let Err(e) = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))
                    {
                        tracing::debug!(error = %e, "SO_LINGER 0 not set; closing with FIN");
                    }
                    continue;
                };
                let s = shared.clone();
                // Holds the connection's place in the counts for its whole life.
                let place = admitted.map(Box::new);
                let connection =
                    conn::handle(s, rule, stream, peer, local, !inherits_options, place);
                shared.tracker.spawn(connection);
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: out of resources. Back off briefly instead of spinning;
                // connections already accepted keep being served meanwhile.
                tracing::warn!(frontend, error = %e, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
    }
    tracing::debug!(frontend, %local, "stopped accepting");
}
