//! A seeded, deterministic fault simulator for "never pay twice, never lose a proof".
//!
//! It drives the real steps through the local runner (the deployed ASL file), with the real
//! store (SQLite, or DynamoDB on moto) and the dev wallet, on a virtual clock. At every store
//! write and every provider call, before and after, the seed decides whether something goes
//! wrong there: the Lambda dies (`Sandbox.Timedout`, `Lambda.Unknown`, `States.Timeout`), the
//! whole runner process dies (the execution stays RUNNING and is resumed later), the provider
//! refuses (definitely) or times out after it issued the proof, or the world moves on under the
//! running execution: a duplicate start of the same key, a lease expiry and takeover, a redrive
//! of an old execution, a `replay --fresh`, a policy edit or a pause, a day passing.
//!
//! Then it recovers (resumes dead executions, redrives the redrivable, replays held keys) and
//! checks the invariants:
//! (a) per key lifetime (claim id), at most one proof is issued;
//! (b) every issued proof counts in its agent's window (its reservation is never released) and
//!     the spend of the issued proofs never exceeds the daily cap in any 24 hours;
//! (c) no reservation is released while its proof may exist (part of (b));
//! (d) every execution ends SUCCEEDED, FAILED with a definite cause, or is redriven to one; no
//!     key is left IN_PROGRESS, no reservation RESERVED;
//! (e) every reservation move and every denial has its audit event.
//!
//! It prints `simulation: N executions, N faults injected, N invariant violations (seed S)`;
//! `AGENTPAY_SIM_SEED=S` reproduces a run, `AGENTPAY_SIM_EXECUTIONS=N` sizes it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use agentpay::asl::runner::{TaskFailure, TaskHandler};
use agentpay::asl::{LocalRunner, PAYMENT_DEFINITION, RecordingSleeper};
use agentpay::client::local::LocalBackend;
use agentpay::client::{PaymentClient, ReplayOptions};
use agentpay::clock::{Clock, ManualClock, Timestamp};
use agentpay::config::Config;
use agentpay::error::{PaymentError, is_definite_refusal_name};
use agentpay::executions::{ExecutionFilter, ExecutionRecord, ExecutionStatus, ExecutionStore};
use agentpay::faults::{FaultHook, FaultPoint};
use agentpay::local::LocalApp;
use agentpay::policy::SpendPolicy;
use agentpay::provider::{IssuedProofs, PaymentOrder};
use agentpay::samples::execution_input;
use agentpay::steps::{StepName, Steps};
use agentpay::store::dynamodb::{DynamoStore, TableNames};
use agentpay::store::sqlite::SqliteStore;
use agentpay::store::{AuditKind, IdempotencyStatus, ReservationStatus};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::Notify;

use crate::helpers::policy;
use crate::stores::{dynamodb_client, fresh_tables};

const AGENTS: [&str; 3] = ["sim-agent-a", "sim-agent-b", "sim-agent-c"];
const DAILY_CAP_USD: &str = "6.00";
const DAILY_CAP_ATOMIC: u128 = 6_000_000;
const LEASE: Duration = Duration::from_secs(20 * 60);

/// How often (per mille) something goes wrong at one fault point.
const FAULT_PER_MILLE: u32 = 40;
/// How often (per mille) the world moves under a running execution at one point.
const INTERLEAVE_PER_MILLE: u32 = 12;

/// Names a Lambda-level death takes in Step Functions.
const LAMBDA_DEATHS: [&str; 3] = ["Sandbox.Timedout", "Lambda.Unknown", "States.Timeout"];

