//! Automatic trips of the kill switch, whole workflow, on a virtual clock: approvals rejected
//! in a row, deviation flags within an hour, and spend velocity each pause the agent by
//! themselves, with the reason in its policy history; only a person resumes it.

use std::sync::Arc;
use std::time::Duration;

use agentpay::approval::Decision;
use agentpay::approvals::{Approvals, LocalAnswers};
use agentpay::asl::RecordingSleeper;
use agentpay::clock::{Clock, ManualClock, Timestamp};
use agentpay::config::Config;
use agentpay::executions::{ExecutionRecord, ExecutionStatus, ExecutionStore};
use agentpay::local::LocalApp;
use agentpay::samples::execution_input;
use agentpay::store::{PolicyAction, PolicyChange, PolicyEdit};
use agentpay::trips::TRIPPED_BY;
use serde_json::{Value, json};

use crate::helpers::policy;

const AGENT: &str = "agent-trips";
const APPROVER: &str = "local:alice";

struct Fixture {
    app: LocalApp,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
    keys: std::sync::atomic::AtomicU32,
}

impl Fixture {
    /// Per transaction 100, daily 1000, 100 an hour, plus `extra` policy fields.
    async fn new(extra: Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_790_000_000_000)));
        let app = LocalApp::open(
            &Config::local(dir.path()),
            dir.path(),
            clock.clone(),
            Arc::new(RecordingSleeper::default()),
        )
        .await
        .unwrap();
        let mut fields = serde_json::to_value(policy("100.00", "1000.00", 100)).unwrap();
        fields.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        app.store.put_policy(AGENT, &serde_json::from_value(fields).unwrap()).await.unwrap();
        Self { app, clock, _dir: dir, keys: Default::default() }
    }

    async fn pay(&self, amount: &str) -> ExecutionRecord {
        let n = self.keys.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.app.run(execution_input(&format!("trip-{n}"), AGENT, amount)).await.unwrap()
    }

    fn approvals(&self) -> Approvals {
        Approvals::new(self.app.store.clone(), Arc::new(LocalAnswers(self.app.runner.clone())), self.clock.clone())
    }

    /// Pays `amount` (above the threshold), waits, and has a person decide.
    async fn decided(&self, amount: &str, decision: Decision) -> ExecutionRecord {
        let waiting = self.pay(amount).await;
        assert_eq!(waiting.status, ExecutionStatus::Running, "{waiting:?}");
        let pending = self.approvals().list().await.unwrap();
        let id = &pending.iter().find(|a| a.execution_id == waiting.execution_id).unwrap().id;
        self.approvals().decide(id, decision, APPROVER).await.unwrap();
        self.app.executions.execution(&waiting.execution_id).await.unwrap().unwrap()
    }

    async fn paused(&self) -> bool {
        self.app.store.policy(AGENT).await.unwrap().unwrap().paused
    }

    /// The reason of the last policy change, if a trip made it.
    async fn trip_reason(&self) -> Option<String> {
        let history = self.app.store.policy_history(AGENT).await.unwrap();
        let last = history.last().unwrap();
        (last.by == TRIPPED_BY && last.action == PolicyAction::Paused).then(|| last.reason.clone().unwrap())
    }

    async fn resume(&self) {
        let change = PolicyChange {
            edit: PolicyEdit::SetPaused(false),
            by: APPROVER.into(),
            reason: Some("reviewed".into()),
            at: self.clock.now(),
            expected_version: None,
        };
        self.app.store.change_policy(AGENT, &change).await.unwrap();
    }
}

fn reject() -> Decision {
    Decision::Reject { reason: "not needed".into() }
}

fn error(record: &ExecutionRecord) -> (String, String) {
    let error = record.error.as_ref().unwrap();
    (error.error.clone(), error.cause.clone())
}

#[tokio::test]
async fn rejections_in_a_row_pause_the_agent_and_an_approval_between_them_does_not() {
    let f = Fixture::new(json!({"approvalThresholdUsd": "0.50", "autoPause": {"consecutiveRejections": 2}})).await;
    f.decided("1000000", reject()).await;
    let approved = f.decided("1000000", Decision::Approve).await;
    assert_eq!(approved.status, ExecutionStatus::Succeeded);
    f.decided("1000000", reject()).await;
    assert!(!f.paused().await, "reject, approve, reject is not two in a row");

    // A time-out is a rejection nobody typed: the second in a row trips.
    let waiting = f.pay("1000000").await;
    f.clock.advance(Duration::from_secs(7200));
    assert_eq!(f.app.runner.expire_waits().await.unwrap(), 1);
    let timed_out = f.app.executions.execution(&waiting.execution_id).await.unwrap().unwrap();
    assert_eq!(error(&timed_out).0, "ApprovalTimedOut");
    assert!(f.paused().await);
    let reason = f.trip_reason().await.expect("the pause is the trip's, in the policy history");
    assert!(reason.starts_with("2 approval rejections or time-outs in a row"), "{reason}");
    let refused = f.pay("100000").await;
    assert_eq!(error(&refused).0, "AgentPaused", "a small payment too: the agent is stopped");

    // A person resumes it; the rejections already judged do not pause it again.
    f.resume().await;
    f.decided("1000000", reject()).await;
    assert!(!f.paused().await);
}

