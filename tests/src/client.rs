//! rumqttc clients (MQTT 3.1.1 and 5) that run their event loop in a task, reconnect after
//! errors as devices do, and record what they receive and which acks came.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
pub use rumqttc::QoS;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use tokio_util::sync::CancellationToken;

use crate::lock;
use crate::wait::wait_count;

/// How long a client waits for a CONNACK or a SUBACK.
const ACK_DEADLINE: Duration = Duration::from_secs(5);

/// A message a test client received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// MQTT 5 user properties (empty for 3.1.1 clients).
    pub user_properties: Vec<(String, String)>,
}

/// A rumqttc client whose event loop runs in a task and reconnects on errors (as devices do).
pub struct Client {
    pub client: AsyncClient,
    pub id: String,
    /// Filters to subscribe again after a reconnect (clean sessions forget them), as devices do.
    subscriptions: Arc<Mutex<Vec<(String, QoS)>>>,
    received: Arc<Mutex<Vec<Msg>>>,
    subacks: Arc<AtomicUsize>,
    connacks: Arc<AtomicUsize>,
    pubacks: Arc<AtomicUsize>,
    errors: Arc<AtomicUsize>,
    /// The last connection error, to say why a client is not connected.
    last_error: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
}

impl Client {
    /// Connects through `addr` and waits for the first CONNACK (5 s deadline).
    pub async fn connect(addr: SocketAddr, id: &str) -> anyhow::Result<Client> {
        Self::connect_with_will(addr, id, None).await
    }

    /// Connects with a last will `(topic, payload)` (QoS 1, not retained).
    pub async fn connect_with_will(
        addr: SocketAddr,
        id: &str,
        will: Option<(&str, &[u8])>,
    ) -> anyhow::Result<Client> {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        if let Some((topic, payload)) = will {
            opts.set_last_will(rumqttc::LastWill::new(
                topic,
                payload.to_vec(),
                QoS::AtLeastOnce,
                false,
            ));
        }
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let c = Client {
            client,
            id: id.to_string(),
            subscriptions: Arc::default(),
            received: Arc::default(),
            subacks: Arc::default(),
            connacks: Arc::default(),
            pubacks: Arc::default(),
            errors: Arc::default(),
            last_error: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (received, subacks, last_error) =
            (c.received.clone(), c.subacks.clone(), c.last_error.clone());
        let (subs, resubscriber) = (c.subscriptions.clone(), c.client.clone());
        let (connacks, pubacks, errors, stop) = (
            c.connacks.clone(),
            c.pubacks.clone(),
            c.errors.clone(),
            c.stop.clone(),
        );
        drive(eventloop, stop, move |ev| match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if connacks.fetch_add(1, Ordering::SeqCst) > 0 {
                    for (filter, qos) in lock(&subs).iter() {
                        if let Err(e) = resubscriber.try_subscribe(filter.clone(), *qos) {
                            eprintln!("resubscribing {filter}: {e}");
                        }
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                pubacks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                subacks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                lock(&received).push(Msg {
                    topic: p.topic.clone(),
                    payload: p.payload.to_vec(),
                    retain: p.retain,
                    user_properties: Vec::new(),
                });
            }
            Ok(_) => {}
            Err(e) => {
                errors.fetch_add(1, Ordering::SeqCst);
                *lock(&last_error) = Some(e.to_string());
            }
        });
        wait_count(&format!("CONNACK for {id}"), &c.connacks, 1, ACK_DEADLINE).await?;
        Ok(c)
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&self, filter: &str, qos: QoS) -> anyhow::Result<()> {
        let before = self.subacks.load(Ordering::SeqCst);
        lock(&self.subscriptions).push((filter.to_string(), qos));
        self.client.subscribe(filter, qos).await?;
        suback(&self.subacks, before, filter).await
    }

    /// Messages received so far, in arrival order.
    pub fn received(&self) -> Vec<Msg> {
        lock(&self.received).clone()
    }

    pub fn received_count(&self) -> usize {
        lock(&self.received).len()
    }

    /// CONNACKs received so far (more than one means it reconnected).
    pub fn connacks(&self) -> usize {
        self.connacks.load(Ordering::SeqCst)
    }

    pub fn pubacks(&self) -> usize {
        self.pubacks.load(Ordering::SeqCst)
    }

    /// Connection errors seen by the event loop.
    pub fn errors(&self) -> usize {
        self.errors.load(Ordering::SeqCst)
    }

    /// The last connection error the event loop saw, if any.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    pub async fn publish_qos1(&self, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
        self.publish(topic, QoS::AtLeastOnce, payload).await
    }

