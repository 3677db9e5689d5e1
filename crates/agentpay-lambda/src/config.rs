//! A step function's configuration, read once per cold start from `AGENTPAY_*` variables (see
//! the README, "Configuration"). Lambda always stores in DynamoDB; the provider is AgentCore
//! or, for a sandbox, the dev wallet with its key from Secrets Manager.

use std::sync::Arc;
use std::time::Duration;

use agentpay_agentcore::AgentCoreProvider;
use agentpay_core::clock::{Clock, SystemClock};
use agentpay_core::provider::rules::{PrepareOnly, ProviderKind};
use agentpay_core::provider::{IssuedProofs, PaymentProvider};
use agentpay_core::steps::{StepSettings, Steps};
use agentpay_dev_wallet::DevWallet;
use agentpay_dynamodb::{DynamoStore, TableNames};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{variable}: received {received:?}, expected {expected}")]
    Invalid { variable: &'static str, received: String, expected: &'static str },
    #[error("{variable} is not set; expected {expected}")]
    Missing { variable: &'static str, expected: &'static str },
    #[error("cannot read the dev wallet key from secret {secret}")]
    Secret {
        secret: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Where the dev wallet's key comes from. The key itself never reaches a log or a `Debug`.
#[derive(Clone)]
pub enum WalletKey {
    /// `AGENTPAY_DEV_WALLET_KEY`: for local invoke (`cargo lambda watch`), never the template.
    Hex(String),
    /// A Secrets Manager secret (name or ARN) whose string is the hex key, read once per cold
    /// start: how the template gives the key to the function.
    Secret(String),
}

impl std::fmt::Debug for WalletKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WalletKey::Hex(_) => f.write_str("WalletKey::Hex(<redacted>)"),
            WalletKey::Secret(id) => write!(f, "WalletKey::Secret({id})"),
        }
    }
}

#[derive(Debug, Clone)]
pub enum ProviderChoice {
    DevWallet(WalletKey),
    /// Endpoint, region and credentials from the standard AWS chain
    /// (`AWS_ENDPOINT_URL_BEDROCK_AGENTCORE` for a local endpoint).
    AgentCore,
}

#[derive(Debug, Clone)]
pub struct LambdaConfig {
    pub tables: TableNames,
    pub provider: ProviderChoice,
    pub settings: StepSettings,
}

const KEY_EXPECTED: &str = "a Secrets Manager secret holding a 32-byte hex private key (AGENTPAY_DEV_WALLET_SECRET), or for local invoke the hex key itself (AGENTPAY_DEV_WALLET_KEY)";

impl LambdaConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let set = |variable: &str| lookup(variable).filter(|v| !v.is_empty());
        if let Some(store) = set("AGENTPAY_STORE").filter(|s| s != "dynamodb") {
            return Err(ConfigError::Invalid {
                variable: "AGENTPAY_STORE",
                received: store,
                expected: "\"dynamodb\" (or unset): the embedded store is for one machine, a function stores in DynamoDB",
            });
        }
        let table = |variable: &'static str| {
            set(variable).ok_or(ConfigError::Missing { variable, expected: "a DynamoDB table name" })
        };
        let tables =
            TableNames { idempotency: table("AGENTPAY_IDEMPOTENCY_TABLE")?, ledger: table("AGENTPAY_LEDGER_TABLE")? };
        let provider = match set("AGENTPAY_PROVIDER").as_deref().unwrap_or("dev-wallet") {
            "agentcore" => ProviderChoice::AgentCore,
            "dev-wallet" => ProviderChoice::DevWallet(wallet_key(&set)?),
            other => {
                return Err(ConfigError::Invalid {
                    variable: "AGENTPAY_PROVIDER",
                    received: other.into(),
                    expected: "\"dev-wallet\" or \"agentcore\"",
                });
            }
        };
        Ok(Self { tables, provider, settings: settings(&set)? })
    }

    pub fn provider_kind(&self) -> ProviderKind {
        match self.provider {
            ProviderChoice::DevWallet(_) => ProviderKind::DevWallet,
            ProviderChoice::AgentCore => ProviderKind::AgentCore,
        }
    }

    /// The steps of a function that never pays (all but process-payment): the store, and the
    /// provider's checks without the provider. AWS configuration is loaded here, once.
    pub async fn build_steps(&self) -> Steps {
        let aws = crate::load_aws().await;
        let store = Arc::new(DynamoStore::from_sdk_config(&aws, self.tables.clone()));
        Steps::new(store, Arc::new(PrepareOnly(self.provider_kind())), Arc::new(SystemClock), self.settings.clone())
    }

    /// The store alone (the report and reconcile functions), and the AWS configuration it was
    /// built from, loaded here once.
    pub async fn build_store(&self) -> (aws_config::SdkConfig, Arc<DynamoStore>) {
        let aws = crate::load_aws().await;
        let store = Arc::new(DynamoStore::from_sdk_config(&aws, self.tables.clone()));
        (aws, store)
    }

    /// The steps of process-payment: the store and the configured provider, built once.
    pub async fn build_paying_steps(&self) -> Result<Steps, ConfigError> {
        let aws = crate::load_aws().await;
        let store = Arc::new(DynamoStore::from_sdk_config(&aws, self.tables.clone()));
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let provider = self.payment_provider(&aws, store.clone(), clock.clone()).await?;
        Ok(Steps::new(store, provider, clock, self.settings.clone()))
    }

    async fn payment_provider(
        &self,
        aws: &aws_config::SdkConfig,
        proofs: Arc<dyn IssuedProofs>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<dyn PaymentProvider>, ConfigError> {
        Ok(match &self.provider {
            ProviderChoice::AgentCore => Arc::new(AgentCoreProvider::from_sdk_config(aws, clock)),
            ProviderChoice::DevWallet(key) => Arc::new(dev_wallet(key, aws, proofs, clock).await?),
        })
    }
}

