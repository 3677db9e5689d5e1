//! The production `Store`: DynamoDB through aws-sdk-dynamodb.
//!
//! Two tables, their key schema defined once in [`schema`] (tests create tables from it and
//! a test checks `template.yaml` against it):
//!
//! - idempotency: `idempotencyKey` (HASH); TTL on `ttl` (epoch seconds). DynamoDB deletes
//!   expired items late, so every read and every claim compares `expiresAt` itself.
//! - ledger: `pk` (HASH) + `sk` (RANGE). The agent's hot partition `AGENT#<id>` holds two
//!   small items: `STATE` (policy and its version, written only by policy edits) and `WINDOW`
//!   (the spend window, under 1 KB however busy the agent: see [`window_item`]); each payment
//!   writes it once (2 write units, in the reservation's transaction). Everything larger and
//!   colder — `RESERVATION#<id>`, `AUDIT#<millis>#<event id>` — lives in
//!   [`COLD_SHARDS`] partitions `AGENT#<id>#<shard>` (the shard a hash of the record's id), so
//!   it neither shares the hot partition's ~1,000 write units a second nor grows its reads.
//!
//! Each record is stored whole as JSON in `record`, with the attributes conditions need next
//! to it; attributes that later writes change (`status`, `result`, …) override the JSON on read.
//! Every write is one conditional request or one `TransactWriteItems`, and a failed condition
//! returns the blocking item (`ReturnValuesOnConditionCheckFailure = ALL_OLD`) at no read cost.

pub mod request_log;
pub mod sizing;
pub mod window_item;

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::builders::UpdateBuilder;
use aws_sdk_dynamodb::types::{
    AttributeValue, CancellationReason, ConditionCheck, KeysAndAttributes, Put, ReturnValuesOnConditionCheckFailure,
    TransactWriteItem, Update,
};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use serde::Serialize;
use serde::de::DeserializeOwned;

use agentpay_core::clock::Timestamp;
use agentpay_core::deviation::MAX_LOOKBACK_DAYS;
use agentpay_core::error::PaymentError;
use agentpay_core::money::AtomicAmount;
use agentpay_core::policy::{AgentLedger, SpendPolicy};
use agentpay_core::provider::{IssuedProof, IssuedProofs};
use agentpay_core::store::*;
use agentpay_core::window::{SpendWindow, WindowWrite};
use serde_json::Value;

pub mod schema {
    //! Table key schemas: the single definition tests and the template check against.

    /// A table's keys and TTL attribute.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct TableSchema {
        /// The template's logical id.
        pub logical_id: &'static str,
        pub hash_key: &'static str,
        pub range_key: Option<&'static str>,
        pub ttl_attribute: Option<&'static str>,
    }

    pub const IDEMPOTENCY: TableSchema = TableSchema {
        logical_id: "IdempotencyTable",
        hash_key: "idempotencyKey",
        range_key: None,
        ttl_attribute: Some("ttl"),
    };

    /// `ttl` is set on spend-history days only (they expire once no lookback reaches them).
    pub const LEDGER: TableSchema =
        TableSchema { logical_id: "LedgerTable", hash_key: "pk", range_key: Some("sk"), ttl_attribute: Some("ttl") };
}

type Item = HashMap<String, AttributeValue>;

#[derive(Debug, Clone)]
pub struct TableNames {
    pub idempotency: String,
    pub ledger: String,
}

pub struct DynamoStore {
    client: Client,
    tables: TableNames,
    /// Set once the registry of agents is known to list every agent (`list_agents_once`).
    agents_listed: std::sync::atomic::AtomicBool,
}

/// A DynamoDB error that retrying will not fix (missing table, bad request, access denied).
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB refused {operation} ({code}): {message}")]
pub struct DynamoRejected {
    operation: &'static str,
    code: String,
    message: String,
}

const RETRYABLE_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionInProgressException",
];

/// Throttling, 5xx, time-outs and I/O are `StoreUnavailable` (retried by the state machine);
/// anything else is a misconfiguration a person must fix. The SDK error stays the source.
fn classify<E>(operation: &'static str, error: SdkError<E, HttpResponse>) -> PaymentError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code = error.code().unwrap_or_default().to_owned();
    let transient = match &error {
        SdkError::ServiceError(service) => {
            RETRYABLE_CODES.contains(&code.as_str()) || service.raw().status().is_server_error()
        }
        // Time-outs, connection and I/O failures, unreadable responses.
        _ => true,
    };
    if transient {
        PaymentError::store(operation, error)
    } else {
        let message = error.message().unwrap_or_default().to_owned();
        PaymentError::StoreRejected { operation, source: Box::new(DynamoRejected { operation, code, message }) }
    }
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn json<T: Serialize>(value: &T) -> Result<AttributeValue, PaymentError> {
    serde_json::to_string(value)
        .map(AttributeValue::S)
        .map_err(|e| PaymentError::LedgerInconsistent(format!("cannot encode a record: {e}")))
}

fn text<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name).and_then(|v| v.as_s().ok()).map(String::as_str)
}

fn number(item: &Item, name: &str) -> Option<i64> {
    item.get(name).and_then(|v| v.as_n().ok()).and_then(|v| v.parse().ok())
}

/// The `record` JSON with the overriding attributes applied, as `T`.
fn decode<T: DeserializeOwned>(item: &Item, overrides: &[(&str, Override)]) -> Result<T, PaymentError> {
    let unreadable = |why: String| PaymentError::LedgerInconsistent(format!("unreadable item: {why}"));
    let mut record: Value = serde_json::from_str(text(item, "record").ok_or_else(|| unreadable("no record".into()))?)
        .map_err(|e| unreadable(e.to_string()))?;
    for (field, kind) in overrides {
        let Some(attribute) = item.get(*field) else { continue };
        let value = match (kind, attribute) {
            (Override::Text, AttributeValue::S(text)) => Value::String(text.clone()),
            (Override::Json, AttributeValue::S(text)) => {
                serde_json::from_str(text).map_err(|e| unreadable(e.to_string()))?
            }
            (Override::Timestamp, AttributeValue::N(millis)) => {
                let millis: i64 = millis.parse().map_err(|_| unreadable(format!("{field} is not a number")))?;
                serde_json::to_value(Timestamp::from_millis(millis)).map_err(|e| unreadable(e.to_string()))?
            }
            _ => return Err(unreadable(format!("attribute {field} has an unexpected type"))),
        };
        record[*field] = value;
    }
    serde_json::from_value(record).map_err(|e| unreadable(e.to_string()))
}

#[derive(Clone, Copy)]
enum Override {
    Text,
    Json,
    Timestamp,
}

const IDEMPOTENCY_OVERRIDES: &[(&str, Override)] = &[
    ("status", Override::Text),
    ("result", Override::Json),
    ("error", Override::Json),
    ("updatedAt", Override::Timestamp),
    ("expiresAt", Override::Timestamp),
    ("leaseExpiresAt", Override::Timestamp),
];
const RESERVATION_OVERRIDES: &[(&str, Override)] = &[
    ("status", Override::Text),
    ("paymentId", Override::Text),
    ("payer", Override::Text),
    ("settlement", Override::Json),
    ("authorization", Override::Json),
    ("updatedAt", Override::Timestamp),
];

/// The agent's hot partition: its policy and its window.
pub fn agent_pk(agent_id: &str) -> AttributeValue {
    s(format!("AGENT#{agent_id}"))
}

/// Partitions an agent's reservations and audit events are spread over. Each takes ~1,000
/// write units a second; a listing queries every one (ten queries: cold paths only).
pub const COLD_SHARDS: u32 = 10;

/// FNV-1a: stable across releases and platforms (the shard is part of a stored key), and
/// short enough to keep here rather than add a crate for.
fn shard_of(id: &str) -> u32 {
    let hash = id.bytes().fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193));
    hash % COLD_SHARDS
}

/// The cold partition of `agent_id` that a record with id `id` lives in.
pub fn cold_pk(agent_id: &str, id: &str) -> AttributeValue {
    cold_shard_pk(agent_id, shard_of(id))
}

fn cold_shard_pk(agent_id: &str, shard: u32) -> AttributeValue {
    s(format!("AGENT#{agent_id}#{shard}"))
}

fn reservation_sk(id: &str) -> AttributeValue {
    s(format!("RESERVATION#{id}"))
}

