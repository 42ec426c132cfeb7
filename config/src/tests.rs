use super::*;
use std::time::Duration;

fn problems(text: &str) -> Vec<Problem> {
    match Config::parse(text, "t.toml") {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        other => panic!("expected validation problems, got {other:?}"),
    }
}

const MINIMAL: &str = r#"
[[frontend]]
name = "mqtt"
bind = "127.0.0.1:1883"

[[pool]]
name = "brokers"
[[pool.backend]]
id = "b1"
addr = "127.0.0.1:1884"

[[rule]]
name = "r"
frontend = "mqtt"
pool = "brokers"
"#;

#[test]
fn minimal_file_gets_azure_defaults() {
    let c = Config::parse(MINIMAL, "t.toml").expect("valid");
    let pool = c.pool("brokers").expect("pool");
    assert_eq!(pool.probe.protocol, ProbeProtocol::Tcp);
    assert_eq!(pool.probe.port, ProbePort::Fixed(8883));
    assert_eq!(pool.probe.interval, Duration::from_secs(5));
    assert_eq!(pool.probe.down_threshold.get(), 1);
    let rule = &c.rules[0];
    assert_eq!(rule.distribution, Distribution::FiveTuple);
    assert_eq!(rule.idle_timeout, Duration::from_secs(240));
    assert_eq!(rule.fallback, Fallback::FiveTuple);
    assert_eq!(rule.non_mqtt, NonMqtt::Refuse);
    assert_eq!(c.lb.admin.to_string(), "127.0.0.1:9883");
    assert_eq!(
        pool.probe.target(&pool.backends[0]).to_string(),
        "127.0.0.1:8883"
    );
}

#[test]
fn non_mqtt_is_refused_or_forwarded() {
    let with =
        |v: &str| format!("{MINIMAL}distribution = \"mqtt-client-id\"\nnon_mqtt = \"{v}\"\n");
    let c = Config::parse(&with("forward"), "t.toml").expect("valid");
    assert_eq!(c.rules[0].non_mqtt, NonMqtt::Forward);
    let p = problems(&with("pass"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "rule[0].non_mqtt");
}

#[test]
fn session_replication_is_on_by_default_and_can_be_turned_off() {
    let c = Config::parse(MINIMAL, "t.toml").expect("valid");
    assert!(c.cluster.replicate_sessions);
    assert_eq!(c.cluster.replica_max_messages.get(), 100_000);
    let text =
        format!("[cluster]\nreplicate_sessions = false\nreplica_max_messages = 50\n{MINIMAL}");
    let c = Config::parse(&text, "t.toml").expect("valid");
    assert!(!c.cluster.replicate_sessions);
    assert_eq!(c.cluster.replica_max_messages.get(), 50);
    let p = problems(&format!("[cluster]\nreplica_max_messages = 0\n{MINIMAL}"));
    assert_eq!(p[0].key, "cluster.replica_max_messages", "{p:?}");
}

#[test]
fn durable_retained_messages_follow_the_ha_servers_unless_set() {
    let ha = "[[haserver]]\nid = \"h\"\nlisten = \"127.0.0.1:7000\"\n";
    let parse = |text: &str| Config::parse(text, "t.toml").map(|c| c.cluster.durable_retained);
    assert_eq!(parse(MINIMAL).ok(), Some(false), "nowhere to write: off");
    assert_eq!(parse(&format!("{MINIMAL}{ha}")).ok(), Some(true));
    let off = format!("[cluster]\ndurable_retained = false\n{MINIMAL}{ha}");
    assert_eq!(parse(&off).ok(), Some(false));
}

#[test]
fn the_replication_factor_is_three_by_default_and_never_zero() {
    let c = Config::parse(MINIMAL, "t.toml").expect("valid");
    assert_eq!(c.cluster.replication_factor.get(), 3);
    let c = Config::parse(
        &format!("[cluster]\nreplication_factor = 2\n{MINIMAL}"),
        "t.toml",
    )
    .expect("valid");
    assert_eq!(c.cluster.replication_factor.get(), 2);
    let p = problems(&format!("[cluster]\nreplication_factor = 0\n{MINIMAL}"));
    assert_eq!(p[0].key, "cluster.replication_factor", "{p:?}");
}

#[test]
fn connection_limits_are_read_and_checked() {
    let with = |lb: &str, fe: &str| {
        MINIMAL
            .replace("[[frontend]]", &format!("{lb}[[frontend]]"))
            .replace(
                "bind = \"127.0.0.1:1883\"",
                &format!("bind = \"127.0.0.1:1883\"\n{fe}"),
            )
    };
    let c = Config::parse(
        &with(
            "[lb]\nmax_connections = 5000\n",
            "max_connections_per_source = 100\nsource_rate = 20",
        ),
        "t.toml",
    )
    .expect("valid");
    let l = c.frontends[0].limits;
    assert_eq!(c.lb.max_connections.map(|n| n.get()), Some(5000));
    assert_eq!(l.max_connections_per_source.map(|n| n.get()), Some(100));
    let rate = l.source_rate.expect("a rate");
    assert_eq!(
        (rate.per_second.get(), rate.burst.get()),
        (20, 20),
        "burst defaults to the rate"
    );
    let p = problems(&with("", "source_burst = 5\nmax_connections = 0"));
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["frontend[0].source_burst", "frontend[0].max_connections"],
        "{p:?}"
    );
}

