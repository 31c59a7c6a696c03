//! Load generation: the requests of each workload, the generator's producer, pre-loading a
//! backlog, and the realistic workload's user profiles written to the feature store.

use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

use super::START_HINT;
use super::kafka::client;
use super::realistic;
use super::settings::{Settings, Workload};

/// A request for the `identity` pipeline of about `bytes` bytes; its id is `{tag}-{seq}`.
pub(crate) fn request(tag: &str, seq: usize, pad: &str) -> String {
    format!(
        r#"{{"request_id":"{tag}-{seq}","pipeline":"identity","data":{{"seq":{seq},"pad":"{pad}"}}}}"#
    )
}

fn padding(tag: &str, bytes: usize) -> String {
    let base = request(tag, 100_000, "").len();
    "x".repeat(bytes.saturating_sub(base))
}

/// Builds the requests of one workload, all of about `E2E_PAYLOAD_BYTES`.
pub(crate) struct Requests {
    workload: Workload,
    tag: &'static str,
    pad: String,
    bytes: usize,
    entities: usize,
}

impl Requests {
    pub(crate) fn new(s: &Settings, workload: Workload, tag: &'static str) -> Requests {
        Requests {
            workload,
            tag,
            pad: padding(tag, s.payload_bytes),
            bytes: s.payload_bytes,
            entities: s.entities,
        }
    }

    pub(crate) fn key(&self, seq: usize) -> String {
        format!("{}-{seq}", self.tag)
    }

    pub(crate) fn body(&self, seq: usize) -> String {
        match self.workload {
            Workload::Identity => request(self.tag, seq, &self.pad),
            Workload::Realistic => realistic::request(self.tag, seq, self.bytes, self.entities),
        }
    }
}

/// The sequence number in a request id (or result key) `{tag}-{seq}`.
pub(crate) fn seq_of(key: &[u8]) -> Option<usize> {
    let dash = key.iter().rposition(|b| *b == b'-')?;
    std::str::from_utf8(&key[dash + 1..]).ok()?.parse().ok()
}

/// The load generator's producer: idempotent, acks=all, 1 ms linger.
pub(crate) fn generator(
    s: &Settings,
) -> ThreadedProducer<rdkafka::producer::DefaultProducerContext> {
    client(s)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("the load generator's producer")
}

pub(crate) fn send(
    producer: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    key: &str,
    value: &str,
) {
    let mut record = BaseRecord::to(topic).key(key).payload(value);
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => panic!("producing a request: {e}"),
        }
    }
}

/// Pre-loads `n` requests of `workload` (tag `tp`) into `topic`.
pub(crate) fn preload(s: &Settings, topic: &str, n: usize, workload: Workload) {
    let producer = generator(s);
    let requests = Requests::new(s, workload, "tp");
    for seq in 0..n {
        send(&producer, topic, &requests.key(seq), &requests.body(seq));
    }
    producer
        .flush(Duration::from_secs(120))
        .expect("pre-loading the backlog");
}

/// Writes the `profile` feature of every user of the realistic workload (`u-0` … `u-{E2E_ENTITIES − 1}`)
/// to the feature store of the realistic candidate's configuration (the same file, with the
/// same `INFERFLOW__…` overrides), before any run. Fails loudly when Cassandra does not answer.
pub(crate) fn seed_features(s: &Settings) {
    use inferflow::config::{Config, Sources};
    use inferflow::feature_store::FeatureStore;

    let config = Config::load(&Sources::standard(Some(s.realistic_config.clone())))
        .unwrap_or_else(|e| panic!("{}: {e}", s.realistic_config.display()));
    let fs = &config.feature_store;
    if fs.backend == inferflow::config::FeatureStoreBackend::Scylla {
        let answers = fs.contact_points.iter().any(|cp| {
            use std::net::ToSocketAddrs;
            cp.to_socket_addrs().ok().into_iter().flatten().any(|addr| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok()
            })
        });
        assert!(
            answers,
            "Cassandra (the feature store of {}) does not answer on {}: {START_HINT}",
            s.realistic_config.display(),
            fs.contact_points.join(", ")
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let t0 = Instant::now();
    // The newest version wins: a run's profiles replace any earlier run's.
    let version = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64);
    let updates = realistic::profiles(s.entities, version);
    runtime.block_on(async {
        let store = tokio::time::timeout(Duration::from_secs(120), FeatureStore::open(fs))
            .await
            .unwrap_or_else(|_| panic!("opening the feature store took over 120 s ({START_HINT})"))
            .unwrap_or_else(|e| {
                panic!(
                    "opening the feature store at {} ({e}): {START_HINT}",
                    fs.contact_points.join(", ")
                )
            });
        let failed: Vec<String> = store
            .set_features(&updates)
            .await
            .into_iter()
            .filter_map(Result::err)
            .map(|e| e.to_string())
            .collect();
        assert!(
            failed.is_empty(),
            "{} of {} feature writes failed, the first: {}",
            failed.len(),
            updates.len(),
            failed[0]
        );
    });
    eprintln!(
        "[e2e] wrote the profiles of {} users to the feature store (keyspace {}) in {:.1} s",
        s.entities,
        fs.keyspace,
        t0.elapsed().as_secs_f64()
    );
}
