//! The agents' entry point: a Lambda function URL with `AuthType: AWS_IAM`. Lambda verifies
//! the caller's SigV4 signature before the function runs and hands over the caller's ARN in
//! the request context; the function writes it into the execution input as `caller` and starts
//! the execution. Agents hold `lambda:InvokeFunctionUrl` on this function and no
//! `states:StartExecution`; CheckSpend refuses an execution whose agent's policy does not bind
//! the caller.
//!
//! Answers (JSON): 202 started `{executionArn, name}`; 409 an execution of that name exists
//! (the idempotency key was started before: ask its status) with its `executionArn`; 400 a bad
//! body, naming the field; 403 no verified caller (the URL is not IAM-authenticated); 405 a
//! method other than POST; 502 Step Functions refused or failed.

use agentpay_core::identity::{Caller, check_caller_arn};
use agentpay_core::request::PaymentRequest;
use agentpay_core::workflow::{MAX_EXECUTION_NAME, execution_name, is_valid_execution_name};
use aws_sdk_sfn::error::ProvideErrorMetadata;
use base64::Engine;
use serde_json::{Value, json};

/// Step Functions refuses an execution input above 256 KB.
pub const MAX_BODY_LEN: usize = 256 * 1024;

/// What the function answers, as a function URL response.
#[derive(Debug, Clone, PartialEq)]
pub struct UrlAnswer {
    pub status: u16,
    pub body: Value,
}

impl UrlAnswer {
    pub(crate) fn new(status: u16, body: Value) -> Self {
        Self { status, body }
    }

    pub(crate) fn refused(status: u16, error: &str, message: impl Into<String>) -> Self {
        Self::new(status, json!({"error": error, "message": message.into()}))
    }

    /// The function URL response document (payload format 2.0).
    pub fn to_response(&self) -> Value {
        json!({
            "statusCode": self.status,
            "headers": {"content-type": "application/json"},
            "body": self.body.to_string(),
        })
    }
}

pub struct EntryPoint {
    sfn: aws_sdk_sfn::Client,
    state_machine_arn: String,
}

impl EntryPoint {
    pub fn new(sfn: aws_sdk_sfn::Client, state_machine_arn: impl Into<String>) -> Self {
        Self { sfn, state_machine_arn: state_machine_arn.into() }
    }

    /// One function URL request (payload format 2.0).
    pub async fn handle(&self, event: &Value) -> UrlAnswer {
        let caller = match verified_post(event, "the execution input") {
            Ok(caller) => caller,
            Err(answer) => return answer,
        };
        let input = match body(event) {
            Ok(input) => input,
            Err(answer) => return answer,
        };
        let mut input = input;
        input.insert(
            "caller".into(),
            serde_json::to_value(Caller { arn: caller.to_owned() }).expect("a caller serialises"),
        );
        let input = Value::Object(input);
        let request = match PaymentRequest::parse(&input) {
            Ok(request) => request,
            Err(invalid) => return UrlAnswer::refused(400, "InvalidPaymentRequest", invalid.to_string()),
        };
        let name = match requested_name(event) {
            Ok(Some(name)) => name,
            Ok(None) => execution_name(request.idempotency_key.as_str(), None),
            Err(answer) => return answer,
        };
        self.start(&name, &input, caller).await
    }

    async fn start(&self, name: &str, input: &Value, caller: &str) -> UrlAnswer {
        let started = self
            .sfn
            .start_execution()
            .state_machine_arn(&self.state_machine_arn)
            .name(name)
            .input(input.to_string())
            .send()
            .await;
        match started {
            Ok(output) => {
                tracing::info!(execution = name, caller, "execution started");
                UrlAnswer::new(202, json!({"executionArn": output.execution_arn, "name": name}))
            }
            Err(error) if error.as_service_error().is_some_and(|e| e.is_execution_already_exists()) => UrlAnswer::new(
                409,
                json!({
                    "error": "ExecutionAlreadyExists",
                    "message": format!("execution {name} exists already: this idempotency key was started before; ask its status"),
                    "executionArn": format!("{}:{name}", self.state_machine_arn.replacen(":stateMachine:", ":execution:", 1)),
                    "name": name,
                }),
            ),
            Err(error) => {
                let code = error.code().unwrap_or("unknown").to_owned();
                tracing::warn!(execution = name, code, "StartExecution failed");
                UrlAnswer::refused(
                    502,
                    "StartExecutionFailed",
                    format!("Step Functions answered {code}: {}", error.message().unwrap_or("no message")),
                )
            }
        }
    }
}

