//! The agent-facing client: the local backend end to end, the AWS backend against moto's
//! Step Functions, and redrive against an emulator (moto has no RedriveExecution).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentpay::client::sfn::SfnBackend;
use agentpay::client::{
    ClientError, ListFilter, PaymentAnswer, PaymentClient, ReplayAction, ReplayOptions, WaitOptions,
};
use agentpay::clock::{Clock, SystemClock};
use agentpay::samples::execution_input;
use agentpay::store::{IdempotencyStatus, ReservationStatus};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::helpers::{TestApp, policy};
use crate::stores::{dynamodb_endpoint, local_aws_config};

const AGENT: &str = "agent-client";

/// A payment whose RecordLedger fails past its retries (the proof exists; redrive is the fix).
async fn failed_at_record_ledger(t: &TestApp, client: &PaymentClient, key: &str) -> String {
    t.app.ledger.fail_next_authorizations(5);
    let started = client.start(&execution_input(key, AGENT, "10000"), None).await.unwrap();
    assert_eq!(started.execution.status, "FAILED");
    assert!(matches!(started.answer, PaymentAnswer::Failed { ref error, .. } if error == "StoreUnavailable"));
    started.execution.execution_arn
}

#[tokio::test]
async fn start_is_named_by_key_and_a_second_start_describes_the_first() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 100)).await;
    let client = t.app.client();
    let input = execution_input("order-1001", AGENT, "10000");
    let first = client.start(&input, Some(WaitOptions::default())).await.unwrap();
    assert!(!first.already_existed);
    assert_eq!(first.execution.name, "order-1001");
    let PaymentAnswer::Paid { header, from_cache, .. } = &first.answer else { panic!("{:?}", first.answer) };
    assert_eq!(header.name, "PAYMENT-SIGNATURE");
    assert!(!from_cache);

    // An agent that crashed and starts again gets the same execution and header.
    let again = client.start(&input, None).await.unwrap();
    assert!(again.already_existed);
    assert_eq!(again.execution.execution_arn, first.execution.execution_arn);
    assert_eq!(again.answer, first.answer);
    assert_eq!(t.app.provider.delegated_calls(), 1);

    // The same key with another request is refused, naming the cause.
    let other = execution_input("order-1001", AGENT, "20000");
    let error = client.start(&other, None).await.unwrap_err();
    assert!(matches!(error, ClientError::NameTakenByOtherInput { .. }), "{error}");

    // No key, no name.
    let error = client.start(&json!({"agentId": AGENT}), None).await.unwrap_err();
    assert!(matches!(error, ClientError::NoIdempotencyKey), "{error}");
}

#[tokio::test]
async fn status_list_and_history_read_back_what_ran() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 100)).await;
    let other = "agent-other";
    t.app.store.put_policy(other, &policy("1.00", "5.00", 100)).await.unwrap();
    let client = t.app.client();
    let before = SystemClock.now();
    client.start(&execution_input("list-1", AGENT, "10000"), None).await.unwrap();
    client.start(&execution_input("list-2", AGENT, "9999999"), None).await.unwrap(); // over the cap: denied
    client.start(&execution_input("list-3", other, "10000"), None).await.unwrap();

    let denied = client.status("list-2").await.unwrap();
    assert!(matches!(denied.answer(), PaymentAnswer::Denied { ref error, .. } if error == "SpendLimitExceeded"));

    let mine = client.list(&ListFilter { agent_id: Some(AGENT.into()), ..Default::default() }).await.unwrap();
    let mut names: Vec<&str> = mine.iter().map(|e| e.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["list-1", "list-2"]);
    let failed = client.list(&ListFilter { status: Some("FAILED".into()), ..Default::default() }).await.unwrap();
    assert_eq!(failed.len(), 1);
    let since =
        client.list(&ListFilter { since: Some(before), until: Some(before), ..Default::default() }).await.unwrap();
    assert!(since.is_empty(), "an empty [since, until) range lists nothing");

    let history = client.history("list-1").await.unwrap();
    let tasks: Vec<&str> =
        history.iter().filter(|e| e.kind == "TaskSucceeded").filter_map(|e| e.state.as_deref()).collect();
    assert_eq!(tasks, ["CheckIdempotency", "CheckSpend", "ProcessPayment", "RecordLedger"]);
    assert!(history.iter().any(|e| e.detail.get("output").is_some()));
}

