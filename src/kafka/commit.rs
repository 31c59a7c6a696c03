//! How a source makes its progress durable: the commit strategy.
//!
//! - [`Commits::Stored`] (at least once, the default): the positions the [`OffsetTracker`]
//!   allows are stored, and librdkafka's auto-commit commits them.
//! - [`Commits::Transactional`] (exactly once): outputs are held in the
//!   [`Transactions`] stage and committed with the consumed positions in one Kafka transaction;
//!   nothing is stored or auto-committed.
//!
//! The consumer thread calls the same methods in either mode, at the same points of its life
//! (every store interval, on assign, on revoke, on a lost assignment, at shutdown); the
//! differences between the modes live here and in [`super::transactional`], not in branches
//! through the source and the processor.
//!
//! [`OffsetTracker`]: super::offsets::OffsetTracker

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::offsets::TopicPartition;
use crate::kafka::source::SourceCore;
use crate::kafka::transactional::{Transactions, TxnError};

/// A source's commit strategy; see the module documentation.
#[derive(Clone, Default)]
pub enum Commits {
    /// Store the tracker's positions; auto-commit commits them (at least once).
    #[default]
    Stored,
    /// Commit outputs and positions together in transactions (exactly once).
    Transactional(Arc<Transactions>),
}

impl Commits {
    /// The transactional output stage, in exactly-once mode.
    pub fn transactions(&self) -> Option<&Arc<Transactions>> {
        match self {
            Commits::Stored => None,
            Commits::Transactional(txn) => Some(txn),
        }
    }

    /// Adjusts the consumer's settings to the strategy.
    pub fn configure(&self, client: &mut ClientConfig) {
        if let Commits::Transactional(_) = self {
            // Offsets are committed only in transactions; requests written transactionally
            // are read once committed.
            client
                .set("enable.auto.commit", "false")
                .set("isolation.level", "read_committed");
        }
    }

    /// Every store interval: stores the positions that advanced, or commits a transaction when
    /// one is due. Failures are logged (and, for transactions, handled: rewind or stop).
    pub fn progress<C: ConsumerContext>(&self, core: &SourceCore, consumer: &BaseConsumer<C>) {
        match self {
            Commits::Stored => {
                if let Err(err) = core.tracker.store(consumer) {
                    tracing::warn!(error = %err, source = core.name, "storing offsets failed; retrying");
                }
            }
            Commits::Transactional(txn) => {
                let _ = txn.commit(core, consumer, false);
            }
        }
    }

    /// Partitions were assigned: start tracking (and holding outputs for) them.
    pub fn assigned(&self, core: &SourceCore, partitions: Vec<TopicPartition>) {
        if let Commits::Transactional(txn) = self {
            txn.assign(core, &partitions);
        }
        core.tracker.assign(partitions);
    }

    /// The assignment was lost (someone else may own the partitions already): commit nothing,
    /// forget their work.
    pub fn lost(&self, core: &SourceCore, partitions: &[TopicPartition]) {
        core.tracker.revoke(partitions);
        if let Commits::Transactional(txn) = self {
            txn.revoke(core, partitions);
        }
    }

    /// Partitions are being given up after their work drained (or the drain timed out):
    /// commit what is done, then forget them.
    pub fn revoked<C: ConsumerContext>(
        &self,
        core: &SourceCore,
        consumer: &BaseConsumer<C>,
        partitions: &[TopicPartition],
    ) {
        match self {
            Commits::Stored => {
                if let Err(err) = core.tracker.commit_now(consumer, Some(partitions)) {
                    tracing::warn!(error = %err, source = core.name, "commit before giving up partitions failed");
                }
            }
            Commits::Transactional(txn) => {
                if let Err(err) = txn.commit(core, consumer, true) {
                    tracing::warn!(error = %err, source = core.name, "transaction before giving up partitions failed");
                }
                txn.revoke(core, partitions);
            }
        }
        core.tracker.revoke(partitions);
    }

    /// At shutdown, after the work drained: the last commit. The group may be mid-rebalance
    /// (another member joining or leaving): the broker then refuses commits until this member
    /// has rejoined, which needs polls. So it keeps serving the group and retries until the
    /// commit lands or `deadline` passes. Then nothing is tracked any more, so the revoke
    /// callback run by the close does not wait again.
    pub fn finish<C: ConsumerContext>(
        &self,
        core: &SourceCore,
        consumer: &BaseConsumer<C>,
        deadline: Instant,
    ) {
        loop {
            let refused = match self {
                Commits::Stored => match core.tracker.commit_now(consumer, None) {
                    Ok(()) => break,
                    Err(err) if commit_retriable(&err) => err.to_string(),
                    Err(err) => {
                        tracing::warn!(error = %err, source = core.name, "final commit failed; the last records may be redelivered");
                        break;
                    }
                },
                // One last transaction; if it aborts, its records are consumed again after
                // the restart.
                Commits::Transactional(txn) => match txn.commit(core, consumer, true) {
                    Ok(_) => break,
                    Err(TxnError::Refused(err)) => err,
                    Err(err) => {
                        tracing::warn!(error = %err, source = core.name, "final transaction failed; the last records will be processed again");
                        break;
                    }
                },
            };
            if Instant::now() >= deadline {
                tracing::warn!(error = %refused, source = core.name, "final commit still refused at the shutdown deadline; the last records may be processed again");
                break;
            }
            tracing::debug!(error = %refused, "final commit refused for now; polling and retrying");
            let _ = consumer.poll(Duration::from_millis(100));
        }
        core.tracker.revoke_all();
        if let Commits::Transactional(txn) = self {
            txn.revoke_all(core);
        }
    }
}

/// Commit errors that clear up once this member has caught up with the group.
fn commit_retriable(err: &rdkafka::error::KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        err.rdkafka_error_code(),
        Some(
            C::RebalanceInProgress
                | C::IllegalGeneration
                | C::CoordinatorLoadInProgress
                | C::NotCoordinator
                | C::CoordinatorNotAvailable
                | C::RequestTimedOut
        )
    )
}
