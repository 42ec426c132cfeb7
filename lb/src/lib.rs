//! mqlb's L4 load balancer: Azure LB's model (frontends, pools, probes, rules) with MQTT
//! client-ID routing on top.
//!
//! The picture (DESIGN.md, "lb: the data path"): one accept loop per frontend ([`listener`]),
//! one task per connection ([`conn`]), one probe task per backend ([`probe`]), the admin
//! server ([`admin`]) and the reload watcher ([`reload`]). Everything the data path reads is
//! one immutable [`snapshot::Snapshot`] behind one `ArcSwap`; per-backend live state
//! ([`state::BackendState`]) is carried across snapshots. Pure logic (CONNECT parsing,
//! selection, the health state machine, the reload plan) has no sockets and is tested beside
//! the code.

pub mod health;
pub mod metrics;
pub mod mqtt;
pub mod select;
pub mod snapshot;
pub mod state;

pub mod admin;
mod conn;
pub mod discovery;
mod lb;
pub mod limits;
pub mod listener;
pub mod pending;
pub mod port;
pub mod probe;
pub mod reload;
mod shared;
mod workers;

pub use lb::{run, Lb, Listeners, ReloadError, StartError};
pub use probe::{probe_once, ProbeError};
