//! x402 challenges: parsing and validation before any money is touched.
//!
//! Wire types are hand-written rather than taken from `x402-types`: that crate deserialises
//! with serde and reports the first mismatch as a serde message, while a payment system must
//! say, per field, what it received and what it expected (and keep the accepted entry
//! byte-for-byte to echo it back in the v2 `PaymentPayload`). The shapes follow the x402 v1
//! and v2 specifications.

use alloy_primitives::Address;
use base64::Engine;
use serde_json::{Map, Value, json};

use crate::error::{FieldProblem, InvalidPaymentRequest, PaymentError};
use crate::money::{AmountError, AtomicAmount};
use crate::payment::{
    Allowlist, Network, PaymentHeader, PaymentProtocol, PaymentRequirement, X402Version, describe, parse_address,
};

/// Bounds on `maxTimeoutSeconds`: the signed authorization is valid this long. Zero cannot be
/// paid in time; more than an hour leaves a bearer instrument lying around for no reason.
pub const MAX_TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 1..=3600;

/// The longest `PAYMENT-REQUIRED` value decoded: 16 KB, like MPP's, and the header size common
/// HTTP stacks accept at all (a real one is about 1 KB). Checked before any decoding.
pub const MAX_HEADER_LEN: usize = 16_384;

/// The most `accepts[]` entries a challenge may offer: every one is validated and may be
/// named in an error, so their number is bounded (real servers offer a handful).
pub const MAX_ACCEPTS: usize = 20;

/// A parsed challenge: structurally sound, entries not yet validated.
#[derive(Debug, Clone)]
pub struct Challenge {
    pub version: X402Version,
    /// v2 `resource` object (v1 carries the resource inside each entry).
    pub resource: Option<Value>,
    pub accepts: Vec<Value>,
    pub extensions: Option<Value>,
    /// Where the challenge sits in the request, for error paths (`challenge.x402`).
    pub origin: &'static str,
}

