//! Which offsets may be stored: the ordered tracker behind the at-least-once guarantee.
//!
//! Records of one partition can finish out of order (batches run concurrently). An offset is
//! stored only when every record before it in its partition is *done*, meaning its result or
//! dead letter has been acknowledged by the broker. So the stored position never passes
//! unfinished work, and a crash can only repeat results, never lose them.
//!
//! # Who does what
//!
//! The partition state belongs to the **consumer thread**: it registers each record with
//! [`OffsetTracker::begin`] (which hands back a [`Ticket`]), and it alone reads and changes
//! the state (assign, revoke, positions, store, commit). Records finish on other threads (the
//! producer's delivery callback, batch tasks): [`OffsetTracker::complete`] only sends the
//! record's ticket down a channel, without a lock on the state and without a wake-up, unless
//! the consumer thread is waiting in [`OffsetTracker::wait_drained`] (a revoke). The consumer
//! thread applies the completions in bulk before it reads positions, every store interval.
//!
//! A ticket names its partition by slot and *generation*: a completion for a partition that
//! was revoked, reassigned or reset since its record began is ignored, so nothing is ever
//! stored for a partition this consumer no longer owns, and no late completion from before a
//! rewind can mark a record consumed again after it as done.
//!
//! This file is the only place that stores or commits offsets.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

/// A topic and partition.
pub type TopicPartition = (String, i32);

/// Identifies one begun record for its completion: cheap to copy, no strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    slot: u32,
    generation: u32,
    offset: i64,
}

/// The offsets begun in one owned partition, in consumption order.
#[derive(Debug, Default)]
struct PartitionState {
    /// Begun offsets from the lowest unfinished one on, each with whether it is done. The
    /// done prefix is dropped as soon as it forms.
    window: VecDeque<(i64, bool)>,
    /// Entries of `window` not done yet.
    pending: usize,
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
        self.window.front().map(|(o, _)| *o).or(self.next)
    }

    fn begin(&mut self, offset: i64) {
        match self.window.back() {
            // The usual case: offsets arrive in increasing order.
            Some((last, _)) if *last >= offset => {
                // Consumed again without a reset (a seek elsewhere): track it once.
                let at = self.window.partition_point(|(o, _)| *o < offset);
                match self.window.get_mut(at) {
                    Some((o, done)) if *o == offset => {
                        if *done {
                            *done = false;
                            self.pending += 1;
                        }
                    }
                    _ => {
                        self.window.insert(at, (offset, false));
                        self.pending += 1;
                    }
                }
            }
            _ => {
                self.window.push_back((offset, false));
                self.pending += 1;
            }
        }
        self.first.get_or_insert(offset);
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    fn complete(&mut self, offset: i64) {
        let at = self.window.partition_point(|(o, _)| *o < offset);
        if let Some((o, done)) = self.window.get_mut(at)
            && *o == offset
            && !*done
        {
            *done = true;
            self.pending -= 1;
        }
        while self.window.front().is_some_and(|(_, done)| *done) {
            self.window.pop_front();
        }
    }
}

/// One partition this consumer has owned; the slot is reused when it comes back.
#[derive(Debug)]
struct Slot {
    topic: Arc<str>,
    partition: i32,
    /// Bumped whenever the partition is assigned, revoked or reset: older tickets are void.
    generation: u32,
    /// `None` while the partition is not owned.
    state: Option<PartitionState>,
}

#[derive(Debug)]
struct Inner {
    slots: Vec<Slot>,
    /// Completions not applied yet.
    completions: Receiver<Ticket>,
}

impl Inner {
    fn find(&self, topic: &str, partition: i32) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.partition == partition && &*s.topic == topic)
    }

    /// Applies the completions sent since the last call.
    fn apply(&mut self) {
        while let Ok(ticket) = self.completions.try_recv() {
            if let Some(slot) = self.slots.get_mut(ticket.slot as usize)
                && slot.generation == ticket.generation
                && let Some(state) = &mut slot.state
            {
                state.complete(ticket.offset);
            }
        }
    }

    fn owned(&self) -> impl Iterator<Item = (&Slot, &PartitionState)> {
        self.slots
            .iter()
            .filter_map(|s| s.state.as_ref().map(|st| (s, st)))
    }
}

