//! The AgentCore provider with the real SDK client against the emulator: request building,
//! header values, client tokens, response checks and every error class, directly and through
//! the whole workflow.

use std::sync::Arc;

use agentpay::agentcore::{AgentCorePolicy, AgentCoreSelection};
use agentpay::clock::SystemClock;
use agentpay::executions::{ExecutionStatus, HistoryKind};
use agentpay::policy::SpendPolicy;
use agentpay::provider::agentcore::AgentCoreProvider;
use agentpay::samples::{
    agentcore_block, execution_input, execution_input_with_challenge, mpp_challenge, v1_payment_required,
    v2_payment_required,
};
use agentpay::store::{IdempotencyStatus, ReservationStatus};
use base64::Engine;
use serde_json::{Value, json};

use crate::agentcore_emulator::{AgentCoreEmulator, CodeIn, Fault, Scripted, SessionState};
use crate::helpers::{TestApp, policy};

const AGENT: &str = "agent-ac";

fn with_agentcore(mut input: Value) -> Value {
    input["agentcore"] = agentcore_block();
    input
}

fn agentcore_policy(settings: AgentCorePolicy) -> SpendPolicy {
    SpendPolicy { agentcore: Some(settings), ..policy("1.00", "5.00", 100) }
}

async fn app(emulator: &AgentCoreEmulator, policy: SpendPolicy) -> TestApp {
    let provider = AgentCoreProvider::from_sdk_config(&emulator.sdk_config().await, Arc::new(SystemClock));
    TestApp::with_provider(AGENT, policy, Arc::new(provider)).await
}

fn decode(value: &str) -> Value {
    serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(value).unwrap()).unwrap()
}

#[tokio::test]
async fn x402_v2_is_paid_with_the_selected_entry_and_wrapped_into_payment_signature() {
    let emulator = AgentCoreEmulator::start().await;
    let t = app(&emulator, agentcore_policy(AgentCorePolicy::default())).await;
    let record = t.run(with_agentcore(execution_input("ac-v2", AGENT, "10000"))).await;
    assert_eq!(record.status, ExecutionStatus::Succeeded, "{record:?}");

    let calls = emulator.process_payment_calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.headers["x-amzn-bedrock-agentcore-payments-user-id"], "user-7");
    assert_eq!(call.headers["x-amzn-bedrock-agentcore-payments-agent-name"], AGENT);
    assert!(call.headers["authorization"].starts_with("AWS4-HMAC-SHA256"), "SigV4-signed");
    let body = &call.body;
    assert_eq!(body["paymentType"], "CRYPTO_X402");
    assert_eq!(body["paymentManagerArn"], agentcore_block()["paymentManagerArn"]);
    assert_eq!(body["paymentSessionId"], "ps-demo-1");
    assert_eq!(body["paymentInstrumentId"], "pi-demo-1");
    assert_eq!(body["paymentInput"]["cryptoX402"]["version"], "2");
    assert_eq!(body["paymentInput"]["cryptoX402"]["payload"], v2_payment_required("10000")["accepts"][0]);
    let claim = t.app.store.idempotency("ac-v2", t.app.steps.clock().now()).await.unwrap().unwrap();
    let token = body["clientToken"].as_str().unwrap();
    assert!(token.starts_with("agentpay-"), "{token}");
    assert_eq!(claim.status, IdempotencyStatus::Completed);

    let output = record.output.unwrap();
    assert_eq!(output["header"]["name"], "PAYMENT-SIGNATURE");
    let payload = decode(output["header"]["value"].as_str().unwrap());
    assert_eq!(payload["x402Version"], 2);
    assert_eq!(payload["accepted"], v2_payment_required("10000")["accepts"][0]);
    assert_eq!(payload["resource"]["url"], "https://api.example.com/credit-report");
    assert_eq!(payload["payload"]["signature"], format!("0x{}", "ab".repeat(65)));
    assert_eq!(payload["payload"]["authorization"]["value"], "10000");
    assert_eq!(output["paymentId"].as_str().unwrap(), format!("pp-{}", &token[token.len() - 12..]));
    let reservations = t.app.store.reservations(AGENT).await.unwrap();
    assert_eq!(reservations[0].status, ReservationStatus::Authorized);
}

