//! Human approval: a payment above the agent's approval threshold waits, already reserved, for
//! a person to approve or reject it. The state machine's callback task (`AwaitApproval`,
//! `.waitForTaskToken`) records the pending approval with its task token; an approver's
//! decision is checked and recorded here, then delivered to the waiting execution by the
//! backend (SendTaskSuccess / SendTaskFailure on AWS, the local runner locally). No answer
//! within the time-out: Step Functions fails the task with `States.Timeout`, and the payment
//! is compensated as `ApprovalTimedOut`.

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::error::PaymentError;
use crate::request::{BusinessContext, derived_id};
use crate::store::{ApprovalDecisionCommit, ApprovalNeed, ApprovalRecord, ApprovalStatus, AuditEvent, AuditKind};

/// The error a rejection fails the waiting task with (a denial: the key becomes DENIED).
pub const REJECTED_ERROR: &str = "ApprovalRejected";
/// The error the state machine compensates a timed-out approval as.
pub const TIMED_OUT_ERROR: &str = "ApprovalTimedOut";
/// How long a person has by default (the template's `ApprovalTimeoutSeconds`).
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 7200;
/// Step Functions' longest task time-out is a year; a day is plenty for a person and keeps
/// the claim's lease (extended to cover the wait) short.
pub const MAX_TIMEOUT_SECONDS: u64 = 24 * 3600;
/// A rejection's reason as stored and shown: bounded, it lands in an error's Cause.
pub const MAX_REASON_LEN: usize = 500;
/// The most approvals `approvals list` reads: a person's queue, not a ledger.
pub const MAX_LISTED: usize = 200;

/// The approval id of a reservation: one payment, one approval. It carries the day the
/// reservation was made (`apr-YYYYMMDD-…`): stores that partition approvals by day find one
/// from its id alone.
pub fn approval_id(reservation_id: &str, reserved_at: Timestamp) -> String {
    let hash = derived_id("apr", &[reservation_id]);
    format!("apr-{}-{}", day_of(reserved_at), &hash[4..28])
}

/// `YYYYMMDD` (UTC) of `at`.
pub fn day_of(at: Timestamp) -> String {
    at.to_rfc3339().get(..10).unwrap_or_default().replace('-', "")
}

/// The day an approval id carries (`None`: not an approval id).
pub fn day_of_id(id: &str) -> Option<&str> {
    let day = id.strip_prefix("apr-")?.get(..8)?;
    day.bytes().all(|b| b.is_ascii_digit()).then_some(day)
}

/// How far back `approvals list` looks by default: pending approvals are at most a day old
/// (`MAX_TIMEOUT_SECONDS`); older decisions are in the audit trail.
pub const LISTING_DAYS: u64 = 3;

/// CheckSpend's word on approval (`$.reservation.approval`): the state machine's Choice reads
/// `required`, the notification reads `subject` and `message`, the callback task its time-out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalGate {
    /// Always present: a Choice on a missing field is a runtime error in Step Functions.
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ApprovalGate {
    pub fn not_required() -> Self {
        Self::default()
    }

    /// The gate for a payment that waits for a person, with the notification operators get.
    pub fn required(id: String, need: &ApprovalNeed, summary: &PaymentSummary) -> Self {
        let subject =
            format!("agentpay: approve {} to {} for agent {}?", summary.display, summary.payee, summary.agent);
        let message = format!(
            "Agent {agent} asks to pay {display} to {payee} for {resource}.\n\
             Why it waits for a person: {reason}.\n\
             The agent's reason: {decision} (delegated by {delegated_by}, scope {scope}).\n\
             The amount is reserved against the agent's limits until you decide; with no answer \
             within {minutes} minutes the payment is rejected automatically (ApprovalTimedOut).\n\n\
             Approve: agentpay approve {id}\n\
             Reject:  agentpay reject {id} --reason \"...\"\n\
             Details: agentpay approvals show {id}",
            agent = summary.agent,
            display = summary.display,
            payee = summary.payee,
            resource = summary.resource,
            reason = need.reason,
            decision = summary.context.decision,
            delegated_by = summary.context.delegated_by,
            scope = summary.context.scope,
            minutes = need.timeout_seconds / 60,
        );
        Self {
            required: true,
            id: Some(id),
            reason: Some(need.reason.clone()),
            timeout_seconds: Some(need.timeout_seconds),
            // SNS: a subject is at most 100 characters.
            subject: Some(subject.chars().take(100).collect()),
            message: Some(message),
        }
    }
}

/// What a notification and an approval record say about the payment.
#[derive(Debug, Clone)]
pub struct PaymentSummary {
    pub agent: String,
    pub display: String,
    pub payee: String,
    pub resource: String,
    pub context: BusinessContext,
}