#[test]
fn durations_have_an_upper_bound() {
    let with = |d: &str| format!("{MINIMAL}idle_timeout = \"{d}\"\n");
    assert!(Config::parse(&with("8760h"), "t.toml").is_ok());
    for huge in ["8761h", "100000000000h", "18446744073709551615s"] {
        let p = problems(&with(huge));
        assert_eq!(p.len(), 1, "{huge}: {p:?}");
        assert_eq!(p[0].key, "rule[0].idle_timeout", "{huge}");
    }
}

/// Every duration key of every section goes through the bounded parser, not only the rule's
/// `idle_timeout` above (issue 16): a key added later must be added here.
#[test]
fn every_duration_key_has_the_upper_bound() {
    let section = |table: &str, key: &str| format!("{MINIMAL}{table}\n{key} = \"8761h\"\n");
    let rule = |key: &str| format!("{MINIMAL}{key} = \"8761h\"\n");
    let probe = |key: &str| format!("{MINIMAL}[[probe]]\nname = \"p\"\n{key} = \"8761h\"\n");
    let pool = |key: &str| {
        format!(
            "{MINIMAL}[[pool]]\nname = \"d\"\ndiscovery = \"haserver\"\n{key} = \"8761h\"\n\
             [[haserver]]\nid = \"h\"\nlisten = \"127.0.0.1:7000\"\n"
        )
    };
    let mut cases: Vec<(String, String)> = Vec::new();
    for key in ["shutdown_grace", "watch_interval"] {
        cases.push((section("[lb]", key), format!("lb.{key}")));
    }
    for key in ["reconnect_min", "reconnect_max"] {
        cases.push((section("[cluster]", key), format!("cluster.{key}")));
    }
    for key in [
        "heartbeat_interval",
        "member_timeout",
        "remove_after",
        "lease",
    ] {
        cases.push((section("[ha]", key), format!("ha.{key}")));
    }
    for key in ["remove_after", "queue_timeout", "slow_start"] {
        cases.push((pool(key), format!("pool[1].{key}")));
    }
    for key in ["interval", "timeout"] {
        cases.push((probe(key), format!("probe[0].{key}")));
    }
    for key in [
        "idle_timeout",
        "connect_timeout",
        "inspect_timeout",
        "mqtt_keep_alive",
        "tcp_keepalive_time",
        "tcp_keepalive_interval",
    ] {
        cases.push((rule(key), format!("rule[0].{key}")));
    }
    cases.push((
        "[[broker]]\nid = \"b\"\nmqtt = \"127.0.0.1:1001\"\nhandshake_timeout = \"8761h\"\n".into(),
        "broker[0].handshake_timeout".into(),
    ));
    assert_eq!(cases.len(), 20, "every duration key of raw.rs");
    for (text, key) in &cases {
        let p = problems(text);
        assert_eq!(p.len(), 1, "{key}: {p:?}");
        assert_eq!(p[0].key, *key, "{p:?}");
        assert_eq!(p[0].message, "must be at most 8760h (a year)", "{key}");
    }
}

#[test]
fn unknown_keys_are_refused_with_location() {
    let err = Config::parse(&format!("{MINIMAL}\nbogus = 1\n"), "t.toml").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("t.toml"), "{msg}");
    assert!(msg.contains("bogus"), "{msg}");
    let err = Config::parse(
        "[[frontend]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nport = 3\n",
        "t.toml",
    )
    .unwrap_err();
    assert!(err.to_string().contains("port"), "{err}");
}

#[test]
fn every_problem_is_reported_with_its_key() {
    let text = r#"
[lb]
admin = "nowhere"

[[frontend]]
name = "f"
bind = "1.2.3.4"

[[probe]]
name = "p"
protocol = "icmp"
interval = "5"
timeout = "10s"

[[pool]]
name = "pool"
probe = "missing"
[[pool.backend]]
id = "b1"
addr = "127.0.0.1:1"
weight = 0
[[pool.backend]]
id = "b1"
addr = "127.0.0.1:2"

[[rule]]
name = "r"
frontend = "nope"
pool = "nopool"
distribution = "random"
idle_timeout = "0s"
"#;
    let p = problems(text);
    let mut keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    keys.sort();
    for expected in [
        "lb.admin",
        "frontend[0].bind",
        "probe[0].protocol",
        "probe[0].interval",
        "pool[0].probe",
        "pool[0].backend[0].weight",
        "pool[0].backend[1].id",
        "rule[0].frontend",
        "rule[0].pool",
        "rule[0].distribution",
        "rule[0].idle_timeout",
    ] {
        assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
    }
}

#[test]
fn one_rule_per_frontend_and_unique_binds() {
    let text = format!(
        "{MINIMAL}\n[[rule]]\nname = \"r2\"\nfrontend = \"mqtt\"\npool = \"brokers\"\n\
         [[frontend]]\nname = \"dup\"\nbind = \"127.0.0.1:1883\"\n"
    );
    let keys: Vec<String> = problems(&text).into_iter().map(|p| p.key).collect();
    assert!(keys.contains(&"rule[1].frontend".to_string()), "{keys:?}");
    assert!(keys.contains(&"frontend[1].bind".to_string()), "{keys:?}");
}

