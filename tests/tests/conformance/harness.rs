//! The conformance suite's two tools: [`Target`], the same rule run against one mqlb node, a
//! node through the LB, two meshed nodes (publisher on one, subscriber on the other) and
//! mosquitto as the reference; and [`Raw`], a client that writes and reads packets itself so
//! no client library hides what the broker did.
//!
//! The packets are encoded by rumqttc's codec, not rumqttd's: the broker's codec must not be
//! the one that checks it.

#![allow(dead_code)] // each rule module uses its own part of the harness

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::BytesMut;
use mqlb_config::Config;
use mqlb_lb::{Lb, Listeners};
use mqlb_tests::{Cluster, Mosquitto, TempDir};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// MQTT 5 QoS (MQTT 3.1.1 tests use `rumqttc::QoS`).
pub use rumqttc::v5::mqttbytes::QoS;

/// Time allowed for anything that must happen.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// How long a test watches for something that must *not* happen, after it has seen the event
/// that proves the message was routed (the other subscriber got it, the marker arrived).
pub const QUIET: Duration = Duration::from_millis(300);

/// Where a rule is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// One mqlb node, clients connected directly.
    Node,
    /// Two mqlb nodes behind the LB (client-ID routing): each client lands where its ID hashes.
    ThroughLb,
    /// Two meshed mqlb nodes: publishers on the first, subscribers on the second.
    AcrossNodes,
    /// mosquitto, the reference: a rule test that fails here is wrong or tests something
    /// optional.
    Mosquitto,
}

/// What a side of a test is: the one that publishes or the one that subscribes. Sessions are
/// subscribers: a subscriber that reconnects comes back to the same place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Publisher,
    Subscriber,
}

/// MQTT version of a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// A running place to check rules against; everything stops on drop.
pub struct Target {
    pub kind: Kind,
    cluster: Option<Cluster>,
    mosquitto: Option<Mosquitto>,
    lb: Option<(Lb, SocketAddr)>,
    _dir: Option<TempDir>,
}

impl Target {
    pub async fn start(kind: Kind) -> anyhow::Result<Target> {
        let mut t = Target {
            kind,
            cluster: None,
            mosquitto: None,
            lb: None,
            _dir: None,
        };
        match kind {
            Kind::Node => t.cluster = Some(Cluster::start(1).await?),
            Kind::AcrossNodes => t.cluster = Some(Cluster::start(2).await?),
            Kind::Mosquitto => t.mosquitto = Some(Mosquitto::start().await?),
            Kind::ThroughLb => {
                let cluster = Cluster::start(2).await?;
                let dir = TempDir::new("conformance-lb")?;
                let file = dir.path().join("lb.toml");
                std::fs::write(&file, lb_toml(&cluster)?)?;
                let lb = Lb::start(Config::load(&file)?, Listeners::default()).await?;
                let front = lb
                    .frontend_addr("mqtt")
                    .context("the LB's mqtt frontend is not open")?;
                t.cluster = Some(cluster);
                t.lb = Some((lb, front));
                t._dir = Some(dir);
            }
        }
        Ok(t)
    }

    /// Where a client of `role` speaking `version` connects.
    pub fn addr(&self, role: Role, version: Version) -> anyhow::Result<SocketAddr> {
        if let Some((_, front)) = &self.lb {
            return Ok(*front);
        }
        if let Some(m) = &self.mosquitto {
            return Ok(m.addr());
        }
        let cluster = self.cluster.as_ref().context("no cluster")?;
        let node = match (self.kind, role) {
            (Kind::AcrossNodes, Role::Subscriber) => 1,
            _ => 0,
        };
        match version {
            Version::V311 => Ok(cluster.mqtt(node)),
            Version::V5 => cluster.mqtt_v5(node).context("no MQTT 5 listener"),
        }
    }

    /// The mqlb cluster behind this target (`None` for mosquitto).
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// Connects a raw MQTT 5 client of `role` with `connect` and returns it with its CONNACK.
    pub async fn connect5(
        &self,
        role: Role,
        connect: v5::Connect,
    ) -> anyhow::Result<(Raw<V5>, v5::ConnAck)> {
        let addr = self.addr(role, Version::V5)?;
        let mut c = Raw::<V5>::open(addr).await?;
        c.send(v5::Packet::Connect(connect, None, None)).await?;
        match c.recv().await? {
            v5::Packet::ConnAck(ack) => Ok((c, ack)),
            other => bail!("{:?}: expected a CONNACK, got {other:?}", self.kind),
        }
    }

