//! The primary lease's rules, shared by both stores: one row (holder, address, epoch, expiry)
//! that a store reads and writes in one transaction, judged by the *database's* clock (`now_ms`
//! here is the database's, never an HA server's), so HA servers' clocks do not matter. The
//! epoch is the fencing token: it grows each time the lease changes hands (or is taken again
//! after it lapsed), and a write is accepted only with the current epoch of a live lease.
//! Pure: the stores pass the row and their clock in.

use super::StoreError;

/// The lease row. `expires_ms` is on the database's clock (Unix ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub addr: String,
    pub epoch: u64,
    pub expires_ms: i64,
}

impl Lease {
    /// The row a new database starts with: nobody holds it, epoch 0 (never valid for a write).
    pub fn vacant() -> Lease {
        Lease {
            holder: String::new(),
            addr: String::new(),
            epoch: 0,
            expires_ms: 0,
        }
    }

    pub fn is_live(&self, now_ms: i64) -> bool {
        self.expires_ms > now_ms
    }

    /// Same id *and* address: another process started with the same id by mistake is not the
    /// holder.
    pub fn is_held_by(&self, holder: &str, addr: &str) -> bool {
        self.holder == holder && self.addr == addr
    }
}

/// What an attempt by `holder` at `addr` to take or renew the lease makes of `current`: the
/// row to write, or `None` if someone else holds it (it stays as it is).
pub fn attempt(
    current: &Lease,
    holder: &str,
    addr: &str,
    now_ms: i64,
    ttl_ms: i64,
) -> Option<Lease> {
    let live = current.is_live(now_ms);
    if live && !current.is_held_by(holder, addr) {
        return None;
    }
    Some(Lease {
        holder: holder.to_string(),
        addr: addr.to_string(),
        // A renewal keeps the epoch; taking the lease (free, expired, or lapsed in our own
        // hands) starts a new one, which fences every write of an earlier primary.
        epoch: if live {
            current.epoch
        } else {
            current.epoch + 1
        },
        expires_ms: now_ms + ttl_ms,
    })
}

/// The row after `holder` at `addr` gives the lease up: expired now, epoch kept. `None`: not
/// held by them (nothing to do).
pub fn release(current: &Lease, holder: &str, addr: &str, now_ms: i64) -> Option<Lease> {
    (current.is_held_by(holder, addr) && current.is_live(now_ms)).then(|| Lease {
        expires_ms: now_ms,
        ..current.clone()
    })
}

/// Whether a write of the primary holding `epoch` may go through.
pub fn fence(current: &Lease, epoch: u64, now_ms: i64) -> Result<(), StoreError> {
    let expired = !current.is_live(now_ms);
    if current.epoch == epoch && epoch > 0 && !expired {
        return Ok(());
    }
    Err(StoreError::Fenced {
        epoch,
        current: current.epoch,
        expired,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(holder: &str, epoch: u64, expires_ms: i64) -> Lease {
        Lease {
            holder: holder.into(),
            addr: format!("{holder}-addr"),
            epoch,
            expires_ms,
        }
    }

    #[test]
    fn taking_bumps_the_epoch_renewing_keeps_it() {
        let l = attempt(&Lease::vacant(), "a", "a-addr", 100, 50);
        assert_eq!(l, Some(held("a", 1, 150)));
        assert_eq!(
            attempt(&held("a", 1, 150), "a", "a-addr", 120, 50),
            Some(held("a", 1, 170)),
            "renewed"
        );
        assert_eq!(attempt(&held("a", 1, 150), "b", "b-addr", 149, 50), None);
        assert_eq!(
            attempt(&held("a", 1, 150), "b", "b-addr", 150, 50),
            Some(held("b", 2, 200)),
            "expired: taken"
        );
        assert_eq!(
            attempt(&held("a", 1, 150), "a", "a-addr", 160, 50),
            Some(held("a", 2, 210)),
            "lapsed in its own hands: a new term all the same"
        );
        assert_eq!(attempt(&held("a", 1, 150), "a", "elsewhere", 120, 50), None);
    }

    #[test]
    fn a_release_ends_the_lease_and_keeps_the_epoch() {
        assert_eq!(release(&held("a", 4, 150), "b", "b-addr", 100), None);
        assert_eq!(
            release(&held("a", 4, 150), "a", "a-addr", 100),
            Some(held("a", 4, 100))
        );
        assert_eq!(
            release(&held("a", 4, 150), "a", "a-addr", 200),
            None,
            "already over"
        );
        let next = attempt(&held("a", 4, 100), "b", "b-addr", 100, 50);
        assert_eq!(next.map(|l| l.epoch), Some(5));
    }

    #[test]
    fn only_the_current_epoch_of_a_live_lease_writes() {
        assert!(fence(&held("a", 3, 150), 3, 149).is_ok());
        assert!(matches!(
            fence(&held("a", 3, 150), 2, 100),
            Err(StoreError::Fenced {
                epoch: 2,
                current: 3,
                expired: false
            })
        ));
        assert!(matches!(
            fence(&held("a", 3, 150), 3, 150),
            Err(StoreError::Fenced { expired: true, .. })
        ));
        assert!(
            fence(&Lease::vacant(), 0, -1).is_err(),
            "epoch 0 never writes"
        );
    }
}
