//! Producing results and dead letters: nothing is dropped.
//!
//! One idempotent producer per source, polled by its own thread (rdkafka's
//! `ThreadedProducer`), with two ways to send:
//!
//! - [`Sink::send`] is the request path's: it enqueues a record with a small token, and the
//!   producer's **delivery callback** hands the broker's answer to the token's
//!   [`Acknowledge`] implementation, which finishes the record (or, on a failure, starts the slow
//!   path). No future, channel or task per record.
//! - [`Sink::deliver`] sends one record and waits for the broker's acknowledgement, for the
//!   rarer outputs (dead letters, fallbacks, invalidations). A full local queue is backpressure
//!   (wait and try again), a failed delivery is retried with [`DELIVER_BACKOFF`] (capped
//!   exponential, full jitter), and only errors that no retry can fix (the record is too
//!   large, the topic does not exist) are returned, so the caller can fall back to another
//!   record.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::metrics::{PRODUCE_RETRIES_TOTAL, PRODUCER_QUEUE_FULL_TOTAL};

/// A record to produce, owning its data so it can be sent again.
#[derive(Debug, Clone)]
pub struct OutRecord {
    /// Destination topic.
    pub topic: String,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message value.
    pub value: Vec<u8>,
    /// Headers, in order.
    pub headers: Vec<(&'static str, String)>,
}

impl OutRecord {
    /// The record's headers as librdkafka takes them.
    pub(crate) fn owned_headers(&self) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (key, value) in &self.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        headers
    }

    /// The record for a `FutureProducer` (the exactly-once stage's transactional producer).
    pub(crate) fn future_record(&self) -> rdkafka::producer::FutureRecord<'_, [u8], [u8]> {
        let mut record = rdkafka::producer::FutureRecord::to(&self.topic)
            .payload(self.value.as_slice())
            .headers(self.owned_headers());
        if let Some(key) = &self.key {
            record = record.key(key.as_slice());
        }
        record
    }
}

/// Why a record could not be delivered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliverError {
    /// The broker or client refused the record for a reason retrying cannot fix.
    #[error("record refused for good by Kafka: {0}")]
    Permanent(KafkaError),
    /// The producer hit a fatal error (for example, the idempotent producer was fenced); it
    /// cannot send anything any more and must be recreated.
    #[error("the Kafka producer failed for good: {0}")]
    Fatal(String),
    /// Shutdown was requested while the record was still being retried.
    #[error("shutdown while delivering (last error: {0})")]
    Stopped(String),
}

/// Errors no retry can fix.
fn is_permanent(err: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        err.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::UnknownTopic
                | C::TopicAuthorizationFailed
                | C::InvalidTopic
                | C::InvalidRecord
        )
    )
}

/// Pacing of [`Sink::deliver`]'s retries: waits of up to 50 ms doubling to up to 5 s, with
/// full jitter, until the record is delivered or shutdown.
pub const DELIVER_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
/// How long a sender waits before trying again when the producer's local queue is full.
pub const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

/// Receives the broker's answer for records sent with [`Sink::send`]. Called on the producer's
/// polling thread: it must be quick and must not block (hand slow work to a task).
pub trait Acknowledge: Send + Sync + 'static {
    /// The record sent with token `index` was acknowledged (`Ok`) or failed for good after
    /// librdkafka's own retries (`Err`).
    fn acknowledged(self: Arc<Self>, index: usize, result: Result<(), KafkaError>);
}

/// What the delivery callback does with a record's answer.
pub enum Delivery {
    /// Someone awaits it ([`Sink::deliver`]).
    Waiter(tokio::sync::oneshot::Sender<Result<(), KafkaError>>),
    /// A token: the record `index` of a group of records sent together.
    Token(Arc<dyn Acknowledge>, usize),
}

/// The producer's context: routes each delivery report to its [`Delivery`].
pub struct SinkContext;

impl ClientContext for SinkContext {}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Box<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((err, _)) => Err(err.clone()),
        };
        match *opaque {
            Delivery::Waiter(tx) => {
                let _ = tx.send(outcome);
            }
            Delivery::Token(ack, index) => ack.acknowledged(index, outcome),
        }
    }
}