#[tokio::test]
async fn x402_v1_is_paid_as_version_1_and_wrapped_into_x_payment() {
    let emulator = AgentCoreEmulator::start().await;
    let t = app(&emulator, agentcore_policy(AgentCorePolicy::default())).await;
    let input = execution_input_with_challenge("ac-v1", AGENT, json!({"x402v1": v1_payment_required("20000")}));
    let record = t.run(with_agentcore(input)).await;
    assert_eq!(record.status, ExecutionStatus::Succeeded, "{record:?}");
    let body = &emulator.process_payment_calls()[0].body;
    assert_eq!(body["paymentInput"]["cryptoX402"]["version"], "1");
    assert_eq!(body["paymentInput"]["cryptoX402"]["payload"], v1_payment_required("20000")["accepts"][0]);
    let output = record.output.unwrap();
    assert_eq!(output["header"]["name"], "X-PAYMENT");
    let payload = decode(output["header"]["value"].as_str().unwrap());
    assert_eq!(payload["x402Version"], 1);
    assert_eq!(payload["network"], "base-sepolia");
    assert_eq!(payload["payload"]["authorization"]["value"], "20000");
}

#[tokio::test]
async fn mpp_forwards_the_raw_header_and_returns_the_credential_for_authorization() {
    let emulator = AgentCoreEmulator::start().await;
    let t = app(&emulator, agentcore_policy(AgentCorePolicy::default())).await;
    let header = mpp_challenge("ch_42", "30000");
    let record = t.run(with_agentcore(execution_input_with_challenge("ac-mpp", AGENT, json!({"mpp": header})))).await;
    assert_eq!(record.status, ExecutionStatus::Succeeded, "{record:?}");
    let body = &emulator.process_payment_calls()[0].body;
    assert_eq!(body["paymentType"], "MPP");
    assert_eq!(body["paymentInput"]["mpp"]["wwwAuthenticateHeaders"], json!([header]));
    assert_eq!(body["paymentInput"]["mpp"]["version"], "1");
    assert_eq!(body["paymentInput"]["mpp"]["buyerPaysGasFees"], false, "off unless the policy says so");
    let output = record.output.unwrap();
    assert_eq!(output["header"]["name"], "Authorization");
    let value = output["header"]["value"].as_str().unwrap();
    let credential = value.strip_prefix("Payment ").unwrap();
    let decoded: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(credential).unwrap()).unwrap();
    assert_eq!(decoded["challenge"]["id"], "ch_42");
    assert_eq!(decoded["token"], body["clientToken"]);
    assert_eq!(output["amount"]["value"], "30000", "the ledger holds the MPP amount");

    // The policy switch reaches the request.
    let emulator = AgentCoreEmulator::start().await;
    let t = app(&emulator, agentcore_policy(AgentCorePolicy { buyer_pays_gas_fees: true, ..Default::default() })).await;
    let record =
        t.run(with_agentcore(execution_input_with_challenge("ac-mpp-gas", AGENT, json!({"mpp": header})))).await;
    assert_eq!(record.status, ExecutionStatus::Succeeded, "{record:?}");
    assert_eq!(emulator.process_payment_calls()[0].body["paymentInput"]["mpp"]["buyerPaysGasFees"], true);
}

