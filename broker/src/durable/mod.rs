//! Durable cluster state (issue 18): the retained messages of the cluster written through to
//! the HA servers' database, so stopping and starting the whole cluster keeps them.
//!
//! Each node writes the retained PUBLISHes of its own clients (the tap sees them, and only
//! there does a message enter the cluster: a peer's copy arrives through the mesh, not a
//! codec), clearings included. Off the data path: the tap only puts the message in a bounded
//! queue ([`pending`]), where the last write of a topic replaces the one waiting; a task sends
//! the queue in batches every 100 ms (sooner when 500 topics wait). A batch the HA servers
//! cannot take waits for the next round; a new topic beyond the bound is dropped and counted.
//! Each entry carries the node's time, never going back, and the store keeps the latest of
//! each topic, so batches of several nodes may land in any order.
//!
//! Persistent sessions go the same way, from their owner's book ([`crate::replica::Book`]:
//! every change the mesh announces to the peers is also queued here): the expiry and the
//! subscriptions; an ended session is written as its end. A starting node holds the stored
//! sessions as replicas of an owner that is not there ([`crate::replica::STORED`]), which a
//! live owner's word replaces: a client reconnecting after a whole-cluster restart is restored
//! from them (Session Present 1, its subscriptions without a SUBSCRIBE), by the replicas' own
//! path.
//!
//! Their queued QoS 1/2 messages are written at a clean stop ([`queued`]): each session the
//! node owns, taken out of its router (all of it, with packet ids: it replaces what was
//! written of it before), and each replica's copy, keyed by the messages' cluster-wide ids so
//! the copies are one row each. Not at every message: a stop is where a whole cluster loses
//! them, and a kill -9 of every node at once loses them (as it loses the last 100 ms of
//! retained messages). The node restoring a stored session reads its rows then (not at start:
//! rows a rolling restart left behind are never put in a replica), puts them ahead of what the
//! replicas queued since, and deletes each row as the client acknowledges it; meanwhile its
//! client connecting does not mark the rows stale, as a connect otherwise does.
//!
//! Every node loads the stored messages into its router when it starts, before it serves
//! ([`load`]): the mesh does not carry retained messages to a node that joins (each keeps its
//! own), so loading on the first node only would leave the others without; loading before
//! the listeners and links are up means no live message can be overwritten by an older
//! stored one.

pub(crate) mod load;
pub(crate) mod pending;
pub(crate) mod queued;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqlb_config::defaults::{
    DURABLE_BATCH_BYTES, DURABLE_BATCH_ENTRIES, DURABLE_FLUSH_EVERY, DURABLE_QUEUE_TOPICS,
};
use mqlb_ha_api::queued::QueuedEntry;
use mqlb_ha_api::retained::{RetainedEntry, RetainedProps, MAX_BATCH_BODY};
use mqlb_ha_api::sessions::{SessionEntry, StoredSession, StoredSubscription};
use mqlb_ha_api::{now_ms, ClientError, HaClient};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use rumqttd::protocol::PublishProperties;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::mesh::frame::{MeshPublish, MeshSession, MeshSubscription, MsgId, ReplicaMeta};
use crate::metrics::Metrics;
use crate::replica::Announce;
use pending::{Pending, Pushed};

/// The longest wait between two attempts while the HA servers refuse or do not answer.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long a restore waits for the HA servers' copy of a session's queue before it goes on
/// without (its CONNACK waits meanwhile).
const FETCH_WITHIN: Duration = Duration::from_secs(2);

struct DurableMetrics {
    stored: IntCounter,
    dropped: IntCounterVec,
    write_errors: IntCounter,
    pending: IntGauge,
    loaded: IntCounter,
    sessions_stored: IntCounter,
    sessions_dropped: IntCounter,
    sessions_loaded: IntCounter,
    queued_stored: IntCounter,
    queued_restored: IntCounter,
    queued_errors: IntCounter,
}

