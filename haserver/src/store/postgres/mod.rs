//! The PostgreSQL store (issue 18): HA servers on several machines share one PostgreSQL
//! database, an engine their users already run, rather than a consensus of mqlb's own. Same
//! tables and semantics as SQLite; the lease is one row read `FOR UPDATE` and judged by the
//! database's `now()`, writes read it `FOR SHARE` to check their epoch (fencing) and then lock
//! the version row, so they are serialized as SQLite's are. Versions are NOTIFYed at commit
//! (`listen`). Migrations are versioned SQL applied at open in one transaction, under an
//! advisory lock so servers starting together do not race.
//!
//! The client is tokio-postgres: the trait is blocking (the server calls it off its async
//! threads), so each call is `block_on` on the runtime the store was opened in, bounded by a
//! timeout; its connections are sockets of ours (`pool`).

mod listen;
mod pool;
mod tls;

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{IsolationLevel, Row, Transaction};

use super::lease::{self, Lease};
use super::{
    clears_queue, props_of, props_text, pubrels_of, pubrels_text, pubrels_union, queued_of,
    session_of, session_text, QueuedRow, Registered, Store, StoreError, TOMBSTONE_KEEP_MS,
};
use crate::expiry::Cutoffs;
use crate::model::{ClusterView, Event, Member, MemberState, Registration};
use crate::queued::QueuedEntry;
use crate::retained::RetainedEntry;
use crate::sessions::SessionEntry;
pub use listen::CHANNEL;
use pool::{Pool, Target};

/// The schema, by version; a database at version N gets N+1.. applied at open.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "
CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE members (
    id TEXT PRIMARY KEY,
    mqtt TEXT NOT NULL,
    mqtt_v5 TEXT,
    mesh TEXT,
    http TEXT,
    pid BIGINT,
    state TEXT NOT NULL,
    registered_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL
);
CREATE TABLE events (
    seq BIGSERIAL PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    member TEXT NOT NULL,
    kind TEXT NOT NULL,
    version BIGINT NOT NULL
);
CREATE TABLE lease (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    addr TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('version', 0);
INSERT INTO lease (name, holder, addr, epoch, expires_ms) VALUES ('primary', '', '', 0, 0);
",
    ),
    // Retained messages (issue 18), as in SQLite: an empty payload is a tombstone. The topic
    // is ordered and compared as bytes (collation "C"), as SQLite does, whatever the
    // database's collation.
    (
        2,
        "
CREATE TABLE retained (
    topic TEXT COLLATE \"C\" PRIMARY KEY,
    payload BYTEA NOT NULL,
    qos SMALLINT NOT NULL,
    props TEXT,
    at_ms BIGINT NOT NULL
);
CREATE INDEX retained_tombstones ON retained (at_ms) WHERE octet_length(payload) = 0;
",
    ),
    // Persistent sessions (issue 18): `data` the session as JSON, NULL for an end.
    (
        3,
        "
CREATE TABLE sessions (
    client_id TEXT COLLATE \"C\" PRIMARY KEY,
    data TEXT,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX sessions_tombstones ON sessions (updated_ms) WHERE data IS NULL;
",
    ),
    // Persistent sessions' queued messages (issue 18), as in SQLite: one row per client ID
    // and message id (u64s kept as their bits), and per client the packet-id state.
    (
        4,
        "
CREATE TABLE queued (
    client_id TEXT COLLATE \"C\" NOT NULL,
    origin BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    pkid INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BYTEA NOT NULL,
    qos SMALLINT NOT NULL,
    retain BOOLEAN NOT NULL,
    props TEXT,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (client_id, origin, seq)
);
CREATE TABLE queued_state (
    client_id TEXT COLLATE \"C\" PRIMARY KEY,
    last_pkid INTEGER NOT NULL,
    pubrels TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
",
    ),
];

/// The advisory lock migrations run under (any constant of mqlb's own).
const MIGRATION_LOCK: i64 = 0x6d71_6c62_0018;
/// The database's clock, Unix ms (`now()`: the transaction's start, which only makes a lease
/// look younger to whoever reads it and end sooner for whoever writes it).
const NOW_MS: &str = "(extract(epoch from now()) * 1000)::bigint";

/// How the HA server uses its PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Connect from this address (the HA server's own, on a machine with several), so the
    /// database and the network see which machine it is.
    pub source: Option<IpAddr>,
    /// Connections at most (the LISTEN connection aside).
    pub pool_size: usize,
    /// Every call (and connect) gives up after this: a partition or a stalled server costs
    /// one timeout, not a hung lease round. Keep it below the lease's renewal period.
    pub timeout: Duration,
    /// TLS to the database, trusting this configuration's CA (`haserver.db_ca`): required
    /// when set. `None`: none, and a URL with `sslmode=require` is refused.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl PostgresOptions {
    /// The options for a lease of `lease`: calls bounded by a third of it (the renewal period).
    pub fn for_lease(lease: Duration) -> PostgresOptions {
        PostgresOptions {
            source: None,
            pool_size: 4,
            timeout: (lease / 3).max(Duration::from_millis(100)),
            tls: None,
        }
    }
}

