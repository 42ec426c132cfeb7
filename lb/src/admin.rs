//! The admin server (hyper, loopback by default): the status page (`/`), Prometheus metrics,
//! liveness, the backend, rule, connection and event views, and drain/enable. Its paths and
//! JSON fields are a public contract (docs/design.md, "lb"). Every request passes the Host/Origin/token checks of
//! [`mqlb_http::access`] first (docs/design.md, "Security"), with the token of the
//! config in force, so a reload that changes `admin_token_file` applies to the next request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use mqlb_http::{json as json_reply, reply, Guard, Page, Policy};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::events::Kind;
use crate::shared::Shared;

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Every pool member with its state, as `/api/backends` lists it.
pub(crate) fn backends_json(shared: &Shared) -> Value {
    let snap = shared.snapshot.load();
    let mut out = Vec::new();
    for pool in &snap.pools {
        for m in &pool.members {
            let probe = m.state.last_probe().map(|p| {
                json!({
                    "ok": p.ok,
                    "detail": p.detail,
                    "time": unix(p.at),
                    "duration_ms": p.duration.as_secs_f64() * 1000.0,
                })
            });
            out.push(json!({
                "pool": pool.cfg.name,
                "id": m.cfg.id,
                "addr": m.cfg.addr.to_string(),
                "weight": m.cfg.weight.get(),
                "evacuating": evacuating(shared, &m.cfg.id),
                "evacuation": evacuation_json(shared, &m.cfg.id),
                "state": m.state.state_name(),
                "why": m.state.why_not(),
                "active_connections": m.state.active(),
                "pending_connects": m.state.pending.pending(),
                "queued_connects": m.state.pending.queued(),
                "last_probe": probe,
                "down_since": m.state.down_since().map(unix),
            }));
        }
    }
    Value::Array(out)
}

fn connections_json(shared: &Shared) -> Value {
    let now = std::time::Instant::now();
    Value::Array(
        shared
            .conns
            .snapshot()
            .iter()
            .map(|c| {
                json!({
                    "id": c.id,
                    "rule": c.rule_name(),
                    "client_id": c.client_id,
                    // "TLSv1.3" when mqlb terminates its TLS, else null.
                    "tls": c.tls.and_then(|v| v.as_str()).map(|v| v.replace('_', ".")),
                    "pool": c.rule.pool.cfg.name,
                    "peer": c.peer.to_string(),
                    "backend": c.backend(),
                    "backend_addr": c.backend_addr().to_string(),
                    "since": unix(c.since()),
                    "age_seconds": now.duration_since(c.started).as_secs_f64(),
                    "bytes_in": c.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
                    "bytes_out": c.bytes_out.load(std::sync::atomic::Ordering::Relaxed),
                })
            })
            .collect(),
    )
}

/// Every rule with its frontend, as `/api/rules` lists it (the status page's first table).
fn rules_json(shared: &Shared) -> Value {
    let snap = shared.snapshot.load();
    let mut rules: Vec<_> = snap.rules.values().collect();
    rules.sort_by(|a, b| a.cfg.name.cmp(&b.cfg.name));
    let missing = shared
        .listening
        .missing(rules.iter().map(|r| r.cfg.frontend.as_str()));
    Value::Array(
        rules
            .iter()
            .map(|r| {
                let bind = snap
                    .config
                    .frontends
                    .iter()
                    .find(|f| f.name == r.cfg.frontend);
                json!({
                    "rule": r.cfg.name,
                    "frontend": r.cfg.frontend,
                    "bind": bind.map(|f| f.bind.to_string()),
                    "listening": !missing.contains(&r.cfg.frontend.as_str()),
                    "pool": r.pool.cfg.name,
                    "distribution": r.cfg.distribution.name(),
                })
            })
            .collect(),
    )
}

/// `/api/events?after=SEQ`: the health events after `SEQ` (all kept, without it).
fn events_json(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let after = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("after="));
    match after.map(str::parse::<u64>).transpose() {
        Ok(after) => json_reply(StatusCode::OK, &shared.events.json(after.unwrap_or(0))),
        Err(e) => json_reply(
            StatusCode::BAD_REQUEST,
            &json!({"error": format!("after: {e}")}),
        ),
    }
}

/// The status page (`/`), built once: the same bytes, and CSP hashes, for every request.
fn status_page() -> Response<Full<Bytes>> {
    static PAGE: std::sync::OnceLock<Page> = std::sync::OnceLock::new();
    PAGE.get_or_init(|| {
        Page::new(
            "mqlb load balancer",
            include_str!("admin/status.html"),
            include_str!("admin/status.js"),
        )
    })
    .response()
}

/// Sets or clears draining on every pool member with this ID.
fn set_drain(shared: &Shared, id: &str, on: bool) -> Response<Full<Bytes>> {
    let snap = shared.snapshot.load();
    let mut changed = Vec::new();
    let kind = if on {
        Kind::BackendDrained
    } else {
        Kind::BackendEnabled
    };
    for (pool, m) in snap.members(id) {
        m.state.set_draining(on);
        shared
            .events
            .record(kind, Some(&pool.cfg.name), Some(id), None);
        changed.push(json!({"pool": pool.cfg.name, "id": id, "state": m.state.state_name()}));
    }
    if changed.is_empty() {
        return json_reply(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("no backend with id {id:?}")}),
        );
    }
    tracing::info!(
        backend = id,
        draining = on,
        "backend drain state changed by the admin API"
    );
    remember(shared, id, on, None);
    if !on {
        shared.evacuations.cancel(id);
    }
    json_reply(StatusCode::OK, &Value::Array(changed))
}

