//! Batch recommendations driven by feature groups: user tastes and item vectors live in the
//! feature store (embedded backend, temporary directory), a pipeline reads them by group and a
//! Rust transform scores every candidate item for every user.
//!
//! ```text
//! cargo run --example recommendations
//! ```
//!
//! Two pipelines, defined in TOML below:
//!
//! - `recommend` reads the user's `user_taste` group (`taste` vector, `profile`), runs
//!   `score_item` on each candidate with a `map` step (into `scored`), then ranks with the
//!   custom transform `top_k` (`k` comes from the request's parameters).
//! - `score_item` runs on one candidate id: it reads the item's `item_card` group (`embedding`
//!   with its vector and title, `stats` with its popularity) and scores it with the custom
//!   transform `dot_score`: the dot product of the user's taste vector and the item's vector.
//!   A map element starts with its parent's features, so the user's taste is in scope.
//!
//! A user without a taste vector (cold start) gets the most popular items instead; an item
//! without features is skipped and listed. A request without a user id fails on its own; the
//! others in the batch are answered. All users go through `execute_batch` as one batch.
//!
//! Output: per user one `top USER: {JSON}` line (items best first, scores rounded to 4
//! decimals) and a readable line under it; `error: ...` for a failed request.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use inferflow::executor::ExecRequest;
use inferflow::feature_store::{EmbeddedBackend, FeatureGroup, FeatureStore, FeatureUpdate};
use inferflow::pipeline::{PipelineManager, TransformContext, def};
use inferflow::providers::manager::ModelManager;
use serde_json::{Map, Value, json};

const RECOMMEND: &str = r#"
id = "recommend"
description = "Top-k candidate items for a user, by taste (or popularity for new users)"

[[steps]]
type = "features"
group = "user_taste"
entity_id = "data.user_id"

[[steps]]
type = "map"
over = "candidates"
into = "scored"
concurrency = 8
step = { type = "pipeline", pipeline = "score_item" }

[[steps]]
type = "postprocess"
name = "rank"
transforms = [{ op = "custom", name = "top_k" }]
"#;

const SCORE_ITEM: &str = r#"
id = "score_item"
description = "Score one candidate item id against the user's taste"

[[steps]]
type = "features"
group = "item_card"
entity_id = "data"

[[steps]]
type = "postprocess"
name = "score"
transforms = [{ op = "custom", name = "dot_score" }]
"#;

/// Catalogue: id, title, vector over (sci-fi, romance, cooking, travel), popularity.
const ITEMS: [(&str, &str, [f64; 4], f64); 7] = [
    ("i1", "Dune", [0.9, 0.1, 0.0, 0.3], 0.90),
    ("i2", "The Martian", [0.8, 0.0, 0.1, 0.2], 0.70),
    ("i3", "Pride and Prejudice", [0.0, 0.9, 0.1, 0.2], 0.80),
    ("i4", "Salt Fat Acid Heat", [0.0, 0.1, 0.9, 0.1], 0.60),
    ("i5", "Lonely Planet Japan", [0.1, 0.0, 0.2, 0.9], 0.50),
    (
        "i6",
        "The Hitchhiker's Guide to the Galaxy",
        [0.7, 0.2, 0.0, 0.5],
        0.85,
    ),
    ("i7", "Me Before You", [0.0, 0.8, 0.0, 0.3], 0.40),
];

