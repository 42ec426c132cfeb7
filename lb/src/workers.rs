//! The data-path threads: one single-threaded runtime per core, each with its own epoll and
//! its own accept loop on every frontend (HAProxy's thread model).
//!
//! A connection lives its whole life on the thread that accepted it, so its readiness events
//! wake that thread directly: no hand-off between threads and no work-stealing wake-ups on the
//! path of a packet. Probes, the admin server and reloads stay on the caller's runtime.

use std::io;
use std::num::NonZeroU32;

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

/// How many data-path threads: `MQLB_DATA_THREADS` if set (an operator's override, say for an
/// A/B run), else `lb.data_threads` from the config, else one per core.
pub(crate) fn count(configured: Option<NonZeroU32>) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    choose(std::env::var("MQLB_DATA_THREADS").ok(), configured, cores)
}

/// The rule of [`count`], without the environment. A value of `MQLB_DATA_THREADS` that is not
/// a positive number is reported, not silently taken for the default.
fn choose(env: Option<String>, configured: Option<NonZeroU32>, cores: usize) -> usize {
    let fallback = configured.map_or(cores, |n| n.get() as usize);
    match env {
        None => fallback,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                tracing::warn!(
                    value = v,
                    threads = fallback,
                    "MQLB_DATA_THREADS is not a positive number; ignored"
                );
                fallback
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_overrides_the_config_which_overrides_the_core_count() {
        let two = NonZeroU32::new(2);
        assert_eq!(choose(None, None, 8), 8);
        assert_eq!(choose(None, two, 8), 2);
        assert_eq!(choose(Some("3".into()), two, 8), 3);
        assert_eq!(choose(Some("3".into()), None, 8), 3);
        // Not a positive number: reported and ignored.
        assert_eq!(choose(Some("0".into()), two, 8), 2);
        assert_eq!(choose(Some("many".into()), None, 8), 8);
    }
}
