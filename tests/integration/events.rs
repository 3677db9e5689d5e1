//! Every file in events/ is used here, so a sample can never rot.

use std::path::Path;

use agentpay::executions::ExecutionStatus;
use agentpay::faults::ProviderFault;
use agentpay::policy::SpendPolicy;
use agentpay::steps::StepName;
use agentpay::store::{IdempotencyStatus, ReservationStatus};
use serde_json::Value;

use crate::helpers::TestApp;

fn read(path: &str) -> Value {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    serde_json::from_str(&std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"))).unwrap()
}

async fn demo_app() -> TestApp {
    let policy: SpendPolicy = serde_json::from_value(read("events/policy-demo-agent.json")).unwrap();
    TestApp::with_policy("demo-agent", policy).await
}

const EXECUTION_INPUTS: &[&str] = &[
    "agentcore-mpp.json", // with the AgentCore provider: tests/integration/agentcore.rs
    "paid-call.json",
    "over-daily-cap.json",
    "invalid-challenge.json",
    "provider-failure.json",
    "provider-timeout.json",
    "ledger-failure.json",
    "x402-v1-challenge.json",
];
const FUNCTION_EVENTS: &[&str] = &[
    "check-idempotency.json",
    "check-spend.json",
    "process-payment.json",
    "record-ledger.json",
    "compensate.json",
    "request-approval.json",
    "report-settlement.json",
    "reconcile.json",
];

#[test]
fn every_event_file_is_covered_by_a_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("events");
    let listed = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(root.join(dir)).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    };
    let sorted = |names: &[&str]| {
        let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(listed("executions"), sorted(EXECUTION_INPUTS));
    assert_eq!(listed("functions"), sorted(FUNCTION_EVENTS));
    // One function event per step crate under functions/.
    for step in StepName::ALL {
        assert!(root.join("functions").join(format!("{}.json", step.function_name())).exists());
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("functions")
                .join(step.function_name())
                .join("Cargo.toml")
                .exists()
        );
    }
}

#[tokio::test]
async fn each_execution_input_has_its_documented_outcome() {
    let t = demo_app().await;
    let run = |name: &str| t.run(read(&format!("events/executions/{name}")));

    let paid = run("paid-call.json").await;
    assert_eq!(paid.status, ExecutionStatus::Succeeded);
    let over = run("over-daily-cap.json").await;
    assert_eq!(over.error.unwrap().error, "SpendLimitExceeded");
    let invalid = run("invalid-challenge.json").await;
    assert_eq!(invalid.error.unwrap().error, "InvalidPaymentRequest");

    t.app.provider.fail_next(ProviderFault::Rejected, 1);
    let down = run("provider-failure.json").await;
    assert_eq!(down.error.unwrap().error, "ProviderRejected");

    t.app.provider.fail_next(ProviderFault::OutcomeUnknownAfterProof, 4);
    let held = run("provider-timeout.json").await;
    assert_eq!(held.error.unwrap().error, "PaymentOutcomeUnknown");
    assert_eq!(held.failed_state.as_deref(), Some("PaymentOutcomeUnknown"));

    t.app.ledger.fail_next_authorizations(5);
    let ledger = run("ledger-failure.json").await;
    assert_eq!(ledger.failed_state.as_deref(), Some("RecordLedger"));

    let v1 = run("x402-v1-challenge.json").await;
    assert_eq!(v1.output.unwrap()["header"]["name"], "X-PAYMENT");
}

#[tokio::test]
async fn the_function_events_replay_the_happy_path_step_by_step() {
    let t = demo_app().await;
    let steps = &t.app.steps;
    let event = |name: &str| read(&format!("events/functions/{name}"));

    let claim = steps.invoke(StepName::CheckIdempotency, event("check-idempotency.json")).await.unwrap();
    assert_eq!(claim["outcome"], "CLAIMED");
    // The later events carry this very claim.
    assert_eq!(claim, event("check-spend.json")["claim"]);

    let reservation = steps.invoke(StepName::CheckSpend, event("check-spend.json")).await.unwrap();
    assert_eq!(reservation, event("process-payment.json")["reservation"]);

    let proof = steps.invoke(StepName::ProcessPayment, event("process-payment.json")).await.unwrap();
    assert_eq!(proof["status"], "PROOF_GENERATED");
    assert_eq!(proof["header"]["name"], "PAYMENT-SIGNATURE");

    let outcome = steps.invoke(StepName::RecordLedger, event("record-ledger.json")).await.unwrap();
    assert_eq!(outcome["status"], "AUTHORIZED");
    let reservations = t.app.store.reservations("demo-agent").await.unwrap();
    assert_eq!(reservations[0].status, ReservationStatus::Authorized);
}

#[tokio::test]
async fn the_compensate_event_releases_what_check_spend_reserved() {
    let t = demo_app().await;
    let steps = &t.app.steps;
    let event = |name: &str| read(&format!("events/functions/{name}"));
    steps.invoke(StepName::CheckIdempotency, event("check-idempotency.json")).await.unwrap();
    steps.invoke(StepName::CheckSpend, event("check-spend.json")).await.unwrap();

    let compensation = steps.invoke(StepName::Compensate, event("compensate.json")).await.unwrap();
    assert_eq!(compensation["released"], true);
    assert_eq!(compensation["error"], "ProviderRejected");
    assert!(compensation["cause"].as_str().unwrap().contains("insufficient funds"));
    let key = t.app.store.idempotency("demo-paid-1", t.app.steps.clock().now()).await.unwrap().unwrap();
    assert_eq!(key.status, IdempotencyStatus::Failed);

    // Compensating twice is harmless, and says so.
    let again = steps.invoke(StepName::Compensate, event("compensate.json")).await.unwrap();
    assert_eq!((again["released"].as_bool(), again["alreadyCompensated"].as_bool()), (Some(false), Some(true)));
    assert_eq!(t.app.store.audit_events("demo-agent").await.unwrap().len(), 1);
    assert!(t.app.store.agent_ledger("demo-agent").await.unwrap().window.is_empty());
}

#[tokio::test]
async fn the_request_approval_event_records_a_pending_approval() {
    let t = demo_app().await;
    let steps = &t.app.steps;
    let event = |name: &str| read(&format!("events/functions/{name}"));
    // The demo agent with an approval threshold below the sample's 0.50 USDC.
    let mut policy = t.app.store.policy("demo-agent").await.unwrap().unwrap();
    policy.approval_threshold_usd = Some("0.10".parse().unwrap());
    t.app.store.put_policy("demo-agent", &policy).await.unwrap();
    steps.invoke(StepName::CheckIdempotency, event("check-idempotency.json")).await.unwrap();
    let reservation = steps.invoke(StepName::CheckSpend, event("check-spend.json")).await.unwrap();
    assert_eq!(reservation["approval"]["required"], true, "{reservation}");
    let requested = steps.invoke(StepName::RequestApproval, event("request-approval.json")).await.unwrap();
    assert_eq!(requested["approvalId"], reservation["approval"]["id"]);
    let approval = t.app.store.approval(requested["approvalId"].as_str().unwrap()).await.unwrap().unwrap();
    assert_eq!(approval.status, agentpay::store::ApprovalStatus::Pending);
}
