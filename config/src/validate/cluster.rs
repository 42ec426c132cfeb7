//! `[cluster]` and `[[broker]]`: the broker nodes and how they talk to each other.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;

use super::{Checker, UNPARSED_ADDR};
use crate::defaults::*;
use crate::model::{BrokerNode, ClusterSettings, Secret};
use crate::raw::{RawBroker, RawCluster, RawConfig, RawMeshTls};
use crate::tls::TlsError;

pub(super) fn validate_cluster(
    c: &mut Checker,
    raw: &RawConfig,
) -> (ClusterSettings, Vec<BrokerNode>) {
    let mut cluster = cluster_section(c, &raw.cluster);
    cluster.durable_retained = raw
        .cluster
        .durable_retained
        .unwrap_or(DEFAULT_DURABLE_RETAINED && !raw.haservers.is_empty());
    let several = raw.brokers.len() > 1;
    let mut ids = HashSet::new();
    let mut addrs = HashMap::new();
    let mut brokers = Vec::new();
    for (i, b) in raw.brokers.iter().enumerate() {
        let k = format!("broker[{i}]");
        c.name(&format!("{k}.id"), &b.id, &mut ids, "broker");
        brokers.push(broker(c, &k, b, &mut addrs, several));
    }
    if several {
        cluster_secret(c, &raw.cluster);
    }
    (cluster, brokers)
}

fn cluster_section(c: &mut Checker, rc: &RawCluster) -> ClusterSettings {
    let secret = rc.secret.as_ref().map(Secret::new);
    let reconnect_min = c.duration(
        "cluster.reconnect_min",
        rc.reconnect_min.as_deref(),
        DEFAULT_RECONNECT_MIN,
    );
    let reconnect_max = c.duration(
        "cluster.reconnect_max",
        rc.reconnect_max.as_deref(),
        DEFAULT_RECONNECT_MAX,
    );
    if reconnect_max < reconnect_min {
        c.error("cluster.reconnect_max", "must not be below reconnect_min");
    }
    ClusterSettings {
        secret,
        tls: rc.tls.as_ref().and_then(|t| mesh_tls(c, t)),
        peer_queue: c.non_zero("cluster.peer_queue", rc.peer_queue, DEFAULT_PEER_QUEUE),
        replicate_sessions: rc.replicate_sessions.unwrap_or(DEFAULT_REPLICATE_SESSIONS),
        replica_max_messages: c.non_zero(
            "cluster.replica_max_messages",
            rc.replica_max_messages,
            DEFAULT_REPLICA_MAX_MESSAGES,
        ),
        replication_factor: c.non_zero(
            "cluster.replication_factor",
            rc.replication_factor,
            DEFAULT_REPLICATION_FACTOR,
        ),
        durable_retained: false, // set by `validate_cluster`, which sees `[[haserver]]`
        reconnect_min,
        reconnect_max,
    }
}