#[tokio::test]
async fn the_policy_supplies_what_the_input_leaves_out_and_gaps_are_named_before_any_reservation() {
    let emulator = AgentCoreEmulator::start().await;
    let defaults = AgentCoreSelection {
        payment_manager_arn: Some("arn:aws:bedrock-agentcore:us-east-1:123456789012:payment-manager/pm-policy".into()),
        payment_session_id: Some("ps-policy".into()),
        payment_instrument_id: None,
    };
    let t = app(&emulator, agentcore_policy(AgentCorePolicy { defaults, ..Default::default() })).await;
    // Input names only the instrument: the rest comes from the policy.
    let mut input = execution_input("ac-merge", AGENT, "10000");
    input["agentcore"] = json!({"paymentInstrumentId": "pi-input", "paymentSessionId": "ps-input"});
    let record = t.run(input).await;
    assert_eq!(record.status, ExecutionStatus::Succeeded, "{record:?}");
    let body = &emulator.process_payment_calls()[0].body;
    assert!(body["paymentManagerArn"].as_str().unwrap().ends_with("pm-policy"));
    assert_eq!(body["paymentSessionId"], "ps-input", "the input overrides the policy");
    assert_eq!(body["paymentInstrumentId"], "pi-input");

    // Nothing names the instrument: InvalidPaymentRequest naming the field, nothing held.
    let record = t.run(execution_input("ac-gap", AGENT, "10000")).await;
    let error = record.error.unwrap();
    assert_eq!(error.error, "InvalidPaymentRequest");
    assert!(error.cause.contains("agentcore.paymentInstrumentId"), "{}", error.cause);
    assert!(!error.cause.contains("agentcore.paymentSessionId"), "{}", error.cause);
    assert!(t.app.store.idempotency("ac-gap", t.app.steps.clock().now()).await.unwrap().is_none());

    // A malformed block is refused at the edge, field by field.
    let mut input = execution_input("ac-bad", AGENT, "10000");
    input["agentcore"] = json!({"paymentManagerArn": "arn:aws:s3:::nope", "paymentSessionId": ""});
    let error = t.run(input).await.error.unwrap();
    assert_eq!(error.error, "InvalidPaymentRequest");
    assert!(
        error.cause.contains("agentcore.paymentManagerArn") && error.cause.contains("agentcore.paymentSessionId"),
        "{}",
        error.cause
    );
    assert_eq!(emulator.process_payment_calls().len(), 1, "only the first payment reached AgentCore");
    assert_eq!(t.app.store.reservations(AGENT).await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_same_client_token_gets_the_same_proof() {
    let emulator = AgentCoreEmulator::start().await;
    let provider = AgentCoreProvider::from_sdk_config(&emulator.sdk_config().await, Arc::new(SystemClock));
    let t = app(&emulator, agentcore_policy(AgentCorePolicy::default())).await;
    let order = order_for(&t, &provider, with_agentcore(execution_input("ac-token", AGENT, "10000"))).await;
    use agentpay::provider::PaymentProvider;
    let first = provider.process_payment(&order).await.unwrap();
    let second = provider.process_payment(&order).await.unwrap();
    assert_eq!(first, second, "a retry with the same client token returns the same proof, header bytes included");
    let calls = emulator.process_payment_calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].body["clientToken"], calls[1].body["clientToken"]);
    assert_eq!(calls[0].body["clientToken"], order.client_token.as_str());
    assert_eq!(emulator.proofs_issued(), 1, "one wallet operation");
}

/// A PaymentOrder exactly as ProcessPayment would build it, from a real claim.
async fn order_for(t: &TestApp, provider: &AgentCoreProvider, input: Value) -> agentpay::provider::PaymentOrder {
    use agentpay::provider::PaymentProvider;
    use agentpay::request::PaymentRequest;
    let request = PaymentRequest::parse(&input).unwrap();
    let policy = t.app.store.agent_ledger(AGENT).await.unwrap().policy.unwrap();
    let requirement = request.select_payment(&policy.allowlist(), AGENT).unwrap();
    let context = provider.prepare(&request, &policy, &requirement).unwrap();
    agentpay::provider::PaymentOrder {
        client_token: agentpay::request::derived_id("agentpay", &[request.idempotency_key.as_str(), "1"]),
        requirement,
        request,
        context,
    }
}

