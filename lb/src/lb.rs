//! The running load balancer: starting it, reloading it, stopping it. [`Lb`] is a cheap,
//! cloneable handle; the binary drives it from signals, tests drive it directly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use mqlb_config::{Config, ConfigError, Frontend, Probe};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::BackendState;
use crate::health::probe;
use crate::metrics::Metrics;
use crate::reload::{self, plan_listeners};
pub(crate) use crate::shared::Shared;
use crate::snapshot::Snapshot;
use crate::state::{ConnRegistry, Listening, OwnProbes};
use crate::workers::Workers;
use crate::{admin, listener};
use mqlb_ha_api::model::ClusterView;
use mqlb_ha_api::HaClient;
use mqlb_http::lock;

/// Sockets bound by the caller (tests bind `127.0.0.1:0`; a supervisor may pass its own).
/// Frontends not given here are bound from the config.
#[derive(Default)]
pub struct Listeners {
    /// By frontend name.
    pub frontends: HashMap<String, TcpListener>,
    pub admin: Option<TcpListener>,
}

/// Why the LB could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {what} {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot start the data-path threads: {0}")]
    Threads(std::io::Error),
}

/// Why a reload was refused. The running configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this LB was started without a config file; nothing to reload")]
    NoSource,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on frontend {name} {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A frontend's listening sockets before their accept loops start.
enum Bound {
    /// Given by the caller (`Listeners`): one socket, shared by the data-path threads.
    Adopted(TcpListener),
    /// Bound by mqlb: one per data-path thread.
    Ours(Vec<std::net::TcpListener>),
}

struct OpenFrontend {
    cfg: Frontend,
    addr: SocketAddr,
    stop: CancellationToken,
    /// Handles on the listening sockets the accept loops own, to change their backlog in place.
    sockets: Vec<socket2::Socket>,
}

struct ProbeTask {
    state: Arc<BackendState>,
    probe: Probe,
    target: SocketAddr,
    stop: CancellationToken,
}

/// What only reloads, membership updates and shutdown touch; the data path never takes this
/// lock. A change is applied whole under it, so a file reload and a membership update cannot
/// interleave (one re-applying the other's stale base).
struct Control {
    frontends: HashMap<String, OpenFrontend>,
    probes: HashMap<(String, String), ProbeTask>,
    data_path: CancellationToken,
    /// The configuration as given (before discovered members replace the static backends of
    /// `discovery` pools), and the last membership the HA server sent.
    base: Config,
    membership: Option<ClusterView>,
    /// Members that left the membership, still listed until `remove_after`.
    departures: crate::discovery::Departures,
}

/// What changes the running configuration.
enum Change {
    /// A new configuration (a reload, or `Lb::apply`).
    Config(Box<Config>),
    /// A new membership from the HA server, applied over the configuration last given.
    Membership(ClusterView),
    /// The last membership again: a departed member's `remove_after` passed.
    Expiry,
}

struct Inner {
    shared: Arc<Shared>,
    control: tokio::sync::Mutex<Control>,
    admin_addr: SocketAddr,
    /// Bound frontend addresses, readable without waiting for a reload in progress.
    addrs: std::sync::Mutex<HashMap<String, SocketAddr>>,
    admin_stop: CancellationToken,
    source: Option<PathBuf>,
    /// The fingerprint of the source file's content as last loaded (start, SIGHUP or the
    /// watcher), so the watcher does not load again what a SIGHUP already did.
    loaded: std::sync::Mutex<Option<u64>>,
    /// The data-path threads: every frontend has an accept loop on each.
    workers: Workers,
}

/// A running load balancer.
#[derive(Clone)]
pub struct Lb {
    inner: Arc<Inner>,
}

fn bind_err(what: &str, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |source| StartError::Bind {
        what: what.to_string(),
        addr,
        source,
    }
}

impl Lb {
    /// Binds (or adopts) the listeners, starts probes, the admin server and, when the config
    /// came from a file with `watch_config`, the file watcher.
    pub async fn start(config: Config, mut listeners: Listeners) -> Result<Lb, StartError> {
        for w in &config.warnings {
            tracing::warn!(key = w.key, "{}", w.message);
        }
        let metrics = Arc::new(Metrics::new()?);
        let admin_listener = match listeners.admin.take() {
            Some(l) => l,
            None => listener::ensure_free(config.lb.admin)
                .and_then(|()| listener::bind(config.lb.admin, 128))
                .map_err(bind_err("admin server", config.lb.admin))?,
        };
        let admin_addr = admin_listener
            .local_addr()
            .map_err(bind_err("admin server", config.lb.admin))?;
        let threads = crate::workers::count(config.lb.data_threads);
        let mut bound = Vec::new();
        for f in reload::served_frontends(&config) {
            let l = match listeners.frontends.remove(&f.name) {
                Some(l) => Bound::Adopted(l),
                None => Bound::Ours(
                    listener::ensure_free(f.bind)
                        .and_then(|()| listener::bind_group(f.bind, f.backlog.get(), threads))
                        .map_err(bind_err(&format!("frontend {}", f.name), f.bind))?,
                ),
            };
            bound.push((f, l));
        }
        let source = config.source.clone();
        let base = config.clone();
        // The operator's decisions of before a restart override the config's `drain`.
        let (admin_state, state_err) =
            crate::admin_state::AdminState::load(crate::admin_state::state_path(&config));
        if let Some(e) = state_err {
            tracing::error!("admin state not loaded; starting without it: {e}");
        }
        let first = Snapshot::build(config, None);
        metrics.tls_certificates(&first.config.frontends);
        admin_state.apply(&first);
        let evacuations = crate::evacuate::Evacuations::new(metrics.registry())?;
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(first),
            metrics,
            conns: Arc::new(ConnRegistry::default()),
            admin_state,
            evacuations,
            listening: Listening::default(),
            own_probes: OwnProbes::default(),
            live: Arc::default(),
            live_by_frontend: std::sync::Mutex::new(HashMap::new()),
            sources: Arc::default(),
            tracker: TaskTracker::new(),
            stopping: CancellationToken::new(),
            hard_stop: AtomicBool::new(false),
            events: Default::default(),
        });
        let loaded = source
            .as_ref()
            .and_then(|p| reload::fingerprint(p, &reload::watched_files(&base)));
        let lb = Lb {
            inner: Arc::new(Inner {
                shared: shared.clone(),
                control: tokio::sync::Mutex::new(Control {
                    frontends: HashMap::new(),
                    probes: HashMap::new(),
                    data_path: CancellationToken::new(),
                    base,
                    membership: None,
                    departures: Default::default(),
                }),
                admin_addr,
                addrs: std::sync::Mutex::new(HashMap::new()),
                admin_stop: CancellationToken::new(),
                loaded: std::sync::Mutex::new(loaded),
                source,
                workers: Workers::start(threads).map_err(StartError::Threads)?,
            }),
        };
        {
            let mut control = lb.inner.control.lock().await;
            for (f, l) in bound {
                lb.open_frontend(&mut control, f, l);
            }
            lb.reconcile_probes(&mut control);
            lb.restart_data_path_probes(&mut control);
        }
        // An evacuation under way at the last stop goes on: the restart closed its clients'
        // connections already, so it finds little to do, but it reports done as it should.
        for (id, d) in shared.admin_state.all() {
            if let Some(rate) = d.evacuate_rate.and_then(std::num::NonZeroU32::new) {
                shared.evacuate(&id, rate);
            }
        }
        tokio::spawn(crate::conn::sweep_idle(
            shared.clone(),
            lb.inner.admin_stop.clone(),
        ));
        tokio::spawn(admin::serve(
            shared.clone(),
            admin_listener,
            lb.inner.admin_stop.clone(),
        ));
        if let Some(path) = lb.inner.source.clone() {
            tokio::spawn(watch_file(lb.clone(), path));
        }
        let cfg = lb.config();
        if cfg.pools.iter().any(|p| p.discovery) && !cfg.ha.servers.is_empty() {
            let servers = cfg.ha.servers.iter().map(|h| h.listen).collect();
            // The HA servers authenticate every request with the cluster secret.
            match cfg.cluster.secret.clone() {
                Some(secret) => {
                    let client = HaClient::new(servers, secret).with_source(cfg.lb.source);
                    let stopping = lb.inner.shared.stopping.clone();
                    tokio::spawn(crate::discovery::follow(lb.clone(), client, stopping));
                }
                None => tracing::error!(
                    "discovery = \"haserver\" needs [cluster] secret; the pools keep their static backends"
                ),
            }
        }
        tracing::info!(admin = %admin_addr, frontends = ?lb.frontend_addrs(), "load balancer started");
        Ok(lb)
    }

    /// True once shutdown began.
    pub fn is_stopping(&self) -> bool {
        self.inner.shared.stopping.is_cancelled()
    }

    /// The admin server's address (`/metrics`, `/api/...`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.inner.admin_addr
    }

    /// The bound address of a frontend, by name.
    pub fn frontend_addr(&self, name: &str) -> Option<SocketAddr> {
        lock(&self.inner.addrs).get(name).copied()
    }

    /// Bound addresses of every open frontend.
    pub fn frontend_addrs(&self) -> HashMap<String, SocketAddr> {
        lock(&self.inner.addrs).clone()
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.inner.shared.snapshot.load().config.clone()
    }

    /// The metrics in Prometheus text format (what `/metrics` serves).
    pub fn metrics_text(&self) -> String {
        self.inner.shared.metrics.render().unwrap_or_default()
    }

    /// Live proxied connections.
    pub fn connection_count(&self) -> usize {
        self.inner.shared.conns.len()
    }

    /// Re-reads the config file this LB was started from and applies it (SIGHUP, file change).
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let result = match &self.inner.source {
            None => Err(ReloadError::NoSource),
            Some(path) => {
                // Read before the load: a change landing in between is seen again next poll.
                // The TLS files are those the running config names; a config that names others
                // leaves no print, so the watcher reads it once more with its own files.
                let files = reload::watched_files(&self.config());
                let fingerprint = reload::fingerprint(path, &files);
                match Config::load(path) {
                    Ok(c) => {
                        let same_files = reload::watched_files(&c) == files;
                        let applied = self.apply(c).await;
                        if applied.is_ok() {
                            *lock(&self.inner.loaded) = fingerprint.filter(|_| same_files);
                        }
                        return applied;
                    }
                    Err(e) => Err(ReloadError::Config(e)),
                }
            }
        };
        if let Err(e) = &result {
            self.count_reload(false);
            self.inner.shared.events.reload(Err(e));
            tracing::error!("reload refused, keeping the running config: {e}");
        }
        result
    }

    /// Applies a validated config: binds new listeners first (on failure nothing changes),
    /// then swaps the snapshot in one store, changes backlogs in place, closes removed
    /// listeners and restarts the probes of changed backends. Live connections are not touched,
    /// and a port that stays in the config never stops listening.
    pub async fn apply(&self, config: Config) -> Result<(), ReloadError> {
        self.apply_change(Change::Config(Box::new(config))).await
    }

    /// The reload executor: every change of the running configuration goes through here, under
    /// the control lock from reading the base to the last probe restarted.
    async fn apply_change(&self, change: Change) -> Result<(), ReloadError> {
        let mut control = self.inner.control.lock().await;
        let (mut config, count) = match change {
            Change::Config(config) => {
                let mut config = *config;
                if config.source.is_none() {
                    config.source = self.inner.source.clone();
                }
                control.base = config.clone();
                (config, true)
            }
            Change::Membership(view) => {
                control.membership = Some(view);
                (control.base.clone(), false)
            }
            Change::Expiry => (control.base.clone(), false),
        };
        let mut departed = crate::discovery::Changes::default();
        let c = &mut *control;
        if let Some(view) = &c.membership {
            let (now, wall) = (Instant::now(), SystemTime::now());
            (config, departed) = c.departures.apply(config, view, now, wall);
        }
        let open_now: Vec<Frontend> = control.frontends.values().map(|f| f.cfg.clone()).collect();
        let plan = plan_listeners(&open_now, &config);
        let mut fresh = Vec::new();
        for f in &plan.open {
            // Bound while the old sockets still listen: where a frontend takes over an address
            // another of ours holds, the two share it (SO_REUSEPORT) until the old one closes.
            // Any other address must be free.
            let ours = open_now.iter().any(|o| o.bind == f.bind);
            let bound = if ours {
                Ok(())
            } else {
                listener::ensure_free(f.bind)
            }
            .and_then(|()| listener::bind_group(f.bind, f.backlog.get(), self.inner.workers.len()));
            match bound {
                Ok(l) => fresh.push((f.clone(), Bound::Ours(l))),
                Err(source) => {
                    drop(fresh);
                    self.count_reload(false);
                    let e = ReloadError::Bind {
                        name: f.name.clone(),
                        addr: f.bind,
                        source,
                    };
                    self.inner.shared.events.reload(Err(&e));
                    tracing::error!("reload refused, keeping the running config: {e}");
                    return Err(e);
                }
            }
        }
        for w in &config.warnings {
            tracing::warn!(key = w.key, "{}", w.message);
        }
        if config.lb.admin != self.config().lb.admin {
            tracing::warn!(
                running = %self.inner.admin_addr,
                configured = %config.lb.admin,
                "the admin address changes only on restart"
            );
        }
        if config.lb.data_threads != self.config().lb.data_threads {
            tracing::warn!(
                configured = ?config.lb.data_threads,
                "lb.data_threads changes only on restart"
            );
        }
        let shared = &self.inner.shared;
        let next = Snapshot::build(config, Some(&shared.snapshot.load()));
        shared.admin_state.apply(&next);
        let (gone, left) = {
            let now = shared.snapshot.load();
            (now.departed(&next), now.left_behind(&next))
        };
        shared.snapshot.store(Arc::new(next));
        shared.metrics.forget(&gone);
        shared
            .metrics
            .tls_certificates(&shared.snapshot.load().config.frontends);
        let left_membership = control
            .departures
            .mark(&shared.snapshot.load(), &shared.metrics);
        shared.events.membership(&shared.snapshot.load(), &departed);
        // A backend that left the pool, or left the membership and stays listed until
        // `remove_after`, is down for the connections it still has.
        for state in &left {
            state.retire();
        }
        for state in left.iter().chain(&left_membership) {
            shared.conns.backend_went_down(state);
        }
        for f in &plan.resize {
            if let Some(o) = control.frontends.get_mut(&f.name) {
                let backlog = i32::try_from(f.backlog.get()).unwrap_or(i32::MAX);
                for s in &o.sockets {
                    if let Err(e) = s.listen(backlog) {
                        tracing::warn!(frontend = f.name, error = %e, "listen backlog not changed");
                    }
                }
                o.cfg = f.clone();
            }
        }
        for name in &plan.close {
            if let Some(o) = control.frontends.remove(name) {
                o.stop.cancel();
                lock(&self.inner.addrs).remove(name);
            }
        }
        for (f, l) in fresh {
            self.open_frontend(&mut control, f, l);
        }
        self.reconcile_probes(&mut control);
        self.restart_data_path_probes(&mut control);
        if count {
            self.count_reload(true);
            shared.events.reload(Ok(()));
        }
        tracing::info!(
            kept = plan.keep.len(),
            resized = plan.resize.len(),
            opened = plan.open.len(),
            closed = plan.close.len(),
            "{}",
            if count {
                "configuration reloaded"
            } else {
                "membership applied"
            }
        );
        Ok(())
    }

    fn count_reload(&self, ok: bool) {
        self.inner
            .shared
            .metrics
            .config_reloads_total
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// Starts an accept loop on every data-path thread.
    fn open_frontend(&self, control: &mut Control, f: Frontend, bound: Bound) {
        let handles = self.inner.workers.handles();
        // One socket per thread (ours, SO_REUSEPORT), or the caller's socket shared by all
        // threads (whichever wakes first accepts). Ours were bound by `listener::bind_group`,
        // so accepted sockets inherit their options.
        let (sockets, inherits) = match bound {
            Bound::Ours(v) => (Ok(v), listener::ACCEPTED_INHERIT_OPTIONS),
            Bound::Adopted(l) => (
                l.into_std().and_then(|l| listener::share(l, handles.len())),
                false,
            ),
        };
        let addr = sockets
            .as_ref()
            .ok()
            .and_then(|v| v.first()?.local_addr().ok())
            .unwrap_or(f.bind);
        let stop = self.inner.shared.stopping.child_token();
        let mut handles_kept = Vec::new();
        // One socket (or handle on the shared one) per thread, registered with that thread's
        // reactor.
        let spawned = sockets.and_then(|sockets| {
            for (h, socket) in handles.iter().zip(sockets) {
                handles_kept.push(socket2::Socket::from(socket.try_clone()?));
                let l = {
                    let _rt = h.enter();
                    TcpListener::from_std(socket)?
                };
                h.spawn(listener::accept_loop(
                    self.inner.shared.clone(),
                    f.name.clone(),
                    l,
                    inherits,
                    stop.clone(),
                ));
            }
            Ok(())
        });
        if let Err(e) = spawned {
            tracing::error!(frontend = f.name, %addr, error = %e, "cannot hand the listener to the data-path threads");
        }
        tracing::info!(frontend = f.name, %addr, "listening");
        lock(&self.inner.addrs).insert(f.name.clone(), addr);
        control.frontends.insert(
            f.name.clone(),
            OpenFrontend {
                cfg: f,
                addr,
                stop,
                sockets: handles_kept,
            },
        );
    }

    /// Keeps the probe task of every unchanged backend and (re)starts the others.
    fn reconcile_probes(&self, control: &mut Control) {
        let shared = &self.inner.shared;
        let snap = shared.snapshot.load();
        let mut wanted = HashMap::new();
        for pool in &snap.pools {
            // A member that left the membership is not probed: it stays down until it is back.
            for m in pool.members.iter().filter(|m| !m.state.has_left()) {
                let key = (pool.cfg.name.clone(), m.cfg.id.clone());
                let target = pool.cfg.probe.target(&m.cfg);
                wanted.insert(key, (m.state.clone(), pool.cfg.probe.clone(), target));
            }
        }
        control.probes.retain(|key, task| {
            let keep = wanted.get(key).is_some_and(|(state, probe, target)| {
                Arc::ptr_eq(state, &task.state) && *probe == task.probe && *target == task.target
            });
            if !keep {
                task.stop.cancel();
            }
            keep
        });
        for (key, (state, probe, target)) in wanted {
            if control.probes.contains_key(&key) {
                continue;
            }
            let stop = shared.stopping.child_token();
            tokio::spawn(probe::run(
                shared.clone(),
                key.0.clone(),
                key.1.clone(),
                target,
                probe.clone(),
                state.clone(),
                stop.clone(),
            ));
            control.probes.insert(
                key,
                ProbeTask {
                    state,
                    probe,
                    target,
                    stop,
                },
            );
        }
    }

    /// `mqlb_data_path_up{rule}`: Azure's data-path availability, measured by going through
    /// the rule's own frontend like a client would.
    fn restart_data_path_probes(&self, control: &mut Control) {
        control.data_path.cancel();
        control.data_path = self.inner.shared.stopping.child_token();
        let snap = self.inner.shared.snapshot.load();
        for (frontend, rule) in &snap.rules {
            let Some(addr) = control.frontends.get(frontend).map(|f| f.addr) else {
                continue;
            };
            tokio::spawn(crate::health::data_path::run(
                self.inner.shared.clone(),
                rule.clone(),
                addr,
                control.data_path.clone(),
            ));
        }
    }

    /// Stops accepting, lets live connections finish for up to `shutdown_grace`, then cuts
    /// the rest. Returns how many connections were cut.
    pub async fn shutdown(&self) -> usize {
        let shared = &self.inner.shared;
        let grace = self.config().lb.shutdown_grace;
        shared.stopping.cancel();
        // The accept loops end on `stopping`; these handles on their sockets must go too, or
        // the ports would keep completing handshakes nobody accepts.
        self.inner.control.lock().await.frontends.clear();
        shared.tracker.close();
        let live = shared.conns.len();
        tracing::info!(
            live,
            ?grace,
            "shutting down: no new connections, waiting for live ones"
        );
        let mut cut = 0;
        if tokio::time::timeout(grace, shared.tracker.wait())
            .await
            .is_err()
        {
            cut = shared.conns.len();
            tracing::warn!(cut, "grace period over; closing the remaining connections");
            shared.hard_stop.store(true, Ordering::Release);
            // Wake every live connection; each sees `hard_stop` and ends.
            shared.conns.wake_all();
            if tokio::time::timeout(Duration::from_secs(5), shared.tracker.wait())
                .await
                .is_err()
            {
                tracing::error!("connections still open 5 s after being cut");
            }
        }
        self.inner.admin_stop.cancel();
        cut
    }
}

