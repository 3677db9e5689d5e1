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
    let not_steps = ["start-payment", "report-settlement", "reconcile"];
    let step_functions: Vec<&str> = functions.iter().map(String::as_str).filter(|f| !not_steps.contains(f)).collect();
    assert_eq!(step_functions, steps);
    for function in not_steps {
        assert!(functions.iter().any(|f| f == function), "{function} is deployed");
    }
}

/// Agents reach the workflow only through the IAM-authenticated URL, and that function can do
/// nothing but start executions of this state machine.
#[test]
fn the_entry_point_is_an_iam_authenticated_url_that_can_only_start_payments() {
    let template = template();
    let function = &template["Resources"]["StartPaymentFunction"];
    assert_eq!(function["Properties"]["FunctionUrlConfig"]["AuthType"].as_str(), Some("AWS_IAM"));
    let Value::Tagged(machine) = &function["Properties"]["Environment"]["Variables"]["AGENTPAY_STATE_MACHINE_ARN"]
    else {
        panic!("the state machine ARN is a !Ref")
    };
    assert_eq!(machine.value.as_str(), Some("PaymentStateMachine"));
    let actions = function_actions(&template);
    let (_, start) = actions.iter().find(|(name, _)| name == "StartPaymentFunction").unwrap();
    assert_eq!(start, &["states:StartExecution"]);
    let starters: Vec<&String> =
        actions.iter().filter(|(_, a)| a.iter().any(|a| a == "states:StartExecution")).map(|(n, _)| n).collect();
    assert_eq!(starters, ["StartPaymentFunction", "ReconcileFunction"], "no step function starts executions");
    let permission = &template["Resources"]["StartPaymentUrlPermission"]["Properties"];
    assert_eq!(permission["Action"].as_str(), Some("lambda:InvokeFunctionUrl"));
    assert_eq!(permission["FunctionUrlAuthType"].as_str(), Some("AWS_IAM"));
    assert!(template["Outputs"]["StartPaymentUrl"].is_mapping());
}

