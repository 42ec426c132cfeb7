//! The HA server in tests: started in-process with fast membership timing, and requests to it
//! signed as brokers and the LB sign them (computed here, independently of mqlb's client).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::http::{http_with_headers, json_reply};
use crate::TEST_SECRET;

/// The headers that authenticate a request to the HA server (docs/design.md, "Security"), computed
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
    json_reply(path, ha_request(ha, "GET", path, b"").await?)
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
    start_on(id, listener, store, timing).await
}

async fn start_on(
    id: &str,
    listener: tokio::net::TcpListener,
    store: mqlb_haserver::SqliteStore,
    timing: mqlb_haserver::Timing,
) -> anyhow::Result<mqlb_haserver::HaServer> {
    let options = ha_options(timing);
    Ok(mqlb_haserver::HaServer::start(id, listener, Arc::new(store), options).await?)
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
            Ok(l) => return start_on(id, l, store, timing).await,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow::anyhow!("cannot bind {addr}: {last:?}"))
}
