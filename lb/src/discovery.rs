//! Pools whose members come from the HA server (`discovery = "haserver"`): brokers that join
//! become backends and brokers that leave (or are down) stop getting new connections, with no
//! reload. Until the HA server first answers, and whenever it does not, the pool keeps what it
//! had: the static backends, then the last membership (static stability).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use mqlb_config::{Backend, Config, MqttPorts};
use mqlb_haserver::model::{ClusterView, MemberState};
use mqlb_haserver::HaClient;
use tokio_util::sync::CancellationToken;

use crate::Lb;

/// `config` with the backends of every `discovery` pool replaced by the up members of `view`.
/// Pure: unit-tested, and applied on every reload too, so a file reload does not bring the
/// static list back.
pub fn with_members(mut config: Config, view: &ClusterView) -> Config {
    let backends: Vec<Backend> = view
        .members
        .iter()
        .filter(|m| m.state == MemberState::Up)
        .filter_map(|m| {
            let addr: SocketAddr = m.reg.mqtt.parse().ok()?;
            let v5 = m
                .reg
                .mqtt_v5
                .as_deref()
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .filter(|a| a.ip() == addr.ip())
                .map(|a| a.port());
            Some(Backend {
                id: m.reg.id.clone(),
                addr,
                weight: NonZeroU32::MIN,
                drain: false,
                mqtt_ports: MqttPorts {
                    v3: None,
                    v4: None,
                    v5,
                },
            })
        })
        .collect();
    for p in config.pools.iter_mut().filter(|p| p.discovery) {
        p.backends = backends.clone();
    }
    config
}

/// Follows the membership with long-polls and applies each change, until `stopping` fires
/// (at once: a long-poll in flight is dropped, not waited for).
pub(crate) async fn follow(lb: Lb, client: HaClient, stopping: CancellationToken) {
    let mut since = None;
    let mut failing = false;
    loop {
        let view = tokio::select! {
            _ = stopping.cancelled() => return,
            v = client.cluster(since, Duration::from_secs(20)) => v,
        };
        match view {
            Ok(view) => {
                if failing {
                    tracing::info!("HA server answers again");
                }
                failing = false;
                let changed = since != Some(view.version);
                since = Some(view.version);
                if changed {
                    let up = view
                        .members
                        .iter()
                        .filter(|m| m.state == MemberState::Up)
                        .count();
                    tracing::info!(version = view.version, up, "membership changed");
                    if let Err(e) = lb.apply_membership(view).await {
                        tracing::error!(error = %e, "membership not applied");
                    }
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "HA server unreachable; keeping the last membership");
                }
                failing = true;
                tokio::select! {
                    _ = stopping.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqlb_haserver::model::{Member, Registration};

    fn member(id: &str, port: u16, state: MemberState) -> Member {
        Member {
            reg: Registration {
                id: id.into(),
                mqtt: format!("127.0.0.1:{port}"),
                mqtt_v5: Some(format!("127.0.0.1:{}", port + 100)),
                mesh: None,
                http: None,
                pid: None,
            },
            state,
            registered_ms: 0,
            last_seen_ms: 0,
        }
    }

    #[test]
    fn discovery_pools_take_the_up_members_and_others_keep_theirs() {
        let cfg = Config::parse(
            r#"
[cluster]
secret = "0123456789abcdef-test"
[[haserver]]
id = "ha1"
listen = "127.0.0.1:8082"
[[frontend]]
name = "f"
bind = "127.0.0.1:1883"
[[frontend]]
name = "g"
bind = "127.0.0.1:1884"
[[pool]]
name = "found"
discovery = "haserver"
[[pool.backend]]
id = "seed"
addr = "127.0.0.1:9000"
[[pool]]
name = "fixed"
[[pool.backend]]
id = "x"
addr = "127.0.0.1:9001"
[[rule]]
name = "r"
frontend = "f"
pool = "found"
[[rule]]
name = "s"
frontend = "g"
pool = "fixed"
"#,
            "t",
        )
        .expect("valid");
        let view = ClusterView {
            version: 3,
            primary: None,
            members: vec![
                member("b1", 1001, MemberState::Up),
                member("b2", 1002, MemberState::Down),
            ],
        };
        let out = with_members(cfg, &view);
        let found = &out.pools[0].backends;
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, "b1");
        assert_eq!(found[0].addr_for_level(Some(5)).port(), 1101);
        assert_eq!(out.pools[1].backends[0].id, "x");
    }
}
