//! Where the HA server keeps its state. A small trait so a server database can follow; SQLite
//! (one file, bundled, WAL) is the default. Every change bumps the membership version and is
//! logged, in one transaction, so a crash never leaves a half-applied change.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::expiry::Cutoffs;
use crate::lock;
use crate::model::{ClusterView, Event, Member, MemberState, Registration};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite's own message already says "database" where it matters ("database or disk is
    /// full", "database is locked"); the prefix names the engine instead of repeating it.
    #[error("SQLite: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("database schema version {0} is newer than this mqlb understands ({SCHEMA_VERSION})")]
    TooNew(i64),
    /// The blocking task that ran a database call panicked or was cancelled.
    #[error("database call did not finish: {0}")]
    Task(String),
}

/// Who holds the primary lease after an attempt to take or renew it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub addr: String,
    pub expires_ms: i64,
}

/// What a registration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// Recorded; the new version.
    Done(u64),
    /// Refused: the id is held by an up member at another address (this one); a live member
    /// cannot be re-pointed until it deregisters or expires (issue 13's traffic hijack).
    AddressHeld(Registration),
    /// Refused: a new id, and the membership already has this many members.
    Full(usize),
}

pub trait Store: Send + Sync {
    /// Registers (or re-registers) a member as up, unless it would re-point a live member or
    /// add one beyond `max_members`.
    fn register(
        &self,
        reg: &Registration,
        now_ms: i64,
        max_members: usize,
    ) -> Result<Registered, StoreError>;
    /// Records a heartbeat. `None`: unknown member (it must register). A down member comes up.
    fn heartbeat(&self, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError>;
    /// Removes a member that left on purpose; `None` if unknown.
    fn deregister(&self, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError>;
    /// Marks up members last seen before `cutoffs.down_before_ms` down and removes down ones
    /// last seen before `cutoffs.remove_before_ms`; returns the version if anything changed.
    fn expire(&self, now_ms: i64, cutoffs: Cutoffs) -> Result<Option<u64>, StoreError>;
    fn cluster(&self) -> Result<ClusterView, StoreError>;
    fn version(&self) -> Result<u64, StoreError>;
    fn events(&self, after: i64, limit: u32) -> Result<Vec<Event>, StoreError>;
    /// Takes the primary lease if it is free, expired or already ours (same holder *and*
    /// address: a second server started with the same id does not renew the first one's
    /// lease); renews it if ours. Returns the lease as it stands after the attempt.
    fn acquire_lease(
        &self,
        holder: &str,
        addr: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Lease, StoreError>;
    /// Gives the lease up (clean shutdown of the primary), so a backup takes over at once.
    fn release_lease(&self, holder: &str, addr: &str) -> Result<(), StoreError>;
}

pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    id TEXT PRIMARY KEY,
    mqtt TEXT NOT NULL,
    mqtt_v5 TEXT,
    mesh TEXT,
    http TEXT,
    pid INTEGER,
    state TEXT NOT NULL,
    registered_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    member TEXT NOT NULL,
    kind TEXT NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS lease (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    addr TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
);
-- Room for per-client session state (persistent sessions), not used yet.
CREATE TABLE IF NOT EXISTS sessions (
    client_id TEXT PRIMARY KEY,
    node TEXT,
    data BLOB,
    updated_ms INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('version', 0);
";

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating and migrating as needed) the database file.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory database, for tests.
    pub fn in_memory() -> Result<SqliteStore, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<SqliteStore, StoreError> {
        // WAL lets backups read while the primary writes; the busy timeout makes HA servers
        // sharing the file wait for each other instead of failing.
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if current > SCHEMA_VERSION {
            return Err(StoreError::TooNew(current));
        }
        if current < 1 {
            tx.execute_batch(SCHEMA_V1)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }
}

fn bump(
    tx: &rusqlite::Transaction<'_>,
    member: &str,
    kind: &str,
    now_ms: i64,
) -> Result<u64, rusqlite::Error> {
    tx.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'version'",
        [],
    )?;
    let v: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
        r.get(0)
    })?;
    tx.execute(
        "INSERT INTO events (at_ms, member, kind, version) VALUES (?1, ?2, ?3, ?4)",
        params![now_ms, member, kind, v],
    )?;
    Ok(v as u64)
}

