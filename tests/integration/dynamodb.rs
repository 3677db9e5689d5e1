//! DynamoDB-specific guarantees on a real DynamoDB-compatible server (moto).

use std::collections::BTreeMap;
use std::sync::Arc;

use agentpay::clock::{ManualClock, SystemClock};
use agentpay::provider::dev_wallet::DevWallet;
use agentpay::samples::execution_input;
use agentpay::steps::{CheckIdempotencyInput, CheckSpendInput, ClaimOutcome, ProcessPaymentInput, RecordLedgerInput};
use agentpay::steps::{StepSettings, Steps};
use agentpay::store::Store;
use agentpay::store::dynamodb::DynamoStore;
use agentpay::store::dynamodb::request_log::{LoggedRequest, RequestLog, capacity};

use crate::helpers::policy;
use crate::stores::{START, dynamo_store, dynamodb_client, logged_store};

const AGENT: &str = "dynamo-agent";

fn steps_over(store: Arc<DynamoStore>, settings: StepSettings) -> Steps {
    let clock = Arc::new(ManualClock::new(START));
    let wallet = DevWallet::from_hex_key(&DevWallet::generate_hex_key(), store.clone(), clock.clone()).unwrap();
    Steps::new(store, Arc::new(wallet), clock, settings)
}

/// One happy-path payment through the four store-touching steps; the requests it made.
async fn pay_once(steps: &Steps, log: &RequestLog, key: &str) -> (Vec<LoggedRequest>, usize) {
    log.clear();
    let request = execution_input(key, AGENT, "10000");
    let execution_id = format!("exec-{key}");
    let claim = steps
        .check_idempotency(CheckIdempotencyInput { request: request.clone(), execution_id: execution_id.clone() })
        .await
        .unwrap();
    let reservation = steps
        .check_spend(CheckSpendInput {
            request: request.clone(),
            execution_id: execution_id.clone(),
            claim: claim.clone(),
        })
        .await
        .unwrap();
    let before_wallet = log.requests().len();
    let proof = steps
        .process_payment(ProcessPaymentInput {
            request: request.clone(),
            execution_id: execution_id.clone(),
            claim: claim.clone(),
            reservation: reservation.clone(),
            retry_count: 0,
        })
        .await
        .unwrap();
    let wallet_requests = log.requests().len() - before_wallet;
    steps.record_ledger(RecordLedgerInput { request, execution_id, claim, reservation, proof }).await.unwrap();
    // The dev wallet's issued-proof journal is the wallet's, not the store's.
    let store_requests = log
        .requests()
        .into_iter()
        .filter(|r| !r.writes.iter().chain(&r.reads).any(|i| i.partition().starts_with("PROOF#")));
    (store_requests.collect(), wallet_requests)
}

