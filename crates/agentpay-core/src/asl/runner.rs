//! Runs the deployed state machine file locally, dispatching each Task to the in-process
//! step code, and keeps every execution's history in the embedded store.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::definition::{
    Catcher, DefinitionError, Jitter, Retrier, State, StateKind, StateMachine, TaskState, Transition,
};
use super::history;
use super::path::JsonPath;
use crate::clock::{Clock, Timestamp};
use crate::error::PaymentError;
use crate::executions::{ExecutionRecord, ExecutionStatus, ExecutionStore, HistoryEvent, HistoryKind};
use crate::store::ErrorRecord;
use crate::workflow::StepName;

pub const STATE_MACHINE_NAME: &str = "agentpay-payment";
const LOCAL_REGION_ACCOUNT: &str = "local:000000000000";

/// The ARN the local runner substitutes for a step's `${...FunctionArn}`.
pub fn local_function_arn(step: StepName) -> String {
    format!("arn:aws:lambda:{LOCAL_REGION_ACCOUNT}:function:agentpay-{}", step.function_name())
}

/// Substitutions for the local run: every step's ARN placeholder.
pub fn local_substitutions() -> HashMap<String, String> {
    StepName::ALL.iter().map(|s| (s.arn_substitution().to_owned(), local_function_arn(*s))).collect()
}

pub fn local_execution_arn(name: &str) -> String {
    format!("arn:aws:states:{LOCAL_REGION_ACCOUNT}:execution:{STATE_MACHINE_NAME}:{name}")
}

/// How the runner waits between retries.
#[async_trait]
pub trait Sleeper: Send + Sync {
    async fn sleep(&self, duration: Duration);
}

/// Waits for real.
pub struct TokioSleeper;

#[async_trait]
impl Sleeper for TokioSleeper {
    async fn sleep(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }
}

/// Waits `duration / divisor`: the demo's retries take the ASL's shape in a fraction of the time.
pub struct ScaledSleeper(pub u32);

#[async_trait]
impl Sleeper for ScaledSleeper {
    async fn sleep(&self, duration: Duration) {
        tokio::time::sleep(duration / self.0.max(1)).await;
    }
}

/// Does not wait; remembers what it was asked (tests assert the retry schedule).
#[derive(Default)]
pub struct RecordingSleeper(Mutex<Vec<Duration>>);

impl RecordingSleeper {
    pub fn requested(&self) -> Vec<Duration> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

#[async_trait]
impl Sleeper for RecordingSleeper {
    async fn sleep(&self, duration: Duration) {
        if let Ok(mut requested) = self.0.lock() {
            requested.push(duration);
        }
    }
}

/// A Task's failure as Step Functions sees it: the error name its Retry and Catch match, and
/// the cause (a Lambda's is its JSON error document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    pub error: String,
    pub cause: String,
}

impl From<PaymentError> for TaskFailure {
    fn from(failure: PaymentError) -> Self {
        let cause = json!({"errorType": failure.name(), "errorMessage": failure.chain_message()}).to_string();
        Self { error: failure.name().to_owned(), cause }
    }
}

/// What a Task state runs: the steps in-process (`Steps` implements it); the fault simulator wraps it to
/// fail an invocation the way Lambda does (`Sandbox.Timedout`, `Lambda.Unknown`).
#[async_trait]
pub trait TaskHandler: Send + Sync {
    async fn invoke(&self, step: StepName, input: Value) -> Result<Value, TaskFailure>;
}

/// Whether the process that owned a RUNNING execution still exists.
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    } else {
        // No cheap portable check: assume it lives, so nothing is resumed twice.
        true
    }
}

