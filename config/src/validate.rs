//! Raw file → validated [`Config`]: every problem is collected with its key, not just the first.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use crate::defaults::*;
use crate::duration::{format_duration, parse_duration};
use crate::model::*;
use crate::raw::*;

/// Stands in for a required address that did not parse (reported), so validation goes on.
const UNPARSED_ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    0,
));

/// Collects problems while converting; each helper records and returns a fallback value so
/// validation continues past the first error.
struct Checker {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Checker {
    fn error(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
            line: None,
        });
    }

    fn warn(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Problem {
            key: key.into(),
            message: message.into(),
            line: None,
        });
    }

    fn addr(&mut self, key: &str, text: &str) -> Option<SocketAddr> {
        match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    key,
                    format!(
                        "invalid address {text:?}: expected IP:PORT such as \"127.0.0.1:1883\""
                    ),
                );
                None
            }
        }
    }

    /// A positive duration, or `default` when the key is absent.
    fn duration(&mut self, key: &str, text: Option<&str>, default: Duration) -> Duration {
        let Some(text) = text else { return default };
        match parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.error(key, "must be greater than zero");
                default
            }
            Ok(d) if d > MAX_DURATION => {
                self.error(
                    key,
                    format!("must be at most {} (a year)", format_duration(MAX_DURATION)),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error(key, e);
                default
            }
        }
    }

    /// The bearer token in the file at `path` (relative to the working directory, like
    /// `haserver.db`), read now so a missing or unusable file is refused at load, not at the
    /// first request. Surrounding whitespace (the newline of `echo ... > file`) is dropped.
    fn token_file(&mut self, key: &str, path: Option<&str>) -> Option<Secret> {
        let path = path?;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.error(key, format!("cannot read {path:?}: {e}"));
                return None;
            }
        };
        let token = text.trim();
        let problem = if token.is_empty() {
            Some("is empty".to_string())
        } else if token.len() < MIN_SECRET_LEN {
            Some(format!(
                "holds {} characters: a token needs at least {MIN_SECRET_LEN}",
                token.len()
            ))
        } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
            Some("holds spaces or non-ASCII characters: it travels in an HTTP header".into())
        } else {
            None
        };
        match problem {
            Some(p) => {
                self.error(key, format!("{path:?} {p}"));
                None
            }
            None => Some(Secret::new(token)),
        }
    }

    /// A count of at least 1, or `default` when the key is absent.
    fn non_zero(&mut self, key: &str, value: Option<u32>, default: NonZeroU32) -> NonZeroU32 {
        match value {
            None => default,
            Some(v) => NonZeroU32::new(v).unwrap_or_else(|| {
                self.error(key, "must be at least 1");
                default
            }),
        }
    }

    /// A count of at least 1 for a key whose absence means "no limit": a zero is reported and
    /// 1 stands in for it so validation goes on.
    fn positive(&mut self, key: &str, value: u32) -> NonZeroU32 {
        self.non_zero(key, Some(value), NonZeroU32::MIN)
    }

    fn name(&mut self, key: &str, name: &str, seen: &mut HashSet<String>, what: &str) {
        if name.is_empty() {
            self.error(key, format!("{what} name must not be empty"));
        } else if name.len() > MAX_NAME_LEN
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            self.error(
                key,
                format!(
                    "{what} name {name:?} must be 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 - _ ."
                ),
            );
        } else if !seen.insert(name.to_string()) {
            self.error(key, format!("duplicate {what} name {name:?}"));
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

pub fn validate(raw: RawConfig) -> Result<Config, (Vec<Problem>, Vec<Problem>)> {
    let mut c = Checker {
        problems: Vec::new(),
        warnings: Vec::new(),
    };

    let lb = LbSettings {
        admin: c
            .addr("lb.admin", raw.lb.admin.as_deref().unwrap_or(DEFAULT_ADMIN))
            .unwrap_or(DEFAULT_ADMIN_ADDR),
        shutdown_grace: c.duration(
            "lb.shutdown_grace",
            raw.lb.shutdown_grace.as_deref(),
            DEFAULT_SHUTDOWN_GRACE,
        ),
        watch_config: raw.lb.watch_config.unwrap_or(DEFAULT_WATCH_CONFIG),
        watch_interval: c.duration(
            "lb.watch_interval",
            raw.lb.watch_interval.as_deref(),
            DEFAULT_WATCH_INTERVAL,
        ),
        data_threads: raw
            .lb
            .data_threads
            .map(|n| c.positive("lb.data_threads", n)),
        admin_token: c.token_file("lb.admin_token_file", raw.lb.admin_token_file.as_deref()),
        max_connections: raw
            .lb
            .max_connections
            .map(|n| c.positive("lb.max_connections", n)),
        state_file: raw.lb.state_file.as_deref().and_then(|p| {
            if p.trim().is_empty() {
                c.error(
                    "lb.state_file",
                    "must not be empty (leave it out for the default)",
                );
                None
            } else {
                Some(std::path::PathBuf::from(p))
            }
        }),
    };
    if let Some(n) = lb.data_threads.filter(|n| n.get() > MAX_DATA_THREADS) {
        c.error(
            "lb.data_threads",
            format!("{n} threads: at most {MAX_DATA_THREADS} (one per core is the usual choice)"),
        );
    }

    // Probes first: pools refer to them by name.
    let mut probe_names = HashSet::new();
    let mut probes = Vec::new();
    for (i, p) in raw.probes.iter().enumerate() {
        let k = format!("probe[{i}]");
        c.name(&format!("{k}.name"), &p.name, &mut probe_names, "probe");
        probes.push(probe(&mut c, &k, p));
    }

    let mut pool_names = HashSet::new();
    let mut pools = Vec::new();
    for (i, p) in raw.pools.iter().enumerate() {
        let k = format!("pool[{i}]");
        c.name(&format!("{k}.name"), &p.name, &mut pool_names, "pool");
        let probe = match &p.probe {
            None => default_probe(),
            Some(name) => match probes.iter().find(|pr: &&Probe| &pr.name == name) {
                Some(pr) => pr.clone(),
                None => {
                    c.error(format!("{k}.probe"), format!("no [[probe]] named {name:?}"));
                    default_probe()
                }
            },
        };
        if p.backends.is_empty() && p.discovery.is_none() {
            c.warn(
                format!("{k}.backend"),
                "pool has no backends: its rules refuse every connection",
            );
        }
        let mut ids = HashSet::new();
        let mut backends = Vec::new();
        for (j, b) in p.backends.iter().enumerate() {
            let bk = format!("{k}.backend[{j}]");
            c.name(&format!("{bk}.id"), &b.id, &mut ids, "backend");
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
            if let Some(addr) = addr {
                if addr.port() == 0 {
                    c.error(format!("{bk}.addr"), "port must not be 0");
                }
                backends.push(Backend {
                    id: b.id.clone(),
                    addr,
                    weight,
                    drain: b.drain.unwrap_or(DEFAULT_DRAIN),
                    mqtt_ports,
                });
            }
        }
        let admission = Admission {
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
        };
        let remove_after = pool_remove_after(&mut c, &k, p);
        // Sent in a DISCONNECT's UTF-8 string property: no NUL or other control characters
        // (MQTT-1.5.4-2), and short enough for a small packet.
        let server_reference = p.server_reference.clone().filter(|r| {
            let ok = !r.is_empty()
                && r.len() <= MAX_SERVER_REFERENCE_LEN
                && !r.chars().any(char::is_control);
            if !ok {
                c.error(
                    format!("{k}.server_reference"),
                    format!("must be 1-{MAX_SERVER_REFERENCE_LEN} characters without control characters"),
                );
            }
            ok
        });
        pools.push(Pool {
            name: p.name.clone(),
            server_reference,
            probe,
            discovery: p.discovery.as_deref() == Some("haserver"),
            backends,
            remove_after,
            admission,
        });
    }

    let mut frontend_names = HashSet::new();
    let mut binds = HashSet::new();
    let mut frontends = Vec::new();
    for (i, f) in raw.frontends.iter().enumerate() {
        let k = format!("frontend[{i}]");
        c.name(
            &format!("{k}.name"),
            &f.name,
            &mut frontend_names,
            "frontend",
        );
        let backlog = c.non_zero(&format!("{k}.backlog"), f.backlog, DEFAULT_BACKLOG);
        if let Some(bind) = c.addr(&format!("{k}.bind"), &f.bind) {
            if bind.port() != 0 && !binds.insert(bind) {
                c.error(
                    format!("{k}.bind"),
                    format!("address {bind} is used by another frontend"),
                );
            }
            if bind == lb.admin && bind.port() != 0 {
                c.error(
                    format!("{k}.bind"),
                    format!("address {bind} is also lb.admin"),
                );
            }
            if f.source_burst.is_some() && f.source_rate.is_none() {
                c.error(format!("{k}.source_burst"), "needs source_rate");
            }
            let mut positive =
                |key: &str, v: Option<u32>| v.map(|n| c.positive(&format!("{k}.{key}"), n));
            let limits = FrontendLimits {
                max_connections: positive("max_connections", f.max_connections),
                max_connections_per_source: positive(
                    "max_connections_per_source",
                    f.max_connections_per_source,
                ),
                source_rate: positive("source_rate", f.source_rate).map(|per_second| SourceRate {
                    per_second,
                    burst: positive("source_burst", f.source_burst)
                        .unwrap_or(default_source_burst(per_second)),
                }),
            };
            frontends.push(Frontend {
                name: f.name.clone(),
                bind,
                backlog,
                limits,
            });
        }
    }

    let mut rule_names = HashSet::new();
    let mut used_frontends = HashSet::new();
    let mut rules = Vec::new();
    for (i, r) in raw.rules.iter().enumerate() {
        let k = format!("rule[{i}]");
        c.name(&format!("{k}.name"), &r.name, &mut rule_names, "rule");
        if !raw.frontends.iter().any(|f| f.name == r.frontend) {
            c.error(
                format!("{k}.frontend"),
                format!("no [[frontend]] named {:?}", r.frontend),
            );
        } else if !used_frontends.insert(r.frontend.clone()) {
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
        let distribution = match r.distribution.as_deref() {
            None => DEFAULT_DISTRIBUTION,
            Some(s) => Distribution::parse(s).unwrap_or_else(|| {
                c.error(
                    format!("{k}.distribution"),
                    format!(
                        "unknown distribution {s:?}: expected one of {}",
                        Distribution::NAMES.join(", ")
                    ),
                );
                DEFAULT_DISTRIBUTION
            }),
        };
        let fallback = match r.fallback.as_deref() {
            None | Some("five-tuple") => Fallback::FiveTuple,
            Some("reject") => Fallback::Reject,
            Some(s) => {
                c.error(
                    format!("{k}.fallback"),
                    format!("unknown fallback {s:?}: expected five-tuple or reject"),
                );
                Fallback::FiveTuple
            }
        };
        let non_mqtt = match r.non_mqtt.as_deref() {
            None | Some("refuse") => NonMqtt::Refuse,
            Some("forward") => NonMqtt::Forward,
            Some(s) => {
                c.error(
                    format!("{k}.non_mqtt"),
                    format!("unknown non_mqtt {s:?}: expected refuse or forward"),
                );
                NonMqtt::Refuse
            }
        };
        let inspect_max_bytes = r.inspect_max_bytes.unwrap_or(DEFAULT_INSPECT_MAX_BYTES);
        if !(MIN_INSPECT_MAX_BYTES..=MAX_INSPECT_MAX_BYTES).contains(&inspect_max_bytes) {
            c.error(
                format!("{k}.inspect_max_bytes"),
                format!("must be between {MIN_INSPECT_MAX_BYTES} and {MAX_INSPECT_MAX_BYTES}"),
            );
        }
        let rule = Rule {
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
            tcp_keepalive: tcp_keepalive(&mut c, &k, r),
        };
        if distribution != Distribution::MqttClientId
            && (r.fallback.is_some()
                || r.inspect_timeout.is_some()
                || r.inspect_max_bytes.is_some())
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
        if distribution != Distribution::MqttClientId {
            if let Some(pool) = raw.pools.iter().find(|p| p.name == r.pool) {
                if pool.backends.iter().any(|b| b.mqtt_ports.is_some()) {
                    c.warn(
                        format!("{k}.distribution"),
                        "pool has mqtt_ports but only mqtt-client-id rules read the MQTT level; backend addr is used",
                    );
                }
            }
        }
        rules.push(rule);
    }
    for f in &raw.frontends {
        if !used_frontends.contains(&f.name) && !f.name.is_empty() {
            c.warn(
                "frontend",
                format!("frontend {:?} has no rule and is not opened", f.name),
            );
        }
    }

    let (cluster, brokers) = validate_cluster(&mut c, &raw);
    let ha = validate_ha(&mut c, &raw);
    refuse_exposure(&mut c, &raw, &lb, &cluster, &brokers, &ha);
    let auth = validate_auth(&mut c, &raw, &lb, &frontends, &brokers, &ha);

    if c.problems.is_empty() {
        Ok(Config {
            source: None,
            lb,
            frontends: frontends
                .into_iter()
                .filter(|f| used_frontends.contains(&f.name))
                .collect(),
            pools,
            rules,
            cluster,
            brokers,
            ha,
            auth,
            warnings: c.warnings,
        })
    } else {
        Err((c.problems, c.warnings))
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

fn default_probe() -> Probe {
    Probe {
        name: DEFAULT_PROBE_NAME.into(),
        protocol: ProbeProtocol::Tcp,
        port: ProbePort::Fixed(DEFAULT_PROBE_PORT),
        interval: DEFAULT_PROBE_INTERVAL,
        timeout: default_probe_timeout(DEFAULT_PROBE_INTERVAL),
        up_threshold: DEFAULT_THRESHOLD,
        down_threshold: DEFAULT_THRESHOLD,
    }
}

fn probe(c: &mut Checker, k: &str, p: &RawProbe) -> Probe {
    let protocol = match p.protocol.as_deref().unwrap_or(DEFAULT_PROBE_PROTOCOL) {
        "tcp" => ProbeProtocol::Tcp,
        "mqtt" => ProbeProtocol::Mqtt,
        "http" => {
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
        other => {
            c.error(
                format!("{k}.protocol"),
                format!("unknown protocol {other:?}: expected tcp, http or mqtt"),
            );
            ProbeProtocol::Tcp
        }
    };
    if p.path.is_some() && !matches!(protocol, ProbeProtocol::Http { .. }) {
        c.error(
            format!("{k}.path"),
            "path is only valid with protocol = \"http\"",
        );
    }
    let port = match &p.port {
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
    };
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

/// Issue 13: control endpoints reachable from the network must have a lock. A non-loopback
/// `lb.admin` or broker `http` needs its token file, and the example secret is refused once a
/// mesh, HA server, admin or http bind is not loopback. Loopback needs nothing (the quick start).
fn refuse_exposure(
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
fn validate_auth(
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

fn validate_cluster(c: &mut Checker, raw: &RawConfig) -> (ClusterSettings, Vec<BrokerNode>) {
    let rc = &raw.cluster;
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
    let cluster = ClusterSettings {
        secret,
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
        reconnect_min,
        reconnect_max,
    };
    let mut ids = HashSet::new();
    let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
    let mut brokers = Vec::new();
    for (i, b) in raw.brokers.iter().enumerate() {
        let k = format!("broker[{i}]");
        c.name(&format!("{k}.id"), &b.id, &mut ids, "broker");
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
        if raw.brokers.len() > 1 && b.mesh.is_none() {
            c.error(
                format!("{k}.mesh"),
                "a cluster of several brokers needs each node's mesh address",
            );
        }
        let max_payload_size = c.non_zero(
            &format!("{k}.max_payload_size"),
            b.max_payload_size,
            DEFAULT_MAX_PAYLOAD,
        );
        if max_payload_size.get() > MAX_PAYLOAD {
            c.error(
                format!("{k}.max_payload_size"),
                format!("MQTT payloads cannot exceed {MAX_PAYLOAD} bytes"),
            );
        }
        brokers.push(BrokerNode {
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
            backlog: c.non_zero(&format!("{k}.backlog"), b.backlog, DEFAULT_BACKLOG),
        });
    }
    if raw.brokers.len() > 1 {
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
    (cluster, brokers)
}

fn validate_ha(c: &mut Checker, raw: &RawConfig) -> HaSettings {
    let r = &raw.ha;
    let heartbeat_interval = c.duration(
        "ha.heartbeat_interval",
        r.heartbeat_interval.as_deref(),
        DEFAULT_HEARTBEAT_INTERVAL,
    );
    let member_timeout = c.duration(
        "ha.member_timeout",
        r.member_timeout.as_deref(),
        DEFAULT_MEMBER_TIMEOUT,
    );
    let remove_after = c.duration(
        "ha.remove_after",
        r.remove_after.as_deref(),
        DEFAULT_HA_REMOVE_AFTER,
    );
    let lease = c.duration("ha.lease", r.lease.as_deref(), DEFAULT_LEASE);
    if member_timeout <= heartbeat_interval {
        c.error(
            "ha.member_timeout",
            "must be longer than ha.heartbeat_interval (members would flap)",
        );
    }
    if remove_after < member_timeout {
        c.error(
            "ha.remove_after",
            "must not be shorter than ha.member_timeout",
        );
    }
    let mut ids = HashSet::new();
    let mut servers = Vec::new();
    for (i, h) in raw.haservers.iter().enumerate() {
        let k = format!("haserver[{i}]");
        c.name(&format!("{k}.id"), &h.id, &mut ids, "haserver");
        let listen = c.addr(&format!("{k}.listen"), &h.listen);
        servers.push(HaServer {
            id: h.id.clone(),
            listen: listen.unwrap_or(UNPARSED_ADDR),
            db: std::path::PathBuf::from(h.db.as_deref().unwrap_or(DEFAULT_HA_DB)),
        });
    }
    for (i, p) in raw.pools.iter().enumerate() {
        match p.discovery.as_deref() {
            None => {}
            Some("haserver") if raw.haservers.is_empty() => c.error(
                format!("pool[{i}].discovery"),
                "discovery = \"haserver\" needs at least one [[haserver]]",
            ),
            Some("haserver") => {}
            Some(other) => c.error(
                format!("pool[{i}].discovery"),
                format!("unknown discovery {other:?}: expected \"haserver\""),
            ),
        }
    }
    HaSettings {
        servers,
        heartbeat_interval,
        member_timeout,
        remove_after,
        lease,
    }
}
