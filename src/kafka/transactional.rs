//! Exactly-once processing (`processing.guarantee = "exactly_once"`): outputs and the consumed
//! offsets committed in one Kafka transaction.
//!
//! # How
//!
//! A batch task does not send its outputs; it *holds* them here, keyed by the source record's
//! partition and offset, and then marks the record complete in the [`OffsetTracker`]. The
//! consumer thread runs [`Transactions::commit`] every `kafka.commit_interval_ms` (sooner when
//! a quarter of `executor.max_in_flight_records` outputs are held). A commit takes, per partition,
//! the tracker's committable position `w` (every record below `w` is complete, so its output
//! is held) and, in one transaction: sends the positions with the consumer's group metadata
//! (`send_offsets_to_transaction`, KIP-447), produces the held outputs below `w` in offset
//! order, and commits. Outputs of records at or above `w` stay held: a transaction never
//! contains an output whose offset it does not commit, however out of order batches finish.
//! The transaction is opened and closed within that one call on the consumer thread, so no
//! transaction is ever open while a rebalance callback runs.
//!
//! Held outputs still count as in flight (their records are released only once committed),
//! so `executor.max_in_flight_records` bounds them like any other unfinished record.
//!
//! # Failures
//!
//! - **Offsets refused** (typically while the group rebalances): they are sent first, so the
//!   transaction is aborted before any output was produced; the outputs are held again and
//!   the commit is retried after a backoff ([`RETRY_BACKOFF`]: up to 100 ms doubling to up to
//!   2 s, full jitter).
//! - **Abortable errors after outputs were produced** (a produce refused, a commit that
//!   failed): the transaction is aborted, so none of its outputs or offsets become visible.
//!   Every held output is dropped,
//!   and every owned partition is rewound to its last committed position and consumed again.
//!   Records still in flight from before the rewind may hold their outputs later; an output
//!   below the last committed position is dropped, any other replaces or is replaced by the
//!   output of the same offset consumed again, so each offset commits one output. Attempts
//!   after an abort back off too.
//! - **The deadline.** A commit must end before two limits: the broker aborts a transaction
//!   left open longer than `processing.transaction_timeout_ms` and fences its producer (a
//!   fatal error), and the consumer thread, which does not poll while it commits, is evicted
//!   from its group after `kafka.max_poll_interval_ms`. So all of one commit runs within one
//!   [`commit_window`], the shorter of the transaction timeout and half of
//!   `kafka.max_poll_interval_ms` (configuration refuses a longer transaction timeout in
//!   exactly-once mode), and its [`CommitDeadline`]: its calls and retries share three quarters
//!   of the window, each call's timeout cut to what is left, and a full producer queue is
//!   waited out by polling the producer (serving its delivery reports) within it. A commit
//!   still unfinished then is aborted in the last quarter, before the broker would, like any
//!   other failure (partitions rewound, records consumed again).
//! - **Fatal errors**, including being fenced by another producer with the same
//!   `transactional.id`: the source stops (`SourceCore::fail`) and nothing more is committed.
//! - **Zombies.** An instance that lost its partitions (a long pause, a network partition)
//!   cannot commit offsets for them: the group coordinator refuses a transactional offset
//!   commit from an old generation (KIP-447), so its transaction aborts.
//! - **Rebalances.** Before partitions are revoked, the source drains them (up to
//!   `kafka.rebalance_drain_timeout_ms`) and commits a transaction; held outputs of partitions
//!   given up are then dropped (their records are consumed again by the new owner). A lost
//!   assignment commits nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backoff::{Backoff, Retries};
use crate::kafka::source::Record;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::offsets::TopicPartition;
use crate::kafka::sink::{OutRecord, QUEUE_FULL_WAIT};
use crate::kafka::source::{self, SourceCore, TRUNCATED_VALUE_BYTES, headers, lock};
use crate::metrics as m;
use crate::model::ErrorBody;
use crate::tracing_otel::TraceHeaders;

