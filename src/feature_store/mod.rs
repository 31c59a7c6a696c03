//! The feature store: features, feature groups and feature vectors on a CQL database, on
//! PostgreSQL, on MySQL or MariaDB, or in an embedded database, read through an in-process TTL
//! cache.
//!
//! - [`model`]: the domain types ([`FeatureUpdate`], [`Feature`], [`FeatureGroup`],
//!   [`FeatureVector`]) and their rules.
//! - [`FeatureBackend`]: what a storage backend does. Four implement it, with the same
//!   semantics (one behaviour suite runs on each): [`ScyllaBackend`] (`scylla.rs`) on a CQL
//!   database; [`PostgresBackend`] and [`MysqlBackend`] (`sql.rs`, both written by one macro
//!   over `sqlx`) on PostgreSQL and on MySQL or MariaDB, from the DSN in
//!   `feature_store.postgres.url` / `feature_store.mysql.url`; [`EmbeddedBackend`]
//!   (`embedded.rs`) in one local redb file. `feature_store.backend` chooses
//!   ([`FeatureStore::open`]).
//! - [`cache`]: the bounded TTL cache ([`TtlCache`]), with no I/O and no clock of its own.
//! - [`FeatureStore`]: a backend plus the cache; what the rest of inferflow calls.
//! - [`schema`]: the CQL in `schemas/cql/`, applied at start-up when configured to (the SQL
//!   backends apply `schemas/sql/` themselves, see `sql.rs`).
//! - [`connect`]: the CQL session, shared with the readiness check.
//!
//! inferflow speaks CQL through the `scylla` driver. Production runs ScyllaDB; tests run a
//! single Cassandra node. Only CQL that both accept is used here: no Cassandra-only features.
//!
//! # The cache in front of the backend
//!
//! Reads go through the cache; a miss reads the backend and fills the cache, unless a write or
//! an invalidation of the key happened meanwhile (see [`cache`]). Features found missing are
//! cached too, so vectors with absent features do not go to the database every time. An entry
//! lives `feature_store.cache_ttl_secs` at most, and never past the feature's own TTL (minus a
//! second, since the database counts TTLs in whole seconds).
//!
//! Writes go to the backend first, then *write through*: a cached entry is replaced by the
//! written version if that version is at least the cached one, so a late, older write never
//! replaces a newer cached value. A write does not create an entry for a key that is not
//! cached, because writes may arrive out of order and the writer does not know whether the
//! database already holds a newer version; the next read fills it. A failed write drops the
//! key from the cache. Other instances' writes reach this cache through [`coherence`]: their
//! announcements drop older cached values ([`FeatureStore::invalidate_older`]).
//!
//! - [`ingest`]: feature updates from Kafka into the store.
//! - [`coherence`]: invalidations between instances.

mod embedded;
mod error;
mod scylla;
mod sql;

pub mod cache;
pub mod coherence;
mod config;
pub mod freshness;
pub mod ingest;
pub mod model;
pub mod schema;

pub use self::cache::{CacheStats, TtlCache};
pub use self::config::{
    Consistency, FeatureStoreBackend, FeatureStoreConfig, IngestConfig, IngestSections, SqlConfig,
};
pub use self::embedded::{
    DEFAULT_FILE_NAME, EmbeddedBackend, EmbeddedStats, FORMAT_VERSION, SWEEP_BATCH, SweepStats,
    TOMBSTONE_GRACE_SECS, database_file,
};
pub use self::error::FeatureStoreError;
pub use self::freshness::{Freshness, FreshnessRules, OnStale};
pub use self::model::{
    Feature, FeatureGroup, FeatureKey, FeatureUpdate, FeatureValue, FeatureVector, MAX_TTL_SECS,
    MAX_VERSION,
};
pub(crate) use self::scylla::prepare_idempotent;
pub use self::scylla::{MAX_NAMES_PER_QUERY, ScyllaBackend, write_timestamp};
pub use self::sql::{
    MYSQL_MIGRATIONS, MysqlBackend, POSTGRES_MIGRATIONS, PURGE_BATCH, PURGE_INTERVAL,
    PostgresBackend, SqlMigration, key_hash,
};

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::scylla::client::execution_profile::ExecutionProfile;
use ::scylla::client::session::Session;
use ::scylla::client::session_builder::SessionBuilder;
use ::scylla::statement::Consistency as CqlConsistency;
use futures::StreamExt as _;
use futures::future::BoxFuture;

use crate::metrics as m;

/// Why the feature store could not be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No contact point answered, or the handshake failed.
    #[error(
        "could not connect to the CQL database at {contact_points}: {source}; check feature_store.contact_points and that the database is running"
    )]
    Connect {
        /// The contact points tried.
        contact_points: String,
        /// The driver's error.
        #[source]
        source: ::scylla::errors::NewSessionError,
    },
    /// The SQL database did not answer, refused the credentials, or the DSN is malformed.
    #[error(
        "could not connect to the {database} database at {url}: {reason}; check {key}.url (scheme, host, port, user, password, database) and that the server is running"
    )]
    Sql {
        /// PostgreSQL or MySQL.
        database: &'static str,
        /// The configuration section, e.g. `feature_store.postgres`.
        key: &'static str,
        /// The DSN, its password redacted.
        url: String,
        /// What went wrong, without the password.
        reason: String,
    },
}

