//! The passthrough candidate (`e2e --role passthrough`): the raw limit of the broker.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord};
use rdkafka::types::RDKafkaErrorCode;

/// The raw limit: consume, copy key and value to the results topic, nothing else.
pub(crate) fn run(args: &[String]) {
    let [bootstrap, group, requests, results] = args else {
        panic!("usage: e2e --role passthrough BOOTSTRAP GROUP REQUESTS RESULTS");
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("client.id", "passthrough")
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", "16384")
        // librdkafka waits fetch.queue.backoff.ms (default 1000) before fetching again for a
        // partition whose prefetch queue was full; with a backlog that stalled the passthrough
        // for up to a second at a time, so its rate was 150,000/s in some rounds and
        // 400,000-800,000/s in others. inferflow's request consumer sets the same 20 ms.
        .set("fetch.queue.backoff.ms", "20")
        .create()
        .expect("the passthrough consumer");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", "passthrough")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("the passthrough producer");
    consumer.subscribe(&[requests]).expect("subscribing");
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(results);
                if let Some(key) = message.key() {
                    record = record.key(key);
                }
                if let Some(value) = message.payload() {
                    record = record.payload(value);
                }
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            producer.poll(Duration::from_millis(5));
                        }
                        Err((e, _)) => panic!("passthrough produce: {e}"),
                    }
                }
                producer.poll(Duration::ZERO);
            }
            Some(Err(e)) => eprintln!("passthrough consume: {e}"),
            None => producer.poll(Duration::ZERO),
        }
    }
}
