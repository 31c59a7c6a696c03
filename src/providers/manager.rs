//! The model registry: which models exist, which provider answers each, and how they were used.
//!
//! A [`ModelManager`] holds named providers ([`ModelManager::register_provider`]) and loaded
//! models ([`ModelManager::load_model`]). A model is loaded as `name@version` and names the
//! provider that answers it and the model name that provider knows (`remote_model`), so
//! `sentiment@2` can be `gpt-4o-mini` on an OpenAI-compatible provider today and a local model
//! tomorrow without requests changing.
//!
//! # Resolving a model id
//!
//! A request names `name@version` or just `name`. An explicit version must be loaded. A bare
//! name resolves to, in order:
//!
//! 1. the default version set with [`ModelManager::set_default_version`] (if that version is
//!    not loaded, the request fails with `unknown_model` rather than silently using another);
//! 2. the only loaded version, when there is exactly one;
//! 3. the highest loaded version, comparing versions as "natural" strings: runs of digits
//!    compare as numbers and everything else byte by byte, so `1.10` > `1.9`, `v10` > `v2` and
//!    `2024-06-01` > `2024-05-31`. There are no semver pre-release rules: `1.0.0-rc1` sorts
//!    *after* `1.0.0`, so set a default version when that matters.
//!
//! An unknown model fails with [`ErrorKind::UnknownModel`] and a message listing the loaded ids.
//!
//! # Executing
//!
//! [`ModelManager::infer`] runs the requests of one batch for one model. When the model has
//! `cache` on and the manager has a [`ResultCache`], each request goes through
//! [`ResultCache::get_or_compute`] keyed by tenant, `name@version` and input, so repeated and
//! concurrent identical requests share one answer (misses are then one provider call per
//! input, run concurrently). Otherwise every request of the batch goes to the provider in
//! **one** [`Provider::infer_batch`] call. [`ModelExecutor`] puts this behind the
//! [`Executor`] trait, with the [`Builtins`] (`identity`, `echo`) as the fallback.
//!
//! # Statistics
//!
//! Every loaded model keeps counters ([`ModelStats`]) in atomics: requests, errors, cache hits,
//! provider calls and the inputs sent in them, provider latency and tokens. They start at zero
//! when the model is loaded and go away when it is unloaded.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use futures::future::{BoxFuture, join_all};

use super::cache::{CacheKey, CachePolicy, ResultCache};
use super::{Provider, ProviderError, ProviderInput, ProviderOutput};
use crate::executor::{Builtins, ExecOutput, ExecRequest, ExecResult, Executor};
use crate::model::{ErrorBody, ErrorKind, StepRecord, Target};

/// A model to load: `name@version`, answered by `provider` as `remote_model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The model's name, as requests spell it (no `@`).
    pub name: String,
    /// The version (no `@`).
    pub version: String,
    /// The registered provider that answers it.
    pub provider: String,
    /// The model name the provider knows (e.g. `gpt-4o-mini`).
    pub remote_model: String,
    /// Whether answers may be served from, and stored in, the result cache. Turn it off for
    /// models whose answers should not be reused (high-temperature chat).
    pub cache: bool,
}

impl ModelSpec {
    /// The model's id, `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Why a model could not be loaded or unloaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// The name or version is empty or contains `@`.
    #[error("invalid model id `{id}`: name and version must be non-empty and contain no `@`")]
    InvalidId {
        /// The id as given.
        id: String,
    },
    /// No provider is registered under this name.
    #[error("no provider `{provider}` (registered: {known})")]
    UnknownProvider {
        /// The provider asked for.
        provider: String,
        /// The registered providers, comma-separated.
        known: String,
    },
    /// This `name@version` is already loaded; unload it first.
    #[error("model `{id}` is already loaded")]
    AlreadyLoaded {
        /// The model's id.
        id: String,
    },
    /// No model is loaded under this `name@version`.
    #[error("no model `{id}` is loaded (loaded: {known})")]
    NotLoaded {
        /// The id asked for.
        id: String,
        /// The loaded ids, comma-separated.
        known: String,
    },
    /// The warm-up call failed, so the model was not loaded.
    #[error("warm-up of model `{id}` failed: {error}")]
    WarmUp {
        /// The model's id.
        id: String,
        /// What the provider said.
        error: ProviderError,
    },
}

