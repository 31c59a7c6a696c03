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
//! # Weighted routes
//!
//! A bare name with a [`Route`] ([`ModelManager::set_route`], or `[routes.NAME]` in the
//! configuration) is not resolved to one version: each request of a batch goes to the version
//! the route picks for its sticky key, by weight (see `routing`), the batch is split into one
//! call per version, and the outcomes are put back in order. An explicit `name@version` is
//! never routed. [`ModelManager::with_routes`] derives a manager with the same models and
//! other routes; a reload installs one with the new pipeline snapshot.
//!
//! # Executing
//!
//! [`ModelManager::infer`] runs the requests of one batch for one model. When the model has
//! `cache` on and the manager has a [`ResultCache`], each request goes through
//! the [`ResultCache`] keyed by tenant, `name@version` and input, so repeated identical requests
//! share one answer: the misses of a batch go to the provider in **one**
//! [`Provider::infer_batch`] call ([`ResultCache::get_or_compute_batch`], identical inputs in
//! the batch computed once), and a single request waits for an identical call already running
//! ([`ResultCache::get_or_compute`]). Without the cache every request of the batch goes to the
//! provider in one call. [`ModelExecutor`] puts this behind the
//! [`Executor`] trait, with the [`Builtins`] (`identity`, `echo`) as the fallback.
//!
//! # Resilience
//!
//! A provider registered with a [`ProviderPolicy`] gets a [`CircuitBreaker`] and a
//! [`RateLimiter`], shared by every model it answers. Each provider call first waits for the
//! breaker (closed, or this call is the half-open probe) and for rate-limit capacity, then runs,
//! then tells the breaker whether it failed (every outcome a retryable error) and corrects the
//! token estimate by the reported usage. Nothing fails because of them: calls wait.
//! [`ModelManager::admit`] does that waiting for a whole batch ahead of time (the processor
//! calls it through [`Executor::admit`] before its execute timeout starts), and
//! [`ModelManager::hold`] tells the consumer to stop fetching while a breaker is open.
//!
//! # Idle unload
//!
//! A model with [`ModelSpec::unload_after_idle`] is unloaded by [`ModelManager::unload_idle`]
//! (run periodically by [`ModelManager::spawn_idle_sweeper`]) once it has not been used for
//! that long: its provider frees it ([`Provider::unload_model`]; a local model drops its
//! weights). It stays registered, and the next request loads it again
//! ([`Provider::load_model`]) before calling it, transparently; [`ModelManager::admit`] does
//! that load ahead of the execute timeout too.
//!
//! # Statistics
//!
//! Every loaded model keeps counters ([`ModelStats`]) in atomics: requests, errors, cache hits,
//! provider calls and the inputs sent in them, provider latency and tokens, idle unloads and
//! reloads. They start at zero when the model is loaded and go away when it is unloaded. The
//! same events are exported as metrics (`inferflow_provider_*`, see [`crate::metrics`]).
//!
//! # Layout
//!
//! `registry` holds the providers and the loaded models and resolves ids; `routing` holds the
//! weighted routes and splits a batch by them; `lifecycle` loads
//! and unloads models (warm-up, idle unload, reload); `guard` is each provider's breaker and
//! rate limiter around the provider call; `execute` runs batches (through the result cache)
//! and is the [`ModelExecutor`]; `stats` holds the per-model counters.
//!
//! [`Builtins`]: crate::executor::Builtins
//! [`CircuitBreaker`]: crate::providers::breaker::CircuitBreaker
//! [`ErrorKind::UnknownModel`]: crate::model::ErrorKind::UnknownModel
//! [`Executor`]: crate::executor::Executor
//! [`Executor::admit`]: crate::executor::Executor::admit
//! [`Provider::infer_batch`]: crate::providers::Provider::infer_batch
//! [`Provider::load_model`]: crate::providers::Provider::load_model
//! [`Provider::unload_model`]: crate::providers::Provider::unload_model
//! [`RateLimiter`]: crate::providers::ratelimit::RateLimiter
//! [`ResultCache`]: crate::providers::cache::ResultCache
//! [`ResultCache::get_or_compute`]: crate::providers::cache::ResultCache::get_or_compute
//! [`ResultCache::get_or_compute_batch`]: crate::providers::cache::ResultCache::get_or_compute_batch

mod execute;
mod guard;
mod lifecycle;
mod monitor;
mod registry;
mod routing;
mod shadow;
mod stats;

use std::time::Duration;

use super::ProviderError;

pub use execute::{ClassifiedResult, ModelExecutor, ModelFailure, RetryAdvice};
pub use guard::ProviderPolicy;
pub use monitor::{MAX_LABELS, MonitorConfig, PSI_FLOOR, ReferenceWindow, psi};
pub use registry::{ModelManager, ResolvedModel};
pub use routing::{ROUTE_HASH_SEED, Route, RouteError, StickyKey};
pub use shadow::{ShadowConfig, ShadowSink, agreement};
pub use stats::ModelStats;

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
    /// Unload the model after this long without a request (see the
    /// [module documentation](self)); `None` keeps it loaded.
    pub unload_after_idle: Option<Duration>,
}

impl ModelSpec {
    /// `name@version` on `provider` as `remote_model`, with the cache on and no idle unload.
    pub fn new(
        name: impl Into<String>,
        version: impl Into<String>,
        provider: impl Into<String>,
        remote_model: impl Into<String>,
    ) -> Self {
        ModelSpec {
            name: name.into(),
            version: version.into(),
            provider: provider.into(),
            remote_model: remote_model.into(),
            cache: true,
            unload_after_idle: None,
        }
    }

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