/// True while an evacuation of backend `id` runs.
fn evacuating(shared: &Shared, id: &str) -> bool {
    shared
        .evacuations
        .get(id)
        .is_some_and(|p| !p.done.load(std::sync::atomic::Ordering::Acquire))
}

/// An evacuation's progress for `/api/backends`: `null` if none was started.
fn evacuation_json(shared: &Shared, id: &str) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    shared.evacuations.get(id).map_or(Value::Null, |p| {
        json!({
            "rate": p.rate,
            "started": unix(p.started),
            "told": p.told.load(Relaxed),
            "remaining": p.remaining.load(Relaxed),
            "done": p.done.load(std::sync::atomic::Ordering::Acquire),
        })
    })
}

/// `POST /api/backends/{id}/evacuate?rate=N` (N a second, default 100): drains the backend,
/// then moves its live connections off at that pace (`evacuate`). Remembered like a drain.
fn evacuate(shared: &Arc<Shared>, id: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let rate = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("rate="))
        .map_or(Ok(DEFAULT_EVACUATION_RATE), str::parse::<u32>);
    let Some(rate) = rate
        .ok()
        .filter(|r| *r <= 100_000)
        .and_then(std::num::NonZeroU32::new)
    else {
        return json_reply(
            StatusCode::BAD_REQUEST,
            &json!({"error": "rate: connections a second, 1 to 100000"}),
        );
    };
    let drained = set_drain(shared, id, true);
    if drained.status() != StatusCode::OK {
        return drained;
    }
    remember(shared, id, true, Some(rate.get()));
    shared.evacuate(id, rate);
    tracing::info!(
        backend = id,
        rate = rate.get(),
        "backend evacuation started by the admin API"
    );
    json_reply(
        StatusCode::OK,
        &json!({"id": id, "state": "draining", "evacuation": evacuation_json(shared, id)}),
    )
}

/// Connections a second an evacuation moves when the request does not say.
const DEFAULT_EVACUATION_RATE: u32 = 100;

/// Keeps an admin decision for the next start. It is in force either way; a state file that
/// cannot be written only means a restart would forget it, which the log says.
fn remember(shared: &Shared, id: &str, drain: bool, evacuate_rate: Option<u32>) {
    let d = crate::admin_state::Decision {
        drain,
        evacuate_rate,
    };
    if let Err(e) = shared.admin_state.record(id, d) {
        tracing::error!(
            backend = id,
            "admin decision not saved; a restart will forget it: {e}"
        );
    }
}

/// Why the LB is not serving, if it is not: shutting down, or a frontend of a rule without a
/// running accept loop (its port is closed although the process is alive).
fn health_problem(shared: &Shared) -> Option<String> {
    if shared.stopping.is_cancelled() {
        return Some("stopping".into());
    }
    let snap = shared.snapshot.load();
    let missing = shared
        .listening
        .missing(snap.rules.keys().map(String::as_str));
    (!missing.is_empty()).then(|| format!("not listening: frontend {}", missing.join(", ")))
}

fn route(shared: &Arc<Shared>, guard: &Guard, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["metrics"]) => match shared
            .metrics
            .render()
            .and_then(|text| Ok(text + &guard.render()?))
        {
            Ok(text) => reply(StatusCode::OK, mqlb_http::metrics::CONTENT_TYPE, text),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("metrics: {e}\n"),
            ),
        },
        (&Method::GET, ["healthz"]) => match health_problem(shared) {
            Some(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why + "\n"),
            None => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        },
        (&Method::GET, [""]) => status_page(),
        (&Method::GET, ["api", "rules"]) => json_reply(StatusCode::OK, &rules_json(shared)),
        (&Method::GET, ["api", "events"]) => events_json(shared, req),
        (&Method::GET, ["api", "backends"]) => json_reply(StatusCode::OK, &backends_json(shared)),
        (&Method::GET, ["api", "connections"]) => {
            json_reply(StatusCode::OK, &connections_json(shared))
        }
        (&Method::POST, ["api", "backends", id, "drain"]) => set_drain(shared, id, true),
        (&Method::POST, ["api", "backends", id, "enable"]) => set_drain(shared, id, false),
        (&Method::POST, ["api", "backends", id, "evacuate"]) => evacuate(shared, id, req),
        (
            _,
            ["" | "metrics" | "healthz"] | ["api", "backends" | "connections" | "rules" | "events"],
        ) => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves the admin API on `listener` until `stop` fires.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    // Host is checked against the address really bound (tests and `:0` binds get another port).
    let bind = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            let configured = shared.snapshot.load().config.lb.admin;
            tracing::warn!(error = %e, %configured, "admin server: bound address unknown; Host is checked against the configured one");
            configured
        }
    };
    let guard = match Guard::new("admin") {
        Ok(g) => Arc::new(g),
        Err(e) => {
            tracing::error!(error = %e, "admin server not started");
            return;
        }
    };
    let registry = shared.metrics.registry().clone();
    mqlb_http::serve(
        "admin",
        "mqlb_admin",
        &registry,
        listener,
        stop,
        move |req| {
            let res = handle(&shared, &guard, bind, &req);
            async move { res }
        },
    )
    .await
}

fn handle(
    shared: &Arc<Shared>,
    guard: &Guard,
    bind: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let config = shared.snapshot.load().config.clone();
    let policy = Policy {
        bind,
        token: config.lb.admin_token.as_ref(),
    };
    match guard.refuse(req, &policy) {
        None => route(shared, guard, req),
        Some(refused) => refused,
    }
}
