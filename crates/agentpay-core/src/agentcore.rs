//! AgentCore Payments settings, free of SDK types: the session and instrument a payment uses
//! (from the execution input or the agent's policy), their checks, and session expiry. The SDK
//! adapter (`agentpay-agentcore`) turns them into calls; the policy and the request parser only
//! need these.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::Timestamp;
use crate::error::{FieldProblem, InvalidPaymentRequest};
use crate::payment::describe;

/// AgentCore session and instrument chosen for a payment: in the execution input's
/// `agentcore` block (per payment) or in the agent's policy (defaults). Each field is checked
/// where it enters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentCoreSelection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_manager_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_instrument_id: Option<String>,
}

const SELECTION_FIELDS: [&str; 3] = ["paymentManagerArn", "paymentSessionId", "paymentInstrumentId"];

impl AgentCoreSelection {
    /// Reads a selection object, listing every problem (`path` prefixes the field names).
    pub fn parse(value: &Value, path: &str) -> Result<Self, Vec<FieldProblem>> {
        let Value::Object(fields) = value else {
            return Err(vec![FieldProblem::new(
                path,
                describe(value),
                "an object with paymentManagerArn, paymentSessionId and/or paymentInstrumentId",
            )]);
        };
        let mut problems = Vec::new();
        for name in fields.keys().filter(|n| !SELECTION_FIELDS.contains(&n.as_str())) {
            problems.push(FieldProblem::new(
                format!("{path}.{name}"),
                "an unknown field",
                format!("only {}", SELECTION_FIELDS.join(", ")),
            ));
        }
        let mut text = |name: &str, check: fn(&str) -> Result<(), String>| match fields.get(name) {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => match check(text) {
                Ok(()) => Some(text.clone()),
                Err(expected) => {
                    problems.push(FieldProblem::new(format!("{path}.{name}"), format!("{text:?}"), expected));
                    None
                }
            },
            Some(other) => {
                problems.push(FieldProblem::new(format!("{path}.{name}"), describe(other), "a string"));
                None
            }
        };
        let selection = Self {
            payment_manager_arn: text("paymentManagerArn", check_manager_arn),
            payment_session_id: text("paymentSessionId", check_resource_id),
            payment_instrument_id: text("paymentInstrumentId", check_resource_id),
        };
        if problems.is_empty() { Ok(selection) } else { Err(problems) }
    }

    /// This selection, with the gaps filled from `defaults`.
    fn or(&self, defaults: Option<&AgentCoreSelection>) -> AgentCoreSelection {
        let pick = |mine: &Option<String>, theirs: Option<&Option<String>>| {
            mine.clone().or_else(|| theirs.and_then(Clone::clone))
        };
        AgentCoreSelection {
            payment_manager_arn: pick(&self.payment_manager_arn, defaults.map(|d| &d.payment_manager_arn)),
            payment_session_id: pick(&self.payment_session_id, defaults.map(|d| &d.payment_session_id)),
            payment_instrument_id: pick(&self.payment_instrument_id, defaults.map(|d| &d.payment_instrument_id)),
        }
    }
}

/// `arn:<partition>:bedrock-agentcore:<region>:<12-digit account>:<resource>`.
pub fn check_manager_arn(text: &str) -> Result<(), String> {
    const EXPECTED: &str = "a payment manager ARN: arn:aws:bedrock-agentcore:<region>:<12-digit account>:<resource>, at most 2048 characters";
    let parts: Vec<&str> = text.splitn(6, ':').collect();
    let valid = text.len() <= 2048
        && parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "bedrock-agentcore"
        && !parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && !parts[5].is_empty()
        && !text.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid { Ok(()) } else { Err(EXPECTED.into()) }
}

