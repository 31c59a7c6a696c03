//! The stream processor: requests from Kafka → micro-batches → bounded executor → results keyed
//! by request id, with nothing lost.
//!
//! # Flow
//!
//! One dedicated **consumer thread** owns the librdkafka consumer. It polls, registers each
//! record with the [`OffsetTracker`], adds it to the [`Batcher`], and spawns a Tokio task per
//! closed batch. It is also where rebalance callbacks run, where partitions are paused and
//! resumed, and where offsets are stored: a blocking thread can wait for revoked partitions to
//! drain without stalling the async workers.
//!
//! Each **batch task** takes one of `executor.max_in_flight_batches` permits, decodes its
//! records, runs them through the [`Executor`] grouped by target, releases the permit, then
//! delivers one output per record (a result, or a dead letter when no request id could be
//! read) and marks each record done once the broker acknowledged its output.
//!
//! # Bounds
//!
//! Records consumed and not yet answered are counted; at `executor.max_in_flight_records` the
//! consumer pauses every assigned partition (and keeps polling, so it stays in the group) and
//! resumes at half of it. Batches waiting for a permit are part of that count, so memory is
//! bounded by records, not by batches. librdkafka's own prefetch is bounded by
//! `kafka.consumer_queue_kbytes`.

use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures::FutureExt as _;
use rdkafka::TopicPartitionList;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::batching::{Batch, BatchLimits, Batcher};
use crate::config::{Config, KeyOrdering};
use crate::decode::{DecodeRules, Decoded, decode};
use crate::executor::{ExecRequest, ExecResult, Executor};
use crate::kafka::offsets::{OffsetTracker, TopicPartition};
use crate::kafka::sink::{DeliverError, OutRecord, Sink};
use crate::metrics as m;
use crate::model::{ErrorBody, ErrorKind, InferenceResult, SourceRef, Status, Target};

/// Result and dead-letter header names.
pub mod headers {
    /// The request id (results).
    pub const REQUEST_ID: &str = "inferflow-request-id";
    /// `ok` or `error` (results).
    pub const STATUS: &str = "inferflow-status";
    /// Source topic of the request (results and dead letters).
    pub const SOURCE_TOPIC: &str = "inferflow-source-topic";
    /// Source partition (results and dead letters).
    pub const SOURCE_PARTITION: &str = "inferflow-source-partition";
    /// Source offset (results and dead letters).
    pub const SOURCE_OFFSET: &str = "inferflow-source-offset";
    /// Error kind (dead letters).
    pub const ERROR_KIND: &str = "inferflow-error-kind";
    /// Error message (dead letters).
    pub const ERROR_MESSAGE: &str = "inferflow-error-message";
}

/// How often the consumer thread wakes up at the latest (to store offsets, flush lingering
/// batches and notice shutdown).
const MAX_POLL_WAIT: Duration = Duration::from_millis(100);

/// How often the consumer thread stores the positions that advanced.
const STORE_EVERY: Duration = Duration::from_millis(50);

/// State shared by the consumer thread and the batch tasks.
struct Shared {
    executor: Arc<dyn Executor>,
    sink: Sink,
    tracker: OffsetTracker,
    rules: DecodeRules,
    results_topic: String,
    dlq_topic: String,
    execute_timeout: Duration,
    batch_permits: Arc<Semaphore>,
    /// `executor.ordering = "per_key"`.
    per_key: bool,
    /// Per-key mode: one sender per lane worker (empty when unordered). Cleared at shutdown so
    /// the workers end. Unbounded in batches, but the records they hold are bounded by
    /// `max_in_flight_records` (consumption pauses there), and the consumer thread never blocks.
    lanes: Mutex<Vec<tokio::sync::mpsc::UnboundedSender<Vec<OwnedMessage>>>>,
    in_flight: AtomicUsize,
    /// Cancelled when the shutdown deadline has passed: deliveries stop retrying.
    abort: CancellationToken,
    /// Cancelled on a fatal client error; the consumer thread then shuts down and the processor
    /// reports the error (the process should be restarted).
    fatal: CancellationToken,
    /// What the fatal error was.
    fatal_reason: Mutex<Option<String>>,
    runtime: Handle,
}

