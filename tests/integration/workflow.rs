//! Every demo scenario through the real ASL file and the local runner.

use std::time::Duration;

use agentpay::executions::{ExecutionStatus, HistoryKind};
use agentpay::faults::ProviderFault;
use agentpay::samples::{execution_input, execution_input_with_challenge, v1_payment_required};
use agentpay::store::{AuditKind, IdempotencyStatus, ReservationStatus, Store};
use base64::Engine;
use serde_json::{Value, json};

use crate::helpers::{TestApp, policy};

const AGENT: &str = "agent-7";

fn decode_header(value: &str) -> Value {
    serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(value).unwrap()).unwrap()
}

#[tokio::test]
async fn a_paid_call_authorizes_records_and_audits() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 10)).await;
    let record = t.run(execution_input("pay-1", AGENT, "10000")).await;
    assert_eq!(record.status, ExecutionStatus::Succeeded, "{record:?}");
    let output = record.output.clone().unwrap();
    assert_eq!(output["status"], "AUTHORIZED");
    assert_eq!(output["fromCache"], false);
    assert_eq!(output["amount"]["value"], "10000");
    assert_eq!(output["amount"]["display"], "0.01 USDC");
    assert_eq!(output["amount"]["network"], "eip155:84532");
    assert_eq!(output["header"]["name"], "PAYMENT-SIGNATURE");
    let payload = decode_header(output["header"]["value"].as_str().unwrap());
    assert_eq!(payload["payload"]["authorization"]["from"], t.app.wallet_address.clone().unwrap());

    assert_eq!(t.tasks_run(&record).await, ["CheckIdempotency", "CheckSpend", "ProcessPayment", "RecordLedger"]);

    let reservations = t.app.store.reservations(AGENT).await.unwrap();
    assert_eq!(reservations.len(), 1);
    assert_eq!(reservations[0].status, ReservationStatus::Authorized);
    assert_eq!(reservations[0].payment_id.as_deref(), output["paymentId"].as_str());

    let audit = t.app.store.audit_events(AGENT).await.unwrap();
    assert_eq!(audit.len(), 1);
    let event = &audit[0];
    assert_eq!(event.kind, AuditKind::Authorized);
    assert_eq!(event.execution_id, record.execution_id);
    assert_eq!(event.context.delegated_by, "alice@example.com");
    assert_eq!(event.resource, "https://api.example.com/credit-report");
    let limits = event.limits.as_ref().unwrap();
    assert_eq!((limits.spent_24h_before.get(), limits.spent_24h_after.get()), (0, 10_000));
    assert_eq!(limits.daily_limit.get(), 5_000_000);

    let key = t.app.store.idempotency("pay-1", t.app.steps.clock().now()).await.unwrap().unwrap();
    assert_eq!(key.status, IdempotencyStatus::Completed);
}

#[tokio::test]
async fn a_duplicate_returns_the_cached_proof_without_paying_again() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 10)).await;
    let first = t.run(execution_input("dup-1", AGENT, "10000")).await;
    let second = t.run(execution_input("dup-1", AGENT, "10000")).await;
    assert_eq!(second.status, ExecutionStatus::Succeeded);
    let (a, b) = (first.output.clone().unwrap(), second.output.clone().unwrap());
    assert_eq!(b["fromCache"], true);
    assert_eq!(a["paymentId"], b["paymentId"]);
    assert_eq!(a["header"], b["header"]);
    // The second execution never reached the spend check or the wallet.
    assert_eq!(t.tasks_run(&second).await, ["CheckIdempotency"]);
    assert_eq!(t.app.provider.delegated_calls(), 1);
    assert_eq!(t.app.store.reservations(AGENT).await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_same_key_with_another_request_is_rejected() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 10)).await;
    t.run(execution_input("reuse-1", AGENT, "10000")).await;
    let record = t.run(execution_input("reuse-1", AGENT, "20000")).await;
    assert_eq!(record.status, ExecutionStatus::Failed);
    let error = record.error.unwrap();
    assert_eq!(error.error, "IdempotencyKeyReused");
    assert!(error.cause.contains("use a new key"), "{}", error.cause);
    assert_eq!(record.failed_state.as_deref(), Some("PaymentRejected"));
}

