//! mqlb patch (across the cluster, issue 12): one live session per client ID in a cluster of
//! routers, and the session moves with its client. rumqttd has no cluster; the embedder (mqlb's
//! broker) carries these between routers over its mesh:
//!
//! - [`SessionControl::take_over`]: the client connected on another router; its connection here
//!   is closed with DISCONNECT 0x8E Session taken over (MQTT-3.1.4-3), as the router does for a
//!   second connection with the same client ID on itself;
//! - [`SessionControl::export`]: takes a session out of this router (closing its connection
//!   first) as a [`SessionExport`]; [`SessionControl::import`] installs one as a saved session,
//!   which the client's next CONNECT with Clean Start 0 resumes (Session Present 1);
//! - [`SessionHook`]: a listener asks the embedder before it hands a CONNECT to the router, so
//!   the session can be fetched from another router before the CONNACK.
//!
//! The export is plain data (no log cursors, no connection ids): another router, or a replica
//! that only stores it, can take it as it is.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use flume::Sender;

use super::Event;
use crate::protocol::PublishProperties;
use crate::ConnectionId;

/// The log an imported session's pending messages are queued in, one per client ID: no topic
/// matches a filter that starts with `$` (MQTT-4.7.2-1) and no client may subscribe to one
/// (`validate_subscription`), so only the session reads it.
pub(crate) const SESSION_QUEUE_PREFIX: &str = "$mqlb/session/";

/// A session as it leaves one router for another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionExport {
    pub client_id: String,
    /// Seconds left of its Session Expiry Interval (`u32::MAX`: it never ends).
    pub expiry: u32,
    pub subscriptions: Vec<ExportedSubscription>,
    /// The QoS 1/2 messages the client has not acknowledged: sent and unacknowledged (with
    /// their packet id) and queued, in the order of each subscription's log.
    pub pending: Vec<ExportedMessage>,
    /// Packet ids of QoS 2 deliveries the client answered with PUBREC: their PUBREL is sent
    /// again on resumption (MQTT-4.4.0-1).
    pub pubrels: Vec<u16>,
    /// The last packet id used for a delivery.
    pub last_pkid: u16,
    /// Pending messages left out of the export by its size bound.
    pub dropped: usize,
}

/// A subscription of an exported session, with its options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportedSubscription {
    /// As subscribed (`$share/{group}/{filter}` for a shared one).
    pub filter: String,
    pub qos: u8,
    pub nolocal: bool,
    pub preserve_retain: bool,
}

/// A message of an exported session, as it is to be delivered (QoS and RETAIN as the
/// subscription makes them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportedMessage {
    pub topic: Bytes,
    pub payload: Bytes,
    /// 1 or 2.
    pub qos: u8,
    pub retain: bool,
    pub properties: Option<PublishProperties>,
    /// The packet id it was sent with and not acknowledged (sent again with it and DUP 1,
    /// MQTT-4.4.0-1); 0: not sent yet.
    pub pkid: u16,
}

/// Moves sessions in and out of a router (see the module).
#[derive(Clone)]
pub struct SessionControl {
    router_tx: Sender<(ConnectionId, Event)>,
}

impl SessionControl {
    /// A control of the router `router_tx` (from [`crate::Router::spawn`]) leads to.
    pub fn new(router_tx: Sender<(ConnectionId, Event)>) -> SessionControl {
        SessionControl { router_tx }
    }

    /// `client_id` connected on another router: its live connection here, if any, gets
    /// DISCONNECT 0x8E Session taken over and is closed; its session is saved as usual
    /// (`discard`: dropped, because the new connection's Clean Start ended it, MQTT-3.1.2-4).
    /// `false`: the router's queue is full and nothing was done.
    pub fn take_over(&self, client_id: &str, discard: bool) -> bool {
        self.router_tx
            .try_send((
                0,
                Event::TakeOver {
                    client_id: client_id.to_owned(),
                    discard,
                },
            ))
            .is_ok()
    }

    /// Takes the session of `client_id` out of this router: its live connection is closed
    /// (DISCONNECT 0x8E), the session is returned and forgotten here. `None`: no session (or
    /// the router is gone). Pending messages beyond `budget` bytes are left out and counted.
    pub async fn export(&self, client_id: &str, budget: usize) -> Option<SessionExport> {
        let (reply, rx) = flume::bounded(1);
        let event = Event::ExportSession {
            client_id: client_id.to_owned(),
            budget,
            reply,
        };
        self.router_tx.send_async((0, event)).await.ok()?;
        rx.recv_async().await.ok().flatten()
    }

    /// Installs `session` as a saved session of this router, replacing one it had for that
    /// client ID. `false`: the router is gone.
    pub async fn import(&self, session: SessionExport) -> bool {
        self.router_tx
            .send_async((0, Event::ImportSession(Box::new(session), None)))
            .await
            .is_ok()
    }

    /// Installs `session` like [`SessionControl::import`] and waits (blocking the thread, at
    /// most `timeout`) until the router has it: what reaches the router after this returns
    /// finds the session's subscriptions in place. `false`: the router is gone or too slow.
    pub fn import_blocking(&self, session: SessionExport, timeout: std::time::Duration) -> bool {
        let (reply, rx) = flume::bounded(1);
        let event = Event::ImportSession(Box::new(session), Some(reply));
        self.router_tx.send_timeout((0, event), timeout).is_ok() && rx.recv_timeout(timeout).is_ok()
    }
}

/// Asked by a listener for every accepted CONNECT (its login passed) before the router gets
/// it, so before its CONNACK: the embedder may [`SessionControl::import`] the client's session
/// meanwhile. The future should be short and bounded; the client waits for it.
pub trait SessionHook: Send + Sync {
    fn before_connect(
        &self,
        client_id: &str,
        clean_start: bool,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}
