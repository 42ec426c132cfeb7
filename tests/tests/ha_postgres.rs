//! The HA server on PostgreSQL (issue 18): the store keeps the same contract as SQLite's, and
//! HA servers on simulated hosts share one PostgreSQL with one primary at a time, across
//! partitions and restarts of the database. Each test starts a PostgreSQL server of its own in
//! a scratch directory and removes it afterwards (they fail, not skip, when PostgreSQL is not
//! installed).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mqlb_config::Config;
use mqlb_haserver::contract::{self, reg};
use mqlb_haserver::{HaServer, PostgresOptions, PostgresStore, Store, Timing};
use mqlb_lb::{Lb, Listeners};
use mqlb_tests::{
    get_json, ha_get_json, ha_request, wait_until, Client, Cluster, Hosts, Postgres, QoS,
};

/// Membership timing of these tests: a lease short enough for quick failovers, a member timeout
/// longer than a failover (members must stay up throughout).
const TIMING: Timing = Timing {
    heartbeat_interval: Duration::from_millis(200),
    member_timeout: Duration::from_secs(3),
    remove_after: Duration::from_secs(60),
    lease: Duration::from_millis(1500),
};
const DEADLINE: Duration = Duration::from_secs(20);

/// The test server starts on a host's address, keeps its data across a crash-like stop and a
/// start on the same address, and leaves nothing behind.
#[tokio::test]
async fn the_test_postgres_keeps_its_data_across_a_restart() -> anyhow::Result<()> {
    let hosts = Hosts::new(1)?;
    let mut pg = Postgres::start_on(hosts.host(0).ip.into()).await?;
    assert_eq!(pg.addr.ip(), std::net::IpAddr::from(hosts.host(0).ip));
    pg.psql(
        "postgres",
        "CREATE TABLE t (v int); INSERT INTO t VALUES (42)",
    )?;
    pg.stop()?;
    assert!(pg.psql("postgres", "SELECT 1").is_err(), "stopped");
    pg.start_again().await?;
    assert_eq!(pg.psql("postgres", "SELECT v FROM t")?, "42");
    Ok(())
}

/// The PostgreSQL store keeps the store contract (mqlb_haserver::contract): every check the
/// SQLite store's unit tests run, each on a fresh database of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_keeps_the_store_contract() -> anyhow::Result<()> {
    let pg = Postgres::start().await?;
    let mut ran = Vec::new();
    for (name, check) in contract::CHECKS {
        pg.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        let url = pg.url(name);
        let rt = tokio::runtime::Handle::current();
        let check = *check;
        // The store's calls block: the check runs off the async threads, as in the server.
        tokio::task::spawn_blocking(move || {
            let open = || {
                // Generous call bounds (a third of 10 s): the checks are not about timing.
                let options = PostgresOptions::for_lease(Duration::from_secs(10));
                rt.block_on(PostgresStore::open(&url, options))
                    .map(|s| Box::new(s) as Box<dyn Store>)
            };
            check(&open)
        })
        .await?
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        ran.push(*name);
    }
    assert!(ran.len() >= 8, "checks run: {ran:?}");
    Ok(())
}

/// A version written through one store handle reaches another's change stream at once: the
/// store has no poll of its own, so after the first (which a LISTEN connection still being
/// set up may have read instead), each one can only have come by NOTIFY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_store_is_pushed_to_another() -> anyhow::Result<()> {
    let pg = Postgres::start().await?;
    let url = pg.url("postgres");
    let options = PostgresOptions::for_lease(Duration::from_secs(3));
    let writer = Arc::new(PostgresStore::open(&url, options.clone()).await?);
    let watcher = PostgresStore::open(&url, options).await?;
    let mut pushed = watcher
        .changes()
        .context("the PostgreSQL store pushes changes")?;
    let w = writer.clone();
    let epoch = tokio::task::spawn_blocking(move || w.acquire_lease("ha1", "a1", 60_000))
        .await??
        .epoch;
    for i in 1..=4u64 {
        let w = writer.clone();
        let written = Instant::now();
        tokio::task::spawn_blocking(move || w.register(epoch, &reg(&format!("b{i}")), 1, 10))
            .await??;
        tokio::time::timeout(Duration::from_secs(2), async {
            while *pushed.borrow_and_update() < i {
                pushed.changed().await?;
            }
            Ok::<_, anyhow::Error>(())
        })
        .await
        .with_context(|| format!("version {i} was not pushed within 2 s"))??;
        eprintln!("version {i} pushed {:?} after the write", written.elapsed());
    }
    Ok(())
}

