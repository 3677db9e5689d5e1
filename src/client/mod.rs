//! The agent-facing client: start a payment execution, watch it, replay it — against AWS Step
//! Functions ([`sfn::SfnBackend`]) or the local runner ([`local::LocalBackend`]), behind one
//! trait. The CLI's `start/status/list/history/replay` use it; so can a Rust agent.

pub mod entry_point;
pub mod local;
pub mod naming;
pub mod reconcile;
pub mod settlement;
pub mod sfn;

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;

use crate::clock::Timestamp;
use crate::payment::PaymentHeader;
use naming::execution_name;

/// Redrive is possible within this many days of the execution's stop (Step Functions' rule).
pub const REDRIVE_WINDOW: Duration = Duration::from_secs(14 * 24 * 3600);
/// The error of an execution held after an unknown provider outcome.
const OUTCOME_UNKNOWN: &str = "PaymentOutcomeUnknown";

/// Step Functions refuses to redrive an execution whose history reached this many events.
pub const HISTORY_LIMIT: usize = 25_000;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the execution input has no usable idempotencyKey (a string is required to name the execution)")]
    NoIdempotencyKey,
    #[error(
        "execution {name:?} exists with a different input: the idempotency key was reused for another request; use a new key"
    )]
    NameTakenByOtherInput { name: String },
    #[error("no execution {0:?}")]
    NotFound(String),
    #[error("execution {id} is not redrivable: {reason}")]
    NotRedrivable { id: String, reason: String },
    /// The service refused the request; `error` is its stable name.
    #[error("{error}: {message}")]
    Refused { error: String, message: String },
    /// A refusal a person can act on (a bad entry point URL, the entry point's 4xx answer).
    #[error("{0}")]
    Invalid(String),
    #[error("{operation} failed")]
    Backend {
        operation: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ClientError {
    pub fn backend(operation: &'static str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        ClientError::Backend { operation, source: source.into() }
    }
}

/// The same payment request, whoever's session sent it: the entry point adds the verified
/// `caller`, and a retry may come from another session of the same role.
fn same_request(stored: &Value, input: &Value) -> bool {
    let without_caller = |value: &Value| {
        let mut value = value.clone();
        if let Value::Object(fields) = &mut value {
            fields.remove("caller");
        }
        value
    };
    without_caller(stored) == without_caller(input)
}

/// One execution as both backends describe it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Execution {
    pub execution_arn: String,
    pub name: String,
    /// RUNNING, SUCCEEDED, FAILED, TIMED_OUT, ABORTED or PENDING_REDRIVE.
    pub status: String,
    pub started_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<Timestamp>,
    pub redrive_count: u32,
    /// Read from the input (absent when a listing did not fetch it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// The backend's own verdict when it gives one (Step Functions' redriveStatusReason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_redrivable_reason: Option<String>,
    /// Step Functions said REDRIVABLE (its verdict covers the history limit, so the events
    /// need not be counted here).
    #[serde(skip)]
    pub redrivable_per_backend: bool,
    /// RUNNING and waiting for a person: the approval's id (`agentpay approve ID`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub awaiting_approval: Option<String>,
}

impl Execution {
    pub fn agent_id(&self) -> Option<&str> {
        self.input.as_ref()?.get("agentId")?.as_str()
    }

    pub fn is_closed(&self) -> bool {
        self.status != "RUNNING" && self.status != "PENDING_REDRIVE"
    }

