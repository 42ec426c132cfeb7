//! `$share/{ShareName}/{filter}` across the cluster (issue 12): each message to one member of
//! the group across all nodes (MQTT-4.8.2), and the share of a member on a dead node goes to
//! the others.
//!
//! Every publish reaches every node (the mesh forwards each local publish to every peer), so
//! every node's router reads every message of a group. Each node tells its peers which groups
//! it has local members for (`Frame::ShareGroups`, the whole list, when a link comes up and on
//! every change); for each message of a group, every node computes the same winner among the
//! nodes that have members — highest `hash(group, topic, payload, node id)` (rendezvous
//! hashing, as the LB's `select`) — and only the winner's router delivers it, to one of its
//! local members (rumqttd's strategy, round robin by default). Per message rather than per
//! group, so every node with members takes a share, about equal, and a node that leaves moves
//! only its own share (the other messages keep their node).
//!
//! What views that differ for a moment cost (a view changes with a peer's SHARE_GROUPS and
//! when the link that carried them closes):
//! - a node gets its first member of a group: until its peers have its SHARE_GROUPS (one mesh
//!   hop), it takes its share and so do they: those messages are delivered twice (QoS 1 is at
//!   least once; QoS 2 too, across nodes). A peer counts it only for messages that reached the
//!   peer's router after it learned of the members (`decide`): a message it reads late (a slow
//!   member's backlog) is not left to a node that never had it in its group. The new node's
//!   own publishes cannot overtake the list: it is sent after what the node queued for the
//!   peer before it (its router had each of them after that), and the peer applies a list
//!   that adds a group once its router has what came before it on the link (`Share::adds`,
//!   at most a second of waiting), else a message published on the new node just before its
//!   member came (a restored session, its first, in a failover under load) reached the
//!   peer's router after the list and neither node delivered it. (A message of a third node
//!   that reaches a peer after the SHARE_GROUPS but reached the new node before its
//!   SUBSCRIBE, a path slower than two hops, is still lost.)
//! - a node loses its last member (UNSUBSCRIBE, disconnect): until its peers have the new
//!   list, they skip its share, which it no longer has anyone for: lost, for one mesh hop.
//! - a node dies or its link breaks: its share of what was published until its peers notice
//!   the link is gone (at once for a closed socket; a silent machine is noticed only when TCP
//!   gives up) is not lost when its members are persistent sessions: the peers' replicas keep
//!   what it served and its members had not acknowledged, and give it to the first of them to
//!   come back (`crate::replica`); a member that never comes back keeps it until its expiry.
//! - a one-way link failure (a peer still hears from this node, not the other way): this node
//!   serves the peer's share too: duplicates, not losses, until the link is back.
//! - identical messages (same topic and payload) hash alike: they go to the same node.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};
use tokio::sync::watch;

use crate::mesh::frame::{valid_share_group, MAX_SHARE_GROUPS, MAX_SHARE_GROUPS_BYTES};
use crate::metrics::Metrics;

/// Groups, each with the moment this node learned that it has members there.
type Groups = BTreeMap<String, Instant>;

#[derive(Default)]
struct State {
    /// Groups this node's router has members of.
    local: Groups,
    /// Per peer: the link that carried its list, and its groups.
    peers: HashMap<String, (u64, Groups)>,
}

pub(crate) struct Share {
    id: String,
    id_hash: u64,
    state: RwLock<State>,
    /// The list this node advertises, read by each outbound link.
    advertised: watch::Sender<Arc<Vec<String>>>,
    next_link: AtomicU64,
    groups: IntGaugeVec,
    decisions: IntCounterVec,
    not_advertised: IntGauge,
}