#[test]
fn probe_port_traffic_and_thresholds() {
    let text = format!(
        "{MINIMAL}\n[[probe]]\nname = \"p\"\nport = \"traffic\"\nprotocol = \"http\"\npath = \"/health\"\n\
         up_threshold = 2\ndown_threshold = 3\ninterval = \"1s\"\ntimeout = \"500ms\"\n"
    )
    .replace("name = \"brokers\"\n", "name = \"brokers\"\nprobe = \"p\"\n");
    let c = Config::parse(&text, "t.toml").expect("valid");
    let probe = &c.pools[0].probe;
    assert_eq!(probe.port, ProbePort::Traffic);
    assert_eq!(
        probe.protocol,
        ProbeProtocol::Http {
            path: "/health".into()
        }
    );
    assert_eq!(
        (probe.up_threshold.get(), probe.down_threshold.get()),
        (2, 3)
    );
    assert_eq!(
        probe.target(&c.pools[0].backends[0]).to_string(),
        "127.0.0.1:1884"
    );

    let bad = format!(
        "{MINIMAL}\n[[probe]]\nname = \"p\"\nport = 70000\nthreshold = 2\ndown_threshold = 1\n"
    );
    let keys: Vec<String> = problems(&bad).into_iter().map(|p| p.key).collect();
    assert!(keys.contains(&"probe[0].port".to_string()), "{keys:?}");
    assert!(keys.contains(&"probe[0].threshold".to_string()), "{keys:?}");
}

#[test]
fn idle_timeout_below_keepalive_is_warned() {
    let text = MINIMAL.replace(
        "pool = \"brokers\"\n",
        "pool = \"brokers\"\nidle_timeout = \"60s\"\nmqtt_keep_alive = \"60s\"\n",
    );
    let c = Config::parse(&text, "t.toml").expect("valid with a warning");
    assert!(
        c.warnings.iter().any(|w| w.key == "rule[0].idle_timeout"),
        "{:?}",
        c.warnings
    );
}

#[test]
fn mqtt_ports_pick_the_level() {
    let text = MINIMAL.replace(
        "addr = \"127.0.0.1:1884\"",
        "addr = \"127.0.0.1:1884\"\nmqtt_ports = { v5 = 1885 }",
    );
    let c = Config::parse(&text, "t.toml").expect("valid");
    let b = &c.pools[0].backends[0];
    assert_eq!(b.addr_for_level(Some(5)).port(), 1885);
    assert_eq!(b.addr_for_level(Some(4)).port(), 1884);
    assert_eq!(b.addr_for_level(None).port(), 1884);
}

#[test]
fn missing_file_names_the_file() {
    let err = Config::load("/definitely/not/here.toml").unwrap_err();
    assert!(err.to_string().contains("/definitely/not/here.toml"));
}

/// Every shipped example must load; the count guards against a glob that matches nothing.
#[test]
fn every_example_file_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) == Some("toml") {
            let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                cfg.warnings.is_empty(),
                "{}: {:?}",
                path.display(),
                cfg.warnings
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3, "expected 3 example files in {}", dir.display());
    let builtin = Config::builtin().expect("built-in default is valid");
    // `mqlb up`'s clients of a hung broker reconnect elsewhere at once, not after their keep alive.
    assert!(builtin.rules.iter().all(|r| r.close_on_backend_down));
}

#[test]
fn cluster_of_brokers_needs_mesh_and_secret() {
    let two = |secret: &str, mesh2: &str| {
        format!(
            "{secret}[[broker]]\nid = \"n1\"\nmqtt = \"127.0.0.1:1001\"\nmesh = \"127.0.0.1:1002\"\n\
             [[broker]]\nid = \"n2\"\nmqtt = \"127.0.0.1:1003\"\n{mesh2}"
        )
    };
    let keys = |text: &str| {
        problems(text)
            .into_iter()
            .map(|p| p.key)
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&two("", "")), vec!["broker[1].mesh", "cluster.secret"]);
    assert_eq!(
        keys(&two(
            "[cluster]\nsecret = \"short\"\n",
            "mesh = \"127.0.0.1:1002\"\n"
        )),
        vec!["broker[1].mesh", "cluster.secret"],
        "short secret, and a mesh address shared with broker[0]"
    );
    let ok = Config::parse(
        &two(
            "[cluster]\nsecret = \"0123456789abcdef\"\n",
            "mesh = \"127.0.0.1:1004\"\n",
        ),
        "t",
    )
    .expect("valid");
    assert_eq!(ok.brokers.len(), 2);
    assert_eq!(ok.brokers[1].max_inflight.get(), 100);
    assert_eq!(format!("{:?}", ok.cluster.secret), "Some(Secret(****))");
    // One broker alone needs neither.
    assert!(Config::parse(
        "[[broker]]\nid = \"solo\"\nmqtt = \"127.0.0.1:1001\"\n",
        "t"
    )
    .is_ok());
}

