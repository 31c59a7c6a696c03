//! Executor overhead per request with the echo model: what inferflow itself costs a batch,
//! Kafka aside, compared with the bare cost of parsing and re-serialising the same JSON.
//!
//! All three benchmarks work on one batch of 256 owned Kafka messages (built in memory: no
//! broker) holding small valid requests for the `echo` model, and report 256 elements per
//! iteration, so criterion's rates are requests per second:
//!
//! - `inferflow_path`: the in-process path a batch takes in the processor's batch task, minus
//!   Kafka: decode each message value, group the requests by target, run each group through
//!   `Builtins::execute` (under `tokio::time::timeout`, as the processor does, on a
//!   current-thread Tokio runtime), and serialise each result with
//!   `inferflow::processor::result_bytes` (with its `SourceRef`), as the processor does. The
//!   batch task itself is private and bound to a Kafka sink, so the
//!   bench repeats its steps; the result headers and the delivery are left out.
//! - `json_baseline`: the same message values only parsed with
//!   `serde_json::from_slice::<serde_json::Value>` and serialised again: the least any JSON
//!   processor has to do. `inferflow_path / json_baseline`, measured in the same run, is
//!   inferflow's overhead as a ratio.
//! - `result_serialisation`: `result_bytes` alone (the processor's way: borrowed parts
//!   written into one buffer sized up front), for 256 echo outputs built beforehand.
//! - `result_serialisation_via_document`: the way before it, for comparison: an owned
//!   `result_document` (copies of the id, target, source and output), then
//!   `serde_json::to_vec` (cloning the outputs is not timed).
//!
//! And, in the group `identity_tracing_256`, the same path for 256 `identity` requests that
//! each carry a `traceparent` header, plus the processor's trace work: the copy of the trace
//! headers (what the consumer does) and, with tracing on, a request span per record (child of
//! its header), the spans handed to the executor, and each span ended and its `traceparent`
//! formatted for the result. `off` runs first, before the tracer is installed (the default);
//! `on` after it, sampling every trace and exporting to a port where nothing listens (the
//! export runs on the SDK's own thread).

// `criterion_group!` generates a public, undocumented function; this is a benchmark binary,
// not API.
#![allow(missing_docs)]

#[path = "support/criterion.rs"]
mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use inferflow::decode::{DecodeRules, Decoded, decode};
use inferflow::executor::{Builtins, ExecRequest, ExecResult, Executor};
use inferflow::model::{SourceRef, Target};
use inferflow::processor::{result_bytes, result_document};
use inferflow::tracing_otel::{self as otel, Arrival, TraceHeaders, TracingConfig};
use rdkafka::Timestamp;
use rdkafka::message::{Header, Headers as _, Message, OwnedHeaders, OwnedMessage};

/// Requests per batch (the default `batch.max_records`).
const BATCH: usize = 256;
/// The processor's default `executor.execute_timeout_ms`.
const EXECUTE_TIMEOUT: Duration = Duration::from_secs(30);

