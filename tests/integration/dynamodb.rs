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
use agentpay::store::dynamodb::request_log::RequestLog;

use crate::helpers::policy;
use crate::stores::{START, dynamo_store, dynamodb_endpoint, fresh_tables};

const AGENT: &str = "dynamo-agent";

async fn logged_store() -> (Arc<DynamoStore>, RequestLog) {
    let log = RequestLog::default();
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(dynamodb_endpoint())
        .region(aws_config::Region::new("us-east-1"))
        .test_credentials()
        .load()
        .await;
    let config = aws_sdk_dynamodb::config::Builder::from(&shared).interceptor(log.interceptor()).build();
    let client = aws_sdk_dynamodb::Client::from_conf(config);
    let tables = fresh_tables(&client).await;
    (Arc::new(DynamoStore::new(client, tables)), log)
}

fn steps_over(store: Arc<DynamoStore>, settings: StepSettings) -> Steps {
    let clock = Arc::new(ManualClock::new(START));
    let wallet = DevWallet::from_hex_key(&DevWallet::generate_hex_key(), store.clone(), clock.clone()).unwrap();
    Steps::new(store, Arc::new(wallet), clock, settings)
}

#[tokio::test]
async fn a_happy_path_payment_is_five_store_requests() {
    let (store, log) = logged_store().await;
    store.put_policy(AGENT, &policy("1.00", "5.00", 10)).await.unwrap();
    let steps = steps_over(store.clone(), StepSettings::default());
    log.clear();

    let request = execution_input("dyn-happy", AGENT, "10000");
    let execution_id = "exec-happy".to_owned();
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
    let store_requests_before_wallet = log.requests().len();
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
    let wallet_requests = log.requests().len() - store_requests_before_wallet;
    steps.record_ledger(RecordLedgerInput { request, execution_id, claim, reservation, proof }).await.unwrap();

    let requests = log.requests();
    let mut by_operation = BTreeMap::new();
    for request in &requests {
        *by_operation.entry(request.operation.as_str()).or_insert(0) += 1;
    }
    // The dev wallet's issued-proof journal (GetItem + PutItem) is not part of the store's cost.
    assert_eq!(wallet_requests, 2);
    assert_eq!(requests.len() - wallet_requests, 5, "{by_operation:?}");
    assert_eq!(by_operation["TransactWriteItems"], 2);
    assert_eq!(by_operation["BatchGetItem"], 1, "CheckIdempotency reads the agent and the key at once");
    assert_eq!(by_operation["GetItem"], 2, "CheckSpend's agent read and the wallet's journal");
    // Write units by DynamoDB's rule over the logged items: the claim (1 item), the reservation
    // transaction (agent item + reservation, ×2) and the ledger transaction (reservation,
    // idempotency record with the result, audit event, ×2). The figure goes in the closing note.
    let store_requests: Vec<_> =
        requests.iter().filter(|r| r.operation != "GetItem" && r.operation != "BatchGetItem").collect();
    let items: Vec<usize> = store_requests.iter().map(|r| r.written_item_bytes.len()).collect();
    // The reservation transaction also checks the fence on the key (a ConditionCheck).
    assert_eq!(items, [1, 3, 1, 3], "claim, reserve, wallet journal, authorize: {store_requests:?}");
    let units: Vec<usize> = store_requests.iter().map(|r| r.write_units()).collect();
    eprintln!("write units per request (claim, reserve, wallet journal, authorize): {units:?}; {store_requests:?}");
    assert!(units[1] >= 4 && units[3] >= 6, "{units:?}");
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
    assert_eq!(window.iter().map(|e| e.amount.get()).sum::<u64>(), 1_110_000);
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
