//! The embedded store: one SQLite file (rusqlite, bundled), every write one transaction.
//!
//! Records are kept as JSON next to the columns conditions need, so the conditions read
//! like the DynamoDB ones. `BEGIN IMMEDIATE` takes the write lock up front, so concurrent
//! processes on the same file serialise instead of failing half-way; the version checks
//! still guard against a decision made on a stale read.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use agentpay_core::clock::Timestamp;
use agentpay_core::deviation::MAX_LOOKBACK_DAYS;
use agentpay_core::error::PaymentError;
use agentpay_core::executions::{ExecutionFilter, ExecutionRecord, ExecutionStore, HistoryEvent};
use agentpay_core::money::AtomicAmount;
use agentpay_core::policy::AgentLedger;
use agentpay_core::provider::{IssuedProof, IssuedProofs};
use agentpay_core::store::*;
use agentpay_core::window::{SpendWindow, WindowWrite};

const SCHEMA: &str = r#"
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, status TEXT NOT NULL, fingerprint TEXT NOT NULL, execution_id TEXT NOT NULL,
    attempt INTEGER NOT NULL, expires_at INTEGER NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY, version INTEGER NOT NULL, policy TEXT, window TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reservations (
    agent_id TEXT NOT NULL, id TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (agent_id, id));
CREATE INDEX IF NOT EXISTS reservations_by_agent ON reservations (agent_id, created_at);
CREATE TABLE IF NOT EXISTS audit_events (
    event_id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, at INTEGER NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_by_agent ON audit_events (agent_id, at);
CREATE TABLE IF NOT EXISTS policy_history (
    agent_id TEXT NOT NULL, version INTEGER NOT NULL, record TEXT NOT NULL, PRIMARY KEY (agent_id, version));
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, requested_at INTEGER NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS approvals_by_time ON approvals (requested_at);
CREATE TABLE IF NOT EXISTS spend_history (
    agent_id TEXT NOT NULL, scope TEXT NOT NULL, day INTEGER NOT NULL, total INTEGER NOT NULL,
    payments INTEGER NOT NULL, PRIMARY KEY (agent_id, scope, day));
CREATE TABLE IF NOT EXISTS shadow_windows (
    agent_id TEXT PRIMARY KEY, window TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trip_counters (
    agent_id TEXT PRIMARY KEY, version INTEGER NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS issued_proofs (
    client_token TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS executions (
    execution_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, status TEXT NOT NULL, agent_id TEXT,
    started_at INTEGER NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS executions_by_start ON executions (started_at);
CREATE TABLE IF NOT EXISTS execution_history (
    execution_id TEXT NOT NULL, seq INTEGER NOT NULL, record TEXT NOT NULL, PRIMARY KEY (execution_id, seq));
"#;

/// Bumped when a table's shape changes; an older file is refused with a message, never
/// half-migrated. 2: reservations keyed by (agent, id), as in DynamoDB. 3: the window as hour
/// and minute rings (`agentpay_core::window`), not minute buckets.
const SCHEMA_VERSION: i64 = 3;

pub struct SqliteStore {
    writer: tokio::sync::Mutex<Writer>,
    /// A second connection for reads (file stores): WAL lets it read while a batch is open and
    /// shows it only committed writes. An in-memory store has one connection for both.
    reader: Option<Mutex<Connection>>,
}

/// The write connection and the batch open on it, if any.
struct Writer {
    connection: Connection,
    batch: Option<Arc<Batch>>,
    stats: CommitStats,
}

/// Writes and commits since the store was opened: writes per commit is the group commit's gain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    pub writes: u64,
    pub commits: u64,
    /// Time the write lock was held running writes, and committing.
    pub write_time: Duration,
    pub commit_time: Duration,
}

/// One group commit: the writes of concurrent callers in one transaction and one fsync.
#[derive(Default)]
struct Batch {
    /// Set by whoever commits it, before the lock is released.
    committed: OnceLock<Result<(), String>>,
}

/// Writes one batch holds at most: bounds how long one commit keeps callers waiting.
const MAX_BATCH: usize = 64;

type SqlResult<T> = Result<T, rusqlite::Error>;

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, PaymentError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| PaymentError::store("create store directory", e))?;
        }
        let writer = Self::init(Connection::open(path).map_err(|e| PaymentError::store("open store", e))?)?;
        let reader = Connection::open(path).map_err(|e| PaymentError::store("open store", e))?;
        reader.busy_timeout(Duration::from_secs(10)).map_err(|e| PaymentError::store("configure store", e))?;
        Ok(Self { writer: tokio::sync::Mutex::new(writer), reader: Some(Mutex::new(reader)) })
    }

    pub fn in_memory() -> Result<Self, PaymentError> {
        let writer = Self::init(Connection::open_in_memory().map_err(|e| PaymentError::store("open store", e))?)?;
        Ok(Self { writer: tokio::sync::Mutex::new(writer), reader: None })
    }

    fn init(connection: Connection) -> Result<Writer, PaymentError> {
        connection.busy_timeout(Duration::from_secs(10)).map_err(|e| PaymentError::store("configure store", e))?;
        let (version, tables): (i64, i64) = connection
            .query_row(
                "SELECT (SELECT user_version FROM pragma_user_version), (SELECT count(*) FROM sqlite_master WHERE type = 'table')",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(|e| PaymentError::store("read schema version", e))?;
        if tables > 0 && version != SCHEMA_VERSION {
            return Err(PaymentError::StoreRejected {
                operation: "open store",
                source: format!(
                    "this store file has schema version {version}, this agentpay needs {SCHEMA_VERSION}: move the file aside (it keeps the old ledger for reading) and start a new one"
                )
                .into(),
            });
        }
        connection.execute_batch(SCHEMA).map_err(|e| PaymentError::store("create schema", e))?;
        connection
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(|e| PaymentError::store("write schema version", e))?;
        Ok(Writer { connection, batch: None, stats: CommitStats::default() })
    }

    /// Runs `work` as one atomic write, durable (committed with a full fsync) before it
    /// returns. Group commit: concurrent writes share one transaction and one fsync. Each runs
    /// in its own savepoint, so one that fails (or panics) is rolled back alone; the batch is
    /// committed by the first member to come back for its result after every write queued
    /// behind it has joined (the lock is first come, first served); if the commit fails, every
    /// member fails.
    async fn write<T>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&Connection) -> SqlResult<T>,
    ) -> Result<T, PaymentError> {
        let failed = |e: rusqlite::Error| PaymentError::store(operation, e);
        let (value, batch) = {
            let mut writer = self.writer.lock().await;
            let batch = match &writer.batch {
                Some(batch) if Arc::strong_count(batch) <= MAX_BATCH => batch.clone(),
                _ => {
                    if let Some(full) = writer.batch.take() {
                        writer.commit(&full);
                    }
                    writer
                        .connection
                        .prepare_cached("BEGIN IMMEDIATE")
                        .and_then(|mut s| s.execute([]))
                        .map_err(failed)?;
                    let batch = Arc::new(Batch::default());
                    writer.batch = Some(batch.clone());
                    batch
                }
            };
            writer.stats.writes += 1;
            let began = std::time::Instant::now();
            let connection = &writer.connection;
            connection.prepare_cached("SAVEPOINT member").and_then(|mut s| s.execute([])).map_err(failed)?;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(connection)));
            let undo = !matches!(outcome, Ok(Ok(_)));
            if undo {
                connection.prepare_cached("ROLLBACK TO member").and_then(|mut s| s.execute([])).map_err(failed)?;
            }
            connection.prepare_cached("RELEASE member").and_then(|mut s| s.execute([])).map_err(failed)?;
            writer.stats.write_time += began.elapsed();
            match outcome {
                Ok(Ok(value)) => (value, batch),
                Ok(Err(error)) => return Err(failed(error)),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        };
        let mut guard = CommitOnDrop { store: self, batch: Some(batch.clone()) };
        {
            let mut writer = self.writer.lock().await;
            if writer.batch.as_ref().is_some_and(|open| Arc::ptr_eq(open, &batch)) {
                writer.batch = None;
                writer.commit(&batch);
            }
        }
        guard.batch = None;
        match batch.committed.get() {
            Some(Ok(())) => Ok(value),
            Some(Err(why)) => Err(PaymentError::store(operation, format!("commit failed: {why}"))),
            None => Err(PaymentError::store(operation, "the write's batch was never committed")),
        }
    }

    /// Writes and commits so far (benches report writes per commit).
    pub async fn commit_stats(&self) -> CommitStats {
        self.writer.lock().await.stats
    }

    async fn read<T>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&Connection) -> SqlResult<T>,
    ) -> Result<T, PaymentError> {
        match &self.reader {
            // A panic while holding the lock leaves SQLite consistent.
            Some(reader) => work(&reader.lock().unwrap_or_else(|p| p.into_inner())),
            // In memory there is one connection (and no durability to keep reads behind).
            None => work(&self.writer.lock().await.connection),
        }
        .map_err(|e| PaymentError::store(operation, e))
    }
}