#[test]
fn data_threads_default_to_one_per_core_and_must_be_sane() {
    assert_eq!(
        Config::parse(MINIMAL, "t.toml")
            .expect("valid")
            .lb
            .data_threads,
        None
    );
    let with = |n: &str| format!("[lb]\ndata_threads = {n}\n{MINIMAL}");
    let c = Config::parse(&with("2"), "t.toml").expect("valid");
    assert_eq!(c.lb.data_threads.map(|n| n.get()), Some(2));
    for bad in ["0", "5000"] {
        let p = problems(&with(bad));
        assert!(
            p.iter().any(|p| p.key == "lb.data_threads"),
            "data_threads = {bad}: {p:?}"
        );
    }
}

#[test]
fn remove_after_is_a_discovery_pools_key_with_a_default() {
    let pool = |extra: &str| {
        format!(
            "[cluster]\nsecret = \"0123456789abcdef\"\n[[haserver]]\nid = \"ha1\"\n\
             listen = \"127.0.0.1:8082\"\n[[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:1883\"\n\
             [[pool]]\nname = \"p\"\n{extra}\n[[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n"
        )
    };
    let c = Config::parse(&pool("discovery = \"haserver\""), "t").expect("valid");
    assert_eq!(c.pools[0].remove_after, Duration::from_secs(600));
    let c = Config::parse(
        &pool("discovery = \"haserver\"\nremove_after = \"30s\""),
        "t",
    )
    .expect("valid");
    assert_eq!(c.pools[0].remove_after, Duration::from_secs(30));
    for bad in ["0s", "soon", "9000h"] {
        let p = problems(&pool(&format!(
            "discovery = \"haserver\"\nremove_after = \"{bad}\""
        )));
        assert_eq!(
            p.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(),
            ["pool[0].remove_after"],
            "{bad}"
        );
    }
    let p = problems(&pool(
        "remove_after = \"1m\"\n[[pool.backend]]\nid = \"b\"\naddr = \"127.0.0.1:1\"",
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "pool[0].remove_after");
    assert!(p[0].message.contains("discovery"), "{}", p[0].message);
}

#[test]
fn tcp_keepalive_is_per_rule_in_whole_seconds_within_the_kernels_bounds() {
    let c = Config::parse(MINIMAL, "t.toml").expect("valid");
    assert_eq!(c.rules[0].tcp_keepalive, TcpKeepalive::default());
    assert_eq!(c.rules[0].tcp_keepalive.time, Duration::from_secs(60));
    assert_eq!(c.rules[0].tcp_keepalive.interval, Duration::from_secs(10));

    let set = format!(
        "{MINIMAL}tcp_keepalive_time = \"2m\"\ntcp_keepalive_interval = \"5s\"\ntcp_keepalive_count = 4\n"
    );
    let c = Config::parse(&set, "t.toml").expect("valid");
    assert_eq!(
        c.rules[0].tcp_keepalive,
        TcpKeepalive {
            time: Duration::from_secs(120),
            interval: Duration::from_secs(5),
            count: Some(4),
        }
    );

    let bad = format!(
        "{MINIMAL}tcp_keepalive_time = \"1500ms\"\ntcp_keepalive_interval = \"10h\"\ntcp_keepalive_count = 0\n"
    );
    let mut keys: Vec<String> = problems(&bad).into_iter().map(|p| p.key).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "rule[0].tcp_keepalive_count",
            "rule[0].tcp_keepalive_interval",
            "rule[0].tcp_keepalive_time"
        ]
    );
    let p = problems(&format!("{MINIMAL}tcp_keepalive_count = 128\n"));
    assert_eq!(p.len(), 1, "{p:?}");
}

#[test]
fn keepalive_not_below_the_idle_timeout_is_warned() {
    let text = format!("{MINIMAL}idle_timeout = \"2m\"\ntcp_keepalive_time = \"2m\"\n");
    let c = Config::parse(&text, "t.toml").expect("valid");
    assert!(
        c.warnings
            .iter()
            .any(|w| w.key == "rule[0].tcp_keepalive_time"),
        "{:?}",
        c.warnings
    );
}

#[test]
fn problems_and_warnings_carry_their_line() {
    let text = format!("{MINIMAL}distribution = \"random\"\n");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    let line = text
        .lines()
        .position(|l| l.starts_with("distribution"))
        .map(|i| i + 1);
    assert_eq!(p[0].line, line);
    assert_eq!(
        p[0].located("t.toml"),
        format!(
            "t.toml:{}: rule[0].distribution: {}",
            line.unwrap_or(0),
            p[0].message
        )
    );
    let warned = format!("{MINIMAL}idle_timeout = \"30s\"\n");
    let c = Config::parse(&warned, "t.toml").expect("valid");
    let w = c.warnings.iter().find(|w| w.key == "rule[0].idle_timeout");
    let line = warned
        .lines()
        .position(|l| l.starts_with("idle_timeout"))
        .map(|i| i + 1);
    assert_eq!(w.and_then(|w| w.line), line, "{:?}", c.warnings);
}

