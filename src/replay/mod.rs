//! Replay-safe inference: results kept by request id, so a request delivered again is answered
//! with its earlier output instead of calling its model again.
//!
//! # Two tiers
//!
//! - **In process** (always, when `replay.enabled`): a bounded map ([`memory`]: at most
//!   `replay.max_entries`, oldest out first, each served for `replay.ttl_secs`), looked up
//!   for every request. It covers
//!   redeliveries that reach the same instance: a partition revoked in a rebalance and
//!   assigned back, an exactly-once transaction aborted and its records consumed again, a
//!   client producing the same request twice.
//! - **In the database** (`replay.store = "cql"`, module [`cql`]): every successful output is
//!   also written to the feature store's CQL database, keyed by consumer group and request id,
//!   with `USING TTL replay.ttl_secs`. It covers a crash and a partition moved to another
//!   instance. Writes run in a task beside the answer's delivery, never before it, at most
//!   `replay.max_pending_writes` at a time (beyond that a result is not stored, and counted).
//!   A per-partition *mark* (the offset after the last record whose output was written) keeps
//!   reads off the hot path: when a partition is assigned, its mark is read once, and only
//!   records below it, that is records consumed again, are looked up in the database.
//!
//! Both tiers are best effort, never a condition for answering: a result not (yet) stored, or
//! a database that does not answer, only means the model is called again, as without replay.
//!
//! # What counts as the same request
//!
//! The request id *and* a 64-bit fingerprint of the message bytes (XXH64, seed 0, stable
//! across processes and versions): a client reusing an id for a different request is not
//! served the other request's answer (barring a 64-bit collision between two payloads with the
//! same id). Only successful outputs are kept; errors are computed again.

mod config;
pub mod cql;
mod memory;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tokio::sync::Semaphore;

pub use self::config::{ReplayConfig, ReplayStoreKind};
use self::cql::CqlReplay;
use self::memory::Memory;
use crate::executor::ExecOutput;
use crate::feature_store::FeatureStoreConfig;
use crate::kafka::source::lock;
use crate::metrics as m;

/// How long a partition whose mark could not be read goes without database lookups before
/// the read is tried again.
const MARK_RETRY: Duration = Duration::from_secs(10);

/// Database reads of one batch's redelivered records running at once.
const READ_CONCURRENCY: usize = 64;

/// The fingerprint of a request's message bytes: XXH64 with seed 0.
pub fn fingerprint(payload: &[u8]) -> u64 {
    twox_hash::XxHash64::oneshot(0, payload)
}

/// A record consumed again, perhaps: what a database lookup needs.
#[derive(Debug, Clone, Copy)]
pub struct Redelivery<'a> {
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Request id.
    pub id: &'a str,
    /// Fingerprint of the message bytes.
    pub fingerprint: u64,
}

/// An output to store in the database.
#[derive(Debug, Clone)]
pub struct Computed {
    /// Request id.
    pub id: String,
    /// Fingerprint of the message bytes.
    pub fingerprint: u64,
    /// The output, serialised.
    pub output_json: String,
}

/// Earlier results by request id, bounded in entries and time; see the module documentation.
#[derive(Clone)]
pub struct ReplayStore {
    memory: Arc<Memory>,
    durable: Option<Arc<Durable>>,
    /// Lookups in the in-process tier by outcome, looked up once (not per request).
    memory_hits: metrics::Counter,
    memory_misses: metrics::Counter,
}

struct Durable {
    cql: CqlReplay,
    /// Per assigned partition, the mark read when it was assigned.
    marks: Mutex<HashMap<(String, i32), Mark>>,
    /// One permit per result write in flight.
    pending: Arc<Semaphore>,
    /// Whether the last write failed (so failures are logged once per outage).
    failing: AtomicBool,
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    next_offset: i64,
    /// Set when the read failed: no lookups until then, then read again.
    retry_at: Option<Instant>,
}

impl std::fmt::Debug for ReplayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayStore")
            .field("entries", &self.memory.len())
            .field("durable", &self.durable.as_ref().map(|d| &d.cql))
            .finish()
    }
}

impl ReplayStore {
    /// The store `replay` describes, or `None` when replay is turned off. With
    /// `replay.store = "cql"` this connects to the feature store's database and keeps the
    /// results of consumer group `group_id` (`kafka.group_id`).
    pub async fn open(
        replay: &ReplayConfig,
        feature_store: &FeatureStoreConfig,
        group_id: &str,
    ) -> anyhow::Result<Option<ReplayStore>> {
        if !replay.enabled {
            return Ok(None);
        }
        let mut store = ReplayStore::new(
            replay.max_entries.get(),
            Duration::from_secs(replay.ttl_secs.get()),
        );
        if replay.store == ReplayStoreKind::Cql {
            let cql = CqlReplay::open(feature_store, group_id, replay.ttl_secs.get())
                .await
                .map_err(|err| {
                    anyhow::anyhow!(
                        "replay.store = \"cql\": opening the results table in {}: {err}",
                        feature_store.keyspace
                    )
                })?;
            store.durable = Some(Arc::new(Durable {
                cql,
                marks: Mutex::new(HashMap::new()),
                pending: Arc::new(Semaphore::new(replay.max_pending_writes.get())),
                failing: AtomicBool::new(false),
            }));
        }
        Ok(Some(store))
    }

