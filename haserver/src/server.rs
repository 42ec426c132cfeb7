//! The HA server process: the HTTP/JSON API, the primary lease loop, the expiry loop, and the
//! version watcher that wakes long-polls.
//!
//! Primary and backups share one SQLite file. The lease row decides who is primary: the holder
//! renews it every third of its lifetime and stops acting as primary a tenth of the lifetime
//! *before* it expires, and a backup takes it only *after* it expired, so two servers never act
//! as primary at once (they read one clock: same machine). Backups serve reads from the shared
//! file and redirect writes to the primary (307).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::expiry;
use crate::lock;
use crate::log_limit::LogLimiter;
use crate::model::{MemberState, Registration};
use crate::store::{Store, StoreError};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest long-poll.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// A failure that repeats per request or per round is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

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

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct Metrics {
    registry: Registry,
    primary: IntGauge,
    members: IntGaugeVec,
    version: IntGauge,
    requests: IntCounterVec,
    /// Entries of `Shared::heartbeats`, set when `/metrics` is read.
    tracked_heartbeats: IntGauge,
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
        };
        m.registry.register(Box::new(m.primary.clone()))?;
        m.registry
            .register(Box::new(m.tracked_heartbeats.clone()))?;
        m.registry.register(Box::new(m.members.clone()))?;
        m.registry.register(Box::new(m.version.clone()))?;
        m.registry.register(Box::new(m.requests.clone()))?;
        Ok(m)
    }
}

struct Shared {
    id: String,
    addr: String,
    store: Arc<dyn Store>,
    timing: Timing,
    /// Unix ms until which this server may act as primary (0: backup).
    primary_until: AtomicI64,
    /// Counts the times this server became primary: the expiry grace starts again with each.
    term: AtomicU64,
    /// The lease holder as last seen: (id, addr).
    primary: Mutex<Option<(String, String)>>,
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
}

struct Logs {
    request: LogLimiter,
    lease: LogLimiter,
    expiry: LogLimiter,
}

impl Shared {
    fn is_primary(&self) -> bool {
        now_ms() < self.primary_until.load(Ordering::Acquire)
    }

    /// The primary term this server holds now, `None` while it is a backup.
    fn primary_term(&self) -> Option<u64> {
        let term = self.term.load(Ordering::Acquire);
        self.is_primary().then_some(term)
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

    /// Runs a store call off the async threads.
    async fn db<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || f(me.store.as_ref())).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Task(e.to_string())),
        }
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
}

/// A running HA server.
pub struct HaServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl HaServer {
    /// Starts serving on `listener` with `store`.
    pub async fn start(
        id: &str,
        listener: TcpListener,
        store: Arc<dyn Store>,
        timing: Timing,
    ) -> Result<HaServer, HaError> {
        let addr = listener
            .local_addr()
            .map_err(|e| HaError::Bind(SocketAddr::from(([0, 0, 0, 0], 0)), e))?;
        let version = store.version()?;
        let (version_tx, _) = watch::channel(version);
        let shared = Arc::new(Shared {
            id: id.to_string(),
            addr: addr.to_string(),
            store,
            timing,
            primary_until: AtomicI64::new(0),
            term: AtomicU64::new(0),
            primary: Mutex::new(None),
            lease_error: Mutex::new(None),
            version: version_tx,
            heartbeats: Mutex::new(HashMap::new()),
            metrics: Metrics::new()?,
            logs: Mutex::new(Logs {
                request: LogLimiter::new(LOG_EVERY),
                lease: LogLimiter::new(LOG_EVERY),
                expiry: LogLimiter::new(LOG_EVERY),
            }),
        });
        let stop = CancellationToken::new();
        // Try for the lease before serving, so a lone server answers as primary at once.
        lease_round(&shared).await;
        tokio::spawn(lease_loop(shared.clone(), stop.clone()));
        tokio::spawn(expiry_loop(shared.clone(), stop.clone()));
        tokio::spawn(version_loop(shared.clone(), stop.clone()));
        tokio::spawn(serve(shared.clone(), listener, stop.clone()));
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
        self.shared.primary_until.store(0, Ordering::Release);
        self.stop.cancel();
    }

    /// Stops serving; a primary gives its lease up so a backup takes over at once.
    pub async fn stop(self) {
        self.stop.cancel();
        if self.shared.is_primary() {
            self.shared.primary_until.store(0, Ordering::Release);
            let id = self.shared.id.clone();
            if let Err(e) = self.shared.db(move |s| s.release_lease(&id)).await {
                tracing::warn!(error = %e, "lease not released; a backup takes over when it expires");
            }
        }
        tracing::info!(id = self.shared.id, "HA server stopped");
    }
}

