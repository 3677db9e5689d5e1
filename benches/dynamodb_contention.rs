//! Optimistic-lock contention on one agent's ledger item in DynamoDB.
//!
//! `AWS_ENDPOINT_URL_DYNAMODB=http://127.0.0.1:PORT cargo bench --bench dynamodb_contention`
//! (a DynamoDB-compatible server such as moto's; real DynamoDB works with real tables too).
//! For 10 and 50 concurrent payments of one agent: reserve attempts per payment, conflict
//! retries per payment, and requests per payment through the spend check.

use std::sync::Arc;
use std::time::Instant;

use agentpay::clock::SystemClock;
use agentpay::policy::SpendPolicy;
use agentpay::provider::dev_wallet::DevWallet;
use agentpay::samples::execution_input;
use agentpay::steps::{CheckIdempotencyInput, CheckSpendInput, StepSettings, Steps};
use agentpay::store::Store;
use agentpay::store::counting::CountingStore;
use agentpay::store::dynamodb::{DynamoStore, TableNames, create_table, schema};

#[tokio::main]
async fn main() {
    let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL_DYNAMODB") else {
        eprintln!("set AWS_ENDPOINT_URL_DYNAMODB to a DynamoDB-compatible endpoint (see the file's doc comment)");
        std::process::exit(2);
    };
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .test_credentials()
        .load()
        .await;
    let client = aws_sdk_dynamodb::Client::new(&config);
    println!("conflict retries on one agent's ledger item (DynamoDB, optimistic lock + jittered backoff)");
    for concurrency in [10usize, 50] {
        let id = alloy_primitives::hex::encode(rand::random::<[u8; 4]>());
        let tables = TableNames { idempotency: format!("bench-idem-{id}"), ledger: format!("bench-ledger-{id}") };
        create_table(&client, &tables.idempotency, schema::IDEMPOTENCY).await.unwrap();
        create_table(&client, &tables.ledger, schema::LEDGER).await.unwrap();
        let dynamo = Arc::new(DynamoStore::new(client.clone(), tables));
        let policy: SpendPolicy = serde_json::from_value(serde_json::json!({
            "perTransactionLimitUsd": "1", "dailyLimitUsd": "1000", "maxTransactionsPerHour": 100000,
            "allowedNetworks": ["eip155:84532"]
        }))
        .unwrap();
        dynamo.put_policy("hot-agent", &policy).await.unwrap();
        let counting = Arc::new(CountingStore::new(dynamo.clone()));
        let clock = Arc::new(SystemClock);
        let wallet = DevWallet::from_hex_key(&DevWallet::generate_hex_key(), dynamo.clone(), clock.clone()).unwrap();
        let settings = StepSettings { ledger_attempts: 500, ..StepSettings::default() };
        let steps = Arc::new(Steps::new(counting.clone(), Arc::new(wallet), clock, settings));

        let started = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|i| {
                let steps = steps.clone();
                tokio::spawn(async move {
                    let request = execution_input(&format!("hot-{i}"), "hot-agent", "1000");
                    let execution_id = format!("exec-{i}");
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
        let elapsed = started.elapsed();
        let calls = counting.calls();
        let reserves = calls.get("reserve").copied().unwrap_or(0) as f64;
        let payments = concurrency as f64;
        println!(
            "  {concurrency:>3} concurrent: {:.2} reserve attempts/payment, {:.2} conflict retries/payment, {:.2} store requests/payment, all reserved in {:.0} ms",
            reserves / payments,
            (reserves - payments) / payments,
            counting.total() as f64 / payments,
            elapsed.as_secs_f64() * 1000.0
        );
    }
}