/// A frontend with `tls` and the certificate and key files it names (self-signed).
fn tls_frontend(dir: &std::path::Path, tls: &str) -> String {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
    std::fs::write(dir.join("chain.pem"), cert.pem()).expect("cert");
    std::fs::write(dir.join("key.pem"), signing_key.serialize_pem()).expect("key");
    let tls = tls.replace("DIR", &dir.display().to_string());
    MINIMAL.replace(
        "bind = \"127.0.0.1:1883\"\n",
        &format!("bind = \"127.0.0.1:1883\"\ntls = {tls}\n"),
    )
}

#[test]
fn tls_reads_the_files_at_load_with_mqtt_as_the_default_alpn() {
    let dir = tempfile::tempdir().expect("dir");
    let text = tls_frontend(
        dir.path(),
        r#"{ cert = "DIR/chain.pem", key = "DIR/key.pem" }"#,
    );
    let c = Config::parse(&text, "t.toml").expect("valid");
    let tls = c.frontends[0].tls.as_ref().expect("tls");
    assert_eq!(tls.alpn, ["mqtt"]);
    assert_eq!(tls.cert, dir.path().join("chain.pem"));
    assert_eq!(tls.server.config().alpn_protocols, [b"mqtt".to_vec()]);
    assert!(
        Config::parse(MINIMAL, "t.toml").expect("valid").frontends[0]
            .tls
            .is_none()
    );

    let own = tls_frontend(
        dir.path(),
        r#"{ cert = "DIR/chain.pem", key = "DIR/key.pem", alpn = ["mqtt", "x-mqtt"] }"#,
    );
    let c = Config::parse(&own, "t.toml").expect("valid");
    assert_eq!(
        c.frontends[0].tls.as_ref().expect("tls").alpn,
        ["mqtt", "x-mqtt"]
    );
}

#[test]
fn unusable_tls_files_are_config_errors_naming_the_frontend_and_the_file() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("junk.pem"), "junk").expect("junk");
    let cases = [
        (
            r#"{ cert = "DIR/none.pem", key = "DIR/key.pem" }"#,
            "frontend[0].tls.cert",
            "none.pem",
        ),
        (
            r#"{ cert = "DIR/junk.pem", key = "DIR/key.pem" }"#,
            "frontend[0].tls.cert",
            "junk.pem",
        ),
        (
            r#"{ cert = "DIR/chain.pem", key = "DIR/none.pem" }"#,
            "frontend[0].tls.key",
            "none.pem",
        ),
        (
            r#"{ cert = "DIR/chain.pem", key = "DIR/junk.pem" }"#,
            "frontend[0].tls.key",
            "junk.pem",
        ),
        (
            r#"{ cert = "DIR/chain.pem", key = "DIR/key.pem", alpn = [""] }"#,
            "frontend[0].tls.alpn[0]",
            "ALPN",
        ),
    ];
    for (tls, key, named) in cases {
        let p = problems(&tls_frontend(dir.path(), tls));
        assert_eq!(p.len(), 1, "{tls}: {p:?}");
        assert_eq!(p[0].key, key, "{tls}");
        assert!(p[0].message.contains(named), "{tls}: {}", p[0].message);
        if named != "ALPN" {
            assert!(
                p[0].message.contains("frontend \"mqtt\""),
                "{}",
                p[0].message
            );
        }
    }
    let half = tls_frontend(dir.path(), r#"{ cert = "DIR/chain.pem" }"#);
    match Config::parse(&half, "t.toml") {
        Err(ConfigError::Syntax { message, .. }) => assert!(message.contains("`key`"), "{message}"),
        other => panic!("a tls without key must be refused: {other:?}"),
    }
}

