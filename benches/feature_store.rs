//! Feature store figures, per backend, against the real servers of `scripts/stack` (CQL
//! database, PostgreSQL, MariaDB, Kafka) and the embedded file:
//!
//! 1. **Cached vector read**: `get_feature_vector` of 10 features for an entity whose features
//!    are all cached; p50 / p99 / p99.9 over 200,000 reads.
//! 2. **Vector read on a cache miss**: the same call for entities never read before (one query
//!    for the 10 names); p50 / p99 / p99.9 over 5,000 reads.
//! 3. **Ingestion throughput** (ScyllaDB/Cassandra, PostgreSQL, MySQL): 20,000 feature updates
//!    produced to a topic, then ingested by inferflow (consume, decode, write with history,
//!    announce invalidations, commit), timed from the moment the first 1,000 (a warm-up: group
//!    join, schema, connections) are committed until every offset is; **beside** a plain driver
//!    loop writing the same rows into tables of the same shape: per update, the current row and
//!    the history row (two prepared statements sent together, as inferflow does), 64 updates in
//!    flight (the `ingest.write_concurrency` default) and, on SQL, a pool of the same size as
//!    inferflow's (`max_connections`, 16). The plain loop uses plain `INSERT`s — it knows every
//!    row is new — where inferflow runs its highest-version-wins upserts. Runs alternate
//!    A B A B A B per backend; the medians and their ratio are reported.
//!
//! Run with `scripts/stack up` then `cargo bench --bench feature_store`; `FS_BACKENDS=postgres,mysql`
//! picks backends (default: all). Under `cargo test` (no `--bench` argument) it does nothing,
//! so the test suite stays fast.

#![allow(missing_docs, unreachable_pub, dead_code)]

#[path = "../tests/integration/utils.rs"]
mod utils;

#[path = "../tests/integration/harness.rs"]
mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use harness::{FeatureEnv, Instance, committed_total, produce, update};
use inferflow::config::{Config, FeatureStoreBackend};
use inferflow::feature_store::FeatureStore;
use inferflow::secret::SecretUrl;
use serde_json::json;
use utils::Sql;

const NAMES: [&str; 10] = ["f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9"];
const INGEST_UPDATES: u64 = 20_000;
const REPEATS: usize = 3;
/// Updates in flight in the plain loops: the `ingest.write_concurrency` default.
const IN_FLIGHT: usize = 64;

/// A backend under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Scylla,
    Postgres,
    Mysql,
    Embedded,
}

impl Backend {
    const ALL: [Backend; 4] = [
        Backend::Scylla,
        Backend::Postgres,
        Backend::Mysql,
        Backend::Embedded,
    ];

    fn name(self) -> &'static str {
        match self {
            Backend::Scylla => "scylla",
            Backend::Postgres => "postgres",
            Backend::Mysql => "mysql",
            Backend::Embedded => "embedded",
        }
    }

    fn sql(self) -> Option<Sql> {
        match self {
            Backend::Postgres => Some(Sql::Postgres),
            Backend::Mysql => Some(Sql::Mysql),
            Backend::Scylla | Backend::Embedded => None,
        }
    }

    /// What a cache miss costs in queries.
    fn miss(self) -> &'static str {
        match self {
            Backend::Scylla => "cache miss (one CQL query)",
            Backend::Postgres | Backend::Mysql => "cache miss (one SQL query)",
            Backend::Embedded => "cache miss (one read transaction)",
        }
    }
}

/// Where one measurement's data lives, removed by [`Place::remove`].
enum Place {
    Keyspace(FeatureEnv),
    Database(FeatureEnv, Sql, String),
    File(FeatureEnv, tempfile::TempDir),
}

impl Place {
    /// Topics, a configuration for them and a fresh keyspace, database or file of `backend`.
    async fn create(backend: Backend, prefix: &str, partitions: i32) -> (Place, Config) {
        let env = FeatureEnv::create(prefix, partitions).await;
        let mut config = env.config("");
        let fs = &mut config.feature_store;
        let place = match backend {
            Backend::Scylla => Place::Keyspace(env),
            Backend::Postgres | Backend::Mysql => {
                let sql = backend.sql().expect("a SQL backend");
                // The test login may create databases named inferflow…
                let db = utils::unique_name(&format!("inferflow_{prefix}"));
                sql.admin(&format!("CREATE DATABASE {db}")).await;
                let url = Some(SecretUrl::new(sql.url(&db)));
                if sql == Sql::Postgres {
                    fs.backend = FeatureStoreBackend::Postgres;
                    fs.postgres.url = url;
                } else {
                    fs.backend = FeatureStoreBackend::Mysql;
                    fs.mysql.url = url;
                }
                Place::Database(env, sql, db)
            }
            Backend::Embedded => {
                let dir = tempfile::tempdir().expect("temporary directory");
                fs.backend = FeatureStoreBackend::Embedded;
                fs.path = dir.path().join("features.redb");
                Place::File(env, dir)
            }
        };
        (place, config)
    }

