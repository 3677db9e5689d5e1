//! One conformance suite for both stores: every test function runs once per adapter.

use std::time::Duration;

use agentpay::clock::Clock;
use agentpay::error::PaymentError;
use agentpay::provider::PaymentProof;
use agentpay::samples::execution_input;
use agentpay::steps::{CaughtError, Claim, ClaimOutcome, CompensateInput, CompensationMode, ReservationSummary};
use agentpay::steps::{CheckIdempotencyInput, CheckSpendInput, ProcessPaymentInput, RecordLedgerInput};
use agentpay::store::{AuditKind, IdempotencyStatus, ReservationStatus};
use serde_json::Value;

use crate::helpers::policy;
use crate::stores::{Backend, Fixture};

const AGENT: &str = "conformance-agent";

impl Fixture {
    async fn with_policy(backend: Backend, per_tx: &str, daily: &str, per_hour: u32) -> Self {
        let fixture = Self::new(backend).await;
        fixture.store.put_policy(AGENT, &policy(per_tx, daily, per_hour)).await.unwrap();
        fixture
    }

    async fn claim(&self, input: &Value, execution: &str) -> Result<Claim, PaymentError> {
        self.steps
            .check_idempotency(CheckIdempotencyInput { request: input.clone(), execution_id: execution.into() })
            .await
    }

    async fn spend(&self, input: &Value, execution: &str, claim: &Claim) -> Result<ReservationSummary, PaymentError> {
        self.steps
            .check_spend(CheckSpendInput {
                request: input.clone(),
                execution_id: execution.into(),
                claim: claim.clone(),
            })
            .await
    }

    /// CheckSpend, ProcessPayment, RecordLedger after a claim: the outcome's JSON.
    async fn pay(&self, input: &Value, execution: &str, claim: &Claim) -> Result<Value, PaymentError> {
        let reservation = self.spend(input, execution, claim).await?;
        self.prove_and_record(input, execution, claim, &reservation).await
    }

    /// ProcessPayment then RecordLedger on a reservation: the outcome's JSON.
    async fn prove_and_record(
        &self,
        input: &Value,
        execution: &str,
        claim: &Claim,
        reservation: &ReservationSummary,
    ) -> Result<Value, PaymentError> {
        let proof = self
            .steps
            .process_payment(ProcessPaymentInput {
                request: input.clone(),
                execution_id: execution.into(),
                claim: claim.clone(),
                reservation: reservation.clone(),
                retry_count: 0,
            })
            .await?;
        self.record(input, execution, claim, reservation, proof).await
    }

    /// RecordLedger alone (a retried or redriven step holding its proof): the outcome's JSON.
    async fn record(
        &self,
        input: &Value,
        execution: &str,
        claim: &Claim,
        reservation: &ReservationSummary,
        proof: PaymentProof,
    ) -> Result<Value, PaymentError> {
        let outcome = self
            .steps
            .record_ledger(RecordLedgerInput {
                request: input.clone(),
                execution_id: execution.into(),
                claim: claim.clone(),
                reservation: reservation.clone(),
                proof,
            })
            .await?;
        Ok(serde_json::to_value(outcome).unwrap())
    }

    async fn compensate(
        &self,
        input: &Value,
        execution: &str,
        claim: &Claim,
        error: &str,
    ) -> Result<Value, PaymentError> {
        self.compensate_in(input, execution, claim, error, CompensationMode::Release).await
    }

    async fn compensate_in(
        &self,
        input: &Value,
        execution: &str,
        claim: &Claim,
        error: &str,
        mode: CompensationMode,
    ) -> Result<Value, PaymentError> {
        let caught = CaughtError {
            error: error.into(),
            cause: format!("{{\"errorType\":\"{error}\",\"errorMessage\":\"{error} happened\"}}"),
        };
        let output = self
            .steps
            .compensate(CompensateInput {
                request: input.clone(),
                execution_id: execution.into(),
                claim: claim.clone(),
                error: caught,
                mode,
                entered_at: Some(format!("{}", self.clock.now().millis())),
            })
            .await?;
        Ok(serde_json::to_value(output).unwrap())
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Sqlite).await })*
        }
        mod dynamodb {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Dynamo).await })*
        }
    };
}

conformance!(
    claim_then_cached_result,
    in_flight_until_the_lease_passes_then_adopted,
    a_retried_claim_of_the_same_execution_is_its_own,
    a_key_reused_for_another_request_is_refused,
    a_failed_key_is_reclaimed_with_a_new_attempt,
    expired_records_are_treated_as_absent,
    reserve_is_idempotent_and_authorize_and_settle_happen_once,
    release_happens_once_and_never_after_authorization,
    every_policy_limit_denies,
    audit_events_are_written_with_the_payment,
    a_takeover_fences_the_old_holder_out,
    a_hold_keeps_the_reservation_and_ends_the_lease,
    an_unfinished_claim_never_expires,
    a_completed_key_answers_before_the_policy,
    a_pause_stops_payments_past_the_spend_check,
    an_approval_waits_once_extends_the_lease_and_is_decided_once,
    every_policy_change_is_kept_with_who_when_and_why,
    the_spend_history_keeps_each_payment_by_day_payee_and_category,
    trip_counters_are_written_only_over_the_version_read,
    settlement_reports_move_a_payment_forward_and_never_free_its_budget,
    only_the_chain_releases_an_expired_authorization,
    a_key_held_again_for_a_paid_claim_completes_with_its_payment,
    agents_are_listed_a_page_at_a_time_and_the_sweep_keeps_its_place,
);

/// Agents with a policy, in id order, a page after a given agent at a time (agents that only
/// paid nothing yet are listed; an agent without a policy is not), and the reconciliation
/// sweep's cursor.
async fn agents_are_listed_a_page_at_a_time_and_the_sweep_keeps_its_place(backend: Backend) {
    let f = Fixture::new(backend).await;
    let agents = ["agent-c", "agent-a", "agent-e", "agent-b", "agent-d"];
    for agent in agents {
        f.store.put_policy(agent, &policy("1", "10", 10)).await.unwrap();
    }
    // A second policy for an agent lists it once still.
    f.store.put_policy("agent-b", &policy("2", "10", 10)).await.unwrap();
    let page = |after: Option<&'static str>, limit: usize| {
        let store = f.store.clone();
        async move { store.agents_after(after, limit).await.unwrap() }
    };
    assert_eq!(page(None, 2).await, ["agent-a", "agent-b"]);
    assert_eq!(page(Some("agent-b"), 2).await, ["agent-c", "agent-d"]);
    assert_eq!(page(Some("agent-d"), 2).await, ["agent-e"]);
    assert!(page(Some("agent-e"), 2).await.is_empty());
    // After an id that is no agent's: where it would sort.
    assert_eq!(page(Some("agent-bb"), 10).await, ["agent-c", "agent-d", "agent-e"]);
    assert_eq!(f.store.agents().await.unwrap(), ["agent-a", "agent-b", "agent-c", "agent-d", "agent-e"]);

    assert_eq!(f.store.sweep_cursor().await.unwrap(), None);
    f.store.set_sweep_cursor("agent-c").await.unwrap();
    assert_eq!(f.store.sweep_cursor().await.unwrap().as_deref(), Some("agent-c"));
    f.store.set_sweep_cursor("agent-a").await.unwrap();
    assert_eq!(f.store.sweep_cursor().await.unwrap().as_deref(), Some("agent-a"));
    // The cursor is not an agent.
    assert_eq!(f.store.agents().await.unwrap().len(), 5);
}

