//! The end-to-end benchmark's `realistic` pipeline in process, without Kafka: what the pipeline
//! work itself costs per request.
//!
//! Everything is built as `inferflow run --config benches/e2e/realistic.toml` builds it (the
//! same configuration file, `build_manager`, the pipeline files of `benches/e2e/pipelines/`,
//! the Prometheus recorder installed), except the feature store: the **embedded** backend on a
//! temporary file instead of Cassandra, with the `profile` of every user written as
//! `benches/e2e.rs` writes them and read once before anything is timed (so every read is a
//! cache hit, as in the end-to-end run after each user's first request).
//!
//! Requests are shaped like the end-to-end bench's (`E2E_PAYLOAD_BYTES` = 256: a review text
//! unique to each request, by one of 1,000 users) and decoded by `inferflow::decode`, outside
//! the timed part. Every request is new, so the result cache never answers, as in the
//! end-to-end run.
//!
//! - `realistic/execute_batch/{64,256}`: one batch through the `PipelineExecutor`, the entry
//!   point the Kafka processor calls (throughput in requests).
//!
//! With `--bench`, after criterion's groups it prints, for batches of 64 and 256: the process
//! CPU time per request (user + system, from `/proc/self/stat`), the wall time per request,
//! and the wall time per request of each step (from the step records). Set
//! `REALISTIC_PROFILE_SECS=N` to skip criterion and only run batches of 256 for N seconds
//! (for `perf record`).

// `criterion_group!` generates a public, undocumented function; this is a benchmark binary,
// not API.
#![allow(missing_docs)]

#[path = "support/realistic.rs"]
mod realistic;
#[path = "support/criterion.rs"]
mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group};
use inferflow::config::{Config, FeatureStoreBackend, Sources};
use inferflow::decode::{DecodeRules, Decoded, decode};
use inferflow::executor::{ExecRequest, Executor};
use inferflow::feature_store::FeatureStore;
use inferflow::model::Target;
use inferflow::pipeline::{PipelineExecutor, PipelineManager};
use tokio::runtime::Runtime;

/// Users whose profiles are written (the end-to-end bench's `E2E_ENTITIES`).
const ENTITIES: usize = 1000;
/// Bytes per request (the end-to-end bench's `E2E_PAYLOAD_BYTES`).
const PAYLOAD_BYTES: usize = 256;
/// Batch sizes.
const BATCHES: [usize; 2] = [64, 256];

// ---------------------------------------------------------------------------------------------
// requests, as benches/e2e.rs makes them (benches/support/realistic.rs)

/// Makes batches of requests never seen before (so the result cache never answers).
struct Requests {
    next: AtomicUsize,
    rules: DecodeRules,
}

impl Requests {
    fn new() -> Self {
        Requests {
            next: AtomicUsize::new(0),
            rules: DecodeRules {
                max_request_bytes: 1 << 20,
                reply_to_allowed: HashSet::new(),
            },
        }
    }