#[tokio::test]
async fn replay_redrives_a_failed_record_ledger_without_paying_twice() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 100)).await;
    let client = t.app.client();
    let arn = failed_at_record_ledger(&t, &client, "replay-1").await;
    let now = SystemClock.now();

    let dry = client.replay(&arn, now, ReplayOptions { dry_run: true, ..Default::default() }).await.unwrap();
    assert_eq!(dry.action, ReplayAction::WouldRedrive);
    assert_eq!(client.status(&arn).await.unwrap().status, "FAILED", "a dry run changes nothing");

    let replay = client.replay(&arn, now, ReplayOptions::default()).await.unwrap();
    assert_eq!(replay.action, ReplayAction::Redriven);
    let result = replay.result.unwrap();
    assert_eq!(result.status, "SUCCEEDED");
    assert_eq!(result.redrive_count, 1);
    assert_eq!(t.app.provider.delegated_calls(), 1, "succeeded steps are not run again: one proof");

    // A succeeded execution is not redriven: explained, and only --fresh starts anew.
    let refused = client.replay(&arn, now, ReplayOptions::default()).await.unwrap();
    assert_eq!(refused.action, ReplayAction::Skipped);
    assert!(refused.reason.unwrap().contains("status is SUCCEEDED"));
    let fresh = client.replay(&arn, now, ReplayOptions { fresh: true, ..Default::default() }).await.unwrap();
    assert_eq!(fresh.action, ReplayAction::StartedFresh);
    let fresh_run = fresh.result.unwrap();
    assert_eq!(fresh_run.name, "replay-1-fresh-1");
    assert!(matches!(fresh_run.answer(), PaymentAnswer::Paid { from_cache: true, .. }), "{fresh_run:?}");
    assert_eq!(t.app.provider.delegated_calls(), 1, "the fresh execution answered from the idempotency record");
    let record = t.app.store.idempotency("replay-1", t.app.steps.clock().now()).await.unwrap().unwrap();
    assert_eq!(record.status, IdempotencyStatus::Completed);
}

#[tokio::test]
async fn bulk_replay_redrives_every_failed_execution_in_range_once() {
    let t = TestApp::with_policy(AGENT, policy("1.00", "5.00", 100)).await;
    let client = t.app.client();
    let since = SystemClock.now();
    for i in 0..4 {
        failed_at_record_ledger(&t, &client, &format!("bulk-{i}")).await;
    }
    client.start(&execution_input("bulk-ok", AGENT, "10000"), None).await.unwrap();
    let filter = ListFilter { since: Some(since), ..Default::default() };
    let now = SystemClock.now();

    let mut seen = Vec::new();
    let dry = client
        .replay_all(&filter, now, ReplayOptions { dry_run: true, ..Default::default() }, |done, total, _| {
            seen.push((done, total))
        })
        .await
        .unwrap();
    assert_eq!(seen, [(1, 4), (2, 4), (3, 4), (4, 4)], "progress per execution");
    assert!(dry.iter().all(|r| r.action == ReplayAction::WouldRedrive));

    let done = client.replay_all(&filter, now, ReplayOptions::default(), |_, _, _| {}).await.unwrap();
    assert_eq!(done.len(), 4);
    assert!(
        done.iter().all(|r| r.action == ReplayAction::Redriven && r.result.as_ref().unwrap().status == "SUCCEEDED")
    );
    assert_eq!(t.app.provider.delegated_calls(), 5, "one proof per payment, none added by replay");
    let authorized = t.app.store.reservations(AGENT).await.unwrap();
    assert!(authorized.iter().all(|r| r.status == ReservationStatus::Authorized));
    let again = client.replay_all(&filter, now, ReplayOptions::default(), |_, _, _| {}).await.unwrap();
    assert!(again.is_empty(), "nothing failed is left");
}

async fn sfn_client(endpoint: &str) -> aws_sdk_sfn::Client {
    aws_sdk_sfn::Client::new(&local_aws_config(endpoint).await)
}

/// The deployed definition, its Lambda ARNs substituted, as a state machine on moto.
pub async fn moto_state_machine(sfn: &aws_sdk_sfn::Client) -> String {
    let mut definition = agentpay::asl::PAYMENT_DEFINITION.to_owned();
    for (name, arn) in agentpay::asl::runner::local_substitutions() {
        definition = definition.replace(&format!("${{{name}}}"), &arn);
    }
    sfn.create_state_machine()
        .name(format!("agentpay-{}", alloy_primitives::hex::encode(rand::random::<[u8; 4]>())))
        .definition(definition)
        .role_arn("arn:aws:iam::123456789012:role/agentpay-state-machine")
        .send()
        .await
        .unwrap()
        .state_machine_arn
}

