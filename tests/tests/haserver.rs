//! The HA server end to end: brokers register and heartbeat, silent ones are marked down, the
//! LB follows the membership without a reload, the data path survives the HA server's death,
//! state survives its restart, and a backup takes over from a dead primary — never two
//! primaries at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqlb_config::Config;
use mqlb_lb::{Lb, Listeners};
use mqlb_tests::{
    fast_ha_timing, get_json, ha_get_json, ha_request, http, metric, start_haserver,
    start_haserver_at, wait_until, Client, Cluster, QoS, TempDir, TEST_SECRET,
};

const DEADLINE: Duration = Duration::from_secs(15);

async fn members(ha: SocketAddr) -> anyhow::Result<Vec<(String, String)>> {
    let v = ha_get_json(ha, "/api/cluster").await?;
    Ok(v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some((
                m["id"].as_str()?.to_string(),
                m["state"].as_str()?.to_string(),
            ))
        })
        .collect())
}

async fn role(ha: SocketAddr) -> Option<String> {
    let v = get_json(ha, "/healthz").await.ok()?;
    v["role"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_register_a_crashed_one_is_marked_down_and_long_polls_wake() -> anyhow::Result<()> {
    let dir = TempDir::new("ha")?;
    let timing = fast_ha_timing();
    let ha = start_haserver("ha1", &dir.path().join("ha.sqlite"), timing).await?;
    let mut cluster = Cluster::start_with_ha(3, &[ha.addr()]).await?;
    wait_until("3 members up", DEADLINE, || async {
        members(ha.addr())
            .await
            .is_ok_and(|m| m.len() == 3 && m.iter().all(|(_, s)| s == "up"))
    })
    .await?;
    let view = ha_get_json(ha.addr(), "/api/cluster").await?;
    let version = view["version"].as_u64().unwrap_or(0);
    assert_eq!(view["primary"], "ha1");
    assert!(view["members"][0]["mesh"]
        .as_str()
        .is_some_and(|m| m.starts_with("127.0.0.1:")));

    // A long-poll from the current version returns as soon as something changes.
    let addr = ha.addr();
    let poll = tokio::spawn(async move {
        let start = Instant::now();
        let r = ha_request(
            addr,
            "GET",
            &format!("/api/cluster?since={version}&wait_ms=10000"),
            b"",
        )
        .await;
        (start.elapsed(), r)
    });

    let crashed_at = Instant::now();
    cluster.crash(2);
    wait_until("n3 marked down", DEADLINE, || async {
        members(ha.addr())
            .await
            .is_ok_and(|m| m.iter().any(|(id, s)| id == "n3" && s == "down"))
    })
    .await?;
    let took = crashed_at.elapsed();
    eprintln!(
        "crashed member marked down after {took:?} (member_timeout {:?})",
        timing.member_timeout
    );
    assert!(
        took <= timing.member_timeout + Duration::from_secs(1),
        "{took:?}"
    );
    let (waited, r) = poll.await?;
    let (status, body) = r?;
    assert_eq!(status, 200);
    assert!(
        waited < Duration::from_secs(5),
        "long-poll woke on the change ({waited:?}): {body}"
    );
    let after: serde_json::Value = serde_json::from_str(&body)?;
    assert!(after["version"].as_u64() > Some(version));

    // A clean stop leaves the membership at once.
    cluster.kill(1).await;
    wait_until("n2 gone", DEADLINE, || async {
        members(ha.addr())
            .await
            .is_ok_and(|m| !m.iter().any(|(id, _)| id == "n2"))
    })
    .await?;
    let events = ha_get_json(ha.addr(), "/api/events").await?;
    let kinds: Vec<String> = events
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some(format!("{}:{}", e["member"].as_str()?, e["kind"].as_str()?)))
        .collect();
    for want in ["n1:registered", "n3:down", "n2:deregistered"] {
        assert!(
            kinds.iter().any(|k| k == want),
            "missing {want} in {kinds:?}"
        );
    }
    ha.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_never_corrupt_state() -> anyhow::Result<()> {
    let dir = TempDir::new("ha-bad")?;
    let ha = start_haserver("ha1", &dir.path().join("ha.sqlite"), fast_ha_timing()).await?;
    let a = ha.addr();
    let client = mqlb_haserver::HaClient::new(vec![a], mqlb_config::Secret::new(TEST_SECRET));
    let good = mqlb_haserver::model::Registration {
        id: "b1".into(),
        mqtt: "127.0.0.1:1883".into(),
        mqtt_v5: None,
        mesh: None,
        http: None,
        pid: None,
    };
    client.register(&good).await?;
    let before = ha_get_json(a, "/api/cluster").await?;

    let post =
        |path: &'static str, body: Vec<u8>| async move { ha_request(a, "POST", path, &body).await };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("not JSON", b"{id: b2".to_vec(), 400),
        (
            "unknown field",
            br#"{"id":"b2","mqtt":"127.0.0.1:1","root":true}"#.to_vec(),
            400,
        ),
        (
            "bad address",
            br#"{"id":"b2","mqtt":"somewhere"}"#.to_vec(),
            400,
        ),
        (
            "bad id",
            br#"{"id":"../etc","mqtt":"127.0.0.1:1"}"#.to_vec(),
            400,
        ),
        (
            "oversized",
            format!(
                r#"{{"id":"b2","mqtt":"127.0.0.1:1","pid":1{}}}"#,
                " ".repeat(100_000)
            )
            .into_bytes(),
            413,
        ),
    ];
    for (what, body, want) in cases {
        let (status, text) = post("/api/members", body).await?;
        assert_eq!(status, want, "{what}: {text}");
        assert!(text.contains("error"), "{what}: {text}");
    }
    assert_eq!(
        post("/api/members/ghost/heartbeat", Vec::new()).await?.0,
        404
    );
    // A flood of heartbeats: most are refused (429), none corrupts anything.
    let mut refused = 0;
    for _ in 0..50 {
        if post("/api/members/b1/heartbeat", Vec::new()).await?.0 == 429 {
            refused += 1;
        }
    }
    assert!(refused >= 45, "only {refused} of 50 refused");
    assert_eq!(ha_request(a, "GET", "/api/nothing", b"").await?.0, 404);
    let after = ha_get_json(a, "/api/cluster").await?;
    assert_eq!(
        members(a).await?,
        vec![("b1".to_string(), "up".to_string())]
    );
    assert_eq!(before["members"][0]["mqtt"], after["members"][0]["mqtt"]);
    assert_eq!(
        before["version"], after["version"],
        "no membership change from bad input"
    );
    let m = http(a, "GET", "/metrics").await?.1;
    assert!(
        metric(
            &m,
            "mqlb_ha_requests_total",
            &[("route", "register"), ("status", "400")]
        ) >= 4.0
    );
    ha.stop().await;
    Ok(())
}

/// The LB takes its pool from the membership: joining brokers become backends, a crashed one
/// stops getting connections, with no reload. With the HA server dead, everything keeps working
/// on the last membership; restarted on the same database, its state is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_follows_membership_and_survives_the_ha_server() -> anyhow::Result<()> {
    let dir = TempDir::new("ha-lb")?;
    let db = dir.path().join("ha.sqlite");
    let timing = fast_ha_timing();
    let ha = start_haserver("ha1", &db, timing).await?;
    let ha_addr = ha.addr();
    let mut cluster = Cluster::start_with_ha(3, &[ha_addr]).await?;
    let cfg = Config::parse(
        &format!(
            "[lb]\nadmin = \"127.0.0.1:0\"\nwatch_config = false\nshutdown_grace = \"1s\"\n\
             [cluster]\nsecret = \"{TEST_SECRET}\"\n\
             [[haserver]]\nid = \"ha1\"\nlisten = \"{ha_addr}\"\n\
             [[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
             [[pool]]\nname = \"brokers\"\nprobe = \"p\"\ndiscovery = \"haserver\"\n\
             [[probe]]\nname = \"p\"\nport = \"traffic\"\ninterval = \"500ms\"\ntimeout = \"300ms\"\n\
             [[rule]]\nname = \"mqtt\"\nfrontend = \"mqtt\"\npool = \"brokers\"\ndistribution = \"mqtt-client-id\"\n"
        ),
        "test",
    )?;
    let lb = Lb::start(cfg, Listeners::default()).await?;
    let front = lb
        .frontend_addr("mqtt")
        .ok_or_else(|| anyhow::anyhow!("no frontend"))?;
    // The members in the membership (one that left stays listed, down, until remove_after).
    let backend_ids = || async {
        let v = get_json(lb.admin_addr(), "/api/backends")
            .await
            .unwrap_or_default();
        let mut ids: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["why"] != "left_membership")
            .filter_map(|b| b["id"].as_str().map(str::to_string))
            .collect();
        ids.sort();
        ids
    };
    wait_until("LB pool = the 3 registered brokers", DEADLINE, || async {
        backend_ids().await == ["n1", "n2", "n3"]
    })
    .await?;

    // Crash n3: the HA server marks it down and the LB drops it, with no reload.
    cluster.crash(2);
    wait_until("LB pool without n3", DEADLINE, || async {
        backend_ids().await == ["n1", "n2"]
    })
    .await?;
    let n3 = get_json(lb.admin_addr(), "/api/backends").await?;
    let n3 = n3
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["id"] == "n3");
    assert!(
        n3.is_some_and(|b| b["state"] == "down"),
        "n3 still listed, down: {n3:?}"
    );
    assert_eq!(
        metric(
            &lb.metrics_text(),
            "mqlb_config_reloads_total",
            &[("result", "ok")]
        ),
        0.0
    );
    // (The data-path probe may have reached n3 before the crash: count from here.)
    let to_n3 = || {
        metric(
            &lb.metrics_text(),
            "mqlb_connections_total",
            &[("backend", "n3")],
        )
    };
    let before = to_n3();
    for i in 0..30 {
        let c = Client::connect(front, &format!("dev-{i}")).await?;
        c.disconnect().await;
    }
    assert_eq!(to_n3(), before, "no connection went to the crashed broker");

    // The HA server dies: the LB and the brokers keep serving on the last membership.
    let version_before = ha_get_json(ha_addr, "/api/cluster").await?["version"]
        .as_u64()
        .unwrap_or(0);
    ha.abort();
    let sub = Client::connect(front, "sub-during-outage").await?;
    sub.subscribe("outage/#", QoS::AtLeastOnce).await?;
    let p = Client::connect(front, "pub-during-outage-7").await?;
    for n in 0..20 {
        p.publish_qos1("outage/t", n.to_string().as_bytes()).await?;
    }
    wait_until("messages flow without the HA server", DEADLINE, || async {
        sub.received_count() >= 20
    })
    .await?;
    assert_eq!(
        backend_ids().await,
        ["n1", "n2"],
        "LB kept its last membership"
    );

    // It comes back on the same database and port: nothing lost, the brokers heartbeat again.
    let ha = start_haserver_at("ha1", &db, ha_addr, timing).await?;
    let view = ha_get_json(ha_addr, "/api/cluster").await?;
    assert!(
        view["version"].as_u64() >= Some(version_before),
        "version survived: {view}"
    );
    wait_until("members up again after the restart", DEADLINE, || async {
        members(ha_addr)
            .await
            .is_ok_and(|m| m.iter().filter(|(_, s)| s == "up").count() == 2)
    })
    .await?;
    let ids: Vec<String> = members(ha_addr)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert!(
        ids.contains(&"n3".to_string()),
        "the down member is still recorded: {ids:?}"
    );
    sub.disconnect().await;
    p.disconnect().await;
    assert_eq!(lb.shutdown().await, 0, "no connection had to be cut");
    ha.stop().await;
    Ok(())
}

