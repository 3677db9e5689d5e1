//! Each function's IAM policy in template.yaml against what its step really sends to
//! DynamoDB: the steps run on paths that reach every store call (happy path, retries,
//! compensation, an unknown outcome held, a denial, a lease takeover, a superseded retry) with
//! an SDK interceptor logging each action and table, and every action must be allowed on that
//! table for that step's function — a step that reads with an action its role lacks fails on
//! AWS with AccessDenied, which no local run shows otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use agentpay::clock::{Clock, ManualClock};
use agentpay::provider::dev_wallet::DevWallet;
use agentpay::samples::execution_input;
use agentpay::steps::{
    CaughtError, CheckIdempotencyInput, CheckSpendInput, Claim, CompensateInput, CompensationMode, ProcessPaymentInput,
    RecordLedgerInput, StepName, StepSettings, Steps,
};
use agentpay::store::Store;
use agentpay::store::dynamodb::request_log::RequestLog;
use serde_json::Value;

use crate::helpers::policy;
use crate::stores::{START, logged_store};

const AGENT: &str = "iam-agent";

type Used = BTreeMap<StepName, BTreeSet<(String, String)>>;

struct Run {
    steps: Steps,
    clock: Arc<ManualClock>,
    log: RequestLog,
    tables: BTreeMap<String, String>,
    used: Used,
}

impl Run {
    /// The steps on a logged DynamoDB store whose agent sends payments above 0.05 USD to a
    /// person, with the log cleared.
    async fn start() -> Self {
        let (store, log) = logged_store().await;
        let names = store.tables();
        let tables = BTreeMap::from([
            (names.idempotency.clone(), "IdempotencyTable".to_owned()),
            (names.ledger.clone(), "LedgerTable".to_owned()),
        ]);
        let mut approving = policy("1.00", "5.00", 100);
        approving.approval_threshold_usd = Some("0.05".parse().unwrap());
        // CheckSpend reads the payee's history; RecordLedger adds to it.
        approving.deviation = Some(serde_json::from_value(serde_json::json!({"scope": "category"})).unwrap());
        // Two rejections in a row trip from Compensate; the velocity trip from CheckSpend
        // (0.25 USD an hour).
        approving.auto_pause = Some(
            serde_json::from_value(serde_json::json!({"consecutiveRejections": 2, "spendPerHourUsd": "0.25"})).unwrap(),
        );
        store.put_policy(AGENT, &approving).await.unwrap();
        let clock = Arc::new(ManualClock::new(START));
        let wallet = DevWallet::from_hex_key(&DevWallet::generate_hex_key(), store.clone(), clock.clone()).unwrap();
        let steps = Steps::new(store, Arc::new(wallet), clock.clone(), StepSettings::default());
        log.clear();
        Self { steps, clock, log, tables, used: Used::new() }
    }

    /// Attributes what `log` holds to `step` (action, table's logical id).
    fn record(&mut self, step: StepName) {
        for request in self.log.requests() {
            for item in request.writes.iter().chain(&request.reads) {
                let table = self.tables.get(&item.table).cloned().unwrap_or_else(|| item.table.clone());
                self.used.entry(step).or_default().insert((format!("dynamodb:{}", item.action), table));
            }
        }
        self.log.clear();
    }

    async fn claim(&mut self, key: &str, amount: &str, execution: &str) -> (Value, Claim) {
        let request = execution_input(key, AGENT, amount);
        let claim = self
            .steps
            .check_idempotency(CheckIdempotencyInput { request: request.clone(), execution_id: execution.into() })
            .await
            .unwrap();
        self.record(StepName::CheckIdempotency);
        (request, claim)
    }

    async fn spend(&mut self, request: &Value, claim: &Claim, execution: &str) -> Result<Value, String> {
        let result = self
            .steps
            .check_spend(CheckSpendInput {
                request: request.clone(),
                execution_id: execution.into(),
                claim: claim.clone(),
            })
            .await;
        self.record(StepName::CheckSpend);
        result.map(|r| serde_json::to_value(r).unwrap()).map_err(|e| e.name().to_owned())
    }

