//! The check-idempotency step as a Lambda: JSON logs, dependencies built once from configuration, then the
//! shared handler (`agentpay::lambda::handle`) for every invocation.

use agentpay::config::Config;
use agentpay::lambda;
use agentpay::steps::StepName;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda::init_tracing();
    let steps = Config::from_env()?.build_steps().await?;
    lambda::serve(StepName::CheckIdempotency, steps).await
}
