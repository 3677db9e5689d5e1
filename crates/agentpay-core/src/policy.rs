//! Spend policy per agent and the pure decision that reserves against it.
//!
//! The decision is a function of (policy, current window, payment, now); stores only make
//! its result durable with a version check, so both adapters enforce the same rules.

use alloy_primitives::Address;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::error::{LimitKind, PaymentError};
use crate::money::{AtomicAmount, UsdAmount};
use crate::payment::{Allowlist, Network, PaymentRequirement};
use crate::window::{ChargedAt, SpendWindow, WindowWrite};

/// Whether an agent's payments are made, or only decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    #[default]
    Enforce,
    Shadow,
}

impl PolicyMode {
    pub fn is_enforce(&self) -> bool {
        *self == PolicyMode::Enforce
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyMode::Enforce => "enforce",
            PolicyMode::Shadow => "shadow",
        }
    }
}

/// Limits are configured in USD and converted exactly to the asset's atomic units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpendPolicy {
    /// Kill switch: a paused agent is denied every payment.
    #[serde(default)]
    pub paused: bool,
    /// `enforce` (the default) pays; `shadow` decides every payment and pays none (see
    /// `crate::shadow`).
    #[serde(default, skip_serializing_if = "PolicyMode::is_enforce")]
    pub mode: PolicyMode,
    pub per_transaction_limit_usd: UsdAmount,
    /// Rolling 24 hours: settled + authorized + reserved.
    pub daily_limit_usd: UsdAmount,
    pub max_transactions_per_hour: u32,
    /// Payments above it wait for a person (human approval), already reserved. None: no
    /// payment waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_threshold_usd: Option<UsdAmount>,
    /// Payments far above the agent's own average for the payee (or category) go to a person
    /// or are denied. None: no deviation check (and no history read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deviation: Option<crate::deviation::DeviationPolicy>,
    /// Conditions that pause the agent by themselves (see [`crate::trips`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<crate::trips::AutoPausePolicy>,
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

/// The agent's state as the steps read it: policy, its version, and the live spend window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentLedger {
    pub policy: Option<SpendPolicy>,
    /// The policy's version: 0 when the agent has never been written.
    pub version: u64,
    pub window: SpendWindow,
}

impl AgentLedger {
    /// The kill switch is on: every payment is denied (`decide`), and nothing is counted
    /// toward a trip.
    pub fn paused(&self) -> bool {
        self.policy.as_ref().is_some_and(|p| p.paused)
    }
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

/// What a successful decision writes: the window write, where the payment is charged (its
/// reservation keeps it, for a release), and the figures for the audit.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendDecision {
    pub write: WindowWrite,
    pub charged: ChargedAt,
    pub snapshot: SpendSnapshot,
    /// Why the payment waits for a person, if it does.
    pub approval: Option<String>,
}

