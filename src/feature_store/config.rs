//! `[feature_store]` and `[ingest]`: the backend (a CQL database or an embedded file), the cache
//! in front of it, and feature ingestion from Kafka. Every key is documented in
//! `config/default.toml`.

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::MAX_TTL_SECS;
use crate::batching::BatchConfig;
use crate::executor::ExecutorConfig;
use crate::kafka::{KafkaConfig, TopicsConfig};
use crate::secret::{Secret, SecretUrl};
use crate::section::{Problems, Section, check_host_port};

/// `[feature_store]`: the backend (a CQL database or an embedded file) and the cache in front
/// of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeatureStoreConfig {
    /// Where features are stored.
    pub backend: FeatureStoreBackend,
    /// The embedded database file (or a directory to hold it); used by the embedded backend.
    pub path: PathBuf,
    /// `host:port` contact points.
    pub contact_points: Vec<String>,
    /// Keyspace holding inferflow's tables.
    pub keyspace: String,
    /// Replication factor used when creating the keyspace.
    pub replication_factor: NonZeroUsize,
    /// Consistency level of reads and writes.
    pub consistency: Consistency,
    /// Create or migrate the schema at start-up.
    pub create_schema: bool,
    /// User name for password authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password (redacted when printed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Per-request timeout.
    pub request_timeout_ms: NonZeroU64,
    /// Time an entry stays in the in-process cache.
    pub cache_ttl_secs: NonZeroU64,
    /// Entries in the in-process cache at most.
    pub cache_max_entries: NonZeroUsize,
    /// How long old feature versions stay readable; 0 keeps them until deleted.
    pub history_retention_secs: u64,
    /// `[feature_store.postgres]`: the PostgreSQL backend.
    pub postgres: SqlConfig,
    /// `[feature_store.mysql]`: the MySQL (or MariaDB) backend.
    pub mysql: SqlConfig,
}

/// `[feature_store.postgres]` and `[feature_store.mysql]`: the DSN and the connection pool of a
/// SQL backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SqlConfig {
    /// The DSN, e.g. `postgres://user:password@host:5432/db`; its password is redacted when
    /// printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<SecretUrl>,
    /// Connections in the pool at most.
    pub max_connections: NonZeroU32,
    /// Longest wait for a connection: to open one, or for a free one from the pool.
    pub connect_timeout_ms: NonZeroU64,
}

/// `feature_store.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureStoreBackend {
    /// ScyllaDB, or any CQL database accepting the same CQL (`contact_points`, `keyspace`...).
    Scylla,
    /// One local redb file at `path`, for a single process.
    Embedded,
    /// PostgreSQL at `feature_store.postgres.url`.
    Postgres,
    /// MySQL or MariaDB at `feature_store.mysql.url`.
    Mysql,
}

impl FeatureStoreBackend {
    /// The backend's name in `feature_store.backend`.
    pub fn as_str(self) -> &'static str {
        match self {
            FeatureStoreBackend::Scylla => "scylla",
            FeatureStoreBackend::Embedded => "embedded",
            FeatureStoreBackend::Postgres => "postgres",
            FeatureStoreBackend::Mysql => "mysql",
        }
    }
}

/// The longest TTL CQL accepts (20 years, on ScyllaDB and Cassandra alike): [`MAX_TTL_SECS`].
const MAX_CQL_TTL_SECS: u64 = MAX_TTL_SECS as u64;

/// CQL consistency levels inferflow accepts (all of them valid on ScyllaDB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// One replica.
    One,
    /// One replica in the local data centre.
    LocalOne,
    /// A majority of replicas.
    Quorum,
    /// A majority of replicas in the local data centre.
    LocalQuorum,
    /// Every replica.
    All,
}

impl Section for FeatureStoreConfig {
    fn validate(&self, p: &mut Problems) {
        match self.backend {
            // The CQL keys are ignored by the embedded backend, so they are not checked for it.
            FeatureStoreBackend::Scylla => self.validate_cql(p),
            FeatureStoreBackend::Embedded => self.validate_path(p),
            FeatureStoreBackend::Postgres => validate_sql(
                &self.postgres,
                "feature_store.postgres",
                &["postgres", "postgresql"],
                p,
            ),
            FeatureStoreBackend::Mysql => {
                validate_sql(&self.mysql, "feature_store.mysql", &["mysql", "mariadb"], p)
            }
        }
        if self.history_retention_secs > MAX_CQL_TTL_SECS {
            p.push(
                "feature_store.history_retention_secs",
                format!(
                    "{} is above the longest TTL CQL accepts ({MAX_CQL_TTL_SECS}, 20 years); use 0 to keep history until deleted",
                    self.history_retention_secs
                ),
            );
        }
    }
}