/// A node's writer of retained messages.
pub(crate) struct Durable {
    node: String,
    pending: Mutex<Pending<RetainedEntry>>,
    sessions: Mutex<Pending<SessionEntry>>,
    /// Sessions restored here with messages the database kept (issue 18): the ids not yet
    /// acknowledged, whose rows the acknowledgements delete. Until they all are, the client
    /// connecting does not make the store drop the session's rows.
    restored: Mutex<HashMap<String, HashSet<MsgId>>>,
    any_restored: AtomicBool,
    /// Acknowledged ids of those, to delete at the next round.
    acks: Mutex<HashMap<String, Vec<(u64, u64)>>>,
    /// Where a restore reads the stored queue of a session from.
    client: Arc<HaClient>,
    wake: Notify,
    metrics: DurableMetrics,
}

impl Durable {
    pub(crate) fn new(
        node: &str,
        metrics: &Metrics,
        client: Arc<HaClient>,
    ) -> Result<Arc<Durable>, prometheus::Error> {
        let m = DurableMetrics {
            stored: IntCounter::new(
                "mqlb_broker_retained_stored_total",
                "Retained messages and clearings of this node's clients written to the HA servers' database (cluster.durable_retained).",
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "mqlb_broker_retained_store_dropped_total",
                    "Retained messages of this node's clients never written to the HA servers' database: queue_full (100 000 topics waiting, the HA servers unreachable), too_large (a message over a batch's 16 MiB), refused (the HA server found it invalid).",
                ),
                &["reason"],
            )?,
            write_errors: IntCounter::new(
                "mqlb_broker_retained_store_errors_total",
                "Batches of retained messages the HA servers did not take (unreachable, no primary, database down); they wait for the next attempt.",
            )?,
            pending: IntGauge::new(
                "mqlb_broker_retained_store_pending",
                "Topics whose retained message waits to be written to the HA servers' database.",
            )?,
            loaded: IntCounter::new(
                "mqlb_broker_retained_loaded_total",
                "Retained messages loaded from the HA servers' database into this node's router when it started.",
            )?,
            sessions_stored: IntCounter::new(
                "mqlb_broker_sessions_stored_total",
                "Persistent sessions (their subscriptions and expiry) and session ends of this node written to the HA servers' database (cluster.durable_retained).",
            )?,
            sessions_dropped: IntCounter::new(
                "mqlb_broker_sessions_store_dropped_total",
                "Session changes never written to the HA servers' database (100 000 sessions waiting, or refused as invalid).",
            )?,
            sessions_loaded: IntCounter::new(
                "mqlb_broker_sessions_loaded_total",
                "Persistent sessions loaded from the HA servers' database as replicas when this node started.",
            )?,
            queued_stored: IntCounter::new(
                "mqlb_broker_queued_stored_total",
                "Queued QoS 1/2 messages of persistent sessions written to the HA servers' database at a clean stop (this node's sessions and its replicas' copies).",
            )?,
            queued_restored: IntCounter::new(
                "mqlb_broker_queued_restored_total",
                "Queued messages the HA servers' database kept that a session restored here got (after a whole-cluster restart).",
            )?,
            queued_errors: IntCounter::new(
                "mqlb_broker_queued_store_errors_total",
                "Writes or reads of sessions' queued messages the HA servers did not answer (the stop went on without them; a restore went on without the stored copy).",
            )?,
        };
        metrics.register(Box::new(m.queued_stored.clone()))?;
        metrics.register(Box::new(m.queued_restored.clone()))?;
        metrics.register(Box::new(m.queued_errors.clone()))?;
        metrics.register(Box::new(m.sessions_stored.clone()))?;
        metrics.register(Box::new(m.sessions_dropped.clone()))?;
        metrics.register(Box::new(m.sessions_loaded.clone()))?;
        metrics.register(Box::new(m.stored.clone()))?;
        metrics.register(Box::new(m.dropped.clone()))?;
        metrics.register(Box::new(m.write_errors.clone()))?;
        metrics.register(Box::new(m.pending.clone()))?;
        metrics.register(Box::new(m.loaded.clone()))?;
        for reason in ["queue_full", "too_large", "refused"] {
            m.dropped.with_label_values(&[reason]);
        }
        Ok(Arc::new(Durable {
            node: node.to_string(),
            pending: Mutex::new(Pending::new(DURABLE_QUEUE_TOPICS)),
            sessions: Mutex::new(Pending::new(DURABLE_QUEUE_TOPICS)),
            restored: Mutex::new(HashMap::new()),
            any_restored: AtomicBool::new(false),
            acks: Mutex::new(HashMap::new()),
            client,
            wake: Notify::new(),
            metrics: m,
        }))
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending<RetainedEntry>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Pending<SessionEntry>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a session this node owns became, as announced to the peers (the replication's
    /// book; off the data path: CONNACK, SUBACK, UNSUBSCRIBE, the end of a connection).
    pub(crate) fn session(&self, a: &Announce) {
        let connected = match a {
            Announce::Meta(m) if m.fresh => {
                self.forget_restored(&m.client_id);
                true
            }
            Announce::Meta(m) => m.online && !self.is_restored(&m.client_id),
            Announce::Close(client_id) => {
                self.forget_restored(client_id);
                false
            }
        };
        let (client_id, session) = match a {
            Announce::Meta(m) => (
                m.client_id.clone(),
                Some(StoredSession {
                    expiry: m.expiry,
                    subscriptions: m
                        .subscriptions
                        .iter()
                        .map(|s| StoredSubscription {
                            filter: s.filter.clone(),
                            qos: s.qos,
                            nolocal: s.nolocal,
                            preserve_retain: s.preserve_retain,
                        })
                        .collect(),
                }),
            ),
            Announce::Close(client_id) => (client_id.clone(), None),
        };
        let mut pending = self.sessions();
        let at_ms = pending.stamp(now_ms());
        let entry = SessionEntry {
            client_id,
            session,
            at_ms,
            connected,
        };
        if pending.push(entry) == Pushed::Dropped {
            self.metrics.sessions_dropped.inc();
        }
    }

    /// Sessions' changes, as [`Durable::flush`] does retained messages.
    async fn flush_sessions(&self, client: &HaClient, rounds: usize) -> Result<(), ClientError> {
        for _ in 0..rounds {
            let batch = self
                .sessions()
                .take(DURABLE_BATCH_ENTRIES, DURABLE_BATCH_BYTES);
            if batch.is_empty() {
                break;
            }
            let n = batch.len() as u64;
            match client.write_sessions(batch.clone()).await {
                Ok(_) => self.metrics.sessions_stored.inc_by(n),
                Err(ClientError::Status(400, why)) => {
                    tracing::warn!(
                        node = self.node,
                        entries = n,
                        error = why,
                        "HA server refused a batch of sessions as invalid; dropped"
                    );
                    self.metrics.sessions_dropped.inc_by(n);
                }
                Err(e) => {
                    self.sessions().put_back(batch);
                    self.metrics.write_errors.inc();
                    return Err(e);
                }
            }
            if self.sessions().len() < DURABLE_BATCH_ENTRIES {
                break;
            }
        }
        Ok(())
    }

    fn restored_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<MsgId>>> {
        self.restored.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn acks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<(u64, u64)>>> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_restored(&self, client_id: &str) -> bool {
        self.any_restored.load(Ordering::Relaxed) && self.restored_map().contains_key(client_id)
    }

    fn forget_restored(&self, client_id: &str) {
        if !self.any_restored.load(Ordering::Relaxed) {
            return;
        }
        let mut r = self.restored_map();
        r.remove(client_id);
        self.any_restored.store(!r.is_empty(), Ordering::Relaxed);
    }

    /// The stored queue of `client_id`, for its restore (`None`: nothing kept, or the HA
    /// servers did not answer within [`FETCH_WITHIN`]: restored without, logged).
    pub(crate) async fn fetch_queued(&self, client_id: &str) -> Option<QueuedEntry> {
        match tokio::time::timeout(FETCH_WITHIN, self.client.queued(client_id)).await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                self.metrics.queued_errors.inc();
                tracing::warn!(node = self.node, client_id, error = %e, "the stored queue of a session could not be read; restored without it");
                None
            }
            Err(_) => {
                self.metrics.queued_errors.inc();
                tracing::warn!(node = self.node, client_id, after = ?FETCH_WITHIN, "the stored queue of a session was not read in time; restored without it");
                None
            }
        }
    }

