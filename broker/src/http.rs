//! The node's small HTTP endpoint: `/metrics` (Prometheus), `/healthz` (200 while serving,
//! with each mesh link's state), the status page (`/`) with `/api/status`, and `/api/clients`
//! (each connection's client ID, listener and address). Requests pass the Host/Origin/token checks of
//! [`mqlb_http::access`] first (docs/design.md, "Security"): the peer list and the metrics
//! are a map of the cluster, and the endpoint will take writes one day.

use std::sync::Arc;

use hyper::StatusCode;
use mqlb_config::Secret;
use mqlb_http::{Guard, Page, Policy, Reply};
use rumqttd::StatsControl;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clients::Clients;
use crate::mesh::Mesh;
use crate::metrics::Metrics;

fn respond(metrics: &Metrics, guard: &Guard, mesh: &Mesh, clients: &Clients, path: &str) -> Reply {
    match path {
        "/" => return status_page(),
        "/api/status" => return status_json(mesh),
        "/api/clients" => return mqlb_http::json(StatusCode::OK, &clients.json()),
        _ => {}
    }
    let content_type = if path == "/metrics" {
        mqlb_http::metrics::CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let (status, body) = match path {
        "/metrics" => match metrics.render().and_then(|t| Ok(t + &guard.render()?)) {
            Ok(t) => (StatusCode::OK, t),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        "/healthz" => {
            let mut body = format!("ok {}\n", mesh.id);
            for p in mesh.peers().iter() {
                body += &format!("peer {} {}\n", p.id, if p.is_up() { "up" } else { "down" });
            }
            (StatusCode::OK, body)
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    };
    mqlb_http::reply(status, content_type, body)
}

/// The status page (`/`, built once): the node, its clients and sessions, its mesh links.
fn status_page() -> Reply {
    static PAGE: std::sync::OnceLock<Page> = std::sync::OnceLock::new();
    PAGE.get_or_init(|| {
        Page::new(
            "mqlb broker node",
            include_str!("http/status.html"),
            include_str!("http/status.js"),
        )
    })
    .response()
}

/// `/api/status`: the node and each mesh link, for the status page (the counts are in
/// `/metrics`).
fn status_json(mesh: &Mesh) -> Reply {
    let peers: Vec<_> = mesh
        .peers()
        .iter()
        .map(|p| {
            serde_json::json!({
                "id": p.id,
                "addr": p.addr.to_string(),
                "up": p.is_up(),
                "backlog": p.backlog(),
            })
        })
        .collect();
    let body = serde_json::json!({"id": mesh.id, "peers": peers});
    mqlb_http::json(StatusCode::OK, &body)
}

/// Serves the endpoint on `listener` until `stop` fires; `token` is the node's
/// `http_token_file`.
pub(crate) async fn serve(
    metrics: Arc<Metrics>,
    mesh: Arc<Mesh>,
    clients: Arc<Clients>,
    router: StatsControl,
    listener: TcpListener,
    token: Option<Secret>,
    stop: CancellationToken,
) {
    let bind = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "broker http not started: bound address unknown");
            return;
        }
    };
    let guard = match Guard::new("broker") {
        Ok(g) => Arc::new(g),
        Err(e) => {
            tracing::error!(error = %e, "broker http not started");
            return;
        }
    };
    let registry = metrics.registry().clone();
    mqlb_http::serve(
        "broker",
        "mqlb_broker",
        &registry,
        listener,
        stop,
        move |req| {
            let policy = Policy {
                bind,
                token: token.as_ref(),
            };
            let refused = guard.refuse(&req, &policy);
            let (metrics, guard, mesh, clients, router) = (
                metrics.clone(),
                guard.clone(),
                mesh.clone(),
                clients.clone(),
                router.clone(),
            );
            let path = req.uri().path().to_owned();
            async move {
                if let Some(refused) = refused {
                    return refused;
                }
                if path == "/metrics" {
                    metrics.refresh(&router, &mesh).await;
                }
                respond(&metrics, &guard, &mesh, &clients, &path)
            }
        },
    )
    .await
}