    fn batch(&self, n: usize) -> Vec<ExecRequest> {
        let start = self.next.fetch_add(n, Ordering::Relaxed);
        (start..start + n)
            .map(|seq| {
                let body = realistic::request("tp", seq, PAYLOAD_BYTES, ENTITIES);
                match decode(Some(body.as_bytes()), &self.rules, 0) {
                    Decoded::Request { request, .. } => ExecRequest {
                        request_id: request.request_id,
                        data: request.data,
                        parameters: request.parameters,
                        entity: request.entity,
                        tenant: request.tenant,
                    },
                    other => panic!("request {seq} does not decode: {other:?}"),
                }
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// the service, as `inferflow run --config benches/e2e/realistic.toml` builds it

struct Service {
    executor: PipelineExecutor,
    _dir: tempfile::TempDir,
}

fn runtime() -> Runtime {
    // The binary's runtime: Tokio's default multi-thread runtime (one worker per core).
    tokio::runtime::Runtime::new().expect("a Tokio runtime")
}

fn service(runtime: &Runtime) -> Service {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // Relative paths in the file (models/vader, benches/e2e/pipelines) are the repository's.
    std::env::set_current_dir(&root).expect("the repository root");
    let mut config = Config::load(&Sources {
        file: Some(root.join("benches/e2e/realistic.toml")),
        env: false,
    })
    .unwrap_or_else(|e| panic!("benches/e2e/realistic.toml: {e}"));
    let dir = tempfile::tempdir().expect("a temporary directory");
    config.feature_store.backend = FeatureStoreBackend::Embedded;
    config.feature_store.path = dir.path().join("features.redb");
    runtime.block_on(async {
        let models = inferflow::providers::build::build_manager(
            &config.providers,
            &config.models,
            &config.result_cache,
        )
        .await
        .expect("the models of benches/e2e/realistic.toml");
        let store = Arc::new(
            FeatureStore::open(&config.feature_store)
                .await
                .expect("the embedded feature store"),
        );
        seed(&store).await;
        let pipelines = PipelineManager::new(models).with_feature_store(Arc::clone(&store));
        let defs = config.pipelines.load().expect("benches/e2e/pipelines");
        pipelines.replace_all(None, defs).expect("valid pipelines");
        Service {
            executor: PipelineExecutor::new(Arc::new(pipelines)),
            _dir: dir,
        }
    })
}

/// Writes every user's `profile` as benches/e2e.rs does, then reads each once (the cache).
async fn seed(store: &FeatureStore) {
    let updates = realistic::profiles(ENTITIES, 1);
    for outcome in store.set_features(&updates).await {
        outcome.expect("a feature write");
    }
    for user in 0..ENTITIES {
        let (vector, _) = store
            .get_feature_vector_and_source("user", &format!("u-{user}"), &["profile"])
            .await
            .expect("a feature read");
        assert!(vector.missing.is_empty(), "u-{user} has no profile");
    }
}

async fn run(
    service: &Service,
    requests: Vec<ExecRequest>,
) -> Vec<inferflow::executor::ExecResult> {
    let target = Target::Pipeline("realistic".into());
    service.executor.execute(&target, requests).await
}

// ---------------------------------------------------------------------------------------------
// criterion

fn bench_realistic(c: &mut Criterion) {
    let runtime = runtime();
    let service = service(&runtime);
    let requests = Requests::new();
    // The pipeline does what it says before anything is timed.
    let out = runtime.block_on(run(&service, requests.batch(64)));
    for result in &out {
        let output = &result.as_ref().expect("a realistic result").output;
        for field in [
            "label", "compound", "segment", "queue", "decision", "metadata",
        ] {
            assert!(output.get(field).is_some(), "no `{field}` in {output}");
        }
    }
    let mut group = c.benchmark_group("realistic");
    for n in BATCHES {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("execute_batch", n), &n, |b, &n| {
            b.to_async(&runtime).iter_batched(
                || requests.batch(n),
                |batch| async {
                    let out = run(&service, batch).await;
                    assert!(out.iter().all(Result::is_ok));
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// CPU per request and the steps

/// User + system CPU seconds of this process so far.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs batches of `n` for `secs` seconds; prints CPU and wall time per request, and per step.
fn report(runtime: &Runtime, service: &Service, requests: &Requests, n: usize, secs: f64) {
    let mut batches: Vec<Vec<ExecRequest>> = Vec::new();
    let mut steps: BTreeMap<String, u64> = BTreeMap::new();
    let mut done = 0usize;
    let mut wall = Duration::ZERO;
    let mut cpu = 0.0;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < deadline {
        // Requests are made in rounds of 20 batches, outside the measured time.
        batches.extend((0..20).map(|_| requests.batch(n)));
        let cpu0 = cpu_secs();
        let t0 = Instant::now();
        for batch in batches.drain(..) {
            let out = runtime.block_on(run(service, batch));
            done += out.len();
            // Every request of a batch has the same step records (each step's time for the
            // whole batch); count the first's.
            if let Some(Ok(first)) = out.first() {
                for step in &first.steps {
                    *steps.entry(step.name.clone()).or_default() += step.latency_us;
                }
            }
        }
        wall += t0.elapsed();
        cpu += cpu_secs() - cpu0;
    }
    let per = |x: f64| x * 1e6 / done as f64;
    let parts: Vec<String> = steps
        .iter()
        .map(|(name, us)| format!("{name} {:.2}", *us as f64 / done as f64))
        .collect();
    println!(
        "  batches of {n:>3}: {done} requests; CPU {:.2} µs/request, wall {:.2} µs/request; steps (wall µs/request): {}",
        per(cpu),
        per(wall.as_secs_f64()),
        parts.join(", ")
    );
}

criterion_group! {
    name = benches;
    config = support::config(30, 4);
    targets = bench_realistic
}

fn main() {
    // The service's metrics recorder, so labelled counters cost what they cost there.
    let _metrics = inferflow::metrics::install().expect("the Prometheus recorder");
    if let Ok(secs) = std::env::var("REALISTIC_PROFILE_SECS") {
        let secs: f64 = secs.parse().expect("REALISTIC_PROFILE_SECS: seconds");
        let runtime = runtime();
        let service = service(&runtime);
        let requests = Requests::new();
        report(&runtime, &service, &requests, 256, secs);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    if std::env::args().any(|a| a == "--bench") {
        let runtime = runtime();
        let service = service(&runtime);
        let requests = Requests::new();
        println!("\nrealistic pipeline in process (CPU = user + system of the whole process):");
        for n in BATCHES {
            report(&runtime, &service, &requests, n, 5.0);
        }
    }
}
