//! One hot agent on DynamoDB: what a payment costs on the agent's partition, what that allows,
//! and how much concurrent payments of one agent contend.
//!
//! `AWS_ENDPOINT_URL_DYNAMODB=http://127.0.0.1:PORT cargo bench --bench dynamodb_hot_agent`
//! (a DynamoDB-compatible server such as moto's; real DynamoDB works with real tables too).
//!
//! 1. Capacity per payment, idle and with a full window (a payment in every minute of the last
//!    day), by DynamoDB's sizing rules from the items as stored (`request_log::capacity`), and
//!    the ceiling it implies under one partition's ~1,000 write and ~3,000 read units a second.
//! 2. Reserve attempts and window retries per payment for 10, 50 and 100 concurrent payments
//!    of one agent, at a minute boundary (every payment's read predates the minute's first
//!    write) and inside an aligned minute.

use std::sync::Arc;
use std::time::Instant;

use agentpay::clock::{Clock, ManualClock, Timestamp};
use agentpay::money::AtomicAmount;
use agentpay::policy::SpendPolicy;
use agentpay::provider::dev_wallet::DevWallet;
use agentpay::samples::execution_input;
use agentpay::steps::{CheckIdempotencyInput, CheckSpendInput, ProcessPaymentInput, RecordLedgerInput};
use agentpay::steps::{StepSettings, Steps};
use agentpay::store::Store;
use agentpay::store::counting::CountingStore;
use agentpay::store::dynamodb::request_log::{Capacity, RequestLog, capacity};
use agentpay::store::dynamodb::{DynamoStore, TableNames, agent_pk, create_table, schema, window_item};
use agentpay::window::{HOUR_SLOTS, MINUTE_SLOTS};

/// One partition's throughput, from DynamoDB's documentation.
const PARTITION_WRITE_UNITS: usize = 1_000;
const PARTITION_READ_UNITS: usize = 3_000;
const AGENT: &str = "hot-agent";

async fn config(endpoint: &str, log: Option<&RequestLog>) -> aws_sdk_dynamodb::Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .test_credentials()
        .load()
        .await;
    let mut builder = aws_sdk_dynamodb::config::Builder::from(&shared);
    if let Some(log) = log {
        builder = builder.interceptor(log.interceptor());
    }
    aws_sdk_dynamodb::Client::from_conf(builder.build())
}

async fn fresh_store(client: &aws_sdk_dynamodb::Client) -> Arc<DynamoStore> {
    let id = alloy_primitives::hex::encode(rand::random::<[u8; 4]>());
    let tables = TableNames { idempotency: format!("bench-idem-{id}"), ledger: format!("bench-ledger-{id}") };
    create_table(client, &tables.idempotency, schema::IDEMPOTENCY).await.unwrap();
    create_table(client, &tables.ledger, schema::LEDGER).await.unwrap();
    let store = Arc::new(DynamoStore::new(client.clone(), tables));
    let policy: SpendPolicy = serde_json::from_value(serde_json::json!({
        "perTransactionLimitUsd": "1", "dailyLimitUsd": "100000", "maxTransactionsPerHour": 1_000_000,
        "allowedNetworks": ["eip155:84532"]
    }))
    .unwrap();
    store.put_policy(AGENT, &policy).await.unwrap();
    store
}

fn steps(store: Arc<dyn Store>, wallet_store: Arc<DynamoStore>, clock: Arc<ManualClock>) -> Arc<Steps> {
    let wallet = DevWallet::from_hex_key(&DevWallet::generate_hex_key(), wallet_store, clock.clone()).unwrap();
    let settings = StepSettings { ledger_attempts: 500, ..StepSettings::default() };
    Arc::new(Steps::new(store, Arc::new(wallet), clock, settings))
}

/// A whole happy-path payment through the steps.
async fn pay(steps: &Steps, key: &str) {
    let request = execution_input(key, AGENT, "1000");
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
    steps.record_ledger(RecordLedgerInput { request, execution_id, claim, reservation, proof }).await.unwrap();
}