/// Usage of one loaded model since it was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ModelStats {
    /// Requests answered (successfully or not), including cache hits.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Requests answered from the result cache (hits and coalesced calls).
    pub cache_hits: u64,
    /// Calls made to the provider ([`Provider::infer_batch`]).
    pub provider_calls: u64,
    /// Inputs sent in those calls.
    pub provider_inputs: u64,
    /// Outcomes of those calls that were errors.
    pub provider_errors: u64,
    /// Time spent in provider calls, microseconds.
    pub total_latency_us: u64,
    /// Prompt tokens the provider reported.
    pub prompt_tokens: u64,
    /// Completion tokens the provider reported.
    pub completion_tokens: u64,
    /// Total tokens the provider reported.
    pub total_tokens: u64,
}

impl ModelStats {
    /// Mean time of one provider call, microseconds (zero before the first call).
    pub fn mean_latency_us(&self) -> u64 {
        self.total_latency_us
            .checked_div(self.provider_calls)
            .unwrap_or(0)
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    cache_hits: AtomicU64,
    provider_calls: AtomicU64,
    provider_inputs: AtomicU64,
    provider_errors: AtomicU64,
    total_latency_us: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    total_tokens: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, AtomicOrdering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> ModelStats {
        let get = |c: &AtomicU64| c.load(AtomicOrdering::Relaxed);
        ModelStats {
            requests: get(&self.requests),
            errors: get(&self.errors),
            cache_hits: get(&self.cache_hits),
            provider_calls: get(&self.provider_calls),
            provider_inputs: get(&self.provider_inputs),
            provider_errors: get(&self.provider_errors),
            total_latency_us: get(&self.total_latency_us),
            prompt_tokens: get(&self.prompt_tokens),
            completion_tokens: get(&self.completion_tokens),
            total_tokens: get(&self.total_tokens),
        }
    }
}

/// A loaded model, as a request resolved to it.
#[derive(Clone)]
pub struct ResolvedModel {
    spec: ModelSpec,
    id: String,
    provider: Arc<dyn Provider>,
    counters: Arc<Counters>,
}

impl fmt::Debug for ResolvedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedModel")
            .field("id", &self.id)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl ResolvedModel {
    /// `name@version`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What it was loaded with.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Calls the provider once with `inputs`, recording the call in the model's statistics.
    /// Always returns one outcome per input.
    async fn call(&self, inputs: Vec<ProviderInput>) -> Vec<Result<ProviderOutput, ProviderError>> {
        let n = inputs.len();
        let started = Instant::now();
        let mut outcomes = self
            .provider
            .infer_batch(&self.spec.remote_model, inputs)
            .await;
        let c = &self.counters;
        add(&c.provider_calls, 1);
        add(&c.provider_inputs, n as u64);
        add(&c.total_latency_us, started.elapsed().as_micros() as u64);
        if outcomes.len() != n {
            let error = ProviderError::InvalidResponse {
                message: format!(
                    "provider returned {} outcomes for {n} inputs",
                    outcomes.len()
                ),
            };
            outcomes = vec![Err(error); n];
        }
        for outcome in &outcomes {
            match outcome {
                Ok(output) => {
                    if let Some(usage) = output.usage {
                        add(&c.prompt_tokens, usage.prompt_tokens);
                        add(&c.completion_tokens, usage.completion_tokens);
                        add(&c.total_tokens, usage.total_tokens);
                    }
                }
                Err(_) => add(&c.provider_errors, 1),
            }
        }
        outcomes
    }
}

/// The versions of one model name.
#[derive(Default)]
struct Family {
    versions: BTreeMap<String, ResolvedModel>,
}

#[derive(Default)]
struct Registry {
    providers: BTreeMap<String, Arc<dyn Provider>>,
    models: BTreeMap<String, Family>,
    defaults: HashMap<String, String>,
    /// Every id ever loaded, so reloading one clears the cache of the old answers.
    ever_loaded: HashSet<String>,
}

impl Registry {
    /// The loaded ids and then `extra`, comma-separated, or `none`.
    fn known_ids(&self, extra: &[&str]) -> String {
        let ids: Vec<String> = self
            .models
            .values()
            .flat_map(|f| f.versions.values().map(|m| m.id.clone()))
            .chain(extra.iter().map(|s| (*s).to_owned()))
            .collect();
        if ids.is_empty() {
            "none".to_owned()
        } else {
            ids.join(", ")
        }
    }
}

/// Providers, loaded models, default versions and usage statistics. Share it as
/// `Arc<ModelManager>`; every method takes `&self`.
#[derive(Default)]
pub struct ModelManager {
    registry: RwLock<Registry>,
    cache: Option<ResultCache>,
}

impl fmt::Debug for ModelManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let registry = self.read();
        f.debug_struct("ModelManager")
            .field("providers", &registry.providers.keys().collect::<Vec<_>>())
            .field("models", &registry.known_ids(&[]))
            .field("cache", &self.cache.is_some())
            .finish()
    }
}

