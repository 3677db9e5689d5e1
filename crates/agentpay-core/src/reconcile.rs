//! Reconciliation: follows what executions left behind in the ledger, on evidence only.
//!
//! A RESERVED payment whose execution ended is one of two things. If no execution of its
//! claim ever entered ProcessPayment, no proof can exist: its reservation is released (fenced
//! on the claim, the key FAILED with `ExecutionEnded`, so the agent may start it again). If one
//! did, the outcome is unknown: it stays counted, and the provider is asked again with the same
//! client token by running the payment again (its answer is the proof it issued, or a definite
//! refusal). Expired authorizations go to the chain check ([`Settlements::check_expired`]).
//! What cannot be explained is listed as an anomaly and left as it is.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::clock::Clock;
use crate::error::PaymentError;
use crate::money::AtomicAmount;
use crate::settlements::{ChainReader, ExpiryCheck, SettlementError, Settlements};
use crate::store::{
    ClaimFence, ErrorRecord, IdempotencyRecord, IdempotencyStatus, ReleaseCommit, ReleasedReservation, Reservation,
    ReservationStatus, Store, Transition,
};

/// What became of the execution that holds a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutionFate {
    /// Still running (or waiting for a person): its reservation is in use.
    Running,
    /// Ended (`status` as the backend says it); whether it entered ProcessPayment, where a
    /// proof may have been issued.
    Ended { status: String, entered_process_payment: bool },
    /// No such execution: never started, or past the backend's retention (Step Functions keeps
    /// closed executions 90 days).
    Missing,
}

/// The executions' side of reconciliation: Step Functions on AWS, the local execution store
/// with the local runner.
#[async_trait]
pub trait ExecutionLookup: Send + Sync {
    async fn fate(&self, execution_id: &str) -> Result<ExecutionFate, PaymentError>;
    /// Runs the payment of `execution_id` again with its own input (the same key, so the same
    /// claim and client token) and says, in a sentence, what came of it.
    async fn ask_again(&self, execution_id: &str) -> Result<String, PaymentError>;
}

/// Something in the ledger that reconciliation cannot explain; nothing is changed for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Anomaly {
    pub kind: AnomalyKind,
    pub idempotency_key: String,
    pub reservation_id: String,
    pub amount: AtomicAmount,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AnomalyKind {
    /// RESERVED, and its execution is not found.
    ReservationWithoutExecution,
    /// RESERVED, and its key is held by no claim of it (closed, or claimed afresh).
    ReservationWithoutClaim,
    /// The key recorded a proof for this claim and the reservation is not AUTHORIZED.
    ProofWithoutLedgerEntry,
    /// Settled for another amount than was authorized.
    SettledAmountDiffers,
    /// Its execution ended where a proof may have been issued, and the provider could not be
    /// asked again yet: still counted.
    OutcomeUnknown,
}

impl AnomalyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::ReservationWithoutExecution => "RESERVATION_WITHOUT_EXECUTION",
            AnomalyKind::ReservationWithoutClaim => "RESERVATION_WITHOUT_CLAIM",
            AnomalyKind::ProofWithoutLedgerEntry => "PROOF_WITHOUT_LEDGER_ENTRY",
            AnomalyKind::SettledAmountDiffers => "SETTLED_AMOUNT_DIFFERS",
            AnomalyKind::OutcomeUnknown => "OUTCOME_UNKNOWN",
        }
    }
}

/// Payments and their sum in one state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateTotal {
    pub payments: u64,
    /// Atomic units, as a string: a sum of many payments may pass what JSON numbers carry.
    #[serde(serialize_with = "as_string")]
    pub atomic: u128,
}

fn as_string<S: serde::Serializer>(value: &u128, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&value.to_string())
}

/// One agent's reconciliation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentReconciliation {
    pub agent_id: String,
    /// What was changed (or, in a dry run, would be), and why.
    pub changes: Vec<ExpiryCheck>,
    /// Payments whose provider was asked again, and what came of it.
    pub asked_again: Vec<AskedAgain>,
    pub anomalies: Vec<Anomaly>,
    /// By state, after the changes (as found, in a dry run).
    pub states: BTreeMap<&'static str, StateTotal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AskedAgain {
    pub idempotency_key: String,
    pub reservation_id: String,
    pub execution_id: String,
    pub outcome: String,
}

/// What reconciliation does with a RESERVED payment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// In use by a running execution, or paid already: nothing to do.
    InUse,
    /// No proof can exist: release it, fenced on this claim.
    Release {
        fence: ClaimFence,
        evidence: String,
    },
    /// A proof may exist: ask the provider again through this execution's input.
    AskAgain {
        execution_id: String,
        why: String,
    },
    Anomaly(AnomalyKind, String),
}

pub struct Reconciler {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    idempotency_ttl: Duration,
}

