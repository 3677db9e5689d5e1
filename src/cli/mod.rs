//! The `agentpay` command line: run and inspect payment executions on the local runner.

mod approvals;
mod aws;
mod demo;
mod export;

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use serde_json::{Value, json};

use agentpay::agentcore::{AgentCorePolicy, AgentCoreSelection, SessionExpiry, check_manager_arn, check_resource_id};
use agentpay::asl::{ScaledSleeper, Sleeper, TokioSleeper};
use agentpay::clock::{Clock, SystemClock, Timestamp};
use agentpay::config::Config;
use agentpay::executions::{ExecutionRecord, HistoryEvent, HistoryKind};
use agentpay::local::LocalApp;
use agentpay::money::UsdAmount;
use agentpay::payment::{Network, parse_address};
use agentpay::policy::SpendPolicy;
use agentpay::provider::agentcore::AgentCoreProvider;
use agentpay::request::{AgentId, UserId, derived_id};
use agentpay::store::dynamodb::{DynamoStore, TableNames, create_table, schema};
use agentpay::store::{PolicyChange, PolicyEdit, PolicyEdited};

#[derive(Debug, Parser)]
#[command(
    name = "agentpay",
    version,
    about = "Auditable, resumable agent payments (x402): the local runner, or the deployed workflow with --backend aws"
)]
pub struct Cli {
    /// Where the embedded store and the dev wallet key live.
    #[arg(long, global = true, env = "AGENTPAY_DATA_DIR", default_value = ".agentpay")]
    pub data_dir: PathBuf,
    /// Machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Where payments, the ledger and idempotency records live. Execution history stays in
    /// the data dir either way. DynamoDB uses the standard AWS configuration chain
    /// (`AWS_ENDPOINT_URL_DYNAMODB` for a local server).
    #[arg(long, global = true, value_enum, default_value_t = StoreKind::Sqlite)]
    pub store: StoreKind,
    #[arg(long, global = true, env = "AGENTPAY_IDEMPOTENCY_TABLE", default_value = "agentpay-idempotency")]
    pub idempotency_table: String,
    #[arg(long, global = true, env = "AGENTPAY_LEDGER_TABLE", default_value = "agentpay-ledger")]
    pub ledger_table: String,
    /// Who signs payment proofs: the local dev wallet, or AgentCore Payments through the
    /// standard AWS configuration chain (`AWS_ENDPOINT_URL_BEDROCK_AGENTCORE` for a local endpoint).
    #[arg(long, global = true, value_enum, default_value_t = ProviderKind::DevWallet)]
    pub provider: ProviderKind,
    /// Where `start/status/list/history/replay` act: the local runner, or AWS Step Functions
    /// (standard AWS configuration chain; `AWS_ENDPOINT_URL_SFN` for a local endpoint).
    #[arg(long, global = true, value_enum, default_value_t = BackendKind::Local)]
    pub backend: BackendKind,
    /// The payment state machine (`--backend aws`).
    #[arg(long, global = true, env = "AGENTPAY_STATE_MACHINE_ARN")]
    pub state_machine_arn: Option<String>,
    /// With `--backend aws`: start payments through the entry point (the stack output
    /// StartPaymentUrl), signed with your AWS credentials, as agents do; without it `start`
    /// calls StartExecution, which the template allows operators only.
    #[arg(long, global = true, env = "AGENTPAY_ENTRY_POINT_URL")]
    pub entry_point_url: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Local,
    Aws,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    DevWallet,
    Agentcore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Sqlite,
    Dynamodb,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Former name of `start FILE --wait` (one vocabulary for both backends).
    #[command(hide = true)]
    Run {
        file: PathBuf,
        #[arg(long)]
        fast_retries: bool,
    },
    /// Former names of `list` and `status`.
    #[command(subcommand, hide = true)]
    Executions(ExecutionsCommand),
    /// Former name of `replay ID --wait`.
    #[command(hide = true)]
    Redrive {
        id: String,
        #[arg(long)]
        fast_retries: bool,
    },
    /// Show an agent's ledger: policy, spend in the rolling window, reservations, audit trail.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Set, show, pause or resume an agent's spend policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Payments waiting for a person (human approval): list them, show one.
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Approve a payment waiting for a person: its execution goes on to pay. Recorded with who
    /// you are (your IAM principal with --backend aws, the local user locally).
    Approve { id: String },
    /// Reject a payment waiting for a person: its reservation is released and its key DENIED
    /// (ApprovalRejected, with who rejected it and why).
    Reject {
        id: String,
        /// Why (recorded and shown to the agent's operators), up to 500 characters.
        #[arg(long)]
        reason: String,
    },
    /// Record what the merchant answered after the payment (its settlement): the ledger moves
    /// the payment forward (SETTLED, SETTLEMENT_PENDING, SETTLEMENT_FAILED) and keeps it
    /// counted; a report that contradicts the payment is refused and audited.
    Settle(Box<SettleArgs>),
    /// Follow payments past their proof: every expired authorization is checked on the chain
    /// (AGENTPAY_RPC_URLS="eip155:84532=https://..."): used ones are SETTLED, unused ones VOIDED
    /// and their budget released; with no endpoint, AUTHORIZED ones become EXPIRED_UNCONFIRMED
    /// and stay counted. Then a summary per agent: counts and sums per state.
    Reconcile {
        /// One agent (default: every agent with a policy).
        #[arg(long)]
        agent: Option<String>,
        /// Say what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// A scripted tour on a fresh embedded store: every path of the workflow.
    Demo,
    /// Create the DynamoDB tables (for `--store dynamodb` against a local endpoint).
    #[command(subcommand)]
    Tables(TablesCommand),
    /// AgentCore Payments operations (standard AWS configuration chain).
    #[command(subcommand)]
    Agentcore(AgentcoreCommand),
    /// Start the payment execution for an input file, named after its idempotency key; an
    /// existing execution of the same input is described instead.
    Start {
        file: PathBuf,
        /// Wait for the outcome (bounded polling with backoff).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 60)]
        timeout_seconds: u64,
        /// Local runner: wait 1/100 of the ASL's retry intervals (to try failure paths by hand).
        #[arg(long)]
        fast_retries: bool,
    },
    /// Describe one execution (ARN or name) and what the agent does next.
    Status { id: String },
    /// List executions, newest first.
    List {
        /// RUNNING, SUCCEEDED, FAILED, TIMED_OUT, ABORTED, PENDING_REDRIVE.
        #[arg(long, value_parser = parse_status)]
        status: Option<String>,
        #[arg(long)]
        agent: Option<String>,
        /// RFC 3339 time, e.g. 2026-11-21T00:00:00Z.
        #[arg(long, value_parser = parse_time)]
        since: Option<Timestamp>,
        #[arg(long, value_parser = parse_time)]
        until: Option<Timestamp>,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// The steps of one execution with their inputs, outputs and errors.
    History { id: String },
    /// Redrive a failed execution (or, with --all, every failed one in a time range); on the
    /// local runner, also resume a RUNNING execution whose process died.
    Replay {
        /// Execution ARN or name; omit with --all.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
        #[arg(long, value_parser = parse_time)]
        since: Option<Timestamp>,
        #[arg(long, value_parser = parse_time)]
        until: Option<Timestamp>,
        /// When redrive is impossible, start a new execution with the same input.
        #[arg(long)]
        fresh: bool,
        /// Show what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Wait for each replayed execution to finish.
        #[arg(long)]
        wait: bool,
        /// Local runner: wait 1/100 of the ASL's retry intervals.
        #[arg(long)]
        fast_retries: bool,
    },
}

impl Command {
    /// The one vocabulary: a former command name becomes the command it now is (said on
    /// stderr, so scripts that parse stdout keep working).
    fn canonical(self) -> Command {
        let renamed = |old: &str, new: &str| eprintln!("note: `agentpay {old}` is `agentpay {new}` now");
        match self {
            Command::Run { file, fast_retries } => {
                renamed("run FILE", "start FILE --wait");
                Command::Start { file, wait: true, timeout_seconds: 60, fast_retries }
            }
            Command::Executions(ExecutionsCommand::List { status, agent, limit }) => {
                renamed("executions list", "list");
                Command::List { status, agent, since: None, until: None, limit: usize::try_from(limit).ok() }
            }
            Command::Executions(ExecutionsCommand::Describe { id }) => {
                renamed("executions describe ID", "status ID (and history ID)");
                Command::Status { id }
            }
            Command::Redrive { id, fast_retries } => {
                renamed("redrive ID", "replay ID --wait");
                Command::Replay {
                    id: Some(id),
                    all: false,
                    since: None,
                    until: None,
                    fresh: false,
                    dry_run: false,
                    wait: true,
                    fast_retries,
                }
            }
            other => other,
        }
    }

    /// Whether the local runner should shorten retry waits.
    pub fn fast_retries(&self) -> bool {
        matches!(self, Command::Start { fast_retries: true, .. } | Command::Replay { fast_retries: true, .. })
    }
}

fn parse_status(text: &str) -> Result<String, String> {
    const STATUSES: [&str; 6] = ["RUNNING", "SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED", "PENDING_REDRIVE"];
    let upper = text.to_ascii_uppercase();
    if STATUSES.contains(&upper.as_str()) {
        Ok(upper)
    } else {
        Err(format!("expected one of {}, got {text:?}", STATUSES.join(", ")))
    }
}

fn parse_time(text: &str) -> Result<Timestamp, String> {
    Timestamp::parse_rfc3339(text)
        .ok_or_else(|| format!("expected an RFC 3339 time such as 2026-11-21T00:00:00Z, got {text:?}"))
}

#[derive(Debug, Subcommand)]
pub enum AgentcoreCommand {
    /// Create a payment session for an agent's user, with an expiry and an optional budget.
    CreateSession {
        #[arg(long, value_parser = |s: &str| check_manager_arn(s).map(|()| s.to_owned()).map_err(|e| format!("expected {e}")))]
        manager_arn: String,
        #[arg(long)]
        user_id: String,
        #[arg(long)]
        agent: String,
        /// 15 to 480 minutes.
        #[arg(long, default_value_t = 60)]
        expiry_minutes: i64,
        /// Session budget in USD, e.g. 5.00.
        #[arg(long)]
        max_spend_usd: Option<UsdAmount>,
        /// Makes a retried create return the same session (default: derived from the other arguments).
        #[arg(long)]
        client_token: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TablesCommand {
    Create,
}

#[derive(Debug, Subcommand)]
pub enum ExecutionsCommand {
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        agent: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    Describe {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// The approvals of the last three days, newest first (pending ones first to answer).
    List,
    /// One approval: the payment, why it waits, the limits, the decision.
    Show { id: String },
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    Show {
        agent: String,
    },
    /// One row per payment for accounting: its business context, states and timestamps
    /// (stable columns, see the README).
    Export {
        agent: String,
        /// Payments created since: a duration back from now (`30d`, `12h`) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, value_enum, default_value = "csv")]
        format: ExportFormat,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    Csv,
    Jsonl,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("answer").required(true).args(["payment_response", "x_payment_response", "payment_receipt"])))]
pub struct SettleArgs {
    /// The payment's idempotency key.
    pub key: String,
    /// The agent that paid.
    #[arg(long)]
    pub agent: String,
    /// The x402 v2 `PAYMENT-RESPONSE` header value, as received.
    #[arg(long)]
    pub payment_response: Option<String>,
    /// The x402 v1 `X-PAYMENT-RESPONSE` header value.
    #[arg(long)]
    pub x_payment_response: Option<String>,
    /// The MPP `Payment-Receipt` header value.
    #[arg(long)]
    pub payment_receipt: Option<String>,
}

impl SettleArgs {
    fn input(&self) -> agentpay::settlement::ReportInput {
        use agentpay::settlement::ReportInput;
        match (&self.payment_response, &self.x_payment_response, &self.payment_receipt) {
            (Some(value), _, _) => ReportInput::X402V2(value.clone()),
            (_, Some(value), _) => ReportInput::X402V1(value.clone()),
            (_, _, value) => ReportInput::MppReceipt(value.clone().unwrap_or_default()),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Set the policy from a JSON file or from flags. A paused agent stays paused: only
    /// `policy resume` resumes it.
    Set(Box<PolicySetArgs>),
    Show {
        agent: String,
    },
    /// Kill switch: deny every payment of the agent (or of every agent), including payments
    /// already past the spend check that have not reached the provider.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["agent", "all"])))]
    Pause {
        agent: Option<String>,
        /// Every agent that has a policy.
        #[arg(long)]
        all: bool,
        /// Why (kept in the agent's policy history with who and when).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Replay the agent's recorded requests (paid, denied, waiting, shadow) in time order
    /// against a draft policy, with the workflow's own decision code over a simulated window:
    /// what would it have denied, sent to a person, flagged, let through? Changes nothing.
    Backtest {
        agent: String,
        /// The draft policy (JSON, as `policy set --file` takes it).
        #[arg(long)]
        file: PathBuf,
        /// How far back: 30d, 12h, 90m, or an RFC 3339 time (default: 30d).
        #[arg(long, default_value = "30d")]
        since: String,
    },
    /// Shadow mode (every payment decided and recorded, none paid) or enforce (payments made):
    /// an audited policy edit, like any other.
    Mode {
        agent: String,
        mode: ModeArg,
        /// Why (kept in the agent's policy history with who and when).
        #[arg(long)]
        reason: Option<String>,
    },
    #[command(group(clap::ArgGroup::new("which").required(true).args(["agent", "all"])))]
    Resume {
        agent: Option<String>,
        /// Every agent that has a policy.
        #[arg(long)]
        all: bool,
        /// Why (kept in the agent's policy history with who and when).
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    Enforce,
    Shadow,
}

impl From<ModeArg> for agentpay::policy::PolicyMode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::Enforce => agentpay::policy::PolicyMode::Enforce,
            ModeArg::Shadow => agentpay::policy::PolicyMode::Shadow,
        }
    }
}

#[derive(Debug, Args)]
pub struct PolicySetArgs {
    pub agent: String,
    /// Why (kept in the agent's policy history with who and when).
    #[arg(long)]
    pub reason: Option<String>,
    /// A policy JSON file (see events/policy-demo-agent.json); flags are then not allowed.
    #[arg(long, conflicts_with_all = ["per_transaction_usd", "daily_usd", "max_per_hour", "approval_threshold_usd", "network", "payee", "principal"])]
    pub file: Option<PathBuf>,
    #[arg(long, required_unless_present = "file")]
    pub per_transaction_usd: Option<UsdAmount>,
    /// `shadow`: decide and record every payment, pay none (default `enforce`).
    #[arg(long, value_enum, default_value = "enforce")]
    pub mode: ModeArg,
    #[arg(long, required_unless_present = "file")]
    pub daily_usd: Option<UsdAmount>,
    #[arg(long, required_unless_present = "file")]
    pub max_per_hour: Option<u32>,
    /// Payments above this wait for a person (`agentpay approve` / `reject`).
    #[arg(long)]
    pub approval_threshold_usd: Option<UsdAmount>,
    /// CAIP-2 network allowed (repeatable), e.g. eip155:84532.
    #[arg(long, required_unless_present = "file")]
    pub network: Vec<Network>,
    /// Payee allowed (repeatable); none means any payee.
    #[arg(long, value_parser = |s: &str| parse_address(s).map_err(|e| format!("expected {e}")))]
    pub payee: Vec<alloy_primitives::Address>,
    /// IAM role or user ARN that may pay as this agent (repeatable): on AWS the entry point's
    /// verified caller must be one of them.
    #[arg(long, value_parser = |s: &str| agentpay::identity::check_principal_arn(s).map(|()| s.to_owned()).map_err(|e| format!("expected {e}")))]
    pub principal: Vec<String>,
    /// AgentCore payment manager ARN used when the execution input does not name one.
    #[arg(long, value_parser = |s: &str| check_manager_arn(s).map(|()| s.to_owned()).map_err(|e| format!("expected {e}")))]
    pub agentcore_manager_arn: Option<String>,
    /// AgentCore payment session id used when the execution input does not name one.
    #[arg(long, value_parser = |s: &str| check_resource_id(s).map(|()| s.to_owned()).map_err(|e| format!("expected {e}")))]
    pub agentcore_session_id: Option<String>,
    /// AgentCore payment instrument id used when the execution input does not name one.
    #[arg(long, value_parser = |s: &str| check_resource_id(s).map(|()| s.to_owned()).map_err(|e| format!("expected {e}")))]
    pub agentcore_instrument_id: Option<String>,
    /// Let AgentCore charge MPP network fees to the wallet when a challenge does not sponsor them.
    #[arg(long)]
    pub buyer_pays_gas_fees: bool,
    /// Read the AgentCore session before paying; deny without a wallet operation when it is
    /// expired or its budget is short.
    #[arg(long)]
    pub check_session_first: bool,
}

/// A failure of the CLI itself, shown as `error: ...` with its causes.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

struct Context {
    app: LocalApp,
    json: bool,
}

impl Cli {
    fn tables(&self) -> TableNames {
        TableNames { idempotency: self.idempotency_table.clone(), ledger: self.ledger_table.clone() }
    }

    fn config(&self) -> Config {
        let mut config = match self.store {
            StoreKind::Sqlite => Config::local(&self.data_dir),
            StoreKind::Dynamodb => Config::local_dynamo(&self.data_dir, self.tables()),
        };
        if self.provider == ProviderKind::Agentcore {
            config.provider = agentpay::config::ProviderConfig::AgentCore;
        }
        config
    }

    pub(crate) async fn open_app(&self) -> Result<LocalApp, CliError> {
        Ok(self.open(self.command.fast_retries()).await?.app)
    }

    async fn open(&self, fast_retries: bool) -> Result<Context, CliError> {
        let sleeper: Arc<dyn Sleeper> =
            if fast_retries { Arc::new(ScaledSleeper(100)) } else { Arc::new(TokioSleeper) };
        let app = LocalApp::open(&self.config(), &self.data_dir, Arc::new(SystemClock), sleeper).await?;
        Ok(Context { app, json: self.json })
    }
}

/// Runs the command; the exit code is 0 on success, 1 when an execution failed.
pub async fn run(mut cli: Cli) -> Result<i32, CliError> {
    cli.command = cli.command.canonical();
    match &cli.command {
        Command::Ledger(LedgerCommand::Export { agent, since, format }) => {
            let ctx = cli.open(false).await?;
            let since = since.as_deref().map(|text| parse_since(text, SystemClock.now())).transpose()?;
            let rows = crate::cli::export::rows(&ctx.app.store, agent, since).await?;
            crate::cli::export::write(&rows, *format, std::io::stdout().lock())?;
            Ok(0)
        }
        Command::Ledger(LedgerCommand::Show { agent }) => {
            let ctx = cli.open(false).await?;
            print_ledger(&ctx, agent).await?;
            Ok(0)
        }
        Command::Policy(command) => {
            let ctx = cli.open(false).await?;
            let operator = crate::cli::approvals::operator(&cli).await?;
            policy_command(&ctx, command, &operator).await?;
            Ok(0)
        }
        Command::Demo => crate::cli::demo::run(cli.json).await,
        Command::Reconcile { agent, dry_run } => {
            let ctx = cli.open(false).await?;
            reconcile(&cli, &ctx, agent.as_deref(), *dry_run).await?;
            Ok(0)
        }
        Command::Settle(args) => {
            let ctx = cli.open(false).await?;
            let reporter = crate::cli::approvals::operator(&cli).await?;
            let settlements = agentpay::settlements::Settlements::new(ctx.app.store.clone(), Arc::new(SystemClock));
            AgentId::parse("--agent", &args.agent)?;
            let recorded = settlements.report(&args.agent, &args.key, &args.input(), &reporter).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&recorded)?);
            } else if recorded.already_recorded {
                println!(
                    "payment {} is {}: this report was recorded before, nothing changed",
                    args.key,
                    recorded.status.as_str()
                );
            } else {
                let tx =
                    recorded.report.transaction.as_deref().map(|tx| format!(", transaction {tx}")).unwrap_or_default();
                println!(
                    "payment {} is now {}{tx} (still counted against the agent's caps)",
                    args.key,
                    recorded.status.as_str()
                );
            }
            Ok(0)
        }
        Command::Approvals(_) | Command::Approve { .. } | Command::Reject { .. } => {
            crate::cli::approvals::run(&cli).await
        }
        Command::Agentcore(AgentcoreCommand::CreateSession {
            manager_arn,
            user_id,
            agent,
            expiry_minutes,
            max_spend_usd,
            client_token,
        }) => {
            // Checked before any AWS client is built.
            let expiry = SessionExpiry::minutes(*expiry_minutes)?;
            UserId::parse("--user-id", user_id)?;
            AgentId::parse("--agent", agent)?;
            let token = client_token.clone().unwrap_or_else(|| {
                let budget = max_spend_usd.map(|b| b.to_string()).unwrap_or_default();
                derived_id("session", &[manager_arn, user_id, agent, &expiry_minutes.to_string(), &budget])
            });
            let provider = AgentCoreProvider::from_env(Arc::new(SystemClock)).await;
            let selection = AgentCoreSelection { payment_manager_arn: Some(manager_arn.clone()), ..Default::default() };
            let session = provider.create_session(&selection, user_id, agent, expiry, *max_spend_usd, &token).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&session)?);
            } else {
                println!(
                    "created payment session {} (expires {} after {} minutes)",
                    session.payment_session_id,
                    session.expires_at.to_rfc3339(),
                    session.expiry_time_in_minutes
                );
            }
            Ok(0)
        }
        Command::Start { .. }
        | Command::Status { .. }
        | Command::List { .. }
        | Command::History { .. }
        | Command::Replay { .. } => crate::cli::aws::run(&cli).await,
        Command::Run { .. } | Command::Executions(_) | Command::Redrive { .. } => {
            unreachable!("Command::canonical renames the former commands")
        }
        Command::Tables(TablesCommand::Create) => {
            let store = DynamoStore::from_env(cli.tables()).await;
            for (name, schema) in [(&cli.idempotency_table, schema::IDEMPOTENCY), (&cli.ledger_table, schema::LEDGER)] {
                create_table(store.client(), name, schema).await?;
                println!("created table {name} ({})", schema.logical_id);
            }
            Ok(0)
        }
    }
}