fn state_key(agent_id: &str) -> Item {
    Item::from([("pk".to_owned(), agent_pk(agent_id)), ("sk".to_owned(), s("STATE"))])
}

/// The agent's trip counters: written on rare events only (a flag, a person's decision), so
/// they may share the agent's partition.
fn trips_key(agent_id: &str) -> Item {
    Item::from([("pk".to_owned(), agent_pk(agent_id)), ("sk".to_owned(), s("TRIPS"))])
}

/// One (agent, scope) history per partition: a busy payee's days are read together and
/// written away from the agent's hot items.
fn history_pk(agent_id: &str, scope: &str) -> AttributeValue {
    s(format!("HIST#{agent_id}#{scope}"))
}

fn history_sk(day: u32) -> AttributeValue {
    s(format!("DAY#{day:06}"))
}

/// The registry of agents: one small item per agent with a policy (`AGENT#<id>`), written with
/// its first policy, so that a sweep pages through agents with a Query instead of scanning the
/// whole ledger. Written only when an agent is created: never hot. Beside them, sorted first,
/// `#LISTED` (every agent from before the registry has been entered) and `#SWEEP` (where the
/// reconciliation sweep goes on).
const AGENTS_PK: &str = "AGENTS";
const AGENTS_LISTED_SK: &str = "#LISTED";
const SWEEP_CURSOR_SK: &str = "#SWEEP";

fn registry_item(agent_id: &str) -> Item {
    Item::from([("pk".to_owned(), s(AGENTS_PK)), ("sk".to_owned(), agent_pk(agent_id))])
}

fn window_key(agent_id: &str) -> Item {
    Item::from([("pk".to_owned(), agent_pk(agent_id)), ("sk".to_owned(), s(window_item::WINDOW_SK))])
}

/// The agent's shadow window: the same item shape as its window, beside it.
const SHADOW_WINDOW_SK: &str = "SHADOW_WINDOW";

fn shadow_window_key(agent_id: &str) -> Item {
    Item::from([("pk".to_owned(), agent_pk(agent_id)), ("sk".to_owned(), s(SHADOW_WINDOW_SK))])
}

fn audit_sk(event: &AuditEvent) -> AttributeValue {
    s(format!("AUDIT#{:013}#{}", event.at.millis(), event.event_id))
}

fn idempotency_item(record: &IdempotencyRecord) -> Result<Item, PaymentError> {
    let mut item = Item::from([
        ("idempotencyKey".to_owned(), s(&record.key)),
        ("status".to_owned(), s(record.status.as_str())),
        ("fingerprint".to_owned(), s(&record.fingerprint)),
        ("executionId".to_owned(), s(&record.execution_id)),
        ("claimId".to_owned(), s(&record.claim_id)),
        ("attempt".to_owned(), n(record.attempt)),
        ("leaseExpiresAt".to_owned(), n(record.lease_expires_at.millis())),
        ("expiresAt".to_owned(), n(record.expires_at.millis())),
        ("updatedAt".to_owned(), n(record.updated_at.millis())),
        ("record".to_owned(), json(record)?),
    ]);
    // DynamoDB's TTL deletes only finished records: an unfinished claim is never forgotten.
    if record.status != IdempotencyStatus::InProgress {
        item.insert("ttl".into(), n(record.expires_at.seconds()));
    }
    if let Some(result) = &record.result {
        item.insert("result".into(), json(result)?);
    }
    if let Some(error) = &record.error {
        item.insert("error".into(), json(error)?);
    }
    Ok(item)
}

fn audit_put(table: &str, event: &AuditEvent) -> Result<TransactWriteItem, PaymentError> {
    let put = Put::builder()
        .table_name(table)
        .item("pk", cold_pk(&event.agent_id, &event.event_id))
        .item("sk", audit_sk(event))
        .item("kind", s(format!("{:?}", event.kind).to_uppercase()))
        .item("record", json(event)?)
        .condition_expression("attribute_not_exists(pk)")
        .build()
        .map_err(build_error)?;
    Ok(TransactWriteItem::builder().put(put).build())
}

fn build_error(error: aws_sdk_dynamodb::error::BuildError) -> PaymentError {
    PaymentError::LedgerInconsistent(format!("cannot build a DynamoDB request: {error}"))
}

/// What a cancelled transaction says about each of its items.
enum Reason<'a> {
    Passed,
    ConditionFailed(Option<&'a Item>),
    /// Another transaction touched the item at the same moment: retry.
    Conflict,
}

fn reasons(reasons: &[CancellationReason]) -> Vec<Reason<'_>> {
    reasons
        .iter()
        .map(|r| match r.code() {
            Some("ConditionalCheckFailed") => Reason::ConditionFailed(r.item()),
            Some("TransactionConflict") => Reason::Conflict,
            _ => Reason::Passed,
        })
        .collect()
}

/// The outcome of a transaction: committed, or cancelled with per-item reasons.
enum TxOutcome {
    Committed,
    Cancelled(Vec<CancellationReason>),
}

impl DynamoStore {
    pub fn new(client: Client, tables: TableNames) -> Self {
        Self { client, tables, agents_listed: std::sync::atomic::AtomicBool::new(false) }
    }

    /// Builds the client from the standard AWS configuration chain (region, credentials,
    /// `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_DYNAMODB`).
    pub async fn from_env(tables: TableNames) -> Self {
        Self::from_sdk_config(&aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await, tables)
    }

    /// From an AWS configuration loaded once by the caller (a Lambda's cold start).
    pub fn from_sdk_config(config: &aws_config::SdkConfig, tables: TableNames) -> Self {
        Self::new(Client::new(config), tables)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn tables(&self) -> &TableNames {
        &self.tables
    }

    async fn transact(
        &self,
        operation: &'static str,
        items: Vec<TransactWriteItem>,
    ) -> Result<TxOutcome, PaymentError> {
        match self.client.transact_write_items().set_transact_items(Some(items)).send().await {
            Ok(_) => Ok(TxOutcome::Committed),
            Err(error) => {
                if let Some(aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(cancelled)) =
                    error.as_service_error()
                {
                    return Ok(TxOutcome::Cancelled(cancelled.cancellation_reasons().to_vec()));
                }
                Err(classify(operation, error))
            }
        }
    }

    async fn get(&self, operation: &'static str, table: &str, key: Item) -> Result<Option<Item>, PaymentError> {
        let output = self
            .client
            .get_item()
            .table_name(table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(operation, e))?;
        Ok(output.item)
    }

    /// One item of the registry of agents, read with a Query (the rights a sweep already has).
    async fn registry_entry(&self, operation: &'static str, sk: &str) -> Result<Option<Item>, PaymentError> {
        let output = self
            .client
            .query()
            .table_name(&self.tables.ledger)
            .key_condition_expression("pk = :pk AND sk = :sk")
            .expression_attribute_values(":pk", s(AGENTS_PK))
            .expression_attribute_values(":sk", s(sk))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(operation, e))?;
        Ok(output.items.unwrap_or_default().into_iter().next())
    }

    /// Enters in the registry every agent that has a policy but no entry (agents created before
    /// the registry existed), once per table: a Scan of the agents' STATE items, the way agents
    /// were listed before, then `#LISTED`. Later agents enter with their first policy.
    async fn list_agents_once(&self) -> Result<(), PaymentError> {
        use std::sync::atomic::Ordering;
        if self.agents_listed.load(Ordering::Acquire) {
            return Ok(());
        }
        if self.registry_entry("read the registry of agents", AGENTS_LISTED_SK).await?.is_none() {
            let mut start: Option<Item> = None;
            loop {
                let output = self
                    .client
                    .scan()
                    .table_name(&self.tables.ledger)
                    .filter_expression("sk = :state")
                    .expression_attribute_values(":state", s("STATE"))
                    .projection_expression("pk")
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(|e| classify("find agents from before the registry", e))?;
                for item in output.items.unwrap_or_default() {
                    if let Some(agent) = text(&item, "pk").and_then(|pk| pk.strip_prefix("AGENT#")) {
                        self.put_registry_item("enter an agent in the registry", registry_item(agent)).await?;
                    }
                }
                match output.last_evaluated_key {
                    Some(key) if !key.is_empty() => start = Some(key),
                    _ => break,
                }
            }
            let listed = Item::from([("pk".to_owned(), s(AGENTS_PK)), ("sk".to_owned(), s(AGENTS_LISTED_SK))]);
            self.put_registry_item("mark the registry of agents complete", listed).await?;
        }
        self.agents_listed.store(true, Ordering::Release);
        Ok(())
    }

