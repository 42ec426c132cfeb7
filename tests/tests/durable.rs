//! Durable cluster state (issue 18): retained messages survive a whole-cluster restart. The
//! topology runs as real processes (HA server on SQLite, three brokers, the LB); clients set
//! retained messages on the brokers directly in MQTT 3.1.1 and 5.0, one set on a node and
//! cleared (empty payload) on another; once the HA server holds what they wrote, every broker
//! and the HA server are killed (SIGKILL) and started again, and a new subscriber gets every
//! retained message that was set, with its properties, and not the cleared one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mqlb_tests::{ha_get_json, http, metric, wait_until, Client, Client5, Msg, QoS, Topology};

const DEADLINE: Duration = Duration::from_secs(30);

/// A broker's `/metrics`.
async fn metrics(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let (status, text) = http(addr, "GET", "/metrics").await?;
    anyhow::ensure!(status == 200, "GET /metrics: {status}");
    Ok(text)
}

/// The HA server's retained messages: topic → base64 payload.
async fn stored(t: &Topology) -> anyhow::Result<BTreeMap<String, String>> {
    let page = ha_get_json(t.ha, "/api/retained").await?;
    let entries = page["entries"].as_array().context("no entries")?;
    Ok(entries
        .iter()
        .filter_map(|e| {
            Some((
                e["topic"].as_str()?.to_string(),
                e["payload"].as_str().unwrap_or("").to_string(),
            ))
        })
        .collect())
}

async fn wait_stored(t: &Topology, what: &str, want: &[(&str, &str)]) -> anyhow::Result<()> {
    let want: BTreeMap<String, String> = want
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    wait_until(what, DEADLINE, || async {
        stored(t).await.is_ok_and(|s| s == want)
    })
    .await?;
    Ok(())
}

/// Retained messages a subscriber to `d/#` got, up to the live message it published itself
/// after subscribing (retained ones come first, so nothing retained comes after it).
/// Sorted: the router sends retained messages in no set order.
fn retained_before_end(got: &[Msg]) -> Vec<(String, Vec<u8>)> {
    let mut r: Vec<_> = got
        .iter()
        .take_while(|m| m.topic != "d/end")
        .filter(|m| m.retain)
        .map(|m| (m.topic.clone(), m.payload.clone()))
        .collect();
    r.sort();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_whole_cluster_restart() -> anyhow::Result<()> {
    let mut t = Topology::start(3).await?;
    let (b1, b2, b3) = (
        t.brokers[0].clone(),
        t.brokers[1].clone(),
        t.brokers[2].clone(),
    );

    let v4 = Client::connect(b1.mqtt, "durable-pub-v4").await?;
    v4.client
        .publish("d/v4", QoS::AtLeastOnce, true, b"three-one-one".to_vec())
        .await?;
    v4.client
        .publish("d/cleared", QoS::AtLeastOnce, true, b"soon gone".to_vec())
        .await?;
    let v5 = Client5::connect(b3.mqtt_v5, "durable-pub-v5").await?;
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    v5.client
        .publish_with_properties(
            "d/v5",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            b"five".to_vec(),
            props,
        )
        .await?;
    // base64 of the payloads
    let (p4, p5, gone) = ("dGhyZWUtb25lLW9uZQ==", "Zml2ZQ==", "c29vbiBnb25l");
    wait_stored(
        &t,
        "the HA server holds the three retained messages",
        &[("d/cleared", gone), ("d/v4", p4), ("d/v5", p5)],
    )
    .await?;
    // Cleared on another node than the one that set it.
    let clearer = Client::connect(b2.mqtt, "durable-clearer").await?;
    clearer
        .client
        .publish("d/cleared", QoS::AtLeastOnce, true, Vec::new())
        .await?;
    wait_stored(
        &t,
        "the HA server holds the clearing",
        &[("d/v4", p4), ("d/v5", p5)],
    )
    .await?;
    let b2_metrics = metrics(b2.http).await?;
    assert_eq!(
        metric(&b2_metrics, "mqlb_broker_retained_stored_total", &[]),
        1.0,
        "b2 wrote the clearing only: the set came from b1's client, not b2's"
    );
    v4.disconnect().await;
    clearer.disconnect().await;
    drop(v5);

    for name in ["b1", "b2", "b3", "ha1"] {
        t.kill(name)?;
    }
    for name in ["ha1", "b1", "b2", "b3"] {
        t.restart(name).await?;
    }

    let want = vec![
        ("d/v4".to_string(), b"three-one-one".to_vec()),
        ("d/v5".to_string(), b"five".to_vec()),
    ];
    // Every node loaded them: a subscriber on each gets them.
    for b in [&b1, &b2, &b3] {
        let sub = Client::connect(b.mqtt, &format!("durable-sub-{}", b.id)).await?;
        sub.subscribe("d/#", QoS::AtLeastOnce).await?;
        sub.publish("d/end", QoS::AtLeastOnce, b"end").await?;
        wait_until(
            &format!("{}: the live message after the retained ones", b.id),
            DEADLINE,
            || async { sub.received().iter().any(|m| m.topic == "d/end") },
        )
        .await?;
        assert_eq!(
            retained_before_end(&sub.received()),
            want,
            "{}: every retained message set, not the cleared one",
            b.id
        );
        sub.disconnect().await;
        // The link the load used is gone: it is no client.
        wait_until(&format!("{}: no client left", b.id), DEADLINE, || async {
            metrics(b.http)
                .await
                .is_ok_and(|t| metric(&t, "mqlb_broker_clients_connected", &[]) == 0.0)
        })
        .await?;
        let text = metrics(b.http).await?;
        assert_eq!(
            metric(&text, "mqlb_broker_retained_loaded_total", &[]),
            2.0,
            "{}",
            b.id
        );
    }
    // The MQTT 5 properties came back too.
    let sub5 = Client5::connect(b1.mqtt_v5, "durable-sub-v5").await?;
    sub5.subscribe("d/v5").await?;
    wait_until("the MQTT 5 retained message", DEADLINE, || async {
        !sub5.received().is_empty()
    })
    .await?;
    let m = &sub5.received()[0];
    assert!(m.retain);
    assert_eq!(m.user_properties, [("k".to_string(), "v".to_string())]);
    Ok(())
}

/// Connects `id` with clean session 0 (MQTT 3.1.1) to `addr`; returns the client, its event
/// loop and the CONNACK's Session Present.
async fn persistent(
    addr: std::net::SocketAddr,
    id: &str,
) -> anyhow::Result<(rumqttc::AsyncClient, rumqttc::EventLoop, bool)> {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = rumqttc::AsyncClient::new(o, 64);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let ev = tokio::time::timeout_at(deadline, el.poll())
            .await
            .context("no CONNACK")??;
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)) = ev {
            anyhow::ensure!(a.code == rumqttc::ConnectReturnCode::Success, "{a:?}");
            return Ok((c, el, a.session_present));
        }
    }
}

