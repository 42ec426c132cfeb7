//! mqlb's HA server (docs/design.md, "haserver"): broker membership with heartbeats, a version that
//! clients watch with long-polls, an event log, and a primary lease, all in SQLite.

pub mod auth;
pub mod expiry;
pub mod http_access;
pub mod http_server;
pub mod log_limit;
pub mod model;
pub mod server;
pub mod status_page;
pub mod store;

pub use server::{HaError, HaServer, Options, Timing};
pub use store::{SqliteStore, Store, StoreError};
pub mod client;

pub use client::{ClientError, HaClient};

/// Locks a mutex even if a panicking holder poisoned it: what it guards (a database handle,
/// small maps) stays usable.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
