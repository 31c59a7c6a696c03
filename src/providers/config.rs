//! `[providers.*]`, `[models.*]` and `[result_cache]`: the model providers, the models they
//! serve, and the inference result cache, as configuration. [`super::build`] turns them into a
//! running `ModelManager`.
//!
//! ```toml
//! [providers.local.local]               # provider `local`, of kind local
//! max_concurrency = 2
//! [providers.local.local.models.iris]
//! kind = "onnx"
//! path = "models/iris"
//!
//! [providers.gpt.openai]                # provider `gpt`, an OpenAI-compatible server
//! base_url = "http://127.0.0.1:8000/v1"
//! api_key_env = "OPENAI_API_KEY"
//! [providers.gpt.openai.models.chat]
//! task = "chat"
//! [providers.gpt.breaker]               # optional, any provider
//! failure_threshold = 5
//! [providers.gpt.rate_limit]            # optional, any provider
//! requests_per_minute = 600
//!
//! [models."iris@1"]                     # requests name `iris@1`, or `iris` (its only version)
//! provider = "local"
//! remote_model = "iris"                 # the provider's name for it; default: the model name
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::num::{NonZeroU64, NonZeroUsize};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::breaker::BreakerConfig;
use super::cache::ResultCacheConfig;
use super::huggingface::HuggingFaceConfig;
use super::local::LocalConfig;
use super::manager::{MonitorConfig, Route, RouteError, ShadowConfig, StickyKey};
use super::openai::OpenAiConfig;
use super::ratelimit::RateLimitConfig;
use crate::section::{Problems, Section};

/// One `[providers.NAME]` table: exactly one of `openai`, `huggingface` or `local`, plus the
/// optional `breaker` and `rate_limit`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSection {
    /// An OpenAI-compatible HTTP API (OpenAI, vLLM, TGI, Ollama, llama.cpp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openai: Option<OpenAiConfig>,
    /// The Hugging Face Inference API or a text-embeddings-inference server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huggingface: Option<HuggingFaceConfig>,
    /// Models run in process (ONNX, VADER).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalConfig>,
    /// Circuit breaker; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerConfig>,
    /// Rate limits; none when absent.
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
}

/// `[providers]`: providers by name.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProvidersConfig(pub BTreeMap<String, ProviderSection>);

/// One `[models."name@version"]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The provider (a key of `[providers]`) that answers it.
    pub provider: String,
    /// The provider's name for the model; default: the model's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_model: Option<String>,
    /// Serve repeated requests from the result cache (turn off for high-temperature chat).
    #[serde(default = "yes")]
    pub cache: bool,
    /// Unload after this many seconds without a request (reloaded on the next one); 0 keeps
    /// it loaded.
    #[serde(default)]
    pub unload_after_idle_secs: u64,
    /// The version `name` alone refers to. A name with one configured version defaults to it.
    #[serde(default)]
    pub default: bool,
    /// A sample `data` to call the model with once at start-up (warm-up): the model is then
    /// loaded, and known to answer, before the first request. Without it a model loads on its
    /// first request.
    /// (Printed as TOML through `numbers::Plain`: serde_json's exact numbers would otherwise
    /// print as a private struct.)
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::numbers::serialize_plain_option"
    )]
    pub warmup: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}

/// `[models]`: models by `name@version`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ModelsConfig(pub BTreeMap<String, ModelSection>);

impl ModelsConfig {
    /// Splits `name@version`.
    pub fn split_id(id: &str) -> Option<(&str, &str)> {
        let (name, version) = id.split_once('@')?;
        let ok = |s: &str| !s.is_empty() && !s.contains('@') && !s.chars().any(char::is_whitespace);
        (ok(name) && ok(version)).then_some((name, version))
    }

