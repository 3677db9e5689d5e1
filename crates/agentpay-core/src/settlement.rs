//! What a merchant answered after it received the payment proof: the x402 v2
//! `PAYMENT-RESPONSE` header, the v1 `X-PAYMENT-RESPONSE` header (both base64 JSON of a
//! facilitator's SettlementResponse), or an MPP `Payment-Receipt` (base64url JSON). An agent
//! hands it back; agentpay checks it against the payment it authorized.
//!
//! A report is a claim, not evidence: it can confirm a payment or keep it counted, never free
//! budget on its own word (see the ledger's settlement states).

use alloy_primitives::Address;
use base64::Engine;
use serde_json::{Map, Value};

use crate::error::{FieldProblem, InvalidPaymentRequest};
use crate::money::AtomicAmount;
use crate::payment::{Network, describe, parse_address};

/// The longest report accepted, checked before decoding: a facilitator's answer is a few
/// hundred bytes (a hash, an address, a network, a short reason).
pub const MAX_REPORT_LEN: usize = 4096;

/// The longest `errorReason` kept (longer ones are cut, marked with an ellipsis).
pub const MAX_ERROR_REASON_LEN: usize = 200;

/// The field every problem is named under.
const FIELD: &str = "paymentResponse";

/// A report as the merchant sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportInput {
    /// x402 v2 `PAYMENT-RESPONSE`.
    X402V2(String),
    /// x402 v1 `X-PAYMENT-RESPONSE`.
    X402V1(String),
    /// MPP `Payment-Receipt`.
    MppReceipt(String),
}

/// A settlement report as an agent sends it (the report function's body, the client's
/// request): the payment it is about and exactly one of the merchant's answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SettlementRequest {
    pub agent_id: crate::request::AgentId,
    pub idempotency_key: crate::request::IdempotencyKey,
    #[serde(flatten)]
    pub report: ReportInput,
}

impl serde::Serialize for ReportInput {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(1))?;
        let (field, value) = self.field();
        map.serialize_entry(field, value)?;
        map.end()
    }
}

impl ReportInput {
    /// The request field carrying it, and its text.
    pub fn field(&self) -> (&'static str, &str) {
        match self {
            ReportInput::X402V2(value) => ("paymentResponse", value),
            ReportInput::X402V1(value) => ("xPaymentResponse", value),
            ReportInput::MppReceipt(value) => ("paymentReceipt", value),
        }
    }
}

/// The fields a settlement request may carry.
const REQUEST_FIELDS: [&str; 5] =
    ["agentId", "idempotencyKey", "paymentResponse", "xPaymentResponse", "paymentReceipt"];

impl SettlementRequest {
    /// Every problem found, each naming its field and what was expected.
    pub fn parse(body: &Value) -> Result<Self, InvalidPaymentRequest> {
        let Value::Object(fields) = body else {
            return Err(InvalidPaymentRequest::field(
                "body",
                describe(body),
                "a JSON object: {agentId, idempotencyKey, paymentResponse | xPaymentResponse | paymentReceipt}",
            ));
        };
        let mut problems = Vec::new();
        for name in fields.keys().filter(|name| !REQUEST_FIELDS.contains(&name.as_str())) {
            problems.push(FieldProblem::new(name, "a field", format!("only {}", REQUEST_FIELDS.join(", "))));
        }
        let text = |name: &str| fields.get(name).map(|v| v.as_str().ok_or_else(|| describe(v)));
        let mut id = |name: &str| match text(name) {
            None => {
                problems.push(FieldProblem::new(name, "nothing", "a string"));
                None
            }
            Some(Err(received)) => {
                problems.push(FieldProblem::new(name, received, "a string"));
                None
            }
            Some(Ok(value)) => Some(value.to_owned()),
        };
        let (agent, key) = (id("agentId"), id("idempotencyKey"));
        let agent =
            agent.and_then(|a| crate::request::AgentId::parse("agentId", &a).map_err(|p| problems.push(p)).ok());
        let key = key.and_then(|k| {
            crate::request::IdempotencyKey::parse("idempotencyKey", &k).map_err(|p| problems.push(p)).ok()
        });
        let answers: Vec<ReportInput> = [
            ("paymentResponse", ReportInput::X402V2 as fn(String) -> ReportInput),
            ("xPaymentResponse", ReportInput::X402V1),
            ("paymentReceipt", ReportInput::MppReceipt),
        ]
        .into_iter()
        .filter_map(|(name, make)| match text(name)? {
            Ok(value) => Some(make(value.to_owned())),
            Err(received) => {
                problems.push(FieldProblem::new(name, received, "a string"));
                None
            }
        })
        .collect();
        if answers.len() != 1 && problems.is_empty() {
            problems.push(FieldProblem::new(
                "paymentResponse",
                format!("{} of paymentResponse, xPaymentResponse, paymentReceipt", answers.len()),
                "exactly one: the merchant's PAYMENT-RESPONSE (x402 v2), X-PAYMENT-RESPONSE (v1) or Payment-Receipt (MPP)",
            ));
        }
        match (agent, key, answers.into_iter().next()) {
            (Some(agent_id), Some(idempotency_key), Some(report)) if problems.is_empty() => {
                Ok(Self { agent_id, idempotency_key, report })
            }
            _ => Err(InvalidPaymentRequest { problems }),
        }
    }
}

