//! The outbound link to one peer: dial, handshake, then send what this node has for it (its
//! shared groups, its sessions for the peer's replicas, what the peer has not acknowledged,
//! then the queue) and take the peer's ACKs; reconnect with back-off when it fails.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::transport::Transport;
use super::{handshake, watch_liveness, HandshakeError, HANDSHAKE_TIMEOUT};
use crate::mesh::frame::{self, decode, encode, Frame};
use crate::mesh::reliable::Unacked;
use crate::mesh::{Mesh, MeshSettings, Outbound, PeerOut};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Acknowledged delivery (issue 12). The bytes of unacknowledged QoS 1/2 frames kept per peer
/// (their count is bounded by `peer_queue`); beyond either bound the oldest is dropped.
const UNACKED_MAX_BYTES: usize = 64 * 1024 * 1024;

/// The metrics of one peer's outbound link.
struct LinkCounters {
    forwarded: prometheus::IntCounter,
    lost: prometheus::IntCounter,
    expired: prometheus::IntCounter,
    unacked_full: prometheus::IntCounter,
    resent: prometheus::IntCounter,
    unacked: prometheus::IntGauge,
    lag: prometheus::Gauge,
}

impl LinkCounters {
    /// The kept frames' count and the age of the oldest (the link's lag).
    fn kept(&self, unacked: &Unacked<Outbound>) {
        self.unacked.set(unacked.len() as i64);
        let oldest = unacked.pending().next().map(|(_, o)| o.queued.elapsed());
        self.lag.set(oldest.map_or(0.0, |d| d.as_secs_f64()));
    }
}

/// Writes a numbered frame: its header, then the frame's (shared) bytes.
async fn write_numbered(
    w: &mut (impl AsyncWrite + Unpin),
    epoch: u64,
    seq: u64,
    bytes: &[u8],
) -> std::io::Result<()> {
    let header = frame::sequenced_header(epoch, seq, bytes.len())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    w.write_all(&header).await?;
    w.write_all(bytes).await
}

/// Sends again, in order, every frame the peer has not acknowledged (those that expired
/// meanwhile are dropped and counted).
async fn resend(
    w: &mut (impl AsyncWrite + Unpin),
    unacked: &mut Unacked<Outbound>,
    c: &LinkCounters,
) -> std::io::Result<()> {
    if unacked.is_empty() {
        return Ok(());
    }
    let mut gone = Vec::new();
    let mut sent = 0;
    for (seq, m) in unacked.pending() {
        match m.now() {
            Some(bytes) => {
                write_numbered(w, unacked.epoch(), seq, &bytes).await?;
                sent += 1;
            }
            None => gone.push(seq),
        }
    }
    w.flush().await?;
    c.resent.inc_by(sent);
    c.expired.inc_by(gone.len() as u64);
    for seq in gone {
        unacked.forget(seq);
    }
    Ok(())
}

/// Writes a batch from the queue. A QoS 1/2 frame is numbered and kept (also when the write
/// fails: a new link sends it again); a QoS 0 frame in flight on a broken link is lost.
/// Messages written to the link in one go, at most.
const BATCH: usize = 256;

/// `first` and what is queued after it, up to `max` in all, without waiting.
fn take_batch(
    rx: &mut mpsc::Receiver<Outbound>,
    first: Option<Outbound>,
    max: usize,
) -> Vec<Outbound> {
    let mut batch: Vec<Outbound> = first.into_iter().collect();
    while batch.len() < max {
        match rx.try_recv() {
            Ok(m) => batch.push(m),
            Err(_) => break,
        }
    }
    batch
}