#[tokio::test]
async fn the_daily_cap_denies_and_the_denial_is_compensated_and_audited() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "1.50", 10)).await;
    assert_eq!(t.run(execution_input("cap-1", AGENT, "1000000")).await.status, ExecutionStatus::Succeeded);
    let denied = t.run(execution_input("cap-2", AGENT, "600000")).await;
    assert_eq!(denied.status, ExecutionStatus::Failed);
    let error = denied.error.clone().unwrap();
    assert_eq!(error.error, "SpendLimitExceeded");
    assert!(error.cause.contains("rolling 24-hour limit"), "{}", error.cause);
    assert!(error.cause.contains("limit 1500000") && error.cause.contains("remaining 500000"), "{}", error.cause);
    assert_eq!(denied.failed_state.as_deref(), Some("PaymentFailed"));
    assert_eq!(t.tasks_run(&denied).await, ["CheckIdempotency", "CheckSpend", "Compensate"]);

    // Nothing reserved for the denied payment; the key is DENIED; the denial is audited.
    assert_eq!(t.app.store.reservations(AGENT).await.unwrap().len(), 1);
    let key = t.app.store.idempotency("cap-2", t.app.steps.clock().now()).await.unwrap().unwrap();
    assert_eq!(key.status, IdempotencyStatus::Denied);
    let audit = t.app.store.audit_events(AGENT).await.unwrap();
    assert_eq!(audit.iter().map(|e| e.kind).collect::<Vec<_>>(), [AuditKind::Authorized, AuditKind::Denied]);
    assert_eq!(audit[1].error.as_ref().unwrap().error, "SpendLimitExceeded");
}

#[tokio::test]
async fn an_invalid_challenge_is_rejected_precisely_and_leaves_nothing_behind() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 10)).await;
    let mut body = agentpay::samples::v2_payment_required("10000");
    body["accepts"][0]["payTo"] = json!("0x209693bc6afc0C5328bA36FaF03C514EF312287C");
    let input =
        execution_input_with_challenge("bad-1", AGENT, json!({"x402": agentpay::x402::encode_v2_header(&body)}));
    let record = t.run(input).await;
    assert_eq!(record.status, ExecutionStatus::Failed);
    let error = record.error.unwrap();
    assert_eq!(error.error, "InvalidPaymentRequest");
    assert!(error.cause.contains("challenge.x402.accepts[0].payTo"), "{}", error.cause);
    assert!(error.cause.contains("0x209693Bc6afc0C5328bA36FaF03C514EF312287C"), "{}", error.cause);
    assert!(t.app.store.idempotency("bad-1", t.app.steps.clock().now()).await.unwrap().is_none());
    assert!(t.app.store.reservations(AGENT).await.unwrap().is_empty());
    assert!(t.app.store.audit_events(AGENT).await.unwrap().is_empty());
    assert_eq!(t.app.provider.delegated_calls(), 0);
}

