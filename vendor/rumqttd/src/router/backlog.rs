//! mqlb patch (issue 12; MQTT-4.1.0-2's "the Server MAY limit session state"): the messages
//! queued for a persistent session while its client was away are bounded when it comes back,
//! `RouterConfig::max_queued_messages` in all its subscriptions, as EMQX's `max_mqueue_len`
//! and HiveMQ's `max-queued-messages` bound them: QoS 0 messages go first (the oldest of them),
//! then the oldest QoS 1/2 ones. The log holds one copy of each message for every subscriber,
//! so a session's queue is the stretch of each of its filters' logs after its cursor; the
//! bound is a skip over that stretch ([`Trim`], read by `DataLog::native_readv_timed`).
//! Unacknowledged deliveries (in flight when the client left) are never part of it.
//!
//! [`plan`] is pure: it sees only the QoS of each waiting message, filter by filter.

use crate::Offset;

/// How many of one filter's waiting messages to drop: the `qos0` oldest of its QoS 0 ones and
/// the `qos1` oldest of its QoS 1/2 ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cut {
    pub qos0: usize,
    pub qos1: usize,
}

/// The cuts that keep at most `limit` of the messages waiting in `backlogs` (each filter's,
/// the delivered QoS of each message, oldest first). QoS 0 messages go first, then QoS 1/2
/// ones; each time from the filter that holds the most of that kind, so no filter is emptied
/// while another keeps a long queue and each keeps its newest messages.
pub fn plan(backlogs: &[Vec<u8>], limit: usize) -> Vec<Cut> {
    let total: usize = backlogs.iter().map(Vec::len).sum();
    let mut cuts = vec![Cut::default(); backlogs.len()];
    let mut excess = total.saturating_sub(limit);
    if excess == 0 {
        return cuts;
    }
    let qos0: Vec<usize> = backlogs
        .iter()
        .map(|b| b.iter().filter(|q| **q == 0).count())
        .collect();
    let dropped0 = level(&qos0, excess);
    excess -= dropped0.iter().sum::<usize>();
    let qos1: Vec<usize> = backlogs
        .iter()
        .zip(&qos0)
        .map(|(b, z)| b.len() - z)
        .collect();
    let dropped1 = level(&qos1, excess);
    for (c, (z, o)) in cuts.iter_mut().zip(dropped0.into_iter().zip(dropped1)) {
        *c = Cut { qos0: z, qos1: o };
    }
    cuts
}

/// Takes `n` (or all there is) from `counts`, always from the largest count left: returns how
/// many it took from each. A water level lowered until `n` are taken, computed, not looped
/// one by one.
fn level(counts: &[usize], n: usize) -> Vec<usize> {
    let total: usize = counts.iter().sum();
    if n >= total {
        return counts.to_vec();
    }
    // The highest level `h` such that taking everything above it takes at least `n`.
    let above = |h: usize| counts.iter().map(|c| c.saturating_sub(h)).sum::<usize>();
    let (mut lo, mut hi) = (0, counts.iter().copied().max().unwrap_or(0));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if above(mid) >= n {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let mut took: Vec<usize> = counts.iter().map(|c| c.saturating_sub(lo + 1)).collect();
    // The rest, one each from the counts still at the level, first filters first.
    let mut rest = n - took.iter().sum::<usize>();
    for (t, c) in took.iter_mut().zip(counts) {
        if rest == 0 {
            break;
        }
        if *c > lo {
            *t += 1;
            rest -= 1;
        }
    }
    took
}

/// A cut as offsets in one filter's log, carried by the session's data request until its
/// cursor has passed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Trim {
    /// Messages at or before this offset are not touched (they were delivered and are not
    /// acknowledged: they go out again as they are).
    pub after: Option<Offset>,
    /// QoS 0 deliveries up to and including this offset are dropped.
    pub qos0_through: Option<Offset>,
    /// QoS 1/2 deliveries up to and including this offset are dropped.
    pub qos1_through: Option<Offset>,
}

impl Trim {
    /// `waiting`: the filter's queued messages after `after` (offset, delivered QoS), oldest
    /// first; `None` when the cut drops nothing.
    pub fn new(after: Option<Offset>, waiting: &[(Offset, u8)], cut: Cut) -> Option<Trim> {
        let through = |want_qos0: bool, n: usize| {
            n.checked_sub(1).and_then(|i| {
                waiting
                    .iter()
                    .filter(|(_, q)| (*q == 0) == want_qos0)
                    .nth(i)
                    .map(|(o, _)| *o)
            })
        };
        let trim = Trim {
            after,
            qos0_through: through(true, cut.qos0),
            qos1_through: through(false, cut.qos1),
        };
        (trim.qos0_through.is_some() || trim.qos1_through.is_some()).then_some(trim)
    }

