//! The stream processor: requests from Kafka → micro-batches → bounded executor → results keyed
//! by request id, with nothing lost.
//!
//! The consumer thread, micro-batching, backpressure, rebalances, offsets and shutdown are the
//! generic [`crate::kafka::source`]; this module is its [`BatchHandler`] for requests.
//!
//! Each **batch task** takes one of `executor.max_in_flight_batches` permits, decodes its
//! records, waits for the executor to admit them ([`Executor::admit`]: rate limits, open
//! breakers), runs them through the [`Executor`] grouped by target under the execute timeout,
//! releases the permit, then delivers one output per record (a result, or a dead letter when
//! no request id could be read) and finishes each record once the broker acknowledged its
//! output. While [`Executor::hold`] gives a reason, the source pauses its partitions.
//!
//! # Bounds
//!
//! Records consumed and not yet answered are counted by the source; at
//! `executor.max_in_flight_records` it stops taking records out of librdkafka's bounded
//! prefetch queue until finished records make room (see [`crate::kafka::source`]). Batches
//! waiting for a permit are part of that count, so memory is bounded by records, not by
//! batches.

use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures::FutureExt as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::batching::{Batch, BatchLimits};
use crate::config::{Config, Guarantee, KeyOrdering};
use crate::decode::{DecodeRules, Decoded, decode};
use crate::executor::{ExecOutput, ExecRequest, ExecResult, Executor};
use crate::kafka::sink::{Acknowledge, Borrowed, DeliverError, OutRecord, QUEUE_FULL_WAIT, Sink};
use crate::kafka::source::{self, BatchHandler, Record, SourceCore, SourceSpec, lock, source_ref};
use crate::kafka::transactional::{self, Transactions};
use crate::metrics as m;
use crate::model::{ErrorBody, ErrorKind, InferenceResult, SourceRef, Status, Target};
use crate::replay::{self, ReplayStore};
use crate::tracing_otel::{self as otel, Arrival, TraceHeaders};

pub use crate::kafka::source::SourceHandle as ProcessorHandle;
pub use crate::kafka::source::headers;

/// State shared by the batch tasks (the source's state is in `core`).
struct Shared {
    core: Arc<SourceCore>,
    executor: Arc<dyn Executor>,
    rules: DecodeRules,
    results_topic: String,
    execute_timeout: Duration,
    batch_permits: Arc<Semaphore>,
    /// `executor.ordering = "per_key"`.
    per_key: bool,
    /// Per-key mode: one sender per lane worker (empty when unordered). Cleared at shutdown so
    /// the workers end. Each lane's channel holds at most `max_in_flight_records` batches (a
    /// batch has at least one record, and consumption stops at that many records), so a send
    /// never finds it full and the consumer thread never blocks.
    lanes: Mutex<Vec<tokio::sync::mpsc::Sender<Vec<Record>>>>,
    runtime: Handle,
    /// Earlier results by request id, for redelivered requests (`[replay]`).
    replay: Option<ReplayStore>,
    metrics: Handles,
}

/// Metric handles looked up once, not per record (`metrics::counter!` with labels hashes the
/// key and searches the registry on every call).
struct Handles {
    results_ok: metrics::Counter,
    end_to_end: metrics::Histogram,
    batch_size: metrics::Histogram,
    batch_linger: metrics::Histogram,
}

impl Handles {
    fn new() -> Self {
        Handles {
            results_ok: metrics::counter!(m::RESULTS_TOTAL, "status" => Status::Ok.as_str(), "error_kind" => ""),
            end_to_end: metrics::histogram!(m::END_TO_END_LATENCY_SECONDS),
            batch_size: metrics::histogram!(m::BATCH_SIZE_RECORDS, "source" => "requests"),
            batch_linger: metrics::histogram!(m::BATCH_LINGER_SECONDS),
        }
    }

    /// Counts a delivered result by status and error kind.
    fn count_result(&self, error: Option<ErrorKind>) {
        match error {
            None => self.results_ok.increment(1),
            Some(kind) => metrics::counter!(m::RESULTS_TOTAL, "status" => Status::Error.as_str(), "error_kind" => kind.as_str())
                .increment(1),
        }
    }
}

impl BatchHandler for Shared {
    fn dispatch(self: &Arc<Self>, batch: Batch<Record>) {
        Shared::dispatch(self, batch);
    }

    fn ready(&self) -> bool {
        self.batch_permits.available_permits() > 0
    }

    fn hold(&self) -> Option<String> {
        self.executor.hold()
    }

    fn assigned(&self, partitions: &[(String, i32)]) {
        if let Some(store) = &self.replay {
            store.assigned(partitions);
        }
    }

    fn close(&self) {
        lock(&self.lanes).clear();
    }
}

