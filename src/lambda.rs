//! The Lambda side of a step: JSON logs, the handler, and errors that cross the boundary
//! with a stable `errorType` (the runtime's default would be a Rust type path, which ASL
//! `ErrorEquals` could not match).

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use serde_json::Value;

use crate::error::PaymentError;
use crate::steps::{StepName, Steps};

impl From<PaymentError> for Diagnostic {
    fn from(error: PaymentError) -> Self {
        Diagnostic { error_type: error.name().to_owned(), error_message: error.chain_message() }
    }
}

/// JSON logs to stdout (CloudWatch), level from `RUST_LOG` (default info).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second init (tests) is harmless.
    let _ =
        tracing_subscriber::fmt().json().with_env_filter(filter).with_current_span(false).with_target(false).try_init();
}

/// One invocation. Logs the step, the execution and the outcome — never the payload, which
/// carries the payment proof.
pub async fn handle(steps: &Steps, step: StepName, event: LambdaEvent<Value>) -> Result<Value, PaymentError> {
    let execution_id = event.payload.get("executionId").and_then(Value::as_str).unwrap_or("-").to_owned();
    let result = steps.invoke(step, event.payload).await;
    match &result {
        Ok(_) => {
            tracing::info!(step = step.function_name(), execution_id, request_id = %event.context.request_id, "step succeeded")
        }
        Err(error) => tracing::warn!(
            step = step.function_name(),
            execution_id,
            request_id = %event.context.request_id,
            error_type = error.name(),
            error = %error.chain_message(),
            "step failed"
        ),
    }
    result
}

/// Serves `step` until the runtime stops; `steps` is built once by the caller.
pub async fn serve(step: StepName, steps: Steps) -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let steps = steps.clone();
        async move { handle(&steps, step, event).await }
    }))
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::clock::SystemClock;
    use crate::provider::dev_wallet::DevWallet;
    use crate::steps::StepSettings;
    use crate::store::sqlite::SqliteStore;

    #[tokio::test]
    async fn a_bad_event_becomes_a_named_lambda_error() {
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let wallet =
            DevWallet::from_hex_key(&DevWallet::generate_hex_key(), store.clone(), Arc::new(SystemClock)).unwrap();
        let steps = Steps::new(store, Arc::new(wallet), Arc::new(SystemClock), StepSettings::default());
        let event = LambdaEvent::new(json!({"request": {}, "executionId": "e"}), lambda_runtime::Context::default());
        let error = handle(&steps, StepName::CheckIdempotency, event).await.unwrap_err();
        let diagnostic = Diagnostic::from(error);
        assert_eq!(diagnostic.error_type, "InvalidPaymentRequest");
        assert!(diagnostic.error_message.contains("idempotencyKey: received nothing"), "{}", diagnostic.error_message);
    }
}
