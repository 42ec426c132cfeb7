//! Paced evacuation: a broker holding 200 clients (half MQTT 5, half 3.1.1) behind the LB is
//! evacuated at 100 a second. Every MQTT 5 client gets DISCONNECT 0x9C (Use another server)
//! with the pool's Server Reference, every 3.1.1 client a close; the pace holds within 20 %;
//! each client reconnects through the LB at once, is accepted, and lands on another broker.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mqlb_config::Config;
use mqlb_lb::{Lb, Listeners};
use mqlb_mqtt::{encode_connect, ConnectOptions, ProtocolLevel};
use mqlb_tests::{connections, get_json, http, metric, wait_until, Mosquitto, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(20);
const CLIENTS: usize = 200;
const RATE: f64 = 100.0;
const REFERENCE: &str = "mqtt-b.example.net:1883";

fn lb_toml(brokers: &[Mosquitto]) -> String {
    let mut t = format!(
        "[lb]\nadmin = \"127.0.0.1:0\"\nwatch_config = false\n\
         [[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\nbacklog = 1024\n\
         [[pool]]\nname = \"brokers\"\nprobe = \"alive\"\nserver_reference = \"{REFERENCE}\"\n"
    );
    for (i, b) in brokers.iter().enumerate() {
        t += &format!(
            "[[pool.backend]]\nid = \"b{}\"\naddr = \"{}\"\n",
            i + 1,
            b.addr()
        );
    }
    t + "[[probe]]\nname = \"alive\"\nport = \"traffic\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n\
         [[rule]]\nname = \"mqtt\"\nfrontend = \"mqtt\"\npool = \"brokers\"\n\
         distribution = \"mqtt-client-id\"\n"
}

/// Reads one MQTT packet: (first header byte, body); `None` at EOF.
async fn read_packet(s: &mut TcpStream) -> anyhow::Result<Option<(u8, Vec<u8>)>> {
    let mut first = [0u8; 1];
    if s.read(&mut first).await? == 0 {
        return Ok(None);
    }
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = s.read_u8().await?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        anyhow::ensure!(shift <= 21, "remaining length too long");
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok(Some((first[0], body)))
}

/// Connects through the LB at this MQTT level and reads an accepting CONNACK.
async fn connect(front: SocketAddr, id: &str, v5: bool) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(front).await?;
    s.write_all(&encode_connect(&ConnectOptions {
        level: if v5 {
            ProtocolLevel::V5
        } else {
            ProtocolLevel::V311
        },
        client_id: id.to_string(),
        ..ConnectOptions::default()
    }))
    .await?;
    let packet = tokio::time::timeout(DEADLINE, read_packet(&mut s)).await??;
    match packet {
        Some((0x20, body)) if body.len() >= 2 && body[1] == 0 => Ok(s),
        other => anyhow::bail!("{id}: refused or no CONNACK: {other:?}"),
    }
}

/// What an evacuated client saw.
#[derive(Debug)]
enum Told {
    /// DISCONNECT: reason code and Server Reference.
    Disconnect(u8, Option<String>),
    /// The connection closed without a packet.
    Closed,
}

/// The reason and the Server Reference (property 0x1C) of an MQTT 5 DISCONNECT body.
fn disconnect(body: &[u8]) -> Told {
    let reason = body.first().copied().unwrap_or(0);
    let mut reference = None;
    // Properties: a one-byte length here (this test's reference is short), then id + value.
    if let Some(&plen) = body.get(1) {
        let props = body.get(2..2 + usize::from(plen)).unwrap_or(&[]);
        if props.first() == Some(&0x1C) && props.len() >= 3 {
            let n = usize::from(u16::from_be_bytes([props[1], props[2]]));
            reference = props
                .get(3..3 + n)
                .map(|r| String::from_utf8_lossy(r).into_owned());
        }
    }
    Told::Disconnect(reason, reference)
}

