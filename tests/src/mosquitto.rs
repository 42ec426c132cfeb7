//! mosquitto, a broker nobody here wrote: a `mosquitto` process to put behind the LB, and the
//! `mosquitto_sub`/`mosquitto_pub` clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::process::kill_and_reap;
use crate::{free_port, loopback, wait_listening, TempDir};

/// A `mosquitto` broker process on loopback ports of its own. Killed on drop.
pub struct Mosquitto {
    /// The main listener (every MQTT version).
    pub port: u16,
    /// A second listener on the same broker, standing in for a version-specific port.
    pub alt_port: u16,
    conf: PathBuf,
    child: Option<Child>,
    _dir: Option<TempDir>,
}

pub fn mosquitto_installed() -> bool {
    Command::new("mosquitto")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The TLS of a [`Mosquitto`]'s main listener ([`Mosquitto::start_tls`]): PEM files.
pub struct MosquittoTls<'a> {
    /// The CA of client certificates (mosquitto's `cafile`, which a TLS listener needs).
    pub ca: &'a Path,
    /// The server certificate chain and its key.
    pub cert: &'a Path,
    pub key: &'a Path,
    /// Clients must show a certificate of `ca` (`require_certificate true`: mTLS).
    pub require_certificate: bool,
    /// Every CONNECT is refused (CONNACK 5, not authorized: `allow_anonymous false` with no
    /// password file): a broker whose TLS works and whose MQTT does not.
    pub refuse_connect: bool,
}

impl Mosquitto {
    pub async fn start() -> anyhow::Result<Mosquitto> {
        Self::start_conf(|port, alt_port| {
            format!(
                "listener {port} 127.0.0.1\nlistener {alt_port} 127.0.0.1\nallow_anonymous true\n"
            )
        })
        .await
    }

    /// A broker whose main listener (`port`) serves MQTT over TLS as `tls` says; the
    /// `alt_port` one stays plain.
    pub async fn start_tls(tls: &MosquittoTls<'_>) -> anyhow::Result<Mosquitto> {
        let listener = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {}\n",
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display(),
            tls.require_certificate
        );
        let anonymous = !tls.refuse_connect;
        Self::start_conf(|port, alt_port| {
            format!(
                "listener {port} 127.0.0.1\n{listener}listener {alt_port} 127.0.0.1\n\
                 allow_anonymous {anonymous}\n"
            )
        })
        .await
    }

    /// A broker with the listeners `listeners(port, alt_port)` writes, on free ports.
    async fn start_conf(listeners: impl Fn(u16, u16) -> String) -> anyhow::Result<Mosquitto> {
        if !mosquitto_installed() {
            bail!("mosquitto is not installed (apt-get install -y mosquitto mosquitto-clients)");
        }
        let dir = TempDir::new("mosquitto")?;
        let conf = dir.path().join("mosquitto.conf");
        // A port picked free may be taken before mosquitto binds it; try a few.
        for _ in 0..5 {
            let (port, alt_port) = (free_port()?, free_port()?);
            std::fs::write(
                &conf,
                format!(
                    "{}persistence false\nlog_dest none\nmax_queued_messages 100000\n",
                    listeners(port, alt_port)
                ),
            )?;
            let mut m = Mosquitto {
                port,
                alt_port,
                conf: conf.clone(),
                child: None,
                _dir: None,
            };
            if m.spawn().await.is_ok() {
                m._dir = Some(dir);
                return Ok(m);
            }
        }
        bail!("mosquitto did not start on a free port in 5 tries")
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning mosquitto")?;
        // A port taken in the meantime makes mosquitto exit: that fails at once.
        let mut up = Ok(());
        for a in [self.addr(), self.alt_addr()] {
            up = wait_listening(a, &mut child, Duration::from_secs(5)).await;
            if up.is_err() {
                break;
            }
        }
        self.child = Some(child);
        if up.is_err() {
            self.kill();
        }
        up
    }

    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    pub fn alt_addr(&self) -> SocketAddr {
        loopback(self.alt_port)
    }

    /// The broker's process id, while it runs (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the broker at once (SIGKILL): its clients see their connections reset.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c, "mosquitto");
        }
    }

    /// Starts the broker again on the same ports.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `mosquitto_sub -v` process whose output lines (`topic payload`) are read as they come.
pub struct MosquittoSub {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl MosquittoSub {
    /// Subscribes `filter` (QoS 1) at `addr`.
    pub fn start(addr: SocketAddr, client_id: &str, filter: &str) -> anyhow::Result<MosquittoSub> {
        Self::start_with(addr, client_id, filter, &[])
    }

    /// [`MosquittoSub::start`] with more of `mosquitto_sub`'s options (`-c`, `-V mqttv5`,
    /// `-x 300`, ...).
    pub fn start_with(
        addr: SocketAddr,
        client_id: &str,
        filter: &str,
        options: &[&str],
    ) -> anyhow::Result<MosquittoSub> {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-i", client_id, "-t", filter, "-q", "1", "-v"])
            .args(options)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto_sub (apt-get install -y mosquitto-clients)")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
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
        Ok(MosquittoSub { child, lines: rx })
    }

    /// Calls `ping` (which publishes to `ping_topic`) until a ping is printed: from then on the
    /// subscription is in place and nothing published later can be missed.
    pub async fn wait_subscribed(
        &mut self,
        ping_topic: &str,
        ping: impl Fn() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            ping()?;
            let deadline = Instant::now() + Duration::from_millis(300);
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                match self.lines.recv_timeout(left) {
                    Ok(l) if l.starts_with(&format!("{ping_topic} ")) => return Ok(()),
                    Ok(_) | Err(_) => {}
                }
            }
        }
        bail!("mosquitto_sub printed no ping within 15 s")
    }

    /// The next `n` lines that are not pings, waiting up to `timeout` in all.
    pub fn lines(&mut self, n: usize, ping_topic: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(&format!("{ping_topic} ")) => {}
                Ok(l) => out.push(l),
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for MosquittoSub {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child, "mosquitto_sub");
    }
}

/// `mosquitto_pub` once (QoS 1), retried like a device if the connection fails.
pub fn mosquitto_pub(
    addr: SocketAddr,
    client_id: &str,
    topic: &str,
    msg: &str,
    v5: bool,
) -> anyhow::Result<()> {
    let v5: &[&str] = if v5 { &["-V", "mqttv5"] } else { &[] };
    mosquitto_pub_with(addr, client_id, topic, msg, v5)
}

/// [`mosquitto_pub`] with more of its options (`-V mqttv5`, `--cafile ca.pem`, ...).
pub fn mosquitto_pub_with(
    addr: SocketAddr,
    client_id: &str,
    topic: &str,
    msg: &str,
    options: &[&str],
) -> anyhow::Result<()> {
    for attempt in 0..5 {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-i", client_id, "-t", topic, "-m", msg, "-q", "1"])
            .args(options);
        if cmd.status().context("running mosquitto_pub")?.success() {
            return Ok(());
        }
        eprintln!("mosquitto_pub {topic}: attempt {attempt} failed; retrying");
        std::thread::sleep(Duration::from_millis(700));
    }
    bail!("mosquitto_pub {topic} failed 5 times")
}
