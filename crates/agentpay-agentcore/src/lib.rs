//! Amazon Bedrock AgentCore Payments as the payment provider (`ProcessPayment`).
//!
//! - x402 (`CRYPTO_X402`): `version` is the challenge's x402Version as a string, `payload` the
//!   selected `accepts[]` entry; the returned `{signature, authorization}` is wrapped into the
//!   `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1) header exactly as the dev wallet does.
//! - MPP: the raw `WWW-Authenticate` value goes verbatim; the returned `paymentCredential` is
//!   the agent's `Authorization` header.
//! - The client token is the claim's (derived from the idempotency key and attempt): the SDK
//!   would otherwise invent a random one and a retry would sign a second payment.
//! - The SDK fills missing required response fields with "" and epoch 0: every field used is
//!   checked.
//! - The SDK client is built with retries off: the state machine's `ProviderUnavailable` retry
//!   is the one retry layer, visible in the execution history.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_bedrockagentcore::Client;
use aws_sdk_bedrockagentcore::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockagentcore::types::{
    Amount, CryptoX402PaymentInput, Currency, MppPaymentInput, PaymentInput, PaymentOutput, PaymentSession,
    PaymentStatus, PaymentType, SessionLimits,
};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_types::{Document, Number};
use serde_json::{Map, Value};

use agentpay_core::agentcore::{AgentCoreSelection, AgentCoreTarget, CreatedSession, SessionExpiry};
use agentpay_core::clock::{Clock, Timestamp};
use agentpay_core::error::{BoxError, InvalidPaymentRequest, PaymentError, ProviderFailure};
use agentpay_core::money::{AtomicAmount, UsdAmount};
use agentpay_core::payment::{PaymentHeader, PaymentProtocol, PaymentRequirement};
use agentpay_core::policy::SpendPolicy;
use agentpay_core::provider::rules::ProviderKind;
use agentpay_core::provider::{PaymentOrder, PaymentProof, PaymentProvider};
use agentpay_core::request::PaymentRequest;
use agentpay_core::x402::payment_header;

const PROVIDER: &str = "agentcore";

pub struct AgentCoreProvider {
    client: Client,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for AgentCoreProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCoreProvider").finish_non_exhaustive()
    }
}

/// How long one call may take before it counts as `ProviderUnavailable` (well inside the
/// process-payment Lambda's timeout, so the state machine sees the typed error).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl AgentCoreProvider {
    /// From the standard AWS configuration chain (`AWS_ENDPOINT_URL_BEDROCK_AGENTCORE` for a
    /// local endpoint), with SDK retries off (the state machine retries).
    pub async fn from_env(clock: Arc<dyn Clock>) -> Self {
        Self::from_sdk_config(&aws_config::load_from_env().await, clock)
    }

    /// From a loaded AWS configuration (its endpoint override included), SDK retries off.
    pub fn from_sdk_config(shared: &aws_config::SdkConfig, clock: Arc<dyn Clock>) -> Self {
        let config = aws_sdk_bedrockagentcore::config::Builder::from(shared)
            .retry_config(aws_sdk_bedrockagentcore::config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_sdk_bedrockagentcore::config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(CALL_TIMEOUT)
                    .build(),
            )
            .build();
        Self::new(Client::from_conf(config), clock)
    }

    pub fn new(client: Client, clock: Arc<dyn Clock>) -> Self {
        Self { client, clock }
    }

    /// Reads the session; denies before any wallet operation when it cannot cover `amount`.
    async fn check_session(&self, target: &AgentCoreTarget, amount: AtomicAmount) -> Result<(), PaymentError> {
        let output = self
            .client
            .get_payment_session()
            .user_id(&target.user_id)
            .agent_name(&target.agent_name)
            .payment_manager_arn(&target.payment_manager_arn)
            .payment_session_id(&target.payment_session_id)
            .send()
            .await
            .map_err(|e| classify("GetPaymentSession", e))?;
        let session = output.payment_session.ok_or_else(|| malformed("GetPaymentSession", "no paymentSession"))?;
        session_covers(&session, amount, self.clock.now(), &target.payment_session_id)
    }

    /// Creates a payment session (`CreatePaymentSession`) with an optional budget in USD.
    pub async fn create_session(
        &self,
        target: &AgentCoreSelection,
        user_id: &str,
        agent_name: &str,
        expiry: SessionExpiry,
        max_spend: Option<UsdAmount>,
        client_token: &str,
    ) -> Result<CreatedSession, PaymentError> {
        let manager = target
            .payment_manager_arn
            .as_deref()
            .ok_or_else(|| InvalidPaymentRequest::field("paymentManagerArn", "nothing", "the payment manager ARN"))?;
        let limits = max_spend
            .map(|usd| {
                Amount::builder()
                    .value(usd.to_string())
                    .currency(Currency::Usd)
                    .build()
                    .map(|amount| SessionLimits::builder().max_spend_amount(amount).build())
            })
            .transpose()
            .map_err(|e| malformed("CreatePaymentSession", &e.to_string()))?;
        let output = self
            .client
            .create_payment_session()
            .user_id(user_id)
            .agent_name(agent_name)
            .payment_manager_arn(manager)
            .set_limits(limits)
            .expiry_time_in_minutes(expiry.as_minutes())
            .client_token(client_token)
            .send()
            .await
            .map_err(|e| classify("CreatePaymentSession", e))?;
        let session = output.payment_session.ok_or_else(|| malformed("CreatePaymentSession", "no paymentSession"))?;
        if session.payment_session_id.is_empty() {
            return Err(malformed("CreatePaymentSession", "an empty paymentSessionId"));
        }
        let created = timestamp(&session.created_at)
            .ok_or_else(|| malformed("CreatePaymentSession", "createdAt missing (epoch 0)"))?;
        let minutes = u64::from(session.expiry_time_in_minutes.unsigned_abs());
        Ok(CreatedSession {
            payment_session_id: session.payment_session_id,
            expiry_time_in_minutes: session.expiry_time_in_minutes,
            expires_at: created.plus(Duration::from_secs(60 * minutes)),
        })
    }
}

