//! The request-approval step as a Lambda (the state machine's callback task): JSON logs, the
//! DynamoDB store built once (no payment provider: this step never pays), then the shared
//! handler for every invocation.

use agentpay_core::workflow::StepName;
use agentpay_lambda::config::LambdaConfig;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    agentpay_lambda::init_tracing();
    let steps = LambdaConfig::from_env()?.build_steps().await;
    agentpay_lambda::serve(StepName::RequestApproval, steps).await
}
