//! `inferflow request`: produce requests and wait for their results, as a user would.
//!
//! Before producing, the client assigns itself every partition of the results topic(s) at their
//! current end, so no result can slip by between producing and listening.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

use crate::config::Config;
use crate::model::{InferenceRequest, InferenceResult};

/// Produces `requests` and returns their results, in the order given. Fails if a result does
/// not arrive within `timeout`.
pub async fn request_and_wait(
    config: &Config,
    requests: &[InferenceRequest],
    timeout: Duration,
) -> anyhow::Result<Vec<InferenceResult>> {
    crate::processor::preflight(config).await?;
    let mut topics: BTreeSet<String> = BTreeSet::from([config.topics.results.clone()]);
    topics.extend(requests.iter().filter_map(|r| r.reply_to.clone()));

    let consumer: StreamConsumer = crate::kafka::base_client_config(&config.kafka)
        .set(
            "group.id",
            format!("inferflow-request-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .context("creating the results consumer")?;
    let mut assignment = TopicPartitionList::new();
    for topic in &topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("reading metadata of {topic}"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            bail!(
                "topic {topic} does not exist (is `inferflow run` running? it creates its topics)"
            );
        }
        for partition in partitions {
            let (_, high) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .with_context(|| format!("reading the end of {topic}/{partition}"))?;
            assignment.add_partition_offset(topic, partition, Offset::Offset(high))?;
        }
    }
    consumer
        .assign(&assignment)
        .context("assigning the results partitions")?;

    let producer: FutureProducer = crate::kafka::producer_config(&config.kafka)
        .create()
        .context("creating the producer")?;
    for request in requests {
        let value = serde_json::to_vec(request)?;
        producer
            .send(
                FutureRecord::to(&config.topics.requests)
                    .key(&request.request_id)
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .with_context(|| format!("producing request {}", request.request_id))?;
    }

    let mut waiting: HashMap<&str, usize> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (r.request_id.as_str(), i))
        .collect();
    let mut results: Vec<Option<InferenceResult>> = vec![None; requests.len()];
    let deadline = tokio::time::Instant::now() + timeout;
    while !waiting.is_empty() {
        let message = match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(message) => message.context("reading results")?,
            Err(_) => bail!(
                "no result within {timeout:?} for {} request(s), e.g. {:?}; is `inferflow run` running?",
                waiting.len(),
                waiting.keys().next()
            ),
        };
        let Some(key) = message.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            continue;
        };
        if let Some(i) = waiting.remove(key) {
            let result: InferenceResult =
                serde_json::from_slice(message.payload().unwrap_or_default())
                    .with_context(|| format!("result for {key} is not a valid result document"))?;
            results[i] = Some(result);
        }
    }
    Ok(results.into_iter().flatten().collect())
}

/// Builds a request from command-line pieces, with a fresh request id.
pub fn build_request(
    pipeline: Option<String>,
    model: Option<String>,
    data: &str,
    parameters: Option<&str>,
) -> anyhow::Result<InferenceRequest> {
    let data: Value = serde_json::from_str(data).context("--data is not valid JSON")?;
    let parameters = match parameters {
        Some(p) => match serde_json::from_str(p).context("--parameters is not valid JSON")? {
            Value::Object(map) => Some(map),
            _ => bail!("--parameters must be a JSON object"),
        },
        None => None,
    };
    Ok(InferenceRequest {
        request_id: format!("cli-{}", uuid::Uuid::new_v4()),
        pipeline,
        model,
        data,
        parameters,
        entity: None,
        reply_to: None,
        deadline_ms: None,
        tenant: None,
    })
}

/// Reads one request per non-empty line.
pub fn read_jsonl(text: &str) -> anyhow::Result<Vec<InferenceRequest>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("line {}: not a valid request", n + 1))
        })
        .collect()
}
