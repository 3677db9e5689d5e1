//! Operators' side of human approval: list what waits, decide, and deliver the decision to the
//! waiting execution — SendTaskSuccess / SendTaskFailure on AWS, the local runner locally.
//!
//! A decision is recorded (conditionally, audited) before it is delivered: two approvers
//! cannot both decide, and a decision whose delivery failed is delivered again by the same
//! command (the record says it was taken; the token says whether anyone still waits).

use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_sfn::error::ProvideErrorMetadata;

use crate::approval::{self, ApprovalError, Decision};
use crate::asl::{LocalRunner, RunnerError};
use crate::clock::Clock;
use crate::store::{ApprovalRecord, Store, Transition};

/// Why a decision did not reach its execution.
#[derive(Debug)]
pub enum Undelivered {
    /// Nobody waits on the token (answered before, timed out, or retried with a new token).
    NotWaiting(String),
    /// The answer came after the task's time-out (when).
    TimedOut(String),
    Failed(String),
}

/// Where a decision goes: the execution waiting on the approval's task token.
#[async_trait]
pub trait TaskAnswers: Send + Sync {
    async fn succeed(&self, token: &str, output: &serde_json::Value) -> Result<(), Undelivered>;
    async fn fail(&self, token: &str, error: &str, cause: &str) -> Result<(), Undelivered>;
}

/// Locally: the runner continues the waiting execution in this process.
pub struct LocalAnswers(pub Arc<LocalRunner>);

fn runner_answer(result: Result<crate::executions::ExecutionRecord, RunnerError>) -> Result<(), Undelivered> {
    match result {
        Ok(_) => Ok(()),
        Err(RunnerError::TaskNotWaiting(detail)) => Err(Undelivered::NotWaiting(detail)),
        Err(RunnerError::TaskTimedOut(at)) => Err(Undelivered::TimedOut(at)),
        Err(other) => Err(Undelivered::Failed(other.to_string())),
    }
}

#[async_trait]
impl TaskAnswers for LocalAnswers {
    async fn succeed(&self, token: &str, output: &serde_json::Value) -> Result<(), Undelivered> {
        runner_answer(self.0.send_task_success(token, output.clone()).await)
    }

    async fn fail(&self, token: &str, error: &str, cause: &str) -> Result<(), Undelivered> {
        runner_answer(self.0.send_task_failure(token, error, cause).await)
    }
}

/// On AWS: Step Functions' SendTaskSuccess / SendTaskFailure, with the operator's credentials
/// (the template lets only the approvers' role send them).
pub struct SfnAnswers(pub aws_sdk_sfn::Client);

fn sfn_answer<E>(
    result: Result<
        impl Sized,
        aws_sdk_sfn::error::SdkError<E, aws_smithy_runtime_api::client::orchestrator::HttpResponse>,
    >,
) -> Result<(), Undelivered>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match result {
        Ok(_) => Ok(()),
        Err(error) => {
            let code = error.as_service_error().and_then(|e| e.code()).unwrap_or_default().to_owned();
            let message = error.as_service_error().and_then(|e| e.message()).unwrap_or_default().to_owned();
            match code.as_str() {
                // The task finished (answered, or timed out) or the token is not one of ours.
                "TaskTimedOut" | "TaskDoesNotExist" | "InvalidToken" => {
                    Err(Undelivered::NotWaiting(format!("{code}: {message}")))
                }
                _ => Err(Undelivered::Failed(crate::error::error_chain(&error))),
            }
        }
    }
}

#[async_trait]
impl TaskAnswers for SfnAnswers {
    async fn succeed(&self, token: &str, output: &serde_json::Value) -> Result<(), Undelivered> {
        sfn_answer(self.0.send_task_success().task_token(token).output(output.to_string()).send().await)
    }

    async fn fail(&self, token: &str, error: &str, cause: &str) -> Result<(), Undelivered> {
        sfn_answer(self.0.send_task_failure().task_token(token).error(error).cause(cause).send().await)
    }
}

/// Approvals over a store and the backend that delivers decisions.
pub struct Approvals {
    store: Arc<dyn Store>,
    answers: Arc<dyn TaskAnswers>,
    clock: Arc<dyn Clock>,
}

impl Approvals {
    pub fn new(store: Arc<dyn Store>, answers: Arc<dyn TaskAnswers>, clock: Arc<dyn Clock>) -> Self {
        Self { store, answers, clock }
    }