async fn claim_then_cached_result(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let input = execution_input("k-cached", AGENT, "10000");
    let claim = f.claim(&input, "exec-1").await.unwrap();
    assert_eq!((claim.outcome, claim.attempt), (ClaimOutcome::Claimed, 1));
    let outcome = f.pay(&input, "exec-1", &claim).await.unwrap();

    let again = f.claim(&input, "exec-2").await.unwrap();
    assert_eq!(again.outcome, ClaimOutcome::Cached);
    let cached = again.result.unwrap();
    assert_eq!(cached["fromCache"], true);
    assert_eq!(cached["paymentId"], outcome["paymentId"]);
    assert_eq!(cached["header"], outcome["header"]);
}

async fn in_flight_until_the_lease_passes_then_adopted(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let input = execution_input("k-lease", AGENT, "10000");
    let first = f.claim(&input, "exec-a").await.unwrap();
    let error = f.claim(&input, "exec-b").await.unwrap_err();
    assert_eq!(error.name(), "PaymentInFlight");
    assert!(error.to_string().contains("exec-a"), "{error}");

    f.clock.advance(Duration::from_secs(301));
    let adopted = f.claim(&input, "exec-b").await.unwrap();
    // The same attempt: the same reservation and client token, so nothing is paid twice.
    assert_eq!(
        (adopted.attempt, &adopted.reservation_id, &adopted.client_token),
        (1, &first.reservation_id, &first.client_token)
    );
    assert_eq!(f.claim(&input, "exec-a").await.unwrap_err().name(), "PaymentInFlight");
}

async fn a_retried_claim_of_the_same_execution_is_its_own(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let input = execution_input("k-retry", AGENT, "10000");
    let first = f.claim(&input, "exec-1").await.unwrap();
    let again = f.claim(&input, "exec-1").await.unwrap();
    assert_eq!(first, again);
}

async fn a_key_reused_for_another_request_is_refused(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    f.claim(&execution_input("k-reuse", AGENT, "10000"), "exec-1").await.unwrap();
    let error = f.claim(&execution_input("k-reuse", AGENT, "20000"), "exec-2").await.unwrap_err();
    assert_eq!(error.name(), "IdempotencyKeyReused");
}

async fn a_failed_key_is_reclaimed_with_a_new_attempt(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let input = execution_input("k-failed", AGENT, "10000");
    let first = f.claim(&input, "exec-1").await.unwrap();
    f.spend(&input, "exec-1", &first).await.unwrap();
    f.compensate(&input, "exec-1", &first, "ProviderRejected").await.unwrap();
    let record = f.store.idempotency("k-failed", f.clock.now()).await.unwrap().unwrap();
    assert_eq!(record.status, IdempotencyStatus::Failed);
    assert_eq!(record.error.unwrap().cause, "ProviderRejected happened");

    let second = f.claim(&input, "exec-2").await.unwrap();
    assert_eq!(second.attempt, 2);
    assert_ne!(second.reservation_id, first.reservation_id);
    assert_ne!(second.client_token, first.client_token);
    f.pay(&input, "exec-2", &second).await.unwrap();
    // A denial is reclaimable too.
    let denied_input = execution_input("k-denied", AGENT, "2000000");
    let denied = f.claim(&denied_input, "exec-3").await.unwrap();
    let denial = f.spend(&denied_input, "exec-3", &denied).await.unwrap_err();
    f.compensate(&denied_input, "exec-3", &denied, denial.name()).await.unwrap();
    let record = f.store.idempotency("k-denied", f.clock.now()).await.unwrap().unwrap();
    assert_eq!(record.status, IdempotencyStatus::Denied);
    assert_eq!(f.claim(&denied_input, "exec-4").await.unwrap().attempt, 2);
}

async fn expired_records_are_treated_as_absent(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let input = execution_input("k-expired", AGENT, "10000");
    let claim = f.claim(&input, "exec-1").await.unwrap();
    f.pay(&input, "exec-1", &claim).await.unwrap();
    assert!(f.store.idempotency("k-expired", f.clock.now()).await.unwrap().is_some());

    // Past the 24 h TTL the item may still be stored, but it no longer counts.
    f.clock.advance(Duration::from_secs(24 * 3600 + 1));
    assert!(f.store.idempotency("k-expired", f.clock.now()).await.unwrap().is_none());
    let fresh = f.claim(&input, "exec-2").await.unwrap();
    assert_eq!((fresh.outcome, fresh.attempt), (ClaimOutcome::Claimed, 1));
}

async fn reserve_is_idempotent_and_authorize_and_settle_happen_once(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let input = execution_input("k-once", AGENT, "10000");
    let claim = f.claim(&input, "exec-1").await.unwrap();
    let first = f.spend(&input, "exec-1", &claim).await.unwrap();
    let retried = f.spend(&input, "exec-1", &claim).await.unwrap();
    assert_eq!(first, retried);
    let window = f.store.agent_ledger(AGENT).await.unwrap().window;
    assert_eq!((window.spent.get(), window.count), (10_000, 1), "a retried reserve counts once");

    let proof = f
        .steps
        .process_payment(ProcessPaymentInput {
            request: input.clone(),
            execution_id: "exec-1".into(),
            claim: claim.clone(),
            reservation: first.clone(),
            retry_count: 0,
        })
        .await
        .unwrap();
    let outcome = f.record(&input, "exec-1", &claim, &first, proof.clone()).await.unwrap();
    // RecordLedger again (a retried step) answers the same outcome without writing.
    let again = f.record(&input, "exec-1", &claim, &first, proof).await.unwrap();
    assert_eq!(again["paymentId"], outcome["paymentId"]);
    // ...and the spend history counts the payment once.
    let payee = agentpay::deviation::payee_scope(agentpay::samples::SAMPLE_PAYEE);
    let today = agentpay::deviation::day_number(f.clock.now());
    let history = f.store.spend_history(AGENT, &payee, today, today).await.unwrap();
    assert_eq!((history.total.get(), history.count), (10_000, 1));
    assert_eq!(f.store.audit_events(AGENT).await.unwrap().len(), 1);

    let reservation = f.store.reservation(AGENT, &first.reservation_id).await.unwrap().unwrap();
    assert_eq!(reservation.status, ReservationStatus::Authorized);
    // The store's settlement write: once, conditioned on the status read.
    let settlement = |tx: &str| agentpay::store::Settlement {
        report: agentpay::settlement::SettlementReport {
            outcome: agentpay::settlement::ReportedOutcome::Settled,
            transaction: Some(tx.to_owned()),
            network: None,
            payer: None,
            amount: None,
            error_reason: None,
        },
        reported_by: "local:agent".into(),
        reported_at: f.clock.now(),
    };
    let commit = |tx: &str| agentpay::store::SettlementCommit {
        agent_id: AGENT.into(),
        reservation_id: reservation.id.clone(),
        from: ReservationStatus::Authorized,
        to: ReservationStatus::Settled,
        settlement: Some(settlement(tx)),
        refund: None,
        audit: settle_event(&reservation),
    };
    let tx = format!("0x{}", "cd".repeat(32));
    use agentpay::store::Transition;
    assert_eq!(f.store.record_settlement(&commit(&tx)).await.unwrap(), Transition::Applied);
    assert_eq!(f.store.record_settlement(&commit(&tx)).await.unwrap(), Transition::AlreadyApplied);
    let other = format!("0x{}", "ef".repeat(32));
    assert_eq!(f.store.record_settlement(&commit(&other)).await.unwrap(), Transition::VersionConflict);
    let reservation = f.store.reservation(AGENT, &first.reservation_id).await.unwrap().unwrap();
    assert_eq!(reservation.status, ReservationStatus::Settled);
    assert_eq!(reservation.settlement.unwrap().report.transaction, Some(tx));
    assert!(reservation.payer.is_some(), "the signer, from the proof");
    let authorization = reservation.authorization.expect("the proof's EIP-3009 authorization");
    assert!(authorization.nonce.len() == 66 && authorization.valid_before > reservation.created_at);
    // A settled payment still counts against the window.
    assert_eq!(f.store.agent_ledger(AGENT).await.unwrap().window.spent.get(), 10_000);
}