/// What the report says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReportedOutcome {
    /// Settled on chain: a transaction hash.
    Settled,
    /// Not failed, not confirmed: `success: false` with a transaction, or `settlement_pending`.
    Pending,
    /// `success: false` and no transaction.
    Failed,
}

/// A parsed report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettlementReport {
    pub outcome: ReportedOutcome,
    /// `0x` and 64 hex digits, lowercase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<AtomicAmount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
}

impl ReportInput {
    /// The report, or every problem found, each named under `paymentResponse`.
    pub fn parse(&self) -> Result<SettlementReport, InvalidPaymentRequest> {
        let (text, url_safe) = match self {
            ReportInput::X402V2(text) | ReportInput::X402V1(text) => (text, false),
            ReportInput::MppReceipt(text) => (text, true),
        };
        let fields = decode(text.trim(), url_safe)?;
        match self {
            ReportInput::MppReceipt(_) => mpp_receipt(&fields),
            _ => settlement_response(&fields),
        }
    }
}

/// Base64 (standard or URL-safe, padded or not) of a JSON object, bounded before decoding.
fn decode(text: &str, url_safe: bool) -> Result<Map<String, Value>, InvalidPaymentRequest> {
    if text.len() > MAX_REPORT_LEN {
        return Err(InvalidPaymentRequest::field(
            FIELD,
            format!("{} bytes", text.len()),
            format!("at most {MAX_REPORT_LEN} bytes"),
        ));
    }
    let engines = if url_safe {
        [base64::engine::general_purpose::URL_SAFE_NO_PAD, base64::engine::general_purpose::URL_SAFE]
    } else {
        [base64::engine::general_purpose::STANDARD, base64::engine::general_purpose::STANDARD_NO_PAD]
    };
    let expected = if url_safe { "base64url of a JSON object" } else { "base64 of a JSON object" };
    let bytes = engines
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .ok_or_else(|| InvalidPaymentRequest::field(FIELD, shorten(text), expected))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(other) => Err(InvalidPaymentRequest::field(FIELD, describe(&other), "a JSON object")),
        Err(e) => Err(InvalidPaymentRequest::field(FIELD, format!("bytes that are not JSON ({e})"), expected)),
    }
}

fn shorten(text: &str) -> String {
    let cut: String = text.chars().take(40).collect();
    if cut.len() < text.len() { format!("{cut:?}…") } else { format!("{cut:?}") }
}

