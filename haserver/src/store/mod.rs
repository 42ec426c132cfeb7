//! Where the HA server keeps its state, behind one small trait: SQLite (one file, bundled, WAL)
//! for HA servers on one machine, the default; PostgreSQL for HA servers on several machines
//! (issue 18). Every change bumps the membership version and is logged, in one transaction, so a
//! crash never leaves a half-applied change. Both stores keep the primary lease by their own
//! clock (`lease`), and refuse a write whose lease epoch is stale (fencing). They also keep the
//! cluster's retained messages, persistent sessions and their queued messages, so a
//! whole-cluster restart finds them again (issue 18).

pub mod lease;
pub mod postgres;
pub mod sqlite;

use crate::expiry::Cutoffs;
use crate::model::{ClusterView, Event, Registration};
use crate::queued::{QueuedEntry, QueuedMessage};
use crate::retained::{RetainedEntry, RetainedProps};
use crate::sessions::{SessionEntry, StoredSession};

pub use lease::Lease;
pub use postgres::{PostgresOptions, PostgresStore};
pub use sqlite::{SqliteStore, SCHEMA_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite's own message already says "database" where it matters ("database or disk is
    /// full", "database is locked"); the prefix names the engine instead of repeating it.
    #[error("SQLite: {0}")]
    Db(#[from] rusqlite::Error),
    /// PostgreSQL failed or could not be reached; `at` is its `host:port`.
    #[error("PostgreSQL at {at}: {msg}")]
    Postgres { at: String, msg: String },
    /// A call to the database did not finish in time (a partition, a stalled server).
    #[error("PostgreSQL at {at}: no answer within {after:?}")]
    Timeout {
        at: String,
        after: std::time::Duration,
    },
    /// The connection URL is not one this store can use.
    #[error("PostgreSQL URL: {0}")]
    Url(String),
    #[error("database schema version {0} is newer than this mqlb understands ({1})")]
    TooNew(i64, i64),
    /// Fencing: the write came with a lease epoch that is not the lease's now, or the lease ran
    /// out, by the database's clock. A primary that sees this has been replaced.
    #[error(
        "the database refused a primary's write: it holds lease epoch {epoch}, the lease is at \
         epoch {current}{}", if *.expired { " and expired" } else { "" }
    )]
    Fenced {
        epoch: u64,
        current: u64,
        expired: bool,
    },
    /// A stored session does not parse (written by something else).
    #[error("the database holds session {client_id:?} malformed: {msg}")]
    MalformedSession { client_id: String, msg: String },
    /// A retained message's properties as stored do not parse (written by something else).
    #[error("the database holds retained message {topic:?} with malformed properties: {msg}")]
    Malformed { topic: String, msg: String },
    /// The blocking task that ran a database call panicked or was cancelled.
    #[error("database call did not finish: {0}")]
    Task(String),
}

impl StoreError {
    /// Whether the database itself is failing (unreachable, erroring), as opposed to refusing a
    /// stale primary: the HA server reports itself degraded while this holds.
    pub fn is_database_failure(&self) -> bool {
        !matches!(self, StoreError::Fenced { .. })
    }
}

/// How long a clearing of a retained message is remembered (its tombstone): longer than any
/// broker's batch can be late, so an older set of the topic arriving after it is refused.
pub const TOMBSTONE_KEEP_MS: i64 = 3_600_000;

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

