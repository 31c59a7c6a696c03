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
