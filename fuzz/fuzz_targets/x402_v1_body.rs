//! An x402 v1 402 response body, parsed and an entry chosen.
#![no_main]

use agentpay_core::error::PaymentError;
use agentpay_core::x402::Challenge;
use agentpay_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    match within_memory_bound(data.len(), || Challenge::from_v1_body(body)) {
        Err(error) => assert_names_fields(&error, "challenge.x402v1", &[]),
        Ok(challenge) => match within_memory_bound(data.len(), || challenge.select(&allow_all(), "a")) {
            Ok(requirement) => assert_round_trips(&requirement),
            Err(PaymentError::InvalidPaymentRequest(error)) => assert_names_fields(&error, "challenge.x402v1", &[]),
            Err(other) => assert_refusal_kind(&other),
        },
    }
});
