//! [`EmbeddedBackend`]: the feature store in one local file, through the embedded database
//! [redb](https://www.redb.org) (pure Rust, ACID, copy-on-write B-trees). No server: for a
//! single instance, development, tests and the `inferflow features` commands. The semantics are
//! those of the CQL backend (see [`super::FeatureBackend`] and `scylla.rs`).
//!
//! # On-disk layout
//!
//! One redb file (`feature_store.path`; when that names a directory, [`DEFAULT_FILE_NAME`]
//! inside it), created in redb's v3 file format so later redb versions open it as it is. Five
//! tables; every key is a byte string built from these pieces:
//!
//! - `part(s)`: the UTF-8 bytes of `s` preceded by their length as a big-endian `u32`. The
//!   length prefix makes a sequence of parts unambiguous (`("ab","c")` and `("a","bc")` differ)
//!   and makes every key of one feature start with the same bytes;
//! - integers are big-endian, so byte order is numeric order.
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | a name (`&str`) | `u64`; `format_version` is [`FORMAT_VERSION`] |
//! | `features` | `part(entity_type) part(entity_id) part(name)` | the current value, JSON (below) |
//! | `feature_history` | the feature key, then `version` (`u64`) | one version, JSON (below) |
//! | `feature_groups` | `part(name)`, then `version` (`u32`) | the group's fields and `created_at_ms`, JSON |
//! | `expiry` | `due_ms` (`u64`, Unix ms), a kind byte (1 `features`, 2 `feature_history`), the record's key | `()` |
//!
//! A stored feature is `{"version", "updated_at_ms", "expires_at_ms"?, "values"?}`:
//! `expires_at_ms` is absent for a feature without TTL, `values` is absent in a *tombstone*
//! (below). A group's versions are adjacent and in version order, so the latest version of a
//! group is the last key with its prefix.
//!
//! # Highest version wins
//!
//! A write is one write transaction, and redb runs one write transaction at a time, so reading
//! the current value, comparing versions and writing cannot interleave with another write. The
//! current value is replaced only by a higher version: a lower version arriving late changes
//! nothing, and a repeated version with the same values changes nothing either. Every write
//! also records its version in `feature_history`.
//!
//! One version written again with *different* values follows the store-wide rule (see
//! [`super::model::same_version_wins`]): the greater values, compared as their compact JSON
//! text byte by byte, stay, with the later `updated_at`, in the current value and in the
//! version's history row alike, whatever order the writes arrive in. That is what a CQL
//! database does by itself with two cells of one write timestamp, so both backends agree.
//!
//! # Durability
//!
//! Every write transaction commits with [`Durability::Immediate`]: when the future of
//! [`FeatureBackend::put_feature`] or [`FeatureBackend::create_feature_group`] returns `Ok`, the
//! data is on disk (redb fsyncs before `commit` returns), and a crash afterwards loses nothing.
//! All redb calls, reads included, run on Tokio's blocking pool
//! ([`tokio::task::spawn_blocking`]), never on the async workers. A write whose future is
//! dropped midway still completes or rolls back as a whole, like a CQL write already sent.
//!
//! [`FeatureBackend::put_feature`]: super::FeatureBackend::put_feature
//! [`FeatureBackend::create_feature_group`]: super::FeatureBackend::create_feature_group
//!
//! The cost: writes are serialised and each waits for its own fsync, so write throughput is
//! bounded by how many fsyncs a second the disk completes. Reads run
//! concurrently with each other and with the writer, each on a consistent snapshot.
//!
//! # TTLs and the sweep
//!
//! A TTL counts from the write (this machine's clock): the record stores `expires_at_ms`, and a
//! record past it reads as absent, current value and history alike; the `ttl_secs` read back is
//! the time left, rounded up to whole seconds. A history row expires at the earlier of the
//! feature's TTL and `feature_store.history_retention_secs` after the write (0 keeps it).
//!
//! Expired data is removed by a *sweep* driven by the `expiry` table, an index of every record
//! with an expiry, ordered by due time: the sweep reads the index from its start up to now, so it
//! costs nothing when nothing is due. Every write sweeps up to [`SWEEP_BATCH`] due entries in its
//! own transaction, opening the database sweeps everything due, and
//! [`EmbeddedBackend::sweep_expired`] can be called at any time. An index entry whose record was
//! since replaced or removed is just dropped.
//!
//! The sweep deletes expired history rows. An expired *current* value first becomes a tombstone
//! (its values are dropped; its version stays) and is deleted [`TOMBSTONE_GRACE_SECS`] after it
//! expired. Until then, the tombstone's version still outranks late writes of older versions,
//! as an expired cell does on a CQL database until `gc_grace_seconds` have passed, so an older
//! version does not come back right after a newer one expired.
//!
//! # One process at a time
//!
//! redb locks the file: a second process (or a second open in the same process) gets
//! [`FeatureStoreError::EmbeddedOpen`] saying so. Use the CQL backend to share features between
//! instances.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::FeatureStoreConfig;
use super::model::{
    unix_now_ms, validate_key, validate_part, validate_vector_key, validate_version,
};
use super::{Feature, FeatureGroup, FeatureStoreError, FeatureUpdate};

/// The file used when `feature_store.path` names a directory.
pub const DEFAULT_FILE_NAME: &str = "features.redb";

/// The version of the layout described in the module documentation, kept in the `meta` table.
/// A file with another version is refused rather than misread.
pub const FORMAT_VERSION: u64 = 1;

/// Most due expiry entries a write sweeps in passing.
pub const SWEEP_BATCH: usize = 128;

