//! Policy backtest: the agent's recorded payment requests (paid, denied, waiting, and shadow
//! decisions), replayed in time order against a draft policy with the very decision code the
//! workflow runs (`decide`, the deviation check, the velocity check) over a simulated window
//! and spend history, and the draft's automatic trips of the kill switch (velocity, deviation
//! flags per hour) as the workflow counts them: once the draft would have paused the agent,
//! every later request is denied `AgentPaused`, since no person resumes it in a replay. What it
//! does not replay: who called (the caller check), trips on a person's rejections (the draft's
//! approvals were never asked), an operator's pauses (a draft's `paused` applies throughout),
//! and releases after the decision (a payment released later counted until then in the real
//! window, for its whole life here).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::clock::Timestamp;
use crate::deviation::{SpendHistory, check, checked_scope, day_number, history_scopes, lookback};
use crate::error::PaymentError;
use crate::money::AtomicAmount;
use crate::payment::{Network, PaymentProtocol, PaymentRequirement, X402Version};
use crate::policy::{AgentLedger, SpendPolicy, decide};
use crate::shadow::{ShadowDecision, ShadowVerdict};
use crate::store::{AuditKind, ReservationStatus, Store};
use crate::trips::{TripCounters, TripEvent};
use crate::window::SpendWindow;

/// Requests one backtest replays at most: what a year of a busy agent records, and what the
/// report's memory allows. With more, the newest are replayed and the report says how many
/// older ones were left out (`BacktestReport::older_left_out`).
pub const MAX_REQUESTS: usize = 1_000_000;

/// What an agent recorded since a time, ready to replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Oldest first, the newest `MAX_REQUESTS` at most.
    pub requests: Vec<RecordedRequest>,
    /// Denials recorded before a payment was selected (no amount or payee): not replayable.
    pub not_replayable: usize,
    /// The oldest requests past `MAX_REQUESTS`, left out.
    pub older_left_out: usize,
}

/// One request as recorded, and what was decided then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedRequest {
    pub at: Timestamp,
    pub idempotency_key: String,
    pub amount: AtomicAmount,
    pub network: Network,
    pub asset: String,
    pub payee: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub recorded: ShadowVerdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded_error: Option<String>,
    /// Decided in shadow mode (nothing was paid).
    pub shadow: bool,
    /// A payment was made (authorized, settled or pending settlement).
    pub paid: bool,
}

/// The agent's requests since `since`, oldest first: its reservations (real and shadow) and
/// its denials (which reserved nothing). Denials recorded before a payment was selected (no
/// amount or payee) cannot be replayed and are counted apart.
pub async fn recorded_requests(store: &dyn Store, agent: &str, since: Timestamp) -> Result<Recorded, PaymentError> {
    recorded_requests_up_to(store, agent, since, MAX_REQUESTS).await
}

/// As `recorded_requests`, keeping the newest `limit`.
pub async fn recorded_requests_up_to(
    store: &dyn Store,
    agent: &str,
    since: Timestamp,
    limit: usize,
) -> Result<Recorded, PaymentError> {
    let mut requests = Vec::new();
    for r in store.reservations(agent).await?.into_iter().filter(|r| r.created_at >= since) {
        let waits = r.approval.is_some();
        let allowed = if waits { ShadowVerdict::WouldNeedApproval } else { ShadowVerdict::WouldPay };
        let (recorded, recorded_error) = match (&r.shadow, r.status) {
            (Some(decision), _) => (decision.verdict, decision.error.clone()),
            (None, _) => (allowed, None),
        };
        requests.push(RecordedRequest {
            at: r.created_at,
            idempotency_key: r.idempotency_key.clone(),
            amount: r.amount,
            network: r.network,
            asset: r.asset.clone(),
            payee: r.pay_to.clone(),
            category: r.context.as_ref().and_then(|c| c.category.clone()),
            recorded,
            recorded_error,
            shadow: r.status == ReservationStatus::Shadow,
            paid: r.status.is_paid(),
        });
    }
    let mut unreplayable = 0;
    for event in store.audit_events(agent).await?.into_iter().filter(|e| e.kind == AuditKind::Denied && e.at >= since) {
        let (Some(amount), Some(network), Some(asset), Some(payee)) =
            (event.amount, event.network, event.asset, event.payee)
        else {
            unreplayable += 1;
            continue;
        };
        requests.push(RecordedRequest {
            at: event.at,
            idempotency_key: event.idempotency_key,
            amount,
            network,
            asset,
            payee,
            category: event.context.category,
            recorded: ShadowVerdict::WouldDeny,
            recorded_error: event.error.map(|e| e.error),
            shadow: false,
            paid: false,
        });
    }
    requests.sort_by(|a, b| (a.at, &a.idempotency_key).cmp(&(b.at, &b.idempotency_key)));
    // The newest are what a draft is judged on; the report says how many older ones are out.
    let older_left_out = requests.len().saturating_sub(limit);
    requests.drain(..older_left_out);
    Ok(Recorded { requests, not_replayable: unreplayable, older_left_out })
}

