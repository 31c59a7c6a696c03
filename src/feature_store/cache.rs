//! A bounded, concurrent TTL cache: the in-process layer in front of the feature store.
//!
//! The cache does no I/O and reads no clock: every call that needs the time takes it as `now`,
//! so tests step time by hand. [`super::FeatureStore`] uses it with [`super::FeatureKey`] keys;
//! nothing in here knows about features.
//!
//! # Reads, fills and writes
//!
//! A read that misses goes to the database and then *fills* the cache. Between the two, a write
//! or an invalidation of the same key may land, and the value the read got may already be old.
//! To keep such a value out, a fill starts with [`TtlCache::begin_fill`], which notes the
//! generation of the key's *stripe* (one of [`FILL_STRIPES`] counters chosen by the key's hash),
//! and ends with [`TtlCache::complete_fill`], which inserts only if that generation has not
//! moved. Writes ([`TtlCache::update_if`]) and invalidations ([`TtlCache::invalidate`]) bump
//! the stripe *before* they touch the entry. Either a fill's check comes first (the write then
//! sees the filled entry and replaces it), or the write's bump does (the fill is dropped). A
//! write to another key of the same stripe also drops the fill, which costs one extra miss
//! later, never a stale value.
//!
//! [`TtlCache::update_if`] only replaces entries that exist: a write does not know whether the
//! database already holds something newer (writes may arrive out of order), so it does not
//! create entries; the next read fills them from the database.
//!
//! # Expiry and eviction
//!
//! Every entry expires at `now + ttl` given when it was stored; an expired entry is never
//! returned and is removed when a read finds it. The cache holds at most `max_entries`
//! entries. When a fill would exceed that, the cache first drops every expired entry (a full
//! scan, at most once per [`PURGE_INTERVAL`]), then evicts entries in the order they were
//! first inserted (FIFO), skipping queue records left behind by entries already gone. FIFO
//! needs no bookkeeping on reads, so hits take no lock but the key's shard lock; with TTLs of a
//! few minutes, a hot key evicted early costs one miss. The insertion queue holds at most about
//! twice `max_entries` records: when it grows past that, records of entries no longer present
//! are dropped.
//!
//! Locks: the insertion queue's mutex is taken before any map shard lock, never after, and
//! neither is held across an `.await` (there is none in this file).

use std::collections::VecDeque;
use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use serde::{Deserialize, Serialize};

/// How many fill generations keys are spread over. More stripes mean fewer fills dropped
/// because of writes to unrelated keys; each costs 8 bytes.
pub const FILL_STRIPES: usize = 1024;

/// The shortest time between two full scans for expired entries when the cache is full.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(1);

/// Counters of a cache since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups not answered from the cache (absent or expired).
    pub misses: u64,
    /// `hits / (hits + misses)`, 0 before the first lookup.
    pub hit_rate: f64,
    /// Live entries removed to make room.
    pub evictions: u64,
    /// Expired entries removed.
    pub expirations: u64,
    /// Calls to [`TtlCache::invalidate`] that removed an entry.
    pub invalidations: u64,
    /// Entries now held (expired ones not yet removed included).
    pub entries: usize,
}

/// Proof that a fill began, taken before the read whose result it will insert.
#[derive(Debug, Clone, Copy)]
#[must_use = "pass the ticket to complete_fill"]
pub struct FillTicket {
    stripe: usize,
    generation: u64,
}

/// What [`TtlCache::complete_fill`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOutcome {
    /// The value was stored.
    Inserted,
    /// A live entry was already there (another fill won); it was kept.
    AlreadyPresent,
    /// A write or invalidation touched the key's stripe since the ticket was taken; nothing was
    /// stored.
    Superseded,
    /// The TTL was zero; nothing was stored.
    NotCached,
}

/// One cached value.
struct Slot<V> {
    value: V,
    expires_at: Instant,
    /// The insertion number, matching this entry's record in the insertion queue.
    seq: u64,
}

/// The insertion queue, behind the cache's mutex.
struct Order<K> {
    /// `(key, seq)` in insertion order. A record whose entry is gone or was re-inserted under
    /// another `seq` is stale and skipped.
    queue: VecDeque<(K, u64)>,
    /// The next insertion number.
    next_seq: u64,
    /// When expired entries were last purged.
    last_purge: Option<Instant>,
}

