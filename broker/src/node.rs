//! One broker node: rumqttd's router and MQTT servers composed on a runtime the node owns, so
//! it can be stopped (rumqttd's `Broker::start` blocks forever), plus the mesh links.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqlb_config::{AuthSettings, BrokerNode, Config};
use rumqttd::local::LinkBuilder;
use rumqttd::protocol::{v4::V4, v5::V5, Packet, PubRel, PubRelReason, Publish, QoS};
use rumqttd::{
    Authorizer, ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::{Auth, AuthError};
use crate::clients::Clients;
use crate::counted::Counted;
use crate::durable::{self, Durable};
use crate::front::{Front, FrontMetrics};
use crate::http;
use crate::membership;
use crate::mesh::{serve_inbound, Injected, Mesh, MeshSettings};
use crate::metrics::Metrics;
use crate::tap::{ConnLimit, Tap};
use crate::watchdog;
use mqlb_ha_api::model::Registration;
use mqlb_ha_api::HaClient;

/// Everything a node needs, resolved from the config (or built by a test).
#[derive(Clone)]
pub struct NodeSpec {
    pub node: BrokerNode,
    /// `(id, mesh address)` of every other node.
    pub peers: Vec<(String, SocketAddr)>,
    pub mesh: Option<MeshSettings>,
    /// HA servers to register with and learn peers from (none: static peers only).
    pub ha: Vec<SocketAddr>,
    pub heartbeat_interval: Duration,
    /// `[auth]`: the same password and ACL files on every node.
    pub auth: AuthSettings,
    /// `cluster.durable_retained`: retained messages written through to the HA servers and
    /// loaded from them at start (issue 18; needs `ha`).
    pub durable_retained: bool,
}

impl NodeSpec {
    /// The spec of broker `id` in `config`: its peers are all the other `[[broker]]`s.
    pub fn from_config(config: &Config, id: &str) -> Result<NodeSpec, NodeError> {
        let node = config
            .brokers
            .iter()
            .find(|b| b.id == id)
            .cloned()
            .ok_or_else(|| NodeError::UnknownNode(id.to_string()))?;
        let peers = config
            .brokers
            .iter()
            .filter(|b| b.id != id)
            .filter_map(|b| Some((b.id.clone(), b.mesh?)))
            .collect();
        let mesh = config.cluster.secret.clone().map(|secret| MeshSettings {
            secret,
            peer_queue: config.cluster.peer_queue.get() as usize,
            reconnect_min: config.cluster.reconnect_min,
            reconnect_max: config.cluster.reconnect_max,
            max_payload: node.max_payload_size.get() as usize,
            replicate_sessions: config.cluster.replicate_sessions,
            replica_max_messages: config.cluster.replica_max_messages.get() as usize,
            replication_factor: config.cluster.replication_factor.get() as usize,
            source: None,
            tls: config.cluster.tls.clone(),
        });
        Ok(NodeSpec {
            node,
            peers,
            mesh,
            ha: config.ha.servers.iter().map(|h| h.listen).collect(),
            heartbeat_interval: config.ha.heartbeat_interval,
            auth: config.auth.clone(),
            durable_retained: config.cluster.durable_retained,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("no [[broker]] with id {0:?} in the configuration")]
    UnknownNode(String),
    #[error("cannot listen on {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the node's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("rumqttd: {0}")]
    Rumqttd(String),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Auth(#[from] AuthError),
    /// A reload asked for what only a restart does.
    #[error("{0}")]
    NeedsRestart(&'static str),
}

/// The node's runtime. Shut down in the background whenever it goes (also on an error half-way
/// through `start`): a runtime dropped plainly inside an async caller would panic.
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl OwnedRuntime {
    fn shut_down(&mut self) {
        if let Some(rt) = self.0.take() {
            // Drops every task: listeners, client links, mesh links. (rumqttd's router thread
            // cannot be stopped in 0.20; it stays parked, idle, until the process exits.)
            rt.shutdown_background();
        }
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// A running broker node. Stopping it (or dropping it) closes its listeners and every client
/// and mesh connection.
pub struct Node {
    id: String,
    runtime: OwnedRuntime,
    stop: CancellationToken,
    mesh: Arc<Mesh>,
    metrics: Arc<Metrics>,
    ha: Option<Arc<HaClient>>,
    /// Writes the retained messages of this node's clients to the HA servers (issue 18).
    durable: Option<Arc<Durable>>,
    auth: Arc<Auth>,
    /// The TLS listeners' server configuration (both share it), swapped by [`Node::reload_tls`].
    tls: Option<Arc<arc_swap::ArcSwap<rustls::ServerConfig>>>,
    /// What `tls` was built from, so a reload that reads the same files changes nothing (and
    /// keeps the session tickets' keys).
    tls_loaded: std::sync::Mutex<Option<mqlb_config::TlsServer>>,
    pub mqtt: SocketAddr,
    pub mqtt_v5: Option<SocketAddr>,
    /// MQTT 3.1.1 and 5.0 over TLS (`mqtts`, `mqtts_v5`).
    pub mqtts: Option<SocketAddr>,
    pub mqtts_v5: Option<SocketAddr>,
    pub mesh_addr: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
}

fn connection_settings(n: &BrokerNode, auth: Option<Arc<Auth>>) -> ConnectionSettings {
    ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: n.max_payload_size.get() as usize,
        max_inflight_count: n.max_inflight.get() as usize,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
        authorizer: auth.map(|a| a as Arc<dyn Authorizer>),
    }
}

/// A TLS listener's socket, bound here with the node's backlog so an address in use is an error
/// of `start` (rumqttd binds the plain ones itself; these it is given, `Server::bound`).
fn bind_mqtt(
    what: &'static str,
    addr: SocketAddr,
    backlog: u32,
) -> Result<std::net::TcpListener, NodeError> {
    let err = |source| NodeError::Bind { what, addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket
        .listen(i32::try_from(backlog).unwrap_or(i32::MAX))
        .map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}

fn bind_std(what: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, NodeError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| NodeError::Bind {
        what,
        addr,
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(|source| NodeError::Bind { what, addr, source })?;
    Ok(l)
}

impl Node {
    /// Starts the node and returns once its MQTT listeners accept connections.
    pub async fn start(spec: NodeSpec) -> Result<Node, NodeError> {
        let n = spec.node.clone();
        let runtime = OwnedRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(format!("mqlb-broker-{}", n.id))
                .enable_all()
                .build()
                .map_err(NodeError::Runtime)?,
        ));
        let metrics = Arc::new(Metrics::new()?);
        let auth = Arc::new(Auth::load(spec.auth.clone(), metrics.clone())?);
        // Only asked when something is checked: an open broker pays nothing.
        let checked = auth.is_active().then(|| auth.clone());
        // One registry of delayed wills for both listeners and the mesh: a client that
        // connects again, on either listener or on another node, cancels its pending will.
        let wills = rumqttd::DelayedWills::default();
        // Links leave from the mesh listen address (see `MeshSettings::source`).
        let settings = spec.mesh.clone().map(|mut m| {
            m.source = n.mesh.map(|a| a.ip()).filter(|ip| !ip.is_unspecified());
            m
        });
        let mesh = Arc::new(Mesh::new(
            n.id.clone(),
            settings,
            metrics.clone(),
            wills.clone(),
        ));
        // Shared subscriptions across the cluster (issue 12): the router asks it which
        // messages of a group it delivers; the mesh tells it what the peers have.
        let share = Arc::new(crate::share::Share::new(&n.id, &metrics)?);
        let _ = mesh.share.set(share.clone());
        let stop = CancellationToken::new();

        // Listeners this crate binds itself are bound here, so an address in use is an error
        // now. (rumqttd binds its MQTT listeners inside `Server::start`.)
        let mesh_listener = n.mesh.map(|a| bind_std("mesh", a)).transpose()?;
        let tls_listeners = [("mqtts", n.mqtts), ("mqtts_v5", n.mqtts_v5)]
            .map(|(what, a)| a.map(|a| bind_mqtt(what, a, n.backlog.get())).transpose());
        let [mqtts_listener, mqtts_v5_listener] = tls_listeners;
        let (mqtts_listener, mqtts_v5_listener) = (mqtts_listener?, mqtts_v5_listener?);
        let mqtts_addr = mqtts_listener.as_ref().and_then(|l| l.local_addr().ok());
        let mqtts_v5_addr = mqtts_v5_listener.as_ref().and_then(|l| l.local_addr().ok());
        let http_listener = n.http.map(|a| bind_std("http", a)).transpose()?;
        let mesh_addr = mesh_listener.as_ref().and_then(|l| l.local_addr().ok());
        let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());

        let router = Router::new(
            0,
            RouterConfig {
                max_connections: n.max_connections.get() as usize + 16,
                max_outgoing_packet_count: 200,
                max_segment_size: 100 * 1024 * 1024,
                max_segment_count: 10,
                shared_group_policy: Some(rumqttd::SharedPolicy(share)),
                max_queued_messages: n.max_queued_messages.get() as usize,
                ..RouterConfig::default()
            },
        );
        let router_tx = router.spawn();
        // One live session per client ID across the cluster, sessions moving with their
        // clients (issue 12): a moved session's pending messages fit in one mesh frame.
        let budget = spec.mesh.as_ref().map_or(0, |m| m.max_payload);
        // Persistent sessions held by the peers too, so a node's death loses none (issue 12).
        let replication = crate::replication::Replication::new(
            rumqttd::SessionControl::new(router_tx.clone()),
            &mesh,
            budget,
            spec.mesh.as_ref().map_or(1, |m| m.replica_max_messages),
            spec.mesh.as_ref().map_or(0, |m| m.replication_factor),
        )?;
        // Off: nothing is tagged, announced or recorded (the hooks find no replication).
        if spec.mesh.as_ref().is_some_and(|m| m.replicate_sessions) {
            let _ = mesh.replication.set(replication.clone());
        }
        let sessions = crate::session::Sessions::new(
            rumqttd::SessionControl::new(router_tx.clone()),
            &mesh,
            replication.clone(),
            budget,
        )?;
        let _ = mesh.sessions.set(sessions.clone());
        let hook: Arc<dyn rumqttd::SessionHook> = Arc::new(crate::session::Hook(sessions));
        let (link_tx, link_rx, _ack) =
            LinkBuilder::new(&format!("mqlb-mesh-{}", n.id), router_tx.clone())
                .build()
                .map_err(|e| NodeError::Rumqttd(format!("mesh link: {e}")))?;

        let handle = runtime
            .0
            .as_ref()
            .map(|r| r.handle().clone())
            .ok_or_else(|| NodeError::Rumqttd("runtime missing".into()))?;
        let _guard = handle.enter();
        let (inject_tx, inject_rx) = mpsc::channel::<Injected>(1024);
        replication.set_injector(inject_tx.clone());
        handle.spawn(crate::replication::run(replication, stop.clone()));
        handle.spawn(injector(
            inject_rx,
            link_tx,
            link_rx,
            mesh.clone(),
            stop.clone(),
        ));
        // The HA servers authenticate every request with the cluster secret, which the mesh
        // settings carry (`NodeSpec::from_config` sets them whenever `[cluster] secret` is).
        let ha = match (&spec.mesh, spec.ha.is_empty()) {
            (_, true) => None,
            (Some(m), false) => Some(Arc::new(HaClient::new(spec.ha.clone(), m.secret.clone()))),
            (None, false) => {
                tracing::error!(
                    node = n.id,
                    "HA servers configured but no [cluster] secret: not registering"
                );
                None
            }
        };
        // Retained messages kept in the HA servers' database: loaded before the node serves,
        // then its clients' written through (`durable`).
        let durable = match (&ha, spec.durable_retained) {
            (Some(client), true) => {
                let d = Durable::new(&n.id, &metrics, client.clone())?;
                // Built here: rumqttd does not export the type of its router channel.
                let link = LinkBuilder::new(&format!("mqlb-retained-{}", n.id), router_tx.clone())
                    .build()
                    .map(|(tx, rx, _ack)| (tx, rx));
                let reached = load_retained(&n.id, client, &d, link).await;
                // Sessions are written and loaded where they are replicated (and not waited
                // for a second time when the HA servers did not answer).
                if let Some(r) = mesh.replication.get() {
                    if reached {
                        load_sessions(&n.id, client, &d, r).await;
                    }
                    r.set_durable(d.clone());
                }
                let _ = mesh.durable.set(d.clone());
                handle.spawn(d.clone().run(client.clone(), stop.clone()));
                Some(d)
            }
            _ => None,
        };
        let mut servers = Vec::new();
        let settings = |name: &str, listen| ServerSettings {
            name: name.to_string(),
            listen,
            backlog: n.backlog.get(),
            tls: None,
            next_connection_delay_ms: 0,
            connections: connection_settings(&n, checked.clone()),
        };
        let limit = ConnLimit::new(n.max_connections.get() as usize);
        // Every listener's first steps (issue 15): a PROXY header from `accept_proxy`, TLS on
        // mqtts*; its clients listed with their addresses (`/api/clients`).
        let clients = Arc::new(Clients::default());
        let names: Vec<&'static str> = [
            ("mqtt", Some(n.mqtt)),
            ("mqtt_v5", n.mqtt_v5),
            ("mqtts", n.mqtts),
            ("mqtts_v5", n.mqtts_v5),
        ]
        .into_iter()
        .filter_map(|(name, a)| a.map(|_| name))
        .collect();
        let front_metrics = FrontMetrics::register(metrics.registry(), &names)?;
        let tls = n
            .tls
            .as_ref()
            .map(|t| Arc::new(arc_swap::ArcSwap::new(t.server.config().clone())));
        let front = |listener: &'static str, on_tls: bool| -> Arc<dyn rumqttd::Accept> {
            Arc::new(Front {
                node: n.id.clone(),
                listener,
                tls: tls.clone().filter(|_| on_tls),
                accept_proxy: n.accept_proxy.clone(),
                timeout: n.handshake_timeout,
                metrics: front_metrics.clone(),
            })
        };
        // The codec of a listener: 3.1.1 (`V4`) or 5.0 (`V5`), tapped, its clients listed.
        macro_rules! tap {
            ($codec:expr, $v4:expr, $listener:expr) => {
                Tap::new(
                    Counted::new($codec, metrics.clone()),
                    mesh.clone(),
                    limit.clone(),
                    checked.clone(),
                    durable.clone(),
                    $v4,
                )
                .listed($listener, clients.clone())
            };
        }
        // A factory per listener: the watchdog calls it again to replace a poisoned server.
        // (A macro, because rumqttd does not export the type of its router channel.)
        macro_rules! factory {
            ($settings:expr, $tap:expr, $front:expr) => {{
                let (settings, router_tx, tap, wills, hook, front) = (
                    $settings,
                    router_tx.clone(),
                    $tap,
                    wills.clone(),
                    hook.clone(),
                    $front,
                );
                move || {
                    // `Tap::clone` starts a fresh per-connection state.
                    let mut server = Server::new(settings.clone(), router_tx.clone(), tap.clone())
                        .delayed_wills(wills.clone())
                        .session_hook(hook.clone())
                        .accept(front.clone());
                    async move { server.start(LinkType::Remote).await }
                }
            }};
        }
        let make_v4 = factory!(
            settings("v4", n.mqtt),
            tap!(V4, true, "mqtt"),
            front("mqtt", false)
        );
        servers.push(handle.spawn(make_v4()));
        let make_v5 = n.mqtt_v5.map(|addr| {
            factory!(
                settings("v5", addr),
                tap!(V5, false, "mqtt_v5"),
                front("mqtt_v5", false)
            )
        });
        if let Some(make) = &make_v5 {
            servers.push(handle.spawn(make()));
        }
        // The TLS listeners, on the sockets bound above: accepting already, so not part of the
        // readiness check, and not watched by a CONNECT (a client certificate may be required).
        if let (Some(l), Some(addr)) = (mqtts_listener, mqtts_addr) {
            let mut server = Server::new(
                settings("v4-tls", addr),
                router_tx.clone(),
                tap!(V4, true, "mqtts"),
            )
            .delayed_wills(wills.clone())
            .session_hook(hook.clone())
            .accept(front("mqtts", true))
            .bound(l);
            handle.spawn(async move { server.start(LinkType::Remote).await });
        }
        if let (Some(l), Some(addr)) = (mqtts_v5_listener, mqtts_v5_addr) {
            let mut server = Server::new(
                settings("v5-tls", addr),
                router_tx.clone(),
                tap!(V5, false, "mqtts_v5"),
            )
            .delayed_wills(wills.clone())
            .session_hook(hook.clone())
            .accept(front("mqtts_v5", true))
            .bound(l);
            handle.spawn(async move { server.start(LinkType::Remote).await });
        }
        if let Some(l) = mesh_listener {
            let l = tokio::net::TcpListener::from_std(l).map_err(|source| NodeError::Bind {
                what: "mesh",
                addr: mesh_addr.unwrap_or(n.mqtt),
                source,
            })?;
            handle.spawn(serve_inbound(mesh.clone(), l, inject_tx, stop.clone()));
        }
        for (id, addr) in &spec.peers {
            mesh.add_peer(id.clone(), *addr, stop.child_token());
        }
        if let Some(client) = &ha {
            let reg = Registration {
                id: n.id.clone(),
                mqtt: n.mqtt.to_string(),
                mqtt_v5: n.mqtt_v5.map(|a| a.to_string()),
                mesh: mesh_addr.map(|a| a.to_string()),
                http: http_addr.map(|a| a.to_string()),
                pid: Some(std::process::id()),
            };
            handle.spawn(membership::register_and_heartbeat(
                client.clone(),
                reg,
                spec.heartbeat_interval,
                stop.clone(),
            ));
            handle.spawn(membership::follow_peers(
                client.clone(),
                mesh.clone(),
                stop.clone(),
            ));
        }
        if let Some(l) = http_listener {
            let l = tokio::net::TcpListener::from_std(l).map_err(|source| NodeError::Bind {
                what: "http",
                addr: http_addr.unwrap_or(n.mqtt),
                source,
            })?;
            handle.spawn(http::serve(
                metrics.clone(),
                mesh.clone(),
                clients.clone(),
                rumqttd::StatsControl::new(router_tx.clone()),
                l,
                n.http_token.clone(),
                stop.clone(),
            ));
        }
        drop(_guard);

        let node = Node {
            id: n.id.clone(),
            runtime,
            stop,
            mesh,
            metrics,
            ha,
            durable,
            auth,
            tls,
            tls_loaded: std::sync::Mutex::new(n.tls.as_ref().map(|t| t.server.clone())),
            mqtt: n.mqtt,
            mqtt_v5: n.mqtt_v5,
            mqtts: mqtts_addr,
            mqtts_v5: mqtts_v5_addr,
            mesh_addr,
            http: http_addr,
        };
        // Ready when every MQTT listener answers a CONNECT (a bare TCP connect that hangs up
        // made rumqttd log an error per listener); a server that returned meanwhile failed.
        let target = |addr, level| watchdog::Target {
            addr,
            level,
            accept_proxy: n.accept_proxy.clone(),
        };
        let want: Vec<watchdog::Target> = std::iter::once(target(n.mqtt, 4))
            .chain(n.mqtt_v5.map(|a| target(a, 5)))
            .collect();
        let start = Instant::now();
        loop {
            let mut all = true;
            for t in &want {
                all &= watchdog::self_check(t, &n.id).await;
            }
            if all {
                break;
            }
            if let Some(done) = servers.iter_mut().find(|s| s.is_finished()) {
                let why = match done.await {
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(())) => "server returned".into(),
                    Err(e) => e.to_string(),
                };
                node.shutdown();
                return Err(NodeError::Rumqttd(format!(
                    "MQTT listener {}: {why}",
                    n.mqtt
                )));
            }
            if start.elapsed() > Duration::from_secs(10) {
                node.shutdown();
                let addrs: Vec<SocketAddr> = want.iter().map(|t| t.addr).collect();
                return Err(NodeError::Rumqttd(format!(
                    "MQTT listeners {addrs:?} not up after 10 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // From now on each listener is watched and replaced if rumqttd poisons it.
        let mut handles = servers.into_iter();
        if let Some(h) = handles.next() {
            handle.spawn(watchdog::watch(
                n.id.clone(),
                target(n.mqtt, 4),
                h,
                make_v4,
                node.metrics.clone(),
                node.stop.clone(),
            ));
        }
        if let (Some(h), Some(make), Some(addr)) = (handles.next(), make_v5, n.mqtt_v5) {
            handle.spawn(watchdog::watch(
                n.id.clone(),
                target(addr, 5),
                h,
                make,
                node.metrics.clone(),
                node.stop.clone(),
            ));
        }
        tracing::info!(node = node.id, mqtt = %n.mqtt, mqtt_v5 = ?n.mqtt_v5, mqtts = ?mqtts_addr, mqtts_v5 = ?mqtts_v5_addr, accept_proxy = n.accept_proxy.len(), mesh = ?mesh_addr, http = ?http_addr, peers = spec.peers.len(), "broker node started");
        Ok(node)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Reads `[auth]`'s password and ACL files again (SIGHUP). Connected clients stay; their
    /// next publish, subscription and delivery are decided by the new files. On an error the
    /// old files stay and the error says why.
    pub fn reload_auth(&self) -> Result<(), AuthError> {
        self.auth.reload()
    }

    /// Serves `tls` (the node's `[[broker]] tls` as loaded again, files re-read) on the TLS
    /// listeners from the next handshake on; live connections keep their session. The
    /// listeners themselves are fixed at start: TLS cannot be turned on or off without a
    /// restart. Returns whether the certificate changed.
    pub fn reload_tls(&self, tls: Option<&mqlb_config::FrontendTls>) -> Result<bool, NodeError> {
        match (&self.tls, tls) {
            (None, None) => Ok(false),
            (Some(current), Some(new)) => {
                let mut loaded = self.tls_loaded.lock().unwrap_or_else(|p| p.into_inner());
                if loaded.as_ref() == Some(&new.server) {
                    return Ok(false);
                }
                current.store(new.server.config().clone());
                *loaded = Some(new.server.clone());
                Ok(true)
            }
            _ => Err(NodeError::NeedsRestart(
                "TLS listeners are added or removed by a restart, not a reload",
            )),
        }
    }

    /// Runs the mesh links' next handshakes with `tls` (`[cluster] tls` as loaded again, files
    /// re-read): a renewed certificate reaches each link as it is made again, live links keep
    /// their session. Returns whether it changed.
    pub fn reload_mesh_tls(&self, tls: Option<&mqlb_config::MeshTls>) -> Result<bool, NodeError> {
        self.mesh.reload_tls(tls).map_err(NodeError::NeedsRestart)
    }

    /// Prometheus text of this node's metrics.
    pub fn metrics_text(&self) -> String {
        self.metrics.render().unwrap_or_default()
    }

    /// `(peer id, link up)` for every peer.
    pub fn links(&self) -> Vec<(String, bool)> {
        self.mesh
            .peers()
            .iter()
            .map(|p| (p.id.clone(), p.is_up()))
            .collect()
    }

    fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.cancel();
        self.runtime.shut_down();
    }

    /// Stops the node (leaving the HA membership first, if it has one) and waits until its
    /// MQTT port refuses connections.
    pub async fn stop(mut self) {
        if let (Some(client), Some(d)) = (&self.ha, &self.durable) {
            // Persistent sessions' queues too (issue 18): the sessions taken out of the
            // router, so nothing is delivered after they were read.
            let queues = match self.mesh.replication.get() {
                Some(r) => r.queued_at_stop(Duration::from_secs(1)).await,
                None => Vec::new(),
            };
            d.flush_before_stop(client, Duration::from_secs(3), queues)
                .await;
        }
        if let Some(client) = &self.ha {
            match tokio::time::timeout(Duration::from_secs(2), client.deregister(&self.id)).await {
                Ok(Ok(())) => tracing::info!(node = self.id, "left the HA membership"),
                Ok(Err(e)) => {
                    tracing::warn!(node = self.id, error = %e, "could not deregister; the HA server will expire it")
                }
                Err(_) => tracing::warn!(
                    node = self.id,
                    "deregistration timed out; the HA server will expire it"
                ),
            }
        }
        self.stop_now();
        let addr = self.mqtt;
        let start = Instant::now();
        while TcpStream::connect(addr).await.is_ok() && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(node = self.id, "broker node stopped");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// How long a starting node waits for the HA servers' retained messages and its router's
/// taking them; beyond it the node starts without (logged): serving matters more.
const LOAD_WITHIN: Duration = Duration::from_secs(10);
/// Pages of retained messages read at most (1 000 each: 10 million messages).
const LOAD_PAGES: usize = 10_000;

/// Loads the retained messages stored by the HA servers into the router (issue 18), through
/// a local link of their own, before the node's listeners and links are up. `false`: the HA
/// servers did not answer.
async fn load_retained(
    node: &str,
    client: &HaClient,
    durable: &Durable,
    link: Result<(rumqttd::local::LinkTx, rumqttd::local::LinkRx), rumqttd::local::LinkError>,
) -> bool {
    let started = Instant::now();
    let entries = match tokio::time::timeout(LOAD_WITHIN, client.all_retained(LOAD_PAGES)).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            tracing::warn!(node, error = %e, "retained messages not loaded from the HA servers; starting without them");
            return false;
        }
        Err(_) => {
            tracing::warn!(node, after = ?LOAD_WITHIN, "retained messages not loaded from the HA servers in time; starting without them");
            return false;
        }
    };
    let (mut link_tx, mut link_rx) = match link {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(node, error = %e, "no router link to load retained messages");
            return true;
        }
    };
    let left = LOAD_WITHIN.saturating_sub(started.elapsed());
    let stored = entries.len();
    match durable::load::into_router(
        entries,
        &mut link_tx,
        &mut link_rx,
        mqlb_ha_api::now_ms(),
        left,
    )
    .await
    {
        Ok(n) => {
            durable.loaded(n);
            tracing::info!(node, loaded = n, expired = stored - n, after = ?started.elapsed(), "retained messages loaded from the HA servers");
        }
        Err(e) => tracing::warn!(node, error = %e, "retained messages not all loaded"),
    }
    true
}

/// Loads the persistent sessions stored by the HA servers as replicas (issue 18): a client of
/// one reconnecting is restored from it, as from a dead owner's replica.
async fn load_sessions(
    node: &str,
    client: &HaClient,
    durable: &Durable,
    replication: &crate::replication::Replication,
) {
    match tokio::time::timeout(LOAD_WITHIN, client.all_sessions(LOAD_PAGES)).await {
        Ok(Ok(entries)) => {
            let metas = entries.into_iter().filter_map(durable::meta_of).collect();
            let n = replication.load_stored(metas);
            durable.sessions_loaded(n);
            tracing::info!(
                node,
                loaded = n,
                "persistent sessions loaded from the HA servers"
            );
        }
        Ok(Err(e)) => {
            tracing::warn!(node, error = %e, "persistent sessions not loaded from the HA servers")
        }
        Err(_) => tracing::warn!(
            node,
            after = ?LOAD_WITHIN,
            "persistent sessions not loaded from the HA servers in time"
        ),
    }
}

/// Publishes from peers given to the router whose acknowledgement has not come yet; beyond it
/// the injector waits (and the links from the peers slow down).
const MAX_IN_FLIGHT: usize = 4096;

/// Delivers publishes from peers into the local router. They enter through a local link, not
/// a codec, so the tap never sees them and they are never forwarded again.
///
/// Each keeps the QoS it was published with, so the router delivers it at the minimum of that
/// and each subscription's (MQTT-3.8.4-8). The router acknowledges QoS 1 and 2 to the link:
/// the acks are drained here as they come (the link's buffer would otherwise grow without
/// bound), and a PUBREC is answered with the PUBREL that releases the message to subscribers.
/// The time a message waited since it arrived from the peer is taken off its message expiry
/// interval, and one that expired meanwhile is not delivered (MQTT-3.3.2-5, -6).
///
/// A numbered publish (issue 12) is reported to the mesh as accepted when the router's PUBACK
/// (QoS 1) or PUBCOMP (QoS 2) for it comes, or at once if it expired: only then does the
/// origin node get its acknowledgement and forget it.
async fn injector(
    mut rx: mpsc::Receiver<Injected>,
    mut link_tx: rumqttd::local::LinkTx,
    mut link_rx: rumqttd::local::LinkRx,
    mesh: Arc<Mesh>,
    stop: CancellationToken,
) {
    let mut pkid: u16 = 0;
    // Packet ids of QoS 1/2 publishes given to the router, and their `(peer, epoch, seq)`.
    let mut in_flight: HashMap<u16, Option<(String, u64, u64)>> = HashMap::new();
    loop {
        let Injected {
            peer,
            publish: mut m,
            received,
            seq,
        } = tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.recv(), if in_flight.len() < MAX_IN_FLIGHT => match r { Some(x) => x, None => return },
            n = link_rx.next() => {
                let done = match n.map(|n| n.and_then(Option::<Packet>::from)) {
                    Ok(Some(Packet::PubRec(rec, _))) => {
                        let rel = PubRel { pkid: rec.pkid, reason: PubRelReason::Success };
                        if let Err(e) = link_tx.send(Packet::PubRel(rel, None)).await {
                            tracing::error!(error = %e, "router refused a PUBREL; mesh input stops");
                            return;
                        }
                        None
                    }
                    Ok(Some(Packet::PubAck(ack, _))) => Some(ack.pkid),
                    Ok(Some(Packet::PubComp(comp, _))) => Some(comp.pkid),
                    Ok(_) => None,
                    Err(e) => {
                        tracing::error!(error = %e, "the router closed the mesh link; mesh input stops");
                        return;
                    }
                };
                if let Some(Some((peer, epoch, seq))) = done.and_then(|p| in_flight.remove(&p)) {
                    mesh.delivery_accepted(&peer, epoch, seq);
                }
                continue;
            }
        };
        if let Some(interval) = m.message_expiry_interval {
            let waited = u32::try_from(received.elapsed().as_secs()).unwrap_or(u32::MAX);
            match interval.checked_sub(waited).filter(|r| *r > 0) {
                Some(remaining) => m.message_expiry_interval = Some(remaining),
                None => {
                    // nothing to deliver: done
                    if let Some((epoch, seq)) = seq {
                        mesh.delivery_accepted(&peer, epoch, seq);
                    }
                    continue;
                }
            }
        }
        // Before the router has it: see `Replication::restore`.
        if let Some(r) = mesh.replication.get() {
            r.record_injected(&m);
        }
        let props = crate::tap::take_properties(&mut m);
        let qos = match m.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        if qos != QoS::AtMostOnce {
            // the next packet id not in flight (at most MAX_IN_FLIGHT of 65535 are)
            for _ in 0..=MAX_IN_FLIGHT {
                pkid = pkid.checked_add(1).unwrap_or(1);
                if !in_flight.contains_key(&pkid) {
                    break;
                }
            }
            in_flight.insert(pkid, seq.map(|(epoch, seq)| (peer.clone(), epoch, seq)));
        }
        let publish = Publish::new(m.topic, m.payload, m.retain).with_qos(qos, pkid);
        if let Err(e) = link_tx.send(Packet::Publish(publish, props)).await {
            tracing::error!(peer, error = %e, "router refused a publish from a peer; mesh input stops");
            return;
        }
        if qos == QoS::AtMostOnce {
            if let Some((epoch, seq)) = seq {
                mesh.delivery_accepted(&peer, epoch, seq);
            }
        }
    }
}
