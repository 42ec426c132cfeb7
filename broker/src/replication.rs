//! Session replicas across the cluster (issue 12): the I/O around [`crate::replica`].
//!
//! - **Owner side.** The codec ([`crate::tap`]) reports what a persistent session of this node
//!   becomes (CONNACK, SUBACK, UNSUBSCRIBE, the end of the connection) to the [`Book`]; every
//!   change goes to every peer as a REPLICA_META, and a new link gets them all. It also gives
//!   each QoS 1/2 publish of a local client its cluster-wide tag, and reports the tags its
//!   clients acknowledge (PUBACK, PUBREC) and what becomes of its deliveries' packet ids
//!   (sent, PUBREC, PUBCOMP): batched into REPLICA_ACKS and REPLICA_PKIDS every [`ACK_FLUSH`].
//! - **Replica side.** Every QoS 1/2 message that enters this node, from a peer (the injector)
//!   or from a local client (the codec), is offered to the [`Replicas`].
//! - **Restore.** A client that connects here with Clean Start 0 and whose session no node has
//!   (its owner died, or does not answer) gets the merged copies: this node's replica and
//!   those the peers sent with their answers ([`Replication::restore`]). A session that
//!   moves here gets what only this node's replica holds ([`Replication::adopt`]).
//! - **Wills.** A replica carries its client's last will; when the owner has been gone for
//!   [`WILL_GRACE`] one surviving node (the lowest ID among the nodes it sees up) publishes
//!   the wills its death left pending, once their delay is over ([`Replicas::due_wills`]).
//!
//! Every peer knows every persistent session's meta (subscriptions, expiry, will: small and
//! rare), so any node can restore one and publish its will; the messages are queued by the
//! `replication_factor - 1` nodes besides the owner that rank highest for the client ID
//! ([`replica::ranked`], over the nodes this one sees up), re-ranked when that view changes.
//! A restore merges every copy the peers send, so it does not matter which node the LB picks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use mqlb_http::lock;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use rumqttd::protocol::PublishProperties;
use rumqttd::SessionControl;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::mesh::frame::{
    Frame, MeshPublish, MeshSession, MeshSubscription, MeshWill, MsgId, PkidEvent, ReplicaMeta,
};
use crate::mesh::{Injected, Mesh};
use crate::metrics::Metrics;
use crate::replica::{self, client_hash, Announce, Book, Replicas, Tag, TAG_KEY};

/// A peer whose link has been down this long is taken for dead: the wills it left pending are
/// published (a shorter link failure publishes none).
const WILL_GRACE: Duration = Duration::from_secs(2);
/// Acknowledgements are sent to the peers at most this long after the client's PUBACK.
const ACK_FLUSH: Duration = Duration::from_millis(20);
/// Replicas one node holds; beyond it new ones are refused (counted).
const MAX_REPLICAS: usize = 1_000_000;
/// Acknowledged tags waiting to be sent; beyond it they are dropped (a replica then keeps a
/// message the client has: a duplicate after a failover, never a loss).
const MAX_ACKS_WAITING: usize = 1_000_000;

/// One thing an owner's client did that its replicas follow.
enum Update {
    Acked(MsgId),
    Pkid(PkidEvent),
}

struct ReplicationMetrics {
    held: IntGauge,
    queueing: IntGauge,
    messages: IntGauge,
    owned: IntGauge,
    acks: IntCounter,
    pkids: IntCounter,
    wills: IntCounter,
    restored: IntCounterVec,
    redelivered: IntCounter,
    dropped: IntCounterVec,
}

