//! The inference result cache: answers to identical model calls, kept for a while and shared.
//!
//! [`ResultCache`] sits in front of a [`Provider`](super::Provider) call. Each call is named by
//! a [`CacheKey`]: the tenant, the resolved model id (`name@version`), the input and its
//! parameters, written in a canonical JSON form (object keys sorted at every depth, no
//! whitespace), so `{"a":1,"b":2}` and `{"b":2,"a":1}` share an entry. The canonical text itself
//! is the key, not a digest of it: two different calls can never share an entry by collision,
//! and different tenants never share one (`None` is distinct from `Some("")`).
//!
//! The store is a [`quick_cache`] cache (CLOCK-Pro eviction, close to S3-FIFO: an answer seen
//! once sits in a small "cold" part and is evicted first, so inputs that never repeat do not
//! push out those that do) bounded both in entries and in bytes: every entry weighs its
//! approximate size (key text plus output JSON) but never less than `max_bytes / max_entries`,
//! so a total weight of at most `max_bytes` implies at most `max_entries` entries. Caches of
//! 2,048 entries or more are split in up to 8 shards that hold an equal part of both bounds
//! each, so one answer larger than `max_bytes / shards` is returned but not kept. An answer is
//! served for `ttl_secs` after it was computed; an expired entry is dropped when it is next
//! looked up, when its space is needed, or by [`ResultCache::run_pending_tasks`].
//!
//! Why not moka: its bookkeeping on every insert (its table rehashing, a write log, a
//! frequency sketch, key locks) was 13 % of the realistic pipeline's CPU in process, where
//! inputs rarely repeat and nearly every answer is inserted once and never read; this store's
//! is 3.5 % (BENCHMARKS.md).
//!
//! Identical calls in flight at the same time share one provider call (coalescing): the first
//! caller computes, the others wait for its outcome. Errors are never cached; every caller
//! waiting on a failed computation gets the error, and the next call computes again. A
//! [`CachePolicy`] can turn the cache off for one call (models whose answers should not be
//! reused, such as high-temperature chat).

use std::fmt::{self, Write as _};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{BuildError, ProviderError, ProviderInput, ProviderOutput};

/// Bytes added to every entry's weight for the bookkeeping around key and value.
const ENTRY_OVERHEAD_BYTES: u64 = 128;

/// Sizing of a [`ResultCache`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResultCacheConfig {
    /// Most entries kept.
    pub max_entries: u64,
    /// Most bytes kept, counting each entry's key text and output JSON (approximate).
    pub max_bytes: u64,
    /// How long an answer is served after it was computed, in seconds.
    pub ttl_secs: u64,
}

impl Default for ResultCacheConfig {
    fn default() -> Self {
        ResultCacheConfig {
            max_entries: 10_000,
            max_bytes: 64 * 1024 * 1024,
            ttl_secs: 600,
        }
    }
}

impl ResultCacheConfig {
    /// Every out-of-range value, one message each, naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.max_entries == 0 {
            problems.push("cache.max_entries must be at least 1".to_owned());
        }
        if self.max_bytes == 0 {
            problems.push("cache.max_bytes must be at least 1".to_owned());
        }
        if self.ttl_secs == 0 {
            problems.push("cache.ttl_secs must be at least 1".to_owned());
        }
        problems
    }

    /// The least weight of an entry, so that `max_bytes` of weight holds at most `max_entries`
    /// entries.
    fn min_weight(&self) -> u64 {
        self.max_bytes.div_ceil(self.max_entries.max(1))
    }
}

/// Whether one call may use the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachePolicy {
    /// False to call the provider directly, neither reading nor filling the cache.
    pub enabled: bool,
}

impl CachePolicy {
    /// Use the cache.
    pub const ENABLED: CachePolicy = CachePolicy { enabled: true };
    /// Bypass the cache.
    pub const BYPASS: CachePolicy = CachePolicy { enabled: false };
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy::ENABLED
    }
}

/// Names one model call: tenant, resolved model id, input and parameters, in canonical JSON.
///
/// The key keeps the whole canonical text, and two keys are equal only when their texts are:
/// a hash collision can never serve one call's answer to another. The text's hash is computed
/// once, when the key is built (foldhash, not std's SipHash), and is all that [`Hash`] feeds a
/// hasher, so the cache's lookups hash eight bytes instead of the whole text.
#[derive(Debug, Clone)]
pub struct CacheKey {
    hash: u64,
    text: Box<str>,
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.text == other.text
    }
}