    /// Connects a raw MQTT 3.1.1 client of `role` and returns it with its CONNACK.
    pub async fn connect4(
        &self,
        role: Role,
        connect: v4::Connect,
    ) -> anyhow::Result<(Raw<V4>, v4::ConnAck)> {
        let addr = self.addr(role, Version::V311)?;
        let mut c = Raw::<V4>::open(addr).await?;
        c.send(v4::Packet::Connect(connect)).await?;
        match c.recv().await? {
            v4::Packet::ConnAck(ack) => Ok((c, ack)),
            other => bail!("{:?}: expected a CONNACK, got {other:?}", self.kind),
        }
    }
}

/// The LB's TOML for a target: client-ID routing over the cluster's nodes, MQTT 5 clients sent
/// to each node's MQTT 5 port.
fn lb_toml(cluster: &Cluster) -> anyhow::Result<String> {
    let mut t = String::from(
        "[lb]\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\nwatch_config = false\n\
         [[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
         [[pool]]\nname = \"brokers\"\nprobe = \"alive\"\n",
    );
    for i in 0..cluster.len() {
        let v5 = cluster.mqtt_v5(i).context("no MQTT 5 listener")?;
        t += &format!(
            "[[pool.backend]]\nid = \"n{}\"\naddr = \"{}\"\nmqtt_ports = {{ v5 = {} }}\n",
            i + 1,
            cluster.mqtt(i),
            v5.port()
        );
    }
    t += "[[probe]]\nname = \"alive\"\nprotocol = \"tcp\"\nport = \"traffic\"\n\
          interval = \"1s\"\ntimeout = \"500ms\"\nthreshold = 1\n\
          [[rule]]\nname = \"mqtt\"\nfrontend = \"mqtt\"\npool = \"brokers\"\n\
          distribution = \"mqtt-client-id\"\n";
    Ok(t)
}

/// Runs `rule` against a fresh target of `kind`, naming the target in the error.
pub async fn run<F, Fut>(kind: Kind, rule: F) -> anyhow::Result<()>
where
    F: FnOnce(Arc<Target>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let target = Arc::new(Target::start(kind).await?);
    rule(target)
        .await
        .with_context(|| format!("against {kind:?}"))
}

