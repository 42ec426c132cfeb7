//! Nothing but its tests: `tests/cluster.rs` starts a two-node mqlb broker cluster with the
//! `mqlb-tests` harness and checks, over real MQTT, that a publish reaches a subscriber on the
//! other node.