async fn lease_round(shared: &Arc<Shared>) {
    let ttl = shared.timing.lease.as_millis() as i64;
    let (id, addr) = (shared.id.clone(), shared.addr.clone());
    let now = now_ms();
    match shared
        .db(move |s| s.acquire_lease(&id, &addr, now, ttl))
        .await
    {
        Ok(lease) if lease.holder == shared.id => {
            if lock(&shared.lease_error).take().is_some() {
                tracing::info!(id = shared.id, "lease round succeeded again");
            }
            // Act as primary until a tenth of the lease before it expires: a backup takes it
            // only after it expired, so the two windows never overlap.
            let was = shared.is_primary();
            if !was {
                shared.term.fetch_add(1, Ordering::AcqRel);
            }
            shared
                .primary_until
                .store(lease.expires_ms - ttl / 10, Ordering::Release);
            *lock(&shared.primary) = Some((lease.holder, lease.addr));
            if !was {
                tracing::info!(id = shared.id, "became primary");
            }
        }
        Ok(lease) => {
            *lock(&shared.lease_error) = None;
            if shared.is_primary() {
                tracing::warn!(
                    id = shared.id,
                    holder = lease.holder,
                    "lost the primary lease"
                );
            }
            shared.primary_until.store(0, Ordering::Release);
            *lock(&shared.primary) = Some((lease.holder, lease.addr));
        }
        // Could not renew: keep acting only until the current lease runs out.
        Err(e) => {
            if let Some(suppressed) = lock(&shared.logs).lease.admit(Instant::now()) {
                tracing::warn!(id = shared.id, error = %e, suppressed, "lease round failed");
            }
            *lock(&shared.lease_error) = Some(e.to_string());
        }
    }
    shared.metrics.primary.set(i64::from(shared.is_primary()));
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
        let Some(cutoffs) = watch.round(now, shared.primary_term(), down, remove) else {
            continue;
        };
        if cutoffs == expiry::Cutoffs::default() {
            continue; // the grace is still running
        }
        match shared.db(move |s| s.expire(now, cutoffs)).await {
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

/// Notices version changes made by any server sharing the database. Polls only the version
/// (one row); the membership is read, for the gauges, when the version moved.
async fn version_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut seen = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
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
        }
    }
}

