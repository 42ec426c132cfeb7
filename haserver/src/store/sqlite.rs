//! The SQLite store: one file, bundled, WAL, shared by HA servers on one machine. Writes take
//! SQLite's write lock first (IMMEDIATE), so they are serialized as PostgreSQL's are by a row
//! lock; the lease and the fence read SQLite's clock (the machine's), as PostgreSQL's use
//! `now()`.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::lease::{self, Lease};
use super::{
    clears_queue, props_of, props_text, pubrels_of, pubrels_text, pubrels_union, queued_of,
    session_of, session_text, QueuedRow, Registered, Store, StoreError, TOMBSTONE_KEEP_MS,
};
use crate::expiry::Cutoffs;
use crate::lock;
use crate::model::{ClusterView, Event, Member, MemberState, Registration};
use crate::queued::QueuedEntry;
use crate::retained::RetainedEntry;
use crate::sessions::SessionEntry;

pub const SCHEMA_VERSION: i64 = 5;

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

/// The lease epoch (fencing, issue 18), and the lease row present from the start so a
/// transaction always has a row to read and update.
const SCHEMA_V2: &str = "
ALTER TABLE lease ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
INSERT OR IGNORE INTO lease (name, holder, addr, expires_ms, epoch) VALUES ('primary', '', '', 0, 0);
";

/// Retained messages (issue 18): an empty payload is a tombstone (a clearing, kept for a while
/// so an older set arriving later is refused). The topic is compared as bytes (SQLite's BINARY
/// collation), the order pages follow.
const SCHEMA_V3: &str = "
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    props TEXT,
    at_ms INTEGER NOT NULL
);
-- The tombstones by time, for their purge at each write (a scan of the table would cost
-- every batch its whole size).
CREATE INDEX IF NOT EXISTS retained_tombstones ON retained (at_ms) WHERE length(payload) = 0;
";

/// Persistent sessions (issue 18) in the `sessions` table schema 1 made room for: `data` is
/// the session as JSON, NULL for an end (a tombstone), `updated_ms` its time.
const SCHEMA_V4: &str = "
CREATE INDEX IF NOT EXISTS sessions_tombstones ON sessions (updated_ms) WHERE data IS NULL;
";

/// Persistent sessions' queued messages (issue 18): one row per client ID and message id
/// (whoever of the session's holders wrote it), and per client the packet-id state.
const SCHEMA_V5: &str = "
CREATE TABLE IF NOT EXISTS queued (
    client_id TEXT NOT NULL,
    origin INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    pkid INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    props TEXT,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (client_id, origin, seq)
);
CREATE TABLE IF NOT EXISTS queued_state (
    client_id TEXT PRIMARY KEY,
    last_pkid INTEGER NOT NULL,
    pubrels TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
";

/// A row of `retained`: topic, payload, QoS, properties (JSON), time.
type RetainedRow = (String, Vec<u8>, u8, Option<String>, i64);

/// SQLite's clock, Unix ms: the lease is judged by the database's clock, as on PostgreSQL.
const NOW_MS: &str = "SELECT CAST(unixepoch('subsec') * 1000 AS INTEGER)";

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
            return Err(StoreError::TooNew(current, SCHEMA_VERSION));
        }
        if current < 1 {
            tx.execute_batch(SCHEMA_V1)?;
        }
        if current < 2 {
            tx.execute_batch(SCHEMA_V2)?;
        }
        if current < 3 {
            tx.execute_batch(SCHEMA_V3)?;
        }
        if current < 4 {
            tx.execute_batch(SCHEMA_V4)?;
        }
        if current < 5 {
            tx.execute_batch(SCHEMA_V5)?;
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

/// The lease row and SQLite's clock, read inside `tx`.
fn read_lease(tx: &rusqlite::Transaction<'_>) -> Result<(Lease, i64), rusqlite::Error> {
    let now: i64 = tx.query_row(NOW_MS, [], |r| r.get(0))?;
    let lease = tx
        .query_row(
            "SELECT holder, addr, epoch, expires_ms FROM lease WHERE name = 'primary'",
            [],
            |r| {
                Ok(Lease {
                    holder: r.get(0)?,
                    addr: r.get(1)?,
                    epoch: r.get::<_, i64>(2)? as u64,
                    expires_ms: r.get(3)?,
                })
            },
        )
        .optional()?
        .unwrap_or_else(Lease::vacant);
    Ok((lease, now))
}

fn write_lease(tx: &rusqlite::Transaction<'_>, l: &Lease) -> Result<(), rusqlite::Error> {
    tx.execute(
        "INSERT INTO lease (name, holder, addr, epoch, expires_ms) VALUES ('primary', ?1, ?2, ?3, ?4)
         ON CONFLICT(name) DO UPDATE SET holder = ?1, addr = ?2, epoch = ?3, expires_ms = ?4",
        params![l.holder, l.addr, l.epoch as i64, l.expires_ms],
    )?;
    Ok(())
}

/// Opens a write transaction for the primary holding `epoch`, or refuses (fencing).
fn write_tx(conn: &mut Connection, epoch: u64) -> Result<rusqlite::Transaction<'_>, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (lease, now) = read_lease(&tx)?;
    lease::fence(&lease, epoch, now)?;
    Ok(tx)
}