    /// The default version of each model name: the one marked `default`, or the only one.
    pub fn default_versions(&self) -> BTreeMap<String, String> {
        let mut by_name: BTreeMap<&str, Vec<(&str, bool)>> = BTreeMap::new();
        for (id, model) in &self.0 {
            if let Some((name, version)) = Self::split_id(id) {
                by_name
                    .entry(name)
                    .or_default()
                    .push((version, model.default));
            }
        }
        by_name
            .into_iter()
            .filter_map(|(name, versions)| {
                let chosen = match versions.iter().find(|(_, d)| *d) {
                    Some((v, _)) => Some(*v),
                    None if versions.len() == 1 => Some(versions[0].0),
                    None => None,
                };
                chosen.map(|v| (name.to_owned(), v.to_owned()))
            })
            .collect()
    }
}

/// One `[routes.NAME]` table: the versions a bare model name is routed to, by weight.
///
/// ```toml
/// [routes.sentiment]
/// versions = { "1" = 90, "2" = 10 }   # weights, relative; they must add up to more than 0
/// sticky_key = "entity"               # or "request_id"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Weight by version; each version must be configured as `[models."NAME@VERSION"]`.
    pub versions: BTreeMap<String, u32>,
    /// What keeps a caller on one version: the request's entity (default; the request id when
    /// it has none) or the request id.
    #[serde(default)]
    pub sticky_key: StickyKey,
    /// Versions that get a copy of each batch after the primary answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSection>,
    /// Output paths of the versions watched as metrics, with drift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<MonitorSection>,
}

/// `[routes.NAME.monitor]`: which outputs of the route's versions become metrics, and the
/// drift windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorSection {
    /// Dotted output paths with categorical values (`label`).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Dotted output paths with numbers (`compound`).
    #[serde(default)]
    pub scores: Vec<String>,
    /// Bin edges of the scores for the PSI, ascending.
    #[serde(default = "default_score_bins")]
    pub score_bins: Vec<f64>,
    /// The reference window: this long after the route is installed, then frozen.
    #[serde(default = "default_reference_secs")]
    pub reference_secs: NonZeroU64,
    /// The current window, sliding.
    #[serde(default = "default_current_secs")]
    pub current_secs: NonZeroU64,
}

fn default_score_bins() -> Vec<f64> {
    (1..10).map(|i| f64::from(i) / 10.0).collect()
}

fn default_reference_secs() -> NonZeroU64 {
    NonZeroU64::new(3600).unwrap_or(NonZeroU64::MIN)
}

fn default_current_secs() -> NonZeroU64 {
    NonZeroU64::new(900).unwrap_or(NonZeroU64::MIN)
}

/// `[routes.NAME.shadow]`: the route's shadow versions and how their answers are compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSection {
    /// Versions of the route's model, each configured in `[models]`.
    pub versions: Vec<String>,
    /// The output value compared, dotted (`label`, `scores.0`); absent: the whole outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare_path: Option<String>,
    /// Numbers agree when they differ by at most this.
    #[serde(default)]
    pub tolerance: f64,
    /// Batches waiting for the shadows at most; beyond that a batch is dropped (counted).
    #[serde(default = "default_queue_batches")]
    pub queue_batches: NonZeroUsize,
    /// Longest time one shadow call may take.
    #[serde(default = "default_shadow_timeout_ms")]
    pub timeout_ms: NonZeroU64,
}

fn default_queue_batches() -> NonZeroUsize {
    NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN)
}

fn default_shadow_timeout_ms() -> NonZeroU64 {
    NonZeroU64::new(10_000).unwrap_or(NonZeroU64::MIN)
}

impl RouteSection {
    fn route(&self) -> Result<Route, RouteError> {
        let route = Route::new(
            self.versions.iter().map(|(v, w)| (v.clone(), *w)),
            self.sticky_key,
        )?;
        let route = match &self.monitor {
            None => route,
            Some(m) => route.with_monitor(MonitorConfig {
                labels: m.labels.clone(),
                scores: m.scores.clone(),
                score_bins: m.score_bins.clone(),
                reference: Duration::from_secs(m.reference_secs.get()),
                current: Duration::from_secs(m.current_secs.get()),
            }),
        };
        match &self.shadow {
            None => Ok(route),
            Some(s) => route.with_shadow(ShadowConfig {
                versions: s.versions.clone(),
                compare_path: s.compare_path.clone(),
                tolerance: s.tolerance,
                queue_batches: s.queue_batches.get(),
                timeout: Duration::from_millis(s.timeout_ms.get()),
            }),
        }
    }
}

