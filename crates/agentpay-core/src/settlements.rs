//! Recording settlement reports in the ledger (the service over the store): a report is
//! checked against the payment, moves it forward or is refused, and is audited either way. It
//! never frees budget.

use crate::error::InvalidPaymentRequest;
use crate::settlement::{AuthorizedPayment, ReportInput, ReportedOutcome, SettlementReport, mismatch};

/// Why a report was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum SettlementError {
    #[error(
        "agent {agent} has no recorded payment with idempotency key {key:?}: report the key the payment was made with"
    )]
    UnknownPayment { agent: String, key: String },
    #[error(
        "payment {key:?} is {status}, not authorized: there is no proof to settle (a settlement report follows an AUTHORIZED payment)"
    )]
    NotAuthorized { key: String, status: &'static str },
    #[error(transparent)]
    Invalid(#[from] InvalidPaymentRequest),
    #[error(
        "settlement report refused (audited, nothing changed): its {field} is {reported} but payment {key:?} authorized {authorized}"
    )]
    Mismatch { key: String, field: String, reported: String, authorized: String },
    #[error(
        "settlement report refused (audited, nothing changed): payment {key:?} is {status}{transaction}, and a report of {reported} cannot undo that"
    )]
    Contradicts { key: String, status: &'static str, transaction: String, reported: &'static str },
    #[error(transparent)]
    Store(#[from] crate::error::PaymentError),
}

impl SettlementError {
    /// Stable name for machines (`--json`, the entry point's error type).
    pub fn name(&self) -> &'static str {
        match self {
            SettlementError::UnknownPayment { .. } => "UnknownPayment",
            SettlementError::NotAuthorized { .. } => "NotAuthorized",
            SettlementError::Invalid(_) => "InvalidSettlementReport",
            SettlementError::Mismatch { .. } => "SettlementMismatch",
            SettlementError::Contradicts { .. } => "SettlementContradicts",
            SettlementError::Store(error) => error.name(),
        }
    }
}

/// A report recorded (or found recorded already).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettlementRecorded {
    pub idempotency_key: String,
    pub reservation_id: String,
    pub status: crate::store::ReservationStatus,
    /// The same report was recorded before: nothing was written.
    pub already_recorded: bool,
    pub report: SettlementReport,
}

/// How far a status has come towards final settlement: a report only moves a payment forward.
fn progress(status: crate::store::ReservationStatus) -> u8 {
    use crate::store::ReservationStatus::*;
    match status {
        Reserved | Released | Voided | Shadow => 0,
        Authorized | ExpiredUnconfirmed => 1,
        SettlementFailed => 2,
        SettlementPending => 3,
        Settled => 4,
    }
}

fn status_of(outcome: ReportedOutcome) -> crate::store::ReservationStatus {
    use crate::store::ReservationStatus::*;
    match outcome {
        ReportedOutcome::Settled => Settled,
        ReportedOutcome::Pending => SettlementPending,
        ReportedOutcome::Failed => SettlementFailed,
    }
}

/// Where a report takes a paid reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportStep {
    /// Forward (or a newer report of the same kind, before final settlement).
    MoveTo(crate::store::ReservationStatus),
    /// This very report is recorded already.
    AlreadyRecorded,
    /// It would move the payment back (a failure after a settlement): a report never undoes
    /// what the ledger holds.
    Backwards,
}

pub fn next_status(
    current: crate::store::ReservationStatus,
    recorded: Option<&SettlementReport>,
    report: &SettlementReport,
) -> ReportStep {
    let target = status_of(report.outcome);
    if recorded == Some(report) && current == target {
        return ReportStep::AlreadyRecorded;
    }
    let final_settled = current == crate::store::ReservationStatus::Settled;
    match progress(target).cmp(&progress(current)) {
        std::cmp::Ordering::Greater => ReportStep::MoveTo(target),
        std::cmp::Ordering::Equal if !final_settled => ReportStep::MoveTo(target),
        _ => ReportStep::Backwards,
    }
}

