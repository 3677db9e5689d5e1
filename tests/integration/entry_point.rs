//! The entry point, locally: the client signs its POST with SigV4; a function-URL emulator
//! checks the signature the way Lambda does (recomputing it with the access key's secret) and
//! hands the verified caller to the real `start-payment` handler, which starts the execution on
//! moto's Step Functions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use agentpay::client::entry_point::EntryPointStarter;
use agentpay::client::sfn::SfnBackend;
use agentpay::client::{ClientError, PaymentClient};
use agentpay::samples::execution_input;
use agentpay_lambda::entry_point::EntryPoint;
use agentpay_lambda::settlement_url::SettlementUrl;
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::stores::{dynamodb_endpoint, local_aws_config};

const AGENT_KEY: (&str, &str) = ("AKIDRESEARCHAGENT", "research-secret");
const AGENT_ARN: &str = "arn:aws:sts::123456789012:assumed-role/research-agent/run-7";

/// What Lambda knows of each access key: its secret and whose it is.
fn identities() -> HashMap<&'static str, (&'static str, &'static str)> {
    HashMap::from([(AGENT_KEY.0, (AGENT_KEY.1, AGENT_ARN))])
}

struct Received {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

async fn read_request(stream: &mut BufReader<tokio::net::TcpStream>) -> Option<Received> {
    let mut line = String::new();
    stream.read_line(&mut line).await.ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        stream.read_line(&mut header).await.ok()?;
        if header == "\r\n" || header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length: usize =
        headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.ok()?;
    Some(Received { method, path, headers, body: String::from_utf8(body).ok()? })
}

/// Lambda's check: recompute the signature over the signed headers with the key's secret.
fn verified_caller(request: &Received, host: &str) -> Result<&'static str, String> {
    let header = |name: &str| request.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    let authorization = header("authorization").ok_or("no Authorization header")?;
    let field = |name: &str| {
        authorization
            .split([' ', ','])
            .find_map(|part| part.strip_prefix(name))
            .ok_or(format!("no {name} in {authorization}"))
    };
    let credential = field("Credential=")?;
    let signed_headers: Vec<&str> = field("SignedHeaders=")?.split(';').collect();
    let signature = field("Signature=")?;
    let access_key = credential.split('/').next().unwrap_or_default();
    let (secret, arn) = identities().get(access_key).copied().ok_or("unknown access key")?;
    let date = header("x-amz-date").ok_or("no X-Amz-Date")?;
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let at: SystemTime = time::PrimitiveDateTime::parse(date, &format).map_err(|e| e.to_string())?.assume_utc().into();
    let identity = Credentials::new(access_key, secret, None, None, "emulator").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(credential.split('/').nth(2).unwrap_or_default())
        .name("lambda")
        .time(at)
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let headers: Vec<(&str, &str)> = request
        .headers
        .iter()
        .filter(|(n, _)| signed_headers.contains(&n.as_str()) && n != "x-amz-date")
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let url = format!("http://{host}{}", request.path);
    let signable =
        SignableRequest::new(&request.method, url, headers.into_iter(), SignableBody::Bytes(request.body.as_bytes()))
            .map_err(|e| e.to_string())?;
    let expected = sign(signable, &params).map_err(|e| e.to_string())?.signature().to_owned();
    if expected == signature { Ok(arn) } else { Err("the request signature does not match".into()) }
}

/// A function's handler, as Lambda calls it behind its URL.
#[async_trait::async_trait]
trait UrlFunction: Send + Sync + 'static {
    async fn handle(&self, event: &Value) -> (u16, Value);
}

#[async_trait::async_trait]
impl UrlFunction for EntryPoint {
    async fn handle(&self, event: &Value) -> (u16, Value) {
        let answer = EntryPoint::handle(self, event).await;
        (answer.status, answer.body)
    }
}

#[async_trait::async_trait]
impl UrlFunction for SettlementUrl {
    async fn handle(&self, event: &Value) -> (u16, Value) {
        let answer = SettlementUrl::handle(self, event).await;
        (answer.status, answer.body)
    }
}

