//! Sees every PUBLISH that this node's own clients send, on its way into rumqttd.
//!
//! rumqttd's `Server` takes the MQTT codec as a type parameter; wrapping it is the one place
//! where a publish is known to come from a local client (a message injected from a peer never
//! passes through a codec), so origin needs no marker and a loop is impossible. The retain
//! flag is still set here; rumqttd clears it on live forwards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    ConnectReturnCode, DisconnectReasonCode, Error, Packet, Protocol, Publish, PublishProperties,
};

use crate::auth::Auth;
use crate::durable::Durable;
use crate::mesh::frame::{MeshPublish, MeshSubscription, MeshWill, MsgId, PkidEvent};
use crate::mesh::Mesh;
use crate::replica::Tag;

/// Copies the MQTT 5 properties a publish and a last will share into a mesh frame: rumqttd
/// has one property type for each, with the same fields.
macro_rules! copy_props {
    ($m:expr, $p:expr) => {{
        $m.payload_format_indicator = $p.payload_format_indicator;
        $m.message_expiry_interval = $p.message_expiry_interval;
        $m.response_topic = $p.response_topic.clone();
        $m.correlation_data = $p.correlation_data.clone();
        $m.user_properties = $p.user_properties.clone();
        $m.content_type = $p.content_type.clone();
    }};
}

/// The other way: takes a mesh frame's MQTT 5 properties out as rumqttd's (`None` when it has
/// none), for a message that enters the router from a peer.
pub(crate) fn take_properties(m: &mut MeshPublish) -> Option<PublishProperties> {
    let any = m.payload_format_indicator.is_some()
        || m.message_expiry_interval.is_some()
        || m.response_topic.is_some()
        || m.correlation_data.is_some()
        || !m.user_properties.is_empty()
        || m.content_type.is_some();
    any.then(|| PublishProperties {
        payload_format_indicator: m.payload_format_indicator,
        message_expiry_interval: m.message_expiry_interval,
        response_topic: m.response_topic.take(),
        correlation_data: m.correlation_data.take(),
        user_properties: std::mem::take(&mut m.user_properties),
        content_type: m.content_type.take(),
        ..PublishProperties::default()
    })
}

/// Client connections of one node, counted here so rumqttd's router never has to refuse one:
/// its refusal ("no space for new connection") sends no CONNACK and leaves the client waiting
/// for one. (It also left a stale will handler that made the next CONNECT with that client ID
/// panic, rumqtt issue #1062; that part is fixed in the vendored rumqttd.)
pub(crate) struct ConnLimit {
    active: AtomicUsize,
    max: usize,
}

impl ConnLimit {
    pub(crate) fn new(max: usize) -> Arc<ConnLimit> {
        Arc::new(ConnLimit {
            active: AtomicUsize::new(0),
            max,
        })
    }
}

pub(crate) struct Tap<P> {
    inner: P,
    mesh: Arc<Mesh>,
    /// MQTT 5 topic aliases of this connection (each connection gets its own clone).
    aliases: HashMap<u16, Bytes>,
    limit: Arc<ConnLimit>,
    /// This clone holds one slot of `limit` (set at CONNECT, released on drop).
    counted: bool,
    /// The codec is MQTT 3.1.1: drop MQTT 5 properties before writing (see [`v4_safe`]).
    strip_properties: bool,
    /// The client's last will and its delay, sent to the peers if the connection ends without
    /// DISCONNECT (rumqttd publishes it locally; peers would otherwise never see it).
    will: Option<(MeshPublish, u32)>,
    /// The node's ACL (`None`: nothing is checked) and who this connection is.
    auth: Option<Arc<Auth>>,
    /// Where retained PUBLISHes go to be written to the HA servers (issue 18; `None`: off).
    durable: Option<Arc<Durable>>,
    /// The CONNECT's Client Identifier; empty when the client left the choice to the broker
    /// (see `assigned`).
    client_id: String,
    /// The ID rumqttd assigned a CONNECT with an empty one (the CONNACK's Assigned Client
    /// Identifier): the session's name on every node, its replicas' too (MQTT-3.1.3-6).
    assigned: std::sync::OnceLock<String>,
    username: Option<String>,
    /// The CONNECT's Clean Start and Session Expiry Interval (3.1.1: 0 with a clean session,
    /// never without): the will waits for the shorter of its delay and the session.
    clean_start: bool,
    session_expiry: u32,
    /// The mesh's registration of this connection, set when a successful CONNACK went out
    /// (0: not accepted): only then is the will armed (a refused login must not leave a will
    /// behind that reaches every node).
    registration: AtomicU64,
    /// When the mesh registered this connection's CONNECT (0: none yet); see
    /// `Mesh::client_connecting`.
    connect_at: u64,
    /// What the PUBLISH just read waits for before its PUBACK / PUBREC (issue 12), until the
    /// link takes it (`Protocol::ack_wait`).
    ack_wait: Option<rumqttd::protocol::AckWait>,
    /// Session replicas (issue 12): the session's expiry as replicated (0: the session ends
    /// with the connection, nothing is replicated; 3.1.1 Clean Session 0: never), a new one
    /// its DISCONNECT set, and what the codec must remember between packets.
    persist: u32,
    disconnect_expiry: Option<u32>,
    replicated: Mutex<Replicated>,
    /// The listener's name and the node's connection listing (`/api/clients`), and the
    /// client's address (the socket's, or what a trusted PROXY header claimed; issue 15).
    listener: &'static str,
    clients: Option<Arc<crate::clients::Clients>>,
    peer: Option<std::net::SocketAddr>,
}

