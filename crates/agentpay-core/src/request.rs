//! The payment request an agent sends, parsed and validated at the edge.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::agentcore::AgentCoreSelection;
use crate::error::{FieldProblem, InvalidPaymentRequest, PaymentError};
use crate::identity::{Caller, check_caller_arn};
use crate::mpp::MppChallenge;
use crate::payment::{Allowlist, PaymentRequirement, describe};
use crate::x402::Challenge;

macro_rules! validated_id {
    ($(#[$meta:meta])* $name:ident, max = $max:expr, extra = $extra:expr, what = $what:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const MAX_LEN: usize = $max;

            pub fn parse(field: &str, text: &str) -> Result<Self, FieldProblem> {
                let allowed = |c: char| c.is_ascii_alphanumeric() || $extra.contains(c);
                if text.is_empty() || text.len() > $max || !text.chars().all(allowed) {
                    return Err(FieldProblem::new(
                        field,
                        format!("{text:?}"),
                        format!("{}: 1 to {} characters of A-Z a-z 0-9 and {:?}", $what, $max, $extra),
                    ));
                }
                Ok(Self(text.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                Self::parse(stringify!($name), &text).map_err(serde::de::Error::custom)
            }
        }
    };
}

validated_id!(
    /// Supplied by the agent; one key, one payment.
    IdempotencyKey, max = 200, extra = "-_.:", what = "an idempotency key"
);
validated_id!(AgentId, max = 128, extra = "-_.:@", what = "an agent id");
validated_id!(UserId, max = 128, extra = "-_.:@", what = "a user id");

/// Why the agent pays: what the audit trail shows a reviewer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BusinessContext {
    pub decision: String,
    pub delegated_by: String,
    pub scope: String,
    /// What kind of spend this is (`travel`, `inventory`...): a deviation policy with scope
    /// `category` compares the payment with the agent's history in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

/// The longest category name: it is part of a ledger key.
pub const MAX_CATEGORY_LEN: usize = 64;

/// The challenge exactly as the agent received it.
#[derive(Debug, Clone, PartialEq)]
pub enum ChallengeInput {
    /// x402 v2: the `PAYMENT-REQUIRED` header value (base64 JSON).
    X402Header(String),
    /// x402 v1: the 402 response body.
    X402V1Body(Value),
    /// MPP: the `WWW-Authenticate: Payment` header value.
    Mpp(String),
}

#[derive(Debug, Clone)]
pub struct PaymentRequest {
    pub idempotency_key: IdempotencyKey,
    pub agent_id: AgentId,
    pub user_id: UserId,
    pub challenge: ChallengeInput,
    pub resource: String,
    pub context: BusinessContext,
    /// AgentCore session and instrument for this payment (override the agent's policy).
    pub agentcore: Option<AgentCoreSelection>,
    /// The IAM caller the entry point verified (absent when an operator started the
    /// execution directly). Not part of the fingerprint: an agent's retry may come from
    /// another session of the same role.
    pub caller: Option<Caller>,
    fingerprint: String,
}

const TOP_LEVEL_FIELDS: &[&str] =
    &["idempotencyKey", "agentId", "userId", "challenge", "resource", "context", "agentcore", "caller"];

impl PaymentRequest {
    /// Validates the execution input, listing every problem at once.
    pub fn parse(input: &Value) -> Result<Self, InvalidPaymentRequest> {
        let Value::Object(fields) = input else {
            return Err(InvalidPaymentRequest::field(
                "request",
                describe(input),
                "a JSON object (the execution input)",
            ));
        };
        let mut problems = Vec::new();
        for name in fields.keys() {
            if !TOP_LEVEL_FIELDS.contains(&name.as_str()) {
                problems.push(FieldProblem::new(
                    name.clone(),
                    "an unknown field",
                    format!("only {}", TOP_LEVEL_FIELDS.join(", ")),
                ));
            }
        }
        let idempotency_key = id_field(fields, "idempotencyKey", IdempotencyKey::parse, &mut problems);
        let agent_id = id_field(fields, "agentId", AgentId::parse, &mut problems);
        let user_id = id_field(fields, "userId", UserId::parse, &mut problems);
        let challenge = parse_challenge_input(fields.get("challenge"), &mut problems);
        let resource = string_field(fields, "resource", &mut problems).and_then(|url| {
            let valid = (url.starts_with("https://") || url.starts_with("http://"))
                && url.len() <= 2048
                && !url.chars().any(char::is_whitespace)
                && url.split_once("://").is_some_and(|(_, rest)| !rest.is_empty());
            if valid {
                Some(url)
            } else {
                problems.push(FieldProblem::new(
                    "resource",
                    format!("{url:?}"),
                    "an http(s) URL of at most 2048 characters",
                ));
                None
            }
        });
        let context = parse_context(fields.get("context"), &mut problems);
        let agentcore = fields
            .get("agentcore")
            .filter(|v| !v.is_null())
            .and_then(|v| AgentCoreSelection::parse(v, "agentcore").map_err(|p| problems.extend(p)).ok());

        let caller = fields.get("caller").and_then(|value| parse_caller(value, &mut problems));

        match (idempotency_key, agent_id, user_id, challenge, resource, context) {
            (Some(idempotency_key), Some(agent_id), Some(user_id), Some(challenge), Some(resource), Some(context))
                if problems.is_empty() =>
            {
                Ok(Self {
                    idempotency_key,
                    agent_id,
                    user_id,
                    challenge,
                    resource,
                    context,
                    agentcore,
                    caller,
                    fingerprint: fingerprint(&without_caller(input)),
                })
            }
            _ => Err(InvalidPaymentRequest { problems }),
        }
    }

    /// SHA-256 of the canonical request (keys sorted): same request, same fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Validates the challenge and chooses what to pay: the first x402 `accepts[]` entry the
    /// allowlist permits, or the MPP charge.
    pub fn select_payment(&self, allow: &Allowlist, agent: &str) -> Result<PaymentRequirement, PaymentError> {
        match &self.challenge {
            ChallengeInput::X402Header(header) => Challenge::from_v2_header(header)?.select(allow, agent),
            ChallengeInput::X402V1Body(body) => Challenge::from_v1_body(body.clone())?.select(allow, agent),
            ChallengeInput::Mpp(header) => MppChallenge::parse(header)?.select(allow, agent),
        }
    }
}

fn parse_caller(value: &Value, problems: &mut Vec<FieldProblem>) -> Option<Caller> {
    match serde_json::from_value::<Caller>(value.clone()) {
        Ok(caller) => match check_caller_arn(&caller.arn) {
            Ok(()) => Some(caller),
            Err(expected) => {
                problems.push(FieldProblem::new("caller.arn", format!("{:?}", caller.arn), expected));
                None
            }
        },
        Err(_) => {
            problems.push(FieldProblem::new(
                "caller",
                describe(value),
                "{\"arn\": \"<the verified IAM caller>\"}, set by the entry point",
            ));
            None
        }
    }
}

fn without_caller(input: &Value) -> Value {
    let mut input = input.clone();
    if let Value::Object(fields) = &mut input {
        fields.remove("caller");
    }
    input
}

fn id_field<T>(
    fields: &Map<String, Value>,
    name: &str,
    parse: fn(&str, &str) -> Result<T, FieldProblem>,
    problems: &mut Vec<FieldProblem>,
) -> Option<T> {
    let text = string_field(fields, name, problems)?;
    parse(name, &text).map_err(|p| problems.push(p)).ok()
}

fn string_field(fields: &Map<String, Value>, name: &str, problems: &mut Vec<FieldProblem>) -> Option<String> {
    match fields.get(name) {
        Some(Value::String(text)) => Some(text.clone()),
        Some(other) => {
            problems.push(FieldProblem::new(name, describe(other), "a string"));
            None
        }
        None => {
            problems.push(FieldProblem::missing(name, "a string"));
            None
        }
    }
}

fn parse_challenge_input(value: Option<&Value>, problems: &mut Vec<FieldProblem>) -> Option<ChallengeInput> {
    const EXPECTED: &str = "an object with exactly one of \"x402\" (PAYMENT-REQUIRED header value), \"x402v1\" (402 body) or \"mpp\" (WWW-Authenticate value)";
    let Some(Value::Object(fields)) = value else {
        problems.push(match value {
            Some(other) => FieldProblem::new("challenge", describe(other), EXPECTED),
            None => FieldProblem::missing("challenge", EXPECTED),
        });
        return None;
    };
    if fields.len() != 1 {
        let keys: Vec<_> = fields.keys().map(String::as_str).collect();
        problems.push(FieldProblem::new("challenge", format!("keys {keys:?}"), EXPECTED));
        return None;
    }
    let (kind, inner) = fields.iter().next()?;
    match (kind.as_str(), inner) {
        ("x402", Value::String(header)) => Some(ChallengeInput::X402Header(header.clone())),
        ("x402v1", body @ Value::Object(_)) => Some(ChallengeInput::X402V1Body(body.clone())),
        ("mpp", Value::String(header)) => Some(ChallengeInput::Mpp(header.clone())),
        ("x402" | "mpp", other) => {
            problems.push(FieldProblem::new(
                format!("challenge.{kind}"),
                describe(other),
                "the header value as a string",
            ));
            None
        }
        ("x402v1", other) => {
            problems.push(FieldProblem::new(
                "challenge.x402v1",
                describe(other),
                "the 402 response body as a JSON object",
            ));
            None
        }
        (other, _) => {
            problems.push(FieldProblem::new("challenge", format!("the key {other:?}"), EXPECTED));
            None
        }
    }
}

fn parse_context(value: Option<&Value>, problems: &mut Vec<FieldProblem>) -> Option<BusinessContext> {
    const EXPECTED: &str = "an object with \"decision\", \"delegatedBy\" and \"scope\" strings";
    let Some(Value::Object(fields)) = value else {
        problems.push(match value {
            Some(other) => FieldProblem::new("context", describe(other), EXPECTED),
            None => FieldProblem::missing("context", EXPECTED),
        });
        return None;
    };
    let mut text = |name: &str| -> Option<String> {
        let field = format!("context.{name}");
        match fields.get(name) {
            Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 2000 => Some(s.clone()),
            Some(other) => {
                problems.push(FieldProblem::new(
                    field,
                    describe(other),
                    "a non-empty string of at most 2000 characters",
                ));
                None
            }
            None => {
                problems.push(FieldProblem::missing(field, "a non-empty string (the audit trail needs it)"));
                None
            }
        }
    };
    let decision = text("decision");
    let delegated_by = text("delegatedBy");
    let scope = text("scope");
    let category = match fields.get("category") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(name)) if is_category(name) => Ok(Some(name.clone())),
        Some(other) => Err(FieldProblem::new(
            "context.category",
            describe(other),
            format!("a name of 1 to {MAX_CATEGORY_LEN} lowercase letters, digits, '-', '_' or '.'"),
        )),
    };
    let category = category.map_err(|problem| problems.push(problem)).ok()?;
    Some(BusinessContext { decision: decision?, delegated_by: delegated_by?, scope: scope?, category })
}

