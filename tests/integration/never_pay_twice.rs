//! Regression tests for the money leaks found in review (each failed before its fix): unknown
//! provider outcomes, key lifetimes, fencing, redrive past the TTL, ProcessPayment's store
//! retry, the cache before the policy, and a runner that died mid-execution.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use agentpay::asl::runner::{TaskFailure, TaskHandler};
use agentpay::asl::{LocalRunner, PAYMENT_DEFINITION, RecordingSleeper};
use agentpay::client::local::LocalBackend;
use agentpay::client::{PaymentClient, ReplayAction, ReplayOptions};
use agentpay::clock::{Clock, ManualClock, Timestamp};
use agentpay::config::Config;
use agentpay::error::PaymentError;
use agentpay::executions::{ExecutionRecord, ExecutionStatus, ExecutionStore, HistoryKind};
use agentpay::faults::{FaultHook, FaultPoint, ProviderFault};
use agentpay::local::LocalApp;
use agentpay::provider::PaymentOrder;
use agentpay::samples::execution_input;
use agentpay::steps::{
    CaughtError, CheckIdempotencyInput, CheckSpendInput, ClaimOutcome, CompensateInput, ProcessPaymentInput,
    RecordLedgerInput, StepName, Steps,
};
use agentpay::store::{AuditKind, IdempotencyStatus, ReservationStatus};
use serde_json::Value;
use tokio::sync::Notify;

use crate::helpers::policy;

const AGENT: &str = "npt-agent";

/// Fails invocations of one step the way Lambda does, a number of times, before or after the
/// step ran.
struct FailingHandler {
    steps: Steps,
    step: StepName,
    error: &'static str,
    after_running: bool,
    remaining: AtomicU32,
}

#[async_trait::async_trait]
impl TaskHandler for FailingHandler {
    async fn invoke(&self, step: StepName, input: Value) -> Result<Value, TaskFailure> {
        let failing = step == self.step
            && self.remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if failing && !self.after_running {
            return Err(TaskFailure { error: self.error.into(), cause: "injected before the step ran".into() });
        }
        let result = self.steps.invoke(step, input).await;
        if failing {
            return Err(TaskFailure { error: self.error.into(), cause: "injected after the step ran".into() });
        }
        result.map_err(TaskFailure::from)
    }
}

struct Harness {
    app: LocalApp,
    runner: Arc<LocalRunner>,
    client: PaymentClient,
    clock: Arc<ManualClock>,
    runs: AtomicU32,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new() -> Self {
        Self::with_failures(StepName::ProcessPayment, "none", false, 0).await
    }

    /// The local app on a virtual clock; `step` fails `count` times with `error`.
    async fn with_failures(step: StepName, error: &'static str, after_running: bool, count: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_763_700_000_000)));
        let sleeper = Arc::new(RecordingSleeper::default());
        let app = LocalApp::open(&Config::local(dir.path()), dir.path(), clock.clone(), sleeper.clone()).await.unwrap();
        app.store.put_policy(AGENT, &policy("1.00", "5.00", 100)).await.unwrap();
        let handler = Arc::new(FailingHandler {
            steps: app.steps.clone(),
            step,
            error,
            after_running,
            remaining: AtomicU32::new(count),
        });
        let runner = Arc::new(
            LocalRunner::new(PAYMENT_DEFINITION, handler, clock.clone(), app.executions.clone(), sleeper).unwrap(),
        );
        let client = PaymentClient::new(Box::new(LocalBackend::new(runner.clone(), app.executions.clone())));
        Self { app, runner, client, clock, runs: AtomicU32::new(0), _dir: dir }
    }

    async fn run(&self, input: Value) -> ExecutionRecord {
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        let key = input["idempotencyKey"].as_str().unwrap().to_owned();
        self.runner.start(&format!("{key}-{n}"), input).await.unwrap()
    }

    async fn reservations(&self) -> Vec<agentpay::store::Reservation> {
        self.app.store.reservations(AGENT).await.unwrap()
    }

