//! The small HTTP/1.1 server loop that mqlb's three HTTP endpoints share: the HA server's API,
//! the LB's admin server and a broker node's `/metrics`. Accepting backs off briefly on errors
//! instead of spinning, and every connection ends when `stop` fires.
//!
//! Hardened against clients that hold connections without using them (issue 13: 600 idle
//! connections took the HA server's descriptors and the brokers' heartbeats stopped landing):
//! request headers must arrive within `header_read_timeout` (also between keep-alive requests),
//! and at most `max_connections` are open. A connection is *idle* while no request of it is in
//! the handler; when the cap is reached, or the process is out of descriptors, the oldest idle
//! connection is closed to make room, so a client that sends its request at once is served
//! whatever the idle ones do. Only when every connection is busy is a new one closed at once.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use prometheus::{IntCounter, IntGauge};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::lock;
use crate::log_limit::LogLimiter;

/// How much a server lets its clients hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time for a request's headers to arrive, from the connection's start or the end of its
    /// previous request.
    pub header_read_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 512,
        }
    }
}

/// What the loop counts; the caller registers them (or not) in its own registry.
#[derive(Clone)]
pub struct ConnMetrics {
    pub open: IntGauge,
    /// Closed at once because every connection was busy.
    pub refused: IntCounter,
    /// Idle connections closed to make room for a new one.
    pub evicted: IntCounter,
}

impl ConnMetrics {
    /// Metrics named `{prefix}_http_connections_{open,refused_total,evicted_total}`.
    pub fn new(prefix: &str) -> Result<ConnMetrics, prometheus::Error> {
        Ok(ConnMetrics {
            open: IntGauge::new(
                format!("{prefix}_http_connections_open"),
                "HTTP connections open.",
            )?,
            refused: IntCounter::new(
                format!("{prefix}_http_connections_refused_total"),
                "HTTP connections closed at once: the connection cap was reached and none was idle.",
            )?,
            evicted: IntCounter::new(
                format!("{prefix}_http_connections_evicted_total"),
                "Idle HTTP connections closed to make room (connection cap or out of descriptors).",
            )?,
        })
    }

    pub fn register(&self, registry: &prometheus::Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.open.clone()))?;
        registry.register(Box::new(self.refused.clone()))?;
        registry.register(Box::new(self.evicted.clone()))
    }
}

/// The open connections, oldest first.
#[derive(Default)]
struct Tracker {
    conns: Mutex<BTreeMap<u64, Conn>>,
    next: AtomicU64,
}

struct Conn {
    /// Requests of this connection in the handler now.
    busy: Arc<AtomicUsize>,
    evict: CancellationToken,
}

impl Tracker {
    fn len(&self) -> usize {
        lock(&self.conns).len()
    }

    fn add(&self) -> (u64, Arc<AtomicUsize>, CancellationToken) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            busy: Arc::new(AtomicUsize::new(0)),
            evict: CancellationToken::new(),
        };
        let out = (id, conn.busy.clone(), conn.evict.clone());
        lock(&self.conns).insert(id, conn);
        out
    }

    fn remove(&self, id: u64) {
        lock(&self.conns).remove(&id);
    }

    /// Closes up to `n` of the oldest idle connections; returns how many.
    fn evict_idle(&self, n: usize) -> usize {
        let conns = lock(&self.conns);
        let mut evicted = 0;
        for c in conns.values() {
            if evicted == n {
                break;
            }
            if c.busy.load(Ordering::Acquire) == 0 && !c.evict.is_cancelled() {
                c.evict.cancel();
                evicted += 1;
            }
        }
        evicted
    }
}

/// Decrements a connection's busy count when its request leaves the handler.
struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Out of descriptors (the process's or the system's).
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24)) // ENFILE, EMFILE (Linux and the BSDs agree)
}

/// Serves `handler` on `listener` until `stop` fires, with the default [`Limits`], counting
/// its connections as `{prefix}_http_connections_*` in `registry`; `name` labels the logs.
pub async fn serve<H, F>(
    name: &'static str,
    prefix: &str,
    registry: &prometheus::Registry,
    listener: TcpListener,
    stop: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let metrics = ConnMetrics::new(prefix).and_then(|m| m.register(registry).map(|()| m));
    match metrics {
        Ok(metrics) => serve_with(name, listener, stop, Limits::default(), metrics, handler).await,
        Err(e) => tracing::error!(server = name, error = %e, "HTTP server not started"),
    }
}