/// A change of `agent`'s policy by `operator`, kept in its policy history.
fn change(edit: PolicyEdit, operator: &str, reason: Option<&String>, expected_version: Option<u64>) -> PolicyChange {
    PolicyChange { edit, by: operator.to_owned(), reason: reason.cloned(), at: SystemClock.now(), expected_version }
}

async fn policy_command(ctx: &Context, command: &PolicyCommand, operator: &str) -> Result<(), CliError> {
    let store = &ctx.app.store;
    let (agent, policy) = match command {
        PolicyCommand::Set(args) => {
            let policy = match &args.file {
                Some(file) => {
                    let text =
                        std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                    let policy =
                        serde_json::from_str::<SpendPolicy>(&text).map_err(|e| format!("{}: {e}", file.display()))?;
                    if let Some(agentcore) = &policy.agentcore {
                        let defaults = serde_json::to_value(&agentcore.defaults)?;
                        AgentCoreSelection::parse(&defaults, "agentcore.defaults").map_err(|problems| {
                            let listed: Vec<String> = problems.iter().map(ToString::to_string).collect();
                            format!("{}: {}", file.display(), listed.join("; "))
                        })?;
                    }
                    policy
                }
                None => SpendPolicy {
                    paused: false,
                    mode: args.mode.into(),
                    per_transaction_limit_usd: args.per_transaction_usd.ok_or("--per-transaction-usd is required")?,
                    daily_limit_usd: args.daily_usd.ok_or("--daily-usd is required")?,
                    max_transactions_per_hour: args.max_per_hour.ok_or("--max-per-hour is required")?,
                    approval_threshold_usd: args.approval_threshold_usd,
                    deviation: None,
                    auto_pause: None,
                    allowed_networks: args.network.clone(),
                    allowed_payees: args.payee.clone(),
                    agentcore: agentcore_policy(args),
                    principals: args.principal.clone(),
                },
            };
            agentpay::request::AgentId::parse("agent", &args.agent)?;
            // Decided on the version read now: an edit that landed in between is not overwritten.
            let read = store.agent_ledger(&args.agent).await?.version;
            let edit =
                change(PolicyEdit::Replace(Box::new(policy.clone())), operator, args.reason.as_ref(), Some(read));
            if let PolicyEdited::VersionMoved { current } = store.change_policy(&args.agent, &edit).await? {
                return Err(format!(
                    "agent {:?}'s policy changed while this edit was prepared (version {read} read, {current} now); show it with `agentpay policy show {}` and set it again",
                    args.agent, args.agent
                )
                .into());
            }
            // As stored: a paused agent stays paused whatever the new policy says.
            let stored = store.policy(&args.agent).await?.ok_or(format!("agent {:?} lost its policy", args.agent))?;
            if stored.paused && !policy.paused {
                eprintln!("agent {} stays paused: resume it with `agentpay policy resume {}`", args.agent, args.agent);
            }
            (args.agent.clone(), stored)
        }
        PolicyCommand::Show { agent } => {
            let policy = store.agent_ledger(agent).await?.policy.ok_or(format!("agent {agent:?} has no policy"))?;
            (agent.clone(), policy)
        }
        PolicyCommand::Backtest { agent, file, since } => {
            let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let draft = serde_json::from_str::<SpendPolicy>(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            let since = parse_since(since, SystemClock.now())?;
            let recorded = agentpay::backtest::recorded_requests(store.as_ref(), agent, since).await?;
            let mut report = agentpay::backtest::backtest(agent, &draft, &recorded.requests)?;
            report.not_replayable = recorded.not_replayable;
            report.older_left_out = recorded.older_left_out;
            print_backtest(&report, ctx.json)?;
            return Ok(());
        }
        PolicyCommand::Mode { agent, mode, reason } => {
            let read = store.agent_ledger(agent).await?;
            let stored =
                read.policy.ok_or(format!("agent {agent:?} has no policy: set one with `agentpay policy set`"))?;
            let policy = SpendPolicy { mode: (*mode).into(), ..stored };
            let edit = change(PolicyEdit::Replace(Box::new(policy)), operator, reason.as_ref(), Some(read.version));
            if let PolicyEdited::VersionMoved { current } = store.change_policy(agent, &edit).await? {
                return Err(format!(
                    "agent {agent:?}'s policy changed meanwhile (version {} read, {current} now): run the command again",
                    read.version
                )
                .into());
            }
            let policy = store.policy(agent).await?.ok_or(format!("agent {agent:?} lost its policy"))?;
            (agent.clone(), policy)
        }
        PolicyCommand::Pause { agent, all, reason } => {
            let edit = change(PolicyEdit::SetPaused(true), operator, reason.as_ref(), None);
            return set_paused(ctx, agent.as_deref(), *all, &edit).await;
        }
        PolicyCommand::Resume { agent, all, reason } => {
            let edit = change(PolicyEdit::SetPaused(false), operator, reason.as_ref(), None);
            return set_paused(ctx, agent.as_deref(), *all, &edit).await;
        }
    };
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&json!({"agentId": agent, "policy": policy}))?);
    } else {
        println!("{}", policy_table(&agent, &policy));
    }
    Ok(())
}

