//! Deviation from the agent's own history, whole workflow, on a virtual clock: a payment far
//! above the agent's trailing average for the payee (or category) waits for a person, or is
//! denied; below the minimum history, or within the multiple, it pays as usual.

use std::sync::Arc;
use std::time::Duration;

use agentpay::asl::RecordingSleeper;
use agentpay::clock::{Clock, ManualClock, Timestamp};
use agentpay::config::Config;
use agentpay::executions::{ExecutionRecord, ExecutionStatus};
use agentpay::local::{LocalApp, OUTBOX_FILE, Outbox};
use agentpay::samples::{SAMPLE_PAYEE, execution_input};
use agentpay::store::{AuditKind, IdempotencyStatus};
use serde_json::{Value, json};

use crate::helpers::policy;

const AGENT: &str = "agent-habits";
const DAY: Duration = Duration::from_secs(24 * 3600);

struct Fixture {
    app: LocalApp,
    clock: Arc<ManualClock>,
    dir: tempfile::TempDir,
    keys: std::sync::atomic::AtomicU32,
}

impl Fixture {
    /// Limits far above the amounts used, so only the deviation check decides.
    async fn new(deviation: Value) -> Self {
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
        let mut agent_policy = policy("100.00", "1000.00", 100);
        agent_policy.deviation = Some(serde_json::from_value(deviation).unwrap());
        app.store.put_policy(AGENT, &agent_policy).await.unwrap();
        Self { app, clock, dir, keys: Default::default() }
    }

    async fn pay_input(&self, input: Value) -> ExecutionRecord {
        self.app.run(input).await.unwrap()
    }

    fn input(&self, amount: &str) -> Value {
        let n = self.keys.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        execution_input(&format!("habit-{n}"), AGENT, amount)
    }

    async fn pay(&self, amount: &str) -> ExecutionRecord {
        self.pay_input(self.input(amount)).await
    }

    /// `count` payments of `amount`, one a day, all paid.
    async fn habit(&self, count: u32, amount: &str) {
        for _ in 0..count {
            let paid = self.pay(amount).await;
            assert_eq!(paid.status, ExecutionStatus::Succeeded, "{paid:?}");
            self.clock.advance(DAY);
        }
    }
}

#[tokio::test]
async fn a_payment_within_the_multiple_pays_and_one_above_it_waits_with_the_figures() {
    let f = Fixture::new(json!({"multiplier": 3, "lookbackDays": 30, "minPayments": 5})).await;
    f.habit(5, "1000000").await;
    // Average 1.00: 3.00 is at the multiple, not above it.
    let at_limit = f.pay("3000000").await;
    assert_eq!(at_limit.status, ExecutionStatus::Succeeded, "{at_limit:?}");
    // Now 6 payments, 8.00 in all: the average is 1.333333, three times that 3.999999.
    let flagged = f.pay("5000000").await;
    assert_eq!(flagged.status, ExecutionStatus::Running, "it waits for a person: {flagged:?}");
    let pending = agentpay::approvals::Approvals::new(
        f.app.store.clone(),
        Arc::new(agentpay::approvals::LocalAnswers(f.app.runner.clone())),
        f.clock.clone(),
    )
    .list()
    .await
    .unwrap();
    assert_eq!(pending.len(), 1);
    let expected = format!(
        "deviation: 5.00 USDC is 3.7x the trailing 30-day average of 1.333333 USDC over 6 payments for payee#{SAMPLE_PAYEE} (the policy flags above 3x)"
    );
    assert_eq!(pending[0].reason, expected);
    // The money is reserved while a person decides, and the operators read the figures.
    // (The rolling 24 hours hold the last habit payment, the 3.00 and the 5.00.)
    assert_eq!(f.app.store.agent_ledger(AGENT).await.unwrap().window.spent.get(), 9_000_000);
    let notes = Outbox::read(&f.dir.path().join(OUTBOX_FILE));
    assert!(notes.last().unwrap().message.contains("3.7x the trailing 30-day average"), "{notes:?}");
}

