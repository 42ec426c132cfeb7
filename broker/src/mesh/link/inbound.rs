//! The inbound links: accept a peer's link, handshake, then hand each frame it sends to the
//! part of the node it is for (publishes to the injector, sessions, shared groups, replicas),
//! and write back the acknowledgements of its numbered stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::transport::Transport;
use super::{handshake, read_frame, watch_liveness, HandshakeError, HANDSHAKE_TIMEOUT};
use crate::mesh::frame::{self, encode, Frame};
use crate::mesh::reliable;
use crate::mesh::{Injected, Mesh, MeshSettings};

/// Accepts inbound links and hands their publishes to the injector.
pub(crate) async fn serve_inbound(
    mesh: Arc<Mesh>,
    listener: TcpListener,
    inject: mpsc::Sender<Injected>,
    stop: CancellationToken,
) {
    let Some(settings) = mesh.settings.clone() else {
        return;
    };
    loop {
        let (stream, addr) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "mesh accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        if let Err(e) = watch_liveness(&stream) {
            tracing::debug!(error = %e, %addr, "mesh link without liveness checks");
        }
        let (mesh, inject, settings, stop) =
            (mesh.clone(), inject.clone(), settings.clone(), stop.clone());
        // The handshakes (TLS's too) run on the link's own task, never in this loop.
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = inbound(mesh, stream, addr, settings, inject) => {}
            }
        });
    }
}

async fn inbound(
    mesh: Arc<Mesh>,
    stream: TcpStream,
    addr: SocketAddr,
    settings: MeshSettings,
    inject: mpsc::Sender<Injected>,
) {
    // Its ACKs are small and a PUBACK at the origin waits for them (issue 12).
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%addr, error = %e, "TCP_NODELAY not set on an inbound mesh link");
    }
    let mut buf = BytesMut::new();
    let up = async {
        let mut t = Transport::accept(mesh.tls().as_deref(), stream).await?;
        let peer = handshake(&mesh, &settings.secret, &mut t, &mut buf).await?;
        Ok::<_, HandshakeError>((t, peer))
    };
    let hs = tokio::time::timeout(HANDSHAKE_TIMEOUT, up)
        .await
        .unwrap_or(Err(HandshakeError::Timeout(HANDSHAKE_TIMEOUT)));
    let (stream, peer) = match hs {
        Ok(p) => p,
        Err(e) => {
            mesh.metrics.rejected.with_label_values(&[e.label()]).inc();
            tracing::warn!(%addr, error = %e, "mesh link refused");
            return;
        }
    };
    let tls = matches!(stream, Transport::Tls(_));
    tracing::info!(peer, %addr, tls, "inbound mesh link up");
    // What this link says of the peer's shared groups is forgotten when it ends (issue 12).
    let share = mesh.share.get().map(|s| ShareLink::new(s.clone(), &peer));
    let received = mesh.metrics.received.with_label_values(&[&peer]);
    let duplicates = mesh.metrics.duplicates.with_label_values(&[&peer]);
    let skipped = mesh.metrics.skipped.with_label_values(&[&peer]);
    let max = mesh.max_frame().saturating_add(frame::SEQUENCED_HEADER);
    let (mut stream, w) = stream.split();
    // The peer's acknowledgements go back on this link, written by their own task, which
    // ends with the link.
    let _acks = AbortOnDrop(tokio::spawn(write_acks(w, mesh.origin_acks(&peer))));
    // What the router accepted of the peer's stream, and the last frame given to it: a list of
    // shared groups waits for the router to have what came before it (issue 12).
    let mut accepted = mesh.origin_acks(&peer);
    let mut last_injected: Option<(u64, u64)> = None;
    loop {
        let (p, seq) = match read_frame(&mut stream, &mut buf, max).await {
            Ok(Some(Frame::Publish(p))) => (p, None),
            Ok(Some(Frame::Sequenced { epoch, seq, inner })) => {
                let Frame::Publish(p) = *inner else {
                    mesh.metrics.rejected.with_label_values(&["protocol"]).inc();
                    tracing::warn!(peer, "a numbered frame that is not a publish; closing");
                    return;
                };
                match mesh.offer(&peer, epoch, seq) {
                    reliable::Verdict::Duplicate => {
                        duplicates.inc();
                        continue;
                    }
                    reliable::Verdict::Deliver { skipped: n } => skipped.inc_by(n),
                }
                (p, Some((epoch, seq)))
            }
            Ok(Some(Frame::Connected {
                client_id,
                clean_start,
                at,
            })) => {
                mesh.peer_connected(&peer, &client_id, clean_start, at);
                continue;
            }
            Ok(Some(Frame::ShareGroups { groups })) => {
                if let Some(s) = &share {
                    // The peer's new members did not take what its router had before them:
                    // counted only for what reaches this router after that (`crate::share`).
                    if let Some(last) = last_injected.filter(|_| s.share.adds(&peer, &groups)) {
                        router_has(&mut accepted, last, &peer).await;
                    }
                    s.share.on_peer(&peer, s.link, groups);
                }
                continue;
            }
            // Sessions across the cluster (issue 12; `crate::session`).
            Ok(Some(Frame::SessionRequest { request, client_id })) => {
                if let Some(s) = mesh.sessions.get() {
                    s.on_request(&peer, request, client_id);
                }
                continue;
            }
            Ok(Some(Frame::Session { request, session })) => {
                let Some(s) = mesh.sessions.get() else {
                    continue;
                };
                if let Err(e) = s.on_session(&peer, request, session).await {
                    mesh.metrics.rejected.with_label_values(&[e.label()]).inc();
                    tracing::warn!(peer, error = %e, "bad session frame from a peer; closing");
                    return;
                }
                continue;
            }
            Ok(Some(Frame::SessionReplica { request, session })) => {
                let Some(s) = mesh.sessions.get() else {
                    continue;
                };
                if let Err(e) = s.on_replica(&peer, request, *session) {
                    mesh.metrics.rejected.with_label_values(&[e.label()]).inc();
                    tracing::warn!(peer, error = %e, "bad session replica from a peer; closing");
                    return;
                }
                continue;
            }
            // Session replicas (issue 12; `crate::replication`).
            Ok(Some(Frame::ReplicaMeta(m))) => {
                if let Some(r) = mesh.replication.get() {
                    if let Err(why) = crate::replication::check_meta(&m) {
                        mesh.metrics
                            .rejected
                            .with_label_values(&["malformed"])
                            .inc();
                        tracing::warn!(peer, why, "bad replica frame from a peer; closing");
                        return;
                    }
                    r.on_meta(&peer, *m);
                }
                continue;
            }
            Ok(Some(Frame::ReplicaAcks { acks })) => {
                if let Some(r) = mesh.replication.get() {
                    r.on_acks(&peer, acks);
                }
                continue;
            }
            Ok(Some(Frame::ReplicaPkids { pkids })) => {
                if let Some(r) = mesh.replication.get() {
                    r.on_pkids(&peer, pkids);
                }
                continue;
            }
            Ok(Some(Frame::ReplicaClose { client_id })) => {
                if let Some(r) = mesh.replication.get() {
                    r.on_close(&peer, &client_id);
                }
                continue;
            }
            Ok(Some(_)) => {
                mesh.metrics.rejected.with_label_values(&["protocol"]).inc();
                tracing::warn!(peer, "unexpected frame after the handshake; closing");
                return;
            }
            Ok(None) => {
                tracing::info!(peer, "inbound mesh link closed");
                return;
            }
            Err(e) => {
                mesh.metrics.rejected.with_label_values(&[e.label()]).inc();
                tracing::warn!(peer, error = %e, "inbound mesh link failed");
                return;
            }
        };
        // Back-pressure: a full router queue slows this link, not the node.
        let injected = Injected {
            peer: peer.clone(),
            publish: p,
            received: Instant::now(),
            seq,
        };
        if inject.send(injected).await.is_err() {
            return;
        }
        if seq.is_some() {
            last_injected = seq;
        }
        received.inc();
    }
}

