//! An agent's rolling spend window, of constant size whatever the agent paid before.
//!
//! Two rings of slots: [`HOUR_SLOTS`] hours of amounts for the 24-hour cap and
//! [`MINUTE_SLOTS`] minutes of counts for the hourly rate, with their sums kept next to them.
//! The stored item is under 1 KB however busy the agent (a DynamoDB write of it costs the
//! minimum), where one bucket per minute grew to ~69 KB for an agent paying every minute.
//!
//! Slots are whole hours and minutes, and a slot counts while any part of it lies inside the
//! window: a payment counts against the 24-hour cap for 24 to 25 hours and against the hourly
//! rate for 60 to 61 minutes. Caps can deny a little early, never late.
//!
//! Writes are [`WindowWrite`]s: a charge or a refund at the window's current alignment is
//! arithmetic with conditions the store checks against what it holds at that moment (so
//! concurrent payments of one agent never conflict with each other); only a roll to a new
//! minute replaces the window as read, conditioned on its sequence number (once a minute).
//! [`SpendWindow::apply`] is the meaning of every write; the stores implement it (SQLite by
//! calling it inside a transaction, DynamoDB as condition and update expressions).

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::money::AtomicAmount;

/// 24 hours before the current one, and the current one.
pub const HOUR_SLOTS: usize = 25;
/// 60 minutes before the current one, and the current one.
pub const MINUTE_SLOTS: usize = 61;

const MINUTE_MILLIS: i64 = 60_000;
const HOUR_MILLIS: i64 = 60 * MINUTE_MILLIS;

/// Hours since the Unix epoch.
pub fn hour_of(at: Timestamp) -> i64 {
    at.millis().div_euclid(HOUR_MILLIS)
}

/// Minutes since the Unix epoch.
pub fn minute_of(at: Timestamp) -> i64 {
    at.millis().div_euclid(MINUTE_MILLIS)
}

/// The ring position of hour `hour`.
pub fn hour_slot(hour: i64) -> usize {
    hour.rem_euclid(HOUR_SLOTS as i64) as usize
}

/// The ring position of minute `minute`.
pub fn minute_slot(minute: i64) -> usize {
    minute.rem_euclid(MINUTE_SLOTS as i64) as usize
}

/// Live (reserved, authorized or settled) spend of one agent over the last day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpendWindow {
    /// The hour the hour ring is aligned to: slot `hour_slot(h)` holds hour `h` for every `h`
    /// in `hour - 24 ..= hour`.
    pub hour: i64,
    /// The minute the minute ring is aligned to, likewise for `minute - 60 ..= minute`.
    pub minute: i64,
    /// Exactly [`HOUR_SLOTS`] amounts.
    pub hours: Vec<AtomicAmount>,
    /// Exactly [`MINUTE_SLOTS`] counts.
    pub minutes: Vec<u32>,
    /// The sum of `hours`: what counts against the 24-hour cap at this alignment.
    pub spent: AtomicAmount,
    /// The sum of `minutes`: what counts against the hourly rate at this alignment.
    pub count: u32,
    /// Bumped by every write: a replacement is conditioned on it.
    pub seq: u64,
    /// The policy version the window was last written under (a policy edit bumps it, so a
    /// charge decided under an older policy does not apply).
    pub policy_version: u64,
}

impl Default for SpendWindow {
    fn default() -> Self {
        Self {
            hour: 0,
            minute: 0,
            hours: vec![AtomicAmount::ZERO; HOUR_SLOTS],
            minutes: vec![0; MINUTE_SLOTS],
            spent: AtomicAmount::ZERO,
            count: 0,
            seq: 0,
            policy_version: 0,
        }
    }
}

/// One write to a stored window. Each applies only under its conditions, checked against the
/// window as stored when the write lands; otherwise nothing is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowWrite {
    /// Adds one payment of `amount` at the stored alignment (`hour`, `minute`), if the stored
    /// window is still aligned there, was written under `policy_version`, and leaves room:
    /// `spent <= max_spent` and `count <= max_count` (each cap minus this payment).
    Charge {
        hour: i64,
        minute: i64,
        amount: AtomicAmount,
        max_spent: AtomicAmount,
        max_count: u32,
        policy_version: u64,
    },
    /// Replaces the stored window with `window` if it is still at `expected_seq` (0: none
    /// stored yet). A roll to a new minute, with the payment already in it.
    Replace { expected_seq: u64, window: Box<SpendWindow> },
    /// Takes a released payment out again, if the stored window is still aligned to
    /// (`hour`, `minute`): `amount` from hour `amount_hour` and one from minute
    /// `count_minute`, each only if still inside the window (`None`: already left it).
    Refund { hour: i64, minute: i64, amount_at: Option<(i64, AtomicAmount)>, count_at: Option<i64> },
}