impl Share {
    pub(crate) fn new(id: &str, metrics: &Metrics) -> Result<Share, prometheus::Error> {
        let groups = IntGaugeVec::new(
            Opts::new(
                "mqlb_share_groups",
                "Shared subscriptions ($share/{ShareName}/{filter}) a node has members of, as this node knows it, by node (this node's own too).",
            ),
            &["node"],
        )?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "mqlb_share_messages_total",
                "Messages of a shared subscription this node's router read, by decision: served (delivered to a member here) or skipped (another node with members takes it).",
            ),
            &["decision"],
        )?;
        let not_advertised = IntGauge::new(
            "mqlb_share_groups_not_advertised",
            "Shared groups with members here left out of the list sent to the peers (beyond 4096 groups or 64 KiB of names, or a name over 1024 bytes): the peers serve them as if this node had none, so their messages may be delivered twice.",
        )?;
        metrics.register(Box::new(groups.clone()))?;
        metrics.register(Box::new(decisions.clone()))?;
        metrics.register(Box::new(not_advertised.clone()))?;
        groups.with_label_values(&[id]).set(0);
        Ok(Share {
            id: id.to_string(),
            id_hash: node_hash(id),
            state: RwLock::new(State::default()),
            advertised: watch::channel(Arc::new(Vec::new())).0,
            next_link: AtomicU64::new(1),
            groups,
            decisions,
            not_advertised,
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The list to advertise: follows every change (an outbound link sends it when it comes
    /// up and whenever it changes).
    pub(crate) fn advertised(&self) -> watch::Receiver<Arc<Vec<String>>> {
        self.advertised.subscribe()
    }

    /// A number for an inbound link, so that its end forgets only what it carried.
    pub(crate) fn link(&self) -> u64 {
        self.next_link.fetch_add(1, Ordering::Relaxed)
    }

    /// `peer`'s whole list, received on inbound link `link` (the frame checked the bounds).
    pub(crate) fn on_peer(&self, peer: &str, link: u64, groups: Vec<String>) {
        let now = Instant::now();
        let mut s = self.write();
        let known = s.peers.get(peer).map(|(_, g)| g);
        // A group still listed keeps the moment it was first learned.
        let groups: Groups = groups
            .into_iter()
            .map(|g| {
                let since = known.and_then(|k| k.get(&g)).copied().unwrap_or(now);
                (g, since)
            })
            .collect();
        self.groups
            .with_label_values(&[peer])
            .set(groups.len() as i64);
        s.peers.insert(peer.to_string(), (link, groups));
    }

    /// Whether `groups`, a new list of `peer`'s, names a group this node did not know `peer`
    /// has members of (the link then first lets the router take what came before it).
    pub(crate) fn adds(&self, peer: &str, groups: &[String]) -> bool {
        let s = self.read();
        let known = s.peers.get(peer).map(|(_, g)| g);
        groups
            .iter()
            .any(|g| known.is_none_or(|k| !k.contains_key(g)))
    }

    /// Inbound link `link` from `peer` closed: what it said is no longer known (unless a newer
    /// link from the same peer has said something since).
    pub(crate) fn link_closed(&self, peer: &str, link: u64) {
        let mut s = self.write();
        if s.peers.get(peer).is_some_and(|(l, _)| *l == link) {
            s.peers.remove(peer);
            self.groups.with_label_values(&[peer]).set(0);
        }
    }

    /// Whether this node delivers the message `(topic, payload)` of `group`, which reached it
    /// at `arrived`.
    ///
    /// The candidates are the nodes known to have members when the message arrived: a node
    /// whose members came later did not take the message into its group (its cursor starts
    /// at the SUBSCRIBE), so a message read late here (a slow member's backlog) is not left to
    /// it. If no node was known by then (this node's member came back with an older cursor),
    /// all those with members now are.
    fn decide(&self, group: &str, topic: &[u8], payload: &[u8], arrived: Instant) -> bool {
        // The router asks only for groups it has members of; were the view late, delivering
        // is the safe side (this node missing counts as a member "since ever").
        self.winner(group, topic, payload, arrived, true, |w| {
            w == Some(&self.id)
        })
    }

    /// Whether `node` serves this message of `group` as this node sees it now: the node that
    /// replicates a session of `node`'s members keeps the messages `node` delivers to them
    /// (issue 12, `crate::replica`).
    pub(crate) fn serves_node(
        &self,
        node: &str,
        group: &str,
        topic: &[u8],
        payload: &[u8],
    ) -> bool {
        self.winner(group, topic, payload, Instant::now(), false, |w| {
            w == Some(node)
        })
    }

    /// Gives `f` the node that serves the message (see [`Share::decide`]); `self_always`: this
    /// node is a candidate even without members in the group.
    fn winner<R>(
        &self,
        group: &str,
        topic: &[u8],
        payload: &[u8],
        arrived: Instant,
        self_always: bool,
        f: impl FnOnce(Option<&str>) -> R,
    ) -> R {
        let s = self.read();
        let key = message_hash(group, topic, payload);
        let own = match (s.local.get(group).copied(), self_always) {
            (Some(since), _) => Some(since),
            (None, true) => Some(arrived),
            (None, false) => None,
        };
        let peers = s
            .peers
            .iter()
            .filter_map(|(peer, (_, groups))| Some((peer.as_str(), *groups.get(group)?)));
        let all = own.map(|o| (self.id.as_str(), o)).into_iter().chain(peers);
        let mut best: Option<(u64, &str)> = None;
        let mut best_now: Option<(u64, &str)> = None;
        for (node, since) in all {
            let h = if node == self.id {
                self.id_hash
            } else {
                node_hash(node)
            };
            let c = Some((score(key, h), node));
            if since <= arrived && c > best {
                best = c;
            }
            if c > best_now {
                best_now = c;
            }
        }
        f(best.or(best_now).map(|(_, n)| n))
    }
}

impl rumqttd::SharedGroupPolicy for Share {
    fn group_changed(&self, group: &str, has_members: bool) {
        let list = {
            let mut s = self.write();
            if has_members {
                s.local.insert(group.to_string(), Instant::now());
            } else {
                s.local.remove(group);
            }
            self.groups
                .with_label_values(&[&self.id])
                .set(s.local.len() as i64);
            let mut bytes = 0;
            let list: Vec<String> = s
                .local
                .keys()
                .filter(|g| valid_share_group(g))
                .take_while(|g| {
                    bytes += g.len();
                    bytes <= MAX_SHARE_GROUPS_BYTES
                })
                .take(MAX_SHARE_GROUPS)
                .cloned()
                .collect();
            let left_out = s.local.len() - list.len();
            if left_out > 0 && has_members && !list.iter().any(|g| g == group) {
                tracing::warn!(
                    group,
                    "shared group not advertised to the peers (over the bound)"
                );
            }
            self.not_advertised.set(left_out as i64);
            list
        };
        self.advertised.send_replace(Arc::new(list));
    }

    fn serves(&self, group: &str, publish: &rumqttd::protocol::Publish, arrived: Instant) -> bool {
        let served = self.decide(group, &publish.topic, &publish.payload, arrived);
        let decision = if served { "served" } else { "skipped" };
        self.decisions.with_label_values(&[decision]).inc();
        served
    }
}

// FNV-1a and a 64-bit finalizer, spelled out (as the LB's `select`) so that every node, of
// any build, computes the same order.
fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn node_hash(id: &str) -> u64 {
    mix64(fnv1a(FNV_OFFSET, id.as_bytes()))
}

fn message_hash(group: &str, topic: &[u8], payload: &[u8]) -> u64 {
    // Lengths between the parts: ("ab", "c") and ("a", "bc") differ.
    let mut h = fnv1a(FNV_OFFSET, &(group.len() as u64).to_be_bytes());
    h = fnv1a(h, group.as_bytes());
    h = fnv1a(h, &(topic.len() as u64).to_be_bytes());
    h = fnv1a(h, topic);
    mix64(fnv1a(h, payload))
}

fn score(key: u64, node: u64) -> u64 {
    mix64(key ^ node.rotate_left(17))
}

/// The rendezvous score of node `node` for `key` (the same on every node): the session
/// replicas rank their holders with it, as the shared groups rank their servers.
pub(crate) fn rendezvous(key: u64, node: &str) -> u64 {
    score(key, node_hash(node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::SharedGroupPolicy;

    fn share(id: &str) -> Share {
        Share::new(id, &Metrics::new().expect("metrics")).expect("share")
    }

    fn servers(nodes: &[&Share], group: &str, payload: &[u8]) -> Vec<String> {
        nodes
            .iter()
            .filter(|n| n.decide(group, b"t", payload, Instant::now()))
            .map(|n| n.id.clone())
            .collect()
    }

    /// Three nodes that see the same membership: each message served by exactly one of those
    /// with members, all of them get a share; one leaving moves only its own share.
    #[test]
    fn one_node_serves_each_message_and_a_leaver_moves_only_its_share() {
        let (a, b, c) = (share("n1"), share("n2"), share("n3"));
        for n in [&a, &b, &c] {
            n.group_changed("g/t", true);
        }
        let all = ["n1", "n2", "n3"];
        for n in [&a, &b, &c] {
            for (i, p) in all.iter().enumerate() {
                if *p != n.id {
                    n.on_peer(p, i as u64, vec!["g/t".into()]);
                }
            }
        }
        let mut counts = HashMap::new();
        let mut before = Vec::new();
        for i in 0..3000 {
            let s = servers(&[&a, &b, &c], "g/t", format!("m{i}").as_bytes());
            assert_eq!(s.len(), 1, "message {i}: {s:?}");
            *counts.entry(s[0].clone()).or_insert(0) += 1;
            before.push(s[0].clone());
        }
        for n in all {
            let got = counts.get(n).copied().unwrap_or(0);
            assert!((800..1200).contains(&got), "{n}: {got} of 3000");
        }
        // n2's link closes at n1 and n3 (n2 gone): its share moves, nothing else does.
        a.link_closed("n2", 1);
        c.link_closed("n2", 1);
        for (i, was) in before.iter().enumerate() {
            let s = servers(&[&a, &c], "g/t", format!("m{i}").as_bytes());
            assert_eq!(s.len(), 1, "message {i}: {s:?}");
            if was != "n2" {
                assert_eq!(&s[0], was, "message {i} moved");
            }
        }
    }

    #[test]
    fn only_the_link_that_said_it_unsays_it() {
        let a = share("n1");
        a.group_changed("g/t", true);
        a.on_peer("n2", 1, vec!["g/t".into()]);
        // A new link from n2 said it again before the old one's end was noticed.
        a.on_peer("n2", 2, vec!["g/t".into()]);
        a.link_closed("n2", 1);
        assert!(a.read().peers.contains_key("n2"));
        a.link_closed("n2", 2);
        assert!(a.read().peers.is_empty());
        // Alone, n1 serves everything.
        let now = Instant::now();
        assert!((0..100).all(|i| a.decide("g/t", b"t", format!("{i}").as_bytes(), now)));
    }

    #[test]
    fn the_advertised_list_follows_the_local_groups() {
        let a = share("n1");
        let rx = a.advertised();
        a.group_changed("g/t", true);
        a.group_changed("h/x/#", true);
        assert_eq!(**rx.borrow(), vec!["g/t".to_string(), "h/x/#".to_string()]);
        a.group_changed("g/t", false);
        assert_eq!(**rx.borrow(), vec!["h/x/#".to_string()]);
        // Other groups than the message's do not count.
        a.on_peer("n2", 1, vec!["other/t".into()]);
        let now = Instant::now();
        assert!((0..100).all(|i| a.decide("h/x/#", b"x/1", format!("{i}").as_bytes(), now)));
    }

    /// A message that arrived before a peer's members were known is not left to that peer
    /// (it never had it in its group); one that arrived after is shared with it.
    #[test]
    fn a_peer_takes_only_messages_that_arrived_after_its_members() {
        let a = share("n1");
        a.group_changed("g/t", true);
        let before = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        a.on_peer("n2", 1, vec!["g/t".into()]);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let after = Instant::now();
        let old = (0..200).filter(|i| a.decide("g/t", b"t", format!("{i}").as_bytes(), before));
        assert_eq!(
            old.count(),
            200,
            "n1 serves all that came before n2's members"
        );
        let new = (0..200).filter(|i| a.decide("g/t", b"t", format!("{i}").as_bytes(), after));
        let n = new.count();
        assert!((50..150).contains(&n), "n1 serves {n} of 200 later ones");
        // Listed again, n2 keeps the moment it was first learned.
        a.on_peer("n2", 1, vec!["g/t".into()]);
        let again = (0..200).filter(|i| a.decide("g/t", b"t", format!("{i}").as_bytes(), after));
        assert_eq!(again.count(), n);
    }

    /// Only a list that names a group not known of the peer waits for the router (a removal
    /// or the same list again is applied at once: waiting would only lose more).
    #[test]
    fn a_list_adds_only_groups_not_known_of_the_peer() {
        let a = share("n1");
        assert!(a.adds("n2", &["g/t".into()]));
        assert!(!a.adds("n2", &[]));
        a.on_peer("n2", 1, vec!["g/t".into(), "h/t".into()]);
        assert!(!a.adds("n2", &["g/t".into(), "h/t".into()]));
        assert!(!a.adds("n2", &["h/t".into()]));
        assert!(a.adds("n2", &["h/t".into(), "k/t".into()]));
        assert!(a.adds("n3", &["g/t".into()]));
        a.link_closed("n2", 1);
        assert!(a.adds("n2", &["g/t".into()]));
    }
}
