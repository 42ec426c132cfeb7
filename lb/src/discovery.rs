//! Pools whose members come from the HA server (`discovery = "haserver"`): brokers that join
//! become backends and brokers that leave (or are down) stop getting new connections, with no
//! reload. Until the HA server first answers, and whenever it does not, the pool keeps what it
//! had: the static backends, then the last membership (static stability).
//!
//! A member that leaves the membership (down or gone at the HA server: a broker that died)
//! stays listed in its pools as `down`, why `left_membership`, taking no traffic and probed no
//! more, until the pool's `remove_after` passes ([`Departures`]): `/api/backends` and
//! `mqlb_backend_up 0` show a dead broker for as long as an alert needs to see it, instead of
//! its series vanishing half a second after it died.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mqlb_config::{Backend, Config, MqttPorts};
use mqlb_ha_api::model::{ClusterView, MemberState};
use mqlb_ha_api::HaClient;
use tokio_util::sync::CancellationToken;

use crate::backend::BackendState;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// A member that left the membership, as it was when it left.
#[derive(Debug, Clone)]
struct Gone {
    backend: Backend,
    /// When it left, by the wall clock (what `/api/backends` shows) and the monotonic one
    /// (what `remove_after` counts from).
    since: SystemTime,
    at: Instant,
}

/// What one membership change did to the members that left.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub left: Vec<String>,
    pub returned: Vec<String>,
    pub removed: Vec<String>,
}

/// The members that left the membership and are still listed. Pure (the caller passes the
/// clocks); the reload executor keeps one and applies every membership through it.
#[derive(Debug, Default)]
pub struct Departures {
    /// The up members of the last membership applied; empty before the first, so the static
    /// backends a pool starts with are not kept when the first membership replaces them.
    present: Vec<Backend>,
    gone: BTreeMap<String, Gone>,
    /// When the next listed member's `remove_after` passes in some pool.
    next: Option<Instant>,
}

impl Departures {
    /// `config` with the backends of every `discovery` pool replaced by the up members of
    /// `view`, then the members that left less than the pool's `remove_after` ago; records who
    /// left, came back, or is removed at `now`. Applied on every reload too, so a file reload
    /// does not bring the static list back.
    pub fn apply(
        &mut self,
        mut config: Config,
        view: &ClusterView,
        now: Instant,
        wall: SystemTime,
    ) -> (Config, Changes) {
        let up = up_members(view);
        let mut changes = Changes::default();
        for b in &self.present {
            if !up.iter().any(|u| u.id == b.id) && !self.gone.contains_key(&b.id) {
                let gone = Gone {
                    backend: b.clone(),
                    since: wall,
                    at: now,
                };
                self.gone.insert(b.id.clone(), gone);
                changes.left.push(b.id.clone());
            }
        }
        for u in &up {
            if self.gone.remove(&u.id).is_some() {
                changes.returned.push(u.id.clone());
            }
        }
        let pools = config.pools.iter().filter(|p| p.discovery);
        let keep = pools.map(|p| p.remove_after).max().unwrap_or_default();
        self.gone.retain(|id, g| {
            let listed = now.saturating_duration_since(g.at) < keep;
            if !listed {
                changes.removed.push(id.clone());
            }
            listed
        });
        self.next = None;
        for p in config.pools.iter_mut().filter(|p| p.discovery) {
            p.backends = up.clone();
            for g in self.gone.values() {
                let until = g.at + p.remove_after;
                if until > now {
                    p.backends.push(g.backend.clone());
                    self.next = Some(self.next.map_or(until, |n| n.min(until)));
                }
            }
        }
        self.present = up;
        (config, changes)
    }

    /// When the member `id` left, if it did and is still listed.
    pub fn left_since(&self, id: &str) -> Option<SystemTime> {
        self.gone.get(id).map(|g| g.since)
    }

    /// When a listed member is next due for removal: the membership is applied again then.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.next
    }

    /// Marks the members of `snap`'s discovery pools that left as down (`mqlb_backend_up 0`)
    /// and the others as back: after every snapshot swap, since a member's state is carried
    /// from one snapshot to the next. Returns the states that left just now: still listed,
    /// so not left behind by the snapshot, they are down for their live connections all the
    /// same.
    pub(crate) fn mark(&self, snap: &Snapshot, metrics: &Metrics) -> Vec<Arc<BackendState>> {
        let mut left = Vec::new();
        for pool in snap.pools.iter().filter(|p| p.cfg.discovery) {
            for m in &pool.members {
                match self.left_since(&m.cfg.id) {
                    Some(since) => {
                        if m.state.leave(since) {
                            left.push(m.state.clone());
                        }
                        metrics
                            .backend_up
                            .with_label_values(&[&pool.cfg.name, &m.cfg.id])
                            .set(0);
                    }
                    None => m.state.rejoin(),
                }
            }
        }
        left
    }
}

/// The up members of `view` as backends.
fn up_members(view: &ClusterView) -> Vec<Backend> {
    view.members
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
        .collect()
}

