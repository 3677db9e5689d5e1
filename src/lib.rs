//! agentpay: the layer under agent payments — idempotency, a spend ledger across sessions,
//! compensation and an audit trail — as six step functions chained by one state machine.
//!
//! This crate is what an agent or a tool embeds: the payment client (Step Functions or the
//! local runner behind one interface), the local workflow and its configuration. The domain
//! and the adapters are crates of their own, re-exported here under one namespace:
//!
//! | module | crate | what |
//! |---|---|---|
//! | `money`, `payment`, `x402`, `mpp`, `policy`, `request`, `steps`, `asl`, … | `agentpay-core` | the domain, the ports, the six steps, the ASL interpreter |
//! | `store::sqlite` | `agentpay-sqlite` | the embedded store |
//! | `store::dynamodb` | `agentpay-dynamodb` | the DynamoDB store |
//! | `provider::agentcore` | `agentpay-agentcore` | AgentCore Payments |
//! | `provider::dev_wallet` | `agentpay-dev-wallet` | the local dev wallet |

pub use agentpay_core::{
    agentcore, approval, asl, backtest, clock, deviation, error, executions, faults, identity, metrics, money, mpp,
    payment, policy, reconcile, request, samples, settlement, settlements, shadow, steps, trips, window, workflow,
    x402,
};

pub mod approvals;
/// The chain, read-only (`agentpay-chain`).
pub use agentpay_chain as chain;
pub mod client;
pub mod config;
pub mod local;

/// The `Store` port and its adapters.
pub mod store {
    pub use agentpay_core::store::*;
    pub use agentpay_dynamodb as dynamodb;
    pub use agentpay_sqlite as sqlite;
}

/// The `PaymentProvider` port and its adapters.
pub mod provider {
    pub use agentpay_agentcore as agentcore;
    pub use agentpay_core::provider::*;
    pub use agentpay_dev_wallet as dev_wallet;
}