/// Every error class, as the service sends it, and what the workflow's Fail state says.
#[tokio::test]
async fn every_error_class_is_named_and_explained() {
    let validation = |message: &str| Fault {
        fields: vec![("paymentInput.cryptoX402.payload.payTo", "must be a checksummed address")],
        ..Fault::new(400, "ValidationException", message)
    };
    let cases: Vec<(Fault, &str, &str)> = vec![
        (validation("Payment amount exceeds the remaining session budget"), "SessionBudgetExhausted", "larger budget"),
        (validation("The payment session has expired"), "SessionExpired", "Create a new payment session"),
        (validation("Invalid payment input"), "ProviderRejected", "payTo: must be a checksummed address"),
        (
            Fault::new(403, "AccessDeniedException", "User is not authorized"),
            "ProviderAccessDenied",
            "credential provider was not recreated",
        ),
        (
            Fault { code_in: CodeIn::Body, ..Fault::new(403, "AccessDeniedException", "denied") },
            "ProviderAccessDenied",
            "wallet (payment instrument) is granted",
        ),
        (
            Fault::new(404, "ResourceNotFoundException", "Session ps-demo-1 not found"),
            "ProviderResourceNotFound",
            "paymentSessionId",
        ),
        (Fault::new(409, "ConflictException", "Client token reused"), "ProviderConflict", "new key"),
        (
            Fault::new(402, "ServiceQuotaExceededException", "Too many sessions"),
            "ProviderQuotaExceeded",
            "Service Quotas",
        ),
        (
            Fault::new(403, "SubscriptionRequiredException", "Not subscribed"),
            "ProviderSubscriptionRequired",
            "not subscribed",
        ),
    ];
    for (index, (fault, name, hint)) in cases.into_iter().enumerate() {
        let emulator = AgentCoreEmulator::start().await;
        emulator.script([Scripted::Fault(fault.clone())]);
        let t = app(&emulator, agentcore_policy(AgentCorePolicy::default())).await;
        let key = format!("ac-error-{index}");
        let record = t.run(with_agentcore(execution_input(&key, AGENT, "10000"))).await;
        assert_eq!(record.status, ExecutionStatus::Failed, "{name}");
        let error = record.error.clone().unwrap();
        assert_eq!(error.error, name, "{fault:?}: {}", error.cause);
        assert!(error.cause.contains(hint), "{name}: the cause should say {hint:?}: {}", error.cause);
        assert!(error.cause.contains(&fault.message), "{name}: the service's message is kept: {}", error.cause);
        assert_eq!(
            t.tasks_run(&record).await,
            ["CheckIdempotency", "CheckSpend", "ProcessPayment", "Compensate"],
            "{name}: not retried, compensated"
        );
        assert_eq!(emulator.process_payment_calls().len(), 1, "{name}: one call");
        assert_eq!(t.app.store.reservations(AGENT).await.unwrap()[0].status, ReservationStatus::Released, "{name}");
    }
}

#[tokio::test]
async fn server_errors_and_unreadable_answers_are_unknown_outcomes_and_throttling_is_a_refusal() {
    let emulator = AgentCoreEmulator::start().await;
    let provider = AgentCoreProvider::from_sdk_config(&emulator.sdk_config().await, Arc::new(SystemClock));
    let t = app(&emulator, agentcore_policy(AgentCorePolicy::default())).await;
    let order = order_for(&t, &provider, with_agentcore(execution_input("ac-5xx", AGENT, "10000"))).await;
    use agentpay::provider::PaymentProvider;
    emulator.script([
        Scripted::Fault(Fault::new(500, "InternalServerException", "internal error")),
        Scripted::Fault(Fault::new(503, "ServiceUnavailable", "try later")),
        Scripted::Fault(Fault::new(429, "ThrottlingException", "Rate exceeded")),
        Scripted::MissingFields,
        Scripted::Status("PENDING"),
    ]);
    // A 5xx or an answer we cannot read may stand for an issued proof: unknown, never a refusal.
    // Throttling is refused before processing: definite.
    for expected in [
        "PaymentOutcomeUnknown",
        "PaymentOutcomeUnknown",
        "ProviderUnavailable",
        "PaymentOutcomeUnknown",
        "PaymentOutcomeUnknown",
    ] {
        let error = provider.process_payment(&order).await.unwrap_err();
        assert_eq!(error.name(), expected, "{}", error.chain_message());
    }
    assert_eq!(emulator.process_payment_calls().len(), 5, "SDK retries are off: the state machine retries");
    assert_eq!(emulator.proofs_issued(), 0);

    // Nothing listens: the request was never sent, a definite (retryable) refusal.
    let dead = AgentCoreEmulator::start().await;
    let mut config = dead.sdk_config().await.into_builder();
    config.set_endpoint_url(Some("http://127.0.0.1:9".into()));
    let unreachable = AgentCoreProvider::from_sdk_config(&config.build(), Arc::new(SystemClock));
    let error = unreachable.process_payment(&order).await.unwrap_err();
    assert_eq!(error.name(), "ProviderUnavailable", "{}", error.chain_message());
}

