//! Acknowledged delivery over a mesh link (issue 12), as pure state machines: no sockets, no
//! clocks, so every case is a unit test.
//!
//! Every QoS 1/2 frame a node sends to a peer is numbered `(epoch, seq)`: `epoch` is a random
//! u64 drawn when the node's link to that peer is created (a restarted node, or a peer that
//! left and came back, starts a new stream), `seq` counts from 1 in that stream. The sender
//! keeps each numbered frame ([`Unacked`]) until the peer acknowledges it, and after a
//! reconnect sends again, in order, all it still keeps. The receiver ([`Inbound`]) delivers a
//! number once, drops the ones it has seen (a re-send), and acknowledges cumulatively the
//! highest number up to which everything it delivered was accepted by its router.

use std::collections::VecDeque;

/// The sender's numbered frames a peer has not acknowledged yet, oldest first; bounded in
/// count and bytes (overflow drops the oldest: the caller counts them).
pub struct Unacked<T> {
    epoch: u64,
    /// The number the next frame gets.
    next: u64,
    frames: VecDeque<(u64, usize, T)>,
    bytes: usize,
    max_count: usize,
    max_bytes: usize,
}

/// An acknowledgement the sender cannot have asked for: the link is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer acknowledged {acked} but only {sent} frames were sent")]
pub struct AckAhead {
    pub acked: u64,
    pub sent: u64,
}

