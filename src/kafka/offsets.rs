//! Which offsets may be stored: the ordered tracker behind the at-least-once guarantee.
//!
//! Records of one partition can finish out of order (batches run concurrently). An offset is
//! stored only when every record before it in its partition is *done*, meaning its result or
//! dead letter has been acknowledged by the broker. So the stored position never passes
//! unfinished work, and a crash can only repeat results, never lose them.
//!
//! The consumer thread registers each record with [`OffsetTracker::begin`] before handing it
//! on, the processing tasks call [`OffsetTracker::complete`] after the broker's acknowledgement,
//! and the consumer thread collects the new positions with [`OffsetTracker::store`]
//! and stores them. This file is the only place that stores or commits offsets.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

/// A topic and partition.
pub type TopicPartition = (String, i32);

#[derive(Debug, Default)]
struct PartitionState {
    /// Offsets handed on and not yet done.
    pending: BTreeSet<i64>,
    /// One past the highest offset ever begun.
    next: Option<i64>,
    /// The last position stored (the next offset to consume after a restart).
    stored: Option<i64>,
    /// The first offset begun since the partition was assigned (or reset).
    first: Option<i64>,
}

impl PartitionState {
    /// The position that may be stored now: the lowest pending offset, or one past the last
    /// begun offset when nothing is pending.
    fn committable(&self) -> Option<i64> {
        self.pending.first().copied().or(self.next)
    }
}

