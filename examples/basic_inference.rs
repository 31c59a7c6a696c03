//! Predictions from real local models through the library, with no Kafka, no network and no
//! Python: a [`ModelManager`] with the local provider, two models loaded from `models/`, and
//! [`ModelManager::infer`] on a few inputs.
//!
//! ```text
//! cargo run --example basic_inference
//! cargo run --example basic_inference -- "The delivery was late but the support was great."
//! ```
//!
//! - `sentiment@1` is the VADER sentiment analyser (rules over the lexicon in
//!   `models/vader/`), answering `{"label", "compound", "scores"}`.
//! - `iris@1` is a logistic regression exported to ONNX (`models/iris/`), answering
//!   `{"label", "scores"}` for four flower measurements.
//!
//! Each model is loaded with a warm-up call, so the first request does not pay for reading and
//! optimising it. A bad input fails on its own; the others in the batch are answered.
//!
//! Output: for each input, a line `input -> output` (or `-> error KIND: message`), then the
//! per-model statistics.

use std::path::PathBuf;
use std::sync::Arc;

use inferflow::executor::ExecRequest;
use inferflow::providers::manager::{ModelManager, ModelSpec};
use inferflow::providers::{
    LocalConfig, LocalModelConfig, LocalModelKind, LocalProvider, ProviderInput,
};
use serde_json::{Value, json};

fn request(i: usize, data: Value) -> ExecRequest {
    ExecRequest {
        request_id: format!("r{i}"),
        data,
        parameters: None,
        entity: None,
        tenant: None,
    }
}

/// Runs `inputs` through `model` as one batch and prints one line per input.
async fn predict(manager: &ModelManager, model: &str, inputs: Vec<Value>) {
    println!("model {model}:");
    let requests = inputs
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, d)| request(i, d))
        .collect();
    let outcomes = manager.infer(model, requests).await;
    for (input, outcome) in inputs.iter().zip(outcomes) {
        match outcome {
            Ok(out) => println!("  {input} -> {}", out.output),
            Err(error) => println!("  {input} -> error {error}"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The local provider knows models by a name of its own ("vader", "iris") and where their
    // files are; the manager then serves them as `name@version`.
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
    let mut config = LocalConfig::default();
    config.models.insert(
        "vader".into(),
        LocalModelConfig {
            kind: LocalModelKind::Vader,
            path: models.join("vader"),
        },
    );
    config.models.insert(
        "iris".into(),
        LocalModelConfig {
            kind: LocalModelKind::Onnx,
            path: models.join("iris"),
        },
    );
    let manager = ModelManager::new();
    manager.register_provider("local", Arc::new(LocalProvider::new(config)?));
    manager
        .load_model_with_warmup(
            ModelSpec::new("sentiment", "1", "local", "vader"),
            ProviderInput::new(json!("warm up")),
        )
        .await?;
    manager
        .load_model_with_warmup(
            ModelSpec::new("iris", "1", "local", "iris"),
            ProviderInput::new(json!({"features": [5.1, 3.5, 1.4, 0.2]})),
        )
        .await?;
    println!("loaded: {}", manager.model_ids().join(", "));

    let given: Vec<Value> = std::env::args().skip(1).map(Value::String).collect();
    let texts = if given.is_empty() {
        vec![
            json!("The book was good."),
            json!("The food was great but the service was TERRIBLE!!"),
            json!({"text": "Not bad at all :)"}),
            json!("The meeting is at noon."),
            json!(42),
        ]
    } else {
        given
    };
    predict(&manager, "sentiment@1", texts).await;
    // A bare name resolves to the highest loaded version.
    predict(
        &manager,
        "iris",
        vec![
            json!({"features": [5.1, 3.5, 1.4, 0.2]}),
            json!({"features": {"sepal_length_cm": 6.7, "sepal_width_cm": 3.0,
                                "petal_length_cm": 5.2, "petal_width_cm": 2.3}}),
            json!({"features": [6.0, 2.7, 4.1]}),
        ],
    )
    .await;

    println!("stats:");
    for (id, s) in manager.all_stats() {
        println!(
            "  {id}: {} requests, {} errors, {} provider calls",
            s.requests, s.errors, s.provider_calls
        );
    }
    Ok(())
}
