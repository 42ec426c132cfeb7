//! The whole HA topology as processes (HA server, three brokers, the LB): stickiness, failover
//! under traffic, a hung broker, the HA server's death, and clients nobody here wrote.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use mqlb_lb::select::{backend_hash, rendezvous_order, Candidate, Key};
use mqlb_tests::{connections, get_json, ha_get_json, wait_until, Client, QoS, Topology};

const DEADLINE: Duration = Duration::from_secs(30);

/// The backend the LB's rendezvous hash gives `client_id` among `backends` (all up).
fn predicted(client_id: &str, backends: &[&str]) -> String {
    let cands: Vec<Candidate> = backends
        .iter()
        .map(|b| Candidate {
            hash: backend_hash(b),
            weight: 1,
            active: 0,
            eligible: true,
        })
        .collect();
    let order = rendezvous_order(Key::ClientId(client_id).hash(), &cands);
    backends[order[0]].to_string()
}

async fn by_client(t: &Topology) -> anyhow::Result<HashMap<String, String>> {
    Ok(connections(t.admin)
        .await?
        .into_iter()
        .map(|(id, b, _)| (id, b))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_clients_land_on_the_same_broker_after_reconnecting() -> anyhow::Result<()> {
    let t = Topology::start(3).await?;
    let ids: Vec<String> = (0..100).map(|i| format!("sticky-{i:03}")).collect();
    let mut first = HashMap::new();
    for round in 0..2 {
        let mut clients = Vec::new();
        for id in &ids {
            clients.push(Client::connect(t.front, id).await?);
        }
        wait_until("100 listed", DEADLINE, || async {
            connections(t.admin).await.is_ok_and(|c| c.len() >= 100)
        })
        .await?;
        let now = by_client(&t).await?;
        for id in &ids {
            let b = now
                .get(id)
                .ok_or_else(|| anyhow::anyhow!("{id} not listed"))?;
            assert_eq!(
                *b,
                predicted(id, &["b1", "b2", "b3"]),
                "{id}: the rendezvous hash decides"
            );
            if round == 0 {
                first.insert(id.clone(), b.clone());
            } else {
                assert_eq!(first[id], *b, "{id} moved after reconnecting");
            }
        }
        for c in clients {
            c.disconnect().await;
        }
    }
    let spread: HashSet<&String> = first.values().collect();
    assert_eq!(spread.len(), 3, "100 clients use all three brokers");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_traffic_then_the_broker_rejoins() -> anyhow::Result<()> {
    let mut t = Topology::start(3).await?;
    let mut subs = Vec::new();
    for i in 0..100 {
        let s = Client::connect(t.front, &format!("sub-{i:03}")).await?;
        s.subscribe("fleet/#", QoS::AtLeastOnce).await?;
        subs.push(s);
    }
    let mut pubs = Vec::new();
    for i in 0..10 {
        pubs.push(std::sync::Arc::new(
            Client::connect(t.front, &format!("pub-{i}")).await?,
        ));
    }
    // Steady traffic: each publisher, every 100 ms.
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut tasks = Vec::new();
    for (i, p) in pubs.iter().enumerate() {
        let (p, running) = (p.clone(), running.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(e) = p
                    .publish_qos1(&format!("fleet/steady/{i}"), seq.to_string().as_bytes())
                    .await
                {
                    eprintln!("pub-{i}: {e}");
                }
                seq += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    wait_until("110 connections", DEADLINE, || async {
        connections(t.admin).await.is_ok_and(|c| c.len() >= 110)
    })
    .await?;
    let before = by_client(&t).await?;
    let mut load: HashMap<&str, usize> = HashMap::new();
    for b in before.values() {
        *load.entry(b.as_str()).or_default() += 1;
    }
    let victim = load
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(b, _)| b.to_string())
        .unwrap_or_default();
    let moved: HashSet<String> = before
        .iter()
        .filter(|(_, b)| **b == victim)
        .map(|(c, _)| c.clone())
        .collect();
    eprintln!("killing {victim}, which has {} of 110 clients", moved.len());

    let killed = Instant::now();
    t.kill(&victim)?;
    // Every client of the victim reconnects through the LB to another broker...
    wait_until(
        "the victim's clients reconnected elsewhere",
        DEADLINE,
        || async {
            let Ok(now) = by_client(&t).await else {
                return false;
            };
            moved
                .iter()
                .all(|c| now.get(c).is_some_and(|b| *b != victim))
                && subs
                    .iter()
                    .filter(|s| moved.contains(&s.id))
                    .all(|s| s.connacks() >= 2)
                && pubs
                    .iter()
                    .filter(|p| moved.contains(&p.id))
                    .all(|p| p.connacks() >= 2)
        },
    )
    .await?;
    let reconnected = killed.elapsed();
    // ... and receives again: each subscriber gets a message published after this point.
    let counts: Vec<usize> = subs.iter().map(Client::received_count).collect();
    wait_until("every subscriber receiving again", DEADLINE, || async {
        subs.iter()
            .zip(&counts)
            .all(|(s, n)| s.received_count() > *n)
    })
    .await?;
    let receiving = killed.elapsed();
    eprintln!(
        "failover: {} clients reconnected {reconnected:?} after the kill, all 100 subscribers receiving after {receiving:?}",
        moved.len()
    );
    println!(
        "FAILOVER reconnected_ms={} receiving_ms={}",
        reconnected.as_millis(),
        receiving.as_millis()
    );

    // Everything published from now on arrives, everywhere.
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    for (i, p) in pubs.iter().enumerate() {
        for n in 0..20 {
            p.publish_qos1(&format!("fleet/after/{i}"), n.to_string().as_bytes())
                .await?;
        }
    }
    let after = |s: &Client| {
        s.received()
            .iter()
            .filter(|m| m.topic.starts_with("fleet/after/"))
            .count()
    };
    let all = wait_until(
        "200 post-failover messages at every subscriber",
        DEADLINE,
        || async { subs.iter().all(|s| after(s) >= 200) },
    )
    .await;
    let short: Vec<(String, usize)> = subs
        .iter()
        .filter(|s| after(s) != 200)
        .map(|s| (s.id.clone(), after(s)))
        .collect();
    all.map_err(|e| anyhow::anyhow!("{e}: {short:?}"))?;
    assert!(short.is_empty(), "duplicates or losses: {short:?}");

    // The victim comes back, rejoins, and its clients' new connections go back to it.
    t.restart(&victim).await?;
    wait_until("victim up in the LB again", DEADLINE, || async {
        get_json(t.admin, "/api/backends").await.is_ok_and(|v| {
            v.as_array()
                .into_iter()
                .flatten()
                .any(|b| b["id"] == victim.as_str() && b["state"] == "up")
        })
    })
    .await?;
    let returning = moved
        .iter()
        .find(|c| c.starts_with("sub-"))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no subscriber moved"))?;
    let pos = subs.iter().position(|s| s.id == returning).unwrap_or(0);
    subs.remove(pos).disconnect().await;
    let back = Client::connect(t.front, &returning).await?;
    wait_until("returning client listed", DEADLINE, || async {
        by_client(&t)
            .await
            .is_ok_and(|m| m.get(&returning).is_some_and(|b| *b == victim))
    })
    .await?;
    back.subscribe("fleet/#", QoS::AtLeastOnce).await?;
    pubs[0].publish_qos1("fleet/rejoined", b"hello").await?;
    wait_until(
        "the rejoined broker's client receives",
        DEADLINE,
        || async { back.received().iter().any(|m| m.topic == "fleet/rejoined") },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_broker_is_marked_down_in_time_and_avoided() -> anyhow::Result<()> {
    let t = Topology::start(3).await?;
    let stopped = Instant::now();
    t.pause("b2")?;
    // MQTT probe every 1 s, threshold 1: within interval × threshold + 1 s.
    wait_until("b2 down", Duration::from_secs(2), || async {
        get_json(t.admin, "/api/backends").await.is_ok_and(|v| {
            v.as_array()
                .into_iter()
                .flatten()
                .all(|b| b["id"] != "b2" || b["state"] == "down")
        })
    })
    .await?;
    let took = stopped.elapsed();
    eprintln!("hung broker marked down after {took:?}");
    let mut clients = Vec::new();
    for i in 0..30 {
        clients.push(Client::connect(t.front, &format!("avoid-{i}")).await?);
    }
    let now = by_client(&t).await?;
    assert!(
        now.values().all(|b| b != "b2"),
        "a new connection went to the hung broker: {now:?}"
    );
    t.resume("b2")?;
    wait_until("b2 back", DEADLINE, || async {
        get_json(t.admin, "/api/backends").await.is_ok_and(|v| {
            v.as_array()
                .into_iter()
                .flatten()
                .any(|b| b["id"] == "b2" && b["state"] == "up")
        })
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ha_server_dies_and_failover_still_works() -> anyhow::Result<()> {
    let mut t = Topology::start(3).await?;
    let version = ha_get_json(t.ha, "/api/cluster").await?["version"]
        .as_u64()
        .unwrap_or(0);
    t.kill("ha1")?;
    // A subscriber and a publisher on different brokers keep talking.
    let sub_id = (0..)
        .map(|i| format!("s{i}"))
        .find(|id| predicted(id, &["b1", "b2", "b3"]) == "b1")
        .unwrap_or_default();
    let pub_id = (0..)
        .map(|i| format!("p{i}"))
        .find(|id| predicted(id, &["b1", "b2", "b3"]) == "b3")
        .unwrap_or_default();
    let sub = Client::connect(t.front, &sub_id).await?;
    sub.subscribe("noha/#", QoS::AtLeastOnce).await?;
    let p = Client::connect(t.front, &pub_id).await?;
    p.publish_qos1("noha/1", b"x").await?;
    wait_until(
        "message across brokers without the HA server",
        DEADLINE,
        || async { sub.received_count() >= 1 },
    )
    .await?;
    // A broker crash while the HA server is gone: the LB's probes still fail the clients over.
    t.kill("b3")?;
    wait_until("publisher back on another broker", DEADLINE, || async {
        p.connacks() >= 2
            && by_client(&t)
                .await
                .is_ok_and(|m| m.get(&pub_id).is_some_and(|b| b != "b3"))
    })
    .await?;
    p.publish_qos1("noha/2", b"y").await?;
    wait_until(
        "message after failover without the HA server",
        DEADLINE,
        || async { sub.received_count() >= 2 },
    )
    .await?;
    // The HA server returns with its state.
    t.restart("ha1").await?;
    let view = ha_get_json(t.ha, "/api/cluster").await?;
    assert!(view["version"].as_u64() >= Some(version), "{view}");
    let ids: HashSet<String> = view["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        ids,
        ["b1", "b2", "b3"]
            .iter()
            .map(|s| s.to_string())
            .collect::<HashSet<_>>()
    );
    Ok(())
}

/// Clients nobody here wrote: mosquitto_sub/mosquitto_pub (3.1.1 and 5.0) and paho-mqtt, through
/// the LB, with subscriber and publishers on different brokers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_and_paho_clients_across_brokers() -> anyhow::Result<()> {
    use std::process::Command;
    let t = Topology::start(3).await?;
    let all = ["b1", "b2", "b3"];
    let on = |b: &str, prefix: &str| {
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .find(|id| predicted(id, &all) == b)
            .unwrap_or_default()
    };
    let (sub_id, pub_id, pub5_id) = (on("b1", "msub"), on("b2", "mpub"), on("b3", "mpub5"));
    let port = t.front.port().to_string();
    let mut sub = mqlb_tests::MosquittoSub::start(t.front, &sub_id, "real/#")?;
    wait_until(
        "mosquitto_sub connected through the LB to b1",
        DEADLINE,
        || async {
            by_client(&t)
                .await
                .is_ok_and(|m| m.get(&sub_id).is_some_and(|b| b == "b1"))
        },
    )
    .await?;
    sub.wait_subscribed("real/ping", || {
        mqlb_tests::mosquitto_pub(t.front, &pub_id, "real/ping", "p", false)
    })
    .await?;
    mqlb_tests::mosquitto_pub(t.front, &pub_id, "real/a", "one", false)?;
    mqlb_tests::mosquitto_pub(t.front, &pub5_id, "real/b", "two", true)?;
    mqlb_tests::mosquitto_pub(t.front, &pub_id, "real/c", "three", false)?;
    let lines = sub.lines(3, "real/ping", Duration::from_secs(10));
    assert_eq!(
        lines,
        ["real/a one", "real/b two", "real/c three"],
        "mosquitto_sub (on b1) printed"
    );

    // paho-mqtt (PyPI), 3.1.1 and 5.0, subscriber and publisher on different brokers.
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/paho_roundtrip.py");
    for (proto, extra) in [("3.1.1", None), ("5.0", Some("v5"))] {
        let (s, p) = (
            on("b2", &format!("paho-sub-{proto}")),
            on("b3", &format!("paho-pub-{proto}")),
        );
        let mut args = vec![
            script.display().to_string(),
            "127.0.0.1".into(),
            port.clone(),
            s,
            p,
            "50".into(),
        ];
        args.extend(extra.map(str::to_string));
        let out = tokio::task::spawn_blocking(move || Command::new("python3").args(&args).output())
            .await??;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "paho MQTT {proto}: {text} (install it: pip install paho-mqtt)"
        );
        assert!(text.contains("received 50 of 50: ok"), "{text}");
    }
    Ok(())
}
