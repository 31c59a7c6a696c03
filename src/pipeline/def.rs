//! Pipeline definitions as written in `config/pipelines/*.toml`, how they load, and how they
//! compile (with every problem reported by its path) into runnable [`Pipeline`]s.
//!
//! One file holds one pipeline; its id is the `id` key or, without one, the file's stem:
//!
//! ```toml
//! id = "sentiment"
//! description = "VADER sentiment with a cleaned input"
//!
//! [[steps]]
//! type = "preprocess"
//! transforms = [{ op = "clean", field = "text", max_chars = 2000 }]
//!
//! [[steps]]
//! type = "model"
//! model = "sentiment@1"
//! timeout_ms = 2000
//! retries = 1
//!
//! [[steps]]
//! type = "postprocess"
//! transforms = [{ op = "threshold", field = "compound", threshold = 0.05, above = "positive", below = "not_positive", into = "label" }]
//! on_error = { default = { label = "unknown" } }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::path::JsonPath;
use super::transform::{Transform, TransformDef, TransformFn, context_path};
use crate::backoff::Backoff;
use crate::section::ConfigError;

/// Deepest chain of `pipeline` and `map` steps one request may go through.
pub const MAX_DEPTH: usize = 8;
/// Most attempts a step may add with `retries`.
pub const MAX_RETRIES: u32 = 10;
/// Most elements a `map` step runs at once.
pub const MAX_MAP_CONCURRENCY: usize = 1024;

/// One pipeline, as written in its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineDef {
    /// The id requests name; defaults to the file's stem.
    #[serde(default)]
    pub id: String,
    /// For people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Record every step's output in the result's `steps` (each step can also ask with
    /// `record_output`).
    #[serde(default)]
    pub record_outputs: bool,
    /// Batch limits (`[batch]` in the file).
    #[serde(default, skip_serializing_if = "PipelineBatch::is_unlimited")]
    pub batch: PipelineBatch,
    /// The steps, run in order.
    pub steps: Vec<StepDef>,
}

/// A pipeline's batch limits: `[batch]` in its file.
///
/// Batches are formed by the source before requests are decoded (`[batch]` in the
/// configuration: size, bytes, linger), so a batch may hold requests for several pipelines;
/// these limits apply to this pipeline's share of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineBatch {
    /// Most requests one run of the steps takes at once (for a model that accepts batches of
    /// at most this size, or to bound a features step's reads). A larger share of a batch
    /// runs as chunks of this size, concurrently (each model call still under its provider's
    /// `max_concurrency`). Unset: the whole share in one run. Applies wherever the pipeline
    /// runs, also when another pipeline chains it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_records: Option<NonZeroUsize>,
}

impl PipelineBatch {
    /// No limit set.
    pub fn is_unlimited(&self) -> bool {
        self.max_records.is_none()
    }
}

/// The kinds of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepType {
    /// Transforms before the model.
    Preprocess,
    /// Looks features up for the request's entity.
    Features,
    /// Calls a model.
    Model,
    /// Transforms after the model.
    Postprocess,
    /// Runs another pipeline on `data` (chaining).
    Pipeline,
    /// Runs a sub-step on each element of an array.
    Map,
}

impl StepType {
    fn as_str(self) -> &'static str {
        match self {
            StepType::Preprocess => "preprocess",
            StepType::Features => "features",
            StepType::Model => "model",
            StepType::Postprocess => "postprocess",
            StepType::Pipeline => "pipeline",
            StepType::Map => "map",
        }
    }
}

/// What a step does with a request it could not process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The request fails with the step's error (the default).
    #[default]
    Fail,
    /// The step is skipped: `data` goes on unchanged.
    Skip,
    /// `data` becomes this value: `on_error = { default = "neutral" }`.
    Default(Value),
}

