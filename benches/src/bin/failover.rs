//! The failover bench of issue 12: three `mqlb broker` processes, an HA server and `mqlb lb`
//! (the harness's `Topology`, release build); S persistent sessions through the LB (MQTT
//! 3.1.1 Clean Session 0 and MQTT 5 with a Session Expiry Interval, alternating), each
//! subscribed at QoS 1 to one of G group topics; QoS 1 publishers, one publish outstanding
//! each, so every PUBACK names its message. After a steady phase the busiest broker is
//! SIGKILLed. Measured in the same run, so each time has something to be compared with:
//!
//! - steady state: deliveries/s against what was offered, end-to-end latency p50/p99;
//! - the victim's clients: time until all are connected again, and until every one of its
//!   subscribers receives again (a delivery after its new CONNACK), each against a plain
//!   CONNECT→CONNACK through the LB at rest; their reconnects' Session Present;
//! - the surviving brokers' CONNACK p99 (a prober's raw CONNECTs) during the storm vs at rest;
//!   delivery latency p99 during the storm vs steady;
//! - messages lost (acknowledged to a publisher, never delivered to a subscriber of the
//!   topic) and duplicates, against the deliveries expected.
//!
//! `cargo run --release -p mqlb-benches --bin failover [-- --sessions 3000 --groups 30
//! --rate 300 --publishers 6 --steady 5 --replication both|on|off --baseline BIN]`
//!
//! `--replication both` (the default) runs it with `cluster.replicate_sessions` on, then off,
//! one topology after the other, and prints on/off. `--baseline BIN`: the same runs again with
//! another `mqlb` binary (this program started again with `MQLB_BIN=BIN`), side by side; a
//! build from before the setting existed takes `--replication on` only.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use mqlb_benches::arg;
use mqlb_mqtt::{encode_connect, ConnectOptions};
use mqlb_tests::persistent::{Persistent, Protocol};
use mqlb_tests::{connections, wait_until, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const PUBACK_DEADLINE: Duration = Duration::from_secs(15);
/// How long the victim's clients may take to be connected again.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(30);
/// How long its subscribers may take, after that, to receive again.
const RECEIVING_DEADLINE: Duration = Duration::from_secs(10);
const DRAIN_DEADLINE: Duration = Duration::from_secs(15);
/// The prober's pace: one CONNECT to each probed address every 50 ms.
const PROBE_EVERY: Duration = Duration::from_millis(50);

struct Params {
    sessions: usize,
    groups: usize,
    /// Publishes per second, all publishers together.
    rate: usize,
    publishers: usize,
    steady: Duration,
}

impl Params {
    fn from_args() -> Params {
        let sessions = arg("--sessions", 3000usize).max(1);
        Params {
            sessions,
            groups: arg("--groups", 30usize).clamp(1, sessions),
            rate: arg("--rate", 300usize).max(1),
            publishers: arg("--publishers", 6usize).max(1),
            steady: Duration::from_secs(arg("--steady", 5u64).max(1)),
        }
    }
}

/// One run's numbers, by name (also how a `--baseline` child hands them over).
type Outcome = Vec<(String, f64)>;

/// The runs `--replication` asks for: (label, `[cluster]` lines). `on` adds nothing (the
/// default; also what a build from before replication runs), `off` turns it off.
fn variants() -> Vec<(&'static str, &'static str)> {
    let on = ("replication on", "");
    let off = ("replication off", "replicate_sessions = false");
    match arg("--replication", "both".to_string()).as_str() {
        "on" => vec![on],
        "off" => vec![off],
        _ => vec![on, off],
    }
}

fn main() -> anyhow::Result<()> {
    let params = Params::from_args();
    // The topology runs this build's release binary (or $MQLB_BIN): set before the harness
    // reads it, and before any thread exists.
    let bin = mqlb_tests::mqlb_release_bin()?;
    std::env::set_var("MQLB_BIN", &bin);
    let rt = tokio::runtime::Runtime::new()?;
    let mut runs: Vec<(String, Outcome)> = Vec::new();
    for (label, cluster) in variants() {
        eprintln!("--- {label} ---");
        runs.push((label.to_string(), rt.block_on(run(&params, cluster))?));
    }
    drop(rt);
    if std::env::args().any(|a| a == "--child") {
        for (label, o) in &runs {
            for (k, v) in o {
                println!("RESULT {} {k} {v}", label.replace(' ', "_"));
            }
        }
        return Ok(());
    }
    let baseline = arg("--baseline", String::new());
    let base = if baseline.is_empty() {
        Vec::new()
    } else {
        run_child(&baseline)?
    };
    print_table(&params, &bin.display().to_string(), &runs, &baseline, &base);
    Ok(())
}

/// This program again, with `MQLB_BIN=bin` and the same flags; its `RESULT` lines by run.
fn run_child(bin: &str) -> anyhow::Result<Vec<(String, Outcome)>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--baseline") {
        args.drain(i..(i + 2).min(args.len()));
    }
    eprintln!("--- the same runs with the baseline {bin} ---");
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(&args)
        .arg("--child")
        .env("MQLB_BIN", bin)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the baseline")?;
    anyhow::ensure!(
        out.status.success(),
        "the baseline run failed: {}",
        out.status
    );
    let mut runs: Vec<(String, Outcome)> = Vec::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let mut w = l.split_whitespace();
        let (Some("RESULT"), Some(label), Some(k), Some(v)) =
            (w.next(), w.next(), w.next(), w.next())
        else {
            continue;
        };
        let (label, Ok(v)) = (label.replace('_', " "), v.parse::<f64>()) else {
            continue;
        };
        match runs.iter_mut().find(|(l, _)| *l == label) {
            Some((_, o)) => o.push((k.to_string(), v)),
            None => runs.push((label, vec![(k.to_string(), v)])),
        }
    }
    Ok(runs)
}