impl<T> Unacked<T> {
    pub fn new(epoch: u64, max_count: usize, max_bytes: usize) -> Self {
        Unacked {
            epoch,
            next: 1,
            frames: VecDeque::new(),
            bytes: 0,
            max_count: max_count.max(1),
            max_bytes,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Numbers `item` (of `size` bytes) and keeps it. Returns its number and how many of the
    /// oldest frames were dropped to stay within the bounds (the newest is always kept).
    pub fn push(&mut self, item: T, size: usize) -> (u64, usize) {
        let seq = self.next;
        self.next += 1;
        let mut dropped = 0;
        while !self.frames.is_empty()
            && (self.frames.len() >= self.max_count
                || self.bytes.saturating_add(size) > self.max_bytes)
        {
            if let Some((_, s, _)) = self.frames.pop_front() {
                self.bytes -= s;
                dropped += 1;
            }
        }
        self.frames.push_back((seq, size, item));
        self.bytes += size;
        (seq, dropped)
    }

    /// The peer accepted everything up to `seq` of stream `epoch`: those frames are released.
    /// An acknowledgement of another stream (an earlier incarnation's) changes nothing; one
    /// beyond what was sent is an error. Returns how many frames were released.
    pub fn ack(&mut self, epoch: u64, seq: u64) -> Result<usize, AckAhead> {
        if epoch != self.epoch {
            return Ok(0);
        }
        if seq >= self.next {
            return Err(AckAhead {
                acked: seq,
                sent: self.next - 1,
            });
        }
        let mut released = 0;
        while self.frames.front().is_some_and(|(s, _, _)| *s <= seq) {
            if let Some((_, size, _)) = self.frames.pop_front() {
                self.bytes -= size;
                released += 1;
            }
        }
        Ok(released)
    }

    /// Forgets the frame numbered `seq` (it expired before it could be sent again).
    pub fn forget(&mut self, seq: u64) {
        if let Some(i) = self.frames.iter().position(|(s, _, _)| *s == seq) {
            if let Some((_, size, _)) = self.frames.remove(i) {
                self.bytes -= size;
            }
        }
    }

    /// Changes every kept frame (the link went down: what was waited for is not any more).
    pub fn for_each_mut(&mut self, mut f: impl FnMut(&mut T)) {
        for (_, _, t) in self.frames.iter_mut() {
            f(t);
        }
    }

    /// The kept frames, oldest first: what a new link sends again.
    pub fn pending(&self) -> impl Iterator<Item = (u64, &T)> {
        self.frames.iter().map(|(s, _, t)| (*s, t))
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// What the receiver does with a numbered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New: deliver it, then report [`Inbound::accepted`]. `skipped` numbers before it never
    /// came (the sender dropped them, counted there; or this is the first frame seen of the
    /// stream).
    Deliver { skipped: u64 },
    /// Seen before (a re-send after a reconnect): drop it.
    Duplicate,
}

/// The receiver's state for one origin node's stream: what was delivered, what the router
/// accepted, what to acknowledge.
#[derive(Debug, Default)]
pub struct Inbound {
    /// The stream, `None` before its first frame.
    epoch: Option<u64>,
    /// The next number not yet delivered.
    next: u64,
    /// Delivered numbers the router has not accepted yet, in order, with `true` once accepted.
    in_flight: VecDeque<(u64, bool)>,
    /// The highest number up to which everything delivered was accepted.
    acked: u64,
}

impl Inbound {
    /// Decides about frame `seq` of stream `epoch`. A new stream (the origin restarted, or
    /// this node did and has no state) starts at whatever number comes first: what came
    /// before was acknowledged to the previous incarnation, or is lost with the origin.
    pub fn offer(&mut self, epoch: u64, seq: u64) -> Verdict {
        if self.epoch != Some(epoch) {
            *self = Inbound {
                epoch: Some(epoch),
                next: seq,
                in_flight: VecDeque::new(),
                acked: seq.saturating_sub(1),
            };
        }
        if seq < self.next {
            return Verdict::Duplicate;
        }
        let skipped = seq - self.next;
        if self.in_flight.is_empty() {
            // nothing in between waits for the router: the skipped numbers are done
            self.acked = seq.saturating_sub(1);
        }
        self.next = seq + 1;
        self.in_flight.push_back((seq, false));
        Verdict::Deliver { skipped }
    }

    /// The router accepted frame `seq` of stream `epoch`. Returns the new acknowledgement
    /// `(epoch, seq)` if it moved.
    pub fn accepted(&mut self, epoch: u64, seq: u64) -> Option<(u64, u64)> {
        if self.epoch != Some(epoch) {
            return None;
        }
        if let Some(e) = self.in_flight.iter_mut().find(|(s, _)| *s == seq) {
            e.1 = true;
        }
        let before = self.acked;
        while let Some(&(s, true)) = self.in_flight.front() {
            self.acked = s;
            self.in_flight.pop_front();
        }
        (self.acked != before).then_some((epoch, self.acked))
    }

    /// The acknowledgement to send (also again on a new link): `None` before anything of the
    /// stream was accepted.
    pub fn ack(&self) -> Option<(u64, u64)> {
        self.epoch
            .filter(|_| self.acked > 0)
            .map(|e| (e, self.acked))
    }

    /// Delivered frames the router has not accepted yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// Whether acknowledgement `ack` (see [`Inbound::ack`]) covers frame `frame` `(epoch, seq)`:
/// the router accepted it and everything before it. Another stream's says nothing of it.
pub fn covers(ack: Option<(u64, u64)>, frame: (u64, u64)) -> bool {
    ack.is_some_and(|(epoch, seq)| epoch == frame.0 && seq >= frame.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender and a receiver joined by a link that can lose everything in flight.
    struct Pair {
        tx: Unacked<&'static str>,
        rx: Inbound,
        /// What the receiver's router got, in order.
        delivered: Vec<&'static str>,
        duplicates: usize,
    }

    impl Pair {
        fn new(max: usize) -> Pair {
            Pair {
                tx: Unacked::new(7, max, usize::MAX),
                rx: Inbound::default(),
                delivered: Vec::new(),
                duplicates: 0,
            }
        }

        /// The receiver gets `(seq, item)`, delivers it, and the router accepts it at once.
        fn arrive(&mut self, epoch: u64, seq: u64, item: &'static str) -> Option<(u64, u64)> {
            match self.rx.offer(epoch, seq) {
                Verdict::Deliver { .. } => {
                    self.delivered.push(item);
                    self.rx.accepted(epoch, seq)
                }
                Verdict::Duplicate => {
                    self.duplicates += 1;
                    None
                }
            }
        }

        /// After a reconnect: everything kept is sent again, in order.
        fn resend(&mut self) -> Option<(u64, u64)> {
            let kept: Vec<(u64, &'static str)> = self.tx.pending().map(|(s, t)| (s, *t)).collect();
            let mut ack = None;
            for (seq, item) in kept {
                ack = self.arrive(7, seq, item).or(ack);
            }
            ack
        }
    }

    #[test]
    fn a_lost_link_loses_nothing_and_a_resend_is_delivered_once() {
        let mut p = Pair::new(100);
        // a and b arrive and are acknowledged
        for item in ["a", "b"] {
            let (seq, _) = p.tx.push(item, 1);
            let ack = p.arrive(7, seq, item).expect("ack moves");
            assert_eq!(p.tx.ack(ack.0, ack.1), Ok(1));
        }
        // c arrives but its ack is lost with the link; d and e are lost on the wire
        let (c, _) = p.tx.push("c", 1);
        assert_eq!(p.arrive(7, c, "c"), Some((7, 3)));
        p.tx.push("d", 1);
        p.tx.push("e", 1);
        assert_eq!(p.tx.len(), 3);
        // the new link sends c, d, e again: c is a duplicate, d and e are new
        let ack = p.resend().expect("ack moves");
        assert_eq!(ack, (7, 5));
        assert_eq!(p.delivered, ["a", "b", "c", "d", "e"]);
        assert_eq!(p.duplicates, 1);
        assert_eq!(p.tx.ack(ack.0, ack.1), Ok(3));
        assert!(p.tx.is_empty());
        // resending again after another reconnect: nothing is kept, nothing delivered twice
        assert_eq!(p.resend(), None);
        assert_eq!(p.delivered.len(), 5);
    }

    #[test]
    fn the_ack_waits_for_the_router_in_order() {
        let mut rx = Inbound::default();
        for seq in 1..=3 {
            assert_eq!(rx.offer(1, seq), Verdict::Deliver { skipped: 0 });
        }
        assert_eq!(rx.ack(), None);
        // QoS 2 (seq 1) completes after the QoS 1 ones: nothing is acknowledged before it
        assert_eq!(rx.accepted(1, 2), None);
        assert_eq!(rx.accepted(1, 3), None);
        assert_eq!(rx.in_flight(), 3);
        assert_eq!(rx.accepted(1, 1), Some((1, 3)));
        assert_eq!(rx.ack(), Some((1, 3)));
        assert_eq!(rx.in_flight(), 0);
        // a re-send of an accepted frame is a duplicate, its ack is the current one
        assert_eq!(rx.offer(1, 2), Verdict::Duplicate);
        assert_eq!(rx.ack(), Some((1, 3)));
        // a re-send of a delivered frame the router has not accepted yet is a duplicate too
        assert_eq!(rx.offer(1, 4), Verdict::Deliver { skipped: 0 });
        assert_eq!(rx.offer(1, 4), Verdict::Duplicate);
        assert_eq!(rx.accepted(1, 4), Some((1, 4)));
        // an acceptance of another stream, or one never delivered, moves nothing
        assert_eq!(rx.accepted(2, 5), None);
        assert_eq!(rx.accepted(1, 9), None);
    }

    #[test]
    fn a_new_stream_starts_where_it_is_first_seen() {
        let mut rx = Inbound::default();
        // this node restarted: the sender re-sends from 40 on
        assert_eq!(rx.offer(5, 40), Verdict::Deliver { skipped: 0 });
        assert_eq!(rx.accepted(5, 40), Some((5, 40)));
        assert_eq!(rx.offer(5, 39), Verdict::Duplicate);
        // the origin restarted: a new epoch from 1
        assert_eq!(rx.offer(6, 1), Verdict::Deliver { skipped: 0 });
        assert_eq!(rx.ack(), None);
        assert_eq!(rx.accepted(5, 41), None, "the old stream is gone");
        assert_eq!(rx.accepted(6, 1), Some((6, 1)));
    }

    #[test]
    fn the_bound_drops_the_oldest_and_the_receiver_skips_the_gap() {
        let mut p = Pair::new(3);
        let mut dropped = 0;
        for item in ["a", "b", "c", "d", "e"] {
            dropped += p.tx.push(item, 1).1;
        }
        assert_eq!(dropped, 2);
        assert_eq!(
            p.tx.pending().map(|(s, t)| (s, *t)).collect::<Vec<_>>(),
            [(3, "c"), (4, "d"), (5, "e")]
        );
        // the receiver had 1 (a); 2 (b) was dropped: it delivers 3..5 and says it skipped 1
        assert_eq!(p.arrive(7, 1, "a"), Some((7, 1)));
        assert_eq!(p.rx.offer(7, 3), Verdict::Deliver { skipped: 1 });
        assert_eq!(p.rx.accepted(7, 3), Some((7, 3)));
        assert_eq!(p.tx.ack(7, 3), Ok(1));
        assert_eq!(p.tx.len(), 2);
    }

    #[test]
    fn the_byte_bound_keeps_the_newest_and_acks_are_checked() {
        let mut tx: Unacked<u8> = Unacked::new(1, 100, 10);
        assert_eq!(tx.push(1, 6), (1, 0));
        assert_eq!(tx.push(2, 6), (2, 1));
        assert_eq!(tx.bytes(), 6);
        // a frame larger than the bound alone is still kept (it is the newest)
        assert_eq!(tx.push(3, 50), (3, 1));
        assert_eq!((tx.len(), tx.bytes()), (1, 50));
        tx.forget(3);
        assert_eq!((tx.len(), tx.bytes()), (0, 0));
        assert_eq!(tx.ack(1, 4), Err(AckAhead { acked: 4, sent: 3 }));
        assert_eq!(tx.ack(2, 400), Ok(0), "another stream's ack is ignored");
        assert_eq!(tx.ack(1, 3), Ok(0));
        assert_eq!(tx.epoch(), 1);
    }

    #[test]
    fn an_acknowledgement_covers_its_stream_up_to_its_frame() {
        assert!(covers(Some((7, 5)), (7, 5)));
        assert!(covers(Some((7, 9)), (7, 5)));
        assert!(!covers(Some((7, 4)), (7, 5)), "frame 5 not accepted yet");
        assert!(!covers(Some((8, 9)), (7, 5)), "another stream");
        assert!(!covers(None, (7, 1)));
        // As a receiver acknowledges: frame 2 accepted before 1 covers nothing until 1 is.
        let mut rx = Inbound::default();
        for seq in 1..=2 {
            assert_eq!(rx.offer(3, seq), Verdict::Deliver { skipped: 0 });
        }
        rx.accepted(3, 2);
        assert!(!covers(rx.ack(), (3, 2)));
        rx.accepted(3, 1);
        assert!(covers(rx.ack(), (3, 2)));
    }
}
