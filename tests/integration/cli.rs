//! The `agentpay` binary as a person uses it.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn agentpay(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentpay"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn policy_run_list_describe_and_ledger_work_together() {
    let dir = tempfile::tempdir().unwrap();
    let set = agentpay(dir.path(), &["policy", "set", "demo-agent", "--file", "events/policy-demo-agent.json"]);
    assert!(set.status.success(), "{set:?}");
    assert!(stdout(&set).contains("rolling 24 h limit"));

    let start = agentpay(dir.path(), &["start", "events/executions/paid-call.json", "--wait"]);
    assert!(start.status.success(), "{start:?}");
    let text = stdout(&start);
    assert!(text.contains("status  SUCCEEDED") && text.contains("PAYMENT-SIGNATURE"), "{text}");

    let list = agentpay(dir.path(), &["--json", "list", "--status", "succeeded"]);
    let listed: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let name = listed[0]["name"].as_str().unwrap().to_owned();
    assert_eq!(name, "demo-paid-1", "executions are named after the key");

    let status = agentpay(dir.path(), &["--json", "status", &name]);
    let described: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(described["execution"]["status"], "SUCCEEDED");
    let history: Value = serde_json::from_slice(&agentpay(dir.path(), &["--json", "history", &name]).stdout).unwrap();
    assert!(history.as_array().unwrap().len() > 10);
    assert!(stdout(&agentpay(dir.path(), &["history", &name])).contains("RecordLedger"), "the steps are shown");

    let ledger = agentpay(dir.path(), &["ledger", "show", "demo-agent"]);
    let text = stdout(&ledger);
    assert!(text.contains("AUTHORIZED") && text.contains("0.50 USDC of 1.00 USDC"), "{text}");
}

#[test]
fn a_failed_run_exits_1_and_explains() {
    let dir = tempfile::tempdir().unwrap();
    agentpay(dir.path(), &["policy", "set", "demo-agent", "--file", "events/policy-demo-agent.json"]);
    let start = agentpay(dir.path(), &["start", "events/executions/invalid-challenge.json", "--wait"]);
    assert_eq!(start.status.code(), Some(1));
    let text = stdout(&start);
    assert!(text.contains("InvalidPaymentRequest") && text.contains("accepts[0].payTo"), "{text}");
}

/// One vocabulary: the former local-only names still work, say what they are now, and do
/// exactly that.
#[test]
fn the_former_command_names_are_the_new_commands() {
    let dir = tempfile::tempdir().unwrap();
    agentpay(dir.path(), &["policy", "set", "demo-agent", "--file", "events/policy-demo-agent.json"]);
    let run = agentpay(dir.path(), &["run", "events/executions/paid-call.json"]);
    assert!(run.status.success(), "{run:?}");
    assert!(String::from_utf8_lossy(&run.stderr).contains("is `agentpay start FILE --wait` now"));
    assert!(stdout(&run).contains("status  SUCCEEDED"));
    let listed: Value =
        serde_json::from_slice(&agentpay(dir.path(), &["--json", "executions", "list"]).stdout).unwrap();
    assert_eq!(listed[0]["name"], "demo-paid-1");
    let described = agentpay(dir.path(), &["--json", "executions", "describe", "demo-paid-1"]);
    let described: Value = serde_json::from_slice(&described.stdout).unwrap();
    assert_eq!(described["execution"]["status"], "SUCCEEDED");
    let help = stdout(&agentpay(dir.path(), &["--help"]));
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .and_then(|rest| rest.split("Options:").next())
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert!(commands.contains(&"start") && commands.contains(&"replay"), "{commands:?}");
    for former in ["run", "executions", "redrive"] {
        assert!(!commands.contains(&former), "one vocabulary in the help: {commands:?}");
    }
}

