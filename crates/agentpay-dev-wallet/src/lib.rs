//! The local dev wallet: signs x402 `exact` payments itself, as a real x402 client does.
//!
//! It answers a challenge with an EIP-3009 `TransferWithAuthorization` signed under the
//! EIP-712 domain of the selected USDC contract, with a fresh random nonce and a validity
//! window from `maxTimeoutSeconds`. The key comes from configuration and is never logged
//! (`Debug` shows the address only). Meant for testnets and local runs.

use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::{Address, B256, Signature, U256};
use alloy_sol_types::{Eip712Domain, SolStruct, sol};
use async_trait::async_trait;
use k256::ecdsa::SigningKey;
use serde_json::{Value, json};

use agentpay_core::clock::{Clock, Timestamp};
use agentpay_core::error::{PaymentError, ProviderFailure};
use agentpay_core::payment::PaymentRequirement;
use agentpay_core::policy::SpendPolicy;
use agentpay_core::provider::rules::{ProviderKind, dev_wallet_version};
use agentpay_core::provider::{IssuedProof, IssuedProofs, PaymentOrder, PaymentProof, PaymentProvider, PaymentTerms};
use agentpay_core::request::{PaymentRequest, derived_id};
use agentpay_core::x402::payment_header;

sol! {
    /// EIP-3009, as USDC implements it.
    #[derive(Debug, PartialEq)]
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }
}

/// Tolerance for the payee's clock: the authorization is valid from slightly in the past.
const VALID_AFTER_SKEW: Duration = Duration::from_secs(600);

/// Signs with k256 directly: alloy's local signer wraps the same `sign_prehash_recoverable`
/// call in a signer framework (and its dependencies) the dev wallet does not use.
pub struct DevWallet {
    key: SigningKey,
    address: Address,
    issued: Arc<dyn IssuedProofs>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for DevWallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevWallet").field("address", &self.address()).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("dev wallet key is not a 32-byte hex private key")]
pub struct BadDevWalletKey;

impl DevWallet {
    pub fn from_hex_key(
        key: &str,
        issued: Arc<dyn IssuedProofs>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BadDevWalletKey> {
        // The parse errors may echo key material: drop them.
        let text = key.trim();
        let bytes =
            alloy_primitives::hex::decode(text.strip_prefix("0x").unwrap_or(text)).map_err(|_| BadDevWalletKey)?;
        if bytes.len() != 32 {
            return Err(BadDevWalletKey);
        }
        let key = SigningKey::from_slice(&bytes).map_err(|_| BadDevWalletKey)?;
        Ok(Self { address: Address::from_private_key(&key), key, issued, clock })
    }

    /// A fresh random key, hex encoded (for `agentpay` to create a local wallet file).
    pub fn generate_hex_key() -> String {
        // A random 32 bytes is a valid key unless it is zero or at least the curve order
        // (odds about 2^-128): draw again then.
        loop {
            if let Ok(key) = SigningKey::from_slice(&rand::random::<[u8; 32]>()) {
                return alloy_primitives::hex::encode(key.to_bytes());
            }
        }
    }

    pub fn address(&self) -> Address {
        self.address
    }

    fn sign(&self, requirement: &PaymentRequirement, now: Timestamp) -> Result<(Value, Timestamp), PaymentError> {
        let usdc = requirement.usdc();
        let domain = eip712_domain(requirement);
        let valid_after = u64::try_from(now.minus(VALID_AFTER_SKEW).seconds()).unwrap_or(0);
        let valid_before_at = now.plus(Duration::from_secs(requirement.max_timeout_seconds));
        let valid_before = u64::try_from(valid_before_at.seconds()).unwrap_or(0);
        let nonce = B256::from(rand::random::<[u8; 32]>());
        let authorization = TransferWithAuthorization {
            from: self.address(),
            to: requirement.pay_to,
            value: U256::from(requirement.amount.get()),
            validAfter: U256::from(valid_after),
            validBefore: U256::from(valid_before),
            nonce,
        };
        let digest = authorization.eip712_signing_hash(&domain);
        // k256 signs with a low s (EIP-2), as USDC's ecrecover requires.
        let signature = Signature::from(self.key.sign_prehash_recoverable(digest.as_slice()).map_err(|e| {
            PaymentError::ProviderRejected { provider: "dev-wallet", message: format!("signing failed: {e}") }
        })?);
        debug_assert_eq!(usdc.address, requirement.asset);
        let payload = json!({
            "signature": format!("0x{}", alloy_primitives::hex::encode(signature.as_bytes())),
            "authorization": {
                "from": self.address().to_checksum(None),
                "to": requirement.pay_to.to_checksum(None),
                "value": requirement.amount.to_string(),
                "validAfter": valid_after.to_string(),
                "validBefore": valid_before.to_string(),
                "nonce": format!("{nonce}"),
            }
        });
        Ok((payload, valid_before_at))
    }
}

/// The EIP-712 domain of the requirement's USDC contract.
pub fn eip712_domain(requirement: &PaymentRequirement) -> Eip712Domain {
    let usdc = requirement.usdc();
    Eip712Domain::new(
        Some(usdc.eip712_name.into()),
        Some(usdc.eip712_version.into()),
        Some(U256::from(requirement.network.chain_id())),
        Some(requirement.asset),
        None,
    )
}

#[async_trait]
impl PaymentProvider for DevWallet {
    fn name(&self) -> &'static str {
        ProviderKind::DevWallet.name()
    }

