//! The client on the local runner: the same state machine file, run in this process.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::{Backend, ClientError, Execution, ListFilter, StepEvent};
use crate::asl::runner::local_execution_arn;
use crate::asl::{LocalRunner, RunnerError};
use crate::executions::{ExecutionFilter, ExecutionRecord, ExecutionStatus, ExecutionStore, HistoryEvent, HistoryKind};

pub struct LocalBackend {
    runner: Arc<LocalRunner>,
    executions: Arc<dyn ExecutionStore>,
}

impl LocalBackend {
    pub fn new(runner: Arc<LocalRunner>, executions: Arc<dyn ExecutionStore>) -> Self {
        Self { runner, executions }
    }
}

fn runner_error(operation: &'static str, error: RunnerError) -> ClientError {
    match error {
        RunnerError::ExecutionNotFound(id) => ClientError::NotFound(id),
        RunnerError::NotRedrivable { id, reason } => ClientError::NotRedrivable { id, reason },
        other => ClientError::backend(operation, other),
    }
}

pub fn to_execution(record: ExecutionRecord) -> Execution {
    let (error, cause) = record.error.map(|e| (Some(e.error), Some(e.cause))).unwrap_or_default();
    Execution {
        execution_arn: record.execution_id,
        name: record.name,
        status: record.status.as_str().to_owned(),
        started_at: record.started_at,
        stopped_at: record.stopped_at,
        redrive_count: record.redrive_count,
        input: Some(record.input),
        output: record.output,
        error,
        cause,
        not_redrivable_reason: None,
        redrivable_per_backend: false,
        awaiting_approval: None,
    }
}

/// The approval a RUNNING execution waits for, if its history ends in a callback task's wait.
fn awaiting_approval(history: &[HistoryEvent]) -> Option<String> {
    let waiting = history.last().filter(|e| e.kind == HistoryKind::TaskSubmitted)?;
    history
        .iter()
        .rev()
        .find(|e| e.kind == HistoryKind::TaskScheduled && e.state == waiting.state)
        .and_then(|e| e.details.get("parameters"))
        .and_then(super::approval_in_parameters)
}

fn to_event(event: HistoryEvent) -> StepEvent {
    StepEvent {
        id: u64::from(event.seq),
        at: event.at,
        kind: serde_json::to_value(event.kind).ok().and_then(|k| k.as_str().map(str::to_owned)).unwrap_or_default(),
        state: event.state,
        detail: event.details,
    }
}

#[async_trait]
impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn start_named(&self, name: &str, input: &Value) -> Result<Option<String>, ClientError> {
        match self.runner.start(name, input.clone()).await {
            Ok(record) => Ok(Some(record.execution_id)),
            Err(RunnerError::ExecutionAlreadyExists(_)) => Ok(None),
            Err(other) => Err(runner_error("StartExecution", other)),
        }
    }

    async fn describe(&self, id: &str) -> Result<Execution, ClientError> {
        let record = self
            .executions
            .execution(id)
            .await
            .map_err(|e| ClientError::backend("DescribeExecution", e))?
            .ok_or_else(|| ClientError::NotFound(id.to_owned()))?;
        let running = record.status == ExecutionStatus::Running;
        let mut execution = to_execution(record);
        if running {
            let history = self
                .executions
                .history(&execution.execution_arn)
                .await
                .map_err(|e| ClientError::backend("GetExecutionHistory", e))?;
            execution.awaiting_approval = awaiting_approval(&history);
        }
        Ok(execution)
    }

    fn execution_arn(&self, name: &str) -> String {
        local_execution_arn(name)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Execution>, ClientError> {
        let status = match &filter.status {
            None => None,
            Some(text) => match ExecutionStatus::parse(text) {
                Some(status) => Some(status),
                // TIMED_OUT, ABORTED, PENDING_REDRIVE do not happen locally.
                None => return Ok(Vec::new()),
            },
        };
        let records = self
            .executions
            .list_executions(&ExecutionFilter {
                status,
                agent_id: filter.agent_id.clone(),
                since: filter.since,
                limit: None,
            })
            .await
            .map_err(|e| ClientError::backend("ListExecutions", e))?;
        let mut executions: Vec<Execution> = records
            .into_iter()
            .filter(|r| filter.until.is_none_or(|until| r.started_at < until))
            .map(to_execution)
            .collect();
        if let Some(limit) = filter.limit {
            executions.truncate(limit);
        }
        Ok(executions)
    }

    async fn history(&self, id: &str) -> Result<Vec<StepEvent>, ClientError> {
        let execution = self.describe(id).await?;
        let events = self
            .executions
            .history(&execution.execution_arn)
            .await
            .map_err(|e| ClientError::backend("GetExecutionHistory", e))?;
        Ok(events.into_iter().map(to_event).collect())
    }

    async fn is_standard(&self) -> Result<bool, ClientError> {
        Ok(true)
    }

    async fn redrive(&self, execution_arn: &str, _redrive_count: u32) -> Result<(), ClientError> {
        self.runner.redrive(execution_arn).await.map(|_| ()).map_err(|e| runner_error("RedriveExecution", e))
    }

    async fn resume_orphan(&self, execution_arn: &str) -> Result<Option<Result<(), String>>, ClientError> {
        match self.runner.resume(execution_arn).await {
            Ok(_) => Ok(Some(Ok(()))),
            Err(RunnerError::NotRedrivable { reason, .. }) => Ok(Some(Err(reason))),
            Err(other) => Err(runner_error("resume", other)),
        }
    }
}