/// One node; `addrs` holds the addresses of the nodes before it (keyed like the file), so no
/// two listeners share one; `several`: the cluster has more than one node.
fn broker(
    c: &mut Checker,
    k: &str,
    b: &RawBroker,
    addrs: &mut HashMap<SocketAddr, String>,
    several: bool,
) -> BrokerNode {
    let mut addr = |c: &mut Checker, key: &str, text: Option<&str>| -> Option<SocketAddr> {
        let full = format!("{k}.{key}");
        let a = c.addr(&full, text?)?;
        if a.port() != 0 {
            if let Some(other) = addrs.insert(a, full.clone()) {
                c.error(&full, format!("address {a} is also {other}"));
            }
        }
        Some(a)
    };
    let mqtt = addr(c, "mqtt", Some(&b.mqtt));
    let mqtt_v5 = addr(c, "mqtt_v5", b.mqtt_v5.as_deref());
    let mesh = addr(c, "mesh", b.mesh.as_deref());
    let http = addr(c, "http", b.http.as_deref());
    if several && b.mesh.is_none() {
        c.error(
            format!("{k}.mesh"),
            "a cluster of several brokers needs each node's mesh address",
        );
    }
    let max_payload_size = max_payload_size(c, k, b);
    let mqtts = addr(c, "mqtts", b.mqtts.as_deref());
    let mqtts_v5 = addr(c, "mqtts_v5", b.mqtts_v5.as_deref());
    let who = format!("broker {:?}", b.id);
    let tls = broker_tls(c, k, &who, b);
    let accept_proxy = super::frontends::accept_proxy(c, k, &who, b.accept_proxy.as_deref());
    BrokerNode {
        mqtts,
        mqtts_v5,
        tls,
        accept_proxy,
        handshake_timeout: c.duration(
            &format!("{k}.handshake_timeout"),
            b.handshake_timeout.as_deref(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        ),
        id: b.id.clone(),
        mqtt: mqtt.unwrap_or(UNPARSED_ADDR),
        mqtt_v5,
        mesh,
        http,
        http_token: c.token_file(
            &format!("{k}.http_token_file"),
            b.http_token_file.as_deref(),
        ),
        max_connections: c.non_zero(
            &format!("{k}.max_connections"),
            b.max_connections,
            DEFAULT_MAX_CONNECTIONS,
        ),
        max_payload_size,
        max_inflight: c.non_zero(
            &format!("{k}.max_inflight"),
            b.max_inflight,
            DEFAULT_MAX_INFLIGHT,
        ),
        max_queued_messages: c.non_zero(
            &format!("{k}.max_queued_messages"),
            b.max_queued_messages,
            DEFAULT_MAX_QUEUED,
        ),
        backlog: c.non_zero(&format!("{k}.backlog"), b.backlog, DEFAULT_BACKLOG),
    }
}

/// `tls` of a broker: a frontend's checks and builder; needed by `mqtts` / `mqtts_v5`, and
/// useless without one of them. `client_id = "cn"` is a frontend's rule (the LB refuses the
/// CONNECT); a broker does not enforce it, so it is refused rather than ignored.
fn broker_tls(
    c: &mut Checker,
    k: &str,
    who: &str,
    b: &RawBroker,
) -> Option<crate::tls::FrontendTls> {
    let listeners = b.mqtts.is_some() || b.mqtts_v5.is_some();
    let Some(t) = &b.tls else {
        if listeners {
            c.error(
                format!("{k}.tls"),
                format!("{who}: mqtts / mqtts_v5 need tls = {{ cert, key }}"),
            );
        }
        return None;
    };
    if !listeners {
        c.error(
            format!("{k}.tls"),
            format!("{who}: tls is set but no mqtts or mqtts_v5 listener uses it"),
        );
    }
    if t.client_id.is_some() {
        c.error(
            format!("{k}.tls.client_id"),
            format!("{who}: client_id is a frontend's rule; a broker does not check it"),
        );
        return None;
    }
    super::frontends::tls(c, k, who, t)
}

fn max_payload_size(c: &mut Checker, k: &str, b: &RawBroker) -> NonZeroU32 {
    let size = c.non_zero(
        &format!("{k}.max_payload_size"),
        b.max_payload_size,
        DEFAULT_MAX_PAYLOAD,
    );
    if size.get() > MAX_PAYLOAD {
        c.error(
            format!("{k}.max_payload_size"),
            format!("MQTT payloads cannot exceed {MAX_PAYLOAD} bytes"),
        );
    }
    size
}

/// A cluster of several nodes authenticates its links with `cluster.secret`.
fn cluster_secret(c: &mut Checker, rc: &RawCluster) {
    match &rc.secret {
        None => c.error(
            "cluster.secret",
            "a cluster of several brokers needs a shared secret",
        ),
        Some(s) if s.len() < MIN_SECRET_LEN => c.error(
            "cluster.secret",
            format!("must be at least {MIN_SECRET_LEN} characters"),
        ),
        Some(_) => {}
    }
}

/// `cluster.tls`: the files are read and both sides' configurations built now, so a missing
/// file, a key that does not fit or a CA file without a certificate is refused at load with
/// the key of the file; a `server_name` must be a DNS name.
fn mesh_tls(c: &mut Checker, t: &RawMeshTls) -> Option<crate::MeshTls> {
    if let Some(name) = &t.server_name {
        let dns = rustls::pki_types::DnsName::try_from(name.as_str()).is_ok();
        if !dns || name.parse::<std::net::IpAddr>().is_ok() {
            c.error(
                "cluster.tls.server_name",
                format!(
                    "{name:?} is not a DNS name (without server_name a peer's certificate is \
                     checked for the IP address it is dialed at)"
                ),
            );
            return None;
        }
    }
    let (cert, key, ca) = (Path::new(&t.cert), Path::new(&t.key), Path::new(&t.ca));
    match crate::tls::mesh(cert, key, ca, t.server_name.as_deref()) {
        Ok(tls) => Some(tls),
        Err(e) => {
            let file = match &e {
                TlsError::Read { file, .. }
                | TlsError::NoCertificate { file }
                | TlsError::Pem { file, .. }
                | TlsError::NoKey { file } => Some(file.as_path()),
                TlsError::Rejected { .. } => Some(key),
                TlsError::Setup(_) | TlsError::Name { .. } => None,
            };
            // The same file may be given twice (cert and key in one PEM): the first key wins.
            let which = match file {
                Some(f) if f == cert => "cert",
                Some(f) if f == key => "key",
                Some(f) if f == ca => "ca",
                _ => "cert",
            };
            c.error(format!("cluster.tls.{which}"), format!("mesh links: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Config, ConfigError};

    /// A cluster of two with `tls = {TLS}` (`DIR`: the test's directory, which holds a CA's
    /// certificate `ca.pem`, and `node.pem` / `node.key` it signed for 127.0.0.1).
    fn cluster(dir: &std::path::Path, tls: &str) -> Result<Config, ConfigError> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
        let key = KeyPair::generate().expect("key");
        let node = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("leaf");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("ca");
        std::fs::write(dir.join("node.pem"), node.pem()).expect("cert");
        std::fs::write(dir.join("node.key"), key.serialize_pem()).expect("key");
        std::fs::write(dir.join("junk.pem"), "junk").expect("junk");
        let tls = tls.replace("DIR", &dir.display().to_string());
        let mut text = format!("[cluster]\nsecret = \"0123456789abcdef\"\ntls = {tls}\n");
        for i in 1..=2 {
            text.push_str(&format!(
                "[[broker]]\nid = \"n{i}\"\nmqtt = \"127.0.0.1:10{i}1\"\nmesh = \"127.0.0.1:10{i}2\"\n"
            ));
        }
        Config::parse(&text, "t.toml")
    }

    #[test]
    fn cluster_tls_builds_both_sides_of_the_links_at_load() {
        let dir = tempfile::tempdir().expect("dir");
        let files = r#"cert = "DIR/node.pem", key = "DIR/node.key", ca = "DIR/ca.pem""#;
        let c = cluster(dir.path(), &format!("{{ {files} }}")).expect("valid");
        let tls = c.cluster.tls.expect("tls");
        assert_eq!(tls.ca, dir.path().join("ca.pem"));
        assert_eq!(tls.server_name, None);
        assert_eq!(
            tls.client.config().alpn_protocols,
            [crate::tls::MESH_ALPN.as_bytes().to_vec()]
        );
        assert_eq!(
            tls.server.config().alpn_protocols,
            tls.client.config().alpn_protocols
        );
        let named = format!("{{ {files}, server_name = \"mesh.example\" }}");
        let c = cluster(dir.path(), &named).expect("valid");
        assert_eq!(
            c.cluster.tls.and_then(|t| t.server_name).as_deref(),
            Some("mesh.example")
        );
    }

    #[test]
    fn unusable_cluster_tls_is_refused_naming_the_key_and_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let cases = [
            (
                r#"{ cert = "DIR/none.pem", key = "DIR/node.key", ca = "DIR/ca.pem" }"#,
                "cluster.tls.cert",
                "none.pem",
            ),
            (
                r#"{ cert = "DIR/node.pem", key = "DIR/junk.pem", ca = "DIR/ca.pem" }"#,
                "cluster.tls.key",
                "junk.pem",
            ),
            (
                r#"{ cert = "DIR/node.pem", key = "DIR/node.key", ca = "DIR/junk.pem" }"#,
                "cluster.tls.ca",
                "junk.pem",
            ),
            (
                r#"{ cert = "DIR/node.pem", key = "DIR/node.key", ca = "DIR/ca.pem", server_name = "127.0.0.1" }"#,
                "cluster.tls.server_name",
                "not a DNS name",
            ),
        ];
        for (tls, key, named) in cases {
            let problems = match cluster(dir.path(), tls) {
                Err(ConfigError::Invalid { problems, .. }) => problems,
                other => panic!("{tls}: expected problems, got {other:?}"),
            };
            assert_eq!(problems.len(), 1, "{tls}: {problems:?}");
            assert_eq!(problems[0].key, key, "{tls}");
            assert!(
                problems[0].message.contains(named),
                "{tls}: {}",
                problems[0].message
            );
        }
        match cluster(
            dir.path(),
            r#"{ cert = "DIR/node.pem", key = "DIR/node.key" }"#,
        ) {
            Err(ConfigError::Syntax { message, .. }) => {
                assert!(message.contains("`ca`"), "{message}")
            }
            other => panic!("a tls without its CA must be refused: {other:?}"),
        }
    }
}