#[tokio::test]
async fn throttling_is_retried_by_the_state_machine_with_the_same_token_and_one_proof() {
    let emulator = AgentCoreEmulator::start().await;
    emulator.script([
        Scripted::Fault(Fault::new(429, "ThrottlingException", "Rate exceeded")),
        Scripted::Fault(Fault { code_in: CodeIn::Body, ..Fault::new(429, "ThrottlingException", "Rate exceeded") }),
    ]);
    let t = app(&emulator, agentcore_policy(AgentCorePolicy::default())).await;
    let record = t.run(with_agentcore(execution_input("ac-throttle", AGENT, "10000"))).await;
    assert_eq!(record.status, ExecutionStatus::Succeeded, "{record:?}");
    let history = t.history(&record).await;
    let retries = history.iter().filter(|e| e.kind == HistoryKind::TaskRetryScheduled).count();
    assert_eq!(retries, 2, "two ProviderUnavailable retries in the history");
    assert_eq!(t.sleeper.requested().len(), 2, "the ASL backoff was applied");
    let calls = emulator.process_payment_calls();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|c| c.body["clientToken"] == calls[0].body["clientToken"]));
    assert_eq!(emulator.proofs_issued(), 1, "one wallet operation for the key");
}

#[tokio::test]
async fn the_session_check_denies_before_any_wallet_operation() {
    let check_first = AgentCorePolicy { check_session_first: true, ..Default::default() };
    // Budget: 0.005 USD left, payment 0.01.
    let emulator = AgentCoreEmulator::start().await;
    emulator.set_session(SessionState { available_usd: Some("0.005".into()), expiry_minutes: 60, age_seconds: 60 });
    let t = app(&emulator, agentcore_policy(check_first.clone())).await;
    let record = t.run(with_agentcore(execution_input("ac-short", AGENT, "10000"))).await;
    let error = record.error.unwrap();
    assert_eq!(error.error, "SessionBudgetExhausted", "{}", error.cause);
    assert!(error.cause.contains("0.005") && error.cause.contains("0.01"), "{}", error.cause);
    assert_eq!(emulator.process_payment_calls().len(), 0, "no wallet operation");
    let session_call = &emulator.received()[0];
    assert_eq!(session_call.path, "/payments/getPaymentSession");
    assert_eq!(session_call.body["paymentSessionId"], "ps-demo-1");

    // Expired: created 61 minutes ago with a 60-minute life.
    let emulator = AgentCoreEmulator::start().await;
    emulator.set_session(SessionState { available_usd: Some("10".into()), expiry_minutes: 60, age_seconds: 61 * 60 });
    let t = app(&emulator, agentcore_policy(check_first.clone())).await;
    let error = t.run(with_agentcore(execution_input("ac-expired", AGENT, "10000"))).await.error.unwrap();
    assert_eq!(error.error, "SessionExpired", "{}", error.cause);
    assert_eq!(emulator.process_payment_calls().len(), 0);

    // Enough budget: the check passes and the payment goes through.
    let emulator = AgentCoreEmulator::start().await;
    emulator.set_session(SessionState { available_usd: Some("0.01".into()), expiry_minutes: 60, age_seconds: 60 });
    let t = app(&emulator, agentcore_policy(check_first)).await;
    let record = t.run(with_agentcore(execution_input("ac-enough", AGENT, "10000"))).await;
    assert_eq!(record.status, ExecutionStatus::Succeeded, "{record:?}");
    assert_eq!(emulator.process_payment_calls().len(), 1);
}

fn agentpay_against(emulator: &AgentCoreEmulator, data_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_agentpay"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("AWS_ENDPOINT_URL_BEDROCK_AGENTCORE", &emulator.endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap()
}

