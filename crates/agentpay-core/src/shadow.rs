//! Shadow mode: an agent whose policy says `"mode": "shadow"` runs the whole decision — caps,
//! rate, approval threshold, deviation — and pays nothing. CheckSpend records what it would
//! have done (in a window of its own, never counted against the real caps; a would-be payment
//! also in the spend history, so the deviation baseline grows) and completes the key with
//! outcome SHADOW; the state machine ends there, before ProcessPayment. Automatic trips
//! (`autoPause`) act on real spending only: in shadow mode they neither count nor pause.

use serde::{Deserialize, Serialize};

use crate::error::PaymentError;

/// What the policy would have done with the payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ShadowVerdict {
    WouldPay,
    /// Would wait for a person (the approval threshold, or a deviation whose action is
    /// `approve`).
    WouldNeedApproval,
    WouldDeny,
}

impl ShadowVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowVerdict::WouldPay => "WOULD_PAY",
            ShadowVerdict::WouldNeedApproval => "WOULD_NEED_APPROVAL",
            ShadowVerdict::WouldDeny => "WOULD_DENY",
        }
    }
}

/// A shadow decision, as recorded with the payment and answered to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShadowDecision {
    pub verdict: ShadowVerdict,
    /// The denial's stable name (`SpendLimitExceeded`, `RateLimitExceeded`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why: the denial's message, or why a person would be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The deviation from the agent's history, when the payment is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deviation: Option<String>,
}

impl ShadowDecision {
    pub fn would_pay() -> Self {
        Self { verdict: ShadowVerdict::WouldPay, error: None, reason: None, deviation: None }
    }

    pub fn would_need_approval(reason: String) -> Self {
        Self { verdict: ShadowVerdict::WouldNeedApproval, reason: Some(reason), ..Self::would_pay() }
    }

    pub fn would_deny(denial: &PaymentError) -> Self {
        Self {
            verdict: ShadowVerdict::WouldDeny,
            error: Some(denial.name().to_owned()),
            reason: Some(denial.to_string()),
            ..Self::would_pay()
        }
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        let mut text = self.verdict.as_str().to_owned();
        if let Some(error) = &self.error {
            text.push_str(&format!(" ({error})"));
        }
        if let Some(reason) = &self.reason {
            text.push_str(&format!(": {reason}"));
        }
        if let Some(deviation) = &self.deviation {
            text.push_str(&format!(" [deviation: {deviation}]"));
        }
        text
    }
}

/// The outcome of a shadow execution (its output, and the key's cached result): no proof.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShadowOutcome {
    /// Always `SHADOW`.
    pub outcome: String,
    pub decision: ShadowDecision,
    pub idempotency_key: String,
    pub execution_id: String,
    pub amount: crate::money::AtomicAmount,
    pub network: crate::payment::Network,
    pub payee: String,
    pub resource: String,
    pub decided_at: crate::clock::Timestamp,
    #[serde(default)]
    pub from_cache: bool,
}

/// The `outcome` of a shadow execution's output.
pub const SHADOW: &str = "SHADOW";
