//! mqlb's HA server (DESIGN.md, "haserver"): broker membership with heartbeats, a version that
//! clients watch with long-polls, an event log, and a primary lease, all in SQLite.

pub mod model;
pub mod store;