/// How long an expired current value is kept as a tombstone (its version, without values), in
/// seconds: 10 days, the default `gc_grace_seconds` of CQL tables.
pub const TOMBSTONE_GRACE_SECS: u64 = 864_000;

/// redb's page cache, in bytes. redb's default is 1 GiB; the feature store keeps its hot values
/// in its own cache ([`super::TtlCache`]), so a small one is enough.
const PAGE_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Due entries swept per transaction when sweeping everything (at open and on request).
const SWEEP_ALL_BATCH: usize = 10_000;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const FEATURES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("features");
const HISTORY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("feature_history");
const GROUPS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("feature_groups");
const EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("expiry");

/// The `meta` key holding [`FORMAT_VERSION`].
const FORMAT_KEY: &str = "format_version";

/// The kind byte of an `expiry` entry for a `features` record.
const KIND_FEATURE: u8 = 1;
/// The kind byte of an `expiry` entry for a `feature_history` record.
const KIND_HISTORY: u8 = 2;

/// A feature version as stored in `features` and `feature_history` (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredFeature {
    /// The version.
    version: u64,
    /// When the values were produced, Unix ms.
    updated_at_ms: u64,
    /// When the record expires, Unix ms; absent without TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    /// The values; absent in a tombstone (an expired current value kept for its version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    values: Option<Map<String, Value>>,
}

impl StoredFeature {
    fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }

    /// The feature as read at `now_ms`: `None` when expired or a tombstone.
    fn read(self, entity_type: &str, entity_id: &str, name: &str, now_ms: u64) -> Option<Feature> {
        if self.is_expired(now_ms) {
            return None;
        }
        let values = self.values?;
        Some(Feature {
            entity_type: entity_type.to_owned(),
            entity_id: entity_id.to_owned(),
            name: name.to_owned(),
            values,
            version: self.version,
            updated_at_ms: self.updated_at_ms,
            // Seconds left, rounded up; the store's cache subtracts a second from it.
            ttl_secs: self
                .expires_at_ms
                .map(|at| u32::try_from((at - now_ms).div_ceil(1000)).unwrap_or(u32::MAX)),
        })
    }
}

/// A feature group as stored in `feature_groups` (JSON): the group's fields, and
/// `created_at_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredGroup {
    /// The group, as created.
    #[serde(flatten)]
    group: FeatureGroup,
    /// When it was created, Unix ms.
    created_at_ms: u64,
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepStats {
    /// Expired current values turned into tombstones.
    pub tombstoned: usize,
    /// Records deleted: expired history rows and tombstones past their grace period.
    pub deleted: usize,
    /// Index entries dropped because their record had been replaced or removed.
    pub stale: usize,
}

impl SweepStats {
    fn add(&mut self, other: SweepStats) {
        self.tombstoned += other.tombstoned;
        self.deleted += other.deleted;
        self.stale += other.stale;
    }

    fn entries(&self) -> usize {
        self.tombstoned + self.deleted + self.stale
    }
}

/// How many records each table holds (expired ones not yet swept included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddedStats {
    /// Current values with values (live or expired but not yet swept).
    pub features: u64,
    /// Current values kept only for their version.
    pub tombstones: u64,
    /// Rows of `feature_history`.
    pub history_rows: u64,
    /// Feature group versions.
    pub groups: u64,
    /// Entries of the `expiry` index.
    pub expiry_entries: u64,
}

/// Where the time comes from: the system clock, or in unit tests a hand-set one.
#[derive(Debug, Clone)]
enum Clock {
    System,
    #[cfg(test)]
    Manual(Arc<std::sync::atomic::AtomicU64>),
}

impl Clock {
    fn now_ms(&self) -> u64 {
        match self {
            Clock::System => unix_now_ms(),
            #[cfg(test)]
            Clock::Manual(ms) => ms.load(std::sync::atomic::Ordering::SeqCst),
        }
    }
}

/// The database and what every operation needs, shared with the blocking tasks.
#[derive(Debug)]
struct Inner {
    db: Database,
    /// The database file.
    path: PathBuf,
    /// History retention in ms; 0 keeps history rows.
    history_retention_ms: u64,
    clock: Clock,
}

/// The feature store in a local redb file; see the module documentation. Cheap to share
/// behind an `Arc`.
#[derive(Debug)]
pub struct EmbeddedBackend {
    inner: Arc<Inner>,
}

impl EmbeddedBackend {
    /// Opens (or creates) the database at `feature_store.path` with the configured history
    /// retention.
    pub async fn open(cfg: &FeatureStoreConfig) -> Result<Self, FeatureStoreError> {
        Self::open_path(&cfg.path, cfg.history_retention_secs).await
    }

