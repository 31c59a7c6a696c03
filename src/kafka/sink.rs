//! Producing results and dead letters: nothing is dropped.
//!
//! [`Sink::deliver`] sends one record and waits for the broker's acknowledgement. A full local
//! queue is backpressure (wait and try again), a failed delivery is retried with capped
//! exponential backoff, and only errors that no retry can fix (the record is too large, the
//! topic does not exist) are returned, so the caller can fall back to another record.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

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
    pub(crate) fn future_record(&self) -> FutureRecord<'_, [u8], [u8]> {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (key, value) in &self.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&self.topic)
            .payload(self.value.as_slice())
            .headers(headers);
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

const MAX_BACKOFF: Duration = Duration::from_secs(5);
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

/// The producer of results and dead letters.
#[derive(Clone)]
pub struct Sink {
    producer: FutureProducer,
}

impl Sink {
    /// Wraps an idempotent producer (see [`super::producer_config`]).
    pub fn new(producer: FutureProducer) -> Self {
        Sink { producer }
    }

    /// Sends `record` and waits until the broker acknowledges it, retrying transient failures
    /// until `stop` is cancelled.
    pub async fn deliver(
        &self,
        record: &OutRecord,
        stop: &CancellationToken,
    ) -> Result<(), DeliverError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let error = match self.producer.send_result(record.future_record()) {
                Ok(delivery) => {
                    let outcome = tokio::select! {
                        outcome = delivery => outcome,
                        () = stop.cancelled() => {
                            return Err(DeliverError::Stopped("awaiting the broker's acknowledgement".into()));
                        }
                    };
                    match outcome {
                        Ok(Ok(_)) => return Ok(()),
                        Ok(Err((err, _))) => err,
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
            if let Some((code, reason)) = self.producer.client().fatal_error() {
                return Err(DeliverError::Fatal(format!("{code}: {reason}")));
            }
            if is_permanent(&error) {
                return Err(DeliverError::Permanent(error));
            }
            metrics::counter!(PRODUCE_RETRIES_TOTAL).increment(1);
            tracing::warn!(topic = %record.topic, error = %error, retry_in_ms = backoff.as_millis() as u64, "delivery failed, retrying");
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return Err(DeliverError::Stopped(error.to_string())),
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Waits up to `timeout` for everything queued to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}
