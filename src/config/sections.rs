//! The configuration sections, one struct each, with their own checks.
//!
//! Every struct mirrors a table of `config/default.toml`, where each key is documented. Values
//! that can be checked by their type are (`NonZero*`, enums); the rest are checked by the
//! `validate` method of the section, which pushes every problem it finds with its key path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::Problems;
use super::secret::Secret;

/// A top-level table of the configuration.
pub(crate) trait Section: DeserializeOwned {
    /// Checks what the types cannot express, pushing every problem with its key path.
    fn validate(&self, _problems: &mut Problems) {}
}

impl Section for BatchConfig {}
impl Section for ExecutorConfig {}
impl Section for IngestConfig {}
impl Section for ReplayConfig {}

/// `[kafka]`: how to reach the brokers and how the processor's consumer behaves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Consumer group of the request processor.
    pub group_id: String,
    /// Client id reported to the brokers.
    pub client_id: String,
    /// Where a new group starts reading.
    pub auto_offset_reset: OffsetReset,
    /// librdkafka `session.timeout.ms`.
    pub session_timeout_ms: NonZeroU64,
    /// librdkafka `group.instance.id` (static membership).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_instance_id: Option<String>,
    /// librdkafka `max.poll.interval.ms`.
    pub max_poll_interval_ms: NonZeroU64,
    /// librdkafka `security.protocol`.
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism, required with the `sasl_*` protocols.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_username: Option<String>,
    /// SASL password (redacted when printed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_password: Option<Secret>,
    /// CA certificate file used to verify the brokers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_ca_location: Option<String>,
    /// librdkafka `queued.max.messages.kbytes` of the request consumer.
    pub consumer_queue_kbytes: NonZeroUsize,
    /// librdkafka `statistics.interval.ms`; 0 disables statistics.
    pub statistics_interval_ms: u64,
    /// librdkafka `auto.commit.interval.ms`.
    pub commit_interval_ms: NonZeroU64,
    /// Time given to in-flight work of revoked partitions.
    pub rebalance_drain_timeout_ms: u64,
    /// librdkafka `linger.ms` of every producer (results, dead letters, transactions).
    pub producer_linger_ms: u64,
    /// Further librdkafka properties, passed through.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

/// librdkafka `auto.offset.reset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetReset {
    /// Start from the oldest retained message.
    Earliest,
    /// Start from the next message produced.
    Latest,
}

impl OffsetReset {
    /// The librdkafka spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

/// librdkafka `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    Plaintext,
    /// TLS without SASL.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// librdkafka `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    /// User name and password in clear (use with TLS).
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// librdkafka properties that `kafka.extra` may not set: inferflow sets them itself, either from
/// its own keys or because the at-least-once guarantee depends on them.
pub const RESERVED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "group.instance.id",
    "client.id",
    "enable.auto.offset.store",
    "enable.auto.commit",
    "auto.offset.reset",
    "session.timeout.ms",
    "max.poll.interval.ms",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "enable.partition.eof",
    "queued.max.messages.kbytes",
    "statistics.interval.ms",
    "partition.assignment.strategy",
    "auto.commit.interval.ms",
    "transactional.id",
    "transaction.timeout.ms",
    "isolation.level",
    "linger.ms",
    "queue.buffering.max.ms",
];

/// librdkafka's largest `linger.ms`.
const MAX_LINGER_MS: u64 = 900_000;