impl Shared {
    /// Hands a closed batch to a new task.
    ///
    /// Unordered, each batch gets its own task. Per key, the batch is split into lanes by key
    /// hash and each lane's worker runs its batches one after another, so records with the same
    /// key run in consumption order while different keys still run concurrently.
    fn dispatch(self: &Arc<Self>, batch: Batch<Record>) {
        self.metrics.batch_size.record(batch.items.len() as f64);
        self.metrics
            .batch_linger
            .record(batch.lingered.as_secs_f64());
        if !self.per_key {
            // Taken here, on the consumer thread, so `ready` sees it at once.
            let permit = Arc::clone(&self.batch_permits).try_acquire_owned().ok();
            let shared = Arc::clone(self);
            self.runtime
                .spawn(async move { shared.process_batch(batch.items, permit).await });
            return;
        }
        let lanes = lock(&self.lanes).clone();
        if lanes.is_empty() {
            // Only after shutdown cleared the lanes: the records stay pending and are
            // redelivered after the restart.
            tracing::warn!("per-key lanes are closed; the batch will be redelivered");
            return;
        }
        let mut split: Vec<Vec<Record>> = vec![Vec::new(); lanes.len()];
        for message in batch.items {
            let lane = lane_of(message.key(), lanes.len());
            split[lane].push(message);
        }
        for (lane, items) in lanes.iter().zip(split) {
            if items.is_empty() {
                continue;
            }
            match lane.try_send(items) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(items)) => {
                    // Cannot happen while the channel's capacity is the record budget; should
                    // it, wait in a task rather than block the consumer thread.
                    let lane = lane.clone();
                    self.runtime.spawn(async move {
                        let _ = lane.send(items).await;
                    });
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    // Only after shutdown cleared the lanes: the records stay pending, their
                    // offsets are not stored, and they are redelivered after the restart.
                    tracing::warn!("a lane worker has stopped; its records will be redelivered");
                }
            }
        }
    }

    async fn process_batch(
        self: Arc<Self>,
        messages: Vec<Record>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let permit = match permit {
            Some(permit) => permit,
            None => match Arc::clone(&self.batch_permits).acquire_owned().await {
                Ok(permit) => permit,
                Err(_) => return, // The semaphore is never closed.
            },
        };
        let arrived = Instant::now();
        // Tracing on: one span per request, child of the context it came with (empty when off).
        let spans: Vec<Option<otel::Context>> = if otel::enabled() {
            messages
                .iter()
                .map(|m| {
                    otel::request_span(
                        m.trace(),
                        Arrival::Kafka(m.topic(), m.partition(), m.offset()),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        // Executors are pluggable code: a panic must not lose the batch's records (they would
        // stay in flight for good). Every record is then answered with an `internal` error.
        let (mut outcomes, fingerprints) = match AssertUnwindSafe(self.compute(&messages, &spans))
            .catch_unwind()
            .await
        {
            Ok(computed) => computed,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                tracing::error!(panic = %what, records = messages.len(), "processing a batch panicked; answering its records with internal errors");
                (self.after_panic(&messages, &what), Vec::new())
            }
        };
        drop(permit);
        let latency = arrived.elapsed();
        // What each output carries: the request span as parent (tracing on), or the record's
        // own headers unchanged (off: `traces` is empty).
        let traces: Vec<Option<TraceHeaders>> = spans
            .iter()
            .zip(&outcomes)
            .map(|(span, (outcome, _))| {
                let error = match outcome {
                    Outcome::Answer(_, _, result) => error_kind(result).map(ErrorKind::as_str),
                    Outcome::DeadLetter(error) => Some(error.kind.as_str()),
                    Outcome::Running => Some(ErrorKind::Internal.as_str()),
                };
                span.as_ref().and_then(|cx| otel::finish_request(cx, error))
            })
            .collect();
        if let Some(txn) = self.core.transactions() {
            for (i, (msg, (outcome, reply_to))) in messages.iter().zip(&mut outcomes).enumerate() {
                let trace = trace_of(&traces, i, msg);
                self.hold_output(txn, msg, outcome, reply_to.take(), latency, trace);
            }
            self.keep_for_replay(messages, outcomes, fingerprints).await;
            return;
        }
        let answers = Arc::new(Answers {
            shared: Arc::clone(&self),
            messages,
            outcomes,
            fingerprints,
            traces,
            latency,
        });
        answers.send().await;
    }

    /// Keeps the executed outputs of a batch for redeliveries (they move into the store).
    async fn keep_for_replay(
        &self,
        messages: Vec<Record>,
        outcomes: Vec<(Outcome, Option<String>)>,
        fingerprints: Vec<Option<u64>>,
    ) {
        let Some(store) = &self.replay else {
            return;
        };
        let executed: Vec<(String, u64, ExecOutput)> = fingerprints
            .into_iter()
            .zip(outcomes)
            .filter_map(|(fingerprint, (outcome, _))| match (fingerprint, outcome) {
                (Some(fingerprint), Outcome::Answer(id, _, Ok(output))) => {
                    Some((id, fingerprint, output))
                }
                _ => None,
            })
            .collect();
        if !executed.is_empty() {
            store.keep(executed, next_offsets(&messages)).await;
        }
    }

    /// Decodes and executes a batch: one outcome (and optional `reply_to`) per message, and
    /// per message the fingerprint of its bytes when it was executed (its output is then kept
    /// for a redelivery; empty without a replay store).
    async fn compute(
        &self,
        messages: &[Record],
        spans: &[Option<otel::Context>],
    ) -> (Vec<(Outcome, Option<String>)>, Vec<Option<u64>>) {
        let now_ms = unix_ms();
        let batch_now = Instant::now();
        let mut outcomes: Vec<(Outcome, Option<String>)> = Vec::with_capacity(messages.len());
        let mut runnable: Vec<(usize, Target, ExecRequest)> = Vec::new();
        // Per message: the fingerprint of a request that is to be executed, so its result can
        // be kept for a redelivery.
        let mut fingerprints: Vec<Option<u64>> = if self.replay.is_some() {
            vec![None; messages.len()]
        } else {
            Vec::new()
        };
        // Requests not kept in process, to look up in the replay store's database first.
        let mut unseen: Vec<(usize, crate::model::InferenceRequest, Target)> = Vec::new();
        let durable = self.replay.as_ref().filter(|store| store.is_durable());
        for (i, msg) in messages.iter().enumerate() {
            let outcome = match decode(msg.payload(), &self.rules, now_ms) {
                Decoded::Request { request, target } if self.replay.is_some() => {
                    let fingerprint = replay::fingerprint(msg.payload().unwrap_or_default());
                    fingerprints[i] = Some(fingerprint);
                    let earlier = match &self.replay {
                        Some(store) => store.get_at(&request.request_id, fingerprint, batch_now),
                        None => None,
                    };
                    match earlier {
                        Some(output) => {
                            fingerprints[i] = None;
                            (
                                Outcome::Answer(request.request_id, Some(target), Ok(output)),
                                request.reply_to,
                            )
                        }
                        None if durable.is_some() => {
                            unseen.push((i, request, target));
                            (Outcome::Running, None)
                        }
                        None => self.runnable(&mut runnable, i, request, target),
                    }
                }
                Decoded::Request { request, target } => {
                    self.runnable(&mut runnable, i, request, target)
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
        if let Some(store) = durable {
            let lookups: Vec<replay::Redelivery<'_>> = unseen
                .iter()
                .map(|(i, request, _)| replay::Redelivery {
                    topic: messages[*i].topic(),
                    partition: messages[*i].partition(),
                    offset: messages[*i].offset(),
                    id: &request.request_id,
                    fingerprint: fingerprints[*i].unwrap_or_default(),
                })
                .collect();
            let stored = store.get_redelivered(&lookups).await;
            for ((i, request, target), stored) in unseen.into_iter().zip(stored) {
                outcomes[i] = match stored {
                    Some(output) => {
                        fingerprints[i] = None;
                        (
                            Outcome::Answer(request.request_id, Some(target), Ok(output)),
                            request.reply_to,
                        )
                    }
                    None => self.runnable(&mut runnable, i, request, target),
                };
            }
        }
        self.execute_runnable(runnable, &mut outcomes, spans).await;
        (outcomes, fingerprints)
    }

    /// Queues a decoded request for execution; returns its placeholder outcome.
    fn runnable(
        &self,
        runnable: &mut Vec<(usize, Target, ExecRequest)>,
        i: usize,
        request: crate::model::InferenceRequest,
        target: Target,
    ) -> (Outcome, Option<String>) {
        runnable.push((
            i,
            target,
            ExecRequest {
                request_id: request.request_id,
                data: request.data,
                parameters: request.parameters,
                entity: request.entity,
                tenant: request.tenant,
            },
        ));
        // Replaced by the execution's outcome.
        (Outcome::Running, request.reply_to)
    }

    /// Runs the queued requests, grouped by target, and puts their outcomes in place.
    async fn execute_runnable(
        &self,
        runnable: Vec<(usize, Target, ExecRequest)>,
        outcomes: &mut [(Outcome, Option<String>)],
        spans: &[Option<otel::Context>],
    ) {
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
                for (i, outcome) in self.execute_group(&target, run, spans).await {
                    outcomes[i].0 = outcome;
                }
            }
        } else {
            let mut groups: BTreeMap<Target, Vec<(usize, ExecRequest)>> = BTreeMap::new();
            for (i, target, request) in runnable {
                groups.entry(target).or_default().push((i, request));
            }
            let runs = groups.into_iter().map(|(target, items)| async move {
                self.execute_group(&target, items, spans).await
            });
            for (i, outcome) in futures::future::join_all(runs).await.into_iter().flatten() {
                outcomes[i].0 = outcome;
            }
        }
    }

    /// Runs requests for one target through the executor, under the execute timeout.
    async fn execute_group(
        &self,
        target: &Target,
        items: Vec<(usize, ExecRequest)>,
        spans: &[Option<otel::Context>],
    ) -> Vec<(usize, Outcome)> {
        let (indices, requests): (Vec<usize>, Vec<ExecRequest>) = items.into_iter().unzip();
        let ids: Vec<String> = requests.iter().map(|r| r.request_id.clone()).collect();
        let n = requests.len();
        // Rate limits and breakers make the batch wait here, outside the execute timeout.
        self.executor.admit(target, n).await;
        let execute = self.executor.execute(target, requests);
        let execute: futures::future::BoxFuture<'_, Vec<ExecResult>> = if spans.is_empty() {
            execute
        } else {
            // The requests' spans, in the executor's order, for its step and model spans.
            let traces = indices.iter().map(|&i| spans[i].clone()).collect();
            Box::pin(otel::with_request_traces(execute, traces))
        };
        let results = match tokio::time::timeout(self.execute_timeout, execute).await {
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
    fn after_panic(&self, messages: &[Record], what: &str) -> Vec<(Outcome, Option<String>)> {
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

    /// Delivers the output for one record, waiting for the broker and retrying, and marks it
    /// done: the slow path, for dead letters and for results whose first send failed. A result
    /// Kafka refuses for good becomes an error result on the default topic, and if that is
    /// refused too, a dead letter.
    async fn answer_slowly(
        &self,
        msg: &Record,
        outcome: &Outcome,
        reply_to: Option<String>,
        latency: Duration,
        trace: Option<&TraceHeaders>,
    ) {
        let source = source_ref(msg);
        let origin = Origin {
            source: &source,
            trace,
        };
        let delivered = match outcome {
            Outcome::Answer(request_id, target, result) => {
                let error_kind = error_kind(result);
                let record = self.result_record(
                    request_id,
                    target.as_ref(),
                    result,
                    origin,
                    reply_to,
                    latency,
                );
                match self.core.sink.deliver(&record, &self.core.abort).await {
                    Ok(()) => {
                        self.metrics.count_result(error_kind);
                        Ok(())
                    }
                    Err(DeliverError::Permanent(err)) => {
                        // The result cannot be written where it should go (too large, no such
                        // topic): answer with an error result on the default topic instead.
                        tracing::warn!(error = %err, topic = %record.topic, "result refused; sending an error result instead");
                        let fallback = self.result_record(
                            request_id,
                            target.as_ref(),
                            &Err(ErrorBody::new(
                                ErrorKind::Internal,
                                format!("the result could not be delivered: {err}"),
                            )),
                            origin,
                            None,
                            latency,
                        );
                        match self.core.sink.deliver(&fallback, &self.core.abort).await {
                            Ok(()) => {
                                self.metrics.count_result(Some(ErrorKind::Internal));
                                Ok(())
                            }
                            Err(DeliverError::Permanent(err)) => {
                                self.core
                                    .dead_letter_traced(
                                        msg,
                                        &ErrorBody::new(ErrorKind::Internal, err.to_string()),
                                        trace,
                                    )
                                    .await
                            }
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                }
            }
            Outcome::DeadLetter(error) => self.core.dead_letter_traced(msg, error, trace).await,
            Outcome::Running => {
                // Never sent (every queued request gets its answer first); should a bug let
                // one through, the record still gets exactly one output.
                let error = ErrorBody::new(ErrorKind::Internal, "the request was not executed");
                self.core.dead_letter_traced(msg, &error, trace).await
            }
        };
        if let (true, Some(ts)) = (delivered.is_ok(), msg.timestamp().to_millis()) {
            let e2e = unix_ms().saturating_sub(ts).max(0) as f64 / 1000.0;
            self.metrics.end_to_end.record(e2e);
        }
        self.core.finish_delivered(msg, delivered);
    }

    /// Exactly-once mode: hands the output for one record to the next transaction. A result
    /// too large for a transaction becomes an error result; a dead letter is truncated.
    fn hold_output(
        &self,
        txn: &Transactions,
        msg: &Record,
        outcome: &Outcome,
        reply_to: Option<String>,
        latency: Duration,
        trace: Option<&TraceHeaders>,
    ) {
        let source = &source_ref(msg);
        let origin = Origin { source, trace };
        let record = match outcome {
            Outcome::Answer(request_id, target, result) => {
                let record = self.result_record(
                    request_id,
                    target.as_ref(),
                    result,
                    origin,
                    reply_to,
                    latency,
                );
                if transactional::fits(&record) {
                    record
                } else {
                    tracing::warn!(bytes = record.value.len(), topic = %record.topic, "result too large for a transaction; sending an error result instead");
                    self.result_record(
                        request_id,
                        target.as_ref(),
                        &Err(ErrorBody::new(
                            ErrorKind::Internal,
                            format!(
                                "the result ({} bytes) is larger than the {} bytes a transaction may carry",
                                record.value.len(),
                                transactional::MAX_RECORD_BYTES
                            ),
                        )),
                        origin,
                        None,
                        latency,
                    )
                }
            }
            Outcome::DeadLetter(error) => {
                transactional::dead_letter_record(&self.core, msg, error, trace)
            }
            Outcome::Running => transactional::dead_letter_record(
                &self.core,
                msg,
                &ErrorBody::new(ErrorKind::Internal, "the request was not executed"),
                trace,
            ),
        };
        txn.hold(&self.core, msg, vec![record]);
    }

    fn result_record(
        &self,
        request_id: &str,
        target: Option<&Target>,
        result: &ExecResult,
        Origin { source, trace }: Origin<'_>,
        reply_to: Option<String>,
        latency: Duration,
    ) -> OutRecord {
        let value = result_bytes(request_id, target, result, Some(source), latency);
        let mut headers = Vec::with_capacity(6);
        result_headers(
            request_id,
            result,
            SourceView::from_ref(source),
            trace,
            |key, value| {
                headers.push((key, value.to_owned()));
            },
        );
        OutRecord {
            topic: reply_to.unwrap_or_else(|| self.results_topic.clone()),
            key: Some(request_id.as_bytes().to_vec()),
            value,
            headers,
        }
    }
}

/// Where a result's request came from: its record, and the trace headers its output carries.
#[derive(Clone, Copy)]
struct Origin<'a> {
    source: &'a SourceRef,
    trace: Option<&'a TraceHeaders>,
}

/// The answers of one batch on their way to Kafka (at least once). Each result is enqueued
/// with a token naming this batch and its index; the producer's delivery callback finishes
/// the record ([`Acknowledge`]), so no future or task exists per record. A record whose send
/// fails, and every dead letter, takes the slow path ([`Shared::answer_slowly`]) in a task.
/// When the last delivery report has come in, the batch's executed outputs move into the
/// replay store (see `Drop`).
struct Answers {
    shared: Arc<Shared>,
    messages: Vec<Record>,
    outcomes: Vec<(Outcome, Option<String>)>,
    fingerprints: Vec<Option<u64>>,
    /// Per record, the trace headers its output carries (empty when tracing is off: the
    /// record's own, see [`trace_of`]).
    traces: Vec<Option<TraceHeaders>>,
    latency: Duration,
}

impl Answers {
    /// Enqueues every result of the batch, and starts the slow path for the others.
    async fn send(self: Arc<Self>) {
        let shared = &self.shared;
        let ack: Arc<dyn Acknowledge> = Arc::clone(&self) as Arc<dyn Acknowledge>;
        // One buffer for every result of the batch: librdkafka copies what it is given.
        let mut value = Vec::with_capacity(RESULT_BUFFER_BYTES);
        for (i, (msg, (outcome, reply_to))) in self.messages.iter().zip(&self.outcomes).enumerate()
        {
            let Outcome::Answer(request_id, target, result) = outcome else {
                self.slow_path(i);
                continue;
            };
            value.clear();
            write_result(
                &mut value,
                request_id,
                target.as_ref(),
                result,
                Some(SourceView::of(msg)),
                self.latency,
            );
            let topic = reply_to.as_deref().unwrap_or(&shared.results_topic);
            loop {
                // `insert` takes the headers by value: held in an Option while they are built.
                let mut headers = Some(OwnedHeaders::new_with_capacity(6));
                let trace = trace_of(&self.traces, i, msg);
                result_headers(
                    request_id,
                    result,
                    SourceView::of(msg),
                    trace,
                    |key, value| {
                        headers = headers.take().map(|h| {
                            h.insert(Header {
                                key,
                                value: Some(value.as_bytes()),
                            })
                        });
                    },
                );
                let record = Borrowed {
                    topic,
                    key: Some(request_id.as_bytes()),
                    value: &value,
                    headers: headers.unwrap_or_else(|| OwnedHeaders::new_with_capacity(0)),
                };
                match shared.core.sink.send(record, Arc::clone(&ack), i) {
                    Ok(()) => break,
                    Err(KafkaError::MessageProduction(Code::QueueFull))
                        if !shared.core.abort.is_cancelled() =>
                    {
                        // Backpressure: the queue drains as the broker acknowledges.
                        tokio::time::sleep(QUEUE_FULL_WAIT).await;
                    }
                    Err(_) => {
                        self.slow_path(i);
                        break;
                    }
                }
            }
        }
    }

    /// Delivers record `i`'s output the slow way, in a task of its own.
    fn slow_path(self: &Arc<Self>, i: usize) {
        let this = Arc::clone(self);
        self.shared.runtime.spawn(async move {
            let (outcome, reply_to) = &this.outcomes[i];
            let msg = &this.messages[i];
            let trace = trace_of(&this.traces, i, msg);
            this.shared
                .answer_slowly(msg, outcome, reply_to.clone(), this.latency, trace)
                .await;
        });
    }
}

/// The headers of a result, in order, each handed to `add` as name and text (no `String` per
/// header: the numbers are written into stack buffers). The one definition of a result's
/// headers, for the fast path, the slow path and exactly-once mode.
fn result_headers(
    request_id: &str,
    result: &ExecResult,
    source: SourceView<'_>,
    trace: Option<&TraceHeaders>,
    mut add: impl FnMut(&'static str, &str),
) {
    let status = if result.is_ok() {
        Status::Ok
    } else {
        Status::Error
    };
    add(headers::REQUEST_ID, request_id);
    add(headers::STATUS, status.as_str());
    add(headers::SOURCE_TOPIC, source.topic);
    add(
        headers::SOURCE_PARTITION,
        itoa::Buffer::new().format(source.partition),
    );
    add(
        headers::SOURCE_OFFSET,
        itoa::Buffer::new().format(source.offset),
    );
    if let Err(error) = result {
        add(headers::ERROR_KIND, error.kind.as_str());
    }
    if let Some(trace) = trace {
        trace.each(add);
    }
}

/// The trace headers record `i`'s output carries: its request span's when tracing is on
/// (`traces` has one entry per record), else the record's own, unchanged.
fn trace_of<'a>(
    traces: &'a [Option<TraceHeaders>],
    i: usize,
    msg: &'a Record,
) -> Option<&'a TraceHeaders> {
    match traces.get(i) {
        Some(trace) => trace.as_ref(),
        None => msg.trace(),
    }
}

impl Acknowledge for Answers {
    fn acknowledged(self: Arc<Self>, index: usize, result: Result<(), KafkaError>) {
        match result {
            Ok(()) => {
                let msg = &self.messages[index];
                if let Outcome::Answer(_, _, result) = &self.outcomes[index].0 {
                    self.shared.metrics.count_result(error_kind(result));
                }
                if let Some(ts) = msg.timestamp().to_millis() {
                    let e2e = unix_ms().saturating_sub(ts).max(0) as f64 / 1000.0;
                    self.shared.metrics.end_to_end.record(e2e);
                }
                self.shared.core.finish(msg, true);
            }
            // librdkafka gave up on it (its own retries included): the slow path retries,
            // falls back to an error result or a dead letter, and finishes the record.
            Err(_) => self.slow_path(index),
        }
    }
}

impl Drop for Answers {
    fn drop(&mut self) {
        // Every delivery report is in: the outputs move into the replay store now.
        if self.shared.replay.is_none() || self.fingerprints.iter().all(Option::is_none) {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let messages = std::mem::take(&mut self.messages);
        let outcomes = std::mem::take(&mut self.outcomes);
        let fingerprints = std::mem::take(&mut self.fingerprints);
        self.shared.runtime.spawn(async move {
            shared
                .keep_for_replay(messages, outcomes, fingerprints)
                .await;
        });
    }
}

/// The error kind of an outcome, if it is an error.
fn error_kind(result: &ExecResult) -> Option<ErrorKind> {
    result.as_ref().err().map(|e| e.kind)
}

/// Where a consumed record came from, borrowed: serialises exactly like [`SourceRef`].
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct SourceView<'a> {
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
}

impl<'a> SourceView<'a> {
    /// The source of a consumed record.
    pub fn of(msg: &'a Record) -> Self {
        SourceView {
            topic: msg.topic(),
            partition: msg.partition(),
            offset: msg.offset(),
        }
    }

    /// A [`SourceRef`]'s view.
    pub fn from_ref(source: &'a SourceRef) -> Self {
        SourceView {
            topic: &source.topic,
            partition: source.partition,
            offset: source.offset,
        }
    }
}

/// The result document as it is written to Kafka: the same JSON as serialising
/// [`result_document`], but straight from borrowed parts into one buffer sized up front, with
/// no intermediate copies of the id, the target, the source or the output.
pub fn result_bytes(
    request_id: &str,
    target: Option<&Target>,
    result: &ExecResult,
    source: Option<&SourceRef>,
    latency: Duration,
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(RESULT_BUFFER_BYTES);
    write_result(
        &mut buf,
        request_id,
        target,
        result,
        source.map(SourceView::from_ref),
        latency,
    );
    buf
}

/// Appends the result document (as [`result_bytes`]) to `buf`.
pub fn write_result(
    buf: &mut Vec<u8>,
    request_id: &str,
    target: Option<&Target>,
    result: &ExecResult,
    source: Option<SourceView<'_>>,
    latency: Duration,
) {
    /// Mirrors [`InferenceResult`]'s fields, order and omissions.
    #[derive(serde::Serialize)]
    struct View<'a> {
        request_id: &'a str,
        status: Status,
        #[serde(skip_serializing_if = "Option::is_none")]
        output: Option<&'a serde_json::Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a ErrorBody>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pipeline: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        model: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        model_version: Option<&'a str>,
        cached: bool,
        latency_ms: u64,
        steps: &'a [crate::model::StepRecord],
        #[serde(skip_serializing_if = "Option::is_none")]
        source: Option<SourceView<'a>>,
    }
    let (pipeline, model) = match target {
        Some(Target::Pipeline(p)) => (Some(p.as_str()), None),
        Some(Target::Model(mdl)) => (None, Some(mdl.as_str())),
        None => (None, None),
    };
    let mut view = View {
        request_id,
        status: Status::Ok,
        output: None,
        error: None,
        pipeline,
        model,
        model_version: None,
        cached: false,
        latency_ms: latency.as_millis() as u64,
        steps: &[],
        source,
    };
    match result {
        Ok(out) => {
            view.output = Some(&out.output);
            view.model_version = out.model_version.as_deref();
            view.cached = out.cached;
            view.steps = &out.steps;
        }
        Err(error) => {
            view.status = Status::Error;
            view.error = Some(error);
            view.steps = &error.steps;
        }
    }
    let start = buf.len();
    // Serialising these types cannot fail (string keys, no non-finite floats from JSON).
    if let Err(e) = serde_json::to_writer(&mut *buf, &view) {
        buf.truncate(start);
        buf.extend_from_slice(format!(r#"{{"request_id":{},"status":"error","error":{{"kind":"internal","message":"result could not be serialised: {e}"}},"cached":false,"latency_ms":0,"steps":[]}}"#,
            serde_json::Value::from(request_id)).as_bytes());
    }
}

/// Initial capacity of a result's buffer: a small result fits without growing it.
const RESULT_BUFFER_BYTES: usize = 512;

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
        Err(mut error) => {
            doc.status = Status::Error;
            // A failed pipeline's steps that ran, the failed one last.
            doc.steps = std::mem::take(&mut error.steps);
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

#[derive(Debug, Clone)]
enum Outcome {
    /// A result (ok or error) for a request id.
    Answer(String, Option<Target>, ExecResult),
    /// No request id: a dead letter.
    DeadLetter(ErrorBody),
    /// Queued for the executor; replaced by its answer before anything is sent.
    Running,
}

/// Per topic and partition of `messages`: the offset after the last of them.
fn next_offsets(messages: &[Record]) -> Vec<(String, i32, i64)> {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for msg in messages {
        let entry = next.entry((msg.topic(), msg.partition())).or_insert(0);
        *entry = (*entry).max(msg.offset().saturating_add(1));
    }
    next.into_iter()
        .map(|((topic, partition), offset)| (topic.to_owned(), partition, offset))
        .collect()
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Stops at once, with the reason, when the cluster refuses this client's credentials or TLS
/// (see [`crate::kafka::preflight`]); otherwise waits at most 10 s for a first answer.
pub async fn preflight(config: &Config) -> anyhow::Result<()> {
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || {
        crate::kafka::preflight::check(&kafka, Duration::from_secs(10))
    })
    .await
    .context("the Kafka preflight task")??;
    Ok(())
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
    let partitions = t.create_partitions.get() as i32;
    let replication = t.create_replication_factor.get() as i32;
    let mut topics: Vec<NewTopic<'_>> = [&t.requests, &t.features, &t.results, &t.dlq]
        .into_iter()
        .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(replication)))
        .collect();
    if !t.shadow_results.is_empty() {
        topics.push(NewTopic::new(
            &t.shadow_results,
            partitions,
            TopicReplication::Fixed(replication),
        ));
    }
    if !t.feature_invalidations.is_empty() {
        // Read from its end by every instance, never replayed: one partition, short retention.
        topics.push(
            NewTopic::new(
                &t.feature_invalidations,
                1,
                TopicReplication::Fixed(replication),
            )
            .set("retention.ms", "3600000"),
        );
    }
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

/// The transactional producer of the exactly-once mode, initialised (which fences an earlier
/// producer with the same transactional id and aborts its open transaction).
async fn start_transactions(config: &Config) -> anyhow::Result<Transactions> {
    let id = config.processing.transactional_id_for(&config.kafka);
    let timeout = Duration::from_millis(config.processing.transaction_timeout_ms.get());
    let producer: FutureProducer = crate::kafka::producer_config(&config.kafka)
        .set("transactional.id", &id)
        .set("transaction.timeout.ms", timeout.as_millis().to_string())
        .create()
        .context("creating the transactional Kafka producer")?;
    let init = producer.clone();
    tokio::task::spawn_blocking(move || init.init_transactions(Duration::from_secs(60)))
        .await
        .context("initialising transactions")?
        .with_context(|| format!("initialising transactions (transactional.id {id})"))?;
    tracing::info!(transactional_id = %id, "exactly-once processing: transactions initialised");
    Ok(Transactions::new(
        producer,
        Duration::from_millis(config.kafka.commit_interval_ms.get()),
        config.executor.max_in_flight_records.get() / 4,
        transactional::commit_window(
            timeout,
            Duration::from_millis(config.kafka.max_poll_interval_ms.get()),
        ),
    ))
}

/// Starts the processor: creates missing topics, subscribes to the requests topic and starts
/// the consumer thread. Cancel `stop` to shut it down gracefully, then await
/// [`ProcessorHandle::join`].
pub async fn start(
    config: &Config,
    executor: Arc<dyn Executor>,
    stop: CancellationToken,
) -> anyhow::Result<ProcessorHandle> {
    preflight(config).await?;
    ensure_topics(config).await?;
    let producer = Sink::create(&crate::kafka::producer_config(&config.kafka))
        .context("creating the Kafka producer")?;
    let mut core = SourceCore::new("requests", producer, config.topics.dlq.clone());
    if config.processing.guarantee == Guarantee::ExactlyOnce {
        core = core.with_transactions(Arc::new(start_transactions(config).await?));
    }
    let core = Arc::new(core);
    let shared = Arc::new(Shared {
        core: Arc::clone(&core),
        executor,
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
        execute_timeout: Duration::from_millis(config.executor.execute_timeout_ms.get()),
        batch_permits: Arc::new(Semaphore::new(config.executor.max_in_flight_batches.get())),
        per_key: config.executor.ordering == KeyOrdering::PerKey,
        lanes: Mutex::new(Vec::new()),
        runtime: Handle::current(),
        replay: ReplayStore::open(
            &config.replay,
            &config.feature_store,
            &config.kafka.group_id,
        )
        .await?,
        metrics: Handles::new(),
    });
    if config.executor.ordering == KeyOrdering::PerKey {
        let lanes = config.executor.max_in_flight_batches.get();
        let mut senders = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Record>>(
                config.executor.max_in_flight_records.get(),
            );
            let worker = Arc::clone(&shared);
            tokio::spawn(async move {
                while let Some(items) = rx.recv().await {
                    Arc::clone(&worker).process_batch(items, None).await;
                }
            });
            senders.push(tx);
        }
        *lock(&shared.lanes) = senders;
    }
    let spec = SourceSpec {
        topics: vec![config.topics.requests.clone()],
        group_id: config.kafka.group_id.clone(),
        batch: BatchLimits {
            max_records: config.batch.max_records,
            max_bytes: config.batch.max_bytes,
            linger: Duration::from_millis(config.batch.linger_ms),
        },
        max_in_flight: config.executor.max_in_flight_records.get(),
        shutdown_timeout: Duration::from_millis(config.executor.shutdown_timeout_ms.get()),
        rebalance_drain_timeout: Duration::from_millis(config.kafka.rebalance_drain_timeout_ms),
        consumed_metric: m::REQUESTS_CONSUMED_TOTAL,
    };
    source::start(&config.kafka, spec, core, shared, stop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::ExecOutput;
    use crate::model::StepRecord;

    #[test]
    fn next_offsets_are_one_past_the_last_record_per_partition() {
        let msg = |topic: &str, partition: i32, offset: i64| {
            Record::untracked(topic, partition, offset, None, None)
        };
        let batch = [
            msg("a", 0, 7),
            msg("a", 1, 3),
            msg("a", 0, 9),
            msg("a", 0, 8),
            msg("b", 0, 0),
        ];
        assert_eq!(
            next_offsets(&batch),
            [
                ("a".to_owned(), 0, 10),
                ("a".to_owned(), 1, 4),
                ("b".to_owned(), 0, 1)
            ]
        );
    }

    #[test]
    fn result_bytes_match_the_result_document() {
        let source = SourceRef {
            topic: "requests".into(),
            partition: 3,
            offset: 42,
        };
        let ok: ExecResult = Ok(ExecOutput {
            output: serde_json::json!({"seq": 1, "text": "a \"quoted\" é"}),
            model_version: Some("2".into()),
            cached: true,
            steps: vec![StepRecord {
                name: "identity".into(),
                latency_us: 7,
                cached: false,
                output: None,
                features: Vec::new(),
            }],
        });
        let err: ExecResult = Err(ErrorBody::new(ErrorKind::UnknownModel, "no model `m`"));
        let latency = Duration::from_millis(12);
        let cases = [
            (
                Some(Target::Pipeline("identity".into())),
                &ok,
                Some(&source),
            ),
            (Some(Target::Model("m@2".into())), &ok, None),
            (None, &err, Some(&source)),
            (Some(Target::Model("m".into())), &err, None),
        ];
        for (target, result, source) in cases {
            let expected = serde_json::to_vec(&result_document(
                "r-1",
                target.as_ref(),
                result.clone(),
                source.cloned(),
                latency,
            ))
            .unwrap();
            let got = result_bytes("r-1", target.as_ref(), result, source, latency);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(expected).unwrap()
            );
        }
    }
}