impl Store for SqliteStore {
    fn register(
        &self,
        reg: &Registration,
        now_ms: i64,
        max_members: usize,
    ) -> Result<Registered, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let known: Option<(String, Registration)> = tx
            .query_row(
                "SELECT state, mqtt, mqtt_v5, mesh, http, pid FROM members WHERE id = ?1",
                [&reg.id],
                |r| {
                    Ok((
                        r.get(0)?,
                        Registration {
                            id: reg.id.clone(),
                            mqtt: r.get(1)?,
                            mqtt_v5: r.get(2)?,
                            mesh: r.get(3)?,
                            http: r.get(4)?,
                            pid: r.get(5)?,
                        },
                    ))
                },
            )
            .optional()?;
        match &known {
            Some((state, current)) if state == "up" && !current.same_addresses(reg) => {
                return Ok(Registered::AddressHeld(current.clone()));
            }
            Some(_) => {}
            None => {
                let n: i64 = tx.query_row("SELECT COUNT(*) FROM members", [], |r| r.get(0))?;
                if n as usize >= max_members {
                    return Ok(Registered::Full(n as usize));
                }
            }
        }
        tx.execute(
            "INSERT INTO members (id, mqtt, mqtt_v5, mesh, http, pid, state, registered_ms, last_seen_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'up', ?7, ?7)
             ON CONFLICT(id) DO UPDATE SET mqtt = ?2, mqtt_v5 = ?3, mesh = ?4, http = ?5, pid = ?6,
                 state = 'up', registered_ms = ?7, last_seen_ms = ?7",
            params![reg.id, reg.mqtt, reg.mqtt_v5, reg.mesh, reg.http, reg.pid, now_ms],
        )?;
        let kind = if known.is_some() {
            "re-registered"
        } else {
            "registered"
        };
        let v = bump(&tx, &reg.id, kind, now_ms)?;
        tx.commit()?;
        Ok(Registered::Done(v))
    }

    fn heartbeat(&self, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let state: Option<String> = tx
            .query_row("SELECT state FROM members WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(state) = state else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE members SET last_seen_ms = ?2, state = 'up' WHERE id = ?1",
            params![id, now_ms],
        )?;
        let v = if state != "up" {
            bump(&tx, id, "up", now_ms)?
        } else {
            tx.query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
                r.get::<_, i64>(0)
            })? as u64
        };
        tx.commit()?;
        Ok(Some(v))
    }

    fn deregister(&self, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if tx.execute("DELETE FROM members WHERE id = ?1", [id])? == 0 {
            return Ok(None);
        }
        let v = bump(&tx, id, "deregistered", now_ms)?;
        tx.commit()?;
        Ok(Some(v))
    }

    fn expire(&self, now_ms: i64, cutoffs: Cutoffs) -> Result<Option<u64>, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut changed = None;
        // Up and silent too long → down; down and silent even longer → removed.
        let steps = [
            (
                "up",
                cutoffs.down_before_ms,
                "UPDATE members SET state = 'down' WHERE id = ?1",
                "down",
            ),
            (
                "down",
                cutoffs.remove_before_ms,
                "DELETE FROM members WHERE id = ?1",
                "removed",
            ),
        ];
        for (state, silent_since, change, kind) in steps {
            let Some(silent_since) = silent_since else {
                continue;
            };
            let ids: Vec<String> = tx
                .prepare("SELECT id FROM members WHERE state = ?1 AND last_seen_ms < ?2")?
                .query_map(params![state, silent_since], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for id in &ids {
                tx.execute(change, [id])?;
                changed = Some(bump(&tx, id, kind, now_ms)?);
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    fn cluster(&self) -> Result<ClusterView, StoreError> {
        let mut conn = lock(&self.conn);
        // One read transaction: the version and the members belong together.
        let tx = conn.transaction()?;
        let version: i64 =
            tx.query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
                r.get(0)
            })?;
        let members = tx
            .prepare(
                "SELECT id, mqtt, mqtt_v5, mesh, http, pid, state, registered_ms, last_seen_ms
                 FROM members ORDER BY id",
            )?
            .query_map([], |r| {
                Ok(Member {
                    reg: Registration {
                        id: r.get(0)?,
                        mqtt: r.get(1)?,
                        mqtt_v5: r.get(2)?,
                        mesh: r.get(3)?,
                        http: r.get(4)?,
                        pid: r.get(5)?,
                    },
                    state: MemberState::parse(&r.get::<_, String>(6)?),
                    registered_ms: r.get(7)?,
                    last_seen_ms: r.get(8)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        tx.commit()?;
        Ok(ClusterView {
            version: version as u64,
            primary: None,
            members,
        })
    }

    fn version(&self) -> Result<u64, StoreError> {
        let conn = lock(&self.conn);
        let v: i64 = conn.query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
            r.get(0)
        })?;
        Ok(v as u64)
    }

    fn events(&self, after: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
        let conn = lock(&self.conn);
        let rows = conn
            .prepare("SELECT seq, at_ms, member, kind, version FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")?
            .query_map(params![after, limit], |r| {
                Ok(Event {
                    seq: r.get(0)?,
                    at_ms: r.get(1)?,
                    member: r.get(2)?,
                    kind: r.get(3)?,
                    version: r.get::<_, i64>(4)? as u64,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn acquire_lease(
        &self,
        holder: &str,
        addr: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Lease, StoreError> {
        let mut conn = lock(&self.conn);
        // IMMEDIATE takes the write lock first: two servers cannot both see the lease free.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: Option<Lease> = tx
            .query_row(
                "SELECT holder, addr, expires_ms FROM lease WHERE name = 'primary'",
                [],
                |r| {
                    Ok(Lease {
                        holder: r.get(0)?,
                        addr: r.get(1)?,
                        expires_ms: r.get(2)?,
                    })
                },
            )
            .optional()?;
        let lease = match current {
            Some(l) if (l.holder != holder || l.addr != addr) && l.expires_ms > now_ms => l,
            _ => {
                let l = Lease {
                    holder: holder.to_string(),
                    addr: addr.to_string(),
                    expires_ms: now_ms + ttl_ms,
                };
                tx.execute(
                    "INSERT INTO lease (name, holder, addr, expires_ms) VALUES ('primary', ?1, ?2, ?3)
                     ON CONFLICT(name) DO UPDATE SET holder = ?1, addr = ?2, expires_ms = ?3",
                    params![l.holder, l.addr, l.expires_ms],
                )?;
                l
            }
        };
        tx.commit()?;
        Ok(lease)
    }

    fn release_lease(&self, holder: &str, addr: &str) -> Result<(), StoreError> {
        let conn = lock(&self.conn);
        conn.execute(
            "DELETE FROM lease WHERE name = 'primary' AND holder = ?1 AND addr = ?2",
            [holder, addr],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: &str) -> Registration {
        Registration {
            id: id.into(),
            mqtt: "127.0.0.1:1883".into(),
            mqtt_v5: None,
            mesh: None,
            http: None,
            pid: None,
        }
    }

    /// The cutoffs of a round at `now_ms` with every grace over.
    fn after(now_ms: i64, down_after_ms: i64, remove_after_ms: i64) -> Cutoffs {
        Cutoffs {
            down_before_ms: Some(now_ms - down_after_ms),
            remove_before_ms: Some(now_ms - remove_after_ms),
        }
    }

    #[test]
    fn membership_lifecycle_bumps_the_version_and_logs_events() -> Result<(), StoreError> {
        let s = SqliteStore::in_memory()?;
        assert_eq!(s.register(&reg("b1"), 1_000, 10)?, Registered::Done(1));
        assert_eq!(s.register(&reg("b2"), 1_000, 10)?, Registered::Done(2));
        assert_eq!(
            s.heartbeat("b1", 2_000)?,
            Some(2),
            "a heartbeat of an up member changes nothing"
        );
        assert_eq!(s.heartbeat("nope", 2_000)?, None);
        assert_eq!(
            s.expire(99_000, Cutoffs::default())?,
            None,
            "during the grace nobody expires, however long the silence"
        );
        // b2 silent for 3 s: down; b1 heard at 2 s: still up.
        assert_eq!(s.expire(4_500, after(4_500, 3_000, 10_000))?, Some(3));
        let view = s.cluster()?;
        let states: Vec<_> = view
            .members
            .iter()
            .map(|m| (m.reg.id.as_str(), m.state))
            .collect();
        assert_eq!(
            states,
            vec![("b1", MemberState::Up), ("b2", MemberState::Down)]
        );
        assert_eq!(
            s.expire(4_600, after(4_600, 3_000, 10_000))?,
            None,
            "nothing new"
        );
        assert_eq!(s.heartbeat("b2", 5_000)?, Some(4), "back up");
        assert_eq!(
            s.expire(20_000, after(20_000, 3_000, 10_000))?,
            Some(8),
            "both down (5, 6), then removed (7, 8)"
        );
        assert!(s.cluster()?.members.is_empty());
        let kinds: Vec<String> = s
            .events(0, 100)?
            .into_iter()
            .map(|e| format!("{}:{}", e.member, e.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                "b1:registered",
                "b2:registered",
                "b2:down",
                "b2:up",
                "b1:down",
                "b2:down",
                "b1:removed",
                "b2:removed"
            ]
        );
        Ok(())
    }

    #[test]
    fn the_lease_has_one_holder_until_it_expires() -> Result<(), StoreError> {
        let s = SqliteStore::in_memory()?;
        assert_eq!(s.acquire_lease("ha1", "a1", 0, 3_000)?.holder, "ha1");
        assert_eq!(
            s.acquire_lease("ha2", "a2", 2_999, 3_000)?.holder,
            "ha1",
            "not yet expired"
        );
        assert_eq!(
            s.acquire_lease("ha1", "a1", 2_000, 3_000)?.expires_ms,
            5_000,
            "renewed"
        );
        assert_eq!(
            s.acquire_lease("ha2", "a2", 5_001, 3_000)?.holder,
            "ha2",
            "expired: taken over"
        );
        s.release_lease("ha1", "a1")?; // not the holder: no effect
        assert_eq!(s.acquire_lease("ha1", "a1", 5_002, 3_000)?.holder, "ha2");
        s.release_lease("ha2", "elsewhere")?; // the holder's id at another address: neither
        assert_eq!(s.acquire_lease("ha1", "a1", 5_002, 3_000)?.holder, "ha2");
        s.release_lease("ha2", "a2")?;
        assert_eq!(
            s.acquire_lease("ha1", "a1", 5_003, 3_000)?.holder,
            "ha1",
            "released: free"
        );
        Ok(())
    }

    /// Issue 13: a second server started by mistake with the id of the primary must not renew
    /// (and so share) the primary's lease.
    #[test]
    fn the_same_id_at_another_address_does_not_share_the_lease() -> Result<(), StoreError> {
        let s = SqliteStore::in_memory()?;
        assert_eq!(s.acquire_lease("ha1", "a1", 0, 3_000)?.addr, "a1");
        let l = s.acquire_lease("ha1", "a9", 1_000, 3_000)?;
        assert_eq!(
            (l.addr.as_str(), l.expires_ms),
            ("a1", 3_000),
            "not taken, not renewed"
        );
        assert_eq!(
            s.acquire_lease("ha1", "a1", 2_000, 3_000)?.expires_ms,
            5_000
        );
        assert_eq!(
            s.acquire_lease("ha1", "a9", 5_001, 3_000)?.addr,
            "a9",
            "expired: free for anyone"
        );
        Ok(())
    }

    /// Issue 13: a registration re-pointing a live member is refused; once it is down or gone
    /// (expired, deregistered), or at the same addresses (a restart), it is accepted.
    #[test]
    fn a_live_member_cannot_be_re_pointed() -> Result<(), StoreError> {
        let s = SqliteStore::in_memory()?;
        let at = |id: &str, mqtt: &str| Registration {
            mqtt: mqtt.into(),
            ..reg(id)
        };
        assert_eq!(s.register(&reg("b1"), 1_000, 10)?, Registered::Done(1));
        let trap = at("b1", "127.0.0.1:30950");
        assert_eq!(
            s.register(&trap, 1_100, 10)?,
            Registered::AddressHeld(reg("b1"))
        );
        let moved_mesh = Registration {
            mesh: Some("127.0.0.1:30951".into()),
            ..reg("b1")
        };
        assert!(matches!(
            s.register(&moved_mesh, 1_100, 10)?,
            Registered::AddressHeld(_)
        ));
        let restarted = Registration {
            pid: Some(42),
            ..reg("b1")
        };
        assert_eq!(s.register(&restarted, 1_200, 10)?, Registered::Done(2));
        assert_eq!(s.cluster()?.members[0].reg.mqtt, "127.0.0.1:1883");
        // Down (expired): the id may move.
        assert!(s.expire(9_000, after(9_000, 3_000, 60_000))?.is_some());
        assert_eq!(s.register(&trap, 9_100, 10)?, Registered::Done(4));
        // Deregistered: the id may move.
        assert!(s.deregister("b1", 9_200)?.is_some());
        assert_eq!(s.register(&reg("b1"), 9_300, 10)?, Registered::Done(6));
        Ok(())
    }

    #[test]
    fn registrations_beyond_max_members_are_refused_re_registrations_are_not(
    ) -> Result<(), StoreError> {
        let s = SqliteStore::in_memory()?;
        for i in 0..3 {
            assert!(matches!(
                s.register(&reg(&format!("b{i}")), 1_000, 3)?,
                Registered::Done(_)
            ));
        }
        assert_eq!(s.register(&reg("b3"), 1_000, 3)?, Registered::Full(3));
        assert!(matches!(
            s.register(&reg("b0"), 1_100, 3)?,
            Registered::Done(_)
        ));
        assert_eq!(s.cluster()?.members.len(), 3);
        Ok(())
    }

    #[test]
    fn state_survives_reopening_the_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("mqlb-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("ha.sqlite");
        {
            let s = SqliteStore::open(&path)?;
            s.register(&reg("b1"), 1, 10)?;
        }
        let s = SqliteStore::open(&path)?;
        assert_eq!(s.version()?, 1);
        assert_eq!(s.cluster()?.members.len(), 1);
        drop(s);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