// Multi-threaded: the emulator must serve while this thread waits for the child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_sessions_within_bounds_and_pays_through_agentcore() {
    let emulator = AgentCoreEmulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let arn = "arn:aws:bedrock-agentcore:us-east-1:123456789012:payment-manager/pm-demo";
    let base = ["--json", "agentcore", "create-session", "--manager-arn", arn, "--user-id", "user-7", "--agent", AGENT];

    let too_short = agentpay_against(&emulator, dir.path(), &[&base[..], &["--expiry-minutes", "10"]].concat());
    assert!(!too_short.status.success());
    let stderr = String::from_utf8_lossy(&too_short.stderr);
    assert!(stderr.contains("expiryTimeInMinutes") && stderr.contains("15 to 480 minutes"), "{stderr}");
    assert!(emulator.received().is_empty(), "refused before any call");

    let created = agentpay_against(
        &emulator,
        dir.path(),
        &[&base[..], &["--expiry-minutes", "120", "--max-spend-usd", "5"]].concat(),
    );
    assert!(created.status.success(), "{created:?}");
    let session: Value = serde_json::from_slice(&created.stdout).unwrap();
    assert_eq!(session["expiryTimeInMinutes"], 120);
    let call = &emulator.received()[0];
    assert_eq!(call.path, "/payments/createPaymentSession");
    assert_eq!(call.body["limits"]["maxSpendAmount"], json!({"value": "5.00", "currency": "USD"}));
    assert_eq!(call.body["expiryTimeInMinutes"], 120);
    assert!(call.body["clientToken"].as_str().unwrap().starts_with("session-"));

    // A whole payment through the CLI with --provider agentcore and the session just made.
    let set = agentpay_against(
        &emulator,
        dir.path(),
        &[
            "policy",
            "set",
            AGENT,
            "--per-transaction-usd",
            "1",
            "--daily-usd",
            "5",
            "--max-per-hour",
            "10",
            "--network",
            "eip155:84532",
            "--agentcore-manager-arn",
            arn,
            "--agentcore-session-id",
            session["paymentSessionId"].as_str().unwrap(),
            "--agentcore-instrument-id",
            "pi-cli",
        ],
    );
    assert!(set.status.success(), "{set:?}");
    let input = dir.path().join("input.json");
    std::fs::write(&input, execution_input("ac-cli", AGENT, "10000").to_string()).unwrap();
    let run =
        agentpay_against(&emulator, dir.path(), &["--provider", "agentcore", "--json", "run", input.to_str().unwrap()]);
    assert!(run.status.success(), "{run:?}");
    let pay = emulator.process_payment_calls();
    assert_eq!(pay.len(), 1);
    assert_eq!(pay[0].body["paymentSessionId"], session["paymentSessionId"]);
    assert_eq!(pay[0].body["paymentInstrumentId"], "pi-cli");
}

#[tokio::test]
async fn the_sample_mpp_event_pays_through_agentcore_and_is_refused_by_the_dev_wallet() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/events/executions/agentcore-mpp.json");
    let input: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let demo: SpendPolicy = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/events/policy-demo-agent.json")).unwrap(),
    )
    .unwrap();

    let emulator = AgentCoreEmulator::start().await;
    let provider = AgentCoreProvider::from_sdk_config(&emulator.sdk_config().await, Arc::new(SystemClock));
    let t = TestApp::with_provider("demo-agent", demo.clone(), Arc::new(provider)).await;
    let record = t.run(input.clone()).await;
    assert_eq!(record.status, ExecutionStatus::Succeeded, "{record:?}");
    assert_eq!(record.output.unwrap()["header"]["name"], "Authorization");
    assert_eq!(
        emulator.process_payment_calls()[0].body["paymentInput"]["mpp"]["wwwAuthenticateHeaders"][0],
        input["challenge"]["mpp"]
    );

    let t = TestApp::with_policy("demo-agent", demo).await;
    let error = t.run(input).await.error.unwrap();
    assert_eq!(error.error, "InvalidPaymentRequest");
    assert!(error.cause.contains("AGENTPAY_PROVIDER=agentcore"), "{}", error.cause);
}