/// The errors an execution may legitimately end with once everything is recovered. A Lambda
/// death that outlived the retries before ProcessPayment ends the execution too: nothing was
/// sent to the provider (the invariants check that nothing was paid).
fn is_definite_end(error: &str) -> bool {
    is_definite_refusal_name(error)
        || LAMBDA_DEATHS.contains(&error)
        || matches!(
            error,
            "SpendLimitExceeded" | "RateLimitExceeded" | "IdempotencyKeyReused" | "PaymentInFlight" | "ClaimSuperseded"
        )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interleave {
    DuplicateStart,
    TakeoverAfterLease,
    RedriveOld,
    ReplayFresh,
    PolicyEdit,
    PauseAgent,
    DayPasses,
}

const INTERLEAVINGS: [Interleave; 7] = [
    Interleave::DuplicateStart,
    Interleave::TakeoverAfterLease,
    Interleave::RedriveOld,
    Interleave::ReplayFresh,
    Interleave::PolicyEdit,
    Interleave::PauseAgent,
    Interleave::DayPasses,
];

/// The simulator's shared state: the seed's decisions and what was injected.
struct Sim {
    rng: Mutex<StdRng>,
    clock: Arc<ManualClock>,
    enabled: AtomicBool,
    /// Executions started inside a fault point, stacked on the running one.
    depth: AtomicU32,
    /// Set by a fault point that kills the Lambda; taken by the task handler.
    lambda_death: Mutex<Option<&'static str>>,
    /// Fired when the runner process dies; only while a top-level start can be killed.
    kill: Notify,
    killable: AtomicBool,
    /// The key and input of the top-level execution running now.
    current: Mutex<Option<(String, Value)>>,
    faults: AtomicU64,
    executions: AtomicU64,
    /// Every provider order seen: (agent, key, client token).
    orders: Mutex<BTreeSet<(String, String, String)>>,
    /// The input each key was last started with, and every execution name used.
    inputs: Mutex<BTreeMap<String, Value>>,
    names: Mutex<Vec<String>>,
    world: OnceLock<Weak<World>>,
}

impl Sim {
    fn roll(&self, per_mille: u32) -> bool {
        self.rng.lock().unwrap().random_range(0..1000) < per_mille
    }

    fn pick<T: Copy>(&self, items: &[T]) -> T {
        items[self.rng.lock().unwrap().random_range(0..items.len())]
    }

    fn number(&self, range: std::ops::Range<u64>) -> u64 {
        self.rng.lock().unwrap().random_range(range)
    }

    fn injected(&self) {
        self.faults.fetch_add(1, Ordering::Relaxed);
    }

    fn world(&self) -> Arc<World> {
        self.world.get().and_then(Weak::upgrade).expect("the world outlives its simulation")
    }

    fn die(&self, operation: &'static str) -> PaymentError {
        *self.lambda_death.lock().unwrap() = Some(self.pick(&LAMBDA_DEATHS));
        self.injected();
        PaymentError::store(operation, "injected: the Lambda died here")
    }
}

#[async_trait::async_trait]
impl FaultHook for Sim {
    async fn at(&self, point: FaultPoint, order: Option<&PaymentOrder>) -> Result<(), PaymentError> {
        if let Some(order) = order {
            let agent = order.request.agent_id.to_string();
            let key = order.request.idempotency_key.to_string();
            self.orders.lock().unwrap().insert((agent, key, order.client_token.clone()));
        }
        if !self.enabled.load(Ordering::Relaxed) {
            return Ok(());
        }
        let top = self.depth.load(Ordering::Relaxed) == 0;
        if top && self.roll(INTERLEAVE_PER_MILLE) {
            self.injected();
            let world = self.world();
            let mut what = self.pick(&INTERLEAVINGS);
            // Anywhere else an execution may stall past its lease (a paused runner, a step
            // retried late) and meet the execution that took its key over. Not here: between
            // ProcessPayment's look at its claim and its provider call is one invocation,
            // which Lambda ends long before the lease runs out (see `StepSettings::lease`).
            if point == FaultPoint::Before("process_payment") && what == Interleave::TakeoverAfterLease {
                what = Interleave::DuplicateStart;
            }
            Box::pin(world.interleave(what)).await;
        }
        if !self.roll(FAULT_PER_MILLE) {
            return Ok(());
        }
        let operation = match point {
            FaultPoint::Before(op) | FaultPoint::After(op) => op,
        };
        match (point, self.number(0..10)) {
            // The runner process dies: the execution stays RUNNING, resumed later.
            (_, 0) if top && self.killable.load(Ordering::Relaxed) => {
                self.injected();
                self.kill.notify_one();
                std::future::pending::<()>().await;
                unreachable!()
            }
            (FaultPoint::Before("process_payment"), 1..=3) => {
                self.injected();
                let provider = "dev-wallet";
                // A refusal answers for the client token, so a provider that honours its
                // idempotency never refuses a token it issued a proof for: it returns the proof.
                // Throttling answers for nothing (the call was not processed), so it may come
                // at any time.
                let token = &order.expect("provider calls carry the order").client_token;
                let issued = self.world().proofs.issued(token).await?.is_some();
                Err(if self.number(0..2) == 0 && !issued {
                    PaymentError::ProviderRejected { provider, message: "injected: insufficient funds".into() }
                } else {
                    PaymentError::ProviderUnavailable { provider, message: "injected: throttled".into(), source: None }
                })
            }
            (FaultPoint::After("process_payment"), 1..=4) => {
                self.injected();
                Err(PaymentError::PaymentOutcomeUnknown {
                    provider: "dev-wallet",
                    message: "injected: the call timed out after the proof was issued".into(),
                    source: None,
                })
            }
            _ => Err(self.die(operation)),
        }
    }
}

/// Runs the steps, and turns an injected death into the error Lambda would report.
struct SimHandler {
    steps: Steps,
    sim: Arc<Sim>,
}

#[async_trait::async_trait]
impl TaskHandler for SimHandler {
    async fn invoke(&self, step: StepName, input: Value) -> Result<Value, TaskFailure> {
        let result = self.steps.invoke(step, input).await;
        if let Some(death) = self.sim.lambda_death.lock().unwrap().take() {
            return Err(TaskFailure { error: death.into(), cause: format!("injected: {step:?} died") });
        }
        result.map_err(TaskFailure::from)
    }
}

struct World {
    sim: Arc<Sim>,
    app: LocalApp,
    runner: Arc<LocalRunner>,
    client: PaymentClient,
    proofs: Arc<dyn IssuedProofs>,
    policies: Mutex<HashMap<String, SpendPolicy>>,
    _dir: tempfile::TempDir,
}

enum Ended {
    Finished,
    Killed,
}

impl World {
    async fn new(seed: u64, dynamo: bool, definition: &str) -> Arc<Self> {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_763_700_000_000)));
        let (mut config, proofs): (Config, Arc<dyn IssuedProofs>) = if dynamo {
            let client = dynamodb_client().await;
            let tables: TableNames = fresh_tables(&client).await;
            let proofs = Arc::new(DynamoStore::new(client, tables.clone()));
            (Config::local_dynamo(dir.path(), tables), proofs)
        } else {
            let config = Config::local(dir.path());
            let proofs = Arc::new(SqliteStore::open(&dir.path().join("agentpay.db")).unwrap());
            (config, proofs)
        };
        config.settings.lease = LEASE;
        let sleeper = Arc::new(RecordingSleeper::default());
        let app = LocalApp::open(&config, dir.path(), clock.clone(), sleeper.clone()).await.unwrap();
        let sim = Arc::new(Sim {
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            clock: clock.clone(),
            enabled: AtomicBool::new(false),
            depth: AtomicU32::new(0),
            lambda_death: Mutex::new(None),
            kill: Notify::new(),
            killable: AtomicBool::new(false),
            current: Mutex::new(None),
            faults: AtomicU64::new(0),
            executions: AtomicU64::new(0),
            orders: Mutex::new(BTreeSet::new()),
            inputs: Mutex::new(BTreeMap::new()),
            names: Mutex::new(Vec::new()),
            world: OnceLock::new(),
        });
        app.ledger.set_hook(Some(sim.clone()));
        app.provider.set_hook(Some(sim.clone()));
        let handler = Arc::new(SimHandler { steps: app.steps.clone(), sim: sim.clone() });
        let runner = Arc::new(LocalRunner::new(definition, handler, clock, app.executions.clone(), sleeper).unwrap());
        let client = PaymentClient::new(Box::new(LocalBackend::new(runner.clone(), app.executions.clone())));
        let mut policies = HashMap::new();
        for agent in AGENTS {
            let policy = policy("0.90", DAILY_CAP_USD, 40);
            app.store.put_policy(agent, &policy).await.unwrap();
            policies.insert(agent.to_owned(), policy);
        }
        let world = Arc::new(World {
            sim: sim.clone(),
            app,
            runner,
            client,
            proofs,
            policies: Mutex::new(policies),
            _dir: dir,
        });
        sim.world.set(Arc::downgrade(&world)).ok();
        world
    }

    fn now(&self) -> Timestamp {
        self.sim.clock.now()
    }

    /// Starts one execution of `key` and runs it until it ends or its process dies.
    async fn start(&self, key: &str, input: Value) -> Ended {
        let n = self.sim.executions.fetch_add(1, Ordering::Relaxed);
        let name = format!("{key}-r{n}");
        self.sim.names.lock().unwrap().push(name.clone());
        self.sim.inputs.lock().unwrap().insert(key.to_owned(), input.clone());
        if self.sim.depth.load(Ordering::Relaxed) > 0 {
            self.runner.start(&name, input).await.unwrap();
            return Ended::Finished;
        }
        *self.sim.current.lock().unwrap() = Some((key.to_owned(), input.clone()));
        let run = self.runner.start(&name, input);
        self.sim.killable.store(true, Ordering::Relaxed);
        let ended = tokio::select! {
            biased;
            record = run => {
                record.unwrap();
                Ended::Finished
            }
            _ = self.sim.kill.notified() => Ended::Killed,
        };
        self.sim.killable.store(false, Ordering::Relaxed);
        ended
    }

    /// Something happens while an execution is in the middle of a step.
    async fn interleave(&self, what: Interleave) {
        self.sim.depth.fetch_add(1, Ordering::Relaxed);
        match what {
            Interleave::DuplicateStart | Interleave::TakeoverAfterLease => {
                if what == Interleave::TakeoverAfterLease {
                    self.sim.clock.advance(LEASE + Duration::from_secs(1));
                }
                let current = self.sim.current.lock().unwrap().clone();
                if let Some((key, input)) = current {
                    self.start(&key, input).await;
                }
            }
            Interleave::RedriveOld | Interleave::ReplayFresh => {
                let failed = self.failed_executions().await;
                if !failed.is_empty() {
                    let target = failed[self.sim.number(0..failed.len() as u64) as usize].clone();
                    if what == Interleave::RedriveOld {
                        // Refusals (a Fail state, say) are fine: the point is an old execution moving.
                        let _ = self.runner.redrive(&target.execution_id).await;
                    } else {
                        let options = ReplayOptions { fresh: true, dry_run: false, wait: None };
                        self.sim.executions.fetch_add(1, Ordering::Relaxed);
                        let _ = self.client.replay(&target.execution_id, self.now(), options).await;
                    }
                }
            }
            Interleave::PolicyEdit | Interleave::PauseAgent => {
                let agent = self.sim.pick(&AGENTS);
                let mut policies = self.policies.lock().unwrap().clone();
                let policy = policies.get_mut(agent).unwrap();
                if what == Interleave::PauseAgent {
                    policy.paused = !policy.paused;
                } else {
                    // The daily cap stays: invariant (b) is checked against it.
                    let cents = self.sim.number(20..120);
                    policy.per_transaction_limit_usd = format!("{}.{:02}", cents / 100, cents % 100).parse().unwrap();
                }
                if what == Interleave::PauseAgent {
                    self.app.store.set_paused(agent, policy.paused).await.unwrap();
                } else {
                    self.app.store.put_policy(agent, policy).await.unwrap();
                }
                *self.policies.lock().unwrap() = policies;
            }
            Interleave::DayPasses => self.sim.clock.advance(Duration::from_secs(25 * 3600)),
        }
        self.sim.depth.fetch_sub(1, Ordering::Relaxed);
    }

    async fn failed_executions(&self) -> Vec<ExecutionRecord> {
        let filter = ExecutionFilter { status: Some(ExecutionStatus::Failed), ..ExecutionFilter::default() };
        self.app.executions.list_executions(&filter).await.unwrap()
    }

    async fn all_executions(&self) -> Vec<ExecutionRecord> {
        self.app.executions.list_executions(&ExecutionFilter::default()).await.unwrap()
    }
}

