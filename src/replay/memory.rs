//! The replay store's in-process tier: earlier outputs by request id, bounded in entries and
//! in time.
//!
//! It is looked up for every request and written for every executed one, so it is built for
//! that: a fast non-cryptographic hasher (foldhash: request ids are not secret, and the bound
//! keeps a flood of colliding ids harmless), entries evicted oldest first, the clock read once
//! per batch, and the map split into shards of about [`SHARD_ENTRIES`] entries, each behind its
//! own lock, taken once per batch per shard for writes (and briefly per lookup).
//!
//! Why shards: a hash map that keeps a steady number of entries while old ones are removed and
//! new ones inserted fills with deletion markers, and every so often rebuilds its whole table
//! under the lock (hashbrown rehashes in place, or doubles once). At 100,000 entries that took
//! 50–600 ms, during which every batch waited on the lock: it was the p99 tail at low load
//! (BENCHMARKS.md). A shard of about a thousand entries rebuilds in well under a millisecond,
//! and only its own requests wait.
//!
//! The map holds at most `max_entries` entries rounded up to a multiple of the shard count
//! (each shard keeps at most its share, oldest out first); an entry older than `ttl` is never
//! served and is dropped as the oldest entries are.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::executor::ExecOutput;

/// About how many entries a shard holds at the bound: small enough that rebuilding its table
/// is sub-millisecond work, large enough that a batch touches each shard's lock at most once.
const SHARD_ENTRIES: usize = 1024;

/// The most shards: at 256 × 1,024 entries and beyond, shards grow instead.
const MAX_SHARDS: usize = 256;

struct Entry {
    fingerprint: u64,
    output: ExecOutput,
    kept: Instant,
    /// Which insertion this is, so an id kept again is evicted by its newest insertion only.
    seq: u64,
}

struct Shard {
    entries: HashMap<Arc<str>, Entry, foldhash::fast::RandomState>,
    /// Insertion order: (id, seq), oldest first.
    order: VecDeque<(Arc<str>, u64)>,
    next_seq: u64,
}

impl Shard {
    fn with_capacity(capacity: usize) -> Shard {
        Shard {
            entries: HashMap::with_capacity_and_hasher(capacity, Default::default()),
            order: VecDeque::with_capacity(capacity),
            next_seq: 0,
        }
    }

    /// Keeps one output, and moves what it replaces to `evicted`.
    fn insert(
        &mut self,
        id: Arc<str>,
        fingerprint: u64,
        output: ExecOutput,
        now: Instant,
        evicted: &mut Vec<Entry>,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.push_back((Arc::clone(&id), seq));
        let entry = Entry {
            fingerprint,
            output,
            kept: now,
            seq,
        };
        evicted.extend(self.entries.insert(id, entry));
    }

    /// Evicts the oldest entries beyond `max_entries` and those past `ttl` at `now`.
    fn evict(&mut self, max_entries: usize, ttl: Duration, now: Instant, evicted: &mut Vec<Entry>) {
        let Shard { entries, order, .. } = self;
        while let Some((id, seq)) = order.front() {
            let current = entries.get(id).filter(|e| e.seq == *seq);
            let expired = current.is_some_and(|e| now.saturating_duration_since(e.kept) >= ttl);
            if entries.len() <= max_entries && !expired && order.len() <= 2 * max_entries {
                break;
            }
            if current.is_some() {
                evicted.extend(entries.remove(id));
            }
            order.pop_front();
        }
    }
}

/// Bounded in-process outputs by request id.
pub(crate) struct Memory {
    shards: Box<[Mutex<Shard>]>,
    /// Picks a request id's shard; seeded per process like the maps themselves.
    router: foldhash::fast::RandomState,
    /// The most entries one shard keeps.
    per_shard: usize,
    ttl: Duration,
}

impl Memory {
    pub(crate) fn new(max_entries: u64, ttl: Duration) -> Memory {
        let max_entries = usize::try_from(max_entries).unwrap_or(usize::MAX);
        let shards = max_entries
            .div_ceil(SHARD_ENTRIES)
            .next_power_of_two()
            .clamp(1, MAX_SHARDS);
        let per_shard = max_entries.div_ceil(shards);
        // Each shard is sized for its share up front (up to a million entries in all).
        let capacity = per_shard.min((1 << 20) / shards);
        Memory {
            shards: (0..shards)
                .map(|_| Mutex::new(Shard::with_capacity(capacity)))
                .collect(),
            router: foldhash::fast::RandomState::default(),
            per_shard,
            ttl,
        }
    }