/// What a connection's codec remembers for the replicas: the tag of each QoS 1/2 message
/// delivered and not yet acknowledged, by packet id, and each SUBSCRIBE until its SUBACK.
#[derive(Default)]
struct Replicated {
    delivered: HashMap<u16, MsgId>,
    subscribing: HashMap<u16, Vec<MeshSubscription>>,
}

impl<P: Clone> Clone for Tap<P> {
    /// rumqttd clones the codec for each accepted connection: the clone starts fresh.
    fn clone(&self) -> Self {
        Tap {
            inner: self.inner.clone(),
            mesh: self.mesh.clone(),
            aliases: HashMap::new(),
            limit: self.limit.clone(),
            counted: false,
            strip_properties: self.strip_properties,
            will: None,
            auth: self.auth.clone(),
            durable: self.durable.clone(),
            client_id: String::new(),
            assigned: std::sync::OnceLock::new(),
            username: None,
            clean_start: true,
            session_expiry: 0,
            registration: AtomicU64::new(0),
            connect_at: 0,
            ack_wait: None,
            persist: 0,
            disconnect_expiry: None,
            replicated: Mutex::new(Replicated::default()),
            listener: self.listener,
            clients: self.clients.clone(),
            peer: None,
        }
    }
}

/// rumqttd 0.20's 3.1.1 codec panics (`unreachable!`) when asked to write a packet that carries
/// MQTT 5 properties, which happens whenever a 5.0 client's publish with properties reaches a
/// 3.1.1 subscriber. 3.1.1 has no properties: dropping them is the correct translation.
fn v4_safe(packet: Packet) -> Packet {
    match packet {
        Packet::ConnAck(p, Some(_)) => Packet::ConnAck(p, None),
        Packet::Publish(p, Some(_)) => Packet::Publish(p, None),
        Packet::PubAck(p, Some(_)) => Packet::PubAck(p, None),
        Packet::Subscribe(p, Some(_)) => Packet::Subscribe(p, None),
        Packet::SubAck(p, Some(_)) => Packet::SubAck(p, None),
        Packet::PubRec(p, Some(_)) => Packet::PubRec(p, None),
        Packet::PubRel(p, Some(_)) => Packet::PubRel(p, None),
        Packet::PubComp(p, Some(_)) => Packet::PubComp(p, None),
        Packet::Unsubscribe(p, Some(_)) => Packet::Unsubscribe(p, None),
        Packet::UnsubAck(p, Some(_)) => Packet::UnsubAck(p, None),
        Packet::Disconnect(p, Some(_)) => Packet::Disconnect(p, None),
        other => other,
    }
}

impl<P> Drop for Tap<P> {
    fn drop(&mut self) {
        if self.counted {
            self.limit.active.fetch_sub(1, Ordering::AcqRel);
        }
        // The connection ended; without DISCONNECT its will fires on every node, when the
        // Will Delay Interval or the session ends, whichever first, unless the client
        // connects again (here or on another node) before (MQTT-3.1.3-9).
        let registration = self.registration.load(Ordering::Acquire);
        if registration == 0 && self.connect_at != 0 {
            self.mesh
                .client_not_connected(&self.client_id, self.connect_at);
        }
        if registration != 0 {
            if let Some(r) = self.mesh.replication.get() {
                let will_kept = self.will.is_some();
                r.disconnected(self.id(), registration, self.disconnect_expiry, will_kept);
            }
        }
        if let (true, Some(c)) = (registration != 0, &self.clients) {
            c.gone(registration);
        }
        if registration != 0 {
            let session = self.session_expiry;
            let will = self.will.take().map(|(w, delay)| (w, delay.min(session)));
            self.mesh.client_gone(self.id(), registration, will);
        }
    }
}