/// Either side of a call failing; mapped to a [`StoreError`] naming the server once.
enum Fail {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Fail {
        Fail::Pg(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        Fail::Store(e)
    }
}

/// The PostgreSQL store. Its calls block on the runtime it was opened in: make them off the
/// async threads (`spawn_blocking`, as the server does); on one they would panic.
pub struct PostgresStore {
    pool: Pool,
    rt: Handle,
    timeout: Duration,
    changes: watch::Receiver<u64>,
    listener: tokio::task::AbortHandle,
    /// The schema is migrated: a store opened while the database could not be reached
    /// migrates at its first call that reaches it.
    migrated: AtomicBool,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn target(url: &str, options: &PostgresOptions) -> Result<Target, StoreError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Url(pool::describe(&e)))?;
    let host = match config.get_hosts() {
        [Host::Tcp(h)] => h.clone(),
        [] => return Err(StoreError::Url("no host".into())),
        [_] => {
            return Err(StoreError::Url(
                "a Unix socket: the HA server connects over TCP".into(),
            ))
        }
        _ => return Err(StoreError::Url("several hosts: name one".into())),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    // TLS when there is a CA to verify the server with, and only then (tokio-postgres would
    // otherwise try it on `prefer`, its default, with nothing to verify against).
    match (&options.tls, config.get_ssl_mode()) {
        (Some(_), _) => config.ssl_mode(SslMode::Require),
        (None, SslMode::Require) => {
            return Err(StoreError::Url(
                "sslmode=require needs haserver.db_ca, the CA that signed the server's certificate"
                    .into(),
            ))
        }
        (None, _) => config.ssl_mode(SslMode::Disable),
    };
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| StoreError::Url(format!("host {host:?}: {e}")))?;
    if config.get_application_name().is_none() {
        config.application_name("mqlb-haserver");
    }
    // The server bounds what a stalled or cut-off HA server can hold: a transaction left open by
    // one partitioned mid-way would otherwise keep the lease row locked (and no backup could
    // take over) until the server's TCP keepalive found it, hours later.
    let ms = options.timeout.as_millis().max(1);
    let bounds = format!(
        "-c idle_in_transaction_session_timeout={ms} -c statement_timeout={ms} -c lock_timeout={ms}"
    );
    let joined = match config.get_options() {
        Some(given) => format!("{given} {bounds}"),
        None => bounds,
    };
    config.options(joined);
    Ok(Target {
        config,
        at: format!("{host}:{port}"),
        host,
        port,
        source: options.source,
        timeout: options.timeout,
        tls: tls::Connector {
            config: options.tls.clone(),
            name,
        },
    })
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/db`), migrates the schema and
    /// starts listening for changes. Must be called inside a tokio runtime, which the store's
    /// calls then use.
    pub async fn open(url: &str, options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        let target = Arc::new(target(url, &options)?);
        let pool = Pool::new(target.clone(), options.pool_size);
        let at = target.at.clone();
        // The first connect and the migration get a few timeouts: a database just started.
        let budget = options.timeout * 5;
        let version = bounded(&at, budget, async {
            let mut c = pool.get().await?;
            migrate(&mut c).await?;
            let v = read_version(&c).await?;
            c.release();
            Ok(v)
        })
        .await
        .map_err(|f| fail(&target, f));
        // A database that does not answer yet (it starts after the HA servers, or is down) is
        // no reason not to start: the server serves degraded and every call tries again, with
        // the pool's back-off; one that answers wrongly (a newer schema) is.
        let (version, migrated) = match version {
            Ok(v) => (v, true),
            Err(e @ (StoreError::Postgres { .. } | StoreError::Timeout { .. })) => {
                tracing::warn!(error = %e, "PostgreSQL not reached at start; starting degraded, trying again");
                (0, false)
            }
            Err(e) => return Err(e),
        };
        let (tx, rx) = watch::channel(version);
        let listener = tokio::spawn(listen::run(target, tx)).abort_handle();
        Ok(PostgresStore {
            pool,
            rt: Handle::current(),
            timeout: options.timeout,
            changes: rx,
            listener,
            migrated: AtomicBool::new(migrated),
        })
    }

    /// The schema migrated, once the database answers (see `open`).
    async fn ready(&self) -> Result<(), Fail> {
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut c = self.pool.get().await?;
        migrate(&mut c).await?;
        c.release();
        if !self.migrated.swap(true, Ordering::AcqRel) {
            tracing::info!(
                at = self.pool.target.at,
                "PostgreSQL reached: schema migrated"
            );
        }
        Ok(())
    }

    /// Runs one call to completion on the store's runtime, within the timeout.
    fn call<T>(&self, fut: impl Future<Output = Result<T, Fail>>) -> Result<T, StoreError> {
        let ready_then = async {
            self.ready().await?;
            fut.await
        };
        self.rt
            .block_on(bounded(&self.pool.target.at, self.timeout, ready_then))
            .map_err(|f| fail(&self.pool.target, f))
    }
}

async fn bounded<T>(
    at: &str,
    after: Duration,
    fut: impl Future<Output = Result<T, Fail>>,
) -> Result<T, Fail> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r,
        Err(_) => Err(Fail::Store(StoreError::Timeout {
            at: at.to_string(),
            after,
        })),
    }
}

fn fail(target: &Target, f: Fail) -> StoreError {
    match f {
        Fail::Pg(e) => target.error(&e),
        Fail::Store(e) => e,
    }
}

async fn migrate(c: &mut tokio_postgres::Client) -> Result<(), Fail> {
    let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .await?;
    let current: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::bigint FROM schema_version",
            &[],
        )
        .await?
        .try_get(0)?;
    if current > latest {
        return Err(StoreError::TooNew(current, latest).into());
    }
    for (v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[v])
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn read_version(c: &tokio_postgres::Client) -> Result<u64, Fail> {
    let v: i64 = c
        .query_one("SELECT value FROM meta WHERE key = 'version'", &[])
        .await?
        .try_get(0)?;
    Ok(v as u64)
}

/// The lease row and the database's clock; `lock` is `FOR UPDATE` or `FOR SHARE`.
async fn read_lease(tx: &Transaction<'_>, lock: &str) -> Result<(Lease, i64), Fail> {
    let row = tx
        .query_one(
            &format!(
                "SELECT holder, addr, epoch, expires_ms, {NOW_MS} FROM lease WHERE name = 'primary' {lock}"
            ),
            &[],
        )
        .await?;
    let lease = Lease {
        holder: row.try_get(0)?,
        addr: row.try_get(1)?,
        epoch: row.try_get::<_, i64>(2)? as u64,
        expires_ms: row.try_get(3)?,
    };
    Ok((lease, row.try_get(4)?))
}

async fn write_lease(tx: &Transaction<'_>, l: &Lease) -> Result<(), Fail> {
    tx.execute(
        "UPDATE lease SET holder = $1, addr = $2, epoch = $3, expires_ms = $4 WHERE name = 'primary'",
        &[&l.holder, &l.addr, &(l.epoch as i64), &l.expires_ms],
    )
    .await?;
    Ok(())
}

/// Opens a write transaction for the primary holding `epoch`, or refuses it (fencing). The
/// lease row is held `FOR SHARE` until commit, so no other server takes the lease while the
/// write is under way; the version row `FOR UPDATE` serializes writers.
async fn write_tx(c: &mut tokio_postgres::Client, epoch: u64) -> Result<Transaction<'_>, Fail> {
    let tx = c.transaction().await?;
    let (lease, now) = read_lease(&tx, "FOR SHARE").await?;
    lease::fence(&lease, epoch, now)?;
    tx.execute("SELECT 1 FROM meta WHERE key = 'version' FOR UPDATE", &[])
        .await?;
    Ok(tx)
}

async fn current_version(tx: &Transaction<'_>) -> Result<u64, Fail> {
    let v: i64 = tx
        .query_one("SELECT value FROM meta WHERE key = 'version'", &[])
        .await?
        .try_get(0)?;
    Ok(v as u64)
}

/// Bumps the version, logs the event, and NOTIFYs the new version (sent at commit).
async fn bump(tx: &Transaction<'_>, member: &str, kind: &str, now_ms: i64) -> Result<u64, Fail> {
    let v: i64 = tx
        .query_one(
            "UPDATE meta SET value = value + 1 WHERE key = 'version' RETURNING value",
            &[],
        )
        .await?
        .try_get(0)?;
    tx.execute(
        "INSERT INTO events (at_ms, member, kind, version) VALUES ($1, $2, $3, $4)",
        &[&now_ms, &member, &kind, &v],
    )
    .await?;
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &v.to_string()])
        .await?;
    Ok(v as u64)
}

fn registration(id: &str, r: &Row, from: usize) -> Result<Registration, tokio_postgres::Error> {
    Ok(Registration {
        id: id.to_string(),
        mqtt: r.try_get(from)?,
        mqtt_v5: r.try_get(from + 1)?,
        mesh: r.try_get(from + 2)?,
        http: r.try_get(from + 3)?,
        pid: r
            .try_get::<_, Option<i64>>(from + 4)?
            .and_then(|p| u32::try_from(p).ok()),
    })
}

impl Store for PostgresStore {
    fn register(
        &self,
        epoch: u64,
        reg: &Registration,
        now_ms: i64,
        max_members: usize,
    ) -> Result<Registered, StoreError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = write_tx(&mut c, epoch).await?;
            let known = match tx
                .query_opt(
                    "SELECT state, mqtt, mqtt_v5, mesh, http, pid FROM members WHERE id = $1",
                    &[&reg.id],
                )
                .await?
            {
                Some(r) => Some((r.try_get::<_, String>(0)?, registration(&reg.id, &r, 1)?)),
                None => None,
            };
            let refusal = match &known {
                Some((state, current)) if state == "up" && !current.same_addresses(reg) => {
                    Some(Registered::AddressHeld(current.clone()))
                }
                Some(_) => None,
                None => {
                    let n: i64 = tx
                        .query_one("SELECT COUNT(*) FROM members", &[])
                        .await?
                        .try_get(0)?;
                    (n as usize >= max_members).then_some(Registered::Full(n as usize))
                }
            };
            if let Some(r) = refusal {
                tx.commit().await?;
                c.release();
                return Ok(r);
            }
            let pid = reg.pid.map(i64::from);
            tx.execute(
                "INSERT INTO members (id, mqtt, mqtt_v5, mesh, http, pid, state, registered_ms, last_seen_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, 'up', $7, $7)
                 ON CONFLICT (id) DO UPDATE SET mqtt = $2, mqtt_v5 = $3, mesh = $4, http = $5, pid = $6,
                     state = 'up', registered_ms = $7, last_seen_ms = $7",
                &[&reg.id, &reg.mqtt, &reg.mqtt_v5, &reg.mesh, &reg.http, &pid, &now_ms],
            )
            .await?;
            let kind = if known.is_some() {
                "re-registered"
            } else {
                "registered"
            };
            let v = bump(&tx, &reg.id, kind, now_ms).await?;
            tx.commit().await?;
            c.release();
            Ok(Registered::Done(v))
        })
    }

    fn heartbeat(&self, epoch: u64, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = write_tx(&mut c, epoch).await?;
            let state: Option<String> = match tx
                .query_opt("SELECT state FROM members WHERE id = $1", &[&id])
                .await?
            {
                Some(r) => Some(r.try_get(0)?),
                None => None,
            };
            let v = match state {
                None => None,
                Some(state) => {
                    tx.execute(
                        "UPDATE members SET last_seen_ms = $2, state = 'up' WHERE id = $1",
                        &[&id, &now_ms],
                    )
                    .await?;
                    Some(if state != "up" {
                        bump(&tx, id, "up", now_ms).await?
                    } else {
                        current_version(&tx).await?
                    })
                }
            };
            tx.commit().await?;
            c.release();
            Ok(v)
        })
    }

    fn deregister(&self, epoch: u64, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = write_tx(&mut c, epoch).await?;
            let v = if tx
                .execute("DELETE FROM members WHERE id = $1", &[&id])
                .await?
                == 0
            {
                None
            } else {
                Some(bump(&tx, id, "deregistered", now_ms).await?)
            };
            tx.commit().await?;
            c.release();
            Ok(v)
        })
    }

    fn expire(&self, epoch: u64, now_ms: i64, cutoffs: Cutoffs) -> Result<Option<u64>, StoreError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = write_tx(&mut c, epoch).await?;
            let mut changed = None;
            // Up and silent too long → down; down and silent even longer → removed.
            let steps = [
                (
                    "up",
                    cutoffs.down_before_ms,
                    "UPDATE members SET state = 'down' WHERE id = $1",
                    "down",
                ),
                (
                    "down",
                    cutoffs.remove_before_ms,
                    "DELETE FROM members WHERE id = $1",
                    "removed",
                ),
            ];
            for (state, silent_since, change, kind) in steps {
                let Some(silent_since) = silent_since else {
                    continue;
                };
                let ids = tx
                    .query(
                        "SELECT id FROM members WHERE state = $1 AND last_seen_ms < $2 ORDER BY id",
                        &[&state, &silent_since],
                    )
                    .await?;
                for row in ids {
                    let id: String = row.try_get(0)?;
                    tx.execute(change, &[&id]).await?;
                    changed = Some(bump(&tx, &id, kind, now_ms).await?);
                }
            }
            tx.commit().await?;
            c.release();
            Ok(changed)
        })
    }

    fn cluster(&self) -> Result<ClusterView, StoreError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            // One snapshot: the version and the members belong together.
            let tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let version = current_version(&tx).await?;
            let rows = tx
                .query(
                    "SELECT id, mqtt, mqtt_v5, mesh, http, pid, state, registered_ms, last_seen_ms
                     FROM members ORDER BY id",
                    &[],
                )
                .await?;
            let mut members = Vec::with_capacity(rows.len());
            for r in &rows {
                let id: String = r.try_get(0)?;
                members.push(Member {
                    reg: registration(&id, r, 1)?,
                    state: MemberState::parse(r.try_get(6)?),
                    registered_ms: r.try_get(7)?,
                    last_seen_ms: r.try_get(8)?,
                });
            }
            tx.commit().await?;
            c.release();
            Ok(ClusterView {
                version,
                primary: None,
                members,
            })
        })
    }

    fn version(&self) -> Result<u64, StoreError> {
        self.call(async {
            let c = self.pool.get().await?;
            let v = read_version(&c).await?;
            c.release();
            Ok(v)
        })
    }

    fn events(&self, after: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
        self.call(async {
            let c = self.pool.get().await?;
            let rows = c
                .query(
                    "SELECT seq, at_ms, member, kind, version FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &i64::from(limit)],
                )
                .await?;
            let mut events = Vec::with_capacity(rows.len());
            for r in &rows {
                events.push(Event {
                    seq: r.try_get(0)?,
                    at_ms: r.try_get(1)?,
                    member: r.try_get(2)?,
                    kind: r.try_get(3)?,
                    version: r.try_get::<_, i64>(4)? as u64,
                });
            }
            c.release();
            Ok(events)
        })
    }

    fn write_retained(
        &self,
        epoch: u64,
        entries: &[RetainedEntry],
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = write_tx(&mut c, epoch).await?;
            let upsert = tx
                .prepare(
                    "INSERT INTO retained (topic, payload, qos, props, at_ms) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (topic) DO UPDATE SET payload = $2, qos = $3, props = $4, at_ms = $5
                     WHERE $5 >= retained.at_ms",
                )
                .await?;
            let mut applied = 0;
            for e in entries {
                let qos = i16::from(e.qos);
                applied += tx
                    .execute(
                        &upsert,
                        &[&e.topic, &e.payload, &qos, &props_text(&e.props), &e.at_ms],
                    )
                    .await?;
            }
            tx.execute(
                "DELETE FROM retained WHERE octet_length(payload) = 0 AND at_ms < $1",
                &[&(now_ms - TOMBSTONE_KEEP_MS)],
            )
            .await?;
            tx.commit().await?;
            c.release();
            Ok(applied)
        })
    }

    fn retained(&self, after: &str, limit: u32) -> Result<Vec<RetainedEntry>, StoreError> {
        self.call(async {
            let c = self.pool.get().await?;
            let rows = c
                .query(
                    "SELECT topic, payload, qos, props, at_ms FROM retained
                     WHERE topic > $1 AND octet_length(payload) > 0 ORDER BY topic LIMIT $2",
                    &[&after, &i64::from(limit)],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let topic: String = r.try_get(0)?;
                let props: Option<String> = r.try_get(3)?;
                out.push(RetainedEntry {
                    props: props_of(&topic, props.as_deref())?,
                    payload: r.try_get(1)?,
                    qos: u8::try_from(r.try_get::<_, i16>(2)?).unwrap_or(0),
                    at_ms: r.try_get(4)?,
                    topic,
                });
            }
            c.release();
            Ok(out)
        })
    }

    fn write_sessions(
        &self,
        epoch: u64,
        entries: &[SessionEntry],
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = write_tx(&mut c, epoch).await?;
            let upsert = tx
                .prepare(
                    "INSERT INTO sessions (client_id, data, updated_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (client_id) DO UPDATE SET data = $2, updated_ms = $3
                     WHERE $3 >= sessions.updated_ms",
                )
                .await?;
            let clear = tx
                .prepare("DELETE FROM queued WHERE client_id = $1 AND at_ms < $2")
                .await?;
            let clear_state = tx
                .prepare("DELETE FROM queued_state WHERE client_id = $1 AND at_ms < $2")
                .await?;
            let mut applied = 0;
            for e in entries {
                let n = tx
                    .execute(
                        &upsert,
                        &[&e.client_id, &session_text(&e.session), &e.at_ms],
                    )
                    .await?;
                if n > 0 && clears_queue(e) {
                    tx.execute(&clear, &[&e.client_id, &e.at_ms]).await?;
                    tx.execute(&clear_state, &[&e.client_id, &e.at_ms]).await?;
                }
                applied += n;
            }
            tx.execute(
                "DELETE FROM sessions WHERE data IS NULL AND updated_ms < $1",
                &[&(now_ms - TOMBSTONE_KEEP_MS)],
            )
            .await?;
            tx.commit().await?;
            c.release();
            Ok(applied)
        })
    }

    fn sessions(&self, after: &str, limit: u32) -> Result<Vec<SessionEntry>, StoreError> {
        self.call(async {
            let c = self.pool.get().await?;
            let rows = c
                .query(
                    "SELECT client_id, data, updated_ms FROM sessions
                     WHERE client_id > $1 AND data IS NOT NULL ORDER BY client_id LIMIT $2",
                    &[&after, &i64::from(limit)],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let client_id: String = r.try_get(0)?;
                let data: String = r.try_get(1)?;
                out.push(SessionEntry {
                    session: Some(session_of(&client_id, &data)?),
                    at_ms: r.try_get(2)?,
                    client_id,
                    connected: false,
                });
            }
            c.release();
            Ok(out)
        })
    }

    fn write_queued(
        &self,
        epoch: u64,
        entries: &[QueuedEntry],
        _now_ms: i64,
    ) -> Result<u64, StoreError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = write_tx(&mut c, epoch).await?;
            let replace = tx
                .prepare("DELETE FROM queued WHERE client_id = $1 AND at_ms < $2")
                .await?;
            let insert = tx
                .prepare(
                    "INSERT INTO queued (client_id, origin, seq, pkid, topic, payload, qos, retain, props, at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                     ON CONFLICT (client_id, origin, seq) DO UPDATE SET
                         pkid = CASE WHEN queued.pkid = 0 THEN $4 ELSE queued.pkid END,
                         at_ms = GREATEST(queued.at_ms, $10)",
                )
                .await?;
            let acked = tx
                .prepare("DELETE FROM queued WHERE client_id = $1 AND origin = $2 AND seq = $3")
                .await?;
            let state = tx
                .prepare("SELECT last_pkid, pubrels FROM queued_state WHERE client_id = $1 FOR UPDATE")
                .await?;
            let put_state = tx
                .prepare(
                    "INSERT INTO queued_state (client_id, last_pkid, pubrels, at_ms) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (client_id) DO UPDATE SET last_pkid = $2, pubrels = $3,
                         at_ms = GREATEST(queued_state.at_ms, $4)",
                )
                .await?;
            let mut applied = 0;
            for e in entries {
                if e.replace {
                    applied += tx.execute(&replace, &[&e.client_id, &e.at_ms]).await?;
                }
                for m in &e.messages {
                    let (origin, seq) = (m.origin as i64, m.seq as i64);
                    let (pkid, qos) = (i32::from(m.pkid), i16::from(m.qos));
                    applied += tx
                        .execute(
                            &insert,
                            &[
                                &e.client_id,
                                &origin,
                                &seq,
                                &pkid,
                                &m.topic,
                                &m.payload,
                                &qos,
                                &m.retain,
                                &props_text(&m.props),
                                &e.at_ms,
                            ],
                        )
                        .await?;
                }
                for (origin, seq) in &e.acked {
                    let (origin, seq) = (*origin as i64, *seq as i64);
                    applied += tx.execute(&acked, &[&e.client_id, &origin, &seq]).await?;
                }
                if e.last_pkid == 0 && e.pubrels.is_empty() && !e.replace {
                    continue;
                }
                let old = tx.query_opt(&state, &[&e.client_id]).await?;
                let (last, pubrels) = match old {
                    Some(r) if !e.replace => {
                        let last: i32 = r.try_get(0)?;
                        let p: String = r.try_get(1)?;
                        (
                            last.max(i32::from(e.last_pkid)),
                            pubrels_union(&pubrels_of(&p), &e.pubrels),
                        )
                    }
                    _ => (i32::from(e.last_pkid), e.pubrels.clone()),
                };
                tx.execute(
                    &put_state,
                    &[&e.client_id, &last, &pubrels_text(&pubrels), &e.at_ms],
                )
                .await?;
            }
            tx.commit().await?;
            c.release();
            Ok(applied)
        })
    }

    fn queued(&self, client_id: &str) -> Result<Option<QueuedEntry>, StoreError> {
        self.call(async {
            let c = self.pool.get().await?;
            let rows = c
                .query(
                    "SELECT origin, seq, pkid, topic, payload, qos, retain, props, at_ms FROM queued
                     WHERE client_id = $1",
                    &[&client_id],
                )
                .await?;
            let state = c
                .query_opt(
                    "SELECT last_pkid, pubrels, at_ms FROM queued_state WHERE client_id = $1",
                    &[&client_id],
                )
                .await?;
            let mut at_ms = 0i64;
            let mut list: Vec<QueuedRow> = Vec::with_capacity(rows.len());
            for r in &rows {
                at_ms = at_ms.max(r.try_get(8)?);
                list.push((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    i64::from(r.try_get::<_, i32>(2)?),
                    r.try_get(3)?,
                    r.try_get(4)?,
                    i64::from(r.try_get::<_, i16>(5)?),
                    r.try_get(6)?,
                    r.try_get(7)?,
                ));
            }
            let state = match state {
                Some(r) => {
                    at_ms = at_ms.max(r.try_get(2)?);
                    Some((i64::from(r.try_get::<_, i32>(0)?), r.try_get(1)?))
                }
                None => None,
            };
            c.release();
            Ok(queued_of(client_id, list, state, at_ms)?)
        })
    }

    fn acquire_lease(&self, holder: &str, addr: &str, ttl_ms: i64) -> Result<Lease, StoreError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            // FOR UPDATE: two servers cannot both see the lease free.
            let (current, now) = read_lease(&tx, "FOR UPDATE").await?;
            let lease = match lease::attempt(&current, holder, addr, now, ttl_ms) {
                Some(next) => {
                    write_lease(&tx, &next).await?;
                    next
                }
                None => current,
            };
            tx.commit().await?;
            c.release();
            Ok(lease)
        })
    }

    fn release_lease(&self, holder: &str, addr: &str) -> Result<(), StoreError> {
        self.call(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            let (current, now) = read_lease(&tx, "FOR UPDATE").await?;
            if let Some(ended) = lease::release(&current, holder, addr, now) {
                write_lease(&tx, &ended).await?;
            }
            tx.commit().await?;
            c.release();
            Ok(())
        })
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.clone())
    }
}
