//! Feature ingestion: feature updates from `topics.features` into the feature store.
//!
//! Ingestion is a [`crate::kafka::source`] with a consumer group of its own
//! (`ingest.group_id`), so it scales out like the request processor. Each micro-batch is
//! decoded ([`decode_update`], the wire format of `schemas/feature_update.v1.json`), then its
//! updates are written with at most `ingest.write_concurrency` writes at a time through
//! [`FeatureStore::set_feature`] (prepared statements, highest version wins, so replays are
//! harmless).
//!
//! # Nothing skipped
//!
//! - An update that cannot be decoded or breaks the data model is dead-lettered to
//!   `topics.dlq` with the same headers as a request (`inferflow-error-kind`, …).
//! - Any other write error is the database's: the write is retried with doubling backoff with full
//!   jitter ([`Backoff`], `ingest.retry_initial_backoff_ms` up to `ingest.retry_max_backoff_ms`)
//!   until it succeeds (or shutdown's deadline passes, and the record is redelivered after the
//!   restart). While writes fail, the source is *held*: its partitions pause, so no more updates
//!   are fetched until the database answers again.
//! - A record's offset may be stored only after its write succeeded and the invalidation that
//!   announces it was acknowledged (or after its dead letter was).
//!
//! # Coherence
//!
//! After a batch is written, its keys and versions are announced on
//! `topics.feature_invalidations` ([`super::coherence`]), and every instance drops older cached
//! values of them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::kafka::source::Record;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::IngestSections;
use super::coherence::{InvalidatedKey, Publisher};
use super::model::unix_now_ms;
use super::{FeatureStore, FeatureStoreError, FeatureUpdate};
use crate::backoff::Backoff;
use crate::batching::{Batch, BatchLimits};
use crate::kafka::sink::{DeliverError, Sink};
use crate::kafka::source::{self, BatchHandler, SourceCore, SourceHandle, SourceSpec, lock};
use crate::metrics as m;
use crate::model::{ErrorBody, ErrorKind};

/// A feature update as it arrives on the features topic (`schemas/feature_update.v1.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureUpdateMessage {
    /// The kind of entity, e.g. `user`.
    pub entity_type: String,
    /// The entity's id.
    pub entity_id: String,
    /// The feature's name.
    pub feature: String,
    /// The values, a JSON object.
    pub values: Map<String, Value>,
    /// The version; defaults to `event_time`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// When the values were produced, Unix milliseconds; defaults to the Kafka timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<u64>,
    /// Seconds after the write at which the value disappears.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u32>,
}

/// Decodes one update message: `kafka_timestamp_ms` is the record's timestamp, the default of
/// `event_time`. Errors carry the kind a dead letter is filed under.
pub fn decode_update(
    value: Option<&[u8]>,
    max_bytes: usize,
    kafka_timestamp_ms: Option<i64>,
) -> Result<FeatureUpdate, ErrorBody> {
    let bytes = match value {
        None | Some([]) => {
            return Err(ErrorBody::new(
                ErrorKind::InvalidJson,
                "the message has no value",
            ));
        }
        Some(b) => b,
    };
    if bytes.len() > max_bytes {
        return Err(ErrorBody::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "the message value has {} bytes, more than the {max_bytes} allowed (ingest.max_update_bytes)",
                bytes.len()
            ),
        ));
    }
    // Straight from the bytes, not through a `Value`: serde_json keeps each number's text
    // (`arbitrary_precision`), but a `Value` turned into a struct hands an integer `-0` on as
    // `0`. A message that does not parse is `invalid_json` wherever its first problem is.
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = serde_path_to_error::deserialize::<_, FeatureUpdateMessage>(&mut de);
    if (parsed.is_err() || de.end().is_err())
        && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
    {
        return Err(ErrorBody::new(
            ErrorKind::InvalidJson,
            format!("not valid JSON: {e}"),
        ));
    }
    let msg: FeatureUpdateMessage = parsed.map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!(" at `{path}`")
        };
        ErrorBody::new(
            ErrorKind::InvalidRequest,
            format!("invalid feature update{at}: {}", e.inner()),
        )
    })?;
    let event_time = match (msg.event_time, kafka_timestamp_ms) {
        (Some(t), _) => t,
        (None, Some(ts)) if ts >= 0 => ts as u64,
        (None, _) => {
            return Err(ErrorBody::new(
                ErrorKind::InvalidRequest,
                "event_time is missing and the record has no timestamp",
            ));
        }
    };
    let update = FeatureUpdate {
        entity_type: msg.entity_type,
        entity_id: msg.entity_id,
        name: msg.feature,
        values: msg.values,
        version: msg.version.unwrap_or(event_time),
        updated_at_ms: event_time,
        ttl_secs: msg.ttl_seconds,
    };
    update
        .validate()
        .map_err(|e| ErrorBody::new(ErrorKind::InvalidRequest, e.to_string()))?;
    Ok(update)
}

