//! Settlement reports through the library: what the merchant answered after the proof, handed
//! to the ledger. Locally the service records it in the embedded store; on AWS the report goes
//! to the report function's URL, signed, so the function knows which principal reports.

use std::sync::Arc;

use agentpay_core::clock::SystemClock;
use agentpay_core::settlement::SettlementRequest;
use agentpay_core::settlements::{SettlementRecorded, Settlements};
use agentpay_core::store::Store;

use super::ClientError;
use super::entry_point::SignedUrl;

/// Where reports go.
pub enum SettlementReporter {
    /// The embedded store, reported as `reporter`.
    Local { settlements: Settlements, reporter: String },
    /// The stack's `ReportSettlementUrl`.
    Url(Box<SignedUrl>),
}

impl SettlementReporter {
    pub fn local(store: Arc<dyn Store>, reporter: impl Into<String>) -> Self {
        Self::Local { settlements: Settlements::new(store, Arc::new(SystemClock)), reporter: reporter.into() }
    }

    /// `url` is the stack output `ReportSettlementUrl`; credentials and region from `aws`.
    pub fn url(url: &str, aws: &aws_config::SdkConfig) -> Result<Self, ClientError> {
        Ok(Self::Url(Box::new(SignedUrl::new(url, aws, "settlement report")?)))
    }

    /// Records the report, or says why not (`ClientError::Refused` with the stable error name:
    /// SettlementMismatch, SettlementContradicts, UnknownPayment, NotAuthorized, CallerNotBound,
    /// InvalidSettlementReport).
    pub async fn report_settlement(&self, request: &SettlementRequest) -> Result<SettlementRecorded, ClientError> {
        match self {
            Self::Local { settlements, reporter } => {
                let (agent, key) = (request.agent_id.as_str(), request.idempotency_key.as_str());
                settlements
                    .report(agent, key, &request.report, reporter)
                    .await
                    .map_err(|e| ClientError::Refused { error: e.name().to_owned(), message: e.to_string() })
            }
            Self::Url(url) => {
                let body = serde_json::to_string(request).map_err(|e| ClientError::backend("settlement report", e))?;
                let answer = url.post(body, &[]).await?;
                if answer.status == 200 {
                    return serde_json::from_value(answer.body.clone()).map_err(|e| {
                        ClientError::Invalid(format!("the report function answered 200 with {}: {e}", answer.text))
                    });
                }
                let error =
                    answer.body["error"].as_str().map_or_else(|| format!("HTTP {}", answer.status), str::to_owned);
                Err(ClientError::Refused { error, message: answer.message() })
            }
        }
    }
}