impl Eq for CacheKey {}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The hasher of key texts: seeded at random once per process, so every key of the process
/// hashes alike and nobody outside can predict which texts collide.
static KEY_HASHER: LazyLock<foldhash::fast::RandomState> =
    LazyLock::new(foldhash::fast::RandomState::default);

/// The build-hasher of the maps keyed by [`CacheKey`] (the store's, the flights' and a
/// batch's own): the hash a key computed once when it was built passes through as it is, so
/// neither a lookup, an insert nor a table growing runs a hash function again (std's default
/// would run SipHash over the eight bytes each time).
#[derive(Debug, Clone, Copy, Default)]
struct KeyHashing;

/// The hasher [`KeyHashing`] builds: [`CacheKey`]'s `Hash` writes one `u64`, which becomes the
/// hash. Anything else written is folded in (never the case for `CacheKey`), so it stays a
/// correct hasher for any input.
#[derive(Debug, Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        // The first write passes through unchanged; later ones are mixed in.
        self.0 = self.0.rotate_left(23) ^ n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl BuildHasher for KeyHashing {
    type Hasher = PassThrough;

    fn build_hasher(&self) -> PassThrough {
        PassThrough(0)
    }
}

impl CacheKey {
    /// The key of calling `model` (resolved to `name@version` by the caller, so a new version
    /// never serves an old version's answers) with `input` for `tenant`.
    pub fn new(tenant: Option<&str>, model: &str, input: &ProviderInput) -> Self {
        let mut text = String::with_capacity(64);
        text.push('[');
        match tenant {
            Some(tenant) => write_string(&mut text, tenant),
            None => text.push_str("null"),
        }
        text.push(',');
        write_string(&mut text, model);
        text.push(',');
        write_canonical(&mut text, &input.data);
        text.push(',');
        write_object(&mut text, input.parameters.iter());
        text.push(']');
        CacheKey {
            hash: KEY_HASHER.hash_one(text.as_str()),
            text: text.into_boxed_str(),
        }
    }

    /// The canonical text: `[tenant, model, data, parameters]` as compact JSON with sorted
    /// object keys. It contains request data, so it is not for logs.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Writes `value` as compact JSON with the keys of every object sorted.
fn write_canonical(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            // The number's text as written (serde_json's `arbitrary_precision`): two integers
            // beyond 2^53 never share a key, though `1.0` and `1.00` do not either (a miss,
            // never a wrong hit). Infallible: writing to a String.
            let _ = write!(out, "{n}");
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => write_object(out, map.iter()),
    }
}

fn write_object<'a>(out: &mut String, entries: impl Iterator<Item = (&'a String, &'a Value)>) {
    // Sorted here rather than relying on the map's order: serde_json keeps insertion order
    // when any crate in the build enables its `preserve_order` feature.
    let mut entries: Vec<_> = entries.collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, key);
        out.push(':');
        write_canonical(out, value);
    }
    out.push('}');
}

/// Writes `s` as a JSON string literal. Runs of characters that need no escape are copied
/// whole: every character escaped is ASCII, so a byte below 0x20, `"` or `\\` is always a
/// whole character, and slicing around it stays on character boundaries.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..0x20 => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", b);
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Counts the bytes written through [`fmt::Write`].
struct ByteCounter(u64);

impl fmt::Write for ByteCounter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 += s.len() as u64;
        Ok(())
    }
}

/// The approximate size of an output: its JSON text and the model name.
fn output_bytes(output: &ProviderOutput) -> u64 {
    let mut counter = ByteCounter(0);
    // Infallible: the counter never fails.
    let _ = write!(counter, "{}", output.output);
    counter.0 + output.model.as_ref().map_or(0, |m| m.len() as u64)
}