#[tokio::test]
async fn deviation_flags_within_an_hour_pause_the_agent() {
    let f = Fixture::new(json!({
        "deviation": {"minPayments": 2},
        "autoPause": {"deviationFlagsPerHour": 2}
    }))
    .await;
    for _ in 0..2 {
        assert_eq!(f.pay("1000000").await.status, ExecutionStatus::Succeeded);
    }
    let first = f.pay("9000000").await;
    assert_eq!(first.status, ExecutionStatus::Running, "flagged once: it waits for a person");
    let second = f.pay("9000000").await;
    let (name, cause) = error(&second);
    assert_eq!(name, "KillSwitchTripped");
    assert!(cause.contains("2 payments deviated from the agent's history within an hour"), "{cause}");
    assert!(cause.contains("agentpay policy resume agent-trips"), "{cause}");
    assert!(f.paused().await);
    // Nothing was reserved for the payment that tripped; the one waiting is still counted.
    assert_eq!(f.app.store.reservations(AGENT).await.unwrap().len(), 3);
    // Approving the waiting one now does not pay it: the pause is looked at before paying.
    let id = f.approvals().list().await.unwrap()[0].id.clone();
    f.approvals().decide(&id, Decision::Approve, APPROVER).await.unwrap();
    let stopped = f.app.executions.execution(&first.execution_id).await.unwrap().unwrap();
    assert_eq!(error(&stopped).0, "AgentPaused");
    // Flags while paused are not counted: they are denied as paused, and trip nothing again
    // (no new policy version, no second alarm).
    let versions = f.app.store.policy_history(AGENT).await.unwrap().len();
    for _ in 0..3 {
        assert_eq!(error(&f.pay("9000000").await).0, "AgentPaused");
    }
    assert_eq!(f.app.store.policy_history(AGENT).await.unwrap().len(), versions);
}

#[tokio::test]
async fn flags_an_hour_apart_do_not_trip() {
    let f = Fixture::new(json!({
        "deviation": {"minPayments": 2, "action": "deny"},
        "autoPause": {"deviationFlagsPerHour": 2}
    }))
    .await;
    for _ in 0..2 {
        f.pay("1000000").await;
    }
    assert_eq!(error(&f.pay("9000000").await).0, "DeviationDetected");
    f.clock.advance(Duration::from_secs(3601));
    assert_eq!(error(&f.pay("9000000").await).0, "DeviationDetected");
    assert!(!f.paused().await);
    assert_eq!(error(&f.pay("9000000").await).0, "KillSwitchTripped", "two within this hour");
}

#[test]
fn a_trip_is_counted_for_the_alarm_that_tells_the_operators() {
    let captured = crate::helpers::Captured::default();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    metrics::with_local_recorder(&captured, || {
        runtime.block_on(async {
            let f = Fixture::new(json!({"autoPause": {"spendPerHourUsd": "1.50"}})).await;
            f.pay("1000000").await;
            assert_eq!(error(&f.pay("1000000").await).0, "KillSwitchTripped");
            // Paused: later payments are denied, not tripped again.
            assert_eq!(error(&f.pay("1000000").await).0, "AgentPaused");
        })
    });
    // Once in total and once for the agent (the alarm reads the total).
    assert_eq!(captured.values("KillSwitchTrips"), [1.0, 1.0]);
}

#[tokio::test]
async fn spend_velocity_pauses_the_agent_before_the_payment_that_would_pass_it() {
    let f = Fixture::new(json!({"autoPause": {"spendPerHourUsd": "2.50"}})).await;
    for _ in 0..2 {
        assert_eq!(f.pay("1000000").await.status, ExecutionStatus::Succeeded);
    }
    let tripped = f.pay("600000").await;
    let (name, cause) = error(&tripped);
    assert_eq!(name, "KillSwitchTripped");
    assert!(cause.contains("last hour's spend to 2.60 USDC, above autoPause.spendPerHourUsd of 2.50 USD"), "{cause}");
    assert!(f.paused().await);
    assert!(f.trip_reason().await.is_some());
    assert_eq!(f.app.store.agent_ledger(AGENT).await.unwrap().window.spent.get(), 2_000_000, "not reserved");
    // Two hours on, the pace is back to normal, but the agent stays paused until a person says.
    f.clock.advance(Duration::from_secs(2 * 3600));
    assert_eq!(error(&f.pay("600000").await).0, "AgentPaused");
    f.resume().await;
    assert_eq!(f.pay("600000").await.status, ExecutionStatus::Succeeded);
}
