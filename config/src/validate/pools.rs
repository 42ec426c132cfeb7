//! `[[pool]]` and its `[[pool.backend]]`s.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::frontends::{alpn_ok, identity};
use super::probes::default_probe;
use super::Checker;
use crate::defaults::*;
use crate::model::{Admission, Backend, MqttPorts, Pool, PoolTls, Probe, ProxyVersion};
use crate::raw::{RawBackend, RawPool, RawPoolTls};

/// `probes` are the validated `[[probe]]`s the pools may name.
pub(super) fn pools(
    c: &mut Checker,
    raw: &[RawPool],
    probes: &[Probe],
    lb_source: Option<IpAddr>,
) -> Vec<Pool> {
    let mut names = HashSet::new();
    let mut pools = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        let k = format!("pool[{i}]");
        c.name(&format!("{k}.name"), &p.name, &mut names, "pool");
        pools.push(pool(c, &k, p, probes, lb_source));
    }
    pools
}

fn pool(
    c: &mut Checker,
    k: &str,
    p: &RawPool,
    probes: &[Probe],
    lb_source: Option<IpAddr>,
) -> Pool {
    let probe = pool_probe(c, k, p, probes);
    if p.backends.is_empty() && p.discovery.is_none() {
        c.warn(
            format!("{k}.backend"),
            "pool has no backends: its rules refuse every connection",
        );
    }
    let backends = backends(c, k, p);
    let admission = admission(c, k, p);
    let remove_after = pool_remove_after(c, k, p);
    let server_reference = server_reference(c, k, p);
    let send_proxy = send_proxy(c, k, p);
    let tls = p.tls.as_ref().and_then(|t| pool_tls(c, k, &p.name, t));
    if probe.protocol.uses_tls() && p.tls.is_none() {
        c.error(
            format!("{k}.probe"),
            format!(
                "pool {:?}: probe {:?} speaks TLS to the members: the pool needs tls = {{ ca = \"...\" }}, the CA their certificates are verified against",
                p.name, probe.name
            ),
        );
    }
    let source = pool_source(c, k, p, &backends, lb_source);
    Pool {
        send_proxy,
        tls,
        source,
        name: p.name.clone(),
        server_reference,
        probe,
        discovery: p.discovery.as_deref() == Some("haserver"),
        backends,
        remove_after,
        admission,
    }
}

/// `pool.source`, else `lb.source`: an address of the pool's members' family (a socket bound
/// to an IPv4 address cannot reach an IPv6 member). Not checked to be this host's: a file is
/// checked on other machines too; a connect from an address the host lacks fails naming it.
fn pool_source(
    c: &mut Checker,
    k: &str,
    p: &RawPool,
    backends: &[Backend],
    lb_source: Option<IpAddr>,
) -> Option<IpAddr> {
    let (key, source) = match p.source.as_deref() {
        Some(s) => (format!("{k}.source"), c.ip(&format!("{k}.source"), s)?),
        None => ("lb.source".to_string(), lb_source?),
    };
    for b in backends
        .iter()
        .filter(|b| b.addr.is_ipv4() != source.is_ipv4())
    {
        c.error(
            key.clone(),
            format!(
                "pool {:?}: source {source} cannot reach backend {:?} at {} (another address family)",
                p.name, b.id, b.addr
            ),
        );
    }
    Some(source)
}

/// Cross-section: the `[[probe]]` a pool names must exist.
fn pool_probe(c: &mut Checker, k: &str, p: &RawPool, probes: &[Probe]) -> Probe {
    match &p.probe {
        None => default_probe(),
        Some(name) => match probes.iter().find(|pr| &pr.name == name) {
            Some(pr) => pr.clone(),
            None => {
                c.error(format!("{k}.probe"), format!("no [[probe]] named {name:?}"));
                default_probe()
            }
        },
    }
}

/// The pool's static backends; one whose address does not parse is left out (reported).
fn backends(c: &mut Checker, k: &str, p: &RawPool) -> Vec<Backend> {
    let mut ids = HashSet::new();
    let mut backends = Vec::new();
    for (j, b) in p.backends.iter().enumerate() {
        let bk = format!("{k}.backend[{j}]");
        c.name(&format!("{bk}.id"), &b.id, &mut ids, "backend");
        backends.extend(backend(c, &bk, b));
    }
    backends
}

fn backend(c: &mut Checker, bk: &str, b: &RawBackend) -> Option<Backend> {
    let addr = c.addr(&format!("{bk}.addr"), &b.addr);
    let weight = c.non_zero(&format!("{bk}.weight"), b.weight, DEFAULT_WEIGHT);
    if weight.get() > MAX_WEIGHT {
        c.error(
            format!("{bk}.weight"),
            format!("must be at most {MAX_WEIGHT}"),
        );
    }
    let mqtt_ports = match &b.mqtt_ports {
        None => MqttPorts::default(),
        Some(m) => {
            for (lvl, port) in [("v3", m.v3), ("v4", m.v4), ("v5", m.v5)] {
                if port == Some(0) {
                    c.error(format!("{bk}.mqtt_ports.{lvl}"), "port must not be 0");
                }
            }
            MqttPorts {
                v3: m.v3,
                v4: m.v4,
                v5: m.v5,
            }
        }
    };
    let addr = addr?;
    if addr.port() == 0 {
        c.error(format!("{bk}.addr"), "port must not be 0");
    }
    Some(Backend {
        id: b.id.clone(),
        addr,
        weight,
        drain: b.drain.unwrap_or(DEFAULT_DRAIN),
        mqtt_ports,
    })
}