/// Largest output (value, key and headers) sent in a transaction. A record Kafka refuses
/// makes the whole transaction abort, so outputs are checked against this first: below
/// librdkafka's default `message.max.bytes` (1,000,000) and the brokers' default
/// `max.message.bytes` (1,048,588).
pub const MAX_RECORD_BYTES: usize = 900_000;

/// Pacing of the next commit after one that was refused or aborted: up to 100 ms doubling to
/// up to 2 s, with full jitter (a commit may come sooner when forced: on a revoke, at shutdown).
pub const RETRY_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// Retries of a commit refused with a retriable error. Each is made at once (the refused call
/// already waited), and only before the commit's deadline.
pub const COMMIT_RETRIES: u32 = 3;

/// The time one commit may take, from its start to the end of the abort that may follow: the
/// shorter of `transaction_timeout` (`processing.transaction_timeout_ms`: the broker aborts a
/// transaction open longer and fences its producer) and half of `max_poll_interval`
/// (`kafka.max_poll_interval_ms`: the consumer thread does not poll while it commits, and the
/// other half is left for the rest of its loop, where an open batch lingers less than half of
/// it too, which configuration checks). Configuration refuses, in exactly-once mode, a
/// transaction timeout longer than the window, which would cut commits the broker allows.
pub fn commit_window(transaction_timeout: Duration, max_poll_interval: Duration) -> Duration {
    transaction_timeout.min(max_poll_interval / 2)
}

/// The deadline of one commit: its calls, waits and retries end by `work`, three quarters
/// into its [`commit_window`]; the abort that may follow, and the rewind, by `end`, the
/// window's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitDeadline {
    work: Instant,
    end: Instant,
}

impl CommitDeadline {
    /// The deadline of a commit starting at `now` with `window`.
    pub fn starting(now: Instant, window: Duration) -> CommitDeadline {
        // The broker's transaction.max.timeout.ms is at most 15 minutes by default; a window
        // past what an Instant holds (never in practice) is cut to a day, never a panic.
        let window = window.min(Duration::from_secs(86_400));
        CommitDeadline {
            work: now.checked_add(window * 3 / 4).unwrap_or(now),
            end: now.checked_add(window).unwrap_or(now),
        }
    }

    /// Whether the transaction's own work is out of time at `now`.
    pub fn passed(&self, now: Instant) -> bool {
        now >= self.work
    }

    /// The timeout of a transactional call made at `now`: the work's time left.
    pub fn call_timeout(&self, now: Instant) -> Duration {
        self.work.saturating_duration_since(now)
    }

    /// The timeout of the abort (or the rewind) after a failure at `now`: the time left in the
    /// window. Zero lets librdkafka go on in the background.
    pub fn abort_timeout(&self, now: Instant) -> Duration {
        self.end.saturating_duration_since(now)
    }

    /// The retries of a commit refused with a retriable error from `now`: at most
    /// [`COMMIT_RETRIES`], none once the work is out of time.
    pub fn commit_retries(&self, now: Instant) -> Retries {
        Backoff::new(Duration::ZERO, Duration::ZERO)
            .with_max_retries(COMMIT_RETRIES)
            .with_max_elapsed(self.call_timeout(now))
            .start_at(now)
    }
}

/// Whether `record` is small enough to be sent in a transaction.
pub fn fits(record: &OutRecord) -> bool {
    let headers: usize = record.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    record.value.len() + record.key.as_ref().map_or(0, Vec::len) + headers <= MAX_RECORD_BYTES
}

/// The dead letter of `msg`: its key and bytes (the first [`TRUNCATED_VALUE_BYTES`] of a value
/// too large for a transaction, with its size in a header), the error and the source.
pub fn dead_letter_record(
    core: &SourceCore,
    msg: &Record,
    error: &ErrorBody,
    trace: Option<&TraceHeaders>,
) -> OutRecord {
    let mut record = source::dead_letter_record(&core.dlq_topic, msg, error, trace);
    if !fits(&record) {
        record
            .headers
            .push((headers::VALUE_TRUNCATED, record.value.len().to_string()));
        record.value.truncate(TRUNCATED_VALUE_BYTES);
        record.key = record.key.map(|mut k| {
            k.truncate(TRUNCATED_VALUE_BYTES);
            k
        });
    }
    record
}