    /// An in-process store of at most `max_entries` results, each kept for `ttl`.
    pub fn new(max_entries: u64, ttl: Duration) -> ReplayStore {
        ReplayStore {
            memory: Arc::new(Memory::new(max_entries, ttl)),
            durable: None,
            memory_hits: metrics::counter!(m::REPLAY_LOOKUPS_TOTAL, "outcome" => "hit", "tier" => "memory"),
            memory_misses: metrics::counter!(m::REPLAY_LOOKUPS_TOTAL, "outcome" => "miss", "tier" => "memory"),
        }
    }

    /// Whether results are also kept in the database.
    pub fn is_durable(&self) -> bool {
        self.durable.is_some()
    }

    /// The earlier output of request `id` with these bytes, if this process kept it.
    pub async fn get(&self, id: &str, fingerprint: u64) -> Option<ExecOutput> {
        self.get_at(id, fingerprint, Instant::now())
    }

    /// [`ReplayStore::get`] with the time passed in (one clock read per batch).
    pub fn get_at(&self, id: &str, fingerprint: u64, now: Instant) -> Option<ExecOutput> {
        let found = self.memory.get(id, fingerprint, now);
        if found.is_some() {
            self.memory_hits.increment(1);
        } else {
            self.memory_misses.increment(1);
        }
        found
    }

    /// Keeps the output of request `id` in this process.
    pub async fn put(&self, id: String, fingerprint: u64, output: ExecOutput) {
        self.memory
            .keep(vec![(id, fingerprint, output)], Instant::now());
    }

    /// Keeps executed outputs (request id, fingerprint, output): in this process, and with the
    /// database tier also there (see [`ReplayStore::persist`]; `marks` as there).
    pub async fn keep(
        &self,
        outputs: Vec<(String, u64, ExecOutput)>,
        marks: Vec<(String, i32, i64)>,
    ) {
        if self.durable.is_some() {
            let computed = outputs
                .iter()
                .filter_map(|(id, fingerprint, output)| {
                    Some(Computed {
                        id: id.clone(),
                        fingerprint: *fingerprint,
                        output_json: serde_json::to_string(output).ok()?,
                    })
                })
                .collect();
            self.persist(computed, marks);
        }
        self.memory.keep(outputs, Instant::now());
    }

    /// For each record (in order), its output stored in the database, when the record lies
    /// below its partition's mark (consumed before) and its output is there. Without the
    /// database tier, or when the database does not answer, every answer is `None`.
    pub async fn get_redelivered(&self, records: &[Redelivery<'_>]) -> Vec<Option<ExecOutput>> {
        let Some(durable) = &self.durable else {
            return vec![None; records.len()];
        };
        durable.load_marks(records).await;
        let below_mark: Vec<bool> = {
            let marks = lock(&durable.marks);
            records
                .iter()
                .map(|r| {
                    marks
                        .get(&(r.topic.to_owned(), r.partition))
                        .is_some_and(|mark| mark.retry_at.is_none() && r.offset < mark.next_offset)
                })
                .collect()
        };
        let lookups: Vec<_> = records
            .iter()
            .zip(below_mark)
            .map(|(record, below)| lookup(durable, record, below))
            .collect();
        futures::stream::iter(lookups)
            .buffered(READ_CONCURRENCY)
            .collect()
            .await
    }

    /// Writes `outputs` to the database, then moves each partition's mark to its next offset
    /// (`marks`: topic, partition, offset after the batch's last record), in a task of its
    /// own, so the caller does not wait. Does nothing without the database tier; stores
    /// nothing when more than `replay.max_pending_writes` writes would be in flight.
    pub fn persist(&self, outputs: Vec<Computed>, marks: Vec<(String, i32, i64)>) {
        let Some(durable) = &self.durable else {
            return;
        };
        if outputs.is_empty() {
            return;
        }
        let count = outputs.len();
        let permits = u32::try_from(count)
            .ok()
            .and_then(|n| Arc::clone(&durable.pending).try_acquire_many_owned(n).ok());
        let Some(permits) = permits else {
            metrics::counter!(m::REPLAY_WRITES_TOTAL, "outcome" => "skipped")
                .increment(count as u64);
            return;
        };
        let durable = Arc::clone(durable);
        tokio::spawn(async move {
            let writes = outputs
                .iter()
                .map(|c| durable.cql.put_json(&c.id, c.fingerprint, &c.output_json));
            let results = futures::future::join_all(writes).await;
            let failed = results.iter().filter(|r| r.is_err()).count();
            let first_error = results.into_iter().find_map(Result::err);
            let mut mark_error = None;
            if failed < count {
                for (topic, partition, next_offset) in &marks {
                    if let Err(err) = durable.cql.set_mark(topic, *partition, *next_offset).await {
                        mark_error = Some(err);
                    }
                }
            }
            drop(permits);
            metrics::counter!(m::REPLAY_WRITES_TOTAL, "outcome" => "ok")
                .increment((count - failed) as u64);
            metrics::counter!(m::REPLAY_WRITES_TOTAL, "outcome" => "error")
                .increment(failed as u64);
            match first_error.or(mark_error) {
                Some(err) => {
                    if !durable.failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %err, "storing results for replay failed; redelivered requests will call their models again (logged once until writes succeed)");
                    }
                }
                None => {
                    if durable.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("storing results for replay works again");
                    }
                }
            }
        });
    }

    /// Forgets the marks of `partitions`, newly assigned: the next record of each reads its
    /// mark again (another instance may have moved it meanwhile).
    pub fn assigned(&self, partitions: &[(String, i32)]) {
        if let Some(durable) = &self.durable {
            let mut marks = lock(&durable.marks);
            for partition in partitions {
                marks.remove(partition);
            }
        }
    }
}

