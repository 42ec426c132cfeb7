use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::{
    scheduler::{PauseReason, Tracker},
    ConnectionEvents, FilterIdx,
};
use crate::Cursor;

pub struct Graveyard {
    connections: HashMap<String, SavedState>,
    /// mqlb patch (session expiry): when each saved session that expires does, earliest
    /// first; one entry per session in `connections` with an `expires_at`, so it is bounded by
    /// the number of saved sessions. The router sweeps it from its own loop.
    expiries: BTreeSet<(Instant, String)>,
}

impl Graveyard {
    pub fn new() -> Graveyard {
        Graveyard {
            connections: HashMap::new(),
            expiries: BTreeSet::new(),
        }
    }

    /// Add a new connection.
    /// Return tracker of previous connection if connection id already exists
    pub fn retrieve(&mut self, id: &str) -> Option<SavedState> {
        let mut saved = self.connections.remove(id)?;
        if let Some(at) = saved.expires_at.take() {
            self.expiries.remove(&(at, id.to_owned()));
            // mqlb patch (session expiry): expired but not swept yet: no session.
            if at <= Instant::now() {
                saved.session_state = None;
            }
        }
        Some(saved)
    }

    /// Save connection tracker
    /// mqlb patch (session expiry): the session is kept for `expiry` seconds (`u32::MAX`:
    /// for ever, as the Session Expiry Interval 0xFFFFFFFF and 3.1.1's Clean Session 0 say).
    pub fn save_state(
        &mut self,
        mut tracker: Tracker,
        subscriptions: HashSet<String>,
        metrics: ConnectionEvents,
        unacked_pubrels: VecDeque<u16>,
        (unacked, last_pkid): (Vec<(u16, FilterIdx, Cursor)>, u16),
        expiry: u32,
    ) {
        tracker.pause(PauseReason::Busy);
        let id = tracker.id.clone();

        let session_state = SessionState {
            tracker,
            subscriptions,
            unacked_pubrels,
            unacked,
            last_pkid,
        };

        let expires_at = match expiry {
            u32::MAX => None,
            secs => Instant::now().checked_add(Duration::from_secs(secs.into())),
        };
        if let Some(at) = expires_at {
            self.expiries.insert((at, id.clone()));
        }
        let old = self.connections.insert(
            id.clone(),
            SavedState {
                session_state: Some(session_state),
                metrics,
                expires_at,
            },
        );
        self.forget_expiry(&id, old);
    }

    /// Save only metrics for connection
    pub fn save_metrics(&mut self, id: String, metrics: ConnectionEvents) {
        let old = self.connections.insert(
            id.clone(),
            SavedState {
                session_state: None,
                metrics,
                expires_at: None,
            },
        );
        self.forget_expiry(&id, old);
    }

    /// mqlb patch (session expiry): drops the expiry entry of a replaced saved state.
    fn forget_expiry(&mut self, id: &str, old: Option<SavedState>) {
        if let Some(at) = old.and_then(|o| o.expires_at) {
            self.expiries.remove(&(at, id.to_owned()));
        }
    }

    /// mqlb patch (across the cluster, issue 12): takes the saved session of `id` out (it
    /// moves to another router) with when it would have expired (`None`: never); `None` if
    /// there is none, or it has expired.
    pub fn take(&mut self, id: &str) -> Option<(SessionState, Option<Instant>)> {
        let saved = self.connections.remove(id)?;
        if let Some(at) = saved.expires_at {
            self.expiries.remove(&(at, id.to_owned()));
            if at <= Instant::now() {
                return None;
            }
        }
        Some((saved.session_state?, saved.expires_at))
    }

    /// mqlb patch (across the cluster, issue 12): forgets the saved session of `id` (a Clean
    /// Start on another router ended it, MQTT-3.1.2-4).
    pub fn discard(&mut self, id: &str) {
        let old = self.connections.remove(id);
        self.forget_expiry(id, old);
    }

    /// mqlb patch (metrics, issue 17): saved sessions (those not expired by now), the
    /// sessions of clients that are not connected.
    pub fn sessions(&self) -> usize {
        let now = Instant::now();
        self.connections
            .values()
            .filter(|s| s.session_state.is_some() && s.expires_at.is_none_or(|at| at > now))
            .count()
    }

    /// mqlb patch (session expiry): when the next saved session expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.expiries.first().map(|(at, _)| *at)
    }

    /// mqlb patch (session expiry): ends every session whose Session Expiry Interval has
    /// passed by `now` (MQTT-3.1.2-23), freeing its state (subscriptions, queue cursors,
    /// pending PUBRELs and metrics); returns the client IDs of the sessions it ended.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let mut ended = Vec::new();
        while let Some((at, _)) = self.expiries.first() {
            if *at > now {
                break;
            }
            let Some((_, id)) = self.expiries.pop_first() else {
                break;
            };
            self.connections.remove(&id);
            ended.push(id);
        }
        ended
    }
}

#[derive(Debug)]
pub struct SavedState {
    pub session_state: Option<SessionState>,
    pub metrics: ConnectionEvents,
    /// mqlb patch (session expiry): when `session_state` ends (`None`: never, or no session).
    pub expires_at: Option<Instant>,
}

#[derive(Debug)]
pub struct SessionState {
    pub tracker: Tracker,
    pub subscriptions: HashSet<String>,
    // used for pubrel in qos2
    pub unacked_pubrels: VecDeque<u16>,
    /// mqlb patch (session redelivery): deliveries not acknowledged (packet id, filter, log
    /// cursor) and the last packet id, resent with DUP 1 and the same id on reconnect.
    pub unacked: Vec<(u16, FilterIdx, Cursor)>,
    pub last_pkid: u16,
}