/// The outputs of one source record, waiting for their transaction.
#[derive(Debug)]
struct Output {
    records: Vec<OutRecord>,
    /// The source record's timestamp, for the end-to-end latency.
    timestamp_ms: Option<i64>,
}

#[derive(Debug, Default)]
struct Partition {
    /// Held outputs by source offset.
    outputs: BTreeMap<i64, Output>,
    /// The last committed position in this assignment: outputs below it are already committed
    /// (or belong to an earlier assignment) and are dropped.
    floor: Option<i64>,
}

#[derive(Debug)]
struct State {
    partitions: HashMap<TopicPartition, Partition>,
    /// Outputs held over all partitions.
    held: usize,
    last_commit: Instant,
    /// After an abort: no new attempt before this (unless forced).
    retry_at: Option<Instant>,
    /// Commits refused or aborted in a row, which pace the next ([`RETRY_BACKOFF`]).
    failures: u32,
}

impl State {
    /// After a refused or aborted commit: the next one waits.
    fn back_off(&mut self, now: Instant) {
        self.retry_at = Some(now + RETRY_BACKOFF.delay(self.failures));
        self.failures = self.failures.saturating_add(1);
    }
}

/// A failed transaction, and whether outputs had been produced in it.
struct TxnFailure {
    error: KafkaError,
    produced: bool,
}

/// Why a transaction did not commit.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// The offsets were refused (typically while the group rebalances) and the transaction
    /// aborted before any output was produced; the outputs are held again.
    #[error("transaction refused, outputs held for the next attempt: {0}")]
    Refused(String),
    /// The transaction was aborted; owned partitions were rewound to their last committed
    /// positions.
    #[error("transaction aborted and partitions rewound: {0}")]
    Aborted(String),
    /// The producer failed for good (or was fenced); the source is stopping.
    #[error("transactional producer failed for good: {0}")]
    Fatal(String),
}

/// The transactional output stage of one source.
pub struct Transactions {
    producer: FutureProducer,
    state: Mutex<State>,
    /// How often a transaction is committed.
    interval: Duration,
    /// Held outputs that make a commit due before the interval has passed.
    commit_at: usize,
    /// The time one commit may take ([`commit_window`]).
    window: Duration,
    failed: AtomicBool,
}

impl Transactions {
    /// A stage over `producer`, on which `init_transactions` has succeeded, whose commits each
    /// end within `window` ([`commit_window`]).
    pub fn new(
        producer: FutureProducer,
        interval: Duration,
        commit_at: usize,
        window: Duration,
    ) -> Transactions {
        Transactions {
            producer,
            state: Mutex::new(State {
                partitions: HashMap::new(),
                held: 0,
                last_commit: Instant::now(),
                retry_at: None,
                failures: 0,
            }),
            interval,
            commit_at: commit_at.max(1),
            window,
            failed: AtomicBool::new(false),
        }
    }

    /// Outputs held and not yet committed.
    pub fn held(&self) -> usize {
        lock(&self.state).held
    }

    /// Holds the outputs of `msg` for the next transaction, then marks the record complete.
    /// Outputs of partitions not owned, or below the last committed position, are dropped.
    pub fn hold(&self, core: &SourceCore, msg: &Record, records: Vec<OutRecord>) {
        let tp = (msg.topic().to_owned(), msg.partition());
        let offset = msg.offset();
        let output = Output {
            records,
            timestamp_ms: msg.timestamp().to_millis(),
        };
        let released = {
            let mut state = lock(&self.state);
            let State {
                partitions, held, ..
            } = &mut *state;
            match partitions.get_mut(&tp) {
                Some(p) if p.floor.is_none_or(|floor| offset >= floor) => {
                    if p.outputs.insert(offset, output).is_some() {
                        // The same offset consumed again after a rewind: one output stays.
                        1
                    } else {
                        *held += 1;
                        0
                    }
                }
                _ => 1,
            }
        };
        if let Some(ticket) = msg.ticket() {
            core.tracker.complete(ticket);
        }
        if released > 0 {
            core.release(released);
        }
    }

