//! `agentpay demo`: every path of the workflow on a fresh embedded store, using the sample
//! execution inputs in `events/executions/`. Each scenario checks its own outcome; the exit
//! code says whether all behaved.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::cli::{CliError, history_table, outcome_text};
use agentpay::asl::ScaledSleeper;
use agentpay::clock::SystemClock;
use agentpay::config::Config;
use agentpay::executions::{ExecutionRecord, ExecutionStatus, ExecutionStore};
use agentpay::faults::ProviderFault;
use agentpay::local::LocalApp;
use agentpay::policy::SpendPolicy;
use agentpay::store::ReservationStatus;

pub const AGENT: &str = "demo-agent";
pub const POLICY: &str = include_str!("../../events/policy-demo-agent.json");
pub const PAID_CALL: &str = include_str!("../../events/executions/paid-call.json");
pub const OVER_DAILY_CAP: &str = include_str!("../../events/executions/over-daily-cap.json");
pub const INVALID_CHALLENGE: &str = include_str!("../../events/executions/invalid-challenge.json");
pub const PROVIDER_FAILURE: &str = include_str!("../../events/executions/provider-failure.json");
pub const LEDGER_FAILURE: &str = include_str!("../../events/executions/ledger-failure.json");
pub const PROVIDER_TIMEOUT: &str = include_str!("../../events/executions/provider-timeout.json");

/// Retry waits in the demo are the ASL's, divided by this.
const TIME_SCALE: u32 = 100;

struct Tour {
    app: LocalApp,
    json: bool,
    report: Vec<Value>,
    failures: usize,
}

impl Tour {
    async fn scenario(
        &mut self,
        number: usize,
        title: &str,
        record: &ExecutionRecord,
        checks: Vec<(&str, bool)>,
    ) -> Result<(), CliError> {
        let history = self.app.executions.history(&record.execution_id).await?;
        let failed: Vec<_> = checks.iter().filter(|(_, ok)| !ok).map(|(what, _)| *what).collect();
        self.failures += failed.len();
        if self.json {
            self.report.push(json!({
                "scenario": title, "execution": record, "checks": checks.iter().map(|(what, ok)| json!({"check": what, "ok": ok})).collect::<Vec<_>>()
            }));
            return Ok(());
        }
        println!("\n━━ {number}. {title}");
        println!("{}", outcome_text(record));
        println!("{}", history_table(&history, record.started_at));
        for (what, ok) in &checks {
            println!("  {} {what}", if *ok { "✔" } else { "✘ UNEXPECTED:" });
        }
        Ok(())
    }
}

fn parse(text: &str) -> Result<Value, CliError> {
    Ok(serde_json::from_str(text)?)
}