/// Records settlement reports: checks each against the payment, moves the ledger forward,
/// audits what it accepted and what it refused. Never releases budget.
pub struct Settlements {
    store: std::sync::Arc<dyn crate::store::Store>,
    clock: std::sync::Arc<dyn crate::clock::Clock>,
}

impl Settlements {
    pub fn new(store: std::sync::Arc<dyn crate::store::Store>, clock: std::sync::Arc<dyn crate::clock::Clock>) -> Self {
        Self { store, clock }
    }

    /// Records what the merchant answered for the payment `agent` made with `key`.
    pub async fn report(
        &self,
        agent: &str,
        key: &str,
        input: &ReportInput,
        reported_by: &str,
    ) -> Result<SettlementRecorded, SettlementError> {
        let report = input.parse()?;
        // A write that lost a race to another report is decided again on what won.
        for _ in 0..4 {
            let reservation = self.paid_reservation(agent, key).await?;
            let settlement = crate::store::Settlement {
                report: report.clone(),
                reported_by: reported_by.to_owned(),
                reported_at: self.clock.now(),
            };
            if let Err(refusal) = self.check(&reservation, &report, key) {
                self.store.append_audit(&refused_event(&reservation, &settlement, &refusal)).await?;
                return Err(refusal);
            }
            let recorded = |status, already_recorded| SettlementRecorded {
                idempotency_key: key.to_owned(),
                reservation_id: reservation.id.clone(),
                status,
                already_recorded,
                report: report.clone(),
            };
            let recorded_report = reservation.settlement.as_ref().map(|s| &s.report);
            let to = match next_status(reservation.status, recorded_report, &report) {
                ReportStep::MoveTo(to) => to,
                // Backwards was refused by the check above.
                ReportStep::AlreadyRecorded | ReportStep::Backwards => return Ok(recorded(reservation.status, true)),
            };
            let commit = crate::store::SettlementCommit {
                agent_id: agent.to_owned(),
                reservation_id: reservation.id.clone(),
                from: reservation.status,
                to,
                audit: accepted_event(&reservation, &settlement, to),
                settlement: Some(settlement),
                refund: None,
            };
            match self.store.record_settlement(&commit).await? {
                crate::store::Transition::Applied => return Ok(recorded(to, false)),
                crate::store::Transition::AlreadyApplied => return Ok(recorded(to, true)),
                crate::store::Transition::VersionConflict => continue,
                other => {
                    return Err(crate::error::PaymentError::LedgerInconsistent(format!(
                        "settlement of {}: {other:?}",
                        reservation.id
                    ))
                    .into());
                }
            }
        }
        Err(crate::error::PaymentError::LedgerConflict { agent: agent.to_owned(), attempts: 4 }.into())
    }

    /// The reservation the key paid: through the key's record while it lives, else the
    /// agent's reservations (a report days later).
    async fn paid_reservation(&self, agent: &str, key: &str) -> Result<crate::store::Reservation, SettlementError> {
        let record = self.store.idempotency(key, self.clock.now()).await?;
        let reservation = match record {
            Some(record) if record.status == crate::store::IdempotencyStatus::Completed => {
                let (id, _) = crate::steps::claim_ids(key, &record.claim_id, record.attempt);
                self.store.reservation(agent, &id).await?
            }
            _ => {
                let mine = self.store.reservations(agent).await?.into_iter().filter(|r| r.idempotency_key == key);
                // The attempt that paid, if one did; else the latest, to say what it is.
                let mut mine: Vec<_> = mine.collect();
                mine.sort_by_key(|r| (r.status.is_paid(), r.attempt));
                mine.pop()
            }
        };
        let reservation = reservation
            .ok_or_else(|| SettlementError::UnknownPayment { agent: agent.to_owned(), key: key.to_owned() })?;
        if !reservation.status.is_paid() {
            return Err(SettlementError::NotAuthorized { key: key.to_owned(), status: reservation.status.as_str() });
        }
        Ok(reservation)
    }

