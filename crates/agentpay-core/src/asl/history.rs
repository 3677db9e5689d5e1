//! Execution history as the local runner stores it: what can be derived from the events before
//! is not written again, and [`expand`] puts it back on read, so every reader sees the history
//! as recorded. Most of a payment's history is the same data passed from state to state; left
//! whole it was ~47 KB per payment, the bulk of what the local store writes.
//!
//! Left out, and put back on read:
//! - a state's input, when it is what the event before handed on (the previous state's output,
//!   or the execution's input);
//! - a task's `request` parameter, when it is the execution's input (`$$.Execution.Input`);
//! - a task state's output, when it is its input with the task's result set at its
//!   `ResultPath` (checked when recorded: stored whole otherwise);
//! - a state's output, when it is its input (a Choice, a Succeed without paths);
//! - the execution's output, when it is what the state before handed on.
//!
//! Recording is on every payment's path, so it compares and moves rather than copies: the
//! data a state hands on is kept once, and cloned only where a copy is stored.

use serde_json::{Map, Value, json};

use super::path::JsonPath;
use crate::executions::{HistoryEvent, HistoryKind};

/// Marker: this `StateEntered` input is what the previous event handed on.
const INPUT_IS_PREVIOUS_OUTPUT: &str = "inputIsPreviousOutput";
/// Marker: this `TaskScheduled`'s `request` parameter is the execution's input.
const REQUEST_IS_EXECUTION_INPUT: &str = "requestIsExecutionInput";
/// Marker (the path): this `StateExited` output is the state's input with the task's result
/// set at that path.
const OUTPUT_IS_RESULT_AT: &str = "outputIsInputWithResultAt";
/// Marker: this `StateExited` output is the state's input.
const OUTPUT_IS_INPUT: &str = "outputIsInput";
/// Marker: this `ExecutionSucceeded` output is what the previous event handed on.
const OUTPUT_IS_PREVIOUS_OUTPUT: &str = "outputIsPreviousOutput";

/// The data an event hands to the next state: an exit's output, a start's input.
fn handed_on(kind: HistoryKind) -> Option<&'static str> {
    match kind {
        HistoryKind::StateExited => Some("output"),
        HistoryKind::ExecutionStarted | HistoryKind::ExecutionRedriven | HistoryKind::ExecutionResumed => Some("input"),
        _ => None,
    }
}

/// What the compaction of the next event needs to know of the ones before (uncompacted).
#[derive(Debug, Default)]
pub struct Context {
    execution_input: Option<Value>,
    /// What the previous event handed on, if it handed anything.
    handed: Option<Value>,
    state_input: Option<Value>,
    task_output: Option<Value>,
}

impl Context {
    pub fn new(execution_input: Option<Value>) -> Self {
        Self { execution_input, ..Self::default() }
    }

    /// The stored details of a `StateEntered` with `input`.
    pub fn entered(&mut self, input: &Value) -> Value {
        let handed = self.handed.take();
        let (details, state_input) = match handed {
            Some(handed) if handed == *input => (json!({ INPUT_IS_PREVIOUS_OUTPUT: true }), handed),
            _ => (json!({ "input": input }), input.clone()),
        };
        self.state_input = Some(state_input);
        self.task_output = None;
        details
    }

    /// The stored details of a `StateExited` with `output` (and `next`, unless it ends the
    /// execution). `result_path` is the state's `ResultPath` when it is a task state with no
    /// `ResultSelector` or `OutputPath` (its output may be derivable).
    pub fn exited(&mut self, output: &Value, next: Option<&str>, result_path: Option<&JsonPath>) -> Value {
        let mut details = Map::new();
        if let Some(next) = next {
            details.insert("next".into(), json!(next));
        }
        let derivable = match (result_path, &self.state_input, &self.task_output) {
            (Some(path), Some(input), Some(result)) => path.holds_set(output, input, result),
            _ => false,
        };
        if let (true, Some(path)) = (derivable, result_path) {
            details.insert(OUTPUT_IS_RESULT_AT.into(), json!(path.as_str()));
        } else if self.state_input.as_ref() == Some(output) {
            details.insert(OUTPUT_IS_INPUT.into(), json!(true));
        } else {
            details.insert("output".into(), output.clone());
        }
        self.handed = Some(output.clone());
        Value::Object(details)
    }

