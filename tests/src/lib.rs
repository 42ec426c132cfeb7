//! mqlb's integration-test harness: real brokers and a real LB on ephemeral loopback ports,
//! real MQTT clients, failure injection (kill and restart a broker), and waits with deadlines.
//! Users can drive the same harness from their own tests.

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod http_host;
pub mod topology;
pub mod up;
pub use topology::{Topology, TopologyFile};
pub use up::Up;

use anyhow::{bail, Context};
pub use rumqttc::QoS;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
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

/// Waits until an event counter of a client reaches `at_least`.
async fn wait_count(
    what: &str,
    counter: &AtomicUsize,
    at_least: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_until(what, timeout, || async {
        counter.load(Ordering::SeqCst) >= at_least
    })
    .await
    .map(|_| ())
}

/// A loopback port that was free a moment ago (for processes that must be told a port).
///
/// Picked below the kernel's ephemeral range: a port from `bind(0)` comes from the range that
/// outgoing connections take their source ports from, so under parallel tests another test's
/// client could take it before the child process binds it (seen as a rare `EADDRINUSE`). A
/// port is never handed out twice by one process. Falls back to `bind(0)` when the range
/// leaves no room below it.
pub fn free_port() -> anyhow::Result<u16> {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOW: u16 = 10_000;
    if ephemeral_low > LOW + 1_000 {
        let span = u64::from(ephemeral_low - LOW);
        // RandomState is seeded per instance: a cheap random source without a dependency.
        let random = std::collections::hash_map::RandomState::new();
        for attempt in 0u64..500 {
            let mut h = random.build_hasher();
            h.write_u64(attempt);
            let port = LOW + (h.finish() % span) as u16;
            let mut given = lock(&GIVEN);
            let given = given.get_or_insert_with(HashSet::new);
            if given.contains(&port) {
                continue;
            }
            if StdListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return Ok(port);
            }
        }
    }
    let l = StdListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Serves each connection accepted on a new 127.0.0.1 port with `serve`, on a thread of its
/// own (blocking I/O): a backend woken by the kernel like another process would be, not a task
/// on the caller's runtime. `serve`'s errors are printed with `name`.
pub fn serve_threads(
    name: &str,
    serve: impl Fn(std::net::TcpStream) -> anyhow::Result<()> + Send + Sync + 'static,
) -> anyhow::Result<SocketAddr> {
    let l = StdListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let serve = Arc::new(serve);
    let name = name.to_string();
    std::thread::Builder::new()
        .name(format!("{name}-accept"))
        .spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let (serve, name2) = (serve.clone(), name.clone());
                let spawned = std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || {
                        if let Err(e) = serve(s) {
                            eprintln!("{name2}: {e:#}");
                        }
                    });
                if let Err(e) = spawned {
                    eprintln!("{name}: no thread for a connection: {e}");
                }
            }
        })?;
    Ok(addr)
}

/// A backend that reads and discards everything, then answers one byte when the client
/// half-closes: the client knows every byte was received. A client that resets is not an
/// error.
pub fn discard_server() -> anyhow::Result<SocketAddr> {
    use std::io::{Read, Write};
    serve_threads("discard", |mut s| {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return Ok(()),
            }
        }
        s.write_all(b"k").context("client left before the ack")
    })
}

/// A child process killed and reaped on drop unless it has exited: a failed test or an
/// interrupted benchmark leaves no process behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            if let Err(e) = self.0.kill() {
                eprintln!("killing child {}: {e}", self.0.id());
            }
            if let Err(e) = self.0.wait() {
                eprintln!("reaping child {}: {e}", self.0.id());
            }
        }
    }
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
                     allow_anonymous true\npersistence false\nlog_dest none\nmax_queued_messages 100000\n"
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

    /// The broker's process id, while it runs (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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
    http_body(addr, method, path, b"").await
}

/// An HTTP/1.1 request with a body; returns (status, body).
pub async fn http_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    http_with_headers(addr, method, path, &[], body).await
}

/// An HTTP/1.1 request with extra headers and a body; returns (status, body).
pub async fn http_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    http_request(addr, &addr.to_string(), method, path, headers, body).await
}

