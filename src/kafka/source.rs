//! A consumer-group source: one consumer thread, micro-batches, bounded in-flight records,
//! ordered offset storage, rebalances and an orderly shutdown. Shared by the request processor
//! ([`crate::processor`]) and feature ingestion ([`crate::feature_store::ingest`]); what
//! happens to a batch is the [`BatchHandler`]'s business.
//!
//! # Flow
//!
//! One dedicated **consumer thread** owns the librdkafka consumer. It polls, registers each
//! record with the [`OffsetTracker`] (which hands back the record's ticket), adds it to the
//! [`Batcher`], and hands each batch to the handler, which spawns its work and calls
//! [`SourceCore::finish`] once per record. Batches are adaptive (see `consume`): the open batch
//! goes as soon as nothing more is ready and the handler has a free permit
//! ([`BatchHandler::ready`]); the batch limits and the linger time only apply while every
//! permit is busy. The thread is also where rebalance callbacks run, where partitions are
//! paused and resumed, and where offsets are stored or committed (through the source's
//! [`Commits`] strategy): a blocking thread can wait for revoked partitions to drain without
//! stalling the async workers.
//!
//! # Bounds and holds
//!
//! Records consumed and not yet finished are counted. At `max_in_flight` the consumer thread
//! stops taking records out of librdkafka and waits until finished records bring the count
//! below three quarters of it; the records stay in librdkafka's prefetch queue, which is
//! bounded (`queued.max.messages.kbytes` from `kafka.consumer_queue_kbytes`, and
//! `queued.min.messages`, set here to `max_in_flight` records). It does *not* pause partitions
//! for this: a pause drops the prefetched records and librdkafka fetches again only after up
//! to a second, which cost most of the throughput. While it waits it still polls every
//! [`LIVENESS_POLL_EVERY`] so rebalance callbacks run; a record such a poll returns is taken on
//! over the budget (at most one per poll). Only when the budget stays full for
//! [`PAUSE_AFTER_STALL`] (a stuck or very slow executor) are the partitions paused, so those
//! polls stop adding records. The handler can also *hold* consumption
//! ([`BatchHandler::hold`]: the database is down, a provider's breaker is open); partitions
//! are paused while it does.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::Timestamp;
use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Headers as _, Message};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;

use super::KafkaConfig;
use crate::batching::{Batch, BatchLimits, Batcher};
use crate::kafka::commit::Commits;
use crate::kafka::offsets::{OffsetTracker, Ticket, TopicPartition};
use crate::kafka::sink::{DeliverError, OutRecord, Sink};
use crate::kafka::transactional::Transactions;
use crate::metrics as m;
use crate::model::{ErrorBody, SourceRef};
use crate::tracing_otel::{TRACEPARENT, TRACESTATE, TraceHeaders};

/// Dead-letter (and result) header names.
pub mod headers {
    /// The request id (results).
    pub const REQUEST_ID: &str = "inferflow-request-id";
    /// `ok` or `error` (results).
    pub const STATUS: &str = "inferflow-status";
    /// Source topic of the record (results and dead letters).
    pub const SOURCE_TOPIC: &str = "inferflow-source-topic";
    /// Source partition (results and dead letters).
    pub const SOURCE_PARTITION: &str = "inferflow-source-partition";
    /// Source offset (results and dead letters).
    pub const SOURCE_OFFSET: &str = "inferflow-source-offset";
    /// Error kind (dead letters, and error results).
    pub const ERROR_KIND: &str = "inferflow-error-kind";
    /// Error message (dead letters).
    pub const ERROR_MESSAGE: &str = "inferflow-error-message";
    /// Original size in bytes of a value too large for the dead-letter topic, which then holds
    /// its first [`super::TRUNCATED_VALUE_BYTES`] bytes (dead letters).
    pub const VALUE_TRUNCATED: &str = "inferflow-value-truncated";
}

/// Bytes kept of a value too large for the dead-letter topic.
pub const TRUNCATED_VALUE_BYTES: usize = 65_536;

/// A consumed record, as batch handlers see it: its bytes, where it came from, and the ticket
/// that finishes it in the offset tracker. The topic name is shared by every record of the
/// partition (no string per record).
#[derive(Debug, Clone)]
pub struct Record {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    timestamp: Timestamp,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    /// The `traceparent`/`tracestate` the record came with, copied (rare: boxed).
    trace: Option<Box<TraceHeaders>>,
    ticket: Option<Ticket>,
}

impl Record {
    /// A record that is not tracked by any source: for tests, benchmarks and tools that feed a
    /// handler directly. Finishing it changes no offset.
    pub fn untracked(
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
    ) -> Record {
        Record {
            topic: Arc::from(topic),
            partition,
            offset,
            timestamp: Timestamp::NotAvailable,
            key,
            payload,
            trace: None,
            ticket: None,
        }
    }

