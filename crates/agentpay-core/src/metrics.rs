//! What the steps count, through the `metrics` facade: a no-op until a recorder is installed
//! (the Lambdas install CloudWatch's embedded metric format, see `lambda::init_metrics`).
//!
//! Dimensions are bounded: the agent (one per configured agent), an error or denial name (the
//! fixed list in `error::ErrorName`). Alarms read the totals without the agent dimension.

use crate::money::AtomicAmount;

/// The CloudWatch namespace every metric is published under.
pub const NAMESPACE: &str = "agentpay";

/// Metric names, as the template's alarms and dashboard use them.
pub mod names {
    pub const PAYMENTS_AUTHORIZED: &str = "PaymentsAuthorized";
    pub const AMOUNT_AUTHORIZED: &str = "AmountAuthorizedAtomic";
    pub const PAYMENTS_DENIED: &str = "PaymentsDenied";
    pub const COMPENSATIONS: &str = "Compensations";
    pub const OUTCOMES_UNKNOWN: &str = "OutcomesUnknown";
    pub const CLAIMS_SUPERSEDED: &str = "ClaimsSuperseded";
    pub const STEP_ERRORS: &str = "StepErrors";
    pub const WINDOW_RETRIES: &str = "WindowRetries";
    pub const APPROVALS_REQUESTED: &str = "ApprovalsRequested";
    pub const DEVIATIONS_FLAGGED: &str = "DeviationsFlagged";
    pub const KILL_SWITCH_TRIPS: &str = "KillSwitchTrips";
    pub const APPROVALS_DECIDED: &str = "ApprovalsDecided";
    pub const APPROVAL_WAIT_SECONDS: &str = "ApprovalWaitSeconds";
    pub const RECONCILE_CHANGES: &str = "ReconcileChanges";
    pub const RECONCILE_ANOMALIES: &str = "ReconcileAnomalies";
    pub const SHADOW_DECISIONS: &str = "ShadowDecisions";
}

/// A payment authorized: counted, and its amount (atomic units) added, per agent and in total.
pub fn authorized(agent: &str, amount: AtomicAmount) {
    metrics::counter!(names::PAYMENTS_AUTHORIZED).increment(1);
    metrics::counter!(names::PAYMENTS_AUTHORIZED, "Agent" => agent.to_owned()).increment(1);
    metrics::counter!(names::AMOUNT_AUTHORIZED, "Agent" => agent.to_owned()).increment(amount.get());
    metrics::counter!(names::AMOUNT_AUTHORIZED).increment(amount.get());
}

/// A payment denied by the policy, by reason (the error name).
pub fn denied(reason: &str) {
    metrics::counter!(names::PAYMENTS_DENIED, "Reason" => reason.to_owned()).increment(1);
}

/// A reservation released (or a key closed) after a failure, by the error that caused it.
pub fn compensated(error: &str) {
    metrics::counter!(names::COMPENSATIONS, "Error" => error.to_owned()).increment(1);
}

/// A provider outcome held as unknown: money counted, a person or a replay must resolve it.
pub fn outcome_unknown() {
    metrics::counter!(names::OUTCOMES_UNKNOWN).increment(1);
}

/// A write fenced out: another execution took the key over.
pub fn claim_superseded() {
    metrics::counter!(names::CLAIMS_SUPERSEDED).increment(1);
}

/// Any step error, by name (ledger conflicts and store throttles are alarmed on from here).
pub fn step_error(error: &str) {
    metrics::counter!(names::STEP_ERRORS, "Error" => error.to_owned()).increment(1);
}

/// A reservation decided again because the window moved under it (a new minute, a policy
/// edit, or concurrent payments used the room): the contention on one agent, per payment.
pub fn window_moved() {
    metrics::counter!(names::WINDOW_RETRIES).increment(1);
}

/// A payment sent to a person for approval (the backlog alarm compares it with the decisions
/// and time-outs that follow).
pub fn approval_requested() {
    metrics::counter!(names::APPROVALS_REQUESTED).increment(1);
}

/// A payment far from the agent's own history (sent to a person, or denied).
pub fn deviation_flagged(agent: &str) {
    metrics::counter!(names::DEVIATIONS_FLAGGED).increment(1);
    metrics::counter!(names::DEVIATIONS_FLAGGED, "Agent" => agent.to_owned()).increment(1);
}

/// An agent paused by an automatic trip: its alarm tells the operators' topic.
pub fn kill_switch_tripped(agent: &str) {
    metrics::counter!(names::KILL_SWITCH_TRIPS).increment(1);
    metrics::counter!(names::KILL_SWITCH_TRIPS, "Agent" => agent.to_owned()).increment(1);
}

/// A person's decision on a waiting payment reached the workflow (`Approved`, `Rejected`, or
/// `TimedOut` when nobody answered), with how long the payment waited: requested minus
/// decided is the backlog, the wait its age.
pub fn approval_decided(decision: &'static str, waited_seconds: u64) {
    metrics::counter!(names::APPROVALS_DECIDED, "Decision" => decision).increment(1);
    let waited = f64::from(u32::try_from(waited_seconds).unwrap_or(u32::MAX));
    metrics::histogram!(names::APPROVAL_WAIT_SECONDS, "Decision" => decision).record(waited);
}

/// One agent reconciled: the payments it moved, and what it could not explain (the anomalies
/// alarm tells the operators' topic).
pub fn reconciled(agent: &str, changes: usize, anomalies: usize) {
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    metrics::counter!(names::RECONCILE_CHANGES).increment(count(changes));
    metrics::counter!(names::RECONCILE_ANOMALIES).increment(count(anomalies));
    metrics::counter!(names::RECONCILE_ANOMALIES, "Agent" => agent.to_owned()).increment(count(anomalies));
}

/// A payment decided in shadow mode (`Verdict`: WOULD_PAY, WOULD_NEED_APPROVAL, WOULD_DENY):
/// how a policy would have treated the agent before it may spend.
pub fn shadow_decided(verdict: &'static str) {
    metrics::counter!(names::SHADOW_DECISIONS, "Verdict" => verdict).increment(1);
}
