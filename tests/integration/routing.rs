//! Weighted routes over Kafka: a 90/10 split of `sentiment` between two versions holds its
//! shares and keeps every entity on one version; an explicit `name@version` wins; and a reload
//! of `inferflow run` from 90/10 to 0/100 under load (after a refused one) loses and fails
//! nothing, switches the versions, and `/v1/predict` routes like the stream.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferflow::config::Config;
use inferflow::model::InferenceResult;
use inferflow::pipeline::{PipelineExecutor, PipelineManager};
use inferflow::providers::build::{build_manager, with_routes};
use serde_json::{Value, json};

use crate::harness::{
    Raw, Running, Topics, collect, collect_until, config, produce, reload_with, signal,
};
use crate::utils::{self, unique_name};

/// The shipped VADER model under two versions, without the result cache.
const MODELS: &str = r#"
[providers.local.local.models.vader]
kind = "vader"
path = "models/vader"
[models."sentiment@1"]
provider = "local"
remote_model = "vader"
cache = false
[models."sentiment@2"]
provider = "local"
remote_model = "vader"
cache = false
"#;

fn routes(v1: u32, v2: u32) -> String {
    format!("[routes.sentiment]\nversions = {{ \"1\" = {v1}, \"2\" = {v2} }}\n")
}

/// Each version's labels and scores as metrics, with a one-second reference window.
const MONITOR: &str = r#"
[routes.sentiment.monitor]
labels = ["label"]
scores = ["compound"]
score_bins = [-0.5, -0.05, 0.05, 0.5]
reference_secs = 1
current_secs = 60
"#;

/// A request for `model` from entity `user/u{entity}`.
fn request(id: &str, model: &str, entity: usize) -> Value {
    json!({
        "request_id": id,
        "model": model,
        "entity": {"type": "user", "id": format!("u{entity}")},
        "data": {"text": format!("Review {id} says this is great!")},
    })
}

