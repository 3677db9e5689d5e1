//! Properties of every parser an agent or a merchant reaches, over generated inputs (proptest):
//! no panic; a success re-serialises and re-parses to the same requirement; every refusal is a
//! typed error naming a field that exists in the input or a required one; every message stays
//! bounded whatever the input's size.

use agentpay::error::{MAX_LISTED_PROBLEMS, PaymentError};
use agentpay::mpp::MppChallenge;
use agentpay::payment::{Allowlist, Network, PaymentRequirement};
use agentpay::request::PaymentRequest;
use agentpay::samples::execution_input_with_challenge;
use agentpay::x402::{MAX_ACCEPTS, encode_v2_header};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Far below Step Functions' 32 KB Cause; what a refusal may cost at most.
const MAX_MESSAGE: usize = 8 * 1024;

const FIELDS: [&str; 8] = ["idempotencyKey", "agentId", "userId", "challenge", "resource", "context", "agentcore", "x"];

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        "[0-9]{1,30}".prop_map(Value::String),
        "0x[0-9a-fA-F]{40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![prop::sample::select(FIELDS.to_vec()).prop_map(str::to_owned), "[a-zA-Z]{1,12}"],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn allow_all() -> Allowlist {
    Allowlist { networks: Network::ALL.to_vec(), payees: vec![] }
}

/// The head of a field path: `challenge.x402.accepts[0].payTo` → `challenge`.
fn head(field: &str) -> &str {
    field.split(['.', '[']).next().unwrap_or(field)
}

