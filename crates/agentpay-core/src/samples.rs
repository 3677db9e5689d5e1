//! Sample challenges and requests: one source for the demo, the tests and `events/`.

use serde_json::{Value, json};

use crate::payment::Network;
use crate::x402::encode_v2_header;

/// A payee used in samples (a throwaway address, checksummed).
pub const SAMPLE_PAYEE: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
pub const SAMPLE_RESOURCE: &str = "https://api.example.com/credit-report";

/// A v2 PaymentRequired body for `amount` atomic USDC on Base Sepolia.
pub fn v2_payment_required(amount: &str) -> Value {
    let usdc = Network::BaseSepolia.usdc();
    json!({
        "x402Version": 2,
        "error": "PAYMENT-SIGNATURE header is required",
        "resource": {"url": SAMPLE_RESOURCE, "description": "Credit report", "mimeType": "application/json"},
        "accepts": [{
            "scheme": "exact",
            "network": Network::BaseSepolia.caip2(),
            "amount": amount,
            "asset": usdc.address.to_checksum(None),
            "payTo": SAMPLE_PAYEE,
            "maxTimeoutSeconds": 60,
            "extra": {"name": usdc.eip712_name, "version": usdc.eip712_version}
        }]
    })
}

/// A v1 402 body for `amount` atomic USDC on Base Sepolia.
pub fn v1_payment_required(amount: &str) -> Value {
    let usdc = Network::BaseSepolia.usdc();
    json!({
        "x402Version": 1,
        "error": "X-PAYMENT header is required",
        "accepts": [{
            "scheme": "exact",
            "network": Network::BaseSepolia.v1_name(),
            "maxAmountRequired": amount,
            "resource": SAMPLE_RESOURCE,
            "description": "Credit report",
            "mimeType": "application/json",
            "payTo": SAMPLE_PAYEE,
            "maxTimeoutSeconds": 60,
            "asset": usdc.address.to_checksum(None),
            "extra": {"name": usdc.eip712_name, "version": usdc.eip712_version}
        }]
    })
}

/// A whole execution input paying `amount` with an x402 v2 challenge.
pub fn execution_input(key: &str, agent: &str, amount: &str) -> Value {
    execution_input_with_challenge(key, agent, json!({"x402": encode_v2_header(&v2_payment_required(amount))}))
}

pub fn execution_input_with_challenge(key: &str, agent: &str, challenge: Value) -> Value {
    json!({
        "idempotencyKey": key,
        "agentId": agent,
        "userId": "user-7",
        "challenge": challenge,
        "resource": SAMPLE_RESOURCE,
        "context": {
            "decision": "credit check before approving invoice INV-1042",
            "delegatedBy": "alice@example.com",
            "scope": "invoices:approve<=50USD"
        }
    })
}

/// An MPP `charge` challenge (`WWW-Authenticate` value) for `amount` atomic USDC on Base Sepolia.
pub fn mpp_challenge(id: &str, amount: &str) -> String {
    let usdc = Network::BaseSepolia.usdc();
    crate::mpp::encode_challenge(
        id,
        "evm",
        &json!({
            "amount": amount,
            "currency": usdc.address.to_checksum(None),
            "recipient": SAMPLE_PAYEE,
            "decimals": usdc.decimals,
            "methodDetails": {"chainId": Network::BaseSepolia.chain_id()}
        }),
    )
}

/// A sample AgentCore selection for the execution input's `agentcore` block.
pub fn agentcore_block() -> Value {
    json!({
        "paymentManagerArn": "arn:aws:bedrock-agentcore:us-east-1:123456789012:payment-manager/pm-demo",
        "paymentSessionId": "ps-demo-1",
        "paymentInstrumentId": "pi-demo-1"
    })
}

/// Which parser a malformed challenge is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// An x402 v2 `PAYMENT-REQUIRED` header value.
    X402V2Header,
    /// An x402 v1 402 body (JSON text).
    X402V1Body,
    /// An MPP `WWW-Authenticate` value.
    Mpp,
}

/// A challenge every parser must refuse, and the field its refusal names.
#[derive(Debug, Clone)]
pub struct MalformedChallenge {
    pub kind: ChallengeKind,
    pub value: String,
    pub field: &'static str,
}