async fn send_batch(
    w: &mut (impl AsyncWrite + Unpin),
    batch: Vec<Outbound>,
    unacked: &mut Unacked<Outbound>,
    c: &LinkCounters,
) -> std::io::Result<()> {
    let mut sent = 0;
    // QoS 0 frames written (perhaps only into the buffer) or failing: lost if the link fails
    let mut plain = 0;
    let mut batch = batch.into_iter();
    let mut result = Ok(());
    for m in batch.by_ref() {
        let Some(bytes) = m.now() else {
            c.expired.inc();
            continue;
        };
        result = if m.reliable {
            let (seq, dropped) = unacked.push(m, bytes.len());
            c.unacked_full.inc_by(dropped as u64);
            write_numbered(w, unacked.epoch(), seq, &bytes).await
        } else {
            plain += 1;
            w.write_all(&bytes).await
        };
        if result.is_err() {
            break;
        }
        sent += 1;
    }
    if result.is_ok() {
        result = w.flush().await;
    }
    match result {
        Ok(()) => c.forwarded.inc_by(sent),
        Err(_) => {
            // written into a broken link: QoS 0 lost, the rest kept for the next link
            c.lost.inc_by(plain);
            for m in batch {
                if m.reliable && m.now().is_some() {
                    let size = m.frame.len();
                    c.unacked_full.inc_by(unacked.push(m, size).1 as u64);
                } else {
                    c.lost.inc();
                }
            }
        }
    }
    result
}

/// Applies the ACKs in `buf`; anything else from the peer is an error (its metric label and
/// why), which closes the link.
fn take_acks(
    buf: &mut BytesMut,
    unacked: &mut Unacked<Outbound>,
) -> Result<(), (&'static str, String)> {
    loop {
        match decode(buf, 1024) {
            Ok(Some(Frame::Ack { epoch, seq })) => {
                if let Err(e) = unacked.ack(epoch, seq) {
                    return Err(("protocol", e.to_string()));
                }
            }
            Ok(Some(_)) => {
                return Err(("protocol", "peer sent a frame other than ACK".to_string()));
            }
            Ok(None) => return Ok(()),
            Err(e) => return Err((e.label(), format!("bad frame from the peer: {e}"))),
        }
    }
}

/// A TCP connection to `to`, from `from` (any port) when given.
async fn dial(to: SocketAddr, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect(to).await;
    };
    let s = if from.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.bind(SocketAddr::new(from, 0))?;
    s.connect(to).await
}

