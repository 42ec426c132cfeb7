//! The HA server process: the HTTP/JSON API, the primary lease loop, the expiry loop, and the
//! version watcher that wakes long-polls.
//!
//! Primary and backups share one database (a SQLite file on one machine, PostgreSQL across
//! several). The lease row decides who is primary, judged by the database's clock: the holder
//! renews it every third of its lifetime, and acts as primary only until nine tenths of the
//! lifetime after it *sent* the renewal, by its own monotonic clock (the database granted the
//! lease later than that, so it expires later still); a backup takes it only after it expired by
//! the database's clock. So two servers never act as primary at once, whatever their clocks
//! say, and a primary cut off from the database stops before anyone can replace it. Each taking
//! of the lease has a new epoch, which every write carries: the database refuses a stale one
//! (fencing), should a write of a replaced primary still be on its way. Backups serve reads and
//! redirect writes to the primary (307). A server whose database fails serves the last
//! membership it read, marked degraded, until the database is back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use mqlb_ha_api::now_ms;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::{self, AuthFailure, Verifier};
use crate::expiry;
use crate::http_server::{self, BodyError, ConnMetrics, Limits};
use crate::lock;
use crate::log_limit::LogLimiter;
use crate::model::{ClusterView, MemberState, Registration};
use crate::queued::{QueuedBatch, QueuedPage};
use crate::retained::{self, RetainedBatch, RetainedPage};
use crate::sessions::{SessionBatch, SessionPage};
use crate::store::{Lease, Registered, Store, StoreError};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest long-poll.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// A failure that repeats per request or per round is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Time for a request body to arrive once its headers did.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Members registered at most, by default ([`Options::max_members`]; not a config key).
pub const DEFAULT_MAX_MEMBERS: usize = 1_000;

/// Membership timing (from `[ha]`).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub heartbeat_interval: Duration,
    pub member_timeout: Duration,
    pub remove_after: Duration,
    pub lease: Duration,
}

impl From<&mqlb_config::HaSettings> for Timing {
    fn from(h: &mqlb_config::HaSettings) -> Timing {
        Timing {
            heartbeat_interval: h.heartbeat_interval,
            member_timeout: h.member_timeout,
            remove_after: h.remove_after,
            lease: h.lease,
        }
    }
}

/// How an HA server runs: its timing, the secret every API request must be signed with
/// (`auth`), and its limits.
#[derive(Debug, Clone)]
pub struct Options {
    pub timing: Timing,
    /// The cluster secret (`[cluster] secret`).
    pub secret: mqlb_config::Secret,
    /// Registrations of new ids beyond this many members are refused (507).
    pub max_members: usize,
    pub http: Limits,
    /// Reads of the membership and the events need the secret too (the default): the
    /// membership is a map of the cluster. `/healthz` and `/metrics` are always open.
    pub authenticate_reads: bool,
}

impl Options {
    /// The defaults, with `timing` and `secret`.
    pub fn new(timing: Timing, secret: mqlb_config::Secret) -> Options {
        Options {
            timing,
            secret,
            max_members: DEFAULT_MAX_MEMBERS,
            http: Limits {
                max_connections: 4_096,
                ..Limits::default()
            },
            authenticate_reads: true,
        }
    }

    /// The options of the HA servers of `config`; the cluster secret is required.
    pub fn from_config(config: &mqlb_config::Config) -> Result<Options, HaError> {
        let secret = config.cluster.secret.clone().ok_or(HaError::NoSecret)?;
        Ok(Options::new(Timing::from(&config.ha), secret))
    }
}

struct Metrics {
    registry: Registry,
    primary: IntGauge,
    members: IntGaugeVec,
    version: IntGauge,
    requests: IntCounterVec,
    /// Entries of `Shared::heartbeats`, set when `/metrics` is read.
    tracked_heartbeats: IntGauge,
    auth_failures: IntCounterVec,
    registrations_refused: IntCounterVec,
    database_up: IntGauge,
    /// Retained message entries of brokers' batches (issue 18), by whether the store applied
    /// them (`ignored`: older than what it held for the topic).
    retained_entries: IntCounterVec,
    connections: ConnMetrics,
}

impl Metrics {
    fn new() -> Result<Metrics, prometheus::Error> {
        let m = Metrics {
            registry: Registry::new(),
            primary: IntGauge::new(
                "mqlb_ha_primary",
                "1 while this HA server holds the primary lease.",
            )?,
            members: IntGaugeVec::new(
                Opts::new("mqlb_ha_members", "Members by state."),
                &["state"],
            )?,
            version: IntGauge::new("mqlb_ha_membership_version", "The membership version.")?,
            requests: IntCounterVec::new(
                Opts::new(
                    "mqlb_ha_requests_total",
                    "API requests by route and status.",
                ),
                &["route", "status"],
            )?,
            tracked_heartbeats: IntGauge::new(
                "mqlb_ha_tracked_heartbeats",
                "Members whose last heartbeat time this server keeps (its flood guard).",
            )?,
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "mqlb_ha_auth_failures_total",
                    "API requests refused (401) for want of a valid signature, by reason.",
                ),
                &["reason"],
            )?,
            registrations_refused: IntCounterVec::new(
                Opts::new(
                    "mqlb_ha_registrations_refused_total",
                    "Signed registrations refused: address_held (a live member's id at another \
                     address, 409) or full (max_members reached, 507).",
                ),
                &["reason"],
            )?,
            database_up: IntGauge::new(
                "mqlb_ha_database_up",
                "1 while this HA server's last call to its database succeeded; 0 while it fails \
                 (the server is degraded: it serves the last membership it read, read-only).",
            )?,
            retained_entries: IntCounterVec::new(
                Opts::new(
                    "mqlb_ha_retained_entries_total",
                    "Retained messages and clearings written by the brokers, by result: applied, \
                     or ignored (an older write of a topic than the one stored).",
                ),
                &["result"],
            )?,
            connections: ConnMetrics::new("mqlb_ha")?,
        };
        m.registry.register(Box::new(m.retained_entries.clone()))?;
        m.registry.register(Box::new(m.database_up.clone()))?;
        m.registry.register(Box::new(m.auth_failures.clone()))?;
        m.registry
            .register(Box::new(m.registrations_refused.clone()))?;
        m.connections.register(&m.registry)?;
        m.registry.register(Box::new(m.primary.clone()))?;
        m.registry
            .register(Box::new(m.tracked_heartbeats.clone()))?;
        m.registry.register(Box::new(m.members.clone()))?;
        m.registry.register(Box::new(m.version.clone()))?;
        m.registry.register(Box::new(m.requests.clone()))?;
        mqlb_http::metrics::register_process(&m.registry)?;
        Ok(m)
    }
}