impl Writer {
    /// Commits `batch` (the open one) and records the outcome for its members.
    fn commit(&mut self, batch: &Batch) {
        let began = std::time::Instant::now();
        self.stats.commits += 1;
        let outcome = self
            .connection
            .prepare_cached("COMMIT")
            .and_then(|mut s| s.execute([]))
            .map(drop)
            .map_err(|e| e.to_string());
        if outcome.is_err() {
            let _ = self.connection.execute_batch("ROLLBACK");
        }
        let _ = batch.committed.set(outcome);
        self.stats.commit_time += began.elapsed();
    }
}

/// A writer whose future is dropped between its write and its commit: if the lock is free,
/// commit the batch now rather than leave it open. If it is taken, the holder is a writer (on a
/// file store only writers take it) that joins the open batch and commits it.
struct CommitOnDrop<'a> {
    store: &'a SqliteStore,
    batch: Option<Arc<Batch>>,
}

impl Drop for CommitOnDrop<'_> {
    fn drop(&mut self) {
        let Some(batch) = self.batch.take() else { return };
        // Busy: whoever holds the lock joins or commits this batch.
        if let Ok(mut writer) = self.store.writer.try_lock()
            && writer.batch.as_ref().is_some_and(|open| Arc::ptr_eq(open, &batch))
        {
            writer.batch = None;
            writer.commit(&batch);
        }
    }
}