#[test]
fn policy_flags_pause_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let set = agentpay(
        dir.path(),
        &[
            "--json",
            "policy",
            "set",
            "a1",
            "--per-transaction-usd",
            "2.5",
            "--daily-usd",
            "10",
            "--max-per-hour",
            "3",
            "--network",
            "eip155:84532",
        ],
    );
    assert!(set.status.success(), "{set:?}");
    let policy: Value = serde_json::from_slice(&set.stdout).unwrap();
    assert_eq!(policy["policy"]["perTransactionLimitUsd"], "2.50");
    let paused = agentpay(dir.path(), &["--json", "policy", "pause", "a1", "--reason", "incident 42: runaway loop"]);
    assert_eq!(serde_json::from_slice::<Value>(&paused.stdout).unwrap()["policy"]["paused"], true);
    // Setting the policy again does not resume it, and says so.
    let set_again = agentpay(
        dir.path(),
        &[
            "--json",
            "policy",
            "set",
            "a1",
            "--per-transaction-usd",
            "3",
            "--daily-usd",
            "10",
            "--max-per-hour",
            "3",
            "--network",
            "eip155:84532",
        ],
    );
    assert!(set_again.status.success(), "{set_again:?}");
    let stored: Value = serde_json::from_slice(&set_again.stdout).unwrap();
    assert_eq!(
        (stored["policy"]["paused"].as_bool(), stored["policy"]["perTransactionLimitUsd"].as_str()),
        (Some(true), Some("3.00"))
    );
    assert!(String::from_utf8_lossy(&set_again.stderr).contains("stays paused"), "{set_again:?}");
    let resumed = agentpay(dir.path(), &["--json", "policy", "resume", "a1"]);
    assert_eq!(serde_json::from_slice::<Value>(&resumed.stdout).unwrap()["policy"]["paused"], false);

    // The whole fleet at once.
    let second = agentpay(
        dir.path(),
        &[
            "policy",
            "set",
            "a2",
            "--per-transaction-usd",
            "1",
            "--daily-usd",
            "2",
            "--max-per-hour",
            "3",
            "--network",
            "eip155:84532",
        ],
    );
    assert!(second.status.success(), "{second:?}");
    let all = agentpay(dir.path(), &["--json", "policy", "pause", "--all"]);
    let all: Value = serde_json::from_slice(&all.stdout).unwrap();
    let agents: Vec<(&str, bool)> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["agentId"].as_str().unwrap(), a["policy"]["paused"].as_bool().unwrap()))
        .collect();
    assert_eq!(agents, [("a1", true), ("a2", true)]);
    let neither = agentpay(dir.path(), &["policy", "pause"]);
    assert!(!neither.status.success() && String::from_utf8_lossy(&neither.stderr).contains("--all"), "{neither:?}");

    // Every edit, pause and resume is in the agent's policy history, with who and why.
    let ledger = agentpay(dir.path(), &["--json", "ledger", "show", "a1"]);
    let history: Value = serde_json::from_slice::<Value>(&ledger.stdout).unwrap()["policyHistory"].clone();
    let actions: Vec<(&str, u64)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["action"].as_str().unwrap(), c["version"].as_u64().unwrap()))
        .collect();
    assert_eq!(actions, [("SET", 1), ("PAUSED", 2), ("SET", 3), ("RESUMED", 4), ("PAUSED", 5)]);
    assert_eq!(history[1]["reason"], "incident 42: runaway loop");
    assert!(history[1]["by"].as_str().unwrap().starts_with("local:"), "{history}");
    let shown = agentpay(dir.path(), &["ledger", "show", "a1"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("incident 42: runaway loop"), "{shown:?}");
}

