//! Model-provider benchmarks: what the result cache, batching and the local ONNX runtime buy.
//!
//! - `cache/hit`: one request for a cached model whose answer is already in the result cache,
//!   through `ModelExecutor::execute` (resolve, canonical cache key, cache lookup, result).
//! - `http_embeddings_64/*`: 64 texts embedded through the OpenAI-compatible provider against
//!   a local HTTP server started inside the bench (axum on 127.0.0.1), which sleeps a fixed
//!   2 ms per HTTP call before answering, like a model server with a per-call cost.
//!   `batched` sends the 64 texts as **one** `infer_batch` (one HTTP call); `one_by_one` sends
//!   them as 64 `infer_batch` calls of one text, one after another; `one_by_one_concurrent`
//!   sends the 64 single calls at once (the provider's concurrency limit, 16, applies).
//! - `onnx_iris_64/*`: the shipped iris model in the local provider: `batch` is one
//!   `infer_batch` of 64 rows (one tract run on a [64, 4] tensor), `single` is 64
//!   `infer_batch` calls of one row each.
//!
//! Every group reports 64 elements per iteration (1 for the cache hit), so criterion's rates
//! are inputs per second and the ratio of two times in a group is the speed-up.

// `criterion_group!` generates a public, undocumented function; this is a benchmark binary,
// not API.
#![allow(missing_docs)]

#[path = "support/criterion.rs"]
mod support;

use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::{BoxFuture, join_all};
use inferflow::executor::{ExecRequest, Executor};
use inferflow::model::Target;
use inferflow::providers::cache::{ResultCache, ResultCacheConfig};
use inferflow::providers::manager::{ModelExecutor, ModelManager, ModelSpec};
use inferflow::providers::{
    LocalConfig, LocalModelConfig, LocalModelKind, LocalProvider, OpenAiConfig, OpenAiModelConfig,
    OpenAiProvider, Provider, ProviderError, ProviderInput, ProviderOutput,
};
use serde_json::{Value, json};

/// Inputs per batch.
const N: usize = 64;
/// The fake model server's cost per HTTP call.
const CALL_COST: Duration = Duration::from_millis(2);

/// Answers at once with a small document, for the cache bench.
struct Instant;

impl Provider for Instant {
    fn infer_batch(
        &self,
        _model: &str,
        inputs: Vec<ProviderInput>,
    ) -> BoxFuture<'_, Vec<Result<ProviderOutput, ProviderError>>> {
        Box::pin(async move {
            inputs
                .into_iter()
                .map(|i| {
                    Ok(ProviderOutput::new(
                        json!({"label": "positive", "echo": i.data}),
                    ))
                })
                .collect()
        })
    }
}

fn request(data: Value) -> ExecRequest {
    ExecRequest {
        request_id: "bench".into(),
        data,
        parameters: None,
        entity: None,
        tenant: Some("acme".into()),
    }
}

/// The embeddings endpoint: 2 ms per call, then a 4-dimensional vector per input.
async fn embeddings(Json(body): Json<Value>) -> Json<Value> {
    tokio::time::sleep(CALL_COST).await;
    let inputs = body["input"].as_array().cloned().unwrap_or_default();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let len = text.as_str().map_or(0, str::len) as f64;
            json!({"object": "embedding", "index": i, "embedding": [i as f64, len, 0.5, -0.5]})
        })
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": inputs.len() * 8, "total_tokens": inputs.len() * 8}
    }))
}