/// Starts an HA server on the PostgreSQL at `url`, on 127.0.0.1.
async fn start_ha(id: &str, url: &str) -> anyhow::Result<HaServer> {
    let store = PostgresStore::open(url, PostgresOptions::for_lease(TIMING.lease)).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(HaServer::start(
        id,
        listener,
        Arc::new(store),
        mqlb_tests::ha_options(TIMING),
    )
    .await?)
}

async fn version(ha: SocketAddr) -> anyhow::Result<u64> {
    ha_get_json(ha, "/api/cluster")
        .await?
        .get("version")
        .and_then(|v| v.as_u64())
        .context("no version in /api/cluster")
}

/// A write on the primary wakes a long-poll on a backup at once: PostgreSQL NOTIFYs the new
/// version and the backup's LISTEN connection hears it (its fallback poll is every 5 s; each
/// of three wake-ups must come within 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_ha_server_wakes_watchers_on_another() -> anyhow::Result<()> {
    let pg = Postgres::start().await?;
    let url = pg.url("postgres");
    let primary = start_ha("ha1", &url).await?;
    let backup = start_ha("ha2", &url).await?;
    assert!(primary.is_primary() && !backup.is_primary());
    let (p, b) = (primary.addr(), backup.addr());
    for i in 1..=3 {
        let since = version(b).await?;
        let path = format!("/api/cluster?since={since}&wait_ms=10000");
        let poll = tokio::spawn(async move {
            let r = ha_get_json(b, &path).await;
            (r, Instant::now())
        });
        // Let the long-poll reach the backup and wait there.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !poll.is_finished(),
            "the long-poll returned before any change"
        );
        let body = serde_json::to_vec(&reg(&format!("b{i}")))?;
        let written = Instant::now();
        let (status, text) = ha_request(p, "POST", "/api/members", &body).await?;
        assert_eq!(status, 200, "{text}");
        let (view, woke) = poll.await?;
        let view = view?;
        let took = woke.duration_since(written);
        eprintln!("long-poll on the backup woke {took:?} after the write on the primary");
        assert!(view["version"].as_u64() > Some(since), "{view}");
        assert!(
            took < Duration::from_secs(1),
            "woke {took:?} after the write"
        );
    }
    Ok(())
}

/// What a watcher saw of the HA servers' roles, all the time.
#[derive(Default)]
struct Seen {
    /// Sweeps of every server's `/healthz`.
    sweeps: usize,
    /// Sweeps in which two or more said "primary".
    two_primaries: Vec<String>,
    /// Lease epochs by the servers that said they were primary with them.
    epochs: HashMap<u64, HashSet<String>>,
    /// Samples of the servers' own state (in this process, taken together).
    samples: usize,
    two_acting: usize,
}