struct Shared {
    id: String,
    addr: String,
    store: Arc<dyn Store>,
    timing: Timing,
    /// The lease while this server holds it (`None`: backup).
    held: Mutex<Option<Held>>,
    /// The lease holder as last seen: (id, addr).
    primary: Mutex<Option<(String, String)>>,
    /// Why the last call to the database failed, while it keeps failing (degraded).
    db_error: Mutex<Option<String>>,
    /// The membership as last read, served (marked degraded) while the database fails.
    last_view: Mutex<Option<ClusterView>>,
    /// Why the last lease round failed (the database), while it keeps failing: a server that
    /// cannot renew its lease stops acting as primary, and its writes must say why.
    lease_error: Mutex<Option<String>>,
    version: watch::Sender<u64>,
    /// Last accepted heartbeat per member, to refuse floods without touching the database.
    /// Holds only what the guard needs: ids the store knows, heard within the last
    /// `min_heartbeat_gap` (older entries refuse nothing and are pruned every expiry round).
    heartbeats: Mutex<HashMap<String, Instant>>,
    metrics: Metrics,
    /// Rate limits of the log lines that repeat while the database fails.
    logs: Mutex<Logs>,
    verifier: Mutex<Verifier>,
    max_members: usize,
    authenticate_reads: bool,
}

/// This server's hold on the lease.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// It acts as primary until then (monotonic: see the module's doc).
    until: Instant,
    /// The lease epoch its writes carry; the expiry grace starts again with each.
    epoch: u64,
}

/// Until when a server that sent its lease request at `sent` for `ttl`, and was granted it, may
/// act as primary: the database granted it after `sent`, so by then it has not expired for
/// anyone; the tenth left over absorbs clock rate differences and scheduling.
fn acting_until(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl - ttl / 10
}

struct Logs {
    request: LogLimiter,
    lease: LogLimiter,
    expiry: LogLimiter,
    auth: LogLimiter,
    refused: LogLimiter,
}

impl Shared {
    fn is_primary(&self) -> bool {
        self.primary_epoch().is_some()
    }

    /// The lease epoch this server holds now, `None` while it is a backup.
    fn primary_epoch(&self) -> Option<u64> {
        let held = *lock(&self.held);
        held.filter(|h| Instant::now() < h.until).map(|h| h.epoch)
    }

    /// Stops acting as primary at once.
    fn step_down(&self) {
        *lock(&self.held) = None;
        self.metrics.primary.set(0);
    }

    /// Whether `lease` is this server's: its id *and* its address (another process started
    /// with the same id by mistake holds a lease with another address).
    fn holds(&self, lease: &Lease) -> bool {
        lease.holder == self.id && lease.addr == self.addr
    }

    /// Checks a request's signature; a refusal is counted and logged (rate-limited).
    fn authenticate(
        &self,
        parts: &hyper::http::request::Parts,
        body: &[u8],
    ) -> Result<(), AuthFailure> {
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let path = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path(), |p| p.as_str());
        let r = lock(&self.verifier).verify(
            parts.method.as_str(),
            path,
            auth::Stamp {
                time: header(auth::TIME_HEADER),
                nonce: header(auth::NONCE_HEADER),
                signature: header(auth::SIGNATURE_HEADER),
            },
            body,
            now_ms(),
        );
        if let Err(f) = r {
            self.metrics
                .auth_failures
                .with_label_values(&[f.label()])
                .inc();
            if let Some(suppressed) = lock(&self.logs).auth.admit(Instant::now()) {
                tracing::warn!(method = %parts.method, path, reason = %f, suppressed, "request refused: not authenticated");
            }
        }
        r
    }

    fn primary_id(&self) -> Option<String> {
        if self.is_primary() {
            return Some(self.id.clone());
        }
        lock(&self.primary).as_ref().map(|(id, _)| id.clone())
    }

    /// Heartbeats closer together than this are refused.
    fn min_heartbeat_gap(&self) -> Duration {
        self.timing.heartbeat_interval / 4
    }

    /// Drops the flood-guard entries that can no longer refuse anything, so members that went
    /// away (removed, deregistered, or never known) leave nothing behind.
    fn prune_heartbeats(&self, now: Instant) {
        let gap = self.min_heartbeat_gap();
        lock(&self.heartbeats).retain(|_, at| now.saturating_duration_since(*at) < gap);
    }

    /// Runs a store call off the async threads, and keeps track of whether the database works.
    async fn db<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let me = self.clone();
        let r = match tokio::task::spawn_blocking(move || f(me.store.as_ref())).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Task(e.to_string())),
        };
        match &r {
            Ok(_) => {
                if lock(&self.db_error).take().is_some() {
                    tracing::info!(id = self.id, "the database answers again");
                }
                self.metrics.database_up.set(1);
            }
            Err(e) if e.is_database_failure() => {
                let was = lock(&self.db_error).replace(e.to_string());
                if was.is_none() {
                    tracing::warn!(id = self.id, error = %e, "the database fails: degraded, serving the last membership read-only");
                }
                self.metrics.database_up.set(0);
            }
            Err(e) => {
                // Fenced: replaced. Whatever this server believed, it is not primary any more.
                if let StoreError::Fenced { epoch, .. } = e {
                    if self.primary_epoch() == Some(*epoch) {
                        tracing::warn!(id = self.id, error = %e, "fenced by the database: no longer primary");
                        self.step_down();
                    }
                }
            }
        }
        r
    }

    /// Why the database fails, while it does.
    fn degraded(&self) -> Option<String> {
        lock(&self.db_error).clone()
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("[cluster] secret is not set: the HA server authenticates every request with it")]
    NoSecret,
    #[error("another HA server with id {id:?} is primary at {addr}: refusing to start a second one (ids must be unique)")]
    DuplicateId { id: String, addr: String },
}

