//! agentpay's domain: what a payment request is, what the agent's policy allows, the five
//! steps over two ports (`store::Store`, `provider::PaymentProvider`) and the interpreter that
//! runs the deployed state machine locally. No AWS SDK and no C code: adapters live in their
//! own crates (`agentpay-sqlite`, `agentpay-dynamodb`, `agentpay-agentcore`,
//! `agentpay-dev-wallet`), and the Lambdas and the CLI wire them in.
//!
//! Dependencies point one way: `money`, `clock`, `error`, `payment` → `x402`, `mpp`,
//! `agentcore` → `window` → `policy`, `request` → `store`, `provider` → `steps` → `asl`'s task handler.

pub mod agentcore;
pub mod approval;
pub mod asl;
pub mod backtest;
pub mod clock;
pub mod deviation;
pub mod error;
pub mod executions;
pub mod faults;
pub mod identity;
pub mod metrics;
pub mod money;
pub mod mpp;
pub mod payment;
pub mod policy;
pub mod provider;
pub mod reconcile;
pub mod request;
pub mod samples;
pub mod settlement;
pub mod settlements;
pub mod shadow;
pub mod steps;
pub mod store;
pub mod trips;
pub mod window;
pub mod workflow;
pub mod x402;
