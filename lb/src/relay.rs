//! The life of an established connection, which owns both sockets (dropping it closes them):
//! the copy both ways, the idle watchdog, and the cut (its backend went down under `close_on_backend_down`, or shutdown's grace ran out).
//!
//! One hand-written future rather than an `async fn` around `select!`: the compiler lays out
//! nested async state with copies of each pinned value, which more than doubled what every
//! idle connection holds (976 bytes for this part alone; this struct is a third of that).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use mqlb_config::Rule;
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::sync::futures::Notified;
use tokio::time::{Instant, Sleep};

use crate::copy::{Bidi, Dir, Peer};
use crate::lb::Shared;
use crate::proxy::Outcome;
use crate::state::ConnInfo;

pin_project_lite::pin_project! {
    /// Resolves to how the connection ended; byte counts are folded into the metrics at each
    /// watchdog wake and at the end, never per packet. Rule, backend and metric handles are
    /// reached through `info` rather than held: this struct is most of what an idle
    /// connection costs.
    pub(crate) struct Relay<'a> {
        shared: &'a Shared,
        info: &'a ConnInfo,
        copy: Bidi,
        // Wakes a few times per idle period: bytes seen since the last wake reset the idle
        // clock.
        #[pin]
        watchdog: Sleep,
        // The backend's cut signal: it went down, or shutdown cuts every connection.
        #[pin]
        cut: Notified<'a>,
        last_activity: Instant,
        seen_in: u64,
        seen_out: u64,
    }
}

/// How often the watchdog wakes: a few times per idle timeout.
fn tick(cfg: &Rule) -> Duration {
    (cfg.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

impl<'a> Relay<'a> {
    pub(crate) fn new(
        shared: &'a Shared,
        info: &'a ConnInfo,
        client: TcpStream,
        server: TcpStream,
    ) -> Self {
        let now = Instant::now();
        Relay {
            shared,
            info,
            copy: Bidi {
                client,
                server,
                up: Dir::default(),
                down: Dir::default(),
            },
            watchdog: tokio::time::sleep_until(now + tick(&info.rule.cfg)),
            // A `Notified` sees `notify_waiters` calls made after its creation even before its
            // first poll, so no cut is missed between here and the first poll.
            cut: info.backend_state().cut.notified(),
            last_activity: now,
            seen_in: 0,
            seen_out: 0,
        }
    }
}

impl Future for Relay<'_> {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut me = self.project();
        let info: &ConnInfo = me.info;
        let cfg = &info.rule.cfg;
        let backend = info.backend_state();
        let mm = info.rule.member_metrics(&me.shared.metrics, info.member);
        // Folds the connection's byte counters into `mqlb_bytes_total`; true if any moved.
        let mut fold = || {
            let i = info.bytes_in.load(Ordering::Relaxed);
            let o = info.bytes_out.load(Ordering::Relaxed);
            mm.bytes_in.inc_by(i - *me.seen_in);
            mm.bytes_out.inc_by(o - *me.seen_out);
            let moved = i != *me.seen_in || o != *me.seen_out;
            (*me.seen_in, *me.seen_out) = (i, o);
            moved
        };

        loop {
            let cut = if me.shared.hard_stop.is_cancelled() {
                Some(Outcome::Shutdown)
            } else if cfg.close_on_backend_down && !backend.is_up() {
                Some(Outcome::BackendDown)
            } else {
                None
            };
            if let Some(o) = cut {
                fold();
                return Poll::Ready(o);
            }
            match me.cut.as_mut().poll(cx) {
                Poll::Pending => break,
                // Woken (possibly by a change that does not concern this connection): watch
                // again, then look at the flags again.
                Poll::Ready(()) => me.cut.set(backend.cut.notified()),
            }
        }

        if let Poll::Ready(r) = me.copy.poll_copy(cx, &info.bytes_in, &info.bytes_out) {
            fold();
            return Poll::Ready(match r {
                Ok(()) => Outcome::Closed,
                Err((who, e)) => {
                    let o = match who {
                        Peer::Client => Outcome::ClientError,
                        Peer::Backend => Outcome::BackendError,
                    };
                    tracing::debug!(rule = cfg.name, peer = %info.peer, backend = info.backend(), outcome = o.label(), error = %e, "connection ended with an error");
                    o
                }
            });
        }

        while me.watchdog.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if fold() {
                *me.last_activity = now;
            } else if now.duration_since(*me.last_activity) >= cfg.idle_timeout {
                if cfg.reset_on_idle {
                    // Azure's "TCP reset on idle": with SO_LINGER 0 the close that follows is
                    // an RST, so both ends learn at once that the flow is gone.
                    for s in [&me.copy.client, &me.copy.server] {
                        if let Err(e) = SockRef::from(s).set_linger(Some(Duration::ZERO)) {
                            tracing::debug!(error = %e, "SO_LINGER 0 not set; closing with FIN");
                        }
                    }
                }
                return Poll::Ready(Outcome::IdleTimeout);
            }
            me.watchdog.as_mut().reset(now + tick(cfg));
        }
        Poll::Pending
    }
}
