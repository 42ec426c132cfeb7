//! mqlb's L4 load balancer: Azure LB's model (frontends, pools, probes, rules) with MQTT
//! client-ID routing on top.
//!
//! The picture: [`Lb`] (`lb.rs`) starts, reloads and stops it; every change of configuration
//! or membership goes through its one reload executor, planned by [`reload`]. On each data-path
//! thread (`workers`) every frontend has an accept loop ([`listener`], with `limits` at
//! accept); each connection is one task whose path is `conn`: inspect the first bytes, route
//! (a pure decision), connect (with `pending` admission), relay. Backend health comes from one
//! probe task per backend (`probe`, the pure state machine in `health`), passive failures of
//! client connects, and the LB's own data-path probe (`data_path`). Everything the data path
//! reads is one immutable `snapshot::Snapshot` behind one `ArcSwap` in `shared`; per-backend
//! live state (`state::BackendState`) is carried across snapshots. `admin` serves the API
//! and `/metrics` (`metrics`); `discovery` follows the HA server's membership. Pure logic
//! (CONNECT parsing in `mqlb-mqtt`, selection in [`select`], health, the reload plan, the routing
//! decision) has no sockets and is tested beside the code.

mod health;
mod metrics;
pub mod select;
mod snapshot;
mod state;

mod admin;
pub mod admin_state;
mod conn;
mod data_path;
mod discovery;
pub mod evacuate;
mod events;
mod lb;
mod limits;
pub mod listener;
mod pending;
pub mod port;
mod probe;
pub mod reload;
mod shared;
mod workers;

/// The MQTT packets, from the `mqlb-mqtt` crate, by their old path `crate::mqtt` inside the LB;
/// other crates use `mqlb_mqtt` itself.
use mqlb_mqtt as mqtt;

pub use lb::{Lb, Listeners, ReloadError, StartError};
pub use probe::{probe_once, ProbeError};
