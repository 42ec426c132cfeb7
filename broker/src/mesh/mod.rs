//! The cluster mesh: every node keeps one outbound link to each peer and accepts inbound links
//! from them. A publish from a local client (seen by [`crate::tap`]) is queued once per peer
//! and sent over that peer's link; a publish arriving on an inbound link is injected into the
//! local router and goes no further (one hop, full mesh), so there are no loops and no
//! duplicates.
//!
//! Links are authenticated ([`auth`]), framed with a version and a length limit ([`frame`]),
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

pub mod auth;
pub mod frame;
pub mod reliable;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use mqlb_config::Secret;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use frame::{decode, encode, Frame, FrameError, MeshPublish, VERSION};
use reliable::Unacked;

/// Time allowed for a link's handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Frame bytes beyond the payload: topic, properties, header.
const FRAME_OVERHEAD: usize = 128 * 1024;
/// Acknowledged delivery (issue 12). The bytes of unacknowledged QoS 1/2 frames kept per peer
/// (their count is bounded by `peer_queue`); beyond either bound the oldest is dropped.
const UNACKED_MAX_BYTES: usize = 64 * 1024 * 1024;
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

/// Why a link handshake failed; `label` is the `reason` of `mqlb_mesh_rejected_total`.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("peer closed the link during the handshake")]
    Closed,
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
    #[error("peer speaks mesh version {0}, this node {VERSION}")]
    Version(u8),
    #[error("expected {0}, got {1}")]
    Unexpected(&'static str, &'static str),
    #[error("peer {0:?} failed authentication (wrong cluster secret?)")]
    Auth(String),
    #[error("peer claims this node's own id {0:?}")]
    SelfLink(String),
}

impl HandshakeError {
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeError::Io(_) | HandshakeError::Closed => "io",
            HandshakeError::Frame(e) => e.label(),
            HandshakeError::Timeout(_) => "timeout",
            HandshakeError::Version(_) => "version",
            HandshakeError::Unexpected(..) => "protocol",
            HandshakeError::Auth(_) => "auth",
            HandshakeError::SelfLink(_) => "self",
        }
    }
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
    /// rumqttd's delayed wills of this node's listeners: a client that connects on another
    /// node cancels (or, with a clean start, fires) the will its connection here left.
    wills: rumqttd::DelayedWills,
    /// This node's live client connections and the wills its ended ones left for the peers
    /// (rumqttd publishes them locally; the peers get them from here).
    clients: Mutex<Clients>,
    next_connection: AtomicU64,
    /// Acknowledged delivery: per origin node, its numbered stream to this node.
    origins: Mutex<HashMap<String, Origin>>,
}

impl Mesh {
    pub(crate) fn new(
        id: String,
        settings: Option<MeshSettings>,
        metrics: Arc<Metrics>,
        wills: rumqttd::DelayedWills,
    ) -> Mesh {
        Mesh {
            id,
            settings,
            peers: ArcSwap::from_pointee(Vec::new()),
            metrics,
            sessions: std::sync::OnceLock::new(),
            share: std::sync::OnceLock::new(),
            replication: std::sync::OnceLock::new(),
            wills,
            clients: Mutex::new(Clients::default()),
            next_connection: AtomicU64::new(1),
            origins: Mutex::new(HashMap::new()),
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
                mesh.forward_local(|| will);
            }
        });
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
        tokio::spawn(outbound(self.clone(), peer, rx, settings, stop));
    }
}

async fn read_frame(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Frame>, HandshakeError> {
    loop {
        if let Some(f) = decode(buf, max)? {
            return Ok(Some(f));
        }
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(HandshakeError::Closed)
            };
        }
    }
}