impl Section for KafkaConfig {
    fn validate(&self, p: &mut Problems) {
        let servers: Vec<&str> = self.bootstrap_servers.split(',').map(str::trim).collect();
        if servers.iter().all(|s| s.is_empty()) {
            p.push(
                "kafka.bootstrap_servers",
                "must name at least one broker as host:port",
            );
        }
        for server in servers.iter().filter(|s| !s.is_empty()) {
            if let Err(why) = check_host_port(server) {
                p.push("kafka.bootstrap_servers", format!("`{server}`: {why}"));
            }
        }
        if self.group_id.trim().is_empty() {
            p.push("kafka.group_id", "must not be empty");
        }
        if self.client_id.trim().is_empty() {
            p.push("kafka.client_id", "must not be empty");
        }
        if let Some(id) = &self.group_instance_id {
            if id.trim().is_empty() {
                p.push(
                    "kafka.group_instance_id",
                    "must not be empty; remove the key for dynamic membership",
                );
            }
        }
        if self.session_timeout_ms.get() < 6000 {
            p.push(
                "kafka.session_timeout_ms",
                format!(
                    "{} is below the brokers' default group.min.session.timeout.ms (6000); the group coordinator would refuse to join",
                    self.session_timeout_ms
                ),
            );
        }
        if self.session_timeout_ms >= self.max_poll_interval_ms {
            p.push(
                "kafka.session_timeout_ms",
                format!(
                    "{} must be lower than kafka.max_poll_interval_ms ({})",
                    self.session_timeout_ms, self.max_poll_interval_ms
                ),
            );
        }
        if self.security_protocol.uses_sasl() {
            if self.sasl_mechanism.is_none() {
                p.push(
                    "kafka.sasl_mechanism",
                    format!(
                        "required when kafka.security_protocol is \"{}\"",
                        self.security_protocol.as_str()
                    ),
                );
            }
            if self.sasl_username.as_deref().is_none_or(str::is_empty) {
                p.push(
                    "kafka.sasl_username",
                    "required with a SASL security_protocol",
                );
            }
            if self.sasl_password.as_ref().is_none_or(Secret::is_empty) {
                p.push(
                    "kafka.sasl_password",
                    "required with a SASL security_protocol (set INFERFLOW__KAFKA__SASL_PASSWORD)",
                );
            }
        } else if self.sasl_mechanism.is_some()
            || self.sasl_username.is_some()
            || self.sasl_password.is_some()
        {
            p.push(
                "kafka.security_protocol",
                "SASL settings are given but the protocol is not sasl_plaintext or sasl_ssl",
            );
        }
        if self.producer_linger_ms > MAX_LINGER_MS {
            p.push(
                "kafka.producer_linger_ms",
                format!(
                    "{} is above librdkafka's largest linger.ms ({MAX_LINGER_MS})",
                    self.producer_linger_ms
                ),
            );
        }
        for key in self.extra.keys() {
            if RESERVED_KAFKA_PROPERTIES.contains(&key.as_str()) {
                let instead = match key.as_str() {
                    "linger.ms" | "queue.buffering.max.ms" => "; set kafka.producer_linger_ms",
                    _ => "",
                };
                p.push(
                    format!("kafka.extra.\"{key}\""),
                    format!("is set by inferflow itself and cannot be overridden here{instead}"),
                );
            }
        }
    }
}

/// `[topics]`: the topic names inferflow reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicsConfig {
    /// Inference requests.
    pub requests: String,
    /// Feature updates.
    pub features: String,
    /// Default results topic.
    pub results: String,
    /// Dead-letter topic.
    pub dlq: String,
    /// Cache invalidations between instances; empty turns them off.
    pub feature_invalidations: String,
    /// Topics a request may name in `reply_to`.
    #[serde(default)]
    pub reply_to_allowed: Vec<String>,
    /// Create missing topics at start-up.
    pub create_missing: bool,
    /// Partitions of created topics.
    pub create_partitions: NonZeroUsize,
    /// Replication factor of created topics.
    pub create_replication_factor: NonZeroUsize,
}

impl Section for TopicsConfig {
    fn validate(&self, p: &mut Problems) {
        for (key, name) in [
            ("topics.requests", &self.requests),
            ("topics.features", &self.features),
            ("topics.results", &self.results),
            ("topics.dlq", &self.dlq),
        ] {
            if let Err(why) = check_topic_name(name) {
                p.push(key, why);
            }
        }
        if !self.feature_invalidations.is_empty() {
            if let Err(why) = check_topic_name(&self.feature_invalidations) {
                p.push("topics.feature_invalidations", why);
            }
        }
        if self.features == self.requests {
            p.push(
                "topics.features",
                "must differ from topics.requests: feature updates and requests are consumed by different groups",
            );
        }
        for (i, name) in self.reply_to_allowed.iter().enumerate() {
            if let Err(why) = check_topic_name(name) {
                p.push(format!("topics.reply_to_allowed[{i}]"), why);
            }
        }
        if i32::try_from(self.create_partitions.get()).is_err() {
            p.push("topics.create_partitions", "is too large");
        }
        if self.requests == self.results || self.requests == self.dlq {
            p.push(
                "topics.requests",
                "must differ from topics.results and topics.dlq, or inferflow would consume its own output",
            );
        }
    }
}

/// `[batch]`: when a micro-batch is closed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchConfig {
    /// Records per batch at most.
    pub max_records: NonZeroUsize,
    /// Bytes of message values per batch at most.
    pub max_bytes: NonZeroUsize,
    /// Time from a batch's first record to its flush.
    pub linger_ms: u64,
}

