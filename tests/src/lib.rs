//! mqlb's integration-test harness: real brokers and a real LB on ephemeral loopback ports,
//! real MQTT clients, failure injection (kill and restart a broker), and waits with deadlines.
//! Users can drive the same harness from their own tests.

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns how long it took.
pub async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    mut cond: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback port that was free a moment ago (for processes that must be told a port).
pub fn free_port() -> anyhow::Result<u16> {
    let l = StdListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<TempDir> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mqlb-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

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

impl Mosquitto {
    pub async fn start() -> anyhow::Result<Mosquitto> {
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
                    "listener {port} 127.0.0.1\nlistener {alt_port} 127.0.0.1\n\
                     allow_anonymous true\npersistence false\nlog_dest none\n"
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
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning mosquitto")?;
        self.child = Some(child);
        let addrs = [self.addr(), self.alt_addr()];
        let up = wait_until("mosquitto to listen", Duration::from_secs(5), || async {
            for a in addrs {
                if TcpStream::connect(a).await.is_err() {
                    return false;
                }
            }
            true
        })
        .await;
        if up.is_err() {
            self.kill();
        }
        up.map(|_| ())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn alt_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.alt_port))
    }

    /// Kills the broker at once (SIGKILL): its clients see their connections reset.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Err(e) = c.kill() {
                eprintln!("killing mosquitto: {e}");
            }
            if let Err(e) = c.wait() {
                eprintln!("reaping mosquitto: {e}");
            }
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

/// A plain HTTP/1.1 request to the admin server; returns (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .context("admin server did not answer in 5 s")??;
    let text = String::from_utf8(raw).context("admin reply not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status code")?;
    Ok((status, body.to_string()))
}

/// `GET` a JSON document from the admin server.
pub async fn get_json(admin: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = http(admin, "GET", path).await?;
    if status != 200 {
        bail!("GET {path}: status {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON"))
}

/// The value of one Prometheus sample whose line starts with `series` (e.g.
/// `mqlb_connections_total{backend="b1",outcome="closed",rule="r"}`); 0 when absent.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Live connections through the LB by client ID, from `/api/connections`:
/// (client_id, backend, connection id).
pub async fn connections(admin: SocketAddr) -> anyhow::Result<Vec<(String, String, u64)>> {
    let v = get_json(admin, "/api/connections").await?;
    let arr = v.as_array().context("connections: not an array")?;
    Ok(arr
        .iter()
        .filter_map(|c| {
            Some((
                c["client_id"].as_str()?.to_string(),
                c["backend"].as_str()?.to_string(),
                c["id"].as_u64()?,
            ))
        })
        .filter(|(id, _, _)| !id.starts_with("mqlb-datapath-"))
        .collect())
}

/// A backend's state (`up`, `down`, `draining`) from `/api/backends`.
pub async fn backend_state(admin: SocketAddr, id: &str) -> anyhow::Result<String> {
    let v = get_json(admin, "/api/backends").await?;
    v.as_array()
        .and_then(|a| a.iter().find(|b| b["id"] == id))
        .and_then(|b| b["state"].as_str())
        .map(str::to_string)
        .with_context(|| format!("backend {id} not in /api/backends"))
}

/// A rumqttc client whose event loop runs in a task and reconnects on errors (as devices do).
pub struct Client {
    pub client: AsyncClient,
    pub id: String,
    connacks: Arc<AtomicUsize>,
    pubacks: Arc<AtomicUsize>,
    errors: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Client {
    /// Connects through `addr` and waits for the first CONNACK (5 s deadline).
    pub async fn connect(addr: SocketAddr, id: &str) -> anyhow::Result<Client> {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let c = Client {
            client,
            id: id.to_string(),
            connacks: Arc::default(),
            pubacks: Arc::default(),
            errors: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (connacks, pubacks, errors, stop) = (
            c.connacks.clone(),
            c.pubacks.clone(),
            c.errors.clone(),
            c.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => return,
                    ev = eventloop.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connacks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        pubacks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        errors.fetch_add(1, Ordering::SeqCst);
                        // Reconnect back-off, as a device would.
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                }
            }
        });
        let n = c.connacks.clone();
        wait_until(&format!("CONNACK for {id}"), Duration::from_secs(5), || {
            let n = n.clone();
            async move { n.load(Ordering::SeqCst) >= 1 }
        })
        .await?;
        Ok(c)
    }

    /// CONNACKs received so far (more than one means it reconnected).
    pub fn connacks(&self) -> usize {
        self.connacks.load(Ordering::SeqCst)
    }

    pub fn pubacks(&self) -> usize {
        self.pubacks.load(Ordering::SeqCst)
    }

    /// Connection errors seen by the event loop.
    pub fn errors(&self) -> usize {
        self.errors.load(Ordering::SeqCst)
    }

    pub async fn publish_qos1(&self, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .context("queueing a publish")
    }

    /// Sends DISCONNECT and stops the event loop.
    pub async fn disconnect(self) {
        if let Err(e) = self.client.disconnect().await {
            eprintln!("{}: disconnect: {e}", self.id);
        }
        // Let the event loop flush the DISCONNECT before it stops.
        let errors = self.errors.clone();
        let before = errors.load(Ordering::SeqCst);
        let flushed = wait_until("the DISCONNECT to go out", Duration::from_secs(1), || {
            let e = errors.clone();
            async move { e.load(Ordering::SeqCst) > before }
        })
        .await;
        if flushed.is_err() {
            eprintln!("{}: event loop did not close after DISCONNECT", self.id);
        }
        self.stop.cancel();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The `mqlb` binary, built on first use (CLI tests run it as a user would).
pub fn mqlb_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "--bin", "mqlb"])
            .current_dir(&root)
            .status()
            .map_err(|e| format!("running cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build --bin mqlb failed: {status}"));
        }
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        Ok(target.join("debug").join("mqlb"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}