/// One test per place for a rule: `rule!(name)` runs `async fn name(t: Arc<Target>)` (in the
/// same module) on one node, through the LB, across two nodes, and on mosquitto.
#[macro_export]
macro_rules! rule {
    ($name:ident) => {
        mod $name {
            use $crate::harness::{run, Kind};
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn one_node() -> anyhow::Result<()> {
                run(Kind::Node, super::$name).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn through_lb() -> anyhow::Result<()> {
                run(Kind::ThroughLb, super::$name).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn across_nodes() -> anyhow::Result<()> {
                run(Kind::AcrossNodes, super::$name).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() -> anyhow::Result<()> {
                run(Kind::Mosquitto, super::$name).await
            }
        }
    };
}

/// A codec of one MQTT version, rumqttc's.
pub trait Codec {
    type Packet: std::fmt::Debug;
    /// The next whole packet in `buf`, `None` if more bytes are needed.
    fn read(buf: &mut BytesMut) -> anyhow::Result<Option<Self::Packet>>;
    fn write(packet: &Self::Packet, buf: &mut BytesMut) -> anyhow::Result<()>;
}

/// MQTT 5.
pub struct V5;
/// MQTT 3.1.1.
pub struct V4;

/// Largest packet a test client reads (it sets its own Maximum Packet Size where a rule needs).
const MAX_READ: usize = 16 << 20;

impl Codec for V5 {
    type Packet = v5::Packet;
    fn read(buf: &mut BytesMut) -> anyhow::Result<Option<v5::Packet>> {
        match v5::Packet::read(buf, Some(MAX_READ)) {
            Ok(p) => Ok(Some(p)),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => bail!("the broker sent a malformed MQTT 5 packet: {e:?}"),
        }
    }
    fn write(packet: &v5::Packet, buf: &mut BytesMut) -> anyhow::Result<()> {
        packet
            .write(buf)
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("encoding {packet:?}: {e:?}"))
    }
}

impl Codec for V4 {
    type Packet = v4::Packet;
    fn read(buf: &mut BytesMut) -> anyhow::Result<Option<v4::Packet>> {
        match v4::read(buf, MAX_READ) {
            Ok(p) => Ok(Some(p)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => bail!("the broker sent a malformed MQTT 3.1.1 packet: {e:?}"),
        }
    }
    fn write(packet: &v4::Packet, buf: &mut BytesMut) -> anyhow::Result<()> {
        use v4::Packet as P;
        let r = match packet {
            P::Connect(p) => p.write(buf),
            P::Publish(p) => p.write(buf),
            P::PubAck(p) => p.write(buf),
            P::PubRec(p) => p.write(buf),
            P::PubRel(p) => p.write(buf),
            P::PubComp(p) => p.write(buf),
            P::Subscribe(p) => p.write(buf),
            P::Unsubscribe(p) => p.write(buf),
            P::PingReq => v4::PingReq.write(buf),
            P::Disconnect => v4::Disconnect.write(buf),
            other => bail!("a client does not send {other:?}"),
        };
        r.map(|_| ())
            .map_err(|e| anyhow::anyhow!("encoding {packet:?}: {e:?}"))
    }
}

/// A client that sends and reads whole packets and nothing else: no automatic acks, no
/// keep alive, no retries.
pub struct Raw<C: Codec> {
    stream: TcpStream,
    buf: BytesMut,
    _codec: std::marker::PhantomData<C>,
}

/// What the broker did instead of sending a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The connection was closed (or reset).
    Closed,
    /// Nothing arrived within the time.
    Silent,
}

impl<C: Codec> Raw<C> {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Raw<C>> {
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr}: timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Raw {
            stream,
            buf: BytesMut::with_capacity(4096),
            _codec: std::marker::PhantomData,
        })
    }

    pub async fn send(&mut self, packet: C::Packet) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        C::write(&packet, &mut out)?;
        self.send_bytes(&out).await
    }

    /// Writes bytes as they are (hand-made packets the codec would refuse to encode).
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).await.context("sending")
    }

    /// The next packet, or what happened instead within `within`.
    pub async fn next(&mut self, within: Duration) -> anyhow::Result<Result<C::Packet, Ended>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(p) = C::read(&mut self.buf)? {
                return Ok(Ok(p));
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf));
            match read.await {
                Err(_) => return Ok(Err(Ended::Silent)),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(Err(Ended::Closed)),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next packet; an error if none arrives within [`DEADLINE`].
    pub async fn recv(&mut self) -> anyhow::Result<C::Packet> {
        match self.next(DEADLINE).await? {
            Ok(p) => Ok(p),
            Err(e) => bail!("expected a packet, the connection was {e:?}"),
        }
    }

    /// Checks that no packet arrives within [`QUIET`]; returns the packet if one does.
    pub async fn expect_none(&mut self) -> anyhow::Result<()> {
        match self.next(QUIET).await? {
            Err(_) => Ok(()),
            Ok(p) => bail!("expected nothing, got {p:?}"),
        }
    }

    /// Waits until the broker closes the connection, failing on any packet but `allowed`.
    pub async fn expect_closed(
        &mut self,
        allowed: impl Fn(&C::Packet) -> bool,
    ) -> anyhow::Result<()> {
        loop {
            match self.next(DEADLINE).await? {
                Err(Ended::Closed) => return Ok(()),
                Err(Ended::Silent) => bail!("the broker kept the connection open"),
                Ok(p) if allowed(&p) => {}
                Ok(p) => bail!("expected the connection to close, got {p:?}"),
            }
        }
    }
}