#[tokio::test]
async fn a_payment_costs_the_same_on_the_hot_partition_idle_or_with_a_full_window() {
    let (store, log) = logged_store().await;
    store.put_policy(AGENT, &policy("1.00", "5000.00", 100_000)).await.unwrap();
    let steps = steps_over(store.clone(), StepSettings::default());
    let plain = dynamodb_client().await;
    let hot = format!("AGENT#{AGENT}");

    let (requests, wallet_requests) = pay_once(&steps, &log, "dyn-idle").await;
    let mut by_operation = BTreeMap::new();
    for request in &requests {
        *by_operation.entry(request.operation.as_str()).or_insert(0) += 1;
    }
    // ProcessPayment: the kill switch (the policy item) and the claim, then the dev wallet's
    // issued-proof journal (GetItem + PutItem), which is the wallet's cost, not the store's.
    assert_eq!(wallet_requests, 3);
    assert_eq!(requests.len(), 6, "{by_operation:?}");
    assert_eq!(by_operation["TransactWriteItems"], 2);
    assert_eq!(
        by_operation["BatchGetItem"], 3,
        "CheckIdempotency (agent and key), CheckSpend (agent), ProcessPayment (policy and claim)"
    );
    let idle = capacity(&plain, &requests, &hot).await;

    // A window with every slot taken: a payment in every minute of the last day.
    let full = {
        let mut window = store.agent_ledger(AGENT).await.unwrap().window.rolled(START);
        for slot in 0..agentpay::window::HOUR_SLOTS {
            window.hours[slot] = agentpay::money::AtomicAmount::new(600_000).unwrap();
        }
        window.minutes = vec![1; agentpay::window::MINUTE_SLOTS];
        window.spent = agentpay::money::AtomicAmount::new(600_000 * 25).unwrap();
        window.count = agentpay::window::MINUTE_SLOTS as u32;
        window.check().unwrap();
        window
    };
    plain
        .put_item()
        .table_name(&store.tables().ledger)
        .set_item(Some(agentpay::store::dynamodb::window_item::item(agentpay::store::dynamodb::agent_pk(AGENT), &full)))
        .send()
        .await
        .unwrap();
    let (requests, _) = pay_once(&steps, &log, "dyn-full").await;
    let busy = capacity(&plain, &requests, &hot).await;
    eprintln!("capacity per payment: idle {idle:?}, full window {busy:?}");
    // The window item and the policy item are the agent's only hot items: each payment writes
    // the window once, in a transaction (2 units), reads both twice (4 units) and the policy
    // once more before paying (1 unit).
    assert_eq!((idle.hot_write_units, idle.hot_read_units), (2, 5), "{idle:?}");
    assert_eq!((busy.hot_write_units, busy.hot_read_units), (2, 5), "{busy:?}");
    assert_eq!(store.agent_ledger(AGENT).await.unwrap().window.count, full.count + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_reservations_never_pass_the_cap() {
    let store = dynamo_store().await;
    // 0.03 USDC each, the daily cap allows exactly 37.
    store.put_policy(AGENT, &policy("1.00", "1.11", 1000)).await.unwrap();
    let settings = StepSettings { ledger_attempts: 200, ..StepSettings::default() };
    let steps = Arc::new(steps_over(store.clone(), settings));

    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let steps = steps.clone();
            tokio::spawn(async move {
                let request = execution_input(&format!("dyn-c-{i}"), AGENT, "30000");
                let execution_id = format!("exec-{i}");
                let claim = steps
                    .check_idempotency(CheckIdempotencyInput {
                        request: request.clone(),
                        execution_id: execution_id.clone(),
                    })
                    .await
                    .unwrap();
                steps.check_spend(CheckSpendInput { request, execution_id, claim }).await
            })
        })
        .collect();
    let mut reserved = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => reserved += 1,
            Err(error) => assert_eq!(error.name(), "SpendLimitExceeded", "{error}"),
        }
    }
    assert_eq!(reserved, 37);
    let reservations = store.reservations(AGENT).await.unwrap();
    assert_eq!(reservations.len(), 37);
    let total: u64 = reservations.iter().map(|r| r.amount.get()).sum();
    assert_eq!(total, 1_110_000);
    let window = store.agent_ledger(AGENT).await.unwrap().window;
    assert_eq!(window.spent.get(), 1_110_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_claims_of_one_key_have_one_winner() {
    let store = dynamo_store().await;
    store.put_policy(AGENT, &policy("1.00", "5.00", 100)).await.unwrap();
    let clock = Arc::new(SystemClock);
    let wallet = DevWallet::from_hex_key(&DevWallet::generate_hex_key(), store.clone(), clock.clone()).unwrap();
    let steps = Arc::new(Steps::new(store.clone(), Arc::new(wallet), clock, StepSettings::default()));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let steps = steps.clone();
            tokio::spawn(async move {
                let request = execution_input("dyn-one-key", AGENT, "10000");
                steps.check_idempotency(CheckIdempotencyInput { request, execution_id: format!("exec-{i}") }).await
            })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(claim) => {
                assert_eq!(claim.outcome, ClaimOutcome::Claimed);
                winners += 1;
            }
            Err(error) => assert_eq!(error.name(), "PaymentInFlight", "{error}"),
        }
    }
    assert_eq!(winners, 1);
}