/// `q` in 0..=1 of `v` (sorted here), or NaN when empty.
fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Where the prober sends its CONNECTs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    Lb,
    Broker(usize),
}

/// A CONNECT→CONNACK round trip: when it started, where, how long (None: no CONNACK in 5 s).
type Probe = (Instant, Target, Option<Duration>);

/// One clean-session CONNECT→CONNACK to `addr`.
async fn connack_time(addr: SocketAddr, id: String) -> Option<Duration> {
    let t0 = Instant::now();
    let attempt = async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let c = encode_connect(&ConnectOptions {
            client_id: id,
            ..ConnectOptions::default()
        });
        s.write_all(&c).await?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await?;
        anyhow::ensure!(ack[0] == 0x20 && ack[3] == 0, "CONNACK refused: {ack:02x?}");
        s.write_all(&[0xe0, 0x00]).await?;
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(())) => Some(t0.elapsed()),
        _ => None,
    }
}

/// Probes the LB and every broker in `targets` every [`PROBE_EVERY`] until `stop`.
fn prober(
    targets: Arc<Mutex<Vec<(Target, SocketAddr)>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<Probe>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Bounded: ten minutes of probes at most.
        for n in 0..12_000u64 {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now: Vec<(Target, SocketAddr)> =
                targets.lock().unwrap_or_else(|p| p.into_inner()).clone();
            // Each address its own task: a slow broker does not delay the others' probes.
            let mut set = tokio::task::JoinSet::new();
            for (t, addr) in now {
                set.spawn(async move {
                    let at = Instant::now();
                    (
                        at,
                        t,
                        connack_time(addr, format!("fo-probe-{n}-{t:?}")).await,
                    )
                });
            }
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(p) => out.push(p),
                    Err(e) => eprintln!("a probe task failed: {e}"),
                }
            }
        }
        out
    })
}

/// What one publisher sent: (sequence number, group) of each acknowledged publish.
struct Sent {
    acked: Vec<(u64, usize)>,
    sent: u64,
}