/// Where a payment was charged: the slots a release must refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChargedAt {
    pub hour: i64,
    pub minute: i64,
}

impl ChargedAt {
    /// The slots of a payment made at `at` with no later alignment in the way (records from
    /// before charges were placed explicitly).
    pub fn of(at: Timestamp) -> Self {
        Self { hour: hour_of(at), minute: minute_of(at) }
    }
}

impl SpendWindow {
    /// An empty window written under `policy_version`.
    pub fn new(policy_version: u64) -> Self {
        Self { policy_version, ..Self::default() }
    }

    /// Whether nothing counts in it.
    pub fn is_empty(&self) -> bool {
        self.spent == AtomicAmount::ZERO && self.count == 0
    }

    /// The window as it stands at `now`: slots that left the window cleared, the alignment
    /// moved to `now`'s hour and minute. Never moves backwards: a clock behind the stored
    /// alignment (another machine's) reads the window as stored.
    pub fn rolled(&self, now: Timestamp) -> SpendWindow {
        let mut window = self.clone();
        let (hour, minute) = (hour_of(now), minute_of(now));
        if hour > window.hour {
            let steps = (hour - window.hour).min(HOUR_SLOTS as i64);
            for step in 1..=steps {
                let slot = hour_slot(window.hour + step);
                window.spent = window.spent.saturating_sub(window.hours[slot]);
                window.hours[slot] = AtomicAmount::ZERO;
            }
            window.hour = hour;
        }
        if minute > window.minute {
            let steps = (minute - window.minute).min(MINUTE_SLOTS as i64);
            for step in 1..=steps {
                let slot = minute_slot(window.minute + step);
                window.count = window.count.saturating_sub(window.minutes[slot]);
                window.minutes[slot] = 0;
            }
            window.minute = minute;
        }
        window
    }

    /// Where a payment decided on this (rolled) window is charged: its current slots.
    pub fn charge_point(&self) -> ChargedAt {
        ChargedAt { hour: self.hour, minute: self.minute }
    }

    /// This window with one more payment of `amount` in its current slots (`None` if a sum
    /// would pass the ledger's ceiling, which is far above any cap).
    pub fn with_payment(&self, amount: AtomicAmount) -> Option<SpendWindow> {
        let mut window = self.clone();
        let (hour, minute) = (hour_slot(window.hour), minute_slot(window.minute));
        window.hours[hour] = window.hours[hour].checked_add(amount)?;
        window.minutes[minute] = window.minutes[minute].checked_add(1)?;
        window.spent = window.spent.checked_add(amount)?;
        window.count = window.count.checked_add(1)?;
        window.seq += 1;
        Some(window)
    }

    /// The refund of a payment charged at `charged`, against this stored window: only the
    /// slots still inside it.
    pub fn refund_for(&self, charged: ChargedAt, amount: AtomicAmount) -> WindowWrite {
        let hour_inside = charged.hour <= self.hour && charged.hour > self.hour - HOUR_SLOTS as i64;
        let minute_inside = charged.minute <= self.minute && charged.minute > self.minute - MINUTE_SLOTS as i64;
        WindowWrite::Refund {
            hour: self.hour,
            minute: self.minute,
            amount_at: hour_inside.then_some((charged.hour, amount)),
            count_at: minute_inside.then_some(charged.minute),
        }
    }

    /// What `write` makes of this stored window, or `None` if its conditions do not hold.
    pub fn apply(&self, write: &WindowWrite) -> Option<SpendWindow> {
        match write {
            WindowWrite::Charge { hour, minute, amount, max_spent, max_count, policy_version } => {
                let holds = self.hour == *hour
                    && self.minute == *minute
                    && self.policy_version == *policy_version
                    && self.spent <= *max_spent
                    && self.count <= *max_count;
                if holds { self.with_payment(*amount) } else { None }
            }
            WindowWrite::Replace { expected_seq, window } => {
                (self.seq == *expected_seq).then(|| SpendWindow { seq: expected_seq + 1, ..(**window).clone() })
            }
            WindowWrite::Refund { hour, minute, amount_at, count_at } => {
                if self.hour != *hour || self.minute != *minute {
                    return None;
                }
                let mut window = self.clone();
                if let Some((at, amount)) = amount_at {
                    let slot = hour_slot(*at);
                    // A refund larger than its slot would take another payment's spend away.
                    if window.hours[slot] < *amount {
                        return None;
                    }
                    window.hours[slot] = window.hours[slot].saturating_sub(*amount);
                    window.spent = window.spent.saturating_sub(*amount);
                }
                if let Some(at) = count_at {
                    let slot = minute_slot(*at);
                    if window.minutes[slot] == 0 {
                        return None;
                    }
                    window.minutes[slot] -= 1;
                    window.count = window.count.saturating_sub(1);
                }
                window.seq += 1;
                Some(window)
            }
        }
    }

