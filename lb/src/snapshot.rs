//! The one immutable value the data path reads: pools with their members, rules by frontend.
//!
//! Built off the hot path from a validated config (and the previous snapshot, whose backend
//! state is carried over for unchanged backends), then published in a single `ArcSwap`, so
//! the set of backends and their health can never be seen torn.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus::{IntCounter, IntGauge};

use mqlb_config::{Backend, Config, Distribution, Pool, Rule};

use crate::backend::BackendState;
use crate::metrics::{Departed, Metrics};
use crate::outcome::Outcome;
use crate::select::{self, Candidate, Key};

/// A pool member: its config, the hash of its stable ID, and its live state.
#[derive(Debug)]
pub struct Member {
    pub cfg: Backend,
    pub hash: u64,
    pub state: Arc<BackendState>,
}

#[derive(Debug)]
pub struct PoolRt {
    pub cfg: Pool,
    pub members: Vec<Member>,
    rr_tick: AtomicU64,
}

impl PoolRt {
    fn candidates(&self) -> Vec<Candidate> {
        self.members
            .iter()
            .map(|m| Candidate {
                hash: m.hash,
                weight: m.cfg.weight.get(),
                active: m.state.active(),
                eligible: m.state.is_up() && !m.state.is_draining(),
            })
            .collect()
    }

    /// Eligible members, best first, for a connection with this distribution and key.
    /// `key` is what the distribution hashes on (client ID or a tuple).
    pub fn order(&self, distribution: Distribution, key: &Key<'_>) -> Vec<usize> {
        let cands = self.candidates();
        match distribution {
            Distribution::RoundRobin => {
                select::round_robin_order(self.rr_tick.fetch_add(1, Ordering::Relaxed), &cands)
            }
            Distribution::LeastConnections => select::least_connections_order(key.hash(), &cands),
            _ => select::rendezvous_order(key.hash(), &cands),
        }
    }

    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.cfg.id == id)
    }
}

#[derive(Debug)]
pub struct RuleRt {
    pub cfg: Rule,
    pub pool: Arc<PoolRt>,
    /// The connection limits of the rule's frontend, checked at accept.
    pub limits: mqlb_config::FrontendLimits,
    /// The TLS its frontend terminates: the server configuration built at load, shared by
    /// every connection; carried from the previous snapshot while the certificate, key and
    /// ALPN stay the same, so reloads keep its session ticket keys and resumed sessions.
    pub tls: Option<mqlb_config::TlsServer>,
    /// The sources its frontend takes a PROXY header from (`accept_proxy`).
    pub accept_proxy: Vec<ipnet::IpNet>,
    /// Its frontend's `tls.client_id = "cn"`: the client ID must be the client certificate's
    /// CN.
    pub client_id_is_cn: bool,
    /// Metric handles of this rule × each pool member, looked up on first use: the data path
    /// then touches its counters without hashing label values or taking the vec's lock.
    member_metrics: Vec<OnceLock<MemberMetrics>>,
    routed: OnceLock<IntCounter>,
    opened: OnceLock<IntCounter>,
    tls_handshakes: OnceLock<IntCounter>,
}

/// The metric series a connection of one rule to one backend updates.
#[derive(Debug)]
pub struct MemberMetrics {
    pub active: IntGauge,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    closed: IntCounter,
}

impl MemberMetrics {
    /// Counts a proxied connection's end; the common outcome by a cached handle.
    pub(crate) fn finish(&self, m: &Metrics, cfg: &Rule, backend: &str, outcome: Outcome) {
        if outcome == Outcome::Closed {
            self.closed.inc();
        } else {
            m.count_end(&cfg.name, backend, outcome);
        }
    }
}

impl RuleRt {
    pub fn new(cfg: Rule, pool: Arc<PoolRt>) -> RuleRt {
        RuleRt {
            member_metrics: pool.members.iter().map(|_| OnceLock::new()).collect(),
            routed: OnceLock::new(),
            opened: OnceLock::new(),
            tls_handshakes: OnceLock::new(),
            limits: mqlb_config::FrontendLimits::default(),
            tls: None,
            accept_proxy: Vec::new(),
            client_id_is_cn: false,
            cfg,
            pool,
        }
    }

    pub(crate) fn member_metrics(&self, m: &Metrics, idx: usize) -> &MemberMetrics {
        self.member_metrics[idx].get_or_init(|| {
            let (rule, backend) = (
                self.cfg.name.as_str(),
                self.pool.members[idx].cfg.id.as_str(),
            );
            MemberMetrics {
                active: m.connections_active.with_label_values(&[rule, backend]),
                bytes_in: m.bytes_total.with_label_values(&[rule, backend, "in"]),
                bytes_out: m.bytes_total.with_label_values(&[rule, backend, "out"]),
                closed: m.connections_total.with_label_values(&[
                    rule,
                    backend,
                    Outcome::Closed.label(),
                ]),
            }
        })
    }

