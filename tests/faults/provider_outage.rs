//! A model provider that fails, end to end: `inferflow run` (the real binary, on the plaintext
//! broker) serves a chat model from a fake OpenAI-compatible server that answers 500s, then
//! 429 with `Retry-After`, then hangs, then recovers. Checked at the fake server, in `/metrics`
//! and in Kafka: attempts per request stay within `max_attempts`; the circuit breaker opens;
//! while it is open nothing is consumed, nothing reaches the provider and the committed offset
//! stands still, with the partition paused (`inferflow_paused_partitions`); each later probe
//! fails in the mode of the moment and reopens it; once the provider is healthy the waiting
//! requests are answered; every request gets exactly one result and every offset is
//! committed (lost = 0).
//!
//! Run alone: `cargo test --test faults provider -- --nocapture` (about 45 s). It stops no
//! server, but its timing is easier to trust with nothing else running beside it.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake_openai::{FakeOpenAi, Mode};
use crate::harness::{Captured, Raw, Topics, collect, committed_total, metric, produce};
use crate::utils::{self, unique_name};

/// The breaker's cool-down: long enough to observe an open breaker, short enough to see three.
const OPEN_MS: u64 = 6_000;
const MAX_ATTEMPTS: usize = 3;

fn spawn(topics: &Topics, group: &str, config: &std::path::Path, port: u16) -> Child {
    let mut cmd = crate::harness::inferflow_run(topics, group, Some(config), "warn,inferflow=info");
    cmd.env("INFERFLOW__HTTP__LISTEN", format!("127.0.0.1:{port}"));
    cmd.spawn().expect("start inferflow run")
}

struct Scrape(String);

impl Scrape {
    fn get(&self, name: &str, labels: &str) -> f64 {
        metric(&self.0, name, labels).unwrap_or(0.0)
    }
    fn breaker_state(&self) -> f64 {
        self.get("inferflow_provider_breaker_state", "provider=\"flaky\"")
    }
    fn breaker_opened(&self) -> f64 {
        self.get(
            "inferflow_provider_breaker_opened_total",
            "provider=\"flaky\"",
        )
    }
    fn consumed(&self) -> f64 {
        self.get("inferflow_requests_consumed_total", "")
    }
    fn paused(&self) -> f64 {
        self.get("inferflow_paused_partitions", "source=\"requests\"")
    }
}

async fn scrape(port: u16) -> Scrape {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    Scrape(body)
}

