//! MPP (Machine Payments Protocol) challenges: `WWW-Authenticate: Payment id=…, realm=…,
//! method=…, intent=…, request=<base64url JSON>`.
//!
//! agentpay never signs MPP itself: the raw header goes to AgentCore verbatim. It still reads
//! the challenge, because the spend policy must know the amount, payee, network and asset
//! before anything is reserved. Only the `charge` intent on networks the ledger knows (USDC on
//! Base and Base Sepolia, identified by `methodDetails.chainId`) is accepted; anything else is
//! refused with the field that made it so, before any reservation.
//!
//! Hand-written rather than taken from the `mpp` crate: it pulls a whole client/server stack
//! (HTTP, Tempo signing) for the hundred lines of auth-param parsing needed here, and its
//! errors do not name fields.

use base64::Engine;
use serde_json::{Map, Value};

use crate::error::{FieldProblem, InvalidPaymentRequest, PaymentError};
use crate::money::AtomicAmount;
use crate::payment::{Allowlist, MppDetails, Network, PaymentProtocol, PaymentRequirement, describe, parse_address};

const ORIGIN: &str = "challenge.mpp";
/// The MPP protocol version AgentCore is told (the draft's first version; `ProcessPayment`
/// accepts "1" or "2").
pub const MPP_VERSION: &str = "1";
/// AgentCore accepts a header value of at most 16,384 characters.
pub const MAX_HEADER_LEN: usize = 16_384;

/// A parsed `Payment` challenge.
#[derive(Debug, Clone, PartialEq)]
pub struct MppChallenge {
    pub params: Map<String, Value>,
    pub request: Value,
    pub header: String,
}

impl MppChallenge {
    pub fn parse(header: &str) -> Result<Self, InvalidPaymentRequest> {
        let trimmed = header.trim();
        if trimmed.len() > MAX_HEADER_LEN {
            return Err(InvalidPaymentRequest::field(
                ORIGIN,
                format!("{} characters", trimmed.len()),
                format!("a WWW-Authenticate value of at most {MAX_HEADER_LEN} characters"),
            ));
        }
        let Some(rest) = strip_scheme(trimmed) else {
            return Err(InvalidPaymentRequest::field(
                ORIGIN,
                format!("{trimmed:?}"),
                "a WWW-Authenticate value of the \"Payment\" scheme (Payment id=\"…\", realm=\"…\", method=\"…\", intent=\"charge\", request=\"…\")",
            ));
        };
        let params = parse_auth_params(rest).map_err(|problem| {
            InvalidPaymentRequest::field(
                ORIGIN,
                problem,
                "one Payment challenge: comma-separated name=value or name=\"quoted value\" parameters",
            )
        })?;
        let mut problems = Vec::new();
        for name in ["id", "realm", "method", "intent", "request"] {
            match params.get(name) {
                Some(Value::String(v)) if !v.is_empty() => {}
                _ => problems.push(FieldProblem::missing(format!("{ORIGIN}.{name}"), "a non-empty parameter")),
            }
        }
        if let Some(Value::String(intent)) = params.get("intent")
            && intent != "charge"
        {
            problems.push(FieldProblem::new(
                format!("{ORIGIN}.intent"),
                format!("{intent:?}"),
                "\"charge\" (agentpay pays one-time charges; session intents are not supported)",
            ));
        }
        if let Some(Value::String(id)) = params.get("id")
            && id.len() > 512
        {
            problems.push(FieldProblem::new(
                format!("{ORIGIN}.id"),
                format!("{} characters", id.len()),
                "at most 512 characters",
            ));
        }
        let request = match params.get("request") {
            Some(Value::String(encoded)) if !encoded.is_empty() => match decode_request(encoded) {
                Ok(request) => Some(request),
                Err(problem) => {
                    problems.push(problem);
                    None
                }
            },
            _ => None,
        };
        match request {
            Some(request) if problems.is_empty() => Ok(Self { params, request, header: trimmed.to_owned() }),
            _ => Err(InvalidPaymentRequest { problems }),
        }
    }

    fn param(&self, name: &str) -> &str {
        self.params.get(name).and_then(Value::as_str).unwrap_or_default()
    }

