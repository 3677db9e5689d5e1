//! Typed errors of the payment workflow.
//!
//! Every variant has a stable name ([`PaymentError::name`]) because Step Functions matches
//! `Retry`/`Catch` on the Lambda `errorType`; the message says what to fix.

use crate::money::AtomicAmount;

/// A boxed source error, kept so the chain reaches the logs.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One precise complaint about one field of a payment request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    /// JSON-ish path of the field, e.g. `challenge.x402.accepts[0].payTo`.
    pub field: String,
    /// What arrived, shortened for display.
    pub received: String,
    /// What would have been accepted.
    pub expected: String,
}

impl FieldProblem {
    pub fn new(field: impl Into<String>, received: impl Into<String>, expected: impl Into<String>) -> Self {
        // The field path can come from the input too (an unknown key): bounded like the value.
        Self { field: shorten(field.into()), received: shorten(received.into()), expected: expected.into() }
    }

    /// The field was absent.
    pub fn missing(field: impl Into<String>, expected: impl Into<String>) -> Self {
        Self::new(field, "nothing", expected)
    }

    /// Prefixes the field path, e.g. `payTo` becomes `accepts[0].payTo`.
    pub fn within(mut self, parent: &str) -> Self {
        // A problem with the value itself (no field of its own) is the parent's.
        self.field = if self.field.is_empty() { parent.to_owned() } else { format!("{parent}.{}", self.field) };
        self
    }
}

impl std::fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: received {}, expected {}", self.field, self.received, self.expected)
    }
}

impl std::error::Error for FieldProblem {}

fn shorten(value: String) -> String {
    const MAX: usize = 120;
    if value.chars().count() <= MAX {
        value
    } else {
        let cut: String = value.chars().take(MAX).collect();
        format!("{cut}… ({} chars)", value.chars().count())
    }
}

/// The request cannot be paid as sent; nothing was claimed, reserved or signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPaymentRequest {
    pub problems: Vec<FieldProblem>,
}

impl InvalidPaymentRequest {
    pub fn field(field: impl Into<String>, received: impl Into<String>, expected: impl Into<String>) -> Self {
        FieldProblem::new(field, received, expected).into()
    }
}

impl From<FieldProblem> for InvalidPaymentRequest {
    fn from(problem: FieldProblem) -> Self {
        Self { problems: vec![problem] }
    }
}

/// How many problems a message lists before it says "and N more". Each problem is bounded
/// (field and value shortened to 120 characters), so a message stays within a few KB, far
/// below the 32 KB at which Step Functions truncates a Fail state's Cause.
pub const MAX_LISTED_PROBLEMS: usize = 10;

