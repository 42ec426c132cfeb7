//! Session replicas (issue 12), as pure state: no sockets, no clock of its own (times are
//! milliseconds passed in), so every case is a unit test. The I/O is [`crate::replication`].
//!
//! Every node sees every publish (the mesh), so a node can keep a copy of a peer's persistent
//! session by itself once it knows the session's subscriptions: it queues each QoS 1/2 message
//! that matches them, and forgets each one the client acknowledged on its own node. What it
//! needs from the owner is small and rare — the subscriptions and expiry ([`ReplicaMeta`], on
//! every change) — or small and frequent: the ids of the messages the client acknowledged.
//!
//! For that, a QoS 1/2 publish gets a cluster-wide id where it enters the cluster (the node its
//! publisher is connected to): `(origin, seq)`, carried as a user property with a key no client
//! can send ([`TAG_KEY`]: MQTT forbids U+0000 in strings, MQTT-1.5.4-2), kept in every router's
//! log and on the mesh, and removed before a packet reaches a client. The owner's codec sees the
//! packet id it delivered a message with and the PUBACK / PUBREC for it, so it knows which ids
//! the client has.
//!
//! When the owner dies the client reconnects through the LB to another node, which takes the
//! replica (its own, and those its peers hold, merged by id) and installs it in its router as
//! a saved session: Session Present 1, the subscriptions live, every message the client had not
//! acknowledged queued. A message may come twice (it was in flight when the owner died); none
//! is lost that any replica holds.
//!
//! A `$share` group's messages go to one member (MQTT-4.8.2): a replica holder keeps, per
//! owner and group, the messages the owner serves to its members there (the same
//! rendezvous decision as `crate::share`), forgotten when any member acknowledges them and
//! given to the first member whose session is restored.
//!
//! Not every peer queues a session's messages: the replication factor `k` (copies in all, the
//! session's own among them) picks the `k - 1` live nodes besides the owner with the highest
//! rendezvous scores for the client ID ([`ranked`]); the others keep only the meta (a
//! *dormant* replica: the subscriptions and the will, so a will is never lost and a restore
//! knows the subscriptions). When the membership changes, a node that ranks now starts
//! queueing; one that no longer ranks goes on queueing until what it holds is acknowledged
//! and [`DEMOTE_AFTER`] passed, so the copies never drop below what they were.
//!
//! A replica also carries the client's last will (a session that ends with its connection is
//! replicated for its will alone), published by one surviving node when the owner died with
//! it pending ([`Replicas::due_wills`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use rumqttd::protocol::matches;

use crate::mesh::frame::{
    MeshPublish, MeshSession, MeshSubscription, MeshWill, MsgId, PkidEvent, ReplicaMeta,
};

/// The user property key of a message's cluster-wide id. U+0000 is not allowed in an MQTT
/// string (MQTT-1.5.4-2): a client cannot send it, and it is removed from what a client gets.
pub const TAG_KEY: &str = "\u{0}mqlb";

/// A message's tag: its id and the publisher's client ID hash (for No Local, MQTT-3.8.3-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub id: MsgId,
    pub publisher: u64,
}

impl Tag {
    pub fn value(&self) -> String {
        format!(
            "{:x}.{:x}.{:x}",
            self.id.origin, self.id.seq, self.publisher
        )
    }

    pub fn parse(v: &str) -> Option<Tag> {
        let mut it = v.split('.').map(|p| u64::from_str_radix(p, 16));
        let (Some(Ok(origin)), Some(Ok(seq)), Some(Ok(publisher)), None) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return None;
        };
        Some(Tag {
            id: MsgId { origin, seq },
            publisher,
        })
    }

    /// The tag among `props` (the last one if, against the rules, there are several).
    pub fn find(props: &[(String, String)]) -> Option<Tag> {
        props
            .iter()
            .rev()
            .find(|(k, _)| k == TAG_KEY)
            .and_then(|(_, v)| Tag::parse(v))
    }

    /// Removes every tag from `props`, returning the last valid one.
    pub fn take(props: &mut Vec<(String, String)>) -> Option<Tag> {
        if !props.iter().any(|(k, _)| k == TAG_KEY) {
            return None;
        }
        let tag = Tag::find(props);
        props.retain(|(k, _)| k != TAG_KEY);
        tag
    }
}

/// How long a node that no longer ranks among a session's holders keeps queueing for it
/// (once its queue is empty): the nodes that rank now have queued since the membership
/// changed, on every node's view of it.
pub const DEMOTE_AFTER_MS: u64 = 5_000;

/// Whether `node` is one of the `copies` nodes besides `owner` that queue the messages of
/// `client_id`'s session: the highest rendezvous scores among `live` (the nodes seen up, `node`
/// among them; `owner` is left out). Every node with the same view picks the same ones, and a
/// node's death moves only the sessions it held.
pub fn ranked(client_id: &str, owner: &str, node: &str, live: &[&str], copies: usize) -> bool {
    if node == owner {
        return false;
    }
    let candidates = live.iter().filter(|n| **n != owner);
    if candidates.clone().count() <= copies {
        return true;
    }
    let key = client_hash(client_id);
    let mine = crate::share::rendezvous(key, node);
    let above = candidates
        .filter(|n| **n != node)
        .filter(|n| (crate::share::rendezvous(key, n), **n) > (mine, node))
        .count();
    above < copies
}

