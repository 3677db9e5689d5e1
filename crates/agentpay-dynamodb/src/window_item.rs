//! The agent's window as one small DynamoDB item, and [`WindowWrite`]s as conditional
//! expressions on it (the meaning of each is `SpendWindow::apply`; the conformance suite runs
//! the same cases on both stores).
//!
//! Attributes: `hourEpoch`, `minuteEpoch`, `spent`, `cnt`, `seq`, `policyVersion`, and one
//! number per non-empty slot, `h0`…`h24` and `m0`…`m60` (an absent slot is 0). A charge adds
//! to its two slots and the sums with `if_not_exists` arithmetic; its conditions are the
//! alignment, the policy version and the room left under each cap, checked by DynamoDB when
//! the write lands, so concurrent charges never conflict with each other.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem, Update};

use agentpay_core::error::PaymentError;
use agentpay_core::money::AtomicAmount;
use agentpay_core::window::{HOUR_SLOTS, MINUTE_SLOTS, SpendWindow, WindowWrite, hour_slot, minute_slot};

use super::{Item, build_error, n, s};

/// The window item's sort key, next to `STATE` (the policy) in the agent's partition.
pub const WINDOW_SK: &str = "WINDOW";

fn hour_name(slot: usize) -> String {
    format!("h{slot}")
}

fn minute_name(slot: usize) -> String {
    format!("m{slot}")
}

fn unreadable(agent_id: &str, why: String) -> PaymentError {
    PaymentError::LedgerInconsistent(format!("agent {agent_id}: unreadable window: {why}"))
}

fn number<T: std::str::FromStr>(item: &Item, name: &str) -> Result<Option<T>, String> {
    match item.get(name) {
        None => Ok(None),
        Some(AttributeValue::N(text)) => {
            text.parse().map(Some).map_err(|_| format!("{name} = {text:?} is not a number"))
        }
        Some(_) => Err(format!("{name} is not a number attribute")),
    }
}

/// The window stored in `item`; its sums are checked against its slots.
pub fn decode(agent_id: &str, item: &Item) -> Result<SpendWindow, PaymentError> {
    let read = || -> Result<SpendWindow, String> {
        let mut window = SpendWindow {
            hour: number(item, "hourEpoch")?.unwrap_or(0),
            minute: number(item, "minuteEpoch")?.unwrap_or(0),
            spent: number::<u64>(item, "spent")?.and_then(AtomicAmount::new).unwrap_or(AtomicAmount::ZERO),
            count: number(item, "cnt")?.unwrap_or(0),
            seq: number(item, "seq")?.unwrap_or(0),
            policy_version: number(item, "policyVersion")?.unwrap_or(0),
            ..SpendWindow::default()
        };
        for slot in 0..HOUR_SLOTS {
            if let Some(value) = number::<u64>(item, &hour_name(slot))? {
                window.hours[slot] = AtomicAmount::new(value).ok_or(format!("h{slot} = {value} is too large"))?;
            }
        }
        for slot in 0..MINUTE_SLOTS {
            if let Some(value) = number(item, &minute_name(slot))? {
                window.minutes[slot] = value;
            }
        }
        window.check()?;
        Ok(window)
    };
    read().map_err(|why| unreadable(agent_id, why))
}

/// The whole item for `window` (empty slots left out: they read as 0).
pub fn item(pk: AttributeValue, window: &SpendWindow) -> Item {
    let mut item = Item::from([
        ("pk".to_owned(), pk),
        ("sk".to_owned(), s(WINDOW_SK)),
        ("hourEpoch".to_owned(), n(window.hour)),
        ("minuteEpoch".to_owned(), n(window.minute)),
        ("spent".to_owned(), n(window.spent.get())),
        ("cnt".to_owned(), n(window.count)),
        ("seq".to_owned(), n(window.seq)),
        ("policyVersion".to_owned(), n(window.policy_version)),
    ]);
    for (slot, amount) in window.hours.iter().enumerate().filter(|(_, a)| **a != AtomicAmount::ZERO) {
        item.insert(hour_name(slot), n(amount.get()));
    }
    for (slot, count) in window.minutes.iter().enumerate().filter(|(_, c)| **c != 0) {
        item.insert(minute_name(slot), n(count));
    }
    item
}