impl<P> Tap<P> {
    /// The session's client ID: the CONNECT's, or the one the broker assigned it.
    fn id(&self) -> &str {
        self.assigned.get().map_or(&self.client_id, |a| a)
    }

    /// The client acknowledged (PUBACK, PUBREC) the delivery with packet id `pkid`.
    fn client_has(&self, pkid: u16) -> bool {
        let Some(id) = self.replicated().delivered.remove(&pkid) else {
            return false;
        };
        if let Some(r) = self.mesh.replication.get() {
            r.acked(self.id(), id);
        }
        true
    }

    /// A packet id of a persistent session's deliveries changed (sent, PUBREC'd, completed):
    /// its replicas follow, so a restore resends under the same ids (issue 12).
    fn pkid(&self, event: PkidEvent) {
        if self.persist == 0 {
            return;
        }
        if let Some(r) = self.mesh.replication.get() {
            r.pkid(self.id(), event);
        }
    }

    /// A SUBACK goes out: the filters it granted are the persistent session's now.
    fn subscribed(&self, ack: &rumqttd::protocol::SubAck) {
        use rumqttd::protocol::{QoS, SubscribeReasonCode as C};
        let Some(mut subs) = self.replicated().subscribing.remove(&ack.pkid) else {
            return;
        };
        let granted: Vec<MeshSubscription> = subs
            .drain(..)
            .zip(&ack.return_codes)
            .filter_map(|(mut s, code)| {
                s.qos = match code {
                    C::QoS0 | C::Success(QoS::AtMostOnce) => 0,
                    C::QoS1 | C::Success(QoS::AtLeastOnce) => 1,
                    C::QoS2 | C::Success(QoS::ExactlyOnce) => 2,
                    _ => return None,
                };
                Some(s)
            })
            .collect();
        if let (false, Some(r)) = (granted.is_empty(), self.mesh.replication.get()) {
            r.subscribed(self.id(), granted);
        }
    }
}

/// Client IDs rumqttd's router refuses (see [`ConnLimit`] for why they are refused here first).
fn client_id_refused(id: &str) -> bool {
    id.contains(['+', '$', '#', '/'])
}

impl<P> Tap<P> {
    /// `v4`: the inner codec is MQTT 3.1.1.
    pub(crate) fn new(
        inner: P,
        mesh: Arc<Mesh>,
        limit: Arc<ConnLimit>,
        auth: Option<Arc<Auth>>,
        durable: Option<Arc<Durable>>,
        v4: bool,
    ) -> Self {
        Tap {
            inner,
            mesh,
            aliases: HashMap::new(),
            limit,
            counted: false,
            strip_properties: v4,
            will: None,
            auth,
            durable,
            client_id: String::new(),
            assigned: std::sync::OnceLock::new(),
            username: None,
            clean_start: true,
            session_expiry: 0,
            registration: AtomicU64::new(0),
            connect_at: 0,
            ack_wait: None,
            persist: 0,
            disconnect_expiry: None,
            replicated: Mutex::new(Replicated::default()),
            listener: "mqtt",
            clients: None,
            peer: None,
        }
    }

    /// This codec's listener (`mqtt`, `mqtts_v5`, ...) and the listing its connections join.
    pub(crate) fn listed(
        mut self,
        listener: &'static str,
        clients: Arc<crate::clients::Clients>,
    ) -> Self {
        self.listener = listener;
        self.clients = Some(clients);
        self
    }

    fn replicated(&self) -> std::sync::MutexGuard<'_, Replicated> {
        self.replicated.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a CONNECT, or refuses it before rumqttd's router could.
    fn admit(&mut self, client_id: &str) -> Result<(), Error> {
        if client_id_refused(client_id) {
            tracing::info!(client_id, peer = ?self.peer, "CONNECT refused: client ID with + $ # or /");
            return Err(Error::IncorrectPacketFormat);
        }
        if !self.counted {
            let before = self.limit.active.fetch_add(1, Ordering::AcqRel);
            if before >= self.limit.max {
                self.limit.active.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(
                    client_id,
                    peer = ?self.peer,
                    max = self.limit.max,
                    "CONNECT refused: max_connections reached"
                );
                return Err(Error::IncorrectPacketFormat);
            }
            self.counted = true;
        }
        Ok(())
    }

