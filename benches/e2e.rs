//! End-to-end benchmark against the real broker of `scripts/stack`: inferflow beside the raw
//! Kafka limit and a peer, in one run, every figure a ratio of runs measured side by side.
//!
//! Candidates, each a separate process reading the same requests (same topic layout, message
//! sizes and partition count) and writing one output per request, keyed by its request id:
//!
//! - **passthrough**: a minimal rdkafka consume → produce loop (this binary, re-run with
//!   `--role passthrough`): each record's key and bytes copied to the results topic, no
//!   parsing, librdkafka's auto-commit. The practical limit of this broker on this machine.
//! - **peer**: the same identity job in Python with confluent-kafka (`benches/peer/identity.py`):
//!   parse, check, answer `{request_id, status, output, …}`, at least once.
//! - **inferflow**: the real `inferflow run` binary (`E2E_INFERFLOW_BIN`, by default the one
//!   cargo built for this bench; `scripts/bench` passes the release build) with the `identity`
//!   pipeline, configured by `INFERFLOW__…` variables (and `E2E_INFERFLOW_CONFIG`, a TOML file
//!   given with `--config`). Variables set in the environment pass through, so
//!   `INFERFLOW__BATCH__LINGER_MS=2 scripts/bench` measures another configuration.
//! - **realistic**: the same binary with `--config benches/e2e/realistic.toml`
//!   (`E2E_REALISTIC_CONFIG`) and the `realistic` pipeline of `benches/e2e/pipelines/`: a
//!   customer review cleaned (preprocess), the reviewer's profile read from the feature store
//!   (Cassandra, `feature_store.backend = "scylla"`; after each user's first read the
//!   in-process cache answers), scored by the local VADER model, and routed (postprocess). Its
//!   requests carry a user (`E2E_ENTITIES` of them, 1,000 by default, profiles written by the
//!   driver before the runs) and a review text unique to the request (so the result cache
//!   never answers), padded to the same `E2E_PAYLOAD_BYTES`. Its ratio to the peer is against
//!   the peer's identity job: the peer has no realistic version.
//!
//! Two phases, each interleaved (A B C A B C …), medians reported:
//!
//! 1. **Throughput**: `E2E_MESSAGES` requests pre-loaded in one topic; each run reads them in
//!    a fresh consumer group and writes to a fresh results topic. The driver counts distinct
//!    results; the rate is taken from the 10 % mark to the last result (start-up and group
//!    join excluded), and CPU seconds per 1,000 requests over the same window from
//!    `/proc/PID/stat` (utime + stime) of the candidate and of the broker. Each round ends
//!    with the passthrough's **capacity**: its throughput while the driver produces
//!    `E2E_MESSAGES` requests as fast as it can.
//! 2. **Latency** at fixed offered loads, `E2E_LOADS` percent of the median capacity of
//!    phase 1: requests paced by the driver (1 s warm-up, then
//!    `E2E_LATENCY_SECS` measured); latency = time the driver consumed the result − time it
//!    produced the request, both on this machine's monotonic clock. Results missing after the
//!    drain count as infinitely late.
//!
//! Run with `scripts/bench` (builds, prepares the peer, checks the broker, writes the table),
//! or `cargo bench --bench e2e` once the peer's virtual environment exists. Under `cargo test`
//! (no `--bench` argument) it does nothing. Settings (environment): `E2E_MESSAGES` (200000),
//! `E2E_PAYLOAD_BYTES` (256), `E2E_PARTITIONS` (6), `E2E_REPEATS` (3), `E2E_LOADS` (10,50,80),
//! `E2E_LOAD_RATES` (fixed loads in requests/s instead of `E2E_LOADS`, e.g. 3000,7000),
//! `E2E_LATENCY_SECS` (8), `E2E_CANDIDATES` (passthrough,peer,inferflow,realistic),
//! `E2E_ENTITIES` (1000), `E2E_REALISTIC_CONFIG` (benches/e2e/realistic.toml), `E2E_PYTHON`
//! (.bench/venv/bin/python), `E2E_BOOTSTRAP` (127.0.0.1:9092), `E2E_BROKER_PID` (found by
//! its `kafka.Kafka` command line), `E2E_OUT` (also write the report there), `E2E_LOGS`
//! (candidates' stderr, .bench/logs), `E2E_RUN_TIMEOUT_SECS` (180).

#![allow(missing_docs, unreachable_pub)]

#[path = "support/realistic.rs"]
mod realistic;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

const START_HINT: &str = "start it with `scripts/stack up` (from the main checkout)";

// ---------------------------------------------------------------------------------------------
// settings

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Candidate {
    Passthrough,
    Peer,
    Inferflow,
    /// `inferflow run` with the `realistic` pipeline (benches/e2e/pipelines/realistic.toml).
    Realistic,
}

/// What a candidate's requests ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// `{"pipeline":"identity","data":{"seq":N,"pad":"xxx…"}}`.
    Identity,
    /// `{"pipeline":"realistic","entity":{"type":"user","id":…},"data":{"text":…}}`.
    Realistic,
}

impl Candidate {
    fn name(self) -> &'static str {
        match self {
            Candidate::Passthrough => "passthrough",
            Candidate::Peer => "peer",
            Candidate::Inferflow => "inferflow",
            Candidate::Realistic => "realistic",
        }
    }

    fn workload(self) -> Workload {
        match self {
            Candidate::Realistic => Workload::Realistic,
            _ => Workload::Identity,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Candidate::Passthrough => "raw passthrough (rdkafka consume → produce)",
            Candidate::Peer => "peer: Python confluent-kafka, identity job",
            Candidate::Inferflow => "inferflow run, `identity` pipeline",
            Candidate::Realistic => {
                "inferflow run, `realistic` pipeline (clean → cached features → VADER → route)"
            }
        }
    }

    fn parse(s: &str) -> Candidate {
        match s.trim() {
            "passthrough" => Candidate::Passthrough,
            "peer" => Candidate::Peer,
            "inferflow" => Candidate::Inferflow,
            "realistic" => Candidate::Realistic,
            other => panic!(
                "E2E_CANDIDATES: unknown candidate `{other}` (passthrough, peer, inferflow, realistic)"
            ),
        }
    }
}