/// One step, as written. Which keys apply depends on `type`; a key that does not apply is an
/// error, so a typo cannot silently change what runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDef {
    /// The kind of step.
    #[serde(rename = "type")]
    pub step_type: StepType,
    /// Name in `steps` and in metrics; defaults to the type plus what it runs, e.g.
    /// `model:sentiment@1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Time allowed per attempt, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Extra attempts after a transient failure, up to 10: feature-store errors and timeouts,
    /// and a model call's transient failures when its provider does not retry them itself
    /// (custom providers, the built-ins). The remote providers own their attempt count
    /// (`retry.max_attempts`); their errors, and timeouts of steps calling them, are not
    /// retried again here. Failures retrying cannot fix (4xx, malformed responses, bad input)
    /// never are.
    #[serde(default)]
    pub retries: u32,
    /// Ceiling of the wait before the first retry, milliseconds; doubled before each next one,
    /// up to 5 s. Each wait is random between zero and its ceiling (full jitter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_backoff_ms: Option<u64>,
    /// What happens to a request the step could not process.
    #[serde(default)]
    pub on_error: OnError,
    /// Record this step's output in the result's `steps`.
    #[serde(default)]
    pub record_output: bool,
    /// `preprocess`, `postprocess`: the transforms, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transforms: Option<Vec<TransformDef>>,
    /// `features`: a feature group to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `features`: the group's version (the newest when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_version: Option<u32>,
    /// `features`: the entity type, with `features` instead of a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_type: Option<String>,
    /// `features`: feature names, with `entity_type` instead of a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<String>>,
    /// `features`: context path of the entity id (e.g. `data.user_id`); the request's
    /// `entity.id` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_id: Option<String>,
    /// `model`: the model, `name` or `name@version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `model`: context path of what to send (`data` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// `pipeline`: the pipeline to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// `map`: path of the array inside `data` (`data` itself when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over: Option<String>,
    /// `map`: the step run on each element.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Box<StepDef>>,
    /// `map`: elements run at once (default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// `model`, `map`, `features`: where the output goes inside `data`. A model's output and
    /// a map's array replace `data` (for a map: the array) when absent; features always go
    /// to the context's `features` and, with `into`, into `data` too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub into: Option<String>,
}

/// Default ceiling of the wait before a step's first retry, milliseconds.
const DEFAULT_RETRY_BACKOFF_MS: u64 = 50;
/// Ceiling of every wait between a step's retries.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(5);

/// Default `map` concurrency.
const DEFAULT_MAP_CONCURRENCY: usize = 16;

/// Reads every `*.toml` file in `dir` (sorted by name). A missing directory holds no
/// pipelines. Problems name the file and the key.
pub fn load_dir(dir: &Path) -> Result<Vec<PipelineDef>, Vec<ConfigError>> {
    let mut problems = Vec::new();
    let mut defs = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(defs),
        Err(err) => {
            return Err(vec![ConfigError {
                path: "pipelines.dir".into(),
                message: format!("cannot read {}: {err}", dir.display()),
            }]);
        }
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    for file in files {
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match std::fs::read_to_string(&file) {
            Ok(text) => match parse(&text, &stem, &file.display().to_string()) {
                Ok(def) => defs.push(def),
                Err(mut errs) => problems.append(&mut errs),
            },
            Err(err) => problems.push(ConfigError {
                path: format!("pipelines.{stem}"),
                message: format!("cannot read {}: {err}", file.display()),
            }),
        }
    }
    if problems.is_empty() {
        Ok(defs)
    } else {
        Err(problems)
    }
}