    /// The approvals of the last `approval::LISTING_DAYS` days, newest first, tokens redacted.
    pub async fn list(&self) -> Result<Vec<ApprovalRecord>, ApprovalError> {
        let now = self.clock.now();
        let since = now.minus(std::time::Duration::from_secs(approval::LISTING_DAYS * 24 * 3600));
        Ok(self.store.approvals(since, now).await?.iter().map(ApprovalRecord::redacted).collect())
    }

    /// One approval, token redacted.
    pub async fn show(&self, id: &str) -> Result<ApprovalRecord, ApprovalError> {
        Ok(self.record(id).await?.redacted())
    }

    async fn record(&self, id: &str) -> Result<ApprovalRecord, ApprovalError> {
        self.store.approval(id).await?.ok_or_else(|| ApprovalError::NotFound(id.to_owned()))
    }

    /// Records `decision` by `approver` (audited), then delivers it to the waiting execution.
    /// Deciding again the same way (say, after a delivery failed) delivers it again.
    pub async fn decide(&self, id: &str, decision: Decision, approver: &str) -> Result<ApprovalRecord, ApprovalError> {
        let record = self.record(id).await?;
        self.still_reserved(&record).await?;
        let principals = self.store.policy(&record.agent_id).await?.map(|p| p.principals).unwrap_or_default();
        let now = self.clock.now();
        let commit = match approval::decide(&record, &decision, approver, &principals, now) {
            Ok(commit) => commit,
            // Decided before by this same approver the same way: deliver it again.
            Err(ApprovalError::AlreadyDecided { .. })
                if record.decided_by.as_deref() == Some(approver) && matches_decision(&record, &decision) =>
            {
                return self.deliver(&record, &decision).await.map(|()| record.redacted());
            }
            Err(refused) => return Err(refused),
        };
        match self.store.decide_approval(&commit).await? {
            Transition::Applied | Transition::AlreadyApplied => {}
            Transition::Refused(why) => {
                // Decided or timed out between our read and write: say which, from the record.
                let now_stored = self.record(id).await?;
                return Err(approval::decide(&now_stored, &decision, approver, &principals, now)
                    .err()
                    .unwrap_or(ApprovalError::Delivery(why)));
            }
            Transition::VersionConflict | Transition::Fenced(_) => {
                return Err(ApprovalError::Delivery("the approval changed while it was decided; try again".into()));
            }
        }
        self.deliver(&commit.decided, &decision).await?;
        Ok(commit.decided.redacted())
    }

    /// A pending approval whose payment is no longer reserved waits for nobody: its execution
    /// ended without an answer (stopped, or failed) and the payment was released (by
    /// reconciliation). Deciding it would record a decision, and audit it, for a payment that
    /// can no longer happen. (Past its time-out `approval::decide` says so instead.)
    async fn still_reserved(&self, record: &ApprovalRecord) -> Result<(), ApprovalError> {
        if record.status != crate::store::ApprovalStatus::Pending || record.expires_at <= self.clock.now() {
            return Ok(());
        }
        match self.store.reservation(&record.agent_id, &record.reservation_id).await? {
            Some(reservation) if reservation.status != crate::store::ReservationStatus::Reserved => {
                Err(ApprovalError::PaymentEnded { id: record.id.clone(), status: reservation.status.as_str() })
            }
            _ => Ok(()),
        }
    }

    async fn deliver(&self, record: &ApprovalRecord, decision: &Decision) -> Result<(), ApprovalError> {
        let delivered = match decision {
            Decision::Approve => self.answers.succeed(&record.task_token, &approval::approved_output(record)).await,
            Decision::Reject { .. } => {
                self.answers.fail(&record.task_token, approval::REJECTED_ERROR, &approval::rejected_cause(record)).await
            }
        };
        delivered.map_err(|undelivered| match undelivered {
            Undelivered::NotWaiting(detail) => {
                ApprovalError::NotWaiting { id: record.id.clone(), status: record.status.as_str(), detail }
            }
            Undelivered::TimedOut(at) => ApprovalError::TimedOut { id: record.id.clone(), at },
            Undelivered::Failed(why) => ApprovalError::Delivery(why),
        })
    }
}

fn matches_decision(record: &ApprovalRecord, decision: &Decision) -> bool {
    matches!(
        (record.status, decision),
        (crate::store::ApprovalStatus::Approved, Decision::Approve)
            | (crate::store::ApprovalStatus::Rejected, Decision::Reject { .. })
    )
}