    /// The same record, as if it had come with `trace` in its headers.
    pub fn with_trace(mut self, trace: TraceHeaders) -> Record {
        self.trace = Some(Box::new(trace));
        self
    }

    fn consumed(message: &BorrowedMessage<'_>, ticket: Ticket, topic: Arc<str>) -> Record {
        Record {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            trace: message.headers().and_then(trace_headers),
            ticket: Some(ticket),
        }
    }

    /// The `traceparent` and `tracestate` headers the record came with, as they came.
    pub fn trace(&self) -> Option<&TraceHeaders> {
        self.trace.as_deref()
    }

    /// The source topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The source partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The record's offset in its partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The record's Kafka timestamp.
    pub fn timestamp(&self) -> Timestamp {
        self.timestamp
    }

    /// The record's key.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The record's value.
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }

    /// The record's ticket in its source's offset tracker (none for an untracked record).
    pub(crate) fn ticket(&self) -> Option<Ticket> {
        self.ticket
    }
}

/// The trace-context headers among a record's headers: a scan of the header names, and a copy
/// only when `traceparent` is there. Records without headers never get here.
fn trace_headers(headers: &BorrowedHeaders) -> Option<Box<TraceHeaders>> {
    let (mut parent, mut state) = (None, None);
    for header in headers.iter() {
        if header.key.eq_ignore_ascii_case(TRACEPARENT) {
            parent = header.value;
        } else if header.key.eq_ignore_ascii_case(TRACESTATE) {
            state = header.value;
        }
    }
    TraceHeaders::from_bytes(parent, state).map(Box::new)
}

/// How often the consumer thread wakes up at the latest (to store offsets, flush lingering
/// batches and notice shutdown or holds).
const MAX_POLL_WAIT: Duration = Duration::from_millis(100);

/// How often the consumer thread stores the positions that advanced.
const STORE_EVERY: Duration = Duration::from_millis(50);

/// While the in-flight budget is full, how often the consumer thread still polls (without
/// waiting) so that rebalance callbacks run and the group sees it alive.
const LIVENESS_POLL_EVERY: Duration = Duration::from_millis(100);

/// How long the in-flight budget may stay full before the partitions are paused after all.
const PAUSE_AFTER_STALL: Duration = Duration::from_secs(1);

/// librdkafka's wait before fetching again for a partition whose prefetch queue was full
/// (`fetch.queue.backoff.ms`, default 1000). The queue drains as soon as the budget frees up,
/// so a second's wait would leave it empty; the cost of a shorter one is a wake-up of the
/// broker thread every few milliseconds while the queue is full.
const FETCH_QUEUE_BACKOFF_MS: &str = "20";

/// How often the consumer thread asks the handler for a hold and updates its gauges (not once
/// per record: a hold check may take a lock and build a string).
const HOLD_CHECK_EVERY: Duration = Duration::from_millis(100);

/// While a batch is open and every executor permit is busy, how often the consumer thread
/// looks again whether one has come free (it cannot be woken inside librdkafka's poll).
const PERMIT_CHECK_EVERY: Duration = Duration::from_millis(1);

/// Records the consumer thread takes from librdkafka in one pass at most, before it looks at
/// the clock, the batcher and the budget again.
const DRAIN_AT_MOST: usize = 1024;

/// What a source does with its batches.
pub trait BatchHandler: Send + Sync + 'static {
    /// Takes a closed batch and starts its work without blocking (the consumer thread calls
    /// this). Every record must end in exactly one [`SourceCore::finish`] call.
    fn dispatch(self: &Arc<Self>, batch: Batch<Record>);

    /// Whether a batch dispatched now would start at once (an executor permit is free). The
    /// consumer thread dispatches the open batch as soon as nothing more is ready in
    /// librdkafka and this says yes; while it says no, the batch keeps growing until its
    /// limits or its linger time. Called on every pass of the consumer loop: must be cheap.
    /// The default is always ready.
    fn ready(&self) -> bool {
        true
    }

    /// Why consumption must pause now, apart from backpressure; polled about ten times a
    /// second by the consumer thread, so it must be cheap.
    fn hold(&self) -> Option<String> {
        None
    }

    /// Called on the consumer thread when partitions are assigned, before any of their
    /// records is consumed. Must not block.
    fn assigned(&self, _partitions: &[TopicPartition]) {}

    /// Called once on shutdown, after the final commit, before the producer is flushed.
    fn close(&self) {}
}