/// Parses one pipeline file's text; `stem` is the default id, `origin` names the file in
/// messages. Every unknown key is reported, with the first type error.
pub fn parse(text: &str, stem: &str, origin: &str) -> Result<PipelineDef, Vec<ConfigError>> {
    let problem = |key: String, message: String| ConfigError {
        path: {
            let key = bracket_indexes(&key);
            if key.is_empty() {
                format!("pipelines.{stem}")
            } else {
                format!("pipelines.{stem}.{key}")
            }
        },
        message: format!("{message} (in {origin})"),
    };
    let value: toml::Value = match toml::from_str(text) {
        Ok(v) => v,
        Err(err) => {
            return Err(vec![problem(
                String::new(),
                format!("not valid TOML: {}", err.message()),
            )]);
        }
    };
    let mut unknown = Vec::new();
    let parsed: Result<PipelineDef, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut |p| {
            unknown.push(p.to_string())
        }));
    let mut problems: Vec<ConfigError> = unknown
        .into_iter()
        .map(|p| problem(p, "unknown key".into()))
        .collect();
    match parsed {
        Ok(mut def) => {
            if def.id.is_empty() {
                def.id = stem.to_owned();
            }
            if problems.is_empty() {
                Ok(def)
            } else {
                Err(problems)
            }
        }
        Err(err) => {
            let path = err.path().to_string();
            let path = if path == "." { String::new() } else { path };
            // toml appends its own idea of the path on later lines; ours is better.
            let message = err.inner().to_string();
            let first = message.lines().next().unwrap_or_default().to_owned();
            problems.push(problem(path, first));
            Err(problems)
        }
    }
}

/// `steps.0.model` → `steps[0].model`, the way validation writes paths.
fn bracket_indexes(path: &str) -> String {
    let mut out = String::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        if part.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

/// A compiled pipeline.
pub(crate) struct Pipeline {
    pub(crate) id: String,
    pub(crate) steps: Vec<Step>,
    /// Every model its steps (and map sub-steps) call, for admission.
    pub(crate) models: Vec<String>,
    /// The definition it was compiled from.
    pub(crate) def: PipelineDef,
}

/// A compiled step.
pub(crate) struct Step {
    pub(crate) name: String,
    pub(crate) kind: StepKind,
    pub(crate) timeout: Option<Duration>,
    pub(crate) retries: u32,
    /// Pacing of the retries: full jitter under `retry_backoff_ms` doubling up to
    /// [`MAX_RETRY_BACKOFF`].
    pub(crate) retry_backoff: Backoff,
    pub(crate) on_error: OnError,
    pub(crate) record_output: bool,
    /// `inferflow_pipeline_step_duration_seconds{pipeline, step}`, resolved once.
    pub(crate) latency: metrics::Histogram,
}

/// Where a features step gets its feature names.
pub(crate) enum FeatureSource {
    Group {
        name: String,
        version: Option<u32>,
    },
    Names {
        entity_type: String,
        names: Vec<String>,
    },
}

/// What a compiled step runs.
pub(crate) enum StepKind {
    Transforms(Vec<Transform>),
    Features {
        source: FeatureSource,
        entity_id: Option<JsonPath>,
        into: Option<JsonPath>,
    },
    Model {
        model: String,
        input: Option<JsonPath>,
        into: Option<JsonPath>,
    },
    Pipeline {
        id: String,
    },
    Map {
        over: JsonPath,
        step: Box<Step>,
        concurrency: usize,
        into: Option<JsonPath>,
    },
}

/// What pipelines may refer to.
pub(crate) struct Catalog<'a> {
    /// True when a model id resolves.
    pub(crate) model_known: &'a dyn Fn(&str) -> bool,
    /// Registered Rust transforms.
    pub(crate) transform: &'a dyn Fn(&str) -> Option<TransformFn>,
    /// Whether a feature store is attached.
    pub(crate) has_feature_store: bool,
}