impl ReplicationMetrics {
    fn new(metrics: &Metrics) -> Result<ReplicationMetrics, prometheus::Error> {
        let m = ReplicationMetrics {
            held: IntGauge::new(
                "mqlb_session_replicas",
                "Replicas this node holds of its peers' persistent sessions (queueing or dormant: the meta alone).",
            )?,
            queueing: IntGauge::new(
                "mqlb_session_replicas_queueing",
                "Replicas that queue their session's messages here (this node ranks among the session's replication_factor - 1 holders, or did and still holds some).",
            )?,
            messages: IntGauge::new(
                "mqlb_session_replica_messages",
                "QoS 1/2 messages the replicas hold (not yet acknowledged by their clients).",
            )?,
            owned: IntGauge::new(
                "mqlb_sessions_persistent",
                "Persistent sessions this node owns (replicated to its peers).",
            )?,
            acks: IntCounter::new(
                "mqlb_session_replica_acks_total",
                "Acknowledgements of their clients the owners of replicated sessions sent here.",
            )?,
            pkids: IntCounter::new(
                "mqlb_session_replica_packet_ids_total",
                "Packet-id updates (a delivery sent under an id, its PUBREC, its PUBCOMP) of replicated sessions' clients that their owners sent here: what lets a restored session resend under the same ids.",
            )?,
            wills: IntCounter::new(
                "mqlb_session_replica_wills_total",
                "Last wills this node published for clients whose node died.",
            )?,
            restored: IntCounterVec::new(
                Opts::new(
                    "mqlb_sessions_restored_total",
                    "Sessions installed from replicas for a client whose session no node had (its node died or did not answer), by source: local (this node's replica only), merged (with copies from peers).",
                ),
                &["source"],
            )?,
            redelivered: IntCounter::new(
                "mqlb_session_replica_messages_restored_total",
                "QoS 1/2 messages the replicas gave a session installed here (restored after its node died, or completing one that moved): delivered again, or for the first time.",
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "mqlb_session_replica_dropped_total",
                    "What the replicas could not keep: message (beyond a replica's bound), replica (beyond the node's bound), ack (acknowledgements beyond the send queue), frame (a replica frame a peer queue refused).",
                ),
                &["what"],
            )?,
        };
        metrics.register(Box::new(m.held.clone()))?;
        metrics.register(Box::new(m.queueing.clone()))?;
        metrics.register(Box::new(m.messages.clone()))?;
        metrics.register(Box::new(m.owned.clone()))?;
        metrics.register(Box::new(m.acks.clone()))?;
        metrics.register(Box::new(m.pkids.clone()))?;
        metrics.register(Box::new(m.wills.clone()))?;
        metrics.register(Box::new(m.restored.clone()))?;
        metrics.register(Box::new(m.redelivered.clone()))?;
        metrics.register(Box::new(m.dropped.clone()))?;
        Ok(m)
    }
}

pub(crate) struct Replication {
    /// This incarnation's origin number: the first half of every tag given here.
    origin: u64,
    next_seq: AtomicU64,
    held: Mutex<Replicas>,
    book: Mutex<Book>,
    /// What the owner's clients did, in order, until the next [`ACK_FLUSH`].
    acks: Mutex<Vec<(String, Update)>>,
    mesh: Weak<Mesh>,
    control: SessionControl,
    /// The injector's queue: a will published here enters the local router through it.
    inject: OnceLock<mpsc::Sender<Injected>>,
    /// Peers whose link is down, since when (ms).
    down: Mutex<HashMap<String, u64>>,
    started: Instant,
    metrics: ReplicationMetrics,
    /// Nodes besides the owner that queue a session's messages (`usize::MAX`: every one).
    copies: usize,
    /// The nodes seen up (this one among them) when the replicas were last ranked.
    live: Mutex<Vec<String>>,
    /// Bytes of messages a restored copy may carry from a peer (what fits in a mesh frame).
    budget: usize,
    /// Writes every change of the sessions owned here to the HA servers (issue 18).
    durable: OnceLock<Arc<crate::durable::Durable>>,
}

impl Replication {
    pub(crate) fn new(
        control: SessionControl,
        mesh: &Arc<Mesh>,
        budget: usize,
        max_messages: usize,
        factor: usize,
    ) -> Result<Arc<Replication>, prometheus::Error> {
        Ok(Arc::new(Replication {
            origin: rand::random(),
            next_seq: AtomicU64::new(1),
            held: Mutex::new(Replicas::new(max_messages, MAX_REPLICAS)),
            book: Mutex::new(Book::default()),
            acks: Mutex::new(Vec::new()),
            mesh: Arc::downgrade(mesh),
            control,
            inject: OnceLock::new(),
            down: Mutex::new(HashMap::new()),
            started: Instant::now(),
            metrics: ReplicationMetrics::new(&mesh.metrics)?,
            copies: match factor {
                0 => usize::MAX,
                k => k.saturating_sub(1),
            },
            live: Mutex::new(Vec::new()),
            budget,
            durable: OnceLock::new(),
        }))
    }