fn assert_bounded(error: &PaymentError) {
    let message = error.to_string();
    assert!(message.len() <= MAX_MESSAGE, "{} bytes: {}", message.len(), &message[..200]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_execution_input_is_parsed_or_refused_naming_a_real_field(input in any_json()) {
        match PaymentRequest::parse(&input) {
            Ok(request) => {
                // What parsed can select a payment or be refused, never panic.
                if let Err(error) = request.select_payment(&allow_all(), "a") {
                    assert_bounded(&error);
                }
            }
            Err(refusal) => {
                let keys: Vec<&str> = input.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
                for problem in &refusal.problems {
                    let named = head(&problem.field);
                    prop_assert!(
                        named == "request" || keys.contains(&named) || FIELDS[..7].contains(&named),
                        "{} names neither an input field nor a required one", problem.field
                    );
                }
                assert_bounded(&PaymentError::from(refusal));
            }
        }
    }

    #[test]
    fn generated_challenges_round_trip(
        amount in 1u64..=1_000_000_000_000,
        payee in prop::array::uniform20(any::<u8>()),
        network in prop::sample::select(Network::ALL.to_vec()),
        timeout in 1u64..=3600,
        v1 in any::<bool>(),
        decoys in 0usize..4,
    ) {
        let pay_to = alloy_primitives::Address::from(payee).to_checksum(None);
        let usdc = network.usdc();
        let entry = |amount: &str| if v1 {
            json!({"scheme": "exact", "network": network.v1_name(), "maxAmountRequired": amount, "resource": "https://r.example/x",
                   "payTo": pay_to, "maxTimeoutSeconds": timeout, "asset": usdc.address.to_checksum(None),
                   "extra": {"name": usdc.eip712_name, "version": usdc.eip712_version}})
        } else {
            json!({"scheme": "exact", "network": network.caip2(), "amount": amount, "asset": usdc.address.to_checksum(None),
                   "payTo": pay_to, "maxTimeoutSeconds": timeout, "extra": {"name": usdc.eip712_name, "version": usdc.eip712_version}})
        };
        // Entries the wallet cannot pay first (another scheme), the payable one last.
        let mut accepts: Vec<Value> = (0..decoys).map(|_| { let mut e = entry("1"); e["scheme"] = json!("upto"); e }).collect();
        accepts.push(entry(&amount.to_string()));
        let challenge = if v1 {
            json!({"x402v1": {"x402Version": 1, "accepts": accepts}})
        } else {
            json!({"x402": encode_v2_header(&json!({"x402Version": 2, "resource": {"url": "https://r.example/x"}, "accepts": accepts}))})
        };
        let request = PaymentRequest::parse(&execution_input_with_challenge("k", "a", challenge)).unwrap();
        let requirement = request.select_payment(&allow_all(), "a").unwrap();
        prop_assert_eq!(requirement.amount.get(), amount);
        prop_assert_eq!(requirement.pay_to.to_checksum(None), pay_to);
        prop_assert_eq!(requirement.network, network);
        prop_assert_eq!(requirement.index, decoys);
        let again: PaymentRequirement = serde_json::from_value(serde_json::to_value(&requirement).unwrap()).unwrap();
        prop_assert_eq!(again, requirement);
    }

    #[test]
    fn a_challenge_with_any_field_replaced_is_paid_or_refused_under_challenge(
        field in prop::sample::select(vec!["scheme", "network", "amount", "asset", "payTo", "maxTimeoutSeconds", "extra", "x402Version", "accepts", "resource"]),
        value in any_json(),
    ) {
        let mut body = agentpay::samples::v2_payment_required("10000");
        match field {
            "x402Version" | "accepts" | "resource" => body[field] = value,
            _ => body["accepts"][0][field] = value,
        }
        let input = execution_input_with_challenge("k", "a", json!({"x402": encode_v2_header(&body)}));
        let request = PaymentRequest::parse(&input).unwrap();
        match request.select_payment(&allow_all(), "a") {
            Ok(requirement) => prop_assert!(requirement.amount.get() > 0),
            Err(PaymentError::InvalidPaymentRequest(refusal)) => {
                for problem in &refusal.problems {
                    prop_assert!(problem.field.starts_with("challenge.x402"), "{}", problem.field);
                }
                assert_bounded(&PaymentError::from(refusal));
            }
            Err(other) => prop_assert!(false, "a malformed challenge is InvalidPaymentRequest, not {}", other.name()),
        }
    }

    #[test]
    fn any_mpp_value_is_parsed_or_refused_briefly(header in ".{0,2000}", prefix in prop::sample::select(vec!["", "Payment ", "Payment id=\"x\", "])) {
        let value = format!("{prefix}{header}");
        if let Err(refusal) = MppChallenge::parse(&value) {
            for problem in &refusal.problems {
                prop_assert!(problem.field.starts_with("challenge.mpp"), "{}", problem.field);
            }
            assert_bounded(&PaymentError::from(refusal));
        }
    }
}

#[test]
fn oversized_inputs_are_refused_before_decoding_and_briefly() {
    // A 1 MB PAYMENT-REQUIRED value: refused by its length, not decoded.
    let huge = "A".repeat(1 << 20);
    let input = execution_input_with_challenge("k", "a", json!({"x402": huge}));
    let error = PaymentRequest::parse(&input).unwrap().select_payment(&allow_all(), "a").unwrap_err();
    assert!(error.to_string().contains("at most 16384 characters"), "{error}");
    assert_bounded(&error);

    // More offers than the bound: refused as a whole, naming the bound.
    let mut body = agentpay::samples::v2_payment_required("10000");
    let entry = body["accepts"][0].clone();
    body["accepts"] = Value::Array(vec![entry; MAX_ACCEPTS + 1]);
    let input = execution_input_with_challenge("k", "a", json!({"x402": encode_v2_header(&body)}));
    let error = PaymentRequest::parse(&input).unwrap().select_payment(&allow_all(), "a").unwrap_err();
    assert!(error.to_string().contains(&format!("at most {MAX_ACCEPTS} payment requirements")), "{error}");

    // Twenty broken offers: the message lists ten problems and counts the rest.
    let mut broken = agentpay::samples::v2_payment_required("10000");
    let mut bad = broken["accepts"][0].clone();
    bad["amount"] = json!("-1");
    bad["payTo"] = json!("0xnot-an-address");
    broken["accepts"] = Value::Array(vec![bad; MAX_ACCEPTS]);
    let input = execution_input_with_challenge("k", "a", json!({"x402": encode_v2_header(&broken)}));
    let error = PaymentRequest::parse(&input).unwrap().select_payment(&allow_all(), "a").unwrap_err();
    let message = error.to_string();
    assert!(message.contains(&format!("and {} more problems", 2 * MAX_ACCEPTS - MAX_LISTED_PROBLEMS)), "{message}");
    assert_bounded(&error);

    // Thousands of unknown top-level fields with long names: bounded too.
    let mut fields = serde_json::Map::new();
    for i in 0..5000 {
        fields.insert(format!("{i}{}", "z".repeat(500)), json!(i));
    }
    let refusal = PaymentRequest::parse(&Value::Object(fields)).unwrap_err();
    assert_bounded(&PaymentError::from(refusal));
}