/// What one simulation found.
struct Report {
    executions: u64,
    faults: u64,
    violations: Vec<String>,
    keys_paid: usize,
    proofs: usize,
    seed: u64,
}

impl Report {
    fn line(&self) -> String {
        format!(
            "simulation: {} executions, {} faults injected, {} invariant violations (seed {})",
            self.executions,
            self.faults,
            self.violations.len(),
            self.seed
        )
    }
}

async fn simulate(seed: u64, top_level: u64, dynamo: bool) -> Report {
    simulate_machine(seed, top_level, dynamo, PAYMENT_DEFINITION).await
}

async fn simulate_machine(seed: u64, top_level: u64, dynamo: bool, definition: &str) -> Report {
    // Shown with a failing test's output, whatever fails (a panic included).
    println!("simulation seed {seed} (reproduce with AGENTPAY_SIM_SEED={seed})");
    let world = World::new(seed, dynamo, definition).await;
    let sim = world.sim.clone();
    sim.enabled.store(true, Ordering::Relaxed);
    let mut keys: Vec<String> = Vec::new();
    for i in 0..top_level {
        sim.clock.advance(Duration::from_secs(sim.number(1..900)));
        let agent = sim.pick(&AGENTS);
        // Mostly new keys; sometimes an old one again (a duplicate, or a reuse after its
        // record expired, with a new amount: a new lifetime).
        let (key, input) = match sim.number(0..10) {
            0 if !keys.is_empty() => {
                let key = keys[sim.number(0..keys.len() as u64) as usize].clone();
                let input = sim.inputs.lock().unwrap()[&key].clone();
                (key, input)
            }
            1 if !keys.is_empty() => {
                let key = keys[sim.number(0..keys.len() as u64) as usize].clone();
                sim.clock.advance(Duration::from_secs(25 * 3600));
                let agent = sim.inputs.lock().unwrap()[&key]["agentId"].as_str().unwrap().to_owned();
                (key.clone(), execution_input(&key, &agent, &sim.number(10_000..300_000).to_string()))
            }
            _ => {
                let key = format!("sim-{seed}-{i}");
                keys.push(key.clone());
                (key.clone(), execution_input(&key, agent, &sim.number(10_000..300_000).to_string()))
            }
        };
        world.start(&key, input).await;
        // Sometimes a dead runner's execution is resumed soon, not only at the end.
        if sim.roll(100) {
            resume_dead(&world).await;
        }
    }
    sim.enabled.store(false, Ordering::Relaxed);
    let mut violations = recover(&world).await;
    violations.extend(check(&world).await);
    let proofs = issued_tokens(&world).await.len();
    let mut keys_paid = 0;
    for agent in AGENTS {
        let reservations = world.app.store.reservations(agent).await.unwrap();
        keys_paid += reservations.iter().filter(|r| r.status == ReservationStatus::Authorized).count();
    }
    Report {
        executions: sim.executions.load(Ordering::Relaxed),
        faults: sim.faults.load(Ordering::Relaxed),
        violations,
        keys_paid,
        proofs,
        seed,
    }
}