    /// Opens (or creates) the database at `path` (a file, or a directory to hold
    /// [`DEFAULT_FILE_NAME`]), creating missing parent directories; keeps history rows
    /// `history_retention_secs` (0 keeps them). Creates the tables, checks the layout version
    /// and sweeps everything due.
    pub async fn open_path(
        path: &Path,
        history_retention_secs: u64,
    ) -> Result<Self, FeatureStoreError> {
        let path = path.to_owned();
        let inner = run_blocking("open", move || {
            Inner::open(path, history_retention_secs, Clock::System)
        })
        .await?;
        Ok(EmbeddedBackend {
            inner: Arc::new(inner),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Sweeps every due expiry entry now (see the module documentation); writes and opening
    /// the database already do this, so calling it is only needed to free space sooner.
    pub async fn sweep_expired(&self) -> Result<SweepStats, FeatureStoreError> {
        self.blocking("sweep", |inner| inner.sweep_all()).await
    }

    /// How many records each table holds. Reads every table: for diagnostics and tests.
    pub async fn stats(&self) -> Result<EmbeddedStats, FeatureStoreError> {
        self.blocking("stats read", |inner| inner.stats()).await
    }

    /// Runs `f` on the blocking pool with the shared state.
    async fn blocking<T, F>(&self, operation: &'static str, f: F) -> Result<T, FeatureStoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, FeatureStoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        run_blocking(operation, move || f(&inner)).await
    }

    async fn put(&self, update: &FeatureUpdate) -> Result<(), FeatureStoreError> {
        update.validate()?;
        let update = update.clone();
        self.blocking("feature write", move |inner| inner.put(&update))
            .await
    }

    async fn get(
        &self,
        entity_type: &str,
        entity_id: &str,
        name: &str,
    ) -> Result<Option<Feature>, FeatureStoreError> {
        validate_key(entity_type, entity_id, name)?;
        let (entity_type, entity_id, name) = (
            entity_type.to_owned(),
            entity_id.to_owned(),
            name.to_owned(),
        );
        self.blocking("feature read", move |inner| {
            inner.get(&entity_type, &entity_id, &name)
        })
        .await
    }

    async fn get_at_version(
        &self,
        entity_type: &str,
        entity_id: &str,
        name: &str,
        version: u64,
    ) -> Result<Option<Feature>, FeatureStoreError> {
        validate_key(entity_type, entity_id, name)?;
        validate_version(version)?;
        let (entity_type, entity_id, name) = (
            entity_type.to_owned(),
            entity_id.to_owned(),
            name.to_owned(),
        );
        self.blocking("feature history read", move |inner| {
            inner.get_at_version(&entity_type, &entity_id, &name, version)
        })
        .await
    }

    async fn get_many(
        &self,
        entity_type: &str,
        entity_id: &str,
        names: &[&str],
    ) -> Result<Vec<Option<Feature>>, FeatureStoreError> {
        validate_vector_key(entity_type, entity_id, names)?;
        let (entity_type, entity_id) = (entity_type.to_owned(), entity_id.to_owned());
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        self.blocking("feature vector read", move |inner| {
            inner.get_many(&entity_type, &entity_id, &names)
        })
        .await
    }

    async fn create_group(&self, group: &FeatureGroup) -> Result<(), FeatureStoreError> {
        group.validate()?;
        let group = group.clone();
        self.blocking("feature group write", move |inner| {
            inner.create_group(group)
        })
        .await
    }

    async fn get_group(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<FeatureGroup>, FeatureStoreError> {
        validate_part("feature group", "name", name)?;
        let name = name.to_owned();
        self.blocking("feature group read", move |inner| {
            inner.get_group(&name, version)
        })
        .await
    }
}

/// Runs `f` on Tokio's blocking pool. A panic in `f` is resumed here, as if `f` had run inline.
async fn run_blocking<T, F>(operation: &'static str, f: F) -> Result<T, FeatureStoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, FeatureStoreError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(_) => Err(FeatureStoreError::embedded(
            operation,
            redb::Error::Io(io::Error::other(
                "the blocking task was cancelled because the Tokio runtime is shutting down",
            )),
        )),
    }
}

/// The database file for `feature_store.path`: the path itself, or [`DEFAULT_FILE_NAME`] inside
/// it when it is an existing directory or ends with a `/`.
pub fn database_file(path: &Path) -> PathBuf {
    let names_a_directory = path
        .as_os_str()
        .to_string_lossy()
        .ends_with(['/', std::path::MAIN_SEPARATOR]);
    if names_a_directory || path.is_dir() {
        path.join(DEFAULT_FILE_NAME)
    } else {
        path.to_owned()
    }
}

impl Inner {
    fn open(
        path: PathBuf,
        history_retention_secs: u64,
        clock: Clock,
    ) -> Result<Self, FeatureStoreError> {
        let path = database_file(&path);
        let open_error = |reason: String| FeatureStoreError::EmbeddedOpen {
            path: path.clone(),
            reason,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                open_error(format!(
                    "cannot create the directory {}: {e}; check feature_store.path",
                    parent.display()
                ))
            })?;
        }
        let db = redb::Builder::new()
            .set_cache_size(PAGE_CACHE_BYTES)
            .create_with_file_format_v3(true)
            .create(&path)
            .map_err(|e| open_error(describe_open_error(e)))?;
        let inner = Inner {
            db,
            path: path.clone(),
            history_retention_ms: history_retention_secs.saturating_mul(1000),
            clock,
        };
        inner.init().map_err(|e| match e {
            FeatureStoreError::Embedded { source, .. } => open_error(source.to_string()),
            other => other,
        })?;
        inner.sweep_all()?;
        Ok(inner)
    }

    /// Creates the tables and records the layout version, or checks it.
    fn init(&self) -> Result<(), FeatureStoreError> {
        const OPERATION: &str = "open";
        let txn = self.write_txn(OPERATION)?;
        {
            let mut meta = txn.open_table(META).map_err(embedded(OPERATION))?;
            let found = meta
                .get(FORMAT_KEY)
                .map_err(embedded(OPERATION))?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert(FORMAT_KEY, FORMAT_VERSION)
                        .map_err(embedded(OPERATION))?;
                }
                Some(FORMAT_VERSION) => {}
                Some(other) => {
                    return Err(FeatureStoreError::EmbeddedOpen {
                        path: self.path.clone(),
                        reason: format!(
                            "the file has layout version {other}, this inferflow reads version {FORMAT_VERSION}; open it with the inferflow that wrote it"
                        ),
                    });
                }
            }
            for table in [FEATURES, HISTORY, GROUPS] {
                txn.open_table(table).map_err(embedded(OPERATION))?;
            }
            txn.open_table(EXPIRY).map_err(embedded(OPERATION))?;
        }
        txn.commit().map_err(embedded(OPERATION))
    }

    /// A write transaction that is durable once committed.
    fn write_txn(
        &self,
        operation: &'static str,
    ) -> Result<redb::WriteTransaction, FeatureStoreError> {
        let mut txn = self.db.begin_write().map_err(embedded(operation))?;
        txn.set_durability(Durability::Immediate);
        Ok(txn)
    }

    fn put(&self, update: &FeatureUpdate) -> Result<(), FeatureStoreError> {
        const OPERATION: &str = "feature write";
        let now = self.clock.now_ms();
        let key = feature_key(&update.entity_type, &update.entity_id, &update.name);
        let expires_at_ms = update
            .ttl_secs
            .map(|ttl| now.saturating_add(u64::from(ttl) * 1000));
        let history_expires_at_ms = match (expires_at_ms, self.history_retention_ms) {
            (at, 0) => at,
            (None, retention) => Some(now.saturating_add(retention)),
            (Some(at), retention) => Some(at.min(now.saturating_add(retention))),
        };
        let txn = self.write_txn(OPERATION)?;
        {
            let mut features = txn.open_table(FEATURES).map_err(embedded(OPERATION))?;
            let mut history = txn.open_table(HISTORY).map_err(embedded(OPERATION))?;
            let mut expiry = txn.open_table(EXPIRY).map_err(embedded(OPERATION))?;

            let current = features
                .get(key.as_slice())
                .map_err(embedded(OPERATION))?
                .map(|v| decode_feature(OPERATION, &key, v.value()))
                .transpose()?;
            let next = match current {
                None => Some(StoredFeature {
                    version: update.version,
                    updated_at_ms: update.updated_at_ms,
                    expires_at_ms,
                    values: Some(update.values.clone()),
                }),
                Some(c) => merge(c, update, expires_at_ms),
            };
            if let Some(stored) = next {
                features
                    .insert(key.as_slice(), encode(&stored).as_slice())
                    .map_err(embedded(OPERATION))?;
                if let Some(at) = stored.expires_at_ms {
                    expiry
                        .insert(expiry_key(at, KIND_FEATURE, &key).as_slice(), ())
                        .map_err(embedded(OPERATION))?;
                }
            }

            let history_key = history_key(&key, update.version);
            let seen = history
                .get(history_key.as_slice())
                .map_err(embedded(OPERATION))?
                .map(|v| decode_feature(OPERATION, &history_key, v.value()))
                .transpose()?;
            let next = match seen {
                None => Some(StoredFeature {
                    version: update.version,
                    updated_at_ms: update.updated_at_ms,
                    expires_at_ms: history_expires_at_ms,
                    values: Some(update.values.clone()),
                }),
                Some(seen) => merge(seen, update, history_expires_at_ms),
            };
            if let Some(stored) = next {
                history
                    .insert(history_key.as_slice(), encode(&stored).as_slice())
                    .map_err(embedded(OPERATION))?;
                if let Some(at) = stored.expires_at_ms {
                    expiry
                        .insert(expiry_key(at, KIND_HISTORY, &history_key).as_slice(), ())
                        .map_err(embedded(OPERATION))?;
                }
            }

            sweep(now, SWEEP_BATCH, &mut features, &mut history, &mut expiry)?;
        }
        txn.commit().map_err(embedded(OPERATION))
    }

    fn get(
        &self,
        entity_type: &str,
        entity_id: &str,
        name: &str,
    ) -> Result<Option<Feature>, FeatureStoreError> {
        const OPERATION: &str = "feature read";
        let now = self.clock.now_ms();
        let txn = self.db.begin_read().map_err(embedded(OPERATION))?;
        let features = txn.open_table(FEATURES).map_err(embedded(OPERATION))?;
        read_feature(OPERATION, &features, entity_type, entity_id, name, now)
    }

    fn get_at_version(
        &self,
        entity_type: &str,
        entity_id: &str,
        name: &str,
        version: u64,
    ) -> Result<Option<Feature>, FeatureStoreError> {
        const OPERATION: &str = "feature history read";
        let now = self.clock.now_ms();
        let txn = self.db.begin_read().map_err(embedded(OPERATION))?;
        let history = txn.open_table(HISTORY).map_err(embedded(OPERATION))?;
        let key = history_key(&feature_key(entity_type, entity_id, name), version);
        let row = history
            .get(key.as_slice())
            .map_err(embedded(OPERATION))?
            .map(|v| decode_feature(OPERATION, &key, v.value()))
            .transpose()?;
        if let Some(feature) = row.and_then(|r| r.read(entity_type, entity_id, name, now)) {
            return Ok(Some(feature));
        }
        // The history row may be gone (a shorter retention) while the current value is still
        // that version.
        let features = txn.open_table(FEATURES).map_err(embedded(OPERATION))?;
        Ok(
            read_feature(OPERATION, &features, entity_type, entity_id, name, now)?
                .filter(|f| f.version == version),
        )
    }

    fn get_many(
        &self,
        entity_type: &str,
        entity_id: &str,
        names: &[String],
    ) -> Result<Vec<Option<Feature>>, FeatureStoreError> {
        const OPERATION: &str = "feature vector read";
        let now = self.clock.now_ms();
        // One read transaction: every name is read from the same snapshot.
        let txn = self.db.begin_read().map_err(embedded(OPERATION))?;
        let features = txn.open_table(FEATURES).map_err(embedded(OPERATION))?;
        names
            .iter()
            .map(|name| read_feature(OPERATION, &features, entity_type, entity_id, name, now))
            .collect()
    }

    fn create_group(&self, group: FeatureGroup) -> Result<(), FeatureStoreError> {
        const OPERATION: &str = "feature group write";
        let key = group_key(&group.name, group.version);
        let txn = self.write_txn(OPERATION)?;
        {
            let mut groups = txn.open_table(GROUPS).map_err(embedded(OPERATION))?;
            let existing = groups
                .get(key.as_slice())
                .map_err(embedded(OPERATION))?
                .map(|v| decode_group(OPERATION, &key, v.value()))
                .transpose()?;
            if let Some(existing) = existing {
                // The check and the insert share one transaction: unlike on CQL, two creations
                // of one version cannot both succeed.
                return if existing.group == group {
                    Ok(())
                } else {
                    Err(FeatureStoreError::GroupConflict {
                        name: group.name,
                        version: group.version,
                    })
                };
            }
            let stored = StoredGroup {
                group,
                created_at_ms: self.clock.now_ms(),
            };
            groups
                .insert(key.as_slice(), encode(&stored).as_slice())
                .map_err(embedded(OPERATION))?;
        }
        txn.commit().map_err(embedded(OPERATION))
    }

    fn get_group(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<FeatureGroup>, FeatureStoreError> {
        const OPERATION: &str = "feature group read";
        let txn = self.db.begin_read().map_err(embedded(OPERATION))?;
        let groups = txn.open_table(GROUPS).map_err(embedded(OPERATION))?;
        let found = match version {
            Some(version) => {
                let key = group_key(name, version);
                groups
                    .get(key.as_slice())
                    .map_err(embedded(OPERATION))?
                    .map(|v| decode_group(OPERATION, &key, v.value()))
                    .transpose()?
            }
            None => {
                let (first, last) = (group_key(name, 0), group_key(name, u32::MAX));
                groups
                    .range(first.as_slice()..=last.as_slice())
                    .map_err(embedded(OPERATION))?
                    .next_back()
                    .transpose()
                    .map_err(embedded(OPERATION))?
                    .map(|(k, v)| decode_group(OPERATION, k.value(), v.value()))
                    .transpose()?
            }
        };
        Ok(found.map(|stored| stored.group))
    }

    /// Sweeps due entries in transactions of [`SWEEP_ALL_BATCH`] until none is left.
    fn sweep_all(&self) -> Result<SweepStats, FeatureStoreError> {
        const OPERATION: &str = "sweep";
        let mut total = SweepStats::default();
        loop {
            let now = self.clock.now_ms();
            let txn = self.write_txn(OPERATION)?;
            let round = {
                let mut features = txn.open_table(FEATURES).map_err(embedded(OPERATION))?;
                let mut history = txn.open_table(HISTORY).map_err(embedded(OPERATION))?;
                let mut expiry = txn.open_table(EXPIRY).map_err(embedded(OPERATION))?;
                sweep(
                    now,
                    SWEEP_ALL_BATCH,
                    &mut features,
                    &mut history,
                    &mut expiry,
                )?
            };
            if round.entries() == 0 {
                // Nothing changed; no need to commit (and fsync).
                txn.abort().map_err(embedded(OPERATION))?;
                return Ok(total);
            }
            txn.commit().map_err(embedded(OPERATION))?;
            total.add(round);
            if round.entries() < SWEEP_ALL_BATCH {
                return Ok(total);
            }
        }
    }

    fn stats(&self) -> Result<EmbeddedStats, FeatureStoreError> {
        const OPERATION: &str = "stats read";
        let txn = self.db.begin_read().map_err(embedded(OPERATION))?;
        let features = txn.open_table(FEATURES).map_err(embedded(OPERATION))?;
        let mut stats = EmbeddedStats::default();
        for entry in features.iter().map_err(embedded(OPERATION))? {
            let (key, value) = entry.map_err(embedded(OPERATION))?;
            if decode_feature(OPERATION, key.value(), value.value())?
                .values
                .is_some()
            {
                stats.features += 1;
            } else {
                stats.tombstones += 1;
            }
        }
        let len = |table: TableDefinition<&[u8], &[u8]>| -> Result<u64, FeatureStoreError> {
            txn.open_table(table)
                .map_err(embedded(OPERATION))?
                .len()
                .map_err(embedded(OPERATION))
        };
        stats.history_rows = len(HISTORY)?;
        stats.groups = len(GROUPS)?;
        stats.expiry_entries = txn
            .open_table(EXPIRY)
            .map_err(embedded(OPERATION))?
            .len()
            .map_err(embedded(OPERATION))?;
        Ok(stats)
    }
}

