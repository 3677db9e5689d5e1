//! Settlement reports on AWS: a function URL with `AuthType: AWS_IAM`, like the entry point.
//! Lambda verifies the caller's SigV4 signature and hands over its ARN; a report is accepted
//! only from a principal the agent's policy binds, or from an operator
//! (`AGENTPAY_OPERATOR_PRINCIPALS`). The report is then checked against the payment it names
//! and recorded (or refused and audited) by the same service the CLI uses.
//!
//! Answers (JSON): 200 recorded, or recorded before (`alreadyRecorded`); 400 a bad body,
//! naming the field; 403 no verified caller, or one not bound to the agent; 404 no such
//! payment; 405 a method other than POST; 409 not an authorized payment, or a report that
//! contradicts the ledger; 422 a report that does not match the payment; 502 the store failed.

use agentpay_core::identity::{check_principal_arn, is_bound};
use agentpay_core::settlement::SettlementRequest;
use agentpay_core::settlements::{SettlementError, Settlements};
use agentpay_core::store::Store;
use serde_json::{Value, json};
use std::sync::Arc;

use crate::entry_point::UrlAnswer;

/// The environment variable naming the operators: IAM role or user ARNs, comma-separated.
pub const OPERATORS_VAR: &str = "AGENTPAY_OPERATOR_PRINCIPALS";

/// Parses the operators' ARNs; the error names the variable and what was expected.
pub fn operators_from(text: &str) -> Result<Vec<String>, String> {
    let arns: Vec<String> = text.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect();
    for arn in &arns {
        check_principal_arn(arn)
            .map_err(|expected| format!("{OPERATORS_VAR}: received {arn:?}, expected {expected}"))?;
    }
    Ok(arns)
}

pub struct SettlementUrl {
    store: Arc<dyn Store>,
    settlements: Settlements,
    operators: Vec<String>,
}

impl SettlementUrl {
    pub fn new(store: Arc<dyn Store>, settlements: Settlements, operators: Vec<String>) -> Self {
        Self { store, settlements, operators }
    }

    /// One function URL request (payload format 2.0).
    pub async fn handle(&self, event: &Value) -> UrlAnswer {
        let caller = match crate::entry_point::verified_post(event, "the settlement report") {
            Ok(caller) => caller,
            Err(answer) => return answer,
        };
        let body = match crate::entry_point::body(event) {
            Ok(fields) => Value::Object(fields),
            Err(answer) => return answer,
        };
        let request = match SettlementRequest::parse(&body) {
            Ok(request) => request,
            Err(invalid) => return UrlAnswer::refused(400, "InvalidSettlementReport", invalid.to_string()),
        };
        let agent = request.agent_id.as_str();
        if let Err(answer) = self.check_caller(agent, caller).await {
            return answer;
        }
        let key = request.idempotency_key.as_str();
        match self.settlements.report(agent, key, &request.report, caller).await {
            Ok(recorded) => {
                tracing::info!(agent, status = recorded.status.as_str(), caller, "settlement report recorded");
                UrlAnswer::new(200, serde_json::to_value(&recorded).unwrap_or_default())
            }
            Err(error) => {
                tracing::info!(agent, error = error.name(), caller, "settlement report refused");
                UrlAnswer::refused(status_of(&error), error.name(), error.to_string())
            }
        }
    }

    /// The agent's own principals, or an operator.
    async fn check_caller(&self, agent: &str, caller: &str) -> Result<(), UrlAnswer> {
        if is_bound(caller, &self.operators) {
            return Ok(());
        }
        let policy = self.store.policy(agent).await.map_err(|e| UrlAnswer::refused(502, e.name(), e.to_string()))?;
        match policy {
            Some(policy) if is_bound(caller, &policy.principals) => Ok(()),
            _ => Err(UrlAnswer::new(
                403,
                json!({
                    "error": "CallerNotBound",
                    "message": format!(
                        "caller {caller} may not report for agent {agent}: it is not one of the agent's principals, nor an operator ({OPERATORS_VAR})"
                    ),
                }),
            )),
        }
    }
}

fn status_of(error: &SettlementError) -> u16 {
    match error {
        SettlementError::Invalid(_) => 400,
        SettlementError::UnknownPayment { .. } => 404,
        SettlementError::NotAuthorized { .. } | SettlementError::Contradicts { .. } => 409,
        SettlementError::Mismatch { .. } => 422,
        SettlementError::Store(_) => 502,
    }
}
