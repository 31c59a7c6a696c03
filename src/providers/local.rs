//! The local provider: models that run in-process, with no network.
//!
//! Two kinds of model:
//!
//! - **`onnx`**: an ONNX graph run by [tract](https://github.com/sonos/tract) (pure Rust). The
//!   model directory holds the `.onnx` file and a `metadata.json` sidecar naming the input
//!   features, in the order of the input tensor's columns, and the output labels. The graph
//!   takes one float tensor `[N, features]` and gives one `[N, labels]` tensor of
//!   probabilities (or logits, or plain values). tract implements the standard ONNX operators;
//!   it does not implement the `ai.onnx.ml` set (`LinearClassifier`, `TreeEnsemble…`), so export
//!   classical models as standard operators (`models/iris/train.py` shows how).
//! - **`vader`**: the VADER sentiment analyser ([`super::vader`]); the directory holds the
//!   lexicon files.
//!
//! **Loading.** [`Provider::load_model`] reads the model, optimises it for a symbolic batch
//! size and runs it once on zeros (the warm-up), off the async runtime. A model is also loaded
//! on its first call if nobody loaded it before; concurrent first calls load it once.
//! [`Provider::unload_model`] drops it, and the next call loads it again.
//!
//! **Running.** Inference never runs on the runtime's worker threads: each batch is one task
//! on Tokio's blocking pool, and a semaphore of `max_concurrency` permits bounds how many run
//! at once (by default the number of CPUs), so a burst of batches queues instead of
//! oversubscribing the cores. Calls of a route's shadow versions have one permit of their own
//! instead ([`lane`](super::lane)): one shadow batch runs at a time, beside the
//! `max_concurrency` of the request path, and never holds a permit a primary batch waits for;
//! it runs on one thread of idle CPU priority (Linux `SCHED_IDLE`), so it only gets the CPU the
//! request path leaves unused. An ONNX batch of N valid inputs is **one** model run on an
//! `[N, features]` tensor; invalid inputs fail alone with [`ProviderError::InvalidInput`]
//! (the wire's `invalid_request`), never a panic.
//!
//! **Inputs and outputs.**
//!
//! | kind | `data` | output |
//! |---|---|---|
//! | `onnx` | `{"features": [5.1, 3.5, 1.4, 0.2]}`, or `{"features": {"sepal_length_cm": 5.1, …}}` with every name from the metadata | `{"label": "setosa", "scores": {"setosa": 0.97, …}}`; `{"values": [...]}` for `output_kind = "values"` |
//! | `vader` | a string, or `{"text": "…"}` | `{"label": "positive", "compound": 0.62, "scores": {"positive": 0.5, "neutral": 0.5, "negative": 0.0}}` |
//!
//! Neither kind takes parameters; unknown ones are rejected.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tract_onnx::prelude::{
    Framework, InferenceModelExt, Tensor, TypedModel, TypedRunnableModel, tvec,
};

use super::lane::Permits;
use super::vader::Vader;
use super::{BuildError, Provider, ProviderError, ProviderInput, ProviderOutput};

/// Batches of shadow calls running at once, beside the request path's `max_concurrency`.
const SHADOW_PERMITS: usize = 1;

/// Settings of the local provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalConfig {
    /// Batches running at once, across all models. Default: the number of CPUs.
    pub max_concurrency: NonZeroUsize,
    /// The models, by the name callers use.
    pub models: BTreeMap<String, LocalModelConfig>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            max_concurrency: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            models: BTreeMap::new(),
        }
    }
}

/// What kind of local model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalModelKind {
    /// An ONNX graph with a `metadata.json` sidecar, run by tract.
    Onnx,
    /// The VADER sentiment analyser.
    Vader,
}

/// One local model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalModelConfig {
    /// What it is.
    pub kind: LocalModelKind,
    /// Its directory: `metadata.json` and the `.onnx` file it names, or the VADER lexicons.
    pub path: PathBuf,
}