/// Two HA servers on one database: one primary; writes to the backup reach the primary; the
/// primary dies and the backup takes over within the lease — and no poll ever sees two primaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_takes_over_within_the_lease_and_never_two_primaries() -> anyhow::Result<()> {
    let dir = TempDir::new("ha-pair")?;
    let db = dir.path().join("ha.sqlite");
    let timing = fast_ha_timing();
    let ha1 = start_haserver("ha1", &db, timing).await?;
    let ha2 = start_haserver("ha2", &db, timing).await?;
    let (a1, a2) = (ha1.addr(), ha2.addr());
    assert_eq!(role(a1).await.as_deref(), Some("primary"));
    assert_eq!(role(a2).await.as_deref(), Some("backup"));

    // Watch both, all the time.
    let both = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (both, polls, stop) = (both.clone(), polls.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (r1, r2) = tokio::join!(role(a1), role(a2));
                if r1.as_deref() == Some("primary") && r2.as_deref() == Some("primary") {
                    both.store(true, Ordering::Relaxed);
                }
                polls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // A broker that knows only the backup still registers (redirected to the primary).
    let cluster = Cluster::start_with_ha(2, &[a2]).await?;
    wait_until("registered via the backup", DEADLINE, || async {
        members(a1).await.is_ok_and(|m| m.len() == 2)
    })
    .await?;
    assert_eq!(
        members(a2).await?.len(),
        2,
        "the backup reads the same state"
    );

    let killed = Instant::now();
    ha1.abort();
    wait_until("ha2 primary", DEADLINE, || async {
        role(a2).await.as_deref() == Some("primary")
    })
    .await?;
    let took = killed.elapsed();
    eprintln!(
        "backup took over {took:?} after the primary died (lease {:?})",
        timing.lease
    );
    assert!(
        took <= timing.lease + timing.lease / 3 + Duration::from_millis(500),
        "{took:?}"
    );
    // The members keep heartbeating to the new primary: none goes down.
    tokio::time::sleep(timing.member_timeout * 2).await;
    assert!(members(a2).await?.iter().all(|(_, s)| s == "up"));

    stop.store(true, Ordering::Relaxed);
    watcher.await?;
    assert!(polls.load(Ordering::Relaxed) > 20, "the watcher polled");
    assert!(
        !both.load(Ordering::Relaxed),
        "two primaries were seen at once"
    );
    drop(cluster);
    ha2.stop().await;
    Ok(())
}