fn bench_providers(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");

    // --- Result cache hit ---
    let manager = Arc::new(ModelManager::with_cache(
        ResultCache::new(ResultCacheConfig::default()).expect("a cache"),
    ));
    manager.register_provider("instant", Arc::new(Instant));
    manager
        .load_model(ModelSpec::new("sentiment", "1", "instant", "s"))
        .expect("loaded");
    let executor = ModelExecutor::new(Arc::clone(&manager));
    let target = Target::Model("sentiment".into());
    let data = json!({"text": "The delivery was late but the support was great.", "lang": "en"});
    let first = runtime.block_on(executor.execute(&target, vec![request(data.clone())]));
    assert!(!first[0].as_ref().expect("ok").cached);
    let again = runtime.block_on(executor.execute(&target, vec![request(data.clone())]));
    assert!(again[0].as_ref().expect("ok").cached, "the second is a hit");
    let mut group = c.benchmark_group("cache");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hit", |b| {
        b.to_async(&runtime)
            .iter(|| executor.execute(&target, vec![request(data.clone())]));
    });
    group.finish();

    // --- HTTP embeddings: batched vs one by one ---
    let addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let addr = listener.local_addr().expect("an address");
        let app = Router::new().route("/v1/embeddings", post(embeddings));
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serving") });
        addr
    });
    let mut config = OpenAiConfig {
        base_url: format!("http://{addr}/v1"),
        timeout_ms: NonZeroU64::new(10_000).expect("non-zero"),
        max_concurrency: NonZeroUsize::new(16).expect("non-zero"),
        ..OpenAiConfig::default()
    };
    config
        .models
        .insert("embed".into(), OpenAiModelConfig::embeddings());
    let http = Arc::new(OpenAiProvider::with_api_key(config, None).expect("a provider"));
    let texts: Vec<ProviderInput> = (0..N)
        .map(|i| ProviderInput::new(json!(format!("order {i} arrived late, refund please"))))
        .collect();
    let out = runtime.block_on(http.infer_batch("embed", texts.clone()));
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    let mut group = c.benchmark_group("http_embeddings_64");
    group.throughput(Throughput::Elements(N as u64));
    group.sample_size(20);
    group.bench_function("batched", |b| {
        b.to_async(&runtime).iter(|| async {
            let out = http.infer_batch("embed", texts.clone()).await;
            assert_eq!(out.len(), N);
        });
    });
    group.bench_function("one_by_one", |b| {
        b.to_async(&runtime).iter(|| async {
            for text in &texts {
                let out = http.infer_batch("embed", vec![text.clone()]).await;
                assert!(out[0].is_ok());
            }
        });
    });
    group.bench_function("one_by_one_concurrent", |b| {
        b.to_async(&runtime).iter(|| async {
            let calls = texts
                .iter()
                .map(|text| http.infer_batch("embed", vec![text.clone()]));
            let out = join_all(calls).await;
            assert_eq!(out.len(), N);
        });
    });
    group.finish();

    // --- Local ONNX: one run of 64 rows vs 64 runs of one ---
    let mut local = LocalConfig::default();
    local.models.insert(
        "iris".into(),
        LocalModelConfig {
            kind: LocalModelKind::Onnx,
            path: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/iris"),
        },
    );
    let local = Arc::new(LocalProvider::new(local).expect("a local provider"));
    runtime
        .block_on(local.load_model("iris"))
        .expect("iris loads");
    let rows: Vec<ProviderInput> = (0..N)
        .map(|i| {
            let x = i as f64 / N as f64;
            ProviderInput::new(
                json!({"features": [4.5 + 3.0 * x, 2.5 + x, 1.0 + 5.0 * x, 0.1 + 2.0 * x]}),
            )
        })
        .collect();
    let out = runtime.block_on(local.infer_batch("iris", rows.clone()));
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    let mut group = c.benchmark_group("onnx_iris_64");
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("batch", |b| {
        b.to_async(&runtime).iter(|| async {
            let out = local.infer_batch("iris", rows.clone()).await;
            assert_eq!(out.len(), N);
        });
    });
    group.bench_function("single", |b| {
        b.to_async(&runtime).iter(|| async {
            for row in &rows {
                let out = local.infer_batch("iris", vec![row.clone()]).await;
                assert!(out[0].is_ok());
            }
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = support::config(30, 3);
    targets = bench_providers
}
criterion_main!(benches);
