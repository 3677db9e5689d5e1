//! Fault injection for the demo, the tests and the fault simulator: wrappers around the real
//! store and provider that can fail a call, or let a [`FaultHook`] act before and after every
//! store write and provider call (crash there, start another execution, move the clock).
//! Everything else (retries, compensation, redrive, fencing) runs for real.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use serde_json::Value;

use crate::clock::Timestamp;
use crate::error::PaymentError;
use crate::payment::PaymentRequirement;
use crate::policy::{AgentLedger, SpendPolicy};
use crate::provider::{PaymentOrder, PaymentProof, PaymentProvider};
use crate::request::PaymentRequest;
use crate::store::{
    ApprovalDecisionCommit, ApprovalRecord, ApprovalRequestCommit, AuditEvent, AuthorizationCommit, ClaimFence,
    HoldCommit, IdempotencyRecord, PolicyAuditEvent, PolicyChange, PolicyEdited, ReleaseCommit, Reservation,
    ReserveOutcome, SettlementCommit, SpendHistory, Store, Transition, TripCounters,
};
use crate::window::WindowWrite;

/// Takes one failure off the budget; true while failures remain.
fn take(budget: &AtomicU32) -> bool {
    budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

/// A place a call can be interrupted: before it (nothing happened) or after it (it happened,
/// but its caller never learns the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    Before(&'static str),
    After(&'static str),
}

/// Decides what happens at each [`FaultPoint`]. An error replaces the call's result.
#[async_trait]
pub trait FaultHook: Send + Sync {
    async fn at(&self, point: FaultPoint, order: Option<&PaymentOrder>) -> Result<(), PaymentError>;
}

type HookSlot = Mutex<Option<Arc<dyn FaultHook>>>;

fn current(slot: &HookSlot) -> Option<Arc<dyn FaultHook>> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderFault {
    /// The provider refused before processing (throttled): definite, retried, then compensated.
    Unavailable,
    /// Final: the state machine compensates.
    Rejected,
    /// The proof was issued but the answer was lost: unknown, retried with the same token.
    OutcomeUnknownAfterProof,
}

/// Fails the next `failures` calls, then delegates; counts every call that reached the wallet.
pub struct FaultyProvider {
    inner: Arc<dyn PaymentProvider>,
    fault: Mutex<ProviderFault>,
    failures: AtomicU32,
    delegated: AtomicU32,
    hook: HookSlot,
}

impl FaultyProvider {
    pub fn new(inner: Arc<dyn PaymentProvider>, fault: ProviderFault, failures: u32) -> Self {
        Self {
            inner,
            fault: Mutex::new(fault),
            failures: AtomicU32::new(failures),
            delegated: AtomicU32::new(0),
            hook: Mutex::new(None),
        }
    }

    /// The next `count` calls fail with `fault`.
    pub fn fail_next(&self, fault: ProviderFault, count: u32) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
        self.failures.store(count, Ordering::SeqCst);
    }

    /// Calls that reached the wrapped provider.
    pub fn delegated_calls(&self) -> u32 {
        self.delegated.load(Ordering::SeqCst)
    }

    pub fn set_hook(&self, hook: Option<Arc<dyn FaultHook>>) {
        *self.hook.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }
}

#[async_trait]
impl PaymentProvider for FaultyProvider {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn prepare(
        &self,
        request: &PaymentRequest,
        policy: &SpendPolicy,
        payment: &PaymentRequirement,
    ) -> Result<Option<Value>, PaymentError> {
        self.inner.prepare(request, policy, payment)
    }

