//! The replay of a policy backtest over many recorded requests: `cargo bench --bench backtest
//! [-- N]` (default 100,000). The requests are made up (an agent paying a few payees, seconds
//! to minutes apart, some above the approval threshold or the cap) and replayed against a
//! policy with every check on: caps, rate, approval threshold and deviation. Reading them from
//! a store is one listing of the agent's reservations and audit events; the reconcile_sweep
//! bench times that part on both stores.

use std::time::Instant;

use agentpay::backtest::{RecordedRequest, backtest};
use agentpay::clock::Timestamp;
use agentpay::money::AtomicAmount;
use agentpay::payment::Network;
use agentpay::policy::SpendPolicy;
use agentpay::shadow::ShadowVerdict;
use rand::{Rng, SeedableRng};

fn main() {
    let count: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(100_000);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let payees: Vec<String> = (1..=5u8).map(|i| format!("0x{}", format!("{i:02x}").repeat(20))).collect();
    let asset = Network::BaseSepolia.usdc().address.to_checksum(None);
    let mut at = 1_790_000_000_000i64;
    let requests: Vec<RecordedRequest> = (0..count)
        .map(|n| {
            at += rng.random_range(1_000..600_000);
            RecordedRequest {
                at: Timestamp::from_millis(at),
                idempotency_key: format!("bench-{n}"),
                amount: AtomicAmount::new(rng.random_range(10_000..1_200_000)).unwrap(),
                network: Network::BaseSepolia,
                asset: asset.clone(),
                payee: payees[rng.random_range(0..payees.len())].clone(),
                category: None,
                recorded: ShadowVerdict::WouldPay,
                recorded_error: None,
                shadow: false,
                paid: true,
            }
        })
        .collect();
    let draft: SpendPolicy = serde_json::from_value(serde_json::json!({
        "perTransactionLimitUsd": "1", "dailyLimitUsd": "50", "maxTransactionsPerHour": 30,
        "approvalThresholdUsd": "0.80", "allowedNetworks": ["eip155:84532"],
        "deviation": {"multiplier": "3", "lookbackDays": 30, "minPayments": 5}
    }))
    .unwrap();
    let started = Instant::now();
    let report = backtest("bench-agent", &draft, &requests).unwrap();
    let elapsed = started.elapsed();
    println!(
        "backtest of {count} recorded requests ({} days): {:.0} ms, {:.2} µs a request; the draft allows {}, sends {} to a person, denies {}, flags {} deviations",
        report.days.len(),
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e6 / count as f64,
        report.draft.allowed,
        report.draft.approvals,
        report.draft.denied,
        report.deviations_flagged
    );
}