/// What an ONNX model's output columns are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// Class probabilities, one column per label.
    #[default]
    Probabilities,
    /// Class logits, one column per label; softmax is applied.
    Logits,
    /// Plain numbers (regression, embeddings), returned as `values`.
    Values,
}

/// The `metadata.json` beside an ONNX model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxMetadata {
    /// Always `onnx`, when given.
    #[serde(default)]
    pub format: Option<String>,
    /// The graph's file, relative to the directory.
    pub model_file: String,
    /// The input's name in the graph (informative; the graph must have one input).
    #[serde(default)]
    pub input: Option<String>,
    /// The output's name in the graph (informative; the first output is used).
    #[serde(default)]
    pub output: Option<String>,
    /// What the output columns are.
    #[serde(default)]
    pub output_kind: OutputKind,
    /// The input columns, in order.
    pub feature_names: Vec<String>,
    /// The output columns, in order (required unless `output_kind` is `values`).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

/// A loaded ONNX model: the optimised plan and its metadata.
struct OnnxModel {
    plan: Arc<TypedRunnableModel<TypedModel>>,
    meta: OnnxMetadata,
}

enum Loaded {
    Onnx(OnnxModel),
    Vader(Vader),
}

/// One configured model and, when loaded, the loaded form.
struct Slot {
    config: LocalModelConfig,
    loaded: RwLock<Option<Arc<Loaded>>>,
    /// Held while loading, so concurrent first calls load once.
    loading: tokio::sync::Mutex<()>,
    loads: AtomicU64,
    /// Model runs (ONNX) or scored batches (VADER), warm-ups excluded.
    runs: Arc<AtomicU64>,
}

/// The local provider. See the [module documentation](self).
pub struct LocalProvider {
    slots: HashMap<String, Slot>,
    permits: Permits,
    max_concurrency: usize,
}

impl fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut models: Vec<&String> = self.slots.keys().collect();
        models.sort();
        f.debug_struct("LocalProvider")
            .field("models", &models)
            .field("max_concurrency", &self.max_concurrency)
            .finish_non_exhaustive()
    }
}