    /// Whether the message at `offset`, delivered at `qos`, is dropped.
    pub fn drops(&self, offset: Offset, qos: u8) -> bool {
        if self.after.is_some_and(|a| offset <= a) {
            return false;
        }
        let through = if qos == 0 {
            self.qos0_through
        } else {
            self.qos1_through
        };
        through.is_some_and(|t| offset <= t)
    }

    /// Whether a cursor at `cursor` (the next offset to read) is past every dropped message.
    pub fn passed(&self, cursor: Offset) -> bool {
        [self.qos0_through, self.qos1_through]
            .into_iter()
            .flatten()
            .all(|t| cursor > t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(backlogs: &[Vec<u8>], limit: usize) -> usize {
        let cuts = plan(backlogs, limit);
        let total: usize = backlogs.iter().map(Vec::len).sum();
        total - cuts.iter().map(|c| c.qos0 + c.qos1).sum::<usize>()
    }

    #[test]
    fn nothing_is_cut_within_the_limit() {
        let b = vec![vec![0, 1, 1], vec![2]];
        assert_eq!(plan(&b, 4), vec![Cut::default(); 2]);
        assert_eq!(plan(&b, 100), vec![Cut::default(); 2]);
    }

    #[test]
    fn qos0_goes_before_any_qos1() {
        let b = vec![vec![1, 0, 1, 0, 1], vec![0, 0]];
        // 7 waiting, 4 kept: three QoS 0 go, every QoS 1 stays.
        let cuts = plan(&b, 4);
        assert_eq!(cuts.iter().map(|c| c.qos1).sum::<usize>(), 0, "{cuts:?}");
        assert_eq!(cuts.iter().map(|c| c.qos0).sum::<usize>(), 3, "{cuts:?}");
        // 2 kept: every QoS 0 and one QoS 1 go.
        let cuts = plan(&b, 2);
        assert_eq!(
            cuts,
            vec![Cut { qos0: 2, qos1: 1 }, Cut { qos0: 2, qos1: 0 }]
        );
    }

    #[test]
    fn the_longest_queue_is_cut_first() {
        let b = vec![vec![1; 10], vec![1; 2], vec![1; 6]];
        // 18 waiting, 9 kept: cut down to 3, 2 and 4 (a tie at 4 is broken by order).
        let cuts = plan(&b, 9);
        assert_eq!(kept(&b, 9), 9);
        assert_eq!(
            cuts.iter().map(|c| c.qos1).collect::<Vec<_>>(),
            vec![7, 0, 2]
        );
    }

    #[test]
    fn the_limit_holds_for_any_shape() {
        // A small exhaustive sweep: every backlog of up to 3 filters of up to 4 messages.
        let shapes: Vec<Vec<u8>> = (0..=4usize)
            .flat_map(|len| {
                (0..(1u32 << len))
                    .map(move |bits| (0..len).map(|i| ((bits >> i) & 1) as u8).collect())
            })
            .collect();
        for a in &shapes {
            for b in &shapes {
                let backlogs = vec![a.clone(), b.clone()];
                let total = a.len() + b.len();
                for limit in 0..=total {
                    let cuts = plan(&backlogs, limit);
                    assert_eq!(
                        kept(&backlogs, limit),
                        limit.min(total),
                        "{backlogs:?} {limit}"
                    );
                    let zeros: usize = backlogs.iter().flatten().filter(|q| **q == 0).count();
                    let cut1: usize = cuts.iter().map(|c| c.qos1).sum();
                    let cut0: usize = cuts.iter().map(|c| c.qos0).sum();
                    assert!(
                        cut1 == 0 || cut0 == zeros,
                        "QoS 1 cut before QoS 0: {backlogs:?} {limit} {cuts:?}"
                    );
                    for (c, b) in cuts.iter().zip(&backlogs) {
                        let z = b.iter().filter(|q| **q == 0).count();
                        assert!(
                            c.qos0 <= z && c.qos1 <= b.len() - z,
                            "{backlogs:?} {limit} {cuts:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_trim_drops_the_oldest_of_each_kind_and_spares_what_is_in_flight() {
        let waiting = [
            ((0, 10), 1),
            ((0, 11), 0),
            ((0, 12), 1),
            ((0, 13), 0),
            ((0, 14), 1),
        ];
        let t = Trim::new(Some((0, 9)), &waiting, Cut { qos0: 1, qos1: 2 }).expect("a cut");
        assert_eq!(t.qos0_through, Some((0, 11)));
        assert_eq!(t.qos1_through, Some((0, 12)));
        let dropped: Vec<bool> = waiting.iter().map(|(o, q)| t.drops(*o, *q)).collect();
        assert_eq!(dropped, vec![true, true, true, false, false]);
        // Unacknowledged deliveries before `after` are never dropped, whatever their QoS.
        assert!(!t.drops((0, 9), 1) && !t.drops((0, 5), 0));
        assert!(!t.passed((0, 12)) && t.passed((0, 13)));
        assert_eq!(Trim::new(None, &waiting, Cut::default()), None);
    }
}
