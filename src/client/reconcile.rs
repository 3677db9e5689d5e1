//! Reconciliation's view of executions through the client, on either backend: whether the
//! execution holding a claim ended, whether it entered ProcessPayment (its history), and
//! asking the provider again by replaying it.

use std::time::Duration;

use agentpay_core::clock::{Clock, SystemClock};
use agentpay_core::error::PaymentError;
use agentpay_core::reconcile::{ExecutionFate, ExecutionLookup};

use crate::client::{ClientError, PaymentClient, ReplayOptions, WaitOptions};

/// The state where a proof is asked for: an execution that entered it may have one.
pub const PROCESS_PAYMENT_STATE: &str = "ProcessPayment";

/// How long reconciliation waits for a payment it ran again.
const ASK_AGAIN_WAIT: Duration = Duration::from_secs(60);

pub struct ClientExecutions<'a> {
    client: &'a PaymentClient,
}

impl<'a> ClientExecutions<'a> {
    pub fn new(client: &'a PaymentClient) -> Self {
        Self { client }
    }
}

fn unavailable(error: ClientError) -> PaymentError {
    PaymentError::StoreUnavailable { operation: "execution lookup", source: Box::new(error) }
}

#[async_trait::async_trait]
impl ExecutionLookup for ClientExecutions<'_> {
    async fn fate(&self, execution_id: &str) -> Result<ExecutionFate, PaymentError> {
        let execution = match self.client.status(execution_id).await {
            Ok(execution) => execution,
            Err(ClientError::NotFound(_)) => return Ok(ExecutionFate::Missing),
            Err(error) => return Err(unavailable(error)),
        };
        if !execution.is_closed() {
            return Ok(ExecutionFate::Running);
        }
        let history = self.client.history(execution_id).await.map_err(unavailable)?;
        let entered = history.iter().any(|event| event.state.as_deref() == Some(PROCESS_PAYMENT_STATE));
        Ok(ExecutionFate::Ended { status: execution.status, entered_process_payment: entered })
    }

    async fn ask_again(&self, execution_id: &str) -> Result<String, PaymentError> {
        let wait = WaitOptions { timeout: ASK_AGAIN_WAIT, ..WaitOptions::default() };
        let options = ReplayOptions { fresh: true, dry_run: false, wait: Some(wait) };
        let replay = self.client.replay(execution_id, SystemClock.now(), options).await.map_err(unavailable)?;
        let action = format!("{:?}", replay.action);
        Ok(match replay.result {
            Some(execution) => {
                let answer = serde_json::to_value(execution.answer()).unwrap_or_default();
                format!(
                    "{action} as {}: {} ({})",
                    execution.execution_arn,
                    execution.status,
                    answer["outcome"].as_str().unwrap_or("-")
                )
            }
            None => format!("{action}: {}", replay.reason.unwrap_or_default()),
        })
    }
}
