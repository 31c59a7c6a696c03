//! The broker stopped for 70 s mid-stream and restarted: no request is lost, and processing
//! resumes within 30 s of the broker's return (with the default `kafka.session_timeout_ms`:
//! the restarted broker keeps the old group membership until that timeout ends).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferflow::executor::Builtins;
use inferflow::model::InferenceResult;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::harness::{Captured, Running, Topics, collect, collect_until, config, produce};
use crate::processes::requests;
use crate::servers::{Outage, Server};
use crate::utils::{self, kafka_config, unique_name};

/// Records in the results topic: the sum of its partitions' high watermarks.
async fn results_written(topic: &str) -> i64 {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka_config().create().expect("watermark reader");
        (0..3)
            .map(|p| {
                consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(5))
                    .map_or(0, |(_, high)| high)
            })
            .sum()
    })
    .await
    .expect("watermark task")
}

fn result_ids(outputs: &[Captured], results: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for c in outputs.iter().filter(|c| c.topic == results) {
        let doc: InferenceResult =
            serde_json::from_slice(c.value.as_deref().expect("value")).expect("result document");
        *counts.entry(doc.request_id).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_for_70_s_loses_nothing_and_processing_resumes_within_30_s() {
    utils::init_tracing();
    let topics = Topics::create("broker_outage", 3).await;
    let group = unique_name("broker_outage");
    let processor = Running::start(&config(&topics, &group, ""), Arc::new(Builtins)).await;

    const BEFORE: usize = 5_000;
    const DURING: usize = 5_000;
    produce(&topics.requests, &requests("r", 0..BEFORE)).await;
    // Processing is under way when the broker goes.
    collect_until(
        &[&topics.results],
        Duration::from_secs(60),
        Duration::ZERO,
        |out| out.len() >= 500,
    )
    .await;

    let outage = tokio::task::spawn_blocking(|| Outage::begin(Server::Kafka))
        .await
        .expect("stopping the broker");
    let down_at = Instant::now();
    // Requests produced while the broker is down wait in the producer's queue (its
    // message.timeout.ms is 300 s) and are acknowledged after the broker returns.
    let during = tokio::spawn({
        let topic = topics.requests.clone();
        async move { produce(&topic, &requests("d", BEFORE..BEFORE + DURING)).await }
    });
    tokio::time::sleep(Duration::from_secs(70).saturating_sub(down_at.elapsed())).await;
    tokio::task::spawn_blocking(move || outage.end())
        .await
        .expect("starting the broker");
    let back_at = Instant::now();
    eprintln!("broker down for {:?}", back_at - down_at);

    // Processing resumes: results appear again (the requests produced during the outage are
    // in the producer's queue and reach the broker now).
    let results_at_return = results_written(&topics.results).await;
    loop {
        if results_written(&topics.results).await > results_at_return {
            break;
        }
        assert!(
            back_at.elapsed() < Duration::from_secs(30),
            "no result within 30 s of the broker's return"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "processing resumed {:?} after the broker was ready",
        back_at.elapsed()
    );
    during
        .await
        .expect("requests produced during the outage are acknowledged");
    eprintln!(
        "requests produced during the outage acknowledged {:?} after the broker was ready",
        back_at.elapsed()
    );

    // Every acknowledged request has its result; count duplicates.
    let total = BEFORE + DURING;
    let outputs = collect(
        &[&topics.results, &topics.dlq],
        total,
        Duration::from_secs(180),
        Duration::from_secs(5),
    )
    .await;
    let counts = result_ids(&outputs, &topics.results);
    let expected: HashSet<String> = (0..BEFORE)
        .map(|i| format!("r{i}"))
        .chain((BEFORE..BEFORE + DURING).map(|i| format!("d{i}")))
        .collect();
    let lost: Vec<&String> = expected
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "broker outage: {} requests, lost {}, duplicates {duplicates}",
        expected.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "lost {} requests, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(
        outputs.iter().filter(|c| c.topic == topics.dlq).count(),
        0,
        "no dead letters for valid requests"
    );
    processor.stop().await;
}