/// Evaluates every limit against the window as it stands at `now` and, if all pass, returns
/// the write that reserves the payment: a conditional charge where the stored window is
/// already aligned to `now` (the store re-checks the caps against what it holds when the
/// write lands, so concurrent payments never overshoot and never conflict), otherwise a
/// replacement of the rolled window (once a minute), conditioned on what was read.
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
    let approval_threshold = policy
        .approval_threshold_usd
        .map(|usd| convert(usd, "approval threshold").map(|atomic| (usd, atomic)))
        .transpose()?;
    let amount = requirement.amount;

    let rolled = ledger.window.rolled(now);
    let spent_24h_before = rolled.spent;
    let transactions_last_hour_before = rolled.count;

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
    let stored = &ledger.window;
    let aligned = stored.seq > 0
        && stored.policy_version == ledger.version
        && (stored.hour, stored.minute) == (rolled.hour, rolled.minute);
    let write = if aligned {
        WindowWrite::Charge {
            hour: rolled.hour,
            minute: rolled.minute,
            amount,
            max_spent: daily_limit.saturating_sub(amount),
            max_count: policy.max_transactions_per_hour - 1,
            policy_version: ledger.version,
        }
    } else {
        let mut next = rolled
            .with_payment(amount)
            .ok_or_else(|| PaymentError::LedgerInconsistent(format!("agent {agent}: the window's sums overflow")))?;
        next.policy_version = ledger.version;
        WindowWrite::Replace { expected_seq: stored.seq, window: Box::new(next) }
    };
    let approval = approval_threshold.filter(|(_, atomic)| amount > *atomic).map(|(usd, _)| {
        format!("{} USDC is above the agent's approval threshold of {usd} USD", amount.display_with_decimals(decimals))
    });
    Ok(SpendDecision {
        write,
        approval,
        charged: rolled.charge_point(),
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
            mode: Default::default(),
            per_transaction_limit_usd: "1.00".parse().unwrap(),
            daily_limit_usd: "2.50".parse().unwrap(),
            max_transactions_per_hour: 3,
            approval_threshold_usd: None,
            deviation: None,
            auto_pause: None,
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

    /// A ledger whose window holds `entries` (amount, millis), paid in time order.
    fn ledger_with(entries: &[(u64, i64)]) -> AgentLedger {
        let mut entries = entries.to_vec();
        entries.sort_by_key(|(_, at)| *at);
        let window = entries.iter().fold(SpendWindow::new(1), |window, (amount, at)| {
            window.rolled(Timestamp::from_millis(*at)).with_payment(AtomicAmount::new(*amount).unwrap()).unwrap()
        });
        AgentLedger { policy: Some(policy()), window, version: 1 }
    }

    /// The stored window after `decision` lands on `ledger`.
    fn applied(ledger: &AgentLedger, decision: &SpendDecision) -> SpendWindow {
        ledger.window.apply(&decision.write).expect("a fresh decision applies to what it read")
    }

    const NOW: i64 = 100 * 24 * 3600 * 1000;
    const HOUR: i64 = 3600 * 1000;

    #[test]
    fn within_limits_reserves_and_snapshots() {
        let ledger = ledger_with(&[(500_000, NOW - 2 * HOUR)]);
        let decision = decide("a", &ledger, &requirement("1000000"), Timestamp::from_millis(NOW)).unwrap();
        assert_eq!(decision.snapshot.spent_24h_before.get(), 500_000);
        assert_eq!(decision.snapshot.spent_24h_after.get(), 1_500_000);
        assert_eq!(decision.snapshot.remaining_24h().get(), 1_000_000);
        assert_eq!(applied(&ledger, &decision).spent.get(), 1_500_000);
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
        // 2.0 USD spent inside the window, 5 USD in the hour before the window's first.
        let ledger =
            ledger_with(&[(1_000_000, NOW - HOUR * 2), (1_000_000, NOW - HOUR * 3), (5_000_000, NOW - 25 * HOUR)]);
        let error = decide("a", &ledger, &requirement("600000"), Timestamp::from_millis(NOW)).unwrap_err();
        match error {
            PaymentError::SpendLimitExceeded { limit: LimitKind::Rolling24Hours, spent, remaining, .. } => {
                assert_eq!((spent.get(), remaining.get()), (2_000_000, 500_000));
            }
            other => panic!("{other:?}"),
        }
        let ok = decide("a", &ledger, &requirement("500000"), Timestamp::from_millis(NOW)).unwrap();
        // The expired hour was cleared from the window written back.
        assert_eq!(applied(&ledger, &ok).spent.get(), 2_500_000);
    }

    #[test]
    fn an_hour_partly_inside_the_window_still_counts() {
        // Paid 30 s into the hour that begins exactly 24 h before NOW.
        let ledger = ledger_with(&[(2_000_000, NOW - 24 * HOUR + 30_000)]);
        // An hour later the payment itself is outside the window, but its hour is not quite:
        // it still counts (denied a little early, never late).
        let error = decide("a", &ledger, &requirement("600000"), Timestamp::from_millis(NOW + HOUR - 1)).unwrap_err();
        assert_eq!(error.name(), "SpendLimitExceeded");
        // Once the whole hour has left the window, it no longer counts.
        let later = decide("a", &ledger, &requirement("600000"), Timestamp::from_millis(NOW + HOUR)).unwrap();
        assert_eq!(later.snapshot.spent_24h_before.get(), 0);
    }

    #[test]
    fn an_aligned_window_is_charged_with_the_caps_as_conditions() {
        let at = Timestamp::from_millis(NOW);
        let mut ledger = ledger_with(&[]);
        // The first payment of the minute realigns the window; the next ones are charges.
        let first = decide("a", &ledger, &requirement("100000"), at).unwrap();
        assert!(matches!(first.write, WindowWrite::Replace { expected_seq: 0, .. }), "{:?}", first.write);
        ledger.window = applied(&ledger, &first);
        let second = decide("a", &ledger, &requirement("100000"), at).unwrap();
        match &second.write {
            WindowWrite::Charge { max_spent, max_count, amount, .. } => {
                assert_eq!((max_spent.get(), *max_count, amount.get()), (2_400_000, 2, 100_000));
            }
            other => panic!("{other:?}"),
        }
        // A concurrent payment landed first: the charge still applies (no conflict) and
        // the caps are checked against what is stored then.
        let concurrent = ledger.window.with_payment(AtomicAmount::new(2_300_001).unwrap()).unwrap();
        assert_eq!(concurrent.apply(&second.write), None, "2.400001 + 0.1 would pass the 2.5 cap");
        let small = ledger.window.with_payment(AtomicAmount::new(1).unwrap()).unwrap();
        assert_eq!(small.apply(&second.write).unwrap().spent.get(), 200_001);
    }

    #[test]
    fn the_window_stays_bounded_whatever_the_rate() {
        let mut policy = policy();
        policy.max_transactions_per_hour = u32::MAX;
        policy.daily_limit_usd = "1000000".parse().unwrap();
        let mut ledger = AgentLedger { policy: Some(policy), window: SpendWindow::new(1), version: 1 };
        // One payment every 30 s for two days.
        for i in 0..(2 * 24 * 120) {
            let at = Timestamp::from_millis(NOW + i * 30_000);
            let decision = decide("a", &ledger, &requirement("1"), at).unwrap();
            ledger.window = applied(&ledger, &decision);
        }
        let size = serde_json::to_string(&ledger.window).unwrap().len();
        assert!(size < 1024, "{size} bytes");
        assert_eq!(ledger.window.count, 122, "61 minutes (the last hour and the current minute) of two each");
    }

    #[test]
    fn payments_above_the_approval_threshold_wait_for_a_person() {
        let mut ledger = ledger_with(&[]);
        ledger.policy.as_mut().unwrap().approval_threshold_usd = Some("0.50".parse().unwrap());
        let at = Timestamp::from_millis(NOW);
        assert_eq!(decide("a", &ledger, &requirement("500000"), at).unwrap().approval, None, "at the threshold");
        let above = decide("a", &ledger, &requirement("500001"), at).unwrap();
        assert_eq!(
            above.approval.as_deref(),
            Some("0.500001 USDC is above the agent's approval threshold of 0.50 USD")
        );
        // The caps still come first: waiting for a person never lets a payment past them.
        let error = decide("a", &ledger, &requirement("1000001"), at).unwrap_err();
        assert_eq!(error.name(), "SpendLimitExceeded");
        ledger.policy.as_mut().unwrap().approval_threshold_usd = None;
        assert_eq!(decide("a", &ledger, &requirement("900000"), at).unwrap().approval, None);
    }

    #[test]
    fn hourly_rate_denies_the_fourth_payment() {
        let ledger = ledger_with(&[(1, NOW - 10), (1, NOW - 20), (1, NOW - 30), (1, NOW - 2 * HOUR)]);
        assert_eq!(ledger.window.count, 3);
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
