//! Pipeline engine overhead: what a step costs when the step itself does nothing.
//!
//! - `pipeline_steps/execute/N`: one request through a pipeline of N no-op steps
//!   (`preprocess` steps with an empty transform list: the engine's own work per step, i.e.
//!   bookkeeping, outcome collection, the step record and its latency histogram), through
//!   `PipelineManager::execute`.
//! - `pipeline_steps/execute_batch_64/N`: the same pipelines over a batch of 64 requests
//!   through `PipelineManager::execute_batch` (throughput in requests).
//! - `pipeline_set_steps/execute/N`: N steps that each `set` a constant field: the no-op plus
//!   the cheapest real transform.
//! - `pipeline_realistic/*`: clean → the built-in `echo` model → extract, single and batch 64.
//!
//! The input is a ~200-byte JSON object, like a small request's `data`. After criterion's
//! groups, the bench fits a least-squares line through the mean time per run against the
//! number of steps (1, 5, 10, 20) and prints its slope: the overhead per step, per request.
//! Under `cargo test` (no `--bench` argument) each bench runs once and the fit is skipped.

// `criterion_group!` generates a public, undocumented function; this is a benchmark binary,
// not API.
#![allow(missing_docs)]

#[path = "support/criterion.rs"]
mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use inferflow::executor::ExecRequest;
use inferflow::pipeline::{PipelineDef, PipelineManager};
use inferflow::providers::manager::ModelManager;
use serde_json::{Value, json};
use tokio::runtime::Runtime;

/// Requests per batch in the batch benches.
const BATCH: usize = 64;
/// Pipeline lengths.
const STEPS: [usize; 4] = [1, 5, 10, 20];

fn input() -> Value {
    json!({
        "text": "  What a GREAT day it has been, thank you all!  ",
        "user_id": "u-1001",
        "lang": "en",
        "tags": ["greeting", "feedback"],
        "score": 0.25,
    })
}

fn requests() -> Vec<ExecRequest> {
    (0..BATCH)
        .map(|i| ExecRequest {
            request_id: format!("r{i}"),
            data: input(),
            parameters: None,
            entity: None,
            tenant: None,
        })
        .collect()
}

/// Pipeline `noop-N` (N empty steps), `set-N` (N steps setting a constant) and `realistic`.
fn manager() -> PipelineManager {
    let m = PipelineManager::new(Arc::new(ModelManager::new()));
    for n in STEPS {
        let noop = format!(
            "id = \"noop-{n}\"\n{}",
            "[[steps]]\ntype = \"preprocess\"\ntransforms = []\n".repeat(n)
        );
        let set = format!(
            "id = \"set-{n}\"\n{}",
            "[[steps]]\ntype = \"preprocess\"\ntransforms = [{ op = \"set\", field = \"seen\", value = true }]\n"
                .repeat(n)
        );
        for text in [noop, set] {
            let def: PipelineDef = toml::from_str(&text).expect("a pipeline definition");
            m.create_pipeline(def).expect("a valid pipeline");
        }
    }
    let realistic: PipelineDef = toml::from_str(
        r#"
id = "realistic"
[[steps]]
type = "preprocess"
name = "clean"
transforms = [{ op = "clean", field = "text", max_chars = 5000 }]
[[steps]]
type = "model"
model = "echo"
[[steps]]
type = "postprocess"
name = "extract"
transforms = [{ op = "extract", path = "text" }]
"#,
    )
    .expect("a pipeline definition");
    m.create_pipeline(realistic).expect("a valid pipeline");
    m
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime")
}

