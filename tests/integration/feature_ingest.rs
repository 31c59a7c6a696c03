//! Feature ingestion and cache coherence against the real broker and database: updates from
//! Kafka converge to the highest version whatever their order, invalid ones are dead-lettered,
//! offsets are committed only behind writes, and an update ingested by one instance reaches a
//! cached read on another within the documented bound (1 s from the update's production).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{
    FeatureEnv, Instance, Raw, collect, committed_total, eventually, produce, update,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingested_updates_converge_to_the_highest_version_and_invalid_ones_are_dead_lettered() {
    let env = FeatureEnv::create("ingest", 3).await;
    let config = env.config("");
    let instance = Instance::start(&config, true, false).await;

    // Per entity, versions out of order and replayed; the highest (7) must win.
    let mut records: Vec<Raw> = Vec::new();
    for e in 0..200 {
        let entity = format!("e{e}");
        for v in [5, 3, 7, 7, 1, 6] {
            records.push(update(&entity, "score", v, json!(e)));
        }
    }
    // A feature whose version defaults to the record's timestamp.
    records.push(update("ts", "clicks", 0, json!(null)));
    // Invalid updates: each must be dead-lettered with its kind.
    let invalid: Vec<(Raw, &str)> = vec![
        ((Some(b"bad".to_vec()), Some(b"{not json".to_vec())), "invalid_json"),
        ((None, Some(br#"{"entity_type":"user","entity_id":"x","feature":"f","values":[1]}"#.to_vec())), "invalid_request"),
        ((None, Some(br#"{"entity_type":"","entity_id":"x","feature":"f","values":{}}"#.to_vec())), "invalid_request"),
        ((None, Some(br#"{"entity_type":"user","entity_id":"x","feature":"f","values":{},"version":9007199254740992}"#.to_vec())), "invalid_request"),
        ((Some(b"null-value".to_vec()), None), "invalid_json"),
    ];
    records.extend(invalid.iter().map(|(raw, _)| raw.clone()));
    let total = records.len() as i64;
    produce(&env.features, &records).await;

    // Offsets are committed behind the writes: once all are committed, every write is stored.
    eventually(Duration::from_secs(60), "all updates committed", || async {
        committed_total(&env.group, &env.features, 3) == total
    })
    .await;
    let backend = Arc::clone(instance.store.backend());
    for e in 0..200 {
        let f = backend
            .get_feature("user", &format!("e{e}"), "score")
            .await
            .expect("read")
            .unwrap_or_else(|| panic!("e{e} missing"));
        assert_eq!(f.version, 7, "e{e}");
        assert_eq!(f.values["v"], json!(7));
        assert_eq!(f.values["extra"], json!(e));
        // Older versions stay readable by version.
        let old = backend
            .get_feature_at_version("user", &format!("e{e}"), "score", 3)
            .await
            .expect("history read")
            .expect("version 3 kept");
        assert_eq!(old.values["v"], json!(3));
    }
    let ts = backend
        .get_feature("user", "ts", "clicks")
        .await
        .expect("read")
        .expect("stored");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(
        ts.version > now_ms - 600_000 && ts.version <= now_ms,
        "version {} should default to the record's timestamp (now {now_ms})",
        ts.version
    );
    assert_eq!(ts.updated_at_ms, ts.version);

    let dead = collect(
        &[&env.dlq],
        invalid.len(),
        Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        dead.len(),
        invalid.len(),
        "one dead letter per invalid update"
    );
    let mut kinds: Vec<&str> = dead
        .iter()
        .map(|d| d.headers["inferflow-error-kind"].as_str())
        .collect();
    kinds.sort_unstable();
    let mut expected: Vec<&str> = invalid.iter().map(|(_, k)| *k).collect();
    expected.sort_unstable();
    assert_eq!(kinds, expected);
    for d in &dead {
        assert_eq!(d.headers["inferflow-source-topic"], env.features);
        // A null value is dead-lettered as an empty one (as the processor does).
        let bytes = |v: &Option<Vec<u8>>| v.clone().unwrap_or_default();
        assert!(
            invalid
                .iter()
                .any(|((k, v), _)| k == &d.key && bytes(v) == bytes(&d.value)),
            "dead letters carry the original key and bytes: {d:?}"
        );
    }
    instance.stop().await;
    env.drop_keyspace().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_ingested_by_one_instance_reaches_a_cached_read_on_another_within_a_second() {
    let env = FeatureEnv::create("coherence", 1).await;
    let config = env.config("");
    // A ingests; B only reads, with the listener; C reads without it (the control).
    let a = Instance::start(&config, true, true).await;
    let b = Instance::start(&config, false, true).await;
    let c = Instance::start(&config, false, false).await;
    // Let the listeners reach the end of the invalidation topic before the first write.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut delays = Vec::new();
    for round in 1..=5u64 {
        let version = round * 10;
        if round > 1 {
            // B serves the previous version from its cache.
            for _ in 0..2 {
                let cached = b
                    .store
                    .get_feature("user", "u1", "profile")
                    .await
                    .expect("read")
                    .expect("present");
                assert_eq!(cached.version, version - 10);
            }
        }
        produce(
            &env.features,
            &[update("u1", "profile", version, json!(round))],
        )
        .await;
        // From the producer's acknowledgement: A consumes and writes the update, announces it,
        // and B, which caches the previous version, drops it and reads the new one. B is
        // polled through its cache, which serves the old version until the announcement.
        let written = Instant::now();
        loop {
            let f = b
                .store
                .get_feature("user", "u1", "profile")
                .await
                .expect("read")
                .expect("present");
            if f.version == version {
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(1),
                "round {round}: instance B still serves version {} {:?} after the update was produced",
                f.version,
                written.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        delays.push(written.elapsed());
        // ...while C, with no listener, keeps its cached value until its TTL (5 min).
        let seen_by_c = c
            .store
            .get_feature("user", "u1", "profile")
            .await
            .expect("read")
            .expect("present")
            .version;
        if round > 1 {
            assert_eq!(
                seen_by_c,
                version - 10,
                "without invalidations the cache keeps the old version"
            );
        }
        c.store.invalidate("user", "u1", "profile");
        c.store
            .get_feature("user", "u1", "profile")
            .await
            .expect("read");
    }
    let stats = b.store.cache_stats();
    assert!(
        stats.hits > 0,
        "B's reads were served from its cache: {stats:?}"
    );
    assert!(
        stats.invalidations >= 4,
        "B dropped its cached value on each newer write: {stats:?}"
    );
    eprintln!("update produced -> visible on instance B: {delays:?}");
    for i in [a, b, c] {
        i.stop().await;
    }
    env.drop_keyspace().await;
}
