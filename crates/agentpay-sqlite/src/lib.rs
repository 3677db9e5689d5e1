//! The embedded store: one SQLite file (rusqlite, bundled), every write atomic (a savepoint
//! of a group commit) and durable before it is answered.
//!
//! One thread owns the write connection (`write_loop`): callers send it writes and wait for
//! their batch's commit, so async workers never block on SQLite's fsync. Reads run on the
//! caller's thread from a pool of read connections, which see only committed writes.
//!
//! Records are kept as JSON next to the columns conditions need, so the conditions read
//! like the DynamoDB ones. `BEGIN IMMEDIATE` takes the write lock up front, so concurrent
//! processes on the same file serialise instead of failing half-way; the version checks
//! still guard against a decision made on a stale read.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
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
CREATE TABLE IF NOT EXISTS sweep_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1), last_reconciled TEXT NOT NULL);
"#;

/// An execution's history: one row per append, its events as a JSON array (`insert_history`).
const HISTORY_TABLE: &str = "CREATE TABLE IF NOT EXISTS execution_history (
    execution_id TEXT NOT NULL, seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, events TEXT NOT NULL,
    PRIMARY KEY (execution_id, seq));";

/// Version 3's history (one row per event) into version 4's, after `HISTORY_TABLE` was created
/// beside it; `migrate_3_to_4` runs both in one transaction with the version change.
const MIGRATE_3_TO_4: &str = r#"
INSERT INTO execution_history (execution_id, seq, last_seq, events)
    SELECT execution_id, seq, seq, '[' || record || ']' FROM execution_history_v3;
DROP TABLE execution_history_v3;
PRAGMA user_version = 4;
"#;

/// Bumped when a table's shape changes; an older file is refused with a message (a version 3
/// file is converted, in one transaction), never half-migrated. 2: reservations keyed by
/// (agent, id), as in DynamoDB. 3: the window as hour and minute rings
/// (`agentpay_core::window`), not minute buckets. 4: execution history as one row per append
/// (the events a runner flushes together), not one per event — a payment's 24 events were 24
/// rows and 24 index entries, now ~5.
const SCHEMA_VERSION: i64 = 4;

pub struct SqliteStore {
    /// Writes go to one thread that owns the write connection (see `writer`).
    requests: Option<tokio::sync::mpsc::Sender<Request>>,
    writer: Option<std::thread::JoinHandle<()>>,
    stats: Arc<Mutex<CommitStats>>,
    /// Why a write nobody waited to see committed (deferred, or answered early) was lost, once
    /// one has: the store stops taking writes rather than go on past a hole (`unsettled`).
    lost: Arc<Mutex<Option<String>>>,
    /// Deferred and early-answered writes sent and not yet committed: a read of what deferred
    /// writes write waits for them; `durable` waits for all of them.
    unsettled: Arc<std::sync::atomic::AtomicU64>,
    /// The keys (`pending_key`) that early-answered writes not yet committed wrote, and how
    /// many such writes each has: a read of one waits for their commit first (`read_key`).
    pending: Arc<Mutex<HashMap<String, u32>>>,
    /// File stores read on the caller's thread from a small pool of connections: WAL lets them
    /// read while a batch is open and shows them only committed writes. An in-memory store has
    /// one connection, the writer's, and reads go to its thread too.
    readers: Option<ReaderPool>,
}

/// Writes and commits since the store was opened: writes per commit is the group commit's gain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    pub writes: u64,
    pub commits: u64,
    /// Time the writer spent running writes, and committing.
    pub write_time: Duration,
    pub commit_time: Duration,
}

/// Writes one batch holds at most: bounds how long one commit keeps its members waiting.
const MAX_BATCH: usize = 256;
/// Requests queued for the writer at most; a caller beyond waits for room (back-pressure).
const MAX_QUEUED: usize = 1024;
/// Idle read connections kept; more are opened under load and closed when given back.
const MAX_IDLE_READERS: usize = 4;
/// Prepared statements kept per connection: more than the store's distinct statements, so none
/// is compiled again (rusqlite keeps 16 by default; a payment uses about 30).
const STATEMENT_CACHE: usize = 64;

type SqlResult<T> = Result<T, rusqlite::Error>;

/// Work for the writer thread.
enum Request {
    /// A write: run in its own savepoint of the open batch; `Settle` answers the caller once
    /// the batch is committed (or rolled back).
    /// Given no connection when its batch could not be opened: it answers without running.
    Write(WriteJob),
    /// A read on the writer's connection (in-memory stores only).
    Read(Box<dyn FnOnce(&Connection) + Send>),
}

/// A write that ran: whether to keep it, and how to answer its caller once the batch ends.
struct Written {
    keep: bool,
    /// Set when the write failed and nobody waits to hear it (a deferred write): why. Its
    /// batch then commits nothing (`Batch::run`).
    hole: Option<String>,
    settle: Settle,
}

/// A write's answer to its caller: its value (or error, or panic; none if it was not run), and
/// the batch's commit.
type WriteAnswer<T> = (Option<std::thread::Result<SqlResult<T>>>, Result<(), Arc<str>>);

/// An early-answered write's answer (`write_early`): its value, error or panic, or why it was
/// not run.
type EarlyAnswer<T> = Result<std::thread::Result<SqlResult<T>>, Arc<str>>;

/// A write for the writer thread (given no connection when its batch could not be opened).
type WriteJob = Box<dyn FnOnce(Option<&Connection>) -> Written + Send>;

