//! Deviation from an agent's own history: a payment far above what the agent usually pays this
//! payee (or for this category) goes to a person, or is denied. The ledger keeps, per agent and
//! per scope, one total and one count per UTC day, written in the same transaction that
//! authorizes a payment, so the history only ever holds payments that were made.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::clock::Timestamp;
use crate::money::AtomicAmount;

/// The longest lookback a policy may ask for; the stores keep (and a read spans) at most this
/// many days per scope, so one history read is bounded (90 small items).
pub const MAX_LOOKBACK_DAYS: u32 = 90;

const DAY_MILLIS: i64 = 24 * 3600 * 1000;

/// The `deviation` part of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviationPolicy {
    /// A payment above this many times the trailing average is a deviation.
    #[serde(default = "Multiplier::default_three")]
    pub multiplier: Multiplier,
    #[serde(default = "default_lookback_days", deserialize_with = "lookback_days")]
    pub lookback_days: u32,
    /// Below this many payments in the lookback, the average says too little: no check.
    #[serde(default = "default_min_payments")]
    pub min_payments: u32,
    #[serde(default)]
    pub scope: DeviationScope,
    #[serde(default)]
    pub action: DeviationAction,
}

fn default_lookback_days() -> u32 {
    30
}

fn default_min_payments() -> u32 {
    5
}

fn lookback_days<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    let days = u32::deserialize(deserializer)?;
    if (1..=MAX_LOOKBACK_DAYS).contains(&days) {
        Ok(days)
    } else {
        Err(serde::de::Error::custom(format!(
            "deviation.lookbackDays: expected 1 to {MAX_LOOKBACK_DAYS} days, received {days}"
        )))
    }
}

/// What the average is taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeviationScope {
    /// The payee's address.
    #[default]
    Payee,
    /// The request's `context.category` when it names one, the payee otherwise.
    Category,
}

/// What happens to a deviating payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeviationAction {
    /// It waits for a person (reserved meanwhile), with the figures in the message.
    #[default]
    Approve,
    /// It is denied (`DeviationDetected`).
    Deny,
}

/// A multiplier with two decimals, kept in hundredths: written `3` or `"2.5"` (never a float).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Multiplier(u32);

impl Multiplier {
    fn default_three() -> Self {
        Self(300)
    }

    pub fn hundredths(self) -> u32 {
        self.0
    }

    /// Above 1 (a payment at the average is no deviation), at most 100.
    fn parse(text: &str) -> Option<Self> {
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !(fraction.is_empty() || (fraction.len() <= 2 && digits(fraction))) {
            return None;
        }
        let fraction = format!("{fraction:0<2}").parse::<u32>().ok()?;
        let hundredths = whole.parse::<u32>().ok()? * 100 + fraction;
        (101..=10_000).contains(&hundredths).then_some(Self(hundredths))
    }
}

impl fmt::Display for Multiplier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 % 100 {
            0 => write!(f, "{}", self.0 / 100),
            n if n % 10 == 0 => write!(f, "{}.{}", self.0 / 100, n / 10),
            n => write!(f, "{}.{n:02}", self.0 / 100),
        }
    }
}

impl Serialize for Multiplier {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Multiplier {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const EXPECTED: &str = "a multiplier above 1 and at most 100 with at most two decimals, written 3 or \"2.5\"";
        let value = serde_json::Value::deserialize(deserializer)?;
        let text = match &value {
            serde_json::Value::String(text) => Some(text.trim().to_owned()),
            serde_json::Value::Number(n) if n.is_u64() => Some(n.to_string()),
            _ => None,
        };
        text.as_deref().and_then(Self::parse).ok_or_else(|| {
            serde::de::Error::custom(format!("deviation.multiplier: expected {EXPECTED}, received {value}"))
        })
    }
}

/// Days since 1970-01-01 (UTC): the history's bucket.
pub fn day_number(at: Timestamp) -> u32 {
    u32::try_from(at.millis().div_euclid(DAY_MILLIS)).unwrap_or(0)
}

/// Where a payment's history is kept: `payee#0x…` always, and `category#…` when the request
/// names a category. Each authorization adds to every scope it has.
pub fn payee_scope(pay_to: &str) -> String {
    format!("payee#{pay_to}")
}

pub fn category_scope(category: &str) -> String {
    format!("category#{category}")
}

/// Every scope a payment adds to, whatever the policy says today (a policy that starts
/// checking categories later finds their history already kept).
pub fn history_scopes(pay_to: &str, category: Option<&str>) -> Vec<String> {
    std::iter::once(payee_scope(pay_to)).chain(category.map(category_scope)).collect()
}

/// The scope the policy compares against.
pub fn checked_scope(policy: &DeviationPolicy, pay_to: &str, category: Option<&str>) -> String {
    match (policy.scope, category) {
        (DeviationScope::Category, Some(category)) => category_scope(category),
        _ => payee_scope(pay_to),
    }
}

/// The days a check reads: the lookback, ending today.
pub fn lookback(policy: &DeviationPolicy, now: Timestamp) -> (u32, u32) {
    let today = day_number(now);
    (today.saturating_sub(policy.lookback_days - 1), today)
}

/// The payments of one scope over some days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpendHistory {
    pub total: AtomicAmount,
    pub count: u64,
}

/// What one authorization adds to the history: `amount` to each scope, on `day`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub scopes: Vec<String>,
    pub day: u32,
    pub amount: AtomicAmount,
}

/// A payment the history flags, with the figures a person needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deviation {
    pub scope: String,
    pub amount: AtomicAmount,
    /// The trailing average, rounded down to an atomic unit.
    pub average: AtomicAmount,
    pub payments: u64,
    pub lookback_days: u32,
    pub multiplier: String,
    pub action: DeviationAction,
}