    /// Starts holding outputs of newly assigned partitions.
    pub fn assign(&self, core: &SourceCore, partitions: &[TopicPartition]) {
        let mut state = lock(&self.state);
        let mut released = 0;
        for tp in partitions {
            if let Some(old) = state.partitions.insert(tp.clone(), Partition::default()) {
                released += old.outputs.len();
            }
        }
        unhold(&mut state.held, released);
        drop(state);
        core.release(released);
    }

    /// Drops the held outputs of partitions given up; their records are consumed again by the
    /// next owner.
    pub fn revoke(&self, core: &SourceCore, partitions: &[TopicPartition]) {
        let mut state = lock(&self.state);
        let mut released = 0;
        for tp in partitions {
            if let Some(old) = state.partitions.remove(tp) {
                released += old.outputs.len();
            }
        }
        unhold(&mut state.held, released);
        drop(state);
        if released > 0 {
            tracing::info!(
                released,
                source = core.name,
                "dropping uncommitted outputs of revoked partitions; their records will be consumed again"
            );
        }
        core.release(released);
    }

    /// Drops everything (at shutdown, after the final commit).
    pub fn revoke_all(&self, core: &SourceCore) {
        let all: Vec<TopicPartition> = lock(&self.state).partitions.keys().cloned().collect();
        self.revoke(core, &all);
    }

