//! `[[rule]]`: a frontend joined to a pool, with its distribution and timeouts.

use std::collections::HashSet;
use std::time::Duration;

use super::Checker;
use crate::defaults::*;
use crate::duration::format_duration;
use crate::model::{Distribution, Fallback, NonMqtt, Rule, TcpKeepalive};
use crate::raw::{RawConfig, RawRule};

/// The rules, and the names of the frontends they use (the only ones opened). `raw` is the
/// whole file: a rule names a frontend and a pool.
pub(super) fn rules(c: &mut Checker, raw: &RawConfig) -> (Vec<Rule>, HashSet<String>) {
    let mut names = HashSet::new();
    let mut used_frontends = HashSet::new();
    let mut rules = Vec::new();
    for (i, r) in raw.rules.iter().enumerate() {
        let k = format!("rule[{i}]");
        c.name(&format!("{k}.name"), &r.name, &mut names, "rule");
        rule_refs(c, &k, r, raw, &mut used_frontends);
        let rule = rule(c, &k, r);
        warn_rule(c, &k, r, &rule);
        warn_unused_mqtt_ports(c, &k, &rule, raw);
        sni_passes_tls_through(c, &k, &rule, raw);
        rules.push(rule);
    }
    (rules, used_frontends)
}

/// Cross-section: the frontend and the pool a rule names exist, and each frontend has one rule
/// at most (`used` collects the frontends taken).
fn rule_refs(c: &mut Checker, k: &str, r: &RawRule, raw: &RawConfig, used: &mut HashSet<String>) {
    if !raw.frontends.iter().any(|f| f.name == r.frontend) {
        c.error(
            format!("{k}.frontend"),
            format!("no [[frontend]] named {:?}", r.frontend),
        );
    } else if !used.insert(r.frontend.clone()) {
        c.error(
            format!("{k}.frontend"),
            format!(
                "frontend {:?} already has a rule: one rule per frontend",
                r.frontend
            ),
        );
    }
    if !raw.pools.iter().any(|p| p.name == r.pool) {
        c.error(
            format!("{k}.pool"),
            format!("no [[pool]] named {:?}", r.pool),
        );
    }
}

fn rule(c: &mut Checker, k: &str, r: &RawRule) -> Rule {
    let distribution = distribution(c, k, r);
    let fallback = fallback(c, k, r);
    let non_mqtt = non_mqtt(c, k, r);
    let inspect_max_bytes = r.inspect_max_bytes.unwrap_or(DEFAULT_INSPECT_MAX_BYTES);
    if !(MIN_INSPECT_MAX_BYTES..=MAX_INSPECT_MAX_BYTES).contains(&inspect_max_bytes) {
        c.error(
            format!("{k}.inspect_max_bytes"),
            format!("must be between {MIN_INSPECT_MAX_BYTES} and {MAX_INSPECT_MAX_BYTES}"),
        );
    }
    Rule {
        name: r.name.clone(),
        frontend: r.frontend.clone(),
        pool: r.pool.clone(),
        distribution,
        idle_timeout: c.duration(
            &format!("{k}.idle_timeout"),
            r.idle_timeout.as_deref(),
            DEFAULT_IDLE_TIMEOUT,
        ),
        reset_on_idle: r.reset_on_idle.unwrap_or(DEFAULT_RESET_ON_IDLE),
        connect_timeout: c.duration(
            &format!("{k}.connect_timeout"),
            r.connect_timeout.as_deref(),
            DEFAULT_CONNECT_TIMEOUT,
        ),
        max_connect_attempts: c.non_zero(
            &format!("{k}.max_connect_attempts"),
            r.max_connect_attempts,
            DEFAULT_MAX_CONNECT_ATTEMPTS,
        ),
        inspect_timeout: c.duration(
            &format!("{k}.inspect_timeout"),
            r.inspect_timeout.as_deref(),
            DEFAULT_INSPECT_TIMEOUT,
        ),
        inspect_max_bytes,
        fallback,
        non_mqtt,
        close_on_backend_down: r
            .close_on_backend_down
            .unwrap_or(DEFAULT_CLOSE_ON_BACKEND_DOWN),
        mqtt_keep_alive: c.duration(
            &format!("{k}.mqtt_keep_alive"),
            r.mqtt_keep_alive.as_deref(),
            DEFAULT_MQTT_KEEP_ALIVE,
        ),
        tcp_keepalive: tcp_keepalive(c, k, r),
    }
}

fn distribution(c: &mut Checker, k: &str, r: &RawRule) -> Distribution {
    let Some(s) = r.distribution.as_deref() else {
        return DEFAULT_DISTRIBUTION;
    };
    Distribution::parse(s).unwrap_or_else(|| {
        c.error(
            format!("{k}.distribution"),
            format!(
                "unknown distribution {s:?}: expected one of {}",
                Distribution::NAMES.join(", ")
            ),
        );
        DEFAULT_DISTRIBUTION
    })
}