#[derive(Debug, Clone)]
struct Settings {
    bootstrap: String,
    messages: usize,
    payload_bytes: usize,
    partitions: i32,
    repeats: usize,
    loads: Vec<u32>,
    /// Offered loads in requests per second, instead of `loads` when given.
    load_rates: Vec<f64>,
    latency_secs: f64,
    candidates: Vec<Candidate>,
    inferflow_bin: PathBuf,
    inferflow_config: Option<PathBuf>,
    realistic_config: PathBuf,
    entities: usize,
    root: PathBuf,
    python: PathBuf,
    peer_script: PathBuf,
    broker_pid: Option<u32>,
    out: Option<PathBuf>,
    logs: PathBuf,
    run_timeout: Duration,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not valid")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let path =
            |name: &str, default: PathBuf| std::env::var_os(name).map_or(default, PathBuf::from);
        let loads: Vec<u32> = std::env::var("E2E_LOADS")
            .unwrap_or_else(|_| "10,50,80".into())
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("E2E_LOADS: percentages, e.g. 10,50,80")
            })
            .collect();
        let load_rates: Vec<f64> = std::env::var("E2E_LOAD_RATES")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("E2E_LOAD_RATES: requests per second, e.g. 3000,7000")
            })
            .collect();
        let candidates = std::env::var("E2E_CANDIDATES")
            .unwrap_or_else(|_| "passthrough,peer,inferflow,realistic".into())
            .split(',')
            .map(Candidate::parse)
            .collect::<Vec<_>>();
        assert!(
            candidates.contains(&Candidate::Passthrough),
            "E2E_CANDIDATES must include passthrough: every figure is relative to it"
        );
        Settings {
            bootstrap: env_or("E2E_BOOTSTRAP", "127.0.0.1:9092".to_owned()),
            messages: env_or("E2E_MESSAGES", 200_000usize).max(1_000),
            payload_bytes: env_or("E2E_PAYLOAD_BYTES", 256usize),
            partitions: env_or("E2E_PARTITIONS", 6i32).max(1),
            repeats: env_or("E2E_REPEATS", 3usize).max(1),
            loads,
            load_rates,
            latency_secs: env_or("E2E_LATENCY_SECS", 8.0f64).max(1.0),
            candidates,
            inferflow_bin: path(
                "E2E_INFERFLOW_BIN",
                PathBuf::from(env!("CARGO_BIN_EXE_inferflow")),
            ),
            inferflow_config: std::env::var_os("E2E_INFERFLOW_CONFIG").map(PathBuf::from),
            realistic_config: path(
                "E2E_REALISTIC_CONFIG",
                root.join("benches/e2e/realistic.toml"),
            ),
            entities: env_or("E2E_ENTITIES", 1_000usize).max(1),
            root: root.clone(),
            python: path("E2E_PYTHON", root.join(".bench/venv/bin/python")),
            peer_script: root.join("benches/peer/identity.py"),
            broker_pid: std::env::var("E2E_BROKER_PID")
                .ok()
                .map(|p| p.trim().parse().expect("E2E_BROKER_PID: a pid"))
                .or_else(find_broker_pid),
            out: std::env::var_os("E2E_OUT").map(PathBuf::from),
            logs: path("E2E_LOGS", root.join(".bench/logs")),
            run_timeout: Duration::from_secs(env_or("E2E_RUN_TIMEOUT_SECS", 180u64)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// processes and CPU time

/// The broker's pid: the one java process whose command line runs `kafka.Kafka`.
fn find_broker_pid() -> Option<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.iter().any(|a| *a == b"kafka.Kafka") {
            found.push(pid);
        }
    }
    if found.len() > 1 {
        eprintln!(
            "[e2e] several Kafka brokers run ({found:?}); measuring {}; set E2E_BROKER_PID to choose",
            found[0]
        );
    }
    found.first().copied()
}

fn clock_ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of a process (all its threads) so far.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the first, utime the
    // 12th and stime the 13th.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_sec())
}

/// CPU seconds of the candidate and of the broker at one moment.
#[derive(Debug, Clone, Copy)]
struct CpuMark {
    at: Instant,
    candidate: f64,
    broker: f64,
}

fn cpu_mark(candidate: u32, broker: Option<u32>) -> CpuMark {
    CpuMark {
        at: Instant::now(),
        candidate: cpu_secs(candidate).unwrap_or(f64::NAN),
        broker: broker.and_then(cpu_secs).unwrap_or(f64::NAN),
    }
}

/// A candidate process; killed if the driver unwinds.
struct Running {
    child: Child,
    log: PathBuf,
    what: String,
    /// `host:port` of its `/metrics` (the realistic candidate, unless the user chose the port).
    metrics: Option<String>,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails loudly if the process has exited.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let tail = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "{} exited early ({status}); end of {}:\n{}",
                self.what,
                self.log.display(),
                tail.join("\n")
            );
        }
    }

    /// SIGTERM, then SIGKILL after 40 s.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("[e2e] {} did not stop within 40 s; killing it", self.what);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The topics and group of one run.
struct RunTopics {
    requests: String,
    results: String,
    dlq: String,
    group: String,
}

