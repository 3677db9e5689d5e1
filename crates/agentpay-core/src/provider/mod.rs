//! The `PaymentProvider` port: turn a selected payment requirement into a proof the agent
//! sends back to the resource server.

pub mod rules;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use serde_json::Value;

use crate::clock::Timestamp;
use crate::error::PaymentError;
use crate::payment::PaymentHeader;
use crate::payment::PaymentRequirement;
use crate::policy::SpendPolicy;
use crate::request::PaymentRequest;

/// What the provider is asked to pay.
#[derive(Debug, Clone)]
pub struct PaymentOrder {
    /// Derived from (idempotency key, attempt): a retried call must return the same proof.
    pub client_token: String,
    pub requirement: PaymentRequirement,
    pub request: PaymentRequest,
    /// What [`PaymentProvider::prepare`] returned when the key was claimed.
    pub context: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentProof {
    pub payment_id: String,
    pub provider: String,
    /// `PROOF_GENERATED` once signed.
    pub status: String,
    pub header: PaymentHeader,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_before: Option<Timestamp>,
    pub issued_at: Timestamp,
}

#[async_trait]
pub trait PaymentProvider: Send + Sync {
    fn name(&self) -> &'static str;

    /// Checks, before anything is reserved, that this provider can pay `payment` for this
    /// request and policy; returns the provider's settings for the payment, carried in the
    /// claim to [`PaymentProvider::process_payment`] (so its inputs are fixed at claim time).
    fn prepare(
        &self,
        request: &PaymentRequest,
        policy: &SpendPolicy,
        payment: &PaymentRequirement,
    ) -> Result<Option<Value>, PaymentError>;

    async fn process_payment(&self, order: &PaymentOrder) -> Result<PaymentProof, PaymentError>;
}

/// What a proof pays: checked against the request before a stored or returned proof is used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentTerms {
    pub pay_to: String,
    pub amount: crate::money::AtomicAmount,
    pub asset: String,
    pub network: crate::payment::Network,
}

impl PaymentTerms {
    pub fn of(requirement: &PaymentRequirement) -> Self {
        Self {
            pay_to: requirement.pay_to.to_checksum(None),
            amount: requirement.amount,
            asset: requirement.asset.to_checksum(None),
            network: requirement.network,
        }
    }
}

/// One journal entry: the proof and the terms it was issued for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedProof {
    pub proof: PaymentProof,
    /// Absent on entries written before terms were kept: such an entry cannot be checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms: Option<PaymentTerms>,
}

/// Proofs a provider issued, by client token: what makes a retried call idempotent.
#[async_trait]
pub trait IssuedProofs: Send + Sync {
    async fn issued(&self, client_token: &str) -> Result<Option<IssuedProof>, PaymentError>;
    /// Stores `entry` unless one exists for the token; returns the one that is stored.
    async fn record_issued(&self, client_token: &str, entry: &IssuedProof) -> Result<IssuedProof, PaymentError>;
}

/// The EIP-3009 authorization a proof's header carries (x402 `PAYMENT-SIGNATURE` /
/// `X-PAYMENT`, or an MPP credential): its nonce and `validBefore`. `None` for a proof of
/// another shape. The nonce is no secret once the payment is sent; the signature is not kept.
pub fn signed_authorization(proof: &PaymentProof) -> Option<crate::store::SignedAuthorization> {
    use base64::Engine;
    let value = proof.header.value.trim();
    let value = value.strip_prefix("Payment ").unwrap_or(value);
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
    ];
    let bytes = engines.iter().find_map(|engine| engine.decode(value).ok())?;
    let payload: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let authorization = &payload["payload"]["authorization"];
    let nonce = authorization["nonce"].as_str()?;
    let hex = nonce.strip_prefix("0x").filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))?;
    let valid_before = match &authorization["validBefore"] {
        serde_json::Value::String(text) => text.parse::<i64>().ok(),
        serde_json::Value::Number(n) => n.as_i64(),
        _ => None,
    }?;
    Some(crate::store::SignedAuthorization {
        nonce: format!("0x{}", hex.to_ascii_lowercase()),
        valid_before: crate::clock::Timestamp::from_millis(valid_before.checked_mul(1000)?),
    })
}
