//! The feature store's behaviour, written once against `Arc<dyn FeatureBackend>` and
//! `FeatureStore` and run on the four backends by [`on_both_backends!`]: each behaviour becomes
//! `on_scylla::<name>` (the real CQL test database, in a keyspace of its own that the store
//! creates and the test drops), `on_postgres::<name>` and `on_mysql::<name>` (a database of its
//! own on the test server, dropped afterwards) and `on_embedded::<name>` (a redb file in a
//! temporary directory). Checks only a CQL database can make (write timestamps and TTLs of the
//! rows behind the store's back, schema creation) and checks only the embedded backend has
//! (reopening its file, the sweep) come after, one backend each.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use inferflow::config::{Config, FeatureStoreBackend, FeatureStoreConfig};
use inferflow::feature_store::model::MAX_KEY_BYTES;
use inferflow::feature_store::{
    EmbeddedBackend, EmbeddedStats, Feature, FeatureBackend, FeatureGroup, FeatureStore,
    FeatureStoreError, FeatureUpdate, MAX_TTL_SECS, MAX_VERSION, ScyllaBackend,
};
use scylla::client::session::Session;
use serde_json::{Map, Value, json};
use tempfile::TempDir;

use crate::number_cases;
use crate::utils::{self, Sql, cql_contact, cql_session, unique_name};

/// Expands each behaviour `name` (an `async fn name(backend: &Backend)` below) into four tests,
/// `on_scylla::name`, `on_embedded::name`, `on_postgres::name` and `on_mysql::name`. A behaviour may add TOML lines to the
/// `[feature_store]` section: `name("history_retention_secs = 2")`.
macro_rules! on_both_backends {
    ($($name:ident $(($extra:literal))?;)*) => {
        mod on_scylla {
            $(
                #[tokio::test]
                async fn $name() {
                    let backend = super::Backend::scylla(concat!("" $(, $extra)?)).await;
                    super::$name(&backend).await;
                    backend.finish().await;
                }
            )*
        }

        mod on_embedded {
            $(
                #[tokio::test]
                async fn $name() {
                    let backend = super::Backend::embedded(concat!("" $(, $extra)?)).await;
                    super::$name(&backend).await;
                    backend.finish().await;
                }
            )*
        }

        mod on_postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let backend = super::Backend::sql(super::Sql::Postgres, concat!("" $(, $extra)?)).await;
                    super::$name(&backend).await;
                    backend.finish().await;
                }
            )*
        }

        mod on_mysql {
            $(
                #[tokio::test]
                async fn $name() {
                    let backend = super::Backend::sql(super::Sql::Mysql, concat!("" $(, $extra)?)).await;
                    super::$name(&backend).await;
                    backend.finish().await;
                }
            )*
        }
    };
}

on_both_backends! {
    out_of_order_and_replayed_writes_converge_to_the_highest_version;
    one_version_written_with_other_values_keeps_the_greater_values_in_any_order;
    older_versions_are_read_back_from_history;
    history_retention_ends_old_versions_but_not_the_current_one("history_retention_secs = 2");
    a_feature_with_a_ttl_expires_in_the_store_and_in_the_cache;
    get_features_reports_missing_names_as_missing;
    groups_are_versioned_and_latest_is_the_default;
    the_cache_serves_repeat_reads_and_write_through_keeps_the_highest_version;
    invalid_input_is_refused_before_anything_is_stored;
    feature_values_come_back_exactly_as_written;
}

/// A backend under test, its configuration, and what to clean up afterwards.
struct Backend {
    backend: Arc<dyn FeatureBackend>,
    cfg: FeatureStoreConfig,
    cleanup: Cleanup,
}

enum Cleanup {
    /// Drop the keyspace with this session.
    Scylla(Box<Session>),
    /// The directory holding the database file, deleted when dropped.
    Embedded(TempDir),
    /// Drop this database of the SQL test server.
    Sql(Sql, String),
}

