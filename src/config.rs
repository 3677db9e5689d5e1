//! Configuration, read once at start-up: which store, which provider, which settings.
//!
//! Lambda mains call [`Config::from_env`] before serving; the CLI builds the same
//! [`Config`] from its flags. No handler reads the environment.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::provider::agentcore::AgentCoreProvider;
use crate::provider::dev_wallet::DevWallet;
use crate::provider::{IssuedProofs, PaymentProvider};
use crate::steps::{StepSettings, Steps};
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
    #[error("cannot read the dev wallet key from secret {secret}")]
    Secret {
        secret: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Where the dev wallet key comes from. The key itself never reaches a log or a `Debug`.
#[derive(Clone)]
pub enum DevWalletKey {
    Hex(String),
    /// Created on first use when missing (the CLI's local wallet), never in Lambda.
    File(PathBuf),
    /// A Secrets Manager secret (name or ARN) whose string is the hex key: read once per cold
    /// start, the way the template gives the key to the functions.
    Secret(String),
}

impl std::fmt::Debug for DevWalletKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DevWalletKey::Hex(_) => f.write_str("DevWalletKey::Hex(<redacted>)"),
            DevWalletKey::File(path) => write!(f, "DevWalletKey::File({})", path.display()),
            DevWalletKey::Secret(id) => write!(f, "DevWalletKey::Secret({id})"),
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

const KEY_EXPECTED: &str = "a 32-byte hex private key (AGENTPAY_DEV_WALLET_KEY), a Secrets Manager secret holding one (AGENTPAY_DEV_WALLET_SECRET) or a file holding one (AGENTPAY_DEV_WALLET_KEY_FILE; not in Lambda)";

impl Config {
    /// Reads `AGENTPAY_*` variables (see README, "Configuration").
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let store = match lookup("AGENTPAY_STORE").as_deref().unwrap_or("dynamodb") {
            "dynamodb" => {
                let table = |variable: &'static str| {
                    lookup(variable)
                        .filter(|v| !v.is_empty())
                        .ok_or(ConfigError::Missing { variable, expected: "a DynamoDB table name" })
                };
                StoreConfig::Dynamo(TableNames {
                    idempotency: table("AGENTPAY_IDEMPOTENCY_TABLE")?,
                    ledger: table("AGENTPAY_LEDGER_TABLE")?,
                })
            }
            "sqlite" => StoreConfig::Sqlite(PathBuf::from(
                lookup("AGENTPAY_SQLITE_PATH").unwrap_or_else(|| "/tmp/agentpay/agentpay.db".into()),
            )),
            other => {
                return Err(ConfigError::Invalid {
                    variable: "AGENTPAY_STORE",
                    received: other.into(),
                    expected: "\"dynamodb\" or \"sqlite\"",
                });
            }
        };
        let set = |variable: &str| lookup(variable).filter(|v| !v.is_empty());
        // A key file in Lambda is created under /tmp by each new instance: every cold start
        // would sign with a different throwaway wallet. Lambda gets its key from a secret.
        let in_lambda = set("AWS_LAMBDA_FUNCTION_NAME").is_some();
        let provider = match lookup("AGENTPAY_PROVIDER").as_deref().unwrap_or("dev-wallet") {
            "dev-wallet" => ProviderConfig::DevWallet(
                match (
                    set("AGENTPAY_DEV_WALLET_KEY"),
                    set("AGENTPAY_DEV_WALLET_SECRET"),
                    set("AGENTPAY_DEV_WALLET_KEY_FILE"),
                ) {
                    (Some(hex), _, _) => DevWalletKey::Hex(hex),
                    (None, Some(secret), _) => DevWalletKey::Secret(secret),
                    (None, None, Some(path)) if in_lambda => {
                        return Err(ConfigError::Invalid {
                            variable: "AGENTPAY_DEV_WALLET_KEY_FILE",
                            received: path,
                            expected: "no key file in Lambda (each instance would create its own throwaway wallet): set AGENTPAY_DEV_WALLET_SECRET to a Secrets Manager secret holding the hex key",
                        });
                    }
                    (None, None, Some(path)) => DevWalletKey::File(PathBuf::from(path)),
                    (None, None, None) => {
                        return Err(ConfigError::Missing {
                            variable: if in_lambda { "AGENTPAY_DEV_WALLET_SECRET" } else { "AGENTPAY_DEV_WALLET_KEY" },
                            expected: KEY_EXPECTED,
                        });
                    }
                },
            ),
            "agentcore" => ProviderConfig::AgentCore,
            other => {
                return Err(ConfigError::Invalid {
                    variable: "AGENTPAY_PROVIDER",
                    received: other.into(),
                    expected: "\"dev-wallet\" or \"agentcore\"",
                });
            }
        };
        let mut settings = StepSettings::default();
        if let Some(text) = lookup("AGENTPAY_LEASE_SECONDS") {
            settings.lease = Duration::from_secs(text.parse().ok().filter(|s| *s > 0).ok_or(ConfigError::Invalid {
                variable: "AGENTPAY_LEASE_SECONDS",
                received: text,
                expected: "a whole number of seconds above 0",
            })?);
        }
        if let Some(text) = lookup("AGENTPAY_IDEMPOTENCY_TTL_HOURS") {
            settings.idempotency_ttl = Duration::from_secs(
                3600 * text.parse::<u64>().ok().filter(|h| (1..=24 * 30).contains(h)).ok_or(ConfigError::Invalid {
                    variable: "AGENTPAY_IDEMPOTENCY_TTL_HOURS",
                    received: text,
                    expected: "hours from 1 to 720",
                })?,
            );
        }
        Ok(Self { store, provider, settings })
    }

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

    /// Builds the steps once: store, provider and clock wired in.
    pub async fn build_steps(&self) -> Result<Steps, ConfigError> {
        let opened = self.open_store().await?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let built = self.payment_provider(opened.proofs, clock.clone()).await?;
        Ok(Steps::new(opened.store, built.provider, clock, self.settings.clone()))
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
        DevWalletKey::Secret(secret) => read_secret(secret).await?,
    };
    DevWallet::from_hex_key(&hex, proofs, clock).map_err(|_| ConfigError::Invalid {
        variable: "AGENTPAY_DEV_WALLET_KEY",
        received: "<redacted>".into(),
        expected: KEY_EXPECTED,
    })
}