/// Keeps the link to one peer up and drains its queue into it.
pub(crate) async fn outbound(
    mesh: Arc<Mesh>,
    peer: Arc<PeerOut>,
    mut rx: mpsc::Receiver<Outbound>,
    settings: MeshSettings,
    stop: CancellationToken,
) {
    let up_gauge = mesh.metrics.link_up.with_label_values(&[&peer.id]);
    let forwarded = mesh.metrics.forwarded.with_label_values(&[&peer.id]);
    let lost = mesh
        .metrics
        .dropped
        .with_label_values(&[&peer.id, "link_error"]);
    let expired = mesh
        .metrics
        .dropped
        .with_label_values(&[&peer.id, "expired"]);
    let counters = LinkCounters {
        forwarded,
        lost,
        expired,
        unacked_full: mesh
            .metrics
            .dropped
            .with_label_values(&[&peer.id, "unacked_full"]),
        resent: mesh.metrics.resent.with_label_values(&[&peer.id]),
        unacked: mesh.metrics.unacked.with_label_values(&[&peer.id]),
        lag: mesh.metrics.lag.with_label_values(&[&peer.id]),
    };
    // This link's numbered stream: a new epoch whenever the link to this peer is created.
    let mut unacked: Unacked<Outbound> = Unacked::new(
        rand::random(),
        settings.peer_queue.max(1),
        UNACKED_MAX_BYTES,
    );
    let mut backoff = settings.reconnect_min;
    // This node's shared groups (issue 12): sent as each link comes up and on every change.
    let mut groups = mesh.share.get().map(|s| s.advertised());
    loop {
        let attempt = async {
            let s = tokio::time::timeout(CONNECT_TIMEOUT, dial(peer.addr, settings.source))
                .await
                .map_err(|_| HandshakeError::Timeout(CONNECT_TIMEOUT))??;
            s.set_nodelay(true)?;
            watch_liveness(&s)?;
            let mut buf = BytesMut::new();
            let up = async {
                let mut t = Transport::dial(mesh.tls().as_deref(), s, peer.addr.ip()).await?;
                let id = handshake(&mesh, &settings.secret, &mut t, &mut buf).await?;
                Ok::<_, HandshakeError>((t, id))
            };
            let (t, id) = tokio::time::timeout(HANDSHAKE_TIMEOUT, up)
                .await
                .map_err(|_| HandshakeError::Timeout(HANDSHAKE_TIMEOUT))??;
            // What the peer sent after its AUTH (an ACK already) is the start of the ACKs.
            Ok::<_, HandshakeError>((t, id, buf))
        };
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt => r,
        };
        match connected {
            Ok((stream, id, rest)) => {
                if id != peer.id {
                    tracing::warn!(expected = peer.id, got = id, addr = %peer.addr, "peer answered with another node id");
                }
                tracing::info!(peer = peer.id, addr = %peer.addr, "mesh link up");
                peer.up.store(true, Ordering::Release);
                up_gauge.set(1);
                backoff = settings.reconnect_min;
                let (mut r, w) = stream.split();
                let mut w = BufWriter::with_capacity(64 * 1024, w);
                let mut acks = rest;
                let why = 'link: {
                    // The persistent sessions of this node, for the peer's replicas (issue 12).
                    if let Err(e) = send_replicas(&mesh, &mut w).await {
                        break 'link e.to_string();
                    }
                    // First what the peer has not acknowledged, in order.
                    if let Err(e) = resend(&mut w, &mut unacked, &counters).await {
                        break 'link e.to_string();
                    }
                    counters.kept(&unacked);
                    // The shared groups after the publishes they may not cover (`crate::share`).
                    if let Err(e) = send_share_groups(&mut w, groups.as_mut()).await {
                        break 'link e.to_string();
                    }
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            msg = rx.recv() => {
                                let Some(first) = msg else { return };
                                let batch = take_batch(&mut rx, Some(first), BATCH);
                                let r = send_batch(&mut w, batch, &mut unacked, &counters).await;
                                counters.kept(&unacked);
                                if let Err(e) = r {
                                    break 'link e.to_string();
                                }
                            }
                            Some(Ok(())) = changed(groups.as_mut()) => {
                                // What is queued was queued before the change (this node's
                                // router had it after): it goes first, so the list does not
                                // overtake a message the new members did not take (issue 12).
                                let mut queued = rx.len();
                                while queued > 0 {
                                    let batch = take_batch(&mut rx, None, queued.min(BATCH));
                                    if batch.is_empty() {
                                        break;
                                    }
                                    queued -= batch.len();
                                    let r = send_batch(&mut w, batch, &mut unacked, &counters).await;
                                    counters.kept(&unacked);
                                    if let Err(e) = r {
                                        break 'link e.to_string();
                                    }
                                }
                                if let Err(e) = send_share_groups(&mut w, groups.as_mut()).await {
                                    break 'link e.to_string();
                                }
                            }
                            // The peer sends only ACKs: EOF or an error means the link is
                            // gone, noticed before the next publish is written into it.
                            r = r.read_buf(&mut acks) => match r {
                                Ok(0) => break 'link "peer closed the link".to_string(),
                                Ok(_) => {
                                    let taken = take_acks(&mut acks, &mut unacked);
                                    counters.kept(&unacked);
                                    if let Err((label, why)) = taken {
                                        mesh.metrics.rejected.with_label_values(&[label]).inc();
                                        break 'link why;
                                    }
                                }
                                Err(e) => break 'link e.to_string(),
                            },
                        }
                    }
                };
                peer.up.store(false, Ordering::Release);
                up_gauge.set(0);
                // A peer that is down is not waited for: its copies are kept (sent again on
                // the next link) but no PUBACK waits for them any more (issue 12).
                unacked.for_each_mut(|m| m.durable = None);
                counters.kept(&unacked);
                tracing::warn!(peer = peer.id, addr = %peer.addr, why, "mesh link down; reconnecting");
            }
            // Both ends must agree on TLS and trust each other's certificates: a mismatch
            // is a configuration to fix, not a peer that is down.
            Err(e) if e.is_tls() => {
                mesh.metrics.rejected.with_label_values(&[e.label()]).inc();
                tracing::warn!(peer = peer.id, addr = %peer.addr, error = %e, ?backoff, "mesh link to the peer refused");
            }
            Err(e) => {
                tracing::debug!(peer = peer.id, addr = %peer.addr, error = %e, ?backoff, "mesh link attempt failed");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(settings.reconnect_max);
    }
}