type BytesTable<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

/// Handles up to `limit` expiry entries due at `now` (see the module documentation).
/// What `update` (expiring at `expires_at_ms`) makes of the stored record `stored`: the record
/// to write, or `None` to leave it. A higher version replaces it; a lower one changes nothing;
/// the same version keeps the greater values and the later `updated_at`
/// ([`super::model::same_version_wins`]). A tombstone of the same version stays: the version
/// expired, and a late write of it does not bring it back.
fn merge(
    stored: StoredFeature,
    update: &FeatureUpdate,
    expires_at_ms: Option<u64>,
) -> Option<StoredFeature> {
    let incoming = || StoredFeature {
        version: update.version,
        updated_at_ms: update.updated_at_ms,
        expires_at_ms,
        values: Some(update.values.clone()),
    };
    if update.version > stored.version {
        return Some(incoming());
    }
    if update.version < stored.version {
        return None;
    }
    let values = stored.values.as_ref()?;
    let updated_at_ms = stored.updated_at_ms.max(update.updated_at_ms);
    if super::model::same_version_wins(&update.values, values) {
        Some(StoredFeature {
            updated_at_ms,
            ..incoming()
        })
    } else if updated_at_ms > stored.updated_at_ms {
        Some(StoredFeature {
            updated_at_ms,
            ..stored
        })
    } else {
        None
    }
}

