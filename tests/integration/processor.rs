//! The stream processor against the real broker: the accounting rule (one output per consumed
//! message), dead letters byte-identical to their input, consumer-group scaling and graceful
//! rebalances, SIGKILL recovery, and bounded memory under a slow model.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use inferflow::executor::{Builtins, ExecRequest, ExecResult, Executor};
use inferflow::model::{InferenceResult, Target};

use crate::harness::{Captured, Running, Topics, collect, config, produce};
use crate::utils::{self, kafka_config, unique_name};

fn result_of(c: &Captured) -> InferenceResult {
    serde_json::from_slice(c.value.as_deref().expect("result has a value"))
        .expect("result document")
}

/// Counts results per request id.
fn result_counts(outputs: &[Captured], results_topic: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for c in outputs.iter().filter(|c| c.topic == results_topic) {
        *counts.entry(result_of(c).request_id).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_yields_exactly_one_result_or_dead_letter() {
    utils::init_tracing();
    let topics = Topics::create("acct", 6).await;
    const N: usize = 10_000;
    // Category by i % 10: 0-5 valid, 6 malformed JSON, 7 no request_id, 8 unknown pipeline,
    // 9 oversized (or, every 50th, an empty value).
    let mut records = Vec::with_capacity(N);
    for i in 0..N {
        let key = Some(format!("k{i}").into_bytes());
        let value: Option<Vec<u8>> = match i % 10 {
            0..=2 => Some(
                format!(r#"{{"request_id":"r{i}","pipeline":"identity","data":{{"i":{i}}}}}"#)
                    .into_bytes(),
            ),
            3..=5 => Some(
                format!(r#"{{"request_id":"r{i}","model":"echo","data":"v{i}"}}"#).into_bytes(),
            ),
            6 => Some(format!(r#"{{"request_id":"r{i}","data":"#).into_bytes()),
            7 => Some(format!(r#"{{"model":"echo","data":{i}}}"#).into_bytes()),
            8 => {
                Some(format!(r#"{{"request_id":"r{i}","pipeline":"nope","data":1}}"#).into_bytes())
            }
            _ if i % 50 == 49 => None,
            _ => Some(
                format!(
                    r#"{{"request_id":"r{i}","model":"echo","data":"{}"}}"#,
                    "x".repeat(3000)
                )
                .into_bytes(),
            ),
        };
        records.push((key, value));
    }
    produce(&topics.requests, &records).await;

    let group = unique_name("acct");
    let cfg = config(&topics, &group, "[executor]\nmax_request_bytes = 2048\n");
    let running = Running::start(&cfg, Arc::new(Builtins)).await;
    let outputs = collect(
        &[&topics.results, &topics.dlq],
        N,
        Duration::from_secs(120),
        Duration::from_secs(2),
    )
    .await;
    running.stop().await;

    assert_eq!(outputs.len(), N, "results + dead letters must equal inputs");
    let counts = result_counts(&outputs, &topics.results);
    let expected_ids: HashSet<String> = (0..N)
        .filter(|i| matches!(i % 10, 0..=5 | 8))
        .map(|i| format!("r{i}"))
        .collect();
    assert_eq!(
        counts.keys().cloned().collect::<HashSet<_>>(),
        expected_ids,
        "one result per readable request id"
    );
    assert!(
        counts.values().all(|&n| n == 1),
        "no request id answered twice"
    );

    for c in outputs.iter().filter(|c| c.topic == topics.results) {
        let result = result_of(c);
        let i: usize = result.request_id[1..].parse().unwrap();
        assert_eq!(
            c.key.as_deref(),
            Some(result.request_id.as_bytes()),
            "results are keyed by request id"
        );
        assert_eq!(c.headers["inferflow-request-id"], result.request_id);
        assert_eq!(c.headers["inferflow-source-topic"], topics.requests);
        if i % 10 == 8 {
            assert_eq!(c.headers["inferflow-status"], "error");
            assert_eq!(result.error.unwrap().kind.as_str(), "unknown_pipeline");
        } else {
            assert_eq!(c.headers["inferflow-status"], "ok");
            assert!(result.output.is_some());
        }
    }

    let mut dead = 0;
    for c in outputs.iter().filter(|c| c.topic == topics.dlq) {
        dead += 1;
        let key = String::from_utf8(c.key.clone().expect("dead letters keep the key")).unwrap();
        let i: usize = key[1..].parse().unwrap();
        let (orig_key, orig_value) = &records[i];
        assert_eq!(c.key.as_ref(), orig_key.as_ref());
        assert_eq!(
            c.value.as_deref().unwrap_or_default(),
            orig_value.as_deref().unwrap_or_default(),
            "dead letter {key} must be byte-identical to its input"
        );
        let expected_kind = match i % 10 {
            6 => "invalid_json",
            7 => "invalid_request",
            _ if i % 50 == 49 => "invalid_json",
            _ => "payload_too_large",
        };
        assert_eq!(
            c.headers["inferflow-error-kind"], expected_kind,
            "message {i}"
        );
        assert!(!c.headers["inferflow-error-message"].is_empty());
        assert_eq!(c.headers["inferflow-source-topic"], topics.requests);
        c.headers["inferflow-source-partition"]
            .parse::<i32>()
            .unwrap();
        c.headers["inferflow-source-offset"].parse::<i64>().unwrap();
    }
    assert_eq!(dead, 3000);
}

/// Wraps the built-ins and records which request ids this instance answered.
struct Recording {
    seen: Arc<Mutex<Vec<String>>>,
}

impl Executor for Recording {
    fn execute<'a>(
        &'a self,
        target: &'a Target,
        requests: Vec<ExecRequest>,
    ) -> BoxFuture<'a, Vec<ExecResult>> {
        self.seen
            .lock()
            .unwrap()
            .extend(requests.iter().map(|r| r.request_id.clone()));
        Builtins.execute(target, requests)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_partitions_and_rebalance_without_loss_or_duplicates() {
    utils::init_tracing();
    let topics = Topics::create("group", 6).await;
    let group = unique_name("group");
    let cfg = config(
        &topics,
        &group,
        "[batch]\nmax_records = 50\nlinger_ms = 10\n",
    );
    let recorders: Vec<Arc<Mutex<Vec<String>>>> = (0..3).map(|_| Arc::default()).collect();
    let executor = |i: usize| -> Arc<dyn Executor> {
        Arc::new(Recording {
            seen: Arc::clone(&recorders[i]),
        })
    };

    let a = Running::start(&cfg, executor(0)).await;
    let b = Running::start(&cfg, executor(1)).await;

    // Produce 6,000 requests over about 6 s, each taking the echo model 1 ms.
    const N: usize = 6_000;
    let requests_topic = topics.requests.clone();
    let producer = tokio::spawn(async move {
        for wave in 0..30 {
            let records: Vec<_> = (wave * 200..(wave + 1) * 200)
                .map(|i| {
                    let v = format!(r#"{{"request_id":"g{i}","model":"echo","data":{i},"parameters":{{"delay_ms":1}}}}"#);
                    (Some(format!("k{i}").into_bytes()), Some(v.into_bytes()))
                })
                .collect();
            produce(&requests_topic, &records).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = Running::start(&cfg, executor(2)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.stop().await; // leaves gracefully mid-stream
    producer.await.unwrap();

    let outputs = collect(
        &[&topics.results, &topics.dlq],
        N,
        Duration::from_secs(120),
        Duration::from_secs(3),
    )
    .await;
    b.stop().await;
    c.stop().await;

    let counts = result_counts(&outputs, &topics.results);
    let missing: Vec<String> = (0..N)
        .map(|i| format!("g{i}"))
        .filter(|id| !counts.contains_key(id))
        .collect();
    let duplicated: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty(),
        "{} requests lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        duplicated.is_empty(),
        "{} requests answered twice, e.g. {:?}",
        duplicated.len(),
        &duplicated[..duplicated.len().min(5)]
    );
    assert_eq!(outputs.len(), N, "no dead letters expected");
    for (i, seen) in recorders.iter().enumerate() {
        let n = seen.lock().unwrap().len();
        assert!(n > 0, "instance {i} never received a partition");
    }
}

/// Wraps the built-ins and records request ids in the order their execution *finished*.
struct Completing {
    finished: Arc<Mutex<Vec<String>>>,
}

impl Executor for Completing {
    fn execute<'a>(
        &'a self,
        target: &'a Target,
        requests: Vec<ExecRequest>,
    ) -> BoxFuture<'a, Vec<ExecResult>> {
        Box::pin(async move {
            let ids: Vec<String> = requests.iter().map(|r| r.request_id.clone()).collect();
            let out = Builtins.execute(target, requests).await;
            self.finished.lock().unwrap().extend(ids);
            out
        })
    }
}

/// Runs 4 keys × 40 sequenced requests, alternating slow and fast batches, and returns how
/// many times a key's request finished before an earlier request of the same key.
async fn key_order_violations(ordering: &str) -> usize {
    let topics = Topics::create("order", 2).await;
    let group = unique_name("order");
    let cfg = config(
        &topics,
        &group,
        &format!(
            "[batch]\nmax_records = 5\nlinger_ms = 5\n[executor]\nmax_in_flight_batches = 4\nordering = \"{ordering}\"\n"
        ),
    );
    const PER_KEY: usize = 40;
    let mut records = Vec::new();
    for seq in 0..PER_KEY {
        for key in 0..4 {
            let delay = if (seq / 5) % 2 == 0 { 40 } else { 1 };
            let v = format!(
                r#"{{"request_id":"k{key}-{seq}","model":"echo","data":{seq},"parameters":{{"delay_ms":{delay}}}}}"#
            );
            records.push((Some(format!("k{key}").into_bytes()), Some(v.into_bytes())));
        }
    }
    produce(&topics.requests, &records).await;
    let finished: Arc<Mutex<Vec<String>>> = Arc::default();
    let running = Running::start(
        &cfg,
        Arc::new(Completing {
            finished: Arc::clone(&finished),
        }),
    )
    .await;
    collect(
        &[&topics.results],
        records.len(),
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await;
    running.stop().await;

    let finished = finished.lock().unwrap();
    assert_eq!(finished.len(), records.len());
    let mut last: HashMap<&str, usize> = HashMap::new();
    let mut violations = 0;
    for id in finished.iter() {
        let (key, seq) = id.split_once('-').unwrap();
        let seq: usize = seq.parse().unwrap();
        if last.get(key).is_some_and(|&prev| seq < prev) {
            violations += 1;
        }
        last.insert(key, seq);
    }
    violations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_ordering_runs_each_key_in_consumption_order() {
    utils::init_tracing();
    assert_eq!(
        key_order_violations("per_key").await,
        0,
        "per_key mode must keep each key in order"
    );
}

/// Panics for the model `boom`, otherwise behaves like the built-ins.
struct Panicking;

impl Executor for Panicking {
    fn execute<'a>(
        &'a self,
        target: &'a Target,
        requests: Vec<ExecRequest>,
    ) -> BoxFuture<'a, Vec<ExecResult>> {
        if target == &Target::Model("boom".into()) {
            panic!("the boom model always panics");
        }
        Builtins.execute(target, requests)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_executor_answers_with_internal_errors_and_processing_goes_on() {
    utils::init_tracing();
    let topics = Topics::create("panic", 2).await;
    let group = unique_name("panic");
    let cfg = config(&topics, &group, "");
    let request = |i: usize, model: &str| {
        let v = format!(r#"{{"request_id":"p{i}","model":"{model}","data":{i}}}"#);
        (Some(format!("k{i}").into_bytes()), Some(v.into_bytes()))
    };
    let first: Vec<_> = (0..20)
        .map(|i| request(i, if i % 2 == 0 { "boom" } else { "echo" }))
        .collect();
    produce(&topics.requests, &first).await;
    let running = Running::start(&cfg, Arc::new(Panicking)).await;
    collect(
        &[&topics.results],
        20,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    // The processor is still healthy: later requests are answered normally.
    let later: Vec<_> = (20..30).map(|i| request(i, "echo")).collect();
    produce(&topics.requests, &later).await;
    let outputs = collect(
        &[&topics.results, &topics.dlq],
        30,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    running.stop().await;

    let results: HashMap<String, InferenceResult> = outputs
        .iter()
        .map(result_of)
        .map(|r| (r.request_id.clone(), r))
        .collect();
    assert_eq!(
        (outputs.len(), results.len()),
        (30, 30),
        "one result per request, nothing dead-lettered"
    );
    for i in (0..20).step_by(2) {
        let r = &results[&format!("p{i}")];
        assert_eq!(
            r.error.as_ref().map(|e| e.kind.as_str()),
            Some("internal"),
            "p{i}: {r:?}"
        );
    }
    for i in 20..30 {
        assert!(
            results[&format!("p{i}")].output.is_some(),
            "p{i} answered after the panic"
        );
    }
}

/// A poison message: key, value, and the request id of its result (empty: a dead letter) with
/// the kind expected (`ok` for a successful result).
type Poison<'a> = (Option<Vec<u8>>, Option<Vec<u8>>, &'a str, &'a str);

/// A poison corpus: every message is dead-lettered or answered with the right error kind, and
/// the processor keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_corpus_is_dead_lettered_or_answered_with_the_right_error_kind() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    utils::init_tracing();
    utils::require_kafka().await;
    // Requests may be up to 16 MiB on the wire here, so the 10 MiB value reaches inferflow;
    // the dead-letter topic keeps the broker's default limit (1 MiB).
    let base = unique_name("poison");
    let topics = Topics {
        requests: format!("{base}.requests"),
        results: format!("{base}.results"),
        dlq: format!("{base}.dlq"),
        features: format!("{base}.features"),
    };
    let admin: AdminClient<DefaultClientContext> = kafka_config().create().expect("admin");
    let big = NewTopic::new(&topics.requests, 2, TopicReplication::Fixed(1))
        .set("max.message.bytes", "16777216");
    let others: Vec<NewTopic<'_>> = [&topics.results, &topics.dlq, &topics.features]
        .into_iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
    for result in admin
        .create_topics(
            std::iter::once(&big).chain(others.iter()),
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .expect("create topics")
    {
        result.expect("topic created");
    }
    let group = unique_name("poison");
    let processor = Running::start(&config(&topics, &group, ""), Arc::new(Builtins)).await;

    let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    // (key, value, expected: Ok(request id of an `ok` result) | Err((request id or "", kind)))
    let corpus: Vec<Poison<'_>> = vec![
        (Some(b"k".to_vec()), Some(vec![0xff, 0xfe, 0x00, 0x80]), "", "invalid_json"),
        (None, Some(br#"{"request_id":"utf","pipeline":"identity","data":"caf\xc3"}"#.to_vec()), "", "invalid_json"),
        (None, Some(deep(10_000).into_bytes()), "", "invalid_json"),
        (None, Some(format!(r#"{{"request_id":"deep","pipeline":"identity","data":{}}}"#, deep(200)).into_bytes()), "", "invalid_json"),
        // Beyond the double range, but a JSON number: passed through as written (tests/integration/numbers.rs).
        (None, Some(br#"{"request_id":"num","pipeline":"identity","data":1e400}"#.to_vec()), "num", "ok"),
        (None, Some(br#"{"request_id":"bigint","pipeline":"identity","data":123456789012345678901234567890}"#.to_vec()), "bigint", "ok"),
        (None, Some(br#"{"request_id":5,"pipeline":"identity","data":1}"#.to_vec()), "", "invalid_request"),
        (None, Some(br#"{"request_id":"type","pipeline":7,"data":1}"#.to_vec()), "type", "invalid_request"),
        (None, Some(br#"{"request_id":"params","model":"echo","data":1,"parameters":[1]}"#.to_vec()), "params", "invalid_request"),
        (None, Some(vec![b' '; 10 * 1024 * 1024]), "", "payload_too_large"),
        (Some(b"empty".to_vec()), Some(Vec::new()), "", "invalid_json"),
        (Some(b"null".to_vec()), None, "", "invalid_json"),
        (None, Some(br#"{"request_id":"nullkey","pipeline":"identity","data":{"a":null}}"#.to_vec()), "nullkey", "ok"),
        (None, Some(br#"{"request_id":"","pipeline":"identity","data":1}"#.to_vec()), "", "invalid_request"),
        (None, Some(br#"{"request_id":"nopipe","pipeline":"nope","data":1}"#.to_vec()), "nopipe", "unknown_pipeline"),
    ];
    let producer: rdkafka::producer::FutureProducer = kafka_config()
        .set("message.max.bytes", "16777216")
        .create()
        .expect("producer");
    for (key, value, _, _) in &corpus {
        let mut record: rdkafka::producer::FutureRecord<'_, [u8], [u8]> =
            rdkafka::producer::FutureRecord::to(&topics.requests);
        if let Some(k) = key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = value {
            record = record.payload(v.as_slice());
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("produce poison");
    }
    // After the poison, a valid request is still answered.
    produce(
        &topics.requests,
        &[(
            None,
            Some(br#"{"request_id":"after","pipeline":"identity","data":1}"#.to_vec()),
        )],
    )
    .await;
    let outputs = collect(
        &[&topics.results, &topics.dlq],
        corpus.len() + 1,
        Duration::from_secs(60),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(outputs.len(), corpus.len() + 1, "one output per message");

    let mut dead_kinds: Vec<String> = Vec::new();
    let mut results: HashMap<String, (String, String)> = HashMap::new();
    for out in &outputs {
        if out.topic == topics.dlq {
            dead_kinds.push(out.headers["inferflow-error-kind"].clone());
            if out.headers["inferflow-error-kind"] == "payload_too_large" {
                assert_eq!(
                    out.headers
                        .get("inferflow-value-truncated")
                        .map(String::as_str),
                    Some("10485760"),
                    "the 10 MiB value is dead-lettered truncated, with its size"
                );
                assert_eq!(out.value.as_ref().map(Vec::len), Some(65_536));
            }
        } else {
            let doc: InferenceResult =
                serde_json::from_slice(out.value.as_deref().expect("value")).expect("result");
            let kind = doc
                .error
                .as_ref()
                .map_or("ok".to_owned(), |e| e.kind.as_str().to_owned());
            results.insert(
                doc.request_id.clone(),
                (doc.status.as_str().to_owned(), kind),
            );
        }
    }
    let mut expected_dead: Vec<String> = corpus
        .iter()
        .filter(|(_, _, id, _)| id.is_empty())
        .map(|(_, _, _, kind)| (*kind).to_owned())
        .collect();
    expected_dead.sort();
    dead_kinds.sort();
    assert_eq!(dead_kinds, expected_dead, "dead letters by kind");
    for (_, _, id, kind) in corpus.iter().filter(|(_, _, id, _)| !id.is_empty()) {
        let (status, got) = results
            .get(*id)
            .unwrap_or_else(|| panic!("no result for {id}"));
        assert_eq!(got, kind, "{id}: status {status}");
    }
    assert_eq!(
        results["after"].1, "ok",
        "processing goes on after the poison"
    );
    processor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_outside_the_allow_list_is_refused_and_nothing_reaches_that_topic() {
    utils::init_tracing();
    let topics = Topics::create("replyto", 1).await;
    // Both topics exist, so a refusal can only come from the allow-list, not from Kafka.
    let allowed = format!("{}.allowed", topics.requests);
    let forbidden = format!("{}.forbidden", topics.requests);
    utils::create_topic(&allowed, 1).await;
    utils::create_topic(&forbidden, 1).await;
    let request = |id: &str, reply_to: &str| -> crate::harness::Raw {
        (
            Some(id.as_bytes().to_vec()),
            Some(
                format!(r#"{{"request_id":"{id}","model":"echo","data":"{id}","reply_to":"{reply_to}"}}"#)
                    .into_bytes(),
            ),
        )
    };
    produce(
        &topics.requests,
        &[
            request("to-allowed", &allowed),
            request("to-forbidden", &forbidden),
            // Not even an existing topic: refused the same way, before Kafka is asked.
            request("to-unknown", "no.such.topic"),
        ],
    )
    .await;

    let group = unique_name("replyto");
    let extra = format!("reply_to_allowed = [\"{allowed}\"]\n");
    // The harness puts `extra` at the end of its [topics] table.
    let cfg = config(&topics, &group, &extra);
    let running = Running::start(&cfg, Arc::new(Builtins)).await;
    let outputs = collect(
        &[&topics.results, &topics.dlq, &allowed, &forbidden],
        3,
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await;
    running.stop().await;

    assert_eq!(outputs.len(), 3, "one output per request: {outputs:?}");
    assert!(
        outputs
            .iter()
            .all(|c| c.topic != forbidden && c.topic != topics.dlq),
        "nothing goes to the forbidden topic or the DLQ: {outputs:?}"
    );
    let by_id: HashMap<String, (&Captured, InferenceResult)> = outputs
        .iter()
        .map(|c| (result_of(c).request_id, (c, result_of(c))))
        .collect();

    let (c, ok) = &by_id["to-allowed"];
    assert_eq!(c.topic, allowed, "an allowed reply_to receives the result");
    assert!(ok.error.is_none() && ok.output.is_some(), "{ok:?}");

    for id in ["to-forbidden", "to-unknown"] {
        let (c, refused) = &by_id[id];
        assert_eq!(
            c.topic, topics.results,
            "{id}: refused on the default results topic"
        );
        assert_eq!(c.headers["inferflow-status"], "error");
        assert_eq!(c.headers["inferflow-error-kind"], "reply_to_not_allowed");
        let error = refused.error.as_ref().expect("an error result");
        assert_eq!(error.kind.as_str(), "reply_to_not_allowed");
        assert!(refused.output.is_none(), "{id}: no output is produced");
    }
}
