//! A Rust agent meeting a 402: `cargo run --example agent_on_402`.
//!
//! The "resource server" answers with an x402 v2 challenge; the agent turns it into a payment
//! execution, waits for the outcome and retries with the header it gets back. With
//! `AGENTPAY_STATE_MACHINE_ARN` set it uses the deployed state machine (AWS configuration
//! chain); otherwise the local runner in `.agentpay-example/`.

use std::sync::Arc;

use agentpay::asl::TokioSleeper;
use agentpay::client::entry_point::EntryPointStarter;
use agentpay::client::sfn::SfnBackend;
use agentpay::client::{PaymentAnswer, PaymentClient, WaitOptions};
use agentpay::clock::SystemClock;
use agentpay::config::Config;
use agentpay::local::LocalApp;
use agentpay::samples::{SAMPLE_RESOURCE, v2_payment_required};
use agentpay::x402::encode_v2_header;
use serde_json::json;

/// Stands in for the paid API: 402 with a PAYMENT-REQUIRED header until paid.
fn fetch(payment: Option<(&str, &str)>) -> Result<String, String> {
    match payment {
        Some((name, value)) => Ok(format!("200 OK (sent {name}: {}…)", &value[..24])),
        None => Err(encode_v2_header(&v2_payment_required("10000"))),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = match std::env::var("AGENTPAY_STATE_MACHINE_ARN") {
        Ok(arn) => {
            // On AWS an agent starts payments through the entry point (the stack output
            // StartPaymentUrl), signed with its role's credentials; the state machine is read
            // for status and history.
            let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let url = std::env::var("AGENTPAY_ENTRY_POINT_URL").map_err(|_| "set AGENTPAY_ENTRY_POINT_URL too")?;
            let backend = SfnBackend::new(aws_sdk_sfn::Client::new(&aws), arn)
                .with_entry_point(EntryPointStarter::new(&url, &aws)?);
            PaymentClient::new(Box::new(backend))
        }
        Err(_) => {
            let dir = std::path::Path::new(".agentpay-example");
            let app = LocalApp::open(&Config::local(dir), dir, Arc::new(SystemClock), Arc::new(TokioSleeper)).await?;
            let policy = serde_json::from_str(&std::fs::read_to_string("events/policy-demo-agent.json")?)?;
            app.store.put_policy("demo-agent", &policy).await?;
            app.client()
        }
    };

    let Err(payment_required) = fetch(None) else { return Ok(()) };
    let input = json!({
        "idempotencyKey": "example-task-17-credit-report",
        "agentId": "demo-agent",
        "userId": "user-7",
        "challenge": {"x402": payment_required},
        "resource": SAMPLE_RESOURCE,
        "context": {"decision": "credit check before approving invoice INV-1042",
                    "delegatedBy": "alice@example.com", "scope": "invoices:approve<=50USD"}
    });
    let started = client.start(&input, Some(WaitOptions::default())).await?;
    match started.answer {
        PaymentAnswer::Paid { header, payment_id, from_cache } => {
            println!("paid ({payment_id}, from cache: {from_cache}); retrying");
            println!("{}", fetch(Some((&header.name, &header.value)))?);
        }
        PaymentAnswer::Denied { error, cause } | PaymentAnswer::Failed { error, cause } => {
            println!("not paid: {error}: {cause}");
        }
        PaymentAnswer::Shadow { decision, .. } => {
            println!("shadow mode, nothing paid: the policy {}", decision.describe())
        }
        PaymentAnswer::Running => println!("still running: poll `agentpay status {}`", started.execution.name),
        PaymentAnswer::AwaitingApproval { approval_id } => {
            println!("waits for a person: `agentpay approve {approval_id}` (or reject), then poll `agentpay status`")
        }
    }
    Ok(())
}
