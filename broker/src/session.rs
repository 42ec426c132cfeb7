//! One live session per client ID across the cluster, and the session moves with its client
//! (issue 12).
//!
//! - **Takeover.** Every successful CONNACK here is announced to the peers
//!   ([`Frame::Connected`], sent by the mesh). A peer with a live connection of that client ID
//!   closes it with DISCONNECT 0x8E Session taken over (3.1.1: just closes it; MQTT-3.1.4-3,
//!   -2), and after a Clean Start 1 also drops the session it kept (MQTT-3.1.2-4).
//! - **Migration.** A client that connects here with Clean Start 0 (3.1.1: Clean Session 0)
//!   makes this node ask every peer whose link is up for the session
//!   ([`Frame::SessionRequest`]) before its CONNACK, waiting at most [`ASK_TIMEOUT`]. The peer
//!   that has it, live or saved, closes the live connection (0x8E), takes the session out of
//!   its router and sends it ([`Frame::Session`]: subscriptions with their options, the expiry
//!   left, the QoS 1/2 messages the client has not acknowledged, sent ones with their packet
//!   ids, pending PUBRELs); the others answer "none". This node installs it in its router,
//!   which resumes it for the CONNECT: Session Present 1, the subscriptions live without a
//!   SUBSCRIBE, the messages delivered (again with DUP 1 where they were sent before).
//!
//! - **Restore.** When no peer has the session (its node died, or does not answer in time),
//!   the copies of it are installed instead: this node's replica and the ones the peers sent
//!   with their answers ([`Frame::SessionReplica`]; see [`crate::replication`]).
//!
//! The session travels as plain data (no node's log positions), so a replica keeps the same
//! [`MeshSession`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, Opts};
use rumqttd::protocol::{valid_filter, valid_topic};
use rumqttd::{ExportedMessage, ExportedSubscription, SessionControl, SessionExport, SessionHook};
use tokio::sync::oneshot;

use crate::mesh::frame::{Frame, MeshPublish, MeshSession, MeshSubscription};
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::replication::Replication;

/// How long a CONNECT with Clean Start 0 waits for the peers' answers before it goes on with
/// the session this node has (or a new one).
pub(crate) const ASK_TIMEOUT: Duration = Duration::from_millis(300);
/// How much longer a node whose replica of the session is dormant waits for a peer that queues
/// its messages (see [`crate::replica::ranked`]).
const HOLDER_TIMEOUT: Duration = Duration::from_secs(2);
/// CONNECTs waiting for answers at once; beyond it a CONNECT does not ask (counted: `busy`).
const MAX_ASKING: usize = 10_000;
/// Time allowed for this node's router to take a session out.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(2);

struct SessionMetrics {
    takeovers: IntCounter,
    moved: IntCounterVec,
    requests: IntCounterVec,
    dropped: IntCounterVec,
}

impl SessionMetrics {
    fn new(metrics: &Metrics) -> Result<SessionMetrics, prometheus::Error> {
        let m = SessionMetrics {
            takeovers: IntCounter::new(
                "mqlb_session_takeovers_total",
                "Live client connections of this node closed (MQTT 5: DISCONNECT 0x8E) because their client ID connected on another node.",
            )?,
            moved: IntCounterVec::new(
                Opts::new(
                    "mqlb_sessions_moved_total",
                    "Sessions that moved with their client: in (installed here), out (sent to the node the client connected to).",
                ),
                &["direction"],
            )?,
            requests: IntCounterVec::new(
                Opts::new(
                    "mqlb_session_requests_total",
                    "CONNECTs with Clean Start 0 that asked the peers for their session, by result: found, none, timeout (not every peer answered in time), busy (too many waiting; not asked).",
                ),
                &["result"],
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "mqlb_session_dropped_total",
                    "What a moving session lost: message (a pending message beyond the size bound, counted by the sender), late (a session that arrived after its CONNECT stopped waiting), unsent (a session kept here as it could not be sent).",
                ),
                &["what"],
            )?,
        };
        metrics.register(Box::new(m.takeovers.clone()))?;
        metrics.register(Box::new(m.moved.clone()))?;
        metrics.register(Box::new(m.requests.clone()))?;
        metrics.register(Box::new(m.dropped.clone()))?;
        Ok(m)
    }
}

