//! Per-record cost of the micro-batcher: `inferflow::batching::Batcher`.
//!
//! The consumer thread pushes every record it polls into one `Batcher<OwnedMessage>`, so the
//! batcher's cost is paid once per request on the thread that also talks to librdkafka. This
//! pushes N = 10 000 owned Kafka messages (171-byte values, built in memory: no broker)
//! through a batcher limited to 256 records (the default `batch.max_records`; the byte limit is
//! the default 1 MiB, never reached here), so batches close on the record count, then flushes
//! the last partial batch as shutdown would.
//!
//! Timed: reading each value's length, `push` (moving the message into the batch, growing the
//! batch's vector, closing full batches) and the final `flush`. Not timed: building the
//! messages, and handing them back for the next iteration. The clock is read once per
//! iteration rather than per record (the consumer thread calls `Instant::now()` per push), so
//! this is the batcher alone.
//!
//! Throughput is N elements per iteration, so criterion reports records per second.

// `criterion_group!` generates a public, undocumented function; this is a benchmark binary,
// not API.
#![allow(missing_docs)]

#[path = "support/criterion.rs"]
mod support;

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use inferflow::batching::{BatchLimits, Batcher};
use rdkafka::Timestamp;
use rdkafka::message::{Message, OwnedMessage};

/// Records pushed per iteration.
const N: usize = 10_000;
/// `batch.max_records`.
const MAX_RECORDS: usize = 256;

/// N messages as the consumer thread holds them after `detach()`.
fn messages() -> Vec<OwnedMessage> {
    (0..N)
        .map(|i| {
            let value = format!(
                r#"{{"request_id":"req-{i:06}","model":"echo","data":{{"features":[0.12,3.4,-1.5,0.0071,42.0,0.5],"text":"order 1234 arrived late"}},"tenant":"acme","deadline_ms":4102444800000}}"#
            );
            OwnedMessage::new(
                Some(value.into_bytes()),
                Some(format!("req-{i:06}").into_bytes()),
                "inferflow.requests".to_owned(),
                Timestamp::CreateTime(1_767_225_600_000),
                (i % 6) as i32,
                i as i64,
                None,
            )
        })
        .collect()
}

fn bench_batching(c: &mut Criterion) {
    let limits = BatchLimits {
        max_records: NonZeroUsize::new(MAX_RECORDS).expect("non-zero"),
        max_bytes: NonZeroUsize::new(1024 * 1024).expect("non-zero"),
        linger: Duration::from_millis(20),
    };
    let mut pool = messages();

    let mut group = c.benchmark_group("batching");
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("push_10k_max_records_256", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let mut closed = Vec::with_capacity(N / MAX_RECORDS + 1);
                let now = Instant::now();
                let start = Instant::now();
                let mut batcher = Batcher::new(limits);
                for message in pool.drain(..) {
                    let size = message.payload().map_or(0, <[u8]>::len);
                    if let Some((batch, _reason)) = batcher.push(message, size, now) {
                        closed.push(batch);
                    }
                }
                if let Some(batch) = batcher.flush(now) {
                    closed.push(batch);
                }
                black_box(&closed);
                timed += start.elapsed();
                // Untimed: every record must come back, in N / 256 full batches plus the rest.
                assert_eq!(closed.len(), N.div_ceil(MAX_RECORDS));
                pool.extend(closed.into_iter().flat_map(|batch| batch.items));
                assert_eq!(pool.len(), N);
            }
            timed
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = support::config(50, 3);
    targets = bench_batching
}
criterion_main!(benches);
