//! Replay-safe inference: results kept by request id, so a request delivered again is answered
//! with its earlier output instead of calling its model again.
//!
//! # Where results are kept, and why
//!
//! In process, in a bounded cache (moka: at most `replay.max_entries`, each for
//! `replay.ttl_secs`). Redeliveries that reach the same instance are covered: a partition
//! revoked in a rebalance and assigned back, an exactly-once transaction aborted and its
//! records consumed again, a client producing the same request twice. A crash is not: the
//! redelivered records go to a fresh process (or another instance) with an empty store, and
//! their models are called again. Durable alternatives were weighed and not taken: the results
//! topic is keyed by request id, not by source partition, so finding the earlier results of a
//! redelivered partition means reading a window of every results partition on each
//! assignment; a table in the feature store's database would add a write and a read per
//! request on the hot path. Both are possible later behind this module's interface.
//!
//! # What counts as the same request
//!
//! The request id *and* a 64-bit fingerprint of the message bytes: a client reusing an id for
//! a different request is not served the other request's answer (barring a 64-bit collision
//! between two payloads with the same id). Only successful outputs are kept; errors are
//! computed again.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;
use std::time::Duration;

use crate::config::ReplayConfig;
use crate::executor::ExecOutput;
use crate::metrics as m;

/// The fingerprint of a request's message bytes (fixed keys: the same bytes always give the
/// same value in this process).
pub fn fingerprint(payload: &[u8]) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(payload)
}

/// Earlier results by request id, bounded in entries and time.
#[derive(Clone)]
pub struct ReplayStore {
    cache: moka::future::Cache<String, Arc<(u64, ExecOutput)>>,
}

impl std::fmt::Debug for ReplayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayStore")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl ReplayStore {
    /// The store `config` describes, or `None` when replay is turned off.
    pub fn from_config(config: &ReplayConfig) -> Option<ReplayStore> {
        config.enabled.then(|| {
            ReplayStore::new(
                config.max_entries.get(),
                Duration::from_secs(config.ttl_secs.get()),
            )
        })
    }

    /// A store of at most `max_entries` results, each kept for `ttl`.
    pub fn new(max_entries: u64, ttl: Duration) -> ReplayStore {
        ReplayStore {
            cache: moka::future::Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The earlier output of request `id` with these bytes, if kept.
    pub async fn get(&self, id: &str, fingerprint: u64) -> Option<ExecOutput> {
        let found = self
            .cache
            .get(id)
            .await
            .filter(|entry| entry.0 == fingerprint)
            .map(|entry| entry.1.clone());
        let outcome = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!(m::REPLAY_LOOKUPS_TOTAL, "outcome" => outcome).increment(1);
        found
    }

    /// Keeps the output of request `id`.
    pub async fn put(&self, id: String, fingerprint: u64, output: ExecOutput) {
        self.cache.insert(id, Arc::new((fingerprint, output))).await;
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
        store.cache.run_pending_tasks().await;
        assert!(
            store.cache.entry_count() <= 10,
            "{} entries kept",
            store.cache.entry_count()
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