/// Tracks, per owned partition, which offsets are still in flight.
#[derive(Debug)]
pub struct OffsetTracker {
    /// Locked by the consumer thread (and, once per record, nowhere else): uncontended.
    inner: Mutex<Inner>,
    done: Sender<Ticket>,
    /// Set while the consumer thread waits for a drain; completions then wake it.
    draining: AtomicBool,
    waiter: OnceLock<std::thread::Thread>,
}

impl Default for OffsetTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        let (done, completions) = channel();
        OffsetTracker {
            inner: Mutex::new(Inner {
                slots: Vec::new(),
                completions,
            }),
            done,
            draining: AtomicBool::new(false),
            waiter: OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the state inconsistent in a way that
        // loses work (every update is a single step), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking newly assigned partitions.
    pub fn assign(&self, partitions: impl IntoIterator<Item = TopicPartition>) {
        let mut inner = self.lock();
        inner.apply();
        for (topic, partition) in partitions {
            match inner.find(&topic, partition) {
                Some(i) => {
                    let slot = &mut inner.slots[i];
                    if slot.state.is_none() {
                        slot.generation = slot.generation.wrapping_add(1);
                        slot.state = Some(PartitionState::default());
                    }
                }
                None => inner.slots.push(Slot {
                    topic: Arc::from(topic),
                    partition,
                    generation: 0,
                    state: Some(PartitionState::default()),
                }),
            }
        }
    }

    /// Stops tracking partitions this consumer no longer owns. Their pending work is forgotten:
    /// completions arriving later are ignored, so no offset is ever stored for them.
    pub fn revoke(&self, partitions: &[TopicPartition]) {
        let mut inner = self.lock();
        inner.apply();
        for (topic, partition) in partitions {
            if let Some(i) = inner.find(topic, *partition) {
                let slot = &mut inner.slots[i];
                slot.generation = slot.generation.wrapping_add(1);
                slot.state = None;
            }
        }
    }

    /// Stops tracking every partition (at shutdown, after the final commit).
    pub fn revoke_all(&self) {
        let mut inner = self.lock();
        inner.apply();
        for slot in &mut inner.slots {
            slot.generation = slot.generation.wrapping_add(1);
            slot.state = None;
        }
    }

    /// Records that `offset` of an owned partition has been handed on for processing, and
    /// returns its ticket and the topic's shared name; `None` (and nothing tracked) when the
    /// partition is not owned. Call from the consumer thread.
    pub fn begin(&self, topic: &str, partition: i32, offset: i64) -> Option<(Ticket, Arc<str>)> {
        let mut inner = self.lock();
        let i = inner.find(topic, partition)?;
        let slot = &mut inner.slots[i];
        slot.state.as_mut()?.begin(offset);
        Some((
            Ticket {
                slot: i as u32,
                generation: slot.generation,
                offset,
            },
            Arc::clone(&slot.topic),
        ))
    }

    /// Records that the output for a begun record has been acknowledged. Callable from any
    /// thread; it takes no lock and wakes nobody unless a drain is being waited for.
    pub fn complete(&self, ticket: Ticket) {
        // The receiver lives as long as the tracker, so the send cannot fail.
        let _ = self.done.send(ticket);
        if self.draining.load(Ordering::Acquire)
            && let Some(thread) = self.waiter.get()
        {
            thread.unpark();
        }
    }

    /// The position that may be committed now in `tp` (the lowest pending offset, or one past
    /// the last offset begun), and the first offset begun since it was assigned or reset; `None`
    /// when the partition is not owned. For the exactly-once mode, which commits positions
    /// through a transaction instead of storing them.
    pub fn position(&self, tp: &TopicPartition) -> Option<(Option<i64>, Option<i64>)> {
        let mut inner = self.lock();
        inner.apply();
        let i = inner.find(&tp.0, tp.1)?;
        inner.slots[i]
            .state
            .as_ref()
            .map(|s| (s.committable(), s.first))
    }

    /// Forgets everything about an owned partition, as if it had just been assigned: after an
    /// aborted transaction its records are consumed again from the last committed position.
    /// Completions of records begun before the reset are ignored.
    pub fn reset(&self, tp: &TopicPartition) {
        let mut inner = self.lock();
        inner.apply();
        if let Some(i) = inner.find(&tp.0, tp.1) {
            let slot = &mut inner.slots[i];
            if let Some(state) = &mut slot.state {
                *state = PartitionState::default();
                slot.generation = slot.generation.wrapping_add(1);
            }
        }
    }

    /// Records still in flight, over all partitions.
    pub fn pending(&self) -> usize {
        let mut inner = self.lock();
        inner.apply();
        inner.owned().map(|(_, s)| s.pending).sum()
    }

    /// Records still in flight in the given partitions.
    fn pending_in(inner: &Inner, partitions: &[TopicPartition]) -> usize {
        inner
            .owned()
            .filter(|(slot, _)| {
                partitions
                    .iter()
                    .any(|(t, p)| *p == slot.partition && t.as_str() == &*slot.topic)
            })
            .map(|(_, s)| s.pending)
            .sum()
    }

    /// Blocks the calling (non-async) thread until nothing is pending in `partitions`, or until
    /// `timeout`. Returns the number of records still pending. Only the consumer thread calls
    /// this (it is the one completions wake).
    pub fn wait_drained(&self, partitions: &[TopicPartition], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let _ = self.waiter.set(std::thread::current());
        loop {
            // Announce the wait before looking, so a completion sent after the look wakes us.
            self.draining.store(true, Ordering::Release);
            let left = {
                let mut inner = self.lock();
                inner.apply();
                Self::pending_in(&inner, partitions)
            };
            let now = Instant::now();
            if left == 0 || now >= deadline {
                self.draining.store(false, Ordering::Release);
                return left;
            }
            // A wake-up that came before the park makes it return at once.
            std::thread::park_timeout(deadline - now);
        }
    }

    /// Positions that advanced since they were last taken, marked as stored.
    fn take_committable(&self, only: Option<&[TopicPartition]>) -> TopicPartitionList {
        let mut inner = self.lock();
        inner.apply();
        let mut tpl = TopicPartitionList::new();
        for slot in &mut inner.slots {
            let Some(state) = &mut slot.state else {
                continue;
            };
            if only.is_some_and(|only| {
                !only
                    .iter()
                    .any(|(t, p)| *p == slot.partition && t.as_str() == &*slot.topic)
            }) {
                continue;
            }
            if let Some(position) = state.committable()
                && state.stored.is_none_or(|stored| position > stored)
            {
                // `store_offsets` stores exactly this value: the next offset to consume.
                let _ =
                    tpl.add_partition_offset(&slot.topic, slot.partition, Offset::Offset(position));
                state.stored = Some(position);
            }
        }
        tpl
    }

    /// After a failed store: forget what was marked as stored, so the next call tries again.
    fn forget_stored(&self, tpl: &TopicPartitionList) {
        let mut inner = self.lock();
        for e in tpl.elements() {
            if let Some(i) = inner.find(e.topic(), e.partition())
                && let Some(state) = &mut inner.slots[i].state
            {
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
        if n > 0
            && let Err(err) = consumer.store_offsets(&tpl)
        {
            self.forget_stored(&tpl);
            return Err(err);
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
        if tpl.count() > 0
            && let Err(err) = consumer.store_offsets(&tpl)
        {
            self.forget_stored(&tpl);
            return Err(err);
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

    fn begin(tracker: &OffsetTracker, p: i32, offset: i64) -> Ticket {
        tracker.begin("t", p, offset).expect("owned").0
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
        let tickets: Vec<Ticket> = (10..15).map(|o| begin(&tracker, 0, o)).collect();
        // 11..14 finish first; 10 is still in flight, so nothing may be stored.
        for t in &tickets[1..] {
            tracker.complete(*t);
        }
        assert_eq!(
            positions(&tracker),
            vec![(0, 10)],
            "position stays at the unfinished 10"
        );
        tracker.complete(tickets[0]);
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
    fn gaps_in_offsets_and_completions_from_other_threads() {
        // Transaction markers leave gaps; completions come from many threads at once.
        let tracker = Arc::new(OffsetTracker::new());
        tracker.assign([tp(0)]);
        let tickets: Vec<Ticket> = (0..1000).map(|i| begin(&tracker, 0, i * 3)).collect();
        let workers: Vec<_> = tickets
            .chunks(250)
            .map(|chunk| {
                let chunk = chunk.to_vec();
                let tracker = Arc::clone(&tracker);
                std::thread::spawn(move || {
                    chunk.into_iter().rev().for_each(|t| tracker.complete(t))
                })
            })
            .collect();
        workers.into_iter().for_each(|w| w.join().unwrap());
        assert_eq!(tracker.pending(), 0);
        assert_eq!(positions(&tracker), vec![(0, 999 * 3 + 1)]);
    }

    #[test]
    fn partitions_are_independent() {
        let tracker = OffsetTracker::new();
        tracker.assign([tp(0), tp(1)]);
        begin(&tracker, 0, 0);
        let t = begin(&tracker, 1, 5);
        tracker.complete(t);
        assert_eq!(positions(&tracker), vec![(0, 0), (1, 6)]);
        assert_eq!(tracker.pending(), 1);
    }

    #[test]
    fn revoked_partitions_are_never_stored() {
        let tracker = OffsetTracker::new();
        tracker.assign([tp(0)]);
        let t = begin(&tracker, 0, 3);
        tracker.revoke(&[tp(0)]);
        tracker.complete(t);
        assert!(positions(&tracker).is_empty());
        assert!(
            tracker.begin("t", 0, 4).is_none(),
            "records of unowned partitions are not tracked"
        );
        // Assigned again: the completion from before the revoke does not count.
        tracker.assign([tp(0)]);
        let _ = begin(&tracker, 0, 3);
        tracker.complete(t);
        assert_eq!(tracker.pending(), 1, "a stale ticket is ignored");
        assert_eq!(positions(&tracker), vec![(0, 3)]);
    }

    #[test]
    fn completions_from_before_a_reset_are_ignored() {
        let tracker = OffsetTracker::new();
        tracker.assign([tp(0)]);
        let old = begin(&tracker, 0, 7);
        tracker.reset(&tp(0));
        let new = begin(&tracker, 0, 7);
        tracker.complete(old);
        assert_eq!(tracker.position(&tp(0)), Some((Some(7), Some(7))));
        tracker.complete(new);
        assert_eq!(tracker.position(&tp(0)), Some((Some(8), Some(7))));
    }

    #[test]
    fn wait_drained_returns_when_the_last_record_completes() {
        let tracker = Arc::new(OffsetTracker::new());
        tracker.assign([tp(0)]);
        let t1 = begin(&tracker, 0, 1);
        let t = Arc::clone(&tracker);
        let worker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            t.complete(t1);
        });
        let started = Instant::now();
        let left = tracker.wait_drained(&[tp(0)], Duration::from_secs(10));
        worker.join().unwrap();
        assert_eq!(left, 0);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "woken by the completion"
        );
        begin(&tracker, 0, 2);
        assert_eq!(
            tracker.wait_drained(&[tp(0)], Duration::from_millis(20)),
            1,
            "times out"
        );
    }
}
