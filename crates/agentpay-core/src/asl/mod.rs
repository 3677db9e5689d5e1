//! Amazon States Language, locally: the deployed definition file, interpreted.

pub mod definition;
pub mod history;
pub mod path;
pub mod runner;

pub use definition::{DefinitionError, StateMachine, substitution_names};
pub use runner::{LocalRunner, RecordingSleeper, RunnerError, ScaledSleeper, Sleeper, TokioSleeper};

/// The state machine file, as deployed by `template.yaml`.
pub const PAYMENT_DEFINITION_PATH: &str = "statemachines/payment.asl.json";

/// The same file, compiled in, so the CLI runs without the source tree.
pub const PAYMENT_DEFINITION: &str = include_str!("../../../../statemachines/payment.asl.json");
