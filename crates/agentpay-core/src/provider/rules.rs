//! The SDK-free half of each provider: its name and the checks it makes before anything is
//! reserved. CheckSpend runs these; only ProcessPayment builds a provider that pays, so the
//! other functions link neither the signer nor the AgentCore SDK.

use async_trait::async_trait;
use serde_json::Value;

use super::{PaymentOrder, PaymentProof, PaymentProvider};
use crate::agentcore::AgentCoreTarget;
use crate::error::{InvalidPaymentRequest, PaymentError};
use crate::payment::{PaymentProtocol, PaymentRequirement, X402Version};
use crate::policy::SpendPolicy;
use crate::request::PaymentRequest;

/// Which provider pays, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    DevWallet,
    AgentCore,
}

impl ProviderKind {
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::DevWallet => "dev-wallet",
            ProviderKind::AgentCore => "agentcore",
        }
    }

    /// See [`PaymentProvider::prepare`].
    pub fn prepare(
        self,
        request: &PaymentRequest,
        policy: &SpendPolicy,
        payment: &PaymentRequirement,
    ) -> Result<Option<Value>, PaymentError> {
        match self {
            ProviderKind::DevWallet => {
                dev_wallet_version(payment)?;
                Ok(None)
            }
            ProviderKind::AgentCore => {
                let target = AgentCoreTarget::resolve(
                    request.agentcore.as_ref(),
                    policy.agentcore.as_ref(),
                    request.agent_id.as_str(),
                    request.user_id.as_str(),
                )?;
                Ok(Some(serde_json::to_value(target).expect("a target serialises")))
            }
        }
    }
}

/// The dev wallet signs x402 only; an MPP challenge is refused before anything is reserved.
pub fn dev_wallet_version(payment: &PaymentRequirement) -> Result<X402Version, InvalidPaymentRequest> {
    match &payment.protocol {
        PaymentProtocol::X402 { version } => Ok(*version),
        PaymentProtocol::Mpp(_) => Err(InvalidPaymentRequest::field(
            "challenge.mpp",
            "an MPP challenge",
            "an x402 challenge (challenge.x402 or challenge.x402v1): the local dev wallet signs x402 only; MPP is paid through AgentCore (AGENTPAY_PROVIDER=agentcore)",
        )),
    }
}

/// The provider in a function that never pays: it prepares like the configured provider and
/// refuses to pay (nothing is sent anywhere, so the refusal is definite). Each Lambda serves
/// one step, so this refusal is a wiring error that a test would catch, never a runtime path.
#[derive(Debug, Clone, Copy)]
pub struct PrepareOnly(pub ProviderKind);

#[async_trait]
impl PaymentProvider for PrepareOnly {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn prepare(
        &self,
        request: &PaymentRequest,
        policy: &SpendPolicy,
        payment: &PaymentRequirement,
    ) -> Result<Option<Value>, PaymentError> {
        self.0.prepare(request, policy, payment)
    }

    async fn process_payment(&self, _order: &PaymentOrder) -> Result<PaymentProof, PaymentError> {
        Err(PaymentError::ProviderRejected {
            provider: self.0.name(),
            message: "this function was built without a payment provider: only process-payment pays".into(),
        })
    }
}