#[test]
fn tls_sni_certificates_are_checked_against_their_names() {
    let dir = tempfile::tempdir().expect("dir");
    let b = rcgen::generate_simple_self_signed(vec!["b.example.com".into()]).expect("rcgen");
    std::fs::write(dir.path().join("b.pem"), b.cert.pem()).expect("cert");
    std::fs::write(dir.path().join("b.key"), b.signing_key.serialize_pem()).expect("key");
    let with = |sni: &str| {
        tls_frontend(
            dir.path(),
            &format!(r#"{{ cert = "DIR/chain.pem", key = "DIR/key.pem", sni = [{sni}] }}"#),
        )
    };
    let good = with(r#"{ names = ["B.example.com"], cert = "DIR/b.pem", key = "DIR/b.key" }"#);
    let c = Config::parse(&good, "t.toml").expect("valid");
    let tls = c.frontends[0].tls.as_ref().expect("tls");
    assert_eq!(tls.sni.len(), 1);
    assert_eq!(tls.sni[0].names, ["B.example.com"]);
    let plain = Config::parse(
        &tls_frontend(
            dir.path(),
            r#"{ cert = "DIR/chain.pem", key = "DIR/key.pem" }"#,
        ),
        "t.toml",
    )
    .expect("valid");
    assert_ne!(
        tls.server,
        plain.frontends[0].tls.as_ref().expect("tls").server,
        "another certificate is another server"
    );

    let cases = [
        (
            r#"{ names = ["c.example.com"], cert = "DIR/b.pem", key = "DIR/b.key" }"#,
            "frontend[0].tls.sni[0].names",
            "c.example.com",
        ),
        (
            r#"{ names = [], cert = "DIR/b.pem", key = "DIR/b.key" }"#,
            "frontend[0].tls.sni[0].names",
            "no name",
        ),
        (
            r#"{ names = ["b.example.com"], cert = "DIR/b.pem", key = "DIR/key.pem" }"#,
            "frontend[0].tls.sni[0].key",
            "key.pem",
        ),
        (
            r#"{ names = ["b.example.com"], cert = "DIR/none.pem", key = "DIR/b.key" }"#,
            "frontend[0].tls.sni[0].cert",
            "none.pem",
        ),
        (
            r#"{ names = ["b.example.com"], cert = "DIR/b.pem", key = "DIR/b.key" },
               { names = ["b.example.com"], cert = "DIR/b.pem", key = "DIR/b.key" }"#,
            "frontend[0].tls.sni[1].names",
            "another",
        ),
    ];
    for (sni, key, says) in cases {
        let p = problems(&with(sni));
        assert_eq!(p.len(), 1, "{sni}: {p:?}");
        assert_eq!(p[0].key, key, "{sni}");
        assert!(p[0].message.contains(says), "{sni}: {}", p[0].message);
    }
}

#[test]
fn proxy_protocol_keys_are_off_by_default_and_checked() {
    let c = Config::parse(MINIMAL, "t.toml").expect("valid");
    assert_eq!(c.pool("brokers").expect("pool").send_proxy, None);
    assert!(c.frontends[0].accept_proxy.is_empty());
    assert!(!c.frontends[0].trusts_proxy("127.0.0.1".parse().expect("ip")));

    let with = |frontend: &str, pool: &str| {
        MINIMAL
            .replace(
                "bind = \"127.0.0.1:1883\"\n",
                &format!("bind = \"127.0.0.1:1883\"\n{frontend}\n"),
            )
            .replace(
                "name = \"brokers\"\n",
                &format!("name = \"brokers\"\n{pool}\n"),
            )
    };
    let c = Config::parse(
        &with(
            "accept_proxy = [\"10.0.0.0/8\", \"192.0.2.7\", \"fd00::/8\"]",
            "send_proxy = \"v2\"",
        ),
        "t.toml",
    )
    .expect("valid");
    assert_eq!(
        c.pool("brokers").expect("pool").send_proxy,
        Some(ProxyVersion::V2)
    );
    let f = &c.frontends[0];
    for (ip, trusted) in [
        ("10.9.8.7", true),
        ("192.0.2.7", true),
        ("192.0.2.8", false),
        ("::ffff:10.1.1.1", true),
        ("fd12::1", true),
        ("127.0.0.1", false),
    ] {
        assert_eq!(f.trusts_proxy(ip.parse().expect("ip")), trusted, "{ip}");
    }

    let p = problems(&with(
        "accept_proxy = [\"10.0.0.0/33\", \"not-an-ip\"]",
        "send_proxy = \"v3\"",
    ));
    let mut keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "frontend[0].accept_proxy[0]",
            "frontend[0].accept_proxy[1]",
            "pool[0].send_proxy"
        ],
        "{p:?}"
    );

    let c = Config::parse(&with("accept_proxy = [\"0.0.0.0/0\"]", ""), "t.toml").expect("valid");
    assert!(
        c.warnings
            .iter()
            .any(|w| w.key == "frontend[0].accept_proxy[0]"),
        "trusting everyone is warned: {:?}",
        c.warnings
    );
}

/// `distribution = "sni"` reads the ClientHello of TLS passed through: on a frontend that
/// terminates TLS it is refused; mTLS keys without `client_ca` are refused naming the key.
#[test]
fn sni_needs_tls_passed_through_and_mtls_keys_need_a_client_ca() {
    let dir = tempfile::tempdir().expect("dir");
    let plain = format!("{MINIMAL}distribution = \"sni\"\n");
    let c = Config::parse(&plain, "t.toml").expect("sni on a plain frontend");
    assert_eq!(c.rules[0].distribution, Distribution::Sni);
    let tls = tls_frontend(
        dir.path(),
        r#"{ cert = "DIR/chain.pem", key = "DIR/key.pem" }"#,
    ) + "distribution = \"sni\"\n";
    let p = problems(&tls);
    assert!(p.iter().any(|p| p.key == "rule[0].distribution"), "{p:?}");
    let orphan = tls_frontend(
        dir.path(),
        r#"{ cert = "DIR/chain.pem", key = "DIR/key.pem", client_id = "cn" }"#,
    );
    let p = problems(&orphan);
    assert!(
        p.iter().any(|p| p.key == "frontend[0].tls.client_id"),
        "{p:?}"
    );
}

