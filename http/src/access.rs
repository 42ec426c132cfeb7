//! Who may use the LB's admin API and a broker's http endpoint (docs/design.md, "Security";
//! issue 13, where one cross-site-style POST drained every backend).
//!
//! Both serve plain HTTP, on loopback by default, so besides someone on the network the threat
//! is a web page the operator has open: it can make the browser POST to `127.0.0.1:9883`
//! (CSRF), or resolve a name of its own to `127.0.0.1` and read the answers (DNS rebinding).
//! Browsers give both away: a cross-site request carries `Origin`, a rebound one carries the
//! page's name in `Host`. So, before anything else:
//! - a request with an `Origin` header is refused (403): our status page (`/`) reads the APIs
//!   with same-origin GETs, which carry none, and no other page may call them;
//! - a request whose `Host` is not the bind address (`localhost:PORT` too on a loopback bind,
//!   any IP literal with the right port on an unspecified one) is refused (403);
//! - every write (any method but GET and HEAD) needs `Authorization: Bearer <token>` when a
//!   token is configured, and off loopback so does every read but `/healthz` (the LB's HTTP
//!   probe and orchestrators ask it without one) and `/`, the status page, a static shell with
//!   no data that asks for the token itself ([`crate::page`]); without a token, writes are taken only on a
//!   loopback bind (the quick start). The config refuses a non-loopback bind without a token.
//!
//! The decision ([`authorize`]) is a pure function of the request's head and the [`Policy`];
//! [`Guard`] applies it, counts refusals (`mqlb_admin_requests_refused_total{reason}`), logs
//! them rate-limited and answers them. It lives here, beside [`crate::server`], because the LB
//! and the brokers serve through this crate already; the config crate stays free of HTTP types.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, HOST, ORIGIN, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use mqlb_config::Secret;
use prometheus::{IntCounterVec, Opts, Registry};
use sha2::Sha256;

use crate::lock;
use crate::log_limit::LogLimiter;

/// The path every caller may read without a token (liveness).
pub const OPEN_PATH: &str = "/healthz";
/// The status page: no data in it, so open like [`OPEN_PATH`] (see [`crate::page`]).
pub const PAGE_PATH: &str = "/";

/// What a server accepts: its bound address (the real one, not `:0`) and its token.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    pub bind: SocketAddr,
    pub token: Option<&'a Secret>,
}

/// Why a request was refused; [`Refusal::reason`] is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("an Origin header (a browser on a page's behalf)")]
    Origin,
    #[error("Host is missing, repeated or not this server's address")]
    Host,
    #[error("no bearer token")]
    MissingToken,
    #[error("a wrong or malformed bearer token")]
    BadToken,
    #[error("writes need a token on a non-loopback bind and none is configured")]
    NoTokenConfigured,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Origin => "origin",
            Refusal::Host => "host",
            Refusal::MissingToken => "missing_token",
            Refusal::BadToken => "bad_token",
            Refusal::NoTokenConfigured => "no_token_configured",
        }
    }

    /// 401 when a token would let the request in, else 403.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::MissingToken | Refusal::BadToken => StatusCode::UNAUTHORIZED,
            Refusal::Origin | Refusal::Host | Refusal::NoTokenConfigured => StatusCode::FORBIDDEN,
        }
    }
}

