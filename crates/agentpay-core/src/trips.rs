//! Automatic trips of the kill switch: conditions in the policy (`autoPause`) that pause an
//! agent by themselves — people rejecting its payments one after another, its payments
//! deviating from its habits again and again, or its spend racing. A trip is a policy change
//! like an operator's pause (a new version, in the policy history with who — `agentpay
//! (automatic trip)` — when and why), counted in the `KillSwitchTrips` metric whose alarm tells
//! the operators' topic. Only a person resumes the agent.

use serde::{Deserialize, Deserializer, Serialize};

use crate::clock::Timestamp;
use crate::money::{AtomicAmount, UsdAmount};
use crate::window::{HOUR_SLOTS, SpendWindow, hour_slot};

/// The most events one counter keeps: a trip threshold is at most this.
pub const MAX_TRIP_COUNT: u32 = 100;

/// Who a trip's policy change is attributed to.
pub const TRIPPED_BY: &str = "agentpay (automatic trip)";

const HOUR_MILLIS: i64 = 3600 * 1000;

/// The `autoPause` part of a policy; each condition is off unless set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoPausePolicy {
    /// Pause after this many approval rejections (or time-outs) in a row, no approval between.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "threshold")]
    pub consecutive_rejections: Option<u32>,
    /// Pause after this many payments flagged by deviation detection within an hour.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "threshold")]
    pub deviation_flags_per_hour: Option<u32>,
    /// Pause when a payment would bring the last hour's spend above this: a spend velocity far
    /// beyond the agent's normal pace, caught before the daily cap is reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_per_hour_usd: Option<UsdAmount>,
}

fn threshold<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    let n = u32::deserialize(deserializer)?;
    if (1..=MAX_TRIP_COUNT).contains(&n) {
        Ok(Some(n))
    } else {
        Err(serde::de::Error::custom(format!("autoPause: expected a count from 1 to {MAX_TRIP_COUNT}, received {n}")))
    }
}

/// What the trips count for one agent, kept in one small item (each list holds at most
/// [`MAX_TRIP_COUNT`] entries). Entries are keyed by reservation id, so a retried step never
/// counts its event twice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TripCounters {
    /// Reservations whose approval was rejected or timed out since the last approval.
    #[serde(default)]
    pub rejections: Vec<String>,
    /// Reservations (or claims) deviation detection flagged, with when, within the last hour.
    #[serde(default)]
    pub deviation_flags: Vec<(String, Timestamp)>,
    /// Bumped by every write; a write is conditioned on the version read (0: never written).
    #[serde(default)]
    pub version: u64,
}

/// Something a trip counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TripEvent {
    ApprovalRejected { reservation_id: String },
    ApprovalGranted,
    DeviationFlagged { reservation_id: String },
}

impl TripCounters {
    /// The counters after `event` at `now`; `None` when nothing changes (a repeated event, an
    /// approval with no rejection to forget), so nothing needs writing.
    pub fn after(&self, event: &TripEvent, now: Timestamp) -> Option<TripCounters> {
        let mut next = self.clone();
        let hour_ago = now.millis() - HOUR_MILLIS;
        next.deviation_flags.retain(|(_, at)| at.millis() > hour_ago);
        match event {
            TripEvent::ApprovalRejected { reservation_id } => {
                if next.rejections.contains(reservation_id) {
                    return None;
                }
                next.rejections.push(reservation_id.clone());
                keep_last(&mut next.rejections);
            }
            TripEvent::ApprovalGranted if next.rejections.is_empty() => return None,
            TripEvent::ApprovalGranted => next.rejections.clear(),
            TripEvent::DeviationFlagged { reservation_id } => {
                if next.deviation_flags.iter().any(|(id, _)| id == reservation_id) {
                    return None;
                }
                next.deviation_flags.push((reservation_id.clone(), now));
                keep_last(&mut next.deviation_flags);
            }
        }
        next.version += 1;
        Some(next)
    }

    /// The counters after a trip: empty, one version on.
    pub fn started_over(&self) -> TripCounters {
        TripCounters { version: self.version + 1, ..TripCounters::default() }
    }

    /// Why these counters trip `policy`, if they do.
    pub fn tripped(&self, policy: &AutoPausePolicy) -> Option<String> {
        if let Some(limit) = policy.consecutive_rejections
            && self.rejections.len() >= limit as usize
        {
            return Some(format!(
                "{} approval rejections or time-outs in a row (autoPause.consecutiveRejections is {limit})",
                self.rejections.len()
            ));
        }
        if let Some(limit) = policy.deviation_flags_per_hour
            && self.deviation_flags.len() >= limit as usize
        {
            return Some(format!(
                "{} payments deviated from the agent's history within an hour (autoPause.deviationFlagsPerHour is {limit})",
                self.deviation_flags.len()
            ));
        }
        None
    }
}

fn keep_last<T>(list: &mut Vec<T>) {
    let excess = list.len().saturating_sub(MAX_TRIP_COUNT as usize);
    list.drain(..excess);
}

/// What the agent spent in the current and the previous clock hour of a rolled window: the
/// last hour's spend, counted like the caps (a payment counts for 60 to 120 minutes, so a trip
/// may come a little early, never late).
pub fn spent_last_hour(window: &SpendWindow) -> AtomicAmount {
    let current = window.hours[hour_slot(window.hour)];
    let previous = if HOUR_SLOTS > 1 { window.hours[hour_slot(window.hour - 1)] } else { AtomicAmount::ZERO };
    current.checked_add(previous).unwrap_or(AtomicAmount::MAX)
}

