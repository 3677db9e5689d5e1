//! Human approval, whole workflow, on a virtual clock: a payment above the agent's threshold
//! waits (reserved) for a person; approve pays it, reject and the 2-hour time-out compensate it.

use std::sync::Arc;
use std::time::Duration;

use agentpay::approval::{ApprovalError, Decision};
use agentpay::approvals::{Approvals, LocalAnswers};
use agentpay::asl::RecordingSleeper;
use agentpay::clock::{Clock, ManualClock, Timestamp};
use agentpay::config::Config;
use agentpay::executions::{ExecutionRecord, ExecutionStatus, ExecutionStore, HistoryKind};
use agentpay::local::{LocalApp, OUTBOX_FILE, Outbox};
use agentpay::samples::execution_input;
use agentpay::store::{ApprovalStatus, AuditKind, IdempotencyStatus, ReservationStatus};

use crate::helpers::policy;

const AGENT: &str = "agent-approvals";
const APPROVER: &str = "local:alice";

struct Fixture {
    app: LocalApp,
    clock: Arc<ManualClock>,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// Threshold 0.50 USD, per transaction 5, daily 2.50.
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_790_000_000_000)));
        let app = open(dir.path(), clock.clone()).await;
        let mut agent_policy = policy("5.00", "2.50", 100);
        agent_policy.approval_threshold_usd = Some("0.50".parse().unwrap());
        app.store.put_policy(AGENT, &agent_policy).await.unwrap();
        Self { app, clock, dir }
    }

    fn approvals(&self) -> Approvals {
        Approvals::new(self.app.store.clone(), Arc::new(LocalAnswers(self.app.runner.clone())), self.clock.clone())
    }

    async fn pay(&self, key: &str, amount: &str) -> ExecutionRecord {
        self.app.run(execution_input(key, AGENT, amount)).await.unwrap()
    }

    async fn current(&self, record: &ExecutionRecord) -> ExecutionRecord {
        self.app.executions.execution(&record.execution_id).await.unwrap().unwrap()
    }

    async fn only_approval_id(&self) -> String {
        let list = self.approvals().list().await.unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        list[0].id.clone()
    }
}

async fn open(dir: &std::path::Path, clock: Arc<ManualClock>) -> LocalApp {
    LocalApp::open(&Config::local(dir), dir, clock, Arc::new(RecordingSleeper::default())).await.unwrap()
}

fn kinds(events: &[agentpay::store::AuditEvent]) -> Vec<AuditKind> {
    events.iter().map(|e| e.kind).collect()
}

