//! The whole workflow on one machine: the embedded store, the dev wallet, the deployed ASL
//! file interpreted by the local runner. The CLI, the tests and the bench all start here.

use std::sync::Arc;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::asl::{LocalRunner, PAYMENT_DEFINITION, RunnerError, Sleeper};
use crate::clock::Clock;
use crate::config::{BuiltProvider, Config, ConfigError};
use crate::executions::ExecutionRecord;
use crate::faults::{FaultyProvider, FaultyStore, ProviderFault};
use crate::provider::PaymentProvider;
use crate::steps::Steps;
use crate::store::Store;
use crate::store::sqlite::SqliteStore;

/// Step Functions execution names: 1–80 characters, none of whitespace, `<>{}[]?*"#%\^|~`$&,;:/`
/// or control characters.
pub const MAX_EXECUTION_NAME: usize = 80;

fn allowed_in_name(c: char) -> bool {
    !c.is_whitespace() && !c.is_control() && !"<>{}[]?*\"#%\\^|~`$&,;:/".contains(c)
}

/// The execution name for an idempotency key, with an optional per-run suffix.
///
/// The key is kept readable; where characters had to be replaced or the name cut, a hash
/// of the whole key is appended so two keys never share a name.
pub fn execution_name(key: &str, run_suffix: Option<&str>) -> String {
    let sanitized: String = key.chars().map(|c| if allowed_in_name(c) { c } else { '_' }).collect();
    let suffix = run_suffix.map(|s| format!("-{s}")).unwrap_or_default();
    let fits = sanitized.len() + suffix.len() <= MAX_EXECUTION_NAME;
    if sanitized == key && fits && !key.is_empty() {
        return format!("{sanitized}{suffix}");
    }
    let hash = &hex::encode(Sha256::digest(key.as_bytes()))[..12];
    let room = MAX_EXECUTION_NAME - suffix.len() - hash.len() - 1;
    let head: String = sanitized.chars().take(room).collect();
    format!("{head}-{hash}{suffix}")
}

pub struct LocalApp {
    /// The payment store (SQLite by default, or DynamoDB).
    pub store: Arc<dyn Store>,
    /// The runner's execution history: always the embedded store.
    pub executions: Arc<SqliteStore>,
    /// Pass-through unless the demo or a test injects provider faults.
    pub provider: Arc<FaultyProvider>,
    /// Pass-through unless the demo or a test injects ledger-write faults.
    pub ledger: Arc<FaultyStore>,
    /// The dev wallet's address, when the dev wallet is the provider.
    pub wallet_address: Option<String>,
    pub steps: Steps,
    pub runner: Arc<LocalRunner>,
}

impl LocalApp {
    pub async fn open(
        config: &Config,
        data_dir: &std::path::Path,
        clock: Arc<dyn Clock>,
        sleeper: Arc<dyn Sleeper>,
    ) -> Result<Self, LocalError> {
        Self::open_with_provider(config, data_dir, clock, sleeper, None).await
    }

    /// As [`LocalApp::open`], with `provider` in place of the configured one (tests point an
    /// AgentCore client at an emulator this way).
    pub async fn open_with_provider(
        config: &Config,
        data_dir: &std::path::Path,
        clock: Arc<dyn Clock>,
        sleeper: Arc<dyn Sleeper>,
        provider: Option<Arc<dyn PaymentProvider>>,
    ) -> Result<Self, LocalError> {
        let executions = Arc::new(SqliteStore::open(&data_dir.join("agentpay.db")).map_err(ConfigError::Store)?);
        let opened = config.open_store().await?;
        let built = match provider {
            Some(provider) => BuiltProvider { provider, wallet_address: None },
            None => config.payment_provider(opened.proofs, clock.clone()).await?,
        };
        let wallet_address = built.wallet_address;
        let provider = Arc::new(FaultyProvider::new(built.provider, ProviderFault::Unavailable, 0));
        let store = opened.store;
        let ledger = Arc::new(FaultyStore::new(store.clone()));
        let steps = Steps::new(
            ledger.clone() as Arc<dyn Store>,
            provider.clone() as Arc<dyn PaymentProvider>,
            clock,
            config.settings.clone(),
        );
        let runner = Arc::new(LocalRunner::new(PAYMENT_DEFINITION, steps.clone(), executions.clone(), sleeper)?);
        Ok(Self { store, executions, provider, ledger, wallet_address, steps, runner })
    }

    /// The agent-facing client on this app's runner.
    pub fn client(&self) -> crate::client::PaymentClient {
        crate::client::PaymentClient::new(Box::new(crate::client::local::LocalBackend::new(
            self.runner.clone(),
            self.executions.clone(),
        )))
    }

    /// Starts one execution named after the request's idempotency key, unique per run.
    pub async fn run(&self, input: Value) -> Result<ExecutionRecord, RunnerError> {
        let key = input.get("idempotencyKey").and_then(Value::as_str).unwrap_or("no-key");
        let run_id = hex::encode(rand::random::<[u8; 4]>());
        self.runner.start(&execution_name(key, Some(&run_id)), input).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the state machine definition cannot run locally")]
    Definition(#[from] crate::asl::DefinitionError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_keys_stay_readable() {
        assert_eq!(execution_name("order-42", None), "order-42");
        assert_eq!(execution_name("order-42", Some("ab12")), "order-42-ab12");
    }

    #[test]
    fn forbidden_characters_are_replaced_and_disambiguated() {
        let a = execution_name("tenant:order/42", None);
        let b = execution_name("tenant_order_42", None);
        assert!(a.starts_with("tenant_order_42-"), "{a}");
        assert_ne!(a, b);
        assert!(a.chars().all(allowed_in_name));
    }

    #[test]
    fn long_keys_are_cut_to_80_with_a_hash() {
        let long_a = "k".repeat(200);
        let long_b = format!("{}x", "k".repeat(199));
        let a = execution_name(&long_a, Some("run1"));
        let b = execution_name(&long_b, Some("run1"));
        assert_eq!(a.len(), MAX_EXECUTION_NAME);
        assert!(a.ends_with("-run1"));
        assert_ne!(a, b);
        assert_eq!(execution_name(&"k".repeat(80), None), "k".repeat(80));
        assert_eq!(execution_name(&"k".repeat(81), None).len(), MAX_EXECUTION_NAME);
    }
}
