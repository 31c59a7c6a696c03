//! The database stopped for 30 s while 20,000 feature updates are ingested: ingestion pauses,
//! stores no offset past an unwritten update, and once the database is back every update is
//! stored (checked through CQL: counts and values).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::harness::{FeatureEnv, Instance, Raw, committed_total, eventually, produce, update};
use crate::servers::{Outage, Server};
use crate::utils::cql_session;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_for_30_s_during_ingestion_loses_and_skips_nothing() {
    let env = FeatureEnv::create("outage", PARTITIONS).await;
    let config = env.config("");
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

    let outage = tokio::task::spawn_blocking(|| Outage::begin(Server::Cassandra))
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

    // Through CQL: one current row per entity, at version 2 with its values, and both
    // versions in the history.
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
    let mut current: HashMap<String, (i64, Value)> = HashMap::new();
    while let Some(row) = rows.next().await {
        let (id, version, values) = row.expect("row");
        let values: Value = serde_json::from_str(&values).expect("stored JSON");
        current.insert(id, (version, values));
    }
    assert_eq!(current.len() as u64, ENTITIES, "one current row per entity");
    for e in 0..ENTITIES {
        let (version, values) = &current[&format!("e{e}")];
        assert_eq!(*version, 2, "e{e} must hold its highest version");
        assert_eq!(values, &json!({"v": 2, "extra": e}), "e{e}");
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
    assert_eq!(
        history_rows,
        ENTITIES * 2,
        "every version is in the history"
    );
    let _ = Arc::clone(&instance.store);
    instance.stop().await;
    env.drop_keyspace().await;
}