/// The one HTTP/1.1 client of the harness: `Host: host` (the address connected to, except in
/// the DNS-rebinding tests), extra headers, a body; returns (status, body).
pub async fn http_request(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    // The server may refuse an oversized body before reading it all.
    if let Err(e) = s.write_all(body).await {
        eprintln!("request body cut short: {e}");
    }
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

/// The headers that authenticate a request to the HA server (DESIGN.md, "Security"), computed
/// here independently of mqlb's own client: `X-Mqlb-Time` (Unix ms), `X-Mqlb-Nonce` (unique per
/// call) and `X-Mqlb-Signature`, the hex HMAC-SHA256 with `secret` of
/// `mqlb-ha-v1\n{METHOD}\n{path?query}\n{time}\n{nonce}\n{body}`.
pub fn ha_auth_headers(
    secret: &[u8],
    method: &str,
    path: &str,
    time_ms: i64,
    body: &[u8],
) -> Vec<(String, String)> {
    use hmac::Mac;
    static NONCES: AtomicUsize = AtomicUsize::new(0);
    let nonce = format!(
        "t{}-{}",
        std::process::id(),
        NONCES.fetch_add(1, Ordering::Relaxed)
    );
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return Vec::new(), // HMAC takes keys of any length
    };
    mac.update(format!("mqlb-ha-v1\n{method}\n{path}\n{time_ms}\n{nonce}\n").as_bytes());
    mac.update(body);
    let sig: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    vec![
        ("X-Mqlb-Time".to_string(), time_ms.to_string()),
        ("X-Mqlb-Nonce".to_string(), nonce),
        ("X-Mqlb-Signature".to_string(), sig),
    ]
}

/// Now, in Unix ms (the clock the HA server's replay window uses).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A request to the HA server signed with [`TEST_SECRET`], as brokers and the LB send them.
pub async fn ha_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let headers = ha_auth_headers(TEST_SECRET.as_bytes(), method, path, unix_ms(), body);
    http_with_headers(addr, method, path, &headers, body).await
}

