//! The client brokers and load balancers use to talk to the HA servers. It knows every HA
//! server, tries them in turn, follows a backup's redirect to the primary, and remembers which
//! one answered. When none answers, the caller keeps its last view (static stability). Every
//! request is signed with the cluster secret (`crate::auth`), afresh for each server tried.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use crate::auth;
use crate::model::{ClusterView, Registration};
use crate::queued::{QueuedBatch, QueuedEntry, QueuedPage};
use crate::retained::{self, RetainedBatch, RetainedEntry, RetainedPage};
use crate::sessions::{SessionBatch, SessionEntry, SessionPage};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}: {1}")]
    Io(SocketAddr, String),
    #[error("{0}: no answer within {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error("HA server answered {0}: {1}")]
    Status(u16, String),
    #[error("HA server sent invalid JSON: {0}")]
    Json(String),
    #[error("no HA server configured")]
    NoServers,
    #[error("no HA server answered: {0}")]
    AllFailed(String),
}

/// One HTTP/1.1 exchange signed with `secret`: (status, Location header, body).
pub async fn request(
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    body: Option<String>,
    secret: &[u8],
    timeout: Duration,
) -> Result<(u16, Option<String>, Bytes), ClientError> {
    request_from(addr, None, method, path, body, secret, timeout).await
}

/// A connection to `addr`, from `source` when given.
async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let Some(ip) = source else {
        return tokio::net::TcpStream::connect(addr).await;
    };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(ip, 0)).map_err(|e| {
        std::io::Error::new(e.kind(), format!("binding the source address {ip}: {e}"))
    })?;
    socket.connect(addr).await
}

/// [`request`] from the address `source` (a host with several), else the kernel's choice.
async fn request_from(
    addr: SocketAddr,
    source: Option<IpAddr>,
    method: hyper::Method,
    path: &str,
    body: Option<String>,
    secret: &[u8],
    timeout: Duration,
) -> Result<(u16, Option<String>, Bytes), ClientError> {
    let body = Bytes::from(body.unwrap_or_default());
    let time_ms = crate::now_ms();
    let nonce = auth::nonce();
    let signature = auth::sign(secret, method.as_str(), path, time_ms, &nonce, &body);
    let io_err = |e: &dyn std::fmt::Display| ClientError::Io(addr, e.to_string());
    let exchange = async {
        let stream = connect(addr, source).await.map_err(|e| io_err(&e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| io_err(&e))?;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HA client connection");
            }
        });
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(auth::TIME_HEADER, time_ms.to_string())
            .header(auth::NONCE_HEADER, nonce)
            .header(auth::SIGNATURE_HEADER, signature)
            .body(Full::new(body))
            .map_err(|e| io_err(&e))?;
        let res = sender.send_request(req).await.map_err(|e| io_err(&e))?;
        let status = res.status().as_u16();
        let location = res
            .headers()
            .get(hyper::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = res
            .into_body()
            .collect()
            .await
            .map_err(|e| io_err(&e))?
            .to_bytes();
        driver.abort();
        Ok((status, location, bytes))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(ClientError::Timeout(addr, timeout)))
}