/// `[executor]`: how much work is in flight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutorConfig {
    /// Batches processed concurrently.
    pub max_in_flight_batches: NonZeroUsize,
    /// Records consumed but not yet answered; at it the consumer stops taking records.
    pub max_in_flight_records: NonZeroUsize,
    /// Largest accepted message value.
    pub max_request_bytes: NonZeroUsize,
    /// Longest time a batch may spend in the executor.
    pub execute_timeout_ms: NonZeroU64,
    /// Time to drain and commit on shutdown.
    pub shutdown_timeout_ms: NonZeroU64,
    /// Whether records with the same Kafka key run in order.
    pub ordering: KeyOrdering,
}

/// `executor.ordering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyOrdering {
    /// Batches run concurrently; records of one key may finish in any order.
    Unordered,
    /// Records with the same key run one after another, in consumption order; different keys
    /// still run concurrently (in `executor.max_in_flight_batches` lanes).
    PerKey,
}

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
}

/// `feature_store.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureStoreBackend {
    /// ScyllaDB, or any CQL database accepting the same CQL (`contact_points`, `keyspace`...).
    Scylla,
    /// One local redb file at `path`, for a single process.
    Embedded,
}

/// The longest TTL CQL accepts (20 years, on ScyllaDB and Cassandra alike); the same limit as
/// `feature_store::MAX_TTL_SECS`, repeated so configuration does not depend on the store.
const MAX_CQL_TTL_SECS: u64 = 630_720_000;

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

/// `[pipelines]`: where pipeline files live and whether to watch them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelinesConfig {
    /// Directory of `*.toml` pipeline files (relative to the working directory). Empty (the
    /// default) or a missing directory: no pipeline files, only the built-in `identity`.
    pub dir: String,
    /// Also reload when a pipeline file or the configuration file changes (polled), besides
    /// on SIGHUP.
    pub watch: bool,
    /// How often the watch looks, milliseconds.
    pub watch_interval_ms: u64,
}

impl PipelinesConfig {
    /// The watch interval.
    pub fn watch_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.watch_interval_ms)
    }

    /// Loads the definitions in [`dir`](Self::dir).
    pub fn load(&self) -> Result<Vec<crate::pipeline::PipelineDef>, super::ConfigErrors> {
        if self.dir.trim().is_empty() {
            return Ok(Vec::new());
        }
        crate::pipeline::load_dir(std::path::Path::new(&self.dir)).map_err(super::ConfigErrors)
    }
}

impl Section for PipelinesConfig {
    fn validate(&self, p: &mut Problems) {
        if self.watch_interval_ms < 100 {
            p.push("pipelines.watch_interval_ms", "must be at least 100");
        }
    }
}

/// `[processing]`: the delivery guarantee of the request processor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessingConfig {
    /// At least once (offsets committed after outputs are acknowledged) or exactly once
    /// (outputs and offsets committed in one Kafka transaction).
    pub guarantee: Guarantee,
    /// librdkafka `transactional.id` in exactly-once mode; derived when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transactional_id: Option<String>,
    /// librdkafka `transaction.timeout.ms` in exactly-once mode.
    pub transaction_timeout_ms: NonZeroU64,
}

/// `processing.guarantee`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Outputs are acknowledged before offsets are stored; a crash can repeat outputs.
    AtLeastOnce,
    /// Outputs and offsets are committed in one Kafka transaction; a `read_committed`
    /// consumer sees each output once.
    ExactlyOnce,
}

/// The broker's default `transaction.max.timeout.ms` (15 minutes): a producer asking for a
/// longer transaction timeout is refused.
const MAX_TRANSACTION_TIMEOUT_MS: u64 = 900_000;

impl Section for ProcessingConfig {
    fn validate(&self, p: &mut Problems) {
        if let Some(id) = &self.transactional_id {
            if id.trim().is_empty() {
                p.push(
                    "processing.transactional_id",
                    "must not be empty; remove the key to derive it",
                );
            }
        }
        let timeout = self.transaction_timeout_ms.get();
        if !(1000..=MAX_TRANSACTION_TIMEOUT_MS).contains(&timeout) {
            p.push(
                "processing.transaction_timeout_ms",
                format!(
                    "{timeout} is outside 1000..={MAX_TRANSACTION_TIMEOUT_MS} (the brokers' default transaction.max.timeout.ms)"
                ),
            );
        }
    }
}