/// The symmetric handshake: HELLO both ways, then AUTH both ways. Returns the peer's id.
async fn handshake(
    mesh: &Mesh,
    secret: &Secret,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<String, HandshakeError> {
    let own_nonce = auth::nonce();
    stream
        .write_all(&encode(&Frame::Hello {
            version: VERSION,
            node_id: mesh.id.clone(),
            nonce: own_nonce,
        })?)
        .await?;
    // Handshake frames are small; a peer announcing a big one is not a peer.
    let (peer, peer_nonce) = match read_frame(stream, buf, 1024).await? {
        Some(Frame::Hello { version, .. }) if version != VERSION => {
            return Err(HandshakeError::Version(version))
        }
        Some(Frame::Hello { node_id, nonce, .. }) => (node_id, nonce),
        Some(_) => return Err(HandshakeError::Unexpected("HELLO", "another frame")),
        None => return Err(HandshakeError::Closed),
    };
    if peer == mesh.id {
        return Err(HandshakeError::SelfLink(peer));
    }
    stream
        .write_all(&encode(&Frame::Auth {
            mac: auth::mac(secret.expose(), &peer_nonce, &mesh.id),
        })?)
        .await?;
    match read_frame(stream, buf, 1024).await? {
        Some(Frame::Auth { mac }) if auth::verify(secret.expose(), &own_nonce, &peer, &mac) => {
            Ok(peer)
        }
        Some(Frame::Auth { .. }) => Err(HandshakeError::Auth(peer)),
        Some(_) => Err(HandshakeError::Unexpected("AUTH", "another frame")),
        None => Err(HandshakeError::Closed),
    }
}

/// The metrics of one peer's outbound link.
struct LinkCounters {
    forwarded: prometheus::IntCounter,
    lost: prometheus::IntCounter,
    expired: prometheus::IntCounter,
    unacked_full: prometheus::IntCounter,
    resent: prometheus::IntCounter,
    unacked: prometheus::IntGauge,
    lag: prometheus::Gauge,
}

impl LinkCounters {
    /// The kept frames' count and the age of the oldest (the link's lag).
    fn kept(&self, unacked: &Unacked<Outbound>) {
        self.unacked.set(unacked.len() as i64);
        let oldest = unacked.pending().next().map(|(_, o)| o.queued.elapsed());
        self.lag.set(oldest.map_or(0.0, |d| d.as_secs_f64()));
    }
}

/// Writes a numbered frame: its header, then the frame's (shared) bytes.
async fn write_numbered(
    w: &mut (impl AsyncWrite + Unpin),
    epoch: u64,
    seq: u64,
    bytes: &[u8],
) -> std::io::Result<()> {
    let header = frame::sequenced_header(epoch, seq, bytes.len())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    w.write_all(&header).await?;
    w.write_all(bytes).await
}

/// Sends again, in order, every frame the peer has not acknowledged (those that expired
/// meanwhile are dropped and counted).
async fn resend(
    w: &mut (impl AsyncWrite + Unpin),
    unacked: &mut Unacked<Outbound>,
    c: &LinkCounters,
) -> std::io::Result<()> {
    if unacked.is_empty() {
        return Ok(());
    }
    let mut gone = Vec::new();
    let mut sent = 0;
    for (seq, m) in unacked.pending() {
        match m.now() {
            Some(bytes) => {
                write_numbered(w, unacked.epoch(), seq, &bytes).await?;
                sent += 1;
            }
            None => gone.push(seq),
        }
    }
    w.flush().await?;
    c.resent.inc_by(sent);
    c.expired.inc_by(gone.len() as u64);
    for seq in gone {
        unacked.forget(seq);
    }
    Ok(())
}

/// Writes a batch from the queue. A QoS 1/2 frame is numbered and kept (also when the write
/// fails: a new link sends it again); a QoS 0 frame in flight on a broken link is lost.
async fn send_batch(
    w: &mut (impl AsyncWrite + Unpin),
    batch: Vec<Outbound>,
    unacked: &mut Unacked<Outbound>,
    c: &LinkCounters,
) -> std::io::Result<()> {
    let mut sent = 0;
    // QoS 0 frames written (perhaps only into the buffer) or failing: lost if the link fails
    let mut plain = 0;
    let mut batch = batch.into_iter();
    let mut result = Ok(());
    for m in batch.by_ref() {
        let Some(bytes) = m.now() else {
            c.expired.inc();
            continue;
        };
        result = if m.reliable {
            let (seq, dropped) = unacked.push(m, bytes.len());
            c.unacked_full.inc_by(dropped as u64);
            write_numbered(w, unacked.epoch(), seq, &bytes).await
        } else {
            plain += 1;
            w.write_all(&bytes).await
        };
        if result.is_err() {
            break;
        }
        sent += 1;
    }
    if result.is_ok() {
        result = w.flush().await;
    }
    match result {
        Ok(()) => c.forwarded.inc_by(sent),
        Err(_) => {
            // written into a broken link: QoS 0 lost, the rest kept for the next link
            c.lost.inc_by(plain);
            for m in batch {
                if m.reliable && m.now().is_some() {
                    let size = m.frame.len();
                    c.unacked_full.inc_by(unacked.push(m, size).1 as u64);
                } else {
                    c.lost.inc();
                }
            }
        }
    }
    result
}

/// Applies the ACKs in `buf`; anything else from the peer is an error (its metric label and
/// why), which closes the link.
fn take_acks(
    buf: &mut BytesMut,
    unacked: &mut Unacked<Outbound>,
) -> Result<(), (&'static str, String)> {
    loop {
        match decode(buf, 1024) {
            Ok(Some(Frame::Ack { epoch, seq })) => {
                if let Err(e) = unacked.ack(epoch, seq) {
                    return Err(("protocol", e.to_string()));
                }
            }
            Ok(Some(_)) => {
                return Err(("protocol", "peer sent a frame other than ACK".to_string()));
            }
            Ok(None) => return Ok(()),
            Err(e) => return Err((e.label(), format!("bad frame from the peer: {e}"))),
        }
    }
}

/// A link whose peer vanished without a word (a partition, a host that lost power) is found
/// dead by the kernel within about this long: keepalive probes every second on an idle link,
/// and `TCP_USER_TIMEOUT` on data the peer does not acknowledge. Without it such a link stayed
/// "up" for the kernel's retransmission timeout (about 15 minutes), and the wills, the session
/// asks and the membership waited on it. (A paused peer's kernel still acknowledges: the PUBACK
/// gate's bound and the session ask's timeout cover that case.)
const LINK_DEAD_AFTER: Duration = Duration::from_secs(3);

fn watch_liveness(s: &TcpStream) -> std::io::Result<()> {
    let s = socket2::SockRef::from(s);
    let probes = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(1))
        .with_interval(Duration::from_secs(1))
        .with_retries(2);
    s.set_tcp_keepalive(&probes)?;
    s.set_tcp_user_timeout(Some(LINK_DEAD_AFTER))
}