    /// Commits a transaction with every output whose offset the owned partitions' positions
    /// pass, and those positions, when one is due (or always, with `force`). Call from the
    /// consumer's own thread. Returns the number of outputs committed.
    pub fn commit<C: ConsumerContext>(
        &self,
        core: &SourceCore,
        consumer: &BaseConsumer<C>,
        force: bool,
    ) -> Result<usize, TxnError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(TxnError::Fatal(
                "an earlier transactional call failed".into(),
            ));
        }
        let now = Instant::now();
        let mut outputs: Vec<(TopicPartition, i64, Output)> = Vec::new();
        let mut positions: Vec<(TopicPartition, i64)> = Vec::new();
        let mut dropped = 0usize;
        {
            let mut state = lock(&self.state);
            if !force {
                if state.retry_at.is_some_and(|at| now < at) {
                    return Ok(0);
                }
                let due = now.duration_since(state.last_commit) >= self.interval
                    || state.held >= self.commit_at;
                if !due {
                    return Ok(0);
                }
            }
            state.last_commit = now;
            let mut taken = 0usize;
            for (tp, p) in &mut state.partitions {
                let Some((Some(position), first)) = core.tracker.position(tp) else {
                    continue;
                };
                let Some(floor) = p.floor.or(first) else {
                    continue;
                };
                if position <= floor {
                    continue;
                }
                let later = p.outputs.split_off(&position);
                let ready = std::mem::replace(&mut p.outputs, later);
                taken += ready.len();
                for (offset, output) in ready {
                    if offset < floor {
                        dropped += 1;
                    } else {
                        outputs.push((tp.clone(), offset, output));
                    }
                }
                positions.push((tp.clone(), position));
            }
            unhold(&mut state.held, taken);
        }
        if positions.is_empty() {
            core.release(dropped);
            return Ok(0);
        }
        let count = outputs.len();
        let started = Instant::now();
        let deadline = CommitDeadline::starting(started, self.window);
        let result = self.run(consumer, &outputs, &positions, &deadline);
        tracing::debug!(
            outputs = count,
            partitions = positions.len(),
            ms = started.elapsed().as_millis() as u64,
            ok = result.is_ok(),
            "transaction"
        );
        match result {
            Ok(()) => {
                // Committed: these records are done.
                core.release(count + dropped);
                let mut state = lock(&self.state);
                for (tp, position) in &positions {
                    if let Some(p) = state.partitions.get_mut(tp) {
                        p.floor = Some(*position);
                    }
                }
                state.retry_at = None;
                state.failures = 0;
                drop(state);
                metrics::counter!(m::TRANSACTIONS_TOTAL, "outcome" => "committed").increment(1);
                count_outputs(core, &outputs);
                Ok(count)
            }
            Err(failure) => {
                if let Some(reason) = self.fatal_reason(&failure.error) {
                    return Err(self.stop(core, reason));
                }
                tracing::warn!(error = %failure.error, source = core.name, outputs = count, produced = failure.produced,
                    "transaction failed; aborting it");
                if let Err(abort) = self
                    .producer
                    .abort_transaction(deadline.abort_timeout(Instant::now()))
                {
                    if let Some(reason) = self.fatal_reason(&abort) {
                        return Err(self.stop(core, reason));
                    }
                    tracing::warn!(error = %abort, "aborting the transaction failed");
                }
                metrics::counter!(m::TRANSACTIONS_TOTAL, "outcome" => "aborted").increment(1);
                if failure.produced {
                    // Outputs reached the aborted transaction: consume again from the last
                    // committed positions. These records are finished here.
                    core.release(count + dropped);
                    self.rewind(core, consumer, deadline.abort_timeout(Instant::now()));
                    Err(TxnError::Aborted(failure.error.to_string()))
                } else {
                    // Nothing was produced (the offsets were refused, typically while the group
                    // rebalances): hold the outputs again and retry after a backoff.
                    core.release(dropped);
                    self.restore(core, outputs);
                    Err(TxnError::Refused(failure.error.to_string()))
                }
            }
        }
    }

    /// Stops on a fatal error.
    fn stop(&self, core: &SourceCore, reason: String) -> TxnError {
        self.failed.store(true, Ordering::Release);
        tracing::error!(reason = %reason, source = core.name, "transactional producer failed for good; stopping");
        core.fail(format!("transactional producer: {reason}"));
        TxnError::Fatal(reason)
    }

    /// Holds again the outputs of a transaction that produced nothing, and backs off.
    fn restore(&self, core: &SourceCore, outputs: Vec<(TopicPartition, i64, Output)>) {
        let mut released = 0;
        {
            let mut state = lock(&self.state);
            state.back_off(Instant::now());
            let State {
                partitions, held, ..
            } = &mut *state;
            for (tp, offset, output) in outputs {
                match partitions.get_mut(&tp) {
                    Some(p) if !p.outputs.contains_key(&offset) => {
                        p.outputs.insert(offset, output);
                        *held += 1;
                    }
                    _ => released += 1,
                }
            }
        }
        core.release(released);
    }

    /// One transaction: the outputs, the positions, the commit, within `deadline`.
    /// The offsets go first: while the group rebalances the coordinator refuses them, and the
    /// transaction is then aborted before any output was produced.
    fn run<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        outputs: &[(TopicPartition, i64, Output)],
        positions: &[(TopicPartition, i64)],
        deadline: &CommitDeadline,
    ) -> Result<(), TxnFailure> {
        let before = |error| TxnFailure {
            error,
            produced: false,
        };
        let after = |error| TxnFailure {
            error,
            produced: true,
        };
        // Only missing before the consumer has joined its group, when nothing is owned.
        let Some(group) = consumer.group_metadata() else {
            return Err(before(KafkaError::MessageProduction(
                RDKafkaErrorCode::InvalidGroupId,
            )));
        };
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), position) in positions {
            offsets
                .add_partition_offset(topic, *partition, Offset::Offset(*position))
                .map_err(before)?;
        }
        self.producer.begin_transaction().map_err(before)?;
        self.producer
            .send_offsets_to_transaction(&offsets, &group, deadline.call_timeout(Instant::now()))
            .map_err(before)?;
        for (_, _, output) in outputs {
            for record in &output.records {
                loop {
                    match self.producer.send_result(record.future_record()) {
                        // Delivery is confirmed by the commit, which flushes and fails if any
                        // record failed.
                        Ok(_delivery) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                            metrics::counter!(m::PRODUCER_QUEUE_FULL_TOTAL).increment(1);
                            let now = Instant::now();
                            if deadline.passed(now) {
                                tracing::warn!(
                                    window_ms = self.window.as_millis() as u64,
                                    "the producer's queue stayed full until the commit's deadline"
                                );
                                return Err(after(KafkaError::MessageProduction(
                                    RDKafkaErrorCode::QueueFull,
                                )));
                            }
                            // Serve delivery reports while the queue drains, not sleep blind.
                            self.producer
                                .poll(QUEUE_FULL_WAIT.min(deadline.call_timeout(now)));
                        }
                        Err((err, _)) => return Err(after(err)),
                    }
                }
            }
        }
        // `commit_transaction` starts with this flush; done first, it waits within the
        // deadline once, and the commit attempts find nothing left to send.
        self.producer
            .flush(deadline.call_timeout(Instant::now()))
            .map_err(after)?;
        let mut retries = deadline.commit_retries(Instant::now());
        loop {
            match self
                .producer
                .commit_transaction(deadline.call_timeout(Instant::now()))
            {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(e))
                    if e.is_retriable() && retries.next_delay().is_some() =>
                {
                    tracing::debug!(error = %e, retry = retries.made(), "commit refused for now; retrying");
                }
                Err(err) => return Err(after(err)),
            }
        }
    }

    /// Why `err` (or the producer's state) is fatal, if it is.
    fn fatal_reason(&self, err: &KafkaError) -> Option<String> {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            return Some(format!("{code}: {reason}"));
        }
        match err {
            KafkaError::Transaction(e) if e.is_fatal() => Some(e.to_string()),
            _ => None,
        }
    }

    /// After an abort: drops every held output, forgets the tracker's state of every owned
    /// partition and seeks each to its last committed position, waiting up to `timeout` (zero:
    /// the seeks are started and not waited for).
    fn rewind<C: ConsumerContext>(
        &self,
        core: &SourceCore,
        consumer: &BaseConsumer<C>,
        timeout: Duration,
    ) {
        let mut seek = TopicPartitionList::new();
        let mut released = 0;
        {
            let mut state = lock(&self.state);
            state.back_off(Instant::now());
            for (tp, p) in &mut state.partitions {
                released += p.outputs.len();
                p.outputs.clear();
                let first = core.tracker.position(tp).and_then(|(_, first)| first);
                core.tracker.reset(tp);
                if let Some(to) = p.floor.or(first) {
                    p.floor = Some(to);
                    let _ = seek.add_partition_offset(&tp.0, tp.1, Offset::Offset(to));
                }
            }
            state.held = 0;
        }
        core.release(released);
        if seek.count() == 0 {
            return;
        }
        match consumer.seek_partitions(seek, timeout) {
            Ok(result) => {
                for e in result.elements() {
                    if let Err(err) = e.error() {
                        tracing::warn!(error = %err, topic = e.topic(), partition = e.partition(), "rewinding a partition failed");
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "rewinding partitions failed"),
        }
    }
}

/// Counts committed outputs: results by status and error kind, dead letters by error kind,
/// and their end-to-end latency.
fn count_outputs(core: &SourceCore, outputs: &[(TopicPartition, i64, Output)]) {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    for (_, _, output) in outputs {
        for record in &output.records {
            let find = |name: &str| {
                record
                    .headers
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.clone())
            };
            let kind = find(headers::ERROR_KIND).unwrap_or_default();
            match find(headers::STATUS) {
                Some(status) => {
                    metrics::counter!(m::RESULTS_TOTAL, "status" => status, "error_kind" => kind)
                        .increment(1)
                }
                None => metrics::counter!(m::DEAD_LETTERS_TOTAL, "error_kind" => kind, "source" => core.name)
                    .increment(1),
            }
        }
        if let Some(ts) = output.timestamp_ms {
            let e2e = now_ms.saturating_sub(ts).max(0) as f64 / 1000.0;
            metrics::histogram!(m::END_TO_END_LATENCY_SECONDS).record(e2e);
        }
    }
}

