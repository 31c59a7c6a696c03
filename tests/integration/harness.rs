//! Test harness shared by the integration and fault-suite binaries: topics and configurations
//! for one test, in-process processors and feature-store instances, producing records and
//! collecting outputs, committed offsets, and polling until a condition holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use inferflow::config::Config;
use inferflow::executor::Executor;
use inferflow::feature_store::{FeatureStore, coherence, ingest};
use inferflow::kafka::source::SourceHandle;
use inferflow::processor::{self, ProcessorHandle};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::utils::{
    self, cql_contact, cql_session, create_topic, kafka_bootstrap, kafka_config, unique_name,
};

/// The steps of the `personal` pipeline: read the feature group `prompting` for the
/// request's entity, fill a prompt from its `profile`, send it to `echo`. The features it reads
/// are written by [`write_profiles`].
pub const PERSONAL_STEPS: &str = r#"
[[steps]]
type = "features"
group = "prompting"
retries = 1
[[steps]]
type = "preprocess"
transforms = [{ op = "template", template = "Answer a {{ features.profile.segment }} customer: {{ data.question }}" }]
[[steps]]
type = "model"
model = "echo"
"#;

/// Writes through `store` the profiles of users `u1` (`gold`) and `u2` (`silver`) and the
/// feature group `prompting` over them: what [`PERSONAL_STEPS`] reads.
pub async fn write_profiles(store: &FeatureStore) {
    use inferflow::feature_store::{FeatureGroup, FeatureUpdate};
    for (user, segment) in [("u1", "gold"), ("u2", "silver")] {
        let values = json!({"segment": segment}).as_object().cloned().unwrap();
        store
            .set_feature(&FeatureUpdate::new("user", user, "profile", values, 1))
            .await
            .expect("write a profile");
    }
    let group: FeatureGroup = serde_json::from_value(json!({
        "name": "prompting", "version": 1, "entity_type": "user", "features": ["profile"]
    }))
    .expect("a group");
    store
        .create_feature_group(&group)
        .await
        .expect("create the group");
}

/// Produces `requests` (JSON documents, without keys) to `topics.requests` and collects as
/// many results (within `timeout`, then `settle` more for any extra), by request id.
pub async fn request_all(
    topics: &Topics,
    requests: &[Value],
    timeout: Duration,
    settle: Duration,
) -> HashMap<String, Value> {
    let raw: Vec<Raw> = requests
        .iter()
        .map(|r| (None, Some(r.to_string().into_bytes())))
        .collect();
    produce(&topics.requests, &raw).await;
    let out = collect(&[&topics.results], requests.len(), timeout, settle).await;
    results_by_id(&out)
}

/// The topics of one test.
pub struct Topics {
    pub requests: String,
    pub results: String,
    pub dlq: String,
    pub features: String,
}

impl Topics {
    /// Creates fresh topics: `partitions` for requests, 3 for results, 1 for the others.
    pub async fn create(prefix: &str, partitions: i32) -> Topics {
        let base = unique_name(prefix);
        let topics = Topics {
            requests: format!("{base}.requests"),
            results: format!("{base}.results"),
            dlq: format!("{base}.dlq"),
            features: format!("{base}.features"),
        };
        create_topic(&topics.requests, partitions).await;
        create_topic(&topics.results, 3).await;
        create_topic(&topics.dlq, 1).await;
        create_topic(&topics.features, 1).await;
        topics
    }

    /// Environment overrides pointing an `inferflow` process at these topics.
    pub fn env(&self, group: &str) -> Vec<(String, String)> {
        [
            ("KAFKA__BOOTSTRAP_SERVERS", kafka_bootstrap()),
            ("KAFKA__GROUP_ID", group.to_owned()),
            ("TOPICS__REQUESTS", self.requests.clone()),
            ("TOPICS__RESULTS", self.results.clone()),
            ("TOPICS__DLQ", self.dlq.clone()),
            ("TOPICS__FEATURES", self.features.clone()),
            ("HTTP__LISTEN", "127.0.0.1:0".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("INFERFLOW__{k}"), v))
        .collect()
    }
}

/// A processor configuration for `topics` and `group`, with `extra` TOML layered on top.
pub fn config(topics: &Topics, group: &str, extra: &str) -> Config {
    Config::from_toml_str(&format!(
        r#"
        [kafka]
        bootstrap_servers = "{}"
        group_id = "{group}"
        statistics_interval_ms = 0
        [topics]
        requests = "{}"
        results = "{}"
        dlq = "{}"
        features = "{}"
        {extra}
        "#,
        kafka_bootstrap(),
        topics.requests,
        topics.results,
        topics.dlq,
        topics.features,
    ))
    .expect("valid test config")
}

/// A running in-process processor.
pub struct Running {
    stop: CancellationToken,
    handle: ProcessorHandle,
}