    /// The stored details of `ExecutionSucceeded` with `output`.
    pub fn succeeded(&mut self, output: &Value) -> Value {
        match self.handed.take() {
            Some(handed) if handed == *output => json!({ OUTPUT_IS_PREVIOUS_OUTPUT: true }),
            _ => json!({ "output": output }),
        }
    }

    /// `event` as stored.
    pub fn compact(&mut self, event: HistoryEvent, result_path: Option<&JsonPath>) -> HistoryEvent {
        let mut stored = event;
        match stored.kind {
            HistoryKind::StateEntered if stored.details.get("input").is_some() => {
                stored.details = self.entered(&stored.details["input"]);
                return stored;
            }
            HistoryKind::StateExited if stored.details.get("output").is_some() => {
                let next = stored.details.get("next").and_then(Value::as_str).map(str::to_owned);
                stored.details = self.exited(&stored.details["output"], next.as_deref(), result_path);
                return stored;
            }
            HistoryKind::ExecutionSucceeded if stored.details.get("output").is_some() => {
                stored.details = self.succeeded(&stored.details["output"]);
                return stored;
            }
            HistoryKind::TaskScheduled => {
                let request = stored.details.pointer("/parameters/request");
                if request.is_some() && request == self.execution_input.as_ref() {
                    if let Some(parameters) = stored.details.get_mut("parameters").and_then(Value::as_object_mut) {
                        parameters.remove("request");
                    }
                    stored.details[REQUEST_IS_EXECUTION_INPUT] = json!(true);
                }
            }
            _ => {}
        }
        self.observe(&stored);
        stored
    }

    /// Takes in an event whose details are as recorded (for the kinds `compact` does not
    /// rewrite, stored and recorded are the same but for the request marker).
    fn observe(&mut self, event: &HistoryEvent) {
        match event.kind {
            HistoryKind::ExecutionStarted => self.execution_input = event.details.get("input").cloned(),
            HistoryKind::StateEntered => {
                self.state_input = event.details.get("input").cloned();
                self.task_output = None;
            }
            HistoryKind::TaskSucceeded => self.task_output = event.details.get("output").cloned(),
            HistoryKind::TaskFailed => self.task_output = None,
            _ => {}
        }
        self.handed = handed_on(event.kind).and_then(|key| event.details.get(key)).cloned();
    }

    /// `stored` as recorded.
    fn expand(&mut self, stored: HistoryEvent) -> HistoryEvent {
        let mut event = stored;
        match event.kind {
            HistoryKind::StateEntered if event.details.get(INPUT_IS_PREVIOUS_OUTPUT).is_some() => {
                if let Some(handed) = &self.handed {
                    event.details = json!({ "input": handed });
                }
            }
            HistoryKind::TaskScheduled if event.details.get(REQUEST_IS_EXECUTION_INPUT).is_some() => {
                if let (Some(input), Some(details)) = (&self.execution_input, event.details.as_object_mut()) {
                    details.remove(REQUEST_IS_EXECUTION_INPUT);
                    if let Some(parameters) = details.get_mut("parameters").and_then(Value::as_object_mut) {
                        parameters.insert("request".into(), input.clone());
                    }
                }
            }
            HistoryKind::StateExited => {
                let path = event.details.get(OUTPUT_IS_RESULT_AT).and_then(Value::as_str).map(JsonPath::parse);
                let output = match (path, &self.state_input, &self.task_output) {
                    (Some(Ok(path)), Some(input), Some(result)) => path.set(input.clone(), result.clone()).ok(),
                    _ if event.details.get(OUTPUT_IS_INPUT).is_some() => self.state_input.clone(),
                    _ => None,
                };
                if let (Some(output), Some(details)) = (output, event.details.as_object_mut()) {
                    details.remove(OUTPUT_IS_RESULT_AT);
                    details.remove(OUTPUT_IS_INPUT);
                    details.insert("output".into(), output);
                }
            }
            HistoryKind::ExecutionSucceeded if event.details.get(OUTPUT_IS_PREVIOUS_OUTPUT).is_some() => {
                if let Some(handed) = &self.handed {
                    event.details = json!({ "output": handed });
                }
            }
            _ => {}
        }
        self.observe(&event);
        event
    }
}

