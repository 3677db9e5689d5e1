//! Execution names from idempotency keys: the workflow's own rule, so the client and the entry
//! point name a key's execution alike.

pub use agentpay_core::workflow::{MAX_EXECUTION_NAME, execution_name};