    async fn put_registry_item(&self, operation: &'static str, item: Item) -> Result<(), PaymentError> {
        self.client
            .put_item()
            .table_name(&self.tables.ledger)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| classify(operation, e))?;
        Ok(())
    }

    /// Every item of the agent's cold partitions whose sort key starts with `prefix`.
    async fn query_prefix(
        &self,
        operation: &'static str,
        agent_id: &str,
        prefix: &str,
    ) -> Result<Vec<Item>, PaymentError> {
        let mut items = Vec::new();
        for shard in 0..COLD_SHARDS {
            let mut start: Option<Item> = None;
            loop {
                let output = self
                    .client
                    .query()
                    .table_name(&self.tables.ledger)
                    .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                    .expression_attribute_values(":pk", cold_shard_pk(agent_id, shard))
                    .expression_attribute_values(":prefix", s(prefix))
                    .consistent_read(true)
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(|e| classify(operation, e))?;
                items.extend(output.items.unwrap_or_default());
                match output.last_evaluated_key {
                    Some(key) if !key.is_empty() => start = Some(key),
                    _ => break,
                }
            }
        }
        Ok(items)
    }

    /// Consistent reads of `keys` (table, key) in one `BatchGetItem`, in the order asked.
    async fn batch_get(
        &self,
        operation: &'static str,
        keys: Vec<(&str, Item)>,
    ) -> Result<Vec<Option<Item>>, PaymentError> {
        let mut by_table: HashMap<String, Vec<Item>> = HashMap::new();
        for (table, key) in &keys {
            by_table.entry((*table).to_owned()).or_default().push(key.clone());
        }
        let mut pending = HashMap::new();
        for (table, table_keys) in by_table {
            let wanted = KeysAndAttributes::builder()
                .set_keys(Some(table_keys))
                .consistent_read(true)
                .build()
                .map_err(build_error)?;
            pending.insert(table, wanted);
        }
        let mut found: Vec<(String, Item)> = Vec::new();
        // DynamoDB may leave some keys unprocessed under throttling: ask again, bounded.
        for _ in 0..4 {
            let output = self
                .client
                .batch_get_item()
                .set_request_items(Some(pending))
                .send()
                .await
                .map_err(|e| classify(operation, e))?;
            for (table, items) in output.responses.unwrap_or_default() {
                found.extend(items.into_iter().map(|item| (table.clone(), item)));
            }
            pending = output.unprocessed_keys.unwrap_or_default();
            if pending.is_empty() {
                let matches = |key: &Item, item: &Item| key.iter().all(|(name, value)| item.get(name) == Some(value));
                return Ok(keys
                    .iter()
                    .map(|(table, key)| {
                        found.iter().find(|(t, item)| t == table && matches(key, item)).map(|(_, item)| item.clone())
                    })
                    .collect());
            }
        }
        Err(PaymentError::store(operation, "DynamoDB left keys unprocessed four times (throttled)"))
    }

    /// The agent's policy item and window item, as stored.
    async fn agent_items(&self, agent_id: &str) -> Result<(Option<Item>, Option<Item>), PaymentError> {
        let ledger = self.tables.ledger.as_str();
        let mut items = self
            .batch_get("read agent ledger", vec![(ledger, state_key(agent_id)), (ledger, window_key(agent_id))])
            .await?
            .into_iter();
        Ok((items.next().flatten(), items.next().flatten()))
    }

    fn reservation_key(&self, agent_id: &str, id: &str) -> Item {
        Item::from([("pk".to_owned(), cold_pk(agent_id, id)), ("sk".to_owned(), reservation_sk(id))])
    }

    fn idempotency_key_item(key: &str) -> Item {
        Item::from([("idempotencyKey".to_owned(), s(key))])
    }

    /// The condition that `fence` still holds the key's record.
    fn fence_condition(fence: &ClaimFence) -> (&'static str, [(&'static str, AttributeValue); 4]) {
        (
            "#status = :in_progress AND claimId = :claim AND attempt = :attempt AND executionId = :execution",
            [
                (":in_progress", s(IdempotencyStatus::InProgress.as_str())),
                (":claim", s(&fence.claim_id)),
                (":attempt", n(fence.attempt)),
                (":execution", s(&fence.execution_id)),
            ],
        )
    }

    /// Moves the record `fence` holds out of IN_PROGRESS (with `extra` set), conditioned on
    /// the fence; a refusal returns the record that blocked it.
    fn fenced_idempotency_close(
        &self,
        fence: &ClaimFence,
        status: IdempotencyStatus,
        extra: (&str, AttributeValue),
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<TransactWriteItem, PaymentError> {
        let update = self
            .fenced_key_update(
                fence,
                "SET #status = :status, #extra = :extra, updatedAt = :now, expiresAt = :expires, #ttl = :ttl",
            )
            .expression_attribute_names("#extra", extra.0)
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":status", s(status.as_str()))
            .expression_attribute_values(":extra", extra.1)
            .expression_attribute_values(":now", n(now.millis()))
            .expression_attribute_values(":expires", n(expires_at.millis()))
            .expression_attribute_values(":ttl", n(expires_at.seconds()));
        Ok(TransactWriteItem::builder().update(update.build().map_err(build_error)?).build())
    }

    /// Sets the claim's lease to `until`, while `fence` holds it: ended at once after an unknown
    /// outcome, extended over a wait for a person. A refusal returns the record that blocked it.
    fn fenced_lease(
        &self,
        fence: &ClaimFence,
        until: Timestamp,
        now: Timestamp,
    ) -> Result<TransactWriteItem, PaymentError> {
        let update = self
            .fenced_key_update(fence, "SET leaseExpiresAt = :until, updatedAt = :now")
            .expression_attribute_values(":until", n(until.millis()))
            .expression_attribute_values(":now", n(now.millis()));
        Ok(TransactWriteItem::builder().update(update.build().map_err(build_error)?).build())
    }

    /// An update of the key's record conditioned on `fence` still holding it (the record that
    /// blocked it comes back on a refusal); callers add the expression's own values.
    fn fenced_key_update(&self, fence: &ClaimFence, expression: &str) -> UpdateBuilder {
        let (condition, values) = Self::fence_condition(fence);
        let mut update = Update::builder()
            .table_name(&self.tables.idempotency)
            .set_key(Some(Self::idempotency_key_item(&fence.key)))
            .update_expression(expression)
            .condition_expression(condition)
            .expression_attribute_names("#status", "status")
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        for (name, value) in values {
            update = update.expression_attribute_values(name, value);
        }
        update
    }

    /// A transaction item that only checks the fence (reserving writes no key field).
    fn fence_check(&self, fence: &ClaimFence) -> Result<TransactWriteItem, PaymentError> {
        let (condition, values) = Self::fence_condition(fence);
        let mut check = ConditionCheck::builder()
            .table_name(&self.tables.idempotency)
            .set_key(Some(Self::idempotency_key_item(&fence.key)))
            .condition_expression(condition)
            .expression_attribute_names("#status", "status")
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        for (name, value) in values {
            check = check.expression_attribute_values(name, value);
        }
        Ok(TransactWriteItem::builder().condition_check(check.build().map_err(build_error)?).build())
    }

    /// The authorization's additions to its history days: unconditional adds, so concurrent
    /// payments to one payee never fail each other's condition (only a transaction conflict,
    /// retried). The day expires once no lookback reaches it.
    fn history_adds(&self, agent_id: &str, entry: &HistoryEntry) -> Result<Vec<TransactWriteItem>, PaymentError> {
        let expires = (i64::from(entry.day) + i64::from(MAX_LOOKBACK_DAYS) + 1) * 86_400;
        entry
            .scopes
            .iter()
            .map(|scope| {
                let update = Update::builder()
                    .table_name(&self.tables.ledger)
                    .key("pk", history_pk(agent_id, scope))
                    .key("sk", history_sk(entry.day))
                    .update_expression("ADD #total :amount, payments :one SET #ttl = :ttl")
                    .expression_attribute_names("#total", "total")
                    .expression_attribute_names("#ttl", "ttl")
                    .expression_attribute_values(":amount", n(entry.amount.get()))
                    .expression_attribute_values(":one", n(1))
                    .expression_attribute_values(":ttl", n(expires))
                    .build()
                    .map_err(build_error)?;
                Ok(TransactWriteItem::builder().update(update).build())
            })
            .collect()
    }

    fn reservation_move(
        &self,
        agent_id: &str,
        id: &str,
        from: ReservationStatus,
        to: ReservationStatus,
        // What a proof adds, when the move records one.
        payment_id: Option<PaidFacts<'_>>,
        now: Timestamp,
    ) -> Result<TransactWriteItem, PaymentError> {
        let mut builder = Update::builder()
            .table_name(&self.tables.ledger)
            .set_key(Some(self.reservation_key(agent_id, id)))
            .condition_expression("#status = :from")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":from", s(from.as_str()))
            .expression_attribute_values(":to", s(to.as_str()))
            .expression_attribute_values(":now", n(now.millis()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        builder = match payment_id {
            Some(paid) => {
                let mut set = vec!["#status = :to", "updatedAt = :now", "paymentId = :payment"];
                builder = builder.expression_attribute_values(":payment", s(paid.payment_id));
                if let Some(payer) = paid.payer {
                    set.push("payer = :payer");
                    builder = builder.expression_attribute_values(":payer", s(payer));
                }
                if let Some(authorization) = paid.authorization {
                    set.push("#authorization = :authorization");
                    builder = builder
                        .expression_attribute_names("#authorization", "authorization")
                        .expression_attribute_values(":authorization", json(authorization)?);
                }
                builder.update_expression(format!("SET {}", set.join(", ")))
            }
            None => builder.update_expression("SET #status = :to, updatedAt = :now"),
        };
        Ok(TransactWriteItem::builder().update(builder.build().map_err(build_error)?).build())
    }
}

