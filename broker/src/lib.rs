//! mqlb's broker node: a rumqttd broker that can be stopped, and a full-mesh cluster link so a
//! publish on any node reaches subscribers on every node (docs/design.md, "broker: a node").
//!
//! [`tap`] sees local clients' publishes inside rumqttd's codec; [`mesh`] carries them to each
//! peer once and injects what peers send into the local router; [`node`] composes it all on a
//! runtime the node owns. [`auth`] holds the node's logins and ACL (mosquitto's files).

pub mod auth;
mod clients;
mod counted;
mod durable;
mod front;
mod http;
mod membership;
pub mod mesh;
pub mod metrics;
pub mod node;
mod replica;
mod replication;
mod session;
mod share;
mod tap;
mod watchdog;

pub use mesh::MeshSettings;
pub use node::{Node, NodeError, NodeSpec};