    /// `qos`: the publication's, from the fixed header; `tag`: its cluster-wide id (issue 12),
    /// already among its properties.
    fn forward(
        &mut self,
        publish: &Publish,
        qos: u8,
        props: Option<&PublishProperties>,
        tag: Option<Tag>,
    ) {
        let mut topic = publish.topic.clone();
        if let Some(alias) = props.and_then(|p| p.topic_alias) {
            if topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => topic = t.clone(),
                    None => return, // rumqttd refuses it too
                }
            } else {
                self.aliases.insert(alias, topic.clone());
            }
        }
        if topic.is_empty() || topic.iter().any(|b| *b == b'+' || *b == b'#') {
            return; // invalid for a publish; rumqttd disconnects the client
        }
        // rumqttd's router refuses it locally with the same decision (and acknowledges it).
        if let Some(auth) = &self.auth {
            let t = String::from_utf8_lossy(&topic);
            if !auth.may_publish(self.id(), self.username.as_deref(), &t) {
                return;
            }
        }
        // Here the message enters the cluster: the one place to write it through.
        if let (true, Some(d)) = (publish.retain, &self.durable) {
            d.retained(&topic, &publish.payload, qos, props);
        }
        let build = || {
            let mut m = MeshPublish {
                topic,
                payload: publish.payload.clone(),
                retain: publish.retain,
                qos,
                ..MeshPublish::default()
            };
            if let Some(p) = props {
                copy_props!(m, p);
            }
            m
        };
        // A tagged message (there are peers) is offered to the replicas held here too.
        if let (Some(tag), Some(r)) = (tag, self.mesh.replication.get()) {
            let m = build();
            r.record(tag, &m);
            self.ack_wait = self.mesh.forward_local(|| m);
            return;
        }
        // Built only if some peer is there to take it.
        self.ack_wait = self.mesh.forward_local(build);
    }
}

