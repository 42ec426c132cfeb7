//! Issue 13, the HA server's part: nobody without the cluster secret can change (or read) the
//! membership, a live member cannot be re-pointed, replays are refused, and idle connections
//! cannot take the HA server away from the brokers and the LB.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mqlb_config::Config;
use mqlb_lb::{Lb, Listeners};
use mqlb_tests::{
    fast_ha_timing, free_port, get_json, ha_auth_headers, ha_get_json, ha_request, http, http_body,
    http_with_headers, metric, mqlb_bin, start_haserver, unix_ms, wait_until, Cluster, KillOnDrop,
    TempDir, TEST_SECRET,
};

const DEADLINE: Duration = Duration::from_secs(15);

/// An LB whose one pool follows the HA server at `ha`.
async fn lb_following(ha: SocketAddr) -> anyhow::Result<Lb> {
    let cfg = Config::parse(
        &format!(
            "[lb]\nadmin = \"127.0.0.1:0\"\nwatch_config = false\nshutdown_grace = \"1s\"\n\
             [cluster]\nsecret = \"{TEST_SECRET}\"\n\
             [[haserver]]\nid = \"ha1\"\nlisten = \"{ha}\"\n\
             [[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
             [[pool]]\nname = \"brokers\"\ndiscovery = \"haserver\"\n\
             [[rule]]\nname = \"mqtt\"\nfrontend = \"mqtt\"\npool = \"brokers\"\n"
        ),
        "test",
    )?;
    Ok(Lb::start(cfg, Listeners::default()).await?)
}

/// The LB's backends as sorted `(id, addr)`.
async fn pool(lb: &Lb) -> Vec<(String, String)> {
    let v = get_json(lb.admin_addr(), "/api/backends")
        .await
        .unwrap_or_default();
    let mut out: Vec<(String, String)> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| Some((b["id"].as_str()?.into(), b["addr"].as_str()?.into())))
        .collect();
    out.sort();
    out
}

async fn version(ha: SocketAddr) -> anyhow::Result<u64> {
    Ok(ha_get_json(ha, "/api/cluster").await?["version"]
        .as_u64()
        .unwrap_or(0))
}

