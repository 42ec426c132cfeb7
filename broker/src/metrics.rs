//! Prometheus metrics of one broker node: its clients, sessions and messages, what crossed
//! each mesh link, link state, drops. What rumqttd's router holds (sessions, retained
//! messages, its drops) is asked for at each scrape ([`Metrics::refresh`]); what crosses a
//! client's connection is counted in its codec ([`crate::counted`]).

use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use rumqttd::protocol::QoS;
use rumqttd::{Dropped, StatsControl};

use crate::mesh::Mesh;

/// QoS label values, indexed by QoS.
const QOS: [&str; 3] = ["0", "1", "2"];

/// Local links the node itself keeps open to its router (the mesh's injector), which the
/// router counts among its connections but are no clients.
const OWN_LINKS: i64 = 1;

pub struct Metrics {
    registry: Registry,
    /// Publishes from this node's own clients (each is offered to every peer).
    pub local_publishes: IntCounter,
    pub forwarded: IntCounterVec,
    pub received: IntCounterVec,
    pub dropped: IntCounterVec,
    pub link_up: IntGaugeVec,
    pub rejected: IntCounterVec,
    /// `[cluster] tls` (issue 15): when this node's mesh certificate expires, by its file.
    pub mesh_tls_cert_expiry: IntGaugeVec,
    /// Acknowledged delivery (issue 12): numbered frames sent again after a reconnect,
    /// re-sends dropped as already delivered, numbers a peer never sent, and the frames kept
    /// per peer until it acknowledges them.
    pub resent: IntCounterVec,
    pub duplicates: IntCounterVec,
    pub skipped: IntCounterVec,
    pub unacked: IntGaugeVec,
    /// Seconds the oldest QoS 1/2 publish kept for a peer has waited for its acknowledgement
    /// (issue 17: the mesh's lag per peer), as of the link's last event.
    pub lag: prometheus::GaugeVec,
    /// A local client's QoS 1/2 PUBLISH acknowledged before every peer held it: a peer up
    /// but silent for the whole bound (issue 12; `mesh::ACK_WAIT_MAX`).
    pub ack_wait_timeouts: IntCounter,
    pub listener_restarts: IntCounter,
    /// MQTT requests the password file or the ACL refused, by what was refused.
    pub auth_refused: IntCounterVec,
    /// Reloads of the password and ACL files, by result (ok, error).
    pub auth_reloads: IntCounterVec,
    /// PUBLISH packets read from and written to this node's clients, by QoS (issue 17).
    pub messages_received: [IntCounter; 3],
    pub messages_sent: [IntCounter; 3],
    /// Of those sent, the QoS 1/2 ones sent again with DUP 1 (issue 12's redeliveries).
    pub messages_redelivered: IntCounter,
    /// The router's drops by reason and QoS, brought up to the router's count at each scrape.
    dropped_messages: IntCounterVec,
    clients: IntGauge,
    sessions: IntGaugeVec,
    retained: IntGauge,
    filters: IntGauge,
    backlog: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let received = IntCounterVec::new(
            Opts::new(
                "mqlb_broker_messages_received_total",
                "PUBLISH packets read from this node's MQTT clients, by QoS (a re-sent one counts again).",
            ),
            &["qos"],
        )?;
        let sent = IntCounterVec::new(
            Opts::new(
                "mqlb_broker_messages_sent_total",
                "PUBLISH packets written to this node's MQTT clients, by QoS (a re-sent one counts again).",
            ),
            &["qos"],
        )?;
        let m = Metrics {
            local_publishes: IntCounter::new(
                "mqlb_broker_local_publishes_total",
                "PUBLISH packets from this node's own clients.",
            )?,
            forwarded: IntCounterVec::new(
                Opts::new(
                    "mqlb_mesh_forwarded_total",
                    "Publishes sent to a peer node.",
                ),
                &["peer"],
            )?,
            received: IntCounterVec::new(
                Opts::new(
                    "mqlb_mesh_received_total",
                    "Publishes received from a peer node and delivered to this node's router.",
                ),
                &["peer"],
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "mqlb_mesh_dropped_total",
                    "Publishes not sent to a peer: queue_full (peer slow or down), link_error (QoS 0 in flight on a broken link), expired (its message expiry interval passed while it was queued), unacked_full (a QoS 1/2 one the peer had not acknowledged, the oldest, dropped to keep the bound).",
                ),
                &["peer", "reason"],
            )?,
            link_up: IntGaugeVec::new(
                Opts::new(
                    "mqlb_mesh_link_up",
                    "1 while the link to the peer is authenticated and open.",
                ),
                &["peer"],
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "mqlb_mesh_rejected_total",
                    "Mesh links refused, by reason: inbound (auth, version, garbage, ...) and, both ways, TLS (plaintext: a plaintext peer at a TLS node; unexpected_tls: a TLS peer at a plaintext node; certificate: one side did not accept the other's; tls: another TLS failure).",
                ),
                &["reason"],
            )?,
            mesh_tls_cert_expiry: IntGaugeVec::new(
                Opts::new(
                    "mqlb_mesh_tls_cert_expiry_seconds",
                    "When this node's mesh certificate (cluster.tls.cert) expires, Unix seconds; absent without mesh TLS.",
                ),
                &["cert"],
            )?,
            resent: IntCounterVec::new(
                Opts::new(
                    "mqlb_mesh_resent_total",
                    "QoS 1/2 publishes sent to a peer again on a new link, as it had not acknowledged them.",
                ),
                &["peer"],
            )?,
            duplicates: IntCounterVec::new(
                Opts::new(
                    "mqlb_mesh_duplicates_total",
                    "QoS 1/2 publishes a peer sent again that this node had already delivered (dropped).",
                ),
                &["peer"],
            )?,
            skipped: IntCounterVec::new(
                Opts::new(
                    "mqlb_mesh_sequence_gaps_total",
                    "Numbered publishes a peer never sent to this node (dropped there, see its mqlb_mesh_dropped_total).",
                ),
                &["peer"],
            )?,
            unacked: IntGaugeVec::new(
                Opts::new(
                    "mqlb_mesh_unacked",
                    "QoS 1/2 publishes sent to a peer and kept until it acknowledges them.",
                ),
                &["peer"],
            )?,
            lag: prometheus::GaugeVec::new(
                Opts::new(
                    "mqlb_mesh_lag_seconds",
                    "Age of the oldest QoS 1/2 publish sent to a peer and not yet acknowledged (0: none), as of the link's last send, acknowledgement or failure.",
                ),
                &["peer"],
            )?,
            ack_wait_timeouts: IntCounter::new(
                "mqlb_mesh_ack_wait_timeouts_total",
                "QoS 1/2 publishes of this node's clients whose PUBACK/PUBREC went out after the bound (1 s) without every peer whose link was up having acknowledged the message.",
            )?,
            listener_restarts: IntCounter::new(
                "mqlb_broker_listener_restarts_total",
                "MQTT listeners replaced after they stopped answering CONNECT (rumqttd 0.20 bug).",
            )?,
            auth_refused: IntCounterVec::new(
                Opts::new(
                    "mqlb_broker_auth_refused_total",
                    "MQTT requests refused by [auth]: connect (login), will, publish, subscribe, deliver (a message a subscriber may not read).",
                ),
                &["what"],
            )?,
            auth_reloads: IntCounterVec::new(
                Opts::new(
                    "mqlb_broker_auth_reloads_total",
                    "Reloads of the password and ACL files (SIGHUP), by result: ok, error (the old ones stay).",
                ),
                &["result"],
            )?,
            messages_received: per_qos(&received)?,
            messages_sent: per_qos(&sent)?,
            messages_redelivered: IntCounter::new(
                "mqlb_broker_messages_redelivered_total",
                "QoS 1/2 PUBLISH packets written to this node's clients again, with DUP 1: deliveries a resumed or moved session's client had not acknowledged.",
            )?,
            dropped_messages: IntCounterVec::new(
                Opts::new(
                    "mqlb_broker_messages_dropped_total",
                    "Messages the node's router did not deliver, by QoS and reason: not_authorized (a PUBLISH the ACL refused), invalid (a PUBLISH it could not take; the client was disconnected), expired (once per subscriber whose copy's message expiry passed before it was sent), queue_full (queued for a persistent session while its client was away, beyond broker.max_queued_messages: QoS 0 first, then the oldest).",
                ),
                &["qos", "reason"],
            )?,
            clients: IntGauge::new(
                "mqlb_broker_clients_connected",
                "MQTT client connections open on this node.",
            )?,
            sessions: IntGaugeVec::new(
                Opts::new(
                    "mqlb_broker_sessions",
                    "Persistent sessions (clean session 0, or a session expiry interval) by state: online (its client is connected here), offline (saved, waiting for its client).",
                ),
                &["state"],
            )?,
            retained: IntGauge::new(
                "mqlb_broker_retained_messages",
                "Retained messages this node holds.",
            )?,
            filters: IntGauge::new(
                "mqlb_broker_subscription_filters",
                "Distinct subscription filters with at least one subscriber on this node.",
            )?,
            backlog: IntGaugeVec::new(
                Opts::new(
                    "mqlb_mesh_backlog",
                    "Frames queued for a peer and not yet written to its link (at most cluster.peer_queue; beyond, they are dropped).",
                ),
                &["peer"],
            )?,
            registry,
        };
        m.registry.register(Box::new(received))?;
        m.registry.register(Box::new(sent))?;
        m.registry.register(Box::new(m.dropped_messages.clone()))?;
        m.registry.register(Box::new(m.clients.clone()))?;
        m.registry.register(Box::new(m.sessions.clone()))?;
        m.registry.register(Box::new(m.retained.clone()))?;
        m.registry.register(Box::new(m.filters.clone()))?;
        m.registry.register(Box::new(m.backlog.clone()))?;
        for state in ["online", "offline"] {
            m.sessions.with_label_values(&[state]);
        }
        for reason in Dropped::ALL {
            for qos in QOS {
                m.dropped_messages.with_label_values(&[qos, reason.label()]);
            }
        }
        // The standard process_* series (CPU seconds, resident memory, open descriptors,
        // start time), from procfs. Several in-process nodes (tests) each report the process.
        mqlb_http::metrics::register_process(&m.registry)?;
        m.registry.register(Box::new(m.auth_refused.clone()))?;
        m.registry.register(Box::new(m.auth_reloads.clone()))?;
        m.registry.register(Box::new(m.listener_restarts.clone()))?;
        m.registry.register(Box::new(m.local_publishes.clone()))?;
        m.registry.register(Box::new(m.forwarded.clone()))?;
        m.registry.register(Box::new(m.received.clone()))?;
        m.registry.register(Box::new(m.dropped.clone()))?;
        m.registry.register(Box::new(m.link_up.clone()))?;
        m.registry.register(Box::new(m.rejected.clone()))?;
        m.registry
            .register(Box::new(m.mesh_tls_cert_expiry.clone()))?;
        m.registry.register(Box::new(m.resent.clone()))?;
        m.registry.register(Box::new(m.duplicates.clone()))?;
        m.registry.register(Box::new(m.skipped.clone()))?;
        m.registry.register(Box::new(m.unacked.clone()))?;
        m.registry.register(Box::new(m.lag.clone()))?;
        m.registry.register(Box::new(m.ack_wait_timeouts.clone()))?;
        m.registry
            .register(Box::new(m.messages_redelivered.clone()))?;
        Ok(m)
    }

    /// The registry `/metrics` renders, for series kept elsewhere (the HTTP server's).
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Adds metrics kept elsewhere (sessions across the cluster, issue 12).
    pub(crate) fn register(
        &self,
        c: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(c)
    }

    /// Brings the router's and the mesh's state into the metrics; called before each scrape.
    /// A router that does not answer within a second leaves the last values (logged).
    pub(crate) async fn refresh(&self, router: &StatsControl, mesh: &Mesh) {
        for p in mesh.peers().iter() {
            self.backlog
                .with_label_values(&[&p.id])
                .set(i64::try_from(p.backlog()).unwrap_or(i64::MAX));
        }
        let stats = match tokio::time::timeout(Duration::from_secs(1), router.stats()).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::warn!("router gone: its metrics are not refreshed");
                return;
            }
            Err(_) => {
                tracing::warn!("router did not answer in 1 s: its metrics are not refreshed");
                return;
            }
        };
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.clients
            .set((gauge(stats.connections) - OWN_LINKS).max(0));
        self.sessions
            .with_label_values(&["online"])
            .set(gauge(stats.persistent_online));
        self.sessions
            .with_label_values(&["offline"])
            .set(gauge(stats.persistent_offline));
        self.retained.set(gauge(stats.retained));
        self.filters.set(gauge(stats.filters));
        for reason in Dropped::ALL {
            for (qos, q) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
                .into_iter()
                .zip(QOS)
            {
                let c = self
                    .dropped_messages
                    .with_label_values(&[q, reason.label()]);
                let behind = stats.dropped(reason, qos).saturating_sub(c.get());
                c.inc_by(behind);
            }
        }
    }

    pub fn render(&self) -> Result<String, prometheus::Error> {
        mqlb_http::metrics::render(&self.registry)
    }
}

/// The counters of `vec` for QoS 0, 1 and 2, so the codec counts without a label lookup.
fn per_qos(vec: &IntCounterVec) -> Result<[IntCounter; 3], prometheus::Error> {
    Ok([
        vec.get_metric_with_label_values(&[QOS[0]])?,
        vec.get_metric_with_label_values(&[QOS[1]])?,
        vec.get_metric_with_label_values(&[QOS[2]])?,
    ])
}
