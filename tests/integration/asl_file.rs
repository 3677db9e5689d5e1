//! The deployed definition, checked for what the workflow promises.

use std::collections::HashMap;

use agentpay::asl::definition::{StateKind, Transition};
use agentpay::asl::{PAYMENT_DEFINITION, StateMachine, substitution_names};
use agentpay::error::ERROR_NAMES;
use agentpay::steps::StepName;

fn machine() -> StateMachine {
    StateMachine::parse(PAYMENT_DEFINITION, &agentpay::asl::runner::local_substitutions()).unwrap()
}

#[test]
fn every_task_is_a_step_function_substitution() {
    let names = substitution_names(PAYMENT_DEFINITION);
    let expected: Vec<String> = StepName::ALL.iter().map(|s| s.arn_substitution().to_owned()).collect();
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
                    ERROR_NAMES.contains(&name.as_str()) || name.starts_with("States.") || name.starts_with("Lambda."),
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
    assert_eq!(catches_to("ProcessPayment"), ["Compensate"]);
    assert!(catches_to("RecordLedger").is_empty(), "RecordLedger must fail for redrive, not compensate");
    assert!(catches_to("Compensate").is_empty());
    assert_eq!(machine.states["Compensate"].transition, Transition::Next("PaymentFailed".into()));
    assert!(matches!(machine.states["PaymentFailed"].kind, StateKind::Fail { .. }));
}

#[test]
fn the_provider_retry_is_the_documented_one() {
    let machine = machine();
    let StateKind::Task(task) = &machine.states["ProcessPayment"].kind else { panic!() };
    let retrier = task.retry.iter().find(|r| r.error_equals == ["ProviderUnavailable"]).unwrap();
    assert_eq!((retrier.interval_seconds, retrier.max_attempts, retrier.backoff_rate), (2, 3, 2.0));
    assert_eq!(retrier.jitter, agentpay::asl::definition::Jitter::Full);
}
