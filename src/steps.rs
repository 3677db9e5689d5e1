//! The five workflow steps as plain async functions over the ports.
//!
//! Lambda mains and the local runner both call [`Steps::invoke`], so the same code runs in
//! AWS and on a laptop. Each step parses its input at the edge and fails with a typed,
//! named [`PaymentError`].

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::{Clock, Timestamp};
use crate::error::{InvalidPaymentRequest, PaymentError, is_denial_name};
use crate::money::AtomicAmount;
use crate::policy::{SpendSnapshot, decide, release_from_window};
use crate::provider::{PaymentHeader, PaymentOrder, PaymentProof, PaymentProvider};
use crate::request::{PaymentRequest, derived_id};
use crate::store::{
    AuditEvent, AuditKind, AuthorizationCommit, ErrorRecord, IdempotencyRecord, IdempotencyStatus, ReleaseCommit,
    ReleasedReservation, Reservation, ReservationStatus, ReserveOutcome, Store, Transition,
};
use crate::x402::{Network, PaymentRequirement};

/// The steps, by the names the state machine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepName {
    CheckIdempotency,
    CheckSpend,
    ProcessPayment,
    RecordLedger,
    Compensate,
}

impl StepName {
    pub const ALL: [StepName; 5] =
        [Self::CheckIdempotency, Self::CheckSpend, Self::ProcessPayment, Self::RecordLedger, Self::Compensate];

    /// The crate under `functions/` and the function's name in `template.yaml`.
    pub fn function_name(self) -> &'static str {
        match self {
            Self::CheckIdempotency => "check-idempotency",
            Self::CheckSpend => "check-spend",
            Self::ProcessPayment => "process-payment",
            Self::RecordLedger => "record-ledger",
            Self::Compensate => "compensate",
        }
    }

    /// The `${...}` substitution the ASL uses for the function's ARN.
    pub fn arn_substitution(self) -> &'static str {
        match self {
            Self::CheckIdempotency => "CheckIdempotencyFunctionArn",
            Self::CheckSpend => "CheckSpendFunctionArn",
            Self::ProcessPayment => "ProcessPaymentFunctionArn",
            Self::RecordLedger => "RecordLedgerFunctionArn",
            Self::Compensate => "CompensateFunctionArn",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StepSettings {
    /// How long a claim keeps other executions of the same key away.
    pub lease: Duration,
    /// How long a key's record lives (DynamoDB TTL; compared explicitly, never trusted).
    pub idempotency_ttl: Duration,
    /// Optimistic-lock attempts on the agent item before `LedgerConflict`.
    pub ledger_attempts: u32,
}

impl Default for StepSettings {
    fn default() -> Self {
        Self { lease: Duration::from_secs(300), idempotency_ttl: Duration::from_secs(24 * 3600), ledger_attempts: 8 }
    }
}

#[derive(Clone)]
pub struct Steps {
    store: Arc<dyn Store>,
    provider: Arc<dyn PaymentProvider>,
    clock: Arc<dyn Clock>,
    settings: StepSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClaimOutcome {
    /// This execution owns the key: go on and pay.
    Claimed,
    /// The key completed before: `result` is the cached outcome, nothing is paid again.
    Cached,
}

/// CheckIdempotency's output (`$.idempotency`), handed to every later step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    pub outcome: ClaimOutcome,
    pub attempt: u32,
    pub reservation_id: String,
    /// Passed to the provider: derived from (key, attempt), so retries get the same proof.
    pub client_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment: Option<PaymentRequirement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The provider's settings for this payment (see `PaymentProvider::prepare`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_context: Option<Value>,
}

/// CheckSpend's output (`$.reservation`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReservationSummary {
    pub reservation_id: String,
    pub amount: AtomicAmount,
    pub snapshot: SpendSnapshot,
    pub remaining_24h: AtomicAmount,
}

/// The amount as paid, with enough to read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Money {
    pub value: AtomicAmount,
    pub asset: String,
    pub network: Network,
    pub decimals: u32,
    /// e.g. "0.01 USDC".
    pub display: String,
}

/// The workflow's success output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentOutcome {
    pub payment_id: String,
    pub status: String,
    pub amount: Money,
    pub payee: String,
    pub resource: String,
    pub from_cache: bool,
    /// The header the agent sends with its retried request.
    pub header: PaymentHeader,
    pub idempotency_key: String,
    pub execution_id: String,
    pub authorized_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_before: Option<Timestamp>,
}

