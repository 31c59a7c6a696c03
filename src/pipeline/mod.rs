//! Pipelines: preprocess → features → model → postprocess, defined in `config/pipelines/*.toml`
//! or in code, run by the stream processor, the HTTP API, `inferflow batch` and embedding
//! programs alike.
//!
//! - [`def`]: the file format, loading, and validation (every problem with its key path).
//! - [`transform`]: the built-in transforms and custom Rust ones.
//! - `run`: the engine, which moves a whole batch through each step (one batched model call,
//!   one batched feature read per step).
//! - [`PipelineManager`]: the library entry point; holds the current *snapshot* (models,
//!   feature store, compiled pipelines) and swaps it atomically on reload. A request runs to
//!   the end on the snapshot it started with, so a reload never drops or mixes in-flight work.
//! - [`PipelineExecutor`]: the [`Executor`] the processor and the HTTP API drive: pipelines
//!   by id, models by id, and the built-ins (`identity`, `echo`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use inferflow::pipeline::{PipelineDef, PipelineManager};
//! use inferflow::providers::manager::ModelManager;
//!
//! let pipelines = PipelineManager::new(Arc::new(ModelManager::new()));
//! let def: PipelineDef = toml::from_str(r#"
//!     id = "shout"
//!     [[steps]]
//!     type = "preprocess"
//!     transforms = [{ op = "trim" }, { op = "custom", name = "upper" }]
//! "#)?;
//! pipelines.register_transform("upper", |data, _ctx| {
//!     Ok(serde_json::Value::String(data.as_str().unwrap_or_default().to_uppercase()))
//! });
//! pipelines.create_pipeline(def)?;
//! let out = pipelines.execute("shout", serde_json::json!("  hi  ")).await?;
//! assert_eq!(out.output, serde_json::json!("HI"));
//! # Ok(()) }
//! ```

mod config;
pub mod def;
pub mod path;
mod run;
pub mod transform;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use self::config::PipelinesConfig;
use self::def::{Catalog, Pipeline, compile_all};
pub use self::def::{OnError, PipelineBatch, PipelineDef, StepDef, StepType, load_dir};
use self::run::{Engine, Item};
pub use self::transform::{TransformContext, TransformDef, TransformFn};
use crate::executor::{BUILTIN_MODELS, Builtins, ExecOutput, ExecRequest, ExecResult, Executor};
use crate::feature_store::FeatureStore;
use crate::metrics::{PIPELINE_DURATION_SECONDS, PIPELINE_REQUESTS_TOTAL};
use crate::model::{ErrorBody, ErrorKind, StepRecord, Target};
use crate::providers::ModelsConfig;
use crate::providers::manager::ModelManager;
use crate::section::{ConfigError, ConfigErrors};

/// The built-in pipeline, used when no configured pipeline takes its id.
pub const IDENTITY: &str = "identity";

/// What a pipeline run is based on; replaced whole on reload.
pub(crate) struct Snapshot {
    pub(crate) models: Arc<ModelManager>,
    pub(crate) features: Option<Arc<FeatureStore>>,
    pub(crate) pipelines: BTreeMap<String, Arc<Pipeline>>,
}

/// The answer to one pipeline run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineOutput {
    /// The final value.
    pub output: Value,
    /// What each step did, in order.
    pub steps: Vec<StepRecord>,
    /// Version of the last model that answered.
    pub model_version: Option<String>,
    /// Whether every model step answered from the result cache.
    pub cached: bool,
    /// Time the run took, microseconds.
    pub latency_us: u64,
}

/// Creates, reloads and runs pipelines. Cheap to share behind an `Arc`.
pub struct PipelineManager {
    state: RwLock<Arc<Snapshot>>,
    /// The definitions the current pipelines were compiled from, by id.
    defs: Mutex<BTreeMap<String, PipelineDef>>,
    transforms: RwLock<HashMap<String, TransformFn>>,
}