fn wallet_key(set: &impl Fn(&str) -> Option<String>) -> Result<WalletKey, ConfigError> {
    match (set("AGENTPAY_DEV_WALLET_KEY"), set("AGENTPAY_DEV_WALLET_SECRET"), set("AGENTPAY_DEV_WALLET_KEY_FILE")) {
        (Some(hex), _, _) => Ok(WalletKey::Hex(hex)),
        (None, Some(secret), _) => Ok(WalletKey::Secret(secret)),
        // A key file in Lambda is created under /tmp by each new instance: every cold start
        // would sign with a different throwaway wallet.
        (None, None, Some(path)) => Err(ConfigError::Invalid {
            variable: "AGENTPAY_DEV_WALLET_KEY_FILE",
            received: path,
            expected: "no key file in Lambda (each instance would create its own throwaway wallet): set AGENTPAY_DEV_WALLET_SECRET to a Secrets Manager secret holding the hex key",
        }),
        (None, None, None) => {
            Err(ConfigError::Missing { variable: "AGENTPAY_DEV_WALLET_SECRET", expected: KEY_EXPECTED })
        }
    }
}

fn settings(set: &impl Fn(&str) -> Option<String>) -> Result<StepSettings, ConfigError> {
    // Deployed, an agent with no IAM principal bound pays for nobody.
    let mut settings = StepSettings { require_bound_caller: true, ..StepSettings::default() };
    if let Some(text) = set("AGENTPAY_REQUIRE_BOUND_CALLER") {
        settings.require_bound_caller = match text.as_str() {
            "true" => true,
            "false" => false,
            _ => {
                return Err(ConfigError::Invalid {
                    variable: "AGENTPAY_REQUIRE_BOUND_CALLER",
                    received: text,
                    expected: "\"true\" (the default: refuse agents with no IAM principal bound) or \"false\"",
                });
            }
        };
    }
    if let Some(text) = set("AGENTPAY_LEASE_SECONDS") {
        settings.lease = Duration::from_secs(text.parse().ok().filter(|s| *s > 0).ok_or(ConfigError::Invalid {
            variable: "AGENTPAY_LEASE_SECONDS",
            received: text,
            expected: "a whole number of seconds above 0",
        })?);
    }
    if let Some(text) = set("AGENTPAY_APPROVAL_TIMEOUT_SECONDS") {
        let max = agentpay_core::approval::MAX_TIMEOUT_SECONDS;
        settings.approval_timeout =
            Duration::from_secs(text.parse().ok().filter(|s| (60..=max).contains(s)).ok_or(ConfigError::Invalid {
                variable: "AGENTPAY_APPROVAL_TIMEOUT_SECONDS",
                received: text,
                expected: "seconds from 60 to 86400 (how long a payment waits for a person)",
            })?);
    }
    if let Some(text) = set("AGENTPAY_IDEMPOTENCY_TTL_HOURS") {
        settings.idempotency_ttl = Duration::from_secs(
            3600 * text.parse::<u64>().ok().filter(|h| (1..=24 * 30).contains(h)).ok_or(ConfigError::Invalid {
                variable: "AGENTPAY_IDEMPOTENCY_TTL_HOURS",
                received: text,
                expected: "hours from 1 to 720",
            })?,
        );
    }
    Ok(settings)
}

/// The dev wallet from its key (the secret read through `aws`, the configuration loaded once).
pub async fn dev_wallet(
    key: &WalletKey,
    aws: &aws_config::SdkConfig,
    proofs: Arc<dyn IssuedProofs>,
    clock: Arc<dyn Clock>,
) -> Result<DevWallet, ConfigError> {
    let hex = match key {
        WalletKey::Hex(hex) => hex.clone(),
        WalletKey::Secret(secret) => read_secret(aws, secret).await?,
    };
    DevWallet::from_hex_key(&hex, proofs, clock).map_err(|_| ConfigError::Invalid {
        variable: "AGENTPAY_DEV_WALLET_KEY",
        received: "<redacted>".into(),
        expected: KEY_EXPECTED,
    })
}