    fn prepare(
        &self,
        request: &PaymentRequest,
        policy: &SpendPolicy,
        payment: &PaymentRequirement,
    ) -> Result<Option<Value>, PaymentError> {
        ProviderKind::DevWallet.prepare(request, policy, payment)
    }

    async fn process_payment(&self, order: &PaymentOrder) -> Result<PaymentProof, PaymentError> {
        let version = dev_wallet_version(&order.requirement)?;
        let terms = PaymentTerms::of(&order.requirement);
        if let Some(entry) = self.issued.issued(&order.client_token).await? {
            return journal_proof(entry, &terms);
        }
        let now = self.clock.now();
        let (payload, valid_before) = self.sign(&order.requirement, now)?;
        let proof = PaymentProof {
            payment_id: derived_id("devpay", &[&order.client_token]),
            provider: self.name().to_owned(),
            status: "PROOF_GENERATED".to_owned(),
            header: payment_header(&order.requirement, version, payload),
            payer: Some(self.address().to_checksum(None)),
            valid_before: Some(valid_before),
            issued_at: now,
        };
        // Two racing calls with one token both sign, but only the first proof is ever returned.
        let entry = IssuedProof { proof, terms: Some(terms.clone()) };
        journal_proof(self.issued.record_issued(&order.client_token, &entry).await?, &terms)
    }
}

/// The journal's proof for a token, if it was issued for exactly these terms. A token used for
/// other terms is what AgentCore answers ConflictException to: nothing was issued for this
/// request. An entry whose terms were not kept cannot be checked, and may be this payment's
/// proof: unknown, so the reservation stays.
fn journal_proof(entry: IssuedProof, terms: &PaymentTerms) -> Result<PaymentProof, PaymentError> {
    match &entry.terms {
        Some(stored) if stored == terms => Ok(entry.proof),
        Some(stored) => Err(PaymentError::ProviderFailed {
            provider: "dev-wallet",
            kind: ProviderFailure::Conflict,
            message: format!(
                "the client token was used for another payment ({} to {} on {}), not {} to {} on {}",
                stored.amount, stored.pay_to, stored.network, terms.amount, terms.pay_to, terms.network
            ),
            hint: "a client token belongs to one payment; start a new idempotency key for a new payment",
            source: None,
        }),
        None => Err(PaymentError::PaymentOutcomeUnknown {
            provider: "dev-wallet",
            message: "the journal holds a proof for this client token without the terms it was issued for".into(),
            source: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;
    use agentpay_core::clock::ManualClock;
    use agentpay_core::payment::{Allowlist, Network};
    use agentpay_core::request::PaymentRequest;
    use agentpay_core::samples::{execution_input, execution_input_with_challenge, v1_payment_required};
    use agentpay_sqlite::SqliteStore;

    fn wallet() -> DevWallet {
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_763_700_000_000)));
        DevWallet::from_hex_key(&DevWallet::generate_hex_key(), store, clock).unwrap()
    }

    fn order(input: Value, token: &str) -> PaymentOrder {
        let request = PaymentRequest::parse(&input).unwrap();
        let allow = Allowlist { networks: Network::ALL.to_vec(), payees: vec![] };
        let requirement = request.select_payment(&allow, "a").unwrap();
        PaymentOrder { client_token: token.into(), requirement, request, context: None }
    }

    fn decode(value: &str) -> Value {
        serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(value).unwrap()).unwrap()
    }

