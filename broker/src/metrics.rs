//! Prometheus metrics of one broker node: what crossed each mesh link, link state, drops.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// Publishes from this node's own clients (each is offered to every peer).
    pub local_publishes: IntCounter,
    pub forwarded: IntCounterVec,
    pub received: IntCounterVec,
    pub dropped: IntCounterVec,
    pub link_up: IntGaugeVec,
    pub rejected: IntCounterVec,
    /// Acknowledged delivery (issue 12): numbered frames sent again after a reconnect,
    /// re-sends dropped as already delivered, numbers a peer never sent, and the frames kept
    /// per peer until it acknowledges them.
    pub resent: IntCounterVec,
    pub duplicates: IntCounterVec,
    pub skipped: IntCounterVec,
    pub unacked: IntGaugeVec,
    pub listener_restarts: IntCounter,
    /// MQTT requests the password file or the ACL refused, by what was refused.
    pub auth_refused: IntCounterVec,
    /// Reloads of the password and ACL files, by result (ok, error).
    pub auth_reloads: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
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
                    "Inbound mesh connections refused, by reason (auth, version, garbage, ...).",
                ),
                &["reason"],
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
            registry,
        };
        m.registry.register(Box::new(m.auth_refused.clone()))?;
        m.registry.register(Box::new(m.auth_reloads.clone()))?;
        m.registry.register(Box::new(m.listener_restarts.clone()))?;
        m.registry.register(Box::new(m.local_publishes.clone()))?;
        m.registry.register(Box::new(m.forwarded.clone()))?;
        m.registry.register(Box::new(m.received.clone()))?;
        m.registry.register(Box::new(m.dropped.clone()))?;
        m.registry.register(Box::new(m.link_up.clone()))?;
        m.registry.register(Box::new(m.rejected.clone()))?;
        m.registry.register(Box::new(m.resent.clone()))?;
        m.registry.register(Box::new(m.duplicates.clone()))?;
        m.registry.register(Box::new(m.skipped.clone()))?;
        m.registry.register(Box::new(m.unacked.clone()))?;
        Ok(m)
    }

    /// Adds metrics kept elsewhere (sessions across the cluster, issue 12).
    pub(crate) fn register(
        &self,
        c: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(c)
    }

    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}
