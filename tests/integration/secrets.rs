//! The dev wallet's key from Secrets Manager (moto's server, the real SDK), as the template
//! gives it to the Lambdas.

use std::sync::Arc;

use agentpay::clock::SystemClock;
use agentpay::provider::dev_wallet::DevWallet;
use agentpay::store::sqlite::SqliteStore;
use agentpay_lambda::config::{LambdaConfig, ProviderChoice, WalletKey, dev_wallet};

use crate::stores::local_aws_config;

/// The Secrets Manager endpoint `./scripts/test` exports for the code under test.
fn secrets_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL_SECRETS_MANAGER").unwrap_or_else(|_| {
        panic!(
            "AWS_ENDPOINT_URL_SECRETS_MANAGER is not set: run ./scripts/test, which starts moto's server and sets it"
        )
    })
}

/// The key the function's configuration names, as the template sets it.
fn secret_key(secret: &str) -> WalletKey {
    let config = LambdaConfig::from_lookup(|name| match name {
        "AGENTPAY_IDEMPOTENCY_TABLE" | "AGENTPAY_LEDGER_TABLE" => Some("t".into()),
        "AGENTPAY_DEV_WALLET_SECRET" => Some(secret.into()),
        _ => None,
    })
    .unwrap();
    let ProviderChoice::DevWallet(key) = config.provider else { panic!("the dev wallet is the default provider") };
    key
}

#[tokio::test]
async fn a_lambda_reads_the_dev_wallet_key_from_its_secret() {
    let client = aws_sdk_secretsmanager::Client::new(&local_aws_config(&secrets_endpoint()).await);
    let key = DevWallet::generate_hex_key();
    let name = format!("agentpay-dev-wallet-{}", alloy_primitives::hex::encode(rand::random::<[u8; 4]>()));
    let arn = client.create_secret().name(&name).secret_string(&key).send().await.unwrap().arn.unwrap();
    let proofs = Arc::new(SqliteStore::in_memory().unwrap());

    let aws = local_aws_config(&secrets_endpoint()).await;
    let wallet = dev_wallet(&secret_key(&arn), &aws, proofs.clone(), Arc::new(SystemClock)).await.unwrap();
    let expected = DevWallet::from_hex_key(&key, proofs.clone(), Arc::new(SystemClock)).unwrap();
    assert_eq!(wallet.address(), expected.address(), "the wallet of the secret's key");

    // A secret that does not exist fails the cold start naming it, never showing a key.
    let missing = format!("{arn}-gone");
    let error = dev_wallet(&secret_key(&missing), &aws, proofs, Arc::new(SystemClock)).await.unwrap_err();
    let message = agentpay::error::error_chain(&error);
    assert!(message.contains(&missing) && message.contains("ResourceNotFound"), "{message}");
    assert!(!message.contains(&key));
}
