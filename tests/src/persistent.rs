//! Clients with persistent sessions, for the cluster checker and the failover bench (issue
//! 12): MQTT 3.1.1 with Clean Session 0, or MQTT 5 with Clean Start 0 and a Session Expiry
//! Interval. Unlike [`crate::Client`] they never subscribe again after a reconnect (the
//! session must bring the subscriptions back), and they record what a history check needs:
//! every CONNACK's Session Present and when it came, every delivery with its DUP flag and
//! arrival time, and which publish a PUBACK answered. rumqttc keeps what was not acknowledged
//! and sends it again after a reconnect, as a device with a persistent session does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Packet as P5};
use rumqttc::v5::Event as E5;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::client::drive;
use crate::lock;
use crate::wait::wait_count;

/// How long a session outlives its connection (MQTT 5): longer than any test.
const SESSION_EXPIRY_S: u32 = 3600;
/// How long a client waits for a CONNACK or a SUBACK.
const ACK_DEADLINE: Duration = Duration::from_secs(10);

/// Which MQTT a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

/// A CONNACK as the client saw it.
#[derive(Debug, Clone, Copy)]
pub struct Connack {
    pub at: Instant,
    pub session_present: bool,
}

/// A PUBLISH the client received.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: String,
    pub payload: Vec<u8>,
    pub dup: bool,
    pub at: Instant,
}

#[derive(Default)]
struct Record {
    connacks: Vec<Connack>,
    received: Vec<Delivery>,
    /// When each connection error was seen.
    errors: Vec<Instant>,
}