impl From<Consistency> for CqlConsistency {
    fn from(c: Consistency) -> Self {
        match c {
            Consistency::One => CqlConsistency::One,
            Consistency::LocalOne => CqlConsistency::LocalOne,
            Consistency::Quorum => CqlConsistency::Quorum,
            Consistency::LocalQuorum => CqlConsistency::LocalQuorum,
            Consistency::All => CqlConsistency::All,
        }
    }
}

/// Opens a session with the configured contact points, credentials, consistency and timeout.
pub async fn connect(cfg: &FeatureStoreConfig) -> Result<Session, ConnectError> {
    let profile = ExecutionProfile::builder()
        .consistency(cfg.consistency.into())
        .request_timeout(Some(Duration::from_millis(cfg.request_timeout_ms.get())))
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&cfg.contact_points)
        .default_execution_profile_handle(profile.into_handle())
        .connection_timeout(Duration::from_secs(5));
    if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
        builder = builder.user(user, password.expose());
    }
    builder
        .build()
        .await
        .map_err(|source| ConnectError::Connect {
            contact_points: cfg.contact_points.join(","),
            source,
        })
}

/// `version` of a feature, for a backend that keeps history rows: the history row `history`
/// found, or else the current value (read by `current`) if it is still that version, since the
/// history row may be gone (a shorter retention) while the current value is not.
pub(crate) async fn history_or_current(
    history: Option<Feature>,
    version: u64,
    current: impl Future<Output = Result<Option<Feature>, FeatureStoreError>>,
) -> Result<Option<Feature>, FeatureStoreError> {
    match history {
        Some(feature) => Ok(Some(feature)),
        None => Ok(current.await?.filter(|f| f.version == version)),
    }
}

/// A storage backend of the feature store. Methods take borrowed arguments and return boxed
/// futures, so a backend can be shared as `Arc<dyn FeatureBackend>`.
///
/// Every backend keeps, per feature, the value with the highest version written, whatever the
/// order of the writes, and a write that repeats a version changes nothing. It validates its
/// input with the rules in [`model`] and returns [`FeatureStoreError::Invalid`] for input that
/// breaks them. Expired features read as absent.
pub trait FeatureBackend: Send + Sync + 'static {
    /// Writes one version of a feature (and its history row).
    fn put_feature<'a>(
        &'a self,
        update: &'a FeatureUpdate,
    ) -> BoxFuture<'a, Result<(), FeatureStoreError>>;

    /// The current (highest) version of a feature, if any.
    fn get_feature<'a>(
        &'a self,
        entity_type: &'a str,
        entity_id: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Feature>, FeatureStoreError>>;

    /// A given version of a feature, while the history retention keeps it.
    fn get_feature_at_version<'a>(
        &'a self,
        entity_type: &'a str,
        entity_id: &'a str,
        name: &'a str,
        version: u64,
    ) -> BoxFuture<'a, Result<Option<Feature>, FeatureStoreError>>;

    /// The current versions of several features of one entity, one result per name in the
    /// order given (`None` for a feature with no value). Backends read each entity's features
    /// in as few round trips as they can.
    fn get_features<'a>(
        &'a self,
        entity_type: &'a str,
        entity_id: &'a str,
        names: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<Option<Feature>>, FeatureStoreError>>;

    /// Creates a version of a feature group. Creating an identical version again succeeds; a
    /// different definition under an existing version is a
    /// [`FeatureStoreError::GroupConflict`].
    fn create_feature_group<'a>(
        &'a self,
        group: &'a FeatureGroup,
    ) -> BoxFuture<'a, Result<(), FeatureStoreError>>;

    /// A version of a feature group, or its latest version when `version` is `None`.
    fn get_feature_group<'a>(
        &'a self,
        name: &'a str,
        version: Option<u32>,
    ) -> BoxFuture<'a, Result<Option<FeatureGroup>, FeatureStoreError>>;
}