    fn shard_of(&self, id: &str) -> usize {
        // The shard count is a power of two.
        (self.router.hash_one(id) as usize) & (self.shards.len() - 1)
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // Every change to a shard is completed before its lock is released, except a panic in
        // `ExecOutput::clone`, which changes nothing.
        self.shards[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The output kept for `id` with this fingerprint, if it is there and not older than the
    /// TTL at `now`.
    pub(crate) fn get(&self, id: &str, fingerprint: u64, now: Instant) -> Option<ExecOutput> {
        let shard = self.lock(self.shard_of(id));
        let entry = shard.entries.get(id)?;
        (entry.fingerprint == fingerprint && now.saturating_duration_since(entry.kept) < self.ttl)
            .then(|| entry.output.clone())
    }

    /// Keeps `outputs` (id, fingerprint, output), kept at `now`; evicts the oldest entries
    /// beyond the bound and those past the TTL.
    pub(crate) fn keep(&self, outputs: Vec<(String, u64, ExecOutput)>, now: Instant) {
        if self.per_shard == 0 || outputs.is_empty() {
            return;
        }
        // Grouped by shard, so each shard's lock is taken once for the batch.
        let mut routed: Vec<(usize, Arc<str>, u64, ExecOutput)> = outputs
            .into_iter()
            .map(|(id, fingerprint, output)| {
                (self.shard_of(&id), Arc::from(id), fingerprint, output)
            })
            .collect();
        routed.sort_by_key(|(shard, ..)| *shard);
        // Evicted entries are dropped after the lock is released: dropping a request's data
        // is most of the cost of an eviction.
        let mut evicted: Vec<Entry> = Vec::new();
        let mut routed = routed.into_iter().peekable();
        while let Some((index, id, fingerprint, output)) = routed.next() {
            let mut shard = self.lock(index);
            shard.insert(id, fingerprint, output, now, &mut evicted);
            while let Some((id, fingerprint, output)) = routed
                .next_if(|(next, ..)| *next == index)
                .map(|(_, id, f, o)| (id, f, o))
            {
                shard.insert(id, fingerprint, output, now, &mut evicted);
            }
            shard.evict(self.per_shard, self.ttl, now, &mut evicted);
            drop(shard);
            evicted.clear();
        }
    }

    /// Entries held now (expired ones included until they are evicted).
    pub(crate) fn len(&self) -> usize {
        (0..self.shards.len())
            .map(|i| self.lock(i).entries.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(n: u64) -> ExecOutput {
        ExecOutput {
            output: serde_json::json!({ "n": n }),
            model_version: None,
            cached: false,
            steps: Vec::new(),
        }
    }

    #[test]
    fn keeps_at_most_max_entries_oldest_out_first() {
        let memory = Memory::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        memory.keep((0..5).map(|n| (format!("r{n}"), n, out(n))).collect(), t0);
        assert_eq!(memory.len(), 3);
        assert!(memory.get("r0", 0, t0).is_none() && memory.get("r1", 1, t0).is_none());
        assert_eq!(memory.get("r4", 4, t0), Some(out(4)));
        assert!(
            memory.get("r4", 5, t0).is_none(),
            "another payload with the same id"
        );
    }

    #[test]
    fn an_id_kept_again_is_not_evicted_by_its_older_insertion() {
        let memory = Memory::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        memory.keep(vec![("a".into(), 1, out(1)), ("b".into(), 2, out(2))], t0);
        memory.keep(vec![("a".into(), 1, out(10))], t0);
        memory.keep(vec![("c".into(), 3, out(3))], t0);
        // "b" is now the oldest live entry; "a" was kept again after it.
        assert!(memory.get("b", 2, t0).is_none());
        assert_eq!(memory.get("a", 1, t0), Some(out(10)));
        assert_eq!(memory.get("c", 3, t0), Some(out(3)));
    }

    #[test]
    fn a_large_bound_is_sharded_and_still_holds_oldest_out_first() {
        let memory = Memory::new(10_000, Duration::from_secs(60));
        assert_eq!(memory.shards.len(), 16, "about a thousand entries a shard");
        let t0 = Instant::now();
        for batch in 0..30u64 {
            let outputs = (batch * 1000..(batch + 1) * 1000)
                .map(|n| (format!("r{n}"), n, out(n)))
                .collect();
            memory.keep(outputs, t0);
        }
        let held = memory.len();
        assert!(
            (9_000..=10_000 + 16).contains(&held),
            "held {held} for a bound of 10,000"
        );
        assert!(
            memory.get("r29999", 29_999, t0).is_some(),
            "the newest stays"
        );
        assert!(memory.get("r0", 0, t0).is_none(), "the oldest went");
        let old = (0..15_000u64)
            .filter(|&n| memory.get(&format!("r{n}"), n, t0).is_some())
            .count();
        assert_eq!(old, 0, "nothing older than the newest 15,000 is held");
    }

    #[test]
    fn entries_past_the_ttl_are_not_served_and_are_dropped() {
        let memory = Memory::new(100, Duration::from_millis(50));
        let t0 = Instant::now();
        memory.keep(vec![("a".into(), 1, out(1))], t0);
        assert!(memory.get("a", 1, t0 + Duration::from_millis(49)).is_some());
        assert!(memory.get("a", 1, t0 + Duration::from_millis(50)).is_none());
        memory.keep(
            vec![("b".into(), 2, out(2))],
            t0 + Duration::from_millis(60),
        );
        assert_eq!(
            memory.len(),
            1,
            "the expired entry went with the next write"
        );
    }
}
