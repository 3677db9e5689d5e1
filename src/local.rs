//! The whole workflow on one machine: the embedded store, the dev wallet, the deployed ASL
//! file interpreted by the local runner. The CLI, the tests and the bench all start here.

use std::sync::Arc;

use serde_json::Value;

use crate::asl::runner::{Notification, Notifier, TaskFailure};
use crate::asl::{LocalRunner, PAYMENT_DEFINITION, RunnerError, Sleeper};
use crate::client::naming::execution_name;
use crate::clock::Clock;
use crate::config::{BuiltProvider, Config, ConfigError, OpenedStore, StoreConfig};
use crate::executions::ExecutionRecord;
use crate::faults::{FaultyProvider, FaultyStore, ProviderFault};
use crate::provider::PaymentProvider;
use crate::steps::Steps;
use crate::store::Store;
use crate::store::sqlite::SqliteStore;

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
        let executions_path = data_dir.join("agentpay.db");
        let executions = Arc::new(SqliteStore::open(&executions_path).map_err(ConfigError::Store)?);
        // One file, one store: a second instance would be a second writer on the file, whose
        // BEGIN IMMEDIATE waits (blocking its thread) while the first holds a group commit open.
        let (opened, shared) = match &config.store {
            StoreConfig::Sqlite(path) if *path == executions_path => {
                (OpenedStore { store: executions.clone(), proofs: executions.clone() }, true)
            }
            _ => (config.open_store().await?, false),
        };
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
        let outbox = Arc::new(Outbox(data_dir.join(OUTBOX_FILE)));
        let runner = LocalRunner::new(
            PAYMENT_DEFINITION,
            Arc::new(steps.clone()),
            steps.clock().clone(),
            executions.clone(),
            sleeper,
        )?
        .with_notifier(outbox);
        let runner = Arc::new(if shared { runner } else { runner.with_steps_writing_to_another_store() });
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
        let run_id = alloy_primitives::hex::encode(rand::random::<[u8; 4]>());
        self.runner.start(&execution_name(key, Some(&run_id)), input).await
    }
}

/// Where the local runner's notifications to operators go (one JSON object per line): what
/// SNS would deliver on AWS, e.g. a payment waiting for approval. `tail -f` it.
pub const OUTBOX_FILE: &str = "notifications.jsonl";

/// Appends each notification to the outbox file.
pub struct Outbox(pub std::path::PathBuf);

impl Outbox {
    /// Every notification written so far.
    pub fn read(path: &std::path::Path) -> Vec<Notification> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

#[async_trait::async_trait]
impl Notifier for Outbox {
    async fn publish(&self, notification: &Notification) -> Result<String, TaskFailure> {
        use std::io::Write;
        let failed = |e: std::io::Error| TaskFailure {
            error: "SNS.InternalErrorException".into(),
            cause: format!("cannot write the local outbox {}: {e}", self.0.display()),
        };
        let mut line = serde_json::to_string(notification).map_err(|e| failed(std::io::Error::other(e)))?;
        line.push('\n');
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&self.0).map_err(failed)?;
        file.write_all(line.as_bytes()).map_err(failed)?;
        Ok(alloy_primitives::hex::encode(rand::random::<[u8; 8]>()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the state machine definition cannot run locally")]
    Definition(#[from] crate::asl::DefinitionError),
}