/// The HA server's state. Calls block (the server runs them off its async threads). Every write
/// carries the lease `epoch` of the primary making it and fails with [`StoreError::Fenced`]
/// unless that epoch holds the lease now, by the database's clock.
pub trait Store: Send + Sync {
    /// Registers (or re-registers) a member as up, unless it would re-point a live member or
    /// add one beyond `max_members`.
    fn register(
        &self,
        epoch: u64,
        reg: &Registration,
        now_ms: i64,
        max_members: usize,
    ) -> Result<Registered, StoreError>;
    /// Records a heartbeat. `None`: unknown member (it must register). A down member comes up.
    fn heartbeat(&self, epoch: u64, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError>;
    /// Removes a member that left on purpose; `None` if unknown.
    fn deregister(&self, epoch: u64, id: &str, now_ms: i64) -> Result<Option<u64>, StoreError>;
    /// Marks up members last seen before `cutoffs.down_before_ms` down and removes down ones
    /// last seen before `cutoffs.remove_before_ms`; returns the version if anything changed.
    fn expire(&self, epoch: u64, now_ms: i64, cutoffs: Cutoffs) -> Result<Option<u64>, StoreError>;
    fn cluster(&self) -> Result<ClusterView, StoreError>;
    fn version(&self) -> Result<u64, StoreError>;
    fn events(&self, after: i64, limit: u32) -> Result<Vec<Event>, StoreError>;
    /// Takes the primary lease for `ttl_ms` if it is free, expired or already ours (same
    /// holder *and* address: a second server started with the same id does not renew the first
    /// one's lease), by the database's clock; taking it bumps its epoch, renewing it does not.
    /// Returns the lease as it stands after the attempt.
    fn acquire_lease(&self, holder: &str, addr: &str, ttl_ms: i64) -> Result<Lease, StoreError>;
    /// Ends the lease if ours (clean shutdown of the primary), so a backup takes over at once.
    /// The epoch stays: the next holder's is higher.
    fn release_lease(&self, holder: &str, addr: &str) -> Result<(), StoreError>;
    /// Applies a broker's batch of retained messages and clearings (the primary's write,
    /// fenced): each only if it is not older (`at_ms`) than what the store holds for its topic,
    /// so the last write of a topic wins across brokers; a clearing stays as a tombstone for
    /// [`TOMBSTONE_KEEP_MS`] (judged by `now_ms`). Returns how many entries were applied.
    /// Retained messages do not change the membership version.
    fn write_retained(
        &self,
        epoch: u64,
        entries: &[RetainedEntry],
        now_ms: i64,
    ) -> Result<u64, StoreError>;
    /// Up to `limit` retained messages (no tombstones) with topics after `after` in byte
    /// order (`""`: from the first).
    fn retained(&self, after: &str, limit: u32) -> Result<Vec<RetainedEntry>, StoreError>;
    /// Applies a batch of persistent sessions and their ends, as [`Store::write_retained`]
    /// does retained messages: the latest of each client ID by `at_ms` wins, an end stays a
    /// tombstone for [`TOMBSTONE_KEEP_MS`].
    fn write_sessions(
        &self,
        epoch: u64,
        entries: &[SessionEntry],
        now_ms: i64,
    ) -> Result<u64, StoreError>;
    /// Up to `limit` sessions (no ends) with client IDs after `after` in byte order.
    fn sessions(&self, after: &str, limit: u32) -> Result<Vec<SessionEntry>, StoreError>;
    /// Applies a batch of sessions' queued messages (the primary's write, fenced): each
    /// entry's `replace` first drops its client's rows written before it, then its messages
    /// are added (once per client ID and message id; a packet id fills one not known yet),
    /// then its `acked` ones go. The packet-id state keeps the highest last id and every
    /// PUBREL owed (a `replace` sets it). Returns how many rows were added or deleted.
    fn write_queued(
        &self,
        epoch: u64,
        entries: &[QueuedEntry],
        now_ms: i64,
    ) -> Result<u64, StoreError>;
    /// What is kept of `client_id`'s queue, as one entry (messages by id, `at_ms` the
    /// latest row's), or `None`.
    fn queued(&self, client_id: &str) -> Result<Option<QueuedEntry>, StoreError>;
    /// Versions as any HA server's writes commit, pushed by the database (PostgreSQL's
    /// LISTEN/NOTIFY); `None`: the server polls the version instead.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// A retained message's MQTT 5 properties as both stores keep them: JSON text, `None` when it
/// has none (most messages).
fn props_text(p: &RetainedProps) -> Option<String> {
    if p.is_empty() {
        return None;
    }
    serde_json::to_string(p).ok()
}

fn props_of(topic: &str, text: Option<&str>) -> Result<RetainedProps, StoreError> {
    match text {
        None => Ok(RetainedProps::default()),
        Some(t) => serde_json::from_str(t).map_err(|e| StoreError::Malformed {
            topic: topic.to_string(),
            msg: e.to_string(),
        }),
    }
}

/// Whether a session write makes the queue rows of its client written before it stale: an
/// end, or its client connected (see `SessionEntry::connected`).
fn clears_queue(e: &SessionEntry) -> bool {
    e.session.is_none() || e.connected
}

/// The PUBRELs owed as both stores keep them: a JSON array.
fn pubrels_text(p: &[u16]) -> String {
    serde_json::to_string(p).unwrap_or_else(|_| "[]".into())
}

fn pubrels_of(text: &str) -> Vec<u16> {
    serde_json::from_str(text).unwrap_or_default()
}

/// The union of two lists of PUBRELs owed, in order.
fn pubrels_union(a: &[u16], b: &[u16]) -> Vec<u16> {
    let mut all: Vec<u16> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// A queue row's columns: origin, seq, pkid, topic, payload, QoS, retain, props (JSON).
type QueuedRow = (i64, i64, i64, String, Vec<u8>, i64, bool, Option<String>);

/// A session's queue from its rows and its packet-id state (`None` when neither is there).
fn queued_of(
    client_id: &str,
    rows: Vec<QueuedRow>,
    state: Option<(i64, String)>,
    at_ms: i64,
) -> Result<Option<QueuedEntry>, StoreError> {
    if rows.is_empty() && state.is_none() {
        return Ok(None);
    }
    let mut messages = Vec::with_capacity(rows.len());
    for (origin, seq, pkid, topic, payload, qos, retain, props) in rows {
        messages.push(QueuedMessage {
            // ids are u64 kept in BIGINTs as their bits
            origin: origin as u64,
            seq: seq as u64,
            pkid: u16::try_from(pkid).unwrap_or(0),
            props: props_of(&topic, props.as_deref())?,
            topic,
            payload,
            qos: u8::try_from(qos).unwrap_or(1).clamp(1, 2),
            retain,
        });
    }
    messages.sort_by_key(|m| (m.origin, m.seq));
    let (last_pkid, pubrels) = state
        .map(|(l, p)| (u16::try_from(l).unwrap_or(0), pubrels_of(&p)))
        .unwrap_or_default();
    Ok(Some(QueuedEntry {
        client_id: client_id.to_string(),
        at_ms,
        replace: false,
        messages,
        acked: Vec::new(),
        last_pkid,
        pubrels,
    }))
}

/// A session as both stores keep it: JSON text; `None` for an end (a tombstone).
fn session_text(s: &Option<StoredSession>) -> Option<String> {
    s.as_ref().and_then(|s| serde_json::to_string(s).ok())
}

fn session_of(client_id: &str, text: &str) -> Result<StoredSession, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::MalformedSession {
        client_id: client_id.to_string(),
        msg: e.to_string(),
    })
}