/// A SettlementResponse (x402 v1 and v2 share it; v1 names networks, v2 uses CAIP-2).
fn settlement_response(fields: &Map<String, Value>) -> Result<SettlementReport, InvalidPaymentRequest> {
    let mut problems = Vec::new();
    let success = match fields.get("success") {
        Some(Value::Bool(success)) => Some(*success),
        // Some servers send it as a string.
        Some(Value::String(text)) if text == "true" || text == "false" => Some(text == "true"),
        Some(other) => {
            problems.push(FieldProblem::new(format!("{FIELD}.success"), describe(other), "true or false"));
            None
        }
        None => {
            problems.push(FieldProblem::missing(format!("{FIELD}.success"), "true or false"));
            None
        }
    };
    let transaction = optional_text(fields, "transaction", &mut problems)
        .filter(|t| !t.is_empty())
        .and_then(|t| transaction_hash(&t, "transaction", &mut problems));
    let network = optional_text(fields, "network", &mut problems).filter(|t| !t.is_empty()).and_then(|text| {
        text.parse::<Network>()
            .map_err(|expected| {
                problems.push(FieldProblem::new(format!("{FIELD}.network"), format!("{text:?}"), expected))
            })
            .ok()
    });
    let payer = optional_text(fields, "payer", &mut problems).filter(|t| !t.is_empty()).and_then(|text| {
        parse_address(&text)
            .map_err(|expected| {
                problems.push(FieldProblem::new(format!("{FIELD}.payer"), format!("{text:?}"), expected))
            })
            .ok()
    });
    let amount = optional_text(fields, "amount", &mut problems).filter(|t| !t.is_empty()).and_then(|text| {
        AtomicAmount::parse_positive(&text)
            .map_err(|e| {
                problems.push(FieldProblem::new(format!("{FIELD}.amount"), format!("{text:?}"), e.to_string()))
            })
            .ok()
    });
    let error_reason = optional_text(fields, "errorReason", &mut problems).filter(|t| !t.is_empty()).map(|reason| {
        let kept: String = reason.chars().filter(|c| !c.is_control()).take(MAX_ERROR_REASON_LEN).collect();
        if kept.chars().count() < reason.chars().count() { format!("{kept}…") } else { kept }
    });
    if !problems.is_empty() {
        return Err(InvalidPaymentRequest { problems });
    }
    let success = success.expect("checked above");
    if success && transaction.is_none() {
        return Err(InvalidPaymentRequest::field(
            format!("{FIELD}.transaction"),
            "nothing",
            "the settlement's transaction hash when success is true",
        ));
    }
    let pending = error_reason.as_deref() == Some("settlement_pending");
    let outcome = match (success, &transaction) {
        (true, _) => ReportedOutcome::Settled,
        (false, Some(_)) => ReportedOutcome::Pending,
        (false, None) if pending => ReportedOutcome::Pending,
        (false, None) => ReportedOutcome::Failed,
    };
    Ok(SettlementReport {
        outcome,
        transaction,
        network,
        payer: payer.map(|a| a.to_checksum(None)),
        amount,
        error_reason,
    })
}

/// An MPP receipt: it only ever reports success, with the method's reference (for an EVM
/// charge, the transaction hash).
fn mpp_receipt(fields: &Map<String, Value>) -> Result<SettlementReport, InvalidPaymentRequest> {
    let mut problems = Vec::new();
    match optional_text(fields, "status", &mut problems) {
        Some(status) if status == "success" => {}
        Some(status) => {
            problems.push(FieldProblem::new(format!("{FIELD}.status"), format!("{status:?}"), "\"success\""))
        }
        None => problems.push(FieldProblem::missing(format!("{FIELD}.status"), "\"success\"")),
    }
    let reference = match optional_text(fields, "reference", &mut problems) {
        Some(reference) => transaction_hash(&reference, "reference", &mut problems),
        None => {
            problems.push(FieldProblem::missing(format!("{FIELD}.reference"), "the transaction hash"));
            None
        }
    };
    if !problems.is_empty() {
        return Err(InvalidPaymentRequest { problems });
    }
    Ok(SettlementReport {
        outcome: ReportedOutcome::Settled,
        transaction: reference,
        network: None,
        payer: None,
        amount: None,
        error_reason: None,
    })
}

/// A string field, if present (`null` counts as absent); anything else is a problem.
fn optional_text(fields: &Map<String, Value>, name: &str, problems: &mut Vec<FieldProblem>) -> Option<String> {
    match fields.get(name) {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(other) => {
            problems.push(FieldProblem::new(format!("{FIELD}.{name}"), describe(other), "a string"));
            None
        }
    }
}

