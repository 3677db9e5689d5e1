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
use crate::payment::{Allowlist, Network, PaymentRequirement};

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
    /// Session, instrument and switches for the AgentCore provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agentcore: Option<crate::agentcore::AgentCorePolicy>,
    /// The IAM principals (role or user ARNs) that may pay as this agent: the caller the entry
    /// point verified must be one of them. Empty: no caller is bound (refused where the
    /// functions require a bound caller, as the template does).
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "principal_arns")]
    pub principals: Vec<String>,
}

/// The most principals one agent binds: each is compared on every payment.
pub const MAX_PRINCIPALS: usize = 20;

mod principal_arns {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(arns: &[String], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(arns)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
        let arns = Vec::<String>::deserialize(deserializer)?;
        if arns.len() > super::MAX_PRINCIPALS {
            return Err(serde::de::Error::custom(format!(
                "principals: received {} ARNs, expected at most {}",
                arns.len(),
                super::MAX_PRINCIPALS
            )));
        }
        for arn in &arns {
            crate::identity::check_principal_arn(arn)
                .map_err(|expected| serde::de::Error::custom(format!("principal {arn:?}: expected {expected}")))?;
        }
        Ok(arns)
    }
}

/// Whether `caller` (the ARN the entry point verified, if any) may pay as `agent`. With no
/// principals bound, any caller passes unless `require_bound` (the deployed functions).
pub fn check_caller(
    agent: &str,
    policy: &SpendPolicy,
    caller: Option<&str>,
    require_bound: bool,
) -> Result<(), PaymentError> {
    let refused = |reason: String| PaymentError::CallerNotBound {
        agent: agent.to_owned(),
        caller: caller.unwrap_or("(none)").to_owned(),
        reason,
    };
    if policy.principals.is_empty() {
        return match require_bound {
            false => Ok(()),
            true => Err(refused(format!(
                "no IAM principal is bound to this agent; bind the agent's role with `agentpay policy set {agent} --principal arn:aws:iam::ACCOUNT:role/NAME ...`"
            ))),
        };
    }
    match caller {
        Some(arn) if crate::identity::is_bound(arn, &policy.principals) => Ok(()),
        Some(_) => Err(refused(format!("the caller is not one of the agent's principals ({})", policy.principals.join(", ")))),
        None => Err(refused(
            "the execution carries no verified caller: agents start payments through the entry point (the function URL), which verifies their IAM identity".into(),
        )),
    }
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
                crate::payment::parse_address(text)
                    .map_err(|expected| serde::de::Error::custom(format!("payee {text:?}: expected {expected}")))
            })
            .collect()
    }
}

/// Live (reserved, authorized or settled) spend of one minute.
///
/// Minute buckets bound the agent item — at most 1,441 of them, whatever the payment rate —
/// where one entry per payment would outgrow a DynamoDB item (400 KB) for a busy agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowBucket {
    /// Minutes since the Unix epoch.
    pub minute: i64,
    pub amount: AtomicAmount,
    pub count: u32,
}

const MINUTE_MILLIS: i64 = 60_000;

fn minute_of(at: Timestamp) -> i64 {
    at.millis().div_euclid(MINUTE_MILLIS)
}

/// A bucket counts while any part of it lies inside the window: a payment may count up to a
/// minute longer than exactly, never shorter, so a cap can deny slightly early but is never
/// exceeded.
fn counts_within(bucket: &WindowBucket, now: Timestamp, window: Duration) -> bool {
    Timestamp::from_millis((bucket.minute + 1) * MINUTE_MILLIS) > now.minus(window)
}

/// The window without a released reservation of `amount` made at `reserved_at`.
pub fn release_from_window(
    window: Vec<WindowBucket>,
    amount: AtomicAmount,
    reserved_at: Timestamp,
) -> Vec<WindowBucket> {
    let minute = minute_of(reserved_at);
    window
        .into_iter()
        .filter_map(|mut bucket| {
            if bucket.minute == minute {
                bucket.amount = bucket.amount.saturating_sub(amount);
                bucket.count = bucket.count.saturating_sub(1);
                if bucket.count == 0 {
                    return None;
                }
            }
            Some(bucket)
        })
        .collect()
}

