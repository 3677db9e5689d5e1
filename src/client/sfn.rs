//! The client on AWS Step Functions (aws-sdk-sfn), configured by the standard AWS chain
//! (`AWS_ENDPOINT_URL_SFN` for a local endpoint).

use async_trait::async_trait;
use aws_sdk_sfn::Client;
use aws_sdk_sfn::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sfn::types::{ExecutionRedriveStatus, ExecutionStatus, HistoryEvent, StateMachineType};
use serde_json::{Value, json};

use super::entry_point::{EntryPointStarter, StartAnswer};
use super::{Backend, ClientError, Execution, ListFilter, StepEvent};
use crate::clock::Timestamp;

pub struct SfnBackend {
    client: Client,
    state_machine_arn: String,
    /// Where agents start payments (the IAM-verified function URL); without it, starts go
    /// straight to StartExecution, which the template leaves to operators.
    entry_point: Option<EntryPointStarter>,
}

impl SfnBackend {
    pub fn new(client: Client, state_machine_arn: impl Into<String>) -> Self {
        Self { client, state_machine_arn: state_machine_arn.into(), entry_point: None }
    }

    /// Starts go through the entry point; status, lists and history still read Step Functions.
    pub fn with_entry_point(mut self, entry_point: EntryPointStarter) -> Self {
        self.entry_point = Some(entry_point);
        self
    }