    /// Validates the charge request and checks it against the agent's allowlist.
    pub fn select(&self, allow: &Allowlist, agent: &str) -> Result<PaymentRequirement, PaymentError> {
        let field = |name: &str| format!("{ORIGIN}.request.{name}");
        let Value::Object(request) = &self.request else {
            return Err(InvalidPaymentRequest::field(field(""), describe(&self.request), "a JSON object").into());
        };
        let mut problems = Vec::new();
        let amount = match request.get("amount") {
            Some(Value::String(text)) => AtomicAmount::parse_positive(text)
                .map_err(|e| {
                    problems.push(FieldProblem::new(
                        field("amount"),
                        format!("{text:?}"),
                        format!("{e} (base units, e.g. \"10000\" for 0.01 USDC)"),
                    ))
                })
                .ok(),
            Some(other) => {
                problems.push(FieldProblem::new(field("amount"), describe(other), "a decimal string in base units"));
                None
            }
            None => {
                problems.push(FieldProblem::missing(field("amount"), "a decimal string in base units"));
                None
            }
        };
        let network = match request.get("methodDetails").and_then(|d| d.get("chainId")) {
            Some(Value::Number(n)) => {
                let known = Network::ALL.into_iter().find(|net| Some(net.chain_id()) == n.as_u64());
                if known.is_none() {
                    problems.push(FieldProblem::new(
                        field("methodDetails.chainId"),
                        n.to_string(),
                        chain_expectation(),
                    ));
                }
                known
            }
            Some(other) => {
                problems.push(FieldProblem::new(field("methodDetails.chainId"), describe(other), chain_expectation()));
                None
            }
            None => {
                problems.push(FieldProblem::missing(field("methodDetails.chainId"), chain_expectation()));
                None
            }
        };
        let mut address = |name: &str| match request.get(name) {
            Some(Value::String(text)) => parse_address(text)
                .map_err(|e| problems.push(FieldProblem::new(field(name), format!("{text:?}"), e)))
                .ok(),
            Some(other) => {
                problems.push(FieldProblem::new(field(name), describe(other), "a 0x address"));
                None
            }
            None => {
                problems.push(FieldProblem::missing(field(name), "a 0x address"));
                None
            }
        };
        let asset = address("currency");
        let pay_to = address("recipient");
        if let (Some(network), Some(asset)) = (network, asset)
            && asset != network.usdc().address
        {
            problems.push(FieldProblem::new(
                field("currency"),
                asset.to_checksum(None),
                format!("{} (USDC on {network})", network.usdc().address.to_checksum(None)),
            ));
        }
        if let (Some(network), Some(decimals)) = (network, request.get("decimals"))
            && decimals.as_u64() != Some(u64::from(network.usdc().decimals))
        {
            problems.push(FieldProblem::new(
                field("decimals"),
                describe(decimals),
                format!("{} (USDC)", network.usdc().decimals),
            ));
        }
        let (Some(amount), Some(network), Some(asset), Some(pay_to)) = (amount, network, asset, pay_to) else {
            return Err(InvalidPaymentRequest { problems }.into());
        };
        if !problems.is_empty() {
            return Err(InvalidPaymentRequest { problems }.into());
        }
        if !allow.networks.contains(&network) {
            return Err(PaymentError::PolicyDenied {
                agent: agent.to_owned(),
                reason: format!("{ORIGIN}: network {network} is not in the allowlist"),
            });
        }
        if !allow.payees.is_empty() && !allow.payees.contains(&pay_to) {
            return Err(PaymentError::PolicyDenied {
                agent: agent.to_owned(),
                reason: format!("{ORIGIN}: payee {pay_to} is not in the payee allowlist"),
            });
        }
        Ok(PaymentRequirement {
            protocol: PaymentProtocol::Mpp(MppDetails {
                version: MPP_VERSION.to_owned(),
                challenge_id: self.param("id").to_owned(),
                method: self.param("method").to_owned(),
                header: self.header.clone(),
            }),
            index: 0,
            network,
            asset,
            pay_to,
            amount,
            max_timeout_seconds: 0,
            accepted: self.request.clone(),
            resource: None,
            extensions: None,
        })
    }
}

fn chain_expectation() -> String {
    let known: Vec<String> = Network::ALL.iter().map(|n| format!("{} ({n})", n.chain_id())).collect();
    format!("a chain agentpay's ledger knows: {}", known.join(" or "))
}

fn strip_scheme(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(|c: char| c.is_ascii_whitespace())?;
    scheme.eq_ignore_ascii_case("Payment").then_some(rest.trim_start())
}

/// RFC 9110 auth-params: `name=token` or `name="quoted \" string"`, comma separated. A second
/// challenge in the same value (a bare token after a comma) is refused: AgentCore takes one.
fn parse_auth_params(text: &str) -> Result<Map<String, Value>, String> {
    let mut params = Map::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_ascii_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(params);
        }
        let name: String =
            std::iter::from_fn(|| chars.next_if(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))).collect();
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        if name.is_empty() || chars.next() != Some('=') {
            return Err(format!("{name:?} without a value (a second challenge, or a malformed parameter)"));
        }
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        let value = if chars.next_if_eq(&'"').is_some() {
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some('"') => break value,
                    Some('\\') => value.push(chars.next().ok_or("a quoted value ending in a backslash")?),
                    Some(c) => value.push(c),
                    None => return Err(format!("an unterminated quoted value for {name:?}")),
                }
            }
        } else {
            std::iter::from_fn(|| chars.next_if(|c| *c != ',' && !c.is_ascii_whitespace())).collect()
        };
        if params.insert(name.to_ascii_lowercase(), Value::String(value)).is_some() {
            return Err(format!("the parameter {name:?} twice"));
        }
    }
}