/// `[routes]`: weighted routes by model name.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RoutesConfig(pub BTreeMap<String, RouteSection>);

impl RoutesConfig {
    /// The routes, built; `Err` names the key of the first route that cannot be built (the
    /// configuration's validation reports all of them).
    pub fn routes(&self) -> Result<BTreeMap<String, Route>, String> {
        self.0
            .iter()
            .map(|(name, section)| {
                section
                    .route()
                    .map(|route| (name.clone(), route))
                    .map_err(|e| format!("routes.{name}: {e}"))
            })
            .collect()
    }
}

impl Section for RoutesConfig {
    fn validate(&self, p: &mut Problems) {
        for (name, section) in &self.0 {
            if name.is_empty() || name.contains('@') || name.chars().any(char::is_whitespace) {
                p.push(
                    format!("routes.{name}"),
                    "a route is named by a bare model name (no `@version`, no spaces)",
                );
            }
            if let Err(e) = Route::new(
                section.versions.iter().map(|(v, w)| (v.clone(), *w)),
                section.sticky_key,
            ) {
                p.push(format!("routes.{name}.versions"), e.to_string());
            }
            if let Some(monitor) = &section.monitor {
                let key = format!("routes.{name}.monitor");
                for (field, paths) in [("labels", &monitor.labels), ("scores", &monitor.scores)] {
                    if paths.iter().any(|path| path.split('.').any(str::is_empty)) {
                        p.push(
                            format!("{key}.{field}"),
                            "dotted paths without empty segments (`label`, `scores.0`)",
                        );
                    }
                }
                let bins = &monitor.score_bins;
                if bins.iter().any(|b| !b.is_finite()) || bins.windows(2).any(|w| w[0] >= w[1]) {
                    p.push(
                        format!("{key}.score_bins"),
                        "bin edges must be finite numbers in increasing order",
                    );
                }
            }
            if let Some(shadow) = &section.shadow {
                let key = format!("routes.{name}.shadow");
                if shadow.versions.is_empty() {
                    p.push(format!("{key}.versions"), "names no version");
                }
                if !(shadow.tolerance.is_finite() && shadow.tolerance >= 0.0) {
                    p.push(format!("{key}.tolerance"), "must be a number of at least 0");
                }
                if shadow
                    .compare_path
                    .as_deref()
                    .is_some_and(|path| path.split('.').any(str::is_empty))
                {
                    p.push(
                        format!("{key}.compare_path"),
                        "a dotted path without empty segments (`label`, `scores.0`)",
                    );
                }
            }
        }
    }
}

/// Cross-checks of `[routes]` against `[models]`: every version a route names is configured.
pub(crate) fn check_routes_against_models(
    routes: &RoutesConfig,
    models: &ModelsConfig,
    p: &mut Problems,
) {
    for (name, section) in &routes.0 {
        let configured: Vec<&str> = models
            .0
            .keys()
            .filter_map(|id| ModelsConfig::split_id(id))
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v)
            .collect();
        let shadows = section.shadow.iter().flat_map(|s| s.versions.iter());
        let keys = section
            .versions
            .keys()
            .map(|v| (v, format!("routes.{name}.versions.\"{v}\"")))
            .chain(shadows.map(|v| (v, format!("routes.{name}.shadow.versions"))));
        for (version, key) in keys {
            if !configured.contains(&version.as_str()) {
                p.push(
                    key,
                    format!(
                        "`{name}@{version}` is not a configured model (configured versions of `{name}`: {})",
                        if configured.is_empty() {
                            "none".to_owned()
                        } else {
                            configured.join(", ")
                        }
                    ),
                );
            }
        }
    }
}

