//! The `Store` port: idempotency records, the agent ledger, reservations and audit events.
//!
//! Shaped for DynamoDB as much as for SQLite: every write is one conditional operation (a
//! conditional put, a compare-and-swap on a record, or one transaction with a version check
//! on the agent item) that reports what blocked it, so the domain never reads and then
//! writes separately.

mod approvals;
pub mod counting;

pub use approvals::{
    ApprovalDecisionCommit, ApprovalNeed, ApprovalRecord, ApprovalRequestCommit, ApprovalStatus, decision_check,
    request_check,
};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::Timestamp;
pub use crate::deviation::{HistoryEntry, SpendHistory};
use crate::error::PaymentError;
use crate::money::AtomicAmount;
use crate::payment::Network;
use crate::policy::{AgentLedger, SpendPolicy, SpendSnapshot};
use crate::request::BusinessContext;
pub use crate::trips::TripCounters;
use crate::window::{ChargedAt, SpendWindow, WindowWrite};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum IdempotencyStatus {
    InProgress,
    Completed,
    Failed,
    Denied,
}

impl IdempotencyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            IdempotencyStatus::InProgress => "IN_PROGRESS",
            IdempotencyStatus::Completed => "COMPLETED",
            IdempotencyStatus::Failed => "FAILED",
            IdempotencyStatus::Denied => "DENIED",
        }
    }
}

/// An error as recorded: its stable name and the message a person reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub error: String,
    pub cause: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdempotencyRecord {
    pub key: String,
    pub fingerprint: String,
    pub status: IdempotencyStatus,
    /// Random, new each time the key's record is created (first use, or reuse after the
    /// record expired): reservation id and client token derive from (key, claim id, attempt),
    /// so a key reused after its record expired never inherits an old reservation or proof.
    #[serde(default)]
    pub claim_id: String,
    /// Increments each time a FAILED or DENIED key is claimed again.
    pub attempt: u32,
    pub execution_id: String,
    pub lease_expires_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorRecord>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// TTL: past this a finished record counts as absent, whether or not it is deleted yet
    /// (see [`IdempotencyRecord::is_expired`]).
    pub expires_at: Timestamp,
}

impl IdempotencyRecord {
    /// Past `expires_at` a finished record counts as absent. An unfinished one never does: a
    /// claim that may stand for an issued proof is never forgotten (Step Functions redrives
    /// for 14 days, and a held key is resolved whenever it is started again).
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.status != IdempotencyStatus::InProgress && self.expires_at <= now
    }

    /// Whether `fence`'s execution still holds this record's claim.
    pub fn is_held_by(&self, fence: &ClaimFence) -> bool {
        self.status == IdempotencyStatus::InProgress
            && self.key == fence.key
            && self.claim_id == fence.claim_id
            && self.attempt == fence.attempt
            && self.execution_id == fence.execution_id
    }

    /// Whether this record shows `fence`'s claim and attempt compensated (FAILED or DENIED),
    /// by whichever execution held it.
    pub fn is_closed_for(&self, fence: &ClaimFence) -> bool {
        self.claim_id == fence.claim_id
            && self.attempt == fence.attempt
            && matches!(self.status, IdempotencyStatus::Failed | IdempotencyStatus::Denied)
    }

    /// Who holds the record now, for a fenced writer's message.
    pub fn holder(&self) -> String {
        match self.status {
            IdempotencyStatus::InProgress => {
                format!("held by execution {} (attempt {})", self.execution_id, self.attempt)
            }
            other => format!("{} by execution {} (attempt {})", other.as_str(), self.execution_id, self.attempt),
        }
    }
}

