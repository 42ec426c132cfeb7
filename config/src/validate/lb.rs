//! `[lb]`: the load balancer's process-wide settings.

use super::Checker;
use crate::defaults::*;
use crate::model::LbSettings;
use crate::raw::RawLb;

pub(super) fn lb_section(c: &mut Checker, r: &RawLb) -> LbSettings {
    let lb = LbSettings {
        admin: c
            .addr("lb.admin", r.admin.as_deref().unwrap_or(DEFAULT_ADMIN))
            .unwrap_or(DEFAULT_ADMIN_ADDR),
        shutdown_grace: c.duration(
            "lb.shutdown_grace",
            r.shutdown_grace.as_deref(),
            DEFAULT_SHUTDOWN_GRACE,
        ),
        watch_config: r.watch_config.unwrap_or(DEFAULT_WATCH_CONFIG),
        watch_interval: c.duration(
            "lb.watch_interval",
            r.watch_interval.as_deref(),
            DEFAULT_WATCH_INTERVAL,
        ),
        data_threads: r.data_threads.map(|n| c.positive("lb.data_threads", n)),
        admin_token: c.token_file("lb.admin_token_file", r.admin_token_file.as_deref()),
        max_connections: r
            .max_connections
            .map(|n| c.positive("lb.max_connections", n)),
        state_file: r.state_file.as_deref().and_then(|p| {
            if p.trim().is_empty() {
                c.error(
                    "lb.state_file",
                    "must not be empty (leave it out for the default)",
                );
                None
            } else {
                Some(std::path::PathBuf::from(p))
            }
        }),
        source: r.source.as_deref().and_then(|s| c.ip("lb.source", s)),
    };
    if let Some(n) = lb.data_threads.filter(|n| n.get() > MAX_DATA_THREADS) {
        c.error(
            "lb.data_threads",
            format!("{n} threads: at most {MAX_DATA_THREADS} (one per core is the usual choice)"),
        );
    }
    lb
}