/// State shared by the consumer thread and the handler's tasks.
pub struct SourceCore {
    /// Which source this is (`requests`, `features`): a metrics label and a log field.
    pub name: &'static str,
    /// Offsets in flight, per partition.
    pub tracker: OffsetTracker,
    /// Results, dead letters and other outputs.
    pub sink: Sink,
    /// The dead-letter topic.
    pub dlq_topic: String,
    in_flight: AtomicUsize,
    /// While the consumer thread waits for room in the budget: the in-flight count below
    /// which [`SourceCore::finish`] wakes it (0: nobody waits).
    wake_below: AtomicUsize,
    /// The consumer thread, woken through `wake_below`.
    consumer_thread: OnceLock<std::thread::Thread>,
    /// Cancelled when the shutdown deadline has passed: deliveries and retries stop.
    pub abort: CancellationToken,
    /// Cancelled on a fatal error; the consumer thread then shuts down and reports it.
    fatal: CancellationToken,
    fatal_reason: Mutex<Option<String>>,
    /// How progress is made durable: stored offsets, or transactions (exactly once).
    commits: Commits,
}

impl SourceCore {
    /// A core for the source `name`, writing through `sink`.
    pub fn new(name: &'static str, sink: Sink, dlq_topic: String) -> Self {
        SourceCore {
            name,
            tracker: OffsetTracker::new(),
            sink,
            dlq_topic,
            in_flight: AtomicUsize::new(0),
            wake_below: AtomicUsize::new(0),
            consumer_thread: OnceLock::new(),
            abort: CancellationToken::new(),
            fatal: CancellationToken::new(),
            fatal_reason: Mutex::new(None),
            commits: Commits::Stored,
        }
    }

    /// Makes this an exactly-once source: offsets are committed in `transactions`, never
    /// stored or auto-committed.
    pub fn with_transactions(mut self, transactions: Arc<Transactions>) -> Self {
        self.commits = Commits::Transactional(transactions);
        self
    }

    /// The transactional output stage, in exactly-once mode.
    pub fn transactions(&self) -> Option<&Arc<Transactions>> {
        self.commits.transactions()
    }

    /// Finishes `n` records without touching the tracker (exactly-once mode: once their
    /// outputs are committed or dropped).
    pub(crate) fn release(&self, n: usize) {
        if n > 0 {
            self.take_off(n);
        }
    }

    /// Records a fatal error and makes the consumer thread shut down.
    pub fn fail(&self, reason: String) {
        lock(&self.fatal_reason).get_or_insert(reason);
        self.fatal.cancel();
    }

    /// Ends the work on one record. `done` means its output was acknowledged, so its offset may
    /// be stored; otherwise (only on shutdown or a fatal error) it stays pending and is
    /// redelivered after the restart.
    pub fn finish(&self, msg: &Record, done: bool) {
        if let (true, Some(ticket)) = (done, msg.ticket) {
            self.tracker.complete(ticket);
        }
        self.finished(1);
    }

    /// Takes `n` finished records off the in-flight count, and wakes the consumer thread if it
    /// waits for room below the new count.
    fn finished(&self, n: usize) {
        let before = self.take_off(n);
        debug_assert!(
            before >= n,
            "{} source: {n} records finished with only {before} in flight (a record finished twice?)",
            self.name
        );
    }