/// `http://host:port/...` → `host:port`.
fn location_addr(location: &str) -> Option<SocketAddr> {
    location
        .strip_prefix("http://")?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// A client of a group of HA servers.
pub struct HaClient {
    servers: Vec<SocketAddr>,
    secret: mqlb_config::Secret,
    preferred: AtomicUsize,
    timeout: Duration,
    source: Option<IpAddr>,
}

impl HaClient {
    /// A client of `servers` that signs its requests with the cluster `secret`.
    pub fn new(servers: Vec<SocketAddr>, secret: mqlb_config::Secret) -> HaClient {
        HaClient {
            servers,
            secret,
            preferred: AtomicUsize::new(0),
            timeout: Duration::from_secs(2),
            source: None,
        }
    }

    /// Connects from `source` (`lb.source`), when given.
    pub fn with_source(mut self, source: Option<IpAddr>) -> HaClient {
        self.source = source;
        self
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Sends to the last server that answered first, then the others; follows one redirect.
    async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<String>,
        extra_wait: Duration,
    ) -> Result<(u16, Bytes), ClientError> {
        if self.servers.is_empty() {
            return Err(ClientError::NoServers);
        }
        let start = self.preferred.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for k in 0..self.servers.len() {
            let i = (start + k) % self.servers.len();
            let mut addr = self.servers[i];
            for _hop in 0..2 {
                match request_from(
                    addr,
                    self.source,
                    method.clone(),
                    path,
                    body.clone(),
                    self.secret.expose(),
                    self.timeout + extra_wait,
                )
                .await
                {
                    Ok((307, Some(loc), _)) => match location_addr(&loc) {
                        Some(a) => addr = a,
                        None => {
                            errors.push(format!("{addr}: bad redirect {loc:?}"));
                            break;
                        }
                    },
                    // Keep what the server said: "the disk is full" is not "try another one".
                    Ok((status, _, body)) if status >= 500 => {
                        let said: String = String::from_utf8_lossy(&body)
                            .trim()
                            .chars()
                            .take(200)
                            .collect();
                        errors.push(format!("{addr}: status {status}: {said}"));
                        break;
                    }
                    Ok((status, _, body)) => {
                        if let Some(pos) = self.servers.iter().position(|s| *s == addr) {
                            self.preferred.store(pos, Ordering::Relaxed);
                        }
                        return Ok((status, body));
                    }
                    Err(e) => {
                        errors.push(e.to_string());
                        break;
                    }
                }
            }
        }
        Err(ClientError::AllFailed(errors.join("; ")))
    }

    fn ok(status: u16, body: &Bytes) -> Result<(), ClientError> {
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(ClientError::Status(
                status,
                String::from_utf8_lossy(body).trim().to_string(),
            ))
        }
    }

    pub async fn register(&self, reg: &Registration) -> Result<(), ClientError> {
        let body = serde_json::to_string(reg).map_err(|e| ClientError::Json(e.to_string()))?;
        let (status, b) = self
            .call(
                hyper::Method::POST,
                "/api/members",
                Some(body),
                Duration::ZERO,
            )
            .await?;
        Self::ok(status, &b)
    }

    /// `Ok(false)`: the HA server does not know this member (it must register again).
    pub async fn heartbeat(&self, id: &str) -> Result<bool, ClientError> {
        let (status, b) = self
            .call(
                hyper::Method::POST,
                &format!("/api/members/{id}/heartbeat"),
                None,
                Duration::ZERO,
            )
            .await?;
        if status == 404 {
            return Ok(false);
        }
        Self::ok(status, &b).map(|()| true)
    }

    pub async fn deregister(&self, id: &str) -> Result<(), ClientError> {
        let (status, b) = self
            .call(
                hyper::Method::DELETE,
                &format!("/api/members/{id}"),
                None,
                Duration::ZERO,
            )
            .await?;
        Self::ok(status, &b)
    }

    /// Writes a batch of retained messages and clearings (the primary's, fenced like every
    /// write); returns how many the store applied (an older write of a topic is not).
    pub async fn write_retained(&self, entries: Vec<RetainedEntry>) -> Result<u64, ClientError> {
        self.write_batch("/api/retained", &RetainedBatch { entries })
            .await
    }

    /// Every stored retained message, page by page, at most `max_pages` pages (the bound of the
    /// loop: a store that kept answering "more" would otherwise hold the caller forever).
    pub async fn all_retained(&self, max_pages: usize) -> Result<Vec<RetainedEntry>, ClientError> {
        self.all_pages("/api/retained", max_pages, |p: RetainedPage| {
            (p.entries, p.next)
        })
        .await
    }

    /// Writes a batch of persistent sessions and their ends (the primary's, fenced); returns
    /// how many the store applied.
    pub async fn write_sessions(&self, entries: Vec<SessionEntry>) -> Result<u64, ClientError> {
        self.write_batch("/api/sessions", &SessionBatch { entries })
            .await
    }

    /// Every stored persistent session, at most `max_pages` pages.
    pub async fn all_sessions(&self, max_pages: usize) -> Result<Vec<SessionEntry>, ClientError> {
        self.all_pages("/api/sessions", max_pages, |p: SessionPage| {
            (p.entries, p.next)
        })
        .await
    }

    /// Writes a batch of sessions' queued messages and acknowledgements (the primary's,
    /// fenced); returns how many messages and deletions the store applied.
    pub async fn write_queued(&self, entries: Vec<QueuedEntry>) -> Result<u64, ClientError> {
        self.write_batch("/api/queued", &QueuedBatch { entries })
            .await
    }

    /// What the store holds of `client_id`'s queue (`None`: nothing).
    pub async fn queued(&self, client_id: &str) -> Result<Option<QueuedEntry>, ClientError> {
        let url = format!("/api/queued?client={}", retained::encode_after(client_id));
        let (status, b) = self
            .call(hyper::Method::GET, &url, None, Duration::ZERO)
            .await?;
        Self::ok(status, &b)?;
        let page: QueuedPage =
            serde_json::from_slice(&b).map_err(|e| ClientError::Json(e.to_string()))?;
        Ok(page.entry)
    }

    /// One page of the stored retained messages, by topic, after `after`.
    pub async fn retained_page(&self, after: Option<&str>) -> Result<RetainedPage, ClientError> {
        self.page("/api/retained", after).await
    }

    /// One page of the paged listing at `path`, the entries after `after`.
    async fn page<P: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        after: Option<&str>,
    ) -> Result<P, ClientError> {
        let url = match after {
            Some(t) => format!("{path}?after={}", retained::encode_after(t)),
            None => path.to_string(),
        };
        let (status, b) = self
            .call(hyper::Method::GET, &url, None, Duration::ZERO)
            .await?;
        Self::ok(status, &b)?;
        serde_json::from_slice(&b).map_err(|e| ClientError::Json(e.to_string()))
    }

    /// POSTs `batch` to `path`; the store's count of what it applied.
    async fn write_batch(
        &self,
        path: &str,
        batch: &impl serde::Serialize,
    ) -> Result<u64, ClientError> {
        let body = serde_json::to_string(batch).map_err(|e| ClientError::Json(e.to_string()))?;
        let (status, b) = self
            .call(hyper::Method::POST, path, Some(body), Duration::ZERO)
            .await?;
        Self::ok(status, &b)?;
        let v: serde_json::Value =
            serde_json::from_slice(&b).map_err(|e| ClientError::Json(e.to_string()))?;
        Ok(v.get("applied")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0))
    }

    /// Every entry of the paged listing at `path` (`?after=` the previous page's `next`), at
    /// most `max_pages` pages; `parts` splits a page into its entries and its `next`.
    async fn all_pages<P: serde::de::DeserializeOwned, E>(
        &self,
        path: &str,
        max_pages: usize,
        parts: impl Fn(P) -> (Vec<E>, Option<String>),
    ) -> Result<Vec<E>, ClientError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..max_pages {
            let (entries, next) = parts(self.page(path, after.as_deref()).await?);
            all.extend(entries);
            match next {
                Some(n) if Some(&n) != after.as_ref() => after = Some(n),
                _ => return Ok(all),
            }
        }
        Err(ClientError::AllFailed(format!(
            "{path}: more than {max_pages} pages"
        )))
    }

    /// The membership; with `since`, waits up to `wait` for a version after it (long-poll).
    pub async fn cluster(
        &self,
        since: Option<u64>,
        wait: Duration,
    ) -> Result<ClusterView, ClientError> {
        let path = match since {
            Some(v) => format!("/api/cluster?since={v}&wait_ms={}", wait.as_millis()),
            None => "/api/cluster".to_string(),
        };
        let (status, b) = self.call(hyper::Method::GET, &path, None, wait).await?;
        Self::ok(status, &b)?;
        serde_json::from_slice(&b).map_err(|e| ClientError::Json(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redirect_locations_parse() {
        assert_eq!(
            super::location_addr("http://127.0.0.1:8082/api/members"),
            Some("127.0.0.1:8082".parse().expect("addr"))
        );
        assert_eq!(super::location_addr("https://x/"), None);
    }
}