    async fn process_payment(&self, order: &PaymentOrder) -> Result<PaymentProof, PaymentError> {
        let hook = current(&self.hook);
        if let Some(hook) = &hook {
            hook.at(FaultPoint::Before("process_payment"), Some(order)).await?;
        }
        let fault = *self.fault.lock().unwrap_or_else(|p| p.into_inner());
        if fault != ProviderFault::OutcomeUnknownAfterProof && take(&self.failures) {
            return Err(match fault {
                ProviderFault::Rejected => PaymentError::ProviderRejected {
                    provider: self.inner.name(),
                    message: "injected fault: wallet has insufficient funds".into(),
                },
                _ => PaymentError::ProviderUnavailable {
                    provider: self.inner.name(),
                    message: "injected fault: the provider throttled the request before processing it".into(),
                    source: None,
                },
            });
        }
        self.delegated.fetch_add(1, Ordering::SeqCst);
        let proof = self.inner.process_payment(order).await?;
        if fault == ProviderFault::OutcomeUnknownAfterProof && take(&self.failures) {
            return Err(PaymentError::PaymentOutcomeUnknown {
                provider: self.inner.name(),
                message: "injected fault: the call timed out after the proof was issued".into(),
                source: None,
            });
        }
        if let Some(hook) = &hook {
            hook.at(FaultPoint::After("process_payment"), Some(order)).await?;
        }
        Ok(proof)
    }
}