/// Implements [`FeatureBackend`] for a backend whose inherent async methods do the work:
/// `put`, `get`, `get_at_version`, `get_many`, `create_group` and `get_group`, each with the
/// arguments of the trait method it serves. Every method of the trait boxes the future of its
/// inherent method, so the backends share one forwarding impl instead of each writing it out.
macro_rules! forward_backend {
    ($backend:ty) => {
        const _: () = {
            use futures::future::BoxFuture;

            use $crate::feature_store::{
                Feature, FeatureBackend, FeatureGroup, FeatureStoreError, FeatureUpdate,
            };

            impl FeatureBackend for $backend {
                fn put_feature<'a>(
                    &'a self,
                    update: &'a FeatureUpdate,
                ) -> BoxFuture<'a, Result<(), FeatureStoreError>> {
                    Box::pin(self.put(update))
                }

                fn get_feature<'a>(
                    &'a self,
                    entity_type: &'a str,
                    entity_id: &'a str,
                    name: &'a str,
                ) -> BoxFuture<'a, Result<Option<Feature>, FeatureStoreError>> {
                    Box::pin(self.get(entity_type, entity_id, name))
                }

                fn get_feature_at_version<'a>(
                    &'a self,
                    entity_type: &'a str,
                    entity_id: &'a str,
                    name: &'a str,
                    version: u64,
                ) -> BoxFuture<'a, Result<Option<Feature>, FeatureStoreError>> {
                    Box::pin(self.get_at_version(entity_type, entity_id, name, version))
                }

                fn get_features<'a>(
                    &'a self,
                    entity_type: &'a str,
                    entity_id: &'a str,
                    names: &'a [&'a str],
                ) -> BoxFuture<'a, Result<Vec<Option<Feature>>, FeatureStoreError>> {
                    Box::pin(self.get_many(entity_type, entity_id, names))
                }

                fn create_feature_group<'a>(
                    &'a self,
                    group: &'a FeatureGroup,
                ) -> BoxFuture<'a, Result<(), FeatureStoreError>> {
                    Box::pin(self.create_group(group))
                }

                fn get_feature_group<'a>(
                    &'a self,
                    name: &'a str,
                    version: Option<u32>,
                ) -> BoxFuture<'a, Result<Option<FeatureGroup>, FeatureStoreError>> {
                    Box::pin(self.get_group(name, version))
                }
            }
        };
    };
}
use forward_backend;

/// What [`FeatureStore::read_cached`] found.
#[derive(Debug)]
pub enum CachedRead {
    /// The cache held every name: the vector.
    Done(FeatureVector),
    /// Some names must be read from the backend: pass this to [`FeatureStore::finish_read`].
    Pending(PendingRead),
}

/// A feature-vector read the cache could not answer whole: what it found so far.
#[derive(Debug)]
pub struct PendingRead {
    entity_type: String,
    entity_id: String,
    /// The names asked for, each once, in the order asked.
    names: Vec<String>,
    /// Per name, what the cache held (`None`: not cached).
    found: Vec<Option<Cached>>,
    /// When the read began (for the cache fills).
    now: Instant,
}

/// The vector of one entity from what was found for each name (`None` or `Some(None)`: no
/// value).
fn build_vector<'n>(
    entity_type: &str,
    entity_id: &str,
    found: impl Iterator<Item = (&'n str, Option<Cached>)>,
) -> FeatureVector {
    let now_ms = model::unix_now_ms();
    let mut vector = FeatureVector {
        entity_type: entity_type.to_owned(),
        entity_id: entity_id.to_owned(),
        features: BTreeMap::new(),
        missing: Vec::new(),
        stale: Vec::new(),
    };
    for (name, feature) in found {
        match feature.flatten() {
            Some(f) => {
                vector.features.insert(
                    name.to_owned(),
                    FeatureValue {
                        values: f.values.clone(),
                        version: f.version,
                        age_ms: f.age_ms(now_ms),
                    },
                );
            }
            None => vector.missing.push(name.to_owned()),
        }
    }
    vector
}

/// Backend calls in flight at most in the batch methods ([`FeatureStore::set_features`],
/// [`FeatureStore::get_feature_vectors`]).
pub const BATCH_CONCURRENCY: usize = 32;

/// What the cache holds for a feature: its value, or `None` when the backend had none.
type Cached = Option<Arc<Feature>>;

/// A backend with the in-process cache in front of it: the feature store the rest of inferflow
/// uses. See the module documentation for how reads and writes use the cache.
pub struct FeatureStore {
    /// Where features live.
    backend: Arc<dyn FeatureBackend>,
    /// Current values (and known absences) by key.
    cache: TtlCache<FeatureKey, Cached>,
    /// The longest time an entry is cached (`feature_store.cache_ttl_secs`).
    cache_ttl: Duration,
}

impl fmt::Debug for FeatureStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeatureStore")
            .field("cache_ttl", &self.cache_ttl)
            .field("cache", &self.cache.stats())
            .finish_non_exhaustive()
    }
}

impl FeatureStore {
    /// A store over `backend` whose cache keeps entries up to `cache_ttl` and holds at most
    /// `cache_max_entries` of them.
    pub fn new(
        backend: Arc<dyn FeatureBackend>,
        cache_ttl: Duration,
        cache_max_entries: NonZeroUsize,
    ) -> Self {
        FeatureStore {
            backend,
            cache: TtlCache::new(cache_max_entries),
            cache_ttl,
        }
    }

    /// A store over `backend` with the cache settings of `cfg`.
    pub fn with_config(backend: Arc<dyn FeatureBackend>, cfg: &FeatureStoreConfig) -> Self {
        Self::new(
            backend,
            Duration::from_secs(cfg.cache_ttl_secs.get()),
            cfg.cache_max_entries,
        )
    }