#[tokio::test]
async fn a_provider_outage_is_retried_as_the_asl_says_then_held_not_compensated() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 10)).await;
    // Five calls throttled: every attempt the ASL allows.
    t.app.provider.fail_next(ProviderFault::Unavailable, 5);
    let record = t.run(execution_input("down-1", AGENT, "10000")).await;
    assert_eq!(record.status, ExecutionStatus::Failed);
    // The first throttle is a plain retry; a throttle after it cannot vouch for the calls
    // before it, so it counts as an unknown outcome: held, never compensated.
    assert_eq!(record.error.as_ref().unwrap().error, "PaymentOutcomeUnknown");
    assert_eq!(record.failed_state.as_deref(), Some("PaymentOutcomeUnknown"));
    // 1 try, 1 ProviderUnavailable retry, 3 unknown-outcome retries (same client token), with
    // full jitter under 2 s, then 2 s, 4 s, 8 s.
    let tasks = t.tasks_run(&record).await;
    assert_eq!(tasks.iter().filter(|s| *s == "ProcessPayment").count(), 5);
    let delays = t.sleeper.requested();
    assert_eq!(delays.len(), 4);
    for (delay, cap) in delays.iter().zip([2, 2, 4, 8]) {
        assert!(*delay <= Duration::from_secs(cap), "{delays:?}");
    }
    assert_eq!(tasks.last().map(String::as_str), Some("HoldUnknownOutcome"));

    let reservation = &t.app.store.reservations(AGENT).await.unwrap()[0];
    assert_eq!(reservation.status, ReservationStatus::Reserved, "still counted");
    let key = t.app.store.idempotency("down-1", t.app.steps.clock().now()).await.unwrap().unwrap();
    assert_eq!(key.status, IdempotencyStatus::InProgress);

    // The same key started again once the provider is back: the same claim, token and
    // reservation, now paid.
    let retry = t.run(execution_input("down-1", AGENT, "10000")).await;
    assert_eq!(retry.status, ExecutionStatus::Succeeded, "{:?}", retry.error);
    let reservations = t.app.store.reservations(AGENT).await.unwrap();
    assert_eq!(reservations.len(), 1);
    assert_eq!(reservations[0].status, ReservationStatus::Authorized);
}

#[tokio::test]
async fn a_transient_outage_recovers_within_the_retries() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 10)).await;
    t.app.provider.fail_next(ProviderFault::Unavailable, 2);
    let record = t.run(execution_input("blip-1", AGENT, "10000")).await;
    assert_eq!(record.status, ExecutionStatus::Succeeded);
    assert_eq!(t.app.provider.delegated_calls(), 1);
    let retries = t.history(&record).await.into_iter().filter(|e| e.kind == HistoryKind::TaskRetryScheduled).count();
    assert_eq!(retries, 2);
}

#[tokio::test]
async fn a_rejected_payment_is_compensated_at_once() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 10)).await;
    t.app.provider.fail_next(ProviderFault::Rejected, 1);
    let record = t.run(execution_input("rejected-1", AGENT, "10000")).await;
    let error = record.error.clone().unwrap();
    assert_eq!(error.error, "ProviderRejected");
    assert!(error.cause.contains("insufficient funds"), "{}", error.cause);
    // Not retryable: one try, then compensation.
    assert_eq!(t.tasks_run(&record).await, ["CheckIdempotency", "CheckSpend", "ProcessPayment", "Compensate"]);
    assert!(t.sleeper.requested().is_empty());
    assert_eq!(t.app.store.reservations(AGENT).await.unwrap()[0].status, ReservationStatus::Released);
    let audit = t.app.store.audit_events(AGENT).await.unwrap();
    assert_eq!(audit[0].kind, AuditKind::Released);
    assert_eq!(audit[0].error.as_ref().unwrap().error, "ProviderRejected");
}

#[tokio::test]
async fn a_failed_record_ledger_is_not_compensated_and_redrive_completes_it() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 10)).await;
    // More failures than RecordLedger's retries (1 + 4).
    t.app.ledger.fail_next_authorizations(5);
    let record = t.run(execution_input("ledger-1", AGENT, "10000")).await;
    assert_eq!(record.status, ExecutionStatus::Failed);
    assert_eq!(record.failed_state.as_deref(), Some("RecordLedger"));
    assert_eq!(record.error.as_ref().unwrap().error, "StoreUnavailable");
    let tasks = t.tasks_run(&record).await;
    assert!(!tasks.contains(&"Compensate".to_owned()), "{tasks:?}");
    // The reservation still holds the money: the proof exists.
    assert_eq!(t.app.store.reservations(AGENT).await.unwrap()[0].status, ReservationStatus::Reserved);

    let redriven = t.app.runner.redrive(&record.execution_id).await.unwrap();
    assert_eq!(redriven.status, ExecutionStatus::Succeeded, "{redriven:?}");
    assert_eq!(redriven.redrive_count, 1);
    assert_eq!(redriven.execution_id, record.execution_id);
    // Succeeded steps were not run again: one wallet call in all, one more RecordLedger.
    assert_eq!(t.app.provider.delegated_calls(), 1);
    let tasks = t.tasks_run(&redriven).await;
    assert_eq!(tasks.iter().filter(|s| *s == "CheckSpend").count(), 1);
    assert_eq!(tasks.iter().filter(|s| *s == "ProcessPayment").count(), 1);
    assert_eq!(tasks.last().map(String::as_str), Some("RecordLedger"));
    assert_eq!(t.app.store.reservations(AGENT).await.unwrap()[0].status, ReservationStatus::Authorized);
    assert_eq!(t.app.store.audit_events(AGENT).await.unwrap().len(), 1);

    // Redriving a succeeded execution is refused with the reason.
    let error = t.app.runner.redrive(&record.execution_id).await.unwrap_err().to_string();
    assert!(error.contains("only FAILED executions"), "{error}");
}

