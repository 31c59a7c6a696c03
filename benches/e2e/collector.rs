//! The collector: reads a results topic, records when each request's result arrived (and when
//! the broker appended it, from the record's timestamp), and takes CPU marks when given
//! counts of results have arrived.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::kafka::{client, unique};
use super::load::seq_of;
use super::lock;
use super::process::{CpuMark, cpu_mark};
use super::settings::Settings;

pub(crate) struct Arrivals {
    pub(crate) base: Instant,
    /// Microseconds after `base` + 1 when the result of request `seq` arrived; 0 = not yet.
    pub(crate) received: Vec<AtomicU64>,
    pub(crate) unique: AtomicUsize,
    pub(crate) duplicates: AtomicUsize,
    pub(crate) errors: AtomicUsize,
    pub(crate) strays: AtomicUsize,
    /// CPU marks taken when `unique` reached each of the mark counts.
    pub(crate) marks: Mutex<Vec<(usize, CpuMark)>>,
    /// The Kafka timestamp (the results topics use `LogAppendTime`: when the broker appended
    /// the result, in milliseconds since the epoch) of every unique result, in arrival order.
    pub(crate) appended: Mutex<Vec<i64>>,
}

impl Arrivals {
    pub(crate) fn micros(&self, at: Instant) -> u64 {
        at.duration_since(self.base).as_micros() as u64 + 1
    }
}

pub(crate) struct Collector {
    pub(crate) arrivals: Arc<Arrivals>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Collector {
    pub(crate) fn start(
        s: &Settings,
        topic: &str,
        slots: usize,
        base: Instant,
        marks: Vec<usize>,
        pids: (Arc<AtomicU64>, Option<u32>),
    ) -> Collector {
        let arrivals = Arc::new(Arrivals {
            base,
            received: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            unique: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
            errors: AtomicUsize::new(0),
            strays: AtomicUsize::new(0),
            marks: Mutex::new(Vec::new()),
            appended: Mutex::new(Vec::with_capacity(slots)),
        });
        let consumer: BaseConsumer = client(s)
            .set("group.id", unique("collector"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .expect("the collector");
        let mut tpl = TopicPartitionList::new();
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("results topic metadata");
        for p in metadata.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("a partition");
        }
        consumer.assign(&tpl).expect("assigning the results topic");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (arrivals, stop) = (Arc::clone(&arrivals), Arc::clone(&stop));
            std::thread::spawn(move || {
                let (candidate_pid, broker_pid) = pids;
                let mut marks = marks.into_iter().peekable();
                while !stop.load(Ordering::Acquire) {
                    let Some(result) = consumer.poll(Duration::from_millis(50)) else {
                        continue;
                    };
                    let message = result.expect("reading results");
                    let now = Instant::now();
                    let Some(seq) = message.key().and_then(seq_of) else {
                        arrivals.strays.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let Some(slot) = arrivals.received.get(seq) else {
                        arrivals.strays.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    if let Some(headers) = message.headers()
                        && headers
                            .iter()
                            .any(|h| h.key == "inferflow-status" && h.value == Some(b"error"))
                    {
                        arrivals.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    if slot
                        .compare_exchange(
                            0,
                            arrivals.micros(now),
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        )
                        .is_err()
                    {
                        arrivals.duplicates.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if let Some(ms) = message.timestamp().to_millis() {
                        lock(&arrivals.appended).push(ms);
                    }
                    let count = arrivals.unique.fetch_add(1, Ordering::AcqRel) + 1;
                    while marks.peek().is_some_and(|m| *m <= count) {
                        let at = marks.next().expect("peeked");
                        let pid = candidate_pid.load(Ordering::Acquire) as u32;
                        lock(&arrivals.marks).push((at, cpu_mark(pid, broker_pid)));
                    }
                }
            })
        };
        Collector {
            arrivals,
            stop,
            thread,
        }
    }

    pub(crate) fn finish(self) -> Arc<Arrivals> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the collector thread");
        self.arrivals
    }
}