async fn resume_dead(world: &World) {
    let filter = ExecutionFilter { status: Some(ExecutionStatus::Running), ..ExecutionFilter::default() };
    for record in world.app.executions.list_executions(&filter).await.unwrap() {
        if let Err(e) = world.runner.resume(&record.execution_id).await {
            panic!("resuming {}: {e}", record.execution_id);
        }
    }
}

/// No faults from here: resume the dead, redrive what failed at a Task, replay held keys, and
/// report what cannot be brought to an end.
async fn recover(world: &World) -> Vec<String> {
    let mut violations = Vec::new();
    for agent in AGENTS {
        let mut policy = world.policies.lock().unwrap()[agent].clone();
        policy.paused = false;
        world.app.store.put_policy(agent, &policy).await.unwrap();
        world.app.store.set_paused(agent, false).await.unwrap();
    }
    for _round in 0..3 {
        resume_dead(world).await;
        for record in world.failed_executions().await {
            let error = record.error.as_ref().map(|e| e.error.clone()).unwrap_or_default();
            let at_task =
                matches!(record.failed_state.as_deref(), Some("RecordLedger" | "Compensate" | "HoldUnknownOutcome"));
            if at_task && !is_definite_end(&error) {
                world.runner.redrive(&record.execution_id).await.unwrap();
            }
        }
        // Keys still held (unknown outcome, or a claim whose execution died): a new execution
        // of the same key, once the lease is over, asks again with the same token.
        world.sim.clock.advance(LEASE + Duration::from_secs(1));
        let keys: Vec<String> = world.sim.inputs.lock().unwrap().keys().cloned().collect();
        let mut held = 0;
        for key in keys {
            let record = world.app.store.idempotency(&key, world.now()).await.unwrap();
            let Some(record) = record.filter(|r| r.status == IdempotencyStatus::InProgress) else { continue };
            // The same input as the holder's (a later start may have reused the key otherwise).
            let holder = world.app.executions.execution(&record.execution_id).await.unwrap();
            let input = holder.map(|h| h.input).unwrap_or_else(|| world.sim.inputs.lock().unwrap()[&key].clone());
            held += 1;
            world.start(&key, input).await;
        }
        if held == 0 {
            break;
        }
    }
    let keys: Vec<String> = world.sim.inputs.lock().unwrap().keys().cloned().collect();
    for key in keys {
        let record = world.app.store.idempotency(&key, world.now()).await.unwrap();
        if let Some(record) = record.filter(|r| r.status == IdempotencyStatus::InProgress) {
            let input = world.sim.inputs.lock().unwrap()[&key].clone();
            let agent = input["agentId"].as_str().unwrap_or_default().to_owned();
            let audit = world.app.store.audit_events(&agent).await.unwrap();
            let trace = trace_key(world, &audit, &agent, &key).await;
            violations.push(format!("(d) key {key} is still IN_PROGRESS after recovery: {}\n{trace}", record.holder()));
        }
    }
    for record in world.all_executions().await {
        let error = record.error.as_ref().map(|e| e.error.as_str()).unwrap_or_default();
        match record.status {
            ExecutionStatus::Running => violations.push(format!("(d) execution {} is still RUNNING", record.name)),
            // An unknown outcome is resolved through its key (checked above), not its execution.
            ExecutionStatus::Failed if !is_definite_end(error) && error != "PaymentOutcomeUnknown" => violations
                .push(format!("(d) {} ended {error} at {:?}: {:?}", record.name, record.failed_state, record.error)),
            _ => {}
        }
    }
    violations
}