impl ProcessingConfig {
    /// The transactional id of this instance: `transactional_id` when set, else
    /// `{group_id}-{group_instance_id}` with static membership (stable across restarts, so a
    /// restart fences its predecessor at once), else `{group_id}-{client_id}-` plus a random
    /// suffix (unique, so instances never fence each other; a crashed instance's open
    /// transaction is then aborted by the broker after `transaction_timeout_ms`).
    pub fn transactional_id_for(&self, kafka: &KafkaConfig) -> String {
        if let Some(id) = &self.transactional_id {
            return id.clone();
        }
        match &kafka.group_instance_id {
            Some(instance) => format!("{}-{instance}", kafka.group_id),
            None => {
                let suffix = uuid::Uuid::new_v4().simple().to_string();
                format!("{}-{}-{}", kafka.group_id, kafka.client_id, &suffix[..12])
            }
        }
    }
}

/// `[replay]`: results kept by request id, so a redelivered request is answered again without
/// calling its model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayConfig {
    /// Keep results and reuse them for redelivered requests.
    pub enabled: bool,
    /// Results kept in process at most (least recently used go first).
    pub max_entries: NonZeroU64,
    /// How long a result is kept after it was computed (in process and in the database).
    pub ttl_secs: NonZeroU64,
    /// Where results are kept besides this process.
    pub store: ReplayStoreKind,
    /// With `store = "cql"`: result writes in flight at most; beyond that a result is not
    /// stored (counted in `inferflow_replay_writes_total{outcome="skipped"}`).
    pub max_pending_writes: NonZeroUsize,
}

/// Where [`ReplayConfig`] keeps results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayStoreKind {
    /// In process only: covers rebalances back to the same instance and aborted transactions.
    Memory,
    /// Also in the feature store's CQL database: covers crashes and partitions moved to
    /// another instance too.
    Cql,
}

/// `[http]`: the HTTP server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpConfig {
    /// Listen address, `ip:port`.
    pub listen: String,
    /// Inference requests over HTTP running at once; more are answered 429 at once.
    pub max_in_flight_requests: NonZeroUsize,
}

impl Section for HttpConfig {
    fn validate(&self, p: &mut Problems) {
        if self.listen.parse::<SocketAddr>().is_err() {
            p.push(
                "http.listen",
                format!(
                    "`{}` is not an ip:port address (for example 0.0.0.0:8080)",
                    self.listen
                ),
            );
        }
    }
}

/// `[log]`: logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogConfig {
    /// tracing-subscriber filter directive.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Section for LogConfig {
    fn validate(&self, p: &mut Problems) {
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            p.push(
                "log.level",
                format!("`{}` is not a valid filter: {err}", self.level),
            );
        }
    }
}

/// The whole configuration, checked: build it with [`super::Config::load`].
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// `[kafka]`
    pub kafka: KafkaConfig,
    /// `[topics]`
    pub topics: TopicsConfig,
    /// `[batch]`
    pub batch: BatchConfig,
    /// `[executor]`
    pub executor: ExecutorConfig,
    /// `[feature_store]`
    pub feature_store: FeatureStoreConfig,
    /// `[ingest]`
    pub ingest: IngestConfig,
    /// `[processing]`
    pub processing: ProcessingConfig,
    /// `[replay]`
    pub replay: ReplayConfig,
    /// `[providers.NAME]`
    pub providers: super::ProvidersConfig,
    /// `[models."name@version"]`
    pub models: super::ModelsConfig,
    /// `[result_cache]`
    pub result_cache: crate::providers::cache::ResultCacheConfig,
    /// `[pipelines]`
    pub pipelines: PipelinesConfig,
    /// `[http]`
    pub http: HttpConfig,
    /// `[log]`
    pub log: LogConfig,
}

