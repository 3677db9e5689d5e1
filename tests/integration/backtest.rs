//! Policy backtest over histories made by the real workflow on a virtual clock: the policy in
//! force replayed over its own history changes nothing (enforced and shadow alike), and a
//! stricter draft reports exactly the payments it would have denied.

use std::sync::Arc;
use std::time::Duration;

use agentpay::asl::RecordingSleeper;
use agentpay::backtest::{BacktestReport, backtest, recorded_requests, recorded_requests_up_to};
use agentpay::clock::{ManualClock, Timestamp};
use agentpay::config::Config;
use agentpay::executions::ExecutionStatus;
use agentpay::local::LocalApp;
use agentpay::policy::{PolicyMode, SpendPolicy};
use agentpay::samples::execution_input;
use agentpay::shadow::ShadowVerdict;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::helpers::policy;

struct History {
    app: LocalApp,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

impl History {
    async fn new() -> Self {
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
        Self { app, clock, _dir: dir }
    }

    /// `count` seeded random requests of `agent` under `rules`, minutes apart; payments that
    /// wait for a person are left waiting. The amounts, in order.
    async fn make(&self, agent: &str, rules: &SpendPolicy, seed: u64, count: u32) -> Vec<u64> {
        self.app.store.put_policy(agent, rules).await.unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut amounts = Vec::new();
        for n in 0..count {
            let amount: u64 = match rng.random_range(0..10) {
                0 => rng.random_range(800_001..=1_200_000),
                1 => rng.random_range(300_000..=800_000),
                _ => rng.random_range(10_000..=200_000),
            };
            let record =
                self.app.run(execution_input(&format!("{agent}-{n}"), agent, &amount.to_string())).await.unwrap();
            let denied = record.error.as_ref().is_some_and(|e| agentpay::error::is_denial_name(&e.error));
            assert!(record.status != ExecutionStatus::Failed || denied, "only denials fail: {:?}", record.error);
            amounts.push(amount);
            self.clock.advance(Duration::from_secs(rng.random_range(30..1800)));
        }
        amounts
    }