/// A running HA server.
pub struct HaServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl HaServer {
    /// Starts serving on `listener` with `store`. Refuses to start while another server with
    /// the same id holds the lease.
    pub async fn start(
        id: &str,
        listener: TcpListener,
        store: Arc<dyn Store>,
        options: Options,
    ) -> Result<HaServer, HaError> {
        let timing = options.timing;
        let addr = listener
            .local_addr()
            .map_err(|e| HaError::Bind(SocketAddr::from(([0, 0, 0, 0], 0)), e))?;
        // A database that fails at start (PostgreSQL not up yet) is no reason not to start:
        // degraded, no primary, every round tries again.
        let (version, db_error) = {
            let store = store.clone();
            match tokio::task::spawn_blocking(move || store.version()).await {
                Ok(Ok(v)) => (v, None),
                Ok(Err(e)) if e.is_database_failure() => {
                    tracing::warn!(id, error = %e, "the database fails at start: degraded, no membership until it answers");
                    (0, Some(e.to_string()))
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(e) => return Err(StoreError::Task(e.to_string()).into()),
            }
        };
        let (version_tx, _) = watch::channel(version);
        let shared = Arc::new(Shared {
            id: id.to_string(),
            addr: addr.to_string(),
            store,
            timing,
            held: Mutex::new(None),
            primary: Mutex::new(None),
            db_error: Mutex::new(db_error),
            last_view: Mutex::new(None),
            lease_error: Mutex::new(None),
            version: version_tx,
            heartbeats: Mutex::new(HashMap::new()),
            metrics: Metrics::new()?,
            logs: Mutex::new(Logs {
                request: LogLimiter::new(LOG_EVERY),
                lease: LogLimiter::new(LOG_EVERY),
                expiry: LogLimiter::new(LOG_EVERY),
                auth: LogLimiter::new(LOG_EVERY),
                refused: LogLimiter::new(LOG_EVERY),
            }),
            verifier: Mutex::new(Verifier::new(options.secret.expose())),
            max_members: options.max_members,
            authenticate_reads: options.authenticate_reads,
        });
        let stop = CancellationToken::new();
        // Try for the lease before serving, so a lone server answers as primary at once.
        if let Some(lease) = lease_round(&shared).await {
            if lease.holder == shared.id && !shared.holds(&lease) {
                return Err(HaError::DuplicateId {
                    id: lease.holder,
                    addr: lease.addr,
                });
            }
        }
        tokio::spawn(lease_loop(shared.clone(), stop.clone()));
        tokio::spawn(expiry_loop(shared.clone(), stop.clone()));
        tokio::spawn(version_loop(shared.clone(), stop.clone()));
        tokio::spawn(serve(shared.clone(), listener, options.http, stop.clone()));
        tracing::info!(id, %addr, primary = shared.is_primary(), "HA server started");
        Ok(HaServer { shared, addr, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn is_primary(&self) -> bool {
        self.shared.is_primary()
    }

    /// Stops serving without giving the lease up, as a crashed process would: a backup takes
    /// over only when the lease expires.
    pub fn abort(self) {
        self.shared.step_down();
        self.stop.cancel();
    }

    /// Stops serving; a primary gives its lease up so a backup takes over at once.
    pub async fn stop(self) {
        self.stop.cancel();
        if self.shared.is_primary() {
            self.shared.step_down();
            let (id, addr) = (self.shared.id.clone(), self.shared.addr.clone());
            if let Err(e) = self.shared.db(move |s| s.release_lease(&id, &addr)).await {
                tracing::warn!(error = %e, "lease not released; a backup takes over when it expires");
            }
        }
        tracing::info!(id = self.shared.id, "HA server stopped");
    }
}

/// One attempt to take or renew the lease; returns it as it stands (`None`: the database failed).
async fn lease_round(shared: &Arc<Shared>) -> Option<Lease> {
    let ttl = shared.timing.lease.as_millis() as i64;
    let (id, addr) = (shared.id.clone(), shared.addr.clone());
    let sent = Instant::now();
    let result = shared.db(move |s| s.acquire_lease(&id, &addr, ttl)).await;
    let out = result.as_ref().ok().cloned();
    match result {
        Ok(lease) if shared.holds(&lease) => {
            if lock(&shared.lease_error).take().is_some() {
                tracing::info!(id = shared.id, "lease round succeeded again");
            }
            // A backup takes the lease only after it expired, by the database's clock, which
            // is after `acting_until`: the two windows never overlap.
            let was = shared.primary_epoch();
            *lock(&shared.held) = Some(Held {
                until: acting_until(sent, shared.timing.lease),
                epoch: lease.epoch,
            });
            if was != Some(lease.epoch) {
                tracing::info!(id = shared.id, epoch = lease.epoch, "became primary");
            }
            *lock(&shared.primary) = Some((lease.holder, lease.addr));
        }
        Ok(lease) => {
            *lock(&shared.lease_error) = None;
            if lease.holder == shared.id {
                if let Some(suppressed) = lock(&shared.logs).lease.admit(Instant::now()) {
                    tracing::error!(
                        id = shared.id,
                        other = lease.addr,
                        suppressed,
                        "another HA server with this id holds the lease; ids must be unique"
                    );
                }
            }
            if shared.is_primary() {
                tracing::warn!(
                    id = shared.id,
                    holder = lease.holder,
                    "lost the primary lease"
                );
            }
            shared.step_down();
            *lock(&shared.primary) = Some((lease.holder, lease.addr));
        }
        // Could not renew: keep acting only until `acting_until` of the last renewal.
        Err(e) => {
            if let Some(suppressed) = lock(&shared.logs).lease.admit(Instant::now()) {
                tracing::warn!(id = shared.id, error = %e, suppressed, "lease round failed");
            }
            *lock(&shared.lease_error) = Some(e.to_string());
        }
    }
    shared.metrics.primary.set(i64::from(shared.is_primary()));
    out
}

async fn lease_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let every = (shared.timing.lease / 3).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        lease_round(&shared).await;
    }
}

/// The primary marks silent members down and removes long-down ones, once it has watched long
/// enough to know they are silent (`expiry::Watch`).
async fn expiry_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let every = (shared.timing.heartbeat_interval / 4)
        .clamp(Duration::from_millis(50), Duration::from_millis(500));
    let (down, remove) = (
        shared.timing.member_timeout.as_millis() as i64,
        shared.timing.remove_after.as_millis() as i64,
    );
    let mut watch = expiry::Watch::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        shared.prune_heartbeats(Instant::now());
        let now = now_ms();
        let epoch = shared.primary_epoch();
        let Some(cutoffs) = watch.round(now, epoch, down, remove) else {
            continue;
        };
        if cutoffs == expiry::Cutoffs::default() {
            continue; // the grace is still running
        }
        let Some(epoch) = epoch else { continue };
        match shared.db(move |s| s.expire(epoch, now, cutoffs)).await {
            Ok(Some(v)) => {
                shared.version.send_replace(v);
            }
            Ok(None) => {}
            Err(e) => {
                if let Some(suppressed) = lock(&shared.logs).expiry.admit(Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "expiry round failed");
                }
            }
        }
    }
}

