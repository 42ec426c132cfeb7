//! mqlb's HA server (docs/design.md, "haserver"): broker membership with heartbeats, a version that
//! clients watch with long-polls, an event log, and a primary lease with fencing, in SQLite (one
//! machine) or PostgreSQL (several).

#[doc(hidden)]
pub mod contract;
pub mod expiry;
pub mod server;
pub mod store;

// The HTTP serving the HA server shares with the LB and the brokers (`mqlb-http`), by the
// paths it had when it lived here.
pub use mqlb_http::log_limit;
pub use mqlb_http::{access as http_access, page as status_page, server as http_server};

pub use server::{HaError, HaServer, Options, Timing};
pub use store::{PostgresOptions, PostgresStore, SqliteStore, Store, StoreError};

// The API as its clients see it (`mqlb-ha-api`: the model, request signing, the client), by
// the paths it had when it lived here.
pub use mqlb_ha_api::{auth, client, model, queued, retained, sessions};
pub use mqlb_ha_api::{ClientError, HaClient};

/// Locks a mutex even if a panicking holder poisoned it (a database handle, small maps).
pub(crate) use mqlb_http::lock;
