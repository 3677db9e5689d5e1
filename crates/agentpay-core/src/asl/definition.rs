//! A typed, checked reading of an Amazon States Language definition (JSONPath flavour).
//!
//! Only what the runner can execute faithfully is accepted: anything else (Map, Parallel,
//! Wait, JSONata, intrinsic functions, unknown fields) is an error naming the state and the
//! field, never a silent guess.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use super::path::JsonPath;

#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("definition is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("definition uses ${{{0}}} but no substitution was given for it")]
    MissingSubstitution(String),
    #[error("{0}")]
    Invalid(String),
    #[error("not supported by the local runner: {0}")]
    Unsupported(String),
}

#[derive(Debug, Clone)]
pub struct StateMachine {
    pub start_at: String,
    pub states: BTreeMap<String, State>,
}

#[derive(Debug, Clone)]
pub struct State {
    pub name: String,
    pub kind: StateKind,
    /// `None` is `"InputPath": null` (the state sees `{}`).
    pub input_path: Option<JsonPath>,
    pub output_path: Option<JsonPath>,
    pub transition: Transition,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Next(String),
    End,
    /// Choice, Succeed and Fail decide for themselves.
    None,
}

#[derive(Debug, Clone)]
pub enum StateKind {
    Task(TaskState),
    Pass { parameters: Option<Value>, result: Option<Value>, result_path: Option<JsonPath> },
    Choice { choices: Vec<ChoiceRule>, default: Option<String> },
    Succeed,
    Fail { error: Option<String>, cause: Option<String>, error_path: Option<JsonPath>, cause_path: Option<JsonPath> },
}

#[derive(Debug, Clone)]
pub struct TaskState {
    pub resource: String,
    pub parameters: Option<Value>,
    pub result_selector: Option<Value>,
    /// `None` is `"ResultPath": null` (the result is discarded).
    pub result_path: Option<JsonPath>,
    pub retry: Vec<Retrier>,
    pub catch: Vec<Catcher>,
    /// `TimeoutSeconds`: past it the attempt fails with `States.Timeout`.
    pub timeout_seconds: Option<u64>,
    /// `TimeoutSecondsPath`: the same, read from the state's input.
    pub timeout_seconds_path: Option<JsonPath>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    None,
    Full,
}

#[derive(Debug, Clone)]
pub struct Retrier {
    pub error_equals: Vec<String>,
    pub interval_seconds: u64,
    pub max_attempts: u32,
    pub backoff_rate: f64,
    pub max_delay_seconds: Option<u64>,
    pub jitter: Jitter,
}

#[derive(Debug, Clone)]
pub struct Catcher {
    pub error_equals: Vec<String>,
    pub result_path: Option<JsonPath>,
    pub next: String,
}

#[derive(Debug, Clone)]
pub struct ChoiceRule {
    pub condition: Condition,
    pub next: String,
}

#[derive(Debug, Clone)]
pub enum Condition {
    StringEquals(JsonPath, String),
    StringEqualsPath(JsonPath, JsonPath),
    BooleanEquals(JsonPath, bool),
    NumericEquals(JsonPath, f64),
    IsPresent(JsonPath, bool),
    IsNull(JsonPath, bool),
    And(Vec<Condition>),
    Or(Vec<Condition>),
    Not(Box<Condition>),
}

/// Replaces `${Name}` with its substitution, as SAM's `DefinitionSubstitutions` does.
pub fn substitute(text: &str, substitutions: &HashMap<String, String>) -> Result<String, DefinitionError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| DefinitionError::Invalid("unclosed ${ in definition".into()))?;
        let name = &after[..end];
        let value = substitutions.get(name).ok_or_else(|| DefinitionError::MissingSubstitution(name.to_owned()))?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The `${...}` names a definition uses, in order of first use.
pub fn substitution_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        let name = after[..end].to_owned();
        if !names.contains(&name) {
            names.push(name);
        }
        rest = &after[end + 1..];
    }
    names
}

