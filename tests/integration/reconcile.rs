//! Reconciliation of what executions left behind, through the real local runner and client on
//! both stores: a reservation no proof can exist for is released, an unknown outcome is asked
//! again with the same client token, and what cannot be explained is listed and left alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentpay::asl::runner::{TaskFailure, TaskHandler};
use agentpay::asl::{LocalRunner, PAYMENT_DEFINITION, RecordingSleeper};
use agentpay::client::PaymentClient;
use agentpay::client::local::LocalBackend;
use agentpay::client::reconcile::ClientExecutions;
use agentpay::clock::{Clock, ManualClock, Timestamp};
use agentpay::config::Config;
use agentpay::executions::{ExecutionRecord, ExecutionStatus};
use agentpay::faults::ProviderFault;
use agentpay::local::LocalApp;
use agentpay::reconcile::{AgentReconciliation, AnomalyKind, Reconciler};
use agentpay::samples::execution_input;
use agentpay::settlements::NoChain;
use agentpay::steps::{StepName, Steps};
use agentpay::store::{AuditKind, IdempotencyStatus, ReservationStatus};
use serde_json::Value;

use crate::helpers::policy;
use crate::stores::{dynamodb_client, fresh_tables};

const AGENT: &str = "rec-agent";

/// Kills executions the way a broken deployment would: while `broken` holds, Compensate fails
/// before it runs, every time, and while `check_spend_dies` holds CheckSpend fails after it
/// reserved.
struct BrokenCompensation {
    steps: Steps,
    broken: AtomicBool,
    check_spend_dies: AtomicBool,
}

#[async_trait::async_trait]
impl TaskHandler for BrokenCompensation {
    async fn invoke(&self, step: StepName, input: Value) -> Result<Value, TaskFailure> {
        let broken = self.broken.load(Ordering::SeqCst);
        if broken && step == StepName::Compensate {
            return Err(TaskFailure { error: "Lambda.Unknown".into(), cause: "compensate is broken".into() });
        }
        let result = self.steps.invoke(step, input).await;
        if broken && self.check_spend_dies.load(Ordering::SeqCst) && step == StepName::CheckSpend {
            return Err(TaskFailure { error: "Lambda.Unknown".into(), cause: "died after reserving".into() });
        }
        result.map_err(TaskFailure::from)
    }
}

struct Harness {
    app: LocalApp,
    handler: Arc<BrokenCompensation>,
    runner: Arc<LocalRunner>,
    client: PaymentClient,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new(dynamo: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_763_700_000_000)));
        let config = if dynamo {
            Config::local_dynamo(dir.path(), fresh_tables(&dynamodb_client().await).await)
        } else {
            Config::local(dir.path())
        };
        let sleeper = Arc::new(RecordingSleeper::default());
        let app = LocalApp::open(&config, dir.path(), clock.clone(), sleeper.clone()).await.unwrap();
        app.store.put_policy(AGENT, &policy("1.00", "5.00", 100)).await.unwrap();
        let handler = Arc::new(BrokenCompensation {
            steps: app.steps.clone(),
            broken: AtomicBool::new(false),
            check_spend_dies: AtomicBool::new(true),
        });
        let runner = Arc::new(
            LocalRunner::new(PAYMENT_DEFINITION, handler.clone(), clock.clone(), app.executions.clone(), sleeper)
                .unwrap(),
        );
        let client = PaymentClient::new(Box::new(LocalBackend::new(runner.clone(), app.executions.clone())));
        Self { app, handler, runner, client, clock, _dir: dir }
    }

    async fn run(&self, name: &str, key: &str, amount: &str) -> ExecutionRecord {
        self.runner.start(name, execution_input(key, AGENT, amount)).await.unwrap()
    }

    async fn reconcile(&self, dry_run: bool) -> AgentReconciliation {
        self.reconcile_with(&self.client, dry_run).await
    }

    async fn reconcile_with(&self, client: &PaymentClient, dry_run: bool) -> AgentReconciliation {
        let reconciler = Reconciler::new(self.app.store.clone(), self.clock.clone(), Duration::from_secs(24 * 3600));
        reconciler.agent(AGENT, &NoChain, &ClientExecutions::new(client), dry_run).await.unwrap()
    }

    async fn status(&self) -> ReservationStatus {
        let reservations = self.app.store.reservations(AGENT).await.unwrap();
        assert_eq!(reservations.len(), 1, "{reservations:?}");
        reservations[0].status
    }

    async fn window_total(&self) -> u64 {
        self.app.store.agent_ledger(AGENT).await.unwrap().window.rolled(self.clock.now()).spent.get()
    }
}

