//! mqlb patch (issue 17): what a router holds and what it dropped, asked for by an embedder
//! that exports metrics (mqlb's broker `/metrics`). rumqttd's own meters (`Event::NewMeter`)
//! send deltas since the last read and say nothing of sessions or retained messages; this is a
//! snapshot the embedder can read at every scrape, at the cost of one router event.

use flume::Sender;

use super::Event;
use crate::protocol::QoS;
use crate::ConnectionId;

/// Why the router did not deliver a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// A PUBLISH the connection's ACL refuses (acknowledged as refused, delivered nowhere).
    NotAuthorized,
    /// A PUBLISH the router could not append (an invalid topic or topic alias); the client
    /// is disconnected.
    Invalid,
    /// Not delivered to one subscriber: its Message Expiry Interval passed while it waited
    /// (counted once per subscriber that missed it, MQTT-3.3.2-5).
    Expired,
    /// mqlb patch (issue 12): not delivered to a persistent session that came back to more
    /// queued messages than `RouterConfig::max_queued_messages` (`router::backlog`).
    QueueFull,
}

impl Dropped {
    pub const ALL: [Dropped; 4] = [
        Dropped::NotAuthorized,
        Dropped::Invalid,
        Dropped::Expired,
        Dropped::QueueFull,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Dropped::NotAuthorized => "not_authorized",
            Dropped::Invalid => "invalid",
            Dropped::Expired => "expired",
            Dropped::QueueFull => "queue_full",
        }
    }
}

/// A router's state at one moment, and its drops since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterStats {
    /// Live connections: network clients and local links.
    pub connections: usize,
    /// Live connections whose session outlives them (Clean Session 0, Session Expiry > 0).
    pub persistent_online: usize,
    /// Saved sessions of clients that are not connected.
    pub persistent_offline: usize,
    /// Retained messages held.
    pub retained: usize,
    /// Distinct subscription filters with at least one subscriber.
    pub filters: usize,
    /// `dropped[reason][qos]`, `reason` in the order of [`Dropped::ALL`].
    pub dropped: [[u64; 3]; 4],
}

impl RouterStats {
    pub fn dropped(&self, reason: Dropped, qos: QoS) -> u64 {
        self.dropped[reason as usize][qos as usize]
    }
}

/// The router's running drop counts (kept in the router, read into [`RouterStats`]).
#[derive(Debug, Default)]
pub(crate) struct DropCounts(pub(crate) [[u64; 3]; 4]);

impl DropCounts {
    pub(crate) fn count(&mut self, reason: Dropped, qos: QoS) {
        self.0[reason as usize][qos as usize] += 1;
    }
}

/// Asks a router for its [`RouterStats`].
#[derive(Clone)]
pub struct StatsControl {
    router_tx: Sender<(ConnectionId, Event)>,
}

impl StatsControl {
    /// A control of the router `router_tx` (from [`crate::Router::spawn`]) leads to.
    pub fn new(router_tx: Sender<(ConnectionId, Event)>) -> StatsControl {
        StatsControl { router_tx }
    }

    /// The router's stats; `None` when the router is gone.
    pub async fn stats(&self) -> Option<RouterStats> {
        let (reply, rx) = flume::bounded(1);
        self.router_tx
            .send_async((0, Event::Stats(reply)))
            .await
            .ok()?;
        rx.recv_async().await.ok()
    }
}
