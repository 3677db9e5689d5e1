//! agentpay: the layer under agent payments — idempotency, a spend ledger across sessions,
//! compensation and an audit trail — as five step functions chained by one state machine.

pub mod agentcore;
pub mod asl;
pub mod cli;
pub mod client;
pub mod client_cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod error;
pub mod executions;
pub mod faults;
pub mod lambda;
pub mod local;
pub mod metrics;
pub mod money;
pub mod mpp;
pub mod payment;
pub mod policy;
pub mod provider;
pub mod request;
pub mod samples;
pub mod steps;
pub mod store;
pub mod workflow;
pub mod x402;