fn print_backtest(report: &agentpay::backtest::BacktestReport, json: bool) -> Result<(), CliError> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    let usdc = |atomic: u128| {
        u64::try_from(atomic)
            .ok()
            .and_then(agentpay::money::AtomicAmount::new)
            .map_or_else(|| format!("{atomic} atomic"), |a| format!("{} USDC", a.display_with_decimals(6)))
    };
    let (recorded, draft) = (&report.recorded, &report.draft);
    println!(
        "agent {}: {} requests replayed ({} shadow decisions among them); {} denials recorded before a payment was chosen cannot be replayed",
        report.agent_id, recorded.requests, report.shadow_requests, report.not_replayable
    );
    if let Some(trip) = &report.paused_by_trip {
        println!(
            "the draft's automatic trip would have paused the agent at {} (key {}): {}; every later request is denied AgentPaused (nobody resumes it in a replay)",
            trip.at.to_rfc3339(),
            trip.idempotency_key,
            trip.reason
        );
    }
    if report.older_left_out > 0 {
        println!(
            "{} older requests were left out: a backtest replays the newest {} (give a later --since to replay every one)",
            report.older_left_out,
            agentpay::backtest::MAX_REQUESTS
        );
    }
    let mut table = new_table(&["", "allowed", "of which to a person", "denied", "allowed amount"]);
    for (side, tally) in [("recorded", recorded), ("draft", draft)] {
        table.add_row(vec![
            side.to_owned(),
            tally.allowed.to_string(),
            tally.approvals.to_string(),
            tally.denied.to_string(),
            usdc(tally.allowed_atomic),
        ]);
    }
    println!("{table}");
    println!(
        "the draft would have blocked {} payments ({}), let through {} that were denied ({}), sent {} more to a person, and flagged {} deviations",
        report.newly_denied.requests,
        usdc(report.newly_denied.allowed_atomic),
        report.newly_allowed.requests,
        usdc(report.newly_allowed.allowed_atomic),
        report.newly_sent_to_approval,
        report.deviations_flagged
    );
    if !report.changes.is_empty() {
        let mut table = new_table(&["at", "key", "amount", "recorded", "draft"]);
        for change in &report.changes {
            let request = &change.request;
            let recorded = match &request.recorded_error {
                Some(error) => format!("{} ({error})", request.recorded.as_str()),
                None => request.recorded.as_str().to_owned(),
            };
            table.add_row(vec![
                request.at.to_rfc3339(),
                request.idempotency_key.clone(),
                usdc(u128::from(request.amount.get())),
                recorded,
                change.draft.describe(),
            ]);
        }
        println!("changes\n{table}");
    }
    let mut table = new_table(&["day", "requests", "allowed then", "allowed by the draft"]);
    for (day, (then, draft)) in &report.days {
        let date = Timestamp::from_millis(i64::from(*day) * 86_400_000).to_rfc3339();
        table.add_row(vec![
            date[..10].to_owned(),
            then.requests.to_string(),
            usdc(then.allowed_atomic),
            usdc(draft.allowed_atomic),
        ]);
    }
    println!("per day (UTC)\n{table}");
    Ok(())
}