/// An update expression with its names and values, built clause by clause.
#[derive(Default)]
struct Expression {
    sets: Vec<String>,
    conditions: Vec<String>,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Expression {
    fn update(self, table: &str, key: Item) -> Result<TransactWriteItem, PaymentError> {
        let update = Update::builder()
            .table_name(table)
            .set_key(Some(key))
            .update_expression(format!("SET {}", self.sets.join(", ")))
            .condition_expression(self.conditions.join(" AND "))
            .set_expression_attribute_names((!self.names.is_empty()).then_some(self.names))
            .set_expression_attribute_values(Some(self.values))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(build_error)?;
        Ok(TransactWriteItem::builder().update(update).build())
    }
}

/// `write` as one transaction item on the window item at `key` in `table`.
pub fn transact_item(table: &str, key: Item, write: &WindowWrite) -> Result<TransactWriteItem, PaymentError> {
    match write {
        WindowWrite::Charge { hour, minute, amount, max_spent, max_count, policy_version } => {
            let mut e = Expression::default();
            e.names.insert("#h".into(), hour_name(hour_slot(*hour)));
            e.names.insert("#m".into(), minute_name(minute_slot(*minute)));
            e.sets.extend(
                [
                    "spent = spent + :amount",
                    "cnt = cnt + :one",
                    "seq = seq + :one",
                    "#h = if_not_exists(#h, :zero) + :amount",
                    "#m = if_not_exists(#m, :zero) + :one",
                ]
                .map(String::from),
            );
            e.conditions.extend(
                [
                    "hourEpoch = :hour",
                    "minuteEpoch = :minute",
                    "policyVersion = :policy",
                    "spent <= :maxSpent",
                    "cnt <= :maxCount",
                ]
                .map(String::from),
            );
            e.values.extend([
                (":amount".into(), n(amount.get())),
                (":one".into(), n(1)),
                (":zero".into(), n(0)),
                (":hour".into(), n(hour)),
                (":minute".into(), n(minute)),
                (":policy".into(), n(policy_version)),
                (":maxSpent".into(), n(max_spent.get())),
                (":maxCount".into(), n(max_count)),
            ]);
            e.update(table, key)
        }
        WindowWrite::Refund { hour, minute, amount_at, count_at } => {
            let mut e = Expression::default();
            e.sets.push("seq = seq + :one".into());
            e.conditions.extend(["hourEpoch = :hour", "minuteEpoch = :minute"].map(String::from));
            e.values.extend([(":one".into(), n(1)), (":hour".into(), n(hour)), (":minute".into(), n(minute))]);
            if let Some((at, amount)) = amount_at {
                e.names.insert("#h".into(), hour_name(hour_slot(*at)));
                e.sets.extend(["spent = spent - :amount", "#h = #h - :amount"].map(String::from));
                // A refund larger than its slot would take another payment's spend away.
                e.conditions.push("#h >= :amount".into());
                e.values.insert(":amount".into(), n(amount.get()));
            }
            if let Some(at) = count_at {
                e.names.insert("#m".into(), minute_name(minute_slot(*at)));
                e.sets.extend(["cnt = cnt - :one", "#m = #m - :one"].map(String::from));
                e.conditions.push("#m >= :one".into());
            }
            e.update(table, key)
        }
        WindowWrite::Replace { expected_seq, window } => {
            let stored = SpendWindow { seq: expected_seq + 1, ..(**window).clone() };
            let pk = key.get("pk").cloned().unwrap_or_else(|| s(""));
            // The item at `key` (the window, or the shadow window beside it).
            let mut whole = item(pk, &stored);
            whole.extend(key.get("sk").map(|sk| ("sk".to_owned(), sk.clone())));
            let put = Put::builder()
                .table_name(table)
                .set_item(Some(whole))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
            let put = match expected_seq {
                0 => put.condition_expression("attribute_not_exists(pk)"),
                seq => put.condition_expression("seq = :expected").expression_attribute_values(":expected", n(seq)),
            };
            Ok(TransactWriteItem::builder().put(put.build().map_err(build_error)?).build())
        }
    }
}

#[cfg(test)]
mod tests {
    use agentpay_core::clock::Timestamp;

    use super::*;

    #[test]
    fn a_busy_window_round_trips_in_under_a_kilobyte() {
        // Every slot taken, with amounts of a thousand USDC per hour.
        let mut window = SpendWindow::default().rolled(Timestamp::from_millis(1_800_000_000_000));
        for slot in 0..HOUR_SLOTS {
            window.hours[slot] = AtomicAmount::new(1_000_000_000).unwrap();
        }
        window.minutes = vec![600; MINUTE_SLOTS];
        window.spent = AtomicAmount::new(25_000_000_000).unwrap();
        window.count = 600 * MINUTE_SLOTS as u32;
        window.seq = 123_456;
        let stored = item(s("AGENT#an-agent-with-a-long-name-0123456789"), &window);
        assert_eq!(decode("a", &stored).unwrap(), window);
        let bytes = crate::sizing::item_bytes(&stored);
        assert!(bytes < 1024, "{bytes} bytes");
    }

    #[test]
    fn sums_that_disagree_with_the_slots_are_refused() {
        let mut stored = item(s("AGENT#a"), &SpendWindow::default());
        stored.insert("h3".into(), n(5));
        let error = decode("a", &stored).unwrap_err();
        assert!(error.to_string().contains("do not match"), "{error}");
    }
}
