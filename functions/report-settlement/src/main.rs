//! Settlement reports as a Lambda behind a function URL with IAM auth: JSON logs, the store
//! and the operators' list built once, then one report checked and recorded per request.

use std::sync::Arc;

use agentpay_core::clock::SystemClock;
use agentpay_core::settlements::Settlements;
use agentpay_lambda::config::LambdaConfig;
use agentpay_lambda::settlement_url::{OPERATORS_VAR, SettlementUrl, operators_from};
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    agentpay_lambda::init_tracing();
    let operators = operators_from(&std::env::var(OPERATORS_VAR).unwrap_or_default())?;
    let (_, store) = LambdaConfig::from_env()?.build_store().await;
    let settlements = Settlements::new(store.clone(), Arc::new(SystemClock));
    let endpoint = SettlementUrl::new(store, settlements, operators);
    let endpoint = &endpoint;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        Ok::<Value, lambda_runtime::Error>(endpoint.handle(&event.payload).await.to_response())
    }))
    .await
}