#[tokio::test]
async fn a_payment_above_the_threshold_waits_reserved_and_pays_once_approved() {
    let f = Fixture::new().await;
    let waiting = f.pay("big-1", "1000000").await;
    assert_eq!(waiting.status, ExecutionStatus::Running, "{waiting:?}");
    let history = f.app.executions.history(&waiting.execution_id).await.unwrap();
    assert_eq!(history.last().unwrap().kind, HistoryKind::TaskSubmitted);
    // The money is counted while a person decides.
    assert_eq!(f.app.store.agent_ledger(AGENT).await.unwrap().window.spent.get(), 1_000_000);

    let list = f.approvals().list().await.unwrap();
    assert_eq!(list.len(), 1);
    let pending = &list[0];
    assert_eq!((pending.status, pending.amount.get()), (ApprovalStatus::Pending, 1_000_000));
    assert_eq!(pending.task_token, "(redacted)", "listings never show the token");
    assert!(pending.reason.contains("above the agent's approval threshold of 0.50 USD"), "{}", pending.reason);
    assert_eq!(pending.expires_at.millis() - pending.requested_at.millis(), 7_200_000, "two hours by default");

    // Operators were told, with the commands to answer.
    let notes = Outbox::read(&f.dir.path().join(OUTBOX_FILE));
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].message.contains(&format!("agentpay approve {}", pending.id)), "{}", notes[0].message);
    assert!(notes[0].subject.as_deref().unwrap().contains("1.00 USDC"), "{:?}", notes[0].subject);

    f.clock.advance(Duration::from_secs(600));
    let decided = f.approvals().decide(&pending.id, Decision::Approve, APPROVER).await.unwrap();
    assert_eq!((decided.status, decided.decided_by.as_deref()), (ApprovalStatus::Approved, Some(APPROVER)));
    let done = f.current(&waiting).await;
    assert_eq!(done.status, ExecutionStatus::Succeeded, "{done:?}");
    assert_eq!(done.output.as_ref().unwrap()["status"], "AUTHORIZED");
    let audit = f.app.store.audit_events(AGENT).await.unwrap();
    // The decision and the authorization share a millisecond on this clock: compare as a set.
    let mut seen = kinds(&audit);
    seen.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(seen, [AuditKind::ApprovalGranted, AuditKind::ApprovalRequested, AuditKind::Authorized]);
    let granted = audit.iter().find(|e| e.kind == AuditKind::ApprovalGranted).unwrap();
    assert_eq!(granted.decided_by.as_deref(), Some(APPROVER));

    // Approving again: the execution no longer waits, nothing is paid twice.
    let again = f.approvals().decide(&pending.id, Decision::Approve, APPROVER).await.unwrap_err();
    assert!(matches!(again, ApprovalError::NotWaiting { .. }), "{again}");
    let other = f.approvals().decide(&pending.id, Decision::Reject { reason: "late".into() }, "local:bob").await;
    assert!(matches!(other, Err(ApprovalError::AlreadyDecided { .. })), "{other:?}");
    assert_eq!(f.app.store.reservations(AGENT).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_rejection_releases_the_reservation_and_denies_the_key_with_who_and_why() {
    let f = Fixture::new().await;
    let waiting = f.pay("big-2", "2000000").await;
    let id = f.only_approval_id().await;
    f.clock.advance(Duration::from_secs(60));
    let blank = f.approvals().decide(&id, Decision::Reject { reason: "  ".into() }, APPROVER).await;
    assert!(matches!(blank, Err(ApprovalError::BadReason { .. })), "a rejection says why: {blank:?}");

    f.approvals()
        .decide(&id, Decision::Reject { reason: "not in this quarter's budget".into() }, APPROVER)
        .await
        .unwrap();
    let done = f.current(&waiting).await;
    assert_eq!(done.status, ExecutionStatus::Failed);
    let error = done.error.unwrap();
    assert_eq!(error.error, "ApprovalRejected");
    assert!(error.cause.contains(APPROVER) && error.cause.contains("not in this quarter's budget"), "{}", error.cause);
    let reservation = &f.app.store.reservations(AGENT).await.unwrap()[0];
    assert_eq!(reservation.status, ReservationStatus::Released);
    assert_eq!(f.app.store.agent_ledger(AGENT).await.unwrap().window.spent.get(), 0, "refunded");
    let key = f.app.store.idempotency("big-2", f.clock.now()).await.unwrap().unwrap();
    assert_eq!(key.status, IdempotencyStatus::Denied);
    let audit = f.app.store.audit_events(AGENT).await.unwrap();
    let mut seen = kinds(&audit);
    seen.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(seen, [AuditKind::ApprovalRejected, AuditKind::ApprovalRequested, AuditKind::Released]);
    let rejected = audit.iter().find(|e| e.kind == AuditKind::ApprovalRejected).unwrap();
    assert_eq!(rejected.reason.as_deref(), Some("not in this quarter's budget"));
    assert_eq!(rejected.decided_by.as_deref(), Some(APPROVER));
}

#[tokio::test]
async fn no_answer_within_two_hours_compensates_as_timed_out_and_a_late_answer_is_refused() {
    let f = Fixture::new().await;
    let waiting = f.pay("big-3", "1500000").await;
    let id = f.only_approval_id().await;
    f.clock.advance(Duration::from_secs(7199));
    assert_eq!(f.app.runner.expire_waits().await.unwrap(), 0, "not yet");
    assert_eq!(f.current(&waiting).await.status, ExecutionStatus::Running);
    f.clock.advance(Duration::from_secs(1));
    assert_eq!(f.app.runner.expire_waits().await.unwrap(), 1);
    let done = f.current(&waiting).await;
    assert_eq!(done.error.as_ref().map(|e| e.error.as_str()), Some("ApprovalTimedOut"), "{done:?}");
    assert_eq!(f.app.store.reservations(AGENT).await.unwrap()[0].status, ReservationStatus::Released);
    let key = f.app.store.idempotency("big-3", f.clock.now()).await.unwrap().unwrap();
    assert_eq!(key.status, IdempotencyStatus::Denied);
    let late = f.approvals().decide(&id, Decision::Approve, APPROVER).await.unwrap_err();
    assert!(matches!(late, ApprovalError::TimedOut { .. }), "{late}");
    assert!(late.to_string().contains("ApprovalTimedOut"), "{late}");
}

#[tokio::test]
async fn an_approval_reaches_its_execution_after_a_restart() {
    let f = Fixture::new().await;
    let waiting = f.pay("big-4", "1000000").await;
    let id = f.only_approval_id().await;
    // A new process on the same data directory (the runner that started it is gone).
    let restarted = open(f.dir.path(), f.clock.clone()).await;
    let refused = restarted.runner.resume(&waiting.execution_id).await.unwrap_err();
    assert!(refused.to_string().contains("waiting"), "a waiting execution is not resumed by hand: {refused}");
    let approvals =
        Approvals::new(restarted.store.clone(), Arc::new(LocalAnswers(restarted.runner.clone())), f.clock.clone());
    approvals.decide(&id, Decision::Approve, APPROVER).await.unwrap();
    let done = restarted.executions.execution(&waiting.execution_id).await.unwrap().unwrap();
    assert_eq!(done.status, ExecutionStatus::Succeeded, "{done:?}");
}

#[tokio::test]
async fn an_agent_never_approves_its_own_payment() {
    let f = Fixture::new().await;
    let role = "arn:aws:iam::123456789012:role/agent-role";
    let mut bound = f.app.store.policy(AGENT).await.unwrap().unwrap();
    bound.principals = vec![role.into()];
    f.app.store.put_policy(AGENT, &bound).await.unwrap();
    let mut input = execution_input("big-5", AGENT, "1000000");
    input["caller"] = serde_json::json!({"arn": "arn:aws:sts::123456789012:assumed-role/agent-role/s1"});
    let waiting = f.app.run(input).await.unwrap();
    let id = f.only_approval_id().await;
    let own =
        f.approvals().decide(&id, Decision::Approve, "arn:aws:sts::123456789012:assumed-role/agent-role/s1").await;
    assert!(matches!(own, Err(ApprovalError::OwnPayment { .. })), "{own:?}");
    assert_eq!(f.current(&waiting).await.status, ExecutionStatus::Running, "still waiting for a person");
}

#[tokio::test]
async fn waiting_payments_count_against_the_cap_so_approvals_never_oversubscribe_it() {
    let f = Fixture::new().await;
    // Daily cap 2.50: two payments of 1.00 wait, reserved; a third is denied before it waits.
    let first = f.pay("cap-1", "1000000").await;
    let second = f.pay("cap-2", "1000000").await;
    let third = f.pay("cap-3", "1000000").await;
    assert_eq!(third.status, ExecutionStatus::Failed);
    assert_eq!(third.error.unwrap().error, "SpendLimitExceeded");
    let approvals = f.approvals();
    let pending = approvals.list().await.unwrap();
    assert_eq!(pending.len(), 2);
    let (a, b) = tokio::join!(
        approvals.decide(&pending[0].id, Decision::Approve, APPROVER),
        approvals.decide(&pending[1].id, Decision::Approve, APPROVER)
    );
    a.unwrap();
    b.unwrap();
    for record in [first, second] {
        assert_eq!(f.current(&record).await.status, ExecutionStatus::Succeeded);
    }
    assert_eq!(f.app.store.agent_ledger(AGENT).await.unwrap().window.spent.get(), 2_000_000);
}

#[tokio::test]
async fn below_the_threshold_nothing_waits_and_the_happy_path_gains_one_choice() {
    let f = Fixture::new().await;
    let record = f.pay("small-1", "500000").await;
    assert_eq!(record.status, ExecutionStatus::Succeeded);
    assert!(f.approvals().list().await.unwrap().is_empty());
    let entered: Vec<String> = f
        .app
        .executions
        .history(&record.execution_id)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == HistoryKind::StateEntered)
        .filter_map(|e| e.state)
        .collect();
    assert_eq!(
        entered,
        [
            "CheckIdempotency",
            "IdempotencyOutcome",
            "CheckSpend",
            "ApprovalNeeded",
            "ProcessPayment",
            "RecordLedger",
            "PaymentSucceeded"
        ],
        "7 state transitions per happy-path payment (the budget is 8)"
    );
}