#[tokio::test]
async fn a_missing_table_is_a_rejection_not_an_outage() {
    let store = dynamo_store().await;
    let broken = DynamoStore::new(
        store.client().clone(),
        agentpay::store::dynamodb::TableNames { idempotency: "no-such-table".into(), ledger: "no-such-ledger".into() },
    );
    let error = broken.agent_ledger(AGENT).await.unwrap_err();
    assert_eq!(error.name(), "StoreRejected", "{error:?}");
    assert!(!error.is_retryable());
    assert!(error.chain_message().contains("ResourceNotFoundException"), "{}", error.chain_message());
}

/// DynamoDB's TTL must never delete an unfinished claim: only finished records carry `ttl`.
#[tokio::test]
async fn only_finished_idempotency_items_carry_a_ttl() {
    let store = dynamo_store().await;
    store.put_policy(AGENT, &policy("1.00", "5.00", 10)).await.unwrap();
    let steps = steps_over(store.clone(), StepSettings::default());
    let input = execution_input("ttl-1", AGENT, "10000");
    let execution_id = "exec-ttl".to_owned();
    let claim = steps
        .check_idempotency(CheckIdempotencyInput { request: input.clone(), execution_id: execution_id.clone() })
        .await
        .unwrap();
    let item = |store: Arc<DynamoStore>| async move {
        store
            .client()
            .get_item()
            .table_name(&store.tables().idempotency)
            .key("idempotencyKey", aws_sdk_dynamodb::types::AttributeValue::S("ttl-1".into()))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .unwrap()
    };
    assert!(!item(store.clone()).await.contains_key("ttl"), "an IN_PROGRESS claim has no ttl");
    let reservation = steps
        .check_spend(CheckSpendInput {
            request: input.clone(),
            execution_id: execution_id.clone(),
            claim: claim.clone(),
        })
        .await
        .unwrap();
    let proof = steps
        .process_payment(ProcessPaymentInput {
            request: input.clone(),
            execution_id: execution_id.clone(),
            claim: claim.clone(),
            reservation: reservation.clone(),
            retry_count: 0,
        })
        .await
        .unwrap();
    steps.record_ledger(RecordLedgerInput { request: input, execution_id, claim, reservation, proof }).await.unwrap();
    let finished = item(store.clone()).await;
    let ttl: i64 = finished["ttl"].as_n().unwrap().parse().unwrap();
    let expires: i64 = finished["expiresAt"].as_n().unwrap().parse().unwrap();
    assert_eq!(ttl, expires / 1000, "the TTL is the finished record's expiry");
}

