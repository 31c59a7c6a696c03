//! The replay store's database tier (`replay.store = "cql"`) against the real CQL database:
//! what it stores and reuses, by consumer group and message fingerprint, and its marks.

use std::time::Duration;

use inferflow::config::Config;
use inferflow::executor::ExecOutput;
use inferflow::model::StepRecord;
use inferflow::replay::cql::CqlReplay;
use inferflow::replay::{Redelivery, ReplayStore, fingerprint};
use serde_json::json;

use crate::utils::{cql_contact, cql_session, unique_name};

fn config(keyspace: &str, group: &str) -> Config {
    Config::from_toml_str(&format!(
        "[kafka]\ngroup_id = \"{group}\"\n[feature_store]\ncontact_points = [\"{}\"]\nkeyspace = \"{keyspace}\"\n[replay]\nstore = \"cql\"\nttl_secs = 3600\n",
        cql_contact()
    ))
    .expect("config")
}

fn output(v: i64) -> ExecOutput {
    ExecOutput {
        output: json!({ "label": "positive", "v": v }),
        model_version: Some("sentiment@1".into()),
        cached: false,
        steps: vec![StepRecord {
            name: "model:sentiment@1".into(),
            latency_us: 1234,
            cached: false,
            output: None,
            features: Vec::new(),
        }],
    }
}

#[tokio::test]
async fn stored_outputs_are_reused_only_for_the_same_group_id_and_bytes() {
    drop(cql_session().await); // fails with the command to start the database
    let keyspace = unique_name("replay_it");
    let cfg = config(&keyspace, "g1");
    let a = CqlReplay::open(&cfg.feature_store, "g1", 3600)
        .await
        .expect("open (creates the schema)");
    let other_group = CqlReplay::open(&cfg.feature_store, "g2", 3600)
        .await
        .expect("open");

    let bytes = fingerprint(br#"{"request_id":"r1","data":1}"#);
    let other_bytes = fingerprint(br#"{"request_id":"r1","data":2}"#);
    assert!(a.get("r1", bytes).await.expect("read").is_none());
    a.put("r1", bytes, &output(1)).await.expect("write");
    assert_eq!(
        a.get("r1", bytes).await.expect("read"),
        Some(output(1)),
        "the whole output comes back: document, model version, steps"
    );
    assert!(
        a.get("r1", other_bytes).await.expect("read").is_none(),
        "a different request reusing the id is not served the stored answer"
    );
    assert!(
        other_group.get("r1", bytes).await.expect("read").is_none(),
        "another consumer group never sees this group's results"
    );

    // Marks: 0 when none, and the highest offset wins whatever the order of the writes.
    assert_eq!(a.mark("t", 0).await.expect("mark"), 0);
    a.set_mark("t", 0, 500).await.expect("mark write");
    a.set_mark("t", 0, 200).await.expect("mark write");
    assert_eq!(a.mark("t", 0).await.expect("mark"), 500);
    assert_eq!(a.mark("t", 1).await.expect("mark"), 0);
    assert_eq!(other_group.mark("t", 0).await.expect("mark"), 0);

    // Rows carry the configured TTL.
    let session = cql_session().await;
    let rows = session
        .query_unpaged(
            format!(
                "SELECT TTL(output_json) FROM {keyspace}.replay_results WHERE consumer_group = 'g1' AND request_id = 'r1'"
            ),
            &[],
        )
        .await
        .expect("select")
        .into_rows_result()
        .expect("rows");
    let (ttl,) = rows.first_row::<(Option<i32>,)>().expect("row");
    let ttl = ttl.expect("a TTL");
    assert!((3000..=3600).contains(&ttl), "TTL {ttl}");
}

#[tokio::test]
async fn only_records_below_the_mark_are_looked_up_and_marks_are_read_again_on_assignment() {
    drop(cql_session().await);
    let keyspace = unique_name("replay_it");
    let cfg = config(&keyspace, "g");
    let store = ReplayStore::open(&cfg.replay, &cfg.feature_store, &cfg.kafka.group_id)
        .await
        .expect("open")
        .expect("enabled");
    assert!(store.is_durable());

    // An earlier process stored r0..r9 of partition 0 (offsets 0..9) and moved the mark.
    let ids: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
    let fp = |i: usize| fingerprint(format!("payload {i}").as_bytes());
    store
        .keep(
            (0..10)
                .map(|i| (ids[i].clone(), fp(i), output(i as i64)))
                .collect(),
            vec![("t".into(), 0, 10)],
        )
        .await;
    let direct = CqlReplay::open(&cfg.feature_store, "g", 3600)
        .await
        .expect("open");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while direct.mark("t", 0).await.expect("mark") < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "the mark was not written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let record = |i: usize, offset: i64| Redelivery {
        topic: "t",
        partition: 0,
        offset,
        id: &ids[i],
        fingerprint: fp(i),
    };
    // r3 at offset 3 lies below the mark: found. r4 at offset 10 is a new record: not looked
    // up, even though an output with its id and bytes is stored.
    let found = store.get_redelivered(&[record(3, 3), record(4, 10)]).await;
    assert_eq!(found, vec![Some(output(3)), None]);

    // The mark is cached for the assignment: moved by another instance meanwhile, it is seen
    // only after the partition is assigned again.
    direct.put("r5", fp(5), &output(55)).await.expect("write");
    direct.set_mark("t", 0, 20).await.expect("mark");
    assert_eq!(store.get_redelivered(&[record(5, 15)]).await, vec![None]);
    store.assigned(&[("t".into(), 0)]);
    assert_eq!(
        store.get_redelivered(&[record(5, 15)]).await,
        vec![Some(output(55))]
    );
}