/// What RecordLedger's move writes besides the status.
struct PaidFacts<'a> {
    payment_id: &'a str,
    payer: Option<&'a str>,
    authorization: Option<&'a SignedAuthorization>,
}

fn decode_reservation(item: &Item) -> Result<Reservation, PaymentError> {
    decode(item, RESERVATION_OVERRIDES)
}

fn decode_idempotency(item: &Item) -> Result<IdempotencyRecord, PaymentError> {
    decode(item, IDEMPOTENCY_OVERRIDES)
}

/// Who holds the key, from the item a fenced write was refused by.
fn holder_of(item: Option<&Item>) -> Result<String, PaymentError> {
    Ok(match item.map(decode_idempotency).transpose()? {
        Some(record) => record.holder(),
        None => "gone (no live record)".to_owned(),
    })
}

/// The agent as stored: the policy item and the window item. A policy item written before the
/// window had its own item carries the window as minute buckets (`window`, JSON): read into
/// the rings, and written as the window item by the next reservation or policy edit.
fn decode_ledger(agent_id: &str, state: Option<&Item>, window: Option<&Item>) -> Result<AgentLedger, PaymentError> {
    let unreadable = |name: &str, e: serde_json::Error| {
        PaymentError::LedgerInconsistent(format!("agent {agent_id}: unreadable {name}: {e}"))
    };
    let version = state.and_then(|item| number(item, "version")).and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
    let window = match (window, state.and_then(|item| text(item, "window"))) {
        (Some(item), _) => window_item::decode(agent_id, item)?,
        (None, Some(legacy)) => {
            let buckets: Vec<LegacyBucket> = serde_json::from_str(legacy).map_err(|e| unreadable("window", e))?;
            legacy_window(agent_id, &buckets, version)?
        }
        (None, None) => SpendWindow::default(),
    };
    Ok(AgentLedger {
        policy: state
            .and_then(|item| text(item, "policy"))
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| unreadable("policy", e))?,
        window,
        version,
    })
}

/// A minute bucket as the policy item kept it before the window had its own item.
#[derive(serde::Deserialize)]
struct LegacyBucket {
    minute: i64,
    amount: AtomicAmount,
    count: u32,
}

fn legacy_window(agent_id: &str, buckets: &[LegacyBucket], version: u64) -> Result<SpendWindow, PaymentError> {
    let Some(latest) = buckets.iter().map(|b| b.minute).max() else {
        return Ok(SpendWindow::new(version));
    };
    let at = agentpay_core::clock::Timestamp::from_millis(latest.saturating_mul(60_000));
    let triples: Vec<_> = buckets.iter().map(|b| (b.minute, b.amount, b.count)).collect();
    let window = SpendWindow::from_minute_buckets(&triples, at).ok_or_else(|| {
        PaymentError::LedgerInconsistent(format!("agent {agent_id}: the stored window's sums overflow"))
    })?;
    // Sequence 0: the first write creates the window item, conditioned on its absence.
    Ok(SpendWindow { policy_version: version, seq: 0, ..window })
}

