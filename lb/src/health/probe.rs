//! Health probes: one task per pool member, probing every `interval` (the first at once) and
//! feeding the health state machine; plus `probe_once`, which `mqlb probe` runs by hand.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Empty;
use hyper::body::Bytes;
use mqlb_config::{PoolTls, Probe, ProbeProtocol, ProxyVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::backend::machine::Transition;
use crate::backend::{BackendState, ProbeRecord, Source};
use crate::mqtt::{encode_connect, ConnectOptions, ProtocolLevel};
use crate::shared::Shared;

/// Why a probe failed. The `label` is the `result` of `mqlb_probes_total`.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("HTTP status {0} (want 200)")]
    HttpStatus(u16),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("CONNACK refused the connection (code {0:#04x})")]
    MqttRefused(u8),
    #[error("MQTT: {0}")]
    Mqtt(String),
    #[error("TLS: {0}")]
    Tls(String),
}

impl ProbeError {
    pub fn label(&self) -> &'static str {
        match self {
            ProbeError::Timeout(_) => "timeout",
            ProbeError::Connect(_) => "connect_error",
            ProbeError::HttpStatus(_) => "bad_status",
            ProbeError::Http(_) => "http_error",
            ProbeError::MqttRefused(_) => "mqtt_refused",
            ProbeError::Mqtt(_) => "mqtt_error",
            ProbeError::Tls(_) => "tls_error",
        }
    }
}

/// Runs one probe against `target` within `timeout`.
pub async fn probe_once(
    protocol: &ProbeProtocol,
    target: SocketAddr,
    timeout: Duration,
) -> Result<(), ProbeError> {
    probe_once_via(protocol, target, timeout, Via::default()).await
}

/// How a pool reaches its members, which its probes do alike: the PROXY header its
/// connections start with, their TLS, the address they come from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Via<'a> {
    pub send_proxy: Option<ProxyVersion>,
    pub tls: Option<&'a PoolTls>,
    pub source: Option<IpAddr>,
}

impl<'a> Via<'a> {
    pub fn of(pool: &'a mqlb_config::Pool) -> Via<'a> {
        Via {
            send_proxy: pool.send_proxy,
            tls: pool.tls.as_ref(),
            source: pool.source,
        }
    }
}

/// [`probe_once`] of a member of a pool whose backends expect a PROXY header (`send_proxy`)
/// or speak TLS (`tls`), from the pool's `source`. An `mqtt`, `tls` or `mqtts` probe sends a LOCAL PROXY header first,
/// in clear before any TLS as the pool's connections do (there is no client to name; a broker
/// that demands the header would refuse the CONNECT or the handshake without it). A `tcp`
/// probe sends nothing, and an `http` one is taken to reach a health endpoint, which does not
/// speak PROXY (HAProxy's checks likewise send the header only to the traffic port). `tls`
/// and `mqtts` verify the member with the pool's `tls`, as its connections do.
pub async fn probe_once_via(
    protocol: &ProbeProtocol,
    target: SocketAddr,
    timeout: Duration,
    via: Via<'_>,
) -> Result<(), ProbeError> {
    let Via {
        send_proxy,
        tls,
        source,
    } = via;
    tokio::time::timeout(timeout, async {
        let socket =
            crate::conn::connect::socket_from(target, source).map_err(ProbeError::Connect)?;
        let mut stream = tokio::net::TcpSocket::from_std_stream(socket.into())
            .connect(target)
            .await
            .map_err(ProbeError::Connect)?;
        match protocol {
            ProbeProtocol::Tcp => Ok(()),
            ProbeProtocol::Http { path } => http(stream, target, path).await,
            ProbeProtocol::Mqtt => {
                local_header(&mut stream, send_proxy, ProbeError::Mqtt).await?;
                mqtt_handshake(stream, "mqlb-probe").await
            }
            ProbeProtocol::Tls | ProbeProtocol::Mqtts => {
                let tls = tls.ok_or_else(|| {
                    ProbeError::Tls("no TLS settings to verify the member with".into())
                })?;
                local_header(&mut stream, send_proxy, ProbeError::Tls).await?;
                let name = tls.server_name_for(target.ip());
                let session = crate::backend::tls::connect(tls.client.config(), name, stream)
                    .await
                    .map_err(|e| ProbeError::Tls(e.to_string()))?;
                match protocol {
                    ProbeProtocol::Mqtts => mqtt_handshake(session, "mqlb-probe").await,
                    _ => tls_goodbye(session).await,
                }
            }
        }
    })
    .await
    .unwrap_or(Err(ProbeError::Timeout(timeout)))
}

/// The LOCAL PROXY header of `send_proxy`, if any; a failure is reported as `fail` says.
async fn local_header(
    stream: &mut TcpStream,
    send_proxy: Option<ProxyVersion>,
    fail: fn(String) -> ProbeError,
) -> Result<(), ProbeError> {
    let Some(v) = send_proxy else { return Ok(()) };
    stream
        .write_all(&crate::proxy_protocol::local(v))
        .await
        .map_err(|e| fail(format!("PROXY header: {e}")))
}

/// Ends a `tls` probe's session: a close_notify, then the member's answer read to its end.
/// In TLS 1.3 the client's handshake is over before the server has checked the client
/// certificate, so a member that refuses the LB's (mTLS) says so only now, with an alert;
/// anything else (its close_notify, a plain close) is a member that accepted the session.
async fn tls_goodbye(
    mut session: mqlb_config::tls_stream::TlsClientStream<TcpStream>,
) -> Result<(), ProbeError> {
    if let Err(e) = session.shutdown().await {
        tracing::debug!(error = %e, "probe close_notify not sent; reading the member's answer");
    }
    let mut sink = [0u8; 256];
    // Bounded by the probe's timeout.
    loop {
        match session.read(&mut sink).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => {
                return match crate::backend::tls::TlsFail::of(e) {
                    fail @ crate::backend::tls::TlsFail::Alert(_) => {
                        Err(ProbeError::Tls(fail.to_string()))
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}

async fn http(stream: TcpStream, target: SocketAddr, path: &str) -> Result<(), ProbeError> {
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| ProbeError::Http(e.to_string()))?;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "probe HTTP connection ended");
        }
    });
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, target.to_string())
        .header(hyper::header::USER_AGENT, "mqlb-probe")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ProbeError::Http(e.to_string()))?;
    let res = sender.send_request(req).await;
    driver.abort();
    let status = res.map_err(|e| ProbeError::Http(e.to_string()))?.status();
    if status == hyper::StatusCode::OK {
        Ok(())
    } else {
        Err(ProbeError::HttpStatus(status.as_u16()))
    }
}

