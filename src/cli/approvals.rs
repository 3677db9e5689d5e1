//! `agentpay approvals list|show`, `approve`, `reject`: operators answer payments that wait
//! for a person, on either backend.

use std::sync::Arc;

use serde_json::json;

use crate::cli::{ApprovalsCommand, BackendKind, Cli, CliError, Command, new_table};
use agentpay::approval::Decision;
use agentpay::approvals::{Approvals, LocalAnswers, SfnAnswers};
use agentpay::clock::{Clock, SystemClock};
use agentpay::store::ApprovalRecord;
use agentpay::store::dynamodb::DynamoStore;

/// The approvals service for the backend, and who the operator is.
async fn service(cli: &Cli) -> Result<(Approvals, String), CliError> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    match cli.backend {
        BackendKind::Local => {
            let app = cli.open_app().await?;
            // Nothing runs between commands locally: fire the time-outs that passed.
            let expired = app.runner.expire_waits().await?;
            if expired > 0 {
                eprintln!(
                    "{expired} approvals timed out since the last command: their payments were compensated (ApprovalTimedOut)"
                );
            }
            let answers = Arc::new(LocalAnswers(app.runner.clone()));
            Ok((Approvals::new(app.store.clone(), answers, clock), local_user()))
        }
        BackendKind::Aws => {
            let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let approver = caller_arn(&aws).await?;
            let store = Arc::new(DynamoStore::from_sdk_config(&aws, cli.tables()));
            let answers = Arc::new(SfnAnswers(aws_sdk_sfn::Client::new(&aws)));
            Ok((Approvals::new(store, answers, clock), approver))
        }
    }
}

/// Who runs this command, for the records it writes: the IAM principal of the credentials
/// (sts:GetCallerIdentity) with `--backend aws`, the local user otherwise.
pub(crate) async fn operator(cli: &Cli) -> Result<String, CliError> {
    match cli.backend {
        BackendKind::Local => Ok(local_user()),
        BackendKind::Aws => {
            let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            caller_arn(&aws).await
        }
    }
}

async fn caller_arn(aws: &aws_config::SdkConfig) -> Result<String, CliError> {
    let identity = aws_sdk_sts::Client::new(aws).get_caller_identity().send().await.map_err(|e| {
        format!("cannot tell who you are (sts:GetCallerIdentity): {}", agentpay::error::error_chain(&e))
    })?;
    Ok(identity.arn().ok_or("sts:GetCallerIdentity returned no ARN")?.to_owned())
}

/// Locally the approver is the operating-system user.
fn local_user() -> String {
    let user = std::env::var("USER").or_else(|_| std::env::var("USERNAME")).unwrap_or_else(|_| "unknown".into());
    format!("local:{user}")
}

pub async fn run(cli: &Cli) -> Result<i32, CliError> {
    let (approvals, approver) = service(cli).await?;
    let now = SystemClock.now();
    let shown = match &cli.command {
        Command::Approvals(ApprovalsCommand::List) => {
            let list = approvals.list().await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no approvals in the last three days");
            } else {
                let mut table = new_table(&["approval", "status", "agent", "amount", "payee", "requested", "why"]);
                for a in &list {
                    table.add_row(vec![
                        a.id.clone(),
                        a.status_at(now).to_owned(),
                        a.agent_id.clone(),
                        a.display.clone(),
                        a.payee.clone(),
                        a.requested_at.to_rfc3339(),
                        a.reason.clone(),
                    ]);
                }
                println!("{table}");
            }
            return Ok(0);
        }
        Command::Approvals(ApprovalsCommand::Show { id }) => approvals.show(id).await?,
        Command::Approve { id } => approvals.decide(id, Decision::Approve, &approver).await?,
        Command::Reject { id, reason } => {
            approvals.decide(id, Decision::Reject { reason: reason.clone() }, &approver).await?
        }
        _ => unreachable!("only approval commands are routed here"),
    };
    print_approval(cli.json, &shown, now)?;
    Ok(0)
}

fn print_approval(as_json: bool, a: &ApprovalRecord, now: agentpay::clock::Timestamp) -> Result<(), CliError> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(&json!({"approval": a, "status": a.status_at(now)}))?);
        return Ok(());
    }
    let mut table = new_table(&["approval", "value"]);
    let limits = format!(
        "per transaction {} · 24 h cap {} (spent {} with this payment) · {} per hour (atomic units)",
        a.limits.per_transaction_limit,
        a.limits.daily_limit,
        a.limits.spent_24h_after,
        a.limits.max_transactions_per_hour
    );
    for (name, value) in [
        ("id", a.id.clone()),
        ("status", a.status_at(now).to_owned()),
        ("agent", a.agent_id.clone()),
        ("amount", a.display.clone()),
        ("payee", a.payee.clone()),
        ("resource", a.resource.clone()),
        ("why it waits", a.reason.clone()),
        (
            "agent's reason",
            format!("{} (delegated by {}, scope {})", a.context.decision, a.context.delegated_by, a.context.scope),
        ),
        ("caller", a.caller_arn.clone().unwrap_or_else(|| "(none verified)".into())),
        ("limits", limits),
        ("requested", a.requested_at.to_rfc3339()),
        ("times out", a.expires_at.to_rfc3339()),
        ("decided by", a.decided_by.clone().unwrap_or_default()),
        ("decided at", a.decided_at.map(|t| t.to_rfc3339()).unwrap_or_default()),
        ("reason given", a.decision_reason.clone().unwrap_or_default()),
        ("execution", a.execution_id.clone()),
    ] {
        table.add_row(vec![name.to_owned(), value]);
    }
    println!("{table}");
    Ok(())
}
