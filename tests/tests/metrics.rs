//! The metrics an operator graphs and alerts on (issue 17) exist and move: new connections
//! counted at accept on the LB; a broker's clients, persistent sessions (online and offline),
//! messages in and out by QoS, retained messages, the mesh backlog per peer; and the process
//! metrics of all three kinds of process.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{topo, DEADLINE};
use mqlb_tests::{http, metric, wait_until, Client, QoS, Topology};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use tokio::net::TcpStream;

/// A connection is counted in `mqlb_connections_opened_total` while it is still open (before,
/// the LB counted connections only when they ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_counts_a_connection_when_it_is_accepted() -> anyhow::Result<()> {
    let t = topo(1, "").await?;
    let opened = |text: &str| metric(text, "mqlb_connections_opened_total", &[("rule", "mqtt")]);
    let ended = |text: &str| metric(text, "mqlb_connections_total", &[("rule", "mqtt")]);
    let before = opened(&t.lb.metrics_text());
    // A plain TCP connection: the rule hashes by five-tuple and proxies it at once.
    let c = TcpStream::connect(t.front).await?;
    wait_until("the open connection counted", DEADLINE, || async {
        opened(&t.lb.metrics_text()) >= before + 1.0
    })
    .await?;
    let text = t.lb.metrics_text();
    assert_eq!(ended(&text), 0.0, "nothing ended yet:\n{text}");
    drop(c);
    wait_until("the end counted too", DEADLINE, || async {
        ended(&t.lb.metrics_text()) >= 1.0
    })
    .await?;
    assert_eq!(opened(&t.lb.metrics_text()), before + 1.0, "counted once");
    Ok(())
}

async fn scrape(addr: SocketAddr) -> String {
    match http(addr, "GET", "/metrics").await {
        Ok((200, body)) => body,
        Ok((status, body)) => format!("# status {status}: {body}"),
        Err(e) => format!("# {e}"),
    }
}

/// Waits until `name{labels}` on `addr` reaches `min`; returns the scrape (the last one in the
/// error when it does not).
async fn wait_metric(
    addr: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    min: f64,
) -> anyhow::Result<String> {
    let waited = wait_until(&format!("{name}{labels:?} >= {min}"), DEADLINE, || async {
        metric(&scrape(addr).await, name, labels) >= min
    })
    .await;
    let text = scrape(addr).await;
    match waited {
        Ok(_) => Ok(text),
        Err(e) => Err(e.context(format!("last scrape:\n{text}"))),
    }
}