/// Polls `/metrics` every 100 ms until `check` holds, or panics with `what`.
async fn wait_metrics(port: u16, timeout: Duration, what: &str, check: impl Fn(&Scrape) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            let s = Scrape(response.text().await.unwrap_or_default());
            if check(&s) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not within {timeout:?}: {what}\n{}",
                s.0
            );
        }
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn request(id: &str) -> Raw {
    (
        Some(id.as_bytes().to_vec()),
        Some(format!(r#"{{"request_id":"{id}","model":"chat@1","data":"{id}"}}"#).into_bytes()),
    )
}

fn result_of(c: &Captured) -> Value {
    serde_json::from_slice(c.value.as_deref().expect("a value")).expect("a result document")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_500s_429s_and_hangs_open_the_breaker_pause_consumption_and_lose_nothing() {
    utils::init_tracing();
    utils::require_kafka().await;
    let fake = FakeOpenAi::start(Mode::ServerError).await;
    let topics = Topics::create("provfault", 1).await;
    let group = unique_name("provfault");
    let port = crate::utils::free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flaky.toml");
    // One request per batch, so one request per provider call: the breaker counts calls.
    std::fs::write(
        &config,
        format!(
            r#"
[batch]
max_records = 1
[ingest]
enabled = false
[providers.flaky.openai]
base_url = "{url}"
timeout_ms = 700
connect_timeout_ms = 500
[providers.flaky.openai.retry]
max_attempts = {MAX_ATTEMPTS}
initial_backoff_ms = 50
max_backoff_ms = 200
max_retry_after_ms = 5000
[providers.flaky.openai.models.chat]
task = "chat"
[providers.flaky.breaker]
failure_threshold = 2
open_ms = {OPEN_MS}
max_open_ms = {OPEN_MS}
[models."chat@1"]
provider = "flaky"
cache = false
"#,
            url = fake.base_url
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut run = spawn(&topics, &group, &config, port);
    wait_metrics(
        port,
        Duration::from_secs(60),
        "inferflow run serves /metrics",
        |s| s.0.contains("inferflow_"),
    )
    .await;

    // 1. 500s: two requests, one after the other, each failing after its retries; the second
    //    failed call opens the breaker.
    for (i, id) in ["p1-0", "p1-1"].iter().enumerate() {
        produce(&topics.requests, &[request(id)]).await;
        collect(
            &[&topics.results],
            i + 1,
            Duration::from_secs(30),
            Duration::ZERO,
        )
        .await;
    }
    wait_metrics(port, Duration::from_secs(10), "the breaker opens", |s| {
        s.breaker_state() == 2.0 && s.breaker_opened() == 1.0
    })
    .await;
    let opened_at = Instant::now();

    // 2. While it is open: requests wait in Kafka. Nothing is consumed, nothing reaches the
    //    provider, the committed offset stands still, and the partition is paused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = scrape(port).await;
    let calls_before = fake.calls().len();
    let phase2: Vec<String> = (0..10).map(|i| format!("p2-{i}")).collect();
    produce(
        &topics.requests,
        &phase2.iter().map(|id| request(id)).collect::<Vec<_>>(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let during = scrape(port).await;
    assert!(
        opened_at.elapsed() < Duration::from_millis(OPEN_MS),
        "the observation window outlasted the cool-down ({:?}); the machine is too slow for this test",
        opened_at.elapsed()
    );
    assert_eq!(during.breaker_state(), 2.0, "still open");
    assert_eq!(
        during.consumed(),
        before.consumed(),
        "nothing consumed while the breaker is open"
    );
    assert_eq!(
        fake.calls().len(),
        calls_before,
        "no call reaches the provider while the breaker is open"
    );
    assert!(
        during.paused() >= 1.0,
        "inferflow_paused_partitions shows the hold"
    );
    let committed_while_open = committed_total(&group, &topics.requests, 1);
    assert!(
        committed_while_open <= 2,
        "the committed offset does not pass the waiting requests ({committed_while_open})"
    );
    println!(
        "open: consumed {} before and after 2 s, {} provider calls, {} partition(s) paused, committed offset {committed_while_open}",
        during.consumed(),
        calls_before,
        during.paused()
    );

    // 3. 429 with Retry-After: the probe is refused; the breaker opens again.
    fake.set_mode(Mode::RateLimited {
        retry_after_secs: 1,
    });
    wait_metrics(
        port,
        Duration::from_millis(OPEN_MS + 15_000),
        "a probe against 429s reopens the breaker",
        |s| s.breaker_opened() >= 2.0 && s.breaker_state() == 2.0,
    )
    .await;

    // 4. Hangs: the probe times out on every attempt; the breaker opens again.
    fake.set_mode(Mode::Hang);
    wait_metrics(
        port,
        Duration::from_millis(OPEN_MS + 15_000),
        "a probe against a hanging provider reopens the breaker",
        |s| s.breaker_opened() >= 3.0 && s.breaker_state() == 2.0,
    )
    .await;

    // 5. Healthy again: the next probe succeeds and the waiting requests are answered.
    let healthy_at = Instant::now();
    fake.set_mode(Mode::Healthy);
    collect(
        &[&topics.results, &topics.dlq],
        12,
        Duration::from_millis(OPEN_MS + 30_000),
        Duration::ZERO,
    )
    .await;
    let recovered_after = healthy_at.elapsed();
    wait_metrics(port, Duration::from_secs(5), "the breaker closes", |s| {
        s.breaker_state() == 0.0
    })
    .await;
    // New requests flow straight through.
    let phase3: Vec<String> = (0..5).map(|i| format!("p3-{i}")).collect();
    produce(
        &topics.requests,
        &phase3.iter().map(|id| request(id)).collect::<Vec<_>>(),
    )
    .await;
    let outputs = collect(
        &[&topics.results, &topics.dlq],
        17,
        Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .await;

    let status = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(exit) = run.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "inferflow run did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "inferflow run exited with {exit}");

    // Exactly one result per request, none dead-lettered, every offset committed.
    assert!(
        outputs.iter().all(|c| c.topic == topics.results),
        "no dead letters"
    );
    let mut results: HashMap<String, Value> = HashMap::new();
    for c in &outputs {
        let r = result_of(c);
        let id = r["request_id"].as_str().unwrap().to_owned();
        assert!(
            results.insert(id.clone(), r).is_none(),
            "{id} answered twice"
        );
    }
    assert_eq!(results.len(), 17, "one result per request: lost = 0");
    assert_eq!(
        committed_total(&group, &topics.requests, 1),
        17,
        "every offset committed"
    );

    // Attempts per request, counted at the server.
    let calls = fake.calls();
    let mut attempts: HashMap<&str, Vec<&crate::fake_openai::Call>> = HashMap::new();
    for call in &calls {
        attempts.entry(call.prompt.as_str()).or_default().push(call);
    }
    for (id, tries) in &attempts {
        assert!(
            tries.len() <= MAX_ATTEMPTS,
            "{id}: {} attempts, more than max_attempts {MAX_ATTEMPTS}",
            tries.len()
        );
    }
    // Retry-After was honoured between the attempts of the 429 probe.
    let limited: Vec<_> = attempts
        .values()
        .flatten()
        .filter(|c| matches!(c.mode, Mode::RateLimited { .. }))
        .collect();
    assert!(!limited.is_empty(), "the 429 phase saw a probe");
    for pair in limited.windows(2) {
        if pair[0].prompt == pair[1].prompt {
            let gap = pair[1].at.duration_since(pair[0].at);
            assert!(
                gap >= Duration::from_millis(900),
                "retried after {gap:?}, before Retry-After"
            );
        }
    }

    // The two 500 requests failed; each failed probe cost its one request; everything else
    // waited and succeeded.
    let kind = |id: &str| results[id]["error"]["kind"].as_str().map(str::to_owned);
    for id in ["p1-0", "p1-1"] {
        assert_eq!(
            kind(id).as_deref(),
            Some("provider_error"),
            "{}",
            results[id]
        );
        assert_eq!(
            attempts[id].len(),
            MAX_ATTEMPTS,
            "{id}: retried up to the limit"
        );
    }
    let mut phase2_errors: Vec<String> = phase2.iter().filter_map(|id| kind(id)).collect();
    phase2_errors.sort();
    assert_eq!(
        phase2_errors,
        ["provider_timeout", "rate_limited"],
        "one failed probe per fault phase, the rest waited"
    );
    for id in phase2.iter().chain(&phase3) {
        if kind(id).is_none() {
            assert_eq!(results[id]["status"], "ok", "{}", results[id]);
            assert_eq!(results[id]["output"]["content"], format!("echo: {id}"));
        }
    }
    for id in &phase3 {
        assert_eq!(results[id]["status"], "ok", "{}", results[id]);
    }
    println!(
        "provider outage: {} calls at the provider for 17 requests (at most {MAX_ATTEMPTS} each), breaker opened 3 times, answered {recovered_after:?} after the provider recovered (cool-down {OPEN_MS} ms), whole test {:?}",
        calls.len(),
        started.elapsed()
    );
}