    /// `mqlb_connections_opened_total` of the rule.
    pub(crate) fn opened(&self, m: &Metrics) -> &IntCounter {
        self.opened.get_or_init(|| {
            m.connections_opened_total
                .with_label_values(&[&self.cfg.name])
        })
    }

    /// `mqlb_tls_handshakes_total` of the rule's frontend.
    pub(crate) fn tls_handshakes(&self, m: &Metrics) -> &IntCounter {
        self.tls_handshakes.get_or_init(|| {
            m.tls_handshakes_total
                .with_label_values(&[&self.cfg.frontend])
        })
    }

    /// Whether a connection from `ip` comes through a trusted LB in front, so starts with a
    /// PROXY header.
    pub(crate) fn trusts_proxy(&self, ip: std::net::IpAddr) -> bool {
        !self.accept_proxy.is_empty() && mqlb_config::trusts_proxy(&self.accept_proxy, ip)
    }

    /// `mqlb_route_decisions_total` for the rule's own distribution (not a fallback).
    pub(crate) fn routed(&self, m: &Metrics) -> &IntCounter {
        self.routed.get_or_init(|| {
            m.route_decisions_total
                .with_label_values(&[&self.cfg.name, self.cfg.distribution.name()])
        })
    }
}

#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub pools: Vec<Arc<PoolRt>>,
    /// Rules keyed by frontend name: the accept loop of a frontend finds its rule here.
    pub rules: HashMap<String, Arc<RuleRt>>,
}

impl Snapshot {
    /// Builds a snapshot; backends present in `prev` (same pool, same ID, same addresses) keep
    /// their `BackendState`, so health, drain state and connection counts survive a reload.
    pub fn build(config: Config, prev: Option<&Snapshot>) -> Snapshot {
        let mut pools = Vec::new();
        for p in &config.pools {
            let old_pool = prev.and_then(|s| s.pool(&p.name));
            let members = p
                .backends
                .iter()
                .map(|b| {
                    let carried = old_pool
                        .and_then(|op| op.member(&b.id))
                        .filter(|m| m.cfg.addr == b.addr && m.cfg.mqtt_ports == b.mqtt_ports);
                    let state = match carried {
                        Some(m) => {
                            if m.cfg.drain != b.drain {
                                m.state.set_draining(b.drain);
                            }
                            m.state.clone()
                        }
                        None => Arc::new(BackendState::new(b.drain)),
                    };
                    Member {
                        cfg: b.clone(),
                        hash: select::backend_hash(&b.id),
                        state,
                    }
                })
                .collect();
            pools.push(Arc::new(PoolRt {
                cfg: p.clone(),
                members,
                rr_tick: AtomicU64::new(0),
            }));
        }
        let rules = config
            .rules
            .iter()
            .filter_map(|r| {
                let pool = pools.iter().find(|p| p.cfg.name == r.pool)?.clone();
                let mut rt = RuleRt::new(r.clone(), pool);
                if let Some(f) = config.frontends.iter().find(|f| f.name == r.frontend) {
                    rt.limits = f.limits;
                    rt.accept_proxy = f.accept_proxy.clone();
                    let carried = prev
                        .and_then(|s| s.rules.get(&r.frontend))
                        .and_then(|old| old.tls.clone());
                    rt.tls = f.tls.as_ref().map(|t| match carried {
                        Some(old) if old == t.server => old,
                        _ => t.server.clone(),
                    });
                    rt.client_id_is_cn = f.tls.as_ref().is_some_and(|t| t.client_id_is_cn);
                }
                Some((r.frontend.clone(), Arc::new(rt)))
            })
            .collect();
        Snapshot {
            config: Arc::new(config),
            pools,
            rules,
        }
    }

    /// The (pool, backend) and (rule, backend) label pairs of `self` that `next` no longer
    /// has: their metric series go with them, or the LB's memory grows with every member that
    /// ever came and went.
    pub fn departed(&self, next: &Snapshot) -> Departed {
        type Pairs = HashSet<(String, String)>;
        let pairs = |s: &Snapshot| -> (Pairs, Pairs) {
            let mut pools = HashSet::new();
            let mut rules = HashSet::new();
            for p in &s.pools {
                for m in &p.members {
                    pools.insert((p.cfg.name.clone(), m.cfg.id.clone()));
                }
            }
            for r in s.rules.values() {
                for m in &r.pool.members {
                    rules.insert((r.cfg.name.clone(), m.cfg.id.clone()));
                }
            }
            (pools, rules)
        };
        let (old_pools, old_rules) = pairs(self);
        let (new_pools, new_rules) = pairs(next);
        let mut d = Departed {
            pool_members: old_pools.difference(&new_pools).cloned().collect(),
            rule_members: old_rules.difference(&new_rules).cloned().collect(),
        };
        d.pool_members.sort();
        d.rule_members.sort();
        d
    }