impl Raw<V5> {
    /// Subscribes and waits for the SUBACK, returning its reason codes.
    pub async fn subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<v5::Filter>,
        properties: Option<v5::SubscribeProperties>,
    ) -> anyhow::Result<Vec<v5::SubscribeReasonCode>> {
        self.send(v5::Packet::Subscribe(v5::Subscribe {
            pkid,
            filters,
            properties,
        }))
        .await?;
        loop {
            match self.recv().await? {
                v5::Packet::SubAck(a) if a.pkid == pkid => return Ok(a.return_codes),
                v5::Packet::Publish(_) => {} // retained messages may come first
                other => bail!("expected SUBACK {pkid}, got {other:?}"),
            }
        }
    }

    /// The next PUBLISH, acknowledging nothing; other packets are an error.
    pub async fn recv_publish(&mut self) -> anyhow::Result<v5::Publish> {
        match self.recv().await? {
            v5::Packet::Publish(p) => Ok(p),
            other => bail!("expected a PUBLISH, got {other:?}"),
        }
    }

    /// Publishes and completes the QoS flow (PUBACK, or PUBREC/PUBREL/PUBCOMP).
    pub async fn publish(&mut self, publish: v5::Publish) -> anyhow::Result<()> {
        let (qos, pkid) = (publish.qos, publish.pkid);
        self.send(v5::Packet::Publish(publish)).await?;
        match qos {
            QoS::AtMostOnce => Ok(()),
            QoS::AtLeastOnce => match self.recv().await? {
                v5::Packet::PubAck(a) if a.pkid == pkid => Ok(()),
                other => bail!("expected PUBACK {pkid}, got {other:?}"),
            },
            QoS::ExactlyOnce => {
                match self.recv().await? {
                    v5::Packet::PubRec(a) if a.pkid == pkid => {}
                    other => bail!("expected PUBREC {pkid}, got {other:?}"),
                }
                self.send(v5::Packet::PubRel(v5::PubRel::new(pkid, None)))
                    .await?;
                match self.recv().await? {
                    v5::Packet::PubComp(a) if a.pkid == pkid => Ok(()),
                    other => bail!("expected PUBCOMP {pkid}, got {other:?}"),
                }
            }
        }
    }
}

/// An MQTT 5 CONNECT with a clean start, keep alive 60 s and no properties.
pub fn connect5(client_id: &str) -> v5::Connect {
    v5::Connect {
        keep_alive: 60,
        client_id: client_id.to_string(),
        clean_start: true,
        properties: None,
    }
}

/// An MQTT 3.1.1 CONNECT with a clean session and keep alive 60 s.
pub fn connect4(client_id: &str) -> v4::Connect {
    let mut c = v4::Connect::new(client_id);
    c.keep_alive = 60;
    c
}

/// A subscription filter at `qos` with the default options.
pub fn filter5(path: &str, qos: QoS) -> v5::Filter {
    v5::Filter::new(path, qos)
}

/// A PUBLISH of `payload` to `topic` at `qos` (packet id 1 unless QoS 0).
pub fn publish5(topic: &str, qos: QoS, payload: &str) -> v5::Publish {
    let mut p = v5::Publish::new(topic, qos, payload.as_bytes().to_vec(), None);
    if qos != QoS::AtMostOnce {
        p.pkid = 1;
    }
    p
}

/// An MQTT 5 CONNECT for a session: `clean_start` and the Session Expiry Interval property
/// (`None`: absent, which means 0).
pub fn connect5_session(client_id: &str, clean_start: bool, expiry: Option<u32>) -> v5::Connect {
    let mut c = connect5(client_id);
    c.clean_start = clean_start;
    c.properties = expiry.map(|e| v5::ConnectProperties {
        session_expiry_interval: Some(e),
        ..v5::ConnectProperties::new()
    });
    c
}

/// An MQTT 3.1.1 CONNECT with `clean_session` as given.
pub fn connect4_session(client_id: &str, clean_session: bool) -> v4::Connect {
    let mut c = connect4(client_id);
    c.clean_session = clean_session;
    c
}

impl<C: Codec> Raw<C> {
    /// Closes the connection without DISCONNECT and waits until the broker has closed its side
    /// too (it has seen the end of the connection), bounded by [`DEADLINE`].
    pub async fn drop_connection(mut self) -> anyhow::Result<()> {
        self.stream.shutdown().await.ok();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut scratch = [0u8; 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Err(_) => bail!("the broker kept the connection open"),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
                Ok(Ok(_)) => {} // whatever was in flight
            }
        }
    }
}