async fn an_execution_that_died_before_paying_is_released(dynamo: bool) {
    let h = Harness::new(dynamo).await;
    h.handler.broken.store(true, Ordering::SeqCst);
    let died = h.run("rec-died", "rec-died", "250000").await;
    assert_eq!(died.status, ExecutionStatus::Failed, "{:?}", died.error);
    assert_eq!(h.status().await, ReservationStatus::Reserved, "nothing compensated it");
    assert_eq!(h.window_total().await, 250_000);

    // A dry run says what it would do and does nothing.
    let dry = h.reconcile(true).await;
    assert_eq!(dry.changes.len(), 1, "{dry:?}");
    assert_eq!(dry.changes[0].after, ReservationStatus::Released);
    assert!(dry.changes[0].evidence.contains("before ProcessPayment"), "{}", dry.changes[0].evidence);
    assert_eq!((h.status().await, h.window_total().await), (ReservationStatus::Reserved, 250_000));

    let done = h.reconcile(false).await;
    assert_eq!(done.changes, dry.changes, "the run does what the dry run said");
    assert!(done.anomalies.is_empty(), "{:?}", done.anomalies);
    assert_eq!(h.status().await, ReservationStatus::Released);
    assert_eq!(h.window_total().await, 0, "its budget came back");
    assert_eq!(done.states["RELEASED"].payments, 1);
    let record = h.app.store.idempotency("rec-died", h.clock.now()).await.unwrap().unwrap();
    assert_eq!(record.status, IdempotencyStatus::Failed);
    assert_eq!(record.error.as_ref().unwrap().error, "ExecutionEnded");
    let audit = h.app.store.audit_events(AGENT).await.unwrap();
    let released = audit.iter().find(|e| e.kind == AuditKind::Released).expect("a release is audited");
    assert_eq!(released.decided_by.as_deref(), Some(agentpay::reconcile::RECONCILER));

    // Nothing twice: a second sweep finds nothing to do; the key can be paid again.
    assert!(h.reconcile(false).await.changes.is_empty());
    assert_eq!(h.window_total().await, 0);
    h.handler.broken.store(false, Ordering::SeqCst);
    let again = h.run("rec-died-again", "rec-died", "250000").await;
    assert_eq!(again.status, ExecutionStatus::Succeeded, "{:?}", again.error);
    assert_eq!(h.window_total().await, 250_000);
}

#[tokio::test]
async fn an_execution_that_died_before_paying_is_released_on_sqlite() {
    an_execution_that_died_before_paying_is_released(false).await;
}

#[tokio::test]
async fn an_execution_that_died_before_paying_is_released_on_dynamodb() {
    an_execution_that_died_before_paying_is_released(true).await;
}

