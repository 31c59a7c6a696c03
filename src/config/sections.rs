//! The section only the application uses (`[processing]`), and [`Config`], the
//! aggregate of every section, with the checks across sections.
//!
//! The components' sections are defined by the components themselves (`kafka::KafkaConfig`,
//! `feature_store::FeatureStoreConfig`...). Every struct mirrors a table of
//! `config/default.toml`, where each key is documented. Values that can be checked by their type
//! are (`NonZero*`, enums); the rest are checked by the `validate` method of the section
//! ([`Section`]), which pushes every problem it finds with its key path.

use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};

use crate::access::HttpConfig;
use crate::batching::BatchConfig;
use crate::executor::ExecutorConfig;
use crate::feature_store::{
    FeatureStoreBackend, FeatureStoreConfig, IngestConfig, IngestSections, MAX_TTL_SECS,
};
use crate::kafka::{KafkaConfig, TopicsConfig};
use crate::pipeline::PipelinesConfig;
use crate::providers::cache::ResultCacheConfig;
use crate::providers::{ModelsConfig, ProvidersConfig, RoutesConfig};
use crate::replay::{ReplayConfig, ReplayStoreKind};
use crate::section::{Problems, Section};
use crate::telemetry::LogConfig;
use crate::tracing_otel::TracingConfig;

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
        if let Some(id) = &self.transactional_id
            && id.trim().is_empty()
        {
            p.push(
                "processing.transactional_id",
                "must not be empty; remove the key to derive it",
            );
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
    pub providers: ProvidersConfig,
    /// `[models."name@version"]`
    pub models: ModelsConfig,
    /// `[routes.NAME]`
    pub routes: RoutesConfig,
    /// `[result_cache]`
    pub result_cache: ResultCacheConfig,
    /// `[pipelines]`
    pub pipelines: PipelinesConfig,
    /// `[http]`
    pub http: HttpConfig,
    /// `[log]`
    pub log: LogConfig,
    /// `[tracing]`
    pub tracing: TracingConfig,
}

impl<'a> From<&'a Config> for IngestSections<'a> {
    fn from(config: &'a Config) -> Self {
        IngestSections {
            kafka: &config.kafka,
            topics: &config.topics,
            ingest: &config.ingest,
            batch: &config.batch,
            executor: &config.executor,
        }
    }
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
            && self.replay.ttl_secs.get() > u64::from(MAX_TTL_SECS)
        {
            p.push(
                "replay.ttl_secs",
                format!(
                    "{} is above the largest CQL TTL, {MAX_TTL_SECS} s (20 years)",
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
