//! MQTT authentication and ACLs on the brokers (`[auth]`), with mosquitto's own tools: password
//! files made by `mosquitto_passwd`, clients `mosquitto_pub`/`mosquitto_sub`, raw CONNECTs for
//! the exact CONNACK codes; in-process two-node clusters, and an `mqlb broker` process for
//! SIGHUP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mqlb_config::AuthSettings;
use mqlb_tests::{free_port, mqlb_bin, wait_listening, Cluster, KillOnDrop, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(15);

fn installed() -> bool {
    let ok = |c: &str| Command::new(c).arg("--help").output().is_ok();
    ok("mosquitto_passwd") && ok("mosquitto_pub") && ok("mosquitto_sub") && ok("stdbuf")
}

/// `mosquitto_passwd [-c] [-H sha512] -b file user pass`.
fn passwd(file: &Path, create: bool, sha512: bool, user: &str, pass: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new("mosquitto_passwd");
    if sha512 {
        cmd.args(["-H", "sha512"]);
    }
    if create {
        cmd.arg("-c");
    }
    let out = cmd.arg("-b").arg(file).args([user, pass]).output()?;
    anyhow::ensure!(out.status.success(), "mosquitto_passwd: {out:?}");
    Ok(())
}

/// One `mosquitto_pub -d` (QoS 1): whether it exited 0, and its debug output.
fn publish(
    addr: SocketAddr,
    login: Option<(&str, &str)>,
    id: &str,
    topic: &str,
    v5: bool,
) -> anyhow::Result<(bool, String)> {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-d", "-i", id, "-t", topic, "-m", id, "-q", "1"]);
    if let Some((u, p)) = login {
        cmd.args(["-u", u, "-P", p]);
    }
    if v5 {
        cmd.args(["-V", "mqttv5"]);
    }
    let out = cmd.output().context("running mosquitto_pub")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// A `mosquitto_sub -d -v` process; its output lines are read as they come.
struct Sub {
    _child: KillOnDrop,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Sub {
    fn start(
        addr: SocketAddr,
        login: (&str, &str),
        id: &str,
        filter: &str,
        v5: bool,
    ) -> anyhow::Result<Sub> {
        // Line-buffered: mosquitto_sub's debug lines are block-buffered into a pipe. (stdbuf
        // execs it: the process killed on drop is mosquitto_sub itself.)
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "mosquitto_sub"])
            .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-d", "-v", "-i", id, "-t", filter, "-q", "1"])
            .args(["-u", login.0, "-P", login.1])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if v5 {
            cmd.args(["-V", "mqttv5"]);
        }
        let mut child = cmd.spawn().context("starting mosquitto_sub")?;
        let (tx, rx) = mpsc::channel();
        for out in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
            });
        }
        Ok(Sub {
            _child: KillOnDrop(child),
            lines: rx,
            seen: Vec::new(),
        })
    }

    /// Waits (up to `within`) for a line `pred` accepts; every line read is kept in `seen`.
    fn wait_line(&mut self, within: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// The SUBACK code mosquitto_sub printed ("Subscribed (mid: 1): 128").
    fn suback(&mut self) -> anyhow::Result<u8> {
        let l = self
            .wait_line(DEADLINE, |l| l.contains("Subscribed (mid"))
            .with_context(|| format!("no SUBACK; output: {:?}", self.seen))?;
        let code = l.rsplit(':').next().unwrap_or("").trim();
        code.parse().with_context(|| format!("SUBACK line {l:?}"))
    }

    /// Whether a message on `topic` was printed (`-v`: "topic payload").
    fn got(&mut self, topic: &str, within: Duration) -> bool {
        let prefix = format!("{topic} ");
        self.wait_line(within, |l| l.starts_with(&prefix)).is_some()
    }

    fn connacks(&self) -> usize {
        self.seen
            .iter()
            .filter(|l| l.contains("received CONNACK"))
            .count()
    }
}

/// Publishes on `topic` until `sub` prints it: the subscription (and the mesh path) is in place.
fn until_delivered(
    sub: &mut Sub,
    addr: SocketAddr,
    login: (&str, &str),
    topic: &str,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        publish(addr, Some(login), "pinger", topic, false)?;
        if sub.got(topic, Duration::from_millis(300)) {
            return Ok(());
        }
    }
    bail!(
        "{topic} never reached the subscriber; it printed {:?}",
        sub.seen
    )
}

/// The raw CONNACK to a CONNECT with a login: `(return code / reason code)`.
async fn raw_connack(addr: SocketAddr, level: u8, user: &str, pass: &str) -> anyhow::Result<u8> {
    let field = |b: &[u8]| {
        let mut v = (b.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    };
    let mut body = field(b"MQTT");
    body.extend([level, 0xC2, 0, 60]); // user name, password, clean session; keep alive 60
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend(field(format!("raw{level}").as_bytes()));
    body.extend(field(user.as_bytes()));
    body.extend(field(pass.as_bytes()));
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(&packet).await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut ack))
        .await
        .context("no CONNACK")?
        .context("closed without a CONNACK")?;
    anyhow::ensure!(ack[0] == 0x20, "not a CONNACK: {ack:?}");
    Ok(ack[3])
}

