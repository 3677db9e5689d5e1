//! The deployed definition, checked for what the workflow promises.

use std::collections::HashMap;

use agentpay::asl::definition::{StateKind, Transition};
use agentpay::asl::{PAYMENT_DEFINITION, StateMachine, substitution_names};
use agentpay::error::{ErrorName, definite_refusals};
use agentpay::steps::StepName;

fn machine() -> StateMachine {
    StateMachine::parse(PAYMENT_DEFINITION, &agentpay::asl::runner::local_substitutions()).unwrap()
}

#[test]
fn every_task_is_a_step_function_substitution() {
    let mut names = substitution_names(PAYMENT_DEFINITION);
    let mut expected: Vec<String> = StepName::ALL.iter().map(|s| s.arn_substitution().to_owned()).collect();
    expected.push(agentpay::asl::runner::OPERATORS_TOPIC_SUBSTITUTION.to_owned());
    names.sort();
    expected.sort();
    assert_eq!(names, expected);
    assert!(StateMachine::parse(PAYMENT_DEFINITION, &HashMap::new()).is_err(), "unsubstituted ARNs are refused");
}

#[test]
fn every_error_name_in_the_machine_exists() {
    let machine = machine();
    for state in machine.states.values() {
        if let StateKind::Task(task) = &state.kind {
            for name in
                task.retry.iter().flat_map(|r| &r.error_equals).chain(task.catch.iter().flat_map(|c| &c.error_equals))
            {
                assert!(
                    ErrorName::parse(name).is_some()
                        || name.starts_with("States.")
                        || name.starts_with("Lambda.")
                        || name.starts_with("Sandbox."),
                    "state {} matches unknown error {name}",
                    state.name
                );
            }
        }
    }
}

#[test]
fn failures_after_the_reservation_compensate_but_record_ledger_does_not() {
    let machine = machine();
    let catches_to = |name: &str| match &machine.states[name].kind {
        StateKind::Task(task) => task.catch.iter().map(|c| c.next.clone()).collect::<Vec<_>>(),
        _ => panic!("{name} is not a task"),
    };
    assert_eq!(catches_to("CheckSpend"), ["Compensate"]);
    // Only a definite refusal is compensated; everything else out of ProcessPayment (crashes and
    // time-outs included) is held as an unknown outcome.
    assert_eq!(catches_to("ProcessPayment"), ["Compensate", "HoldUnknownOutcome"]);
    assert!(catches_to("RecordLedger").is_empty(), "RecordLedger must fail for redrive, not compensate");
    assert!(catches_to("Compensate").is_empty());
    assert!(catches_to("HoldUnknownOutcome").is_empty());
    assert_eq!(machine.states["Compensate"].transition, Transition::Next("PaymentFailed".into()));
    assert!(matches!(machine.states["PaymentFailed"].kind, StateKind::Fail { .. }));
    assert_eq!(machine.states["HoldUnknownOutcome"].transition, Transition::Next("PaymentOutcomeUnknown".into()));
    assert!(matches!(machine.states["PaymentOutcomeUnknown"].kind, StateKind::Fail { .. }));
}

#[test]
fn only_definite_refusals_out_of_process_payment_reach_compensate() {
    let machine = machine();
    let StateKind::Task(task) = &machine.states["ProcessPayment"].kind else { panic!() };
    let [definite, rest] = task.catch.as_slice() else { panic!("two catchers: definite refusals, then the rest") };
    let mut caught = definite.error_equals.clone();
    caught.sort();
    let mut expected: Vec<String> = definite_refusals().iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(caught, expected, "the ASL's list is the code's list");
    assert_eq!(rest.error_equals, ["States.ALL"]);
    // Whatever may hide an issued proof goes to the hold, never to Compensate.
    for unknown in ["PaymentOutcomeUnknown", "States.Timeout", "Lambda.Unknown", "Sandbox.Timedout", "StoreUnavailable"]
    {
        assert!(!definite.error_equals.iter().any(|e| e == unknown), "{unknown} must not be compensated");
    }
    // The hold runs the Compensate function in hold mode.
    let StateKind::Task(hold) = &machine.states["HoldUnknownOutcome"].kind else { panic!() };
    assert_eq!(hold.resource, agentpay::asl::runner::local_function_arn(StepName::Compensate));
    assert_eq!(hold.parameters.as_ref().unwrap()["mode"], "HOLD_UNKNOWN");
}

