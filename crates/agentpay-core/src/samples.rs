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
