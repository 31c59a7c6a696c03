//! The PostgreSQL and MySQL feature stores through the `inferflow` binary, on the servers of
//! `scripts/stack`: start-up errors that name the key and never the password, and a pipeline
//! with a features step served over Kafka and over HTTP.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use inferflow::config::Config;
use inferflow::feature_store::FeatureStore;
use serde_json::{Value, json};

use crate::harness::{Killed, PERSONAL_STEPS, Topics, inferflow_run, request_all, write_profiles};
use crate::utils::{self, Sql, free_port, refusing_address, unique_name};

/// A password that appears nowhere else: any occurrence in the output is a leak.
const PASSWORD: &str = "Zq7-leak-canary-Pw0rd";

impl Sql {
    /// `feature_store.backend` and the environment variable of the DSN.
    fn backend(self) -> (&'static str, &'static str) {
        match self {
            Sql::Postgres => ("postgres", "INFERFLOW__FEATURE_STORE__POSTGRES__URL"),
            Sql::Mysql => ("mysql", "INFERFLOW__FEATURE_STORE__MYSQL__URL"),
        }
    }

    /// The scheme and `host:port` of the test server.
    fn server(self) -> (String, String) {
        let url = self.url("inferflow");
        let (scheme, rest) = url.split_once("://").expect("scheme://");
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let host = host.split_once('/').map_or(host, |(host, _)| host);
        (scheme.to_owned(), host.to_owned())
    }
}