fn spawn(s: &Settings, candidate: Candidate, t: &RunTopics, tag: &str) -> Running {
    std::fs::create_dir_all(&s.logs).expect("creating the log directory");
    let log = s.logs.join(format!("{tag}-{}.log", candidate.name()));
    let stderr = std::fs::File::create(&log).expect("creating a log file");
    let mut metrics = None;
    let mut cmd = match candidate {
        Candidate::Passthrough => {
            let mut cmd = Command::new(std::env::current_exe().expect("this executable"));
            cmd.args([
                "--role",
                "passthrough",
                &s.bootstrap,
                &t.group,
                &t.requests,
                &t.results,
            ]);
            cmd
        }
        Candidate::Peer => {
            let mut cmd = Command::new(&s.python);
            cmd.arg(&s.peer_script)
                .args([&s.bootstrap, &t.group, &t.requests, &t.results, &t.dlq]);
            cmd
        }
        Candidate::Inferflow | Candidate::Realistic => {
            let mut cmd = Command::new(&s.inferflow_bin);
            cmd.arg("run");
            let config = match candidate {
                Candidate::Realistic => Some(&s.realistic_config),
                _ => s.inferflow_config.as_ref(),
            };
            if let Some(config) = config {
                cmd.arg("--config").arg(config);
            }
            if candidate == Candidate::Realistic {
                // Its configuration's paths (models, pipelines) start at the repository.
                cmd.current_dir(&s.root);
            }
            for (key, value) in inferflow_env(s, t) {
                cmd.env(key, value);
            }
            if candidate == Candidate::Realistic
                && std::env::var_os("INFERFLOW__HTTP__LISTEN").is_none()
            {
                // A known port, to read its feature and result cache counters after a run.
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port")
                    .port();
                let addr = format!("127.0.0.1:{port}");
                cmd.env("INFERFLOW__HTTP__LISTEN", &addr);
                metrics = Some(addr);
            }
            cmd
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {} ({cmd:?}): {e}", candidate.name()));
    Running {
        child,
        log,
        what: candidate.name().to_owned(),
        metrics,
    }
}

/// Feature reads (from the cache, from the store) and result cache lookups (hits, misses) of
/// a running inferflow, from its `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
struct CacheCounts {
    features_cached: f64,
    features_store: f64,
    results_hit: f64,
    results_miss: f64,
}

impl CacheCounts {
    fn describe(&self) -> String {
        format!(
            "feature reads {:.0} from the cache, {:.0} from the store; result cache {:.0} hits, {:.0} misses",
            self.features_cached, self.features_store, self.results_hit, self.results_miss
        )
    }
}

fn cache_counts(addr: &str) -> Option<CacheCounts> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let value = |series: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Some(CacheCounts {
        features_cached: value("inferflow_feature_reads_total{source=\"cache\"}"),
        features_store: value("inferflow_feature_reads_total{source=\"store\"}"),
        results_hit: value("inferflow_cache_lookups_total{outcome=\"hit\"}"),
        results_miss: value("inferflow_cache_lookups_total{outcome=\"miss\"}"),
    })
}

/// What the driver sets for `inferflow run`: topics, group, no feature ingestion. Tuning
/// variables in the driver's environment (batch, executor, kafka.extra …) pass through.
fn inferflow_env(s: &Settings, t: &RunTopics) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("KAFKA__BOOTSTRAP_SERVERS", s.bootstrap.clone()),
        ("KAFKA__GROUP_ID", t.group.clone()),
        ("TOPICS__REQUESTS", t.requests.clone()),
        ("TOPICS__RESULTS", t.results.clone()),
        ("TOPICS__DLQ", t.dlq.clone()),
        (
            "TOPICS__FEATURES",
            format!("{}.unused-features", t.requests),
        ),
        ("TOPICS__CREATE_MISSING", "false".to_owned()),
        ("INGEST__ENABLED", "false".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("INFERFLOW__{k}"), v))
    .collect();
    // Defaults the caller may override (e.g. a fixed port to read /metrics during a run).
    if std::env::var_os("INFERFLOW__HTTP__LISTEN").is_none() {
        env.push(("INFERFLOW__HTTP__LISTEN".into(), "127.0.0.1:0".into()));
    }
    if std::env::var_os("INFERFLOW__LOG__LEVEL").is_none() && std::env::var_os("RUST_LOG").is_none()
    {
        env.push(("INFERFLOW__LOG__LEVEL".into(), "warn".into()));
    }
    env
}

/// The `INFERFLOW__…` variables the user set (the configuration under test).
fn inferflow_overrides() -> Vec<String> {
    let mut vars: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("INFERFLOW__"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    vars.sort();
    vars
}

// ---------------------------------------------------------------------------------------------
// Kafka helpers

fn client(s: &Settings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &s.bootstrap);
    c
}

struct Admin {
    admin: AdminClient<DefaultClientContext>,
    runtime: tokio::runtime::Runtime,
    /// Topics created and not deleted yet, deleted by [`Admin::clean_up`] if a run fails.
    created: Mutex<Vec<String>>,
}

impl Admin {
    fn new(s: &Settings) -> Admin {
        let probe: BaseConsumer = client(s)
            .set("socket.connection.setup.timeout.ms", "3000")
            .create()
            .expect("a metadata client");
        if let Err(err) = probe.fetch_metadata(None, Duration::from_secs(10)) {
            panic!(
                "Kafka is not reachable at {} ({err}): {START_HINT}",
                s.bootstrap
            );
        }
        Admin {
            admin: client(s).create().expect("an admin client"),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            created: Mutex::new(Vec::new()),
        }
    }

    fn clean_up(&self) {
        let left = std::mem::take(&mut *lock(&self.created));
        if !left.is_empty() {
            let names: Vec<&str> = left.iter().map(String::as_str).collect();
            self.delete(&names, None);
        }
    }

    fn create(&self, name: &str, partitions: i32) {
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
        let results = self
            .runtime
            .block_on(self.admin.create_topics([&topic], &opts))
            .expect("create_topics");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
        lock(&self.created).push(name.to_owned());
        // A client subscribing before the broker's metadata has the topic would wait for its
        // next metadata refresh (minutes): wait until every partition has a leader.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self
                .admin
                .inner()
                .fetch_metadata(Some(name), Duration::from_secs(5))
                .ok()
                .is_some_and(|m| {
                    m.topics().first().is_some_and(|t| {
                        t.error().is_none()
                            && t.partitions().len() == partitions as usize
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    })
                });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "topic {name} not visible within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn delete(&self, topics: &[&str], group: Option<&str>) {
        lock(&self.created).retain(|t| !topics.contains(&t.as_str()));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
        if let Err(err) = self
            .runtime
            .block_on(self.admin.delete_topics(topics, &opts))
        {
            eprintln!("[e2e] deleting topics {topics:?}: {err}");
        }
        if let Some(group) = group {
            let _ = self
                .runtime
                .block_on(self.admin.delete_groups(&[group], &opts));
        }
    }
}

fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("bench_e2e_{prefix}_{}", &id[..10])
}

/// A request for the `identity` pipeline of about `bytes` bytes; its id is `{tag}-{seq}`.
fn request(tag: &str, seq: usize, pad: &str) -> String {
    format!(
        r#"{{"request_id":"{tag}-{seq}","pipeline":"identity","data":{{"seq":{seq},"pad":"{pad}"}}}}"#
    )
}

fn padding(tag: &str, bytes: usize) -> String {
    let base = request(tag, 100_000, "").len();
    "x".repeat(bytes.saturating_sub(base))
}

/// Builds the requests of one workload, all of about `E2E_PAYLOAD_BYTES`.
struct Requests {
    workload: Workload,
    tag: &'static str,
    pad: String,
    bytes: usize,
    entities: usize,
}

impl Requests {
    fn new(s: &Settings, workload: Workload, tag: &'static str) -> Requests {
        Requests {
            workload,
            tag,
            pad: padding(tag, s.payload_bytes),
            bytes: s.payload_bytes,
            entities: s.entities,
        }
    }

    fn key(&self, seq: usize) -> String {
        format!("{}-{seq}", self.tag)
    }

    fn body(&self, seq: usize) -> String {
        match self.workload {
            Workload::Identity => request(self.tag, seq, &self.pad),
            Workload::Realistic => realistic::request(self.tag, seq, self.bytes, self.entities),
        }
    }
}