/// Client tokens the wallet issued a proof for, with the proof's payment id.
async fn issued_tokens(world: &World) -> BTreeMap<String, (String, String, String)> {
    let orders = world.sim.orders.lock().unwrap().clone();
    let mut issued = BTreeMap::new();
    for (agent, key, token) in orders {
        if let Some(entry) = world.proofs.issued(&token).await.unwrap() {
            issued.insert(token, (agent, key, entry.proof.payment_id));
        }
    }
    issued
}

/// What happened to a reservation's key, for a violation's message: its audit events and the
/// executions of its key, state by state.
async fn trace(world: &World, audit: &[agentpay::store::AuditEvent], r: &agentpay::store::Reservation) -> String {
    trace_key(world, audit, &r.agent_id, &r.idempotency_key).await
}

async fn trace_key(world: &World, audit: &[agentpay::store::AuditEvent], agent: &str, key: &str) -> String {
    let mut lines = Vec::new();
    if let Some(record) = world.app.store.idempotency(key, world.now()).await.unwrap() {
        lines.push(format!(
            "  key {:?} claim {} attempt {} by {} lease {} expires {} created {} updated {}",
            record.status,
            record.claim_id,
            record.attempt,
            record.execution_id,
            record.lease_expires_at.millis(),
            record.expires_at.millis(),
            record.created_at.millis(),
            record.updated_at.millis()
        ));
    }
    for r in world.app.store.reservations(agent).await.unwrap().iter().filter(|r| r.idempotency_key == key) {
        lines.push(format!(
            "  reservation {} {:?} claim {} attempt {} by {} created {}",
            r.id,
            r.status,
            r.claim_id,
            r.attempt,
            r.execution_id,
            r.created_at.millis()
        ));
    }
    for e in audit.iter().filter(|e| e.idempotency_key == key) {
        lines.push(format!(
            "  audit {:?} at {} by {} error {:?}",
            e.kind,
            e.at.millis(),
            e.execution_id,
            e.error.as_ref().map(|x| x.error.as_str())
        ));
    }
    let filter = ExecutionFilter { agent_id: Some(agent.to_owned()), ..Default::default() };
    for record in world.app.executions.list_executions(&filter).await.unwrap() {
        if record.idempotency_key.as_deref() != Some(key) {
            continue;
        }
        lines
            .push(format!("  execution {} {:?} redrives {}", record.execution_id, record.status, record.redrive_count));
        for event in world.app.executions.history(&record.execution_id).await.unwrap() {
            let error = event.details.get("error").and_then(Value::as_str).unwrap_or_default();
            lines.push(format!(
                "    {} {:?} {:?} {error}",
                event.at.millis(),
                event.kind,
                event.state.unwrap_or_default()
            ));
        }
    }
    lines.join("\n")
}