    async fn key(&self, key: &str) -> agentpay::store::IdempotencyRecord {
        self.app.store.idempotency(key, self.clock.now()).await.unwrap().unwrap()
    }

    async fn window_total(&self) -> u64 {
        self.app.store.agent_ledger(AGENT).await.unwrap().window.rolled(self.clock.now()).spent.get()
    }

    fn error(record: &ExecutionRecord) -> &str {
        record.error.as_ref().map(|e| e.error.as_str()).unwrap_or_default()
    }
}

#[tokio::test]
async fn an_unknown_outcome_is_held_and_a_replay_of_the_key_returns_the_same_proof() {
    let h = Harness::new().await;
    // The proof is issued every time, but the answer is lost: first call and all three retries.
    h.app.provider.fail_next(ProviderFault::OutcomeUnknownAfterProof, 4);
    let held = h.run(execution_input("npt-unknown", AGENT, "250000")).await;
    assert_eq!((held.status, Harness::error(&held)), (ExecutionStatus::Failed, "PaymentOutcomeUnknown"));
    assert_eq!(held.failed_state.as_deref(), Some("PaymentOutcomeUnknown"));
    let cause = &held.error.as_ref().unwrap().cause;
    assert!(cause.contains("stays counted") && cause.contains("same idempotency key again"), "{cause}");

    // Not compensated: the reservation still counts, the key keeps its claim and token.
    let reservation = h.reservations().await.remove(0);
    assert_eq!(reservation.status, ReservationStatus::Reserved);
    assert_eq!(h.window_total().await, 250_000);
    let record = h.key("npt-unknown").await;
    assert_eq!((record.status, record.attempt), (IdempotencyStatus::InProgress, 1));
    assert!(record.lease_expires_at <= h.clock.now(), "the hold ends the lease: a replay need not wait");
    let audit = h.app.store.audit_events(AGENT).await.unwrap();
    assert!(audit.iter().any(|e| e.kind == AuditKind::OutcomeUnknown), "{audit:?}");
    assert!(!audit.iter().any(|e| e.kind == AuditKind::Released));

    // Replaying the execution starts the key again: it adopts the claim and gets the same proof.
    let replay = h.client.replay(&held.execution_id, h.clock.now(), ReplayOptions::default()).await.unwrap();
    assert_eq!(replay.action, ReplayAction::StartedFresh, "{:?}", replay.reason);
    assert_eq!(replay.result.as_ref().unwrap().status, "SUCCEEDED");
    let reservations = h.reservations().await;
    assert_eq!(reservations.len(), 1, "the same reservation, not a second one");
    assert_eq!(reservations[0].status, ReservationStatus::Authorized);
    assert_eq!(h.app.provider.delegated_calls(), 5, "asked five times with one token");
    let paid = h.key("npt-unknown").await;
    let payment_id = paid.result.unwrap()["paymentId"].as_str().unwrap().to_owned();
    assert_eq!(reservations[0].payment_id.as_deref(), Some(payment_id.as_str()));
    assert_eq!(h.window_total().await, 250_000, "counted once");
}

#[tokio::test]
async fn a_lambda_that_dies_in_process_payment_is_held_never_compensated() {
    for error in ["Sandbox.Timedout", "Lambda.Unknown", "States.Timeout"] {
        // It dies after the provider was called, on the first try and every retry.
        let h = Harness::with_failures(StepName::ProcessPayment, error, true, 4).await;
        let record = h.run(execution_input("npt-crash", AGENT, "10000")).await;
        assert_eq!(Harness::error(&record), "PaymentOutcomeUnknown", "{error}");
        assert_eq!(h.reservations().await[0].status, ReservationStatus::Reserved, "{error}");
        assert_eq!(h.key("npt-crash").await.status, IdempotencyStatus::InProgress, "{error}");
        // The proof it issued is the one the key gets.
        let again = h.run(execution_input("npt-crash", AGENT, "10000")).await;
        assert_eq!(again.status, ExecutionStatus::Succeeded, "{error}");
        assert_eq!(h.app.provider.delegated_calls(), 5, "{error}");
        assert_eq!(h.reservations().await.len(), 1, "{error}");
    }
}