    /// Whether the sums match the slots and the rings have their sizes: what a store checks
    /// on every read, so a damaged item is refused rather than trusted.
    pub fn check(&self) -> Result<(), String> {
        if self.hours.len() != HOUR_SLOTS || self.minutes.len() != MINUTE_SLOTS {
            return Err(format!(
                "{} hour and {} minute slots, expected {HOUR_SLOTS} and {MINUTE_SLOTS}",
                self.hours.len(),
                self.minutes.len()
            ));
        }
        let spent = self.hours.iter().try_fold(AtomicAmount::ZERO, |sum, a| sum.checked_add(*a));
        let count = self.minutes.iter().try_fold(0u32, |sum, c| sum.checked_add(*c));
        if spent != Some(self.spent) || count != Some(self.count) {
            return Err(format!(
                "sums {} and {} do not match the slots ({spent:?}, {count:?})",
                self.spent, self.count
            ));
        }
        Ok(())
    }

    /// A window from per-minute buckets (minute, amount, count), as stores kept it before:
    /// each bucket in its hour and minute slot, at the alignment of `now`.
    pub fn from_minute_buckets(buckets: &[(i64, AtomicAmount, u32)], now: Timestamp) -> Option<SpendWindow> {
        let mut window = SpendWindow { hour: hour_of(now), minute: minute_of(now), ..SpendWindow::default() };
        for &(minute, amount, count) in buckets {
            let hour = minute.div_euclid(60);
            if hour <= window.hour && hour > window.hour - HOUR_SLOTS as i64 {
                let slot = hour_slot(hour);
                window.hours[slot] = window.hours[slot].checked_add(amount)?;
                window.spent = window.spent.checked_add(amount)?;
            }
            if minute <= window.minute && minute > window.minute - MINUTE_SLOTS as i64 {
                let slot = minute_slot(minute);
                window.minutes[slot] = window.minutes[slot].checked_add(count)?;
                window.count = window.count.checked_add(count)?;
            }
        }
        Some(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MINUTE: i64 = MINUTE_MILLIS;
    const HOUR: i64 = HOUR_MILLIS;
    const START: i64 = 1_000 * 24 * HOUR;

    fn at(millis: i64) -> Timestamp {
        Timestamp::from_millis(millis)
    }

    fn amount(value: u64) -> AtomicAmount {
        AtomicAmount::new(value).unwrap()
    }

    #[test]
    fn a_payment_counts_for_24_to_25_hours_and_60_to_61_minutes() {
        let paid = START + 30 * MINUTE + 10_000;
        let window = SpendWindow::default().rolled(at(paid)).with_payment(amount(5)).unwrap();
        assert_eq!((window.spent.get(), window.count), (5, 1));
        // Still in the last 60 minutes' count until its minute is 61 minutes old.
        assert_eq!(window.rolled(at(paid + 60 * MINUTE)).count, 1);
        assert_eq!(window.rolled(at(paid + 61 * MINUTE)).count, 0);
        // Counted against the day until its hour is 25 hours old.
        assert_eq!(window.rolled(at(START + 25 * HOUR - 1)).spent.get(), 5);
        assert_eq!(window.rolled(at(START + 25 * HOUR)).spent.get(), 0);
        // Never shorter than the exact window.
        assert_eq!(window.rolled(at(paid + 24 * HOUR - 1)).spent.get(), 5);
    }

    #[test]
    fn a_charge_applies_only_at_its_alignment_and_under_its_caps() {
        let window = SpendWindow::new(3).rolled(at(START));
        let charge = |max_spent: u64, max_count: u32, policy_version: u64| WindowWrite::Charge {
            hour: window.hour,
            minute: window.minute,
            amount: amount(10),
            max_spent: amount(max_spent),
            max_count,
            policy_version,
        };
        let charged = window.apply(&charge(0, 0, 3)).unwrap();
        assert_eq!((charged.spent.get(), charged.count, charged.seq), (10, 1, 1));
        assert_eq!(charged.apply(&charge(9, 5, 3)), None, "spent 10 > 9: no room");
        assert_eq!(charged.apply(&charge(10, 0, 3)), None, "count 1 > 0: rate reached");
        assert_eq!(charged.apply(&charge(10, 1, 4)), None, "another policy version");
        assert!(charged.apply(&charge(10, 1, 3)).is_some());
        assert_eq!(charged.rolled(at(START + MINUTE)).apply(&charge(100, 100, 3)), None, "realigned");
    }

    #[test]
    fn a_replace_needs_the_sequence_it_was_decided_on() {
        let stored = SpendWindow::new(1).rolled(at(START)).with_payment(amount(7)).unwrap();
        let next = stored.rolled(at(START + 2 * MINUTE)).with_payment(amount(1)).unwrap();
        let write = WindowWrite::Replace { expected_seq: stored.seq, window: Box::new(next.clone()) };
        assert_eq!(stored.apply(&write).unwrap().seq, stored.seq + 1);
        let moved = stored.with_payment(amount(1)).unwrap();
        assert_eq!(moved.apply(&write), None);
    }

    #[test]
    fn a_refund_outside_the_window_touches_nothing_there() {
        let charged_at = at(START);
        let stored = SpendWindow::default().rolled(charged_at).with_payment(amount(4)).unwrap();
        let point = ChargedAt::of(charged_at);
        // Two hours later: the count has left the rate window, the amount still counts.
        let later = stored.rolled(at(START + 2 * HOUR)).with_payment(amount(1)).unwrap();
        let refund = later.refund_for(point, amount(4));
        assert!(matches!(refund, WindowWrite::Refund { amount_at: Some(_), count_at: None, .. }), "{refund:?}");
        let refunded = later.apply(&refund).unwrap();
        assert_eq!((refunded.spent.get(), refunded.count), (1, 1));
        refunded.check().unwrap();
        // A refund larger than its slot is refused, not saturated into someone else's spend.
        assert_eq!(later.apply(&later.refund_for(point, amount(5))), None);
    }

    #[test]
    fn minute_buckets_convert_with_their_sums() {
        let now = at(START + 3 * HOUR);
        let buckets = [
            (minute_of(now), amount(1), 1),
            (minute_of(now) - 59, amount(2), 2),
            (minute_of(now) - 200, amount(4), 1),
            (minute_of(now) - 26 * 60, amount(8), 1),
        ];
        let window = SpendWindow::from_minute_buckets(&buckets, now).unwrap();
        window.check().unwrap();
        assert_eq!((window.spent.get(), window.count), (7, 3));
    }

    /// One step of a random history: a payment, a release of an earlier one, or time passing.
    #[derive(Debug, Clone)]
    enum Step {
        Pay(u64),
        Release(usize),
        Wait(i64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1u64..1_000).prop_map(Step::Pay),
            1 => (0usize..64).prop_map(Step::Release),
            3 => (0i64..3 * HOUR).prop_map(Step::Wait),
        ]
    }

    proptest! {
        /// Against an exact list of live payments: the window's spend is at least the exact
        /// 24-hour spend and at most the spend of the last 25 hours; its count is at least the
        /// exact last-hour count and at most that of the last 61 minutes; the sums match.
        #[test]
        fn the_window_bounds_the_exact_spend(steps in proptest::collection::vec(step(), 1..200)) {
            let mut now = START;
            let mut window = SpendWindow::default();
            let mut live: Vec<(i64, u64, ChargedAt)> = Vec::new();
            for step in steps {
                match step {
                    Step::Pay(value) => {
                        window = window.rolled(at(now));
                        let point = window.charge_point();
                        window = window.with_payment(amount(value)).unwrap();
                        live.push((now, value, point));
                    }
                    Step::Release(index) if !live.is_empty() => {
                        let (_, value, point) = live.remove(index % live.len());
                        let refund = window.refund_for(point, amount(value));
                        window = window.apply(&refund).expect("a refund at the stored alignment applies");
                    }
                    Step::Release(_) => {}
                    Step::Wait(millis) => now += millis,
                }
                window.check().unwrap();
                let rolled = window.rolled(at(now));
                rolled.check().unwrap();
                let within = |span: i64| live.iter().filter(|(t, ..)| *t > now - span).map(|(_, v, _)| v).sum::<u64>();
                let counted = |span: i64| live.iter().filter(|(t, ..)| *t > now - span).count() as u32;
                prop_assert!(rolled.spent.get() >= within(24 * HOUR), "never less than the exact day");
                prop_assert!(rolled.spent.get() <= within(25 * HOUR));
                prop_assert!(rolled.count >= counted(HOUR), "never less than the exact hour");
                prop_assert!(rolled.count <= counted(61 * MINUTE));
            }
        }
    }
}