fn agentcore_policy(args: &PolicySetArgs) -> Option<AgentCorePolicy> {
    let policy = AgentCorePolicy {
        defaults: AgentCoreSelection {
            payment_manager_arn: args.agentcore_manager_arn.clone(),
            payment_session_id: args.agentcore_session_id.clone(),
            payment_instrument_id: args.agentcore_instrument_id.clone(),
        },
        buyer_pays_gas_fees: args.buyer_pays_gas_fees,
        check_session_first: args.check_session_first,
    };
    (policy != AgentCorePolicy::default()).then_some(policy)
}

/// Pauses or resumes one agent, or every agent with a policy, and shows what it did.
async fn set_paused(ctx: &Context, agent: Option<&str>, all: bool, change: &PolicyChange) -> Result<(), CliError> {
    let paused = change.edit == PolicyEdit::SetPaused(true);
    let store = &ctx.app.store;
    let agents = match (agent, all) {
        (Some(agent), _) => vec![agent.to_owned()],
        (None, _) => store.agents().await?,
    };
    let mut changed = Vec::new();
    for agent in &agents {
        if store.change_policy(agent, change).await? == PolicyEdited::NoPolicy {
            return Err(format!("agent {agent:?} has no policy to pause or resume").into());
        }
        let policy = store.policy(agent).await?.ok_or(format!("agent {agent:?} lost its policy"))?;
        changed.push((agent.clone(), policy));
    }
    if ctx.json {
        let shown: Vec<_> = changed.iter().map(|(agent, policy)| json!({"agentId": agent, "policy": policy})).collect();
        // One agent: the object itself, as `policy show` prints it.
        let shown = if all { json!(shown) } else { shown.into_iter().next().unwrap_or_default() };
        println!("{}", serde_json::to_string_pretty(&shown)?);
    } else if all {
        let verb = if paused { "paused" } else { "resumed" };
        println!("{verb} {} agents: {}", changed.len(), agents.join(", "));
    } else {
        for (agent, policy) in &changed {
            println!("{}", policy_table(agent, policy));
        }
    }
    Ok(())
}