fn sweep<'txn>(
    now: u64,
    limit: usize,
    features: &mut BytesTable<'txn>,
    history: &mut BytesTable<'txn>,
    expiry: &mut redb::Table<'txn, &'static [u8], ()>,
) -> Result<SweepStats, FeatureStoreError> {
    const OPERATION: &str = "sweep";
    // Entries due at `now` or earlier sort before the 8 bytes of `now + 1`.
    let end = now.saturating_add(1).to_be_bytes();
    let due: Vec<Vec<u8>> = expiry
        .range::<&[u8]>(..end.as_slice())
        .map_err(embedded(OPERATION))?
        .take(limit)
        .map(|entry| entry.map(|(k, _)| k.value().to_vec()))
        .collect::<Result<_, _>>()
        .map_err(embedded(OPERATION))?;
    let mut stats = SweepStats::default();
    for entry in due {
        expiry
            .remove(entry.as_slice())
            .map_err(embedded(OPERATION))?;
        let Some((due_ms, kind, key)) = split_expiry_key(&entry) else {
            tracing::warn!("feature store: dropping a malformed expiry entry");
            stats.stale += 1;
            continue;
        };
        let table = match kind {
            KIND_FEATURE => &mut *features,
            KIND_HISTORY => &mut *history,
            _ => {
                tracing::warn!(
                    kind,
                    "feature store: dropping an expiry entry of unknown kind"
                );
                stats.stale += 1;
                continue;
            }
        };
        let record = table
            .get(key)
            .map_err(embedded(OPERATION))?
            .map(|v| decode_feature(OPERATION, key, v.value()))
            .transpose()?;
        let Some(record) = record else {
            stats.stale += 1;
            continue;
        };
        let Some(expires_at) = record.expires_at_ms else {
            stats.stale += 1;
            continue;
        };
        let purge_at = expires_at.saturating_add(TOMBSTONE_GRACE_SECS * 1000);
        match kind {
            KIND_HISTORY if expires_at == due_ms => {
                table.remove(key).map_err(embedded(OPERATION))?;
                stats.deleted += 1;
            }
            KIND_FEATURE if (expires_at == due_ms || purge_at == due_ms) && purge_at <= now => {
                table.remove(key).map_err(embedded(OPERATION))?;
                stats.deleted += 1;
            }
            KIND_FEATURE if expires_at == due_ms && record.values.is_some() => {
                let tombstone = StoredFeature {
                    values: None,
                    ..record
                };
                table
                    .insert(key, encode(&tombstone).as_slice())
                    .map_err(embedded(OPERATION))?;
                expiry
                    .insert(expiry_key(purge_at, KIND_FEATURE, key).as_slice(), ())
                    .map_err(embedded(OPERATION))?;
                stats.tombstoned += 1;
            }
            _ => stats.stale += 1,
        }
    }
    Ok(stats)
}