/// A client ID used once. A broker may keep state for an ID whose CONNECT was cut short (a
/// probe timing out), and rumqttd 0.20 then fails the next CONNECT with that ID (rumqtt #1062):
/// probes never reuse one.
fn unique_client_id(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// CONNECT (3.1.1, a one-time client ID starting with `client_prefix`) → an accepting CONNACK
/// → DISCONNECT. The `mqtt` probe and the data-path probe (through a frontend) both use it.
pub(crate) async fn mqtt_handshake(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    client_prefix: &str,
) -> Result<(), ProbeError> {
    let connect = encode_connect(&ConnectOptions {
        level: ProtocolLevel::V311,
        client_id: unique_client_id(client_prefix),
        keep_alive: 10,
        clean_start: true,
        ..ConnectOptions::default()
    });
    let io = |e: std::io::Error| ProbeError::Mqtt(e.to_string());
    stream.write_all(&connect).await.map_err(io)?;
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack).await.map_err(io)?;
    if ack[0] != 0x20 || ack[1] != 2 {
        return Err(ProbeError::Mqtt(format!(
            "expected CONNACK, got {ack:02x?}"
        )));
    }
    if ack[3] != 0 {
        return Err(ProbeError::MqttRefused(ack[3]));
    }
    // DISCONNECT, so the broker does not log an abrupt close; failure here changes nothing.
    if let Err(e) = stream.write_all(&[0xe0, 0x00]).await {
        tracing::debug!(error = %e, "probe DISCONNECT not sent");
    }
    Ok(())
}

/// The probe loop of one pool member. Stops when `stop` fires (reload or shutdown).
pub(crate) async fn run(
    shared: Arc<Shared>,
    pool: String,
    backend: String,
    target: SocketAddr,
    probe: Probe,
    state: Arc<BackendState>,
    stop: CancellationToken,
) {
    let metrics = &shared.metrics;
    let duration = metrics.probe_duration.with_label_values(&[&pool, &backend]);
    // From here on, observe_health sets it on every transition.
    metrics
        .backend_up
        .with_label_values(&[&pool, &backend])
        .set(i64::from(state.is_up()));
    // Visible at 0 before the first failure, so a rate over it (an alert) has a series.
    metrics
        .passive_failures_total
        .with_label_values(&[&pool, &backend]);
    let mut ticker = tokio::time::interval(probe.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // Read each time: a reload that sets send_proxy or source or changes tls (a rotated
        // client certificate, a new CA) keeps the probe task.
        let pool_rt = shared.snapshot.load().pool(&pool).cloned();
        let via = pool_rt
            .as_ref()
            .map_or_else(Via::default, |p| Via::of(&p.cfg));
        let started = Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = probe_once_via(&probe.protocol, target, probe.timeout, via) => r,
        };
        let took = started.elapsed();
        duration.observe(took.as_secs_f64());
        let label = result.as_ref().err().map_or("ok", ProbeError::label);
        metrics
            .probes_total
            .with_label_values(&[&pool, &backend, label])
            .inc();
        let detail = match &result {
            Ok(()) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        state.record_probe(ProbeRecord {
            ok: result.is_ok(),
            detail: detail.clone(),
            at: SystemTime::now(),
            duration: took,
        });
        let names = (pool.as_str(), backend.as_str());
        match shared.observe_health(names, &state, result.is_ok(), &probe, Source::Probe) {
            Some(Transition::WentDown) => {
                tracing::warn!(pool, backend, %target, detail, "backend down");
            }
            Some(Transition::WentUp) => tracing::info!(pool, backend, %target, "backend up"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_probe_error_label_is_listed() {
        let io = || std::io::Error::other("x");
        for e in [
            ProbeError::Timeout(Duration::ZERO),
            ProbeError::Connect(io()),
            ProbeError::HttpStatus(500),
            ProbeError::Http(String::new()),
            ProbeError::MqttRefused(5),
            ProbeError::Mqtt(String::new()),
            ProbeError::Tls(String::new()),
        ] {
            assert!(crate::metrics::PROBE_RESULTS.contains(&e.label()), "{e}");
        }
    }
}