    async fn compensate(&mut self, request: &Value, claim: &Claim, execution: &str, mode: CompensationMode) {
        let error = match mode {
            CompensationMode::HoldUnknown => "Sandbox.Timedout",
            _ => "ProviderRejected",
        };
        self.compensate_with(request, claim, execution, mode, error).await;
    }

    async fn compensate_for(&mut self, request: &Value, claim: &Claim, execution: &str, error: &str) {
        self.compensate_with(request, claim, execution, CompensationMode::Release, error).await;
    }

    async fn compensate_with(
        &mut self,
        request: &Value,
        claim: &Claim,
        execution: &str,
        mode: CompensationMode,
        error: &str,
    ) {
        self.steps
            .compensate(CompensateInput {
                request: request.clone(),
                execution_id: execution.into(),
                claim: claim.clone(),
                error: CaughtError { error: error.into(), cause: "{}".into() },
                mode,
                entered_at: Some(self.clock.now().to_rfc3339()),
            })
            .await
            .unwrap();
        self.record(StepName::Compensate);
    }
}

/// (action, table logical id) pairs each step function's statements allow.
fn allowed_by_template() -> BTreeMap<StepName, BTreeSet<(String, String)>> {
    StepName::ALL.iter().map(|step| (*step, allowed_for(step.function_name()))).collect()
}

/// (action, table logical id) pairs the statements of the function built from `binary` allow.
fn allowed_for(binary: &str) -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/template.yaml")).unwrap();
    let template: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let arn_of = |resource: &serde_yaml_ng::Value| match resource {
        serde_yaml_ng::Value::Tagged(tagged) if tagged.tag == "!GetAtt" => {
            tagged.value.as_str().unwrap_or_default().trim_end_matches(".Arn").to_owned()
        }
        other => format!("{other:?}"),
    };
    let function = template["Resources"]
        .as_mapping()
        .unwrap()
        .values()
        .find(|r| r["Metadata"]["BuildProperties"]["Binary"].as_str() == Some(binary))
        .unwrap_or_else(|| panic!("no function for {binary}"));
    let mut pairs = BTreeSet::new();
    for policy in function["Properties"]["Policies"].as_sequence().into_iter().flatten() {
        for statement in policy["Statement"].as_sequence().into_iter().flatten() {
            let actions: Vec<String> = match &statement["Action"] {
                serde_yaml_ng::Value::Sequence(list) => {
                    list.iter().filter_map(|a| a.as_str()).map(str::to_owned).collect()
                }
                other => other.as_str().map(str::to_owned).into_iter().collect(),
            };
            let resources: Vec<String> = match &statement["Resource"] {
                serde_yaml_ng::Value::Sequence(list) => list.iter().map(arn_of).collect(),
                single => vec![arn_of(single)],
            };
            for action in actions.iter().filter(|a| a.starts_with("dynamodb:")) {
                for resource in &resources {
                    pairs.insert((action.clone(), resource.clone()));
                }
            }
        }
    }
    pairs
}

