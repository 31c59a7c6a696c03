//! The wire contract in `schemas/` against the examples in `examples/` and against the Rust wire
//! types in `inferflow::model`.
//!
//! Every schema must be valid Draft 2020-12; every example must validate (or, under
//! `examples/invalid/`, must not); and the schemas must describe exactly what the Rust types read
//! and write, so that neither side can change without the other. All `$ref`s are resolved from
//! an in-memory registry of `schemas/*.json`: nothing is fetched.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use inferflow::model::{
    Entity, ErrorBody, ErrorKind, FeatureRead, InferenceRequest, InferenceResult, SourceRef,
    Status, StepRecord,
};
use jsonschema::{Draft, Registry, Validator};
use serde_json::{Map, Value, json};

const SCHEMA_BASE: &str = "https://inferflow.dev/schemas/";
const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";
const REQUEST_SCHEMA: &str = "inference_request.v1.json";
const RESULT_SCHEMA: &str = "inference_result.v1.json";
const DEAD_LETTER_SCHEMA: &str = "dead_letter.v1.json";
const FEATURE_UPDATE_SCHEMA: &str = "feature_update.v1.json";
const SHADOW_RESULT_SCHEMA: &str = "shadow_result.v1.json";

/// Every file in `examples/invalid/`, and whether serde also rejects it when deserialising an
/// `InferenceRequest`. The schema must reject all of them; the schema path suffix is the keyword
/// expected to report the problem. A file missing from this table fails the test, so each new
/// invalid example states which layer rejects it.
const INVALID_REQUESTS: &[(&str, SerdeVerdict, &str)] = &[
    (
        "both_pipeline_and_model.json",
        SerdeVerdict::Accepts,
        "/oneOf",
    ),
    (
        "deadline_not_integer.json",
        SerdeVerdict::Rejects,
        "/properties/deadline_ms/type",
    ),
    (
        "empty_request_id.json",
        SerdeVerdict::Accepts,
        "/properties/request_id/minLength",
    ),
    (
        "entity_missing_id.json",
        SerdeVerdict::Rejects,
        "/properties/entity/required",
    ),
    (
        "entity_unknown_field.json",
        SerdeVerdict::Rejects,
        "/properties/entity/additionalProperties",
    ),
    ("missing_data.json", SerdeVerdict::Rejects, "/required"),
    (
        "missing_request_id.json",
        SerdeVerdict::Rejects,
        "/required",
    ),
    (
        "neither_pipeline_nor_model.json",
        SerdeVerdict::Accepts,
        "/oneOf",
    ),
    ("not_an_object.json", SerdeVerdict::Rejects, "/type"),
    (
        "parameters_not_object.json",
        SerdeVerdict::Rejects,
        "/properties/parameters/type",
    ),
    (
        "pipeline_not_string.json",
        SerdeVerdict::Rejects,
        "/properties/pipeline/type",
    ),
    (
        "reply_to_not_a_topic_name.json",
        SerdeVerdict::Accepts,
        "/properties/reply_to/pattern",
    ),
    (
        "request_id_too_long.json",
        SerdeVerdict::Accepts,
        "/properties/request_id/maxLength",
    ),
    (
        "unknown_field.json",
        SerdeVerdict::Rejects,
        "/additionalProperties",
    ),
];

/// What `serde_json::from_value::<InferenceRequest>` does with an invalid example. `Accepts`
/// means only the schema (and inferflow's own request validation) catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SerdeVerdict {
    Accepts,
    Rejects,
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read_json(path: &Path) -> Value {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The `*.json` files directly in `dir` (relative to the repository root), sorted; never empty.
fn json_files(dir: &str) -> Vec<PathBuf> {
    let dir = repo_path(dir);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.json files in {}", dir.display());
    files
}

fn file_name(path: &Path) -> &str {
    path.file_name()
        .and_then(|name| name.to_str())
        .expect("UTF-8 file name")
}

/// Every `schemas/*.json`, as (file name, document).
fn schema_files() -> Vec<(String, Value)> {
    json_files("schemas")
        .into_iter()
        .map(|path| (file_name(&path).to_owned(), read_json(&path)))
        .collect()
}

fn schema(name: &str) -> Value {
    read_json(&repo_path(&format!("schemas/{name}")))
}

/// A Draft 2020-12 validator for `schemas/<name>`, resolving `$ref`s among the schema files only.
fn validator(name: &str) -> Validator {
    let resources = schema_files()
        .into_iter()
        .map(|(file, document)| (format!("{SCHEMA_BASE}{file}"), document));
    let registry = Registry::new()
        .extend(resources)
        .and_then(|builder| builder.prepare())
        .unwrap_or_else(|e| panic!("cannot build the schema registry: {e}"));
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .with_registry(&registry)
        .offline()
        .build(&schema(name))
        .unwrap_or_else(|e| panic!("schemas/{name} does not compile: {e}"))
}

/// Every validation error, as `instance path: message (schema path)`.
fn errors(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e} (at {})", e.instance_path(), e.schema_path()))
        .collect()
}

