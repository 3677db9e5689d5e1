//! Runs the deployed state machine file locally, dispatching each Task to the in-process
//! step code, and keeps every execution's history in the embedded store.

use std::borrow::Cow;
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
use crate::executions::{ExecutionFilter, ExecutionRecord, ExecutionStatus, ExecutionStore, HistoryEvent, HistoryKind};
use crate::store::ErrorRecord;
use crate::workflow::StepName;

pub const STATE_MACHINE_NAME: &str = "agentpay-payment";
const LOCAL_REGION_ACCOUNT: &str = "local:000000000000";

/// The Lambda callback integration: invoke the function with a task token, then wait for
/// SendTaskSuccess / SendTaskFailure with that token (or the task's time-out).
pub const LAMBDA_CALLBACK_RESOURCE: &str = "arn:aws:states:::lambda:invoke.waitForTaskToken";
/// The SNS publish integration (request-response).
pub const SNS_PUBLISH_RESOURCE: &str = "arn:aws:states:::sns:publish";
/// What `${OperatorsTopicArn}` becomes locally: the runner's notifier receives what is published.
pub const LOCAL_OPERATORS_TOPIC: &str = "arn:aws:sns:local:000000000000:agentpay-operators";
/// The substitution naming the operators' SNS topic.
pub const OPERATORS_TOPIC_SUBSTITUTION: &str = "OperatorsTopicArn";

/// The ARN the local runner substitutes for a step's `${...FunctionArn}`.
pub fn local_function_arn(step: StepName) -> String {
    format!("arn:aws:lambda:{LOCAL_REGION_ACCOUNT}:function:agentpay-{}", step.function_name())
}

/// Substitutions for the local run: every step's ARN placeholder and the operators' topic.
pub fn local_substitutions() -> HashMap<String, String> {
    let mut substitutions: HashMap<String, String> =
        StepName::ALL.iter().map(|s| (s.arn_substitution().to_owned(), local_function_arn(*s))).collect();
    substitutions.insert(OPERATORS_TOPIC_SUBSTITUTION.to_owned(), LOCAL_OPERATORS_TOPIC.to_owned());
    substitutions
}

/// What the state machine publishes to a topic (`sns:publish`), locally.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Notification {
    pub topic: String,
    pub subject: Option<String>,
    pub message: String,
}

/// Where the local runner's `sns:publish` tasks go.
#[async_trait]
pub trait Notifier: Send + Sync {
    /// Publishes; returns a message id.
    async fn publish(&self, notification: &Notification) -> Result<String, TaskFailure>;
}

/// Logs each notification (the default: never a silent drop).
pub struct TracingNotifier;

#[async_trait]
impl Notifier for TracingNotifier {
    async fn publish(&self, notification: &Notification) -> Result<String, TaskFailure> {
        tracing::warn!(topic = %notification.topic, subject = ?notification.subject, message = %notification.message, "notification for operators");
        Ok(alloy_primitives::hex::encode(rand::random::<[u8; 8]>()))
    }
}

/// A new task token for a callback task of `execution_id` (the runner finds the execution by it).
fn new_task_token(execution_id: &str) -> String {
    format!("{}.{execution_id}", alloy_primitives::hex::encode(rand::random::<[u8; 16]>()))
}

/// A callback task the execution waits on, as its history's last event records it.
struct Waiting {
    token: String,
    state: String,
    deadline: Option<Timestamp>,
    retry_count: u32,
}

fn waiting_on(history: &[HistoryEvent]) -> Option<Waiting> {
    let last = history.last().filter(|e| e.kind == HistoryKind::TaskSubmitted)?;
    Some(Waiting {
        token: last.details.get("token")?.as_str()?.to_owned(),
        state: last.state.clone()?,
        deadline: last.details.get("deadline").and_then(|d| serde_json::from_value(d.clone()).ok()),
        retry_count: last.details.get("retryCount").and_then(Value::as_u64).unwrap_or(0) as u32,
    })
}

/// How a Task state's resource is run locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskTarget {
    /// A step function's ARN: invoked, its result is the task's.
    Step(StepName),
    /// `lambda:invoke.waitForTaskToken` on a step function: invoked with a token, then the
    /// execution waits for the token's answer.
    Callback(StepName),
    /// `sns:publish`: handed to the notifier.
    Notify,
}