#[async_trait]
impl Store for DynamoStore {
    /// DynamoDB acknowledges a write only once it is durable.
    async fn durable(&self) -> Result<(), PaymentError> {
        Ok(())
    }
    async fn insert_idempotency(&self, record: &IdempotencyRecord) -> Result<Option<IdempotencyRecord>, PaymentError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.tables.idempotency)
            .set_item(Some(idempotency_item(record)?))
            // Absent, or finished and expired but not yet deleted by TTL.
            .condition_expression(
                "attribute_not_exists(idempotencyKey) OR (expiresAt <= :now AND #status <> :in_progress)",
            )
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":now", n(record.created_at.millis()))
            .expression_attribute_values(":in_progress", s(IdempotencyStatus::InProgress.as_str()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(None),
            Err(error) => match error.as_service_error() {
                Some(aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(failed)) => {
                    let item = failed.item().ok_or_else(|| {
                        PaymentError::LedgerInconsistent("claim refused without returning the blocking item".into())
                    })?;
                    decode_idempotency(item).map(Some)
                }
                _ => Err(classify("claim idempotency key", error)),
            },
        }
    }

    async fn replace_idempotency(
        &self,
        expected: &IdempotencyRecord,
        record: &IdempotencyRecord,
    ) -> Result<Option<Option<IdempotencyRecord>>, PaymentError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.tables.idempotency)
            .set_item(Some(idempotency_item(record)?))
            .condition_expression("#status = :status AND executionId = :execution AND attempt = :attempt")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":status", s(expected.status.as_str()))
            .expression_attribute_values(":execution", s(&expected.execution_id))
            .expression_attribute_values(":attempt", n(expected.attempt))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(None),
            Err(error) => match error.as_service_error() {
                Some(aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(failed)) => {
                    Ok(Some(failed.item().map(decode_idempotency).transpose()?))
                }
                _ => Err(classify("reclaim idempotency key", error)),
            },
        }
    }

    async fn idempotency(&self, key: &str, now: Timestamp) -> Result<Option<IdempotencyRecord>, PaymentError> {
        let item = self
            .get("read idempotency key", &self.tables.idempotency, Item::from([("idempotencyKey".to_owned(), s(key))]))
            .await?;
        let record = item.as_ref().map(decode_idempotency).transpose()?;
        Ok(record.filter(|r| !r.is_expired(now)))
    }

    async fn agent_ledger(&self, agent_id: &str) -> Result<AgentLedger, PaymentError> {
        let (state, window) = self.agent_items(agent_id).await?;
        decode_ledger(agent_id, state.as_ref(), window.as_ref())
    }

    async fn agent_and_key(
        &self,
        agent_id: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<(AgentLedger, Option<IdempotencyRecord>), PaymentError> {
        let ledger = self.tables.ledger.as_str();
        let mut items = self
            .batch_get(
                "read agent and key",
                vec![
                    (ledger, state_key(agent_id)),
                    (ledger, window_key(agent_id)),
                    (self.tables.idempotency.as_str(), Self::idempotency_key_item(key)),
                ],
            )
            .await?
            .into_iter();
        let (state, window, key_item) = (items.next().flatten(), items.next().flatten(), items.next().flatten());
        let ledger = decode_ledger(agent_id, state.as_ref(), window.as_ref())?;
        let record = key_item.as_ref().map(decode_idempotency).transpose()?;
        Ok((ledger, record.filter(|r| !r.is_expired(now))))
    }

    async fn change_policy(&self, agent_id: &str, change: &PolicyChange) -> Result<PolicyEdited, PaymentError> {
        // Policy and window's policy version move together, conditioned on what was read;
        // edits are rare, so a lost race is simply read and tried again (unless the change
        // was decided on a version, which it then reports moved).
        for _ in 0..8 {
            let (state, window) = self.agent_items(agent_id).await?;
            let ledger = decode_ledger(agent_id, state.as_ref(), window.as_ref())?;
            if let Some(expected) = change.expected_version
                && expected != ledger.version
            {
                return Ok(PolicyEdited::VersionMoved { current: ledger.version });
            }
            let Some(policy) = change.edit.apply(ledger.policy.as_ref()) else {
                return Ok(PolicyEdited::NoPolicy);
            };
            let version = ledger.version + 1;
            let state_put = Put::builder()
                .table_name(&self.tables.ledger)
                .set_item(Some(state_key(agent_id)))
                .item("policy", json(&policy)?)
                .item("version", n(version));
            let state_put = match state {
                None => state_put.condition_expression("attribute_not_exists(pk)"),
                Some(_) => state_put
                    .condition_expression("version = :read")
                    .expression_attribute_values(":read", n(ledger.version)),
            };
            let window_write = match window {
                Some(_) => {
                    let update = Update::builder()
                        .table_name(&self.tables.ledger)
                        .set_key(Some(window_key(agent_id)))
                        .update_expression("SET policyVersion = :version, seq = seq + :one")
                        .condition_expression("attribute_exists(pk)")
                        .expression_attribute_values(":version", n(version))
                        .expression_attribute_values(":one", n(1))
                        .build()
                        .map_err(build_error)?;
                    TransactWriteItem::builder().update(update).build()
                }
                // First policy, or a policy item from before the window had its own item.
                None => {
                    let created = SpendWindow { policy_version: version, seq: 1, ..ledger.window };
                    let put = Put::builder()
                        .table_name(&self.tables.ledger)
                        .set_item(Some(window_item::item(agent_pk(agent_id), &created)))
                        .condition_expression("attribute_not_exists(pk)")
                        .build()
                        .map_err(build_error)?;
                    TransactWriteItem::builder().put(put).build()
                }
            };
            let event = PolicyAuditEvent::of(agent_id, version, change, &policy);
            let history_put = Put::builder()
                .table_name(&self.tables.ledger)
                .item("pk", cold_pk(agent_id, POLICY_HISTORY))
                .item("sk", s(format!("{POLICY_HISTORY}#{version:020}")))
                .item("record", json(&event)?)
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(build_error)?;
            let mut items = vec![
                TransactWriteItem::builder().put(state_put.build().map_err(build_error)?).build(),
                window_write,
                TransactWriteItem::builder().put(history_put).build(),
            ];
            if state.is_none() {
                // A new agent enters the registry with its first policy.
                let registered = Put::builder()
                    .table_name(&self.tables.ledger)
                    .set_item(Some(registry_item(agent_id)))
                    .build()
                    .map_err(build_error)?;
                items.push(TransactWriteItem::builder().put(registered).build());
            }
            if let TxOutcome::Committed = self.transact("set policy", items).await? {
                return Ok(PolicyEdited::Applied { version });
            }
        }
        Err(PaymentError::LedgerConflict { agent: agent_id.to_owned(), attempts: 8 })
    }

    async fn policy_history(&self, agent_id: &str) -> Result<Vec<PolicyAuditEvent>, PaymentError> {
        let items = self.query_prefix("read policy history", agent_id, POLICY_HISTORY).await?;
        let mut history =
            items.iter().map(|item| decode::<PolicyAuditEvent>(item, &[])).collect::<Result<Vec<_>, _>>()?;
        history.sort_by_key(|event| event.version);
        Ok(history)
    }

    async fn policy(&self, agent_id: &str) -> Result<Option<SpendPolicy>, PaymentError> {
        let item = self.get("read agent policy", &self.tables.ledger, state_key(agent_id)).await?;
        Ok(decode_ledger(agent_id, item.as_ref(), None)?.policy)
    }

    async fn policy_and_key(
        &self,
        agent_id: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<(Option<SpendPolicy>, Option<IdempotencyRecord>), PaymentError> {
        let mut items = self
            .batch_get(
                "read agent policy and key",
                vec![
                    (self.tables.ledger.as_str(), state_key(agent_id)),
                    (self.tables.idempotency.as_str(), Self::idempotency_key_item(key)),
                ],
            )
            .await?
            .into_iter();
        let (state, key_item) = (items.next().flatten(), items.next().flatten());
        let policy = decode_ledger(agent_id, state.as_ref(), None)?.policy;
        let record = key_item.as_ref().map(decode_idempotency).transpose()?;
        Ok((policy, record.filter(|r| !r.is_expired(now))))
    }

    async fn spend_history(
        &self,
        agent_id: &str,
        scope: &str,
        first_day: u32,
        last_day: u32,
    ) -> Result<SpendHistory, PaymentError> {
        let mut sum = SpendHistory::default();
        let overflow = || PaymentError::LedgerInconsistent(format!("agent {agent_id}: the {scope} history overflows"));
        let mut start: Option<Item> = None;
        loop {
            let output = self
                .client
                .query()
                .table_name(&self.tables.ledger)
                .key_condition_expression("pk = :pk AND sk BETWEEN :first AND :last")
                .expression_attribute_values(":pk", history_pk(agent_id, scope))
                .expression_attribute_values(":first", history_sk(first_day))
                .expression_attribute_values(":last", history_sk(last_day))
                .projection_expression("#total, payments")
                .expression_attribute_names("#total", "total")
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify("read spend history", e))?;
            for item in output.items.unwrap_or_default() {
                let total = number(&item, "total").and_then(AtomicAmount::from_i64).ok_or_else(overflow)?;
                let payments = number(&item, "payments").and_then(|p| u64::try_from(p).ok()).ok_or_else(overflow)?;
                sum = SpendHistory {
                    total: sum.total.checked_add(total).ok_or_else(overflow)?,
                    count: sum.count.checked_add(payments).ok_or_else(overflow)?,
                };
            }
            match output.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(sum),
            }
        }
    }

    async fn trip_counters(&self, agent_id: &str) -> Result<TripCounters, PaymentError> {
        let item = self.get("read trip counters", &self.tables.ledger, trips_key(agent_id)).await?;
        Ok(item.as_ref().map(|i| decode(i, &[])).transpose()?.unwrap_or_default())
    }

    async fn put_trip_counters(&self, agent_id: &str, counters: &TripCounters) -> Result<bool, PaymentError> {
        let mut put = self
            .client
            .put_item()
            .table_name(&self.tables.ledger)
            .set_item(Some(trips_key(agent_id)))
            .item("record", json(counters)?)
            .item("version", n(counters.version));
        put = match counters.version {
            0 | 1 => put.condition_expression("attribute_not_exists(pk)"),
            version => put.condition_expression("version = :read").expression_attribute_values(":read", n(version - 1)),
        };
        match put.send().await {
            Ok(_) => Ok(true),
            Err(error) => match error.as_service_error() {
                Some(aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(_)) => {
                    Ok(false)
                }
                _ => Err(classify("write trip counters", error)),
            },
        }
    }

    async fn agents_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, PaymentError> {
        self.list_agents_once().await?;
        let after = format!("AGENT#{}", after.unwrap_or_default());
        let mut agents = Vec::new();
        let mut start: Option<Item> = None;
        while agents.len() < limit {
            let output = self
                .client
                .query()
                .table_name(&self.tables.ledger)
                .key_condition_expression("pk = :pk AND sk > :after")
                .expression_attribute_values(":pk", s(AGENTS_PK))
                .expression_attribute_values(":after", s(after.as_str()))
                .limit(i32::try_from(limit - agents.len()).unwrap_or(i32::MAX))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify("list agents", e))?;
            for item in output.items.unwrap_or_default() {
                if let Some(agent) = text(&item, "sk").and_then(|sk| sk.strip_prefix("AGENT#")) {
                    agents.push(agent.to_owned());
                }
            }
            match output.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        agents.truncate(limit);
        Ok(agents)
    }

    async fn sweep_cursor(&self) -> Result<Option<String>, PaymentError> {
        let item = self.registry_entry("read the sweep's cursor", SWEEP_CURSOR_SK).await?;
        Ok(item.as_ref().and_then(|item| text(item, "lastReconciled")).map(str::to_owned))
    }

    async fn set_sweep_cursor(&self, last_reconciled: &str) -> Result<(), PaymentError> {
        let cursor = Item::from([
            ("pk".to_owned(), s(AGENTS_PK)),
            ("sk".to_owned(), s(SWEEP_CURSOR_SK)),
            ("lastReconciled".to_owned(), s(last_reconciled)),
        ]);
        self.put_registry_item("record the sweep's cursor", cursor).await
    }

    async fn reserve(
        &self,
        write: &WindowWrite,
        reservation: &Reservation,
        fence: &ClaimFence,
    ) -> Result<ReserveOutcome, PaymentError> {
        let agent_id = &reservation.agent_id;
        let window_write = window_item::transact_item(&self.tables.ledger, window_key(agent_id), write)?;
        let items = vec![window_write, self.new_reservation(reservation)?, self.fence_check(fence)?];
        match self.transact("reserve", items).await? {
            TxOutcome::Committed => Ok(ReserveOutcome::Reserved),
            TxOutcome::Cancelled(cancelled) => {
                let reasons = reasons(&cancelled);
                if let Some(Reason::ConditionFailed(Some(item))) = reasons.get(1) {
                    return Ok(ReserveOutcome::AlreadyExists(Box::new(decode_reservation(item)?)));
                }
                if let Some(Reason::ConditionFailed(item)) = reasons.get(2) {
                    return Ok(ReserveOutcome::Fenced(holder_of(*item)?));
                }
                // The window's conditions failed (it comes back as stored), or another
                // transaction held one of the items at that moment (read again).
                let stored = match reasons.first() {
                    Some(Reason::ConditionFailed(Some(item))) => Some(Box::new(window_item::decode(agent_id, item)?)),
                    _ => None,
                };
                Ok(ReserveOutcome::WindowMoved(stored))
            }
        }
    }

    async fn shadow_window(&self, agent_id: &str) -> Result<SpendWindow, PaymentError> {
        let item = self.get("read shadow window", &self.tables.ledger, shadow_window_key(agent_id)).await?;
        item.map_or_else(|| Ok(SpendWindow::default()), |item| window_item::decode(agent_id, &item))
    }

    async fn record_shadow(&self, commit: &ShadowCommit) -> Result<ReserveOutcome, PaymentError> {
        let record = &commit.record;
        let agent_id = &record.agent_id;
        // Fixed positions (0: the record, 1: the key, 3: the window) name what failed.
        let mut items = vec![
            self.new_reservation(record)?,
            self.key_completion(&commit.fence, &commit.result, commit.now, commit.expires_at)?,
            audit_put(&self.tables.ledger, &commit.audit)?,
        ];
        if let Some(write) = &commit.window {
            items.push(window_item::transact_item(&self.tables.ledger, shadow_window_key(agent_id), write)?);
        }
        if let Some(history) = &commit.history {
            items.extend(self.history_adds(agent_id, history)?);
        }
        match self.transact("record shadow decision", items).await? {
            TxOutcome::Committed => Ok(ReserveOutcome::Reserved),
            TxOutcome::Cancelled(cancelled) => {
                let reasons = reasons(&cancelled);
                if let Some(Reason::ConditionFailed(Some(item))) = reasons.first() {
                    return Ok(ReserveOutcome::AlreadyExists(Box::new(decode_reservation(item)?)));
                }
                if let Some(Reason::ConditionFailed(item)) = reasons.get(1) {
                    return Ok(ReserveOutcome::Fenced(holder_of(*item)?));
                }
                let stored = match reasons.get(3) {
                    Some(Reason::ConditionFailed(Some(item))) => Some(Box::new(window_item::decode(agent_id, item)?)),
                    _ => None,
                };
                Ok(ReserveOutcome::WindowMoved(stored))
            }
        }
    }

    async fn reservation(&self, agent_id: &str, id: &str) -> Result<Option<Reservation>, PaymentError> {
        let item = self.get("read reservation", &self.tables.ledger, self.reservation_key(agent_id, id)).await?;
        item.as_ref().map(decode_reservation).transpose()
    }

    async fn reservations(&self, agent_id: &str) -> Result<Vec<Reservation>, PaymentError> {
        let items = self.query_prefix("list reservations", agent_id, "RESERVATION#").await?;
        let mut reservations = items.iter().map(decode_reservation).collect::<Result<Vec<_>, _>>()?;
        reservations.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(reservations)
    }

    async fn authorize(&self, commit: &AuthorizationCommit) -> Result<Transition, PaymentError> {
        let agent_id = &commit.audit.agent_id;
        let items = vec![
            self.reservation_move(
                agent_id,
                &commit.reservation_id,
                ReservationStatus::Reserved,
                ReservationStatus::Authorized,
                Some(PaidFacts {
                    payment_id: &commit.payment_id,
                    payer: commit.payer.as_deref(),
                    authorization: commit.authorization.as_ref(),
                }),
                commit.now,
            )?,
            self.key_completion(&commit.fence, &commit.result, commit.now, commit.expires_at)?,
            audit_put(&self.tables.ledger, &commit.audit)?,
        ];
        let items = items.into_iter().chain(self.history_adds(agent_id, &commit.history)?).collect();
        match self.transact("record ledger", items).await? {
            TxOutcome::Committed => Ok(Transition::Applied),
            TxOutcome::Cancelled(cancelled) => {
                let reasons = reasons(&cancelled);
                match reasons.first() {
                    Some(Reason::ConditionFailed(Some(item))) => {
                        let current = decode_reservation(item)?;
                        let same_payment = current.payment_id.as_deref() == Some(commit.payment_id.as_str());
                        if !(current.status.is_paid() && same_payment) {
                            return Ok(Transition::Refused(format!("reservation is {}", current.status.as_str())));
                        }
                        // Recorded before. A key still held for this very claim (a later record
                        // of the same execution, whose claim id is the same) is completed with
                        // it: never left IN_PROGRESS over a paid reservation.
                        if matches!(reasons.get(1), Some(Reason::Passed)) {
                            self.complete_held_key(commit).await?;
                        }
                        return Ok(Transition::AlreadyApplied);
                    }
                    Some(Reason::ConditionFailed(None)) => {
                        return Ok(Transition::Refused("no such reservation".into()));
                    }
                    _ => {}
                }
                if reasons.iter().any(|r| matches!(r, Reason::Conflict)) {
                    return Ok(Transition::VersionConflict);
                }
                match reasons.get(1) {
                    Some(Reason::ConditionFailed(item)) => Ok(Transition::Fenced(holder_of(*item)?)),
                    _ => Ok(Transition::VersionConflict),
                }
            }
        }
    }

    async fn release(&self, commit: &ReleaseCommit) -> Result<Transition, PaymentError> {
        // The key's close is the fence: without it nothing is written. A reservation already
        // RELEASED (an earlier try got through) is dropped from the transaction and the rest
        // tried again.
        let mut release_reservation = commit.reservation.is_some();
        for _ in 0..3 {
            let mut items = Vec::new();
            let mut parts = Vec::new();
            if let (true, Some(release)) = (release_reservation, &commit.reservation) {
                items.push(self.reservation_move(
                    &commit.agent_id,
                    &release.id,
                    ReservationStatus::Reserved,
                    ReservationStatus::Released,
                    None,
                    commit.now,
                )?);
                parts.push("reservation");
                if let Some(refund) = &release.refund {
                    items.push(window_item::transact_item(&self.tables.ledger, window_key(&commit.agent_id), refund)?);
                    parts.push("window");
                }
            }
            items.push(self.fenced_idempotency_close(
                &commit.fence,
                commit.status,
                ("error", json(&commit.error)?),
                commit.now,
                commit.expires_at,
            )?);
            parts.push("key");
            items.push(audit_put(&self.tables.ledger, &commit.audit)?);
            parts.push("audit");

            let TxOutcome::Cancelled(cancelled) = self.transact("compensate", items).await? else {
                return Ok(Transition::Applied);
            };
            let mut retry = false;
            for (part, reason) in parts.iter().zip(reasons(&cancelled)) {
                match (*part, reason) {
                    (_, Reason::Conflict) | ("window", Reason::ConditionFailed(_)) => {
                        return Ok(Transition::VersionConflict);
                    }
                    ("reservation", Reason::ConditionFailed(item)) => {
                        let status = item.map(decode_reservation).transpose()?.map(|r| r.status);
                        match status {
                            Some(ReservationStatus::Released) | None => {
                                release_reservation = false;
                                retry = true;
                            }
                            Some(other) => {
                                return Ok(Transition::Refused(format!(
                                    "reservation {} is {}: a payment proof was issued, it must not be released",
                                    commit.reservation_id,
                                    other.as_str()
                                )));
                            }
                        }
                    }
                    ("key", Reason::ConditionFailed(item)) => {
                        let current = item.map(decode_idempotency).transpose()?;
                        let closed_here = current.as_ref().is_some_and(|r| r.is_closed_for(&commit.fence));
                        let released = self
                            .reservation(&commit.agent_id, &commit.reservation_id)
                            .await?
                            .is_some_and(|r| r.status == ReservationStatus::Released);
                        return Ok(if closed_here || released {
                            Transition::AlreadyApplied
                        } else {
                            Transition::Fenced(holder_of(item)?)
                        });
                    }
                    _ => {}
                }
            }
            if !retry {
                return Ok(Transition::VersionConflict);
            }
        }
        Ok(Transition::VersionConflict)
    }

    async fn hold(&self, commit: &HoldCommit) -> Result<Transition, PaymentError> {
        let items = vec![
            self.fenced_lease(&commit.fence, commit.now, commit.now)?,
            audit_put(&self.tables.ledger, &commit.audit)?,
        ];
        match self.transact("hold unknown outcome", items).await? {
            TxOutcome::Committed => Ok(Transition::Applied),
            TxOutcome::Cancelled(cancelled) => match reasons(&cancelled).as_slice() {
                [Reason::ConditionFailed(item), ..] => Ok(Transition::Fenced(holder_of(*item)?)),
                // The audit event exists: this hold was written before; end the lease again.
                [Reason::Passed, Reason::ConditionFailed(_)] => Ok(Transition::AlreadyApplied),
                _ => Ok(Transition::VersionConflict),
            },
        }
    }

    async fn record_settlement(&self, commit: &SettlementCommit) -> Result<Transition, PaymentError> {
        let mut update = Update::builder()
            .table_name(&self.tables.ledger)
            .set_key(Some(self.reservation_key(&commit.agent_id, &commit.reservation_id)))
            .condition_expression("#status = :from")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":from", s(commit.from.as_str()))
            .expression_attribute_values(":to", s(commit.to.as_str()))
            .expression_attribute_values(":now", n(commit.audit.at.millis()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        update = match &commit.settlement {
            Some(settlement) => update
                .update_expression("SET #status = :to, settlement = :settlement, updatedAt = :now")
                .expression_attribute_values(":settlement", json(settlement)?),
            None => update.update_expression("SET #status = :to, updatedAt = :now"),
        };
        let mut items = vec![
            TransactWriteItem::builder().update(update.build().map_err(build_error)?).build(),
            audit_put(&self.tables.ledger, &commit.audit)?,
        ];
        if let Some(refund) = &commit.refund {
            items.push(window_item::transact_item(&self.tables.ledger, window_key(&commit.agent_id), refund)?);
        }
        match self.transact("record settlement", items).await? {
            TxOutcome::Committed => Ok(Transition::Applied),
            TxOutcome::Cancelled(cancelled) => match reasons(&cancelled).first() {
                Some(Reason::ConditionFailed(Some(item))) => {
                    let current = decode_reservation(item)?;
                    let same = current.status == commit.to
                        && (commit.settlement.is_none() || current.settlement == commit.settlement);
                    Ok(if same { Transition::AlreadyApplied } else { Transition::VersionConflict })
                }
                Some(Reason::ConditionFailed(None)) => Ok(Transition::Refused("no such reservation".into())),
                _ => Ok(Transition::VersionConflict),
            },
        }
    }

    async fn append_audit(&self, event: &AuditEvent) -> Result<(), PaymentError> {
        let TransactWriteItem { put: Some(put), .. } = audit_put(&self.tables.ledger, event)? else {
            return Err(PaymentError::LedgerInconsistent("an audit event is a put".into()));
        };
        self.client
            .put_item()
            .table_name(put.table_name)
            .set_item(Some(put.item))
            .send()
            .await
            .map_err(|e| classify("append audit event", e))?;
        Ok(())
    }

    async fn audit_events(&self, agent_id: &str) -> Result<Vec<AuditEvent>, PaymentError> {
        let items = self.query_prefix("list audit events", agent_id, "AUDIT#").await?;
        items.iter().map(|item| decode(item, &[])).collect()
    }

    async fn request_approval(&self, commit: &ApprovalRequestCommit) -> Result<Transition, PaymentError> {
        // New, or pending with another token (a retried task replaces it).
        let approval = approval_put(&self.tables.ledger, &commit.record)?
            .condition_expression("attribute_not_exists(pk) OR (#status = :pending AND taskToken <> :token)")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":pending", s(ApprovalStatus::Pending.as_str()))
            .expression_attribute_values(":token", s(&commit.record.task_token))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(build_error)?;
        let items = vec![
            self.fenced_lease(&commit.fence, commit.lease_until, commit.record.requested_at)?,
            TransactWriteItem::builder().put(approval).build(),
            audit_put(&self.tables.ledger, &commit.audit)?,
        ];
        match self.transact("request approval", items).await? {
            TxOutcome::Committed => Ok(Transition::Applied),
            TxOutcome::Cancelled(cancelled) => match reasons(&cancelled).as_slice() {
                [Reason::ConditionFailed(item), ..] => Ok(Transition::Fenced(holder_of(*item)?)),
                [_, Reason::ConditionFailed(Some(item)), ..] => {
                    let stored: ApprovalRecord = decode(item, &[])?;
                    Ok(request_check(Some(&stored), commit).unwrap_or(Transition::VersionConflict))
                }
                // The audit event of this very token exists: requested before.
                [_, _, Reason::ConditionFailed(_)] => Ok(Transition::AlreadyApplied),
                _ => Ok(Transition::VersionConflict),
            },
        }
    }

    async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, PaymentError> {
        let Some(key) = approval_key(id) else { return Ok(None) };
        let item = self.get("read approval", &self.tables.ledger, key).await?;
        item.as_ref().map(|i| decode(i, &[])).transpose()
    }

    async fn approvals(&self, since: Timestamp, until: Timestamp) -> Result<Vec<ApprovalRecord>, PaymentError> {
        // One partition per day; an approval's partition is its reservation's day, which can
        // be the day before its request.
        let since = since.max(until.minus(MAX_APPROVAL_LISTING));
        let mut day = since.minus(DAY);
        let mut approvals = Vec::new();
        while day <= until {
            let mut start: Option<Item> = None;
            loop {
                let output = self
                    .client
                    .query()
                    .table_name(&self.tables.ledger)
                    .key_condition_expression("pk = :pk")
                    .expression_attribute_values(":pk", s(approvals_pk(&agentpay_core::approval::day_of(day))))
                    .consistent_read(true)
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(|e| classify("list approvals", e))?;
                for item in output.items() {
                    approvals.push(decode::<ApprovalRecord>(item, &[])?);
                }
                match output.last_evaluated_key {
                    Some(key) if !key.is_empty() => start = Some(key),
                    _ => break,
                }
            }
            day = day.plus(DAY);
        }
        approvals.retain(|a| a.requested_at >= since && a.requested_at <= until);
        approvals.sort_by(|a, b| (b.requested_at, &a.id).cmp(&(a.requested_at, &b.id)));
        approvals.truncate(agentpay_core::approval::MAX_LISTED);
        Ok(approvals)
    }

    async fn decide_approval(&self, commit: &ApprovalDecisionCommit) -> Result<Transition, PaymentError> {
        if approval_key(commit.id()).is_none() {
            return Ok(Transition::Refused("no such approval".into()));
        }
        let put = approval_put(&self.tables.ledger, &commit.decided)?
            .condition_expression("#status = :pending AND expiresAt > :at")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":pending", s(ApprovalStatus::Pending.as_str()))
            .expression_attribute_values(":at", n(commit.at().millis()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(build_error)?;
        let items = vec![TransactWriteItem::builder().put(put).build(), audit_put(&self.tables.ledger, &commit.audit)?];
        match self.transact("decide approval", items).await? {
            TxOutcome::Committed => Ok(Transition::Applied),
            TxOutcome::Cancelled(cancelled) => match reasons(&cancelled).as_slice() {
                [Reason::ConditionFailed(Some(item)), ..] => {
                    let stored: ApprovalRecord = decode(item, &[])?;
                    Ok(decision_check(&stored, commit).unwrap_or(Transition::VersionConflict))
                }
                [Reason::ConditionFailed(None), ..] => Ok(Transition::Refused("no such approval".into())),
                [_, Reason::ConditionFailed(_)] => Ok(Transition::AlreadyApplied),
                _ => Ok(Transition::VersionConflict),
            },
        }
    }
}

