//! Live per-connection state: the registry of proxied connections (`/api/connections`, byte
//! counters, idle expiry, evacuation), the frontends listening, the LB's own probe addresses.
//! Per-backend state is in [`crate::backend`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use futures_util::task::AtomicWaker;

use crate::backend::BackendState;
use crate::metrics::Metrics;
use crate::snapshot::{MemberMetrics, RuleRt};
use mqlb_http::lock;

/// One live proxied connection, for `/api/connections` and the byte counters. Names are
/// borrowed from the rule it was routed by, not copied per connection.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    pub rule: Arc<RuleRt>,
    /// Index of the backend in the rule's pool.
    pub member: usize,
    pub peer: SocketAddr,
    /// The CONNECT's protocol level, which picked the backend port (`mqtt_ports`).
    pub level: Option<u8>,
    pub client_id: Option<Box<str>>,
    /// The TLS version, when mqlb terminates the client's TLS.
    pub tls: Option<rustls::ProtocolVersion>,
    pub started: Instant,
    /// Client → backend.
    pub bytes_in: AtomicU64,
    /// Backend → client.
    pub bytes_out: AtomicU64,
    /// What the sweeper and the end of the connection have folded into `mqlb_bytes_total`.
    folded_in: AtomicU64,
    folded_out: AtomicU64,
    /// Milliseconds after `started` when bytes last moved, as the sweeper saw it.
    last_active_ms: AtomicU64,
    /// Set by the sweeper when the idle timeout ran out.
    idle_expired: AtomicBool,
    /// The connection's task, woken to end it (idle, backend down, shutdown, evacuation).
    waker: AtomicWaker,
    /// Its evacuation (`Evacuation` as a number): set by the evacuator, read by the relay.
    evacuation: std::sync::atomic::AtomicU8,
}

/// How far an evacuation has got with one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Evacuation {
    None = 0,
    /// Asked to leave: an MQTT 5 client is sent DISCONNECT 0x9C at the next packet boundary,
    /// any other connection is closed.
    Asked = 1,
    /// Told and still open after the grace: closed now.
    Forced = 2,
}

impl ConnInfo {
    pub(crate) fn new(
        id: u64,
        rule: Arc<RuleRt>,
        member: usize,
        peer: SocketAddr,
        level: Option<u8>,
        client_id: Option<Box<str>>,
        bytes_in: u64,
    ) -> ConnInfo {
        ConnInfo {
            id,
            rule,
            member,
            peer,
            level,
            client_id,
            tls: None,
            started: Instant::now(),
            bytes_in: AtomicU64::new(bytes_in),
            bytes_out: AtomicU64::new(0),
            folded_in: AtomicU64::new(0),
            folded_out: AtomicU64::new(0),
            last_active_ms: AtomicU64::new(0),
            idle_expired: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            evacuation: std::sync::atomic::AtomicU8::new(0),
        }
    }

    pub(crate) fn evacuation(&self) -> Evacuation {
        match self.evacuation.load(Ordering::Acquire) {
            0 => Evacuation::None,
            1 => Evacuation::Asked,
            _ => Evacuation::Forced,
        }
    }