/// How a drive begins.
enum Entry {
    /// At the start, or at a redriven state.
    Fresh,
    /// Where a dead runner's history ends: the first task reached may have run unrecorded.
    Resumed,
    /// At a waiting task, with its answer.
    Answered(Answer),
}

/// A waiting task's answer, fed back into the task when the execution continues.
struct Answer {
    outcome: Result<Value, TaskFailure>,
    retry_count: u32,
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
    /// SendTaskSuccess / SendTaskFailure with a token nobody waits on.
    #[error("task token not waited on: {0}")]
    TaskNotWaiting(String),
    /// The answer came after the task's time-out: the execution went on with `States.Timeout`.
    #[error("the task timed out at {0} before the answer came; the execution continued with States.Timeout")]
    TaskTimedOut(String),
    #[error(transparent)]
    Store(#[from] PaymentError),
}

pub struct LocalRunner {
    machine: StateMachine,
    handler: Arc<dyn TaskHandler>,
    clock: Arc<dyn Clock>,
    executions: Arc<dyn ExecutionStore>,
    sleeper: Arc<dyn Sleeper>,
    notifier: Arc<dyn Notifier>,
    /// Each Task state's target, by state name.
    targets: HashMap<String, TaskTarget>,
    /// `pid:<pid>:<nonce>`, written into the records this runner drives.
    instance: String,
    /// Executions this runner is driving now.
    live: Arc<Mutex<HashSet<String>>>,
    /// See `with_steps_writing_to_another_store`.
    steps_write_elsewhere: bool,
}

enum StateResult {
    Next(String, Value),
    Succeed(Value),
    Fail {
        error: String,
        cause: String,
    },
    /// A callback task is waiting for its token's answer.
    Wait {
        token: String,
        deadline: Option<Timestamp>,
        retry_count: u32,
    },
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
        let event = HistoryEvent { seq: self.next_seq, at, kind, state: state.map(str::to_owned), details };
        self.pending.push(self.context.compact(event, None));
        self.next_seq += 1;
    }

    /// A state entered with `input` (compared with what the event before handed on, not copied
    /// when it is the same).
    fn entered(&mut self, at: Timestamp, state: &str, input: &Value) {
        let details = self.context.entered(input);
        self.record(at, HistoryKind::StateEntered, Some(state), details);
    }

    /// A state exited with `output`. `result_path` is its `ResultPath` when it is a task state
    /// with no `ResultSelector` or `OutputPath` (its output may be its input with the result there).
    fn exited(
        &mut self,
        at: Timestamp,
        state: &str,
        output: &Value,
        next: Option<&str>,
        result_path: Option<&JsonPath>,
    ) {
        let details = self.context.exited(output, next, result_path);
        self.record(at, HistoryKind::StateExited, Some(state), details);
    }

    fn succeeded(&mut self, at: Timestamp, output: &Value) {
        let details = self.context.succeeded(output);
        self.record(at, HistoryKind::ExecutionSucceeded, None, details);
    }

    /// Appends an event already in its stored form.
    fn record(&mut self, at: Timestamp, kind: HistoryKind, state: Option<&str>, details: Value) {
        self.pending.push(HistoryEvent { seq: self.next_seq, at, kind, state: state.map(str::to_owned), details });
        self.next_seq += 1;
    }