/// Compensate's output (`$.compensation`); the Fail state reads `error` and `cause`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Compensation {
    pub error: String,
    pub cause: String,
    pub reservation_id: String,
    /// A reservation was released by this call.
    pub released: bool,
    pub idempotency_status: IdempotencyStatus,
    /// Everything had been compensated before: nothing was written.
    pub already_compensated: bool,
}

/// An error as Step Functions hands it to a Catch: `{"Error": ..., "Cause": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaughtError {
    #[serde(rename = "Error")]
    pub error: String,
    #[serde(rename = "Cause", default)]
    pub cause: String,
}

impl CaughtError {
    /// A Lambda error's Cause is JSON (`errorMessage`, `errorType`, ...): show the message.
    pub fn message(&self) -> String {
        serde_json::from_str::<Value>(&self.cause)
            .ok()
            .and_then(|v| v.get("errorMessage").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| self.cause.clone())
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckIdempotencyInput {
    pub request: Value,
    pub execution_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckSpendInput {
    pub request: Value,
    pub execution_id: String,
    pub claim: Claim,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessPaymentInput {
    pub request: Value,
    pub execution_id: String,
    pub claim: Claim,
    pub reservation: ReservationSummary,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecordLedgerInput {
    pub request: Value,
    pub execution_id: String,
    pub claim: Claim,
    pub reservation: ReservationSummary,
    pub proof: PaymentProof,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompensateInput {
    pub request: Value,
    pub execution_id: String,
    pub claim: Claim,
    pub error: CaughtError,
}

fn parse_input<T: DeserializeOwned>(step: StepName, input: Value) -> Result<T, PaymentError> {
    serde_json::from_value(input).map_err(|e| {
        InvalidPaymentRequest::field(
            format!("{} input", step.function_name()),
            e.to_string(),
            "the input the state machine passes this step (see events/ for samples)",
        )
        .into()
    })
}

fn to_output<T: Serialize>(value: &T) -> Result<Value, PaymentError> {
    serde_json::to_value(value).map_err(|e| PaymentError::LedgerInconsistent(format!("cannot serialise output: {e}")))
}

fn claimed_payment(claim: &Claim) -> Result<&PaymentRequirement, PaymentError> {
    claim.payment.as_ref().ok_or_else(|| {
        InvalidPaymentRequest::field(
            "claim.payment",
            "nothing",
            "the payment CheckIdempotency selected (outcome CLAIMED)",
        )
        .into()
    })
}

/// Bounded, jittered backoff between optimistic-lock attempts.
async fn conflict_backoff(attempt: u32) {
    let cap_ms = 5u64 << attempt.min(6);
    tokio::time::sleep(Duration::from_millis(rand::random_range(1..=cap_ms))).await;
}

impl Steps {
    pub fn new(
        store: Arc<dyn Store>,
        provider: Arc<dyn PaymentProvider>,
        clock: Arc<dyn Clock>,
        settings: StepSettings,
    ) -> Self {
        Self { store, provider, clock, settings }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Runs one step on its JSON input: what a Lambda handler and a local Task do.
    pub async fn invoke(&self, step: StepName, input: Value) -> Result<Value, PaymentError> {
        match step {
            StepName::CheckIdempotency => to_output(&self.check_idempotency(parse_input(step, input)?).await?),
            StepName::CheckSpend => to_output(&self.check_spend(parse_input(step, input)?).await?),
            StepName::ProcessPayment => to_output(&self.process_payment(parse_input(step, input)?).await?),
            StepName::RecordLedger => to_output(&self.record_ledger(parse_input(step, input)?).await?),
            StepName::Compensate => to_output(&self.compensate(parse_input(step, input)?).await?),
        }
    }

    /// Validates the request and claims its idempotency key.
    pub async fn check_idempotency(&self, input: CheckIdempotencyInput) -> Result<Claim, PaymentError> {
        let request = PaymentRequest::parse(&input.request)?;
        let agent = request.agent_id.as_str();
        let ledger = self.store.agent_ledger(agent).await?;
        let Some(policy) = &ledger.policy else {
            return Err(PaymentError::PolicyDenied {
                agent: agent.to_owned(),
                reason: format!(
                    "no spend policy is set for this agent; set one with `agentpay policy set {agent} ...`"
                ),
            });
        };
        let payment = request.select_payment(&policy.allowlist(), agent)?;
        let provider_context = self.provider.prepare(&request, policy, &payment)?;

        let key = request.idempotency_key.as_str();
        let now = self.clock.now();
        let fresh = IdempotencyRecord {
            key: key.to_owned(),
            fingerprint: request.fingerprint().to_owned(),
            status: IdempotencyStatus::InProgress,
            attempt: 1,
            execution_id: input.execution_id.clone(),
            lease_expires_at: now.plus(self.settings.lease),
            result: None,
            error: None,
            created_at: now,
            updated_at: now,
            expires_at: now.plus(self.settings.idempotency_ttl),
        };
        let claimed = |attempt: u32| Claim {
            outcome: ClaimOutcome::Claimed,
            attempt,
            reservation_id: derived_id("res", &[key, &attempt.to_string()]),
            client_token: derived_id("agentpay", &[key, &attempt.to_string()]),
            payment: Some(payment.clone()),
            result: None,
            provider_context: provider_context.clone(),
        };

        let mut blocking = self.store.insert_idempotency(&fresh).await?;
        // Each round either claims, answers, or loses a race to a writer that changed the record.
        for _ in 0..4 {
            let Some(current) = blocking else {
                return Ok(claimed(fresh.attempt));
            };
            if current.fingerprint != fresh.fingerprint {
                return Err(PaymentError::IdempotencyKeyReused {
                    key: key.to_owned(),
                    stored: current.fingerprint,
                    received: fresh.fingerprint,
                });
            }
            let reclaim_attempt = match current.status {
                IdempotencyStatus::Completed => {
                    let mut result = current.result.clone().ok_or_else(|| {
                        PaymentError::LedgerInconsistent(format!("key {key:?} is COMPLETED without a result"))
                    })?;
                    result["fromCache"] = Value::Bool(true);
                    return Ok(Claim {
                        outcome: ClaimOutcome::Cached,
                        payment: None,
                        result: Some(result),
                        provider_context: None,
                        ..claimed(current.attempt)
                    });
                }
                // A retried or redriven step of the execution that holds the claim.
                IdempotencyStatus::InProgress if current.execution_id == input.execution_id => {
                    return Ok(claimed(current.attempt));
                }
                IdempotencyStatus::InProgress if current.lease_expires_at > now => {
                    return Err(PaymentError::PaymentInFlight {
                        key: key.to_owned(),
                        execution_id: current.execution_id,
                        lease_expires_at: current.lease_expires_at.to_rfc3339(),
                    });
                }
                // The holder stopped renewing: adopt its attempt, so its reservation and
                // client token (and any proof already issued) are reused, not duplicated.
                IdempotencyStatus::InProgress => current.attempt,
                IdempotencyStatus::Failed | IdempotencyStatus::Denied => current.attempt + 1,
            };
            let reclaimed =
                IdempotencyRecord { attempt: reclaim_attempt, created_at: current.created_at, ..fresh.clone() };
            blocking = match self.store.replace_idempotency(&current, &reclaimed).await? {
                None => return Ok(claimed(reclaim_attempt)),
                Some(Some(changed)) => Some(changed),
                Some(None) => self.store.insert_idempotency(&fresh).await?,
            };
        }
        Err(PaymentError::PaymentInFlight {
            key: key.to_owned(),
            execution_id: "(contended)".into(),
            lease_expires_at: now.plus(self.settings.lease).to_rfc3339(),
        })
    }

    /// Evaluates the agent's policy and reserves the amount in one atomic write.
    pub async fn check_spend(&self, input: CheckSpendInput) -> Result<ReservationSummary, PaymentError> {
        let request = PaymentRequest::parse(&input.request)?;
        let payment = claimed_payment(&input.claim)?;
        let agent = request.agent_id.as_str();
        let reservation_id = &input.claim.reservation_id;
        for attempt in 0..self.settings.ledger_attempts {
            let ledger = self.store.agent_ledger(agent).await?;
            let now = self.clock.now();
            let decision = match decide(agent, &ledger, payment, now) {
                Ok(decision) => decision,
                Err(denial) => {
                    // A retried step whose reservation already counts against the cap.
                    if let Some(existing) = self.store.reservation(agent, reservation_id).await? {
                        return existing_reservation(existing);
                    }
                    return Err(denial);
                }
            };
            let reservation = Reservation {
                id: reservation_id.clone(),
                agent_id: agent.to_owned(),
                idempotency_key: request.idempotency_key.to_string(),
                attempt: input.claim.attempt,
                execution_id: input.execution_id.clone(),
                status: ReservationStatus::Reserved,
                amount: payment.amount,
                network: payment.network,
                asset: payment.asset.to_checksum(None),
                pay_to: payment.pay_to.to_checksum(None),
                resource: request.resource.clone(),
                snapshot: decision.snapshot,
                payment_id: None,
                created_at: now,
                updated_at: now,
            };
            match self.store.reserve(ledger.version, &decision.window, &reservation).await? {
                ReserveOutcome::Reserved => return Ok(summary(&reservation)),
                ReserveOutcome::AlreadyExists(existing) => return existing_reservation(*existing),
                ReserveOutcome::VersionConflict => conflict_backoff(attempt).await,
            }
        }
        Err(PaymentError::LedgerConflict { agent: agent.to_owned(), attempts: self.settings.ledger_attempts })
    }

    /// Obtains the payment proof from the provider.
    pub async fn process_payment(&self, input: ProcessPaymentInput) -> Result<PaymentProof, PaymentError> {
        let request = PaymentRequest::parse(&input.request)?;
        let requirement = claimed_payment(&input.claim)?.clone();
        if input.reservation.amount != requirement.amount {
            return Err(PaymentError::LedgerInconsistent(format!(
                "reservation {} holds {} but the payment is {}",
                input.reservation.reservation_id, input.reservation.amount, requirement.amount
            )));
        }
        let order = PaymentOrder {
            client_token: input.claim.client_token.clone(),
            requirement,
            request,
            context: input.claim.provider_context.clone(),
        };
        let proof = self.provider.process_payment(&order).await?;
        let provider = self.provider.name();
        if proof.status != "PROOF_GENERATED" {
            return Err(PaymentError::ProviderRejected {
                provider,
                message: format!("status {:?}, expected PROOF_GENERATED", proof.status),
            });
        }
        if proof.payment_id.is_empty() || proof.header.value.is_empty() {
            return Err(PaymentError::ProviderRejected {
                provider,
                message: "empty payment id or payment header in the response".into(),
            });
        }
        Ok(proof)
    }

    /// Moves the reservation to AUTHORIZED, writes the audit event and completes the key.
    pub async fn record_ledger(&self, input: RecordLedgerInput) -> Result<PaymentOutcome, PaymentError> {
        let request = PaymentRequest::parse(&input.request)?;
        let payment = claimed_payment(&input.claim)?;
        let now = self.clock.now();
        let usdc = payment.usdc();
        let outcome = PaymentOutcome {
            payment_id: input.proof.payment_id.clone(),
            status: "AUTHORIZED".into(),
            amount: Money {
                value: payment.amount,
                asset: payment.asset.to_checksum(None),
                network: payment.network,
                decimals: usdc.decimals,
                display: format!("{} USDC", payment.amount.display_with_decimals(usdc.decimals)),
            },
            payee: payment.pay_to.to_checksum(None),
            resource: request.resource.clone(),
            from_cache: false,
            header: input.proof.header.clone(),
            idempotency_key: request.idempotency_key.to_string(),
            execution_id: input.execution_id.clone(),
            authorized_at: now,
            valid_before: input.proof.valid_before,
        };
        let audit = AuditEvent {
            event_id: derived_id("evt", &[&input.reservation.reservation_id, "AUTHORIZED"]),
            kind: AuditKind::Authorized,
            agent_id: request.agent_id.to_string(),
            user_id: request.user_id.to_string(),
            at: now,
            idempotency_key: request.idempotency_key.to_string(),
            execution_id: input.execution_id.clone(),
            reservation_id: Some(input.reservation.reservation_id.clone()),
            amount: Some(payment.amount),
            network: Some(payment.network),
            asset: Some(outcome.amount.asset.clone()),
            payee: Some(outcome.payee.clone()),
            resource: request.resource.clone(),
            context: request.context.clone(),
            limits: Some(input.reservation.snapshot.clone()),
            payment_id: Some(outcome.payment_id.clone()),
            error: None,
        };
        let commit = AuthorizationCommit {
            reservation_id: input.reservation.reservation_id.clone(),
            payment_id: outcome.payment_id.clone(),
            idempotency_key: request.idempotency_key.to_string(),
            attempt: input.claim.attempt,
            result: to_output(&outcome)?,
            audit,
            now,
        };
        match self.store.authorize(&commit).await? {
            Transition::Applied => Ok(outcome),
            Transition::AlreadyApplied => {
                // Recorded by an earlier try: answer with what was stored.
                match self.store.idempotency(&commit.idempotency_key, now).await? {
                    Some(IdempotencyRecord { result: Some(stored), .. }) => serde_json::from_value(stored)
                        .map_err(|e| PaymentError::LedgerInconsistent(format!("stored result unreadable: {e}"))),
                    _ => Ok(outcome),
                }
            }
            Transition::Refused(why) => Err(PaymentError::LedgerInconsistent(format!(
                "cannot record payment {} for key {:?}: {why}",
                commit.payment_id, commit.idempotency_key
            ))),
            Transition::VersionConflict => {
                Err(PaymentError::LedgerConflict { agent: request.agent_id.to_string(), attempts: 1 })
            }
        }
    }

    /// Releases the reservation (if any), marks the key FAILED or DENIED, audits. Idempotent.
    pub async fn compensate(&self, input: CompensateInput) -> Result<Compensation, PaymentError> {
        let request = PaymentRequest::parse(&input.request)?;
        let agent = request.agent_id.as_str();
        let reservation_id = input.claim.reservation_id.clone();
        let denied = is_denial_name(&input.error.error);
        let status = if denied { IdempotencyStatus::Denied } else { IdempotencyStatus::Failed };
        let error = ErrorRecord { error: input.error.error.clone(), cause: input.error.message() };

        for attempt in 0..self.settings.ledger_attempts {
            let now = self.clock.now();
            let reservation = self.store.reservation(agent, &reservation_id).await?;
            let release = match &reservation {
                Some(r) if r.status == ReservationStatus::Reserved => {
                    let ledger = self.store.agent_ledger(agent).await?;
                    let window = release_from_window(ledger.window, r.amount, r.created_at);
                    Some(ReleasedReservation { id: r.id.clone(), expected_version: ledger.version, window })
                }
                Some(r) if r.status != ReservationStatus::Released => {
                    return Err(PaymentError::LedgerInconsistent(format!(
                        "reservation {} is {}: a payment proof exists, so it is not released; record it with a redrive of RecordLedger",
                        r.id,
                        r.status.as_str()
                    )));
                }
                _ => None,
            };
            let releasing = release.is_some();
            let audit = AuditEvent {
                event_id: derived_id("evt", &[&reservation_id, if releasing { "RELEASED" } else { status.as_str() }]),
                kind: if releasing {
                    AuditKind::Released
                } else if denied {
                    AuditKind::Denied
                } else {
                    AuditKind::Released
                },
                agent_id: agent.to_owned(),
                user_id: request.user_id.to_string(),
                at: now,
                idempotency_key: request.idempotency_key.to_string(),
                execution_id: input.execution_id.clone(),
                reservation_id: reservation.as_ref().map(|r| r.id.clone()),
                amount: reservation.as_ref().map(|r| r.amount).or(input.claim.payment.as_ref().map(|p| p.amount)),
                network: input.claim.payment.as_ref().map(|p| p.network),
                asset: input.claim.payment.as_ref().map(|p| p.asset.to_checksum(None)),
                payee: input.claim.payment.as_ref().map(|p| p.pay_to.to_checksum(None)),
                resource: request.resource.clone(),
                context: request.context.clone(),
                limits: reservation.as_ref().map(|r| r.snapshot.clone()),
                payment_id: None,
                error: Some(error.clone()),
            };
            let commit = ReleaseCommit {
                agent_id: agent.to_owned(),
                reservation: release,
                idempotency_key: request.idempotency_key.to_string(),
                attempt: input.claim.attempt,
                status,
                error: error.clone(),
                audit,
                now,
            };
            let compensation = |already_compensated: bool| Compensation {
                error: error.error.clone(),
                cause: error.cause.clone(),
                reservation_id: reservation_id.clone(),
                released: releasing && !already_compensated,
                idempotency_status: status,
                already_compensated,
            };
            match self.store.release(&commit).await? {
                Transition::Applied => return Ok(compensation(false)),
                Transition::AlreadyApplied => return Ok(compensation(true)),
                Transition::VersionConflict => conflict_backoff(attempt).await,
                Transition::Refused(why) => return Err(PaymentError::LedgerInconsistent(why)),
            }
        }
        Err(PaymentError::LedgerConflict { agent: agent.to_owned(), attempts: self.settings.ledger_attempts })
    }
}

fn summary(reservation: &Reservation) -> ReservationSummary {
    ReservationSummary {
        reservation_id: reservation.id.clone(),
        amount: reservation.amount,
        remaining_24h: reservation.snapshot.remaining_24h(),
        snapshot: reservation.snapshot.clone(),
    }
}

fn existing_reservation(existing: Reservation) -> Result<ReservationSummary, PaymentError> {
    match existing.status {
        ReservationStatus::Reserved | ReservationStatus::Authorized | ReservationStatus::Settled => {
            Ok(summary(&existing))
        }
        ReservationStatus::Released => Err(PaymentError::LedgerInconsistent(format!(
            "reservation {} was already released by compensation; start a new execution to pay again",
            existing.id
        ))),
    }
}