    /// Moves the connection's evacuation on (never back) and wakes its task to act on it.
    pub(crate) fn evacuate(&self, step: Evacuation) {
        self.evacuation.fetch_max(step as u8, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Adds the bytes moved since the last fold to `mqlb_bytes_total`; true if any moved.
    /// Safe to race (sweeper and the connection's end): `fetch_max` keeps each byte counted once.
    pub(crate) fn fold(&self, mm: &MemberMetrics) -> bool {
        let fold_one = |now: &AtomicU64, folded: &AtomicU64, counter: &prometheus::IntCounter| {
            let n = now.load(Ordering::Relaxed);
            let before = folded.fetch_max(n, Ordering::Relaxed);
            if n > before {
                counter.inc_by(n - before);
            }
            n > before
        };
        let i = fold_one(&self.bytes_in, &self.folded_in, &mm.bytes_in);
        let o = fold_one(&self.bytes_out, &self.folded_out, &mm.bytes_out);
        i || o
    }

    /// Called by the connection's task on each poll before it looks at why it should end.
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    pub(crate) fn is_idle_expired(&self) -> bool {
        self.idle_expired.load(Ordering::Acquire)
    }

    /// One sweep over this connection: fold its bytes; end it if nothing moved for the rule's
    /// idle timeout.
    fn sweep(&self, metrics: &Metrics) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.sweep_at(metrics, now);
    }

    /// `sweep` at `now`, in milliseconds after `started`.
    fn sweep_at(&self, metrics: &Metrics, now: u64) {
        let mm = self.rule.member_metrics(metrics, self.member);
        if self.fold(mm) {
            self.last_active_ms.store(now, Ordering::Relaxed);
        } else {
            let idle = now.saturating_sub(self.last_active_ms.load(Ordering::Relaxed));
            if u128::from(idle) >= self.rule.cfg.idle_timeout.as_millis() {
                self.idle_expired.store(true, Ordering::Release);
                self.waker.wake();
            }
        }
    }

    pub fn backend_state(&self) -> &Arc<BackendState> {
        &self.rule.pool.members[self.member].state
    }

    /// The backend address this connection went to.
    pub fn backend_addr(&self) -> SocketAddr {
        self.rule.pool.members[self.member]
            .cfg
            .addr_for_level(self.level)
    }

    /// When the connection was accepted, by the wall clock.
    pub fn since(&self) -> SystemTime {
        SystemTime::now()
            .checked_sub(self.started.elapsed())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    pub fn rule_name(&self) -> &str {
        &self.rule.cfg.name
    }

    pub fn backend(&self) -> &str {
        &self.rule.pool.members[self.member].cfg.id
    }
}

/// Which frontends have an accept loop running, so `/healthz` can tell a port that stopped
/// listening (a reload gone wrong, a listener that could not be handed to the data path) from a
/// healthy LB. Each accept loop holds a [`ListeningGuard`] for as long as it accepts.
#[derive(Default)]
pub struct Listening(Arc<Mutex<HashMap<String, usize>>>);

/// Counts one accept loop of a frontend until dropped.
pub struct ListeningGuard {
    set: Arc<Mutex<HashMap<String, usize>>>,
    frontend: String,
}

impl Listening {
    pub fn enter(&self, frontend: &str) -> ListeningGuard {
        *lock(&self.0).entry(frontend.to_string()).or_default() += 1;
        ListeningGuard {
            set: self.0.clone(),
            frontend: frontend.to_string(),
        }
    }

    /// The frontends of `served` without a running accept loop.
    pub fn missing<'a>(&self, served: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
        let set = lock(&self.0);
        served
            .into_iter()
            .filter(|f| set.get(*f).is_none_or(|n| *n == 0))
            .collect()
    }
}

impl Drop for ListeningGuard {
    fn drop(&mut self) {
        let mut set = lock(&self.set);
        if let Some(n) = set.get_mut(&self.frontend) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                set.remove(&self.frontend);
            }
        }
    }
}

/// Source addresses of the LB's own data-path probe connections, which go through a frontend
/// like a client but are not client traffic: not counted, never a passive health failure. A
/// lock-free lookup per accepted connection (the set is written once per probe round).
#[derive(Default)]
pub struct OwnProbes(Arc<arc_swap::ArcSwap<Vec<SocketAddr>>>);

/// Keeps one source address in [`OwnProbes`] until dropped.
pub struct OwnProbeGuard {
    set: Arc<arc_swap::ArcSwap<Vec<SocketAddr>>>,
    addr: SocketAddr,
}

impl OwnProbes {
    pub fn add(&self, addr: SocketAddr) -> OwnProbeGuard {
        self.0.rcu(|v| {
            let mut v = Vec::clone(v);
            v.push(addr);
            v
        });
        OwnProbeGuard {
            set: self.0.clone(),
            addr,
        }
    }

    pub fn contains(&self, peer: SocketAddr) -> bool {
        self.0.load().contains(&peer)
    }
}

impl Drop for OwnProbeGuard {
    fn drop(&mut self) {
        self.set.rcu(|v| {
            let mut v = Vec::clone(v);
            v.retain(|a| *a != self.addr);
            v
        });
    }
}

const SHARDS: usize = 16;

/// Live connections, sharded so that opening and closing connections on different cores do
/// not contend on one lock. Touched at open and close only, never per packet.
pub struct ConnRegistry {
    shards: [Mutex<HashMap<u64, Arc<ConnInfo>>>; SHARDS],
    next_id: AtomicU64,
}

impl Default for ConnRegistry {
    fn default() -> Self {
        ConnRegistry {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
        }
    }
}

impl ConnRegistry {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn insert(&self, info: Arc<ConnInfo>) {
        lock(&self.shards[info.id as usize % SHARDS]).insert(info.id, info);
    }

    pub fn remove(&self, id: u64) {
        lock(&self.shards[id as usize % SHARDS]).remove(&id);
    }

    /// True while connection `id` is open.
    pub fn contains(&self, id: u64) -> bool {
        lock(&self.shards[id as usize % SHARDS]).contains_key(&id)
    }

