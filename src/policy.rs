//! Spend policy per agent and the pure decision that reserves against it.
//!
//! The decision is a function of (policy, current window, payment, now); stores only make
//! its result durable with a version check, so both adapters enforce the same rules.

use std::time::Duration;

use alloy_primitives::Address;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::error::{LimitKind, PaymentError};
use crate::money::{AtomicAmount, UsdAmount};
use crate::x402::{Allowlist, Network, PaymentRequirement};

pub const WINDOW_24H: Duration = Duration::from_secs(24 * 3600);
pub const WINDOW_1H: Duration = Duration::from_secs(3600);

/// Limits are configured in USD and converted exactly to the asset's atomic units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpendPolicy {
    /// Kill switch: a paused agent is denied every payment.
    #[serde(default)]
    pub paused: bool,
    pub per_transaction_limit_usd: UsdAmount,
    /// Rolling 24 hours: settled + authorized + reserved.
    pub daily_limit_usd: UsdAmount,
    pub max_transactions_per_hour: u32,
    pub allowed_networks: Vec<Network>,
    /// Empty: any payee.
    #[serde(default, with = "checksummed_addresses")]
    pub allowed_payees: Vec<Address>,
}

impl SpendPolicy {
    pub fn allowlist(&self) -> Allowlist {
        Allowlist { networks: self.allowed_networks.clone(), payees: self.allowed_payees.clone() }
    }
}

mod checksummed_addresses {
    use alloy_primitives::Address;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addresses: &[Address], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(addresses.iter().map(|a| a.to_checksum(None)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Address>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|text| {
                crate::x402::parse_address(text)
                    .map_err(|expected| serde::de::Error::custom(format!("payee {text:?}: expected {expected}")))
            })
            .collect()
    }
}

/// One live (not released) reservation counted in the agent's windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowEntry {
    pub reservation_id: String,
    pub amount: AtomicAmount,
    pub at: Timestamp,
}

/// The agent's state item: policy, live window entries and an optimistic-lock version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentLedger {
    pub policy: Option<SpendPolicy>,
    pub window: Vec<WindowEntry>,
    /// 0 when the agent has never been written.
    pub version: u64,
}

/// Limits and spend at the moment of a reservation, kept for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpendSnapshot {
    pub per_transaction_limit: AtomicAmount,
    pub daily_limit: AtomicAmount,
    pub max_transactions_per_hour: u32,
    pub spent_24h_before: AtomicAmount,
    pub spent_24h_after: AtomicAmount,
    pub transactions_last_hour_before: u32,
}

impl SpendSnapshot {
    pub fn remaining_24h(&self) -> AtomicAmount {
        self.daily_limit.saturating_sub(self.spent_24h_after)
    }
}

/// What a successful decision writes: the new window and the figures for the audit.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendDecision {
    pub window: Vec<WindowEntry>,
    pub snapshot: SpendSnapshot,
}

/// Sum of the entries newer than `now - window` (saturating at the ledger ceiling, which is
/// far above any cap, so saturation can only deny).
pub fn spent_within(entries: &[WindowEntry], now: Timestamp, window: Duration) -> AtomicAmount {
    let since = now.minus(window);
    entries
        .iter()
        .filter(|e| e.at > since)
        .fold(AtomicAmount::ZERO, |sum, e| sum.checked_add(e.amount).unwrap_or(AtomicAmount::MAX))
}

fn count_within(entries: &[WindowEntry], now: Timestamp, window: Duration) -> u32 {
    let since = now.minus(window);
    u32::try_from(entries.iter().filter(|e| e.at > since).count()).unwrap_or(u32::MAX)
}