impl Deviation {
    /// The sentence for the approval message, the denial and the audit.
    pub fn describe(&self, decimals: u32) -> String {
        // Ten times the ratio, rounded down, for one decimal without floats.
        let tenths = u128::from(self.amount.get()) * 10 / u128::from(self.average.get().max(1));
        format!(
            "{} USDC is {}.{}x the trailing {}-day average of {} USDC over {} payments for {} (the policy flags above {}x)",
            self.amount.display_with_decimals(decimals),
            tenths / 10,
            tenths % 10,
            self.lookback_days,
            self.average.display_with_decimals(decimals),
            self.payments,
            self.scope,
            self.multiplier,
        )
    }
}

/// Whether `amount` deviates: above `multiplier x total / count`, compared as
/// `amount x count x 100 > hundredths x total` in 128 bits (exact, no division).
pub fn check(
    policy: &DeviationPolicy,
    scope: String,
    history: SpendHistory,
    amount: AtomicAmount,
) -> Option<Deviation> {
    if history.count < u64::from(policy.min_payments) || history.count == 0 {
        return None;
    }
    let left = u128::from(amount.get()) * u128::from(history.count) * 100;
    let right = u128::from(policy.multiplier.hundredths()) * u128::from(history.total.get());
    (left > right).then(|| Deviation {
        scope,
        amount,
        average: AtomicAmount::new(history.total.get() / history.count).unwrap_or(AtomicAmount::MAX),
        payments: history.count,
        lookback_days: policy.lookback_days,
        multiplier: policy.multiplier.to_string(),
        action: policy.action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: serde_json::Value) -> Result<DeviationPolicy, String> {
        serde_json::from_value(json).map_err(|e| e.to_string())
    }

    fn history(total: u64, count: u64) -> SpendHistory {
        SpendHistory { total: AtomicAmount::new(total).unwrap(), count }
    }

    #[test]
    fn defaults_are_three_times_thirty_days_five_payments_per_payee_to_approval() {
        let p = policy(serde_json::json!({})).unwrap();
        assert_eq!((p.multiplier.hundredths(), p.lookback_days, p.min_payments), (300, 30, 5));
        assert_eq!((p.scope, p.action), (DeviationScope::Payee, DeviationAction::Approve));
        assert_eq!(serde_json::to_value(&p).unwrap()["multiplier"], "3");
    }

    #[test]
    fn multipliers_are_exact_and_bad_ones_are_named() {
        for (written, hundredths) in
            [(serde_json::json!(3), 300), (serde_json::json!("2.5"), 250), (serde_json::json!("1.01"), 101)]
        {
            assert_eq!(policy(serde_json::json!({"multiplier": written})).unwrap().multiplier.hundredths(), hundredths);
        }
        for bad in [
            serde_json::json!(2.5),
            serde_json::json!("1"),
            serde_json::json!("0.5"),
            serde_json::json!("3.001"),
            serde_json::json!("101"),
            serde_json::json!(-3),
        ] {
            let error = policy(serde_json::json!({"multiplier": bad})).unwrap_err();
            assert!(error.contains("deviation.multiplier: expected a multiplier above 1"), "{error}");
        }
        let error = policy(serde_json::json!({"lookbackDays": 91})).unwrap_err();
        assert!(error.contains("expected 1 to 90 days, received 91"), "{error}");
        let error = policy(serde_json::json!({"action": "shrug"})).unwrap_err();
        assert!(error.contains("approve") && error.contains("deny"), "{error}");
    }

    #[test]
    fn only_a_payment_above_the_multiple_of_the_average_deviates() {
        let p = policy(serde_json::json!({"multiplier": 3, "minPayments": 4})).unwrap();
        let amount = |a: u64| AtomicAmount::new(a).unwrap();
        // Average 1.00 USDC over 4 payments: 3.00 is at the limit, 3.000001 above it.
        assert_eq!(check(&p, "payee#x".into(), history(4_000_000, 4), amount(3_000_000)), None);
        let flagged = check(&p, "payee#x".into(), history(4_000_000, 4), amount(3_000_001)).unwrap();
        assert_eq!((flagged.average, flagged.payments), (amount(1_000_000), 4));
        assert_eq!(
            flagged.describe(6),
            "3.000001 USDC is 3.0x the trailing 30-day average of 1.00 USDC over 4 payments for payee#x (the policy flags above 3x)"
        );
        // Below the minimum history nothing is flagged, however large.
        assert_eq!(check(&p, "payee#x".into(), history(3_000_000, 3), amount(900_000_000)), None);
        // Exact at the extremes: no overflow.
        let huge = check(&p, "s".into(), history(AtomicAmount::MAX.get(), 4), AtomicAmount::MAX);
        assert!(huge.is_some());
    }

    #[test]
    fn the_scope_is_the_category_only_when_asked_and_named() {
        let by_category = policy(serde_json::json!({"scope": "category"})).unwrap();
        let by_payee = policy(serde_json::json!({})).unwrap();
        assert_eq!(checked_scope(&by_category, "0xA", Some("travel")), "category#travel");
        assert_eq!(checked_scope(&by_category, "0xA", None), "payee#0xA");
        assert_eq!(checked_scope(&by_payee, "0xA", Some("travel")), "payee#0xA");
    }

    #[test]
    fn the_lookback_ends_today() {
        let p = policy(serde_json::json!({"lookbackDays": 7})).unwrap();
        let now = Timestamp::from_millis(20_000 * DAY_MILLIS + 5);
        assert_eq!(lookback(&p, now), (19_994, 20_000));
    }
}
