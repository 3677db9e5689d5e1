//! The reconciliation sweep as a Lambda on an EventBridge schedule (or invoked with
//! `{"agentId": "...", "dryRun": true}`): JSON logs and EMF metrics, the store, Step Functions
//! and the chain endpoints built once, then one sweep per invocation.

use std::sync::Arc;

use agentpay_chain::JsonRpcChain;
use agentpay_core::clock::SystemClock;
use agentpay_core::reconcile::Reconciler;
use agentpay_lambda::StepError;
use agentpay_lambda::config::LambdaConfig;
use agentpay_lambda::reconcile::{MAX_AGENTS_PER_SWEEP, ReconcileFunction, ReconcileRequest, SfnExecutions};
use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    agentpay_lambda::init_tracing();
    let metrics = agentpay_lambda::init_metrics()?;
    let config = LambdaConfig::from_env()?;
    let chain = JsonRpcChain::from_env()?;
    let (aws, store) = config.build_store().await;
    let function = ReconcileFunction {
        reconciler: Reconciler::new(store.clone(), Arc::new(SystemClock), config.settings.idempotency_ttl),
        store,
        agents_per_sweep: MAX_AGENTS_PER_SWEEP,
        chain: Box::new(chain),
        executions: Box::new(SfnExecutions::new(aws_sdk_sfn::Client::new(&aws))),
    };
    let function = &function;
    let handler = service_fn(move |event: LambdaEvent<Value>| async move {
        let request = ReconcileRequest::from_event(&event.payload)
            .map_err(|message| Diagnostic { error_type: "InvalidReconcileRequest".into(), error_message: message })?;
        let swept = function.sweep(&request).await.map_err(|e| Diagnostic::from(StepError(e)));
        if let Err(error) = metrics.flush(std::io::stdout()) {
            tracing::warn!(error = %error, "could not write the invocation's metrics");
        }
        swept
    });
    lambda_runtime::run(handler).await
}