fn assert_valid(validator: &Validator, instance: &Value, what: &str) {
    let errors = errors(validator, instance);
    assert!(
        errors.is_empty(),
        "{what} should be valid but is not:\n  {}\ninstance: {instance:#}",
        errors.join("\n  ")
    );
}

fn assert_invalid(validator: &Validator, instance: &Value, what: &str) -> Vec<String> {
    let errors = errors(validator, instance);
    assert!(
        !errors.is_empty(),
        "{what} should be invalid but validates; instance: {instance:#}"
    );
    errors
}

/// Keys of a JSON object.
fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .cloned()
        .collect()
}

/// `required` of a schema object, as a set.
fn required(schema: &Value) -> BTreeSet<String> {
    schema["required"]
        .as_array()
        .unwrap_or_else(|| panic!("no `required` array in {schema}"))
        .iter()
        .map(|name| {
            name.as_str()
                .expect("required names are strings")
                .to_owned()
        })
        .collect()
}

/// Asserts that `schema.properties` names exactly the fields of `full` (a Rust value with every
/// optional field set), and `schema.required` exactly those of `minimal` (every optional field
/// unset): a field added, renamed or made optional on one side only fails here.
fn assert_fields_match(schema: &Value, full: &Value, minimal: &Value, what: &str) {
    assert_eq!(
        keys(&schema["properties"]),
        keys(full),
        "{what}: schema properties (left) differ from the Rust type's fields (right)"
    );
    assert_eq!(
        required(schema),
        keys(minimal),
        "{what}: schema `required` (left) differs from the Rust type's non-optional fields (right)"
    );
    assert_eq!(
        schema["additionalProperties"],
        json!(false),
        "{what}: the schema should be closed, like the Rust type"
    );
}

fn full_request() -> InferenceRequest {
    let mut parameters = Map::new();
    parameters.insert("temperature".into(), json!(0.2));
    InferenceRequest {
        request_id: "rust-full".into(),
        pipeline: Some("identity".into()),
        model: Some("echo@1".into()),
        data: json!({"text": "hello"}),
        parameters: Some(parameters),
        entity: Some(Entity {
            entity_type: "user".into(),
            id: "u-1".into(),
        }),
        reply_to: Some("inferflow.results.team-a".into()),
        deadline_ms: Some(4_102_444_800_000),
        tenant: Some("acme".into()),
    }
}

fn steps() -> Vec<StepRecord> {
    vec![
        StepRecord {
            name: "features".into(),
            latency_us: 830,
            cached: true,
            output: Some(json!({"orders_30d": 4})),
            features: vec![
                FeatureRead {
                    entity_type: "user".into(),
                    entity_id: "u-1".into(),
                    feature: "orders_30d".into(),
                    version: Some(9_007_199_254_740_991),
                },
                FeatureRead {
                    entity_type: "user".into(),
                    entity_id: "u-1".into(),
                    feature: "country".into(),
                    version: None,
                },
            ],
        },
        StepRecord {
            name: "echo".into(),
            latency_us: 0,
            cached: false,
            output: None,
            features: Vec::new(),
        },
    ]
}

fn source() -> SourceRef {
    SourceRef {
        topic: "inferflow.requests".into(),
        partition: 5,
        offset: 9_007_199_254_740_993,
    }
}

fn ok_result() -> InferenceResult {
    InferenceResult {
        request_id: "rust-ok".into(),
        status: Status::Ok,
        output: Some(json!({"text": "hello", "score": 0.93})),
        error: None,
        pipeline: Some("identity".into()),
        model: Some("echo@1".into()),
        model_version: Some("1".into()),
        cached: false,
        latency_ms: 12,
        steps: steps(),
        source: Some(source()),
    }
}