/// Whether `req` may be served under `policy` (see the module's rules).
pub fn authorize<B>(req: &Request<B>, policy: &Policy<'_>) -> Result<(), Refusal> {
    let headers = req.headers();
    if headers.contains_key(ORIGIN) {
        return Err(Refusal::Origin);
    }
    let mut hosts = headers.get_all(HOST).iter();
    let host_ok = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h.to_str().is_ok_and(|h| host_allowed(h, policy.bind)),
        _ => false,
    };
    // An absolute-form target (`POST http://evil.example/...`) names a host too.
    let target_ok = req
        .uri()
        .authority()
        .is_none_or(|a| host_allowed(a.as_str(), policy.bind));
    if !host_ok || !target_ok {
        return Err(Refusal::Host);
    }
    let write = !matches!(*req.method(), Method::GET | Method::HEAD);
    let loopback = policy.bind.ip().is_loopback();
    let open = matches!(req.uri().path(), OPEN_PATH | PAGE_PATH);
    let needs_token = write || (!loopback && !open);
    if !needs_token {
        return Ok(());
    }
    let Some(expected) = policy.token else {
        return if loopback {
            Ok(())
        } else {
            Err(Refusal::NoTokenConfigured)
        };
    };
    let mut given = headers.get_all(AUTHORIZATION).iter();
    match (given.next(), given.next()) {
        (None, _) => Err(Refusal::MissingToken),
        (Some(v), None) if bearer(v).is_some_and(|t| token_matches(t, expected)) => Ok(()),
        _ => Err(Refusal::BadToken),
    }
}

