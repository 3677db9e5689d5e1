//! Who may pay as an agent: the caller the entry point verified must be one of the agent's
//! bound IAM principals; a refusal reserves nothing and is audited with the caller's ARN.

use std::sync::Arc;

use agentpay::asl::RecordingSleeper;
use agentpay::clock::SystemClock;
use agentpay::config::Config;
use agentpay::local::LocalApp;
use agentpay::samples::execution_input;
use agentpay::store::{AuditKind, IdempotencyStatus};
use serde_json::{Value, json};

use crate::helpers::policy;

const AGENT: &str = "research-agent";
const ROLE: &str = "arn:aws:iam::123456789012:role/agents/research-agent";
const SESSION: &str = "arn:aws:sts::123456789012:assumed-role/research-agent/run-7";
const OTHER: &str = "arn:aws:sts::123456789012:assumed-role/billing-agent/run-7";

/// The deployed setting: an agent with no principal bound pays for nobody.
async fn app(principals: &[&str]) -> (LocalApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::local(dir.path());
    config.settings.require_bound_caller = true;
    let app = LocalApp::open(&config, dir.path(), Arc::new(SystemClock), Arc::new(RecordingSleeper::default()))
        .await
        .unwrap();
    let policy = agentpay::policy::SpendPolicy {
        principals: principals.iter().map(|p| p.to_string()).collect(),
        ..policy("1.00", "5.00", 10)
    };
    app.store.put_policy(AGENT, &policy).await.unwrap();
    (app, dir)
}

fn input(key: &str, caller: Option<&str>) -> Value {
    let mut input = execution_input(key, AGENT, "250000");
    if let Some(arn) = caller {
        input["caller"] = json!({"arn": arn});
    }
    input
}

#[tokio::test]
async fn a_bound_caller_pays_and_the_audit_names_its_arn() {
    let (app, _dir) = app(&[ROLE]).await;
    let record = app.run(input("id-paid", Some(SESSION))).await.unwrap();
    assert!(record.error.is_none(), "{:?}", record.error);
    let audit = app.store.audit_events(AGENT).await.unwrap();
    let authorized = audit.iter().find(|e| e.kind == AuditKind::Authorized).expect("an AUTHORIZED event");
    assert_eq!(authorized.caller_arn.as_deref(), Some(SESSION));
}

#[tokio::test]
async fn a_caller_not_bound_to_the_agent_is_refused_reserves_nothing_and_is_audited() {
    let (app, _dir) = app(&[ROLE]).await;
    let record = app.run(input("id-other", Some(OTHER))).await.unwrap();
    let error = record.error.expect("refused");
    assert_eq!(error.error, "CallerNotBound");
    assert!(error.cause.contains(OTHER) && error.cause.contains(ROLE), "{}", error.cause);
    assert_eq!(app.provider.delegated_calls(), 0);
    assert!(app.store.reservations(AGENT).await.unwrap().is_empty(), "nothing reserved");
    let audit = app.store.audit_events(AGENT).await.unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0].kind, AuditKind::Denied);
    assert_eq!(audit[0].caller_arn.as_deref(), Some(OTHER));
    assert_eq!(audit[0].error.as_ref().map(|e| e.error.as_str()), Some("CallerNotBound"));
    let key = app.store.idempotency("id-other", app.steps.clock().now()).await.unwrap().unwrap();
    assert_eq!(key.status, IdempotencyStatus::Denied);
}

#[tokio::test]
async fn an_execution_without_a_verified_caller_cannot_pay_for_a_bound_agent() {
    let (app, _dir) = app(&[ROLE]).await;
    let error = app.run(input("id-none", None)).await.unwrap().error.expect("refused");
    assert_eq!(error.error, "CallerNotBound");
    assert!(error.cause.contains("entry point"), "{}", error.cause);
    assert_eq!(app.provider.delegated_calls(), 0);
}

#[tokio::test]
async fn deployed_an_agent_with_no_principal_bound_pays_for_nobody() {
    let (app, _dir) = app(&[]).await;
    let error = app.run(input("id-unbound", Some(SESSION))).await.unwrap().error.expect("refused");
    assert_eq!(error.error, "CallerNotBound");
    assert!(error.cause.contains("--principal"), "{}", error.cause);
}

#[tokio::test]
async fn a_caller_field_that_is_not_an_iam_arn_is_an_invalid_request() {
    let (app, _dir) = app(&[ROLE]).await;
    let mut bad = input("id-bad", None);
    bad["caller"] = json!({"arn": "research-agent"});
    let error = app.run(bad).await.unwrap().error.expect("refused");
    assert_eq!(error.error, "InvalidPaymentRequest");
    assert!(error.cause.contains("caller.arn"), "{}", error.cause);
}

#[tokio::test]
async fn the_same_key_from_another_session_of_the_bound_role_is_the_same_payment() {
    let (app, _dir) = app(&[ROLE]).await;
    let client = app.client();
    let wait = agentpay::client::WaitOptions::default();
    let first = client.start(&input("id-retry", Some(SESSION)), Some(wait)).await.unwrap();
    assert_eq!(first.execution.status, "SUCCEEDED", "{:?}", first.execution.error);
    let other_session = "arn:aws:sts::123456789012:assumed-role/research-agent/run-8";
    let again = client.start(&input("id-retry", Some(other_session)), None).await.unwrap();
    assert!(again.already_existed, "one key, one execution");
    assert_eq!(again.execution.name, first.execution.name);
    assert_eq!(app.provider.delegated_calls(), 1, "paid once");
}
