//! The data-path threads: one single-threaded runtime per core, each with its own epoll and
//! its own accept loop on every frontend (HAProxy's thread model).
//!
//! A connection lives its whole life on the thread that accepted it, so its readiness events
//! wake that thread directly: no hand-off between threads and no work-stealing wake-ups on the
//! path of a packet. Probes, the admin server and reloads stay on the caller's runtime.

use std::io;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// Running data-path threads; they stop when this is dropped.
pub(crate) struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `n` threads (at least one).
    pub(crate) fn start(n: usize) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("mqlb-data-{i}"))
                .spawn(move || rt.block_on(stop.cancelled()))?;
        }
        Ok(Workers { handles, stop })
    }

    pub(crate) fn handles(&self) -> &[Handle] {
        &self.handles
    }

    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Each thread returns from block_on and drops its runtime with whatever it still runs.
        self.stop.cancel();
    }
}

/// How many data-path threads: `MQLB_DATA_THREADS` if set, else one per core. A value that is
/// not a positive number is reported, not silently taken for the default.
pub(crate) fn default_count() -> usize {
    let cores = || std::thread::available_parallelism().map_or(1, |n| n.get());
    match std::env::var("MQLB_DATA_THREADS") {
        Err(_) => cores(),
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                tracing::warn!(
                    value = v,
                    "MQLB_DATA_THREADS is not a positive number; using one thread per core"
                );
                cores()
            }
        },
    }
}
