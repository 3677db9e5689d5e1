//! The workflow's vocabulary, shared by the ASL interpreter, the steps and the Lambdas: one
//! source for the step names, the functions that run them and the ASL's ARN placeholders.

/// The steps, by the names the state machine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepName {
    CheckIdempotency,
    CheckSpend,
    ProcessPayment,
    RecordLedger,
    Compensate,
}

impl StepName {
    pub const ALL: [StepName; 5] =
        [Self::CheckIdempotency, Self::CheckSpend, Self::ProcessPayment, Self::RecordLedger, Self::Compensate];

    /// The crate under `functions/` and the function's name in `template.yaml`.
    pub fn function_name(self) -> &'static str {
        match self {
            Self::CheckIdempotency => "check-idempotency",
            Self::CheckSpend => "check-spend",
            Self::ProcessPayment => "process-payment",
            Self::RecordLedger => "record-ledger",
            Self::Compensate => "compensate",
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
        }
    }
}