/// A TCP connection to `to`, from `from` (any port) when given.
async fn dial(to: SocketAddr, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect(to).await;
    };
    let s = if from.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.bind(SocketAddr::new(from, 0))?;
    s.connect(to).await
}

/// Keeps the link to one peer up and drains its queue into it.
async fn outbound(
    mesh: Arc<Mesh>,
    peer: Arc<PeerOut>,
    mut rx: mpsc::Receiver<Outbound>,
    settings: MeshSettings,
    stop: CancellationToken,
) {
    let up_gauge = mesh.metrics.link_up.with_label_values(&[&peer.id]);
    let forwarded = mesh.metrics.forwarded.with_label_values(&[&peer.id]);
    let lost = mesh
        .metrics
        .dropped
        .with_label_values(&[&peer.id, "link_error"]);
    let expired = mesh
        .metrics
        .dropped
        .with_label_values(&[&peer.id, "expired"]);
    let counters = LinkCounters {
        forwarded,
        lost,
        expired,
        unacked_full: mesh
            .metrics
            .dropped
            .with_label_values(&[&peer.id, "unacked_full"]),
        resent: mesh.metrics.resent.with_label_values(&[&peer.id]),
        unacked: mesh.metrics.unacked.with_label_values(&[&peer.id]),
        lag: mesh.metrics.lag.with_label_values(&[&peer.id]),
    };
    // This link's numbered stream: a new epoch whenever the link to this peer is created.
    let mut unacked: Unacked<Outbound> = Unacked::new(
        rand::random(),
        settings.peer_queue.max(1),
        UNACKED_MAX_BYTES,
    );
    let mut backoff = settings.reconnect_min;
    // This node's shared groups (issue 12): sent as each link comes up and on every change.
    let mut groups = mesh.share.get().map(|s| s.advertised());
    loop {
        let attempt = async {
            let mut s = tokio::time::timeout(CONNECT_TIMEOUT, dial(peer.addr, settings.source))
                .await
                .map_err(|_| HandshakeError::Timeout(CONNECT_TIMEOUT))??;
            s.set_nodelay(true)?;
            watch_liveness(&s)?;
            let mut buf = BytesMut::new();
            let id = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                handshake(&mesh, &settings.secret, &mut s, &mut buf),
            )
            .await
            .map_err(|_| HandshakeError::Timeout(HANDSHAKE_TIMEOUT))??;
            Ok::<_, HandshakeError>((s, id))
        };
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt => r,
        };
        match connected {
            Ok((stream, id)) => {
                if id != peer.id {
                    tracing::warn!(expected = peer.id, got = id, addr = %peer.addr, "peer answered with another node id");
                }
                tracing::info!(peer = peer.id, addr = %peer.addr, "mesh link up");
                peer.up.store(true, Ordering::Release);
                up_gauge.set(1);
                backoff = settings.reconnect_min;
                let (mut r, w) = stream.into_split();
                let mut w = BufWriter::with_capacity(64 * 1024, w);
                let mut acks = BytesMut::new();
                let why = 'link: {
                    if let Err(e) = send_share_groups(&mut w, groups.as_mut()).await {
                        break 'link e.to_string();
                    }
                    // The persistent sessions of this node, for the peer's replicas (issue 12).
                    if let Err(e) = send_replicas(&mesh, &mut w).await {
                        break 'link e.to_string();
                    }
                    // First what the peer has not acknowledged, in order.
                    if let Err(e) = resend(&mut w, &mut unacked, &counters).await {
                        break 'link e.to_string();
                    }
                    counters.kept(&unacked);
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            msg = rx.recv() => {
                                let Some(first) = msg else { return };
                                let mut batch = vec![first];
                                while batch.len() < 256 {
                                    match rx.try_recv() {
                                        Ok(m) => batch.push(m),
                                        Err(_) => break,
                                    }
                                }
                                let r = send_batch(&mut w, batch, &mut unacked, &counters).await;
                                counters.kept(&unacked);
                                if let Err(e) = r {
                                    break 'link e.to_string();
                                }
                            }
                            Some(Ok(())) = changed(groups.as_mut()) => {
                                if let Err(e) = send_share_groups(&mut w, groups.as_mut()).await {
                                    break 'link e.to_string();
                                }
                            }
                            // The peer sends only ACKs: EOF or an error means the link is
                            // gone, noticed before the next publish is written into it.
                            r = r.read_buf(&mut acks) => match r {
                                Ok(0) => break 'link "peer closed the link".to_string(),
                                Ok(_) => {
                                    let taken = take_acks(&mut acks, &mut unacked);
                                    counters.kept(&unacked);
                                    if let Err((label, why)) = taken {
                                        mesh.metrics.rejected.with_label_values(&[label]).inc();
                                        break 'link why;
                                    }
                                }
                                Err(e) => break 'link e.to_string(),
                            },
                        }
                    }
                };
                peer.up.store(false, Ordering::Release);
                up_gauge.set(0);
                // A peer that is down is not waited for: its copies are kept (sent again on
                // the next link) but no PUBACK waits for them any more (issue 12).
                unacked.for_each_mut(|m| m.durable = None);
                counters.kept(&unacked);
                tracing::warn!(peer = peer.id, addr = %peer.addr, why, "mesh link down; reconnecting");
            }
            Err(e) => {
                tracing::debug!(peer = peer.id, addr = %peer.addr, error = %e, ?backoff, "mesh link attempt failed");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(settings.reconnect_max);
    }
}