/// `[[broker]]` with TLS listeners and `accept_proxy`: a frontend's `tls` table and CIDR list,
/// the same checks, the messages naming the broker.
#[test]
fn broker_tls_listeners_and_accept_proxy_are_read_and_checked() {
    let dir = tempfile::tempdir().expect("dir");
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
    std::fs::write(dir.path().join("chain.pem"), cert.pem()).expect("cert");
    std::fs::write(dir.path().join("key.pem"), signing_key.serialize_pem()).expect("key");
    let d = dir.path().display();
    let broker = |extra: &str| {
        format!("[[broker]]\nid = \"b1\"\nmqtt = \"127.0.0.1:1001\"\n{extra}\n")
            .replace("DIR", &d.to_string())
    };
    let plain = Config::parse(&broker(""), "t").expect("valid");
    let b = &plain.brokers[0];
    assert_eq!(
        (b.mqtts, &b.tls, b.handshake_timeout),
        (None, &None, Duration::from_secs(10))
    );
    assert!(!b.trusts_proxy("127.0.0.1".parse().expect("ip")));

    let c = Config::parse(
        &broker(
            "mqtts = \"127.0.0.1:1002\"\nmqtts_v5 = \"127.0.0.1:1003\"\n\
             tls = { cert = \"DIR/chain.pem\", key = \"DIR/key.pem\", client_ca = \"DIR/chain.pem\", client_auth = \"optional\" }\n\
             accept_proxy = [\"127.0.0.1/32\", \"fd00::/8\"]\nhandshake_timeout = \"2s\"",
        ),
        "t",
    )
    .expect("valid");
    let b = &c.brokers[0];
    assert_eq!(b.mqtts, Some("127.0.0.1:1002".parse().expect("addr")));
    assert_eq!(b.mqtts_v5, Some("127.0.0.1:1003".parse().expect("addr")));
    let tls = b.tls.as_ref().expect("tls");
    assert_eq!(tls.client_auth.as_ref().map(|a| a.required), Some(false));
    assert_eq!(tls.server.config().alpn_protocols, [b"mqtt".to_vec()]);
    assert!(b.trusts_proxy("::ffff:127.0.0.1".parse().expect("ip")));
    assert!(!b.trusts_proxy("127.0.0.2".parse().expect("ip")));
    assert_eq!(b.handshake_timeout, Duration::from_secs(2));

    let cases = [
        ("mqtts = \"127.0.0.1:1002\"", "broker[0].tls", "need tls"),
        (
            "tls = { cert = \"DIR/chain.pem\", key = \"DIR/key.pem\" }",
            "broker[0].tls",
            "no mqtts",
        ),
        (
            "mqtts = \"127.0.0.1:1002\"\ntls = { cert = \"DIR/none.pem\", key = \"DIR/key.pem\" }",
            "broker[0].tls.cert",
            "broker \"b1\"",
        ),
        (
            "mqtts = \"127.0.0.1:1002\"\ntls = { cert = \"DIR/chain.pem\", key = \"DIR/key.pem\", client_id = \"cn\" }",
            "broker[0].tls.client_id",
            "frontend's rule",
        ),
        (
            "mqtts = \"127.0.0.1:1001\"\ntls = { cert = \"DIR/chain.pem\", key = \"DIR/key.pem\" }",
            "broker[0].mqtts",
            "also broker[0].mqtt",
        ),
        ("accept_proxy = [\"10.0.0.0/33\"]", "broker[0].accept_proxy[0]", "not a CIDR"),
    ];
    for (extra, key, says) in cases {
        let p = problems(&broker(extra));
        assert_eq!(p.len(), 1, "{extra}: {p:?}");
        assert_eq!(p[0].key, key, "{extra}");
        assert!(p[0].message.contains(says), "{extra}: {}", p[0].message);
    }
}

/// MINIMAL with `pool.tls = tls` (DIR: `dir`, which gets a self-signed `chain.pem`/`key.pem`)
/// and `probe`, a `[[probe]]` the pool names when given.
fn tls_pool(dir: &std::path::Path, tls: &str, probe: Option<&str>) -> String {
    let frontend = tls_frontend(dir, "{ cert = \"DIR/chain.pem\", key = \"DIR/key.pem\" }");
    let plain = frontend.replace(
        &format!(
            "tls = {{ cert = \"{0}/chain.pem\", key = \"{0}/key.pem\" }}\n",
            dir.display()
        ),
        "",
    );
    let tls = tls.replace("DIR", &dir.display().to_string());
    let mut pool = format!("name = \"brokers\"\ntls = {tls}\n");
    if let Some(protocol) = probe {
        pool += "probe = \"p\"\n";
        return plain.replace("name = \"brokers\"\n", &pool)
            + &format!("[[probe]]\nname = \"p\"\nprotocol = \"{protocol}\"\n");
    }
    plain.replace("name = \"brokers\"\n", &pool)
}

