//! `processing.guarantee = "exactly_once"` against the real broker: each output committed once
//! (read with `read_committed`, the collector's isolation level), across a rebalance between two
//! instances; and replay of redelivered requests without calling the model again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use inferflow::executor::{Builtins, ExecRequest, ExecResult, Executor};
use inferflow::model::{InferenceResult, Target};

use crate::harness::{Captured, Raw, Running, Topics, collect, collect_until, config, produce};
use crate::utils::{self, unique_name};

fn requests(prefix: &str, range: std::ops::Range<usize>) -> Vec<Raw> {
    range
        .map(|i| {
            let value = if i % 50 == 7 {
                // No request id: a dead letter.
                format!(r#"{{"pipeline":"identity","data":{i}}}"#)
            } else {
                format!(
                    r#"{{"request_id":"{prefix}{i}","pipeline":"identity","data":{{"i":{i}}}}}"#
                )
            };
            (Some(format!("k{i}").into_bytes()), Some(value.into_bytes()))
        })
        .collect()
}

/// Outputs per identity: results by request id, dead letters by source value.
fn output_counts(outputs: &[Captured], topics: &Topics) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for c in outputs {
        let id = if c.topic == topics.results {
            let doc: InferenceResult =
                serde_json::from_slice(c.value.as_deref().expect("value")).expect("result");
            doc.request_id
        } else {
            format!(
                "dlq:{}",
                String::from_utf8_lossy(c.value.as_deref().unwrap_or_default())
            )
        };
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

fn eos(topics: &Topics, group: &str, instance: &str) -> inferflow::config::Config {
    config(
        topics,
        group,
        &format!(
            "[processing]\nguarantee = \"exactly_once\"\ntransactional_id = \"{group}-{instance}\"\n"
        ),
    )
}

/// Collects the `n` outputs of `processor` (results and dead letters, `read_committed`), stops
/// it, and checks that every request has exactly one.
async fn each_committed_once(processor: Running, topics: &Topics, n: usize) -> Vec<Captured> {
    let outputs = collect(
        &[&topics.results, &topics.dlq],
        n,
        Duration::from_secs(120),
        Duration::from_secs(3),
    )
    .await;
    processor.stop().await;
    let counts = output_counts(&outputs, topics);
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    assert_eq!(duplicates, 0, "duplicates for a read_committed consumer");
    assert_eq!(counts.len(), n, "one output per request");
    outputs
}

/// [`eos`] with a transactional producer whose local queue holds one record at a time.
fn one_record_queue(topics: &Topics, group: &str) -> inferflow::config::Config {
    config(
        topics,
        group,
        &format!(
            "[kafka.extra]\n\"queue.buffering.max.messages\" = \"1\"\n[processing]\nguarantee = \"exactly_once\"\ntransactional_id = \"{group}-a\"\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_commits_each_result_and_dead_letter_once() {
    utils::init_tracing();
    let topics = Topics::create("eos", 3).await;
    let group = unique_name("eos");
    const N: usize = 5_000;
    produce(&topics.requests, &requests("e", 0..N)).await;
    let processor = Running::start(&eos(&topics, &group, "a"), Arc::new(Builtins)).await;
    let outputs = each_committed_once(processor, &topics, N).await;
    assert_eq!(
        outputs.iter().filter(|c| c.topic == topics.dlq).count(),
        N / 50,
        "dead letters go through the transaction too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_a_rebalance_loses_and_repeats_nothing() {
    utils::init_tracing();
    let topics = Topics::create("eos_rebalance", 6).await;
    let group = unique_name("eos_rebalance");
    const N: usize = 20_000;
    produce(&topics.requests, &requests("r", 0..N)).await;
    let a = Running::start(&eos(&topics, &group, "a"), Arc::new(Builtins)).await;
    collect(
        &[&topics.results],
        2_000,
        Duration::from_secs(120),
        Duration::ZERO,
    )
    .await;
    // B joins (A gives up partitions mid-stream), then A leaves (B takes them all).
    let b = Running::start(&eos(&topics, &group, "b"), Arc::new(Builtins)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.stop().await;
    let outputs = collect(
        &[&topics.results, &topics.dlq],
        N,
        Duration::from_secs(180),
        Duration::from_secs(3),
    )
    .await;
    b.stop().await;
    let counts = output_counts(&outputs, &topics);
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    println!(
        "exactly once across a rebalance: {} outputs for {N} requests, {duplicates} duplicates",
        outputs.len()
    );
    assert_eq!(counts.len(), N, "lost requests");
    assert_eq!(duplicates, 0, "duplicates for a read_committed consumer");
}

/// Counts the requests it executes.
struct Counting(AtomicUsize);

impl Executor for Counting {
    fn execute<'a>(
        &'a self,
        target: &'a Target,
        requests: Vec<ExecRequest>,
    ) -> BoxFuture<'a, Vec<ExecResult>> {
        self.0.fetch_add(requests.len(), Ordering::SeqCst);
        Builtins.execute(target, requests)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_request_reuses_its_result_and_a_changed_one_does_not() {
    utils::init_tracing();
    let topics = Topics::create("replay", 1).await;
    let group = unique_name("replay");
    let executor = Arc::new(Counting(AtomicUsize::new(0)));
    let processor = Running::start(&config(&topics, &group, ""), executor.clone()).await;
    let same = br#"{"request_id":"same","model":"echo","data":"x"}"#.to_vec();
    let changed = br#"{"request_id":"same","model":"echo","data":"y"}"#.to_vec();
    produce(&topics.requests, &[(None, Some(same.clone()))]).await;
    collect(
        &[&topics.results],
        1,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    // The same bytes again (as a redelivery would bring them), then a different request
    // reusing the id.
    produce(&topics.requests, &[(None, Some(same))]).await;
    collect(
        &[&topics.results],
        2,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    produce(&topics.requests, &[(None, Some(changed))]).await;
    let outputs = collect_until(
        &[&topics.results],
        Duration::from_secs(60),
        Duration::from_millis(500),
        |out| out.len() >= 3,
    )
    .await;
    processor.stop().await;
    let outputs: Vec<serde_json::Value> = outputs
        .iter()
        .map(|c| serde_json::from_slice::<InferenceResult>(c.value.as_deref().unwrap()).unwrap())
        .map(|doc| doc.output.expect("ok result"))
        .collect();
    assert_eq!(
        outputs,
        vec![
            serde_json::json!("x"),
            serde_json::json!("x"),
            serde_json::json!("y")
        ]
    );
    assert_eq!(
        executor.0.load(Ordering::SeqCst),
        2,
        "the repeated request was answered from the replay store"
    );
}

/// Messages in `topic` as a `read_uncommitted` reader sees them: aborted records included.
async fn read_uncommitted_count(topic: &str, at_least: usize) -> usize {
    use futures::StreamExt;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = crate::utils::kafka_config()
        .set("group.id", unique_name("uncommitted"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_uncommitted")
        .create()
        .expect("reader");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut stream = consumer.stream();
    let mut n = 0;
    loop {
        let wait = if n >= at_least { 2 } else { 30 };
        match tokio::time::timeout(Duration::from_secs(wait), stream.next()).await {
            Ok(Some(Ok(_))) => n += 1,
            Ok(other) => panic!("reading {topic}: {other:?}"),
            Err(_) => return n,
        }
    }
}

/// A record the broker refuses (larger than its `reply_to` topic's `max.message.bytes`) makes
/// transactions abort: every partition is rewound and processed again, and nothing commits
/// until the topic accepts the record. Once it does, every request has exactly one committed
/// output; the aborted attempts are visible only to a `read_uncommitted` reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_rewind_and_commit_each_output_once_afterwards() {
    use rdkafka::admin::{
        AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
    };
    use rdkafka::client::DefaultClientContext;
    utils::init_tracing();
    let topics = Topics::create("eos_abort", 3).await;
    let group = unique_name("eos_abort");
    let small = format!("{}.small", topics.requests);
    let admin: AdminClient<DefaultClientContext> =
        crate::utils::kafka_config().create().expect("admin");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for result in admin
        .create_topics(
            [&NewTopic::new(&small, 1, TopicReplication::Fixed(1))
                .set("max.message.bytes", "2000")],
            &options,
        )
        .await
        .expect("create topic")
    {
        result.expect("small topic created");
    }
    const N: usize = 3_000;
    let mut records = requests("a", 0..N);
    records.retain(|(_, v)| {
        !v.as_deref()
            .unwrap_or_default()
            .starts_with(br#"{"pipeline""#)
    });
    let n = records.len() + 1;
    records.insert(
        records.len() / 2,
        (
            Some(b"big".to_vec()),
            Some(
                format!(
                    r#"{{"request_id":"big","pipeline":"identity","reply_to":"{small}","data":"{}"}}"#,
                    "x".repeat(5_000)
                )
                .into_bytes(),
            ),
        ),
    );
    produce(&topics.requests, &records).await;
    let config = config(
        &topics,
        &group,
        &format!(
            "reply_to_allowed = [\"{small}\"]\n[processing]\nguarantee = \"exactly_once\"\ntransactional_id = \"{group}-a\"\n"
        ),
    );
    let processor = Running::start(&config, Arc::new(Builtins)).await;
    // Transactions abort while the record is refused.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let stalled = read_uncommitted_count(&topics.results, 1).await;
    let alter =
        AlterConfig::new(ResourceSpecifier::Topic(&small)).set("max.message.bytes", "1000000");
    for result in admin
        .alter_configs([&alter], &options)
        .await
        .expect("alter configs")
    {
        result.expect("topic config altered");
    }
    let outputs = collect(
        &[&topics.results, &small],
        n,
        Duration::from_secs(120),
        Duration::from_secs(3),
    )
    .await;
    processor.stop().await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for c in &outputs {
        let doc: InferenceResult =
            serde_json::from_slice(c.value.as_deref().expect("value")).expect("result");
        *counts.entry(doc.request_id).or_insert(0) += 1;
    }
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let uncommitted = read_uncommitted_count(&topics.results, n).await;
    println!(
        "abort and rewind: {n} requests, {} committed outputs, {duplicates} duplicates; {stalled} records written before the topic accepted the big one, {uncommitted} seen read_uncommitted",
        outputs.len()
    );
    assert_eq!(counts.len(), n, "every request has an output");
    assert_eq!(duplicates, 0, "duplicates for a read_committed reader");
    assert!(
        uncommitted > n - 1,
        "aborted attempts left records only a read_uncommitted reader sees ({uncommitted} for {} results)",
        n - 1
    );
}

/// A transactional producer whose local queue holds one record at a time: each output of a
/// transaction waits for the one before it to be acknowledged, with the producer polled (not
/// slept on) within the commit's deadline. Every request still has exactly one committed
/// output, and no transaction is aborted: the deadline ends no commit that is merely slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_is_waited_out_within_the_commit_deadline() {
    utils::init_tracing();
    let topics = Topics::create("eos_queue", 3).await;
    let group = unique_name("eos_queue");
    const N: usize = 1_000;
    produce(&topics.requests, &requests("q", 0..N)).await;
    let mut config = one_record_queue(&topics, &group);
    config.kafka.producer_linger_ms = 0;
    let processor = Running::start(&config, Arc::new(Builtins)).await;
    let outputs = each_committed_once(processor, &topics, N).await;
    let results = outputs.iter().filter(|c| c.topic == topics.results).count();
    let written = read_uncommitted_count(&topics.results, results).await;
    assert_eq!(
        written, results,
        "no transaction aborted: every record written is committed"
    );
}

/// The consumer group's state and member count, as the coordinator reports them.
async fn group_members(group: &str) -> (String, usize) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let group = group.to_owned();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = crate::utils::kafka_config().create().expect("client");
        let list = client
            .fetch_group_list(Some(&group), Duration::from_secs(10))
            .expect("group list");
        list.groups().first().map_or((String::new(), 0), |g| {
            (g.state().to_owned(), g.members().len())
        })
    })
    .await
    .expect("group lookup")
}

/// A producer far too slow for its transactions (one queued record at a time, each lingering
/// 500 ms) with a 2 s transaction timeout: no commit can finish in time, so each is aborted at
/// its deadline, before the broker would abort it and fence the producer, and its records are
/// consumed again. The consumer, which polls between commits, stays in its group, and the
/// source does not fail. Started again with the default producer, the same group commits every
/// output once: nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_past_its_deadline_is_aborted_and_the_consumer_keeps_its_group() {
    use std::num::NonZeroU64;
    utils::init_tracing();
    let topics = Topics::create("eos_deadline", 3).await;
    let group = unique_name("eos_deadline");
    const N: usize = 200;
    produce(&topics.requests, &requests("d", 0..N)).await;
    let mut slow = one_record_queue(&topics, &group);
    slow.processing.transaction_timeout_ms = NonZeroU64::new(2_000).expect("non-zero");
    slow.kafka.max_poll_interval_ms = NonZeroU64::new(28_000).expect("non-zero");
    slow.kafka.producer_linger_ms = 500;
    slow.executor.shutdown_timeout_ms = NonZeroU64::new(5_000).expect("non-zero");
    inferflow::config::Config::from_toml_str(&slow.to_redacted_toml()).expect("valid settings");
    let started = std::time::Instant::now();
    let processor = Running::start(&slow, Arc::new(Builtins)).await;
    // By now the broker would have aborted and fenced a transaction left open past 2 s (it
    // looks every 10 s), and a consumer blocked in one commit for 28 s would have left its
    // group.
    for at in [32, 38, 44] {
        tokio::time::sleep(Duration::from_secs(at).saturating_sub(started.elapsed())).await;
        let (state, members) = group_members(&group).await;
        assert_eq!(
            (state.as_str(), members),
            ("Stable", 1),
            "the consumer is still in its group {at} s in"
        );
    }
    let written = read_uncommitted_count(&topics.results, 1).await;
    assert!(
        written > 0,
        "aborted transactions left records only read_uncommitted sees"
    );
    processor.stop().await;
    let processor = Running::start(&eos(&topics, &group, "b"), Arc::new(Builtins)).await;
    let outputs = each_committed_once(processor, &topics, N).await;
    println!(
        "commit deadline: {written} records written by aborted transactions; afterwards {} committed outputs, each once",
        outputs.len()
    );
}