async fn an_unknown_outcome_is_asked_again_with_the_same_client_token(dynamo: bool) {
    let h = Harness::new(dynamo).await;
    // The proof is issued, the answer lost on the first call and its three retries.
    h.app.provider.fail_next(ProviderFault::OutcomeUnknownAfterProof, 4);
    let held = h.run("rec-held", "rec-held", "300000").await;
    assert_eq!(held.error.as_ref().unwrap().error, "PaymentOutcomeUnknown");

    let dry = h.reconcile(true).await;
    assert!(dry.changes.is_empty() && dry.asked_again.is_empty(), "{dry:?}");
    assert_eq!(dry.anomalies.len(), 1);
    assert_eq!(dry.anomalies[0].kind, AnomalyKind::OutcomeUnknown, "a dry run lists it and asks nobody");
    assert_eq!(h.app.provider.delegated_calls(), 4);

    let done = h.reconcile(false).await;
    assert_eq!(done.asked_again.len(), 1, "{done:?}");
    assert!(done.asked_again[0].outcome.contains("SUCCEEDED"), "{}", done.asked_again[0].outcome);
    assert!(done.anomalies.is_empty(), "{:?}", done.anomalies);
    assert_eq!(h.app.provider.delegated_calls(), 5, "asked once more, with the same token");
    assert_eq!(h.status().await, ReservationStatus::Authorized, "the proof it had issued is recorded");
    assert_eq!(h.window_total().await, 300_000, "counted once");
    assert_eq!(done.states["AUTHORIZED"].payments, 1);
}

#[tokio::test]
async fn an_unknown_outcome_is_asked_again_with_the_same_client_token_on_sqlite() {
    an_unknown_outcome_is_asked_again_with_the_same_client_token(false).await;
}

#[tokio::test]
async fn an_unknown_outcome_is_asked_again_with_the_same_client_token_on_dynamodb() {
    an_unknown_outcome_is_asked_again_with_the_same_client_token(true).await;
}

#[tokio::test]
async fn an_execution_that_died_in_process_payment_waits_for_its_lease_then_is_asked_again() {
    let h = Harness::new(false).await;
    // The provider answers, then the execution dies on its way back, and nothing compensates.
    h.handler.broken.store(true, Ordering::SeqCst);
    h.handler.check_spend_dies.store(false, Ordering::SeqCst);
    h.app.provider.fail_next(ProviderFault::OutcomeUnknownAfterProof, 100);
    let died = h.run("rec-pp", "rec-pp", "100000").await;
    assert_eq!(died.status, ExecutionStatus::Failed);
    assert_eq!(h.status().await, ReservationStatus::Reserved);

    // Its lease still runs: a new execution would wait, so the sweep lists it and waits too.
    let early = h.reconcile(false).await;
    assert!(early.changes.is_empty() && early.asked_again.is_empty(), "{early:?}");
    assert_eq!(early.anomalies.len(), 1);
    assert_eq!(early.anomalies[0].kind, AnomalyKind::OutcomeUnknown);
    assert!(early.anomalies[0].detail.contains("lease ends"), "{}", early.anomalies[0].detail);
    assert_eq!(h.status().await, ReservationStatus::Reserved, "a proof may exist: never released");

    h.clock.advance(Duration::from_secs(21 * 60));
    h.handler.broken.store(false, Ordering::SeqCst);
    h.app.provider.fail_next(ProviderFault::OutcomeUnknownAfterProof, 0);
    let late = h.reconcile(false).await;
    assert_eq!(late.asked_again.len(), 1, "{late:?}");
    assert_eq!(h.status().await, ReservationStatus::Authorized);
    assert_eq!(h.window_total().await, 100_000);
}

#[tokio::test]
async fn a_reservation_whose_execution_is_gone_is_listed_and_left_counted() {
    let h = Harness::new(false).await;
    h.handler.broken.store(true, Ordering::SeqCst);
    h.run("rec-gone", "rec-gone", "50000").await;
    // Another execution store: the executions are gone (Step Functions keeps them 90 days).
    let elsewhere = tempfile::tempdir().unwrap();
    let other = LocalApp::open(
        &Config::local(elsewhere.path()),
        elsewhere.path(),
        h.clock.clone(),
        Arc::new(RecordingSleeper::default()),
    )
    .await
    .unwrap();
    let report = h.reconcile_with(&other.client(), false).await;
    assert!(report.changes.is_empty(), "{report:?}");
    assert_eq!(report.anomalies.len(), 1);
    assert_eq!(report.anomalies[0].kind, AnomalyKind::ReservationWithoutExecution);
    assert_eq!((h.status().await, h.window_total().await), (ReservationStatus::Reserved, 50_000));
}