/// A CONNECT waiting for the peers' answers.
struct Asking {
    client_id: String,
    /// Peers asked that have not answered.
    peers: HashSet<String>,
    done: Option<oneshot::Sender<()>>,
    /// A peer sent the session itself (installed then).
    found: bool,
    /// Copies of it the peers hold as replicas, restored if none has the session.
    replicas: Vec<MeshSession>,
}

/// This node's side of sessions across the cluster (see the module).
pub(crate) struct Sessions {
    control: SessionControl,
    mesh: Weak<Mesh>,
    replication: Arc<Replication>,
    metrics: SessionMetrics,
    asking: Mutex<HashMap<u64, Asking>>,
    next_request: AtomicU64,
    /// Bytes of pending messages a session sent to a peer may carry (the rest are dropped and
    /// counted): what fits in a mesh frame.
    budget: usize,
}

/// Why a peer's session frame is refused (the link is closed); the `reason` of
/// `mqlb_mesh_rejected_total`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionFrameError {
    #[error("an answer to a request this node never sent, or from a peer it did not ask")]
    Unexpected,
    #[error("a session for another client ID than the one asked for")]
    WrongClient,
    #[error("invalid session: {0}")]
    Invalid(&'static str),
}

impl SessionFrameError {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            SessionFrameError::Unexpected | SessionFrameError::WrongClient => "protocol",
            SessionFrameError::Invalid(_) => "malformed",
        }
    }
}

impl Sessions {
    pub(crate) fn new(
        control: SessionControl,
        mesh: &Arc<Mesh>,
        replication: Arc<Replication>,
        budget: usize,
    ) -> Result<Arc<Sessions>, prometheus::Error> {
        Ok(Arc::new(Sessions {
            control,
            mesh: Arc::downgrade(mesh),
            replication,
            metrics: SessionMetrics::new(&mesh.metrics)?,
            asking: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            budget,
        }))
    }