#[tokio::test]
async fn a_policy_item_from_before_the_window_item_keeps_its_spend_counted() {
    let (store, log) = logged_store().await;
    let plain = dynamodb_client().await;
    // As stores wrote it before: policy, version and minute buckets in one STATE item.
    let minute = START.millis() / 60_000;
    let policy_json = serde_json::to_string(&policy("1.00", "0.05", 10)).unwrap();
    let buckets = format!(r#"[{{"minute":{},"amount":"30000","count":1}}]"#, minute - 90);
    plain
        .put_item()
        .table_name(&store.tables().ledger)
        .item("pk", aws_sdk_dynamodb::types::AttributeValue::S(format!("AGENT#{AGENT}")))
        .item("sk", aws_sdk_dynamodb::types::AttributeValue::S("STATE".into()))
        .item("policy", aws_sdk_dynamodb::types::AttributeValue::S(policy_json))
        .item("version", aws_sdk_dynamodb::types::AttributeValue::N("3".into()))
        .item("window", aws_sdk_dynamodb::types::AttributeValue::S(buckets))
        .send()
        .await
        .unwrap();
    let ledger = store.agent_ledger(AGENT).await.unwrap();
    assert_eq!((ledger.version, ledger.window.spent.get(), ledger.window.seq), (3, 30_000, 0));
    let steps = steps_over(store.clone(), StepSettings::default());
    // 0.03 counted from the old window: a second 0.03 would pass the 0.05 cap.
    let request = execution_input("dyn-legacy", AGENT, "30000");
    let claim = steps
        .check_idempotency(CheckIdempotencyInput { request: request.clone(), execution_id: "exec-legacy".into() })
        .await
        .unwrap();
    let denied =
        steps.check_spend(CheckSpendInput { request, execution_id: "exec-legacy".into(), claim }).await.unwrap_err();
    assert_eq!(denied.name(), "SpendLimitExceeded", "{denied}");
    // The next policy edit writes the window item from the old buckets and drops them.
    store.put_policy(AGENT, &policy("1.00", "0.10", 10)).await.unwrap();
    let ledger = store.agent_ledger(AGENT).await.unwrap();
    assert_eq!((ledger.version, ledger.window.spent.get(), ledger.window.policy_version), (4, 30_000, 4));
    let requests = log.requests();
    assert!(requests.iter().any(|r| r.writes.iter().any(|w| w.key["sk"]["S"] == "WINDOW")), "{requests:?}");
}

/// What one settlement report sends and writes (the issue's figure): the key's record and the
/// reservation read, the move and its audit event in one transaction.
#[tokio::test]
async fn a_settlement_report_costs_three_requests() {
    use agentpay::settlement::ReportInput;
    use agentpay::settlements::Settlements;
    use base64::Engine;
    let (store, log) = logged_store().await;
    store.put_policy(AGENT, &policy("1.00", "5000.00", 100_000)).await.unwrap();
    let steps = steps_over(store.clone(), StepSettings::default());
    pay_once(&steps, &log, "dyn-settle").await;
    let settlements = Settlements::new(store.clone(), steps.clock().clone());
    let answer = serde_json::json!({"success": true, "transaction": format!("0x{}", "12".repeat(32)), "network": "eip155:84532"});
    let input = ReportInput::X402V2(base64::engine::general_purpose::STANDARD.encode(answer.to_string()));
    log.clear();
    let recorded = settlements.report(AGENT, "dyn-settle", &input, "local:agent").await.unwrap();
    assert_eq!(recorded.status.as_str(), "SETTLED");
    let requests = log.requests();
    let operations: Vec<&str> = requests.iter().map(|r| r.operation.as_str()).collect();
    assert_eq!(operations, ["GetItem", "GetItem", "TransactWriteItems"]);
    let cost = capacity(&dynamodb_client().await, &requests, &format!("AGENT#{AGENT}")).await;
    eprintln!("a settlement report: {} requests, {cost:?}", requests.len());
    assert_eq!(cost.hot_write_units, 0, "nothing on the agent's hot partition");
}

/// Agents from a table made before the registry of agents (policy items, no registry entries)
/// are entered by the first listing, once: none is left out of a sweep. Agents created later
/// enter with their first policy.
#[tokio::test]
async fn agents_from_before_the_registry_are_entered_by_the_first_listing() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let store = dynamo_store().await;
    for agent in ["old-b", "old-a"] {
        store.put_policy(agent, &policy("1", "10", 10)).await.unwrap();
    }
    // As a table from before the registry: no entries, no mark that it is complete.
    let (client, ledger) = (store.client().clone(), store.tables().ledger.clone());
    let registry = || async {
        let output = client
            .query()
            .table_name(&ledger)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", AttributeValue::S("AGENTS".into()))
            .consistent_read(true)
            .send()
            .await
            .unwrap();
        output.items().iter().map(|item| item["sk"].as_s().unwrap().clone()).collect::<Vec<_>>()
    };
    assert_eq!(registry().await, ["AGENT#old-a", "AGENT#old-b"], "entered with the first policy");
    for sk in registry().await {
        let key = [("pk", "AGENTS"), ("sk", sk.as_str())].map(|(k, v)| (k.to_owned(), AttributeValue::S(v.into())));
        client.delete_item().table_name(&ledger).set_key(Some(key.into())).send().await.unwrap();
    }
    assert!(registry().await.is_empty());

    let upgraded = Arc::new(DynamoStore::new(client.clone(), store.tables().clone()));
    assert_eq!(upgraded.agents().await.unwrap(), ["old-a", "old-b"]);
    assert_eq!(registry().await, ["#LISTED", "AGENT#old-a", "AGENT#old-b"]);
    upgraded.put_policy("new-c", &policy("1", "10", 10)).await.unwrap();
    upgraded.put_policy("old-a", &policy("2", "10", 10)).await.unwrap();
    assert_eq!(upgraded.agents_after(Some("old-a"), 5).await.unwrap(), ["old-b"]);
    assert_eq!(upgraded.agents().await.unwrap(), ["new-c", "old-a", "old-b"]);
}