fn settings(dir: &Path, acl: Option<&str>) -> anyhow::Result<AuthSettings> {
    let acl_file = match acl {
        Some(text) => {
            let p = dir.join("acl");
            std::fs::write(&p, text)?;
            Some(p)
        }
        None => None,
    };
    Ok(AuthSettings {
        password_file: Some(dir.join("passwd")),
        acl_file,
        allow_anonymous: false,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_passwd_logins_get_in_and_wrong_ones_get_connack_5_or_0x86() -> anyhow::Result<()>
{
    if !installed() {
        eprintln!("SKIP: mosquitto tools not installed");
        return Ok(());
    }
    let dir = TempDir::new("mqtt-auth-login")?;
    let pw = dir.path().join("passwd");
    passwd(&pw, true, false, "alice", "alice-pw")?; // $7$, mosquitto_passwd's default
    passwd(&pw, false, true, "bob", "bob-pw")?; // $6$ (-H sha512)
    let text = std::fs::read_to_string(&pw)?;
    anyhow::ensure!(
        text.contains("alice:$7$") && text.contains("bob:$6$"),
        "{text}"
    );
    let cluster = Cluster::start_with_auth(2, &settings(dir.path(), None)?).await?;
    let (v4, v5) = (cluster.mqtt(0), cluster.mqtt_v5(1).context("v5 listener")?);

    for (addr, v5flag) in [(v4, false), (v5, true)] {
        let (ok, out) = publish(addr, Some(("alice", "alice-pw")), "a", "t", v5flag)?;
        anyhow::ensure!(ok, "alice ($7$) refused: {out}");
        let (ok, out) = publish(addr, Some(("bob", "bob-pw")), "b", "t", v5flag)?;
        anyhow::ensure!(ok, "bob ($6$) refused: {out}");
        for (who, login) in [
            ("wrong password", Some(("alice", "bob-pw"))),
            ("unknown user", Some(("mallory", "alice-pw"))),
            ("anonymous", None),
        ] {
            let (ok, out) = publish(addr, login, "m", "t", v5flag)?;
            anyhow::ensure!(!ok, "{who} got in (v5: {v5flag}): {out}");
        }
    }
    // The exact codes: 3.1.1 0x05 Not authorized, 5.0 0x86 Bad User Name or Password.
    assert_eq!(raw_connack(v4, 4, "alice", "nope").await?, 0x05);
    assert_eq!(raw_connack(v5, 5, "alice", "nope").await?, 0x86);
    assert_eq!(raw_connack(v4, 4, "bob", "bob-pw").await?, 0x00);
    assert_eq!(raw_connack(v5, 5, "alice", "alice-pw").await?, 0x00);
    Ok(())
}

const ACL: &str = "\
# anonymous clients: nothing
user alice
topic readwrite sensors/#
topic write alerts/#
topic deny sensors/secret/#
user bob
topic read sensors/#
topic write bob/#
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_allows_and_denies_publish_and_subscribe_across_two_nodes() -> anyhow::Result<()> {
    if !installed() {
        eprintln!("SKIP: mosquitto tools not installed");
        return Ok(());
    }
    let dir = TempDir::new("mqtt-auth-acl")?;
    let pw = dir.path().join("passwd");
    passwd(&pw, true, false, "alice", "a")?;
    passwd(&pw, false, false, "bob", "b")?;
    let cluster = Cluster::start_with_auth(2, &settings(dir.path(), Some(ACL))?).await?;
    let (n0, n1) = (cluster.mqtt(0), cluster.mqtt(1));
    let n1v5 = cluster.mqtt_v5(1).context("v5 listener")?;
    let (alice, bob) = (("alice", "a"), ("bob", "b"));

    // SUBSCRIBE: bob may read sensors/# but nothing under alerts/.
    let mut denied = Sub::start(n1, bob, "bob-alerts", "alerts/#", false)?;
    assert_eq!(denied.suback()?, 0x80, "3.1.1 SUBACK failure");
    let mut denied5 = Sub::start(n1v5, bob, "bob-alerts5", "alerts/#", true)?;
    assert_eq!(denied5.suback()?, 0x87, "5.0 SUBACK Not authorized");

    // bob's `#` is accepted (some of it is readable) but delivers only what he may read,
    // also for messages that come from the other node over the mesh.
    let mut all = Sub::start(n1, bob, "bob-all", "#", false)?;
    assert_eq!(all.suback()?, 0x01);
    let mut local = Sub::start(n1, alice, "alice-n1", "sensors/#", false)?;
    assert_eq!(local.suback()?, 0x01);
    let mut remote = Sub::start(n0, alice, "alice-n0", "sensors/#", false)?;
    assert_eq!(remote.suback()?, 0x01);
    until_delivered(&mut all, n0, alice, "sensors/ping")?;
    until_delivered(&mut remote, n1, alice, "sensors/ping0")?;

    let (ok, out) = publish(n0, Some(alice), "alice-pub", "alerts/fire", false)?;
    anyhow::ensure!(ok, "alice may write alerts/#: {out}");
    let (ok, out) = publish(n0, Some(alice), "alice-pub", "sensors/temp", false)?;
    anyhow::ensure!(ok, "alice may write sensors/#: {out}");
    assert!(all.got("sensors/temp", DEADLINE), "bob reads sensors/temp");
    assert!(local.got("sensors/temp", DEADLINE));

    // PUBLISH: bob may not write sensors/#; alice may not write sensors/secret/#. 5.0: PUBACK
    // 0x87; the message reaches no one on either node.
    let (_, out) = publish(n1v5, Some(bob), "bob-pub", "sensors/forged", true)?;
    assert!(out.contains("RC:135"), "5.0 PUBACK 0x87: {out}");
    let (ok, out) = publish(n1, Some(bob), "bob-pub", "sensors/forged4", false)?;
    assert!(
        ok,
        "3.1.1 has no refusal code: acknowledged and dropped: {out}"
    );
    let n0v5 = cluster.mqtt_v5(0).context("v5 listener")?;
    let (_, out) = publish(n0v5, Some(alice), "alice-pub", "sensors/secret/x", true)?;
    assert!(out.contains("RC:135"), "deny line: {out}");
    let (ok, out) = publish(n1, Some(bob), "bob-pub", "bob/x", false)?;
    anyhow::ensure!(ok, "bob may write bob/#: {out}");
    // A marker after the refused ones: once it arrives, they would have too.
    publish(n0, Some(alice), "alice-pub", "sensors/marker", false)?;
    for s in [&mut local, &mut remote, &mut all] {
        assert!(s.got("sensors/marker", DEADLINE), "marker: {:?}", s.seen);
        for t in ["sensors/forged", "sensors/forged4", "sensors/secret/x"] {
            assert!(!s.got(t, Duration::ZERO), "{t} was delivered: {:?}", s.seen);
        }
    }
    assert!(
        !all.got("alerts/fire", Duration::ZERO),
        "bob's # carried alerts/fire: {:?}",
        all.seen
    );
    assert!(
        !all.got("bob/x", Duration::ZERO),
        "bob may write but not read bob/#: {:?}",
        all.seen
    );
    assert!(!denied.got("alerts/fire", Duration::ZERO));
    Ok(())
}

fn broker_config(dir: &Path, mqtt: SocketAddr) -> anyhow::Result<PathBuf> {
    let file = dir.join("mqlb.toml");
    std::fs::write(
        &file,
        format!(
            "[[broker]]\nid = \"b1\"\nmqtt = \"{mqtt}\"\n\n[auth]\npassword_file = \"{}\"\nallow_anonymous = false\n",
            dir.join("passwd").display()
        ),
    )?;
    Ok(file)
}

fn sighup(child: &Child) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -HUP: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_password_file_and_keeps_connected_clients() -> anyhow::Result<()> {
    if !installed() {
        eprintln!("SKIP: mosquitto tools not installed");
        return Ok(());
    }
    let dir = TempDir::new("mqtt-auth-hup")?;
    let pw = dir.path().join("passwd");
    passwd(&pw, true, false, "alice", "a")?;
    let mqtt = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let config = broker_config(dir.path(), mqtt)?;
    let mut child = Command::new(mqlb_bin()?)
        .args(["broker", "--id", "b1", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .spawn()?;
    wait_listening(mqtt, &mut child, DEADLINE).await?;
    let mut broker = KillOnDrop(child);

    let mut alice = Sub::start(mqtt, ("alice", "a"), "alice", "t/#", false)?;
    assert_eq!(alice.suback()?, 0x01);
    let (ok, out) = publish(mqtt, Some(("carol", "c")), "carol", "t/1", false)?;
    anyhow::ensure!(!ok, "carol is not in the file yet but got in: {out}");

    passwd(&pw, false, false, "carol", "c")?;
    sighup(&broker.0)?;
    let start = Instant::now();
    loop {
        let (ok, out) = publish(mqtt, Some(("carol", "c")), "carol", "t/2", false)?;
        if ok {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < DEADLINE,
            "carol still refused after SIGHUP: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        alice.got("t/2", DEADLINE),
        "alice, connected before the reload, still receives: {:?}",
        alice.seen
    );
    assert_eq!(alice.connacks(), 1, "alice never reconnected");

    // A malformed file on the next SIGHUP keeps the previous one; the broker keeps running.
    std::fs::write(&pw, "carol:not-a-hash\n")?;
    sighup(&broker.0)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    anyhow::ensure!(
        broker.0.try_wait()?.is_none(),
        "broker exited on a bad file"
    );
    let (ok, out) = publish(mqtt, Some(("carol", "c")), "carol", "t/3", false)?;
    anyhow::ensure!(
        ok,
        "carol refused after a bad reload (old file should stay): {out}"
    );
    assert!(alice.got("t/3", DEADLINE));
    assert_eq!(alice.connacks(), 1, "alice never reconnected");
    Ok(())
}
