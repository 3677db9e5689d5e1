//! An emulator of the AgentCore Payments data plane (restJson1) on 127.0.0.1, for the real
//! aws-sdk-bedrockagentcore client: POST /payments/processPayment and
//! /payments/getPaymentSession, errors as the service sends them (code in `x-amzn-errortype`
//! or `__type`, text in `message`), timestamps as date-time strings. It records every request
//! and answers a repeated client token with the proof it first issued, as the service does.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentpay::clock::{Clock, SystemClock};
use base64::Engine;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    /// Lower-cased names.
    pub headers: BTreeMap<String, String>,
    pub body: Value,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CodeIn {
    /// `x-amzn-errortype: Code:http://internal.amazon.com/...`
    Header,
    /// `{"__type": "com.amazonaws.bedrockagentcore#Code", ...}`
    Body,
}

/// A scripted error answer.
#[derive(Debug, Clone)]
pub struct Fault {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub code_in: CodeIn,
    pub fields: Vec<(&'static str, &'static str)>,
}

impl Fault {
    pub fn new(status: u16, code: &'static str, message: &str) -> Self {
        Self { status, code, message: message.into(), code_in: CodeIn::Header, fields: vec![] }
    }
}

/// What the next ProcessPayment answers.
#[derive(Debug, Clone)]
pub enum Scripted {
    Fault(Fault),
    /// A 200 whose body lacks the required fields (the SDK fills them with "" and epoch 0).
    MissingFields,
    /// A 200 with status other than PROOF_GENERATED.
    Status(&'static str),
}

#[derive(Debug, Clone)]
pub struct SessionState {
    pub available_usd: Option<String>,
    pub expiry_minutes: i32,
    /// Seconds before now the session was created.
    pub age_seconds: i64,
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    script: VecDeque<Scripted>,
    proofs: HashMap<String, Value>,
    session: Option<SessionState>,
    issued: u32,
}

#[derive(Clone)]
pub struct AgentCoreEmulator {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl AgentCoreEmulator {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve_connection(socket, state).await;
                });
            }
        });
        Self { endpoint, state }
    }

    /// The real SDK's configuration, pointed at this emulator.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .test_credentials()
            .load()
            .await
    }

    pub fn script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.state.lock().unwrap().script.extend(answers);
    }

    pub fn set_session(&self, session: SessionState) {
        self.state.lock().unwrap().session = Some(session);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn process_payment_calls(&self) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.path == "/payments/processPayment").collect()
    }

    /// Proofs signed: distinct client tokens that got a PROOF_GENERATED answer.
    pub fn proofs_issued(&self) -> u32 {
        self.state.lock().unwrap().issued
    }
}

async fn serve_connection(socket: tokio::net::TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    socket.set_nodelay(true)?;
    let (read, mut write) = socket.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or_default().to_owned();
        let mut headers = BTreeMap::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
        let length: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (status, extra_headers, response) = answer(&state, Received { path, headers, body });
        let text = response.to_string();
        let mut head =
            format!("HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n", text.len());
        for (name, value) in extra_headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        head.push_str(&text);
        write.write_all(head.as_bytes()).await?;
        write.flush().await?;
    }
}

fn date_time(offset_seconds: i64) -> String {
    let now = SystemClock.now();
    let at = if offset_seconds >= 0 {
        now.plus(Duration::from_secs(offset_seconds.unsigned_abs()))
    } else {
        now.minus(Duration::from_secs(offset_seconds.unsigned_abs()))
    };
    at.to_rfc3339()
}

fn error_answer(fault: &Fault) -> (u16, Vec<(String, String)>, Value) {
    let mut body = json!({"message": fault.message});
    let mut headers = vec![];
    match fault.code_in {
        CodeIn::Header => headers.push((
            "x-amzn-errortype".to_owned(),
            format!("{}:http://internal.amazon.com/coral/com.amazonaws.bedrockagentcore/", fault.code),
        )),
        CodeIn::Body => body["__type"] = json!(format!("com.amazonaws.bedrockagentcore#{}", fault.code)),
    }
    if fault.code == "ValidationException" {
        body["reason"] = json!("FieldValidationFailed");
        body["fieldList"] = Value::Array(
            fault.fields.iter().map(|(name, message)| json!({"name": name, "message": message})).collect(),
        );
    }
    (fault.status, headers, body)
}