    /// Where the sessions owned here are written through to (issue 18).
    pub(crate) fn set_durable(&self, d: Arc<crate::durable::Durable>) {
        let _ = self.durable.set(d);
    }

    /// Sessions read from the HA servers' database at start (issue 18), held as replicas of
    /// [`replica::STORED`]; returns how many (one this node owns already is left out).
    pub(crate) fn load_stored(&self, metas: Vec<ReplicaMeta>) -> usize {
        let now = self.now_ms();
        let metas: Vec<ReplicaMeta> = {
            let book = lock(&self.book);
            metas
                .into_iter()
                .filter(|m| !book.owns(&m.client_id))
                .collect()
        };
        let n = metas.len();
        let mut held = lock(&self.held);
        for m in metas {
            held.meta(replica::STORED, m, now, false);
        }
        self.metrics.held.set(held.len() as i64);
        n
    }

    /// Where the wills this node publishes enter its router.
    pub(crate) fn set_injector(&self, inject: mpsc::Sender<Injected>) {
        let _ = self.inject.set(inject);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Sends `frame` to every peer (a full queue drops it for that peer, counted).
    fn broadcast(&self, frame: &Frame) {
        let Some(mesh) = self.mesh.upgrade() else {
            return;
        };
        for p in mesh.peers().iter() {
            if mesh.send_to(&p.id, frame).is_err() {
                self.metrics.dropped.with_label_values(&["frame"]).inc();
            }
        }
    }

    fn announce(&self, a: Option<Announce>) {
        let Some(a) = a else { return };
        if let Some(d) = self.durable.get() {
            d.session(&a);
        }
        self.metrics.owned.set(lock(&self.book).len() as i64);
        let frame = match a {
            Announce::Meta(m) => Frame::ReplicaMeta(m),
            Announce::Close(client_id) => Frame::ReplicaClose { client_id },
        };
        self.broadcast(&frame);
    }

    // --- Owner side (called by the codec and the session hooks) ---

    /// A local client's QoS 1/2 publish enters the cluster here: any tag it carries (no client
    /// can send one; dropped all the same) is replaced by a new one, and the replicas held
    /// here get it. `None` when there is no cluster (no peers): nothing is tagged.
    pub(crate) fn tag_local(
        &self,
        publisher: &str,
        props: &mut Option<PublishProperties>,
    ) -> Option<Tag> {
        if let Some(p) = props.as_mut() {
            Tag::take(&mut p.user_properties);
        }
        let mesh = self.mesh.upgrade()?;
        if mesh.peers().is_empty() {
            return None;
        }
        let tag = Tag {
            id: MsgId {
                origin: self.origin,
                seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            },
            publisher: client_hash(publisher),
        };
        props
            .get_or_insert_with(PublishProperties::default)
            .user_properties
            .push((TAG_KEY.to_owned(), tag.value()));
        Some(tag)
    }

    /// A tagged QoS 1/2 message entered this node (a local client's, or a peer's).
    pub(crate) fn record(&self, tag: Tag, publish: &MeshPublish) {
        let now = self.now_ms();
        let mut held = lock(&self.held);
        if held.is_empty() {
            return;
        }
        let mesh = self.mesh.upgrade();
        let share = mesh.as_ref().and_then(|m| m.share.get());
        held.record(tag, publish, now, |owner, group| {
            share.is_some_and(|s| s.serves_node(owner, group, &publish.topic, &publish.payload))
        });
    }

    /// A message from a peer: recorded if it carries a tag.
    pub(crate) fn record_injected(&self, publish: &MeshPublish) {
        if publish.qos == 0 {
            return;
        }
        if let Some(tag) = Tag::find(&publish.user_properties) {
            self.record(tag, publish);
        }
    }

    /// A CONNACK 0 went out for `client_id` (`connection`: the mesh's registration of it).
    /// `expiry`: its session's (0: it ends with the connection). This node owns the session
    /// now: a replica of it here is dropped.
    pub(crate) fn connected(
        &self,
        client_id: &str,
        clean_start: bool,
        expiry: u32,
        connection: u64,
        will: Option<MeshWill>,
    ) {
        lock(&self.held).remove(client_id);
        let a = lock(&self.book).connected(client_id, clean_start, expiry, connection, will);
        self.announce(a);
    }

    pub(crate) fn subscribed(&self, client_id: &str, subs: Vec<MeshSubscription>) {
        let a = lock(&self.book).subscribed(client_id, subs);
        self.announce(a);
    }

    pub(crate) fn unsubscribed(&self, client_id: &str, filters: &[String]) {
        let a = lock(&self.book).unsubscribed(client_id, filters);
        self.announce(a);
    }

    /// Connection `connection` of `client_id` ended; `expiry`: what its DISCONNECT set;
    /// `will_kept`: it ended without DISCONNECT.
    pub(crate) fn disconnected(
        &self,
        client_id: &str,
        connection: u64,
        expiry: Option<u32>,
        will_kept: bool,
    ) {
        let now = self.now_ms();
        let a = lock(&self.book).disconnected(client_id, connection, expiry, will_kept, now);
        self.announce(a);
    }

    /// This node holds a replica of `client_id`'s session, and not the session itself.
    pub(crate) fn holds(&self, client_id: &str) -> bool {
        !lock(&self.book).owns(client_id) && lock(&self.held).holds(client_id)
    }

    /// The session left this node for a peer, or ended (a Clean Start elsewhere).
    pub(crate) fn left(&self, client_id: &str) {
        let a = lock(&self.book).left(client_id);
        self.announce(a);
    }

    /// The client acknowledged (PUBACK, PUBREC) the message tagged `id`.
    pub(crate) fn acked(&self, client_id: &str, id: MsgId) {
        self.update(client_id, Update::Acked(id));
        if let Some(d) = self.durable.get() {
            d.acked(client_id, id);
        }
    }

    /// A packet id of the client's deliveries was used, PUBREC'd or completed.
    pub(crate) fn pkid(&self, client_id: &str, event: PkidEvent) {
        self.update(client_id, Update::Pkid(event));
    }

    fn update(&self, client_id: &str, u: Update) {
        let mut acks = lock(&self.acks);
        if acks.len() >= MAX_ACKS_WAITING {
            self.metrics.dropped.with_label_values(&["ack"]).inc();
            return;
        }
        acks.push((client_id.to_owned(), u));
    }

    /// What a peer whose link just came up is sent first: every persistent session here.
    pub(crate) fn link_up_frames(&self) -> Vec<Frame> {
        lock(&self.book)
            .all()
            .into_iter()
            .filter_map(|a| match a {
                Announce::Meta(m) => Some(Frame::ReplicaMeta(m)),
                Announce::Close(_) => None,
            })
            .collect()
    }

    // --- Replica side (frames from the peers) ---

    pub(crate) fn on_meta(&self, peer: &str, meta: ReplicaMeta) {
        // The session is this node's now: the peer's word on it is stale.
        if lock(&self.book).owns(&meta.client_id) {
            return;
        }
        let now = self.now_ms();
        let ranked = self.ranked(peer, &meta.client_id);
        lock(&self.held).meta(peer, meta, now, ranked);
    }

    /// This node queues the messages of `owner`'s session `client_id`.
    fn ranked(&self, owner: &str, client_id: &str) -> bool {
        match self.mesh.upgrade() {
            Some(mesh) => self.ranks(owner, client_id, &mesh.id),
            None => true,
        }
    }

    /// Node `node` ranks among those that queue the messages of `owner`'s session
    /// `client_id` (on this node's view of the nodes up).
    fn ranks(&self, owner: &str, client_id: &str, node: &str) -> bool {
        if self.copies == usize::MAX {
            return true;
        }
        let live = lock(&self.live);
        let live: Vec<&str> = live.iter().map(String::as_str).collect();
        replica::ranked(client_id, owner, node, &live, self.copies)
    }

    /// A client with Clean Start 0 connects here: a dormant replica of its session queues
    /// from now on, before the peers are asked for their copies, so a message that reaches a
    /// holder after it sent its copy is in this node's.
    pub(crate) fn prepare(&self, client_id: &str) {
        if !lock(&self.book).owns(client_id) {
            lock(&self.held).activate(client_id);
        }
    }

    /// The nodes seen up changed since the last look: the replicas are ranked again.
    fn rerank(&self) {
        let Some(mesh) = self.mesh.upgrade() else {
            return;
        };
        let mut now_live: Vec<String> = mesh
            .peers()
            .iter()
            .filter(|p| p.is_up())
            .map(|p| p.id.clone())
            .chain([mesh.id.clone()])
            .collect();
        now_live.sort();
        let mut live = lock(&self.live);
        if *live == now_live {
            return;
        }
        *live = now_live;
        if self.copies == usize::MAX {
            return;
        }
        let live: Vec<&str> = live.iter().map(String::as_str).collect();
        let now = self.now_ms();
        // While an owner is down every node queues its sessions, until each is restored
        // somewhere: what is published meanwhile is wherever its client comes back.
        let started = lock(&self.held).rerank(now, |owner, client| {
            !live.contains(&owner) || replica::ranked(client, owner, &mesh.id, &live, self.copies)
        });
        if started > 0 {
            tracing::info!(
                started,
                "the membership changed: replicas ranked here queue now"
            );
        }
    }

    pub(crate) fn on_acks(&self, peer: &str, acks: Vec<(String, Vec<MsgId>)>) {
        let mut held = lock(&self.held);
        for (client, ids) in acks {
            self.metrics.acks.inc_by(ids.len() as u64);
            held.acked(peer, &client, &ids);
        }
    }

    pub(crate) fn on_pkids(&self, peer: &str, pkids: Vec<(String, Vec<PkidEvent>)>) {
        let mut held = lock(&self.held);
        for (client, events) in pkids {
            self.metrics.pkids.inc_by(events.len() as u64);
            held.pkids(peer, &client, &events);
        }
    }

    pub(crate) fn on_close(&self, peer: &str, client_id: &str) {
        lock(&self.held).close(peer, client_id);
    }

    /// `client_id` connected on a peer: its will is not published.
    pub(crate) fn connected_elsewhere(&self, client_id: &str) {
        lock(&self.held).connected_elsewhere(client_id);
    }

    /// The session of `client_id` ended wherever it was (a Clean Start on a peer).
    pub(crate) fn ended(&self, client_id: &str) {
        lock(&self.held).remove(client_id);
        self.left(client_id);
    }

    /// This node does not rank among those that queue `client_id`'s messages (its replica was
    /// dormant until [`Replication::prepare`]) and one of `peers`, which have not answered
    /// yet, does.
    pub(crate) fn awaits_copy(&self, client_id: &str, peers: &[String]) -> bool {
        let Some(mesh) = self.mesh.upgrade() else {
            return false;
        };
        let Some(owner) = lock(&self.held).owner(client_id).map(str::to_owned) else {
            return false;
        };
        !self.ranks(&owner, client_id, &mesh.id)
            && peers.iter().any(|p| self.ranks(&owner, client_id, p))
    }

    /// This node's replica of `client_id`, for peer `asking` (kept here); none for the
    /// session's own node, which has the session itself.
    pub(crate) fn copy(&self, client_id: &str, asking: &str) -> Option<MeshSession> {
        let now = self.now_ms();
        let held = lock(&self.held);
        if held.owner(client_id) == Some(asking) {
            return None;
        }
        held.session(client_id, now, self.budget)
    }

    /// Installs `session`, which moved here from a peer, completed with this node's replica of
    /// it ([`replica::complete`]), as [`Replication::restore`] does. Blocking.
    pub(crate) fn adopt(&self, session: MeshSession) -> bool {
        let now = self.now_ms();
        let client_id = session.client_id.clone();
        let held = lock(&self.held);
        let copy = held.session(&client_id, now, usize::MAX);
        let before = session.pending.len();
        let completed = replica::complete(session, copy);
        let added = completed.pending.len() - before;
        self.install(held, completed, now, added)
    }

    /// What the HA servers' database kept of `client_id`'s queue when this node's replica of
    /// it is one loaded from there ([`replica::STORED`]: the whole cluster stopped since its
    /// client was last seen), as a copy to restore and its messages' ids (issue 18).
    pub(crate) async fn stored_queue(&self, client_id: &str) -> Option<(MeshSession, Vec<MsgId>)> {
        let durable = self.durable.get()?;
        if lock(&self.held).owner(client_id) != Some(replica::STORED) {
            return None;
        }
        let entry = durable.fetch_queued(client_id).await?;
        Some(crate::durable::queued::session_of(
            entry,
            mqlb_ha_api::now_ms(),
        ))
    }

    /// What this node holds of persistent sessions' queues, for a clean stop to write to the
    /// HA servers (issue 18): each session it owns taken out of its router (`true`: the
    /// owner's, all of it) and each replica's copy, as far as `within` allows.
    pub(crate) async fn queued_at_stop(&self, within: Duration) -> Vec<(MeshSession, bool)> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        let owned = lock(&self.book).clients();
        for client_id in owned {
            match tokio::time::timeout_at(deadline, self.control.export(&client_id, usize::MAX))
                .await
            {
                Ok(Some(e)) => out.push((crate::session::to_mesh(e), true)),
                Ok(None) => {}
                Err(_) => {
                    tracing::warn!(
                        client_id,
                        "the router did not give its sessions' queues in time; not all written"
                    );
                    break;
                }
            }
        }
        let now = self.now_ms();
        let held = lock(&self.held);
        out.extend(
            held.clients()
                .iter()
                .filter_map(|c| held.session(c, now, usize::MAX))
                .map(|s| (s, false)),
        );
        out
    }

