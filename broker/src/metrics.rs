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
                    "Publishes not sent to a peer: queue_full (peer slow or down), link_error, expired (its message expiry interval passed while it was queued).",
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
        Ok(m)
    }

    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}