    #[test]
    fn a_known_key_has_its_known_address_and_bad_keys_are_refused_without_echo() {
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(0)));
        // The private key and address of the ethers.js / web3 documentation.
        let key = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318";
        let wallet = DevWallet::from_hex_key(key, store.clone(), clock.clone()).unwrap();
        assert_eq!(wallet.address().to_checksum(None), "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23");
        let unprefixed = DevWallet::from_hex_key(&key[2..], store.clone(), clock.clone()).unwrap();
        assert_eq!(unprefixed.address(), wallet.address());
        let zero = "00".repeat(32);
        let order_n = "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141";
        for bad in [&key[..40], "zz", zero.as_str(), order_n, &format!("{key}00")] {
            let error = DevWallet::from_hex_key(bad, store.clone(), clock.clone()).unwrap_err().to_string();
            assert_eq!(error, "dev wallet key is not a 32-byte hex private key");
        }
        let generated = DevWallet::generate_hex_key();
        assert_eq!(generated.len(), 64);
        assert!(DevWallet::from_hex_key(&generated, store, clock).is_ok());
    }

    #[tokio::test]
    async fn v2_signature_recovers_to_the_wallet_over_the_eip712_digest() {
        let wallet = wallet();
        let order = order(execution_input("k", "a", "10000"), "token-1");
        let proof = wallet.process_payment(&order).await.unwrap();
        assert_eq!(proof.header.name, "PAYMENT-SIGNATURE");
        let body = decode(&proof.header.value);
        assert_eq!(body["x402Version"], 2);
        assert_eq!(body["accepted"], order.requirement.accepted);
        assert_eq!(body["resource"]["url"], "https://api.example.com/credit-report");

        let auth = &body["payload"]["authorization"];
        let number = |v: &Value| U256::from_str_radix(v.as_str().unwrap(), 10).unwrap();
        let message = TransferWithAuthorization {
            from: auth["from"].as_str().unwrap().parse().unwrap(),
            to: auth["to"].as_str().unwrap().parse().unwrap(),
            value: number(&auth["value"]),
            validAfter: number(&auth["validAfter"]),
            validBefore: number(&auth["validBefore"]),
            nonce: auth["nonce"].as_str().unwrap().parse().unwrap(),
        };
        assert_eq!(message.to, order.requirement.pay_to);
        assert_eq!(message.value, U256::from(10_000u64));
        assert_eq!(message.validBefore - message.validAfter, U256::from(600u64 + 60));
        let digest = message.eip712_signing_hash(&eip712_domain(&order.requirement));
        let signature: Signature = body["payload"]["signature"].as_str().unwrap().parse().unwrap();
        assert_eq!(signature.recover_address_from_prehash(&digest).unwrap(), wallet.address());
        // Low s (EIP-2): ecrecover in USDC refuses the high half.
        let half_order =
            U256::from_str_radix("7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0", 16).unwrap();
        assert!(signature.s() <= half_order);
        assert!(matches!(body["payload"]["signature"].as_str().unwrap().as_bytes()[130..], [b'1', b'b' | b'c']));

        // A wrong domain name (mainnet's "USD Coin" on the testnet) does not verify.
        let wrong = Eip712Domain::new(
            Some("USD Coin".into()),
            Some("2".into()),
            Some(U256::from(84532u64)),
            Some(order.requirement.asset),
            None,
        );
        let wrong_digest = message.eip712_signing_hash(&wrong);
        assert_ne!(signature.recover_address_from_prehash(&wrong_digest).unwrap(), wallet.address());
    }

    #[tokio::test]
    async fn the_same_client_token_returns_the_same_proof_and_a_new_one_a_new_nonce() {
        let wallet = wallet();
        let first = wallet.process_payment(&order(execution_input("k", "a", "5"), "token-a")).await.unwrap();
        let again = wallet.process_payment(&order(execution_input("k", "a", "5"), "token-a")).await.unwrap();
        assert_eq!(first, again);
        let other = wallet.process_payment(&order(execution_input("k", "a", "5"), "token-b")).await.unwrap();
        let nonce = |p: &PaymentProof| decode(&p.header.value)["payload"]["authorization"]["nonce"].clone();
        assert_ne!(nonce(&first), nonce(&other));
    }

    #[tokio::test]
    async fn a_journal_entry_for_other_terms_is_never_returned() {
        let wallet = wallet();
        let paid = wallet.process_payment(&order(execution_input("k", "a", "5"), "token-t")).await.unwrap();
        // The same token for another amount: the stored proof pays 5, not 6.
        let error = wallet.process_payment(&order(execution_input("k", "a", "6"), "token-t")).await.unwrap_err();
        assert_eq!(error.name(), "ProviderConflict", "{error}");
        assert!(error.to_string().contains("another payment"), "{error}");
        // An entry without terms cannot be checked: unknown, so nothing is released.
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        store.record_issued("old-token", &IssuedProof { proof: paid, terms: None }).await.unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_763_700_000_000)));
        let old = DevWallet::from_hex_key(&DevWallet::generate_hex_key(), store, clock).unwrap();
        let error = old.process_payment(&order(execution_input("k", "a", "5"), "old-token")).await.unwrap_err();
        assert_eq!(error.name(), "PaymentOutcomeUnknown");
    }

    #[tokio::test]
    async fn v1_challenges_get_an_x_payment_header() {
        let wallet = wallet();
        let input = execution_input_with_challenge("k", "a", json!({"x402v1": v1_payment_required("7")}));
        let proof = wallet.process_payment(&order(input, "t")).await.unwrap();
        assert_eq!(proof.header.name, "X-PAYMENT");
        let body = decode(&proof.header.value);
        assert_eq!((body["x402Version"].as_u64(), body["network"].as_str()), (Some(1), Some("base-sepolia")));
        assert_eq!(body["payload"]["authorization"]["value"], "7");
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let key = DevWallet::generate_hex_key();
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let wallet = DevWallet::from_hex_key(&key, store, Arc::new(agentpay_core::clock::SystemClock)).unwrap();
        let shown = format!("{wallet:?}");
        assert!(!shown.contains(&key) && shown.contains("address"), "{shown}");
        assert!(
            DevWallet::from_hex_key(
                "0xnotakey",
                Arc::new(SqliteStore::in_memory().unwrap()),
                Arc::new(agentpay_core::clock::SystemClock)
            )
            .is_err()
        );
    }
}
