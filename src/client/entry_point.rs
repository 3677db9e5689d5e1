//! Starting a payment through the entry point: a SigV4-signed `POST` of the execution input to
//! the `start-payment` function URL (service `lambda`). The function learns the caller's IAM
//! identity from the signature, so an agent can pay only as the agents its role is bound to.

use std::time::SystemTime;

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::ClientError;

/// The header that names the execution when it is not the key's own (a fresh replay).
pub const EXECUTION_NAME_HEADER: &str = "agentpay-execution-name";

/// The entry point's answers this client reads.
#[derive(Debug, Clone, PartialEq)]
pub enum StartAnswer {
    Started { execution_arn: String },
    AlreadyExists { execution_arn: String },
}

/// A function URL with IAM auth, called with SigV4-signed POSTs (service `lambda`) under the
/// configured credentials: the entry point, and the settlement reports' URL.
pub struct SignedUrl {
    url: http::Uri,
    region: String,
    credentials: SharedCredentialsProvider,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for SignedUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedUrl").field("url", &self.url).field("region", &self.region).finish()
    }
}

/// An answer of a function URL: its status and JSON body (`Null` when it was not JSON), with
/// the raw text for messages.
pub struct UrlAnswer {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

impl UrlAnswer {
    /// The answer's `message`, or its text.
    pub fn message(&self) -> String {
        self.body["message"].as_str().map(str::to_owned).unwrap_or_else(|| self.text.clone())
    }
}

impl SignedUrl {
    /// `url` is a stack output (`StartPaymentUrl`, `ReportSettlementUrl`), `what` names it in
    /// errors; region and credentials come from `aws`.
    pub fn new(url: &str, aws: &aws_config::SdkConfig, what: &str) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::Invalid(format!("{what} URL {url:?}: {why}"));
        let url: http::Uri = url.parse().map_err(|_| bad("expected an https:// function URL"))?;
        if !matches!(url.scheme_str(), Some("https" | "http")) || url.host().is_none() {
            return Err(bad("expected an https:// function URL"));
        }
        let region = aws.region().ok_or_else(|| bad("no AWS region is configured (AWS_REGION)"))?.to_string();
        let credentials =
            aws.credentials_provider().ok_or_else(|| bad("no AWS credentials are configured to sign with"))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| ClientError::Invalid(format!("cannot load the system's TLS roots: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self { url, region, credentials, http: Client::builder(TokioExecutor::new()).build(connector) })
    }

    /// POSTs `body` (JSON) with `headers`, signed.
    pub async fn post(&self, body: String, headers: &[(&str, &str)]) -> Result<UrlAnswer, ClientError> {
        let request = self.signed_request(body, headers).await?;
        let response = self.http.request(request).await.map_err(|e| ClientError::backend("function URL", e))?;
        let status = response.status().as_u16();
        let bytes =
            response.into_body().collect().await.map_err(|e| ClientError::backend("function URL", e))?.to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(UrlAnswer { status, body, text: String::from_utf8_lossy(&bytes).into_owned() })
    }

    async fn signed_request(
        &self,
        body: String,
        extra: &[(&str, &str)],
    ) -> Result<http::Request<Full<Bytes>>, ClientError> {
        let credentials =
            self.credentials.provide_credentials().await.map_err(|e| ClientError::backend("credentials", e))?;
        let identity = credentials.into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("lambda")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| ClientError::backend("SigV4", e))?
            .into();
        let host = self.url.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        let mut headers = vec![("content-type", "application/json"), ("host", host.as_str())];
        headers.extend_from_slice(extra);
        let signable = SignableRequest::new(
            "POST",
            self.url.to_string(),
            headers.iter().copied(),
            SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| ClientError::backend("SigV4", e))?;
        let (instructions, _) = sign(signable, &params).map_err(|e| ClientError::backend("SigV4", e))?.into_parts();
        let mut request = http::Request::builder().method("POST").uri(self.url.clone());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let mut request = request.body(Full::new(Bytes::from(body))).map_err(|e| ClientError::backend("request", e))?;
        instructions.apply_to_request_http1x(&mut request);
        Ok(request)
    }
}

#[derive(Debug)]
pub struct EntryPointStarter {
    url: SignedUrl,
}

impl EntryPointStarter {
    /// `url` is the stack output `StartPaymentUrl`; region and credentials come from `aws`.
    pub fn new(url: &str, aws: &aws_config::SdkConfig) -> Result<Self, ClientError> {
        Ok(Self { url: SignedUrl::new(url, aws, "entry point")? })
    }

    /// Posts `input` (without a `caller`: the entry point sets it) signed with the configured
    /// credentials.
    pub async fn start(&self, name: &str, input: &Value) -> Result<StartAnswer, ClientError> {
        let mut input = input.clone();
        if let Value::Object(fields) = &mut input {
            fields.remove("caller");
        }
        let answer = self.url.post(input.to_string(), &[(EXECUTION_NAME_HEADER, name)]).await?;
        let arn = || answer.body["executionArn"].as_str().map(str::to_owned);
        match (answer.status, arn()) {
            (202, Some(execution_arn)) => Ok(StartAnswer::Started { execution_arn }),
            (409, Some(execution_arn)) => Ok(StartAnswer::AlreadyExists { execution_arn }),
            (status, _) => {
                Err(ClientError::Invalid(format!("the entry point answered {status}: {}", answer.message())))
            }
        }
    }
}