/// Serves `handler` on `listener` until `stop` fires, within `limits`, counting in `metrics`.
pub async fn serve_with<H, F>(
    name: &'static str,
    listener: TcpListener,
    stop: CancellationToken,
    limits: Limits,
    metrics: ConnMetrics,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let tracker = Arc::new(Tracker::default());
    let mut refusals = LogLimiter::new(Duration::from_secs(10));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) if out_of_descriptors(&e) => {
                    // Make room: idle connections go first. Give their tasks a moment to close.
                    let n = tracker.evict_idle(16);
                    metrics.evicted.inc_by(n as u64);
                    if n == 0 {
                        if let Some(suppressed) = refusals.admit(Instant::now()) {
                            tracing::warn!(server = name, error = %e, suppressed, "accept failed: out of descriptors, no idle connection to close");
                        }
                    }
                    let pause = if n == 0 { 20 } else { 2 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(server = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        if tracker.len() >= limits.max_connections {
            if tracker.evict_idle(1) == 1 {
                metrics.evicted.inc();
            } else {
                metrics.refused.inc();
                if let Some(suppressed) = refusals.admit(Instant::now()) {
                    tracing::warn!(server = name, %peer, max = limits.max_connections, suppressed, "connection refused: every connection is busy");
                }
                drop(stream);
                continue;
            }
        }
        let (id, busy, evict) = tracker.add();
        metrics.open.inc();
        let (handler, stop, tracker, metrics) = (
            handler.clone(),
            stop.clone(),
            tracker.clone(),
            metrics.clone(),
        );
        let conn = builder.serve_connection(
            hyper_util::rt::TokioIo::new(stream),
            hyper::service::service_fn(move |req| {
                busy.fetch_add(1, Ordering::AcqRel);
                let guard = Busy(busy.clone());
                let response = handler(req);
                async move {
                    let r = response.await;
                    drop(guard);
                    Ok::<_, Infallible>(r)
                }
            }),
        );
        tokio::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!(server = name, %peer, error = %e, "HTTP connection error");
                },
                _ = stop.cancelled() => {}
                _ = evict.cancelled() => {
                    tracing::debug!(server = name, %peer, "idle connection closed to make room");
                }
            }
            tracker.remove(id);
            metrics.open.dec();
        });
    }
}

/// Why a request body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body over {0} bytes")]
    TooLarge(usize),
    #[error("body not received within {0:?}")]
    Timeout(Duration),
    #[error("body: {0}")]
    Io(String),
}

/// Reads a request body of at most `max` bytes, taking at most `timeout` (a client that sends
/// its headers and then trickles the body holds a busy connection, which is never evicted).
pub async fn read_body(body: Incoming, max: usize, timeout: Duration) -> Result<Bytes, BodyError> {
    match tokio::time::timeout(timeout, Limited::new(body, max).collect()).await {
        Err(_) => Err(BodyError::Timeout(timeout)),
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(max)),
        Ok(Err(e)) => Err(BodyError::Io(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_idle_connections_go_first_and_busy_ones_never() {
        let t = Tracker::default();
        let conns: Vec<_> = (0..4).map(|_| t.add()).collect();
        conns[0].1.fetch_add(1, Ordering::AcqRel); // the oldest is in the handler
        assert_eq!(t.evict_idle(1), 1);
        assert!(!conns[0].2.is_cancelled(), "busy: kept");
        assert!(conns[1].2.is_cancelled(), "the oldest idle one");
        assert_eq!(
            t.evict_idle(5),
            2,
            "the other idle ones, not the same one twice"
        );
        assert!(conns[2].2.is_cancelled() && conns[3].2.is_cancelled());
        assert_eq!(t.evict_idle(1), 0, "only a busy one is left");
        for (id, _, _) in &conns {
            t.remove(*id);
        }
        assert_eq!(t.len(), 0);
    }
}