/// (publisher, seq, sent at in ns since `epoch`) of a bench message.
fn parse(payload: &[u8]) -> Option<(usize, u64, u64)> {
    let s = std::str::from_utf8(payload).ok()?;
    let mut w = s.split(' ');
    Some((
        w.next()?.parse().ok()?,
        w.next()?.parse().ok()?,
        w.next()?.parse().ok()?,
    ))
}

fn publisher(
    p: Arc<Persistent>,
    index: usize,
    params: &Params,
    epoch: Instant,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Sent> {
    let (groups, n) = (params.groups, params.publishers);
    let every = Duration::from_secs_f64(n as f64 / params.rate as f64);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = Sent {
            acked: Vec::new(),
            sent: 0,
        };
        // Bounded: ten minutes at 1000/s at most.
        for seq in 0..600_000u64 {
            if stop.is_cancelled() {
                break;
            }
            tick.tick().await;
            let group = (index + seq as usize * n) % groups;
            let payload = format!("{index} {seq} {}", epoch.elapsed().as_nanos());
            out.sent = seq + 1;
            match p
                .publish_acked(
                    &format!("fo/g{group}"),
                    payload.into_bytes(),
                    PUBACK_DEADLINE,
                )
                .await
            {
                Ok(true) => out.acked.push((seq, group)),
                Ok(false) => {
                    eprintln!(
                        "{}: no PUBACK for {seq} in {PUBACK_DEADLINE:?}; stops",
                        p.id
                    );
                    break;
                }
                Err(e) => {
                    eprintln!("{}: {e}; stops", p.id);
                    break;
                }
            }
        }
        out
    })
}

/// Connects `n` persistent sessions `fo-s00000`... 32 at a time, each subscribed to its group.
async fn connect_sessions(
    front: SocketAddr,
    params: &Params,
) -> anyhow::Result<Vec<Arc<Persistent>>> {
    let mut subs = Vec::with_capacity(params.sessions);
    let ids: Vec<usize> = (0..params.sessions).collect();
    for chunk in ids.chunks(32) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let groups = params.groups;
            set.spawn(async move {
                let protocol = if i % 2 == 0 {
                    Protocol::V311
                } else {
                    Protocol::V5
                };
                let s = Persistent::connect(front, &format!("fo-s{i:05}"), protocol).await?;
                s.subscribe(&format!("fo/g{}", i % groups)).await?;
                anyhow::Ok((i, s))
            });
        }
        while let Some(r) = set.join_next().await {
            subs.push(r??);
        }
    }
    subs.sort_by_key(|(i, _)| *i);
    Ok(subs.into_iter().map(|(_, s)| Arc::new(s)).collect())
}

/// Publishes a warm-up message to every group until every session got one: the mesh and
/// every subscription are in place before anything is measured.
async fn warm_up(subs: &[Arc<Persistent>], p: &Persistent, groups: usize) -> anyhow::Result<()> {
    for _ in 0..20 {
        for g in 0..groups {
            p.publish_acked(&format!("fo/g{g}"), b"warm".to_vec(), PUBACK_DEADLINE)
                .await?;
        }
        let ok = wait_until("warm-up everywhere", Duration::from_secs(1), || async {
            subs.iter().all(|s| s.received_count() > 0)
        })
        .await;
        if ok.is_ok() {
            return Ok(());
        }
    }
    anyhow::bail!("warm-up messages did not reach every session")
}