/// Issue 14, item 3: an HA server that comes back after being away longer than
/// `member_timeout` must not judge the members by heartbeats it could not receive. Every
/// member gets one full `member_timeout` of grace from the moment it is primary again; the
/// brokers, which kept retrying, heartbeat in that time and never go down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_primary_gives_every_member_a_grace_period() -> anyhow::Result<()> {
    let dir = TempDir::new("ha-grace")?;
    let db = dir.path().join("ha.sqlite");
    let timing = fast_ha_timing();
    let ha = start_haserver("ha1", &db, timing).await?;
    let ha_addr = ha.addr();
    let cluster = Cluster::start_with_ha(2, &[ha_addr]).await?;
    wait_until("2 members up", DEADLINE, || async {
        members(ha_addr)
            .await
            .is_ok_and(|m| m.len() == 2 && m.iter().all(|(_, s)| s == "up"))
    })
    .await?;
    let seq_before = ha_get_json(ha_addr, "/api/events?limit=10000")
        .await?
        .as_array()
        .and_then(|a| a.last().and_then(|e| e["seq"].as_i64()))
        .unwrap_or(0);

    // Away for twice the member timeout (and longer than the lease, so nobody holds it).
    ha.abort();
    tokio::time::sleep(timing.member_timeout * 2).await;
    let ha = start_haserver_at("ha1", &db, ha_addr, timing).await?;
    let restarted = Instant::now();

    // For two member timeouts after the restart, every poll sees both members up.
    let mut polls = 0;
    while restarted.elapsed() < timing.member_timeout * 2 {
        let m = members(ha_addr).await?;
        let up = m.iter().filter(|(_, s)| s == "up").count();
        assert_eq!(up, 2, "{:?} after the restart: {m:?}", restarted.elapsed());
        polls += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(polls > 20, "only {polls} polls");
    // The event log agrees: nobody went down, not even between two polls.
    let events = ha_get_json(ha_addr, &format!("/api/events?after={seq_before}")).await?;
    let downs: Vec<&serde_json::Value> = events
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "down")
        .collect();
    assert!(downs.is_empty(), "members went down: {downs:?}");
    drop(cluster);
    ha.stop().await;
    Ok(())
}

