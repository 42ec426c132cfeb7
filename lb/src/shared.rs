//! The state every task of one LB instance shares: the snapshot the data path reads, the
//! metrics, the live connections and their counts, and the shutdown signals.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use mqlb_config::Probe;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::machine::Transition;
use crate::backend::{BackendState, Source};
use crate::evacuate::{Evacuations, Progress};
use crate::events::Events;
use crate::limits::Sources;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::state::{ConnRegistry, Listening, OwnProbes};

/// State shared by every task of one LB instance.
pub(crate) struct Shared {
    /// Everything the data path reads, swapped whole on reload.
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub conns: Arc<ConnRegistry>,
    /// The admin API's drain/enable/evacuate decisions, kept across restarts.
    pub admin_state: crate::admin_state::AdminState,
    /// Evacuations by backend ID, running or finished.
    pub evacuations: Evacuations,
    /// Frontends with a running accept loop (`/healthz`).
    pub listening: Listening,
    /// Source addresses of the data-path probe's connections in flight.
    pub own_probes: OwnProbes,
    /// Live accepted connections, in all and per frontend, and per client address: the
    /// connection limits (`lb::limits`).
    pub live: Arc<AtomicU32>,
    pub live_by_frontend: Mutex<HashMap<String, Arc<AtomicU32>>>,
    pub sources: Arc<Sources>,
    /// Connection tasks, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Fired when shutdown begins: accept loops, probes and watchers stop.
    pub stopping: CancellationToken,
    /// Set when shutdown's grace period is over: live connections are cut. A plain flag, not
    /// a `CancellationToken`: every connection reads it on every wake-up, and a token's
    /// `is_cancelled` takes a mutex shared by all of them.
    pub hard_stop: AtomicBool,
    /// Health events for `/api/events`.
    pub events: Events,
}

impl Shared {
    /// Feeds one health result (a probe, or a failed connect of client traffic) to backend
    /// `backend` of `pool`: the one place a backend changes state. A transition sets
    /// `mqlb_backend_up`; going down also wakes the backend's connections, which end there
    /// under `close_on_backend_down`.
    pub(crate) fn observe_health(
        &self,
        (pool, backend): (&str, &str),
        state: &Arc<BackendState>,
        ok: bool,
        probe: &Probe,
        from: Source,
    ) -> Option<Transition> {
        let (up, down) = (probe.up_threshold.get(), probe.down_threshold.get());
        let t = state.observe(ok, up, down, from)?;
        self.metrics
            .backend_up
            .with_label_values(&[pool, backend])
            .set(i64::from(state.is_up())); // a member that left stays 0 whatever its probe said
        self.events
            .health(&self.snapshot.load(), (pool, backend), t, from);
        if t == Transition::WentDown {
            self.conns.backend_went_down(state);
        }
        Some(t)
    }

    /// Starts (or restarts at another rate) the paced evacuation of backend `id`; the caller
    /// has drained it.
    pub(crate) fn evacuate(&self, id: &str, rate: NonZeroU32) -> Arc<Progress> {
        self.evacuations
            .start(&self.conns, &self.stopping, id, rate)
    }
}
