//! Real clients keep their session across a broker's SIGKILL (issue 12): `mosquitto_sub -c`
//! (MQTT 3.1.1, Clean Session 0) and `mosquitto_sub -V mqttv5 -c -x 300` (a Session Expiry
//! Interval), and paho-mqtt devices (3.1.1 and 5.0) that subscribe only when their session is
//! not present, through the LB of three `mqlb broker` processes. The broker each is connected to
//! is killed; what is published while they reconnect (to the same LB, which sends them to a
//! live broker) reaches them all the same: their sessions were held by the other brokers.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context};
use mqlb_tests::{connections, mosquitto_installed, mosquitto_pub, MosquittoSub, Topology};

const BEFORE: u32 = 10;
const WHILE_AWAY: u32 = 20;

/// mosquitto_pub/sub are there; in CI they must be.
fn clients_installed() -> anyhow::Result<bool> {
    if mosquitto_installed() {
        return Ok(true);
    }
    anyhow::ensure!(
        std::env::var_os("CI").is_none(),
        "mosquitto-clients missing in CI"
    );
    eprintln!("skipped: mosquitto-clients not installed");
    Ok(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_sessions_survive_their_brokers_kill() -> anyhow::Result<()> {
    if !clients_installed()? {
        return Ok(());
    }
    let mut t = Topology::start(3).await?;
    let front = t.front;
    let mut subs = vec![
        (
            "mss-311",
            MosquittoSub::start_with(front, "mss-311", "mss/t", &["-c"])?,
        ),
        (
            "mss-5",
            MosquittoSub::start_with(
                front,
                "mss-5",
                "mss/t",
                &["-c", "-V", "mqttv5", "-x", "300"],
            )?,
        ),
    ];
    for (id, s) in &mut subs {
        s.wait_subscribed("mss/t", || {
            mosquitto_pub(front, "mss-ping", "mss/t", "ping", false)
        })
        .await
        .with_context(|| format!("{id} subscribed"))?;
    }
    for i in 1..=BEFORE {
        mosquitto_pub(front, "mss-pub", "mss/t", &i.to_string(), false)?;
    }
    // The broker each subscriber is on, as the LB relays it.
    let admin = t.admin;
    // (polled: at most 10 s)
    let mut on = None;
    for _ in 0..100 {
        if let Ok(c) = connections(admin).await {
            let find = |id: &str| {
                c.iter()
                    .find(|(cid, _, _)| cid == id)
                    .map(|(_, b, _)| b.clone())
            };
            on = find("mss-311").zip(find("mss-5"));
            if on.is_some() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let on = on.context("the LB does not relay both subscribers")?;
    let mut victims: BTreeSet<String> = BTreeSet::new();
    victims.insert(on.0.clone());
    victims.insert(on.1.clone());
    // Two brokers at most: one always stays (with three, the third holds both replicas).
    for b in &victims {
        t.kill(b)?;
    }
    for i in BEFORE + 1..=BEFORE + WHILE_AWAY {
        mosquitto_pub(front, "mss-pub", "mss/t", &i.to_string(), false)?;
    }
    let want: BTreeSet<u32> = (1..=BEFORE + WHILE_AWAY).collect();
    for (id, s) in &mut subs {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut got = BTreeSet::new();
        let mut lines = Vec::new();
        while !want.is_subset(&got) {
            let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
                break;
            };
            let Some(line) = s.lines(1, "mss/t ping", left).pop() else {
                break;
            };
            if let Some(n) = line.strip_prefix("mss/t ").and_then(|n| n.parse().ok()) {
                got.insert(n);
            }
            lines.push(line);
        }
        let lost: Vec<&u32> = want.difference(&got).collect();
        ensure!(
            lost.is_empty(),
            "{id} (was on {}): lost {lost:?} of {}; got {lines:?}",
            if *id == "mss-311" { &on.0 } else { &on.1 },
            want.len()
        );
    }
    Ok(())
}

/// A paho-mqtt device (`tests/scripts/paho_persistent_sub.py`): its printed lines, as they come.
struct Paho {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Paho {
    fn start(front: std::net::SocketAddr, id: &str, topic: &str, v5: bool) -> anyhow::Result<Paho> {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/paho_persistent_sub.py");
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(script)
            .args([
                front.ip().to_string(),
                front.port().to_string(),
                id.into(),
                topic.into(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        if v5 {
            cmd.arg("v5");
        }
        let mut child = cmd.spawn().context("python3 with paho-mqtt")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Paho { child, lines })
    }

    /// Lines until `done` says so or `timeout` passes; all of them.
    fn until(&self, timeout: Duration, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut got = Vec::new();
        while !done(&got) {
            let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
                break;
            };
            match self.lines.recv_timeout(left) {
                Ok(l) => got.push(l),
                Err(_) => break,
            }
        }
        got
    }
}

impl Drop for Paho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// paho-mqtt devices, 3.1.1 and 5.0, each subscribing once (only when the broker has no session
/// for it): their broker is SIGKILLed; they reconnect by themselves with Session Present 1 and
/// receive everything published meanwhile without subscribing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_sessions_survive_their_brokers_kill() -> anyhow::Result<()> {
    if !clients_installed()? {
        return Ok(());
    }
    let mut t = Topology::start(3).await?;
    let front = t.front;
    let devices = [
        ("paho-311", Paho::start(front, "paho-311", "pss/t", false)?),
        ("paho-5", Paho::start(front, "paho-5", "pss/t", true)?),
    ];
    for (id, d) in &devices {
        let l = d.until(Duration::from_secs(15), |l| {
            l.iter().any(|l| l == "subscribed")
        });
        ensure!(l.iter().any(|l| l == "subscribed"), "{id}: {l:?}");
    }
    mosquitto_pub(front, "pss-pub", "pss/t", "0", false)?;
    let mut on = Vec::new();
    for (id, d) in &devices {
        let l = d.until(Duration::from_secs(10), |l| l.iter().any(|l| l == "msg 0"));
        ensure!(
            l.iter().any(|l| l == "msg 0"),
            "{id} before the kill: {l:?}"
        );
        let c = connections(t.admin).await?;
        let b = c
            .iter()
            .find(|(cid, _, _)| cid == id)
            .map(|(_, b, _)| b.clone());
        on.push(b.with_context(|| format!("{id} is not relayed"))?);
    }
    let victims: BTreeSet<String> = on.iter().cloned().collect();
    for b in &victims {
        t.kill(b)?;
    }
    for i in 1..=WHILE_AWAY {
        mosquitto_pub(front, "pss-pub", "pss/t", &i.to_string(), false)?;
    }
    for (id, d) in &devices {
        let want: Vec<String> = (1..=WHILE_AWAY).map(|i| format!("msg {i}")).collect();
        let l = d.until(Duration::from_secs(20), |l| {
            want.iter().all(|w| l.contains(w))
        });
        let lost: Vec<&String> = want.iter().filter(|w| !l.contains(w)).collect();
        ensure!(lost.is_empty(), "{id}: lost {lost:?}; printed {l:?}");
        ensure!(
            l.iter().any(|l| l == "connected 1"),
            "{id}: no Session Present 1: {l:?}"
        );
        ensure!(
            !l.iter().any(|l| l == "subscribed"),
            "{id} subscribed again: {l:?}"
        );
    }
    Ok(())
}