fn settle_event(reservation: &agentpay::store::Reservation) -> agentpay::store::AuditEvent {
    agentpay::store::AuditEvent {
        event_id: format!("evt-settle-{}", reservation.id),
        kind: AuditKind::Settled,
        agent_id: reservation.agent_id.clone(),
        user_id: "user-7".into(),
        at: reservation.updated_at,
        idempotency_key: reservation.idempotency_key.clone(),
        execution_id: reservation.execution_id.clone(),
        reservation_id: Some(reservation.id.clone()),
        amount: Some(reservation.amount),
        network: Some(reservation.network),
        asset: Some(reservation.asset.clone()),
        payee: Some(reservation.pay_to.clone()),
        resource: reservation.resource.clone(),
        context: agentpay::request::BusinessContext {
            decision: "settlement report".into(),
            delegated_by: "facilitator".into(),
            scope: "settlement".into(),
            category: None,
        },
        caller_arn: None,
        limits: None,
        payment_id: reservation.payment_id.clone(),
        error: None,
        decided_by: None,
        reason: None,
        settlement: None,
    }
}

async fn release_happens_once_and_never_after_authorization(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let input = execution_input("k-release", AGENT, "10000");
    let claim = f.claim(&input, "exec-1").await.unwrap();
    let reservation = f.spend(&input, "exec-1", &claim).await.unwrap();
    let first = f.compensate(&input, "exec-1", &claim, "ProviderUnavailable").await.unwrap();
    assert_eq!((first["released"].as_bool(), first["alreadyCompensated"].as_bool()), (Some(true), Some(false)));
    let second = f.compensate(&input, "exec-1", &claim, "ProviderUnavailable").await.unwrap();
    assert_eq!((second["released"].as_bool(), second["alreadyCompensated"].as_bool()), (Some(false), Some(true)));
    let stored = f.store.reservation(AGENT, &reservation.reservation_id).await.unwrap().unwrap();
    assert_eq!(stored.status, ReservationStatus::Released);
    assert!(f.store.agent_ledger(AGENT).await.unwrap().window.is_empty());
    assert_eq!(f.store.audit_events(AGENT).await.unwrap().len(), 1);

    // A released reservation is not paid afterwards (its claim is closed), nor authorized by
    // a proof from elsewhere.
    let error = f.prove_and_record(&input, "exec-1", &claim, &reservation).await.unwrap_err();
    assert_eq!(error.name(), "ClaimSuperseded");
    assert!(error.to_string().contains("FAILED by execution exec-1"), "{error}");
    let stray: PaymentProof = serde_json::from_value(serde_json::json!({
        "paymentId": "pay-stray", "provider": "dev-wallet", "status": "PROOF_GENERATED",
        "header": {"name": "X-PAYMENT", "value": "stray"}, "issuedAt": f.clock.now().to_rfc3339(),
    }))
    .unwrap();
    let error = f.record(&input, "exec-1", &claim, &reservation, stray).await.unwrap_err();
    assert_eq!(error.name(), "LedgerInconsistent");

    // And an authorized one cannot be released.
    let paid_input = execution_input("k-paid", AGENT, "10000");
    let paid = f.claim(&paid_input, "exec-2").await.unwrap();
    f.pay(&paid_input, "exec-2", &paid).await.unwrap();
    let refused = f.compensate(&paid_input, "exec-2", &paid, "ProviderRejected").await.unwrap();
    assert_eq!((refused["error"].as_str(), refused["released"].as_bool()), (Some("ClaimSuperseded"), Some(false)));
    assert!(refused["cause"].as_str().unwrap().contains("COMPLETED by execution exec-2"), "{refused}");
    let paid_reservation = f.store.reservation(AGENT, &paid.reservation_id).await.unwrap().unwrap();
    assert_eq!(paid_reservation.status, ReservationStatus::Authorized);
}

