//! Local end-to-end figures: `cargo bench --bench local_throughput [-- PAYMENTS]`.
//!
//! Runs demo-style payments (x402 v2 challenge, policy check, dev-wallet signature, ledger
//! commit, history) through the deployed ASL file on a file-backed SQLite store, one after
//! another, and reports throughput, p50/p99 latency and store round trips per payment.

use std::sync::Arc;
use std::time::Instant;

use agentpay::asl::{LocalRunner, PAYMENT_DEFINITION, TokioSleeper};
use agentpay::client::naming::execution_name;
use agentpay::clock::SystemClock;
use agentpay::config::Config;
use agentpay::executions::ExecutionStatus;
use agentpay::policy::SpendPolicy;
use agentpay::samples::execution_input;
use agentpay::steps::{StepSettings, Steps};
use agentpay::store::Store;
use agentpay::store::counting::CountingStore;

#[tokio::main]
async fn main() {
    let payments: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(2000);
    let dir = tempfile::tempdir().unwrap();
    let config = Config::local(dir.path());
    let sqlite = Arc::new(agentpay::store::sqlite::SqliteStore::open(&dir.path().join("agentpay.db")).unwrap());
    let clock = Arc::new(SystemClock);
    let wallet = Arc::new(config.dev_wallet(sqlite.clone(), clock.clone()).await.unwrap());
    let counting = Arc::new(CountingStore::new(sqlite.clone()));
    let steps = Steps::new(counting.clone(), wallet, clock, StepSettings::default());
    let runner = LocalRunner::new(
        PAYMENT_DEFINITION,
        Arc::new(steps.clone()),
        steps.clock().clone(),
        sqlite.clone(),
        Arc::new(TokioSleeper),
    )
    .unwrap();

    let policy: SpendPolicy = serde_json::from_value(serde_json::json!({
        "perTransactionLimitUsd": "1", "dailyLimitUsd": "1000000", "maxTransactionsPerHour": 4_000_000_000u32,
        "allowedNetworks": ["eip155:84532"]
    }))
    .unwrap();
    sqlite.put_policy("bench-agent", &policy).await.unwrap();
    counting.reset();

    let mut latencies = Vec::with_capacity(payments);
    let started = Instant::now();
    for i in 0..payments {
        let key = format!("bench-{i}");
        let begin = Instant::now();
        let record =
            runner.start(&execution_name(&key, None), execution_input(&key, "bench-agent", "1000")).await.unwrap();
        latencies.push(begin.elapsed());
        assert_eq!(record.status, ExecutionStatus::Succeeded, "{record:?}");
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!("local end-to-end payments (SQLite file store, dev wallet, ASL interpreted)");
    println!("  payments      {payments}");
    println!("  throughput    {:.0} payments/s", payments as f64 / elapsed.as_secs_f64());
    println!("  latency p50   {:.2} ms", pick(0.50).as_secs_f64() * 1000.0);
    println!("  latency p99   {:.2} ms", pick(0.99).as_secs_f64() * 1000.0);
    println!("  latency max   {:.2} ms", latencies[latencies.len() - 1].as_secs_f64() * 1000.0);
    println!(
        "  store round trips per payment: {:.2}  ({:?})",
        counting.total() as f64 / payments as f64,
        counting.calls()
    );
}
