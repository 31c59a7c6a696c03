//! Batch processing of a list: 100 flower measurements (plus two malformed rows) through an
//! iris classification pipeline with one `execute_batch` call, then counts per label and the
//! throughput.
//!
//! ```text
//! cargo run --example batch_list
//! ```
//!
//! The model is the real ONNX classifier in `models/iris/` (logistic regression, 93 % accuracy
//! on held-out rows), run in process by tract. The pipeline's model step sends the whole batch
//! to the model as **one** `[N, 4]` run; the malformed rows fail on their own and the rest are
//! answered. The measurements are a deterministic sweep from a typical setosa through a typical
//! versicolor to a typical virginica (not real flowers), so the counts are the same on every
//! run.
//!
//! Output: `labels: {JSON}` (counts per label), `errors: N` with each error, `provider calls:
//! N` (from the model's statistics), and a throughput line (varies with the machine).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use inferflow::executor::ExecRequest;
use inferflow::pipeline::{PipelineDef, PipelineManager};
use inferflow::providers::manager::{ModelManager, ModelSpec};
use inferflow::providers::{
    LocalConfig, LocalModelConfig, LocalModelKind, LocalProvider, ProviderInput,
};
use serde_json::{Value, json};

const PIPELINE: &str = r#"
id = "iris_label"

[[steps]]
type = "model"
model = "iris@1"

[[steps]]
type = "postprocess"
transforms = [{ op = "extract", path = "label" }]
"#;

/// Typical measurements (sepal length, sepal width, petal length, petal width; cm).
const SETOSA: [f64; 4] = [5.0, 3.4, 1.5, 0.2];
const VERSICOLOR: [f64; 4] = [5.9, 2.8, 4.3, 1.3];
const VIRGINICA: [f64; 4] = [6.6, 3.0, 5.6, 2.0];

/// `n` points from `SETOSA` to `VERSICOLOR` to `VIRGINICA`, rounded to millimetres.
fn sweep(n: usize) -> Vec<[f64; 4]> {
    (0..n)
        .map(|i| {
            let t = i as f64 / (n - 1) as f64 * 2.0;
            let (from, to, s) = if t <= 1.0 {
                (SETOSA, VERSICOLOR, t)
            } else {
                (VERSICOLOR, VIRGINICA, t - 1.0)
            };
            let mut point = [0.0; 4];
            for k in 0..4 {
                point[k] = ((from[k] + (to[k] - from[k]) * s) * 10.0).round() / 10.0;
            }
            point
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = LocalConfig::default();
    config.models.insert(
        "iris".into(),
        LocalModelConfig {
            kind: LocalModelKind::Onnx,
            path: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/iris"),
        },
    );
    let models = Arc::new(ModelManager::new());
    models.register_provider("local", Arc::new(LocalProvider::new(config)?));
    models
        .load_model_with_warmup(
            ModelSpec::new("iris", "1", "local", "iris"),
            ProviderInput::new(json!({"features": SETOSA})),
        )
        .await?;
    let pipelines = PipelineManager::new(Arc::clone(&models));
    let def: PipelineDef = toml::from_str(PIPELINE)?;
    pipelines.create_pipeline(def)?;

    // The list: 100 measurements, and two rows a real file would also have.
    let mut list: Vec<Value> = sweep(100)
        .into_iter()
        .map(|f| json!({ "features": f }))
        .collect();
    list.insert(17, json!({"features": [5.0, 3.4]}));
    list.insert(60, json!({"features": "n/a"}));
    let requests: Vec<ExecRequest> = list
        .iter()
        .enumerate()
        .map(|(i, data)| ExecRequest {
            request_id: format!("row-{i}"),
            data: data.clone(),
            parameters: None,
            entity: None,
            tenant: None,
        })
        .collect();

    let started = Instant::now();
    let outcomes = pipelines.execute_batch("iris_label", requests).await;
    let elapsed = started.elapsed();

    let mut labels: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors = Vec::new();
    for (i, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Ok(out) => {
                *labels
                    .entry(out.output.as_str().unwrap_or("?").to_owned())
                    .or_default() += 1;
            }
            Err(error) => errors.push(format!("row-{i}: {error}")),
        }
    }
    println!("rows: {}", list.len());
    println!("labels: {}", json!(labels));
    println!("errors: {}", errors.len());
    for e in &errors {
        println!("  {e}");
    }
    let stats = models.stats("iris@1").unwrap_or_default();
    println!("provider calls: {}", stats.provider_calls);
    println!(
        "throughput: {} rows in {:.2} ms, {:.0} rows/s",
        list.len(),
        elapsed.as_secs_f64() * 1e3,
        list.len() as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