pub fn policy_table(agent: &str, policy: &SpendPolicy) -> Table {
    let mut table = new_table(&["agent", "setting", "value"]);
    let payees = if policy.allowed_payees.is_empty() {
        "any".to_owned()
    } else {
        policy.allowed_payees.iter().map(|a| a.to_checksum(None)).collect::<Vec<_>>().join(", ")
    };
    for (setting, value) in [
        ("paused (kill switch)", policy.paused.to_string()),
        (
            "mode",
            match policy.mode {
                agentpay::policy::PolicyMode::Enforce => "enforce (pays)".to_owned(),
                agentpay::policy::PolicyMode::Shadow => "shadow (decides and records, pays nothing)".to_owned(),
            },
        ),
        ("per-transaction limit", format!("{} USD", policy.per_transaction_limit_usd)),
        ("rolling 24 h limit", format!("{} USD", policy.daily_limit_usd)),
        ("transactions per hour", policy.max_transactions_per_hour.to_string()),
        ("networks", policy.allowed_networks.iter().map(|n| n.caip2()).collect::<Vec<_>>().join(", ")),
        ("payees", payees),
        (
            "approval above",
            policy.approval_threshold_usd.map_or_else(|| "never".to_owned(), |usd| format!("{usd} USD")),
        ),
        (
            "deviation",
            policy.deviation.as_ref().map_or_else(
                || "not checked".to_owned(),
                |d| {
                    format!(
                        "above {}x the {}-day average per {:?} (from {} payments): {:?}",
                        d.multiplier, d.lookback_days, d.scope, d.min_payments, d.action
                    )
                    .to_lowercase()
                },
            ),
        ),
        ("auto-pause", policy.auto_pause.as_ref().map_or_else(|| "never".to_owned(), auto_pause_text)),
        (
            "principals (IAM)",
            if policy.principals.is_empty() { "none bound".to_owned() } else { policy.principals.join(", ") },
        ),
    ] {
        table.add_row(vec![agent.to_owned(), setting.to_owned(), value]);
    }
    table
}