    async fn remove(self) {
        match self {
            Place::Keyspace(env) => env.drop_keyspace().await,
            Place::Database(_, sql, db) => drop_database(sql, &db).await,
            Place::File(_, dir) => dir.close().expect("remove the temporary directory"),
        }
    }

    fn env(&self) -> &FeatureEnv {
        match self {
            Place::Keyspace(env) | Place::Database(env, ..) | Place::File(env, _) => env,
        }
    }
}

async fn drop_database(sql: Sql, db: &str) {
    let statement = match sql {
        Sql::Postgres => format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        Sql::Mysql => format!("DROP DATABASE IF EXISTS {db}"),
    };
    sql.admin(&statement).await;
}

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

fn row(label: &str, sorted: &[Duration]) -> String {
    format!(
        "| {label} | {} | {} | {} |",
        us(percentile(sorted, 0.5)),
        us(percentile(sorted, 0.99)),
        us(percentile(sorted, 0.999))
    )
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
        .for_each_concurrent(IN_FLIGHT, |u| async move {
            store.set_feature(&u).await.expect("seed write");
        })
        .await;
}

/// The cached and the missed vector reads of `backend`: two table rows.
async fn reads(backend: Backend) -> [String; 2] {
    let (place, config) =
        Place::create(backend, &format!("bench_reads_{}", backend.name()), 1).await;
    let store = FeatureStore::open(&config.feature_store)
        .await
        .expect("open store");
    // 1. Cached reads: 100 entities, warmed, read round-robin.
    seed(&store, 0..100).await;
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
    seed(&store, 1_000..6_000).await;
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
    drop(store);
    place.remove().await;
    let name = backend.name();
    [
        row(&format!("{name}: cached"), &hits),
        row(&format!("{name}: {}", backend.miss()), &misses),
    ]
}

/// inferflow ingestion of `INGEST_UPDATES` updates (after a warm-up) into `backend`: updates
/// per second.
async fn ingest_once(backend: Backend, run: usize) -> f64 {
    const WARM_UP: u64 = 1_000;
    let (place, mut config) =
        Place::create(backend, &format!("bench_ingest_{}{run}", backend.name()), 3).await;
    let env = place.env();
    let records: Vec<_> = (0..WARM_UP + INGEST_UPDATES)
        .map(|i| update(&format!("e{i}"), "score", 1 + i % 7, json!(i)))
        .collect();
    produce(&env.features, &records).await;
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
    place.remove().await;
    rate
}

/// The values and version the plain loops write for update `i` (the shape ingestion writes).
fn plain_row(i: u64) -> (String, i64, String) {
    let version = (1 + i % 7) as i64;
    (
        format!("e{i}"),
        version,
        json!({"v": version, "extra": i}).to_string(),
    )
}