impl Backend {
    /// The CQL backend on a new keyspace of the test database; `extra` adds TOML lines to
    /// `[feature_store]`. Fails with the command that starts the database if it is not running.
    async fn scylla(extra: &str) -> Self {
        utils::init_tracing();
        let session = cql_session().await;
        let cfg = config(&format!(
            "contact_points = [\"{}\"]\nkeyspace = \"{}\"\n{extra}",
            cql_contact(),
            unique_name("fs")
        ));
        assert_eq!(cfg.backend, FeatureStoreBackend::Scylla);
        let backend = ScyllaBackend::connect(&cfg)
            .await
            .unwrap_or_else(|e| panic!("opening the feature store: {e}"));
        Backend {
            backend: Arc::new(backend),
            cfg,
            cleanup: Cleanup::Scylla(Box::new(session)),
        }
    }

    /// The embedded backend on a file in a new temporary directory; `extra` adds TOML lines to
    /// `[feature_store]`.
    async fn embedded(extra: &str) -> Self {
        utils::init_tracing();
        let dir = tempfile::tempdir().expect("temporary directory");
        let cfg = embedded_config(&dir, extra);
        let backend = EmbeddedBackend::open(&cfg)
            .await
            .unwrap_or_else(|e| panic!("opening the feature store: {e}"));
        Backend {
            backend: Arc::new(backend),
            cfg,
            cleanup: Cleanup::Embedded(dir),
        }
    }

    /// A SQL backend on a new database of the test server; `extra` adds TOML lines to
    /// `[feature_store]`.
    async fn sql(sql: Sql, extra: &str) -> Self {
        utils::init_tracing();
        let db = unique_name("inferflow_fs");
        sql.admin(&format!("CREATE DATABASE {db}")).await;
        let (backend_name, section) = match sql {
            Sql::Postgres => ("postgres", "postgres"),
            Sql::Mysql => ("mysql", "mysql"),
        };
        let cfg = config(&format!(
            "backend = \"{backend_name}\"\n{extra}\n[feature_store.{section}]\nurl = \"{}\"\n",
            sql.url(&db)
        ));
        let backend = FeatureStore::open(&cfg)
            .await
            .unwrap_or_else(|e| panic!("opening the feature store: {e}"));
        Backend {
            backend: backend.backend().clone(),
            cfg,
            cleanup: Cleanup::Sql(sql, db),
        }
    }

    /// A feature store (cache included) over this backend, with the cache settings of `cfg`.
    fn store(&self) -> FeatureStore {
        FeatureStore::with_config(self.backend.clone(), &self.cfg)
    }

    async fn current(&self, entity_id: &str, name: &str) -> Option<Feature> {
        self.backend
            .get_feature("user", entity_id, name)
            .await
            .expect("read feature")
    }

    async fn finish(self) {
        match self.cleanup {
            Cleanup::Scylla(session) => drop_keyspace(&session, &self.cfg.keyspace).await,
            Cleanup::Embedded(dir) => {
                drop(self.backend);
                dir.close().expect("remove the temporary directory");
            }
            Cleanup::Sql(sql, db) => {
                drop(self.backend);
                let drop_db = match sql {
                    Sql::Postgres => format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
                    Sql::Mysql => format!("DROP DATABASE IF EXISTS {db}"),
                };
                sql.admin(&drop_db).await;
            }
        }
    }
}

/// The feature store section with `extra`, and an hour of history unless `extra` says otherwise.
fn config(extra: &str) -> FeatureStoreConfig {
    let retention = if extra.contains("history_retention_secs") {
        ""
    } else {
        "history_retention_secs = 3600\n"
    };
    Config::from_toml_str(&format!("[feature_store]\n{retention}{extra}"))
        .expect("test config")
        .feature_store
}

/// The embedded backend's section for a file in `dir`.
fn embedded_config(dir: &TempDir, extra: &str) -> FeatureStoreConfig {
    let cfg = config(&format!(
        "backend = \"embedded\"\npath = \"{}\"\n{extra}",
        dir.path().join("features.redb").display()
    ));
    assert_eq!(cfg.backend, FeatureStoreBackend::Embedded);
    cfg
}

async fn drop_keyspace(session: &Session, keyspace: &str) {
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), &[])
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

// ---------------------------------------------------------------------------------------------
// Behaviours shared by every backend.
// ---------------------------------------------------------------------------------------------