#[test]
fn bad_input_gets_a_message_a_person_can_act_on() {
    let dir = tempfile::tempdir().unwrap();
    let bad_usd = agentpay(
        dir.path(),
        &[
            "policy",
            "set",
            "a1",
            "--per-transaction-usd",
            "1.0000001",
            "--daily-usd",
            "1",
            "--max-per-hour",
            "1",
            "--network",
            "eip155:84532",
        ],
    );
    assert!(!bad_usd.status.success());
    assert!(String::from_utf8_lossy(&bad_usd.stderr).contains("at most 6 decimal places"));
    let bad_network = agentpay(
        dir.path(),
        &[
            "policy",
            "set",
            "a1",
            "--per-transaction-usd",
            "1",
            "--daily-usd",
            "1",
            "--max-per-hour",
            "1",
            "--network",
            "eip155:1",
        ],
    );
    assert!(String::from_utf8_lossy(&bad_network.stderr).contains("unknown network \"eip155:1\""));
    let missing = agentpay(dir.path(), &["start", "no-such-file.json"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read no-such-file.json"));
}

#[test]
fn the_demo_behaves_as_it_says() {
    let dir = tempfile::tempdir().unwrap();
    let demo = agentpay(dir.path(), &["--json", "demo"]);
    assert!(demo.status.success(), "{}", String::from_utf8_lossy(&demo.stderr));
    let report: Value = serde_json::from_slice(&demo.stdout).unwrap();
    assert_eq!(report["unexpected"], 0);
    assert_eq!(report["scenarios"].as_array().unwrap().len(), 9);
}

#[test]
fn the_whole_workflow_runs_locally_against_dynamodb() {
    let endpoint = crate::stores::dynamodb_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let id = alloy_primitives::hex::encode(rand::random::<[u8; 4]>());
    let (idempotency, ledger) = (format!("cli-idem-{id}"), format!("cli-ledger-{id}"));
    let dynamo = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_agentpay"))
            .args(["--data-dir", dir.path().to_str().unwrap(), "--store", "dynamodb"])
            .args(["--idempotency-table", &idempotency, "--ledger-table", &ledger])
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("AWS_ENDPOINT_URL_DYNAMODB", &endpoint)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .output()
            .unwrap()
    };
    let created = dynamo(&["tables", "create"]);
    assert!(created.status.success(), "{created:?}");
    assert!(dynamo(&["policy", "set", "demo-agent", "--file", "events/policy-demo-agent.json"]).status.success());
    let start = dynamo(&["--json", "start", "events/executions/paid-call.json", "--wait"]);
    assert!(start.status.success(), "{}", String::from_utf8_lossy(&start.stderr));
    let again = dynamo(&["--json", "start", "events/executions/paid-call.json", "--wait"]);
    let again: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["alreadyExisted"], true, "one key, one execution: {again}");
    assert_eq!(again["execution"]["status"], "SUCCEEDED");
    let ledger_json: Value =
        serde_json::from_slice(&dynamo(&["--json", "ledger", "show", "demo-agent"]).stdout).unwrap();
    assert_eq!(ledger_json["reservations"].as_array().unwrap().len(), 1);
    assert_eq!(ledger_json["reservations"][0]["status"], "AUTHORIZED");
    assert_eq!(ledger_json["audit"].as_array().unwrap().len(), 1);
    // The SQLite file holds only the runner's history, not the payment.
    let local = agentpay(dir.path(), &["--json", "ledger", "show", "demo-agent"]);
    let local: Value = serde_json::from_slice(&local.stdout).unwrap();
    assert!(local["reservations"].as_array().unwrap().is_empty());
}

