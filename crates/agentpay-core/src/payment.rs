//! Protocol-neutral payment terms: networks, the requirement a challenge resolves to, the
//! allowlist it is chosen under, and strict address parsing. x402 and MPP both produce a
//! [`PaymentRequirement`]; everything after the challenge (policy, store, providers) speaks
//! only these types.

use alloy_primitives::Address;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::money::AtomicAmount;

/// Networks agentpay can pay on, with their canonical USDC deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Network {
    #[serde(rename = "eip155:8453")]
    Base,
    #[serde(rename = "eip155:84532")]
    BaseSepolia,
}

/// The EIP-712 domain and address of a network's USDC contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsdcDeployment {
    pub address: Address,
    /// EIP-712 domain `name`: a wrong one fails silently as a bad signature.
    pub eip712_name: &'static str,
    pub eip712_version: &'static str,
    pub decimals: u32,
}

impl Network {
    pub const ALL: [Network; 2] = [Network::Base, Network::BaseSepolia];

    pub fn caip2(self) -> &'static str {
        match self {
            Network::Base => "eip155:8453",
            Network::BaseSepolia => "eip155:84532",
        }
    }

    /// x402 v1 network name.
    pub fn v1_name(self) -> &'static str {
        match self {
            Network::Base => "base",
            Network::BaseSepolia => "base-sepolia",
        }
    }

    pub fn chain_id(self) -> u64 {
        match self {
            Network::Base => 8453,
            Network::BaseSepolia => 84532,
        }
    }

    pub fn usdc(self) -> UsdcDeployment {
        match self {
            Network::Base => UsdcDeployment {
                address: alloy_primitives::address!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"),
                eip712_name: "USD Coin",
                eip712_version: "2",
                decimals: 6,
            },
            Network::BaseSepolia => UsdcDeployment {
                address: alloy_primitives::address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
                eip712_name: "USDC",
                eip712_version: "2",
                decimals: 6,
            },
        }
    }

    pub fn from_caip2(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.caip2() == text)
    }

    pub fn from_v1_name(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.v1_name() == text)
    }

    pub(crate) fn known_list(version: X402Version) -> String {
        Self::ALL
            .iter()
            .map(|n| match version {
                X402Version::V1 => format!("{:?}", n.v1_name()),
                X402Version::V2 => format!("{:?}", n.caip2()),
            })
            .collect::<Vec<_>>()
            .join(" or ")
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.caip2())
    }
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::from_caip2(text)
            .or_else(|| Self::from_v1_name(text))
            .ok_or_else(|| format!("unknown network {text:?}: expected {}", Self::known_list(X402Version::V2)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum X402Version {
    #[serde(rename = "1")]
    V1,
    #[serde(rename = "2")]
    V2,
}

impl X402Version {
    pub fn number(self) -> u8 {
        match self {
            X402Version::V1 => 1,
            X402Version::V2 => 2,
        }
    }

    /// The request header that carries the payment proof back to the resource server.
    pub fn payment_header_name(self) -> &'static str {
        match self {
            X402Version::V1 => "X-PAYMENT",
            X402Version::V2 => "PAYMENT-SIGNATURE",
        }
    }
}

/// One validated `accepts[]` entry the workflow can pay.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirement {
    pub protocol: PaymentProtocol,
    /// Index in `accepts[]`.
    pub index: usize,
    pub network: Network,
    pub asset: Address,
    pub pay_to: Address,
    pub amount: AtomicAmount,
    pub max_timeout_seconds: u64,
    /// The entry exactly as the server sent it: v2 echoes it as `accepted`.
    pub accepted: Value,
    /// v2 top-level `resource`, echoed in the payment payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Value>,
}

/// How the payment is asked for and how its proof travels back.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PaymentProtocol {
    /// x402 `exact` on an EVM network.
    X402 { version: X402Version },
    /// MPP `charge` (`WWW-Authenticate: Payment`); only a provider that speaks MPP can pay it.
    Mpp(MppDetails),
}

impl PaymentRequirement {
    pub fn usdc(&self) -> UsdcDeployment {
        self.network.usdc()
    }
}

/// What the agent's policy allows, for choosing an entry.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    pub networks: Vec<Network>,
    /// Empty: any payee.
    pub payees: Vec<Address>,
}

/// What the provider needs to pay an MPP challenge, kept with the selected payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MppDetails {
    /// Protocol version sent to AgentCore.
    pub version: String,
    /// The challenge `id`, echoed back by AgentCore as `selectedPaymentId`.
    pub challenge_id: String,
    pub method: String,
    /// The `WWW-Authenticate` value exactly as received (AgentCore wants it verbatim).
    pub header: String,
}

/// Parses an EVM address strictly; the error is the "expected …" text.
pub fn parse_address(text: &str) -> Result<Address, String> {
    let Some(hex_part) = text.strip_prefix("0x") else {
        return Err("a 0x-prefixed 20-byte hex address".into());
    };
    if hex_part.len() != 40 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("a 0x-prefixed 20-byte hex address (40 hex digits)".into());
    }
    let address: Address = text.parse().map_err(|e| format!("a 20-byte hex address ({e})"))?;
    let has_upper = hex_part.bytes().any(|b| b.is_ascii_uppercase());
    if has_upper && address.to_checksum(None) != text {
        return Err(format!(
            "a correct EIP-55 checksum ({}), or the address in all lowercase",
            address.to_checksum(None)
        ));
    }
    Ok(address)
}

/// Short description of a JSON value for "received …".
pub fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("an array of {} items", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

/// The HTTP header the agent adds to its retried request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentHeader {
    pub name: String,
    pub value: String,
}