/// Polls `el` until `want` says yes of an incoming packet, within the deadline.
async fn until(
    el: &mut rumqttc::EventLoop,
    what: &str,
    want: impl Fn(&rumqttc::Packet) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let ev = tokio::time::timeout_at(deadline, el.poll())
            .await
            .with_context(|| format!("no {what}"))??;
        if let rumqttc::Event::Incoming(p) = &ev {
            if want(p) {
                return Ok(());
            }
        }
    }
}

/// A persistent session's subscriptions survive a whole-cluster restart (issue 18): its
/// client reconnects on another node with clean session 0 and gets Session Present 1 and a
/// message on its filter without subscribing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_survives_a_whole_cluster_restart() -> anyhow::Result<()> {
    let mut t = Topology::start(3).await?;
    let (b1, b2, b3) = (
        t.brokers[0].clone(),
        t.brokers[1].clone(),
        t.brokers[2].clone(),
    );
    let (c, mut el, present) = persistent(b1.mqtt, "durable-session").await?;
    assert!(!present, "a new session");
    c.subscribe("s/#", QoS::AtLeastOnce).await?;
    until(&mut el, "SUBACK", |p| {
        matches!(p, rumqttc::Packet::SubAck(_))
    })
    .await?;
    c.disconnect().await?;
    // Its DISCONNECT is sent once the loop runs: until the connection ends.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while let Ok(Ok(_)) = tokio::time::timeout_at(deadline, el.poll()).await {}
    drop(el);
    wait_until("the HA server holds the session", DEADLINE, || async {
        ha_get_json(t.ha, "/api/sessions").await.is_ok_and(|v| {
            v["entries"].as_array().is_some_and(|e| {
                e.len() == 1
                    && e[0]["client_id"] == "durable-session"
                    && e[0]["session"]["subscriptions"][0]["filter"] == "s/#"
            })
        })
    })
    .await?;

    for name in ["b1", "b2", "b3", "ha1"] {
        t.kill(name)?;
    }
    for name in ["ha1", "b1", "b2", "b3"] {
        t.restart(name).await?;
    }

    let (_c, mut el, present) = persistent(b2.mqtt, "durable-session").await?;
    assert!(
        present,
        "Session Present 1 after the whole cluster restarted"
    );
    let publisher = Client::connect(b3.mqtt, "durable-session-pub").await?;
    // b3's link to b2 may take a moment after the restart: publish until it arrives.
    let got = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let got = got.clone();
        tokio::spawn(async move {
            for _ in 0..300 {
                if got.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if publisher
                    .publish("s/x", QoS::AtLeastOnce, b"hello")
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            publisher.disconnect().await;
        })
    };
    let r = until(
        &mut el,
        "the message on its filter, without a SUBSCRIBE",
        |p| matches!(p, rumqttc::Packet::Publish(m) if m.topic == "s/x"),
    )
    .await;
    got.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.await?;
    r?;
    let text = metrics(b2.http).await?;
    assert_eq!(metric(&text, "mqlb_broker_sessions_loaded_total", &[]), 1.0);
    Ok(())
}