fn valid_part(s: &str) -> bool {
    !s.is_empty() && !s.contains('@')
}

impl ModelManager {
    /// A manager without providers, models or result cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// A manager whose models with `cache` on use `cache`.
    pub fn with_cache(cache: ResultCache) -> Self {
        ModelManager {
            registry: RwLock::default(),
            cache: Some(cache),
        }
    }

    /// The result cache, if any.
    pub fn cache(&self) -> Option<&ResultCache> {
        self.cache.as_ref()
    }

    // The lock is never held across an await, and a panic while holding it leaves the registry
    // consistent (every update is a single insert or remove), so poisoning is ignored.
    fn read(&self) -> RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `provider` as `name`, replacing any provider of that name for models loaded
    /// from now on (loaded models keep the provider they were loaded with).
    pub fn register_provider(&self, name: impl Into<String>, provider: Arc<dyn Provider>) {
        self.write().providers.insert(name.into(), provider);
    }

    /// The registered provider names, sorted.
    pub fn providers(&self) -> Vec<String> {
        self.read().providers.keys().cloned().collect()
    }

    fn check_spec(&self, spec: &ModelSpec) -> Result<Arc<dyn Provider>, ManagerError> {
        if !valid_part(&spec.name) || !valid_part(&spec.version) {
            return Err(ManagerError::InvalidId { id: spec.id() });
        }
        let registry = self.read();
        if registry
            .models
            .get(&spec.name)
            .is_some_and(|f| f.versions.contains_key(&spec.version))
        {
            return Err(ManagerError::AlreadyLoaded { id: spec.id() });
        }
        registry
            .providers
            .get(&spec.provider)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = registry.providers.keys().map(String::as_str).collect();
                ManagerError::UnknownProvider {
                    provider: spec.provider.clone(),
                    known: if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    },
                }
            })
    }

    fn insert(&self, spec: ModelSpec, provider: Arc<dyn Provider>) -> Result<(), ManagerError> {
        let id = spec.id();
        let reloaded = {
            let mut registry = self.write();
            let family = registry.models.entry(spec.name.clone()).or_default();
            if family.versions.contains_key(&spec.version) {
                return Err(ManagerError::AlreadyLoaded { id });
            }
            family.versions.insert(
                spec.version.clone(),
                ResolvedModel {
                    spec,
                    id: id.clone(),
                    provider,
                    counters: Arc::default(),
                },
            );
            !registry.ever_loaded.insert(id)
        };
        // The same id may now mean another provider or remote model: drop the old answers.
        if reloaded {
            if let Some(cache) = &self.cache {
                cache.invalidate_all();
            }
        }
        Ok(())
    }

    /// Loads `spec`. Fails when the id is invalid or already loaded, or the provider is not
    /// registered.
    pub fn load_model(&self, spec: ModelSpec) -> Result<(), ManagerError> {
        let provider = self.check_spec(&spec)?;
        self.insert(spec, provider)
    }

    /// Loads `spec` after calling its provider once with `sample`; fails, loading nothing, when
    /// that call fails. The warm-up call is not counted in the statistics.
    pub async fn load_model_with_warmup(
        &self,
        spec: ModelSpec,
        sample: ProviderInput,
    ) -> Result<(), ManagerError> {
        let provider = self.check_spec(&spec)?;
        let outcome = provider
            .infer_batch(&spec.remote_model, vec![sample])
            .await
            .into_iter()
            .next()
            .unwrap_or_else(|| {
                Err(ProviderError::InvalidResponse {
                    message: "provider returned no outcome for the warm-up input".to_owned(),
                })
            });
        if let Err(error) = outcome {
            return Err(ManagerError::WarmUp {
                id: spec.id(),
                error,
            });
        }
        self.insert(spec, provider)
    }

    /// Unloads `name@version` (the version is required), returning what it was loaded with.
    /// Its statistics go with it; a default version naming it stays set.
    pub fn unload_model(&self, id: &str) -> Result<ModelSpec, ManagerError> {
        let mut registry = self.write();
        let removed = id.split_once('@').and_then(|(name, version)| {
            let family = registry.models.get_mut(name)?;
            let model = family.versions.remove(version)?;
            if family.versions.is_empty() {
                registry.models.remove(name);
            }
            Some(model.spec)
        });
        removed.ok_or_else(|| ManagerError::NotLoaded {
            id: id.to_owned(),
            known: registry.known_ids(&[]),
        })
    }

    /// Makes `version` what a bare `name` resolves to. It may be set before that version is
    /// loaded; while it is not loaded, requests for the bare name fail with `unknown_model`.
    pub fn set_default_version(&self, name: impl Into<String>, version: impl Into<String>) {
        self.write().defaults.insert(name.into(), version.into());
    }

    /// Forgets the default version of `name`, returning it.
    pub fn clear_default_version(&self, name: &str) -> Option<String> {
        self.write().defaults.remove(name)
    }

    /// The loaded ids (`name@version`), sorted by name, then version.
    pub fn model_ids(&self) -> Vec<String> {
        let registry = self.read();
        registry
            .models
            .values()
            .flat_map(|f| f.versions.values().map(|m| m.id.clone()))
            .collect()
    }

    /// Resolves `id` (`name` or `name@version`) to a loaded model, by the rules in the
    /// [module documentation](self).
    pub fn resolve(&self, id: &str) -> Result<ResolvedModel, ErrorBody> {
        self.resolve_listing(id, &[])
    }

    /// [`resolve`](Self::resolve), naming `extra` among the known ids in the error.
    fn resolve_listing(&self, id: &str, extra: &[&str]) -> Result<ResolvedModel, ErrorBody> {
        let registry = self.read();
        let unknown = |why: String| {
            ErrorBody::new(
                ErrorKind::UnknownModel,
                format!("{why} (known: {})", registry.known_ids(extra)),
            )
        };
        let (name, version) = match id.split_once('@') {
            Some((name, version)) => (name, Some(version)),
            None => (id, None),
        };
        let Some(family) = registry.models.get(name) else {
            return Err(unknown(format!("no model `{id}`")));
        };
        let found = match version {
            Some(version) => family.versions.get(version),
            None => match registry.defaults.get(name) {
                Some(default) => {
                    return family.versions.get(default).cloned().ok_or_else(|| {
                        unknown(format!(
                            "default version `{default}` of model `{name}` is not loaded"
                        ))
                    });
                }
                None => family
                    .versions
                    .iter()
                    .max_by(|a, b| compare_versions(a.0, b.0).then_with(|| a.0.cmp(b.0)))
                    .map(|(_, m)| m),
            },
        };
        found
            .cloned()
            .ok_or_else(|| unknown(format!("no model `{id}`")))
    }

    /// Usage of `name@version` since it was loaded, or `None` when it is not loaded.
    pub fn stats(&self, id: &str) -> Option<ModelStats> {
        let (name, version) = id.split_once('@')?;
        let registry = self.read();
        let model = registry.models.get(name)?.versions.get(version)?;
        Some(model.counters.snapshot())
    }

    /// Usage of every loaded model, by id.
    pub fn all_stats(&self) -> BTreeMap<String, ModelStats> {
        let registry = self.read();
        registry
            .models
            .values()
            .flat_map(|f| f.versions.values())
            .map(|m| (m.id.clone(), m.counters.snapshot()))
            .collect()
    }

    /// Runs `requests` through the model `id` resolves to; one outcome per request, in order.
    pub async fn infer(&self, id: &str, requests: Vec<ExecRequest>) -> Vec<ExecResult> {
        match self.resolve(id) {
            Ok(model) => self.infer_resolved(&model, requests).await,
            Err(error) => vec![Err(error); requests.len()],
        }
    }

    async fn infer_resolved(
        &self,
        model: &ResolvedModel,
        requests: Vec<ExecRequest>,
    ) -> Vec<ExecResult> {
        let n = requests.len();
        let outcomes: Vec<(Result<ProviderOutput, ProviderError>, bool, u64)> =
            match (&self.cache, model.spec.cache) {
                (Some(cache), true) => {
                    let calls = requests.into_iter().map(|r| {
                        let input = ProviderInput::with_parameters(r.data, r.parameters);
                        let key = CacheKey::new(r.tenant.as_deref(), &model.id, &input);
                        async move {
                            let started = Instant::now();
                            let (outcome, status) = cache
                                .get_or_compute(key, CachePolicy::ENABLED, || async move {
                                    model.call(vec![input]).await.remove(0)
                                })
                                .await;
                            let latency = started.elapsed().as_micros() as u64;
                            (outcome, status.served_from_cache(), latency)
                        }
                    });
                    join_all(calls).await
                }
                _ => {
                    let inputs = requests
                        .into_iter()
                        .map(|r| ProviderInput::with_parameters(r.data, r.parameters))
                        .collect();
                    let started = Instant::now();
                    let outcomes = if n == 0 {
                        Vec::new()
                    } else {
                        model.call(inputs).await
                    };
                    let latency = started.elapsed().as_micros() as u64;
                    outcomes.into_iter().map(|o| (o, false, latency)).collect()
                }
            };
        let c = &model.counters;
        add(&c.requests, n as u64);
        let step_name = format!("model:{}", model.id);
        outcomes
            .into_iter()
            .map(|(outcome, cached, latency_us)| {
                if cached {
                    add(&c.cache_hits, 1);
                }
                match outcome {
                    Ok(out) => Ok(ExecOutput {
                        output: out.output,
                        model_version: Some(model.spec.version.clone()),
                        cached,
                        steps: vec![StepRecord {
                            name: step_name.clone(),
                            latency_us,
                            cached,
                            output: None,
                        }],
                    }),
                    Err(error) => {
                        add(&c.errors, 1);
                        Err(error.into())
                    }
                }
            })
            .collect()
    }
}