/// The sort-key prefix (and cold-partition id) of an agent's policy history.
const POLICY_HISTORY: &str = "POLICY";

const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// The longest span one listing reads (one query per day).
const MAX_APPROVAL_LISTING: std::time::Duration = std::time::Duration::from_secs(31 * 24 * 3600);

/// Approvals live in one partition per day (`APPROVALS#YYYYMMDD`, the day their id carries):
/// a person's queue is found with a query or two, never a scan.
fn approvals_pk(day: &str) -> String {
    format!("APPROVALS#{day}")
}

fn approval_key(id: &str) -> Option<Item> {
    let day = agentpay_core::approval::day_of_id(id)?;
    Some(Item::from([("pk".to_owned(), s(approvals_pk(day))), ("sk".to_owned(), s(id))]))
}

/// A put of the whole approval record (its status, expiry and token also as attributes, for
/// the conditions).
fn approval_put(
    table: &str,
    approval: &ApprovalRecord,
) -> Result<aws_sdk_dynamodb::types::builders::PutBuilder, PaymentError> {
    let key = approval_key(&approval.id)
        .ok_or_else(|| PaymentError::LedgerInconsistent(format!("{:?} is not an approval id", approval.id)))?;
    Ok(Put::builder()
        .table_name(table)
        .set_item(Some(key))
        .item("status", s(approval.status.as_str()))
        .item("requestedAt", n(approval.requested_at.millis()))
        .item("expiresAt", n(approval.expires_at.millis()))
        .item("taskToken", s(&approval.task_token))
        .item("record", json(approval)?))
}

