use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::protocol::Publish;

/// mqlb patch (across the cluster, issue 12): the embedder's say in a shared subscription
/// (MQTT-4.8.2: each message to one session of the group). A cluster whose every node gets
/// every publish has each node deliver a message to its members of a group only when the node
/// serves it; the router asks [`serves`](Self::serves) for each message it reads for the group
/// and skips the others (the group's cursor moves on, nothing is sent, no inflight slot is
/// taken). `group` is `{ShareName}/{filter}`.
pub trait SharedGroupPolicy: Send + Sync {
    /// The group got its first member on this router (`true`) or lost its last (`false`).
    fn group_changed(&self, group: &str, has_members: bool);
    /// Whether this router delivers `publish`, which reached it at `arrived`, to its members
    /// of `group`.
    fn serves(&self, group: &str, publish: &Publish, arrived: Instant) -> bool;
}

/// mqlb patch (issue 12): a [`SharedGroupPolicy`] in the router's config.
#[derive(Clone)]
pub struct SharedPolicy(pub Arc<dyn SharedGroupPolicy>);

impl fmt::Debug for SharedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedPolicy")
    }
}

/// mqlb patch (issue 12): tells the policy that a group has members while it lives, and that
/// it has none once the router drops it (wherever that happens: UNSUBSCRIBE, disconnection).
pub struct GroupHook {
    name: String,
    policy: Arc<dyn SharedGroupPolicy>,
}

impl GroupHook {
    pub fn new(name: &str, policy: &SharedPolicy) -> GroupHook {
        policy.0.group_changed(name, true);
        GroupHook {
            name: name.to_string(),
            policy: policy.0.clone(),
        }
    }
}

impl Drop for GroupHook {
    fn drop(&mut self) {
        self.policy.group_changed(&self.name, false);
    }
}

pub struct SharedGroup {
    // using Vec over HashSet for maintaining order of iter
    clients: Vec<String>,
    // Index into clients, allows us to skip doing iter everytime
    current_client_index: usize,
    pub cursor: (u64, u64),
    pub strategy: Strategy,
    /// mqlb patch (issue 12): the embedder's policy, if it set one.
    pub hook: Option<GroupHook>,
}

impl SharedGroup {
    pub fn new(cursor: (u64, u64), strategy: Strategy) -> Self {
        SharedGroup {
            clients: vec![],
            current_client_index: 0,
            cursor,
            strategy,
            hook: None,
        }
    }

    /// mqlb patch (issue 12): the group `name` under `policy` (told now that it has members).
    pub fn with_policy(mut self, name: &str, policy: Option<&SharedPolicy>) -> Self {
        self.hook = policy.map(|p| GroupHook::new(name, p));
        self
    }

    /// mqlb patch (issue 12): whether this router delivers `publish` (which reached it at
    /// `arrived`) to the group's members.
    pub fn serves(&self, publish: &Publish, arrived: Instant) -> bool {
        self.hook
            .as_ref()
            .map_or(true, |h| h.policy.serves(&h.name, publish, arrived))
    }

    pub fn contains(&self, client: &str) -> bool {
        self.clients.iter().any(|c| c == client)
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    pub fn current_client(&self) -> Option<&String> {
        self.clients.get(self.current_client_index)
    }

    pub fn add_client(&mut self, client: String) {
        // mqlb patch (MQTT-3.8.4-3): subscribing again replaces the subscription; the client
        // is in the group once, not once per SUBSCRIBE.
        if !self.contains(&client) {
            self.clients.push(client)
        }
    }

    pub fn remove_client(&mut self, client: &String) {
        // remove client from vec
        self.clients.retain(|c| c != client);

        // if there are no clients left, we have to avoid % by 0
        if !self.clients.is_empty() {
            // Make sure that we are within bounds and that next client is the correct client.
            self.current_client_index %= self.clients.len();
        }
    }

    pub fn update_next_client(&mut self) {
        match self.strategy {
            Strategy::RoundRobin => {
                self.current_client_index = (self.current_client_index + 1) % self.clients.len();
            }
            Strategy::Random => {
                self.current_client_index = rand::thread_rng().gen_range(0..self.clients.len());
            }
            Strategy::Sticky => {}
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    RoundRobin,
    Random,
    Sticky,
}

#[cfg(test)]
mod tests {
    use crate::router::shared_subs::Strategy;

    use super::SharedGroup;

    #[test]
    fn performs_round_robin() {
        let mut group = SharedGroup {
            clients: vec!["A".into(), "B".into(), "C".into()],
            current_client_index: 0,
            cursor: (0, 0),
            strategy: Strategy::RoundRobin,
            hook: None,
        };
        group.update_next_client();
        assert_eq!(group.current_client_index, 1);
        group.update_next_client();
        assert_eq!(group.current_client_index, 2);
        group.update_next_client();
        assert_eq!(group.current_client_index, 0);
        group.add_client("D".into());
        assert_eq!(group.current_client_index, 0);
    }

    #[test]
    fn handles_round_robin_when_start_removed() {
        // [ A, B, C ] => 0
        // we remove A
        // [ B, C ] => Should be the next client (B)
        let mut group = SharedGroup {
            clients: vec!["A".into(), "B".into(), "C".into()],
            current_client_index: 0,
            cursor: (0, 0),
            strategy: Strategy::RoundRobin,
            hook: None,
        };
        group.remove_client(&"A".into());
        assert_eq!(group.current_client_index, 0);
        group.update_next_client();
        assert_eq!(group.current_client_index, 1);
        group.update_next_client();
        assert_eq!(group.current_client_index, 0);
    }

    #[test]
    fn handles_round_robin_when_last_removed() {
        // [ A, B, C ] => 2 (C)
        // we remove C
        // [ A, B ] => Should be the next client (A)
        let mut group = SharedGroup {
            clients: vec!["A".into(), "B".into(), "C".into()],
            current_client_index: 0,
            cursor: (0, 0),
            strategy: Strategy::RoundRobin,
            hook: None,
        };
        group.update_next_client();
        assert_eq!(group.current_client_index, 1);
        group.update_next_client();
        assert_eq!(group.current_client_index, 2);
        group.remove_client(&"C".into());
        assert_eq!(group.current_client_index, 0);
    }
}