/// How a write's caller is answered once its batch is committed or rolled back.
type Settle = Box<dyn FnOnce(Result<(), Arc<str>>) + Send>;

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, PaymentError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| PaymentError::store("create store directory", e))?;
        }
        let writer = Self::init(Connection::open(path).map_err(|e| PaymentError::store("open store", e))?)?;
        let readers = ReaderPool { path: path.to_owned(), idle: Mutex::new(Vec::new()) };
        readers.give_back(readers.take()?);
        Self::start(writer, Some(readers))
    }

    pub fn in_memory() -> Result<Self, PaymentError> {
        let writer = Self::init(Connection::open_in_memory().map_err(|e| PaymentError::store("open store", e))?)?;
        Self::start(writer, None)
    }

    fn start(connection: Connection, readers: Option<ReaderPool>) -> Result<Self, PaymentError> {
        let (requests, queue) = tokio::sync::mpsc::channel(MAX_QUEUED);
        let stats = Arc::new(Mutex::new(CommitStats::default()));
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        let writer = std::thread::Builder::new()
            .name("agentpay-sqlite-writer".into())
            .spawn({
                let (stats, lost) = (stats.clone(), lost.clone());
                move || write_loop(connection, queue, &stats, &lost)
            })
            .map_err(|e| PaymentError::store("start the store's writer", e))?;
        Ok(Self {
            requests: Some(requests),
            writer: Some(writer),
            stats,
            lost,
            unsettled: Arc::default(),
            pending: Arc::default(),
            readers,
        })
    }

    fn init(connection: Connection) -> Result<Connection, PaymentError> {
        configure(&connection)?;
        let (version, tables): (i64, i64) = connection
            .query_row(
                "SELECT (SELECT user_version FROM pragma_user_version), (SELECT count(*) FROM sqlite_master WHERE type = 'table')",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(|e| PaymentError::store("read schema version", e))?;
        if tables > 0 && version == 3 {
            migrate_3_to_4(&connection)
                .map_err(|e| PaymentError::store("migrate the store's history to schema version 4", e))?;
        } else if tables > 0 && version != SCHEMA_VERSION {
            return Err(PaymentError::StoreRejected {
                operation: "open store",
                source: format!(
                    "this store file has schema version {version}, this agentpay needs {SCHEMA_VERSION}: move the file aside (it keeps the old ledger for reading) and start a new one"
                )
                .into(),
            });
        }
        connection
            .execute_batch(SCHEMA)
            .and_then(|()| connection.execute_batch(HISTORY_TABLE))
            .map_err(|e| PaymentError::store("create schema", e))?;
        connection
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(|e| PaymentError::store("write schema version", e))?;
        Ok(connection)
    }

    /// Runs `work` as one atomic write, durable (committed and synced to disk) before it
    /// returns. Group commit: the writer thread runs each write in its own savepoint of an
    /// open transaction — one that fails (or panics) is rolled back alone — and commits when
    /// no more writes are waiting (or the batch is full), so the writes that arrived while the
    /// previous batch was being synced share one commit and one fsync. If the commit fails,
    /// every member fails. A caller that stops waiting does not undo its write: it is committed
    /// with its batch.
    async fn write<T: Send + 'static>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&Connection) -> SqlResult<T> + Send + 'static,
    ) -> Result<T, PaymentError> {
        let (answer, answered) = tokio::sync::oneshot::channel::<WriteAnswer<T>>();
        let request = write_request(work, None, move |settled| {
            // The caller may have stopped waiting: nobody to tell.
            let _ = answer.send(settled);
        });
        self.refuse_after_loss(operation)?;
        self.send(operation, request).await?;
        let (outcome, committed) = answered.await.map_err(|_| writer_gone(operation))?;
        // An earlier unsettled write failed (its failure was recorded first): report it here.
        self.refuse_after_loss(operation)?;
        match outcome {
            Some(Ok(Ok(value))) => committed.map(|()| value).map_err(|why| {
                PaymentError::store(operation, format!("commit failed (the write is not recorded): {why}"))
            }),
            Some(Ok(Err(error))) => Err(PaymentError::store(operation, error)),
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Err(PaymentError::store(
                operation,
                format!("not run: {}", committed.err().unwrap_or_else(|| "no transaction".into())),
            )),
        }
    }

    /// As `write`, answered as soon as the write has run in its batch, before the batch
    /// commits: the caller goes on while the batch collects the writes of other callers.
    /// Durability is then owed to whoever sees the outcome outside this process (the output
    /// commit rule of external synchrony): the write is durable before any write sent after it
    /// is acknowledged (one writer, batches in order), and before `durable` returns. So a
    /// caller may take an early answer only when a waited write or `durable` stands between
    /// it and anything that leaves the process (a provider call, an execution's result, a
    /// step's output); the writes that qualify are listed in the README's storage section.
    /// `keys` (`pending_key`) name what the write writes: until it commits, a read of one of
    /// them waits for the commit (`read_key`), so the store reads its own writes while its pool
    /// shows only committed data. If the commit fails, the store refuses every later write
    /// ("lost"), so that next waited write fails and nothing built on this one leaves.
    async fn write_early<T: Send + 'static>(
        &self,
        operation: &'static str,
        keys: Vec<String>,
        work: impl FnOnce(&Connection) -> SqlResult<T> + Send + 'static,
    ) -> Result<T, PaymentError> {
        self.refuse_after_loss(operation)?;
        let (answer, answered) = tokio::sync::oneshot::channel::<EarlyAnswer<T>>();
        let counted = self.unsettled(operation);
        let pending = self.pending.clone();
        adjust_pending(&pending, &keys, true);
        let unsettled = move |failure| {
            // After the commit (or its failure, which stops the store): reads may use the pool.
            adjust_pending(&pending, &keys, false);
            counted(failure);
        };
        let request = Request::Write(Box::new(move |connection: Option<&Connection>| {
            let Some(connection) = connection else {
                // Not run (its batch could not be opened): the caller hears why at its end.
                return Written {
                    keep: false,
                    hole: None,
                    settle: Box::new(move |committed| {
                        unsettled(None);
                        let _ = answer.send(Err(committed.err().unwrap_or_else(|| "no transaction".into())));
                    }),
                };
            };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(connection)));
            let keep = matches!(outcome, Ok(Ok(_)));
            // The caller may have stopped waiting: the write still commits with its batch.
            let _ = answer.send(Ok(outcome));
            // A failure is answered to the caller, who acts on it: not a hole.
            Written {
                keep,
                hole: None,
                settle: Box::new(move |committed| {
                    unsettled(committed.err().filter(|_| keep).map(|why| format!("commit failed: {why}")));
                }),
            }
        }));
        self.send_unsettled(operation, request).await?;
        let outcome = answered.await.map_err(|_| writer_gone(operation))?;
        // An earlier unsettled write failed (its failure was recorded first): report it here.
        self.refuse_after_loss(operation)?;
        match outcome {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(error))) => Err(PaymentError::store(operation, error)),
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(why) => Err(PaymentError::store(operation, format!("not run: {why}"))),
        }
    }

    /// As `write`, without waiting for the commit: the write is in the queue when this returns,
    /// and commits with its batch, before any write sent after it is acknowledged (one writer,
    /// batches in order). If it fails, the store refuses every later write ("lost") — a
    /// process restart resumes from what is durable, as after a crash.
    async fn write_deferred(
        &self,
        operation: &'static str,
        work: impl FnOnce(&Connection) -> SqlResult<()> + Send + 'static,
    ) -> Result<(), PaymentError> {
        self.refuse_after_loss(operation)?;
        let unsettled = self.unsettled(operation);
        let request = write_request(work, Some(operation), move |(outcome, committed)| {
            unsettled(match (outcome, committed) {
                (Some(Ok(Ok(()))), Ok(())) => None,
                (Some(Ok(Ok(()))), Err(why)) => Some(format!("commit failed: {why}")),
                (Some(Ok(Err(error))), _) => Some(error.to_string()),
                (Some(Err(_)), _) => Some("it panicked".to_owned()),
                (None, _) => Some("it was not run".to_owned()),
            });
        });
        self.send_unsettled(operation, request).await
    }

    /// Counts a write nobody waits to see committed until its batch ends; the returned
    /// function is called then, with why the write was lost if it was.
    fn unsettled(&self, operation: &'static str) -> impl FnOnce(Option<String>) + Send + 'static {
        let lost = self.lost.clone();
        let unsettled = self.unsettled.clone();
        unsettled.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        move |failure| {
            unsettled.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            if let Some(failure) = failure {
                let mut lost = lost.lock().unwrap_or_else(|p| p.into_inner());
                lost.get_or_insert(format!("{operation}: {failure}"));
            }
        }
    }

    /// Sends a request made with `unsettled`; one the writer never got is not counted.
    async fn send_unsettled(&self, operation: &'static str, request: Request) -> Result<(), PaymentError> {
        let sent = self.send(operation, request).await;
        if sent.is_err() {
            self.unsettled.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
        sent
    }

    /// As `read`, after the commit of any early-answered write of `key` (a `pending_key`).
    async fn read_key<T: Send + 'static>(
        &self,
        operation: &'static str,
        key: &str,
        work: impl FnOnce(&Connection) -> SqlResult<T> + Send + 'static,
    ) -> Result<T, PaymentError> {
        let waiting = self.pending.lock().unwrap_or_else(|p| p.into_inner()).contains_key(key);
        if waiting {
            self.settle(operation).await?;
        }
        self.read(operation, work).await
    }

    /// Waits until every deferred or early-answered write sent so far is committed (a no-op
    /// write queued behind them is answered only after their batch commits).
    async fn settle(&self, operation: &'static str) -> Result<(), PaymentError> {
        if self.unsettled.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return Ok(());
        }
        self.write(operation, |_| Ok(())).await
    }

    fn refuse_after_loss(&self, operation: &'static str) -> Result<(), PaymentError> {
        match &*self.lost.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(why) => Err(PaymentError::store(
                operation,
                format!("{}; this store takes no more writes: restart to resume from what is durable", lost_write(why)),
            )),
            None => Ok(()),
        }
    }

    async fn send(&self, operation: &'static str, request: Request) -> Result<(), PaymentError> {
        let requests = self.requests.as_ref().ok_or_else(|| writer_gone(operation))?;
        requests.send(request).await.map_err(|_| writer_gone(operation))
    }

    /// Writes and commits so far (benches report writes per commit).
    pub fn commit_stats(&self) -> CommitStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn read<T: Send + 'static>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&Connection) -> SqlResult<T> + Send + 'static,
    ) -> Result<T, PaymentError> {
        match &self.readers {
            Some(readers) => {
                let connection = readers.take()?;
                let value = work(&connection);
                readers.give_back(connection);
                value.map_err(|e| PaymentError::store(operation, e))
            }
            None => {
                let (answer, answered) = tokio::sync::oneshot::channel();
                let request = Request::Read(Box::new(move |connection| {
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(connection)));
                    let _ = answer.send(outcome);
                }));
                self.send(operation, request).await?;
                match answered.await.map_err(|_| writer_gone(operation))? {
                    Ok(value) => value.map_err(|e| PaymentError::store(operation, e)),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        }
    }
}