/// The verified caller of a POST through a function URL with IAM auth (Lambda checked the
/// SigV4 signature and hands over its ARN), or the refusal: 405 for another method, 403 when
/// no IAM caller came with it. `body` says what the POST carries.
pub(crate) fn verified_post<'a>(event: &'a Value, body: &str) -> Result<&'a str, UrlAnswer> {
    let method = event.pointer("/requestContext/http/method").and_then(Value::as_str).unwrap_or_default();
    if method != "POST" {
        let expected = format!("received {method:?}, expected POST with {body} as the body");
        return Err(UrlAnswer::refused(405, "MethodNotAllowed", expected));
    }
    let Some(caller) = event.pointer("/requestContext/authorizer/iam/userArn").and_then(Value::as_str) else {
        return Err(UrlAnswer::refused(
            403,
            "NoVerifiedCaller",
            "the request carries no IAM caller: the function URL must use AuthType AWS_IAM and the request must be SigV4-signed",
        ));
    };
    check_caller_arn(caller).map_err(|expected| {
        UrlAnswer::refused(403, "NoVerifiedCaller", format!("caller {caller:?}: expected {expected}"))
    })?;
    Ok(caller)
}

/// The header naming the execution when it is not the key's own (the client's fresh replay).
/// A name decides nothing about money: the idempotency record still holds the key.
pub const EXECUTION_NAME_HEADER: &str = "agentpay-execution-name";

fn requested_name(event: &Value) -> Result<Option<String>, UrlAnswer> {
    let Some(name) = event.pointer(&format!("/headers/{EXECUTION_NAME_HEADER}")).and_then(Value::as_str) else {
        return Ok(None);
    };
    if !is_valid_execution_name(name) {
        return Err(UrlAnswer::refused(
            400,
            "InvalidPaymentRequest",
            format!(
                "{EXECUTION_NAME_HEADER}: received {name:?}, expected a Step Functions execution name: 1 to {MAX_EXECUTION_NAME} characters, no whitespace, control characters or <>{{}}[]?*\"#%\\^|~`$&,;:/"
            ),
        ));
    }
    Ok(Some(name.to_owned()))
}

/// The body as a JSON object, without a `caller` of its own.
pub(crate) fn body(event: &Value) -> Result<serde_json::Map<String, Value>, UrlAnswer> {
    let raw = event.get("body").and_then(Value::as_str).unwrap_or_default();
    let text = if event.get("isBase64Encoded").and_then(Value::as_bool).unwrap_or(false) {
        if raw.len() > MAX_BODY_LEN / 3 * 4 + 4 {
            return Err(too_large(raw.len()));
        }
        let bytes = base64::engine::general_purpose::STANDARD.decode(raw).map_err(|_| {
            UrlAnswer::refused(
                400,
                "InvalidPaymentRequest",
                "body: received invalid base64, expected the execution input as JSON",
            )
        })?;
        String::from_utf8(bytes).map_err(|_| {
            UrlAnswer::refused(400, "InvalidPaymentRequest", "body: received bytes that are not UTF-8, expected JSON")
        })?
    } else {
        raw.to_owned()
    };
    if text.len() > MAX_BODY_LEN {
        return Err(too_large(text.len()));
    }
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        UrlAnswer::refused(
            400,
            "InvalidPaymentRequest",
            format!("body: received text that is not JSON ({e}), expected the execution input as a JSON object"),
        )
    })?;
    let Value::Object(fields) = value else {
        return Err(UrlAnswer::refused(
            400,
            "InvalidPaymentRequest",
            "body: expected the execution input as a JSON object",
        ));
    };
    if fields.contains_key("caller") {
        return Err(UrlAnswer::refused(
            400,
            "InvalidPaymentRequest",
            "caller: received a value, expected none: the entry point sets the caller from the request's verified IAM identity",
        ));
    }
    Ok(fields)
}

fn too_large(len: usize) -> UrlAnswer {
    UrlAnswer::refused(
        413,
        "InvalidPaymentRequest",
        format!("body: received {len} bytes, expected at most {MAX_BODY_LEN} (Step Functions' input limit)"),
    )
}
