//! `[ha]` and `[[haserver]]`: the HA servers and the membership timing they enforce.

use std::collections::HashSet;

use super::{Checker, UNPARSED_ADDR};
use crate::defaults::*;
use crate::model::{HaServer, HaSettings};
use crate::raw::{RawConfig, RawHa, RawHaServer};

pub(super) fn validate_ha(c: &mut Checker, raw: &RawConfig) -> HaSettings {
    let timing = timing(c, &raw.ha);
    let servers = servers(c, &raw.haservers);
    pool_discovery(c, raw);
    HaSettings { servers, ..timing }
}

/// `[ha]`: the settings but the servers.
fn timing(c: &mut Checker, r: &RawHa) -> HaSettings {
    let heartbeat_interval = c.duration(
        "ha.heartbeat_interval",
        r.heartbeat_interval.as_deref(),
        DEFAULT_HEARTBEAT_INTERVAL,
    );
    let member_timeout = c.duration(
        "ha.member_timeout",
        r.member_timeout.as_deref(),
        DEFAULT_MEMBER_TIMEOUT,
    );
    let remove_after = c.duration(
        "ha.remove_after",
        r.remove_after.as_deref(),
        DEFAULT_HA_REMOVE_AFTER,
    );
    let lease = c.duration("ha.lease", r.lease.as_deref(), DEFAULT_LEASE);
    if member_timeout <= heartbeat_interval {
        c.error(
            "ha.member_timeout",
            "must be longer than ha.heartbeat_interval (members would flap)",
        );
    }
    if remove_after < member_timeout {
        c.error(
            "ha.remove_after",
            "must not be shorter than ha.member_timeout",
        );
    }
    HaSettings {
        servers: Vec::new(),
        heartbeat_interval,
        member_timeout,
        remove_after,
        lease,
    }
}

fn servers(c: &mut Checker, raw: &[RawHaServer]) -> Vec<HaServer> {
    let mut ids = HashSet::new();
    let mut servers = Vec::new();
    for (i, h) in raw.iter().enumerate() {
        let k = format!("haserver[{i}]");
        c.name(&format!("{k}.id"), &h.id, &mut ids, "haserver");
        let listen = c.addr(&format!("{k}.listen"), &h.listen);
        servers.push(HaServer {
            id: h.id.clone(),
            listen: listen.unwrap_or(UNPARSED_ADDR),
            db: std::path::PathBuf::from(h.db.as_deref().unwrap_or(DEFAULT_HA_DB)),
        });
    }
    servers
}

/// Cross-section: a pool's `discovery` names a known source, and `"haserver"` needs one.
fn pool_discovery(c: &mut Checker, raw: &RawConfig) {
    for (i, p) in raw.pools.iter().enumerate() {
        match p.discovery.as_deref() {
            None => {}
            Some("haserver") if raw.haservers.is_empty() => c.error(
                format!("pool[{i}].discovery"),
                "discovery = \"haserver\" needs at least one [[haserver]]",
            ),
            Some("haserver") => {}
            Some(other) => c.error(
                format!("pool[{i}].discovery"),
                format!("unknown discovery {other:?}: expected \"haserver\""),
            ),
        }
    }
}