impl Section for ProvidersConfig {
    fn validate(&self, p: &mut Problems) {
        for (name, provider) in &self.0 {
            let key = format!("providers.{name}");
            let kinds = [
                provider.openai.is_some(),
                provider.huggingface.is_some(),
                provider.local.is_some(),
            ];
            match kinds.iter().filter(|k| **k).count() {
                1 => {}
                0 => p.push(
                    key.clone(),
                    "names no kind: add one of the tables openai, huggingface or local",
                ),
                _ => p.push(
                    key.clone(),
                    "names more than one kind: keep one of openai, huggingface or local",
                ),
            }
            let mut problems = Vec::new();
            if let Some(breaker) = &provider.breaker {
                breaker.validate("breaker", &mut problems);
            }
            provider.rate_limit.validate("rate_limit", &mut problems);
            for problem in problems {
                // The provider modules phrase problems as `key.sub: what`; keep the key path.
                match problem.split_once(' ') {
                    Some((path, rest)) if path.contains('.') || path.ends_with(':') => p.push(
                        format!("{key}.{}", path.trim_end_matches(':')),
                        rest.to_owned(),
                    ),
                    _ => p.push(key.clone(), problem),
                }
            }
        }
    }
}

impl Section for ModelsConfig {
    fn validate(&self, p: &mut Problems) {
        let mut defaults: BTreeMap<&str, usize> = BTreeMap::new();
        for (id, model) in &self.0 {
            let key = format!("models.\"{id}\"");
            match Self::split_id(id) {
                None => p.push(
                    key.clone(),
                    "a model id is `name@version` (for example `sentiment@1`), without spaces",
                ),
                Some((name, _)) => {
                    if model.default {
                        *defaults.entry(name).or_default() += 1;
                    }
                }
            }
            if model.provider.trim().is_empty() {
                p.push(format!("{key}.provider"), "must name a provider");
            }
        }
        for (name, count) in defaults {
            if count > 1 {
                p.push(
                    "models",
                    format!("model `{name}` has {count} versions marked default; keep one"),
                );
            }
        }
    }
}

impl Section for ResultCacheConfig {
    fn validate(&self, p: &mut Problems) {
        for problem in self.problems() {
            // `cache.max_entries must be ...` → key `result_cache.max_entries`.
            let (path, rest) = problem.split_once(' ').unwrap_or((problem.as_str(), ""));
            let path = path.trim_start_matches("cache.");
            p.push(format!("result_cache.{path}"), rest.to_owned());
        }
    }
}

/// Cross-checks of `[models]` against `[providers]`: every model names a configured provider,
/// and a local provider's model exists in its table.
pub(crate) fn check_models_against_providers(
    models: &ModelsConfig,
    providers: &ProvidersConfig,
    p: &mut Problems,
) {
    let names: BTreeSet<&str> = providers.0.keys().map(String::as_str).collect();
    for (id, model) in &models.0 {
        let key = format!("models.\"{id}\".provider");
        let Some(provider) = providers.0.get(&model.provider) else {
            p.push(
                key,
                format!(
                    "`{}` is not a configured provider (configured: {})",
                    model.provider,
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.iter().copied().collect::<Vec<_>>().join(", ")
                    }
                ),
            );
            continue;
        };
        let remote = model
            .remote_model
            .clone()
            .or_else(|| ModelsConfig::split_id(id).map(|(n, _)| n.to_owned()))
            .unwrap_or_default();
        if let Some(local) = &provider.local
            && !local.models.contains_key(&remote)
        {
            p.push(
                format!("models.\"{id}\".remote_model"),
                format!(
                    "`{remote}` is not a model of local provider `{}` (it has: {})",
                    model.provider,
                    local.models.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        }
    }
}