/// Removes an execution from the runner's live set when its drive ends, however it ends
/// (a dropped future included: that is how a dying process looks from inside).
struct LiveGuard {
    live: Arc<Mutex<HashSet<String>>>,
    execution_id: String,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(&self.execution_id);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    #[error("an execution named {0:?} exists already (ExecutionAlreadyExists)")]
    ExecutionAlreadyExists(String),
    #[error("no execution {0:?}")]
    ExecutionNotFound(String),
    #[error("execution {id} cannot be redriven: {reason}")]
    NotRedrivable { id: String, reason: String },
    #[error(transparent)]
    Store(#[from] PaymentError),
}

pub struct LocalRunner {
    machine: StateMachine,
    handler: Arc<dyn TaskHandler>,
    clock: Arc<dyn Clock>,
    executions: Arc<dyn ExecutionStore>,
    sleeper: Arc<dyn Sleeper>,
    resources: HashMap<String, StepName>,
    /// `pid:<pid>:<nonce>`, written into the records this runner drives.
    instance: String,
    /// Executions this runner is driving now.
    live: Arc<Mutex<HashSet<String>>>,
}

enum StateResult {
    Next(String, Value),
    Succeed(Value),
    Fail { error: String, cause: String },
}

/// Appends history in memory; flushed to the store after each task state and at the end.
/// What the events before determine is stored once (see `asl::history`).
struct Recorder {
    execution_id: String,
    next_seq: u32,
    pending: Vec<HistoryEvent>,
    context: history::Context,
}

impl Recorder {
    fn new(execution_id: String, next_seq: u32, execution_input: &Value) -> Self {
        Self { execution_id, next_seq, pending: vec![], context: history::Context::new(Some(execution_input.clone())) }
    }

    fn push(&mut self, at: Timestamp, kind: HistoryKind, state: Option<&str>, details: Value) {
        self.push_derivable(at, kind, state, details, None);
    }

    /// As `push`, for a task state's exit whose output may be its input with the task's
    /// result at `result_path`.
    fn push_derivable(
        &mut self,
        at: Timestamp,
        kind: HistoryKind,
        state: Option<&str>,
        details: Value,
        result_path: Option<&JsonPath>,
    ) {
        let event = HistoryEvent { seq: self.next_seq, at, kind, state: state.map(str::to_owned), details };
        self.pending.push(self.context.compact(event, result_path));
        self.next_seq += 1;
    }

    async fn flush(&mut self, store: &dyn ExecutionStore) -> Result<(), PaymentError> {
        if !self.pending.is_empty() {
            store.append_history(&self.execution_id, &self.pending).await?;
            self.pending.clear();
        }
        Ok(())
    }

    /// The last events and the closed record, together.
    async fn finish(&mut self, store: &dyn ExecutionStore, record: &ExecutionRecord) -> Result<(), PaymentError> {
        store.finish_execution(record, &self.pending).await?;
        self.pending.clear();
        Ok(())
    }
}

fn runtime_error(cause: impl Into<String>) -> StateResult {
    StateResult::Fail { error: "States.Runtime".into(), cause: cause.into() }
}

/// Fills a Parameters/ResultSelector template.
fn render(template: &Value, input: &Value, context: &Value) -> Result<Value, String> {
    match template {
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, value) in map {
                if let Some(name) = key.strip_suffix(".$") {
                    let text = value.as_str().unwrap_or_default();
                    let path = JsonPath::parse(text)?;
                    let source = if path.is_context() { context } else { input };
                    let found = path.get(source).ok_or_else(|| {
                        format!("the JSONPath {text:?} for field {name:?} could not be found in the input")
                    })?;
                    out.insert(name.to_owned(), found.clone());
                } else {
                    out.insert(key.clone(), render(value, input, context)?);
                }
            }
            Ok(Value::Object(out))
        }
        Value::Array(items) => {
            items.iter().map(|i| render(i, input, context)).collect::<Result<_, _>>().map(Value::Array)
        }
        other => Ok(other.clone()),
    }
}

fn select(path: &Option<JsonPath>, input: &Value, what: &str) -> Result<Value, String> {
    match path {
        None => Ok(json!({})),
        Some(path) => path
            .get(input)
            .cloned()
            .ok_or_else(|| format!("{what} {:?} could not be found in the input", path.as_str())),
    }
}

fn combine(result_path: &Option<JsonPath>, raw_input: &Value, result: Value) -> Result<Value, String> {
    match result_path {
        None => Ok(raw_input.clone()),
        Some(path) => path.set(raw_input.clone(), result),
    }
}

