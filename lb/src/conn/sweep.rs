//! Housekeeping of the live connections, on a task of its own: byte counts folded into the
//! metrics, idle connections ended, the per-source limit counters pruned.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::shared::Shared;

/// Sweeps the connection registry a few times per idle timeout (the shortest of the current
/// rules): folds byte counts into the metrics and ends idle connections. Runs until the LB has
/// fully stopped, so idle connections still time out during shutdown's grace period.
pub(crate) async fn sweep_idle(shared: Arc<Shared>, stop: CancellationToken) {
    let mut last_prune = std::time::Instant::now();
    loop {
        let tick = shared
            .snapshot
            .load()
            .rules
            .values()
            .map(|r| super::relay::sweep_tick(&r.cfg))
            .min()
            .unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => shared.conns.sweep(&shared.metrics),
        }
        if last_prune.elapsed() >= crate::limits::PRUNE_EVERY {
            last_prune = std::time::Instant::now();
            let snap = shared.snapshot.load();
            shared
                .sources
                .prune(|f| snap.rules.get(f).map(|r| r.limits), last_prune);
        }
    }
}