    /// `client_id` was restored here with the stored messages `ids`.
    pub(crate) fn restored(&self, client_id: &str, ids: Vec<MsgId>) {
        self.metrics.queued_restored.inc_by(ids.len() as u64);
        if ids.is_empty() {
            return;
        }
        self.restored_map()
            .insert(client_id.to_string(), ids.into_iter().collect());
        self.any_restored.store(true, Ordering::Relaxed);
    }

    /// The client acknowledged message `id` (on the data path: one atomic load unless a
    /// restored session waits for acknowledgements): a stored one's row is deleted.
    pub(crate) fn acked(&self, client_id: &str, id: MsgId) {
        if !self.any_restored.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut r = self.restored_map();
            let Some(ids) = r.get_mut(client_id) else {
                return;
            };
            if !ids.remove(&id) {
                return;
            }
            if ids.is_empty() {
                r.remove(client_id);
                self.any_restored.store(!r.is_empty(), Ordering::Relaxed);
            }
        }
        self.acks()
            .entry(client_id.to_string())
            .or_default()
            .push((id.origin, id.seq));
    }

    /// The acknowledgements of stored messages gathered since the last round, as deletions.
    async fn flush_acks(&self, client: &HaClient) -> Result<(), ClientError> {
        let acks = std::mem::take(&mut *self.acks());
        if acks.is_empty() {
            return Ok(());
        }
        let at_ms = self.sessions().stamp(now_ms());
        let entries: Vec<QueuedEntry> = acks
            .into_iter()
            .map(|(client_id, acked)| QueuedEntry {
                client_id,
                at_ms,
                replace: false,
                messages: Vec::new(),
                acked,
                last_pkid: 0,
                pubrels: Vec::new(),
            })
            .collect();
        if let Err(e) = client.write_queued(entries.clone()).await {
            let mut acks = self.acks();
            for e in entries {
                acks.entry(e.client_id).or_default().extend(e.acked);
            }
            return Err(e);
        }
        Ok(())
    }

    /// The sessions' queues a clean stop found (see [`crate::replication::Replication::queued_at_stop`]),
    /// written in batches.
    async fn write_queues(
        &self,
        client: &HaClient,
        sessions: Vec<(MeshSession, bool)>,
    ) -> Result<(), ClientError> {
        let at_ms = self.sessions().stamp(now_ms());
        // Untagged messages (published while this node had no peers) get ids of this stop's.
        let origin: u64 = rand::random();
        let mut seq = 0;
        let mut fresh = || {
            seq += 1;
            MsgId { origin, seq }
        };
        let entries: Vec<QueuedEntry> = sessions
            .into_iter()
            .filter_map(|(s, owner)| queued::entry_of(s, at_ms, owner, &mut fresh))
            .collect();
        let mut batch = Vec::new();
        let mut bytes = 0;
        for e in entries {
            let size = e.size();
            if !batch.is_empty()
                && (bytes + size > DURABLE_BATCH_BYTES || batch.len() >= DURABLE_BATCH_ENTRIES)
            {
                self.write_queue_batch(client, std::mem::take(&mut batch))
                    .await?;
                bytes = 0;
            }
            bytes += size;
            batch.push(e);
        }
        if !batch.is_empty() {
            self.write_queue_batch(client, batch).await?;
        }
        Ok(())
    }

    async fn write_queue_batch(
        &self,
        client: &HaClient,
        batch: Vec<QueuedEntry>,
    ) -> Result<(), ClientError> {
        let n: usize = batch.iter().map(|e| e.messages.len()).sum();
        client.write_queued(batch).await.inspect_err(|_| {
            self.metrics.queued_errors.inc();
        })?;
        self.metrics.queued_stored.inc_by(n as u64);
        Ok(())
    }

    pub(crate) fn sessions_loaded(&self, n: usize) {
        self.metrics.sessions_loaded.inc_by(n as u64);
    }

    /// A local client's retained PUBLISH (an empty payload clears the topic), after the ACL
    /// allowed it; called by the tap on the data path: a lock and a map insert.
    pub(crate) fn retained(
        &self,
        topic: &Bytes,
        payload: &Bytes,
        qos: u8,
        props: Option<&PublishProperties>,
    ) {
        let Ok(topic) = std::str::from_utf8(topic) else {
            return; // not a topic rumqttd takes either
        };
        self.push_retained(topic, payload, qos, props.map(props_of).unwrap_or_default());
    }

    /// A retained will this node published (see `Mesh::will_published`).
    pub(crate) fn retained_will(&self, will: &MeshPublish) {
        let Ok(topic) = std::str::from_utf8(&will.topic) else {
            return;
        };
        let props = RetainedProps {
            payload_format_indicator: will.payload_format_indicator,
            message_expiry_interval: will.message_expiry_interval,
            response_topic: will.response_topic.clone(),
            correlation_data: will.correlation_data.as_ref().map(|b| b.to_vec()),
            user_properties: will.user_properties.clone(),
            content_type: will.content_type.clone(),
        };
        self.push_retained(topic, &will.payload, will.qos, props);
    }

    fn push_retained(&self, topic: &str, payload: &Bytes, qos: u8, props: RetainedProps) {
        let mut pending = self.pending();
        let entry = RetainedEntry {
            topic: topic.to_string(),
            payload: payload.to_vec(),
            qos,
            at_ms: pending.stamp(now_ms()),
            props,
        };
        // base64 takes 4/3 of it, and the batch some JSON around
        if entry.size() / 3 * 4 + 1024 > MAX_BATCH_BODY {
            drop(pending);
            self.metrics.dropped.with_label_values(&["too_large"]).inc();
            return;
        }
        match pending.push(entry) {
            Pushed::Dropped => self
                .metrics
                .dropped
                .with_label_values(&["queue_full"])
                .inc(),
            Pushed::Added if pending.len() >= DURABLE_BATCH_ENTRIES => self.wake.notify_one(),
            Pushed::Added | Pushed::Replaced => {}
        }
    }

    /// Writes batches while some wait and the HA servers take them, at most `rounds` of them.
    /// `Err` when a write failed (that batch waits again).
    async fn flush(&self, client: &HaClient, rounds: usize) -> Result<(), ClientError> {
        let sessions = self.flush_sessions(client, rounds).await;
        // After the sessions: a client's connecting must not delete rows acknowledged since.
        let acks = self.flush_acks(client).await;
        self.flush_retained(client, rounds).await?;
        sessions.and(acks)
    }

    async fn flush_retained(&self, client: &HaClient, rounds: usize) -> Result<(), ClientError> {
        for _ in 0..rounds {
            let batch = self
                .pending()
                .take(DURABLE_BATCH_ENTRIES, DURABLE_BATCH_BYTES);
            if batch.is_empty() {
                break;
            }
            let n = batch.len() as u64;
            // A clone to put back if the write fails: batches are small, failures rare.
            match client.write_retained(batch.clone()).await {
                Ok(_) => self.metrics.stored.inc_by(n),
                Err(ClientError::Status(400, why)) => {
                    tracing::warn!(
                        node = self.node,
                        entries = n,
                        error = why,
                        "HA server refused a batch of retained messages as invalid; dropped"
                    );
                    self.metrics
                        .dropped
                        .with_label_values(&["refused"])
                        .inc_by(n);
                }
                Err(e) => {
                    self.pending().put_back(batch);
                    self.metrics.write_errors.inc();
                    self.metrics.pending.set(self.pending().len() as i64);
                    return Err(e);
                }
            }
            if self.pending().len() < DURABLE_BATCH_ENTRIES {
                break; // not a full batch left: it waits for the next tick
            }
        }
        self.metrics.pending.set(self.pending().len() as i64);
        Ok(())
    }

    /// Sends the queue in batches until `stop`.
    pub(crate) async fn run(self: Arc<Self>, client: Arc<HaClient>, stop: CancellationToken) {
        let mut backoff = DURABLE_FLUSH_EVERY;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
                _ = self.wake.notified(), if !failing => {}
            }
            // Every batch that is full goes now; the bound keeps one round finite.
            match self
                .flush(&client, 1 + DURABLE_QUEUE_TOPICS / DURABLE_BATCH_ENTRIES)
                .await
            {
                Ok(()) => {
                    if failing {
                        tracing::info!(
                            node = self.node,
                            "retained messages are written to the HA servers again"
                        );
                    }
                    failing = false;
                    backoff = DURABLE_FLUSH_EVERY;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(node = self.node, error = %e, "retained messages cannot be written to the HA servers; they wait (bounded)");
                    }
                    failing = true;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// What waits, written before a clean stop (SIGTERM), within `within`, and then the
    /// sessions' queues the stop found (`queues`).
    pub(crate) async fn flush_before_stop(
        &self,
        client: &HaClient,
        within: Duration,
        queues: Vec<(MeshSession, bool)>,
    ) {
        let started = Instant::now();
        let rounds = 1 + DURABLE_QUEUE_TOPICS / DURABLE_BATCH_ENTRIES;
        let all = async {
            self.flush(client, rounds).await?;
            self.write_queues(client, queues).await
        };
        match tokio::time::timeout(within, all).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(node = self.node, error = %e, waiting = self.pending().len(), "retained messages not written before the stop")
            }
            Err(_) => tracing::warn!(
                node = self.node,
                after = ?started.elapsed(),
                waiting = self.pending().len(),
                "retained messages not all written before the stop"
            ),
        }
    }

    pub(crate) fn loaded(&self, n: usize) {
        self.metrics.loaded.inc_by(n as u64);
    }
}