/// Malformed challenges, one per way the tests know a merchant can get one wrong: the unit
/// tests check that each is refused naming its field, and `scripts/fuzz` seeds the fuzz
/// targets with them (`cargo run -p agentpay-core --example fuzz_seeds`).
pub fn malformed_challenges() -> Vec<MalformedChallenge> {
    let v2 = |change: &dyn Fn(&mut Value), field: &'static str| {
        let mut body = v2_payment_required("10000");
        change(&mut body);
        MalformedChallenge { kind: ChallengeKind::X402V2Header, value: encode_v2_header(&body), field }
    };
    let entry = |name: &'static str, value: Value, field: &'static str| {
        v2(&move |body: &mut Value| body["accepts"][0][name] = value.clone(), field)
    };
    let header = |value: &str, field: &'static str| MalformedChallenge {
        kind: ChallengeKind::X402V2Header,
        value: value.to_owned(),
        field,
    };
    let v1 = |change: &dyn Fn(&mut Value), field: &'static str| {
        let mut body = v1_payment_required("10000");
        change(&mut body);
        MalformedChallenge { kind: ChallengeKind::X402V1Body, value: body.to_string(), field }
    };
    let mpp = |value: String, field: &'static str| MalformedChallenge { kind: ChallengeKind::Mpp, value, field };
    let valid_mpp = mpp_challenge("ch_1", "10000");
    let base64 = |text: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, text);
    vec![
        header("not base64 at all!!", "challenge.x402"),
        header("   ", "challenge.x402"),
        header(&base64("{not json"), "challenge.x402"),
        header(&encode_v2_header(&json!([1, 2])), "challenge.x402"),
        v2(&|b| b["x402Version"] = json!(3), "challenge.x402.x402Version"),
        v2(&|b| drop(b.as_object_mut().map(|o| o.remove("x402Version"))), "challenge.x402.x402Version"),
        v2(&|b| b["accepts"] = json!([]), "challenge.x402.accepts"),
        v2(&|b| b["accepts"] = json!({"scheme": "exact"}), "challenge.x402.accepts"),
        v2(&|b| b["accepts"] = json!(["exact"]), "challenge.x402.accepts[0]"),
        entry("scheme", json!("upto"), "challenge.x402.accepts[0].scheme"),
        entry("network", json!("eip155:1"), "challenge.x402.accepts[0].network"),
        entry("network", json!("base-sepolia"), "challenge.x402.accepts[0].network"),
        entry("asset", json!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"), "challenge.x402.accepts[0].asset"),
        entry("asset", json!("0x036cbD53842c5426634e7929541eC2318f3dCF7e"), "challenge.x402.accepts[0].asset"),
        entry("payTo", json!("0x209693bc6afc0C5328bA36FaF03C514EF312287C"), "challenge.x402.accepts[0].payTo"),
        entry("payTo", json!("0x1234"), "challenge.x402.accepts[0].payTo"),
        entry("payTo", json!("0x0000000000000000000000000000000000000000"), "challenge.x402.accepts[0].payTo"),
        entry("amount", json!("0"), "challenge.x402.accepts[0].amount"),
        entry("amount", json!("-100"), "challenge.x402.accepts[0].amount"),
        entry("amount", json!("0.5"), "challenge.x402.accepts[0].amount"),
        entry("amount", json!("99999999999999999999999"), "challenge.x402.accepts[0].amount"),
        entry("amount", json!(10000), "challenge.x402.accepts[0].amount"),
        entry("extra", json!({}), "challenge.x402.accepts[0].extra.name"),
        entry("extra", json!({"name": "USD Coin", "version": "2"}), "challenge.x402.accepts[0].extra.name"),
        entry("extra", json!({"name": "USDC", "version": "1"}), "challenge.x402.accepts[0].extra.version"),
        entry("maxTimeoutSeconds", json!(0), "challenge.x402.accepts[0].maxTimeoutSeconds"),
        entry("maxTimeoutSeconds", json!(86_400 * 365), "challenge.x402.accepts[0].maxTimeoutSeconds"),
        v1(&|b| b["accepts"][0]["network"] = json!("eip155:84532"), "challenge.x402v1.accepts[0].network"),
        v1(&|b| b["accepts"][0]["maxAmountRequired"] = json!("1.5"), "challenge.x402v1.accepts[0].maxAmountRequired"),
        v1(&|b| b["accepts"] = json!([]), "challenge.x402v1.accepts"),
        mpp("Bearer realm=\"x\"".into(), "challenge.mpp"),
        mpp("Payment id=\"x\", realm=\"r\", method=\"m\", intent=\"charge\"".into(), "challenge.mpp.request"),
        mpp(valid_mpp.replace("intent=\"charge\"", "intent=\"session\""), "challenge.mpp.intent"),
        mpp(
            "Payment id=\"x\", realm=\"r\", method=\"m\", intent=\"charge\", request=\"%%%\"".into(),
            "challenge.mpp.request",
        ),
        mpp(format!("{valid_mpp}, Payment id=\"y\""), "challenge.mpp"),
        mpp("Payment id=\"x".into(), "challenge.mpp"),
    ]
}
