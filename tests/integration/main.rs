//! One integration-test binary; every test gets its own store (a temp SQLite file, or fresh
//! DynamoDB tables on the moto server the test command starts).

mod agentcore;
mod agentcore_emulator;
mod approvals;
mod asl_file;
mod backtest;
mod chain_emulator;
mod cli;
mod client;
mod concurrency;
mod conformance;
mod deviation;
mod dynamodb;
mod entry_point;
mod events;
mod helpers;
mod iam;
mod identity;
mod layout;
mod local_invoke;
mod never_pay_twice;
mod properties;
mod reconcile;
mod secrets;
mod shadow;
mod simulator;
mod stores;
mod template;
mod trips;
mod workflow;
