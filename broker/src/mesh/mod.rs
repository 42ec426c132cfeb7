//! The cluster mesh: every node keeps one outbound link to each peer and accepts inbound links
//! from them. A publish from a local client (seen by [`crate::tap`]) is queued once per peer
//! and sent over that peer's link; a publish arriving on an inbound link is injected into the
//! local router and goes no further (one hop, full mesh), so there are no loops and no
//! duplicates.
//!
//! Links are authenticated ([`auth`]), over mutual TLS with `[cluster] tls`, framed with a version and a length limit ([`frame`]),
//! reconnected with exponential back-off, and fed from a bounded queue per peer: a slow or
//! dead peer costs dropped (and counted) messages, never a stalled node.
//!
//! QoS 1/2 publishes are acknowledged hop by hop ([`reliable`]): the sender numbers each and
//! keeps it (bounded) until the peer says its router accepted it, and sends again after a
//! reconnect what was not acknowledged; the receiver drops what it already delivered. QoS 0
//! stays fire-and-forget. A local client's QoS 1/2 PUBLISH is acknowledged to it (PUBACK,
//! PUBREC) only once every peer whose link was up has acknowledged its frame, or after
//! [`ACK_WAIT_MAX`] (see [`Mesh::forward_local`]): a node killed right after its PUBACK has
//! already handed the message to the others.
//!
//! This file is [`Mesh`], the node's mesh state and what the rest of the broker calls: the
//! peers and their queues, the live clients and the wills they left, the numbered streams
//! received. The I/O of the links is `link`.

pub mod auth;
pub mod frame;
mod link;
pub mod reliable;

pub(crate) use link::serve_inbound;
pub use link::HandshakeError;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use mqlb_config::{MeshTls, Secret};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use frame::{encode, Frame, MeshPublish};

/// Frame bytes beyond the payload: topic, properties, header.
const FRAME_OVERHEAD: usize = 128 * 1024;
/// The longest a local client's QoS 1/2 PUBLISH waits for the peers' acknowledgements before
/// its PUBACK / PUBREC goes out anyway (counted, `mqlb_mesh_ack_wait_timeouts_total`): a peer
/// up but silent (paused, overloaded) slows publishers by this much at most.
pub(crate) const ACK_WAIT_MAX: Duration = Duration::from_secs(1);
/// Origin nodes a receiver keeps delivery state for (one per peer; beyond it one is
/// forgotten, which can only cause duplicates).
const MAX_ORIGINS: usize = 1024;

/// A publish from a peer on its way to the local router; `seq`: its `(epoch, seq)` if it is
/// numbered, reported with [`Mesh::delivery_accepted`] once the router accepted it.
pub(crate) struct Injected {
    pub peer: String,
    pub publish: MeshPublish,
    pub received: Instant,
    pub seq: Option<(u64, u64)>,
}

/// What a receiver knows of one origin's numbered stream, and its acknowledgement for the
/// link that carries it.
struct Origin {
    state: reliable::Inbound,
    ack: watch::Sender<Option<(u64, u64)>>,
}

/// A frame waiting in a peer's queue.
#[derive(Clone)]
struct Outbound {
    frame: Bytes,
    /// Where the frame's message expiry interval is, its value, and when the message was
    /// received: the interval sent is what is left of it when the frame is written
    /// (MQTT-3.3.2-6), and a message that expired while queued is not sent (MQTT-3.3.2-5).
    expiry: Option<(usize, u32, Instant)>,
    /// A QoS 1/2 publish: numbered, kept until the peer acknowledges it (issue 12).
    reliable: bool,
    /// When it was queued: the age of the oldest unacknowledged one is the link's lag.
    queued: Instant,
    /// A local client's QoS 1/2 publish whose PUBACK waits for this peer (issue 12): one
    /// share of [`Durable`], released when the peer acknowledged the frame, or it was dropped,
    /// or the link went down.
    durable: Option<Arc<Durable>>,
}