#[async_trait]
impl PaymentProvider for AgentCoreProvider {
    fn name(&self) -> &'static str {
        PROVIDER
    }

    fn prepare(
        &self,
        request: &PaymentRequest,
        policy: &SpendPolicy,
        payment: &PaymentRequirement,
    ) -> Result<Option<Value>, PaymentError> {
        ProviderKind::AgentCore.prepare(request, policy, payment)
    }

    async fn process_payment(&self, order: &PaymentOrder) -> Result<PaymentProof, PaymentError> {
        let target: AgentCoreTarget =
            order.context.as_ref().and_then(|context| serde_json::from_value(context.clone()).ok()).ok_or_else(
                || {
                    PaymentError::LedgerInconsistent(
                        "the claim carries no AgentCore target (claimed under another provider?); start a new payment"
                            .into(),
                    )
                },
            )?;
        let requirement = &order.requirement;
        if target.check_session_first {
            self.check_session(&target, requirement.amount).await?;
        }
        let (payment_type, input) = payment_input(requirement, target.buyer_pays_gas_fees)?;
        let output = self
            .client
            .process_payment()
            .user_id(&target.user_id)
            .agent_name(&target.agent_name)
            .payment_manager_arn(&target.payment_manager_arn)
            .payment_session_id(&target.payment_session_id)
            .payment_instrument_id(&target.payment_instrument_id)
            .payment_type(payment_type)
            .payment_input(input)
            .client_token(&order.client_token)
            .send()
            .await
            .map_err(|e| classify("ProcessPayment", e))?;

        if output.status != PaymentStatus::ProofGenerated {
            // PROOF_GENERATED is the only status the service models: anything else is an
            // answer we cannot read, and a proof may exist behind it.
            return Err(malformed(
                "ProcessPayment",
                &format!("status {:?}, expected PROOF_GENERATED", output.status.as_str()),
            ));
        }
        if output.process_payment_id.is_empty() {
            return Err(malformed("ProcessPayment", "an empty processPaymentId"));
        }
        let issued_at = timestamp(&output.created_at).unwrap_or_else(|| self.clock.now());
        let (header, payer, valid_before) = proof_header(requirement, output.payment_output)?;
        Ok(PaymentProof {
            payment_id: output.process_payment_id,
            provider: PROVIDER.to_owned(),
            status: PaymentStatus::ProofGenerated.as_str().to_owned(),
            header,
            payer,
            valid_before,
            issued_at,
        })
    }
}