async fn reconcile(cli: &Cli, ctx: &Context, agent: Option<&str>, dry_run: bool) -> Result<(), CliError> {
    let store = &ctx.app.store;
    let chain = agentpay::chain::JsonRpcChain::from_env()?;
    let client = match cli.backend {
        BackendKind::Local => ctx.app.client(),
        BackendKind::Aws => crate::cli::aws::client(cli).await?,
    };
    let executions = agentpay::client::reconcile::ClientExecutions::new(&client);
    let ttl = cli.config().settings.idempotency_ttl;
    let reconciler = agentpay::reconcile::Reconciler::new(store.clone(), Arc::new(SystemClock), ttl);
    let agents = match agent {
        Some(agent) => vec![agent.to_owned()],
        None => store.agents().await?,
    };
    let mut report = Vec::new();
    for agent in &agents {
        report.push(reconciler.agent(agent, &chain, &executions, dry_run).await?);
    }
    if cli.json {
        let document = json!({"dryRun": dry_run, "chains": chain.networks(), "agents": report});
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(());
    }
    if chain.networks().is_empty() {
        println!(
            "no JSON-RPC endpoint configured ({}): nothing can be voided, expired payments stay counted",
            agentpay::chain::RPC_URLS_VAR
        );
    }
    for agent in &report {
        print_reconciliation(agent, dry_run);
    }
    Ok(())
}