/// The ingestion handler.
struct Ingest {
    core: Arc<SourceCore>,
    store: Arc<FeatureStore>,
    publisher: Option<Publisher>,
    permits: Arc<Semaphore>,
    write_concurrency: usize,
    max_update_bytes: usize,
    /// Retry pacing while the database is unavailable.
    backoff: Backoff,
    /// Set while writes fail: since when, and the last error. The source pauses meanwhile.
    down: Mutex<Option<(Instant, String)>>,
    runtime: tokio::runtime::Handle,
}

impl BatchHandler for Ingest {
    fn dispatch(self: &Arc<Self>, batch: Batch<Record>) {
        metrics::histogram!(m::BATCH_SIZE_RECORDS, "source" => "features")
            .record(batch.items.len() as f64);
        // Taken here, on the consumer thread, so `ready` sees it at once.
        let permit = Arc::clone(&self.permits).try_acquire_owned().ok();
        let this = Arc::clone(self);
        self.runtime
            .spawn(async move { this.process_batch(batch.items, permit).await });
    }

    fn ready(&self) -> bool {
        self.permits.available_permits() > 0
    }

    fn hold(&self) -> Option<String> {
        lock(&self.down).as_ref().map(|(since, error)| {
            format!(
                "the feature store has been failing for {:.0?}: {error}",
                since.elapsed()
            )
        })
    }
}

impl Ingest {
    async fn process_batch(
        self: Arc<Self>,
        messages: Vec<Record>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let this: &Ingest = &self;
        let _permit = match permit {
            Some(permit) => permit,
            None => match Arc::clone(&self.permits).acquire_owned().await {
                Ok(permit) => permit,
                Err(_) => return, // Never closed.
            },
        };
        let mut writes: Vec<(usize, FeatureUpdate)> = Vec::with_capacity(messages.len());
        let mut rejects: Vec<(usize, ErrorBody)> = Vec::new();
        for (i, msg) in messages.iter().enumerate() {
            let ts = msg.timestamp().to_millis();
            match decode_update(msg.payload(), self.max_update_bytes, ts) {
                Ok(update) => writes.push((i, update)),
                Err(error) => rejects.push((i, error)),
            }
        }
        let messages = &messages;
        // Dead letters and writes go on side by side.
        let dead_letters = futures::future::join_all(rejects.into_iter().map(|(i, error)| async move {
            metrics::counter!(m::FEATURE_WRITES_TOTAL, "outcome" => "rejected").increment(1);
            tracing::debug!(kind = error.kind.as_str(), message = %error.message, "feature update dead-lettered");
            let delivered = this.core.dead_letter(&messages[i], &error).await;
            this.core.finish_delivered(&messages[i], delivered);
        }));
        let written = futures::stream::iter(writes)
            .map(|(i, update)| async move {
                let outcome = this.write(&update).await;
                (i, update, outcome)
            })
            .buffer_unordered(self.write_concurrency)
            .collect::<Vec<_>>();
        let (_, written) = futures::join!(dead_letters, written);

        let mut done: Vec<(&Record, FeatureUpdate)> = Vec::with_capacity(written.len());
        for (i, update, outcome) in written {
            let msg = &messages[i];
            match outcome {
                WriteOutcome::Written => done.push((msg, update)),
                WriteOutcome::Invalid(error) => {
                    let delivered = self.core.dead_letter(msg, &error).await;
                    self.core.finish_delivered(msg, delivered);
                }
                WriteOutcome::Stopped => self.core.finish(msg, false),
            }
        }
        if done.is_empty() {
            return;
        }
        if let Some(publisher) = &self.publisher {
            let keys: Vec<InvalidatedKey> =
                done.iter().map(|(_, u)| InvalidatedKey::of(u)).collect();
            match publisher
                .publish(&self.core.sink, &keys, &self.core.abort)
                .await
            {
                Ok(()) | Err(DeliverError::Permanent(_)) => {}
                Err(DeliverError::Fatal(reason)) => {
                    self.core.fail(reason);
                    for (msg, _) in &done {
                        self.core.finish(msg, false);
                    }
                    return;
                }
                Err(DeliverError::Stopped(_)) => {
                    // Written, but not announced: redeliver so the announcement is made.
                    for (msg, _) in &done {
                        self.core.finish(msg, false);
                    }
                    return;
                }
            }
        }
        let now = unix_now_ms() as i64;
        for (msg, _) in &done {
            if let Some(ts) = msg.timestamp().to_millis() {
                metrics::histogram!(m::FEATURE_INGEST_LAG_SECONDS)
                    .record(now.saturating_sub(ts).max(0) as f64 / 1000.0);
            }
            self.core.finish(msg, true);
        }
    }