    async fn backtest(&self, agent: &str, draft: &SpendPolicy) -> BacktestReport {
        let recorded = recorded_requests(self.app.store.as_ref(), agent, Timestamp::from_millis(0)).await.unwrap();
        assert_eq!((recorded.not_replayable, recorded.older_left_out), (0, 0));
        backtest(agent, draft, &recorded.requests).unwrap()
    }
}

fn rules() -> SpendPolicy {
    let mut rules = policy("1.00", "8.00", 8);
    rules.approval_threshold_usd = Some("0.80".parse().unwrap());
    rules.deviation =
        Some(serde_json::from_value(json!({"multiplier": "2.5", "lookbackDays": 2, "minPayments": 3})).unwrap());
    rules
}

#[tokio::test]
async fn the_policy_in_force_replayed_over_its_own_history_changes_nothing() {
    let seed: u64 = rand::random();
    let h = History::new().await;
    let enforcing = rules();
    let mut shadowing = rules();
    shadowing.mode = PolicyMode::Shadow;
    h.make("bt-enforced", &enforcing, seed, 120).await;
    h.make("bt-shadowed", &shadowing, seed, 120).await;
    for (agent, draft) in [("bt-enforced", &enforcing), ("bt-shadowed", &shadowing)] {
        let report = h.backtest(agent, draft).await;
        assert_eq!(report.recorded.requests, 120, "{agent}: every request is replayed (seed {seed})");
        assert!(
            report.changes.is_empty(),
            "{agent} (seed {seed}): {:#?}",
            &report.changes[..report.changes.len().min(3)]
        );
        assert_eq!(report.recorded, report.draft, "{agent}");
        assert!(
            report.draft.denied > 0 && report.draft.approvals > 0 && report.draft.allowed > report.draft.approvals,
            "{agent}: the history covers every verdict (seed {seed}): {:?}",
            report.draft
        );
    }
    let shadow = h.backtest("bt-shadowed", &shadowing).await;
    assert_eq!(shadow.shadow_requests, 120);
}

#[tokio::test]
async fn a_stricter_draft_reports_exactly_the_payments_it_would_have_denied() {
    let seed: u64 = rand::random();
    let h = History::new().await;
    // Limits that never bind but the one the draft tightens.
    let loose = policy("2.00", "1000.00", 1000);
    let amounts = h.make("bt-loose", &loose, seed, 80).await;
    let mut draft = loose.clone();
    draft.per_transaction_limit_usd = "0.50".parse().unwrap();
    let report = h.backtest("bt-loose", &draft).await;
    let over: Vec<u64> = amounts.iter().copied().filter(|a| *a > 500_000).collect();
    let blocked: Vec<u64> = report.changes.iter().map(|c| c.request.amount.get()).collect();
    assert_eq!(blocked, over, "exactly the payments above the new cap (seed {seed})");
    assert!(report.changes.iter().all(|c| c.request.recorded == ShadowVerdict::WouldPay
        && c.draft.verdict == ShadowVerdict::WouldDeny
        && c.draft.error.as_deref() == Some("SpendLimitExceeded")));
    assert_eq!(report.newly_denied.requests, over.len() as u64);
    assert_eq!(report.newly_denied.allowed_atomic, over.iter().map(|a| u128::from(*a)).sum::<u128>());
    assert_eq!(report.newly_allowed.requests, 0);
    assert!(!over.is_empty(), "the seed's history has payments above 0.50 (seed {seed})");
}

/// Past the limit a backtest replays, the newest requests are kept and the older ones left out
/// are counted, never dropped unsaid.
#[tokio::test]
async fn past_the_limit_the_newest_requests_are_replayed_and_the_rest_counted() {
    let seed: u64 = rand::random();
    let h = History::new().await;
    h.make("bt-many", &policy("2.00", "1000.00", 1000), seed, 30).await;
    let since = Timestamp::from_millis(0);
    let all = recorded_requests(h.app.store.as_ref(), "bt-many", since).await.unwrap();
    let newest = recorded_requests_up_to(h.app.store.as_ref(), "bt-many", since, 20).await.unwrap();
    assert_eq!((all.requests.len(), all.older_left_out), (30, 0));
    assert_eq!(newest.older_left_out, 10);
    assert_eq!(newest.requests, all.requests[10..], "the newest 20, oldest first");
}

/// A draft's automatic trips are replayed as the workflow counts them: the request that trips
/// is denied `KillSwitchTripped`, and every later one `AgentPaused` (nobody resumes the agent
/// in a replay); before it, the draft decides as it would without the trip.
#[tokio::test]
async fn a_draft_that_would_trip_the_kill_switch_pauses_the_agent_for_the_rest_of_the_replay() {
    let seed: u64 = rand::random();
    let h = History::new().await;
    let loose = policy("2.00", "1000.00", 1000);
    h.make("bt-trips", &loose, seed, 80).await;
    let auto_pause = |json: Value| Some(serde_json::from_value(json).unwrap());

    // Deviation flags: the first flagged payment trips a draft that allows one flag an hour.
    let mut deviating = loose.clone();
    deviating.deviation =
        Some(serde_json::from_value(json!({"multiplier": "1.5", "lookbackDays": 2, "minPayments": 3})).unwrap());
    let flags_only = h.backtest("bt-trips", &deviating).await;
    let first_flag = flags_only.changes.iter().find(|c| c.draft.deviation.is_some()).expect("a flagged payment");
    let mut tripping = deviating.clone();
    tripping.auto_pause = auto_pause(json!({"deviationFlagsPerHour": 1}));
    let report = h.backtest("bt-trips", &tripping).await;
    let trip = report.paused_by_trip.clone().unwrap_or_else(|| panic!("no trip (seed {seed})"));
    assert_eq!(trip.idempotency_key, first_flag.request.idempotency_key, "seed {seed}");
    assert!(trip.reason.contains("deviationFlagsPerHour is 1"), "{}", trip.reason);
    assert_paused_after(&report, &trip, seed);
    let before: Vec<_> = flags_only.changes.iter().take_while(|c| c.request.at < trip.at).collect();
    assert!(before.is_empty(), "nothing changes before the first flag (seed {seed})");

    // Velocity: a low spend-per-hour limit trips on the first payment that would pass it.
    let mut fast = loose.clone();
    fast.auto_pause = auto_pause(json!({"spendPerHourUsd": "1.50"}));
    let report = h.backtest("bt-trips", &fast).await;
    let trip = report.paused_by_trip.clone().unwrap_or_else(|| panic!("no velocity trip (seed {seed})"));
    assert!(trip.reason.contains("above autoPause.spendPerHourUsd of 1.50 USD"), "{}", trip.reason);
    assert_paused_after(&report, &trip, seed);

    // The policy in force never trips: nothing reported.
    assert_eq!(h.backtest("bt-trips", &loose).await.paused_by_trip, None);
}

/// The tripping request is denied `KillSwitchTripped`, every later one `AgentPaused`, and none
/// before the trip changes.
fn assert_paused_after(report: &BacktestReport, trip: &agentpay::backtest::DraftTrip, seed: u64) {
    let mut after_trip = false;
    for change in &report.changes {
        let error = change.draft.error.as_deref();
        if change.request.idempotency_key == trip.idempotency_key {
            assert_eq!(error, Some("KillSwitchTripped"), "seed {seed}");
            after_trip = true;
        } else if after_trip {
            assert_eq!(error, Some("AgentPaused"), "{:?} (seed {seed})", change.request.idempotency_key);
        } else {
            panic!("a change before the trip: {change:?} (seed {seed})");
        }
    }
    assert!(after_trip, "the tripping request is among the changes (seed {seed})");
    assert_eq!(
        report.draft.denied,
        report.changes.len() as u64,
        "only the trip and what follows are denied (seed {seed})"
    );
}
