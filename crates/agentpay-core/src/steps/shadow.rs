//! CheckSpend for an agent in shadow mode: the same decision code over the agent's shadow
//! window, recorded and answered instead of reserved (see `crate::shadow`).

use crate::deviation::{HistoryEntry, day_number, history_scopes};
use crate::error::PaymentError;
use crate::payment::PaymentRequirement;
use crate::policy::{AgentLedger, SpendSnapshot, check_caller, decide};
use crate::request::{PaymentRequest, derived_id};
use crate::shadow::{SHADOW, ShadowDecision, ShadowOutcome};
use crate::store::{AuditEvent, AuditKind, ErrorRecord, ReservationStatus, ReserveOutcome, ShadowCommit};
use crate::window::WindowWrite;

use super::{
    CheckSpendInput, ReservationSummary, Steps, conflict_backoff, superseded, with_deviation, within_velocity,
};

impl Steps {
    /// Decides the payment as enforcing would, on the shadow window, and records the decision,
    /// the shadow charge and the key's SHADOW outcome in one write. Never reserves real budget,
    /// never pauses the agent.
    pub(super) async fn shadow_spend(
        &self,
        input: &CheckSpendInput,
        request: &PaymentRequest,
        payment: &PaymentRequirement,
        mut ledger: AgentLedger,
    ) -> Result<ReservationSummary, PaymentError> {
        let agent = request.agent_id.as_str();
        let reservation_id = &input.claim.reservation_id;
        let fence = input.claim.fence(request.idempotency_key.as_str(), &input.execution_id);
        if let Some(existing) = self.store.reservation(agent, reservation_id).await? {
            return shadow_summary(&existing, request);
        }
        let deviation = self.deviation(agent, &ledger, payment, request.context.category.as_deref()).await?;
        ledger.window = self.store.shadow_window(agent).await?;
        for attempt in 0..self.settings.ledger_attempts {
            let now = self.clock.now();
            let caller = request.caller.as_ref().map(|c| c.arn.as_str());
            let decided = match &ledger.policy {
                Some(policy) => check_caller(agent, policy, caller, self.settings.require_bound_caller),
                None => Ok(()),
            }
            .and_then(|()| decide(agent, &ledger, payment, now))
            .and_then(|decision| with_deviation(decision, deviation.as_ref(), agent, payment))
            .and_then(|decision| within_velocity(decision, &ledger, agent, payment, now));
            let (mut decision, window, snapshot, charged) = match decided {
                Ok(spend) => {
                    let decision = match spend.approval {
                        Some(reason) => ShadowDecision::would_need_approval(reason),
                        None => ShadowDecision::would_pay(),
                    };
                    (decision, Some(spend.write), spend.snapshot, Some(spend.charged))
                }
                Err(denial) if denial.error_name().is_denial() => {
                    (ShadowDecision::would_deny(&denial), None, standing(&ledger, payment, now), None)
                }
                Err(fault) => return Err(fault),
            };
            let usdc = payment.usdc();
            decision.deviation = deviation.as_ref().map(|d| d.describe(usdc.decimals));
            let commit = self.shadow_commit(input, request, payment, &fence, decision, window, snapshot, charged);
            crate::metrics::shadow_decided(commit.record.shadow.as_ref().map_or("", |d| d.verdict.as_str()));
            match self.store.record_shadow(&commit).await? {
                ReserveOutcome::Reserved => return shadow_summary(&commit.record, request),
                ReserveOutcome::AlreadyExists(existing) => return shadow_summary(&existing, request),
                ReserveOutcome::WindowMoved(Some(window)) if window.policy_version == ledger.version => {
                    ledger.window = *window;
                }
                ReserveOutcome::WindowMoved(_) => {
                    conflict_backoff(attempt).await;
                    let fresh = self.store.agent_ledger(agent).await?;
                    ledger = AgentLedger { window: self.store.shadow_window(agent).await?, ..fresh };
                }
                ReserveOutcome::Fenced(holder) => return Err(superseded(&fence, holder)),
            }
        }
        Err(PaymentError::LedgerConflict { agent: agent.to_owned(), attempts: self.settings.ledger_attempts })
    }