    /// Queues a publish at `qos` (without waiting for its acknowledgement).
    pub async fn publish(&self, topic: &str, qos: QoS, payload: &[u8]) -> anyhow::Result<()> {
        self.client
            .publish(topic, qos, false, payload.to_vec())
            .await
            .context("queueing a publish")
    }

    /// Sends DISCONNECT and stops the event loop.
    pub async fn disconnect(self) {
        if let Err(e) = self.client.disconnect().await {
            eprintln!("{}: disconnect: {e}", self.id);
        }
        // Let the event loop flush the DISCONNECT before it stops.
        let before = self.errors.load(Ordering::SeqCst);
        let flushed = wait_count(
            "the DISCONNECT to go out",
            &self.errors,
            before + 1,
            Duration::from_secs(1),
        )
        .await;
        if flushed.is_err() {
            eprintln!("{}: event loop did not close after DISCONNECT", self.id);
        }
        self.stop.cancel();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A rumqttc event loop (MQTT 3.1.1 or 5), polled by [`drive`].
pub(crate) trait EventSource: Send + 'static {
    type Event: Send;
    type Error: Send;
    fn next(&mut self) -> impl Future<Output = Result<Self::Event, Self::Error>> + Send;
}

impl EventSource for rumqttc::EventLoop {
    type Event = Event;
    type Error = rumqttc::ConnectionError;
    fn next(&mut self) -> impl Future<Output = Result<Event, Self::Error>> + Send {
        self.poll()
    }
}

impl EventSource for rumqttc::v5::EventLoop {
    type Event = rumqttc::v5::Event;
    type Error = rumqttc::v5::ConnectionError;
    fn next(&mut self) -> impl Future<Output = Result<Self::Event, Self::Error>> + Send {
        self.poll()
    }
}

/// Polls `events` until `stop`, handing each event or error to `on`; after an error it waits
/// 50 ms before the next poll (which reconnects), as a device would back off.
pub(crate) fn drive<S: EventSource>(
    mut events: S,
    stop: CancellationToken,
    mut on: impl FnMut(Result<S::Event, S::Error>) + Send + 'static,
) {
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => return,
                ev = events.next() => ev,
            };
            let failed = ev.is_err();
            on(ev);
            if failed {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    });
}

/// An MQTT 5 rumqttc client: records received messages with their user properties.
pub struct Client5 {
    pub client: rumqttc::v5::AsyncClient,
    pub id: String,
    received: Arc<Mutex<Vec<Msg>>>,
    subacks: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Client5 {
    pub async fn connect(addr: SocketAddr, id: &str) -> anyhow::Result<Client5> {
        use rumqttc::v5::mqttbytes::v5::Packet as P5;
        use rumqttc::v5::Event as E5;
        let mut opts = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, eventloop) = rumqttc::v5::AsyncClient::new(opts, 64);
        let c = Client5 {
            client,
            id: id.to_string(),
            received: Arc::default(),
            subacks: Arc::default(),
            stop: CancellationToken::new(),
        };
        let connacks = Arc::new(AtomicUsize::new(0));
        let (received, subacks, stop, acks) = (
            c.received.clone(),
            c.subacks.clone(),
            c.stop.clone(),
            connacks.clone(),
        );
        drive(eventloop, stop, move |ev| match ev {
            Ok(E5::Incoming(P5::ConnAck(_))) => {
                acks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(E5::Incoming(P5::SubAck(_))) => {
                subacks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(E5::Incoming(P5::Publish(p))) => lock(&received).push(Msg {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
                retain: p.retain,
                user_properties: p
                    .properties
                    .map(|pr| pr.user_properties)
                    .unwrap_or_default(),
            }),
            Ok(_) | Err(_) => {}
        });
        wait_count(
            &format!("MQTT 5 CONNACK for {id}"),
            &connacks,
            1,
            ACK_DEADLINE,
        )
        .await?;
        Ok(c)
    }

    pub async fn subscribe(&self, filter: &str) -> anyhow::Result<()> {
        let before = self.subacks.load(Ordering::SeqCst);
        self.client
            .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
            .await?;
        suback(&self.subacks, before, filter).await
    }

    /// Publishes at QoS 1 with user properties.
    pub async fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        user_properties: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
            user_properties: user_properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        self.client
            .publish_with_properties(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.to_vec(),
                props,
            )
            .await?;
        Ok(())
    }

    pub fn received(&self) -> Vec<Msg> {
        lock(&self.received).clone()
    }
}

impl Drop for Client5 {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Waits for the SUBACK of `filter`: the count of SUBACKs past `before`.
async fn suback(subacks: &AtomicUsize, before: usize, filter: &str) -> anyhow::Result<()> {
    wait_count(
        &format!("SUBACK for {filter}"),
        subacks,
        before + 1,
        ACK_DEADLINE,
    )
    .await
}