/// Reads and decodes one current value at `now`.
fn read_feature(
    operation: &'static str,
    features: &impl ReadableTable<&'static [u8], &'static [u8]>,
    entity_type: &str,
    entity_id: &str,
    name: &str,
    now: u64,
) -> Result<Option<Feature>, FeatureStoreError> {
    let key = feature_key(entity_type, entity_id, name);
    let stored = features
        .get(key.as_slice())
        .map_err(embedded(operation))?
        .map(|v| decode_feature(operation, &key, v.value()))
        .transpose()?;
    Ok(stored.and_then(|s| s.read(entity_type, entity_id, name, now)))
}

/// Appends `part(s)`: the length as a big-endian `u32`, then the bytes.
fn push_part(out: &mut Vec<u8>, s: &str) {
    // Names are validated to at most MAX_KEY_BYTES (8 KiB) before they get here.
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The `features` key of a feature.
fn feature_key(entity_type: &str, entity_id: &str, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(12 + entity_type.len() + entity_id.len() + name.len() + 8);
    push_part(&mut key, entity_type);
    push_part(&mut key, entity_id);
    push_part(&mut key, name);
    key
}

/// The `feature_history` key of one version of the feature with `feature_key`.
fn history_key(feature_key: &[u8], version: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(feature_key.len() + 8);
    key.extend_from_slice(feature_key);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

/// The `feature_groups` key of one version of a group.
fn group_key(name: &str, version: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + name.len() + 4);
    push_part(&mut key, name);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

/// The `expiry` key of a record of `kind` with `key`, due at `due_ms`.
fn expiry_key(due_ms: u64, kind: u8, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + key.len());
    out.extend_from_slice(&due_ms.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(key);
    out
}

/// The due time, kind and record key of an `expiry` key.
fn split_expiry_key(entry: &[u8]) -> Option<(u64, u8, &[u8])> {
    let (due, rest) = entry.split_first_chunk::<8>()?;
    let (&kind, key) = rest.split_first()?;
    Some((u64::from_be_bytes(*due), kind, key))
}

/// The key's parts, for error messages (`?` for bytes that do not decode).
fn describe_key(key: &[u8]) -> String {
    let mut parts = Vec::new();
    let mut rest = key;
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            break;
        }
        parts.push(String::from_utf8_lossy(&tail[..len]).into_owned());
        rest = &tail[len..];
    }
    if parts.is_empty() {
        "?".to_owned()
    } else {
        parts.join("/")
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Maps with string keys and plain structs always serialise.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode_feature(
    operation: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<StoredFeature, FeatureStoreError> {
    serde_json::from_slice(bytes).map_err(|e| {
        FeatureStoreError::decode(
            operation,
            format!(
                "the stored feature {} does not decode: {e}",
                describe_key(key)
            ),
        )
    })
}

fn decode_group(
    operation: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<StoredGroup, FeatureStoreError> {
    serde_json::from_slice(bytes).map_err(|e| {
        FeatureStoreError::decode(
            operation,
            format!(
                "the stored group {} does not decode: {e}",
                describe_key(key)
            ),
        )
    })
}

/// Maps a redb error of `operation` to [`FeatureStoreError::Embedded`].
fn embedded<E: Into<redb::Error>>(operation: &'static str) -> impl Fn(E) -> FeatureStoreError {
    move |e| FeatureStoreError::embedded(operation, e.into())
}

/// Why the database could not be opened, with what to do about it.
fn describe_open_error(err: redb::DatabaseError) -> String {
    match err {
        redb::DatabaseError::DatabaseAlreadyOpen => "the file is already open in another process (or twice in this one); the embedded backend serves one process at a time: stop the other one, or use the scylla backend to share features".to_owned(),
        redb::DatabaseError::UpgradeRequired(version) => format!(
            "the file is in redb file format {version}, which this inferflow cannot read"
        ),
        redb::DatabaseError::Storage(redb::StorageError::Io(e)) => {
            format!("{e}; check feature_store.path and its permissions")
        }
        other => format!("{other}; is it a database written by inferflow?"),
    }
}

super::forward_backend!(EmbeddedBackend);

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use serde_json::json;

    use super::*;
    use crate::feature_store::FeatureBackend;

    const T0: u64 = 1_700_000_000_000;

    /// A backend on `path` whose clock is `clock`.
    async fn open_at(path: &Path, retention_secs: u64, clock: &Arc<AtomicU64>) -> EmbeddedBackend {
        let (path, clock) = (path.to_owned(), Clock::Manual(Arc::clone(clock)));
        let inner = run_blocking("open", move || Inner::open(path, retention_secs, clock))
            .await
            .expect("open");
        EmbeddedBackend {
            inner: Arc::new(inner),
        }
    }

    fn update(name: &str, version: u64) -> FeatureUpdate {
        let values = json!({ "v": version }).as_object().unwrap().clone();
        FeatureUpdate {
            updated_at_ms: T0,
            ..FeatureUpdate::new("user", "u1", name, values, version)
        }
    }

    async fn version(backend: &EmbeddedBackend, name: &str) -> Option<u64> {
        backend
            .get_feature("user", "u1", name)
            .await
            .expect("read")
            .map(|f| f.version)
    }

    fn advance(clock: &AtomicU64, ms: u64) {
        clock.fetch_add(ms, Ordering::SeqCst);
    }

    #[test]
    fn keys_are_unambiguous_and_versions_sort_numerically() {
        assert_ne!(feature_key("ab", "c", "d"), feature_key("a", "bc", "d"));
        assert_ne!(feature_key("a", "b", "cd"), feature_key("a", "bc", "d"));
        let key = feature_key("user", "u1", "f");
        assert!(history_key(&key, 2) < history_key(&key, 10));
        assert!(history_key(&key, 255) < history_key(&key, 256));
        assert!(group_key("g", 9) < group_key("g", 10));
        // Another group whose name starts with the same letters is outside "g"'s range.
        let other = group_key("g2", 1);
        assert!(!(group_key("g", 0)..=group_key("g", u32::MAX)).contains(&other));
        assert!(expiry_key(999, KIND_HISTORY, &key) < expiry_key(1000, KIND_FEATURE, &key));
        assert_eq!(
            split_expiry_key(&expiry_key(1234, KIND_HISTORY, &key)),
            Some((1234, KIND_HISTORY, key.as_slice()))
        );
        assert_eq!(split_expiry_key(&[1, 2, 3]), None);
        assert_eq!(describe_key(&key), "user/u1/f");
    }

    #[tokio::test]
    async fn ttl_left_is_rounded_up_and_expiry_is_exact_to_the_millisecond() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        let backend = open_at(dir.path(), 0, &clock).await;
        backend
            .put_feature(&update("s", 1).with_ttl_secs(10))
            .await
            .unwrap();
        advance(&clock, 2_500);
        let feature = backend
            .get_feature("user", "u1", "s")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(feature.ttl_secs, Some(8), "7.5 s left, rounded up");
        advance(&clock, 7_499);
        assert_eq!(version(&backend, "s").await, Some(1), "1 ms left");
        advance(&clock, 1);
        assert_eq!(version(&backend, "s").await, None, "expired");
        assert_eq!(
            backend
                .get_feature_at_version("user", "u1", "s", 1)
                .await
                .unwrap(),
            None,
            "the history row ends with the feature's TTL"
        );
    }

    #[tokio::test]
    async fn an_expired_version_keeps_older_ones_out_until_its_tombstone_is_purged() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        let backend = open_at(dir.path(), 0, &clock).await;
        for name in ["e", "f"] {
            backend
                .put_feature(&update(name, 5).with_ttl_secs(10))
                .await
                .unwrap();
        }
        advance(&clock, 11_000);
        assert_eq!(version(&backend, "e").await, None);

        // A late, older write. It sweeps both expired values into tombstones, which still
        // outrank it.
        backend.put_feature(&update("e", 3)).await.unwrap();
        assert_eq!(version(&backend, "e").await, None);
        let stats = backend.stats().await.unwrap();
        assert_eq!(
            (stats.features, stats.tombstones, stats.history_rows),
            (0, 2, 1),
            "{stats:?}"
        );
        // Its history row was written, and is readable by version.
        let v3 = backend
            .get_feature_at_version("user", "u1", "e", 3)
            .await
            .unwrap()
            .expect("e@3 in the history");
        assert_eq!(v3.values["v"], 3);

        // A higher version replaces a tombstone at once.
        backend.put_feature(&update("f", 6)).await.unwrap();
        assert_eq!(version(&backend, "f").await, Some(6));

        advance(&clock, TOMBSTONE_GRACE_SECS * 1000);
        let swept = backend.sweep_expired().await.unwrap();
        assert_eq!(
            swept,
            SweepStats {
                tombstoned: 0,
                deleted: 1,
                stale: 1
            },
            "e's tombstone goes; f's purge entry is stale since f@6 replaced it"
        );
        backend.put_feature(&update("e", 3)).await.unwrap();
        assert_eq!(
            version(&backend, "e").await,
            Some(3),
            "after the grace period"
        );
        backend.put_feature(&update("e", 4)).await.unwrap();
        assert_eq!(version(&backend, "e").await, Some(4));
        let stats = backend.stats().await.unwrap();
        assert_eq!(
            (stats.features, stats.tombstones, stats.expiry_entries),
            (2, 0, 0),
            "{stats:?}"
        );
    }

    #[tokio::test]
    async fn history_retention_removes_old_versions_and_the_current_one_stays_readable() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        let backend = open_at(dir.path(), 60, &clock).await;
        for v in [1, 2] {
            backend.put_feature(&update("f", v)).await.unwrap();
        }
        assert_eq!(backend.stats().await.unwrap().history_rows, 2);
        advance(&clock, 60_000);
        let at = |v| backend.get_feature_at_version("user", "u1", "f", v);
        assert_eq!(at(1).await.unwrap(), None, "past the retention");
        assert_eq!(
            at(2).await.unwrap().map(|f| f.version),
            Some(2),
            "the current value is that version"
        );
        let swept = backend.sweep_expired().await.unwrap();
        assert_eq!(swept.deleted, 2);
        let stats = backend.stats().await.unwrap();
        assert_eq!(
            (stats.features, stats.history_rows, stats.expiry_entries),
            (1, 0, 0),
            "{stats:?}"
        );
    }

    #[tokio::test]
    async fn a_replaced_value_leaves_a_stale_index_entry_that_the_sweep_drops() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(T0));
        let backend = open_at(dir.path(), 0, &clock).await;
        backend
            .put_feature(&update("f", 1).with_ttl_secs(5))
            .await
            .unwrap();
        backend.put_feature(&update("f", 2)).await.unwrap();
        advance(&clock, 6_000);
        let swept = backend.sweep_expired().await.unwrap();
        assert_eq!(
            swept,
            SweepStats {
                tombstoned: 0,
                deleted: 1,
                stale: 1
            },
            "f@1's history row goes; f's index entry is stale"
        );
        assert_eq!(version(&backend, "f").await, Some(2));
        // A repeated version changes nothing, even with other values.
        let mut repeat = update("f", 2);
        repeat.values.insert("v".into(), json!("other"));
        backend.put_feature(&repeat).await.unwrap();
        let read = backend
            .get_feature("user", "u1", "f")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read.values["v"], 2);
    }

    #[tokio::test]
    async fn data_survives_reopening_and_the_file_is_locked_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/store.redb");
        let backend = EmbeddedBackend::open_path(&path, 0).await.unwrap();
        backend.put_feature(&update("f", 7)).await.unwrap();
        let group = FeatureGroup {
            name: "g".into(),
            version: 1,
            entity_type: "user".into(),
            features: vec!["f".into()],
            description: String::new(),
        };
        backend.create_feature_group(&group).await.unwrap();

        let err = EmbeddedBackend::open_path(&path, 0).await.unwrap_err();
        assert!(
            matches!(err, FeatureStoreError::EmbeddedOpen { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("already open"), "{err}");

        drop(backend);
        let reopened = EmbeddedBackend::open_path(&path, 0).await.unwrap();
        assert_eq!(version(&reopened, "f").await, Some(7));
        assert_eq!(
            reopened.get_feature_group("g", None).await.unwrap(),
            Some(group)
        );
        assert_eq!(reopened.path(), path);
    }

    #[tokio::test]
    async fn a_directory_path_holds_the_default_file() {
        let dir = tempfile::tempdir().unwrap();
        let backend = EmbeddedBackend::open_path(dir.path(), 0).await.unwrap();
        assert_eq!(backend.path(), dir.path().join(DEFAULT_FILE_NAME));
        assert!(dir.path().join(DEFAULT_FILE_NAME).is_file());
        let slash = dir.path().join("new");
        let backend = EmbeddedBackend::open_path(Path::new(&format!("{}/", slash.display())), 0)
            .await
            .unwrap();
        assert_eq!(backend.path(), slash.join(DEFAULT_FILE_NAME));
    }

    #[tokio::test]
    async fn foreign_files_and_other_layout_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.redb");
        std::fs::write(&junk, vec![7u8; 8192]).unwrap();
        let err = EmbeddedBackend::open_path(&junk, 0).await.unwrap_err();
        assert!(
            matches!(err, FeatureStoreError::EmbeddedOpen { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("junk.redb"), "{err}");

        let newer = dir.path().join("newer.redb");
        {
            let db = Database::create(&newer).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(FORMAT_KEY, FORMAT_VERSION + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = EmbeddedBackend::open_path(&newer, 0).await.unwrap_err();
        assert!(err.to_string().contains("layout version 2"), "{err}");
    }
}