/// How often the version is polled when the store pushes no changes (SQLite), and when it does
/// (PostgreSQL: a safety net should a notification be lost with its connection).
const VERSION_POLL: Duration = Duration::from_millis(100);
const VERSION_POLL_PUSHED: Duration = Duration::from_secs(5);

/// Notices version changes made by any server sharing the database, pushed by the store or
/// polled (one row); the membership is read, for the gauges and the degraded mode's copy, when
/// the version moved.
async fn version_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut pushed = shared.store.changes();
    let mut seen = None;
    loop {
        let poll = if pushed.is_some() {
            VERSION_POLL_PUSHED
        } else {
            VERSION_POLL
        };
        let notified = async {
            match pushed.as_mut() {
                Some(rx) => rx.changed().await.is_ok().then(|| *rx.borrow_and_update()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
            v = notified => match v {
                // Wake the long-polls at once; the database is read below.
                Some(v) => {
                    shared.version.send_if_modified(|cur| {
                        let newer = v > *cur;
                        if newer {
                            *cur = v;
                        }
                        newer
                    });
                }
                None => pushed = None, // the store stopped pushing: poll
            },
        }
        let Ok(version) = shared.db(|s| s.version()).await else {
            continue;
        };
        if seen == Some(version) {
            continue;
        }
        if let Ok(view) = shared.db(|s| s.cluster()).await {
            let up = view
                .members
                .iter()
                .filter(|m| m.state == MemberState::Up)
                .count();
            let gauge = |state: &str| shared.metrics.members.with_label_values(&[state]);
            gauge("up").set(up as i64);
            gauge("down").set((view.members.len() - up) as i64);
            shared.metrics.version.set(view.version as i64);
            seen = Some(view.version);
            if *shared.version.borrow() != view.version {
                shared.version.send_replace(view.version);
            }
            *lock(&shared.last_view) = Some(view);
        }
    }
}

type Res = mqlb_http::Reply;

fn reply(status: StatusCode, body: serde_json::Value) -> Res {
    mqlb_http::json(status, &body)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Res {
    reply(status, json!({ "error": msg.into() }))
}

/// A request the database failed: 503 with the store's error as it is (it names the database
/// already; a second prefix made "database: database: …"). Logged at most once per
/// `LOG_EVERY`, with the count of those left out.
fn store_error(shared: &Shared, e: StoreError) -> Res {
    if let Some(suppressed) = lock(&shared.logs).request.admit(Instant::now()) {
        tracing::error!(error = %e, suppressed, "request failed");
    }
    error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// Writes go to the primary: a backup redirects (307 keeps the method and body).
fn not_primary(shared: &Shared, path: &str) -> Res {
    let primary = lock(&shared.primary).clone();
    match primary {
        Some((id, addr)) if id != shared.id || addr != shared.addr => {
            let mut r = error(StatusCode::TEMPORARY_REDIRECT, format!("{id} is primary"));
            if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("http://{addr}{path}")) {
                r.headers_mut().insert(hyper::header::LOCATION, v);
            }
            r
        }
        // Not primary because this server's own database fails: say so, not "no primary".
        _ => match lock(&shared.lease_error).clone() {
            Some(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e} (this HA server cannot hold the primary lease); retry"),
            ),
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no primary HA server right now; retry",
            ),
        },
    }
}