/// The sequence number in a request id (or result key) `{tag}-{seq}`.
fn seq_of(key: &[u8]) -> Option<usize> {
    let dash = key.iter().rposition(|b| *b == b'-')?;
    std::str::from_utf8(&key[dash + 1..]).ok()?.parse().ok()
}

/// The load generator's producer: idempotent, acks=all, 1 ms linger.
fn generator(s: &Settings) -> ThreadedProducer<rdkafka::producer::DefaultProducerContext> {
    client(s)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("the load generator's producer")
}

fn send(
    producer: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    key: &str,
    value: &str,
) {
    let mut record = BaseRecord::to(topic).key(key).payload(value);
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => panic!("producing a request: {e}"),
        }
    }
}

/// Pre-loads `n` requests of `workload` (tag `tp`) into `topic`.
fn preload(s: &Settings, topic: &str, n: usize, workload: Workload) {
    let producer = generator(s);
    let requests = Requests::new(s, workload, "tp");
    for seq in 0..n {
        send(&producer, topic, &requests.key(seq), &requests.body(seq));
    }
    producer
        .flush(Duration::from_secs(120))
        .expect("pre-loading the backlog");
}

// ---------------------------------------------------------------------------------------------
// the realistic workload's features

/// Writes the `profile` feature of every user of the realistic workload (`u-0` … `u-{E2E_ENTITIES − 1}`)
/// to the feature store of the realistic candidate's configuration (the same file, with the
/// same `INFERFLOW__…` overrides), before any run. Fails loudly when Cassandra does not answer.
fn seed_features(s: &Settings) {
    use inferflow::config::{Config, Sources};
    use inferflow::feature_store::FeatureStore;

    let config = Config::load(&Sources::standard(Some(s.realistic_config.clone())))
        .unwrap_or_else(|e| panic!("{}: {e}", s.realistic_config.display()));
    let fs = &config.feature_store;
    if fs.backend == inferflow::config::FeatureStoreBackend::Scylla {
        let answers = fs.contact_points.iter().any(|cp| {
            use std::net::ToSocketAddrs;
            cp.to_socket_addrs().ok().into_iter().flatten().any(|addr| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok()
            })
        });
        assert!(
            answers,
            "Cassandra (the feature store of {}) does not answer on {}: {START_HINT}",
            s.realistic_config.display(),
            fs.contact_points.join(", ")
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let t0 = Instant::now();
    // The newest version wins: a run's profiles replace any earlier run's.
    let version = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64);
    let updates = realistic::profiles(s.entities, version);
    runtime.block_on(async {
        let store = tokio::time::timeout(Duration::from_secs(120), FeatureStore::open(fs))
            .await
            .unwrap_or_else(|_| panic!("opening the feature store took over 120 s ({START_HINT})"))
            .unwrap_or_else(|e| {
                panic!(
                    "opening the feature store at {} ({e}): {START_HINT}",
                    fs.contact_points.join(", ")
                )
            });
        let failed: Vec<String> = store
            .set_features(&updates)
            .await
            .into_iter()
            .filter_map(Result::err)
            .map(|e| e.to_string())
            .collect();
        assert!(
            failed.is_empty(),
            "{} of {} feature writes failed, the first: {}",
            failed.len(),
            updates.len(),
            failed[0]
        );
    });
    eprintln!(
        "[e2e] wrote the profiles of {} users to the feature store (keyspace {}) in {:.1} s",
        s.entities,
        fs.keyspace,
        t0.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// the collector: reads a results topic, records when each request's result arrived

struct Arrivals {
    base: Instant,
    /// Microseconds after `base` + 1 when the result of request `seq` arrived; 0 = not yet.
    received: Vec<AtomicU64>,
    unique: AtomicUsize,
    duplicates: AtomicUsize,
    errors: AtomicUsize,
    strays: AtomicUsize,
    /// CPU marks taken when `unique` reached each of the mark counts.
    marks: Mutex<Vec<(usize, CpuMark)>>,
}

impl Arrivals {
    fn micros(&self, at: Instant) -> u64 {
        at.duration_since(self.base).as_micros() as u64 + 1
    }
}

struct Collector {
    arrivals: Arc<Arrivals>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Collector {
    fn start(
        s: &Settings,
        topic: &str,
        slots: usize,
        base: Instant,
        marks: Vec<usize>,
        pids: (Arc<AtomicU64>, Option<u32>),
    ) -> Collector {
        let arrivals = Arc::new(Arrivals {
            base,
            received: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            unique: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
            errors: AtomicUsize::new(0),
            strays: AtomicUsize::new(0),
            marks: Mutex::new(Vec::new()),
        });
        let consumer: BaseConsumer = client(s)
            .set("group.id", unique("collector"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .expect("the collector");
        let mut tpl = TopicPartitionList::new();
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("results topic metadata");
        for p in metadata.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("a partition");
        }
        consumer.assign(&tpl).expect("assigning the results topic");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (arrivals, stop) = (Arc::clone(&arrivals), Arc::clone(&stop));
            std::thread::spawn(move || {
                let (candidate_pid, broker_pid) = pids;
                let mut marks = marks.into_iter().peekable();
                while !stop.load(Ordering::Acquire) {
                    let Some(result) = consumer.poll(Duration::from_millis(50)) else {
                        continue;
                    };
                    let message = result.expect("reading results");
                    let now = Instant::now();
                    let Some(seq) = message.key().and_then(seq_of) else {
                        arrivals.strays.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let Some(slot) = arrivals.received.get(seq) else {
                        arrivals.strays.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    if let Some(headers) = message.headers() {
                        if headers
                            .iter()
                            .any(|h| h.key == "inferflow-status" && h.value == Some(b"error"))
                        {
                            arrivals.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if slot
                        .compare_exchange(
                            0,
                            arrivals.micros(now),
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        )
                        .is_err()
                    {
                        arrivals.duplicates.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let count = arrivals.unique.fetch_add(1, Ordering::AcqRel) + 1;
                    while marks.peek().is_some_and(|m| *m <= count) {
                        let at = marks.next().expect("peeked");
                        let pid = candidate_pid.load(Ordering::Acquire) as u32;
                        lock(&arrivals.marks).push((at, cpu_mark(pid, broker_pid)));
                    }
                }
            })
        };
        Collector {
            arrivals,
            stop,
            thread,
        }
    }

    fn finish(self) -> Arc<Arrivals> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the collector thread");
        self.arrivals
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// phase 1: throughput from a backlog

#[derive(Debug, Clone, Copy)]
struct ThroughputSample {
    rate: f64,
    /// CPU seconds per 1,000 requests.
    cpu_candidate: f64,
    cpu_broker: f64,
    /// The realistic candidate's cache counters at the end of the run.
    caches: Option<CacheCounts>,
}

fn throughput_run(
    s: &Settings,
    admin: &Admin,
    candidate: Candidate,
    backlog: &str,
    tag: &str,
) -> ThroughputSample {
    let n = s.messages;
    let warm = n / 10;
    let t = RunTopics {
        requests: backlog.to_owned(),
        results: unique("results"),
        dlq: unique("dlq"),
        group: unique(candidate.name()),
    };
    admin.create(&t.results, s.partitions);
    admin.create(&t.dlq, 1);
    let pid = Arc::new(AtomicU64::new(0));
    let collector = Collector::start(
        s,
        &t.results,
        n,
        Instant::now(),
        vec![warm, n],
        (Arc::clone(&pid), s.broker_pid),
    );
    let mut running = spawn(s, candidate, &t, tag);
    pid.store(u64::from(running.pid()), Ordering::Release);
    let deadline = Instant::now() + s.run_timeout;
    while collector.arrivals.unique.load(Ordering::Acquire) < n {
        running.check_alive();
        if Instant::now() > deadline {
            eprintln!(
                "[e2e] {tag} {}: only {} of {n} results within {:?}",
                candidate.name(),
                collector.arrivals.unique.load(Ordering::Acquire),
                s.run_timeout
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let caches = running.metrics.as_deref().and_then(cache_counts);
    if let Some(c) = &caches {
        eprintln!("[e2e] {tag} {}: {}", candidate.name(), c.describe());
    }
    running.stop();
    let arrivals = collector.finish();
    admin.delete(&[&t.results, &t.dlq], Some(&t.group));
    check_outputs(&arrivals, candidate, tag);
    let marks = lock(&arrivals.marks).clone();
    let (Some((_, a)), Some((_, b))) = (marks.first(), marks.get(1)) else {
        return ThroughputSample {
            rate: f64::NAN,
            cpu_candidate: f64::NAN,
            cpu_broker: f64::NAN,
            caches,
        };
    };
    let requests = (n - warm) as f64;
    ThroughputSample {
        rate: requests / b.at.duration_since(a.at).as_secs_f64(),
        cpu_candidate: (b.candidate - a.candidate) / requests * 1000.0,
        cpu_broker: (b.broker - a.broker) / requests * 1000.0,
        caches,
    }
}

fn check_outputs(arrivals: &Arrivals, candidate: Candidate, tag: &str) {
    let errors = arrivals.errors.load(Ordering::Relaxed);
    assert_eq!(
        errors,
        0,
        "{tag} {}: {errors} error results",
        candidate.name()
    );
    let strays = arrivals.strays.load(Ordering::Relaxed);
    let dups = arrivals.duplicates.load(Ordering::Relaxed);
    if strays + dups > 0 {
        eprintln!(
            "[e2e] {tag} {}: {dups} duplicate and {strays} unexpected results",
            candidate.name()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// phase 2: latency at a fixed offered load

#[derive(Debug, Clone, Copy)]
struct LatencySample {
    /// Percentiles in milliseconds (infinite when more results than that are missing).
    p50: f64,
    p99: f64,
    p999: f64,
    missing: usize,
    cpu_candidate: f64,
    cpu_broker: f64,
}

const WARM_UP: Duration = Duration::from_secs(1);
/// Requests sent until the candidate first answers, at most.
const PROBES: usize = 2_000;

/// How a live run offers its requests.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// Paced at this many requests per second: `WARM_UP`, then `E2E_LATENCY_SECS` measured.
    Paced(f64),
    /// This many requests, as fast as the generator sends them (the first tenth a warm-up).
    Flood(usize),
}

/// What a live run saw, per request after the probes.
struct LiveOutcome {
    /// When each request was produced and its result consumed: microseconds after the
    /// collector's base, 0 = never.
    sent: Vec<u64>,
    received: Vec<u64>,
    /// Requests before this one are the warm-up.
    measured_from: usize,
    /// CPU at the first measured request and after the last one was sent.
    cpu: (CpuMark, CpuMark),
}

/// Fresh topics, the candidate started and answering, then requests produced while it runs.
fn live_run(
    s: &Settings,
    admin: &Admin,
    candidate: Candidate,
    load: Load,
    tag: &str,
) -> LiveOutcome {
    let t = RunTopics {
        requests: unique("requests"),
        results: unique("results"),
        dlq: unique("dlq"),
        group: unique(candidate.name()),
    };
    admin.create(&t.requests, s.partitions);
    admin.create(&t.results, s.partitions);
    admin.create(&t.dlq, 1);
    let (count, rate, measured_from, drain_for) = match load {
        Load::Paced(rate) => (
            ((WARM_UP.as_secs_f64() + s.latency_secs) * rate).ceil() as usize,
            rate,
            (WARM_UP.as_secs_f64() * rate) as usize,
            Duration::from_secs_f64(s.latency_secs.max(5.0)),
        ),
        Load::Flood(n) => (n, f64::INFINITY, n / 10, s.run_timeout),
    };
    let base = Instant::now();
    let pid = Arc::new(AtomicU64::new(0));
    let collector = Collector::start(
        s,
        &t.results,
        PROBES + count,
        base,
        Vec::new(),
        (Arc::clone(&pid), s.broker_pid),
    );
    let mut running = spawn(s, candidate, &t, tag);
    pid.store(u64::from(running.pid()), Ordering::Release);
    let producer = generator(s);
    let requests = Requests::new(s, candidate.workload(), "l");
    // Wait until the candidate answers (group joined, partitions assigned), probing every 50 ms.
    let ready_by = Instant::now() + Duration::from_secs(90);
    let mut probe = 0;
    while collector.arrivals.unique.load(Ordering::Acquire) == 0 {
        running.check_alive();
        assert!(
            Instant::now() < ready_by,
            "{} did not answer within 90 s",
            candidate.name()
        );
        assert!(probe < PROBES, "too many probes");
        send(
            &producer,
            &t.requests,
            &requests.key(probe),
            &requests.body(probe),
        );
        probe += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    // Every 250 µs, send what the rate owes since the start (everything at once for a flood).
    let mut sent: Vec<u64> = vec![0; count];
    let start = Instant::now();
    let mut cpu_start = None;
    let mut i = 0;
    while i < count {
        let owed = if rate.is_finite() {
            ((start.elapsed().as_secs_f64() * rate) as usize).min(count)
        } else {
            count
        };
        while i < owed {
            if i == measured_from {
                cpu_start = Some(cpu_mark(running.pid(), s.broker_pid));
            }
            let seq = PROBES + i;
            sent[i] = collector.arrivals.micros(Instant::now());
            send(
                &producer,
                &t.requests,
                &requests.key(seq),
                &requests.body(seq),
            );
            i += 1;
        }
        std::thread::sleep(Duration::from_micros(250));
    }
    let cpu_end = cpu_mark(running.pid(), s.broker_pid);
    // Drain: wait until every request is answered, or give up after `drain_for`.
    let drain_by = Instant::now() + drain_for;
    let received = |i: usize| collector.arrivals.received[PROBES + i].load(Ordering::Acquire);
    let mut pending_from = 0;
    while Instant::now() < drain_by {
        while pending_from < count && received(pending_from) != 0 {
            pending_from += 1;
        }
        if pending_from == count {
            break;
        }
        running.check_alive();
        std::thread::sleep(Duration::from_millis(20));
    }
    running.stop();
    let arrivals = collector.finish();
    drop(producer);
    admin.delete(&[&t.requests, &t.results, &t.dlq], Some(&t.group));
    check_outputs(&arrivals, candidate, tag);
    LiveOutcome {
        received: (0..count)
            .map(|i| arrivals.received[PROBES + i].load(Ordering::Acquire))
            .collect(),
        sent,
        measured_from,
        cpu: (cpu_start.expect("a measured window"), cpu_end),
    }
}

/// The passthrough's throughput while the generator produces at the same time, as fast as it
/// can (a live stream has its production on the same cores): the 100 % of the latency loads.
fn capacity_run(s: &Settings, admin: &Admin, tag: &str) -> f64 {
    let outcome = live_run(
        s,
        admin,
        Candidate::Passthrough,
        Load::Flood(s.messages),
        tag,
    );
    let mut times: Vec<u64> = outcome
        .received
        .iter()
        .copied()
        .filter(|t| *t != 0)
        .collect();
    times.sort_unstable();
    let from = times.len() / 10;
    match (times.get(from), times.last()) {
        (Some(a), Some(b)) if b > a => (times.len() - 1 - from) as f64 / ((b - a) as f64 / 1e6),
        _ => f64::NAN,
    }
}

fn latency_run(
    s: &Settings,
    admin: &Admin,
    candidate: Candidate,
    rate: f64,
    tag: &str,
) -> LatencySample {
    let o = live_run(s, admin, candidate, Load::Paced(rate), tag);
    let mut latencies: Vec<f64> = (o.measured_from..o.sent.len())
        .map(|i| {
            if o.received[i] == 0 {
                f64::INFINITY
            } else {
                o.received[i].saturating_sub(o.sent[i]) as f64 / 1000.0
            }
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let missing = latencies.iter().filter(|l| l.is_infinite()).count();
    let (cpu_start, cpu_end) = o.cpu;
    let sent_requests = (o.sent.len() - o.measured_from) as f64;
    LatencySample {
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        p999: percentile(&latencies, 0.999),
        missing,
        cpu_candidate: (cpu_end.candidate - cpu_start.candidate) / sent_requests * 1000.0,
        cpu_broker: (cpu_end.broker - cpu_start.broker) / sent_requests * 1000.0,
    }
}

// ---------------------------------------------------------------------------------------------
// statistics and the report

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median of the values that are not NaN (NaN when there are none).
fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

fn ms(x: f64) -> String {
    if x.is_infinite() {
        "∞ (overloaded)".into()
    } else if x.is_nan() {
        "–".into()
    } else if x < 10.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.1}")
    }
}

fn ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}×")
    } else {
        "–".into()
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

fn machine(s: &Settings) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kafka = s
        .broker_pid
        .and_then(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .and_then(|cmdline| {
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let cp = args
                .iter()
                .position(|a| a == "-cp")
                .and_then(|i| args.get(i + 1))?;
            let dir = Path::new(cp.trim_end_matches('*'));
            std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix("kafka_2.13-")
                    .and_then(|v| v.strip_suffix(".jar"))
                    .map(str::to_owned)
            })
        })
        .unwrap_or_else(|| "?".into());
    format!(
        "{cores} cores ({cpu}), Linux {}, single-node Kafka {kafka} on loopback (broker pid {}); load average at the start: {}",
        read_trimmed("/proc/sys/kernel/osrelease"),
        s.broker_pid.map_or("not found".into(), |p| p.to_string()),
        read_trimmed("/proc/loadavg"),
    )
}

struct Report {
    text: String,
}

impl Report {
    fn line(&mut self, line: impl AsRef<str>) {
        println!("{}", line.as_ref());
        self.text.push_str(line.as_ref());
        self.text.push('\n');
    }
}

#[allow(clippy::too_many_lines)]
fn run(s: &Settings, admin: &Admin) {
    let mut report = Report {
        text: String::new(),
    };
    let started = Instant::now();
    let machine = machine(s);
    eprintln!("[e2e] {machine}");
    for c in &s.candidates {
        if *c == Candidate::Peer && !s.python.exists() {
            panic!(
                "the peer's Python ({}) does not exist: run scripts/bench, which creates its virtual environment, or set E2E_PYTHON",
                s.python.display()
            );
        }
    }

    if s.candidates.contains(&Candidate::Realistic) {
        seed_features(s);
    }

    // Phase 1: throughput from one pre-loaded backlog per workload.
    let mut workloads: Vec<Workload> = s.candidates.iter().map(|c| c.workload()).collect();
    workloads.sort_by_key(|w| *w as u8);
    workloads.dedup();
    let backlogs: Vec<(Workload, String)> = workloads
        .into_iter()
        .map(|w| {
            let backlog = unique("backlog");
            admin.create(&backlog, s.partitions);
            let t0 = Instant::now();
            preload(s, &backlog, s.messages, w);
            eprintln!(
                "[e2e] pre-loaded {} {w:?} requests of ~{} B in {:.1} s",
                s.messages,
                s.payload_bytes,
                t0.elapsed().as_secs_f64()
            );
            (w, backlog)
        })
        .collect();
    let backlog_of = |c: Candidate| {
        backlogs
            .iter()
            .find(|(w, _)| *w == c.workload())
            .map(|(_, b)| b.as_str())
            .expect("a backlog per workload")
    };
    let cands = &s.candidates;
    let mut tp: Vec<Vec<ThroughputSample>> = vec![Vec::new(); cands.len()];
    let mut capacity: Vec<f64> = Vec::new();
    for round in 0..s.repeats {
        for (ci, c) in cands.iter().enumerate() {
            let tag = format!("tp{round}");
            let sample = throughput_run(s, admin, *c, backlog_of(*c), &tag);
            eprintln!(
                "[e2e] throughput round {}/{} {:<11}: {:>8.0} req/s, CPU s per 1k req: candidate {:.4}, broker {:.4}",
                round + 1,
                s.repeats,
                c.name(),
                sample.rate,
                sample.cpu_candidate,
                sample.cpu_broker
            );
            tp[ci].push(sample);
        }
        let live = capacity_run(s, admin, &format!("cap{round}"));
        eprintln!(
            "[e2e] throughput round {}/{} passthrough with the generator producing alongside: {live:>8.0} req/s",
            round + 1,
            s.repeats
        );
        capacity.push(live);
    }
    let names: Vec<&str> = backlogs.iter().map(|(_, b)| b.as_str()).collect();
    admin.delete(&names, None);
    let idx = |c: Candidate| cands.iter().position(|x| *x == c);
    let pass = idx(Candidate::Passthrough).expect("passthrough is a candidate");
    let max_rate = median(capacity.iter().copied());
    assert!(
        max_rate.is_finite(),
        "the passthrough produced no throughput figure"
    );

    // Phase 2: latency at fixed fractions of the passthrough maximum (or at fixed rates).
    // Each level: its label, its rate, and its percentage.
    let levels: Vec<(String, f64, Option<u32>)> = if s.load_rates.is_empty() {
        s.loads
            .iter()
            .map(|p| {
                let rate = max_rate * f64::from(*p) / 100.0;
                (format!("{p} % ({rate:.0}/s)"), rate, Some(*p))
            })
            .collect()
    } else {
        s.load_rates
            .iter()
            .map(|r| (format!("{r:.0}/s"), *r, None))
            .collect()
    };
    let at_50 = levels.iter().position(|l| l.2 == Some(50));
    let mut lat: Vec<Vec<Vec<LatencySample>>> = vec![vec![Vec::new(); cands.len()]; levels.len()];
    for (li, (label, rate, _)) in levels.iter().enumerate() {
        let rate = *rate;
        for round in 0..s.repeats {
            for (ci, c) in cands.iter().enumerate() {
                let tag = format!("lat{li}r{round}");
                let sample = latency_run(s, admin, *c, rate, &tag);
                eprintln!(
                    "[e2e] latency {label} round {}/{} {:<11}: p50 {} ms, p99 {} ms, p99.9 {} ms, missing {}",
                    round + 1,
                    s.repeats,
                    c.name(),
                    ms(sample.p50),
                    ms(sample.p99),
                    ms(sample.p999),
                    sample.missing
                );
                lat[li][ci].push(sample);
            }
        }
    }

    // The report.
    let overrides = inferflow_overrides();
    report.line("## End-to-end results");
    report.line("");
    report.line(format!(
        "- Machine: {machine}; at the end: {}.",
        read_trimmed("/proc/loadavg")
    ));
    report.line(format!(
        "- Workload: {} pre-loaded requests of ~{} B for the `identity` pipeline{}, {} partitions (requests and results); {} interleaved repeats of every run; whole run {:.1} min.",
        s.messages,
        s.payload_bytes,
        if cands.contains(&Candidate::Realistic) {
            format!(
                " (and as many of the same size for the `realistic` one: a review text unique to each request, by one of {} users)",
                s.entities
            )
        } else {
            String::new()
        },
        s.partitions,
        s.repeats,
        started.elapsed().as_secs_f64() / 60.0
    ));
    report.line(format!(
        "- inferflow: `{}`{}; configuration: {}.",
        s.inferflow_bin.display(),
        s.inferflow_config
            .as_ref()
            .map_or(String::new(), |c| format!(" --config {}", c.display())),
        if overrides.is_empty() {
            "the built-in defaults".to_owned()
        } else {
            format!("defaults plus `{}`", overrides.join(" "))
        }
    ));
    if cands.contains(&Candidate::Realistic) {
        report.line(format!(
            "- realistic: the same binary with `--config {}` (pipeline `realistic`: clean → `profile` features of the request's user from the feature store, cached in process → VADER → route), the same overrides; {} users' profiles written before the runs.",
            s.realistic_config
                .strip_prefix(&s.root)
                .unwrap_or(&s.realistic_config)
                .display(),
            s.entities
        ));
    }
    report.line("");
    report.line("### Throughput from a backlog (medians)");
    report.line("");
    report.line("| candidate | requests/s | × passthrough | × peer | CPU s / 1k req, processor | CPU s / 1k req, broker | requests per processor CPU-second |");
    report.line("|---|---|---|---|---|---|---|");
    let peer = idx(Candidate::Peer);
    let per_round_ratio = |a: usize, b: usize, f: &dyn Fn(&ThroughputSample) -> f64| {
        median(tp[a].iter().zip(&tp[b]).map(|(x, y)| f(x) / f(y)))
    };
    for (ci, c) in cands.iter().enumerate() {
        let rate = median(tp[ci].iter().map(|x| x.rate));
        let cpu = median(tp[ci].iter().map(|x| x.cpu_candidate));
        let broker = median(tp[ci].iter().map(|x| x.cpu_broker));
        let vs_peer = peer.map_or(f64::NAN, |p| per_round_ratio(ci, p, &|x| x.rate));
        report.line(format!(
            "| {} | {:.0} | {} | {} | {:.4} | {:.4} | {:.0} |",
            c.label(),
            rate,
            ratio(per_round_ratio(ci, pass, &|x| x.rate)),
            ratio(vs_peer),
            cpu,
            broker,
            1000.0 / cpu
        ));
    }
    report.line("");
    report.line(
        "Ratios are medians of the per-round ratios (each round runs the candidates back to back).",
    );
    if cands.contains(&Candidate::Realistic) && peer.is_some() {
        report.line("The peer does the identity job only: the realistic pipeline's ratio to it is against the peer's identity job.");
    }
    report.line("");
    report.line("### End-to-end latency at fixed offered loads (medians, ms)");
    report.line("");
    if s.load_rates.is_empty() {
        report.line(format!("Loads are percentages of the passthrough's median throughput while the load generator produces at the same time, as fast as it can ({max_rate:.0} requests/s; all runs: {capacity:.0?}): a live stream has its production on the same cores."));
    } else {
        report.line(format!("Loads are fixed rates (`E2E_LOAD_RATES`); for scale, the passthrough's median throughput while the load generator produces at the same time was {max_rate:.0} requests/s (all runs: {capacity:.0?})."));
    }
    report.line("");
    report.line("| load | candidate | p50 | p99 | p99.9 | p99 added over passthrough | CPU s / 1k req, processor | CPU s / 1k req, broker |");
    report.line("|---|---|---|---|---|---|---|---|");
    for (li, (label, _, _)) in levels.iter().enumerate() {
        for (ci, c) in cands.iter().enumerate() {
            let runs = &lat[li][ci];
            let added = median(runs.iter().zip(&lat[li][pass]).map(|(x, y)| x.p99 - y.p99));
            report.line(format!(
                "| {label} | {} | {} | {} | {} | {} | {:.4} | {:.4} |",
                c.name(),
                ms(median(runs.iter().map(|x| x.p50))),
                ms(median(runs.iter().map(|x| x.p99))),
                ms(median(runs.iter().map(|x| x.p999))),
                if ci == pass { "–".into() } else { ms(added) },
                median(runs.iter().map(|x| x.cpu_candidate)),
                median(runs.iter().map(|x| x.cpu_broker)),
            ));
        }
    }
    report.line("");
    let inferflow = idx(Candidate::Inferflow);
    let realistic = idx(Candidate::Realistic);
    if inferflow.is_some() || realistic.is_some() {
        report.line("### Targets");
        report.line("");
        report.line("| target | aim | measured | met |");
        report.line("|---|---|---|---|");
    }
    if let Some(inf) = inferflow {
        let r = per_round_ratio(inf, pass, &|x| x.rate);
        report.line(format!(
            "| identity throughput / passthrough | ≥ 0.80× | {} | {} |",
            ratio(r),
            yes(r >= 0.8)
        ));
        if let Some(li) = at_50 {
            let added = median(
                lat[li][inf]
                    .iter()
                    .zip(&lat[li][pass])
                    .map(|(x, y)| x.p99 - y.p99),
            );
            report.line(format!(
                "| p99 added over passthrough at 50 % load | ≤ 2 ms | {} ms | {} |",
                ms(added),
                yes(added <= 2.0)
            ));
        }
        if let Some(p) = peer {
            let e = per_round_ratio(p, inf, &|x| x.cpu_candidate);
            report.line(format!(
                "| requests per processor CPU-second / peer's | ≥ 3× | {} | {} |",
                ratio(e),
                yes(e >= 3.0)
            ));
        }
    }
    if let Some(real) = realistic {
        let r = per_round_ratio(real, pass, &|x| x.rate);
        report.line(format!(
            "| realistic throughput / passthrough | ≥ 0.50× | {} | {} |",
            ratio(r),
            yes(r >= 0.5)
        ));
        if let Some(li) = at_50 {
            let added = median(
                lat[li][real]
                    .iter()
                    .zip(&lat[li][pass])
                    .map(|(x, y)| x.p99 - y.p99),
            );
            report.line(format!(
                "| realistic: p99 added over passthrough at 50 % load (the 2 ms aim is identity's; for reference) | – | {} ms | – |",
                ms(added)
            ));
        }
        if let Some(p) = peer {
            let e = per_round_ratio(p, real, &|x| x.cpu_candidate);
            report.line(format!(
                "| realistic: requests per processor CPU-second / the identity peer's (for reference) | – | {} | – |",
                ratio(e)
            ));
        }
    }
    if inferflow.is_some() || realistic.is_some() {
        report.line("");
    }
    report.line("<details><summary>Every run</summary>");
    report.line("");
    for (ci, c) in cands.iter().enumerate() {
        let runs: Vec<String> = tp[ci]
            .iter()
            .map(|x| {
                format!(
                    "{:.0}/s ({:.4}, {:.4})",
                    x.rate, x.cpu_candidate, x.cpu_broker
                )
            })
            .collect();
        report.line(format!(
            "- throughput {}: {} (CPU s / 1k req: processor, broker)",
            c.name(),
            runs.join(", ")
        ));
        let caches: Vec<String> = tp[ci]
            .iter()
            .filter_map(|x| x.caches.as_ref().map(CacheCounts::describe))
            .collect();
        if !caches.is_empty() {
            report.line(format!(
                "- throughput {}, whole runs (start-up included): {}",
                c.name(),
                caches.join("; ")
            ));
        }
    }
    for (li, (label, _, _)) in levels.iter().enumerate() {
        for (ci, c) in cands.iter().enumerate() {
            let runs: Vec<String> = lat[li][ci]
                .iter()
                .map(|x| {
                    let mut t = format!("{}/{}/{}", ms(x.p50), ms(x.p99), ms(x.p999));
                    if x.missing > 0 {
                        let _ = write!(t, " ({} missing)", x.missing);
                    }
                    t
                })
                .collect();
            report.line(format!(
                "- latency {label} {}: {} (p50/p99/p99.9 ms)",
                c.name(),
                runs.join(", ")
            ));
        }
    }
    report.line("");
    report.line("</details>");
    if let Some(out) = &s.out {
        if let Some(dir) = out.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(out, &report.text).expect("writing E2E_OUT");
        eprintln!("[e2e] report written to {}", out.display());
    }
}

fn yes(met: bool) -> &'static str {
    if met { "yes" } else { "**no**" }
}

// ---------------------------------------------------------------------------------------------
// the passthrough role

/// The raw limit: consume, copy key and value to the results topic, nothing else.
fn passthrough(args: &[String]) {
    let [bootstrap, group, requests, results] = args else {
        panic!("usage: e2e --role passthrough BOOTSTRAP GROUP REQUESTS RESULTS");
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("client.id", "passthrough")
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", "16384")
        .create()
        .expect("the passthrough consumer");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", "passthrough")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("the passthrough producer");
    consumer.subscribe(&[requests]).expect("subscribing");
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(results);
                if let Some(key) = message.key() {
                    record = record.key(key);
                }
                if let Some(value) = message.payload() {
                    record = record.payload(value);
                }
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            producer.poll(Duration::from_millis(5));
                        }
                        Err((e, _)) => panic!("passthrough produce: {e}"),
                    }
                }
                producer.poll(Duration::ZERO);
            }
            Some(Err(e)) => eprintln!("passthrough consume: {e}"),
            None => producer.poll(Duration::ZERO),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--role") {
        match args.get(i + 1).map(String::as_str) {
            Some("passthrough") => return passthrough(&args[i + 2..]),
            other => panic!("unknown role {other:?}"),
        }
    }
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "e2e: run with `scripts/bench` or `cargo bench --bench e2e` (needs scripts/stack up)"
        );
        return;
    }
    let settings = Settings::from_env();
    let admin = Admin::new(&settings);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&settings, &admin)));
    // The topics of a failed run are deleted too (candidates were killed while unwinding).
    admin.clean_up();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
