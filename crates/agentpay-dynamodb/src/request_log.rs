//! An SDK interceptor that logs every DynamoDB request leaving the client: operation, the
//! items it writes and reads (table and key), whether it is a transaction. With
//! [`capacity`], the write and read units those requests cost by DynamoDB's rules, from the
//! items as stored. For tests and benches.

use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::Value;

use crate::Item;
use crate::sizing::{item_bytes, json_item_bytes, read_units, write_units};

/// One item a request touches: its table and key (DynamoDB JSON, as sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TouchedItem {
    /// The IAM action that touches it (`dynamodb:` left out): `PutItem`, `UpdateItem`,
    /// `ConditionCheckItem`, `DeleteItem`, `GetItem`, `BatchGetItem`, `Query`, `Scan`.
    pub action: String,
    pub table: String,
    pub key: Value,
    /// A put's size, from the item it sends (an update's or a check's is read afterwards).
    pub put_bytes: Option<usize>,
}

impl TouchedItem {
    /// The partition key's value (`pk` in the ledger, the key itself in the idempotency table).
    pub fn partition(&self) -> String {
        let first = self.key.get("pk").or_else(|| self.key.as_object().and_then(|o| o.values().next()));
        first.and_then(|v| v.get("S")).and_then(Value::as_str).unwrap_or_default().to_owned()
    }

    fn sdk_key(&self) -> Item {
        let mut key = Item::new();
        for (name, value) in self.key.as_object().into_iter().flatten() {
            if let Some(text) = value.get("S").and_then(Value::as_str) {
                key.insert(name.clone(), AttributeValue::S(text.to_owned()));
            }
        }
        key
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    pub operation: String,
    /// Items written (put, updated, or condition-checked: a check is billed as a write).
    pub writes: Vec<TouchedItem>,
    /// Items read by key (GetItem, BatchGetItem; all consistent in agentpay).
    pub reads: Vec<TouchedItem>,
    pub transactional: bool,
}

#[derive(Debug, Clone, Default)]
pub struct RequestLog(Arc<Mutex<Vec<LoggedRequest>>>);

impl RequestLog {
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.0.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn clear(&self) {
        if let Ok(mut requests) = self.0.lock() {
            requests.clear();
        }
    }

    /// The interceptor to add to a client's config.
    pub fn interceptor(&self) -> RequestLogInterceptor {
        RequestLogInterceptor(self.clone())
    }
}

#[derive(Debug)]
pub struct RequestLogInterceptor(RequestLog);

fn touched(action: &str, table: &Value, key: &Value) -> TouchedItem {
    TouchedItem {
        action: action.to_owned(),
        table: table.as_str().unwrap_or_default().to_owned(),
        key: key.clone(),
        put_bytes: None,
    }
}

fn put(table: &Value, item: &Value) -> TouchedItem {
    TouchedItem { put_bytes: Some(json_item_bytes(item)), ..touched("PutItem", table, &key_of_item(item)) }
}

/// The key attributes of a put item: `pk` and `sk`, or `idempotencyKey`.
fn key_of_item(item: &Value) -> Value {
    let mut key = serde_json::Map::new();
    for name in ["pk", "sk", "idempotencyKey"] {
        if let Some(value) = item.get(name) {
            key.insert(name.to_owned(), value.clone());
        }
    }
    Value::Object(key)
}

fn parse(operation: &str, body: &Value) -> (Vec<TouchedItem>, Vec<TouchedItem>, bool) {
    match operation {
        "TransactWriteItems" => {
            let writes = body["TransactItems"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|entry| {
                    if let Some(put) = entry.get("Put") {
                        return Some(self::put(&put["TableName"], &put["Item"]));
                    }
                    let (name, action) =
                        [("UpdateItem", "Update"), ("ConditionCheckItem", "ConditionCheck"), ("DeleteItem", "Delete")]
                            .into_iter()
                            .find_map(|(name, kind)| entry.get(kind).map(|action| (name, action)))?;
                    Some(touched(name, &action["TableName"], &action["Key"]))
                })
                .collect();
            (writes, vec![], true)
        }
        "PutItem" => (vec![put(&body["TableName"], &body["Item"])], vec![], false),
        "UpdateItem" | "DeleteItem" => (vec![touched(operation, &body["TableName"], &body["Key"])], vec![], false),
        "GetItem" => (vec![], vec![touched(operation, &body["TableName"], &body["Key"])], false),
        "Query" | "Scan" => (vec![], vec![touched(operation, &body["TableName"], &Value::Null)], false),
        "BatchGetItem" => {
            let reads = body["RequestItems"]
                .as_object()
                .into_iter()
                .flatten()
                .flat_map(|(table, wanted)| {
                    let table = Value::String(table.clone());
                    wanted["Keys"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .map(move |k| touched("BatchGetItem", &table, &k))
                })
                .collect();
            (vec![], reads, false)
        }
        _ => (vec![], vec![], false),
    }
}

impl Intercept for RequestLogInterceptor {
    fn name(&self) -> &'static str {
        "agentpay-request-log"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let request = context.request();
        let operation =
            request.headers().get("x-amz-target").and_then(|t| t.rsplit('.').next()).unwrap_or("?").to_owned();
        let body: Value = request.body().bytes().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
        let (writes, reads, transactional) = parse(&operation, &body);
        if let Ok(mut requests) = (self.0).0.lock() {
            requests.push(LoggedRequest { operation, writes, reads, transactional });
        }
        Ok(())
    }
}

/// Write and read units, on one partition and in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub write_units: usize,
    pub read_units: usize,
    pub hot_write_units: usize,
    pub hot_read_units: usize,
}

/// What `requests` cost by DynamoDB's rules: a put by the item it sent, an update, a condition
/// check or a read by the item as stored now (re-read through `client`, which should have no
/// interceptor). Updates are billed on the larger of the item before and after, and the items
/// agentpay updates only grow, so the stored size is that larger one — for a check of an item
/// that grew later, an overestimate. The `hot_` figures count only partition `hot_partition`.
pub async fn capacity(client: &Client, requests: &[LoggedRequest], hot_partition: &str) -> Capacity {
    let mut capacity = Capacity::default();
    for request in requests {
        for item in &request.writes {
            let bytes = match item.put_bytes {
                Some(bytes) => bytes,
                None => stored_bytes(client, item).await,
            };
            let units = write_units(bytes, request.transactional);
            capacity.write_units += units;
            if item.partition() == hot_partition {
                capacity.hot_write_units += units;
            }
        }
        for item in &request.reads {
            let units = read_units(stored_bytes(client, item).await, request.transactional);
            capacity.read_units += units;
            if item.partition() == hot_partition {
                capacity.hot_read_units += units;
            }
        }
    }
    capacity
}

async fn stored_bytes(client: &Client, item: &TouchedItem) -> usize {
    let stored = client.get_item().table_name(&item.table).set_key(Some(item.sdk_key())).send().await;
    stored.ok().and_then(|output| output.item).map_or(0, |stored| item_bytes(&stored))
}
