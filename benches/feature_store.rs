//! Feature store figures against the real database and broker of `scripts/stack`:
//!
//! 1. **Cached vector read**: `get_feature_vector` of 10 features for an entity whose features
//!    are all cached; p50 / p99 / p99.9 over 200,000 reads.
//! 2. **Vector read on a cache miss**: the same call for entities never read before (one CQL
//!    query for the 10 names); p50 / p99 over 5,000 reads.
//! 3. **Ingestion throughput**: 20,000 feature updates produced to a topic, then ingested by
//!    inferflow (consume, decode, write with history, announce invalidations, commit), timed
//!    from the moment the first 1,000 (a warm-up: group join, schema, connections) are
//!    committed until every offset is; **beside** a plain scylla-driver loop writing the same
//!    rows on the same node: per update, the current row and the history row (two prepared
//!    `INSERT … USING TIMESTAMP` into tables shaped like `features` and `feature_history`,
//!    sent together, as inferflow does), 64 updates in flight (the `ingest.write_concurrency`
//!    default). Runs alternate A B A B A B; the medians and their ratio are reported.
//!
//! Run with `scripts/stack up` then `cargo bench --bench feature_store`. Under `cargo test`
//! (no `--bench` argument) it does nothing, so the test suite stays fast.

#![allow(missing_docs, unreachable_pub, dead_code)]

#[path = "../tests/integration/utils.rs"]
mod utils;

#[path = "../tests/integration/harness.rs"]
mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use harness::{FeatureEnv, Instance, committed_total, produce, update};
use inferflow::feature_store::FeatureStore;
use serde_json::json;

const NAMES: [&str; 10] = ["f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9"];
const INGEST_UPDATES: u64 = 20_000;
const REPEATS: usize = 3;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn seed(store: &FeatureStore, entities: std::ops::Range<u64>) {
    let writes = entities.flat_map(|e| {
        NAMES.iter().map(move |name| {
            let values = json!({"score": e, "name": name})
                .as_object()
                .cloned()
                .unwrap_or_default();
            inferflow::feature_store::FeatureUpdate::new("user", format!("e{e}"), *name, values, 1)
        })
    });
    futures::stream::iter(writes)
        .for_each_concurrent(64, |u| async move {
            store.set_feature(&u).await.expect("seed write");
        })
        .await;
}

async fn reads(store: &FeatureStore) {
    // 1. Cached reads: 100 entities, warmed, read round-robin.
    seed(store, 0..100).await;
    for e in 0..100 {
        store
            .get_feature_vector("user", &format!("e{e}"), &NAMES)
            .await
            .expect("warm");
    }
    let ids: Vec<String> = (0..100).map(|e| format!("e{e}")).collect();
    let mut hits = Vec::with_capacity(200_000);
    for i in 0..200_000 {
        let t = Instant::now();
        let v = store
            .get_feature_vector("user", &ids[i % 100], &NAMES)
            .await
            .expect("cached read");
        hits.push(t.elapsed());
        assert_eq!(v.features.len(), NAMES.len());
    }
    hits.sort();
    // 2. Misses: 5,000 entities never read.
    seed(store, 1_000..6_000).await;
    let mut misses = Vec::with_capacity(5_000);
    for e in 1_000..6_000 {
        let id = format!("e{e}");
        let t = Instant::now();
        let v = store
            .get_feature_vector("user", &id, &NAMES)
            .await
            .expect("miss read");
        misses.push(t.elapsed());
        assert_eq!(v.features.len(), NAMES.len());
    }
    misses.sort();
    println!("| feature-vector read (10 features) | p50 | p99 | p99.9 |");
    println!("|---|---|---|---|");
    println!(
        "| cached | {} | {} | {} |",
        us(percentile(&hits, 0.5)),
        us(percentile(&hits, 0.99)),
        us(percentile(&hits, 0.999))
    );
    println!(
        "| cache miss (one CQL query) | {} | {} | {} |",
        us(percentile(&misses, 0.5)),
        us(percentile(&misses, 0.99)),
        us(percentile(&misses, 0.999))
    );
}