/// The claim a write acts for: every write that moves a claim or its reservation is
/// conditioned on the key's record still being IN_PROGRESS under exactly this claim, attempt
/// and execution. A lease takeover changes the execution, so the old holder's writes fail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimFence {
    pub key: String,
    pub claim_id: String,
    pub attempt: u32,
    pub execution_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReservationStatus {
    Reserved,
    Authorized,
    Settled,
    Released,
    /// The merchant reported a settlement not yet final (a transaction, or `settlement_pending`).
    SettlementPending,
    /// The merchant reported a failed settlement. Still counted: the signed authorization can
    /// be settled by whoever holds it until it expires.
    SettlementFailed,
    /// Its authorization expired with no report and no chain to ask: still counted, listed
    /// for reconciliation.
    ExpiredUnconfirmed,
    /// Its authorization expired unused, as the chain says: it can never move money, so its
    /// budget came back.
    Voided,
    /// Decided in shadow mode, never paid: counted in the shadow window only.
    Shadow,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Reserved => "RESERVED",
            ReservationStatus::Authorized => "AUTHORIZED",
            ReservationStatus::Settled => "SETTLED",
            ReservationStatus::Released => "RELEASED",
            ReservationStatus::SettlementPending => "SETTLEMENT_PENDING",
            ReservationStatus::SettlementFailed => "SETTLEMENT_FAILED",
            ReservationStatus::ExpiredUnconfirmed => "EXPIRED_UNCONFIRMED",
            ReservationStatus::Voided => "VOIDED",
            ReservationStatus::Shadow => "SHADOW",
        }
    }

    /// A proof was recorded for it: it is never released by compensation.
    pub fn is_paid(self) -> bool {
        matches!(
            self,
            ReservationStatus::Authorized
                | ReservationStatus::Settled
                | ReservationStatus::SettlementPending
                | ReservationStatus::SettlementFailed
                | ReservationStatus::ExpiredUnconfirmed
        )
    }
}

/// The signed transfer authorization behind a proof: its nonce and until when it can be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignedAuthorization {
    /// `0x` and 64 hex digits.
    pub nonce: String,
    pub valid_before: Timestamp,
}

/// What the ledger knows of a payment's settlement: the last report it accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settlement {
    pub report: crate::settlement::SettlementReport,
    /// Who reported it (the agent's IAM principal, an operator, `local:$USER`).
    pub reported_by: String,
    pub reported_at: Timestamp,
}

/// A settlement report's write: the reservation moves from what was read to `to`, with the
/// report and its audit event, or nothing happens.
#[derive(Debug, Clone)]
pub struct SettlementCommit {
    pub agent_id: String,
    pub reservation_id: String,
    pub from: ReservationStatus,
    pub to: ReservationStatus,
    /// The report recorded (None: the chain decided; the report on file stays).
    pub settlement: Option<Settlement>,
    /// VOIDED only: the payment's slots given back to the window.
    pub refund: Option<crate::window::WindowWrite>,
    pub audit: AuditEvent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    pub id: String,
    pub agent_id: String,
    pub idempotency_key: String,
    pub attempt: u32,
    pub execution_id: String,
    pub status: ReservationStatus,
    /// The key record's lifetime (see `IdempotencyRecord::claim_id`) and the provider client
    /// token of the claim that made it: the proof it may stand for.
    #[serde(default)]
    pub claim_id: String,
    #[serde(default)]
    pub client_token: String,
    pub amount: AtomicAmount,
    pub network: Network,
    pub asset: String,
    pub pay_to: String,
    pub resource: String,
    pub snapshot: SpendSnapshot,
    /// The window slots the payment was charged to (a release refunds exactly these).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charged: Option<ChargedAt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    /// Why it waits for a person, if it does (decided with the reservation, so a retried
    /// CheckSpend answers the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalNeed>,
    /// For whom and why (the audit of what follows the payment, e.g. its settlement, says it
    /// again without reading the request back).
    #[serde(default)]
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<BusinessContext>,
    /// The wallet that signed, from the proof (recorded with the authorization).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    /// The last settlement report accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settlement: Option<Settlement>,
    /// The EIP-3009 authorization the proof carries (recorded with the authorization): after
    /// `valid_before` the chain says for good whether it was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<SignedAuthorization>,
    /// SHADOW only: what the policy would have done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<crate::shadow::ShadowDecision>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl Reservation {
    /// Where the payment counts in the window (records written before charges were placed
    /// explicitly: the slots of their creation time).
    pub fn charged_at(&self) -> ChargedAt {
        self.charged.unwrap_or_else(|| ChargedAt::of(self.created_at))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuditKind {
    Authorized,
    Released,
    Denied,
    Settled,
    /// The provider may have issued a proof; the reservation stays counted.
    OutcomeUnknown,
    /// The payment waits for a person (human approval), reserved.
    ApprovalRequested,
    /// A person approved it (`decided_by`).
    ApprovalGranted,
    /// A person rejected it (`decided_by`, `reason`); the payment is compensated.
    ApprovalRejected,
    /// A settlement report said pending; still counted.
    SettlementPending,
    /// A settlement report said failed; still counted.
    SettlementFailed,
    /// A settlement report contradicted the payment or the ledger: refused, nothing changed.
    SettlementRefused,
    /// The authorization expired and no chain could be asked: still counted.
    ExpiredUnconfirmed,
    /// The chain says the expired authorization was never used: its budget came back.
    Voided,
    /// Shadow mode: what the policy would have done (`reason`; a would-be denial's `error`).
    Shadow,
}

/// One line of the audit trail: who paid whom, why, under which limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// Deterministic (reservation or key, attempt, kind) so a retried write cannot duplicate it.
    pub event_id: String,
    pub kind: AuditKind,
    pub agent_id: String,
    pub user_id: String,
    pub at: Timestamp,
    pub idempotency_key: String,
    pub execution_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<AtomicAmount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payee: Option<String>,
    pub resource: String,
    pub context: BusinessContext,
    /// The IAM caller the entry point verified: who, in IAM's terms, asked for this payment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<SpendSnapshot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorRecord>,
    /// Who took a decision recorded here (an approver's IAM principal, or the local user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// Why: an approval's trigger, a rejection's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A settlement report this event is about (accepted or refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settlement: Option<Settlement>,
}

/// A change to an agent's policy.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyEdit {
    /// Everything but the kill switch: an agent that has a policy keeps `paused` as stored, so
    /// no edit can resume a paused agent by accident (a new agent takes the given value).
    Replace(Box<SpendPolicy>),
    /// The kill switch alone.
    SetPaused(bool),
}