/// Session and instrument ids: 1 to 256 characters of A-Z a-z 0-9 and `-_.:/`.
pub fn check_resource_id(text: &str) -> Result<(), String> {
    let valid =
        !text.is_empty() && text.len() <= 256 && text.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c));
    if valid { Ok(()) } else { Err("an AgentCore id: 1 to 256 characters of A-Z a-z 0-9 and \"-_.:/\"".into()) }
}

/// The agent's AgentCore settings, kept in its spend policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentCorePolicy {
    /// Used where the execution input does not name them.
    #[serde(default)]
    pub defaults: AgentCoreSelection,
    /// Lets AgentCore charge MPP network (gas) fees to the wallet when the challenge does not
    /// sponsor them. Off unless the policy says so.
    #[serde(default)]
    pub buyer_pays_gas_fees: bool,
    /// Reads the session first (`GetPaymentSession`) and denies without spending a wallet
    /// operation when its budget is short or it has expired.
    #[serde(default)]
    pub check_session_first: bool,
}

/// Everything one `ProcessPayment` call needs besides the challenge, fixed when the key is
/// claimed and carried in the claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentCoreTarget {
    pub payment_manager_arn: String,
    pub payment_session_id: String,
    pub payment_instrument_id: String,
    pub user_id: String,
    pub agent_name: String,
    pub buyer_pays_gas_fees: bool,
    pub check_session_first: bool,
}

impl AgentCoreTarget {
    /// The execution input's selection over the policy's defaults; every gap is named.
    pub fn resolve(
        selection: Option<&AgentCoreSelection>,
        settings: Option<&AgentCorePolicy>,
        agent: &str,
        user_id: &str,
    ) -> Result<Self, InvalidPaymentRequest> {
        let settings = settings.cloned().unwrap_or_default();
        let selection = selection.cloned().unwrap_or_default().or(Some(&settings.defaults));
        let missing = |field: &str, flag: &str| {
            FieldProblem::missing(
                format!("agentcore.{field}"),
                format!(
                    "the AgentCore {flag} for this payment, in the execution input's agentcore block or the agent's policy (agentpay policy set {agent} --agentcore-{flag} ...)"
                ),
            )
        };
        match (selection.payment_manager_arn, selection.payment_session_id, selection.payment_instrument_id) {
            (Some(payment_manager_arn), Some(payment_session_id), Some(payment_instrument_id)) => Ok(Self {
                payment_manager_arn,
                payment_session_id,
                payment_instrument_id,
                user_id: user_id.to_owned(),
                agent_name: agent.to_owned(),
                buyer_pays_gas_fees: settings.buyer_pays_gas_fees,
                check_session_first: settings.check_session_first,
            }),
            (arn, session, instrument) => {
                let mut problems = Vec::new();
                if arn.is_none() {
                    problems.push(missing("paymentManagerArn", "manager-arn"));
                }
                if session.is_none() {
                    problems.push(missing("paymentSessionId", "session-id"));
                }
                if instrument.is_none() {
                    problems.push(missing("paymentInstrumentId", "instrument-id"));
                }
                Err(InvalidPaymentRequest { problems })
            }
        }
    }
}

/// Session expiry in minutes, as AgentCore accepts it (15 to 480).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionExpiry(i32);

impl SessionExpiry {
    pub const MINUTES: std::ops::RangeInclusive<i32> = 15..=480;

    pub fn minutes(minutes: i64) -> Result<Self, InvalidPaymentRequest> {
        match i32::try_from(minutes) {
            Ok(m) if Self::MINUTES.contains(&m) => Ok(Self(m)),
            _ => Err(InvalidPaymentRequest::field(
                "expiryTimeInMinutes",
                minutes.to_string(),
                "15 to 480 minutes (AgentCore's bounds on a payment session's life)",
            )),
        }
    }

    pub fn as_minutes(self) -> i32 {
        self.0
    }
}

/// A session agentpay created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedSession {
    pub payment_session_id: String,
    pub expiry_time_in_minutes: i32,
    pub expires_at: Timestamp,
}
