//! The workflow's vocabulary, shared by the ASL interpreter, the steps, the Lambdas and the
//! client: one source for the step names, the functions that run them, the ASL's ARN
//! placeholders, and the execution name an idempotency key gets (one key, one name, so Step
//! Functions itself refuses a second execution of a key while the first is kept — 90 days for a
//! Standard machine — whether the client or the entry point starts it).

use sha2::{Digest, Sha256};

/// The steps, by the names the state machine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StepName {
    CheckIdempotency,
    CheckSpend,
    ProcessPayment,
    RecordLedger,
    Compensate,
    /// The callback task's function: records the approval a payment waits for.
    RequestApproval,
}

impl StepName {
    pub const ALL: [StepName; 6] = [
        Self::CheckIdempotency,
        Self::CheckSpend,
        Self::ProcessPayment,
        Self::RecordLedger,
        Self::Compensate,
        Self::RequestApproval,
    ];

    /// The crate under `functions/` and the function's name in `template.yaml`.
    pub fn function_name(self) -> &'static str {
        match self {
            Self::CheckIdempotency => "check-idempotency",
            Self::CheckSpend => "check-spend",
            Self::ProcessPayment => "process-payment",
            Self::RecordLedger => "record-ledger",
            Self::Compensate => "compensate",
            Self::RequestApproval => "request-approval",
        }
    }

    /// The `${...}` substitution the ASL uses for the function's ARN.
    pub fn arn_substitution(self) -> &'static str {
        match self {
            Self::CheckIdempotency => "CheckIdempotencyFunctionArn",
            Self::CheckSpend => "CheckSpendFunctionArn",
            Self::ProcessPayment => "ProcessPaymentFunctionArn",
            Self::RecordLedger => "RecordLedgerFunctionArn",
            Self::Compensate => "CompensateFunctionArn",
            Self::RequestApproval => "RequestApprovalFunctionArn",
        }
    }
}

/// Step Functions execution names: 1–80 characters, none of whitespace, `<>{}[]?*"#%\^|~`$&,;:/`
/// or control characters.
pub const MAX_EXECUTION_NAME: usize = 80;

fn allowed_in_name(c: char) -> bool {
    !c.is_whitespace() && !c.is_control() && !"<>{}[]?*\"#%\\^|~`$&,;:/".contains(c)
}

/// Whether Step Functions accepts `name` as an execution name.
pub fn is_valid_execution_name(name: &str) -> bool {
    !name.is_empty() && name.chars().count() <= MAX_EXECUTION_NAME && name.chars().all(allowed_in_name)
}

/// The execution name for an idempotency key, with an optional per-run suffix.
///
/// The key is kept readable; where characters had to be replaced or the name cut, a hash
/// of the whole key is appended so two keys never share a name.
pub fn execution_name(key: &str, run_suffix: Option<&str>) -> String {
    let sanitized: String = key.chars().map(|c| if allowed_in_name(c) { c } else { '_' }).collect();
    let suffix = run_suffix.map(|s| format!("-{s}")).unwrap_or_default();
    let fits = sanitized.len() + suffix.len() <= MAX_EXECUTION_NAME;
    if sanitized == key && fits && !key.is_empty() {
        return format!("{sanitized}{suffix}");
    }
    let hash = &alloy_primitives::hex::encode(Sha256::digest(key.as_bytes()))[..12];
    let room = MAX_EXECUTION_NAME - suffix.len() - hash.len() - 1;
    let head: String = sanitized.chars().take(room).collect();
    format!("{head}-{hash}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_keys_stay_readable() {
        assert_eq!(execution_name("order-42", None), "order-42");
        assert_eq!(execution_name("order-42", Some("ab12")), "order-42-ab12");
    }

    #[test]
    fn forbidden_characters_are_replaced_and_disambiguated() {
        let a = execution_name("tenant:order/42", None);
        let b = execution_name("tenant_order_42", None);
        assert!(a.starts_with("tenant_order_42-"), "{a}");
        assert_ne!(a, b);
        assert!(a.chars().all(allowed_in_name));
    }

    #[test]
    fn long_keys_are_cut_to_80_with_a_hash() {
        let long_a = "k".repeat(200);
        let long_b = format!("{}x", "k".repeat(199));
        let a = execution_name(&long_a, Some("run1"));
        let b = execution_name(&long_b, Some("run1"));
        assert_eq!(a.len(), MAX_EXECUTION_NAME);
        assert!(a.ends_with("-run1"));
        assert_ne!(a, b);
        assert_eq!(execution_name(&"k".repeat(80), None), "k".repeat(80));
        assert_eq!(execution_name(&"k".repeat(81), None).len(), MAX_EXECUTION_NAME);
    }
}
