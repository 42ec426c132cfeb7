//! Waiting with deadlines, never sleeping a fixed time: for a condition, for a client's event
//! counter, for a process to listen.

use std::future::Future;
use std::net::SocketAddr;
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::net::TcpStream;

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
pub(crate) async fn wait_count(
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
