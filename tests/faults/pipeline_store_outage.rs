//! The database stopped while requests need features it has not cached: each such request is
//! answered `feature_store_error` after its features step's retries (the pipeline's
//! configuration), nothing crashes or is lost, and once the database is back the same kind of
//! request is answered `ok`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferflow::feature_store::{FeatureStore, FeatureUpdate};
use inferflow::pipeline::{PipelineExecutor, PipelineManager};
use inferflow::providers::manager::ModelManager;
use serde_json::{Value, json};

use crate::harness::{Raw, Running, Topics, collect, config, produce};
use crate::servers::{Outage, Server};
use crate::utils::{self, cql_contact, unique_name};

const PIPELINE: &str = r#"
id = "personal"
[[steps]]
type = "features"
entity_type = "user"
features = ["profile"]
timeout_ms = 3000
retries = 2
retry_backoff_ms = 200
[[steps]]
type = "preprocess"
transforms = [{ op = "object", fields = { segment = "features.profile.segment" } }]
"#;

fn requests(prefix: &str, users: std::ops::Range<usize>) -> Vec<Raw> {
    users
        .map(|u| {
            let v = json!({"request_id": format!("{prefix}{u}"), "pipeline": "personal", "entity": {"type": "user", "id": format!("u{u}")}, "data": {}});
            (None, Some(v.to_string().into_bytes()))
        })
        .collect()
}

/// Results by request id, from `topic` records whose id starts with `prefix`.
fn by_id(out: &[crate::harness::Captured], prefix: &str) -> HashMap<String, Value> {
    out.iter()
        .filter_map(|c| serde_json::from_slice::<Value>(c.value.as_deref()?).ok())
        .filter(|doc| {
            doc["request_id"]
                .as_str()
                .is_some_and(|id| id.starts_with(prefix))
        })
        .map(|doc| {
            (
                doc["request_id"].as_str().unwrap_or_default().to_owned(),
                doc,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_needing_uncached_features_get_feature_store_error_while_the_database_is_down() {
    utils::init_tracing();
    let topics = Topics::create("pipeoutage", 2).await;
    let group = unique_name("pipeoutage");
    let keyspace = unique_name("pipeoutage");
    let config = config(
        &topics,
        &group,
        &format!(
            "[feature_store]\ncontact_points = [\"{}\"]\nkeyspace = \"{keyspace}\"\nrequest_timeout_ms = 1000\n",
            cql_contact()
        ),
    );
    let store = Arc::new(
        FeatureStore::open(&config.feature_store)
            .await
            .expect("store opens"),
    );
    for u in 0..100 {
        let values = json!({"segment": format!("s{u}")})
            .as_object()
            .cloned()
            .unwrap();
        store
            .set_feature(&FeatureUpdate::new(
                "user",
                format!("u{u}"),
                "profile",
                values,
                1,
            ))
            .await
            .unwrap();
    }
    // The writer's cache holds what it wrote; the processor gets a store of its own with a
    // cold cache, so every read below needs the database.
    drop(store);
    let cold = Arc::new(
        FeatureStore::open(&config.feature_store)
            .await
            .expect("store opens"),
    );
    let pipelines =
        Arc::new(PipelineManager::new(Arc::new(ModelManager::new())).with_feature_store(cold));
    pipelines
        .create_pipeline(inferflow::pipeline::def::parse(PIPELINE, "personal", "test").unwrap())
        .unwrap();
    let processor = Running::start(&config, Arc::new(PipelineExecutor::new(pipelines))).await;

    let outage = tokio::task::spawn_blocking(|| Outage::begin(Server::Cassandra))
        .await
        .expect("stopping the database");
    let down_at = Instant::now();
    produce(&topics.requests, &requests("down-", 0..50)).await;
    let out = collect(
        &[&topics.results, &topics.dlq],
        50,
        Duration::from_secs(120),
        Duration::from_millis(500),
    )
    .await;
    let down = by_id(&out, "down-");
    assert_eq!(
        down.len(),
        50,
        "every request answered while the database was down"
    );
    for (id, doc) in &down {
        assert_eq!(doc["error"]["kind"], "feature_store_error", "{id}: {doc}");
    }
    eprintln!(
        "50 requests answered feature_store_error {:?} into the outage",
        down_at.elapsed()
    );

    tokio::task::spawn_blocking(move || outage.end())
        .await
        .expect("starting the database");
    let back_at = Instant::now();
    // The driver reconnects on its own; requests sent after that are answered from the store.
    let mut answered_ok = false;
    for round in 0..30 {
        let prefix = format!("up{round}-");
        produce(&topics.requests, &requests(&prefix, 50..60)).await;
        let out = crate::harness::collect_until(
            &[&topics.results],
            Duration::from_secs(60),
            Duration::from_millis(200),
            |out| by_id(out, &prefix).len() >= 10,
        )
        .await;
        let up = by_id(&out, &prefix);
        if up.values().all(|doc| doc["status"] == "ok") {
            for (id, doc) in &up {
                let u = id.trim_start_matches(&prefix);
                assert_eq!(doc["output"]["segment"], format!("s{u}"), "{doc}");
            }
            answered_ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        answered_ok,
        "requests were not answered ok after the database returned"
    );
    eprintln!(
        "answered ok again {:?} after the database was ready",
        back_at.elapsed()
    );
    processor.stop().await;
    utils::cql_session()
        .await
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), &[])
        .await
        .unwrap();
}