fn payment_input(
    requirement: &PaymentRequirement,
    buyer_pays_gas_fees: bool,
) -> Result<(PaymentType, PaymentInput), PaymentError> {
    let build_error =
        |e: aws_smithy_types::error::operation::BuildError| malformed("ProcessPayment request", &e.to_string());
    Ok(match &requirement.protocol {
        PaymentProtocol::X402 { version } => (
            PaymentType::CryptoX402,
            PaymentInput::CryptoX402(
                CryptoX402PaymentInput::builder()
                    .version(version.number().to_string())
                    .payload(to_document(&requirement.accepted))
                    .build()
                    .map_err(build_error)?,
            ),
        ),
        PaymentProtocol::Mpp(mpp) => (
            PaymentType::Mpp,
            PaymentInput::Mpp(
                MppPaymentInput::builder()
                    .version(&mpp.version)
                    .www_authenticate_headers(&mpp.header)
                    .buyer_pays_gas_fees(buyer_pays_gas_fees)
                    .build()
                    .map_err(build_error)?,
            ),
        ),
    })
}

/// The header the agent sends back, the payer and the proof's expiry, from a checked output.
fn proof_header(
    requirement: &PaymentRequirement,
    output: Option<PaymentOutput>,
) -> Result<(PaymentHeader, Option<String>, Option<Timestamp>), PaymentError> {
    match (&requirement.protocol, output) {
        (PaymentProtocol::X402 { version }, Some(PaymentOutput::CryptoX402(x402))) => {
            if x402.version != version.number().to_string() {
                return Err(malformed(
                    "ProcessPayment",
                    &format!("x402 version {:?} for a version {} challenge", x402.version, version.number()),
                ));
            }
            let payload = to_value(&x402.payload);
            let signature =
                payload.get("signature").and_then(Value::as_str).filter(|s| s.starts_with("0x") && s.len() > 2);
            let authorization = payload.get("authorization").filter(|a| a.is_object());
            let (Some(_), Some(authorization)) = (signature, authorization) else {
                return Err(malformed(
                    "ProcessPayment",
                    "an x402 payload without a 0x signature and an authorization object",
                ));
            };
            check_authorization_terms(requirement, authorization)?;
            let payer = authorization.get("from").and_then(Value::as_str).map(str::to_owned);
            let valid_before = authorization
                .get("validBefore")
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<i64>().ok())
                .and_then(|secs| secs.checked_mul(1000))
                .map(Timestamp::from_millis);
            Ok((payment_header(requirement, *version, payload), payer, valid_before))
        }
        (PaymentProtocol::Mpp(mpp), Some(PaymentOutput::Mpp(out))) => {
            if out.payment_credential.is_empty() {
                return Err(malformed("ProcessPayment", "an empty MPP paymentCredential"));
            }
            if out.selected_payment_id != mpp.challenge_id {
                return Err(malformed(
                    "ProcessPayment",
                    &format!(
                        "selectedPaymentId {:?}, but the challenge id is {:?}",
                        out.selected_payment_id, mpp.challenge_id
                    ),
                ));
            }
            let value = if out.payment_credential.starts_with("Payment ") {
                out.payment_credential
            } else {
                format!("Payment {}", out.payment_credential)
            };
            Ok((PaymentHeader { name: "Authorization".into(), value }, None, None))
        }
        (_, None) => Err(malformed("ProcessPayment", "no paymentOutput")),
        (_, Some(other)) => Err(malformed("ProcessPayment", &format!("a paymentOutput of the wrong type ({other:?})"))),
    }
}