/// Tracks, per owned partition, which offsets are still in flight.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: Mutex<HashMap<TopicPartition, PartitionState>>,
    /// Signalled whenever a record completes, for [`OffsetTracker::wait_drained`].
    completed: Condvar,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<TopicPartition, PartitionState>> {
        // A panic while holding this lock cannot leave the map inconsistent (every update is
        // a single insert or remove), so a poisoned lock is still usable.
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking newly assigned partitions.
    pub fn assign(&self, partitions: impl IntoIterator<Item = TopicPartition>) {
        let mut map = self.lock();
        for tp in partitions {
            map.entry(tp).or_default();
        }
    }

    /// Stops tracking partitions this consumer no longer owns. Their pending work is forgotten:
    /// completions arriving later are ignored, so no offset is ever stored for them.
    pub fn revoke(&self, partitions: &[TopicPartition]) {
        let mut map = self.lock();
        for tp in partitions {
            map.remove(tp);
        }
    }

    /// Stops tracking every partition (at shutdown, after the final commit).
    pub fn revoke_all(&self) {
        self.lock().clear();
    }

    /// Records that `offset` of an owned partition has been handed on for processing.
    /// Returns false (and tracks nothing) when the partition is not owned.
    pub fn begin(&self, tp: &TopicPartition, offset: i64) -> bool {
        let mut map = self.lock();
        let Some(state) = map.get_mut(tp) else {
            return false;
        };
        state.pending.insert(offset);
        state.first.get_or_insert(offset);
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
        true
    }

    /// Records that the output for `offset` has been acknowledged by the broker.
    pub fn complete(&self, tp: &TopicPartition, offset: i64) {
        let mut map = self.lock();
        if let Some(state) = map.get_mut(tp) {
            state.pending.remove(&offset);
        }
        drop(map);
        self.completed.notify_all();
    }

    /// The position that may be committed now in `tp` (the lowest pending offset, or one past
    /// the last offset begun), and the first offset begun since it was assigned or reset; `None`
    /// when the partition is not owned. For the exactly-once mode, which commits positions
    /// through a transaction instead of storing them.
    pub fn position(&self, tp: &TopicPartition) -> Option<(Option<i64>, Option<i64>)> {
        self.lock().get(tp).map(|s| (s.committable(), s.first))
    }

    /// Forgets everything about an owned partition, as if it had just been assigned: after an
    /// aborted transaction its records are consumed again from the last committed position.
    pub fn reset(&self, tp: &TopicPartition) {
        if let Some(state) = self.lock().get_mut(tp) {
            *state = PartitionState::default();
        }
        self.completed.notify_all();
    }

    /// Records still in flight, over all partitions.
    pub fn pending(&self) -> usize {
        self.lock().values().map(|s| s.pending.len()).sum()
    }

    /// Records still in flight in the given partitions.
    fn pending_in(
        map: &HashMap<TopicPartition, PartitionState>,
        partitions: &[TopicPartition],
    ) -> usize {
        partitions
            .iter()
            .filter_map(|tp| map.get(tp))
            .map(|s| s.pending.len())
            .sum()
    }

    /// Blocks the calling (non-async) thread until nothing is pending in `partitions`, or until
    /// `timeout`. Returns the number of records still pending.
    pub fn wait_drained(&self, partitions: &[TopicPartition], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut map = self.lock();
        loop {
            let left = Self::pending_in(&map, partitions);
            let now = Instant::now();
            if left == 0 || now >= deadline {
                return left;
            }
            map = self
                .completed
                .wait_timeout(map, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Positions that advanced since they were last taken, marked as stored.
    fn take_committable(&self, only: Option<&[TopicPartition]>) -> TopicPartitionList {
        let mut map = self.lock();
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), state) in map.iter_mut() {
            if only.is_some_and(|only| !only.iter().any(|(t, p)| t == topic && p == partition)) {
                continue;
            }
            if let Some(position) = state.committable() {
                if state.stored.is_none_or(|stored| position > stored) {
                    // `store_offsets` stores exactly this value: the next offset to consume.
                    let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(position));
                    state.stored = Some(position);
                }
            }
        }
        tpl
    }

    /// After a failed store: forget what was marked as stored, so the next call tries again.
    fn forget_stored(&self, tpl: &TopicPartitionList) {
        let mut map = self.lock();
        for e in tpl.elements() {
            if let Some(state) = map.get_mut(&(e.topic().to_owned(), e.partition())) {
                state.stored = None;
            }
        }
    }

    /// Stores the positions that advanced (auto-commit then commits them). Call from the
    /// consumer's own thread.
    #[allow(clippy::disallowed_methods)] // This is the one place allowed to store offsets.
    pub fn store<C: ConsumerContext>(&self, consumer: &impl Consumer<C>) -> KafkaResult<usize> {
        let tpl = self.take_committable(None);
        let n = tpl.count();
        if n > 0 {
            if let Err(err) = consumer.store_offsets(&tpl) {
                self.forget_stored(&tpl);
                return Err(err);
            }
        }
        Ok(n)
    }

    /// Stores and synchronously commits the positions of `partitions` (before giving them up
    /// in a rebalance) or of every partition (`None`, at shutdown).
    #[allow(clippy::disallowed_methods)] // This is the one place allowed to store offsets.
    pub fn commit_now<C: ConsumerContext>(
        &self,
        consumer: &impl Consumer<C>,
        partitions: Option<&[TopicPartition]>,
    ) -> KafkaResult<()> {
        let tpl = self.take_committable(partitions);
        if tpl.count() > 0 {
            if let Err(err) = consumer.store_offsets(&tpl) {
                self.forget_stored(&tpl);
                return Err(err);
            }
        }
        match consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit is not a failure.
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        ("t".to_owned(), p)
    }

    fn positions(tracker: &OffsetTracker) -> Vec<(i32, i64)> {
        let tpl = tracker.take_committable(None);
        let mut out: Vec<(i32, i64)> = tpl
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset().to_raw().unwrap()))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn never_stores_past_unfinished_work() {
        let tracker = OffsetTracker::new();
        tracker.assign([tp(0)]);
        for offset in 10..15 {
            assert!(tracker.begin(&tp(0), offset));
        }
        // 11..14 finish first; 10 is still in flight, so nothing may be stored.
        for offset in 11..15 {
            tracker.complete(&tp(0), offset);
        }
        assert_eq!(
            positions(&tracker),
            vec![(0, 10)],
            "position stays at the unfinished 10"
        );
        tracker.complete(&tp(0), 10);
        assert_eq!(
            positions(&tracker),
            vec![(0, 15)],
            "all done: next to consume is 15"
        );
        assert!(
            positions(&tracker).is_empty(),
            "unchanged positions are not stored again"
        );
    }

    #[test]
    fn partitions_are_independent() {
        let tracker = OffsetTracker::new();
        tracker.assign([tp(0), tp(1)]);
        tracker.begin(&tp(0), 0);
        tracker.begin(&tp(1), 5);
        tracker.complete(&tp(1), 5);
        assert_eq!(positions(&tracker), vec![(0, 0), (1, 6)]);
        assert_eq!(tracker.pending(), 1);
    }

    #[test]
    fn revoked_partitions_are_never_stored() {
        let tracker = OffsetTracker::new();
        tracker.assign([tp(0)]);
        tracker.begin(&tp(0), 3);
        tracker.revoke(&[tp(0)]);
        tracker.complete(&tp(0), 3);
        assert!(positions(&tracker).is_empty());
        assert!(
            !tracker.begin(&tp(0), 4),
            "records of unowned partitions are not tracked"
        );
    }

    #[test]
    fn wait_drained_returns_when_the_last_record_completes() {
        let tracker = std::sync::Arc::new(OffsetTracker::new());
        tracker.assign([tp(0)]);
        tracker.begin(&tp(0), 1);
        let t = std::sync::Arc::clone(&tracker);
        let worker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            t.complete(&tp(0), 1);
        });
        let left = tracker.wait_drained(&[tp(0)], Duration::from_secs(10));
        worker.join().unwrap();
        assert_eq!(left, 0);
        tracker.begin(&tp(0), 2);
        assert_eq!(
            tracker.wait_drained(&[tp(0)], Duration::from_millis(20)),
            1,
            "times out"
        );
    }
}
