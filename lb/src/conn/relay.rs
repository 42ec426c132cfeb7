//! The life of an established connection, which owns both sockets (dropping it closes them):
//! the copy both ways until it ends, or until something else ends it: the idle sweeper
//! (`ConnRegistry::sweep`), its backend going down under `close_on_backend_down`,
//! shutdown's grace running out, or an evacuation (`evacuate`). Those set a flag and wake the
//! task through the connection's waker in its `ConnInfo`.
//!
//! An evacuated MQTT 5 client is told to go (DISCONNECT 0x9C, Use another server, with the
//! pool's Server Reference): the server → client copy stops at its next packet boundary
//! (`frames` follows them), the DISCONNECT is written there, then a FIN; the client → server
//! copy goes on until the client closes, as it must after a DISCONNECT, or until the
//! evacuation's grace is over. Other clients (3.1.1 has no server DISCONNECT) are closed.
//!
//! A hand-written future with no timer and no notification future of its own: it is what
//! every idle connection holds (184 bytes, 8 of them the server → client packet framer of
//! evacuations; an `async fn` around `select!` with a timer and two notification futures held
//! 976).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use mqlb_config::Rule;
use socket2::SockRef;

use super::copy::{Bidi, Dir, Leg, Peer};
use super::frames::{self, Framer};
use crate::outcome::Outcome;
use crate::shared::Shared;
use crate::state::{ConnInfo, Evacuation};

/// How often the sweeper looks at a rule's connections: a few times per idle timeout.
pub(crate) fn sweep_tick(cfg: &Rule) -> Duration {
    (cfg.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

/// Resolves to how the connection ended; byte counts are folded into the metrics by the
/// sweeper and once more at the end, never per packet.
pub(crate) struct Relay<'a, C: Leg, S: Leg> {
    shared: &'a Shared,
    info: &'a ConnInfo,
    copy: Bidi<C, S>,
}

impl<'a, C: Leg, S: Leg> Relay<'a, C, S> {
    pub(crate) fn new(shared: &'a Shared, info: &'a ConnInfo, client: C, server: S) -> Self {
        Relay {
            shared,
            info,
            copy: Bidi {
                client,
                server,
                up: Dir::default(),
                down: Dir::default(),
                // Only an MQTT 5 client can be told to leave (3.1.1 has no server DISCONNECT;
                // those are closed), so only its stream pays for following the packets: its
                // header bytes are read, never spliced.
                down_frames: Framer::new(info.level == Some(5)),
            },
        }
    }

    /// Why the connection must end now, if it must.
    fn ended(&self) -> Option<Outcome> {
        let info = self.info;
        if info.is_idle_expired() {
            if info.rule.cfg.reset_on_idle {
                // Azure's "TCP reset on idle": with SO_LINGER 0 the close that follows is an
                // RST, so both ends learn at once that the flow is gone.
                for s in [self.copy.client.tcp(), self.copy.server.tcp()] {
                    if let Err(e) = SockRef::from(s).set_linger(Some(Duration::ZERO)) {
                        tracing::debug!(error = %e, "SO_LINGER 0 not set; closing with FIN");
                    }
                }
            }
            Some(Outcome::IdleTimeout)
        } else if self
            .shared
            .hard_stop
            .load(std::sync::atomic::Ordering::Acquire)
        {
            Some(Outcome::Shutdown)
        } else if info.rule.cfg.close_on_backend_down && !info.backend_state().is_up() {
            Some(Outcome::BackendDown)
        } else {
            match info.evacuation() {
                Evacuation::None => None,
                // Told with a DISCONNECT at the next packet boundary (`poll`).
                Evacuation::Asked if info.level == Some(5) && !self.copy.down_frames.is_off() => {
                    None
                }
                Evacuation::Asked | Evacuation::Forced => Some(Outcome::Evacuated),
            }
        }
    }

    /// What the server → client copy ends with, once this connection is evacuated: the
    /// DISCONNECT of an MQTT 5 client (built only then; evacuations are rare).
    fn stop_with(&self) -> Option<Vec<u8>> {
        (self.info.evacuation() != Evacuation::None).then(|| {
            let reference = self.info.rule.pool.cfg.server_reference.as_deref();
            frames::disconnect_v5(frames::USE_ANOTHER_SERVER, reference)
        })
    }
}

impl<C: Leg, S: Leg> Future for Relay<'_, C, S> {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let me = self.get_mut();
        let info = me.info;
        // Register first, then look at the flags: a flag set after the look comes with a wake.
        info.register(cx.waker());
        let outcome = match me.ended() {
            Some(o) => o,
            None => match me.copy.poll_copy(
                cx,
                &info.bytes_in,
                &info.bytes_out,
                me.stop_with().as_deref(),
            ) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if info.evacuation() != Evacuation::None => Outcome::Evacuated,
                Poll::Ready(Ok(())) => Outcome::Closed,
                Poll::Ready(Err((who, e))) => {
                    let o = match who {
                        Peer::Client => Outcome::ClientError,
                        Peer::Backend => Outcome::BackendError,
                    };
                    tracing::debug!(rule = info.rule.cfg.name, peer = %info.peer, backend = info.backend(), outcome = o.label(), error = %e, "connection ended with an error");
                    o
                }
            },
        };
        info.fold(info.rule.member_metrics(&me.shared.metrics, info.member));
        Poll::Ready(outcome)
    }
}