impl Drop for SqliteStore {
    /// Closes the queue and waits for the writer to finish what was sent: every write a caller
    /// sent is committed (or failed) before the store is gone.
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// A write for the writer thread: runs `work` (catching a panic), keeps it if it succeeded, and
/// hands `settled` its outcome with the batch's commit. `unwaited` names the operation of a
/// write nobody waits on: its failure is a hole its batch must not commit past.
fn write_request<T: Send + 'static>(
    work: impl FnOnce(&Connection) -> SqlResult<T> + Send + 'static,
    unwaited: Option<&'static str>,
    settled: impl FnOnce(WriteAnswer<T>) + Send + 'static,
) -> Request {
    Request::Write(Box::new(move |connection: Option<&Connection>| {
        let outcome = connection.map(|c| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(c))));
        let hole = match (&outcome, unwaited) {
            (Some(Ok(Err(error))), Some(operation)) => Some(format!("{operation}: {error}")),
            (Some(Err(_)), Some(operation)) => Some(format!("{operation}: it panicked")),
            _ => None,
        };
        Written {
            keep: matches!(outcome, Some(Ok(Ok(_)))),
            hole,
            settle: Box::new(move |committed| settled((outcome, committed))),
        }
    }))
}

/// The name under which an early-answered write marks what it wrote (`write_early`), for the
/// reads that look it up by that name: `kind` is `idempotency`, `execution` or `issued`.
fn pending_key(kind: &str, name: &str) -> String {
    format!("{kind}:{name}")
}

/// Counts `keys` in (`add`) or out of the pending map; a key at zero leaves it.
fn adjust_pending(pending: &Mutex<HashMap<String, u32>>, keys: &[String], add: bool) {
    let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
    for key in keys {
        if add {
            *pending.entry(key.clone()).or_default() += 1;
        } else if let Some(count) = pending.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                pending.remove(key);
            }
        }
    }
}

/// Why a write is refused once the store lost one nobody waited on (`lost`): said the same way
/// by callers and by the writer.
fn lost_write(why: &str) -> String {
    format!("an earlier write was lost after its caller went on ({why})")
}

fn writer_gone(operation: &'static str) -> PaymentError {
    PaymentError::store(operation, "the store's writer thread has stopped")
}

/// The writer thread: takes the first waiting request, opens a batch, adds every request
/// already queued behind it (up to `MAX_BATCH`), commits, answers the members, and again.
/// Requests that arrive during a commit's fsync form the next batch. Once a write nobody
/// waited on is `lost`, no batch is opened again: a write queued behind the hole (a claim
/// behind its execution's lost creation) is answered "not run", never committed past it.
fn write_loop(
    connection: Connection,
    mut queue: tokio::sync::mpsc::Receiver<Request>,
    stats: &Mutex<CommitStats>,
    lost: &Mutex<Option<String>>,
) {
    while let Some(first) = queue.blocking_recv() {
        let mut settles = Vec::new();
        let refused = lost.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut batch = match refused {
            Some(why) => Batch::refused(&why),
            None => Batch::open(&connection),
        };
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                Request::Read(read) => read(&connection),
                Request::Write(write) => settles.push(batch.run(&connection, write)),
            }
            if settles.len() < MAX_BATCH {
                next = queue.try_recv().ok();
            }
        }
        let committed = batch.close(&connection);
        if let Some(hole) = batch.hole.take() {
            // Recorded before any member hears of it, so every refusal names the hole itself.
            lost.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(hole);
        }
        {
            let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
            stats.writes += settles.len() as u64;
            stats.commits += u64::from(!settles.is_empty());
            stats.write_time += batch.write_time;
            stats.commit_time += batch.commit_time;
        }
        for settle in settles {
            settle(committed.clone());
        }
    }
}