/// `States.ALL` matches all but `States.Runtime`; `States.TaskFailed` all but `States.Timeout`.
fn matches_error(error_equals: &[String], error: &str) -> bool {
    error_equals.iter().any(|name| {
        name == error
            || (name == "States.ALL" && error != "States.Runtime")
            || (name == "States.TaskFailed" && error != "States.Timeout" && error != "States.Runtime")
    })
}

/// The wait before retry number `retry` (0-based) of a retrier.
pub fn retry_delay(retrier: &Retrier, retry: u32) -> Duration {
    let exponent = i32::try_from(retry).unwrap_or(i32::MAX);
    let mut seconds = retrier.interval_seconds as f64 * retrier.backoff_rate.powi(exponent);
    if let Some(max) = retrier.max_delay_seconds {
        seconds = seconds.min(max as f64);
    }
    if retrier.jitter == Jitter::Full {
        seconds *= rand::random::<f64>();
    }
    Duration::from_millis((seconds * 1000.0).round() as u64)
}

impl LocalRunner {
    /// Loads `definition` (the ASL file's text) with the local substitutions; Tasks run on
    /// `handler`.
    pub fn new(
        definition: &str,
        handler: Arc<dyn TaskHandler>,
        clock: Arc<dyn Clock>,
        executions: Arc<dyn ExecutionStore>,
        sleeper: Arc<dyn Sleeper>,
    ) -> Result<Self, DefinitionError> {
        let machine = StateMachine::parse(definition, &local_substitutions())?;
        let resources: HashMap<String, StepName> = StepName::ALL.iter().map(|s| (local_function_arn(*s), *s)).collect();
        for state in machine.states.values() {
            if let StateKind::Task(task) = &state.kind
                && !resources.contains_key(&task.resource)
            {
                return Err(DefinitionError::Unsupported(format!(
                    "state {:?}: Task resource {:?} is not one of the agentpay step functions",
                    state.name, task.resource
                )));
            }
        }
        let instance =
            format!("pid:{}:{}", std::process::id(), alloy_primitives::hex::encode(rand::random::<[u8; 4]>()));
        Ok(Self { machine, handler, clock, executions, sleeper, resources, instance, live: Default::default() })
    }

    /// Marks `execution_id` live in this runner until the returned guard drops.
    fn go_live(&self, execution_id: &str) -> LiveGuard {
        if let Ok(mut live) = self.live.lock() {
            live.insert(execution_id.to_owned());
        }
        LiveGuard { live: self.live.clone(), execution_id: execution_id.to_owned() }
    }

    /// Why a RUNNING execution cannot be resumed: its runner may still be driving it.
    fn still_driven(&self, record: &ExecutionRecord) -> Option<String> {
        if self.live.lock().is_ok_and(|live| live.contains(&record.execution_id)) {
            return Some("it is running in this process".into());
        }
        let owner = record.owner.as_deref()?;
        let pid: u32 = owner.strip_prefix("pid:")?.split(':').next()?.parse().ok()?;
        let same_runner = owner == self.instance;
        if !same_runner && pid == std::process::id() {
            return Some(format!("another runner in this process ({owner}) may be driving it"));
        }
        (!same_runner && process_alive(pid)).then(|| format!("process {pid} that runs it is still alive"))
    }

    pub fn executions(&self) -> &Arc<dyn ExecutionStore> {
        &self.executions
    }

    /// Starts an execution named `name` and runs it to the end.
    pub async fn start(&self, name: &str, input: Value) -> Result<ExecutionRecord, RunnerError> {
        let now = self.clock.now();
        let text = |key: &str| input.get(key).and_then(Value::as_str).map(str::to_owned);
        let mut record = ExecutionRecord {
            execution_id: local_execution_arn(name),
            name: name.to_owned(),
            status: ExecutionStatus::Running,
            input: input.clone(),
            output: None,
            error: None,
            failed_state: None,
            started_at: now,
            stopped_at: None,
            redrive_count: 0,
            agent_id: text("agentId"),
            idempotency_key: text("idempotencyKey"),
            owner: Some(self.instance.clone()),
        };
        if !self.executions.create_execution(&record).await? {
            return Err(RunnerError::ExecutionAlreadyExists(name.to_owned()));
        }
        // Only once created: a refused duplicate start must not mark the running one dead.
        let _live = self.go_live(&record.execution_id);
        let mut recorder = Recorder::new(record.execution_id.clone(), 0, &record.input);
        recorder.push(now, HistoryKind::ExecutionStarted, None, json!({"input": input}));
        let start_at = self.machine.start_at.clone();
        self.drive(&mut record, &mut recorder, start_at, input).await?;
        Ok(record)
    }