#[tokio::test]
async fn the_aws_backend_starts_describes_lists_and_reads_history_on_moto() {
    let sfn = sfn_client(&dynamodb_endpoint()).await;
    let machine = moto_state_machine(&sfn).await;
    let client = PaymentClient::new(Box::new(SfnBackend::new(sfn.clone(), &machine)));
    let input = execution_input("aws-order-1", AGENT, "10000");

    // moto does not run Lambda tasks: the execution stays RUNNING, so waiting is bounded.
    let wait = WaitOptions {
        timeout: Duration::from_millis(300),
        first_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
    };
    let started = client.start(&input, Some(wait)).await.unwrap();
    assert!(!started.already_existed);
    assert_eq!(started.answer, PaymentAnswer::Running);
    assert!(started.execution.execution_arn.ends_with(":aws-order-1"), "{}", started.execution.execution_arn);
    assert_eq!(started.execution.input.as_ref(), Some(&input));

    let again = client.start(&input, None).await.unwrap();
    assert_eq!(again.execution.execution_arn, started.execution.execution_arn);

    let running = client
        .list(&ListFilter { status: Some("RUNNING".into()), agent_id: Some(AGENT.into()), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].name, "aws-order-1");
    let none = client.list(&ListFilter { agent_id: Some("nobody".into()), ..Default::default() }).await.unwrap();
    assert!(none.is_empty());

    let history = client.history("aws-order-1").await.unwrap();
    assert_eq!(history.first().map(|e| e.kind.as_str()), Some("ExecutionStarted"));
    assert!(history.windows(2).all(|w| w[0].id < w[1].id));

    let error = client.status("never-started").await.unwrap_err();
    assert!(matches!(error, ClientError::NotFound(_)), "{error}");

    // A running execution is not redriven, and the reason says so.
    let replay = client.replay("aws-order-1", SystemClock.now(), ReplayOptions::default()).await.unwrap();
    assert_eq!(replay.action, ReplayAction::Skipped);
    assert!(replay.reason.unwrap().contains("status is RUNNING"));
}

/// Step Functions' awsJson1_0 for what moto lacks: DescribeExecution, DescribeStateMachine,
/// GetExecutionHistory and RedriveExecution, with scripted answers.
#[derive(Clone, Default)]
struct SfnEmulator {
    executions: Arc<Mutex<BTreeMap<String, Value>>>,
    machine_type: Arc<Mutex<String>>,
    redrive_error: Arc<Mutex<Option<(String, String)>>>,
    received: Arc<Mutex<Vec<(String, Value)>>>,
}

impl SfnEmulator {
    async fn start(&self) -> String {
        *self.machine_type.lock().unwrap() = "STANDARD".into();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let this = self.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let this = this.clone();
                tokio::spawn(async move {
                    socket.set_nodelay(true).unwrap();
                    let (read, mut write) = socket.into_split();
                    let mut reader = BufReader::new(read);
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let mut headers = BTreeMap::new();
                        loop {
                            let mut header = String::new();
                            reader.read_line(&mut header).await.unwrap();
                            if header.trim().is_empty() {
                                break;
                            }
                            if let Some((k, v)) = header.split_once(':') {
                                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                            }
                        }
                        let length: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                        let mut body = vec![0; length];
                        reader.read_exact(&mut body).await.unwrap();
                        let target = headers.get("x-amz-target").cloned().unwrap_or_default();
                        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let (status, answer) = this.answer(&target, body);
                        let text = answer.to_string();
                        let response = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.0\r\ncontent-length: {}\r\n\r\n{text}",
                            text.len()
                        );
                        write.write_all(response.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        endpoint
    }

    fn answer(&self, target: &str, body: Value) -> (u16, Value) {
        let operation = target.trim_start_matches("AWSStepFunctions.").to_owned();
        self.received.lock().unwrap().push((operation.clone(), body.clone()));
        let arn = body["executionArn"].as_str().unwrap_or_default().to_owned();
        let executions = self.executions.lock().unwrap();
        match operation.as_str() {
            "DescribeStateMachine" => (
                200,
                json!({"stateMachineArn": body["stateMachineArn"], "name": "m", "status": "ACTIVE",
                "definition": "{}", "roleArn": "arn:aws:iam::123456789012:role/r", "type": *self.machine_type.lock().unwrap(), "creationDate": 1.7e9}),
            ),
            "DescribeExecution" => match executions.get(&arn) {
                Some(execution) => (200, execution.clone()),
                None => (
                    400,
                    json!({"__type": "ExecutionDoesNotExist", "message": format!("Execution Does Not Exist: '{arn}'")}),
                ),
            },
            "GetExecutionHistory" => (
                200,
                json!({"events": [
                    {"id": 1, "previousEventId": 0, "timestamp": 1.7e9, "type": "ExecutionStarted", "executionStartedEventDetails": {"input": "{}"}},
                    {"id": 2, "previousEventId": 1, "timestamp": 1.7e9, "type": "TaskStateEntered", "stateEnteredEventDetails": {"name": "RecordLedger", "input": "{}"}},
                    {"id": 3, "previousEventId": 2, "timestamp": 1.7e9, "type": "LambdaFunctionFailed", "lambdaFunctionFailedEventDetails": {"error": "StoreUnavailable", "cause": "throttled"}},
                    {"id": 4, "previousEventId": 3, "timestamp": 1.7e9, "type": "ExecutionFailed", "executionFailedEventDetails": {"error": "StoreUnavailable", "cause": "throttled"}}
                ]}),
            ),
            "RedriveExecution" => match self.redrive_error.lock().unwrap().clone() {
                Some((code, message)) => (400, json!({"__type": code, "message": message})),
                None => (200, json!({"redriveDate": 1.7e9})),
            },
            other => (400, json!({"__type": "UnknownOperationException", "message": other})),
        }
    }

    fn add_execution(&self, name: &str, status: &str, stopped_seconds_ago: u64) -> String {
        let arn = format!("arn:aws:states:us-east-1:123456789012:execution:agentpay:{name}");
        let stopped = (SystemClock.now().seconds() as u64 - stopped_seconds_ago) as f64;
        self.executions.lock().unwrap().insert(
            arn.clone(),
            json!({
                "executionArn": arn, "stateMachineArn": "arn:aws:states:us-east-1:123456789012:stateMachine:agentpay",
                "name": name, "status": status, "startDate": stopped - 5.0, "stopDate": stopped,
                "input": execution_input(name, AGENT, "10000").to_string(), "redriveCount": 0,
                "error": "StoreUnavailable", "cause": "throttled"
            }),
        );
        arn
    }

    fn redrive_calls(&self) -> Vec<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(op, _)| op == "RedriveExecution")
            .map(|(_, b)| b.clone())
            .collect()
    }
}