    /// What the agent does next.
    pub fn answer(&self) -> PaymentAnswer {
        match self.status.as_str() {
            "SUCCEEDED" => {
                let output = self.output.clone().unwrap_or_default();
                if output["outcome"] == crate::shadow::SHADOW {
                    return match serde_json::from_value::<crate::shadow::ShadowOutcome>(output) {
                        Ok(shadow) => {
                            PaymentAnswer::Shadow { decision: shadow.decision, from_cache: shadow.from_cache }
                        }
                        Err(e) => PaymentAnswer::Failed {
                            error: "MalformedOutput".into(),
                            cause: format!("the execution succeeded in shadow mode with an unreadable decision: {e}"),
                        },
                    };
                }
                match serde_json::from_value::<PaymentHeader>(output["header"].clone()) {
                    Ok(header) => PaymentAnswer::Paid {
                        header,
                        payment_id: output["paymentId"].as_str().unwrap_or_default().to_owned(),
                        from_cache: output["fromCache"].as_bool().unwrap_or(false),
                    },
                    Err(_) => PaymentAnswer::Failed {
                        error: "MalformedOutput".into(),
                        cause: "the execution succeeded without a payment header in its output".into(),
                    },
                }
            }
            "RUNNING" => match &self.awaiting_approval {
                Some(approval_id) => PaymentAnswer::AwaitingApproval { approval_id: approval_id.clone() },
                None => PaymentAnswer::Running,
            },
            "PENDING_REDRIVE" => PaymentAnswer::Running,
            _ => {
                let error = self.error.clone().unwrap_or_else(|| self.status.clone());
                let cause = self.cause.clone().unwrap_or_default();
                if crate::error::is_denial_name(&error) {
                    PaymentAnswer::Denied { error, cause }
                } else {
                    PaymentAnswer::Failed { error, cause }
                }
            }
        }
    }
}

/// The outcome as the agent needs it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentAnswer {
    /// Retry the request with this header.
    #[serde(rename_all = "camelCase")]
    Paid {
        header: PaymentHeader,
        payment_id: String,
        from_cache: bool,
    },
    /// A policy said no: do not retry with the same key.
    Denied {
        error: String,
        cause: String,
    },
    Failed {
        error: String,
        cause: String,
    },
    /// Shadow mode: decided, nothing paid (no header to send; the merchant is not paid).
    #[serde(rename_all = "camelCase")]
    Shadow {
        decision: crate::shadow::ShadowDecision,
        from_cache: bool,
    },
    /// Not finished (yet): poll `status`.
    Running,
    /// Waiting for a person to approve or reject it (the amount is reserved): poll `status`
    /// later; it ends paid, or denied (ApprovalRejected / ApprovalTimedOut).
    #[serde(rename_all = "camelCase")]
    AwaitingApproval {
        approval_id: String,
    },
}

/// The approval a waiting callback task is about, from the task's scheduled parameters
/// (`Payload.reservation.approval.id`, as the ASL's AwaitApproval passes it).
pub fn approval_in_parameters(parameters: &Value) -> Option<String> {
    parameters.pointer("/Payload/reservation/approval/id").and_then(Value::as_str).map(str::to_owned)
}

/// One history event, readable.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepEvent {
    pub id: u64,
    pub at: Timestamp,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Input, output, error and cause, whichever the event has.
    pub detail: Value,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// RUNNING, SUCCEEDED, FAILED, TIMED_OUT, ABORTED, PENDING_REDRIVE.
    pub status: Option<String>,
    pub agent_id: Option<String>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub limit: Option<usize>,
}

/// The two backends.
#[async_trait]
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Starts an execution; `Ok(None)` when one with that name exists already.
    async fn start_named(&self, name: &str, input: &Value) -> Result<Option<String>, ClientError>;
    async fn describe(&self, id: &str) -> Result<Execution, ClientError>;
    /// Full id (ARN) of an execution name.
    fn execution_arn(&self, name: &str) -> String;
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Execution>, ClientError>;
    async fn history(&self, id: &str) -> Result<Vec<StepEvent>, ClientError>;
    /// Standard workflow? (Express workflows cannot be redriven.)
    async fn is_standard(&self) -> Result<bool, ClientError>;
    /// `redrive_count` is the execution's current count (it keys the request's client token).
    async fn redrive(&self, execution_arn: &str, redrive_count: u32) -> Result<(), ClientError>;
    /// Resumes a RUNNING execution whose runner is gone, where its history ends: `None` where
    /// executions cannot be orphaned (Step Functions drives its own), else whether it was
    /// resumed or why not.
    async fn resume_orphan(&self, _execution_arn: &str) -> Result<Option<Result<(), String>>, ClientError> {
        Ok(None)
    }
}