    /// Resumes a failed execution at the state that failed it, with that state's input.
    /// States that succeeded before are not run again; retry counts start afresh.
    pub async fn redrive(&self, id_or_name: &str) -> Result<ExecutionRecord, RunnerError> {
        let mut record = self
            .executions
            .execution(id_or_name)
            .await?
            .ok_or_else(|| RunnerError::ExecutionNotFound(id_or_name.to_owned()))?;
        let not_redrivable = |reason: String| RunnerError::NotRedrivable { id: record.execution_id.clone(), reason };
        if record.status != ExecutionStatus::Failed {
            return Err(not_redrivable(format!(
                "its status is {}, only FAILED executions are redriven",
                record.status.as_str()
            )));
        }
        let Some(failed_state) = record.failed_state.clone() else {
            return Err(not_redrivable("it has no failed state recorded".into()));
        };
        let history = self.executions.history(&record.execution_id).await?;
        let state_input = history
            .iter()
            .rev()
            .find(|e| e.kind == HistoryKind::StateEntered && e.state.as_deref() == Some(failed_state.as_str()))
            .and_then(|e| e.details.get("input").cloned())
            .ok_or_else(|| not_redrivable(format!("no recorded input for state {failed_state:?}")))?;
        let now = self.clock.now();
        let _live = self.go_live(&record.execution_id);
        record.status = ExecutionStatus::Running;
        record.redrive_count += 1;
        record.error = None;
        record.failed_state = None;
        record.stopped_at = None;
        record.owner = Some(self.instance.clone());
        self.executions.update_execution(&record).await?;
        let mut recorder =
            Recorder::new(record.execution_id.clone(), history.last().map_or(0, |e| e.seq + 1), &record.input);
        recorder.push(
            now,
            HistoryKind::ExecutionRedriven,
            Some(&failed_state),
            json!({"redriveCount": record.redrive_count, "input": state_input}),
        );
        self.drive(&mut record, &mut recorder, failed_state, state_input).await?;
        Ok(record)
    }

    /// Resumes a RUNNING execution whose runner died (its process exited, or its future was
    /// dropped), at the state its recorded history ends in, with that state's input. The
    /// state that was running is run again: every step is idempotent and fenced, so running
    /// it twice pays nothing twice.
    pub async fn resume(&self, id_or_name: &str) -> Result<ExecutionRecord, RunnerError> {
        let mut record = self
            .executions
            .execution(id_or_name)
            .await?
            .ok_or_else(|| RunnerError::ExecutionNotFound(id_or_name.to_owned()))?;
        let refuse = |reason: String| RunnerError::NotRedrivable { id: record.execution_id.clone(), reason };
        if record.status != ExecutionStatus::Running {
            return Err(refuse(format!(
                "its status is {}, only a RUNNING execution is resumed",
                record.status.as_str()
            )));
        }
        if let Some(reason) = self.still_driven(&record) {
            return Err(refuse(format!("{reason}; resume only an execution whose runner is gone")));
        }
        let _live = self.go_live(&record.execution_id);
        let history = self.executions.history(&record.execution_id).await?;
        let mut recorder =
            Recorder::new(record.execution_id.clone(), history.last().map_or(0, |e| e.seq + 1), &record.input);
        let now = self.clock.now();
        // The runner died after recording the end but before updating the record.
        if let Some(last) = history.last() {
            match last.kind {
                HistoryKind::ExecutionSucceeded => {
                    record.status = ExecutionStatus::Succeeded;
                    record.output = last.details.get("output").cloned();
                    record.stopped_at = Some(last.at);
                    self.executions.update_execution(&record).await?;
                    return Ok(record);
                }
                HistoryKind::ExecutionFailed => {
                    let text = |key: &str| last.details.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
                    record.status = ExecutionStatus::Failed;
                    record.error = Some(ErrorRecord { error: text("error"), cause: text("cause") });
                    record.failed_state = last.state.clone();
                    record.stopped_at = Some(last.at);
                    self.executions.update_execution(&record).await?;
                    return Ok(record);
                }
                _ => {}
            }
        }
        let (state, input) = resume_point(&history, &self.machine.start_at, &record.input)
            .ok_or_else(|| refuse("its history names no state to resume at".into()))?;
        record.owner = Some(self.instance.clone());
        self.executions.update_execution(&record).await?;
        recorder.push(now, HistoryKind::ExecutionResumed, Some(&state), json!({"input": input}));
        self.drive(&mut record, &mut recorder, state, input).await?;
        Ok(record)
    }