/// Watches `servers`: their `/healthz` every 10 ms, and their own `is_primary` every 2 ms.
fn watch(servers: Vec<Arc<HaServer>>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let inner = {
            let (servers, stop, seen) = (servers.clone(), stop.clone(), seen.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let acting = servers.iter().filter(|s| s.is_primary()).count();
                    if let Ok(mut s) = seen.lock() {
                        s.samples += 1;
                        s.two_acting += usize::from(acting > 1);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        while !stop.load(Ordering::Relaxed) {
            let polls: Vec<_> = servers
                .iter()
                .map(|s| {
                    let addr = s.addr();
                    tokio::spawn(async move { get_json(addr, "/healthz").await.ok() })
                })
                .collect();
            let mut primaries = Vec::new();
            for poll in polls {
                if let Ok(Some(h)) = poll.await {
                    if h["role"] == "primary" {
                        primaries.push((h["id"].to_string(), h["epoch"].as_u64()));
                    }
                }
            }
            if let Ok(mut s) = seen.lock() {
                s.sweeps += 1;
                if primaries.len() > 1 {
                    s.two_primaries.push(format!("{primaries:?}"));
                }
                for (id, epoch) in primaries {
                    s.epochs.entry(epoch.unwrap_or(0)).or_default().insert(id);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Err(e) = inner.await {
            eprintln!("the in-process watcher failed: {e}");
        }
        match Arc::try_unwrap(seen) {
            Ok(m) => m.into_inner().unwrap_or_default(),
            Err(_) => Seen::default(),
        }
    })
}

async fn healthz(ha: SocketAddr) -> Option<serde_json::Value> {
    get_json(ha, "/healthz").await.ok()
}

/// Issue 18: HA servers that cannot reach PostgreSQL when they start (it comes later) start
/// anyway, degraded: `/healthz` says so, there is no primary and no membership write is taken;
/// they keep trying, and once the database is up (not migrated yet: they migrate it) one is
/// primary and the other a backup, and a member registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_servers_started_before_their_database_wait_for_it_degraded() -> anyhow::Result<()> {
    let mut pg = Postgres::start().await?;
    pg.stop()?;
    let url = pg.url("postgres");
    let (a, b) = (start_ha("ha1", &url).await?, start_ha("ha2", &url).await?);
    let member = serde_json::to_vec(&reg("b1"))?;
    for ha in [a.addr(), b.addr()] {
        let h = healthz(ha).await.context("/healthz")?;
        assert_eq!(
            (h["degraded"].as_bool(), h["role"].as_str()),
            (Some(true), Some("backup")),
            "{h}"
        );
        let (status, _) = ha_request(ha, "POST", "/api/members", &member).await?;
        assert_ne!(status, 200, "a write without a database");
    }
    pg.start_again().await?;
    wait_until(
        "one primary, one backup, neither degraded",
        DEADLINE,
        || async {
            let (Some(x), Some(y)) = (healthz(a.addr()).await, healthz(b.addr()).await) else {
                return false;
            };
            let mut roles = [x["role"].as_str(), y["role"].as_str()];
            roles.sort();
            roles == [Some("backup"), Some("primary")]
                && x["degraded"] == false
                && y["degraded"] == false
        },
    )
    .await?;
    let primary = if a.is_primary() { a.addr() } else { b.addr() };
    let (status, body) = ha_request(primary, "POST", "/api/members", &member).await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}

/// Three HA servers on three simulated hosts, PostgreSQL on a fourth. The primary's host is cut
/// off from the database: it stops acting as primary before a backup takes over, within the
/// lease; a watcher of every server's `/healthz` (and of their own state) never sees two
/// primaries, each epoch has one holder; the broker registered with them stays up; healed, the
/// cut-off server is a backup and there is one primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_from_the_database_is_replaced_within_the_lease() -> anyhow::Result<()> {
    let hosts = Hosts::new(4)?;
    let db_host = hosts.host(3);
    let pg = Postgres::start_on(db_host.ip.into()).await?;
    let url = pg.url("postgres");
    let mut servers = Vec::new();
    for i in 0..3 {
        let id = format!("ha{}", i + 1);
        servers.push(Arc::new(
            hosts.host(i).start_haserver_pg(&id, &url, TIMING).await?,
        ));
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr()).collect();
    let p = servers
        .iter()
        .position(|s| s.is_primary())
        .context("no primary after start")?;
    let cluster = Cluster::start_with_ha(1, &addrs).await?;
    // Asked of the primary itself, which then holds the registration as the last membership
    // it read (its own copy follows the database's notifications a few milliseconds behind).
    wait_until("the broker registered", DEADLINE, || async {
        ha_get_json(addrs[p], "/api/cluster")
            .await
            .is_ok_and(|v| v["members"].as_array().is_some_and(|m| m.len() == 1))
    })
    .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(servers.clone(), stop.clone());
    let cut = Instant::now();
    hosts.partition(hosts.host(p), db_host)?;
    let new = wait_until("a backup becomes primary", DEADLINE, || async {
        servers
            .iter()
            .enumerate()
            .any(|(i, s)| i != p && s.is_primary())
    })
    .await;
    let took = cut.elapsed();
    new?;
    eprintln!(
        "a backup took over {took:?} after the primary was cut off (lease {:?})",
        TIMING.lease
    );
    assert!(!servers[p].is_primary(), "the cut-off primary still acts");
    assert!(
        took <= TIMING.lease + TIMING.lease / 3 + TIMING.lease / 3,
        "took over {took:?} after the cut, lease {:?}",
        TIMING.lease
    );
    wait_until(
        "the cut-off server says it is degraded",
        DEADLINE,
        || async {
            healthz(addrs[p])
                .await
                .is_some_and(|h| h["degraded"] == true && h["role"] == "backup")
        },
    )
    .await?;
    let reads = ha_get_json(addrs[p], "/api/cluster").await?;
    assert_eq!(
        reads["members"].as_array().map(Vec::len),
        Some(1),
        "the cut-off server serves the last membership: {reads}"
    );
    assert!(reads["degraded"].is_string(), "and says so: {reads}");

    hosts.heal(hosts.host(p), db_host)?;
    wait_until(
        "healed: the cut-off server is a healthy backup",
        DEADLINE,
        || async {
            healthz(addrs[p])
                .await
                .is_some_and(|h| h["degraded"] == false && h["role"] == "backup")
        },
    )
    .await?;
    // Watch a few lease rounds more: still one primary.
    let until = Instant::now() + TIMING.lease * 2;
    while Instant::now() < until {
        let acting = servers.iter().filter(|s| s.is_primary()).count();
        assert_eq!(acting, 1, "healed: {acting} primaries");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.await?;
    assert!(
        seen.sweeps > 50 && seen.samples > 200,
        "{} sweeps, {} samples",
        seen.sweeps,
        seen.samples
    );
    assert!(
        seen.two_primaries.is_empty(),
        "two primaries in /healthz: {:?}",
        seen.two_primaries
    );
    assert_eq!(seen.two_acting, 0, "two servers acted as primary at once");
    for (epoch, ids) in &seen.epochs {
        assert_eq!(ids.len(), 1, "epoch {epoch} held by {ids:?}");
    }
    assert!(seen.epochs.len() >= 2, "the epochs seen: {:?}", seen.epochs);

    // The broker stayed up throughout.
    let events = ha_get_json(addrs[0], "/api/events").await?;
    let kinds: Vec<String> = events
        .as_array()
        .context("events")?
        .iter()
        .map(|e| format!("{}:{}", e["member"], e["kind"]))
        .collect();
    assert!(
        !kinds.iter().any(|k| k.ends_with("down\"")),
        "a member went down: {kinds:?}"
    );
    drop(cluster);
    Ok(())
}

/// An LB whose pool comes from the HA servers (`discovery = "haserver"`).
async fn lb_on(ha: &[SocketAddr]) -> anyhow::Result<Lb> {
    lb_with(ha, "").await
}

/// [`lb_on`] with more keys in its rule (`rule`: TOML lines).
async fn lb_with(ha: &[SocketAddr], rule: &str) -> anyhow::Result<Lb> {
    lb_from(ha, None, rule).await
}

/// [`lb_with`] on a host of its own: its connections (to the brokers, their probes, the HA
/// servers) come from `source` (`lb.source`).
async fn lb_from(
    ha: &[SocketAddr],
    source: Option<std::net::Ipv4Addr>,
    rule: &str,
) -> anyhow::Result<Lb> {
    let source = source.map_or(String::new(), |ip| format!("source = \"{ip}\"\n"));
    let mut servers = String::new();
    for (i, a) in ha.iter().enumerate() {
        servers.push_str(&format!(
            "[[haserver]]\nid = \"ha{}\"\nlisten = \"{a}\"\n",
            i + 1
        ));
    }
    let cfg = Config::parse(
        &format!(
            "[lb]\nadmin = \"127.0.0.1:0\"\nwatch_config = false\nshutdown_grace = \"1s\"\n{source}\
             [cluster]\nsecret = \"{}\"\n{servers}\
             [[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\
             [[pool]]\nname = \"brokers\"\nprobe = \"p\"\ndiscovery = \"haserver\"\n\
             [[probe]]\nname = \"p\"\nport = \"traffic\"\ninterval = \"500ms\"\ntimeout = \"300ms\"\n\
             [[rule]]\nname = \"mqtt\"\nfrontend = \"mqtt\"\npool = \"brokers\"\ndistribution = \"mqtt-client-id\"\n{rule}",
            mqlb_tests::TEST_SECRET
        ),
        "test",
    )?;
    Ok(Lb::start(cfg, Listeners::default()).await?)
}

/// The LB's backends that are in the membership, sorted.
async fn pool(lb: &Lb) -> Vec<String> {
    let v = get_json(lb.admin_addr(), "/api/backends")
        .await
        .unwrap_or_default();
    let mut ids: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["why"] != "left_membership" && b["state"] == "up")
        .filter_map(|b| b["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

/// MQTT through the LB works: `n` clients connect, and one publishes QoS 1 to another.
async fn clients_get_through(front: SocketAddr, tag: &str, n: usize) -> anyhow::Result<()> {
    for i in 0..n {
        let c = Client::connect(front, &format!("{tag}-{i}"))
            .await
            .with_context(|| format!("client {tag}-{i} refused"))?;
        c.disconnect().await;
    }
    let sub = Client::connect(front, &format!("{tag}-sub")).await?;
    sub.subscribe(&format!("{tag}/#"), QoS::AtLeastOnce).await?;
    let publisher = Client::connect(front, &format!("{tag}-pub")).await?;
    for m in 0..10 {
        publisher
            .publish_qos1(&format!("{tag}/t"), m.to_string().as_bytes())
            .await?;
    }
    wait_until(
        &format!("{tag}: 10 messages through the LB"),
        DEADLINE,
        || async { sub.received_count() >= 10 },
    )
    .await?;
    sub.disconnect().await;
    publisher.disconnect().await;
    Ok(())
}

/// PostgreSQL restarted (crash-like) under traffic: two brokers heartbeating, an LB whose pool
/// is the membership, MQTT clients through it. Every HA server says it is degraded and goes on
/// serving the last membership; no client is refused and the LB keeps both brokers; once the
/// database is back the HA servers recover on their own, one primary, writes accepted, the
/// brokers still up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ha_servers_recover_alone_from_a_database_restart() -> anyhow::Result<()> {
    let hosts = Hosts::new(4)?;
    let mut pg = Postgres::start_on(hosts.host(3).ip.into()).await?;
    let url = pg.url("postgres");
    let mut servers = Vec::new();
    for i in 0..3 {
        let id = format!("ha{}", i + 1);
        servers.push(hosts.host(i).start_haserver_pg(&id, &url, TIMING).await?);
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr()).collect();
    let cluster = Cluster::start_with_ha(2, &addrs).await?;
    let lb = lb_on(&addrs).await?;
    let front = lb.frontend_addr("mqtt").context("no frontend")?;
    wait_until("the LB's pool is both brokers", DEADLINE, || async {
        pool(&lb).await == ["n1", "n2"]
    })
    .await?;
    clients_get_through(front, "before", 10).await?;

    pg.stop()?;
    let stopped = Instant::now();
    wait_until("every HA server says it is degraded", DEADLINE, || async {
        let mut all = true;
        for a in &addrs {
            all &= healthz(*a).await.is_some_and(|h| h["degraded"] == true);
        }
        all
    })
    .await?;
    for a in &addrs {
        let view = ha_get_json(*a, "/api/cluster").await?;
        assert_eq!(
            view["members"].as_array().map(Vec::len),
            Some(2),
            "{a}: {view}"
        );
        let text = mqlb_tests::http(*a, "GET", "/metrics").await?.1;
        assert!(
            text.lines().any(|l| l == "mqlb_ha_database_up 0"),
            "{a}: mqlb_ha_database_up is not 0"
        );
    }
    wait_until("no primary without the database", DEADLINE, || async {
        servers.iter().all(|s| !s.is_primary())
    })
    .await?;
    eprintln!(
        "all degraded, no primary {:?} after the stop",
        stopped.elapsed()
    );
    clients_get_through(front, "during", 10).await?;
    assert_eq!(pool(&lb).await, ["n1", "n2"], "the LB kept both brokers");

    pg.start_again().await?;
    let back = Instant::now();
    wait_until("one primary again, nobody degraded", DEADLINE, || async {
        let mut healthy = 0;
        for a in &addrs {
            healthy += usize::from(healthz(*a).await.is_some_and(|h| h["degraded"] == false));
        }
        healthy == addrs.len() && servers.iter().filter(|s| s.is_primary()).count() == 1
    })
    .await?;
    eprintln!(
        "recovered {:?} after the database came back",
        back.elapsed()
    );
    let p = servers
        .iter()
        .position(|s| s.is_primary())
        .context("no primary")?;
    // A member the LB's pool then lists: at a port nothing listens on, so the LB's choices for
    // the clients below fail over from it (reg's 127.0.0.1:1883 is `mqlb up`'s LB, or any
    // broker a developer runs: the clients went to that one).
    let mut late = reg("late");
    late.mqtt = format!("127.0.0.1:{}", mqlb_tests::free_port()?);
    let (status, text) = ha_request(
        addrs[p],
        "POST",
        "/api/members",
        &serde_json::to_vec(&late)?,
    )
    .await?;
    assert_eq!(status, 200, "a write after the restart: {text}");
    wait_until("the brokers heartbeat again, up", DEADLINE, || async {
        ha_get_json(addrs[1], "/api/cluster").await.is_ok_and(|v| {
            v["members"]
                .as_array()
                .is_some_and(|m| m.iter().filter(|m| m["state"] == "up").count() == 3)
        })
    })
    .await?;
    clients_get_through(front, "after", 10).await?;
    assert_eq!(lb.shutdown().await, 0, "no connection had to be cut");
    drop(cluster);
    Ok(())
}

/// `mqlb haserver` processes with `db = "postgres://..."` on two simulated hosts, each
/// connecting from its host's address (`db_source`, seen by PostgreSQL): one is primary; killed
/// with SIGKILL (no release of the lease), the other takes over within the lease and a renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haserver_processes_on_postgres_fail_over_after_a_kill() -> anyhow::Result<()> {
    let hosts = Hosts::new(3)?;
    let pg = Postgres::start_on(hosts.host(2).ip.into()).await?;
    let dir = mqlb_tests::TempDir::new("ha-pg-procs")?;
    let addrs = [hosts.host(0).free_addr()?, hosts.host(1).free_addr()?];
    let mut toml = format!(
        "[cluster]\nsecret = \"{}\"\n[ha]\nlease = \"1500ms\"\n",
        mqlb_tests::TEST_SECRET
    );
    for (i, addr) in addrs.iter().enumerate() {
        toml.push_str(&format!(
            "[[haserver]]\nid = \"ha{i}\"\nlisten = \"{addr}\"\ndb = \"{}\"\ndb_source = \"{}\"\n",
            pg.url("postgres"),
            addr.ip()
        ));
    }
    let file = dir.path().join("ha.toml");
    std::fs::write(&file, toml)?;
    let bin = mqlb_tests::mqlb_bin()?;
    let mut pids = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("haserver")
            .arg("-c")
            .arg(&file)
            .args(["--id", &format!("ha{i}")])
            .stdout(std::process::Stdio::null());
        pids.push(hosts.host(i).spawn(&mut cmd)?);
        let addr = *addr;
        wait_until("the haserver process answers", DEADLINE, || async move {
            healthz(addr).await.is_some()
        })
        .await?;
    }
    let roles = |h: Option<serde_json::Value>| h.map(|h| h["role"].to_string());
    assert_eq!(
        roles(healthz(addrs[0]).await).as_deref(),
        Some("\"primary\"")
    );
    assert_eq!(
        roles(healthz(addrs[1]).await).as_deref(),
        Some("\"backup\"")
    );
    let sources = pg.psql(
        "postgres",
        "SELECT string_agg(DISTINCT host(client_addr), ',' ORDER BY host(client_addr)) \
         FROM pg_stat_activity WHERE application_name = 'mqlb-haserver'",
    )?;
    assert_eq!(sources, format!("{},{}", addrs[0].ip(), addrs[1].ip()));

    let killed = Instant::now();
    let ok = std::process::Command::new("kill")
        .args(["-KILL", &pids[0].to_string()])
        .status()?
        .success();
    assert!(ok, "kill -KILL {}", pids[0]);
    wait_until("the backup process takes over", DEADLINE, || async {
        healthz(addrs[1])
            .await
            .is_some_and(|h| h["role"] == "primary")
    })
    .await?;
    let took = killed.elapsed();
    eprintln!("after kill -9 of the primary, the backup took over in {took:?} (lease 1.5 s)");
    assert!(took <= Duration::from_millis(1500 + 500 + 500), "{took:?}");
    Ok(())
}

/// Issue 18: three hosts each with an HA server (on PostgreSQL) and a broker, PostgreSQL on a
/// fourth, the LB on a fifth (its connections come from that host's address, `lb.source`).
/// The LB's host is partitioned from the host of a persistent subscriber's broker while a
/// publisher on another broker sends QoS 1 messages one at a time. The broker leaves the
/// LB's pool (its probe fails; it stays in the membership, its HA heartbeats still get
/// through; the LB's discovery moves to another HA server), the subscriber's connection is
/// closed and it reconnects through the LB to
/// another broker with Session Present 1 (its session moves over the mesh, which the cut
/// spares), and it gets every message the cluster acknowledged, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_host_cut_off_from_the_lb_loses_no_persistent_message() -> anyhow::Result<()> {
    use mqlb_tests::{Persistent, Protocol};
    let hosts = Hosts::new(5)?;
    let pg = Postgres::start_on(hosts.host(3).ip.into()).await?;
    let url = pg.url("postgres");
    let mut servers = Vec::new();
    for i in 0..3 {
        let id = format!("ha{}", i + 1);
        servers.push(hosts.host(i).start_haserver_pg(&id, &url, TIMING).await?);
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr()).collect();
    let ips: Vec<std::net::IpAddr> = (0..3).map(|i| hosts.host(i).ip.into()).collect();
    let cluster = Cluster::start_on_with_ha(&ips, &addrs).await?;
    cluster.wait_meshed().await?;
    // As the built-in configuration does: a client of a broker that went down reconnects at
    // once, not after its keep alive.
    let lb_host = hosts.host(4);
    let lb = lb_from(&addrs, Some(lb_host.ip), "close_on_backend_down = true\n").await?;
    let front = lb.frontend_addr("mqtt").context("no frontend")?;
    wait_until("the LB's pool is the three brokers", DEADLINE, || async {
        pool(&lb).await == ["n1", "n2", "n3"]
    })
    .await?;

    let sub = Persistent::connect(front, "cut-sub", Protocol::V311).await?;
    sub.subscribe("cut/#").await?;
    let on = common_backend(&lb, "cut-sub").await?;
    let i: usize = on.trim_start_matches('n').parse::<usize>()? - 1;
    let other = (i + 1) % 3;
    let publisher =
        Arc::new(Persistent::connect(cluster.mqtt(other), "cut-pub", Protocol::V311).await?);
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let task = {
        let (publisher, sent) = (publisher.clone(), sent.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for m in 0..150u32 {
                let payload = m.to_string().into_bytes();
                if publisher
                    .publish_acked("cut/t", payload.clone(), Duration::from_secs(5))
                    .await?
                {
                    acked.push(payload);
                }
                sent.store(m as usize + 1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(acked)
        })
    };
    wait_until("30 messages out before the cut", DEADLINE, || async {
        sent.load(Ordering::Relaxed) >= 30
    })
    .await?;
    let cut_at = Instant::now();
    hosts.partition(lb_host, hosts.host(i))?;
    wait_until(&format!("{on} leaves the LB's pool"), DEADLINE, || async {
        !pool(&lb).await.contains(&on)
    })
    .await?;
    eprintln!("{on} left the pool {:?} after the cut", cut_at.elapsed());
    wait_until(
        "the subscriber is back through the LB",
        DEADLINE,
        || async { sub.connacks().len() >= 2 },
    )
    .await?;
    eprintln!(
        "the subscriber reconnected {:?} after the cut",
        cut_at.elapsed()
    );
    assert_eq!(
        sub.session_present().last(),
        Some(&true),
        "its session moved with it"
    );
    let now_on = common_backend(&lb, "cut-sub").await?;
    assert_ne!(now_on, on, "reconnected to another broker");
    let acked = task.await??;
    assert!(
        acked.len() >= 140,
        "the cluster acknowledged {} of 150",
        acked.len()
    );
    wait_until(
        "every acknowledged message reached the subscriber",
        DEADLINE,
        || async {
            sub.with_received(|got| {
                let have: HashSet<&[u8]> = got.iter().map(|d| d.payload.as_slice()).collect();
                acked.iter().all(|a| have.contains(a.as_slice()))
            })
        },
    )
    .await?;
    let view = ha_get_json(addrs[0], "/api/cluster").await?;
    let up = view["members"]
        .as_array()
        .map_or(0, |m| m.iter().filter(|m| m["state"] == "up").count());
    assert_eq!(up, 3, "the cut broker stayed in the membership: {view}");
    hosts.heal_all()?;
    drop(cluster);
    Ok(())
}

/// The broker the LB put `client_id`'s newest connection on (its `/api/connections`).
async fn common_backend(lb: &Lb, client_id: &str) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        let listed = mqlb_tests::connections(lb.admin_addr()).await?;
        let newest = listed
            .into_iter()
            .filter(|(id, _, _)| id == client_id)
            .max_by_key(|(_, _, n)| *n);
        if let Some((_, b, _)) = newest {
            return Ok(b);
        }
        anyhow::ensure!(
            start.elapsed() < DEADLINE,
            "{client_id} not in the LB's /api/connections within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 18: TLS to PostgreSQL. The database serves TLS with a certificate of a test CA; an HA
/// server given that CA (`haserver.db_ca`) connects over TLS (PostgreSQL's `pg_stat_ssl` says
/// so for each of its connections) and is primary; `sslmode=require` without a CA is refused
/// at start, naming the key; a CA that did not sign the server's certificate leaves the
/// server degraded, saying why, rather than talking in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ha_server_talks_tls_to_postgres_verifying_its_certificate() -> anyhow::Result<()> {
    let pki = mqlb_tests::Pki::new()?;
    let mut pg = Postgres::start().await?;
    pg.restart_with_tls(&pki.path("chain.pem"), &pki.path("key.pem"))
        .await?;
    let url = pg.url("postgres");
    let tls = |ca: &std::path::Path| -> anyhow::Result<PostgresOptions> {
        let client = mqlb_config::tls::client(ca, None, &[])?;
        Ok(PostgresOptions {
            tls: Some(client.config().clone()),
            ..PostgresOptions::for_lease(TIMING.lease)
        })
    };
    let start = |options: PostgresOptions| {
        let url = url.clone();
        async move {
            let store = PostgresStore::open(&url, options).await?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            Ok::<_, anyhow::Error>(
                HaServer::start(
                    "ha1",
                    listener,
                    Arc::new(store),
                    mqlb_tests::ha_options(TIMING),
                )
                .await?,
            )
        }
    };
    let ha = start(tls(&pki.path("ca.pem"))?).await?;
    wait_until("the HA server is primary over TLS", DEADLINE, || async {
        healthz(ha.addr())
            .await
            .is_some_and(|h| h["role"] == "primary" && h["degraded"] == false)
    })
    .await?;
    let ssl = pg.psql(
        "postgres",
        "SELECT string_agg(DISTINCT s.ssl::text, ',') FROM pg_stat_ssl s \
         JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'mqlb-haserver'",
    )?;
    assert_eq!(ssl, "true", "every connection of the HA server is TLS");
    ha.stop().await;

    let refused = PostgresStore::open(
        &format!("{url}?sslmode=require"),
        PostgresOptions::for_lease(TIMING.lease),
    )
    .await;
    let e = refused
        .err()
        .context("sslmode=require without a CA opened")?;
    assert!(e.to_string().contains("haserver.db_ca"), "{e}");

    let stranger = mqlb_tests::Pki::new()?;
    let ha = start(tls(&stranger.path("ca.pem"))?).await?;
    wait_until(
        "a server certificate of another CA: degraded",
        DEADLINE,
        || async {
            healthz(ha.addr()).await.is_some_and(|h| {
                h["degraded"] == true
                    && h["database"]
                        .as_str()
                        .is_some_and(|d| d.contains("certificate"))
            })
        },
    )
    .await?;
    assert!(!ha.is_primary());
    Ok(())
}