/// Waits for the LB to move this client off, then connects again; returns what it was told,
/// when, and the new connection.
async fn evacuated(
    mut s: TcpStream,
    front: SocketAddr,
    id: String,
    v5: bool,
) -> anyhow::Result<(Told, Instant, TcpStream)> {
    let packet = tokio::time::timeout(Duration::from_secs(30), read_packet(&mut s)).await;
    let at = Instant::now();
    let told = match packet {
        Ok(Ok(None)) | Ok(Err(_)) => Told::Closed,
        Ok(Ok(Some((0xE0, body)))) => disconnect(&body),
        Ok(Ok(Some((t, _)))) => anyhow::bail!("{id}: packet type {t:#x}, not a DISCONNECT"),
        Err(_) => anyhow::bail!("{id}: not moved within 30 s"),
    };
    drop(s);
    let again = connect(front, &id, v5).await?;
    Ok((told, at, again))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuation_moves_200_clients_at_the_rate_asked_with_mqtt5_redirects() -> anyhow::Result<()>
{
    let mut brokers = Vec::new();
    for _ in 0..3 {
        brokers.push(Mosquitto::start().await?);
    }
    let dir = TempDir::new("evacuate")?;
    let file = dir.path().join("lb.toml");
    std::fs::write(&file, lb_toml(&brokers))?;
    let lb = Lb::start(Config::load(&file)?, Listeners::default()).await?;
    let (admin, front) = (
        lb.admin_addr(),
        lb.frontend_addr("mqtt")
            .ok_or_else(|| anyhow::anyhow!("frontend not open"))?,
    );

    // Every client on b1: the others drained while they connect, then enabled.
    for b in ["b2", "b3"] {
        assert_eq!(
            http(admin, "POST", &format!("/api/backends/{b}/drain"))
                .await?
                .0,
            200
        );
    }
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let v5 = i % 2 == 0;
        let id = format!("evac-{i}");
        clients.push((connect(front, &id, v5).await?, id, v5));
    }
    wait_until("200 clients on b1", DEADLINE, || async {
        connections(admin)
            .await
            .is_ok_and(|c| c.len() == CLIENTS && c.iter().all(|(_, b, _)| b == "b1"))
    })
    .await?;
    for b in ["b2", "b3"] {
        assert_eq!(
            http(admin, "POST", &format!("/api/backends/{b}/enable"))
                .await?
                .0,
            200
        );
    }

    let mut tasks = Vec::new();
    for (s, id, v5) in clients {
        tasks.push((v5, tokio::spawn(evacuated(s, front, id, v5))));
    }
    let (code, body) = http(admin, "POST", "/api/backends/b1/evacuate?rate=100").await?;
    assert_eq!(code, 200, "{body}");

    // Progress is visible while it runs.
    let b1 = || async {
        get_json(admin, "/api/backends")
            .await
            .ok()
            .and_then(|v| v.as_array()?.iter().find(|b| b["id"] == "b1").cloned())
            .unwrap_or_default()
    };
    wait_until("b1 evacuating, part done", DEADLINE, || async {
        let b = b1().await;
        let remaining = b["evacuation"]["remaining"].as_u64().unwrap_or(0);
        b["state"] == "draining"
            && b["evacuating"] == true
            && (1..CLIENTS as u64 / 2).contains(&remaining)
    })
    .await?;

    let (mut times, mut redirected, mut closed, mut again) = (Vec::new(), 0, 0, Vec::new());
    for (v5, task) in tasks {
        let (told, at, s) = task.await??;
        times.push(at);
        match told {
            Told::Disconnect(0x9C, Some(r)) if v5 && r == REFERENCE => redirected += 1,
            Told::Closed if !v5 => closed += 1,
            other => anyhow::bail!("v5={v5}: {other:?}"),
        }
        again.push(s);
    }
    assert_eq!((redirected, closed), (CLIENTS / 2, CLIENTS / 2));
    times.sort();
    let span = times[CLIENTS - 1].duration_since(times[0]).as_secs_f64();
    let rate = (CLIENTS - 1) as f64 / span;
    eprintln!("{CLIENTS} clients moved in {span:.3} s: {rate:.1} a second (asked {RATE})");
    assert!(
        (RATE * 0.8..=RATE * 1.2).contains(&rate),
        "moved at {rate:.1}/s, asked {RATE}/s"
    );

    // All back, none on b1; the evacuation is done and counted.
    wait_until("200 clients on b2 and b3", DEADLINE, || async {
        connections(admin)
            .await
            .is_ok_and(|c| c.len() == CLIENTS && c.iter().all(|(_, b, _)| b != "b1"))
    })
    .await?;
    wait_until("evacuation done", DEADLINE, || async {
        b1().await["evacuation"]["done"] == true
    })
    .await?;
    let b = b1().await;
    assert_eq!(b["evacuating"], false, "{b}");
    assert_eq!(b["evacuation"]["told"], CLIENTS as u64, "{b}");
    assert_eq!(b["evacuation"]["remaining"], 0, "{b}");
    let text = lb.metrics_text();
    assert_eq!(
        metric(&text, "mqlb_evacuated_total", &[("backend", "b1")]),
        CLIENTS as f64
    );
    assert_eq!(
        metric(
            &text,
            "mqlb_connections_total",
            &[("backend", "b1"), ("outcome", "evacuated")]
        ),
        CLIENTS as f64
    );
    drop(again);
    lb.shutdown().await;
    Ok(())
}

