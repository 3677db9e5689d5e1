//! The Lambda side of a step: JSON logs, the handler, and errors that cross the boundary
//! with a stable `errorType` (the runtime's default would be a Rust type path, which ASL
//! `ErrorEquals` could not match).

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use serde_json::Value;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use agentpay_core::error::PaymentError;
use agentpay_core::steps::{StepName, Steps};

pub mod config;

/// The AWS configuration of a function, loaded once per cold start: the standard chain
/// (region, the role's environment credentials, `AWS_ENDPOINT_URL_*`) with one HTTP client for
/// every SDK client, rustls on ring — the SDKs' default client would link aws-lc as well.
pub async fn load_aws() -> aws_config::SdkConfig {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    let http = aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
    aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http).load().await
}
pub mod entry_point;
pub mod reconcile;
pub mod settlement_url;

/// A step's error on its way out of the function: its stable name becomes the `errorType`.
#[derive(Debug)]
pub struct StepError(pub PaymentError);

impl From<StepError> for Diagnostic {
    fn from(StepError(error): StepError) -> Self {
        Diagnostic { error_type: error.name().to_owned(), error_message: error.chain_message() }
    }
}

/// JSON logs to stdout (CloudWatch), level from `RUST_LOG` (default info).
pub fn init_tracing() {
    // `Targets` reads RUST_LOG's `level` and `target=level` forms without the regex engine
    // that `EnvFilter` links (about 1 MB of every bootstrap).
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|text| text.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO));
    // A second init (tests) is harmless.
    let _ =
        tracing_subscriber::fmt().json().with_current_span(false).with_target(false).finish().with(filter).try_init();
}

/// Installs the embedded-metric-format recorder for this process (once, at cold start): the
/// counters in `agentpay_core::metrics` become EMF documents that CloudWatch turns into metrics.
pub fn init_metrics() -> Result<&'static metrics_cloudwatch_embedded::Collector, lambda_runtime::Error> {
    metrics_cloudwatch_embedded::Builder::new().cloudwatch_namespace(agentpay_core::metrics::NAMESPACE).init()
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
        Err(error) => {
            agentpay_core::metrics::step_error(error.name());
            tracing::warn!(
                step = step.function_name(),
                execution_id,
                request_id = %event.context.request_id,
                error_type = error.name(),
                error = %error.chain_message(),
                "step failed"
            )
        }
    }
    result
}