/// `0x` and 64 hex digits, kept lowercase.
fn transaction_hash(text: &str, name: &str, problems: &mut Vec<FieldProblem>) -> Option<String> {
    let hex = text.strip_prefix("0x").filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    match hex {
        Some(hex) => Some(format!("0x{}", hex.to_ascii_lowercase())),
        None => {
            problems.push(FieldProblem::new(
                format!("{FIELD}.{name}"),
                shorten(text),
                "a transaction hash: 0x and 64 hex digits",
            ));
            None
        }
    }
}

/// The payment as it was authorized, what a report is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedPayment {
    pub network: Network,
    pub payer: Option<Address>,
    pub amount: AtomicAmount,
}

/// The first field in which a report contradicts the authorized payment: (field, reported,
/// authorized).
pub fn mismatch(report: &SettlementReport, paid: &AuthorizedPayment) -> Option<(String, String, String)> {
    if let Some(network) = report.network
        && network != paid.network
    {
        return Some(("network".into(), network.to_string(), paid.network.to_string()));
    }
    if let (Some(reported), Some(payer)) = (&report.payer, paid.payer)
        && reported != &payer.to_checksum(None)
    {
        return Some(("payer".into(), reported.clone(), payer.to_checksum(None)));
    }
    if let Some(amount) = report.amount
        && amount != paid.amount
    {
        return Some(("amount".into(), amount.get().to_string(), paid.amount.get().to_string()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TX: &str = "0x8f2c3f0f9d7a3a0c2f4b1e6d5c4b3a291807f6e5d4c3b2a1908f7e6d5c4b3a29";
    const PAYER: &str = "0x857b06519E91e3A54538791bDbb0E22373e36b66";

    fn v2(value: Value) -> ReportInput {
        ReportInput::X402V2(base64::engine::general_purpose::STANDARD.encode(value.to_string()))
    }

    #[test]
    fn a_facilitator_s_answers_are_read_as_settled_pending_or_failed() {
        let settled = v2(json!({"success": true, "transaction": TX, "network": "eip155:84532", "payer": PAYER}));
        let report = settled.parse().unwrap();
        assert_eq!(report.outcome, ReportedOutcome::Settled);
        assert_eq!((report.transaction.as_deref(), report.network), (Some(TX), Some(Network::BaseSepolia)));
        assert_eq!(report.payer.as_deref(), Some(PAYER));
        let pending =
            v2(json!({"success": false, "transaction": TX, "network": "eip155:84532", "errorReason": "timeout"}));
        assert_eq!(pending.parse().unwrap().outcome, ReportedOutcome::Pending);
        let named = v2(json!({"success": false, "transaction": "", "errorReason": "settlement_pending"}));
        assert_eq!(named.parse().unwrap().outcome, ReportedOutcome::Pending);
        let failed = v2(json!({"success": false, "transaction": "", "errorReason": "insufficient_funds"}));
        let failed = failed.parse().unwrap();
        assert_eq!(
            (failed.outcome, failed.error_reason.as_deref()),
            (ReportedOutcome::Failed, Some("insufficient_funds"))
        );
        // v1 names the network; a string "true" is read as true.
        let v1 = json!({"success": "true", "transaction": TX, "network": "base-sepolia"}).to_string();
        let v1 = ReportInput::X402V1(base64::engine::general_purpose::STANDARD.encode(v1)).parse().unwrap();
        assert_eq!((v1.outcome, v1.network), (ReportedOutcome::Settled, Some(Network::BaseSepolia)));
        // MPP: base64url without padding.
        let receipt =
            json!({"status": "success", "method": "evm", "timestamp": "2026-11-30T00:00:00Z", "reference": TX});
        let receipt = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(receipt.to_string());
        let receipt = ReportInput::MppReceipt(receipt).parse().unwrap();
        assert_eq!((receipt.outcome, receipt.transaction.as_deref()), (ReportedOutcome::Settled, Some(TX)));
    }

    #[test]
    fn every_problem_is_named_with_what_was_received_and_expected() {
        let bad =
            v2(json!({"success": 1, "transaction": "0x12", "network": "eip155:1", "payer": "bob", "amount": "-3"}));
        let error = bad.parse().unwrap_err().to_string();
        for field in [
            "paymentResponse.success",
            "paymentResponse.transaction",
            "paymentResponse.network",
            "paymentResponse.payer",
            "paymentResponse.amount",
        ] {
            assert!(error.contains(field), "{field} in {error}");
        }
        let claimed = v2(json!({"success": true, "transaction": ""})).parse().unwrap_err().to_string();
        assert!(claimed.contains("paymentResponse.transaction: received nothing"), "{claimed}");
        let huge = ReportInput::X402V2("A".repeat(MAX_REPORT_LEN + 1)).parse().unwrap_err().to_string();
        assert!(huge.contains("at most 4096 bytes"), "{huge}");
        let not_base64 = ReportInput::X402V2("%%%".into()).parse().unwrap_err().to_string();
        assert!(not_base64.contains("base64 of a JSON object"), "{not_base64}");
        let array = ReportInput::X402V2(base64::engine::general_purpose::STANDARD.encode("[1]")).parse().unwrap_err();
        assert!(array.to_string().contains("a JSON object"), "{array}");
        let failure = json!({"status": "failed", "reference": TX}).to_string();
        let failure = ReportInput::MppReceipt(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(failure));
        assert!(failure.parse().unwrap_err().to_string().contains("paymentResponse.status"));
    }

    #[test]
    fn a_long_error_reason_is_cut_and_control_characters_dropped() {
        let report =
            v2(json!({"success": false, "errorReason": format!("a\u{7}{}", "x".repeat(500))})).parse().unwrap();
        let reason = report.error_reason.unwrap();
        assert_eq!(reason.chars().count(), MAX_ERROR_REASON_LEN + 1);
        assert!(reason.starts_with("ax") && reason.ends_with('…'));
    }

    #[test]
    fn a_report_that_contradicts_the_payment_names_the_field() {
        let paid = AuthorizedPayment {
            network: Network::BaseSepolia,
            payer: Some(PAYER.parse().unwrap()),
            amount: AtomicAmount::new(10_000).unwrap(),
        };
        let report = |value: Value| v2(value).parse().unwrap();
        let fine = report(
            json!({"success": true, "transaction": TX, "network": "eip155:84532", "payer": PAYER, "amount": "10000"}),
        );
        assert_eq!(mismatch(&fine, &paid), None);
        let other_payer =
            report(json!({"success": true, "transaction": TX, "payer": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"}));
        assert_eq!(mismatch(&other_payer, &paid).unwrap().0, "payer");
        let other_amount = report(json!({"success": true, "transaction": TX, "amount": "9999"}));
        assert_eq!(mismatch(&other_amount, &paid), Some(("amount".into(), "9999".into(), "10000".into())));
        let other_network = report(json!({"success": true, "transaction": TX, "network": "eip155:8453"}));
        assert_eq!(mismatch(&other_network, &paid).unwrap().0, "network");
    }
}

#[cfg(test)]
mod request_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_settlement_request_carries_exactly_one_answer_and_names_every_problem() {
        let body = json!({"agentId": "a-1", "idempotencyKey": "k-1", "xPaymentResponse": "e30="});
        let request = SettlementRequest::parse(&body).unwrap();
        assert_eq!(request.report, ReportInput::X402V1("e30=".into()));
        assert_eq!(serde_json::to_value(&request).unwrap(), body, "it serialises back to what was sent");

        let none = SettlementRequest::parse(&json!({"agentId": "a-1", "idempotencyKey": "k-1"})).unwrap_err();
        assert!(none.to_string().contains("exactly one"), "{none}");
        let two = json!({"agentId": "a-1", "idempotencyKey": "k-1", "paymentResponse": "x", "paymentReceipt": "y"});
        assert!(SettlementRequest::parse(&two).unwrap_err().to_string().contains("2 of paymentResponse"));
        let bad = json!({"agentId": "a 1", "idempotencyKey": 7, "paymentResponse": "x", "extra": true});
        let text = SettlementRequest::parse(&bad).unwrap_err().to_string();
        for field in ["agentId", "idempotencyKey", "extra"] {
            assert!(text.contains(field), "{field} in {text}");
        }
        assert!(SettlementRequest::parse(&json!([1])).unwrap_err().to_string().contains("a JSON object"));
    }
}