    /// Opens the backend `feature_store.backend` names and puts the cache in front of it:
    /// `scylla` connects to the CQL database of `cfg` and creates or migrates its schema if
    /// configured to; `embedded` opens (or creates) the database file at `feature_store.path`.
    pub async fn open(cfg: &FeatureStoreConfig) -> Result<Self, FeatureStoreError> {
        let backend: Arc<dyn FeatureBackend> = match cfg.backend {
            FeatureStoreBackend::Scylla => Arc::new(ScyllaBackend::connect(cfg).await?),
            FeatureStoreBackend::Embedded => Arc::new(EmbeddedBackend::open(cfg).await?),
            FeatureStoreBackend::Postgres => Arc::new(PostgresBackend::connect(cfg).await?),
            FeatureStoreBackend::Mysql => Arc::new(MysqlBackend::connect(cfg).await?),
        };
        Ok(Self::with_config(backend, cfg))
    }

    /// The backend, for callers that need it without the cache.
    pub fn backend(&self) -> &Arc<dyn FeatureBackend> {
        &self.backend
    }

    /// Writes one version of a feature, then updates a cached entry if the version written is
    /// newer than the cached one, and drops a cached entry of the same version with other
    /// values.
    pub async fn set_feature(&self, update: &FeatureUpdate) -> Result<(), FeatureStoreError> {
        let key = update.key();
        // The TTL runs from the write, so the cache's clock starts before it.
        let now = Instant::now();
        if let Err(err) = self.backend.put_feature(update).await {
            // Part of the write may have landed; the next read goes to the backend.
            self.cache.invalidate(&key);
            return Err(err);
        }
        let version = update.version;
        let ttl = self.entry_ttl(update.ttl_secs);
        self.cache.update_if(
            &key,
            Some(Arc::new(Feature::from_update(update))),
            ttl,
            now,
            |cached| cached.as_ref().is_none_or(|f| f.version < version),
        );
        // The cached version written again: with the same values nothing changed; with other
        // values the backend decided which stay (`model::same_version_wins`), so the next read
        // asks it.
        self.cache.invalidate_if(&key, |cached| {
            cached
                .as_ref()
                .is_some_and(|f| f.version == version && f.values != update.values)
        });
        Ok(())
    }

    /// The current version of a feature, from the cache if it is there.
    pub async fn get_feature(
        &self,
        entity_type: &str,
        entity_id: &str,
        name: &str,
    ) -> Result<Option<Arc<Feature>>, FeatureStoreError> {
        model::validate_key(entity_type, entity_id, name)?;
        let key = FeatureKey::new(entity_type, entity_id, name);
        let now = Instant::now();
        if let Some(cached) = self.cache.get(&key, now) {
            metrics::counter!(m::FEATURE_READS_TOTAL, "source" => "cache").increment(1);
            return Ok(cached);
        }
        metrics::counter!(m::FEATURE_READS_TOTAL, "source" => "store").increment(1);
        let ticket = self.cache.begin_fill(&key);
        let feature = timed_read(self.backend.get_feature(entity_type, entity_id, name))
            .await?
            .map(Arc::new);
        let ttl = self.entry_ttl(feature.as_ref().and_then(|f| f.ttl_secs));
        let _ = self
            .cache
            .complete_fill(ticket, key, feature.clone(), ttl, now);
        Ok(feature)
    }

    /// A given version of a feature, from the backend (history reads are not cached).
    pub async fn get_feature_at_version(
        &self,
        entity_type: &str,
        entity_id: &str,
        name: &str,
        version: u64,
    ) -> Result<Option<Feature>, FeatureStoreError> {
        self.backend
            .get_feature_at_version(entity_type, entity_id, name, version)
            .await
    }

    /// The current values of `names` for one entity. Cached features come from the cache; the
    /// others are read from the backend in one call. Names without a value are listed in
    /// `missing`; a name asked for twice appears once.
    pub async fn get_feature_vector<S: AsRef<str>>(
        &self,
        entity_type: &str,
        entity_id: &str,
        names: &[S],
    ) -> Result<FeatureVector, FeatureStoreError> {
        self.get_feature_vector_and_source(entity_type, entity_id, names)
            .await
            .map(|(vector, _)| vector)
    }

    /// [`FeatureStore::get_feature_vector`], and whether the cache answered every name (true)
    /// or the backend was read (false).
    pub async fn get_feature_vector_and_source<S: AsRef<str>>(
        &self,
        entity_type: &str,
        entity_id: &str,
        names: &[S],
    ) -> Result<(FeatureVector, bool), FeatureStoreError> {
        match self.read_cached(entity_type, entity_id, names)? {
            CachedRead::Done(vector) => Ok((vector, true)),
            CachedRead::Pending(pending) => self.finish_read(pending).await,
        }
    }