fn decode_request(encoded: &str) -> Result<Value, FieldProblem> {
    let field = format!("{ORIGIN}.request");
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded.trim_end_matches('=')).map_err(|e| {
            FieldProblem::new(
                &field,
                format!("text that is not base64url ({e})"),
                "base64url of the charge request JSON",
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        FieldProblem::new(
            &field,
            format!("base64url of something that is not JSON ({e})"),
            "base64url of the charge request JSON",
        )
    })
}

/// Builds a `WWW-Authenticate: Payment` value (for samples and tests).
pub fn encode_challenge(id: &str, method: &str, request: &Value) -> String {
    let request = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(request.to_string());
    format!(
        "Payment id=\"{id}\", realm=\"api.example.com\", method=\"{method}\", intent=\"charge\", request=\"{request}\""
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::samples::SAMPLE_PAYEE;

    fn charge(chain_id: u64) -> Value {
        json!({
            "amount": "250000",
            "currency": Network::BaseSepolia.usdc().address.to_checksum(None),
            "recipient": SAMPLE_PAYEE,
            "methodDetails": {"chainId": chain_id},
        })
    }

    fn allow_all() -> Allowlist {
        Allowlist { networks: Network::ALL.to_vec(), payees: vec![] }
    }

    #[test]
    fn a_charge_on_base_sepolia_becomes_a_requirement_that_keeps_the_header_verbatim() {
        let header = encode_challenge("ch_1", "evm", &charge(84532));
        let requirement = MppChallenge::parse(&header).unwrap().select(&allow_all(), "agent").unwrap();
        assert_eq!(requirement.amount.to_string(), "250000");
        assert_eq!(requirement.network, Network::BaseSepolia);
        let PaymentProtocol::Mpp(details) = requirement.protocol else { panic!("not MPP") };
        assert_eq!(details.header, header);
        assert_eq!(details.challenge_id, "ch_1");
        assert_eq!(details.version, "1");
    }

    #[test]
    fn quoted_values_may_hold_commas_and_escaped_quotes() {
        let params = parse_auth_params(r#"id="a,b", realm=api, description="say \"hi\"""#).unwrap();
        assert_eq!(params["id"], "a,b");
        assert_eq!(params["realm"], "api");
        assert_eq!(params["description"], "say \"hi\"");
    }

    #[test]
    fn malformed_challenges_name_the_field() {
        let cases: Vec<(String, &str)> = vec![
            ("Bearer realm=\"x\"".into(), "challenge.mpp"),
            ("Payment id=\"x\", realm=\"r\", method=\"m\", intent=\"charge\"".into(), "challenge.mpp.request"),
            (
                encode_challenge("x", "m", &charge(84532)).replace("intent=\"charge\"", "intent=\"session\""),
                "challenge.mpp.intent",
            ),
            (
                "Payment id=\"x\", realm=\"r\", method=\"m\", intent=\"charge\", request=\"%%%\"".into(),
                "challenge.mpp.request",
            ),
            (format!("{}, Payment id=\"y\"", encode_challenge("x", "m", &charge(84532))), "challenge.mpp"),
            ("Payment id=\"x".into(), "challenge.mpp"),
        ];
        for (header, field) in cases {
            let error = MppChallenge::parse(&header).expect_err(&header);
            assert!(error.problems.iter().any(|p| p.field == field), "{header}: {error}");
        }
    }

    #[test]
    fn charge_requests_are_checked_field_by_field() {
        let mut bad = charge(4217);
        bad["amount"] = json!("0.25");
        bad["recipient"] = json!("0xnot");
        let header = encode_challenge("x", "tempo", &bad);
        let PaymentError::InvalidPaymentRequest(error) =
            MppChallenge::parse(&header).unwrap().select(&allow_all(), "a").unwrap_err()
        else {
            panic!("not invalid")
        };
        let fields: Vec<&str> = error.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "challenge.mpp.request.amount",
                "challenge.mpp.request.methodDetails.chainId",
                "challenge.mpp.request.recipient"
            ]
        );
        assert!(error.to_string().contains("8453 (eip155:8453)") || error.to_string().contains("8453"), "{error}");

        let mut wrong_asset = charge(8453);
        wrong_asset["currency"] = json!(Network::BaseSepolia.usdc().address.to_checksum(None));
        let header = encode_challenge("x", "evm", &wrong_asset);
        let error = MppChallenge::parse(&header).unwrap().select(&allow_all(), "a").unwrap_err();
        assert!(error.to_string().contains("challenge.mpp.request.currency"), "{error}");
    }

    #[test]
    fn the_allowlist_applies_to_mpp_as_to_x402() {
        let header = encode_challenge("x", "evm", &charge(84532));
        let only_base = Allowlist { networks: vec![Network::Base], payees: vec![] };
        let error = MppChallenge::parse(&header).unwrap().select(&only_base, "a").unwrap_err();
        assert_eq!(error.name(), "PolicyDenied");
    }
}