/// A publish a client got: topic, payload, QoS, DUP.
type Got = (String, Vec<u8>, u8, bool);

/// Polls `el` (its event loop acknowledges each publish) until `n` publishes came; each one.
async fn receive(el: &mut rumqttc::EventLoop, n: usize) -> anyhow::Result<Vec<Got>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while got.len() < n {
        let ev = tokio::time::timeout_at(deadline, el.poll())
            .await
            .with_context(|| format!("{} of {n} publishes came: {got:?}", got.len()))??;
        if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev {
            got.push((p.topic, p.payload.to_vec(), p.qos as u8, p.dup));
        }
    }
    Ok(got)
}

/// The HA server's copy of `client_id`'s queue: the payloads kept.
async fn stored_queue(t: &Topology, client_id: &str) -> anyhow::Result<Vec<String>> {
    let id = mqlb_haserver::retained::encode_after(client_id);
    let v = ha_get_json(t.ha, &format!("/api/queued?client={id}")).await?;
    Ok(v["entry"]["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter_map(|m| m["topic"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Issue 18: the QoS 1 and 2 messages queued for a persistent session whose client is away
/// survive a clean stop (SIGTERM) of every node: its owner and its replicas write them to the
/// HA server, each once; after the restart its client, reconnecting on another node, gets
/// Session Present 1 and every one of them, in order, with its QoS, none twice; once
/// acknowledged they are gone from the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_survive_a_clean_whole_cluster_restart() -> anyhow::Result<()> {
    let mut t = Topology::start(3).await?;
    let (b1, b2, b3) = (
        t.brokers[0].clone(),
        t.brokers[1].clone(),
        t.brokers[2].clone(),
    );
    let id = "durable-queue";
    let (c, mut el, _) = persistent(b1.mqtt, id).await?;
    c.subscribe("q1/#", QoS::AtLeastOnce).await?;
    c.subscribe("q2/#", QoS::ExactlyOnce).await?;
    for _ in 0..2 {
        until(&mut el, "SUBACK", |p| {
            matches!(p, rumqttc::Packet::SubAck(_))
        })
        .await?;
    }
    c.disconnect().await?;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while let Ok(Ok(_)) = tokio::time::timeout_at(deadline, el.poll()).await {}
    drop(el);
    wait_until("every node knows the session", DEADLINE, || async {
        let mut all = true;
        for b in [&b2, &b3] {
            all &= metrics(b.http)
                .await
                .is_ok_and(|t| metric(&t, "mqlb_session_replicas", &[]) == 1.0);
        }
        all
    })
    .await?;

    // Published on b3 while the client is away: queued on b1 (its owner), b2 and b3.
    let publisher = Client::connect(b3.mqtt, "durable-queue-pub").await?;
    let mut want = Vec::new();
    for i in 0..6u32 {
        let (topic, qos) = if i.is_multiple_of(2) {
            (format!("q1/{i}"), QoS::AtLeastOnce)
        } else {
            (format!("q2/{i}"), QoS::ExactlyOnce)
        };
        publisher
            .publish(&topic, qos, format!("m{i}").as_bytes())
            .await?;
        want.push((topic, format!("m{i}").into_bytes(), qos as u8));
    }
    wait_until("b2 and b3 hold the six messages", DEADLINE, || async {
        let mut all = true;
        for b in [&b2, &b3] {
            all &= metrics(b.http)
                .await
                .is_ok_and(|t| metric(&t, "mqlb_session_replica_messages", &[]) == 6.0);
        }
        all
    })
    .await?;
    publisher.disconnect().await;

    t.terminate(&["b1", "b2", "b3"], DEADLINE).await?;
    let kept = stored_queue(&t, id).await?;
    assert_eq!(
        kept,
        want.iter().map(|w| w.0.clone()).collect::<Vec<_>>(),
        "the HA server holds each queued message once"
    );
    t.kill("ha1")?;
    for name in ["ha1", "b1", "b2", "b3"] {
        t.restart(name).await?;
    }

    let (_c, mut el, present) = persistent(b2.mqtt, id).await?;
    assert!(present, "Session Present 1 after the clean restart");
    let got = receive(&mut el, want.len()).await?;
    let plain: Vec<(String, Vec<u8>, u8)> = got
        .iter()
        .map(|g| (g.0.clone(), g.1.clone(), g.2))
        .collect();
    assert_eq!(plain, want, "every queued message, in order, with its QoS");
    // Nothing comes twice: a live message after them is the next one.
    let marker = Client::connect(b3.mqtt, "durable-queue-marker").await?;
    marker.publish("q1/end", QoS::AtLeastOnce, b"end").await?;
    let next = receive(&mut el, 1).await?;
    assert_eq!(next[0].0, "q1/end", "no duplicate before the live message");
    marker.disconnect().await;
    let text = metrics(b2.http).await?;
    assert_eq!(metric(&text, "mqlb_broker_queued_restored_total", &[]), 6.0);
    // The event loop acknowledges (and completes QoS 2) as it is polled, meanwhile.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !stored_queue(&t, id).await?.is_empty() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the acknowledged messages are still in the HA server after {DEADLINE:?}"
        );
        if let Ok(ev) = tokio::time::timeout(Duration::from_millis(100), el.poll()).await {
            ev?;
        }
    }
    Ok(())
}