/// One request replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replayed {
    pub request: RecordedRequest,
    pub draft: ShadowDecision,
    /// The draft decides otherwise than was recorded (verdict, or the denial's name).
    pub changed: bool,
}

/// Counts and sums on one side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tally {
    pub requests: u64,
    /// Paid, or sent to a person, in atomic units (as a string).
    #[serde(serialize_with = "as_string")]
    pub allowed_atomic: u128,
    pub allowed: u64,
    pub approvals: u64,
    pub denied: u64,
    #[serde(serialize_with = "as_string")]
    pub denied_atomic: u128,
}

fn as_string<S: serde::Serializer>(value: &u128, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&value.to_string())
}

impl Tally {
    fn add(&mut self, verdict: ShadowVerdict, amount: AtomicAmount) {
        self.requests += 1;
        match verdict {
            ShadowVerdict::WouldDeny => {
                self.denied += 1;
                self.denied_atomic += u128::from(amount.get());
            }
            allowed => {
                self.allowed += 1;
                self.allowed_atomic += u128::from(amount.get());
                self.approvals += u64::from(allowed == ShadowVerdict::WouldNeedApproval);
            }
        }
    }
}

/// What a draft would have changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BacktestReport {
    pub agent_id: String,
    /// Of the requests, those decided in shadow mode.
    pub shadow_requests: u64,
    pub recorded: Tally,
    pub draft: Tally,
    /// Allowed then, denied by the draft: what it would have blocked.
    pub newly_denied: Tally,
    /// Denied then, allowed by the draft.
    pub newly_allowed: Tally,
    /// Paid straight then, sent to a person by the draft.
    pub newly_sent_to_approval: u64,
    /// Payments the draft flags as deviations from the agent's history.
    pub deviations_flagged: u64,
    /// Per UTC day (days since 1970): recorded and draft.
    pub days: BTreeMap<u32, (Tally, Tally)>,
    /// Every request whose decision changes.
    pub changes: Vec<Replayed>,
    /// Denials recorded without an amount or payee (refused before a payment was selected).
    pub not_replayable: usize,
    /// Older requests left out: more were recorded than `MAX_REQUESTS` (a later `since` replays
    /// them all).
    pub older_left_out: usize,
    /// When and why the draft's automatic trip would have paused the agent, if it would have:
    /// every later request is denied `AgentPaused`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused_by_trip: Option<DraftTrip>,
}

/// The draft's first automatic trip in a replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DraftTrip {
    pub at: Timestamp,
    pub idempotency_key: String,
    pub reason: String,
}

/// Replays `requests` (oldest first) against `draft`.
pub fn backtest(
    agent: &str,
    draft: &SpendPolicy,
    requests: &[RecordedRequest],
) -> Result<BacktestReport, PaymentError> {
    let mut sim = Simulation {
        window: SpendWindow::default(),
        history: HashMap::new(),
        trips: TripCounters::default(),
        paused_by_trip: None,
    };
    let mut report = BacktestReport {
        agent_id: agent.to_owned(),
        shadow_requests: requests.iter().filter(|r| r.shadow).count() as u64,
        recorded: Tally::default(),
        draft: Tally::default(),
        newly_denied: Tally::default(),
        newly_allowed: Tally::default(),
        newly_sent_to_approval: 0,
        deviations_flagged: 0,
        days: BTreeMap::new(),
        changes: Vec::new(),
        not_replayable: 0,
        older_left_out: 0,
        paused_by_trip: None,
    };
    for request in requests {
        let decided = sim.decide(agent, draft, request)?;
        let (verdict, amount) = (decided.verdict, request.amount);
        report.recorded.add(request.recorded, amount);
        report.draft.add(verdict, amount);
        let day = report.days.entry(day_number(request.at)).or_default();
        day.0.add(request.recorded, amount);
        day.1.add(verdict, amount);
        report.deviations_flagged += u64::from(decided.deviation.is_some());
        match (request.recorded, verdict) {
            (ShadowVerdict::WouldDeny, ShadowVerdict::WouldDeny) => {}
            (ShadowVerdict::WouldDeny, allowed) => report.newly_allowed.add(allowed, amount),
            (_, ShadowVerdict::WouldDeny) => report.newly_denied.add(request.recorded, amount),
            (ShadowVerdict::WouldPay, ShadowVerdict::WouldNeedApproval) => report.newly_sent_to_approval += 1,
            _ => {}
        }
        let changed = (request.recorded, request.recorded_error.as_deref()) != (verdict, decided.error.as_deref());
        if changed {
            report.changes.push(Replayed { request: request.clone(), draft: decided, changed });
        }
    }
    report.paused_by_trip = sim.paused_by_trip;
    Ok(report)
}

/// The draft's view of the agent: its window and spend history as the replay builds them.
struct Simulation {
    window: SpendWindow,
    /// (scope, day) → total and count.
    history: HashMap<(String, u32), SpendHistory>,
    /// What the draft's deviation trip counts.
    trips: TripCounters,
    /// The draft's first trip: the agent is paused from then on.
    paused_by_trip: Option<DraftTrip>,
}