/// A history as recorded, from the events as stored (the whole history, from its first event).
pub fn expand(stored: Vec<HistoryEvent>) -> Vec<HistoryEvent> {
    let mut context = Context::default();
    stored.into_iter().map(|event| context.expand(event)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;

    fn event(seq: u32, kind: HistoryKind, details: Value) -> HistoryEvent {
        HistoryEvent { seq, at: Timestamp::from_millis(0), kind, state: Some("S".into()), details }
    }

    #[test]
    fn what_is_left_out_comes_back_exactly() {
        let input = json!({"idempotencyKey": "k", "agentId": "a"});
        let claim = json!({"outcome": "CLAIMED"});
        let after = json!({"idempotencyKey": "k", "agentId": "a", "idempotency": claim});
        let path = JsonPath::parse("$.idempotency").unwrap();
        let recorded = vec![
            event(0, HistoryKind::ExecutionStarted, json!({"input": input})),
            event(1, HistoryKind::StateEntered, json!({"input": input})),
            event(2, HistoryKind::TaskScheduled, json!({"resource": "r", "parameters": {"request": input, "x": 1}})),
            event(3, HistoryKind::TaskSucceeded, json!({"output": claim})),
            event(4, HistoryKind::StateExited, json!({"output": after, "next": "T"})),
            event(5, HistoryKind::StateEntered, json!({"input": after})),
            // Not derivable: stored whole.
            event(6, HistoryKind::StateExited, json!({"output": {"other": true}, "next": "U"})),
            // A Choice: its output is its input; then the execution ends with it.
            event(7, HistoryKind::StateEntered, json!({"input": {"other": true}})),
            event(8, HistoryKind::StateExited, json!({"output": {"other": true}})),
            event(9, HistoryKind::ExecutionSucceeded, json!({"output": {"other": true}})),
        ];
        let mut context = Context::new(None);
        let stored: Vec<_> = recorded
            .iter()
            .map(|e| context.compact(e.clone(), (e.kind == HistoryKind::StateExited).then_some(&path)))
            .collect();
        assert_eq!(stored[1].details, json!({ INPUT_IS_PREVIOUS_OUTPUT: true }));
        assert_eq!(stored[2].details["parameters"], json!({"x": 1}));
        assert_eq!(stored[4].details, json!({"next": "T", OUTPUT_IS_RESULT_AT: "$.idempotency"}));
        assert_eq!(stored[5].details, json!({ INPUT_IS_PREVIOUS_OUTPUT: true }));
        assert_eq!(stored[6].details, recorded[6].details);
        assert_eq!(stored[7].details, json!({ INPUT_IS_PREVIOUS_OUTPUT: true }));
        assert_eq!(stored[8].details, json!({ OUTPUT_IS_INPUT: true }));
        assert_eq!(stored[9].details, json!({ OUTPUT_IS_PREVIOUS_OUTPUT: true }));
        let bytes = |events: &[HistoryEvent]| serde_json::to_string(events).unwrap().len();
        assert!(bytes(&stored) < bytes(&recorded));
        assert_eq!(expand(stored), recorded);
    }
}