fn error_result(kind: ErrorKind) -> InferenceResult {
    InferenceResult {
        request_id: "rust-error".into(),
        status: Status::Error,
        output: None,
        error: Some(ErrorBody::new(kind, format!("a {kind} error"))),
        pipeline: None,
        model: Some("echo".into()),
        model_version: None,
        cached: false,
        latency_ms: 0,
        steps: steps(),
        source: Some(source()),
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("wire types serialise")
}

/// Every string in `errors`, for an assertion message.
fn show(errors: &[String]) -> String {
    errors.join("\n  ")
}

#[test]
fn schemas_are_valid_draft_2020_12_and_well_formed() {
    let files = schema_files();
    let names: BTreeSet<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            DEAD_LETTER_SCHEMA,
            FEATURE_UPDATE_SCHEMA,
            REQUEST_SCHEMA,
            RESULT_SCHEMA,
            SHADOW_RESULT_SCHEMA
        ]),
        "unexpected set of schema files; update this test and schemas/README.md"
    );
    let meta = jsonschema::draft202012::meta::validator();
    let readme = fs::read_to_string(repo_path("schemas/README.md")).expect("schemas/README.md");
    for (name, document) in &files {
        let meta_errors: Vec<String> = meta
            .iter_errors(document)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(
            meta_errors.is_empty(),
            "schemas/{name} is not a valid Draft 2020-12 schema:\n  {}",
            show(&meta_errors)
        );
        assert_eq!(
            document["$schema"], DRAFT_2020_12,
            "schemas/{name}: $schema"
        );
        assert_eq!(
            document["$id"],
            format!("{SCHEMA_BASE}{name}"),
            "schemas/{name}: $id must be the base URI plus the file name"
        );
        for keyword in ["title", "description"] {
            assert!(
                document[keyword].as_str().is_some_and(|s| !s.is_empty()),
                "schemas/{name}: no {keyword}"
            );
        }
        let undocumented = undocumented_properties(document, "");
        assert!(
            undocumented.is_empty(),
            "schemas/{name}: properties without a description: {undocumented:?}"
        );
        assert!(
            readme.contains(name.as_str()),
            "schemas/README.md does not mention {name}"
        );

        // The schema compiles (with its cross-file references) and accepts its own examples.
        let validator = validator(name);
        let examples = document["examples"]
            .as_array()
            .unwrap_or_else(|| panic!("schemas/{name}: no `examples` array"));
        assert!(!examples.is_empty(), "schemas/{name}: `examples` is empty");
        for (i, example) in examples.iter().enumerate() {
            assert_valid(
                &validator,
                example,
                &format!("schemas/{name} examples[{i}]"),
            );
        }
    }
}

/// JSON pointers of every entry of a `properties` keyword (at any depth, except in conditions)
/// lacking a description.
fn undocumented_properties(node: &Value, pointer: &str) -> Vec<String> {
    let mut missing = Vec::new();
    match node {
        Value::Object(object) => {
            if let Some(Value::Object(properties)) = object.get("properties") {
                for (name, property) in properties {
                    if property["description"].as_str().is_none_or(str::is_empty) {
                        missing.push(format!("{pointer}/properties/{name}"));
                    }
                }
            }
            for (key, child) in object {
                // Examples are instances, not schemas; an `if` tests fields, it declares none.
                if key != "examples" && key != "if" {
                    missing.extend(undocumented_properties(child, &format!("{pointer}/{key}")));
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                missing.extend(undocumented_properties(child, &format!("{pointer}/{i}")));
            }
        }
        _ => {}
    }
    missing
}

#[test]
fn example_requests_are_valid_and_deserialise() {
    let validator = validator(REQUEST_SCHEMA);
    for path in json_files("examples/requests") {
        let what = format!("examples/requests/{}", file_name(&path));
        let document = read_json(&path);
        assert_valid(&validator, &document, &what);
        let request: InferenceRequest = serde_json::from_value(document.clone())
            .unwrap_or_else(|e| panic!("{what} does not deserialise into InferenceRequest: {e}"));
        assert_eq!(
            to_json(&request),
            document,
            "{what}: serialising the deserialised request changes it"
        );
        assert!(
            request.pipeline.is_some() != request.model.is_some(),
            "{what}: exactly one of pipeline and model"
        );
    }
}

#[test]
fn demo_jsonl_requests_are_valid_and_use_built_in_targets() {
    let validator = validator(REQUEST_SCHEMA);
    let path = repo_path("examples/requests.jsonl");
    let text = fs::read_to_string(&path).expect("examples/requests.jsonl");
    let mut ids = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let what = format!("examples/requests.jsonl line {}", i + 1);
        assert!(!line.trim().is_empty(), "{what} is blank");
        let document: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{what} is not JSON: {e}"));
        assert_valid(&validator, &document, &what);
        let request: InferenceRequest = serde_json::from_value(document.clone())
            .unwrap_or_else(|e| panic!("{what} does not deserialise into InferenceRequest: {e}"));
        assert_eq!(to_json(&request), document, "{what}: does not round-trip");
        let target = (request.pipeline.as_deref(), request.model.as_deref());
        assert!(
            matches!(target, (Some("identity"), None) | (None, Some("echo"))),
            "{what}: the demo may only use the built-in pipeline `identity` or model `echo`, \
             not {target:?}"
        );
        ids.push(request.request_id);
    }
    let expected: Vec<String> = (1..=8).map(|n| format!("demo-{n}")).collect();
    assert_eq!(
        ids, expected,
        "examples/requests.jsonl: request ids should be demo-1..demo-8 in order"
    );
}