#[tokio::test]
async fn the_agent_hears_that_its_payment_waits_for_a_person() {
    let f = Fixture::new().await;
    let client = f.app.client();
    let wait = agentpay::client::WaitOptions { timeout: Duration::from_secs(30), ..Default::default() };
    let started = client.start(&execution_input("big-6", AGENT, "1000000"), Some(wait)).await.unwrap();
    let id = f.only_approval_id().await;
    assert_eq!(started.answer, agentpay::client::PaymentAnswer::AwaitingApproval { approval_id: id.clone() });
    f.approvals().decide(&id, Decision::Approve, APPROVER).await.unwrap();
    let paid = client.status(&started.execution.execution_arn).await.unwrap();
    assert!(matches!(paid.answer(), agentpay::client::PaymentAnswer::Paid { .. }), "{:?}", paid.answer());
}

#[test]
fn each_decision_is_counted_with_how_long_the_payment_waited() {
    let captured = crate::helpers::Captured::default();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    metrics::with_local_recorder(&captured, || {
        runtime.block_on(async {
            let f = Fixture::new().await;
            f.pay("wait-1", "1000000").await;
            let id = f.only_approval_id().await;
            f.clock.advance(Duration::from_secs(600));
            f.approvals().decide(&id, Decision::Approve, APPROVER).await.unwrap();

            f.pay("wait-2", "1000000").await;
            let id =
                f.approvals().list().await.unwrap().into_iter().find(|a| a.idempotency_key == "wait-2").unwrap().id;
            f.clock.advance(Duration::from_secs(60));
            f.approvals().decide(&id, Decision::Reject { reason: "no".into() }, APPROVER).await.unwrap();

            f.pay("wait-3", "1000000").await;
            f.clock.advance(Duration::from_secs(7200));
            assert_eq!(f.app.runner.expire_waits().await.unwrap(), 1);
        })
    });
    assert_eq!(captured.decisions("ApprovalsDecided", "Approved"), [1.0]);
    assert_eq!(captured.decisions("ApprovalWaitSeconds", "Approved"), [600.0]);
    assert_eq!(captured.decisions("ApprovalWaitSeconds", "Rejected"), [60.0]);
    assert_eq!(captured.decisions("ApprovalWaitSeconds", "TimedOut"), [7200.0]);
}