#[tokio::test]
async fn a_definite_refusal_is_still_compensated() {
    let h = Harness::new().await;
    h.app.provider.fail_next(ProviderFault::Rejected, 1);
    let record = h.run(execution_input("npt-refused", AGENT, "10000")).await;
    assert_eq!((Harness::error(&record), record.failed_state.as_deref()), ("ProviderRejected", Some("PaymentFailed")));
    assert_eq!(h.reservations().await[0].status, ReservationStatus::Released);
    assert_eq!(h.window_total().await, 0);
}

#[tokio::test]
async fn a_key_reused_after_its_record_expired_is_a_new_payment_with_new_ids() {
    let h = Harness::new().await;
    let first = h.run(execution_input("npt-reuse", AGENT, "100000")).await;
    assert_eq!(first.status, ExecutionStatus::Succeeded);
    h.clock.advance(Duration::from_secs(25 * 3600));
    // The record expired (DynamoDB may not have deleted it yet: it reads as absent anyway).
    let second = h.run(execution_input("npt-reuse", AGENT, "200000")).await;
    assert_eq!(second.status, ExecutionStatus::Succeeded, "{:?}", second.error);
    let output = |r: &ExecutionRecord| r.output.clone().unwrap();
    assert_eq!(output(&second)["fromCache"], false);
    assert_ne!(output(&first)["paymentId"], output(&second)["paymentId"], "a new proof, not the old one");
    let reservations = h.reservations().await;
    assert_eq!(reservations.len(), 2, "a new reservation counts the new spend");
    assert_ne!(reservations[0].claim_id, reservations[1].claim_id);
    assert_ne!(reservations[0].client_token, reservations[1].client_token);
    assert!(reservations.iter().all(|r| r.status == ReservationStatus::Authorized));
    assert_eq!(h.window_total().await, 200_000, "yesterday's payment left the window, today's counts");
}

/// Found by the fault simulator (seed 10999263599068743618): an execution whose key it paid
/// ran CheckIdempotency again after the record had expired (a late invocation of the step).
/// Its new record has the same derived claim, so it meets its own AUTHORIZED reservation:
/// every step answered with the payment made, but RecordLedger left the key IN_PROGRESS for
/// good. Now the key completes with that payment; nothing is paid or counted twice.
#[tokio::test]
async fn the_same_execution_claiming_after_its_record_expired_completes_with_its_payment() {
    let h = Harness::new().await;
    let steps = &h.app.steps;
    let input = execution_input("npt-late", AGENT, "100000");
    let execution = "arn:local:execution:late".to_owned();
    let pay = || async {
        let claim = steps
            .check_idempotency(CheckIdempotencyInput { request: input.clone(), execution_id: execution.clone() })
            .await
            .unwrap();
        let spend = CheckSpendInput { request: input.clone(), execution_id: execution.clone(), claim: claim.clone() };
        let reservation = steps.check_spend(spend).await.unwrap();
        let order = ProcessPaymentInput {
            request: input.clone(),
            execution_id: execution.clone(),
            claim: claim.clone(),
            reservation: reservation.clone(),
            retry_count: 0,
        };
        let proof = steps.process_payment(order).await.unwrap();
        let record =
            RecordLedgerInput { request: input.clone(), execution_id: execution.clone(), claim, reservation, proof };
        steps.record_ledger(record).await.unwrap().payment_id
    };
    let first = pay().await;
    h.clock.advance(Duration::from_secs(25 * 3600));
    let second = pay().await;
    assert_eq!(second, first, "the payment that execution made, not a new one");
    let record = h.key("npt-late").await;
    assert_eq!(record.status, IdempotencyStatus::Completed, "the key is not left IN_PROGRESS: {record:?}");
    let reservations = h.reservations().await;
    assert_eq!(reservations.len(), 1);
    assert_eq!(reservations[0].status, ReservationStatus::Authorized);
    assert_eq!(h.window_total().await, 0, "yesterday's payment left the window; nothing new was counted");
}

