//! Live per-backend and per-connection state. Backend state is an `Arc` carried from one config
//! snapshot to the next for backends that did not change, so a reload keeps health and counts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use tokio::sync::Notify;

use crate::health::{HealthMachine, Transition};
use crate::snapshot::RuleRt;

/// Locks a mutex even if a panicking holder poisoned it: the data inside is plain counters
/// and records that stay meaningful.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The last probe result of a backend, for `/api/backends`.
#[derive(Debug, Clone)]
pub struct ProbeRecord {
    pub ok: bool,
    pub detail: String,
    pub at: SystemTime,
    pub duration: std::time::Duration,
}

/// Health and load of one backend, shared by the data path, the probe loop and the admin API.
#[derive(Debug)]
pub struct BackendState {
    up: AtomicBool,
    draining: AtomicBool,
    active: AtomicU64,
    machine: Mutex<HealthMachine>,
    last_probe: Mutex<Option<ProbeRecord>>,
    /// Woken when the backend goes down (for rules that close its connections then) and when
    /// shutdown cuts live connections: one waiter per connection, not two.
    pub(crate) cut: Notify,
}

impl BackendState {
    pub fn new(draining: bool) -> Self {
        BackendState {
            up: AtomicBool::new(true),
            draining: AtomicBool::new(draining),
            active: AtomicU64::new(0),
            machine: Mutex::new(HealthMachine::new(true)),
            last_probe: Mutex::new(None),
            cut: Notify::new(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Release);
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub(crate) fn conn_opened(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn conn_closed(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// `up`, `down` or `draining`, as the admin API reports it.
    pub fn state_name(&self) -> &'static str {
        if !self.is_up() {
            "down"
        } else if self.is_draining() {
            "draining"
        } else {
            "up"
        }
    }

    /// Feeds one health result (a probe, or a failed connect of client traffic).
    pub(crate) fn observe(
        &self,
        ok: bool,
        up_threshold: u32,
        down_threshold: u32,
    ) -> Option<Transition> {
        let t = lock(&self.machine).observe(ok, up_threshold, down_threshold);
        match t {
            Some(Transition::WentUp) => self.up.store(true, Ordering::Release),
            Some(Transition::WentDown) => {
                self.up.store(false, Ordering::Release);
                self.cut.notify_waiters();
            }
            None => {}
        }
        t
    }

    pub(crate) fn record_probe(&self, rec: ProbeRecord) {
        *lock(&self.last_probe) = Some(rec);
    }

    pub fn last_probe(&self) -> Option<ProbeRecord> {
        lock(&self.last_probe).clone()
    }
}

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
    pub started: Instant,
    /// Client → backend.
    pub bytes_in: AtomicU64,
    /// Backend → client.
    pub bytes_out: AtomicU64,
}

impl ConnInfo {
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

    pub fn snapshot(&self) -> Vec<Arc<ConnInfo>> {
        let mut all: Vec<Arc<ConnInfo>> = self
            .shards
            .iter()
            .flat_map(|s| lock(s).values().cloned().collect::<Vec<_>>())
            .collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// Wakes the connections of every backend that has any, through its cut signal (shutdown
    /// cutting what is left: each connection sees the stop flag and ends).
    pub(crate) fn wake_all_backends(&self) {
        let mut woken = std::collections::HashSet::new();
        for c in self.snapshot() {
            let state = c.backend_state();
            if woken.insert(Arc::as_ptr(state)) {
                state.cut.notify_waiters();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
