//! The feature store against the real CQL database: highest-version-wins writes, history,
//! TTLs, vectors, groups, schema creation, and the cache in front of it. Each test works in a
//! keyspace of its own, created by the store itself (`create_schema`), and drops it at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use inferflow::config::{Config, FeatureStoreConfig};
use inferflow::feature_store::{
    Feature, FeatureBackend, FeatureGroup, FeatureStore, FeatureStoreError, FeatureUpdate,
    ScyllaBackend,
};
use scylla::client::session::Session;
use serde_json::{Map, Value, json};

use crate::utils::{self, cql_contact, cql_session, unique_name};

/// The feature store section for a fresh keyspace on the test database.
fn config(keyspace: &str, extra: &str) -> FeatureStoreConfig {
    Config::from_toml_str(&format!(
        "[feature_store]\ncontact_points = [\"{}\"]\nkeyspace = \"{keyspace}\"\nhistory_retention_secs = 3600\n{extra}",
        cql_contact()
    ))
    .expect("test config")
    .feature_store
}

/// A backend on a new keyspace, the session for checks behind its back, and the keyspace.
async fn backend(prefix: &str) -> (Arc<ScyllaBackend>, Session, FeatureStoreConfig) {
    utils::init_tracing();
    // Fails with the command that starts the database if it is not running.
    let session = cql_session().await;
    let cfg = config(&unique_name(prefix), "");
    let backend = ScyllaBackend::connect(&cfg)
        .await
        .unwrap_or_else(|e| panic!("opening the feature store: {e}"));
    (Arc::new(backend), session, cfg)
}

async fn drop_keyspace(session: &Session, cfg: &FeatureStoreConfig) {
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", cfg.keyspace), &[])
        .await
        .expect("drop keyspace");
}

fn values(v: Value) -> Map<String, Value> {
    v.as_object().expect("a JSON object").clone()
}

fn update(entity_id: &str, name: &str, version: u64) -> FeatureUpdate {
    FeatureUpdate::new(
        "user",
        entity_id,
        name,
        values(json!({ "score": version, "tag": format!("v{version}") })),
        version,
    )
}

async fn current(backend: &ScyllaBackend, entity_id: &str, name: &str) -> Option<Feature> {
    backend
        .get_feature("user", entity_id, name)
        .await
        .expect("read feature")
}

#[tokio::test]
async fn out_of_order_and_replayed_writes_converge_to_the_highest_version() {
    let (backend, session, cfg) = backend("fs_order").await;

    // After every write, the highest version written so far is the one stored.
    for version in [3, 1, 2, 3, 1] {
        backend
            .put_feature(&update("u1", "activity", version))
            .await
            .expect("write");
        let feature = current(&backend, "u1", "activity").await.expect("stored");
        assert_eq!(
            (feature.version, &feature.values["tag"]),
            (3, &json!("v3")),
            "after writing v{version}"
        );
        assert_eq!(feature.ttl_secs, None);
    }

    // The write timestamp is the version times 1000.
    let rows = session
        .query_unpaged(
            format!(
                "SELECT WRITETIME(values_json) FROM {}.features WHERE entity_type = 'user' AND entity_id = 'u1' AND name = 'activity'",
                cfg.keyspace
            ),
            &[],
        )
        .await
        .expect("select writetime")
        .into_rows_result()
        .expect("rows");
    let (writetime,): (i64,) = rows.single_row().expect("one row");
    assert_eq!(writetime, 3000);

    // Many versions written at once, in a shuffled order: the highest one is kept.
    let mut versions: Vec<u64> = (1..=60).collect();
    versions.sort_by_key(|v| (v * 7919) % 61);
    let writes = versions.iter().map(|&v| {
        let backend = backend.clone();
        async move { backend.put_feature(&update("u2", "activity", v)).await }
    });
    futures::future::try_join_all(writes)
        .await
        .expect("concurrent writes");
    let feature = current(&backend, "u2", "activity").await.expect("stored");
    assert_eq!(
        (feature.version, &feature.values["score"]),
        (60, &json!(60))
    );

    drop_keyspace(&session, &cfg).await;
}