impl std::fmt::Display for InvalidPaymentRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid payment request: ")?;
        for (index, problem) in self.problems.iter().take(MAX_LISTED_PROBLEMS).enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        if self.problems.len() > MAX_LISTED_PROBLEMS {
            write!(f, "; and {} more problems", self.problems.len() - MAX_LISTED_PROBLEMS)?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidPaymentRequest {}

/// Which spend limit a denial is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LimitKind {
    PerTransaction,
    Rolling24Hours,
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitKind::PerTransaction => "per-transaction limit",
            LimitKind::Rolling24Hours => "rolling 24-hour limit",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error(transparent)]
    InvalidPaymentRequest(#[from] InvalidPaymentRequest),

    #[error(
        "idempotency key {key:?} was already used for a different request (stored fingerprint {stored}, this request {received}); use a new key for a new payment"
    )]
    IdempotencyKeyReused { key: String, stored: String, received: String },

    #[error(
        "a payment with idempotency key {key:?} is already in flight in execution {execution_id} (lease until {lease_expires_at}); wait for it, or retry after the lease expires"
    )]
    PaymentInFlight { key: String, execution_id: String, lease_expires_at: String },

    #[error("policy denied the payment for agent {agent}: {reason}")]
    PolicyDenied { agent: String, reason: String },

    #[error(
        "payment denied for agent {agent}: it deviates from the agent's history: {details}; pay less, or have the policy send deviations to approval (deviation.action \"approve\")"
    )]
    DeviationDetected { agent: String, details: String },

    #[error(
        "agent {agent} was paused automatically: {reason}; nothing was reserved or paid. A person reviews its recent payments and resumes it with `agentpay policy resume {agent} --reason ...`"
    )]
    KillSwitchTripped { agent: String, reason: String },

    #[error(
        "{limit} exceeded for agent {agent}: amount {amount}, limit {cap}, already spent {spent}, remaining {remaining} (atomic units)"
    )]
    SpendLimitExceeded {
        agent: String,
        limit: LimitKind,
        amount: AtomicAmount,
        cap: AtomicAmount,
        spent: AtomicAmount,
        remaining: AtomicAmount,
    },

    #[error(
        "transaction rate limit exceeded for agent {agent}: {count} payments in the last hour, limit {limit} per hour"
    )]
    RateLimitExceeded { agent: String, count: u32, limit: u32 },

    #[error(
        "agent {agent} is paused (kill switch): every payment is denied until it is resumed with `agentpay policy resume {agent}`"
    )]
    AgentPaused { agent: String },

    /// The verified caller may not pay as this agent (or there is none where one is required).
    #[error("caller {caller} may not pay as agent {agent}: {reason}")]
    CallerNotBound { agent: String, caller: String, reason: String },

    #[error("payment provider {provider} is unavailable: {message}")]
    ProviderUnavailable {
        provider: &'static str,
        message: String,
        #[source]
        source: Option<BoxError>,
    },

    #[error("payment provider {provider} rejected the payment: {message}")]
    ProviderRejected { provider: &'static str, message: String },

    /// The provider may have issued a proof: a time-out or lost connection after the request
    /// was sent, a 5xx, an unreadable or malformed success. Never compensated: the reservation
    /// stays counted and the key keeps its client token, so asking again returns the proof
    /// that was issued, or a definite answer.
    #[error(
        "payment provider {provider}: outcome unknown, a proof may have been issued: {message}. The reservation stays counted; ask again with the same client token (retry, or start the same idempotency key again)"
    )]
    PaymentOutcomeUnknown {
        provider: &'static str,
        message: String,
        #[source]
        source: Option<BoxError>,
    },

    /// The key's record is no longer held by this execution (another took it over after the
    /// lease expired, or the payment finished); it may no longer move the claim or its
    /// reservation. The holder's outcome is the payment's.
    #[error(
        "execution {execution_id} no longer holds idempotency key {key:?}: the key is {holder}. Nothing was written; that execution's outcome is this payment's outcome"
    )]
    ClaimSuperseded { key: String, execution_id: String, holder: String },

    /// The provider refused for a reason a person must fix; `kind` names it and `hint` says how.
    #[error("payment provider {provider}: {kind}: {message}. {hint}")]
    ProviderFailed {
        provider: &'static str,
        kind: ProviderFailure,
        message: String,
        hint: &'static str,
        #[source]
        source: Option<BoxError>,
    },

    #[error("store unavailable during {operation}")]
    StoreUnavailable {
        operation: &'static str,
        #[source]
        source: BoxError,
    },

    /// The store refused the request for a reason retrying will not fix (a missing table,
    /// missing permissions): the source says which.
    #[error("store refused {operation}")]
    StoreRejected {
        operation: &'static str,
        #[source]
        source: BoxError,
    },

    #[error("ledger of agent {agent} changed under {attempts} consecutive attempts; retry the step")]
    LedgerConflict { agent: String, attempts: u32 },

    /// The store holds something that contradicts the workflow (e.g. a reservation that
    /// was never made). Not retryable: a person has to look.
    #[error("ledger inconsistency: {0}")]
    LedgerInconsistent(String),
}