    /// The first half of [`FeatureStore::get_feature_vector_and_source`], without a future:
    /// the names looked up in the cache (each lookup counted once, as there). When the cache
    /// holds every name (a value or a known absence) the vector is [`CachedRead::Done`];
    /// otherwise [`FeatureStore::finish_read`] reads the rest from the backend.
    pub fn read_cached<S: AsRef<str>>(
        &self,
        entity_type: &str,
        entity_id: &str,
        names: &[S],
    ) -> Result<CachedRead, FeatureStoreError> {
        model::validate_entity(entity_type, entity_id)?;
        let mut unique: Vec<&str> = Vec::with_capacity(names.len());
        for name in names.iter().map(AsRef::as_ref) {
            model::validate_part("feature key", "feature name", name)?;
            if !unique.contains(&name) {
                unique.push(name);
            }
        }
        let now = Instant::now();
        let found: Vec<Option<Cached>> = unique
            .iter()
            .map(|name| {
                self.cache
                    .get(&FeatureKey::new(entity_type, entity_id, *name), now)
            })
            .collect();
        let missed = found.iter().filter(|f| f.is_none()).count();
        metrics::counter!(m::FEATURE_READS_TOTAL, "source" => "cache")
            .increment((unique.len() - missed) as u64);
        metrics::counter!(m::FEATURE_READS_TOTAL, "source" => "store").increment(missed as u64);
        if missed == 0 {
            return Ok(CachedRead::Done(build_vector(
                entity_type,
                entity_id,
                unique.into_iter().zip(found),
            )));
        }
        Ok(CachedRead::Pending(PendingRead {
            entity_type: entity_type.to_owned(),
            entity_id: entity_id.to_owned(),
            names: unique.into_iter().map(str::to_owned).collect(),
            found,
            now,
        }))
    }

    /// The second half of [`FeatureStore::get_feature_vector_and_source`]: the names the cache
    /// did not hold, read from the backend in one call (and cached), and the vector. The
    /// `bool` is false: the backend was read.
    pub async fn finish_read(
        &self,
        pending: PendingRead,
    ) -> Result<(FeatureVector, bool), FeatureStoreError> {
        let PendingRead {
            entity_type,
            entity_id,
            names,
            mut found,
            now,
        } = pending;
        let misses: Vec<usize> = (0..names.len()).filter(|&i| found[i].is_none()).collect();
        let keys: Vec<FeatureKey> = misses
            .iter()
            .map(|&i| FeatureKey::new(&entity_type, &entity_id, &names[i]))
            .collect();
        let tickets: Vec<_> = keys.iter().map(|k| self.cache.begin_fill(k)).collect();
        let miss_names: Vec<&str> = misses.iter().map(|&i| names[i].as_str()).collect();
        let read = timed_read(
            self.backend
                .get_features(&entity_type, &entity_id, &miss_names),
        )
        .await?;
        if read.len() != miss_names.len() {
            return Err(FeatureStoreError::decode(
                "feature vector read",
                format!(
                    "the backend returned {} results for {} names",
                    read.len(),
                    miss_names.len()
                ),
            ));
        }
        for (((i, key), ticket), feature) in misses.iter().zip(keys).zip(tickets).zip(read) {
            let feature = feature.map(Arc::new);
            let ttl = self.entry_ttl(feature.as_ref().and_then(|f| f.ttl_secs));
            let _ = self
                .cache
                .complete_fill(ticket, key, feature.clone(), ttl, now);
            found[*i] = Some(feature);
        }
        let vector = build_vector(
            &entity_type,
            &entity_id,
            names.iter().map(String::as_str).zip(found),
        );
        Ok((vector, false))
    }

    /// The vector of `group`'s features for one entity of the group's entity type.
    pub async fn get_feature_group_vector(
        &self,
        group: &FeatureGroup,
        entity_id: &str,
    ) -> Result<FeatureVector, FeatureStoreError> {
        self.get_feature_vector(&group.entity_type, entity_id, &group.features)
            .await
    }

    /// [`FeatureStore::get_feature_vector`] with freshness `rules` applied: features older
    /// than their `max_age` fail the lookup, are skipped or take their default.
    pub async fn get_feature_vector_with<S: AsRef<str>>(
        &self,
        entity_type: &str,
        entity_id: &str,
        names: &[S],
        rules: &FreshnessRules,
    ) -> Result<FeatureVector, FeatureStoreError> {
        let mut vector = self
            .get_feature_vector(entity_type, entity_id, names)
            .await?;
        rules.apply(&mut vector)?;
        Ok(vector)
    }

    /// [`FeatureStore::get_feature_group_vector`] with freshness `rules` applied (typically
    /// one `max_age` for the whole group, [`FreshnessRules::all`]).
    pub async fn get_feature_group_vector_with(
        &self,
        group: &FeatureGroup,
        entity_id: &str,
        rules: &FreshnessRules,
    ) -> Result<FeatureVector, FeatureStoreError> {
        self.get_feature_vector_with(&group.entity_type, entity_id, &group.features, rules)
            .await
    }

    /// Writes many updates, at most [`BATCH_CONCURRENCY`] at a time; one outcome per update,
    /// in order. A failed write does not stop the others.
    pub async fn set_features(
        &self,
        updates: &[FeatureUpdate],
    ) -> Vec<Result<(), FeatureStoreError>> {
        futures::stream::iter(updates)
            .map(|u| self.set_feature(u))
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await
    }