    /// Installs the session of `client_id` from its copies (this node's replica and `copies`
    /// from the peers, and `stored`: what the HA servers' database kept of it) before its
    /// CONNACK. Blocking (the router's answer): run it off the async workers.
    pub(crate) fn restore(
        &self,
        client_id: &str,
        copies: Vec<MeshSession>,
        stored: Option<(MeshSession, Vec<MsgId>)>,
    ) -> bool {
        // The session is here (saved in the router): it is the session, the copies are not.
        if lock(&self.book).owns(client_id) {
            return false;
        }
        let now = self.now_ms();
        let held = lock(&self.held);
        let own = held.session(client_id, now, usize::MAX);
        let source = if copies.is_empty() { "local" } else { "merged" };
        let Some(mut merged) = replica::merge(own.into_iter().chain(copies).collect()) else {
            return false;
        };
        let (stored, stored_ids) = stored.unzip();
        if let Some(stored) = stored {
            merged = replica::stored_first(merged, stored);
        }
        let messages = merged.pending.len();
        if !self.install(held, merged, now, messages) {
            return false;
        }
        if let (Some(d), Some(ids)) = (self.durable.get(), stored_ids) {
            d.restored(client_id, ids);
        }
        self.metrics.restored.with_label_values(&[source]).inc();
        tracing::info!(
            client_id,
            messages,
            source,
            "session restored from replicas"
        );
        true
    }

