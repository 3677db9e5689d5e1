//! The embedded store: one SQLite file (rusqlite, bundled), every write one transaction.
//!
//! Records are kept as JSON next to the columns conditions need, so the conditions read
//! like the DynamoDB ones. `BEGIN IMMEDIATE` takes the write lock up front, so concurrent
//! processes on the same file serialise instead of failing half-way; the version checks
//! still guard against a decision made on a stale read.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use agentpay_core::clock::Timestamp;
use agentpay_core::error::PaymentError;
use agentpay_core::executions::{ExecutionFilter, ExecutionRecord, ExecutionStore, HistoryEvent};
use agentpay_core::policy::{AgentLedger, SpendPolicy};
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
    connection: Mutex<Connection>,
}

type SqlResult<T> = Result<T, rusqlite::Error>;

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, PaymentError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| PaymentError::store("create store directory", e))?;
        }
        Self::init(Connection::open(path).map_err(|e| PaymentError::store("open store", e))?)
    }

    pub fn in_memory() -> Result<Self, PaymentError> {
        Self::init(Connection::open_in_memory().map_err(|e| PaymentError::store("open store", e))?)
    }

    fn init(connection: Connection) -> Result<Self, PaymentError> {
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
        Ok(Self { connection: Mutex::new(connection) })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the transaction rolls back).
        self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `work` in one IMMEDIATE transaction; commits only if it returns Ok.
    fn write<T>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&rusqlite::Transaction) -> SqlResult<T>,
    ) -> Result<T, PaymentError> {
        let mut connection = self.lock();
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| PaymentError::store(operation, e))?;
        let value = work(&transaction).map_err(|e| PaymentError::store(operation, e))?;
        transaction.commit().map_err(|e| PaymentError::store(operation, e))?;
        Ok(value)
    }

    fn read<T>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&Connection) -> SqlResult<T>,
    ) -> Result<T, PaymentError> {
        work(&self.lock()).map_err(|e| PaymentError::store(operation, e))
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
    tx.query_row("SELECT record FROM idempotency WHERE key = ?1", [key], |row| row.get::<_, String>(0))
        .optional()?
        .map(|text| from_json(&text))
        .transpose()
}

fn put_idempotency(tx: &Connection, record: &IdempotencyRecord) -> SqlResult<()> {
    tx.execute(
        "INSERT INTO idempotency (key, status, fingerprint, execution_id, attempt, expires_at, record)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (key) DO UPDATE SET status = excluded.status, fingerprint = excluded.fingerprint,
           execution_id = excluded.execution_id, attempt = excluded.attempt, expires_at = excluded.expires_at,
           record = excluded.record",
        params![
            record.key,
            record.status.as_str(),
            record.fingerprint,
            record.execution_id,
            record.attempt,
            record.expires_at.millis(),
            to_json(record)?
        ],
    )?;
    Ok(())
}