impl FeatureStoreConfig {
    /// The checks of the keys the scylla backend uses.
    fn validate_cql(&self, p: &mut Problems) {
        if self.contact_points.is_empty() {
            p.push(
                "feature_store.contact_points",
                "must name at least one host:port",
            );
        }
        for (i, point) in self.contact_points.iter().enumerate() {
            if let Err(why) = check_host_port(point) {
                p.push(
                    format!("feature_store.contact_points[{i}]"),
                    format!("`{point}`: {why}"),
                );
            }
        }
        let ks = &self.keyspace;
        let valid_keyspace = !ks.is_empty()
            && ks.len() <= 48
            && ks.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && ks.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
        if !valid_keyspace {
            p.push(
                "feature_store.keyspace",
                format!(
                    "`{ks}` is not a valid keyspace name: use 1 to 48 letters, digits or underscores, starting with a letter"
                ),
            );
        }
        if self.password.is_some() && self.username.is_none() {
            p.push(
                "feature_store.username",
                "required when feature_store.password is set",
            );
        }
    }

    /// The checks of `path`, which the embedded backend uses. Only its form is checked here;
    /// whether it can be opened is found out when the store opens it.
    fn validate_path(&self, p: &mut Problems) {
        let path = self.path.to_string_lossy();
        if path.trim().is_empty() {
            p.push(
                "feature_store.path",
                "must name the embedded database file (for example \"data/features.redb\") or a directory to hold it",
            );
        } else if path.contains('\0') {
            p.push("feature_store.path", "must not contain a NUL character");
        }
    }
}

/// The checks of a SQL backend's section `key`: a URL with one of `schemes`, and a pool of at
/// most 1000 connections. Whether the server answers is found out when the store opens.
fn validate_sql(cfg: &SqlConfig, key: &str, schemes: &[&str], p: &mut Problems) {
    let url_key = format!("{key}.url");
    match &cfg.url {
        None => p.push(
            url_key,
            format!(
                "required when feature_store.backend = \"{backend}\" (e.g. \"{scheme}://user:password@127.0.0.1/inferflow\"; prefer the environment variable INFERFLOW__{env}__URL)",
                backend = if schemes[0] == "postgres" { "postgres" } else { "mysql" },
                scheme = schemes[0],
                env = key.replace('.', "__").to_ascii_uppercase()
            ),
        ),
        Some(url) => {
            let scheme = url.expose().split_once("://").map(|(s, _)| s);
            if !scheme.is_some_and(|s| schemes.iter().any(|ok| s.eq_ignore_ascii_case(ok))) {
                p.push(
                    url_key,
                    format!(
                        "`{url}` is not a {} URL: it must start with {}",
                        schemes[0],
                        schemes
                            .iter()
                            .map(|s| format!("{s}://"))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ),
                );
            }
        }
    }
    if cfg.max_connections.get() > 1000 {
        p.push(
            format!("{key}.max_connections"),
            format!("{} is more than 1000", cfg.max_connections),
        );
    }
}

/// `[ingest]`: feature ingestion from `topics.features` into the feature store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngestConfig {
    /// Run ingestion in `inferflow run`.
    pub enabled: bool,
    /// Consumer group of feature ingestion (not the request processor's).
    pub group_id: String,
    /// Records per micro-batch at most.
    pub max_batch_records: NonZeroUsize,
    /// Longest time a batch waits for more records.
    pub linger_ms: u64,
    /// Batches written at the same time.
    pub max_in_flight_batches: NonZeroUsize,
    /// Updates consumed and not yet written; at it ingestion stops taking updates.
    pub max_in_flight_records: NonZeroUsize,
    /// Concurrent writes of one batch.
    pub write_concurrency: NonZeroUsize,
    /// Largest accepted update message.
    pub max_update_bytes: NonZeroUsize,
    /// First retry delay while the database is unavailable.
    pub retry_initial_backoff_ms: NonZeroU64,
    /// Longest retry delay while the database is unavailable.
    pub retry_max_backoff_ms: NonZeroU64,
}

impl Section for IngestConfig {}

/// The sections feature ingestion ([`super::ingest::start`]) reads: its own `[ingest]`, the
/// brokers and topics, and the limits it shares with the request processor
/// (`batch.max_bytes`, `executor.shutdown_timeout_ms`).
#[derive(Debug, Clone, Copy)]
pub struct IngestSections<'a> {
    /// `[kafka]`
    pub kafka: &'a KafkaConfig,
    /// `[topics]`
    pub topics: &'a TopicsConfig,
    /// `[ingest]`
    pub ingest: &'a IngestConfig,
    /// `[batch]`
    pub batch: &'a BatchConfig,
    /// `[executor]`
    pub executor: &'a ExecutorConfig,
}