impl PolicyEdit {
    /// The policy after this edit of `stored` (`None`: nothing to pause or resume).
    pub fn apply(&self, stored: Option<&SpendPolicy>) -> Option<SpendPolicy> {
        match (self, stored) {
            (PolicyEdit::Replace(policy), Some(stored)) => {
                Some(SpendPolicy { paused: stored.paused, ..(**policy).clone() })
            }
            (PolicyEdit::Replace(policy), None) => Some((**policy).clone()),
            (PolicyEdit::SetPaused(paused), Some(stored)) => Some(SpendPolicy { paused: *paused, ..stored.clone() }),
            (PolicyEdit::SetPaused(_), None) => None,
        }
    }
}

/// Who changes an agent's policy, when and why, and on which version they read it: every
/// edit, pause and resume is kept in the agent's policy history with these.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyChange {
    pub edit: PolicyEdit,
    /// An operator's IAM principal, or `local:<user>`.
    pub by: String,
    pub reason: Option<String>,
    pub at: Timestamp,
    /// The version the change was decided on: if the policy moved since, nothing is written.
    pub expected_version: Option<u64>,
}

impl PolicyChange {
    /// A change made through the library without an operator (tests, the demo, benches).
    pub fn unattributed(edit: PolicyEdit) -> Self {
        Self {
            edit,
            by: "(unattributed: library call)".into(),
            reason: None,
            at: crate::clock::Clock::now(&crate::clock::SystemClock),
            expected_version: None,
        }
    }

    pub fn action(&self) -> PolicyAction {
        match self.edit {
            PolicyEdit::Replace(_) => PolicyAction::Set,
            PolicyEdit::SetPaused(true) => PolicyAction::Paused,
            PolicyEdit::SetPaused(false) => PolicyAction::Resumed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyAction {
    Set,
    Paused,
    Resumed,
}

/// One entry of an agent's policy history: the policy as it became, who, when, why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAuditEvent {
    pub agent_id: String,
    pub version: u64,
    pub action: PolicyAction,
    pub by: String,
    pub at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub policy: SpendPolicy,
}

impl PolicyAuditEvent {
    pub fn of(agent_id: &str, version: u64, change: &PolicyChange, policy: &SpendPolicy) -> Self {
        Self {
            agent_id: agent_id.to_owned(),
            version,
            action: change.action(),
            by: change.by.clone(),
            at: change.at,
            reason: change.reason.clone(),
            policy: policy.clone(),
        }
    }
}

/// Outcome of a policy change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyEdited {
    Applied {
        version: u64,
    },
    /// A pause or resume of an agent without a policy: nothing written.
    NoPolicy,
    /// The policy is no longer at the version the change expected: nothing written.
    VersionMoved {
        current: u64,
    },
}

/// Outcome of a reservation write.
#[derive(Debug, Clone, PartialEq)]
pub enum ReserveOutcome {
    Reserved,
    /// The window's conditions did not hold when the write landed (it moved to a new minute,
    /// the policy changed, or concurrent payments used the room): decide again on the window
    /// as stored then, if the store returned it, or on a fresh read.
    WindowMoved(Option<Box<SpendWindow>>),
    /// A reservation with this id exists already (a retried step): it is returned as is.
    AlreadyExists(Box<Reservation>),
    /// The claim is no longer held by this execution: nothing was written.
    Fenced(String),
}

/// Outcome of a state transition that may happen at most once.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Applied,
    /// It had happened before; nothing was written.
    AlreadyApplied,
    /// The record is in a state this transition may not leave (current status named).
    Refused(String),
    /// The agent item changed under a release: re-read and try again.
    VersionConflict,
    /// The claim is no longer held by the writing execution (current holder named):
    /// nothing was written.
    Fenced(String),
}