/// Users with a taste vector; `u3` has only a profile (a new user).
const TASTES: [(&str, [f64; 4]); 2] = [("u1", [1.0, 0.0, 0.1, 0.4]), ("u2", [0.0, 0.9, 0.5, 0.1])];

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn numbers(v: Option<&Value>) -> Option<Vec<f64>> {
    v?.as_array()?.iter().map(Value::as_f64).collect()
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// `dot_score`: `data` is an item id; the item's and the user's features are in the context.
fn dot_score(data: Value, ctx: &TransformContext<'_>) -> Result<Value, String> {
    let item = data.as_str().ok_or("a candidate is an item id")?.to_owned();
    let Some(embedding) = ctx.features.get("embedding").filter(|v| !v.is_null()) else {
        return Ok(json!({"item": item, "score": null, "reason": "no item features"}));
    };
    let title = embedding.get("title").cloned().unwrap_or(Value::Null);
    let item_vector = numbers(embedding.get("vector")).ok_or("item vector is not numbers")?;
    let taste = ctx
        .features
        .get("taste")
        .and_then(|t| numbers(t.get("vector")));
    let (score, basis) = match taste {
        Some(user) if user.len() == item_vector.len() => (
            user.iter()
                .zip(&item_vector)
                .map(|(a, b)| a * b)
                .sum::<f64>(),
            "taste",
        ),
        Some(_) => return Err("taste and item vectors differ in length".into()),
        None => (
            ctx.features
                .get("stats")
                .and_then(|s| s.get("popularity"))
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
            "popularity",
        ),
    };
    Ok(json!({"item": item, "title": title, "score": round4(score), "basis": basis}))
}

/// `top_k`: ranks `data.scored`, best first, ties by item id; keeps `parameters.k` (3).
fn top_k(data: Value, ctx: &TransformContext<'_>) -> Result<Value, String> {
    let k = ctx
        .parameters
        .and_then(|p| p.get("k"))
        .and_then(Value::as_u64)
        .unwrap_or(3) as usize;
    let scored = data
        .get("scored")
        .and_then(Value::as_array)
        .ok_or("no scored candidates")?;
    let (mut ranked, skipped): (Vec<&Value>, Vec<&Value>) =
        scored.iter().partition(|s| s["score"].is_number());
    ranked.sort_by(|a, b| {
        let (sa, sb) = (a["score"].as_f64(), b["score"].as_f64());
        sb.partial_cmp(&sa)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a["item"].as_str().cmp(&b["item"].as_str()))
    });
    let basis = ranked
        .first()
        .map(|s| s["basis"].clone())
        .unwrap_or(Value::Null);
    let top: Vec<Value> = ranked
        .into_iter()
        .take(k)
        .map(|s| json!({"item": s["item"], "title": s["title"], "score": s["score"]}))
        .collect();
    Ok(json!({
        "user": data.get("user_id").cloned().unwrap_or(Value::Null),
        "basis": basis,
        "top": top,
        "skipped": skipped.iter().map(|s| s["item"].clone()).collect::<Vec<_>>(),
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let backend = EmbeddedBackend::open_path(dir.path(), 0).await?;
    let store = Arc::new(FeatureStore::new(
        Arc::new(backend),
        Duration::from_secs(60),
        NonZeroUsize::new(10_000).expect("non-zero"),
    ));

    // The features, as an ingestion job would have written them.
    let mut updates = Vec::new();
    for (id, title, vector, popularity) in ITEMS {
        updates.push(FeatureUpdate::new(
            "item",
            id,
            "embedding",
            obj(json!({"title": title, "vector": vector})),
            1,
        ));
        updates.push(FeatureUpdate::new(
            "item",
            id,
            "stats",
            obj(json!({ "popularity": popularity })),
            1,
        ));
    }
    for (id, vector) in TASTES {
        updates.push(FeatureUpdate::new(
            "user",
            id,
            "taste",
            obj(json!({ "vector": vector })),
            1,
        ));
    }
    for id in ["u1", "u2", "u3"] {
        updates.push(FeatureUpdate::new(
            "user",
            id,
            "profile",
            obj(json!({"segment": "reader"})),
            1,
        ));
    }
    for outcome in store.set_features(&updates).await {
        outcome?;
    }
    for (name, entity_type, features) in [
        ("user_taste", "user", vec!["taste", "profile"]),
        ("item_card", "item", vec!["embedding", "stats"]),
    ] {
        store
            .create_feature_group(&FeatureGroup {
                name: name.into(),
                version: 1,
                entity_type: entity_type.into(),
                features: features.into_iter().map(String::from).collect(),
                description: String::new(),
            })
            .await?;
    }
    println!(
        "stored: {} features of {} items and 3 users",
        updates.len(),
        ITEMS.len()
    );

    // No model here: the scoring is a Rust transform. Attach the store before creating
    // pipelines with `features` steps, and register transforms before the pipelines that use
    // them.
    let pipelines =
        PipelineManager::new(Arc::new(ModelManager::new())).with_feature_store(Arc::clone(&store));
    pipelines.register_transform("dot_score", dot_score);
    pipelines.register_transform("top_k", top_k);
    let parse = |text: &str, stem: &str| {
        def::parse(text, stem, "examples/recommendations.rs")
            .map_err(|errors| anyhow::anyhow!("{errors:?}"))
    };
    // Both at once: `recommend` refers to `score_item`.
    pipelines.replace_all(
        None,
        vec![
            parse(SCORE_ITEM, "score_item")?,
            parse(RECOMMEND, "recommend")?,
        ],
    )?;

    // i9 is not in the catalogue: it has no features.
    let candidates = json!(["i1", "i2", "i3", "i4", "i5", "i6", "i7", "i9"]);
    let mut parameters = Map::new();
    parameters.insert("k".into(), json!(3));
    let requests: Vec<ExecRequest> = [json!("u1"), json!("u2"), json!("u3"), Value::Null]
        .into_iter()
        .enumerate()
        .map(|(n, user)| {
            let mut data = json!({ "candidates": candidates });
            if !user.is_null() {
                data["user_id"] = user;
            }
            ExecRequest {
                request_id: format!("r{n}"),
                data,
                parameters: Some(parameters.clone()),
                entity: None,
                tenant: None,
            }
        })
        .collect();
    let n = requests.len();
    let outcomes = pipelines.execute_batch("recommend", requests).await;
    println!(
        "batch: {n} requests, {} answered",
        outcomes.iter().filter(|o| o.is_ok()).count()
    );
    for outcome in outcomes {
        match outcome {
            Ok(out) => {
                let user = out.output["user"].as_str().unwrap_or("?").to_owned();
                println!("top {user}: {}", out.output);
                let list: Vec<String> = out.output["top"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        format!(
                            "{} {} ({})",
                            t["item"].as_str().unwrap_or("?"),
                            t["title"].as_str().unwrap_or("?"),
                            t["score"]
                        )
                    })
                    .collect();
                println!(
                    "  {user} by {}: {}",
                    out.output["basis"].as_str().unwrap_or("?"),
                    list.join(", ")
                );
            }
            Err(error) => println!("error: {error}"),
        }
    }
    Ok(())
}
