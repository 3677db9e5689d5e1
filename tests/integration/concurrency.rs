//! Concurrent executions against one agent and one key.

use std::sync::Arc;

use agentpay::executions::ExecutionStatus;
use agentpay::samples::execution_input;
use agentpay::store::ReservationStatus;

use crate::helpers::{TestApp, policy};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_payments_never_exceed_the_cap() {
    const AGENT: &str = "busy-agent";
    // 0.10 USDC each; the daily cap allows exactly 17 of them.
    let t = Arc::new(TestApp::with_policy(AGENT, policy("1.00", "1.70", 1000)).await);
    let runs = (0..50).map(|i| {
        let t = t.clone();
        tokio::spawn(async move { t.run(execution_input(&format!("c-{i}"), AGENT, "100000")).await })
    });
    let records: Vec<_> = futures_join(runs).await;
    let succeeded = records.iter().filter(|r| r.status == ExecutionStatus::Succeeded).count();
    let denied: Vec<_> = records.iter().filter_map(|r| r.error.as_ref()).collect();
    assert_eq!(succeeded, 17);
    assert_eq!(denied.len(), 33);
    assert!(denied.iter().all(|e| e.error == "SpendLimitExceeded"), "{denied:?}");

    let reservations = t.app.store.reservations(AGENT).await.unwrap();
    let authorized: u64 = reservations
        .iter()
        .filter(|r| matches!(r.status, ReservationStatus::Authorized | ReservationStatus::Reserved))
        .map(|r| r.amount.get())
        .sum();
    assert_eq!(authorized, 1_700_000);
    assert_eq!(t.app.provider.delegated_calls(), 17);
    let ledger = t.app.store.agent_ledger(AGENT).await.unwrap();
    assert_eq!(ledger.window.spent.get(), 1_700_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_executions_of_one_key_issue_one_proof() {
    const AGENT: &str = "retry-agent";
    let t = Arc::new(TestApp::with_policy(AGENT, policy("1.00", "5.00", 1000)).await);
    let runs = (0..20).map(|_| {
        let t = t.clone();
        tokio::spawn(async move { t.run(execution_input("same-key", AGENT, "10000")).await })
    });
    let records: Vec<_> = futures_join(runs).await;
    assert_eq!(t.app.provider.delegated_calls(), 1, "exactly one proof issued");
    let payment_ids: std::collections::HashSet<_> =
        records.iter().filter_map(|r| r.output.as_ref()).map(|o| o["paymentId"].clone()).collect();
    assert_eq!(payment_ids.len(), 1, "every success carries the same payment");
    // The others saw the payment in flight, or its cached result once it completed.
    for record in &records {
        match record.status {
            ExecutionStatus::Succeeded => {}
            _ => assert_eq!(record.error.as_ref().unwrap().error, "PaymentInFlight"),
        }
    }
    assert_eq!(t.app.store.reservations(AGENT).await.unwrap().len(), 1);
}

async fn futures_join<T: Send + 'static>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}