fn props_of(p: &PublishProperties) -> RetainedProps {
    RetainedProps {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.as_ref().map(|b| b.to_vec()),
        user_properties: p.user_properties.clone(),
        content_type: p.content_type.clone(),
    }
}

/// A stored session as a replica's meta: offline from now (its expiry counts from the load),
/// without a will (a will is not stored: the cluster that died did not publish it, and the
/// nodes loading would each be tempted to).
pub(crate) fn meta_of(e: SessionEntry) -> Option<ReplicaMeta> {
    let s = e.session?;
    Some(ReplicaMeta {
        client_id: e.client_id,
        expiry: s.expiry,
        online: false,
        fresh: false,
        subscriptions: s
            .subscriptions
            .into_iter()
            .map(|f| MeshSubscription {
                filter: f.filter,
                qos: f.qos.min(2),
                nolocal: f.nolocal,
                preserve_retain: f.preserve_retain,
            })
            .collect(),
        will: None,
    })
}

/// A stored retained message as the router takes it from the mesh's shape, with the time
/// since it was stored (by `now_ms`) taken off its message expiry interval; `None` if it has
/// expired meanwhile (MQTT-3.3.2-5) or is a clearing.
pub(crate) fn publish_of(e: RetainedEntry, now_ms: i64) -> Option<MeshPublish> {
    if e.is_clear() {
        return None;
    }
    let mut expiry = e.props.message_expiry_interval;
    if let Some(interval) = expiry {
        let waited =
            u32::try_from(now_ms.saturating_sub(e.at_ms).max(0) / 1000).unwrap_or(u32::MAX);
        expiry = Some(interval.checked_sub(waited).filter(|r| *r > 0)?);
    }
    Some(MeshPublish {
        topic: Bytes::from(e.topic),
        payload: Bytes::from(e.payload),
        retain: true,
        qos: e.qos.min(2),
        payload_format_indicator: e.props.payload_format_indicator,
        message_expiry_interval: expiry,
        response_topic: e.props.response_topic,
        correlation_data: e.props.correlation_data.map(Bytes::from),
        user_properties: e.props.user_properties,
        content_type: e.props.content_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(expiry: Option<u32>, at_ms: i64) -> RetainedEntry {
        RetainedEntry {
            topic: "a/b".into(),
            payload: b"x".to_vec(),
            qos: 2,
            at_ms,
            props: RetainedProps {
                message_expiry_interval: expiry,
                user_properties: vec![("k".into(), "v".into())],
                ..RetainedProps::default()
            },
        }
    }

    #[test]
    fn a_stored_message_keeps_what_it_was_published_with_and_the_expiry_left() {
        let m = publish_of(stored(None, 0), 999_999).expect("no expiry: loaded");
        assert_eq!((m.retain, m.qos, &m.topic[..]), (true, 2, &b"a/b"[..]));
        assert_eq!(m.user_properties, [("k".to_string(), "v".to_string())]);
        let m = publish_of(stored(Some(60), 10_000), 25_500).expect("15 s of 60 gone");
        assert_eq!(m.message_expiry_interval, Some(45));
        assert!(
            publish_of(stored(Some(60), 10_000), 70_000).is_none(),
            "expired"
        );
        let clear = RetainedEntry {
            payload: Vec::new(),
            ..stored(None, 0)
        };
        assert!(publish_of(clear, 0).is_none());
    }
}