/// Whether the session can take `amount` now; `SessionExpired` / `SessionBudgetExhausted` if not.
fn session_covers(
    session: &PaymentSession,
    amount: AtomicAmount,
    now: Timestamp,
    id: &str,
) -> Result<(), PaymentError> {
    let created =
        timestamp(&session.created_at).ok_or_else(|| malformed("GetPaymentSession", "createdAt missing (epoch 0)"))?;
    let minutes = u64::try_from(session.expiry_time_in_minutes)
        .ok()
        .filter(|m| *m > 0)
        .ok_or_else(|| malformed("GetPaymentSession", "expiryTimeInMinutes missing (0)"))?;
    let expires_at = created.plus(Duration::from_secs(60 * minutes));
    if expires_at <= now {
        return Err(PaymentError::ProviderFailed {
            provider: PROVIDER,
            kind: ProviderFailure::SessionExpired,
            message: format!("session {id} expired at {} (checked before paying)", expires_at.to_rfc3339()),
            hint: HINT_SESSION_EXPIRED,
            source: None,
        });
    }
    let available = session.available_limits.as_ref().and_then(|limits| limits.available_spend_amount.as_ref());
    if let Some(available) = available {
        if available.currency != Currency::Usd {
            return Err(malformed(
                "GetPaymentSession",
                &format!("availableSpendAmount in {:?}", available.currency.as_str()),
            ));
        }
        let usd: UsdAmount = available
            .value
            .parse()
            .map_err(|e| malformed("GetPaymentSession", &format!("availableSpendAmount {:?}: {e}", available.value)))?;
        // USDC has 6 decimals: atomic units are USD micros.
        let available_atomic = usd.to_atomic(6).expect("USD micros fit 6 decimals");
        if available_atomic < amount {
            return Err(PaymentError::ProviderFailed {
                provider: PROVIDER,
                kind: ProviderFailure::SessionBudgetExhausted,
                message: format!(
                    "session {id} has {usd} USD left, the payment is {} USD (checked before paying)",
                    amount.display_with_decimals(6)
                ),
                hint: HINT_BUDGET,
                source: None,
            });
        }
    }
    Ok(())
}

const HINT_BUDGET: &str = "Create a new payment session with a larger budget (or raise this one's limit) and retry with a new idempotency key";
const HINT_SESSION_EXPIRED: &str =
    "Create a new payment session (expiry 15 to 480 minutes) and retry with a new idempotency key naming it";
const HINT_ACCESS_DENIED: &str = "Check that the process-payment role may call bedrock-agentcore:ProcessPayment on this payment manager, that the wallet (payment instrument) is granted to this agent and user, and that the credential provider was not recreated: a recreated provider leaves the role policy pointing at the old secret ARNs";
const HINT_NOT_FOUND: &str = "Check agentcore.paymentManagerArn, paymentSessionId and paymentInstrumentId (in the execution input or the agent's policy), and the region: the session may have expired and been deleted";
const HINT_CONFLICT: &str = "The client token was already used with different parameters, or the session or instrument is being changed; the request for this idempotency key must not change — start a new payment with a new key if it did";
const HINT_QUOTA: &str =
    "An AgentCore Payments quota is exhausted: request an increase in Service Quotas, or lower the payment rate";
const HINT_SUBSCRIPTION: &str =
    "The account is not subscribed to AgentCore Payments in this region: enable it in the console, or check the region";

/// An operation's error, whatever the operation.
struct ServiceFault {
    code: String,
    message: String,
    status: u16,
    fields: Vec<String>,
}

trait ValidationFields {
    fn validation_fields(&self) -> Vec<String>;
}

macro_rules! validation_fields {
    ($($error:path => $variant:path),* $(,)?) => {$(
        impl ValidationFields for $error {
            fn validation_fields(&self) -> Vec<String> {
                match self {
                    $variant(v) => v
                        .field_list()
                        .iter()
                        .map(|f| format!("{}: {}", f.name(), f.message()))
                        .collect(),
                    _ => Vec::new(),
                }
            }
        }
    )*};
}

validation_fields!(
    aws_sdk_bedrockagentcore::operation::process_payment::ProcessPaymentError
        => aws_sdk_bedrockagentcore::operation::process_payment::ProcessPaymentError::ValidationException,
    aws_sdk_bedrockagentcore::operation::get_payment_session::GetPaymentSessionError
        => aws_sdk_bedrockagentcore::operation::get_payment_session::GetPaymentSessionError::ValidationException,
    aws_sdk_bedrockagentcore::operation::create_payment_session::CreatePaymentSessionError
        => aws_sdk_bedrockagentcore::operation::create_payment_session::CreatePaymentSessionError::ValidationException,
);

/// The signed authorization must pay what was asked: the payee and the amount. A proof for
/// other terms was still issued, so it is an unknown outcome (held), never a refusal.
fn check_authorization_terms(requirement: &PaymentRequirement, authorization: &Value) -> Result<(), PaymentError> {
    let to = authorization.get("to").and_then(Value::as_str).unwrap_or_default();
    let value = authorization.get("value").and_then(Value::as_str).unwrap_or_default();
    let pay_to = requirement.pay_to.to_checksum(None);
    if !to.eq_ignore_ascii_case(&pay_to) || value != requirement.amount.to_string() {
        return Err(malformed(
            "ProcessPayment",
            &format!(
                "an authorization paying {value:?} to {to:?}, but the request pays {} to {pay_to}",
                requirement.amount
            ),
        ));
    }
    Ok(())
}