#[tokio::test]
async fn older_versions_are_read_back_from_history() {
    let (backend, session, cfg) = backend("fs_history").await;

    for version in [1, 2, 3] {
        backend
            .put_feature(&update("u1", "activity", version))
            .await
            .expect("write");
    }
    for version in [1, 2, 3] {
        let old = backend
            .get_feature_at_version("user", "u1", "activity", version)
            .await
            .expect("history read")
            .unwrap_or_else(|| panic!("version {version} is in the history"));
        assert_eq!(old.version, version);
        assert_eq!(old.values["tag"], format!("v{version}"));
    }
    let never = backend
        .get_feature_at_version("user", "u1", "activity", 4)
        .await
        .expect("history read");
    assert_eq!(never, None);

    // History rows carry the retention as TTL, or the feature's own TTL when it is shorter.
    backend
        .put_feature(&update("u1", "short", 1).with_ttl_secs(600))
        .await
        .expect("write");
    let history_ttl = |name: &'static str, version: i64| {
        let session = &session;
        let ks = cfg.keyspace.clone();
        async move {
            let rows = session
                .query_unpaged(
                    format!("SELECT TTL(values_json) FROM {ks}.feature_history WHERE entity_type = 'user' AND entity_id = 'u1' AND name = ? AND version = ?"),
                    (name, version),
                )
                .await
                .expect("select ttl")
                .into_rows_result()
                .expect("rows");
            let (ttl,): (Option<i32>,) = rows.single_row().expect("one history row");
            ttl.expect("history rows expire")
        }
    };
    let retained = history_ttl("activity", 1).await;
    assert!((3000..=3600).contains(&retained), "TTL {retained}");
    let short = history_ttl("short", 1).await;
    assert!((1..=600).contains(&short), "TTL {short}");

    drop_keyspace(&session, &cfg).await;
}

#[tokio::test]
async fn a_feature_with_a_ttl_expires_in_the_store_and_in_the_cache() {
    let (backend, session, cfg) = backend("fs_ttl").await;
    let store = FeatureStore::with_config(backend.clone(), &cfg);

    store
        .set_feature(&update("u1", "session", 7).with_ttl_secs(2))
        .await
        .expect("write");
    let fresh = store
        .get_feature("user", "u1", "session")
        .await
        .expect("read")
        .expect("present before the TTL ends");
    assert_eq!(fresh.version, 7);
    assert!(
        fresh.ttl_secs.is_some_and(|t| (1..=2).contains(&t)),
        "{:?}",
        fresh.ttl_secs
    );

    let start = Instant::now();
    loop {
        let in_store = current(&backend, "u1", "session").await;
        let through_cache = store
            .get_feature("user", "u1", "session")
            .await
            .expect("read");
        if in_store.is_none() && through_cache.is_none() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "still present after 15 s: store {in_store:?}, cache {through_cache:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(500),
        "gone after {elapsed:?}, too soon for a 2 s TTL"
    );

    drop_keyspace(&session, &cfg).await;
}