pub async fn run(json_output: bool) -> Result<i32, CliError> {
    let data_dir = std::env::temp_dir()
        .join(format!("agentpay-demo-{}", alloy_primitives::hex::encode(rand::random::<[u8; 4]>())));
    let app = LocalApp::open(
        &Config::local(&data_dir),
        &data_dir,
        Arc::new(SystemClock),
        Arc::new(ScaledSleeper(TIME_SCALE)),
    )
    .await?;
    let policy: SpendPolicy = serde_json::from_str(POLICY)?;
    app.store.put_policy(AGENT, &policy).await?;
    if !json_output {
        println!("agentpay demo — a fresh embedded store in {}", data_dir.display());
        if let Some(address) = &app.wallet_address {
            println!("dev wallet {address} (key in {}/dev-wallet.key, never printed)", data_dir.display());
        }
        println!("{}", crate::cli::policy_table(AGENT, &policy));
        println!("retry waits are the state machine's, scaled 1/{TIME_SCALE} for the demo");
    }
    let mut tour = Tour { app, json: json_output, report: vec![], failures: 0 };

    let paid = tour.app.run(parse(PAID_CALL)?).await?;
    let paid_id = paid.output.as_ref().map(|o| o["paymentId"].clone());
    tour.scenario(
        1,
        "A paid call: 0.50 USDC for a credit report",
        &paid,
        vec![
            ("execution succeeded", paid.status == ExecutionStatus::Succeeded),
            ("the wallet signed once", tour.app.provider.delegated_calls() == 1),
        ],
    )
    .await?;

    let duplicate = tour.app.run(parse(PAID_CALL)?).await?;
    let same = duplicate.output.as_ref().map(|o| o["paymentId"].clone()) == paid_id;
    let cached = duplicate.output.as_ref().is_some_and(|o| o["fromCache"] == true);
    tour.scenario(
        2,
        "The agent retries the same request (same idempotency key)",
        &duplicate,
        vec![
            ("same payment returned from the idempotency cache", same && cached),
            ("nothing paid again: still one wallet signature", tour.app.provider.delegated_calls() == 1),
        ],
    )
    .await?;

    let over = tour.app.run(parse(OVER_DAILY_CAP)?).await?;
    tour.scenario(
        3,
        "0.60 USDC more would pass the 1.00 USD rolling 24 h cap",
        &over,
        vec![
            ("denied with SpendLimitExceeded", over.error.as_ref().is_some_and(|e| e.error == "SpendLimitExceeded")),
            ("compensated: the key is DENIED, nothing reserved", over.failed_state.as_deref() == Some("PaymentFailed")),
        ],
    )
    .await?;

    let invalid = tour.app.run(parse(INVALID_CHALLENGE)?).await?;
    let precise = invalid
        .error
        .as_ref()
        .is_some_and(|e| e.error == "InvalidPaymentRequest" && e.cause.contains("accepts[0].payTo"));
    tour.scenario(
        4,
        "A challenge whose payTo has a broken EIP-55 checksum",
        &invalid,
        vec![
            ("rejected with InvalidPaymentRequest naming accepts[0].payTo", precise),
            ("no idempotency record, no reservation", invalid.failed_state.as_deref() == Some("PaymentRejected")),
        ],
    )
    .await?;

    tour.app.provider.fail_next(ProviderFault::Rejected, 1);
    let down = tour.app.run(parse(PROVIDER_FAILURE)?).await?;
    let released = tour
        .app
        .store
        .reservations(AGENT)
        .await?
        .iter()
        .any(|r| r.idempotency_key == "demo-provider-down-1" && r.status == ReservationStatus::Released);
    tour.scenario(
        5,
        "The payment provider refuses (insufficient funds): a definite refusal, compensated",
        &down,
        vec![
            (
                "failed with ProviderRejected, not retried",
                down.error.as_ref().is_some_and(|e| e.error == "ProviderRejected"),
            ),
            ("reservation released by Compensate", released),
        ],
    )
    .await?;

    tour.app.ledger.fail_next_authorizations(5);
    let ledger_down = tour.app.run(parse(LEDGER_FAILURE)?).await?;
    tour.scenario(
        6,
        "The ledger write fails after the proof was issued: no compensation",
        &ledger_down,
        vec![("failed in RecordLedger, awaiting redrive", ledger_down.failed_state.as_deref() == Some("RecordLedger"))],
    )
    .await?;
    let redriven = tour.app.runner.redrive(&ledger_down.execution_id).await?;
    let wallet_calls = tour.app.provider.delegated_calls();
    tour.scenario(
        7,
        "Redrive: resumes at RecordLedger with the same input",
        &redriven,
        vec![
            ("execution succeeded on redrive", redriven.status == ExecutionStatus::Succeeded),
            ("no step before RecordLedger ran again (2 signatures in all)", wallet_calls == 2),
        ],
    )
    .await?;

    // The proof is issued, but every answer is lost (a time-out after the provider signed).
    tour.app.provider.fail_next(ProviderFault::OutcomeUnknownAfterProof, 4);
    let held = tour.app.run(parse(PROVIDER_TIMEOUT)?).await?;
    let key_statuses = |reservations: Vec<agentpay::store::Reservation>| -> Vec<ReservationStatus> {
        reservations.iter().filter(|r| r.idempotency_key == "demo-provider-timeout-1").map(|r| r.status).collect()
    };
    let counted = key_statuses(tour.app.store.reservations(AGENT).await?) == [ReservationStatus::Reserved];
    tour.scenario(
        8,
        "The provider times out after signing: the outcome is unknown, so it is held, not compensated",
        &held,
        vec![
            (
                "failed with PaymentOutcomeUnknown after retrying with the same client token",
                held.error.as_ref().is_some_and(|e| e.error == "PaymentOutcomeUnknown"),
            ),
            ("the reservation stays counted against the cap", counted),
        ],
    )
    .await?;
    let calls_before = tour.app.provider.delegated_calls();
    let replay = tour
        .app
        .client()
        .replay(&held.execution_id, tour.app.steps.clock().now(), agentpay::client::ReplayOptions::default())
        .await?;
    let resolved = tour.app.executions.execution(&replay.result.map(|r| r.execution_arn).unwrap_or_default()).await?;
    let authorized = key_statuses(tour.app.store.reservations(AGENT).await?) == [ReservationStatus::Authorized];
    if let Some(resolved) = resolved {
        tour.scenario(
            9,
            "Replay of the key: a new execution adopts the held claim and asks again with the same token",
            &resolved,
            vec![
                ("succeeded with the proof the provider had issued", resolved.status == ExecutionStatus::Succeeded),
                (
                    "one provider call, the same reservation, now AUTHORIZED",
                    authorized && tour.app.provider.delegated_calls() == calls_before + 1,
                ),
            ],
        )
        .await?;
    } else {
        tour.failures += 1;
        println!("  ✘ UNEXPECTED: the replay started no execution");
    }

    if json_output {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"dataDir": data_dir, "scenarios": tour.report, "unexpected": tour.failures})
            )?
        );
    } else {
        println!("\n━━ The ledger of {AGENT} after the tour");
        let reservations = tour.app.store.reservations(AGENT).await?;
        let audit = tour.app.store.audit_events(AGENT).await?;
        for r in &reservations {
            println!(
                "  {:<10} {:>5} USDC  key {}",
                r.status.as_str(),
                r.amount.display_with_decimals(6),
                r.idempotency_key
            );
        }
        println!(
            "  {} audit events; inspect with: agentpay --data-dir {} ledger show {AGENT}",
            audit.len(),
            data_dir.display()
        );
        if tour.failures == 0 {
            println!("\nall 9 scenarios behaved as expected");
        } else {
            println!("\n{} check(s) did not behave as expected", tour.failures);
        }
    }
    Ok(if tour.failures == 0 { 0 } else { 1 })
}