struct Fields<'a> {
    state: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn check_allowed(&self, kind: &str, allowed: &[&str]) -> Result<(), DefinitionError> {
        for key in self.map.keys() {
            if !allowed.contains(&key.as_str()) {
                return Err(DefinitionError::Unsupported(format!(
                    "state {:?}: field {key:?} in a {kind} state",
                    self.state
                )));
            }
        }
        Ok(())
    }

    fn string(&self, key: &str) -> Result<Option<String>, DefinitionError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => {
                Err(DefinitionError::Invalid(format!("state {:?}: {key} must be a string, found {other}", self.state)))
            }
        }
    }

    fn required_string(&self, key: &str) -> Result<String, DefinitionError> {
        self.string(key)?.ok_or_else(|| DefinitionError::Invalid(format!("state {:?}: {key} is required", self.state)))
    }

    /// A path field whose absence means `$` and whose `null` means "none".
    fn path_or_null(&self, key: &str) -> Result<Option<JsonPath>, DefinitionError> {
        match self.map.get(key) {
            None => Ok(Some(JsonPath::parse("$").expect("$ parses"))),
            Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => {
                let path = JsonPath::parse(s)
                    .map_err(|e| DefinitionError::Invalid(format!("state {:?}: {key}: {e}", self.state)))?;
                Ok(Some(path))
            }
            Some(other) => Err(DefinitionError::Invalid(format!(
                "state {:?}: {key} must be a path or null, found {other}",
                self.state
            ))),
        }
    }

    fn optional_path(&self, key: &str) -> Result<Option<JsonPath>, DefinitionError> {
        self.string(key)?
            .map(|s| {
                JsonPath::parse(&s).map_err(|e| DefinitionError::Invalid(format!("state {:?}: {key}: {e}", self.state)))
            })
            .transpose()
    }

    fn template(&self, key: &str) -> Result<Option<Value>, DefinitionError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(template) => {
                check_template(self.state, key, template)?;
                Ok(Some(template.clone()))
            }
        }
    }
}

/// Checks a Parameters/ResultSelector template: every `.$` value must be a reference path.
fn check_template(state: &str, field: &str, template: &Value) -> Result<(), DefinitionError> {
    match template {
        Value::Object(map) => {
            for (key, value) in map {
                if key.ends_with(".$") {
                    let Value::String(path) = value else {
                        return Err(DefinitionError::Invalid(format!(
                            "state {state:?}: {field}.{key} must be a path string"
                        )));
                    };
                    if path.starts_with("States.") {
                        return Err(DefinitionError::Unsupported(format!(
                            "state {state:?}: intrinsic function {path:?} in {field}.{key}"
                        )));
                    }
                    JsonPath::parse(path)
                        .map_err(|e| DefinitionError::Invalid(format!("state {state:?}: {field}.{key}: {e}")))?;
                } else {
                    check_template(state, field, value)?;
                }
            }
            Ok(())
        }
        Value::Array(items) => items.iter().try_for_each(|item| check_template(state, field, item)),
        _ => Ok(()),
    }
}

impl StateMachine {
    /// Parses the definition after applying `substitutions`.
    pub fn parse(text: &str, substitutions: &HashMap<String, String>) -> Result<Self, DefinitionError> {
        let document: Value = serde_json::from_str(&substitute(text, substitutions)?)?;
        let Value::Object(top) = &document else {
            return Err(DefinitionError::Invalid("definition must be a JSON object".into()));
        };
        for key in top.keys() {
            match key.as_str() {
                "Comment" | "StartAt" | "States" | "Version" | "TimeoutSeconds" => {}
                "QueryLanguage" if top[key] == "JSONPath" => {}
                other => {
                    return Err(DefinitionError::Unsupported(format!("top-level field {other:?} = {}", top[key])));
                }
            }
        }
        let start_at = top
            .get("StartAt")
            .and_then(Value::as_str)
            .ok_or_else(|| DefinitionError::Invalid("StartAt is required".into()))?
            .to_owned();
        let Some(Value::Object(states_json)) = top.get("States") else {
            return Err(DefinitionError::Invalid("States must be an object".into()));
        };
        let mut states = BTreeMap::new();
        for (name, body) in states_json {
            let Value::Object(map) = body else {
                return Err(DefinitionError::Invalid(format!("state {name:?} must be an object")));
            };
            states.insert(name.clone(), parse_state(name, map)?);
        }
        let machine = Self { start_at, states };
        machine.check_transitions()?;
        Ok(machine)
    }

