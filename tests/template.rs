//! template.yaml is deployed as is, and cfn-lint accepts typos such as `ReportBatchItemFailure`:
//! these tests pin the properties the code relies on, then provision the template into the local
//! emulator to show the local stack is built from the same definitions.

use std::collections::BTreeSet;

use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::types::{KeyType, ProjectionType, TimeToLiveStatus};
use aws_sdk_sqs::types::QueueAttributeName;
use infra::provision::{self, Provisioned};
use infra::template::{
    self, BillingMode, KeyElement, Projection, StackSpecs, Template, LOCAL_ACCOUNT_ID,
};
use serde_yaml::Value;
use shared::adapters::dynamodb::{META_IAM, SOURCE_IAM};
use shared::adapters::events::EVENTS_IAM;
use shared::adapters::s3::FILES_IAM;
use shared::adapters::sqs::QUEUE_IAM;
use shared::adapters::{IamNeed, IamResource, SOURCE_ROLE_IAM};

const STACK: &str = "export-cache";
const FUNCTIONS: [(&str, &str); 4] = [
    ("ApiFunction", "export-api"),
    ("WorkerFunction", "export-worker"),
    ("WarmerFunction", "export-warmer"),
    ("InvalidatorFunction", "export-invalidator"),
];

fn template() -> Template {
    Template::load(&provision::template_path()).expect("template.yaml parses")
}

fn specs() -> StackSpecs {
    template()
        .stack_specs(STACK, LOCAL_ACCOUNT_ID, "us-east-1")
        .expect("template resolves for the local stack")
}

fn key(attribute: &str, key_type: template::KeyType) -> KeyElement {
    KeyElement {
        attribute: attribute.to_owned(),
        key_type,
    }
}

/// `!Name arg` (or the long `Fn::Name`/`Ref` form) as (Name, arg).
fn intrinsic(v: &Value) -> Option<(String, &Value)> {
    match v {
        Value::Tagged(t) => Some((
            t.tag.to_string().trim_start_matches('!').to_owned(),
            &t.value,
        )),
        Value::Mapping(m) if m.len() == 1 => {
            let (k, arg) = m.iter().next()?;
            let k = k.as_str()?;
            Some((k.strip_prefix("Fn::").unwrap_or(k).to_owned(), arg))
        }
        _ => None,
    }
}

fn is_ref_to(v: &Value, logical_id: &str) -> bool {
    matches!(intrinsic(v), Some((name, Value::String(id))) if name == "Ref" && id == logical_id)
}

fn is_arn_of(v: &Value, logical_id: &str) -> bool {
    match intrinsic(v) {
        Some((name, Value::String(s))) if name == "GetAtt" => s == &format!("{logical_id}.Arn"),
        Some((name, Value::Sequence(parts))) if name == "GetAtt" => {
            parts.first().and_then(Value::as_str) == Some(logical_id)
                && parts.get(1).and_then(Value::as_str) == Some("Arn")
        }
        _ => false,
    }
}

/// Every logical id a value mentions through Ref, GetAtt or `${Id...}` in Sub.
fn referenced_ids(v: &Value, out: &mut BTreeSet<String>) {
    if let Some((name, arg)) = intrinsic(v) {
        match (name.as_str(), arg) {
            ("Ref", Value::String(id)) => {
                out.insert(id.clone());
            }
            ("GetAtt", Value::String(s)) => {
                out.insert(s.split('.').next().unwrap_or_default().to_owned());
            }
            ("Sub", Value::String(s)) => {
                for part in s.split("${").skip(1) {
                    let var = part.split('}').next().unwrap_or_default();
                    out.insert(var.split('.').next().unwrap_or_default().to_owned());
                }
            }
            _ => {}
        }
    }
    match v {
        Value::Sequence(items) => items.iter().for_each(|i| referenced_ids(i, out)),
        Value::Mapping(m) => m.values().for_each(|i| referenced_ids(i, out)),
        Value::Tagged(t) => referenced_ids(&t.value, out),
        _ => {}
    }
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Sequence(items) => items.iter().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

/// The IAM statements of a function's `Policies`, failing on anything that is not an explicit
/// policy document (SAM policy templates and managed policy names grant more than we audit).
/// A statement granted only under a condition (`!If [Cond, statement, !Ref AWS::NoValue]`) is
/// in the list as the statement it grants; [`conditional_statements`] tells which they are.
fn statements(t: &Template, function: &str) -> Vec<Value> {
    all_statements(t, function)
        .into_iter()
        .map(|(_, statement)| statement)
        .collect()
}

/// The statements granted only under a condition, with the condition's name.
fn conditional_statements(t: &Template, function: &str) -> Vec<(String, Value)> {
    all_statements(t, function)
        .into_iter()
        .filter_map(|(condition, statement)| Some((condition?, statement)))
        .collect()
}

/// `!If [Cond, statement, !Ref AWS::NoValue]` as (Cond, statement); any other `!If` fails.
fn conditional(statement: &Value) -> Option<(String, Value)> {
    let (name, arg) = intrinsic(statement)?;
    if name != "If" {
        return None;
    }
    let parts = arg.as_sequence().expect("!If takes a list");
    assert_eq!(parts.len(), 3, "!If [condition, then, else]: {statement:?}");
    assert!(
        is_ref_to(&parts[2], "AWS::NoValue"),
        "a conditional statement grants nothing otherwise: {statement:?}"
    );
    let condition = parts[0].as_str().expect("a condition name").to_owned();
    Some((condition, parts[1].clone()))
}

fn all_statements(t: &Template, function: &str) -> Vec<(Option<String>, Value)> {
    let policies = t
        .properties(function)
        .and_then(|p| p.get("Policies"))
        .and_then(Value::as_sequence)
        .unwrap_or_else(|| panic!("{function} declares Policies as a list"));
    policies
        .iter()
        .flat_map(|policy| {
            let statement = policy.get("Statement").unwrap_or_else(|| {
                panic!("{function}: every policy is an explicit document, found {policy:?}")
            });
            statement
                .as_sequence()
                .cloned()
                .unwrap_or_else(|| vec![statement.clone()])
        })
        .map(|statement| match conditional(&statement) {
            Some((condition, granted)) => (Some(condition), granted),
            None => (None, statement),
        })
        .collect()
}

fn actions(statement: &Value) -> Vec<String> {
    strings(&statement["Action"])
}

fn statement_ids(statement: &Value) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    referenced_ids(&statement["Resource"], &mut ids);
    ids
}

