use serde_json::{Value, json};

use super::*;
use crate::samples::{SAMPLE_PAYEE, v1_payment_required, v2_payment_required};

fn allow_all() -> Allowlist {
    Allowlist { networks: Network::ALL.to_vec(), payees: vec![] }
}

fn select_v2(body: &Value) -> Result<PaymentRequirement, PaymentError> {
    Challenge::from_v2_header(&encode_v2_header(body))
        .map_err(PaymentError::from)
        .and_then(|c| c.select(&allow_all(), "agent-1"))
}

/// Applies `change` to the first accepts entry of a valid v2 body.
fn entry_with(change: impl FnOnce(&mut Map<String, Value>)) -> Value {
    let mut body = v2_payment_required("10000");
    change(body["accepts"][0].as_object_mut().unwrap());
    body
}

#[track_caller]
fn assert_invalid(result: Result<PaymentRequirement, PaymentError>, field: &str, expected_fragment: &str) {
    match result {
        Err(PaymentError::InvalidPaymentRequest(invalid)) => {
            let problem = invalid
                .problems
                .iter()
                .find(|p| p.field == field)
                .unwrap_or_else(|| panic!("no problem for {field}: {invalid}"));
            assert!(
                problem.expected.contains(expected_fragment),
                "{field}: expected text {:?} lacks {expected_fragment:?}",
                problem.expected
            );
        }
        other => panic!("expected InvalidPaymentRequest for {field}, got {other:?}"),
    }
}

#[test]
fn valid_v2_challenge_selects_the_entry() {
    let requirement = select_v2(&v2_payment_required("10000")).unwrap();
    assert_eq!(requirement.network, Network::BaseSepolia);
    assert_eq!(requirement.amount.get(), 10_000);
    assert_eq!(requirement.pay_to.to_checksum(None), SAMPLE_PAYEE);
    assert_eq!(requirement.max_timeout_seconds, 60);
    assert_eq!(requirement.accepted, v2_payment_required("10000")["accepts"][0]);
    assert_eq!(requirement.resource.as_ref().unwrap()["url"], "https://api.example.com/credit-report");
}

#[test]
fn valid_v1_body_maps_network_names() {
    let challenge = Challenge::from_v1_body(v1_payment_required("2500")).unwrap();
    let requirement = challenge.select(&allow_all(), "agent-1").unwrap();
    assert_eq!(requirement.protocol, PaymentProtocol::X402 { version: X402Version::V1 });
    assert_eq!(requirement.network, Network::BaseSepolia);
    assert_eq!(requirement.amount.get(), 2500);
}

#[test]
fn lowercase_addresses_are_accepted_as_unchecksummed() {
    let body = entry_with(|e| {
        e.insert("payTo".into(), json!(SAMPLE_PAYEE.to_lowercase()));
    });
    assert!(select_v2(&body).is_ok());
}