/// Issue 14, item 6: heartbeats for ids the HA server does not know leave nothing behind, and
/// a member that leaves takes its entry with it; the flood guard's map stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_of_unknown_or_departed_members_leave_no_state() -> anyhow::Result<()> {
    let dir = TempDir::new("ha-hb-mem")?;
    let ha = start_haserver("ha1", &dir.path().join("ha.sqlite"), fast_ha_timing()).await?;
    let a = ha.addr();
    let tracked = || async {
        let text = http(a, "GET", "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        metric(&text, "mqlb_ha_tracked_heartbeats", &[])
    };
    const IDS: usize = 5_000;
    let sent = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..8)
        .map(|k| {
            let sent = sent.clone();
            tokio::spawn(async move {
                for i in (k..IDS).step_by(8) {
                    let path = format!("/api/members/ghost-{i}/heartbeat");
                    if let Ok((404, _)) = ha_request(a, "POST", &path, b"").await {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.await?;
    }
    assert_eq!(
        sent.load(Ordering::Relaxed),
        IDS,
        "every unknown id got 404"
    );
    let after_ghosts = tracked().await;
    eprintln!("{IDS} unknown ids: {after_ghosts} tracked heartbeats");
    assert!(
        after_ghosts <= 10.0,
        "{after_ghosts} entries for unknown ids"
    );

    // A member that registered, heartbeat and left is forgotten too.
    let client = mqlb_haserver::HaClient::new(vec![a], mqlb_config::Secret::new(TEST_SECRET));
    let reg = mqlb_haserver::model::Registration {
        id: "b1".into(),
        mqtt: "127.0.0.1:1883".into(),
        mqtt_v5: None,
        mesh: None,
        http: None,
        pid: None,
    };
    client.register(&reg).await?;
    client.deregister("b1").await?;
    wait_until("the departed member's entry is gone", DEADLINE, || async {
        tracked().await == 0.0
    })
    .await?;
    ha.stop().await;
    Ok(())
}

/// Issue 13: two HA servers with the same id on one database both acted as primary (the second
/// "renewed" the first one's lease). The second must not become primary while the first holds
/// the lease, and the first stays primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ha_server_with_the_same_id_does_not_become_primary() -> anyhow::Result<()> {
    let dir = TempDir::new("ha-same-id")?;
    let db = dir.path().join("ha.sqlite");
    let timing = fast_ha_timing();
    let first = start_haserver("ha1", &db, timing).await?;
    assert!(first.is_primary());
    match start_haserver("ha1", &db, timing).await {
        Err(e) => {
            let text = format!("{e:#}");
            assert!(text.contains(&first.addr().to_string()), "{text}");
        }
        Ok(second) => {
            let became = wait_until("the second acts as primary", timing.lease * 3, || async {
                second.is_primary()
            })
            .await
            .is_ok();
            second.abort();
            assert!(!became, "a second server with the same id became primary");
        }
    }
    let watched = Instant::now();
    while watched.elapsed() < timing.lease * 2 {
        assert!(first.is_primary(), "the first lost the lease");
        assert_eq!(role(first.addr()).await.as_deref(), Some("primary"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.stop().await;
    Ok(())
}

/// Issue 14, item 11: the LB's membership watch ignored shutdown and kept its long-poll (and
/// the LB) alive for up to ~20 s after it. It must end with the LB: here the "HA server" takes
/// the long-poll and never answers; the LB's connection to it closes as soon as the LB stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_membership_watch_ends_when_the_lb_stops() -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let ha_addr = silent.local_addr()?;
    let cfg = Config::parse(
        &format!(
            "[lb]\nadmin = \"127.0.0.1:0\"\nwatch_config = false\nshutdown_grace = \"1s\"\n\
             [cluster]\nsecret = \"{TEST_SECRET}\"\n\
             [[haserver]]\nid = \"ha1\"\nlisten = \"{ha_addr}\"\n\
             [[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
             [[pool]]\nname = \"brokers\"\ndiscovery = \"haserver\"\n\
             [[rule]]\nname = \"mqtt\"\nfrontend = \"mqtt\"\npool = \"brokers\"\n"
        ),
        "test",
    )?;
    let lb = Lb::start(cfg, Listeners::default()).await?;
    let (mut watch, _) = tokio::time::timeout(DEADLINE, silent.accept()).await??;
    lb.shutdown().await;
    let stopped = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match watch.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // the request itself
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the LB's long-poll was still open 3 s after it stopped"
    );
    eprintln!(
        "membership watch closed {:?} after the LB stopped",
        stopped.elapsed()
    );
    Ok(())
}