/// The traffic hijack of issue 13: a registration that re-points b1 to the caller's listener,
/// or adds a member, without the secret (none, or a wrong one) → 401; with the secret but for
/// a live member at another address → 409. Nothing is written and the LB's pool stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_registrations_and_repointing_are_refused_and_the_lb_pool_is_unchanged(
) -> anyhow::Result<()> {
    let dir = TempDir::new("sec-forge")?;
    let ha = start_haserver("ha1", &dir.path().join("ha.sqlite"), fast_ha_timing()).await?;
    let a = ha.addr();
    let cluster = Cluster::start_with_ha(2, &[a]).await?;
    let lb = lb_following(a).await?;
    let real = vec![
        ("n1".to_string(), cluster.mqtt(0).to_string()),
        ("n2".to_string(), cluster.mqtt(1).to_string()),
    ];
    wait_until("LB pool = the 2 brokers", DEADLINE, || async {
        pool(&lb).await == real
    })
    .await?;
    let before = version(a).await?;

    let trap = "127.0.0.1:30950";
    let repoint = format!(r#"{{"id":"n1","mqtt":"{trap}"}}"#);
    let extra = format!(r#"{{"id":"evil","mqtt":"{trap}"}}"#);
    for (what, body) in [("re-pointing", &repoint), ("a new member", &extra)] {
        let b = body.as_bytes();
        let (status, text) = http_body(a, "POST", "/api/members", b).await?;
        assert_eq!(status, 401, "unsigned {what}: {text}");
        let wrong = ha_auth_headers(
            b"not-the-cluster-secret",
            "POST",
            "/api/members",
            unix_ms(),
            b,
        );
        let (status, text) = http_with_headers(a, "POST", "/api/members", &wrong, b).await?;
        assert_eq!(status, 401, "{what} signed with another secret: {text}");
    }
    for (what, path) in [
        ("deregister", "/api/members/n1"),
        ("heartbeat", "/api/members/evil/heartbeat"),
    ] {
        let method = if what == "deregister" {
            "DELETE"
        } else {
            "POST"
        };
        let (status, text) = http(a, method, path).await?;
        assert_eq!(status, 401, "unsigned {what}: {text}");
    }
    // Holding the secret is not enough to take a live member's id to another address.
    let (status, text) = ha_request(a, "POST", "/api/members", repoint.as_bytes()).await?;
    assert_eq!(status, 409, "signed re-pointing of a live member: {text}");

    assert_eq!(version(a).await?, before, "nothing was written");
    // The LB would have followed a change within a long-poll: give it time to, then compare.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(500) {
        assert_eq!(pool(&lb).await, real, "the LB's pool changed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = http(a, "GET", "/metrics").await?.1;
    for reason in ["missing", "bad_signature"] {
        assert!(
            metric(&m, "mqlb_ha_auth_failures_total", &[("reason", reason)]) >= 1.0,
            "{reason} not counted: {m}"
        );
    }
    assert_eq!(
        metric(
            &m,
            "mqlb_ha_registrations_refused_total",
            &[("reason", "address_held")]
        ),
        1.0,
        "{m}"
    );
    drop(cluster);
    lb.shutdown().await;
    ha.stop().await;
    Ok(())
}

/// A signed request captured on the wire and sent again is refused, as is one whose time is
/// outside the window; neither writes anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_or_stale_signed_requests_are_refused() -> anyhow::Result<()> {
    let dir = TempDir::new("sec-replay")?;
    let ha = start_haserver("ha1", &dir.path().join("ha.sqlite"), fast_ha_timing()).await?;
    let a = ha.addr();
    let body = br#"{"id":"b1","mqtt":"127.0.0.1:1883"}"#;
    let captured = ha_auth_headers(
        TEST_SECRET.as_bytes(),
        "POST",
        "/api/members",
        unix_ms(),
        body,
    );
    let (status, text) = http_with_headers(a, "POST", "/api/members", &captured, body).await?;
    assert_eq!(status, 200, "the original: {text}");
    let v = version(a).await?;
    // b1 deregisters; the replay would bring it back.
    assert_eq!(
        ha_request(a, "DELETE", "/api/members/b1", b"").await?.0,
        200
    );
    let (status, text) = http_with_headers(a, "POST", "/api/members", &captured, body).await?;
    assert_eq!(status, 401, "the replay: {text}");
    let stale_at = unix_ms() - 120_000;
    let stale = ha_auth_headers(
        TEST_SECRET.as_bytes(),
        "POST",
        "/api/members",
        stale_at,
        body,
    );
    let (status, text) = http_with_headers(a, "POST", "/api/members", &stale, body).await?;
    assert_eq!(status, 401, "two minutes old: {text}");
    // The signature covers the body: the same headers on another body are refused.
    let other = br#"{"id":"b2","mqtt":"127.0.0.1:1883"}"#;
    let fresh = ha_auth_headers(
        TEST_SECRET.as_bytes(),
        "POST",
        "/api/members",
        unix_ms(),
        body,
    );
    let (status, text) = http_with_headers(a, "POST", "/api/members", &fresh, other).await?;
    assert_eq!(status, 401, "a swapped body: {text}");

    let view = ha_get_json(a, "/api/cluster").await?;
    assert_eq!(view["members"].as_array().map(Vec::len), Some(0), "{view}");
    assert_eq!(
        view["version"].as_u64(),
        Some(v + 1),
        "only the deregistration"
    );
    let m = http(a, "GET", "/metrics").await?.1;
    for reason in ["replayed", "expired", "bad_signature"] {
        assert!(
            metric(&m, "mqlb_ha_auth_failures_total", &[("reason", reason)]) >= 1.0,
            "{reason} not counted: {m}"
        );
    }
    ha.stop().await;
    Ok(())
}

/// The membership is a map of the cluster: reading it takes the secret too; `/healthz` and
/// `/metrics` stay open for monitoring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_reads_are_refused_and_health_and_metrics_stay_open() -> anyhow::Result<()> {
    let dir = TempDir::new("sec-read")?;
    let ha = start_haserver("ha1", &dir.path().join("ha.sqlite"), fast_ha_timing()).await?;
    let a = ha.addr();
    for path in [
        "/api/cluster",
        "/api/cluster?since=0&wait_ms=10",
        "/api/events",
    ] {
        let (status, text) = http(a, "GET", path).await?;
        assert_eq!(status, 401, "unsigned GET {path}: {text}");
        assert!(!text.contains("members\""), "{text}");
        let (status, text) = ha_request(a, "GET", path, b"").await?;
        assert_eq!(status, 200, "signed GET {path}: {text}");
    }
    // A signature for one path does not open another.
    let h = ha_auth_headers(TEST_SECRET.as_bytes(), "GET", "/api/events", unix_ms(), b"");
    assert_eq!(
        http_with_headers(a, "GET", "/api/cluster", &h, b"")
            .await?
            .0,
        401
    );
    assert_eq!(http(a, "GET", "/healthz").await?.0, 200);
    assert_eq!(http(a, "GET", "/metrics").await?.0, 200);
    ha.stop().await;
    Ok(())
}

/// Issue 13: 600 idle connections exhausted the HA server's descriptors, the brokers' heartbeats
/// stopped landing and the LB emptied its pool. Here the HA server is a process with 256
/// descriptors (fewer than the idle connections), and while they are held open a broker keeps
/// heartbeating (it stays up) and the LB keeps reading the membership (it sees a new member).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_stop_the_ha_server_serving_brokers_and_the_lb(
) -> anyhow::Result<()> {
    let tmp = TempDir::new("sec-idle")?;
    let file = tmp.path().join("ha.toml");
    let ha = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let timing = fast_ha_timing();
    std::fs::write(
        &file,
        format!(
            "[cluster]\nsecret = \"{TEST_SECRET}\"\n\
             [ha]\nheartbeat_interval = \"{}ms\"\nmember_timeout = \"{}ms\"\nlease = \"{}ms\"\n\
             [[haserver]]\nid = \"ha1\"\nlisten = \"{ha}\"\ndb = \"{}\"\n",
            timing.heartbeat_interval.as_millis(),
            timing.member_timeout.as_millis(),
            timing.lease.as_millis(),
            tmp.path().join("ha.sqlite").display()
        ),
    )?;
    let bin = mqlb_bin()?;
    let _server = KillOnDrop(
        Command::new("sh")
            .args([
                "-c",
                "ulimit -n 256 && exec \"$0\" haserver -c \"$1\" --id ha1",
            ])
            .arg(&bin)
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_until("HA server up", DEADLINE, || async {
        http(ha, "GET", "/healthz").await.is_ok_and(|r| r.0 == 200)
    })
    .await?;
    let cluster = Cluster::start_with_ha(1, &[ha]).await?;
    let lb = lb_following(ha).await?;
    wait_until("LB pool = n1", DEADLINE, || async {
        pool(&lb).await.iter().any(|(id, _)| id == "n1")
    })
    .await?;

    let opens: Vec<_> = (0..600)
        .map(|_| {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(ha))
                    .await
                    .ok()
                    .and_then(Result::ok)
            })
        })
        .collect();
    let mut idle = Vec::new();
    for o in opens {
        if let Some(s) = o.await? {
            idle.push(s);
        }
    }
    eprintln!("{} idle connections open", idle.len());
    assert!(
        idle.len() >= 300,
        "only {} idle connections opened",
        idle.len()
    );

    // Four member timeouts: the broker stays up and reads keep being answered.
    let start = Instant::now();
    let mut polls = 0;
    let mut seen = None;
    while start.elapsed() < timing.member_timeout * 4 {
        let view = tokio::time::timeout(Duration::from_secs(2), ha_get_json(ha, "/api/cluster"))
            .await
            .map_err(|_| anyhow::anyhow!("no answer in 2 s after {:?}", start.elapsed()))??;
        let n1 = view["members"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["id"] == "n1")
            .cloned()
            .unwrap_or_default();
        assert_eq!(n1["state"], "up", "after {:?}: {view}", start.elapsed());
        seen = n1["last_seen_ms"].as_i64().or(seen);
        polls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(polls >= 10, "only {polls} polls answered");
    // A member that registers now reaches the LB's pool: the LB reads the membership.
    let late = br#"{"id":"late","mqtt":"127.0.0.1:9"}"#;
    let (status, text) = ha_request(ha, "POST", "/api/members", late).await?;
    assert_eq!(status, 200, "{text}");
    wait_until("the LB sees the new member", DEADLINE, || async {
        pool(&lb).await.iter().any(|(id, _)| id == "late")
    })
    .await?;
    let m = http(ha, "GET", "/metrics").await?.1;
    eprintln!(
        "idle connections closed to make room: {}",
        metric(&m, "mqlb_ha_http_connections_evicted_total", &[])
    );
    drop(idle);
    drop(cluster);
    lb.shutdown().await;
    Ok(())
}