#[test]
fn invalid_requests_fail_the_schema_and_serde_verdicts_are_as_stated() {
    let validator = validator(REQUEST_SCHEMA);
    let files = json_files("examples/invalid");
    let listed: BTreeSet<&str> = INVALID_REQUESTS.iter().map(|(name, ..)| *name).collect();
    let present: BTreeSet<&str> = files.iter().map(|path| file_name(path)).collect();
    assert_eq!(
        present, listed,
        "examples/invalid/ (left) and INVALID_REQUESTS (right) must list the same files"
    );
    for (name, serde_verdict, schema_keyword) in INVALID_REQUESTS {
        let what = format!("examples/invalid/{name}");
        let document = read_json(&repo_path(&what));
        let errors = assert_invalid(&validator, &document, &what);
        assert!(
            errors
                .iter()
                .any(|e| e.ends_with(&format!("{schema_keyword})"))),
            "{what}: expected an error from schema keyword {schema_keyword}, got:\n  {}",
            show(&errors)
        );
        let serde = serde_json::from_value::<InferenceRequest>(document.clone());
        match (serde_verdict, &serde) {
            (SerdeVerdict::Rejects, Err(_)) | (SerdeVerdict::Accepts, Ok(_)) => {}
            (SerdeVerdict::Rejects, Ok(request)) => panic!(
                "{what}: INVALID_REQUESTS says serde rejects it, but it deserialises: {request:?}"
            ),
            (SerdeVerdict::Accepts, Err(e)) => panic!(
                "{what}: INVALID_REQUESTS says only the schema rejects it, but serde does too: {e}"
            ),
        }
    }
}

#[test]
fn example_results_are_valid_and_deserialise() {
    let validator = validator(RESULT_SCHEMA);
    let mut statuses = BTreeSet::new();
    for path in json_files("examples/results") {
        let what = format!("examples/results/{}", file_name(&path));
        let document = read_json(&path);
        assert_valid(&validator, &document, &what);
        let result: InferenceResult = serde_json::from_value(document.clone())
            .unwrap_or_else(|e| panic!("{what} does not deserialise into InferenceResult: {e}"));
        assert_eq!(to_json(&result), document, "{what}: does not round-trip");
        statuses.insert(result.status.as_str());
    }
    assert_eq!(
        statuses,
        BTreeSet::from(["error", "ok"]),
        "examples/results/ should show both an ok and an error result"
    );
}

#[test]
fn rust_results_validate_against_the_result_schema() {
    let validator = validator(RESULT_SCHEMA);
    assert_valid(&validator, &to_json(&ok_result()), "Rust ok result");
    for kind in ErrorKind::ALL {
        assert_valid(
            &validator,
            &to_json(&error_result(kind)),
            &format!("Rust error result of kind {kind}"),
        );
    }

    let http_ok = InferenceResult {
        source: None,
        steps: Vec::new(),
        ..ok_result()
    };
    assert_valid(
        &validator,
        &to_json(&http_ok),
        "Rust ok result without source",
    );

    // The status-dependent rules bite.
    let ok_without_output = InferenceResult {
        output: None,
        ..ok_result()
    };
    assert_invalid(
        &validator,
        &to_json(&ok_without_output),
        "ok result without output",
    );
    let ok_with_error = InferenceResult {
        error: Some(ErrorBody::new(ErrorKind::Internal, "both")),
        ..ok_result()
    };
    assert_invalid(
        &validator,
        &to_json(&ok_with_error),
        "ok result with an error",
    );
    let error_without_error = InferenceResult {
        error: None,
        ..error_result(ErrorKind::Internal)
    };
    assert_invalid(
        &validator,
        &to_json(&error_without_error),
        "error result without error",
    );
    let error_with_output = InferenceResult {
        output: Some(json!(1)),
        ..error_result(ErrorKind::Internal)
    };
    assert_invalid(
        &validator,
        &to_json(&error_with_output),
        "error result with output",
    );

    let mut unknown_kind = to_json(&error_result(ErrorKind::Internal));
    unknown_kind["error"]["kind"] = json!("internal_error");
    assert_invalid(
        &validator,
        &unknown_kind,
        "error result with an unknown kind",
    );
}