#[async_trait]
impl IssuedProofs for DynamoStore {
    async fn issued(&self, client_token: &str) -> Result<Option<IssuedProof>, PaymentError> {
        let key = Item::from([("pk".to_owned(), s(format!("PROOF#{client_token}"))), ("sk".to_owned(), s("PROOF"))]);
        let item = self.get("read issued proof", &self.tables.ledger, key).await?;
        item.as_ref().map(|i| decode(i, &[])).transpose()
    }

    async fn record_issued(&self, client_token: &str, proof: &IssuedProof) -> Result<IssuedProof, PaymentError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.tables.ledger)
            .item("pk", s(format!("PROOF#{client_token}")))
            .item("sk", s("PROOF"))
            .item("record", json(proof)?)
            .condition_expression("attribute_not_exists(pk)")
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(proof.clone()),
            Err(error) => match error.as_service_error() {
                Some(aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(failed)) => {
                    let item = failed.item().ok_or_else(|| {
                        PaymentError::LedgerInconsistent("proof refused without the stored one".into())
                    })?;
                    decode(item, &[])
                }
                _ => Err(classify("record issued proof", error)),
            },
        }
    }
}

/// Creates a table from its schema (tests and `agentpay` against a local endpoint).
pub async fn create_table(client: &Client, name: &str, schema: schema::TableSchema) -> Result<(), PaymentError> {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TimeToLiveSpecification,
    };
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder().attribute_name(name).key_type(kind).build().map_err(build_error)
    };
    let attribute = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(build_error)
    };
    let mut request = client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key(schema.hash_key, KeyType::Hash)?)
        .attribute_definitions(attribute(schema.hash_key)?);
    if let Some(range) = schema.range_key {
        request = request.key_schema(key(range, KeyType::Range)?).attribute_definitions(attribute(range)?);
    }
    request.send().await.map_err(|e| classify("create table", e))?;
    if let Some(ttl) = schema.ttl_attribute {
        client
            .update_time_to_live()
            .table_name(name)
            .time_to_live_specification(
                TimeToLiveSpecification::builder().attribute_name(ttl).enabled(true).build().map_err(build_error)?,
            )
            .send()
            .await
            .map_err(|e| classify("enable TTL", e))?;
    }
    Ok(())
}

