//! The HA server's API as its clients see it: the JSON shapes (`model`: registrations, members,
//! the membership view, events; `retained`, `sessions`, `queued`: retained messages, persistent sessions and their queued
//! messages kept for a whole-cluster restart), the request signing with the cluster secret (`auth`) and the
//! client that brokers and load balancers use (`client::HaClient`: every HA server tried in
//! turn, a backup's redirect followed). Its own crate so that the LB and the broker, which only
//! talk to the HA server, do not link the server itself and its SQLite; `mqlb-haserver`
//! re-exports it by the same paths.

pub mod auth;
pub mod client;
pub mod model;
pub mod queued;
pub mod retained;
pub mod sessions;

pub use client::{ClientError, HaClient};

/// Now as Unix milliseconds, the clock a request's `X-Mqlb-Time` is stamped with (0 before
/// 1970: a clock that wrong fails the server's window check anyway).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