async fn every_policy_limit_denies(backend: Backend) {
    let f = Fixture::with_policy(backend, "0.50", "1.00", 3).await;
    let per_tx = deny(&f, "k-per-tx", "500001").await;
    assert_eq!(per_tx.name(), "SpendLimitExceeded");
    assert!(per_tx.to_string().contains("per-transaction limit"));

    for (i, amount) in ["400000", "400000"].iter().enumerate() {
        let input = execution_input(&format!("k-ok-{i}"), AGENT, amount);
        let claim = f.claim(&input, "e").await.unwrap();
        f.spend(&input, "e", &claim).await.unwrap();
    }
    let daily = deny(&f, "k-daily", "200001").await;
    assert!(
        matches!(daily, PaymentError::SpendLimitExceeded { limit: agentpay::error::LimitKind::Rolling24Hours, .. }),
        "{daily}"
    );
    assert!(daily.to_string().contains("remaining 200000"), "{daily}");

    let input = execution_input("k-third", AGENT, "1");
    let claim = f.claim(&input, "e").await.unwrap();
    f.spend(&input, "e", &claim).await.unwrap();
    assert_eq!(deny(&f, "k-rate", "1").await.name(), "RateLimitExceeded");

    // Once the payments' whole minute is more than an hour old, the rate resets (windows count
    // whole minutes: a limit may hold up to a minute longer, never shorter).
    f.clock.advance(Duration::from_secs(3600 + 60));
    let input = execution_input("k-next-hour", AGENT, "1");
    let claim = f.claim(&input, "e").await.unwrap();
    f.spend(&input, "e", &claim).await.unwrap();

    assert!(f.store.set_paused(AGENT, true).await.unwrap());
    assert_eq!(deny(&f, "k-paused", "1").await.name(), "AgentPaused");
    // A policy edit keeps the kill switch where it is, whatever the new policy says.
    let mut edited = policy("0.50", "1.00", 3);
    edited.paused = false;
    f.store.put_policy(AGENT, &edited).await.unwrap();
    assert_eq!(f.store.policy(AGENT).await.unwrap().map(|p| p.paused), Some(true));
    assert_eq!(deny(&f, "k-paused-2", "1").await.name(), "AgentPaused");
    assert!(f.store.set_paused(AGENT, false).await.unwrap());
    assert!(!f.store.set_paused("no-such-agent", true).await.unwrap(), "nothing to pause");
    assert_eq!(f.store.agents().await.unwrap(), [AGENT]);

    let mut payees = policy("0.50", "100", 100);
    payees.allowed_payees = vec![alloy_primitives::Address::repeat_byte(9)];
    f.store.put_policy(AGENT, &payees).await.unwrap();
    let input = execution_input("k-payee", AGENT, "1");
    assert_eq!(f.claim(&input, "e").await.unwrap_err().name(), "PolicyDenied");
}

async fn audit_events_are_written_with_the_payment(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let input = execution_input("k-audit", AGENT, "10000");
    let claim = f.claim(&input, "exec-audit").await.unwrap();
    let outcome = f.pay(&input, "exec-audit", &claim).await.unwrap();
    let denied_input = execution_input("k-audit-denied", AGENT, "1000001");
    let denied = f.claim(&denied_input, "exec-denied").await.unwrap();
    let error = f.spend(&denied_input, "exec-denied", &denied).await.unwrap_err();
    f.compensate(&denied_input, "exec-denied", &denied, error.name()).await.unwrap();

    let events = f.store.audit_events(AGENT).await.unwrap();
    assert_eq!(events.len(), 2);
    let paid = events.iter().find(|e| e.kind == AuditKind::Authorized).unwrap();
    assert_eq!(paid.execution_id, "exec-audit");
    assert_eq!(paid.payment_id.as_ref(), outcome["paymentId"].as_str().map(str::to_owned).as_ref());
    assert_eq!(paid.amount.unwrap().get(), 10_000);
    assert_eq!(paid.context.decision, "credit check before approving invoice INV-1042");
    let limits = paid.limits.as_ref().unwrap();
    assert_eq!(
        (limits.spent_24h_before.get(), limits.spent_24h_after.get(), limits.daily_limit.get()),
        (0, 10_000, 5_000_000)
    );
    let denial = events.iter().find(|e| e.kind == AuditKind::Denied).unwrap();
    assert_eq!(denial.error.as_ref().unwrap().error, "SpendLimitExceeded");
    assert!(denial.reservation_id.is_none());
}

async fn deny(f: &Fixture, key: &str, amount: &str) -> PaymentError {
    let input = execution_input(key, AGENT, amount);
    let claim = f.claim(&input, key).await.unwrap();
    f.spend(&input, key, &claim).await.unwrap_err()
}

async fn a_takeover_fences_the_old_holder_out(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let input = execution_input("k-fence", AGENT, "10000");
    let old = f.claim(&input, "exec-old").await.unwrap();
    let reservation = f.spend(&input, "exec-old", &old).await.unwrap();
    f.clock.advance(Duration::from_secs(21 * 60));
    let new = f.claim(&input, "exec-new").await.unwrap();
    assert_eq!((&new.claim_id, new.attempt, &new.client_token), (&old.claim_id, old.attempt, &old.client_token));
    assert!(new.adopted && !old.adopted);

    for mode in [CompensationMode::Release, CompensationMode::HoldUnknown] {
        let fenced = f.compensate_in(&input, "exec-old", &old, "ProviderRejected", mode).await.unwrap();
        assert_eq!((fenced["error"].as_str(), fenced["released"].as_bool()), (Some("ClaimSuperseded"), Some(false)));
        assert!(fenced["cause"].as_str().unwrap().contains("held by execution exec-new"), "{fenced}");
    }
    let stored = f.store.reservation(AGENT, &reservation.reservation_id).await.unwrap().unwrap();
    assert_eq!(stored.status, ReservationStatus::Reserved, "the new holder's reservation is untouched");
    let record = f.store.idempotency("k-fence", f.clock.now()).await.unwrap().unwrap();
    assert_eq!((record.status, record.execution_id.as_str()), (IdempotencyStatus::InProgress, "exec-new"));
    assert!(f.store.audit_events(AGENT).await.unwrap().is_empty(), "a fenced write writes nothing");

    // ProcessPayment's last look (one round trip) shows the new holder, so the old one does
    // not pay; the new one pays and records.
    let (policy, record) = f.store.policy_and_key(AGENT, "k-fence", f.clock.now()).await.unwrap();
    assert_eq!(policy.map(|p| p.paused), Some(false));
    assert_eq!(record.map(|r| r.execution_id).as_deref(), Some("exec-new"));
    let (_, absent) = f.store.policy_and_key(AGENT, "k-never-claimed", f.clock.now()).await.unwrap();
    assert!(absent.is_none());
    let late = f.prove_and_record(&input, "exec-old", &old, &reservation).await.unwrap_err();
    assert_eq!(late.name(), "ClaimSuperseded");
    assert!(late.to_string().contains("held by execution exec-new"), "{late}");
    f.prove_and_record(&input, "exec-new", &new, &reservation).await.unwrap();
    let paid = f.store.reservation(AGENT, &reservation.reservation_id).await.unwrap().unwrap();
    assert_eq!(paid.status, ReservationStatus::Authorized);
}

async fn a_hold_keeps_the_reservation_and_ends_the_lease(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let input = execution_input("k-hold", AGENT, "10000");
    let claim = f.claim(&input, "exec-1").await.unwrap();
    let reservation = f.spend(&input, "exec-1", &claim).await.unwrap();
    let held =
        f.compensate_in(&input, "exec-1", &claim, "Sandbox.Timedout", CompensationMode::HoldUnknown).await.unwrap();
    assert_eq!((held["error"].as_str(), held["held"].as_bool()), (Some("PaymentOutcomeUnknown"), Some(true)));
    let stored = f.store.reservation(AGENT, &reservation.reservation_id).await.unwrap().unwrap();
    assert_eq!(stored.status, ReservationStatus::Reserved);
    assert_eq!(f.store.agent_ledger(AGENT).await.unwrap().window.spent.get(), 10_000);
    let record = f.store.idempotency("k-hold", f.clock.now()).await.unwrap().unwrap();
    assert_eq!(record.status, IdempotencyStatus::InProgress);
    assert!(record.lease_expires_at <= f.clock.now());
    let audit = f.store.audit_events(AGENT).await.unwrap();
    assert_eq!(audit.iter().map(|e| e.kind).collect::<Vec<_>>(), [AuditKind::OutcomeUnknown]);
    // Compensate handed the unknown error directly holds too, never releases.
    let again = f.compensate(&input, "exec-1", &claim, "PaymentOutcomeUnknown").await.unwrap();
    assert_eq!(again["held"].as_bool(), Some(true));
    // A new execution adopts at once (the lease ended) with the same ids.
    let replay = f.claim(&input, "exec-2").await.unwrap();
    assert_eq!((replay.reservation_id, replay.client_token), (claim.reservation_id, claim.client_token));
}

