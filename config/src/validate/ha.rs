//! `[ha]` and `[[haserver]]`: the HA servers and the membership timing they enforce.

use std::collections::HashSet;

use super::{Checker, UNPARSED_ADDR};
use crate::defaults::*;
use crate::model::{HaDb, HaServer, HaSettings, PostgresUrl};
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
        let db = db(c, &format!("{k}.db"), h.db.as_deref());
        let db_source = db_source(c, &format!("{k}.db_source"), h.db_source.as_deref(), &db);
        let db_ca = db_ca(c, &format!("{k}.db_ca"), h.db_ca.as_deref(), &db);
        servers.push(HaServer {
            id: h.id.clone(),
            listen: listen.unwrap_or(UNPARSED_ADDR),
            db,
            db_source,
            db_ca,
        });
    }
    servers
}

/// `haserver.db`: a `postgres://` URL, or else a SQLite file's path.
fn db(c: &mut Checker, key: &str, raw: Option<&str>) -> HaDb {
    let raw = raw.unwrap_or(DEFAULT_HA_DB);
    if !raw.contains("://") {
        return HaDb::Sqlite(std::path::PathBuf::from(raw));
    }
    match PostgresUrl::parse(raw) {
        Ok(url) => HaDb::Postgres(url),
        Err(e) => {
            c.error(key, e);
            HaDb::Sqlite(std::path::PathBuf::from(DEFAULT_HA_DB))
        }
    }
}

/// `haserver.db_source`: an IP address, for a PostgreSQL `db` only.
fn db_source(c: &mut Checker, key: &str, raw: Option<&str>, db: &HaDb) -> Option<std::net::IpAddr> {
    let raw = raw?;
    if matches!(db, HaDb::Sqlite(_)) {
        c.error(key, "only for a PostgreSQL db (postgres://...)");
        return None;
    }
    c.ip(key, raw)
}

/// `haserver.db_ca`: a PEM file of CA certificates, for a PostgreSQL `db` only, read here so
/// a bad file is refused at load rather than at the first connect.
fn db_ca(c: &mut Checker, key: &str, raw: Option<&str>, db: &HaDb) -> Option<std::path::PathBuf> {
    let raw = raw?;
    if matches!(db, HaDb::Sqlite(_)) {
        c.error(key, "only for a PostgreSQL db (postgres://...)");
        return None;
    }
    let path = std::path::PathBuf::from(raw);
    if let Err(e) = crate::tls::client(&path, None, &[]) {
        c.error(key, e.to_string());
        return None;
    }
    Some(path)
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

#[cfg(test)]
mod tests {
    use crate::model::{HaDb, PostgresUrl};
    use crate::Config;

    #[test]
    fn db_ca_is_for_postgres_and_must_load() {
        for (keys, want) in [
            (
                "db = \"x.sqlite\"\ndb_ca = \"ca.pem\"\n",
                "haserver[0].db_ca: only for",
            ),
            (
                "db = \"postgres://h/ha\"\ndb_ca = \"/nonexistent/ca.pem\"\n",
                "haserver[0].db_ca: cannot read",
            ),
        ] {
            let e = ha(keys).expect_err(keys);
            assert!(e.contains(want), "{keys}: {e}");
        }
    }

    fn ha(keys: &str) -> Result<Config, String> {
        Config::parse(
            &format!(
                "[cluster]\nsecret = \"0123456789abcdef\"\n[[haserver]]\nid = \"ha1\"\n\
                 listen = \"127.0.0.1:7000\"\n{keys}"
            ),
            "t",
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn db_is_a_sqlite_path_or_a_postgres_url_with_an_optional_source() {
        let c = ha("db = \"postgres://mqlb@127.0.4.1:5432/ha\"\ndb_source = \"127.0.1.1\"\n");
        let server = c.map(|c| (c.ha.servers[0].db.clone(), c.ha.servers[0].db_source));
        assert!(
            matches!(&server, Ok((HaDb::Postgres(u), Some(ip)))
                if u.expose() == "postgres://mqlb@127.0.4.1:5432/ha" && ip.to_string() == "127.0.1.1"),
            "{server:?}"
        );
        let c = ha("db = \"state/ha.sqlite\"\n").map(|c| c.ha.servers[0].db.clone());
        assert!(
            matches!(&c, Ok(HaDb::Sqlite(p)) if p.ends_with("ha.sqlite")),
            "{c:?}"
        );
        for (keys, problem) in [
            ("db = \"postgres:///ha\"\n", "haserver[0].db: no host"),
            (
                "db = \"x.sqlite\"\ndb_source = \"127.0.1.1\"\n",
                "haserver[0].db_source: only for",
            ),
            (
                "db = \"postgres://h/ha\"\ndb_source = \"h2\"\n",
                "haserver[0].db_source: \"h2\" is not",
            ),
        ] {
            let e = ha(keys).err().unwrap_or_default();
            assert!(e.contains(problem), "{keys}: {e}");
        }
    }

    #[test]
    fn postgres_urls_are_checked_and_print_masked() {
        for ok in [
            "postgres://mqlb@127.0.4.1:5432/ha",
            "postgresql://db.example/ha",
            "postgres://u:p%40ss@[::1]:6543/ha?connect_timeout=2",
        ] {
            assert!(PostgresUrl::parse(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("mysql://x/y", "starts with"),
            ("postgres:///ha", "no host"),
            ("postgres://u@h:99999/ha", "port"),
            ("postgres://h1,h2/ha", "several hosts"),
        ] {
            let e = PostgresUrl::parse(bad).err().unwrap_or_default();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let url =
            PostgresUrl::parse("postgres://mqlb:hunter2@h:5432/ha").map_err(|e| e.to_string());
        let shown = url.map(|u| (u.to_string(), format!("{u:?}")));
        assert_eq!(
            shown,
            Ok((
                "postgres://mqlb:****@h:5432/ha".to_string(),
                "PostgresUrl(postgres://mqlb:****@h:5432/ha)".to_string()
            ))
        );
    }
}