fn caught(error: &str) -> CaughtError {
    CaughtError { error: error.into(), cause: format!("{{\"errorType\":\"{error}\",\"errorMessage\":\"{error}\"}}") }
}

#[tokio::test]
async fn a_takeover_fences_the_old_holder_out_of_every_write() {
    let h = Harness::new().await;
    let steps = &h.app.steps;
    let input = execution_input("npt-fence", AGENT, "300000");
    let (a, b) = ("arn:local:execution:a".to_owned(), "arn:local:execution:b".to_owned());
    let claim_a = steps
        .check_idempotency(CheckIdempotencyInput { request: input.clone(), execution_id: a.clone() })
        .await
        .unwrap();
    let reservation = steps
        .check_spend(CheckSpendInput { request: input.clone(), execution_id: a.clone(), claim: claim_a.clone() })
        .await
        .unwrap();

    // A stalls past its lease; B takes the key over: the same claim, attempt and token.
    h.clock.advance(Duration::from_secs(21 * 60));
    let claim_b = steps
        .check_idempotency(CheckIdempotencyInput { request: input.clone(), execution_id: b.clone() })
        .await
        .unwrap();
    assert_eq!(claim_b.outcome, ClaimOutcome::Claimed);
    assert_eq!(
        (&claim_b.claim_id, claim_b.attempt, &claim_b.reservation_id, &claim_b.client_token),
        (&claim_a.claim_id, claim_a.attempt, &claim_a.reservation_id, &claim_a.client_token)
    );

    // A, redriven late, may not release B's reservation nor mark the key.
    let compensation = steps
        .compensate(CompensateInput {
            request: input.clone(),
            execution_id: a.clone(),
            claim: claim_a.clone(),
            error: caught("ProviderRejected"),
            mode: Default::default(),
            entered_at: None,
        })
        .await
        .unwrap();
    assert_eq!((compensation.error.as_str(), compensation.released), ("ClaimSuperseded", false));
    assert!(compensation.cause.contains(&b), "{}", compensation.cause);
    assert_eq!(h.reservations().await[0].status, ReservationStatus::Reserved);
    assert_eq!(h.key("npt-fence").await.execution_id, b);
    let spend_again = steps
        .check_spend(CheckSpendInput { request: input.clone(), execution_id: a.clone(), claim: claim_a.clone() })
        .await;
    assert!(spend_again.is_ok(), "reading its own reservation back is no write");

    // B pays and records; A's late RecordLedger with the same proof is answered, not applied.
    let proof = steps
        .process_payment(ProcessPaymentInput {
            request: input.clone(),
            execution_id: b.clone(),
            claim: claim_b.clone(),
            reservation: reservation.clone(),
            retry_count: 0,
        })
        .await
        .unwrap();
    let recorded = steps
        .record_ledger(RecordLedgerInput {
            request: input.clone(),
            execution_id: b.clone(),
            claim: claim_b.clone(),
            reservation: reservation.clone(),
            proof: proof.clone(),
        })
        .await
        .unwrap();
    let late = steps
        .record_ledger(RecordLedgerInput {
            request: input.clone(),
            execution_id: a.clone(),
            claim: claim_a.clone(),
            reservation: reservation.clone(),
            proof,
        })
        .await
        .unwrap();
    assert_eq!(late.payment_id, recorded.payment_id);
    assert_eq!(h.reservations().await[0].status, ReservationStatus::Authorized);
    // A's compensation after B recorded: superseded, not an inconsistency, nothing written.
    let after_record = steps
        .compensate(CompensateInput {
            request: input.clone(),
            execution_id: a.clone(),
            claim: claim_a.clone(),
            error: caught("Sandbox.Timedout"),
            mode: Default::default(),
            entered_at: None,
        })
        .await
        .unwrap();
    assert_eq!(after_record.error, "ClaimSuperseded");
    assert!(after_record.cause.contains("COMPLETED"), "{}", after_record.cause);

    // A hold by the fenced execution writes nothing either.
    let hold = steps
        .compensate(CompensateInput {
            request: input,
            execution_id: a,
            claim: claim_a,
            error: caught("PaymentOutcomeUnknown"),
            mode: agentpay::steps::CompensationMode::HoldUnknown,
            entered_at: Some("t".into()),
        })
        .await
        .unwrap();
    assert_eq!(hold.error, "ClaimSuperseded");
    assert_eq!(h.key("npt-fence").await.status, IdempotencyStatus::Completed);
}