impl PaymentError {
    /// Stable error name, used as the Lambda `errorType` and in ASL `ErrorEquals`.
    pub fn name(&self) -> &'static str {
        self.error_name().as_str()
    }

    pub fn error_name(&self) -> ErrorName {
        match self {
            PaymentError::InvalidPaymentRequest(_) => ErrorName::InvalidPaymentRequest,
            PaymentError::IdempotencyKeyReused { .. } => ErrorName::IdempotencyKeyReused,
            PaymentError::PaymentInFlight { .. } => ErrorName::PaymentInFlight,
            PaymentError::PolicyDenied { .. } => ErrorName::PolicyDenied,
            PaymentError::DeviationDetected { .. } => ErrorName::DeviationDetected,
            PaymentError::KillSwitchTripped { .. } => ErrorName::KillSwitchTripped,
            PaymentError::SpendLimitExceeded { .. } => ErrorName::SpendLimitExceeded,
            PaymentError::RateLimitExceeded { .. } => ErrorName::RateLimitExceeded,
            PaymentError::AgentPaused { .. } => ErrorName::AgentPaused,
            PaymentError::CallerNotBound { .. } => ErrorName::CallerNotBound,
            PaymentError::ProviderUnavailable { .. } => ErrorName::ProviderUnavailable,
            PaymentError::ProviderRejected { .. } => ErrorName::ProviderRejected,
            PaymentError::PaymentOutcomeUnknown { .. } => ErrorName::PaymentOutcomeUnknown,
            PaymentError::ClaimSuperseded { .. } => ErrorName::ClaimSuperseded,
            PaymentError::ProviderFailed { kind, .. } => kind.error_name(),
            PaymentError::StoreUnavailable { .. } => ErrorName::StoreUnavailable,
            PaymentError::StoreRejected { .. } => ErrorName::StoreRejected,
            PaymentError::LedgerConflict { .. } => ErrorName::LedgerConflict,
            PaymentError::LedgerInconsistent(_) => ErrorName::LedgerInconsistent,
        }
    }

    /// Whether a later attempt of the same step may succeed (the ASL retries exactly these).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            PaymentError::ProviderUnavailable { .. }
                | PaymentError::PaymentOutcomeUnknown { .. }
                | PaymentError::StoreUnavailable { .. }
                | PaymentError::LedgerConflict { .. }
        )
    }

    /// A policy said no (as opposed to a fault): the idempotency record becomes DENIED.
    pub fn is_denial(&self) -> bool {
        self.error_name().is_denial()
    }

    /// The full message including the source chain, for causes and logs.
    pub fn chain_message(&self) -> String {
        error_chain(self)
    }

    pub fn store(operation: &'static str, source: impl Into<BoxError>) -> Self {
        PaymentError::StoreUnavailable { operation, source: source.into() }
    }
}

/// Any error and its causes on one line (`error: cause: cause`).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Why a provider refused, each with its own error name in the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderFailure {
    /// The session's remaining budget is below the payment.
    SessionBudgetExhausted,
    /// The payment session is past its expiry.
    SessionExpired,
    AccessDenied,
    /// The payment manager, session or instrument does not exist.
    ResourceNotFound,
    /// The client token was used with different parameters, or the resource is changing.
    Conflict,
    QuotaExceeded,
    SubscriptionRequired,
}

impl ProviderFailure {
    pub const ALL: [ProviderFailure; 7] = [
        ProviderFailure::SessionBudgetExhausted,
        ProviderFailure::SessionExpired,
        ProviderFailure::AccessDenied,
        ProviderFailure::ResourceNotFound,
        ProviderFailure::Conflict,
        ProviderFailure::QuotaExceeded,
        ProviderFailure::SubscriptionRequired,
    ];

    pub fn name(self) -> &'static str {
        self.error_name().as_str()
    }

    pub fn error_name(self) -> ErrorName {
        match self {
            ProviderFailure::SessionBudgetExhausted => ErrorName::SessionBudgetExhausted,
            ProviderFailure::SessionExpired => ErrorName::SessionExpired,
            ProviderFailure::AccessDenied => ErrorName::ProviderAccessDenied,
            ProviderFailure::ResourceNotFound => ErrorName::ProviderResourceNotFound,
            ProviderFailure::Conflict => ErrorName::ProviderConflict,
            ProviderFailure::QuotaExceeded => ErrorName::ProviderQuotaExceeded,
            ProviderFailure::SubscriptionRequired => ErrorName::ProviderSubscriptionRequired,
        }
    }
}

