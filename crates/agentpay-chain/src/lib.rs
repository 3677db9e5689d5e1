//! The chain, read-only, over JSON-RPC: whether an EIP-3009 authorization was used
//! (`authorizationState(address authorizer, bytes32 nonce)` on the token contract, through
//! `eth_call`). Only this answer, after `validBefore`, lets the ledger release a payment's
//! budget.
//!
//! Endpoints are configured per network: `AGENTPAY_RPC_URLS="eip155:84532=https://...,eip155:8453=https://..."`.
//! Written over hyper (already here for the entry point) rather than an Ethereum client crate:
//! one read-only call, no signing, no state.

use std::collections::BTreeMap;
use std::time::Duration;

use agentpay_core::error::PaymentError;
use agentpay_core::payment::Network;
use agentpay_core::settlements::ChainReader;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// The environment variable naming the endpoints.
pub const RPC_URLS_VAR: &str = "AGENTPAY_RPC_URLS";

/// An answer larger than this is not an `eth_call` of a bool.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How long one call may take: a sweep goes on to the next payment after it.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct JsonRpcChain {
    /// Keyed by CAIP-2 id.
    endpoints: BTreeMap<&'static str, http::Uri>,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for JsonRpcChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonRpcChain").field("networks", &self.networks()).finish()
    }
}

impl JsonRpcChain {
    /// Parses `network=url` pairs, comma-separated; an empty list is allowed (no chain).
    pub fn from_list(list: &str) -> Result<Self, String> {
        let mut endpoints = BTreeMap::new();
        for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (network, url) = pair.split_once('=').ok_or_else(|| {
                format!("{RPC_URLS_VAR}: {pair:?} is not network=url (e.g. eip155:84532=https://...)")
            })?;
            let network: Network = network.trim().parse().map_err(|e| format!("{RPC_URLS_VAR}: {e}"))?;
            let url: http::Uri = url.trim().parse().map_err(|_| format!("{RPC_URLS_VAR}: {url:?} is not a URL"))?;
            if !matches!(url.scheme_str(), Some("https" | "http")) || url.host().is_none() {
                return Err(format!("{RPC_URLS_VAR}: {url} is not an http(s) URL"));
            }
            endpoints.insert(network.caip2(), url);
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("cannot load the system's TLS roots: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self { endpoints, http: Client::builder(TokioExecutor::new()).build(connector) })
    }

    /// From `AGENTPAY_RPC_URLS` (unset: no chain).
    pub fn from_env() -> Result<Self, String> {
        Self::from_list(&std::env::var(RPC_URLS_VAR).unwrap_or_default())
    }

    pub fn networks(&self) -> Vec<&'static str> {
        self.endpoints.keys().copied().collect()
    }

    async fn call(&self, url: &http::Uri, body: Value) -> Result<Value, String> {
        let request = http::Request::post(url.clone())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(CALL_TIMEOUT, self.http.request(request))
            .await
            .map_err(|_| format!("no answer within {} s", CALL_TIMEOUT.as_secs()))?
            .map_err(|e| agentpay_core::error::error_chain(&e))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("unreadable answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("not JSON-RPC: {e}"))
    }
}

/// `authorizationState(address,bytes32)`'s call data.
pub fn authorization_state_call(authorizer: &str, nonce: &str) -> Result<String, String> {
    let selector = &alloy_primitives::keccak256("authorizationState(address,bytes32)")[..4];
    let authorizer = agentpay_core::payment::parse_address(authorizer).map_err(|e| format!("authorizer: {e}"))?;
    let nonce = nonce
        .strip_prefix("0x")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or("nonce: expected 0x and 64 hex digits")?;
    Ok(format!(
        "0x{}{:0>64}{}",
        alloy_primitives::hex::encode(selector),
        alloy_primitives::hex::encode(authorizer.as_slice()),
        nonce.to_ascii_lowercase()
    ))
}

/// An ABI-encoded bool: 32 bytes, 0 or 1.
fn decode_bool(result: &str) -> Option<bool> {
    let hex = result.strip_prefix("0x")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match hex.trim_start_matches('0') {
        "" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

#[async_trait::async_trait]
impl ChainReader for JsonRpcChain {
    async fn authorization_used(
        &self,
        network: Network,
        token: &str,
        authorizer: &str,
        nonce: &str,
    ) -> Result<Option<bool>, PaymentError> {
        let Some(url) = self.endpoints.get(network.caip2()) else { return Ok(None) };
        let unavailable = |message: String| PaymentError::ProviderUnavailable {
            provider: "json-rpc",
            message: format!("authorizationState on {network}: {message}"),
            source: None,
        };
        let data = authorization_state_call(authorizer, nonce).map_err(unavailable)?;
        let body = json!({
            "jsonrpc": "2.0", "id": 1, "method": "eth_call",
            "params": [{"to": token, "data": data}, "latest"],
        });
        let answer = self.call(url, body).await.map_err(unavailable)?;
        if let Some(error) = answer.get("error") {
            return Err(unavailable(format!("the node answered an error: {error}")));
        }
        let result = answer["result"].as_str().unwrap_or_default();
        decode_bool(result).map(Some).ok_or_else(|| unavailable(format!("expected an ABI bool, received {result:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_call_data_is_the_selector_and_two_words() {
        let data =
            authorization_state_call("0x857b06519E91e3A54538791bDbb0E22373e36b66", &format!("0x{}", "AB".repeat(32)))
                .unwrap();
        // keccak256("authorizationState(address,bytes32)")[..4]
        assert!(data.starts_with("0xe94a0102"), "{data}");
        assert_eq!(data.len(), 2 + 8 + 64 + 64);
        assert!(data.contains("000000000000000000000000857b06519e91e3a54538791bdbb0e22373e36b66"));
        assert!(data.ends_with(&"ab".repeat(32)));
        assert!(authorization_state_call("bob", "0x00").is_err());
    }

    #[test]
    fn only_an_abi_bool_is_an_answer() {
        assert_eq!(decode_bool(&format!("0x{}", "0".repeat(64))), Some(false));
        assert_eq!(decode_bool(&format!("0x{}1", "0".repeat(63))), Some(true));
        assert_eq!(decode_bool(&format!("0x{}2", "0".repeat(63))), None);
        assert_eq!(decode_bool("0x01"), None);
        assert_eq!(decode_bool(""), None);
    }

    #[test]
    fn endpoints_are_named_per_network_and_bad_ones_said_so() {
        let chain =
            JsonRpcChain::from_list("eip155:84532=http://127.0.0.1:8545, eip155:8453=https://rpc.example").unwrap();
        assert_eq!(chain.networks(), ["eip155:8453", "eip155:84532"]);
        assert!(JsonRpcChain::from_list("").unwrap().networks().is_empty());
        let error = JsonRpcChain::from_list("eip155:84532").unwrap_err();
        assert!(error.contains("is not network=url"), "{error}");
        let error = JsonRpcChain::from_list("eip155:1=http://x").unwrap_err();
        assert!(error.contains("unknown network"), "{error}");
    }
}