/// An LB on loopback with one backend `b1` (a discard server, probed over TCP) and, when given,
/// `[lb] admin_token_file`; returns once `b1` is up.
async fn lb_with_admin_token(token_file: Option<&std::path::Path>) -> anyhow::Result<Lb> {
    let backend = mqlb_tests::discard_server()?;
    let token = token_file.map_or(String::new(), |p| {
        format!("admin_token_file = {:?}\n", p.display().to_string())
    });
    let cfg = Config::parse(
        &format!(
            "[lb]\nadmin = \"127.0.0.1:0\"\nwatch_config = false\nshutdown_grace = \"1s\"\n{token}\
             [[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\n\
             [[probe]]\nname = \"p\"\nport = \"traffic\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\n\
             [[pool]]\nname = \"pool\"\nprobe = \"p\"\n\
             [[pool.backend]]\nid = \"b1\"\naddr = \"{backend}\"\n\
             [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"pool\"\n"
        ),
        "test",
    )?;
    let lb = Lb::start(cfg, Listeners::default()).await?;
    let admin = lb.admin_addr();
    wait_until("b1 up", DEADLINE, || async {
        mqlb_tests::backend_state(admin, "b1").await.ok().as_deref() == Some("up")
    })
    .await?;
    Ok(lb)
}

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