/// A concurrent map from `K` to `V` whose entries expire and whose size is bounded; see the
/// module documentation for the policies.
pub struct TtlCache<K, V> {
    /// The entries.
    map: DashMap<K, Slot<V>>,
    /// Insertion order for FIFO eviction; every new entry is inserted under this lock.
    order: Mutex<Order<K>>,
    /// Fill generations, one per stripe of keys (see the module documentation).
    stripes: Box<[AtomicU64]>,
    /// Entries in `map`, kept beside it because `DashMap::len` locks every shard.
    len: AtomicUsize,
    /// The bound on `len`.
    max_entries: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    invalidations: AtomicU64,
}

impl<K: Hash + Eq + Clone, V: Clone> std::fmt::Debug for TtlCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtlCache")
            .field("max_entries", &self.max_entries)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<K, V> TtlCache<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    /// An empty cache holding at most `max_entries` entries.
    pub fn new(max_entries: NonZeroUsize) -> Self {
        TtlCache {
            map: DashMap::new(),
            order: Mutex::new(Order {
                queue: VecDeque::new(),
                next_seq: 0,
                last_purge: None,
            }),
            stripes: (0..FILL_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            len: AtomicUsize::new(0),
            max_entries: max_entries.get(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }

    /// The value of `key` if it is cached and not expired at `now`; counts a hit or a miss.
    pub fn get(&self, key: &K, now: Instant) -> Option<V> {
        let expired_seq = match self.map.get(key) {
            Some(slot) if slot.expires_at > now => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Some(slot.value.clone());
            }
            Some(slot) => Some(slot.seq),
            None => None,
        };
        self.misses.fetch_add(1, Ordering::Relaxed);
        if let Some(seq) = expired_seq {
            // Only the expired entry we saw: a fresh fill may have replaced it meanwhile.
            if self.map.remove_if(key, |_, slot| slot.seq == seq).is_some() {
                self.len.fetch_sub(1, Ordering::Relaxed);
                self.expirations.fetch_add(1, Ordering::Relaxed);
            }
        }
        None
    }

    /// Starts a fill of `key`: call before reading the value from the source of truth.
    pub fn begin_fill(&self, key: &K) -> FillTicket {
        let stripe = self.stripe(key);
        FillTicket {
            stripe,
            generation: self.stripes[stripe].load(Ordering::SeqCst),
        }
    }

    /// Stores `value` for `ttl` from `now`, unless the key was written or invalidated since
    /// `ticket` was taken, or a live entry is already there. Makes room first when the cache is
    /// full (expired entries, then FIFO).
    ///
    /// # Panics
    ///
    /// If the ticket was not made by [`TtlCache::begin_fill`] on this cache (its stripe is out
    /// of range), or if another thread panicked while holding the insertion queue's lock.
    pub fn complete_fill(
        &self,
        ticket: FillTicket,
        key: K,
        value: V,
        ttl: Duration,
        now: Instant,
    ) -> FillOutcome {
        if ttl.is_zero() {
            return FillOutcome::NotCached;
        }
        let expires_at = now + ttl;
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        // Room is made before the key's shard is locked (a victim may live in the same shard),
        // so a fill that then finds its key present, or superseded, may have evicted one entry
        // it did not need to.
        self.make_room(&mut order, now);
        let seq = order.next_seq;
        let outcome = match self.map.entry(key.clone()) {
            _ if self.stripes[ticket.stripe].load(Ordering::SeqCst) != ticket.generation => {
                FillOutcome::Superseded
            }
            Entry::Occupied(mut occupied) => {
                if occupied.get().expires_at > now {
                    FillOutcome::AlreadyPresent
                } else {
                    // Refill an expired entry: a new insertion, so a new place in the queue.
                    occupied.insert(Slot {
                        value,
                        expires_at,
                        seq,
                    });
                    FillOutcome::Inserted
                }
            }
            Entry::Vacant(vacant) => {
                // Counted before it is visible, so a concurrent removal never takes `len`
                // below zero.
                self.len.fetch_add(1, Ordering::Relaxed);
                vacant.insert(Slot {
                    value,
                    expires_at,
                    seq,
                });
                FillOutcome::Inserted
            }
        };
        if outcome == FillOutcome::Inserted {
            order.next_seq += 1;
            order.queue.push_back((key, seq));
            if order.queue.len() > self.max_entries.saturating_mul(2) {
                self.compact(&mut order);
            }
        }
        outcome
    }

    /// Replaces the value of `key` if a live entry exists and `replace(old)` says so, with a
    /// new expiry of `now + ttl`; never creates an entry. Returns whether it replaced. Call it
    /// after the source of truth has been written: it also cancels fills of the key's stripe
    /// that began earlier.
    pub fn update_if(
        &self,
        key: &K,
        value: V,
        ttl: Duration,
        now: Instant,
        replace: impl FnOnce(&V) -> bool,
    ) -> bool {
        self.bump(key);
        let Some(mut slot) = self.map.get_mut(key) else {
            return false;
        };
        if slot.expires_at <= now || !replace(&slot.value) {
            return false;
        }
        if ttl.is_zero() {
            // Nothing may be cached for this key any more: expire the entry now.
            slot.expires_at = now;
            return false;
        }
        slot.value = value;
        slot.expires_at = now + ttl;
        true
    }

    /// Removes `key`, and cancels fills of its stripe that began earlier. Returns whether an
    /// entry was removed.
    pub fn invalidate(&self, key: &K) -> bool {
        self.invalidate_if(key, |_| true)
    }

    /// Removes `key` if `remove(value)` says so, and cancels fills of its stripe that began
    /// earlier either way. Returns whether an entry was removed.
    pub fn invalidate_if(&self, key: &K, remove: impl FnOnce(&V) -> bool) -> bool {
        self.bump(key);
        if self
            .map
            .remove_if(key, |_, slot| remove(&slot.value))
            .is_some()
        {
            self.len.fetch_sub(1, Ordering::Relaxed);
            self.invalidations.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Removes every entry expired at `now`; returns how many. A full scan: meant for a
    /// periodic sweeper, not for every call.
    pub fn purge_expired(&self, now: Instant) -> usize {
        let mut removed = 0;
        self.map.retain(|_, slot| {
            let keep = slot.expires_at > now;
            if !keep {
                removed += 1;
            }
            keep
        });
        self.len.fetch_sub(removed, Ordering::Relaxed);
        self.expirations
            .fetch_add(removed as u64, Ordering::Relaxed);
        removed
    }

    /// Entries now held, expired ones not yet removed included.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether the cache holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        let hits = self.hits.load(Ordering::Relaxed);
        let misses = self.misses.load(Ordering::Relaxed);
        let lookups = hits + misses;
        CacheStats {
            hits,
            misses,
            hit_rate: if lookups == 0 {
                0.0
            } else {
                hits as f64 / lookups as f64
            },
            evictions: self.evictions.load(Ordering::Relaxed),
            expirations: self.expirations.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            entries: self.len(),
        }
    }

    fn stripe(&self, key: &K) -> usize {
        self.map.hash_usize(key) % self.stripes.len()
    }

    fn bump(&self, key: &K) {
        self.stripes[self.stripe(key)].fetch_add(1, Ordering::SeqCst);
    }

    /// Removes entries until one more fits: expired ones first (a full scan, at most once per
    /// [`PURGE_INTERVAL`]), then the oldest inserted.
    fn make_room(&self, order: &mut Order<K>, now: Instant) {
        while self.len() >= self.max_entries {
            let purge_due = order
                .last_purge
                .is_none_or(|at| now.saturating_duration_since(at) >= PURGE_INTERVAL);
            if purge_due {
                order.last_purge = Some(now);
                if self.purge_expired(now) > 0 {
                    continue;
                }
            }
            let Some((key, seq)) = order.queue.pop_front() else {
                // Every entry has a queue record, so this means the count is off; never loop.
                debug_assert!(false, "cache is full but its insertion queue is empty");
                return;
            };
            if let Some((_, slot)) = self.map.remove_if(&key, |_, slot| slot.seq == seq) {
                self.len.fetch_sub(1, Ordering::Relaxed);
                if slot.expires_at <= now {
                    self.expirations.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Drops the queue records of entries no longer present under the same insertion number.
    fn compact(&self, order: &mut Order<K>) {
        order
            .queue
            .retain(|(key, seq)| self.map.get(key).is_some_and(|slot| slot.seq == *seq));
    }

    #[cfg(test)]
    fn queue_len(&self) -> usize {
        self.order.lock().unwrap().queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn cache(max: usize) -> TtlCache<String, u64> {
        TtlCache::new(NonZeroUsize::new(max).unwrap())
    }

    fn fill(c: &TtlCache<String, u64>, key: &str, value: u64, ttl: Duration, now: Instant) {
        let ticket = c.begin_fill(&key.to_owned());
        assert_eq!(
            c.complete_fill(ticket, key.to_owned(), value, ttl, now),
            FillOutcome::Inserted
        );
    }

    #[test]
    fn hits_and_misses_are_counted() {
        let t0 = Instant::now();
        let c = cache(10);
        assert_eq!(c.get(&"a".into(), t0), None);
        fill(&c, "a", 1, TTL, t0);
        assert_eq!(c.get(&"a".into(), t0), Some(1));
        assert_eq!(c.get(&"a".into(), t0), Some(1));
        let stats = c.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (2, 1, 1));
        assert!((stats.hit_rate - 2.0 / 3.0).abs() < 1e-9, "{stats:?}");
    }

    #[test]
    fn entries_expire_at_their_deadline() {
        let t0 = Instant::now();
        let c = cache(10);
        fill(&c, "a", 1, TTL, t0);
        assert_eq!(
            c.get(&"a".into(), t0 + TTL - Duration::from_millis(1)),
            Some(1)
        );
        assert_eq!(c.get(&"a".into(), t0 + TTL), None);
        let stats = c.stats();
        assert_eq!((stats.expirations, stats.entries), (1, 0), "{stats:?}");
    }

    #[test]
    fn a_full_cache_evicts_the_oldest_inserted_entry() {
        let t0 = Instant::now();
        let c = cache(3);
        for (i, key) in ["a", "b", "c", "d"].into_iter().enumerate() {
            fill(&c, key, i as u64, TTL, t0 + Duration::from_millis(i as u64));
        }
        let now = t0 + Duration::from_millis(5);
        assert_eq!(c.get(&"a".into(), now), None, "oldest inserted goes first");
        for key in ["b", "c", "d"] {
            assert!(c.get(&key.to_owned(), now).is_some(), "{key} kept");
        }
        let stats = c.stats();
        assert_eq!((stats.evictions, stats.entries), (1, 3), "{stats:?}");
    }

    #[test]
    fn expired_entries_go_before_live_ones() {
        let t0 = Instant::now();
        let c = cache(3);
        fill(&c, "a", 1, TTL, t0);
        fill(&c, "b", 2, Duration::from_secs(1), t0);
        fill(&c, "c", 3, TTL, t0);
        let later = t0 + Duration::from_secs(2);
        fill(&c, "d", 4, TTL, later);
        assert_eq!(c.get(&"a".into(), later), Some(1), "live oldest entry kept");
        assert_eq!(c.get(&"b".into(), later), None);
        let stats = c.stats();
        assert_eq!((stats.evictions, stats.expirations), (0, 1), "{stats:?}");
    }

    #[test]
    fn the_size_bound_holds_under_churn_and_the_queue_stays_bounded() {
        let t0 = Instant::now();
        let c = cache(4);
        for i in 0..10_000_u64 {
            let now = t0 + Duration::from_millis(i);
            let key = format!("k{}", i % 7);
            if i % 3 == 0 {
                c.invalidate(&key);
            }
            let ticket = c.begin_fill(&key);
            let _ = c.complete_fill(ticket, key, i, TTL, now);
            assert!(c.len() <= 4, "len {} at step {i}", c.len());
            assert!(c.queue_len() <= 9, "queue {} at step {i}", c.queue_len());
        }
        assert_eq!(c.len(), c.map.len());
    }

    #[test]
    fn concurrent_fills_invalidations_and_reads_keep_the_count_and_the_bound() {
        let t0 = Instant::now();
        let c = std::sync::Arc::new(cache(8));
        let threads: Vec<_> = (0..4_u64)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000_u64 {
                        let key = format!("k{}", (i * 7 + t) % 13);
                        let now = t0 + Duration::from_micros(i);
                        match i % 4 {
                            0 => {
                                c.invalidate(&key);
                            }
                            1 => {
                                c.get(&key, now);
                            }
                            _ => {
                                let ticket = c.begin_fill(&key);
                                let _ = c.complete_fill(ticket, key, i, TTL, now);
                            }
                        }
                        assert!(c.len() <= 8, "len {}", c.len());
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("worker");
        }
        assert_eq!(c.len(), c.map.len());
    }

    #[test]
    fn a_write_or_invalidation_during_a_fill_drops_the_fill() {
        let t0 = Instant::now();
        let c = cache(10);
        let key = "a".to_owned();

        let ticket = c.begin_fill(&key);
        assert!(
            !c.update_if(&key, 5, TTL, t0, |_| true),
            "no entry to update"
        );
        assert_eq!(
            c.complete_fill(ticket, key.clone(), 1, TTL, t0),
            FillOutcome::Superseded
        );

        let ticket = c.begin_fill(&key);
        c.invalidate(&key);
        assert_eq!(
            c.complete_fill(ticket, key.clone(), 1, TTL, t0),
            FillOutcome::Superseded
        );
        assert_eq!(c.get(&key, t0), None);

        let ticket = c.begin_fill(&key);
        assert_eq!(
            c.complete_fill(ticket, key.clone(), 1, TTL, t0),
            FillOutcome::Inserted
        );
    }

    #[test]
    fn a_second_fill_keeps_the_live_entry() {
        let t0 = Instant::now();
        let c = cache(10);
        let key = "a".to_owned();
        let first = c.begin_fill(&key);
        let second = c.begin_fill(&key);
        assert_eq!(
            c.complete_fill(first, key.clone(), 1, TTL, t0),
            FillOutcome::Inserted
        );
        assert_eq!(
            c.complete_fill(second, key.clone(), 2, TTL, t0),
            FillOutcome::AlreadyPresent
        );
        assert_eq!(c.get(&key, t0), Some(1));
    }

    #[test]
    fn update_if_replaces_only_when_the_predicate_agrees() {
        let t0 = Instant::now();
        let c = cache(10);
        let key = "a".to_owned();
        fill(&c, "a", 5, TTL, t0);
        assert!(!c.update_if(&key, 3, TTL, t0, |old| *old <= 3));
        assert_eq!(c.get(&key, t0), Some(5));
        assert!(c.update_if(&key, 7, TTL, t0, |old| *old <= 7));
        assert_eq!(c.get(&key, t0), Some(7));
        // The write restarts the entry's TTL.
        let later = t0 + TTL - Duration::from_secs(1);
        assert!(c.update_if(&key, 8, TTL, later, |_| true));
        assert_eq!(c.get(&key, t0 + TTL), Some(8));
        // A write with a zero TTL expires the entry.
        assert!(!c.update_if(&key, 9, Duration::ZERO, later, |_| true));
        assert_eq!(c.get(&key, later), None);
    }

    #[test]
    fn invalidate_removes_and_counts() {
        let t0 = Instant::now();
        let c = cache(10);
        fill(&c, "a", 1, TTL, t0);
        assert!(c.invalidate(&"a".into()));
        assert!(!c.invalidate(&"a".into()));
        assert_eq!(c.get(&"a".into(), t0), None);
        let stats = c.stats();
        assert_eq!((stats.invalidations, stats.entries), (1, 0), "{stats:?}");
    }

    #[test]
    fn purge_expired_removes_only_expired_entries() {
        let t0 = Instant::now();
        let c = cache(10);
        fill(&c, "short", 1, Duration::from_secs(1), t0);
        fill(&c, "long", 2, TTL, t0);
        assert_eq!(c.purge_expired(t0 + Duration::from_secs(1)), 1);
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(&"long".into(), t0), Some(2));
    }

    #[test]
    fn zero_ttl_is_not_cached() {
        let t0 = Instant::now();
        let c = cache(10);
        let ticket = c.begin_fill(&"a".to_owned());
        assert_eq!(
            c.complete_fill(ticket, "a".into(), 1, Duration::ZERO, t0),
            FillOutcome::NotCached
        );
        assert!(c.is_empty());
    }
}