    /// Puts `session` in the router, `from_replicas` of its messages given by the replicas,
    /// with the replicas (`held`) locked until the router has it: a message recorded before is
    /// in the session, one recorded after reaches the router after the session and is
    /// delivered by it (a duplicate at worst, never a gap). This node owns it then.
    fn install(
        &self,
        mut held: MutexGuard<'_, Replicas>,
        session: MeshSession,
        now: u64,
        from_replicas: usize,
    ) -> bool {
        let client_id = session.client_id.clone();
        let (expiry, subs) = (session.expiry, session.subscriptions.clone());
        let export = match crate::session::from_mesh(session) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(client_id, error = %e, "a session could not be installed");
                return false;
            }
        };
        if !self.control.import_blocking(export, Duration::from_secs(2)) {
            tracing::warn!(client_id, "the router did not take a session");
            return false;
        }
        held.drain_groups(&client_id);
        held.remove(&client_id);
        drop(held);
        self.metrics.redelivered.inc_by(from_replicas as u64);
        let a = lock(&self.book).installed(&client_id, expiry, &subs, now);
        self.announce(a);
        true
    }

    /// Sends the acknowledgements gathered since the last round; expires offline sessions
    /// and replicas; updates the gauges.
    fn tick(&self, expire: bool) {
        self.rerank();
        self.send_acks();
        if expire {
            self.expire();
        }
    }

    /// Sends the acknowledgements gathered so far to every peer. Before a session leaves for
    /// a peer: they reach it ahead of the session (one queue per peer), so its replica does
    /// not hold what the client already has.
    pub(crate) fn send_acks(&self) {
        let updates = std::mem::take(&mut *lock(&self.acks));
        if updates.is_empty() {
            return;
        }
        let mut acks: HashMap<String, Vec<MsgId>> = HashMap::new();
        let mut pkids: HashMap<String, Vec<PkidEvent>> = HashMap::new();
        for (client, u) in updates {
            match u {
                Update::Acked(id) => acks.entry(client).or_default().push(id),
                Update::Pkid(e) => pkids.entry(client).or_default().push(e),
            }
        }
        // Frames of a bounded size: a mesh frame carries them whatever their number. The
        // packet ids first: a message sent and acknowledged in one round frees its id in the
        // replica (the acknowledgement finds the id), instead of leaving it taken.
        let pkids: Vec<(String, Vec<PkidEvent>)> = pkids.into_iter().collect();
        for chunk in pkids.chunks(256) {
            self.broadcast(&Frame::ReplicaPkids {
                pkids: chunk.to_vec(),
            });
        }
        let acks: Vec<(String, Vec<MsgId>)> = acks.into_iter().collect();
        for chunk in acks.chunks(256) {
            self.broadcast(&Frame::ReplicaAcks {
                acks: chunk.to_vec(),
            });
        }
    }

    /// Wills of dead peers, expired sessions and replicas, the gauges.
    fn expire(&self) {
        self.publish_wills();
        let now = self.now_ms();
        let gone = lock(&self.book).expire(now);
        for a in gone {
            self.announce(Some(a));
        }
        let mut held = lock(&self.held);
        held.expire(now);
        held.demote(now);
        self.metrics.held.set(held.len() as i64);
        self.metrics.queueing.set(held.active() as i64);
        self.metrics.messages.set(held.messages() as i64);
        let d = std::mem::take(&mut held.dropped);
        drop(held);
        self.metrics
            .dropped
            .with_label_values(&["message"])
            .inc_by(d.messages);
        self.metrics
            .dropped
            .with_label_values(&["replica"])
            .inc_by(d.replicas);
    }
}

