//! The scheduled reconciliation on AWS: Step Functions answers what became of an execution
//! (DescribeExecution, and GetExecutionHistory for whether it entered ProcessPayment), and an
//! unknown outcome is asked again by starting the payment afresh with the execution's own
//! input (same key, same client token). The function does not wait for that run: the next
//! sweep reads its result from the ledger.

use std::sync::Arc;

use agentpay_core::error::PaymentError;
use agentpay_core::reconcile::{AgentReconciliation, ExecutionFate, ExecutionLookup, Reconciler};
use agentpay_core::settlements::ChainReader;
use agentpay_core::store::Store;
use agentpay_core::workflow::execution_name;
use aws_sdk_sfn::error::ProvideErrorMetadata;
use aws_sdk_sfn::types::ExecutionStatus;
use serde_json::{Value, json};

/// The state where a proof is asked for.
const PROCESS_PAYMENT_STATE: &str = "ProcessPayment";

/// Fresh runs of one execution reconciliation may start (`<name>-reconcile-N`): a held key is
/// resolved by the first that reaches the provider, so a few suffice.
const MAX_FRESH_RUNS: u32 = 100;

/// Agents one scheduled sweep reconciles, bounded by Lambda's 15 minutes: with more agents,
/// each sweep goes on after the last agent the one before reconciled (`Store::sweep_cursor`),
/// so every agent is reconciled once every ⌈agents / this⌉ sweeps.
pub const MAX_AGENTS_PER_SWEEP: usize = 1000;

/// Agents in a row a sweep may fail to reconcile before it stops: one broken agent is gone
/// past, but a run of failures says something outside them is down (Step Functions, the
/// chain), and the sweep keeps its place before them rather than skip a page for a cycle.
pub const MAX_FAILURES_IN_A_ROW: usize = 3;

pub struct SfnExecutions {
    sfn: aws_sdk_sfn::Client,
}

impl SfnExecutions {
    pub fn new(sfn: aws_sdk_sfn::Client) -> Self {
        Self { sfn }
    }
}

fn unavailable<E: std::error::Error + Send + Sync + 'static>(operation: &'static str, error: E) -> PaymentError {
    PaymentError::StoreUnavailable { operation, source: Box::new(error) }
}

#[async_trait::async_trait]
impl ExecutionLookup for SfnExecutions {
    async fn fate(&self, execution_id: &str) -> Result<ExecutionFate, PaymentError> {
        let described = match self.sfn.describe_execution().execution_arn(execution_id).send().await {
            Ok(described) => described,
            Err(error) if error.code() == Some("ExecutionDoesNotExist") => return Ok(ExecutionFate::Missing),
            Err(error) => return Err(unavailable("DescribeExecution", error)),
        };
        let status = described.status().clone();
        if matches!(status, ExecutionStatus::Running | ExecutionStatus::PendingRedrive) {
            return Ok(ExecutionFate::Running);
        }
        let mut pages = self.sfn.get_execution_history().execution_arn(execution_id).into_paginator().items().send();
        let mut entered = false;
        while let Some(event) = pages.next().await {
            let event = event.map_err(|e| unavailable("GetExecutionHistory", e))?;
            entered |= event.state_entered_event_details().is_some_and(|d| d.name() == PROCESS_PAYMENT_STATE);
        }
        Ok(ExecutionFate::Ended { status: status.as_str().to_owned(), entered_process_payment: entered })
    }

    async fn ask_again(&self, execution_id: &str) -> Result<String, PaymentError> {
        let described = self
            .sfn
            .describe_execution()
            .execution_arn(execution_id)
            .send()
            .await
            .map_err(|e| unavailable("DescribeExecution", e))?;
        let machine = described.state_machine_arn();
        let Some(input) = described.input() else {
            return Ok(format!("execution {execution_id} has no input to run again (Step Functions withheld it)"));
        };
        for n in 1..=MAX_FRESH_RUNS {
            let name = execution_name(described.name().unwrap_or_default(), Some(&format!("reconcile-{n}")));
            match self.sfn.start_execution().state_machine_arn(machine).name(&name).input(input).send().await {
                Ok(started) => return Ok(format!("started {} (its result is in the ledger)", started.execution_arn())),
                Err(error) if error.code() == Some("ExecutionAlreadyExists") => continue,
                Err(error) => return Err(unavailable("StartExecution", error)),
            }
        }
        Ok(format!("{MAX_FRESH_RUNS} reconciliation runs of {execution_id} exist already: ask a person"))
    }
}

/// What one invocation was asked: every agent (the schedule), or one; dry run or not.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReconcileRequest {
    #[serde(default)]
    pub agent_id: Option<agentpay_core::request::AgentId>,
    #[serde(default)]
    pub dry_run: bool,
}