    #[allow(clippy::too_many_arguments)]
    fn shadow_commit(
        &self,
        input: &CheckSpendInput,
        request: &PaymentRequest,
        payment: &PaymentRequirement,
        fence: &crate::store::ClaimFence,
        decision: ShadowDecision,
        window: Option<WindowWrite>,
        snapshot: SpendSnapshot,
        charged: Option<crate::window::ChargedAt>,
    ) -> ShadowCommit {
        let now = self.clock.now();
        let reservation_id = input.claim.reservation_id.clone();
        let payee = payment.pay_to.to_checksum(None);
        let outcome = ShadowOutcome {
            outcome: SHADOW.to_owned(),
            decision: decision.clone(),
            idempotency_key: request.idempotency_key.to_string(),
            execution_id: input.execution_id.clone(),
            amount: payment.amount,
            network: payment.network,
            payee: payee.clone(),
            resource: request.resource.clone(),
            decided_at: now,
            from_cache: false,
        };
        // The baseline learns from payments made: a would-be payment, as RecordLedger learns
        // from a paid one (one waiting for a person is not made yet).
        let history = (decision.verdict == crate::shadow::ShadowVerdict::WouldPay).then(|| HistoryEntry {
            scopes: history_scopes(&payee, request.context.category.as_deref()),
            day: day_number(now),
            amount: payment.amount,
        });
        let record = crate::store::Reservation {
            id: reservation_id.clone(),
            agent_id: request.agent_id.to_string(),
            idempotency_key: request.idempotency_key.to_string(),
            attempt: input.claim.attempt,
            execution_id: input.execution_id.clone(),
            status: ReservationStatus::Shadow,
            claim_id: input.claim.claim_id.clone(),
            client_token: input.claim.client_token.clone(),
            amount: payment.amount,
            network: payment.network,
            asset: payment.asset.to_checksum(None),
            pay_to: payee,
            resource: request.resource.clone(),
            snapshot,
            charged,
            payment_id: None,
            approval: None,
            user_id: request.user_id.to_string(),
            context: Some(request.context.clone()),
            payer: None,
            settlement: None,
            authorization: None,
            shadow: Some(decision.clone()),
            created_at: now,
            updated_at: now,
        };
        let audit = AuditEvent {
            event_id: derived_id("evt", &[&reservation_id, "SHADOW"]),
            kind: AuditKind::Shadow,
            error: decision
                .error
                .clone()
                .map(|error| ErrorRecord { error, cause: decision.reason.clone().unwrap_or_default() }),
            reason: Some(decision.describe()),
            ..self.claim_audit(request, &input.execution_id, &input.claim, Some(&record), now)
        };
        ShadowCommit {
            fence: fence.clone(),
            window,
            result: serde_json::to_value(&outcome).unwrap_or_default(),
            record,
            audit,
            history,
            now,
            expires_at: now.plus(self.settings.idempotency_ttl),
        }
    }
}

/// The limits and spend as they stood, for a decision that charged nothing.
fn standing(ledger: &AgentLedger, payment: &PaymentRequirement, now: crate::clock::Timestamp) -> SpendSnapshot {
    let rolled = ledger.window.rolled(now);
    let decimals = payment.usdc().decimals;
    let atomic = |usd: Option<crate::money::UsdAmount>| {
        usd.and_then(|usd| usd.to_atomic(decimals)).unwrap_or(crate::money::AtomicAmount::ZERO)
    };
    let policy = ledger.policy.as_ref();
    SpendSnapshot {
        per_transaction_limit: atomic(policy.map(|p| p.per_transaction_limit_usd)),
        daily_limit: atomic(policy.map(|p| p.daily_limit_usd)),
        max_transactions_per_hour: policy.map_or(0, |p| p.max_transactions_per_hour),
        spent_24h_before: rolled.spent,
        spent_24h_after: rolled.spent,
        transactions_last_hour_before: rolled.count,
    }
}

/// The step's answer for a shadow decision: no reservation to pay, the outcome to end with.
fn shadow_summary(
    record: &crate::store::Reservation,
    request: &PaymentRequest,
) -> Result<ReservationSummary, PaymentError> {
    let Some(decision) = record.shadow.clone() else {
        return Err(PaymentError::LedgerInconsistent(format!(
            "agent {} is in shadow mode but reservation {} is {} with no shadow decision (the mode changed under a retried step)",
            record.agent_id,
            record.id,
            record.status.as_str()
        )));
    };
    let outcome = ShadowOutcome {
        outcome: SHADOW.to_owned(),
        decision,
        idempotency_key: record.idempotency_key.clone(),
        execution_id: record.execution_id.clone(),
        amount: record.amount,
        network: record.network,
        payee: record.pay_to.clone(),
        resource: request.resource.clone(),
        decided_at: record.created_at,
        from_cache: false,
    };
    Ok(ReservationSummary {
        reservation_id: record.id.clone(),
        amount: record.amount,
        remaining_24h: record.snapshot.remaining_24h(),
        snapshot: record.snapshot.clone(),
        approval: crate::approval::ApprovalGate::not_required(),
        shadow: Some(outcome),
    })
}