fn raw(requests: &[Value]) -> Vec<Raw> {
    requests
        .iter()
        .map(|r| (None, Some(r.to_string().into_bytes())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_route_holds_its_shares_and_keeps_each_entity_on_one_version() {
    utils::init_tracing();
    let topics = Topics::create("routing", 3).await;
    let group = unique_name("routing");
    let config: Config = config(&topics, &group, &format!("{MODELS}\n{}", routes(90, 10)));
    let models = build_manager(&config.providers, &config.models, &config.result_cache)
        .await
        .expect("models start");
    let models = with_routes(&models, &config.routes).expect("routes");
    let executor = Arc::new(PipelineExecutor::new(Arc::new(PipelineManager::new(
        models,
    ))));
    let processor = Running::start(&config, executor).await;

    const N: usize = 10_000;
    const ENTITIES: usize = 1_000;
    let mut requests: Vec<Value> = (0..N)
        .map(|i| request(&format!("r{i}"), "sentiment", i % ENTITIES))
        .collect();
    // An explicit version always wins: every entity once more, naming `sentiment@1`.
    requests.extend((0..ENTITIES).map(|e| request(&format!("x{e}"), "sentiment@1", e)));
    let started = Instant::now();
    produce(&topics.requests, &raw(&requests)).await;
    let out = collect(
        &[&topics.results],
        requests.len(),
        Duration::from_secs(180),
        Duration::from_secs(1),
    )
    .await;
    eprintln!("{} results in {:?}", out.len(), started.elapsed());
    processor.stop().await;

    let mut by_entity: HashMap<usize, HashSet<String>> = HashMap::new();
    let mut shares: BTreeMap<String, usize> = BTreeMap::new();
    let mut ids = HashSet::new();
    for c in &out {
        let doc: InferenceResult = serde_json::from_slice(c.value.as_deref().unwrap()).unwrap();
        assert!(doc.error.is_none(), "{}: {:?}", doc.request_id, doc.error);
        assert!(ids.insert(doc.request_id.clone()), "one result per request");
        let version = doc
            .model_version
            .clone()
            .expect("the version that answered");
        if let Some(e) = doc.request_id.strip_prefix('x') {
            assert_eq!(version, "1", "explicit sentiment@1 for entity {e}");
            continue;
        }
        let i: usize = doc.request_id[1..].parse().unwrap();
        by_entity
            .entry(i % ENTITIES)
            .or_default()
            .insert(version.clone());
        *shares.entry(version).or_default() += 1;
    }
    assert_eq!(ids.len(), N + ENTITIES);
    let moved: Vec<_> = by_entity.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        moved.is_empty(),
        "entities answered by two versions: {moved:?}"
    );
    assert_eq!(by_entity.len(), ENTITIES);
    let share = |v: &str| shares.get(v).copied().unwrap_or(0) as f64 * 100.0 / N as f64;
    eprintln!("shares: {shares:?}");
    assert!(
        (share("1") - 90.0).abs() <= 2.0 && (share("2") - 10.0).abs() <= 2.0,
        "shares {shares:?} are not 90/10 within 2 points"
    );
}

/// `model_version` of `POST /v1/predict` for `request`.
async fn predict_version(port: u16, request: &Value) -> String {
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/predict"))
        .json(request)
        .send()
        .await
        .expect("POST /v1/predict");
    let doc: Value = response.json().await.expect("a result document");
    assert_eq!(doc["status"], "ok", "{doc}");
    doc["model_version"]
        .as_str()
        .expect("model_version")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_from_90_10_to_0_100_under_load_switches_versions_and_loses_nothing() {
    utils::init_tracing();
    utils::require_kafka().await;
    let topics = Topics::create("reroute", 3).await;
    let group = unique_name("reroute");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("inferflow.toml");
    std::fs::write(&file, format!("{MODELS}\n{}{MONITOR}", routes(90, 10))).unwrap();
    let port = utils::free_port();
    let mut cmd =
        crate::harness::inferflow_run(&topics, &group, Some(&file), "warn,inferflow::app=info");
    cmd.env("INFERFLOW__HTTP__LISTEN", format!("127.0.0.1:{port}"));
    let mut child = cmd.spawn().expect("start inferflow run");
    crate::harness::wait_serving(port).await;

    // Over HTTP, an entity is answered by the version the route gives it, every time; with
    // 100 entities at 10 % some are on each version.
    let mut http_before: BTreeMap<usize, String> = BTreeMap::new();
    for e in 0..100 {
        let first = predict_version(port, &request(&format!("h{e}"), "sentiment", e)).await;
        let again = predict_version(port, &request(&format!("h{e}b"), "sentiment", e)).await;
        assert_eq!(first, again, "entity {e} over HTTP");
        http_before.insert(e, first);
    }
    let on_two = http_before.values().filter(|v| *v == "2").count();
    assert!(
        (1..30).contains(&on_two),
        "{on_two} of 100 entities on version 2"
    );

    // 4,000 requests over about 4 s while the routes are reloaded twice: first a file naming
    // a version that is not configured (refused: 90/10 stays), then 0/100.
    const LOAD: usize = 4000;
    let producer = {
        let topic = topics.requests.clone();
        tokio::spawn(async move {
            for chunk in 0..8 {
                let batch: Vec<Value> = (chunk * 500..(chunk + 1) * 500)
                    .map(|i| request(&format!("r{i}"), "sentiment", i % 1000))
                    .collect();
                produce(&topic, &raw(&batch)).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let started = Instant::now();
    let bad = format!("{MODELS}\n[routes.sentiment]\nversions = {{ \"1\" = 0, \"3\" = 100 }}\n");
    for (at, text, outcome) in [
        (1200, bad, "rejected"),
        (
            2400,
            format!("{MODELS}\n{}{MONITOR}", routes(0, 100)),
            "applied",
        ),
    ] {
        tokio::time::sleep(Duration::from_millis(at).saturating_sub(started.elapsed())).await;
        reload_with(&child, port, &file, &text, outcome).await;
    }
    producer.await.unwrap();
    // After the reload: every request goes to version 2, on the stream and over HTTP.
    const AFTER: usize = 1000;
    let after: Vec<Value> = (0..AFTER)
        .map(|i| request(&format!("a{i}"), "sentiment", i))
        .collect();
    produce(&topics.requests, &raw(&after)).await;
    for e in 0..20 {
        let v = predict_version(port, &request(&format!("ha{e}"), "sentiment", e)).await;
        assert_eq!(v, "2", "entity {e} over HTTP after the reload");
    }

    let out = collect_until(
        &[&topics.results, &topics.dlq],
        Duration::from_secs(120),
        Duration::from_secs(1),
        |out| out.len() >= LOAD + AFTER,
    )
    .await;
    // The monitor: each version's answers, labels and scores, and a PSI near 0 for the
    // version answering everything since the reload (its inputs did not change).
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("/metrics")
        .text()
        .await
        .unwrap();
    let m = |name: &str, labels: &str| crate::harness::metric(&body, name, labels);
    for version in ["1", "2"] {
        let model = format!("model=\"sentiment@{version}\"");
        assert!(
            m("inferflow_model_outputs_total", &model).is_some_and(|v| v > 0.0),
            "answers of sentiment@{version} counted"
        );
        assert!(m("inferflow_model_output_labels_total", &model).is_some());
        assert!(m("inferflow_model_output_score_count", &model).is_some());
    }
    let psi = m(
        "inferflow_model_output_psi",
        "model=\"sentiment@2\",path=\"label\"",
    )
    .expect("a PSI for sentiment@2's labels");
    eprintln!("PSI of sentiment@2's labels after the reload: {psi}");
    assert!(psi < 0.1, "stable inputs, PSI {psi}");
    // Shifted inputs: as many negative reviews again; the labels' PSI rises over the alert
    // threshold (0.25).
    let negative: Vec<Value> = (0..LOAD + AFTER)
        .map(|i| {
            let mut r = request(&format!("n{i}"), "sentiment", i % 1000);
            r["data"] = json!({"text": "This is terrible and I hate it."});
            r
        })
        .collect();
    produce(&topics.requests, &raw(&negative)).await;
    collect_until(
        &[&topics.results],
        Duration::from_secs(120),
        Duration::ZERO,
        |out| out.len() >= 2 * (LOAD + AFTER),
    )
    .await;
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("/metrics")
        .text()
        .await
        .unwrap();
    let shifted = crate::harness::metric(
        &body,
        "inferflow_model_output_psi",
        "model=\"sentiment@2\",path=\"label\"",
    )
    .expect("a PSI for sentiment@2's labels");
    eprintln!("PSI of sentiment@2's labels after the shift: {shifted}");
    assert!(shifted > 0.25, "shifted inputs, PSI {shifted}");
    signal(&child, "-TERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "inferflow exited with {status}");

    let mut ids = HashSet::new();
    let mut during: BTreeMap<String, usize> = BTreeMap::new();
    for c in &out {
        assert_eq!(c.topic, topics.results, "no dead letters");
        let doc: InferenceResult = serde_json::from_slice(c.value.as_deref().unwrap()).unwrap();
        assert!(doc.error.is_none(), "{}: {:?}", doc.request_id, doc.error);
        assert!(ids.insert(doc.request_id.clone()), "one result per request");
        let version = doc.model_version.clone().expect("model_version");
        if doc.request_id.starts_with('a') {
            assert_eq!(version, "2", "{} after the reload", doc.request_id);
        } else {
            *during.entry(version).or_default() += 1;
        }
    }
    assert_eq!(ids.len(), LOAD + AFTER, "every request answered");
    eprintln!("versions while reloading: {during:?}");
    // Before the reload 90 % went to version 1; after it none did.
    assert!(during.get("1").copied().unwrap_or(0) > 0 && during.get("2").copied().unwrap_or(0) > 0);
}

/// One run of `requests` through a processor whose `sentiment` route is `route` (TOML after
/// `[routes.sentiment]`), with `extra` models; the results by request id, the shadow
/// comparisons by request id, and how long the results took (including a 1 s pause).
async fn shadow_run(
    prefix: &str,
    route: &str,
    extra: &str,
    requests: &[Value],
    failing: Option<&crate::fake_openai::FakeOpenAi>,
) -> (HashMap<String, Value>, HashMap<String, Value>, Duration) {
    let calls_before = failing.map_or(0, |f| f.calls().len());
    let topics = Topics::create(prefix, 3).await;
    let shadow_topic = format!("{}.shadow", topics.requests);
    utils::create_topic(&shadow_topic, 3).await;
    let group = unique_name(prefix);
    let toml = format!(
        "shadow_results = \"{shadow_topic}\"\n{MODELS}\n{extra}\n[routes.sentiment]\n{route}"
    );
    let config: Config = config(&topics, &group, &toml);
    let models = build_manager(&config.providers, &config.models, &config.result_cache)
        .await
        .expect("models start");
    if let Some(sink) = inferflow::app::shadow_sink(&config).expect("shadow sink") {
        models.set_shadow_sink(sink);
    }
    let models = with_routes(&models, &config.routes).expect("routes");
    let executor = Arc::new(PipelineExecutor::new(Arc::new(PipelineManager::new(
        models,
    ))));
    let processor = Running::start(&config, executor).await;
    // Two waves: the second is consumed after the first made a failing shadow fail (and its
    // provider's breaker open).
    let started = Instant::now();
    let (first, second) = requests.split_at(requests.len() / 2);
    produce(&topics.requests, &raw(first)).await;
    collect(
        &[&topics.results],
        first.len(),
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    if let Some(fake) = failing {
        // The shadow has failed at least twice (so its breaker is open) before the second wave.
        let deadline = Instant::now() + Duration::from_secs(20);
        while fake.calls().len() < calls_before + 2 {
            assert!(Instant::now() < deadline, "the shadow was not called");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    produce(&topics.requests, &raw(second)).await;
    let out = collect(
        &[&topics.results],
        requests.len(),
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await;
    let took = started.elapsed();
    let results = crate::harness::results_by_id(&out);
    assert_eq!(results.len(), requests.len(), "one result per request");
    let shadows = if route.contains("shadow") && !extra.is_empty() {
        HashMap::new()
    } else if route.contains("shadow") {
        let out = collect(
            &[&shadow_topic],
            requests.len(),
            Duration::from_secs(60),
            Duration::from_millis(500),
        )
        .await;
        out.iter()
            .map(|c| {
                let doc: Value = serde_json::from_slice(c.value.as_deref().unwrap()).unwrap();
                let key = String::from_utf8(c.key.clone().unwrap()).unwrap();
                assert_eq!(doc["request_id"], key.as_str(), "keyed by request id");
                (key, doc)
            })
            .collect()
    } else {
        HashMap::new()
    };
    processor.stop().await;
    (results, shadows, took)
}

/// The primary's part of a result: status, output, version.
fn primary(results: &HashMap<String, Value>) -> BTreeMap<String, (Value, Value, Value)> {
    results
        .iter()
        .map(|(id, r)| {
            assert_eq!(r["status"], "ok", "{r}");
            (
                id.clone(),
                (
                    r["status"].clone(),
                    r["output"].clone(),
                    r["model_version"].clone(),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadows_compare_off_the_request_path_and_a_failing_one_changes_nothing() {
    use crate::fake_openai::{FakeOpenAi, Mode};

    utils::init_tracing();
    utils::require_kafka().await;
    // Plain strings: VADER takes them, and so does the chat model of the failing shadow.
    let requests: Vec<Value> = (0..400)
        .map(|i| {
            let mut r = request(&format!("s{i}"), "sentiment", i % 100);
            r["data"] = json!(format!("Review {i}: this is not bad at all"));
            r
        })
        .collect();
    let (baseline, _, took) = shadow_run(
        "shadow-none",
        "versions = { \"1\" = 1 }\n",
        "",
        &requests,
        None,
    )
    .await;
    let expected = primary(&baseline);
    eprintln!("without a shadow: {took:?}");

    // A healthy shadow (the same VADER as version 2): every request compared, and agreeing.
    let (results, shadows, took) = shadow_run(
        "shadow-ok",
        "versions = { \"1\" = 1 }\n[routes.sentiment.shadow]\nversions = [\"2\"]\ncompare_path = \"label\"\n",
        "",
        &requests,
        None,
    )
    .await;
    eprintln!("with a healthy shadow: {took:?}");
    assert_eq!(primary(&results), expected, "the shadow changed no result");
    assert_eq!(shadows.len(), requests.len(), "one comparison per request");
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/shadow_result.v1.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let schema = jsonschema::validator_for(&schema).expect("the shadow result schema compiles");
    for (id, doc) in &shadows {
        assert!(schema.is_valid(doc), "not a shadow_result.v1: {doc}");
        assert_eq!(doc["model"], "sentiment", "{doc}");
        assert_eq!(doc["primary"]["version"], "1", "{doc}");
        assert_eq!(doc["shadow"]["version"], "2", "{doc}");
        assert_eq!(doc["primary"]["output"], expected[id].1, "{doc}");
        assert_eq!(
            doc["shadow"]["output"]["label"],
            doc["primary"]["output"]["label"]
        );
        assert_eq!(doc["agreement"], true, "{doc}");
        assert!(doc["primary"]["latency_us"].is_u64() && doc["shadow"]["latency_us"].is_u64());
    }

    // A shadow whose provider hangs, then one that answers 500, behind a breaker that opens
    // for a minute: the primary results are the same, all of them, in bounded time (an open
    // breaker of a shadow-only provider does not pause consumption).
    let fake = FakeOpenAi::start(Mode::Hang).await;
    let extra = format!(
        r#"
[providers.fake.openai]
base_url = "{}"
[providers.fake.openai.retry]
max_attempts = 1
[providers.fake.openai.models.chat]
task = "chat"
[providers.fake.breaker]
failure_threshold = 2
open_ms = 60000
[models."sentiment@3"]
provider = "fake"
remote_model = "chat"
cache = false
"#,
        fake.base_url
    );
    let route = "versions = { \"1\" = 1 }\n[routes.sentiment.shadow]\nversions = [\"3\"]\nqueue_batches = 1\ntimeout_ms = 500\n";
    for mode in [Mode::Hang, Mode::ServerError] {
        fake.set_mode(mode);
        let (results, _, took) =
            shadow_run("shadow-bad", route, &extra, &requests, Some(&fake)).await;
        eprintln!("with a {mode:?} shadow: {took:?}");
        assert_eq!(
            primary(&results),
            expected,
            "a {mode:?} shadow changed results"
        );
        assert!(
            took < Duration::from_secs(30),
            "a {mode:?} shadow held the primary up: {took:?}"
        );
    }
    assert!(!fake.calls().is_empty(), "the failing shadow was called");
}
