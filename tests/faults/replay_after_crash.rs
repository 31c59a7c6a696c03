//! Replay-safe inference after a crash: `inferflow run` answers requests with a model behind a
//! fake OpenAI server (which counts calls), is SIGKILLed before it commits any offset, and a
//! second process in the same group gets every request again.
//!
//! With `replay.store = "cql"` the second process answers all of them from the results the
//! first one stored, without one model call, with the same outputs. The control run, with
//! `replay.store = "memory"`, shows the test can fail: there every redelivered request calls
//! the model again.
//!
//! In exactly-once mode the first process dies with every result in an open transaction; the
//! second one (same transactional id) aborts it, and a `read_committed` reader sees each
//! request answered once, with no model called twice.
//!
//! Run alone: `cargo test --test faults replay -- --nocapture` (about a minute). It stops no
//! server.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake_openai::{FakeOpenAi, Mode as FakeMode};
use crate::harness::{Captured, Raw, Topics, collect, metric, produce};
use crate::processes::{Mode, Proc, account};
use crate::utils::{self, cql_contact, cql_session, free_port, unique_name};

const N: usize = 400;

fn request(prefix: &str, i: usize) -> Raw {
    let id = format!("{prefix}{i}");
    (
        Some(id.clone().into_bytes()),
        Some(
            format!(r#"{{"request_id":"{id}","model":"chat@1","data":"question {i}"}}"#)
                .into_bytes(),
        ),
    )
}

/// Outputs by request id, in the order they were read.
fn outputs(captured: &[Captured]) -> HashMap<String, Vec<Value>> {
    let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
    for c in captured {
        let doc: Value =
            serde_json::from_slice(c.value.as_deref().expect("a value")).expect("a result");
        assert_eq!(doc["status"], "ok", "{doc}");
        let id = doc["request_id"].as_str().expect("request_id").to_owned();
        by_id.entry(id).or_default().push(doc["output"].clone());
    }
    by_id
}

async fn metrics_body(port: u16) -> Option<String> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?;
    response.text().await.ok()
}

/// Polls `/metrics` until `name{labels}` reaches `at_least`, or panics.
async fn wait_metric(port: u16, name: &str, labels: &str, at_least: f64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(body) = metrics_body(port).await {
            last = metric(&body, name, labels);
            if last.is_some_and(|v| v >= at_least) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name}{{{labels}}} is {last:?} after {timeout:?}, wanted at least {at_least}");
}

/// A configuration file serving `chat@1` from `fake`, with `replay.store = store` in a fresh
/// keyspace.
fn replay_config(fake: &FakeOpenAi, store: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let keyspace = unique_name("replay_ks");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("replay.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[providers.fake.openai]
base_url = "{url}"
[providers.fake.openai.models.chat]
task = "chat"
[models."chat@1"]
provider = "fake"
cache = false
[feature_store]
contact_points = ["{cql}"]
keyspace = "{keyspace}"
[replay]
store = "{store}"
"#,
            url = fake.base_url,
            cql = cql_contact(),
        ),
    )
    .unwrap();
    (dir, config)
}

