//! Feature vector from the cache, without a network: the part of a feature lookup that runs on
//! every request once the features are cached.
//!
//! The store is inferflow's `FeatureStore` (the TTL cache in front of a backend) over the
//! embedded backend on a file in a temporary directory, so no database is needed. Ten
//! features of one entity are written (which fills the cache), then:
//!
//! - `vector_10_cached`: `get_feature_vector` of the ten names, all served from the cache
//!   (key checks, ten cache lookups, the vector with its values).
//! - `single_cached`: `get_feature` of one cached name.
//!
//! The first reports 10 elements per iteration, so criterion's rate is features per second.
//! Against the real CQL database, with cache misses and ingestion, see
//! `benches/feature_store.rs` (needs `scripts/stack up`).

// `criterion_group!` generates a public, undocumented function; this is a benchmark binary,
// not API.
#![allow(missing_docs)]

#[path = "support/criterion.rs"]
mod support;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use inferflow::feature_store::{EmbeddedBackend, FeatureStore, FeatureUpdate};
use serde_json::json;

const NAMES: [&str; 10] = ["f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9"];

fn bench_feature_cache(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = runtime.block_on(async {
        let backend = EmbeddedBackend::open_path(dir.path(), 0)
            .await
            .expect("the embedded backend opens");
        let store = FeatureStore::new(
            Arc::new(backend),
            Duration::from_secs(3600),
            NonZeroUsize::new(100_000).expect("non-zero"),
        );
        for (i, name) in NAMES.iter().enumerate() {
            let values = json!({"value": i as f64 * 0.5, "window": "1h"})
                .as_object()
                .cloned()
                .expect("an object");
            store
                .set_feature(&FeatureUpdate::new("user", "u-88213", *name, values, 1))
                .await
                .expect("the write succeeds");
        }
        store
    });
    // Every name must come back, from the cache, or the numbers mean nothing.
    let vector = runtime
        .block_on(store.get_feature_vector("user", "u-88213", &NAMES))
        .expect("the read succeeds");
    assert_eq!(vector.features.len(), NAMES.len(), "{vector:?}");
    assert!(vector.missing.is_empty());
    assert_eq!(store.cache_stats().entries, NAMES.len());

    let mut group = c.benchmark_group("feature_cache");
    group.throughput(Throughput::Elements(NAMES.len() as u64));
    group.bench_function("vector_10_cached", |b| {
        b.to_async(&runtime)
            .iter(|| store.get_feature_vector("user", "u-88213", &NAMES));
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("single_cached", |b| {
        b.to_async(&runtime)
            .iter(|| store.get_feature("user", "u-88213", "f3"));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = support::config(50, 3);
    targets = bench_feature_cache
}
criterion_main!(benches);