/// Compares versions "naturally": digit runs as numbers, other runs byte by byte.
fn compare_versions(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let (da, ra) = split_digits(a);
                let (db, rb) = split_digits(b);
                let (ta, tb) = (trim_zeros(da), trim_zeros(db));
                let ord = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb));
                if ord != Ordering::Equal {
                    return ord;
                }
                (a, b) = (ra, rb);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                (a, b) = (&a[1..], &b[1..]);
            }
        }
    }
}

fn split_digits(s: &[u8]) -> (&[u8], &[u8]) {
    let end = s
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(s.len());
    s.split_at(end)
}

fn trim_zeros(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&c| c != b'0').unwrap_or(s.len());
    &s[start..]
}

/// An [`Executor`] for models in a [`ModelManager`], falling back to the [`Builtins`] for
/// pipelines and for model ids the manager does not know (`echo`).
#[derive(Debug, Clone)]
pub struct ModelExecutor {
    manager: Arc<ModelManager>,
    builtins: Builtins,
}

impl ModelExecutor {
    /// An executor over `manager`.
    pub fn new(manager: Arc<ModelManager>) -> Self {
        ModelExecutor {
            manager,
            builtins: Builtins,
        }
    }

    /// The manager.
    pub fn manager(&self) -> &Arc<ModelManager> {
        &self.manager
    }
}