impl Simulation {
    fn decide(
        &mut self,
        agent: &str,
        draft: &SpendPolicy,
        request: &RecordedRequest,
    ) -> Result<ShadowDecision, PaymentError> {
        let requirement = requirement(request)?;
        let mut policy = draft.clone();
        policy.paused |= self.paused_by_trip.is_some();
        let ledger = AgentLedger { policy: Some(policy), version: 1, window: self.window.clone() };
        let deviation = draft.deviation.as_ref().and_then(|policy| {
            let scope = checked_scope(policy, &request.payee, request.category.as_deref());
            let (first, last) = lookback(policy, request.at);
            let mut seen = SpendHistory::default();
            for day in first..=last {
                if let Some(h) = self.history.get(&(scope.clone(), day)) {
                    seen.total = seen.total.checked_add(h.total).unwrap_or(seen.total);
                    seen.count += h.count;
                }
            }
            check(policy, scope, seen, request.amount)
        });
        // As CheckSpend: a deviation flag is counted before the decision (unless the agent is
        // paused), and a trip denies it.
        let counted = match ledger.paused() {
            true => None,
            false => self.count_deviation_flag(draft, deviation.is_some(), request),
        };
        let decided = match counted {
            Some(reason) => Err(self.trip(agent, request, reason)),
            None => decide(agent, &ledger, &requirement, request.at)
                .and_then(|d| crate::steps::with_deviation(d, deviation.as_ref(), agent, &requirement))
                .and_then(|d| crate::steps::within_velocity(d, &ledger, agent, &requirement, request.at))
                .map_err(|denial| match denial {
                    PaymentError::KillSwitchTripped { reason, .. } => self.trip(agent, request, reason),
                    other => other,
                }),
        };
        let mut decision = match decided {
            Ok(spend) => {
                self.window = self.window.apply(&spend.write).ok_or_else(|| {
                    PaymentError::LedgerInconsistent(format!("backtest window refused its own write at {}", request.at))
                })?;
                match spend.approval {
                    Some(reason) => ShadowDecision::would_need_approval(reason),
                    None => ShadowDecision::would_pay(),
                }
            }
            Err(denial) if denial.error_name().is_denial() => ShadowDecision::would_deny(&denial),
            Err(fault) => return Err(fault),
        };
        decision.deviation = deviation.as_ref().map(|d| d.describe(requirement.usdc().decimals));
        // The baseline learns from payments made: the draft's own, and those it would send to a
        // person that a person did approve then.
        let made = decision.verdict == ShadowVerdict::WouldPay
            || (decision.verdict == ShadowVerdict::WouldNeedApproval && request.paid);
        if made {
            for scope in history_scopes(&request.payee, request.category.as_deref()) {
                let day = self.history.entry((scope, day_number(request.at))).or_default();
                day.total = day.total.checked_add(request.amount).unwrap_or(day.total);
                day.count += 1;
            }
        }
        Ok(decision)
    }

    /// Counts a deviation flag where the draft trips on them; why it trips, if it does.
    fn count_deviation_flag(
        &mut self,
        draft: &SpendPolicy,
        flagged: bool,
        request: &RecordedRequest,
    ) -> Option<String> {
        let auto = draft.auto_pause.as_ref().filter(|a| a.deviation_flags_per_hour.is_some() && flagged)?;
        let event = TripEvent::DeviationFlagged { reservation_id: request.idempotency_key.clone() };
        if let Some(next) = self.trips.after(&event, request.at) {
            self.trips = next;
        }
        self.trips.tripped(auto)
    }

    /// The draft pauses the agent (its first trip is reported) and the counters start over, as
    /// the workflow's trip does; the request is denied with the trip's reason.
    fn trip(&mut self, agent: &str, request: &RecordedRequest, reason: String) -> PaymentError {
        self.trips = self.trips.started_over();
        self.paused_by_trip.get_or_insert_with(|| DraftTrip {
            at: request.at,
            idempotency_key: request.idempotency_key.clone(),
            reason: reason.clone(),
        });
        PaymentError::KillSwitchTripped { agent: agent.to_owned(), reason }
    }
}

fn requirement(request: &RecordedRequest) -> Result<PaymentRequirement, PaymentError> {
    let address = |text: &str, what: &str| {
        text.parse()
            .map_err(|_| PaymentError::LedgerInconsistent(format!("recorded {what} {text:?} is not an address")))
    };
    Ok(PaymentRequirement {
        protocol: PaymentProtocol::X402 { version: X402Version::V2 },
        index: 0,
        network: request.network,
        asset: address(&request.asset, "asset")?,
        pay_to: address(&request.payee, "payee")?,
        amount: request.amount,
        max_timeout_seconds: 60,
        accepted: serde_json::Value::Null,
        resource: None,
        extensions: None,
    })
}
