//! Keeps a node's MQTT listeners answering. rumqttd 0.20 poisoned a listener for good when a
//! client whose previous CONNECT failed half-way (say, it hung up before the CONNACK) connected
//! again with the same ID (rumqtt #1062): every later CONNECT on that port panicked. mqlb builds
//! rumqttd with that fixed (`vendor/rumqttd/PATCHED.md`); this watchdog stays as the second line
//! for whatever else may stop a listener. The node checks its own listener with a real CONNECT
//! every second and, after two failures in a row, replaces the rumqttd server (a fresh one has
//! a fresh state); established connections are separate tasks and keep running.

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

const EVERY: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(2);

/// A CONNECT for protocol `level` 4 (3.1.1) or 5 with a client ID used once.
fn connect_packet(level: u8, node: &str) -> Vec<u8> {
    static N: AtomicU64 = AtomicU64::new(0);
    let id = format!(
        "mqlb-selfcheck-{node}-{}",
        N.fetch_add(1, Ordering::Relaxed)
    );
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x02, 0x00, 0x0a];
    if level == 5 {
        body.push(0x00); // no properties
    }
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut out = vec![0x10, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

/// One CONNECT → CONNACK round trip against the node's own listener.
async fn self_check(addr: SocketAddr, level: u8, node: &str) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(&connect_packet(level, node)).await.ok()?;
        let mut first = [0u8; 1];
        s.read_exact(&mut first).await.ok()?;
        if first[0] != 0x20 {
            return Some(false);
        }
        // A polite goodbye; the check already passed.
        if let Err(e) = s.write_all(&[0xe0, 0x00]).await {
            tracing::debug!(error = %e, "self-check DISCONNECT not sent");
        }
        Some(true)
    };
    matches!(tokio::time::timeout(TIMEOUT, attempt).await, Ok(Some(true)))
}

/// Watches the server in `running` (made by `make`) and replaces it when it stops answering.
pub(crate) async fn watch<F, Fut, E>(
    node: String,
    addr: SocketAddr,
    level: u8,
    mut running: JoinHandle<Result<(), E>>,
    make: F,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                running.abort();
                return;
            }
            _ = tokio::time::sleep(EVERY) => {}
        }
        if self_check(addr, level, &node).await {
            failures = 0;
            continue;
        }
        failures += 1;
        if failures < 2 {
            continue;
        }
        tracing::warn!(node, %addr, "MQTT listener stopped answering CONNECT; replacing it");
        running.abort();
        if let Err(e) = (&mut running).await {
            tracing::debug!(error = %e, "old listener task ended");
        }
        running = tokio::spawn(make());
        metrics.listener_restarts.inc();
        failures = 0;
        // A server that cannot bind returns at once; say why.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if running.is_finished() {
            match (&mut running).await {
                Ok(Err(e)) => {
                    tracing::error!(node, %addr, error = %e, "replacement listener failed")
                }
                Ok(Ok(())) => tracing::error!(node, %addr, "replacement listener returned"),
                Err(e) => {
                    tracing::error!(node, %addr, error = %e, "replacement listener task failed")
                }
            }
            running = tokio::spawn(make());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;
    use tokio::net::TcpListener;

    /// A stand-in listener on `addr`: answers every CONNECT with a CONNACK when `healthy`,
    /// otherwise reads it and never answers (what a poisoned rumqttd listener does). Counts the
    /// CONNECTs it answered.
    async fn fake(
        addr: SocketAddr,
        healthy: bool,
        answered: Arc<AtomicUsize>,
    ) -> Result<(), std::io::Error> {
        let l = TcpListener::bind(addr).await?;
        loop {
            let (mut s, _) = l.accept().await?;
            let answered = answered.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                if s.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                if healthy {
                    answered.fetch_add(1, Ordering::Relaxed);
                    let _ = s.write_all(&[0x20, 0x02, 0x00, 0x00]).await;
                }
                // Hold the connection until the peer goes.
                let _ = s.read(&mut buf).await;
            });
        }
    }

    async fn wait_for(what: &str, deadline: Duration, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn free_addr() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    }

    /// A watchdog over a stand-in listener that answers CONNECTs or not (`healthy`); the
    /// replacements it makes answer.
    struct Watched {
        addr: SocketAddr,
        answered: Arc<AtomicUsize>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        task: JoinHandle<()>,
    }

    async fn watched(healthy: bool, level: u8) -> Watched {
        let addr = free_addr().await;
        let answered = Arc::new(AtomicUsize::new(0));
        let first = tokio::spawn(fake(addr, healthy, answered.clone()));
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let stop = CancellationToken::new();
        let make = {
            let answered = answered.clone();
            move || fake(addr, true, answered.clone())
        };
        let task = tokio::spawn(watch(
            "n1".into(),
            addr,
            level,
            first,
            make,
            metrics.clone(),
            stop.clone(),
        ));
        Watched {
            addr,
            answered,
            metrics,
            stop,
            task,
        }
    }

    #[tokio::test]
    async fn a_listener_that_stops_answering_is_replaced() {
        let w = watched(false, 4).await;
        wait_for(
            "the listener to be replaced",
            Duration::from_secs(10),
            || w.metrics.listener_restarts.get() == 1,
        )
        .await;
        // The replacement answers real CONNECTs (the watchdog's own checks among them).
        assert!(
            self_check(w.addr, 4, "test").await,
            "replacement does not answer"
        );
        assert!(w.answered.load(Ordering::Relaxed) >= 1);
        w.stop.cancel();
        w.task.await.expect("watchdog task");
    }

    #[tokio::test]
    async fn a_listener_that_answers_is_left_alone() {
        let w = watched(true, 5).await;
        // Three self-checks answered, none of them a reason to replace anything.
        wait_for("three self-checks", Duration::from_secs(10), || {
            w.answered.load(Ordering::Relaxed) >= 3
        })
        .await;
        assert_eq!(w.metrics.listener_restarts.get(), 0);
        w.stop.cancel();
        w.task.await.expect("watchdog task");
    }
}