    /// Takes `n` off the in-flight count, saturating at zero: a record finished twice (a bug)
    /// must not wrap the counter, which would stop consumption for good. Wakes the consumer
    /// thread if it waits for room below the new count. Returns the count before.
    fn take_off(&self, n: usize) -> usize {
        let before = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(n))
            })
            .unwrap_or(0);
        let left = before.saturating_sub(n);
        let wake_below = self.wake_below.load(Ordering::SeqCst);
        if left < wake_below
            && self.wake_below.swap(0, Ordering::SeqCst) != 0
            && let Some(thread) = self.consumer_thread.get()
        {
            thread.unpark();
        }
        before
    }

    /// Called on the consumer thread: blocks until fewer than `below` records are in flight,
    /// or for `timeout` at most.
    fn wait_below(&self, below: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.wake_below.store(below, Ordering::SeqCst);
        // `finish` reads `wake_below` after its decrement, and this reads the count after
        // setting it, so at least one side sees the other: no wake-up is lost (and an unpark
        // that comes first makes the next park return at once).
        while self.in_flight.load(Ordering::SeqCst) >= below {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::park_timeout(deadline - now);
        }
        self.wake_below.store(0, Ordering::SeqCst);
    }

    /// Records consumed and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Dead-letters `msg`: its key and bytes to the dead-letter topic, with the error and the
    /// source in headers. A dead letter Kafka refuses for good cannot be dropped either: it is
    /// retried every 5 s, loudly, until accepted or the shutdown deadline passes.
    pub async fn dead_letter(&self, msg: &Record, error: &ErrorBody) -> Result<(), DeliverError> {
        self.dead_letter_traced(msg, error, msg.trace()).await
    }

    /// [`Self::dead_letter`] with `trace` as its `traceparent`/`tracestate` (the request's span
    /// when tracing is on; [`Self::dead_letter`] copies the record's own).
    pub async fn dead_letter_traced(
        &self,
        msg: &Record,
        error: &ErrorBody,
        trace: Option<&TraceHeaders>,
    ) -> Result<(), DeliverError> {
        let mut record = dead_letter_record(&self.dlq_topic, msg, error, trace);
        let source = source_ref(msg);
        loop {
            match self.sink.deliver(&record, &self.abort).await {
                Ok(()) => {
                    metrics::counter!(m::DEAD_LETTERS_TOTAL, "error_kind" => error.kind.as_str(), "source" => self.name)
                        .increment(1);
                    return Ok(());
                }
                Err(DeliverError::Permanent(err))
                    if is_size_error(&err) && record.value.len() > TRUNCATED_VALUE_BYTES =>
                {
                    // Too large for the dead-letter topic: keep the head of the value and say
                    // how large it was, rather than stall the partition for good.
                    tracing::warn!(error = %err, bytes = record.value.len(), partition = source.partition, offset = source.offset,
                        "dead letter too large; sending its first {TRUNCATED_VALUE_BYTES} bytes");
                    record
                        .headers
                        .push((headers::VALUE_TRUNCATED, record.value.len().to_string()));
                    record.value.truncate(TRUNCATED_VALUE_BYTES);
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

    /// Finishes a record after its delivery: stores nothing and stops the source on a fatal
    /// producer error, leaves the record pending on shutdown.
    pub fn finish_delivered(&self, msg: &Record, delivered: Result<(), DeliverError>) {
        match delivered {
            Ok(()) => self.finish(msg, true),
            Err(DeliverError::Fatal(reason)) => {
                tracing::error!(reason = %reason, source = self.name, "fatal producer error; stopping");
                self.fail(reason);
                self.finish(msg, false);
            }
            Err(err) => {
                tracing::warn!(error = %err, source = self.name, partition = msg.partition(), offset = msg.offset(),
                    "output not delivered before shutdown; the record will be redelivered");
                self.finish(msg, false);
            }
        }
    }
}

/// Whether Kafka refused a record for its size.
fn is_size_error(err: &rdkafka::error::KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
    )
}

/// The dead letter of `msg`: its key and bytes for the dead-letter topic, the error and the
/// source in headers, and `trace` as `traceparent`/`tracestate`.
pub(crate) fn dead_letter_record(
    dlq_topic: &str,
    msg: &Record,
    error: &ErrorBody,
    trace: Option<&TraceHeaders>,
) -> OutRecord {
    let mut headers = vec![
        (headers::ERROR_KIND, error.kind.as_str().to_owned()),
        (headers::ERROR_MESSAGE, error.message.clone()),
        (headers::SOURCE_TOPIC, msg.topic().to_owned()),
        (headers::SOURCE_PARTITION, msg.partition().to_string()),
        (headers::SOURCE_OFFSET, msg.offset().to_string()),
    ];
    if let Some(trace) = trace {
        trace.each(|key, value| headers.push((key, value.to_owned())));
    }
    OutRecord {
        topic: dlq_topic.to_owned(),
        key: msg.key().map(<[u8]>::to_vec),
        value: msg.payload().unwrap_or_default().to_vec(),
        headers,
    }
}

/// Where a consumed record came from.
pub fn source_ref(msg: &Record) -> SourceRef {
    SourceRef {
        topic: msg.topic().to_owned(),
        partition: msg.partition(),
        offset: msg.offset(),
    }
}

/// What a source consumes and its limits.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Consumer group.
    pub group_id: String,
    /// Micro-batch limits.
    pub batch: BatchLimits,
    /// Records in flight at most: the consumer takes no more from librdkafka until fewer than
    /// three quarters of this are left.
    pub max_in_flight: usize,
    /// Longest orderly shutdown.
    pub shutdown_timeout: Duration,
    /// How long revoked partitions may drain on a rebalance.
    pub rebalance_drain_timeout: Duration,
    /// Counter of consumed records.
    pub consumed_metric: &'static str,
}

/// A running source.
pub struct SourceHandle {
    done: tokio::sync::oneshot::Receiver<anyhow::Result<()>>,
    shutdown_timeout: Duration,
}

impl SourceHandle {
    /// Waits until the source has stopped (after its stop token was cancelled, or on a fatal
    /// error). Callers bound the wait with [`SourceHandle::shutdown_timeout`] plus a margin, so
    /// a hanging consumer close cannot keep the process alive.
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

/// Subscribes to the spec's topics and starts the consumer thread. Cancel `stop` to shut it
/// down gracefully, then await [`SourceHandle::join`].
pub fn start<H: BatchHandler>(
    kafka: &KafkaConfig,
    spec: SourceSpec,
    core: Arc<SourceCore>,
    handler: Arc<H>,
    stop: CancellationToken,
) -> anyhow::Result<SourceHandle> {
    let context = SourceContext {
        core: Arc::clone(&core),
        handler: Arc::clone(&handler),
        batcher: Mutex::new(Batcher::new(spec.batch)),
        paused: AtomicBool::new(false),
        shutting_down: AtomicBool::new(false),
        rebalance_drain_timeout: spec.rebalance_drain_timeout,
        leave_group_on_stop: kafka.group_instance_id.is_none(),
    };
    let mut client = crate::kafka::consumer_config(kafka, &spec.group_id);
    core.commits.configure(&mut client);
    client
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set(
            "queued.max.messages.kbytes",
            kafka.consumer_queue_kbytes.to_string(),
        )
        .set(
            "statistics.interval.ms",
            kafka.statistics_interval_ms.to_string(),
        );
    // The prefetch queue holds what the budget leaves in librdkafka: bounded in bytes above,
    // and in records here (librdkafka's default is 100,000). Both may be overshot by one fetch
    // response. `kafka.extra` may set either of these two.
    if client.get("queued.min.messages").is_none() {
        client.set(
            "queued.min.messages",
            spec.max_in_flight.clamp(1, 10_000_000).to_string(),
        );
    }
    if client.get("fetch.queue.backoff.ms").is_none() {
        client.set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
    }
    let consumer: BaseConsumer<SourceContext<H>> = client
        .create_with_context(context)
        .with_context(|| format!("creating the Kafka consumer of the {} source", core.name))?;
    let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .with_context(|| format!("subscribing to {}", spec.topics.join(", ")))?;
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let shutdown_timeout = spec.shutdown_timeout;
    std::thread::Builder::new()
        .name(format!("inferflow-{}", core.name))
        .spawn(move || {
            let _ = consumer
                .context()
                .core
                .consumer_thread
                .set(std::thread::current());
            let result = consume(consumer, &spec, &stop);
            let _ = done_tx.send(result);
        })
        .context("starting the consumer thread")?;
    Ok(SourceHandle {
        done,
        shutdown_timeout,
    })
}

fn topic_partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// The consumer's context: rebalance hooks, statistics and commit results.
struct SourceContext<H> {
    core: Arc<SourceCore>,
    handler: Arc<H>,
    batcher: Mutex<Batcher<Record>>,
    /// True while every assigned partition is paused (a long backpressure stall or a hold).
    paused: AtomicBool,
    /// Set once shutdown has drained what it could: revokes then give up at once.
    shutting_down: AtomicBool,
    rebalance_drain_timeout: Duration,
    /// Dynamic membership: leave the group on a graceful stop, so the partitions move at once.
    /// A static member (`kafka.group_instance_id`) stays, so that its restart takes them back
    /// without a rebalance.
    leave_group_on_stop: bool,
}

impl<H: BatchHandler> ClientContext for SourceContext<H> {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if let Some(lag) = reported_lag(*partition, p.desired, p.consumer_lag) {
                    metrics::gauge!(m::CONSUMER_LAG_RECORDS, "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(lag);
                }
            }
        }
    }
}