#[test]
fn rust_requests_validate_against_the_request_schema() {
    let validator = validator(REQUEST_SCHEMA);
    let full = full_request();
    let pipeline_only = InferenceRequest {
        model: None,
        ..full.clone()
    };
    let model_only = InferenceRequest {
        pipeline: None,
        ..full.clone()
    };
    assert_valid(
        &validator,
        &to_json(&pipeline_only),
        "Rust request with a pipeline",
    );
    assert_valid(
        &validator,
        &to_json(&model_only),
        "Rust request with a model",
    );
    // Serde allows both targets at once; the schema does not.
    assert_invalid(
        &validator,
        &to_json(&full),
        "Rust request with both targets",
    );
}

#[test]
fn schema_fields_match_the_rust_types() {
    let request_schema = schema(REQUEST_SCHEMA);
    let full = full_request();
    let minimal = InferenceRequest {
        request_id: "rust-minimal".into(),
        pipeline: None,
        model: None,
        data: Value::Null,
        parameters: None,
        entity: None,
        reply_to: None,
        deadline_ms: None,
        tenant: None,
    };
    assert_fields_match(
        &request_schema,
        &to_json(&full),
        &to_json(&minimal),
        "InferenceRequest",
    );
    let entity = to_json(full.entity.as_ref().expect("entity"));
    assert_fields_match(
        &request_schema["properties"]["entity"],
        &entity,
        &entity,
        "Entity",
    );

    let result_schema = schema(RESULT_SCHEMA);
    let defs = &result_schema["$defs"];
    let full_result = InferenceResult {
        error: Some(ErrorBody::new(
            ErrorKind::Internal,
            "set for the field list",
        )),
        ..ok_result()
    };
    let minimal_result = InferenceResult {
        request_id: "rust-minimal".into(),
        status: Status::Ok,
        output: None,
        error: None,
        pipeline: None,
        model: None,
        model_version: None,
        cached: false,
        latency_ms: 0,
        steps: Vec::new(),
        source: None,
    };
    assert_fields_match(
        &result_schema,
        &to_json(&full_result),
        &to_json(&minimal_result),
        "InferenceResult",
    );
    let [full_step, minimal_step] = [&steps()[0], &steps()[1]].map(to_json);
    assert_fields_match(&defs["step"], &full_step, &minimal_step, "StepRecord");
    let source = to_json(&source());
    assert_fields_match(&defs["source"], &source, &source, "SourceRef");
    let error = to_json(&ErrorBody::new(ErrorKind::Internal, "x"));
    assert_fields_match(&defs["error_body"], &error, &error, "ErrorBody");

    let statuses: Vec<Value> = [Status::Ok, Status::Error]
        .into_iter()
        .map(|status| {
            assert_eq!(to_json(&status), json!(status.as_str()));
            json!(status.as_str())
        })
        .collect();
    assert_eq!(
        result_schema["properties"]["status"]["enum"],
        Value::Array(statuses),
        "status enum"
    );
}

#[test]
fn error_kind_enum_matches_rust_exactly_and_in_order() {
    let result_schema = schema(RESULT_SCHEMA);
    let in_schema: Vec<&str> = result_schema["$defs"]["error_kind"]["enum"]
        .as_array()
        .expect("$defs/error_kind/enum is an array")
        .iter()
        .map(|kind| kind.as_str().expect("error kinds are strings"))
        .collect();
    let in_rust: Vec<&str> = ErrorKind::ALL.map(ErrorKind::as_str).to_vec();
    assert_eq!(
        in_schema, in_rust,
        "schema $defs/error_kind (left) vs ErrorKind::ALL (right)"
    );
    for kind in ErrorKind::ALL {
        assert_eq!(
            to_json(&kind),
            json!(kind.as_str()),
            "serde and as_str disagree on {kind:?}"
        );
        assert_eq!(kind.to_string(), kind.as_str());
    }
    // The description documents every kind.
    let description = result_schema["$defs"]["error_kind"]["description"]
        .as_str()
        .expect("error_kind description");
    for kind in in_rust {
        assert!(
            description.contains(kind),
            "$defs/error_kind description does not mention {kind}"
        );
    }
}

