//! Store fixtures: the same fixture over SQLite or over DynamoDB (moto's server).

use std::sync::Arc;
use std::time::Duration;

use agentpay::clock::{ManualClock, Timestamp};
use agentpay::provider::IssuedProofs;
use agentpay::provider::dev_wallet::DevWallet;
use agentpay::steps::{StepSettings, Steps};
use agentpay::store::Store;
use agentpay::store::dynamodb::{DynamoStore, TableNames, create_table, schema};
use agentpay::store::sqlite::SqliteStore;

pub const START: Timestamp = Timestamp::from_millis(1_790_000_000_000);

/// The DynamoDB-compatible endpoint the test command started. Tests never reach real AWS:
/// without the variable they fail.
pub fn dynamodb_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL_DYNAMODB").unwrap_or_else(|_| {
        panic!("AWS_ENDPOINT_URL_DYNAMODB is not set: run ./scripts/test, which starts moto's server and sets it")
    })
}

/// AWS configuration for a local endpoint: fixed region, test credentials.
pub async fn local_aws_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .test_credentials()
        .load()
        .await
}

pub async fn dynamodb_client() -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&local_aws_config(&dynamodb_endpoint()).await)
}

/// Fresh tables with the template's key schema; the names are unique per call.
pub async fn fresh_tables(client: &aws_sdk_dynamodb::Client) -> TableNames {
    let id = alloy_primitives::hex::encode(rand::random::<[u8; 6]>());
    let tables = TableNames { idempotency: format!("idempotency-{id}"), ledger: format!("ledger-{id}") };
    create_table(client, &tables.idempotency, schema::IDEMPOTENCY).await.unwrap();
    create_table(client, &tables.ledger, schema::LEDGER).await.unwrap();
    tables
}

pub async fn dynamo_store() -> Arc<DynamoStore> {
    let client = dynamodb_client().await;
    let tables = fresh_tables(&client).await;
    Arc::new(DynamoStore::new(client, tables))
}

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Dynamo,
}

pub struct Fixture {
    pub store: Arc<dyn Store>,
    pub steps: Steps,
    pub clock: Arc<ManualClock>,
    /// The dev wallet's journal of issued proofs.
    pub proofs: Arc<dyn IssuedProofs>,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    pub async fn new(backend: Backend) -> Self {
        let clock = Arc::new(ManualClock::new(START));
        let (store, proofs, dir): (Arc<dyn Store>, Arc<dyn IssuedProofs>, _) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let store = Arc::new(SqliteStore::open(&dir.path().join("agentpay.db")).unwrap());
                (store.clone(), store, Some(dir))
            }
            Backend::Dynamo => {
                let store = dynamo_store().await;
                (store.clone(), store, None)
            }
        };
        let wallet = DevWallet::from_hex_key(&DevWallet::generate_hex_key(), proofs.clone(), clock.clone()).unwrap();
        let settings = StepSettings { lease: Duration::from_secs(300), ledger_attempts: 50, ..StepSettings::default() };
        let steps = Steps::new(store.clone(), Arc::new(wallet), clock.clone(), settings);
        Self { store, steps, clock, proofs, _dir: dir }
    }
}

/// A DynamoDB store on fresh tables whose client logs every request it sends.
pub async fn logged_store() -> (Arc<DynamoStore>, agentpay::store::dynamodb::request_log::RequestLog) {
    let log = agentpay::store::dynamodb::request_log::RequestLog::default();
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(dynamodb_endpoint())
        .region(aws_config::Region::new("us-east-1"))
        .test_credentials()
        .load()
        .await;
    let config = aws_sdk_dynamodb::config::Builder::from(&shared).interceptor(log.interceptor()).build();
    let client = aws_sdk_dynamodb::Client::from_conf(config);
    let tables = fresh_tables(&client).await;
    (Arc::new(DynamoStore::new(client, tables)), log)
}