async fn an_unfinished_claim_never_expires(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let input = execution_input("k-unfinished", AGENT, "10000");
    let claim = f.claim(&input, "exec-1").await.unwrap();
    let reservation = f.spend(&input, "exec-1", &claim).await.unwrap();
    // Found by the fault simulator: a held claim used to expire after 15 days and its
    // reservation, with a proof behind it, was never resolved.
    f.clock.advance(Duration::from_secs(60 * 24 * 3600));
    let record = f.store.idempotency("k-unfinished", f.clock.now()).await.unwrap();
    assert_eq!(record.map(|r| r.status), Some(IdempotencyStatus::InProgress));
    // The original holder still records (a redrive after two months); a finished record then
    // expires after the ordinary TTL.
    f.prove_and_record(&input, "exec-1", &claim, &reservation).await.unwrap();
    f.clock.advance(Duration::from_secs(24 * 3600 + 1));
    assert!(f.store.idempotency("k-unfinished", f.clock.now()).await.unwrap().is_none());
}

async fn a_completed_key_answers_before_the_policy(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let input = execution_input("k-cache-first", AGENT, "10000");
    let claim = f.claim(&input, "exec-1").await.unwrap();
    f.pay(&input, "exec-1", &claim).await.unwrap();
    let mut changed = policy("1.00", "5.00", 10);
    changed.allowed_payees = vec!["0x0000000000000000000000000000000000000001".parse().unwrap()];
    f.store.put_policy(AGENT, &changed).await.unwrap();
    f.store.set_paused(AGENT, true).await.unwrap();
    let cached = f.claim(&input, "exec-2").await.unwrap();
    assert_eq!(cached.outcome, ClaimOutcome::Cached);
}

/// The kill switch reaches payments already reserved: a charge decided before the pause no
/// longer applies, and ProcessPayment refuses before the provider (or holds, when an earlier
/// call may have issued a proof).
async fn a_pause_stops_payments_past_the_spend_check(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    // A pause is a policy version: charges decided under the unpaused policy (conditioned on
    // the window's policy version) no longer apply.
    let ledger = f.store.agent_ledger(AGENT).await.unwrap();
    f.store.set_paused(AGENT, true).await.unwrap();
    let after = f.store.agent_ledger(AGENT).await.unwrap();
    assert!(after.version > ledger.version && after.window.policy_version == after.version);
    f.store.set_paused(AGENT, false).await.unwrap();

    let input = execution_input("k-paused-late", AGENT, "10000");
    let claim = f.claim(&input, "exec-1").await.unwrap();
    let reservation = f.spend(&input, "exec-1", &claim).await.unwrap();
    f.store.set_paused(AGENT, true).await.unwrap();
    let process = |retry_count: u32| ProcessPaymentInput {
        request: input.clone(),
        execution_id: "exec-1".into(),
        claim: claim.clone(),
        reservation: reservation.clone(),
        retry_count,
    };
    // A retry: its predecessor may have been paid, so the reservation is held, not refused.
    let held = f.steps.process_payment(process(1)).await.unwrap_err();
    assert_eq!(held.name(), "PaymentOutcomeUnknown", "{held}");
    // A first call: refused before the provider, then compensated like any denial.
    let refused = f.steps.process_payment(process(0)).await.unwrap_err();
    assert_eq!(refused.name(), "AgentPaused", "{refused}");
    let compensation = f.compensate(&input, "exec-1", &claim, "AgentPaused").await.unwrap();
    assert_eq!(compensation["released"], true);
    let stored = f.store.reservation(AGENT, &reservation.reservation_id).await.unwrap().unwrap();
    assert_eq!(stored.status, ReservationStatus::Released);
    assert!(f.store.agent_ledger(AGENT).await.unwrap().window.is_empty());
    let record = f.store.idempotency("k-paused-late", f.clock.now()).await.unwrap().unwrap();
    assert_eq!(record.status, IdempotencyStatus::Denied);
    // Nothing was signed: the provider was never asked.
    let token = claim.client_token.clone();
    assert!(f.proofs.issued(&token).await.unwrap().is_none(), "no proof for {token}");
}