/// Evaluates every limit and, if all pass, returns the window with the new entry.
pub fn decide(
    agent: &str,
    ledger: &AgentLedger,
    requirement: &PaymentRequirement,
    reservation_id: &str,
    now: Timestamp,
) -> Result<SpendDecision, PaymentError> {
    let Some(policy) = &ledger.policy else {
        return Err(PaymentError::PolicyDenied {
            agent: agent.to_owned(),
            reason: format!("no spend policy is set for this agent; set one with `agentpay policy set {agent} ...`"),
        });
    };
    if policy.paused {
        return Err(PaymentError::AgentPaused { agent: agent.to_owned() });
    }
    if !policy.allowed_networks.contains(&requirement.network) {
        return Err(PaymentError::PolicyDenied {
            agent: agent.to_owned(),
            reason: format!("network {} is not in the allowlist", requirement.network),
        });
    }
    if requirement.asset != requirement.network.usdc().address {
        return Err(PaymentError::PolicyDenied {
            agent: agent.to_owned(),
            reason: format!("asset {} is not USDC on {}", requirement.asset, requirement.network),
        });
    }
    if !policy.allowed_payees.is_empty() && !policy.allowed_payees.contains(&requirement.pay_to) {
        return Err(PaymentError::PolicyDenied {
            agent: agent.to_owned(),
            reason: format!("payee {} is not in the payee allowlist", requirement.pay_to),
        });
    }
    let decimals = requirement.usdc().decimals;
    let convert = |usd: UsdAmount, what: &str| {
        usd.to_atomic(decimals).ok_or_else(|| PaymentError::PolicyDenied {
            agent: agent.to_owned(),
            reason: format!("{what} {usd} USD cannot be expressed exactly in {decimals}-decimal units"),
        })
    };
    let per_transaction_limit = convert(policy.per_transaction_limit_usd, "per-transaction limit")?;
    let daily_limit = convert(policy.daily_limit_usd, "daily limit")?;
    let amount = requirement.amount;

    // Entries older than the longest window no longer count: drop them as we write.
    let since = now.minus(WINDOW_24H);
    let mut window: Vec<WindowEntry> = ledger.window.iter().filter(|e| e.at > since).cloned().collect();
    let spent_24h_before = spent_within(&window, now, WINDOW_24H);
    let transactions_last_hour_before = count_within(&window, now, WINDOW_1H);

    if amount > per_transaction_limit {
        return Err(PaymentError::SpendLimitExceeded {
            agent: agent.to_owned(),
            limit: LimitKind::PerTransaction,
            amount,
            cap: per_transaction_limit,
            spent: AtomicAmount::ZERO,
            remaining: per_transaction_limit,
        });
    }
    let spent_24h_after = spent_24h_before.checked_add(amount).filter(|after| *after <= daily_limit);
    let Some(spent_24h_after) = spent_24h_after else {
        return Err(PaymentError::SpendLimitExceeded {
            agent: agent.to_owned(),
            limit: LimitKind::Rolling24Hours,
            amount,
            cap: daily_limit,
            spent: spent_24h_before,
            remaining: daily_limit.saturating_sub(spent_24h_before),
        });
    };
    if transactions_last_hour_before >= policy.max_transactions_per_hour {
        return Err(PaymentError::RateLimitExceeded {
            agent: agent.to_owned(),
            count: transactions_last_hour_before,
            limit: policy.max_transactions_per_hour,
        });
    }
    window.push(WindowEntry { reservation_id: reservation_id.to_owned(), amount, at: now });
    Ok(SpendDecision {
        window,
        snapshot: SpendSnapshot {
            per_transaction_limit,
            daily_limit,
            max_transactions_per_hour: policy.max_transactions_per_hour,
            spent_24h_before,
            spent_24h_after,
            transactions_last_hour_before,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::v2_payment_required;
    use crate::x402::{Challenge, encode_v2_header};

    fn policy() -> SpendPolicy {
        SpendPolicy {
            paused: false,
            per_transaction_limit_usd: "1.00".parse().unwrap(),
            daily_limit_usd: "2.50".parse().unwrap(),
            max_transactions_per_hour: 3,
            allowed_networks: vec![Network::BaseSepolia],
            allowed_payees: vec![],
        }
    }

    fn requirement(amount: &str) -> PaymentRequirement {
        let challenge = Challenge::from_v2_header(&encode_v2_header(&v2_payment_required(amount))).unwrap();
        challenge.select(&policy().allowlist(), "a").unwrap()
    }

    fn ledger_with(entries: &[(u64, i64)]) -> AgentLedger {
        AgentLedger {
            policy: Some(policy()),
            window: entries
                .iter()
                .enumerate()
                .map(|(i, (amount, at))| WindowEntry {
                    reservation_id: format!("r{i}"),
                    amount: AtomicAmount::new(*amount).unwrap(),
                    at: Timestamp::from_millis(*at),
                })
                .collect(),
            version: 1,
        }
    }

    const NOW: i64 = 100 * 24 * 3600 * 1000;
    const HOUR: i64 = 3600 * 1000;

    #[test]
    fn within_limits_reserves_and_snapshots() {
        let ledger = ledger_with(&[(500_000, NOW - 2 * HOUR)]);
        let decision = decide("a", &ledger, &requirement("1000000"), "new", Timestamp::from_millis(NOW)).unwrap();
        assert_eq!(decision.window.len(), 2);
        assert_eq!(decision.snapshot.spent_24h_before.get(), 500_000);
        assert_eq!(decision.snapshot.spent_24h_after.get(), 1_500_000);
        assert_eq!(decision.snapshot.remaining_24h().get(), 1_000_000);
    }

    #[test]
    fn per_transaction_cap_denies_with_figures() {
        let error =
            decide("a", &ledger_with(&[]), &requirement("1000001"), "n", Timestamp::from_millis(NOW)).unwrap_err();
        match error {
            PaymentError::SpendLimitExceeded { limit: LimitKind::PerTransaction, cap, amount, .. } => {
                assert_eq!((cap.get(), amount.get()), (1_000_000, 1_000_001));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn daily_cap_counts_the_rolling_window_only() {
        // 2.0 USD spent inside the window, 5 USD just outside it.
        let ledger =
            ledger_with(&[(1_000_000, NOW - HOUR * 2), (1_000_000, NOW - HOUR * 3), (5_000_000, NOW - 24 * HOUR)]);
        let error = decide("a", &ledger, &requirement("600000"), "n", Timestamp::from_millis(NOW)).unwrap_err();
        match error {
            PaymentError::SpendLimitExceeded { limit: LimitKind::Rolling24Hours, spent, remaining, .. } => {
                assert_eq!((spent.get(), remaining.get()), (2_000_000, 500_000));
            }
            other => panic!("{other:?}"),
        }
        let ok = decide("a", &ledger, &requirement("500000"), "n", Timestamp::from_millis(NOW)).unwrap();
        // The expired entry was pruned from the window written back.
        assert_eq!(ok.window.len(), 3);
    }

    #[test]
    fn hourly_rate_denies_the_fourth_payment() {
        let ledger = ledger_with(&[(1, NOW - 10), (1, NOW - 20), (1, NOW - 30), (1, NOW - 2 * HOUR)]);
        let error = decide("a", &ledger, &requirement("1"), "n", Timestamp::from_millis(NOW)).unwrap_err();
        assert!(matches!(error, PaymentError::RateLimitExceeded { count: 3, limit: 3, .. }), "{error:?}");
    }

    #[test]
    fn paused_missing_policy_and_payee_allowlist_deny() {
        let mut ledger = ledger_with(&[]);
        ledger.policy.as_mut().unwrap().paused = true;
        assert_eq!(
            decide("a", &ledger, &requirement("1"), "n", Timestamp::from_millis(NOW)).unwrap_err().name(),
            "AgentPaused"
        );
        ledger.policy = None;
        assert_eq!(
            decide("a", &ledger, &requirement("1"), "n", Timestamp::from_millis(NOW)).unwrap_err().name(),
            "PolicyDenied"
        );
        let mut ledger = ledger_with(&[]);
        ledger.policy.as_mut().unwrap().allowed_payees = vec![Address::repeat_byte(1)];
        assert_eq!(
            decide("a", &ledger, &requirement("1"), "n", Timestamp::from_millis(NOW)).unwrap_err().name(),
            "PolicyDenied"
        );
    }

    #[test]
    fn policy_json_validates_payees_and_usd() {
        let json = r#"{"perTransactionLimitUsd":"1","dailyLimitUsd":"10.5","maxTransactionsPerHour":5,
            "allowedNetworks":["eip155:84532"],"allowedPayees":["0x209693bc6afc0C5328bA36FaF03C514EF312287C"]}"#;
        let error = serde_json::from_str::<SpendPolicy>(json).unwrap_err().to_string();
        assert!(error.contains("EIP-55"), "{error}");
        let bad_usd = r#"{"perTransactionLimitUsd":"1.0000001","dailyLimitUsd":"1","maxTransactionsPerHour":5,"allowedNetworks":[]}"#;
        assert!(serde_json::from_str::<SpendPolicy>(bad_usd).unwrap_err().to_string().contains("decimal places"));
    }
}
