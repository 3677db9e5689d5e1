//! A reconciliation sweep over many payments: `cargo bench --bench reconcile_sweep [-- N]`
//! (N payments per store, default 10,000), on SQLite and, when `AWS_ENDPOINT_URL_DYNAMODB` names
//! a DynamoDB-compatible endpoint (moto's server, or real DynamoDB), on DynamoDB with
//! `AGENTPAY_SWEEP_DYNAMODB_PAYMENTS` of them (default N; moto's server slows as its tables grow,
//! to about a dozen requests a second past 20,000 items, so a run against it uses fewer).
//!
//! The payments are made through the steps by 10 agents (one in a hundred stops after
//! CheckSpend, as if its execution died before ProcessPayment). Two days later, with no chain
//! endpoint, the first sweep moves every expired authorization to EXPIRED_UNCONFIRMED and
//! releases the dead executions' reservations; the second finds nothing to change (the steady
//! state of an hourly schedule). Both are timed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentpay::clock::{ManualClock, Timestamp};
use agentpay::error::PaymentError;
use agentpay::policy::SpendPolicy;
use agentpay::provider::IssuedProofs;
use agentpay::provider::dev_wallet::DevWallet;
use agentpay::reconcile::{ExecutionFate, ExecutionLookup, Reconciler};
use agentpay::samples::execution_input;
use agentpay::settlements::NoChain;
use agentpay::steps::{CheckIdempotencyInput, CheckSpendInput, ProcessPaymentInput, RecordLedgerInput};
use agentpay::steps::{StepSettings, Steps};
use agentpay::store::Store;
use agentpay::store::dynamodb::{DynamoStore, TableNames, create_table, schema};
use agentpay::store::sqlite::SqliteStore;

const AGENTS: usize = 10;
/// One payment in this many stops after CheckSpend.
const DIES_EVERY: usize = 100;

/// Every execution ended before ProcessPayment (the bench's dead ones are exactly those).
struct EndedBeforePaying;

#[async_trait::async_trait]
impl ExecutionLookup for EndedBeforePaying {
    async fn fate(&self, _: &str) -> Result<ExecutionFate, PaymentError> {
        Ok(ExecutionFate::Ended { status: "FAILED".into(), entered_process_payment: false })
    }
    async fn ask_again(&self, _: &str) -> Result<String, PaymentError> {
        unreachable!("no outcome is unknown in this bench")
    }
}

fn agent(i: usize) -> String {
    format!("sweep-agent-{i}")
}