impl Shared {
    /// Records a fatal error and makes the consumer thread shut down.
    fn fail(&self, reason: String) {
        lock(&self.fatal_reason).get_or_insert(reason);
        self.fatal.cancel();
    }

    /// Hands a closed batch to a new task.
    ///
    /// Unordered, each batch gets its own task. Per key, the batch is split into lanes by key
    /// hash and each lane's worker runs its batches one after another, so records with the same
    /// key run in consumption order while different keys still run concurrently.
    fn dispatch(self: &Arc<Self>, batch: Batch<OwnedMessage>) {
        metrics::histogram!(m::BATCH_SIZE_RECORDS).record(batch.items.len() as f64);
        metrics::histogram!(m::BATCH_LINGER_SECONDS).record(batch.lingered.as_secs_f64());
        if !self.per_key {
            let shared = Arc::clone(self);
            self.runtime
                .spawn(async move { shared.process_batch(batch.items).await });
            return;
        }
        let lanes = lock(&self.lanes).clone();
        if lanes.is_empty() {
            // Only after shutdown cleared the lanes: the records stay pending and are
            // redelivered after the restart.
            tracing::warn!("per-key lanes are closed; the batch will be redelivered");
            return;
        }
        let mut split: Vec<Vec<OwnedMessage>> = vec![Vec::new(); lanes.len()];
        for message in batch.items {
            let lane = lane_of(message.key(), lanes.len());
            split[lane].push(message);
        }
        for (lane, items) in lanes.iter().zip(split) {
            if !items.is_empty() && lane.send(items).is_err() {
                // Only after shutdown cleared the lanes: the records stay pending, their offsets
                // are not stored, and they are redelivered after the restart.
                tracing::warn!("a lane worker has stopped; its records will be redelivered");
            }
        }
    }