/// The consumer lag this instance reports for a partition of its statistics, if any: the lag
/// librdkafka computed for a partition it owns (`desired`), once known; 0 for one it does not
/// own. librdkafka keeps computing a lag for a partition after a rebalance took it away, frozen
/// at its last value, which would otherwise stay in this instance's gauge beside the new
/// owner's (and keep lag alerts firing). `None` for librdkafka's internal partition (-1) and
/// an owned partition whose lag is not known yet.
fn reported_lag(partition: i32, owned: bool, consumer_lag: i64) -> Option<f64> {
    if partition < 0 {
        None
    } else if !owned {
        Some(0.0)
    } else if consumer_lag >= 0 {
        Some(consumer_lag as f64)
    } else {
        None
    }
}

impl<H: BatchHandler> ConsumerContext for SourceContext<H> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let core = &self.core;
        let partitions = topic_partitions(tpl);
        if consumer.assignment_lost() {
            // Someone else may already own them: commit nothing, forget the work.
            metrics::counter!(m::REBALANCES_TOTAL, "kind" => "lost", "source" => core.name)
                .increment(1);
            tracing::warn!(
                ?partitions,
                source = core.name,
                "assignment lost; in-flight work of these partitions will be redelivered"
            );
            core.commits.lost(core, &partitions);
            return;
        }
        metrics::counter!(m::REBALANCES_TOTAL, "kind" => "revoke", "source" => core.name)
            .increment(1);
        // Records of these partitions may sit in the open batch: send it on now.
        if let Some(batch) = lock(&self.batcher).flush(Instant::now()) {
            self.handler.dispatch(batch);
        }
        let drain_for = if self.shutting_down.load(Ordering::Acquire) {
            Duration::ZERO
        } else {
            self.rebalance_drain_timeout
        };
        let left = core.tracker.wait_drained(&partitions, drain_for);
        if left > 0 {
            tracing::warn!(
                left,
                source = core.name,
                "revoked partitions did not drain in time; their unfinished records will be redelivered"
            );
        }
        core.commits.revoked(core, consumer, &partitions);
        tracing::info!(?partitions, source = core.name, "partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                metrics::counter!(m::REBALANCES_TOTAL, "kind" => "assign", "source" => self.core.name)
                    .increment(1);
                let partitions = topic_partitions(tpl);
                tracing::info!(?partitions, source = self.core.name, "partitions assigned");
                self.handler.assigned(&partitions);
                self.core.commits.assigned(&self.core, partitions);
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
                tracing::warn!(error = %err, source = self.core.name, "offset commit failed; it is retried with the next commit")
            }
        }
    }
}