#[tokio::test]
async fn a_record_ledger_redrive_on_day_13_records_the_proof() {
    let h = Harness::new().await;
    h.app.ledger.fail_next_authorizations(5);
    let failed = h.run(execution_input("npt-day13", AGENT, "10000")).await;
    assert_eq!(failed.failed_state.as_deref(), Some("RecordLedger"));
    h.clock.advance(Duration::from_secs(13 * 24 * 3600));
    // Step Functions still redrives (14 days); the claim is still there to record against.
    assert_eq!(h.key("npt-day13").await.status, IdempotencyStatus::InProgress);
    let redriven = h.runner.redrive(&failed.execution_id).await.unwrap();
    assert_eq!(redriven.status, ExecutionStatus::Succeeded, "{:?}", redriven.error);
    assert_eq!(h.reservations().await[0].status, ReservationStatus::Authorized);
    // Once finished, the record lives the ordinary 24 hours from then.
    let completed = h.key("npt-day13").await;
    assert_eq!(completed.expires_at, h.clock.now().plus(Duration::from_secs(24 * 3600)));
}

#[tokio::test]
async fn process_payment_retries_a_store_outage_instead_of_compensating() {
    let h = Harness::with_failures(StepName::ProcessPayment, "StoreUnavailable", false, 2).await;
    let record = h.run(execution_input("npt-store", AGENT, "10000")).await;
    assert_eq!(record.status, ExecutionStatus::Succeeded, "{:?}", record.error);
    let history = h.app.executions.history(&record.execution_id).await.unwrap();
    let retries = history
        .iter()
        .filter(|e| e.kind == HistoryKind::TaskRetryScheduled && e.state.as_deref() == Some("ProcessPayment"))
        .count();
    assert_eq!(retries, 2);
}

#[tokio::test]
async fn a_completed_key_answers_from_its_cache_whatever_the_policy_says_now() {
    let h = Harness::new().await;
    let input = execution_input("npt-cache", AGENT, "10000");
    let paid = h.run(input.clone()).await;
    assert_eq!(paid.status, ExecutionStatus::Succeeded);
    // The agent is paused and its network no longer allowed: the paid key still answers.
    let mut changed = policy("1.00", "5.00", 100);
    changed.allowed_networks = vec![agentpay::payment::Network::Base];
    h.app.store.put_policy(AGENT, &changed).await.unwrap();
    h.app.store.set_paused(AGENT, true).await.unwrap();
    let again = h.run(input).await;
    assert_eq!(again.status, ExecutionStatus::Succeeded, "{:?}", again.error);
    let output = again.output.unwrap();
    assert_eq!(output["fromCache"], true);
    assert_eq!(output["paymentId"], paid.output.unwrap()["paymentId"]);
    assert_eq!(h.app.provider.delegated_calls(), 1);
}

/// Stops the runner's process (drops the execution's future) at one fault point.
struct KillAt {
    point: FaultPoint,
    kill: Notify,
    fired: AtomicU32,
}