/// Connects `id` to `addr` with a retained QoS 1 last will; returns the client and its event
/// loop once the CONNACK came (dropping the loop closes the connection without DISCONNECT).
async fn with_retained_will(
    addr: std::net::SocketAddr,
    id: &str,
    topic: &str,
    payload: &[u8],
) -> anyhow::Result<(rumqttc::AsyncClient, rumqttc::EventLoop)> {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(60));
    o.set_last_will(rumqttc::LastWill::new(
        topic,
        payload.to_vec(),
        QoS::AtLeastOnce,
        true,
    ));
    let (c, mut el) = rumqttc::AsyncClient::new(o, 16);
    until(&mut el, "CONNACK", |p| {
        matches!(p, rumqttc::Packet::ConnAck(_))
    })
    .await?;
    Ok((c, el))
}

/// Issue 18: a retained will is stored like any retained message, whoever publishes it: the
/// node of a client whose connection ends without DISCONNECT, or the survivor that publishes
/// the will of a client whose node died. The whole cluster is killed and started again, and a
/// new subscriber gets both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_wills_survive_a_whole_cluster_restart() -> anyhow::Result<()> {
    let mut t = Topology::start(3).await?;
    let (b1, b2, b3) = (
        t.brokers[0].clone(),
        t.brokers[1].clone(),
        t.brokers[2].clone(),
    );
    let (_c1, el1) = with_retained_will(b1.mqtt, "will-client", "w/client", b"gone").await?;
    let (_c3, _el3) = with_retained_will(b3.mqtt, "will-node", "w/node", b"dead").await?;
    drop(el1);
    // base64 of the payloads
    wait_stored(
        &t,
        "the HA server holds the client's will",
        &[("w/client", "Z29uZQ==")],
    )
    .await?;
    wait_until("b1 holds the will of b3's client", DEADLINE, || async {
        metrics(b1.http)
            .await
            .is_ok_and(|t| metric(&t, "mqlb_session_replicas", &[]) == 1.0)
    })
    .await?;
    t.kill("b3")?;
    wait_stored(
        &t,
        "the HA server holds the will a survivor published",
        &[("w/client", "Z29uZQ=="), ("w/node", "ZGVhZA==")],
    )
    .await?;

    for name in ["b1", "b2", "ha1"] {
        t.kill(name)?;
    }
    for name in ["ha1", "b1", "b2", "b3"] {
        t.restart(name).await?;
    }
    let sub = Client::connect(b2.mqtt, "will-sub").await?;
    sub.subscribe("w/#", QoS::AtLeastOnce).await?;
    wait_until("both retained wills", DEADLINE, || async {
        sub.received().len() >= 2
    })
    .await?;
    let mut got: Vec<(String, Vec<u8>, bool)> = sub
        .received()
        .into_iter()
        .map(|m| (m.topic, m.payload, m.retain))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("w/client".to_string(), b"gone".to_vec(), true),
            ("w/node".to_string(), b"dead".to_vec(), true),
        ]
    );
    Ok(())
}