impl Replication {
    /// Publishes the wills that dead peers left pending and this node is to publish: into its
    /// own router and to every peer, once.
    fn publish_wills(&self) {
        let Some(mesh) = self.mesh.upgrade() else {
            return;
        };
        let now = self.now_ms();
        let grace = u64::try_from(WILL_GRACE.as_millis()).unwrap_or(u64::MAX);
        let peers = mesh.peers();
        let mut down = lock(&self.down);
        for p in peers.iter() {
            if p.is_up() {
                down.remove(&p.id);
            } else {
                down.entry(p.id.clone()).or_insert(now);
            }
        }
        let mut held = lock(&self.held);
        // An owner that is no peer at all (it left the membership) is gone too.
        for owner in held.owners() {
            if !peers.iter().any(|p| p.id == owner) {
                down.entry(owner.to_owned()).or_insert(now);
            }
        }
        let up: Vec<&str> = peers
            .iter()
            .filter(|p| p.is_up())
            .map(|p| p.id.as_str())
            .chain([mesh.id.as_str()])
            .collect();
        let wills = held.due_wills(
            now,
            |owner| {
                down.get(owner)
                    .copied()
                    .filter(|since| now.saturating_sub(*since) >= grace)
            },
            // one publisher: the lowest ID among the live nodes, the dead owner aside
            |owner| up.iter().filter(|id| **id != owner).min() == Some(&mesh.id.as_str()),
        );
        drop(held);
        drop(down);
        for will in wills {
            self.metrics.wills.inc();
            tracing::info!(
                topic = %String::from_utf8_lossy(&will.topic),
                "publishing the will of a client whose node died"
            );
            if let Some(inject) = self.inject.get() {
                let injected = Injected {
                    peer: mesh.id.clone(),
                    publish: will.clone(),
                    received: Instant::now(),
                    seq: None,
                };
                if inject.try_send(injected).is_err() {
                    tracing::warn!("injector full: a will was not delivered on this node");
                }
            }
            mesh.will_published(&will);
            mesh.forward_local(|| will);
        }
    }
}

/// A peer's REPLICA_META names a session a client could have: a client ID rumqttd takes, and
/// filters a client could subscribe to (none of the router's own `$` logs).
pub(crate) fn check_meta(m: &ReplicaMeta) -> Result<(), &'static str> {
    if !crate::session::client_id_ok(&m.client_id) {
        return Err("client id");
    }
    if !m.subscriptions.iter().all(crate::session::subscription_ok) {
        return Err("subscription filter");
    }
    Ok(())
}

/// The replication's timer: acknowledgements out every [`ACK_FLUSH`], expiry every second.
pub(crate) async fn run(r: Arc<Replication>, stop: CancellationToken) {
    let mut every = tokio::time::interval(ACK_FLUSH);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        n += 1;
        r.tick(n.is_multiple_of(50));
    }
}