#[test]
fn start_status_list_history_and_replay_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let set = agentpay(dir.path(), &["policy", "set", "demo-agent", "--file", "events/policy-demo-agent.json"]);
    assert!(set.status.success(), "{set:?}");

    let start = agentpay(dir.path(), &["--json", "start", "events/executions/paid-call.json", "--wait"]);
    assert!(start.status.success(), "{start:?}");
    let started: Value = serde_json::from_slice(&start.stdout).unwrap();
    assert_eq!(started["answer"]["outcome"], "PAID");
    assert_eq!(started["answer"]["header"]["name"], "PAYMENT-SIGNATURE");
    let name = started["execution"]["name"].as_str().unwrap().to_owned();

    let again = agentpay(dir.path(), &["start", "events/executions/paid-call.json"]);
    assert!(again.status.success());
    assert!(stdout(&again).contains("existed already"), "{}", stdout(&again));

    let status = agentpay(dir.path(), &["status", &name]);
    assert!(stdout(&status).contains("retry the request with header PAYMENT-SIGNATURE"), "{}", stdout(&status));
    let list = agentpay(dir.path(), &["list", "--agent", "demo-agent"]);
    assert!(stdout(&list).contains(&name));
    let history = agentpay(dir.path(), &["history", &name]);
    assert!(stdout(&history).contains("RecordLedger"), "{}", stdout(&history));

    let replay = agentpay(dir.path(), &["replay", &name]);
    assert!(stdout(&replay).contains("status is SUCCEEDED"), "{}", stdout(&replay));
    let bulk = agentpay(dir.path(), &["--json", "replay", "--all", "--dry-run"]);
    let summary: Value = serde_json::from_slice(&bulk.stdout).unwrap();
    assert_eq!(summary["summary"]["total"], 0, "nothing failed");

    let bad = agentpay(dir.path(), &["list", "--status", "done"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected one of RUNNING, SUCCEEDED"));

    let aws = agentpay(dir.path(), &["--backend", "aws", "status", &name]);
    assert!(!aws.status.success());
    assert!(String::from_utf8_lossy(&aws.stderr).contains("AGENTPAY_STATE_MACHINE_ARN"));
}

/// Writes an execution record and its first history event straight into the local store, as a
/// runner that stopped there would have left them.
fn leave_execution(dir: &Path, name: &str, shape: impl FnOnce(&mut agentpay::executions::ExecutionRecord)) {
    use agentpay::executions::{ExecutionRecord, ExecutionStatus, ExecutionStore, HistoryEvent, HistoryKind};
    let input: Value =
        serde_json::from_str(&std::fs::read_to_string("events/executions/paid-call.json").unwrap()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let store = agentpay::store::sqlite::SqliteStore::open(&dir.join("agentpay.db")).unwrap();
        let now = agentpay::clock::Timestamp::from_millis(1_763_700_000_000);
        let mut record = ExecutionRecord {
            execution_id: agentpay::asl::runner::local_execution_arn(name),
            name: name.into(),
            status: ExecutionStatus::Running,
            input: input.clone(),
            output: None,
            error: None,
            failed_state: None,
            started_at: now,
            stopped_at: None,
            redrive_count: 0,
            agent_id: Some("demo-agent".into()),
            idempotency_key: Some("demo-paid-1".into()),
            owner: None,
        };
        shape(&mut record);
        assert!(store.create_execution(&record).await.unwrap());
        let started = HistoryEvent {
            seq: 0,
            at: now,
            kind: HistoryKind::ExecutionStarted,
            state: None,
            details: serde_json::json!({"input": input}),
        };
        store.append_history(&record.execution_id, &[started]).await.unwrap();
    });
}