/// A payment whose execution stopped while waiting (as StopExecution does on AWS) is released
/// by reconciliation; its approval then waits for nobody: deciding it is refused, and no
/// decision is recorded or audited for a payment that can no longer happen.
#[tokio::test]
async fn an_approval_whose_execution_stopped_is_refused_and_nothing_is_recorded() {
    use agentpay::client::PaymentClient;
    use agentpay::client::local::LocalBackend;
    use agentpay::client::reconcile::ClientExecutions;
    use agentpay::reconcile::Reconciler;
    use agentpay::settlements::NoChain;

    let f = Fixture::new().await;
    let waiting = f.pay("k-stopped", "1000000").await;
    assert_eq!(waiting.status, ExecutionStatus::Running, "{waiting:?}");
    let id = f.only_approval_id().await;
    // Deciding works while the payment is reserved: it is the stop that changes it.
    let mut stopped = f.current(&waiting).await;
    stopped.status = ExecutionStatus::Failed;
    stopped.owner = None;
    f.app.executions.update_execution(&stopped).await.unwrap();
    let client = PaymentClient::new(Box::new(LocalBackend::new(f.app.runner.clone(), f.app.executions.clone())));
    let reconciler = Reconciler::new(f.app.store.clone(), f.clock.clone(), Duration::from_secs(24 * 3600));
    reconciler.agent(AGENT, &NoChain, &ClientExecutions::new(&client), false).await.unwrap();
    let reservations = f.app.store.reservations(AGENT).await.unwrap();
    assert_eq!(reservations[0].status, ReservationStatus::Released, "{reservations:?}");

    let refused = f.approvals().decide(&id, Decision::Approve, APPROVER).await.unwrap_err();
    assert!(matches!(refused, ApprovalError::PaymentEnded { status: "RELEASED", .. }), "{refused}");
    assert!(refused.to_string().contains("waits for nobody"), "{refused}");
    assert_eq!(f.app.store.approval(&id).await.unwrap().unwrap().status, ApprovalStatus::Pending);
    let audit = f.app.store.audit_events(AGENT).await.unwrap();
    assert!(!audit.iter().any(|e| e.kind == AuditKind::ApprovalGranted), "{audit:?}");
}