/// Runs the crash scenario with `store`; returns (model calls before the crash, model calls
/// by the second process, outputs by request id).
async fn crash_and_redeliver(store: &str) -> (usize, usize, HashMap<String, Vec<Value>>) {
    let fake = FakeOpenAi::start(FakeMode::Healthy).await;
    let topics = Topics::create("replay", 2).await;
    let group = unique_name("replay");
    let (_dir, config) = replay_config(&fake, store);
    // Nothing is committed before the kill: every request is delivered again.
    let extra = |port: u16| {
        vec![
            ("KAFKA__COMMIT_INTERVAL_MS", "600000".to_owned()),
            ("HTTP__LISTEN", format!("127.0.0.1:{port}")),
        ]
    };
    let prefix = format!("{store}-");
    let requests: Vec<Raw> = (0..N).map(|i| request(&prefix, i)).collect();
    produce(&topics.requests, &requests).await;

    let port = free_port();
    let first = Proc::spawn_with_config(
        &topics,
        &group,
        Mode::AtLeastOnce,
        "first",
        false,
        Some(&config),
        &extra(port),
    );
    collect(
        &[&topics.results],
        N,
        Duration::from_secs(90),
        Duration::ZERO,
    )
    .await;
    if store == "cql" {
        // The writes run beside the answers; wait until every result is stored.
        wait_metric(
            port,
            "inferflow_replay_writes_total",
            "outcome=\"ok\"",
            N as f64,
            Duration::from_secs(30),
        )
        .await;
    }
    first.kill();
    let calls_first = fake.calls().len();

    let port = free_port();
    let second = Proc::spawn_with_config(
        &topics,
        &group,
        Mode::AtLeastOnce,
        "second",
        false,
        Some(&config),
        &extra(port),
    );
    let captured = collect(
        &[&topics.results],
        2 * N,
        Duration::from_secs(90),
        Duration::from_secs(2),
    )
    .await;
    let calls_second = fake.calls().len() - calls_first;
    if store == "cql" {
        wait_metric(
            port,
            "inferflow_replay_lookups_total",
            "outcome=\"hit\",tier=\"cql\"",
            N as f64,
            Duration::from_secs(10),
        )
        .await;
    }
    second.stop(Duration::from_secs(30));
    (calls_first, calls_second, outputs(&captured))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_redelivered_after_a_crash_reuse_their_stored_results() {
    utils::init_tracing();
    utils::require_kafka().await;
    drop(cql_session().await); // fails with the command to start the database

    let (first, second, by_id) = crash_and_redeliver("cql").await;
    eprintln!("replay.store = cql: {first} model calls, then {second} after the crash");
    assert_eq!(first, N, "one model call per request before the crash");
    assert_eq!(
        second, 0,
        "redelivered requests must be answered from the stored results"
    );
    assert_eq!(by_id.len(), N);
    for (id, outputs) in &by_id {
        assert_eq!(outputs.len(), 2, "{id}: one result per delivery");
        assert_eq!(
            outputs[0], outputs[1],
            "{id}: the replayed output is the stored one"
        );
    }

    // The control: kept in process only, the crash costs a model call per request.
    let (first, second, by_id) = crash_and_redeliver("memory").await;
    eprintln!("replay.store = memory: {first} model calls, then {second} after the crash");
    assert_eq!(first, N);
    assert_eq!(
        second, N,
        "without the database every request is computed again"
    );
    assert_eq!(by_id.len(), N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_after_a_crash_repeats_neither_a_result_nor_a_model_call() {
    utils::init_tracing();
    utils::require_kafka().await;
    drop(cql_session().await);
    let fake = FakeOpenAi::start(FakeMode::Healthy).await;
    let topics = Topics::create("replayeo", 2).await;
    let group = unique_name("replayeo");
    let (_dir, config) = replay_config(&fake, "cql");
    let prefix = "eo-";
    let requests: Vec<Raw> = (0..N).map(|i| request(prefix, i)).collect();
    produce(&topics.requests, &requests).await;

    // A commit interval longer than the test: the transaction holding every result is still
    // open when the process dies.
    let port = free_port();
    let first = Proc::spawn_with_config(
        &topics,
        &group,
        Mode::ExactlyOnce,
        "solo",
        false,
        Some(&config),
        &[
            ("KAFKA__COMMIT_INTERVAL_MS", "60000".to_owned()),
            ("PROCESSING__TRANSACTION_TIMEOUT_MS", "120000".to_owned()),
            ("HTTP__LISTEN", format!("127.0.0.1:{port}")),
        ],
    );
    wait_metric(
        port,
        "inferflow_replay_writes_total",
        "outcome=\"ok\"",
        N as f64,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(fake.calls().len(), N, "one model call per request");
    first.kill();

    // The same transactional id: the second process fences the first and aborts its open
    // transaction, consumes every request again and answers from the stored results.
    let port = free_port();
    let second = Proc::spawn_with_config(
        &topics,
        &group,
        Mode::ExactlyOnce,
        "solo",
        false,
        Some(&config),
        &[("HTTP__LISTEN", format!("127.0.0.1:{port}"))],
    );
    let accounting = account(&topics, prefix, N, Duration::from_secs(90)).await;
    eprintln!(
        "exactly once, replay.store = cql: {} outputs for {N} requests, {} model calls in all",
        accounting.outputs,
        fake.calls().len()
    );
    assert!(accounting.lost.is_empty(), "lost: {:?}", accounting.lost);
    assert_eq!(
        accounting.duplicates, 0,
        "a read_committed reader sees each result once"
    );
    assert_eq!(
        fake.calls().len(),
        N,
        "the redelivered requests were answered from the stored results"
    );
    // They were redelivered (nothing was committed before the crash) and found in the database.
    wait_metric(
        port,
        "inferflow_replay_lookups_total",
        "outcome=\"hit\",tier=\"cql\"",
        N as f64,
        Duration::from_secs(10),
    )
    .await;
    second.stop(Duration::from_secs(30));
}