/// A function URL with `AuthType: AWS_IAM` in front of `function`.
async fn function_url(function: Arc<dyn UrlFunction>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let url = format!("http://{host}/");
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (function, host) = (function.clone(), host.clone());
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let Some(request) = read_request(&mut stream).await else { return };
                let (status, body) = match verified_caller(&request, &host) {
                    Err(why) => (403, json!({"Message": why})),
                    Ok(arn) => {
                        let event = json!({
                            "version": "2.0",
                            "headers": request.headers.iter().cloned().collect::<HashMap<_, _>>(),
                            "requestContext": {
                                "http": {"method": request.method},
                                "authorizer": {"iam": {"userArn": arn, "accountId": "123456789012"}},
                            },
                            "body": request.body,
                            "isBase64Encoded": false,
                        });
                        function.handle(&event).await
                    }
                };
                let body = body.to_string();
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.get_mut().write_all(response.as_bytes()).await;
            });
        }
    });
    url
}

async fn setup() -> (aws_sdk_sfn::Client, String, String) {
    let sfn = aws_sdk_sfn::Client::new(&local_aws_config(&dynamodb_endpoint()).await);
    let machine = crate::client::moto_state_machine(&sfn).await;
    let url = function_url(Arc::new(EntryPoint::new(sfn.clone(), &machine))).await;
    (sfn, machine, url)
}

async fn agent_config(secret: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(Credentials::new(AGENT_KEY.0, secret, None, None, "test"))
        .endpoint_url(dynamodb_endpoint())
        .load()
        .await
}