/// Serves `step` until the runtime stops; `steps` is built once by the caller. After each
/// invocation the metrics it counted are written to stdout as one EMF document.
pub async fn serve(step: StepName, steps: Steps) -> Result<(), lambda_runtime::Error> {
    let metrics = init_metrics()?;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let steps = steps.clone();
        async move {
            let result = handle(&steps, step, event).await.map_err(StepError);
            if let Err(error) = metrics.flush(std::io::stdout()) {
                tracing::warn!(error = %error, "could not write the invocation's metrics");
            }
            result
        }
    }))
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use agentpay_core::clock::SystemClock;
    use agentpay_core::steps::StepSettings;
    use agentpay_dev_wallet::DevWallet;
    use agentpay_sqlite::SqliteStore;

    /// The document CloudWatch reads: `_aws` with a millisecond timestamp and one directive
    /// naming the namespace, dimension sets (each a list of keys present in the document) and
    /// metrics (each a name present in the document with a numeric value, and a valid unit).
    fn assert_emf(document: &Value) {
        let aws = &document["_aws"];
        assert!(aws["Timestamp"].as_u64().is_some_and(|t| t > 1_600_000_000_000), "{document}");
        let directives = aws["CloudWatchMetrics"].as_array().expect("CloudWatchMetrics");
        assert!(!directives.is_empty());
        for directive in directives {
            assert_eq!(directive["Namespace"], agentpay_core::metrics::NAMESPACE);
            for set in directive["Dimensions"].as_array().expect("Dimensions") {
                let set = set.as_array().expect("a dimension set is an array");
                assert!(set.len() <= 30);
                for key in set {
                    assert!(document[key.as_str().unwrap()].is_string(), "dimension {key} in {document}");
                }
            }
            for metric in directive["Metrics"].as_array().expect("Metrics") {
                let name = metric["Name"].as_str().expect("Name");
                let value = &document[name];
                assert!(value.is_number() || value.as_array().is_some_and(|v| v.iter().all(Value::is_number)));
                if let Some(unit) = metric.get("Unit") {
                    let units = ["Count", "None", "Seconds", "Milliseconds", "Microseconds", "Bytes", "Percent"];
                    assert!(units.contains(&unit.as_str().unwrap()), "{unit}");
                }
            }
        }
    }

    #[test]
    fn the_counted_metrics_are_written_as_embedded_metric_format() {
        let collector = init_metrics().unwrap();
        agentpay_core::metrics::authorized("agent-a", agentpay_core::money::AtomicAmount::new(250_000).unwrap());
        agentpay_core::metrics::authorized("agent-a", agentpay_core::money::AtomicAmount::new(50_000).unwrap());
        agentpay_core::metrics::denied("SpendLimitExceeded");
        agentpay_core::metrics::outcome_unknown();
        agentpay_core::metrics::step_error("LedgerConflict");
        agentpay_core::metrics::approval_decided("Approved", 600);
        agentpay_core::metrics::approval_decided("Approved", 30);
        agentpay_core::metrics::kill_switch_tripped("agent-a");
        let mut out = Vec::new();
        collector.flush(&mut out).unwrap();
        let documents: Vec<Value> =
            String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(!documents.is_empty());
        documents.iter().for_each(assert_emf);
        let find = |name: &str, dimension: Option<(&str, &str)>| -> Option<f64> {
            documents
                .iter()
                .filter(|d| match dimension {
                    Some((key, value)) => d[key] == value,
                    None => d.get("Agent").is_none() && d.get("Reason").is_none() && d.get("Error").is_none(),
                })
                .find_map(|d| d[name].as_f64())
        };
        assert_eq!(find("AmountAuthorizedAtomic", Some(("Agent", "agent-a"))), Some(300_000.0));
        assert_eq!(find("PaymentsAuthorized", None), Some(2.0));
        assert_eq!(find("PaymentsDenied", Some(("Reason", "SpendLimitExceeded"))), Some(1.0));
        assert_eq!(find("OutcomesUnknown", None), Some(1.0));
        assert_eq!(find("StepErrors", Some(("Error", "LedgerConflict"))), Some(1.0));
        assert_eq!(find("ApprovalsDecided", Some(("Decision", "Approved"))), Some(2.0));
        assert_eq!(find("KillSwitchTrips", Some(("Agent", "agent-a"))), Some(1.0));
        // The wait is a distribution: every value kept, for CloudWatch's percentiles.
        let waits = documents.iter().find(|d| d["Decision"] == "Approved" && d.get("ApprovalWaitSeconds").is_some());
        let mut waits: Vec<f64> = match &waits.expect("ApprovalWaitSeconds")["ApprovalWaitSeconds"] {
            Value::Array(values) => values.iter().filter_map(Value::as_f64).collect(),
            single => single.as_f64().into_iter().collect(),
        };
        waits.sort_by(f64::total_cmp);
        assert_eq!(waits, [30.0, 600.0]);
    }

    #[tokio::test]
    async fn a_bad_event_becomes_a_named_lambda_error() {
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let wallet =
            DevWallet::from_hex_key(&DevWallet::generate_hex_key(), store.clone(), Arc::new(SystemClock)).unwrap();
        let steps = Steps::new(store, Arc::new(wallet), Arc::new(SystemClock), StepSettings::default());
        let event = LambdaEvent::new(json!({"request": {}, "executionId": "e"}), lambda_runtime::Context::default());
        let error = handle(&steps, StepName::CheckIdempotency, event).await.unwrap_err();
        let diagnostic = Diagnostic::from(StepError(error));
        assert_eq!(diagnostic.error_type, "InvalidPaymentRequest");
        assert!(diagnostic.error_message.contains("idempotencyKey: received nothing"), "{}", diagnostic.error_message);
    }
}