/// One group commit: the writes of concurrent callers in one transaction and one fsync.
struct Batch {
    /// Why the batch could not be opened (its writes are not run) or cannot be committed.
    failed: Option<Arc<str>>,
    /// The failed write nobody waited on that made this batch fail, if one did.
    hole: Option<String>,
    write_time: Duration,
    commit_time: Duration,
}

impl Batch {
    fn open(connection: &Connection) -> Self {
        Batch {
            failed: execute(connection, "BEGIN IMMEDIATE").err(),
            hole: None,
            write_time: Duration::ZERO,
            commit_time: Duration::ZERO,
        }
    }

    /// A batch that runs nothing: the store lost a write (`write_loop`).
    fn refused(why: &str) -> Self {
        Batch {
            failed: Some(lost_write(why).into()),
            hole: None,
            write_time: Duration::ZERO,
            commit_time: Duration::ZERO,
        }
    }

    /// Runs one write in its own savepoint; gives back how to answer its caller.
    fn run(&mut self, connection: &Connection, write: WriteJob) -> Settle {
        if self.failed.is_some() {
            // Never run outside the batch's transaction: the caller hears why.
            return write(None).settle;
        }
        let began = std::time::Instant::now();
        let settle = match execute(connection, "SAVEPOINT member") {
            Ok(()) => {
                let written = write(Some(connection));
                let undone = if written.keep { Ok(()) } else { execute(connection, "ROLLBACK TO member") };
                if let Err(why) = undone.and_then(|()| execute(connection, "RELEASE member")) {
                    // A savepoint that cannot be closed leaves the batch untrustworthy.
                    self.failed = Some(why);
                }
                if let Some(hole) = written.hole {
                    // Nobody will redo that write: committing the writes after it (an
                    // execution's end after its lost history) would make the hole durable.
                    // The whole batch is rolled back, as if the process had crashed before it.
                    self.failed = Some(format!("a write nobody waits on failed in this batch ({hole})").into());
                    self.hole.get_or_insert(hole);
                }
                written.settle
            }
            Err(why) => {
                self.failed = Some(why);
                write(None).settle
            }
        };
        self.write_time += began.elapsed();
        settle
    }

    /// Commits the batch, or rolls it back if it cannot be trusted.
    fn close(&mut self, connection: &Connection) -> Result<(), Arc<str>> {
        let began = std::time::Instant::now();
        let outcome = match self.failed.clone() {
            Some(why) => Err(why),
            None => execute(connection, "COMMIT"),
        };
        if outcome.is_err() && !connection.is_autocommit() {
            let _ = connection.execute_batch("ROLLBACK");
        }
        self.commit_time += began.elapsed();
        outcome
    }
}

/// Settings of every connection, the writer's and the readers'.
fn configure(connection: &Connection) -> Result<(), PaymentError> {
    let configure = |e| PaymentError::store("configure store", e);
    connection.busy_timeout(Duration::from_secs(10)).map_err(configure)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // The query planner's stability guarantee: a statement keeps the plan it was prepared with.
    // Without it, the bundled SQLite (built with STAT4) prepares again, on every run, each
    // statement that filters on an index's first columns and orders by the next one (an
    // execution's last history row, an agent's audit events): most of the writer's time in the
    // history check went to preparing it. Plans here are index lookups that no bound value
    // changes.
    connection.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(configure)?;
    Ok(())
}

fn execute(connection: &Connection, sql: &str) -> Result<(), Arc<str>> {
    connection.prepare_cached(sql).and_then(|mut s| s.execute([])).map(drop).map_err(|e| Arc::from(e.to_string()))
}

/// Read connections for a file store, opened on demand and reused.
struct ReaderPool {
    path: std::path::PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    fn take(&self) -> Result<Connection, PaymentError> {
        if let Some(connection) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(connection);
        }
        let connection = Connection::open(&self.path).map_err(|e| PaymentError::store("open store", e))?;
        configure(&connection)?;
        Ok(connection)
    }

    fn give_back(&self, connection: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(connection);
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

/// An execution's row, encoded.
struct ExecutionRow {
    execution_id: String,
    status: &'static str,
    text: String,
}

impl ExecutionRow {
    fn of(record: &ExecutionRecord) -> SqlResult<Self> {
        Ok(Self { execution_id: record.execution_id.clone(), status: record.status.as_str(), text: to_json(record)? })
    }

    fn update(&self, tx: &Connection) -> SqlResult<()> {
        tx.prepare_cached("UPDATE executions SET status = ?2, record = ?3 WHERE execution_id = ?1")?
            .execute(params![self.execution_id, self.status, self.text])?;
        Ok(())
    }
}

/// Converts a version 3 file under the write lock, checking the version again inside it: a
/// second process that opened the same file at the same time finds it converted already.
fn migrate_3_to_4(connection: &Connection) -> SqlResult<()> {
    connection.execute_batch("BEGIN IMMEDIATE")?;
    let converted = connection
        .query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))
        .and_then(|version| match version {
            3 => connection
                .execute_batch("ALTER TABLE execution_history RENAME TO execution_history_v3")
                .and_then(|()| connection.execute_batch(HISTORY_TABLE))
                .and_then(|()| connection.execute_batch(MIGRATE_3_TO_4)),
            _ => Ok(()),
        })
        .and_then(|()| connection.execute_batch("COMMIT"));
    if converted.is_err() {
        let _ = connection.execute_batch("ROLLBACK");
    }
    converted
}

/// Events to append, encoded on the caller's thread: their first and last numbers and the
/// JSON array stored as one row (none for no events).
struct EncodedHistory {
    first: u32,
    last: u32,
    events: String,
}

fn encode_history(events: &[HistoryEvent]) -> SqlResult<Option<EncodedHistory>> {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return Ok(None);
    };
    Ok(Some(EncodedHistory { first: first.seq, last: last.seq, events: to_json(&events)? }))
}

/// The end of an execution's last history row.
const LAST_HISTORY_ROW: &str =
    "SELECT last_seq FROM execution_history WHERE execution_id = ?1 ORDER BY seq DESC LIMIT 1";

