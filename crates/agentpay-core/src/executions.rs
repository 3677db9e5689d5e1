//! Execution records and their history, as the local runner keeps them (Step Functions
//! keeps its own in AWS). Enough to list, describe and redrive.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::Timestamp;
use crate::error::PaymentError;
use crate::store::ErrorRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExecutionStatus {
    Running,
    Succeeded,
    Failed,
}

impl ExecutionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionStatus::Running => "RUNNING",
            ExecutionStatus::Succeeded => "SUCCEEDED",
            ExecutionStatus::Failed => "FAILED",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_uppercase().as_str() {
            "RUNNING" => Some(Self::Running),
            "SUCCEEDED" => Some(Self::Succeeded),
            "FAILED" => Some(Self::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionRecord {
    pub execution_id: String,
    pub name: String,
    pub status: ExecutionStatus,
    pub input: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorRecord>,
    /// The state that failed the execution: where a redrive resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_state: Option<String>,
    pub started_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<Timestamp>,
    pub redrive_count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The runner driving it while RUNNING (`pid:<pid>:<nonce>`): a RUNNING execution whose
    /// runner is gone can be resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HistoryKind {
    ExecutionStarted,
    ExecutionRedriven,
    /// A RUNNING execution whose runner died, resumed where its history ends.
    ExecutionResumed,
    StateEntered,
    TaskScheduled,
    /// A callback task was started and waits for its token's answer (`token`, `deadline`).
    TaskSubmitted,
    TaskSucceeded,
    TaskFailed,
    TaskRetryScheduled,
    CatchMatched,
    StateExited,
    ExecutionSucceeded,
    ExecutionFailed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEvent {
    pub seq: u32,
    pub at: Timestamp,
    pub kind: HistoryKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Input, output, error or retry details, by kind.
    pub details: Value,
}

#[derive(Debug, Clone, Default)]
pub struct ExecutionFilter {
    pub status: Option<ExecutionStatus>,
    pub agent_id: Option<String>,
    pub since: Option<Timestamp>,
    pub limit: Option<u32>,
}

#[async_trait]
pub trait ExecutionStore: Send + Sync {
    /// Creates the record; `false` if an execution with that name exists already. The store
    /// may answer before the record is durable (the local SQLite store does): it is durable
    /// before any later write of this store is acknowledged, and once `executions_durable`
    /// returns.
    async fn create_execution(&self, record: &ExecutionRecord) -> Result<bool, PaymentError>;
    /// Returns once every write this store has acknowledged is durable.
    async fn executions_durable(&self) -> Result<(), PaymentError>;
    async fn update_execution(&self, record: &ExecutionRecord) -> Result<(), PaymentError>;
    /// By execution id or by name.
    async fn execution(&self, id_or_name: &str) -> Result<Option<ExecutionRecord>, PaymentError>;
    async fn list_executions(&self, filter: &ExecutionFilter) -> Result<Vec<ExecutionRecord>, PaymentError>;
    async fn append_history(&self, execution_id: &str, events: &[HistoryEvent]) -> Result<(), PaymentError>;
    /// As `append_history`, without waiting for the events to be durable. A store that defers
    /// makes them durable before any later write it acknowledges, so they are lost only with
    /// the process, exactly as if it had stopped just before this call (a resumed execution
    /// then runs the state again, which every step allows). The runner defers the events it
    /// records after each task; each payment then waits for 4 fewer commits.
    async fn append_history_deferred(&self, execution_id: &str, events: &[HistoryEvent]) -> Result<(), PaymentError> {
        self.append_history(execution_id, events).await
    }
    async fn history(&self, execution_id: &str) -> Result<Vec<HistoryEvent>, PaymentError>;

    /// Appends an execution's last events and writes its closed record, in one write where the
    /// store allows (events first: a runner that dies between them is resumed from history).
    async fn finish_execution(&self, record: &ExecutionRecord, events: &[HistoryEvent]) -> Result<(), PaymentError> {
        self.append_history(&record.execution_id, events).await?;
        self.update_execution(record).await
    }
}
