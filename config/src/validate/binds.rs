//! Checks over every address the topology binds: control endpoints reachable from the network
//! must have a lock (issue 13), and `[auth]`'s default depends on whether any bind is exposed.

use std::net::SocketAddr;

use super::Checker;
use crate::defaults::EXAMPLE_SECRET;
use crate::model::{BrokerNode, ClusterSettings, Frontend, HaSettings, LbSettings, Secret};
use crate::raw::RawConfig;

/// Issue 13: control endpoints reachable from the network must have a lock. A non-loopback
/// `lb.admin` or broker `http` needs its token file, and the example secret is refused once a
/// mesh, HA server, admin or http bind is not loopback. Loopback needs nothing (the quick start).
pub(super) fn refuse_exposure(
    c: &mut Checker,
    raw: &RawConfig,
    lb: &LbSettings,
    cluster: &ClusterSettings,
    brokers: &[BrokerNode],
    ha: &HaSettings,
) {
    let exposed = |a: &SocketAddr| !a.ip().is_loopback();
    // Keyed like the file; a token file that failed to load was reported already.
    let mut binds: Vec<(String, SocketAddr)> = Vec::new();
    if exposed(&lb.admin) && raw.lb.admin_token_file.is_none() {
        c.error(
            "lb.admin",
            format!("{} is not loopback: set lb.admin_token_file (admin writes and reads need its bearer token)", lb.admin),
        );
    }
    binds.push(("lb.admin".into(), lb.admin));
    for (i, (b, rb)) in brokers.iter().zip(&raw.brokers).enumerate() {
        if let Some(http) = b.http.filter(exposed) {
            if rb.http_token_file.is_none() {
                c.error(
                    format!("broker[{i}].http"),
                    format!("{http} is not loopback: set broker[{i}].http_token_file (its reads and writes need its bearer token)"),
                );
            }
        }
        binds.extend(b.mesh.map(|a| (format!("broker[{i}].mesh"), a)));
        binds.extend(b.http.map(|a| (format!("broker[{i}].http"), a)));
    }
    for (i, h) in ha.servers.iter().enumerate() {
        binds.push((format!("haserver[{i}].listen"), h.listen));
    }
    let example = cluster.secret.as_ref().map(Secret::expose) == Some(EXAMPLE_SECRET.as_bytes());
    if let Some((key, addr)) = binds.iter().find(|(_, a)| exposed(a)).filter(|_| example) {
        c.error(
            "cluster.secret",
            format!("is the example secret and {key} ({addr}) is not loopback: anyone who read the example could join the mesh and sign HA server requests; set a secret of your own (e.g. `openssl rand -hex 32`)"),
        );
    }
}

/// `[auth]` (config/src/auth.rs), given every bind of the topology: `allow_anonymous`
/// defaults to whether all of them are loopback.
pub(super) fn validate_auth(
    c: &mut Checker,
    raw: &RawConfig,
    lb: &LbSettings,
    frontends: &[Frontend],
    brokers: &[BrokerNode],
    ha: &HaSettings,
) -> crate::AuthSettings {
    let mut binds: Vec<(String, SocketAddr)> = vec![("lb.admin".into(), lb.admin)];
    binds.extend(
        frontends
            .iter()
            .map(|f| (format!("frontend {:?}", f.name), f.bind)),
    );
    for (i, b) in brokers.iter().enumerate() {
        binds.push((format!("broker[{i}].mqtt"), b.mqtt));
        binds.extend(b.mqtt_v5.map(|a| (format!("broker[{i}].mqtt_v5"), a)));
        binds.extend(b.mesh.map(|a| (format!("broker[{i}].mesh"), a)));
        binds.extend(b.http.map(|a| (format!("broker[{i}].http"), a)));
    }
    for (i, h) in ha.servers.iter().enumerate() {
        binds.push((format!("haserver[{i}].listen"), h.listen));
    }
    let (auth, errors, warnings) = crate::auth::validate(&raw.auth, &binds);
    c.problems.extend(errors);
    c.warnings.extend(warnings);
    auth
}
