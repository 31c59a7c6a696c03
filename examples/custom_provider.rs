//! Registers a custom model provider from Rust code and runs requests through it.
//!
//! The `shout` provider upper-cases text (and reports one token per word), so this runs with no
//! network and no Kafka:
//!
//! ```text
//! cargo run --example custom_provider
//! ```
//!
//! It loads two versions of a model backed by it, picks the default version, sends a batch
//! through the [`ModelExecutor`] (the same [`Executor`] the stream processor drives), shows a
//! cache hit and a failed input, and prints the per-model usage statistics.
//!
//! Output: a `model ID:` line per batch with one `ID: OUTPUT (version V, cached BOOL)` or
//! `ID: error KIND: message` line per request, `[shout]` lines for each provider call, and a
//! `usage ID: {JSON}` line per model.

use std::sync::Arc;

use futures::future::BoxFuture;
use inferflow::executor::{ExecRequest, Executor};
use inferflow::model::Target;
use inferflow::providers::cache::{ResultCache, ResultCacheConfig};
use inferflow::providers::manager::{ModelExecutor, ModelManager, ModelSpec};
use inferflow::providers::{Provider, ProviderError, ProviderInput, ProviderOutput, TokenUsage};
use serde_json::{Value, json};

/// Upper-cases string inputs; `remote_model` `shout-twice` repeats them too.
struct Shout;

impl Provider for Shout {
    fn infer_batch(
        &self,
        model: &str,
        inputs: Vec<ProviderInput>,
    ) -> BoxFuture<'_, Vec<Result<ProviderOutput, ProviderError>>> {
        let twice = model == "shout-twice";
        println!(
            "  [shout] one call, {} input(s), model {model}",
            inputs.len()
        );
        let model = model.to_owned();
        Box::pin(async move {
            inputs
                .into_iter()
                .map(|input| {
                    let Some(text) = input.data.as_str() else {
                        return Err(ProviderError::InvalidInput {
                            message: "data must be a string".into(),
                        });
                    };
                    let mut loud = text.to_uppercase();
                    if twice {
                        loud = format!("{loud} {loud}");
                    }
                    let words = text.split_whitespace().count() as u64;
                    Ok(ProviderOutput {
                        output: json!({ "text": loud }),
                        usage: Some(TokenUsage {
                            prompt_tokens: words,
                            completion_tokens: words,
                            total_tokens: 2 * words,
                        }),
                        model: Some(model.clone()),
                    })
                })
                .collect()
        })
    }
}

fn request(id: &str, data: Value) -> ExecRequest {
    ExecRequest {
        request_id: id.into(),
        data,
        parameters: None,
        entity: None,
        tenant: Some("demo".into()),
    }
}

async fn run(executor: &ModelExecutor, model: &str, requests: Vec<ExecRequest>) {
    println!("model {model}:");
    let ids: Vec<String> = requests.iter().map(|r| r.request_id.clone()).collect();
    let outcomes = executor
        .execute(&Target::Model(model.into()), requests)
        .await;
    for (id, outcome) in ids.iter().zip(outcomes) {
        match outcome {
            Ok(out) => println!(
                "  {id}: {} (version {}, cached {})",
                out.output,
                out.model_version.unwrap_or_default(),
                out.cached
            ),
            Err(error) => println!("  {id}: error {error}"),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cache = ResultCache::new(ResultCacheConfig::default())?;
    let manager = Arc::new(ModelManager::with_cache(cache));
    manager.register_provider("shout", Arc::new(Shout));

    // Version 1 is loaded after a warm-up call; version 2 answers twice as loudly and opts out
    // of the cache.
    manager
        .load_model_with_warmup(
            ModelSpec {
                name: "loud".into(),
                version: "1".into(),
                provider: "shout".into(),
                remote_model: "shout".into(),
                cache: true,
                unload_after_idle: None,
            },
            ProviderInput::new(json!("warm up")),
        )
        .await?;
    manager.load_model(ModelSpec {
        name: "loud".into(),
        version: "2".into(),
        provider: "shout".into(),
        remote_model: "shout-twice".into(),
        cache: false,
        unload_after_idle: None,
    })?;
    // Without this, `loud` would mean the highest version, 2.
    manager.set_default_version("loud", "1");

    let executor = ModelExecutor::new(Arc::clone(&manager));
    let batch = || {
        vec![
            request("a", json!("hello kafka")),
            request("b", json!("models on streams")),
            request("c", json!(42)),
        ]
    };
    run(&executor, "loud@2", batch()).await;
    run(&executor, "loud", vec![request("d", json!("hello kafka"))]).await;
    run(&executor, "loud", vec![request("e", json!("hello kafka"))]).await;
    run(&executor, "quiet", vec![request("f", json!("anyone?"))]).await;

    // One JSON line per model; everything but `mean_latency_us` is the same on every run.
    for (id, s) in manager.all_stats() {
        println!(
            "usage {id}: {}",
            json!({
                "requests": s.requests,
                "errors": s.errors,
                "cache_hits": s.cache_hits,
                "provider_calls": s.provider_calls,
                "total_tokens": s.total_tokens,
                "mean_latency_us": s.mean_latency_us(),
            })
        );
    }
    Ok(())
}