impl Reconciler {
    /// `idempotency_ttl`: how long a key released here stays FAILED (the workflow's setting).
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, idempotency_ttl: Duration) -> Self {
        Self { store, clock, idempotency_ttl }
    }

    /// Reconciles one agent. `dry_run` changes nothing and asks nobody.
    pub async fn agent(
        &self,
        agent: &str,
        chain: &dyn ChainReader,
        executions: &dyn ExecutionLookup,
        dry_run: bool,
    ) -> Result<AgentReconciliation, SettlementError> {
        let settlements = Settlements::new(self.store.clone(), self.clock.clone());
        // Read once: what the sweep decides on, and the totals when it changes nothing.
        let reservations = self.store.reservations(agent).await?;
        let mut changes = settlements.check_expired_among(&reservations, chain, dry_run).await?;
        let (mut asked_again, mut anomalies) = (Vec::new(), Vec::new());
        for reservation in &reservations {
            if let Some(anomaly) = settled_amount_differs(reservation) {
                anomalies.push(anomaly);
            }
            if reservation.status != ReservationStatus::Reserved {
                continue;
            }
            let anomaly = |kind, detail| Anomaly {
                kind,
                idempotency_key: reservation.idempotency_key.clone(),
                reservation_id: reservation.id.clone(),
                amount: reservation.amount,
                detail,
            };
            match self.verdict(reservation, executions).await? {
                Verdict::InUse => {}
                Verdict::Anomaly(kind, detail) => anomalies.push(anomaly(kind, detail)),
                Verdict::Release { fence, evidence } => {
                    if !dry_run {
                        self.release(reservation, &fence, &evidence).await?;
                    }
                    changes.push(ExpiryCheck {
                        idempotency_key: reservation.idempotency_key.clone(),
                        reservation_id: reservation.id.clone(),
                        amount: reservation.amount,
                        before: ReservationStatus::Reserved,
                        after: ReservationStatus::Released,
                        evidence,
                    });
                }
                Verdict::AskAgain { execution_id, why } if dry_run => anomalies.push(anomaly(
                    AnomalyKind::OutcomeUnknown,
                    format!("{why}; a run without --dry-run asks the provider again through execution {execution_id}'s input"),
                )),
                Verdict::AskAgain { execution_id, why } => {
                    let outcome = executions.ask_again(&execution_id).await?;
                    let now = self.store.reservation(agent, &reservation.id).await?;
                    if now.as_ref().is_some_and(|r| r.status == ReservationStatus::Reserved) {
                        anomalies.push(anomaly(AnomalyKind::OutcomeUnknown, format!("{why}; asked again: {outcome}")));
                    }
                    asked_again.push(AskedAgain {
                        idempotency_key: reservation.idempotency_key.clone(),
                        reservation_id: reservation.id.clone(),
                        execution_id,
                        outcome,
                    });
                }
            }
        }
        let moved = !dry_run && (!changes.is_empty() || !asked_again.is_empty());
        let states = if moved { totals(&self.store.reservations(agent).await?) } else { totals(&reservations) };
        Ok(AgentReconciliation { agent_id: agent.to_owned(), changes, asked_again, anomalies, states })
    }

    /// Decides on a RESERVED payment from its key's record and its execution's fate.
    async fn verdict(
        &self,
        reservation: &Reservation,
        executions: &dyn ExecutionLookup,
    ) -> Result<Verdict, PaymentError> {
        let record = self.store.idempotency(&reservation.idempotency_key, self.clock.now()).await?;
        let Some(record) = record.filter(|r| r.claim_id == reservation.claim_id && r.attempt == reservation.attempt)
        else {
            return Ok(Verdict::Anomaly(
                AnomalyKind::ReservationWithoutClaim,
                "its idempotency key no longer holds this claim (expired, or claimed afresh): left counted".into(),
            ));
        };
        match record.status {
            IdempotencyStatus::InProgress => {}
            IdempotencyStatus::Completed => {
                return Ok(Verdict::Anomaly(
                    AnomalyKind::ProofWithoutLedgerEntry,
                    format!("key completed by execution {} but the reservation is RESERVED", record.execution_id),
                ));
            }
            IdempotencyStatus::Failed | IdempotencyStatus::Denied => {
                return Ok(Verdict::Anomaly(
                    AnomalyKind::ReservationWithoutClaim,
                    format!(
                        "key {} by execution {} but the reservation is RESERVED",
                        record.status.as_str(),
                        record.execution_id
                    ),
                ));
            }
        }
        let holder = record.execution_id.clone();
        match executions.fate(&holder).await? {
            ExecutionFate::Running => Ok(Verdict::InUse),
            ExecutionFate::Missing => Ok(Verdict::Anomaly(
                AnomalyKind::ReservationWithoutExecution,
                format!("execution {holder}, which holds its key, is not found: left counted"),
            )),
            ExecutionFate::Ended { status, entered_process_payment } => {
                Ok(self.ended_verdict(reservation, &record, &status, entered_process_payment))
            }
        }
    }

    fn ended_verdict(
        &self,
        reservation: &Reservation,
        record: &IdempotencyRecord,
        status: &str,
        entered_process_payment: bool,
    ) -> Verdict {
        let holder = &record.execution_id;
        // Only the execution that reserved can prove no proof exists: an earlier holder of the
        // claim (taken over) may have asked the provider with the same client token.
        let sole_holder = reservation.execution_id == *holder;
        if sole_holder && !entered_process_payment {
            let fence = ClaimFence {
                key: record.key.clone(),
                claim_id: record.claim_id.clone(),
                attempt: record.attempt,
                execution_id: holder.clone(),
            };
            return Verdict::Release {
                fence,
                evidence: format!(
                    "execution {holder} ended {status} before ProcessPayment, so no proof was issued: released"
                ),
            };
        }
        let why = match sole_holder {
            true => {
                format!("execution {holder} ended {status} after entering ProcessPayment: a proof may have been issued")
            }
            false => format!(
                "execution {holder} ended {status} holding a claim taken over from execution {}, which may have asked the provider",
                reservation.execution_id
            ),
        };
        let now = self.clock.now();
        if record.lease_expires_at > now {
            // A fresh run would wait for the lease (PaymentInFlight): the next sweep asks.
            return Verdict::Anomaly(
                AnomalyKind::OutcomeUnknown,
                format!(
                    "{why}; its lease ends at {}, after which reconciliation asks the provider again",
                    record.lease_expires_at
                ),
            );
        }
        Verdict::AskAgain { execution_id: holder.clone(), why }
    }

    /// Releases a reservation no proof can exist for: the same write as Compensate's, fenced
    /// on the claim of the execution that ended.
    async fn release(&self, reservation: &Reservation, fence: &ClaimFence, evidence: &str) -> Result<(), PaymentError> {
        let error = ErrorRecord {
            error: crate::error::ErrorName::ExecutionEnded.as_str().to_owned(),
            cause: format!("{evidence} by reconciliation; start the payment again to retry it"),
        };
        for _ in 0..4 {
            let now = self.clock.now();
            let window = self.store.agent_ledger(&reservation.agent_id).await?.window;
            let refund = match window.refund_for(reservation.charged_at(), reservation.amount) {
                crate::window::WindowWrite::Refund { amount_at: None, count_at: None, .. } => None,
                refund => Some(refund),
            };
            let audit = crate::store::AuditEvent {
                kind: crate::store::AuditKind::Released,
                error: Some(error.clone()),
                ..crate::settlements::ledger_event(reservation, &["RECONCILED", "RELEASED"], RECONCILER, now)
            };
            let commit = ReleaseCommit {
                agent_id: reservation.agent_id.clone(),
                reservation_id: reservation.id.clone(),
                reservation: Some(ReleasedReservation { id: reservation.id.clone(), refund }),
                fence: fence.clone(),
                status: IdempotencyStatus::Failed,
                error: error.clone(),
                audit,
                now,
                expires_at: now.plus(self.idempotency_ttl),
            };
            match self.store.release(&commit).await? {
                // Fenced: the claim moved on since it was read (a replay took it): its new
                // holder decides.
                Transition::Applied | Transition::AlreadyApplied | Transition::Fenced(_) => return Ok(()),
                Transition::VersionConflict => continue,
                Transition::Refused(why) => return Err(PaymentError::LedgerInconsistent(why)),
            }
        }
        Err(PaymentError::LedgerConflict { agent: reservation.agent_id.clone(), attempts: 4 })
    }
}

/// Count and sum per state.
fn totals(reservations: &[Reservation]) -> BTreeMap<&'static str, StateTotal> {
    let mut states: BTreeMap<&'static str, StateTotal> = BTreeMap::new();
    for reservation in reservations {
        let total = states.entry(reservation.status.as_str()).or_default();
        total.payments += 1;
        total.atomic += u128::from(reservation.amount.get());
    }
    states
}

/// Who reconciliation's writes name in the audit trail.
pub const RECONCILER: &str = "agentpay (reconciliation)";

fn settled_amount_differs(reservation: &Reservation) -> Option<Anomaly> {
    let settled = reservation.settlement.as_ref()?.report.amount?;
    (reservation.status == ReservationStatus::Settled && settled != reservation.amount).then(|| Anomaly {
        kind: AnomalyKind::SettledAmountDiffers,
        idempotency_key: reservation.idempotency_key.clone(),
        reservation_id: reservation.id.clone(),
        amount: reservation.amount,
        detail: format!("authorized {} atomic units, settled {}", reservation.amount.get(), settled.get()),
    })
}