async fn out_of_order_and_replayed_writes_converge_to_the_highest_version(b: &Backend) {
    // After every write, the highest version written so far is the one stored.
    for version in [3, 1, 2, 3, 1] {
        b.backend
            .put_feature(&update("u1", "activity", version))
            .await
            .expect("write");
        let feature = b.current("u1", "activity").await.expect("stored");
        assert_eq!(
            (feature.version, &feature.values["tag"]),
            (3, &json!("v3")),
            "after writing v{version}"
        );
        assert_eq!(feature.ttl_secs, None);
    }

    // Many versions written at once, in a shuffled order: the highest one is kept.
    let mut versions: Vec<u64> = (1..=60).collect();
    versions.sort_by_key(|v| (v * 7919) % 61);
    let writes = versions.iter().map(|&v| {
        let backend = b.backend.clone();
        async move { backend.put_feature(&update("u2", "activity", v)).await }
    });
    futures::future::try_join_all(writes)
        .await
        .expect("concurrent writes");
    let feature = b.current("u2", "activity").await.expect("stored");
    assert_eq!(
        (feature.version, &feature.values["score"]),
        (60, &json!(60))
    );
}

/// One version written again with other values: the greater values (compared as JSON text,
/// byte by byte) and the later `updated_at` stay, in the current value and in the history,
/// whichever write arrives first; the cache in front follows the store.
async fn one_version_written_with_other_values_keeps_the_greater_values_in_any_order(b: &Backend) {
    let write = |values: Value, updated_at_ms: u64| {
        let mut u = FeatureUpdate::new("user", "u1", "x", self::values(values), 7);
        u.updated_at_ms = updated_at_ms;
        u
    };
    // {"tag":"b"} is greater than {"tag":"a"}; the smaller values carry the later time.
    let small = || write(json!({"tag": "a"}), 2_000);
    let large = || write(json!({"tag": "b"}), 1_000);
    for (entity, order) in [
        ("first-small", [small(), large()]),
        ("first-large", [large(), small()]),
    ] {
        let store = b.store();
        for mut update in order {
            update.entity_id = entity.to_owned();
            store.set_feature(&update).await.expect("write");
            // Read through the cache after each write, as a service would.
            store.get_feature("user", entity, "x").await.expect("read");
        }
        let current = b.current(entity, "x").await.expect("stored");
        assert_eq!(
            (
                current.version,
                &current.values["tag"],
                current.updated_at_ms
            ),
            (7, &json!("b"), 2_000),
            "{entity}: current"
        );
        let cached = store
            .get_feature("user", entity, "x")
            .await
            .expect("read")
            .expect("stored");
        assert_eq!(cached.values["tag"], "b", "{entity}: through the cache");
        let history = b
            .backend
            .get_feature_at_version("user", entity, "x", 7)
            .await
            .expect("history read")
            .expect("in the history");
        assert_eq!(
            (&history.values["tag"], history.updated_at_ms),
            (&json!("b"), 2_000),
            "{entity}: history"
        );
    }
}

async fn older_versions_are_read_back_from_history(b: &Backend) {
    for version in [1, 3, 2] {
        b.backend
            .put_feature(&update("u1", "activity", version))
            .await
            .expect("write");
    }
    for version in [1, 2, 3] {
        let old = b
            .backend
            .get_feature_at_version("user", "u1", "activity", version)
            .await
            .expect("history read")
            .unwrap_or_else(|| panic!("version {version} is in the history"));
        assert_eq!(old.version, version);
        assert_eq!(old.values["tag"], format!("v{version}"));
        // History rows last the retention (an hour here).
        let ttl = old.ttl_secs.expect("history rows expire");
        assert!((3000..=3600).contains(&ttl), "v{version}: TTL {ttl}");
    }
    let never = b
        .backend
        .get_feature_at_version("user", "u1", "activity", 4)
        .await
        .expect("history read");
    assert_eq!(never, None);
    assert_eq!(b.current("u1", "activity").await.unwrap().version, 3);

    // A feature's own TTL ends its history rows when it is shorter than the retention.
    b.backend
        .put_feature(&update("u1", "short", 1).with_ttl_secs(600))
        .await
        .expect("write");
    let short = b
        .backend
        .get_feature_at_version("user", "u1", "short", 1)
        .await
        .expect("history read")
        .expect("in the history");
    let ttl = short.ttl_secs.expect("expires");
    assert!((1..=600).contains(&ttl), "TTL {ttl}");
}

