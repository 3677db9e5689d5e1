//! `agentpay start/status/list/history/replay`: the client's commands, on either backend.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use comfy_table::Table;
use serde_json::{Value, json};

use crate::cli::{BackendKind, Cli, CliError, Command, new_table};
use agentpay::client::entry_point::EntryPointStarter;
use agentpay::client::sfn::SfnBackend;
use agentpay::client::{
    Execution, ListFilter, PaymentAnswer, PaymentClient, Replay, ReplayAction, ReplayOptions, StepEvent, WaitOptions,
};
use agentpay::clock::{Clock, SystemClock};

pub(crate) async fn client(cli: &Cli) -> Result<PaymentClient, CliError> {
    Ok(match cli.backend {
        BackendKind::Local => {
            let app = cli.open_app().await?;
            // Nothing runs between commands locally: fire the approval time-outs that passed,
            // so `status` and `list` show what Step Functions would.
            app.runner.expire_waits().await?;
            app.client()
        }
        BackendKind::Aws => {
            let arn = cli.state_machine_arn.clone().ok_or(
                "--backend aws needs the state machine: --state-machine-arn or AGENTPAY_STATE_MACHINE_ARN (the stack output PaymentStateMachineArn)",
            )?;
            let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let mut backend = SfnBackend::new(aws_sdk_sfn::Client::new(&aws), arn);
            if let Some(url) = &cli.entry_point_url {
                backend = backend.with_entry_point(EntryPointStarter::new(url, &aws)?);
            }
            PaymentClient::new(Box::new(backend))
        }
    })
}

fn wait_options(timeout_seconds: u64) -> WaitOptions {
    WaitOptions { timeout: Duration::from_secs(timeout_seconds), ..WaitOptions::default() }
}

pub async fn run(cli: &Cli) -> Result<i32, CliError> {
    let client = client(cli).await?;
    let print_json = |value: Value| -> Result<(), CliError> {
        println!("{}", serde_json::to_string_pretty(&value)?);
        Ok(())
    };
    match &cli.command {
        Command::Start { file, wait, timeout_seconds, .. } => {
            let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let input: Value =
                serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", file.display()))?;
            let started = client.start(&input, wait.then(|| wait_options(*timeout_seconds))).await?;
            if cli.json {
                print_json(serde_json::to_value(&started)?)?;
            } else {
                if started.already_existed {
                    println!(
                        "execution {} existed already for this idempotency key: describing it",
                        started.execution.name
                    );
                }
                println!("{}", execution_text(&started.execution));
            }
            Ok(answer_code(&started.answer))
        }
        Command::Status { id } => {
            let execution = client.status(id).await?;
            if cli.json {
                print_json(json!({"execution": execution, "answer": execution.answer()}))?;
            } else {
                println!("{}", execution_text(&execution));
            }
            Ok(answer_code(&execution.answer()))
        }
        Command::List { status, agent, since, until, limit } => {
            let filter = ListFilter {
                status: status.clone(),
                agent_id: agent.clone(),
                since: *since,
                until: *until,
                limit: *limit,
            };
            let executions = client.list(&filter).await?;
            if cli.json {
                print_json(serde_json::to_value(&executions)?)?;
            } else {
                println!("{}", executions_table(&executions));
            }
            Ok(0)
        }
        Command::History { id } => {
            let events = client.history(id).await?;
            if cli.json {
                print_json(serde_json::to_value(&events)?)?;
            } else {
                println!("{}", history_table(&events));
            }
            Ok(0)
        }
        Command::Replay { id, all, since, until, fresh, dry_run, wait, .. } => {
            let options = ReplayOptions { fresh: *fresh, dry_run: *dry_run, wait: wait.then(|| wait_options(60)) };
            let now = SystemClock.now();
            let replays = if *all {
                let filter = ListFilter { since: *since, until: *until, ..ListFilter::default() };
                let mut bar = Progress::new(cli.json);
                let replays = client
                    .replay_all(&filter, now, options, |done, total, replay| bar.tick(done, total, replay))
                    .await?;
                bar.finish();
                replays
            } else {
                vec![client.replay(id.as_deref().unwrap_or_default(), now, options).await?]
            };
            if cli.json {
                print_json(json!({"replays": replays, "summary": summary(&replays)}))?;
            } else {
                println!("{}", replays_table(&replays));
                println!("{}", summary_table(&replays));
            }
            let failed =
                replays.iter().any(|r| r.result.as_ref().is_some_and(|e| e.status != "SUCCEEDED" && e.is_closed()));
            Ok(i32::from(failed))
        }
        _ => unreachable!("only client commands are routed here"),
    }
}

/// 0 paid, 1 failed or denied, 2 still running.
fn answer_code(answer: &PaymentAnswer) -> i32 {
    match answer {
        PaymentAnswer::Paid { .. } | PaymentAnswer::Shadow { .. } => 0,
        PaymentAnswer::Denied { .. } | PaymentAnswer::Failed { .. } => 1,
        PaymentAnswer::Running | PaymentAnswer::AwaitingApproval { .. } => 2,
    }
}