    async fn process_batch(self: Arc<Self>, messages: Vec<OwnedMessage>) {
        let Ok(permit) = Arc::clone(&self.batch_permits).acquire_owned().await else {
            return; // The semaphore is never closed.
        };
        let arrived = Instant::now();
        // Executors are pluggable code: a panic must not lose the batch's records (they would
        // stay in flight for good). Every record is then answered with an `internal` error.
        let outcomes = match AssertUnwindSafe(self.compute(&messages))
            .catch_unwind()
            .await
        {
            Ok(outcomes) => outcomes,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                tracing::error!(panic = %what, records = messages.len(), "processing a batch panicked; answering its records with internal errors");
                self.after_panic(&messages, &what)
            }
        };
        drop(permit);
        let latency = arrived.elapsed();
        let deliveries = messages
            .iter()
            .zip(outcomes)
            .map(|(msg, (outcome, reply_to))| self.answer(msg, outcome, reply_to, latency));
        futures::future::join_all(deliveries).await;
    }

    /// Decodes and executes a batch: one outcome (and optional `reply_to`) per message.
    async fn compute(&self, messages: &[OwnedMessage]) -> Vec<(Outcome, Option<String>)> {
        let now_ms = unix_ms();
        let mut outcomes: Vec<(Outcome, Option<String>)> = Vec::with_capacity(messages.len());
        let mut runnable: Vec<(usize, Target, ExecRequest)> = Vec::new();
        for (i, msg) in messages.iter().enumerate() {
            let outcome = match decode(msg.payload(), &self.rules, now_ms) {
                Decoded::Request { request, target } => {
                    runnable.push((
                        i,
                        target.clone(),
                        ExecRequest {
                            request_id: request.request_id.clone(),
                            data: request.data,
                            parameters: request.parameters,
                            entity: request.entity,
                            tenant: request.tenant,
                        },
                    ));
                    // Replaced by the execution's outcome below.
                    (
                        Outcome::Answer(
                            request.request_id,
                            Some(target),
                            Err(ErrorBody::new(ErrorKind::Internal, "not executed")),
                        ),
                        request.reply_to,
                    )
                }
                Decoded::Reject {
                    request_id,
                    target,
                    error,
                } => (Outcome::Answer(request_id, target, Err(error)), None),
                Decoded::DeadLetter(error) => (Outcome::DeadLetter(error), None),
            };
            outcomes.push(outcome);
        }
        if self.per_key {
            // Runs of consecutive requests for the same target, one after another: requests of
            // one key (all in this lane) keep their consumption order across targets.
            let mut rest = runnable.into_iter().peekable();
            while let Some(first) = rest.next() {
                let target = first.1.clone();
                let mut run = vec![(first.0, first.2)];
                while let Some(next) = rest.next_if(|r| r.1 == target) {
                    run.push((next.0, next.2));
                }
                for (i, outcome) in self.execute_group(&target, run).await {
                    outcomes[i].0 = outcome;
                }
            }
        } else {
            let mut groups: BTreeMap<Target, Vec<(usize, ExecRequest)>> = BTreeMap::new();
            for (i, target, request) in runnable {
                groups.entry(target).or_default().push((i, request));
            }
            let runs = groups
                .into_iter()
                .map(|(target, items)| async move { self.execute_group(&target, items).await });
            for (i, outcome) in futures::future::join_all(runs).await.into_iter().flatten() {
                outcomes[i].0 = outcome;
            }
        }
        outcomes
    }

    /// Runs requests for one target through the executor, under the execute timeout.
    async fn execute_group(
        &self,
        target: &Target,
        items: Vec<(usize, ExecRequest)>,
    ) -> Vec<(usize, Outcome)> {
        let (indices, requests): (Vec<usize>, Vec<ExecRequest>) = items.into_iter().unzip();
        let ids: Vec<String> = requests.iter().map(|r| r.request_id.clone()).collect();
        let n = requests.len();
        let results = match tokio::time::timeout(
            self.execute_timeout,
            self.executor.execute(target, requests),
        )
        .await
        {
            Ok(results) if results.len() == n => results,
            Ok(results) => vec![
                Err(ErrorBody::new(
                    ErrorKind::Internal,
                    format!(
                        "the executor returned {} outcomes for {n} requests",
                        results.len()
                    ),
                ));
                n
            ],
            Err(_) => vec![
                Err(ErrorBody::new(
                    ErrorKind::ProviderTimeout,
                    format!(
                        "no answer within {} ms (executor.execute_timeout_ms)",
                        self.execute_timeout.as_millis()
                    ),
                ));
                n
            ],
        };
        indices
            .into_iter()
            .zip(ids)
            .zip(results)
            .map(|((i, id), result)| (i, Outcome::Answer(id, Some(target.clone()), result)))
            .collect()
    }

    /// Outcomes for a batch whose processing panicked: an `internal` error result for every
    /// record whose request id can be read, a dead letter for the others.
    fn after_panic(&self, messages: &[OwnedMessage], what: &str) -> Vec<(Outcome, Option<String>)> {
        let error = ErrorBody::new(
            ErrorKind::Internal,
            format!("inferflow failed while processing this request: {what}"),
        );
        let now_ms = unix_ms();
        messages
            .iter()
            .map(|msg| {
                let decoded = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    decode(msg.payload(), &self.rules, now_ms)
                }));
                let outcome = match decoded {
                    Ok(Decoded::Request { request, target }) => {
                        Outcome::Answer(request.request_id, Some(target), Err(error.clone()))
                    }
                    Ok(Decoded::Reject {
                        request_id, target, ..
                    }) => Outcome::Answer(request_id, target, Err(error.clone())),
                    Ok(Decoded::DeadLetter(_)) | Err(_) => Outcome::DeadLetter(error.clone()),
                };
                (outcome, None)
            })
            .collect()
    }

    /// Delivers the output for one record and marks it done.
    async fn answer(
        &self,
        msg: &OwnedMessage,
        outcome: Outcome,
        reply_to: Option<String>,
        latency: Duration,
    ) {
        let source = SourceRef {
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
        };
        let delivered = match outcome {
            Outcome::Answer(request_id, target, result) => {
                let record = self.result_record(
                    &request_id,
                    target.as_ref(),
                    result,
                    &source,
                    reply_to,
                    latency,
                );
                match self.sink.deliver(&record, &self.abort).await {
                    Ok(()) => {
                        count_result(&record);
                        Ok(())
                    }
                    Err(DeliverError::Permanent(err)) => {
                        // The result cannot be written where it should go (too large, no such
                        // topic): answer with an error result on the default topic instead.
                        tracing::warn!(error = %err, topic = %record.topic, "result refused; sending an error result instead");
                        let fallback = self.result_record(
                            &request_id,
                            target.as_ref(),
                            Err(ErrorBody::new(
                                ErrorKind::Internal,
                                format!("the result could not be delivered: {err}"),
                            )),
                            &source,
                            None,
                            latency,
                        );
                        match self.sink.deliver(&fallback, &self.abort).await {
                            Ok(()) => {
                                count_result(&fallback);
                                Ok(())
                            }
                            Err(DeliverError::Permanent(err)) => {
                                self.dead_letter(
                                    msg,
                                    &ErrorBody::new(ErrorKind::Internal, err.to_string()),
                                    &source,
                                )
                                .await
                            }
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                }
            }
            Outcome::DeadLetter(error) => self.dead_letter(msg, &error, &source).await,
        };
        match delivered {
            Ok(()) => {
                if let Some(ts) = msg.timestamp().to_millis() {
                    let e2e = unix_ms().saturating_sub(ts).max(0) as f64 / 1000.0;
                    metrics::histogram!(m::END_TO_END_LATENCY_SECONDS).record(e2e);
                }
                self.tracker
                    .complete(&(source.topic, source.partition), source.offset);
            }
            Err(DeliverError::Fatal(reason)) => {
                tracing::error!(reason = %reason, "fatal producer error; stopping the processor");
                self.fail(reason);
            }
            Err(err) => {
                // Only on shutdown: the record stays pending, its offset is not stored, and it
                // is redelivered after the restart.
                tracing::warn!(error = %err, partition = source.partition, offset = source.offset, "output not delivered before shutdown; the request will be redelivered");
            }
        }
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    async fn dead_letter(
        &self,
        msg: &OwnedMessage,
        error: &ErrorBody,
        source: &SourceRef,
    ) -> Result<(), DeliverError> {
        let record = OutRecord {
            topic: self.dlq_topic.clone(),
            key: msg.key().map(<[u8]>::to_vec),
            value: msg.payload().unwrap_or_default().to_vec(),
            headers: vec![
                (headers::ERROR_KIND, error.kind.as_str().to_owned()),
                (headers::ERROR_MESSAGE, error.message.clone()),
                (headers::SOURCE_TOPIC, source.topic.clone()),
                (headers::SOURCE_PARTITION, source.partition.to_string()),
                (headers::SOURCE_OFFSET, source.offset.to_string()),
            ],
        };
        // A dead letter that Kafka refuses for good cannot be dropped either: keep trying, and
        // say so loudly. The partition stalls until an operator intervenes.
        loop {
            match self.sink.deliver(&record, &self.abort).await {
                Ok(()) => {
                    metrics::counter!(m::DEAD_LETTERS_TOTAL, "error_kind" => error.kind.as_str())
                        .increment(1);
                    return Ok(());
                }
                Err(DeliverError::Permanent(err)) => {
                    tracing::error!(error = %err, topic = %record.topic, partition = source.partition, offset = source.offset,
                        "the dead-letter topic refuses this record; retrying in 5 s (the partition is stalled until it is accepted)");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(5)) => {}
                        () = self.abort.cancelled() => return Err(DeliverError::Stopped(err.to_string())),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn result_record(
        &self,
        request_id: &str,
        target: Option<&Target>,
        result: ExecResult,
        source: &SourceRef,
        reply_to: Option<String>,
        latency: Duration,
    ) -> OutRecord {
        let doc = result_document(request_id, target, result, Some(source.clone()), latency);
        // Serialising these types cannot fail (string keys, no non-finite floats from JSON).
        let value = serde_json::to_vec(&doc).unwrap_or_else(|e| {
            format!(r#"{{"request_id":{},"status":"error","error":{{"kind":"internal","message":"result could not be serialised: {e}"}},"cached":false,"latency_ms":0,"steps":[]}}"#,
                serde_json::Value::from(request_id)).into_bytes()
        });
        let mut headers = vec![
            (headers::REQUEST_ID, request_id.to_owned()),
            (headers::STATUS, doc.status.as_str().to_owned()),
            (headers::SOURCE_TOPIC, source.topic.clone()),
            (headers::SOURCE_PARTITION, source.partition.to_string()),
            (headers::SOURCE_OFFSET, source.offset.to_string()),
        ];
        if let Some(error) = &doc.error {
            headers.push((headers::ERROR_KIND, error.kind.as_str().to_owned()));
        }
        OutRecord {
            topic: reply_to.unwrap_or_else(|| self.results_topic.clone()),
            key: Some(request_id.as_bytes().to_vec()),
            value,
            headers,
        }
    }
}

/// The result document for one request: `ok` with the executor's output, or `error`.
pub fn result_document(
    request_id: &str,
    target: Option<&Target>,
    result: ExecResult,
    source: Option<SourceRef>,
    latency: Duration,
) -> InferenceResult {
    let (pipeline, model) = match target {
        Some(Target::Pipeline(p)) => (Some(p.clone()), None),
        Some(Target::Model(mdl)) => (None, Some(mdl.clone())),
        None => (None, None),
    };
    let mut doc = InferenceResult {
        request_id: request_id.to_owned(),
        status: Status::Ok,
        output: None,
        error: None,
        pipeline,
        model,
        model_version: None,
        cached: false,
        latency_ms: latency.as_millis() as u64,
        steps: Vec::new(),
        source,
    };
    match result {
        Ok(out) => {
            doc.output = Some(out.output);
            doc.model_version = out.model_version;
            doc.cached = out.cached;
            doc.steps = out.steps;
        }
        Err(error) => {
            doc.status = Status::Error;
            doc.error = Some(error);
        }
    }
    doc
}

/// The lane of a record in per-key mode: records without a key share lane 0.
fn lane_of(key: Option<&[u8]>, lanes: usize) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    match key {
        None => 0,
        // A fixed (unseeded) hasher: the same key always maps to the same lane.
        Some(k) => {
            (BuildHasherDefault::<DefaultHasher>::default().hash_one(k) % lanes as u64) as usize
        }
    }
}

/// Counts a delivered result by status and error kind.
fn count_result(record: &OutRecord) {
    let find = |name: &str| {
        record
            .headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    };
    let status = find(headers::STATUS).unwrap_or_default();
    let kind = find(headers::ERROR_KIND).unwrap_or_default();
    metrics::counter!(m::RESULTS_TOTAL, "status" => status, "error_kind" => kind).increment(1);
}

#[derive(Debug, Clone)]
enum Outcome {
    /// A result (ok or error) for a request id.
    Answer(String, Option<Target>, ExecResult),
    /// No request id: a dead letter.
    DeadLetter(ErrorBody),
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn topic_partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// The consumer's context: rebalance hooks, statistics and commit results.
struct ProcessorContext {
    shared: Arc<Shared>,
    batcher: Mutex<Batcher<OwnedMessage>>,
    /// True while every assigned partition is paused for backpressure.
    paused: AtomicBool,
    /// Set once shutdown has drained what it could: revokes then give up at once.
    shutting_down: AtomicBool,
    rebalance_drain_timeout: Duration,
}

impl ClientContext for ProcessorContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!(m::CONSUMER_LAG_RECORDS, "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for ProcessorContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let partitions = topic_partitions(tpl);
        if consumer.assignment_lost() {
            // Someone else may already own them: commit nothing, forget the work.
            metrics::counter!(m::REBALANCES_TOTAL, "kind" => "lost").increment(1);
            tracing::warn!(
                ?partitions,
                "assignment lost; in-flight work of these partitions will be redelivered"
            );
            self.shared.tracker.revoke(&partitions);
            return;
        }
        metrics::counter!(m::REBALANCES_TOTAL, "kind" => "revoke").increment(1);
        // Records of these partitions may sit in the open batch: send it on now.
        if let Some(batch) = lock(&self.batcher).flush(Instant::now()) {
            self.shared.dispatch(batch);
        }
        let drain_for = if self.shutting_down.load(Ordering::Acquire) {
            Duration::ZERO
        } else {
            self.rebalance_drain_timeout
        };
        let left = self.shared.tracker.wait_drained(&partitions, drain_for);
        if left > 0 {
            tracing::warn!(
                left,
                "revoked partitions did not drain in time; their unfinished records will be redelivered"
            );
        }
        if let Err(err) = self.shared.tracker.commit_now(consumer, Some(&partitions)) {
            tracing::warn!(error = %err, "commit before giving up partitions failed");
        }
        self.shared.tracker.revoke(&partitions);
        tracing::info!(?partitions, "partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                metrics::counter!(m::REBALANCES_TOTAL, "kind" => "assign").increment(1);
                let partitions = topic_partitions(tpl);
                tracing::info!(?partitions, "partitions assigned");
                self.shared.tracker.assign(partitions);
                // librdkafka keeps an application pause across unassign and reassign, so a
                // partition paused before it was revoked would come back paused: set the state
                // explicitly either way.
                let paused = self.paused.load(Ordering::Acquire);
                let result = if paused {
                    consumer.pause(tpl)
                } else {
                    consumer.resume(tpl)
                };
                if let Err(err) = result {
                    tracing::warn!(error = %err, paused, "could not set the paused state of newly assigned partitions");
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(err) => tracing::warn!(error = %err, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(())
            | Err(rdkafka::error::KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(err) => {
                tracing::warn!(error = %err, "offset commit failed; it is retried with the next commit")
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running processor.
pub struct ProcessorHandle {
    done: tokio::sync::oneshot::Receiver<anyhow::Result<()>>,
    shutdown_timeout: Duration,
}

impl ProcessorHandle {
    /// Waits until the processor has stopped (after its stop token was cancelled, or on a fatal
    /// error). Callers bound the wait with [`ProcessorHandle::shutdown_timeout`] plus a margin,
    /// so a hanging consumer close cannot keep the process alive.
    pub async fn join(self) -> anyhow::Result<()> {
        match self.done.await {
            Ok(result) => result,
            Err(_) => anyhow::bail!("the consumer thread ended without reporting"),
        }
    }

    /// The configured shutdown deadline.
    pub fn shutdown_timeout(&self) -> Duration {
        self.shutdown_timeout
    }
}

/// Creates the configured topics that do not exist yet (when `topics.create_missing` is on).
pub async fn ensure_topics(config: &Config) -> anyhow::Result<()> {
    if !config.topics.create_missing {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = crate::kafka::base_client_config(&config.kafka)
        .create()
        .context("creating the Kafka admin client")?;
    let t = &config.topics;
    let names = [&t.requests, &t.features, &t.results, &t.dlq];
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                t.create_partitions.get() as i32,
                TopicReplication::Fixed(t.create_replication_factor.get() as i32),
            )
        })
        .collect();
    let results = admin
        .create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .context(
            "creating topics (turn topics.create_missing off if they are provisioned separately)",
        )?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}

/// Starts the processor: creates missing topics, subscribes to the requests topic and starts
/// the consumer thread. Cancel `stop` to shut it down gracefully, then await
/// [`ProcessorHandle::join`].
pub async fn start(
    config: &Config,
    executor: Arc<dyn Executor>,
    stop: CancellationToken,
) -> anyhow::Result<ProcessorHandle> {
    ensure_topics(config).await?;
    let producer: FutureProducer = crate::kafka::producer_config(&config.kafka)
        .set("linger.ms", "5")
        .create()
        .context("creating the Kafka producer")?;
    let shared = Arc::new(Shared {
        executor,
        sink: Sink::new(producer),
        tracker: OffsetTracker::new(),
        rules: DecodeRules {
            max_request_bytes: config.executor.max_request_bytes.get(),
            reply_to_allowed: config
                .topics
                .reply_to_allowed
                .iter()
                .cloned()
                .collect::<HashSet<_>>(),
        },
        results_topic: config.topics.results.clone(),
        dlq_topic: config.topics.dlq.clone(),
        execute_timeout: Duration::from_millis(config.executor.execute_timeout_ms.get()),
        batch_permits: Arc::new(Semaphore::new(config.executor.max_in_flight_batches.get())),
        per_key: config.executor.ordering == KeyOrdering::PerKey,
        lanes: Mutex::new(Vec::new()),
        in_flight: AtomicUsize::new(0),
        abort: CancellationToken::new(),
        fatal: CancellationToken::new(),
        fatal_reason: Mutex::new(None),
        runtime: Handle::current(),
    });
    if config.executor.ordering == KeyOrdering::PerKey {
        let lanes = config.executor.max_in_flight_batches.get();
        let mut senders = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<OwnedMessage>>();
            let worker = Arc::clone(&shared);
            tokio::spawn(async move {
                while let Some(items) = rx.recv().await {
                    Arc::clone(&worker).process_batch(items).await;
                }
            });
            senders.push(tx);
        }
        *lock(&shared.lanes) = senders;
    }
    let context = ProcessorContext {
        shared: Arc::clone(&shared),
        batcher: Mutex::new(Batcher::new(BatchLimits {
            max_records: config.batch.max_records,
            max_bytes: config.batch.max_bytes,
            linger: Duration::from_millis(config.batch.linger_ms),
        })),
        paused: AtomicBool::new(false),
        shutting_down: AtomicBool::new(false),
        rebalance_drain_timeout: Duration::from_millis(config.kafka.rebalance_drain_timeout_ms),
    };
    let mut client = crate::kafka::consumer_config(&config.kafka, &config.kafka.group_id);
    client
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set(
            "queued.max.messages.kbytes",
            config.kafka.consumer_queue_kbytes.to_string(),
        )
        .set(
            "statistics.interval.ms",
            config.kafka.statistics_interval_ms.to_string(),
        );
    let consumer: BaseConsumer<ProcessorContext> = client
        .create_with_context(context)
        .context("creating the Kafka consumer")?;
    consumer
        .subscribe(&[&config.topics.requests])
        .with_context(|| format!("subscribing to {}", config.topics.requests))?;

    let limits = Limits {
        max_in_flight: config.executor.max_in_flight_records.get(),
        shutdown_timeout: Duration::from_millis(config.executor.shutdown_timeout_ms.get()),
    };
    let (done_tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("inferflow-consumer".into())
        .spawn(move || {
            let result = consume(consumer, &shared, limits, &stop);
            let _ = done_tx.send(result);
        })
        .context("starting the consumer thread")?;
    Ok(ProcessorHandle {
        done,
        shutdown_timeout: limits.shutdown_timeout,
    })
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    max_in_flight: usize,
    shutdown_timeout: Duration,
}

/// The consumer thread's loop, then its orderly shutdown.
fn consume(
    consumer: BaseConsumer<ProcessorContext>,
    shared: &Arc<Shared>,
    limits: Limits,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let context = consumer.context();
    let resume_below = limits.max_in_flight / 2;
    let mut paused_count = 0usize;
    let mut last_store = Instant::now();
    while !stop.is_cancelled() && !shared.fatal.is_cancelled() {
        // Backpressure: pause every assigned partition at the budget, resume at half of it.
        let in_flight = shared.in_flight.load(Ordering::Acquire);
        metrics::gauge!(m::IN_FLIGHT_RECORDS).set(in_flight as f64);
        let paused = context.paused.load(Ordering::Acquire);
        if !paused && in_flight >= limits.max_in_flight {
            paused_count = set_paused(&consumer, true);
        } else if paused && in_flight <= resume_below {
            set_paused(&consumer, false);
            paused_count = 0;
        }
        metrics::gauge!(m::PAUSED_PARTITIONS).set(paused_count as f64);

        let wait = lock(&context.batcher)
            .deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(MAX_POLL_WAIT)
            .min(MAX_POLL_WAIT);
        match consumer.poll(wait) {
            Some(Ok(message)) => {
                let message = message.detach();
                metrics::counter!(m::REQUESTS_CONSUMED_TOTAL).increment(1);
                let tp = (message.topic().to_owned(), message.partition());
                if shared.tracker.begin(&tp, message.offset()) {
                    shared.in_flight.fetch_add(1, Ordering::AcqRel);
                    let size = message.payload().map_or(0, <[u8]>::len);
                    let closed = lock(&context.batcher).push(message, size, Instant::now());
                    if let Some((batch, _)) = closed {
                        shared.dispatch(batch);
                    }
                }
            }
            Some(Err(err)) => {
                if let Some((code, reason)) = consumer.client().fatal_error() {
                    shared.fail(format!("consumer: {code}: {reason}"));
                } else {
                    tracing::warn!(error = %err, "consumer error");
                }
            }
            None => {}
        }
        let lingered = lock(&context.batcher).poll_linger(Instant::now());
        if let Some(batch) = lingered {
            shared.dispatch(batch);
        }
        if last_store.elapsed() >= STORE_EVERY {
            last_store = Instant::now();
            if let Err(err) = shared.tracker.store(&consumer) {
                tracing::warn!(error = %err, "storing offsets failed; retrying");
            }
        }
    }
    shutdown(consumer, shared, limits)
}

/// Commit errors that clear up once this member has caught up with the group.
fn commit_retriable(err: &rdkafka::error::KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        err.rdkafka_error_code(),
        Some(
            C::RebalanceInProgress
                | C::IllegalGeneration
                | C::CoordinatorLoadInProgress
                | C::NotCoordinator
                | C::CoordinatorNotAvailable
                | C::RequestTimedOut
        )
    )
}

/// Pauses (or resumes) every assigned partition; returns how many.
fn set_paused(consumer: &BaseConsumer<ProcessorContext>, pause: bool) -> usize {
    let context = consumer.context();
    context.paused.store(pause, Ordering::Release);
    let assignment = match consumer.assignment() {
        Ok(a) => a,
        Err(err) => {
            tracing::warn!(error = %err, "could not read the assignment");
            return 0;
        }
    };
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    if let Err(err) = result {
        tracing::warn!(error = %err, pause, "could not change the paused state");
    }
    tracing::debug!(pause, partitions = assignment.count(), "backpressure");
    assignment.count()
}

/// Stop fetching, flush the open batch, let in-flight work finish, commit, close.
fn shutdown(
    consumer: BaseConsumer<ProcessorContext>,
    shared: &Arc<Shared>,
    limits: Limits,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limits.shutdown_timeout;
    let context = consumer.context();
    tracing::info!("shutting down: draining in-flight work");
    set_paused(&consumer, true);
    if let Some(batch) = lock(&context.batcher).flush(Instant::now()) {
        shared.dispatch(batch);
    }
    // Keep serving the group (rebalance callbacks, heartbeats) while work drains.
    while shared.tracker.pending() > 0 && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(20)) {
            // A record fetched before the pause took effect: leave it for after the restart.
            tracing::debug!(
                partition = message.partition(),
                offset = message.offset(),
                "not processing a record fetched during shutdown"
            );
        }
        if let Err(err) = shared.tracker.store(&consumer) {
            tracing::warn!(error = %err, "storing offsets failed");
        }
    }
    let left = shared.tracker.pending();
    if left > 0 {
        tracing::warn!(
            left,
            "shutdown deadline reached; unfinished records will be redelivered after the restart"
        );
    }
    shared.abort.cancel();
    context.shutting_down.store(true, Ordering::Release);
    // The group may be mid-rebalance (another member joining or leaving): the broker then
    // refuses commits until this member has rejoined, which needs polls. Keep serving the group
    // and retry until the commit lands or the deadline passes.
    loop {
        match shared.tracker.commit_now(&consumer, None) {
            Ok(()) => break,
            Err(err) if Instant::now() < deadline && commit_retriable(&err) => {
                tracing::debug!(error = %err, "final commit refused for now; polling and retrying");
                let _ = consumer.poll(Duration::from_millis(100));
            }
            Err(err) => {
                tracing::warn!(error = %err, "final commit failed; the last records may be redelivered");
                break;
            }
        }
    }
    // Nothing more will be stored; the revoke callback run by the close must not wait again.
    shared.tracker.revoke_all();
    lock(&shared.lanes).clear();
    if let Err(err) = shared.sink.flush(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1)),
    ) {
        tracing::warn!(error = %err, "producer flush incomplete");
    }
    // Leave the group now rather than on drop, so the partitions move at once.
    consumer.unsubscribe();
    drop(consumer);
    if let Some(reason) = lock(&shared.fatal_reason).take() {
        anyhow::bail!("stopped on a fatal Kafka client error: {reason}");
    }
    tracing::info!("processor stopped");
    Ok(())
}
