//! `[[probe]]`: how a pool's members are found healthy.

use std::collections::HashSet;

use super::Checker;
use crate::defaults::*;
use crate::model::{Probe, ProbePort, ProbeProtocol};
use crate::raw::{RawPort, RawProbe};

pub(super) fn probes(c: &mut Checker, raw: &[RawProbe]) -> Vec<Probe> {
    let mut names = HashSet::new();
    let mut probes = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        let k = format!("probe[{i}]");
        c.name(&format!("{k}.name"), &p.name, &mut names, "probe");
        probes.push(probe(c, &k, p));
    }
    probes
}

/// The probe of a pool that names none.
pub(super) fn default_probe() -> Probe {
    Probe {
        name: DEFAULT_PROBE_NAME.into(),
        protocol: DEFAULT_PROBE_PROTOCOL,
        port: ProbePort::Fixed(DEFAULT_PROBE_PORT),
        interval: DEFAULT_PROBE_INTERVAL,
        timeout: default_probe_timeout(DEFAULT_PROBE_INTERVAL),
        up_threshold: DEFAULT_THRESHOLD,
        down_threshold: DEFAULT_THRESHOLD,
    }
}

fn probe(c: &mut Checker, k: &str, p: &RawProbe) -> Probe {
    let protocol = protocol(c, k, p);
    let port = port(c, k, p);
    let interval = c.duration(
        &format!("{k}.interval"),
        p.interval.as_deref(),
        DEFAULT_PROBE_INTERVAL,
    );
    let timeout = c.duration(
        &format!("{k}.timeout"),
        p.timeout.as_deref(),
        default_probe_timeout(interval),
    );
    if timeout > interval {
        c.error(format!("{k}.timeout"), "must not exceed interval");
    }
    if p.threshold.is_some() && (p.up_threshold.is_some() || p.down_threshold.is_some()) {
        c.error(
            format!("{k}.threshold"),
            "set either threshold or up_threshold/down_threshold, not both",
        );
    }
    let both = p.threshold;
    Probe {
        name: p.name.clone(),
        protocol,
        port,
        interval,
        timeout,
        up_threshold: c.non_zero(
            &format!("{k}.up_threshold"),
            p.up_threshold.or(both),
            DEFAULT_THRESHOLD,
        ),
        down_threshold: c.non_zero(
            &format!("{k}.down_threshold"),
            p.down_threshold.or(both),
            DEFAULT_THRESHOLD,
        ),
    }
}

/// `protocol` and the `path` only an HTTP probe takes.
fn protocol(c: &mut Checker, k: &str, p: &RawProbe) -> ProbeProtocol {
    let protocol = match p.protocol.as_deref() {
        None => DEFAULT_PROBE_PROTOCOL,
        Some("tcp") => ProbeProtocol::Tcp,
        Some("mqtt") => ProbeProtocol::Mqtt,
        Some("tls") => ProbeProtocol::Tls,
        Some("mqtts") => ProbeProtocol::Mqtts,
        Some("http") => {
            let path = p.path.clone().unwrap_or_else(|| DEFAULT_PROBE_PATH.into());
            if !path.starts_with('/')
                || path.chars().any(|ch| ch.is_whitespace() || ch.is_control())
            {
                c.error(
                    format!("{k}.path"),
                    format!("invalid HTTP path {path:?}: must start with / and hold no spaces"),
                );
            }
            ProbeProtocol::Http { path }
        }
        Some(other) => {
            c.error(
                format!("{k}.protocol"),
                format!("unknown protocol {other:?}: expected tcp, http, mqtt, tls or mqtts"),
            );
            DEFAULT_PROBE_PROTOCOL
        }
    };
    if p.path.is_some() && !matches!(protocol, ProbeProtocol::Http { .. }) {
        c.error(
            format!("{k}.path"),
            "path is only valid with protocol = \"http\"",
        );
    }
    protocol
}

fn port(c: &mut Checker, k: &str, p: &RawProbe) -> ProbePort {
    match &p.port {
        None => ProbePort::Fixed(DEFAULT_PROBE_PORT),
        Some(RawPort::Word(w)) if w == "traffic" => ProbePort::Traffic,
        Some(RawPort::Number(n)) if (1..=65535).contains(n) => ProbePort::Fixed(*n as u16),
        Some(other) => {
            c.error(
                format!("{k}.port"),
                format!("invalid port {other:?}: expected 1-65535 or \"traffic\""),
            );
            ProbePort::Fixed(DEFAULT_PROBE_PORT)
        }
    }
}