#[test]
fn process_payment_retries_the_store_and_unknown_outcomes_with_the_same_token() {
    let machine = machine();
    let StateKind::Task(task) = &machine.states["ProcessPayment"].kind else { panic!() };
    let retried = |name: &str| task.retry.iter().any(|r| r.error_equals.iter().any(|e| e == name));
    for name in ["StoreUnavailable", "PaymentOutcomeUnknown", "ProviderUnavailable", "States.Timeout"] {
        assert!(retried(name), "ProcessPayment retries {name}");
    }
}

/// Every Task's TimeoutSeconds equals its Lambda's timeout in template.yaml; the approval
/// callback waits as long as the reservation says, and the notification is bounded.
#[test]
fn every_task_times_out_with_its_lambda() {
    let template: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/template.yaml")).unwrap(),
    )
    .unwrap();
    let default_timeout = template["Globals"]["Function"]["Timeout"].as_u64().unwrap();
    let machine = machine();
    for state in machine.states.values() {
        let StateKind::Task(task) = &state.kind else { continue };
        match task.resource.as_str() {
            agentpay::asl::runner::LAMBDA_CALLBACK_RESOURCE => {
                assert_eq!(
                    task.timeout_seconds_path.as_ref().map(|p| p.as_str()),
                    Some("$.reservation.approval.timeoutSeconds")
                );
                continue;
            }
            agentpay::asl::runner::SNS_PUBLISH_RESOURCE => {
                assert!(task.timeout_seconds.is_some(), "state {}", state.name);
                continue;
            }
            _ => {}
        }
        let step =
            StepName::ALL.into_iter().find(|s| agentpay::asl::runner::local_function_arn(*s) == task.resource).unwrap();
        let function = template["Resources"]
            .as_mapping()
            .unwrap()
            .values()
            .find(|r| r["Metadata"]["BuildProperties"]["Binary"].as_str() == Some(step.function_name()))
            .unwrap();
        let lambda_timeout = function["Properties"]["Timeout"].as_u64().unwrap_or(default_timeout);
        assert_eq!(task.timeout_seconds, Some(lambda_timeout), "state {}", state.name);
    }
}

/// The longest one run of the machine can hold a claim: every Task on the longest path, each
/// attempt at its full TimeoutSeconds, plus every retry wait at its maximum.
fn longest_claim_hold(machine: &StateMachine) -> std::time::Duration {
    let task_time = |name: &str| {
        let StateKind::Task(task) = &machine.states[name].kind else { panic!("{name}") };
        let attempts: u64 = 1 + task.retry.iter().map(|r| u64::from(r.max_attempts)).sum::<u64>();
        let waits: f64 = task
            .retry
            .iter()
            .flat_map(|r| {
                (0..r.max_attempts).map(move |n| {
                    let wait = r.interval_seconds as f64 * r.backoff_rate.powi(n as i32);
                    r.max_delay_seconds.map_or(wait, |cap| wait.min(cap as f64))
                })
            })
            .sum();
        task.timeout_seconds.unwrap() * attempts + waits.ceil() as u64
    };
    let ending = ["RecordLedger", "Compensate", "HoldUnknownOutcome"].map(task_time).into_iter().max().unwrap();
    let seconds = task_time("CheckIdempotency") + task_time("CheckSpend") + task_time("ProcessPayment") + ending;
    std::time::Duration::from_secs(seconds)
}

#[test]
fn the_default_lease_outlasts_the_longest_hold_the_machine_allows() {
    let hold = longest_claim_hold(&machine());
    eprintln!("longest claim hold: {} s; lease {} s", hold.as_secs(), agentpay::steps::DEFAULT_LEASE.as_secs());
    assert!(
        agentpay::steps::DEFAULT_LEASE >= hold,
        "lease {:?} < longest hold {hold:?}",
        agentpay::steps::DEFAULT_LEASE
    );
}

#[test]
fn the_provider_retry_is_the_documented_one() {
    let machine = machine();
    let StateKind::Task(task) = &machine.states["ProcessPayment"].kind else { panic!() };
    let retrier = task.retry.iter().find(|r| r.error_equals == ["ProviderUnavailable"]).unwrap();
    assert_eq!((retrier.interval_seconds, retrier.max_attempts, retrier.backoff_rate), (2, 3, 2.0));
    assert_eq!(retrier.jitter, agentpay::asl::definition::Jitter::Full);
}
