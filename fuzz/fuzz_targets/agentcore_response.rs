//! What AgentCore answers to ProcessPayment, through the real SDK (its deserializer) and the
//! provider's checks: the first byte picks the HTTP status, the rest is the body. A success
//! status is a checked proof or an unknown outcome — never a definite refusal, which would
//! release the reservation; a 5xx is always unknown.
#![no_main]

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use agentpay_agentcore::AgentCoreProvider;
use agentpay_core::agentcore::AgentCoreTarget;
use agentpay_core::clock::SystemClock;
use agentpay_core::error::is_definite_refusal_name;
use agentpay_core::provider::{PaymentOrder, PaymentProvider};
use agentpay_core::request::PaymentRequest;
use agentpay_core::samples::execution_input;
use agentpay_fuzz::*;
use aws_sdk_bedrockagentcore::config::{BehaviorVersion, Region};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const STATUSES: [u16; 10] = [200, 200, 200, 201, 400, 403, 404, 409, 500, 503];

thread_local! {
    static RESPONSE: RefCell<(u16, Vec<u8>)> = const { RefCell::new((200, Vec::new())) };
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    provider: AgentCoreProvider,
    order: PaymentOrder,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let http = aws_smithy_http_client::test_util::infallible_client_fn(|_request| {
            RESPONSE.with(|r| {
                let (status, body) = r.borrow().clone();
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(aws_sdk_bedrockagentcore::primitives::SdkBody::from(body))
                    .unwrap()
            })
        });
        let config = aws_sdk_bedrockagentcore::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(aws_credential_types::Credentials::new("AKID", "secret", None, None, "fuzz"))
            .retry_config(aws_sdk_bedrockagentcore::config::retry::RetryConfig::disabled())
            .http_client(http)
            .build();
        let provider =
            AgentCoreProvider::new(aws_sdk_bedrockagentcore::Client::from_conf(config), Arc::new(SystemClock));
        let request = PaymentRequest::parse(&execution_input("fuzz", "a", "10000")).unwrap();
        let requirement = request.select_payment(&allow_all(), "a").unwrap();
        let target = AgentCoreTarget {
            payment_manager_arn: "arn:aws:bedrock-agentcore:us-east-1:123456789012:payment-manager/pm-1".into(),
            payment_session_id: "session-1".into(),
            payment_instrument_id: "instrument-1".into(),
            user_id: "user-7".into(),
            agent_name: "a".into(),
            buyer_pays_gas_fees: false,
            check_session_first: false,
        };
        let order = PaymentOrder {
            client_token: "fuzz-token".into(),
            requirement,
            request,
            context: Some(serde_json::to_value(target).unwrap()),
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Fixture { runtime, provider, order }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else { return };
    let status = STATUSES[usize::from(first) % STATUSES.len()];
    RESPONSE.with(|r| *r.borrow_mut() = (status, body.to_vec()));
    let fixture = fixture();
    let outcome = fixture.runtime.block_on(fixture.provider.process_payment(&fixture.order));
    match (status, outcome) {
        (200..=299, Ok(proof)) => {
            assert!(!proof.header.value.is_empty());
            assert_eq!(proof.header.name, "PAYMENT-SIGNATURE");
        }
        (200..=299, Err(error)) => assert_eq!(error.name(), "PaymentOutcomeUnknown", "a success status: {error}"),
        (500..=599, result) => {
            let name = result.err().map(|e| e.name()).unwrap_or("a proof");
            assert_eq!(name, "PaymentOutcomeUnknown", "a 5xx is never a proof nor a refusal");
        }
        (_, Err(error)) => assert!(
            error.name() == "PaymentOutcomeUnknown" || is_definite_refusal_name(error.name()),
            "{}: {error}",
            error.name()
        ),
        (_, Ok(_)) => panic!("a {status} is not a proof"),
    }
});
