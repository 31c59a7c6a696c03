//! The alert rules and the Grafana dashboard against a real Prometheus: Debian's `prometheus`
//! (installed by `scripts/bootstrap`) scrapes a real `inferflow run` every second while it
//! answers requests over Kafka (features read from the store, a local model, an
//! OpenAI-compatible model that reports tokens, errors and dead letters), ingests feature
//! updates (one invalid), answers `/readyz` and reloads on SIGHUP. Then every panel query of
//! `deploy/grafana/inferflow.json` and every alert expression of
//! `deploy/prometheus/alerts.yml` goes through Prometheus's HTTP API: each must parse, and
//! each panel query must return data unless its panel is in [`MAY_BE_EMPTY`]. A metric renamed
//! in the dashboard, or renamed in inferflow and not in the dashboard, fails this test.
//!
//! No `prometheus` on the PATH (or at `INFERFLOW_TEST_PROMETHEUS`) is a failure, not a skip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_openai::{FakeOpenAi, Mode};
use crate::harness::{Killed, Raw, Topics, collect, eventually, inferflow_run, produce};
use crate::utils::{self, free_port, unique_name};

/// Panels whose queries may come back empty after this test's traffic, and why. Everything
/// else must return data.
const MAY_BE_EMPTY: &[(&str, &str)] = &[
    (
        "Exactly-once transactions",
        "the test runs the default at-least-once mode (exactly-once has tests/integration/exactly_once.rs)",
    ),
    (
        "Producer queue full and produce retries",
        "the counters appear only when librdkafka's queue fills or a produce fails",
    ),
    (
        "Breaker openings",
        "the counter appears when a breaker opens; the fake provider stays healthy",
    ),
    (
        "Model idle unloads and reloads",
        "the counter appears when a model is unloaded for idleness (minutes)",
    ),
    (
        "Replay store writes",
        "written only with replay.store = \"cql\"; the test uses the in-process tier",
    ),
];

/// The route's weights at start-up, and after the reload (a canary step).
const ROUTE_50_50: &str = r#"versions = { "1" = 50, "2" = 50 }"#;
const ROUTE_20_80: &str = r#"versions = { "1" = 20, "2" = 80 }"#;
/// The monitor's reference window: requests keep coming over HTTP from the reload (which
/// starts new windows) until the PSI is exported, so it only has to exceed how long the reload
/// takes to be seen.
const REFERENCE_SECS: u64 = 2;

/// What Grafana puts in for its interval variables; the dashboard's own variables become `.*`.
const INTERVAL: &str = "1m";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `prometheus` binary: `INFERFLOW_TEST_PROMETHEUS`, or `prometheus` on the PATH. Missing, the
/// test fails with the way to install it.
fn prometheus_binary() -> PathBuf {
    if let Ok(path) = std::env::var("INFERFLOW_TEST_PROMETHEUS") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("prometheus"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`prometheus` is not installed: this test needs Debian's prometheus package \
             (`scripts/bootstrap` installs it, or `apt-get install prometheus`), or \
             INFERFLOW_TEST_PROMETHEUS=/path/to/prometheus"
        )
    })
}

/// Every query of the dashboard: (panel title, refId, expression), rows' nested panels included.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("every target has an expr");
                let ref_id = target["refId"].as_str().unwrap_or_default().to_owned();
                out.push((title.clone(), ref_id, expr.to_owned()));
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// `expr` with Grafana's variables put in: the interval variables as [`INTERVAL`], the
/// dashboard's own variables (`$job`, `${instance}`...) as `.*`. Any other `$name` panics.
fn substitute(expr: &str, variables: &[String]) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        let (name, len) = match rest.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}').expect("a closing brace");
                (&braced[..end], end + 2)
            }
            None => {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                (&rest[..end], end)
            }
        };
        let value = match name {
            "__rate_interval" | "__interval" | "__range" => INTERVAL,
            _ if variables.iter().any(|v| v == name) => ".*",
            _ => panic!("unknown Grafana variable `${name}` in {expr}"),
        };
        out.push_str(value);
        rest = &rest[len..];
    }
    out.push_str(rest);
    out
}

