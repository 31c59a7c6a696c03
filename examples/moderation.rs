//! Content moderation with the shipped pipelines: `config/pipelines/moderation.toml` chains
//! `config/pipelines/sentiment.toml` (clean the text, score it with the local VADER model,
//! label it) and then decides: a compound score below -0.5 sends the text to `review`,
//! anything else is `allow`ed.
//!
//! ```text
//! cargo run --example moderation
//! cargo run --example moderation -- "Some text to check" "Another one"
//! ```
//!
//! **VADER negativity is only a proxy for "needs moderation".** VADER is a sentiment lexicon,
//! not a toxicity or abuse classifier: it sends strong negativity to review (including
//! harmless complaints) and lets through hostile text written without negative words; the
//! list below includes a threat it allows. The point is the shape (files loaded with
//! `load_dir`, pipeline chaining, a threshold decision, a default on error), which stays the
//! same with a real moderation model behind an OpenAI-compatible or Hugging Face provider.
//!
//! Output: one `DECISION compound=X label=L: TEXT` line per text, then `counts: {JSON}`.
//! Deterministic.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use inferflow::executor::ExecRequest;
use inferflow::pipeline::{PipelineManager, load_dir};
use inferflow::providers::manager::{ModelManager, ModelSpec};
use inferflow::providers::{
    LocalConfig, LocalModelConfig, LocalModelKind, LocalProvider, ProviderInput,
};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut config = LocalConfig::default();
    config.models.insert(
        "vader".into(),
        LocalModelConfig {
            kind: LocalModelKind::Vader,
            path: root.join("models/vader"),
        },
    );
    // The model the shipped pipelines call, as `config/models.example.toml` declares it.
    let models = Arc::new(ModelManager::new());
    models.register_provider("local", Arc::new(LocalProvider::new(config)?));
    models
        .load_model_with_warmup(
            ModelSpec::new("sentiment", "1", "local", "vader"),
            ProviderInput::new(json!("warm up")),
        )
        .await?;

    // Every pipeline file in the directory, validated together (chaining, models, cycles).
    let defs = load_dir(&root.join("config/pipelines")).map_err(|problems| {
        anyhow::anyhow!(
            "{}",
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    let pipelines = PipelineManager::new(models);
    pipelines.replace_all(None, defs)?;
    println!("pipelines: {}", pipelines.pipeline_ids().join(", "));

    let given: Vec<String> = std::env::args().skip(1).collect();
    let texts: Vec<String> = if given.is_empty() {
        [
            "Thanks for the quick reply, this fixed it.",
            "This is awful, I hate it.",
            "You are a pathetic idiot and your code is garbage.",
            "The update broke my build again.",
            "What a terrible, horrible, no good, very bad day.",
            "I know where you live.",
            "Not bad at all, honestly!",
            "   ",
        ]
        .map(String::from)
        .to_vec()
    } else {
        given
    };
    let requests = texts
        .iter()
        .enumerate()
        .map(|(i, t)| ExecRequest {
            request_id: format!("m{i}"),
            data: json!({ "text": t }),
            parameters: None,
            entity: None,
            tenant: None,
        })
        .collect();
    // One batch: the chained sentiment pipeline makes one model call for all of them.
    let outcomes = pipelines.execute_batch("moderation", requests).await;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (text, outcome) in texts.iter().zip(outcomes) {
        match outcome {
            Ok(out) => {
                let decision = out.output["decision"].as_str().unwrap_or("?").to_owned();
                println!(
                    "{decision} compound={} label={}: {text:?}",
                    out.output["compound"],
                    out.output["label"].as_str().unwrap_or("?"),
                );
                *counts.entry(decision).or_default() += 1;
            }
            Err(error) => {
                println!("error {error}: {text:?}");
                *counts.entry("error".into()).or_default() += 1;
            }
        }
    }
    println!("counts: {}", json!(counts));
    Ok(())
}
