//! Prometheus metrics of one LB instance. The names are a public contract (docs/design.md); each
//! instance has its own registry so several LBs can live in one process (tests, embedding).

use crate::outcome::Outcome;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Label pairs whose series left with a new snapshot (`Snapshot::departed`), to forget. Here
/// rather than in `snapshot`, which reads the metrics, so that the metrics do not read it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Departed {
    /// (pool, backend): `mqlb_backend_up`, the probe series, passive failures.
    pub pool_members: Vec<(String, String)>,
    /// (rule, backend): connection and byte series.
    pub rule_members: Vec<(String, String)>,
}

/// Every `result` label of `mqlb_probes_total`: "ok" and each `ProbeError::label`
/// (`health::probe`), so the series of a departed member can be removed by name.
pub const PROBE_RESULTS: [&str; 8] = [
    "ok",
    "timeout",
    "connect_error",
    "bad_status",
    "http_error",
    "mqtt_refused",
    "mqtt_error",
    "tls_error",
];

/// Every metric the LB exports.
pub struct Metrics {
    registry: Registry,
    pub connections_active: IntGaugeVec,
    pub connections_total: IntCounterVec,
    /// Counted when a connection is accepted (past the limits), so new connections per second
    /// can be graphed (Azure's SYN count); `mqlb_connections_total` counts at the end.
    pub connections_opened_total: IntCounterVec,
    pub bytes_total: IntCounterVec,
    pub backend_up: IntGaugeVec,
    pub probe_duration: HistogramVec,
    pub probes_total: IntCounterVec,
    pub route_decisions_total: IntCounterVec,
    pub mqtt_connect_errors_total: IntCounterVec,
    pub config_reloads_total: IntCounterVec,
    pub data_path_up: IntGaugeVec,
    pub passive_failures_total: IntCounterVec,
    pub refused_total: IntCounterVec,
    pub tls_handshakes_total: IntCounterVec,
    pub tls_handshake_errors_total: IntCounterVec,
    pub tls_cert_expiry: IntGaugeVec,
    pub proxy_header_errors_total: IntCounterVec,
    pub backend_tls_handshake_errors_total: IntCounterVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    /// The registry, for the series a module keeps itself (`evacuate`).
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let m = Metrics {
            connections_active: IntGaugeVec::new(
                opts("mqlb_connections_active", "Proxied connections open now."),
                &["rule", "backend"],
            )?,
            connections_total: IntCounterVec::new(
                opts(
                    "mqlb_connections_total",
                    "Client connections by how they ended (outcome names who failed).",
                ),
                &["rule", "backend", "outcome"],
            )?,
            connections_opened_total: IntCounterVec::new(
                opts(
                    "mqlb_connections_opened_total",
                    "Client connections accepted past the connection limits, counted at accept.",
                ),
                &["rule"],
            )?,
            bytes_total: IntCounterVec::new(
                opts(
                    "mqlb_bytes_total",
                    "Bytes proxied; direction=in is client to backend, out is backend to client.",
                ),
                &["rule", "backend", "direction"],
            )?,
            backend_up: IntGaugeVec::new(
                opts(
                    "mqlb_backend_up",
                    "1 when the backend's health is up, else 0.",
                ),
                &["pool", "backend"],
            )?,
            probe_duration: HistogramVec::new(
                HistogramOpts::new("mqlb_probe_duration_seconds", "Health probe duration.")
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0,
                    ]),
                &["pool", "backend"],
            )?,
            probes_total: IntCounterVec::new(
                opts(
                    "mqlb_probes_total",
                    "Health probes by result (ok or the failure).",
                ),
                &["pool", "backend", "result"],
            )?,
            route_decisions_total: IntCounterVec::new(
                opts(
                    "mqlb_route_decisions_total",
                    "Routing decisions by the key used.",
                ),
                &["rule", "method"],
            )?,
            mqtt_connect_errors_total: IntCounterVec::new(
                opts(
                    "mqlb_mqtt_connect_errors_total",
                    "Connections whose CONNECT could not be used, by reason.",
                ),
                &["rule", "reason"],
            )?,
            config_reloads_total: IntCounterVec::new(
                opts(
                    "mqlb_config_reloads_total",
                    "Configuration reloads by result.",
                ),
                &["result"],
            )?,
            data_path_up: IntGaugeVec::new(
                opts(
                    "mqlb_data_path_up",
                    "1 when a probe through the rule's frontend reached a backend.",
                ),
                &["rule"],
            )?,
            passive_failures_total: IntCounterVec::new(
                opts(
                    "mqlb_backend_connect_failures_total",
                    "Failed connects to a backend by client traffic (passive health).",
                ),
                &["pool", "backend"],
            )?,
            refused_total: IntCounterVec::new(
                opts(
                    "mqlb_connections_refused_total",
                    "Connections reset at accept by a connection limit, by frontend and limit.",
                ),
                &["frontend", "reason"],
            )?,
            tls_handshakes_total: IntCounterVec::new(
                opts(
                    "mqlb_tls_handshakes_total",
                    "TLS handshakes completed on a frontend that terminates TLS.",
                ),
                &["frontend"],
            )?,
            tls_handshake_errors_total: IntCounterVec::new(
                opts(
                    "mqlb_tls_handshake_errors_total",
                    "TLS handshakes that failed, by reason; the connection is closed, never passed on.",
                ),
                &["frontend", "reason"],
            )?,
            tls_cert_expiry: IntGaugeVec::new(
                opts(
                    "mqlb_tls_cert_expiry_seconds",
                    "When the first of the certificates a TLS frontend serves expires (the earliest notAfter), in seconds since the Unix epoch.",
                ),
                &["frontend"],
            )?,
            proxy_header_errors_total: IntCounterVec::new(
                opts(
                    "mqlb_proxy_header_errors_total",
                    "Connections from an accept_proxy source refused for their PROXY header, by reason; never passed on.",
                ),
                &["frontend", "reason"],
            )?,
            backend_tls_handshake_errors_total: IntCounterVec::new(
                opts(
                    "mqlb_backend_tls_handshake_errors_total",
                    "TLS handshakes with a member of a pool with tls that failed, by reason (certificate: it did not verify); each a failed connect, tried on the next member.",
                ),
                &["pool", "backend", "reason"],
            )?,
            registry,
        };
        m.registry
            .register(Box::new(m.connections_active.clone()))?;
        m.registry.register(Box::new(m.connections_total.clone()))?;
        m.registry
            .register(Box::new(m.connections_opened_total.clone()))?;
        m.registry.register(Box::new(m.bytes_total.clone()))?;
        m.registry.register(Box::new(m.backend_up.clone()))?;
        m.registry.register(Box::new(m.probe_duration.clone()))?;
        m.registry.register(Box::new(m.probes_total.clone()))?;
        m.registry
            .register(Box::new(m.route_decisions_total.clone()))?;
        m.registry
            .register(Box::new(m.mqtt_connect_errors_total.clone()))?;
        m.registry
            .register(Box::new(m.config_reloads_total.clone()))?;
        m.registry.register(Box::new(m.data_path_up.clone()))?;
        m.registry
            .register(Box::new(m.passive_failures_total.clone()))?;
        m.registry.register(Box::new(m.refused_total.clone()))?;
        m.registry
            .register(Box::new(m.tls_handshakes_total.clone()))?;
        m.registry
            .register(Box::new(m.tls_handshake_errors_total.clone()))?;
        m.registry.register(Box::new(m.tls_cert_expiry.clone()))?;
        m.registry
            .register(Box::new(m.proxy_header_errors_total.clone()))?;
        m.registry
            .register(Box::new(m.backend_tls_handshake_errors_total.clone()))?;
        // CPU seconds, resident memory, open descriptors, start time: the standard process_*
        // series, so the LB's own cost sits beside its traffic on a dashboard.
        mqlb_http::metrics::register_process(&m.registry)?;
        // Make the reload counter visible before the first reload.
        for r in ["ok", "error"] {
            m.config_reloads_total.with_label_values(&[r]);
        }
        Ok(m)
    }

    /// `mqlb_connections_total` by label lookup: every outcome but the common one, which
    /// `snapshot::MemberMetrics::finish` counts by a cached handle.
    pub fn count_end(&self, rule: &str, backend: &str, outcome: Outcome) {
        self.connections_total
            .with_label_values(&[rule, backend, outcome.label()])
            .inc();
    }

    /// Removes every series of members that left (their label values are known: the outcome,
    /// direction and probe-result label sets are closed).
    pub fn forget(&self, gone: &Departed) {
        for (pool, backend) in &gone.pool_members {
            let pb = [pool.as_str(), backend.as_str()];
            self.backend_up.remove_label_values(&pb).ok();
            self.probe_duration.remove_label_values(&pb).ok();
            self.passive_failures_total.remove_label_values(&pb).ok();
            for result in PROBE_RESULTS {
                self.probes_total
                    .remove_label_values(&[pool.as_str(), backend.as_str(), result])
                    .ok();
            }
            for reason in crate::backend::tls::TlsFail::REASONS {
                self.backend_tls_handshake_errors_total
                    .remove_label_values(&[pool.as_str(), backend.as_str(), reason])
                    .ok();
            }
        }
        for (rule, backend) in &gone.rule_members {
            let (r, b) = (rule.as_str(), backend.as_str());
            self.connections_active.remove_label_values(&[r, b]).ok();
            for outcome in Outcome::ALL {
                self.connections_total
                    .remove_label_values(&[r, b, outcome.label()])
                    .ok();
            }
            for direction in ["in", "out"] {
                self.bytes_total
                    .remove_label_values(&[r, b, direction])
                    .ok();
            }
        }
    }

    /// `mqlb_tls_cert_expiry_seconds` of the certificates `frontends` serve now: a frontend
    /// that no longer terminates TLS (or is gone) loses its series. A timestamp rather than the
    /// time left, so it changes only when a certificate does; alert on
    /// `mqlb_tls_cert_expiry_seconds - time() < 14 * 86400`.
    pub fn tls_certificates(&self, frontends: &[mqlb_config::Frontend]) {
        self.tls_cert_expiry.reset();
        for f in frontends {
            if let Some(at) = f.tls.as_ref().and_then(|t| t.server.not_after()) {
                self.tls_cert_expiry.with_label_values(&[&f.name]).set(at);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        mqlb_http::metrics::render(&self.registry)
    }
}