/// RecordLedger's single atomic write.
#[derive(Debug, Clone)]
pub struct AuthorizationCommit {
    pub reservation_id: String,
    pub payment_id: String,
    pub fence: ClaimFence,
    pub result: Value,
    pub audit: AuditEvent,
    pub now: Timestamp,
    /// The completed record's new expiry (the idempotency TTL from now).
    pub expires_at: Timestamp,
    /// What the payment adds to the agent's spend history (deviation detection), in the same
    /// write: a payment counts there once it is made, and only then.
    pub history: HistoryEntry,
    /// The wallet that signed the proof, when the provider says (a settlement report's payer
    /// is checked against it).
    pub payer: Option<String>,
    /// The authorization the proof carries, when it is an EIP-3009 one.
    pub authorization: Option<SignedAuthorization>,
}

/// Compensate's single atomic write.
#[derive(Debug, Clone)]
pub struct ReleaseCommit {
    pub agent_id: String,
    /// The claim's reservation id, whether or not a reservation was made.
    pub reservation_id: String,
    /// The reservation to release and the refund of its window slots, if one was made.
    pub reservation: Option<ReleasedReservation>,
    pub fence: ClaimFence,
    pub status: IdempotencyStatus,
    pub error: ErrorRecord,
    pub audit: AuditEvent,
    pub now: Timestamp,
    /// The failed or denied record's new expiry (the idempotency TTL from now).
    pub expires_at: Timestamp,
}

/// CheckSpend's single atomic write for an agent in shadow mode: the decision recorded as a
/// SHADOW reservation, the shadow window charged when the payment would have been reserved,
/// the spend history taught it, the key completed with the shadow outcome, and the audit event.
#[derive(Debug, Clone)]
pub struct ShadowCommit {
    pub fence: ClaimFence,
    /// `None` for a would-be denial: nothing counts.
    pub window: Option<WindowWrite>,
    pub record: Reservation,
    /// The key's result: the shadow outcome.
    pub result: Value,
    pub audit: AuditEvent,
    pub history: Option<HistoryEntry>,
    pub now: Timestamp,
    pub expires_at: Timestamp,
}

/// The write after an unknown outcome: the reservation stays, the claim stays IN_PROGRESS
/// with its client token, its lease ends now (so a replay of the key adopts it at once and
/// asks the provider again), and the audit trail says so.
#[derive(Debug, Clone)]
pub struct HoldCommit {
    pub fence: ClaimFence,
    pub audit: AuditEvent,
    pub now: Timestamp,
}

#[derive(Debug, Clone)]
pub struct ReleasedReservation {
    pub id: String,
    /// `None` when the payment has left the window already: nothing there to refund.
    pub refund: Option<WindowWrite>,
}

/// Agents read at once when every agent is listed (`Store::agents`): a page of ids, small
/// enough for one DynamoDB response.
pub const AGENTS_PAGE: usize = 500;

#[async_trait]
pub trait Store: Send + Sync {
    /// Writes `record` if no live record holds the key (absent, or past `expires_at`).
    /// Returns the live record that blocked it otherwise.
    async fn insert_idempotency(&self, record: &IdempotencyRecord) -> Result<Option<IdempotencyRecord>, PaymentError>;

    /// Replaces `expected` (same status, execution id and attempt) with `record`.
    /// Returns the current record if it no longer matches (`None` inside means gone).
    async fn replace_idempotency(
        &self,
        expected: &IdempotencyRecord,
        record: &IdempotencyRecord,
    ) -> Result<Option<Option<IdempotencyRecord>>, PaymentError>;