/// `host[:port]` names the server bound at `bind`: the port must be the bind's (80 when
/// absent); the host its IP, or any IP literal for an unspecified bind (a rebinding page can
/// only send a name), or `localhost` for a loopback or unspecified bind.
fn host_allowed(authority: &str, bind: SocketAddr) -> bool {
    let Ok(a) = authority.parse::<hyper::http::uri::Authority>() else {
        return false;
    };
    if a.as_str().contains('@') || a.port_u16().unwrap_or(80) != bind.port() {
        return false;
    }
    let host = a.host();
    if host.eq_ignore_ascii_case("localhost") {
        return bind.ip().is_loopback() || bind.ip().is_unspecified();
    }
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    match literal.parse::<IpAddr>() {
        Ok(ip) => ip == bind.ip() || bind.ip().is_unspecified(),
        Err(_) => false,
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer(v: &HeaderValue) -> Option<&[u8]> {
    let v = v.as_bytes();
    let (scheme, rest) = v.split_at(v.iter().position(|&b| b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Compares in constant time: both sides are MACed under a fixed key, and the equal-length
/// tags are compared by `verify_slice` (constant time), so neither where the bytes first differ
/// nor the expected token's length shows in the timing.
fn token_matches(given: &[u8], expected: &Secret) -> bool {
    let tag = |t: &[u8]| {
        <Hmac<Sha256> as Mac>::new_from_slice(b"mqlb bearer token").map(|mut m| {
            m.update(t);
            m
        })
    };
    match (tag(given), tag(expected.expose())) {
        (Ok(g), Ok(e)) => g.verify_slice(&e.finalize().into_bytes()).is_ok(),
        _ => false, // HMAC takes keys of any length; unreachable
    }
}

/// Applies [`authorize`] for one server: counts, logs (at most one line per 10 s) and answers
/// refusals. Its metric lives in a registry of its own, which the server appends to `/metrics`.
pub struct Guard {
    name: &'static str,
    registry: Registry,
    refused: IntCounterVec,
    log: Mutex<LogLimiter>,
}

impl Guard {
    /// A guard whose log lines name the server `name` (`admin`, `broker`).
    pub fn new(name: &'static str) -> Result<Guard, prometheus::Error> {
        let refused = IntCounterVec::new(
            Opts::new(
                "mqlb_admin_requests_refused_total",
                "Requests to the admin/http endpoint refused: origin, host, missing_token, bad_token, no_token_configured.",
            ),
            &["reason"],
        )?;
        let registry = Registry::new();
        registry.register(Box::new(refused.clone()))?;
        Ok(Guard {
            name,
            registry,
            refused,
            log: Mutex::new(LogLimiter::new(Duration::from_secs(10))),
        })
    }

    /// `None` if `req` may be served; else the answer to send instead.
    pub fn refuse<B>(
        &self,
        req: &Request<B>,
        policy: &Policy<'_>,
    ) -> Option<Response<Full<Bytes>>> {
        let refusal = authorize(req, policy).err()?;
        self.refused.with_label_values(&[refusal.reason()]).inc();
        if let Some(suppressed) = lock(&self.log).admit(Instant::now()) {
            let host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
            tracing::warn!(
                server = self.name,
                method = %req.method(),
                path = req.uri().path(),
                host,
                reason = refusal.reason(),
                suppressed,
                "request refused: {refusal}"
            );
        }
        let mut res = Response::new(Full::new(Bytes::from(format!("refused: {refusal}\n"))));
        *res.status_mut() = refusal.status();
        if refusal.status() == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"mqlb\""),
            );
        }
        Some(res)
    }

    /// The guard's metrics in Prometheus text format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        crate::metrics::render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-token";

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("a valid request")
    }

    fn check(
        bind: &str,
        token: Option<&str>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(), Refusal> {
        let secret = token.map(Secret::new);
        let policy = Policy {
            bind: bind.parse().expect("addr"),
            token: secret.as_ref(),
        };
        authorize(&req(method, path, headers), &policy)
    }

    const LOOP: &str = "127.0.0.1:9883";
    const HOST_OK: (&str, &str) = ("host", "127.0.0.1:9883");
    const BEARER: (&str, &str) = ("authorization", "Bearer 0123456789abcdef-token");

    #[test]
    fn an_origin_is_refused_whatever_else_the_request_carries() {
        let origin = ("origin", "http://127.0.0.1:9883");
        for (method, token) in [("GET", None), ("POST", None), ("POST", Some(TOKEN))] {
            assert_eq!(
                check(
                    LOOP,
                    token,
                    method,
                    "/api/backends",
                    &[HOST_OK, BEARER, origin]
                ),
                Err(Refusal::Origin),
                "{method} token={token:?}"
            );
        }
    }

    #[test]
    fn host_must_name_the_bind() {
        let get = |bind: &str, host: &[(&str, &str)]| check(bind, None, "GET", "/metrics", host);
        for ok in ["127.0.0.1:9883", "localhost:9883", "LocalHost:9883"] {
            assert_eq!(get(LOOP, &[("host", ok)]), Ok(()), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9883",
            "127.0.0.1",
            "127.0.0.1:9884",
            "127.0.0.2:9883",
            "user@127.0.0.1:9883",
            "",
        ] {
            assert_eq!(get(LOOP, &[("host", bad)]), Err(Refusal::Host), "{bad:?}");
        }
        assert_eq!(get(LOOP, &[]), Err(Refusal::Host), "missing");
        assert_eq!(
            get(LOOP, &[HOST_OK, ("host", "evil.example")]),
            Err(Refusal::Host),
            "repeated"
        );
        assert_eq!(
            get("[::1]:80", &[("host", "[::1]")]),
            Ok(()),
            "port 80 implied"
        );
        assert_eq!(get("[::1]:80", &[("host", "localhost")]), Ok(()));
        // Unspecified bind: any IP literal with the port, never a name but localhost.
        let any = "0.0.0.0:9883";
        let open = |host| check(any, Some(TOKEN), "GET", "/healthz", &[("host", host)]);
        assert_eq!(open("10.1.2.3:9883"), Ok(()));
        assert_eq!(open("localhost:9883"), Ok(()));
        assert_eq!(open("evil.example:9883"), Err(Refusal::Host));
        let specific = |host| {
            check(
                "10.0.0.1:9883",
                Some(TOKEN),
                "GET",
                "/healthz",
                &[("host", host)],
            )
        };
        assert_eq!(specific("10.0.0.1:9883"), Ok(()));
        assert_eq!(specific("localhost:9883"), Err(Refusal::Host));
        // An absolute-form target must name the server as well.
        let r = check(
            LOOP,
            None,
            "GET",
            "http://evil.example:9883/metrics",
            &[HOST_OK],
        );
        assert_eq!(r, Err(Refusal::Host));
        assert_eq!(
            check(
                LOOP,
                None,
                "GET",
                "http://127.0.0.1:9883/metrics",
                &[HOST_OK]
            ),
            Ok(())
        );
    }

    #[test]
    fn writes_need_the_token_when_one_is_configured() {
        let post = |token, headers: &[(&str, &str)]| {
            check(LOOP, token, "POST", "/api/backends/b1/drain", headers)
        };
        assert_eq!(post(Some(TOKEN), &[HOST_OK]), Err(Refusal::MissingToken));
        assert_eq!(post(Some(TOKEN), &[HOST_OK, BEARER]), Ok(()));
        assert_eq!(
            post(
                Some(TOKEN),
                &[HOST_OK, ("authorization", "bearer 0123456789abcdef-token")]
            ),
            Ok(()),
            "the scheme is case-insensitive"
        );
        for bad in [
            "Bearer 0123456789abcdef-tokeN",
            "Bearer 0123456789abcdef-token-and-more",
            "Bearer 0123456789abcdef",
            "Bearer ",
            "Basic MDEyMzQ1Njc4OWFiY2RlZi10b2tlbg==",
            "0123456789abcdef-token",
        ] {
            assert_eq!(
                post(Some(TOKEN), &[HOST_OK, ("authorization", bad)]),
                Err(Refusal::BadToken),
                "{bad:?}"
            );
        }
        assert_eq!(
            post(Some(TOKEN), &[HOST_OK, BEARER, BEARER]),
            Err(Refusal::BadToken),
            "two Authorization headers"
        );
        // Reads on loopback are open, token or not.
        assert_eq!(
            check(LOOP, Some(TOKEN), "GET", "/api/backends", &[HOST_OK]),
            Ok(())
        );
        assert_eq!(
            check(LOOP, Some(TOKEN), "HEAD", "/metrics", &[HOST_OK]),
            Ok(())
        );
    }

    #[test]
    fn without_a_token_writes_are_taken_only_on_loopback() {
        assert_eq!(
            check(LOOP, None, "POST", "/api/backends/b1/drain", &[HOST_OK]),
            Ok(())
        );
        let host = ("host", "10.0.0.1:9883");
        let off = |method, path| check("10.0.0.1:9883", None, method, path, &[host]);
        assert_eq!(
            off("POST", "/api/backends/b1/drain"),
            Err(Refusal::NoTokenConfigured)
        );
        assert_eq!(off("GET", "/metrics"), Err(Refusal::NoTokenConfigured));
        assert_eq!(off("GET", "/healthz"), Ok(()));
    }

    #[test]
    fn off_loopback_reads_need_the_token_too_but_healthz() {
        let host = ("host", "10.0.0.1:9883");
        let get = |path, headers: &[(&str, &str)]| {
            check("10.0.0.1:9883", Some(TOKEN), "GET", path, headers)
        };
        assert_eq!(get("/api/connections", &[host]), Err(Refusal::MissingToken));
        assert_eq!(get("/api/connections", &[host, BEARER]), Ok(()));
        assert_eq!(get("/healthz", &[host]), Ok(()));
        assert_eq!(get("/healthz/", &[host]), Err(Refusal::MissingToken));
        // The status page's shell is open; what it reads is not.
        assert_eq!(get("/", &[host]), Ok(()));
        assert_eq!(get("/api/backends", &[host]), Err(Refusal::MissingToken));
        assert_eq!(
            check("10.0.0.1:9883", Some(TOKEN), "POST", "/", &[host]),
            Err(Refusal::MissingToken)
        );
    }

    #[test]
    fn refusals_are_counted_by_reason_and_answered() {
        let guard = Guard::new("test").expect("guard");
        let token = Secret::new(TOKEN);
        let policy = Policy {
            bind: LOOP.parse().expect("addr"),
            token: Some(&token),
        };
        let res = guard
            .refuse(&req("POST", "/x", &[HOST_OK]), &policy)
            .expect("refused");
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert!(res.headers().contains_key(WWW_AUTHENTICATE));
        let res = guard
            .refuse(&req("GET", "/x", &[("host", "evil.example")]), &policy)
            .expect("refused");
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert!(guard
            .refuse(&req("GET", "/x", &[HOST_OK]), &policy)
            .is_none());
        let text = guard.render().expect("render");
        assert!(
            text.contains("mqlb_admin_requests_refused_total{reason=\"missing_token\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mqlb_admin_requests_refused_total{reason=\"host\"} 1"),
            "{text}"
        );
    }
}
