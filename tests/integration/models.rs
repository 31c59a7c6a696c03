//! Models from configuration, through Kafka: `config/models.example.toml` (the models shipped in
//! `models/`) built into the processor's executor, answering requests on the stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use inferflow::config::Config;
use inferflow::model::InferenceResult;
use inferflow::providers::build::build_manager;
use inferflow::providers::manager::ModelExecutor;

use crate::harness::{Running, Topics, collect, config, produce};
use crate::utils::{self, unique_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_local_models_answer_requests_from_kafka() {
    utils::init_tracing();
    let topics = Topics::create("models", 2).await;
    let group = unique_name("models");
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/models.example.toml"),
    )
    .expect("config/models.example.toml");
    let config: Config = config(&topics, &group, &example);
    let manager = build_manager(&config.providers, &config.models, &config.result_cache)
        .await
        .expect("models start");
    let processor =
        Running::start(&config, Arc::new(ModelExecutor::new(Arc::clone(&manager)))).await;

    let requests = [
        (
            r#"{"request_id":"s1","model":"sentiment","data":{"text":"What a great day!"}}"#,
            "s1",
        ),
        (
            r#"{"request_id":"s2","model":"sentiment@1","data":{"text":"This is terrible and I hate it."}}"#,
            "s2",
        ),
        (
            r#"{"request_id":"i1","model":"iris","data":{"features":[6.1, 3.0, 4.9, 1.8]}}"#,
            "i1",
        ),
        (
            r#"{"request_id":"i2","model":"iris@1","data":{"features":[4.4, 3.0, 1.3, 0.2]}}"#,
            "i2",
        ),
        (
            r#"{"request_id":"bad","model":"iris","data":{"features":[1.0]}}"#,
            "bad",
        ),
        (
            r#"{"request_id":"nope","model":"iris@9","data":{}}"#,
            "nope",
        ),
    ];
    let raw: Vec<_> = requests
        .iter()
        .map(|(v, _)| (None, Some(v.as_bytes().to_vec())))
        .collect();
    produce(&topics.requests, &raw).await;
    let outputs = collect(
        &[&topics.results],
        requests.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    let results: HashMap<String, InferenceResult> = outputs
        .iter()
        .map(|c| {
            let doc: InferenceResult =
                serde_json::from_slice(c.value.as_deref().expect("value")).expect("result");
            (doc.request_id.clone(), doc)
        })
        .collect();
    let output = |id: &str| {
        let r = &results[id];
        assert!(r.error.is_none(), "{id}: {:?}", r.error);
        r.output.clone().expect("output")
    };
    assert_eq!(output("s1")["label"], "positive");
    assert_eq!(output("s2")["label"], "negative");
    assert_eq!(output("i1")["label"], "virginica");
    assert_eq!(output("i2")["label"], "setosa");
    let p = output("i2")["scores"]["setosa"].as_f64().expect("score");
    assert!((p - 0.978_818).abs() < 1e-4, "setosa probability {p}");
    assert_eq!(
        results["i1"].model_version.as_deref(),
        Some("1"),
        "the default version answered"
    );
    assert_eq!(
        results["bad"].error.as_ref().map(|e| e.kind.as_str()),
        Some("invalid_request"),
        "a wrong input shape is the caller's error"
    );
    assert_eq!(
        results["nope"].error.as_ref().map(|e| e.kind.as_str()),
        Some("unknown_model")
    );
    let stats = manager.stats("iris@1").expect("iris stats");
    assert!(stats.requests >= 3, "{stats:?}");
    processor.stop().await;
}