/// A stable hash of a client ID, the same on every node (FNV-1a: no per-process seed).
pub fn client_hash(client_id: &str) -> u64 {
    client_id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A message a replica keeps: as the subscription delivers it (QoS, RETAIN), with when it came.
#[derive(Debug, Clone)]
struct Held {
    id: MsgId,
    publish: MeshPublish,
    at_ms: u64,
}

#[derive(Debug)]
struct Replica {
    owner: String,
    meta: ReplicaMeta,
    offline_since_ms: Option<u64>,
    queue: VecDeque<Held>,
    ids: HashSet<MsgId>,
    /// It queues messages (this node ranks among its holders, or did and still holds some);
    /// a dormant replica has the meta alone.
    active: bool,
    /// Since when this node no longer ranks among its holders.
    unranked_since_ms: Option<u64>,
    /// Ids acknowledged before their message arrived here (it took a slower path): it is not
    /// queued when it does.
    early: EarlyAcks,
    /// The packet ids of the owner's deliveries, so that a restore resends under them.
    pkids: Pkids,
}

const EARLY_ACKS: usize = 4096;

/// Message ids acknowledged before the message reached this node, the last [`EARLY_ACKS`].
#[derive(Debug, Default)]
struct EarlyAcks {
    order: VecDeque<MsgId>,
    set: HashSet<MsgId>,
}

impl EarlyAcks {
    fn insert(&mut self, id: MsgId) {
        if self.set.insert(id) {
            self.order.push_back(id);
            if self.order.len() > EARLY_ACKS {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    /// Whether `id` was acknowledged early; it is forgotten then (its message came).
    fn take(&mut self, id: MsgId) -> bool {
        self.set.remove(&id)
    }
}

/// What a session's packet ids are on its owner, as far as its events have told
/// (MQTT-4.4.0-1: a resumed session resends its unacknowledged deliveries under their ids and
/// the PUBRELs it owes). Bounded by the 65 535 ids.
#[derive(Debug, Default)]
struct Pkids {
    /// The message each id in use was sent with, and the other way round.
    sent: HashMap<u16, MsgId>,
    of: HashMap<MsgId, u16>,
    /// Ids the client answered with PUBREC and whose PUBCOMP has not come.
    pubrels: BTreeSet<u16>,
    /// The last id the owner used.
    last: u16,
}

impl Pkids {
    fn apply(&mut self, e: PkidEvent) {
        match e {
            PkidEvent::Sent { id, pkid } => {
                if let Some(old) = self.sent.insert(pkid, id) {
                    if old != id {
                        self.of.remove(&old);
                    }
                }
                self.of.insert(id, pkid);
                self.pubrels.remove(&pkid);
                self.last = pkid;
            }
            PkidEvent::Released(pkid) => {
                if let Some(id) = self.sent.remove(&pkid) {
                    self.of.remove(&id);
                }
                self.pubrels.insert(pkid);
            }
            PkidEvent::Completed(pkid) => {
                self.pubrels.remove(&pkid);
            }
        }
    }

    /// The client acknowledged message `id`: its id is free.
    fn acked(&mut self, id: MsgId) {
        if let Some(pkid) = self.of.remove(&id) {
            self.sent.remove(&pkid);
        }
    }
}

impl Replica {
    fn forget(&mut self, id: MsgId) -> bool {
        if !self.ids.remove(&id) {
            return false;
        }
        if let Some(i) = self.queue.iter().position(|h| h.id == id) {
            self.queue.remove(i);
        }
        true
    }

    fn expired(&self, now_ms: u64) -> bool {
        self.offline_since_ms.is_some_and(|since| {
            self.meta.expiry != u32::MAX
                && now_ms.saturating_sub(since) >= u64::from(self.meta.expiry) * 1000
        })
    }
}

/// The messages of a `$share` group that one owner node serves to its members there.
#[derive(Debug, Default)]
struct GroupQueue {
    /// The group's filter (without `$share/{ShareName}/`).
    filter: String,
    queue: VecDeque<Held>,
    ids: HashSet<MsgId>,
}

/// `$share/{ShareName}/{filter}` as the group's key `{ShareName}/{filter}` (as rumqttd and
/// `crate::share` name it) and its filter.
fn shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (_, path) = rest.split_once('/')?;
    Some((rest, path))
}

/// A held message as a subscription of QoS `sub_qos` delivers it, with what is left of its
/// expiry interval at `now_ms` (`None`: QoS 0 then, or it expired, MQTT-3.3.2-5, -6).
fn deliverable(h: &Held, sub_qos: u8, now_ms: u64) -> Option<MeshPublish> {
    let mut p = h.publish.clone();
    p.qos = p.qos.min(sub_qos);
    if p.qos == 0 {
        return None;
    }
    if let Some(interval) = p.message_expiry_interval {
        let waited = u32::try_from(now_ms.saturating_sub(h.at_ms) / 1000).unwrap_or(u32::MAX);
        p.message_expiry_interval = Some(interval.checked_sub(waited).filter(|r| *r > 0)?);
    }
    Some(p)
}

/// What a change to the replicas dropped, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Messages beyond a replica's bound (the oldest go).
    pub messages: u64,
    /// Replicas refused because the node holds its maximum.
    pub replicas: u64,
}

/// The owner of a replica loaded from the HA servers' database at start (issue 18): no node
/// (a node ID cannot hold U+0000), so any live owner's meta replaces it.
pub const STORED: &str = "\u{0}stored";

/// The peers' persistent sessions this node holds copies of, by client ID.
#[derive(Debug)]
pub struct Replicas {
    by_client: HashMap<String, Replica>,
    /// Each (non-shared) filter and the replicas subscribed with it, so a message is matched
    /// once per distinct filter, not once per replica.
    by_filter: HashMap<String, HashSet<String>>,
    /// Per owner and shared group key, the group's messages the owner serves.
    groups: HashMap<(String, String), GroupQueue>,
    /// Per owner, what its clients acknowledged before the message reached this node: a
    /// group's message a member already has is not queued when it comes.
    group_early: HashMap<String, EarlyAcks>,
    max_messages: usize,
    max_replicas: usize,
    pub dropped: Dropped,
}

impl Replicas {
    pub fn new(max_messages: usize, max_replicas: usize) -> Replicas {
        Replicas {
            by_client: HashMap::new(),
            by_filter: HashMap::new(),
            groups: HashMap::new(),
            group_early: HashMap::new(),
            max_messages: max_messages.max(1),
            max_replicas,
            dropped: Dropped::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }

    /// Messages held, over all replicas and shared groups.
    pub fn messages(&self) -> usize {
        let groups: usize = self.groups.values().map(|g| g.queue.len()).sum();
        self.by_client
            .values()
            .map(|r| r.queue.len())
            .sum::<usize>()
            + groups
    }

    pub fn holds(&self, client_id: &str) -> bool {
        self.by_client.contains_key(client_id)
    }

    /// Makes `client_id`'s replica queue what matches its subscriptions from now on.
    fn index(&mut self, client_id: &str) {
        let Some(r) = self.by_client.get_mut(client_id) else {
            return;
        };
        r.active = true;
        for s in &r.meta.subscriptions {
            match shared(&s.filter) {
                Some((key, path)) => {
                    self.groups
                        .entry((r.owner.clone(), key.to_owned()))
                        .or_insert_with(|| GroupQueue {
                            filter: path.to_owned(),
                            ..GroupQueue::default()
                        });
                }
                None => {
                    self.by_filter
                        .entry(s.filter.clone())
                        .or_default()
                        .insert(client_id.to_owned());
                }
            }
        }
    }

    fn unindex(&mut self, client_id: &str, subs: &[MeshSubscription]) {
        for s in subs {
            if let Some(set) = self.by_filter.get_mut(&s.filter) {
                set.remove(client_id);
                if set.is_empty() {
                    self.by_filter.remove(&s.filter);
                }
            }
        }
    }

    /// `owner` says how its session `meta.client_id` is now: the replica is made or updated.
    /// A replica that another node owned is taken over by `owner` with what it queued (the
    /// session moved with its client; the new owner delivers those messages too).
    ///
    /// From a node that is not the replica's owner, only a meta that says the client is
    /// connected there (or starts afresh) is taken: an offline one is stale, the end of a
    /// connection that lost its session to the owner (a paused node that resumes).
    ///
    /// `ranked`: this node is one of the session's holders ([`ranked`]); a replica that queues
    /// goes on queueing whatever it says (see [`Replicas::rerank`]).
    pub fn meta(&mut self, owner: &str, meta: ReplicaMeta, now_ms: u64, ranked: bool) {
        let client = meta.client_id.clone();
        if self
            .by_client
            .get(&client)
            .is_some_and(|r| r.owner != owner && r.owner != STORED && !meta.online && !meta.fresh)
        {
            return;
        }
        if !self.by_client.contains_key(&client) && self.by_client.len() >= self.max_replicas {
            self.dropped.replicas += 1;
            return;
        }
        let old_subs = self
            .by_client
            .get(&client)
            .map(|r| r.meta.subscriptions.clone())
            .unwrap_or_default();
        self.unindex(&client, &old_subs);
        let r = self
            .by_client
            .entry(client.clone())
            .or_insert_with(|| Replica {
                owner: owner.to_owned(),
                meta: ReplicaMeta::default(),
                offline_since_ms: None,
                queue: VecDeque::new(),
                ids: HashSet::new(),
                active: false,
                unranked_since_ms: None,
                early: EarlyAcks::default(),
                pkids: Pkids::default(),
            });
        if meta.fresh {
            r.queue.clear();
            r.ids.clear();
            r.pkids = Pkids::default();
        }
        r.owner = owner.to_owned();
        r.offline_since_ms = match (meta.online, r.offline_since_ms) {
            (true, _) => None,
            (false, Some(since)) => Some(since),
            (false, None) => Some(now_ms),
        };
        r.meta = meta;
        if ranked {
            r.unranked_since_ms = None;
        } else if r.active {
            r.unranked_since_ms.get_or_insert(now_ms);
        }
        if ranked || r.active {
            self.index(&client);
        }
    }

    /// The membership changed: the replicas this node now ranks for (`ranked(owner,
    /// client)`) queue from now on; those it no longer ranks for are marked, and stop queueing
    /// once [`Replicas::demote`] finds them empty long enough. Returns how many started.
    pub fn rerank(&mut self, now_ms: u64, ranked: impl Fn(&str, &str) -> bool) -> usize {
        let mut start = Vec::new();
        for (client, r) in &mut self.by_client {
            if ranked(&r.owner, client) {
                r.unranked_since_ms = None;
                if !r.active {
                    start.push(client.clone());
                }
            } else if r.active {
                r.unranked_since_ms.get_or_insert(now_ms);
            }
        }
        for c in &start {
            self.index(c);
        }
        start.len()
    }

    /// Replicas this node stopped ranking for [`DEMOTE_AFTER_MS`] ago, with nothing queued
    /// (in their own queue or their owner's groups they are members of), go dormant.
    /// Returns how many.
    pub fn demote(&mut self, now_ms: u64) -> usize {
        let groups = &self.groups;
        let idle: Vec<String> = self
            .by_client
            .iter()
            .filter(|(_, r)| {
                r.active
                    && r.queue.is_empty()
                    && r.unranked_since_ms
                        .is_some_and(|since| now_ms.saturating_sub(since) >= DEMOTE_AFTER_MS)
                    && r.meta.subscriptions.iter().all(|s| {
                        shared(&s.filter).is_none_or(|(key, _)| {
                            groups
                                .get(&(r.owner.clone(), key.to_owned()))
                                .is_none_or(|g| g.queue.is_empty())
                        })
                    })
            })
            .map(|(c, _)| c.clone())
            .collect();
        for c in &idle {
            let Some(r) = self.by_client.get_mut(c) else {
                continue;
            };
            r.active = false;
            r.unranked_since_ms = None;
            r.ids.clear();
            let subs = r.meta.subscriptions.clone();
            self.unindex(c, &subs);
        }
        idle.len()
    }

    /// The replica of `client_id` queues from now on, ranked or not (its client is about to
    /// be restored here, or its owner died): `true` if it was dormant.
    pub fn activate(&mut self, client_id: &str) -> bool {
        if self.by_client.get(client_id).is_none_or(|r| r.active) {
            return false;
        }
        self.index(client_id);
        true
    }

    /// Replicas that queue messages here (the others are dormant).
    pub fn active(&self) -> usize {
        self.by_client.values().filter(|r| r.active).count()
    }

    /// `owner` says the session ended (or left it for another node): its replica goes. A
    /// replica of another owner (the session moved on) stays.
    pub fn close(&mut self, owner: &str, client_id: &str) -> bool {
        if self
            .by_client
            .get(client_id)
            .is_some_and(|r| r.owner == owner)
        {
            self.remove(client_id);
            return true;
        }
        false
    }

    /// The session ended whoever owned it (a Clean Start elsewhere, MQTT-3.1.2-4, or this node
    /// took it over).
    pub fn remove(&mut self, client_id: &str) -> bool {
        let Some(r) = self.by_client.remove(client_id) else {
            return false;
        };
        self.unindex(client_id, &r.meta.subscriptions);
        true
    }

    /// A QoS 1/2 message `tag` (`publish` as published) entered this node: every replica with a
    /// matching subscription of QoS 1 or 2 queues it once, as that subscription delivers it,
    /// and every shared group whose owner serves it (`serves(owner, group key)`) queues it.
    pub fn record(
        &mut self,
        tag: Tag,
        publish: &MeshPublish,
        now_ms: u64,
        serves: impl Fn(&str, &str) -> bool,
    ) {
        if publish.qos == 0 || (self.by_filter.is_empty() && self.groups.is_empty()) {
            return;
        }
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return;
        };
        // MQTT-4.7.2-1: a wildcard at the start of a filter does not match a `$` topic.
        if topic.starts_with('$') {
            return;
        }
        let Replicas {
            by_client,
            by_filter,
            groups,
            group_early,
            max_messages,
            dropped,
            ..
        } = self;
        for ((owner, key), g) in groups.iter_mut() {
            if g.ids.contains(&tag.id) || !matches(topic, &g.filter) || !serves(owner, key) {
                continue;
            }
            if group_early.get_mut(owner).is_some_and(|e| e.take(tag.id)) {
                continue;
            }
            if g.queue.len() >= *max_messages {
                if let Some(old) = g.queue.pop_front() {
                    g.ids.remove(&old.id);
                    dropped.messages += 1;
                }
            }
            g.ids.insert(tag.id);
            g.queue.push_back(Held {
                id: tag.id,
                publish: publish.clone(),
                at_ms: now_ms,
            });
        }
        // Each replica once, however many of its filters match.
        let matched: Vec<&HashSet<String>> = by_filter
            .iter()
            .filter(|(filter, _)| matches(topic, filter))
            .map(|(_, clients)| clients)
            .collect();
        let mut seen: HashSet<&str> = HashSet::new();
        for client in matched.iter().flat_map(|c| c.iter()) {
            if matched.len() > 1 && !seen.insert(client.as_str()) {
                continue;
            }
            let Some(r) = by_client.get_mut(client) else {
                continue;
            };
            if r.ids.contains(&tag.id) || r.early.take(tag.id) {
                continue;
            }
            // The highest QoS of the matching subscriptions (one copy per replica: on
            // failover each is delivered once, not once per overlapping filter).
            let mut best: Option<&MeshSubscription> = None;
            for s in &r.meta.subscriptions {
                if s.filter.starts_with("$share/") || !matches(topic, &s.filter) {
                    continue;
                }
                if s.nolocal && tag.publisher == client_hash(&r.meta.client_id) {
                    continue;
                }
                if best.is_none_or(|b| s.qos > b.qos) {
                    best = Some(s);
                }
            }
            let Some(sub) = best else { continue };
            let qos = publish.qos.min(sub.qos);
            if qos == 0 {
                continue;
            }
            let mut held = publish.clone();
            held.qos = qos;
            held.retain = publish.retain && sub.preserve_retain;
            if r.queue.len() >= *max_messages {
                if let Some(old) = r.queue.pop_front() {
                    r.ids.remove(&old.id);
                    dropped.messages += 1;
                }
            }
            r.ids.insert(tag.id);
            r.queue.push_back(Held {
                id: tag.id,
                publish: held,
                at_ms: now_ms,
            });
        }
    }

    /// `owner`'s client `client_id` acknowledged `ids`: its replica forgets them (or the
    /// owner's shared group that held them).
    pub fn acked(&mut self, owner: &str, client_id: &str, ids: &[MsgId]) {
        let Some(r) = self.by_client.get_mut(client_id) else {
            return;
        };
        if r.owner != owner {
            return;
        }
        for id in ids {
            r.pkids.acked(*id);
            if r.forget(*id) {
                continue;
            }
            let in_group = self
                .groups
                .iter_mut()
                .filter(|((o, _), _)| o == owner)
                .any(|(_, g)| {
                    let had = g.ids.remove(id);
                    if had {
                        g.queue.retain(|h| h.id != *id);
                    }
                    had
                });
            if !in_group {
                // Either the replica's own message or a group's, to come by a slower path.
                r.early.insert(*id);
                self.group_early
                    .entry(owner.to_string())
                    .or_default()
                    .insert(*id);
            }
        }
    }

    /// What became of the packet ids of `owner`'s client `client_id`, in order.
    pub fn pkids(&mut self, owner: &str, client_id: &str, events: &[PkidEvent]) {
        let Some(r) = self.by_client.get_mut(client_id) else {
            return;
        };
        if r.owner != owner {
            return;
        }
        for e in events {
            r.pkids.apply(*e);
        }
    }

    /// Drops the replicas whose session expired while offline; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let gone: Vec<String> = self
            .by_client
            .iter()
            .filter(|(_, r)| r.expired(now_ms))
            .map(|(c, _)| c.clone())
            .collect();
        for c in &gone {
            self.remove(c);
        }
        // A group no queueing replica of its owner is a member of any more.
        let members: HashSet<(&str, &str)> = self
            .by_client
            .values()
            .filter(|r| r.active)
            .flat_map(|r| {
                r.meta
                    .subscriptions
                    .iter()
                    .filter_map(|s| Some((r.owner.as_str(), shared(&s.filter)?.0)))
            })
            .collect();
        let orphans: Vec<(String, String)> = self
            .groups
            .keys()
            .filter(|(o, k)| !members.contains(&(o.as_str(), k.as_str())))
            .cloned()
            .collect();
        for k in orphans {
            self.groups.remove(&k);
        }
        gone.len()
    }

    /// The shared groups' messages the replica of `client_id` gets when it is restored are
    /// its alone: the group's other members do not get them again.
    pub fn drain_groups(&mut self, client_id: &str) {
        let Some(r) = self.by_client.get(client_id) else {
            return;
        };
        for s in &r.meta.subscriptions {
            if let Some((key, _)) = shared(&s.filter) {
                if let Some(g) = self.groups.get_mut(&(r.owner.clone(), key.to_owned())) {
                    g.queue.clear();
                    g.ids.clear();
                }
            }
        }
    }

    /// Wills that are due because their owner died: each taken out (a will-only replica goes
    /// with it) and returned when `here(owner)` says this node is the one to publish it.
    /// `down_since(owner)`: since when the owner is known dead (`None`: alive).
    ///
    /// The will's delay is the shorter of its Will Delay Interval and the session's expiry
    /// (MQTT-3.1.3-9), counted from when the client went offline if it did so before the owner
    /// died, else from the owner's death. A will that was due while the owner still lived was
    /// the owner's to publish: it is dropped.
    pub fn due_wills(
        &mut self,
        now_ms: u64,
        down_since: impl Fn(&str) -> Option<u64>,
        here: impl Fn(&str) -> bool,
    ) -> Vec<MeshPublish> {
        let mut due = Vec::new();
        let mut gone = Vec::new();
        for (client, r) in &mut self.by_client {
            let Some(will) = &r.meta.will else { continue };
            let Some(died) = down_since(&r.owner) else {
                continue;
            };
            let delay_ms = u64::from(will.delay.min(r.meta.expiry)) * 1000;
            let at = match r.offline_since_ms {
                Some(off) if off <= died => off.saturating_add(delay_ms),
                _ => died.saturating_add(delay_ms),
            };
            let owners = r.offline_since_ms.is_some_and(|off| off <= died) && at < died;
            if !owners && now_ms < at {
                continue;
            }
            if let Some(w) = r.meta.will.take() {
                if !owners && here(&r.owner) {
                    due.push(w.publish);
                }
            }
            if r.meta.expiry == 0 {
                gone.push(client.clone());
            }
        }
        for c in gone {
            self.remove(&c);
        }
        due
    }

    /// `client_id` connected somewhere: its will is not published (MQTT-3.1.3-9); a replica kept
    /// for the will alone goes.
    pub fn connected_elsewhere(&mut self, client_id: &str) {
        let Some(r) = self.by_client.get_mut(client_id) else {
            return;
        };
        r.meta.will = None;
        if r.meta.expiry == 0 {
            self.remove(client_id);
        }
    }

    /// The owners the replicas here have.
    pub fn owners(&self) -> HashSet<&str> {
        self.by_client.values().map(|r| r.owner.as_str()).collect()
    }

    /// The replica of `client_id` as a session to install, keeping it here (for a peer that
    /// asks). A replica kept for a will alone (no session) is none. Messages whose expiry interval passed are left out, the others carry what is
    /// left of it (MQTT-3.3.2-5, -6); at most `budget` bytes of messages (the oldest first).
    pub fn session(&self, client_id: &str, now_ms: u64, budget: usize) -> Option<MeshSession> {
        let r = self
            .by_client
            .get(client_id)
            .filter(|r| r.meta.expiry != 0)?;
        let mut left = budget;
        let mut pending = Vec::new();
        let mut dropped = 0u32;
        // Its own messages (held as delivered: QoS 1 or 2 already), with the packet id each
        // went out under if it did, then its groups'.
        let own = r
            .queue
            .iter()
            .map(|h| (h, 2, r.pkids.of.get(&h.id).copied().unwrap_or(0)));
        let groups = r.meta.subscriptions.iter().flat_map(|s| {
            let queue = shared(&s.filter)
                .and_then(|(key, _)| self.groups.get(&(r.owner.clone(), key.to_owned())));
            queue
                .into_iter()
                .flat_map(|g| g.queue.iter().map(|h| (h, s.qos, 0)))
        });
        for (h, qos, pkid) in own.chain(groups) {
            let Some(p) = deliverable(h, qos, now_ms) else {
                continue;
            };
            let size = p.topic.len() + p.payload.len() + 64;
            if size > left {
                dropped = dropped.saturating_add(1);
                continue;
            }
            left -= size;
            pending.push((pkid, p));
        }
        let expiry = match (r.meta.expiry, r.offline_since_ms) {
            (u32::MAX, _) | (_, None) => r.meta.expiry,
            (e, Some(since)) => {
                let gone = u32::try_from(now_ms.saturating_sub(since) / 1000).unwrap_or(u32::MAX);
                e.saturating_sub(gone).max(1)
            }
        };
        Some(MeshSession {
            client_id: client_id.to_owned(),
            expiry,
            last_pkid: r.pkids.last,
            dropped,
            subscriptions: r.meta.subscriptions.clone(),
            pubrels: r.pkids.pubrels.iter().copied().collect(),
            pending,
        })
    }

    /// The client IDs of the replicas held.
    pub fn clients(&self) -> Vec<String> {
        self.by_client.keys().cloned().collect()
    }

    /// The owner of the replica of `client_id`.
    pub fn owner(&self, client_id: &str) -> Option<&str> {
        self.by_client.get(client_id).map(|r| r.owner.as_str())
    }
}

/// A session that moved here (`session`, with its packet ids) completed with what this node's
/// replica of it (`copy`) holds and it lacks: the messages that reached this node while the
/// session was on its way (they found no subscription in either router), each origin's in its
/// order after the session's own.
pub fn complete(mut session: MeshSession, copy: Option<MeshSession>) -> MeshSession {
    let Some(copy) = copy else {
        return session;
    };
    let have: HashSet<MsgId> = session
        .pending
        .iter()
        .filter_map(|(_, p)| Tag::find(&p.user_properties).map(|t| t.id))
        .collect();
    let mut extra: Vec<(MsgId, MeshPublish)> = copy
        .pending
        .into_iter()
        .filter_map(|(_, p)| Some((Tag::find(&p.user_properties)?.id, p)))
        .filter(|(id, _)| !have.contains(id))
        .collect();
    extra.sort_by_key(|(id, _)| *id);
    session
        .pending
        .extend(extra.into_iter().map(|(_, p)| (0, p)));
    session
}

/// Several copies of one session (this node's replica and its peers') as one: every message
/// any of them holds, once (by id), each origin's in its order, with the packet id any copy
/// knows it was sent under; the subscriptions of the copy with the most, the longest expiry,
/// every PUBREL any copy owes, the last packet id of the first copy that knows one.
pub fn merge(copies: Vec<MeshSession>) -> Option<MeshSession> {
    let mut it = copies.into_iter();
    let mut base = it.next()?;
    let mut others: Vec<MeshSession> = it.collect();
    if others.is_empty() {
        return Some(base);
    }
    let mut all: BTreeMap<MsgId, (u16, MeshPublish)> = BTreeMap::new();
    let mut untagged = Vec::new();
    let mut push = |(pkid, p): (u16, MeshPublish)| match Tag::find(&p.user_properties) {
        Some(t) => {
            let kept = all.entry(t.id).or_insert((pkid, p));
            if kept.0 == 0 {
                kept.0 = pkid;
            }
        }
        None => untagged.push((0, p)),
    };
    for m in std::mem::take(&mut base.pending) {
        push(m);
    }
    let mut pubrels: BTreeSet<u16> = base.pubrels.drain(..).collect();
    for o in &mut others {
        for m in std::mem::take(&mut o.pending) {
            push(m);
        }
        if o.subscriptions.len() > base.subscriptions.len() {
            base.subscriptions = std::mem::take(&mut o.subscriptions);
        }
        base.expiry = base.expiry.max(o.expiry);
        base.dropped = base.dropped.saturating_add(o.dropped);
        pubrels.extend(o.pubrels.drain(..));
        if base.last_pkid == 0 {
            base.last_pkid = o.last_pkid;
        }
    }
    base.pending = all.into_values().chain(untagged).collect();
    base.pubrels = pubrels.into_iter().collect();
    Some(base)
}

/// `merged` (the replicas' copies) with the messages the HA servers' database kept of the
/// session (`stored`, issue 18) ahead of its own: those were queued before the whole cluster
/// stopped, the replicas' since it started again, so that is their order. A message in both is
/// taken once, where it was stored; every PUBREL either owes; the stored last packet id if the
/// copies know none.
pub fn stored_first(mut merged: MeshSession, stored: MeshSession) -> MeshSession {
    let ids: HashSet<MsgId> = stored
        .pending
        .iter()
        .filter_map(|(_, p)| Tag::find(&p.user_properties).map(|t| t.id))
        .collect();
    let rest = std::mem::take(&mut merged.pending)
        .into_iter()
        .filter(|(_, p)| Tag::find(&p.user_properties).is_none_or(|t| !ids.contains(&t.id)));
    merged.pending = stored.pending.into_iter().chain(rest).collect();
    let pubrels: BTreeSet<u16> = merged.pubrels.drain(..).chain(stored.pubrels).collect();
    merged.pubrels = pubrels.into_iter().collect();
    if merged.last_pkid == 0 {
        merged.last_pkid = stored.last_pkid;
    }
    merged
}

/// An owner's persistent session, as far as its replicas need to know it.
#[derive(Debug, Clone)]
struct Owned {
    /// The connection it is live on (the mesh's registration; 0: none yet): the end of an
    /// older connection of the client, taken over by this one, changes nothing.
    connection: u64,
    expiry: u32,
    online: bool,
    offline_since_ms: Option<u64>,
    subscriptions: BTreeMap<String, MeshSubscription>,
    will: Option<MeshWill>,
}

/// What the owner sends its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announce {
    Meta(Box<ReplicaMeta>),
    Close(String),
}

