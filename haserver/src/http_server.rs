//! The small HTTP/1.1 server loop that mqlb's three HTTP endpoints share: the HA server's API,
//! the LB's admin server and a broker node's `/metrics`. Accepting backs off briefly on errors
//! (out of descriptors) instead of spinning, and every connection ends when `stop` fires.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves `handler` on `listener` until `stop` fires; `name` labels the logs.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    stop: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(server = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let (handler, stop) = (handler.clone(), stop.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = handler(req);
                async move { Ok::<_, Infallible>(response.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!(server = name, %peer, error = %e, "HTTP connection error");
                },
                _ = stop.cancelled() => {}
            }
        });
    }
}