/// Compiles a whole set of pipelines: each one alone, then the references between them (every
/// chained pipeline exists, no cycles).
pub(crate) fn compile_all(
    defs: &[PipelineDef],
    catalog: &Catalog<'_>,
) -> Result<BTreeMap<String, Arc<Pipeline>>, Vec<ConfigError>> {
    let mut problems = Vec::new();
    let mut compiled = BTreeMap::new();
    let mut chains: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for def in defs {
        let base = format!("pipelines.{}", def.id);
        if let Err(why) = check_id(&def.id) {
            problems.push(ConfigError {
                path: format!("{base}.id"),
                message: why,
            });
            continue;
        }
        if compiled.contains_key(&def.id) {
            problems.push(ConfigError {
                path: format!("{base}.id"),
                message: format!("two pipelines have the id `{}`", def.id),
            });
            continue;
        }
        let mut cx = Compiler {
            pipeline: &def.id,
            catalog,
            problems: &mut problems,
            chains: Vec::new(),
            models: BTreeSet::new(),
        };
        let mut steps = Vec::new();
        let mut names = BTreeSet::new();
        if def.steps.is_empty() {
            cx.problems.push(ConfigError {
                path: format!("{base}.steps"),
                message: "a pipeline needs at least one step".into(),
            });
        }
        for (i, step) in def.steps.iter().enumerate() {
            let path = format!("{base}.steps[{i}]");
            if let Some(mut compiled) = cx.step(step, &path, 0) {
                if !names.insert(compiled.name.clone()) {
                    if step.name.is_some() {
                        cx.problems.push(ConfigError {
                            path: format!("{path}.name"),
                            message: format!("two steps are named `{}`", compiled.name),
                        });
                    }
                    let mut n = 2;
                    while names.contains(&format!("{}#{n}", compiled.name)) {
                        n += 1;
                    }
                    compiled.name = format!("{}#{n}", compiled.name);
                    compiled.latency = step_histogram(&def.id, &compiled.name);
                    names.insert(compiled.name.clone());
                }
                steps.push(compiled);
            }
        }
        chains.insert(def.id.clone(), std::mem::take(&mut cx.chains));
        let models = cx.models.into_iter().collect();
        compiled.insert(
            def.id.clone(),
            Arc::new(Pipeline {
                id: def.id.clone(),
                steps,
                models,
                def: def.clone(),
            }),
        );
    }
    for (id, refs) in &chains {
        for (target, path) in refs {
            if !compiled.contains_key(target) {
                problems.push(ConfigError {
                    path: path.clone(),
                    message: format!(
                        "no pipeline `{target}` (known: {})",
                        compiled.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
        if let Some(cycle) = find_cycle(id, &chains) {
            problems.push(ConfigError {
                path: format!("pipelines.{id}"),
                message: format!(
                    "pipelines call each other in a cycle: {}",
                    cycle.join(" → ")
                ),
            });
        }
    }
    if problems.is_empty() {
        Ok(compiled)
    } else {
        problems.dedup();
        Err(problems)
    }
}

/// A cycle through `start`, as the list of ids from `start` back to it.
fn find_cycle(
    start: &str,
    chains: &BTreeMap<String, Vec<(String, String)>>,
) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        start: &str,
        chains: &BTreeMap<String, Vec<(String, String)>>,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for (next, _) in chains.get(node).map(Vec::as_slice).unwrap_or(&[]) {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if visit(next, start, chains, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_owned()];
    let mut seen = BTreeSet::new();
    // Report a cycle once, from its smallest id.
    if visit(start, start, chains, &mut path, &mut seen) && path.iter().all(|p| p.as_str() >= start)
    {
        Some(path)
    } else {
        None
    }
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err("an id is 1 to 128 characters".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "`{id}`: an id uses only ASCII letters, digits, `-`, `_` and `.`"
        ));
    }
    Ok(())
}

pub(crate) fn step_histogram(pipeline: &str, step: &str) -> metrics::Histogram {
    metrics::histogram!(
        crate::metrics::PIPELINE_STEP_DURATION_SECONDS,
        "pipeline" => pipeline.to_owned(),
        "step" => step.to_owned()
    )
}

struct Compiler<'c, 'a> {
    pipeline: &'c str,
    catalog: &'c Catalog<'a>,
    problems: &'c mut Vec<ConfigError>,
    /// `(pipeline id, key path)` of every chained pipeline.
    chains: Vec<(String, String)>,
    models: BTreeSet<String>,
}

impl Compiler<'_, '_> {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn step(&mut self, def: &StepDef, path: &str, depth: usize) -> Option<Step> {
        let before = self.problems.len();
        let t = def.step_type;
        // Keys that apply to each type; every other set key is a problem.
        let allowed: &[&str] = match t {
            StepType::Preprocess | StepType::Postprocess => &["transforms"],
            StepType::Features => &[
                "group",
                "group_version",
                "entity_type",
                "features",
                "entity_id",
                "into",
            ],
            StepType::Model => &["model", "input", "into"],
            StepType::Pipeline => &["pipeline"],
            StepType::Map => &["over", "step", "concurrency", "into"],
        };
        let set = [
            ("transforms", def.transforms.is_some()),
            ("group", def.group.is_some()),
            ("group_version", def.group_version.is_some()),
            ("entity_type", def.entity_type.is_some()),
            ("features", def.features.is_some()),
            ("entity_id", def.entity_id.is_some()),
            ("model", def.model.is_some()),
            ("input", def.input.is_some()),
            ("pipeline", def.pipeline.is_some()),
            ("over", def.over.is_some()),
            ("step", def.step.is_some()),
            ("concurrency", def.concurrency.is_some()),
            ("into", def.into.is_some()),
        ];
        for (key, present) in set {
            if present && !allowed.contains(&key) {
                self.push(
                    format!("{path}.{key}"),
                    format!("does not apply to a `{}` step", t.as_str()),
                );
            }
        }
        if def.retries > MAX_RETRIES {
            self.push(format!("{path}.retries"), format!("at most {MAX_RETRIES}"));
        }
        if def.timeout_ms == Some(0) {
            self.push(format!("{path}.timeout_ms"), "must be at least 1");
        }
        let into = |cx: &mut Self| -> Option<JsonPath> {
            let text = def.into.as_deref()?;
            match JsonPath::parse(text) {
                Ok(p) => Some(p),
                Err(why) => {
                    cx.push(format!("{path}.into"), why);
                    None
                }
            }
        };
        let (kind, default_name) = match t {
            StepType::Preprocess | StepType::Postprocess => {
                let mut compiled = Vec::new();
                match &def.transforms {
                    None => self.push(format!("{path}.transforms"), "missing: list the transforms"),
                    Some(list) => {
                        for (i, tr) in list.iter().enumerate() {
                            match tr.compile(self.catalog.transform) {
                                Ok(c) => compiled.push(c),
                                Err(why) => self.push(format!("{path}.transforms[{i}]"), why),
                            }
                        }
                    }
                }
                (StepKind::Transforms(compiled), t.as_str().to_owned())
            }
            StepType::Features => {
                if !self.catalog.has_feature_store {
                    self.push(
                        format!("{path}.type"),
                        "a `features` step needs a feature store, and none is attached",
                    );
                }
                let source = match (&def.group, &def.entity_type, &def.features) {
                    (Some(group), None, None) => Some(FeatureSource::Group {
                        name: group.clone(),
                        version: def.group_version,
                    }),
                    (None, Some(entity_type), Some(names)) if !names.is_empty() => {
                        Some(FeatureSource::Names {
                            entity_type: entity_type.clone(),
                            names: names.clone(),
                        })
                    }
                    _ => {
                        self.push(path.to_owned(), "a `features` step takes either `group`, or `entity_type` and a non-empty `features` list");
                        None
                    }
                };
                if def.group_version.is_some() && def.group.is_none() {
                    self.push(format!("{path}.group_version"), "only with `group`");
                }
                let entity_id = def
                    .entity_id
                    .as_deref()
                    .and_then(|p| match context_path(p) {
                        Ok(p) => Some(p),
                        Err(why) => {
                            self.push(format!("{path}.entity_id"), why);
                            None
                        }
                    });
                let name = match &source {
                    Some(FeatureSource::Group { name, .. }) => format!("features:{name}"),
                    Some(FeatureSource::Names { entity_type, .. }) => {
                        format!("features:{entity_type}")
                    }
                    None => "features".into(),
                };
                let into = into(self);
                (
                    StepKind::Features {
                        source: source.unwrap_or(FeatureSource::Names {
                            entity_type: String::new(),
                            names: Vec::new(),
                        }),
                        entity_id,
                        into,
                    },
                    name,
                )
            }
            StepType::Model => {
                let model = match &def.model {
                    None => {
                        self.push(format!("{path}.model"), "missing: name the model");
                        String::new()
                    }
                    Some(m) => {
                        if !(self.catalog.model_known)(m) {
                            self.push(
                                format!("{path}.model"),
                                format!("no model `{m}` is configured"),
                            );
                        }
                        self.models.insert(m.clone());
                        m.clone()
                    }
                };
                let input = def.input.as_deref().and_then(|p| match context_path(p) {
                    Ok(p) => Some(p),
                    Err(why) => {
                        self.push(format!("{path}.input"), why);
                        None
                    }
                });
                let into = into(self);
                let name = format!("model:{model}");
                (StepKind::Model { model, input, into }, name)
            }
            StepType::Pipeline => {
                let id = match &def.pipeline {
                    None => {
                        self.push(format!("{path}.pipeline"), "missing: name the pipeline");
                        String::new()
                    }
                    Some(id) => {
                        self.chains.push((id.clone(), format!("{path}.pipeline")));
                        id.clone()
                    }
                };
                let name = format!("pipeline:{id}");
                (StepKind::Pipeline { id }, name)
            }
            StepType::Map => {
                if depth + 1 >= MAX_DEPTH {
                    self.push(
                        path.to_owned(),
                        format!("map steps nest deeper than {MAX_DEPTH}"),
                    );
                    return None;
                }
                let over = match JsonPath::parse(def.over.as_deref().unwrap_or("")) {
                    Ok(p) => p,
                    Err(why) => {
                        self.push(format!("{path}.over"), why);
                        JsonPath::default()
                    }
                };
                let concurrency = def.concurrency.unwrap_or(DEFAULT_MAP_CONCURRENCY);
                if concurrency == 0 || concurrency > MAX_MAP_CONCURRENCY {
                    self.push(
                        format!("{path}.concurrency"),
                        format!("must be from 1 to {MAX_MAP_CONCURRENCY}"),
                    );
                }
                let sub = match &def.step {
                    None => {
                        self.push(
                            format!("{path}.step"),
                            "missing: the step to run on each element",
                        );
                        None
                    }
                    Some(sub) => self.step(sub, &format!("{path}.step"), depth + 1),
                };
                let into = into(self);
                let sub = sub?;
                let name = format!("map:{}", sub.name);
                (
                    StepKind::Map {
                        over,
                        step: Box::new(sub),
                        concurrency: concurrency.clamp(1, MAX_MAP_CONCURRENCY),
                        into,
                    },
                    name,
                )
            }
        };
        if self.problems.len() > before {
            return None;
        }
        let name = def.name.clone().unwrap_or(default_name);
        Some(Step {
            latency: step_histogram(self.pipeline, &name),
            name,
            kind,
            timeout: def.timeout_ms.map(Duration::from_millis),
            retries: def.retries,
            retry_backoff: Backoff::new(
                Duration::from_millis(def.retry_backoff_ms.unwrap_or(DEFAULT_RETRY_BACKOFF_MS)),
                MAX_RETRY_BACKOFF,
            ),
            on_error: def.on_error.clone(),
            record_output: def.record_output,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog_check(defs: &[PipelineDef]) -> Result<(), Vec<String>> {
        let known = |m: &str| m == "sentiment@1" || m == "echo";
        let catalog = Catalog {
            model_known: &known,
            transform: &|_| None,
            has_feature_store: false,
        };
        compile_all(defs, &catalog)
            .map(|_| ())
            .map_err(|e| e.into_iter().map(|e| e.to_string()).collect())
    }

    fn def(text: &str, stem: &str) -> PipelineDef {
        parse(text, stem, "test.toml").unwrap()
    }

    #[test]
    fn a_valid_pipeline_compiles_and_takes_its_id_from_the_file() {
        let d = def(
            r#"
[[steps]]
type = "preprocess"
transforms = [{ op = "clean", field = "text" }]
[[steps]]
type = "model"
model = "sentiment@1"
retries = 2
timeout_ms = 100
[[steps]]
type = "postprocess"
transforms = [{ op = "extract", path = "compound" }]
on_error = { default = 0 }
"#,
            "sentiment",
        );
        assert_eq!(d.id, "sentiment");
        assert_eq!(d.steps[2].on_error, OnError::Default(serde_json::json!(0)));
        catalog_check(&[d]).unwrap();
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let errs = parse(
            "[[steps]]\ntype = \"model\"\nmodle = \"x\"\n[[steps]]\ntype = \"preprocess\"\ntransforms = []\ncolour = 1\n",
            "p",
            "p.toml",
        )
        .unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|e| e.starts_with("pipelines.p.steps[0].modle: unknown key")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|e| e.starts_with("pipelines.p.steps[1].colour: unknown key")),
            "{text:?}"
        );
        let errs = parse("[[steps]]\ntype = \"dance\"\n", "p", "p.toml").unwrap_err();
        assert!(
            errs[0].to_string().contains("unknown variant `dance`"),
            "{errs:?}"
        );
        let errs = parse(
            "[[steps]]\ntype = \"preprocess\"\ntransforms = [{ op = \"shout\" }]\n",
            "p",
            "p.toml",
        )
        .unwrap_err();
        assert_eq!(
            errs[0].path, "pipelines.p.steps[0].transforms[0].op",
            "{errs:?}"
        );
        assert!(
            errs[0].message.ends_with("`custom` (in p.toml)"),
            "{errs:?}"
        );

        let bad = def(
            r#"
[[steps]]
type = "model"
model = "gpt-9"
transforms = []
[[steps]]
type = "features"
group = "g"
[[steps]]
type = "pipeline"
pipeline = "nowhere"
[[steps]]
type = "map"
over = "items"
step = { type = "model", model = "nope" }
"#,
            "bad",
        );
        let errs = catalog_check(&[bad]).unwrap_err();
        let has = |needle: &str| {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle} not in {errs:#?}"
            )
        };
        has("pipelines.bad.steps[0].model: no model `gpt-9`");
        has("pipelines.bad.steps[0].transforms: does not apply to a `model` step");
        has("pipelines.bad.steps[1].type: a `features` step needs a feature store");
        has("pipelines.bad.steps[2].pipeline: no pipeline `nowhere`");
        has("pipelines.bad.steps[3].step.model: no model `nope`");
    }

    #[test]
    fn cycles_in_chaining_are_refused() {
        let a = def("[[steps]]\ntype = \"pipeline\"\npipeline = \"b\"\n", "a");
        let b = def("[[steps]]\ntype = \"pipeline\"\npipeline = \"c\"\n", "b");
        let c = def("[[steps]]\ntype = \"pipeline\"\npipeline = \"a\"\n", "c");
        let errs = catalog_check(&[a.clone(), b.clone(), c]).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("cycle: a → b → c → a"), "{errs:?}");
        let selfish = def("[[steps]]\ntype = \"pipeline\"\npipeline = \"s\"\n", "s");
        assert!(catalog_check(&[selfish]).unwrap_err()[0].contains("s → s"));
        let c2 = def("[[steps]]\ntype = \"model\"\nmodel = \"echo\"\n", "c");
        catalog_check(&[a, b, c2]).unwrap();
    }
}
