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
        mode: Default::default(),
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

/// What the steps count, captured on this test's thread only (other tests run in parallel).
#[derive(Default, Clone)]
pub struct Captured(Arc<std::sync::Mutex<Vec<Recorded>>>);

/// One value: the metric's name, its labels, the value.
type Recorded = (String, Vec<(String, String)>, f64);

struct Instrument(Captured, metrics::Key);

impl metrics::CounterFn for Instrument {
    fn increment(&self, value: u64) {
        self.record_value(value as f64);
    }
    fn absolute(&self, value: u64) {
        self.record_value(value as f64);
    }
}

impl metrics::HistogramFn for Instrument {
    fn record(&self, value: f64) {
        self.record_value(value);
    }
}

impl Instrument {
    fn record_value(&self, value: f64) {
        let labels = self.1.labels().map(|l| (l.key().to_owned(), l.value().to_owned())).collect();
        self.0.0.lock().unwrap().push((self.1.name().to_owned(), labels, value));
    }
}

impl metrics::Recorder for Captured {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(Arc::new(Instrument(self.clone(), key.clone())))
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::from_arc(Arc::new(Instrument(self.clone(), key.clone())))
    }
}

impl Captured {
    /// Every value recorded for `name`, whatever its labels.
    pub fn values(&self, name: &str) -> Vec<f64> {
        self.0.lock().unwrap().iter().filter(|(n, _, _)| n == name).map(|(_, _, v)| *v).collect()
    }

    /// The values recorded for `name` with `Decision` = `decision`.
    pub fn decisions(&self, name: &str, decision: &str) -> Vec<f64> {
        let seen = self.0.lock().unwrap();
        let matches = |labels: &Vec<(String, String)>| labels.iter().any(|(k, v)| k == "Decision" && v == decision);
        seen.iter().filter(|(n, labels, _)| n == name && matches(labels)).map(|(_, _, v)| *v).collect()
    }
}