    /// The backend states of `self` that `next` does not carry: members that left, or came
    /// back as another server (new address).
    pub(crate) fn left_behind(&self, next: &Snapshot) -> Vec<Arc<BackendState>> {
        let kept: Vec<&Arc<BackendState>> = next
            .pools
            .iter()
            .flat_map(|p| p.members.iter().map(|m| &m.state))
            .collect();
        self.pools
            .iter()
            .flat_map(|p| p.members.iter().map(|m| &m.state))
            .filter(|s| !kept.iter().any(|k| Arc::ptr_eq(k, s)))
            .cloned()
            .collect()
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<PoolRt>> {
        self.pools.iter().find(|p| p.cfg.name == name)
    }

    /// Every member with this backend ID, in any pool (IDs are per pool).
    pub fn members<'a>(
        &'a self,
        id: &'a str,
    ) -> impl Iterator<Item = (&'a Arc<PoolRt>, &'a Member)> + 'a {
        self.pools
            .iter()
            .filter_map(move |p| p.member(id).map(|m| (p, m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra_backend: &str) -> Config {
        Config::parse(
            &format!(
                r#"
[[frontend]]
name = "f"
bind = "127.0.0.1:0"
[[pool]]
name = "p"
[[pool.backend]]
id = "a"
addr = "127.0.0.1:1001"
[[pool.backend]]
id = "b"
addr = "127.0.0.1:1002"
{extra_backend}
[[rule]]
name = "r"
frontend = "f"
pool = "p"
"#
            ),
            "t",
        )
        .expect("valid")
    }

    #[test]
    fn reload_carries_state_of_unchanged_backends_only() {
        let s1 = Snapshot::build(cfg(""), None);
        let a1 = s1.pools[0].members[0].state.clone();
        a1.set_draining(true);
        a1.conn_opened();
        let s2 = Snapshot::build(
            cfg("[[pool.backend]]\nid = \"c\"\naddr = \"127.0.0.1:1003\""),
            Some(&s1),
        );
        let p = &s2.pools[0];
        assert!(Arc::ptr_eq(&p.member("a").expect("a").state, &a1));
        assert!(p.member("a").expect("a").state.is_draining());
        assert_eq!(p.member("a").expect("a").state.active(), 1);
        assert_eq!(p.member("c").expect("c").state.active(), 0);
        // Same ID, new address: a different server, fresh state.
        let moved = cfg("").config_with_addr("b", "127.0.0.1:2002");
        let s3 = Snapshot::build(moved, Some(&s2));
        assert!(!Arc::ptr_eq(
            &s3.pools[0].member("b").expect("b").state,
            &s2.pools[0].member("b").expect("b").state
        ));
        assert_eq!(s3.rules["f"].pool.members.len(), 2);
    }

    #[test]
    fn departed_members_are_those_the_next_snapshot_lacks() {
        let with_c = Snapshot::build(
            cfg("[[pool.backend]]\nid = \"c\"\naddr = \"127.0.0.1:1003\""),
            None,
        );
        let without = Snapshot::build(cfg(""), Some(&with_c));
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            with_c.departed(&without),
            Departed {
                pool_members: vec![pair("p", "c")],
                rule_members: vec![pair("r", "c")],
            }
        );
        assert_eq!(without.departed(&with_c), Departed::default());
        let left = with_c.left_behind(&without);
        assert_eq!(left.len(), 1);
        let c = &with_c.pools[0].member("c").expect("c").state;
        assert!(Arc::ptr_eq(&left[0], c));
    }

    trait WithAddr {
        fn config_with_addr(self, id: &str, addr: &str) -> Config;
    }
    impl WithAddr for Config {
        fn config_with_addr(mut self, id: &str, addr: &str) -> Config {
            for b in &mut self.pools[0].backends {
                if b.id == id {
                    b.addr = addr.parse().expect("addr");
                }
            }
            self
        }
    }

    #[test]
    fn order_skips_down_and_draining() {
        let s = Snapshot::build(
            cfg("[[pool.backend]]\nid = \"c\"\naddr = \"127.0.0.1:1003\""),
            None,
        );
        let p = &s.pools[0];
        p.members[0].state.set_draining(true);
        p.members[1]
            .state
            .observe(false, 1, 1, crate::backend::Source::Probe);
        for d in [
            Distribution::FiveTuple,
            Distribution::RoundRobin,
            Distribution::LeastConnections,
        ] {
            assert_eq!(p.order(d, &Key::ClientId("x")), vec![2], "{d:?}");
        }
    }
}