/// The CQL baseline: the same rows through two plain prepared inserts per update.
async fn plain_cql_once(run: usize) -> f64 {
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
        .for_each_concurrent(IN_FLIGHT, |i| {
            let (session, insert, history) =
                (Arc::clone(&session), insert.clone(), history.clone());
            async move {
                let (id, version, values) = plain_row(i);
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

/// The SQL baseline: inferflow's own tables (its `schemas/sql/` schema), filled through a
/// plain `sqlx` pool of the same size with two plain prepared `INSERT`s per update.
macro_rules! plain_sql_loop {
    ($pool:ty, $schema:literal, $current:literal, $history:literal, $url:expr) => {{
        // inferflow's pool size (`max_connections` default).
        let pool = <$pool>::new()
            .max_connections(16)
            .connect(&$url)
            .await
            .expect("connect");
        sqlx::raw_sql(include_str!($schema))
            .execute(&pool)
            .await
            .expect("create the tables");
        let started = Instant::now();
        futures::stream::iter(0..INGEST_UPDATES)
            .for_each_concurrent(IN_FLIGHT, |i| {
                let pool = &pool;
                async move {
                    let (id, version, values) = plain_row(i);
                    let key = inferflow::feature_store::key_hash(&["user", &id, "score"]);
                    let bind = |sql: &'static str| {
                        sqlx::query(sql)
                            .bind(key.clone())
                            .bind("user")
                            .bind(id.clone())
                            .bind("score")
                            .bind(values.clone())
                            .bind(version)
                            .bind(0_i64)
                            .bind(None::<i64>)
                    };
                    let (a, b) =
                        futures::join!(bind($current).execute(pool), bind($history).execute(pool));
                    a.expect("insert");
                    b.expect("insert history");
                }
            })
            .await;
        let rate = INGEST_UPDATES as f64 / started.elapsed().as_secs_f64();
        pool.close().await;
        rate
    }};
}

async fn plain_sql_once(sql: Sql, run: usize) -> f64 {
    let db = utils::unique_name(&format!("inferflow_bench_plain{run}"));
    sql.admin(&format!("CREATE DATABASE {db}")).await;
    let url = sql.url(&db);
    let rate = match sql {
        Sql::Postgres => plain_sql_loop!(
            sqlx::postgres::PgPoolOptions,
            "../schemas/sql/postgres/v1.sql",
            "INSERT INTO features (key_hash, entity_type, entity_id, name, values_json, version, updated_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            "INSERT INTO feature_history (key_hash, entity_type, entity_id, name, values_json, version, updated_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            url
        ),
        Sql::Mysql => plain_sql_loop!(
            sqlx::mysql::MySqlPoolOptions,
            "../schemas/sql/mysql/v1.sql",
            "INSERT INTO features (key_hash, entity_type, entity_id, name, values_json, version, updated_at_ms, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            "INSERT INTO feature_history (key_hash, entity_type, entity_id, name, values_json, version, updated_at_ms, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            url
        ),
    };
    drop_database(sql, &db).await;
    rate
}

/// The plain driver loop beside `backend`'s ingestion.
async fn plain_once(backend: Backend, run: usize) -> Option<f64> {
    match backend {
        Backend::Scylla => Some(plain_cql_once(run).await),
        Backend::Postgres | Backend::Mysql => {
            Some(plain_sql_once(backend.sql().expect("SQL"), run).await)
        }
        Backend::Embedded => None,
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "feature_store: run with `cargo bench --bench feature_store` (needs scripts/stack up)"
        );
        return;
    }
    let chosen: Vec<Backend> = match std::env::var("FS_BACKENDS") {
        Ok(list) => list
            .split(',')
            .map(|name| {
                Backend::ALL
                    .into_iter()
                    .find(|b| b.name() == name.trim())
                    .unwrap_or_else(|| panic!("FS_BACKENDS: unknown backend {name:?}"))
            })
            .collect(),
        Err(_) => Backend::ALL.to_vec(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        utils::require_kafka().await;
        println!("| feature-vector read (10 features) | p50 | p99 | p99.9 |");
        println!("|---|---|---|---|");
        for &backend in &chosen {
            for line in reads(backend).await {
                println!("{line}");
            }
        }

        // Ingestion: per run, each backend's inferflow then its plain loop, interleaved.
        let ingesting: Vec<Backend> = chosen
            .iter()
            .copied()
            .filter(|b| *b != Backend::Embedded)
            .collect();
        let mut runs: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); ingesting.len()];
        for run in 0..REPEATS {
            for (backend, (ours, plain)) in ingesting.iter().zip(runs.iter_mut()) {
                ours.push(ingest_once(*backend, run).await);
                plain.extend(plain_once(*backend, run).await);
            }
        }
        println!();
        println!(
            "| ingestion of {INGEST_UPDATES} updates (median of {REPEATS}, interleaved) | inferflow (Kafka → decode → write + history → invalidation → commit), updates/s | plain driver loop, same rows, {IN_FLIGHT} in flight, updates/s | ratio |"
        );
        println!("|---|---|---|---|");
        for (backend, (ours, plain)) in ingesting.iter().zip(&runs) {
            let (o, p) = (median(ours.clone()), median(plain.clone()));
            println!("| {} | {o:.0} | {p:.0} | {:.2} |", backend.name(), o / p);
        }
        println!();
        for (backend, (ours, plain)) in ingesting.iter().zip(&runs) {
            println!("all runs, {}: inferflow {ours:.0?}, plain {plain:.0?}", backend.name());
        }
    });
}