    pub fn snapshot(&self) -> Vec<Arc<ConnInfo>> {
        let mut all: Vec<Arc<ConnInfo>> = self
            .shards
            .iter()
            .flat_map(|s| lock(s).values().cloned().collect::<Vec<_>>())
            .collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// Runs `f` on every live connection, one shard lock at a time.
    fn for_each(&self, mut f: impl FnMut(&ConnInfo)) {
        for shard in &self.shards {
            lock(shard).values().for_each(|c| f(c));
        }
    }

    /// Wakes every live connection (shutdown cutting what is left: each sees the stop flag).
    pub(crate) fn wake_all(&self) {
        self.for_each(|c| c.waker.wake());
    }

    /// Wakes the connections to a backend that just went down whose rule closes them then.
    pub(crate) fn backend_went_down(&self, state: &Arc<BackendState>) {
        self.for_each(|c| {
            if c.rule.cfg.close_on_backend_down && Arc::ptr_eq(c.backend_state(), state) {
                c.waker.wake();
            }
        });
    }

    /// Folds every connection's bytes into the metrics and ends the ones idle for longer than
    /// their rule's idle timeout. One pass over the registry instead of a timer per
    /// connection: an idle connection costs no wake-ups and no timer memory.
    pub(crate) fn sweep(&self, metrics: &Metrics) {
        self.for_each(|c| c.sweep(metrics));
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;
    use mqlb_config::Config;
    use std::sync::atomic::Ordering::Relaxed;

    fn conn(idle: &str) -> (Arc<ConnInfo>, Metrics) {
        let cfg = Config::parse(
            &format!(
                "[[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\n[[pool]]\nname = \"p\"\n\
                 [[pool.backend]]\nid = \"a\"\naddr = \"127.0.0.1:1001\"\n\
                 [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\nidle_timeout = \"{idle}\"\n"
            ),
            "t",
        )
        .expect("valid");
        let snap = Snapshot::build(cfg, None);
        let rule = snap.rules["f"].clone();
        let info = ConnInfo::new(
            1,
            rule,
            0,
            "127.0.0.1:5000".parse().expect("addr"),
            None,
            None,
            0,
        );
        (Arc::new(info), Metrics::new().expect("metrics"))
    }

    /// The sweeper and the connection's own end fold concurrently while bytes keep moving:
    /// every byte is counted exactly once.
    #[test]
    fn racing_folds_count_each_byte_once() {
        let (info, metrics) = conn("4m");
        let mm = info.rule.member_metrics(&metrics, 0);
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..20_000 {
                    info.bytes_in.fetch_add(3, Relaxed);
                    info.bytes_out.fetch_add(1, Relaxed);
                }
            });
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        info.fold(mm);
                    }
                });
            }
        });
        info.fold(mm);
        assert_eq!(mm.bytes_in.get(), 60_000);
        assert_eq!(mm.bytes_out.get(), 20_000);
    }

    /// A sweep ends a connection only once nothing moved for its rule's idle timeout.
    #[test]
    fn sweep_expires_only_idle_connections() {
        let (info, metrics) = conn("100ms");
        info.sweep_at(&metrics, 60);
        assert!(!info.is_idle_expired(), "60 ms after the start");
        info.bytes_in.fetch_add(1, Relaxed);
        info.sweep_at(&metrics, 90); // bytes moved: the idle clock restarts
        info.sweep_at(&metrics, 150);
        assert!(!info.is_idle_expired(), "60 ms after the last bytes");
        info.sweep_at(&metrics, 189);
        assert!(!info.is_idle_expired(), "99 ms after the last bytes");
        info.sweep_at(&metrics, 190);
        assert!(info.is_idle_expired(), "100 ms after the last bytes");
    }

    #[test]
    fn a_frontend_is_listening_while_one_of_its_loops_runs() {
        let l = Listening::default();
        assert_eq!(l.missing(["a", "b"]), vec!["a", "b"]);
        let a1 = l.enter("a");
        let a2 = l.enter("a");
        let _b = l.enter("b");
        drop(a1);
        assert!(l.missing(["a", "b"]).is_empty());
        drop(a2);
        assert_eq!(l.missing(["a", "b"]), vec!["a"]);
    }

    #[test]
    fn own_probe_addresses_are_known_while_their_guard_lives() {
        let probes = OwnProbes::default();
        let (a, b) = (
            "127.0.0.1:5000".parse().expect("addr"),
            "127.0.0.1:5001".parse().expect("addr"),
        );
        let ga = probes.add(a);
        let gb = probes.add(b);
        drop(ga);
        assert!(!probes.contains(a) && probes.contains(b));
        drop(gb);
        assert!(!probes.contains(b));
    }
}