#[tokio::test]
async fn a_signed_start_runs_as_the_verified_caller_and_a_retry_finds_the_same_execution() {
    let (sfn, machine, url) = setup().await;
    let aws = agent_config(AGENT_KEY.1).await;
    let backend = SfnBackend::new(sfn.clone(), &machine).with_entry_point(EntryPointStarter::new(&url, &aws).unwrap());
    let client = PaymentClient::new(Box::new(backend));
    let input = execution_input("entry-1", "research-agent", "10000");

    let started = client.start(&input, None).await.unwrap();
    assert!(!started.already_existed);
    assert!(started.execution.execution_arn.ends_with(":entry-1"), "{}", started.execution.execution_arn);
    let stored = started.execution.input.clone().unwrap();
    assert_eq!(stored["caller"], json!({"arn": AGENT_ARN}), "the caller comes from the signature");
    assert_eq!(stored["idempotencyKey"], "entry-1");

    // An agent's input naming another caller is not believed: the client drops it and the
    // entry point writes the verified one.
    let mut forged = input.clone();
    forged["caller"] = json!({"arn": "arn:aws:sts::123456789012:assumed-role/billing-agent/x"});
    let again = client.start(&forged, None).await.unwrap();
    assert_eq!(again.execution.execution_arn, started.execution.execution_arn, "one key, one execution");
    assert_eq!(again.execution.input.unwrap()["caller"], json!({"arn": AGENT_ARN}));
    let listed = sfn.list_executions().state_machine_arn(&machine).send().await.unwrap().executions;
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn a_request_signed_with_the_wrong_secret_is_refused_and_starts_nothing() {
    let (sfn, machine, url) = setup().await;
    let aws = agent_config("not-the-secret").await;
    let backend = SfnBackend::new(sfn.clone(), &machine).with_entry_point(EntryPointStarter::new(&url, &aws).unwrap());
    let error = PaymentClient::new(Box::new(backend))
        .start(&execution_input("entry-forged", "research-agent", "1"), None)
        .await
        .unwrap_err();
    assert!(matches!(&error, ClientError::Invalid(m) if m.contains("403") && m.contains("signature")), "{error}");
    let listed = sfn.list_executions().state_machine_arn(&machine).send().await.unwrap().executions;
    assert!(listed.is_empty());
}

#[tokio::test]
async fn the_handler_refuses_what_lambda_would_not_have_verified_or_a_body_with_a_caller() {
    let (sfn, machine, _) = setup().await;
    let entry_point = EntryPoint::new(sfn, &machine);
    let event = |method: &str, iam: Option<&str>, body: Value| {
        let mut event = json!({"requestContext": {"http": {"method": method}}, "body": body.to_string()});
        if let Some(arn) = iam {
            event["requestContext"]["authorizer"] = json!({"iam": {"userArn": arn}});
        }
        event
    };
    let input = execution_input("entry-refused", "research-agent", "1");
    assert_eq!(entry_point.handle(&event("GET", Some(AGENT_ARN), input.clone())).await.status, 405);
    let unsigned = entry_point.handle(&event("POST", None, input.clone())).await;
    assert_eq!(unsigned.status, 403);
    assert!(unsigned.body["message"].as_str().unwrap().contains("AWS_IAM"));
    let mut with_caller = input.clone();
    with_caller["caller"] = json!({"arn": AGENT_ARN});
    let answer = entry_point.handle(&event("POST", Some(AGENT_ARN), with_caller)).await;
    assert_eq!(answer.status, 400);
    assert!(answer.body["message"].as_str().unwrap().starts_with("caller:"), "{}", answer.body);
    let mut bad = input.clone();
    bad["resource"] = json!("ftp://x");
    let answer = entry_point.handle(&event("POST", Some(AGENT_ARN), bad)).await;
    assert_eq!((answer.status, answer.body["error"].as_str()), (400, Some("InvalidPaymentRequest")));
    assert!(answer.body["message"].as_str().unwrap().contains("resource"), "{}", answer.body);
}

/// A settlement report through the library client: signed, verified by the function URL, and
/// recorded as the verified caller only if the agent's policy binds it.
#[tokio::test]
async fn a_signed_settlement_report_is_recorded_as_the_verified_caller() {
    use agentpay::client::settlement::SettlementReporter;
    use agentpay::settlement::{ReportInput, SettlementRequest};
    use agentpay::settlements::Settlements;
    use base64::Engine;

    let app = crate::helpers::TestApp::new().await;
    let store = app.app.store.clone();
    let mut bound = crate::helpers::policy("1.00", "5.00", 100);
    store.put_policy("research-agent", &bound).await.unwrap();
    let paid = app.run(execution_input("settle-1", "research-agent", "10000")).await;
    assert_eq!(paid.status, agentpay::executions::ExecutionStatus::Succeeded, "{:?}", paid.error);
    let payer = store.reservations("research-agent").await.unwrap()[0].payer.clone().unwrap();
    let settlements = Settlements::new(store.clone(), Arc::new(agentpay::clock::SystemClock));
    let url = function_url(Arc::new(SettlementUrl::new(store.clone(), settlements, Vec::new()))).await;
    let report = |payer: &str| {
        let answer = json!({"success": true, "transaction": format!("0x{}", "ab".repeat(32)), "network": "eip155:84532", "payer": payer});
        SettlementRequest {
            agent_id: agentpay::request::AgentId::parse("agentId", "research-agent").unwrap(),
            idempotency_key: agentpay::request::IdempotencyKey::parse("idempotencyKey", "settle-1").unwrap(),
            report: ReportInput::X402V2(base64::engine::general_purpose::STANDARD.encode(answer.to_string())),
        }
    };
    let reporter = SettlementReporter::url(&url, &agent_config(AGENT_KEY.1).await).unwrap();

    // Not bound yet: refused, nothing recorded.
    let refused = reporter.report_settlement(&report(&payer)).await.unwrap_err();
    assert!(matches!(&refused, ClientError::Refused { error, .. } if error == "CallerNotBound"), "{refused}");
    bound.principals = vec!["arn:aws:iam::123456789012:role/research-agent".into()];
    store.put_policy("research-agent", &bound).await.unwrap();

    // Signed with another secret: the URL refuses it before the function runs.
    let forged = SettlementReporter::url(&url, &agent_config("not-the-secret").await).unwrap();
    assert!(forged.report_settlement(&report(&payer)).await.is_err());

    // Another payer: refused by name and audited; the payment is unchanged.
    let other = format!("0x{}", "11".repeat(20));
    let mismatch = reporter.report_settlement(&report(&other)).await.unwrap_err();
    assert!(matches!(&mismatch, ClientError::Refused { error, .. } if error == "SettlementMismatch"), "{mismatch}");

    let recorded = reporter.report_settlement(&report(&payer)).await.unwrap();
    assert_eq!((recorded.status.as_str(), recorded.already_recorded), ("SETTLED", false));
    let again = reporter.report_settlement(&report(&payer)).await.unwrap();
    assert!(again.already_recorded, "a repeated report is a no-op that says so");
    let reservation = store.reservations("research-agent").await.unwrap().remove(0);
    assert_eq!(reservation.settlement.unwrap().reported_by, AGENT_ARN, "recorded as the verified caller");

    // The same request through the local reporter (the embedded store).
    let local = SettlementReporter::local(store.clone(), "local:test");
    assert!(local.report_settlement(&report(&payer)).await.unwrap().already_recorded);
}
