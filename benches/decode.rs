//! Cost of turning one Kafka message value into a request: `inferflow::decode::decode`.
//!
//! Every consumed record goes through `decode` before anything else happens to it, so its cost
//! is paid once per request whatever the model. Three inputs cover the paths that matter:
//!
//! - `small_valid`: a typical request of 253 bytes (a model, a small feature vector,
//!   parameters, an entity, a tenant and a deadline), decoded into a `Decoded::Request`;
//! - `data_10kib`: the same kind of request carrying a 10 KiB array of numbers in `data`, to
//!   show how the cost grows with the payload;
//! - `invalid_json`: the small request cut off before its closing brace, so the whole value is
//!   parsed before the error is found: the dead-letter path at its most expensive for that
//!   size.
//!
//! Throughput is one element per call, so criterion reports requests per second.

// `criterion_group!` generates a public, undocumented function; this is a benchmark binary,
// not API.
#![allow(missing_docs)]

#[path = "support/criterion.rs"]
mod support;

use std::collections::HashSet;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use inferflow::decode::{DecodeRules, Decoded, decode};

/// The "current time" handed to `decode` (2026-01-01T00:00:00Z); requests carry a deadline in
/// 2100, so none is refused as late.
const NOW_MS: i64 = 1_767_225_600_000;

/// A typical small request, 253 bytes.
const SMALL_REQUEST: &str = concat!(
    r#"{"request_id":"req-2f6c1a9e-000042","model":"echo","#,
    r#""data":{"features":[0.12,3.4,-1.5,0.0071,42.0,0.5],"text":"order 1234 arrived late"},"#,
    r#""parameters":{"temperature":0.2},"entity":{"type":"user","id":"u-88213"},"#,
    r#""tenant":"acme","deadline_ms":4102444800000}"#
);

/// A request whose `data` is an array of numbers at least 10 KiB long.
fn request_with_10kib_data() -> String {
    let mut data = String::from("[");
    let mut i: u64 = 0;
    while data.len() < 10 * 1024 {
        if i > 0 {
            data.push(',');
        }
        // Deterministic values with a few decimal places, like a feature vector.
        let x = ((i * 7919) % 100_000) as f64 / 1000.0 - 50.0;
        data.push_str(&x.to_string());
        i += 1;
    }
    data.push(']');
    format!(
        r#"{{"request_id":"req-2f6c1a9e-000043","model":"echo","data":{data},"tenant":"acme","deadline_ms":4102444800000}}"#
    )
}

/// The decoding rules of the default configuration: 1 MiB per value, no `reply_to` allowed.
fn rules() -> DecodeRules {
    DecodeRules {
        max_request_bytes: 1024 * 1024,
        reply_to_allowed: HashSet::new(),
    }
}

fn bench_decode(c: &mut Criterion) {
    let rules = rules();
    let small = SMALL_REQUEST.as_bytes().to_vec();
    let large = request_with_10kib_data().into_bytes();
    let invalid = small[..small.len() - 1].to_vec();

    // Each input must take the path it is named after, or the numbers mean nothing.
    assert!(
        (150..=300).contains(&small.len()),
        "the small request has {} bytes",
        small.len()
    );
    assert!(matches!(
        decode(Some(&small), &rules, NOW_MS),
        Decoded::Request { .. }
    ));
    assert!(matches!(
        decode(Some(&large), &rules, NOW_MS),
        Decoded::Request { .. }
    ));
    assert!(matches!(
        decode(Some(&invalid), &rules, NOW_MS),
        Decoded::DeadLetter(_)
    ));

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    for (name, value) in [
        ("small_valid", &small),
        ("data_10kib", &large),
        ("invalid_json", &invalid),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| decode(black_box(Some(value.as_slice())), &rules, NOW_MS));
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = support::config(50, 3);
    targets = bench_decode
}
criterion_main!(benches);
