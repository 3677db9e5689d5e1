//! Fault injection for the demo and the tests: a provider that is down for a while, a store
//! whose ledger write fails for a while. They wrap the real adapters, so everything else
//! (retries, compensation, redrive) runs for real.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;

use crate::clock::Timestamp;
use crate::error::PaymentError;
use crate::policy::{AgentLedger, SpendPolicy, WindowBucket};
use crate::provider::{PaymentOrder, PaymentProof, PaymentProvider};
use crate::request::PaymentRequest;
use crate::store::{
    AuditEvent, AuthorizationCommit, IdempotencyRecord, ReleaseCommit, Reservation, ReserveOutcome, Store, Transition,
};
use crate::x402::PaymentRequirement;
use serde_json::Value;

/// Takes one failure off the budget; true while failures remain.
fn take(budget: &AtomicU32) -> bool {
    budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderFault {
    /// Transient: the state machine retries it.
    Unavailable,
    /// Final: the state machine compensates.
    Rejected,
}

/// Fails the next `failures` calls, then delegates; counts every call that reached the wallet.
pub struct FaultyProvider {
    inner: Arc<dyn PaymentProvider>,
    fault: std::sync::Mutex<ProviderFault>,
    failures: AtomicU32,
    delegated: AtomicU32,
}

impl FaultyProvider {
    pub fn new(inner: Arc<dyn PaymentProvider>, fault: ProviderFault, failures: u32) -> Self {
        Self {
            inner,
            fault: std::sync::Mutex::new(fault),
            failures: AtomicU32::new(failures),
            delegated: AtomicU32::new(0),
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
        if take(&self.failures) {
            let fault = *self.fault.lock().unwrap_or_else(|p| p.into_inner());
            return Err(match fault {
                ProviderFault::Unavailable => PaymentError::ProviderUnavailable {
                    provider: self.inner.name(),
                    message: "injected fault: provider did not answer".into(),
                    source: None,
                },
                ProviderFault::Rejected => PaymentError::ProviderRejected {
                    provider: self.inner.name(),
                    message: "injected fault: wallet has insufficient funds".into(),
                },
            });
        }
        self.delegated.fetch_add(1, Ordering::SeqCst);
        self.inner.process_payment(order).await
    }
}

/// Fails the next `failures` ledger commits (`authorize`) with `StoreUnavailable`.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    authorize_failures: AtomicU32,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner, authorize_failures: AtomicU32::new(0) }
    }

    pub fn fail_next_authorizations(&self, count: u32) {
        self.authorize_failures.store(count, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("injected fault: ledger table unreachable")]
struct InjectedOutage;

#[async_trait]
impl Store for FaultyStore {
    async fn insert_idempotency(&self, record: &IdempotencyRecord) -> Result<Option<IdempotencyRecord>, PaymentError> {
        self.inner.insert_idempotency(record).await
    }
    async fn replace_idempotency(
        &self,
        expected: &IdempotencyRecord,
        record: &IdempotencyRecord,
    ) -> Result<Option<Option<IdempotencyRecord>>, PaymentError> {
        self.inner.replace_idempotency(expected, record).await
    }
    async fn idempotency(&self, key: &str, now: Timestamp) -> Result<Option<IdempotencyRecord>, PaymentError> {
        self.inner.idempotency(key, now).await
    }
    async fn agent_ledger(&self, agent_id: &str) -> Result<AgentLedger, PaymentError> {
        self.inner.agent_ledger(agent_id).await
    }
    async fn put_policy(&self, agent_id: &str, policy: &SpendPolicy) -> Result<(), PaymentError> {
        self.inner.put_policy(agent_id, policy).await
    }
    async fn reserve(&self, v: u64, window: &[WindowBucket], r: &Reservation) -> Result<ReserveOutcome, PaymentError> {
        self.inner.reserve(v, window, r).await
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
        self.inner.authorize(commit).await
    }
    async fn release(&self, commit: &ReleaseCommit) -> Result<Transition, PaymentError> {
        self.inner.release(commit).await
    }
    async fn settle(&self, id: &str, audit: &AuditEvent) -> Result<Transition, PaymentError> {
        self.inner.settle(id, audit).await
    }
    async fn audit_events(&self, agent_id: &str) -> Result<Vec<AuditEvent>, PaymentError> {
        self.inner.audit_events(agent_id).await
    }
}