/// Accepts inbound links and hands their publishes to the injector.
pub(crate) async fn serve_inbound(
    mesh: Arc<Mesh>,
    listener: TcpListener,
    inject: mpsc::Sender<Injected>,
    stop: CancellationToken,
) {
    let Some(settings) = mesh.settings.clone() else {
        return;
    };
    loop {
        let (stream, addr) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "mesh accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        if let Err(e) = watch_liveness(&stream) {
            tracing::debug!(error = %e, %addr, "mesh link without liveness checks");
        }
        let (mesh, inject, secret, stop) = (
            mesh.clone(),
            inject.clone(),
            settings.secret.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = inbound(mesh, stream, addr, secret, inject) => {}
            }
        });
    }
}

async fn inbound(
    mesh: Arc<Mesh>,
    mut stream: TcpStream,
    addr: SocketAddr,
    secret: Secret,
    inject: mpsc::Sender<Injected>,
) {
    let mut buf = BytesMut::new();
    let hs = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake(&mesh, &secret, &mut stream, &mut buf),
    )
    .await
    .unwrap_or(Err(HandshakeError::Timeout(HANDSHAKE_TIMEOUT)));
    let peer = match hs {
        Ok(p) => p,
        Err(e) => {
            mesh.metrics.rejected.with_label_values(&[e.label()]).inc();
            tracing::warn!(%addr, error = %e, "mesh link refused");
            return;
        }
    };
    tracing::info!(peer, %addr, "inbound mesh link up");
    // Its ACKs are small and a PUBACK at the origin waits for them (issue 12).
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(peer, error = %e, "TCP_NODELAY not set on an inbound mesh link");
    }
    // What this link says of the peer's shared groups is forgotten when it ends (issue 12).
    let share = mesh.share.get().map(|s| ShareLink::new(s.clone(), &peer));
    let received = mesh.metrics.received.with_label_values(&[&peer]);
    let duplicates = mesh.metrics.duplicates.with_label_values(&[&peer]);
    let skipped = mesh.metrics.skipped.with_label_values(&[&peer]);
    let max = mesh.max_frame().saturating_add(frame::SEQUENCED_HEADER);
    let (mut stream, w) = stream.into_split();
    // The peer's acknowledgements go back on this link, written by their own task, which
    // ends with the link.
    let _acks = AbortOnDrop(tokio::spawn(write_acks(w, mesh.origin_acks(&peer))));
    loop {
        let (p, seq) = match read_frame(&mut stream, &mut buf, max).await {
            Ok(Some(Frame::Publish(p))) => (p, None),
            Ok(Some(Frame::Sequenced { epoch, seq, inner })) => {
                let Frame::Publish(p) = *inner else {
                    mesh.metrics.rejected.with_label_values(&["protocol"]).inc();
                    tracing::warn!(peer, "a numbered frame that is not a publish; closing");
                    return;
                };
                match mesh.offer(&peer, epoch, seq) {
                    reliable::Verdict::Duplicate => {
                        duplicates.inc();
                        continue;
                    }
                    reliable::Verdict::Deliver { skipped: n } => skipped.inc_by(n),
                }
                (p, Some((epoch, seq)))
            }
            Ok(Some(Frame::Connected {
                client_id,
                clean_start,
                at,
            })) => {
                mesh.peer_connected(&peer, &client_id, clean_start, at);
                continue;
            }
            Ok(Some(Frame::ShareGroups { groups })) => {
                if let Some(s) = &share {
                    s.share.on_peer(&peer, s.link, groups);
                }
                continue;
            }
            // Sessions across the cluster (issue 12; `crate::session`).
            Ok(Some(Frame::SessionRequest { request, client_id })) => {
                if let Some(s) = mesh.sessions.get() {
                    s.on_request(&peer, request, client_id);
                }
                continue;
            }
            Ok(Some(Frame::Session { request, session })) => {
                let Some(s) = mesh.sessions.get() else {
                    continue;
                };
                if let Err(e) = s.on_session(&peer, request, session).await {
                    mesh.metrics.rejected.with_label_values(&[e.label()]).inc();
                    tracing::warn!(peer, error = %e, "bad session frame from a peer; closing");
                    return;
                }
                continue;
            }
            Ok(Some(Frame::SessionReplica { request, session })) => {
                let Some(s) = mesh.sessions.get() else {
                    continue;
                };
                if let Err(e) = s.on_replica(&peer, request, *session) {
                    mesh.metrics.rejected.with_label_values(&[e.label()]).inc();
                    tracing::warn!(peer, error = %e, "bad session replica from a peer; closing");
                    return;
                }
                continue;
            }
            // Session replicas (issue 12; `crate::replication`).
            Ok(Some(Frame::ReplicaMeta(m))) => {
                if let Some(r) = mesh.replication.get() {
                    if let Err(why) = crate::replication::check_meta(&m) {
                        mesh.metrics
                            .rejected
                            .with_label_values(&["malformed"])
                            .inc();
                        tracing::warn!(peer, why, "bad replica frame from a peer; closing");
                        return;
                    }
                    r.on_meta(&peer, *m);
                }
                continue;
            }
            Ok(Some(Frame::ReplicaAcks { acks })) => {
                if let Some(r) = mesh.replication.get() {
                    r.on_acks(&peer, acks);
                }
                continue;
            }
            Ok(Some(Frame::ReplicaClose { client_id })) => {
                if let Some(r) = mesh.replication.get() {
                    r.on_close(&peer, &client_id);
                }
                continue;
            }
            Ok(Some(_)) => {
                mesh.metrics.rejected.with_label_values(&["protocol"]).inc();
                tracing::warn!(peer, "unexpected frame after the handshake; closing");
                return;
            }
            Ok(None) => {
                tracing::info!(peer, "inbound mesh link closed");
                return;
            }
            Err(e) => {
                mesh.metrics.rejected.with_label_values(&[e.label()]).inc();
                tracing::warn!(peer, error = %e, "inbound mesh link failed");
                return;
            }
        };
        // Back-pressure: a full router queue slows this link, not the node.
        let injected = Injected {
            peer: peer.clone(),
            publish: p,
            received: Instant::now(),
            seq,
        };
        if inject.send(injected).await.is_err() {
            return;
        }
        received.inc();
    }
}