/// The persistent sessions this node owns (its clients'), kept from what its codec sees:
/// CONNECT / CONNACK, SUBSCRIBE / SUBACK, UNSUBSCRIBE, DISCONNECT, the end of a connection, and
/// sessions that arrive from or leave for a peer.
#[derive(Debug, Default)]
pub struct Book {
    sessions: HashMap<String, Owned>,
}

impl Book {
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// The client IDs of the sessions this node owns.
    pub fn clients(&self) -> Vec<String> {
        self.sessions.keys().cloned().collect()
    }

    /// This node has the session of `client_id` (live, or saved in its router).
    pub fn owns(&self, client_id: &str) -> bool {
        self.sessions.contains_key(client_id)
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    fn announce(&self, client_id: &str, fresh: bool) -> Option<Announce> {
        let o = self.sessions.get(client_id)?;
        Some(Announce::Meta(Box::new(ReplicaMeta {
            client_id: client_id.to_owned(),
            expiry: o.expiry,
            online: o.online,
            fresh,
            subscriptions: o.subscriptions.values().cloned().collect(),
            will: o.will.clone(),
        })))
    }

    /// A CONNACK 0 went out. `expiry`: the session's interval (0: it ends with the
    /// connection, so only a will is replicated, if there is one).
    pub fn connected(
        &mut self,
        client_id: &str,
        clean_start: bool,
        expiry: u32,
        connection: u64,
        will: Option<MeshWill>,
    ) -> Option<Announce> {
        if client_id.is_empty() {
            return None;
        }
        if expiry == 0 && will.is_none() {
            return self
                .sessions
                .remove(client_id)
                .map(|_| Announce::Close(client_id.to_owned()));
        }
        let o = self.sessions.entry(client_id.to_owned()).or_insert(Owned {
            connection,
            expiry,
            online: true,
            offline_since_ms: None,
            subscriptions: BTreeMap::new(),
            will: None,
        });
        if clean_start || expiry == 0 {
            o.subscriptions.clear();
        }
        o.connection = connection;
        o.will = will;
        o.expiry = expiry;
        o.online = true;
        o.offline_since_ms = None;
        self.announce(client_id, clean_start)
    }

    pub fn subscribed(&mut self, client_id: &str, subs: Vec<MeshSubscription>) -> Option<Announce> {
        let o = self.sessions.get_mut(client_id)?;
        for s in subs {
            o.subscriptions.insert(s.filter.clone(), s);
        }
        self.announce(client_id, false)
    }

    pub fn unsubscribed(&mut self, client_id: &str, filters: &[String]) -> Option<Announce> {
        let o = self.sessions.get_mut(client_id)?;
        let before = o.subscriptions.len();
        for f in filters {
            o.subscriptions.remove(f);
        }
        if o.subscriptions.len() == before {
            return None;
        }
        self.announce(client_id, false)
    }

    /// The connection ended; `expiry`: a new interval its DISCONNECT set (MQTT-3.14.2.2.2);
    /// `will_kept`: it ended without DISCONNECT, so its will stands.
    pub fn disconnected(
        &mut self,
        client_id: &str,
        connection: u64,
        expiry: Option<u32>,
        will_kept: bool,
        now_ms: u64,
    ) -> Option<Announce> {
        let o = self.sessions.get_mut(client_id)?;
        if o.connection != connection {
            return None;
        }
        if let Some(e) = expiry {
            o.expiry = e;
        }
        if !will_kept {
            o.will = None;
        }
        if o.expiry == 0 {
            self.sessions.remove(client_id);
            return Some(Announce::Close(client_id.to_owned()));
        }
        o.online = false;
        o.offline_since_ms = Some(now_ms);
        self.announce(client_id, false)
    }

    /// A session was installed here (it moved from a peer, or a replica was restored); its
    /// client is about to connect.
    pub fn installed(
        &mut self,
        client_id: &str,
        expiry: u32,
        subs: &[MeshSubscription],
        now_ms: u64,
    ) -> Option<Announce> {
        self.sessions.insert(
            client_id.to_owned(),
            Owned {
                connection: 0,
                expiry,
                online: false,
                offline_since_ms: Some(now_ms),
                subscriptions: subs.iter().map(|x| (x.filter.clone(), x.clone())).collect(),
                will: None,
            },
        );
        self.announce(client_id, false)
    }

    /// The session left this node (moved to a peer) or ended (a Clean Start elsewhere).
    pub fn left(&mut self, client_id: &str) -> Option<Announce> {
        self.sessions
            .remove(client_id)
            .map(|_| Announce::Close(client_id.to_owned()))
    }

    /// Sessions that expired offline; each announced closed.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Announce> {
        let gone: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, o)| {
                o.offline_since_ms.is_some_and(|since| {
                    o.expiry != u32::MAX
                        && now_ms.saturating_sub(since) >= u64::from(o.expiry) * 1000
                })
            })
            .map(|(c, _)| c.clone())
            .collect();
        gone.into_iter().filter_map(|c| self.left(&c)).collect()
    }

    /// Every session, for a peer whose link just came up.
    pub fn all(&self) -> Vec<Announce> {
        self.sessions
            .keys()
            .filter_map(|c| self.announce(c, false))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn sub(filter: &str, qos: u8) -> MeshSubscription {
        MeshSubscription {
            filter: filter.into(),
            qos,
            nolocal: false,
            preserve_retain: false,
        }
    }

    fn meta(client: &str, subs: Vec<MeshSubscription>, online: bool) -> ReplicaMeta {
        ReplicaMeta {
            client_id: client.into(),
            expiry: 60,
            online,
            fresh: false,
            subscriptions: subs,
            will: None,
        }
    }

    /// Issue 18: a session loaded from the database is the replica of no node; a live owner's
    /// word replaces it even while its client is offline (the rule that refuses another
    /// node's offline meta as stale does not protect it), and the new owner keeps it.
    #[test]
    fn a_stored_replica_gives_way_to_a_live_owner() {
        let mut r = Replicas::new(10, 10);
        r.meta(STORED, meta("c", vec![sub("old/#", 1)], false), 0, false);
        assert_eq!(r.owner("c"), Some(STORED));
        r.meta("b2", meta("c", vec![sub("new/#", 1)], false), 1, false);
        assert_eq!(
            r.owner("c"),
            Some("b2"),
            "the live owner's offline meta is taken"
        );
        let s = r.session("c", 2, usize::MAX).expect("a session");
        assert_eq!(s.subscriptions, [sub("new/#", 1)]);
        r.meta("b3", meta("c", vec![sub("stale/#", 1)], false), 3, false);
        assert_eq!(
            r.owner("c"),
            Some("b2"),
            "another node's offline meta is still stale"
        );
    }

    /// Issue 18: what the database kept of a session goes ahead of what the replicas
    /// queued since the restart, whatever the ids' order, and once.
    #[test]
    fn stored_messages_come_first_and_once() {
        let later = |seq| {
            msg(
                "a",
                1,
                Tag {
                    id: MsgId { origin: 1, seq },
                    publisher: 0,
                },
            )
        };
        let merged = MeshSession {
            client_id: "c".into(),
            pending: vec![(0, later(1)), (0, msg("a", 1, tag(2)))],
            pubrels: vec![4],
            ..MeshSession::default()
        };
        let stored = MeshSession {
            client_id: "c".into(),
            pending: vec![(3, msg("a", 2, tag(2))), (0, msg("a", 1, tag(3)))],
            pubrels: vec![1],
            last_pkid: 3,
            ..MeshSession::default()
        };
        let s = stored_first(merged, stored);
        assert_eq!(payloads(&s), ["m2", "m3", "m1"]);
        assert_eq!(s.pending[0].0, 3, "with its packet id");
        assert_eq!((s.pubrels.as_slice(), s.last_pkid), (&[1u16, 4][..], 3));
    }

    fn tag(seq: u64) -> Tag {
        Tag {
            id: MsgId { origin: 9, seq },
            publisher: client_hash("pub"),
        }
    }

    fn msg(topic: &'static str, qos: u8, t: Tag) -> MeshPublish {
        MeshPublish {
            topic: Bytes::from_static(topic.as_bytes()),
            payload: Bytes::from(format!("m{}", t.id.seq)),
            qos,
            user_properties: vec![(TAG_KEY.into(), t.value())],
            ..MeshPublish::default()
        }
    }

    fn texts<'a>(ps: impl IntoIterator<Item = &'a MeshPublish>) -> Vec<String> {
        ps.into_iter()
            .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
            .collect()
    }

    fn payloads(s: &MeshSession) -> Vec<String> {
        texts(s.pending.iter().map(|(_, p)| p))
    }

    #[test]
    fn a_tag_round_trips_and_no_client_can_forge_one() {
        let t = Tag {
            id: MsgId {
                origin: u64::MAX,
                seq: 42,
            },
            publisher: 7,
        };
        assert_eq!(Tag::parse(&t.value()), Some(t));
        assert_eq!(Tag::parse("1.2"), None);
        assert_eq!(Tag::parse("1.2.3.4"), None);
        assert_eq!(Tag::parse("x.2.3"), None);
        let mut props = vec![
            ("a".to_string(), "b".to_string()),
            (TAG_KEY.to_string(), t.value()),
        ];
        assert_eq!(Tag::take(&mut props), Some(t));
        assert_eq!(props, [("a".to_string(), "b".to_string())]);
        assert_eq!(Tag::take(&mut props), None);
        assert_eq!(client_hash("c"), client_hash("c"));
        assert_ne!(client_hash("c"), client_hash("d"));
    }

    #[test]
    fn a_replica_queues_what_matches_and_forgets_what_the_client_acknowledged() {
        let mut r = Replicas::new(100, 100);
        r.meta(
            "b1",
            meta("c", vec![sub("a/+", 1), sub("z", 0)], true),
            0,
            true,
        );
        for seq in 1..=4 {
            r.record(tag(seq), &msg("a/x", 2, tag(seq)), 0, |_, _| true);
        }
        r.record(tag(5), &msg("b/x", 1, tag(5)), 0, |_, _| true); // no match
        r.record(tag(6), &msg("z", 1, tag(6)), 0, |_, _| true); // QoS 0 subscription
        r.record(tag(7), &msg("a/x", 0, tag(7)), 0, |_, _| true); // QoS 0 publish
        r.record(tag(2), &msg("a/x", 2, tag(2)), 0, |_, _| true); // again: once
        r.acked(
            "b1",
            "c",
            &[MsgId { origin: 9, seq: 1 }, MsgId { origin: 9, seq: 3 }],
        );
        // another node's acks for it are not the owner's
        r.acked("b3", "c", &[MsgId { origin: 9, seq: 2 }]);
        let s = r.session("c", 0, usize::MAX).expect("held");
        assert_eq!(payloads(&s), ["m2", "m4"]);
        assert!(s.pending.iter().all(|(pkid, p)| *pkid == 0 && p.qos == 1));
        assert_eq!(r.messages(), 2);
    }

    #[test]
    fn an_ack_that_comes_before_its_message_keeps_it_out() {
        let mut r = Replicas::new(100, 100);
        // two of its filters match: still once, and not at all when acknowledged first
        r.meta(
            "b1",
            meta("c", vec![sub("#", 1), sub("t", 1)], true),
            0,
            true,
        );
        r.acked("b1", "c", &[MsgId { origin: 9, seq: 1 }]);
        r.record(tag(1), &msg("t", 1, tag(1)), 0, |_, _| true);
        r.record(tag(2), &msg("t", 1, tag(2)), 0, |_, _| true);
        assert_eq!(
            payloads(&r.session("c", 0, usize::MAX).expect("held")),
            ["m2"]
        );
    }

    #[test]
    fn no_local_and_groups_another_node_serves_are_not_queued() {
        let mut r = Replicas::new(100, 100);
        let mut own = sub("t", 1);
        own.nolocal = true;
        r.meta(
            "b1",
            meta("pub", vec![own, sub("$share/g/t", 1)], true),
            0,
            true,
        );
        r.record(tag(1), &msg("t", 1, tag(1)), 0, |_, _| false);
        let s = r.session("pub", 0, usize::MAX).expect("held");
        assert!(s.pending.is_empty());
        assert_eq!(
            s.subscriptions.len(),
            2,
            "the subscriptions are kept all the same"
        );
        r.record(tag(2), &msg("$SYS/t", 1, tag(2)), 0, |_, _| true);
    }

    #[test]
    fn the_bound_drops_the_oldest_and_counts() {
        let mut r = Replicas::new(2, 1);
        r.meta("b1", meta("c", vec![sub("t", 1)], false), 0, true);
        for seq in 1..=3 {
            r.record(tag(seq), &msg("t", 1, tag(seq)), 0, |_, _| true);
        }
        assert_eq!(
            payloads(&r.session("c", 0, usize::MAX).expect("held")),
            ["m2", "m3"]
        );
        assert_eq!(r.dropped.messages, 1);
        r.meta("b1", meta("d", vec![sub("t", 1)], false), 0, true);
        assert_eq!(r.dropped.replicas, 1);
        assert!(!r.holds("d"));
    }

    #[test]
    fn a_replica_expires_offline_and_counts_its_expiry_down() {
        let mut r = Replicas::new(10, 10);
        r.meta("b1", meta("c", vec![sub("t", 1)], false), 1_000, true);
        assert_eq!(r.session("c", 21_000, 0).expect("held").expiry, 40);
        assert_eq!(r.expire(60_999), 0);
        // online again: the clock stops
        r.meta("b1", meta("c", vec![sub("t", 1)], true), 61_000, true);
        assert_eq!(r.expire(500_000), 0);
        r.meta("b1", meta("c", vec![sub("t", 1)], false), 500_000, true);
        assert_eq!(r.expire(560_000), 1);
        assert!(r.is_empty());
    }

    #[test]
    fn a_message_that_expired_in_the_replica_is_not_restored() {
        let mut r = Replicas::new(10, 10);
        r.meta("b1", meta("c", vec![sub("t", 1)], true), 0, true);
        let mut m = msg("t", 1, tag(1));
        m.message_expiry_interval = Some(10);
        r.record(tag(1), &m, 0, |_, _| true);
        let mut m = msg("t", 1, tag(2));
        m.message_expiry_interval = Some(100);
        r.record(tag(2), &m, 0, |_, _| true);
        let s = r.session("c", 30_000, usize::MAX).expect("held");
        assert_eq!(payloads(&s), ["m2"]);
        assert_eq!(s.pending[0].1.message_expiry_interval, Some(70));
    }

    #[test]
    fn a_session_that_moves_keeps_its_replica_and_a_clean_start_empties_it() {
        let mut r = Replicas::new(10, 10);
        r.meta("b1", meta("c", vec![sub("t", 1)], true), 0, true);
        r.record(tag(1), &msg("t", 1, tag(1)), 0, |_, _| true);
        // the client moved to b2, which now owns it
        r.meta("b2", meta("c", vec![sub("t", 1)], true), 0, true);
        assert!(!r.close("b1", "c"), "the old owner's close is stale");
        // so is the end of the old owner's connection (it resumed after a pause)
        r.meta("b1", meta("c", vec![sub("t", 1)], false), 0, true);
        assert_eq!(r.owner("c"), Some("b2"));
        assert_eq!(r.owner("c"), Some("b2"));
        assert_eq!(r.messages(), 1);
        let mut fresh = meta("c", vec![sub("u", 1)], true);
        fresh.fresh = true;
        r.meta("b2", fresh, 0, true);
        assert_eq!(r.messages(), 0);
        r.record(tag(2), &msg("t", 1, tag(2)), 0, |_, _| true);
        assert_eq!(r.messages(), 0, "the old filter is no longer indexed");
        assert!(r.close("b2", "c"));
        assert!(r.by_filter.is_empty());
    }

    #[test]
    fn copies_merge_by_id_in_each_origins_order() {
        let mk = |seqs: &[u64]| MeshSession {
            client_id: "c".into(),
            subscriptions: vec![sub("t", 1)],
            pending: seqs.iter().map(|s| (0, msg("t", 1, tag(*s)))).collect(),
            ..MeshSession::default()
        };
        let merged = merge(vec![mk(&[1, 3]), mk(&[1, 2, 3, 4]), mk(&[])]).expect("some");
        assert_eq!(payloads(&merged), ["m1", "m2", "m3", "m4"]);
        assert!(merge(Vec::new()).is_none());
    }

    /// The packet ids the owner reported go with a restore (MQTT-4.4.0-1): each message still
    /// unacknowledged under the id it was sent with, the PUBRELs owed, the last id; an
    /// acknowledgement or a PUBCOMP frees its id, a Clean Start forgets them all, and another
    /// node's word is not the owner's.
    #[test]
    fn a_restore_carries_the_packet_ids_of_the_owners_deliveries() {
        let mut r = Replicas::new(100, 100);
        r.meta("b1", meta("c", vec![sub("a/+", 2)], true), 0, true);
        for seq in 1..=4 {
            r.record(tag(seq), &msg("a/x", 2, tag(seq)), 0, |_, _| true);
        }
        let id = |seq| MsgId { origin: 9, seq };
        let sent = |seq, pkid| PkidEvent::Sent { id: id(seq), pkid };
        // m1 PUBREC'd (acknowledged, its PUBREL owed), m2 acknowledged, m3 in flight, m4 not sent.
        r.pkids(
            "b1",
            "c",
            &[sent(1, 5), sent(2, 6), PkidEvent::Released(5), sent(3, 7)],
        );
        r.acked("b1", "c", &[id(1), id(2)]);
        r.pkids("b3", "c", &[sent(4, 8), PkidEvent::Released(7)]); // not the owner
        let s = r.session("c", 0, usize::MAX).expect("held");
        assert_eq!(payloads(&s), ["m3", "m4"]);
        let ids: Vec<u16> = s.pending.iter().map(|(pkid, _)| *pkid).collect();
        assert_eq!(ids, [7, 0]);
        assert_eq!((s.pubrels.clone(), s.last_pkid), (vec![5], 7));
        r.pkids("b1", "c", &[PkidEvent::Completed(5)]);
        assert!(r
            .session("c", 0, usize::MAX)
            .expect("held")
            .pubrels
            .is_empty());
        // id 7 free again once m3 is acknowledged; reused for m4
        r.acked("b1", "c", &[id(3)]);
        r.pkids("b1", "c", &[sent(4, 7)]);
        let s = r.session("c", 0, usize::MAX).expect("held");
        assert_eq!(
            (payloads(&s), s.pending[0].0, s.last_pkid),
            (vec!["m4".to_string()], 7, 7)
        );
        r.meta(
            "b1",
            ReplicaMeta {
                fresh: true,
                ..meta("c", vec![sub("a/+", 2)], true)
            },
            0,
            true,
        );
        let s = r.session("c", 0, usize::MAX).expect("held");
        assert_eq!((s.pending.len(), s.last_pkid, s.pubrels.len()), (0, 0, 0));
    }

    /// Merged copies keep a packet id any of them knows, every PUBREL any owes, and the
    /// first known last id.
    #[test]
    fn merged_copies_keep_the_packet_ids_any_copy_knows() {
        let mk = |pending: Vec<(u16, u64)>, pubrels: Vec<u16>, last_pkid| MeshSession {
            client_id: "c".into(),
            subscriptions: vec![sub("t", 2)],
            pending: pending
                .into_iter()
                .map(|(pkid, s)| (pkid, msg("t", 2, tag(s))))
                .collect(),
            pubrels,
            last_pkid,
            ..MeshSession::default()
        };
        let merged = merge(vec![
            mk(vec![(0, 1), (0, 2)], vec![3], 0),
            mk(vec![(4, 1), (0, 2)], vec![], 4),
            mk(vec![(0, 2)], vec![3, 9], 2),
        ])
        .expect("some");
        let ids: Vec<u16> = merged.pending.iter().map(|(pkid, _)| *pkid).collect();
        assert_eq!(
            (payloads(&merged), ids),
            (vec!["m1".to_string(), "m2".to_string()], vec![4, 0])
        );
        assert_eq!((merged.pubrels, merged.last_pkid), (vec![3, 9], 4));
    }

    #[test]
    fn the_book_announces_every_change_of_a_persistent_session() {
        let mut b = Book::default();
        assert_eq!(b.connected("c", false, 0, 1, None), None, "not persistent");
        let Some(Announce::Meta(m)) = b.connected("c", true, u32::MAX, 1, None) else {
            panic!("announced")
        };
        assert!(m.fresh && m.online && m.subscriptions.is_empty());
        let Some(Announce::Meta(m)) = b.subscribed("c", vec![sub("a", 1), sub("b", 2)]) else {
            panic!("announced")
        };
        assert_eq!(m.subscriptions.len(), 2);
        assert_eq!(b.unsubscribed("c", &["x".into()]), None);
        let Some(Announce::Meta(m)) = b.unsubscribed("c", &["a".into()]) else {
            panic!("announced")
        };
        assert_eq!(m.subscriptions, [sub("b", 2)]);
        let Some(Announce::Meta(m)) = b.disconnected("c", 1, None, false, 5) else {
            panic!("announced")
        };
        assert!(!m.online);
        // resumed: the subscriptions are still there
        let Some(Announce::Meta(m)) = b.connected("c", false, 30, 2, None) else {
            panic!("announced")
        };
        assert_eq!((m.subscriptions.len(), m.expiry, m.fresh), (1, 30, false));
        // a third connection takes the second over: the second's end changes nothing
        assert!(b.connected("c", false, 30, 3, None).is_some());
        assert_eq!(b.disconnected("c", 2, None, false, 6), None);
        assert_eq!(
            b.disconnected("c", 3, Some(0), false, 9),
            Some(Announce::Close("c".into()))
        );
        assert!(b.is_empty());
        b.connected("d", false, 10, 4, None);
        b.disconnected("d", 4, None, false, 1_000);
        assert!(b.expire(10_999).is_empty());
        assert_eq!(b.expire(11_000), [Announce::Close("d".into())]);
        assert_eq!(
            b.subscribed("d", vec![sub("a", 1)]),
            None,
            "not a session of this node"
        );
    }

    fn will_meta(client: &str, expiry: u32, delay: u32, online: bool) -> ReplicaMeta {
        let mut m = meta(client, Vec::new(), online);
        m.expiry = expiry;
        m.will = Some(MeshWill {
            publish: MeshPublish {
                topic: Bytes::from_static(b"w"),
                payload: Bytes::from(client.to_owned()),
                ..MeshPublish::default()
            },
            delay,
        });
        m
    }

    #[test]
    fn a_dead_owners_will_is_published_once_after_its_delay_by_one_node() {
        let mut r = Replicas::new(10, 10);
        // a will-only replica (the session ended with the connection): due at the death
        r.meta("b1", will_meta("a", 0, 5, true), 0, true);
        // a persistent session with a 60 s delay but a 3 s expiry: 3 s after the death
        r.meta("b1", will_meta("b", 3, 60, true), 0, true);
        // online when the owner died at 10 s: its 5 s delay counts from the death
        r.meta("b1", will_meta("e", 60, 5, true), 0, true);
        let down = |o: &str| (o == "b1").then_some(10_000);
        assert!(r.due_wills(9_999, down, |_| true).is_empty());
        assert_eq!(texts(&r.due_wills(10_000, down, |_| true)), ["a"]);
        assert!(!r.holds("a"), "a will-only replica goes with its will");
        assert!(r.due_wills(12_999, down, |_| true).is_empty());
        assert_eq!(texts(&r.due_wills(13_000, down, |_| true)), ["b"]);
        assert!(r.holds("b"), "the session stays for its restore");
        assert_eq!(texts(&r.due_wills(15_000, down, |_| true)), ["e"]);
        assert!(r.due_wills(99_000, down, |_| true).is_empty(), "once");
        // another node publishes it: this one only forgets it
        r.meta("b1", will_meta("c", 0, 0, true), 0, true);
        assert!(r.due_wills(99_000, down, |_| false).is_empty());
        assert!(!r.holds("c"));
    }

    #[test]
    fn a_will_the_owner_lived_to_publish_or_a_reconnect_cancelled_is_not_published() {
        let mut r = Replicas::new(10, 10);
        // offline at 1 s with a 2 s delay, the owner died at 10 s: it published it at 3 s
        r.meta("b1", will_meta("a", 60, 2, false), 1_000, true);
        // offline at 9 s with a 5 s delay: due at 14 s, after the owner's death
        r.meta("b1", will_meta("b", 60, 5, false), 9_000, true);
        // the client came back elsewhere in time
        r.meta("b1", will_meta("c", 0, 5, true), 0, true);
        r.connected_elsewhere("c");
        let down = |o: &str| (o == "b1").then_some(10_000);
        assert!(r.due_wills(13_999, down, |_| true).is_empty());
        let due = r.due_wills(14_000, down, |_| true);
        assert_eq!(due.len(), 1);
        assert_eq!(&due[0].payload[..], b"b");
        assert!(r.due_wills(99_000, down, |_| true).is_empty());
        // an owner alive: nothing
        r.meta("b2", will_meta("d", 0, 0, false), 0, true);
        assert!(r.due_wills(99_000, |_| None, |_| true).is_empty());
        assert!(r.holds("d"));
        assert!(
            r.session("d", 0, usize::MAX).is_none(),
            "a will alone is no session"
        );
    }

    #[test]
    fn a_shared_groups_messages_go_to_the_first_member_restored() {
        let mut r = Replicas::new(100, 100);
        let g = sub("$share/g/t/#", 1);
        r.meta("b1", meta("m1", vec![g.clone()], true), 0, true);
        r.meta("b1", meta("m2", vec![g], true), 0, true);
        // b1 serves 1 and 3; 2 goes to another node's members
        for seq in 1..=3 {
            r.record(tag(seq), &msg("t/x", 1, tag(seq)), 0, |owner, key| {
                owner == "b1" && key == "g/t/#" && seq != 2
            });
        }
        assert_eq!(r.messages(), 2, "held once for the group, not per member");
        // m2 acknowledged 1 on b1
        r.acked("b1", "m2", &[MsgId { origin: 9, seq: 1 }]);
        let s = r.session("m1", 0, usize::MAX).expect("held");
        assert_eq!(payloads(&s), ["m3"]);
        r.drain_groups("m1");
        r.remove("m1");
        assert!(r
            .session("m2", 0, usize::MAX)
            .expect("held")
            .pending
            .is_empty());
        // the group goes with its last member
        r.remove("m2");
        r.expire(0);
        assert!(r.groups.is_empty());
    }

    /// A member's acknowledgement can reach a replica holder before the message does (the
    /// acknowledgement came over the owner's link, the message over the publisher's): the
    /// group does not queue it when it comes, or a restore gives it to a member again.
    #[test]
    fn a_group_message_acknowledged_before_it_came_is_not_queued() {
        let mut r = Replicas::new(100, 100);
        let g = sub("$share/g/t/#", 1);
        r.meta("b1", meta("m1", vec![g], true), 0, true);
        r.acked("b1", "m1", &[MsgId { origin: 9, seq: 1 }]);
        for seq in 1..=2 {
            r.record(tag(seq), &msg("t/x", 1, tag(seq)), 0, |owner, _| {
                owner == "b1"
            });
        }
        let s = r.session("m1", 0, usize::MAX).expect("held");
        assert_eq!(payloads(&s), ["m2"]);
    }

    #[test]
    fn a_moved_session_is_completed_with_what_reached_only_this_node() {
        let moved = MeshSession {
            client_id: "c".into(),
            subscriptions: vec![sub("t", 1)],
            pending: vec![(7, msg("t", 1, tag(2)))],
            ..MeshSession::default()
        };
        let copy = MeshSession {
            pending: [3, 2, 1]
                .iter()
                .map(|s| (0, msg("t", 1, tag(*s))))
                .collect(),
            ..moved.clone()
        };
        let s = complete(moved.clone(), Some(copy));
        assert_eq!(payloads(&s), ["m2", "m1", "m3"]);
        assert_eq!(s.pending[0].0, 7, "the moved session's packet ids stay");
        assert_eq!(complete(moved.clone(), None), moved);
    }

    /// With `k` copies in all, `k - 1` nodes besides the owner queue a session's messages,
    /// the same ones whichever node decides, spread over the nodes; every node when there are
    /// no more nodes than copies.
    #[test]
    fn the_holders_are_the_same_on_every_node_and_as_many_as_the_factor_asks() {
        let live = ["b1", "b2", "b3", "b4", "b5"];
        let mut per_node = HashMap::new();
        for i in 0..300 {
            let client = format!("c{i}");
            for copies in [1, 2] {
                let holders: Vec<&str> = live
                    .iter()
                    .copied()
                    .filter(|n| ranked(&client, "b1", n, &live, copies))
                    .collect();
                assert_eq!(holders.len(), copies, "{client}");
                assert!(
                    !holders.contains(&"b1"),
                    "{client}: the owner holds no replica"
                );
                if copies == 1 {
                    *per_node.entry(holders[0]).or_insert(0) += 1;
                }
            }
            assert!(live[1..].iter().all(|n| ranked(&client, "b1", n, &live, 4)));
            assert!(ranked(&client, "b1", "b2", &live[..2], 1));
        }
        // spread: each of the 4 other nodes holds some of the 300
        assert_eq!(per_node.len(), 4, "{per_node:?}");
        assert!(per_node.values().all(|n| *n > 40), "{per_node:?}");
        // a holder's death moves only its sessions: the survivors keep theirs
        for i in 0..300 {
            let client = format!("c{i}");
            let before = live.iter().find(|n| ranked(&client, "b1", n, &live, 1));
            let after = live[..4]
                .iter()
                .find(|n| ranked(&client, "b1", n, &live[..4], 1));
            if before != Some(&"b5") {
                assert_eq!(before, after, "{client}");
            }
        }
    }

    /// A dormant replica keeps the meta (a restore gets the subscriptions, the will stands)
    /// but queues nothing; ranked after a membership change, it queues from then on.
    #[test]
    fn a_dormant_replica_queues_nothing_until_this_node_ranks_for_it() {
        let mut r = Replicas::new(100, 100);
        r.meta("b1", meta("c", vec![sub("t", 1)], true), 0, false);
        r.record(tag(1), &msg("t", 1, tag(1)), 0, |_, _| true);
        assert_eq!((r.active(), r.messages()), (0, 0));
        let s = r.session("c", 0, usize::MAX).expect("the meta");
        assert_eq!(s.subscriptions.len(), 1);
        assert!(s.pending.is_empty());
        // a later meta from the owner (a subscription) does not wake it either
        r.meta(
            "b1",
            meta("c", vec![sub("t", 1), sub("u", 1)], true),
            0,
            false,
        );
        r.record(tag(2), &msg("u", 1, tag(2)), 0, |_, _| true);
        assert_eq!(r.messages(), 0);
        assert_eq!(r.rerank(10, |_, _| true), 1);
        assert_eq!(r.rerank(10, |_, _| true), 0, "once");
        r.record(tag(3), &msg("u", 1, tag(3)), 0, |_, _| true);
        assert_eq!(
            payloads(&r.session("c", 0, usize::MAX).expect("held")),
            ["m3"]
        );
    }

    /// A dormant replica activated (its client is about to be restored here) queues at once,
    /// once.
    #[test]
    fn an_activated_replica_queues_at_once() {
        let mut r = Replicas::new(100, 100);
        r.meta("b1", meta("c", vec![sub("t", 1)], false), 0, false);
        assert!(!r.activate("nobody"));
        assert!(r.activate("c"));
        assert!(!r.activate("c"), "once");
        r.record(tag(1), &msg("t", 1, tag(1)), 0, |_, _| true);
        assert_eq!(
            payloads(&r.session("c", 0, usize::MAX).expect("held")),
            ["m1"]
        );
    }

    /// A replica this node no longer ranks for goes on queueing until what it holds is
    /// acknowledged and the grace passed: the copies never drop below what they were.
    #[test]
    fn an_unranked_replica_goes_dormant_only_once_empty_and_after_the_grace() {
        let mut r = Replicas::new(100, 100);
        r.meta("b1", meta("c", vec![sub("t", 1)], true), 0, true);
        r.record(tag(1), &msg("t", 1, tag(1)), 0, |_, _| true);
        r.rerank(1_000, |_, _| false);
        r.record(tag(2), &msg("t", 1, tag(2)), 1_000, |_, _| true);
        assert_eq!(r.messages(), 2, "still queueing");
        assert_eq!(r.demote(1_000 + DEMOTE_AFTER_MS), 0, "it holds messages");
        r.acked(
            "b1",
            "c",
            &[MsgId { origin: 9, seq: 1 }, MsgId { origin: 9, seq: 2 }],
        );
        assert_eq!(r.demote(1_000 + DEMOTE_AFTER_MS - 1), 0, "the grace");
        // a meta that comes meanwhile (not ranked) changes nothing of that
        r.meta("b1", meta("c", vec![sub("t", 1)], true), 2_000, false);
        assert_eq!(r.demote(1_000 + DEMOTE_AFTER_MS), 1);
        assert_eq!(r.active(), 0);
        r.record(tag(3), &msg("t", 1, tag(3)), 9_000, |_, _| true);
        assert_eq!(r.messages(), 0);
        assert!(r.holds("c"), "the meta stays");
        // ranked again before the grace ends: it stays
        r.rerank(10_000, |_, _| true);
        r.rerank(11_000, |_, _| false);
        r.rerank(12_000, |_, _| true);
        assert_eq!(r.demote(30_000), 0);
        assert_eq!(r.active(), 1);
    }
}
