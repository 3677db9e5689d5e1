//! The AgentCore provider's own cost: `cargo bench --bench agentcore_provider [-- CALLS]`.
//!
//! The real SDK client calls the test emulator on loopback; each call has a fresh client token
//! (a new proof). A raw HTTP round trip to the same emulator with the same body is measured as
//! the baseline, so the difference is what the provider path adds: request building, SigV4
//! signing, SDK serialisation and parsing, response checks and header construction.

#[path = "../tests/integration/agentcore_emulator.rs"]
#[allow(dead_code)]
mod agentcore_emulator;

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentpay::clock::SystemClock;
use agentpay::policy::SpendPolicy;
use agentpay::provider::agentcore::AgentCoreProvider;
use agentpay::provider::{PaymentOrder, PaymentProvider};
use agentpay::request::{PaymentRequest, derived_id};
use agentpay::samples::{agentcore_block, execution_input};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let calls: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(2000);
    let emulator = agentcore_emulator::AgentCoreEmulator::start().await;
    let provider = AgentCoreProvider::from_sdk_config(&emulator.sdk_config().await, Arc::new(SystemClock));
    let policy: SpendPolicy = serde_json::from_value(serde_json::json!({
        "perTransactionLimitUsd": "1", "dailyLimitUsd": "1000", "maxTransactionsPerHour": 1000,
        "allowedNetworks": ["eip155:84532"]
    }))
    .unwrap();
    let mut input = execution_input("bench-key", "bench-agent", "1000");
    input["agentcore"] = agentcore_block();
    let request = PaymentRequest::parse(&input).unwrap();
    let requirement = request.select_payment(&policy.allowlist(), "bench-agent").unwrap();
    let context = provider.prepare(&request, &policy, &requirement).unwrap();
    let order = |i: usize| PaymentOrder {
        client_token: derived_id("agentpay", &["bench-key", &i.to_string()]),
        requirement: requirement.clone(),
        request: request.clone(),
        context: context.clone(),
    };

    // Warm up the connection pool and the emulator.
    for i in 0..50 {
        provider.process_payment(&order(1_000_000 + i)).await.unwrap();
    }
    let mut sdk = Vec::with_capacity(calls);
    for i in 0..calls {
        let order = order(i);
        let begin = Instant::now();
        provider.process_payment(&order).await.unwrap();
        sdk.push(begin.elapsed());
    }
    let sample_body = emulator.process_payment_calls().last().unwrap().body.to_string();

    // Baseline: the same request as raw HTTP/1.1 on one kept-alive loopback connection.
    let address = emulator.endpoint.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut raw = Vec::with_capacity(calls);
    for i in 0..calls {
        let body = sample_body.replace("agentpay-", &format!("raw{i}-"));
        let request = format!(
            "POST /payments/processPayment HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let begin = Instant::now();
        write.write_all(request.as_bytes()).await.unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut response = vec![0; length];
        reader.read_exact(&mut response).await.unwrap();
        raw.push(begin.elapsed());
    }
    sdk.sort();
    raw.sort();
    println!("AgentCore provider call path, emulator on loopback ({calls} calls each, fresh client token per call)");
    println!(
        "  provider (SDK + checks)   p50 {:>7.1} µs   p99 {:>7.1} µs",
        percentile(&sdk, 0.5),
        percentile(&sdk, 0.99)
    );
    println!(
        "  raw HTTP round trip       p50 {:>7.1} µs   p99 {:>7.1} µs",
        percentile(&raw, 0.5),
        percentile(&raw, 0.99)
    );
    println!(
        "  added by the provider     p50 {:>7.1} µs   p99 {:>7.1} µs",
        percentile(&sdk, 0.5) - percentile(&raw, 0.5),
        percentile(&sdk, 0.99) - percentile(&raw, 0.99)
    );
    println!("  proofs issued by the emulator: {} (one per client token)", emulator.proofs_issued());
}