#[tokio::test]
async fn every_function_may_send_exactly_what_its_step_sends_to_dynamodb() {
    let mut run = Run::start().await;
    let clock = run.clock.clone();

    // Happy path, then each step again as a retry would run it.
    let (request, claim) = run.claim("iam-paid", "10000", "exec-paid").await;
    let reservation = run.spend(&request, &claim, "exec-paid").await.unwrap();
    let reservation: agentpay::steps::ReservationSummary = serde_json::from_value(reservation).unwrap();
    let proof = run
        .steps
        .process_payment(ProcessPaymentInput {
            request: request.clone(),
            execution_id: "exec-paid".into(),
            claim: claim.clone(),
            reservation: reservation.clone(),
            retry_count: 0,
        })
        .await
        .unwrap();
    run.record(StepName::ProcessPayment);
    for _ in 0..2 {
        run.steps
            .record_ledger(RecordLedgerInput {
                request: request.clone(),
                execution_id: "exec-paid".into(),
                claim: claim.clone(),
                reservation: reservation.clone(),
                proof: proof.clone(),
            })
            .await
            .unwrap();
        run.record(StepName::RecordLedger);
    }
    run.claim("iam-paid", "10000", "exec-paid-again").await;
    run.spend(&request, &claim, "exec-paid").await.unwrap();

    // A definite refusal compensated twice, and a CheckSpend retried after it (superseded).
    let (request, claim) = run.claim("iam-refused", "10000", "exec-refused").await;
    run.spend(&request, &claim, "exec-refused").await.unwrap();
    run.compensate(&request, &claim, "exec-refused", CompensationMode::Release).await;
    run.compensate(&request, &claim, "exec-refused", CompensationMode::Release).await;
    assert!(run.spend(&request, &claim, "exec-refused").await.is_err());

    // An unknown outcome held; a denial; a lease taken over.
    let (request, claim) = run.claim("iam-unknown", "10000", "exec-unknown").await;
    run.spend(&request, &claim, "exec-unknown").await.unwrap();
    run.compensate(&request, &claim, "exec-unknown", CompensationMode::HoldUnknown).await;
    let (request, claim) = run.claim("iam-denied", "2000000", "exec-denied").await;
    assert_eq!(run.spend(&request, &claim, "exec-denied").await.unwrap_err(), "SpendLimitExceeded");
    run.claim("iam-taken", "10000", "exec-first").await;
    clock.advance(Duration::from_secs(3600));
    run.claim("iam-taken", "10000", "exec-second").await;

    // A payment above the threshold waits: requested, retried with the same and a new token,
    // decided, and a CheckSpend retried after the decision.
    let (request, claim) = run.claim("iam-approval", "100000", "exec-approval").await;
    let reservation = run.spend(&request, &claim, "exec-approval").await.unwrap();
    let reservation: agentpay::steps::ReservationSummary = serde_json::from_value(reservation).unwrap();
    for token in ["token-1", "token-1", "token-2"] {
        run.steps
            .request_approval(agentpay::steps::RequestApprovalInput {
                task_token: token.into(),
                request: request.clone(),
                execution_id: "exec-approval".into(),
                claim: claim.clone(),
                reservation: reservation.clone(),
            })
            .await
            .unwrap();
        run.record(StepName::RequestApproval);
    }
    let id = reservation.approval.id.clone().unwrap();
    let pending = run.steps.store().approval(&id).await.unwrap().unwrap();
    let decision =
        agentpay::approval::decide(&pending, &agentpay::approval::Decision::Approve, "local:alice", &[], clock.now())
            .unwrap();
    run.steps.store().decide_approval(&decision).await.unwrap();
    run.log.clear();
    run.spend(&request, &claim, "exec-approval").await.unwrap();
    let (approved_request, approved_claim) = (request, claim);
    let (request, claim) = run.claim("iam-rejected-1", "100000", "exec-rejected-1").await;
    run.spend(&request, &claim, "exec-rejected-1").await.unwrap();
    run.compensate_for(&request, &claim, "exec-rejected-1", "ApprovalRejected").await;
    let (request, claim) = (approved_request, approved_claim);
    // Approved and paid: RecordLedger forgets the rejection before it.
    let proof = run
        .steps
        .process_payment(ProcessPaymentInput {
            request: request.clone(),
            execution_id: "exec-approval".into(),
            claim: claim.clone(),
            reservation: reservation.clone(),
            retry_count: 0,
        })
        .await
        .unwrap();
    run.record(StepName::ProcessPayment);
    run.steps
        .record_ledger(RecordLedgerInput {
            request: request.clone(),
            execution_id: "exec-approval".into(),
            claim: claim.clone(),
            reservation,
            proof,
        })
        .await
        .unwrap();
    run.record(StepName::RecordLedger);

    // Automatic trips: two rejections in a row pause the agent (Compensate); resumed, a
    // payment that would pass the hourly pace pauses it again (CheckSpend).
    for n in [2, 3] {
        let (key, execution) = (format!("iam-rejected-{n}"), format!("exec-rejected-{n}"));
        let (request, claim) = run.claim(&key, "100000", &execution).await;
        run.spend(&request, &claim, &execution).await.unwrap();
        run.compensate_for(&request, &claim, &execution, "ApprovalRejected").await;
    }
    assert!(run.steps.store().policy(AGENT).await.unwrap().unwrap().paused, "tripped");
    run.steps.store().set_paused(AGENT, false).await.unwrap();
    run.log.clear();
    let (request, claim) = run.claim("iam-fast", "200000", "exec-fast").await;
    assert_eq!(run.spend(&request, &claim, "exec-fast").await.unwrap_err(), "KillSwitchTripped");

    // Shadow mode: CheckSpend records the decision, charges the shadow window, teaches the
    // history and completes the key, in one transaction; a retry reads the record back.
    let store = run.steps.store().clone();
    let mut shadow = store.policy(AGENT).await.unwrap().unwrap();
    shadow.mode = agentpay::policy::PolicyMode::Shadow;
    shadow.paused = false;
    store.put_policy(AGENT, &shadow).await.unwrap();
    store.set_paused(AGENT, false).await.unwrap();
    clock.advance(Duration::from_secs(3 * 3600));
    run.log.clear();
    let (request, claim) = run.claim("iam-shadow", "10000", "exec-shadow").await;
    let decided = run.spend(&request, &claim, "exec-shadow").await.unwrap();
    assert_eq!(decided["shadow"]["decision"]["verdict"], "WOULD_PAY", "{decided}");
    run.spend(&request, &claim, "exec-shadow").await.unwrap();

    let allowed = allowed_by_template();
    let mut problems = Vec::new();
    for (step, used) in &run.used {
        let allowed = &allowed[step];
        for pair in used.difference(allowed) {
            problems.push(format!("{step:?} sends {} on {} but its function may not", pair.0, pair.1));
        }
        for pair in allowed.difference(used) {
            problems.push(format!("{step:?}'s function may {} on {} but the step never does", pair.0, pair.1));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}\nused: {:#?}", run.used);
}

/// The decision never reaches a Lambda: an approver's CLI lists, reads and decides approvals in
/// the ledger with the ApproversRole's credentials. Its statements must allow exactly what the
/// approvals service sends (and, separately, the Step Functions answers).
#[tokio::test]
async fn the_approvers_role_may_send_exactly_what_deciding_sends() {
    use agentpay::approval::Decision;
    use agentpay::approvals::{Approvals, TaskAnswers, Undelivered};

    /// Delivery is Step Functions' business (SendTaskSuccess / SendTaskFailure), not DynamoDB's.
    struct Delivered;
    #[async_trait::async_trait]
    impl TaskAnswers for Delivered {
        async fn succeed(&self, _: &str, _: &Value) -> Result<(), Undelivered> {
            Ok(())
        }
        async fn fail(&self, _: &str, _: &str, _: &str) -> Result<(), Undelivered> {
            Ok(())
        }
    }

    let mut run = Run::start().await;
    let (store, clock, log) = (run.steps.store().clone(), run.clock.clone(), run.log.clone());
    for (key, execution) in [("iam-approve", "exec-a"), ("iam-reject", "exec-r")] {
        let (request, claim) = run.claim(key, "100000", execution).await;
        let reservation: agentpay::steps::ReservationSummary =
            serde_json::from_value(run.spend(&request, &claim, execution).await.unwrap()).unwrap();
        run.steps
            .request_approval(agentpay::steps::RequestApprovalInput {
                task_token: format!("token-{key}"),
                request,
                execution_id: execution.into(),
                claim,
                reservation,
            })
            .await
            .unwrap();
    }
    log.clear();

    let approvals = Approvals::new(store.clone(), Arc::new(Delivered), clock.clone());
    let listed = approvals.list().await.unwrap();
    assert_eq!(listed.len(), 2);
    approvals.show(&listed[0].id).await.unwrap();
    approvals
        .decide(&listed[0].id, Decision::Approve, "arn:aws:sts::123456789012:assumed-role/approver/a")
        .await
        .unwrap();
    approvals
        .decide(
            &listed[1].id,
            Decision::Reject { reason: "no".into() },
            "arn:aws:sts::123456789012:assumed-role/approver/a",
        )
        .await
        .unwrap();
    let mut used = BTreeSet::new();
    for request in log.requests() {
        for item in request.writes.iter().chain(&request.reads) {
            used.insert((format!("dynamodb:{}", item.action), run.tables[&item.table].clone()));
        }
    }

    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/template.yaml")).unwrap();
    let template: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut allowed = BTreeSet::new();
    for policy in template["Resources"]["ApproversRole"]["Properties"]["Policies"].as_sequence().unwrap() {
        for statement in policy["PolicyDocument"]["Statement"].as_sequence().unwrap() {
            let serde_yaml_ng::Value::Tagged(resource) = &statement["Resource"] else { continue };
            let table = resource.value.as_str().unwrap().trim_end_matches(".Arn").to_owned();
            for action in statement["Action"].as_sequence().unwrap() {
                allowed.insert((action.as_str().unwrap().to_owned(), table.clone()));
            }
        }
    }
    assert_eq!(used, allowed, "what deciding sends vs what the ApproversRole allows");
}

/// The settlement function (a refused caller, a report by an operator) and the reconciliation
/// sweep (a release, a chain verdict that voids, the listing of agents) on the logged store:
/// each function's statements allow exactly what it sends.
#[tokio::test]
async fn the_settlement_and_reconcile_functions_may_send_exactly_what_they_send() {
    use agentpay::reconcile::{ExecutionFate, ExecutionLookup, Reconciler};
    use agentpay::settlements::{ChainReader, Settlements};
    use agentpay_lambda::reconcile::{ReconcileFunction, ReconcileRequest};
    use agentpay_lambda::settlement_url::SettlementUrl;
    use base64::Engine;

    /// Every execution ended before ProcessPayment (the release path); Step Functions'
    /// rights are the template test's business.
    struct Ended;
    #[async_trait::async_trait]
    impl ExecutionLookup for Ended {
        async fn fate(&self, _: &str) -> Result<ExecutionFate, agentpay::error::PaymentError> {
            Ok(ExecutionFate::Ended { status: "FAILED".into(), entered_process_payment: false })
        }
        async fn ask_again(&self, _: &str) -> Result<String, agentpay::error::PaymentError> {
            unreachable!("nothing is unknown here")
        }
    }
    /// The chain says no authorization was used (the void path, which refunds the window).
    struct Unused;
    #[async_trait::async_trait]
    impl ChainReader for Unused {
        async fn authorization_used(
            &self,
            _: agentpay::payment::Network,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<Option<bool>, agentpay::error::PaymentError> {
            Ok(Some(false))
        }
    }

    let mut run = Run::start().await;
    let clock = run.clock.clone();
    let mut payers = Vec::new();
    for key in ["iam-settled", "iam-expired"] {
        let (request, claim) = run.claim(key, "10000", key).await;
        let reservation = run.spend(&request, &claim, key).await.unwrap();
        let reservation: agentpay::steps::ReservationSummary = serde_json::from_value(reservation).unwrap();
        let input = ProcessPaymentInput {
            request: request.clone(),
            execution_id: key.into(),
            claim: claim.clone(),
            reservation: reservation.clone(),
            retry_count: 0,
        };
        let proof = run.steps.process_payment(input).await.unwrap();
        let record = RecordLedgerInput { request, execution_id: key.into(), claim, reservation, proof };
        run.steps.record_ledger(record).await.unwrap();
        payers.push(run.steps.store().reservations(AGENT).await.unwrap()[0].payer.clone().unwrap());
    }
    let (request, claim) = run.claim("iam-died", "10000", "exec-died").await;
    run.spend(&request, &claim, "exec-died").await.unwrap();
    run.log.clear();

    let store = run.steps.store().clone();
    let operator = "arn:aws:iam::123456789012:role/operator";
    let settlements = Settlements::new(store.clone(), clock.clone());
    let url = SettlementUrl::new(store.clone(), settlements, vec![operator.to_owned()]);
    let answer = serde_json::json!({"success": true, "transaction": format!("0x{}", "12".repeat(32)), "network": "eip155:84532", "payer": payers[0]});
    let body = serde_json::json!({
        "agentId": AGENT,
        "idempotencyKey": "iam-settled",
        "paymentResponse": base64::engine::general_purpose::STANDARD.encode(answer.to_string()),
    });
    let event = |caller: &str| {
        serde_json::json!({
            "requestContext": {"http": {"method": "POST"}, "authorizer": {"iam": {"userArn": caller}}},
            "body": body.to_string(),
        })
    };
    let stranger = url.handle(&event("arn:aws:sts::123456789012:assumed-role/stranger/s")).await;
    assert_eq!(stranger.status, 403, "{:?}", stranger.body);
    let reported = url.handle(&event("arn:aws:sts::123456789012:assumed-role/operator/s")).await;
    assert_eq!(reported.status, 200, "{:?}", reported.body);
    // A report days later, when the key's record is gone: found among the agent's payments.
    clock.advance(Duration::from_secs(25 * 3600));
    let failed = serde_json::json!({"success": false, "errorReason": "insufficient_funds", "network": "eip155:84532"});
    let late = serde_json::json!({
        "agentId": AGENT,
        "idempotencyKey": "iam-expired",
        "paymentResponse": base64::engine::general_purpose::STANDARD.encode(failed.to_string()),
    });
    let mut late_event = event("arn:aws:sts::123456789012:assumed-role/operator/s");
    late_event["body"] = serde_json::json!(late.to_string());
    let reported = url.handle(&late_event).await;
    assert_eq!(reported.body["status"], "SETTLEMENT_FAILED", "{:?}", reported.body);
    let used = logged(&run.log, &run.tables);
    assert_eq!(used, allowed_for("report-settlement"), "the report function's rights");

    clock.advance(Duration::from_secs(2 * 24 * 3600));
    let function = ReconcileFunction {
        store: store.clone(),
        agents_per_sweep: agentpay_lambda::reconcile::MAX_AGENTS_PER_SWEEP,
        reconciler: Reconciler::new(store.clone(), clock.clone(), Duration::from_secs(24 * 3600)),
        chain: Box::new(Unused),
        executions: Box::new(Ended),
    };
    let swept = function.sweep(&ReconcileRequest::default()).await.unwrap();
    let changes = swept["agents"][0]["changes"].as_array().unwrap();
    let moves: BTreeSet<(&str, &str)> =
        changes.iter().map(|c| (c["before"].as_str().unwrap(), c["after"].as_str().unwrap())).collect();
    assert_eq!(moves, BTreeSet::from([("SETTLEMENT_FAILED", "VOIDED"), ("RESERVED", "RELEASED")]), "{swept}");
    let used = logged(&run.log, &run.tables);
    assert_eq!(used, allowed_for("reconcile"), "the reconcile function's rights");
}

/// What `log` holds as (action, table's logical id), cleared.
fn logged(log: &RequestLog, tables: &BTreeMap<String, String>) -> BTreeSet<(String, String)> {
    let mut used = BTreeSet::new();
    for request in log.requests() {
        for item in request.writes.iter().chain(&request.reads) {
            used.insert((format!("dynamodb:{}", item.action), tables[&item.table].clone()));
        }
    }
    log.clear();
    used
}