/// `GET` a JSON document from the HA server, signed with [`TEST_SECRET`].
pub async fn ha_get_json(ha: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = ha_request(ha, "GET", path, b"").await?;
    if status != 200 {
        bail!("GET {path}: status {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON"))
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

/// A message a test client received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// MQTT 5 user properties (empty for 3.1.1 clients).
    pub user_properties: Vec<(String, String)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A rumqttc client whose event loop runs in a task and reconnects on errors (as devices do).
pub struct Client {
    pub client: AsyncClient,
    pub id: String,
    /// Filters to subscribe again after a reconnect (clean sessions forget them), as devices do.
    subscriptions: Arc<Mutex<Vec<(String, QoS)>>>,
    received: Arc<Mutex<Vec<Msg>>>,
    subacks: Arc<AtomicUsize>,
    connacks: Arc<AtomicUsize>,
    pubacks: Arc<AtomicUsize>,
    errors: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Client {
    /// Connects through `addr` and waits for the first CONNACK (5 s deadline).
    pub async fn connect(addr: SocketAddr, id: &str) -> anyhow::Result<Client> {
        Self::connect_with_will(addr, id, None).await
    }

    /// Connects with a last will `(topic, payload)` (QoS 1, not retained).
    pub async fn connect_with_will(
        addr: SocketAddr,
        id: &str,
        will: Option<(&str, &[u8])>,
    ) -> anyhow::Result<Client> {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        if let Some((topic, payload)) = will {
            opts.set_last_will(rumqttc::LastWill::new(
                topic,
                payload.to_vec(),
                QoS::AtLeastOnce,
                false,
            ));
        }
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let c = Client {
            client,
            id: id.to_string(),
            subscriptions: Arc::default(),
            received: Arc::default(),
            subacks: Arc::default(),
            connacks: Arc::default(),
            pubacks: Arc::default(),
            errors: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (received, subacks) = (c.received.clone(), c.subacks.clone());
        let (subs, resubscriber) = (c.subscriptions.clone(), c.client.clone());
        let (connacks, pubacks, errors, stop) = (
            c.connacks.clone(),
            c.pubacks.clone(),
            c.errors.clone(),
            c.stop.clone(),
        );
        drive(eventloop, stop, move |ev| match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if connacks.fetch_add(1, Ordering::SeqCst) > 0 {
                    for (filter, qos) in lock(&subs).iter() {
                        if let Err(e) = resubscriber.try_subscribe(filter.clone(), *qos) {
                            eprintln!("resubscribing {filter}: {e}");
                        }
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                pubacks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                subacks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                lock(&received).push(Msg {
                    topic: p.topic.clone(),
                    payload: p.payload.to_vec(),
                    retain: p.retain,
                    user_properties: Vec::new(),
                });
            }
            Ok(_) => {}
            Err(_) => {
                errors.fetch_add(1, Ordering::SeqCst);
            }
        });
        wait_count(
            &format!("CONNACK for {id}"),
            &c.connacks,
            1,
            Duration::from_secs(5),
        )
        .await?;
        Ok(c)
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&self, filter: &str, qos: QoS) -> anyhow::Result<()> {
        let before = self.subacks.load(Ordering::SeqCst);
        lock(&self.subscriptions).push((filter.to_string(), qos));
        self.client.subscribe(filter, qos).await?;
        wait_count(
            &format!("SUBACK for {filter}"),
            &self.subacks,
            before + 1,
            Duration::from_secs(5),
        )
        .await
    }

    /// Messages received so far, in arrival order.
    pub fn received(&self) -> Vec<Msg> {
        lock(&self.received).clone()
    }

    pub fn received_count(&self) -> usize {
        lock(&self.received).len()
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
        let before = self.errors.load(Ordering::SeqCst);
        let flushed = wait_count(
            "the DISCONNECT to go out",
            &self.errors,
            before + 1,
            Duration::from_secs(1),
        )
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

/// The `mqlb` binary: `$MQLB_BIN` if set (a project using this harness points it at an
/// installed mqlb), else built from this workspace on first use (CLI tests run it as a user
/// would).
pub fn mqlb_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_mqlb(false))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// The release `mqlb` binary for benchmarks, built if needed (`$MQLB_BIN` overrides it too:
/// A/B runs of two builds).
pub fn mqlb_release_bin() -> anyhow::Result<PathBuf> {
    build_mqlb(true).map_err(|e| anyhow::anyhow!(e))
}

fn build_mqlb(release: bool) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("MQLB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "--bin", "mqlb"])
        .current_dir(&root);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .map_err(|e| format!("running cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build --bin mqlb failed: {status}"));
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    Ok(target
        .join(if release { "release" } else { "debug" })
        .join("mqlb"))
}

/// Waits until `addr` accepts TCP connections; fails at once if `child` exits first.
pub async fn wait_listening(
    addr: SocketAddr,
    child: &mut Child,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("process exited ({status}) before listening on {addr}");
        }
        if start.elapsed() > timeout {
            bail!("nothing listening on {addr} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A cluster of in-process broker nodes on ephemeral loopback ports, meshed with each other.
pub struct Cluster {
    nodes: Vec<Option<mqlb_broker::Node>>,
    pub specs: Vec<mqlb_broker::NodeSpec>,
}

pub const TEST_SECRET: &str = "mqlb-test-secret-0123456789";

fn cluster_specs(n: usize) -> anyhow::Result<Vec<mqlb_broker::NodeSpec>> {
    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(mqlb_config::BrokerNode {
            id: format!("n{}", i + 1),
            mqtt: addr(free_port()?),
            mqtt_v5: Some(addr(free_port()?)),
            mesh: Some(addr(free_port()?)),
            http: Some(addr(free_port()?)),
            http_token: None,
            max_connections: std::num::NonZeroU32::new(1000).context("non-zero")?,
            max_payload_size: std::num::NonZeroU32::new(1 << 20).context("non-zero")?,
            max_inflight: std::num::NonZeroU32::new(100).context("non-zero")?,
            backlog: std::num::NonZeroU32::new(1024).context("non-zero")?,
        });
    }
    Ok(nodes
        .iter()
        .map(|node| mqlb_broker::NodeSpec {
            node: node.clone(),
            peers: nodes
                .iter()
                .filter(|o| o.id != node.id)
                .filter_map(|o| Some((o.id.clone(), o.mesh?)))
                .collect(),
            mesh: Some(mqlb_broker::MeshSettings {
                secret: mqlb_config::Secret::new(TEST_SECRET),
                peer_queue: 10_000,
                reconnect_min: Duration::from_millis(50),
                reconnect_max: Duration::from_millis(500),
                max_payload: 1 << 20,
            }),
            ha: Vec::new(),
            heartbeat_interval: Duration::from_millis(200),
            auth: mqlb_config::AuthSettings::default(),
        })
        .collect())
}

impl Cluster {
    /// Starts `n` nodes and waits until every mesh link is up.
    pub async fn start(n: usize) -> anyhow::Result<Cluster> {
        Self::start_with_ha(n, &[]).await
    }

    /// Starts `n` nodes that register with the HA servers at `ha`.
    pub async fn start_with_ha(n: usize, ha: &[SocketAddr]) -> anyhow::Result<Cluster> {
        Self::start_with(n, ha, &mqlb_config::AuthSettings::default()).await
    }

    /// Starts `n` nodes with the same `[auth]` settings (password and ACL files).
    pub async fn start_with_auth(
        n: usize,
        auth: &mqlb_config::AuthSettings,
    ) -> anyhow::Result<Cluster> {
        Self::start_with(n, &[], auth).await
    }

    async fn start_with(
        n: usize,
        ha: &[SocketAddr],
        auth: &mqlb_config::AuthSettings,
    ) -> anyhow::Result<Cluster> {
        let mut last = None;
        // A port picked free may be taken before a node binds it: try again with new ports.
        for _ in 0..3 {
            let mut specs = cluster_specs(n)?;
            for s in &mut specs {
                s.ha = ha.to_vec();
                s.auth = auth.clone();
            }
            let mut nodes = Vec::new();
            for s in &specs {
                match mqlb_broker::Node::start(s.clone()).await {
                    Ok(node) => nodes.push(Some(node)),
                    Err(e) => {
                        last = Some(e);
                        break;
                    }
                }
            }
            if nodes.len() == n {
                let c = Cluster { nodes, specs };
                c.wait_meshed().await?;
                return Ok(c);
            }
        }
        Err(anyhow::anyhow!("cluster did not start: {last:?}"))
    }

    pub fn len(&self) -> usize {
        self.specs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The MQTT 3.1.1 address of node `i`.
    pub fn mqtt(&self, i: usize) -> SocketAddr {
        self.specs[i].node.mqtt
    }

    /// The MQTT 5 address of node `i`.
    pub fn mqtt_v5(&self, i: usize) -> Option<SocketAddr> {
        self.specs[i].node.mqtt_v5
    }

    pub fn node(&self, i: usize) -> Option<&mqlb_broker::Node> {
        self.nodes[i].as_ref()
    }

    /// Waits until every running node's links to every other running node are up.
    pub async fn wait_meshed(&self) -> anyhow::Result<()> {
        let running: Vec<String> = self
            .nodes
            .iter()
            .flatten()
            .map(|n| n.id().to_string())
            .collect();
        wait_until("mesh links up", Duration::from_secs(10), || async {
            self.nodes.iter().flatten().all(|n| {
                n.links()
                    .iter()
                    .all(|(peer, up)| *up || !running.contains(peer))
            })
        })
        .await
        .map(|_| ())
    }

    /// Stops node `i` like a crashed machine: every connection to it closes.
    pub async fn kill(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.stop().await;
        }
    }

    /// Drops node `i` without leaving the HA membership, like a machine that lost power.
    pub fn crash(&mut self, i: usize) {
        drop(self.nodes[i].take());
    }

    /// Starts node `i` again with the same addresses.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i).await;
        let spec = self.specs[i].clone();
        let mut last = None;
        for _ in 0..50 {
            match mqlb_broker::Node::start(spec.clone()).await {
                Ok(n) => {
                    self.nodes[i] = Some(n);
                    return Ok(());
                }
                // The old listener may linger for a moment after the stop.
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(anyhow::anyhow!("node {i} did not restart: {last:?}"))
    }
}

/// A rumqttc event loop (MQTT 3.1.1 or 5), polled by [`drive`].
trait EventSource: Send + 'static {
    type Event: Send;
    type Error: Send;
    fn next(&mut self) -> impl Future<Output = Result<Self::Event, Self::Error>> + Send;
}

impl EventSource for rumqttc::EventLoop {
    type Event = Event;
    type Error = rumqttc::ConnectionError;
    fn next(&mut self) -> impl Future<Output = Result<Event, Self::Error>> + Send {
        self.poll()
    }
}

impl EventSource for rumqttc::v5::EventLoop {
    type Event = rumqttc::v5::Event;
    type Error = rumqttc::v5::ConnectionError;
    fn next(&mut self) -> impl Future<Output = Result<Self::Event, Self::Error>> + Send {
        self.poll()
    }
}

/// Polls `events` until `stop`, handing each event or error to `on`; after an error it waits
/// 50 ms before the next poll (which reconnects), as a device would back off.
fn drive<S: EventSource>(
    mut events: S,
    stop: CancellationToken,
    mut on: impl FnMut(Result<S::Event, S::Error>) + Send + 'static,
) {
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => return,
                ev = events.next() => ev,
            };
            let failed = ev.is_err();
            on(ev);
            if failed {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    });
}

/// An MQTT 5 rumqttc client: records received messages with their user properties.
pub struct Client5 {
    pub client: rumqttc::v5::AsyncClient,
    pub id: String,
    received: Arc<Mutex<Vec<Msg>>>,
    subacks: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Client5 {
    pub async fn connect(addr: SocketAddr, id: &str) -> anyhow::Result<Client5> {
        use rumqttc::v5::mqttbytes::v5::Packet as P5;
        use rumqttc::v5::Event as E5;
        let mut opts = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, eventloop) = rumqttc::v5::AsyncClient::new(opts, 64);
        let c = Client5 {
            client,
            id: id.to_string(),
            received: Arc::default(),
            subacks: Arc::default(),
            stop: CancellationToken::new(),
        };
        let connacks = Arc::new(AtomicUsize::new(0));
        let (received, subacks, stop, acks) = (
            c.received.clone(),
            c.subacks.clone(),
            c.stop.clone(),
            connacks.clone(),
        );
        drive(eventloop, stop, move |ev| match ev {
            Ok(E5::Incoming(P5::ConnAck(_))) => {
                acks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(E5::Incoming(P5::SubAck(_))) => {
                subacks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(E5::Incoming(P5::Publish(p))) => lock(&received).push(Msg {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
                retain: p.retain,
                user_properties: p
                    .properties
                    .map(|pr| pr.user_properties)
                    .unwrap_or_default(),
            }),
            Ok(_) | Err(_) => {}
        });
        wait_count(
            &format!("MQTT 5 CONNACK for {id}"),
            &connacks,
            1,
            Duration::from_secs(5),
        )
        .await?;
        Ok(c)
    }

    pub async fn subscribe(&self, filter: &str) -> anyhow::Result<()> {
        let before = self.subacks.load(Ordering::SeqCst);
        self.client
            .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
            .await?;
        wait_count(
            &format!("SUBACK for {filter}"),
            &self.subacks,
            before + 1,
            Duration::from_secs(5),
        )
        .await
    }

    /// Publishes at QoS 1 with user properties.
    pub async fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        user_properties: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
            user_properties: user_properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        self.client
            .publish_with_properties(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.to_vec(),
                props,
            )
            .await?;
        Ok(())
    }

    pub fn received(&self) -> Vec<Msg> {
        lock(&self.received).clone()
    }
}

impl Drop for Client5 {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Membership timing fast enough for tests.
pub fn fast_ha_timing() -> mqlb_haserver::Timing {
    mqlb_haserver::Timing {
        heartbeat_interval: Duration::from_millis(200),
        member_timeout: Duration::from_millis(800),
        remove_after: Duration::from_secs(30),
        lease: Duration::from_millis(900),
    }
}

/// The HA server's options in tests: `timing`, the secret [`TEST_SECRET`], the defaults.
pub fn ha_options(timing: mqlb_haserver::Timing) -> mqlb_haserver::Options {
    mqlb_haserver::Options::new(timing, mqlb_config::Secret::new(TEST_SECRET))
}

/// Starts an HA server on an ephemeral loopback port with the SQLite file `db`, authenticating
/// requests with [`TEST_SECRET`].
pub async fn start_haserver(
    id: &str,
    db: &Path,
    timing: mqlb_haserver::Timing,
) -> anyhow::Result<mqlb_haserver::HaServer> {
    let store = mqlb_haserver::SqliteStore::open(db)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(mqlb_haserver::HaServer::start(id, listener, Arc::new(store), ha_options(timing)).await?)
}

/// Starts an HA server on a given address (a restart on the same port).
pub async fn start_haserver_at(
    id: &str,
    db: &Path,
    addr: SocketAddr,
    timing: mqlb_haserver::Timing,
) -> anyhow::Result<mqlb_haserver::HaServer> {
    let store = mqlb_haserver::SqliteStore::open(db)?;
    let mut last = None;
    for _ in 0..50 {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let options = ha_options(timing);
                return Ok(mqlb_haserver::HaServer::start(id, l, Arc::new(store), options).await?);
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow::anyhow!("cannot bind {addr}: {last:?}"))
}

/// A `mosquitto_sub -v` process whose output lines (`topic payload`) are read as they come.
pub struct MosquittoSub {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl MosquittoSub {
    /// Subscribes `filter` (QoS 1) at `addr`.
    pub fn start(addr: SocketAddr, client_id: &str, filter: &str) -> anyhow::Result<MosquittoSub> {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-i", client_id, "-t", filter, "-q", "1", "-v"])
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
        if let Err(e) = self.child.kill() {
            eprintln!("killing mosquitto_sub: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("reaping mosquitto_sub: {e}");
        }
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
    for attempt in 0..5 {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-i", client_id, "-t", topic, "-m", msg, "-q", "1"]);
        if v5 {
            cmd.args(["-V", "mqttv5"]);
        }
        if cmd.status().context("running mosquitto_pub")?.success() {
            return Ok(());
        }
        eprintln!("mosquitto_pub {topic}: attempt {attempt} failed; retrying");
        std::thread::sleep(Duration::from_millis(700));
    }
    bail!("mosquitto_pub {topic} failed 5 times")
}