/// The secret's string (`AWS_ENDPOINT_URL_SECRETS_MANAGER` for a local endpoint). The SDK's
/// error says why (access denied, not found); never the value.
async fn read_secret(aws: &aws_config::SdkConfig, secret: &str) -> Result<String, ConfigError> {
    let client = aws_sdk_secretsmanager::Client::new(aws);
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    const TABLES: [(&str, &str); 2] = [("AGENTPAY_IDEMPOTENCY_TABLE", "idem"), ("AGENTPAY_LEDGER_TABLE", "ledger")];

    #[test]
    fn errors_name_the_variable_and_the_expected_value() {
        let error = LambdaConfig::from_lookup(lookup(&[])).unwrap_err().to_string();
        assert_eq!(error, "AGENTPAY_IDEMPOTENCY_TABLE is not set; expected a DynamoDB table name");
        let error = LambdaConfig::from_lookup(lookup(&[("AGENTPAY_STORE", "sqlite")])).unwrap_err().to_string();
        assert!(error.starts_with("AGENTPAY_STORE: received \"sqlite\", expected \"dynamodb\""), "{error}");
        let error = LambdaConfig::from_lookup(lookup(&[TABLES[0], TABLES[1], ("AGENTPAY_PROVIDER", "paypal")]))
            .unwrap_err()
            .to_string();
        assert_eq!(error, "AGENTPAY_PROVIDER: received \"paypal\", expected \"dev-wallet\" or \"agentcore\"");
        let agentcore = LambdaConfig::from_lookup(lookup(&[TABLES[0], TABLES[1], ("AGENTPAY_PROVIDER", "agentcore")]));
        assert!(matches!(agentcore.unwrap().provider, ProviderChoice::AgentCore), "no dev wallet key needed");
        let lease = ("AGENTPAY_LEASE_SECONDS", "0");
        let error = LambdaConfig::from_lookup(lookup(&[TABLES[0], TABLES[1], ("AGENTPAY_DEV_WALLET_KEY", "k"), lease]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("AGENTPAY_LEASE_SECONDS"), "{error}");
        let bound = LambdaConfig::from_lookup(lookup(&[TABLES[0], TABLES[1], ("AGENTPAY_PROVIDER", "agentcore")]));
        assert!(bound.unwrap().settings.require_bound_caller, "deployed, callers must be bound by default");
        let loose = ("AGENTPAY_REQUIRE_BOUND_CALLER", "false");
        let config =
            LambdaConfig::from_lookup(lookup(&[TABLES[0], TABLES[1], ("AGENTPAY_PROVIDER", "agentcore"), loose]));
        assert!(!config.unwrap().settings.require_bound_caller);
        let wrong = ("AGENTPAY_REQUIRE_BOUND_CALLER", "yes");
        let error =
            LambdaConfig::from_lookup(lookup(&[TABLES[0], TABLES[1], ("AGENTPAY_PROVIDER", "agentcore"), wrong]));
        assert!(error.unwrap_err().to_string().starts_with("AGENTPAY_REQUIRE_BOUND_CALLER: received \"yes\""));
    }

    #[test]
    fn the_key_is_redacted() {
        let key = ("AGENTPAY_DEV_WALLET_KEY", "deadbeefsecret");
        let config = LambdaConfig::from_lookup(lookup(&[TABLES[0], TABLES[1], key])).unwrap();
        assert!(config.tables.idempotency == "idem" && config.tables.ledger == "ledger");
        assert!(!format!("{config:?}").contains("deadbeefsecret"));
    }

    #[test]
    fn the_dev_wallet_key_comes_from_a_secret_never_a_throwaway_file() {
        let file = ("AGENTPAY_DEV_WALLET_KEY_FILE", "/tmp/agentpay/dev-wallet.key");
        let error = LambdaConfig::from_lookup(lookup(&[TABLES[0], TABLES[1], file])).unwrap_err().to_string();
        assert!(error.contains("AGENTPAY_DEV_WALLET_KEY_FILE") && error.contains("throwaway"), "{error}");
        assert!(error.contains("AGENTPAY_DEV_WALLET_SECRET"), "{error}");
        let error = LambdaConfig::from_lookup(lookup(&TABLES)).unwrap_err().to_string();
        assert!(error.starts_with("AGENTPAY_DEV_WALLET_SECRET is not set"), "{error}");
        // An empty value (the template's default) is no value.
        let secret = ("AGENTPAY_DEV_WALLET_SECRET", "");
        assert!(LambdaConfig::from_lookup(lookup(&[TABLES[0], TABLES[1], secret])).is_err());
        let arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:agentpay-dev-wallet";
        let config =
            LambdaConfig::from_lookup(lookup(&[TABLES[0], TABLES[1], file, ("AGENTPAY_DEV_WALLET_SECRET", arn)]))
                .unwrap();
        assert!(matches!(&config.provider, ProviderChoice::DevWallet(WalletKey::Secret(s)) if s == arn));
    }
}