fn bench_pipeline(c: &mut Criterion) {
    let runtime = runtime();
    let m = manager();
    // The pipelines do what they say before anything is timed.
    let out = runtime
        .block_on(m.execute("noop-20", input()))
        .expect("noop runs");
    assert_eq!(out.output, input());
    assert_eq!(out.steps.len(), 20);
    let out = runtime
        .block_on(m.execute("realistic", input()))
        .expect("realistic runs");
    assert_eq!(
        out.output,
        json!("What a GREAT day it has been, thank you all!")
    );
    let batch = runtime.block_on(m.execute_batch("set-5", requests()));
    assert!(
        batch
            .iter()
            .all(|r| r.as_ref().is_ok_and(|o| o.output["seen"] == true))
    );

    for (group_name, prefix) in [("pipeline_steps", "noop"), ("pipeline_set_steps", "set")] {
        let mut group = c.benchmark_group(group_name);
        for n in STEPS {
            let id = format!("{prefix}-{n}");
            group.throughput(Throughput::Elements(1));
            group.bench_with_input(BenchmarkId::new("execute", n), &id, |b, id| {
                b.to_async(&runtime).iter(|| async {
                    let out = m.execute(id, input()).await;
                    assert!(out.is_ok());
                });
            });
            group.throughput(Throughput::Elements(BATCH as u64));
            group.bench_with_input(BenchmarkId::new("execute_batch_64", n), &id, |b, id| {
                b.to_async(&runtime).iter(|| async {
                    let out = m.execute_batch(id, requests()).await;
                    assert_eq!(out.len(), BATCH);
                });
            });
        }
        group.finish();
    }

    let mut group = c.benchmark_group("pipeline_realistic");
    group.throughput(Throughput::Elements(1));
    group.bench_function("execute", |b| {
        b.to_async(&runtime).iter(|| async {
            assert!(m.execute("realistic", input()).await.is_ok());
        });
    });
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("execute_batch_64", |b| {
        b.to_async(&runtime).iter(|| async {
            let out = m.execute_batch("realistic", requests()).await;
            assert_eq!(out.len(), BATCH);
        });
    });
    group.finish();
}

/// Mean seconds per call of `f`, as the median of 7 rounds of `iters` calls.
fn mean_secs<F, Fut>(runtime: &Runtime, iters: u32, f: F) -> f64
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut rounds: Vec<f64> = (0..7)
        .map(|_| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    f().await;
                }
                started.elapsed().as_secs_f64() / f64::from(iters)
            })
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}

/// Least-squares slope of `ys` against `xs`.
fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let cov: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    cov / var
}

/// Prints the per-step overhead: the slope of time per request against the number of steps.
fn report_slopes() {
    let runtime = runtime();
    let m = manager();
    let xs: Vec<f64> = STEPS.iter().map(|&n| n as f64).collect();
    println!("\nper-step overhead (least-squares slope over {STEPS:?} steps, per request):");
    for prefix in ["noop", "set"] {
        let single: Vec<f64> = STEPS
            .iter()
            .map(|n| {
                let id = format!("{prefix}-{n}");
                mean_secs(&runtime, 2000, || async {
                    let _ = m.execute(&id, input()).await;
                })
            })
            .collect();
        let batched: Vec<f64> = STEPS
            .iter()
            .map(|n| {
                let id = format!("{prefix}-{n}");
                mean_secs(&runtime, 100, || async {
                    let _ = m.execute_batch(&id, requests()).await;
                }) / BATCH as f64
            })
            .collect();
        let us = |s: f64| s * 1e6;
        println!(
            "  {prefix:>4} steps: execute {:.2} µs/step (1 step {:.1} µs, 20 steps {:.1} µs); \
             execute_batch_64 {:.2} µs/step/request (1 step {:.1} µs, 20 steps {:.1} µs per request)",
            us(slope(&xs, &single)),
            us(single[0]),
            us(single[3]),
            us(slope(&xs, &batched)),
            us(batched[0]),
            us(batched[3]),
        );
    }
}

criterion_group! {
    name = benches;
    config = support::config(30, 3);
    targets = bench_pipeline
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    if std::env::args().any(|a| a == "--bench") {
        report_slopes();
    }
}