    fn check_transitions(&self) -> Result<(), DefinitionError> {
        let exists = |target: &str, from: &str| {
            if self.states.contains_key(target) {
                Ok(())
            } else {
                Err(DefinitionError::Invalid(format!("state {from:?} goes to {target:?}, which does not exist")))
            }
        };
        exists(&self.start_at, "StartAt")?;
        for state in self.states.values() {
            if let Transition::Next(next) = &state.transition {
                exists(next, &state.name)?;
            }
            match &state.kind {
                StateKind::Task(task) => task.catch.iter().try_for_each(|c| exists(&c.next, &state.name))?,
                StateKind::Choice { choices, default } => {
                    choices.iter().try_for_each(|c| exists(&c.next, &state.name))?;
                    if let Some(default) = default {
                        exists(default, &state.name)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

const COMMON: &[&str] = &["Type", "Comment", "InputPath", "OutputPath", "Next", "End", "QueryLanguage"];

fn with_common(extra: &[&'static str]) -> Vec<&'static str> {
    COMMON.iter().copied().chain(extra.iter().copied()).collect()
}

fn parse_state(name: &str, map: &Map<String, Value>) -> Result<State, DefinitionError> {
    let fields = Fields { state: name, map };
    if let Some(language) = map.get("QueryLanguage")
        && language != "JSONPath"
    {
        return Err(DefinitionError::Unsupported(format!("state {name:?}: QueryLanguage {language}")));
    }
    let kind_name = fields.required_string("Type")?;
    let kind = match kind_name.as_str() {
        "Task" => {
            fields.check_allowed(
                "Task",
                &with_common(&[
                    "Resource",
                    "Parameters",
                    "ResultSelector",
                    "ResultPath",
                    "Retry",
                    "Catch",
                    "TimeoutSeconds",
                    "TimeoutSecondsPath",
                ]),
            )?;
            if map.contains_key("TimeoutSeconds") && map.contains_key("TimeoutSecondsPath") {
                return Err(DefinitionError::Invalid(format!(
                    "state {name:?}: TimeoutSeconds and TimeoutSecondsPath exclude each other"
                )));
            }
            StateKind::Task(TaskState {
                resource: fields.required_string("Resource")?,
                parameters: fields.template("Parameters")?,
                result_selector: fields.template("ResultSelector")?,
                result_path: fields.path_or_null("ResultPath")?,
                retry: parse_retry(name, map.get("Retry"))?,
                catch: parse_catch(name, map.get("Catch"))?,
                timeout_seconds: match map.get("TimeoutSeconds") {
                    None => None,
                    Some(value) => Some(value.as_u64().filter(|s| *s > 0).ok_or_else(|| {
                        DefinitionError::Invalid(format!(
                            "state {name:?}: TimeoutSeconds must be a positive integer, found {value}"
                        ))
                    })?),
                },
                timeout_seconds_path: fields.optional_path("TimeoutSecondsPath")?,
            })
        }
        "Pass" => {
            fields.check_allowed("Pass", &with_common(&["Parameters", "Result", "ResultPath"]))?;
            StateKind::Pass {
                parameters: fields.template("Parameters")?,
                result: map.get("Result").cloned(),
                result_path: fields.path_or_null("ResultPath")?,
            }
        }
        "Choice" => {
            fields.check_allowed(
                "Choice",
                &["Type", "Comment", "InputPath", "OutputPath", "Choices", "Default", "QueryLanguage"],
            )?;
            let Some(Value::Array(rules)) = map.get("Choices") else {
                return Err(DefinitionError::Invalid(format!("state {name:?}: Choices must be a non-empty array")));
            };
            let choices = rules
                .iter()
                .map(|rule| {
                    let Value::Object(rule) = rule else {
                        return Err(DefinitionError::Invalid(format!("state {name:?}: each choice must be an object")));
                    };
                    let next = rule
                        .get("Next")
                        .and_then(Value::as_str)
                        .ok_or_else(|| DefinitionError::Invalid(format!("state {name:?}: each choice needs Next")))?;
                    Ok(ChoiceRule { condition: parse_condition(name, rule, true)?, next: next.to_owned() })
                })
                .collect::<Result<Vec<_>, _>>()?;
            StateKind::Choice { choices, default: fields.string("Default")? }
        }
        "Succeed" => {
            fields.check_allowed("Succeed", &["Type", "Comment", "InputPath", "OutputPath", "QueryLanguage"])?;
            StateKind::Succeed
        }
        "Fail" => {
            fields.check_allowed(
                "Fail",
                &["Type", "Comment", "Error", "Cause", "ErrorPath", "CausePath", "QueryLanguage"],
            )?;
            StateKind::Fail {
                error: fields.string("Error")?,
                cause: fields.string("Cause")?,
                error_path: fields.optional_path("ErrorPath")?,
                cause_path: fields.optional_path("CausePath")?,
            }
        }
        other => {
            return Err(DefinitionError::Unsupported(format!("state {name:?}: Type {other:?}")));
        }
    };
    let terminal = matches!(kind, StateKind::Choice { .. } | StateKind::Succeed | StateKind::Fail { .. });
    let transition = match (fields.string("Next")?, map.get("End")) {
        _ if terminal => Transition::None,
        (Some(next), None) => Transition::Next(next),
        (None, Some(Value::Bool(true))) => Transition::End,
        _ => {
            return Err(DefinitionError::Invalid(format!(
                "state {name:?}: needs exactly one of Next or \"End\": true"
            )));
        }
    };
    let (input_path, output_path) = match kind {
        StateKind::Fail { .. } => (None, None),
        _ => (fields.path_or_null("InputPath")?, fields.path_or_null("OutputPath")?),
    };
    Ok(State { name: name.to_owned(), kind, input_path, output_path, transition })
}

fn error_equals(state: &str, value: Option<&Value>) -> Result<Vec<String>, DefinitionError> {
    let names: Vec<String> = value
        .and_then(Value::as_array)
        .map(|items| items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    if names.is_empty() {
        return Err(DefinitionError::Invalid(format!(
            "state {state:?}: ErrorEquals must be a non-empty array of strings"
        )));
    }
    if names.iter().any(|n| n == "States.ALL") && names.len() > 1 {
        return Err(DefinitionError::Invalid(format!("state {state:?}: States.ALL must appear alone in ErrorEquals")));
    }
    Ok(names)
}

fn parse_retry(state: &str, value: Option<&Value>) -> Result<Vec<Retrier>, DefinitionError> {
    let Some(value) = value else {
        return Ok(vec![]);
    };
    let items =
        value.as_array().ok_or_else(|| DefinitionError::Invalid(format!("state {state:?}: Retry must be an array")))?;
    items
        .iter()
        .map(|item| {
            let map = item
                .as_object()
                .ok_or_else(|| DefinitionError::Invalid(format!("state {state:?}: a retrier must be an object")))?;
            for key in map.keys() {
                if ![
                    "ErrorEquals",
                    "IntervalSeconds",
                    "MaxAttempts",
                    "BackoffRate",
                    "MaxDelaySeconds",
                    "JitterStrategy",
                    "Comment",
                ]
                .contains(&key.as_str())
                {
                    return Err(DefinitionError::Unsupported(format!("state {state:?}: retrier field {key:?}")));
                }
            }
            let number = |key: &str| map.get(key).and_then(Value::as_u64);
            let jitter = match map.get("JitterStrategy").and_then(Value::as_str) {
                None | Some("NONE") => Jitter::None,
                Some("FULL") => Jitter::Full,
                Some(other) => {
                    return Err(DefinitionError::Invalid(format!("state {state:?}: JitterStrategy {other:?}")));
                }
            };
            let backoff_rate =
                map.get("BackoffRate").map_or(Some(2.0), Value::as_f64).filter(|r| *r >= 1.0).ok_or_else(|| {
                    DefinitionError::Invalid(format!("state {state:?}: BackoffRate must be a number >= 1.0"))
                })?;
            Ok(Retrier {
                error_equals: error_equals(state, map.get("ErrorEquals"))?,
                interval_seconds: number("IntervalSeconds").unwrap_or(1).max(1),
                max_attempts: u32::try_from(number("MaxAttempts").unwrap_or(3)).unwrap_or(u32::MAX),
                backoff_rate,
                max_delay_seconds: number("MaxDelaySeconds"),
                jitter,
            })
        })
        .collect()
}

fn parse_catch(state: &str, value: Option<&Value>) -> Result<Vec<Catcher>, DefinitionError> {
    let Some(value) = value else {
        return Ok(vec![]);
    };
    let items =
        value.as_array().ok_or_else(|| DefinitionError::Invalid(format!("state {state:?}: Catch must be an array")))?;
    items
        .iter()
        .map(|item| {
            let map = item
                .as_object()
                .ok_or_else(|| DefinitionError::Invalid(format!("state {state:?}: a catcher must be an object")))?;
            let fields = Fields { state, map };
            fields.check_allowed("Catch", &["ErrorEquals", "ResultPath", "Next", "Comment"])?;
            Ok(Catcher {
                error_equals: error_equals(state, map.get("ErrorEquals"))?,
                result_path: fields.path_or_null("ResultPath")?,
                next: fields.required_string("Next")?,
            })
        })
        .collect()
}

fn parse_condition(state: &str, rule: &Map<String, Value>, top_level: bool) -> Result<Condition, DefinitionError> {
    let invalid = |why: String| DefinitionError::Invalid(format!("state {state:?}: {why}"));
    let nested = |value: &Value| -> Result<Condition, DefinitionError> {
        let map = value.as_object().ok_or_else(|| invalid("a nested choice rule must be an object".into()))?;
        parse_condition(state, map, false)
    };
    if let Some(items) = rule.get("And").or(rule.get("Or")) {
        let list = items.as_array().ok_or_else(|| invalid("And/Or take an array".into()))?;
        let parsed = list.iter().map(nested).collect::<Result<Vec<_>, _>>()?;
        return Ok(if rule.contains_key("And") { Condition::And(parsed) } else { Condition::Or(parsed) });
    }
    if let Some(inner) = rule.get("Not") {
        return Ok(Condition::Not(Box::new(nested(inner)?)));
    }
    let variable = rule
        .get("Variable")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("a choice rule needs Variable".into()))
        .and_then(|v| JsonPath::parse(v).map_err(invalid))?;
    for (key, value) in rule {
        let condition = match key.as_str() {
            "Variable" | "Comment" => continue,
            "Next" if top_level => continue,
            "StringEquals" => Condition::StringEquals(
                variable,
                value.as_str().ok_or_else(|| invalid("StringEquals takes a string".into()))?.to_owned(),
            ),
            "StringEqualsPath" => Condition::StringEqualsPath(
                variable,
                JsonPath::parse(value.as_str().unwrap_or_default()).map_err(invalid)?,
            ),
            "BooleanEquals" => Condition::BooleanEquals(
                variable,
                value.as_bool().ok_or_else(|| invalid("BooleanEquals takes a boolean".into()))?,
            ),
            "NumericEquals" => Condition::NumericEquals(
                variable,
                value.as_f64().ok_or_else(|| invalid("NumericEquals takes a number".into()))?,
            ),
            "IsPresent" => Condition::IsPresent(
                variable,
                value.as_bool().ok_or_else(|| invalid("IsPresent takes a boolean".into()))?,
            ),
            "IsNull" => {
                Condition::IsNull(variable, value.as_bool().ok_or_else(|| invalid("IsNull takes a boolean".into()))?)
            }
            other => {
                return Err(DefinitionError::Unsupported(format!("state {state:?}: choice operator {other:?}")));
            }
        };
        return Ok(condition);
    }
    Err(invalid("a choice rule needs a comparison operator".into()))
}

impl Condition {
    pub fn evaluate(&self, input: &Value) -> bool {
        match self {
            Condition::StringEquals(path, expected) => {
                path.get(input).and_then(Value::as_str) == Some(expected.as_str())
            }
            Condition::StringEqualsPath(path, other) => {
                matches!((path.get(input), other.get(input)), (Some(Value::String(a)), Some(Value::String(b))) if a == b)
            }
            Condition::BooleanEquals(path, expected) => path.get(input).and_then(Value::as_bool) == Some(*expected),
            Condition::NumericEquals(path, expected) => path.get(input).and_then(Value::as_f64) == Some(*expected),
            Condition::IsPresent(path, expected) => path.get(input).is_some() == *expected,
            Condition::IsNull(path, expected) => path.get(input).is_some_and(Value::is_null) == *expected,
            Condition::And(all) => all.iter().all(|c| c.evaluate(input)),
            Condition::Or(any) => any.iter().any(|c| c.evaluate(input)),
            Condition::Not(inner) => !inner.evaluate(input),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<StateMachine, DefinitionError> {
        StateMachine::parse(text, &HashMap::new())
    }

    #[test]
    fn unsupported_constructs_are_named() {
        let cases = [
            (r#"{"StartAt":"A","States":{"A":{"Type":"Map","End":true}}}"#, "Type \"Map\""),
            (r#"{"StartAt":"A","States":{"A":{"Type":"Pass","End":true,"Assign":{}}}}"#, "field \"Assign\""),
            (r#"{"QueryLanguage":"JSONata","StartAt":"A","States":{"A":{"Type":"Succeed"}}}"#, "QueryLanguage"),
            (
                r#"{"StartAt":"A","States":{"A":{"Type":"Pass","End":true,"Parameters":{"x.$":"States.Format('{}', $.a)"}}}}"#,
                "intrinsic function",
            ),
            (
                r#"{"StartAt":"A","States":{"A":{"Type":"Choice","Choices":[{"Variable":"$.a","StringMatches":"x*","Next":"A"}]}}}"#,
                "StringMatches",
            ),
        ];
        for (text, fragment) in cases {
            let error = parse(text).unwrap_err();
            assert!(matches!(error, DefinitionError::Unsupported(_)), "{error}");
            assert!(error.to_string().contains(fragment), "{error} lacks {fragment}");
        }
    }

    #[test]
    fn broken_definitions_are_invalid() {
        let cases = [
            r#"{"StartAt":"B","States":{"A":{"Type":"Succeed"}}}"#,
            r#"{"StartAt":"A","States":{"A":{"Type":"Pass","Next":"Nowhere"}}}"#,
            r#"{"StartAt":"A","States":{"A":{"Type":"Pass"}}}"#,
            r#"{"StartAt":"A","States":{"A":{"Type":"Task","Resource":"r","End":true,"Retry":[{"ErrorEquals":["States.ALL","X"]}]}}}"#,
        ];
        for text in cases {
            assert!(matches!(parse(text), Err(DefinitionError::Invalid(_))), "{text}");
        }
    }

    #[test]
    fn substitutions_are_applied_and_missing_ones_named() {
        let mut subs = HashMap::new();
        subs.insert("Fn".to_owned(), "arn:x".to_owned());
        assert_eq!(substitute("a ${Fn} b", &subs).unwrap(), "a arn:x b");
        assert!(matches!(substitute("${Other}", &subs), Err(DefinitionError::MissingSubstitution(n)) if n == "Other"));
        assert_eq!(substitution_names("${A} ${B} ${A}"), ["A", "B"]);
    }
}
