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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::payment::{Allowlist, Network};
    use crate::samples::{execution_input, execution_input_with_challenge, mpp_challenge};

    fn policy() -> SpendPolicy {
        serde_json::from_value(json!({
            "perTransactionLimitUsd": "1.00", "dailyLimitUsd": "5.00", "maxTransactionsPerHour": 10,
            "allowedNetworks": ["eip155:84532", "eip155:8453"]
        }))
        .unwrap()
    }

    fn requirement(request: &PaymentRequest) -> PaymentRequirement {
        let allow = Allowlist { networks: Network::ALL.to_vec(), payees: vec![] };
        request.select_payment(&allow, "a").unwrap()
    }

    #[tokio::test]
    async fn a_function_without_a_provider_prepares_like_the_provider_and_never_pays() {
        let x402 = PaymentRequest::parse(&execution_input("k", "a", "10")).unwrap();
        let mpp =
            PaymentRequest::parse(&execution_input_with_challenge("m", "a", json!({"mpp": mpp_challenge("c1", "10")})))
                .unwrap();
        let wallet = PrepareOnly(ProviderKind::DevWallet);
        assert_eq!(wallet.prepare(&x402, &policy(), &requirement(&x402)).unwrap(), None);
        let refused = wallet.prepare(&mpp, &policy(), &requirement(&mpp)).unwrap_err();
        assert!(refused.to_string().contains("challenge.mpp"), "{refused}");
        // AgentCore needs a session: without one in the input or the policy, CheckSpend refuses.
        let agentcore = PrepareOnly(ProviderKind::AgentCore);
        let missing = agentcore.prepare(&x402, &policy(), &requirement(&x402)).unwrap_err();
        assert!(missing.to_string().contains("agentcore.paymentManagerArn"), "{missing}");
        assert_eq!(agentcore.name(), "agentcore");

        let order = PaymentOrder {
            client_token: "t".into(),
            requirement: requirement(&x402),
            request: x402.clone(),
            context: None,
        };
        let error = wallet.process_payment(&order).await.unwrap_err();
        assert_eq!(error.name(), "ProviderRejected", "definite: nothing was sent");
        assert!(crate::error::is_definite_refusal_name(error.name()));
    }
}