/// Session replicas (issue 12): every persistent session of this node, to a peer whose link
/// just came up.
async fn send_replicas(mesh: &Mesh, mut w: impl AsyncWrite + Unpin) -> std::io::Result<()> {
    let Some(r) = mesh.replication.get() else {
        return Ok(());
    };
    for f in r.link_up_frames() {
        match encode(&f) {
            Ok(bytes) => w.write_all(&bytes).await?,
            Err(e) => tracing::warn!(error = %e, "replica frame not sent"),
        }
    }
    w.flush().await
}

/// Shared subscriptions (issue 12): this node's groups to the peer, now (the latest list).
async fn send_share_groups(
    w: &mut (impl AsyncWrite + Unpin),
    groups: Option<&mut watch::Receiver<Arc<Vec<String>>>>,
) -> std::io::Result<()> {
    let Some(groups) = groups else {
        return Ok(());
    };
    let list = groups.borrow_and_update().clone();
    let bytes = encode(&Frame::ShareGroups {
        groups: list.to_vec(),
    })
    .map_err(std::io::Error::other)?;
    w.write_all(&bytes).await?;
    w.flush().await
}

/// Resolves when this node's shared groups change (never without a list to follow).
async fn changed(groups: Option<&mut watch::Receiver<Arc<Vec<String>>>>) -> Option<Result<(), ()>> {
    match groups {
        Some(g) => Some(g.changed().await.map_err(|_| ())),
        None => std::future::pending().await,
    }
}