fn answer(state: &Mutex<State>, request: Received) -> (u16, Vec<(String, String)>, Value) {
    let mut state = state.lock().unwrap();
    state.received.push(request.clone());
    match request.path.as_str() {
        "/payments/getPaymentSession" => {
            let Some(session) = state.session.clone() else {
                return error_answer(&Fault::new(404, "ResourceNotFoundException", "Payment session not found"));
            };
            let mut body = json!({"paymentSession": {
                "paymentSessionId": request.body["paymentSessionId"],
                "paymentManagerArn": request.body["paymentManagerArn"],
                "userId": request.headers.get("x-amzn-bedrock-agentcore-payments-user-id"),
                "expiryTimeInMinutes": session.expiry_minutes,
                "createdAt": date_time(-session.age_seconds),
                "updatedAt": date_time(0),
            }});
            if let Some(available) = session.available_usd {
                body["paymentSession"]["availableLimits"] =
                    json!({"availableSpendAmount": {"value": available, "currency": "USD"}, "updatedAt": date_time(0)});
            }
            (200, vec![], body)
        }
        "/payments/createPaymentSession" => {
            let mut session = json!({
                "paymentSessionId": format!("ps-{}", &request.body["clientToken"].as_str().unwrap_or("none")[..12]),
                "paymentManagerArn": request.body["paymentManagerArn"],
                "userId": request.headers.get("x-amzn-bedrock-agentcore-payments-user-id"),
                "expiryTimeInMinutes": request.body["expiryTimeInMinutes"],
                "createdAt": date_time(0),
                "updatedAt": date_time(0),
            });
            if let Some(limits) = request.body.get("limits") {
                session["limits"] = limits.clone();
            }
            (200, vec![], json!({"paymentSession": session}))
        }
        "/payments/processPayment" => {
            let token = request.body["clientToken"].as_str().unwrap_or_default().to_owned();
            if let Some(proof) = state.proofs.get(&token) {
                return (200, vec![], proof.clone());
            }
            match state.script.pop_front() {
                Some(Scripted::Fault(fault)) => return error_answer(&fault),
                Some(Scripted::MissingFields) => return (200, vec![], json!({"status": "PROOF_GENERATED"})),
                Some(Scripted::Status(status)) => {
                    let mut proof = proof_for(&request, &token);
                    proof["status"] = json!(status);
                    return (200, vec![], proof);
                }
                None => {}
            }
            let proof = proof_for(&request, &token);
            state.issued += 1;
            state.proofs.insert(token, proof.clone());
            (200, vec![], proof)
        }
        other => error_answer(&Fault::new(404, "UnknownOperationException", &format!("no operation at {other}"))),
    }
}

/// A proof of the shape the service returns, derived from the token (so a test can predict it).
fn proof_for(request: &Received, token: &str) -> Value {
    let body = &request.body;
    let payment_type = body["paymentType"].as_str().unwrap_or_default();
    let output = if payment_type == "MPP" {
        let header = body["paymentInput"]["mpp"]["wwwAuthenticateHeaders"][0].as_str().unwrap_or_default();
        let id = header.split("id=\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap_or_default();
        let credential = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(json!({"challenge": {"id": id}, "token": token}).to_string());
        json!({"mpp": {"version": body["paymentInput"]["mpp"]["version"], "selectedPaymentId": id,
                        "paymentCredential": format!("Payment {credential}")}})
    } else {
        let accepted = &body["paymentInput"]["cryptoX402"]["payload"];
        let amount = accepted.get("amount").or_else(|| accepted.get("maxAmountRequired")).cloned().unwrap_or_default();
        json!({"cryptoX402": {"version": body["paymentInput"]["cryptoX402"]["version"], "payload": {
        "signature": format!("0x{}", "ab".repeat(65)),
        "authorization": {
            "from": "0x857b06519E91e3A54538791bDbb0E22373e36b66",
            "to": accepted["payTo"], "value": amount,
            "validAfter": "1763700000", "validBefore": "1763700600",
            "nonce": format!("0x{:0>64}", token.chars().filter(char::is_ascii_hexdigit).collect::<String>()),
        }}}})
    };
    json!({
        "processPaymentId": format!("pp-{}", &token[token.len().saturating_sub(12)..]),
        "paymentManagerArn": body["paymentManagerArn"],
        "paymentSessionId": body["paymentSessionId"],
        "paymentInstrumentId": body["paymentInstrumentId"],
        "paymentType": payment_type,
        "status": "PROOF_GENERATED",
        "paymentOutput": output,
        "createdAt": date_time(0),
        "updatedAt": date_time(0),
    })
}