    /// Hands the pending events to the store, not waiting for them to be durable: every path
    /// ends in a waited write (`finish` or `update_execution`) before the runner answers.
    async fn flush(&mut self, store: &dyn ExecutionStore) -> Result<(), PaymentError> {
        if !self.pending.is_empty() {
            store.append_history_deferred(&self.execution_id, &self.pending).await?;
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

/// InputPath: the state's effective input, borrowed when the path is `$` (most states), so a
/// payment's data is not copied at every state.
fn select_input<'a>(path: &Option<JsonPath>, input: &'a Value) -> Result<Cow<'a, Value>, String> {
    match path {
        Some(path) if path.is_root() => Ok(Cow::Borrowed(input)),
        _ => select(path, input, "InputPath").map(Cow::Owned),
    }
}

/// OutputPath on a value the state owns: moved, not copied, when the path is `$`.
fn select_output(path: &Option<JsonPath>, value: Value) -> Result<Value, String> {
    match path {
        Some(path) if path.is_root() => Ok(value),
        _ => select(path, &value, "OutputPath"),
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
        let mut targets = HashMap::new();
        for state in machine.states.values() {
            if let StateKind::Task(task) = &state.kind {
                targets.insert(state.name.clone(), task_target(&state.name, task)?);
            }
        }
        let instance =
            format!("pid:{}:{}", std::process::id(), alloy_primitives::hex::encode(rand::random::<[u8; 4]>()));
        Ok(Self {
            machine,
            handler,
            clock,
            executions,
            sleeper,
            notifier: Arc::new(TracingNotifier),
            targets,
            instance,
            live: Default::default(),
            steps_write_elsewhere: false,
        })
    }

    /// The steps keep the ledger in another store than the executions (the local runner over
    /// DynamoDB): an execution's creation is then made durable before its first step runs, as
    /// the steps' writes to their own store do not commit it.
    pub fn with_steps_writing_to_another_store(mut self) -> Self {
        self.steps_write_elsewhere = true;
        self
    }

    /// Sends what `sns:publish` tasks publish to `notifier` (the default logs it).
    pub fn with_notifier(mut self, notifier: Arc<dyn Notifier>) -> Self {
        self.notifier = notifier;
        self
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
        if self.steps_write_elsewhere {
            // Else a claim durable in the steps' store could outlive the execution it names.
            self.executions.executions_durable().await?;
        }
        // Only once created: a refused duplicate start must not mark the running one dead.
        let _live = self.go_live(&record.execution_id);
        let mut recorder = Recorder::new(record.execution_id.clone(), 0, &record.input);
        recorder.push(now, HistoryKind::ExecutionStarted, None, json!({"input": input}));
        let start_at = self.machine.start_at.clone();
        self.drive(&mut record, &mut recorder, start_at, input, Entry::Fresh).await?;
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
        self.drive(&mut record, &mut recorder, failed_state, state_input, Entry::Fresh).await?;
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
        let history = self.executions.history(&record.execution_id).await?;
        if let Some(waiting) = waiting_on(&history) {
            return Err(refuse(format!(
                "it is waiting in state {:?} for its task token's answer (a person's approval: `agentpay approve` or `agentpay reject`){}",
                waiting.state,
                waiting.deadline.map(|d| format!(", or its time-out at {}", d.to_rfc3339())).unwrap_or_default()
            )));
        }
        let _live = self.go_live(&record.execution_id);
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
        self.drive(&mut record, &mut recorder, state, input, Entry::Resumed).await?;
        Ok(record)
    }

    /// SendTaskSuccess: the waiting task of the token's execution succeeds with `output`, and
    /// the execution runs on (to its end or its next wait).
    pub async fn send_task_success(&self, token: &str, output: Value) -> Result<ExecutionRecord, RunnerError> {
        self.answer(token, Ok(output)).await
    }

    /// SendTaskFailure: the waiting task fails with `error` and `cause` (its Retry and Catch apply).
    pub async fn send_task_failure(
        &self,
        token: &str,
        error: &str,
        cause: &str,
    ) -> Result<ExecutionRecord, RunnerError> {
        self.answer(token, Err(TaskFailure { error: error.to_owned(), cause: cause.to_owned() })).await
    }

    /// Fails every waiting task whose time-out has passed with `States.Timeout`, as Step
    /// Functions' timer would have; returns how many. Locally nothing runs between commands,
    /// so the CLI calls this before it reads or answers approvals.
    pub async fn expire_waits(&self) -> Result<usize, RunnerError> {
        let filter = ExecutionFilter { status: Some(ExecutionStatus::Running), ..Default::default() };
        let now = self.clock.now();
        let mut expired = 0;
        for record in self.executions.list_executions(&filter).await? {
            let history = self.executions.history(&record.execution_id).await?;
            let Some(waiting) = waiting_on(&history) else { continue };
            if waiting.deadline.is_some_and(|deadline| deadline <= now) {
                match self.answer(&waiting.token, Err(timed_out(None))).await {
                    Ok(_) | Err(RunnerError::TaskTimedOut(_)) => expired += 1,
                    // Answered meanwhile by another command: not ours to expire.
                    Err(RunnerError::TaskNotWaiting(_)) => {}
                    Err(other) => return Err(other),
                }
            }
        }
        Ok(expired)
    }

    /// Feeds `outcome` to the task waiting on `token` and drives the execution on. Past the
    /// task's deadline the outcome is `States.Timeout` whatever was sent.
    async fn answer(&self, token: &str, outcome: Result<Value, TaskFailure>) -> Result<ExecutionRecord, RunnerError> {
        let not_waiting = |why: String| RunnerError::TaskNotWaiting(why);
        let execution_id =
            token.split_once('.').map(|(_, id)| id).ok_or_else(|| not_waiting("malformed token".into()))?;
        let mut record = self
            .executions
            .execution(execution_id)
            .await?
            .ok_or_else(|| not_waiting(format!("no execution {execution_id:?}")))?;
        if record.status != ExecutionStatus::Running {
            return Err(not_waiting(format!("execution {} is {}", record.execution_id, record.status.as_str())));
        }
        if self.live.lock().is_ok_and(|live| live.contains(&record.execution_id)) {
            return Err(not_waiting(format!("execution {} is being run on already", record.execution_id)));
        }
        let history = self.executions.history(&record.execution_id).await?;
        let waiting = waiting_on(&history).filter(|w| w.token == token).ok_or_else(|| {
            not_waiting(format!(
                "execution {} is not waiting for this token (it was answered before, timed out, or its task was retried with a new token)",
                record.execution_id
            ))
        })?;
        let state_input = history
            .iter()
            .rev()
            .find(|e| e.kind == HistoryKind::StateEntered && e.state.as_deref() == Some(waiting.state.as_str()))
            .and_then(|e| e.details.get("input").cloned())
            .ok_or_else(|| not_waiting(format!("no recorded input for state {:?}", waiting.state)))?;
        let now = self.clock.now();
        let late = waiting.deadline.filter(|deadline| *deadline <= now);
        let outcome = if late.is_some() { Err(timed_out(None)) } else { outcome };
        let _live = self.go_live(&record.execution_id);
        record.owner = Some(self.instance.clone());
        self.executions.update_execution(&record).await?;
        let mut recorder =
            Recorder::new(record.execution_id.clone(), history.last().map_or(0, |e| e.seq + 1), &record.input);
        let answer = Answer { outcome, retry_count: waiting.retry_count };
        self.drive(&mut record, &mut recorder, waiting.state, state_input, Entry::Answered(answer)).await?;
        match late {
            Some(deadline) => Err(RunnerError::TaskTimedOut(deadline.to_rfc3339())),
            None => Ok(record),
        }
    }

    async fn drive(
        &self,
        record: &mut ExecutionRecord,
        recorder: &mut Recorder,
        mut state_name: String,
        mut data: Value,
        entry: Entry,
    ) -> Result<(), RunnerError> {
        let clock = self.clock.clone();
        let (mut answer, mut resumed) = match entry {
            Entry::Fresh => (None, false),
            Entry::Resumed => (None, true),
            Entry::Answered(answer) => (Some(answer), false),
        };
        // The context object ($$), built once: its execution part (with the execution's whole
        // input) is the same for every state; only `State` (and a task's `Task`) change.
        let mut context = json!({
            "Execution": {
                "Id": record.execution_id,
                "Name": record.name,
                "Input": record.input,
                "StartTime": record.started_at,
                "RedriveCount": record.redrive_count,
            },
            "StateMachine": {"Id": format!("arn:aws:states:{LOCAL_REGION_ACCOUNT}:stateMachine:{STATE_MACHINE_NAME}"), "Name": STATE_MACHINE_NAME},
        });
        loop {
            let state = self
                .machine
                .states
                .get(&state_name)
                .ok_or_else(|| DefinitionError::Invalid(format!("no state {state_name:?}")))?;
            let entered = clock.now();
            // A waiting task's answer continues the state it entered before.
            if answer.is_none() {
                recorder.entered(entered, &state_name, &data);
            }
            if let Some(fields) = context.as_object_mut() {
                fields.remove("Task");
                fields.insert("State".into(), json!({"Name": state_name, "EnteredTime": entered, "RetryCount": 0}));
            }
            // A resumed execution's first task may have run before the runner died, unrecorded
            // (history is flushed after each task): it runs again as a retry would, so a step
            // that must know whether an earlier call may have happened (ProcessPayment) knows.
            let may_have_run = resumed && matches!(state.kind, StateKind::Task(_));
            if may_have_run {
                resumed = false;
            }
            let result = self.run_state(state, &data, &mut context, recorder, answer.take(), may_have_run).await;
            let now = clock.now();
            match result {
                StateResult::Wait { token, deadline, retry_count } => {
                    recorder.push(
                        now,
                        HistoryKind::TaskSubmitted,
                        Some(&state_name),
                        json!({"token": token, "deadline": deadline, "retryCount": retry_count}),
                    );
                    recorder.flush(self.executions.as_ref()).await?;
                    // Nobody drives it until the token is answered (or its time-out passes).
                    record.owner = None;
                    self.executions.update_execution(record).await?;
                    return Ok(());
                }
                StateResult::Next(next, output) => {
                    // `next` too: a resumed execution continues from here.
                    let result_path = match &state.kind {
                        StateKind::Task(task) => task.result_path.as_ref(),
                        _ => None,
                    };
                    recorder.exited(now, &state_name, &output, Some(&next), result_path);
                    // After a task, so a resumed execution does not run it again; a choice or
                    // a pass is run again at no cost if the runner dies before the next flush.
                    if matches!(state.kind, StateKind::Task(_)) {
                        recorder.flush(self.executions.as_ref()).await?;
                    }
                    state_name = next;
                    data = output;
                }
                StateResult::Succeed(output) => {
                    recorder.exited(now, &state_name, &output, None, None);
                    recorder.succeeded(now, &output);
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

    /// `sns:publish`, locally: the notifier gets it.
    async fn publish(&self, parameters: &Value) -> Result<Value, TaskFailure> {
        let text = |key: &str| parameters.get(key).and_then(Value::as_str).map(str::to_owned);
        let (Some(topic), Some(message)) = (text("TopicArn"), text("Message")) else {
            return Err(TaskFailure {
                error: "SNS.InvalidParameterException".into(),
                cause: "sns:publish needs the strings TopicArn and Message in its Parameters".into(),
            });
        };
        let id = self.notifier.publish(&Notification { topic, subject: text("Subject"), message }).await?;
        Ok(json!({ "MessageId": id }))
    }

    fn after(state: &State, output: Value) -> StateResult {
        match &state.transition {
            Transition::Next(next) => StateResult::Next(next.clone(), output),
            Transition::End | Transition::None => StateResult::Succeed(output),
        }
    }

    async fn run_state(
        &self,
        state: &State,
        raw: &Value,
        context: &mut Value,
        recorder: &mut Recorder,
        answer: Option<Answer>,
        may_have_run: bool,
    ) -> StateResult {
        let effective = match select_input(&state.input_path, raw) {
            Ok(value) => value,
            Err(cause) => return runtime_error(cause),
        };
        let output = |value: Value| select_output(&state.output_path, value);
        match &state.kind {
            StateKind::Task(task) => {
                self.run_task(state, task, raw, &effective, context, recorder, answer, may_have_run).await
            }
            StateKind::Pass { parameters, result, result_path } => {
                let value = match (result, parameters) {
                    (Some(result), _) => Ok(result.clone()),
                    (None, Some(template)) => render(template, &effective, context),
                    (None, None) => Ok(effective.into_owned()),
                };
                match value.and_then(|v| combine(result_path, raw, v)).and_then(output) {
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
                match (next, output(effective.into_owned())) {
                    (Some(next), Ok(out)) => StateResult::Next(next, out),
                    (None, _) => StateResult::Fail {
                        error: "States.NoChoiceMatched".into(),
                        cause: format!("no choice rule of state {:?} matched and there is no Default", state.name),
                    },
                    (_, Err(cause)) => runtime_error(cause),
                }
            }
            StateKind::Succeed => match output(effective.into_owned()) {
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

    #[allow(clippy::too_many_arguments)] // the state, its data, and where to record: one call site
    async fn run_task(
        &self,
        state: &State,
        task: &TaskState,
        raw: &Value,
        effective: &Value,
        context: &mut Value,
        recorder: &mut Recorder,
        mut answer: Option<Answer>,
        may_have_run: bool,
    ) -> StateResult {
        let clock = self.clock.clone();
        let target = self.targets[&state.name];
        let mut retries_used = vec![0u32; task.retry.len()];
        let mut retry_count = answer.as_ref().map_or(u32::from(may_have_run), |a| a.retry_count);
        loop {
            context["State"]["RetryCount"] = json!(retry_count);
            let outcome = match answer.take() {
                Some(answer) => answer.outcome,
                None => {
                    let token = matches!(target, TaskTarget::Callback(_))
                        .then(|| new_task_token(context["Execution"]["Id"].as_str().unwrap_or_default()));
                    if let Some(token) = &token {
                        context["Task"] = json!({"Token": token});
                    }
                    let parameters = match &task.parameters {
                        Some(template) => match render(template, effective, context) {
                            Ok(value) => value,
                            Err(cause) => return runtime_error(cause),
                        },
                        None => effective.clone(),
                    };
                    let timeout = match task_timeout(task, effective) {
                        Ok(timeout) => timeout,
                        Err(cause) => return runtime_error(cause),
                    };
                    let scheduled = clock.now();
                    recorder.push(
                        scheduled,
                        HistoryKind::TaskScheduled,
                        Some(&state.name),
                        json!({"resource": task.resource, "parameters": parameters}),
                    );
                    match (target, token) {
                        (TaskTarget::Callback(step), Some(token)) => {
                            let payload = parameters.get("Payload").cloned().unwrap_or_else(|| json!({}));
                            match self.handler.invoke(step, payload).await {
                                Ok(_) => {
                                    let deadline = timeout.map(|t| scheduled.plus(t));
                                    return StateResult::Wait { token, deadline, retry_count };
                                }
                                Err(failure) => Err(failure),
                            }
                        }
                        (TaskTarget::Notify, _) => self.publish(&parameters).await,
                        (TaskTarget::Step(step) | TaskTarget::Callback(step), _) => {
                            let invocation = self.handler.invoke(step, parameters);
                            match timeout {
                                Some(limit) => tokio::time::timeout(limit, invocation)
                                    .await
                                    .unwrap_or_else(|_| Err(timed_out(Some(limit)))),
                                None => invocation.await,
                            }
                        }
                    }
                }
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
                        Some(template) => render(template, &result, context),
                        None => Ok(result),
                    };
                    return match selected
                        .and_then(|v| combine(&task.result_path, raw, v))
                        .and_then(|v| select_output(&state.output_path, v))
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

/// The failure of a task past its time-out.
fn timed_out(limit: Option<Duration>) -> TaskFailure {
    TaskFailure {
        error: "States.Timeout".into(),
        cause: match limit {
            Some(limit) => format!("the task did not finish within its time-out ({} s)", limit.as_secs()),
            None => "the task was not answered within its time-out".into(),
        },
    }
}

/// `TimeoutSeconds`, or `TimeoutSecondsPath` read from the state's input (a positive integer).
fn task_timeout(task: &TaskState, input: &Value) -> Result<Option<Duration>, String> {
    if let Some(seconds) = task.timeout_seconds {
        return Ok(Some(Duration::from_secs(seconds)));
    }
    let Some(path) = &task.timeout_seconds_path else { return Ok(None) };
    let value = path
        .get(input)
        .ok_or_else(|| format!("TimeoutSecondsPath {:?} could not be found in the input", path.as_str()))?;
    value
        .as_u64()
        .filter(|s| *s > 0)
        .map(|s| Some(Duration::from_secs(s)))
        .ok_or_else(|| format!("TimeoutSecondsPath {:?}: received {value}, expected a positive integer", path.as_str()))
}

/// How the runner runs a Task state's resource.
fn task_target(state: &str, task: &TaskState) -> Result<TaskTarget, DefinitionError> {
    let step_of = |arn: &str| StepName::ALL.into_iter().find(|s| local_function_arn(*s) == arn);
    let unsupported = |what: String| DefinitionError::Unsupported(format!("state {state:?}: {what}"));
    match task.resource.as_str() {
        LAMBDA_CALLBACK_RESOURCE => {
            let function = task.parameters.as_ref().and_then(|p| p.get("FunctionName")).and_then(Value::as_str);
            match function.and_then(step_of) {
                Some(step) => Ok(TaskTarget::Callback(step)),
                None => Err(unsupported(format!(
                    "the callback task's Parameters.FunctionName {function:?} is not one of the agentpay step functions"
                ))),
            }
        }
        SNS_PUBLISH_RESOURCE => Ok(TaskTarget::Notify),
        arn => step_of(arn).map(TaskTarget::Step).ok_or_else(|| {
            unsupported(format!("Task resource {arn:?} is not one of the agentpay step functions or integrations"))
        }),
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