/// Appends `events` (in sequence order) as one row. An event numbered at or below one already
/// stored is refused: two runners writing one history (a resume that did not see its dead
/// runner's last events) must fail loudly, as the primary key on each event used to make them.
fn insert_history(tx: &Connection, execution_id: &str, events: &Option<EncodedHistory>) -> SqlResult<()> {
    let Some(EncodedHistory { first, last, events }) = events else {
        return Ok(());
    };
    // Rows never overlap, so the one that starts last ends last: one seek down the primary key.
    let stored: Option<u32> =
        tx.prepare_cached(LAST_HISTORY_ROW)?.query_row(params![execution_id], |row| row.get(0)).optional()?;
    if let Some(stored) = stored.filter(|stored| stored >= first) {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
            Some(format!(
                "history of {execution_id}: events from {first} are already recorded (up to {stored}); a history is only appended to"
            )),
        ));
    }
    tx.prepare_cached("INSERT INTO execution_history (execution_id, seq, last_seq, events) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![execution_id, first, last, events])?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn durable(&self) -> Result<(), PaymentError> {
        self.settle("make acknowledged writes durable").await
    }
    async fn insert_idempotency(&self, record: &IdempotencyRecord) -> Result<Option<IdempotencyRecord>, PaymentError> {
        let record = record.clone();
        self.write_early("claim idempotency key", vec![pending_key("idempotency", &record.key)], move |tx| {
            let record = &record;
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
        let expected = expected.clone();
        let record = record.clone();
        self.write("reclaim idempotency key", move |tx| {
            let expected = &expected;
            let record = &record;
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
        let key = key.to_owned();
        let pending = pending_key("idempotency", &key);
        let record = self.read_key("read idempotency key", &pending, move |c| get_idempotency(c, &key)).await?;
        Ok(record.filter(|r| !r.is_expired(now)))
    }

    async fn agent_ledger(&self, agent_id: &str) -> Result<AgentLedger, PaymentError> {
        let agent_id = agent_id.to_owned();
        self.read("read agent ledger", move |c| get_ledger(c, &agent_id)).await
    }

    async fn agent_and_key(
        &self,
        agent_id: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<(AgentLedger, Option<IdempotencyRecord>), PaymentError> {
        let agent_id = agent_id.to_owned();
        let key = key.to_owned();
        let pending = pending_key("idempotency", &key);
        let (ledger, record) = self
            .read_key("read agent and key", &pending, move |c| {
                Ok((get_ledger(c, &agent_id)?, get_idempotency(c, &key)?))
            })
            .await?;
        Ok((ledger, record.filter(|r| !r.is_expired(now))))
    }

    async fn change_policy(&self, agent_id: &str, change: &PolicyChange) -> Result<PolicyEdited, PaymentError> {
        let agent_id = agent_id.to_owned();
        let change = change.clone();
        self.write("set policy", move |tx| {
            let agent_id = agent_id.as_str();
            let change = &change;
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
        let agent_id = agent_id.to_owned();
        self.read("read policy history", move |c| {
            let agent_id = agent_id.as_str();
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
        let (owner, named) = (agent_id.to_owned(), scope.to_owned());
        let rows = self
            .read("read spend history", move |c| {
                let (agent_id, scope) = (owner.as_str(), named.as_str());
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
        let owner = agent_id.to_owned();
        let record = self
            .read("read trip counters", move |c| {
                c.prepare_cached("SELECT record FROM trip_counters WHERE agent_id = ?1")?
                    .query_row([owner], |row| row.get::<_, String>(0))
                    .optional()
            })
            .await?;
        record
            .map(|text| from_json(&text).map_err(|e| PaymentError::store("read trip counters", e)))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    async fn put_trip_counters(&self, agent_id: &str, counters: &TripCounters) -> Result<bool, PaymentError> {
        let agent_id = agent_id.to_owned();
        let version = counters.version as i64;
        let record = serde_json::to_string(counters).map_err(|e| PaymentError::store("write trip counters", e))?;
        self.write("write trip counters", move |tx| {
            let agent_id = agent_id.as_str();
            let stored: i64 = tx
                .prepare_cached("SELECT version FROM trip_counters WHERE agent_id = ?1")?
                .query_row([agent_id], |row| row.get(0))
                .optional()?
                .unwrap_or(0);
            if stored != version - 1 {
                return Ok(false);
            }
            tx.prepare_cached(
                "INSERT INTO trip_counters (agent_id, version, record) VALUES (?1, ?2, ?3)
                 ON CONFLICT (agent_id) DO UPDATE SET version = excluded.version, record = excluded.record",
            )?
            .execute(params![agent_id, version, record])?;
            Ok(true)
        })
        .await
    }

    async fn agents_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, PaymentError> {
        // Agent ids are never empty: "" comes before every one.
        let after = after.unwrap_or_default().to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read("list agents", move |c| {
            let mut statement = c.prepare_cached(
                "SELECT agent_id FROM agents WHERE policy IS NOT NULL AND agent_id > ?1 ORDER BY agent_id LIMIT ?2",
            )?;
            let rows = statement.query_map(params![after, limit], |row| row.get::<_, String>(0))?;
            rows.collect()
        })
        .await
    }

    async fn sweep_cursor(&self) -> Result<Option<String>, PaymentError> {
        self.read("read the sweep's cursor", |c| {
            c.prepare_cached("SELECT last_reconciled FROM sweep_cursor WHERE id = 1")?
                .query_row([], |row| row.get(0))
                .optional()
        })
        .await
    }

    async fn set_sweep_cursor(&self, last_reconciled: &str) -> Result<(), PaymentError> {
        let last_reconciled = last_reconciled.to_owned();
        self.write("record the sweep's cursor", move |tx| {
            tx.prepare_cached(
                "INSERT INTO sweep_cursor (id, last_reconciled) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET last_reconciled = excluded.last_reconciled",
            )?
            .execute([last_reconciled])
            .map(drop)
        })
        .await
    }

    async fn reserve(
        &self,
        write: &WindowWrite,
        reservation: &Reservation,
        fence: &ClaimFence,
    ) -> Result<ReserveOutcome, PaymentError> {
        let write = write.clone();
        let reservation = reservation.clone();
        let fence = fence.clone();
        self.write("reserve", move |tx| {
            let write = &write;
            let reservation = &reservation;
            let fence = &fence;
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
        let agent_id = agent_id.to_owned();
        let id = id.to_owned();
        self.read("read reservation", move |c| get_reservation(c, &agent_id, &id)).await
    }

    async fn shadow_window(&self, agent_id: &str) -> Result<SpendWindow, PaymentError> {
        let agent_id = agent_id.to_owned();
        self.read("read shadow window", move |c| get_shadow_window(c, &agent_id)).await
    }

    async fn record_shadow(&self, commit: &ShadowCommit) -> Result<ReserveOutcome, PaymentError> {
        let commit = commit.clone();
        self.write("record shadow decision", move |tx| {
            let commit = &commit;
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
        let agent_id = agent_id.to_owned();
        self.read("list reservations", move |c| {
            let agent_id = agent_id.as_str();
            let mut statement =
                c.prepare_cached("SELECT record FROM reservations WHERE agent_id = ?1 ORDER BY created_at, id")?;
            let rows = statement.query_map([agent_id], |row| row.get::<_, String>(0))?;
            rows.map(|row| from_json(&row?)).collect()
        })
        .await
    }

    async fn authorize(&self, commit: &AuthorizationCommit) -> Result<Transition, PaymentError> {
        let commit = commit.clone();
        self.write("record ledger", move |tx| {
            let commit = &commit;
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
        let commit = commit.clone();
        self.write("compensate", move |tx| {
            let commit = &commit;
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
        let commit = commit.clone();
        self.write("hold unknown outcome", move |tx| {
            let commit = &commit;
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
        let commit = commit.clone();
        self.write("record settlement", move |tx| {
            let commit = &commit;
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
        let event = event.clone();
        self.write("append audit event", move |tx| put_audit(tx, &event)).await
    }

    async fn audit_events(&self, agent_id: &str) -> Result<Vec<AuditEvent>, PaymentError> {
        let agent_id = agent_id.to_owned();
        self.read("list audit events", move |c| {
            let agent_id = agent_id.as_str();
            let mut statement =
                c.prepare_cached("SELECT record FROM audit_events WHERE agent_id = ?1 ORDER BY at, event_id")?;
            let rows = statement.query_map([agent_id], |row| row.get::<_, String>(0))?;
            rows.map(|row| from_json(&row?)).collect()
        })
        .await
    }

    async fn request_approval(&self, commit: &ApprovalRequestCommit) -> Result<Transition, PaymentError> {
        let commit = commit.clone();
        self.write("request approval", move |tx| {
            let commit = &commit;
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
        let id = id.to_owned();
        self.read("read approval", move |c| get_approval(c, &id)).await
    }

    async fn approvals(&self, since: Timestamp, until: Timestamp) -> Result<Vec<ApprovalRecord>, PaymentError> {
        self.read("list approvals", move |c| {
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
        let commit = commit.clone();
        self.write("decide approval", move |tx| {
            let commit = &commit;
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
        let client_token = client_token.to_owned();
        let pending = pending_key("issued", &client_token);
        self.read_key("read issued proof", &pending, move |c| {
            let client_token = client_token.as_str();
            c.prepare_cached("SELECT record FROM issued_proofs WHERE client_token = ?1")?
                .query_row([client_token], |row| row.get::<_, String>(0))
                .optional()?
                .map(|text| from_json(&text))
                .transpose()
        })
        .await
    }

    async fn record_issued(&self, client_token: &str, proof: &IssuedProof) -> Result<IssuedProof, PaymentError> {
        let client_token = client_token.to_owned();
        let proof = proof.clone();
        let keys = vec![pending_key("issued", &client_token)];
        self.write_early("record issued proof", keys, move |tx| {
            let client_token = client_token.as_str();
            let proof = &proof;
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
    async fn executions_durable(&self) -> Result<(), PaymentError> {
        self.settle("make acknowledged writes durable").await
    }
    async fn create_execution(&self, record: &ExecutionRecord) -> Result<bool, PaymentError> {
        let record = record.clone();
        let keys = vec![pending_key("execution", &record.execution_id), pending_key("execution", &record.name)];
        self.write_early("create execution", keys, move |tx| {
            let record = &record;
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
        // Encoded on the caller's thread: the writer thread does only SQLite's work.
        let row = ExecutionRow::of(record).map_err(|e| PaymentError::store("update execution", e))?;
        self.write("update execution", move |tx| row.update(tx)).await
    }

    async fn finish_execution(&self, record: &ExecutionRecord, events: &[HistoryEvent]) -> Result<(), PaymentError> {
        let row = ExecutionRow::of(record).map_err(|e| PaymentError::store("finish execution", e))?;
        let events = encode_history(events).map_err(|e| PaymentError::store("finish execution", e))?;
        self.write("finish execution", move |tx| {
            insert_history(tx, &row.execution_id, &events)?;
            row.update(tx)
        })
        .await
    }

    async fn execution(&self, id_or_name: &str) -> Result<Option<ExecutionRecord>, PaymentError> {
        let id_or_name = id_or_name.to_owned();
        let pending = pending_key("execution", &id_or_name);
        self.read_key("read execution", &pending, move |c| {
            let id_or_name = id_or_name.as_str();
            c.prepare_cached("SELECT record FROM executions WHERE execution_id = ?1 OR name = ?1")?
                .query_row([id_or_name], |row| row.get::<_, String>(0))
                .optional()?
                .map(|text| from_json(&text))
                .transpose()
        })
        .await
    }

    async fn list_executions(&self, filter: &ExecutionFilter) -> Result<Vec<ExecutionRecord>, PaymentError> {
        let filter = filter.clone();
        // A listing may show any execution: those whose start is not committed yet are first.
        self.settle("list executions").await?;
        self.read("list executions", move |c| {
            let filter = &filter;
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
        let execution_id = execution_id.to_owned();
        let events = encode_history(events).map_err(|e| PaymentError::store("append history", e))?;
        self.write("append history", move |tx| insert_history(tx, &execution_id, &events)).await
    }

    async fn append_history_deferred(&self, execution_id: &str, events: &[HistoryEvent]) -> Result<(), PaymentError> {
        let execution_id = execution_id.to_owned();
        let events = encode_history(events).map_err(|e| PaymentError::store("append history", e))?;
        self.write_deferred("append history", move |tx| insert_history(tx, &execution_id, &events)).await
    }

    async fn history(&self, execution_id: &str) -> Result<Vec<HistoryEvent>, PaymentError> {
        self.settle("read history").await?;
        let execution_id = execution_id.to_owned();
        self.read("read history", move |c| {
            let execution_id = execution_id.as_str();
            let mut statement =
                c.prepare_cached("SELECT events FROM execution_history WHERE execution_id = ?1 ORDER BY seq")?;
            let rows = statement.query_map([execution_id], |row| row.get::<_, String>(0))?;
            let mut events = Vec::new();
            for row in rows {
                events.extend(from_json::<Vec<HistoryEvent>>(&row?)?);
            }
            Ok(events)
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

    /// A store on a new file (the directory lives as long as the first value).
    fn file_store() -> (tempfile::TempDir, std::path::PathBuf, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        (dir, path, store)
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
        let (_dir, path, store) = file_store();
        let store = Arc::new(store);
        let tasks: Vec<_> = (0..200u32)
            .map(|id| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .write("test", move |tx| {
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
        let stats = store.commit_stats();
        assert_eq!(stats.writes, 200);
        assert!(stats.commits < stats.writes, "concurrent writes shared commits: {stats:?}");
    }

    /// Statements are prepared once and reused: none is prepared again because a bound value
    /// changed (the bundled SQLite would, for the history check, on every append).
    #[test]
    fn statements_keep_their_plan_across_bound_values() {
        let dir = tempfile::tempdir().unwrap();
        let connection = SqliteStore::init(Connection::open(dir.path().join("store.db")).unwrap()).unwrap();
        for execution in 0..20 {
            let id = format!("execution-{execution}");
            for append in 0..3u32 {
                let events = vec![event(append * 2), event(append * 2 + 1)];
                insert_history(&connection, &id, &encode_history(&events).unwrap()).unwrap();
            }
        }
        let check = connection.prepare_cached(LAST_HISTORY_ROW).unwrap();
        assert!(check.get_status(rusqlite::StatementStatus::Run) >= 60, "the history check ran on every append");
        assert_eq!(check.get_status(rusqlite::StatementStatus::RePrepare), 0, "prepared again for new bound values");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_whose_caller_stops_waiting_is_still_committed() {
        let (_dir, path, store) = file_store();
        let store = Arc::new(store);
        // Boxed, so that dropping it drops the future (and the caller's wait).
        let mut write = Box::pin(store.write("test", |tx| insert(tx, 1)));
        let finished = futures_poll_once(write.as_mut()).await;
        drop(write);
        assert!(finished.is_none(), "sent, not yet committed");
        store.write("test", |tx| insert(tx, 2)).await.unwrap();
        assert_eq!(committed_rows(&path), ["token-1", "token-2"], "both committed, the abandoned one included");
    }

    /// Dropping the store waits for what was sent: nothing a caller sent is left uncommitted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_store_commits_every_write_sent() {
        let (_dir, path, store) = file_store();
        for id in 0..50 {
            let mut write = Box::pin(store.write("test", move |tx| insert(tx, id)));
            assert!(futures_poll_once(write.as_mut()).await.is_none());
        }
        drop(store);
        assert_eq!(committed_rows(&path).len(), 50);
    }

    /// A deferred write is durable before any write sent after it is acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deferred_writes_are_committed_before_a_later_write_is_answered() {
        let (_dir, path, store) = file_store();
        for id in 0..20 {
            store.write_deferred("test", move |tx| insert(tx, id)).await.unwrap();
        }
        store.write("test", |tx| insert(tx, 99)).await.unwrap();
        assert_eq!(committed_rows(&path).len(), 21, "the 20 deferred writes and the waited one");
    }

    /// An early-answered write gives its value back before its commit, and is durable before
    /// any later waited write (or `durable`) is answered.
    #[tokio::test]
    async fn early_answered_writes_are_committed_before_a_later_write_is_answered() {
        let (_dir, path, store) = file_store();
        for id in 0..20 {
            let answered = store.write_early("test", vec![], move |tx| insert(tx, id).map(|()| id)).await.unwrap();
            assert_eq!(answered, id);
        }
        store.write("test", |tx| insert(tx, 99)).await.unwrap();
        assert_eq!(committed_rows(&path).len(), 21, "the 20 early writes and the waited one");
        store.write_early("test", vec![], |tx| insert(tx, 100)).await.unwrap();
        store.durable().await.unwrap();
        assert_eq!(committed_rows(&path).len(), 22, "durable waits for the early write");
    }

    /// A read of what an early-answered write wrote sees it: the read waits for its commit
    /// (the pool shows only committed data).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_store_reads_its_early_answered_writes() {
        let (_dir, _path, store) = file_store();
        for id in 0..30 {
            let token = format!("token-{id}");
            let key = pending_key("issued", &token);
            store.write_early("test", vec![key.clone()], move |tx| insert(tx, id)).await.unwrap();
            let seen = store
                .read_key("test", &key, move |c| {
                    c.query_row("SELECT count(*) FROM issued_proofs WHERE client_token = ?1", [token], |row| {
                        row.get::<_, i64>(0)
                    })
                })
                .await
                .unwrap();
            assert_eq!(seen, 1, "write {id} read back");
        }
        assert!(store.pending.lock().unwrap().is_empty(), "every key left the map at its commit");
    }

    /// An early write that fails is answered with its error and undone alone: nothing was
    /// built on it, so the store goes on taking writes.
    #[tokio::test]
    async fn a_failed_early_write_is_answered_with_its_error_and_undone() {
        let (_dir, path, store) = file_store();
        let failed = store
            .write_early("test", vec![], |tx| {
                insert(tx, 1)?;
                Err::<(), _>(rusqlite::Error::InvalidQuery)
            })
            .await
            .unwrap_err();
        assert!(failed.chain_message().contains("test"), "{failed:?}");
        store.write("test", |tx| insert(tx, 2)).await.unwrap();
        assert_eq!(committed_rows(&path), vec!["token-2".to_owned()]);
    }

    /// History appended without waiting is read back at once, whole: a resumed execution reads
    /// what its dead runner recorded (the simulator found a resume that missed it and wrote
    /// its own events over the same sequence numbers).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deferred_history_is_read_back_at_once() {
        let (_dir, _, store) = file_store();
        for round in 0..20u32 {
            let event = HistoryEvent {
                seq: round,
                at: Timestamp::from_millis(0),
                kind: agentpay_core::executions::HistoryKind::TaskRetryScheduled,
                state: Some("S".into()),
                details: serde_json::json!({"round": round}),
            };
            store.append_history_deferred("execution-1", &[event]).await.unwrap();
            let read = store.history("execution-1").await.unwrap();
            assert_eq!(read.len(), round as usize + 1, "round {round}: the deferred append is read back");
        }
    }

    fn event(seq: u32) -> HistoryEvent {
        HistoryEvent {
            seq,
            at: Timestamp::from_millis(0),
            kind: agentpay_core::executions::HistoryKind::TaskRetryScheduled,
            state: Some("S".into()),
            details: serde_json::json!({"n": seq}),
        }
    }

    fn seqs(events: &[HistoryEvent]) -> Vec<u32> {
        events.iter().map(|e| e.seq).collect()
    }

    /// Each append is one row; events come back in order, and an append that overlaps what is
    /// stored (as a second runner's would) is refused and writes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn history_is_appended_in_rows_and_never_overwritten() {
        let (_dir, path, store) = file_store();
        store.append_history("execution-1", &[event(0), event(1), event(2)]).await.unwrap();
        store.append_history("execution-1", &[event(3)]).await.unwrap();
        store.append_history("execution-2", &[event(0)]).await.unwrap();
        let overlap = store.append_history("execution-1", &[event(3), event(4)]).await.unwrap_err();
        assert!(
            overlap.chain_message().contains("events from 3 are already recorded (up to 3)"),
            "{}",
            overlap.chain_message()
        );
        // Inside a stored row, where no row starts: only the sequence check sees it.
        let inside = store.append_history("execution-1", &[event(1)]).await.unwrap_err();
        assert!(
            inside.chain_message().contains("events from 1 are already recorded (up to 3)"),
            "{}",
            inside.chain_message()
        );
        store.append_history("execution-1", &[]).await.unwrap();
        store.append_history("execution-1", &[event(4), event(5)]).await.unwrap();
        assert_eq!(seqs(&store.history("execution-1").await.unwrap()), [0, 1, 2, 3, 4, 5]);
        assert_eq!(seqs(&store.history("execution-2").await.unwrap()), [0]);
        let rows: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM execution_history WHERE execution_id = 'execution-1'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 3, "one row per append");
    }

    /// A version 3 file (one row per event) opens as version 4 with the same history, and
    /// appends go on after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_3_store_is_migrated_with_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentpay.db");
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(SCHEMA).unwrap();
            old.execute_batch(
                "CREATE TABLE execution_history (execution_id TEXT NOT NULL, seq INTEGER NOT NULL, record TEXT NOT NULL,
                     PRIMARY KEY (execution_id, seq));
                 PRAGMA user_version = 3;",
            )
            .unwrap();
            for seq in 0..2 {
                old.execute(
                    "INSERT INTO execution_history (execution_id, seq, record) VALUES ('execution-1', ?1, ?2)",
                    params![seq, serde_json::to_string(&event(seq)).unwrap()],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.history("execution-1").await.unwrap(), [event(0), event(1)]);
        store.append_history("execution-1", &[event(2)]).await.unwrap();
        assert_eq!(seqs(&store.history("execution-1").await.unwrap()), [0, 1, 2]);
        let overlap = store.append_history("execution-1", &[event(1)]).await.unwrap_err();
        assert!(overlap.chain_message().contains("already recorded"), "{}", overlap.chain_message());
        drop(store);
        // A second process that read version 3 before the first converted it finds it done.
        let late = Connection::open(&path).unwrap();
        migrate_3_to_4(&late).unwrap();
        let version: i64 = late.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        drop(late);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(seqs(&store.history("execution-1").await.unwrap()), [0, 1, 2]);
    }

    /// A deferred write that fails leaves a hole nobody was told of: the store takes no more
    /// writes, whether sent before the failure was known or after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_deferred_write_stops_the_store_taking_writes() {
        let (_dir, path, store) = file_store();
        store.write_deferred("test", |tx| insert(tx, 1)).await.unwrap();
        store.write_deferred("append history", |_| Err(rusqlite::Error::InvalidQuery)).await.unwrap();
        let next = store.write("test", |tx| insert(tx, 2)).await.unwrap_err();
        assert!(
            next.chain_message().contains("an earlier write was lost after its caller went on (append history"),
            "{}",
            next.chain_message()
        );
        let later = store.write_deferred("test", |tx| insert(tx, 3)).await.unwrap_err();
        assert!(later.chain_message().contains("takes no more writes"), "{}", later.chain_message());
        // Row 1 may be committed (in an earlier batch), row 2 may not (it can share the failed
        // write's batch); 3 never was sent.
        let rows = committed_rows(&path);
        assert!(!rows.contains(&"token-3".to_owned()), "{rows:?}");
    }

    /// A batch in which a deferred write fails commits nothing: neither the writes before the
    /// hole (they may need the lost one) nor those after it (an execution's end after its lost
    /// history), and every waiting caller is told its write is not recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_with_a_failed_deferred_write_commits_nothing() {
        let (_dir, path, store) = file_store();
        let store = Arc::new(store);
        // The first write holds the writer inside its batch until the others are queued.
        let (started, has_started) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let first = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .write("first", move |tx| {
                        started.send(()).unwrap();
                        released.recv().unwrap();
                        insert(tx, 1)
                    })
                    .await
            }
        });
        tokio::task::spawn_blocking(move || has_started.recv().unwrap()).await.unwrap();
        store.write_deferred("test", |tx| insert(tx, 2)).await.unwrap();
        store.write_deferred("append history", |_| Err(rusqlite::Error::InvalidQuery)).await.unwrap();
        let last = tokio::spawn({
            let store = store.clone();
            async move { store.write("finish execution", |tx| insert(tx, 3)).await }
        });
        // Let the last write reach the queue before the writer goes on.
        while store.requests.as_ref().unwrap().capacity() > MAX_QUEUED - 3 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        for waited in [first.await.unwrap(), last.await.unwrap()] {
            let message = waited.unwrap_err().chain_message();
            assert!(message.contains("append history"), "{message}");
        }
        assert!(committed_rows(&path).is_empty(), "{:?}", committed_rows(&path));
        let after = store.write("test", |tx| insert(tx, 4)).await.unwrap_err();
        assert!(after.chain_message().contains("takes no more writes"), "{}", after.chain_message());
    }

    /// Once a write was lost, the writer itself runs no more writes: one already queued when
    /// the loss was recorded is answered "not run", never committed after the hole.
    #[tokio::test]
    async fn after_a_loss_the_writer_runs_no_queued_write() {
        let (_dir, path, store) = file_store();
        store.lost.lock().unwrap().replace("create execution: commit failed".into());
        let (answer, answered) = tokio::sync::oneshot::channel();
        let request = write_request(
            |tx| insert(tx, 1),
            None,
            move |(outcome, committed)| {
                let _ = answer.send((outcome.is_some(), committed));
            },
        );
        store.send("test", request).await.unwrap();
        let (ran, committed) = answered.await.unwrap();
        assert!(!ran, "the queued write was not run");
        assert!(committed.unwrap_err().contains("an earlier write was lost"));
        assert!(committed_rows(&path).is_empty());
    }

    /// An in-memory store reads on the writer's thread: a read sees every write answered before it.
    #[tokio::test]
    async fn an_in_memory_store_reads_its_writes() {
        let store = SqliteStore::in_memory().unwrap();
        store.write("test", |tx| insert(tx, 7)).await.unwrap();
        let count: i64 = store
            .read("test", |c| c.query_row("SELECT count(*) FROM issued_proofs", [], |row| row.get(0)))
            .await
            .unwrap();
        assert_eq!(count, 1);
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
