//! Client figures on the local backend: `cargo bench --bench client_local [-- N]`.
//!
//! 1. `start --wait` of a happy-path payment, N times (p50/p99).
//! 2. N payments that fail at RecordLedger (ledger writes failing past the retries), then one
//!    bulk replay that redrives them all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentpay::asl::RecordingSleeper;
use agentpay::client::{ListFilter, ReplayAction, ReplayOptions, WaitOptions};
use agentpay::clock::{Clock, SystemClock};
use agentpay::config::Config;
use agentpay::local::LocalApp;
use agentpay::policy::SpendPolicy;
use agentpay::samples::execution_input;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let app = LocalApp::open(
        &Config::local(dir.path()),
        dir.path(),
        Arc::new(SystemClock),
        Arc::new(RecordingSleeper::default()),
    )
    .await
    .unwrap();
    let policy: SpendPolicy = serde_json::from_value(serde_json::json!({
        "perTransactionLimitUsd": "1", "dailyLimitUsd": "1000000", "maxTransactionsPerHour": 4_000_000_000u32,
        "allowedNetworks": ["eip155:84532"]
    }))
    .unwrap();
    app.store.put_policy("bench-agent", &policy).await.unwrap();
    let client = app.client();

    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let input = execution_input(&format!("start-{i}"), "bench-agent", "1000");
        let begin = Instant::now();
        let started = client.start(&input, Some(WaitOptions::default())).await.unwrap();
        latencies.push(begin.elapsed());
        assert_eq!(started.execution.status, "SUCCEEDED");
    }
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!("start --wait, local backend (SQLite file store, dev wallet, {n} payments)");
    println!("  p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms", ms(pick(0.5)), ms(pick(0.99)), ms(latencies[n - 1]));

    let since = SystemClock.now();
    let failing = Instant::now();
    for i in 0..n {
        app.ledger.fail_next_authorizations(5);
        let started = client.start(&execution_input(&format!("fail-{i}"), "bench-agent", "1000"), None).await.unwrap();
        assert_eq!(started.execution.status, "FAILED");
    }
    println!("  {n} executions failed at RecordLedger in {:.1} s", failing.elapsed().as_secs_f64());
    let calls_before = app.provider.delegated_calls();
    let begin = Instant::now();
    let replays = client
        .replay_all(
            &ListFilter { since: Some(since), ..Default::default() },
            SystemClock.now(),
            ReplayOptions::default(),
            |_, _, _| {},
        )
        .await
        .unwrap();
    let elapsed = begin.elapsed();
    let redriven = replays.iter().filter(|r| r.action == ReplayAction::Redriven).count();
    let succeeded = replays.iter().filter(|r| r.result.as_ref().is_some_and(|e| e.status == "SUCCEEDED")).count();
    println!("bulk replay of {n} failed executions");
    println!(
        "  {redriven} redriven, {succeeded} succeeded in {:.2} s ({:.0} replays/s, {:.2} ms each)",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        ms(elapsed) / n as f64
    );
    println!(
        "  provider calls during the replay: {} (no second payment)",
        app.provider.delegated_calls() - calls_before
    );
}