async fn history_retention_ends_old_versions_but_not_the_current_one(b: &Backend) {
    for version in [1, 2] {
        b.backend
            .put_feature(&update("u1", "activity", version))
            .await
            .expect("write");
    }
    let at = |version: u64| {
        b.backend
            .get_feature_at_version("user", "u1", "activity", version)
    };
    let v1 = at(1).await.expect("read").expect("v1 in the history");
    assert!(
        v1.ttl_secs.is_some_and(|t| (1..=2).contains(&t)),
        "{:?}",
        v1.ttl_secs
    );
    // Both history rows end after 2 s. v2 stays readable by version all along, since it is
    // the current value (which has no TTL, so once it is read from there it has none).
    let start = Instant::now();
    loop {
        let v1 = at(1).await.expect("read");
        let v2 = at(2)
            .await
            .expect("read")
            .expect("the current version is always readable by version");
        assert_eq!(v2.version, 2);
        if v1.is_none() && v2.ttl_secs.is_none() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "history rows still there 15 s after writing them with a 2 s retention: {v1:?}, {v2:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(500),
        "gone after {elapsed:?}, too soon for a 2 s retention"
    );
    assert_eq!(b.current("u1", "activity").await.unwrap().version, 2);
}

async fn a_feature_with_a_ttl_expires_in_the_store_and_in_the_cache(b: &Backend) {
    let store = b.store();
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
        let in_store = b.current("u1", "session").await;
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
    assert_eq!(
        store
            .get_feature_vector("user", "u1", &["session"])
            .await
            .unwrap()
            .missing,
        ["session"]
    );
}