impl PipelineManager {
    /// A manager with no pipelines, calling models in `models`.
    pub fn new(models: Arc<ModelManager>) -> Self {
        PipelineManager {
            state: RwLock::new(Arc::new(Snapshot {
                models,
                features: None,
                pipelines: BTreeMap::new(),
            })),
            defs: Mutex::new(BTreeMap::new()),
            transforms: RwLock::new(HashMap::new()),
        }
    }

    /// Attaches a feature store for `features` steps. Attach it before creating pipelines
    /// that use it.
    pub fn with_feature_store(self, store: Arc<FeatureStore>) -> Self {
        {
            let mut state = write(&self.state);
            let old = Arc::clone(&state);
            *state = Arc::new(Snapshot {
                models: Arc::clone(&old.models),
                features: Some(store),
                pipelines: old.pipelines.clone(),
            });
        }
        self
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&read(&self.state))
    }

    /// The model manager pipelines call.
    pub fn models(&self) -> Arc<ModelManager> {
        Arc::clone(&self.snapshot().models)
    }

    /// The attached feature store, if any.
    pub fn feature_store(&self) -> Option<Arc<FeatureStore>> {
        self.snapshot().features.clone()
    }

    /// Registers a Rust transform, used in pipelines as `{ op = "custom", name = "..." }`.
    /// Register it before creating the pipelines that use it.
    pub fn register_transform(
        &self,
        name: impl Into<String>,
        f: impl Fn(Value, &TransformContext<'_>) -> Result<Value, String> + Send + Sync + 'static,
    ) {
        self.transforms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), Arc::new(f));
    }

    /// Ids of the pipelines, sorted.
    pub fn pipeline_ids(&self) -> Vec<String> {
        self.snapshot().pipelines.keys().cloned().collect()
    }

    /// The definition of a pipeline.
    pub fn definition(&self, id: &str) -> Option<PipelineDef> {
        self.snapshot().pipelines.get(id).map(|p| p.def.clone())
    }

    /// Adds a pipeline, or replaces the one with the same id. It is validated together with
    /// the others (models, transforms, chained pipelines, cycles); on error nothing changes.
    pub fn create_pipeline(&self, def: PipelineDef) -> Result<(), ConfigErrors> {
        let mut defs = lock(&self.defs);
        let mut next = defs.clone();
        next.insert(def.id.clone(), def);
        let list: Vec<PipelineDef> = next.values().cloned().collect();
        self.install(None, &list)?;
        *defs = next;
        Ok(())
    }

    /// Removes a pipeline; refused when another pipeline chains to it.
    pub fn remove_pipeline(&self, id: &str) -> Result<bool, ConfigErrors> {
        let mut defs = lock(&self.defs);
        let mut next = defs.clone();
        if next.remove(id).is_none() {
            return Ok(false);
        }
        let list: Vec<PipelineDef> = next.values().cloned().collect();
        self.install(None, &list)?;
        *defs = next;
        Ok(true)
    }

    /// Replaces every pipeline (and, when given, the model manager) at once: what a reload
    /// does. The new set is validated against the new models first; when anything is wrong
    /// the old set stays and every problem is returned. Requests already running finish on
    /// the snapshot they started with.
    pub fn replace_all(
        &self,
        models: Option<Arc<ModelManager>>,
        defs: Vec<PipelineDef>,
    ) -> Result<(), ConfigErrors> {
        let mut current = lock(&self.defs);
        self.install(models, &defs)?;
        *current = defs.into_iter().map(|d| (d.id.clone(), d)).collect();
        Ok(())
    }

    /// Checks `defs` against `models` (the current ones when `None`) without installing them.
    pub fn validate(
        &self,
        models: Option<&Arc<ModelManager>>,
        defs: &[PipelineDef],
    ) -> Result<(), ConfigErrors> {
        let snapshot = self.snapshot();
        let models = models.unwrap_or(&snapshot.models);
        self.compile(models, snapshot.features.is_some(), defs)
            .map(|_| ())
    }

    fn compile(
        &self,
        models: &Arc<ModelManager>,
        has_feature_store: bool,
        defs: &[PipelineDef],
    ) -> Result<BTreeMap<String, Arc<Pipeline>>, ConfigErrors> {
        let transforms = self.transforms.read().unwrap_or_else(|e| e.into_inner());
        let model_known = |id: &str| BUILTIN_MODELS.contains(&id) || models.resolve(id).is_ok();
        let transform = |name: &str| transforms.get(name).cloned();
        let catalog = Catalog {
            model_known: &model_known,
            transform: &transform,
            has_feature_store,
        };
        compile_all(defs, &catalog).map_err(ConfigErrors)
    }

    fn install(
        &self,
        models: Option<Arc<ModelManager>>,
        defs: &[PipelineDef],
    ) -> Result<(), ConfigErrors> {
        let old = self.snapshot();
        let models = models.unwrap_or_else(|| Arc::clone(&old.models));
        let pipelines = self.compile(&models, old.features.is_some(), defs)?;
        *write(&self.state) = Arc::new(Snapshot {
            models,
            features: old.features.clone(),
            pipelines,
        });
        Ok(())
    }

    /// Runs pipeline `id` on one input.
    pub async fn execute(&self, id: &str, input: Value) -> Result<PipelineOutput, ErrorBody> {
        let request = ExecRequest {
            request_id: "library".into(),
            data: input,
            parameters: None,
            entity: None,
            tenant: None,
        };
        self.execute_request(id, request).await
    }

    /// Runs pipeline `id` on one request (with its parameters and entity).
    pub async fn execute_request(
        &self,
        id: &str,
        request: ExecRequest,
    ) -> Result<PipelineOutput, ErrorBody> {
        let started = Instant::now();
        let outcome = self
            .execute_batch(id, vec![request])
            .await
            .pop()
            .unwrap_or_else(|| Err(ErrorBody::new(ErrorKind::Internal, "no outcome")));
        outcome.map(|out| PipelineOutput {
            output: out.output,
            steps: out.steps,
            model_version: out.model_version,
            cached: out.cached,
            latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        })
    }

    /// Runs pipeline `id` on a batch: one outcome per request, in order. Model steps make one
    /// batched call for the whole batch.
    pub async fn execute_batch(&self, id: &str, requests: Vec<ExecRequest>) -> Vec<ExecResult> {
        let snapshot = self.snapshot();
        let Some(pipeline) = snapshot.pipelines.get(id).cloned() else {
            let known = snapshot
                .pipelines
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            let e = ErrorBody::new(
                ErrorKind::UnknownPipeline,
                format!("no pipeline `{id}` (known: {known})"),
            );
            return vec![Err(e); requests.len()];
        };
        let started = Instant::now();
        let mut items: Vec<Item> = requests.into_iter().map(Item::from_request).collect();
        // Tracing on: each request's span, from the caller (`tracing_otel::with_request_traces`).
        if let Some(traces) = crate::tracing_otel::request_traces() {
            for (item, trace) in items.iter_mut().zip(traces.iter()) {
                item.trace = trace.clone();
            }
        }
        Engine {
            snapshot: &snapshot,
        }
        .run(&pipeline, &mut items, 0, false)
        .await;
        metrics::histogram!(PIPELINE_DURATION_SECONDS, "pipeline" => pipeline.id.clone())
            .record(started.elapsed().as_secs_f64());
        let failed = items.iter().filter(|i| i.error.is_some()).count() as u64;
        let ok = items.len() as u64 - failed;
        if ok > 0 {
            metrics::counter!(PIPELINE_REQUESTS_TOTAL, "pipeline" => pipeline.id.clone(), "outcome" => "ok")
                .increment(ok);
        }
        if failed > 0 {
            metrics::counter!(PIPELINE_REQUESTS_TOTAL, "pipeline" => pipeline.id.clone(), "outcome" => "error")
                .increment(failed);
        }
        items
            .into_iter()
            .map(|item| match item.error {
                Some(mut e) => {
                    // The steps that ran, the failed one last, go in the result's `steps`.
                    e.steps = item.steps;
                    Err(e)
                }
                None => Ok(ExecOutput {
                    output: item.data,
                    model_version: item.model_version,
                    cached: item.cached.unwrap_or(false),
                    steps: item.steps,
                }),
            })
            .collect()
    }

    /// The models pipeline `id` calls (for admission), or `None` when there is no such
    /// pipeline.
    fn models_of(&self, id: &str) -> Option<(Arc<ModelManager>, Vec<String>)> {
        let snapshot = self.snapshot();
        let pipeline = snapshot.pipelines.get(id)?;
        Some((Arc::clone(&snapshot.models), pipeline.models.clone()))
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The [`Executor`] behind the processor and the HTTP API: configured pipelines, models of the
/// manager's current snapshot, and the built-ins (`identity` when no pipeline takes the id,
/// `echo`).
#[derive(Clone)]
pub struct PipelineExecutor {
    pipelines: Arc<PipelineManager>,
}

impl PipelineExecutor {
    /// An executor over `pipelines`.
    pub fn new(pipelines: Arc<PipelineManager>) -> Self {
        PipelineExecutor { pipelines }
    }

    /// The pipeline manager.
    pub fn pipelines(&self) -> &Arc<PipelineManager> {
        &self.pipelines
    }
}

impl Executor for PipelineExecutor {
    fn execute<'a>(
        &'a self,
        target: &'a Target,
        requests: Vec<ExecRequest>,
    ) -> BoxFuture<'a, Vec<ExecResult>> {
        Box::pin(async move {
            match target {
                Target::Pipeline(id) => {
                    if id == IDENTITY && self.pipelines.models_of(id).is_none() {
                        return Builtins.execute(target, requests).await;
                    }
                    self.pipelines.execute_batch(id, requests).await
                }
                Target::Model(id) => {
                    let models = self.pipelines.models();
                    let executor = crate::providers::manager::ModelExecutor::new(models);
                    let call = executor.execute(target, requests);
                    match crate::tracing_otel::request_traces() {
                        Some(traces) => {
                            let parents = traces.iter().flatten();
                            crate::tracing_otel::in_model_call(parents, id, call).await
                        }
                        None => call.await,
                    }
                }
            }
        })
    }

    fn admit<'a>(&'a self, target: &'a Target, requests: usize) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            match target {
                Target::Model(id) => self.pipelines.models().admit(id, requests).await,
                Target::Pipeline(id) => {
                    if let Some((models, ids)) = self.pipelines.models_of(id) {
                        for model in ids {
                            models.admit(&model, requests).await;
                        }
                    }
                }
            }
        })
    }

    fn hold(&self) -> Option<String> {
        self.pipelines.models().hold()
    }
}

/// Problems of `defs` as [`ConfigError`]s, for `check-config`: checked against the models
/// the configuration declares in `[models]` (without loading them) and a feature store.
pub fn check_against_config(models: &ModelsConfig, defs: &[PipelineDef]) -> Vec<ConfigError> {
    let model_known = |id: &str| {
        if BUILTIN_MODELS.contains(&id) || models.0.contains_key(id) {
            return true;
        }
        // A bare name resolves to some version of it.
        !id.contains('@')
            && models
                .0
                .keys()
                .any(|k| k.split_once('@').map(|(name, _)| name) == Some(id))
    };
    let catalog = Catalog {
        model_known: &model_known,
        // Custom transforms exist only in embedding programs.
        transform: &|_| None,
        has_feature_store: true,
    };
    compile_all(defs, &catalog).err().unwrap_or_default()
}

#[cfg(test)]
mod tests;