impl Raw<V5> {
    /// Sends DISCONNECT (Normal disconnection; with a Session Expiry Interval property if
    /// `expiry` is given, hand-made: rumqttc does not export its DISCONNECT properties) and
    /// waits until the connection is closed (see [`Raw::drop_connection`]).
    pub async fn disconnect(mut self, expiry: Option<u32>) -> anyhow::Result<()> {
        match expiry {
            None => {
                self.send(v5::Packet::Disconnect(v5::Disconnect {
                    reason_code: v5::DisconnectReasonCode::NormalDisconnection,
                    properties: None,
                }))
                .await?
            }
            Some(e) => {
                let [a, b, c, d] = e.to_be_bytes();
                // DISCONNECT, remaining length 7, reason 0x00, properties length 5,
                // 0x11 Session Expiry Interval (four bytes).
                self.send_bytes(&[0xE0, 7, 0x00, 5, 0x11, a, b, c, d])
                    .await?
            }
        }
        self.drop_connection().await
    }
}

impl Raw<V4> {
    /// Sends DISCONNECT and waits until the connection is closed.
    pub async fn disconnect(mut self) -> anyhow::Result<()> {
        self.send(v4::Packet::Disconnect).await?;
        self.drop_connection().await
    }

    /// Subscribes to one filter and waits for its SUBACK, returning the return codes.
    pub async fn subscribe(
        &mut self,
        pkid: u16,
        path: &str,
        qos: rumqttc::QoS,
    ) -> anyhow::Result<Vec<v4::SubscribeReasonCode>> {
        let mut s = v4::Subscribe::new(path, qos);
        s.pkid = pkid;
        self.send(v4::Packet::Subscribe(s)).await?;
        loop {
            match self.recv().await? {
                v4::Packet::SubAck(a) if a.pkid == pkid => return Ok(a.return_codes),
                v4::Packet::Publish(_) => {} // retained messages may come first
                other => bail!("expected SUBACK {pkid}, got {other:?}"),
            }
        }
    }

    /// The next PUBLISH, acknowledging nothing; other packets are an error.
    pub async fn recv_publish(&mut self) -> anyhow::Result<v4::Publish> {
        match self.recv().await? {
            v4::Packet::Publish(p) => Ok(p),
            other => bail!("expected a PUBLISH, got {other:?}"),
        }
    }

    /// Publishes and completes the QoS flow (PUBACK, or PUBREC/PUBREL/PUBCOMP).
    pub async fn publish(&mut self, publish: v4::Publish) -> anyhow::Result<()> {
        let (qos, pkid) = (publish.qos, publish.pkid);
        self.send(v4::Packet::Publish(publish)).await?;
        match qos {
            rumqttc::QoS::AtMostOnce => Ok(()),
            rumqttc::QoS::AtLeastOnce => match self.recv().await? {
                v4::Packet::PubAck(a) if a.pkid == pkid => Ok(()),
                other => bail!("expected PUBACK {pkid}, got {other:?}"),
            },
            rumqttc::QoS::ExactlyOnce => {
                match self.recv().await? {
                    v4::Packet::PubRec(a) if a.pkid == pkid => {}
                    other => bail!("expected PUBREC {pkid}, got {other:?}"),
                }
                self.send(v4::Packet::PubRel(v4::PubRel::new(pkid))).await?;
                match self.recv().await? {
                    v4::Packet::PubComp(a) if a.pkid == pkid => Ok(()),
                    other => bail!("expected PUBCOMP {pkid}, got {other:?}"),
                }
            }
        }
    }
}

/// A 3.1.1 PUBLISH of `payload` to `topic` at `qos` (packet id 1 unless QoS 0).
pub fn publish4(topic: &str, qos: rumqttc::QoS, payload: &str) -> v4::Publish {
    let mut p = v4::Publish::new(topic, qos, payload.as_bytes().to_vec());
    if qos != rumqttc::QoS::AtMostOnce {
        p.pkid = 1;
    }
    p
}