/// The secret's string, through the standard AWS chain (`AWS_ENDPOINT_URL_SECRETS_MANAGER`
/// for a local endpoint). The SDK's error says why (access denied, not found); never the value.
async fn read_secret(secret: &str) -> Result<String, ConfigError> {
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let client = aws_sdk_secretsmanager::Client::new(&config);
    let failed =
        |source: Box<dyn std::error::Error + Send + Sync>| ConfigError::Secret { secret: secret.to_owned(), source };
    let output = client
        .get_secret_value()
        .secret_id(secret)
        .send()
        .await
        .map_err(|e| failed(aws_smithy_types::error::display::DisplayErrorContext(&e).to_string().into()))?;
    output.secret_string().map(|s| s.trim().to_owned()).ok_or_else(|| failed("the secret has no string value".into()))
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
    use std::collections::HashMap;

    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn errors_name_the_variable_and_the_expected_value() {
        let error = Config::from_lookup(lookup(&[])).unwrap_err().to_string();
        assert_eq!(error, "AGENTPAY_IDEMPOTENCY_TABLE is not set; expected a DynamoDB table name");
        let error = Config::from_lookup(lookup(&[("AGENTPAY_STORE", "mongo")])).unwrap_err().to_string();
        assert_eq!(error, "AGENTPAY_STORE: received \"mongo\", expected \"dynamodb\" or \"sqlite\"");
        let sqlite = ("AGENTPAY_STORE", "sqlite");
        let error = Config::from_lookup(lookup(&[sqlite, ("AGENTPAY_PROVIDER", "paypal")])).unwrap_err().to_string();
        assert_eq!(error, "AGENTPAY_PROVIDER: received \"paypal\", expected \"dev-wallet\" or \"agentcore\"");
        let agentcore = Config::from_lookup(lookup(&[sqlite, ("AGENTPAY_PROVIDER", "agentcore")])).unwrap();
        assert!(matches!(agentcore.provider, ProviderConfig::AgentCore), "no dev wallet key needed");
        let error = Config::from_lookup(lookup(&[sqlite])).unwrap_err().to_string();
        assert!(error.starts_with("AGENTPAY_DEV_WALLET_KEY is not set"), "{error}");
        let error =
            Config::from_lookup(lookup(&[sqlite, ("AGENTPAY_DEV_WALLET_KEY", "k"), ("AGENTPAY_LEASE_SECONDS", "0")]))
                .unwrap_err()
                .to_string();
        assert!(error.contains("AGENTPAY_LEASE_SECONDS"), "{error}");
    }

    #[test]
    fn lambdas_default_to_dynamodb_and_the_key_is_redacted() {
        let config = Config::from_lookup(lookup(&[
            ("AGENTPAY_IDEMPOTENCY_TABLE", "idem"),
            ("AGENTPAY_LEDGER_TABLE", "ledger"),
            ("AGENTPAY_DEV_WALLET_KEY", "deadbeefsecret"),
        ]))
        .unwrap();
        assert!(matches!(&config.store, StoreConfig::Dynamo(t) if t.idempotency == "idem" && t.ledger == "ledger"));
        assert!(!format!("{config:?}").contains("deadbeefsecret"));
    }

    #[test]
    fn in_lambda_the_dev_wallet_key_comes_from_a_secret_never_a_throwaway_file() {
        let tables = [("AGENTPAY_IDEMPOTENCY_TABLE", "idem"), ("AGENTPAY_LEDGER_TABLE", "ledger")];
        let lambda = ("AWS_LAMBDA_FUNCTION_NAME", "agentpay-dev-process-payment");
        let file = ("AGENTPAY_DEV_WALLET_KEY_FILE", "/tmp/agentpay/dev-wallet.key");
        let error = Config::from_lookup(lookup(&[tables[0], tables[1], lambda, file])).unwrap_err().to_string();
        assert!(error.contains("AGENTPAY_DEV_WALLET_KEY_FILE") && error.contains("throwaway"), "{error}");
        assert!(error.contains("AGENTPAY_DEV_WALLET_SECRET"), "{error}");
        let error = Config::from_lookup(lookup(&[tables[0], tables[1], lambda])).unwrap_err().to_string();
        assert!(error.starts_with("AGENTPAY_DEV_WALLET_SECRET is not set"), "{error}");
        // An empty value (the template's default) is no value.
        let secret = ("AGENTPAY_DEV_WALLET_SECRET", "");
        assert!(Config::from_lookup(lookup(&[tables[0], tables[1], lambda, secret])).is_err());
        let arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:agentpay-dev-wallet";
        let config =
            Config::from_lookup(lookup(&[tables[0], tables[1], lambda, file, ("AGENTPAY_DEV_WALLET_SECRET", arn)]))
                .unwrap();
        assert!(matches!(&config.provider, ProviderConfig::DevWallet(DevWalletKey::Secret(s)) if s == arn));
        // Outside Lambda the local key file is the default.
        let local = Config::from_lookup(lookup(&[tables[0], tables[1], file])).unwrap();
        assert!(matches!(local.provider, ProviderConfig::DevWallet(DevWalletKey::File(_))));
    }

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