#[async_trait::async_trait]
impl FaultHook for KillAt {
    async fn at(&self, point: FaultPoint, _order: Option<&PaymentOrder>) -> Result<(), PaymentError> {
        if point == self.point && self.fired.fetch_add(1, Ordering::SeqCst) == 0 {
            self.kill.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn an_execution_whose_runner_died_is_resumed_where_it_stopped() {
    for point in [FaultPoint::After("reserve"), FaultPoint::After("process_payment"), FaultPoint::Before("authorize")] {
        let h = Harness::new().await;
        let hook = Arc::new(KillAt { point, kill: Notify::new(), fired: AtomicU32::new(0) });
        h.app.ledger.set_hook(Some(hook.clone()));
        h.app.provider.set_hook(Some(hook.clone()));
        let run = h.runner.start("npt-died", execution_input("npt-died", AGENT, "10000"));
        tokio::select! {
            biased;
            _ = run => panic!("{point:?}: the execution should have died"),
            _ = hook.kill.notified() => {}
        }
        let stuck = h.app.executions.execution("npt-died").await.unwrap().unwrap();
        assert_eq!(stuck.status, ExecutionStatus::Running, "{point:?}");

        let resumed = h.runner.resume("npt-died").await.unwrap();
        assert_eq!(resumed.status, ExecutionStatus::Succeeded, "{point:?}: {:?}", resumed.error);
        assert_eq!(h.reservations().await[0].status, ReservationStatus::Authorized, "{point:?}");
        let history = h.app.executions.history(&resumed.execution_id).await.unwrap();
        assert!(history.iter().any(|e| e.kind == HistoryKind::ExecutionResumed), "{point:?}");
        // A finished execution is not resumed again.
        assert!(h.runner.resume("npt-died").await.is_err());
    }
}

/// Found by the fault simulator (seed 16213059664923265925): the runner died after the
/// provider issued a proof but before the history recorded the call; the agent was paused; the
/// resumed execution called ProcessPayment as a first attempt, was refused (AgentPaused, a
/// definite refusal) and released the reservation of an issued proof. A resumed task may have
/// run: it runs as a retry, so the pause holds the payment as unknown instead.
#[tokio::test]
async fn a_resumed_payment_whose_proof_may_exist_is_held_not_released_by_a_pause() {
    let h = Harness::new().await;
    let hook =
        Arc::new(KillAt { point: FaultPoint::After("process_payment"), kill: Notify::new(), fired: AtomicU32::new(0) });
    h.app.provider.set_hook(Some(hook.clone()));
    let run = h.runner.start("npt-paused", execution_input("npt-paused", AGENT, "10000"));
    tokio::select! {
        biased;
        _ = run => panic!("the execution should have died"),
        _ = hook.kill.notified() => {}
    }
    assert_eq!(h.app.provider.delegated_calls(), 1, "the proof was issued before the runner died");
    h.app.store.set_paused(AGENT, true).await.unwrap();
    let resumed = h.runner.resume("npt-paused").await.unwrap();
    assert_eq!(resumed.error.as_ref().map(|e| e.error.as_str()), Some("PaymentOutcomeUnknown"), "{resumed:?}");
    assert_eq!(h.reservations().await[0].status, ReservationStatus::Reserved, "still counted");
    // Resumed agent, replayed key: the same client token brings the issued proof back.
    h.app.store.set_paused(AGENT, false).await.unwrap();
    let replayed = h.run(execution_input("npt-paused", AGENT, "10000")).await;
    assert_eq!(replayed.status, ExecutionStatus::Succeeded, "{:?}", replayed.error);
    assert_eq!(h.reservations().await[0].status, ReservationStatus::Authorized);
}

/// The provider's answers, scripted per call: the first call's answer is lost after the proof
/// was issued, every later call is throttled.
struct LostThenThrottled {
    calls: AtomicU32,
}

#[async_trait::async_trait]
impl FaultHook for LostThenThrottled {
    async fn at(&self, point: FaultPoint, _order: Option<&PaymentOrder>) -> Result<(), PaymentError> {
        match point {
            FaultPoint::Before("process_payment") if self.calls.fetch_add(1, Ordering::SeqCst) > 0 => {
                Err(PaymentError::ProviderUnavailable {
                    provider: "dev-wallet",
                    message: "throttled".into(),
                    source: None,
                })
            }
            FaultPoint::After("process_payment") => Err(PaymentError::PaymentOutcomeUnknown {
                provider: "dev-wallet",
                message: "the answer was lost".into(),
                source: None,
            }),
            _ => Ok(()),
        }
    }
}

/// Found by the simulator: a time-out after the proof, then throttling on every retry, ended
/// in ProviderUnavailable and was compensated while the proof existed.
#[tokio::test]
async fn a_throttle_after_an_unknown_outcome_is_not_a_refusal() {
    let h = Harness::new().await;
    h.app.provider.set_hook(Some(Arc::new(LostThenThrottled { calls: AtomicU32::new(0) })));
    let record = h.run(execution_input("npt-lost-throttled", AGENT, "10000")).await;
    assert_eq!(Harness::error(&record), "PaymentOutcomeUnknown", "{:?}", record.error);
    assert_eq!(h.reservations().await[0].status, ReservationStatus::Reserved, "the proof exists: still counted");
    h.app.provider.set_hook(None);
    let again = h.run(execution_input("npt-lost-throttled", AGENT, "10000")).await;
    assert_eq!(again.status, ExecutionStatus::Succeeded);
    assert_eq!(h.reservations().await[0].status, ReservationStatus::Authorized);
}

/// A first-call throttle of a claim nobody held before is a plain retry; a throttle after that
/// cannot vouch for the earlier calls, so a storm ends held, never compensated.
#[tokio::test]
async fn a_throttle_storm_is_retried_then_held_never_compensated() {
    let h = Harness::new().await;
    h.app.provider.fail_next(ProviderFault::Unavailable, 1);
    let record = h.run(execution_input("npt-throttled-once", AGENT, "10000")).await;
    assert_eq!(record.status, ExecutionStatus::Succeeded, "one throttle, then the proof");
    // Every attempt throttled: after the first, an earlier call may have been processed.
    h.app.provider.fail_next(ProviderFault::Unavailable, 10);
    let storm = h.run(execution_input("npt-throttled-always", AGENT, "10000")).await;
    assert_eq!(Harness::error(&storm), "PaymentOutcomeUnknown");
    let reservations = h.reservations().await;
    assert_eq!(reservations[1].status, ReservationStatus::Reserved);
}

/// Holds the execution at one fault point until released.
struct Gate {
    point: FaultPoint,
    reached: Notify,
    release: Notify,
}

#[async_trait::async_trait]
impl FaultHook for Gate {
    async fn at(&self, point: FaultPoint, _order: Option<&PaymentOrder>) -> Result<(), PaymentError> {
        if point == self.point {
            self.reached.notify_one();
            self.release.notified().await;
        }
        Ok(())
    }
}

/// A live execution is never resumed, not even after a refused duplicate start of its name.
#[tokio::test]
async fn a_live_execution_is_not_resumed_under_its_runner() {
    let h = Harness::new().await;
    let gate = Arc::new(Gate { point: FaultPoint::Before("reserve"), reached: Notify::new(), release: Notify::new() });
    h.app.ledger.set_hook(Some(gate.clone()));
    let input = execution_input("npt-live", AGENT, "10000");
    let running = h.runner.start("npt-live", input.clone());
    let meanwhile = async {
        gate.reached.notified().await;
        let duplicate = h.runner.start("npt-live", input.clone()).await;
        assert!(matches!(duplicate, Err(agentpay::asl::RunnerError::ExecutionAlreadyExists(_))));
        let resumed = h.runner.resume("npt-live").await.unwrap_err().to_string();
        assert!(resumed.contains("running in this process"), "{resumed}");
        gate.release.notify_one();
    };
    let (record, ()) = tokio::join!(running, meanwhile);
    assert_eq!(record.unwrap().status, ExecutionStatus::Succeeded);
}

/// Found by the simulator (a random seed in a full run): an old holder stalled before its
/// reservation write while the execution that took the key over reserved, was refused and
/// compensated; the old holder then met the released reservation and failed LedgerInconsistent.
#[tokio::test]
async fn a_stalled_holder_meeting_its_claim_compensated_elsewhere_is_superseded() {
    let h = Harness::new().await;
    let steps = &h.app.steps;
    let input = execution_input("npt-stalled", AGENT, "10000");
    let (a, b) = ("arn:local:execution:stalled".to_owned(), "arn:local:execution:taker".to_owned());
    let claim_a = steps
        .check_idempotency(CheckIdempotencyInput { request: input.clone(), execution_id: a.clone() })
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(21 * 60));
    let claim_b = steps
        .check_idempotency(CheckIdempotencyInput { request: input.clone(), execution_id: b.clone() })
        .await
        .unwrap();
    steps
        .check_spend(CheckSpendInput { request: input.clone(), execution_id: b.clone(), claim: claim_b.clone() })
        .await
        .unwrap();
    let compensation = steps
        .compensate(CompensateInput {
            request: input.clone(),
            execution_id: b,
            claim: claim_b,
            error: caught("ProviderRejected"),
            mode: Default::default(),
            entered_at: None,
        })
        .await
        .unwrap();
    assert!(compensation.released);
    let late = steps.check_spend(CheckSpendInput { request: input, execution_id: a, claim: claim_a }).await;
    let error = late.unwrap_err();
    assert_eq!(error.name(), "ClaimSuperseded", "{error}");
    assert!(error.to_string().contains("FAILED by execution arn:local:execution:taker"), "{error}");
}

/// Found by the fault simulator (seed 6931505452572252592): A reserved, then stalled past its
/// lease; B took the key over, met A's reservation, was refused by the wallet and released
/// it; A then woke up and paid, a proof for a released reservation. A stalled holder must
/// look at its claim before it pays.
#[tokio::test]
async fn a_stalled_holder_does_not_pay_for_a_reservation_its_taker_released() {
    let h = Harness::new().await;
    let steps = &h.app.steps;
    let input = execution_input("npt-zombie", AGENT, "10000");
    let (a, b) = ("arn:local:execution:zombie".to_owned(), "arn:local:execution:taker".to_owned());
    let claim_a = steps
        .check_idempotency(CheckIdempotencyInput { request: input.clone(), execution_id: a.clone() })
        .await
        .unwrap();
    let reservation_a = steps
        .check_spend(CheckSpendInput { request: input.clone(), execution_id: a.clone(), claim: claim_a.clone() })
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(21 * 60));
    let claim_b = steps
        .check_idempotency(CheckIdempotencyInput { request: input.clone(), execution_id: b.clone() })
        .await
        .unwrap();
    assert!(claim_b.adopted && claim_b.client_token == claim_a.client_token, "the takeover keeps the token");
    let reservation_b = steps
        .check_spend(CheckSpendInput { request: input.clone(), execution_id: b.clone(), claim: claim_b.clone() })
        .await
        .unwrap();
    assert_eq!(reservation_b.reservation_id, reservation_a.reservation_id, "B met A's reservation");
    h.app.provider.fail_next(ProviderFault::Rejected, 1);
    let refused = steps
        .process_payment(ProcessPaymentInput {
            request: input.clone(),
            execution_id: b.clone(),
            claim: claim_b.clone(),
            reservation: reservation_b,
            retry_count: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.name(), "ProviderRejected");
    let compensation = steps
        .compensate(CompensateInput {
            request: input.clone(),
            execution_id: b,
            claim: claim_b,
            error: caught("ProviderRejected"),
            mode: Default::default(),
            entered_at: None,
        })
        .await
        .unwrap();
    assert!(compensation.released);
    let calls_before = h.app.provider.delegated_calls();

    let late = steps
        .process_payment(ProcessPaymentInput {
            request: input,
            execution_id: a,
            claim: claim_a,
            reservation: reservation_a,
            retry_count: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(late.name(), "ClaimSuperseded", "{late}");
    assert!(late.to_string().contains("FAILED by execution arn:local:execution:taker"), "{late}");
    assert_eq!(h.app.provider.delegated_calls(), calls_before, "the wallet was not asked");
    assert_eq!(h.reservations().await[0].status, ReservationStatus::Released);
    assert_eq!(h.window_total().await, 0, "nothing counts: nothing was paid");
}