/// Fails the next `failures` ledger commits (`authorize`) with `StoreUnavailable`, and runs
/// the hook around every write.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    authorize_failures: AtomicU32,
    hook: HookSlot,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner, authorize_failures: AtomicU32::new(0), hook: Mutex::new(None) }
    }

    pub fn fail_next_authorizations(&self, count: u32) {
        self.authorize_failures.store(count, Ordering::SeqCst);
    }

    pub fn set_hook(&self, hook: Option<Arc<dyn FaultHook>>) {
        *self.hook.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// Runs `write` between the hook's `Before` and `After` for `operation`.
    async fn around<T>(
        &self,
        operation: &'static str,
        write: impl std::future::Future<Output = Result<T, PaymentError>> + Send,
    ) -> Result<T, PaymentError> {
        let hook = current(&self.hook);
        if let Some(hook) = &hook {
            hook.at(FaultPoint::Before(operation), None).await?;
        }
        let result = write.await?;
        if let Some(hook) = &hook {
            hook.at(FaultPoint::After(operation), None).await?;
        }
        Ok(result)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("injected fault: ledger table unreachable")]
struct InjectedOutage;

#[async_trait]
impl Store for FaultyStore {
    async fn durable(&self) -> Result<(), PaymentError> {
        self.inner.durable().await
    }
    async fn insert_idempotency(&self, record: &IdempotencyRecord) -> Result<Option<IdempotencyRecord>, PaymentError> {
        self.around("insert_idempotency", self.inner.insert_idempotency(record)).await
    }
    async fn replace_idempotency(
        &self,
        expected: &IdempotencyRecord,
        record: &IdempotencyRecord,
    ) -> Result<Option<Option<IdempotencyRecord>>, PaymentError> {
        self.around("replace_idempotency", self.inner.replace_idempotency(expected, record)).await
    }
    async fn idempotency(&self, key: &str, now: Timestamp) -> Result<Option<IdempotencyRecord>, PaymentError> {
        self.inner.idempotency(key, now).await
    }
    async fn agent_ledger(&self, agent_id: &str) -> Result<AgentLedger, PaymentError> {
        self.inner.agent_ledger(agent_id).await
    }
    async fn agent_and_key(
        &self,
        agent_id: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<(AgentLedger, Option<IdempotencyRecord>), PaymentError> {
        self.inner.agent_and_key(agent_id, key, now).await
    }
    async fn change_policy(&self, agent_id: &str, change: &PolicyChange) -> Result<PolicyEdited, PaymentError> {
        self.inner.change_policy(agent_id, change).await
    }
    async fn policy_history(&self, agent_id: &str) -> Result<Vec<PolicyAuditEvent>, PaymentError> {
        self.inner.policy_history(agent_id).await
    }
    async fn policy(&self, agent_id: &str) -> Result<Option<SpendPolicy>, PaymentError> {
        self.inner.policy(agent_id).await
    }
    async fn policy_and_key(
        &self,
        agent_id: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<(Option<SpendPolicy>, Option<IdempotencyRecord>), PaymentError> {
        self.inner.policy_and_key(agent_id, key, now).await
    }
    async fn spend_history(
        &self,
        agent_id: &str,
        scope: &str,
        first_day: u32,
        last_day: u32,
    ) -> Result<SpendHistory, PaymentError> {
        self.inner.spend_history(agent_id, scope, first_day, last_day).await
    }
    async fn trip_counters(&self, agent_id: &str) -> Result<TripCounters, PaymentError> {
        self.inner.trip_counters(agent_id).await
    }
    async fn put_trip_counters(&self, agent_id: &str, counters: &TripCounters) -> Result<bool, PaymentError> {
        self.inner.put_trip_counters(agent_id, counters).await
    }
    async fn agents_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, PaymentError> {
        self.inner.agents_after(after, limit).await
    }
    async fn sweep_cursor(&self) -> Result<Option<String>, PaymentError> {
        self.inner.sweep_cursor().await
    }
    async fn set_sweep_cursor(&self, last_reconciled: &str) -> Result<(), PaymentError> {
        self.inner.set_sweep_cursor(last_reconciled).await
    }
    async fn reserve(
        &self,
        write: &WindowWrite,
        r: &Reservation,
        fence: &ClaimFence,
    ) -> Result<ReserveOutcome, PaymentError> {
        self.around("reserve", self.inner.reserve(write, r, fence)).await
    }
    async fn reservation(&self, agent_id: &str, id: &str) -> Result<Option<Reservation>, PaymentError> {
        self.inner.reservation(agent_id, id).await
    }
    async fn reservations(&self, agent_id: &str) -> Result<Vec<Reservation>, PaymentError> {
        self.inner.reservations(agent_id).await
    }
    async fn authorize(&self, commit: &AuthorizationCommit) -> Result<Transition, PaymentError> {
        if take(&self.authorize_failures) {
            return Err(PaymentError::store("record ledger", InjectedOutage));
        }
        self.around("authorize", self.inner.authorize(commit)).await
    }
    async fn release(&self, commit: &ReleaseCommit) -> Result<Transition, PaymentError> {
        self.around("release", self.inner.release(commit)).await
    }
    async fn hold(&self, commit: &HoldCommit) -> Result<Transition, PaymentError> {
        self.around("hold", self.inner.hold(commit)).await
    }
    async fn record_settlement(&self, commit: &SettlementCommit) -> Result<Transition, PaymentError> {
        self.around("record_settlement", self.inner.record_settlement(commit)).await
    }
    async fn shadow_window(&self, agent_id: &str) -> Result<crate::window::SpendWindow, PaymentError> {
        self.around("shadow_window", self.inner.shadow_window(agent_id)).await
    }
    async fn record_shadow(&self, commit: &crate::store::ShadowCommit) -> Result<ReserveOutcome, PaymentError> {
        self.around("record_shadow", self.inner.record_shadow(commit)).await
    }
    async fn append_audit(&self, event: &AuditEvent) -> Result<(), PaymentError> {
        self.around("append_audit", self.inner.append_audit(event)).await
    }
    async fn audit_events(&self, agent_id: &str) -> Result<Vec<AuditEvent>, PaymentError> {
        self.inner.audit_events(agent_id).await
    }
    async fn request_approval(&self, commit: &ApprovalRequestCommit) -> Result<Transition, PaymentError> {
        self.around("request_approval", self.inner.request_approval(commit)).await
    }
    async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, PaymentError> {
        self.inner.approval(id).await
    }
    async fn approvals(&self, since: Timestamp, until: Timestamp) -> Result<Vec<ApprovalRecord>, PaymentError> {
        self.inner.approvals(since, until).await
    }
    async fn decide_approval(&self, commit: &ApprovalDecisionCommit) -> Result<Transition, PaymentError> {
        self.around("decide_approval", self.inner.decide_approval(commit)).await
    }
}