/// Locks `m`, using the data even if another thread panicked while holding it (every user of
/// these locks leaves the data consistent between statements).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The consumer thread's loop, then its orderly shutdown.
///
/// # Batching rule
///
/// Each pass polls librdkafka (blocking at most until something is due), then takes every
/// record that is ready without waiting, up to [`DRAIN_AT_MOST`] or the in-flight budget. When
/// nothing more is ready and the handler has a free permit ([`BatchHandler::ready`]), the open
/// batch is dispatched at once: an idle processor answers without delay, and under load
/// batches grow by themselves from what queued while the permits were busy. While every
/// permit is busy the batch keeps growing, up to its record and byte limits, and is dispatched
/// when a permit comes free (checked every [`PERMIT_CHECK_EVERY`]) or when `linger` has passed
/// since its first record, whichever comes first. So `batch.linger_ms` bounds the wait; it is
/// not a fixed delay.
fn consume<H: BatchHandler>(
    consumer: BaseConsumer<SourceContext<H>>,
    spec: &SourceSpec,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let context = consumer.context();
    let core = Arc::clone(&context.core);
    // Once the budget is full, records are taken again below three quarters of it, so the
    // thread wakes once per quarter budget rather than once per finished record.
    let resume_below = spec.max_in_flight - spec.max_in_flight / 4;
    let mut full_since: Option<Instant> = None;
    let mut held: Option<String> = None;
    let mut paused_count = 0usize;
    let mut now = Instant::now();
    let mut last_store = now;
    let mut last_poll = now;
    let mut last_hold_check: Option<Instant> = None;
    // Looked up once: the macro hashes the key and searches the registry on every call.
    let consumed = metrics::counter!(spec.consumed_metric);
    while !stop.is_cancelled() && !core.fatal.is_cancelled() {
        // One clock read per pass: everything below that needs the time uses this one.
        now = Instant::now();
        // Backpressure: at the budget, stop taking records (they wait in librdkafka's bounded
        // queue); only a stall longer than PAUSE_AFTER_STALL pauses the partitions. A hold from
        // the handler pauses them too, for as long as it lasts.
        let in_flight = core.in_flight();
        let full = if full_since.is_some() {
            in_flight >= resume_below
        } else {
            in_flight >= spec.max_in_flight
        };
        if !full {
            full_since = None;
        } else if full_since.is_none() {
            full_since = Some(now);
        }
        let stalled = full_since.is_some_and(|t| now.duration_since(t) >= PAUSE_AFTER_STALL);
        let check_hold = last_hold_check.is_none_or(|t| now.duration_since(t) >= HOLD_CHECK_EVERY);
        if check_hold {
            last_hold_check = Some(now);
            let hold = context.handler.hold();
            // Logged when a hold starts or ends, not each time its reason's wording changes.
            if hold.is_some() != held.is_some() {
                match &hold {
                    Some(reason) => {
                        tracing::warn!(source = core.name, reason = %reason, "pausing consumption")
                    }
                    None => tracing::info!(source = core.name, "resuming consumption"),
                }
                held = hold;
            }
        }
        let want_paused = stalled || held.is_some();
        if want_paused != context.paused.load(Ordering::Acquire) {
            paused_count = set_paused(&consumer, want_paused);
        }
        if check_hold {
            metrics::gauge!(m::IN_FLIGHT_RECORDS, "source" => core.name).set(in_flight as f64);
            metrics::gauge!(m::PAUSED_PARTITIONS, "source" => core.name).set(if want_paused {
                paused_count as f64
            } else {
                0.0
            });
        }

        let mut wait = match lock(&context.batcher).deadline() {
            // A batch waits for a permit: look again soon, and never past its linger.
            Some(deadline) => deadline
                .saturating_duration_since(now)
                .min(PERMIT_CHECK_EVERY),
            None => MAX_POLL_WAIT,
        };
        if full && !want_paused {
            // Leave the records in librdkafka until finished ones make room, but poll (without
            // waiting) at least every LIVENESS_POLL_EVERY for the rebalance callbacks.
            let poll_due = LIVENESS_POLL_EVERY.saturating_sub(now.duration_since(last_poll));
            if !poll_due.is_zero() {
                core.wait_below(resume_below, wait.min(poll_due));
                dispatch_due(context, Instant::now(), false);
                store_due(&consumer, &core, &mut last_store, now);
                continue;
            }
            wait = Duration::ZERO;
        }
        last_poll = now;
        // The first poll may wait; then take what is ready without waiting, within the budget.
        let mut taken = 0usize;
        let mut drained = false;
        loop {
            match consumer.poll(if taken == 0 { wait } else { Duration::ZERO }) {
                Some(Ok(message)) => {
                    if taken == 0 && !wait.is_zero() {
                        // The poll may have waited: the batch's clock starts now.
                        now = Instant::now();
                    }
                    consumed.increment(1);
                    if let Some((ticket, topic)) =
                        core.tracker
                            .begin(message.topic(), message.partition(), message.offset())
                    {
                        let record = Record::consumed(&message, ticket, topic);
                        drop(message);
                        core.in_flight.fetch_add(1, Ordering::AcqRel);
                        let size = record.payload.as_ref().map_or(0, Vec::len);
                        let closed = lock(&context.batcher).push(record, size, now);
                        if let Some((batch, _)) = closed {
                            context.handler.dispatch(batch);
                        }
                    }
                }
                Some(Err(err)) => {
                    if let Some((code, reason)) = consumer.client().fatal_error() {
                        core.fail(format!("consumer: {code}: {reason}"));
                    } else {
                        tracing::warn!(error = %err, source = core.name, "consumer error");
                    }
                    break;
                }
                None => {
                    drained = true;
                    break;
                }
            }
            taken += 1;
            if taken >= DRAIN_AT_MOST
                || core.in_flight() >= spec.max_in_flight
                || stop.is_cancelled()
            {
                break;
            }
        }
        // Nothing more is ready: a free permit takes the open batch now.
        dispatch_due(
            context,
            if taken > 0 { now } else { Instant::now() },
            drained,
        );
        store_due(&consumer, &core, &mut last_store, now);
    }
    shutdown(consumer, spec)
}