/// Bounded polling: first delay, growth, cap, overall deadline.
#[derive(Debug, Clone, Copy)]
pub struct WaitOptions {
    pub timeout: Duration,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for WaitOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    pub execution: Execution,
    /// The name was taken by an execution with this input: this is that execution.
    pub already_existed: bool,
    pub answer: PaymentAnswer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReplayAction {
    Redriven,
    /// A RUNNING execution whose runner died, driven on from where its history ends.
    Resumed,
    StartedFresh,
    /// Dry run: what would have been done.
    WouldRedrive,
    WouldStartFresh,
    Skipped,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replay {
    pub execution_arn: String,
    pub action: ReplayAction,
    /// Why not redriven, when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The execution after the replay (the fresh one for StartedFresh).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Execution>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayOptions {
    /// When redrive is impossible, start a new execution with the same input (derived name).
    pub fresh: bool,
    pub dry_run: bool,
    /// Wait for the replayed execution to finish.
    pub wait: Option<WaitOptions>,
}

/// The client an agent or the CLI uses.
pub struct PaymentClient {
    backend: Box<dyn Backend>,
}

impl PaymentClient {
    pub fn new(backend: Box<dyn Backend>) -> Self {
        Self { backend }
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Starts the payment named after its idempotency key; an existing execution of the same
    /// input is described instead (an agent retrying after a crash gets the same outcome).
    pub async fn start(&self, input: &Value, wait: Option<WaitOptions>) -> Result<Started, ClientError> {
        let key = input.get("idempotencyKey").and_then(Value::as_str).filter(|k| !k.is_empty());
        let name = execution_name(key.ok_or(ClientError::NoIdempotencyKey)?, None);
        let (arn, already_existed) = match self.backend.start_named(&name, input).await? {
            Some(arn) => (arn, false),
            None => {
                let arn = self.backend.execution_arn(&name);
                let existing = self.backend.describe(&arn).await?;
                if !existing.input.as_ref().is_some_and(|stored| same_request(stored, input)) {
                    return Err(ClientError::NameTakenByOtherInput { name });
                }
                (arn, true)
            }
        };
        let execution = match wait {
            Some(options) => self.wait(&arn, options).await?,
            None => self.backend.describe(&arn).await?,
        };
        let answer = execution.answer();
        Ok(Started { execution, already_existed, answer })
    }

    /// Polls until the execution closes, waits for a person, or `options.timeout` passes (then
    /// it is returned RUNNING).
    pub async fn wait(&self, id: &str, options: WaitOptions) -> Result<Execution, ClientError> {
        let deadline = tokio::time::Instant::now() + options.timeout;
        let mut delay = options.first_delay;
        loop {
            let execution = self.backend.describe(id).await?;
            let now = tokio::time::Instant::now();
            // A person decides when they decide: the agent hears that it waits, not a time-out.
            if execution.is_closed() || execution.awaiting_approval.is_some() || now >= deadline {
                return Ok(execution);
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(options.max_delay);
        }
    }

    pub async fn status(&self, id: &str) -> Result<Execution, ClientError> {
        self.backend.describe(id).await
    }

    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Execution>, ClientError> {
        self.backend.list(filter).await
    }

    pub async fn history(&self, id: &str) -> Result<Vec<StepEvent>, ClientError> {
        self.backend.history(id).await
    }

    /// Why `execution` cannot be redriven, if it cannot.
    pub async fn redrive_refusal(&self, execution: &Execution, now: Timestamp) -> Result<Option<String>, ClientError> {
        if execution.error.as_deref() == Some(OUTCOME_UNKNOWN) {
            return Ok(Some(format!(
                "it ended in {OUTCOME_UNKNOWN} (a Fail state: a redrive would end there again); a new execution of the same key asks the provider again with the same client token"
            )));
        }
        if !matches!(execution.status.as_str(), "FAILED" | "TIMED_OUT" | "ABORTED") {
            return Ok(Some(format!(
                "its status is {}; only FAILED, TIMED_OUT or ABORTED executions are redriven",
                execution.status
            )));
        }
        if !self.backend.is_standard().await? {
            return Ok(Some("the state machine is an Express workflow; only Standard workflows are redriven".into()));
        }
        if let Some(stopped) = execution.stopped_at
            && stopped.plus(REDRIVE_WINDOW) <= now
        {
            return Ok(Some(format!(
                "it stopped at {}, more than 14 days ago (the redrive window)",
                stopped.to_rfc3339()
            )));
        }
        if let Some(reason) = &execution.not_redrivable_reason {
            return Ok(Some(reason.clone()));
        }
        if !execution.redrivable_per_backend {
            let events = self.backend.history(&execution.execution_arn).await?.len();
            if events >= HISTORY_LIMIT {
                return Ok(Some(format!("its history has {events} events, at the {HISTORY_LIMIT}-event limit")));
            }
        }
        Ok(None)
    }

    /// Redrives a failed execution (succeeded states are not run again); when it cannot be,
    /// says why and — only with `options.fresh` — starts a new execution with the same input
    /// under a derived name. The idempotency record and the client token keep either from
    /// paying twice.
    pub async fn replay(&self, id: &str, now: Timestamp, options: ReplayOptions) -> Result<Replay, ClientError> {
        let execution = self.backend.describe(id).await?;
        let arn = execution.execution_arn.clone();
        let refusal = self.redrive_refusal(&execution, now).await?;
        let done = |action, reason, result| Ok(Replay { execution_arn: arn.clone(), action, reason, result });
        // An unknown outcome is resolved only by asking again under the same key: a new
        // execution adopts the held claim and its client token, so it cannot pay twice.
        let fresh = options.fresh || execution.error.as_deref() == Some(OUTCOME_UNKNOWN);
        if execution.status == "RUNNING" && !options.dry_run {
            match self.backend.resume_orphan(&arn).await? {
                Some(Ok(())) => return done(ReplayAction::Resumed, None, Some(self.backend.describe(&arn).await?)),
                Some(Err(reason)) => return done(ReplayAction::Skipped, Some(reason), None),
                None => {}
            }
        }
        match (refusal, fresh, options.dry_run) {
            (None, _, true) => done(ReplayAction::WouldRedrive, None, None),
            (None, _, false) => {
                self.backend.redrive(&arn, execution.redrive_count).await?;
                let result = match options.wait {
                    Some(wait) => self.wait(&arn, wait).await?,
                    None => self.backend.describe(&arn).await?,
                };
                done(ReplayAction::Redriven, None, Some(result))
            }
            (Some(reason), false, _) => done(
                ReplayAction::Skipped,
                Some(format!("{reason} (pass --fresh to start a new execution with the same input)")),
                None,
            ),
            (Some(reason), true, true) => done(ReplayAction::WouldStartFresh, Some(reason), None),
            (Some(reason), true, false) => {
                let input = execution.input.clone().ok_or_else(|| ClientError::NotFound(format!("input of {arn}")))?;
                let fresh = self.start_fresh(&execution.name, &input).await?;
                let result = match options.wait {
                    Some(wait) => self.wait(&fresh, wait).await?,
                    None => self.backend.describe(&fresh).await?,
                };
                done(ReplayAction::StartedFresh, Some(reason), Some(result))
            }
        }
    }

    /// `<name>-fresh-N` with the first N not taken (names stay within 80 characters).
    async fn start_fresh(&self, name: &str, input: &Value) -> Result<String, ClientError> {
        for n in 1..=1000 {
            let fresh = execution_name(name, Some(&format!("fresh-{n}")));
            if let Some(arn) = self.backend.start_named(&fresh, input).await? {
                return Ok(arn);
            }
        }
        Err(ClientError::backend("start fresh", format!("{name}: 1000 fresh executions exist already")))
    }

    /// Replays every FAILED (and TIMED_OUT, ABORTED) execution started in `[since, until)`,
    /// reporting each one to `progress` as it is done.
    pub async fn replay_all(
        &self,
        filter: &ListFilter,
        now: Timestamp,
        options: ReplayOptions,
        mut progress: impl FnMut(usize, usize, &Replay),
    ) -> Result<Vec<Replay>, ClientError> {
        let mut failed = Vec::new();
        for status in ["FAILED", "TIMED_OUT", "ABORTED"] {
            if filter.status.as_deref().is_some_and(|s| s != status) {
                continue;
            }
            failed.extend(self.backend.list(&ListFilter { status: Some(status.into()), ..filter.clone() }).await?);
        }
        failed.sort_by_key(|e| e.started_at);
        let total = failed.len();
        let mut replays = Vec::with_capacity(total);
        for (index, execution) in failed.iter().enumerate() {
            let replay = match self.replay(&execution.execution_arn, now, options).await {
                Ok(replay) => replay,
                Err(error) => Replay {
                    execution_arn: execution.execution_arn.clone(),
                    action: ReplayAction::Skipped,
                    reason: Some(crate::error::error_chain(&error)),
                    result: None,
                },
            };
            progress(index + 1, total, &replay);
            replays.push(replay);
        }
        Ok(replays)
    }
}
