//! The feature store from the library, on the embedded backend in a temporary directory: no
//! database server, nothing left behind.
//!
//! ```text
//! cargo run --example feature_store
//! ```
//!
//! It shows, in order:
//!
//! 1. versioned writes: versions 1 and 3 of a user's `profile`, then a late version 2; the
//!    highest version stays current, and version 2 is still readable from the history;
//! 2. a TTL: a `session` feature written with a 1-second TTL is there, then absent after 1.2 s;
//! 3. a feature vector of several names for one user, with the names that have no value in
//!    `missing`;
//! 4. a feature group (`fraud_signals` version 1), read for two users; creating the same
//!    version again succeeds, with another definition it is a conflict;
//! 5. invalid input refused before anything is stored;
//! 6. the in-process cache's counters.
//!
//! Every line is `label: JSON`, deterministic (ages and timestamps are left out).

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use inferflow::feature_store::{
    EmbeddedBackend, Feature, FeatureGroup, FeatureStore, FeatureUpdate, FeatureVector,
};
use serde_json::{Map, Value, json};

fn values(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(map) => map,
        _ => panic!("feature values are a JSON object"),
    }
}

/// A feature without its timestamp, which differs on every run.
fn show_feature(f: Option<&Feature>) -> Value {
    match f {
        Some(f) => json!({"name": f.name, "version": f.version, "values": f.values}),
        None => Value::Null,
    }
}

/// A vector without the ages.
fn show_vector(v: &FeatureVector) -> Value {
    let features: Map<String, Value> = v
        .features
        .iter()
        .map(|(name, f)| {
            (
                name.clone(),
                json!({"version": f.version, "values": f.values}),
            )
        })
        .collect();
    json!({"entity_id": v.entity_id, "features": features, "missing": v.missing})
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // History rows kept forever (0), a 60 s cache of at most 10,000 entries in front.
    let backend = EmbeddedBackend::open_path(dir.path(), 0).await?;
    println!(
        "opened: {}",
        json!({"file": backend.path().file_name().map(|n| n.to_string_lossy().into_owned())})
    );
    let store = FeatureStore::new(
        Arc::new(backend),
        Duration::from_secs(60),
        NonZeroUsize::new(10_000).expect("non-zero"),
    );

    // 1. Versions: the highest version wins whatever the arrival order.
    let profile = |version: u64, segment: &str| {
        FeatureUpdate::new(
            "user",
            "u1",
            "profile",
            values(json!({"country": "NL", "segment": segment})),
            version,
        )
    };
    store.set_feature(&profile(1, "silver")).await?;
    store.set_feature(&profile(3, "gold")).await?;
    store.set_feature(&profile(2, "bronze")).await?; // arrives late
    let current = store.get_feature("user", "u1", "profile").await?;
    println!("current profile: {}", show_feature(current.as_deref()));
    let v2 = store
        .get_feature_at_version("user", "u1", "profile", 2)
        .await?;
    println!("profile version 2: {}", show_feature(v2.as_ref()));

    // 2. A TTL: the session disappears after a second.
    let session = FeatureUpdate::new(
        "user",
        "u1",
        "session",
        values(json!({"clicks": 7, "device": "mobile"})),
        1,
    )
    .with_ttl_secs(1);
    store.set_feature(&session).await?;
    let fresh = store.get_feature("user", "u1", "session").await?;
    println!(
        "session right after the write: {}",
        show_feature(fresh.as_deref())
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let expired = store.get_feature("user", "u1", "session").await?;
    println!("session after 1.2 s: {}", show_feature(expired.as_deref()));

    // 3. A vector: several names at once; names without a value are listed in `missing`.
    store
        .set_feature(&FeatureUpdate::new(
            "user",
            "u1",
            "activity",
            values(json!({"orders_30d": 4, "returns_30d": 1})),
            10,
        ))
        .await?;
    let vector = store
        .get_feature_vector("user", "u1", &["profile", "activity", "session", "credit"])
        .await?;
    println!("vector u1: {}", show_vector(&vector));

    // 4. A feature group, read for a known and an unknown user.
    let group = FeatureGroup {
        name: "fraud_signals".into(),
        version: 1,
        entity_type: "user".into(),
        features: vec!["profile".into(), "activity".into(), "session".into()],
        description: "signals the fraud model reads".into(),
    };
    store.create_feature_group(&group).await?;
    store.create_feature_group(&group).await?; // the same definition again: fine
    let mut changed = group.clone();
    changed.features.push("credit".into());
    match store.create_feature_group(&changed).await {
        Ok(()) => println!("conflict: {}", json!({"refused": false})),
        Err(e) => println!(
            "conflict: {}",
            json!({"refused": true, "error": e.to_string()})
        ),
    }
    let latest = store
        .get_feature_group("fraud_signals", None)
        .await?
        .expect("the group was just created");
    println!(
        "group: {}",
        json!({"name": latest.name, "version": latest.version, "features": latest.features})
    );
    for user in ["u1", "u2"] {
        let v = store.get_feature_group_vector(&latest, user).await?;
        println!("group vector {user}: {}", show_vector(&v));
    }

    // 5. Invalid input is refused before anything is stored.
    let bad = FeatureUpdate::new("user", "u1", "session", values(json!({})), 2).with_ttl_secs(0);
    match store.set_feature(&bad).await {
        Ok(()) => println!("invalid: {}", json!({"refused": false})),
        Err(e) => println!(
            "invalid: {}",
            json!({"refused": true, "error": e.to_string()})
        ),
    }

    // 6. The cache in front of the backend.
    let stats = store.cache_stats();
    println!(
        "cache: {}",
        json!({"hits": stats.hits, "misses": stats.misses, "entries": stats.entries})
    );
    Ok(())
}