/// The `inferflow_…` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<&str> {
    let mut names: Vec<&str> = expr
        .match_indices("inferflow_")
        .filter(|(at, _)| {
            // Not the tail of a longer identifier.
            expr[..*at]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
        })
        .map(|(at, _)| {
            let rest = &expr[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// One instant query; returns the API's `status` and the result vector (empty on errors).
async fn query(http: &reqwest::Client, base: &str, promql: &str) -> (String, Vec<Value>, Value) {
    let endpoint = format!("{base}/api/v1/query");
    let url = reqwest::Url::parse_with_params(&endpoint, [("query", promql)]).expect("a URL");
    let body: Value = http
        .get(url)
        .send()
        .await
        .expect("Prometheus answers")
        .json()
        .await
        .expect("a JSON answer");
    let status = body["status"].as_str().unwrap_or_default().to_owned();
    let result = body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    (status, result, body)
}

/// How many times Prometheus has scraped the job so far.
async fn scrapes(http: &reqwest::Client, base: &str) -> f64 {
    let (_, result, _) = query(http, base, r#"count_over_time(up{job="inferflow"}[1h])"#).await;
    result
        .first()
        .and_then(|s| s["value"][1].as_str())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn write_config(dir: &Path, base: &str, group: &str, provider_url: &str) -> PathBuf {
    let pipelines = dir.join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    for id in ["sentiment", "moderation"] {
        std::fs::copy(
            repo().join(format!("config/pipelines/{id}.toml")),
            pipelines.join(format!("{id}.toml")),
        )
        .unwrap();
    }
    // The request's entity's profile from the store, into a prompt for the chat model.
    std::fs::write(
        pipelines.join("personal.toml"),
        r#"
[[steps]]
type = "features"
entity_type = "user"
features = ["profile"]
[[steps]]
type = "preprocess"
transforms = [{ op = "template", template = "Answer a {{ features.profile.segment }} customer: {{ data.question }}" }]
[[steps]]
type = "model"
model = "chat@1"
"#,
    )
    .unwrap();
    let file = dir.join("inferflow.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[kafka]
statistics_interval_ms = 1000

[topics]
feature_invalidations = "{base}.invalidations"
shadow_results = "{base}.shadow-results"

[feature_store]
backend = "embedded"
path = "{store}"

[ingest]
group_id = "{group}-features"

[pipelines]
dir = "{pipelines}"

[providers.local.local.models.vader]
kind = "vader"
path = "{vader}"

[providers.gpt.openai]
base_url = "{provider_url}"
api_key_env = "INFERFLOW_TEST_MONITORING_KEY"
[providers.gpt.openai.models.chat]
task = "chat"
[providers.gpt.breaker]
failure_threshold = 5
[providers.gpt.rate_limit]
requests_per_minute = 60000

[models."sentiment@1"]
provider = "local"
remote_model = "vader"

[models."chat@1"]
provider = "gpt"

# A rollout: `sentiment` split between two versions (the same VADER), version 2 shadowing
# the requests version 1 answers, both versions' labels and scores watched. The reference
# window is short so a PSI is exported within the test.
[models."sentiment@2"]
provider = "local"
remote_model = "vader"

[routes.sentiment]
{ROUTE_50_50}
[routes.sentiment.shadow]
versions = ["2"]
compare_path = "label"
[routes.sentiment.monitor]
labels = ["label"]
scores = ["compound"]
score_bins = [-0.5, -0.05, 0.05, 0.5]
reference_secs = {REFERENCE_SECS}
current_secs = 60
"#,
            store = dir.join("features.redb").display(),
            pipelines = pipelines.display(),
            vader = repo().join("models/vader").display(),
        ),
    )
    .unwrap();
    file
}

fn doc(value: Value) -> Raw {
    (None, Some(value.to_string().into_bytes()))
}

/// A request for the routed name `sentiment` from entity `user/u{entity}`.
fn routed(id: &str, entity: usize) -> Value {
    json!({"request_id": id, "model": "sentiment", "entity": {"type": "user", "id": format!("u{entity}")}, "data": {"text": format!("Review {id}: what a GREAT day!")}})
}

/// The requests of one round: every pipeline and model, requests for the routed `sentiment`
/// (split between its versions, version 1's shadowed), an unknown model, a model refusing its
/// input, a step failing, and bytes that are not JSON (a dead letter: no request id to answer).
fn round(n: usize) -> Vec<Raw> {
    let question = json!({"question": "where is my order?"});
    let mut raw = vec![
        doc(
            json!({"request_id": format!("p{n}-u1"), "pipeline": "personal", "entity": {"type": "user", "id": "u1"}, "data": question}),
        ),
        doc(
            json!({"request_id": format!("p{n}-u2"), "pipeline": "personal", "entity": {"type": "user", "id": "u2"}, "data": question}),
        ),
        doc(
            json!({"request_id": format!("s{n}"), "pipeline": "sentiment", "data": {"text": "What a GREAT day!"}}),
        ),
        doc(
            json!({"request_id": format!("m{n}"), "pipeline": "moderation", "data": {"text": "This is awful, I hate it."}}),
        ),
        doc(json!({"request_id": format!("e{n}-unknown"), "model": "nope@1", "data": 1})),
        doc(json!({"request_id": format!("e{n}-input"), "model": "sentiment@1", "data": 42})),
        doc(json!({"request_id": format!("e{n}-step"), "pipeline": "sentiment", "data": 42})),
    ];
    raw.extend((0..8).map(|e| doc(routed(&format!("r{n}-{e}"), e))));
    raw.push((None, Some(b"not json at all".to_vec())));
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_and_alert_expression_works_on_a_real_prometheus() {
    utils::init_tracing();
    let prometheus = prometheus_binary();
    utils::require_kafka().await;
    let provider = FakeOpenAi::start(Mode::Healthy).await;
    let dir = tempfile::tempdir().unwrap();
    let topics = Topics::create("monitoring", 2).await;
    let group = unique_name("monitoring");
    let config = write_config(
        dir.path(),
        &unique_name("monitoring"),
        &group,
        &provider.base_url,
    );
    let port = free_port();
    let mut cmd = inferflow_run(&topics, &group, Some(&config), "warn");
    cmd.env("INFERFLOW__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("INFERFLOW_TEST_MONITORING_KEY", "sk-test");
    let inferflow = Killed(cmd.spawn().expect("start inferflow run"));
    let (_prometheus, prom) = start_prometheus(&prometheus, dir.path(), port);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    send_traffic(
        &http,
        &format!("http://127.0.0.1:{port}"),
        &topics,
        &inferflow,
        &config,
    )
    .await;
    // Two scrapes after the traffic.
    let after = scrapes(&http, &prom).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while scrapes(&http, &prom).await < after + 2.0 {
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape inferflow twice within 60 s ({after} scrapes before)"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let (queries, empty) = check_dashboard(&http, &prom).await;
    let alerts = check_alerts(&http, &prom).await;
    println!(
        "monitoring: {queries} panel queries and {alerts} alert expressions evaluated on Prometheus; empty, as allowed: {}",
        empty.join(", ")
    );

    let term = Command::new("kill")
        .args(["-TERM", &inferflow.0.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
}

/// Starts `binary` on a free loopback port, scraping `inferflow run`'s /metrics on `target_port`
/// and evaluating the alert rules, both every second. Returns it and its address.
fn start_prometheus(binary: &Path, dir: &Path, target_port: u16) -> (Killed, String) {
    let prom_port = free_port();
    let prom_config = dir.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: inferflow\n    static_configs:\n      - targets: [\"127.0.0.1:{target_port}\"]\n",
            rules = repo().join("deploy/prometheus/alerts.yml").display(),
        ),
    )
    .unwrap();
    let prometheus = Killed(
        Command::new(binary)
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display())),
    );
    (prometheus, format!("http://127.0.0.1:{prom_port}"))
}

/// Feature updates, two rounds of requests, a readiness check, and a reload (SIGHUP) moving the
/// route to 20/80 under requests over HTTP until the monitor exports a PSI, each waited for:
/// what the dashboard's panels show.
async fn send_traffic(
    http: &reqwest::Client,
    api: &str,
    topics: &Topics,
    inferflow: &Killed,
    config: &Path,
) {
    // Feature updates (one not JSON: a dead letter from the features source), read back over
    // HTTP once ingested.
    let update = |user: &str, segment: &str| -> Raw {
        (
            Some(user.as_bytes().to_vec()),
            Some(
                json!({"entity_type": "user", "entity_id": user, "feature": "profile", "values": {"segment": segment}, "version": 1})
                    .to_string()
                    .into_bytes(),
            ),
        )
    };
    produce(
        &topics.features,
        &[
            update("u1", "gold"),
            update("u2", "silver"),
            (None, Some(b"{not json".to_vec())),
        ],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = http
            .get(format!("{api}/v1/features/user/u2/profile"))
            .send()
            .await;
        if got.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the feature updates were not ingested within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Two rounds of requests, the second after the first is answered: the same inputs again,
    // so the result cache and the feature cache hit.
    let per_round = round(0).len();
    for n in 0..2 {
        produce(&topics.requests, &round(n)).await;
        let outputs = collect(
            &[&topics.results, &topics.dlq],
            // The feature dead letter is on the same topic.
            per_round * (n + 1) + 1,
            Duration::from_secs(90),
            Duration::from_millis(200),
        )
        .await;
        if n == 1 {
            let results: BTreeMap<String, Value> = outputs
                .iter()
                .filter(|c| c.topic == topics.results)
                .filter_map(|c| serde_json::from_slice::<Value>(c.value.as_deref()?).ok())
                .map(|doc| (doc["request_id"].as_str().unwrap_or("").to_owned(), doc))
                .collect();
            assert_eq!(results["p1-u1"]["status"], "ok", "{}", results["p1-u1"]);
            assert_eq!(
                results["p1-u1"]["output"]["content"],
                "echo: Answer a gold customer: where is my order?",
                "{}",
                results["p1-u1"]
            );
            assert_eq!(results["s1"]["status"], "ok", "{}", results["s1"]);
            assert_eq!(results["e1-unknown"]["error"]["kind"], "unknown_model");
        }
    }
    let ready = http.get(format!("{api}/readyz")).send().await;
    assert!(ready.is_ok_and(|r| r.status().is_success()), "/readyz");
    // The canary step: the route from 50/50 to 20/80, which starts the monitor's windows
    // again. Routed requests over HTTP from before the SIGHUP on, so the new reference window
    // fills and, once it is frozen, the PSI is exported.
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(ROUTE_50_50));
    std::fs::write(config, text.replace(ROUTE_50_50, ROUTE_20_80)).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &inferflow.0.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    let limit = Duration::from_secs(REFERENCE_SECS + 30);
    let deadline = Instant::now() + limit;
    for n in 0.. {
        let answer = http
            .post(format!("{api}/v1/predict"))
            .json(&routed(&format!("h{n}"), n % 50))
            .send()
            .await
            .expect("POST /v1/predict");
        let doc: Value = answer.json().await.expect("a result document");
        assert_eq!(doc["status"], "ok", "{doc}");
        let text = match http.get(format!("{api}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.contains(r#"inferflow_reloads_total{outcome="applied"}"#)
            && text.contains("inferflow_model_output_psi{")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reload and PSI within {limit:?} of SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs every panel query and every variable query of the dashboard; returns how many panel
/// queries ran and which allowed-empty ones were empty.
async fn check_dashboard(http: &reqwest::Client, prom: &str) -> (usize, Vec<String>) {
    // Every panel query parses, and returns data unless its panel may be empty. Asked again for
    // a few seconds, for series the next statistics report or scrape brings.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/inferflow.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let variables: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() > 40, "only {} panel queries", queries.len());
    for (title, _) in MAY_BE_EMPTY {
        assert!(
            queries.iter().any(|(t, _, _)| t == title),
            "MAY_BE_EMPTY names `{title}`, which the dashboard does not have"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let (failures, empty) = loop {
        let mut failures = Vec::new();
        let mut empty = Vec::new();
        for (title, ref_id, expr) in &queries {
            let promql = substitute(expr, &variables);
            let (status, result, body) = query(http, prom, &promql).await;
            if status != "success" {
                failures.push(format!(
                    "{title} [{ref_id}] does not parse: {promql}\n  {body}"
                ));
            } else if result.is_empty() {
                if MAY_BE_EMPTY.iter().any(|(t, _)| t == title) {
                    empty.push(format!("{title} [{ref_id}]"));
                } else {
                    failures.push(format!("{title} [{ref_id}] returned no data: {promql}"));
                }
            }
        }
        if failures.is_empty() || Instant::now() > deadline {
            break (failures, empty);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        failures.is_empty(),
        "{} of {} panel queries failed:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );

    // The variables' `label_values(METRIC, LABEL)` find values.
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(definition) = variable["definition"].as_str() else {
            continue;
        };
        let inner = definition
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {definition}"));
        let (metric, label) = inner.rsplit_once(',').expect("label_values(metric, label)");
        let promql = substitute(
            &format!("count by ({}) ({metric})", label.trim()),
            &variables,
        );
        let (status, result, body) = query(http, prom, &promql).await;
        assert!(
            status == "success" && !result.is_empty(),
            "variable {definition}: {promql} gave {body}"
        );
    }

    (queries.len(), empty)
}

/// Checks that Prometheus loaded and evaluated every alert of alerts.yml, that each expression
/// parses and reads only metrics inferflow exported, and that the traffic's dead letters fire
/// their alert. Returns how many alerts were checked.
async fn check_alerts(http: &reqwest::Client, prom: &str) -> usize {
    // Every alert of alerts.yml is loaded, evaluated without error, and its expression parses
    // through the query API.
    let alerts_file = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let expected: Vec<&str> = alerts_file
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let rules = loop {
        let body: Value = http
            .get(format!("{prom}/api/v1/rules"))
            .send()
            .await
            .expect("GET /api/v1/rules")
            .json()
            .await
            .expect("JSON");
        let rules: Vec<Value> = body["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["type"] == "alerting")
            .collect();
        let evaluated = rules.iter().all(|r| r["health"] != "unknown");
        if evaluated || Instant::now() > deadline {
            break rules;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let loaded: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(loaded, expected, "the alerts Prometheus loaded");
    for rule in &rules {
        let name = rule["name"].as_str().unwrap();
        assert_eq!(rule["health"], "ok", "{name}: {rule}");
        let expr = rule["query"].as_str().unwrap();
        let (status, _, body) = query(http, prom, expr).await;
        assert_eq!(status, "success", "{name}: {expr}\n{body}");
        // An alert's expression is quiet on this traffic, so its parse alone would not notice a
        // misspelt metric: each metric it reads must be one inferflow exported.
        for metric in metric_names(expr) {
            let (_, series, _) = query(http, prom, &format!("count({metric})")).await;
            assert!(
                !series.is_empty(),
                "{name} reads {metric}, which inferflow did not export: {expr}"
            );
        }
    }
    // The traffic's dead letters fire their alert (the expression matches what inferflow
    // exports), once for each source.
    let dead_letters = rules
        .iter()
        .find(|r| r["name"] == "InferflowDeadLetters")
        .unwrap();
    let firing: Vec<&str> = dead_letters["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["state"] == "firing")
        .filter_map(|a| a["labels"]["source"].as_str())
        .collect();
    assert!(
        firing.contains(&"requests") && firing.contains(&"features"),
        "InferflowDeadLetters should fire for both sources: {dead_letters}"
    );
    rules.len()
}

/// The requests topic's lag per partition in `inferflow run`'s /metrics on `port` (0 where no
/// sample yet).
async fn lags(http: &reqwest::Client, port: u16, topic: &str) -> [f64; 2] {
    let body = match http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
    {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    [0, 1].map(|p| {
        let labels = format!(r#"topic="{topic}",partition="{p}""#);
        crate::harness::metric(&body, "inferflow_consumer_lag_records", &labels).unwrap_or(0.0)
    })
}

/// librdkafka keeps computing a lag for a partition a rebalance took away, frozen at its last
/// value. Left in the old owner's gauge it would sit beside the new owner's, and the lag alerts
/// (which take each partition's highest report) would fire on a backlog that is gone. Two
/// `inferflow run` on a backlog of slow requests: once the second has joined, no partition has
/// a lag from both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moved_by_a_rebalance_keeps_no_lag_on_its_old_owner() {
    utils::init_tracing();
    utils::require_kafka().await;
    let topics = Topics::create("lagmove", 2).await;
    let group = unique_name("lagmove");
    // 10 ms each, one batch at a time: about 100 requests a second per instance, so the backlog
    // lasts well beyond the rebalance.
    let requests = crate::process::requests("r", 6000, 10, 0);
    produce(&topics.requests, &requests).await;
    let start = |port: u16| {
        let mut cmd = inferflow_run(&topics, &group, None, "warn");
        cmd.env("INFERFLOW__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("INFERFLOW__KAFKA__STATISTICS_INTERVAL_MS", "500")
            .env("INFERFLOW__EXECUTOR__MAX_IN_FLIGHT_BATCHES", "1")
            .env("INFERFLOW__BATCH__MAX_RECORDS", "10")
            .env("INFERFLOW__INGEST__ENABLED", "false");
        Killed(cmd.spawn().expect("start inferflow run"))
    };
    let http = reqwest::Client::new();
    let (port_a, port_b) = (free_port(), free_port());
    let lag_on = |port: u16| lags(&http, port, &topics.requests);
    let _a = start(port_a);
    let wait = Duration::from_secs(60);
    eventually(wait, "A reports a lag on both partitions", || async {
        lag_on(port_a).await.iter().all(|&l| l > 0.0)
    })
    .await;
    let _b = start(port_b);
    eventually(wait, "B owns a partition with a lag", || async {
        lag_on(port_b).await.iter().any(|&l| l > 0.0)
    })
    .await;
    // A few statistics intervals after the rebalance.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (a, b) = (lag_on(port_a).await, lag_on(port_b).await);
    println!("lag after the rebalance: A {a:?}, B {b:?}");
    for p in 0..2 {
        assert!(
            a[p] == 0.0 || b[p] == 0.0,
            "partition {p} has a lag on both instances: A {}, B {}",
            a[p],
            b[p]
        );
    }
    assert!(
        a.iter().any(|&l| l > 0.0),
        "A still owns a partition with a backlog: {a:?}"
    );
}
