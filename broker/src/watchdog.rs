//! Keeps a node's MQTT listeners answering. rumqttd 0.20 poisons a listener for good when a
//! client whose previous CONNECT failed half-way (say, it hung up before the CONNACK) connects
//! again with the same ID (rumqtt #1062): every later CONNECT on that port panics. The node
//! checks its own listener with a real CONNECT every second and, after two failures in a row,
//! replaces the rumqttd server (a fresh one has a fresh state); established connections are
//! separate tasks and keep running.

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
