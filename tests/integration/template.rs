//! template.yaml against the code: table schemas, substitutions, functions.

use agentpay::asl::{PAYMENT_DEFINITION, substitution_names};
use agentpay::steps::StepName;
use agentpay::store::dynamodb::schema::{self, TableSchema};
use serde_yaml_ng::Value;

fn template() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/template.yaml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

fn keys(table: &Value) -> Vec<(String, String)> {
    table["Properties"]["KeySchema"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|k| (k["AttributeName"].as_str().unwrap().to_owned(), k["KeyType"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn the_tables_have_the_schema_the_code_uses() {
    let template = template();
    for table_schema in [schema::IDEMPOTENCY, schema::LEDGER] {
        let TableSchema { logical_id, hash_key, range_key, ttl_attribute } = table_schema;
        let table = &template["Resources"][logical_id];
        assert_eq!(table["Type"].as_str(), Some("AWS::DynamoDB::Table"), "{logical_id}");
        let mut expected = vec![(hash_key.to_owned(), "HASH".to_owned())];
        if let Some(range) = range_key {
            expected.push((range.to_owned(), "RANGE".to_owned()));
        }
        assert_eq!(keys(table), expected, "{logical_id}");
        let ttl = &table["Properties"]["TimeToLiveSpecification"];
        assert_eq!(ttl["AttributeName"].as_str(), ttl_attribute, "{logical_id}");
        assert_eq!(table["Properties"]["BillingMode"].as_str(), Some("PAY_PER_REQUEST"));
        assert_eq!(
            table["Properties"]["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"].as_bool(),
            Some(true)
        );
    }
}

#[test]
fn every_substitution_and_every_function_matches() {
    let template = template();
    let machine = &template["Resources"]["PaymentStateMachine"]["Properties"];
    let substitutions: Vec<String> = machine["DefinitionSubstitutions"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    let mut used = substitution_names(PAYMENT_DEFINITION);
    let mut given = substitutions.clone();
    used.sort();
    given.sort();
    assert_eq!(used, given, "every ${{...}} in the ASL has a substitution and every substitution is used");

    let resources = template["Resources"].as_mapping().unwrap();
    let functions: Vec<String> = resources
        .iter()
        .filter(|(_, r)| r["Type"].as_str() == Some("AWS::Serverless::Function"))
        .map(|(_, r)| {
            // SAM reads the binary from BuildProperties; elsewhere it is ignored.
            assert_eq!(r["Metadata"]["BuildMethod"].as_str(), Some("rust-cargolambda"));
            r["Metadata"]["BuildProperties"]["Binary"].as_str().unwrap().to_owned()
        })
        .collect();
    let mut crates: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/functions"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut functions_sorted = functions.clone();
    functions_sorted.sort();
    crates.sort();
    assert_eq!(functions_sorted, crates, "every function has a crate and every crate a function");
    let steps: Vec<&str> = StepName::ALL.iter().map(|s| s.function_name()).collect();
    assert_eq!(functions, steps);
}

/// Every IAM action of every function, by function.
fn function_actions(template: &Value) -> Vec<(String, Vec<String>)> {
    let resources = template["Resources"].as_mapping().unwrap();
    resources
        .iter()
        .filter(|(_, r)| r["Type"].as_str() == Some("AWS::Serverless::Function"))
        .map(|(name, r)| {
            let mut actions = Vec::new();
            for policy in r["Properties"]["Policies"].as_sequence().into_iter().flatten() {
                for statement in policy["Statement"].as_sequence().into_iter().flatten() {
                    match &statement["Action"] {
                        Value::String(a) => actions.push(a.clone()),
                        Value::Sequence(list) => actions.extend(list.iter().map(|a| a.as_str().unwrap().to_owned())),
                        other => panic!("{name:?}: unexpected Action {other:?}"),
                    }
                }
            }
            (name.as_str().unwrap().to_owned(), actions)
        })
        .collect()
}

#[test]
fn only_process_payment_may_call_agentcore_and_no_action_is_a_wildcard() {
    let template = template();
    for (function, actions) in function_actions(&template) {
        assert!(!actions.is_empty(), "{function} has explicit permissions");
        assert!(actions.iter().all(|a| !a.contains('*')), "{function}: wildcard action in {actions:?}");
        let agentcore: Vec<&String> = actions.iter().filter(|a| a.starts_with("bedrock-agentcore:")).collect();
        if function == "ProcessPaymentFunction" {
            assert_eq!(agentcore, ["bedrock-agentcore:ProcessPayment", "bedrock-agentcore:GetPaymentSession"]);
        } else {
            assert!(agentcore.is_empty(), "{function} must not reach AgentCore: {agentcore:?}");
        }
    }
    // Every function runs with the same provider (CheckIdempotency resolves its settings).
    let globals = &template["Globals"]["Function"]["Environment"]["Variables"];
    let Value::Tagged(provider) = &globals["AGENTPAY_PROVIDER"] else { panic!("AGENTPAY_PROVIDER is not a !Ref") };
    assert_eq!((provider.tag.to_string().as_str(), provider.value.as_str()), ("!Ref", Some("PaymentProvider")));
    assert_eq!(template["Parameters"]["PaymentProvider"]["Default"].as_str(), Some("agentcore"));
}