#[test]
fn pool_tls_is_read_at_load_and_verifies_the_members_address_by_default() {
    let dir = tempfile::tempdir().expect("dir");
    let c = Config::parse(
        &tls_pool(dir.path(), r#"{ ca = "DIR/chain.pem" }"#, None),
        "t",
    )
    .expect("valid");
    assert!(c.frontends[0].tls.is_none(), "the frontend stays plain");
    let tls = c.pools[0].tls.as_ref().expect("pool tls");
    assert_eq!(tls.ca, dir.path().join("chain.pem"));
    assert!(tls.alpn.is_empty() && tls.cert.is_none());
    let ip: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
    assert_eq!(
        tls.server_name_for(ip),
        rustls::pki_types::ServerName::IpAddress(ip.into())
    );
    let full = tls_pool(
        dir.path(),
        r#"{ ca = "DIR/chain.pem", server_name = "broker.internal", cert = "DIR/chain.pem", key = "DIR/key.pem", alpn = ["mqtt"] }"#,
        Some("mqtts"),
    );
    let c = Config::parse(&full, "t").expect("valid");
    let tls = c.pools[0].tls.as_ref().expect("pool tls");
    assert_eq!(tls.server_name_for(ip).to_str(), "broker.internal");
    assert_eq!(tls.client.config().alpn_protocols, [b"mqtt".to_vec()]);
    assert!(tls.client.config().client_auth_cert_resolver.has_certs());
    assert_eq!(c.pools[0].probe.protocol, ProbeProtocol::Mqtts);
    assert!(Config::parse(MINIMAL, "t").expect("valid").pools[0]
        .tls
        .is_none());
}

#[test]
fn unusable_pool_tls_is_refused_naming_the_pool_and_tls_probes_need_it() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("junk.pem"), "junk").expect("junk");
    let cases = [
        (r#"{ ca = "DIR/none.pem" }"#, "pool[0].tls.ca", "none.pem"),
        (r#"{ ca = "DIR/junk.pem" }"#, "pool[0].tls.ca", "junk.pem"),
        // A key is not a CA certificate.
        (
            r#"{ ca = "DIR/key.pem" }"#,
            "pool[0].tls.ca",
            "no PEM certificate",
        ),
        (
            r#"{ ca = "DIR/chain.pem", server_name = "not a name" }"#,
            "pool[0].tls.server_name",
            "not a DNS name",
        ),
        (
            r#"{ ca = "DIR/chain.pem", cert = "DIR/chain.pem" }"#,
            "pool[0].tls.key",
            "needs tls.key",
        ),
        (
            r#"{ ca = "DIR/chain.pem", cert = "DIR/chain.pem", key = "DIR/junk.pem" }"#,
            "pool[0].tls.key",
            "junk.pem",
        ),
        (
            r#"{ ca = "DIR/chain.pem", alpn = [""] }"#,
            "pool[0].tls.alpn[0]",
            "ALPN",
        ),
    ];
    for (tls, key, named) in cases {
        let p = problems(&tls_pool(dir.path(), tls, None));
        assert_eq!(p.len(), 1, "{tls}: {p:?}");
        assert_eq!(p[0].key, key, "{tls}");
        assert!(p[0].message.contains(named), "{tls}: {}", p[0].message);
        if named != "ALPN" {
            assert!(
                p[0].message.contains("pool \"brokers\""),
                "{}",
                p[0].message
            );
        }
    }
    for protocol in ["tls", "mqtts"] {
        let text = MINIMAL.replace(
            "name = \"brokers\"\n",
            "name = \"brokers\"\nprobe = \"p\"\n",
        ) + &format!("[[probe]]\nname = \"p\"\nprotocol = \"{protocol}\"\n");
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "pool[0].probe");
        assert!(
            p[0].message.contains("probe \"p\"") && p[0].message.contains("pool \"brokers\""),
            "{}",
            p[0].message
        );
    }
}

#[test]
fn a_pool_connects_from_its_source_else_the_lbs() {
    let c = Config::parse(MINIMAL, "t.toml").expect("valid");
    assert_eq!(
        (c.lb.source, c.pool("brokers").and_then(|p| p.source)),
        (None, None)
    );

    let lb_wide = format!("[lb]\nsource = \"127.0.9.1\"\n{MINIMAL}");
    let c = Config::parse(&lb_wide, "t.toml").expect("valid");
    let ip: std::net::IpAddr = "127.0.9.1".parse().expect("ip");
    assert_eq!(c.lb.source, Some(ip));
    assert_eq!(c.pool("brokers").and_then(|p| p.source), Some(ip));

    let own = format!("[lb]\nsource = \"127.0.9.1\"\n{MINIMAL}").replace(
        "name = \"brokers\"\n",
        "name = \"brokers\"\nsource = \"127.0.8.1\"\n",
    );
    let c = Config::parse(&own, "t.toml").expect("valid");
    let ip: std::net::IpAddr = "127.0.8.1".parse().expect("ip");
    assert_eq!(c.pool("brokers").and_then(|p| p.source), Some(ip));
}

#[test]
fn a_source_must_be_an_address_of_the_members_family() {
    let p = problems(&MINIMAL.replace(
        "name = \"brokers\"\n",
        "name = \"brokers\"\nsource = \"lb-host\"\n",
    ));
    assert!(
        p.iter()
            .any(|p| p.key == "pool[0].source" && p.message.contains("not an IP address")),
        "{p:?}"
    );
    let p = problems(&format!("[lb]\nsource = \"::1\"\n{MINIMAL}"));
    assert!(
        p.iter().any(|p| p.key == "lb.source"
            && p.message
                .contains("cannot reach backend \"b1\" at 127.0.0.1:1884")),
        "{p:?}"
    );
    let p = problems(&format!("[lb]\nsource = \"127.0.0.300\"\n{MINIMAL}"));
    assert!(p.iter().any(|p| p.key == "lb.source"), "{p:?}");
}