#[tokio::test]
async fn what_the_ledger_cannot_explain_is_listed_and_left_as_it_is() {
    use agentpay::settlement::{ReportedOutcome, SettlementReport};
    use agentpay::steps::{CheckIdempotencyInput, CheckSpendInput};
    use agentpay::store::{AuditKind, Settlement, SettlementCommit};

    let h = Harness::new(false).await;
    // Settled for another amount than authorized (a scheme whose reports the check lets
    // through, or a record written by an older version).
    let paid = h.run("rec-paid", "rec-paid", "40000").await;
    assert_eq!(paid.status, ExecutionStatus::Succeeded);
    let reservation = h.app.store.reservations(AGENT).await.unwrap().remove(0);
    let report = SettlementReport {
        outcome: ReportedOutcome::Settled,
        transaction: Some(format!("0x{}", "cd".repeat(32))),
        network: None,
        payer: None,
        amount: Some(agentpay::money::AtomicAmount::new(39_000).unwrap()),
        error_reason: None,
    };
    let mut audit = h.app.store.audit_events(AGENT).await.unwrap().remove(0);
    audit.event_id = "evt-settled-other-amount".into();
    audit.kind = AuditKind::Settled;
    let commit = SettlementCommit {
        agent_id: AGENT.into(),
        reservation_id: reservation.id.clone(),
        from: ReservationStatus::Authorized,
        to: ReservationStatus::Settled,
        settlement: Some(Settlement { report, reported_by: "test".into(), reported_at: h.clock.now() }),
        refund: None,
        audit,
    };
    h.app.store.record_settlement(&commit).await.unwrap();

    // A key that says paid over a reservation still RESERVED (one table restored from a backup
    // older than the other).
    let input = execution_input("rec-restored", AGENT, "20000");
    let execution = "arn:local:execution:restored".to_owned();
    let steps = &h.app.steps;
    let claim = steps
        .check_idempotency(CheckIdempotencyInput { request: input.clone(), execution_id: execution.clone() })
        .await
        .unwrap();
    steps.check_spend(CheckSpendInput { request: input, execution_id: execution, claim }).await.unwrap();
    let held = h.app.store.idempotency("rec-restored", h.clock.now()).await.unwrap().unwrap();
    let completed = agentpay::store::IdempotencyRecord {
        status: IdempotencyStatus::Completed,
        result: Some(serde_json::json!({"paymentId": "pay-from-a-restore"})),
        ..held.clone()
    };
    assert!(h.app.store.replace_idempotency(&held, &completed).await.unwrap().is_none());

    let report = h.reconcile(false).await;
    let mut kinds: Vec<(AnomalyKind, &str)> =
        report.anomalies.iter().map(|a| (a.kind, a.idempotency_key.as_str())).collect();
    kinds.sort_by_key(|(_, key)| key.to_string());
    assert_eq!(
        kinds,
        [(AnomalyKind::SettledAmountDiffers, "rec-paid"), (AnomalyKind::ProofWithoutLedgerEntry, "rec-restored")],
        "{report:?}"
    );
    assert!(report.changes.is_empty(), "nothing is changed for an anomaly: {:?}", report.changes);
    let statuses: Vec<ReservationStatus> =
        h.app.store.reservations(AGENT).await.unwrap().iter().map(|r| r.status).collect();
    assert!(statuses.contains(&ReservationStatus::Reserved) && statuses.contains(&ReservationStatus::Settled));
}