type Res = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: serde_json::Value) -> Res {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
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
fn not_primary(shared: &Shared, path: &str) -> Option<Res> {
    if shared.is_primary() {
        return None;
    }
    let primary = lock(&shared.primary).clone();
    Some(match primary {
        Some((id, addr)) if id != shared.id => {
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
    })
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn body_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Res> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body over {MAX_BODY} bytes"),
            ))
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> (&'static str, Res) {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["healthz"]) => (
            "healthz",
            reply(
                StatusCode::OK,
                json!({
                    "id": shared.id,
                    "role": if shared.is_primary() { "primary" } else { "backup" },
                    "primary": shared.primary_id(),
                }),
            ),
        ),
        (Method::GET, ["metrics"]) => {
            let tracked = lock(&shared.heartbeats).len();
            shared.metrics.tracked_heartbeats.set(tracked as i64);
            let mut buf = Vec::new();
            let res = match TextEncoder::new().encode(&shared.metrics.registry.gather(), &mut buf) {
                Ok(()) => {
                    let mut r = Response::new(Full::new(Bytes::from(buf)));
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    r
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            };
            ("metrics", res)
        }
        (Method::GET, ["api", "cluster"]) => {
            let q = query(&req);
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
            let res = match shared.db(|s| s.cluster()).await {
                Ok(mut view) => {
                    view.primary = shared.primary_id();
                    match serde_json::to_value(&view) {
                        Ok(v) => reply(StatusCode::OK, v),
                        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    }
                }
                Err(e) => store_error(&shared, e),
            };
            ("cluster", res)
        }
        (Method::GET, ["api", "events"]) => {
            let q = query(&req);
            let after = q.get("after").and_then(|v| v.parse().ok()).unwrap_or(0);
            let limit = q
                .get("limit")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000)
                .min(10_000);
            let res = match shared.db(move |s| s.events(after, limit)).await {
                Ok(ev) => reply(StatusCode::OK, json!(ev)),
                Err(e) => store_error(&shared, e),
            };
            ("events", res)
        }
        (Method::POST, ["api", "members"]) => {
            if let Some(r) = not_primary(&shared, &path) {
                return ("register", r);
            }
            let reg: Registration = match body_json(req).await {
                Ok(r) => r,
                Err(r) => return ("register", r),
            };
            if let Err(msg) = reg.validate() {
                return ("register", error(StatusCode::BAD_REQUEST, msg));
            }
            let now = now_ms();
            let id = reg.id.clone();
            let res = match shared.db(move |s| s.register(&reg, now)).await {
                Ok(v) => {
                    shared.version.send_replace(v);
                    lock(&shared.heartbeats).insert(id.clone(), Instant::now());
                    tracing::info!(member = id, version = v, "registered");
                    reply(StatusCode::OK, json!({ "version": v }))
                }
                Err(e) => store_error(&shared, e),
            };
            ("register", res)
        }
        (Method::POST, ["api", "members", id, "heartbeat"]) => {
            if let Some(r) = not_primary(&shared, &path) {
                return ("heartbeat", r);
            }
            let id = id.to_string();
            // A flood of heartbeats is refused before it reaches the database.
            let min_gap = shared.min_heartbeat_gap();
            {
                let mut hb = lock(&shared.heartbeats);
                if hb.get(&id).is_some_and(|t| t.elapsed() < min_gap) {
                    return (
                        "heartbeat",
                        error(
                            StatusCode::TOO_MANY_REQUESTS,
                            format!("heartbeats more often than every {min_gap:?}"),
                        ),
                    );
                }
                hb.insert(id.clone(), Instant::now());
            }
            let now = now_ms();
            let known = id.clone();
            let res = match shared.db(move |s| s.heartbeat(&known, now)).await {
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
                    store_error(&shared, e)
                }
            };
            ("heartbeat", res)
        }
        (Method::DELETE, ["api", "members", id]) => {
            if let Some(r) = not_primary(&shared, &path) {
                return ("deregister", r);
            }
            let id = id.to_string();
            let now = now_ms();
            let gone = id.clone();
            let res = match shared.db(move |s| s.deregister(&gone, now)).await {
                Ok(Some(v)) => {
                    lock(&shared.heartbeats).remove(&id);
                    shared.version.send_replace(v);
                    reply(StatusCode::OK, json!({ "version": v }))
                }
                Ok(None) => error(StatusCode::NOT_FOUND, "unknown member"),
                Err(e) => store_error(&shared, e),
            };
            ("deregister", res)
        }
        _ => (
            "other",
            error(
                StatusCode::NOT_FOUND,
                format!("no route {} {path}", req.method()),
            ),
        ),
    }
}

async fn serve(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    crate::http_server::serve("haserver", listener, stop, move |req| {
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
    use std::sync::atomic::AtomicBool;

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
        fn register(&self, reg: &Registration, now_ms: i64) -> Result<u64, StoreError> {
            self.write()?;
            self.inner.register(reg, now_ms)
        }
        fn heartbeat(&self, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError> {
            self.write()?;
            self.inner.heartbeat(id, now_ms)
        }
        fn deregister(&self, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError> {
            self.write()?;
            self.inner.deregister(id, now_ms)
        }
        fn expire(&self, now_ms: i64, cutoffs: Cutoffs) -> Result<Option<u64>, StoreError> {
            self.write()?;
            self.inner.expire(now_ms, cutoffs)
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
            now_ms: i64,
            ttl_ms: i64,
        ) -> Result<Lease, StoreError> {
            self.write()?;
            self.inner.acquire_lease(holder, addr, now_ms, ttl_ms)
        }
        fn release_lease(&self, holder: &str) -> Result<(), StoreError> {
            self.write()?;
            self.inner.release_lease(holder)
        }
    }

    async fn register(addr: SocketAddr, id: &str) -> (u16, String) {
        let body = format!(r#"{{"id":"{id}","mqtt":"127.0.0.1:1883"}}"#);
        match crate::client::request(
            addr,
            Method::POST,
            "/api/members",
            Some(body),
            Duration::from_secs(5),
        )
        .await
        {
            Ok((status, _, body)) => (status, String::from_utf8_lossy(&body).into_owned()),
            Err(e) => (0, e.to_string()),
        }
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
        let ha = HaServer::start("ha1", listener, store.clone(), timing).await?;
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