/// Session replicas (issue 12): every persistent session of this node, to a peer whose link
/// just came up.
async fn send_replicas(mesh: &Mesh, mut w: impl AsyncWrite + Unpin) -> std::io::Result<()> {
    let Some(r) = mesh.replication.get() else {
        return Ok(());
    };
    for f in r.link_up_frames() {
        match encode(&f) {
            Ok(bytes) => w.write_all(&bytes).await?,
            Err(e) => tracing::warn!(error = %e, "replica frame not sent"),
        }
    }
    w.flush().await
}

/// Shared subscriptions (issue 12): this node's groups to the peer, now (the latest list).
async fn send_share_groups(
    w: &mut (impl AsyncWrite + Unpin),
    groups: Option<&mut watch::Receiver<Arc<Vec<String>>>>,
) -> std::io::Result<()> {
    let Some(groups) = groups else {
        return Ok(());
    };
    let list = groups.borrow_and_update().clone();
    let bytes = encode(&Frame::ShareGroups {
        groups: list.to_vec(),
    })
    .map_err(std::io::Error::other)?;
    w.write_all(&bytes).await?;
    w.flush().await
}

/// Resolves when this node's shared groups change (never without a list to follow).
async fn changed(groups: Option<&mut watch::Receiver<Arc<Vec<String>>>>) -> Option<Result<(), ()>> {
    match groups {
        Some(g) => Some(g.changed().await.map_err(|_| ())),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Instant;

    /// The sender takes only ACKs from its peer, and only for what it sent: anything else is
    /// an error that names its metric label, and closes the link.
    #[test]
    fn a_sender_takes_only_acks_for_what_it_sent() {
        let out = |n: u8| Outbound {
            frame: Bytes::from(vec![n]),
            expiry: None,
            reliable: true,
            queued: Instant::now(),
            durable: None,
        };
        let mut unacked = Unacked::new(5, 10, 1 << 20);
        for n in 0..3 {
            unacked.push(out(n), 1);
        }
        let mut buf = BytesMut::new();
        for f in [
            Frame::Ack { epoch: 5, seq: 1 },
            Frame::Ack { epoch: 4, seq: 3 },
            Frame::Ack { epoch: 5, seq: 2 },
        ] {
            buf.extend_from_slice(&encode(&f).expect("encodes"));
        }
        // and half of the next one
        let next = encode(&Frame::Ack { epoch: 5, seq: 3 }).expect("encodes");
        buf.extend_from_slice(&next[..5]);
        assert_eq!(take_acks(&mut buf, &mut unacked), Ok(()));
        assert_eq!(unacked.len(), 1, "another epoch's ack changed nothing");
        buf.extend_from_slice(&next[5..]);
        assert_eq!(take_acks(&mut buf, &mut unacked), Ok(()));
        assert!(unacked.is_empty());

        let refused = |bytes: Bytes| {
            let mut unacked: Unacked<Outbound> = Unacked::new(5, 10, 1 << 20);
            unacked.push(out(0), 1);
            take_acks(&mut BytesMut::from(&bytes[..]), &mut unacked).map_err(|(label, _)| label)
        };
        let ahead = encode(&Frame::Ack { epoch: 5, seq: 2 }).expect("encodes");
        assert_eq!(refused(ahead), Err("protocol"));
        let connected = encode(&Frame::Connected {
            client_id: "c".into(),
            clean_start: true,
            at: 1,
        })
        .expect("encodes");
        assert_eq!(refused(connected), Err("protocol"));
        assert_eq!(
            refused(Bytes::from_static(b"\x00\x00\x00\x01\x63")),
            Err("unknown_kind")
        );
        assert_eq!(
            refused(Bytes::from_static(b"\x00\x00\x10\x00\x11")),
            Err("too_large")
        );
        assert_eq!(
            refused(Bytes::from_static(b"\x00\x00\x00\x02\x11\x00")),
            Err("malformed")
        );
    }
}