impl<P: Protocol> Protocol for Tap<P> {
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        // The fixed header of the packet about to be read: QoS and DUP are not public on
        // rumqttd's `Publish`.
        let header = stream.first().copied().unwrap_or(0);
        let mut packet = self.inner.read_mut(stream, max_size)?;
        match &packet {
            Packet::Connect(connect, props, will, will_props, login) => {
                self.admit(&connect.client_id)?;
                if self.connect_at != 0 {
                    // a second CONNECT is a protocol error rumqttd refuses; forget the first
                    self.mesh
                        .client_not_connected(&self.client_id, self.connect_at);
                }
                self.client_id = connect.client_id.clone();
                self.connect_at = self.mesh.client_connecting(&self.client_id);
                self.clean_start = connect.clean_session;
                self.session_expiry = props
                    .as_ref()
                    .and_then(|p| p.session_expiry_interval)
                    .unwrap_or(0);
                self.username = login.as_ref().map(|l| l.username.clone());
                // 3.1.1: Clean Session 0 keeps the session until the client ends it.
                self.persist = match (self.strip_properties, self.clean_start) {
                    (true, true) => 0,
                    (true, false) => u32::MAX,
                    (false, _) => self.session_expiry,
                };
                self.will = will.as_ref().map(|w| {
                    let mut m = MeshPublish {
                        topic: w.topic.clone(),
                        payload: w.message.clone(),
                        retain: w.retain,
                        qos: w.qos as u8,
                        ..MeshPublish::default()
                    };
                    let mut delay = 0;
                    if let Some(p) = will_props {
                        delay = p.delay_interval.unwrap_or(0);
                        copy_props!(m, p);
                    }
                    (m, delay)
                });
            }
            Packet::Disconnect(_, props) => {
                self.will = None;
                self.disconnect_expiry = props.as_ref().and_then(|p| p.session_expiry_interval);
            }
            // Session replicas (issue 12): what the client has and what it subscribes to.
            Packet::PubAck(ack, _) => {
                self.client_has(ack.pkid);
            }
            // The guard takes the acknowledgement; a PUBREL is owed for a tracked delivery.
            Packet::PubRec(rec, _) if self.client_has(rec.pkid) => {
                self.pkid(PkidEvent::Released(rec.pkid));
            }
            Packet::PubComp(comp, _) => self.pkid(PkidEvent::Completed(comp.pkid)),
            Packet::Subscribe(sub, _) if self.persist != 0 => {
                let subs = sub
                    .filters
                    .iter()
                    .map(|f| MeshSubscription {
                        filter: f.path.clone(),
                        qos: f.qos as u8,
                        nolocal: f.nolocal,
                        preserve_retain: f.preserve_retain,
                    })
                    .collect();
                self.replicated().subscribing.insert(sub.pkid, subs);
            }
            Packet::Unsubscribe(unsub, _) if self.persist != 0 => {
                if let Some(r) = self.mesh.replication.get() {
                    r.unsubscribed(self.id(), &unsub.filters);
                }
            }
            _ => {}
        }
        if let Packet::Publish(publish, props) = &mut packet {
            self.ack_wait = None;
            let qos = (header >> 1) & 0b11;
            let dup = header & 0b1000 != 0;
            // A QoS 2 retransmission is delivered once by rumqttd; forward it once too.
            if !(qos == 2 && dup) {
                let tag = match (qos, self.mesh.replication.get()) {
                    (1 | 2, Some(r)) => r.tag_local(self.id(), props),
                    _ => None,
                };
                self.forward(publish, qos, props.as_ref(), tag);
            }
        }
        Ok(packet)
    }

    fn ack_wait(&mut self) -> Option<rumqttd::protocol::AckWait> {
        self.ack_wait.take()
    }

    fn empty_client_id_needs_clean_session(&self) -> bool {
        self.inner.empty_client_id_needs_clean_session()
    }

    fn peer(&mut self, addr: std::net::SocketAddr) {
        self.peer = Some(addr);
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, Error> {
        let packet = match packet {
            Packet::ConnAck(mut ack, props) => {
                if ack.code == ConnectReturnCode::Success
                    && self.registration.load(Ordering::Acquire) == 0
                {
                    if let Some(id) = props
                        .as_ref()
                        .and_then(|p| p.assigned_client_identifier.clone())
                        .filter(|_| self.client_id.is_empty())
                    {
                        let _ = self.assigned.set(id);
                    }
                    let r =
                        self.mesh
                            .client_connected(self.id(), self.clean_start, self.connect_at);
                    self.registration.store(r, Ordering::Release);
                    if let Some(c) = &self.clients {
                        c.connected(r, self.id(), self.listener, self.peer);
                    }
                    if let Some(repl) = self.mesh.replication.get() {
                        let will = self.will.as_ref().map(|(publish, delay)| MeshWill {
                            publish: publish.clone(),
                            delay: *delay,
                        });
                        repl.connected(self.id(), self.clean_start, self.persist, r, will);
                    }
                }
                // A refused login: 5.0's 0x86 Bad User Name or Password is, in 3.1.1,
                // 0x05 Not authorized, the code mosquitto sends (3.1.1's 0x04 means the
                // user name or password is malformed).
                if self.strip_properties && ack.code == ConnectReturnCode::BadUserNamePassword {
                    ack.code = ConnectReturnCode::NotAuthorized;
                }
                Packet::ConnAck(ack, props)
            }
            Packet::Publish(p, mut props) => {
                // The cluster-wide tag never reaches a client; the replicas learn it was
                // delivered with this packet id (issue 12).
                if let Some(tag) = props
                    .as_mut()
                    .and_then(|x| Tag::take(&mut x.user_properties))
                {
                    if p.pkid() != 0 {
                        self.replicated().delivered.insert(p.pkid(), tag.id);
                        self.pkid(PkidEvent::Sent {
                            id: tag.id,
                            pkid: p.pkid(),
                        });
                    }
                    if props
                        .as_ref()
                        .is_some_and(|x| *x == PublishProperties::default())
                    {
                        props = None;
                    }
                }
                Packet::Publish(p, props)
            }
            Packet::SubAck(ack, props) => {
                self.subscribed(&ack);
                Packet::SubAck(ack, props)
            }
            other => other,
        };
        if self.strip_properties {
            // A connection taken over by another (issue 12): MQTT 3.1.1 has no DISCONNECT
            // from the server; the connection is just closed (MQTT-3.1.4-2).
            if let Packet::Disconnect(d, _) = &packet {
                if d.reason_code == DisconnectReasonCode::SessionTakenOver {
                    return Ok(0);
                }
            }
            return self.inner.write(v4_safe(packet), write);
        }
        self.inner.write(packet, write)
    }
}