/// Dispatches the open batch when nothing more is ready (`drained`) and the handler has a
/// free permit, or when its linger time has passed by `now`.
fn dispatch_due<H: BatchHandler>(context: &SourceContext<H>, now: Instant, drained: bool) {
    let batch = {
        let mut batcher = lock(&context.batcher);
        if batcher.is_empty() {
            return;
        }
        if drained && context.handler.ready() {
            batcher.flush(now)
        } else {
            batcher.poll_linger(now)
        }
    };
    if let Some(batch) = batch {
        context.handler.dispatch(batch);
    }
}

/// Stores the positions that advanced (at least once; auto-commit commits them) or commits a
/// transaction when one is due (exactly once).
fn store_progress<H: BatchHandler>(core: &SourceCore, consumer: &BaseConsumer<SourceContext<H>>) {
    core.commits.progress(core, consumer);
}

/// Stores the positions that advanced, at most every [`STORE_EVERY`].
fn store_due<H: BatchHandler>(
    consumer: &BaseConsumer<SourceContext<H>>,
    core: &SourceCore,
    last_store: &mut Instant,
    now: Instant,
) {
    if now.duration_since(*last_store) >= STORE_EVERY {
        *last_store = now;
        store_progress(core, consumer);
    }
}

/// Pauses (or resumes) every assigned partition; returns how many.
fn set_paused<H: BatchHandler>(consumer: &BaseConsumer<SourceContext<H>>, pause: bool) -> usize {
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
    tracing::debug!(
        pause,
        partitions = assignment.count(),
        source = context.core.name,
        "pause state"
    );
    assignment.count()
}

