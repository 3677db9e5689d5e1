use std::sync::Arc;

use agentpay::asl::RecordingSleeper;
use agentpay::clock::SystemClock;
use agentpay::config::Config;
use agentpay::executions::{ExecutionRecord, ExecutionStore, HistoryEvent, HistoryKind};
use agentpay::local::LocalApp;
use agentpay::payment::Network;
use agentpay::policy::SpendPolicy;
use agentpay::provider::PaymentProvider;
use serde_json::Value;

pub struct TestApp {
    pub app: LocalApp,
    pub sleeper: Arc<RecordingSleeper>,
    _dir: tempfile::TempDir,
}

pub fn policy(per_transaction: &str, daily: &str, per_hour: u32) -> SpendPolicy {
    SpendPolicy {
        paused: false,
        per_transaction_limit_usd: per_transaction.parse().unwrap(),
        daily_limit_usd: daily.parse().unwrap(),
        max_transactions_per_hour: per_hour,
        approval_threshold_usd: None,
        deviation: None,
        auto_pause: None,
        allowed_networks: vec![Network::BaseSepolia],
        allowed_payees: vec![],
        agentcore: None,
        principals: vec![],
    }
}

impl TestApp {
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sleeper = Arc::new(RecordingSleeper::default());
        let app = LocalApp::open(&Config::local(dir.path()), dir.path(), Arc::new(SystemClock), sleeper.clone())
            .await
            .unwrap();
        Self { app, sleeper, _dir: dir }
    }

    /// A fresh app paying through `provider` (e.g. AgentCore pointed at the emulator).
    pub async fn with_provider(agent: &str, policy: SpendPolicy, provider: Arc<dyn PaymentProvider>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sleeper = Arc::new(RecordingSleeper::default());
        let app = LocalApp::open_with_provider(
            &Config::local(dir.path()),
            dir.path(),
            Arc::new(SystemClock),
            sleeper.clone(),
            Some(provider),
        )
        .await
        .unwrap();
        app.store.put_policy(agent, &policy).await.unwrap();
        Self { app, sleeper, _dir: dir }
    }

    /// A fresh app whose agent `agent` has `policy`.
    pub async fn with_policy(agent: &str, policy: SpendPolicy) -> Self {
        let app = Self::new().await;
        app.app.store.put_policy(agent, &policy).await.unwrap();
        app
    }

    pub async fn run(&self, input: Value) -> ExecutionRecord {
        self.app.run(input).await.unwrap()
    }

    pub async fn history(&self, record: &ExecutionRecord) -> Vec<HistoryEvent> {
        self.app.executions.history(&record.execution_id).await.unwrap()
    }

    /// Names of the task states that were invoked, in order (one per TaskScheduled).
    pub async fn tasks_run(&self, record: &ExecutionRecord) -> Vec<String> {
        self.history(record)
            .await
            .into_iter()
            .filter(|e| e.kind == HistoryKind::TaskScheduled)
            .filter_map(|e| e.state)
            .collect()
    }
}