fn get_ledger(tx: &Connection, agent_id: &str) -> SqlResult<AgentLedger> {
    let row = tx
        .query_row("SELECT version, policy, window FROM agents WHERE agent_id = ?1", [agent_id], |row| {
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
    tx.execute(
        "INSERT INTO agents (agent_id, version, policy, window) VALUES (?1, 0, NULL, ?2)
         ON CONFLICT (agent_id) DO UPDATE SET window = excluded.window",
        params![agent_id, to_json(&next)?],
    )?;
    Ok(Ok(()))
}

fn get_reservation(tx: &Connection, agent_id: &str, id: &str) -> SqlResult<Option<Reservation>> {
    tx.query_row("SELECT record FROM reservations WHERE agent_id = ?1 AND id = ?2", [agent_id, id], |row| {
        row.get::<_, String>(0)
    })
    .optional()?
    .map(|text| from_json(&text))
    .transpose()
}

fn put_reservation(tx: &Connection, reservation: &Reservation) -> SqlResult<()> {
    tx.execute(
        "INSERT INTO reservations (id, agent_id, status, created_at, record) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (agent_id, id) DO UPDATE SET status = excluded.status, record = excluded.record",
        params![
            reservation.id,
            reservation.agent_id,
            reservation.status.as_str(),
            reservation.created_at.millis(),
            to_json(reservation)?
        ],
    )?;
    Ok(())
}

fn put_audit(tx: &Connection, event: &AuditEvent) -> SqlResult<()> {
    // The id is deterministic: a retried write of the same event is a no-op.
    tx.execute(
        "INSERT INTO audit_events (event_id, agent_id, at, record) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
        params![event.event_id, event.agent_id, event.at.millis(), to_json(event)?],
    )?;
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
    }

    async fn idempotency(&self, key: &str, now: Timestamp) -> Result<Option<IdempotencyRecord>, PaymentError> {
        let record = self.read("read idempotency key", |c| get_idempotency(c, key))?;
        Ok(record.filter(|r| !r.is_expired(now)))
    }

    async fn agent_ledger(&self, agent_id: &str) -> Result<AgentLedger, PaymentError> {
        self.read("read agent ledger", |c| get_ledger(c, agent_id))
    }

    async fn agent_and_key(
        &self,
        agent_id: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<(AgentLedger, Option<IdempotencyRecord>), PaymentError> {
        let (ledger, record) =
            self.read("read agent and key", |c| Ok((get_ledger(c, agent_id)?, get_idempotency(c, key)?)))?;
        Ok((ledger, record.filter(|r| !r.is_expired(now))))
    }

    async fn put_policy(&self, agent_id: &str, policy: &SpendPolicy) -> Result<(), PaymentError> {
        self.write("set policy", |tx| {
            let ledger = get_ledger(tx, agent_id)?;
            let version = ledger.version + 1;
            let window = SpendWindow { policy_version: version, seq: ledger.window.seq + 1, ..ledger.window };
            tx.execute(
                "INSERT INTO agents (agent_id, version, policy, window) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (agent_id) DO UPDATE SET policy = excluded.policy, version = excluded.version, window = excluded.window",
                params![agent_id, i64::try_from(version).unwrap_or(i64::MAX), to_json(policy)?, to_json(&window)?],
            )?;
            Ok(())
        })
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
    }

    async fn reservation(&self, agent_id: &str, id: &str) -> Result<Option<Reservation>, PaymentError> {
        self.read("read reservation", |c| get_reservation(c, agent_id, id))
    }

    async fn reservations(&self, agent_id: &str) -> Result<Vec<Reservation>, PaymentError> {
        self.read("list reservations", |c| {
            let mut statement =
                c.prepare("SELECT record FROM reservations WHERE agent_id = ?1 ORDER BY created_at, id")?;
            let rows = statement.query_map([agent_id], |row| row.get::<_, String>(0))?;
            rows.map(|row| from_json(&row?)).collect()
        })
    }

    async fn authorize(&self, commit: &AuthorizationCommit) -> Result<Transition, PaymentError> {
        self.write("record ledger", |tx| {
            let Some(mut reservation) = get_reservation(tx, &commit.audit.agent_id, &commit.reservation_id)? else {
                return Ok(Transition::Refused("no such reservation".into()));
            };
            match reservation.status {
                ReservationStatus::Reserved => {}
                ReservationStatus::Authorized | ReservationStatus::Settled
                    if reservation.payment_id.as_deref() == Some(&commit.payment_id) =>
                {
                    return Ok(Transition::AlreadyApplied);
                }
                other => {
                    return Ok(Transition::Refused(format!("reservation is {}", other.as_str())));
                }
            }
            let mut record = match held_record(tx, &commit.fence)? {
                Ok(record) => record,
                Err(holder) => return Ok(Transition::Fenced(holder)),
            };
            reservation.status = ReservationStatus::Authorized;
            reservation.payment_id = Some(commit.payment_id.clone());
            reservation.updated_at = commit.now;
            put_reservation(tx, &reservation)?;
            record.status = IdempotencyStatus::Completed;
            record.result = Some(commit.result.clone());
            record.updated_at = commit.now;
            record.expires_at = commit.expires_at;
            put_idempotency(tx, &record)?;
            put_audit(tx, &commit.audit)?;
            Ok(Transition::Applied)
        })
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
    }

    async fn settle(&self, reservation_id: &str, audit: &AuditEvent) -> Result<Transition, PaymentError> {
        self.write("settle", |tx| {
            let Some(mut reservation) = get_reservation(tx, &audit.agent_id, reservation_id)? else {
                return Ok(Transition::Refused("no such reservation".into()));
            };
            match reservation.status {
                ReservationStatus::Authorized => {
                    reservation.status = ReservationStatus::Settled;
                    reservation.updated_at = audit.at;
                    put_reservation(tx, &reservation)?;
                    put_audit(tx, audit)?;
                    Ok(Transition::Applied)
                }
                ReservationStatus::Settled => Ok(Transition::AlreadyApplied),
                other => Ok(Transition::Refused(format!("reservation is {}", other.as_str()))),
            }
        })
    }

    async fn audit_events(&self, agent_id: &str) -> Result<Vec<AuditEvent>, PaymentError> {
        self.read("list audit events", |c| {
            let mut statement =
                c.prepare("SELECT record FROM audit_events WHERE agent_id = ?1 ORDER BY at, event_id")?;
            let rows = statement.query_map([agent_id], |row| row.get::<_, String>(0))?;
            rows.map(|row| from_json(&row?)).collect()
        })
    }
}

#[async_trait]
impl IssuedProofs for SqliteStore {
    async fn issued(&self, client_token: &str) -> Result<Option<IssuedProof>, PaymentError> {
        self.read("read issued proof", |c| {
            c.query_row("SELECT record FROM issued_proofs WHERE client_token = ?1", [client_token], |row| {
                row.get::<_, String>(0)
            })
            .optional()?
            .map(|text| from_json(&text))
            .transpose()
        })
    }

    async fn record_issued(&self, client_token: &str, proof: &IssuedProof) -> Result<IssuedProof, PaymentError> {
        self.write("record issued proof", |tx| {
            tx.execute(
                "INSERT INTO issued_proofs (client_token, record) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![client_token, to_json(proof)?],
            )?;
            let stored: String =
                tx.query_row("SELECT record FROM issued_proofs WHERE client_token = ?1", [client_token], |row| {
                    row.get(0)
                })?;
            from_json(&stored)
        })
    }
}

#[async_trait]
impl ExecutionStore for SqliteStore {
    async fn create_execution(&self, record: &ExecutionRecord) -> Result<bool, PaymentError> {
        self.write("create execution", |tx| {
            let inserted = tx.execute(
                "INSERT INTO executions (execution_id, name, status, agent_id, started_at, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                params![
                    record.execution_id,
                    record.name,
                    record.status.as_str(),
                    record.agent_id,
                    record.started_at.millis(),
                    to_json(record)?
                ],
            )?;
            Ok(inserted == 1)
        })
    }

    async fn update_execution(&self, record: &ExecutionRecord) -> Result<(), PaymentError> {
        self.write("update execution", |tx| {
            tx.execute(
                "UPDATE executions SET status = ?2, record = ?3 WHERE execution_id = ?1",
                params![record.execution_id, record.status.as_str(), to_json(record)?],
            )?;
            Ok(())
        })
    }

    async fn execution(&self, id_or_name: &str) -> Result<Option<ExecutionRecord>, PaymentError> {
        self.read("read execution", |c| {
            c.query_row("SELECT record FROM executions WHERE execution_id = ?1 OR name = ?1", [id_or_name], |row| {
                row.get::<_, String>(0)
            })
            .optional()?
            .map(|text| from_json(&text))
            .transpose()
        })
    }

    async fn list_executions(&self, filter: &ExecutionFilter) -> Result<Vec<ExecutionRecord>, PaymentError> {
        self.read("list executions", |c| {
            let mut statement = c.prepare(
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
        })
    }

    async fn append_history(&self, execution_id: &str, events: &[HistoryEvent]) -> Result<(), PaymentError> {
        self.write("append history", |tx| {
            let mut statement =
                tx.prepare_cached("INSERT INTO execution_history (execution_id, seq, record) VALUES (?1, ?2, ?3)")?;
            for event in events {
                statement.execute(params![execution_id, event.seq, to_json(event)?])?;
            }
            Ok(())
        })
    }

    async fn history(&self, execution_id: &str) -> Result<Vec<HistoryEvent>, PaymentError> {
        self.read("read history", |c| {
            let mut statement =
                c.prepare("SELECT record FROM execution_history WHERE execution_id = ?1 ORDER BY seq")?;
            let rows = statement.query_map([execution_id], |row| row.get::<_, String>(0))?;
            rows.map(|row| from_json(&row?)).collect()
        })
    }
}
