//! Cache coherence between instances: invalidations over a Kafka topic.
//!
//! Every instance caches features in process ([`super::FeatureStore`]). When one instance
//! writes updates, the others' caches may hold older values. So after a batch of updates is
//! written, the writer [`Publisher::publish`]es their keys and versions on
//! `topics.feature_invalidations`, and every instance runs a [`listen`]er that reads that topic
//! from its end (outside any consumer group, committing nothing) and drops cached values
//! *older* than the announced versions ([`super::FeatureStore::invalidate_older`]). The writer's
//! own write-through entry has the announced version, so it survives its own announcement.
//!
//! The announcement is made after the write succeeded, so a reader that misses after dropping
//! the entry reads the new value; a read that was already on its way to the database when the
//! announcement arrived does not put its older value back (the cache's fill tickets). The delay
//! from write to drop is one produce plus one fetch, typically well under 100 ms on a healthy
//! cluster; it is exported as `inferflow_feature_invalidation_delay_seconds`. If the topic is
//! unavailable, `feature_store.cache_ttl_secs` remains the bound.
//!
//! Message value (JSON): `{"origin": "<uuid of the writing process>", "written_at_ms": …,
//! "keys": [{"entity_type", "entity_id", "feature", "version"}, …]}`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::model::unix_now_ms;
use super::{FeatureStore, FeatureUpdate};
use crate::kafka::KafkaConfig;
use crate::kafka::sink::{DeliverError, OutRecord, Sink};
use crate::metrics as m;

/// Keys per invalidation message at most (about 100 bytes each).
const KEYS_PER_MESSAGE: usize = 1000;

/// One feature version announced as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidatedKey {
    /// The kind of entity.
    pub entity_type: String,
    /// The entity's id.
    pub entity_id: String,
    /// The feature's name.
    pub feature: String,
    /// The version written.
    pub version: u64,
}

impl InvalidatedKey {
    /// The key and version an update writes.
    pub fn of(update: &FeatureUpdate) -> Self {
        InvalidatedKey {
            entity_type: update.entity_type.clone(),
            entity_id: update.entity_id.clone(),
            feature: update.name.clone(),
            version: update.version,
        }
    }
}

/// One invalidation message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Invalidation {
    /// The writing process (for tracing where an announcement came from).
    pub origin: String,
    /// When the writes were acknowledged by the database, Unix milliseconds.
    pub written_at_ms: u64,
    /// The features written.
    pub keys: Vec<InvalidatedKey>,
}

/// This process's id in invalidation messages.
pub fn origin() -> &'static str {
    static ORIGIN: OnceLock<String> = OnceLock::new();
    ORIGIN.get_or_init(|| uuid::Uuid::new_v4().to_string())
}

/// Announces written features on the invalidation topic.
#[derive(Debug, Clone)]
pub struct Publisher {
    topic: String,
}

impl Publisher {
    /// A publisher on `topic`, or `None` when invalidations are off (empty topic name).
    pub fn new(topic: &str) -> Option<Self> {
        (!topic.is_empty()).then(|| Publisher {
            topic: topic.to_owned(),
        })
    }

    /// Announces `keys` and waits for the broker's acknowledgement.
    pub async fn publish(
        &self,
        sink: &Sink,
        keys: &[InvalidatedKey],
        abort: &CancellationToken,
    ) -> Result<(), DeliverError> {
        for chunk in keys.chunks(KEYS_PER_MESSAGE) {
            let message = Invalidation {
                origin: origin().to_owned(),
                written_at_ms: unix_now_ms(),
                keys: chunk.to_vec(),
            };
            let value = serde_json::to_vec(&message).unwrap_or_default();
            let record = OutRecord {
                topic: self.topic.clone(),
                key: Some(origin().as_bytes().to_vec()),
                value,
                headers: Vec::new(),
            };
            if let Err(err) = sink.deliver(&record, abort).await {
                if let DeliverError::Permanent(e) = &err {
                    tracing::warn!(error = %e, topic = %self.topic, "cache invalidation refused; other instances rely on the cache TTL for these keys");
                }
                return Err(err);
            }
        }
        Ok(())
    }
}

/// Applies invalidations from `topic` to `store` until `stop` is cancelled. Reads every
/// partition from its end, outside any consumer group.
pub async fn listen(
    kafka: &KafkaConfig,
    topic: String,
    store: Arc<FeatureStore>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer = crate::kafka::base_client_config(kafka)
        // librdkafka wants a group id even for manual assignment; it is never joined.
        .set("group.id", format!("inferflow-invalidations-{}", origin()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "100")
        .create()
        .context("creating the invalidation consumer")?;
    let consumer = Arc::new(consumer);
    // The topic may not exist yet (another instance creates it): wait for it.
    let partitions = loop {
        let c = Arc::clone(&consumer);
        let t = topic.clone();
        let found = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(Some(&t), Duration::from_secs(5))
                .map(|md| md.topics().first().map_or(0, |t| t.partitions().len()))
        })
        .await
        .context("reading the invalidation topic's metadata")?;
        match found {
            Ok(n) if n > 0 => break n,
            Ok(_) => tracing::info!(topic = %topic, "waiting for the invalidation topic to exist"),
            Err(err) => {
                tracing::warn!(error = %err, topic = %topic, "cannot read the invalidation topic's metadata; retrying")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stop.cancelled() => return Ok(()),
        }
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(&topic, p as i32, Offset::End)
            .context("building the invalidation assignment")?;
    }
    consumer
        .assign(&tpl)
        .context("assigning the invalidation topic")?;
    tracing::info!(topic = %topic, partitions, "listening for feature-cache invalidations");
    loop {
        let message = tokio::select! {
            m = consumer.recv() => m,
            () = stop.cancelled() => return Ok(()),
        };
        let message = match message {
            Ok(m) => m,
            Err(err) => {
                tracing::warn!(error = %err, "invalidation consumer error");
                continue;
            }
        };
        let Some(payload) = message.payload() else {
            continue;
        };
        match serde_json::from_slice::<Invalidation>(payload) {
            Ok(invalidation) => apply(&store, &invalidation),
            Err(err) => {
                tracing::warn!(error = %err, offset = message.offset(), "ignoring an unreadable invalidation message")
            }
        }
    }
}

/// Drops cached values older than the announced versions.
pub fn apply(store: &FeatureStore, invalidation: &Invalidation) {
    let mut dropped = 0u64;
    for key in &invalidation.keys {
        if store.invalidate_older(&key.entity_type, &key.entity_id, &key.feature, key.version) {
            dropped += 1;
        }
    }
    metrics::counter!(m::FEATURE_INVALIDATIONS_TOTAL).increment(dropped);
    let delay_ms = unix_now_ms().saturating_sub(invalidation.written_at_ms);
    metrics::histogram!(m::FEATURE_INVALIDATION_DELAY_SECONDS).record(delay_ms as f64 / 1000.0);
}