/// The scheduled sweep with more agents than one sweep takes: each goes on after the last agent
/// the one before reconciled, on from the first past the last, never one twice in a sweep, so
/// every agent is reconciled once every ⌈agents / per sweep⌉ sweeps. A dry run and a sweep of
/// one named agent leave the place where it is.
#[tokio::test]
async fn a_sweep_goes_on_where_the_last_one_stopped_and_leaves_no_agent_out() {
    use agentpay::reconcile::{ExecutionFate, ExecutionLookup};
    use agentpay::request::AgentId;
    use agentpay_lambda::reconcile::{ReconcileFunction, ReconcileRequest};

    /// No agent here has a payment: nothing to look up.
    struct NoExecutions;
    #[async_trait::async_trait]
    impl ExecutionLookup for NoExecutions {
        async fn fate(&self, id: &str) -> Result<ExecutionFate, agentpay::error::PaymentError> {
            unreachable!("no payment, no execution {id}")
        }
        async fn ask_again(&self, id: &str) -> Result<String, agentpay::error::PaymentError> {
            unreachable!("no payment, no execution {id}")
        }
    }

    let f = crate::stores::Fixture::new(crate::stores::Backend::Sqlite).await;
    let agents: Vec<String> = (1..=7).map(|i| format!("sweep-agent-{i}")).collect();
    for agent in &agents {
        f.store.put_policy(agent, &policy("1", "10", 10)).await.unwrap();
    }
    let function = ReconcileFunction {
        store: f.store.clone(),
        agents_per_sweep: 3,
        reconciler: Reconciler::new(f.store.clone(), f.clock.clone(), Duration::from_secs(24 * 3600)),
        chain: Box::new(NoChain),
        executions: Box::new(NoExecutions),
    };
    let sweep = |request: ReconcileRequest| {
        let function = &function;
        async move {
            let answer = function.sweep(&request).await.unwrap();
            let swept: Vec<String> = answer["agents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["agentId"].as_str().unwrap().to_owned())
                .collect();
            (answer["wentOnAfter"].as_str().map(str::to_owned), swept)
        }
    };
    let mut seen = Vec::new();
    for round in 0..5 {
        let (went_on_after, swept) = sweep(ReconcileRequest::default()).await;
        assert_eq!(went_on_after, seen.last().cloned(), "round {round}");
        let distinct: std::collections::BTreeSet<&String> = swept.iter().collect();
        assert_eq!((swept.len(), distinct.len()), (3, 3), "round {round}: {swept:?}");
        seen.extend(swept);
        if round == 1 {
            // A dry run and a sweep of one agent do not move the place.
            let dry = ReconcileRequest { dry_run: true, ..Default::default() };
            assert_eq!(sweep(dry).await.1, agents[6..].iter().chain(&agents[..2]).cloned().collect::<Vec<_>>());
            let one =
                ReconcileRequest { agent_id: Some(AgentId::parse("agentId", &agents[0]).unwrap()), dry_run: false };
            assert_eq!(sweep(one).await.1, [agents[0].clone()]);
        }
    }
    // Fifteen in the agents' order, round and round: each agent within every 7 in a row.
    let expected: Vec<String> = agents.iter().cycle().take(15).cloned().collect();
    assert_eq!(seen, expected);

    // With no more agents than a sweep takes, every sweep takes them all.
    let few = ReconcileFunction { agents_per_sweep: 10, ..function };
    for _ in 0..2 {
        let answer = few.sweep(&ReconcileRequest::default()).await.unwrap();
        assert_eq!(answer["agents"].as_array().unwrap().len(), 7, "{answer}");
    }
}

/// Every execution ended before ProcessPayment, except those named, which cannot be looked up.
struct Unreachable(&'static [&'static str]);

#[async_trait::async_trait]
impl agentpay::reconcile::ExecutionLookup for Unreachable {
    async fn fate(&self, id: &str) -> Result<agentpay::reconcile::ExecutionFate, agentpay::error::PaymentError> {
        match self.0.contains(&id) {
            true => Err(agentpay::error::PaymentError::store("describe execution", "throttled, and again")),
            false => Ok(agentpay::reconcile::ExecutionFate::Ended {
                status: "FAILED".into(),
                entered_process_payment: false,
            }),
        }
    }
    async fn ask_again(&self, id: &str) -> Result<String, agentpay::error::PaymentError> {
        unreachable!("nothing is unknown here: {id}")
    }
}

