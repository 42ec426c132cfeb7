//! The LB's own data-path probe (Azure's "data path availability"): every probe interval, a
//! connection through each rule's frontend to a backend, as a client would make it, recorded
//! in `mqlb_data_path_up{rule}`, and graded over the last [`WINDOW`] probes into health events
//! (`events::Availability`). Its connections come from addresses registered in
//! `Shared::own_probes`, so the connection path serves them without counting them.

use std::net::SocketAddr;
use std::sync::Arc;

use mqlb_config::Distribution;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::probe;
use crate::shared::Shared;
use crate::snapshot::RuleRt;

/// Probes a rule's availability is graded over (a minute at the default 5 s interval).
const WINDOW: usize = 12;

/// Connects to a frontend from a source address registered in `own_probes` before the
/// connection exists, so the proxy knows it for the LB's own whenever it accepts it. The
/// address stays registered while the guard lives: keep it until the proxy has answered.
async fn own_connect(
    shared: &Shared,
    frontend: SocketAddr,
) -> std::io::Result<(crate::state::OwnProbeGuard, TcpStream)> {
    // A wildcard frontend is reached on loopback; the source is then the same loopback address
    // (the peer address the accept loop sees is exactly the one registered).
    let ip = match frontend.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let socket = match ip {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    let own = shared.own_probes.add(socket.local_addr()?);
    let s = socket.connect(SocketAddr::new(ip, frontend.port())).await?;
    Ok((own, s))
}

/// The data-path probe of one rule, until `stop` (it is restarted with every snapshot).
pub(crate) async fn run(
    shared: Arc<Shared>,
    rule: Arc<RuleRt>,
    frontend: SocketAddr,
    stop: CancellationToken,
) {
    let metrics = &shared.metrics;
    let gauge = metrics.data_path_up.with_label_values(&[&rule.cfg.name]);
    let probe = &rule.pool.cfg.probe;
    let client_prefix = format!("mqlb-datapath-{}", rule.cfg.name);
    let mut availability = crate::events::Availability::new(WINDOW);
    let mut ticker = tokio::time::interval(probe.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let attempt = async {
            let (_own, mut s) = own_connect(&shared, frontend).await.ok()?;
            if rule.cfg.distribution == Distribution::MqttClientId {
                // The same CONNECT → CONNACK as the mqtt probe, through the LB to a broker.
                Some(probe::mqtt_handshake(s, &client_prefix).await.is_ok())
            } else {
                // Raw TCP: the connection is accepted and closed by the proxy, which knows it
                // for the probe's (a backend gets no empty connection every interval), and the
                // rule has a backend to send to. (This task is restarted with every snapshot,
                // so `rule` is the current one.)
                let mut byte = [0u8; 1];
                let closed = matches!(s.read(&mut byte).await, Ok(0));
                Some(
                    closed
                        && rule
                            .pool
                            .members
                            .iter()
                            .any(|m| m.state.is_up() && !m.state.is_draining()),
                )
            }
        };
        let ok = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(probe.timeout, attempt) => matches!(r, Ok(Some(true))),
        };
        gauge.set(i64::from(ok));
        if let Some((kind, share)) = availability.push(ok) {
            let why = format!(
                "rule {}: {:.0} % of the last {WINDOW} probes through the frontend",
                rule.cfg.name,
                share * 100.0
            );
            tracing::warn!(rule = rule.cfg.name, event = kind.name(), "{why}");
            let pool = Some(rule.pool.cfg.name.as_str());
            shared.events.record(kind, pool, None, Some(why));
        }
    }
}