/// A local client's QoS 1/2 publish on its way to the peers whose links were up. Each peer's
/// copy holds a share; when the last is released (dropped) the wait
/// [`Mesh::forward_local`] gave for the PUBACK ends.
struct Durable(#[allow(dead_code)] tokio::sync::oneshot::Sender<()>);

impl Outbound {
    /// The bytes to write now; `None`: the message expired while it waited.
    fn now(&self) -> Option<Bytes> {
        let Some((at, interval, received)) = self.expiry else {
            return Some(self.frame.clone());
        };
        let waited = u32::try_from(received.elapsed().as_secs()).unwrap_or(u32::MAX);
        if waited == 0 {
            return Some(self.frame.clone());
        }
        let remaining = interval.checked_sub(waited).filter(|r| *r > 0)?;
        frame::with_expiry(&self.frame, at, remaining)
    }
}

/// A peer this node sends to.
pub struct PeerOut {
    pub id: String,
    pub addr: SocketAddr,
    tx: mpsc::Sender<Outbound>,
    up: AtomicBool,
    /// Learned from the HA server's membership (removed when the member goes), rather than
    /// listed in the config (kept always).
    dynamic: bool,
    stop: CancellationToken,
}

impl PeerOut {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Frames queued for this peer, not yet taken by its link (`mqlb_mesh_backlog`).
    pub fn backlog(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Link settings from `[cluster]`.
#[derive(Clone)]
pub struct MeshSettings {
    pub secret: Secret,
    pub peer_queue: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub max_payload: usize,
    /// Session replicas (issue 12): on, and the messages one replica holds at most.
    pub replicate_sessions: bool,
    pub replica_max_messages: usize,
    /// Copies of a session's messages, the owner's among them (0: every node).
    pub replication_factor: usize,
    /// The address links to the peers leave from: the node's mesh listen address (when it
    /// names one), so on a machine with several addresses a peer, a firewall or a partition
    /// sees the node's own, not whichever the route picks.
    pub source: Option<IpAddr>,
    /// `[cluster] tls`: every link, dialed or accepted, runs over mutual TLS (issue 15).
    pub tls: Option<mqlb_config::MeshTls>,
}

/// A live client connection of this node, by client ID (see [`Mesh::client_connected`]).
struct Live {
    connection: u64,
    clean_start: bool,
    /// When its CONNACK went out (`Frame::Connected::at`).
    at: u64,
}

/// A will on its way to the peers after its delay; the sender cancels it (`false`) or sends
/// it now (`true`).
struct PendingWill {
    connection: u64,
    decide: tokio::sync::oneshot::Sender<bool>,
}

#[derive(Default)]
struct Clients {
    live: HashMap<String, Live>,
    pending: HashMap<String, PendingWill>,
    /// CONNECTs read and not yet answered, with when they were read: a peer's `Connected`
    /// that is older loses to them too (a connection here may be taken over in the router
    /// before its CONNACK). One entry per connection in that state at most.
    connecting: HashMap<String, u64>,
}

pub(crate) struct Mesh {
    pub id: String,
    settings: Option<MeshSettings>,
    peers: ArcSwap<Vec<Arc<PeerOut>>>,
    pub metrics: Arc<Metrics>,
    /// Sessions across the cluster (issue 12): set once the router runs.
    pub(crate) sessions: std::sync::OnceLock<Arc<crate::session::Sessions>>,
    /// Shared subscriptions across the cluster (issue 12): set once the node starts.
    pub(crate) share: std::sync::OnceLock<Arc<crate::share::Share>>,
    /// Session replicas (issue 12): set once the router runs.
    pub(crate) replication: std::sync::OnceLock<Arc<crate::replication::Replication>>,
    /// Where retained wills this node publishes are written (issue 18): set once it loaded.
    pub(crate) durable: std::sync::OnceLock<Arc<crate::durable::Durable>>,
    /// rumqttd's delayed wills of this node's listeners: a client that connects on another
    /// node cancels (or, with a clean start, fires) the will its connection here left.
    wills: rumqttd::DelayedWills,
    /// This node's live client connections and the wills its ended ones left for the peers
    /// (rumqttd publishes them locally; the peers get them from here).
    clients: Mutex<Clients>,
    next_connection: AtomicU64,
    /// Acknowledged delivery: per origin node, its numbered stream to this node.
    origins: Mutex<HashMap<String, Origin>>,
    /// The links' TLS in force (`[cluster] tls`, swapped by [`Mesh::reload_tls`]): read at
    /// each handshake, so a live link keeps the session it made.
    tls: Option<ArcSwap<MeshTls>>,
}

/// `mqlb_mesh_tls_cert_expiry_seconds` of `now` in place of `before`'s: an expiring mesh
/// certificate splits the cluster the day it expires, so it is alerted on before.
fn show_expiry(metrics: &Metrics, before: Option<&MeshTls>, now: &MeshTls) {
    if let Some(b) = before.filter(|b| b.cert != now.cert) {
        let _ = metrics
            .mesh_tls_cert_expiry
            .remove_label_values(&[&b.cert.display().to_string()]);
    }
    if let Some(at) = now.server.not_after() {
        metrics
            .mesh_tls_cert_expiry
            .with_label_values(&[&now.cert.display().to_string()])
            .set(at);
    }
}

impl Mesh {
    pub(crate) fn new(
        id: String,
        settings: Option<MeshSettings>,
        metrics: Arc<Metrics>,
        wills: rumqttd::DelayedWills,
    ) -> Mesh {
        let tls = settings.as_ref().and_then(|s| s.tls.clone());
        if let Some(t) = &tls {
            show_expiry(&metrics, None, t);
        }
        Mesh {
            id,
            tls: tls.map(ArcSwap::from_pointee),
            settings,
            peers: ArcSwap::from_pointee(Vec::new()),
            metrics,
            sessions: std::sync::OnceLock::new(),
            share: std::sync::OnceLock::new(),
            replication: std::sync::OnceLock::new(),
            durable: std::sync::OnceLock::new(),
            wills,
            clients: Mutex::new(Clients::default()),
            next_connection: AtomicU64::new(1),
            origins: Mutex::new(HashMap::new()),
        }
    }

    /// The TLS the next link handshake, dialed or accepted, runs with.
    pub(crate) fn tls(&self) -> Option<Arc<MeshTls>> {
        self.tls.as_ref().map(|t| t.load_full())
    }

    /// Runs the next link handshakes with `new` (the `[cluster] tls` of the file read again,
    /// its files re-read); live links keep theirs. TLS is turned on or off by a restart only:
    /// a node that switched alone would refuse, and be refused by, every peer. Returns
    /// whether anything changed.
    pub(crate) fn reload_tls(&self, new: Option<&MeshTls>) -> Result<bool, &'static str> {
        match (&self.tls, new) {
            (None, None) => Ok(false),
            (Some(current), Some(new)) => {
                let before = current.load();
                if **before == *new {
                    return Ok(false);
                }
                show_expiry(&self.metrics, Some(&before), new);
                current.store(Arc::new(new.clone()));
                Ok(true)
            }
            _ => Err("mesh TLS is turned on or off by a restart, not a reload"),
        }
    }

    fn origins(&self) -> std::sync::MutexGuard<'_, HashMap<String, Origin>> {
        self.origins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The acknowledgements for `peer`'s stream, for a new link from it.
    fn origin_acks(&self, peer: &str) -> watch::Receiver<Option<(u64, u64)>> {
        let mut o = self.origins();
        if let Some(origin) = o.get(peer) {
            return origin.ack.subscribe();
        }
        if o.len() >= MAX_ORIGINS {
            if let Some(k) = o.keys().next().cloned() {
                o.remove(&k);
            }
        }
        let (ack, rx) = watch::channel(None);
        o.insert(
            peer.to_owned(),
            Origin {
                state: reliable::Inbound::default(),
                ack,
            },
        );
        rx
    }

    /// Frame `seq` of `peer`'s stream `epoch` arrived: deliver it or drop it as a duplicate.
    fn offer(&self, peer: &str, epoch: u64, seq: u64) -> reliable::Verdict {
        let mut o = self.origins();
        match o.get_mut(peer) {
            Some(origin) => {
                let v = origin.state.offer(epoch, seq);
                // a new stream (or a gap with nothing in flight) may move the ack at once
                let ack = origin.state.ack();
                if ack.is_some() && *origin.ack.borrow() != ack {
                    origin.ack.send_replace(ack);
                }
                v
            }
            // forgotten (more origins than MAX_ORIGINS): deliver, at worst twice
            None => reliable::Verdict::Deliver { skipped: 0 },
        }
    }

    /// The router accepted frame `seq` of `peer`'s stream `epoch` (see [`Injected`]).
    pub(crate) fn delivery_accepted(&self, peer: &str, epoch: u64, seq: u64) {
        let mut o = self.origins();
        if let Some(origin) = o.get_mut(peer) {
            if let Some(ack) = origin.state.accepted(epoch, seq) {
                origin.ack.send_replace(Some(ack));
            }
        }
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, Clients> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A client connected to this node (its CONNACK was a success): the will its previous
    /// connection left, here or on any node, is cancelled, or with `clean_start` (which ends
    /// the old session) sent now (MQTT-3.1.3-9). Returns the connection's registration, for
    /// [`Mesh::client_gone`].
    pub(crate) fn client_connected(&self, client_id: &str, clean_start: bool, at: u64) -> u64 {
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        if client_id.is_empty() {
            // rumqttd assigned it an ID of its own: no other connection has it
            return connection;
        }
        let pending = {
            let mut c = self.clients();
            if c.connecting.get(client_id) == Some(&at) {
                c.connecting.remove(client_id);
            }
            c.live.insert(
                client_id.to_owned(),
                Live {
                    connection,
                    clean_start,
                    at,
                },
            );
            c.pending.remove(client_id)
        };
        if let Some(p) = pending {
            let _ = p.decide.send(clean_start);
        }
        self.broadcast(&Frame::Connected {
            client_id: client_id.to_owned(),
            clean_start,
            at,
        });
        connection
    }

    /// A peer says a client connected there: the will its connection here left is cancelled
    /// or sent now, for rumqttd's local publication and for the peers. A connection still
    /// live here is taken over, unless it is the newer of the two (`at`, then the node IDs):
    /// when two nodes race, both hear of the other and exactly one connection stays.
    pub(crate) fn peer_connected(&self, peer: &str, client_id: &str, clean_start: bool, at: u64) {
        let ours_is_newer = {
            let c = self.clients();
            let ours = c.live.get(client_id).map(|l| l.at);
            ours.or_else(|| c.connecting.get(client_id).copied())
                .is_some_and(|ours| (ours, self.id.as_str()) > (at, peer))
        };
        if ours_is_newer {
            tracing::debug!(
                client_id,
                peer,
                "a peer's older connection loses to the one here"
            );
            return;
        }
        let pending = self.clients().pending.remove(client_id);
        if let Some(p) = pending {
            let _ = p.decide.send(clean_start);
        }
        self.wills.connected_elsewhere(client_id, clean_start);
        // One live session per client ID (issue 12): a connection here is taken over.
        if let Some(s) = self.sessions.get() {
            s.peer_connected(self, client_id, clean_start);
        }
    }

    /// A CONNECT of `client_id` was read here; returns its time, the `at` its `Connected`
    /// will carry (see [`Mesh::peer_connected`]).
    pub(crate) fn client_connecting(&self, client_id: &str) -> u64 {
        let at = unix_micros();
        if !client_id.is_empty() {
            self.clients().connecting.insert(client_id.to_owned(), at);
        }
        at
    }

    /// A CONNECT read at `at` got no successful CONNACK (refused, or the client left first).
    pub(crate) fn client_not_connected(&self, client_id: &str, at: u64) {
        let mut c = self.clients();
        if c.connecting.get(client_id) == Some(&at) {
            c.connecting.remove(client_id);
        }
    }

    /// Whether `client_id` has a live connection on this node (issue 12).
    pub(crate) fn has_live(&self, client_id: &str) -> bool {
        self.clients().live.contains_key(client_id)
    }

    /// The connection `connection` of `client_id` ended. Its will (if it ended without
    /// DISCONNECT) goes to the peers after `delay` seconds (the Will Delay Interval, or the
    /// Session Expiry Interval if shorter), unless the client connects again first; at once if
    /// a newer connection of the client already replaced this one with a clean start, never
    /// if without.
    pub(crate) fn client_gone(
        self: &Arc<Self>,
        client_id: &str,
        connection: u64,
        will: Option<(MeshPublish, u32)>,
    ) {
        // The decider of a will nothing can cancel, kept by its timer.
        let mut keep = None;
        let (rx, will, delay) = {
            let mut c = self.clients();
            let replaced = match c.live.get(client_id) {
                Some(l) if l.connection == connection => {
                    c.live.remove(client_id);
                    None
                }
                Some(l) => Some(l.clean_start),
                None => None,
            };
            let Some((will, delay)) = will else { return };
            match replaced {
                Some(false) => return,
                Some(true) => (None, will, 0),
                None if delay == 0 => (None, will, 0),
                None => {
                    let (decide, rx) = tokio::sync::oneshot::channel();
                    if client_id.is_empty() {
                        // An assigned client ID, never seen again: nothing can cancel it.
                        keep = Some(decide);
                    } else {
                        // A will still pending from an older connection: this one replaced it.
                        c.pending
                            .insert(client_id.to_owned(), PendingWill { connection, decide });
                    }
                    (Some(rx), will, delay)
                }
            }
        };
        let Some(rx) = rx else {
            self.will_published(&will);
            self.forward_local(|| will);
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mesh = self.clone();
        let client_id = client_id.to_owned();
        rt.spawn(async move {
            let _keep = keep;
            let send = tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(u64::from(delay))) => {
                    let mut c = mesh.clients();
                    if c.pending.get(&client_id).is_some_and(|p| p.connection == connection) {
                        c.pending.remove(&client_id);
                    }
                    true
                }
                decided = rx => decided.unwrap_or(false),
            };
            if send {
                mesh.will_published(&will);
                mesh.forward_local(|| will);
            }
        });
    }

    /// A will this node publishes (its client's, or a dead peer's client's: one node does):
    /// a retained one is written to the HA servers as a client's retained PUBLISH is (issue
    /// 18; the tap never sees a will, the router publishes it).
    pub(crate) fn will_published(&self, will: &MeshPublish) {
        if let (true, Some(d)) = (will.retain, self.durable.get()) {
            d.retained_will(will);
        }
    }

    /// Offers a control frame to every peer; a full queue drops it (counted).
    fn broadcast(&self, f: &Frame) {
        let peers = self.peers.load();
        if peers.is_empty() {
            return;
        }
        let frame = match encode(f) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "frame not sent to peers");
                return;
            }
        };
        let out = Outbound {
            frame,
            expiry: None,
            reliable: false,
            queued: Instant::now(),
            durable: None,
        };
        self.queue_for(&peers, out);
    }

    /// Offers a frame to the peer `peer` alone (sessions across the cluster, issue 12); `Err`
    /// says why it was not queued.
    pub(crate) fn send_to(&self, peer: &str, f: &Frame) -> Result<(), &'static str> {
        let peers = self.peers.load();
        let p = peers.iter().find(|p| p.id == peer).ok_or("no such peer")?;
        let frame = encode(f).map_err(|_| "not encodable")?;
        if frame.len() > self.max_frame() {
            return Err("larger than a mesh frame");
        }
        let out = Outbound {
            frame,
            expiry: None,
            reliable: false,
            queued: Instant::now(),
            durable: None,
        };
        p.tx.try_send(out).map_err(|_| "peer queue full")
    }

    /// Queues `out` for every peer in `peers`; a full queue drops it for that peer (counted).
    fn queue_for(&self, peers: &[Arc<PeerOut>], out: Outbound) {
        for p in peers {
            if p.tx.try_send(out.clone()).is_err() {
                self.metrics
                    .dropped
                    .with_label_values(&[&p.id, "queue_full"])
                    .inc();
            }
        }
    }

    fn max_frame(&self) -> usize {
        self.settings.as_ref().map_or(0, |s| s.max_payload) + FRAME_OVERHEAD
    }

    pub(crate) fn peers(&self) -> Arc<Vec<Arc<PeerOut>>> {
        self.peers.load_full()
    }

    /// Offers a local client's publish (built only when there are peers) to every peer. Never
    /// blocks: a full queue drops.
    ///
    /// For QoS 1/2, returns what the client's PUBACK / PUBREC waits for (issue 12): every peer
    /// whose link is up now acknowledged the frame (its router accepted the message), or the
    /// copy for it was dropped (counted), or its link went down, or [`ACK_WAIT_MAX`] passed.
    /// Peers that are down are not waited for (their copy is queued, as for any message).
    /// `None`: nothing to wait for (QoS 0, no peer up).
    pub(crate) fn forward_local(
        &self,
        publish: impl FnOnce() -> MeshPublish,
    ) -> Option<rumqttd::protocol::AckWait> {
        self.metrics.local_publishes.inc();
        let peers = self.peers.load();
        if peers.is_empty() {
            return None;
        }
        // Encoded once, shared by every peer's queue.
        let publish = publish();
        let received = Instant::now();
        let out = match frame::encode_publish_expiry_at(&publish) {
            Ok((frame, at)) => Outbound {
                frame,
                expiry: at
                    .zip(publish.message_expiry_interval)
                    .map(|(a, i)| (a, i, received)),
                reliable: publish.qos > 0,
                queued: Instant::now(),
                durable: None,
            },
            Err(e) => {
                tracing::warn!(error = %e, "publish not forwarded to peers");
                return None;
            }
        };
        if !out.reliable || !peers.iter().any(|p| p.is_up()) {
            self.queue_for(&peers, out);
            return None;
        }
        // The bound counts from now, not from when the link first asks.
        let deadline = tokio::time::Instant::now() + ACK_WAIT_MAX;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let durable = Arc::new(Durable(tx));
        for p in peers.iter() {
            let mut copy = out.clone();
            if p.is_up() {
                copy.durable = Some(durable.clone());
            }
            if p.tx.try_send(copy).is_err() {
                self.metrics
                    .dropped
                    .with_label_values(&[&p.id, "queue_full"])
                    .inc();
            }
        }
        drop(durable);
        let timeouts = self.metrics.ack_wait_timeouts.clone();
        Some(Box::pin(async move {
            // Ends with `Err` once every share is released: nothing is ever sent.
            if tokio::time::timeout_at(deadline, rx).await.is_err() {
                timeouts.inc();
            }
        }))
    }

    /// Adds a peer and starts its outbound link on the current runtime.
    pub(crate) fn add_peer(
        self: &Arc<Self>,
        id: String,
        addr: SocketAddr,
        stop: CancellationToken,
    ) {
        self.add(id, addr, stop, false);
    }

    /// Makes the dynamic peers exactly `members` (from the HA server): new ones get a link,
    /// gone or moved ones lose theirs. Peers from the config are never touched.
    pub(crate) fn set_dynamic_peers(
        self: &Arc<Self>,
        members: &[(String, SocketAddr)],
        parent: &CancellationToken,
    ) {
        let current = self.peers.load_full();
        let keep =
            |p: &PeerOut| !p.dynamic || members.iter().any(|(id, a)| *id == p.id && *a == p.addr);
        let mut next = Vec::new();
        for p in current.iter() {
            if keep(p) {
                next.push(p.clone());
            } else {
                tracing::info!(peer = p.id, addr = %p.addr, "peer left the membership; closing its link");
                p.stop.cancel();
                if let Err(e) = self.metrics.link_up.remove_label_values(&[&p.id]) {
                    tracing::debug!(error = %e, "no link_up series to remove");
                }
            }
        }
        if next.len() != current.len() {
            self.peers.store(Arc::new(next));
        }
        for (id, addr) in members {
            if *id == self.id || self.peers.load().iter().any(|p| p.id == *id) {
                continue;
            }
            tracing::info!(peer = id, %addr, "peer joined the membership");
            self.add(id.clone(), *addr, parent.child_token(), true);
        }
    }

    fn add(self: &Arc<Self>, id: String, addr: SocketAddr, stop: CancellationToken, dynamic: bool) {
        let Some(settings) = self.settings.clone() else {
            tracing::warn!(peer = id, "no cluster secret: mesh links are disabled");
            return;
        };
        let (tx, rx) = mpsc::channel(settings.peer_queue.max(1));
        let peer = Arc::new(PeerOut {
            id,
            addr,
            tx,
            up: AtomicBool::new(false),
            dynamic,
            stop: stop.clone(),
        });
        self.metrics.link_up.with_label_values(&[&peer.id]).set(0);
        let mut next: Vec<Arc<PeerOut>> = self.peers.load().iter().cloned().collect();
        next.push(peer.clone());
        self.peers.store(Arc::new(next));
        tokio::spawn(link::outbound(self.clone(), peer, rx, settings, stop));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use frame::decode;

    fn queued(interval: u32, waited: Duration) -> (Outbound, MeshPublish) {
        let p = MeshPublish {
            topic: Bytes::from_static(b"t"),
            message_expiry_interval: Some(interval),
            ..Default::default()
        };
        let (frame, at) = frame::encode_publish_expiry_at(&p).expect("encodes");
        let received = Instant::now()
            .checked_sub(waited)
            .expect("the clock is past the wait");
        let at = at.expect("has an expiry");
        (
            Outbound {
                frame,
                expiry: Some((at, interval, received)),
                reliable: false,
                queued: Instant::now(),
                durable: None,
            },
            p,
        )
    }

    fn sent(out: &Outbound) -> Option<MeshPublish> {
        let bytes = out.now()?;
        match decode(&mut BytesMut::from(&bytes[..]), 1 << 20) {
            Ok(Some(Frame::Publish(p))) => Some(p),
            other => panic!("not a publish: {other:?}"),
        }
    }

    /// MQTT-3.3.2-6: the interval a peer receives is what is left of it after the wait in the
    /// queue; MQTT-3.3.2-5: a message that expired while queued is not sent.
    #[test]
    fn a_queued_message_expiry_counts_down() {
        let (out, p) = queued(10, Duration::ZERO);
        assert_eq!(sent(&out), Some(p));
        let (out, p) = queued(10, Duration::from_millis(3500));
        assert_eq!(
            sent(&out),
            Some(MeshPublish {
                message_expiry_interval: Some(7),
                ..p
            })
        );
        let (out, _) = queued(3, Duration::from_secs(3));
        assert_eq!(sent(&out), None);
        let plain = Outbound {
            frame: Bytes::from_static(b"x"),
            expiry: None,
            reliable: false,
            queued: Instant::now(),
            durable: None,
        };
        assert_eq!(plain.now(), Some(Bytes::from_static(b"x")));
    }
}