/// The callback task's step and a person's decision, on each store: the pending approval is
/// recorded once per token (a retried task replaces the token), the claim's lease covers the
/// wait, a decision lands once, and one past the time-out is refused.
async fn an_approval_waits_once_extends_the_lease_and_is_decided_once(backend: Backend) {
    use agentpay::approval::{Decision, decide};
    use agentpay::steps::RequestApprovalInput;
    use agentpay::store::{ApprovalStatus, Transition};

    let f = Fixture::new(backend).await;
    let mut approving = policy("5.00", "5.00", 10);
    approving.approval_threshold_usd = Some("0.10".parse().unwrap());
    f.store.put_policy(AGENT, &approving).await.unwrap();
    let input = execution_input("k-approval", AGENT, "200000");
    let claim = f.claim(&input, "exec-1").await.unwrap();
    let reservation = f.spend(&input, "exec-1", &claim).await.unwrap();
    assert!(reservation.approval.required, "{:?}", reservation.approval);
    let id = reservation.approval.id.clone().unwrap();
    let request = |token: &str| RequestApprovalInput {
        task_token: token.into(),
        request: input.clone(),
        execution_id: "exec-1".into(),
        claim: claim.clone(),
        reservation: reservation.clone(),
    };
    let first = f.steps.request_approval(request("token-1")).await.unwrap();
    assert!(!first.already_requested);
    assert!(f.steps.request_approval(request("token-1")).await.unwrap().already_requested, "same token: once");
    // A retried task has a new token: the pending approval now answers to it.
    f.steps.request_approval(request("token-2")).await.unwrap();
    let stored = f.store.approval(&id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.task_token.as_str()), (ApprovalStatus::Pending, "token-2"));
    let key = f.store.idempotency("k-approval", f.clock.now()).await.unwrap().unwrap();
    assert!(key.lease_expires_at >= stored.expires_at, "no takeover while a person decides");
    let listed = f.store.approvals(f.clock.now().minus(Duration::from_secs(60)), f.clock.now()).await.unwrap();
    assert_eq!(listed.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);

    // Another execution that does not hold the key cannot make it wait.
    let fenced = f.steps.request_approval(RequestApprovalInput { execution_id: "exec-x".into(), ..request("t") }).await;
    assert_eq!(fenced.unwrap_err().name(), "ClaimSuperseded");

    f.clock.advance(Duration::from_secs(30));
    let approve = decide(&stored, &Decision::Approve, "local:alice", &[], f.clock.now()).unwrap();
    assert_eq!(f.store.decide_approval(&approve).await.unwrap(), Transition::Applied);
    assert_eq!(f.store.decide_approval(&approve).await.unwrap(), Transition::AlreadyApplied);
    let reject = decide(&stored, &Decision::Reject { reason: "no".into() }, "local:bob", &[], f.clock.now()).unwrap();
    assert!(
        matches!(f.store.decide_approval(&reject).await.unwrap(), Transition::Refused(why) if why.contains("APPROVED by local:alice"))
    );
    let decided = f.store.approval(&id).await.unwrap().unwrap();
    assert_eq!((decided.status, decided.decided_by.as_deref()), (ApprovalStatus::Approved, Some("local:alice")));
    let kinds: Vec<AuditKind> = f.store.audit_events(AGENT).await.unwrap().iter().map(|e| e.kind).collect();
    assert_eq!(kinds.iter().filter(|k| **k == AuditKind::ApprovalRequested).count(), 2, "one per token");
    assert_eq!(kinds.iter().filter(|k| **k == AuditKind::ApprovalGranted).count(), 1);
    // A decided approval never waits again; a retried CheckSpend sees it approved.
    let again = f.steps.request_approval(request("token-3")).await.unwrap_err();
    assert_eq!(again.name(), "LedgerInconsistent", "{again}");
    assert!(!f.spend(&input, "exec-1", &claim).await.unwrap().approval.required);

    // Past its time-out nobody decides.
    let input = execution_input("k-approval-late", AGENT, "200000");
    let claim = f.claim(&input, "exec-2").await.unwrap();
    let reservation = f.spend(&input, "exec-2", &claim).await.unwrap();
    f.steps
        .request_approval(RequestApprovalInput {
            task_token: "late".into(),
            request: input.clone(),
            execution_id: "exec-2".into(),
            claim: claim.clone(),
            reservation: reservation.clone(),
        })
        .await
        .unwrap();
    let pending = f.store.approval(reservation.approval.id.as_deref().unwrap()).await.unwrap().unwrap();
    f.clock.advance(Duration::from_secs(7200));
    assert!(decide(&pending, &Decision::Approve, "local:alice", &[], f.clock.now()).is_err());
    let forced = agentpay::store::ApprovalDecisionCommit {
        decided: agentpay::store::ApprovalRecord {
            status: ApprovalStatus::Approved,
            decided_by: Some("x".into()),
            decided_at: Some(f.clock.now()),
            ..pending
        },
        audit: f.store.audit_events(AGENT).await.unwrap()[0].clone(),
    };
    assert!(
        matches!(f.store.decide_approval(&forced).await.unwrap(), Transition::Refused(why) if why.contains("timed out"))
    );
}

/// Policy edits, pauses and resumes: each a new version, each in the agent's policy history
/// with who, when and why, written with the policy; an edit decided on an older version is
/// refused and writes nothing.
async fn every_policy_change_is_kept_with_who_when_and_why(backend: Backend) {
    use agentpay::store::{PolicyAction, PolicyChange, PolicyEdit, PolicyEdited};
    let f = Fixture::new(backend).await;
    let change = |edit: PolicyEdit, by: &str, reason: &str, expected_version: Option<u64>| PolicyChange {
        edit,
        by: by.into(),
        reason: Some(reason.into()),
        at: f.clock.now(),
        expected_version,
    };
    let first = policy("1.00", "5.00", 10);
    let set = change(PolicyEdit::Replace(Box::new(first.clone())), "local:alice", "onboarding", Some(0));
    assert_eq!(f.store.change_policy(AGENT, &set).await.unwrap(), PolicyEdited::Applied { version: 1 });
    let pause = change(PolicyEdit::SetPaused(true), "arn:aws:iam::123456789012:role/oncall", "incident 42", None);
    assert_eq!(f.store.change_policy(AGENT, &pause).await.unwrap(), PolicyEdited::Applied { version: 2 });
    // Decided on version 1: the pause landed since, so nothing is written.
    let stale = change(PolicyEdit::Replace(Box::new(policy("2.00", "5.00", 10))), "local:bob", "raise", Some(1));
    assert_eq!(f.store.change_policy(AGENT, &stale).await.unwrap(), PolicyEdited::VersionMoved { current: 2 });
    assert_eq!(
        f.store.policy(AGENT).await.unwrap().unwrap().per_transaction_limit_usd,
        first.per_transaction_limit_usd
    );
    let resume = change(PolicyEdit::SetPaused(false), "local:alice", "fixed", Some(2));
    assert_eq!(f.store.change_policy(AGENT, &resume).await.unwrap(), PolicyEdited::Applied { version: 3 });
    let nobody = change(PolicyEdit::SetPaused(true), "local:alice", "x", None);
    assert_eq!(f.store.change_policy("no-such-agent", &nobody).await.unwrap(), PolicyEdited::NoPolicy);

    let history = f.store.policy_history(AGENT).await.unwrap();
    let seen: Vec<(u64, PolicyAction, &str, Option<&str>, bool)> =
        history.iter().map(|e| (e.version, e.action, e.by.as_str(), e.reason.as_deref(), e.policy.paused)).collect();
    assert_eq!(
        seen,
        [
            (1, PolicyAction::Set, "local:alice", Some("onboarding"), false),
            (2, PolicyAction::Paused, "arn:aws:iam::123456789012:role/oncall", Some("incident 42"), true),
            (3, PolicyAction::Resumed, "local:alice", Some("fixed"), false),
        ]
    );
    assert!(f.store.policy_history("no-such-agent").await.unwrap().is_empty());
}