    /// Writes one update, retrying while the database is unavailable.
    async fn write(&self, update: &FeatureUpdate) -> WriteOutcome {
        let mut attempt = 0u32;
        loop {
            let started = Instant::now();
            let result = self.store.set_feature(update).await;
            metrics::histogram!(m::FEATURE_STORE_WRITE_SECONDS)
                .record(started.elapsed().as_secs_f64());
            let error = match result {
                Ok(()) => {
                    metrics::counter!(m::FEATURE_WRITES_TOTAL, "outcome" => "written").increment(1);
                    self.mark_up();
                    return WriteOutcome::Written;
                }
                Err(FeatureStoreError::Invalid { what, reason }) => {
                    return WriteOutcome::Invalid(ErrorBody::new(
                        ErrorKind::InvalidRequest,
                        format!("invalid {what}: {reason}"),
                    ));
                }
                Err(error) => error,
            };
            metrics::counter!(m::FEATURE_WRITES_TOTAL, "outcome" => "retried").increment(1);
            self.mark_down(&error);
            let delay = self.backoff.delay(attempt);
            attempt = attempt.saturating_add(1);
            tracing::debug!(error = %error, attempt, retry_in = ?delay, "feature write failed; retrying");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.core.abort.cancelled() => return WriteOutcome::Stopped,
            }
        }
    }

    fn mark_down(&self, error: &FeatureStoreError) {
        let mut down = lock(&self.down);
        match down.as_mut() {
            Some((_, last)) => *last = error.to_string(),
            None => {
                // Logged once per outage (the source logs the pause); each write retries quietly.
                tracing::warn!(error = %error, "feature writes fail; pausing ingestion and retrying with backoff");
                metrics::gauge!(m::FEATURE_STORE_AVAILABLE).set(0.0);
                *down = Some((Instant::now(), error.to_string()));
            }
        }
    }

    fn mark_up(&self) {
        let mut down = lock(&self.down);
        if let Some((since, _)) = down.take() {
            metrics::gauge!(m::FEATURE_STORE_AVAILABLE).set(1.0);
            tracing::info!(after = ?since.elapsed(), "the feature store accepts writes again");
        }
    }
}

enum WriteOutcome {
    Written,
    Invalid(ErrorBody),
    Stopped,
}