    /// The vectors of `names` for many entities of one type, at most [`BATCH_CONCURRENCY`]
    /// backend reads at a time; one outcome per entity, in order. Cached features are served
    /// from the cache, as for one entity.
    pub async fn get_feature_vectors<S: AsRef<str> + Sync, I: AsRef<str>>(
        &self,
        entity_type: &str,
        entity_ids: &[I],
        names: &[S],
    ) -> Vec<Result<FeatureVector, FeatureStoreError>> {
        futures::stream::iter(entity_ids)
            .map(|id| self.get_feature_vector(entity_type, id.as_ref(), names))
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await
    }

    /// The vectors of `group`'s features for many entities (see
    /// [`FeatureStore::get_feature_vectors`]).
    pub async fn get_feature_group_vectors<I: AsRef<str>>(
        &self,
        group: &FeatureGroup,
        entity_ids: &[I],
    ) -> Vec<Result<FeatureVector, FeatureStoreError>> {
        self.get_feature_vectors(&group.entity_type, entity_ids, &group.features)
            .await
    }

    /// Creates a version of a feature group (see [`FeatureBackend::create_feature_group`]).
    pub async fn create_feature_group(
        &self,
        group: &FeatureGroup,
    ) -> Result<(), FeatureStoreError> {
        self.backend.create_feature_group(group).await
    }

    /// A version of a feature group, or its latest version when `version` is `None`. Not
    /// cached: resolve a group once and reuse it.
    pub async fn get_feature_group(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<FeatureGroup>, FeatureStoreError> {
        self.backend.get_feature_group(name, version).await
    }

    /// Drops a feature from the cache (for updates made elsewhere); returns whether it was
    /// cached. A read already on its way to the backend does not put the old value back.
    pub fn invalidate(&self, entity_type: &str, entity_id: &str, name: &str) -> bool {
        self.cache
            .invalidate(&FeatureKey::new(entity_type, entity_id, name))
    }

    /// Drops a cached feature whose version is older than `version`, or that is cached as
    /// absent (another instance wrote `version`); returns whether an entry was dropped. A value
    /// at `version` or newer stays. A read already on its way to the backend does not put an
    /// older value back.
    pub fn invalidate_older(
        &self,
        entity_type: &str,
        entity_id: &str,
        name: &str,
        version: u64,
    ) -> bool {
        self.cache
            .invalidate_if(&FeatureKey::new(entity_type, entity_id, name), |cached| {
                cached.as_ref().is_none_or(|f| f.version < version)
            })
    }

    /// Removes expired entries from the cache; returns how many. For a periodic sweeper:
    /// expired entries are never served, this only frees their memory sooner.
    pub fn purge_expired(&self) -> usize {
        self.cache.purge_expired(Instant::now())
    }

    /// The cache's counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Once a second until `stop`: removes expired cache entries and exports the cache's
    /// counters as gauges (hit ratio, entries, evictions).
    pub async fn maintain(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(cache::PURGE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            self.purge_expired();
            let stats = self.cache_stats();
            metrics::gauge!(m::FEATURE_CACHE_HIT_RATIO).set(stats.hit_rate);
            metrics::gauge!(m::FEATURE_CACHE_ENTRIES).set(stats.entries as f64);
            metrics::gauge!(m::FEATURE_CACHE_EVICTIONS).set(stats.evictions as f64);
        }
    }

    /// How long to cache a value whose remaining TTL is `ttl_secs`: the cache TTL, but never
    /// past the feature's own expiry (less one second, since the database counts in whole
    /// seconds).
    fn entry_ttl(&self, ttl_secs: Option<u32>) -> Duration {
        match ttl_secs {
            None => self.cache_ttl,
            Some(secs) => self
                .cache_ttl
                .min(Duration::from_secs(u64::from(secs).saturating_sub(1))),
        }
    }
}

/// Awaits a backend read, recording its latency.
async fn timed_read<T>(
    read: BoxFuture<'_, Result<T, FeatureStoreError>>,
) -> Result<T, FeatureStoreError> {
    let started = Instant::now();
    let result = read.await;
    metrics::histogram!(m::FEATURE_STORE_READ_SECONDS).record(started.elapsed().as_secs_f64());
    result
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::{Map, Value, json};

    use super::*;

    /// An in-memory backend that keeps the highest version and counts reads.
    #[derive(Default)]
    struct Memory {
        features: Mutex<HashMap<FeatureKey, Feature>>,
        reads: AtomicUsize,
        names_read: Mutex<Vec<String>>,
        fail_writes: std::sync::atomic::AtomicBool,
    }

    impl Memory {
        fn read_count(&self) -> usize {
            self.reads.load(Ordering::SeqCst)
        }

        /// Writes behind the cache's back, as another instance would.
        fn put_direct(&self, update: &FeatureUpdate) {
            let mut map = self.features.lock().unwrap();
            let entry = map
                .entry(update.key())
                .or_insert_with(|| Feature::from_update(update));
            if update.version >= entry.version {
                *entry = Feature::from_update(update);
            }
        }
    }

    impl FeatureBackend for Memory {
        fn put_feature<'a>(
            &'a self,
            update: &'a FeatureUpdate,
        ) -> BoxFuture<'a, Result<(), FeatureStoreError>> {
            Box::pin(async move {
                update.validate()?;
                if self.fail_writes.load(Ordering::SeqCst) {
                    return Err(FeatureStoreError::decode(
                        "test write",
                        "failing on purpose",
                    ));
                }
                self.put_direct(update);
                Ok(())
            })
        }