#[tokio::test]
async fn below_the_minimum_history_nothing_is_flagged() {
    let f = Fixture::new(json!({"minPayments": 5})).await;
    f.habit(4, "1000000").await;
    let large = f.pay("90000000").await;
    assert_eq!(large.status, ExecutionStatus::Succeeded, "four payments say too little: {large:?}");
}

#[tokio::test]
async fn days_past_the_lookback_no_longer_count() {
    let f = Fixture::new(json!({"lookbackDays": 7, "minPayments": 3})).await;
    f.habit(3, "1000000").await;
    // Day 3 after the first payment: all three are inside the 7 days.
    let flagged = f.pay("9000000").await;
    assert_eq!(flagged.status, ExecutionStatus::Running, "{flagged:?}");
    // Five days on, the first two payments fall out: one payment is below the minimum.
    f.clock.advance(5 * DAY);
    let quiet = f.pay("9000000").await;
    assert_eq!(quiet.status, ExecutionStatus::Succeeded, "{quiet:?}");
}

#[tokio::test]
async fn a_deny_policy_denies_before_anything_is_reserved() {
    let f = Fixture::new(json!({"minPayments": 2, "action": "deny"})).await;
    f.habit(2, "1000000").await;
    let denied = f.pay("3500000").await;
    assert_eq!(denied.status, ExecutionStatus::Failed);
    let error = denied.error.unwrap();
    assert_eq!(error.error, "DeviationDetected");
    assert!(
        error.cause.contains("3.50 USDC is 3.5x the trailing 30-day average of 1.00 USDC over 2 payments"),
        "{}",
        error.cause
    );
    let key = denied.input["idempotencyKey"].as_str().unwrap().to_owned();
    let record = f.app.store.idempotency(&key, f.clock.now()).await.unwrap().unwrap();
    assert_eq!(record.status, IdempotencyStatus::Denied);
    assert_eq!(f.app.store.reservations(AGENT).await.unwrap().len(), 2, "only the two paid ones");
    let audit = f.app.store.audit_events(AGENT).await.unwrap();
    let last = audit.iter().find(|e| e.idempotency_key == key).unwrap();
    assert_eq!(
        (last.kind, last.error.as_ref().map(|e| e.error.as_str())),
        (AuditKind::Denied, Some("DeviationDetected"))
    );
    // A denied payment adds nothing to the history: the same amount is denied again.
    let again = f.pay("3500000").await;
    assert_eq!(again.error.unwrap().error, "DeviationDetected");
}

#[tokio::test]
async fn a_category_scope_compares_with_the_category_not_the_payee() {
    let f = Fixture::new(json!({"scope": "category", "minPayments": 3})).await;
    let in_category = |amount: &str, category: &str| {
        let mut input = f.input(amount);
        input["context"]["category"] = json!(category);
        input
    };
    for _ in 0..3 {
        let paid = f.pay_input(in_category("1000000", "office-supplies")).await;
        assert_eq!(paid.status, ExecutionStatus::Succeeded);
    }
    // Travel has no history yet (same payee): not flagged.
    let travel = f.pay_input(in_category("8000000", "travel")).await;
    assert_eq!(travel.status, ExecutionStatus::Succeeded, "{travel:?}");
    // Office supplies at 8x their average: flagged.
    let supplies = f.pay_input(in_category("8000000", "office-supplies")).await;
    assert_eq!(supplies.status, ExecutionStatus::Running, "{supplies:?}");
    // Without a category the payee's history (4 payments, 11.00) is the yardstick: within 3x.
    let plain = f.pay("8000000").await;
    assert_eq!(plain.status, ExecutionStatus::Succeeded, "{plain:?}");
}

#[tokio::test]
async fn a_bad_category_is_refused_naming_the_field() {
    let f = Fixture::new(json!({})).await;
    let mut input = f.input("1000000");
    input["context"]["category"] = json!("Travel & Leisure");
    let refused = f.pay_input(input).await;
    let error = refused.error.unwrap();
    assert_eq!(error.error, "InvalidPaymentRequest");
    assert!(error.cause.contains("context.category") && error.cause.contains("lowercase letters"), "{}", error.cause);
    assert!(f.app.store.reservations(AGENT).await.unwrap().is_empty());
}