#[tokio::test]
async fn redrive_requests_are_built_and_refusals_explained_against_the_emulator() {
    let emulator = SfnEmulator::default();
    let endpoint = emulator.start().await;
    let machine = "arn:aws:states:us-east-1:123456789012:stateMachine:agentpay";
    let client = PaymentClient::new(Box::new(SfnBackend::new(sfn_client(&endpoint).await, machine)));
    let now = SystemClock.now();

    let failed = emulator.add_execution("pay-failed", "FAILED", 3600);
    let replay = client.replay(&failed, now, ReplayOptions::default()).await.unwrap();
    assert_eq!(replay.action, ReplayAction::Redriven);
    let calls = emulator.redrive_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["executionArn"], failed.as_str());
    assert!(calls[0]["clientToken"].as_str().unwrap().starts_with("redrive-"), "{}", calls[0]);

    // Step Functions says no: the reason reaches the caller.
    *emulator.redrive_error.lock().unwrap() =
        Some(("ExecutionNotRedrivable".into(), "Execution has exceeded the max execution history size".into()));
    let error = client.replay(&failed, now, ReplayOptions::default()).await.unwrap_err();
    assert!(matches!(&error, ClientError::NotRedrivable { reason, .. } if reason.contains("history size")), "{error}");

    // Refused before calling RedriveExecution: succeeded, too old, Express.
    let succeeded = emulator.add_execution("pay-ok", "SUCCEEDED", 60);
    let old = emulator.add_execution("pay-old", "FAILED", 15 * 24 * 3600);
    let before = emulator.redrive_calls().len();
    let skipped = client.replay(&succeeded, now, ReplayOptions::default()).await.unwrap();
    assert!(skipped.reason.unwrap().contains("status is SUCCEEDED"));
    let skipped = client.replay(&old, now, ReplayOptions::default()).await.unwrap();
    assert!(skipped.reason.unwrap().contains("more than 14 days ago"));
    *emulator.machine_type.lock().unwrap() = "EXPRESS".into();
    let skipped = client.replay(&failed, now, ReplayOptions::default()).await.unwrap();
    assert!(skipped.reason.unwrap().contains("Express"));
    assert_eq!(emulator.redrive_calls().len(), before, "no RedriveExecution for a refused replay");

    // History events are readable: state names and errors.
    let history = client.history(&failed).await.unwrap();
    assert_eq!(history[2].state.as_deref(), Some("RecordLedger"));
    assert_eq!(history[2].detail["error"], "StoreUnavailable");
}