#[tokio::test]
async fn a_paused_agent_is_denied_every_payment() {
    let mut paused = policy("1.00", "5.00", 10);
    paused.paused = true;
    let t = TestApp::with_policy(AGENT, paused).await;
    let record = t.run(execution_input("paused-1", AGENT, "1")).await;
    assert_eq!(record.error.unwrap().error, "AgentPaused");
    assert_eq!(t.app.provider.delegated_calls(), 0);
}

#[tokio::test]
async fn an_agent_without_policy_is_denied_before_claiming() {
    let t = TestApp::new().await;
    let record = t.run(execution_input("nopolicy-1", AGENT, "1")).await;
    let error = record.error.unwrap();
    assert_eq!(error.error, "PolicyDenied");
    assert!(error.cause.contains("agentpay policy set"), "{}", error.cause);
    assert!(t.app.store.idempotency("nopolicy-1", t.app.steps.clock().now()).await.unwrap().is_none());
}

#[tokio::test]
async fn an_x402_v1_challenge_is_paid_with_an_x_payment_header() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 10)).await;
    let input = execution_input_with_challenge("v1-1", AGENT, json!({"x402v1": v1_payment_required("2500")}));
    let record = t.run(input).await;
    let output = record.output.unwrap();
    assert_eq!(output["header"]["name"], "X-PAYMENT");
    assert_eq!(decode_header(output["header"]["value"].as_str().unwrap())["x402Version"], 1);
}

#[tokio::test]
async fn the_hourly_rate_limit_denies() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 2)).await;
    for key in ["rate-1", "rate-2"] {
        assert_eq!(t.run(execution_input(key, AGENT, "1")).await.status, ExecutionStatus::Succeeded);
    }
    let denied = t.run(execution_input("rate-3", AGENT, "1")).await;
    assert_eq!(denied.error.unwrap().error, "RateLimitExceeded");
}

#[tokio::test]
async fn a_happy_path_payment_takes_six_store_round_trips() {
    use std::sync::Arc;

    use agentpay::asl::{LocalRunner, PAYMENT_DEFINITION, RecordingSleeper};
    use agentpay::clock::SystemClock;
    use agentpay::steps::{StepSettings, Steps};
    use agentpay::store::counting::CountingStore;

    let dir = tempfile::tempdir().unwrap();
    let config = agentpay::config::Config::local(dir.path());
    let sqlite = Arc::new(agentpay::store::sqlite::SqliteStore::open(&dir.path().join("agentpay.db")).unwrap());
    let wallet = Arc::new(config.dev_wallet(sqlite.clone(), Arc::new(SystemClock)).await.unwrap());
    let counting = Arc::new(CountingStore::new(sqlite.clone()));
    let steps = Steps::new(counting.clone(), wallet, Arc::new(SystemClock), StepSettings::default());
    let runner = LocalRunner::new(
        PAYMENT_DEFINITION,
        Arc::new(steps.clone()),
        steps.clock().clone(),
        sqlite.clone(),
        Arc::new(RecordingSleeper::default()),
    )
    .unwrap();
    sqlite.put_policy(AGENT, &policy("1.00", "5.00", 10)).await.unwrap();

    let record = runner.start("count-1", execution_input("count-1", AGENT, "1000")).await.unwrap();
    assert_eq!(record.status, ExecutionStatus::Succeeded);
    let calls = counting.calls();
    assert_eq!(counting.total(), 6, "{calls:?}");
    assert_eq!(
        (
            calls["agent_and_key"],
            calls["agent_ledger"],
            calls["insert_idempotency"],
            calls["reserve"],
            calls["policy_and_key"],
            calls["authorize"]
        ),
        (1, 1, 1, 1, 1, 1)
    );
}