/// An inbound link's part in [`crate::share::Share`]: what it carried is dropped with it.
struct ShareLink {
    share: Arc<crate::share::Share>,
    peer: String,
    link: u64,
}

impl ShareLink {
    fn new(share: Arc<crate::share::Share>, peer: &str) -> ShareLink {
        let link = share.link();
        ShareLink {
            share,
            peer: peer.to_string(),
            link,
        }
    }
}

impl Drop for ShareLink {
    fn drop(&mut self) {
        self.share.link_closed(&self.peer, self.link);
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends the origin's acknowledgement on its link: the current one at once, then each new
/// one as soon as it moved, since the origin's clients wait for it (their PUBACKs, issue 12).
/// What moves while one is written goes out as one in the next: under load, one ACK covers
/// many frames without a timer.
async fn write_acks(mut w: impl AsyncWrite + Unpin, mut acks: watch::Receiver<Option<(u64, u64)>>) {
    acks.mark_changed();
    let mut sent = None;
    loop {
        if acks.changed().await.is_err() {
            return;
        }
        // Lets the injector accept what else is ready first: one ACK for all of it.
        tokio::task::yield_now().await;
        let cur = *acks.borrow_and_update();
        let Some((epoch, seq)) = cur else { continue };
        if cur == sent {
            continue;
        }
        let Ok(bytes) = encode(&Frame::Ack { epoch, seq }) else {
            return;
        };
        if w.write_all(&bytes).await.is_err() || w.flush().await.is_err() {
            // the link is gone: its reader notices and ends
            return;
        }
        sent = cur;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The sender takes only ACKs from its peer, and only for what it sent: anything else is
    /// an error that names its metric label, and closes the link.
    #[test]
    fn a_sender_takes_only_acks_for_what_it_sent() {
        let out = |n: u8| Outbound {
            frame: Bytes::from(vec![n]),
            expiry: None,
            reliable: true,
            queued: Instant::now(),
            durable: None,
        };
        let mut unacked = Unacked::new(5, 10, 1 << 20);
        for n in 0..3 {
            unacked.push(out(n), 1);
        }
        let mut buf = BytesMut::new();
        for f in [
            Frame::Ack { epoch: 5, seq: 1 },
            Frame::Ack { epoch: 4, seq: 3 },
            Frame::Ack { epoch: 5, seq: 2 },
        ] {
            buf.extend_from_slice(&encode(&f).expect("encodes"));
        }
        // and half of the next one
        let next = encode(&Frame::Ack { epoch: 5, seq: 3 }).expect("encodes");
        buf.extend_from_slice(&next[..5]);
        assert_eq!(take_acks(&mut buf, &mut unacked), Ok(()));
        assert_eq!(unacked.len(), 1, "another epoch's ack changed nothing");
        buf.extend_from_slice(&next[5..]);
        assert_eq!(take_acks(&mut buf, &mut unacked), Ok(()));
        assert!(unacked.is_empty());

        let refused = |bytes: Bytes| {
            let mut unacked: Unacked<Outbound> = Unacked::new(5, 10, 1 << 20);
            unacked.push(out(0), 1);
            take_acks(&mut BytesMut::from(&bytes[..]), &mut unacked).map_err(|(label, _)| label)
        };
        let ahead = encode(&Frame::Ack { epoch: 5, seq: 2 }).expect("encodes");
        assert_eq!(refused(ahead), Err("protocol"));
        let connected = encode(&Frame::Connected {
            client_id: "c".into(),
            clean_start: true,
            at: 1,
        })
        .expect("encodes");
        assert_eq!(refused(connected), Err("protocol"));
        assert_eq!(
            refused(Bytes::from_static(b"\x00\x00\x00\x01\x63")),
            Err("unknown_kind")
        );
        assert_eq!(
            refused(Bytes::from_static(b"\x00\x00\x10\x00\x11")),
            Err("too_large")
        );
        assert_eq!(
            refused(Bytes::from_static(b"\x00\x00\x00\x02\x11\x00")),
            Err("malformed")
        );
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