    fn check(
        &self,
        reservation: &crate::store::Reservation,
        report: &SettlementReport,
        key: &str,
    ) -> Result<(), SettlementError> {
        let paid = AuthorizedPayment {
            network: reservation.network,
            payer: reservation.payer.as_deref().and_then(|p| p.parse().ok()),
            amount: reservation.amount,
        };
        if let Some((field, reported, authorized)) = mismatch(report, &paid) {
            return Err(SettlementError::Mismatch { key: key.to_owned(), field, reported, authorized });
        }
        let recorded = reservation.settlement.as_ref().map(|s| &s.report);
        match next_status(reservation.status, recorded, report) {
            ReportStep::Backwards => Err(SettlementError::Contradicts {
                key: key.to_owned(),
                status: reservation.status.as_str(),
                transaction: recorded
                    .and_then(|r| r.transaction.as_deref())
                    .map(|tx| format!(" (transaction {tx})"))
                    .unwrap_or_default(),
                reported: status_of(report.outcome).as_str(),
            }),
            ReportStep::MoveTo(_) | ReportStep::AlreadyRecorded => Ok(()),
        }
    }
}

/// What a chain says of an EIP-3009 authorization: `authorizationState(authorizer, nonce)`
/// on the token contract, read-only.
#[async_trait::async_trait]
pub trait ChainReader: Send + Sync {
    /// `None`: no endpoint is configured for `network`, so nothing can be concluded.
    async fn authorization_used(
        &self,
        network: crate::payment::Network,
        token: &str,
        authorizer: &str,
        nonce: &str,
    ) -> Result<Option<bool>, crate::error::PaymentError>;
}

/// No chain configured: every question is answered "cannot tell".
pub struct NoChain;

#[async_trait::async_trait]
impl ChainReader for NoChain {
    async fn authorization_used(
        &self,
        _: crate::payment::Network,
        _: &str,
        _: &str,
        _: &str,
    ) -> Result<Option<bool>, crate::error::PaymentError> {
        Ok(None)
    }
}

/// What the expiry check did (or, in a dry run, would do) to one payment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExpiryCheck {
    pub idempotency_key: String,
    pub reservation_id: String,
    pub amount: crate::money::AtomicAmount,
    pub before: crate::store::ReservationStatus,
    pub after: crate::store::ReservationStatus,
    /// Why, in a sentence.
    pub evidence: String,
}

impl Settlements {
    /// Every payment of `agent` whose authorization has expired (`validBefore` passed) and is
    /// not final: the chain says whether it was used. Used: SETTLED, whatever was reported.
    /// Unused: VOIDED, its budget released (it can never move money now). No chain to ask: an
    /// AUTHORIZED one becomes EXPIRED_UNCONFIRMED, still counted; nothing is ever released
    /// without the chain's word. `dry_run` writes nothing.
    pub async fn check_expired(
        &self,
        agent: &str,
        chain: &dyn ChainReader,
        dry_run: bool,
    ) -> Result<Vec<ExpiryCheck>, SettlementError> {
        let reservations = self.store.reservations(agent).await?;
        self.check_expired_among(&reservations, chain, dry_run).await
    }

    /// [`Self::check_expired`] over the agent's reservations as already read.
    pub async fn check_expired_among(
        &self,
        reservations: &[crate::store::Reservation],
        chain: &dyn ChainReader,
        dry_run: bool,
    ) -> Result<Vec<ExpiryCheck>, SettlementError> {
        use crate::store::ReservationStatus::*;
        let now = self.clock.now();
        let mut checked = Vec::new();
        for reservation in reservations {
            if !matches!(reservation.status, Authorized | SettlementPending | SettlementFailed | ExpiredUnconfirmed) {
                continue;
            }
            let (Some(authorization), Some(payer)) = (&reservation.authorization, &reservation.payer) else { continue };
            if authorization.valid_before >= now {
                continue;
            }
            let used =
                chain.authorization_used(reservation.network, &reservation.asset, payer, &authorization.nonce).await?;
            let (after, evidence) = match used {
                Some(true) => (Settled, "the chain says the authorization was used: settled".to_owned()),
                Some(false) => (
                    Voided,
                    format!(
                        "the chain says the authorization was never used and it expired at {}: voided, budget released",
                        authorization.valid_before
                    ),
                ),
                None if reservation.status == Authorized => (
                    ExpiredUnconfirmed,
                    format!(
                        "expired at {} with no settlement report, and no JSON-RPC endpoint for {} to ask: still counted",
                        authorization.valid_before, reservation.network
                    ),
                ),
                None => continue,
            };
            if !dry_run {
                self.expire(reservation, after, &evidence).await?;
            }
            checked.push(ExpiryCheck {
                idempotency_key: reservation.idempotency_key.clone(),
                reservation_id: reservation.id.clone(),
                amount: reservation.amount,
                before: reservation.status,
                after,
                evidence,
            });
        }
        Ok(checked)
    }