async fn run(params: &Params, cluster: &str) -> anyhow::Result<Outcome> {
    let epoch = Instant::now();
    let mut t = Topology::start_with(3, cluster).await?;
    eprintln!(
        "[{:.1?}] connecting {} persistent sessions through the LB...",
        epoch.elapsed(),
        params.sessions
    );
    let subs = connect_sessions(t.front, params).await?;
    let mut pubs = Vec::new();
    for i in 0..params.publishers {
        pubs.push(Arc::new(
            Persistent::connect(t.front, &format!("fo-p{i}"), Protocol::V311).await?,
        ));
    }
    warm_up(&subs, &pubs[0], params.groups).await?;

    let targets: Vec<(Target, SocketAddr)> = std::iter::once((Target::Lb, t.front))
        .chain(
            t.brokers
                .iter()
                .enumerate()
                .map(|(i, b)| (Target::Broker(i), b.mqtt)),
        )
        .collect();
    let targets = Arc::new(Mutex::new(targets));
    let (stop_probe, stop_pub) = (CancellationToken::new(), CancellationToken::new());
    let probes = prober(targets.clone(), stop_probe.clone());
    let publishers: Vec<_> = pubs
        .iter()
        .enumerate()
        .map(|(i, p)| publisher(p.clone(), i, params, epoch, stop_pub.clone()))
        .collect();

    eprintln!(
        "[{:.1?}] steady traffic for {:?}...",
        epoch.elapsed(),
        params.steady
    );
    // Let the publishers reach their pace before the window opens.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let steady_from = Instant::now();
    tokio::time::sleep(params.steady).await;
    let steady_to = Instant::now();

    // The victim: the broker with most of this bench's clients.
    let before = connections(t.admin).await?;
    let mut load: HashMap<String, usize> = HashMap::new();
    for (id, b, _) in &before {
        if id.starts_with("fo-s") || id.starts_with("fo-p") {
            *load.entry(b.clone()).or_default() += 1;
        }
    }
    let (victim, victim_load) = load
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(b, n)| (b.clone(), *n))
        .context("no connections listed")?;
    let moved: HashSet<String> = before
        .iter()
        .filter(|(_, b, _)| *b == victim)
        .map(|(id, _, _)| id.clone())
        .collect();
    let victim_index = t
        .brokers
        .iter()
        .position(|b| b.id == victim)
        .context("victim not a broker")?;
    targets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(t, _)| *t != Target::Broker(victim_index));
    eprintln!(
        "[{:.1?}] SIGKILL {victim}, which holds {victim_load} clients",
        epoch.elapsed()
    );
    let killed = Instant::now();
    t.kill(&victim)?;

    let moved_subs: Vec<&Arc<Persistent>> = subs.iter().filter(|s| moved.contains(&s.id)).collect();
    let moved_pubs: Vec<&Arc<Persistent>> = pubs.iter().filter(|p| moved.contains(&p.id)).collect();
    let back_at = |c: &Persistent| c.connacks().into_iter().find(|a| a.at > killed);
    let receiving_at = |s: &Persistent| {
        let back = back_at(s)?.at;
        s.with_received(|r| r.iter().find(|d| d.at > back).map(|d| d.at))
    };
    // First every client back, then every subscriber receiving (not at all if its session
    // did not come back: it does not subscribe again).
    let reconnected = wait_until(
        "the victim's clients connected",
        RECOVERY_DEADLINE,
        || async {
            moved_subs.iter().all(|s| back_at(s).is_some())
                && moved_pubs.iter().all(|p| back_at(p).is_some())
        },
    )
    .await;
    let storm_to = Instant::now().max(killed + Duration::from_secs(1));
    let receiving_wait = wait_until(
        "the victim's sessions receiving",
        RECEIVING_DEADLINE,
        || async { moved_subs.iter().all(|s| receiving_at(s).is_some()) },
    )
    .await;
    let connected: Vec<Option<Instant>> = moved_subs
        .iter()
        .map(|s| back_at(s).map(|a| a.at))
        .chain(moved_pubs.iter().map(|p| back_at(p).map(|a| a.at)))
        .collect();
    let receiving: Vec<Option<Instant>> = moved_subs.iter().map(|s| receiving_at(s)).collect();
    let since_kill = |v: &[Option<Instant>]| -> (f64, usize) {
        let missing = v.iter().filter(|x| x.is_none()).count();
        let last = v
            .iter()
            .flatten()
            .max()
            .map(|i| ms(i.duration_since(killed)));
        (
            if missing > 0 {
                f64::NAN
            } else {
                last.unwrap_or(0.0)
            },
            missing,
        )
    };
    let (connected_ms, not_connected) = since_kill(&connected);
    let (receiving_ms, not_receiving) = since_kill(&receiving);
    for e in [&reconnected, &receiving_wait]
        .into_iter()
        .filter_map(|r| r.as_ref().err())
    {
        eprintln!("{e}: {not_connected} not connected, {not_receiving} subscribers not receiving");
    }
    let mut reconnect: Vec<f64> = moved_subs
        .iter()
        .map(|s| s.as_ref())
        .chain(moved_pubs.iter().map(|p| p.as_ref()))
        .filter_map(|c| {
            let back = back_at(c)?.at;
            let err = c.errors().into_iter().filter(|e| *e < back).max()?;
            Some(ms(back.duration_since(err)))
        })
        .collect();
    let sp0 = moved_subs
        .iter()
        .map(|s| s.as_ref())
        .chain(moved_pubs.iter().map(|p| p.as_ref()))
        .filter(|c| back_at(c).is_some_and(|a| !a.session_present))
        .count();

    // A little more traffic after the storm, then drain.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_pub.cancel();
    let mut sent = Vec::new();
    for p in publishers {
        sent.push(p.await?);
    }
    stop_probe.cancel();
    let probes = probes.await?;
    eprintln!("[{:.1?}] publishers stopped; draining", epoch.elapsed());
    let mut expected: Vec<BTreeSet<(usize, u64)>> = vec![BTreeSet::new(); params.groups];
    for (p, s) in sent.iter().enumerate() {
        for (seq, g) in &s.acked {
            expected[*g].insert((p, *seq));
        }
    }
    let group_of = |i: usize| i % params.groups;
    let got = |s: &Persistent| -> BTreeSet<(usize, u64)> {
        s.with_received(|r| {
            r.iter()
                .filter_map(|d| parse(&d.payload))
                .map(|(p, q, _)| (p, q))
                .collect()
        })
    };
    let drained = wait_until(
        "every acknowledged message delivered",
        DRAIN_DEADLINE,
        || async {
            subs.iter()
                .enumerate()
                .all(|(i, s)| got(s).is_superset(&expected[group_of(i)]))
        },
    )
    .await;
    if let Err(e) = &drained {
        eprintln!("{e}");
    }
    let (mut lost, mut dups, mut want) = (0usize, 0usize, 0usize);
    for (i, s) in subs.iter().enumerate() {
        let exp = &expected[group_of(i)];
        let have = got(s);
        want += exp.len();
        lost += exp.difference(&have).count();
        let checked = s.with_received(|r| r.iter().filter(|d| parse(&d.payload).is_some()).count());
        dups += checked - have.len();
    }

    eprintln!("[{:.1?}] drained; counting", epoch.elapsed());
    // Latencies of the deliveries that arrived in a window.
    let latencies = |from: Instant, to: Instant| -> Vec<f64> {
        let mut v = Vec::new();
        for s in &subs {
            s.with_received(|r| {
                for d in r.iter().filter(|d| d.at >= from && d.at < to) {
                    if let Some((_, _, ns)) = parse(&d.payload) {
                        let sent = epoch + Duration::from_nanos(ns);
                        v.push(ms(d.at.saturating_duration_since(sent)));
                    }
                }
            });
        }
        v
    };
    let mut steady_lat = latencies(steady_from, steady_to);
    let mut storm_lat = latencies(killed, storm_to);
    let steady_s = steady_to.duration_since(steady_from).as_secs_f64();
    let steady_delivered = steady_lat.len() as f64 / steady_s;
    let fanout = params.sessions as f64 / params.groups as f64;
    let connack = |from: Instant, to: Instant, lb: bool| -> (Vec<f64>, usize) {
        let sel = probes.iter().filter(|(at, t, _)| {
            *at >= from
                && *at < to
                && (*t == Target::Lb) == lb
                && *t != Target::Broker(victim_index)
        });
        let timeouts = sel.clone().filter(|(_, _, d)| d.is_none()).count();
        (sel.filter_map(|(_, _, d)| d.map(ms)).collect(), timeouts)
    };
    let (mut rest, _) = connack(steady_from, steady_to, false);
    let (mut storm, storm_timeouts) = connack(killed, storm_to, false);
    let (mut lb_rest, _) = connack(steady_from, steady_to, true);
    let sent_total: u64 = sent.iter().map(|s| s.sent).sum();
    let acked_total: usize = sent.iter().map(|s| s.acked.len()).sum();

    eprintln!("[{:.1?}] done", epoch.elapsed());
    Ok(vec![
        ("sessions".into(), params.sessions as f64),
        ("victim_clients".into(), victim_load as f64),
        ("victim_sessions".into(), moved_subs.len() as f64),
        ("offered_per_s".into(), params.rate as f64 * fanout),
        ("steady_delivered_per_s".into(), steady_delivered),
        ("steady_p50_ms".into(), pct(&mut steady_lat, 0.5)),
        ("steady_p99_ms".into(), pct(&mut steady_lat, 0.99)),
        ("storm_p99_ms".into(), pct(&mut storm_lat, 0.99)),
        ("connack_rest_p99_ms".into(), pct(&mut rest, 0.99)),
        ("connack_storm_p99_ms".into(), pct(&mut storm, 0.99)),
        ("connack_storm_timeouts".into(), storm_timeouts as f64),
        ("lb_connack_rest_p50_ms".into(), pct(&mut lb_rest, 0.5)),
        ("connected_ms".into(), connected_ms),
        ("not_connected".into(), not_connected as f64),
        ("receiving_ms".into(), receiving_ms),
        ("not_receiving".into(), not_receiving as f64),
        ("reconnect_p50_ms".into(), pct(&mut reconnect, 0.5)),
        ("reconnect_p99_ms".into(), pct(&mut reconnect, 0.99)),
        ("session_present_0".into(), sp0 as f64),
        ("published".into(), sent_total as f64),
        ("acked".into(), acked_total as f64),
        ("expected_deliveries".into(), want as f64),
        ("lost".into(), lost as f64),
        ("duplicates".into(), dups as f64),
    ])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn get(o: &Outcome, k: &str) -> f64 {
    o.iter().find(|(n, _)| n == k).map_or(f64::NAN, |(_, v)| *v)
}

