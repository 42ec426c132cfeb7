//! A node's side of the HA server: register, heartbeat, and follow the membership to learn
//! peers. When no HA server answers, the node keeps its last peers and keeps serving (static
//! stability), and catches up when one returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mqlb_ha_api::model::Registration;
use mqlb_ha_api::{ClientError, HaClient};
use tokio_util::sync::CancellationToken;

use crate::mesh::Mesh;

/// How long one membership long-poll waits for a change.
const WATCH: Duration = Duration::from_secs(20);

pub(crate) async fn register_and_heartbeat(
    client: Arc<HaClient>,
    reg: Registration,
    every: Duration,
    stop: CancellationToken,
) {
    let mut registered = false;
    let mut failing = false;
    loop {
        let result = if registered {
            client.heartbeat(&reg.id).await.inspect(|known| {
                if !known {
                    tracing::info!(
                        node = reg.id,
                        "HA server forgot this node; registering again"
                    );
                }
            })
        } else {
            client.register(&reg).await.map(|()| true)
        };
        match result {
            Ok(ok) => {
                if !registered && ok {
                    tracing::info!(node = reg.id, "registered with the HA server");
                }
                registered = ok;
                failing = false;
            }
            // Another live member holds this id at other addresses (or this node restarted on
            // new ports before its old record expired): retry until it expires.
            Err(ClientError::Status(409, why)) => {
                if !failing {
                    tracing::warn!(
                        node = reg.id,
                        error = why,
                        "HA server refused the registration; retrying"
                    );
                }
                failing = true;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(node = reg.id, error = %e, "HA server unreachable; serving on the last membership");
                }
                failing = true;
            }
        }
        let wait = if registered {
            every
        } else {
            every.min(Duration::from_millis(500))
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

pub(crate) async fn follow_peers(client: Arc<HaClient>, mesh: Arc<Mesh>, stop: CancellationToken) {
    let mut since = None;
    loop {
        let view = tokio::select! {
            _ = stop.cancelled() => return,
            v = client.cluster(since, WATCH) => v,
        };
        match view {
            Ok(view) => {
                since = Some(view.version);
                // Down members keep their link (it reconnects if they come back); removed
                // members lose it.
                let peers: Vec<(String, SocketAddr)> = view
                    .members
                    .iter()
                    .filter_map(|m| Some((m.reg.id.clone(), m.reg.mesh.as_deref()?.parse().ok()?)))
                    .collect();
                mesh.set_dynamic_peers(&peers, &stop);
            }
            Err(e) => {
                tracing::debug!(error = %e, "membership watch failed; keeping the last peers");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}
