//! The execution input (`PaymentRequest::parse`) on arbitrary bytes, then the payment choice.
#![no_main]

use agentpay_core::error::PaymentError;
use agentpay_core::request::PaymentRequest;
use agentpay_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let keys: Vec<&str> = input.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
    match within_memory_bound(data.len(), || PaymentRequest::parse(&input)) {
        Err(error) => assert_names_fields(&error, "challenge", &keys),
        Ok(request) => match within_memory_bound(data.len(), || request.select_payment(&allow_all(), "a")) {
            Ok(requirement) => assert_round_trips(&requirement),
            Err(PaymentError::InvalidPaymentRequest(error)) => assert_names_fields(&error, "challenge", &keys),
            Err(other) => assert_refusal_kind(&other),
        },
    }
});