/// A cached answer with its size, computed once, and the end of its time to live.
#[derive(Debug)]
struct Cached {
    output: ProviderOutput,
    bytes: u64,
    expires_at: Instant,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// From the cache.
    Hit,
    /// Not in the cache: this call computed it (and cached it, when it succeeded).
    Miss,
    /// From an identical call in flight at the same time, whose computation this one waited
    /// for.
    Coalesced,
    /// The cache was off for this call ([`CachePolicy::BYPASS`]); this call computed it.
    Bypassed,
}

impl CacheStatus {
    /// True when the answer was not computed by this call: [`Hit`](Self::Hit) or
    /// [`Coalesced`](Self::Coalesced). What a result's `cached` flag should say.
    pub fn served_from_cache(self) -> bool {
        matches!(self, CacheStatus::Hit | CacheStatus::Coalesced)
    }
}

/// Counters since the cache was built, and its current size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CacheStats {
    /// Calls answered from the cache.
    pub hits: u64,
    /// Calls that computed their answer (successfully or not).
    pub misses: u64,
    /// Calls that waited for an identical call's computation.
    pub coalesced: u64,
    /// Calls with the cache turned off.
    pub bypassed: u64,
    /// Entries removed to stay within `max_entries` or `max_bytes` (including new entries
    /// not admitted).
    pub evictions: u64,
    /// Entries removed because their time to live passed.
    pub expirations: u64,
    /// Entries held (approximate until pending maintenance has run).
    pub entries: u64,
    /// Weight held, in bytes (approximate, as `entries`).
    pub weighted_bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    bypassed: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Counts a lookup in the cache's own counters and in the exported metric.
fn count(counter: &AtomicU64, status: CacheStatus) {
    count_n(counter, status, 1);
}

/// Counts `n` lookups of one outcome (a batch's, at once: one metric update, not `n`).
fn count_n(counter: &AtomicU64, status: CacheStatus, n: u64) {
    if n == 0 {
        return;
    }
    counter.fetch_add(n, Ordering::Relaxed);
    let outcome = match status {
        CacheStatus::Hit => "hit",
        CacheStatus::Miss => "miss",
        CacheStatus::Coalesced => "coalesced",
        CacheStatus::Bypassed => "bypassed",
    };
    metrics::counter!(crate::metrics::CACHE_LOOKUPS_TOTAL, "outcome" => outcome).increment(n);
}

/// The weight of an entry: its key text, its output and the bookkeeping around them, but never
/// less than the configured least weight (which turns the byte bound into an entry bound).
#[derive(Debug, Clone, Copy)]
struct EntryWeight {
    min_weight: u64,
}

impl quick_cache::Weighter<CacheKey, Arc<Cached>> for EntryWeight {
    fn weight(&self, key: &CacheKey, value: &Arc<Cached>) -> u64 {
        (key.text.len() as u64 + value.bytes + ENTRY_OVERHEAD_BYTES).max(self.min_weight)
    }
}

/// Counts the entries the store evicts to stay within its bounds (and the new entries it does
/// not admit), and hands the first two back to be dropped after the shard's lock is released.
#[derive(Debug, Clone)]
struct CountEvictions(Arc<Counters>);

impl quick_cache::Lifecycle<CacheKey, Arc<Cached>> for CountEvictions {
    type RequestState = [Option<(CacheKey, Arc<Cached>)>; 2];

    fn on_evict(&self, state: &mut Self::RequestState, key: CacheKey, value: Arc<Cached>) {
        bump(&self.0.evictions);
        if let Some(slot) = state.iter_mut().find(|slot| slot.is_none()) {
            *slot = Some((key, value));
        }
    }
}

type Store =
    quick_cache::sync::Cache<CacheKey, Arc<Cached>, EntryWeight, KeyHashing, CountEvictions>;

/// One computation in flight: its outcome once known. A waiter sees the sender dropped
/// without an outcome when the computing call was dropped; it then computes itself.
type Flight = tokio::sync::watch::Receiver<Option<Result<Arc<Cached>, ProviderError>>>;

/// The computations in flight, by key: [`ResultCache::get_or_compute`] shares them.
type Flights = std::sync::Mutex<std::collections::HashMap<CacheKey, Flight, KeyHashing>>;

/// Removes its key from the flights when the computing call ends, however it ends.
struct FlightGuard<'a> {
    flights: &'a Flights,
    key: &'a CacheKey,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        lock(self.flights).remove(self.key);
    }
}