async fn measured_payment(endpoint: &str, full_window: bool) -> Capacity {
    let log = RequestLog::default();
    let logged = config(endpoint, Some(&log)).await;
    let plain = config(endpoint, None).await;
    let store = fresh_store(&logged).await;
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_800_000_000_000)));
    let steps = steps(store.clone(), store.clone(), clock.clone());
    pay(&steps, "warm-up").await;
    if full_window {
        let mut window = store.agent_ledger(AGENT).await.unwrap().window.rolled(clock.now());
        window.hours = vec![AtomicAmount::new(60_000).unwrap(); HOUR_SLOTS];
        window.minutes = vec![1; MINUTE_SLOTS];
        window.spent = AtomicAmount::new(60_000 * HOUR_SLOTS as u64).unwrap();
        window.count = MINUTE_SLOTS as u32;
        let item = window_item::item(agent_pk(AGENT), &window);
        plain.put_item().table_name(&store.tables().ledger).set_item(Some(item)).send().await.unwrap();
    }
    log.clear();
    pay(&steps, "measured").await;
    let hot = format!("AGENT#{AGENT}");
    let store_requests: Vec<_> = log
        .requests()
        .into_iter()
        .filter(|r| !r.writes.iter().chain(&r.reads).any(|i| i.partition().starts_with("PROOF#")))
        .collect();
    capacity(&plain, &store_requests, &hot).await
}

async fn contention(endpoint: &str, concurrency: usize, aligned: bool) -> (f64, f64) {
    let client = config(endpoint, None).await;
    let store = fresh_store(&client).await;
    let counting = Arc::new(CountingStore::new(store.clone()));
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_800_000_000_000)));
    let steps = steps(counting.clone(), store.clone(), clock);
    if aligned {
        // Another payment wrote this minute's window already.
        pay(&steps, "aligns-the-minute").await;
    }
    counting.reset();
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let steps = steps.clone();
            tokio::spawn(async move {
                let request = execution_input(&format!("hot-{i}"), AGENT, "1000");
                let execution_id = format!("exec-hot-{i}");
                let claim = steps
                    .check_idempotency(CheckIdempotencyInput {
                        request: request.clone(),
                        execution_id: execution_id.clone(),
                    })
                    .await
                    .unwrap();
                steps.check_spend(CheckSpendInput { request, execution_id, claim }).await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let _ = started.elapsed();
    let reserves = counting.calls().get("reserve").copied().unwrap_or(0) as f64;
    let payments = concurrency as f64;
    (reserves / payments, (reserves - payments) / payments)
}

#[tokio::main]
async fn main() {
    let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL_DYNAMODB") else {
        eprintln!("set AWS_ENDPOINT_URL_DYNAMODB to a DynamoDB-compatible endpoint (see the file's doc comment)");
        std::process::exit(2);
    };
    println!("one hot agent on DynamoDB ({endpoint})");
    println!("capacity per happy-path payment (store requests; the dev wallet's journal excluded):");
    for (label, full) in [("idle window", false), ("full window", true)] {
        let c = measured_payment(&endpoint, full).await;
        println!(
            "  {label}: agent partition {} write units, {} read units; all tables {} write units, {} read units",
            c.hot_write_units, c.hot_read_units, c.write_units, c.read_units
        );
        println!(
            "    ceiling for one agent: {} payments/s by writes ({PARTITION_WRITE_UNITS} WCU/s / {}), {} by reads ({PARTITION_READ_UNITS} RCU/s / {})",
            PARTITION_WRITE_UNITS / c.hot_write_units.max(1),
            c.hot_write_units,
            PARTITION_READ_UNITS / c.hot_read_units.max(1),
            c.hot_read_units
        );
    }
    println!("contention: reserve attempts and window retries per payment, concurrent payments of one agent");
    for concurrency in [10usize, 50, 100] {
        let (boundary_attempts, boundary_retries) = contention(&endpoint, concurrency, false).await;
        let (aligned_attempts, aligned_retries) = contention(&endpoint, concurrency, true).await;
        println!(
            "  {concurrency:>3} concurrent: at a minute boundary {boundary_attempts:.2} attempts, {boundary_retries:.2} retries; inside the minute {aligned_attempts:.2} attempts, {aligned_retries:.2} retries"
        );
    }
}