async fn check(world: &World) -> Vec<String> {
    let mut violations = Vec::new();
    let issued = issued_tokens(world).await;
    for agent in AGENTS {
        let reservations = world.app.store.reservations(agent).await.unwrap();
        let audit = world.app.store.audit_events(agent).await.unwrap();
        let by_token: HashMap<&str, _> = reservations.iter().map(|r| (r.client_token.as_str(), r)).collect();
        let mut proofs_per_claim: BTreeMap<(String, String), u32> = BTreeMap::new();
        let mut spend: Vec<(Timestamp, u128)> = Vec::new();
        for (token, (owner, key, payment_id)) in &issued {
            if owner != agent {
                continue;
            }
            // (b)/(c): the proof counts, through a reservation that was never released; and
            // once recovered, it is recorded (no proof lost).
            match by_token.get(token.as_str()) {
                None => violations.push(format!("(b) proof {payment_id} of key {key} has no reservation")),
                Some(r) if r.status == ReservationStatus::Released => violations.push(format!(
                    "(c) reservation {} was released though proof {payment_id} exists\n{}",
                    r.id,
                    trace(world, &audit, r).await
                )),
                Some(r) if r.status != ReservationStatus::Authorized => violations.push(format!(
                    "proof {payment_id} of key {key} is not recorded: reservation {} is {}",
                    r.id,
                    r.status.as_str()
                )),
                Some(r) => {
                    *proofs_per_claim.entry((key.clone(), r.claim_id.clone())).or_default() += 1;
                    spend.push((r.created_at, u128::from(r.amount.get())));
                }
            }
        }
        // (a): one proof per key lifetime.
        for ((key, claim), count) in proofs_per_claim {
            if count > 1 {
                violations.push(format!("(a) key {key} (claim {claim}) has {count} proofs"));
            }
        }
        // (b): the issued proofs' spend within any 24 hours stays under the cap.
        spend.sort();
        for (i, (at, _)) in spend.iter().enumerate() {
            let since = at.minus(Duration::from_secs(24 * 3600));
            let total: u128 = spend[..=i].iter().filter(|(t, _)| *t > since).map(|(_, a)| a).sum();
            if total > DAILY_CAP_ATOMIC {
                violations.push(format!("(b) agent {agent} spent {total} in the 24 h before {at}"));
            }
        }
        // (d): nothing left reserved; (e): every move audited.
        for r in &reservations {
            let audited = |kind: AuditKind| {
                audit.iter().any(|e| e.kind == kind && e.reservation_id.as_deref() == Some(r.id.as_str()))
            };
            match r.status {
                ReservationStatus::Reserved => {
                    violations.push(format!("(d) reservation {} of key {} is still RESERVED", r.id, r.idempotency_key))
                }
                ReservationStatus::Authorized | ReservationStatus::Settled if !audited(AuditKind::Authorized) => {
                    violations.push(format!("(e) authorized reservation {} has no audit event", r.id))
                }
                ReservationStatus::Released if !audited(AuditKind::Released) => {
                    violations.push(format!("(e) released reservation {} has no audit event", r.id))
                }
                _ => {}
            }
            if r.status == ReservationStatus::Authorized && !issued.contains_key(&r.client_token) {
                violations.push(format!("authorized reservation {} has no issued proof", r.id));
            }
        }
    }
    let inputs = world.sim.inputs.lock().unwrap().clone();
    for (key, input) in inputs {
        let Some(record) = world.app.store.idempotency(&key, world.now()).await.unwrap() else { continue };
        let agent = input["agentId"].as_str().unwrap().to_owned();
        if record.status == IdempotencyStatus::Denied {
            let audit = world.app.store.audit_events(&agent).await.unwrap();
            if !audit
                .iter()
                .any(|e| e.idempotency_key == key && matches!(e.kind, AuditKind::Denied | AuditKind::Released))
            {
                violations.push(format!("(e) key {key} was denied without an audit event"));
            }
        }
    }
    violations
}

