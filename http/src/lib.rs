//! The admin-style HTTP serving that mqlb's three HTTP endpoints share: the LB's admin API, a
//! broker node's http endpoint and the HA server's API. One serve loop ([`server`], hardened
//! against idle connections), one access guard ([`access`]: Host, Origin, bearer token), one
//! status-page shell ([`page`]), the reply builders ([`reply`], [`json`]) and the Prometheus
//! text rendering ([`metrics`]). Its own crate, below the LB, the broker and the HA server, so
//! that serving HTTP does not make the LB and the broker link the HA server (and its SQLite).

pub mod access;
pub mod log_limit;
pub mod metrics;
pub mod page;
pub mod server;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

pub use access::{Guard, Policy};
pub use page::Page;
pub use server::serve;

/// What every handler answers.
pub type Reply = Response<Full<Bytes>>;

/// A `status` answer with `body` as `content_type` (left out if it is not a valid header value).
pub fn reply(status: StatusCode, content_type: &str, body: String) -> Reply {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        res.headers_mut().insert(CONTENT_TYPE, v);
    }
    res
}

/// A `status` answer with `v` as indented JSON and a final newline (readable with `curl`).
pub fn json(status: StatusCode, v: &serde_json::Value) -> Reply {
    reply(status, "application/json", format!("{v:#}\n"))
}

/// Locks a mutex even if a panicking holder poisoned it: what mqlb guards with one (counters,
/// small maps, records, a database handle) stays meaningful, and a server that stopped
/// answering over one panicked request would be worse. The one copy the LB, the broker and the
/// HA server all use.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