impl Durable {
    /// Reads the marks of the partitions of `records` not read since they were assigned (or
    /// whose last read failed more than [`MARK_RETRY`] ago).
    async fn load_marks(&self, records: &[Redelivery<'_>]) {
        let now = Instant::now();
        let mut wanted: Vec<(String, i32)> = {
            let marks = lock(&self.marks);
            records
                .iter()
                .filter(|r| {
                    marks
                        .get(&(r.topic.to_owned(), r.partition))
                        .is_none_or(|mark| mark.retry_at.is_some_and(|at| at <= now))
                })
                .map(|r| (r.topic.to_owned(), r.partition))
                .collect()
        };
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return;
        }
        let reads = wanted
            .iter()
            .map(|(topic, partition)| self.cql.mark(topic, *partition));
        let results = futures::future::join_all(reads).await;
        let mut marks = lock(&self.marks);
        for (key, result) in wanted.into_iter().zip(results) {
            let mark = match result {
                Ok(next_offset) => {
                    tracing::debug!(topic = %key.0, partition = key.1, next_offset, "replay mark read");
                    Mark {
                        next_offset,
                        retry_at: None,
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, topic = %key.0, partition = key.1, "reading the replay mark failed; records of this partition are not looked up for {} s", MARK_RETRY.as_secs());
                    Mark {
                        next_offset: 0,
                        retry_at: Some(now + MARK_RETRY),
                    }
                }
            };
            marks.insert(key, mark);
        }
    }
}

/// The stored output of `record`, when it lies below its partition's mark (`below`).
async fn lookup(durable: &Durable, record: &Redelivery<'_>, below: bool) -> Option<ExecOutput> {
    if !below {
        return None;
    }
    match durable.cql.get(record.id, record.fingerprint).await {
        Ok(found) => {
            let outcome = if found.is_some() { "hit" } else { "miss" };
            metrics::counter!(m::REPLAY_LOOKUPS_TOTAL, "outcome" => outcome, "tier" => "cql")
                .increment(1);
            found
        }
        Err(err) => {
            metrics::counter!(m::REPLAY_LOOKUPS_TOTAL, "outcome" => "error", "tier" => "cql")
                .increment(1);
            tracing::debug!(error = %err, request_id = record.id, "replay lookup failed; computing the request again");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn output(v: i64) -> ExecOutput {
        ExecOutput {
            output: json!({ "v": v }),
            model_version: None,
            cached: false,
            steps: Vec::new(),
        }
    }

    #[tokio::test]
    async fn same_id_and_bytes_replay_and_other_bytes_do_not() {
        let store = ReplayStore::new(100, Duration::from_secs(60));
        let a = fingerprint(br#"{"request_id":"r1","data":1}"#);
        let b = fingerprint(br#"{"request_id":"r1","data":2}"#);
        assert_ne!(a, b);
        assert!(store.get("r1", a).await.is_none());
        store.put("r1".into(), a, output(1)).await;
        assert_eq!(
            store.get("r1", a).await.map(|o| o.output),
            Some(json!({"v": 1}))
        );
        assert!(
            store.get("r1", b).await.is_none(),
            "a different request reusing the id is not served the old answer"
        );
        assert!(store.get("r2", a).await.is_none());
    }

    #[tokio::test]
    async fn entries_are_bounded() {
        let store = ReplayStore::new(10, Duration::from_secs(60));
        for i in 0..1000 {
            store.put(format!("r{i}"), 1, output(i)).await;
        }
        assert!(
            store.memory.len() <= 10,
            "{} entries kept",
            store.memory.len()
        );
    }

    #[tokio::test]
    async fn entries_expire() {
        let store = ReplayStore::new(10, Duration::from_millis(50));
        store.put("r".into(), 1, output(1)).await;
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(store.get("r", 1).await.is_none());
    }
}
