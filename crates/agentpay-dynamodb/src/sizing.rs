//! DynamoDB's item-size and capacity-unit rules, for the figures the benches and tests report
//! (moto returns no consumed capacity worth reading).
//!
//! Sizes follow the developer guide ("Item sizes and formats"): an attribute is its name's
//! UTF-8 bytes plus its value; a string its UTF-8 bytes, a number 1 byte per two significant
//! digits plus 1, binary its bytes, a boolean or null 1, a list or map 3 bytes plus 1 per
//! element plus the elements (map keys count like names), a set the sum of its elements.

use aws_sdk_dynamodb::types::AttributeValue;

use super::Item;

fn number_bytes(text: &str) -> usize {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    let significant = digits.trim_start_matches('0');
    let significant = if significant.contains('.') { significant } else { significant.trim_end_matches('0') };
    significant.len().div_ceil(2) + 1
}

fn value_bytes(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(text) => text.len(),
        AttributeValue::N(text) => number_bytes(text),
        AttributeValue::B(blob) => blob.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::Ss(texts) => texts.iter().map(String::len).sum(),
        AttributeValue::Ns(numbers) => numbers.iter().map(|t| number_bytes(t)).sum(),
        AttributeValue::Bs(blobs) => blobs.iter().map(|b| b.as_ref().len()).sum(),
        AttributeValue::L(values) => 3 + values.iter().map(|v| 1 + value_bytes(v)).sum::<usize>(),
        AttributeValue::M(map) => 3 + map.iter().map(|(k, v)| 1 + k.len() + value_bytes(v)).sum::<usize>(),
        _ => 0,
    }
}

fn json_value_bytes(value: &serde_json::Value) -> usize {
    let Some((kind, inner)) = value.as_object().and_then(|o| o.iter().next()) else {
        return 0;
    };
    let text = |v: &serde_json::Value| v.as_str().map_or(0, str::len);
    let elements = || inner.as_array().cloned().unwrap_or_default();
    match kind.as_str() {
        "S" => text(inner),
        "N" => inner.as_str().map_or(0, number_bytes),
        // Base64 in JSON: the bytes are three quarters of the text.
        "B" => text(inner) * 3 / 4,
        "BOOL" | "NULL" => 1,
        "SS" => elements().iter().map(text).sum(),
        "NS" => elements().iter().map(|v| v.as_str().map_or(0, number_bytes)).sum(),
        "L" => 3 + elements().iter().map(|v| 1 + json_value_bytes(v)).sum::<usize>(),
        "M" => {
            3 + inner.as_object().into_iter().flatten().map(|(k, v)| 1 + k.len() + json_value_bytes(v)).sum::<usize>()
        }
        _ => 0,
    }
}

/// The size of an item written in DynamoDB's JSON wire form (a request's `Item`).
pub fn json_item_bytes(item: &serde_json::Value) -> usize {
    item.as_object().into_iter().flatten().map(|(name, value)| name.len() + json_value_bytes(value)).sum()
}

/// The item's size as DynamoDB bills it.
pub fn item_bytes(item: &Item) -> usize {
    item.iter().map(|(name, value)| name.len() + value_bytes(value)).sum()
}

/// Write units for writing an item of `bytes` (the larger of before and after, for an
/// update): one per started KB, doubled inside a transaction.
pub fn write_units(bytes: usize, transactional: bool) -> usize {
    let units = bytes.div_ceil(1024).max(1);
    if transactional { 2 * units } else { units }
}

/// Read units for a strongly consistent read of `bytes` (a query: the bytes of every item
/// it returned): one per started 4 KB, doubled inside a transaction.
pub fn read_units(bytes: usize, transactional: bool) -> usize {
    let units = bytes.div_ceil(4096).max(1);
    if transactional { 2 * units } else { units }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_published_rules() {
        assert_eq!(number_bytes("0"), 1);
        assert_eq!(number_bytes("7"), 2);
        assert_eq!(number_bytes("1000000"), 2, "trailing zeros are trimmed");
        assert_eq!(number_bytes("123456"), 4);
        let item = Item::from([
            ("pk".to_owned(), AttributeValue::S("AGENT#a".into())),
            ("n".to_owned(), AttributeValue::N("12".into())),
            ("l".to_owned(), AttributeValue::L(vec![AttributeValue::Bool(true)])),
        ]);
        assert_eq!(item_bytes(&item), (2 + 7) + (1 + 2) + (1 + 3 + 2));
        let wire = serde_json::json!({"pk": {"S": "AGENT#a"}, "n": {"N": "12"}, "l": {"L": [{"BOOL": true}]}});
        assert_eq!(json_item_bytes(&wire), item_bytes(&item));
        assert_eq!((write_units(1024, false), write_units(1025, true)), (1, 4));
        assert_eq!((read_units(10, false), read_units(4097, true)), (1, 4));
    }
}