/// Why a payment of `amount` on this rolled window trips the velocity limit, if it does.
pub fn velocity_trip(
    policy: &AutoPausePolicy,
    window: &SpendWindow,
    amount: AtomicAmount,
    decimals: u32,
) -> Option<String> {
    let limit_usd = policy.spend_per_hour_usd?;
    let Some(limit) = limit_usd.to_atomic(decimals) else {
        return Some(format!(
            "autoPause.spendPerHourUsd {limit_usd} USD cannot be expressed in {decimals}-decimal units"
        ));
    };
    let after = spent_last_hour(window).checked_add(amount).unwrap_or(AtomicAmount::MAX);
    (after > limit).then(|| {
        format!(
            "this payment would bring the last hour's spend to {} USDC, above autoPause.spendPerHourUsd of {limit_usd} USD",
            after.display_with_decimals(decimals)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(millis: i64) -> Timestamp {
        Timestamp::from_millis(millis)
    }

    fn rejected(id: &str) -> TripEvent {
        TripEvent::ApprovalRejected { reservation_id: id.into() }
    }

    #[test]
    fn rejections_in_a_row_trip_once_counted_once_each_and_an_approval_forgets_them() {
        let policy = AutoPausePolicy { consecutive_rejections: Some(2), ..AutoPausePolicy::default() };
        let one = TripCounters::default().after(&rejected("r1"), at(0)).unwrap();
        assert_eq!(one.tripped(&policy), None);
        assert_eq!(one.after(&rejected("r1"), at(1)), None, "a retried step counts nothing");
        let reset = one.after(&TripEvent::ApprovalGranted, at(2)).unwrap();
        assert!(reset.rejections.is_empty());
        assert_eq!(reset.after(&TripEvent::ApprovalGranted, at(3)), None, "nothing to forget, nothing written");
        let two = one.after(&rejected("r2"), at(4)).unwrap();
        assert!(two.tripped(&policy).unwrap().starts_with("2 approval rejections or time-outs in a row"));
        assert_eq!(two.version, 2);
    }

    #[test]
    fn deviation_flags_count_within_the_last_hour_only() {
        let policy = AutoPausePolicy { deviation_flags_per_hour: Some(3), ..AutoPausePolicy::default() };
        let flag = |id: &str| TripEvent::DeviationFlagged { reservation_id: id.into() };
        let mut counters = TripCounters::default();
        for (id, millis) in [("a", 0), ("b", 10 * 60_000), ("c", 61 * 60_000)] {
            counters = counters.after(&flag(id), at(millis)).unwrap();
        }
        assert_eq!(counters.deviation_flags.len(), 2, "the first fell out of the hour");
        assert_eq!(counters.tripped(&policy), None);
        let counters = counters.after(&flag("d"), at(62 * 60_000)).unwrap();
        assert!(counters.tripped(&policy).unwrap().starts_with("3 payments deviated"));
    }

    #[test]
    fn the_lists_stay_bounded() {
        let mut counters = TripCounters::default();
        for n in 0..(MAX_TRIP_COUNT + 20) {
            counters = counters.after(&rejected(&format!("r{n}")), at(0)).unwrap();
        }
        assert_eq!(counters.rejections.len(), MAX_TRIP_COUNT as usize);
        assert_eq!(counters.rejections[0], "r20");
    }

    #[test]
    fn velocity_counts_this_and_the_previous_hour() {
        let policy: AutoPausePolicy = serde_json::from_value(serde_json::json!({"spendPerHourUsd": "5.00"})).unwrap();
        let hour = 480_000;
        let mut window = SpendWindow::new(1).rolled(Timestamp::from_millis(hour * HOUR_MILLIS));
        window.hours[hour_slot(hour - 2)] = AtomicAmount::new(9_000_000).unwrap();
        window.hours[hour_slot(hour - 1)] = AtomicAmount::new(2_000_000).unwrap();
        window.hours[hour_slot(hour)] = AtomicAmount::new(2_000_000).unwrap();
        let amount = |a: u64| AtomicAmount::new(a).unwrap();
        assert_eq!(velocity_trip(&policy, &window, amount(1_000_000), 6), None, "5.00 is not above 5.00");
        let trip = velocity_trip(&policy, &window, amount(1_000_001), 6).unwrap();
        assert!(trip.contains("5.000001 USDC, above autoPause.spendPerHourUsd of 5.00 USD"), "{trip}");
    }

    #[test]
    fn bad_thresholds_are_named() {
        for bad in [serde_json::json!({"consecutiveRejections": 0}), serde_json::json!({"deviationFlagsPerHour": 101})]
        {
            let error = serde_json::from_value::<AutoPausePolicy>(bad).unwrap_err().to_string();
            assert!(error.contains("autoPause: expected a count from 1 to 100"), "{error}");
        }
        let error = serde_json::from_value::<AutoPausePolicy>(serde_json::json!({"spendPerHour": "5"})).unwrap_err();
        assert!(error.to_string().contains("unknown field `spendPerHour`"), "{error}");
    }
}
