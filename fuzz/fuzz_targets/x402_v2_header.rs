//! An x402 v2 `PAYMENT-REQUIRED` header value, decoded and an entry chosen.
#![no_main]

use agentpay_core::error::PaymentError;
use agentpay_core::x402::Challenge;
use agentpay_fuzz::*;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else { return };
    match within_memory_bound(data.len(), || Challenge::from_v2_header(header)) {
        Err(error) => assert_names_fields(&error, "challenge.x402", &[]),
        Ok(challenge) => match within_memory_bound(data.len(), || challenge.select(&allow_all(), "a")) {
            Ok(requirement) => assert_round_trips(&requirement),
            Err(PaymentError::InvalidPaymentRequest(error)) => assert_names_fields(&error, "challenge.x402", &[]),
            Err(other) => assert_refusal_kind(&other),
        },
    }
});
