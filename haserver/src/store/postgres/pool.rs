//! Connections to PostgreSQL: each opened from a socket of ours (bound to the HA server's own
//! address when told, so a host's firewall rule or partition applies to it), with a connect
//! timeout and TCP_USER_TIMEOUT and keepalives (a dead peer is noticed in about a call timeout
//! rather than the kernel's 15 minutes), and a small bounded pool of them. A failed connect
//! backs off exponentially up to [`MAX_BACKOFF`], so a database that is down costs a fast
//! refusal per call, not a connect per call.

use std::net::{IpAddr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::{Client, Connection};

use super::super::StoreError;
use crate::lock;

/// The longest wait between two connect attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// The wait after `failures` connect attempts failed in a row.
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF.saturating_mul(1 << shift).min(MAX_BACKOFF)
}

/// Where and how to connect.
pub struct Target {
    pub config: tokio_postgres::Config,
    pub host: String,
    pub port: u16,
    /// `host:port`, for errors.
    pub at: String,
    pub source: Option<IpAddr>,
    /// Bounds a connect and, as TCP_USER_TIMEOUT, data left unacknowledged.
    pub timeout: Duration,
    /// TLS to the server (`sslmode=require` with `haserver.db_ca`).
    pub tls: super::tls::Connector,
}

impl Target {
    pub fn error(&self, e: &tokio_postgres::Error) -> StoreError {
        StoreError::Postgres {
            at: self.at.clone(),
            msg: describe(e),
        }
    }

    fn io_error(&self, what: &str, e: std::io::Error) -> StoreError {
        StoreError::Postgres {
            at: self.at.clone(),
            msg: format!("{what}: {e}"),
        }
    }

    /// Opens one connection; the caller drives (or spawns) the returned `Connection`.
    pub async fn connect(
        &self,
    ) -> Result<(Client, Connection<TcpStream, super::tls::Stream>), StoreError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| self.io_error("resolving the host", e))?
            .filter(|a| self.source.is_none_or(|s| s.is_ipv4() == a.is_ipv4()))
            .collect();
        let mut last = None;
        for addr in addrs {
            match tokio::time::timeout(self.timeout, self.connect_to(addr)).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(StoreError::Timeout {
                        at: self.at.clone(),
                        after: self.timeout,
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Postgres {
            at: self.at.clone(),
            msg: "the host has no address to connect to from here".into(),
        }))
    }

    async fn connect_to(
        &self,
        addr: SocketAddr,
    ) -> Result<(Client, Connection<TcpStream, super::tls::Stream>), StoreError> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| self.io_error("opening a socket", e))?;
        if let Some(ip) = self.source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| self.io_error(&format!("binding {ip}"), e))?;
        }
        let stream = socket
            .connect(addr)
            .await
            .map_err(|e| self.io_error("connecting", e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| self.io_error("TCP_NODELAY", e))?;
        let sock = SockRef::from(&stream);
        #[cfg(target_os = "linux")]
        sock.set_tcp_user_timeout(Some(self.timeout))
            .map_err(|e| self.io_error("TCP_USER_TIMEOUT", e))?;
        let probe = (self.timeout / 3).max(Duration::from_secs(1));
        sock.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(probe)
                .with_interval(probe)
                .with_retries(3),
        )
        .map_err(|e| self.io_error("keepalive", e))?;
        self.config
            .connect_raw(stream, self.tls.clone())
            .await
            .map_err(|e| self.error(&e))
    }
}

/// A database error with what PostgreSQL said (tokio-postgres's own text is only "db error"),
/// any other with its causes.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    }
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
    last: String,
}

/// At most `size` connections, idle ones kept for the next call.
pub struct Pool {
    pub target: Arc<Target>,
    idle: Mutex<Vec<Client>>,
    permits: Semaphore,
    backoff: Mutex<Backoff>,
}

/// A connection taken from the pool. [`Conn::release`] puts it back; dropped without it (an
/// error, a call that timed out half-way) it is closed, since its state is unknown.
pub struct Conn<'a> {
    client: Client,
    pool: &'a Pool,
    _permit: SemaphorePermit<'a>,
}

impl Pool {
    pub fn new(target: Arc<Target>, size: usize) -> Pool {
        Pool {
            target,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(size.max(1)),
            backoff: Mutex::new(Backoff {
                failures: 0,
                retry_at: None,
                last: String::new(),
            }),
        }
    }

    pub async fn get(&self) -> Result<Conn<'_>, StoreError> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Postgres {
                at: self.target.at.clone(),
                msg: "the connection pool is closed".into(),
            })?;
        let idle = {
            let mut idle = lock(&self.idle);
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match idle {
            Some(c) => c,
            None => self.open().await?,
        };
        Ok(Conn {
            client,
            pool: self,
            _permit: permit,
        })
    }

    async fn open(&self) -> Result<Client, StoreError> {
        {
            let b = lock(&self.backoff);
            if let Some(at) = b.retry_at {
                let now = Instant::now();
                if now < at {
                    return Err(StoreError::Postgres {
                        at: self.target.at.clone(),
                        msg: format!("{} (reconnecting in {:?})", b.last, at - now),
                    });
                }
            }
        }
        match self.target.connect().await {
            Ok((client, connection)) => {
                let mut b = lock(&self.backoff);
                if b.failures > 0 {
                    tracing::info!(
                        at = self.target.at,
                        failures = b.failures,
                        "connected to PostgreSQL again"
                    );
                }
                *b = Backoff {
                    failures: 0,
                    retry_at: None,
                    last: String::new(),
                };
                let at = self.target.at.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(at, error = %describe(&e), "PostgreSQL connection ended");
                    }
                });
                Ok(client)
            }
            Err(e) => {
                let mut b = lock(&self.backoff);
                b.failures = b.failures.saturating_add(1);
                b.retry_at = Some(Instant::now() + backoff(b.failures));
                b.last = e.to_string();
                Err(e)
            }
        }
    }
}

impl Conn<'_> {
    pub fn release(self) {
        let Conn { client, pool, .. } = self;
        if !client.is_closed() {
            lock(&pool.idle).push(client);
        }
    }
}

impl Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_bound() {
        let waits: Vec<u64> = (1..=8).map(|f| backoff(f).as_millis() as u64).collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