/// A statement, or the statement inside `!If [Condition, statement, !Ref AWS::NoValue]`.
fn conditional_statement(statement: &Value) -> &Value {
    match statement {
        Value::Tagged(tagged) if tagged.tag == "!If" => &tagged.value.as_sequence().unwrap()[1],
        other => other,
    }
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
                    let statement = conditional_statement(statement);
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

/// The CloudWatch Logs actions Step Functions needs to deliver execution logs (it refuses to
/// create a logging state machine without them). None takes a resource-level scope.
const LOG_DELIVERY_ACTIONS: [&str; 8] = [
    "logs:CreateLogDelivery",
    "logs:DeleteLogDelivery",
    "logs:DescribeLogGroups",
    "logs:DescribeResourcePolicies",
    "logs:GetLogDelivery",
    "logs:ListLogDeliveries",
    "logs:PutResourcePolicy",
    "logs:UpdateLogDelivery",
];

/// template.yaml as CloudFormation, through SAM's own translator (tests/sam_translate.py, in
/// the .venv the test command creates): the roles SAM generates exist only there.
fn translated_template() -> serde_json::Value {
    let root = env!("CARGO_MANIFEST_DIR");
    let venv_python = format!("{root}/.venv/bin/python");
    let python = if std::path::Path::new(&venv_python).exists() { venv_python } else { "python3".to_owned() };
    let output = std::process::Command::new(&python)
        .args([&format!("{root}/tests/sam_translate.py"), &format!("{root}/template.yaml")])
        // The translator resolves pseudo parameters; it makes no AWS call.
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (./scripts/test installs SAM's translator): {e}"));
    assert!(output.status.success(), "SAM translation failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn statement_actions(statement: &serde_json::Value) -> Vec<String> {
    match &statement["Action"] {
        serde_json::Value::String(a) => vec![a.clone()],
        serde_json::Value::Array(list) => list.iter().map(|a| a.as_str().unwrap().to_owned()).collect(),
        other => panic!("unexpected Action {other}"),
    }
}

#[test]
fn the_state_machine_role_may_deliver_its_logs_and_nothing_wider() {
    let translated = translated_template();
    let resources = translated["Resources"].as_object().unwrap();
    let machine = &resources["PaymentStateMachine"]["Properties"];
    assert_eq!(machine["LoggingConfiguration"]["IncludeExecutionData"], false, "payment proofs stay out of the logs");
    let role_id = machine["RoleArn"]["Fn::GetAtt"][0].as_str().expect("the state machine's role is generated by SAM");
    let role = &resources[role_id]["Properties"];
    let statements: Vec<&serde_json::Value> = role["Policies"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["PolicyDocument"]["Statement"].as_array().unwrap())
        .collect();
    let unscoped: Vec<&&serde_json::Value> = statements.iter().filter(|s| s["Resource"] == "*").collect();
    assert_eq!(unscoped.len(), 1, "one statement without a resource scope: {unscoped:?}");
    let mut actions = statement_actions(unscoped[0]);
    actions.sort();
    assert_eq!(actions, LOG_DELIVERY_ACTIONS, "exactly the log-delivery actions, no others unscoped");
    for statement in &statements {
        for action in statement_actions(statement) {
            assert!(!action.contains('*'), "wildcard action {action} in the state machine role");
            // Invoke the steps; publish approval requests to the operators' topic, with its key.
            let expected = ["lambda:InvokeFunction", "sns:Publish", "kms:GenerateDataKey", "kms:Decrypt"];
            assert!(
                expected.contains(&action.as_str()) || LOG_DELIVERY_ACTIONS.contains(&action.as_str()),
                "unexpected action {action} in the state machine role"
            );
        }
    }
}

/// The alarms operators rely on: each on a metric the code emits (or Step Functions'), each
/// notifying the operators' topic.
#[test]
fn the_alarms_watch_what_the_code_emits_and_notify_the_operators() {
    use agentpay::metrics::{NAMESPACE, names};
    let template = template();
    let resources = template["Resources"].as_mapping().unwrap();
    assert_eq!(template["Resources"]["OperatorsTopic"]["Type"].as_str(), Some("AWS::SNS::Topic"));
    let emitted = [
        names::PAYMENTS_AUTHORIZED,
        names::AMOUNT_AUTHORIZED,
        names::PAYMENTS_DENIED,
        names::COMPENSATIONS,
        names::OUTCOMES_UNKNOWN,
        names::CLAIMS_SUPERSEDED,
        names::STEP_ERRORS,
        names::APPROVALS_REQUESTED,
        names::DEVIATIONS_FLAGGED,
        names::KILL_SWITCH_TRIPS,
        names::APPROVALS_DECIDED,
        names::APPROVAL_WAIT_SECONDS,
        names::RECONCILE_ANOMALIES,
    ];
    let mut alarmed = Vec::new();
    for (name, resource) in resources {
        if resource["Type"].as_str() != Some("AWS::CloudWatch::Alarm") {
            continue;
        }
        let properties = &resource["Properties"];
        let metric = properties["MetricName"].as_str().unwrap();
        match properties["Namespace"].as_str().unwrap() {
            "AWS/States" => assert_eq!(metric, "ExecutionsFailed"),
            "AWS/Lambda" => assert_eq!((metric, name.as_str()), ("Errors", Some("ReconcileErrorsAlarm"))),
            namespace => {
                assert_eq!(namespace, NAMESPACE);
                assert!(emitted.contains(&metric), "{name:?} alarms on {metric}, which nothing emits");
            }
        }
        let Value::Sequence(actions) = &properties["AlarmActions"] else { panic!("{name:?} has no AlarmActions") };
        let Value::Tagged(action) = &actions[0] else { panic!() };
        assert_eq!(action.value.as_str(), Some("OperatorsTopic"), "{name:?}");
        assert!(properties["AlarmDescription"].as_str().is_some_and(|d| d.len() > 40), "{name:?} says what to do");
        let dimension = properties["Dimensions"][0]["Value"].as_str().map(str::to_owned);
        alarmed.push((name.as_str().unwrap().to_owned(), metric.to_owned(), dimension));
    }
    let has = |metric: &str, dimension: Option<&str>| {
        alarmed.iter().any(|(_, m, d)| m == metric && (dimension.is_none() || d.as_deref() == dimension))
    };
    assert!(has("ExecutionsFailed", None), "failed executions");
    assert!(has(names::OUTCOMES_UNKNOWN, None), "unknown outcomes above zero");
    assert!(has(names::STEP_ERRORS, Some("LedgerConflict")), "ledger conflicts");
    assert!(has(names::STEP_ERRORS, Some("StoreUnavailable")), "store throttles");
    assert!(has(names::COMPENSATIONS, Some("ApprovalTimedOut")), "approvals nobody answered");
    assert!(has(names::APPROVALS_REQUESTED, None), "an approval backlog");
    assert!(has(names::KILL_SWITCH_TRIPS, None), "an agent paused by an automatic trip");
    assert!(has(names::DEVIATIONS_FLAGGED, None), "deviation flags");
    assert!(has(names::RECONCILE_ANOMALIES, None), "payments reconciliation cannot explain");
    assert!(has("Errors", None), "a reconciliation that fails");
    let unknown = &template["Resources"]["OutcomeUnknownAlarm"]["Properties"];
    assert_eq!(
        (unknown["Threshold"].as_u64(), unknown["ComparisonOperator"].as_str()),
        (Some(0), Some("GreaterThanThreshold"))
    );
}

#[test]
fn the_dashboard_is_valid_json_over_the_emitted_metrics() {
    let template = template();
    let dashboard = &template["Resources"]["PaymentsDashboard"];
    assert_eq!(dashboard["Type"].as_str(), Some("AWS::CloudWatch::Dashboard"));
    let Value::Tagged(body) = &dashboard["Properties"]["DashboardBody"] else { panic!("DashboardBody is a !Sub") };
    let mut text = body.value.as_str().unwrap().to_owned();
    for placeholder in ["${AWS::Region}", "${PaymentStateMachine}"] {
        text = text.replace(placeholder, "x");
    }
    assert!(!text.contains("${"), "every substitution is known");
    let parsed: serde_json::Value = serde_json::from_str(&text).expect("the dashboard body is JSON");
    let widgets = parsed["widgets"].as_array().unwrap();
    assert!(widgets.len() >= 4);
    for metric in [
        "AmountAuthorizedAtomic",
        "PaymentsAuthorized",
        "OutcomesUnknown",
        "PaymentsDenied",
        "ExecutionsFailed",
        "ApprovalsRequested",
        "ApprovalsDecided",
        "ApprovalWaitSeconds",
        "DeviationsFlagged",
        "KillSwitchTrips",
        "ReconcileChanges",
        "ReconcileAnomalies",
        "ShadowDecisions",
    ] {
        assert!(text.contains(metric), "the dashboard shows {metric}");
    }
}

/// The dev wallet's key reaches process-payment (the one function that builds the provider)
/// only from its secret, only on a dev-wallet stage.
#[test]
fn the_dev_wallet_key_comes_from_a_secret_only_on_dev_wallet_stages() {
    let template = template();
    let globals = &template["Globals"]["Function"]["Environment"]["Variables"];
    assert!(globals.get("AGENTPAY_DEV_WALLET_KEY_FILE").is_none(), "no throwaway key file in Lambda");
    assert!(globals.get("AGENTPAY_DEV_WALLET_KEY").is_none(), "no key in the environment");
    assert!(matches!(&globals["AGENTPAY_DEV_WALLET_SECRET"], Value::Tagged(t) if t.tag == "!If"));
    let rule = &template["Rules"]["DevWalletNeedsItsSecret"];
    assert!(rule["Assertions"][0]["AssertDescription"].as_str().unwrap().contains("DevWalletKeySecretName"));
    let resources = template["Resources"].as_mapping().unwrap();
    for (name, resource) in resources.iter().filter(|(_, r)| r["Type"].as_str() == Some("AWS::Serverless::Function")) {
        let statements: Vec<&Value> = resource["Properties"]["Policies"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|p| p["Statement"].as_sequence().into_iter().flatten())
            .collect();
        let secret: Vec<&&Value> = statements
            .iter()
            .filter(|s| conditional_statement(s)["Sid"].as_str() == Some("ReadDevWalletKey"))
            .collect();
        if name.as_str() != Some("ProcessPaymentFunction") {
            assert!(secret.is_empty(), "{name:?} never builds the provider, so never reads its key");
            continue;
        }
        assert_eq!(secret.len(), 1, "{name:?}");
        let Value::Tagged(conditional) = secret[0] else { panic!("{name:?}: the secret statement is conditional") };
        assert_eq!(conditional.value[0].as_str(), Some("UseDevWallet"));
        let Value::Tagged(resource) = &conditional.value[1]["Resource"] else { panic!() };
        let arn = resource.value.as_str().unwrap();
        assert!(arn.ends_with(":secret:${DevWalletKeySecretName}-??????"), "{name:?}: scoped to the one secret: {arn}");
    }
}

/// Separation of duties: only the approvers' role may answer a waiting payment (send task
/// success or failure); no function — the agents' entry point included — and no other role may.
#[test]
fn only_the_approvers_role_may_answer_waiting_payments() {
    let template = template();
    let answering = ["states:SendTaskSuccess", "states:SendTaskFailure"];
    for (function, actions) in function_actions(&template) {
        assert!(
            !actions.iter().any(|a| answering.contains(&a.as_str())),
            "{function} may answer approvals: {actions:?}"
        );
    }
    let mut roles_answering = Vec::new();
    for (name, resource) in template["Resources"].as_mapping().unwrap() {
        if resource["Type"].as_str() != Some("AWS::IAM::Role") {
            continue;
        }
        for policy in resource["Properties"]["Policies"].as_sequence().into_iter().flatten() {
            for statement in policy["PolicyDocument"]["Statement"].as_sequence().into_iter().flatten() {
                let actions: Vec<&str> = match &statement["Action"] {
                    Value::Sequence(list) => list.iter().filter_map(Value::as_str).collect(),
                    other => other.as_str().into_iter().collect(),
                };
                assert!(actions.iter().all(|a| !a.contains('*')), "{name:?}: wildcard action in {actions:?}");
                if actions.iter().any(|a| answering.contains(a)) {
                    roles_answering.push(name.as_str().unwrap().to_owned());
                }
            }
        }
    }
    assert_eq!(roles_answering, ["ApproversRole"]);
    // The state machine invokes the callback function and publishes to the operators' topic.
    let machine = &template["Resources"]["PaymentStateMachine"]["Properties"];
    let policies = serde_yaml_ng::to_string(&machine["Policies"]).unwrap();
    assert!(policies.contains("RequestApprovalFunction"), "{policies}");
    assert!(policies.contains("SNSPublishMessagePolicy"), "{policies}");
    assert!(template["Parameters"]["ApprovalTimeoutSeconds"]["Default"].as_u64() == Some(7200));
    // CloudWatch alarms can publish to the topic: it is encrypted with a key whose policy lets them.
    let key_policy =
        serde_yaml_ng::to_string(&template["Resources"]["OperatorsTopicKey"]["Properties"]["KeyPolicy"]).unwrap();
    assert!(key_policy.contains("cloudwatch.amazonaws.com"), "{key_policy}");
}

/// Settlement reports come through their own IAM-authenticated URL, and that function can
/// touch the ledger and the keys only; the reconciliation runs on a schedule and may read
/// this machine's executions and start it again, nothing wider.
#[test]
fn settlement_reports_and_reconciliation_are_deployed_with_narrow_rights() {
    let template = template();
    let report = &template["Resources"]["ReportSettlementFunction"]["Properties"];
    assert_eq!(report["FunctionUrlConfig"]["AuthType"].as_str(), Some("AWS_IAM"));
    let permission = &template["Resources"]["ReportSettlementUrlPermission"]["Properties"];
    assert_eq!(permission["FunctionUrlAuthType"].as_str(), Some("AWS_IAM"));
    assert!(template["Outputs"]["ReportSettlementUrl"].is_mapping());
    let Value::Tagged(operators) = &report["Environment"]["Variables"]["AGENTPAY_OPERATOR_PRINCIPALS"] else {
        panic!("the operators are a !Ref")
    };
    assert_eq!(operators.value.as_str(), Some("OperatorPrincipalArns"));
    let actions = function_actions(&template);
    let of = |name: &str| actions.iter().find(|(n, _)| n == name).unwrap().1.clone();
    assert!(
        of("ReportSettlementFunction").iter().all(|a| a.starts_with("dynamodb:")),
        "{:?}",
        of("ReportSettlementFunction")
    );

    let reconcile = &template["Resources"]["ReconcileFunction"]["Properties"];
    let schedule = &reconcile["Events"]["Sweep"];
    assert_eq!(schedule["Type"].as_str(), Some("ScheduleV2"));
    let Value::Tagged(expression) = &schedule["Properties"]["ScheduleExpression"] else { panic!("a !Ref") };
    assert_eq!(expression.value.as_str(), Some("ReconcileSchedule"));
    assert_eq!(template["Parameters"]["ReconcileSchedule"]["Default"].as_str(), Some("rate(1 hour)"));
    assert_eq!(template["Parameters"]["ChainRpcUrls"]["NoEcho"].as_bool(), Some(true), "RPC URLs may carry keys");
    let states: Vec<String> = of("ReconcileFunction").into_iter().filter(|a| a.starts_with("states:")).collect();
    assert_eq!(states, ["states:DescribeExecution", "states:GetExecutionHistory", "states:StartExecution"]);
    for statement in reconcile["Policies"][0]["Statement"].as_sequence().unwrap() {
        let resource = format!("{:?}", statement["Resource"]);
        if statement["Sid"].as_str() == Some("ReadPaymentExecutions") {
            assert!(resource.contains(":execution:agentpay-${Stage}-payment:*"), "{resource}");
        }
        if statement["Sid"].as_str() == Some("AskAgain") {
            assert!(resource.contains("PaymentStateMachine"), "{resource}");
        }
    }
}