pub fn execution_text(execution: &Execution) -> String {
    let mut text =
        format!("execution {}\n  arn     {}\n  status  {}", execution.name, execution.execution_arn, execution.status);
    if execution.redrive_count > 0 {
        text.push_str(&format!(" (redriven {}×)", execution.redrive_count));
    }
    match execution.answer() {
        PaymentAnswer::Paid { header, payment_id, from_cache } => {
            let cached = if from_cache { " (from the idempotency cache)" } else { "" };
            text.push_str(&format!(
                "\n  payment {payment_id}{cached}\n  next    retry the request with header {}: {}",
                header.name, header.value
            ));
        }
        PaymentAnswer::Denied { error, cause } => text.push_str(&format!("\n  denied  {error}: {cause}")),
        PaymentAnswer::Failed { error, cause } => {
            text.push_str(&format!("\n  failed  {error}: {cause}"));
            if error == "PaymentOutcomeUnknown" {
                text.push_str(&format!(
                    "\n  next    a proof may exist and still counts: `agentpay replay {}` asks the provider again with the same client token",
                    execution.name
                ));
            } else {
                text.push_str(&format!(
                    "\n  next    `agentpay replay {}` resumes it at the state that failed",
                    execution.name
                ));
            }
        }
        PaymentAnswer::Shadow { decision, from_cache } => {
            let cached = if from_cache { " (from the idempotency cache)" } else { "" };
            text.push_str(&format!(
                "\n  shadow  {}{cached}\n  next    nothing was paid: the agent is in shadow mode (`agentpay policy mode AGENT enforce` to pay)",
                decision.describe()
            ));
        }
        PaymentAnswer::Running => text.push_str("\n  next    poll `agentpay status` (still running)"),
        PaymentAnswer::AwaitingApproval { approval_id } => text.push_str(&format!(
            "\n  waits   for a person: approval {approval_id} (reserved; `agentpay approvals show {approval_id}`, then `agentpay approve` or `reject`)"
        )),
    }
    text
}

fn executions_table(executions: &[Execution]) -> Table {
    let mut table = new_table(&["started", "name", "status", "agent", "error", "redrives"]);
    for execution in executions {
        table.add_row(vec![
            execution.started_at.to_rfc3339(),
            execution.name.clone(),
            execution.status.clone(),
            execution.agent_id().unwrap_or_default().to_owned(),
            execution.error.clone().unwrap_or_default(),
            execution.redrive_count.to_string(),
        ]);
    }
    table
}

fn history_table(events: &[StepEvent]) -> Table {
    let mut table = new_table(&["#", "at", "state", "event", "detail"]);
    for event in events {
        let detail = if let Some(error) = event.detail.get("error") {
            format!("{}: {}", error.as_str().unwrap_or_default(), event.detail["cause"].as_str().unwrap_or_default())
        } else if let Some(output) = event.detail.get("output") {
            short(&output.to_string())
        } else if let Some(input) = event.detail.get("input") {
            short(&input.to_string())
        } else {
            String::new()
        };
        table.add_row(vec![
            event.id.to_string(),
            event.at.to_rfc3339(),
            event.state.clone().unwrap_or_default(),
            event.kind.clone(),
            detail,
        ]);
    }
    table
}

fn short(text: &str) -> String {
    if text.chars().count() <= 100 {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(100).collect::<String>())
    }
}

fn action_name(action: ReplayAction) -> String {
    serde_json::to_value(action).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn replays_table(replays: &[Replay]) -> Table {
    let mut table = new_table(&["execution", "action", "now", "reason"]);
    for replay in replays {
        table.add_row(vec![
            replay.execution_arn.rsplit(':').next().unwrap_or_default().to_owned(),
            action_name(replay.action),
            replay.result.as_ref().map(|e| e.status.clone()).unwrap_or_default(),
            replay.reason.clone().unwrap_or_default(),
        ]);
    }
    table
}

fn summary(replays: &[Replay]) -> Value {
    let mut counts = serde_json::Map::new();
    for replay in replays {
        let name = action_name(replay.action);
        let count = counts.get(&name).and_then(Value::as_u64).unwrap_or(0) + 1;
        counts.insert(name, json!(count));
    }
    let succeeded = replays.iter().filter(|r| r.result.as_ref().is_some_and(|e| e.status == "SUCCEEDED")).count();
    json!({"total": replays.len(), "byAction": counts, "succeededAfterReplay": succeeded})
}

fn summary_table(replays: &[Replay]) -> Table {
    let summary = summary(replays);
    let mut table = new_table(&["replayed", "count"]);
    table.add_row(vec!["total".to_owned(), summary["total"].to_string()]);
    for (action, count) in summary["byAction"].as_object().into_iter().flatten() {
        table.add_row(vec![action.to_lowercase(), count.to_string()]);
    }
    table.add_row(vec!["succeeded after replay".to_owned(), summary["succeededAfterReplay"].to_string()]);
    table
}

/// A progress bar on a terminal; a line per tenth of the work otherwise (never on stdout).
struct Progress {
    quiet: bool,
    terminal: bool,
    last_tenth: usize,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        Self { quiet, terminal: std::io::stderr().is_terminal(), last_tenth: 0 }
    }

    fn tick(&mut self, done: usize, total: usize, replay: &Replay) {
        if self.quiet || total == 0 {
            return;
        }
        let mut err = std::io::stderr();
        if self.terminal {
            let width = 30;
            let filled = done * width / total;
            let _ = write!(
                err,
                "\r[{}{}] {done}/{total} {}",
                "#".repeat(filled),
                ".".repeat(width - filled),
                action_name(replay.action)
            );
        } else if done * 10 / total > self.last_tenth || done == total {
            self.last_tenth = done * 10 / total;
            let _ = writeln!(err, "replayed {done}/{total}");
        }
    }

    fn finish(&self) {
        if self.terminal && !self.quiet {
            let _ = writeln!(std::io::stderr());
        }
    }
}
