//! The node's small HTTP endpoint: `/metrics` (Prometheus) and `/healthz` (200 while serving,
//! with each mesh link's state).

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::mesh::Mesh;
use crate::metrics::Metrics;

fn respond(metrics: &Metrics, mesh: &Mesh, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/metrics" => match metrics.render() {
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
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res
}

pub(crate) async fn serve(
    metrics: Arc<Metrics>,
    mesh: Arc<Mesh>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    mqlb_haserver::http_server::serve("broker", listener, stop, move |req| {
        let res = respond(&metrics, &mesh, req.uri().path());
        async move { res }
    })
    .await
}