impl Store for SqliteStore {
    fn register(
        &self,
        epoch: u64,
        reg: &Registration,
        now_ms: i64,
        max_members: usize,
    ) -> Result<Registered, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = write_tx(&mut conn, epoch)?;
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

    fn heartbeat(&self, epoch: u64, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = write_tx(&mut conn, epoch)?;
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

    fn deregister(&self, epoch: u64, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = write_tx(&mut conn, epoch)?;
        if tx.execute("DELETE FROM members WHERE id = ?1", [id])? == 0 {
            return Ok(None);
        }
        let v = bump(&tx, id, "deregistered", now_ms)?;
        tx.commit()?;
        Ok(Some(v))
    }

    fn expire(&self, epoch: u64, now_ms: i64, cutoffs: Cutoffs) -> Result<Option<u64>, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = write_tx(&mut conn, epoch)?;
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

    fn write_retained(
        &self,
        epoch: u64,
        entries: &[RetainedEntry],
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = write_tx(&mut conn, epoch)?;
        let mut applied = 0;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO retained (topic, payload, qos, props, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(topic) DO UPDATE SET payload = ?2, qos = ?3, props = ?4, at_ms = ?5
                 WHERE ?5 >= retained.at_ms",
            )?;
            for e in entries {
                applied += upsert.execute(params![
                    e.topic,
                    e.payload,
                    e.qos,
                    props_text(&e.props),
                    e.at_ms
                ])? as u64;
            }
        }
        tx.execute(
            "DELETE FROM retained WHERE length(payload) = 0 AND at_ms < ?1",
            [now_ms - TOMBSTONE_KEEP_MS],
        )?;
        tx.commit()?;
        Ok(applied)
    }