fn is_category(name: &str) -> bool {
    (1..=MAX_CATEGORY_LEN).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// Canonical JSON: object keys sorted recursively, no whitespace.
pub fn canonical_json(value: &Value) -> String {
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<_> = map.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&map[k]))).collect())
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(value).to_string()
}

pub fn fingerprint(value: &Value) -> String {
    alloy_primitives::hex::encode(Sha256::digest(canonical_json(value).as_bytes()))
}

/// Short deterministic id from parts: `prefix-` and 32 hex digits of SHA-256.
pub fn derived_id(prefix: &str, parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    format!("{prefix}-{}", &alloy_primitives::hex::encode(hasher.finalize())[..32])
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::samples::execution_input;

    #[test]
    fn a_valid_request_parses_and_fingerprints_canonically() {
        let input = execution_input("key-1", "agent-1", "10000");
        let request = PaymentRequest::parse(&input).unwrap();
        assert_eq!(request.agent_id.as_str(), "agent-1");
        // Reordering keys does not change the fingerprint; changing a value does.
        let reordered: Value = serde_json::from_str(&canonical_json(&input)).unwrap();
        assert_eq!(PaymentRequest::parse(&reordered).unwrap().fingerprint(), request.fingerprint());
        let other = execution_input("key-1", "agent-1", "10001");
        assert_ne!(PaymentRequest::parse(&other).unwrap().fingerprint(), request.fingerprint());
    }

    #[test]
    fn every_missing_field_is_named() {
        let error = PaymentRequest::parse(&json!({})).unwrap_err();
        let fields: Vec<_> = error.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["idempotencyKey", "agentId", "userId", "challenge", "resource", "context"]);
    }

    #[test]
    fn bad_ids_unknown_fields_and_bad_context_are_rejected() {
        let mut input = execution_input("key with spaces", "agent-1", "1");
        input["surprise"] = json!(1);
        input["context"]["scope"] = json!("");
        input["resource"] = json!("ftp://x");
        let error = PaymentRequest::parse(&input).unwrap_err();
        let fields: Vec<_> = error.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["surprise", "idempotencyKey", "resource", "context.scope"], "{error}");
    }

    #[test]
    fn challenge_needs_exactly_one_kind() {
        let mut input = execution_input("k", "a", "1");
        input["challenge"] = json!({"x402": "abc", "mpp": "def"});
        let error = PaymentRequest::parse(&input).unwrap_err();
        assert_eq!(error.problems[0].field, "challenge");
    }

    #[test]
    fn derived_ids_are_deterministic_and_unambiguous() {
        assert_eq!(derived_id("r", &["a", "b"]), derived_id("r", &["a", "b"]));
        assert_ne!(derived_id("r", &["ab", ""]), derived_id("r", &["a", "b"]));
        assert_eq!(derived_id("res", &["x"]).len(), 4 + 32);
    }
}