fn bearer(token: &str) -> Vec<(String, String)> {
    vec![("Authorization".into(), format!("Bearer {token}"))]
}

/// The drain of issue 13, on an LB with `admin_token_file`: without the token, or with a wrong
/// one, a drain is refused (401, counted by reason) and the backend keeps serving; with it, the
/// drain happens. Reads on loopback need no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_write_without_the_token_is_refused_and_with_it_is_done() -> anyhow::Result<()> {
    let dir = TempDir::new("sec-admin-token")?;
    let file = dir.path().join("admin.token");
    std::fs::write(&file, format!("{ADMIN_TOKEN}\n"))?;
    let lb = lb_with_admin_token(Some(&file)).await?;
    let admin = lb.admin_addr();

    let (status, _) = http(admin, "POST", "/api/backends/b1/drain").await?;
    assert_eq!(status, 401, "no token");
    let wrong = bearer("admin-token-0123456789abcdeX");
    let (status, _) =
        http_with_headers(admin, "POST", "/api/backends/b1/drain", &wrong, b"").await?;
    assert_eq!(status, 401, "a wrong token");
    assert_eq!(mqlb_tests::backend_state(admin, "b1").await?, "up");

    let (status, body) = http_with_headers(
        admin,
        "POST",
        "/api/backends/b1/drain",
        &bearer(ADMIN_TOKEN),
        b"",
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(mqlb_tests::backend_state(admin, "b1").await?, "draining");

    let (status, text) = http(admin, "GET", "/metrics").await?;
    assert_eq!(status, 200, "reads on loopback need no token");
    let refused = |reason| {
        metric(
            &text,
            "mqlb_admin_requests_refused_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(
        (refused("missing_token"), refused("bad_token")),
        (1.0, 1.0),
        "{text}"
    );
    lb.shutdown().await;
    Ok(())
}

/// DNS rebinding and cross-site requests: a request that carries an Origin (even with the
/// token) or names another Host is refused with 403, reads included, and changes nothing;
/// `localhost:PORT` is the loopback bind's other name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_with_an_origin_or_a_foreign_host_are_refused() -> anyhow::Result<()> {
    use mqlb_tests::http_host::http_host;
    let dir = TempDir::new("sec-admin-host")?;
    let file = dir.path().join("admin.token");
    std::fs::write(&file, ADMIN_TOKEN)?;
    let lb = lb_with_admin_token(Some(&file)).await?;
    let admin = lb.admin_addr();
    let auth = format!("Bearer {ADMIN_TOKEN}");

    let mut origin = bearer(ADMIN_TOKEN);
    origin.push(("Origin".into(), "http://evil.example".into()));
    let (status, _) =
        http_with_headers(admin, "POST", "/api/backends/b1/drain", &origin, b"").await?;
    assert_eq!(status, 403, "Origin set, token right");
    let headers = [("Authorization", auth.as_str())];
    for (method, path) in [("POST", "/api/backends/b1/drain"), ("GET", "/api/backends")] {
        for host in [
            "evil.example",
            "evil.example:80",
            &format!("evil.example:{}", admin.port()),
        ] {
            let status = http_host(admin, method, path, host, &headers).await?;
            assert_eq!(status, 403, "{method} {path} Host: {host}");
        }
    }
    assert_eq!(mqlb_tests::backend_state(admin, "b1").await?, "up");
    let port = admin.port();
    assert_eq!(
        http_host(
            admin,
            "GET",
            "/api/backends",
            &format!("localhost:{port}"),
            &[]
        )
        .await?,
        200
    );
    let (status, text) = http(admin, "GET", "/metrics").await?;
    assert_eq!(status, 200);
    let refused = |reason| {
        metric(
            &text,
            "mqlb_admin_requests_refused_total",
            &[("reason", reason)],
        )
    };
    assert_eq!((refused("origin"), refused("host")), (1.0, 6.0), "{text}");
    lb.shutdown().await;
    Ok(())
}