fn local_error(message: impl Into<String>) -> ProviderError {
    ProviderError::LocalModel {
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> ProviderError {
    ProviderError::InvalidInput {
        message: message.into(),
    }
}

impl LocalProvider {
    /// Builds the provider. Models are not read until loaded or first called.
    pub fn new(config: LocalConfig) -> Result<Self, BuildError> {
        let mut problems = Vec::new();
        for (name, model) in &config.models {
            if model.path.as_os_str().is_empty() {
                problems.push(format!("models.{name}.path is empty"));
            }
        }
        if !problems.is_empty() {
            return Err(BuildError::InvalidConfig { problems });
        }
        let slots = config
            .models
            .into_iter()
            .map(|(name, config)| {
                let slot = Slot {
                    config,
                    loaded: RwLock::new(None),
                    loading: tokio::sync::Mutex::new(()),
                    loads: AtomicU64::new(0),
                    runs: Arc::default(),
                };
                (name, slot)
            })
            .collect();
        Ok(LocalProvider {
            slots,
            permits: Permits::new(config.max_concurrency.get(), SHADOW_PERMITS),
            max_concurrency: config.max_concurrency.get(),
        })
    }

    /// True when `model` is loaded now.
    pub fn is_loaded(&self, model: &str) -> bool {
        self.slots.get(model).is_some_and(|s| s.current().is_some())
    }

    /// How many times `model` has been loaded (0 for an unknown model).
    pub fn loads(&self, model: &str) -> u64 {
        self.slots
            .get(model)
            .map_or(0, |s| s.loads.load(Ordering::Relaxed))
    }

    /// How many times `model` has run on a batch (ONNX: model runs; VADER: batches scored),
    /// warm-ups excluded. A batch of N valid inputs is one run.
    pub fn runs(&self, model: &str) -> u64 {
        self.slots
            .get(model)
            .map_or(0, |s| s.runs.load(Ordering::Relaxed))
    }

    /// The loaded model, loading it first if needed.
    async fn ensure_loaded(&self, name: &str) -> Result<Arc<Loaded>, ProviderError> {
        let slot = self
            .slots
            .get(name)
            .ok_or_else(|| ProviderError::UnknownModel {
                model: name.to_owned(),
            })?;
        if let Some(loaded) = slot.current() {
            return Ok(loaded);
        }
        let _loading = slot.loading.lock().await;
        if let Some(loaded) = slot.current() {
            return Ok(loaded);
        }
        let config = slot.config.clone();
        let permit = Arc::clone(self.permits.current())
            .acquire_owned()
            .await
            .map_err(|_| local_error("the provider has been shut down"))?;
        let loaded = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            load(&config)
        })
        .await
        .map_err(|e| local_error(format!("loading panicked: {e}")))??;
        let loaded = Arc::new(loaded);
        *slot.loaded.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&loaded));
        slot.loads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(model = name, "local model loaded");
        Ok(loaded)
    }

    async fn infer(&self, name: &str, inputs: Vec<ProviderInput>) -> Vec<Outcome> {
        let n = inputs.len();
        let loaded = match self.ensure_loaded(name).await {
            Ok(loaded) => loaded,
            Err(error) => return vec![Err(error); n],
        };
        let runs = self
            .slots
            .get(name)
            .map(|s| Arc::clone(&s.runs))
            .unwrap_or_default();
        let permit = match Arc::clone(self.permits.current()).acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => return vec![Err(local_error("the provider has been shut down")); n],
        };
        // A shadow's batch runs at idle CPU priority, the request path's on the blocking pool.
        let joined = super::lane::compute(move || {
            let _permit = permit;
            match &*loaded {
                Loaded::Onnx(model) => model.infer(inputs, &runs),
                Loaded::Vader(vader) => {
                    runs.fetch_add(1, Ordering::Relaxed);
                    inputs.into_iter().map(|i| vader_one(vader, i)).collect()
                }
            }
        })
        .await;
        match joined {
            Ok(outcomes) => outcomes,
            Err(e) => vec![Err(local_error(format!("inference failed: {e}"))); n],
        }
    }
}

impl Slot {
    fn current(&self) -> Option<Arc<Loaded>> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

type Outcome = Result<ProviderOutput, ProviderError>;

impl Provider for LocalProvider {
    fn infer_batch(
        &self,
        model: &str,
        inputs: Vec<ProviderInput>,
    ) -> BoxFuture<'_, Vec<Result<ProviderOutput, ProviderError>>> {
        let model = model.to_owned();
        Box::pin(async move {
            if inputs.is_empty() {
                return Vec::new();
            }
            self.infer(&model, inputs).await
        })
    }

    fn load_model(&self, model: &str) -> BoxFuture<'_, Result<(), ProviderError>> {
        let model = model.to_owned();
        Box::pin(async move { self.ensure_loaded(&model).await.map(|_| ()) })
    }

    fn unload_model(&self, model: &str) -> bool {
        let Some(slot) = self.slots.get(model) else {
            return false;
        };
        let was = slot
            .loaded
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if was.is_some() {
            tracing::info!(model, "local model unloaded");
        }
        was.is_some()
    }
}

/// Reads, optimises and warms up a model. Runs on the blocking pool.
fn load(config: &LocalModelConfig) -> Result<Loaded, ProviderError> {
    match config.kind {
        LocalModelKind::Vader => Vader::load(&config.path)
            .map(Loaded::Vader)
            .map_err(|e| local_error(e.to_string())),
        LocalModelKind::Onnx => OnnxModel::load(&config.path).map(Loaded::Onnx),
    }
}

