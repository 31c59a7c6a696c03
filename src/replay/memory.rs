//! The replay store's in-process tier: earlier outputs by request id, bounded in entries and
//! in time.
//!
//! It is looked up for every request and written for every executed one, so it is built for
//! that: one map behind one lock taken once per batch for writes (and briefly per lookup),
//! a fast non-cryptographic hasher (foldhash: request ids are not secret, and the bound keeps
//! a flood of colliding ids harmless), entries evicted oldest first, and the clock read once
//! per batch. The map holds at most `max_entries` entries; an entry older than `ttl` is never
//! served and is dropped as the oldest entries are.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::executor::ExecOutput;

struct Entry {
    fingerprint: u64,
    output: ExecOutput,
    kept: Instant,
    /// Which insertion this is, so an id kept again is evicted by its newest insertion only.
    seq: u64,
}

struct Tier {
    entries: HashMap<Arc<str>, Entry, foldhash::fast::RandomState>,
    /// Insertion order: (id, seq), oldest first.
    order: VecDeque<(Arc<str>, u64)>,
    next_seq: u64,
}

/// Bounded in-process outputs by request id.
pub(crate) struct Memory {
    tier: Mutex<Tier>,
    max_entries: usize,
    ttl: Duration,
}

impl Memory {
    pub(crate) fn new(max_entries: u64, ttl: Duration) -> Memory {
        let max_entries = usize::try_from(max_entries).unwrap_or(usize::MAX);
        // Sized for the bound up front (up to a million entries), so the map never rehashes
        // every entry under the lock while it grows. (This did not remove the p99 tail that
        // comes with 100,000 entries; see BENCHMARKS.md.)
        let capacity = max_entries.min(1 << 20);
        Memory {
            tier: Mutex::new(Tier {
                entries: HashMap::with_capacity_and_hasher(
                    capacity,
                    foldhash::fast::RandomState::default(),
                ),
                order: VecDeque::with_capacity(capacity),
                next_seq: 0,
            }),
            max_entries,
            ttl,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tier> {
        // Every change below is completed before the lock is released, except a panic in
        // `ExecOutput::clone`, which changes nothing.
        self.tier.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The output kept for `id` with this fingerprint, if it is there and not older than the
    /// TTL at `now`.
    pub(crate) fn get(&self, id: &str, fingerprint: u64, now: Instant) -> Option<ExecOutput> {
        let tier = self.lock();
        let entry = tier.entries.get(id)?;
        (entry.fingerprint == fingerprint && now.saturating_duration_since(entry.kept) < self.ttl)
            .then(|| entry.output.clone())
    }

    /// Keeps `outputs` (id, fingerprint, output), kept at `now`; evicts the oldest entries
    /// beyond the bound and those past the TTL.
    pub(crate) fn keep(&self, outputs: Vec<(String, u64, ExecOutput)>, now: Instant) {
        if self.max_entries == 0 {
            return;
        }
        // Evicted entries are dropped after the lock is released: dropping a request's data
        // is most of the cost of an eviction.
        let mut evicted: Vec<Entry> = Vec::new();
        let mut tier = self.lock();
        for (id, fingerprint, output) in outputs {
            let id: Arc<str> = Arc::from(id);
            let seq = tier.next_seq;
            tier.next_seq += 1;
            tier.order.push_back((Arc::clone(&id), seq));
            let replaced = tier.entries.insert(
                id,
                Entry {
                    fingerprint,
                    output,
                    kept: now,
                    seq,
                },
            );
            evicted.extend(replaced);
        }
        let Tier { entries, order, .. } = &mut *tier;
        while let Some((id, seq)) = order.front() {
            let expired = entries.get(id).is_some_and(|e| {
                e.seq == *seq && now.saturating_duration_since(e.kept) >= self.ttl
            });
            if entries.len() <= self.max_entries && !expired && order.len() <= 2 * self.max_entries
            {
                break;
            }
            if entries.get(id).is_some_and(|e| e.seq == *seq) {
                evicted.extend(entries.remove(id));
            }
            order.pop_front();
        }
        drop(tier);
        drop(evicted);
    }

    /// Entries held now (expired ones included until they are evicted).
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
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