    fn asking(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Asking>> {
        self.asking.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A peer says `client_id` connected there (its CONNACK went out): a live connection of it
    /// here is taken over; `clean_start` ended the session, so one kept here is dropped.
    pub(crate) fn peer_connected(&self, mesh: &Mesh, client_id: &str, clean_start: bool) {
        if mesh.has_live(client_id) {
            self.metrics.takeovers.inc();
        }
        if !self.control.take_over(client_id, clean_start) {
            tracing::warn!(
                client_id,
                "router queue full: a connection taken over on another node stays open"
            );
        }
        self.replication.connected_elsewhere(client_id);
        if clean_start {
            // the session ended (MQTT-3.1.2-4): its copies and its replicas go
            self.replication.ended(client_id);
        } else {
            // the peer owns it now (a saved one left here, had it not been asked for, is stale)
            self.replication.left(client_id);
        }
    }

    /// Installs the copies of `client_id`'s session (this node's replica, `copies` from the
    /// peers), if there are any, before its CONNACK.
    async fn restore(&self, client_id: String, copies: Vec<MeshSession>) {
        if copies.is_empty() && !self.replication.holds(&client_id) {
            return;
        }
        let stored = self.replication.stored_queue(&client_id).await;
        let r = self.replication.clone();
        let _ = tokio::task::spawn_blocking(move || r.restore(&client_id, copies, stored)).await;
    }

    /// Before the CONNACK of a CONNECT with Clean Start 0: asks the peers for the session and
    /// installs the one that comes back, waiting at most [`ASK_TIMEOUT`].
    async fn fetch(self: Arc<Self>, client_id: String, clean_start: bool) {
        if clean_start || client_id.is_empty() {
            return;
        }
        let Some(mesh) = self.mesh.upgrade() else {
            return;
        };
        let peers: HashSet<String> = mesh
            .peers()
            .iter()
            .filter(|p| p.is_up())
            .map(|p| p.id.clone())
            .collect();
        if peers.is_empty() {
            drop(mesh);
            return self.restore(client_id, Vec::new()).await;
        }
        self.replication.prepare(&client_id);
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (done, mut rx) = oneshot::channel();
        {
            let mut asking = self.asking();
            if asking.len() >= MAX_ASKING {
                self.metrics.requests.with_label_values(&["busy"]).inc();
                return;
            }
            // Registered before asking: an answer may come back at once.
            asking.insert(
                request,
                Asking {
                    client_id: client_id.clone(),
                    peers: peers.clone(),
                    done: Some(done),
                    found: false,
                    replicas: Vec::new(),
                },
            );
        }
        let frame = Frame::SessionRequest {
            request,
            client_id: client_id.clone(),
        };
        for peer in &peers {
            if let Err(why) = mesh.send_to(peer, &frame) {
                tracing::debug!(client_id, peer, why, "session request not sent");
                self.answered(request, peer);
            }
        }
        drop(mesh);
        let late = tokio::time::timeout(ASK_TIMEOUT, &mut rx).await.is_err();
        // This node's replica of the session is dormant (the meta alone) and a peer that queues
        // its messages has not answered (a reconnect storm): its copy is worth waiting for, as
        // without it what it queued is lost.
        let waiting: Vec<String> = match self.asking().get(&request) {
            Some(a) if late => a.peers.iter().cloned().collect(),
            _ => Vec::new(),
        };
        if late
            && !(self.replication.awaits_copy(&client_id, &waiting)
                && tokio::time::timeout(HOLDER_TIMEOUT, &mut rx).await.is_ok())
        {
            self.metrics.requests.with_label_values(&["timeout"]).inc();
            tracing::warn!(
                client_id,
                "not every peer said within {ASK_TIMEOUT:?} whether it has the session"
            );
        }
        let asked = self.asking().remove(&request);
        if let Some(a) = asked.filter(|a| !a.found) {
            self.restore(client_id, a.replicas).await;
        }
    }

    /// `peer` answered `request` (or could not be asked): the CONNECT goes on when every peer
    /// asked has answered.
    fn answered(&self, request: u64, peer: &str) {
        let mut asking = self.asking();
        if let Some(a) = asking.get_mut(&request) {
            a.peers.remove(peer);
            if a.peers.is_empty() {
                if let Some(done) = a.done.take() {
                    self.metrics.requests.with_label_values(&["none"]).inc();
                    let _ = done.send(());
                }
            }
        }
    }

    /// A peer asks for the session of `client_id`: it is taken out of the router (its live
    /// connection closed) and sent back, or "none". A session that cannot be sent stays here.
    pub(crate) fn on_request(self: &Arc<Self>, peer: &str, request: u64, client_id: String) {
        let (sessions, peer) = (self.clone(), peer.to_owned());
        tokio::spawn(async move {
            let Some(mesh) = sessions.mesh.upgrade() else {
                return;
            };
            let live = mesh.has_live(&client_id);
            let export = tokio::time::timeout(
                EXPORT_TIMEOUT,
                sessions.control.export(&client_id, sessions.budget),
            )
            .await
            .ok()
            .flatten();
            if live {
                sessions.metrics.takeovers.inc();
            }
            let Some(export) = export else {
                // No session here: the replica, if this node holds one, or "none".
                let none = match sessions.replication.copy(&client_id, &peer) {
                    Some(copy) => Frame::SessionReplica {
                        request,
                        session: Box::new(copy),
                    },
                    None => Frame::Session {
                        request,
                        session: None,
                    },
                };
                if let Err(why) = mesh.send_to(&peer, &none) {
                    tracing::debug!(client_id, peer, why, "session answer not sent");
                }
                return;
            };
            let dropped = export.dropped;
            let session = to_mesh(export);
            // What the client acknowledged here reaches the peer before its session.
            sessions.replication.send_acks();
            let frame = Frame::Session {
                request,
                session: Some(Box::new(session.clone())),
            };
            match mesh.send_to(&peer, &frame) {
                Ok(()) => {
                    sessions.replication.left(&client_id);
                    sessions.metrics.moved.with_label_values(&["out"]).inc();
                    sessions
                        .metrics
                        .dropped
                        .with_label_values(&["message"])
                        .inc_by(dropped as u64);
                    tracing::debug!(
                        client_id,
                        peer,
                        "session sent to the node its client connected to"
                    );
                }
                Err(why) => {
                    // Kept here: the client gets a new session there, this one stays for a
                    // later connection here (or its expiry).
                    sessions
                        .metrics
                        .dropped
                        .with_label_values(&["unsent"])
                        .inc();
                    tracing::warn!(client_id, peer, why, "session could not be sent; kept here");
                    let _ = mesh.send_to(
                        &peer,
                        &Frame::Session {
                            request,
                            session: None,
                        },
                    );
                    if let Ok(back) = from_mesh(session) {
                        sessions.control.import(back).await;
                    }
                }
            }
        });
    }

    /// `peer` answered `request` with `session`. Checked before anything is installed: an
    /// answer nobody asked for, or a session of another client, closes the link.
    pub(crate) async fn on_session(
        &self,
        peer: &str,
        request: u64,
        session: Option<Box<MeshSession>>,
    ) -> Result<(), SessionFrameError> {
        if request == 0 || request >= self.next_request.load(Ordering::Relaxed) {
            return Err(SessionFrameError::Unexpected);
        }
        let pending = {
            let asking = self.asking();
            match asking.get(&request) {
                // Asked, and the CONNECT stopped waiting: too late for it.
                None => {
                    if let Some(s) = &session {
                        self.metrics.dropped.with_label_values(&["late"]).inc();
                        tracing::warn!(
                            peer,
                            client_id = s.client_id,
                            "a session arrived after its CONNECT stopped waiting; dropped"
                        );
                    }
                    return Ok(());
                }
                Some(a) if !a.peers.contains(peer) => return Err(SessionFrameError::Unexpected),
                Some(a) => a.client_id.clone(),
            }
        };
        let Some(session) = session else {
            self.answered(request, peer);
            return Ok(());
        };
        if session.client_id != pending {
            return Err(SessionFrameError::WrongClient);
        }
        // Checked before anything is installed.
        from_mesh((*session).clone())?;
        // In the router before the CONNECT: the link sends that after `fetch` returns.
        let r = self.replication.clone();
        let adopted = tokio::task::spawn_blocking(move || r.adopt(*session)).await;
        if adopted.unwrap_or(false) {
            self.metrics.moved.with_label_values(&["in"]).inc();
        }
        let mut asking = self.asking();
        if let Some(a) = asking.get_mut(&request) {
            a.found = true;
            if let Some(done) = a.done.take() {
                self.metrics.requests.with_label_values(&["found"]).inc();
                let _ = done.send(());
            }
        }
        Ok(())
    }

    /// `peer` answered `request` with its replica of the session: kept (checked) for the
    /// restore, should no peer have the session itself.
    pub(crate) fn on_replica(
        &self,
        peer: &str,
        request: u64,
        session: MeshSession,
    ) -> Result<(), SessionFrameError> {
        if request == 0 || request >= self.next_request.load(Ordering::Relaxed) {
            return Err(SessionFrameError::Unexpected);
        }
        {
            let mut asking = self.asking();
            let Some(a) = asking.get_mut(&request) else {
                return Ok(()); // the CONNECT stopped waiting
            };
            if !a.peers.contains(peer) {
                return Err(SessionFrameError::Unexpected);
            }
            if session.client_id != a.client_id {
                return Err(SessionFrameError::WrongClient);
            }
            from_mesh(session.clone())?;
            a.replicas.push(session);
        }
        self.answered(request, peer);
        Ok(())
    }
}

/// The listeners' hook: a CONNECT waits for [`Sessions::fetch`] before its CONNACK.
pub(crate) struct Hook(pub Arc<Sessions>);

impl SessionHook for Hook {
    fn before_connect(
        &self,
        client_id: &str,
        clean_start: bool,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(self.0.clone().fetch(client_id.to_owned(), clean_start))
    }
}

pub(crate) fn to_mesh(e: SessionExport) -> MeshSession {
    MeshSession {
        client_id: e.client_id,
        expiry: e.expiry,
        last_pkid: e.last_pkid,
        dropped: u32::try_from(e.dropped).unwrap_or(u32::MAX),
        subscriptions: e
            .subscriptions
            .into_iter()
            .map(|s| MeshSubscription {
                filter: s.filter,
                qos: s.qos,
                nolocal: s.nolocal,
                preserve_retain: s.preserve_retain,
            })
            .collect(),
        pubrels: e.pubrels,
        pending: e
            .pending
            .into_iter()
            .map(|m| {
                let mut p = MeshPublish {
                    topic: m.topic,
                    payload: m.payload,
                    retain: m.retain,
                    qos: m.qos,
                    ..MeshPublish::default()
                };
                if let Some(props) = m.properties {
                    p.payload_format_indicator = props.payload_format_indicator;
                    p.message_expiry_interval = props.message_expiry_interval;
                    p.response_topic = props.response_topic;
                    p.correlation_data = props.correlation_data;
                    p.user_properties = props.user_properties;
                    p.content_type = props.content_type;
                }
                (m.pkid, p)
            })
            .collect(),
    }
}

/// A client ID rumqttd's router takes, from a peer.
pub(crate) fn client_id_ok(id: &str) -> bool {
    !id.is_empty() && !id.contains(['+', '$', '#', '/'])
}

/// A subscription a client could have made (`$share/{ShareName}/{filter}` included), from a
/// peer: none of the router's own `$` logs.
pub(crate) fn subscription_ok(s: &MeshSubscription) -> bool {
    let shared = s
        .filter
        .strip_prefix("$share/")
        .and_then(|r| r.split_once('/'));
    let path = shared.map_or(s.filter.as_str(), |(_, p)| p);
    !path.starts_with('$') && valid_filter(path) && s.qos <= 2
}

/// A peer's session as this node's router takes it, checked: no filter a client could not
/// subscribe to (nor one of the router's own `$` logs), no topic a client could not publish.
pub(crate) fn from_mesh(s: MeshSession) -> Result<SessionExport, SessionFrameError> {
    if !client_id_ok(&s.client_id) {
        return Err(SessionFrameError::Invalid("client id"));
    }
    let mut subscriptions = Vec::with_capacity(s.subscriptions.len());
    for sub in s.subscriptions {
        if !subscription_ok(&sub) {
            return Err(SessionFrameError::Invalid("subscription filter"));
        }
        subscriptions.push(ExportedSubscription {
            filter: sub.filter,
            qos: sub.qos,
            nolocal: sub.nolocal,
            preserve_retain: sub.preserve_retain,
        });
    }
    let mut pending = Vec::with_capacity(s.pending.len());
    for (pkid, mut m) in s.pending {
        let topic =
            std::str::from_utf8(&m.topic).map_err(|_| SessionFrameError::Invalid("topic"))?;
        if !valid_topic(topic) || !(1..=2).contains(&m.qos) {
            return Err(SessionFrameError::Invalid("pending message"));
        }
        let properties = crate::tap::take_properties(&mut m);
        pending.push(ExportedMessage {
            topic: m.topic,
            payload: m.payload,
            qos: m.qos,
            retain: m.retain,
            properties,
            pkid,
        });
    }
    Ok(SessionExport {
        client_id: s.client_id,
        expiry: s.expiry,
        subscriptions,
        pending,
        pubrels: s.pubrels,
        last_pkid: s.last_pkid,
        dropped: s.dropped as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn session() -> MeshSession {
        MeshSession {
            client_id: "c1".into(),
            expiry: 300,
            last_pkid: 4,
            dropped: 0,
            subscriptions: vec![MeshSubscription {
                filter: "$share/g/a/#".into(),
                qos: 1,
                nolocal: true,
                preserve_retain: false,
            }],
            pubrels: vec![2],
            pending: vec![(
                3,
                MeshPublish {
                    topic: Bytes::from_static(b"a/b"),
                    payload: Bytes::from_static(b"x"),
                    qos: 2,
                    content_type: Some("text/plain".into()),
                    ..MeshPublish::default()
                },
            )],
        }
    }

    #[test]
    fn a_session_converts_both_ways() {
        let s = session();
        let back = to_mesh(from_mesh(s.clone()).expect("valid"));
        assert_eq!(back, s);
    }

    #[test]
    fn a_session_a_client_could_not_have_is_refused() {
        let mut s = session();
        s.subscriptions[0].filter = "$mqlb/session/other".into();
        assert!(matches!(from_mesh(s), Err(SessionFrameError::Invalid(_))));
        let mut s = session();
        s.subscriptions[0].filter = "a/#/b".into();
        assert!(matches!(from_mesh(s), Err(SessionFrameError::Invalid(_))));
        let mut s = session();
        s.pending[0].1.topic = Bytes::from_static(b"a/+");
        assert!(matches!(from_mesh(s), Err(SessionFrameError::Invalid(_))));
        let mut s = session();
        s.client_id = "a/b".into();
        assert!(matches!(from_mesh(s), Err(SessionFrameError::Invalid(_))));
    }
}
