//! Counts calls into a `Store`: one call is one round trip to the backing store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::*;

pub struct CountingStore {
    inner: Arc<dyn Store>,
    calls: Mutex<BTreeMap<&'static str, u64>>,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner, calls: Mutex::new(BTreeMap::new()) }
    }

    fn count(&self, operation: &'static str) {
        if let Ok(mut calls) = self.calls.lock() {
            *calls.entry(operation).or_default() += 1;
        }
    }

    /// Calls per operation so far.
    pub fn calls(&self) -> BTreeMap<&'static str, u64> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn total(&self) -> u64 {
        self.calls().values().sum()
    }

    pub fn reset(&self) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.clear();
        }
    }
}

#[async_trait]
impl Store for CountingStore {
    /// Passed on, not counted: not a round trip of the step's own (at most a wait for a commit
    /// already under way).
    async fn durable(&self) -> Result<(), PaymentError> {
        self.inner.durable().await
    }
    async fn insert_idempotency(&self, record: &IdempotencyRecord) -> Result<Option<IdempotencyRecord>, PaymentError> {
        self.count("insert_idempotency");
        self.inner.insert_idempotency(record).await
    }
    async fn replace_idempotency(
        &self,
        expected: &IdempotencyRecord,
        record: &IdempotencyRecord,
    ) -> Result<Option<Option<IdempotencyRecord>>, PaymentError> {
        self.count("replace_idempotency");
        self.inner.replace_idempotency(expected, record).await
    }
    async fn idempotency(&self, key: &str, now: Timestamp) -> Result<Option<IdempotencyRecord>, PaymentError> {
        self.count("idempotency");
        self.inner.idempotency(key, now).await
    }
    async fn agent_ledger(&self, agent_id: &str) -> Result<AgentLedger, PaymentError> {
        self.count("agent_ledger");
        self.inner.agent_ledger(agent_id).await
    }
    async fn agent_and_key(
        &self,
        agent_id: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<(AgentLedger, Option<IdempotencyRecord>), PaymentError> {
        self.count("agent_and_key");
        self.inner.agent_and_key(agent_id, key, now).await
    }
    async fn change_policy(&self, agent_id: &str, change: &PolicyChange) -> Result<PolicyEdited, PaymentError> {
        self.count("change_policy");
        self.inner.change_policy(agent_id, change).await
    }
    async fn policy_history(&self, agent_id: &str) -> Result<Vec<PolicyAuditEvent>, PaymentError> {
        self.count("policy_history");
        self.inner.policy_history(agent_id).await
    }
    async fn policy(&self, agent_id: &str) -> Result<Option<SpendPolicy>, PaymentError> {
        self.count("policy");
        self.inner.policy(agent_id).await
    }
    async fn policy_and_key(
        &self,
        agent_id: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<(Option<SpendPolicy>, Option<IdempotencyRecord>), PaymentError> {
        self.count("policy_and_key");
        self.inner.policy_and_key(agent_id, key, now).await
    }
    async fn spend_history(
        &self,
        agent_id: &str,
        scope: &str,
        first_day: u32,
        last_day: u32,
    ) -> Result<SpendHistory, PaymentError> {
        self.count("spend_history");
        self.inner.spend_history(agent_id, scope, first_day, last_day).await
    }
    async fn trip_counters(&self, agent_id: &str) -> Result<TripCounters, PaymentError> {
        self.count("trip_counters");
        self.inner.trip_counters(agent_id).await
    }
    async fn put_trip_counters(&self, agent_id: &str, counters: &TripCounters) -> Result<bool, PaymentError> {
        self.count("put_trip_counters");
        self.inner.put_trip_counters(agent_id, counters).await
    }
    async fn agents_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, PaymentError> {
        self.count("agents_after");
        self.inner.agents_after(after, limit).await
    }
    async fn sweep_cursor(&self) -> Result<Option<String>, PaymentError> {
        self.count("sweep_cursor");
        self.inner.sweep_cursor().await
    }
    async fn set_sweep_cursor(&self, last_reconciled: &str) -> Result<(), PaymentError> {
        self.count("set_sweep_cursor");
        self.inner.set_sweep_cursor(last_reconciled).await
    }
    async fn reserve(
        &self,
        write: &WindowWrite,
        r: &Reservation,
        fence: &ClaimFence,
    ) -> Result<ReserveOutcome, PaymentError> {
        self.count("reserve");
        self.inner.reserve(write, r, fence).await
    }
    async fn reservation(&self, agent_id: &str, id: &str) -> Result<Option<Reservation>, PaymentError> {
        self.count("reservation");
        self.inner.reservation(agent_id, id).await
    }
    async fn reservations(&self, agent_id: &str) -> Result<Vec<Reservation>, PaymentError> {
        self.count("reservations");
        self.inner.reservations(agent_id).await
    }
    async fn authorize(&self, commit: &AuthorizationCommit) -> Result<Transition, PaymentError> {
        self.count("authorize");
        self.inner.authorize(commit).await
    }
    async fn release(&self, commit: &ReleaseCommit) -> Result<Transition, PaymentError> {
        self.count("release");
        self.inner.release(commit).await
    }
    async fn hold(&self, commit: &HoldCommit) -> Result<Transition, PaymentError> {
        self.count("hold");
        self.inner.hold(commit).await
    }
    async fn record_settlement(&self, commit: &SettlementCommit) -> Result<Transition, PaymentError> {
        self.count("record_settlement");
        self.inner.record_settlement(commit).await
    }
    async fn shadow_window(&self, agent_id: &str) -> Result<crate::window::SpendWindow, PaymentError> {
        self.count("shadow_window");
        self.inner.shadow_window(agent_id).await
    }
    async fn record_shadow(&self, commit: &crate::store::ShadowCommit) -> Result<ReserveOutcome, PaymentError> {
        self.count("record_shadow");
        self.inner.record_shadow(commit).await
    }
    async fn append_audit(&self, event: &AuditEvent) -> Result<(), PaymentError> {
        self.count("append_audit");
        self.inner.append_audit(event).await
    }
    async fn audit_events(&self, agent_id: &str) -> Result<Vec<AuditEvent>, PaymentError> {
        self.count("audit_events");
        self.inner.audit_events(agent_id).await
    }
    async fn request_approval(&self, commit: &ApprovalRequestCommit) -> Result<Transition, PaymentError> {
        self.count("request_approval");
        self.inner.request_approval(commit).await
    }
    async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, PaymentError> {
        self.count("approval");
        self.inner.approval(id).await
    }
    async fn approvals(&self, since: Timestamp, until: Timestamp) -> Result<Vec<ApprovalRecord>, PaymentError> {
        self.count("approvals");
        self.inner.approvals(since, until).await
    }
    async fn decide_approval(&self, commit: &ApprovalDecisionCommit) -> Result<Transition, PaymentError> {
        self.count("decide_approval");
        self.inner.decide_approval(commit).await
    }
}
