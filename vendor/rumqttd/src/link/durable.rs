//! mqlb patch (across the cluster, issue 12): a client's PUBACK / PUBREC held back until the
//! message is held elsewhere too.
//!
//! The router acknowledges a PUBLISH as soon as it appended it to its logs; an embedder that
//! copies each message to other routers (mqlb's mesh) would lose the copies still on their way
//! if this process died right after that acknowledgement, although the client, told the
//! message was accepted, no longer keeps it. The embedder's codec hands the link a wait for
//! each QoS 1/2 PUBLISH it read ([`crate::protocol::Protocol::ack_wait`]); the link sends the
//! router's acknowledgement of that PUBLISH only once the wait ended. Acknowledgements stay in
//! the order the PUBLISHes came (MQTT-4.6.0-2, -3, -4): one held back holds back the ones after
//! it, and only those (other packets to the client pass). The wait bounds itself; this file has
//! no clock.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::protocol::{AckWait, Packet};

/// The waits a connection keeps for PUBLISHes not yet acknowledged by the router: more means
/// the router never answered some (each pkid is in use once at a time, MQTT-2.2.1-3), and the
/// oldest are forgotten.
const MAX_WAITS: usize = u16::MAX as usize;

/// One connection's acknowledgements on their way to the client.
#[derive(Default)]
pub(crate) struct AckHold {
    /// Waits of PUBLISHes read, by packet id, oldest first, whose acknowledgement has not come
    /// from the router yet.
    waits: VecDeque<(u16, AckWait)>,
    /// Acknowledgements held back, in order, each with the wait it must follow (`None`: none
    /// of its own, it waits for those before it).
    held: VecDeque<(Packet, Option<AckWait>)>,
}

/// The packet id of an acknowledgement this file holds back (PUBACK, PUBREC).
fn acked(packet: &Packet) -> Option<u16> {
    match packet {
        Packet::PubAck(ack, _) => Some(ack.pkid),
        Packet::PubRec(rec, _) => Some(rec.pkid),
        _ => None,
    }
}

impl AckHold {
    /// A QoS 1/2 PUBLISH with packet id `pkid` was read and its acknowledgement must wait
    /// for `wait`.
    pub(crate) fn published(&mut self, pkid: u16, wait: AckWait) {
        if self.waits.len() >= MAX_WAITS {
            self.waits.pop_front();
        }
        self.waits.push_back((pkid, wait));
    }

    /// A packet from the router to the client: returned to be sent now, or `None` when it is
    /// held back (an acknowledgement whose wait, or one before it, has not ended).
    pub(crate) fn offer(&mut self, packet: Packet) -> Option<Packet> {
        let Some(pkid) = acked(&packet) else {
            return Some(packet);
        };
        let wait = self
            .waits
            .iter()
            .position(|(p, _)| *p == pkid)
            .and_then(|i| self.waits.remove(i))
            .map(|(_, w)| w);
        if wait.is_none() && self.held.is_empty() {
            return Some(packet);
        }
        self.held.push_back((packet, wait));
        None
    }

    /// Whether acknowledgements are held back.
    pub(crate) fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    /// The acknowledgements free to go, in order, once the first held back is; pending while
    /// it is (and for ever when nothing is held: ask [`AckHold::holds`] first). Cancel safe:
    /// what is released is returned by the same poll.
    pub(crate) fn released(&mut self) -> Released<'_> {
        Released(self)
    }

    fn poll_released(&mut self, cx: &mut Context<'_>) -> Poll<VecDeque<Packet>> {
        let mut out = VecDeque::new();
        while let Some((_, wait)) = self.held.front_mut() {
            if let Some(w) = wait {
                if w.as_mut().poll(cx).is_pending() {
                    break;
                }
            }
            if let Some((packet, _)) = self.held.pop_front() {
                out.push_back(packet);
            }
        }
        if out.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(out)
        }
    }
}

/// See [`AckHold::released`].
pub(crate) struct Released<'a>(&'a mut AckHold);

impl Future for Released<'_> {
    type Output = VecDeque<Packet>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.poll_released(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{PubAck, PubAckReason, PubRec, PubRecReason, SubAck};
    use tokio::sync::oneshot;

    fn puback(pkid: u16) -> Packet {
        Packet::PubAck(
            PubAck {
                pkid,
                reason: PubAckReason::Success,
            },
            None,
        )
    }

    fn pubrec(pkid: u16) -> Packet {
        Packet::PubRec(
            PubRec {
                pkid,
                reason: PubRecReason::Success,
            },
            None,
        )
    }

    /// A wait that ends when its sender is used or dropped.
    fn wait() -> (oneshot::Sender<()>, AckWait) {
        let (tx, rx) = oneshot::channel::<()>();
        (
            tx,
            Box::pin(async move {
                let _ = rx.await;
            }),
        )
    }

    fn pkids(packets: VecDeque<Packet>) -> Vec<u16> {
        packets.iter().filter_map(acked).collect()
    }

    /// Polls once: what is released now.
    fn now(hold: &mut AckHold) -> Vec<u16> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match hold.poll_released(&mut cx) {
            Poll::Ready(p) => pkids(p),
            Poll::Pending => Vec::new(),
        }
    }

    #[test]
    fn without_a_wait_nothing_is_held() {
        let mut hold = AckHold::default();
        assert!(hold.offer(puback(1)).is_some());
        assert!(hold.offer(pubrec(2)).is_some());
        assert!(!hold.holds());
        assert!(now(&mut hold).is_empty());
    }

    #[test]
    fn acks_wait_for_theirs_and_keep_the_order_of_the_publishes() {
        let mut hold = AckHold::default();
        let (t1, w1) = wait();
        let (t3, w3) = wait();
        hold.published(1, w1);
        hold.published(3, w3);
        // 1 waits; 2 (no wait of its own: a QoS 2 retransmission, say) waits behind it
        assert!(hold.offer(puback(1)).is_none());
        assert!(hold.offer(pubrec(2)).is_none());
        assert!(hold.offer(puback(3)).is_none());
        // other packets pass
        let suback = Packet::SubAck(
            SubAck {
                pkid: 9,
                return_codes: Vec::new(),
            },
            None,
        );
        assert!(hold.offer(suback).is_some());
        assert!(now(&mut hold).is_empty());
        // 3 ends first: still nothing before 1
        drop(t3);
        assert!(now(&mut hold).is_empty());
        let _ = t1.send(());
        assert_eq!(now(&mut hold), [1, 2, 3]);
        assert!(!hold.holds());
        // and the next one without a wait goes at once again
        assert!(hold.offer(puback(4)).is_some());
    }

    #[test]
    fn a_reused_packet_id_takes_the_oldest_wait() {
        let mut hold = AckHold::default();
        let (t1, w1) = wait();
        let (t2, w2) = wait();
        // the same pkid twice: a 3.1.1 client re-sending before the first PUBACK came
        hold.published(7, w1);
        hold.published(7, w2);
        assert!(hold.offer(puback(7)).is_none());
        drop(t1);
        assert_eq!(now(&mut hold), [7]);
        assert!(hold.offer(puback(7)).is_none());
        drop(t2);
        assert_eq!(now(&mut hold), [7]);
    }

    #[tokio::test]
    async fn released_wakes_when_the_first_wait_ends() {
        let mut hold = AckHold::default();
        let (t, w) = wait();
        hold.published(5, w);
        assert!(hold.offer(puback(5)).is_none());
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            let _ = t.send(());
        });
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), hold.released())
            .await
            .expect("released once the wait ended");
        assert_eq!(pkids(out), [5]);
    }
}