/// The producer of results and dead letters.
#[derive(Clone)]
pub struct Sink {
    producer: ThreadedProducer<SinkContext>,
}

/// A record for [`Sink::send`], borrowing its parts.
pub struct Borrowed<'a> {
    /// Destination topic.
    pub topic: &'a str,
    /// Message key.
    pub key: Option<&'a [u8]>,
    /// Message value (librdkafka copies it, so the caller may reuse the buffer).
    pub value: &'a [u8],
    /// Headers.
    pub headers: OwnedHeaders,
}

impl Sink {
    /// An idempotent producer (see [`super::producer_config`]) from `config`.
    pub fn create(config: &ClientConfig) -> KafkaResult<Sink> {
        Ok(Sink {
            producer: config.create_with_context(SinkContext)?,
        })
    }

    /// Enqueues `record`; its delivery report goes to `ack` with `index`. A full local queue
    /// returns `QueueFull` with nothing enqueued (wait [`QUEUE_FULL_WAIT`] and try again);
    /// any other error means the record was not enqueued either.
    pub fn send(
        &self,
        record: Borrowed<'_>,
        ack: Arc<dyn Acknowledge>,
        index: usize,
    ) -> Result<(), KafkaError> {
        let mut base =
            BaseRecord::with_opaque_to(record.topic, Box::new(Delivery::Token(ack, index)))
                .payload(record.value)
                .headers(record.headers);
        if let Some(key) = record.key {
            base = base.key(key);
        }
        match self.producer.send(base) {
            Ok(()) => Ok(()),
            Err((err, _)) => {
                if matches!(
                    err,
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
                ) {
                    metrics::counter!(PRODUCER_QUEUE_FULL_TOTAL).increment(1);
                }
                Err(err)
            }
        }
    }

    /// The producer's fatal error, if it has one (then nothing can be sent any more).
    pub fn fatal_error(&self) -> Option<String> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code}: {reason}"))
    }

    /// Sends `record` and waits until the broker acknowledges it, retrying transient failures
    /// until `stop` is cancelled.
    pub async fn deliver(
        &self,
        record: &OutRecord,
        stop: &CancellationToken,
    ) -> Result<(), DeliverError> {
        let mut retry = 0u32;
        loop {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut base =
                BaseRecord::with_opaque_to(&record.topic, Box::new(Delivery::Waiter(tx)))
                    .payload(record.value.as_slice())
                    .headers(record.owned_headers());
            if let Some(key) = &record.key {
                base = base.key(key.as_slice());
            }
            let error = match self.producer.send(base) {
                Ok(()) => {
                    let outcome = tokio::select! {
                        outcome = rx => outcome,
                        () = stop.cancelled() => {
                            return Err(DeliverError::Stopped("awaiting the broker's acknowledgement".into()));
                        }
                    };
                    match outcome {
                        Ok(Ok(())) => return Ok(()),
                        Ok(Err(err)) => err,
                        Err(_canceled) => KafkaError::Canceled,
                    }
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Backpressure, not failure: the queue drains as the broker acknowledges.
                    metrics::counter!(PRODUCER_QUEUE_FULL_TOTAL).increment(1);
                    if stop.is_cancelled() {
                        return Err(DeliverError::Stopped("local queue full".into()));
                    }
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                    continue;
                }
                Err((err, _)) => err,
            };
            if let Some(reason) = self.fatal_error() {
                return Err(DeliverError::Fatal(reason));
            }
            if is_permanent(&error) {
                return Err(DeliverError::Permanent(error));
            }
            metrics::counter!(PRODUCE_RETRIES_TOTAL).increment(1);
            let backoff = DELIVER_BACKOFF.delay(retry);
            retry = retry.saturating_add(1);
            tracing::warn!(topic = %record.topic, error = %error, retry_in_ms = backoff.as_millis() as u64, "delivery failed, retrying");
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return Err(DeliverError::Stopped(error.to_string())),
            }
        }
    }

    /// Waits up to `timeout` for everything queued to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}