fn admission(c: &mut Checker, k: &str, p: &RawPool) -> Admission {
    Admission {
        max_pending: c.non_zero(
            &format!("{k}.max_pending"),
            p.max_pending,
            DEFAULT_MAX_PENDING,
        ),
        max_queue: p.max_queue.unwrap_or(DEFAULT_MAX_QUEUE),
        queue_timeout: c.duration(
            &format!("{k}.queue_timeout"),
            p.queue_timeout.as_deref(),
            DEFAULT_QUEUE_TIMEOUT,
        ),
        // Absent: none. ZERO stands in for a value that was refused (reported).
        slow_start: p
            .slow_start
            .as_deref()
            .map(|s| c.duration(&format!("{k}.slow_start"), Some(s), Duration::ZERO))
            .filter(|d| !d.is_zero()),
    }
}

/// `pool.remove_after`: only a discovery pool has members that leave on their own (a static
/// backend leaves with a reload, which says so).
fn pool_remove_after(c: &mut Checker, k: &str, p: &RawPool) -> Duration {
    let key = format!("{k}.remove_after");
    if p.remove_after.is_some() && p.discovery.is_none() {
        c.error(
            &key,
            "applies only to a pool with discovery = \"haserver\" (a static backend leaves with a reload)",
        );
    }
    c.duration(&key, p.remove_after.as_deref(), DEFAULT_REMOVE_AFTER)
}

/// Sent in a DISCONNECT's UTF-8 string property: no NUL or other control characters
/// (MQTT-1.5.4-2), and short enough for a small packet.
fn server_reference(c: &mut Checker, k: &str, p: &RawPool) -> Option<String> {
    p.server_reference.clone().filter(|r| {
        let ok = !r.is_empty()
            && r.len() <= MAX_SERVER_REFERENCE_LEN
            && !r.chars().any(char::is_control);
        if !ok {
            c.error(
                format!("{k}.server_reference"),
                format!(
                    "must be 1-{MAX_SERVER_REFERENCE_LEN} characters without control characters"
                ),
            );
        }
        ok
    })
}

/// `pool.send_proxy = "v1" | "v2"`.
fn send_proxy(c: &mut Checker, k: &str, p: &RawPool) -> Option<ProxyVersion> {
    let text = p.send_proxy.as_deref()?;
    let v = ProxyVersion::parse(text);
    if v.is_none() {
        c.error(
            format!("{k}.send_proxy"),
            format!(
                "{text:?} is not a PROXY protocol version: one of {}",
                ProxyVersion::NAMES.join(", ")
            ),
        );
    }
    v.or(DEFAULT_SEND_PROXY)
}

/// `pool.tls`: the CA file (and the LB's client certificate, if given) read and the client
/// configuration built now, so a missing file, a CA file without a certificate or a key that
/// does not fit is refused at load naming the pool and the file. `None` after an error
/// (recorded).
fn pool_tls(c: &mut Checker, k: &str, name: &str, t: &RawPoolTls) -> Option<PoolTls> {
    let k = format!("{k}.tls");
    let who = format!("pool {name:?}");
    let alpn = t.alpn.clone().unwrap_or_default();
    let mut ok = alpn_ok(c, &k, &alpn);
    let server_name = match t.server_name.as_deref() {
        None => None,
        Some(n) => match rustls::pki_types::ServerName::try_from(n.to_string()) {
            Ok(name) => Some(name),
            Err(_) => {
                c.error(
                    format!("{k}.server_name"),
                    format!("{who}: {n:?} is not a DNS name or an IP address"),
                );
                ok = false;
                None
            }
        },
    };
    let (cert, key) = (
        t.cert.as_ref().map(PathBuf::from),
        t.key.as_ref().map(PathBuf::from),
    );
    let id = match (&cert, &key) {
        (Some(cert), Some(key)) => {
            let id = identity(c, &k, &who, cert, key);
            ok &= id.is_some();
            id
        }
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            let (set, missing) = if cert.is_some() {
                ("cert", "key")
            } else {
                ("key", "cert")
            };
            c.error(
                format!("{k}.{missing}"),
                format!("{who}: tls.{set} needs tls.{missing} (the LB's client certificate and its key)"),
            );
            return None;
        }
    };
    let ca = PathBuf::from(&t.ca);
    let client = match crate::tls::client(&ca, id, &alpn) {
        Ok(client) => client,
        Err(e) => {
            c.error(format!("{k}.ca"), format!("{who}: {e}"));
            return None;
        }
    };
    ok.then_some(PoolTls {
        ca,
        server_name,
        cert,
        key,
        alpn,
        client,
    })
}