#[test]
fn dead_letter_header_maps_validate() {
    let validator = validator(DEAD_LETTER_SCHEMA);
    let headers = |kind: &str| {
        json!({"headers": {
            "inferflow-error-kind": kind,
            "inferflow-error-message": "expected value at line 1 column 1",
            "inferflow-source-topic": "inferflow.requests",
            "inferflow-source-partition": "0",
            "inferflow-source-offset": "9007199254740993",
        }})
    };
    // The kind comes from the result schema through a cross-file $ref: every Rust kind passes.
    for kind in ErrorKind::ALL {
        assert_valid(
            &validator,
            &headers(kind.as_str()),
            &format!("dead-letter headers with kind {kind}"),
        );
    }
    let mut foreign = headers("invalid_json");
    foreign["headers"]["traceparent"] =
        json!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    assert_valid(
        &validator,
        &foreign,
        "dead-letter headers with a non-inferflow header",
    );

    let mut cases = Vec::new();
    cases.push(("unknown kind", headers("no_such_kind")));
    let mut missing = headers("invalid_json");
    missing["headers"]
        .as_object_mut()
        .expect("object")
        .remove("inferflow-source-offset");
    cases.push(("missing offset", missing));
    let mut numeric = headers("invalid_json");
    numeric["headers"]["inferflow-source-partition"] = json!(0);
    cases.push(("partition as a number, not a string", numeric));
    let mut not_decimal = headers("invalid_json");
    not_decimal["headers"]["inferflow-source-offset"] = json!("-1");
    cases.push(("negative offset", not_decimal));
    let mut misspelt = headers("invalid_json");
    misspelt["headers"]["inferflow-error-kinds"] = json!("internal");
    cases.push(("misspelt inferflow- header", misspelt));
    cases.push((
        "bare header map",
        headers("invalid_json")["headers"].clone(),
    ));
    for (what, instance) in cases {
        assert_invalid(
            &validator,
            &instance,
            &format!("dead-letter headers: {what}"),
        );
    }
}

/// Feature updates: the schema matches `FeatureUpdateMessage` field by field, every example in
/// `examples/features/` is valid and decodes, and every file in `examples/features/invalid/`
/// fails both the schema and inferflow's decoding.
#[test]
fn feature_update_schema_matches_the_type_and_examples_decode_as_stated() {
    use inferflow::feature_store::ingest::{FeatureUpdateMessage, decode_update};
    let schema_doc = schema(FEATURE_UPDATE_SCHEMA);
    let full = FeatureUpdateMessage {
        entity_type: "user".into(),
        entity_id: "1".into(),
        feature: "f".into(),
        values: Map::new(),
        version: Some(1),
        event_time: Some(2),
        ttl_seconds: Some(3),
    };
    let minimal = FeatureUpdateMessage {
        version: None,
        event_time: None,
        ttl_seconds: None,
        ..full.clone()
    };
    assert_fields_match(
        &schema_doc,
        &to_json(&full),
        &to_json(&minimal),
        "feature update",
    );
    let validator = validator(FEATURE_UPDATE_SCHEMA);
    let valid = json_files("examples/features");
    assert!(valid.len() >= 2, "expected feature update examples");
    for path in &valid {
        let doc = read_json(path);
        assert_valid(&validator, &doc, file_name(path));
        let bytes = serde_json::to_vec(&doc).expect("serialise");
        decode_update(Some(&bytes), 1 << 20, Some(1_764_244_800_000))
            .unwrap_or_else(|e| panic!("{} does not decode: {e:?}", file_name(path)));
    }
    let invalid = json_files("examples/features/invalid");
    assert!(
        invalid.len() >= 5,
        "expected invalid feature update examples"
    );
    for path in &invalid {
        let doc = read_json(path);
        assert_invalid(&validator, &doc, file_name(path));
        let bytes = serde_json::to_vec(&doc).expect("serialise");
        let error = decode_update(Some(&bytes), 1 << 20, Some(1))
            .expect_err(&format!("{} decodes but should not", file_name(path)));
        assert_eq!(
            error.kind.as_str(),
            "invalid_request",
            "{}: {}",
            file_name(path),
            error.message
        );
    }
}
