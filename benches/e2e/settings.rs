//! The bench's settings, from the environment (see the list in `benches/e2e.rs`), and the
//! candidates it measures.

use std::path::PathBuf;
use std::time::Duration;

use super::process::find_broker_pid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Candidate {
    Passthrough,
    Peer,
    Inferflow,
    /// `inferflow run` with the `realistic` pipeline (benches/e2e/pipelines/realistic.toml).
    Realistic,
}

/// What a candidate's requests ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Workload {
    /// `{"pipeline":"identity","data":{"seq":N,"pad":"xxx…"}}`.
    Identity,
    /// `{"pipeline":"realistic","entity":{"type":"user","id":…},"data":{"text":…}}`.
    Realistic,
}

impl Candidate {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Candidate::Passthrough => "passthrough",
            Candidate::Peer => "peer",
            Candidate::Inferflow => "inferflow",
            Candidate::Realistic => "realistic",
        }
    }

    pub(crate) fn workload(self) -> Workload {
        match self {
            Candidate::Realistic => Workload::Realistic,
            _ => Workload::Identity,
        }
    }

    pub(crate) fn label(self) -> &'static str {
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
pub(crate) struct Settings {
    pub(crate) bootstrap: String,
    pub(crate) messages: usize,
    pub(crate) payload_bytes: usize,
    pub(crate) partitions: i32,
    pub(crate) repeats: usize,
    pub(crate) loads: Vec<u32>,
    /// Offered loads in requests per second, instead of `loads` when given.
    pub(crate) load_rates: Vec<f64>,
    pub(crate) latency_secs: f64,
    pub(crate) candidates: Vec<Candidate>,
    pub(crate) inferflow_bin: PathBuf,
    pub(crate) inferflow_config: Option<PathBuf>,
    pub(crate) realistic_config: PathBuf,
    pub(crate) entities: usize,
    pub(crate) root: PathBuf,
    pub(crate) python: PathBuf,
    pub(crate) peer_script: PathBuf,
    pub(crate) broker_pid: Option<u32>,
    pub(crate) out: Option<PathBuf>,
    pub(crate) logs: PathBuf,
    pub(crate) run_timeout: Duration,
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
    pub(crate) fn from_env() -> Settings {
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