/// What the membership follower (`discovery::follow`) asks of the LB, through the one reload
/// executor.
impl crate::discovery::Membership for Lb {
    type Error = ReloadError;

    /// A new membership from the HA server: re-applies the configuration with it. Not a
    /// reload (not counted as one); live connections are untouched as always.
    async fn apply_membership(&self, view: ClusterView) -> Result<(), ReloadError> {
        self.apply_change(Change::Membership(view)).await
    }

    /// Applies the last membership again, so the departed members whose `remove_after`
    /// passed are removed.
    async fn expire_departures(&self) -> Result<(), ReloadError> {
        self.apply_change(Change::Expiry).await
    }

    /// When a departed member is next due for removal.
    async fn next_departure(&self) -> Option<Instant> {
        self.inner.control.lock().await.departures.next_expiry()
    }
}

/// Polls the config file and reloads when its content changes (`watch_config`).
async fn watch_file(lb: Lb, path: PathBuf) {
    let stop = lb.inner.shared.stopping.clone();
    // The content last tried, so a refused file is not tried again until it changes.
    let mut tried = *lock(&lb.inner.loaded);
    loop {
        let interval = reload::poll_interval(&lb.config());
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if !lb.config().lb.watch_config {
            continue;
        }
        let now = reload::fingerprint(&path, &reload::watched_files(&lb.config()));
        if reload::file_changed(now, tried, *lock(&lb.inner.loaded)) {
            tried = now;
            tracing::info!(file = %path.display(), "config file changed; reloading");
            // `reload` logs and counts a refusal itself.
            if lb.reload().await.is_err() {
                continue;
            }
        }
    }
}