impl Running {
    pub async fn start(config: &Config, executor: Arc<dyn Executor>) -> Running {
        utils::require_kafka().await;
        let stop = CancellationToken::new();
        let handle = processor::start(config, executor, stop.clone())
            .await
            .expect("processor starts");
        Running { stop, handle }
    }

    /// Graceful stop: drain, deliver, commit.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle.join())
            .await
            .expect("processor stops within 60 s")
            .expect("processor stops cleanly");
    }
}

/// A record to produce: optional key, optional value.
pub type Raw = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Produces every record, keys and values as given, and waits for all acknowledgements.
pub async fn produce(topic: &str, records: &[Raw]) {
    let producer: FutureProducer = kafka_config()
        .set("linger.ms", "20")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for chunk in records.chunks(2000) {
        let sends = chunk.iter().map(|(key, value)| {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if let Some(k) = key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = value {
                record = record.payload(v.as_slice());
            }
            producer.send(record, Duration::from_secs(30))
        });
        for result in futures::future::join_all(sends).await {
            result.map_err(|(e, _)| e).expect("produce");
        }
    }
}

/// A record read back from an output topic.
#[derive(Debug, Clone)]
pub struct Captured {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// Reads `topics` from the beginning until `expected` records arrived (then `settle` more,
/// to catch duplicates), or panics after `timeout`.
pub async fn collect(
    topics: &[&str],
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<Captured> {
    collect_until(topics, timeout, settle, |out| out.len() >= expected).await
}

/// Reads `topics` from the beginning until `done` holds for what was read (then `settle`
/// more), or panics after `timeout`.
pub async fn collect_until(
    topics: &[&str],
    timeout: Duration,
    settle: Duration,
    mut done: impl FnMut(&[Captured]) -> bool,
) -> Vec<Captured> {
    let consumer: StreamConsumer = kafka_config()
        .set("group.id", unique_name("collector"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("collector");
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        for p in metadata.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut stream = consumer.stream();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut settle_until: Option<tokio::time::Instant> = None;
    loop {
        let until = settle_until.unwrap_or(deadline);
        match tokio::time::timeout_at(until, stream.next()).await {
            Ok(Some(Ok(m))) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Captured {
                    topic: m.topic().to_owned(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
                if settle_until.is_none() && done(&out) {
                    settle_until = Some(tokio::time::Instant::now() + settle);
                }
            }
            Ok(Some(Err(e))) => panic!("reading outputs: {e}"),
            Ok(None) => panic!("output stream ended"),
            Err(_) if settle_until.is_some() => return out,
            Err(_) => panic!(
                "only {} outputs within {timeout:?}, not yet done",
                out.len()
            ),
        }
    }
}

/// The topics and keyspace of one test.
pub struct FeatureEnv {
    pub features: String,
    pub dlq: String,
    pub invalidations: String,
    pub keyspace: String,
    pub group: String,
}

impl FeatureEnv {
    pub async fn create(prefix: &str, partitions: i32) -> FeatureEnv {
        utils::init_tracing();
        let base = unique_name(prefix);
        let env = FeatureEnv {
            features: format!("{base}.features"),
            dlq: format!("{base}.dlq"),
            invalidations: format!("{base}.invalidations"),
            keyspace: unique_name(prefix),
            group: format!("{base}.ingest"),
        };
        create_topic(&env.features, partitions).await;
        create_topic(&env.dlq, 1).await;
        create_topic(&env.invalidations, 1).await;
        env
    }

    /// A configuration for these topics and keyspace, `extra` TOML layered on top.
    pub fn config(&self, extra: &str) -> Config {
        Config::from_toml_str(&format!(
            r#"
            [kafka]
            bootstrap_servers = "{}"
            group_id = "{}-requests"
            statistics_interval_ms = 0
            [topics]
            requests = "{}.unused-requests"
            features = "{}"
            dlq = "{}"
            feature_invalidations = "{}"
            create_missing = false
            [feature_store]
            contact_points = ["{}"]
            keyspace = "{}"
            request_timeout_ms = 1000
            [ingest]
            group_id = "{}"
            retry_max_backoff_ms = 1000
            {extra}
            "#,
            kafka_bootstrap(),
            self.group,
            self.features,
            self.features,
            self.dlq,
            self.invalidations,
            cql_contact(),
            self.keyspace,
            self.group,
        ))
        .expect("valid test config")
    }

    pub async fn drop_keyspace(&self) {
        cql_session()
            .await
            .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", self.keyspace), &[])
            .await
            .expect("drop keyspace");
    }
}

/// One running instance: a feature store with its invalidation listener, and optionally
/// ingestion.
pub struct Instance {
    pub store: Arc<FeatureStore>,
    stop: CancellationToken,
    ingestion: Option<SourceHandle>,
}

impl Instance {
    pub async fn start(config: &Config, ingest: bool, listen: bool) -> Instance {
        utils::require_kafka().await;
        let store = Arc::new(
            FeatureStore::open(&config.feature_store)
                .await
                .unwrap_or_else(|e| panic!("opening the feature store: {e}")),
        );
        let stop = CancellationToken::new();
        if listen {
            let (kafka, topic, store, stop) = (
                config.kafka.clone(),
                config.topics.feature_invalidations.clone(),
                Arc::clone(&store),
                stop.clone(),
            );
            tokio::spawn(async move {
                coherence::listen(&kafka, topic, store, stop)
                    .await
                    .expect("invalidation listener");
            });
        }
        let ingestion = ingest.then(|| {
            ingest::start(config.into(), Arc::clone(&store), stop.clone())
                .expect("ingestion starts")
        });
        Instance {
            store,
            stop,
            ingestion,
        }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        if let Some(handle) = self.ingestion {
            tokio::time::timeout(Duration::from_secs(60), handle.join())
                .await
                .expect("ingestion stops within 60 s")
                .expect("ingestion stops cleanly");
        }
    }
}

pub fn update(entity: &str, feature: &str, version: u64, extra: Value) -> Raw {
    let mut doc = json!({
        "entity_type": "user",
        "entity_id": entity,
        "feature": feature,
        "values": {"v": version, "extra": extra},
        "version": version,
    });
    if version == 0 {
        doc.as_object_mut().expect("object").remove("version");
    }
    (
        Some(entity.as_bytes().to_vec()),
        Some(doc.to_string().into_bytes()),
    )
}

/// The group's committed offsets, summed over the topic's partitions.
pub fn committed_total(group: &str, topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = kafka_config()
        .set("group.id", group)
        .create()
        .expect("offset reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

/// Waits until `check` holds, polling every 100 ms, or panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The result documents in `out`, by request id (a later one for the same id wins).
pub fn results_by_id(out: &[Captured]) -> HashMap<String, Value> {
    out.iter()
        .map(|c| {
            let doc: Value =
                serde_json::from_slice(c.value.as_deref().expect("a result has a value"))
                    .expect("a result is JSON");
            (
                doc["request_id"].as_str().expect("a request id").to_owned(),
                doc,
            )
        })
        .collect()
}

/// The value of the first sample of `name` in a Prometheus text `body` whose labels contain
/// `labels` (empty: any). Used by the fault suite.
#[allow(dead_code)]
pub fn metric(body: &str, name: &str, labels: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            (series == name || series.starts_with(&format!("{name}{{"))) && series.contains(labels)
        })
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

/// `inferflow run` (with `--config config` when given) on `topics` in `group`, logging at
/// `rust_log` to the test's stderr. The test's own `INFERFLOW__…` variables and
/// `INFERFLOW_CONFIG` are removed, so only what the caller sets applies.
#[allow(dead_code)]
pub fn inferflow_run(
    topics: &Topics,
    group: &str,
    config: Option<&std::path::Path>,
    rust_log: &str,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_inferflow"));
    cmd.arg("run");
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    cmd.env("RUST_LOG", rust_log)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    for (key, _) in std::env::vars() {
        if key.starts_with("INFERFLOW__") || key == "INFERFLOW_CONFIG" {
            cmd.env_remove(key);
        }
    }
    cmd.envs(topics.env(group));
    cmd
}

/// A child process (`inferflow run`, a server) killed when the test ends, however it ends.
#[allow(dead_code)]
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sends `sig` (`-HUP`, `-TERM`) to `child`.
pub fn signal(child: &std::process::Child, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// The value of `inferflow_reloads_total{outcome=...}` on `/metrics` at `port`, 0 when absent.
pub async fn reloads(port: u16, outcome: &str) -> u64 {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return 0;
    };
    let body = response.text().await.unwrap_or_default();
    metric(
        &body,
        "inferflow_reloads_total",
        &format!("outcome=\"{outcome}\""),
    )
    .map_or(0, |v| v as u64)
}

/// Waits (up to a minute) until `inferflow run` answers `/metrics` on `port`. SIGHUP before
/// the service listens for it would end the process; the HTTP server starts after the reload
/// handler, so from then on SIGHUP reloads.
pub async fn wait_serving(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "inferflow did not start serving HTTP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `text` to `file`, sends SIGHUP to `child` and waits (up to 10 s) until
/// `inferflow_reloads_total{outcome}` on `port` counts one more.
pub async fn reload_with(
    child: &std::process::Child,
    port: u16,
    file: &std::path::Path,
    text: &str,
    outcome: &str,
) -> u64 {
    let before = reloads(port, outcome).await;
    std::fs::write(file, text).unwrap();
    signal(child, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads(port, outcome).await <= before {
        assert!(
            Instant::now() < deadline,
            "the {outcome} reload was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    before
}