/// The agent's state item: policy, live spend per minute and an optimistic-lock version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentLedger {
    pub policy: Option<SpendPolicy>,
    pub window: Vec<WindowBucket>,
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
    pub window: Vec<WindowBucket>,
    pub snapshot: SpendSnapshot,
}

/// Live spend inside `now - window` (saturating at the ledger ceiling, which is far above any
/// cap, so saturation can only deny).
pub fn spent_within(buckets: &[WindowBucket], now: Timestamp, window: Duration) -> AtomicAmount {
    buckets
        .iter()
        .filter(|b| counts_within(b, now, window))
        .fold(AtomicAmount::ZERO, |sum, b| sum.checked_add(b.amount).unwrap_or(AtomicAmount::MAX))
}

fn count_within(buckets: &[WindowBucket], now: Timestamp, window: Duration) -> u32 {
    buckets.iter().filter(|b| counts_within(b, now, window)).fold(0u32, |sum, b| sum.saturating_add(b.count))
}

/// Evaluates every limit and, if all pass, returns the window with the new entry.
pub fn decide(
    agent: &str,
    ledger: &AgentLedger,
    requirement: &PaymentRequirement,
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

    // Buckets older than the longest window no longer count: drop them as we write.
    let mut window: Vec<WindowBucket> =
        ledger.window.iter().filter(|b| counts_within(b, now, WINDOW_24H)).cloned().collect();
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
    let minute = minute_of(now);
    match window.iter_mut().find(|b| b.minute == minute) {
        Some(bucket) => {
            bucket.amount = bucket.amount.checked_add(amount).unwrap_or(AtomicAmount::MAX);
            bucket.count = bucket.count.saturating_add(1);
        }
        None => window.push(WindowBucket { minute, amount, count: 1 }),
    }
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
            agentcore: None,
            principals: vec![],
        }
    }

    fn requirement(amount: &str) -> PaymentRequirement {
        let challenge = Challenge::from_v2_header(&encode_v2_header(&v2_payment_required(amount))).unwrap();
        challenge.select(&policy().allowlist(), "a").unwrap()
    }

    fn ledger_with(entries: &[(u64, i64)]) -> AgentLedger {
        AgentLedger {
            policy: Some(policy()),
            window: entries.iter().fold(Vec::new(), |window: Vec<WindowBucket>, (amount, at)| {
                let mut window = window;
                let minute = minute_of(Timestamp::from_millis(*at));
                match window.iter_mut().find(|b| b.minute == minute) {
                    Some(bucket) => {
                        bucket.amount = bucket.amount.checked_add(AtomicAmount::new(*amount).unwrap()).unwrap();
                        bucket.count += 1;
                    }
                    None => window.push(WindowBucket { minute, amount: AtomicAmount::new(*amount).unwrap(), count: 1 }),
                }
                window
            }),
            version: 1,
        }
    }

    const NOW: i64 = 100 * 24 * 3600 * 1000;
    const HOUR: i64 = 3600 * 1000;

    #[test]
    fn within_limits_reserves_and_snapshots() {
        let ledger = ledger_with(&[(500_000, NOW - 2 * HOUR)]);
        let decision = decide("a", &ledger, &requirement("1000000"), Timestamp::from_millis(NOW)).unwrap();
        assert_eq!(decision.window.len(), 2);
        assert_eq!(decision.snapshot.spent_24h_before.get(), 500_000);
        assert_eq!(decision.snapshot.spent_24h_after.get(), 1_500_000);
        assert_eq!(decision.snapshot.remaining_24h().get(), 1_000_000);
    }

    #[test]
    fn per_transaction_cap_denies_with_figures() {
        let error = decide("a", &ledger_with(&[]), &requirement("1000001"), Timestamp::from_millis(NOW)).unwrap_err();
        match error {
            PaymentError::SpendLimitExceeded { limit: LimitKind::PerTransaction, cap, amount, .. } => {
                assert_eq!((cap.get(), amount.get()), (1_000_000, 1_000_001));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn daily_cap_counts_the_rolling_window_only() {
        // 2.0 USD spent inside the window, 5 USD in the minute before it.
        let ledger = ledger_with(&[
            (1_000_000, NOW - HOUR * 2),
            (1_000_000, NOW - HOUR * 3),
            (5_000_000, NOW - 24 * HOUR - 60_000),
        ]);
        let error = decide("a", &ledger, &requirement("600000"), Timestamp::from_millis(NOW)).unwrap_err();
        match error {
            PaymentError::SpendLimitExceeded { limit: LimitKind::Rolling24Hours, spent, remaining, .. } => {
                assert_eq!((spent.get(), remaining.get()), (2_000_000, 500_000));
            }
            other => panic!("{other:?}"),
        }
        let ok = decide("a", &ledger, &requirement("500000"), Timestamp::from_millis(NOW)).unwrap();
        // The expired bucket was pruned from the window written back.
        assert_eq!(ok.window.len(), 3);
    }

    #[test]
    fn a_minute_partly_inside_the_window_still_counts() {
        // Paid 30 s into the minute that begins exactly 24 h before NOW.
        let ledger = ledger_with(&[(2_000_000, NOW - 24 * HOUR + 30_000)]);
        // At NOW + 45 s the payment itself is outside the window, but its minute is not: it
        // still counts (denied a little early, never late).
        let error = decide("a", &ledger, &requirement("600000"), Timestamp::from_millis(NOW + 45_000)).unwrap_err();
        assert_eq!(error.name(), "SpendLimitExceeded");
        // Once the whole minute has left the window, it no longer counts.
        let later = decide("a", &ledger, &requirement("600000"), Timestamp::from_millis(NOW + 60_000)).unwrap();
        assert_eq!(later.snapshot.spent_24h_before.get(), 0);
    }

    #[test]
    fn payments_share_their_minute_and_release_subtracts_exactly() {
        let at = Timestamp::from_millis(NOW);
        let mut ledger = ledger_with(&[]);
        for _ in 0..3 {
            ledger.window = decide("a", &ledger, &requirement("100000"), at).unwrap().window;
        }
        assert_eq!(
            ledger.window,
            [WindowBucket { minute: minute_of(at), amount: AtomicAmount::new(300_000).unwrap(), count: 3 }]
        );
        let released = release_from_window(ledger.window.clone(), AtomicAmount::new(100_000).unwrap(), at);
        assert_eq!((released[0].amount.get(), released[0].count), (200_000, 2));
        let empty = (0..3).fold(ledger.window, |w, _| release_from_window(w, AtomicAmount::new(100_000).unwrap(), at));
        assert!(empty.is_empty(), "{empty:?}");
    }

    #[test]
    fn the_window_stays_bounded_whatever_the_rate() {
        let mut policy = policy();
        policy.max_transactions_per_hour = u32::MAX;
        policy.daily_limit_usd = "1000000".parse().unwrap();
        let mut ledger = AgentLedger { policy: Some(policy), window: vec![], version: 1 };
        // One payment every 30 s for two days.
        for i in 0..(2 * 24 * 120) {
            let at = Timestamp::from_millis(NOW + i * 30_000);
            ledger.window = decide("a", &ledger, &requirement("1"), at).unwrap().window;
        }
        assert!(ledger.window.len() <= 1441, "{}", ledger.window.len());
    }

    #[test]
    fn hourly_rate_denies_the_fourth_payment() {
        let ledger = ledger_with(&[(1, NOW - 10), (1, NOW - 20), (1, NOW - 30), (1, NOW - 2 * HOUR)]);
        let error = decide("a", &ledger, &requirement("1"), Timestamp::from_millis(NOW)).unwrap_err();
        assert!(matches!(error, PaymentError::RateLimitExceeded { count: 3, limit: 3, .. }), "{error:?}");
    }

    #[test]
    fn paused_missing_policy_and_payee_allowlist_deny() {
        let mut ledger = ledger_with(&[]);
        ledger.policy.as_mut().unwrap().paused = true;
        assert_eq!(
            decide("a", &ledger, &requirement("1"), Timestamp::from_millis(NOW)).unwrap_err().name(),
            "AgentPaused"
        );
        ledger.policy = None;
        assert_eq!(
            decide("a", &ledger, &requirement("1"), Timestamp::from_millis(NOW)).unwrap_err().name(),
            "PolicyDenied"
        );
        let mut ledger = ledger_with(&[]);
        ledger.policy.as_mut().unwrap().allowed_payees = vec![Address::repeat_byte(1)];
        assert_eq!(
            decide("a", &ledger, &requirement("1"), Timestamp::from_millis(NOW)).unwrap_err().name(),
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
