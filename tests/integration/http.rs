//! The HTTP endpoints of `inferflow run`, served on a port-0 listener against the real stack.

use inferflow::config::Config;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::utils::{self, cql_contact, kafka_bootstrap};

/// Serves inferflow's HTTP routes with the given config; returns the base URL and a token that
/// stops the server when cancelled (or dropped with the guard).
async fn start(config: Config) -> (String, tokio_util::sync::DropGuard) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let token = CancellationToken::new();
    let stop = token.clone();
    tokio::spawn(async move {
        inferflow::app::serve(&config, listener, inferflow::metrics::local(), async move {
            stop.cancelled().await
        })
        .await
        .expect("serve");
    });
    (url, token.drop_guard())
}

fn config(kafka: &str, cql: &str) -> Config {
    Config::from_toml_str(&format!(
        "[kafka]\nbootstrap_servers = \"{kafka}\"\n[feature_store]\ncontact_points = [\"{cql}\"]\n"
    ))
    .expect("valid config")
}

#[tokio::test]
async fn readyz_is_ok_when_kafka_and_the_database_answer() {
    utils::init_tracing();
    utils::require_kafka().await;
    drop(utils::cql_session().await);
    let (url, _guard) = start(config(&kafka_bootstrap(), &cql_contact())).await;

    let health = reqwest::get(format!("{url}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);

    let ready = reqwest::get(format!("{url}/readyz")).await.unwrap();
    let status = ready.status();
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["kafka"], "ok");
    assert_eq!(body["feature_store"], "ok");
    // Nothing opened the CQL store: readiness says it queried the database instead.
    let checked = body["feature_store_check"].as_str().unwrap();
    assert!(checked.starts_with("a CQL query on system.local"), "{body}");

    let metrics = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(metrics.status(), 200);
}

#[tokio::test]
async fn readyz_is_503_and_names_the_failures_when_nothing_answers() {
    utils::init_tracing();
    // Port 1 on loopback: nothing listens there.
    let (url, _guard) = start(config("127.0.0.1:1", "127.0.0.1:1")).await;
    let ready = reqwest::get(format!("{url}/readyz")).await.unwrap();
    let status = ready.status();
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    assert_ne!(body["kafka"], "ok");
    assert_ne!(body["feature_store"], "ok");
}

/// The `/v1` API with the built-in executor and an embedded feature store: every path of
/// `schemas/openapi/inferflow.v1.json` is served, and features written over HTTP read back.
#[tokio::test]
async fn the_v1_api_serves_every_documented_route_and_features_round_trip() {
    use std::sync::Arc;

    use inferflow::feature_store::FeatureStore;
    use serde_json::{Value, json};

    utils::init_tracing();
    utils::require_kafka().await;
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_store_config(&format!("{}", dir.path().display()));
    let store = Arc::new(FeatureStore::open(&config.feature_store).await.unwrap());
    let (url, _guard) = serve_api(&config, Some(store)).await;
    let http = reqwest::Client::new();

    // Every documented operation is routed: an unrouted path or method would get axum's
    // empty 404 or a 405; our handlers always answer with a body.
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("schemas/openapi/inferflow.v1.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 10, "documented paths: {:?}", paths.keys());
    for (path, operations) in paths {
        let concrete = path
            .replace("{id}", "identity")
            .replace("{entity_type}", "user")
            .replace("{entity_id}", "u1")
            .replace("{feature}", "profile")
            .replace("{group}", "g")
            .replace("{route}", "sentiment");
        for method in operations.as_object().unwrap().keys() {
            let request = match method.as_str() {
                "get" => http.get(format!("{url}{concrete}")),
                "post" => http
                    .post(format!("{url}{concrete}"))
                    .json(&json!({"data": 1})),
                "put" => http.put(format!("{url}{concrete}")).json(&json!({})),
                other => panic!("unexpected method {other} for {path}"),
            };
            let response = request.send().await.unwrap();
            let status = response.status();
            let body = response.text().await.unwrap();
            assert!(
                status != 405 && !(status == 404 && body.is_empty()),
                "{method} {path} is not served: {status}"
            );
        }
    }

    // The built-in identity pipeline over HTTP.
    let out: Value = http
        .post(format!("{url}/v1/pipelines/identity/execute"))
        .json(&json!({"request_id": "h1", "data": {"x": 1}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(out["status"], "ok");
    assert_eq!(out["output"], json!({"x": 1}));
    assert_eq!(out["pipeline"], "identity");

    // Features: write, read one, read a vector with a missing name.
    let written = http
        .put(format!("{url}/v1/features"))
        .json(&json!({"entity_type": "user", "entity_id": "u1", "feature": "profile", "values": {"segment": "gold"}, "version": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), 200);
    let one: Value = http
        .get(format!("{url}/v1/features/user/u1/profile"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["values"], json!({"segment": "gold"}));
    assert_eq!(one["version"], 3);
    let vector: Value = http
        .get(format!("{url}/v1/features/user/u1?names=profile,clicks"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(vector["features"]["profile"]["values"]["segment"], "gold");
    assert_eq!(vector["missing"], json!(["clicks"]));
    let invalid = http
        .put(format!("{url}/v1/features"))
        .json(&json!({"entity_type": "user", "entity_id": "u1", "values": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), 400);
    let missing = http
        .get(format!("{url}/v1/features/user/u2/profile"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // Feature values over HTTP come back with the digits they were written with.
    let mut cases = crate::number_cases::all(21, 200);
    cases.push(crate::number_cases::BEYOND_F64.to_owned());
    let written = http
        .put(format!("{url}/v1/features"))
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"entity_type":"user","entity_id":"u1","feature":"exact","values":{},"version":1}}"#,
            crate::number_cases::object(&cases)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), 200);
    for route in [
        "/v1/features/user/u1/exact",
        "/v1/features/user/u1?names=exact",
    ] {
        let text = http
            .get(format!("{url}{route}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        crate::number_cases::assert_carried(&text, &cases, route);
    }

    // Readiness goes through the embedded store.
    let ready: Value = http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["feature_store"], "ok", "{ready}");
}

/// Without ingestion or a features step nothing opens the feature store at start-up: the
/// feature routes open the configured one on their first request (they used to answer 503 "no
/// feature store is open"), and readiness checks that same store and says so.
#[tokio::test]
async fn feature_routes_open_the_configured_store_and_readiness_says_what_it_checked() {
    use serde_json::{Value, json};

    utils::init_tracing();
    utils::require_kafka().await;
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_store_config(&format!("{}/", dir.path().display()));
    let (url, _guard) = serve_api(&config, None).await;
    let http = reqwest::Client::new();

    let written = http
        .put(format!("{url}/v1/features"))
        .json(&json!({"entity_type": "user", "entity_id": "u1", "feature": "profile", "values": {"segment": "gold"}, "version": 1}))
        .send()
        .await
        .unwrap();
    let status = written.status();
    assert_eq!(status, 200, "{}", written.text().await.unwrap());
    let one: Value = http
        .get(format!("{url}/v1/features/user/u1/profile"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["values"], json!({"segment": "gold"}));

    // Readiness reads through the same store (an embedded file opens only once) and names it.
    let ready: Value = http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["feature_store"], "ok", "{ready}");
    let checked = ready["feature_store_check"].as_str().unwrap();
    assert!(
        checked.starts_with("a read through the embedded file")
            && checked.contains(&dir.path().display().to_string()),
        "{ready}"
    );
}

/// A configuration with the test broker and an embedded feature store at `path`.
fn embedded_store_config(path: &str) -> Config {
    Config::from_toml_str(&format!(
        "[kafka]\nbootstrap_servers = \"{}\"\n[feature_store]\nbackend = \"embedded\"\npath = \"{path}\"\n",
        kafka_bootstrap(),
    ))
    .unwrap()
}

/// Serves the HTTP API (built-in executor; `store` as the API's and readiness's feature store,
/// or none) on a free loopback port; returns its URL and a guard that stops it when dropped.
async fn serve_api(
    config: &Config,
    store: Option<std::sync::Arc<inferflow::feature_store::FeatureStore>>,
) -> (String, tokio_util::sync::DropGuard) {
    use std::sync::Arc;

    use inferflow::executor::{Builtins, Executor};

    let executor: Arc<dyn Executor> = Arc::new(Builtins);
    let api = Arc::new(inferflow::app::api(config, executor, store.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let token = CancellationToken::new();
    let stop = token.clone();
    let served = config.clone();
    tokio::spawn(async move {
        inferflow::app::serve_with(
            &served,
            listener,
            inferflow::metrics::local(),
            Some(api),
            store,
            async move { stop.cancelled().await },
        )
        .await
        .expect("serve");
    });
    (url, token.drop_guard())
}