/// A held execution says what to do, and `replay` does it: the key is asked again.
#[test]
fn a_held_execution_points_to_replay_and_replay_resolves_it() {
    use agentpay::executions::ExecutionStatus;
    let dir = tempfile::tempdir().unwrap();
    let set = agentpay(dir.path(), &["policy", "set", "demo-agent", "--file", "events/policy-demo-agent.json"]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    leave_execution(dir.path(), "held-1", |record| {
        record.status = ExecutionStatus::Failed;
        record.failed_state = Some("PaymentOutcomeUnknown".into());
        record.error = Some(agentpay::store::ErrorRecord {
            error: "PaymentOutcomeUnknown".into(),
            cause: "the provider timed out after the request was sent".into(),
        });
    });
    let described = stdout(&agentpay(dir.path(), &["status", "held-1"]));
    assert!(described.contains("`agentpay replay held-1` asks the provider again"), "{described}");
    let replay = agentpay(dir.path(), &["--json", "replay", "held-1", "--wait"]);
    assert!(replay.status.success(), "{}{}", stdout(&replay), String::from_utf8_lossy(&replay.stderr));
    let replayed: Value = serde_json::from_slice(&replay.stdout).unwrap();
    let replay = &replayed["replays"][0];
    assert_eq!(replay["action"], "STARTED_FRESH");
    assert_eq!(
        (replay["result"]["name"].as_str(), replay["result"]["status"].as_str()),
        (Some("held-1-fresh-1"), Some("SUCCEEDED"))
    );
}

/// A RUNNING execution whose process died (its owner pid is gone) is resumed by `replay`.
#[test]
fn replay_resumes_an_execution_whose_process_died() {
    let dir = tempfile::tempdir().unwrap();
    let set = agentpay(dir.path(), &["policy", "set", "demo-agent", "--file", "events/policy-demo-agent.json"]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    // What a runner that died right after starting leaves behind: the record and its first event.
    // No process has this pid (Linux caps pids far below it).
    leave_execution(dir.path(), "died-1", |record| record.owner = Some("pid:4294967295:dead".into()));
    let resumed = agentpay(dir.path(), &["--json", "replay", "died-1"]);
    assert!(resumed.status.success(), "{}{}", stdout(&resumed), String::from_utf8_lossy(&resumed.stderr));
    let resumed: Value = serde_json::from_slice(&resumed.stdout).unwrap();
    assert_eq!(resumed["replays"][0]["action"], "RESUMED", "{resumed}");
    let described: Value =
        serde_json::from_slice(&agentpay(dir.path(), &["--json", "status", "died-1"]).stdout).unwrap();
    assert_eq!(described["execution"]["status"], "SUCCEEDED");
}

/// Human approval from the command line: a payment above the threshold waits (exit code 2,
/// the approval named), operators list, show and approve it, and the payment is made.
#[test]
fn a_payment_waits_for_a_person_who_approves_it_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let set = agentpay(
        dir.path(),
        &[
            "policy",
            "set",
            "demo-agent",
            "--per-transaction-usd",
            "1",
            "--daily-usd",
            "5",
            "--max-per-hour",
            "10",
            "--network",
            "eip155:84532",
            "--approval-threshold-usd",
            "0.10",
            "--reason",
            "pilot",
        ],
    );
    assert!(set.status.success(), "{set:?}");
    let start = agentpay(dir.path(), &["start", "events/executions/paid-call.json", "--wait"]);
    assert_eq!(start.status.code(), Some(2), "{start:?}");
    assert!(stdout(&start).contains("waits   for a person: approval apr-"), "{}", stdout(&start));

    let list = agentpay(dir.path(), &["--json", "approvals", "list"]);
    let listed: Value = serde_json::from_slice(&list.stdout).unwrap();
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(listed[0]["status"], "PENDING");
    assert_eq!(listed[0]["taskToken"], "(redacted)", "the token never leaves the store");
    let show = agentpay(dir.path(), &["approvals", "show", &id]);
    assert!(stdout(&show).contains("above the agent's approval threshold"), "{}", stdout(&show));
    assert!(dir.path().join("notifications.jsonl").exists(), "the operators were told");

    let approve = agentpay(dir.path(), &["--json", "approve", &id]);
    assert!(approve.status.success(), "{approve:?}");
    let approved: Value = serde_json::from_slice(&approve.stdout).unwrap();
    assert_eq!(approved["approval"]["status"], "APPROVED");
    assert!(approved["approval"]["decidedBy"].as_str().unwrap().starts_with("local:"));
    let status = agentpay(dir.path(), &["--json", "status", "demo-paid-1"]);
    let answer: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(answer["answer"]["outcome"], "PAID", "{answer}");
    let twice = agentpay(dir.path(), &["reject", &id, "--reason", "too late"]);
    assert!(!twice.status.success());
    assert!(String::from_utf8_lossy(&twice.stderr).contains("APPROVED by local:"), "{twice:?}");
}

#[test]
fn a_settlement_report_moves_a_payment_forward_from_the_command_line() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    agentpay(dir.path(), &["policy", "set", "demo-agent", "--file", "events/policy-demo-agent.json"]);
    assert!(agentpay(dir.path(), &["start", "events/executions/paid-call.json", "--wait"]).status.success());
    let tx = format!("0x{}", "5a".repeat(32));
    let answer = |value: Value| base64::engine::general_purpose::STANDARD.encode(value.to_string());
    let pending = answer(serde_json::json!({"success": false, "transaction": tx, "network": "eip155:84532"}));
    let settle = |flag: &str, value: &str| {
        agentpay(dir.path(), &["settle", "demo-paid-1", "--agent", "demo-agent", flag, value])
    };

    let first = settle("--payment-response", &pending);
    assert!(first.status.success(), "{first:?}");
    assert!(stdout(&first).contains("is now SETTLEMENT_PENDING"), "{}", stdout(&first));
    let again = settle("--payment-response", &pending);
    assert!(stdout(&again).contains("recorded before, nothing changed"), "{}", stdout(&again));

    let receipt = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::json!({"status": "success", "method": "evm", "reference": tx}).to_string());
    let settled = settle("--payment-receipt", &receipt);
    assert!(stdout(&settled).contains("is now SETTLED, transaction 0x5a5a"), "{}", stdout(&settled));
    let ledger = stdout(&agentpay(dir.path(), &["ledger", "show", "demo-agent"]));
    assert!(ledger.contains("SETTLED"), "{ledger}");

    // A lie and a garbled answer: refused, named, exit 2 (as every command error).
    let failed = answer(serde_json::json!({"success": false, "transaction": "", "errorReason": "insufficient_funds"}));
    let lie = settle("--x-payment-response", &failed);
    assert_eq!(lie.status.code(), Some(2));
    let text = String::from_utf8_lossy(&lie.stderr);
    assert!(text.contains("refused (audited, nothing changed)") && text.contains("is SETTLED"), "{text}");
    let garbled = settle("--payment-response", "not base64!");
    assert_eq!(garbled.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&garbled.stderr).contains("paymentResponse"), "{garbled:?}");
    let none = agentpay(dir.path(), &["settle", "demo-paid-1", "--agent", "demo-agent"]);
    assert!(!none.status.success(), "one of the three answers is required");

    // The accounting export: one row per payment, its context, state and transaction.
    let csv = stdout(&agentpay(dir.path(), &["ledger", "export", "demo-agent"]));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(lines[0].starts_with("idempotencyKey,reservationId,agentId,userId,status,amountAtomic,"), "{csv}");
    assert!(
        lines[1].starts_with("demo-paid-1,") && lines[1].contains(",SETTLED,500000,") && lines[1].contains(&tx),
        "{csv}"
    );
    let jsonl =
        stdout(&agentpay(dir.path(), &["ledger", "export", "demo-agent", "--format", "jsonl", "--since", "1d"]));
    let row: Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    assert_eq!((row["status"].as_str(), row["amountAtomic"].as_str()), (Some("SETTLED"), Some("500000")));
    let later = agentpay(dir.path(), &["ledger", "export", "demo-agent", "--since", "2999-01-01T00:00:00Z"]);
    assert_eq!(stdout(&later).lines().count(), 1, "only the header");
    let bad = agentpay(dir.path(), &["ledger", "export", "demo-agent", "--since", "last week"]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--since: received \"last week\", expected a duration like 30d")
    );

    // Reconcile: the authorization has not expired yet; the summary counts it as settled.
    let reconciled = agentpay(dir.path(), &["reconcile", "--dry-run"]);
    assert!(reconciled.status.success(), "{reconciled:?}");
    let text = stdout(&reconciled);
    assert!(text.contains("no JSON-RPC endpoint configured") && text.contains("0 payment(s) would change"), "{text}");
    assert!(text.contains("SETTLED") && text.contains("500000"), "{text}");
    let summary: Value = serde_json::from_slice(&agentpay(dir.path(), &["--json", "reconcile"]).stdout).unwrap();
    assert_eq!(summary["agents"][0]["states"]["SETTLED"]["payments"], 1, "{summary}");
    let misconfigured = Command::new(env!("CARGO_BIN_EXE_agentpay"))
        .args(["--data-dir", dir.path().to_str().unwrap(), "reconcile"])
        .env("AGENTPAY_RPC_URLS", "eip155:84532")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&misconfigured.stderr)
            .contains("AGENTPAY_RPC_URLS: \"eip155:84532\" is not network=url")
    );
}

