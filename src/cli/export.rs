//! `agentpay ledger export`: one row per payment for accounting. The columns are stable (the
//! README lists them); a new one is only ever added at the end.

use std::io::Write;

use agentpay::clock::Timestamp;
use agentpay::store::{Reservation, Store};
use serde::Serialize;

use super::{CliError, ExportFormat};

/// One payment, flat.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportRow {
    pub idempotency_key: String,
    pub reservation_id: String,
    pub agent_id: String,
    pub user_id: String,
    pub status: &'static str,
    pub amount_atomic: String,
    pub asset: String,
    pub network: String,
    pub payee: String,
    pub payer: String,
    pub resource: String,
    pub decision: String,
    pub delegated_by: String,
    pub scope: String,
    pub category: String,
    pub payment_id: String,
    pub transaction: String,
    pub valid_before: String,
    pub created_at: String,
    pub updated_at: String,
    /// SHADOW rows: what the policy would have done (WOULD_PAY, WOULD_NEED_APPROVAL,
    /// WOULD_DENY); empty for payments made.
    pub shadow_verdict: String,
}

impl From<&Reservation> for ExportRow {
    fn from(r: &Reservation) -> Self {
        let context = r.context.clone().unwrap_or_else(|| agentpay::request::BusinessContext {
            decision: String::new(),
            delegated_by: String::new(),
            scope: String::new(),
            category: None,
        });
        Self {
            idempotency_key: r.idempotency_key.clone(),
            reservation_id: r.id.clone(),
            agent_id: r.agent_id.clone(),
            user_id: r.user_id.clone(),
            status: r.status.as_str(),
            // A string: no spreadsheet or JSON reader rounds it.
            amount_atomic: r.amount.get().to_string(),
            asset: r.asset.clone(),
            network: r.network.caip2().to_owned(),
            payee: r.pay_to.clone(),
            payer: r.payer.clone().unwrap_or_default(),
            resource: r.resource.clone(),
            decision: context.decision,
            delegated_by: context.delegated_by,
            scope: context.scope,
            category: context.category.unwrap_or_default(),
            payment_id: r.payment_id.clone().unwrap_or_default(),
            transaction: r.settlement.as_ref().and_then(|s| s.report.transaction.clone()).unwrap_or_default(),
            valid_before: r.authorization.as_ref().map(|a| a.valid_before.to_rfc3339()).unwrap_or_default(),
            created_at: r.created_at.to_rfc3339(),
            updated_at: r.updated_at.to_rfc3339(),
            shadow_verdict: r.shadow.as_ref().map(|d| d.verdict.as_str().to_owned()).unwrap_or_default(),
        }
    }
}

/// The agent's payments created at or after `since`, oldest first.
pub async fn rows(
    store: &std::sync::Arc<dyn Store>,
    agent: &str,
    since: Option<Timestamp>,
) -> Result<Vec<ExportRow>, CliError> {
    let mut reservations = store.reservations(agent).await?;
    reservations.retain(|r| since.is_none_or(|since| r.created_at >= since));
    reservations.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(reservations.iter().map(ExportRow::from).collect())
}

pub fn write(rows: &[ExportRow], format: ExportFormat, out: impl Write) -> Result<(), CliError> {
    match format {
        ExportFormat::Csv => {
            // The header comes from the field names, even with no row.
            let mut csv = csv::WriterBuilder::new().has_headers(false).from_writer(out);
            csv.write_record(COLUMNS)?;
            for row in rows {
                csv.serialize(row)?;
            }
            csv.flush()?;
        }
        ExportFormat::Jsonl => {
            let mut out = out;
            for row in rows {
                serde_json::to_writer(&mut out, row)?;
                out.write_all(b"\n")?;
            }
        }
    }
    Ok(())
}

/// The CSV header, in the order of [`ExportRow`]'s fields (a test checks they agree).
pub const COLUMNS: [&str; 21] = [
    "idempotencyKey",
    "reservationId",
    "agentId",
    "userId",
    "status",
    "amountAtomic",
    "asset",
    "network",
    "payee",
    "payer",
    "resource",
    "decision",
    "delegatedBy",
    "scope",
    "category",
    "paymentId",
    "transaction",
    "validBefore",
    "createdAt",
    "updatedAt",
    "shadowVerdict",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_names_the_fields_in_order() {
        let row = ExportRow {
            idempotency_key: "k".into(),
            reservation_id: "r".into(),
            agent_id: "a".into(),
            user_id: "u".into(),
            status: "SETTLED",
            amount_atomic: "1".into(),
            asset: String::new(),
            network: String::new(),
            payee: String::new(),
            payer: String::new(),
            resource: String::new(),
            decision: "buy, \"now\"".into(),
            delegated_by: String::new(),
            scope: String::new(),
            category: String::new(),
            payment_id: String::new(),
            transaction: String::new(),
            valid_before: String::new(),
            created_at: String::new(),
            updated_at: String::new(),
            shadow_verdict: String::new(),
        };
        let keys: Vec<String> = serde_json::to_value(&row).unwrap().as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, COLUMNS);
        let mut out = Vec::new();
        write(&[row], ExportFormat::Csv, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("idempotencyKey,reservationId,"), "{text}");
        assert!(text.contains("\"buy, \"\"now\"\"\""), "quoted as RFC 4180 says: {text}");
    }
}