async fn get_features_reports_missing_names_as_missing(b: &Backend) {
    let store = b.store();
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
    let read = b
        .backend
        .get_features("user", "u1", &names)
        .await
        .expect("read");
    let versions: Vec<Option<u64>> = read.iter().map(|f| f.as_ref().map(|f| f.version)).collect();
    assert_eq!(versions, [Some(1), Some(2), None], "c belongs to u2 only");

    // A name asked for twice is answered twice.
    let twice = b
        .backend
        .get_features("user", "u1", &["b", "c", "b"])
        .await
        .expect("read");
    let versions: Vec<Option<u64>> = twice
        .iter()
        .map(|f| f.as_ref().map(|f| f.version))
        .collect();
    assert_eq!(versions, [Some(2), None, Some(2)]);

    let vector = store
        .get_feature_vector("user", "u1", &names)
        .await
        .expect("vector");
    assert_eq!(vector.features.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(vector.features["b"].values["tag"], "v2");
    assert_eq!(vector.features["b"].version, 2);
    assert!(vector.features["a"].age_ms < 60_000);
    assert_eq!(vector.missing, ["c"]);

    // Many names (more than one CQL IN query takes): every name answered, in order.
    let many: Vec<String> = (0..250).map(|i| format!("f{i:03}")).collect();
    for name in many.iter().step_by(2) {
        b.backend
            .put_feature(&update("u3", name, 1))
            .await
            .expect("write");
    }
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let read = b
        .backend
        .get_features("user", "u3", &refs)
        .await
        .expect("read");
    assert_eq!(read.len(), 250);
    for (i, feature) in read.iter().enumerate() {
        assert_eq!(feature.is_some(), i % 2 == 0, "f{i:03}");
        if let Some(feature) = feature {
            assert_eq!(feature.name, many[i]);
            assert_eq!(feature.entity_id, "u3");
        }
    }
}

async fn groups_are_versioned_and_latest_is_the_default(b: &Backend) {
    let store = b.store();
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
    let v10 = FeatureGroup {
        version: 10,
        features: vec!["c".into()],
        description: "v10 sorts after v2".into(),
        ..v1.clone()
    };
    // A group whose name extends this one's must not be taken for one of its versions.
    let other = FeatureGroup {
        name: "fraud2".into(),
        version: 50,
        ..v1.clone()
    };
    store.create_feature_group(&v2).await.expect("create v2");
    store.create_feature_group(&v1).await.expect("create v1");
    store
        .create_feature_group(&other)
        .await
        .expect("create other");

    let latest = store.get_feature_group("fraud", None).await.expect("read");
    assert_eq!(
        latest.as_ref(),
        Some(&v2),
        "created after v1, still the latest"
    );
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
    store.create_feature_group(&v10).await.expect("create v10");
    assert_eq!(
        store.get_feature_group("fraud", None).await.expect("read"),
        Some(v10.clone())
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
    assert!(!err.is_retryable());
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
}

/// A backend that counts the reads reaching the database.
struct Counting {
    inner: Arc<dyn FeatureBackend>,
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

async fn the_cache_serves_repeat_reads_and_write_through_keeps_the_highest_version(b: &Backend) {
    let counting = Arc::new(Counting {
        inner: b.backend.clone(),
        reads: AtomicUsize::new(0),
    });
    let store = FeatureStore::with_config(counting.clone(), &b.cfg);
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
    assert_eq!(b.current("u1", "activity").await.unwrap().version, 2);

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
    b.backend
        .put_feature(&update("u1", "activity", 9))
        .await
        .expect("direct write");
    assert_eq!(cached_version().await, 5, "served from the cache");
    assert!(store.invalidate("user", "u1", "activity"));
    assert_eq!(cached_version().await, 9);
    assert_eq!(reads(), 2);

    let stats = store.cache_stats();
    assert_eq!((stats.invalidations, stats.evictions), (1, 0), "{stats:?}");
}

async fn feature_values_come_back_exactly_as_written(b: &Backend) {
    // Edge cases and random doubles, parsed from their text as a feature write arrives.
    let mut cases = number_cases::all(19, 300);
    cases.push(number_cases::BEYOND_F64.to_owned());
    let written: Map<String, Value> =
        serde_json::from_str(&number_cases::object(&cases)).expect("the values parse");
    let store = b.store();
    for version in [1, 2] {
        store
            .set_feature(&FeatureUpdate::new(
                "user",
                "u1",
                "exact",
                written.clone(),
                version,
            ))
            .await
            .expect("write");
    }
    let check = |values: &Map<String, Value>, what: &str| {
        assert!(
            values == &written,
            "{what}: the values read differ from those written"
        );
        let text = serde_json::to_string(values).expect("values serialise");
        number_cases::assert_carried(&text, &cases, what);
    };
    let stored = b.current("u1", "exact").await.expect("stored");
    check(&stored.values, "read from the backend");
    let old = b
        .backend
        .get_feature_at_version("user", "u1", "exact", 1)
        .await
        .expect("history read")
        .expect("version 1 is in the history");
    check(&old.values, "read from the history");
    // A fresh store: the first read fills the cache from the backend, the second is a hit.
    let fresh = b.store();
    for what in [
        "through the store (a miss)",
        "through the store (a cache hit)",
    ] {
        let feature = fresh
            .get_feature("user", "u1", "exact")
            .await
            .expect("read")
            .expect("present");
        check(&feature.values, what);
    }
    assert_eq!(fresh.cache_stats().hits, 1);
    let vector = fresh
        .get_feature_vector("user", "u1", &["exact"])
        .await
        .expect("vector");
    check(&vector.features["exact"].values, "in a feature vector");
}

async fn invalid_input_is_refused_before_anything_is_stored(b: &Backend) {
    fn assert_invalid<T: std::fmt::Debug>(result: Result<T, FeatureStoreError>, expected: &str) {
        let err = result.expect_err(expected);
        assert!(
            matches!(err, FeatureStoreError::Invalid { .. }),
            "{expected}: {err:?}"
        );
        assert!(
            err.to_string().contains(expected),
            "`{err}` does not say `{expected}`"
        );
        assert!(!err.is_retryable());
    }

    let good = update("u1", "f", 1);
    let bad_updates = [
        (
            FeatureUpdate {
                entity_type: String::new(),
                ..good.clone()
            },
            "entity_type is empty",
        ),
        (
            FeatureUpdate {
                entity_id: String::new(),
                ..good.clone()
            },
            "entity_id is empty",
        ),
        (
            FeatureUpdate {
                name: "x".repeat(MAX_KEY_BYTES + 1),
                ..good.clone()
            },
            "feature name has",
        ),
        (
            FeatureUpdate {
                version: MAX_VERSION + 1,
                ..good.clone()
            },
            "largest supported version",
        ),
        (good.clone().with_ttl_secs(0), "ttl_secs 0"),
        (good.clone().with_ttl_secs(MAX_TTL_SECS + 1), "out of range"),
        (
            FeatureUpdate {
                updated_at_ms: u64::MAX,
                ..good.clone()
            },
            "updated_at_ms",
        ),
    ];
    for (bad, expected) in &bad_updates {
        assert_invalid(b.backend.put_feature(bad).await, expected);
    }
    assert_eq!(b.current("u1", "f").await, None, "no refused write landed");
    assert_eq!(
        b.backend
            .get_feature_at_version("user", "u1", "f", 1)
            .await
            .expect("read"),
        None
    );

    // Reads check their keys too, and the largest version is accepted.
    assert_invalid(
        b.backend.get_feature("user", "", "f").await,
        "entity_id is empty",
    );
    assert_invalid(
        b.backend
            .get_feature_at_version("user", "u1", "f", MAX_VERSION + 1)
            .await,
        "largest supported version",
    );
    assert_invalid(
        b.backend.get_features("user", "u1", &["a", ""]).await,
        "feature name is empty",
    );
    assert_invalid(b.backend.get_feature_group("", None).await, "name is empty");
    let store = b.store();
    assert_invalid(
        store.get_feature_vector("", "u1", &["a"]).await,
        "entity_type is empty",
    );
    let max = FeatureUpdate {
        version: MAX_VERSION,
        ..good.clone()
    };
    b.backend
        .put_feature(&max)
        .await
        .expect("MAX_VERSION is valid");
    assert_eq!(b.current("u1", "f").await.unwrap().version, MAX_VERSION);

    // Groups: a version from 1, at least one feature, no feature twice.
    let group = FeatureGroup {
        name: "g".into(),
        version: 1,
        entity_type: "user".into(),
        features: vec!["a".into()],
        description: String::new(),
    };
    for (bad, expected) in [
        (
            FeatureGroup {
                version: 0,
                ..group.clone()
            },
            "version 0",
        ),
        (
            FeatureGroup {
                features: vec![],
                ..group.clone()
            },
            "features is empty",
        ),
        (
            FeatureGroup {
                features: vec!["a".into(), "a".into()],
                ..group.clone()
            },
            "listed twice",
        ),
        (
            FeatureGroup {
                entity_type: String::new(),
                ..group.clone()
            },
            "entity_type is empty",
        ),
    ] {
        assert_invalid(b.backend.create_feature_group(&bad).await, expected);
    }
    assert_eq!(
        b.backend.get_feature_group("g", None).await.expect("read"),
        None,
        "no refused group landed"
    );
}

// ---------------------------------------------------------------------------------------------
// CQL only: rows behind the store's back, and the schema.
// ---------------------------------------------------------------------------------------------

/// The single row a CQL query returns.
async fn cql_row<T>(
    session: &Session,
    cql: String,
    values: impl scylla::serialize::row::SerializeRow,
) -> T
where
    T: for<'f> scylla::deserialize::row::DeserializeRow<'f, 'f>,
{
    let rows = session
        .query_unpaged(cql, values)
        .await
        .expect("select")
        .into_rows_result()
        .expect("rows");
    rows.single_row::<T>().expect("one row")
}

#[tokio::test]
async fn scylla_rows_carry_the_version_as_write_timestamp_and_the_retention_as_ttl() {
    let b = Backend::scylla("").await;
    let Cleanup::Scylla(session) = &b.cleanup else {
        unreachable!("a Scylla backend");
    };
    let ks = &b.cfg.keyspace;
    for version in [3, 1, 2] {
        b.backend
            .put_feature(&update("u1", "activity", version))
            .await
            .expect("write");
    }
    b.backend
        .put_feature(&update("u1", "short", 1).with_ttl_secs(600))
        .await
        .expect("write");

    // The write timestamp is the version times 1000.
    let (writetime,): (i64,) = cql_row(
        session,
        format!(
            "SELECT WRITETIME(values_json) FROM {ks}.features WHERE entity_type = 'user' AND entity_id = 'u1' AND name = ?"
        ),
        ("activity",),
    )
    .await;
    assert_eq!(writetime, 3000);

    // History rows carry the retention as TTL, or the feature's own TTL when it is shorter.
    let history_ttl = |name: &'static str| {
        cql_row::<(Option<i32>,)>(
            session,
            format!(
                "SELECT TTL(values_json) FROM {ks}.feature_history WHERE entity_type = 'user' AND entity_id = 'u1' AND name = ? AND version = ?"
            ),
            (name, 1_i64),
        )
    };
    let (retained,) = history_ttl("activity").await;
    let retained = retained.expect("history rows expire");
    assert!((3000..=3600).contains(&retained), "TTL {retained}");
    let (short,) = history_ttl("short").await;
    let short = short.expect("history rows expire");
    assert!((1..=600).contains(&short), "TTL {short}");

    b.finish().await;
}

#[tokio::test]
async fn scylla_schema_creation_is_repeatable_and_a_missing_schema_is_explained() {
    let b = Backend::scylla("").await;
    let Cleanup::Scylla(session) = &b.cleanup else {
        unreachable!("a Scylla backend");
    };

    // A second start on the same keyspace applies the (idempotent) schema again.
    ScyllaBackend::connect(&b.cfg)
        .await
        .expect("second start on an existing schema");
    let rows = session
        .query_unpaged(
            format!("SELECT version FROM {}.schema_migrations", b.cfg.keyspace),
            &[],
        )
        .await
        .expect("select")
        .into_rows_result()
        .expect("rows");
    let mut versions: Vec<i32> = rows
        .rows::<(i32,)>()
        .expect("typed rows")
        .map(|r| r.expect("row").0)
        .collect();
    versions.sort_unstable();
    // Version 2 (the replay tables) is applied once, after version 1, and recorded.
    assert_eq!(versions, [1, 2]);

    // Without create_schema, a keyspace with no tables fails at start-up, saying what to do.
    let missing = config(&format!(
        "contact_points = [\"{}\"]\nkeyspace = \"{}\"\ncreate_schema = false\n",
        cql_contact(),
        unique_name("fs_noschema")
    ));
    let err = ScyllaBackend::connect(&missing)
        .await
        .expect_err("no schema");
    assert!(matches!(err, FeatureStoreError::Prepare { .. }), "{err}");
    assert!(err.to_string().contains("create_schema"), "{err}");

    b.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Embedded only: the file outlives the process's handle, and expired data is swept.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn embedded_data_survives_reopening_and_expired_data_is_swept_when_opened() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cfg = embedded_config(&dir, "");

    // FeatureStore::open picks the backend the configuration names.
    let store = FeatureStore::open(&cfg).await.expect("open");
    store
        .set_feature(&update("u1", "kept", 4))
        .await
        .expect("write");
    store
        .set_feature(&update("u1", "brief", 1).with_ttl_secs(1))
        .await
        .expect("write");
    let group = FeatureGroup {
        name: "g".into(),
        version: 3,
        entity_type: "user".into(),
        features: vec!["kept".into(), "brief".into()],
        description: "survives".into(),
    };
    store.create_feature_group(&group).await.expect("group");
    // The file is locked while a store has it open.
    let err = FeatureStore::open(&cfg).await.expect_err("locked");
    assert!(
        matches!(err, FeatureStoreError::EmbeddedOpen { .. }),
        "{err:?}"
    );
    drop(store);

    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let backend = EmbeddedBackend::open(&cfg).await.expect("reopen");
    // Opening swept the expired feature: its values are gone (its version stays as a
    // tombstone for a while) and so is its history row.
    assert_eq!(
        backend.stats().await.expect("stats"),
        EmbeddedStats {
            features: 1,
            tombstones: 1,
            history_rows: 1,
            groups: 1,
            expiry_entries: 2,
        },
        "kept@4 with its history row (which expires with the retention), brief's tombstone \
         (which has a purge entry), one group"
    );
    let kept = backend
        .get_feature("user", "u1", "kept")
        .await
        .expect("read")
        .expect("kept");
    assert_eq!((kept.version, &kept.values["tag"]), (4, &json!("v4")));
    assert_eq!(
        backend
            .get_feature("user", "u1", "brief")
            .await
            .expect("read"),
        None
    );
    assert_eq!(
        backend.get_feature_group("g", None).await.expect("read"),
        Some(group)
    );
    drop(backend);
    dir.close().expect("remove the temporary directory");
}