    fn retained(&self, after: &str, limit: u32) -> Result<Vec<RetainedEntry>, StoreError> {
        let conn = lock(&self.conn);
        let rows: Vec<RetainedRow> = conn
            .prepare_cached(
                "SELECT topic, payload, qos, props, at_ms FROM retained
                 WHERE topic > ?1 AND length(payload) > 0 ORDER BY topic LIMIT ?2",
            )?
            .query_map(params![after, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        rows.into_iter()
            .map(|(topic, payload, qos, props, at_ms)| {
                Ok(RetainedEntry {
                    props: props_of(&topic, props.as_deref())?,
                    topic,
                    payload,
                    qos,
                    at_ms,
                })
            })
            .collect()
    }

    fn write_sessions(
        &self,
        epoch: u64,
        entries: &[SessionEntry],
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = write_tx(&mut conn, epoch)?;
        let mut applied = 0;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO sessions (client_id, data, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(client_id) DO UPDATE SET data = ?2, updated_ms = ?3
                 WHERE ?3 >= sessions.updated_ms",
            )?;
            let mut clear =
                tx.prepare_cached("DELETE FROM queued WHERE client_id = ?1 AND at_ms < ?2")?;
            let mut clear_state =
                tx.prepare_cached("DELETE FROM queued_state WHERE client_id = ?1 AND at_ms < ?2")?;
            for e in entries {
                let n = upsert.execute(params![e.client_id, session_text(&e.session), e.at_ms])?;
                if n > 0 && clears_queue(e) {
                    clear.execute(params![e.client_id, e.at_ms])?;
                    clear_state.execute(params![e.client_id, e.at_ms])?;
                }
                applied += n as u64;
            }
        }
        tx.execute(
            "DELETE FROM sessions WHERE data IS NULL AND updated_ms < ?1",
            [now_ms - TOMBSTONE_KEEP_MS],
        )?;
        tx.commit()?;
        Ok(applied)
    }

    fn sessions(&self, after: &str, limit: u32) -> Result<Vec<SessionEntry>, StoreError> {
        let conn = lock(&self.conn);
        let rows: Vec<(String, String, i64)> = conn
            .prepare_cached(
                "SELECT client_id, data, updated_ms FROM sessions
                 WHERE client_id > ?1 AND data IS NOT NULL ORDER BY client_id LIMIT ?2",
            )?
            .query_map(params![after, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?;
        rows.into_iter()
            .map(|(client_id, data, at_ms)| {
                Ok(SessionEntry {
                    session: Some(session_of(&client_id, &data)?),
                    client_id,
                    at_ms,
                    connected: false,
                })
            })
            .collect()
    }

    fn write_queued(
        &self,
        epoch: u64,
        entries: &[QueuedEntry],
        _now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = write_tx(&mut conn, epoch)?;
        let mut applied = 0;
        {
            let mut replace =
                tx.prepare_cached("DELETE FROM queued WHERE client_id = ?1 AND at_ms < ?2")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO queued (client_id, origin, seq, pkid, topic, payload, qos, retain, props, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT(client_id, origin, seq) DO UPDATE SET
                     pkid = CASE WHEN queued.pkid = 0 THEN ?4 ELSE queued.pkid END,
                     at_ms = max(queued.at_ms, ?10)",
            )?;
            let mut acked = tx.prepare_cached(
                "DELETE FROM queued WHERE client_id = ?1 AND origin = ?2 AND seq = ?3",
            )?;
            let mut state = tx.prepare_cached(
                "SELECT last_pkid, pubrels FROM queued_state WHERE client_id = ?1",
            )?;
            let mut put_state = tx.prepare_cached(
                "INSERT INTO queued_state (client_id, last_pkid, pubrels, at_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(client_id) DO UPDATE SET last_pkid = ?2, pubrels = ?3,
                     at_ms = max(queued_state.at_ms, ?4)",
            )?;
            for e in entries {
                if e.replace {
                    applied += replace.execute(params![e.client_id, e.at_ms])? as u64;
                }
                for m in &e.messages {
                    applied += insert.execute(params![
                        e.client_id,
                        m.origin as i64,
                        m.seq as i64,
                        m.pkid,
                        m.topic,
                        m.payload,
                        m.qos,
                        m.retain,
                        props_text(&m.props),
                        e.at_ms
                    ])? as u64;
                }
                for (origin, seq) in &e.acked {
                    applied +=
                        acked.execute(params![e.client_id, *origin as i64, *seq as i64])? as u64;
                }
                if e.last_pkid == 0 && e.pubrels.is_empty() && !e.replace {
                    continue;
                }
                let old: Option<(u16, String)> = state
                    .query_row([&e.client_id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let (last, pubrels) = match old {
                    Some((last, p)) if !e.replace => (
                        last.max(e.last_pkid),
                        pubrels_union(&pubrels_of(&p), &e.pubrels),
                    ),
                    _ => (e.last_pkid, e.pubrels.clone()),
                };
                put_state.execute(params![e.client_id, last, pubrels_text(&pubrels), e.at_ms])?;
            }
        }
        tx.commit()?;
        Ok(applied)
    }

    fn queued(&self, client_id: &str) -> Result<Option<QueuedEntry>, StoreError> {
        let conn = lock(&self.conn);
        let rows: Vec<QueuedRow> = conn
            .prepare_cached(
                "SELECT origin, seq, pkid, topic, payload, qos, retain, props FROM queued
                 WHERE client_id = ?1",
            )?
            .query_map([client_id], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        let state: Option<(i64, String)> = conn
            .prepare_cached("SELECT last_pkid, pubrels FROM queued_state WHERE client_id = ?1")?
            .query_row([client_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let at_ms: i64 = conn
            .prepare_cached(
                "SELECT max(coalesce((SELECT max(at_ms) FROM queued WHERE client_id = ?1), 0),
                            coalesce((SELECT at_ms FROM queued_state WHERE client_id = ?1), 0))",
            )?
            .query_row([client_id], |r| r.get(0))?;
        queued_of(client_id, rows, state, at_ms)
    }

    fn acquire_lease(&self, holder: &str, addr: &str, ttl_ms: i64) -> Result<Lease, StoreError> {
        let mut conn = lock(&self.conn);
        // IMMEDIATE takes the write lock first: two servers cannot both see the lease free.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (current, now) = read_lease(&tx)?;
        let lease = match lease::attempt(&current, holder, addr, now, ttl_ms) {
            Some(next) => {
                write_lease(&tx, &next)?;
                next
            }
            None => current,
        };
        tx.commit()?;
        Ok(lease)
    }

    fn release_lease(&self, holder: &str, addr: &str) -> Result<(), StoreError> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (current, now) = read_lease(&tx)?;
        if let Some(ended) = lease::release(&current, holder, addr, now) {
            write_lease(&tx, &ended)?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{self, Check};

    /// Runs a contract check on a fresh SQLite file of its own (reopened as often as the check
    /// asks), removed afterwards.
    fn run(name: &str, check: Check) -> Result<(), contract::Failure> {
        let dir = std::env::temp_dir().join(format!("mqlb-store-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("ha.sqlite");
        let open = || SqliteStore::open(&path).map(|s| Box::new(s) as Box<dyn Store>);
        let result = check(&open);
        std::fs::remove_dir_all(&dir)?;
        result
    }

    macro_rules! contract_tests {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                fn $name() -> Result<(), contract::Failure> {
                    run(stringify!($name), contract::$name)
                }
            )*
            /// Every check of the contract runs here: one listed in `CHECKS` but not above
            /// would run on PostgreSQL only.
            #[test]
            fn every_contract_check_runs_on_sqlite() {
                let here = [$(stringify!($name)),*];
                let all: Vec<&str> = contract::CHECKS.iter().map(|(n, _)| *n).collect();
                assert_eq!(here.as_slice(), all.as_slice());
            }
        };
    }

    contract_tests!(
        membership_lifecycle,
        lease_one_holder_until_it_expires,
        lease_same_id_elsewhere_does_not_share,
        lease_race_has_one_winner,
        stale_epochs_are_fenced,
        a_live_member_cannot_be_re_pointed,
        max_members,
        state_survives_reopening,
        retained_messages,
        persistent_sessions,
        queued_messages,
    );

    /// A file written by the schema before fencing (version 1) opens, migrated: its lease row
    /// gains an epoch and the next holder fences writes as on a new file.
    #[test]
    fn a_version_1_file_is_migrated() -> Result<(), contract::Failure> {
        let dir = std::env::temp_dir().join(format!("mqlb-store-{}-v1", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("ha.sqlite");
        {
            let conn = Connection::open(&path)?;
            conn.execute_batch(SCHEMA_V1)?;
            conn.execute_batch(
                "INSERT INTO lease (name, holder, addr, expires_ms) VALUES ('primary', 'old', 'x', 0);
                 PRAGMA user_version = 1;",
            )?;
        }
        let s = SqliteStore::open(&path)?;
        let l = s.acquire_lease("ha1", "a1", 60_000)?;
        assert_eq!((l.holder.as_str(), l.epoch), ("ha1", 1));
        assert!(s.register(l.epoch, &contract_reg(), 1, 10).is_ok());
        drop(s);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    fn contract_reg() -> Registration {
        Registration {
            id: "b1".into(),
            mqtt: "127.0.0.1:1883".into(),
            mqtt_v5: None,
            mesh: None,
            http: None,
            pid: None,
        }
    }
}