        fn get_feature<'a>(
            &'a self,
            entity_type: &'a str,
            entity_id: &'a str,
            name: &'a str,
        ) -> BoxFuture<'a, Result<Option<Feature>, FeatureStoreError>> {
            Box::pin(async move {
                self.reads.fetch_add(1, Ordering::SeqCst);
                self.names_read.lock().unwrap().push(name.to_owned());
                let key = FeatureKey::new(entity_type, entity_id, name);
                Ok(self.features.lock().unwrap().get(&key).cloned())
            })
        }

        fn get_feature_at_version<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: &'a str,
            _: u64,
        ) -> BoxFuture<'a, Result<Option<Feature>, FeatureStoreError>> {
            Box::pin(async { Ok(None) })
        }

        fn get_features<'a>(
            &'a self,
            entity_type: &'a str,
            entity_id: &'a str,
            names: &'a [&'a str],
        ) -> BoxFuture<'a, Result<Vec<Option<Feature>>, FeatureStoreError>> {
            Box::pin(async move {
                self.reads.fetch_add(1, Ordering::SeqCst);
                let map = self.features.lock().unwrap();
                let mut read = self.names_read.lock().unwrap();
                Ok(names
                    .iter()
                    .map(|name| {
                        read.push((*name).to_owned());
                        map.get(&FeatureKey::new(entity_type, entity_id, *name))
                            .cloned()
                    })
                    .collect())
            })
        }

        fn create_feature_group<'a>(
            &'a self,
            _: &'a FeatureGroup,
        ) -> BoxFuture<'a, Result<(), FeatureStoreError>> {
            Box::pin(async { Ok(()) })
        }

        fn get_feature_group<'a>(
            &'a self,
            _: &'a str,
            _: Option<u32>,
        ) -> BoxFuture<'a, Result<Option<FeatureGroup>, FeatureStoreError>> {
            Box::pin(async { Ok(None) })
        }
    }

    fn values(v: Value) -> Map<String, Value> {
        v.as_object().expect("object").clone()
    }

    fn update(name: &str, version: u64) -> FeatureUpdate {
        FeatureUpdate::new("user", "u1", name, values(json!({ "v": version })), version)
    }

    fn store() -> (Arc<Memory>, FeatureStore) {
        let memory = Arc::new(Memory::default());
        let store = FeatureStore::new(
            memory.clone(),
            Duration::from_secs(300),
            NonZeroUsize::new(100).unwrap(),
        );
        (memory, store)
    }

    #[tokio::test]
    async fn a_second_read_is_served_from_the_cache() {
        let (memory, store) = store();
        memory.put_direct(&update("a", 1));
        let first = store.get_feature("user", "u1", "a").await.unwrap();
        let second = store.get_feature("user", "u1", "a").await.unwrap();
        assert_eq!(first.unwrap().version, 1);
        assert_eq!(second.unwrap().version, 1);
        assert_eq!(memory.read_count(), 1);
        let stats = store.cache_stats();
        assert_eq!((stats.hits, stats.misses), (1, 1), "{stats:?}");
    }

    #[tokio::test]
    async fn write_through_replaces_only_with_a_version_at_least_the_cached_one() {
        let (memory, store) = store();
        store.set_feature(&update("a", 5)).await.unwrap();
        assert_eq!(
            store
                .get_feature("user", "u1", "a")
                .await
                .unwrap()
                .unwrap()
                .version,
            5
        );

        store.set_feature(&update("a", 3)).await.unwrap();
        let cached = store.get_feature("user", "u1", "a").await.unwrap().unwrap();
        assert_eq!(cached.version, 5, "an older write does not replace");

        store.set_feature(&update("a", 8)).await.unwrap();
        let cached = store.get_feature("user", "u1", "a").await.unwrap().unwrap();
        assert_eq!((cached.version, &cached.values["v"]), (8, &json!(8)));
        assert_eq!(
            memory.read_count(),
            1,
            "only the first read went to the backend"
        );
    }

    #[tokio::test]
    async fn a_write_does_not_create_a_cache_entry() {
        let (memory, store) = store();
        store.set_feature(&update("a", 5)).await.unwrap();
        assert_eq!(store.cache_stats().entries, 0);
        store.get_feature("user", "u1", "a").await.unwrap();
        assert_eq!(memory.read_count(), 1);
    }

    #[tokio::test]
    async fn absence_is_cached_and_a_write_replaces_it() {
        let (memory, store) = store();
        assert!(
            store
                .get_feature("user", "u1", "a")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .get_feature("user", "u1", "a")
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(memory.read_count(), 1);
        store.set_feature(&update("a", 2)).await.unwrap();
        let cached = store.get_feature("user", "u1", "a").await.unwrap().unwrap();
        assert_eq!(cached.version, 2);
        assert_eq!(memory.read_count(), 1);
    }

    #[tokio::test]
    async fn a_failed_write_drops_the_cached_entry() {
        let (memory, store) = store();
        memory.put_direct(&update("a", 1));
        store.get_feature("user", "u1", "a").await.unwrap();
        memory.fail_writes.store(true, Ordering::SeqCst);
        store.set_feature(&update("a", 2)).await.unwrap_err();
        store.get_feature("user", "u1", "a").await.unwrap();
        assert_eq!(memory.read_count(), 2);
    }

    #[tokio::test]
    async fn a_short_feature_ttl_bounds_the_cache_entry() {
        let (memory, store) = store();
        memory.put_direct(&update("a", 1).with_ttl_secs(1));
        store.get_feature("user", "u1", "a").await.unwrap();
        store.get_feature("user", "u1", "a").await.unwrap();
        assert_eq!(memory.read_count(), 2, "a 1 s TTL is not cached at all");
    }

    #[tokio::test]
    async fn vectors_read_only_the_misses_and_report_missing_names() {
        let (memory, store) = store();
        memory.put_direct(&update("a", 1));
        memory.put_direct(&update("b", 2));
        store.get_feature("user", "u1", "a").await.unwrap();
        memory.names_read.lock().unwrap().clear();

        let vector = store
            .get_feature_vector("user", "u1", &["a", "b", "nope", "b"])
            .await
            .unwrap();
        assert_eq!(*memory.names_read.lock().unwrap(), ["b", "nope"]);
        assert_eq!(vector.features.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(vector.features["b"].version, 2);
        assert_eq!(vector.missing, ["nope"]);

        let again = store
            .get_feature_vector("user", "u1", &["a", "b", "nope"])
            .await
            .unwrap();
        assert_eq!(again.missing, ["nope"]);
        assert_eq!(
            memory.read_count(),
            2,
            "the second vector came from the cache"
        );
    }

    #[tokio::test]
    async fn batch_variants_answer_each_entity_in_order() {
        let (_memory, store) = store();
        let updates: Vec<FeatureUpdate> = (0..50)
            .map(|i| FeatureUpdate::new("user", format!("u{i}"), "a", values(json!({ "i": i })), 1))
            .chain(std::iter::once(FeatureUpdate::new(
                "user",
                "",
                "a",
                Map::new(),
                1,
            )))
            .collect();
        let written = store.set_features(&updates).await;
        assert_eq!(written.len(), 51);
        assert!(written[..50].iter().all(Result::is_ok));
        assert!(
            matches!(written[50], Err(FeatureStoreError::Invalid { .. })),
            "the invalid update fails alone"
        );
        let ids: Vec<String> = (0..60).map(|i| format!("u{i}")).collect();
        let vectors = store.get_feature_vectors("user", &ids, &["a"]).await;
        assert_eq!(vectors.len(), 60);
        for (i, v) in vectors.into_iter().enumerate() {
            let v = v.expect("read");
            assert_eq!(v.entity_id, format!("u{i}"), "in order");
            if i < 50 {
                assert_eq!(v.features["a"].values["i"], json!(i));
            } else {
                assert_eq!(v.missing, ["a"]);
            }
        }
        let group = FeatureGroup {
            name: "g".into(),
            version: 1,
            entity_type: "user".into(),
            features: vec!["a".into()],
            description: String::new(),
        };
        let by_group = store.get_feature_group_vectors(&group, &["u3", "u7"]).await;
        assert_eq!(
            by_group[1].as_ref().expect("read").features["a"].values["i"],
            json!(7)
        );
    }

    #[tokio::test]
    async fn invalidate_makes_the_next_read_go_to_the_backend() {
        let (memory, store) = store();
        memory.put_direct(&update("a", 1));
        store.get_feature("user", "u1", "a").await.unwrap();
        memory.put_direct(&update("a", 2));
        assert!(store.invalidate("user", "u1", "a"));
        let fresh = store.get_feature("user", "u1", "a").await.unwrap().unwrap();
        assert_eq!(fresh.version, 2);
    }

    #[tokio::test]
    async fn invalid_keys_are_rejected_before_the_backend() {
        let (memory, store) = store();
        let err = store.get_feature("user", "", "a").await.unwrap_err();
        assert!(matches!(err, FeatureStoreError::Invalid { .. }), "{err}");
        let err = store
            .get_feature_vector("user", "u1", &["a", ""])
            .await
            .unwrap_err();
        assert!(matches!(err, FeatureStoreError::Invalid { .. }), "{err}");
        assert_eq!(memory.read_count(), 0);
    }
}