    async fn drive(
        &self,
        record: &mut ExecutionRecord,
        recorder: &mut Recorder,
        mut state_name: String,
        mut data: Value,
    ) -> Result<(), RunnerError> {
        let clock = self.clock.clone();
        loop {
            let state = self
                .machine
                .states
                .get(&state_name)
                .ok_or_else(|| DefinitionError::Invalid(format!("no state {state_name:?}")))?;
            let entered = clock.now();
            recorder.push(entered, HistoryKind::StateEntered, Some(&state_name), json!({"input": data}));
            let context = json!({
                "Execution": {
                    "Id": record.execution_id,
                    "Name": record.name,
                    "Input": record.input,
                    "StartTime": record.started_at,
                    "RedriveCount": record.redrive_count,
                },
                "StateMachine": {"Id": format!("arn:aws:states:{LOCAL_REGION_ACCOUNT}:stateMachine:{STATE_MACHINE_NAME}"), "Name": STATE_MACHINE_NAME},
                "State": {"Name": state_name, "EnteredTime": entered, "RetryCount": 0},
            });
            let result = self.run_state(state, &data, context, recorder).await;
            let now = clock.now();
            match result {
                StateResult::Next(next, output) => {
                    // `next` too: a resumed execution continues from here.
                    let result_path = match &state.kind {
                        StateKind::Task(task) => task.result_path.as_ref(),
                        _ => None,
                    };
                    recorder.push_derivable(
                        now,
                        HistoryKind::StateExited,
                        Some(&state_name),
                        json!({"output": output, "next": next}),
                        result_path,
                    );
                    // After a task, so a resumed execution does not run it again; a choice or
                    // a pass is run again at no cost if the runner dies before the next flush.
                    if matches!(state.kind, StateKind::Task(_)) {
                        recorder.flush(self.executions.as_ref()).await?;
                    }
                    state_name = next;
                    data = output;
                }
                StateResult::Succeed(output) => {
                    recorder.push(now, HistoryKind::StateExited, Some(&state_name), json!({"output": output}));
                    recorder.push(now, HistoryKind::ExecutionSucceeded, None, json!({"output": output}));
                    record.status = ExecutionStatus::Succeeded;
                    record.output = Some(output);
                    record.stopped_at = Some(now);
                    recorder.finish(self.executions.as_ref(), record).await?;
                    return Ok(());
                }
                StateResult::Fail { error, cause } => {
                    recorder.push(
                        now,
                        HistoryKind::ExecutionFailed,
                        Some(&state_name),
                        json!({"error": error, "cause": cause}),
                    );
                    record.status = ExecutionStatus::Failed;
                    record.error = Some(ErrorRecord { error, cause });
                    record.failed_state = Some(state_name);
                    record.stopped_at = Some(now);
                    recorder.finish(self.executions.as_ref(), record).await?;
                    return Ok(());
                }
            }
        }
    }

    fn after(state: &State, output: Value) -> StateResult {
        match &state.transition {
            Transition::Next(next) => StateResult::Next(next.clone(), output),
            Transition::End | Transition::None => StateResult::Succeed(output),
        }
    }

