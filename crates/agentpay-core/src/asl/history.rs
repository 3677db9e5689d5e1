//! Execution history as the local runner stores it: what can be derived from the events before
//! is not written again, and [`expand`] puts it back on read, so every reader sees the history
//! as recorded. Most of a payment's history is the same data passed from state to state; left
//! whole it was ~47 KB per payment, the bulk of what the local store writes.
//!
//! Three things are left out:
//! - a state's input, when it is what the event before handed on (the previous state's output,
//!   or the execution's input);
//! - a task's `request` parameter, when it is the execution's input (`$$.Execution.Input`);
//! - a task state's output, when it is its input with the task's result set at its
//!   `ResultPath` (checked when recorded: stored whole otherwise).

use serde_json::{Value, json};

use super::path::JsonPath;
use crate::executions::{HistoryEvent, HistoryKind};

/// Marker: this `StateEntered` input is what the previous event handed on.
const INPUT_IS_PREVIOUS_OUTPUT: &str = "inputIsPreviousOutput";
/// Marker: this `TaskScheduled`'s `request` parameter is the execution's input.
const REQUEST_IS_EXECUTION_INPUT: &str = "requestIsExecutionInput";
/// Marker (the path): this `StateExited` output is the state's input with the task's result
/// set at that path.
const OUTPUT_IS_RESULT_AT: &str = "outputIsInputWithResultAt";

/// The data an event hands to the next state: an exit's output, a start's input.
fn handed_on(event: &HistoryEvent) -> Option<&Value> {
    match event.kind {
        HistoryKind::StateExited => event.details.get("output"),
        HistoryKind::ExecutionStarted | HistoryKind::ExecutionRedriven | HistoryKind::ExecutionResumed => {
            event.details.get("input")
        }
        _ => None,
    }
}

/// What the compaction of the next event needs to know of the ones before (uncompacted).
#[derive(Debug, Default)]
pub struct Context {
    execution_input: Option<Value>,
    previous: Option<HistoryEvent>,
    state_input: Option<Value>,
    task_output: Option<Value>,
}

impl Context {
    pub fn new(execution_input: Option<Value>) -> Self {
        Self { execution_input, ..Self::default() }
    }

    /// Takes `event` in as recorded, after it has been compacted or expanded.
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
        self.previous = Some(event.clone());
    }

    /// `event` as stored. `result_path` is its state's `ResultPath` when the event is the exit
    /// of a task state with no `ResultSelector` or `OutputPath` (its output may be derivable).
    pub fn compact(&mut self, event: HistoryEvent, result_path: Option<&JsonPath>) -> HistoryEvent {
        let mut stored = event.clone();
        match event.kind {
            HistoryKind::StateEntered => {
                let handed = self.previous.as_ref().and_then(handed_on);
                if handed.is_some() && event.details.get("input") == handed {
                    stored.details = json!({ INPUT_IS_PREVIOUS_OUTPUT: true });
                }
            }
            HistoryKind::TaskScheduled => {
                let request = event.details.pointer("/parameters/request");
                if request.is_some() && request == self.execution_input.as_ref() {
                    if let Some(parameters) = stored.details.get_mut("parameters").and_then(Value::as_object_mut) {
                        parameters.remove("request");
                    }
                    stored.details[REQUEST_IS_EXECUTION_INPUT] = json!(true);
                }
            }
            HistoryKind::StateExited => {
                let derived = match (result_path, &self.state_input, &self.task_output) {
                    (Some(path), Some(input), Some(result)) => path.set(input.clone(), result.clone()).ok(),
                    _ => None,
                };
                if let (Some(derived), Some(path)) = (derived, result_path)
                    && event.details.get("output") == Some(&derived)
                    && let Some(details) = stored.details.as_object_mut()
                {
                    details.remove("output");
                    details.insert(OUTPUT_IS_RESULT_AT.into(), json!(path.as_str()));
                }
            }
            _ => {}
        }
        self.observe(&event);
        stored
    }

    /// `stored` as recorded.
    fn expand(&mut self, stored: HistoryEvent) -> HistoryEvent {
        let mut event = stored;
        match event.kind {
            HistoryKind::StateEntered if event.details.get(INPUT_IS_PREVIOUS_OUTPUT).is_some() => {
                if let Some(handed) = self.previous.as_ref().and_then(handed_on) {
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
                if let (Some(Ok(path)), Some(input), Some(result)) = (path, &self.state_input, &self.task_output)
                    && let Ok(output) = path.set(input.clone(), result.clone())
                    && let Some(details) = event.details.as_object_mut()
                {
                    details.remove(OUTPUT_IS_RESULT_AT);
                    details.insert("output".into(), output);
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
        let bytes = |events: &[HistoryEvent]| serde_json::to_string(events).unwrap().len();
        assert!(bytes(&stored) < bytes(&recorded));
        assert_eq!(expand(stored), recorded);
    }
}
