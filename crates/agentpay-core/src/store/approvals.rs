//! Approval records: a payment waiting for a person, and the writes that move it.

use serde::{Deserialize, Serialize};

use super::{AuditEvent, ClaimFence, Transition};
use crate::clock::Timestamp;
use crate::money::AtomicAmount;
use crate::payment::Network;
use crate::policy::SpendSnapshot;
use crate::request::BusinessContext;

/// Why a payment needs a person, fixed when it is reserved (a retried CheckSpend answers the
/// same, and a policy edit after the reservation does not change it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalNeed {
    pub reason: String,
    pub timeout_seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Rejected,
}

impl ApprovalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "PENDING",
            ApprovalStatus::Approved => "APPROVED",
            ApprovalStatus::Rejected => "REJECTED",
        }
    }
}

/// A payment waiting for (or decided by) a person.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRecord {
    pub id: String,
    pub agent_id: String,
    pub user_id: String,
    pub idempotency_key: String,
    pub execution_id: String,
    pub reservation_id: String,
    /// The waiting task's token: whoever holds it (and may call SendTaskSuccess) decides.
    /// Never shown or logged.
    pub task_token: String,
    pub amount: AtomicAmount,
    pub network: Network,
    pub display: String,
    pub payee: String,
    pub resource: String,
    pub context: BusinessContext,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_arn: Option<String>,
    pub limits: SpendSnapshot,
    pub reason: String,
    pub status: ApprovalStatus,
    pub requested_at: Timestamp,
    /// Past this the execution has stopped waiting (compensated as ApprovalTimedOut).
    pub expires_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_reason: Option<String>,
}

impl ApprovalRecord {
    /// The status a person reads: a pending approval past its time-out has timed out.
    pub fn status_at(&self, now: Timestamp) -> &'static str {
        match self.status {
            ApprovalStatus::Pending if self.expires_at <= now => "TIMED_OUT",
            other => other.as_str(),
        }
    }

    /// The record without its task token, for display.
    pub fn redacted(&self) -> ApprovalRecord {
        ApprovalRecord { task_token: "(redacted)".into(), ..self.clone() }
    }
}

/// The callback task's write: the pending approval (a retried task replaces the token of a
/// pending one), the claim's lease extended over the wait (no other execution takes the key
/// over while a person decides), and the audit event; all while the fence holds.
#[derive(Debug, Clone)]
pub struct ApprovalRequestCommit {
    pub record: ApprovalRecord,
    pub fence: ClaimFence,
    pub lease_until: Timestamp,
    pub audit: AuditEvent,
}

/// The decision's write: PENDING and not timed out → APPROVED or REJECTED, with the audit event.
#[derive(Debug, Clone)]
pub struct ApprovalDecisionCommit {
    /// The record as decided (status, who, when, why).
    pub decided: ApprovalRecord,
    pub audit: AuditEvent,
}

impl ApprovalDecisionCommit {
    pub fn id(&self) -> &str {
        &self.decided.id
    }

    pub fn at(&self) -> Timestamp {
        self.decided.decided_at.unwrap_or(self.audit.at)
    }

    pub fn decided_by(&self) -> &str {
        self.decided.decided_by.as_deref().unwrap_or_default()
    }
}

impl ApprovalRecord {
    /// Who decided it and when, for a refusal.
    pub fn decided_text(&self) -> String {
        format!(
            "it is {} by {} at {}",
            self.status.as_str(),
            self.decided_by.as_deref().unwrap_or("?"),
            self.decided_at.map(|t| t.to_rfc3339()).unwrap_or_default()
        )
    }
}

/// Whether a request may land on what is stored: `None` if it may (absent, or pending with
/// another token: a retried task replaces it); otherwise what to report. Both stores use it.
pub fn request_check(stored: Option<&ApprovalRecord>, commit: &ApprovalRequestCommit) -> Option<Transition> {
    match stored {
        Some(stored) if stored.status != ApprovalStatus::Pending => Some(Transition::Refused(stored.decided_text())),
        Some(stored) if stored.task_token == commit.record.task_token => Some(Transition::AlreadyApplied),
        _ => None,
    }
}

/// Whether a decision may land on what is stored: `None` if it may; otherwise what to report.
pub fn decision_check(stored: &ApprovalRecord, commit: &ApprovalDecisionCommit) -> Option<Transition> {
    if stored.status == commit.decided.status && stored.decided_by == commit.decided.decided_by {
        return Some(Transition::AlreadyApplied);
    }
    if stored.status != ApprovalStatus::Pending {
        return Some(Transition::Refused(stored.decided_text()));
    }
    if stored.expires_at <= commit.at() {
        return Some(Transition::Refused(format!("it timed out at {}", stored.expires_at.to_rfc3339())));
    }
    None
}