/// Model ids the [`Builtins`] answer.
const BUILTIN_MODELS: [&str; 2] = ["echo", "echo@1"];

impl Executor for ModelExecutor {
    fn execute<'a>(
        &'a self,
        target: &'a Target,
        requests: Vec<ExecRequest>,
    ) -> BoxFuture<'a, Vec<ExecResult>> {
        Box::pin(async move {
            let id = match target {
                Target::Model(id) => id,
                // Pipelines come later; for now the built-in `identity` answers.
                Target::Pipeline(_) => return self.builtins.execute(target, requests).await,
            };
            match self.manager.resolve_listing(id, &BUILTIN_MODELS) {
                Ok(model) => self.manager.infer_resolved(&model, requests).await,
                Err(_) if BUILTIN_MODELS.contains(&id.as_str()) => {
                    self.builtins.execute(target, requests).await
                }
                Err(error) => vec![Err(error); requests.len()],
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_naturally() {
        let mut v = vec!["1.9", "1.10", "v2", "v10", "1.0.0", "1", "01.2", "1.2", "a"];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(
            v,
            ["1", "1.0.0", "01.2", "1.2", "1.9", "1.10", "a", "v2", "v10"]
        );
        assert_eq!(
            compare_versions("2024-06-01", "2024-05-31"),
            Ordering::Greater
        );
        assert_eq!(compare_versions("10", "9"), Ordering::Greater);
        assert_eq!(compare_versions("", "0"), Ordering::Less);
    }
}
