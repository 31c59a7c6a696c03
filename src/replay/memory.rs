//! The replay store's in-process tier: earlier outputs by request id, bounded in entries and
//! in time.
//!
//! It is looked up for every request and written for every executed one, so it is built for
//! that:
//!
//! - **One allocation per entry.** An entry holds the request id and the output serialised as
//!   JSON in one buffer, written while the output is still hot in the cache, and the output's
//!   tree is dropped right away. Keeping the trees themselves (a dozen small allocations each,
//!   100,000 of them at the default bound, each dropped cold when evicted) cost about a third
//!   of the processor's CPU per request on the `identity` pipeline (BENCHMARKS.md). A hit,
//!   which is rare, parses the output back; numbers keep their digits (`arbitrary_precision`).
//! - **Maps keyed by the id's 64-bit hash** (foldhash; request ids are not secret, and the
//!   bound keeps a flood of colliding ids harmless): the entry keeps the id and a lookup
//!   compares it, so two ids with one hash only evict each other.
//! - **Shards of about [`SHARD_ENTRIES`] entries**, each behind its own lock, taken once per
//!   batch per shard for writes (and briefly per lookup). A hash map that keeps a steady
//!   number of entries while old ones are removed and new ones inserted fills with deletion
//!   markers, and every so often rebuilds its whole table under the lock (hashbrown rehashes
//!   in place, or doubles once). At 100,000 entries in one map that took 50–600 ms, during
//!   which every batch waited: it was the p99 tail at low load (BENCHMARKS.md). A shard of
//!   about a thousand entries rebuilds in well under a millisecond, and only its own requests
//!   wait.
//!
//! Entries are evicted oldest first, with the clock read once per batch. The map holds at most
//! `max_entries` entries rounded up to a multiple of the shard count (each shard keeps at most
//! its share); an entry older than `ttl` is never served and is dropped as the oldest entries
//! are.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::executor::ExecOutput;

/// About how many entries a shard holds at the bound: small enough that rebuilding its table
/// is sub-millisecond work, large enough that a batch touches each shard's lock at most once.
const SHARD_ENTRIES: usize = 1024;

/// The most shards: at 256 × 1,024 entries and beyond, shards grow instead.
const MAX_SHARDS: usize = 256;

struct Entry {
    fingerprint: u64,
    kept: Instant,
    /// Which insertion this is, so an id kept again is evicted by its newest insertion only.
    seq: u64,
    /// How many of `bytes` are the request id; the rest is the output as JSON.
    id_len: usize,
    bytes: Box<[u8]>,
}

impl Entry {
    fn id(&self) -> &[u8] {
        &self.bytes[..self.id_len]
    }

    fn output(&self) -> Option<ExecOutput> {
        serde_json::from_slice(&self.bytes[self.id_len..]).ok()
    }
}

/// An output on its way into the map: id and output JSON in one buffer.
struct Packed {
    hash: u64,
    fingerprint: u64,
    id_len: usize,
    bytes: Box<[u8]>,
}

struct Shard {
    /// By the id's hash.
    entries: HashMap<u64, Entry, foldhash::fast::RandomState>,
    /// Insertion order: (id hash, seq), oldest first.
    order: VecDeque<(u64, u64)>,
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
    fn insert(&mut self, packed: Packed, now: Instant, evicted: &mut Vec<Entry>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.push_back((packed.hash, seq));
        let entry = Entry {
            fingerprint: packed.fingerprint,
            kept: now,
            seq,
            id_len: packed.id_len,
            bytes: packed.bytes,
        };
        evicted.extend(self.entries.insert(packed.hash, entry));
    }

    /// Evicts the oldest entries beyond `max_entries` and those past `ttl` at `now`.
    fn evict(&mut self, max_entries: usize, ttl: Duration, now: Instant, evicted: &mut Vec<Entry>) {
        let Shard { entries, order, .. } = self;
        while let Some((hash, seq)) = order.front() {
            let current = entries.get(hash).filter(|e| e.seq == *seq);
            let expired = current.is_some_and(|e| now.saturating_duration_since(e.kept) >= ttl);
            if entries.len() <= max_entries && !expired && order.len() <= 2 * max_entries {
                break;
            }
            if current.is_some() {
                evicted.extend(entries.remove(hash));
            }
            order.pop_front();
        }
    }
}

