//! Configuration, read once at start-up: which store, which provider, which settings.
//!
//! The CLI builds a [`Config`] from its flags; the Lambdas have their own, read from the
//! environment (`agentpay_lambda::config`). No handler reads the environment.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::clock::Clock;
use crate::provider::agentcore::AgentCoreProvider;
use crate::provider::dev_wallet::DevWallet;
use crate::provider::{IssuedProofs, PaymentProvider};
use crate::steps::StepSettings;
use crate::store::Store;
use crate::store::dynamodb::{DynamoStore, TableNames};
use crate::store::sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{variable}: received {received:?}, expected {expected}")]
    Invalid { variable: &'static str, received: String, expected: &'static str },
    #[error("{variable} is not set; expected {expected}")]
    Missing { variable: &'static str, expected: &'static str },
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the store")]
    Store(#[source] crate::error::PaymentError),
}

/// Where the dev wallet key comes from. The key itself never reaches a log or a `Debug`.
#[derive(Clone)]
pub enum DevWalletKey {
    Hex(String),
    /// Created on first use when missing (the CLI's local wallet), never in Lambda.
    File(PathBuf),
}

impl std::fmt::Debug for DevWalletKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DevWalletKey::Hex(_) => f.write_str("DevWalletKey::Hex(<redacted>)"),
            DevWalletKey::File(path) => write!(f, "DevWalletKey::File({})", path.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub enum ProviderConfig {
    DevWallet(DevWalletKey),
    /// Amazon Bedrock AgentCore Payments; endpoint, region and credentials from the standard
    /// AWS chain (`AWS_ENDPOINT_URL_BEDROCK_AGENTCORE` for a local endpoint).
    AgentCore,
}

/// The provider the steps use, and the dev wallet's address when that is the provider.
pub struct BuiltProvider {
    pub provider: Arc<dyn PaymentProvider>,
    pub wallet_address: Option<String>,
}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Sqlite(PathBuf),
    /// Endpoint, region and credentials come from the standard AWS chain
    /// (`AWS_ENDPOINT_URL_DYNAMODB` for a local server).
    Dynamo(TableNames),
}

/// The opened store, and the same store as the dev wallet's issued-proof journal.
pub struct OpenedStore {
    pub store: Arc<dyn Store>,
    pub proofs: Arc<dyn IssuedProofs>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub store: StoreConfig,
    pub provider: ProviderConfig,
    pub settings: StepSettings,
}

const KEY_EXPECTED: &str = "a 32-byte hex private key";

impl Config {
    /// The local default: everything under `data_dir`, a dev wallet key file created on first use.
    pub fn local(data_dir: &Path) -> Self {
        Self {
            store: StoreConfig::Sqlite(data_dir.join("agentpay.db")),
            provider: ProviderConfig::DevWallet(DevWalletKey::File(data_dir.join("dev-wallet.key"))),
            settings: StepSettings::default(),
        }
    }

    /// The local default with the payment store in DynamoDB (`agentpay --store dynamodb`).
    pub fn local_dynamo(data_dir: &Path, tables: TableNames) -> Self {
        Self { store: StoreConfig::Dynamo(tables), ..Self::local(data_dir) }
    }

    pub async fn open_store(&self) -> Result<OpenedStore, ConfigError> {
        Ok(match &self.store {
            StoreConfig::Sqlite(path) => {
                let store = Arc::new(SqliteStore::open(path).map_err(ConfigError::Store)?);
                OpenedStore { store: store.clone(), proofs: store }
            }
            StoreConfig::Dynamo(tables) => {
                let store = Arc::new(DynamoStore::from_env(tables.clone()).await);
                OpenedStore { store: store.clone(), proofs: store }
            }
        })
    }

    /// The configured provider, built once.
    pub async fn payment_provider(
        &self,
        proofs: Arc<dyn IssuedProofs>,
        clock: Arc<dyn Clock>,
    ) -> Result<BuiltProvider, ConfigError> {
        Ok(match &self.provider {
            ProviderConfig::DevWallet(key) => {
                let wallet = dev_wallet(key, proofs, clock).await?;
                let wallet_address = Some(wallet.address().to_checksum(None));
                BuiltProvider { provider: Arc::new(wallet), wallet_address }
            }
            ProviderConfig::AgentCore => {
                BuiltProvider { provider: Arc::new(AgentCoreProvider::from_env(clock).await), wallet_address: None }
            }
        })
    }

    /// The dev wallet from the configured key (whatever the configured provider).
    pub async fn dev_wallet(
        &self,
        proofs: Arc<dyn IssuedProofs>,
        clock: Arc<dyn Clock>,
    ) -> Result<DevWallet, ConfigError> {
        match &self.provider {
            ProviderConfig::DevWallet(key) => dev_wallet(key, proofs, clock).await,
            ProviderConfig::AgentCore => Err(ConfigError::Invalid {
                variable: "AGENTPAY_PROVIDER",
                received: "agentcore".into(),
                expected: "\"dev-wallet\" for a dev wallet",
            }),
        }
    }
}

async fn dev_wallet(
    key: &DevWalletKey,
    proofs: Arc<dyn IssuedProofs>,
    clock: Arc<dyn Clock>,
) -> Result<DevWallet, ConfigError> {
    let hex = match key {
        DevWalletKey::Hex(hex) => hex.clone(),
        DevWalletKey::File(path) => read_or_create_key(path)?,
    };
    DevWallet::from_hex_key(&hex, proofs, clock).map_err(|_| ConfigError::Invalid {
        variable: "AGENTPAY_DEV_WALLET_KEY",
        received: "<redacted>".into(),
        expected: KEY_EXPECTED,
    })
}

/// Reads the key file, or creates it with a fresh key (owner-only permissions).
fn read_or_create_key(path: &Path) -> Result<String, ConfigError> {
    let io = |source| ConfigError::Io { path: path.to_owned(), source };
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            let key = DevWallet::generate_hex_key();
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            match options.open(path) {
                Ok(mut file) => std::io::Write::write_all(&mut file, key.as_bytes()).map_err(io)?,
                // Another process created it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return read_or_create_key(path);
                }
                Err(e) => return Err(io(e)),
            }
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dev-wallet.key");
        let first = read_or_create_key(&path).unwrap();
        assert_eq!(read_or_create_key(&path).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
