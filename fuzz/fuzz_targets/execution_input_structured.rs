//! Structure-aware: execution inputs built from typed pieces — every field present in some
//! form, challenges in all three kinds with amounts, addresses and networks drawn from valid,
//! edge and arbitrary values — so the fuzzer spends its time past the JSON syntax, in the
//! field checks and the choice among `accepts[]`. The same properties as `execution_input`.
#![no_main]

use agentpay_core::error::PaymentError;
use agentpay_core::mpp::encode_challenge;
use agentpay_core::payment::Network;
use agentpay_core::request::PaymentRequest;
use agentpay_core::samples::SAMPLE_PAYEE;
use agentpay_core::x402::encode_v2_header;
use agentpay_fuzz::*;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[derive(Debug, Arbitrary)]
enum Text {
    Valid,
    Empty,
    Long(u16),
    Any(String),
}

#[derive(Debug, Arbitrary)]
enum Amount {
    Valid(u32),
    Zero,
    Max,
    Overflow,
    Negative,
    Decimal,
    Any(String),
}

#[derive(Debug, Arbitrary)]
enum Address {
    Usdc(bool),
    Payee,
    Lowercase,
    BadChecksum,
    Short,
    Any(String),
}

#[derive(Debug, Arbitrary)]
enum NetworkName {
    Known(bool),
    V1Name(bool),
    Any(String),
}

#[derive(Debug, Arbitrary)]
struct Entry {
    exact: bool,
    network: NetworkName,
    amount: Amount,
    asset: Address,
    pay_to: Address,
    timeout: Option<u64>,
    extra: bool,
}

#[derive(Debug, Arbitrary)]
enum Challenge {
    V2 { version: u8, accepts: Vec<Entry>, resource: bool },
    V1 { accepts: Vec<Entry> },
    Mpp { id: Text, intent_charge: bool, amount: Amount, currency: Address, recipient: Address, chain: Option<u64> },
    Raw(String),
}

#[derive(Debug, Arbitrary)]
struct Input {
    key: Text,
    agent: Text,
    user: Text,
    challenge: Challenge,
    resource: Text,
    context: Option<(Text, Text, Text)>,
    caller: Option<Text>,
    extra_field: Option<String>,
}

fn text(t: &Text, valid: &str) -> Value {
    match t {
        Text::Valid => json!(valid),
        Text::Empty => json!(""),
        Text::Long(n) => json!(valid.repeat(usize::from(*n % 300) + 1)),
        Text::Any(s) => json!(s),
    }
}

fn amount(a: &Amount) -> Value {
    match a {
        Amount::Valid(n) => json!(n.to_string()),
        Amount::Zero => json!("0"),
        Amount::Max => json!(u128::MAX.to_string()),
        Amount::Overflow => json!("340282366920938463463374607431768211456"),
        Amount::Negative => json!("-5"),
        Amount::Decimal => json!("1.5"),
        Amount::Any(s) => json!(s),
    }
}

fn address(a: &Address) -> Value {
    let usdc = |base: bool| if base { Network::Base } else { Network::BaseSepolia }.usdc().address.to_checksum(None);
    match a {
        Address::Usdc(base) => json!(usdc(*base)),
        Address::Payee => json!(SAMPLE_PAYEE),
        Address::Lowercase => json!(SAMPLE_PAYEE.to_ascii_lowercase()),
        Address::BadChecksum => json!(SAMPLE_PAYEE.replace('B', "b")),
        Address::Short => json!("0x2096"),
        Address::Any(s) => json!(s),
    }
}

fn network(n: &NetworkName) -> Value {
    match n {
        NetworkName::Known(base) => json!(if *base { Network::Base } else { Network::BaseSepolia }.caip2()),
        NetworkName::V1Name(base) => json!(if *base { Network::Base } else { Network::BaseSepolia }.v1_name()),
        NetworkName::Any(s) => json!(s),
    }
}

fn entry(e: &Entry, v1: bool) -> Value {
    let mut entry = json!({
        "scheme": if e.exact { "exact" } else { "upto" },
        "network": network(&e.network),
        "asset": address(&e.asset),
        "payTo": address(&e.pay_to),
    });
    entry[if v1 { "maxAmountRequired" } else { "amount" }] = amount(&e.amount);
    if let Some(timeout) = e.timeout {
        entry["maxTimeoutSeconds"] = json!(timeout % 5000);
    }
    if e.extra {
        entry["extra"] = json!({"name": "USDC", "version": "2"});
    }
    if v1 {
        entry["resource"] = json!("https://api.example.com/r");
    }
    entry
}

fn challenge(c: &Challenge) -> Value {
    match c {
        Challenge::V2 { version, accepts, resource } => {
            let mut body = json!({"x402Version": version % 4, "accepts": accepts.iter().map(|e| entry(e, false)).collect::<Vec<_>>()});
            if *resource {
                body["resource"] = json!({"url": "https://api.example.com/r"});
            }
            json!({"x402": encode_v2_header(&body)})
        }
        Challenge::V1 { accepts } => {
            json!({"x402v1": {"x402Version": 1, "accepts": accepts.iter().map(|e| entry(e, true)).collect::<Vec<_>>()}})
        }
        Challenge::Mpp { id, intent_charge, amount: a, currency, recipient, chain } => {
            let mut request =
                json!({"amount": amount(a), "currency": address(currency), "recipient": address(recipient)});
            if let Some(chain) = chain {
                request["methodDetails"] = json!({"chainId": chain % 100_000});
            }
            let id = text(id, "c1");
            let header = encode_challenge(id.as_str().unwrap_or("c1"), "evm", &request);
            let header =
                if *intent_charge { header } else { header.replace("intent=\"charge\"", "intent=\"session\"") };
            json!({"mpp": header})
        }
        Challenge::Raw(s) => json!({"x402": s}),
    }
}

fn build(input: &Input) -> Value {
    let mut value = json!({
        "idempotencyKey": text(&input.key, "order-42"),
        "agentId": text(&input.agent, "demo-agent"),
        "userId": text(&input.user, "user-7"),
        "challenge": challenge(&input.challenge),
        "resource": text(&input.resource, "https://api.example.com/r"),
    });
    if let Some((decision, delegated, scope)) = &input.context {
        value["context"] = json!({"decision": text(decision, "d"), "delegatedBy": text(delegated, "a@b.c"), "scope": text(scope, "s")});
    }
    if let Some(caller) = &input.caller {
        value["caller"] = json!({"arn": text(caller, "arn:aws:sts::123456789012:assumed-role/agent/run-1")});
    }
    if let Some(extra) = &input.extra_field {
        value[extra.as_str()] = json!(1);
    }
    value
}

fuzz_target!(|input: Input| {
    let value = build(&input);
    let size = value.to_string().len();
    let keys: Vec<String> = value.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    match within_memory_bound(size, || PaymentRequest::parse(&value)) {
        Err(error) => assert_names_fields(&error, "challenge", &keys),
        Ok(request) => match within_memory_bound(size, || request.select_payment(&allow_all(), "a")) {
            Ok(requirement) => assert_round_trips(&requirement),
            Err(PaymentError::InvalidPaymentRequest(error)) => assert_names_fields(&error, "challenge", &keys),
            Err(other) => assert_refusal_kind(&other),
        },
    }
});