fn print_reconciliation(agent: &agentpay::reconcile::AgentReconciliation, dry_run: bool) {
    let verb = if dry_run { "would change" } else { "changed" };
    println!("agent {}: {} payment(s) {verb}", agent.agent_id, agent.changes.len());
    if !agent.changes.is_empty() {
        let mut table = new_table(&["key", "amount (atomic)", "from", "to", "why"]);
        for change in &agent.changes {
            table.add_row(vec![
                change.idempotency_key.clone(),
                change.amount.get().to_string(),
                change.before.as_str().to_owned(),
                change.after.as_str().to_owned(),
                change.evidence.clone(),
            ]);
        }
        println!("{table}");
    }
    if !agent.asked_again.is_empty() {
        println!("asked the provider again (same key, same client token):");
        let mut table = new_table(&["key", "held by", "outcome"]);
        for asked in &agent.asked_again {
            table.add_row(vec![asked.idempotency_key.clone(), asked.execution_id.clone(), asked.outcome.clone()]);
        }
        println!("{table}");
    }
    if !agent.anomalies.is_empty() {
        println!("anomalies (left as they are, for a person to look at):");
        let mut table = new_table(&["anomaly", "key", "amount (atomic)", "detail"]);
        for anomaly in &agent.anomalies {
            table.add_row(vec![
                anomaly.kind.as_str().to_owned(),
                anomaly.idempotency_key.clone(),
                anomaly.amount.get().to_string(),
                anomaly.detail.clone(),
            ]);
        }
        println!("{table}");
    }
    let mut table = new_table(&["state", "payments", "sum (atomic)"]);
    for (state, total) in &agent.states {
        table.add_row(vec![(*state).to_owned(), total.payments.to_string(), total.atomic.to_string()]);
    }
    println!("{table}");
}

/// `30d`, `12h`, `90m` back from `now`, or an RFC 3339 time.
fn parse_since(text: &str, now: Timestamp) -> Result<Timestamp, String> {
    let expected =
        || format!("--since: received {text:?}, expected a duration like 30d, 12h or 90m, or an RFC 3339 time");
    if let Some(at) = Timestamp::parse_rfc3339(text) {
        return Ok(at);
    }
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).ok_or_else(expected)?);
    let number: i64 = number.parse().map_err(|_| expected())?;
    let minutes = match unit {
        "d" => number.checked_mul(24 * 60),
        "h" => number.checked_mul(60),
        "m" => Some(number),
        _ => None,
    }
    .ok_or_else(expected)?;
    minutes
        .checked_mul(60_000)
        .map(|millis| Timestamp::from_millis(now.millis().saturating_sub(millis)))
        .ok_or_else(expected)
}

/// The automatic trips a policy sets, as one line.
fn auto_pause_text(auto: &agentpay::trips::AutoPausePolicy) -> String {
    let mut trips = Vec::new();
    if let Some(n) = auto.consecutive_rejections {
        trips.push(format!("{n} rejections in a row"));
    }
    if let Some(n) = auto.deviation_flags_per_hour {
        trips.push(format!("{n} deviations within an hour"));
    }
    if let Some(usd) = auto.spend_per_hour_usd {
        trips.push(format!("above {usd} USD within an hour"));
    }
    if trips.is_empty() { "never".to_owned() } else { trips.join("; ") }
}

pub(crate) fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_style(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    table
}