#[tokio::test]
async fn get_features_reports_missing_names_as_missing() {
    let (backend, session, cfg) = backend("fs_vector").await;
    let store = FeatureStore::with_config(backend.clone(), &cfg);

    store
        .set_feature(&update("u1", "a", 1))
        .await
        .expect("write");
    store
        .set_feature(&update("u1", "b", 2))
        .await
        .expect("write");
    store
        .set_feature(&update("u2", "c", 3))
        .await
        .expect("write");

    let names = ["a", "b", "c"];
    let read = backend
        .get_features("user", "u1", &names)
        .await
        .expect("read");
    let versions: Vec<Option<u64>> = read.iter().map(|f| f.as_ref().map(|f| f.version)).collect();
    assert_eq!(versions, [Some(1), Some(2), None], "c belongs to u2 only");

    let vector = store
        .get_feature_vector("user", "u1", &names)
        .await
        .expect("vector");
    assert_eq!(vector.features.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(vector.features["b"].values["tag"], "v2");
    assert!(vector.features["a"].age_ms < 60_000);
    assert_eq!(vector.missing, ["c"]);

    // More names than one IN query takes: split, and still every name answered in order.
    let many: Vec<String> = (0..250).map(|i| format!("f{i:03}")).collect();
    for name in many.iter().step_by(2) {
        backend
            .put_feature(&update("u3", name, 1))
            .await
            .expect("write");
    }
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let read = backend
        .get_features("user", "u3", &refs)
        .await
        .expect("read");
    assert_eq!(read.len(), 250);
    for (i, feature) in read.iter().enumerate() {
        assert_eq!(feature.is_some(), i % 2 == 0, "f{i:03}");
        if let Some(feature) = feature {
            assert_eq!(feature.name, many[i]);
        }
    }

    drop_keyspace(&session, &cfg).await;
}

#[tokio::test]
async fn groups_are_versioned_and_latest_is_the_default() {
    let (backend, session, cfg) = backend("fs_groups").await;
    let store = FeatureStore::with_config(backend.clone(), &cfg);

    let v1 = FeatureGroup {
        name: "fraud".into(),
        version: 1,
        entity_type: "user".into(),
        features: vec!["a".into(), "b".into()],
        description: "first cut".into(),
    };
    let v2 = FeatureGroup {
        version: 2,
        features: vec!["a".into(), "b".into(), "c".into()],
        description: "adds c".into(),
        ..v1.clone()
    };
    store.create_feature_group(&v1).await.expect("create v1");
    store.create_feature_group(&v2).await.expect("create v2");

    let latest = store.get_feature_group("fraud", None).await.expect("read");
    assert_eq!(latest.as_ref(), Some(&v2));
    let first = store
        .get_feature_group("fraud", Some(1))
        .await
        .expect("read");
    assert_eq!(first.as_ref(), Some(&v1));
    assert_eq!(
        store
            .get_feature_group("fraud", Some(3))
            .await
            .expect("read"),
        None
    );
    assert_eq!(
        store.get_feature_group("nope", None).await.expect("read"),
        None
    );

    // Creating the same version again is a no-op; a different definition is refused.
    store
        .create_feature_group(&v1)
        .await
        .expect("identical repeat");
    let changed = FeatureGroup {
        features: vec!["z".into()],
        ..v1.clone()
    };
    let err = store.create_feature_group(&changed).await.unwrap_err();
    assert!(
        matches!(err, FeatureStoreError::GroupConflict { version: 1, .. }),
        "{err}"
    );
    assert_eq!(
        store
            .get_feature_group("fraud", Some(1))
            .await
            .expect("read"),
        Some(v1)
    );

    // A group's vector reads the group's features for one entity.
    store
        .set_feature(&update("u1", "a", 1))
        .await
        .expect("write");
    let vector = store
        .get_feature_group_vector(&v2, "u1")
        .await
        .expect("vector");
    assert_eq!(vector.features.keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(vector.missing, ["b", "c"]);

    drop_keyspace(&session, &cfg).await;
}

/// A backend that counts the reads reaching the database.
struct Counting {
    inner: Arc<ScyllaBackend>,
    reads: AtomicUsize,
}

impl FeatureBackend for Counting {
    fn put_feature<'a>(
        &'a self,
        update: &'a FeatureUpdate,
    ) -> BoxFuture<'a, Result<(), FeatureStoreError>> {
        self.inner.put_feature(update)
    }

    fn get_feature<'a>(
        &'a self,
        entity_type: &'a str,
        entity_id: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Feature>, FeatureStoreError>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get_feature(entity_type, entity_id, name)
    }

    fn get_feature_at_version<'a>(
        &'a self,
        entity_type: &'a str,
        entity_id: &'a str,
        name: &'a str,
        version: u64,
    ) -> BoxFuture<'a, Result<Option<Feature>, FeatureStoreError>> {
        self.inner
            .get_feature_at_version(entity_type, entity_id, name, version)
    }

    fn get_features<'a>(
        &'a self,
        entity_type: &'a str,
        entity_id: &'a str,
        names: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<Option<Feature>>, FeatureStoreError>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get_features(entity_type, entity_id, names)
    }

    fn create_feature_group<'a>(
        &'a self,
        group: &'a FeatureGroup,
    ) -> BoxFuture<'a, Result<(), FeatureStoreError>> {
        self.inner.create_feature_group(group)
    }

    fn get_feature_group<'a>(
        &'a self,
        name: &'a str,
        version: Option<u32>,
    ) -> BoxFuture<'a, Result<Option<FeatureGroup>, FeatureStoreError>> {
        self.inner.get_feature_group(name, version)
    }
}