impl ReconcileRequest {
    /// A scheduled event (EventBridge's envelope) sweeps every agent; a direct invocation may
    /// name one agent or ask for a dry run.
    pub fn from_event(event: &Value) -> Result<Self, String> {
        if event.get("detail-type").is_some() || event.is_null() {
            return Ok(Self::default());
        }
        serde_json::from_value(event.clone())
            .map_err(|e| format!("{e}: expected {{\"agentId\"?: an agent id, \"dryRun\"?: true or false}}"))
    }
}

pub struct ReconcileFunction {
    pub store: Arc<dyn Store>,
    /// `MAX_AGENTS_PER_SWEEP` in a Lambda.
    pub agents_per_sweep: usize,
    pub reconciler: Reconciler,
    pub chain: Box<dyn ChainReader>,
    pub executions: Box<dyn ExecutionLookup>,
}

impl ReconcileFunction {
    /// One sweep: per agent, what changed, what was asked again and what looks wrong, counted
    /// in the logs and metrics (never a proof) and returned whole. An agent that cannot be
    /// reconciled does not hold up the others: the sweep goes on past it, then fails with its
    /// error (the function's errors alarm), so one broken agent never starves the rest. After
    /// `MAX_FAILURES_IN_A_ROW` failures in a row it stops, its place kept before them.
    pub async fn sweep(&self, request: &ReconcileRequest) -> Result<Value, PaymentError> {
        let (went_on_after, agents) = match &request.agent_id {
            Some(agent) => (None, vec![agent.to_string()]),
            None => self.next_agents().await?,
        };
        let mut reports: Vec<AgentReconciliation> = Vec::new();
        let mut failed: Vec<PaymentError> = Vec::new();
        // Where the next sweep goes on after: the last agent reconciled, or gone past.
        let mut place: Option<&String> = None;
        let (mut in_a_row, mut before_the_run) = (0, None);
        for agent in &agents {
            let reconciled = self
                .reconciler
                .agent(agent, self.chain.as_ref(), self.executions.as_ref(), request.dry_run)
                .await
                .map_err(|e| match e {
                    agentpay_core::settlements::SettlementError::Store(error) => error,
                    other => PaymentError::LedgerInconsistent(other.to_string()),
                });
            let report = match reconciled {
                Ok(report) => report,
                Err(error) => {
                    tracing::error!(agent = agent.as_str(), error = %error, "could not reconcile the agent");
                    failed.push(error);
                    if in_a_row == 0 {
                        before_the_run = place;
                    }
                    in_a_row += 1;
                    place = Some(agent);
                    if in_a_row == MAX_FAILURES_IN_A_ROW {
                        tracing::error!(failures = in_a_row, "stopping the sweep: too many agents failed in a row");
                        place = before_the_run;
                        break;
                    }
                    continue;
                }
            };
            (in_a_row, place) = (0, Some(agent));
            tracing::info!(
                agent = agent.as_str(),
                changed = report.changes.len(),
                asked_again = report.asked_again.len(),
                anomalies = report.anomalies.len(),
                dry_run = request.dry_run,
                "reconciled"
            );
            if !request.dry_run {
                agentpay_core::metrics::reconciled(agent, report.changes.len(), report.anomalies.len());
            }
            reports.push(report);
        }
        // Only a sweep over every agent moves on; a dry run changes nothing.
        if let (None, false, Some(place)) = (&request.agent_id, request.dry_run, place) {
            self.store.set_sweep_cursor(place).await?;
        }
        tracing::info!(
            went_on_after = went_on_after.as_deref().unwrap_or(""),
            agents = agents.len(),
            failed = failed.len(),
            place = place.map_or("", String::as_str),
            "swept"
        );
        // The first failure, as it was (its type names the Lambda error); each is logged with
        // its agent above.
        if let Some(error) = failed.into_iter().next() {
            return Err(error);
        }
        Ok(json!({"dryRun": request.dry_run, "wentOnAfter": went_on_after, "agents": reports}))
    }

    /// The next `agents_per_sweep` agents after the last one the previous sweep reconciled,
    /// on from the first agent once the last is passed, up to where this sweep began (never
    /// one twice), with where it began.
    async fn next_agents(&self) -> Result<(Option<String>, Vec<String>), PaymentError> {
        let limit = self.agents_per_sweep;
        let cursor = self.store.sweep_cursor().await?;
        let mut agents = self.store.agents_after(cursor.as_deref(), limit).await?;
        if let Some(cursor) = &cursor
            && agents.len() < limit
        {
            let from_the_first = self.store.agents_after(None, limit - agents.len()).await?;
            agents.extend(from_the_first.into_iter().filter(|agent| agent <= cursor));
        }
        Ok((cursor, agents))
    }
}