/// Stop fetching, flush the open batch, let in-flight work finish, commit, close.
fn shutdown<H: BatchHandler>(
    consumer: BaseConsumer<SourceContext<H>>,
    spec: &SourceSpec,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + spec.shutdown_timeout;
    let context = consumer.context();
    let core = Arc::clone(&context.core);
    tracing::info!(source = core.name, "shutting down: draining in-flight work");
    set_paused(&consumer, true);
    if let Some(batch) = lock(&context.batcher).flush(Instant::now()) {
        context.handler.dispatch(batch);
    }
    // Keep serving the group (rebalance callbacks, heartbeats) while work drains.
    while core.tracker.pending() > 0 && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(20)) {
            // A record fetched before the pause took effect: leave it for after the restart.
            tracing::debug!(
                partition = message.partition(),
                offset = message.offset(),
                "not processing a record fetched during shutdown"
            );
        }
        store_progress(&core, &consumer);
    }
    let left = core.tracker.pending();
    if left > 0 {
        tracing::warn!(
            left,
            source = core.name,
            "shutdown deadline reached; unfinished records will be redelivered after the restart"
        );
    }
    core.abort.cancel();
    context.shutting_down.store(true, Ordering::Release);
    // The last commit, then nothing more is stored; the revoke callback run by the close
    // must not wait again.
    core.commits.finish(&core, &consumer, deadline);
    context.handler.close();
    if let Err(err) = core.sink.flush(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1)),
    ) {
        tracing::warn!(error = %err, "producer flush incomplete");
    }
    // A dynamic member leaves the group now rather than on drop, so the partitions move at
    // once. A static member must not leave: it closes without unsubscribing, and librdkafka
    // sends no LeaveGroup for a static member that closes (KIP-345), so its restart within
    // `kafka.session_timeout_ms` takes the same partitions back. (An unsubscribe would send
    // one whenever the revoke it starts completes before the close.)
    if context.leave_group_on_stop {
        consumer.unsubscribe();
    }
    drop(consumer);
    if let Some(reason) = lock(&core.fatal_reason).take() {
        anyhow::bail!("stopped on a fatal Kafka client error: {reason}");
    }
    tracing::info!(source = core.name, "stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> Arc<SourceCore> {
        // Creating a producer does not connect; nothing is sent in these tests.
        let producer =
            Sink::create(rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:1"))
                .unwrap();
        Arc::new(SourceCore::new("test", producer, "dlq".into()))
    }

    fn message(offset: i64) -> Record {
        Record::untracked("t", 0, offset, None, None)
    }

    #[test]
    fn lag_is_reported_for_owned_partitions_and_zero_for_the_others() {
        assert_eq!(reported_lag(3, true, 1200), Some(1200.0));
        assert_eq!(reported_lag(3, true, 0), Some(0.0));
        // Owned, lag not known yet (nothing committed): nothing to say.
        assert_eq!(reported_lag(3, true, -1), None);
        // Taken away by a rebalance: librdkafka still computes a (frozen) lag; it is not ours.
        assert_eq!(reported_lag(3, false, 1200), Some(0.0));
        assert_eq!(reported_lag(3, false, -1), Some(0.0));
        // librdkafka's internal unassigned-partition entry.
        assert_eq!(reported_lag(-1, true, 5), None);
    }

    #[test]
    fn finishing_records_wakes_the_waiting_consumer_thread() {
        let core = core();
        core.consumer_thread.set(std::thread::current()).unwrap();
        core.in_flight.store(4, Ordering::SeqCst);
        let worker = {
            let core = Arc::clone(&core);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                core.finish(&message(0), false);
                core.finish(&message(1), false);
            })
        };
        let started = Instant::now();
        core.wait_below(3, Duration::from_secs(10));
        worker.join().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "woken by finish, not by the timeout"
        );
        assert!(core.in_flight() < 3);
        assert_eq!(
            core.wake_below.load(Ordering::SeqCst),
            0,
            "nobody waits any more"
        );
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "a record finished twice?")]
    fn a_record_finished_twice_is_named_in_debug_builds() {
        let core = core();
        core.in_flight.store(1, Ordering::SeqCst);
        core.finish(&message(0), false);
        core.finish(&message(0), false);
    }

    #[test]
    fn releasing_more_than_is_in_flight_does_not_wedge_the_budget() {
        // What a double finish does in a release build: the count stops at zero instead of
        // wrapping to usize::MAX, which would keep the consumer thread waiting for room forever.
        let core = core();
        core.consumer_thread.set(std::thread::current()).unwrap();
        core.in_flight.store(1, Ordering::SeqCst);
        core.release(2);
        assert_eq!(core.in_flight(), 0);
        let started = Instant::now();
        core.wait_below(1, Duration::from_secs(10));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "room at once after a double release"
        );
    }

    #[test]
    fn waiting_for_room_gives_up_at_the_timeout() {
        let core = core();
        core.consumer_thread.set(std::thread::current()).unwrap();
        core.in_flight.store(4, Ordering::SeqCst);
        let started = Instant::now();
        core.wait_below(3, Duration::from_millis(30));
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(core.in_flight(), 4);
        // Room already there: no wait at all.
        let started = Instant::now();
        core.wait_below(5, Duration::from_secs(10));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