fn lock(
    flights: &Flights,
) -> std::sync::MutexGuard<'_, std::collections::HashMap<CacheKey, Flight, KeyHashing>> {
    // Nothing panics while holding it; a poisoned map is still consistent.
    flights
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The most shards of the store: a shard holds `1 / shards` of the bounds, so shards are only
/// added while each still holds [`MIN_SHARD_ENTRIES`] entries.
const MAX_SHARDS: u64 = 8;
const MIN_SHARD_ENTRIES: u64 = 1024;

/// The inference result cache. Cheap to clone; clones share entries and counters.
#[derive(Clone)]
pub struct ResultCache {
    store: Arc<Store>,
    flights: Arc<Flights>,
    ttl: Duration,
    counters: Arc<Counters>,
    config: ResultCacheConfig,
}

impl fmt::Debug for ResultCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResultCache")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl ResultCache {
    /// An empty cache sized by `config`; fails when a value is out of range.
    pub fn new(config: ResultCacheConfig) -> Result<Self, BuildError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(BuildError::InvalidConfig { problems });
        }
        let counters = Arc::new(Counters::default());
        let shards = (config.max_entries / MIN_SHARD_ENTRIES).clamp(1, MAX_SHARDS);
        let shards = 1u64 << shards.ilog2();
        let options = quick_cache::OptionsBuilder::new()
            .shards(shards as usize)
            .estimated_items_capacity(config.max_entries.min(1 << 16) as usize)
            .weight_capacity(config.max_bytes)
            .build()
            .map_err(|e| BuildError::InvalidConfig {
                problems: vec![format!("cache: {e}")],
            })?;
        let store = Store::with_options(
            options,
            EntryWeight {
                min_weight: config.min_weight(),
            },
            KeyHashing,
            CountEvictions(Arc::clone(&counters)),
        );
        Ok(ResultCache {
            store: Arc::new(store),
            flights: Arc::default(),
            ttl: Duration::from_secs(config.ttl_secs),
            counters,
            config,
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &ResultCacheConfig {
        &self.config
    }

    /// The live entry for `key` at `now`. An entry whose time to live has passed is removed
    /// (and counted) instead.
    fn live(&self, key: &CacheKey, now: Instant) -> Option<Arc<Cached>> {
        let cached = self.store.get(key)?;
        if cached.expires_at > now {
            return Some(cached);
        }
        if self
            .store
            .remove_if(key, |current| Arc::ptr_eq(current, &cached))
            .is_some()
        {
            bump(&self.counters.expirations);
        }
        None
    }

    /// Wraps a computed answer for the store, with its size and expiry.
    fn entry(&self, output: ProviderOutput) -> Arc<Cached> {
        let bytes = output_bytes(&output);
        Arc::new(Cached {
            output,
            bytes,
            expires_at: Instant::now() + self.ttl,
        })
    }

    /// The answer for `key`: from the cache, from an identical call already computing it, or
    /// from `compute`, which runs at most once and only when neither has it. Successful
    /// answers are cached; errors are not, and reach every caller that waited on them. With
    /// [`CachePolicy::BYPASS`], `compute` runs and the cache is neither read nor filled.
    ///
    /// If the computing call is dropped before it finishes, a waiting caller takes over and
    /// computes with its own `compute`.
    pub async fn get_or_compute<F, Fut>(
        &self,
        key: CacheKey,
        policy: CachePolicy,
        compute: F,
    ) -> (Result<ProviderOutput, ProviderError>, CacheStatus)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<ProviderOutput, ProviderError>>,
    {
        if !policy.enabled {
            count(&self.counters.bypassed, CacheStatus::Bypassed);
            return (compute().await, CacheStatus::Bypassed);
        }
        if let Some(cached) = self.live(&key, Instant::now()) {
            count(&self.counters.hits, CacheStatus::Hit);
            return (Ok(cached.output.clone()), CacheStatus::Hit);
        }
        let sender = loop {
            let mut waiting = {
                let mut flights = lock(&self.flights);
                match flights.get(&key) {
                    Some(flight) => flight.clone(),
                    None => {
                        // Inserted between the lookup above and now: served as a waiter.
                        if let Some(cached) = self.live(&key, Instant::now()) {
                            drop(flights);
                            count(&self.counters.coalesced, CacheStatus::Coalesced);
                            return (Ok(cached.output.clone()), CacheStatus::Coalesced);
                        }
                        let (sender, receiver) = tokio::sync::watch::channel(None);
                        flights.insert(key.clone(), receiver);
                        break sender;
                    }
                }
            };
            let result = match waiting.wait_for(Option::is_some).await.as_deref() {
                Ok(Some(Ok(cached))) => Ok(cached.output.clone()),
                Ok(Some(Err(error))) => Err(error.clone()),
                // The computing call was dropped before its outcome (its guard removed the
                // flight): take over. (`wait_for` returns only once there is an outcome.)
                Ok(None) | Err(_) => continue,
            };
            count(&self.counters.coalesced, CacheStatus::Coalesced);
            return (result, CacheStatus::Coalesced);
        };
        let guard = FlightGuard {
            flights: &self.flights,
            key: &key,
        };
        let outcome = compute().await.map(|output| self.entry(output));
        if let Ok(cached) = &outcome {
            self.store.insert(key.clone(), Arc::clone(cached));
        }
        count(&self.counters.misses, CacheStatus::Miss);
        let result = match &outcome {
            Ok(cached) => Ok(cached.output.clone()),
            Err(error) => Err(error.clone()),
        };
        // Waiters get the outcome; the entry is already in the store for later callers.
        sender.send_replace(Some(outcome));
        drop(guard);
        (result, CacheStatus::Miss)
    }

    /// The answers for a batch of `keys`, in order: cached ones from the cache, the others
    /// from **one** `compute` call, which gets the positions (in `keys`) of the distinct keys
    /// to compute and returns one outcome for each, in that order. A key repeated in the batch
    /// is computed once (its repeats count as coalesced). Successful answers are cached;
    /// errors are not. Unlike [`ResultCache::get_or_compute`], a batch does not wait for an
    /// identical computation running in another call: both compute it.
    pub async fn get_or_compute_batch<F, Fut>(
        &self,
        keys: Vec<CacheKey>,
        compute: F,
    ) -> Vec<(Result<ProviderOutput, ProviderError>, CacheStatus)>
    where
        F: FnOnce(Vec<usize>) -> Fut,
        Fut: Future<Output = Vec<Result<ProviderOutput, ProviderError>>>,
    {
        let mut answers: Vec<Option<(Result<ProviderOutput, ProviderError>, CacheStatus)>> =
            Vec::with_capacity(keys.len());
        // Per key not cached: which distinct miss computes it.
        let mut slot_of: Vec<Option<usize>> = vec![None; keys.len()];
        let mut distinct: std::collections::HashMap<&CacheKey, usize, KeyHashing> =
            std::collections::HashMap::with_capacity_and_hasher(keys.len(), KeyHashing);
        let mut to_compute: Vec<usize> = Vec::new();
        let mut hits = 0;
        let now = Instant::now();
        for (i, key) in keys.iter().enumerate() {
            if let Some(cached) = self.live(key, now) {
                hits += 1;
                answers.push(Some((Ok(cached.output.clone()), CacheStatus::Hit)));
                continue;
            }
            answers.push(None);
            let next = to_compute.len();
            let slot = *distinct.entry(key).or_insert(next);
            if slot == next {
                to_compute.push(i);
            }
            slot_of[i] = Some(slot);
        }
        count_n(&self.counters.hits, CacheStatus::Hit, hits);
        if to_compute.is_empty() {
            return answers.into_iter().flatten().collect();
        }
        let wanted = to_compute.len();
        let mut computed = compute(to_compute.clone()).await;
        if computed.len() != wanted {
            let error = ProviderError::InvalidResponse {
                message: format!(
                    "the provider returned {} outcomes for {wanted} inputs",
                    computed.len()
                ),
            };
            computed = (0..wanted).map(|_| Err(error.clone())).collect();
        }
        drop(distinct);
        // Each successful answer moves into the cache once, with the key it was computed for
        // (moved, not copied: `to_compute` is in increasing order); the callers get copies of
        // it from there.
        let computed: Vec<Result<Arc<Cached>, ProviderError>> = computed
            .into_iter()
            .map(|outcome| outcome.map(|output| self.entry(output)))
            .collect();
        let mut slots = to_compute.iter().zip(&computed).peekable();
        for (i, key) in keys.into_iter().enumerate() {
            let Some((_, outcome)) = slots.next_if(|(first, _)| **first == i) else {
                continue;
            };
            if let Ok(cached) = outcome {
                self.store.insert(key, Arc::clone(cached));
            }
        }
        let misses = to_compute.len() as u64;
        let coalesced = slot_of.iter().flatten().count() as u64 - misses;
        count_n(&self.counters.misses, CacheStatus::Miss, misses);
        count_n(&self.counters.coalesced, CacheStatus::Coalesced, coalesced);
        answers
            .into_iter()
            .zip(slot_of)
            .enumerate()
            .map(|(i, (answer, slot))| match (answer, slot) {
                (Some(answer), _) => answer,
                (None, Some(slot)) => {
                    let status = if to_compute[slot] == i {
                        CacheStatus::Miss
                    } else {
                        CacheStatus::Coalesced
                    };
                    let outcome = match &computed[slot] {
                        Ok(cached) => Ok(cached.output.clone()),
                        Err(error) => Err(ProviderError::clone(error)),
                    };
                    (outcome, status)
                }
                // Every key is cached or has a slot; kept total without a panic.
                (None, None) => (
                    Err(ProviderError::InvalidResponse {
                        message: "no outcome for this input".to_owned(),
                    }),
                    CacheStatus::Miss,
                ),
            })
            .collect()
    }

    /// Counters and current size.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            bypassed: c.bypassed.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            expirations: c.expirations.load(Ordering::Relaxed),
            entries: self.store.len() as u64,
            weighted_bytes: self.store.weight(),
        }
    }

    /// Removes every entry whose time to live has passed now (counted as expirations), which
    /// otherwise happens when such an entry is looked up or its space is needed.
    pub async fn run_pending_tasks(&self) {
        let now = Instant::now();
        self.store.retain(|_, cached| {
            let live = cached.expires_at > now;
            if !live {
                bump(&self.counters.expirations);
            }
            live
        });
    }

    /// Removes every entry (for instance after a model is reloaded).
    pub fn invalidate_all(&self) {
        self.store.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(data: Value, params: Value) -> ProviderInput {
        ProviderInput::with_parameters(data, params.as_object().cloned())
    }

    #[test]
    fn keys_are_canonical_json() {
        let key = CacheKey::new(
            Some("acme"),
            "m@1",
            &input(
                json!({"b": [1, {"z": 1, "y": "x"}], "a": null}),
                json!({"t": 0.5}),
            ),
        );
        assert_eq!(
            key.as_str(),
            r#"["acme","m@1",{"a":null,"b":[1,{"y":"x","z":1}]},{"t":0.5}]"#
        );
        // The canonical text parses back to the same document.
        let parsed: Value = serde_json::from_str(key.as_str()).unwrap();
        assert_eq!(
            parsed,
            json!(["acme", "m@1", {"a": null, "b": [1, {"y": "x", "z": 1}]}, {"t": 0.5}])
        );
        let reordered = CacheKey::new(
            Some("acme"),
            "m@1",
            &input(
                json!({"a": null, "b": [1, {"y": "x", "z": 1}]}),
                json!({"t": 0.5}),
            ),
        );
        assert_eq!(key, reordered);
    }

    #[test]
    fn keys_keep_apart_what_differs() {
        let data = input(json!("hi"), json!({}));
        let keys = [
            CacheKey::new(None, "m@1", &data),
            CacheKey::new(Some(""), "m@1", &data),
            CacheKey::new(Some("null"), "m@1", &data),
            CacheKey::new(Some("a"), "m@1", &data),
            CacheKey::new(Some("a"), "m@2", &data),
            CacheKey::new(Some("a"), "m@1", &input(json!("hi"), json!({"t": 1}))),
            CacheKey::new(Some("a"), "m@1", &input(json!("hi"), json!({"t": 1.0}))),
            CacheKey::new(Some("a"), "m@1", &input(json!(["hi"]), json!({}))),
            // A tenant that tries to smuggle in the separators.
            CacheKey::new(Some("a\",\"m@1"), "", &data),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn strings_are_escaped_as_json() {
        let key = CacheKey::new(None, "m", &input(json!("q\"\\\n\u{1}é"), json!({})));
        let parsed: Value = serde_json::from_str(key.as_str()).unwrap();
        assert_eq!(parsed[2], json!("q\"\\\n\u{1}é"));
    }

    #[test]
    fn strings_are_escaped_exactly_as_before() {
        // Every escape, runs of plain text (ASCII and not) between them, and the ends.
        let key = CacheKey::new(
            Some("\t"),
            "m",
            &input(json!("a\"b\\c\nd\re\tf\u{1f}g\u{0}é\u{7f}ü"), json!({})),
        );
        assert_eq!(
            key.as_str(),
            "[\"\\t\",\"m\",\"a\\\"b\\\\c\\nd\\re\\tf\\u001fg\\u0000é\u{7f}ü\",{}]"
        );
    }

    /// Keys whose hashes collide are still different keys: the cache never answers one with
    /// the other's output.
    #[tokio::test]
    async fn colliding_hashes_never_share_an_answer() {
        let first = CacheKey::new(None, "m", &input(json!("first"), json!({})));
        let mut second = CacheKey::new(None, "m", &input(json!("second"), json!({})));
        second.hash = first.hash;
        assert_ne!(first, second);
        let cache = ResultCache::new(ResultCacheConfig::default()).unwrap();
        for (key, answer) in [(&first, "answer to first"), (&second, "answer to second")] {
            let (out, status) = cache
                .get_or_compute(key.clone(), CachePolicy::ENABLED, || async move {
                    Ok(ProviderOutput::new(json!(answer)))
                })
                .await;
            assert_eq!(status, CacheStatus::Miss);
            assert_eq!(out.unwrap().output, json!(answer));
        }
        // Both answers are kept apart, in a batch too.
        let answers = cache
            .get_or_compute_batch(vec![second, first], |_| async { Vec::new() })
            .await;
        let outputs: Vec<Value> = answers
            .into_iter()
            .map(|(out, status)| {
                assert_eq!(status, CacheStatus::Hit);
                out.unwrap().output
            })
            .collect();
        assert_eq!(
            outputs,
            [json!("answer to second"), json!("answer to first")]
        );
    }

    #[test]
    fn config_is_validated_and_entry_bound_follows_from_weight() {
        let bad = ResultCacheConfig {
            max_entries: 0,
            max_bytes: 0,
            ttl_secs: 0,
        };
        assert_eq!(bad.problems().len(), 3);
        assert!(matches!(
            ResultCache::new(bad),
            Err(BuildError::InvalidConfig { .. })
        ));
        let config = ResultCacheConfig {
            max_entries: 3,
            max_bytes: 1000,
            ttl_secs: 1,
        };
        assert_eq!(config.min_weight(), 334);
        assert!(config.max_bytes / config.min_weight() <= config.max_entries);
        assert!(ResultCache::new(ResultCacheConfig::default()).is_ok());
    }

    #[test]
    fn output_size_counts_json_and_model() {
        let mut out = ProviderOutput::new(json!({"label": "pos"}));
        assert_eq!(output_bytes(&out), r#"{"label":"pos"}"#.len() as u64);
        out.model = Some("gpt".into());
        assert_eq!(output_bytes(&out), r#"{"label":"pos"}"#.len() as u64 + 3);
    }

    #[tokio::test]
    async fn at_most_max_entries_are_kept() {
        let cache = ResultCache::new(ResultCacheConfig {
            max_entries: 5,
            max_bytes: 1 << 30,
            ttl_secs: 60,
        })
        .unwrap();
        for i in 0..50 {
            let key = CacheKey::new(None, "m", &ProviderInput::new(json!(i)));
            let (out, _) = cache
                .get_or_compute(key, CachePolicy::ENABLED, || async move {
                    Ok(ProviderOutput::new(json!(i)))
                })
                .await;
            assert_eq!(out.unwrap().output, json!(i));
            cache.run_pending_tasks().await;
        }
        let stats = cache.stats();
        assert!(stats.entries <= 5, "{stats:?}");
        assert!(stats.evictions >= 45, "{stats:?}");
    }
}