/// The lines of the table for one run: (measure, value, compared with, ratio).
fn rows(o: &Outcome) -> Vec<(String, String, String, f64)> {
    let g = |k: &str| get(o, k);
    let victims = g("victim_clients");
    vec![
        (
            "steady QoS 1 deliveries/s".into(),
            format!("{:.0}", g("steady_delivered_per_s")),
            format!("offered {:.0}", g("offered_per_s")),
            g("steady_delivered_per_s") / g("offered_per_s"),
        ),
        (
            "steady latency p99 (p50)".into(),
            format!("{:.1} ms", g("steady_p99_ms")),
            format!("p50 {:.1} ms", g("steady_p50_ms")),
            g("steady_p99_ms") / g("steady_p50_ms"),
        ),
        (
            "latency p99 during the storm".into(),
            format!("{:.1} ms", g("storm_p99_ms")),
            format!("steady p99 {:.1} ms", g("steady_p99_ms")),
            g("storm_p99_ms") / g("steady_p99_ms"),
        ),
        (
            "survivors' CONNACK p99, storm".into(),
            format!("{:.1} ms", g("connack_storm_p99_ms")),
            format!("at rest {:.1} ms", g("connack_rest_p99_ms")),
            g("connack_storm_p99_ms") / g("connack_rest_p99_ms"),
        ),
        (
            format!("all {victims:.0} victim clients connected"),
            format!("{:.0} ms", g("connected_ms")),
            format!("LB CONNACK p50 {:.2} ms", g("lb_connack_rest_p50_ms")),
            g("connected_ms") / g("lb_connack_rest_p50_ms"),
        ),
        (
            format!("all {:.0} victim sessions receiving", g("victim_sessions")),
            if g("receiving_ms").is_nan() {
                format!("{:.0} never", g("not_receiving"))
            } else {
                format!("{:.0} ms", g("receiving_ms"))
            },
            format!("LB CONNACK p50 {:.2} ms", g("lb_connack_rest_p50_ms")),
            g("receiving_ms") / g("lb_connack_rest_p50_ms"),
        ),
        (
            "a victim client's reconnect p99".into(),
            format!("{:.0} ms", g("reconnect_p99_ms")),
            format!("p50 {:.0} ms", g("reconnect_p50_ms")),
            g("reconnect_p99_ms") / g("reconnect_p50_ms"),
        ),
        (
            "reconnects with Session Present 0".into(),
            format!("{:.0}", g("session_present_0")),
            format!("of {victims:.0}"),
            g("session_present_0") / victims,
        ),
        (
            "acknowledged messages lost".into(),
            format!("{:.0}", g("lost")),
            format!("of {:.0} expected", g("expected_deliveries")),
            g("lost") / g("expected_deliveries"),
        ),
        (
            "duplicates".into(),
            format!("{:.0}", g("duplicates")),
            format!("of {:.0} expected", g("expected_deliveries")),
            g("duplicates") / g("expected_deliveries"),
        ),
    ]
}