/// A QoS 0 PUBLISH (3.1.1 framing) of `payload` on `topic`.
fn publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(payload);
    let mut p = vec![0x30];
    let mut n = body.len();
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        p.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            break;
        }
    }
    p.extend(body);
    p
}

/// What precedes the payload of the MQTT 5 QoS 0 PUBLISH of topic "big": the topic with its
/// length, and an empty property length.
const V5_PUBLISH_HEAD: usize = 2 + 3 + 1;

/// The DISCONNECT goes between two packets even while the broker streams large messages to the
/// client (the relay splices their bodies): every PUBLISH the client reads is whole, then comes
/// the DISCONNECT, then the close. (With the DISCONNECT written where the copy happens to
/// be, it lands inside a message: the client reads garbage.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disconnect_lands_between_packets_of_a_bulk_stream() -> anyhow::Result<()> {
    let brokers = vec![Mosquitto::start().await?, Mosquitto::start().await?];
    let dir = TempDir::new("evacuate-bulk")?;
    let file = dir.path().join("lb.toml");
    std::fs::write(&file, lb_toml(&brokers))?;
    let lb = Lb::start(Config::load(&file)?, Listeners::default()).await?;
    let (admin, front) = (
        lb.admin_addr(),
        lb.frontend_addr("mqtt")
            .ok_or_else(|| anyhow::anyhow!("frontend not open"))?,
    );
    assert_eq!(http(admin, "POST", "/api/backends/b2/drain").await?.0, 200);
    let mut sub = connect(front, "bulk-sub", true).await?;
    // SUBSCRIBE big (MQTT 5): packet id 1, no properties, QoS 0.
    sub.write_all(&[0x82, 9, 0, 1, 0, 0, 3, b'b', b'i', b'g', 0])
        .await?;
    match tokio::time::timeout(DEADLINE, read_packet(&mut sub)).await?? {
        Some((0x90, _)) => {}
        other => anyhow::bail!("no SUBACK: {other:?}"),
    }
    assert_eq!(http(admin, "POST", "/api/backends/b2/enable").await?.0, 200);

    // A publisher straight on b1 streams 3 MiB messages, each longer than what one splice
    // moves (a pipe holds 1 MiB), so the relay is inside a message most of the time.
    let payload: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
    let packet = publish("big", &payload);
    let mut publisher = connect(brokers[0].addr(), "bulk-pub", false).await?;
    let streaming = tokio::spawn(async move {
        for _ in 0..40 {
            if publisher.write_all(&packet).await.is_err() {
                return;
            }
        }
    });
    // Let the stream run, then evacuate in the middle of it.
    let mut whole = 0;
    while whole < 3 {
        match tokio::time::timeout(DEADLINE, read_packet(&mut sub)).await?? {
            Some((0x30, body)) if body.len() == V5_PUBLISH_HEAD + payload.len() => whole += 1,
            other => anyhow::bail!(
                "before the evacuation: {:?}",
                other.map(|(t, b)| (t, b.len()))
            ),
        }
    }
    let (code, body) = http(admin, "POST", "/api/backends/b1/evacuate?rate=10").await?;
    assert_eq!(code, 200, "{body}");
    let told = loop {
        match tokio::time::timeout(DEADLINE, read_packet(&mut sub)).await?? {
            Some((0x30, body)) => {
                assert_eq!(
                    body.len(),
                    V5_PUBLISH_HEAD + payload.len(),
                    "a PUBLISH cut short"
                );
                assert_eq!(
                    &body[V5_PUBLISH_HEAD..],
                    &payload[..],
                    "a PUBLISH's payload changed"
                );
                whole += 1;
            }
            Some((0xE0, body)) => break disconnect(&body),
            other => anyhow::bail!("{:?}", other.map(|(t, b)| (t, b.len()))),
        }
    };
    assert!(
        matches!(&told, Told::Disconnect(0x9C, Some(r)) if r == REFERENCE),
        "{told:?}"
    );
    // Nothing after the DISCONNECT but the close.
    let rest = tokio::time::timeout(DEADLINE, read_packet(&mut sub)).await?;
    assert!(
        matches!(rest, Ok(None) | Err(_)),
        "bytes after the DISCONNECT"
    );
    eprintln!("{whole} whole 3 MiB messages, then the DISCONNECT");
    streaming.abort();
    drop(sub);
    lb.shutdown().await;
    Ok(())
}