impl Challenge {
    /// Decodes an x402 v2 `PAYMENT-REQUIRED` header value (base64 of the PaymentRequired JSON).
    pub fn from_v2_header(header: &str) -> Result<Self, InvalidPaymentRequest> {
        const ORIGIN: &str = "challenge.x402";
        let trimmed = header.trim();
        if trimmed.is_empty() {
            return Err(InvalidPaymentRequest::field(
                ORIGIN,
                "an empty string",
                "the base64 PAYMENT-REQUIRED header value",
            ));
        }
        if trimmed.len() > MAX_HEADER_LEN {
            return Err(InvalidPaymentRequest::field(
                ORIGIN,
                format!("{} characters", trimmed.len()),
                format!("a PAYMENT-REQUIRED value of at most {MAX_HEADER_LEN} characters"),
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(trimmed)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed))
            .map_err(|e| {
                InvalidPaymentRequest::field(
                    ORIGIN,
                    format!("text that is not base64 ({e})"),
                    "the base64-encoded PaymentRequired JSON from the PAYMENT-REQUIRED header",
                )
            })?;
        let body: Value = serde_json::from_slice(&bytes).map_err(|e| {
            InvalidPaymentRequest::field(
                ORIGIN,
                format!("base64 of something that is not JSON ({e})"),
                "base64 of a PaymentRequired JSON object",
            )
        })?;
        Self::from_body(body, X402Version::V2, ORIGIN)
    }

    /// Reads an x402 v1 402 response body.
    pub fn from_v1_body(body: Value) -> Result<Self, InvalidPaymentRequest> {
        Self::from_body(body, X402Version::V1, "challenge.x402v1")
    }

    fn from_body(body: Value, expected: X402Version, origin: &'static str) -> Result<Self, InvalidPaymentRequest> {
        let Value::Object(mut body) = body else {
            return Err(InvalidPaymentRequest::field(origin, describe(&body), "a PaymentRequired JSON object"));
        };
        let field = |name: &str| format!("{origin}.{name}");
        match body.get("x402Version") {
            Some(Value::Number(n)) if n.as_u64() == Some(u64::from(expected.number())) => {}
            Some(other) => {
                let hint = match expected {
                    X402Version::V2 => {
                        "2 (a PAYMENT-REQUIRED header is x402 v2; pass a v1 402 body as challenge.x402v1)"
                    }
                    X402Version::V1 => "1 (a v1 402 body; pass a v2 PAYMENT-REQUIRED header value as challenge.x402)",
                };
                return Err(InvalidPaymentRequest::field(field("x402Version"), describe(other), hint));
            }
            None => {
                return Err(FieldProblem::missing(field("x402Version"), format!("{}", expected.number())).into());
            }
        }
        let accepts = match body.remove("accepts") {
            Some(Value::Array(entries)) if entries.len() > MAX_ACCEPTS => {
                return Err(InvalidPaymentRequest::field(
                    field("accepts"),
                    format!("{} payment requirements", entries.len()),
                    format!("at most {MAX_ACCEPTS} payment requirements"),
                ));
            }
            Some(Value::Array(entries)) if !entries.is_empty() => entries,
            Some(Value::Array(_)) => {
                return Err(InvalidPaymentRequest::field(
                    field("accepts"),
                    "an empty array",
                    "at least one payment requirement",
                ));
            }
            Some(other) => {
                return Err(InvalidPaymentRequest::field(
                    field("accepts"),
                    describe(&other),
                    "an array of payment requirements",
                ));
            }
            None => {
                return Err(FieldProblem::missing(field("accepts"), "an array of payment requirements").into());
            }
        };
        let resource = body.remove("resource").filter(|r| !r.is_null());
        if expected == X402Version::V2
            && let Some(resource) = &resource
            && !resource.get("url").is_some_and(Value::is_string)
        {
            return Err(InvalidPaymentRequest::field(
                field("resource"),
                describe(resource),
                "an object with a string \"url\"",
            ));
        }
        Ok(Self {
            version: expected,
            resource,
            accepts,
            extensions: body.remove("extensions").filter(|e| !e.is_null()),
            origin,
        })
    }

    /// Chooses the first entry that is valid and that the policy allows.
    ///
    /// Malformed entries are `InvalidPaymentRequest` (every problem listed); well-formed entries
    /// that the policy does not allow are `PolicyDenied`.
    pub fn select(&self, allow: &Allowlist, agent: &str) -> Result<PaymentRequirement, PaymentError> {
        let mut problems = Vec::new();
        let mut disallowed = Vec::new();
        for (index, entry) in self.accepts.iter().enumerate() {
            let path = format!("{}.accepts[{index}]", self.origin);
            match self.validate_entry(index, entry) {
                Err(entry_problems) => problems.extend(entry_problems.into_iter().map(|p| p.within(&path))),
                Ok(requirement) => {
                    if !allow.networks.contains(&requirement.network) {
                        disallowed.push(format!(
                            "{path}: network {} is not in the allowlist [{}]",
                            requirement.network,
                            allow.networks.iter().map(|n| n.caip2()).collect::<Vec<_>>().join(", ")
                        ));
                    } else if !allow.payees.is_empty() && !allow.payees.contains(&requirement.pay_to) {
                        disallowed.push(format!("{path}: payee {} is not in the payee allowlist", requirement.pay_to));
                    } else {
                        return Ok(requirement);
                    }
                }
            }
        }
        if disallowed.is_empty() {
            Err(InvalidPaymentRequest { problems }.into())
        } else {
            Err(PaymentError::PolicyDenied { agent: agent.to_owned(), reason: disallowed.join("; ") })
        }
    }

    fn validate_entry(&self, index: usize, entry: &Value) -> Result<PaymentRequirement, Vec<FieldProblem>> {
        let Value::Object(fields) = entry else {
            return Err(vec![FieldProblem::new("", describe(entry), "a payment requirement object")]);
        };
        let mut problems = Vec::new();
        let version = self.version;

        match fields.get("scheme") {
            Some(Value::String(s)) if s == "exact" => {}
            Some(other) => {
                problems.push(FieldProblem::new("scheme", describe(other), "\"exact\" (the only scheme agentpay pays)"))
            }
            None => problems.push(FieldProblem::missing("scheme", "\"exact\"")),
        }

        let network = match fields.get("network") {
            Some(Value::String(name)) => {
                let found = match version {
                    X402Version::V1 => Network::from_v1_name(name),
                    X402Version::V2 => Network::from_caip2(name),
                };
                if found.is_none() {
                    let hint = match (version, Network::from_caip2(name).or_else(|| Network::from_v1_name(name))) {
                        (X402Version::V2, Some(n)) => {
                            format!(" (x402 v2 uses CAIP-2: {:?})", n.caip2())
                        }
                        (X402Version::V1, Some(n)) => {
                            format!(" (x402 v1 uses network names: {:?})", n.v1_name())
                        }
                        _ => String::new(),
                    };
                    problems.push(FieldProblem::new(
                        "network",
                        format!("{name:?}"),
                        format!("{}{hint}", Network::known_list(version)),
                    ));
                }
                found
            }
            Some(other) => {
                problems.push(FieldProblem::new("network", describe(other), Network::known_list(version)));
                None
            }
            None => {
                problems.push(FieldProblem::missing("network", Network::known_list(version)));
                None
            }
        };

        let amount_field = match version {
            X402Version::V1 => "maxAmountRequired",
            X402Version::V2 => "amount",
        };
        let amount = match fields.get(amount_field) {
            Some(Value::String(text)) => match AtomicAmount::parse_positive(text) {
                Ok(amount) => Some(amount),
                Err(error) => {
                    problems.push(FieldProblem::new(amount_field, format!("{text:?}"), amount_expectation(&error)));
                    None
                }
            },
            Some(other) => {
                problems.push(FieldProblem::new(
                    amount_field,
                    describe(other),
                    "a decimal string of atomic units, e.g. \"10000\"",
                ));
                None
            }
            None => {
                problems.push(FieldProblem::missing(amount_field, "a decimal string of atomic units, e.g. \"10000\""));
                None
            }
        };

        let asset = address_field(fields, "asset", &mut problems);
        if let (Some(asset), Some(network)) = (asset, network)
            && asset != network.usdc().address
        {
            problems.push(FieldProblem::new(
                "asset",
                asset.to_checksum(None),
                format!("{} (the canonical USDC contract on {network})", network.usdc().address.to_checksum(None)),
            ));
        }

        let pay_to = address_field(fields, "payTo", &mut problems);
        if pay_to == Some(Address::ZERO) {
            problems.push(FieldProblem::new("payTo", "the zero address", "the address of the payee"));
        }

        let max_timeout_seconds = match fields.get("maxTimeoutSeconds") {
            Some(Value::Number(n)) if n.as_u64().is_some_and(|s| MAX_TIMEOUT_SECONDS.contains(&s)) => n.as_u64(),
            Some(other) => {
                problems.push(FieldProblem::new(
                    "maxTimeoutSeconds",
                    describe(other),
                    format!(
                        "a whole number of seconds from {} to {}",
                        MAX_TIMEOUT_SECONDS.start(),
                        MAX_TIMEOUT_SECONDS.end()
                    ),
                ));
                None
            }
            None => {
                problems.push(FieldProblem::missing("maxTimeoutSeconds", "a whole number of seconds"));
                None
            }
        };

        if let Some(network) = network {
            let usdc = network.usdc();
            let extra = fields.get("extra");
            for (key, wanted) in [("name", usdc.eip712_name), ("version", usdc.eip712_version)] {
                let expected = format!("{wanted:?} (the EIP-712 domain {key} of USDC on {network})");
                match extra.and_then(|e| e.get(key)) {
                    Some(Value::String(s)) if s == wanted => {}
                    Some(other) => problems.push(FieldProblem::new(format!("extra.{key}"), describe(other), expected)),
                    None => problems.push(FieldProblem::missing(format!("extra.{key}"), expected)),
                }
            }
        }

        match (network, amount, asset, pay_to, max_timeout_seconds) {
            (Some(network), Some(amount), Some(asset), Some(pay_to), Some(max_timeout_seconds))
                if problems.is_empty() =>
            {
                Ok(PaymentRequirement {
                    protocol: PaymentProtocol::X402 { version },
                    index,
                    network,
                    asset,
                    pay_to,
                    amount,
                    max_timeout_seconds,
                    accepted: entry.clone(),
                    resource: self.resource.clone(),
                    extensions: self.extensions.clone(),
                })
            }
            _ => Err(problems),
        }
    }
}

fn amount_expectation(error: &AmountError) -> String {
    format!("{error} (a positive decimal string, e.g. \"10000\" for 0.01 USDC)")
}

/// Reads a 0x address; mixed case must carry a correct EIP-55 checksum, all-lowercase is
/// accepted as unchecksummed.
fn address_field(fields: &Map<String, Value>, name: &str, problems: &mut Vec<FieldProblem>) -> Option<Address> {
    let text = match fields.get(name) {
        Some(Value::String(text)) => text,
        Some(other) => {
            problems.push(FieldProblem::new(name, describe(other), "a 0x-prefixed 20-byte hex address"));
            return None;
        }
        None => {
            problems.push(FieldProblem::missing(name, "a 0x-prefixed 20-byte hex address"));
            return None;
        }
    };
    match parse_address(text) {
        Ok(address) => Some(address),
        Err(expected) => {
            problems.push(FieldProblem::new(name, format!("{text:?}"), expected));
            None
        }
    }
}
/// Encodes a PaymentRequired body as a v2 header value (used by tests, samples and the demo).
pub fn encode_v2_header(body: &Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(body.to_string())
}

/// The x402 payment payload the agent sends back, and the header that carries it.
pub fn payment_header(requirement: &PaymentRequirement, version: X402Version, scheme_payload: Value) -> PaymentHeader {
    let body = match version {
        X402Version::V2 => {
            let mut body = json!({
                "x402Version": 2,
                "accepted": requirement.accepted,
                "payload": scheme_payload,
            });
            if let Some(resource) = &requirement.resource {
                body["resource"] = resource.clone();
            }
            if let Some(extensions) = &requirement.extensions {
                body["extensions"] = extensions.clone();
            }
            body
        }
        X402Version::V1 => json!({
            "x402Version": 1,
            "scheme": "exact",
            "network": requirement.network.v1_name(),
            "payload": scheme_payload,
        }),
    };
    PaymentHeader {
        name: version.payment_header_name().to_owned(),
        value: base64::engine::general_purpose::STANDARD.encode(body.to_string()),
    }
}

#[cfg(test)]
mod tests;
