//! Sentiment analysis with the local VADER model, and iris classification with the local ONNX
//! model, through the same `ModelExecutor` the stream processor drives. No network, no Kafka,
//! no Python:
//!
//! ```text
//! cargo run --example sentiment
//! cargo run --example sentiment -- "The delivery was late but the support was great."
//! ```
//!
//! Both models ship in `models/`: `models/vader/` (the VADER lexicon) and `models/iris/` (a
//! logistic regression exported to ONNX). Each is loaded with a warm-up call, so the first
//! request does not pay for reading and optimising it.

use std::path::PathBuf;
use std::sync::Arc;

use inferflow::executor::{ExecRequest, Executor};
use inferflow::model::Target;
use inferflow::providers::manager::{ModelExecutor, ModelManager, ModelSpec};
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

async fn run(executor: &ModelExecutor, model: &str, data: Vec<Value>) {
    println!("model {model}:");
    let requests: Vec<ExecRequest> = data
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, d)| request(i, d))
        .collect();
    // What the processor does: admit the batch (rate limits, breaker, reload), then execute
    // it. Here nothing limits, so admit returns at once.
    let target = Target::Model(model.into());
    executor.admit(&target, requests.len()).await;
    let outcomes = executor.execute(&target, requests).await;
    for (input, outcome) in data.iter().zip(outcomes) {
        match outcome {
            Ok(out) => println!("  {input}\n    -> {}", out.output),
            Err(error) => println!("  {input}\n    -> error {error}"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    let manager = Arc::new(ModelManager::new());
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
    let executor = ModelExecutor::new(Arc::clone(&manager));

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
    run(&executor, "sentiment", texts).await;
    run(
        &executor,
        "iris",
        vec![
            json!({"features": [5.1, 3.5, 1.4, 0.2]}),
            json!({"features": {"sepal_length_cm": 6.7, "sepal_width_cm": 3.0,
                                "petal_length_cm": 5.2, "petal_width_cm": 2.3}}),
            json!({"features": [6.0, 2.7, 4.1]}),
        ],
    )
    .await;
    Ok(())
}
