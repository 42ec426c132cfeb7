//! mqlb's L4 load balancer: Azure LB's model (frontends, pools, probes, rules) with MQTT
//! client-ID routing on top.
//!
//! The picture: [`Lb`] (`lb.rs`) starts, reloads and stops it; every change of configuration
//! or membership goes through its one reload executor, planned by [`reload`]. On each data-path
//! thread (`workers`) every frontend has an accept loop ([`listener`], with `limits` at
//! accept); each connection is one task whose path is `conn`: inspect the first bytes, route
//! (a pure decision), connect (with the backend's `pending` admission), relay, and an
//! `outcome`. Backend health comes from `health`: one probe task per backend, the LB's own
//! data-path probe, and passive failures of client connects, all fed to the pure state machine
//! of `backend`. Everything the data path reads is one immutable `snapshot::Snapshot` behind
//! one `ArcSwap` in `shared`; per-backend live state (`backend::BackendState`) is carried
//! across snapshots, per-connection state is in `state`. `admin` serves the API and
//! `/metrics` (`metrics`); `discovery` follows the HA server's membership. Pure logic (CONNECT
//! parsing in `mqlb-mqtt`, selection in [`select`], the health machine, the reload plan, the
//! routing decision) has no sockets and is tested beside the code.
//!
//! The modules are layered, each importing only those above it in this list (no import
//! circle): the bottom (`outcome`, `select`, `port`, `limits`, `backend`, and `proxy_protocol`,
//! the PROXY header codec), the data
//! (`metrics`, `snapshot`, `state`, `admin_state`, `evacuate`, `events`, `discovery`), the
//! state every task shares (`shared`), the tasks over it (`conn`, `health`, `listener`,
//! `admin`), and the facade that starts them (`lb`, with `reload` and `workers`).

mod backend;
mod limits;
mod outcome;
pub mod port;
mod proxy_protocol;
pub mod select;

mod admin_state;
mod discovery;
mod evacuate;
mod events;
mod metrics;
mod snapshot;
mod state;

mod shared;

mod admin;
mod conn;
mod health;
pub mod listener;

mod lb;
pub mod reload;
mod workers;

/// The MQTT packets, from the `mqlb-mqtt` crate, by their old path `crate::mqtt` inside the LB;
/// other crates use `mqlb_mqtt` itself.
use mqlb_mqtt as mqtt;

pub use health::probe::{probe_once, probe_once_via, ProbeError, Via};
pub use lb::{Lb, Listeners, ReloadError, StartError};
