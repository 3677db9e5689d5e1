//! `cargo lambda watch` + `cargo lambda invoke` for every sample event in events/functions/,
//! with the Lambdas on DynamoDB (moto): the sample events cannot rot, and local invoke works
//! as the README says.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use agentpay::store::Store;
use agentpay::store::dynamodb::{DynamoStore, TableNames, create_table, schema};
use serde_json::Value;

use crate::stores::{dynamodb_client, dynamodb_endpoint};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Where `cargo lambda watch` writes what the functions log (stdout and stderr).
fn watch_log() -> std::path::PathBuf {
    Path::new(ROOT).join("target/lambda-watch/functions.log")
}

/// `cargo lambda watch` in its own process group, stopped with its children on drop.
struct Watch {
    child: Child,
    port: u16,
    started: Instant,
}

impl Watch {
    fn start(env: &[(&str, String)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut command = Command::new("cargo");
        command
            .args(["lambda", "watch", "--invoke-address", "127.0.0.1", "--invoke-port", &port.to_string()])
            .current_dir(ROOT)
            // `cargo test` holds the lock on target/ while tests run; the functions that
            // watch builds need a directory of their own.
            .env("CARGO_TARGET_DIR", Path::new(ROOT).join("target/lambda-watch"));
        // Everything the functions print, for the log scan at the end of the test.
        std::fs::create_dir_all(Path::new(ROOT).join("target/lambda-watch")).unwrap();
        let log = std::fs::File::create(watch_log()).unwrap();
        command.stdout(Stdio::from(log.try_clone().unwrap())).stderr(Stdio::from(log));
        for (key, value) in env {
            command.arg("--env-var").arg(format!("{key}={value}"));
        }
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().expect("cargo lambda must be on PATH: run ./scripts/test, which installs it");
        let started = Instant::now();
        let watch = Self { child, port, started };
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(120), "cargo lambda watch did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        watch
    }

    fn invoke(&self, function: &str, event: &str) -> Output {
        // The first invoke of a function waits for watch to build it.
        Command::new("cargo")
            .args([
                "lambda",
                "invoke",
                function,
                "--invoke-address",
                "127.0.0.1",
                "--invoke-port",
                &self.port.to_string(),
            ])
            .args(["--data-file", &format!("events/functions/{event}")])
            .args(["--output-format", "json"])
            .current_dir(ROOT)
            .output()
            .unwrap()
    }

    /// Invokes and parses the JSON the function returned.
    fn invoke_ok(&self, function: &str) -> Value {
        let output = self.invoke(function, &format!("{function}.json"));
        assert!(
            output.status.success(),
            "{function}: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!("{function} answered non-JSON ({e}): {}", String::from_utf8_lossy(&output.stdout))
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let _ = self.child.wait();
    }
}

async fn recreate(client: &aws_sdk_dynamodb::Client, tables: &TableNames) -> DynamoStore {
    for name in [&tables.idempotency, &tables.ledger] {
        let _ = client.delete_table().table_name(name).send().await;
    }
    create_table(client, &tables.idempotency, schema::IDEMPOTENCY).await.unwrap();
    create_table(client, &tables.ledger, schema::LEDGER).await.unwrap();
    let store = DynamoStore::new(client.clone(), tables.clone());
    let mut demo_policy: agentpay::policy::SpendPolicy =
        serde_json::from_str(&std::fs::read_to_string(Path::new(ROOT).join("events/policy-demo-agent.json")).unwrap())
            .unwrap();
    // The functions refuse an agent with no IAM principal bound; the events' caller is a
    // session of this role.
    demo_policy.principals = vec!["arn:aws:iam::123456789012:role/demo-agent".into()];
    store.put_policy("demo-agent", &demo_policy).await.unwrap();
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_function_event_invokes_locally_through_cargo_lambda() {
    let client = dynamodb_client().await;
    let id = alloy_primitives::hex::encode(rand::random::<[u8; 4]>());
    let tables = TableNames { idempotency: format!("invoke-idem-{id}"), ledger: format!("invoke-ledger-{id}") };
    let env = [
        ("AGENTPAY_STORE", "dynamodb".to_owned()),
        ("AGENTPAY_IDEMPOTENCY_TABLE", tables.idempotency.clone()),
        ("AGENTPAY_LEDGER_TABLE", tables.ledger.clone()),
        ("AGENTPAY_DEV_WALLET_KEY", agentpay::provider::dev_wallet::DevWallet::generate_hex_key()),
        ("AWS_ENDPOINT_URL_DYNAMODB", dynamodb_endpoint()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
        // The report event's caller (events/functions/report-settlement.json) is an operator.
        ("AGENTPAY_OPERATOR_PRINCIPALS", "arn:aws:iam::123456789012:role/agentpay-operator".to_owned()),
    ];
    let watch = Watch::start(&env);

    // A payment that fails in ProcessPayment: claim, reserve, compensate.
    let store = recreate(&client, &tables).await;
    assert_eq!(watch.invoke_ok("check-idempotency")["outcome"], "CLAIMED");
    // A figure for the record (scripts/test prints it), not an assertion.
    let first_invoke = watch.started.elapsed();
    std::fs::write(
        Path::new(ROOT).join("target/lambda-watch/first-invoke.txt"),
        format!("{:.1} s from cargo lambda watch start to the first successful invoke\n", first_invoke.as_secs_f64()),
    )
    .unwrap();
    assert!(watch.invoke_ok("check-spend")["reservationId"].as_str().unwrap().starts_with("res-"));
    let compensation = watch.invoke_ok("compensate");
    assert_eq!(
        (compensation["released"].as_bool(), compensation["error"].as_str()),
        (Some(true), Some("ProviderRejected"))
    );
    assert_eq!(store.reservations("demo-agent").await.unwrap()[0].status.as_str(), "RELEASED");

    // The happy path, step by step, on fresh tables.
    let store = recreate(&client, &tables).await;
    assert_eq!(watch.invoke_ok("check-idempotency")["outcome"], "CLAIMED");
    watch.invoke_ok("check-spend");
    let proof = watch.invoke_ok("process-payment");
    assert_eq!(
        (proof["status"].as_str(), proof["header"]["name"].as_str()),
        (Some("PROOF_GENERATED"), Some("PAYMENT-SIGNATURE"))
    );
    let outcome = watch.invoke_ok("record-ledger");
    assert_eq!(outcome["status"], "AUTHORIZED");
    assert_eq!(store.reservations("demo-agent").await.unwrap()[0].status.as_str(), "AUTHORIZED");
    assert_eq!(store.audit_events("demo-agent").await.unwrap().len(), 1);

    // The merchant's answer reported by an operator through the URL function, then a dry-run
    // reconciliation of the agent.
    let answer = watch.invoke_ok("report-settlement");
    assert_eq!(answer["statusCode"], 200, "{answer}");
    let recorded: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
    assert_eq!(recorded["status"], "SETTLED", "{recorded}");
    assert_eq!(store.reservations("demo-agent").await.unwrap()[0].status.as_str(), "SETTLED");
    let swept = watch.invoke_ok("reconcile");
    assert_eq!((swept["dryRun"].as_bool(), swept["agents"][0]["agentId"].as_str()), (Some(true), Some("demo-agent")));
    assert_eq!(swept["agents"][0]["states"]["SETTLED"]["payments"], 1, "{swept}");

    // A payment above the agent's approval threshold: the callback task's function records it.
    let store = recreate(&client, &tables).await;
    let mut approving = store.policy("demo-agent").await.unwrap().unwrap();
    approving.approval_threshold_usd = Some("0.10".parse().unwrap());
    store.put_policy("demo-agent", &approving).await.unwrap();
    watch.invoke_ok("check-idempotency");
    assert_eq!(watch.invoke_ok("check-spend")["approval"]["required"], true);
    let requested = watch.invoke_ok("request-approval");
    let approval = store.approval(requested["approvalId"].as_str().unwrap()).await.unwrap().unwrap();
    assert_eq!(approval.status.as_str(), "PENDING");

    // A bad event comes back as the named error the state machine matches on.
    let bad = watch.invoke("check-spend", "check-idempotency.json");
    assert!(!bad.status.success());
    let text = format!("{}{}", String::from_utf8_lossy(&bad.stdout), String::from_utf8_lossy(&bad.stderr));
    assert!(text.contains("InvalidPaymentRequest"), "{text}");
    drop(watch);

    scan_the_function_logs(&proof, &env);
}

/// Everything the functions logged during the test: metrics as EMF, and never a payment proof,
/// its signature, its authorization nonce or the wallet key.
fn scan_the_function_logs(proof: &Value, env: &[(&str, String)]) {
    use base64::Engine;
    let log = std::fs::read_to_string(watch_log()).unwrap();
    let header = proof["header"]["value"].as_str().unwrap();
    let body: Value =
        serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(header).unwrap()).unwrap();
    let signature = body["payload"]["signature"].as_str().unwrap();
    let nonce = body["payload"]["authorization"]["nonce"].as_str().unwrap();
    let key = &env.iter().find(|(name, _)| *name == "AGENTPAY_DEV_WALLET_KEY").unwrap().1;
    for (what, secret) in [("payment header", header), ("signature", signature), ("nonce", nonce), ("wallet key", key)]
    {
        // Also without the 0x prefix and in pieces a logger could have split it into.
        let bare = secret.trim_start_matches("0x");
        assert!(!log.contains(bare), "the functions logged the {what}");
        assert!(!log.contains(&bare[..bare.len().min(24)]), "the functions logged part of the {what}");
    }
    let documents: Vec<Value> = log
        .lines()
        .filter_map(|line| line.find('{').map(|start| &line[start..]))
        .filter_map(|json| serde_json::from_str::<Value>(json).ok())
        .filter(|document| document.get("_aws").is_some())
        .collect();
    assert!(!documents.is_empty(), "the functions wrote no EMF document; the log:\n{log}");
    assert!(documents.iter().all(|d| d["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "agentpay"));
    assert!(documents.iter().any(|d| d["PaymentsAuthorized"].as_f64() == Some(1.0)), "{documents:?}");
    assert!(documents.iter().any(|d| d["Compensations"].as_f64() == Some(1.0)), "{documents:?}");
}
