//! What every target checks besides "no panic": a successful parse re-serialises and
//! re-parses to the same requirement; a refusal names fields that are in the input (or the
//! missing one); and no input makes the parser allocate more than a small multiple of itself.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use agentpay_core::error::{InvalidPaymentRequest, PaymentError};
use agentpay_core::payment::{Allowlist, Network, PaymentRequirement};

/// Counts live bytes and the peak since the last reset.
pub struct CountingAllocator;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `parse` and checks the memory it took: at most 64 KiB plus 64 times the input.
pub fn within_memory_bound<T>(input_len: usize, parse: impl FnOnce() -> T) -> T {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let result = parse();
    let used = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let bound = 64 * 1024 + 64 * input_len;
    assert!(used <= bound, "parsing {input_len} bytes took {used} bytes (bound {bound})");
    result
}

pub fn allow_all() -> Allowlist {
    Allowlist { networks: Network::ALL.to_vec(), payees: vec![] }
}

/// A chosen requirement survives serialisation unchanged (it travels through the claim).
pub fn assert_round_trips(requirement: &PaymentRequirement) {
    let json = serde_json::to_value(requirement).expect("a requirement serialises");
    let back: PaymentRequirement = serde_json::from_value(json.clone()).expect("and deserialises");
    assert_eq!(&back, requirement, "{json}");
}

/// Every problem names a field under `origin`, or a top-level one of the input.
pub fn assert_names_fields(error: &InvalidPaymentRequest, origin: &str, input_keys: &[&str]) {
    assert!(!error.problems.is_empty(), "a refusal says why");
    for problem in &error.problems {
        let root = problem.field.split(['.', '[']).next().unwrap_or_default();
        // A long unknown field name is shortened for the message ("abc… (456 chars)").
        let shortened = problem.field.split_once('…').map(|(head, _)| head);
        // Keys may hold '.' or '[' themselves: a field is in the input when it starts with a key.
        let in_input = input_keys.iter().any(|k| problem.field.starts_with(k))
            || shortened.is_some_and(|h| input_keys.iter().any(|k| k.starts_with(h)));
        assert!(
            problem.field.starts_with(origin) || in_input || KNOWN_FIELDS.contains(&root),
            "problem names {:?}, which is neither under {origin:?} nor in the input {input_keys:?}",
            problem.field
        );
    }
    assert!(error.to_string().len() < 8 * 1024, "an error message stays short");
}

/// A selection that fails is an invalid request or a policy decision, never something else.
pub fn assert_refusal_kind(error: &PaymentError) {
    assert!(matches!(error.name(), "InvalidPaymentRequest" | "PolicyDenied"), "{}: {error}", error.name());
}

/// The execution input's fields, and the places a missing one is reported from.
pub const KNOWN_FIELDS: &[&str] =
    &["request", "idempotencyKey", "agentId", "userId", "challenge", "resource", "context", "agentcore", "caller"];