async fn seed(store: Arc<dyn Store>, proofs: Arc<dyn IssuedProofs>, clock: Arc<ManualClock>, payments: usize) {
    let policy: SpendPolicy = serde_json::from_value(serde_json::json!({
        "perTransactionLimitUsd": "1", "dailyLimitUsd": "1000000", "maxTransactionsPerHour": 1_000_000,
        "allowedNetworks": ["eip155:84532"]
    }))
    .unwrap();
    for i in 0..AGENTS {
        store.put_policy(&agent(i), &policy).await.unwrap();
    }
    let wallet = DevWallet::from_hex_key(&DevWallet::generate_hex_key(), proofs, clock.clone()).unwrap();
    let steps = Arc::new(Steps::new(store, Arc::new(wallet), clock, StepSettings::default()));
    let per_agent = payments / AGENTS;
    let tasks: Vec<_> = (0..AGENTS)
        .map(|a| {
            let steps = steps.clone();
            tokio::spawn(async move {
                for n in 0..per_agent {
                    pay(&steps, &agent(a), &format!("sweep-{a}-{n}"), n % DIES_EVERY == DIES_EVERY - 1).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

async fn pay(steps: &Steps, agent: &str, key: &str, dies: bool) {
    let request = execution_input(key, agent, "1000");
    let execution_id = format!("exec-{key}");
    let claim = steps
        .check_idempotency(CheckIdempotencyInput { request: request.clone(), execution_id: execution_id.clone() })
        .await
        .unwrap();
    let spend = CheckSpendInput { request: request.clone(), execution_id: execution_id.clone(), claim: claim.clone() };
    let reservation = steps.check_spend(spend).await.unwrap();
    if dies {
        return;
    }
    let order = ProcessPaymentInput {
        request: request.clone(),
        execution_id: execution_id.clone(),
        claim: claim.clone(),
        reservation: reservation.clone(),
        retry_count: 0,
    };
    let proof = steps.process_payment(order).await.unwrap();
    steps.record_ledger(RecordLedgerInput { request, execution_id, claim, reservation, proof }).await.unwrap();
}

/// Sweeps every agent; the time, and the payments changed.
async fn sweep(store: Arc<dyn Store>, clock: Arc<ManualClock>) -> (Duration, usize) {
    let reconciler = Reconciler::new(store.clone(), clock, Duration::from_secs(24 * 3600));
    let started = Instant::now();
    let mut changed = 0;
    for agent in store.agents().await.unwrap() {
        changed += reconciler.agent(&agent, &NoChain, &EndedBeforePaying, false).await.unwrap().changes.len();
    }
    (started.elapsed(), changed)
}

/// Seeds `payments`, then times two sweeps and a backtest's read and replay.
async fn measure(label: &str, store: Arc<dyn Store>, proofs: Arc<dyn IssuedProofs>, payments: usize) {
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_800_000_000_000)));
    let started = Instant::now();
    seed(store.clone(), proofs, clock.clone(), payments).await;
    println!("  {label}: {payments} payments by {AGENTS} agents made in {:.1} s", started.elapsed().as_secs_f64());
    clock.advance(Duration::from_secs(2 * 24 * 3600));
    let (first, changed) = sweep(store.clone(), clock.clone()).await;
    println!(
        "    first sweep (every authorization expired, dead executions' reservations): {changed} changed in {:.2} s",
        first.as_secs_f64()
    );
    let (second, unchanged) = sweep(store.clone(), clock).await;
    println!("    second sweep (nothing left to change): {unchanged} changed in {:.2} s", second.as_secs_f64());
    // The backtest's read of the same history: every agent's requests, then the replay.
    let draft: SpendPolicy = serde_json::from_value(serde_json::json!({
        "perTransactionLimitUsd": "0.0005", "dailyLimitUsd": "1000000", "maxTransactionsPerHour": 1_000_000,
        "allowedNetworks": ["eip155:84532"]
    }))
    .unwrap();
    let started = Instant::now();
    let mut replayed = 0;
    for i in 0..AGENTS {
        let since = Timestamp::from_millis(0);
        let requests = agentpay::backtest::recorded_requests(store.as_ref(), &agent(i), since).await.unwrap().requests;
        replayed += agentpay::backtest::backtest(&agent(i), &draft, &requests).unwrap().recorded.requests;
    }
    println!(
        "    backtest of a draft over the {replayed} recorded requests (read and replay): {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let payments: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10_000);
    println!("reconciliation sweep over {payments} payments");
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Arc::new(SqliteStore::open(&dir.path().join("sweep.db")).unwrap());
    measure("SQLite", sqlite.clone(), sqlite, payments).await;
    match std::env::var("AWS_ENDPOINT_URL_DYNAMODB") {
        Err(_) => {
            println!("  DynamoDB: not measured (set AWS_ENDPOINT_URL_DYNAMODB to a DynamoDB-compatible endpoint)")
        }
        Ok(endpoint) => {
            let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .endpoint_url(&endpoint)
                .region(aws_config::Region::new("us-east-1"))
                .test_credentials()
                .load()
                .await;
            let client = aws_sdk_dynamodb::Client::new(&config);
            let id = alloy_primitives::hex::encode(rand::random::<[u8; 4]>());
            let tables = TableNames { idempotency: format!("sweep-idem-{id}"), ledger: format!("sweep-ledger-{id}") };
            create_table(&client, &tables.idempotency, schema::IDEMPOTENCY).await.unwrap();
            create_table(&client, &tables.ledger, schema::LEDGER).await.unwrap();
            let store = Arc::new(DynamoStore::new(client, tables));
            let payments =
                std::env::var("AGENTPAY_SWEEP_DYNAMODB_PAYMENTS").ok().and_then(|n| n.parse().ok()).unwrap_or(payments);
            measure(&format!("DynamoDB ({endpoint})"), store.clone(), store, payments).await;
        }
    }
}
