//! agentpay: the layer under agent payments — idempotency, a spend ledger across sessions,
//! compensation and an audit trail — as five step functions chained by one state machine.

pub mod clock;
pub mod error;
pub mod money;
pub mod samples;
pub mod x402;
pub mod executions;
pub mod policy;
pub mod provider;
pub mod request;
pub mod store;
pub mod steps;
pub mod asl;
pub mod faults;
pub mod config;
pub mod lambda;
pub mod local;
pub mod cli;
pub mod demo;