/// A batch of small valid requests for the echo model, 253 bytes each.
fn messages() -> Vec<OwnedMessage> {
    messages_for(r#""model":"echo""#, false)
}

/// A batch of small valid requests for `target` (`"model":"echo"` or `"pipeline":…`), each
/// with a `traceparent` header when `traced`.
fn messages_for(target: &str, traced: bool) -> Vec<OwnedMessage> {
    (0..BATCH)
        .map(|i| {
            let headers = traced.then(|| {
                let parent = format!("00-4bf92f3577b34da6a3ce929d0e{i:06}-00f067aa0ba902b7-01");
                OwnedHeaders::new().insert(Header {
                    key: "traceparent",
                    value: Some(parent.as_bytes()),
                })
            });
            let value = format!(
                concat!(
                    r#"{{"request_id":"req-2f6c1a9e-{:06}",{},"#,
                    r#""data":{{"features":[0.12,3.4,-1.5,0.0071,42.0,0.5],"text":"order 1234 arrived late"}},"#,
                    r#""parameters":{{"temperature":0.2}},"entity":{{"type":"user","id":"u-88213"}},"#,
                    r#""tenant":"acme","deadline_ms":4102444800000}}"#
                ),
                i, target
            );
            OwnedMessage::new(
                Some(value.into_bytes()),
                Some(format!("req-2f6c1a9e-{i:06}").into_bytes()),
                "inferflow.requests".to_owned(),
                Timestamp::CreateTime(1_767_225_600_000),
                (i % 6) as i32,
                i as i64,
                headers,
            )
        })
        .collect()
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn source_of(message: &OwnedMessage) -> SourceRef {
    SourceRef {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
    }
}

/// A decoded answer: request id, target, outcome.
type Answer = Option<(String, Option<Target>, ExecResult)>;

/// Requests grouped by target, with their message index.
type Groups = BTreeMap<Target, Vec<(usize, ExecRequest)>>;

/// One batch through decode → group by target → execute → result document → JSON bytes.
async fn inferflow_path(
    messages: &[OwnedMessage],
    rules: &DecodeRules,
    executor: &Builtins,
) -> Vec<Vec<u8>> {
    let arrived = Instant::now();
    let (mut answers, groups) = decode_and_group(messages, rules);
    let runs = groups.into_iter().map(|(target, items)| async move {
        let (indices, requests): (Vec<usize>, Vec<ExecRequest>) = items.into_iter().unzip();
        let ids: Vec<String> = requests.iter().map(|r| r.request_id.clone()).collect();
        let results = tokio::time::timeout(EXECUTE_TIMEOUT, executor.execute(&target, requests))
            .await
            .expect("echo answers at once");
        (target, indices, ids, results)
    });
    for (target, indices, ids, results) in futures::future::join_all(runs).await {
        for ((i, id), result) in indices.into_iter().zip(ids).zip(results) {
            answers[i] = Some((id, Some(target.clone()), result));
        }
    }
    serialise(messages, answers, arrived.elapsed())
}

/// [`inferflow_path`] with the processor's trace work (see the module documentation): the
/// trace headers copied from each message, and with tracing on a request span per message
/// handed to the executor, ended after, and its `traceparent` formatted for the result.
async fn traced_path(
    messages: &[OwnedMessage],
    rules: &DecodeRules,
    executor: &Builtins,
) -> (Vec<Vec<u8>>, Vec<Option<TraceHeaders>>) {
    let arrived = Instant::now();
    let incoming: Vec<Option<TraceHeaders>> = messages
        .iter()
        .map(|m| {
            let headers = m.headers()?;
            let parent = headers.iter().find(|h| h.key == "traceparent")?;
            TraceHeaders::from_bytes(parent.value, None)
        })
        .collect();
    let spans: Vec<Option<otel::Context>> = if otel::enabled() {
        messages
            .iter()
            .zip(&incoming)
            .map(|(m, trace)| {
                otel::request_span(
                    trace.as_ref(),
                    Arrival::Kafka(m.topic(), m.partition(), m.offset()),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    let (mut answers, groups) = decode_and_group(messages, rules);
    let spans = &spans;
    let runs = groups.into_iter().map(|(target, items)| async move {
        let (indices, requests): (Vec<usize>, Vec<ExecRequest>) = items.into_iter().unzip();
        let ids: Vec<String> = requests.iter().map(|r| r.request_id.clone()).collect();
        let execute = executor.execute(&target, requests);
        let results = if spans.is_empty() {
            tokio::time::timeout(EXECUTE_TIMEOUT, execute).await
        } else {
            let traces = indices.iter().map(|&i| spans[i].clone()).collect();
            tokio::time::timeout(EXECUTE_TIMEOUT, otel::with_request_traces(execute, traces)).await
        }
        .expect("identity answers at once");
        (target, indices, ids, results)
    });
    for (target, indices, ids, results) in futures::future::join_all(runs).await {
        for ((i, id), result) in indices.into_iter().zip(ids).zip(results) {
            answers[i] = Some((id, Some(target.clone()), result));
        }
    }
    let outgoing = if spans.is_empty() {
        incoming
    } else {
        spans
            .iter()
            .map(|cx| cx.as_ref().and_then(|cx| otel::finish_request(cx, None)))
            .collect()
    };
    (serialise(messages, answers, arrived.elapsed()), outgoing)
}

/// Decodes every message: the answers of those rejected, and the requests by target.
fn decode_and_group(messages: &[OwnedMessage], rules: &DecodeRules) -> (Vec<Answer>, Groups) {
    let now_ms = unix_ms();
    let mut answers: Vec<Answer> = (0..messages.len()).map(|_| None).collect();
    let mut groups = Groups::new();
    for (i, message) in messages.iter().enumerate() {
        match decode(message.payload(), rules, now_ms) {
            Decoded::Request { request, target } => {
                groups.entry(target).or_default().push((
                    i,
                    ExecRequest {
                        request_id: request.request_id,
                        data: request.data,
                        parameters: request.parameters,
                        entity: request.entity,
                        tenant: request.tenant,
                    },
                ));
            }
            Decoded::Reject {
                request_id,
                target,
                error,
            } => answers[i] = Some((request_id, target, Err(error))),
            // A dead letter gets no result document.
            Decoded::DeadLetter(_) => {}
        }
    }
    (answers, groups)
}

/// One result's bytes per answered message.
fn serialise(messages: &[OwnedMessage], answers: Vec<Answer>, latency: Duration) -> Vec<Vec<u8>> {
    messages
        .iter()
        .zip(answers)
        .filter_map(|(message, answer)| {
            let (id, target, result) = answer?;
            let source = source_of(message);
            Some(result_bytes(
                &id,
                target.as_ref(),
                &result,
                Some(&source),
                latency,
            ))
        })
        .collect()
}

/// The same values, only parsed into a `serde_json::Value` and serialised again.
fn json_baseline(messages: &[OwnedMessage]) -> Vec<Vec<u8>> {
    messages
        .iter()
        .map(|message| {
            let value: serde_json::Value =
                serde_json::from_slice(message.payload().expect("a value")).expect("valid JSON");
            serde_json::to_vec(&value).expect("a value serialises")
        })
        .collect()
}

fn bench_executor(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    let rules = DecodeRules {
        max_request_bytes: 1024 * 1024,
        reply_to_allowed: HashSet::new(),
    };
    let executor = Builtins;
    let messages = messages();
    let echo = Target::Model("echo".to_owned());

    // Every request must come back as an `ok` echo result, or the numbers mean nothing.
    let results = runtime.block_on(inferflow_path(&messages, &rules, &executor));
    assert_eq!(results.len(), BATCH);
    for bytes in &results {
        let doc: serde_json::Value = serde_json::from_slice(bytes).expect("a result is JSON");
        assert_eq!(doc["status"], "ok", "{doc}");
        assert_eq!(doc["model_version"], "1", "{doc}");
    }
    assert_eq!(json_baseline(&messages).len(), BATCH);

    // Echo outputs for the serialisation-only benchmark, built once through the real path.
    let outputs: Vec<(String, ExecResult)> = {
        let requests: Vec<ExecRequest> = messages
            .iter()
            .map(
                |message| match decode(message.payload(), &rules, unix_ms()) {
                    Decoded::Request { request, .. } => ExecRequest {
                        request_id: request.request_id,
                        data: request.data,
                        parameters: request.parameters,
                        entity: request.entity,
                        tenant: request.tenant,
                    },
                    other => panic!("not a valid request: {other:?}"),
                },
            )
            .collect();
        let ids: Vec<String> = requests.iter().map(|r| r.request_id.clone()).collect();
        let results = runtime.block_on(executor.execute(&echo, requests));
        ids.into_iter().zip(results).collect()
    };

    let mut group = c.benchmark_group("executor_batch_256");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("inferflow_path", |b| {
        b.to_async(&runtime)
            .iter(|| inferflow_path(&messages, &rules, &executor));
    });
    group.bench_function("json_baseline", |b| {
        b.iter(|| json_baseline(&messages));
    });
    group.bench_function("result_serialisation", |b| {
        b.iter(|| {
            outputs
                .iter()
                .zip(&messages)
                .map(|((id, result), message)| {
                    let source = source_of(message);
                    result_bytes(
                        id,
                        Some(&echo),
                        result,
                        Some(&source),
                        Duration::from_micros(150),
                    )
                })
                .collect::<Vec<_>>()
        });
    });
    group.bench_function("result_serialisation_via_document", |b| {
        b.iter_batched(
            || outputs.clone(),
            |outputs| {
                outputs
                    .into_iter()
                    .zip(&messages)
                    .map(|((id, result), message)| {
                        let doc = result_document(
                            &id,
                            Some(&echo),
                            result,
                            Some(source_of(message)),
                            Duration::from_micros(150),
                        );
                        serde_json::to_vec(&doc).expect("a result serialises")
                    })
                    .collect::<Vec<_>>()
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

/// `identity` with tracing off, then on (the tracer, once installed, stays for the process:
/// so `off` runs first).
fn bench_tracing(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    let rules = DecodeRules {
        max_request_bytes: 1024 * 1024,
        reply_to_allowed: HashSet::new(),
    };
    let messages = messages_for(r#""pipeline":"identity""#, true);
    let check = |(results, traces): (Vec<Vec<u8>>, Vec<Option<TraceHeaders>>)| {
        assert_eq!((results.len(), traces.len()), (BATCH, BATCH));
        assert!(
            traces.iter().all(Option::is_some),
            "every result carries a traceparent"
        );
    };
    let mut group = c.benchmark_group("identity_tracing_256");
    group.throughput(Throughput::Elements(BATCH as u64));
    check(runtime.block_on(traced_path(&messages, &rules, &Builtins)));
    group.bench_function("off", |b| {
        b.to_async(&runtime)
            .iter(|| traced_path(&messages, &rules, &Builtins));
    });
    let tracing = otel::init(&TracingConfig {
        enabled: true,
        endpoint: "http://127.0.0.1:9/v1/traces".to_owned(),
        sampling_ratio: 1.0,
        service_name: "inferflow-bench".to_owned(),
    })
    .expect("the tracer starts");
    assert!(otel::enabled());
    check(runtime.block_on(traced_path(&messages, &rules, &Builtins)));
    group.bench_function("on", |b| {
        b.to_async(&runtime)
            .iter(|| traced_path(&messages, &rules, &Builtins));
    });
    group.finish();
    if let Some(tracing) = tracing {
        tracing.shutdown(Duration::from_millis(100));
    }
}

criterion_group! {
    name = benches;
    config = support::config(50, 3);
    targets = bench_executor, bench_tracing
}
criterion_main!(benches);