/// Takes `n` released outputs off the held count, saturating at zero: releasing more than is
/// held is a bug (an output released twice), which must not wrap the count and hold every
/// commit back; debug builds stop on it.
fn unhold(held: &mut usize, n: usize) {
    debug_assert!(
        *held >= n,
        "{n} held outputs released with only {held} held (an output released twice?)"
    );
    *held = held.saturating_sub(n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_outputs_do_not_fit() {
        let record = |n: usize| OutRecord {
            topic: "t".into(),
            key: Some(b"k".to_vec()),
            value: vec![b'x'; n],
            headers: vec![(headers::STATUS, "ok".into())],
        };
        assert!(fits(&record(1000)));
        assert!(!fits(&record(MAX_RECORD_BYTES)));
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "an output released twice?")]
    fn releasing_more_than_is_held_is_named_in_debug_builds() {
        let mut held = 1;
        unhold(&mut held, 2);
    }

    #[test]
    fn releasing_what_is_held_counts_down() {
        let mut held = 3;
        unhold(&mut held, 2);
        assert_eq!(held, 1);
    }

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_commit_gets_the_transaction_timeout_within_half_the_poll_interval() {
        assert_eq!(commit_window(10 * S, 300 * S), 10 * S);
        assert_eq!(commit_window(900 * S, 300 * S), 150 * S);
        assert_eq!(
            commit_window(Duration::MAX, Duration::MAX),
            Duration::MAX / 2
        );
    }

    #[test]
    fn every_call_of_a_commit_ends_by_one_deadline() {
        let start = Instant::now();
        let d = CommitDeadline::starting(start, 10 * S);
        // The work gets three quarters of the window; the abort the rest.
        assert_eq!(d.call_timeout(start), 7500 * MS);
        assert_eq!(d.call_timeout(start + 7 * S), 500 * MS);
        assert_eq!(d.call_timeout(start + 8 * S), Duration::ZERO);
        assert!(!d.passed(start + 7499 * MS) && d.passed(start + 7500 * MS));
        assert_eq!(d.abort_timeout(start + 7500 * MS), 2500 * MS);
        assert_eq!(d.abort_timeout(start + 9 * S), S);
        assert_eq!(d.abort_timeout(start + 60 * S), Duration::ZERO);
        // However the calls go, their timeouts and the abort's sum to at most the window.
        let mut now = start;
        for _ in 0..10 {
            now += d.call_timeout(now) / 3;
        }
        now += d.call_timeout(now);
        assert!(d.passed(now));
        now += d.abort_timeout(now);
        assert_eq!(now, start + 10 * S);
    }

    #[test]
    fn commit_retries_stop_at_their_count_or_the_deadline() {
        let start = Instant::now();
        let d = CommitDeadline::starting(start, 10 * S);
        let mut retries = d.commit_retries(start);
        let made = std::iter::from_fn(|| retries.next_delay_at(start)).count();
        assert_eq!(made, COMMIT_RETRIES as usize);
        let mut late = d.commit_retries(start);
        assert_eq!(late.next_delay_at(start + 7500 * MS), None);
        assert_eq!(
            d.commit_retries(start + 8 * S).next_delay_at(start + 8 * S),
            None
        );
        // The retries are made at once: the refused call already waited.
        assert_eq!(
            d.commit_retries(start).next_delay_at(start),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn the_window_never_overflows() {
        let start = Instant::now();
        let d = CommitDeadline::starting(start, Duration::MAX);
        assert_eq!(d.call_timeout(start), 64_800 * S);
        assert_eq!(d.abort_timeout(start), 86_400 * S);
        let none = CommitDeadline::starting(start, Duration::ZERO);
        assert!(none.passed(start));
        assert_eq!(none.abort_timeout(start), Duration::ZERO);
    }
}