/// Bounded in-process outputs by request id.
pub(crate) struct Memory {
    shards: Box<[Mutex<Shard>]>,
    /// Hashes request ids; seeded per process. The low bits pick the shard; the shard's map
    /// hashes the hash again with a seed of its own.
    hasher: foldhash::fast::RandomState,
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
            hasher: foldhash::fast::RandomState::default(),
            per_shard,
            ttl,
        }
    }

    /// The id's hash and its shard.
    fn locate(&self, id: &str) -> (u64, usize) {
        let hash = self.hasher.hash_one(id);
        // The shard count is a power of two.
        (hash, (hash as usize) & (self.shards.len() - 1))
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // Every change to a shard is completed before its lock is released.
        self.shards[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The output kept for `id` with this fingerprint, if it is there and not older than the
    /// TTL at `now`.
    pub(crate) fn get(&self, id: &str, fingerprint: u64, now: Instant) -> Option<ExecOutput> {
        let (hash, shard) = self.locate(id);
        let shard = self.lock(shard);
        let entry = shard.entries.get(&hash)?;
        (entry.id() == id.as_bytes()
            && entry.fingerprint == fingerprint
            && now.saturating_duration_since(entry.kept) < self.ttl)
            .then(|| entry.output())
            .flatten()
    }

    /// Keeps `outputs` (id, fingerprint, output), kept at `now`; evicts the oldest entries
    /// beyond the bound and those past the TTL.
    pub(crate) fn keep(&self, outputs: Vec<(String, u64, ExecOutput)>, now: Instant) {
        if self.per_shard == 0 || outputs.is_empty() {
            return;
        }
        // Packed before any lock is taken, and grouped by shard, so each shard's lock is
        // taken once for the batch. Each output's tree is dropped here, while it is hot.
        // One scratch buffer; each entry's is allocated once at its exact size.
        let mut scratch = Vec::with_capacity(1024);
        let mut routed: Vec<(usize, Packed)> = outputs
            .into_iter()
            .filter_map(|(id, fingerprint, output)| {
                scratch.clear();
                scratch.extend_from_slice(id.as_bytes());
                // Serialising an output cannot fail (string keys only); if it did, the output
                // is not kept, which only means a redelivery executes again.
                serde_json::to_writer(&mut scratch, &output).ok()?;
                let (hash, shard) = self.locate(&id);
                let packed = Packed {
                    hash,
                    fingerprint,
                    id_len: id.len(),
                    bytes: Box::from(scratch.as_slice()),
                };
                Some((shard, packed))
            })
            .collect();
        routed.sort_unstable_by_key(|(shard, _)| *shard);
        // Evicted entries are dropped after the lock is released.
        let mut evicted: Vec<Entry> = Vec::new();
        let mut routed = routed.into_iter().peekable();
        while let Some((index, packed)) = routed.next() {
            let mut shard = self.lock(index);
            shard.insert(packed, now, &mut evicted);
            while let Some((_, packed)) = routed.next_if(|(next, _)| *next == index) {
                shard.insert(packed, now, &mut evicted);
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
    fn an_output_comes_back_exactly_as_it_was_kept() {
        let memory = Memory::new(10, Duration::from_secs(60));
        let t0 = Instant::now();
        let output = ExecOutput {
            output: serde_json::from_str(
                r#"{"p":0.12044115189281823,"big":12345678901234567890123,"z":-0.0,"s":"\u00e9\n"}"#,
            )
            .unwrap(),
            model_version: Some("2".into()),
            cached: true,
            steps: Vec::new(),
        };
        memory.keep(vec![("r1".into(), 7, output.clone())], t0);
        let back = memory.get("r1", 7, t0).expect("kept");
        assert_eq!(back, output);
        assert_eq!(
            serde_json::to_string(&back.output).unwrap(),
            serde_json::to_string(&output.output).unwrap()
        );
        assert!(memory.get("r", 7, t0).is_none() && memory.get("r1x", 7, t0).is_none());
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