    /// The chain's verdict written: the move, its audit event, and for VOIDED the refund of
    /// the payment's window slots (decided on the window as read; a moved window is read again).
    async fn expire(
        &self,
        reservation: &crate::store::Reservation,
        to: crate::store::ReservationStatus,
        evidence: &str,
    ) -> Result<(), SettlementError> {
        use crate::store::{AuditKind, ReservationStatus, Transition};
        let kind = match to {
            ReservationStatus::Voided => AuditKind::Voided,
            ReservationStatus::ExpiredUnconfirmed => AuditKind::ExpiredUnconfirmed,
            _ => AuditKind::Settled,
        };
        let audit = crate::store::AuditEvent {
            kind,
            reason: Some(evidence.to_owned()),
            ..ledger_event(reservation, &["CHAIN", to.as_str()], "agentpay (chain check)", self.clock.now())
        };
        for _ in 0..4 {
            let refund = match to {
                ReservationStatus::Voided => {
                    let window = self.store.agent_ledger(&reservation.agent_id).await?.window;
                    match window.refund_for(reservation.charged_at(), reservation.amount) {
                        crate::window::WindowWrite::Refund { amount_at: None, count_at: None, .. } => None,
                        refund => Some(refund),
                    }
                }
                _ => None,
            };
            let commit = crate::store::SettlementCommit {
                agent_id: reservation.agent_id.clone(),
                reservation_id: reservation.id.clone(),
                from: reservation.status,
                to,
                settlement: None,
                refund,
                audit: audit.clone(),
            };
            match self.store.record_settlement(&commit).await? {
                Transition::Applied | Transition::AlreadyApplied => return Ok(()),
                // The window moved (try again), or the payment did (a report came in between:
                // the next check decides on it).
                Transition::VersionConflict => {
                    let now = self.store.reservation(&reservation.agent_id, &reservation.id).await?;
                    if now.is_none_or(|r| r.status != reservation.status) {
                        return Ok(());
                    }
                }
                other => {
                    return Err(crate::error::PaymentError::LedgerInconsistent(format!(
                        "expiry of {}: {other:?}",
                        reservation.id
                    ))
                    .into());
                }
            }
        }
        Err(crate::error::PaymentError::LedgerConflict { agent: reservation.agent_id.clone(), attempts: 4 }.into())
    }
}

/// The audit event of an accepted report: deterministic per report, so a retry adds nothing.
fn accepted_event(
    reservation: &crate::store::Reservation,
    settlement: &crate::store::Settlement,
    to: crate::store::ReservationStatus,
) -> crate::store::AuditEvent {
    use crate::store::{AuditKind, ReservationStatus};
    let kind = match to {
        ReservationStatus::SettlementPending => AuditKind::SettlementPending,
        ReservationStatus::SettlementFailed => AuditKind::SettlementFailed,
        _ => AuditKind::Settled,
    };
    crate::store::AuditEvent { kind, ..event(reservation, settlement, "ACCEPTED") }
}