/// What the local store may answer before its commit (the workflow's writes between its
/// waited points) never leaves the process undurable: seen through another connection to the
/// same file, which shows only committed data, the claim and the reservation are there when
/// the provider is asked to pay, and the execution's end, its proof and its ledger entry are
/// there when the runner hands the result back. 16 payments at once, so writes share batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_leaves_the_process_before_it_is_durable() {
    use std::sync::Arc;

    use agentpay::asl::{LocalRunner, PAYMENT_DEFINITION, RecordingSleeper};
    use agentpay::clock::SystemClock;
    use agentpay::error::PaymentError;
    use agentpay::executions::ExecutionStore;
    use agentpay::faults::{FaultHook, FaultPoint, FaultyProvider};
    use agentpay::provider::{IssuedProofs, PaymentOrder};
    use agentpay::steps::{StepSettings, Steps};
    use agentpay::store::sqlite::SqliteStore;

    /// Before the dev wallet is asked to pay: what an outside reader sees.
    struct Outside(Arc<SqliteStore>);

    #[async_trait::async_trait]
    impl FaultHook for Outside {
        async fn at(&self, point: FaultPoint, order: Option<&PaymentOrder>) -> Result<(), PaymentError> {
            let (FaultPoint::Before("process_payment"), Some(order)) = (point, order) else { return Ok(()) };
            let key = order.request.idempotency_key.as_str();
            let claim = self.0.idempotency(key, agentpay::clock::Timestamp::from_millis(0)).await.unwrap();
            assert_eq!(claim.map(|c| c.status), Some(IdempotencyStatus::InProgress), "{key}: claim not durable");
            let reservations = self.0.reservations(AGENT).await.unwrap();
            let reserved = reservations.iter().find(|r| r.client_token == order.client_token).map(|r| r.status);
            assert_eq!(reserved, Some(ReservationStatus::Reserved), "{key}: reservation not durable");
            Ok(())
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agentpay.db");
    let config = agentpay::config::Config::local(dir.path());
    let sqlite = Arc::new(SqliteStore::open(&file).unwrap());
    sqlite.put_policy(AGENT, &policy("1.00", "1000.00", 10_000)).await.unwrap();
    let outside = Arc::new(SqliteStore::open(&file).unwrap());
    let wallet = Arc::new(config.dev_wallet(sqlite.clone(), Arc::new(SystemClock)).await.unwrap());
    let provider = Arc::new(FaultyProvider::new(wallet, ProviderFault::Unavailable, 0));
    provider.set_hook(Some(Arc::new(Outside(outside.clone()))));
    let steps = Steps::new(sqlite.clone(), provider, Arc::new(SystemClock), StepSettings::default());
    let runner = Arc::new(
        LocalRunner::new(
            PAYMENT_DEFINITION,
            Arc::new(steps.clone()),
            steps.clock().clone(),
            sqlite.clone(),
            Arc::new(RecordingSleeper::default()),
        )
        .unwrap(),
    );
    let workers: Vec<_> = (0..16)
        .map(|worker| {
            let (runner, outside) = (runner.clone(), outside.clone());
            tokio::spawn(async move {
                for i in 0..10 {
                    let key = format!("durable-{worker}-{i}");
                    let record = runner.start(&key, execution_input(&key, AGENT, "1000")).await.unwrap();
                    assert_eq!(record.status, ExecutionStatus::Succeeded, "{record:?}");
                    let seen = outside.execution(&key).await.unwrap().map(|r| r.status);
                    assert_eq!(seen, Some(ExecutionStatus::Succeeded), "{key}: the end is not durable");
                    let claim = outside.idempotency(&key, agentpay::clock::Timestamp::from_millis(0)).await.unwrap();
                    assert_eq!(claim.map(|c| c.status), Some(IdempotencyStatus::Completed), "{key}");
                    let reservation =
                        outside.reservations(AGENT).await.unwrap().into_iter().find(|r| r.idempotency_key == key);
                    let reservation = reservation.expect("reservation durable");
                    assert_eq!(reservation.status, ReservationStatus::Authorized, "{key}");
                    assert!(
                        outside.issued(&reservation.client_token).await.unwrap().is_some(),
                        "{key}: proof not durable"
                    );
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let stats = sqlite.commit_stats();
    assert!(stats.writes > stats.commits, "writes shared commits: {stats:?}");
}

/// With the ledger in another store than the executions (the local runner over DynamoDB), the
/// execution's creation is committed before its key is claimed: a durable claim never names
/// an execution a crash could lose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_ledger_elsewhere_an_execution_is_durable_before_its_claim() {
    use std::sync::Arc;

    use agentpay::asl::{LocalRunner, PAYMENT_DEFINITION, RecordingSleeper};
    use agentpay::clock::SystemClock;
    use agentpay::error::PaymentError;
    use agentpay::executions::ExecutionStore;
    use agentpay::faults::{FaultHook, FaultPoint, FaultyStore};
    use agentpay::provider::PaymentOrder;
    use agentpay::steps::{StepSettings, Steps};
    use agentpay::store::sqlite::SqliteStore;

    /// Before each claim: the executions an outside reader of the executions' file sees.
    struct Outside(Arc<SqliteStore>, Arc<std::sync::Mutex<u32>>);

    #[async_trait::async_trait]
    impl FaultHook for Outside {
        async fn at(&self, point: FaultPoint, _: Option<&PaymentOrder>) -> Result<(), PaymentError> {
            if point == FaultPoint::Before("insert_idempotency") {
                let claimed = *self.1.lock().unwrap();
                let seen = self.0.execution(&format!("elsewhere-{claimed}")).await.unwrap();
                assert!(seen.is_some(), "elsewhere-{claimed}: claimed before its execution was durable");
            }
            Ok(())
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let executions_file = dir.path().join("executions.db");
    let executions = Arc::new(SqliteStore::open(&executions_file).unwrap());
    let ledger = Arc::new(SqliteStore::open(&dir.path().join("ledger.db")).unwrap());
    ledger.put_policy(AGENT, &policy("1.00", "1000.00", 10_000)).await.unwrap();
    let config = agentpay::config::Config::local(dir.path());
    let wallet = Arc::new(config.dev_wallet(ledger.clone(), Arc::new(SystemClock)).await.unwrap());
    let started = Arc::new(std::sync::Mutex::new(0));
    let faulty = Arc::new(FaultyStore::new(ledger.clone()));
    let outside = Arc::new(SqliteStore::open(&executions_file).unwrap());
    faulty.set_hook(Some(Arc::new(Outside(outside, started.clone()))));
    let steps = Steps::new(faulty, wallet, Arc::new(SystemClock), StepSettings::default());
    let runner = LocalRunner::new(
        PAYMENT_DEFINITION,
        Arc::new(steps.clone()),
        steps.clock().clone(),
        executions.clone(),
        Arc::new(RecordingSleeper::default()),
    )
    .unwrap()
    .with_steps_writing_to_another_store();
    for i in 1..=20 {
        *started.lock().unwrap() = i;
        let key = format!("elsewhere-{i}");
        let record = runner.start(&key, execution_input(&key, AGENT, "1000")).await.unwrap();
        assert_eq!(record.status, ExecutionStatus::Succeeded, "{record:?}");
    }
}

/// A step invoked on its own (a Lambda handler, a local invocation) hands its output out of
/// the process: the claim it answers with is committed by then, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_invoked_on_its_own_answers_only_with_durable_writes() {
    use std::sync::Arc;

    use agentpay::clock::{SystemClock, Timestamp};
    use agentpay::steps::{StepName, StepSettings, Steps};
    use agentpay::store::sqlite::SqliteStore;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agentpay.db");
    let config = agentpay::config::Config::local(dir.path());
    let sqlite = Arc::new(SqliteStore::open(&file).unwrap());
    sqlite.put_policy(AGENT, &policy("1.00", "1000.00", 10_000)).await.unwrap();
    let outside = SqliteStore::open(&file).unwrap();
    let wallet = Arc::new(config.dev_wallet(sqlite.clone(), Arc::new(SystemClock)).await.unwrap());
    let steps = Steps::new(sqlite.clone(), wallet, Arc::new(SystemClock), StepSettings::default());
    for i in 0..20 {
        let key = format!("alone-{i}");
        let input = json!({"request": execution_input(&key, AGENT, "1000"), "executionId": format!("execution-{i}")});
        let output = steps.invoke(StepName::CheckIdempotency, input).await.unwrap();
        assert_eq!(output["outcome"], "CLAIMED", "{output}");
        let claim = outside.idempotency(&key, Timestamp::from_millis(0)).await.unwrap();
        assert_eq!(claim.map(|c| c.status), Some(IdempotencyStatus::InProgress), "{key}: answered before durable");
    }
}

#[tokio::test]
async fn malformed_challenges_leave_no_record_no_reservation_and_no_signature() {
    use agentpay::samples::v2_payment_required;
    use agentpay::x402::encode_v2_header;

    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 100)).await;
    let mutate = |change: &dyn Fn(&mut Value)| {
        let mut body = v2_payment_required("10000");
        change(&mut body);
        json!({"x402": encode_v2_header(&body)})
    };
    let cases: Vec<(&str, Value)> = vec![
        ("bad base64", json!({"x402": "%%%not-base64%%%"})),
        ("not JSON", json!({"x402": base64::engine::general_purpose::STANDARD.encode("{oops")})),
        ("unknown version", mutate(&|b| b["x402Version"] = json!(9))),
        ("empty accepts", mutate(&|b| b["accepts"] = json!([]))),
        ("unknown network", mutate(&|b| b["accepts"][0]["network"] = json!("eip155:1"))),
        ("wrong USDC", mutate(&|b| b["accepts"][0]["asset"] = json!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"))),
        ("bad checksum", mutate(&|b| b["accepts"][0]["payTo"] = json!("0x209693bc6afc0C5328bA36FaF03C514EF312287C"))),
        ("zero amount", mutate(&|b| b["accepts"][0]["amount"] = json!("0"))),
        ("negative amount", mutate(&|b| b["accepts"][0]["amount"] = json!("-5"))),
        ("fractional amount", mutate(&|b| b["accepts"][0]["amount"] = json!("1.5"))),
        ("overflowing amount", mutate(&|b| b["accepts"][0]["amount"] = json!("99999999999999999999999"))),
        (
            "no EIP-712 domain",
            mutate(&|b| {
                b["accepts"][0].as_object_mut().unwrap().remove("extra");
            }),
        ),
        ("unsupported scheme", mutate(&|b| b["accepts"][0]["scheme"] = json!("upto"))),
        ("mpp with the dev wallet", json!({"mpp": agentpay::samples::mpp_challenge("ch-1", "10000")})),
    ];
    for (index, (what, challenge)) in cases.into_iter().enumerate() {
        let key = format!("malformed-{index}");
        let record = t.run(execution_input_with_challenge(&key, AGENT, challenge)).await;
        let error = record.error.clone().unwrap_or_else(|| panic!("{what}: expected a failure"));
        assert_eq!(error.error, "InvalidPaymentRequest", "{what}: {}", error.cause);
        assert_eq!(t.tasks_run(&record).await, ["CheckIdempotency"], "{what}");
        assert!(t.app.store.idempotency(&key, t.app.steps.clock().now()).await.unwrap().is_none(), "{what}");
    }
    assert!(t.app.store.reservations(AGENT).await.unwrap().is_empty());
    assert!(t.app.store.audit_events(AGENT).await.unwrap().is_empty());
    assert_eq!(t.app.provider.delegated_calls(), 0);
}
