//! The inference result cache and its statistics: the same texts scored twice by the local
//! VADER model (`sentiment@1`), the second time from the cache.
//!
//! ```text
//! cargo run --example cache_stats
//! ```
//!
//! A [`ModelManager`] built with a [`ResultCache`] (bounded, 10-minute TTL) serves models whose
//! spec has `cache` on through it. The key is the tenant, the model id, the input and the
//! parameters, so:
//!
//! 1. round 1 computes three answers (three misses, sent to the provider in one batched call);
//! 2. round 2 asks again and gets all three from the cache (`cached=true`, three hits, no
//!    provider call);
//! 3. round 3 asks the first text again for another tenant: tenants never share answers, so
//!    it is computed again;
//! 4. `sentiment_fresh@1`, the same VADER model with `cache` off, never touches the cache.
//!
//! Output: one `round N: text -> label cached=BOOL` line per answer, then `cache: {JSON}`
//! (from [`ResultCache::stats`]) and `model ID: {JSON}` (from [`ModelManager::stats`]). All
//! of it is deterministic.

use std::sync::Arc;

use inferflow::executor::ExecRequest;
use inferflow::providers::cache::{ResultCache, ResultCacheConfig};
use inferflow::providers::manager::{ModelManager, ModelSpec};
use inferflow::providers::{
    LocalConfig, LocalModelConfig, LocalModelKind, LocalProvider, ProviderInput,
};
use serde_json::json;

const TEXTS: [&str; 3] = [
    "I love this product!",
    "The manual is confusing.",
    "Shipping took four days.",
];

async fn round(manager: &ModelManager, n: u32, model: &str, tenant: &str, texts: &[&str]) {
    let requests = texts
        .iter()
        .enumerate()
        .map(|(i, t)| ExecRequest {
            request_id: format!("{n}-{i}"),
            data: json!(t),
            parameters: None,
            entity: None,
            tenant: Some(tenant.into()),
        })
        .collect();
    for (text, outcome) in texts.iter().zip(manager.infer(model, requests).await) {
        match outcome {
            Ok(out) => println!(
                "round {n}: {model} tenant={tenant} {text:?} -> {} cached={}",
                out.output["label"].as_str().unwrap_or("?"),
                out.cached
            ),
            Err(error) => println!("round {n}: {model} {text:?} -> error {error}"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = LocalConfig::default();
    config.models.insert(
        "vader".into(),
        LocalModelConfig {
            kind: LocalModelKind::Vader,
            path: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/vader"),
        },
    );
    let cache = ResultCache::new(ResultCacheConfig::default())?;
    let manager = ModelManager::with_cache(cache);
    manager.register_provider("local", Arc::new(LocalProvider::new(config)?));
    // The warm-up call goes straight to the provider: not cached, not counted.
    manager
        .load_model_with_warmup(
            ModelSpec::new("sentiment", "1", "local", "vader"),
            ProviderInput::new(json!("warm up")),
        )
        .await?;
    let mut fresh = ModelSpec::new("sentiment_fresh", "1", "local", "vader");
    fresh.cache = false;
    manager.load_model(fresh)?;

    round(&manager, 1, "sentiment@1", "shop", &TEXTS).await;
    round(&manager, 2, "sentiment@1", "shop", &TEXTS).await;
    round(&manager, 3, "sentiment@1", "blog", &TEXTS[..1]).await;
    round(&manager, 4, "sentiment_fresh@1", "shop", &TEXTS[..1]).await;
    round(&manager, 5, "sentiment_fresh@1", "shop", &TEXTS[..1]).await;

    let cache = manager.cache().expect("built with a cache");
    // Drops entries whose time to live has passed (none here), as a lookup would.
    cache.run_pending_tasks().await;
    let s = cache.stats();
    let lookups = s.hits + s.misses + s.coalesced;
    println!(
        "cache: {}",
        json!({
            "hits": s.hits,
            "misses": s.misses,
            "coalesced": s.coalesced,
            "entries": s.entries,
            "hit_ratio": if lookups == 0 { 0.0 } else { s.hits as f64 / lookups as f64 },
        })
    );
    for (id, m) in manager.all_stats() {
        println!(
            "model {id}: {}",
            json!({
                "requests": m.requests,
                "cache_hits": m.cache_hits,
                "provider_calls": m.provider_calls,
                "errors": m.errors,
            })
        );
    }
    Ok(())
}