fn seed_from_env(default: u64) -> u64 {
    std::env::var("AGENTPAY_SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn size_from_env(default: u64) -> u64 {
    std::env::var("AGENTPAY_SIM_EXECUTIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Prints the summary; `publish` also appends it to target/simulation.txt, which the test
/// command shows after the run.
fn report(store: &str, report: &Report, elapsed: Duration, publish: bool) {
    let mut text = format!("{} [{store}, {:.1} s]\n", report.line(), elapsed.as_secs_f64());
    text.push_str(&format!(
        "  key lifetimes paid (AUTHORIZED): {}, proofs the wallet issued: {}\n",
        report.keys_paid, report.proofs
    ));
    for violation in report.violations.iter().take(20) {
        text.push_str(&format!("  violation: {violation}\n"));
    }
    print!("{text}");
    if publish {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/simulation.txt");
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
    }
}

#[tokio::test]
async fn the_fault_simulator_finds_no_invariant_violation_on_sqlite() {
    let seed = seed_from_env(rand::random());
    let started = std::time::Instant::now();
    let result = simulate(seed, size_from_env(10_000), false).await;
    report("sqlite", &result, started.elapsed(), true);
    assert!(result.executions >= size_from_env(10_000));
    assert!(result.faults > 0, "the simulation injected nothing");
    assert!(result.violations.is_empty(), "{} — reproduce with AGENTPAY_SIM_SEED={seed}", result.line());
}

#[tokio::test]
async fn the_fault_simulator_finds_no_invariant_violation_on_dynamodb() {
    let seed = seed_from_env(rand::random());
    let started = std::time::Instant::now();
    let result = simulate(seed, size_from_env(400).min(400), true).await;
    report("dynamodb", &result, started.elapsed(), true);
    assert!(result.faults > 0, "the simulation injected nothing");
    assert!(result.violations.is_empty(), "{} — reproduce with AGENTPAY_SIM_SEED={seed}", result.line());
}

/// The simulator has teeth: on the machine as it was before unknown outcomes were held (every
/// ProcessPayment failure compensated, only throttling retried), it finds released
/// reservations whose proofs exist.
#[tokio::test]
async fn the_fault_simulator_catches_a_machine_that_compensates_unknown_outcomes() {
    let mut machine: Value = serde_json::from_str(PAYMENT_DEFINITION).unwrap();
    let process_payment = &mut machine["States"]["ProcessPayment"];
    process_payment["Catch"] =
        serde_json::json!([{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Compensate"}]);
    process_payment["Retry"] = serde_json::json!([{"ErrorEquals": ["ProviderUnavailable"], "MaxAttempts": 3}]);
    let result = simulate_machine(1, 400, false, &machine.to_string()).await;
    report("sqlite, broken machine", &result, Duration::ZERO, false);
    assert!(
        result.violations.iter().any(|v| v.starts_with("(c)")),
        "the simulator should have caught a released reservation with a proof: {}",
        result.line()
    );
}