enum Handle {
    V311(AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A persistent-session client whose event loop runs in a task and reconnects on errors
/// (50 ms back-off), through whatever address it was given (the LB).
pub struct Persistent {
    pub id: String,
    pub protocol: Protocol,
    handle: Handle,
    record: Arc<Mutex<Record>>,
    connacks: Arc<AtomicUsize>,
    subacks: Arc<AtomicUsize>,
    /// PUBACKs received so far: a watch, so a publisher wakes at the PUBACK, not at a poll.
    pubacks: watch::Receiver<usize>,
    stop: CancellationToken,
}

/// What the event loop callback updates.
struct Sinks {
    record: Arc<Mutex<Record>>,
    connacks: Arc<AtomicUsize>,
    subacks: Arc<AtomicUsize>,
    pubacks: watch::Sender<usize>,
}

impl Sinks {
    fn connack(&self, session_present: bool) {
        lock(&self.record).connacks.push(Connack {
            at: Instant::now(),
            session_present,
        });
        self.connacks.fetch_add(1, Ordering::SeqCst);
    }

    fn publish(&self, topic: String, payload: &[u8], dup: bool) {
        lock(&self.record).received.push(Delivery {
            topic,
            payload: payload.to_vec(),
            dup,
            at: Instant::now(),
        });
    }

    fn puback(&self) {
        self.pubacks.send_modify(|n| *n += 1);
    }

    fn error(&self) {
        lock(&self.record).errors.push(Instant::now());
    }
}

impl Persistent {
    /// Connects to `addr` with a persistent session (a new one if `id` has none) and waits
    /// for the first CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str, protocol: Protocol) -> anyhow::Result<Self> {
        let (tx, pubacks) = watch::channel(0);
        let sinks = Sinks {
            record: Arc::default(),
            connacks: Arc::default(),
            subacks: Arc::default(),
            pubacks: tx,
        };
        let stop = CancellationToken::new();
        let (record, connacks, subacks) = (
            sinks.record.clone(),
            sinks.connacks.clone(),
            sinks.subacks.clone(),
        );
        let handle = match protocol {
            Protocol::V311 => {
                let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
                opts.set_keep_alive(Duration::from_secs(10));
                opts.set_clean_session(false);
                let (client, events) = AsyncClient::new(opts, 64);
                drive(events, stop.clone(), move |ev| match ev {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => sinks.connack(a.session_present),
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        sinks.publish(p.topic, &p.payload, p.dup)
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => sinks.puback(),
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        sinks.subacks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => sinks.error(),
                });
                Handle::V311(client)
            }
            Protocol::V5 => {
                let mut opts =
                    rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
                opts.set_keep_alive(Duration::from_secs(10));
                opts.set_clean_start(false);
                let mut props = ConnectProperties::new();
                props.session_expiry_interval = Some(SESSION_EXPIRY_S);
                opts.set_connect_properties(props);
                let (client, events) = rumqttc::v5::AsyncClient::new(opts, 64);
                drive(events, stop.clone(), move |ev| match ev {
                    Ok(E5::Incoming(P5::ConnAck(a))) => sinks.connack(a.session_present),
                    Ok(E5::Incoming(P5::Publish(p))) => sinks.publish(
                        String::from_utf8_lossy(&p.topic).into_owned(),
                        &p.payload,
                        p.dup,
                    ),
                    Ok(E5::Incoming(P5::PubAck(_))) => sinks.puback(),
                    Ok(E5::Incoming(P5::SubAck(_))) => {
                        sinks.subacks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => sinks.error(),
                });
                Handle::V5(client)
            }
        };
        let c = Persistent {
            id: id.to_string(),
            protocol,
            handle,
            record,
            connacks,
            subacks,
            pubacks,
            stop,
        };
        wait_count(&format!("CONNACK for {id}"), &c.connacks, 1, ACK_DEADLINE).await?;
        Ok(c)
    }

    /// Subscribes to `filter` at QoS 1 and waits for the SUBACK. Once: the session keeps it.
    pub async fn subscribe(&self, filter: &str) -> anyhow::Result<()> {
        let before = self.subacks.load(Ordering::SeqCst);
        match &self.handle {
            Handle::V311(c) => c.subscribe(filter, QoS::AtLeastOnce).await?,
            Handle::V5(c) => {
                c.subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                    .await?
            }
        }
        wait_count(
            &format!("SUBACK for {filter} ({})", self.id),
            &self.subacks,
            before + 1,
            ACK_DEADLINE,
        )
        .await
    }

    /// Publishes at QoS 1 and waits up to `within` for its PUBACK; true if it came. For one
    /// publish at a time: the next PUBACK is taken as this one's, so a caller that keeps one
    /// publish outstanding knows exactly which messages the cluster acknowledged.
    pub async fn publish_acked(
        &self,
        topic: &str,
        payload: Vec<u8>,
        within: Duration,
    ) -> anyhow::Result<bool> {
        let mut acks = self.pubacks.clone();
        let before = *acks.borrow_and_update();
        self.publish(topic, payload)
            .await
            .with_context(|| format!("{}: queueing a publish", self.id))?;
        let acked = tokio::time::timeout(within, acks.wait_for(|n| *n > before)).await;
        Ok(matches!(acked, Ok(Ok(_))))
    }

    /// Queues a QoS 1 publish without waiting for its PUBACK (traffic, not a checked sequence).
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        match &self.handle {
            Handle::V311(c) => c
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .context("queueing a publish"),
            Handle::V5(c) => c
                .publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .context("queueing a publish"),
        }
    }

    /// PUBACKs received so far.
    pub fn pubacks(&self) -> usize {
        *self.pubacks.borrow()
    }

    /// Every CONNACK so far, in order.
    pub fn connacks(&self) -> Vec<Connack> {
        lock(&self.record).connacks.clone()
    }

    /// Session Present of every CONNACK so far.
    pub fn session_present(&self) -> Vec<bool> {
        lock(&self.record)
            .connacks
            .iter()
            .map(|c| c.session_present)
            .collect()
    }

    /// When each connection error was seen.
    pub fn errors(&self) -> Vec<Instant> {
        lock(&self.record).errors.clone()
    }

    pub fn received_count(&self) -> usize {
        lock(&self.record).received.len()
    }

    /// Runs `f` over the deliveries so far (without copying them).
    pub fn with_received<R>(&self, f: impl FnOnce(&[Delivery]) -> R) -> R {
        f(&lock(&self.record).received)
    }

    /// Stops the event loop without DISCONNECT (the session stays on the broker).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Persistent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