fn events_of_type<'a>(t: &'a Template, function: &str, ty: &str) -> Vec<(String, &'a Value)> {
    t.properties(function)
        .and_then(|p| p.get("Events"))
        .and_then(Value::as_mapping)
        .map(|events| {
            events
                .iter()
                .filter(|(_, e)| e["Type"].as_str() == Some(ty))
                .map(|(name, e)| {
                    (
                        name.as_str().unwrap_or_default().to_owned(),
                        &e["Properties"],
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// API Gateway forwards only the routes the template declares: they must be the routes the API's
/// OpenAPI document (and so its router) has, with the authorizer off exactly where the document
/// asks for no identity.
#[test]
fn api_gateway_routes_are_the_openapi_routes_with_the_same_auth() {
    let t = template();
    let declared: BTreeSet<(String, String, bool)> = events_of_type(&t, "ApiFunction", "HttpApi")
        .into_iter()
        .map(|(name, props)| {
            assert!(is_ref_to(&props["ApiId"], "ExportApi"), "{name}: {props:?}");
            let open = props["Auth"]["Authorizer"].as_str() == Some("NONE");
            (
                props["Method"].as_str().unwrap().to_uppercase(),
                props["Path"].as_str().unwrap().to_owned(),
                !open,
            )
        })
        .collect();
    let doc = serde_json::to_value(api::openapi_document()).unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            documented.insert((method.to_uppercase(), path.clone(), secured));
        }
    }
    assert_eq!(declared, documented);
}

#[test]
fn worker_reports_batch_item_failures() {
    let t = template();
    let sqs = events_of_type(&t, "WorkerFunction", "SQS");
    assert_eq!(sqs.len(), 1, "the worker has exactly one SQS trigger");
    let (_, props) = &sqs[0];
    assert!(is_arn_of(&props["Queue"], "JobQueue"), "{props:?}");
    assert_eq!(props["BatchSize"].as_u64(), Some(1));
    assert_eq!(
        strings(&props["FunctionResponseTypes"]),
        vec!["ReportBatchItemFailures"]
    );
}

#[test]
fn queue_visibility_is_at_least_six_times_worker_timeout() {
    let t = template();
    let timeout = t
        .function_property("WorkerFunction", "Timeout")
        .and_then(Value::as_u64)
        .expect("worker declares a timeout");
    assert_eq!(timeout, 900, "the worker runs as long as Lambda allows");
    let queue = specs().queue("JobQueue").unwrap().clone();
    let visibility = u64::from(queue.visibility_timeout.expect("VisibilityTimeout set"));
    assert!(
        visibility >= 6 * timeout,
        "visibility {visibility}s < 6 x worker timeout {timeout}s"
    );
}

#[test]
fn dlq_after_bounded_receives() {
    let specs = specs();
    let queue = specs.queue("JobQueue").unwrap();
    let redrive = queue
        .redrive
        .as_ref()
        .expect("JobQueue has a RedrivePolicy");
    assert_eq!(redrive.target_logical_id, "JobDlq");
    assert_eq!(redrive.max_receive_count, 5);
    let dlq = specs.queue("JobDlq").unwrap();
    assert!(dlq.redrive.is_none(), "the DLQ is the end of the line");
    assert_eq!(dlq.message_retention_period, Some(14 * 24 * 3600));
    assert!(
        dlq.message_retention_period > queue.message_retention_period.or(Some(4 * 24 * 3600)),
        "dead messages must outlive their originals"
    );
    assert!(queue.sqs_managed_sse && dlq.sqs_managed_sse);
}

#[test]
fn functions_are_arm64_al2023_built_with_cargo_lambda() {
    let t = template();
    let declared: BTreeSet<&str> = t
        .logical_ids_of_type("AWS::Serverless::Function")
        .into_iter()
        .collect();
    assert_eq!(
        declared,
        FUNCTIONS.iter().map(|(id, _)| *id).collect::<BTreeSet<_>>()
    );
    for (id, binary) in FUNCTIONS {
        let prop = |key| t.function_property(id, key).cloned().unwrap_or(Value::Null);
        assert_eq!(prop("Runtime").as_str(), Some("provided.al2023"), "{id}");
        assert_eq!(strings(&prop("Architectures")), vec!["arm64"], "{id}");
        assert_eq!(prop("Handler").as_str(), Some("bootstrap"), "{id}");
        assert_eq!(prop("CodeUri").as_str(), Some("."), "{id}");
        let metadata = &t.resource(id).unwrap()["Metadata"];
        assert_eq!(
            metadata["BuildMethod"].as_str(),
            Some("rust-cargolambda"),
            "{id}"
        );
        assert_eq!(
            metadata["BuildProperties"]["Binary"].as_str(),
            Some(binary),
            "{id}"
        );
    }
}

#[test]
fn worker_streams_without_extra_disk_and_has_cpu_for_encoding() {
    let t = template();
    let prop = |key| {
        t.function_property("WorkerFunction", key)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(prop("EphemeralStorage"), Value::Null, "the default 512 MB");
    assert_eq!(prop("MemorySize").as_u64(), Some(1024));
}

#[test]
fn meta_table_has_ttl_and_expiry_index() {
    let specs = specs();
    let meta = specs.table("MetaTable").unwrap();
    assert_eq!(meta.name, "export-cache-meta");
    assert_eq!(meta.billing_mode, BillingMode::PayPerRequest);
    assert_eq!(
        meta.key_schema,
        vec![
            key("pk", template::KeyType::Hash),
            key("sk", template::KeyType::Range)
        ]
    );
    assert_eq!(meta.ttl_attribute.as_deref(), Some("expires_at"));
    assert!(meta.sse_enabled);
    let [gsi] = meta.gsis.as_slice() else {
        panic!("MetaTable has exactly one GSI: {:?}", meta.gsis)
    };
    assert_eq!(gsi.name, "by_expiry");
    assert_eq!(
        gsi.key_schema,
        vec![
            key("gsi1pk", template::KeyType::Hash),
            key("gsi1sk", template::KeyType::Range)
        ]
    );
    assert_eq!(gsi.projection, Projection::All);
}

#[test]
fn source_tables_are_partitioned_by_tenant_with_created_at_index() {
    let specs = specs();
    // The catalog names tables without the stack prefix; the functions add SOURCE_TABLE_PREFIX.
    for (id, catalog_name, sort_key) in [
        ("OrdersTable", "orders", "order_id"),
        ("CustomersTable", "customers", "customer_id"),
    ] {
        let table = specs.table(id).unwrap();
        assert_eq!(table.name, format!("export-cache-{catalog_name}"));
        assert_eq!(
            table.name,
            format!("{}{catalog_name}", specs.source_table_prefix)
        );
        assert_eq!(table.billing_mode, BillingMode::PayPerRequest);
        assert_eq!(
            table.key_schema,
            vec![
                key("tenant_id", template::KeyType::Hash),
                key(sort_key, template::KeyType::Range)
            ]
        );
        let [gsi] = table.gsis.as_slice() else {
            panic!("{id} has exactly one GSI")
        };
        assert_eq!(gsi.name, "by_created_at");
        assert_eq!(
            gsi.key_schema,
            vec![
                key("tenant_id", template::KeyType::Hash),
                key("created_at", template::KeyType::Range)
            ]
        );
        assert_eq!(gsi.projection, Projection::All);
    }
}

#[test]
fn bucket_is_private_encrypted_and_expires_exports() {
    let t = template();
    assert_eq!(specs().bucket.name, "export-cache-files-123456789012");
    let props = t.properties("ExportBucket").expect("ExportBucket");
    let block = &props["PublicAccessBlockConfiguration"];
    for setting in [
        "BlockPublicAcls",
        "BlockPublicPolicy",
        "IgnorePublicAcls",
        "RestrictPublicBuckets",
    ] {
        assert_eq!(block[setting].as_bool(), Some(true), "{setting}");
    }
    assert_eq!(
        props["OwnershipControls"]["Rules"][0]["ObjectOwnership"].as_str(),
        Some("BucketOwnerEnforced")
    );
    assert_eq!(
        props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
            ["ServerSideEncryptionByDefault"]["SSEAlgorithm"]
            .as_str(),
        Some("AES256")
    );

    let rules = &specs().bucket.lifecycle_rules;
    let rule = rules
        .iter()
        .find(|r| r.prefix.as_deref() == Some("exports/"))
        .expect("a lifecycle rule on exports/");
    assert!(rule.enabled);
    assert_eq!(rule.expiration_days, Some(7));
    assert_eq!(rule.abort_incomplete_multipart_days, Some(1));

    let policies: Vec<&str> = t.logical_ids_of_type("AWS::S3::BucketPolicy");
    let denies_plain_http = policies.iter().any(|id| {
        let p = t.properties(id).unwrap();
        is_ref_to(&p["Bucket"], "ExportBucket")
            && p["PolicyDocument"]["Statement"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|s| {
                    s["Effect"].as_str() == Some("Deny")
                        && s["Condition"]["Bool"]["aws:SecureTransport"].as_str() == Some("false")
                })
    });
    assert!(denies_plain_http, "a bucket policy denies non-TLS access");
}

#[test]
fn api_cannot_read_source_tables() {
    let t = template();
    for statement in statements(&t, "ApiFunction") {
        let ids = statement_ids(&statement);
        assert!(
            !ids.contains("OrdersTable") && !ids.contains("CustomersTable"),
            "the API must not reach the source tables: {statement:?}"
        );
    }
}

#[test]
fn worker_reads_source_tables_only_by_query() {
    let t = template();
    let mut covered = BTreeSet::new();
    for statement in statements(&t, "WorkerFunction") {
        let ids = statement_ids(&statement);
        for source in ["OrdersTable", "CustomersTable"] {
            if ids.contains(source) {
                assert_eq!(actions(&statement), vec!["dynamodb:Query"], "{statement:?}");
                covered.insert(source);
            }
        }
    }
    assert_eq!(covered.len(), 2, "the worker can query both source tables");
}

/// `!Not [!Equals [!Ref Parameter, ""]]`: true when the parameter is given.
fn is_set_condition(v: &Value, parameter: &str) -> bool {
    let Some(("Not", arg)) = intrinsic(v).as_ref().map(|(n, a)| (n.as_str(), *a)) else {
        return false;
    };
    let Some(equals) = arg.as_sequence().and_then(|s| s.first()) else {
        return false;
    };
    match intrinsic(equals) {
        Some((name, Value::Sequence(sides))) if name == "Equals" => {
            sides.len() == 2 && is_ref_to(&sides[0], parameter) && sides[1].as_str() == Some("")
        }
        _ => false,
    }
}

#[test]
fn the_source_role_is_assumed_only_by_the_worker_and_only_when_configured() {
    let t = template();
    let root = t.root();
    for parameter in ["SourceRoleArn", "SourceRegion"] {
        let p = &root["Parameters"][parameter];
        assert_eq!(p["Type"].as_str(), Some("String"), "{parameter}");
        assert_eq!(p["Default"].as_str(), Some(""), "{parameter} is optional");
    }
    assert!(
        is_set_condition(&root["Conditions"]["HasSourceRole"], "SourceRoleArn"),
        "HasSourceRole is true exactly when SourceRoleArn is given"
    );
    assert!(is_set_condition(
        &root["Conditions"]["HasSourceRegion"],
        "SourceRegion"
    ));

    let assume: Vec<(String, Value)> = conditional_statements(&t, "WorkerFunction")
        .into_iter()
        .filter(|(_, s)| actions(s).iter().any(|a| a.starts_with("sts:")))
        .collect();
    let [(condition, statement)] = assume.as_slice() else {
        panic!("the worker has one sts statement, and it is conditional: {assume:?}")
    };
    assert_eq!(condition, "HasSourceRole");
    assert_eq!(actions(statement), vec!["sts:AssumeRole"]);
    assert!(
        is_ref_to(&statement["Resource"], "SourceRoleArn"),
        "only the configured role: {statement:?}"
    );
    assert!(
        statements(&t, "WorkerFunction")
            .iter()
            .filter(|s| actions(s).iter().any(|a| a.starts_with("sts:")))
            .count()
            == 1,
        "no unconditional sts grant"
    );
    for id in ["ApiFunction", "WarmerFunction"] {
        for s in statements(&t, id) {
            assert!(
                !actions(&s).iter().any(|a| a.starts_with("sts:")),
                "{id} never reads the source, so it assumes no role: {s:?}"
            );
        }
        let env = t.function_environment(id);
        assert!(
            !env.contains_key("SOURCE_ROLE_ARN") && !env.contains_key("SOURCE_REGION"),
            "{id} is not told where the source is"
        );
    }
    let env = t.function_environment("WorkerFunction");
    assert!(is_ref_to(&env["SOURCE_ROLE_ARN"], "SourceRoleArn"));
    assert!(is_ref_to(&env["SOURCE_REGION"], "SourceRegion"));
}

#[test]
fn source_tables_in_another_region_of_the_account_are_queried_only_there() {
    let t = template();
    let conditions = &t.root()["Conditions"];
    let Some((name, Value::Sequence(parts))) = intrinsic(&conditions["ReadsSourceInOtherRegion"])
    else {
        panic!("ReadsSourceInOtherRegion is an !And")
    };
    assert_eq!(name, "And");
    let named = |v: &Value| match intrinsic(v) {
        Some((n, Value::String(c))) if n == "Condition" => Some(c.clone()),
        _ => None,
    };
    assert_eq!(named(&parts[0]).as_deref(), Some("HasSourceRegion"));
    assert!(
        matches!(intrinsic(&parts[1]), Some((n, Value::Sequence(inner))) if n == "Not"
            && named(&inner[0]).as_deref() == Some("HasSourceRole")),
        "with a role, the role's own policy governs: {parts:?}"
    );
    let regional: Vec<Value> = conditional_statements(&t, "WorkerFunction")
        .into_iter()
        .filter(|(c, _)| c == "ReadsSourceInOtherRegion")
        .map(|(_, s)| s)
        .collect();
    let [statement] = regional.as_slice() else {
        panic!("one statement for source tables in another region: {regional:?}")
    };
    assert_eq!(actions(statement), vec!["dynamodb:Query"]);
    let resources: Vec<String> = resource_values(statement)
        .into_iter()
        .map(|v| match intrinsic(v) {
            Some((n, Value::String(s))) if n == "Sub" => s.clone(),
            other => panic!("a !Sub ARN, got {other:?}"),
        })
        .collect();
    let table = |name: &str| {
        format!("arn:${{AWS::Partition}}:dynamodb:${{SourceRegion}}:${{AWS::AccountId}}:table/${{AWS::StackName}}-{name}")
    };
    assert_eq!(
        resources,
        vec![
            table("orders"),
            format!("{}/index/*", table("orders")),
            table("customers"),
            format!("{}/index/*", table("customers")),
        ]
    );
}

#[test]
fn the_workers_planned_deadline_is_its_timeout() {
    let t = template();
    let timeout = t
        .function_property("WorkerFunction", "Timeout")
        .and_then(Value::as_u64)
        .expect("worker declares a timeout");
    let env = t.function_environment("WorkerFunction");
    assert_eq!(
        env["WORKER_TIMEOUT_SECONDS"].as_str(),
        Some(timeout.to_string().as_str())
    );
}

#[test]
fn function_policies_name_their_resources() {
    let t = template();
    for (id, _) in FUNCTIONS {
        for statement in statements(&t, id) {
            assert_eq!(statement["Effect"].as_str(), Some("Allow"), "{id}");
            for action in actions(&statement) {
                assert!(!action.contains('*'), "{id}: wildcard action {action}");
            }
            assert!(
                !strings(&statement["Resource"]).iter().any(|r| r == "*"),
                "{id}: statement on every resource: {statement:?}"
            );
            assert!(!statement_ids(&statement).is_empty(), "{id}: {statement:?}");
        }
    }
}

#[test]
fn every_function_can_enqueue_only_on_the_job_queue() {
    let t = template();
    for (id, _) in FUNCTIONS {
        if id == "InvalidatorFunction" {
            continue;
        }
        let sends: Vec<_> = statements(&t, id)
            .into_iter()
            .filter(|s| actions(s).iter().any(|a| a.starts_with("sqs:")))
            .collect();
        assert!(!sends.is_empty(), "{id} can send to the job queue");
        for s in sends {
            for action in actions(&s) {
                assert!(
                    ["sqs:SendMessage", "sqs:ChangeMessageVisibility"].contains(&action.as_str()),
                    "{id}: {action}"
                );
            }
            assert!(is_arn_of(&s["Resource"], "JobQueue"), "{id}: {s:?}");
        }
    }
}

#[test]
fn only_the_worker_publishes_events_and_only_on_the_default_bus() {
    let t = template();
    let bus = "arn:${AWS::Partition}:events:${AWS::Region}:${AWS::AccountId}:event-bus/default";
    for (id, _) in FUNCTIONS {
        let publishes: Vec<_> = all_statements(&t, id)
            .into_iter()
            .filter(|(_, s)| actions(s).iter().any(|a| a.starts_with("events:")))
            .collect();
        if id != "WorkerFunction" {
            assert!(publishes.is_empty(), "{id}: {publishes:?}");
            assert!(
                !t.function_environment(id).contains_key("EVENT_BUS_NAME"),
                "{id}"
            );
            continue;
        }
        let [(None, statement)] = publishes.as_slice() else {
            panic!("the worker has one unconditional events statement: {publishes:?}")
        };
        assert_eq!(actions(statement), vec!["events:PutEvents"]);
        let resources = resource_values(statement);
        assert!(
            matches!(resources.as_slice(), [v] if matches!(intrinsic(v), Some((name, Value::String(s))) if name == "Sub" && s == bus)),
            "the default bus only: {statement:?}"
        );
        // The adapter sends to the bus this names: the one the grant is for.
        assert_eq!(
            t.function_environment(id)["EVENT_BUS_NAME"].as_str(),
            Some("default")
        );
    }
}

/// Every adapter's IAM list (kept next to its code), by port.
fn iam_lists() -> Vec<IamNeed> {
    [
        META_IAM,
        SOURCE_IAM,
        SOURCE_ROLE_IAM,
        FILES_IAM,
        QUEUE_IAM,
        EVENTS_IAM,
    ]
    .concat()
    .to_vec()
}

fn workspace_file(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Production code of a file with whitespace and comments removed: test modules (at the end,
/// by convention) and `//` comments would only add calls the function never makes.
fn code_of(path: &str) -> String {
    let text = workspace_file(path);
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<String>()
        .split_whitespace()
        .collect()
}

fn identifier_at(code: &str, from: usize) -> String {
    code[from..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// `name` for each `{prefix}name(` in the code.
fn calls_after(code: &str, prefix: &str) -> BTreeSet<String> {
    code.match_indices(prefix)
        .map(|(i, _)| identifier_at(code, i + prefix.len()))
        .filter(|name| !name.is_empty())
        .filter(|name| code.contains(&format!("{prefix}{name}(")))
        .collect()
}

/// Service modules a piece of code names (`services::jobs`, `super::{jobs, warm}`).
fn service_modules(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in ["services::", "super::"] {
        for (i, _) in code.match_indices(prefix) {
            let rest = &code[i + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or_default();
                out.extend(group.split(',').map(|p| identifier_at(p, 0)));
            } else {
                out.insert(identifier_at(rest, 0));
            }
        }
    }
    out.retain(|m| {
        !m.is_empty()
            && std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../shared/src/services/{m}.rs"))
                .exists()
    });
    out
}

/// The files whose code runs in a function: its crate, and the service modules it reaches.
fn function_code(crate_dir: &str) -> Vec<(String, String)> {
    let mut files: Vec<String> = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../{crate_dir}/src")),
    )
    .unwrap()
    .map(|e| {
        format!(
            "{crate_dir}/src/{}",
            e.unwrap().file_name().to_string_lossy()
        )
    })
    .collect();
    let mut i = 0;
    while i < files.len() {
        let code = code_of(&files[i]);
        for m in service_modules(&code) {
            let path = format!("shared/src/services/{m}.rs");
            if !files.contains(&path) {
                files.push(path);
            }
        }
        i += 1;
    }
    files.into_iter().map(|f| (code_of(&f), f)).collect()
}

/// The template resources an IAM need must be granted on, all of them.
fn granted_on(resource: IamResource) -> Vec<(&'static str, &'static str)> {
    match resource {
        IamResource::MetaTable => vec![("GetAtt", "MetaTable")],
        IamResource::MetaTableIndexes => vec![("Sub", "${MetaTable.Arn}/index/*")],
        IamResource::SourceTables => vec![("GetAtt", "OrdersTable"), ("GetAtt", "CustomersTable")],
        IamResource::SourceTableIndexes => vec![
            ("Sub", "${OrdersTable.Arn}/index/*"),
            ("Sub", "${CustomersTable.Arn}/index/*"),
        ],
        IamResource::ExportObjects => vec![("Sub", "${ExportBucket.Arn}/exports/*")],
        IamResource::JobQueue => vec![("GetAtt", "JobQueue")],
        IamResource::SourceRole => vec![("Ref", "SourceRoleArn")],
        IamResource::DefaultEventBus => vec![(
            "Sub",
            "arn:${AWS::Partition}:events:${AWS::Region}:${AWS::AccountId}:event-bus/default",
        )],
    }
}

fn resource_values(statement: &Value) -> Vec<&Value> {
    match &statement["Resource"] {
        Value::Sequence(items) => items.iter().collect(),
        other => vec![other],
    }
}

fn grants(t: &Template, function: &str, action: &str, (kind, target): (&str, &str)) -> bool {
    statements(t, function).iter().any(|statement| {
        actions(statement).iter().any(|a| a == action)
            && resource_values(statement).iter().any(|v| match kind {
                "GetAtt" => is_arn_of(v, target),
                "Ref" => is_ref_to(v, target),
                _ => matches!(intrinsic(v), Some((name, Value::String(s))) if name == "Sub" && s == target),
            })
    })
}

#[test]
fn every_sdk_call_of_an_adapter_is_in_its_iam_list() {
    let ports = code_of("shared/src/ports.rs");
    for (file, lists) in [
        (
            "shared/src/adapters/dynamodb/metadata.rs",
            META_IAM.to_vec(),
        ),
        (
            "shared/src/adapters/dynamodb/source.rs",
            SOURCE_IAM.to_vec(),
        ),
        ("shared/src/adapters/s3.rs", FILES_IAM.to_vec()),
        ("shared/src/adapters/sqs.rs", QUEUE_IAM.to_vec()),
        ("shared/src/adapters/events.rs", EVENTS_IAM.to_vec()),
    ] {
        let listed: BTreeSet<&str> = lists.iter().flat_map(|n| n.calls.iter().copied()).collect();
        let called = calls_after(&code_of(file), ".client.");
        assert!(!called.is_empty(), "{file}: no SDK calls found");
        for call in &called {
            assert!(
                listed.contains(call.as_str()),
                "{file} calls `{call}` but its IAM list does not say so: add it next to the adapter"
            );
        }
        for need in &lists {
            assert!(
                ports.contains(&format!("fn{}(", need.method)),
                "{file}: `{}` in the IAM list is not a port method",
                need.method
            );
        }
    }
}

#[test]
fn every_aws_action_the_code_calls_is_granted_on_its_resource() {
    let t = template();
    let needs = iam_lists();
    // Only port methods: `.source.` also reaches a catalog column's `source` field.
    let ports = code_of("shared/src/ports.rs");
    for (id, crate_dir) in [
        ("ApiFunction", "functions/api"),
        ("WorkerFunction", "functions/worker"),
        ("WarmerFunction", "functions/warmer"),
        ("InvalidatorFunction", "functions/invalidator"),
    ] {
        let mut used = BTreeSet::new();
        let port_fields: BTreeSet<&str> = needs.iter().map(|n| n.port).collect();
        for (code, file) in function_code(crate_dir) {
            for &port in &port_fields {
                for method in calls_after(&code, &format!(".{port}.")) {
                    if ports.contains(&format!("fn{method}(")) {
                        used.insert((port, method, file.clone()));
                    }
                }
            }
        }
        assert!(!used.is_empty(), "{id}: no port calls found");
        for (port, method, file) in &used {
            let of_method: Vec<&IamNeed> = needs
                .iter()
                .filter(|n| n.port == *port && n.method == method)
                .collect();
            assert!(
                !of_method.is_empty(),
                "{file} calls {port}.{method}, which no adapter IAM list describes"
            );
            for need in of_method {
                for action in need.actions {
                    for resource in granted_on(need.resource) {
                        assert!(
                            grants(&t, id, action, resource),
                            "{id} calls {port}.{method} ({file}), which needs {action} on {resource:?}: template.yaml does not grant it"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn every_contract_route_is_declared() {
    let t = template();
    let routes: BTreeSet<(String, String)> = events_of_type(&t, "ApiFunction", "HttpApi")
        .into_iter()
        .map(|(name, p)| {
            assert!(
                is_ref_to(&p["ApiId"], "ExportApi"),
                "{name} is on ExportApi"
            );
            (
                p["Method"].as_str().unwrap_or_default().to_uppercase(),
                p["Path"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("GET", "/exports/{dataset}"),
        ("POST", "/exports"),
        ("POST", "/exports/refresh"),
        ("GET", "/exports/jobs/{job_id}"),
        ("GET", "/exports/jobs/{job_id}/download"),
        ("DELETE", "/exports/cache/{dataset}"),
        ("DELETE", "/exports/cache"),
        ("GET", "/exports/cache/stats"),
        ("GET", "/exports/datasets"),
        ("GET", "/"),
        ("GET", "/health"),
        ("GET", "/openapi.json"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), p.to_owned()))
    .collect();
    assert_eq!(routes, expected);
}

#[test]
fn the_page_health_and_the_openapi_document_need_no_authorizer() {
    let t = template();
    let auth = &t.properties("ExportApi").expect("ExportApi")["Auth"];
    let default = auth["DefaultAuthorizer"]
        .as_str()
        .expect("a default authorizer");
    let authorizer = &auth["Authorizers"][default];
    assert_eq!(
        authorizer["IdentitySource"].as_str(),
        Some("$request.header.Authorization")
    );
    assert!(is_ref_to(
        &authorizer["JwtConfiguration"]["issuer"],
        "JwtIssuer"
    ));
    assert!(authorizer["JwtConfiguration"]["audience"]
        .as_sequence()
        .is_some_and(|a| a.iter().any(|v| is_ref_to(v, "JwtAudience"))));

    for (name, props) in events_of_type(&t, "ApiFunction", "HttpApi") {
        let authorizer = props["Auth"]["Authorizer"].as_str();
        if matches!(
            props["Path"].as_str(),
            Some("/" | "/health" | "/openapi.json")
        ) {
            assert_eq!(authorizer, Some("NONE"), "{name}");
        } else {
            assert_eq!(authorizer, None, "{name} keeps the JWT authorizer");
        }
    }
}

#[test]
fn functions_get_the_contract_environment() {
    let t = template();
    for (id, _) in FUNCTIONS {
        let env = t.function_environment(id);
        assert!(is_ref_to(&env["META_TABLE"], "MetaTable"), "{id}");
        assert!(is_ref_to(&env["EXPORT_BUCKET"], "ExportBucket"), "{id}");
        assert!(is_ref_to(&env["JOB_QUEUE_URL"], "JobQueue"), "{id}");
        assert!(
            matches!(intrinsic(&env["SOURCE_TABLE_PREFIX"]),
                Some((name, Value::String(s))) if name == "Sub" && s == "${AWS::StackName}-"),
            "{id}"
        );
        assert!(env.contains_key("TENANT_CLAIM"), "{id}");
        assert_eq!(env["LOG_FORMAT"].as_str(), Some("json"), "{id}");
    }
    assert_eq!(
        specs().source_table_prefix,
        "export-cache-",
        "SOURCE_TABLE_PREFIX resolves to the stack prefix"
    );
}

#[test]
fn warmer_interval_matches_its_schedule() {
    let t = template();
    let schedules = events_of_type(&t, "WarmerFunction", "Schedule");
    let [(_, props)] = schedules.as_slice() else {
        panic!("the warmer has one schedule")
    };
    assert_eq!(props["Schedule"].as_str(), Some("rate(15 minutes)"));
    let env = t.function_environment("WarmerFunction");
    let interval = &env["WARM_INTERVAL_SECONDS"];
    let seconds = interval
        .as_str()
        .map(str::to_owned)
        .or_else(|| interval.as_u64().map(|n| n.to_string()));
    assert_eq!(seconds.as_deref(), Some("900"));
}

#[test]
fn outputs_name_the_stack_resources() {
    let t = template();
    let outputs = t.root()["Outputs"].as_mapping().expect("Outputs");
    for name in ["ApiUrl", "ExportBucketName", "JobQueueUrl", "MetaTableName"] {
        assert!(outputs.contains_key(name), "output {name}");
    }
    assert!(is_ref_to(&outputs["JobQueueUrl"]["Value"], "JobQueue"));
    assert!(is_ref_to(&outputs["MetaTableName"]["Value"], "MetaTable"));
    assert!(is_ref_to(
        &outputs["ExportBucketName"]["Value"],
        "ExportBucket"
    ));
}

#[test]
fn samconfig_enables_the_cargo_lambda_build() {
    let path = provision::template_path().with_file_name("samconfig.toml");
    let text = std::fs::read_to_string(&path).expect("samconfig.toml next to template.yaml");
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    assert!(lines.contains(&"beta_features = true"), "{text}");
    assert!(lines.contains(&"stack_name = \"export-cache\""), "{text}");
}

fn emulator_sdk_required() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!(
            "AWS_ENDPOINT_URL is not set: this test provisions into the local AWS emulator. \
             Run `make test`, which starts the emulator and sets it."
        )
    })
}

#[tokio::test]
async fn provisioned_stack_matches_the_template() {
    emulator_sdk_required();
    let sdk = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let stack = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let specs = template()
        .stack_specs(&stack, LOCAL_ACCOUNT_ID, "us-east-1")
        .unwrap();

    let p = provision::provision(&sdk, &provision::template_path(), &stack)
        .await
        .expect("provision");
    // Checks run in their own task so a failed assertion still reaches the teardown.
    let checked = tokio::spawn({
        let (sdk, p) = (sdk.clone(), p.clone());
        async move { check_provisioned(&sdk, &p, &specs).await }
    })
    .await;
    let torn_down = provision::teardown(&sdk, &p).await;
    match checked {
        Ok(result) => result.unwrap(),
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
    torn_down.expect("teardown");
    assert_nothing_left(&sdk, &p).await;
}

async fn check_provisioned(
    sdk: &aws_config::SdkConfig,
    p: &Provisioned,
    specs: &StackSpecs,
) -> anyhow::Result<()> {
    assert_eq!(p.names.meta_table, format!("{}-meta", p.names.stack));
    assert_eq!(p.names.orders_table, format!("{}-orders", p.names.stack));
    assert_eq!(
        p.names.customers_table,
        format!("{}-customers", p.names.stack)
    );
    assert_eq!(p.names.source_table_prefix, format!("{}-", p.names.stack));
    assert_eq!(
        p.names.bucket,
        format!("{}-files-{LOCAL_ACCOUNT_ID}", p.names.stack)
    );
    assert_eq!(p.names.queue_name, format!("{}-jobs", p.names.stack));
    assert_eq!(p.names.dlq_name, format!("{}-jobs-dlq", p.names.stack));

    let again = provision::provision(sdk, &provision::template_path(), &p.names.stack).await?;
    assert_eq!(&again, p, "provisioning twice is harmless");

    let dynamo = aws_sdk_dynamodb::Client::new(sdk);
    for spec in &specs.tables {
        let table = dynamo
            .describe_table()
            .table_name(&spec.name)
            .send()
            .await?
            .table
            .expect("table description");
        let keys = |schema: &[aws_sdk_dynamodb::types::KeySchemaElement]| -> Vec<(String, bool)> {
            schema
                .iter()
                .map(|k| {
                    (
                        k.attribute_name().to_owned(),
                        *k.key_type() == KeyType::Hash,
                    )
                })
                .collect()
        };
        let expected = |schema: &[KeyElement]| -> Vec<(String, bool)> {
            schema
                .iter()
                .map(|k| (k.attribute.clone(), k.key_type == template::KeyType::Hash))
                .collect()
        };
        assert_eq!(
            keys(table.key_schema()),
            expected(&spec.key_schema),
            "{}",
            spec.name
        );
        assert_eq!(table.global_secondary_indexes().len(), spec.gsis.len());
        for gsi in &spec.gsis {
            let actual = table
                .global_secondary_indexes()
                .iter()
                .find(|i| i.index_name() == Some(gsi.name.as_str()))
                .unwrap_or_else(|| panic!("{} has index {}", spec.name, gsi.name));
            assert_eq!(keys(actual.key_schema()), expected(&gsi.key_schema));
            assert_eq!(
                actual.projection().and_then(|p| p.projection_type()),
                Some(&ProjectionType::All)
            );
        }
        let ttl = dynamo
            .describe_time_to_live()
            .table_name(&spec.name)
            .send()
            .await?;
        let ttl = ttl.time_to_live_description();
        match &spec.ttl_attribute {
            Some(attribute) => {
                assert_eq!(
                    ttl.and_then(|d| d.attribute_name()),
                    Some(attribute.as_str())
                );
                assert_eq!(
                    ttl.and_then(|d| d.time_to_live_status()),
                    Some(&TimeToLiveStatus::Enabled)
                );
            }
            None => assert_ne!(
                ttl.and_then(|d| d.time_to_live_status()),
                Some(&TimeToLiveStatus::Enabled)
            ),
        }
    }

    let sqs = aws_sdk_sqs::Client::new(sdk);
    let attributes = |url: String| {
        let sqs = sqs.clone();
        async move {
            sqs.get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::All)
                .send()
                .await
                .map(|out| out.attributes.unwrap_or_default())
        }
    };
    let queue = attributes(p.queue_url.clone()).await?;
    let dlq = attributes(p.dlq_url.clone()).await?;
    assert_eq!(
        queue[&QueueAttributeName::VisibilityTimeout],
        specs
            .queue("JobQueue")?
            .visibility_timeout
            .unwrap()
            .to_string()
    );
    let redrive: serde_json::Value =
        serde_json::from_str(&queue[&QueueAttributeName::RedrivePolicy])?;
    assert_eq!(
        redrive["deadLetterTargetArn"].as_str(),
        Some(dlq[&QueueAttributeName::QueueArn].as_str())
    );
    assert_eq!(
        redrive["maxReceiveCount"].to_string().trim_matches('"'),
        "5"
    );
    assert_eq!(
        dlq[&QueueAttributeName::MessageRetentionPeriod],
        (14 * 24 * 3600).to_string()
    );

    let s3 = s3_client(sdk);
    s3.head_bucket().bucket(&p.names.bucket).send().await?;
    let lifecycle = s3
        .get_bucket_lifecycle_configuration()
        .bucket(&p.names.bucket)
        .send()
        .await?;
    let rule = lifecycle
        .rules()
        .iter()
        .find(|r| r.filter().and_then(|f| f.prefix()) == Some("exports/"))
        .expect("lifecycle rule on exports/");
    assert_eq!(rule.expiration().and_then(|e| e.days()), Some(7));
    assert_eq!(
        rule.abort_incomplete_multipart_upload()
            .and_then(|a| a.days_after_initiation()),
        Some(1)
    );

    // Teardown must cope with what a run leaves behind: files and an unfinished upload.
    s3.put_object()
        .bucket(&p.names.bucket)
        .key("exports/t/file.csv")
        .body(b"a,b\r\n".to_vec().into())
        .send()
        .await?;
    s3.create_multipart_upload()
        .bucket(&p.names.bucket)
        .key("exports/t/partial.csv")
        .send()
        .await?;
    Ok(())
}

fn s3_client(sdk: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(true)
            .build(),
    )
}

async fn assert_nothing_left(sdk: &aws_config::SdkConfig, p: &Provisioned) {
    let dynamo = aws_sdk_dynamodb::Client::new(sdk);
    for table in [
        &p.names.meta_table,
        &p.names.orders_table,
        &p.names.customers_table,
    ] {
        let err = dynamo
            .describe_table()
            .table_name(table)
            .send()
            .await
            .expect_err("table deleted");
        assert!(
            err.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()),
            "{table}: {err:?}"
        );
    }
    let s3 = s3_client(sdk);
    assert!(
        s3.head_bucket()
            .bucket(&p.names.bucket)
            .send()
            .await
            .is_err(),
        "bucket deleted"
    );
    let sqs = aws_sdk_sqs::Client::new(sdk);
    for name in [&p.names.queue_name, &p.names.dlq_name] {
        let err = sqs
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .expect_err("queue deleted");
        assert!(
            err.as_service_error()
                .is_some_and(|e| e.is_queue_does_not_exist()),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn the_invalidator_reads_both_source_streams_reports_failures_and_writes_only_generations() {
    let t = template();
    let streams = events_of_type(&t, "InvalidatorFunction", "DynamoDB");
    let mut tables = BTreeSet::new();
    for (name, p) in &streams {
        let Some(("GetAtt", Value::String(arg))) = intrinsic(&p["Stream"])
            .map(|(k, v)| (k.as_str().to_owned(), v))
            .as_ref()
            .map(|(k, v)| (k.as_str(), *v))
        else {
            panic!("{name}: the stream is a GetAtt: {p:?}")
        };
        let (table, attribute) = arg.split_once('.').unwrap();
        assert_eq!(attribute, "StreamArn", "{name}");
        tables.insert(table.to_string());
        assert_eq!(
            strings(&p["FunctionResponseTypes"]),
            vec!["ReportBatchItemFailures"],
            "{name}"
        );
        assert!(
            p["MaximumRetryAttempts"].as_u64().is_some_and(|n| n <= 10),
            "{name}: bounded retries"
        );
        assert!(
            is_arn_of(
                &p["DestinationConfig"]["OnFailure"]["Destination"],
                "InvalidatorFailures"
            ),
            "{name}: failed batches are kept"
        );
    }
    assert_eq!(
        tables,
        BTreeSet::from(["CustomersTable".to_string(), "OrdersTable".to_string()])
    );
    for table in ["OrdersTable", "CustomersTable"] {
        let spec = &t.resource(table).unwrap()["Properties"]["StreamSpecification"];
        assert_eq!(
            spec["StreamViewType"].as_str(),
            Some("KEYS_ONLY"),
            "{table}"
        );
    }
    const STREAM_READS: [&str; 3] = [
        "dynamodb:DescribeStream",
        "dynamodb:GetRecords",
        "dynamodb:GetShardIterator",
    ];
    for statement in statements(&t, "InvalidatorFunction") {
        for action in actions(&statement) {
            let resources = resource_values(&statement);
            if STREAM_READS.contains(&action.as_str()) {
                assert_eq!(resources.len(), 2, "the two source streams: {statement:?}");
            } else if action.starts_with("dynamodb:") {
                assert!(
                    ["dynamodb:GetItem", "dynamodb:UpdateItem"].contains(&action.as_str()),
                    "{action}"
                );
                assert!(
                    is_arn_of(&statement["Resource"], "MetaTable"),
                    "{statement:?}"
                );
            } else {
                assert_eq!(action, "sqs:SendMessage");
                assert!(is_arn_of(&statement["Resource"], "InvalidatorFailures"));
            }
        }
    }
}
