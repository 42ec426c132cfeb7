//! When the primary may judge a member silent (docs/design.md, "haserver": members that miss
//! heartbeats expire). A member's silence only counts while this server could have heard it:
//! from the moment it became primary, and only while its own rounds kept going. A server that
//! restarts, takes over from a dead primary, or resumes after a stall gives every member one
//! full `member_timeout` (and `remove_after`) before it changes anything, so its own absence
//! never empties the membership in one round. Pure: the caller passes the time in.

/// Which members one expiry round may change, as "last seen before" instants (Unix ms).
/// `None`: nobody in that state may change yet (the grace is still running).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cutoffs {
    /// Up members last seen before this go down.
    pub down_before_ms: Option<i64>,
    /// Down members last seen before this are removed.
    pub remove_before_ms: Option<i64>,
}

/// The expiry loop's memory between rounds.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    /// The primary term being watched, and since when (Unix ms) this server has heard every
    /// heartbeat of it.
    since: Option<(u64, i64)>,
    last_round_ms: Option<i64>,
}

impl Watch {
    /// One round at `now_ms`. `term` is the primary term this server holds (it changes each time
    /// the server becomes primary), `None` while it is a backup. Returns what may expire.
    pub(crate) fn round(
        &mut self,
        now_ms: i64,
        term: Option<u64>,
        down_after_ms: i64,
        remove_after_ms: i64,
    ) -> Option<Cutoffs> {
        let Some(term) = term else {
            *self = Watch::default();
            return None;
        };
        // Rounds that stopped for a whole member timeout (a paused process, a database that
        // blocked) may have missed heartbeats as surely as a server that was down.
        let stalled = self
            .last_round_ms
            .is_some_and(|last| now_ms.saturating_sub(last) >= down_after_ms);
        self.last_round_ms = Some(now_ms);
        let since = match self.since {
            Some((t, since)) if t == term && !stalled => since,
            _ => {
                self.since = Some((term, now_ms));
                now_ms
            }
        };
        let watched = now_ms.saturating_sub(since);
        Some(Cutoffs {
            down_before_ms: (watched >= down_after_ms).then(|| now_ms - down_after_ms),
            remove_before_ms: (watched >= remove_after_ms).then(|| now_ms - remove_after_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOWN: i64 = 3_000;
    const REMOVE: i64 = 10_000;

    fn cut(down: Option<i64>, remove: Option<i64>) -> Option<Cutoffs> {
        Some(Cutoffs {
            down_before_ms: down,
            remove_before_ms: remove,
        })
    }

    #[test]
    fn a_new_primary_waits_one_member_timeout_before_expiring_anyone() {
        let mut w = Watch::default();
        assert_eq!(
            w.round(100_000, None, DOWN, REMOVE),
            None,
            "a backup expires nothing"
        );
        assert_eq!(
            w.round(100_500, Some(1), DOWN, REMOVE),
            cut(None, None),
            "just became primary: grace"
        );
        assert_eq!(w.round(103_000, Some(1), DOWN, REMOVE), cut(None, None));
        assert_eq!(
            w.round(103_500, Some(1), DOWN, REMOVE),
            cut(Some(100_500), None),
            "one member timeout after becoming primary: silence counts"
        );
        assert_eq!(
            w.round(106_000, Some(1), DOWN, REMOVE),
            cut(Some(103_000), None)
        );
        assert_eq!(
            w.round(108_000, Some(1), DOWN, REMOVE),
            cut(Some(105_000), None)
        );
        assert_eq!(
            w.round(110_500, Some(1), DOWN, REMOVE),
            cut(Some(107_500), Some(100_500)),
            "removal waits remove_after"
        );
    }

    #[test]
    fn losing_and_regaining_the_lease_or_stalling_starts_a_new_grace() {
        let mut w = Watch::default();
        // Rounds every 500 ms from `from` to `to` (inclusive) under `term`; the last result.
        let rounds = |w: &mut Watch, from: i64, to: i64, term| {
            (from..=to)
                .step_by(500)
                .map(|t| w.round(t, term, DOWN, REMOVE))
                .last()
                .flatten()
        };
        assert_eq!(rounds(&mut w, 0, 4_000, Some(1)), cut(Some(1_000), None));
        // Primary again under a new term (the lease lapsed and was taken again in between).
        assert_eq!(w.round(4_100, Some(2), DOWN, REMOVE), cut(None, None));
        assert_eq!(
            rounds(&mut w, 4_600, 7_100, Some(2)),
            cut(Some(4_100), None)
        );
        // Its own rounds stopped for a member timeout: whatever it missed gets a grace.
        assert_eq!(w.round(10_100, Some(2), DOWN, REMOVE), cut(None, None));
        assert_eq!(rounds(&mut w, 10_600, 13_000, Some(2)), cut(None, None));
        assert_eq!(
            w.round(13_100, Some(2), DOWN, REMOVE),
            cut(Some(10_100), None)
        );
        // A backup in between forgets everything.
        assert_eq!(w.round(13_200, None, DOWN, REMOVE), None);
        assert_eq!(w.round(13_300, Some(2), DOWN, REMOVE), cut(None, None));
    }
}