fn fallback(c: &mut Checker, k: &str, r: &RawRule) -> Fallback {
    match r.fallback.as_deref() {
        None => DEFAULT_FALLBACK,
        Some("five-tuple") => Fallback::FiveTuple,
        Some("reject") => Fallback::Reject,
        Some(s) => {
            c.error(
                format!("{k}.fallback"),
                format!("unknown fallback {s:?}: expected five-tuple or reject"),
            );
            DEFAULT_FALLBACK
        }
    }
}

fn non_mqtt(c: &mut Checker, k: &str, r: &RawRule) -> NonMqtt {
    match r.non_mqtt.as_deref() {
        None => DEFAULT_NON_MQTT,
        Some("refuse") => NonMqtt::Refuse,
        Some("forward") => NonMqtt::Forward,
        Some(s) => {
            c.error(
                format!("{k}.non_mqtt"),
                format!("unknown non_mqtt {s:?}: expected refuse or forward"),
            );
            DEFAULT_NON_MQTT
        }
    }
}

/// A rule's `tcp_keepalive_*` keys (`k` is the rule's key path).
fn tcp_keepalive(c: &mut Checker, k: &str, r: &RawRule) -> TcpKeepalive {
    let default = DEFAULT_TCP_KEEPALIVE;
    let mut secs = |key: &str, text: Option<&str>, fallback: Duration| {
        let key = format!("{k}.{key}");
        let d = c.duration(&key, text, fallback);
        if d.subsec_nanos() != 0 {
            c.error(
                &key,
                "must be whole seconds (the kernel counts keepalive in seconds)",
            );
            fallback
        } else if d.as_secs() > MAX_KEEPALIVE_SECS {
            c.error(&key, format!("must be at most {MAX_KEEPALIVE_SECS}s"));
            fallback
        } else {
            d
        }
    };
    let time = secs(
        "tcp_keepalive_time",
        r.tcp_keepalive_time.as_deref(),
        default.time,
    );
    let interval = secs(
        "tcp_keepalive_interval",
        r.tcp_keepalive_interval.as_deref(),
        default.interval,
    );
    let count = r.tcp_keepalive_count.filter(|n| {
        let ok = (1..=MAX_KEEPALIVE_COUNT).contains(n);
        if !ok {
            c.error(
                format!("{k}.tcp_keepalive_count"),
                format!("must be between 1 and {MAX_KEEPALIVE_COUNT}"),
            );
        }
        ok
    });
    TcpKeepalive {
        time,
        interval,
        count,
    }
}

/// Keys that do nothing with the rule's distribution, and timers that work against each other.
fn warn_rule(c: &mut Checker, k: &str, r: &RawRule, rule: &Rule) {
    if rule.distribution != Distribution::MqttClientId
        && (r.fallback.is_some() || r.inspect_timeout.is_some() || r.inspect_max_bytes.is_some())
    {
        c.warn(
            format!("{k}.distribution"),
            "fallback/inspect_* only apply to mqtt-client-id rules and are ignored here",
        );
    }
    // An MQTT client that is idle but alive sends PINGREQ every keep-alive; brokers allow
    // 1.5× of it. An idle timeout below that cuts healthy clients.
    if rule.idle_timeout.as_secs_f64() <= rule.mqtt_keep_alive.as_secs_f64() * 1.5 {
        c.warn(
            format!("{k}.idle_timeout"),
            format!(
                "idle_timeout {} does not exceed 1.5 x mqtt_keep_alive {}: idle MQTT clients will be disconnected",
                format_duration(rule.idle_timeout),
                format_duration(rule.mqtt_keep_alive)
            ),
        );
    }
    if rule.tcp_keepalive.time >= rule.idle_timeout {
        c.warn(
            format!("{k}.tcp_keepalive_time"),
            format!(
                "tcp_keepalive_time {} is not below idle_timeout {}: the idle timeout closes a quiet connection before keepalive probes it",
                format_duration(rule.tcp_keepalive.time),
                format_duration(rule.idle_timeout)
            ),
        );
    }
}

/// Cross-section: `distribution = "sni"` reads the ClientHello of TLS passed through, so its
/// frontend must not terminate TLS itself (there, route by client ID, which TLS hides no more).
fn sni_passes_tls_through(c: &mut Checker, k: &str, rule: &Rule, raw: &RawConfig) {
    let terminates = raw
        .frontends
        .iter()
        .any(|f| f.name == rule.frontend && f.tls.is_some());
    if rule.distribution == Distribution::Sni && terminates {
        c.error(
            format!("{k}.distribution"),
            format!(
                "\"sni\" routes TLS passed through, and frontend {:?} terminates TLS: use \"mqtt-client-id\" there",
                rule.frontend
            ),
        );
    }
}

/// Cross-section: a pool's `mqtt_ports` are read only by an mqtt-client-id rule.
fn warn_unused_mqtt_ports(c: &mut Checker, k: &str, rule: &Rule, raw: &RawConfig) {
    if rule.distribution == Distribution::MqttClientId {
        return;
    }
    let Some(pool) = raw.pools.iter().find(|p| p.name == rule.pool) else {
        return;
    };
    if pool.backends.iter().any(|b| b.mqtt_ports.is_some()) {
        c.warn(
            format!("{k}.distribution"),
            "pool has mqtt_ports but only mqtt-client-id rules read the MQTT level; backend addr is used",
        );
    }
}