    async fn run_state(&self, state: &State, raw: &Value, context: Value, recorder: &mut Recorder) -> StateResult {
        let effective = match select(&state.input_path, raw, "InputPath") {
            Ok(value) => value,
            Err(cause) => return runtime_error(cause),
        };
        let output = |value: &Value| select(&state.output_path, value, "OutputPath");
        match &state.kind {
            StateKind::Task(task) => self.run_task(state, task, raw, &effective, context, recorder).await,
            StateKind::Pass { parameters, result, result_path } => {
                let value = match (result, parameters) {
                    (Some(result), _) => Ok(result.clone()),
                    (None, Some(template)) => render(template, &effective, &context),
                    (None, None) => Ok(effective),
                };
                match value.and_then(|v| combine(result_path, raw, v)).and_then(|v| output(&v)) {
                    Ok(out) => Self::after(state, out),
                    Err(cause) => runtime_error(cause),
                }
            }
            StateKind::Choice { choices, default } => {
                let next = choices
                    .iter()
                    .find(|c| c.condition.evaluate(&effective))
                    .map(|c| c.next.clone())
                    .or(default.clone());
                match (next, output(&effective)) {
                    (Some(next), Ok(out)) => StateResult::Next(next, out),
                    (None, _) => StateResult::Fail {
                        error: "States.NoChoiceMatched".into(),
                        cause: format!("no choice rule of state {:?} matched and there is no Default", state.name),
                    },
                    (_, Err(cause)) => runtime_error(cause),
                }
            }
            StateKind::Succeed => match output(&effective) {
                Ok(out) => StateResult::Succeed(out),
                Err(cause) => runtime_error(cause),
            },
            StateKind::Fail { error, cause, error_path, cause_path } => {
                let read = |path: &Option<JsonPath>, fixed: &Option<String>| {
                    path.as_ref()
                        .and_then(|p| p.get(raw))
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                        .or_else(|| fixed.clone())
                        .unwrap_or_default()
                };
                StateResult::Fail { error: read(error_path, error), cause: read(cause_path, cause) }
            }
        }
    }

    async fn run_task(
        &self,
        state: &State,
        task: &TaskState,
        raw: &Value,
        effective: &Value,
        mut context: Value,
        recorder: &mut Recorder,
    ) -> StateResult {
        let clock = self.clock.clone();
        let step = self.resources[&task.resource];
        let mut retries_used = vec![0u32; task.retry.len()];
        let mut retry_count = 0u32;
        loop {
            context["State"]["RetryCount"] = json!(retry_count);
            let parameters = match &task.parameters {
                Some(template) => match render(template, effective, &context) {
                    Ok(value) => value,
                    Err(cause) => return runtime_error(cause),
                },
                None => effective.clone(),
            };
            recorder.push(
                clock.now(),
                HistoryKind::TaskScheduled,
                Some(&state.name),
                json!({"resource": task.resource, "parameters": parameters}),
            );
            let invocation = self.handler.invoke(step, parameters);
            let outcome = match task.timeout_seconds {
                Some(seconds) => {
                    tokio::time::timeout(Duration::from_secs(seconds), invocation).await.unwrap_or_else(|_| {
                        Err(TaskFailure {
                            error: "States.Timeout".into(),
                            cause: format!("the task did not finish within its TimeoutSeconds ({seconds} s)"),
                        })
                    })
                }
                None => invocation.await,
            };
            let (error, cause) = match outcome {
                Ok(result) => {
                    recorder.push(
                        clock.now(),
                        HistoryKind::TaskSucceeded,
                        Some(&state.name),
                        json!({"output": result}),
                    );
                    let selected = match &task.result_selector {
                        Some(template) => render(template, &result, &context),
                        None => Ok(result),
                    };
                    return match selected
                        .and_then(|v| combine(&task.result_path, raw, v))
                        .and_then(|v| select(&state.output_path, &v, "OutputPath"))
                    {
                        Ok(out) => Self::after(state, out),
                        Err(cause) => runtime_error(cause),
                    };
                }
                Err(TaskFailure { error, cause }) => (error, cause),
            };
            recorder.push(
                clock.now(),
                HistoryKind::TaskFailed,
                Some(&state.name),
                json!({"error": error, "cause": cause}),
            );

            if let Some(index) = task.retry.iter().position(|r| matches_error(&r.error_equals, &error)) {
                let retrier = &task.retry[index];
                if retries_used[index] < retrier.max_attempts {
                    let delay = retry_delay(retrier, retries_used[index]);
                    retries_used[index] += 1;
                    retry_count += 1;
                    recorder.push(
                        clock.now(),
                        HistoryKind::TaskRetryScheduled,
                        Some(&state.name),
                        json!({"error": error, "retry": retries_used[index], "maxAttempts": retrier.max_attempts, "delayMillis": delay.as_millis() as u64}),
                    );
                    if let Err(e) = recorder.flush(self.executions.as_ref()).await {
                        tracing::error!(error = %e, "could not persist history before a retry");
                    }
                    self.sleeper.sleep(delay).await;
                    continue;
                }
            }
            return match task.catch.iter().find(|c| matches_error(&c.error_equals, &error)) {
                Some(Catcher { result_path, next, .. }) => {
                    recorder.push(
                        clock.now(),
                        HistoryKind::CatchMatched,
                        Some(&state.name),
                        json!({"error": error, "next": next}),
                    );
                    match combine(result_path, raw, json!({"Error": error, "Cause": cause})) {
                        Ok(out) => StateResult::Next(next.clone(), out),
                        Err(cause) => runtime_error(cause),
                    }
                }
                None => StateResult::Fail { error, cause },
            };
        }
    }
}

