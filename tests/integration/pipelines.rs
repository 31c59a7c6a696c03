//! Pipelines through the service: the shipped sentiment pipeline answering from Kafka with its
//! step results, the same request over HTTP giving the same result document, and a reload of
//! `inferflow run` under load that loses and fails nothing.

use std::collections::BTreeMap;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferflow::config::Config;
use inferflow::executor::Executor;
use inferflow::model::{InferenceResult, Status};
use inferflow::pipeline::{PipelineExecutor, PipelineManager};
use inferflow::providers::build::build_manager;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::harness::{
    Raw, Running, Topics, collect, collect_until, config, produce, reload_with, signal,
};
use crate::utils::{self, unique_name};

/// The shipped local models, without the result cache (so a repeated request is computed
/// again, not served from the cache), and the shipped pipelines.
const MODELS: &str = r#"
[pipelines]
dir = "config/pipelines"
[providers.local.local.models.vader]
kind = "vader"
path = "models/vader"
[models."sentiment@1"]
provider = "local"
remote_model = "vader"
cache = false
"#;

/// A result document without what legitimately differs between two runs of one request:
/// timings and where it came from.
fn comparable(mut doc: Value) -> Value {
    let map = doc.as_object_mut().expect("a result is an object");
    map.remove("latency_ms");
    map.remove("source");
    if let Some(Value::Array(steps)) = map.get_mut("steps") {
        for step in steps {
            step.as_object_mut()
                .expect("a step is an object")
                .remove("latency_us");
        }
    }
    doc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sentiment_pipeline_answers_over_kafka_and_http_with_the_same_document() {
    utils::init_tracing();
    let topics = Topics::create("pipelines", 2).await;
    let group = unique_name("pipelines");
    let config: Config = config(&topics, &group, MODELS);
    let models = build_manager(&config.providers, &config.models, &config.result_cache)
        .await
        .expect("models start");
    let pipelines = Arc::new(PipelineManager::new(models));
    pipelines
        .replace_all(
            None,
            config.pipelines.load().expect("shipped pipelines load"),
        )
        .expect("shipped pipelines are valid");
    let executor: Arc<dyn Executor> = Arc::new(PipelineExecutor::new(Arc::clone(&pipelines)));
    let processor = Running::start(&config, Arc::clone(&executor)).await;

    // The HTTP API over the same executor, as `inferflow run` serves it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let api = Arc::new(inferflow::app::api(&config, Arc::clone(&executor), None));
    let server = {
        let (config, stop) = (config.clone(), stop.clone());
        tokio::spawn(async move {
            inferflow::app::serve_with(
                &config,
                listener,
                inferflow::metrics::local(),
                Some(api),
                None,
                async move { stop.cancelled().await },
            )
            .await
        })
    };

    let requests = [
        json!({"request_id": "p1", "pipeline": "sentiment", "data": {"text": "  What a GREAT\u{0007} day!  "}}),
        json!({"request_id": "p2", "pipeline": "sentiment", "data": {"text": "This is terrible and I hate it."}}),
        json!({"request_id": "p3", "pipeline": "moderation", "data": {"text": "Awful, awful service. I hate this."}}),
        json!({"request_id": "p4", "pipeline": "sentiment", "data": {"no_text": true}}),
        json!({"request_id": "p5", "pipeline": "moderation", "data": {"no_text": true}}),
    ];
    let raw: Vec<Raw> = requests
        .iter()
        .map(|r| (None, Some(r.to_string().into_bytes())))
        .collect();
    produce(&topics.requests, &raw).await;
    let out = collect(
        &[&topics.results],
        requests.len(),
        Duration::from_secs(60),
        Duration::from_millis(300),
    )
    .await;
    let by_id = crate::harness::results_by_id(&out);
    assert_eq!(by_id.len(), 5, "one result per request");

    let p1: InferenceResult = serde_json::from_value(by_id["p1"].clone()).unwrap();
    assert_eq!(p1.status, Status::Ok);
    let output = p1.output.clone().unwrap();
    assert_eq!(output["label"], "positive", "{output}");
    assert_eq!(
        output["metadata"],
        json!({"pipeline": "sentiment", "model": "vader"})
    );
    let steps: Vec<&str> = p1.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(steps, ["clean", "model:sentiment@1", "shape"]);
    assert_eq!(p1.model_version.as_deref(), Some("1"));
    assert_eq!(by_id["p2"]["output"]["label"], "negative");
    assert_eq!(
        by_id["p3"]["output"]["decision"], "review",
        "{}",
        by_id["p3"]
    );
    assert_eq!(by_id["p3"]["steps"][0]["name"], "pipeline:sentiment/clean");
    // The clean step needs `text`: a step failure, named.
    assert_eq!(
        by_id["p4"]["error"]["kind"], "step_failed",
        "{}",
        by_id["p4"]
    );
    assert!(
        by_id["p4"]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("step `clean`")
    );
    // A failed result lists the steps that ran, the failed one last; in a chained pipeline,
    // its steps up to the failure, then the chaining step.
    let names = |doc: &Value| -> Vec<String> {
        doc["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&by_id["p4"]), ["clean"], "{}", by_id["p4"]);
    assert_eq!(by_id["p5"]["error"]["kind"], "step_failed");
    assert_eq!(
        names(&by_id["p5"]),
        ["pipeline:sentiment/clean", "pipeline:sentiment"],
        "{}",
        by_id["p5"]
    );

    // The same requests over HTTP: the same documents, but for timings and `source`.
    let http = reqwest::Client::new();
    for request in &requests {
        let id = request["request_id"].as_str().unwrap();
        let response = http
            .post(format!("{url}/v1/predict"))
            .json(request)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let doc: Value = response.json().await.unwrap();
        assert_eq!(
            comparable(doc.clone()),
            comparable(by_id[id].clone()),
            "{id} over HTTP"
        );
        let failed = id == "p4" || id == "p5";
        assert_eq!(status.as_u16(), if failed { 422 } else { 200 }, "{doc}");
        assert!(doc.get("source").is_none());
    }
    // The pipeline route builds the same request from the path and the body.
    let doc: Value = http
        .post(format!("{url}/v1/pipelines/sentiment/execute"))
        .json(&json!({"request_id": "p1", "data": requests[0]["data"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(comparable(doc), comparable(by_id["p1"].clone()));

    // Errors over HTTP carry the same kinds as on the stream.
    let unknown = http
        .post(format!("{url}/v1/pipelines/nope/execute"))
        .json(&json!({"data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let doc: Value = unknown.json().await.unwrap();
    assert_eq!(doc["error"]["kind"], "unknown_pipeline");
    assert!(
        doc["request_id"].as_str().unwrap().starts_with("http-"),
        "{doc}"
    );
    let bad = http
        .post(format!("{url}/v1/predict"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let doc: Value = bad.json().await.unwrap();
    assert_eq!(doc["error"]["kind"], "invalid_json");
    let huge = "x".repeat(config.executor.max_request_bytes.get() + 1);
    let big = http
        .post(format!("{url}/v1/predict"))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    let doc: Value = big.json().await.unwrap();
    assert_eq!(doc["error"]["kind"], "payload_too_large");

    stop.cancel();
    server.await.unwrap().unwrap();
    processor.stop().await;
}

/// A pipeline file whose postprocess step stamps `version` into the output.
fn pipeline_file(version: u32) -> String {
    format!(
        r#"
id = "stamped"
[[steps]]
type = "model"
model = "echo"
[[steps]]
type = "postprocess"
transforms = [{{ op = "set", field = "version", value = {version} }}]
"#
    )
}

fn spawn(topics: &Topics, group: &str, dir: &std::path::Path, port: u16) -> Child {
    let mut cmd = crate::harness::inferflow_run(topics, group, None, "warn,inferflow::app=info");
    cmd.env("INFERFLOW__PIPELINES__DIR", dir)
        .env("INFERFLOW__HTTP__LISTEN", format!("127.0.0.1:{port}"));
    cmd.spawn().expect("start inferflow run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_loses_and_fails_no_request() {
    utils::init_tracing();
    utils::require_kafka().await;
    let topics = Topics::create("reload", 3).await;
    let group = unique_name("reload");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stamped.toml");
    std::fs::write(&file, pipeline_file(1)).unwrap();
    let port = crate::utils::free_port();
    let test_started = Instant::now();
    let mut child = spawn(&topics, &group, dir.path(), port);
    crate::harness::wait_serving(port).await;

    // 3,000 requests over about 6 s; each batch spends a little time in the slow echo model,
    // so reloads land while batches are in flight.
    const N: usize = 3000;
    let producer = {
        let topic = topics.requests.clone();
        tokio::spawn(async move {
            for chunk in 0..12 {
                let records: Vec<Raw> = (chunk * 250..(chunk + 1) * 250)
                    .map(|i| {
                        let v = json!({"request_id": format!("r{i}"), "pipeline": "stamped", "data": {"i": i}, "parameters": {"delay_ms": 1}});
                        (Some(format!("k{i}").into_bytes()), Some(v.to_string().into_bytes()))
                    })
                    .collect();
                produce(&topic, &records).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // Version 2, then an invalid file (refused: the running version stays), then version 3.
    let started = Instant::now();
    let mut applied_before = 0;
    for (at, text, outcome) in [
        (1500, pipeline_file(2), "applied"),
        (
            3000,
            pipeline_file(9).replace("echo", "no-such-model"),
            "rejected",
        ),
        (4500, pipeline_file(3), "applied"),
    ] {
        tokio::time::sleep(Duration::from_millis(at).saturating_sub(started.elapsed())).await;
        let before = reload_with(&child, port, &file, &text, outcome).await;
        if outcome == "applied" {
            applied_before = before;
        }
    }
    assert!(applied_before >= 1, "two reloads were applied");
    producer.await.unwrap();
    eprintln!("produced and reloaded after {:?}", test_started.elapsed());

    let out = collect_until(
        &[&topics.results, &topics.dlq],
        Duration::from_secs(120),
        Duration::from_secs(1),
        |out| {
            let mut seen = std::collections::HashSet::new();
            for c in out {
                seen.insert(c.key.clone());
            }
            seen.len() >= N
        },
    )
    .await;
    eprintln!("all answered after {:?}", test_started.elapsed());
    signal(&child, "-TERM");
    let status = child.wait().expect("wait");
    eprintln!("stopped after {:?}", test_started.elapsed());
    assert!(status.success(), "inferflow exited with {status}");

    let mut versions: BTreeMap<u64, usize> = BTreeMap::new();
    let mut ids = std::collections::HashSet::new();
    for c in &out {
        assert_eq!(c.topic, topics.results, "no dead letters");
        let doc: Value = serde_json::from_slice(c.value.as_deref().unwrap()).unwrap();
        assert_eq!(doc["status"], "ok", "no request failed: {doc}");
        *versions
            .entry(doc["output"]["version"].as_u64().unwrap())
            .or_default() += 1;
        ids.insert(doc["request_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), N, "every request answered");
    eprintln!("results by pipeline version: {versions:?}");
    assert!(!versions.contains_key(&9), "the refused version never ran");
    assert!(
        versions.contains_key(&1) && versions.contains_key(&3),
        "{versions:?}"
    );
}

/// A pipeline that reads a feature group from the CQL store for the request's entity, builds a
/// prompt from it with a template and sends it to a model: over Kafka, with the store's
/// real backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_features_step_reads_the_store_for_the_requests_entity() {
    use inferflow::feature_store::FeatureStore;

    utils::init_tracing();
    let topics = Topics::create("pipefeat", 2).await;
    let group = unique_name("pipefeat");
    let keyspace = unique_name("pipefeat");
    let config: Config = config(
        &topics,
        &group,
        &format!(
            "[feature_store]\ncontact_points = [\"{}\"]\nkeyspace = \"{keyspace}\"\n",
            utils::cql_contact()
        ),
    );
    let store = Arc::new(
        FeatureStore::open(&config.feature_store)
            .await
            .expect("store opens"),
    );
    crate::harness::write_profiles(&store).await;

    let pipelines = Arc::new(
        PipelineManager::new(Arc::new(inferflow::providers::manager::ModelManager::new()))
            .with_feature_store(Arc::clone(&store)),
    );
    pipelines
        .create_pipeline(
            inferflow::pipeline::def::parse(
                &format!("id = \"personal\"\n{}", crate::harness::PERSONAL_STEPS),
                "personal",
                "test",
            )
            .unwrap(),
        )
        .unwrap();
    let processor = Running::start(
        &config,
        Arc::new(PipelineExecutor::new(Arc::clone(&pipelines))),
    )
    .await;
    let requests = [
        json!({"request_id": "f1", "pipeline": "personal", "entity": {"type": "user", "id": "u1"}, "data": {"question": "where is my order?"}}),
        json!({"request_id": "f2", "pipeline": "personal", "entity": {"type": "user", "id": "u2"}, "data": {"question": "hi"}}),
        json!({"request_id": "f3", "pipeline": "personal", "entity": {"type": "user", "id": "nobody"}, "data": {"question": "hi"}}),
        json!({"request_id": "f4", "pipeline": "personal", "data": {"question": "no entity"}}),
    ];
    let by_id = crate::harness::request_all(
        &topics,
        &requests,
        Duration::from_secs(60),
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(
        by_id["f1"]["output"], "Answer a gold customer: where is my order?",
        "{}",
        by_id["f1"]
    );
    assert_eq!(by_id["f1"]["steps"][0]["name"], "features:prompting");
    assert_eq!(by_id["f2"]["output"], "Answer a silver customer: hi");
    // No features for this entity: the template cannot be filled, and says so.
    assert_eq!(
        by_id["f3"]["error"]["kind"], "step_failed",
        "{}",
        by_id["f3"]
    );
    assert_eq!(
        by_id["f4"]["error"]["kind"], "invalid_request",
        "{}",
        by_id["f4"]
    );
    assert!(
        by_id["f4"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no `entity`")
    );
    // The step record says where the features came from: the first read of u1 went to the
    // database, a later one is answered by the cache.
    assert_eq!(by_id["f1"]["steps"][0]["cached"], false, "{}", by_id["f1"]);
    produce(
        &topics.requests,
        &[(
            None,
            Some(
                json!({"request_id": "f5", "pipeline": "personal", "entity": {"type": "user", "id": "u1"}, "data": {"question": "again"}})
                    .to_string()
                    .into_bytes(),
            ),
        )],
    )
    .await;
    let out = collect(
        &[&topics.results],
        5,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    let by_id = crate::harness::results_by_id(&out);
    assert_eq!(by_id["f5"]["output"], "Answer a gold customer: again");
    assert_eq!(by_id["f5"]["steps"][0]["cached"], true, "{}", by_id["f5"]);
    processor.stop().await;
    utils::cql_session()
        .await
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), &[])
        .await
        .unwrap();
}

/// With `pipelines.watch`, editing a pipeline file or the configuration file reloads without a
/// signal: a changed pipeline, then a configuration that adds a model (the models are rebuilt)
/// and a pipeline that uses it. Observed over the HTTP API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watch_reloads_pipelines_and_models() {
    utils::init_tracing();
    utils::require_kafka().await;
    let topics = Topics::create("watch", 1).await;
    let group = unique_name("watch");
    let dir = tempfile::tempdir().unwrap();
    let pipelines_dir = dir.path().join("pipelines");
    std::fs::create_dir(&pipelines_dir).unwrap();
    std::fs::write(pipelines_dir.join("stamped.toml"), pipeline_file(1)).unwrap();
    let config_file = dir.path().join("inferflow.toml");
    let base = format!(
        "[pipelines]\ndir = \"{}\"\nwatch = true\nwatch_interval_ms = 200\n[ingest]\nenabled = false\n",
        pipelines_dir.display()
    );
    std::fs::write(&config_file, &base).unwrap();
    let port = crate::utils::free_port();
    let mut cmd = crate::harness::inferflow_run(
        &topics,
        &group,
        Some(&config_file),
        "warn,inferflow::app=info",
    );
    cmd.env("INFERFLOW__HTTP__LISTEN", format!("127.0.0.1:{port}"));
    let mut child = cmd.spawn().expect("start inferflow run");
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let execute = |pipeline: &'static str, data: Value| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let response = http
                .post(format!("{url}/v1/pipelines/{pipeline}/execute"))
                .json(&json!({ "data": data }))
                .send()
                .await
                .ok()?;
            response.json::<Value>().await.ok()
        }
    };
    let wait_for =
        |what: &'static str, pipeline: &'static str, data: Value, check: fn(&Value) -> bool| {
            let execute = &execute;
            async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    if let Some(doc) = execute(pipeline, data.clone()).await
                        && check(&doc)
                    {
                        return doc;
                    }
                    assert!(Instant::now() < deadline, "not within 60 s: {what}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
    wait_for("version 1 is served", "stamped", json!({}), |d| {
        d["output"]["version"] == 1
    })
    .await;

    std::fs::write(pipelines_dir.join("stamped.toml"), pipeline_file(2)).unwrap();
    wait_for(
        "the edited pipeline file is picked up",
        "stamped",
        json!({}),
        |d| d["output"]["version"] == 2,
    )
    .await;

    // A new model in the configuration file and a pipeline using it, in one change each.
    let with_model = format!(
        "{base}[providers.local.local.models.vader]\nkind = \"vader\"\npath = \"models/vader\"\n[models.\"sentiment@1\"]\nprovider = \"local\"\nremote_model = \"vader\"\n"
    );
    std::fs::write(
        pipelines_dir.join("mood.toml"),
        "[[steps]]\ntype = \"model\"\nmodel = \"sentiment@1\"\n",
    )
    .unwrap();
    std::fs::write(&config_file, with_model).unwrap();
    let doc = wait_for(
        "the new model serves the new pipeline",
        "mood",
        json!({"text": "I love it"}),
        |d| d["status"] == "ok",
    )
    .await;
    assert_eq!(doc["output"]["label"], "positive", "{doc}");
    // The running pipeline survived both reloads.
    assert_eq!(
        execute("stamped", json!({})).await.unwrap()["output"]["version"],
        2
    );

    signal(&child, "-TERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "inferflow exited with {status}");
}