#[tokio::test]
async fn the_cache_serves_repeat_reads_and_write_through_keeps_the_highest_version() {
    let (backend, session, cfg) = backend("fs_cache").await;
    let counting = Arc::new(Counting {
        inner: backend.clone(),
        reads: AtomicUsize::new(0),
    });
    let store = FeatureStore::with_config(counting.clone(), &cfg);
    let reads = || counting.reads.load(Ordering::SeqCst);
    let cached_version = || async {
        store
            .get_feature("user", "u1", "activity")
            .await
            .expect("read")
            .expect("present")
            .version
    };

    store
        .set_feature(&update("u1", "activity", 2))
        .await
        .expect("write v2");
    assert_eq!(cached_version().await, 2);
    assert_eq!(reads(), 1, "the first read goes to the database");
    assert_eq!(cached_version().await, 2);
    assert_eq!(reads(), 1, "the second read is served by the cache");
    let stats = store.cache_stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.entries),
        (1, 1, 1),
        "{stats:?}"
    );
    assert!((stats.hit_rate - 0.5).abs() < 1e-9, "{stats:?}");

    // A late, lower version is stored nowhere: not in the database, not in the cache.
    store
        .set_feature(&update("u1", "activity", 1))
        .await
        .expect("write v1");
    assert_eq!(cached_version().await, 2);
    assert_eq!(
        current(&backend, "u1", "activity").await.unwrap().version,
        2
    );

    // A higher version replaces the cached one without another read.
    store
        .set_feature(&update("u1", "activity", 5))
        .await
        .expect("write v5");
    let cached = store
        .get_feature("user", "u1", "activity")
        .await
        .expect("read")
        .expect("present");
    assert_eq!((cached.version, &cached.values["tag"]), (5, &json!("v5")));
    assert_eq!(reads(), 1, "write-through, not a re-read");

    // A write behind the store's back (another instance) is not seen until invalidated.
    backend
        .put_feature(&update("u1", "activity", 9))
        .await
        .expect("direct write");
    assert_eq!(cached_version().await, 5, "served from the cache");
    assert!(store.invalidate("user", "u1", "activity"));
    assert_eq!(cached_version().await, 9);
    assert_eq!(reads(), 2);

    let stats = store.cache_stats();
    assert_eq!((stats.invalidations, stats.evictions), (1, 0), "{stats:?}");

    drop_keyspace(&session, &cfg).await;
}

#[tokio::test]
async fn schema_creation_is_repeatable_and_a_missing_schema_is_explained() {
    let (_backend, session, cfg) = backend("fs_schema").await;

    // A second start on the same keyspace applies the (idempotent) schema again.
    ScyllaBackend::connect(&cfg)
        .await
        .expect("second start on an existing schema");
    let rows = session
        .query_unpaged(
            format!("SELECT version FROM {}.schema_migrations", cfg.keyspace),
            &[],
        )
        .await
        .expect("select")
        .into_rows_result()
        .expect("rows");
    let versions: Vec<i32> = rows
        .rows::<(i32,)>()
        .expect("typed rows")
        .map(|r| r.expect("row").0)
        .collect();
    assert_eq!(versions, [1]);

    // Without create_schema, a keyspace with no tables fails at start-up, saying what to do.
    let missing = config(&unique_name("fs_noschema"), "create_schema = false\n");
    let err = ScyllaBackend::connect(&missing)
        .await
        .expect_err("no schema");
    assert!(matches!(err, FeatureStoreError::Prepare { .. }), "{err}");
    assert!(err.to_string().contains("create_schema"), "{err}");

    drop_keyspace(&session, &cfg).await;
}
