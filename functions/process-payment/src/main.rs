//! The process-payment step as a Lambda: JSON logs, the DynamoDB store and the payment provider
//! (AgentCore, or the dev wallet keyed from Secrets Manager) built once, then the shared handler.

use agentpay_core::workflow::StepName;
use agentpay_lambda::config::LambdaConfig;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    agentpay_lambda::init_tracing();
    let steps = LambdaConfig::from_env()?.build_paying_steps().await?;
    agentpay_lambda::serve(StepName::ProcessPayment, steps).await
}