async fn the_spend_history_keeps_each_payment_by_day_payee_and_category(backend: Backend) {
    use agentpay::deviation::{category_scope, day_number, payee_scope};
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let payee = payee_scope(agentpay::samples::SAMPLE_PAYEE);
    let travel = category_scope("travel");
    let first_day = day_number(f.clock.now());
    for (n, (amount, category)) in
        [("10000", Some("travel")), ("20000", None), ("40000", Some("travel"))].iter().enumerate()
    {
        let mut input = execution_input(&format!("k-history-{n}"), AGENT, amount);
        if let Some(category) = category {
            input["context"]["category"] = serde_json::json!(category);
        }
        let execution = format!("exec-history-{n}");
        let claim = f.claim(&input, &execution).await.unwrap();
        f.pay(&input, &execution, &claim).await.unwrap();
        f.clock.advance(Duration::from_secs(24 * 3600));
    }
    let last_day = first_day + 2;
    let read = |scope: &str, first: u32, last: u32| {
        let (store, scope) = (f.store.clone(), scope.to_owned());
        async move {
            let history = store.spend_history(AGENT, &scope, first, last).await.unwrap();
            (history.total.get(), history.count)
        }
    };
    assert_eq!(read(&payee, first_day, last_day).await, (70_000, 3));
    assert_eq!(read(&payee, first_day + 1, last_day).await, (60_000, 2), "the range bounds the days");
    assert_eq!(read(&travel, first_day, last_day).await, (50_000, 2), "only the payments naming it");
    assert_eq!(read(&category_scope("food"), first_day, last_day).await, (0, 0));
    assert_eq!(read(&payee, last_day + 1, last_day + 30).await, (0, 0));
    // A refused payment adds nothing.
    let input = execution_input("k-history-refused", AGENT, "10000");
    let claim = f.claim(&input, "exec-refused").await.unwrap();
    f.spend(&input, "exec-refused", &claim).await.unwrap();
    f.compensate(&input, "exec-refused", &claim, "ProviderRejected").await.unwrap();
    assert_eq!(read(&payee, first_day, last_day + 1).await, (70_000, 3));
}

async fn trip_counters_are_written_only_over_the_version_read(backend: Backend) {
    use agentpay::trips::TripEvent;
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let fresh = f.store.trip_counters(AGENT).await.unwrap();
    assert_eq!(fresh, Default::default());
    let rejected = |id: &str| TripEvent::ApprovalRejected { reservation_id: id.into() };
    let first = fresh.after(&rejected("res-1"), f.clock.now()).unwrap();
    assert!(f.store.put_trip_counters(AGENT, &first).await.unwrap());
    assert!(!f.store.put_trip_counters(AGENT, &first).await.unwrap(), "a second writer of version 1 loses");
    let flagged = first.after(&TripEvent::DeviationFlagged { reservation_id: "res-2".into() }, f.clock.now()).unwrap();
    assert!(f.store.put_trip_counters(AGENT, &flagged).await.unwrap());
    let stale = first.after(&rejected("res-3"), f.clock.now()).unwrap();
    assert!(!f.store.put_trip_counters(AGENT, &stale).await.unwrap(), "decided on version 1, stored is 2");
    let stored = f.store.trip_counters(AGENT).await.unwrap();
    assert_eq!(stored, flagged);
    assert_eq!((stored.version, stored.rejections.len(), stored.deviation_flags.len()), (2, 1, 1));
    assert_eq!(f.store.trip_counters("another-agent").await.unwrap().version, 0);
}