    /// The live record of `key` (expired records read as absent).
    async fn idempotency(&self, key: &str, now: Timestamp) -> Result<Option<IdempotencyRecord>, PaymentError>;

    /// The agent item; a never-written agent is the default with version 0.
    async fn agent_ledger(&self, agent_id: &str) -> Result<AgentLedger, PaymentError>;

    /// The agent item and the live record of `key`, in one round trip where the store allows
    /// (CheckIdempotency answers a completed key before it looks at the policy).
    async fn agent_and_key(
        &self,
        agent_id: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<(AgentLedger, Option<IdempotencyRecord>), PaymentError>;

    /// Applies the change to the agent's policy (creating the agent if needed), bumping its
    /// version and the window's policy version together, so a charge decided under the old
    /// policy no longer applies, and records it in the agent's policy history (who, when, why)
    /// in the same write.
    async fn change_policy(&self, agent_id: &str, change: &PolicyChange) -> Result<PolicyEdited, PaymentError>;

    /// Every change of the agent's policy, oldest first.
    async fn policy_history(&self, agent_id: &str) -> Result<Vec<PolicyAuditEvent>, PaymentError>;

    /// `change_policy`, unattributed (library callers: tests, the demo). `false`: a pause or
    /// resume of an agent without a policy (nothing written).
    async fn edit_policy(&self, agent_id: &str, edit: &PolicyEdit) -> Result<bool, PaymentError> {
        match self.change_policy(agent_id, &PolicyChange::unattributed(edit.clone())).await? {
            PolicyEdited::Applied { .. } => Ok(true),
            PolicyEdited::NoPolicy => Ok(false),
            PolicyEdited::VersionMoved { .. } => {
                Err(PaymentError::LedgerConflict { agent: agent_id.to_owned(), attempts: 1 })
            }
        }
    }

    /// Sets the policy; an existing agent keeps its kill switch as stored (see [`PolicyEdit`]).
    async fn put_policy(&self, agent_id: &str, policy: &SpendPolicy) -> Result<(), PaymentError> {
        self.edit_policy(agent_id, &PolicyEdit::Replace(Box::new(policy.clone()))).await.map(drop)
    }

    /// Pauses or resumes the agent; `false` if it has no policy.
    async fn set_paused(&self, agent_id: &str, paused: bool) -> Result<bool, PaymentError> {
        self.edit_policy(agent_id, &PolicyEdit::SetPaused(paused)).await
    }

    /// The agent's policy alone: ProcessPayment's last look at the kill switch before it pays.
    async fn policy(&self, agent_id: &str) -> Result<Option<SpendPolicy>, PaymentError> {
        Ok(self.agent_ledger(agent_id).await?.policy)
    }

    /// ProcessPayment's last look before it pays, in one round trip where the store allows:
    /// the agent's policy (its kill switch) and the live record of `key` (whether the claim is
    /// still the paying execution's, or was taken over while it stalled).
    async fn policy_and_key(
        &self,
        agent_id: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<(Option<SpendPolicy>, Option<IdempotencyRecord>), PaymentError> {
        Ok((self.policy(agent_id).await?, self.idempotency(key, now).await?))
    }

    /// The agent's payments in one history scope (`payee#0x…`, `category#…`) over the days
    /// `first_day..=last_day` (at most [`crate::deviation::MAX_LOOKBACK_DAYS`]).
    async fn spend_history(
        &self,
        agent_id: &str,
        scope: &str,
        first_day: u32,
        last_day: u32,
    ) -> Result<SpendHistory, PaymentError>;

    /// What the agent's automatic trips count (the default, version 0, if never written).
    async fn trip_counters(&self, agent_id: &str) -> Result<TripCounters, PaymentError>;

    /// Writes `counters` if the stored version is `counters.version - 1` (what was read);
    /// `false` if another write came first (read again and retry).
    async fn put_trip_counters(&self, agent_id: &str, counters: &TripCounters) -> Result<bool, PaymentError>;

    /// Agents with a policy, in id order: those after `after` (from the first when `None`), at
    /// most `limit` — one page of a walk over every agent (the reconciliation sweep).
    async fn agents_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, PaymentError>;

    /// Every agent with a policy (operators' `policy pause --all`), in id order, read a page of
    /// `AGENTS_PAGE` at a time.
    async fn agents(&self) -> Result<Vec<String>, PaymentError> {
        let mut agents: Vec<String> = Vec::new();
        loop {
            let page = self.agents_after(agents.last().map(String::as_str), AGENTS_PAGE).await?;
            let full = page.len() == AGENTS_PAGE;
            agents.extend(page);
            if !full {
                return Ok(agents);
            }
        }
    }

    /// The last agent the scheduled reconciliation sweep reconciled: the next sweep goes on
    /// after it. `None` before the first sweep.
    async fn sweep_cursor(&self) -> Result<Option<String>, PaymentError>;

    /// Records where the next reconciliation sweep goes on after.
    async fn set_sweep_cursor(&self, last_reconciled: &str) -> Result<(), PaymentError>;

    /// Atomically: apply `write` to the agent's window (if its conditions hold when it lands)
    /// and create the reservation if its id is new, while `fence` still holds the claim.
    async fn reserve(
        &self,
        write: &WindowWrite,
        reservation: &Reservation,
        fence: &ClaimFence,
    ) -> Result<ReserveOutcome, PaymentError>;

    async fn reservation(&self, agent_id: &str, id: &str) -> Result<Option<Reservation>, PaymentError>;

    async fn reservations(&self, agent_id: &str) -> Result<Vec<Reservation>, PaymentError>;

    /// Atomically, while the fence holds: reservation RESERVED → AUTHORIZED, audit event,
    /// idempotency record IN_PROGRESS → COMPLETED with the result.
    async fn authorize(&self, commit: &AuthorizationCommit) -> Result<Transition, PaymentError>;

    /// Atomically, while the fence holds: reservation RESERVED → RELEASED with its window
    /// slots refunded (if one was made; `VersionConflict` if the refund's alignment moved),
    /// audit event, idempotency record IN_PROGRESS → FAILED or DENIED.
    async fn release(&self, commit: &ReleaseCommit) -> Result<Transition, PaymentError>;

    /// Atomically, while the fence holds: end the claim's lease and audit the unknown outcome.
    async fn hold(&self, commit: &HoldCommit) -> Result<Transition, PaymentError>;

    /// The agent's shadow window (empty if none was written): what its shadow decisions count.
    async fn shadow_window(&self, agent_id: &str) -> Result<crate::window::SpendWindow, PaymentError>;

    /// A shadow decision's write, all or nothing: `Reserved` once written; `AlreadyExists` if
    /// this reservation id was recorded before (a retried step); `WindowMoved` if the shadow
    /// window's conditions failed (decide again); `Fenced` if the key is no longer held.
    async fn record_shadow(&self, commit: &ShadowCommit) -> Result<ReserveOutcome, PaymentError>;

    /// AUTHORIZED → SETTLED, on a settlement report.
    /// A settlement report's transition (conditioned on the status read); `AlreadyApplied`
    /// if the reservation already holds this very settlement, `VersionConflict` if it moved.
    async fn record_settlement(&self, commit: &SettlementCommit) -> Result<Transition, PaymentError>;

    /// One audit event on its own (a refused report); a retried write of it is a no-op.
    async fn append_audit(&self, event: &AuditEvent) -> Result<(), PaymentError>;

    async fn audit_events(&self, agent_id: &str) -> Result<Vec<AuditEvent>, PaymentError>;

    /// Atomically, while the fence holds: the pending approval (created, or its task token
    /// replaced if it is still pending), the claim's lease extended to `lease_until`, and the
    /// audit event. `Refused` names the status of an approval decided already.
    async fn request_approval(&self, commit: &ApprovalRequestCommit) -> Result<Transition, PaymentError>;

    async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, PaymentError>;

    /// The approvals requested from `since` to `until`, newest first, at most
    /// `approval::MAX_LISTED` (a person's queue: older decisions are in the audit trail).
    async fn approvals(&self, since: Timestamp, until: Timestamp) -> Result<Vec<ApprovalRecord>, PaymentError>;

    /// Atomically: PENDING and not past `expires_at` → the decision, with its audit event.
    /// `AlreadyApplied` for the same decision by the same person; `Refused` names what is stored.
    async fn decide_approval(&self, commit: &ApprovalDecisionCommit) -> Result<Transition, PaymentError>;

    /// Returns once every write this store has acknowledged is durable. A store may answer
    /// a workflow write before its commit is durable (the local SQLite store does, to group
    /// concurrent payments' commits); whoever is about to let a step's outcome leave the
    /// process calls this first (`Steps::invoke`). Required, not defaulted: a store or wrapper
    /// must say what it does.
    async fn durable(&self) -> Result<(), PaymentError>;
}