/// What following the membership changes in the LB. `Lb` implements it (lb.rs); a trait, so
/// that this module, which the facade imports, does not import the facade back.
pub(crate) trait Membership: Send + Sync + 'static {
    type Error: std::fmt::Display;
    /// Applies a new membership view.
    fn apply_membership(
        &self,
        view: ClusterView,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Applies the last view again, so that the members whose `remove_after` passed go.
    fn expire_departures(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// When a member that left is next due for removal.
    fn next_departure(&self) -> impl Future<Output = Option<Instant>> + Send;
}

/// Follows the membership with long-polls and applies each change, until `stopping` fires
/// (at once: a long-poll in flight is dropped, not waited for).
pub(crate) async fn follow(lb: impl Membership, client: HaClient, stopping: CancellationToken) {
    let mut since = None;
    let mut failing = false;
    loop {
        let expiry = lb.next_departure().await;
        let view = tokio::select! {
            _ = stopping.cancelled() => return,
            v = client.cluster(since, Duration::from_secs(20)) => v,
            // A member that left is due for removal: the poll is asked again after.
            _ = sleep_until(expiry), if expiry.is_some() => {
                if let Err(e) = lb.expire_departures().await {
                    tracing::error!(error = %e, "departed members not removed");
                }
                continue;
            }
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

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqlb_ha_api::model::{Member, Registration};

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
        let now = Instant::now();
        let (out, _) = Departures::default().apply(cfg, &view, now, SystemTime::now());
        let found = &out.pools[0].backends;
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, "b1");
        assert_eq!(found[0].addr_for_level(Some(5)).port(), 1101);
        assert_eq!(out.pools[1].backends[0].id, "x");
    }
}

#[cfg(test)]
mod departures {
    use super::*;
    use mqlb_ha_api::model::{Member, Registration};

    fn view(version: u64, members: &[(&str, MemberState)]) -> ClusterView {
        let members = members
            .iter()
            .enumerate()
            .map(|(i, (id, state))| Member {
                reg: Registration {
                    id: id.to_string(),
                    mqtt: format!("127.0.0.1:{}", 2000 + i),
                    mqtt_v5: None,
                    mesh: None,
                    http: None,
                    pid: None,
                },
                state: *state,
                registered_ms: 0,
                last_seen_ms: 0,
            })
            .collect();
        ClusterView {
            version,
            primary: None,
            members,
        }
    }

    fn cfg() -> Config {
        Config::parse(
            r#"
[cluster]
secret = "0123456789abcdef-test"
[[haserver]]
id = "ha1"
listen = "127.0.0.1:8082"
[[frontend]]
name = "f"
bind = "127.0.0.1:1883"
[[pool]]
name = "found"
discovery = "haserver"
remove_after = "60s"
[[pool.backend]]
id = "seed"
addr = "127.0.0.1:9000"
[[rule]]
name = "r"
frontend = "f"
pool = "found"
"#,
            "t",
        )
        .expect("valid")
    }

    fn ids(c: &Config) -> Vec<&str> {
        c.pools[0].backends.iter().map(|b| b.id.as_str()).collect()
    }

    use MemberState::{Down, Up};

    #[test]
    fn a_member_that_leaves_is_listed_until_remove_after() {
        let mut d = Departures::default();
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(5000);
        let (c, ch) = d.apply(cfg(), &view(1, &[("b1", Up), ("b2", Up)]), t0, wall);
        assert_eq!(ids(&c), ["b1", "b2"], "the seed is not kept");
        assert_eq!(ch, Changes::default());
        // b2 dies: down at the HA server, then removed there; both are "left".
        let t1 = t0 + Duration::from_secs(1);
        let (c, ch) = d.apply(cfg(), &view(2, &[("b1", Up), ("b2", Down)]), t1, wall);
        assert_eq!(ids(&c), ["b1", "b2"]);
        assert_eq!(ch.left, ["b2"]);
        assert_eq!(d.left_since("b2"), Some(wall));
        assert_eq!(d.next_expiry(), Some(t1 + Duration::from_secs(60)));
        let t2 = t0 + Duration::from_secs(30);
        let (c, ch) = d.apply(cfg(), &view(3, &[("b1", Up)]), t2, SystemTime::now());
        assert_eq!(ids(&c), ["b1", "b2"], "still listed");
        assert_eq!(ch, Changes::default(), "it left once");
        assert_eq!(d.left_since("b2"), Some(wall), "since when it first left");
        let t3 = t1 + Duration::from_secs(60);
        let (c, ch) = d.apply(cfg(), &view(3, &[("b1", Up)]), t3, SystemTime::now());
        assert_eq!(ids(&c), ["b1"]);
        assert_eq!(ch.removed, ["b2"]);
        assert_eq!(d.left_since("b2"), None);
        assert_eq!(d.next_expiry(), None);
    }

    #[test]
    fn a_member_that_comes_back_is_no_longer_departed() {
        let mut d = Departures::default();
        let t0 = Instant::now();
        let wall = SystemTime::now();
        d.apply(cfg(), &view(1, &[("b1", Up), ("b2", Up)]), t0, wall);
        d.apply(cfg(), &view(2, &[("b1", Up)]), t0, wall);
        let (c, ch) = d.apply(cfg(), &view(3, &[("b2", Up), ("b1", Up)]), t0, wall);
        assert_eq!(ch.returned, ["b2"]);
        assert_eq!(ids(&c), ["b2", "b1"]);
        assert_eq!(d.left_since("b2"), None);
        // Everyone leaving leaves them all listed.
        let (c, ch) = d.apply(cfg(), &view(4, &[]), t0, wall);
        assert_eq!(ch.left.len(), 2);
        assert_eq!(ids(&c), ["b1", "b2"]);
    }
}