/// Starts feature ingestion from `topics.features` into `store` (whatever `ingest.enabled`
/// says: the caller decides). Cancel `stop` to shut it down, then await
/// [`SourceHandle::join`].
pub fn start(
    config: IngestSections<'_>,
    store: Arc<FeatureStore>,
    stop: CancellationToken,
) -> anyhow::Result<SourceHandle> {
    use anyhow::Context as _;
    let producer = Sink::create(&crate::kafka::producer_config(config.kafka))
        .context("creating the Kafka producer of feature ingestion")?;
    let core = Arc::new(SourceCore::new(
        "features",
        producer,
        config.topics.dlq.clone(),
    ));
    let cfg = &config.ingest;
    metrics::gauge!(m::FEATURE_STORE_AVAILABLE).set(1.0);
    let handler = Arc::new(Ingest {
        core: Arc::clone(&core),
        store,
        publisher: Publisher::new(&config.topics.feature_invalidations),
        permits: Arc::new(Semaphore::new(cfg.max_in_flight_batches.get())),
        write_concurrency: cfg.write_concurrency.get(),
        max_update_bytes: cfg.max_update_bytes.get(),
        backoff: Backoff::new(
            Duration::from_millis(cfg.retry_initial_backoff_ms.get()),
            Duration::from_millis(cfg.retry_max_backoff_ms.get()),
        ),
        down: Mutex::new(None),
        runtime: tokio::runtime::Handle::current(),
    });
    let spec = SourceSpec {
        topics: vec![config.topics.features.clone()],
        group_id: cfg.group_id.clone(),
        batch: BatchLimits {
            max_records: cfg.max_batch_records,
            max_bytes: config.batch.max_bytes,
            linger: Duration::from_millis(cfg.linger_ms),
        },
        max_in_flight: cfg.max_in_flight_records.get(),
        shutdown_timeout: Duration::from_millis(config.executor.shutdown_timeout_ms.get()),
        rebalance_drain_timeout: Duration::from_millis(config.kafka.rebalance_drain_timeout_ms),
        consumed_metric: m::FEATURE_UPDATES_CONSUMED_TOTAL,
    };
    source::start(config.kafka, spec, core, handler, stop)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn decode(v: Value, ts: Option<i64>) -> Result<FeatureUpdate, ErrorBody> {
        decode_update(Some(v.to_string().as_bytes()), 1 << 20, ts)
    }

    #[test]
    fn values_keep_every_number_as_written() {
        let text = r#"{"entity_type": "user", "entity_id": "7", "feature": "f", "version": 1,
            "values": {"a": -0, "b": -0.0, "c": 12345678901234567890123, "d": 0.12044115189281823,
                       "e": 1.50, "f": 9007199254740993}}"#;
        let u = decode_update(Some(text.as_bytes()), 1 << 20, Some(1)).expect("valid");
        assert_eq!(
            serde_json::to_string(&u.values).unwrap(),
            r#"{"a":-0,"b":-0.0,"c":12345678901234567890123,"d":0.12044115189281823,"e":1.50,"f":9007199254740993}"#
        );
        // Not JSON anywhere, even after a field of the wrong type: invalid_json.
        for bad in [
            r#"{"entity_type": 5, "values": {"a": 1}"#,
            r#"{"entity_type": "user", "entity_id": "7", "feature": "f", "values": {}} x"#,
        ] {
            let e = decode_update(Some(bad.as_bytes()), 1 << 20, Some(1)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidJson, "{bad}: {}", e.message);
        }
    }

    #[test]
    fn version_defaults_to_event_time_and_event_time_to_the_record_timestamp() {
        let u = decode(
            json!({"entity_type": "user", "entity_id": "7", "feature": "clicks", "values": {"n": 3}}),
            Some(1_700_000_000_123),
        )
        .expect("valid");
        assert_eq!(u.version, 1_700_000_000_123);
        assert_eq!(u.updated_at_ms, 1_700_000_000_123);
        let u = decode(
            json!({"entity_type": "user", "entity_id": "7", "feature": "clicks", "values": {},
                   "event_time": 5, "version": 9, "ttl_seconds": 60}),
            Some(1),
        )
        .expect("valid");
        assert_eq!((u.version, u.updated_at_ms, u.ttl_secs), (9, 5, Some(60)));
    }

    #[test]
    fn bad_updates_get_the_right_error_kind() {
        let kind = |v: Option<&[u8]>| decode_update(v, 64, Some(1)).unwrap_err().kind;
        assert_eq!(kind(None), ErrorKind::InvalidJson);
        assert_eq!(kind(Some(b"{not json")), ErrorKind::InvalidJson);
        assert_eq!(kind(Some(&[b' '; 65])), ErrorKind::PayloadTooLarge);
        assert_eq!(kind(Some(b"[1]")), ErrorKind::InvalidRequest);
        let invalid = |v: Value| decode(v, Some(1)).unwrap_err();
        let e = invalid(
            json!({"entity_type": "user", "entity_id": "7", "feature": "f", "values": [1]}),
        );
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        assert!(e.message.contains("values"), "{}", e.message);
        let e = invalid(json!({"entity_type": "", "entity_id": "7", "feature": "f", "values": {}}));
        assert!(e.message.contains("entity_type"), "{}", e.message);
        let e = invalid(
            json!({"entity_type": "u", "entity_id": "7", "feature": "f", "values": {}, "colour": 1}),
        );
        assert!(e.message.contains("colour"), "{}", e.message);
        let e = invalid(
            json!({"entity_type": "u", "entity_id": "7", "feature": "f", "values": {}, "version": -1}),
        );
        assert!(e.message.contains("version"), "{}", e.message);
        let e = invalid(
            json!({"entity_type": "u", "entity_id": "7", "feature": "f", "values": {}, "ttl_seconds": 0}),
        );
        assert!(e.message.contains("ttl"), "{}", e.message);
        let e = decode(
            json!({"entity_type": "u", "entity_id": "7", "feature": "f", "values": {}}),
            None,
        )
        .unwrap_err();
        assert!(e.message.contains("event_time"), "{}", e.message);
    }
}