/// `count` agents (`swept-1`, ...), each with a reservation left behind by an execution
/// (`exec-N`) that died before paying; a sweep of them all with `executions`; the error it
/// failed with, each agent's reservation status and the sweep's place after it.
async fn sweep_with(
    count: usize,
    executions: Unreachable,
) -> (agentpay::error::PaymentError, Vec<ReservationStatus>, Option<String>) {
    use agentpay::steps::{CheckIdempotencyInput, CheckSpendInput};
    use agentpay_lambda::reconcile::{ReconcileFunction, ReconcileRequest};

    let f = crate::stores::Fixture::new(crate::stores::Backend::Sqlite).await;
    let agents: Vec<String> = (1..=count).map(|n| format!("swept-{n}")).collect();
    for (n, agent) in agents.iter().enumerate() {
        f.store.put_policy(agent, &policy("1", "10", 10)).await.unwrap();
        let (request, execution) =
            (execution_input(&format!("key-{agent}"), agent, "10000"), format!("exec-{}", n + 1));
        let claim = f
            .steps
            .check_idempotency(CheckIdempotencyInput { request: request.clone(), execution_id: execution.clone() })
            .await
            .unwrap();
        f.steps.check_spend(CheckSpendInput { request, execution_id: execution, claim }).await.unwrap();
    }
    let function = ReconcileFunction {
        store: f.store.clone(),
        agents_per_sweep: 10,
        reconciler: Reconciler::new(f.store.clone(), f.clock.clone(), Duration::from_secs(24 * 3600)),
        chain: Box::new(NoChain),
        executions: Box::new(executions),
    };
    let error = function.sweep(&ReconcileRequest::default()).await.unwrap_err();
    let mut statuses = Vec::new();
    for agent in &agents {
        statuses.push(f.store.reservations(agent).await.unwrap()[0].status);
    }
    (error, statuses, f.store.sweep_cursor().await.unwrap())
}

/// An agent the sweep cannot reconcile (its execution cannot be looked up) does not hold up the
/// agents after it: the sweep goes on past it, moves its place, and then fails with that
/// agent's error, so the function's error alarm still tells someone.
#[tokio::test]
async fn a_sweep_goes_on_past_an_agent_it_cannot_reconcile_then_fails() {
    use ReservationStatus::{Released, Reserved};
    let (error, statuses, place) = sweep_with(3, Unreachable(&["exec-2"])).await;
    assert!(error.chain_message().contains("throttled, and again"), "{}", error.chain_message());
    assert_eq!(statuses, [Released, Reserved, Released], "the second left counted, the third reconciled");
    assert_eq!(place.as_deref(), Some("swept-3"));
}

/// Failures in a row say something outside the agents is down: after three the sweep stops,
/// its place kept before them, so the agents it did not reach come first next time.
#[tokio::test]
async fn a_sweep_stops_after_three_agents_fail_in_a_row_and_keeps_its_place() {
    use ReservationStatus::{Released, Reserved};
    let (error, statuses, place) = sweep_with(6, Unreachable(&["exec-2", "exec-3", "exec-4"])).await;
    assert!(error.chain_message().contains("throttled, and again"), "{}", error.chain_message());
    assert_eq!(statuses, [Released, Reserved, Reserved, Reserved, Reserved, Reserved], "stopped at the third failure");
    assert_eq!(place.as_deref(), Some("swept-1"), "the next sweep starts with the first that failed");
    // Two in a row are gone past.
    let (_, statuses, place) = sweep_with(4, Unreachable(&["exec-2", "exec-3"])).await;
    assert_eq!(statuses, [Released, Reserved, Reserved, Released]);
    assert_eq!(place.as_deref(), Some("swept-4"));
}