/// The measures compared between two runs.
const COMPARED: [&str; 9] = [
    "steady_delivered_per_s",
    "steady_p50_ms",
    "steady_p99_ms",
    "connack_storm_p99_ms",
    "connected_ms",
    "receiving_ms",
    "session_present_0",
    "lost",
    "duplicates",
];

fn compare(title: &str, a: &Outcome, b: &Outcome) {
    println!("\n{title}:");
    for k in COMPARED {
        println!(
            "  {k:<28} {:>10.2} {:>10.2}  {:>6.2}",
            get(a, k),
            get(b, k),
            get(a, k) / get(b, k)
        );
    }
}

fn print_table(
    params: &Params,
    bin: &str,
    runs: &[(String, Outcome)],
    baseline: &str,
    base: &[(String, Outcome)],
) {
    println!(
        "mqlb failover bench: {} persistent sessions (3.1.1 and 5.0 alternating) over 3 brokers, \
         {} topics, {} QoS 1 publishes/s from {} publishers; the busiest broker SIGKILLed; \
         {} cores; {bin}",
        params.sessions,
        params.groups,
        params.rate,
        params.publishers,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let show = |label: &str, o: &Outcome| {
        println!(
            "\n{:<38} {:>12}  {:<26} {:>8}",
            label, "value", "compared with", "ratio"
        );
        for (m, v, c, r) in rows(o) {
            println!("{m:<38} {v:>12}  {c:<26} {r:>8.3}");
        }
        println!(
            "(published {:.0}, acknowledged {:.0}; survivors' CONNACK probes without an answer in 5 s during the storm: {:.0})",
            get(o, "published"),
            get(o, "acked"),
            get(o, "connack_storm_timeouts")
        );
    };
    for (label, o) in runs {
        show(label, o);
    }
    for (label, o) in base {
        show(&format!("baseline, {label}"), o);
    }
    let find = |runs: &[(String, Outcome)], l: &str| {
        runs.iter().find(|(x, _)| x == l).map(|(_, o)| o.clone())
    };
    if let (Some(on), Some(off)) = (find(runs, "replication on"), find(runs, "replication off")) {
        compare("replication on / off, same build", &on, &off);
    }
    for (label, o) in runs {
        if let Some(b) = find(base, label) {
            compare(&format!("{label}: this build / baseline {baseline}"), o, &b);
        }
    }
}