impl std::fmt::Display for ProviderFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProviderFailure::SessionBudgetExhausted => "session budget exhausted",
            ProviderFailure::SessionExpired => "session expired",
            ProviderFailure::AccessDenied => "access denied",
            ProviderFailure::ResourceNotFound => "resource not found",
            ProviderFailure::Conflict => "conflict",
            ProviderFailure::QuotaExceeded => "service quota exceeded",
            ProviderFailure::SubscriptionRequired => "subscription required",
        })
    }
}

/// Declares the error names once: the enum, its `ALL` list and each name's text.
macro_rules! error_names {
    ($($name:ident),+ $(,)?) => {
        /// Every error name the workflow can produce: the Lambda `errorType`, what the ASL's
        /// `ErrorEquals` matches, the metrics' `Error` dimension. One list, and the exhaustive
        /// matches below make each new name decide whether it is a denial or a refusal.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorName {
            $($name),+
        }

        impl ErrorName {
            pub const ALL: &[ErrorName] = &[$(ErrorName::$name),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorName::$name => stringify!($name)),+
                }
            }
        }
    };
}

error_names!(
    InvalidPaymentRequest,
    IdempotencyKeyReused,
    PaymentInFlight,
    PolicyDenied,
    DeviationDetected,
    KillSwitchTripped,
    SpendLimitExceeded,
    RateLimitExceeded,
    AgentPaused,
    CallerNotBound,
    ProviderUnavailable,
    ProviderRejected,
    PaymentOutcomeUnknown,
    ClaimSuperseded,
    SessionBudgetExhausted,
    SessionExpired,
    ProviderAccessDenied,
    ProviderResourceNotFound,
    ProviderConflict,
    ProviderQuotaExceeded,
    ProviderSubscriptionRequired,
    StoreUnavailable,
    StoreRejected,
    LedgerConflict,
    LedgerInconsistent,
    ApprovalRejected,
    ApprovalTimedOut,
    ExecutionEnded,
);

impl ErrorName {
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|n| n.as_str() == name)
    }

    /// A policy said no (as opposed to a fault): the idempotency record becomes DENIED.
    pub fn is_denial(self) -> bool {
        use ErrorName::*;
        match self {
            PolicyDenied | DeviationDetected | KillSwitchTripped | SpendLimitExceeded | RateLimitExceeded
            | AgentPaused | CallerNotBound => true,
            InvalidPaymentRequest
            | IdempotencyKeyReused
            | PaymentInFlight
            | ProviderUnavailable
            | ProviderRejected
            | PaymentOutcomeUnknown
            | ClaimSuperseded
            | SessionBudgetExhausted
            | SessionExpired
            | ProviderAccessDenied
            | ProviderResourceNotFound
            | ProviderConflict
            | ProviderQuotaExceeded
            | ProviderSubscriptionRequired
            | StoreUnavailable
            | StoreRejected
            | LedgerConflict
            | LedgerInconsistent => false,
            // A person said no, or did not answer in time.
            ApprovalRejected | ApprovalTimedOut => true,
            // Reconciliation released a reservation whose execution ended before paying: a
            // fault, so the key may be started again.
            ExecutionEnded => false,
        }
    }

    /// Out of ProcessPayment, whether the error proves no proof was issued: the provider
    /// answered that it refused (or was never asked). Only these may release a reservation;
    /// every other error out of ProcessPayment, Lambda crashes and time-outs included, is an
    /// unknown outcome. `ClaimSuperseded` is in: this execution found its claim taken over
    /// and did not ask, and Compensate's write, fenced by the claim, then changes nothing.
    pub fn is_definite_refusal(self) -> bool {
        use ErrorName::*;
        match self {
            InvalidPaymentRequest
            | PolicyDenied
            | AgentPaused
            | ClaimSuperseded
            | ProviderUnavailable
            | ProviderRejected
            | SessionBudgetExhausted
            | SessionExpired
            | ProviderAccessDenied
            | ProviderResourceNotFound
            | ProviderConflict
            | ProviderQuotaExceeded
            | ProviderSubscriptionRequired => true,
            IdempotencyKeyReused
            | PaymentInFlight
            | SpendLimitExceeded
            | RateLimitExceeded
            | DeviationDetected
            | KillSwitchTripped
            // Raised by CheckSpend, before anything is reserved; never out of ProcessPayment.
            | CallerNotBound
            | PaymentOutcomeUnknown
            | StoreUnavailable
            | StoreRejected
            | LedgerConflict
            | LedgerInconsistent
            // Raised while waiting for a person, before ProcessPayment.
            | ApprovalRejected
            | ApprovalTimedOut
            // Written by reconciliation, never out of ProcessPayment.
            | ExecutionEnded => false,
        }
    }
}

