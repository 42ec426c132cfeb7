//! Keeps a node's MQTT listeners answering. rumqttd 0.20 poisoned a listener for good when a
//! client whose previous CONNECT failed half-way (say, it hung up before the CONNACK) connected
//! again with the same ID (rumqtt #1062): every later CONNECT on that port panicked. mqlb builds
//! rumqttd with that fixed (`vendor/rumqttd/PATCHED.md`); this watchdog stays as the second line
//! for whatever else may stop a listener. The node checks its own listener with a real CONNECT
//! every second and, after two failures in a row, replaces the rumqttd server (a fresh one has
//! a fresh state); established connections are separate tasks and keep running. The check is a
//! well-behaved client (whole CONNACK read, DISCONNECT, orderly close), so it leaves nothing in
//! the broker's log; node start-up uses it as its readiness check too.

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqlb_mqtt::{encode_connect, ConnectOptions, ProtocolLevel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

const EVERY: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(2);

/// The user name of the check's login.
pub(crate) const SELF_CHECK_USER: &str = "mqlb-selfcheck";

/// The check's password: random, made once per process and never leaves it, so with
/// `[auth]` the node's listeners let its own check in and nobody else with this name
/// ([`crate::auth::Auth`] accepts it before the password file).
pub(crate) fn self_check_password() -> &'static str {
    static PASSWORD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PASSWORD.get_or_init(|| {
        let bytes: [u8; 32] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    })
}

/// A CONNECT for protocol `level` 4 (3.1.1) or 5, clean session, keep alive 10 s, no will,
/// with `client_id` and the check's login, written by the encoder the LB and its probe use.
fn connect_packet(level: u8, client_id: &str) -> Vec<u8> {
    encode_connect(&ConnectOptions {
        level: if level == 5 {
            ProtocolLevel::V5
        } else {
            ProtocolLevel::V311
        },
        client_id: client_id.to_string(),
        keep_alive: 10,
        clean_start: true,
        properties: Vec::new(),
        will: None,
        username: Some(SELF_CHECK_USER.to_string()),
        password: Some(self_check_password().as_bytes().to_vec()),
    })
}

/// A fresh client ID per check: a check never takes over the session of a previous one.
fn check_client_id(node: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "mqlb-selfcheck-{node}-{}",
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The largest CONNACK the check reads (rumqttd's carry a few properties).
const MAX_CONNACK: usize = 4096;

/// Reads one whole CONNACK; `true` if it accepted the connection (return/reason code 0).
async fn read_connack(s: &mut TcpStream) -> std::io::Result<bool> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    if s.read_u8().await? != 0x20 {
        return Err(bad("not a CONNACK"));
    }
    let mut len = 0usize;
    for shift in [0, 7, 14, 21] {
        let b = s.read_u8().await?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        if shift == 21 {
            return Err(bad("remaining length over four bytes"));
        }
    }
    if !(2..=MAX_CONNACK).contains(&len) {
        return Err(bad("CONNACK length out of range"));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok(body[1] == 0)
}

/// One CONNECT → CONNACK round trip against the node's own listener, ended the way a
/// well-behaved client ends it, so the broker has nothing to complain about: the whole CONNACK
/// is read (unread bytes at close make the kernel send a reset), then DISCONNECT, then our half
/// of the connection is closed and the broker's close awaited.
pub(crate) async fn self_check(target: &Target, node: &str) -> bool {
    let (addr, level) = (target.addr, target.level);
    let attempt = async {
        let mut s = TcpStream::connect(addr).await?;
        // A listener that wants a PROXY header from this source gets LOCAL: no client, the
        // socket's address stays (issue 15).
        if mqlb_config::trusts_proxy(&target.accept_proxy, s.local_addr()?.ip()) {
            s.write_all(&mqlb_config::proxy::local(mqlb_config::ProxyVersion::V2))
                .await?;
        }
        s.write_all(&connect_packet(level, &check_client_id(node)))
            .await?;
        let accepted = read_connack(&mut s).await?;
        s.write_all(&[0xe0, 0x00]).await?;
        s.shutdown().await?;
        // The broker closes after the DISCONNECT; anything it still sends is drained.
        let mut rest = [0u8; 256];
        while s.read(&mut rest).await? > 0 {}
        Ok::<_, std::io::Error>(accepted)
    };
    match tokio::time::timeout(TIMEOUT, attempt).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "self-check failed");
            false
        }
        Err(_) => {
            tracing::debug!(%addr, "self-check timed out");
            false
        }
    }
}

/// A listener the check connects to: its address, MQTT level (4 or 5) and the sources it
/// wants a PROXY header from (`broker.accept_proxy`).
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) level: u8,
    pub(crate) accept_proxy: Vec<ipnet::IpNet>,
}

/// Watches the server in `running` (made by `make`) and replaces it when it stops answering.
pub(crate) async fn watch<F, Fut, E>(
    node: String,
    target: Target,
    mut running: JoinHandle<Result<(), E>>,
    make: F,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    let addr = target.addr;
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                running.abort();
                return;
            }
            _ = tokio::time::sleep(EVERY) => {}
        }
        if self_check(&target, &node).await {
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
            Target {
                addr,
                level,
                accept_proxy: Vec::new(),
            },
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

    #[test]
    fn connect_packets_are_well_formed_whatever_the_id_length() {
        // The login: user name (2 + 14 bytes) and a 64-hex-digit password (2 + 64).
        let login = 2 + SELF_CHECK_USER.len() + 2 + 64;
        let short = connect_packet(4, "c1");
        assert_eq!(
            short[..2],
            [0x10, 14 + login as u8],
            "one-byte remaining length"
        );
        assert_eq!(short.len(), 2 + 14 + login);
        let v5 = connect_packet(5, "c1");
        assert_eq!(v5[1], 15 + login as u8, "v5 adds the empty property length");
        assert_eq!(v5[8], 5);
        // An id that takes the remaining length past 127 needs two bytes (200 + 12 + 82 = 294).
        let long = connect_packet(4, &"x".repeat(200));
        assert_eq!(long[..3], [0x10, 0xa6, 0x02]);
        assert_eq!(long.len(), 3 + 294);
        assert_eq!(long[3..13], [0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 10]);
        assert_eq!(long[13..15], [0, 200]);
        assert_eq!(long[215..217], [0, 14]);
        assert_eq!(&long[217..231], SELF_CHECK_USER.as_bytes());
        assert_eq!(&long[233..], self_check_password().as_bytes());
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
            self_check(
                &Target {
                    addr: w.addr,
                    level: 4,
                    accept_proxy: Vec::new()
                },
                "test"
            )
            .await,
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