async fn settlement_reports_move_a_payment_forward_and_never_free_its_budget(backend: Backend) {
    use agentpay::settlement::ReportInput;
    use agentpay::settlements::{SettlementError, Settlements};
    use base64::Engine;
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let settlements = Settlements::new(f.store.clone(), f.clock.clone());
    let tx = format!("0x{}", "ab".repeat(32));
    let report = |value: serde_json::Value| {
        ReportInput::X402V2(base64::engine::general_purpose::STANDARD.encode(value.to_string()))
    };
    let input = execution_input("k-settle", AGENT, "10000");
    let claim = f.claim(&input, "exec-settle").await.unwrap();
    f.pay(&input, "exec-settle", &claim).await.unwrap();
    let paid = f.store.reservation(AGENT, &claim.reservation_id).await.unwrap().unwrap();
    let payer = paid.payer.clone().expect("the wallet that signed is recorded with the authorization");
    let spent = || async { f.store.agent_ledger(AGENT).await.unwrap().window.spent.get() };
    assert_eq!(spent().await, 10_000);

    // Pending with a hash, twice: recorded once.
    let pending = report(serde_json::json!({"success": false, "transaction": tx, "network": "eip155:84532"}));
    let first = settlements.report(AGENT, "k-settle", &pending, "local:agent").await.unwrap();
    assert_eq!((first.status.as_str(), first.already_recorded), ("SETTLEMENT_PENDING", false));
    let again = settlements.report(AGENT, "k-settle", &pending, "local:agent").await.unwrap();
    assert!(again.already_recorded, "a repeated report is a no-op that says so");

    // Another payer, another amount: refused, audited, nothing changed.
    let other_payer = report(
        serde_json::json!({"success": true, "transaction": tx, "payer": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"}),
    );
    let refused = settlements.report(AGENT, "k-settle", &other_payer, "local:agent").await.unwrap_err();
    assert!(matches!(&refused, SettlementError::Mismatch { field, .. } if field == "payer"), "{refused}");
    let other_amount = report(serde_json::json!({"success": true, "transaction": tx, "amount": "9999"}));
    let refused = settlements.report(AGENT, "k-settle", &other_amount, "local:agent").await.unwrap_err();
    assert_eq!(refused.name(), "SettlementMismatch");
    assert!(refused.to_string().contains("amount is 9999 but payment \"k-settle\" authorized 10000"), "{refused}");

    // Settled, by the wallet that signed: final, still counted.
    let settled =
        report(serde_json::json!({"success": true, "transaction": tx, "network": "eip155:84532", "payer": payer}));
    let done = settlements.report(AGENT, "k-settle", &settled, "local:agent").await.unwrap();
    assert_eq!(done.status.as_str(), "SETTLED");
    assert_eq!(spent().await, 10_000, "settled money stays counted");
    // A failure reported afterwards cannot undo it.
    let failed = report(serde_json::json!({"success": false, "transaction": "", "errorReason": "insufficient_funds"}));
    let lie = settlements.report(AGENT, "k-settle", &failed, "local:agent").await.unwrap_err();
    assert_eq!(lie.name(), "SettlementContradicts");
    let stored = f.store.reservation(AGENT, &claim.reservation_id).await.unwrap().unwrap();
    assert_eq!(stored.status.as_str(), "SETTLED");
    assert_eq!(stored.settlement.unwrap().report.transaction.as_deref(), Some(tx.as_str()));
    let audit = f.store.audit_events(AGENT).await.unwrap();
    let kinds: Vec<&str> = audit
        .iter()
        .map(|e| serde_json::to_value(e.kind).unwrap().as_str().unwrap().to_owned())
        .map(|k| Box::leak(k.into_boxed_str()) as &str)
        .collect();
    for (kind, count) in [("AUTHORIZED", 1), ("SETTLEMENT_PENDING", 1), ("SETTLEMENT_REFUSED", 3), ("SETTLED", 1)] {
        assert_eq!(kinds.iter().filter(|k| **k == kind).count(), count, "{kind} in {kinds:?}");
    }

    // A failure on an authorized payment: recorded, still counted (the authorization can
    // still be settled by whoever holds it).
    let input = execution_input("k-settle-failed", AGENT, "20000");
    let claim = f.claim(&input, "exec-settle-failed").await.unwrap();
    f.pay(&input, "exec-settle-failed", &claim).await.unwrap();
    let recorded = settlements.report(AGENT, "k-settle-failed", &failed, "local:agent").await.unwrap();
    assert_eq!(recorded.status.as_str(), "SETTLEMENT_FAILED");
    assert_eq!(spent().await, 30_000);

    // Nothing to settle: an unknown key, a released payment.
    let unknown = settlements.report(AGENT, "k-never", &settled, "local:agent").await.unwrap_err();
    assert_eq!(unknown.name(), "UnknownPayment");
    let input = execution_input("k-settle-released", AGENT, "10000");
    let claim = f.claim(&input, "exec-released").await.unwrap();
    f.spend(&input, "exec-released", &claim).await.unwrap();
    f.compensate(&input, "exec-released", &claim, "ProviderRejected").await.unwrap();
    let released = settlements.report(AGENT, "k-settle-released", &settled, "local:agent").await.unwrap_err();
    assert!(matches!(released, SettlementError::NotAuthorized { status: "RELEASED", .. }), "{released}");
}

async fn only_the_chain_releases_an_expired_authorization(backend: Backend) {
    use agentpay::chain::JsonRpcChain;
    use agentpay::settlement::ReportInput;
    use agentpay::settlements::{NoChain, Settlements};
    use agentpay::store::ReservationStatus::*;
    use base64::Engine;
    let f = Fixture::with_policy(backend, "1.00", "5.00", 10).await;
    let node = crate::chain_emulator::ChainEmulator::start().await;
    let chain = JsonRpcChain::from_list(&format!("eip155:84532={}", node.url)).unwrap();
    let settlements = Settlements::new(f.store.clone(), f.clock.clone());
    let mut reservations = Vec::new();
    for key in ["k-used", "k-unused", "k-silent"] {
        let input = execution_input(key, AGENT, "10000");
        let execution = format!("exec-{key}");
        let claim = f.claim(&input, &execution).await.unwrap();
        f.pay(&input, &execution, &claim).await.unwrap();
        reservations.push(f.store.reservation(AGENT, &claim.reservation_id).await.unwrap().unwrap());
    }
    let used = &reservations[0];
    node.mark_used(used.payer.as_deref().unwrap(), &used.authorization.as_ref().unwrap().nonce);
    let status = |id: String| {
        let store = f.store.clone();
        async move { store.reservation(AGENT, &id).await.unwrap().unwrap().status }
    };
    let spent = || async { f.store.agent_ledger(AGENT).await.unwrap().window.spent.get() };

    // Before validBefore nothing is asked.
    assert!(settlements.check_expired(AGENT, &chain, false).await.unwrap().is_empty());
    assert!(node.calls().is_empty());
    f.clock.advance(Duration::from_secs(2 * 3600));

    // A dry run says what would happen and changes nothing.
    let planned = settlements.check_expired(AGENT, &chain, true).await.unwrap();
    let mut after: Vec<_> = planned.iter().map(|c| (c.idempotency_key.as_str(), c.after)).collect();
    after.sort_by_key(|(key, _)| *key);
    assert_eq!(after, [("k-silent", Voided), ("k-unused", Voided), ("k-used", Settled)]);
    assert_eq!(status(used.id.clone()).await, Authorized);
    assert_eq!(spent().await, 30_000);

    // No chain to ask: expired and unconfirmed, still counted.
    let unasked = settlements.check_expired(AGENT, &NoChain, false).await.unwrap();
    assert!(unasked.iter().all(|c| c.after == ExpiredUnconfirmed), "{unasked:?}");
    assert_eq!(unasked.len(), 3);
    assert!(unasked[0].evidence.contains("no JSON-RPC endpoint for eip155:84532"), "{unasked:?}");
    assert_eq!(spent().await, 30_000, "nothing released without the chain's word");

    // The agent reports failures, the used one among them: reports never release.
    let failed = serde_json::json!({"success": false, "transaction": "", "errorReason": "insufficient_funds"});
    let failed = ReportInput::X402V2(base64::engine::general_purpose::STANDARD.encode(failed.to_string()));
    for key in ["k-used", "k-unused"] {
        let recorded = settlements.report(AGENT, key, &failed, "local:agent").await.unwrap();
        assert_eq!(recorded.status, SettlementFailed);
    }
    assert_eq!(spent().await, 30_000);

    // The chain decides: used is settled whatever was reported; the unused are voided and
    // their budget released.
    let decided = settlements.check_expired(AGENT, &chain, false).await.unwrap();
    assert_eq!(decided.len(), 3, "{decided:?}");
    assert_eq!(status(used.id.clone()).await, Settled);
    assert_eq!(status(reservations[1].id.clone()).await, Voided);
    assert_eq!(status(reservations[2].id.clone()).await, Voided);
    assert_eq!(spent().await, 10_000, "only the used authorization still counts");
    let audit = f.store.audit_events(AGENT).await.unwrap();
    assert_eq!(audit.iter().filter(|e| e.kind == AuditKind::Voided).count(), 2);
    assert!(
        audit.iter().any(|e| e.kind == AuditKind::Settled && e.reason.as_deref().is_some_and(|r| r.contains("used")))
    );
    // Final: a second sweep asks nothing more, and a voided payment takes no report.
    let calls = node.calls().len();
    assert!(settlements.check_expired(AGENT, &chain, false).await.unwrap().is_empty());
    assert_eq!(node.calls().len(), calls);
    let late = settlements.report(AGENT, "k-unused", &failed, "local:agent").await.unwrap_err();
    assert_eq!(late.name(), "NotAuthorized");
}

/// The same execution claiming its key again after its completed record expired holds a new
/// record with the same claim (the id derives from key and execution): its RecordLedger meets
/// the AUTHORIZED reservation and completes the key with that payment, never leaving it
/// IN_PROGRESS.
async fn a_key_held_again_for_a_paid_claim_completes_with_its_payment(backend: Backend) {
    let f = Fixture::with_policy(backend, "1.00", "5.00", 100).await;
    let input = execution_input("conf-late", AGENT, "10000");
    let claim = f.claim(&input, "exec-late").await.unwrap();
    let paid = f.pay(&input, "exec-late", &claim).await.unwrap();
    f.clock.advance(Duration::from_secs(25 * 3600));
    let again = f.claim(&input, "exec-late").await.unwrap();
    assert_eq!((again.outcome, &again.claim_id), (ClaimOutcome::Claimed, &claim.claim_id));
    let held = f.store.idempotency("conf-late", f.clock.now()).await.unwrap().unwrap();
    assert_eq!(held.status, IdempotencyStatus::InProgress);
    let repaid = f.pay(&input, "exec-late", &again).await.unwrap();
    assert_eq!(repaid["paymentId"], paid["paymentId"], "the payment made, not a new one");
    let record = f.store.idempotency("conf-late", f.clock.now()).await.unwrap().unwrap();
    assert_eq!(record.status, IdempotencyStatus::Completed, "{record:?}");
    assert_eq!(record.result.unwrap()["paymentId"], paid["paymentId"]);
    assert_eq!(f.store.reservations(AGENT).await.unwrap().len(), 1);
}
