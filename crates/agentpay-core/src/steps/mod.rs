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

use crate::approval::{ApprovalGate, PaymentSummary, approval_id};
use crate::asl::runner::{TaskFailure, TaskHandler};
use crate::clock::{Clock, Timestamp};
use crate::deviation::{Deviation, DeviationAction, HistoryEntry, day_number, history_scopes};
use crate::error::{InvalidPaymentRequest, PaymentError, is_denial_name};
use crate::money::AtomicAmount;
use crate::payment::PaymentHeader;
use crate::payment::{Network, PaymentRequirement};
use crate::policy::{SpendDecision, SpendSnapshot, check_caller, decide};
use crate::provider::{PaymentOrder, PaymentProof, PaymentProvider};
use crate::request::{PaymentRequest, derived_id};
use crate::store::{ApprovalNeed, ApprovalRecord, ApprovalRequestCommit, ApprovalStatus, ClaimFence, HoldCommit};
use crate::store::{
    AuditEvent, AuditKind, AuthorizationCommit, ErrorRecord, IdempotencyRecord, IdempotencyStatus, PolicyChange,
    PolicyEdit, PolicyEdited, ReleaseCommit, ReleasedReservation, Reservation, ReservationStatus, ReserveOutcome,
    Store, Transition,
};
use crate::trips::{AutoPausePolicy, TRIPPED_BY, TripEvent, velocity_trip};
use crate::window::WindowWrite;

mod shadow;
pub use crate::workflow::StepName;

#[derive(Debug, Clone)]
pub struct StepSettings {
    /// How long a claim keeps other executions of the same key away. It covers the longest
    /// time one run of the state machine can hold a claim (every Task's TimeoutSeconds times
    /// its attempts, plus the retry waits: a test computes that bound from the ASL), so a key
    /// is taken over only from an execution that has stopped. Safety rests on it in one place
    /// only: between ProcessPayment's check that its claim is still held and its provider
    /// call, which is one invocation (Lambda ends one after at most 15 minutes; ours after
    /// 30 s), shorter than the lease. Everywhere else an execution that outlives its lease
    /// is harmless: every write is fenced by the holding execution, ProcessPayment refuses
    /// to pay for a claim it no longer holds, and a takeover keeps the client token.
    pub lease: Duration,
    /// How long a finished key's record lives (DynamoDB TTL; compared explicitly, never
    /// trusted). An unfinished (IN_PROGRESS) record never expires: a redrive of RecordLedger
    /// on day 13, or a replay of a held key a month later, still finds its claim.
    pub idempotency_ttl: Duration,
    /// Optimistic-lock attempts on the agent item before `LedgerConflict`.
    pub ledger_attempts: u32,
    /// Refuse an agent with no IAM principal bound (the deployed functions do; locally, with
    /// no entry point, an agent without principals pays for whoever runs the CLI).
    pub require_bound_caller: bool,
    /// How long a payment waits for a person (the callback task's time-out; the claim's lease
    /// is extended over it).
    pub approval_timeout: Duration,
}

/// Step Functions' task tokens are at most 2,048 characters (SendTaskSuccess's limit).
const MAX_TASK_TOKEN_LEN: usize = 2048;

/// The default lease: above the longest hold the ASL allows (see [`StepSettings::lease`]).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(20 * 60);

impl Default for StepSettings {
    fn default() -> Self {
        Self {
            lease: DEFAULT_LEASE,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            ledger_attempts: 8,
            require_bound_caller: false,
            approval_timeout: Duration::from_secs(crate::approval::DEFAULT_TIMEOUT_SECONDS),
        }
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
    /// The key record's lifetime id (see `IdempotencyRecord::claim_id`).
    #[serde(default)]
    pub claim_id: String,
    pub attempt: u32,
    pub reservation_id: String,
    /// Passed to the provider: derived from (key, claim id, attempt), so retries and
    /// takeovers get the same proof, and a key reused after its record expired a new one.
    pub client_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment: Option<PaymentRequirement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The provider's settings for this payment (see `PaymentProvider::prepare`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_context: Option<Value>,
    /// Taken over from an execution that held the key before: that execution may have called
    /// the provider with this client token already.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopted: bool,
}

/// CheckSpend's output (`$.reservation`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReservationSummary {
    pub reservation_id: String,
    pub amount: AtomicAmount,
    pub snapshot: SpendSnapshot,
    pub remaining_24h: AtomicAmount,
    /// Whether the payment waits for a person first (the state machine's Choice reads it).
    #[serde(default)]
    pub approval: ApprovalGate,
    /// Shadow mode: the decision, recorded; the execution ends with it (the state machine's
    /// Choice reads it), and nothing is paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<crate::shadow::ShadowOutcome>,
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

/// Compensate's output (`$.compensation`, or `$.hold` after an unknown outcome); the Fail
/// state reads `error` and `cause`.
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
    /// The outcome was unknown: the reservation stays counted and the claim keeps its token.
    #[serde(default)]
    pub held: bool,
}

/// What Compensate is asked to do with the caught error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CompensationMode {
    /// Nothing was issued (a failure before ProcessPayment, or a definite refusal): release.
    #[default]
    Release,
    /// ProcessPayment's outcome is unknown: keep the reservation and the claim, end the lease.
    HoldUnknown,
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
    /// `$$.State.RetryCount`: above 0, an earlier attempt may have reached the provider.
    #[serde(default)]
    pub retry_count: u32,
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

/// The callback task's payload (`AwaitApproval`): the task token to wait on.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestApprovalInput {
    pub task_token: String,
    pub request: Value,
    pub execution_id: String,
    pub claim: Claim,
    pub reservation: ReservationSummary,
}