/// Whether an error name (as caught by the state machine) is a policy denial.
pub fn is_denial_name(name: &str) -> bool {
    ErrorName::parse(name).is_some_and(ErrorName::is_denial)
}

/// Whether an error name caught after ProcessPayment proves that nothing was issued.
pub fn is_definite_refusal_name(name: &str) -> bool {
    ErrorName::parse(name).is_some_and(ErrorName::is_definite_refusal)
}

/// The names [`ErrorName::is_definite_refusal`] accepts, in declaration order: the ASL's
/// Catch from ProcessPayment to Compensate lists exactly these (a test checks it).
pub fn definite_refusals() -> Vec<&'static str> {
    ErrorName::ALL.iter().filter(|n| n.is_definite_refusal()).map(|n| n.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_request_message_names_field_received_and_expected() {
        let error =
            PaymentError::from(InvalidPaymentRequest::field("accepts[0].amount", "\"-5\"", "a positive integer"));
        assert_eq!(error.name(), "InvalidPaymentRequest");
        assert_eq!(
            error.to_string(),
            "invalid payment request: accepts[0].amount: received \"-5\", expected a positive integer"
        );
        assert!(!error.is_retryable());
    }

    #[test]
    fn a_message_lists_ten_problems_then_counts_the_rest() {
        let problems = (0..500).map(|i| FieldProblem::new(format!("f{i}{}", "x".repeat(1000)), "v", "w")).collect();
        let message = InvalidPaymentRequest { problems }.to_string();
        assert!(message.ends_with("; and 490 more problems"), "{message}");
        assert!(message.len() < 4_000, "{}", message.len());
    }

    #[test]
    fn long_received_values_are_shortened() {
        let problem = FieldProblem::new("x", "a".repeat(500), "short");
        assert!(problem.received.len() < 200);
        assert!(problem.received.ends_with("(500 chars)"));
    }

    #[test]
    fn every_name_parses_back_and_provider_failures_have_their_own() {
        for name in ErrorName::ALL {
            assert_eq!(ErrorName::parse(name.as_str()), Some(*name));
        }
        assert_eq!(ErrorName::parse("NoSuchError"), None);
        let mut names: Vec<_> = ProviderFailure::ALL.iter().map(|k| k.name()).collect();
        names.dedup();
        assert_eq!(names.len(), ProviderFailure::ALL.len());
        assert!(is_denial_name("SpendLimitExceeded") && !is_denial_name("ProviderRejected"));
        assert!(is_definite_refusal_name("ProviderRejected") && !is_definite_refusal_name("PaymentOutcomeUnknown"));
        assert!(!is_definite_refusal_name("Lambda.Unknown") && !is_definite_refusal_name("States.Timeout"));
    }

    #[test]
    fn chain_message_keeps_the_source() {
        let error = PaymentError::store("claim", std::io::Error::other("disk full"));
        assert_eq!(error.chain_message(), "store unavailable during claim: disk full");
        assert!(error.is_retryable());
    }
}