impl OnnxModel {
    fn load(dir: &Path) -> Result<Self, ProviderError> {
        let meta_path = dir.join("metadata.json");
        let text = std::fs::read_to_string(&meta_path)
            .map_err(|e| local_error(format!("cannot read {}: {e}", meta_path.display())))?;
        let meta: OnnxMetadata = serde_json::from_str(&text)
            .map_err(|e| local_error(format!("{} is not valid: {e}", meta_path.display())))?;
        if meta.feature_names.is_empty() {
            return Err(local_error("metadata.json names no feature_names"));
        }
        if meta.output_kind != OutputKind::Values && meta.labels.is_empty() {
            return Err(local_error(
                "metadata.json names no labels (required unless output_kind is values)",
            ));
        }
        let model_path = dir.join(&meta.model_file);
        let plan = tract_onnx::onnx()
            .model_for_path(&model_path)
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| {
                local_error(format!(
                    "cannot load {} with tract: {e:#}",
                    model_path.display()
                ))
            })?;
        let model = OnnxModel {
            plan: Arc::new(plan),
            meta,
        };
        // Warm-up: one run on zeros checks the shapes and touches every weight.
        let width = model.meta.feature_names.len();
        let out = model.run(&vec![0.0; width], 1)?;
        if model.meta.output_kind != OutputKind::Values && out.len() != model.meta.labels.len() {
            return Err(local_error(format!(
                "the model gives {} outputs per row but metadata.json names {} labels",
                out.len(),
                model.meta.labels.len()
            )));
        }
        Ok(model)
    }

    /// One model run on `rows` rows of features, flattened; returns the output, flattened.
    fn run(&self, flat: &[f32], rows: usize) -> Result<Vec<f32>, ProviderError> {
        let width = self.meta.feature_names.len();
        let tensor = Tensor::from_shape(&[rows, width], flat)
            .map_err(|e| local_error(format!("cannot build the input tensor: {e}")))?;
        let outputs = self
            .plan
            .run(tvec!(tensor.into()))
            .map_err(|e| local_error(format!("the model failed to run: {e:#}")))?;
        let output = outputs
            .first()
            .ok_or_else(|| local_error("the model gave no output"))?;
        let view = output
            .to_array_view::<f32>()
            .map_err(|e| local_error(format!("the output is not float32: {e}")))?;
        let shape = view.shape().to_vec();
        if shape.first() != Some(&rows) || view.len() % rows.max(1) != 0 {
            return Err(local_error(format!(
                "the output's shape {shape:?} does not have {rows} rows"
            )));
        }
        Ok(view.iter().copied().collect())
    }

    /// Runs every valid input in one model run; invalid ones fail alone.
    fn infer(&self, inputs: Vec<ProviderInput>, runs: &AtomicU64) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = inputs.iter().map(|_| None).collect();
        let mut flat = Vec::with_capacity(inputs.len() * self.meta.feature_names.len());
        let mut positions = Vec::with_capacity(inputs.len());
        for (position, input) in inputs.into_iter().enumerate() {
            match self.features(input) {
                Ok(row) => {
                    flat.extend_from_slice(&row);
                    positions.push(position);
                }
                Err(e) => outcomes[position] = Some(Err(e)),
            }
        }
        if !positions.is_empty() {
            runs.fetch_add(1, Ordering::Relaxed);
            match self.run(&flat, positions.len()) {
                Ok(out) => {
                    let width = out.len() / positions.len();
                    for (row, position) in out.chunks(width).zip(&positions) {
                        outcomes[*position] = Some(Ok(ProviderOutput::new(self.output(row))));
                    }
                }
                Err(e) => {
                    for position in &positions {
                        outcomes[*position] = Some(Err(e.clone()));
                    }
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(local_error("no outcome for this input"))))
            .collect()
    }

    /// The input's feature row, checked against the metadata.
    fn features(&self, input: ProviderInput) -> Result<Vec<f32>, ProviderError> {
        reject_parameters(&input.parameters)?;
        let names = &self.meta.feature_names;
        let shape = || {
            format!(
                "data must be {{\"features\": [{} numbers]}} or {{\"features\": {{name: number}}}} \
                 with the names {}",
                names.len(),
                names.join(", ")
            )
        };
        let Value::Object(mut data) = input.data else {
            return Err(invalid(shape()));
        };
        let features = match data.remove("features") {
            Some(features) if data.is_empty() => features,
            _ => return Err(invalid(shape())),
        };
        let number = |value: &Value, what: &str| -> Result<f32, ProviderError> {
            // The model takes float32: every number is rounded to one (that is the model's
            // input type, not a loss in transit); one beyond the double range is refused.
            let x = match value {
                Value::Number(n) => n
                    .as_f64()
                    .ok_or_else(|| invalid(format!("{what} ({n}) is out of the float32 range")))?,
                _ => return Err(invalid(format!("{what} is not a number"))),
            };
            let x = x as f32;
            if x.is_finite() {
                Ok(x)
            } else {
                Err(invalid(format!("{what} is out of the float32 range")))
            }
        };
        match features {
            Value::Array(values) => {
                if values.len() != names.len() {
                    return Err(invalid(format!(
                        "features has {} values; this model takes {} ({})",
                        values.len(),
                        names.len(),
                        names.join(", ")
                    )));
                }
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| number(v, &format!("features[{i}]")))
                    .collect()
            }
            Value::Object(map) => {
                if let Some(extra) = map.keys().find(|k| !names.contains(k)) {
                    return Err(invalid(format!(
                        "unknown feature `{extra}` (this model takes {})",
                        names.join(", ")
                    )));
                }
                names
                    .iter()
                    .map(|name| match map.get(name) {
                        Some(v) => number(v, &format!("features.{name}")),
                        None => Err(invalid(format!("feature `{name}` is missing"))),
                    })
                    .collect()
            }
            _ => Err(invalid(shape())),
        }
    }

    /// The output document of one row.
    fn output(&self, row: &[f32]) -> Value {
        let probabilities: Vec<f64> = match self.meta.output_kind {
            OutputKind::Values => {
                return json!({ "values": row.iter().map(|&x| f64::from(x)).collect::<Vec<_>>() });
            }
            OutputKind::Probabilities => row.iter().map(|&x| f64::from(x)).collect(),
            OutputKind::Logits => softmax(row),
        };
        let mut best = 0;
        for (i, p) in probabilities.iter().enumerate() {
            if *p > probabilities[best] {
                best = i;
            }
        }
        let scores: Map<String, Value> = self
            .meta
            .labels
            .iter()
            .zip(&probabilities)
            .map(|(label, p)| (label.clone(), json!(p)))
            .collect();
        json!({ "label": self.meta.labels.get(best), "scores": scores })
    }
}

fn softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let exps: Vec<f64> = row.iter().map(|&x| f64::from(x - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

fn reject_parameters(parameters: &Map<String, Value>) -> Result<(), ProviderError> {
    match parameters.keys().next() {
        Some(name) => Err(invalid(format!(
            "unknown parameter `{name}`: local models take none"
        ))),
        None => Ok(()),
    }
}

/// Scores one text with VADER.
fn vader_one(vader: &Vader, input: ProviderInput) -> Outcome {
    reject_parameters(&input.parameters)?;
    let text = match input.data {
        Value::String(text) => text,
        Value::Object(mut map) if map.len() == 1 => match map.remove("text") {
            Some(Value::String(text)) => text,
            _ => return Err(invalid("data must be a string or {\"text\": string}")),
        },
        _ => return Err(invalid("data must be a string or {\"text\": string}")),
    };
    // Rounded as the reference returns them, and labelled by the rounded compound, so the
    // label agrees with what the reference's users compute from its output.
    let r = vader.polarity_scores(&text).rounded();
    Ok(ProviderOutput::new(json!({
        "label": r.label(),
        "compound": r.compound,
        "scores": { "positive": r.pos, "neutral": r.neu, "negative": r.neg },
    })))
}