/// Whether a dispatch failure happened while connecting: the request was never sent, so the
/// provider cannot have processed it. Anything else after dispatch may have reached it.
fn failed_to_connect(error: &(dyn std::error::Error + 'static)) -> bool {
    let text = aws_smithy_types::error::display::DisplayErrorContext(error).to_string().to_ascii_lowercase();
    ["(connect)", "tcp connect error", "dns error", "connection refused"].iter().any(|needle| text.contains(needle))
}

/// Maps an SDK error to the workflow's error names (see the README's error table). For
/// ProcessPayment, whatever may have reached the service without a definite answer (time-out,
/// lost connection, unreadable response, 5xx) is `PaymentOutcomeUnknown`; for the other
/// operations (reads, sessions) it is `ProviderUnavailable`.
fn classify<E>(operation: &'static str, error: SdkError<E, HttpResponse>) -> PaymentError
where
    E: ProvideErrorMetadata + ValidationFields + std::error::Error + Send + Sync + 'static,
{
    match classify_any(operation, error) {
        PaymentError::PaymentOutcomeUnknown { message, source, .. } if operation != "ProcessPayment" => {
            PaymentError::ProviderUnavailable { provider: PROVIDER, message, source }
        }
        other => other,
    }
}

fn outcome_unknown(message: String, source: Option<BoxError>) -> PaymentError {
    PaymentError::PaymentOutcomeUnknown { provider: PROVIDER, message, source }
}

/// Maps an SDK error to the workflow's error names (see the README's error table).
fn classify_any<E>(operation: &'static str, error: SdkError<E, HttpResponse>) -> PaymentError
where
    E: ProvideErrorMetadata + ValidationFields + std::error::Error + Send + Sync + 'static,
{
    let fault = match &error {
        SdkError::ServiceError(context) => ServiceFault {
            code: context.err().code().unwrap_or("Unknown").to_owned(),
            message: context.err().message().unwrap_or("").to_owned(),
            status: context.raw().status().as_u16(),
            fields: context.err().validation_fields(),
        },
        SdkError::DispatchFailure(_) if failed_to_connect(&error) => {
            return PaymentError::ProviderUnavailable {
                provider: PROVIDER,
                message: format!("{operation} was not sent: could not connect to the service"),
                source: Some(Box::new(error) as BoxError),
            };
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            return outcome_unknown(
                format!("{operation} did not complete (time-out, lost connection or unreadable response)"),
                Some(Box::new(error) as BoxError),
            );
        }
        _ => {
            return PaymentError::ProviderRejected {
                provider: PROVIDER,
                message: format!(
                    "{operation} could not be sent: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(&error)
                ),
            };
        }
    };
    classify_fault(operation, fault, Box::new(error))
}

fn classify_fault(operation: &'static str, fault: ServiceFault, source: BoxError) -> PaymentError {
    let failed = |kind, hint| PaymentError::ProviderFailed {
        provider: PROVIDER,
        kind,
        message: format!("{operation}: {} ({})", fault.message, fault.code),
        hint,
        source: Some(source),
    };
    match fault.code.as_str() {
        // Only a 4xx says the request was refused. Any other status the SDK could not read as
        // a success (a 200 whose body is not a ProcessPayment answer, a 3xx) may stand for a
        // proof that was issued (found by the agentcore_response fuzz target).
        _ if !(400..500).contains(&fault.status) && fault.status < 500 => outcome_unknown(
            format!(
                "{operation}: HTTP {} with an answer that could not be read ({}); asked again with the same client token",
                fault.status, fault.code
            ),
            None,
        ),
        // Throttling is refused before processing: definite, and retried.
        "ThrottlingException" => PaymentError::ProviderUnavailable {
            provider: PROVIDER,
            message: format!("{operation}: {} ({}); retried by the state machine", fault.message, fault.code),
            source: None,
        },
        _ if fault.status == 429 => PaymentError::ProviderUnavailable {
            provider: PROVIDER,
            message: format!(
                "{operation}: HTTP {} {} ({}); retried by the state machine",
                fault.status, fault.message, fault.code
            ),
            source: None,
        },
        // A server error says nothing about whether the payment was processed.
        "InternalServerException" | "ServiceUnavailableException" => outcome_unknown(
            format!("{operation}: {} ({}); asked again with the same client token", fault.message, fault.code),
            None,
        ),
        _ if fault.status >= 500 => outcome_unknown(
            format!(
                "{operation}: HTTP {} {} ({}); asked again with the same client token",
                fault.status, fault.message, fault.code
            ),
            None,
        ),
        "ValidationException" => {
            let text = fault.message.to_ascii_lowercase();
            if ["budget", "spend limit", "insufficient", "exceeds the available", "available spend"]
                .iter()
                .any(|needle| text.contains(needle))
            {
                failed(ProviderFailure::SessionBudgetExhausted, HINT_BUDGET)
            } else if text.contains("expired") || text.contains("expiry") {
                failed(ProviderFailure::SessionExpired, HINT_SESSION_EXPIRED)
            } else {
                let fields = if fault.fields.is_empty() {
                    String::new()
                } else {
                    format!("; fields: {}", fault.fields.join("; "))
                };
                PaymentError::ProviderRejected {
                    provider: PROVIDER,
                    message: format!("{operation} refused the request: {}{fields}", fault.message),
                }
            }
        }
        "AccessDeniedException" => failed(ProviderFailure::AccessDenied, HINT_ACCESS_DENIED),
        "ResourceNotFoundException" => failed(ProviderFailure::ResourceNotFound, HINT_NOT_FOUND),
        "ConflictException" => failed(ProviderFailure::Conflict, HINT_CONFLICT),
        "ServiceQuotaExceededException" => failed(ProviderFailure::QuotaExceeded, HINT_QUOTA),
        "SubscriptionRequiredException" => failed(ProviderFailure::SubscriptionRequired, HINT_SUBSCRIPTION),
        _ => PaymentError::ProviderRejected {
            provider: PROVIDER,
            message: format!("{operation}: HTTP {} {} ({})", fault.status, fault.message, fault.code),
        },
    }
}

/// An answer we cannot use. From ProcessPayment it may still stand for an issued proof, so it
/// is an unknown outcome (held, asked again with the same token); elsewhere a refusal.
fn malformed(operation: &str, what: &str) -> PaymentError {
    let message = format!("{operation} answered with {what}; no proof is used from a malformed response");
    if operation == "ProcessPayment" {
        outcome_unknown(message, None)
    } else {
        PaymentError::ProviderRejected { provider: PROVIDER, message }
    }
}

/// `None` for the SDK's placeholder (epoch 0) when the field was missing.
fn timestamp(time: &aws_smithy_types::DateTime) -> Option<Timestamp> {
    let millis = time.to_millis().ok()?;
    (millis > 0).then(|| Timestamp::from_millis(millis))
}

/// serde_json → Smithy document (x402 entries hold only strings, integers, objects, arrays).
pub fn to_document(value: &Value) -> Document {
    match value {
        Value::Null => Document::Null,
        Value::Bool(b) => Document::Bool(*b),
        Value::Number(n) => Document::Number(if let Some(u) = n.as_u64() {
            Number::PosInt(u)
        } else if let Some(i) = n.as_i64() {
            Number::NegInt(i)
        } else {
            Number::Float(n.as_f64().unwrap_or_default())
        }),
        Value::String(s) => Document::String(s.clone()),
        Value::Array(items) => Document::Array(items.iter().map(to_document).collect()),
        Value::Object(fields) => Document::Object(fields.iter().map(|(k, v)| (k.clone(), to_document(v))).collect()),
    }
}

/// Smithy document → serde_json, keys sorted (a document object is a hash map): the same
/// proof always gives the same header bytes.
pub fn to_value(document: &Document) -> Value {
    match document {
        Document::Null => Value::Null,
        Document::Bool(b) => Value::Bool(*b),
        Document::Number(Number::PosInt(u)) => Value::from(*u),
        Document::Number(Number::NegInt(i)) => Value::from(*i),
        Document::Number(Number::Float(f)) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Document::String(s) => Value::String(s.clone()),
        Document::Array(items) => Value::Array(items.iter().map(to_value).collect()),
        Document::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| (k.clone(), to_value(&fields[k]))).collect::<Map<_, _>>())
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_authorization_for_other_terms_is_an_unknown_outcome_not_a_proof() {
        let request =
            agentpay_core::request::PaymentRequest::parse(&agentpay_core::samples::execution_input("k", "a", "10000"))
                .unwrap();
        let allow = agentpay_core::payment::Allowlist {
            networks: agentpay_core::payment::Network::ALL.to_vec(),
            payees: vec![],
        };
        let requirement = request.select_payment(&allow, "a").unwrap();
        let pay_to = requirement.pay_to.to_checksum(None);
        let right = serde_json::json!({"to": pay_to.to_lowercase(), "value": "10000"});
        assert!(check_authorization_terms(&requirement, &right).is_ok(), "addresses compare case-insensitively");
        for wrong in [
            serde_json::json!({"to": pay_to, "value": "10001"}),
            serde_json::json!({"to": "0x0000000000000000000000000000000000000001", "value": "10000"}),
            serde_json::json!({"value": "10000"}),
        ] {
            let error = check_authorization_terms(&requirement, &wrong).unwrap_err();
            assert_eq!(error.name(), "PaymentOutcomeUnknown", "{wrong}");
        }
    }

    #[test]
    fn session_expiry_is_15_to_480_minutes() {
        assert!(SessionExpiry::minutes(15).is_ok());
        assert!(SessionExpiry::minutes(480).is_ok());
        for bad in [0, 14, 481, -5, i64::from(i32::MAX) + 1] {
            let error = SessionExpiry::minutes(bad).unwrap_err();
            assert!(error.to_string().contains("15 to 480 minutes"), "{error}");
        }
    }

    #[test]
    fn selections_are_checked_field_by_field() {
        let problems = AgentCoreSelection::parse(
            &json!({"paymentManagerArn": "arn:aws:s3:::bucket", "paymentSessionId": "has space", "extra": 1}),
            "agentcore",
        )
        .unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["agentcore.extra", "agentcore.paymentManagerArn", "agentcore.paymentSessionId"]);
        let good = AgentCoreSelection::parse(
            &json!({"paymentManagerArn": "arn:aws:bedrock-agentcore:us-east-1:123456789012:payment-manager/pm-1"}),
            "agentcore",
        )
        .unwrap();
        assert_eq!(good.payment_session_id, None);
    }

    #[test]
    fn documents_round_trip_with_sorted_keys() {
        let value = json!({"b": [1, -2, "x", null, true], "a": {"z": 1, "y": "2"}});
        let back = to_value(&to_document(&value));
        assert_eq!(back, value);
        assert_eq!(back.to_string(), r#"{"a":{"y":"2","z":1},"b":[1,-2,"x",null,true]}"#);
    }

    #[test]
    fn validation_messages_tell_budget_from_expiry() {
        let fault = |message: &str| ServiceFault {
            code: "ValidationException".into(),
            message: message.into(),
            status: 400,
            fields: vec!["paymentInput: bad".into()],
        };
        let budget = classify_fault("ProcessPayment", fault("Payment amount exceeds the session budget"), "x".into());
        assert_eq!(budget.name(), "SessionBudgetExhausted");
        let expired = classify_fault("ProcessPayment", fault("Payment session has expired"), "x".into());
        assert_eq!(expired.name(), "SessionExpired");
        let other = classify_fault("ProcessPayment", fault("Invalid payTo"), "x".into());
        assert_eq!(other.name(), "ProviderRejected");
        assert!(other.to_string().contains("fields: paymentInput: bad"), "{other}");
    }

    /// Only a 4xx refuses: an unreadable answer with any other status may stand for a proof.
    #[test]
    fn an_unreadable_answer_that_is_not_a_4xx_is_an_unknown_outcome() {
        let fault = |status: u16, code: &str| ServiceFault {
            code: code.into(),
            message: String::new(),
            status,
            fields: vec![],
        };
        for status in [200, 201, 204, 302] {
            for code in ["Unknown", "ValidationException", "ThrottlingException", "AccessDeniedException"] {
                let error = classify_fault("ProcessPayment", fault(status, code), "x".into());
                assert_eq!(error.name(), "PaymentOutcomeUnknown", "HTTP {status} {code}");
            }
        }
        assert_eq!(classify_fault("ProcessPayment", fault(418, "Unknown"), "x".into()).name(), "ProviderRejected");
        assert_eq!(classify_fault("ProcessPayment", fault(502, "Unknown"), "x".into()).name(), "PaymentOutcomeUnknown");
    }
}
