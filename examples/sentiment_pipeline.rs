//! A pipeline defined in TOML and run from Rust: clean the text, score it with the local VADER
//! model (`sentiment@1`, `models/vader/`), then turn the score into a decision.
//!
//! ```text
//! cargo run --example sentiment_pipeline
//! cargo run --example sentiment_pipeline -- "  What a   GREAT day! "
//! ```
//!
//! The pipeline (the TOML below, the same format as `config/pipelines/*.toml`):
//!
//! 1. `clean` (preprocess): control characters out, NFKC, whitespace collapsed, trimmed. Its
//!    output is recorded in the result's step records (`record_output = true`).
//! 2. `model:sentiment@1`: scores `data.text` and puts VADER's answer at `data.scores`.
//! 3. `decide` (postprocess): a compound score of 0.5 or more makes the text a `testimonial`
//!    candidate, anything else is `skip`; then the fields are picked into a flat object.
//!
//! For each input it prints `input: ...`, then `output: {JSON}` (or `error: ...`), then one
//! `step NAME latency_us=N cached=BOOL` line per step. Everything but the latencies is
//! deterministic.

use std::sync::Arc;

use inferflow::pipeline::{PipelineManager, def};
use inferflow::providers::manager::{ModelManager, ModelSpec};
use inferflow::providers::{
    LocalConfig, LocalModelConfig, LocalModelKind, LocalProvider, ProviderInput,
};
use serde_json::{Value, json};

const PIPELINE: &str = r#"
id = "review_sentiment"
description = "Cleaned review text scored by VADER; strong praise becomes a testimonial candidate"

[[steps]]
type = "preprocess"
name = "clean"
transforms = [{ op = "clean", field = "text", max_chars = 2000 }]
record_output = true

[[steps]]
type = "model"
model = "sentiment@1"
input = "data.text"
into = "scores"
timeout_ms = 2000
retries = 1

[[steps]]
type = "postprocess"
name = "decide"
transforms = [
  { op = "threshold", field = "scores.compound", threshold = 0.5, above = "testimonial", below = "skip", into = "use" },
  { op = "object", fields = { text = "data.text", sentiment = "data.scores.label", compound = "data.scores.compound", use = "data.use" } },
]
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = LocalConfig::default();
    config.models.insert(
        "vader".into(),
        LocalModelConfig {
            kind: LocalModelKind::Vader,
            path: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/vader"),
        },
    );
    let models = Arc::new(ModelManager::new());
    models.register_provider("local", Arc::new(LocalProvider::new(config)?));
    models
        .load_model_with_warmup(
            ModelSpec::new("sentiment", "1", "local", "vader"),
            ProviderInput::new(json!("warm up")),
        )
        .await?;

    // `def::parse` reports every unknown key with its path; `toml::from_str` would also do.
    let definition = def::parse(
        PIPELINE,
        "review_sentiment",
        "examples/sentiment_pipeline.rs",
    )
    .map_err(|errors| anyhow::anyhow!("{errors:?}"))?;
    let pipelines = PipelineManager::new(models);
    // Validated against the loaded models: a misspelt model id would fail here, not later.
    pipelines.create_pipeline(definition)?;
    println!("pipelines: {}", pipelines.pipeline_ids().join(", "));

    let given: Vec<Value> = std::env::args()
        .skip(1)
        .map(|t| json!({ "text": t }))
        .collect();
    let inputs = if given.is_empty() {
        vec![
            json!({"text": "  What a   GREAT day!\t\tBest concert ever.  "}),
            json!({"text": "The food was great but the service was TERRIBLE!!"}),
            json!({"text": "It arrived on Tuesday."}),
            json!({"text": "Worst. Purchase. Ever. Broken in two days."}),
            json!({"txt": "a typo in the field name"}),
        ]
    } else {
        given
    };
    for input in inputs {
        println!("input: {input}");
        match pipelines.execute("review_sentiment", input).await {
            Ok(out) => {
                println!("output: {}", out.output);
                for step in &out.steps {
                    print!(
                        "  step {} latency_us={} cached={}",
                        step.name, step.latency_us, step.cached
                    );
                    match &step.output {
                        Some(recorded) => println!(" output={recorded}"),
                        None => println!(),
                    }
                }
            }
            Err(error) => println!("error: {error}"),
        }
    }
    Ok(())
}
