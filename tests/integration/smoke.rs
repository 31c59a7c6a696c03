//! Smoke tests: a message round-trips through the real broker with a consumer group that
//! commits, and a row round-trips through the real CQL database with the driver inferflow uses.

use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::utils::{self, cql_keyspace, create_topic, kafka_config, unique_name};

#[tokio::test]
async fn kafka_message_round_trips_and_group_commits_its_offset() {
    utils::init_tracing();
    let topic = unique_name("smoke");
    let group = unique_name("smoke_group");
    create_topic(&topic, 2).await;

    let producer: FutureProducer = kafka_config()
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let (partition, offset) = producer
        .send(
            FutureRecord::to(&topic)
                .key("req-1")
                .payload(r#"{"request_id":"req-1"}"#)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "inferflow-test",
                    value: Some("yes"),
                })),
            Duration::from_secs(10),
        )
        .await
        .map(|d| (d.partition, d.offset))
        .expect("delivery");

    let consumer: StreamConsumer = kafka_config()
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.stream().next())
        .await
        .expect("no message within 30 s")
        .expect("stream ended")
        .expect("consume error");

    assert_eq!(message.key(), Some(&b"req-1"[..]));
    assert_eq!(message.payload(), Some(&br#"{"request_id":"req-1"}"#[..]));
    assert_eq!((message.partition(), message.offset()), (partition, offset));
    let header = message.headers().expect("headers").get(0);
    assert_eq!(
        (header.key, header.value),
        ("inferflow-test", Some(&b"yes"[..]))
    );

    // The smoke test checks the broker's group commit itself, outside inferflow's tracker.
    #[allow(clippy::disallowed_methods)]
    consumer
        .commit_message(&message, CommitMode::Sync)
        .expect("commit");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&topic, partition);
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    let element = committed
        .find_partition(&topic, partition)
        .expect("partition");
    assert_eq!(element.offset(), Offset::Offset(offset + 1));
}

#[tokio::test]
async fn cql_row_round_trips_with_ttl() {
    utils::init_tracing();
    let (session, ks) = cql_keyspace("smoke").await;
    session
        .query_unpaged(
            format!("CREATE TABLE {ks}.kv (k text PRIMARY KEY, v text, version bigint)"),
            &[],
        )
        .await
        .expect("create table");
    let insert = session
        .prepare(format!(
            "INSERT INTO {ks}.kv (k, v, version) VALUES (?, ?, ?) USING TTL 600"
        ))
        .await
        .expect("prepare insert");
    session
        .execute_unpaged(&insert, ("user:1", "hello", 7_i64))
        .await
        .expect("insert");

    let rows = session
        .query_unpaged(
            format!("SELECT v, version, TTL(v) FROM {ks}.kv WHERE k = ?"),
            ("user:1",),
        )
        .await
        .expect("select")
        .into_rows_result()
        .expect("rows");
    let (v, version, ttl): (String, i64, Option<i32>) = rows.single_row().expect("one row");
    assert_eq!((v.as_str(), version), ("hello", 7));
    let ttl = ttl.expect("a TTL was set");
    assert!((1..=600).contains(&ttl), "TTL {ttl} out of range");

    session
        .query_unpaged(format!("DROP KEYSPACE {ks}"), &[])
        .await
        .expect("drop keyspace");
}