/// Runs `inferflow run` with `backend` at `url` (ingestion on, so the store opens at start-up)
/// until it exits, at most 60 s; returns its exit code and stderr.
fn run_until_exit(sql: Sql, url: &str) -> (Option<i32>, String) {
    let (backend, url_var) = sql.backend();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inferflow"));
    cmd.arg("run");
    for (key, _) in std::env::vars() {
        if key.starts_with("INFERFLOW__") || key == "INFERFLOW_CONFIG" {
            cmd.env_remove(key);
        }
    }
    let section = url_var.trim_end_matches("URL");
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .env("INFERFLOW__FEATURE_STORE__BACKEND", backend)
        .env(url_var, url)
        .env(format!("{section}CONNECT_TIMEOUT_MS"), "2000")
        .env("INFERFLOW__INGEST__ENABLED", "true")
        .env(
            "INFERFLOW__HTTP__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start inferflow run");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("inferflow run with {url} did not stop at start-up within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("inferflow's output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A malformed DSN, a server that does not answer and wrong credentials each stop
/// `inferflow run` at start-up with the reason and the key to fix, and never the password:
/// in the DSN's user-info, in a `password=` parameter, or written without percent-encoding.
#[test]
fn start_up_errors_name_the_key_and_never_the_password() {
    for sql in [Sql::Postgres, Sql::Mysql] {
        let (scheme, server) = sql.server();
        let key = format!("feature_store.{}.url", sql.backend().0);
        let (_held, nobody) = refusing_address();
        let wrong_login = match sql {
            Sql::Postgres => "password authentication failed",
            Sql::Mysql => "Access denied",
        };
        let cases = [
            (
                format!("{scheme}://inferflow:{PASSWORD}@127.0.0.1:notaport/inferflow"),
                "invalid port",
            ),
            // An unencoded `/` in the password: the driver reads a port out of the password.
            (
                format!("{scheme}://inferflow:{PASSWORD}/x@{server}/inferflow"),
                "invalid port",
            ),
            (
                format!("{scheme}://inferflow:{PASSWORD}@{nobody}/inferflow"),
                "refused",
            ),
            (
                format!("{scheme}://inferflow:{PASSWORD}@{server}/inferflow"),
                wrong_login,
            ),
            (
                format!(
                    "{scheme}://inferflow:%5A{}@{server}/inferflow",
                    &PASSWORD[1..]
                ),
                wrong_login,
            ),
        ];
        let query_password = (sql == Sql::Postgres).then(|| {
            (
                format!("{scheme}://inferflow@{server}/inferflow?password={PASSWORD}"),
                wrong_login,
            )
        });
        for (url, reason) in cases.into_iter().chain(query_password) {
            let started = Instant::now();
            let (code, stderr) = run_until_exit(sql, &url);
            assert_eq!(code, Some(1), "{url}: {stderr}");
            assert!(
                stderr.contains(&key) && stderr.contains(reason),
                "{url}: expected the key {key} and `{reason}` in:\n{stderr}"
            );
            assert!(
                !stderr.contains(PASSWORD) && !stderr.contains(&PASSWORD[1..]),
                "{url}: the password leaked:\n{stderr}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{url}: took {:?}",
                started.elapsed()
            );
        }
    }
}

/// `inferflow run` with `INFERFLOW__FEATURE_STORE__BACKEND=postgres` (or `mysql`) and the DSN
/// in the environment serves a pipeline with a features step over Kafka and over HTTP: the
/// features, written first through the store, reach the model's input.
async fn serves_a_features_step_over_kafka_and_http(sql: Sql) {
    utils::init_tracing();
    utils::require_kafka().await;
    let (backend, url_var) = sql.backend();
    let db = unique_name("inferflow_run");
    sql.admin(&format!("CREATE DATABASE {db}")).await;
    let url = sql.url(&db);
    let config = Config::from_toml_str(&format!(
        "[feature_store]\nbackend = \"{backend}\"\n[feature_store.{backend}]\nurl = \"{url}\"\n"
    ))
    .expect("test config");
    // The features first, through the store (which creates the schema).
    let store = FeatureStore::open(&config.feature_store)
        .await
        .unwrap_or_else(|e| panic!("opening the {backend} store: {e}"));
    write_profiles(&store).await;
    drop(store);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("personal.toml"), PERSONAL_STEPS).unwrap();
    let topics = Topics::create(&format!("run{backend}"), 1).await;
    let group_id = unique_name("run");
    let port = free_port();
    let mut cmd = inferflow_run(&topics, &group_id, None, "warn");
    cmd.env("INFERFLOW__FEATURE_STORE__BACKEND", backend)
        .env(url_var, &url)
        .env("INFERFLOW__PIPELINES__DIR", dir.path())
        .env("INFERFLOW__INGEST__ENABLED", "false")
        .env("INFERFLOW__HTTP__LISTEN", format!("127.0.0.1:{port}"));
    let mut child = Killed(cmd.spawn().expect("start inferflow run"));

    // Over Kafka.
    let requests = [
        json!({"request_id": "k1", "pipeline": "personal", "entity": {"type": "user", "id": "u1"}, "data": {"question": "where is my order?"}}),
        json!({"request_id": "k2", "pipeline": "personal", "entity": {"type": "user", "id": "u2"}, "data": {"question": "hi"}}),
    ];
    let by_id = request_all(
        &topics,
        &requests,
        Duration::from_secs(90),
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(
        by_id["k1"]["output"], "Answer a gold customer: where is my order?",
        "{}",
        by_id["k1"]
    );
    assert_eq!(by_id["k1"]["steps"][0]["name"], "features:prompting");
    assert_eq!(by_id["k2"]["output"], "Answer a silver customer: hi");

    // Over HTTP, from the same process.
    let http = reqwest::Client::new();
    let response = http
        .post(format!(
            "http://127.0.0.1:{port}/v1/pipelines/personal/execute"
        ))
        .json(&json!({"entity": {"type": "user", "id": "u2"}, "data": {"question": "and now?"}}))
        .send()
        .await
        .expect("POST /v1/pipelines/personal/execute");
    let doc: Value = response.json().await.expect("a JSON answer");
    assert_eq!(doc["output"], "Answer a silver customer: and now?", "{doc}");
    let ready: Value = http
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .expect("GET /readyz")
        .json()
        .await
        .expect("a JSON answer");
    assert_eq!(ready["feature_store"], "ok", "{ready}");

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let exited = child.0.wait().expect("wait");
    assert!(exited.success(), "inferflow exited with {exited}");
    let drop_db = match sql {
        Sql::Postgres => format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        Sql::Mysql => format!("DROP DATABASE IF EXISTS {db}"),
    };
    sql.admin(&drop_db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inferflow_run_on_postgres_serves_a_features_step_over_kafka_and_http() {
    serves_a_features_step_over_kafka_and_http(Sql::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inferflow_run_on_mysql_serves_a_features_step_over_kafka_and_http() {
    serves_a_features_step_over_kafka_and_http(Sql::Mysql).await;
}