impl Config {
    /// Checks values of different sections against each other. Each section's own checks ran
    /// when it was parsed ([`Section::validate`]).
    pub(super) fn validate_across_sections(&self, p: &mut Problems) {
        if self.replay.enabled
            && self.replay.store == ReplayStoreKind::Cql
            && self.feature_store.backend != FeatureStoreBackend::Scylla
        {
            p.push(
                "replay.store",
                "\"cql\" keeps results in the feature store's CQL database, so it needs feature_store.backend = \"scylla\" (use \"memory\" with the embedded backend)",
            );
        }
        if self.replay.store == ReplayStoreKind::Cql
            && self.replay.ttl_secs.get() > MAX_CQL_TTL_SECS
        {
            p.push(
                "replay.ttl_secs",
                format!(
                    "{} is above the largest CQL TTL, {MAX_CQL_TTL_SECS} s (20 years)",
                    self.replay.ttl_secs
                ),
            );
        }
        if self.batch.linger_ms.saturating_mul(2) >= self.kafka.max_poll_interval_ms.get() {
            p.push(
                "batch.linger_ms",
                format!(
                    "{} is too close to kafka.max_poll_interval_ms ({}); keep it below half of it",
                    self.batch.linger_ms, self.kafka.max_poll_interval_ms
                ),
            );
        }
        if self.kafka.rebalance_drain_timeout_ms >= self.kafka.max_poll_interval_ms.get() {
            p.push(
                "kafka.rebalance_drain_timeout_ms",
                format!(
                    "{} must be lower than kafka.max_poll_interval_ms ({}): the consumer does not poll while it drains",
                    self.kafka.rebalance_drain_timeout_ms, self.kafka.max_poll_interval_ms
                ),
            );
        }
        if self.ingest.max_in_flight_records < self.ingest.max_batch_records {
            p.push(
                "ingest.max_in_flight_records",
                format!(
                    "{} is lower than ingest.max_batch_records ({}); a full batch could never be admitted",
                    self.ingest.max_in_flight_records, self.ingest.max_batch_records
                ),
            );
        }
        if self.ingest.retry_initial_backoff_ms > self.ingest.retry_max_backoff_ms {
            p.push(
                "ingest.retry_initial_backoff_ms",
                format!(
                    "{} is above ingest.retry_max_backoff_ms ({})",
                    self.ingest.retry_initial_backoff_ms, self.ingest.retry_max_backoff_ms
                ),
            );
        }
        if self.ingest.group_id == self.kafka.group_id {
            p.push(
                "ingest.group_id",
                format!(
                    "`{}` is also kafka.group_id; ingestion needs a consumer group of its own",
                    self.ingest.group_id
                ),
            );
        }
        if self.processing.guarantee == Guarantee::ExactlyOnce
            && self.kafka.commit_interval_ms.get() >= self.processing.transaction_timeout_ms.get()
        {
            p.push(
                "kafka.commit_interval_ms",
                format!(
                    "{} must be lower than processing.transaction_timeout_ms ({}): in exactly-once mode a transaction is committed every commit interval",
                    self.kafka.commit_interval_ms, self.processing.transaction_timeout_ms
                ),
            );
        }
        if self.processing.guarantee == Guarantee::ExactlyOnce {
            self.validate_commit_deadline(p);
        }
        if self.executor.max_in_flight_records < self.batch.max_records {
            p.push(
                "executor.max_in_flight_records",
                format!(
                    "{} is lower than batch.max_records ({}); a full batch could never be admitted",
                    self.executor.max_in_flight_records, self.batch.max_records
                ),
            );
        }
    }
}

impl Config {
    /// In exactly-once mode: whether a commit can last the transaction timeout the broker
    /// allows it and still end within half of `kafka.max_poll_interval_ms` (see
    /// `kafka::transactional::commit_window`).
    fn validate_commit_deadline(&self, p: &mut Problems) {
        use std::time::Duration;
        let timeout = Duration::from_millis(self.processing.transaction_timeout_ms.get());
        let max_poll = Duration::from_millis(self.kafka.max_poll_interval_ms.get());
        if crate::kafka::transactional::commit_window(timeout, max_poll) < timeout {
            p.push(
                "processing.transaction_timeout_ms",
                format!(
                    "{} is above half of kafka.max_poll_interval_ms ({}): in exactly-once mode a commit, with its retries, may last this long, on the consumer thread, which does not poll meanwhile and would be evicted from its group; lower it to at most {} or raise kafka.max_poll_interval_ms to at least {}",
                    self.processing.transaction_timeout_ms,
                    self.kafka.max_poll_interval_ms,
                    self.kafka.max_poll_interval_ms.get() / 2,
                    self.processing.transaction_timeout_ms.get().saturating_mul(2),
                ),
            );
        }
    }
}

/// Checks a `host:port` pair: a non-empty host and a port number.
fn check_host_port(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("expected host:port".to_owned());
    };
    if host.is_empty() {
        return Err("the host is empty".to_owned());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{port}` is not a port number")),
    }
}

/// Checks a Kafka topic name: 1 to 249 characters from `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a topic name must not be empty".to_owned());
    }
    if name.len() > 249 {
        return Err(format!(
            "a topic name has at most 249 characters, this one has {}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("`{name}` is not a valid topic name"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "`{name}` contains `{bad}`; topic names use only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}
