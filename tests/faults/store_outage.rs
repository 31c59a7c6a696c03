//! The database stopped for 30 s while 20,000 feature updates are ingested: ingestion pauses,
//! stores no offset past an unwritten update, and once the database is back every update is
//! stored (checked in the database behind the store's back: counts and values). Run on the CQL
//! database and on PostgreSQL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use inferflow::config::{Config, FeatureStoreBackend};
use inferflow::secret::SecretUrl;
use sqlx::Connection as _;

use crate::harness::{FeatureEnv, Instance, Raw, committed_total, eventually, produce, update};
use crate::servers::{Outage, Server};
use crate::utils::{Sql, cql_session, unique_name};

const ENTITIES: u64 = 10_000;
const PARTITIONS: i32 = 3;

/// Two versions per entity, the newer first for odd entities (out of order on purpose).
fn updates(range: std::ops::Range<u64>) -> Vec<Raw> {
    let mut out = Vec::new();
    for e in range {
        let versions = if e % 2 == 0 { [1, 2] } else { [2, 1] };
        for v in versions {
            out.push(update(&format!("e{e}"), "score", v, json!(e)));
        }
    }
    out
}

/// The database a run stores features in.
enum Store {
    /// The CQL test database, in the environment's keyspace.
    Cql,
    /// A database of its own on the PostgreSQL test server.
    Postgres { db: String },
}

impl Store {
    /// The store for `server`, with its database created; `config` pointed at it.
    async fn create(server: Server, config: &mut Config) -> Store {
        match server {
            Server::Cassandra => Store::Cql,
            Server::Postgres => {
                let db = unique_name("outage");
                Sql::Postgres.admin(&format!("CREATE DATABASE {db}")).await;
                config.feature_store.backend = FeatureStoreBackend::Postgres;
                config.feature_store.postgres.url = Some(SecretUrl::new(Sql::Postgres.url(&db)));
                Store::Postgres { db }
            }
            Server::Kafka => unreachable!("Kafka stores no features"),
        }
    }

    /// Every current row (entity id to version and values) and the number of history rows,
    /// read from the database directly.
    async fn rows(&self, env: &FeatureEnv) -> (HashMap<String, (i64, Value)>, u64) {
        let parse = |values: &str| -> Value { serde_json::from_str(values).expect("stored JSON") };
        match self {
            Store::Cql => {
                let session = cql_session().await;
                let mut rows = session
                    .query_iter(
                        format!(
                            "SELECT entity_id, version, values_json FROM {}.features",
                            env.keyspace
                        ),
                        (),
                    )
                    .await
                    .expect("scan features")
                    .rows_stream::<(String, i64, String)>()
                    .expect("typed rows");
                let mut current = HashMap::new();
                while let Some(row) = rows.next().await {
                    let (id, version, values) = row.expect("row");
                    current.insert(id, (version, parse(&values)));
                }
                let mut history = session
                    .query_iter(
                        format!("SELECT entity_id FROM {}.feature_history", env.keyspace),
                        (),
                    )
                    .await
                    .expect("scan history")
                    .rows_stream::<(String,)>()
                    .expect("typed rows");
                let mut history_rows = 0u64;
                while let Some(row) = history.next().await {
                    row.expect("row");
                    history_rows += 1;
                }
                (current, history_rows)
            }
            Store::Postgres { db } => {
                let mut conn = sqlx::PgConnection::connect(&Sql::Postgres.url(db))
                    .await
                    .expect("connect to the test database");
                let rows: Vec<(String, i64, String)> =
                    sqlx::query_as("SELECT entity_id, version, values_json FROM features")
                        .fetch_all(&mut conn)
                        .await
                        .expect("scan features");
                let current = rows
                    .into_iter()
                    .map(|(id, version, values)| (id, (version, parse(&values))))
                    .collect();
                let history: i64 = sqlx::query_scalar("SELECT count(*) FROM feature_history")
                    .fetch_one(&mut conn)
                    .await
                    .expect("count history");
                (current, history.unsigned_abs())
            }
        }
    }

    async fn drop(self, env: &FeatureEnv) {
        match self {
            Store::Cql => env.drop_keyspace().await,
            Store::Postgres { db } => {
                Sql::Postgres
                    .admin(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                    .await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_for_30_s_during_ingestion_loses_and_skips_nothing() {
    database_down_during_ingestion(Server::Cassandra).await;
}

/// The same on PostgreSQL (the CQL database stays up; its keyspace is left unused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_30_s_during_ingestion_loses_and_skips_nothing() {
    database_down_during_ingestion(Server::Postgres).await;
}

async fn database_down_during_ingestion(server: Server) {
    let env = FeatureEnv::create("outage", PARTITIONS).await;
    let mut config = env.config("");
    let store = Store::create(server, &mut config).await;
    let instance = Instance::start(&config, true, false).await;
    let total = (ENTITIES * 2) as i64;

    // A quarter of the updates while the database is up.
    produce(&env.features, &updates(0..ENTITIES / 4)).await;
    eventually(
        Duration::from_secs(60),
        "the first updates are written",
        || async { committed_total(&env.group, &env.features, PARTITIONS) > 0 },
    )
    .await;

    let outage = tokio::task::spawn_blocking(move || Outage::begin(server))
        .await
        .expect("stopping the database");
    let down_at = Instant::now();
    // The rest while it is down.
    produce(&env.features, &updates(ENTITIES / 4..ENTITIES)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let committed_early = committed_total(&env.group, &env.features, PARTITIONS);
    let remaining = Duration::from_secs(30).saturating_sub(down_at.elapsed());
    tokio::time::sleep(remaining).await;
    let committed_late = committed_total(&env.group, &env.features, PARTITIONS);
    assert!(
        committed_late < total,
        "every offset was committed while the database was down: updates were skipped"
    );
    assert_eq!(
        committed_early, committed_late,
        "offsets advanced while every write failed"
    );
    eprintln!(
        "database down for {:?}; offsets committed before and during the outage: {committed_late} of {total}",
        down_at.elapsed()
    );

    tokio::task::spawn_blocking(move || outage.end())
        .await
        .expect("starting the database");
    let back_at = Instant::now();
    eventually(
        Duration::from_secs(180),
        "every update committed after the database returned",
        || async { committed_total(&env.group, &env.features, PARTITIONS) == total },
    )
    .await;
    eprintln!(
        "ingestion caught up {:?} after the database was ready again",
        back_at.elapsed()
    );

    // In the database: one current row per entity, at version 2 with its values, and both
    // versions in the history.
    let (current, history_rows) = store.rows(&env).await;
    assert_eq!(current.len() as u64, ENTITIES, "one current row per entity");
    for e in 0..ENTITIES {
        let (version, values) = &current[&format!("e{e}")];
        assert_eq!(*version, 2, "e{e} must hold its highest version");
        assert_eq!(values, &json!({"v": 2, "extra": e}), "e{e}");
    }
    assert_eq!(
        history_rows,
        ENTITIES * 2,
        "every version is in the history"
    );
    let _ = Arc::clone(&instance.store);
    instance.stop().await;
    store.drop(&env).await;
}