/// Where a dead runner's execution continues: the newest recorded point in its history.
fn resume_point(history: &[HistoryEvent], start_at: &str, input: &Value) -> Option<(String, Value)> {
    for event in history.iter().rev() {
        let state = event.state.clone();
        match event.kind {
            HistoryKind::StateExited => {
                let next = event.details.get("next").and_then(Value::as_str)?;
                return Some((next.to_owned(), event.details.get("output")?.clone()));
            }
            HistoryKind::StateEntered | HistoryKind::ExecutionRedriven | HistoryKind::ExecutionResumed => {
                return Some((state?, event.details.get("input")?.clone()));
            }
            HistoryKind::ExecutionStarted => return Some((start_at.to_owned(), input.clone())),
            _ => {}
        }
    }
    Some((start_at.to_owned(), input.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retrier(interval: u64, rate: f64, max_delay: Option<u64>, jitter: Jitter) -> Retrier {
        Retrier {
            error_equals: vec!["X".into()],
            interval_seconds: interval,
            max_attempts: 5,
            backoff_rate: rate,
            max_delay_seconds: max_delay,
            jitter,
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = retrier(2, 2.0, Some(5), Jitter::None);
        let delays: Vec<u64> = (0..4).map(|n| retry_delay(&r, n).as_secs()).collect();
        assert_eq!(delays, [2, 4, 5, 5]);
    }

    #[test]
    fn full_jitter_stays_within_the_backoff() {
        let r = retrier(2, 2.0, None, Jitter::Full);
        for _ in 0..200 {
            assert!(retry_delay(&r, 2) <= Duration::from_secs(8));
        }
    }

    #[test]
    fn error_matching_follows_asl() {
        assert!(matches_error(&["States.ALL".into()], "ProviderUnavailable"));
        assert!(!matches_error(&["States.ALL".into()], "States.Runtime"));
        assert!(matches_error(&["States.TaskFailed".into()], "StoreUnavailable"));
        assert!(!matches_error(&["A".into()], "B"));
    }

    #[test]
    fn render_reads_input_and_context() {
        let template = json!({"a.$": "$.x", "b": {"c.$": "$$.Execution.Id"}, "d": 1});
        let out = render(&template, &json!({"x": 5}), &json!({"Execution": {"Id": "e"}})).unwrap();
        assert_eq!(out, json!({"a": 5, "b": {"c": "e"}, "d": 1}));
        assert!(render(&json!({"a.$": "$.missing"}), &json!({}), &json!({})).is_err());
    }
}
