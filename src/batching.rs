//! The micro-batcher: collects records until a batch is full by count or bytes, or until its
//! linger time has passed since the batch's *first* record.
//!
//! It does no I/O and reads no clock: the caller passes the current time, so the flush rules are
//! tested deterministically. The consumer loop asks [`Batcher::deadline`] how long it may block
//! in `poll` before the open batch must be flushed.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::section::Section;

/// Limits of one batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Records per batch at most.
    pub max_records: NonZeroUsize,
    /// Bytes per batch at most (a single larger record still forms a batch of its own).
    pub max_bytes: NonZeroUsize,
    /// Longest time from a batch's first record to its flush.
    pub linger: Duration,
}

/// A closed batch and how long it stayed open.
#[derive(Debug)]
pub struct Batch<T> {
    /// The records, in arrival order.
    pub items: Vec<T>,
    /// Their total size in bytes.
    pub bytes: usize,
    /// Time from the first record to the flush.
    pub lingered: Duration,
}

/// Why a batch was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    /// `max_records` reached.
    Records,
    /// `max_bytes` reached.
    Bytes,
    /// The linger time passed.
    Linger,
    /// The caller asked (shutdown, rebalance).
    Forced,
}

/// Accumulates records into batches.
#[derive(Debug)]
pub struct Batcher<T> {
    limits: BatchLimits,
    items: Vec<T>,
    bytes: usize,
    opened: Option<Instant>,
}

impl<T> Batcher<T> {
    /// An empty batcher.
    pub fn new(limits: BatchLimits) -> Self {
        Batcher {
            limits,
            items: Vec::new(),
            bytes: 0,
            opened: None,
        }
    }

    /// Records in the open batch.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when no batch is open.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// When the open batch must be flushed, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened.map(|t| t + self.limits.linger)
    }

    /// Adds a record of `size` bytes. Returns the batch to process when this record closed it,
    /// or when it did not fit (then the returned batch holds the records before it and this
    /// record opens the next batch).
    pub fn push(&mut self, item: T, size: usize, now: Instant) -> Option<(Batch<T>, FlushReason)> {
        let mut flushed = None;
        if !self.items.is_empty() && self.bytes + size > self.limits.max_bytes.get() {
            flushed = Some((self.take(now), FlushReason::Bytes));
        }
        if self.items.is_empty() {
            self.opened = Some(now);
        }
        self.items.push(item);
        self.bytes += size;
        if flushed.is_none() {
            if self.items.len() >= self.limits.max_records.get() {
                flushed = Some((self.take(now), FlushReason::Records));
            } else if self.bytes >= self.limits.max_bytes.get() {
                flushed = Some((self.take(now), FlushReason::Bytes));
            }
        }
        flushed
    }

    /// Returns the open batch if its linger time has passed.
    pub fn poll_linger(&mut self, now: Instant) -> Option<Batch<T>> {
        match self.deadline() {
            Some(deadline) if now >= deadline => Some(self.take(now)),
            _ => None,
        }
    }

    /// Closes the open batch now, if there is one.
    pub fn flush(&mut self, now: Instant) -> Option<Batch<T>> {
        (!self.items.is_empty()).then(|| self.take(now))
    }

    fn take(&mut self, now: Instant) -> Batch<T> {
        let lingered = self
            .opened
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default();
        self.opened = None;
        Batch {
            items: std::mem::take(&mut self.items),
            bytes: std::mem::replace(&mut self.bytes, 0),
            lingered,
        }
    }
}

/// `[batch]`: when a micro-batch is closed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchConfig {
    /// Records per batch at most.
    pub max_records: NonZeroUsize,
    /// Bytes of message values per batch at most.
    pub max_bytes: NonZeroUsize,
    /// Time from a batch's first record to its flush.
    pub linger_ms: u64,
}

impl Section for BatchConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(records: usize, bytes: usize, linger_ms: u64) -> BatchLimits {
        BatchLimits {
            max_records: NonZeroUsize::new(records).unwrap(),
            max_bytes: NonZeroUsize::new(bytes).unwrap(),
            linger: Duration::from_millis(linger_ms),
        }
    }

    #[test]
    fn closes_on_record_count() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(3, 1000, 50));
        assert!(b.push(1, 1, t0).is_none());
        assert!(b.push(2, 1, t0).is_none());
        let (batch, why) = b.push(3, 1, t0).expect("third record closes the batch");
        assert_eq!((batch.items, why), (vec![1, 2, 3], FlushReason::Records));
        assert!(b.is_empty() && b.deadline().is_none());
    }

    #[test]
    fn a_record_that_does_not_fit_starts_the_next_batch() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(100, 10, 50));
        assert!(b.push("a", 6, t0).is_none());
        let (batch, why) = b.push("b", 6, t0).expect("b does not fit");
        assert_eq!(
            (batch.items, batch.bytes, why),
            (vec!["a"], 6, FlushReason::Bytes)
        );
        assert_eq!(b.len(), 1, "b opened the next batch");
        // A record larger than the limit on its own still forms a batch.
        let mut b = Batcher::new(limits(100, 10, 50));
        let (batch, _) = b.push("huge", 50, t0).expect("flushed at once");
        assert_eq!(batch.items, vec!["huge"]);
    }

    #[test]
    fn linger_counts_from_the_first_record() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(100, 1000, 50));
        assert!(
            b.poll_linger(t0 + Duration::from_secs(10)).is_none(),
            "no batch, nothing to flush"
        );
        b.push(1, 1, t0);
        b.push(2, 1, t0 + Duration::from_millis(40));
        assert_eq!(
            b.deadline(),
            Some(t0 + Duration::from_millis(50)),
            "later records do not extend it"
        );
        assert!(b.poll_linger(t0 + Duration::from_millis(49)).is_none());
        let batch = b
            .poll_linger(t0 + Duration::from_millis(50))
            .expect("lingered");
        assert_eq!(batch.items, vec![1, 2]);
        assert_eq!(batch.lingered, Duration::from_millis(50));
    }
}