/// One line per event, as a person reads a run.
pub fn history_table(events: &[HistoryEvent], started: Timestamp) -> Table {
    let mut table = new_table(&["#", "+ms", "state", "event", "detail"]);
    for event in events {
        let detail = match event.kind {
            HistoryKind::TaskFailed | HistoryKind::ExecutionFailed => {
                let cause = event.details["cause"].as_str().unwrap_or_default();
                let message = serde_json::from_str::<Value>(cause)
                    .ok()
                    .and_then(|v| v["errorMessage"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| cause.to_owned());
                format!("{}: {}", event.details["error"].as_str().unwrap_or_default(), message)
            }
            HistoryKind::TaskRetryScheduled => format!(
                "{} — retry {}/{} after {} ms",
                event.details["error"].as_str().unwrap_or_default(),
                event.details["retry"],
                event.details["maxAttempts"],
                event.details["delayMillis"]
            ),
            HistoryKind::CatchMatched => format!(
                "caught {} → {}",
                event.details["error"].as_str().unwrap_or_default(),
                event.details["next"].as_str().unwrap_or_default()
            ),
            HistoryKind::TaskSucceeded => summarize_output(&event.details["output"]),
            HistoryKind::ExecutionRedriven => format!("redrive #{}", event.details["redriveCount"]),
            _ => String::new(),
        };
        if matches!(event.kind, HistoryKind::StateExited | HistoryKind::TaskScheduled) {
            continue;
        }
        table.add_row(vec![
            event.seq.to_string(),
            (event.at.millis() - started.millis()).to_string(),
            event.state.clone().unwrap_or_default(),
            format!("{:?}", event.kind),
            detail,
        ]);
    }
    table
}

fn summarize_output(output: &Value) -> String {
    if let Some(outcome) = output["outcome"].as_str() {
        return format!("{outcome} (attempt {})", output["attempt"]);
    }
    if let Some(id) = output["reservationId"].as_str() {
        if let Some(released) = output["released"].as_bool() {
            let key = output["idempotencyStatus"].as_str().unwrap_or_default();
            return if released {
                format!("released {id}; key {key}")
            } else {
                format!("nothing was reserved; key {key}")
            };
        }
        return format!(
            "reserved {} in {id}, {} left today",
            output["amount"].as_str().unwrap_or_default(),
            output["remaining24h"].as_str().unwrap_or_default()
        );
    }
    if output["status"] == "PROOF_GENERATED" {
        return format!(
            "proof {} ({} header)",
            output["paymentId"].as_str().unwrap_or_default(),
            output["header"]["name"].as_str().unwrap_or_default()
        );
    }
    if output["status"] == "AUTHORIZED" {
        return format!(
            "{} to {} authorized",
            output["amount"]["display"].as_str().unwrap_or_default(),
            output["payee"].as_str().unwrap_or_default()
        );
    }
    String::new()
}

/// The outcome in a few lines: what the agent does next.
pub fn outcome_text(record: &ExecutionRecord) -> String {
    let mut out = format!("execution {}\n  status  {}", record.name, record.status.as_str());
    if record.redrive_count > 0 {
        out.push_str(&format!(" (redriven {}×)", record.redrive_count));
    }
    match (&record.output, &record.error) {
        (Some(output), _) => {
            let header_value = output["header"]["value"].as_str().unwrap_or_default();
            let shown: String = header_value.chars().take(48).collect();
            out.push_str(&format!(
                "\n  paid    {} on {} to {}\n  payment {}{}\n  header  {}: {}… ({} chars)",
                output["amount"]["display"].as_str().unwrap_or_default(),
                output["amount"]["network"].as_str().unwrap_or_default(),
                output["payee"].as_str().unwrap_or_default(),
                output["paymentId"].as_str().unwrap_or_default(),
                if output["fromCache"] == true { "  (from the idempotency cache: not paid again)" } else { "" },
                output["header"]["name"].as_str().unwrap_or_default(),
                shown,
                header_value.len()
            ));
        }
        (None, Some(error)) => {
            let message = serde_json::from_str::<Value>(&error.cause)
                .ok()
                .and_then(|v| v["errorMessage"].as_str().map(str::to_owned))
                .unwrap_or_else(|| error.cause.clone());
            out.push_str(&format!(
                "\n  error   {}\n  cause   {}\n  failed  in state {}",
                error.error,
                message,
                record.failed_state.as_deref().unwrap_or("?")
            ));
            if record.failed_state.as_deref() == Some("RecordLedger") {
                out.push_str(&format!(
                    "\n  next    the proof exists but is not recorded: `agentpay replay {}`",
                    record.name
                ));
            }
            if error.error == "PaymentOutcomeUnknown" {
                out.push_str(&format!(
                    "\n  next    a proof may exist and still counts: `agentpay replay {}` asks the provider again with the same client token",
                    record.name
                ));
            }
        }
        (None, None) => {}
    }
    out
}

async fn print_ledger(ctx: &Context, agent: &str) -> Result<(), CliError> {
    let store = &ctx.app.store;
    let ledger = store.agent_ledger(agent).await?;
    let reservations = store.reservations(agent).await?;
    let audit = store.audit_events(agent).await?;
    let policy_history = store.policy_history(agent).await?;
    let now = SystemClock.now();
    let window = ledger.window.rolled(now);
    let spent = window.spent;
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "agentId": agent, "policy": ledger.policy, "version": ledger.version,
                "spent24h": spent, "paymentsLastHour": window.count, "reservations": reservations, "audit": audit,
                "policyHistory": policy_history
            }))?
        );
        return Ok(());
    }
    match &ledger.policy {
        Some(policy) => {
            println!("{}", policy_table(agent, policy));
            let daily = policy.daily_limit_usd.to_atomic(6).unwrap_or_default();
            println!(
                "spent in the last 24 h (reserved + authorized + settled, whole hours): {} USDC of {} USDC; {} of {} payments in the last hour",
                spent.display_with_decimals(6),
                daily.display_with_decimals(6),
                window.count,
                policy.max_transactions_per_hour
            );
        }
        None => println!("agent {agent} has no policy: every payment is denied"),
    }
    let mut table = new_table(&["created", "reservation", "status", "amount", "payee", "idempotency key"]);
    for r in &reservations {
        table.add_row(vec![
            r.created_at.to_rfc3339(),
            r.id.clone(),
            match &r.shadow {
                Some(decision) => format!("SHADOW: {}", decision.verdict.as_str()),
                None => r.status.as_str().to_owned(),
            },
            format!("{} USDC", r.amount.display_with_decimals(6)),
            r.pay_to.clone(),
            r.idempotency_key.clone(),
        ]);
    }
    println!("reservations\n{table}");
    if ledger.policy.as_ref().is_some_and(|p| p.mode == agentpay::policy::PolicyMode::Shadow)
        || reservations.iter().any(|r| r.shadow.is_some())
    {
        let shadow = store.shadow_window(agent).await?.rolled(now);
        println!(
            "shadow window (decisions only, never paid): {} USDC in the last 24 h; {} payments in the last hour",
            shadow.spent.display_with_decimals(6),
            shadow.count
        );
    }
    let mut table = new_table(&["at", "event", "amount", "key", "why / error"]);
    for e in &audit {
        table.add_row(vec![
            e.at.to_rfc3339(),
            format!("{:?}", e.kind).to_uppercase(),
            e.amount.map(|a| format!("{} USDC", a.display_with_decimals(6))).unwrap_or_default(),
            e.idempotency_key.clone(),
            match (&e.kind, &e.error) {
                (agentpay::store::AuditKind::Shadow, _) => e.reason.clone().unwrap_or_default(),
                (_, Some(err)) => err.error.clone(),
                (_, None) => e.context.decision.clone(),
            },
        ]);
    }
    println!("audit trail\n{table}");
    let mut table = new_table(&["at", "version", "change", "by", "why"]);
    for change in &policy_history {
        table.add_row(vec![
            change.at.to_rfc3339(),
            change.version.to_string(),
            format!("{:?}", change.action).to_uppercase(),
            change.by.clone(),
            change.reason.clone().unwrap_or_else(|| "(no reason given)".into()),
        ]);
    }
    println!("policy history\n{table}");
    Ok(())
}