/// An inbound link's part in [`crate::share::Share`]: what it carried is dropped with it.
struct ShareLink {
    share: Arc<crate::share::Share>,
    peer: String,
    link: u64,
}

impl ShareLink {
    fn new(share: Arc<crate::share::Share>, peer: &str) -> ShareLink {
        let link = share.link();
        ShareLink {
            share,
            peer: peer.to_string(),
            link,
        }
    }
}

impl Drop for ShareLink {
    fn drop(&mut self) {
        self.share.link_closed(&self.peer, self.link);
    }
}

/// How long a peer's list of shared groups waits for the router to accept what came before
/// it: applied later is the safe side (this node serves the peer's share meanwhile).
const LIST_WAIT: Duration = Duration::from_secs(1);

/// Waits until the router accepted frame `last` of `peer`'s stream, at most [`LIST_WAIT`].
async fn router_has(
    accepted: &mut watch::Receiver<Option<(u64, u64)>>,
    last: (u64, u64),
    peer: &str,
) {
    let waited =
        tokio::time::timeout(LIST_WAIT, accepted.wait_for(|a| reliable::covers(*a, last))).await;
    match waited {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => tracing::debug!(peer, "no acceptance to wait for; shared groups applied"),
        Err(_) => tracing::debug!(
            peer,
            ?LIST_WAIT,
            "the router is slow; shared groups applied without its acceptance"
        ),
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends the origin's acknowledgement on its link: the current one at once, then each new
/// one as soon as it moved, since the origin's clients wait for it (their PUBACKs, issue 12).
/// What moves while one is written goes out as one in the next: under load, one ACK covers
/// many frames without a timer.
async fn write_acks(mut w: impl AsyncWrite + Unpin, mut acks: watch::Receiver<Option<(u64, u64)>>) {
    acks.mark_changed();
    let mut sent = None;
    loop {
        if acks.changed().await.is_err() {
            return;
        }
        // Lets the injector accept what else is ready first: one ACK for all of it.
        tokio::task::yield_now().await;
        let cur = *acks.borrow_and_update();
        let Some((epoch, seq)) = cur else { continue };
        if cur == sent {
            continue;
        }
        let Ok(bytes) = encode(&Frame::Ack { epoch, seq }) else {
            return;
        };
        if w.write_all(&bytes).await.is_err() || w.flush().await.is_err() {
            // the link is gone: its reader notices and ends
            return;
        }
        sent = cur;
    }
}