/// From shadow to enforce on the command line: the mode is an audited edit, a shadow start
/// answers the decision and pays nothing, the ledger, the export and the policy history show
/// it as such; back to enforce, the same request pays.
#[test]
fn an_agent_goes_from_shadow_to_enforce_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let set = agentpay(dir.path(), &["policy", "set", "demo-agent", "--file", "events/policy-demo-agent.json"]);
    assert!(set.status.success(), "{set:?}");
    let mode = agentpay(dir.path(), &["policy", "mode", "demo-agent", "shadow", "--reason", "prove the policy first"]);
    assert!(mode.status.success(), "{mode:?}");
    assert!(stdout(&mode).contains("shadow (decides and records, pays nothing)"), "{}", stdout(&mode));

    let start = agentpay(dir.path(), &["start", "events/executions/paid-call.json", "--wait"]);
    assert!(start.status.success(), "{start:?}");
    let text = stdout(&start);
    assert!(text.contains("shadow  WOULD_PAY") && text.contains("nothing was paid"), "{text}");
    let history = stdout(&agentpay(dir.path(), &["history", "demo-paid-1"]));
    assert!(history.contains("PaymentShadowed") && history.contains(r#"{"outcome":"SHADOW""#), "{history}");
    assert!(!history.contains("ProcessPayment"), "the provider's step is never entered: {history}");
    let ledger = stdout(&agentpay(dir.path(), &["ledger", "show", "demo-agent"]));
    assert!(ledger.contains("SHADOW: WOULD_PAY") && ledger.contains("shadow window"), "{ledger}");
    assert!(
        ledger.contains("spent in the last 24 h (reserved + authorized + settled, whole hours): 0.00 USDC"),
        "{ledger}"
    );
    assert!(ledger.contains("prove the policy first"), "the mode change is in the policy history: {ledger}");
    let export = stdout(&agentpay(dir.path(), &["ledger", "export", "demo-agent", "--format", "jsonl"]));
    let row: serde_json::Value = serde_json::from_str(export.lines().next().unwrap()).unwrap();
    assert_eq!((row["status"].as_str(), row["shadowVerdict"].as_str()), (Some("SHADOW"), Some("WOULD_PAY")));

    // A stricter draft, backtested over the shadow history: it would have blocked that payment.
    let mut draft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("events/policy-demo-agent.json")).unwrap(),
    )
    .unwrap();
    draft["perTransactionLimitUsd"] = "0.10".into();
    let draft_file = dir.path().join("draft.json");
    std::fs::write(&draft_file, draft.to_string()).unwrap();
    let backtest = agentpay(dir.path(), &["policy", "backtest", "demo-agent", "--file", draft_file.to_str().unwrap()]);
    assert!(backtest.status.success(), "{backtest:?}");
    let text = stdout(&backtest);
    assert!(text.contains("1 requests replayed (1 shadow decisions among them)"), "{text}");
    assert!(text.contains("the draft would have blocked 1 payments (0.50 USDC)"), "{text}");
    assert!(text.contains("WOULD_DENY (SpendLimitExceeded)"), "{text}");
    let json: serde_json::Value = serde_json::from_slice(
        &agentpay(dir.path(), &["--json", "policy", "backtest", "demo-agent", "--file", draft_file.to_str().unwrap()])
            .stdout,
    )
    .unwrap();
    assert_eq!(json["newlyDenied"]["requests"], 1, "{json}");

    let enforce = agentpay(dir.path(), &["policy", "mode", "demo-agent", "enforce", "--reason", "proven"]);
    assert!(enforce.status.success(), "{enforce:?}");
    let mut input: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("events/executions/paid-call.json"))
            .unwrap(),
    )
    .unwrap();
    input["idempotencyKey"] = "after-shadow-1".into();
    let file = dir.path().join("after-shadow.json");
    std::fs::write(&file, input.to_string()).unwrap();
    let paid = agentpay(dir.path(), &["start", file.to_str().unwrap(), "--wait"]);
    assert!(paid.status.success() && stdout(&paid).contains("next    retry the request with header"), "{paid:?}");
}