    /// The approval a RUNNING execution waits for: its newest events are a callback task's
    /// TaskSubmitted with no exit after it. Best effort: a caller allowed to describe but not
    /// to read history (an agent's role may be) sees RUNNING, which is true.
    async fn awaiting_approval(&self, arn: &str) -> Option<String> {
        use aws_sdk_sfn::types::HistoryEventType as Kind;
        let history =
            self.client.get_execution_history().execution_arn(arn).reverse_order(true).max_results(8).send().await;
        let output = match history {
            Ok(output) => output,
            Err(error) => {
                tracing::debug!(error = %crate::error::error_chain(&error), "cannot read the history of a running execution");
                return None;
            }
        };
        let events = output.events();
        let submitted = events.iter().position(|e| e.r#type() == &Kind::TaskSubmitted)?;
        let exited = [Kind::TaskSucceeded, Kind::TaskFailed, Kind::TaskTimedOut, Kind::TaskStateExited];
        if events[..submitted].iter().any(|e| exited.contains(e.r#type())) {
            return None;
        }
        let scheduled = events[submitted..].iter().find(|e| e.r#type() == &Kind::TaskScheduled)?;
        let parameters: Value = serde_json::from_str(scheduled.task_scheduled_event_details()?.parameters()).ok()?;
        super::approval_in_parameters(&parameters)
    }

    pub async fn from_env(state_machine_arn: impl Into<String>) -> Self {
        Self::new(Client::new(&aws_config::load_from_env().await), state_machine_arn)
    }
}

fn sdk_error<E>(
    operation: &'static str,
    error: SdkError<E, aws_smithy_runtime_api::client::orchestrator::HttpResponse>,
) -> ClientError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match error.as_service_error().and_then(|e| e.code()) {
        Some("ExecutionDoesNotExist") => {
            ClientError::NotFound(error.as_service_error().and_then(|e| e.message()).unwrap_or(operation).to_owned())
        }
        _ => ClientError::backend(operation, error),
    }
}

fn timestamp(time: &aws_smithy_types::DateTime) -> Timestamp {
    Timestamp::from_millis(time.to_millis().unwrap_or_default())
}

fn parse_json(text: Option<&str>) -> Option<Value> {
    text.map(|t| serde_json::from_str(t).unwrap_or_else(|_| Value::String(t.to_owned())))
}

fn status_name(status: &ExecutionStatus) -> String {
    status.as_str().to_owned()
}

#[async_trait]
impl Backend for SfnBackend {
    fn name(&self) -> &'static str {
        "aws"
    }

    async fn start_named(&self, name: &str, input: &Value) -> Result<Option<String>, ClientError> {
        if let Some(entry_point) = &self.entry_point {
            return Ok(match entry_point.start(name, input).await? {
                StartAnswer::Started { execution_arn } => Some(execution_arn),
                StartAnswer::AlreadyExists { .. } => None,
            });
        }
        let started = self
            .client
            .start_execution()
            .state_machine_arn(&self.state_machine_arn)
            .name(name)
            .input(input.to_string())
            .send()
            .await;
        match started {
            Ok(output) => Ok(Some(output.execution_arn)),
            Err(error) if error.as_service_error().is_some_and(|e| e.is_execution_already_exists()) => Ok(None),
            Err(error) => Err(sdk_error("StartExecution", error)),
        }
    }

    async fn describe(&self, id: &str) -> Result<Execution, ClientError> {
        let arn = if id.starts_with("arn:") { id.to_owned() } else { self.execution_arn(id) };
        let output = self
            .client
            .describe_execution()
            .execution_arn(&arn)
            .send()
            .await
            .map_err(|e| sdk_error("DescribeExecution", e))?;
        let not_redrivable_reason = match output.redrive_status {
            Some(ExecutionRedriveStatus::NotRedrivable) => Some(
                output
                    .redrive_status_reason
                    .clone()
                    .unwrap_or_else(|| "Step Functions reports it NOT_REDRIVABLE".into()),
            ),
            _ => None,
        };
        let redrivable_per_backend = output.redrive_status == Some(ExecutionRedriveStatus::Redrivable);
        let awaiting_approval = match output.status {
            ExecutionStatus::Running => self.awaiting_approval(&arn).await,
            _ => None,
        };
        Ok(Execution {
            name: output.name.clone().unwrap_or_else(|| arn.rsplit(':').next().unwrap_or_default().to_owned()),
            execution_arn: output.execution_arn,
            status: status_name(&output.status),
            started_at: timestamp(&output.start_date),
            stopped_at: output.stop_date.as_ref().map(timestamp),
            redrive_count: output.redrive_count.and_then(|c| u32::try_from(c).ok()).unwrap_or(0),
            input: parse_json(output.input.as_deref()),
            output: parse_json(output.output.as_deref()),
            error: output.error,
            cause: output.cause,
            not_redrivable_reason,
            redrivable_per_backend,
            awaiting_approval,
        })
    }

    /// `arn:aws:states:<region>:<account>:stateMachine:<name>` → `...:execution:<name>:<execution>`.
    fn execution_arn(&self, name: &str) -> String {
        format!("{}:{name}", self.state_machine_arn.replacen(":stateMachine:", ":execution:", 1))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Execution>, ClientError> {
        let mut request = self.client.list_executions().state_machine_arn(&self.state_machine_arn);
        if let Some(status) = &filter.status {
            request = request.status_filter(ExecutionStatus::from(status.to_ascii_uppercase().as_str()));
        }
        let mut pages = request.into_paginator().items().send();
        let mut executions = Vec::new();
        while let Some(item) = pages.next().await {
            let item = item.map_err(|e| sdk_error("ListExecutions", e))?;
            let started_at = timestamp(&item.start_date);
            if filter.since.is_some_and(|since| started_at < since)
                || filter.until.is_some_and(|until| started_at >= until)
            {
                continue;
            }
            // The listing has no input: describe only when the agent must be checked.
            let execution = if filter.agent_id.is_some() {
                self.describe(&item.execution_arn).await?
            } else {
                Execution {
                    execution_arn: item.execution_arn,
                    name: item.name,
                    status: status_name(&item.status),
                    started_at,
                    stopped_at: item.stop_date.as_ref().map(timestamp),
                    redrive_count: item.redrive_count.and_then(|c| u32::try_from(c).ok()).unwrap_or(0),
                    input: None,
                    output: None,
                    error: None,
                    cause: None,
                    not_redrivable_reason: None,
                    redrivable_per_backend: false,
                    awaiting_approval: None,
                }
            };
            if filter.agent_id.as_deref().is_some_and(|agent| execution.agent_id() != Some(agent)) {
                continue;
            }
            executions.push(execution);
            if filter.limit.is_some_and(|limit| executions.len() >= limit) {
                break;
            }
        }
        Ok(executions)
    }

    async fn history(&self, id: &str) -> Result<Vec<StepEvent>, ClientError> {
        let arn = if id.starts_with("arn:") { id.to_owned() } else { self.execution_arn(id) };
        let mut pages = self.client.get_execution_history().execution_arn(&arn).into_paginator().items().send();
        let mut events = Vec::new();
        let mut state: Option<String> = None;
        while let Some(event) = pages.next().await {
            let event = event.map_err(|e| sdk_error("GetExecutionHistory", e))?;
            if let Some(entered) = &event.state_entered_event_details {
                state = Some(entered.name.clone());
            }
            events.push(step_event(&event, state.clone()));
        }
        Ok(events)
    }

    async fn is_standard(&self) -> Result<bool, ClientError> {
        let machine = self
            .client
            .describe_state_machine()
            .state_machine_arn(&self.state_machine_arn)
            .send()
            .await
            .map_err(|e| sdk_error("DescribeStateMachine", e))?;
        Ok(machine.r#type == StateMachineType::Standard)
    }

    async fn redrive(&self, execution_arn: &str, redrive_count: u32) -> Result<(), ClientError> {
        // One client token per (execution, redrive count): a retried call does not redrive twice.
        let token = crate::request::derived_id("redrive", &[execution_arn, &redrive_count.to_string()]);
        match self.client.redrive_execution().execution_arn(execution_arn).client_token(token).send().await {
            Ok(_) => Ok(()),
            Err(error) if error.as_service_error().is_some_and(|e| e.is_execution_not_redrivable()) => {
                Err(ClientError::NotRedrivable {
                    id: execution_arn.to_owned(),
                    reason: error.as_service_error().and_then(|e| e.message()).unwrap_or("not redrivable").to_owned(),
                })
            }
            Err(error) => Err(sdk_error("RedriveExecution", error)),
        }
    }
}

/// The event's type, the state it belongs to, and its input/output/error/cause.
fn step_event(event: &HistoryEvent, state: Option<String>) -> StepEvent {
    let mut detail = json!({});
    let mut put = |key: &str, value: Option<&str>| {
        if let Some(value) = value {
            detail[key] = parse_json(Some(value)).unwrap_or(Value::Null);
        }
    };
    if let Some(d) = &event.state_entered_event_details {
        put("input", d.input.as_deref());
    }
    if let Some(d) = &event.state_exited_event_details {
        put("output", d.output.as_deref());
    }
    if let Some(d) = &event.task_succeeded_event_details {
        put("output", d.output.as_deref());
    }
    if let Some(d) = &event.lambda_function_succeeded_event_details {
        put("output", d.output.as_deref());
    }
    if let Some(d) = &event.task_failed_event_details {
        put("error", d.error.as_deref());
        put("cause", d.cause.as_deref());
    }
    if let Some(d) = &event.lambda_function_failed_event_details {
        put("error", d.error.as_deref());
        put("cause", d.cause.as_deref());
    }
    if let Some(d) = &event.execution_failed_event_details {
        put("error", d.error.as_deref());
        put("cause", d.cause.as_deref());
    }
    if let Some(d) = &event.execution_started_event_details {
        put("input", d.input.as_deref());
    }
    if let Some(d) = &event.execution_succeeded_event_details {
        put("output", d.output.as_deref());
    }
    StepEvent {
        id: u64::try_from(event.id).unwrap_or_default(),
        at: timestamp(&event.timestamp),
        kind: event.r#type.as_str().to_owned(),
        state,
        detail,
    }
}