/// Without a token an LB on loopback takes writes (the quick start), but still not from a
/// browser: Origin and Host are checked all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_loopback_admin_takes_writes_but_not_cross_site_ones(
) -> anyhow::Result<()> {
    use mqlb_tests::http_host::http_host;
    let lb = lb_with_admin_token(None).await?;
    let admin = lb.admin_addr();
    let origin = vec![("Origin".to_string(), format!("http://{admin}"))];
    let (status, _) =
        http_with_headers(admin, "POST", "/api/backends/b1/drain", &origin, b"").await?;
    assert_eq!(status, 403, "Origin set");
    let status = http_host(admin, "POST", "/api/backends/b1/drain", "evil.example", &[]).await?;
    assert_eq!(status, 403, "foreign Host");
    assert_eq!(mqlb_tests::backend_state(admin, "b1").await?, "up");
    let (status, _) = http(admin, "POST", "/api/backends/b1/drain").await?;
    assert_eq!(status, 200);
    assert_eq!(mqlb_tests::backend_state(admin, "b1").await?, "draining");
    lb.shutdown().await;
    Ok(())
}

/// A broker's http endpoint checks Host and Origin too (its reads are a map of the cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_http_refuses_a_foreign_host_or_an_origin() -> anyhow::Result<()> {
    use mqlb_tests::http_host::http_host;
    let cluster = Cluster::start(1).await?;
    let addr = cluster.specs[0]
        .node
        .http
        .ok_or_else(|| anyhow::anyhow!("no http"))?;
    let (status, _) = http(addr, "GET", "/metrics").await?;
    assert_eq!(status, 200);
    assert_eq!(
        http_host(addr, "GET", "/metrics", "evil.example", &[]).await?,
        403
    );
    let origin = [("Origin", "http://evil.example")];
    let host = addr.to_string();
    assert_eq!(
        http_host(addr, "GET", "/healthz", &host, &origin).await?,
        403
    );
    let (status, text) = http(addr, "GET", "/metrics").await?;
    assert_eq!(status, 200);
    let refused = |reason| {
        metric(
            &text,
            "mqlb_admin_requests_refused_total",
            &[("reason", reason)],
        )
    };
    assert_eq!((refused("host"), refused("origin")), (1.0, 1.0), "{text}");
    Ok(())
}