fn refused_event(
    reservation: &crate::store::Reservation,
    settlement: &crate::store::Settlement,
    refusal: &SettlementError,
) -> crate::store::AuditEvent {
    crate::store::AuditEvent {
        kind: crate::store::AuditKind::SettlementRefused,
        error: Some(crate::store::ErrorRecord { error: refusal.name().to_owned(), cause: refusal.to_string() }),
        ..event(reservation, settlement, "REFUSED")
    }
}

/// The audit event of a report: its id derived from the report, so a retry adds nothing.
fn event(
    reservation: &crate::store::Reservation,
    settlement: &crate::store::Settlement,
    verdict: &str,
) -> crate::store::AuditEvent {
    let fingerprint = crate::request::fingerprint(&serde_json::to_value(&settlement.report).unwrap_or_default());
    crate::store::AuditEvent {
        reason: settlement.report.error_reason.clone(),
        settlement: Some(settlement.clone()),
        ..ledger_event(
            reservation,
            &["SETTLEMENT", verdict, &fingerprint],
            &settlement.reported_by,
            settlement.reported_at,
        )
    }
}

/// An audit event about what followed a payment, said again from its reservation; `id_parts`
/// make its id deterministic.
pub(crate) fn ledger_event(
    reservation: &crate::store::Reservation,
    id_parts: &[&str],
    by: &str,
    at: crate::clock::Timestamp,
) -> crate::store::AuditEvent {
    let parts: Vec<&str> = std::iter::once(reservation.id.as_str()).chain(id_parts.iter().copied()).collect();
    crate::store::AuditEvent {
        event_id: crate::request::derived_id("evt", &parts),
        kind: crate::store::AuditKind::Settled,
        agent_id: reservation.agent_id.clone(),
        user_id: reservation.user_id.clone(),
        at,
        idempotency_key: reservation.idempotency_key.clone(),
        execution_id: reservation.execution_id.clone(),
        reservation_id: Some(reservation.id.clone()),
        amount: Some(reservation.amount),
        network: Some(reservation.network),
        asset: Some(reservation.asset.clone()),
        payee: Some(reservation.pay_to.clone()),
        resource: reservation.resource.clone(),
        context: reservation.context.clone().unwrap_or_else(|| crate::request::BusinessContext {
            decision: "(recorded before reservations kept their context)".into(),
            delegated_by: "-".into(),
            scope: "-".into(),
            category: None,
        }),
        caller_arn: None,
        limits: Some(reservation.snapshot.clone()),
        payment_id: reservation.payment_id.clone(),
        error: None,
        decided_by: Some(by.to_owned()),
        reason: None,
        settlement: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TX: &str = "0x8f2c3f0f9d7a3a0c2f4b1e6d5c4b3a291807f6e5d4c3b2a1908f7e6d5c4b3a29";

    #[test]
    fn a_report_only_ever_moves_a_payment_forward() {
        use crate::store::ReservationStatus::*;
        let of = |outcome, tx: Option<&str>| SettlementReport {
            outcome,
            transaction: tx.map(str::to_owned),
            network: None,
            payer: None,
            amount: None,
            error_reason: None,
        };
        let settled = of(ReportedOutcome::Settled, Some(TX));
        let pending = of(ReportedOutcome::Pending, Some(TX));
        let failed = of(ReportedOutcome::Failed, None);
        assert_eq!(next_status(Authorized, None, &failed), ReportStep::MoveTo(SettlementFailed));
        assert_eq!(next_status(SettlementFailed, Some(&failed), &pending), ReportStep::MoveTo(SettlementPending));
        assert_eq!(next_status(SettlementPending, Some(&pending), &settled), ReportStep::MoveTo(Settled));
        assert_eq!(next_status(Settled, Some(&settled), &settled), ReportStep::AlreadyRecorded);
        assert_eq!(next_status(Settled, Some(&settled), &failed), ReportStep::Backwards);
        let other = of(ReportedOutcome::Settled, Some("0x11"));
        assert_eq!(next_status(Settled, Some(&settled), &other), ReportStep::Backwards, "another transaction");
        assert_eq!(next_status(SettlementPending, Some(&pending), &failed), ReportStep::Backwards, "a hash stays");
    }
}