fn to_json<T: Serialize>(value: &T) -> SqlResult<String> {
    serde_json::to_string(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn from_json<T: DeserializeOwned>(text: &str) -> SqlResult<T> {
    serde_json::from_str(text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

fn get_idempotency(tx: &Connection, key: &str) -> SqlResult<Option<IdempotencyRecord>> {
    tx.prepare_cached("SELECT record FROM idempotency WHERE key = ?1")?
        .query_row([key], |row| row.get::<_, String>(0))
        .optional()?
        .map(|text| from_json(&text))
        .transpose()
}

fn put_idempotency(tx: &Connection, record: &IdempotencyRecord) -> SqlResult<()> {
    tx.prepare_cached(
        "INSERT INTO idempotency (key, status, fingerprint, execution_id, attempt, expires_at, record)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (key) DO UPDATE SET status = excluded.status, fingerprint = excluded.fingerprint,
           execution_id = excluded.execution_id, attempt = excluded.attempt, expires_at = excluded.expires_at,
           record = excluded.record",
    )?
    .execute(params![
        record.key,
        record.status.as_str(),
        record.fingerprint,
        record.execution_id,
        record.attempt,
        record.expires_at.millis(),
        to_json(record)?
    ])?;
    Ok(())
}

fn get_ledger(tx: &Connection, agent_id: &str) -> SqlResult<AgentLedger> {
    let row = tx
        .prepare_cached("SELECT version, policy, window FROM agents WHERE agent_id = ?1")?
        .query_row([agent_id], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, Option<String>>(1)?, row.get::<_, String>(2)?))
        })
        .optional()?;
    let Some((version, policy, window)) = row else {
        return Ok(AgentLedger::default());
    };
    let window: SpendWindow = from_json(&window)?;
    window.check().map_err(|why| {
        rusqlite::Error::FromSqlConversionFailure(
            2,
            rusqlite::types::Type::Text,
            format!("agent {agent_id}'s window: {why}").into(),
        )
    })?;
    Ok(AgentLedger {
        policy: policy.map(|p| from_json(&p)).transpose()?,
        window,
        version: u64::try_from(version).unwrap_or(0),
    })
}

/// Applies `write` to the agent's window if its conditions hold on the stored one; otherwise
/// returns the stored window (nothing written).
fn write_window(tx: &Connection, agent_id: &str, write: &WindowWrite) -> SqlResult<Result<(), SpendWindow>> {
    let stored = get_ledger(tx, agent_id)?.window;
    let Some(next) = stored.apply(write) else {
        return Ok(Err(stored));
    };
    tx.prepare_cached(
        "INSERT INTO agents (agent_id, version, policy, window) VALUES (?1, 0, NULL, ?2)
         ON CONFLICT (agent_id) DO UPDATE SET window = excluded.window",
    )?
    .execute(params![agent_id, to_json(&next)?])?;
    Ok(Ok(()))
}

/// The key's record COMPLETED with `result`, kept until `expires_at`.
fn complete_key(
    tx: &Connection,
    mut record: IdempotencyRecord,
    result: &serde_json::Value,
    now: Timestamp,
    expires_at: Timestamp,
) -> SqlResult<()> {
    record.status = IdempotencyStatus::Completed;
    record.result = Some(result.clone());
    record.updated_at = now;
    record.expires_at = expires_at;
    put_idempotency(tx, &record)
}

fn get_shadow_window(tx: &Connection, agent_id: &str) -> SqlResult<SpendWindow> {
    tx.prepare_cached("SELECT window FROM shadow_windows WHERE agent_id = ?1")?
        .query_row([agent_id], |row| row.get::<_, String>(0))
        .optional()?
        .map_or_else(|| Ok(SpendWindow::default()), |text| from_json(&text))
}

fn get_reservation(tx: &Connection, agent_id: &str, id: &str) -> SqlResult<Option<Reservation>> {
    tx.prepare_cached("SELECT record FROM reservations WHERE agent_id = ?1 AND id = ?2")?
        .query_row([agent_id, id], |row| row.get::<_, String>(0))
        .optional()?
        .map(|text| from_json(&text))
        .transpose()
}

fn put_reservation(tx: &Connection, reservation: &Reservation) -> SqlResult<()> {
    tx.prepare_cached(
        "INSERT INTO reservations (id, agent_id, status, created_at, record) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (agent_id, id) DO UPDATE SET status = excluded.status, record = excluded.record",
    )?
    .execute(params![
        reservation.id,
        reservation.agent_id,
        reservation.status.as_str(),
        reservation.created_at.millis(),
        to_json(reservation)?
    ])?;
    Ok(())
}

fn put_audit(tx: &Connection, event: &AuditEvent) -> SqlResult<()> {
    // The id is deterministic: a retried write of the same event is a no-op.
    tx.prepare_cached(
        "INSERT INTO audit_events (event_id, agent_id, at, record) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
    )?
    .execute(params![event.event_id, event.agent_id, event.at.millis(), to_json(event)?])?;
    Ok(())
}

fn get_approval(tx: &Connection, id: &str) -> SqlResult<Option<ApprovalRecord>> {
    tx.prepare_cached("SELECT record FROM approvals WHERE id = ?1")?
        .query_row([id], |row| row.get::<_, String>(0))
        .optional()?
        .map(|text| from_json(&text))
        .transpose()
}

fn put_approval(tx: &Connection, approval: &ApprovalRecord) -> SqlResult<()> {
    tx.prepare_cached(
        "INSERT INTO approvals (id, status, requested_at, record) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET status = excluded.status, requested_at = excluded.requested_at, record = excluded.record",
    )?
    .execute(params![approval.id, approval.status.as_str(), approval.requested_at.millis(), to_json(approval)?])?;
    Ok(())
}

/// The key's record if `fence` still holds it; otherwise who does (for `Fenced`).
fn held_record(tx: &Connection, fence: &ClaimFence) -> SqlResult<Result<IdempotencyRecord, String>> {
    Ok(match get_idempotency(tx, &fence.key)? {
        Some(record) if record.is_held_by(fence) => Ok(record),
        Some(record) => Err(record.holder()),
        None => Err("gone (no live record)".to_owned()),
    })
}

fn update_execution_row(tx: &Connection, record: &ExecutionRecord, text: &str) -> SqlResult<()> {
    tx.prepare_cached("UPDATE executions SET status = ?2, record = ?3 WHERE execution_id = ?1")?.execute(params![
        record.execution_id,
        record.status.as_str(),
        text
    ])?;
    Ok(())
}

fn encode_history(events: &[HistoryEvent]) -> SqlResult<Vec<(u32, String)>> {
    events.iter().map(|event| Ok((event.seq, to_json(event)?))).collect()
}

fn insert_history(tx: &Connection, execution_id: &str, events: &[(u32, String)]) -> SqlResult<()> {
    let mut statement =
        tx.prepare_cached("INSERT INTO execution_history (execution_id, seq, record) VALUES (?1, ?2, ?3)")?;
    for (seq, text) in events {
        statement.execute(params![execution_id, seq, text])?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_idempotency(&self, record: &IdempotencyRecord) -> Result<Option<IdempotencyRecord>, PaymentError> {
        self.write("claim idempotency key", |tx| {
            if let Some(existing) = get_idempotency(tx, &record.key)?
                && !existing.is_expired(record.created_at)
            {
                return Ok(Some(existing));
            }
            put_idempotency(tx, record)?;
            Ok(None)
        })
        .await
    }

    async fn replace_idempotency(
        &self,
        expected: &IdempotencyRecord,
        record: &IdempotencyRecord,
    ) -> Result<Option<Option<IdempotencyRecord>>, PaymentError> {
        self.write("reclaim idempotency key", |tx| {
            let current = get_idempotency(tx, &expected.key)?;
            let matches = current.as_ref().is_some_and(|c| {
                c.status == expected.status && c.execution_id == expected.execution_id && c.attempt == expected.attempt
            });
            if !matches {
                return Ok(Some(current));
            }
            put_idempotency(tx, record)?;
            Ok(None)
        })
        .await
    }

    async fn idempotency(&self, key: &str, now: Timestamp) -> Result<Option<IdempotencyRecord>, PaymentError> {
        let record = self.read("read idempotency key", |c| get_idempotency(c, key)).await?;
        Ok(record.filter(|r| !r.is_expired(now)))
    }

    async fn agent_ledger(&self, agent_id: &str) -> Result<AgentLedger, PaymentError> {
        self.read("read agent ledger", |c| get_ledger(c, agent_id)).await
    }

    async fn agent_and_key(
        &self,
        agent_id: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<(AgentLedger, Option<IdempotencyRecord>), PaymentError> {
        let (ledger, record) =
            self.read("read agent and key", |c| Ok((get_ledger(c, agent_id)?, get_idempotency(c, key)?))).await?;
        Ok((ledger, record.filter(|r| !r.is_expired(now))))
    }

    async fn change_policy(&self, agent_id: &str, change: &PolicyChange) -> Result<PolicyEdited, PaymentError> {
        self.write("set policy", |tx| {
            let ledger = get_ledger(tx, agent_id)?;
            if let Some(expected) = change.expected_version
                && expected != ledger.version
            {
                return Ok(PolicyEdited::VersionMoved { current: ledger.version });
            }
            let Some(policy) = change.edit.apply(ledger.policy.as_ref()) else {
                return Ok(PolicyEdited::NoPolicy);
            };
            let version = ledger.version + 1;
            let window = SpendWindow { policy_version: version, seq: ledger.window.seq + 1, ..ledger.window };
            let stored_version = i64::try_from(version).unwrap_or(i64::MAX);
            tx.prepare_cached(
                "INSERT INTO agents (agent_id, version, policy, window) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (agent_id) DO UPDATE SET policy = excluded.policy, version = excluded.version, window = excluded.window",
            )?
            .execute(params![agent_id, stored_version, to_json(&policy)?, to_json(&window)?])?;
            let event = PolicyAuditEvent::of(agent_id, version, change, &policy);
            tx.prepare_cached("INSERT INTO policy_history (agent_id, version, record) VALUES (?1, ?2, ?3)")?
                .execute(params![agent_id, stored_version, to_json(&event)?])?;
            Ok(PolicyEdited::Applied { version })
        })
        .await
    }

    async fn policy_history(&self, agent_id: &str) -> Result<Vec<PolicyAuditEvent>, PaymentError> {
        self.read("read policy history", |c| {
            let mut statement =
                c.prepare_cached("SELECT record FROM policy_history WHERE agent_id = ?1 ORDER BY version")?;
            let rows = statement.query_map([agent_id], |row| row.get::<_, String>(0))?;
            rows.map(|row| from_json(&row?)).collect()
        })
        .await
    }

    async fn spend_history(
        &self,
        agent_id: &str,
        scope: &str,
        first_day: u32,
        last_day: u32,
    ) -> Result<SpendHistory, PaymentError> {
        let rows = self
            .read("read spend history", |c| {
                let mut statement = c.prepare_cached(
                    "SELECT total, payments FROM spend_history WHERE agent_id = ?1 AND scope = ?2 AND day BETWEEN ?3 AND ?4",
                )?;
                let rows = statement.query_map(params![agent_id, scope, first_day, last_day], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
                })?;
                rows.collect::<SqlResult<Vec<_>>>()
            })
            .await?;
        sum_history(rows.into_iter())
            .ok_or_else(|| PaymentError::LedgerInconsistent(format!("agent {agent_id}: the {scope} history overflows")))
    }

    async fn trip_counters(&self, agent_id: &str) -> Result<TripCounters, PaymentError> {
        let record = self
            .read("read trip counters", |c| {
                c.prepare_cached("SELECT record FROM trip_counters WHERE agent_id = ?1")?
                    .query_row([agent_id], |row| row.get::<_, String>(0))
                    .optional()
            })
            .await?;
        record
            .map(|text| from_json(&text).map_err(|e| PaymentError::store("read trip counters", e)))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    async fn put_trip_counters(&self, agent_id: &str, counters: &TripCounters) -> Result<bool, PaymentError> {
        let record = serde_json::to_string(counters).map_err(|e| PaymentError::store("write trip counters", e))?;
        self.write("write trip counters", |tx| {
            let stored: i64 = tx
                .prepare_cached("SELECT version FROM trip_counters WHERE agent_id = ?1")?
                .query_row([agent_id], |row| row.get(0))
                .optional()?
                .unwrap_or(0);
            if stored != counters.version as i64 - 1 {
                return Ok(false);
            }
            tx.prepare_cached(
                "INSERT INTO trip_counters (agent_id, version, record) VALUES (?1, ?2, ?3)
                 ON CONFLICT (agent_id) DO UPDATE SET version = excluded.version, record = excluded.record",
            )?
            .execute(params![agent_id, counters.version as i64, record])?;
            Ok(true)
        })
        .await
    }

    async fn agents(&self) -> Result<Vec<String>, PaymentError> {
        self.read("list agents", |c| {
            let mut statement =
                c.prepare_cached("SELECT agent_id FROM agents WHERE policy IS NOT NULL ORDER BY agent_id")?;
            let rows = statement.query_map([], |row| row.get::<_, String>(0))?;
            rows.collect()
        })
        .await
    }

    async fn reserve(
        &self,
        write: &WindowWrite,
        reservation: &Reservation,
        fence: &ClaimFence,
    ) -> Result<ReserveOutcome, PaymentError> {
        self.write("reserve", |tx| {
            if let Some(existing) = get_reservation(tx, &reservation.agent_id, &reservation.id)? {
                return Ok(ReserveOutcome::AlreadyExists(Box::new(existing)));
            }
            if let Err(holder) = held_record(tx, fence)? {
                return Ok(ReserveOutcome::Fenced(holder));
            }
            if let Err(stored) = write_window(tx, &reservation.agent_id, write)? {
                return Ok(ReserveOutcome::WindowMoved(Some(Box::new(stored))));
            }
            put_reservation(tx, reservation)?;
            Ok(ReserveOutcome::Reserved)
        })
        .await
    }

    async fn reservation(&self, agent_id: &str, id: &str) -> Result<Option<Reservation>, PaymentError> {
        self.read("read reservation", |c| get_reservation(c, agent_id, id)).await
    }

    async fn shadow_window(&self, agent_id: &str) -> Result<SpendWindow, PaymentError> {
        self.read("read shadow window", |c| get_shadow_window(c, agent_id)).await
    }

    async fn record_shadow(&self, commit: &ShadowCommit) -> Result<ReserveOutcome, PaymentError> {
        self.write("record shadow decision", |tx| {
            let agent_id = &commit.record.agent_id;
            if let Some(existing) = get_reservation(tx, agent_id, &commit.record.id)? {
                return Ok(ReserveOutcome::AlreadyExists(Box::new(existing)));
            }
            let record = match held_record(tx, &commit.fence)? {
                Ok(record) => record,
                Err(holder) => return Ok(ReserveOutcome::Fenced(holder)),
            };
            if let Some(write) = &commit.window {
                let stored = get_shadow_window(tx, agent_id)?;
                let Some(next) = stored.apply(write) else {
                    return Ok(ReserveOutcome::WindowMoved(Some(Box::new(stored))));
                };
                tx.prepare_cached(
                    "INSERT INTO shadow_windows (agent_id, window) VALUES (?1, ?2)
                     ON CONFLICT (agent_id) DO UPDATE SET window = excluded.window",
                )?
                .execute(params![agent_id, to_json(&next)?])?;
            }
            put_reservation(tx, &commit.record)?;
            complete_key(tx, record, &commit.result, commit.now, commit.expires_at)?;
            put_audit(tx, &commit.audit)?;
            if let Some(history) = &commit.history {
                add_history(tx, agent_id, history)?;
            }
            Ok(ReserveOutcome::Reserved)
        })
        .await
    }

    async fn reservations(&self, agent_id: &str) -> Result<Vec<Reservation>, PaymentError> {
        self.read("list reservations", |c| {
            let mut statement =
                c.prepare_cached("SELECT record FROM reservations WHERE agent_id = ?1 ORDER BY created_at, id")?;
            let rows = statement.query_map([agent_id], |row| row.get::<_, String>(0))?;
            rows.map(|row| from_json(&row?)).collect()
        })
        .await
    }

    async fn authorize(&self, commit: &AuthorizationCommit) -> Result<Transition, PaymentError> {
        self.write("record ledger", |tx| {
            let Some(mut reservation) = get_reservation(tx, &commit.audit.agent_id, &commit.reservation_id)? else {
                return Ok(Transition::Refused("no such reservation".into()));
            };
            match reservation.status {
                ReservationStatus::Reserved => {}
                paid if paid.is_paid() && reservation.payment_id.as_deref() == Some(&commit.payment_id) => {
                    // Recorded before. A key still held for this very claim (a later record of
                    // the same execution, whose claim id is the same) is completed with it:
                    // never left IN_PROGRESS over a paid reservation.
                    if let Ok(record) = held_record(tx, &commit.fence)? {
                        complete_key(tx, record, &commit.result, commit.now, commit.expires_at)?;
                    }
                    return Ok(Transition::AlreadyApplied);
                }
                other => {
                    return Ok(Transition::Refused(format!("reservation is {}", other.as_str())));
                }
            }
            let record = match held_record(tx, &commit.fence)? {
                Ok(record) => record,
                Err(holder) => return Ok(Transition::Fenced(holder)),
            };
            reservation.status = ReservationStatus::Authorized;
            reservation.payment_id = Some(commit.payment_id.clone());
            reservation.payer = commit.payer.clone();
            reservation.authorization = commit.authorization.clone();
            reservation.updated_at = commit.now;
            put_reservation(tx, &reservation)?;
            complete_key(tx, record, &commit.result, commit.now, commit.expires_at)?;
            put_audit(tx, &commit.audit)?;
            add_history(tx, &commit.audit.agent_id, &commit.history)?;
            Ok(Transition::Applied)
        })
        .await
    }

    async fn release(&self, commit: &ReleaseCommit) -> Result<Transition, PaymentError> {
        self.write("compensate", |tx| {
            let mut record = match held_record(tx, &commit.fence)? {
                Ok(record) => record,
                Err(holder) => {
                    // Compensated before (by this execution, or by one that adopted the claim)?
                    let current = get_idempotency(tx, &commit.fence.key)?;
                    let closed_here = current.as_ref().is_some_and(|r| r.is_closed_for(&commit.fence));
                    let released = get_reservation(tx, &commit.agent_id, &commit.reservation_id)?
                        .is_some_and(|r| r.status == ReservationStatus::Released);
                    return Ok(if closed_here || released {
                        Transition::AlreadyApplied
                    } else {
                        Transition::Fenced(holder)
                    });
                }
            };
            if let Some(release) = &commit.reservation
                && let Some(mut reservation) = get_reservation(tx, &commit.agent_id, &release.id)?
            {
                match reservation.status {
                    ReservationStatus::Reserved => {
                        if let Some(refund) = &release.refund
                            && write_window(tx, &commit.agent_id, refund)?.is_err()
                        {
                            return Ok(Transition::VersionConflict);
                        }
                        reservation.status = ReservationStatus::Released;
                        reservation.updated_at = commit.now;
                        put_reservation(tx, &reservation)?;
                    }
                    ReservationStatus::Released => {}
                    other => {
                        return Ok(Transition::Refused(format!(
                            "reservation {} is {}: a payment proof was issued, it must not be released",
                            release.id,
                            other.as_str()
                        )));
                    }
                }
            }
            record.status = commit.status;
            record.error = Some(commit.error.clone());
            record.updated_at = commit.now;
            record.expires_at = commit.expires_at;
            put_idempotency(tx, &record)?;
            put_audit(tx, &commit.audit)?;
            Ok(Transition::Applied)
        })
        .await
    }

    async fn hold(&self, commit: &HoldCommit) -> Result<Transition, PaymentError> {
        self.write("hold unknown outcome", |tx| {
            let mut record = match held_record(tx, &commit.fence)? {
                Ok(record) => record,
                Err(holder) => return Ok(Transition::Fenced(holder)),
            };
            record.lease_expires_at = commit.now;
            record.updated_at = commit.now;
            put_idempotency(tx, &record)?;
            put_audit(tx, &commit.audit)?;
            Ok(Transition::Applied)
        })
        .await
    }

    async fn record_settlement(&self, commit: &SettlementCommit) -> Result<Transition, PaymentError> {
        self.write("record settlement", |tx| {
            let Some(mut reservation) = get_reservation(tx, &commit.agent_id, &commit.reservation_id)? else {
                return Ok(Transition::Refused("no such reservation".into()));
            };
            if reservation.status != commit.from {
                let same = reservation.status == commit.to
                    && (commit.settlement.is_none() || reservation.settlement == commit.settlement);
                return Ok(if same { Transition::AlreadyApplied } else { Transition::VersionConflict });
            }
            if let Some(refund) = &commit.refund
                && write_window(tx, &commit.agent_id, refund)?.is_err()
            {
                return Ok(Transition::VersionConflict);
            }
            reservation.status = commit.to;
            if let Some(settlement) = &commit.settlement {
                reservation.settlement = Some(settlement.clone());
            }
            reservation.updated_at = commit.audit.at;
            put_reservation(tx, &reservation)?;
            put_audit(tx, &commit.audit)?;
            Ok(Transition::Applied)
        })
        .await
    }

    async fn append_audit(&self, event: &AuditEvent) -> Result<(), PaymentError> {
        self.write("append audit event", |tx| put_audit(tx, event)).await
    }

    async fn audit_events(&self, agent_id: &str) -> Result<Vec<AuditEvent>, PaymentError> {
        self.read("list audit events", |c| {
            let mut statement =
                c.prepare_cached("SELECT record FROM audit_events WHERE agent_id = ?1 ORDER BY at, event_id")?;
            let rows = statement.query_map([agent_id], |row| row.get::<_, String>(0))?;
            rows.map(|row| from_json(&row?)).collect()
        })
        .await
    }

    async fn request_approval(&self, commit: &ApprovalRequestCommit) -> Result<Transition, PaymentError> {
        self.write("request approval", |tx| {
            let mut record = match held_record(tx, &commit.fence)? {
                Ok(record) => record,
                Err(holder) => return Ok(Transition::Fenced(holder)),
            };
            if let Some(refused) = request_check(get_approval(tx, &commit.record.id)?.as_ref(), commit) {
                return Ok(refused);
            }
            record.lease_expires_at = record.lease_expires_at.max(commit.lease_until);
            record.updated_at = commit.record.requested_at;
            put_idempotency(tx, &record)?;
            put_approval(tx, &commit.record)?;
            put_audit(tx, &commit.audit)?;
            Ok(Transition::Applied)
        })
        .await
    }

    async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, PaymentError> {
        self.read("read approval", |c| get_approval(c, id)).await
    }

    async fn approvals(&self, since: Timestamp, until: Timestamp) -> Result<Vec<ApprovalRecord>, PaymentError> {
        self.read("list approvals", |c| {
            let mut statement = c.prepare_cached(
                "SELECT record FROM approvals WHERE requested_at >= ?1 AND requested_at <= ?2
                 ORDER BY requested_at DESC, id LIMIT ?3",
            )?;
            let limit = agentpay_core::approval::MAX_LISTED as i64;
            let rows =
                statement.query_map(params![since.millis(), until.millis(), limit], |row| row.get::<_, String>(0))?;
            rows.map(|row| from_json(&row?)).collect()
        })
        .await
    }

    async fn decide_approval(&self, commit: &ApprovalDecisionCommit) -> Result<Transition, PaymentError> {
        self.write("decide approval", |tx| {
            let Some(stored) = get_approval(tx, commit.id())? else {
                return Ok(Transition::Refused("no such approval".into()));
            };
            Ok(match decision_check(&stored, commit) {
                Some(refused) => refused,
                None => {
                    put_approval(tx, &commit.decided)?;
                    put_audit(tx, &commit.audit)?;
                    Transition::Applied
                }
            })
        })
        .await
    }
}

#[async_trait]
impl IssuedProofs for SqliteStore {
    async fn issued(&self, client_token: &str) -> Result<Option<IssuedProof>, PaymentError> {
        self.read("read issued proof", |c| {
            c.prepare_cached("SELECT record FROM issued_proofs WHERE client_token = ?1")?
                .query_row([client_token], |row| row.get::<_, String>(0))
                .optional()?
                .map(|text| from_json(&text))
                .transpose()
        })
        .await
    }

    async fn record_issued(&self, client_token: &str, proof: &IssuedProof) -> Result<IssuedProof, PaymentError> {
        self.write("record issued proof", |tx| {
            tx.prepare_cached(
                "INSERT INTO issued_proofs (client_token, record) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )?
            .execute(params![client_token, to_json(proof)?])?;
            let stored: String = tx
                .prepare_cached("SELECT record FROM issued_proofs WHERE client_token = ?1")?
                .query_row([client_token], |row| row.get(0))?;
            from_json(&stored)
        })
        .await
    }
}

#[async_trait]
impl ExecutionStore for SqliteStore {
    async fn create_execution(&self, record: &ExecutionRecord) -> Result<bool, PaymentError> {
        self.write("create execution", |tx| {
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO executions (execution_id, name, status, agent_id, started_at, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                )?
                .execute(params![
                    record.execution_id,
                    record.name,
                    record.status.as_str(),
                    record.agent_id,
                    record.started_at.millis(),
                    to_json(record)?
                ])?;
            Ok(inserted == 1)
        })
        .await
    }

    async fn update_execution(&self, record: &ExecutionRecord) -> Result<(), PaymentError> {
        // Encoded before the write lock is taken: the lock is held only for SQLite's work.
        let text = to_json(record).map_err(|e| PaymentError::store("update execution", e))?;
        self.write("update execution", |tx| update_execution_row(tx, record, &text)).await
    }

    async fn finish_execution(&self, record: &ExecutionRecord, events: &[HistoryEvent]) -> Result<(), PaymentError> {
        let text = to_json(record).map_err(|e| PaymentError::store("finish execution", e))?;
        let events = encode_history(events).map_err(|e| PaymentError::store("finish execution", e))?;
        self.write("finish execution", |tx| {
            insert_history(tx, &record.execution_id, &events)?;
            update_execution_row(tx, record, &text)
        })
        .await
    }

    async fn execution(&self, id_or_name: &str) -> Result<Option<ExecutionRecord>, PaymentError> {
        self.read("read execution", |c| {
            c.prepare_cached("SELECT record FROM executions WHERE execution_id = ?1 OR name = ?1")?
                .query_row([id_or_name], |row| row.get::<_, String>(0))
                .optional()?
                .map(|text| from_json(&text))
                .transpose()
        })
        .await
    }

    async fn list_executions(&self, filter: &ExecutionFilter) -> Result<Vec<ExecutionRecord>, PaymentError> {
        self.read("list executions", |c| {
            let mut statement = c.prepare_cached(
                "SELECT record FROM executions
                 WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR agent_id = ?2) AND (?3 IS NULL OR started_at >= ?3)
                 ORDER BY started_at DESC, execution_id LIMIT ?4",
            )?;
            let rows = statement.query_map(
                params![
                    filter.status.map(|s| s.as_str()),
                    filter.agent_id,
                    filter.since.map(|s| s.millis()),
                    filter.limit.map_or(-1, i64::from)
                ],
                |row| row.get::<_, String>(0),
            )?;
            rows.map(|row| from_json(&row?)).collect()
        }).await
    }

    async fn append_history(&self, execution_id: &str, events: &[HistoryEvent]) -> Result<(), PaymentError> {
        let events = encode_history(events).map_err(|e| PaymentError::store("append history", e))?;
        self.write("append history", |tx| insert_history(tx, execution_id, &events)).await
    }

    async fn history(&self, execution_id: &str) -> Result<Vec<HistoryEvent>, PaymentError> {
        self.read("read history", |c| {
            let mut statement =
                c.prepare_cached("SELECT record FROM execution_history WHERE execution_id = ?1 ORDER BY seq")?;
            let rows = statement.query_map([execution_id], |row| row.get::<_, String>(0))?;
            rows.map(|row| from_json(&row?)).collect()
        })
        .await
        // Stored compacted by the runner (`asl::history`): as recorded.
        .map(agentpay_core::asl::history::expand)
    }
}

/// Adds one payment to each of its history scopes and drops the days no lookback can reach,
/// so an agent's history stays bounded (`MAX_LOOKBACK_DAYS` rows per scope).
fn add_history(tx: &Connection, agent_id: &str, entry: &HistoryEntry) -> SqlResult<()> {
    let oldest = entry.day.saturating_sub(MAX_LOOKBACK_DAYS - 1);
    for scope in &entry.scopes {
        tx.prepare_cached(
            "INSERT INTO spend_history (agent_id, scope, day, total, payments) VALUES (?1, ?2, ?3, ?4, 1)
             ON CONFLICT (agent_id, scope, day) DO UPDATE SET total = total + excluded.total, payments = payments + 1",
        )?
        .execute(params![agent_id, scope, entry.day, entry.amount.to_i64()])?;
        tx.prepare_cached("DELETE FROM spend_history WHERE agent_id = ?1 AND scope = ?2 AND day < ?3")?
            .execute(params![agent_id, scope, oldest])?;
    }
    Ok(())
}

/// The sum of (total, payments) rows; None if it does not fit an amount.
fn sum_history(mut rows: impl Iterator<Item = (i64, i64)>) -> Option<SpendHistory> {
    rows.try_fold(SpendHistory::default(), |sum, (total, payments)| {
        Some(SpendHistory {
            total: sum.total.checked_add(AtomicAmount::from_i64(total)?)?,
            count: sum.count.checked_add(u64::try_from(payments).ok()?)?,
        })
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn insert(tx: &Connection, id: u32) -> SqlResult<()> {
        tx.prepare_cached("INSERT INTO issued_proofs (client_token, record) VALUES (?1, '{}')")?
            .execute(params![format!("token-{id}")])?;
        Ok(())
    }

    fn committed_rows(path: &Path) -> Vec<String> {
        let fresh = Connection::open(path).unwrap();
        let mut statement = fresh.prepare("SELECT client_token FROM issued_proofs ORDER BY client_token").unwrap();
        statement.query_map([], |row| row.get(0)).unwrap().map(Result::unwrap).collect()
    }

    /// Concurrent writes share commits; one that fails is rolled back alone, one that panics
    /// too (and its caller sees the panic); every acknowledged write is on disk for a new
    /// connection to read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_keeps_each_write_atomic_and_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        let tasks: Vec<_> = (0..200u32)
            .map(|id| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .write("test", |tx| {
                            insert(tx, id)?;
                            match id % 10 {
                                // Its row was written, then the write failed: none of it stays.
                                3 => Err(rusqlite::Error::InvalidQuery),
                                7 => panic!("a write that panics half-way"),
                                _ => Ok(id),
                            }
                        })
                        .await
                })
            })
            .collect();
        let (mut ok, mut failed, mut panicked) = (0, 0, 0);
        for task in tasks {
            match task.await {
                Ok(Ok(_)) => ok += 1,
                Ok(Err(error)) => {
                    assert_eq!(error.name(), "StoreUnavailable", "{error}");
                    failed += 1;
                }
                Err(join) if join.is_panic() => panicked += 1,
                Err(other) => panic!("{other}"),
            }
        }
        assert_eq!((ok, failed, panicked), (160, 20, 20));
        let rows = committed_rows(&path);
        assert_eq!(rows.len(), 160, "exactly the acknowledged writes are committed");
        assert!(rows.iter().all(|t| !t.ends_with('3') && !t.ends_with('7')), "{rows:?}");
        let stats = store.commit_stats().await;
        assert_eq!(stats.writes, 200);
        assert!(stats.commits < stats.writes, "concurrent writes shared commits: {stats:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_whose_caller_stops_waiting_is_still_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        let held = store.writer.lock().await;
        // Boxed, so that dropping it drops the future (and its place in the lock's queue).
        let mut write = Box::pin(store.write("test", |tx| insert(tx, 1)));
        assert!(futures_poll_once(write.as_mut()).await.is_none(), "queued behind the held lock");
        // Another writer queues behind it.
        let other = tokio::spawn({
            let store = store.clone();
            async move { store.write("test", |tx| insert(tx, 2)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        drop(held);
        // The first write runs; its caller may stop waiting before its batch commits.
        let finished = futures_poll_once(write.as_mut()).await;
        drop(write);
        other.await.unwrap().unwrap();
        if let Some(result) = finished {
            result.unwrap();
        }
        assert_eq!(committed_rows(&path), ["token-1", "token-2"], "both committed, the abandoned one included");
        assert!(store.writer.lock().await.batch.is_none(), "no batch left open");
    }

    /// Polls `future` once, returning its output if it was ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(future: F) -> Option<F::Output> {
        let mut future = future;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(value) => Some(value),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