/// inferflow ingestion of `INGEST_UPDATES` updates (after a warm-up): updates per second.
async fn ingest_once(run: usize) -> f64 {
    const WARM_UP: u64 = 1_000;
    let env = FeatureEnv::create(&format!("bench_ingest{run}"), 3).await;
    let records: Vec<_> = (0..WARM_UP + INGEST_UPDATES)
        .map(|i| update(&format!("e{i}"), "score", 1 + i % 7, json!(i)))
        .collect();
    produce(&env.features, &records).await;
    let mut config = env.config("");
    config.kafka.commit_interval_ms = std::num::NonZeroU64::new(100).expect("non-zero");
    let instance = Instance::start(&config, true, false).await;
    let committed = || committed_total(&env.group, &env.features, 3);
    while committed() < WARM_UP as i64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let from = committed();
    while committed() < (WARM_UP + INGEST_UPDATES) as i64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = (WARM_UP + INGEST_UPDATES) as f64 - from as f64;
    let rate = rate / started.elapsed().as_secs_f64();
    instance.stop().await;
    env.drop_keyspace().await;
    rate
}

/// The baseline: the same rows through a plain prepared insert, 64 in flight.
async fn plain_inserts_once(run: usize) -> f64 {
    let (session, keyspace) = utils::cql_keyspace(&format!("bench_plain{run}")).await;
    for ddl in [
        "CREATE TABLE {ks}.features (entity_type text, entity_id text, name text, values_json text, version bigint, updated_at bigint, PRIMARY KEY ((entity_type, entity_id), name))",
        "CREATE TABLE {ks}.feature_history (entity_type text, entity_id text, name text, version bigint, values_json text, updated_at bigint, PRIMARY KEY ((entity_type, entity_id, name), version)) WITH CLUSTERING ORDER BY (version DESC)",
    ] {
        session
            .query_unpaged(ddl.replace("{ks}", &keyspace), &[])
            .await
            .expect("create table");
    }
    let insert = session
        .prepare(format!(
            "INSERT INTO {keyspace}.features (entity_type, entity_id, name, values_json, version, updated_at) VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        ))
        .await
        .expect("prepare");
    let history = session
        .prepare(format!(
            "INSERT INTO {keyspace}.feature_history (entity_type, entity_id, name, version, values_json, updated_at) VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        ))
        .await
        .expect("prepare");
    let session = Arc::new(session);
    let started = Instant::now();
    futures::stream::iter(0..INGEST_UPDATES)
        .for_each_concurrent(64, |i| {
            let (session, insert, history) =
                (Arc::clone(&session), insert.clone(), history.clone());
            async move {
                let version = (1 + i % 7) as i64;
                let id = format!("e{i}");
                let values = json!({"v": version, "extra": i}).to_string();
                let current = session.execute_unpaged(
                    &insert,
                    (
                        "user",
                        &id,
                        "score",
                        &values,
                        version,
                        0_i64,
                        version * 1000,
                    ),
                );
                let old = session.execute_unpaged(
                    &history,
                    (
                        "user",
                        &id,
                        "score",
                        version,
                        &values,
                        0_i64,
                        version * 1000,
                    ),
                );
                let (a, b) = futures::join!(current, old);
                a.expect("insert");
                b.expect("insert history");
            }
        })
        .await;
    let rate = INGEST_UPDATES as f64 / started.elapsed().as_secs_f64();
    session
        .query_unpaged(format!("DROP KEYSPACE {keyspace}"), &[])
        .await
        .expect("drop keyspace");
    rate
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "feature_store: run with `cargo bench --bench feature_store` (needs scripts/stack up)"
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        utils::require_kafka().await;
        let env = FeatureEnv::create("bench_reads", 1).await;
        let store = FeatureStore::open(&env.config("").feature_store)
            .await
            .expect("open store");
        reads(&store).await;
        env.drop_keyspace().await;

        let (mut ours, mut plain) = (Vec::new(), Vec::new());
        for run in 0..REPEATS {
            ours.push(ingest_once(run).await);
            plain.push(plain_inserts_once(run).await);
        }
        let (o, p) = (median(ours.clone()), median(plain.clone()));
        println!();
        println!("| ingestion of {INGEST_UPDATES} updates (median of {REPEATS}, interleaved) | updates/s |");
        println!("|---|---|");
        println!("| inferflow ingestion (Kafka → decode → write + history → invalidation → commit) | {o:.0} |");
        println!("| plain scylla-driver loop, same rows (current + history), 64 updates in flight | {p:.0} |");
        println!("| ratio inferflow / plain | {:.2} |", o / p);
        println!("\nall runs: inferflow {ours:.0?}, plain {plain:.0?}");
    });
}