/// A person's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Reject { reason: String },
}

/// Why a decision cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("no approval {0:?}; `agentpay approvals list` shows the pending ones")]
    NotFound(String),
    #[error("approval {id} was {status} by {by} at {at}; a decision is final")]
    AlreadyDecided { id: String, status: &'static str, by: String, at: String },
    #[error(
        "approval {id} timed out at {at}: the execution stopped waiting and the payment was compensated as ApprovalTimedOut (nothing was paid); the agent may ask again with a new idempotency key"
    )]
    TimedOut { id: String, at: String },
    #[error(
        "{approver} may not decide approval {id}: it is one of agent {agent}'s bound principals, and an agent never approves its own payments (separation of duties)"
    )]
    OwnPayment { id: String, approver: String, agent: String },
    #[error("reason: received {received} characters, expected 1 to {MAX_REASON_LEN}")]
    BadReason { received: usize },
    #[error(
        "approval {id} waits for nobody: its payment was {status} after its execution ended without an answer (stopped, or failed), so no decision is recorded"
    )]
    PaymentEnded { id: String, status: &'static str },
    #[error(
        "approval {id} is recorded as {status} but the execution is no longer waiting for it: {detail}. It timed out, or was answered before"
    )]
    NotWaiting { id: String, status: &'static str, detail: String },
    #[error(transparent)]
    Store(#[from] PaymentError),
    #[error("delivering the decision to the execution failed: {0}")]
    Delivery(String),
}

/// Checks `decision` by `approver` on `record` at `now`, and builds its write.
pub fn decide(
    record: &ApprovalRecord,
    decision: &Decision,
    approver: &str,
    bound_principals: &[String],
    now: Timestamp,
) -> Result<ApprovalDecisionCommit, ApprovalError> {
    if crate::identity::is_bound(approver, bound_principals) {
        return Err(ApprovalError::OwnPayment {
            id: record.id.clone(),
            approver: approver.to_owned(),
            agent: record.agent_id.clone(),
        });
    }
    if record.status != ApprovalStatus::Pending {
        return Err(ApprovalError::AlreadyDecided {
            id: record.id.clone(),
            status: record.status.as_str(),
            by: record.decided_by.clone().unwrap_or_default(),
            at: record.decided_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
        });
    }
    if record.expires_at <= now {
        return Err(ApprovalError::TimedOut { id: record.id.clone(), at: record.expires_at.to_rfc3339() });
    }
    let (status, kind, decision_reason) = match decision {
        Decision::Approve => (ApprovalStatus::Approved, AuditKind::ApprovalGranted, None),
        Decision::Reject { reason } => {
            let length = reason.chars().count();
            if reason.trim().is_empty() || length > MAX_REASON_LEN {
                return Err(ApprovalError::BadReason { received: length });
            }
            (ApprovalStatus::Rejected, AuditKind::ApprovalRejected, Some(reason.clone()))
        }
    };
    let audit = AuditEvent {
        event_id: derived_id("evt", &[&record.reservation_id, status.as_str()]),
        kind,
        agent_id: record.agent_id.clone(),
        user_id: record.user_id.clone(),
        at: now,
        idempotency_key: record.idempotency_key.clone(),
        execution_id: record.execution_id.clone(),
        reservation_id: Some(record.reservation_id.clone()),
        amount: Some(record.amount),
        network: Some(record.network),
        asset: None,
        payee: Some(record.payee.clone()),
        resource: record.resource.clone(),
        context: record.context.clone(),
        caller_arn: record.caller_arn.clone(),
        limits: Some(record.limits.clone()),
        payment_id: None,
        error: None,
        decided_by: Some(approver.to_owned()),
        reason: decision_reason.clone().or_else(|| Some(record.reason.clone())),
        settlement: None,
    };
    let decided = ApprovalRecord {
        status,
        decided_by: Some(approver.to_owned()),
        decided_at: Some(now),
        decision_reason,
        ..record.clone()
    };
    Ok(ApprovalDecisionCommit { decided, audit })
}

/// What an approval delivers to the waiting task (`$.approval`): who decided and when.
pub fn approved_output(decided: &ApprovalRecord) -> serde_json::Value {
    serde_json::json!({
        "approvalId": decided.id,
        "decision": decided.status.as_str(),
        "decidedBy": decided.decided_by,
        "decidedAt": decided.decided_at,
    })
}

/// A rejection's Cause: Compensate records it on the key and in the audit trail.
pub fn rejected_cause(decided: &ApprovalRecord) -> String {
    format!(
        "approval {} rejected by {} at {}: {}",
        decided.id,
        decided.decided_by.as_deref().unwrap_or("?"),
        decided.decided_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
        decided.decision_reason.as_deref().unwrap_or("no reason given")
    )
}