impl DynamoStore {
    /// A reservation written only if none has its id (a retried step gets the stored one back).
    fn new_reservation(&self, reservation: &Reservation) -> Result<TransactWriteItem, PaymentError> {
        let put = Put::builder()
            .table_name(&self.tables.ledger)
            .set_item(Some(self.reservation_key(&reservation.agent_id, &reservation.id)))
            .item("status", s(reservation.status.as_str()))
            .item("updatedAt", n(reservation.updated_at.millis()))
            .item("record", json(reservation)?)
            .condition_expression("attribute_not_exists(pk)")
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(build_error)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// The key COMPLETED with `result`, kept until `expires_at`, fenced on its claim.
    fn key_completion(
        &self,
        fence: &ClaimFence,
        result: &serde_json::Value,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<TransactWriteItem, PaymentError> {
        self.fenced_idempotency_close(fence, IdempotencyStatus::Completed, ("result", json(result)?), now, expires_at)
    }

    /// Completes the key `commit` is fenced on, if it is still held for it (one conditional
    /// write; a key moved on since is left as it is).
    async fn complete_held_key(&self, commit: &AuthorizationCommit) -> Result<(), PaymentError> {
        let close = self.key_completion(&commit.fence, &commit.result, commit.now, commit.expires_at)?;
        match self.transact("complete key", vec![close]).await? {
            TxOutcome::Committed | TxOutcome::Cancelled(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_dynamodb::operation::get_item::GetItemError;
    use aws_sdk_dynamodb::types::error::{
        InternalServerError, ProvisionedThroughputExceededException, ResourceNotFoundException,
    };
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    use super::*;

    fn response(status: u16) -> HttpResponse {
        HttpResponse::new(status.try_into().unwrap(), SdkBody::empty())
    }

    fn meta(code: &str) -> ErrorMetadata {
        ErrorMetadata::builder().code(code).message("from the service").build()
    }

    #[test]
    fn throttling_server_errors_and_timeouts_are_retryable() {
        let throttled = SdkError::service_error(
            GetItemError::ProvisionedThroughputExceededException(
                ProvisionedThroughputExceededException::builder()
                    .message("slow down")
                    .meta(meta("ProvisionedThroughputExceededException"))
                    .build(),
            ),
            response(400),
        );
        let internal = SdkError::service_error(
            GetItemError::InternalServerError(InternalServerError::builder().meta(meta("InternalServerError")).build()),
            response(500),
        );
        let unknown_503 = SdkError::service_error(GetItemError::generic(meta("SomethingNew")), response(503));
        let timeout: SdkError<GetItemError, HttpResponse> = SdkError::timeout_error("no answer in 3 s");
        for error in [throttled, internal, unknown_503, timeout] {
            let classified = classify("read agent ledger", error);
            assert_eq!(classified.name(), "StoreUnavailable", "{classified:?}");
            assert!(classified.is_retryable());
            assert!(std::error::Error::source(&classified).is_some(), "the SDK error stays the source");
        }
    }

    #[test]
    fn other_service_errors_are_rejections_naming_the_code() {
        let missing = SdkError::service_error(
            GetItemError::ResourceNotFoundException(
                ResourceNotFoundException::builder()
                    .message("Requested resource not found")
                    .meta(meta("ResourceNotFoundException"))
                    .build(),
            ),
            response(400),
        );
        let classified = classify("read agent ledger", missing);
        assert_eq!(classified.name(), "StoreRejected");
        assert!(!classified.is_retryable());
        assert!(classified.chain_message().contains("ResourceNotFoundException"), "{}", classified.chain_message());
    }
}
