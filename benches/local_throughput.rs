//! Local end-to-end figures: `cargo bench --bench local_throughput [-- PAYMENTS [CONCURRENCY]]`.
//!
//! Runs demo-style payments (x402 v2 challenge, policy check, dev-wallet signature, ledger
//! commit, history) through the deployed ASL file on a file-backed SQLite store (WAL, every
//! commit synced), from CONCURRENCY workers at once (default 1, 4, 8, 16 and 32), all for one
//! agent, on a two-thread runtime, with the CLI's allocator, and reports throughput, p50/p99
//! latency, store round trips per payment, SQLite writes and commits per payment and where the
//! store's writer thread spent its time.
//! Built with the bench profile (opt-level 3), as an embedder's release build.
//! `AGENTPAY_BENCH_DIR=DIR` keeps the store in DIR, to look at what a payment wrote.

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

/// As the CLI runs it (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let numbers: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let payments = numbers.first().copied().unwrap_or(2000);
    let concurrencies = match numbers.get(1) {
        Some(concurrency) => vec![*concurrency],
        None => vec![1, 4, 8, 16, 32],
    };
    let temporary = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("AGENTPAY_BENCH_DIR").map_or_else(|| temporary.path().to_owned(), Into::into);
    let config = Config::local(&dir);
    let sqlite = Arc::new(agentpay::store::sqlite::SqliteStore::open(&dir.join("agentpay.db")).unwrap());
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
    let runner = Arc::new(runner);
    let file = dir.join("agentpay.db");
    println!(
        "local end-to-end payments (SQLite file store, WAL, every commit synced, dev wallet, ASL interpreted, one agent)"
    );
    for concurrency in concurrencies {
        counting.reset();
        let commits_before = sqlite.commit_stats();
        let io_before = ProcessIo::now();
        let bytes_before = store_bytes(&file);
        let started = Instant::now();
        let workers: Vec<_> = (0..concurrency)
            .map(|worker| {
                let runner = runner.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    for i in (worker..payments).step_by(concurrency) {
                        let key = format!("bench-{concurrency}-{i}");
                        let begin = Instant::now();
                        let record = runner
                            .start(&execution_name(&key, None), execution_input(&key, "bench-agent", "1000"))
                            .await
                            .unwrap();
                        latencies.push(begin.elapsed());
                        assert_eq!(record.status, ExecutionStatus::Succeeded, "{record:?}");
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::with_capacity(payments);
        for worker in workers {
            latencies.extend(worker.await.unwrap());
        }
        let elapsed = started.elapsed();
        latencies.sort();
        let pick = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
        println!(
            "  {concurrency:>3} at once: {payments} payments, {:.0} payments/s, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.2} store round trips per payment",
            payments as f64 / elapsed.as_secs_f64(),
            pick(0.50).as_secs_f64() * 1000.0,
            pick(0.99).as_secs_f64() * 1000.0,
            latencies[latencies.len() - 1].as_secs_f64() * 1000.0,
            counting.total() as f64 / payments as f64,
        );
        // Issue 14's target for the local runner on 2 cores.
        let (rate, p99_ms) = (payments as f64 / elapsed.as_secs_f64(), pick(0.99).as_secs_f64() * 1000.0);
        let met = rate >= 1000.0 && p99_ms <= 20.0;
        println!(
            "       target (at least 1,000 payments/s with p99 at most 20 ms): {}",
            if met { "met" } else { "not met" }
        );
        let stats = sqlite.commit_stats();
        let (writes, commits) = (stats.writes - commits_before.writes, stats.commits - commits_before.commits);
        let per_payment = |time: std::time::Duration| time.as_secs_f64() * 1000.0 / payments as f64;
        println!(
            "       writer thread {:.3} ms per payment running writes, {:.3} ms committing",
            per_payment(stats.write_time - commits_before.write_time),
            per_payment(stats.commit_time - commits_before.commit_time),
        );
        println!(
            "       SQLite: {:.1} writes and {:.2} commits (fsyncs) per payment, {:.1} writes per commit; the file grew {:.1} KB per payment",
            writes as f64 / payments as f64,
            commits as f64 / payments as f64,
            writes as f64 / commits.max(1) as f64,
            (store_bytes(&file) - bytes_before) as f64 / 1024.0 / payments as f64,
        );
        if let (Some(before), Some(after)) = (io_before, ProcessIo::now()) {
            let count_per_payment = |a: u64, b: u64| (a - b) as f64 / payments as f64;
            println!(
                "       process I/O per payment: {:.1} read and {:.1} write syscalls, {:.1} KB read and {:.1} KB written through them, {:.1} KB sent to disk; {:.2} ms CPU",
                count_per_payment(after.syscr, before.syscr),
                count_per_payment(after.syscw, before.syscw),
                count_per_payment(after.rchar, before.rchar) / 1024.0,
                count_per_payment(after.wchar, before.wchar) / 1024.0,
                count_per_payment(after.write_bytes, before.write_bytes) / 1024.0,
                count_per_payment(after.cpu_ticks, before.cpu_ticks) * 1000.0 / 100.0,
            );
        }
    }
}

/// The process's I/O and CPU so far, from /proc (Linux): work counts that do not depend on how
/// fast the machine is at the moment, unlike the timings.
struct ProcessIo {
    syscr: u64,
    syscw: u64,
    rchar: u64,
    wchar: u64,
    write_bytes: u64,
    /// User and system time, in clock ticks (100 a second on Linux).
    cpu_ticks: u64,
}

impl ProcessIo {
    fn now() -> Option<Self> {
        let io = std::fs::read_to_string("/proc/self/io").ok()?;
        let field =
            |name: &str| io.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(": ")?.trim().parse().ok());
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command's closing parenthesis; utime and stime are the 14th and 15th.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks = |index: usize| fields.get(index - 3)?.parse::<u64>().ok();
        Some(Self {
            syscr: field("syscr")?,
            syscw: field("syscw")?,
            rchar: field("rchar")?,
            wchar: field("wchar")?,
            write_bytes: field("write_bytes")?,
            cpu_ticks: ticks(14)? + ticks(15)?,
        })
    }
}

/// The store file and its WAL, in bytes.
fn store_bytes(file: &std::path::Path) -> i64 {
    let size = |path: std::path::PathBuf| std::fs::metadata(path).map_or(0, |m| m.len() as i64);
    size(file.to_path_buf()) + size(file.with_extension("db-wal"))
}