fn query(uri: &hyper::Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The API's routes; `/healthz`, `/metrics` and the status page are open, every other one
/// is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    /// `/`: the status page, a static shell (`crate::status_page`).
    Page,
    Healthz,
    Metrics,
    Cluster,
    Events,
    Register,
    Heartbeat(&'a str),
    Deregister(&'a str),
    /// `POST /api/retained`: a broker's batch of retained messages (issue 18).
    WriteRetained,
    /// `GET /api/retained`: a page of them, for a broker starting.
    ReadRetained,
    /// `POST /api/sessions`, `GET /api/sessions`: persistent sessions, the same way.
    WriteSessions,
    ReadSessions,
    /// `POST /api/queued`, `GET /api/queued?client=`: sessions' queued messages.
    WriteQueued,
    ReadQueued,
    Other,
}

impl<'a> Route<'a> {
    fn of(method: &Method, segments: &[&'a str]) -> Route<'a> {
        match (method, segments) {
            (&Method::GET, [""]) => Route::Page,
            (&Method::GET, ["healthz"]) => Route::Healthz,
            (&Method::GET, ["metrics"]) => Route::Metrics,
            (&Method::GET, ["api", "cluster"]) => Route::Cluster,
            (&Method::GET, ["api", "events"]) => Route::Events,
            (&Method::POST, ["api", "members"]) => Route::Register,
            (&Method::POST, ["api", "members", id, "heartbeat"]) => Route::Heartbeat(id),
            (&Method::DELETE, ["api", "members", id]) => Route::Deregister(id),
            (&Method::POST, ["api", "retained"]) => Route::WriteRetained,
            (&Method::GET, ["api", "retained"]) => Route::ReadRetained,
            (&Method::POST, ["api", "sessions"]) => Route::WriteSessions,
            (&Method::GET, ["api", "sessions"]) => Route::ReadSessions,
            (&Method::POST, ["api", "queued"]) => Route::WriteQueued,
            (&Method::GET, ["api", "queued"]) => Route::ReadQueued,
            _ => Route::Other,
        }
    }

    /// The `route` label of `mqlb_ha_requests_total`.
    fn label(self) -> &'static str {
        match self {
            Route::Page => "page",
            Route::Healthz => "healthz",
            Route::Metrics => "metrics",
            Route::Cluster => "cluster",
            Route::Events => "events",
            Route::Register => "register",
            Route::Heartbeat(_) => "heartbeat",
            Route::Deregister(_) => "deregister",
            Route::WriteRetained => "retained_write",
            Route::ReadRetained => "retained_read",
            Route::WriteSessions => "sessions_write",
            Route::ReadSessions => "sessions_read",
            Route::WriteQueued => "queued_write",
            Route::ReadQueued => "queued_read",
            Route::Other => "other",
        }
    }

    fn is_open(self) -> bool {
        matches!(self, Route::Page | Route::Healthz | Route::Metrics)
    }

    /// Reads that `authenticate_reads = false` opens. Not the retained messages: they are
    /// the clients' data.
    fn is_read(self) -> bool {
        matches!(self, Route::Cluster | Route::Events)
    }

    /// Largest body accepted: a batch of retained messages carries their payloads.
    fn max_body(self) -> usize {
        match self {
            Route::WriteRetained | Route::WriteSessions | Route::WriteQueued => {
                retained::MAX_BATCH_BODY
            }
            _ => MAX_BODY,
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> (&'static str, Res) {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let route = Route::of(&parts.method, &segments);
    if route.is_open() {
        return (route.label(), open_route(&shared, route));
    }
    // The body is part of what is signed: read it (bounded in size and time) before anything.
    let body = match http_server::read_body(body, route.max_body(), BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(e) => {
            let status = match e {
                BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                BodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
                BodyError::Io(_) => StatusCode::BAD_REQUEST,
            };
            return (route.label(), error(status, e.to_string()));
        }
    };
    if !route.is_read() || shared.authenticate_reads {
        if let Err(f) = shared.authenticate(&parts, &body) {
            return (
                route.label(),
                error(StatusCode::UNAUTHORIZED, f.to_string()),
            );
        }
    }
    let write = matches!(
        route,
        Route::Register
            | Route::Heartbeat(_)
            | Route::Deregister(_)
            | Route::WriteRetained
            | Route::WriteSessions
            | Route::WriteQueued
    );
    // A write carries the lease epoch of the primary taking it (fencing).
    let mut epoch = 0;
    if write {
        match shared.primary_epoch() {
            Some(e) => epoch = e,
            None => return (route.label(), not_primary(&shared, &path)),
        }
    }
    let res = match route {
        Route::Cluster => cluster(&shared, &parts.uri).await,
        Route::Events => events(&shared, &parts.uri).await,
        Route::Register => register(&shared, epoch, &body).await,
        Route::Heartbeat(id) => heartbeat(&shared, epoch, id).await,
        Route::Deregister(id) => deregister(&shared, epoch, id).await,
        Route::WriteRetained => write_retained(&shared, epoch, &body).await,
        Route::ReadRetained => read_retained(&shared, &parts.uri).await,
        Route::WriteSessions => write_sessions(&shared, epoch, &body).await,
        Route::ReadSessions => read_sessions(&shared, &parts.uri).await,
        Route::WriteQueued => write_queued(&shared, epoch, &body).await,
        Route::ReadQueued => read_queued(&shared, &parts.uri).await,
        Route::Page | Route::Healthz | Route::Metrics | Route::Other => error(
            StatusCode::NOT_FOUND,
            format!("no route {} {path}", parts.method),
        ),
    };
    (route.label(), res)
}

fn open_route(shared: &Shared, route: Route<'_>) -> Res {
    if route == Route::Page {
        return status_page();
    }
    if route == Route::Healthz {
        let epoch = shared.primary_epoch();
        let degraded = shared.degraded();
        return reply(
            StatusCode::OK,
            json!({
                "id": shared.id,
                "role": if epoch.is_some() { "primary" } else { "backup" },
                "primary": shared.primary_id(),
                "epoch": epoch,
                "degraded": degraded.is_some(),
                "database": degraded.as_deref().unwrap_or("ok"),
            }),
        );
    }
    shared.metrics.primary.set(i64::from(shared.is_primary()));
    let tracked = lock(&shared.heartbeats).len();
    shared.metrics.tracked_heartbeats.set(tracked as i64);
    match mqlb_http::metrics::render(&shared.metrics.registry) {
        Ok(text) => mqlb_http::reply(StatusCode::OK, mqlb_http::metrics::CONTENT_TYPE, text),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The status page, built once.
fn status_page() -> Res {
    static PAGE: std::sync::OnceLock<crate::status_page::Page> = std::sync::OnceLock::new();
    PAGE.get_or_init(|| {
        crate::status_page::Page::new(
            "mqlb HA server",
            include_str!("server/status.html"),
            include_str!("server/status.js"),
        )
    })
    .response()
}

async fn cluster(shared: &Arc<Shared>, uri: &hyper::Uri) -> Res {
    let q = query(uri);
    let since: Option<u64> = q.get("since").and_then(|v| v.parse().ok());
    let wait = q
        .get("wait_ms")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis)
        .min(MAX_WAIT);
    let mut rx = shared.version.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    if let Some(since) = since {
        // Long-poll: wait until the version passes `since`, or the time is up.
        while *rx.borrow_and_update() <= since {
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                break;
            }
        }
    }
    let (mut view, degraded) = match shared.db(|s| s.cluster()).await {
        Ok(view) => {
            *lock(&shared.last_view) = Some(view.clone());
            (view, None)
        }
        // The database fails: the last membership read, said to be so (read-only: writes
        // fail on their own).
        Err(e) => match lock(&shared.last_view).clone() {
            Some(view) if e.is_database_failure() => (view, Some(e.to_string())),
            _ => return store_error(shared, e),
        },
    };
    view.primary = shared.primary_id();
    match serde_json::to_value(&view) {
        Ok(mut v) => {
            if let (Some(why), Some(obj)) = (degraded, v.as_object_mut()) {
                obj.insert("degraded".into(), json!(why));
            }
            reply(StatusCode::OK, v)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn events(shared: &Arc<Shared>, uri: &hyper::Uri) -> Res {
    let q = query(uri);
    let after = q.get("after").and_then(|v| v.parse().ok()).unwrap_or(0);
    let limit = q
        .get("limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
        .min(10_000);
    match shared.db(move |s| s.events(after, limit)).await {
        Ok(ev) => reply(StatusCode::OK, json!(ev)),
        Err(e) => store_error(shared, e),
    }
}

async fn register(shared: &Arc<Shared>, epoch: u64, body: &[u8]) -> Res {
    let reg: Registration = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
    };
    if let Err(msg) = reg.validate() {
        return error(StatusCode::BAD_REQUEST, msg);
    }
    let now = now_ms();
    let max = shared.max_members;
    let wanted = reg.clone();
    match shared
        .db(move |s| s.register(epoch, &wanted, now, max))
        .await
    {
        Ok(Registered::Done(v)) => {
            shared.version.send_replace(v);
            lock(&shared.heartbeats).insert(reg.id.clone(), Instant::now());
            tracing::info!(member = reg.id, version = v, "registered");
            reply(StatusCode::OK, json!({ "version": v }))
        }
        Ok(Registered::AddressHeld(current)) => {
            refused(
                shared,
                "address_held",
                &reg,
                &format!("held at {}", current.mqtt),
            );
            error(
                StatusCode::CONFLICT,
                format!(
                    "member {:?} is up at {}: a live member cannot be re-pointed; it must \
                     deregister or expire first",
                    reg.id, current.mqtt
                ),
            )
        }
        Ok(Registered::Full(n)) => {
            refused(shared, "full", &reg, &format!("{n} members"));
            error(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("the membership is full ({n} members, the HA server's limit)"),
            )
        }
        Err(e) => store_error(shared, e),
    }
}

/// Counts and logs (rate-limited) a signed registration that was refused.
fn refused(shared: &Shared, reason: &'static str, reg: &Registration, detail: &str) {
    shared
        .metrics
        .registrations_refused
        .with_label_values(&[reason])
        .inc();
    if let Some(suppressed) = lock(&shared.logs).refused.admit(Instant::now()) {
        tracing::warn!(
            member = reg.id,
            mqtt = reg.mqtt,
            reason,
            detail,
            suppressed,
            "registration refused"
        );
    }
}

async fn heartbeat(shared: &Arc<Shared>, epoch: u64, id: &str) -> Res {
    let id = id.to_string();
    // A flood of heartbeats is refused before it reaches the database.
    let min_gap = shared.min_heartbeat_gap();
    {
        let mut hb = lock(&shared.heartbeats);
        if hb.get(&id).is_some_and(|t| t.elapsed() < min_gap) {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                format!("heartbeats more often than every {min_gap:?}"),
            );
        }
        hb.insert(id.clone(), Instant::now());
    }
    let now = now_ms();
    let known = id.clone();
    match shared.db(move |s| s.heartbeat(epoch, &known, now)).await {
        Ok(Some(v)) => {
            shared.version.send_if_modified(|cur| {
                let changed = *cur != v;
                *cur = v;
                changed
            });
            reply(StatusCode::OK, json!({ "version": v }))
        }
        // An id the store does not know (or a heartbeat that did not land) keeps no
        // entry: a stream of made-up ids must not grow the map.
        Ok(None) => {
            lock(&shared.heartbeats).remove(&id);
            error(StatusCode::NOT_FOUND, "unknown member: register first")
        }
        Err(e) => {
            lock(&shared.heartbeats).remove(&id);
            store_error(shared, e)
        }
    }
}

async fn deregister(shared: &Arc<Shared>, epoch: u64, id: &str) -> Res {
    let id = id.to_string();
    let now = now_ms();
    let gone = id.clone();
    match shared.db(move |s| s.deregister(epoch, &gone, now)).await {
        Ok(Some(v)) => {
            lock(&shared.heartbeats).remove(&id);
            shared.version.send_replace(v);
            reply(StatusCode::OK, json!({ "version": v }))
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "unknown member"),
        Err(e) => store_error(shared, e),
    }
}

/// A batch write's body, parsed, and each of its `entries` checked with `validate`; or why
/// not (a 400).
fn batch_body<B: serde::de::DeserializeOwned, E>(
    body: &[u8],
    entries: impl Fn(&B) -> &[E],
    validate: impl Fn(&E) -> Result<(), String>,
) -> Result<B, String> {
    let batch: B = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    match entries(&batch).iter().find_map(|e| validate(e).err()) {
        Some(msg) => Err(msg),
        None => Ok(batch),
    }
}

async fn write_retained(shared: &Arc<Shared>, epoch: u64, body: &[u8]) -> Res {
    let batch = match batch_body(body, |b: &RetainedBatch| &b.entries, |e| e.validate()) {
        Ok(b) => b,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let now = now_ms();
    let total = batch.entries.len() as u64;
    match shared
        .db(move |s| s.write_retained(epoch, &batch.entries, now))
        .await
    {
        Ok(applied) => {
            let counter = |r: &str| shared.metrics.retained_entries.with_label_values(&[r]);
            counter("applied").inc_by(applied);
            counter("ignored").inc_by(total.saturating_sub(applied));
            reply(StatusCode::OK, json!({ "applied": applied }))
        }
        Err(e) => store_error(shared, e),
    }
}

/// A page of retained messages after the topic `after` (base64url) names, at most `limit`
/// (and [`retained::MAX_PAGE`]) and about [`retained::PAGE_BYTES`] of them; `next` is set
/// when there may be more.
async fn read_retained(shared: &Arc<Shared>, uri: &hyper::Uri) -> Res {
    let q = query(uri);
    let after = match q.get("after") {
        None => String::new(),
        Some(a) => match retained::decode_after(a) {
            Some(t) => t,
            None => return error(StatusCode::BAD_REQUEST, "after: not a base64url topic"),
        },
    };
    let limit = q
        .get("limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(retained::MAX_PAGE)
        .clamp(1, retained::MAX_PAGE);
    match shared.db(move |s| s.retained(&after, limit)).await {
        Ok(mut entries) => {
            let full = entries.len() >= limit as usize;
            let mut bytes = 0;
            let keep = entries
                .iter()
                .position(|e| {
                    bytes += e.size();
                    bytes > retained::PAGE_BYTES
                })
                .map_or(entries.len(), |i| i + 1);
            let trimmed = keep < entries.len();
            entries.truncate(keep);
            let next = if full || trimmed {
                entries.last().map(|e| e.topic.clone())
            } else {
                None
            };
            match serde_json::to_value(RetainedPage { entries, next }) {
                Ok(v) => reply(StatusCode::OK, v),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        Err(e) => store_error(shared, e),
    }
}

async fn write_sessions(shared: &Arc<Shared>, epoch: u64, body: &[u8]) -> Res {
    let batch = match batch_body(body, |b: &SessionBatch| &b.entries, |e| e.validate()) {
        Ok(b) => b,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let now = now_ms();
    match shared
        .db(move |s| s.write_sessions(epoch, &batch.entries, now))
        .await
    {
        Ok(applied) => reply(StatusCode::OK, json!({ "applied": applied })),
        Err(e) => store_error(shared, e),
    }
}

/// A page of persistent sessions after the client ID `after` (base64url) names.
async fn read_sessions(shared: &Arc<Shared>, uri: &hyper::Uri) -> Res {
    let q = query(uri);
    let after = match q.get("after") {
        None => String::new(),
        Some(a) => match retained::decode_after(a) {
            Some(t) => t,
            None => return error(StatusCode::BAD_REQUEST, "after: not a base64url client ID"),
        },
    };
    let limit = retained::MAX_PAGE;
    match shared.db(move |s| s.sessions(&after, limit)).await {
        Ok(entries) => {
            let next = if entries.len() >= limit as usize {
                entries.last().map(|e| e.client_id.clone())
            } else {
                None
            };
            match serde_json::to_value(SessionPage { entries, next }) {
                Ok(v) => reply(StatusCode::OK, v),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        Err(e) => store_error(shared, e),
    }
}

async fn write_queued(shared: &Arc<Shared>, epoch: u64, body: &[u8]) -> Res {
    let batch = match batch_body(body, |b: &QueuedBatch| &b.entries, |e| e.validate()) {
        Ok(b) => b,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let now = now_ms();
    match shared
        .db(move |s| s.write_queued(epoch, &batch.entries, now))
        .await
    {
        Ok(applied) => reply(StatusCode::OK, json!({ "applied": applied })),
        Err(e) => store_error(shared, e),
    }
}

/// What is kept of one session's queue (`client`: its client ID, base64url).
async fn read_queued(shared: &Arc<Shared>, uri: &hyper::Uri) -> Res {
    let q = query(uri);
    let Some(client_id) = q.get("client").and_then(|c| retained::decode_after(c)) else {
        return error(StatusCode::BAD_REQUEST, "client: not a base64url client ID");
    };
    match shared.db(move |s| s.queued(&client_id)).await {
        Ok(entry) => match serde_json::to_value(QueuedPage { entry }) {
            Ok(v) => reply(StatusCode::OK, v),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        Err(e) => store_error(shared, e),
    }
}

async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    limits: Limits,
    stop: CancellationToken,
) {
    let metrics = shared.metrics.connections.clone();
    http_server::serve_with("haserver", listener, stop, limits, metrics, move |req| {
        let shared = shared.clone();
        async move {
            let (route, res) = handle(shared.clone(), req).await;
            shared
                .metrics
                .requests
                .with_label_values(&[route, res.status().as_str()])
                .inc();
            res
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expiry::Cutoffs;
    use crate::model::{ClusterView, Event};
    use crate::store::{Lease, SqliteStore};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// SQLite, until `full` is set: then every write fails the way SQLite does on a full disk.
    struct FillingStore {
        inner: SqliteStore,
        full: AtomicBool,
    }

    impl FillingStore {
        fn write(&self) -> Result<(), StoreError> {
            if !self.full.load(Ordering::Relaxed) {
                return Ok(());
            }
            Err(StoreError::Db(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                Some("database or disk is full".into()),
            )))
        }
    }

    impl Store for FillingStore {
        fn register(
            &self,
            epoch: u64,
            reg: &Registration,
            now_ms: i64,
            max_members: usize,
        ) -> Result<Registered, StoreError> {
            self.write()?;
            self.inner.register(epoch, reg, now_ms, max_members)
        }
        fn heartbeat(&self, epoch: u64, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError> {
            self.write()?;
            self.inner.heartbeat(epoch, id, now_ms)
        }
        fn deregister(&self, epoch: u64, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError> {
            self.write()?;
            self.inner.deregister(epoch, id, now_ms)
        }
        fn expire(
            &self,
            epoch: u64,
            now_ms: i64,
            cutoffs: Cutoffs,
        ) -> Result<Option<u64>, StoreError> {
            self.write()?;
            self.inner.expire(epoch, now_ms, cutoffs)
        }
        fn cluster(&self) -> Result<ClusterView, StoreError> {
            self.inner.cluster()
        }
        fn version(&self) -> Result<u64, StoreError> {
            self.inner.version()
        }
        fn events(&self, after: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
            self.inner.events(after, limit)
        }
        fn acquire_lease(
            &self,
            holder: &str,
            addr: &str,
            ttl_ms: i64,
        ) -> Result<Lease, StoreError> {
            self.write()?;
            self.inner.acquire_lease(holder, addr, ttl_ms)
        }
        fn release_lease(&self, holder: &str, addr: &str) -> Result<(), StoreError> {
            self.write()?;
            self.inner.release_lease(holder, addr)
        }
        fn write_retained(
            &self,
            epoch: u64,
            entries: &[crate::retained::RetainedEntry],
            now_ms: i64,
        ) -> Result<u64, StoreError> {
            self.write()?;
            self.inner.write_retained(epoch, entries, now_ms)
        }
        fn retained(
            &self,
            after: &str,
            limit: u32,
        ) -> Result<Vec<crate::retained::RetainedEntry>, StoreError> {
            self.inner.retained(after, limit)
        }
        fn write_sessions(
            &self,
            epoch: u64,
            entries: &[crate::sessions::SessionEntry],
            now_ms: i64,
        ) -> Result<u64, StoreError> {
            self.write()?;
            self.inner.write_sessions(epoch, entries, now_ms)
        }
        fn sessions(
            &self,
            after: &str,
            limit: u32,
        ) -> Result<Vec<crate::sessions::SessionEntry>, StoreError> {
            self.inner.sessions(after, limit)
        }
        fn write_queued(
            &self,
            epoch: u64,
            entries: &[crate::queued::QueuedEntry],
            now_ms: i64,
        ) -> Result<u64, StoreError> {
            self.write()?;
            self.inner.write_queued(epoch, entries, now_ms)
        }
        fn queued(
            &self,
            client_id: &str,
        ) -> Result<Option<crate::queued::QueuedEntry>, StoreError> {
            self.inner.queued(client_id)
        }
    }

    async fn register(addr: SocketAddr, id: &str) -> (u16, String) {
        let body = format!(r#"{{"id":"{id}","mqtt":"127.0.0.1:1883"}}"#);
        match crate::client::request(
            addr,
            Method::POST,
            "/api/members",
            Some(body),
            b"0123456789abcdef",
            Duration::from_secs(5),
        )
        .await
        {
            Ok((status, _, body)) => (status, String::from_utf8_lossy(&body).into_owned()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// Issue 18: brokers write retained messages in signed batches and read them back page
    /// by page; an invalid entry refuses the batch, an unsigned read is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retained_messages_are_written_in_batches_and_read_in_pages(
    ) -> Result<(), Box<dyn std::error::Error>> {
        use crate::retained::{RetainedEntry, RetainedProps, MAX_PAGE};
        let timing = Timing {
            heartbeat_interval: Duration::from_millis(200),
            member_timeout: Duration::from_millis(800),
            remove_after: Duration::from_secs(30),
            lease: Duration::from_secs(3),
        };
        let secret = mqlb_config::Secret::new("0123456789abcdef");
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let store = Arc::new(SqliteStore::in_memory()?);
        let ha =
            HaServer::start("ha1", listener, store, Options::new(timing, secret.clone())).await?;
        let client = crate::HaClient::new(vec![ha.addr()], secret);
        let n = MAX_PAGE as usize + 200;
        let entry = |i: usize, payload: Vec<u8>| RetainedEntry {
            topic: format!("t/{i:05}"),
            payload,
            qos: (i % 3) as u8,
            at_ms: 1_000 + i as i64,
            props: RetainedProps::default(),
        };
        let set: Vec<_> = (0..n).map(|i| entry(i, vec![i as u8; 3])).collect();
        assert_eq!(client.write_retained(set.clone()).await?, n as u64);
        let cleared = entry(7, Vec::new());
        assert_eq!(client.write_retained(vec![cleared]).await?, 1);
        let first = client.retained_page(None).await?;
        assert_eq!(first.entries.len(), MAX_PAGE as usize);
        assert!(
            first.next.is_some(),
            "a full page says where the next starts"
        );
        let all = client.all_retained(10).await?;
        let want: Vec<_> = set.into_iter().filter(|e| e.topic != "t/00007").collect();
        assert_eq!(all, want, "two pages, the cleared topic left out");
        let bad = RetainedEntry {
            topic: "t/#".into(),
            ..entry(1, vec![1])
        };
        match client.write_retained(vec![bad]).await {
            Err(crate::ClientError::Status(400, why)) => assert!(why.contains("t/#"), "{why}"),
            other => panic!("an invalid topic was not refused: {other:?}"),
        }
        let unsigned = crate::client::request(
            ha.addr(),
            Method::GET,
            "/api/retained",
            None,
            b"not-the-secret-at-all",
            Duration::from_secs(5),
        )
        .await?;
        assert_eq!(unsigned.0, 401, "retained messages are never an open read");
        ha.abort();
        Ok(())
    }

    /// Issue 14, item 11: a write the database failed names the database's error, once (not
    /// "database: database: …"), both while this server is still primary and after its lease
    /// lapsed because the database could not renew it (not "no primary HA server").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_on_a_full_disk_name_the_database_error(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let store = Arc::new(FillingStore {
            inner: SqliteStore::in_memory()?,
            full: AtomicBool::new(false),
        });
        let timing = Timing {
            heartbeat_interval: Duration::from_millis(200),
            member_timeout: Duration::from_millis(800),
            remove_after: Duration::from_secs(30),
            lease: Duration::from_millis(600),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let options = Options::new(timing, mqlb_config::Secret::new("0123456789abcdef"));
        let ha = HaServer::start("ha1", listener, store.clone(), options).await?;
        assert_eq!(register(ha.addr(), "b1").await.0, 200);

        store.full.store(true, Ordering::Relaxed);
        let check = |(status, text): (u16, String), when: &str| {
            assert_eq!(status, 503, "{when}: {text}");
            assert!(text.contains("disk is full"), "{when}: {text}");
            assert!(!text.contains("database: database"), "{when}: {text}");
            assert!(!text.contains("no primary"), "{when}: {text}");
        };
        check(register(ha.addr(), "b2").await, "still primary");
        // The lease cannot be renewed either: the server stops acting as primary.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ha.is_primary() {
            assert!(Instant::now() < deadline, "still primary on a full disk");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        check(register(ha.addr(), "b2").await, "lease lapsed");
        ha.abort();
        Ok(())
    }
}