/// A 3.1.1 client with a persistent session (clean session 0) that subscribes at QoS 1, then
/// goes: its session stays on the node, offline.
async fn persistent_session(addr: SocketAddr, id: &str, filter: &str) -> anyhow::Result<()> {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_clean_session(false);
    let (client, mut events) = AsyncClient::new(opts, 16);
    client.subscribe(filter, rumqttc::QoS::AtLeastOnce).await?;
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = events.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await??;
    client.disconnect().await?;
    tokio::time::timeout(DEADLINE, async {
        // Until the event loop has sent the DISCONNECT and sees the connection end.
        while events.poll().await.is_ok() {}
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_exports_clients_sessions_messages_retained_and_backlog() -> anyhow::Result<()> {
    let mut t = Topology::start(2).await?;
    let (b1_mqtt, b1) = (t.brokers[0].mqtt, t.brokers[0].http);

    let text = scrape(b1).await;
    assert!(text.contains("mqlb_broker_clients_connected "), "{text}");
    assert_eq!(
        metric(&text, "mqlb_broker_sessions", &[("state", "offline")]),
        0.0,
        "{text}"
    );

    // A persistent session that goes offline.
    persistent_session(b1_mqtt, "keeper", "m/#").await?;
    wait_metric(b1, "mqlb_broker_sessions", &[("state", "offline")], 1.0).await?;

    // Two live clients; a retained QoS 1 message from one reaches the other.
    let sub = Client::connect(b1_mqtt, "metrics-sub").await?;
    sub.subscribe("m/#", QoS::AtLeastOnce).await?;
    let publisher = Client::connect(b1_mqtt, "metrics-pub").await?;
    // At least these two (the LB's MQTT probe and the node's own listener check connect for
    // a moment every second, so the count is not exact).
    wait_metric(b1, "mqlb_broker_clients_connected", &[], 2.0).await?;
    publisher
        .client
        .publish("m/retained", QoS::AtLeastOnce, true, b"r".to_vec())
        .await?;
    wait_until("the subscriber got it", DEADLINE, || async {
        sub.received_count() >= 1
    })
    .await?;
    let text = wait_metric(b1, "mqlb_broker_retained_messages", &[], 1.0).await?;
    for (name, qos) in [
        ("mqlb_broker_messages_received_total", "1"),
        ("mqlb_broker_messages_sent_total", "1"),
    ] {
        assert!(
            metric(&text, name, &[("qos", qos)]) >= 1.0,
            "{name} qos {qos}:\n{text}"
        );
    }
    assert!(text.contains("mqlb_broker_messages_dropped_total{qos=\"0\",reason=\"expired\"}"));

    // The peer goes: what this node's clients publish queues for it.
    assert_eq!(
        metric(&text, "mqlb_mesh_backlog", &[("peer", "b2")]),
        0.0,
        "{text}"
    );
    assert!(text.contains("mqlb_mesh_backlog{peer=\"b2\"}"), "{text}");
    t.kill("b2")?;
    wait_until("the link to b2 down", DEADLINE, || async {
        let text = scrape(b1).await;
        text.contains("mqlb_mesh_link_up{peer=\"b2\"} 0")
    })
    .await?;
    for i in 0..20 {
        publisher
            .client
            .publish("m/q", QoS::AtMostOnce, false, format!("{i}").into_bytes())
            .await?;
    }
    wait_metric(b1, "mqlb_mesh_backlog", &[("peer", "b2")], 10.0).await?;

    sub.disconnect().await;
    publisher.disconnect().await;
    Ok(())
}

/// The LB, the HA server and a broker each report their own process: CPU seconds, resident
/// memory, open descriptors, start time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_reports_its_process_metrics() -> anyhow::Result<()> {
    let t = Topology::start(1).await?;
    let mut seen = 0;
    for (name, addr) in [("lb", t.admin), ("ha1", t.ha), ("b1", t.brokers[0].http)] {
        let text = scrape(addr).await;
        for series in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(metric(&text, series, &[]) > 0.0, "{name} {series}:\n{text}");
        }
        assert!(
            text.contains("process_cpu_seconds_total"),
            "{name}:\n{text}"
        );
        seen += 1;
    }
    assert_eq!(seen, 3);
    Ok(())
}

/// The mesh's lag per peer (issue 17): with b2 paused (its link up, nothing acknowledged),
/// what b1's clients publish at QoS 1 waits for b2's acknowledgement, and
/// `mqlb_mesh_lag_seconds{peer="b2"}` on b1 grows past a second; back to 0 once b2 resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_lag_of_a_silent_peer_grows() -> anyhow::Result<()> {
    let t = Topology::start(2).await?;
    let (b1, b1_mqtt) = (t.brokers[0].http, t.brokers[0].mqtt);
    let publisher = Client::connect(b1_mqtt, "lag-pub").await?;
    publisher
        .client
        .publish("lag/t", QoS::AtLeastOnce, false, b"0".to_vec())
        .await?;
    wait_metric(b1, "mqlb_mesh_link_up", &[("peer", "b2")], 1.0).await?;
    let lag = |text: &str| metric(text, "mqlb_mesh_lag_seconds", &[("peer", "b2")]);
    t.pause("b2")?;
    let grown = async {
        // One publish every 50 ms (paced, not a wait), for 20 s at most.
        let mut pace = tokio::time::interval(Duration::from_millis(50));
        for i in 1..=400u32 {
            pace.tick().await;
            publisher
                .client
                .publish(
                    "lag/t",
                    QoS::AtLeastOnce,
                    false,
                    format!("{i}").into_bytes(),
                )
                .await?;
            if lag(&scrape(b1).await) > 1.0 {
                return anyhow::Ok(true);
            }
        }
        anyhow::Ok(false)
    };
    let grown = tokio::time::timeout(Duration::from_secs(60), grown).await;
    t.resume("b2")?;
    anyhow::ensure!(
        matches!(grown, Ok(Ok(true))),
        "lag never above 1 s: {grown:?}"
    );
    publisher
        .client
        .publish("lag/t", QoS::AtLeastOnce, false, b"end".to_vec())
        .await?;
    wait_until("the lag is back to 0", DEADLINE, || async {
        lag(&scrape(b1).await) == 0.0
    })
    .await?;
    Ok(())
}
