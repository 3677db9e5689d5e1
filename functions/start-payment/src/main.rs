//! The agents' entry point as a Lambda behind a function URL with IAM auth: JSON logs, the Step
//! Functions client built once, then one execution started per verified request.

use agentpay_lambda::entry_point::EntryPoint;
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    agentpay_lambda::init_tracing();
    let state_machine_arn = std::env::var("AGENTPAY_STATE_MACHINE_ARN")
        .map_err(|_| "AGENTPAY_STATE_MACHINE_ARN is not set; expected the payment state machine's ARN")?;
    let aws = agentpay_lambda::load_aws().await;
    let entry_point = EntryPoint::new(aws_sdk_sfn::Client::new(&aws), state_machine_arn);
    let entry_point = &entry_point;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        Ok::<Value, lambda_runtime::Error>(entry_point.handle(&event.payload).await.to_response())
    }))
    .await
}
