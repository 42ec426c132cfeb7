use crate::link::durable::AckHold;
use crate::link::local::{LinkError, LinkRx, LinkTx};
use crate::link::network;
use crate::link::network::Network;
use crate::local::LinkBuilder;
use crate::protocol::{
    ConnAck, Connect, ConnectReturnCode, Login, Packet, Protocol, PubAck, PubAckReason, PubRec,
    PubRecReason, QoS,
};
use crate::router::{Event, Notification};
use crate::{Access, ConnectionAcl, ConnectionId, ConnectionSettings};

use flume::{RecvError, SendError, Sender, TrySendError};
use std::cmp::min;
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::time::error::Elapsed;
use tokio::{select, time};
use tracing::{trace, Span};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O")]
    Io(#[from] io::Error),
    #[error("Zero keep alive")]
    ZeroKeepAlive,
    #[error("Not connect packet")]
    NotConnectPacket(Packet),
    #[error("Network {0}")]
    Network(#[from] network::Error),
    #[error("Timeout")]
    Timeout(#[from] Elapsed),
    #[error("Channel send error")]
    Send(#[from] SendError<(ConnectionId, Event)>),
    #[error("Channel recv error")]
    Recv(#[from] RecvError),
    #[error("Got new session, disconnecting old one")]
    SessionEnd,
    #[error("Persistent session requires valid client id")]
    InvalidClientId,
    #[error("Unexpected router message")]
    NotConnectionAck,
    #[error("ConnAck error {0}")]
    ConnectionAck(String),
    #[error("Authentication error")]
    InvalidAuth,
    #[error("Channel try send error")]
    TrySend(#[from] TrySendError<(ConnectionId, Event)>),
    #[error("Link error = {0}")]
    Link(#[from] LinkError),
}

/// Orchestrates between Router and Network.
pub struct RemoteLink<P> {
    connect: Connect,
    pub(crate) connection_id: ConnectionId,
    network: Network<P>,
    link_tx: LinkTx,
    link_rx: LinkRx,
    notifications: VecDeque<Notification>,
    pub(crate) will_delay_interval: u32,
    /// mqlb patch (across the cluster, issue 12): PUBACKs / PUBRECs held back until the
    /// codec's wait for their PUBLISH ended (`link/durable.rs`).
    acks: AckHold,
}

impl<P> RemoteLink<P> {
    /// mqlb patch (a link's end closes only that link): see `Event::Disconnect`.
    pub(crate) fn link(&self) -> u64 {
        self.link_rx.link()
    }
}

impl<P: Protocol> RemoteLink<P> {
    pub async fn new(
        router_tx: Sender<(ConnectionId, Event)>,
        tenant_id: Option<String>,
        mut network: Network<P>,
        connect_packet: Packet,
        dynamic_filters: bool,
        assigned_client_id: Option<String>,
        authorizer: Option<Arc<dyn crate::Authorizer>>,
    ) -> Result<RemoteLink<P>, Error> {
        let Packet::Connect(connect, props, lastwill, lastwill_props, login) = connect_packet
        else {
            return Err(Error::NotConnectPacket(connect_packet));
        };

        // Register this connection with the router. Router replys with ack which if ok will
        // start the link. Router can sometimes reject the connection (ex max connection limit)
        let client_id = assigned_client_id.as_ref().unwrap_or(&connect.client_id);
        let clean_session = connect.clean_session;

        let topic_alias_max = props.as_ref().and_then(|p| p.topic_alias_max);
        // mqlb patch (Maximum Packet Size): nothing larger is sent to the client, not even the
        // CONNACK (MQTT-3.1.2-24).
        network.set_max_outgoing_size(props.as_ref().and_then(|p| p.max_packet_size));
        let session_expiry = props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0);

        let delay_interval = lastwill_props
            .as_ref()
            .and_then(|f| f.delay_interval)
            .unwrap_or(0);

        // The Server delays publishing the Client’s Will Message until
        // the Will Delay Interval has passed or the Session ends, whichever happens first
        let will_delay_interval = min(session_expiry, delay_interval);

        let (link_tx, link_rx, notification) = LinkBuilder::new(client_id, router_tx)
            .tenant_id(tenant_id)
            .clean_session(clean_session)
            // mqlb patch (session expiry): the session outlives the connection by the
            // client's Session Expiry Interval (absent: 0, MQTT-3.1.2-23; the 3.1.1 codec
            // states Clean Session as an interval).
            .session_expiry(session_expiry)
            .last_will(lastwill)
            .last_will_properties(lastwill_props)
            .dynamic_filters(dynamic_filters)
            .topic_alias_max(topic_alias_max.unwrap_or(0))
            // mqlb patch (MQTT-3.3.4-9): the client's Receive Maximum bounds what the router
            // has unacknowledged out to it.
            .receive_maximum(props.as_ref().and_then(|p| p.receive_maximum).unwrap_or(0))
            // mqlb patch (router/authorize.rs): the router decides this connection's
            // publishes, subscriptions and deliveries with its identity.
            .acl(authorizer.map(|authorizer| ConnectionAcl {
                authorizer,
                client_id: client_id.to_owned(),
                username: login.map(|l| l.username),
            }))
            .build()?;

        let id = link_rx.id();
        Span::current().record("connection_id", id);

        if let Some(mut packet) = notification.into() {
            if let Packet::ConnAck(_ack, props) = &mut packet {
                let mut new_props = props.clone().unwrap_or_default();
                new_props.assigned_client_identifier = assigned_client_id;
                *props = Some(new_props);
                network.write(packet).await?;
            }
        }

        Ok(RemoteLink {
            connect,
            connection_id: id,
            network,
            link_tx,
            link_rx,
            notifications: VecDeque::with_capacity(100),
            will_delay_interval,
            acks: AckHold::default(),
        })
    }

    pub async fn start(&mut self) -> Result<(), Error> {
        self.network.set_keepalive(self.connect.keep_alive);

        // Note:
        // Shouldn't result in bounded queue deadlocks because of blocking n/w send
        loop {
            select! {
                o = self.network.read() => {
                    let packet = o?;
                    let len = {
                        let mut buffer = self.link_tx.buffer();
                        buffer.push_back(packet);
                        self.network.readv(&mut buffer)?;
                        buffer.len()
                    };
                    // mqlb patch (issue 12): taken before the router can acknowledge them.
                    for (pkid, wait) in self.network.take_ack_waits() {
                        self.acks.published(pkid, wait);
                    }

                    trace!("Packets read from network, count = {}", len);
                    self.link_tx.notify().await?;
                }
                // Receive from router when previous when state isn't in collision
                // due to previously received data request
                o = self.link_rx.exchange(&mut self.notifications) => {
                    o?;
                    let mut packets = VecDeque::new();
                    let mut unscheduled = false;

                    for notif in self.notifications.drain(..) {
                        if let Some(packet) = notif.into() {
                            // mqlb patch (issue 12): an acknowledgement may be held back.
                            if let Some(packet) = self.acks.offer(packet) {
                                packets.push_back(packet);
                            }
                        } else {
                            unscheduled = true;
                        }

                    }
                    // mqlb patch (Maximum Packet Size): a PUBLISH too large for the client
                    // is not sent, and its flow completes as if it had been (MQTT-3.1.2-25):
                    // the router gets the client's ack, so no inflight slot stays taken.
                    let discarded = self.network.writev_within(packets).await?;
                    if !discarded.is_empty() {
                        {
                            let mut buffer = self.link_tx.buffer();
                            for (qos, pkid) in discarded {
                                match qos {
                                    QoS::AtMostOnce => {}
                                    QoS::AtLeastOnce => buffer.push_back(Packet::PubAck(
                                        PubAck { pkid, reason: PubAckReason::Success },
                                        None,
                                    )),
                                    QoS::ExactlyOnce => buffer.push_back(Packet::PubRec(
                                        PubRec { pkid, reason: PubRecReason::Success },
                                        None,
                                    )),
                                }
                            }
                        }
                        self.link_tx.notify().await?;
                    }
                    if unscheduled {
                        self.link_rx.wake().await?;
                    }
                }
                // mqlb patch (issue 12): acknowledgements whose wait ended, in order.
                acks = self.acks.released(), if self.acks.holds() => {
                    self.network.writev(acks).await?;
                }
            }
        }
    }
}

/// Read MQTT connect packet from network and verify it.
/// authentication and checks are done here.
pub async fn mqtt_connect<P>(
    config: Arc<ConnectionSettings>,
    network: &mut Network<P>,
) -> Result<Packet, Error>
where
    P: Protocol,
{
    // Wait for MQTT connect packet and error out if it's not received in time to prevent
    // DOS attacks by filling total connections that the server can handle with idle open
    // connections which results in server rejecting new connections
    let connection_timeout_ms = config.connection_timeout_ms.into();
    let packet = time::timeout(Duration::from_millis(connection_timeout_ms), async {
        let packet = network.read().await?;
        Ok::<_, network::Error>(packet)
    })
    .await?;
    // mqlb patch (CONNECT protocol errors): a CONNECT that is a Protocol Error is answered
    // with CONNACK 0x82 before the connection closes (MQTT-3.1.4-1, MQTT-3.2.2-8, 4.13.1).
    let packet = match packet {
        Err(network::Error::Protocol(crate::protocol::Error::ProtocolError(why))) => {
            trace!(why, "CONNECT refused: protocol error");
            let ack = ConnAck {
                session_present: false,
                code: ConnectReturnCode::ProtocolError,
            };
            network.write(Packet::ConnAck(ack, None)).await?;
            return Err(
                network::Error::Protocol(crate::protocol::Error::ProtocolError(why)).into(),
            );
        }
        other => other?,
    };

    let (connect, _props, will, login) = match packet {
        Packet::Connect(ref connect, ref props, ref will, _, ref login) => {
            (connect, props, will, login)
        }
        packet => return Err(Error::NotConnectPacket(packet)),
    };

    Span::current().record("client_id", &connect.client_id);

    // mqlb patch (router/authorize.rs): a refused login is answered with a CONNACK before
    // the connection closes (MQTT-3.1.4-2, MQTT-3.2.2-5: 5.0's 0x86 Bad User Name or Password;
    // the embedder's 3.1.1 codec may send 0x05 Not authorized, as mosquitto does), and so is a
    // last will on a topic the client may not publish to (0x87 / 0x05).
    if let Some(authorizer) = &config.authorizer {
        let username = login.as_ref().map(|l| l.username.as_str());
        let code = if !authorizer.authenticate(&connect.client_id, login.as_ref()) {
            Some(ConnectReturnCode::BadUserNamePassword)
        } else {
            let will_topic = will.as_ref().map(|w| String::from_utf8_lossy(&w.topic));
            will_topic
                .filter(|t| !authorizer.authorize(&connect.client_id, username, Access::Publish, t))
                .map(|_| ConnectReturnCode::NotAuthorized)
        };
        if let Some(code) = code {
            let ack = ConnAck {
                session_present: false,
                code,
            };
            network.write(Packet::ConnAck(ack, None)).await?;
            return Err(Error::InvalidAuth);
        }
    } else {
        handle_auth(config.clone(), login.as_ref(), &connect.client_id).await?;
    }

    // mqlb patch: a keep alive of 0 turns the keep alive mechanism off (MQTT 3.1.1 3.1.2.10,
    // MQTT 5 3.1.2.10); it was refused here without a CONNACK. A dead peer of such a client
    // is still found by TCP keepalive and by the LB's idle timeout.

    let empty_client_id = connect.client_id.is_empty();
    let clean_session = connect.clean_session;

    // mqlb patch (zero-length Client Identifier): 3.1.1's refusal of a zero-length ID without
    // Clean Session (its MQTT-3.1.3-8) is the codec's to say; MQTT 5 assigns an ID either way
    // (MQTT-3.1.3-6, -7; `remote` in server/broker.rs assigns it).
    if empty_client_id && !clean_session && network.empty_client_id_needs_clean_session() {
        let ack = ConnAck {
            session_present: false,
            code: ConnectReturnCode::ClientIdentifierNotValid,
        };

        let packet = Packet::ConnAck(ack, None);
        network.write(packet).await?;

        return Err(Error::InvalidClientId);
    }

    // Ok((connect, props, lastwill, lastwill_props))
    Ok(packet)
}

async fn handle_auth(
    config: Arc<ConnectionSettings>,
    login: Option<&Login>,
    client_id: &str,
) -> Result<(), Error> {
    if config.auth.is_none() && config.external_auth.is_none() {
        return Ok(());
    }

    // if authentication is configured and connect packet doesn't have login details
    // return an error
    let Some(login) = login else {
        return Err(Error::InvalidAuth);
    };

    let username = &login.username;
    let password = &login.password;

    if let Some(auth) = &config.external_auth {
        if !auth(
            client_id.to_owned(),
            username.to_owned(),
            password.to_owned(),
        )
        .await
        {
            return Err(Error::InvalidAuth);
        }

        return Ok(());
    }

    if let Some(pairs) = &config.auth {
        if let Some(stored_password) = pairs.get(username) {
            if stored_password.as_bytes().ct_eq(password.as_bytes()).into() {
                return Ok(());
            }
        }

        return Err(Error::InvalidAuth);
    }

    Err(Error::InvalidAuth)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc};

    use crate::{protocol::Login, ConnectionSettings};

    use super::handle_auth;

    fn config() -> ConnectionSettings {
        ConnectionSettings {
            connection_timeout_ms: 0,
            max_payload_size: 0,
            max_inflight_count: 0,
            auth: None,
            external_auth: None,
            dynamic_filters: false,
            authorizer: None,
        }
    }

    fn login() -> Login {
        Login {
            username: "u".to_owned(),
            password: "p".to_owned(),
        }
    }

    #[tokio::test]
    async fn no_login_no_auth() {
        let cfg = Arc::new(config());
        let r = handle_auth(cfg, None, "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn some_login_no_auth() {
        let cfg = Arc::new(config());
        let login = login();
        let r = handle_auth(cfg, Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_matches_static_auth() {
        let login = login();
        let mut map = HashMap::<String, String>::new();
        map.insert(login.username.clone(), login.password.clone());

        let mut cfg = config();
        cfg.auth = Some(map);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_fails_static_no_external() {
        let login = login();
        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let mut cfg = config();
        cfg.auth = Some(map);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn login_fails_static_matches_external() {
        let login = login();

        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let dynamic = |_: String, _: String, _: String| async { true };

        let mut cfg = config();
        cfg.auth = Some(map);
        cfg.set_auth_handler(dynamic);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_fails_static_fails_external() {
        let login = login();

        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let dynamic = |_: String, _: String, _: String| async { false };

        let mut cfg = config();
        cfg.auth = Some(map);
        cfg.set_auth_handler(dynamic);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn external_auth_clousre_or_fnptr_type_check_or_fail_compile() {
        let closure = |_: String, _: String, _: String| async { false };
        async fn fnptr(_: String, _: String, _: String) -> bool {
            true
        }

        let mut cfg = config();
        cfg.set_auth_handler(closure);
        cfg.set_auth_handler(fnptr);
    }
}