#[test]
fn the_first_allowed_entry_wins_and_disallowed_networks_are_policy_denials() {
    let usdc = Network::Base.usdc();
    let mut body = v2_payment_required("10000");
    let mainnet = json!({
        "scheme": "exact", "network": "eip155:8453", "amount": "10000",
        "asset": usdc.address.to_checksum(None), "payTo": SAMPLE_PAYEE, "maxTimeoutSeconds": 60,
        "extra": {"name": "USD Coin", "version": "2"}
    });
    body["accepts"].as_array_mut().unwrap().insert(0, mainnet);
    let challenge = Challenge::from_v2_header(&encode_v2_header(&body)).unwrap();
    let testnet_only = Allowlist { networks: vec![Network::BaseSepolia], payees: vec![] };
    assert_eq!(challenge.select(&testnet_only, "a").unwrap().index, 1);
    let nothing = Allowlist { networks: vec![], payees: vec![] };
    match challenge.select(&nothing, "a") {
        Err(PaymentError::PolicyDenied { reason, .. }) => {
            assert!(reason.contains("not in the allowlist"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn payee_allowlist_is_enforced_at_selection() {
    let challenge = Challenge::from_v2_header(&encode_v2_header(&v2_payment_required("1"))).unwrap();
    let other_payee = Allowlist { networks: Network::ALL.to_vec(), payees: vec![Address::repeat_byte(7)] };
    assert!(matches!(challenge.select(&other_payee, "a"), Err(PaymentError::PolicyDenied { .. })));
}

// ---- malformed challenges: each one a typed error naming the field ----

#[test]
fn bad_base64_is_rejected() {
    let error = Challenge::from_v2_header("not base64 at all!!").unwrap_err();
    assert_eq!(error.problems[0].field, "challenge.x402");
    assert!(error.problems[0].received.contains("not base64"));
}

#[test]
fn empty_header_is_rejected() {
    let error = Challenge::from_v2_header("   ").unwrap_err();
    assert_eq!(error.problems[0].received, "an empty string");
}

#[test]
fn base64_of_non_json_is_rejected() {
    let header = base64::engine::general_purpose::STANDARD.encode("{not json");
    let error = Challenge::from_v2_header(&header).unwrap_err();
    assert!(error.problems[0].received.contains("not JSON"), "{error}");
}

#[test]
fn json_that_is_not_an_object_is_rejected() {
    let error = Challenge::from_v2_header(&encode_v2_header(&json!([1, 2]))).unwrap_err();
    assert_eq!(error.problems[0].expected, "a PaymentRequired JSON object");
}

#[test]
fn unknown_version_is_rejected() {
    let mut body = v2_payment_required("1");
    body["x402Version"] = json!(3);
    let error = Challenge::from_v2_header(&encode_v2_header(&body)).unwrap_err();
    assert_eq!(error.problems[0].field, "challenge.x402.x402Version");
    assert_eq!(error.problems[0].received, "the number 3");
}

#[test]
fn v1_body_sent_as_v2_header_is_explained() {
    let error = Challenge::from_v2_header(&encode_v2_header(&v1_payment_required("1"))).unwrap_err();
    assert!(error.problems[0].expected.contains("challenge.x402v1"), "{error}");
}

#[test]
fn missing_version_is_rejected() {
    let mut body = v2_payment_required("1");
    body.as_object_mut().unwrap().remove("x402Version");
    let error = Challenge::from_v2_header(&encode_v2_header(&body)).unwrap_err();
    assert_eq!(error.problems[0].received, "nothing");
}

#[test]
fn empty_accepts_is_rejected() {
    let mut body = v2_payment_required("1");
    body["accepts"] = json!([]);
    let error = Challenge::from_v2_header(&encode_v2_header(&body)).unwrap_err();
    assert_eq!(error.problems[0].field, "challenge.x402.accepts");
    assert_eq!(error.problems[0].expected, "at least one payment requirement");
}

#[test]
fn accepts_not_an_array_is_rejected() {
    let mut body = v2_payment_required("1");
    body["accepts"] = json!({"scheme": "exact"});
    let error = Challenge::from_v2_header(&encode_v2_header(&body)).unwrap_err();
    assert_eq!(error.problems[0].received, "an object");
}

#[test]
fn unsupported_scheme_is_rejected() {
    let body = entry_with(|e| {
        e.insert("scheme".into(), json!("upto"));
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].scheme", "\"exact\"");
}

#[test]
fn unknown_network_is_rejected() {
    let body = entry_with(|e| {
        e.insert("network".into(), json!("eip155:1"));
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].network", "eip155:84532");
}

#[test]
fn v1_network_name_in_v2_is_explained() {
    let body = entry_with(|e| {
        e.insert("network".into(), json!("base-sepolia"));
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].network", "x402 v2 uses CAIP-2");
}

#[test]
fn wrong_usdc_address_is_rejected() {
    let body = entry_with(|e| {
        // Mainnet USDC offered on the testnet.
        e.insert("asset".into(), json!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"));
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].asset", "0x036CbD53842c5426634e7929541eC2318f3dCF7e");
}

#[test]
fn bad_payee_checksum_is_rejected_with_the_right_checksum() {
    let body = entry_with(|e| {
        e.insert("payTo".into(), json!("0x209693bc6afc0C5328bA36FaF03C514EF312287C"));
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].payTo", SAMPLE_PAYEE);
}

#[test]
fn bad_asset_checksum_is_rejected() {
    let body = entry_with(|e| {
        e.insert("asset".into(), json!("0x036cbD53842c5426634e7929541eC2318f3dCF7e"));
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].asset", "EIP-55");
}

#[test]
fn short_address_is_rejected() {
    let body = entry_with(|e| {
        e.insert("payTo".into(), json!("0x1234"));
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].payTo", "40 hex digits");
}

#[test]
fn zero_payee_is_rejected() {
    let body = entry_with(|e| {
        e.insert("payTo".into(), json!("0x0000000000000000000000000000000000000000"));
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].payTo", "the address of the payee");
}

#[test]
fn zero_amount_is_rejected() {
    assert_invalid(select_v2(&v2_payment_required("0")), "challenge.x402.accepts[0].amount", "greater than zero");
}

#[test]
fn negative_amount_is_rejected() {
    assert_invalid(select_v2(&v2_payment_required("-100")), "challenge.x402.accepts[0].amount", "whole number");
}

#[test]
fn fractional_amount_is_rejected() {
    assert_invalid(select_v2(&v2_payment_required("0.5")), "challenge.x402.accepts[0].amount", "whole number");
}

#[test]
fn overflowing_amount_is_rejected() {
    let huge = "115792089237316195423570985008687907853269984665640564039457584007913129639935";
    assert_invalid(select_v2(&v2_payment_required(huge)), "challenge.x402.accepts[0].amount", "at most");
}

#[test]
fn numeric_amount_is_rejected() {
    let body = entry_with(|e| {
        e.insert("amount".into(), json!(10000));
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].amount", "decimal string");
}

#[test]
fn v1_field_name_for_amount_in_v2_is_missing_amount() {
    let body = entry_with(|e| {
        let amount = e.remove("amount").unwrap();
        e.insert("maxAmountRequired".into(), amount);
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].amount", "decimal string");
}

#[test]
fn missing_eip712_domain_is_rejected() {
    let body = entry_with(|e| {
        e.remove("extra");
    });
    let result = select_v2(&body);
    assert_invalid(result, "challenge.x402.accepts[0].extra.name", "\"USDC\"");
}

#[test]
fn wrong_eip712_domain_name_is_rejected() {
    let body = entry_with(|e| {
        e.insert("extra".into(), json!({"name": "USD Coin", "version": "2"}));
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].extra.name", "EIP-712 domain name");
}

#[test]
fn wrong_eip712_domain_version_is_rejected() {
    let body = entry_with(|e| {
        e.insert("extra".into(), json!({"name": "USDC", "version": "1"}));
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].extra.version", "\"2\"");
}

#[test]
fn zero_timeout_is_rejected() {
    let body = entry_with(|e| {
        e.insert("maxTimeoutSeconds".into(), json!(0));
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].maxTimeoutSeconds", "from 1 to 3600");
}

#[test]
fn absurd_timeout_is_rejected() {
    let body = entry_with(|e| {
        e.insert("maxTimeoutSeconds".into(), json!(86_400 * 365));
    });
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0].maxTimeoutSeconds", "from 1 to 3600");
}

#[test]
fn entry_that_is_not_an_object_is_rejected() {
    let mut body = v2_payment_required("1");
    body["accepts"] = json!(["exact"]);
    assert_invalid(select_v2(&body), "challenge.x402.accepts[0]", "a payment requirement object");
}

#[test]
fn every_problem_of_an_entry_is_listed() {
    let body = entry_with(|e| {
        e.insert("scheme".into(), json!("upto"));
        e.insert("amount".into(), json!("-1"));
        e.insert("payTo".into(), json!("nope"));
    });
    match select_v2(&body) {
        Err(PaymentError::InvalidPaymentRequest(invalid)) => {
            assert_eq!(invalid.problems.len(), 3, "{invalid}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn v1_with_caip2_network_is_explained() {
    let mut body = v1_payment_required("1");
    body["accepts"][0]["network"] = json!("eip155:84532");
    let result = Challenge::from_v1_body(body).map_err(PaymentError::from).and_then(|c| c.select(&allow_all(), "a"));
    assert_invalid(result, "challenge.x402v1.accepts[0].network", "x402 v1 uses network names");
}

#[test]
fn v2_resource_without_url_is_rejected() {
    let mut body = v2_payment_required("1");
    body["resource"] = json!({"description": "no url"});
    let error = Challenge::from_v2_header(&encode_v2_header(&body)).unwrap_err();
    assert_eq!(error.problems[0].field, "challenge.x402.resource");
}

/// Every malformed challenge the samples list (the fuzz targets' seeds) is refused as an
/// invalid request naming its field.
#[test]
fn every_listed_malformed_challenge_is_refused_naming_its_field() {
    use crate::samples::{ChallengeKind, malformed_challenges};
    let cases = malformed_challenges();
    assert!(cases.len() >= 30, "{}", cases.len());
    for case in cases {
        let refused = match case.kind {
            ChallengeKind::X402V2Header => Challenge::from_v2_header(&case.value)
                .map_err(PaymentError::from)
                .and_then(|c| c.select(&allow_all(), "agent-1"))
                .err(),
            ChallengeKind::X402V1Body => serde_json::from_str(&case.value)
                .map_err(|e| panic!("{e}"))
                .and_then(|body| Challenge::from_v1_body(body).map_err(PaymentError::from))
                .and_then(|c| c.select(&allow_all(), "agent-1"))
                .err(),
            ChallengeKind::Mpp => crate::mpp::MppChallenge::parse(&case.value)
                .map_err(PaymentError::from)
                .and_then(|c| c.select(&allow_all(), "agent-1"))
                .err(),
        };
        match refused {
            Some(PaymentError::InvalidPaymentRequest(invalid)) => assert!(
                invalid.problems.iter().any(|p| p.field == case.field),
                "{:?} {}: refused without naming {}: {invalid}",
                case.kind,
                case.value,
                case.field
            ),
            other => panic!("{:?} {}: expected InvalidPaymentRequest, got {other:?}", case.kind, case.value),
        }
    }
}