/// RequestApproval's answer (Step Functions ignores it: the task waits for its token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequested {
    pub approval_id: String,
    pub expires_at: Timestamp,
    /// The request was recorded before (a retried invocation with the same token).
    pub already_requested: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompensateInput {
    pub request: Value,
    pub execution_id: String,
    pub claim: Claim,
    pub error: CaughtError,
    #[serde(default)]
    pub mode: CompensationMode,
    /// `$$.State.EnteredTime`: one audit event per entry into the state, however often the
    /// Lambda is retried within it.
    #[serde(default)]
    pub entered_at: Option<String>,
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

impl Claim {
    /// The fence every write for this claim carries.
    pub fn fence(&self, key: &str, execution_id: &str) -> ClaimFence {
        ClaimFence {
            key: key.to_owned(),
            claim_id: self.claim_id.clone(),
            attempt: self.attempt,
            execution_id: execution_id.to_owned(),
        }
    }
}

/// Reservation id and client token of one claim lifetime and attempt. Records written before
/// claim ids existed keep their (key, attempt) derivation, so their in-flight claims resume.
pub(crate) fn claim_ids(key: &str, claim_id: &str, attempt: u32) -> (String, String) {
    let attempt = attempt.to_string();
    let parts: Vec<&str> = if claim_id.is_empty() { vec![key, &attempt] } else { vec![key, claim_id, &attempt] };
    (derived_id("res", &parts), derived_id("agentpay", &parts))
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

    /// Runs one step on its JSON input, as a Lambda handler (or a local invocation of one)
    /// does: its output leaves the process, so every write the step made is durable first.
    pub async fn invoke(&self, step: StepName, input: Value) -> Result<Value, PaymentError> {
        let output = self.run(step, input).await;
        self.store.durable().await?;
        output
    }

    /// Runs one step for the in-process runner, which keeps the output in the process until
    /// the execution's end is committed (a waited write), so it does not wait here.
    async fn run(&self, step: StepName, input: Value) -> Result<Value, PaymentError> {
        match step {
            StepName::CheckIdempotency => to_output(&self.check_idempotency(parse_input(step, input)?).await?),
            StepName::CheckSpend => to_output(&self.check_spend(parse_input(step, input)?).await?),
            StepName::ProcessPayment => to_output(&self.process_payment(parse_input(step, input)?).await?),
            StepName::RecordLedger => to_output(&self.record_ledger(parse_input(step, input)?).await?),
            StepName::Compensate => to_output(&self.compensate(parse_input(step, input)?).await?),
            StepName::RequestApproval => to_output(&self.request_approval(parse_input(step, input)?).await?),
        }
    }

    /// Validates the request and claims its idempotency key. A key that completed answers
    /// from its cache first: a policy edited since cannot turn a paid key into a denial.
    pub async fn check_idempotency(&self, input: CheckIdempotencyInput) -> Result<Claim, PaymentError> {
        let request = PaymentRequest::parse(&input.request)?;
        let agent = request.agent_id.as_str();
        let key = request.idempotency_key.as_str();
        let now = self.clock.now();
        let (ledger, existing) = self.store.agent_and_key(agent, key, now).await?;
        if let Some(record) = &existing {
            if record.fingerprint != request.fingerprint() {
                return Err(key_reused(key, record, &request));
            }
            if record.status == IdempotencyStatus::Completed {
                return cached(key, record);
            }
        }
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

        let fresh = IdempotencyRecord {
            key: key.to_owned(),
            fingerprint: request.fingerprint().to_owned(),
            status: IdempotencyStatus::InProgress,
            // New per record lifetime: a record is created by a new execution, and Step
            // Functions never reuses an execution id within the 90 days a name stays taken
            // (longer than any record lives). Derived, not random, so a retried
            // CheckIdempotency and a seeded simulation give the same id, and the sample events
            // of the steps can be invoked one after another. The same execution creating a
            // second record (a late step after its own completed record expired) meets its
            // earlier payment: RecordLedger completes the key with it (see `Store::authorize`).
            claim_id: derived_id("claim", &[key, &input.execution_id]),
            attempt: 1,
            execution_id: input.execution_id.clone(),
            lease_expires_at: now.plus(self.settings.lease),
            result: None,
            error: None,
            created_at: now,
            updated_at: now,
            // Not enforced while IN_PROGRESS (see `IdempotencyRecord::is_expired`).
            expires_at: now.plus(self.settings.idempotency_ttl),
        };
        let claimed = |record: &IdempotencyRecord, adopted: bool| {
            let (reservation_id, client_token) = claim_ids(key, &record.claim_id, record.attempt);
            Claim {
                outcome: ClaimOutcome::Claimed,
                claim_id: record.claim_id.clone(),
                attempt: record.attempt,
                reservation_id,
                client_token,
                payment: Some(payment.clone()),
                result: None,
                provider_context: provider_context.clone(),
                adopted,
            }
        };

        let mut blocking = match existing {
            Some(record) => Some(record),
            None => self.store.insert_idempotency(&fresh).await?,
        };
        // Each round either claims, answers, or loses a race to a writer that changed the record.
        for _ in 0..4 {
            let Some(current) = blocking else {
                return Ok(claimed(&fresh, false));
            };
            if current.fingerprint != fresh.fingerprint {
                return Err(key_reused(key, &current, &request));
            }
            let attempt = match current.status {
                IdempotencyStatus::Completed => return cached(key, &current),
                // A retried or redriven step of the execution that holds the claim.
                IdempotencyStatus::InProgress if current.execution_id == input.execution_id => {
                    // Whether it had adopted the claim is not recorded: assume it did.
                    return Ok(claimed(&current, current.created_at != current.updated_at));
                }
                IdempotencyStatus::InProgress if current.lease_expires_at > now => {
                    return Err(PaymentError::PaymentInFlight {
                        key: key.to_owned(),
                        execution_id: current.execution_id,
                        lease_expires_at: current.lease_expires_at.to_rfc3339(),
                    });
                }
                // The holder stopped (or held an unknown outcome): adopt its claim and attempt,
                // so its reservation and client token (and any proof already issued) are
                // reused, not duplicated. The new execution id fences the old holder out.
                IdempotencyStatus::InProgress => current.attempt,
                // A definite refusal came first: a new attempt may pay.
                IdempotencyStatus::Failed | IdempotencyStatus::Denied => current.attempt + 1,
            };
            let reclaimed = IdempotencyRecord {
                claim_id: current.claim_id.clone(),
                attempt,
                created_at: current.created_at,
                result: None,
                error: None,
                ..fresh.clone()
            };
            let adopted = current.status == IdempotencyStatus::InProgress;
            blocking = match self.store.replace_idempotency(&current, &reclaimed).await? {
                None => return Ok(claimed(&reclaimed, adopted)),
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
        let fence = input.claim.fence(request.idempotency_key.as_str(), &input.execution_id);
        let mut ledger = self.store.agent_ledger(agent).await?;
        if ledger.policy.as_ref().is_some_and(|p| p.mode == crate::policy::PolicyMode::Shadow) {
            return self.shadow_spend(&input, &request, payment, ledger).await;
        }
        // Read once: the history moves only with authorizations, and a payment decided on a
        // history a moment old is still decided on the agent's habits.
        let deviation = self.deviation(agent, &ledger, payment, request.context.category.as_deref()).await?;
        // A paused agent is denied below; counting its flags would trip (and alarm) again.
        let tripped = match ledger.paused() {
            true => None,
            false => self.deviation_trip(agent, &ledger, deviation.as_ref(), reservation_id).await?,
        };
        if let Some(reason) = tripped {
            if let Some(existing) = self.store.reservation(agent, reservation_id).await? {
                return self.existing_reservation(existing, &fence, &request).await;
            }
            self.trip(agent, &reason).await?;
            return Err(PaymentError::KillSwitchTripped { agent: agent.to_owned(), reason });
        }
        for attempt in 0..self.settings.ledger_attempts {
            let now = self.clock.now();
            let checked = match &ledger.policy {
                Some(policy) => {
                    let caller = request.caller.as_ref().map(|c| c.arn.as_str());
                    check_caller(agent, policy, caller, self.settings.require_bound_caller)
                }
                None => Ok(()),
            };
            let decided = checked
                .and_then(|()| decide(agent, &ledger, payment, now))
                .and_then(|decision| with_deviation(decision, deviation.as_ref(), agent, payment))
                .and_then(|decision| within_velocity(decision, &ledger, agent, payment, now));
            let decision = match decided {
                Ok(decision) => decision,
                Err(denial) => {
                    // A retried step whose reservation already counts against the cap.
                    if let Some(existing) = self.store.reservation(agent, reservation_id).await? {
                        return self.existing_reservation(existing, &fence, &request).await;
                    }
                    if let PaymentError::KillSwitchTripped { reason, .. } = &denial {
                        self.trip(agent, reason).await?;
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
                claim_id: input.claim.claim_id.clone(),
                client_token: input.claim.client_token.clone(),
                amount: payment.amount,
                network: payment.network,
                asset: payment.asset.to_checksum(None),
                pay_to: payment.pay_to.to_checksum(None),
                resource: request.resource.clone(),
                snapshot: decision.snapshot,
                charged: Some(decision.charged),
                payment_id: None,
                approval: decision
                    .approval
                    .map(|reason| ApprovalNeed { reason, timeout_seconds: self.settings.approval_timeout.as_secs() }),
                user_id: request.user_id.to_string(),
                context: Some(request.context.clone()),
                payer: None,
                settlement: None,
                authorization: None,
                shadow: None,
                created_at: now,
                updated_at: now,
            };
            match self.store.reserve(&decision.write, &reservation, &fence).await? {
                ReserveOutcome::Reserved => return Ok(summary(&reservation, &request)),
                ReserveOutcome::AlreadyExists(existing) => {
                    return self.existing_reservation(*existing, &fence, &request).await;
                }
                // Decide again on the window as it stands; its policy version says whether
                // the policy read is still the one in force.
                ReserveOutcome::WindowMoved(Some(window)) if window.policy_version == ledger.version => {
                    crate::metrics::window_moved();
                    ledger.window = *window;
                }
                ReserveOutcome::WindowMoved(_) => {
                    crate::metrics::window_moved();
                    conflict_backoff(attempt).await;
                    ledger = self.store.agent_ledger(agent).await?;
                }
                ReserveOutcome::Fenced(holder) => {
                    crate::metrics::claim_superseded();
                    return Err(superseded(&fence, holder));
                }
            }
        }
        Err(PaymentError::LedgerConflict { agent: agent.to_owned(), attempts: self.settings.ledger_attempts })
    }

    /// Whether the payment deviates from the agent's history, per its policy (None: no
    /// deviation policy, too little history, or within the multiple).
    async fn deviation(
        &self,
        agent: &str,
        ledger: &crate::policy::AgentLedger,
        payment: &PaymentRequirement,
        category: Option<&str>,
    ) -> Result<Option<Deviation>, PaymentError> {
        let Some(policy) = ledger.policy.as_ref().and_then(|p| p.deviation.as_ref()) else {
            return Ok(None);
        };
        let scope = crate::deviation::checked_scope(policy, &payment.pay_to.to_checksum(None), category);
        let (first, last) = crate::deviation::lookback(policy, self.clock.now());
        let history = self.store.spend_history(agent, &scope, first, last).await?;
        let found = crate::deviation::check(policy, scope, history, payment.amount);
        if found.is_some() {
            crate::metrics::deviation_flagged(agent);
        }
        Ok(found)
    }

    /// Counts a deviation flag where the policy trips on them; why the agent trips, if it does.
    async fn deviation_trip(
        &self,
        agent: &str,
        ledger: &crate::policy::AgentLedger,
        deviation: Option<&Deviation>,
        reservation_id: &str,
    ) -> Result<Option<String>, PaymentError> {
        let auto = ledger.policy.as_ref().and_then(|p| p.auto_pause.as_ref());
        match (deviation, auto) {
            (Some(_), Some(auto)) if auto.deviation_flags_per_hour.is_some() => {
                let event = TripEvent::DeviationFlagged { reservation_id: reservation_id.to_owned() };
                self.count_trip(agent, auto, &event).await
            }
            _ => Ok(None),
        }
    }

    /// Counts `event` in the agent's trip counters (once per reservation, however often a
    /// step is retried); why they now trip `policy`, if they do.
    async fn count_trip(
        &self,
        agent: &str,
        policy: &AutoPausePolicy,
        event: &TripEvent,
    ) -> Result<Option<String>, PaymentError> {
        for attempt in 0..self.settings.ledger_attempts {
            let counters = self.store.trip_counters(agent).await?;
            // Unchanged (counted by an earlier try): still trips if it did, so a try that
            // died between counting and pausing is finished by its retry.
            let Some(next) = counters.after(event, self.clock.now()) else {
                return Ok(counters.tripped(policy));
            };
            if self.store.put_trip_counters(agent, &next).await? {
                return Ok(next.tripped(policy));
            }
            conflict_backoff(attempt).await;
        }
        Err(PaymentError::LedgerConflict { agent: agent.to_owned(), attempts: self.settings.ledger_attempts })
    }

    /// Pauses the agent for `reason`: a policy change attributed to the trip, in the agent's
    /// policy history, counted for the `KillSwitchTrips` alarm. The counters start over, so
    /// an agent a person resumes is not paused again by the events already judged.
    async fn trip(&self, agent: &str, reason: &str) -> Result<(), PaymentError> {
        let change = PolicyChange {
            edit: PolicyEdit::SetPaused(true),
            by: TRIPPED_BY.to_owned(),
            reason: Some(reason.to_owned()),
            at: self.clock.now(),
            expected_version: None,
        };
        if let PolicyEdited::Applied { version } = self.store.change_policy(agent, &change).await? {
            crate::metrics::kill_switch_tripped(agent);
            tracing::warn!(agent, version, reason, "kill switch tripped: agent paused");
        }
        for _ in 0..self.settings.ledger_attempts {
            let counters = self.store.trip_counters(agent).await?;
            if self.store.put_trip_counters(agent, &counters.started_over()).await? {
                break;
            }
        }
        Ok(())
    }

    /// After a person's decision (or its time-out) on `reservation_id`: counts it where the
    /// policy trips on rejections, and trips.
    async fn count_decision(&self, agent: &str, event: TripEvent) -> Result<(), PaymentError> {
        let Some(policy) = self.store.policy(agent).await? else { return Ok(()) };
        let Some(auto) = policy.auto_pause.as_ref().filter(|a| a.consecutive_rejections.is_some()) else {
            return Ok(());
        };
        match self.count_trip(agent, auto, &event).await? {
            Some(reason) if !policy.paused => self.trip(agent, &reason).await,
            _ => Ok(()),
        }
    }

    /// Counts a decision that reached the workflow, with how long the payment waited (from
    /// the approval record: decided minus requested; a time-out waited its whole time-out).
    /// Best effort: a metric never fails the step that records money.
    async fn approval_metrics(&self, approval_id: &str, decision: &'static str) {
        match self.store.approval(approval_id).await {
            Ok(Some(record)) => {
                let ended = if decision == "TimedOut" { Some(record.expires_at) } else { record.decided_at };
                let waited = ended.map_or(0, |at| at.millis().saturating_sub(record.requested_at.millis()) / 1000);
                crate::metrics::approval_decided(decision, u64::try_from(waited).unwrap_or(0));
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(approval_id, error = %error, "approval decision not counted"),
        }
    }

    /// A retried CheckSpend meets the reservation its claim made. Released means the claim was
    /// compensated — by an execution that took the key over while this one stalled: superseded.
    async fn existing_reservation(
        &self,
        existing: Reservation,
        fence: &ClaimFence,
        request: &PaymentRequest,
    ) -> Result<ReservationSummary, PaymentError> {
        if existing.status != ReservationStatus::Released {
            let mut answer = summary(&existing, request);
            // Approved already (this claim was taken over, or replayed after an unknown
            // outcome): the person's decision stands for the reservation it was about.
            if answer.approval.required
                && let Some(approval) = self.store.approval(&approval_id(&existing.id, existing.created_at)).await?
                && approval.status == ApprovalStatus::Approved
            {
                answer.approval = ApprovalGate::not_required();
            }
            return Ok(answer);
        }
        match self.store.idempotency(&fence.key, self.clock.now()).await? {
            Some(record) if record.is_held_by(fence) => Err(PaymentError::LedgerInconsistent(format!(
                "reservation {} was released while execution {} still holds its claim",
                existing.id, fence.execution_id
            ))),
            record => {
                crate::metrics::claim_superseded();
                let holder = record.map_or_else(|| "gone (no live record)".to_owned(), |r| r.holder());
                Err(superseded(fence, holder))
            }
        }
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
        let provider = self.provider.name();
        let agent = order.request.agent_id.as_str();
        let key = order.request.idempotency_key.as_str();
        let (policy, record) = self.store.policy_and_key(agent, key, self.clock.now()).await?;
        // An execution that stalled past its lease may have lost the key to another, which
        // then paid, or was refused and released the reservation: this one must not pay now.
        // (A takeover needs the lease to pass; the instant between this read and the call
        // below is one invocation, which Lambda ends long before: see `StepSettings::lease`.)
        let fence = input.claim.fence(key, &input.execution_id);
        if !record.as_ref().is_some_and(|r| r.is_held_by(&fence)) {
            crate::metrics::claim_superseded();
            let holder = record.map_or_else(|| "gone (no live record)".to_owned(), |r| r.holder());
            return Err(superseded(&fence, holder));
        }
        // The kill switch, looked at last, right before paying: a pause stops payments already
        // past CheckSpend too.
        if policy.is_some_and(|policy| policy.paused) {
            // An earlier call with this client token (a retry's, or the one of the execution
            // this claim was taken from) may have issued a proof: hold it, do not release it.
            if input.retry_count > 0 || input.claim.adopted {
                return Err(PaymentError::PaymentOutcomeUnknown {
                    provider,
                    message: format!(
                        "agent {agent} was paused before this call, and an earlier call with this client token may have issued a proof: the reservation stays counted; replay the key after `agentpay policy resume {agent}` to settle it"
                    ),
                    source: None,
                });
            }
            return Err(PaymentError::AgentPaused { agent: agent.to_owned() });
        }
        let proof = match self.provider.process_payment(&order).await {
            Ok(proof) => proof,
            // Throttled, or not connected: this call was not processed, but that says nothing
            // of an earlier call with the same token (a retry's predecessor, or the execution
            // this claim was taken from), which may have issued a proof.
            Err(PaymentError::ProviderUnavailable { message, source, .. })
                if input.retry_count > 0 || input.claim.adopted =>
            {
                return Err(PaymentError::PaymentOutcomeUnknown {
                    provider,
                    message: format!(
                        "{message}; an earlier call with this client token may have issued a proof, so this is no refusal"
                    ),
                    source,
                });
            }
            Err(other) => return Err(other),
        };
        // A success we cannot use may still be a proof the provider issued: unknown, not failed.
        if proof.status != "PROOF_GENERATED" {
            return Err(PaymentError::PaymentOutcomeUnknown {
                provider,
                message: format!("status {:?}, expected PROOF_GENERATED", proof.status),
                source: None,
            });
        }
        if proof.payment_id.is_empty() || proof.header.value.is_empty() {
            return Err(PaymentError::PaymentOutcomeUnknown {
                provider,
                message: "empty payment id or payment header in the response".into(),
                source: None,
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
            caller_arn: request.caller.as_ref().map(|c| c.arn.clone()),
            limits: Some(input.reservation.snapshot.clone()),
            payment_id: Some(outcome.payment_id.clone()),
            error: None,
            decided_by: None,
            reason: None,
            settlement: None,
        };
        let fence = input.claim.fence(request.idempotency_key.as_str(), &input.execution_id);
        let commit = AuthorizationCommit {
            reservation_id: input.reservation.reservation_id.clone(),
            payment_id: outcome.payment_id.clone(),
            fence: fence.clone(),
            result: to_output(&outcome)?,
            audit,
            now,
            expires_at: now.plus(self.settings.idempotency_ttl),
            history: HistoryEntry {
                scopes: history_scopes(&outcome.payee, request.context.category.as_deref()),
                day: day_number(now),
                amount: payment.amount,
            },
            payer: input.proof.payer.clone(),
            authorization: crate::provider::signed_authorization(&input.proof),
        };
        // Concurrent payments to one payee add to the same history day: a transaction that
        // met another is tried again, here, before the state machine's retry.
        let mut transition = self.store.authorize(&commit).await?;
        for attempt in 1..self.settings.ledger_attempts {
            if transition != Transition::VersionConflict {
                break;
            }
            conflict_backoff(attempt).await;
            transition = self.store.authorize(&commit).await?;
        }
        // A person approved this one: rejections before it are no longer "in a row". Best
        // effort: the payment is recorded, and a streak not forgotten can only pause the agent
        // sooner, never let it spend more; a step failing here would fail a paid execution.
        if input.reservation.approval.required
            && matches!(transition, Transition::Applied | Transition::AlreadyApplied)
            && let Err(error) = self.count_decision(&commit.audit.agent_id, TripEvent::ApprovalGranted).await
        {
            tracing::warn!(agent = %commit.audit.agent_id, error = %error, "approved payment not counted for the rejection trip");
        }
        match transition {
            Transition::Applied => {
                crate::metrics::authorized(&commit.audit.agent_id, payment.amount);
                if let Some(id) =
                    input.reservation.approval.id.as_deref().filter(|_| input.reservation.approval.required)
                {
                    self.approval_metrics(id, "Approved").await;
                }
                Ok(outcome)
            }
            Transition::AlreadyApplied => {
                // Recorded by an earlier try: answer with what was stored.
                match self.store.idempotency(&fence.key, now).await? {
                    Some(IdempotencyRecord { result: Some(stored), .. }) => serde_json::from_value(stored)
                        .map_err(|e| PaymentError::LedgerInconsistent(format!("stored result unreadable: {e}"))),
                    _ => Ok(outcome),
                }
            }
            Transition::Refused(why) => Err(PaymentError::LedgerInconsistent(format!(
                "cannot record payment {} for key {:?}: {why}",
                commit.payment_id, fence.key
            ))),
            Transition::VersionConflict => Err(PaymentError::LedgerConflict {
                agent: request.agent_id.to_string(),
                attempts: self.settings.ledger_attempts,
            }),
            Transition::Fenced(holder) => {
                crate::metrics::claim_superseded();
                Err(superseded(&fence, holder))
            }
        }
    }

    /// The callback task's step: records the pending approval with the task token the
    /// execution waits on, extends the claim's lease over the wait, audits. Idempotent; a
    /// retried task (a new token) replaces the token of a pending approval.
    pub async fn request_approval(&self, input: RequestApprovalInput) -> Result<ApprovalRequested, PaymentError> {
        let request = PaymentRequest::parse(&input.request)?;
        if !input.reservation.approval.required {
            return Err(InvalidPaymentRequest::field(
                "reservation.approval",
                "an approval that is not required",
                "the reservation of a payment CheckSpend sent to approval",
            )
            .into());
        }
        if input.task_token.is_empty() || input.task_token.len() > MAX_TASK_TOKEN_LEN {
            return Err(InvalidPaymentRequest::field(
                "taskToken",
                format!("{} characters", input.task_token.len()),
                format!("the task token of the waiting task, 1 to {MAX_TASK_TOKEN_LEN} characters"),
            )
            .into());
        }
        let agent = request.agent_id.as_str();
        let reservation_id = &input.claim.reservation_id;
        let reservation = match self.store.reservation(agent, reservation_id).await? {
            Some(r) if r.status == ReservationStatus::Reserved => r,
            other => {
                return Err(PaymentError::LedgerInconsistent(format!(
                    "an approval is requested for reservation {reservation_id}, which is {}",
                    other.map_or("missing", |r| r.status.as_str())
                )));
            }
        };
        // The id as the stored reservation determines it, whatever the input says.
        let id = approval_id(&reservation.id, reservation.created_at);
        let Some(need) = reservation.approval.clone() else {
            return Err(PaymentError::LedgerInconsistent(format!(
                "reservation {reservation_id} was not sent to approval, yet an approval is requested"
            )));
        };
        let now = self.clock.now();
        let expires_at = now.plus(Duration::from_secs(need.timeout_seconds));
        let fence = input.claim.fence(request.idempotency_key.as_str(), &input.execution_id);
        let token_digest = derived_id("tok", &[&input.task_token]);
        let audit = AuditEvent {
            event_id: derived_id("evt", &[reservation_id, "APPROVAL_REQUESTED", &token_digest]),
            kind: AuditKind::ApprovalRequested,
            reason: Some(need.reason.clone()),
            ..self.claim_audit(&request, &input.execution_id, &input.claim, Some(&reservation), now)
        };
        let summary = payment_summary(&reservation, &request);
        let record = ApprovalRecord {
            id: id.clone(),
            agent_id: agent.to_owned(),
            user_id: request.user_id.to_string(),
            idempotency_key: request.idempotency_key.to_string(),
            execution_id: input.execution_id.clone(),
            reservation_id: reservation_id.clone(),
            task_token: input.task_token.clone(),
            amount: reservation.amount,
            network: reservation.network,
            display: summary.display,
            payee: summary.payee,
            resource: summary.resource,
            context: summary.context,
            caller_arn: request.caller.as_ref().map(|c| c.arn.clone()),
            limits: reservation.snapshot.clone(),
            reason: need.reason,
            status: ApprovalStatus::Pending,
            requested_at: now,
            expires_at,
            decided_by: None,
            decided_at: None,
            decision_reason: None,
        };
        let commit = ApprovalRequestCommit { record, fence, lease_until: expires_at.plus(self.settings.lease), audit };
        let answer = |already_requested| ApprovalRequested { approval_id: id.clone(), expires_at, already_requested };
        match self.store.request_approval(&commit).await? {
            Transition::Applied => {
                crate::metrics::approval_requested();
                Ok(answer(false))
            }
            Transition::AlreadyApplied => Ok(answer(true)),
            Transition::Fenced(holder) => {
                crate::metrics::claim_superseded();
                Err(superseded(&commit.fence, holder))
            }
            Transition::Refused(why) => {
                Err(PaymentError::LedgerInconsistent(format!("approval {id} cannot wait for a person again: {why}")))
            }
            Transition::VersionConflict => Err(PaymentError::LedgerConflict { agent: agent.to_owned(), attempts: 1 }),
        }
    }

    /// Releases the reservation (if any), marks the key FAILED or DENIED, audits. Idempotent.
    /// After an unknown outcome it holds instead: nothing is released.
    pub async fn compensate(&self, input: CompensateInput) -> Result<Compensation, PaymentError> {
        let request = PaymentRequest::parse(&input.request)?;
        // Defence in depth: an unknown outcome is never released, whatever route led here.
        if input.mode == CompensationMode::HoldUnknown || input.error.error == "PaymentOutcomeUnknown" {
            return self.hold_unknown(&request, &input).await;
        }
        let agent = request.agent_id.as_str();
        let reservation_id = input.claim.reservation_id.clone();
        let fence = input.claim.fence(request.idempotency_key.as_str(), &input.execution_id);
        let denied = is_denial_name(&input.error.error);
        let status = if denied { IdempotencyStatus::Denied } else { IdempotencyStatus::Failed };
        let error = ErrorRecord { error: input.error.error.clone(), cause: input.error.message() };

        for attempt in 0..self.settings.ledger_attempts {
            let now = self.clock.now();
            let reservation = self.store.reservation(agent, &reservation_id).await?;
            let release = match &reservation {
                Some(r) if r.status == ReservationStatus::Reserved => {
                    let window = self.store.agent_ledger(agent).await?.window;
                    let refund = match window.refund_for(r.charged_at(), r.amount) {
                        WindowWrite::Refund { amount_at: None, count_at: None, .. } => None,
                        refund => Some(refund),
                    };
                    Some(ReleasedReservation { id: r.id.clone(), refund })
                }
                // AUTHORIZED or SETTLED: a proof was recorded (by an execution that took the
                // key over). Never released; the fenced write below names the holder.
                _ => None,
            };
            let releasing = release.is_some();
            let kind = if releasing || !denied { AuditKind::Released } else { AuditKind::Denied };
            let audit = AuditEvent {
                event_id: derived_id("evt", &[&reservation_id, if releasing { "RELEASED" } else { status.as_str() }]),
                kind,
                error: Some(error.clone()),
                ..self.claim_audit(&request, &input.execution_id, &input.claim, reservation.as_ref(), now)
            };
            let commit = ReleaseCommit {
                agent_id: agent.to_owned(),
                reservation_id: reservation_id.clone(),
                reservation: release,
                fence: fence.clone(),
                status,
                error: error.clone(),
                audit,
                now,
                expires_at: now.plus(self.settings.idempotency_ttl),
            };
            let compensation = |already_compensated: bool| Compensation {
                error: error.error.clone(),
                cause: error.cause.clone(),
                reservation_id: reservation_id.clone(),
                released: releasing && !already_compensated,
                idempotency_status: status,
                already_compensated,
                held: false,
            };
            let transition = self.store.release(&commit).await?;
            let decision = match error.error.as_str() {
                "ApprovalRejected" => Some("Rejected"),
                "ApprovalTimedOut" => Some("TimedOut"),
                _ => None,
            };
            if let (Some(decision), Some(reservation)) = (decision, &reservation)
                && transition == Transition::Applied
            {
                self.approval_metrics(&approval_id(&reservation.id, reservation.created_at), decision).await;
            }
            if decision.is_some() && matches!(transition, Transition::Applied | Transition::AlreadyApplied) {
                let event = TripEvent::ApprovalRejected { reservation_id: reservation_id.clone() };
                self.count_decision(agent, event).await?;
            }
            match transition {
                Transition::Applied => {
                    crate::metrics::compensated(&error.error);
                    if denied {
                        crate::metrics::denied(&error.error);
                    }
                    return Ok(compensation(false));
                }
                Transition::AlreadyApplied => return Ok(compensation(true)),
                Transition::VersionConflict => conflict_backoff(attempt).await,
                Transition::Refused(why) => return Err(PaymentError::LedgerInconsistent(why)),
                Transition::Fenced(holder) => {
                    crate::metrics::claim_superseded();
                    return Ok(superseded_compensation(&fence, holder, &reservation_id));
                }
            }
        }
        Err(PaymentError::LedgerConflict { agent: agent.to_owned(), attempts: self.settings.ledger_attempts })
    }

    /// An unknown outcome: the reservation stays counted, the claim keeps its client token,
    /// its lease ends (a replay of the key adopts it at once), and the audit trail says so.
    async fn hold_unknown(
        &self,
        request: &PaymentRequest,
        input: &CompensateInput,
    ) -> Result<Compensation, PaymentError> {
        let now = self.clock.now();
        let reservation_id = input.claim.reservation_id.clone();
        let fence = input.claim.fence(request.idempotency_key.as_str(), &input.execution_id);
        let reservation = self.store.reservation(request.agent_id.as_str(), &reservation_id).await?;
        let entered = input.entered_at.clone().unwrap_or_else(|| now.millis().to_string());
        let cause = format!(
            "{} ({}). A payment proof may have been issued: reservation {reservation_id} stays counted against the agent's limits and idempotency key {:?} keeps its client token. Resolve it by asking the provider again with that token: start the same idempotency key again (`agentpay replay <execution> --fresh`, or StartExecution with the same input); the provider answers with the proof it issued or a definite refusal.",
            input.error.error,
            input.error.message(),
            fence.key,
        );
        let audit = AuditEvent {
            event_id: derived_id("evt", &[&reservation_id, "OUTCOME_UNKNOWN", &input.execution_id, &entered]),
            kind: AuditKind::OutcomeUnknown,
            error: Some(ErrorRecord { error: "PaymentOutcomeUnknown".into(), cause: cause.clone() }),
            ..self.claim_audit(request, &input.execution_id, &input.claim, reservation.as_ref(), now)
        };
        let held = |already_compensated: bool| Compensation {
            error: "PaymentOutcomeUnknown".into(),
            cause: cause.clone(),
            reservation_id: reservation_id.clone(),
            released: false,
            idempotency_status: IdempotencyStatus::InProgress,
            already_compensated,
            held: true,
        };
        match self.store.hold(&HoldCommit { fence: fence.clone(), audit, now }).await? {
            Transition::Applied => {
                crate::metrics::outcome_unknown();
                Ok(held(false))
            }
            Transition::AlreadyApplied => Ok(held(true)),
            Transition::Fenced(holder) => {
                crate::metrics::claim_superseded();
                Ok(superseded_compensation(&fence, holder, &reservation_id))
            }
            Transition::VersionConflict => {
                Err(PaymentError::LedgerConflict { agent: request.agent_id.to_string(), attempts: 1 })
            }
            Transition::Refused(why) => Err(PaymentError::LedgerInconsistent(why)),
        }
    }

    /// The audit event's common part for a claim: who, what, under which limits.
    fn claim_audit(
        &self,
        request: &PaymentRequest,
        execution_id: &str,
        claim: &Claim,
        reservation: Option<&Reservation>,
        now: Timestamp,
    ) -> AuditEvent {
        let payment = claim.payment.as_ref();
        AuditEvent {
            event_id: String::new(),
            kind: AuditKind::Released,
            agent_id: request.agent_id.to_string(),
            user_id: request.user_id.to_string(),
            at: now,
            idempotency_key: request.idempotency_key.to_string(),
            execution_id: execution_id.to_owned(),
            reservation_id: reservation.map(|r| r.id.clone()),
            amount: reservation.map(|r| r.amount).or(payment.map(|p| p.amount)),
            network: payment.map(|p| p.network),
            asset: payment.map(|p| p.asset.to_checksum(None)),
            payee: payment.map(|p| p.pay_to.to_checksum(None)),
            resource: request.resource.clone(),
            context: request.context.clone(),
            caller_arn: request.caller.as_ref().map(|c| c.arn.clone()),
            limits: reservation.map(|r| r.snapshot.clone()),
            payment_id: None,
            error: None,
            decided_by: None,
            reason: None,
            settlement: None,
        }
    }
}

/// The decision with a deviation applied: denied, or sent to a person with the figures.
pub(crate) fn with_deviation(
    mut decision: SpendDecision,
    deviation: Option<&Deviation>,
    agent: &str,
    payment: &PaymentRequirement,
) -> Result<SpendDecision, PaymentError> {
    let Some(found) = deviation else { return Ok(decision) };
    let details = found.describe(payment.usdc().decimals);
    if found.action == DeviationAction::Deny {
        return Err(PaymentError::DeviationDetected { agent: agent.to_owned(), details });
    }
    let flagged = format!("deviation: {details}");
    decision.approval = Some(match decision.approval.take() {
        Some(threshold) => format!("{threshold}; {flagged}"),
        None => flagged,
    });
    Ok(decision)
}

/// The decision, unless the payment would take the last hour's spend past the policy's
/// velocity trip (then the agent is paused, and this payment with it).
pub(crate) fn within_velocity(
    decision: SpendDecision,
    ledger: &crate::policy::AgentLedger,
    agent: &str,
    payment: &PaymentRequirement,
    now: Timestamp,
) -> Result<SpendDecision, PaymentError> {
    let Some(auto) = ledger.policy.as_ref().and_then(|p| p.auto_pause.as_ref()) else { return Ok(decision) };
    match velocity_trip(auto, &ledger.window.rolled(now), payment.amount, payment.usdc().decimals) {
        Some(reason) => Err(PaymentError::KillSwitchTripped { agent: agent.to_owned(), reason }),
        None => Ok(decision),
    }
}

fn key_reused(key: &str, record: &IdempotencyRecord, request: &PaymentRequest) -> PaymentError {
    PaymentError::IdempotencyKeyReused {
        key: key.to_owned(),
        stored: record.fingerprint.clone(),
        received: request.fingerprint().to_owned(),
    }
}

/// The cached outcome of a completed key: nothing is paid again.
fn cached(key: &str, record: &IdempotencyRecord) -> Result<Claim, PaymentError> {
    let mut result = record
        .result
        .clone()
        .ok_or_else(|| PaymentError::LedgerInconsistent(format!("key {key:?} is COMPLETED without a result")))?;
    result["fromCache"] = Value::Bool(true);
    let (reservation_id, client_token) = claim_ids(key, &record.claim_id, record.attempt);
    Ok(Claim {
        outcome: ClaimOutcome::Cached,
        claim_id: record.claim_id.clone(),
        attempt: record.attempt,
        reservation_id,
        client_token,
        payment: None,
        result: Some(result),
        provider_context: None,
        adopted: false,
    })
}

fn superseded(fence: &ClaimFence, holder: String) -> PaymentError {
    PaymentError::ClaimSuperseded { key: fence.key.clone(), execution_id: fence.execution_id.clone(), holder }
}

/// A fenced Compensate: it wrote nothing; the execution ends with the takeover named.
fn superseded_compensation(fence: &ClaimFence, holder: String, reservation_id: &str) -> Compensation {
    Compensation {
        error: "ClaimSuperseded".into(),
        cause: superseded(fence, holder).to_string(),
        reservation_id: reservation_id.to_owned(),
        released: false,
        idempotency_status: IdempotencyStatus::InProgress,
        already_compensated: false,
        held: false,
    }
}

fn summary(reservation: &Reservation, request: &PaymentRequest) -> ReservationSummary {
    let approval = match &reservation.approval {
        None => ApprovalGate::not_required(),
        Some(need) => ApprovalGate::required(
            approval_id(&reservation.id, reservation.created_at),
            need,
            &payment_summary(reservation, request),
        ),
    };
    ReservationSummary {
        reservation_id: reservation.id.clone(),
        amount: reservation.amount,
        remaining_24h: reservation.snapshot.remaining_24h(),
        snapshot: reservation.snapshot.clone(),
        approval,
        shadow: None,
    }
}

/// What a person reads about a reserved payment.
fn payment_summary(reservation: &Reservation, request: &PaymentRequest) -> PaymentSummary {
    let decimals = reservation.network.usdc().decimals;
    PaymentSummary {
        agent: reservation.agent_id.clone(),
        display: format!("{} USDC", reservation.amount.display_with_decimals(decimals)),
        payee: reservation.pay_to.clone(),
        resource: reservation.resource.clone(),
        context: request.context.clone(),
    }
}

/// The local runner's Tasks run these steps in-process.
#[async_trait::async_trait]
impl TaskHandler for Steps {
    async fn invoke(&self, step: StepName, input: Value) -> Result<Value, TaskFailure> {
        self.run(step, input).await.map_err(|failure| {
            tracing::warn!(step = step.function_name(), error = failure.name(), message = %failure.chain_message(), "task failed");
            TaskFailure::from(failure)
        })
    }
}
