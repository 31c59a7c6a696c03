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

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, join_all};
use serde::{Deserialize, Serialize};

use super::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use super::cache::{CacheKey, CachePolicy, ResultCache};
use super::ratelimit::{RateLimitConfig, RateLimiter};
use super::{BuildError, Provider, ProviderError, ProviderInput, ProviderOutput, estimate_tokens};
use crate::executor::{Builtins, ExecOutput, ExecRequest, ExecResult, Executor};
use crate::metrics as m;
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

/// Why a model call failed for one request, classified for whoever might call again: the
/// error as it goes on the wire, and whether trying again is the caller's business.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFailure {
    /// The error as it goes on the wire.
    pub body: ErrorBody,
    /// Whether the caller may try the request again.
    pub retry: RetryAdvice,
}

/// Whether a failed model call may be tried again by its caller, and why (or why not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAdvice {
    /// Trying again cannot help: bad input or parameters, refused credentials (401, 403), a
    /// rejected request (other 4xx), a malformed response, an unknown model, a local model
    /// that failed.
    Never,
    /// The failure is transient (5xx, 408, 409, 429, timeout, connection), but the provider
    /// retries such failures itself ([`Provider::retries_itself`]) and this one has had every
    /// attempt its retry policy allows: the attempt count is spent.
    Spent,
    /// The failure is transient and nothing retried it yet: the caller may.
    Allowed,
}

impl ModelFailure {
    /// Classifies what `provider` returned.
    fn from_provider(error: ProviderError, provider: &dyn Provider) -> Self {
        let retry = if !error.retryable() {
            RetryAdvice::Never
        } else if provider.retries_itself() {
            RetryAdvice::Spent
        } else {
            RetryAdvice::Allowed
        };
        ModelFailure {
            body: error.into(),
            retry,
        }
    }

    /// A failure that retrying cannot fix.
    pub fn never(body: ErrorBody) -> Self {
        ModelFailure {
            body,
            retry: RetryAdvice::Never,
        }
    }
}

/// An outcome of [`ModelExecutor::execute_classified`].
pub type ClassifiedResult = Result<ExecOutput, ModelFailure>;

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
    /// Times the model was unloaded for idleness.
    pub idle_unloads: u64,
    /// Times it was loaded again after an idle unload.
    pub reloads: u64,
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
    idle_unloads: AtomicU64,
    reloads: AtomicU64,
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
            idle_unloads: get(&self.idle_unloads),
            reloads: get(&self.reloads),
        }
    }
}

/// Resilience settings of one provider: a circuit breaker and rate limits. Both are off by
/// default.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderPolicy {
    /// The circuit breaker, when set.
    pub breaker: Option<BreakerConfig>,
    /// Requests and tokens per minute (no limit when empty).
    pub rate_limit: RateLimitConfig,
}

impl ProviderPolicy {
    /// Every problem, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(breaker) = &self.breaker {
            breaker.validate("breaker", &mut problems);
        }
        self.rate_limit.validate("rate_limit", &mut problems);
        problems
    }
}

/// A registered provider with its breaker and rate limiter.
struct Guarded {
    provider: Arc<dyn Provider>,
    guard: Arc<Guard>,
}

/// The breaker and limiter of one provider, shared by its models.
struct Guard {
    name: String,
    breaker: Option<Arc<CircuitBreaker>>,
    limiter: Option<RateLimiter>,
    /// Estimated tokens per input over recent calls (a moving average), for admitting a batch
    /// before its inputs are looked at.
    tokens_per_input: AtomicU64,
}

impl Guard {
    fn new(name: String, policy: ProviderPolicy) -> Self {
        let breaker = policy.breaker.map(|c| Arc::new(CircuitBreaker::new(c)));
        let limiter =
            (!policy.rate_limit.is_unlimited()).then(|| RateLimiter::new(policy.rate_limit));
        if breaker.is_some() {
            metrics::gauge!(m::PROVIDER_BREAKER_STATE, "provider" => name.clone()).set(0.0);
        }
        Guard {
            name,
            breaker,
            limiter,
            tokens_per_input: AtomicU64::new(0),
        }
    }

    fn learn_tokens_per_input(&self, estimated: u64, inputs: usize) {
        if inputs == 0 {
            return;
        }
        let sample = estimated / inputs as u64;
        let old = self.tokens_per_input.load(AtomicOrdering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 7 + sample).div_ceil(8)
        };
        self.tokens_per_input.store(new, AtomicOrdering::Relaxed);
    }

    fn record_wait(&self, wait: Duration, what: &'static str, stage: &'static str) {
        metrics::histogram!(
            m::PROVIDER_WAIT_SECONDS,
            "provider" => self.name.clone(),
            "wait" => what,
            "stage" => stage
        )
        .record(wait.as_secs_f64());
    }
}

/// Load state of a model with idle unload.
struct Lifecycle {
    /// False after an idle unload, until the next load.
    loaded: AtomicBool,
    /// When it was last used, in nanoseconds after `epoch`.
    last_used_ns: AtomicU64,
    epoch: tokio::time::Instant,
    /// Batches running now; the sweeper leaves a busy model alone.
    in_flight: AtomicUsize,
    /// Held while loading or unloading.
    transition: tokio::sync::Mutex<()>,
}

impl Lifecycle {
    fn new(loaded: bool) -> Self {
        Lifecycle {
            loaded: AtomicBool::new(loaded),
            last_used_ns: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            transition: tokio::sync::Mutex::new(()),
        }
    }

    fn touch(&self) {
        let ns = self.epoch.elapsed().as_nanos();
        self.last_used_ns.store(
            u64::try_from(ns).unwrap_or(u64::MAX),
            AtomicOrdering::Relaxed,
        );
    }

    fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed();
        now.saturating_sub(Duration::from_nanos(
            self.last_used_ns.load(AtomicOrdering::Relaxed),
        ))
    }
}

/// Counts a batch in flight while alive.
struct InFlight<'a>(&'a Lifecycle);

impl<'a> InFlight<'a> {
    fn new(life: &'a Lifecycle) -> Self {
        life.in_flight.fetch_add(1, AtomicOrdering::AcqRel);
        life.touch();
        InFlight(life)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, AtomicOrdering::AcqRel);
    }
}

/// A loaded model, as a request resolved to it.
#[derive(Clone)]
pub struct ResolvedModel {
    spec: ModelSpec,
    id: String,
    provider: Arc<dyn Provider>,
    guard: Arc<Guard>,
    life: Arc<Lifecycle>,
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

    /// True once the provider has loaded the model: after a warm-up load or the first use, and
    /// until an idle unload.
    pub fn is_loaded(&self) -> bool {
        self.life.loaded.load(AtomicOrdering::Acquire)
    }

    /// Asks the provider to load the model when it has not yet (a model registered without
    /// warm-up) or was unloaded for idleness. A no-op for remote providers.
    async fn ensure_loaded(&self) -> Result<(), ProviderError> {
        if self.is_loaded() {
            return Ok(());
        }
        let _transition = self.life.transition.lock().await;
        if self.is_loaded() {
            return Ok(());
        }
        self.provider.load_model(&self.spec.remote_model).await?;
        self.life.loaded.store(true, AtomicOrdering::Release);
        if self.counters.idle_unloads.load(AtomicOrdering::Relaxed) > 0 {
            add(&self.counters.reloads, 1);
            metrics::counter!(m::MODEL_LIFECYCLE_TOTAL, "model" => self.id.clone(), "event" => "reload")
                .increment(1);
            tracing::info!(model = %self.id, "model loaded again after an idle unload");
        }
        Ok(())
    }

    /// Calls the provider once with `inputs`, after the breaker and the rate limiter let it,
    /// recording the call in the model's statistics, the breaker and the metrics. Always
    /// returns one outcome per input.
    async fn call(&self, inputs: Vec<ProviderInput>) -> Vec<Result<ProviderOutput, ProviderError>> {
        let n = inputs.len();
        let guard = &self.guard;
        let estimated: u64 = inputs.iter().map(estimate_tokens).sum();
        guard.learn_tokens_per_input(estimated, n);
        let permit = match &guard.breaker {
            Some(breaker) => {
                let waiting = Instant::now();
                let permit = breaker.acquire().await;
                guard.record_wait(waiting.elapsed(), "breaker", "call");
                if permit.is_probe() {
                    metrics::gauge!(m::PROVIDER_BREAKER_STATE, "provider" => guard.name.clone())
                        .set(BreakerState::HalfOpen.gauge());
                }
                Some(permit)
            }
            None => None,
        };
        if let Some(limiter) = &guard.limiter {
            let calls = self.provider.api_calls(&self.spec.remote_model, n) as u64;
            let waited = limiter.acquire(calls, estimated).await;
            guard.record_wait(waited, "rate_limit", "call");
        }
        let started = Instant::now();
        let mut outcomes = self
            .provider
            .infer_batch(&self.spec.remote_model, inputs)
            .await;
        let elapsed = started.elapsed();
        let c = &self.counters;
        add(&c.provider_calls, 1);
        add(&c.provider_inputs, n as u64);
        add(&c.total_latency_us, elapsed.as_micros() as u64);
        let labels = [("provider", guard.name.clone()), ("model", self.id.clone())];
        metrics::counter!(m::PROVIDER_CALLS_TOTAL, &labels).increment(1);
        metrics::counter!(m::PROVIDER_INPUTS_TOTAL, &labels).increment(n as u64);
        metrics::histogram!(m::PROVIDER_LATENCY_SECONDS, &labels).record(elapsed.as_secs_f64());
        if outcomes.len() != n {
            let error = ProviderError::InvalidResponse {
                message: format!(
                    "provider returned {} outcomes for {n} inputs",
                    outcomes.len()
                ),
            };
            outcomes = vec![Err(error); n];
        }
        let mut reported: Option<TokenCounts> = None;
        for outcome in &outcomes {
            match outcome {
                Ok(output) => {
                    if let Some(usage) = output.usage {
                        add(&c.prompt_tokens, usage.prompt_tokens);
                        add(&c.completion_tokens, usage.completion_tokens);
                        add(&c.total_tokens, usage.total_tokens);
                        let sum = reported.get_or_insert_with(TokenCounts::default);
                        sum.prompt += usage.prompt_tokens;
                        sum.completion += usage.completion_tokens;
                        sum.total += usage.total_tokens;
                    }
                }
                Err(error) => {
                    add(&c.provider_errors, 1);
                    metrics::counter!(
                        m::PROVIDER_ERRORS_TOTAL,
                        "provider" => guard.name.clone(),
                        "model" => self.id.clone(),
                        "kind" => error.label()
                    )
                    .increment(1);
                }
            }
        }
        if let Some(sum) = reported {
            metrics::counter!(
                m::PROVIDER_TOKENS_TOTAL,
                "provider" => guard.name.clone(),
                "model" => self.id.clone(),
                "type" => "prompt"
            )
            .increment(sum.prompt);
            metrics::counter!(
                m::PROVIDER_TOKENS_TOTAL,
                "provider" => guard.name.clone(),
                "model" => self.id.clone(),
                "type" => "completion"
            )
            .increment(sum.completion);
            if let Some(limiter) = &guard.limiter {
                limiter.correct_tokens(estimated, sum.total);
            }
        }
        if let Some(permit) = permit {
            // A call fails, for the breaker, when the provider answered none of its inputs:
            // every outcome is an error that retrying could fix (5xx, timeouts, resets, 429),
            // after the provider's own retries.
            let failed = !outcomes.is_empty()
                && outcomes
                    .iter()
                    .all(|o| o.as_ref().is_err_and(ProviderError::retryable));
            let was_probe = permit.is_probe();
            let state = permit.record(failed);
            if state == BreakerState::Open && (was_probe || failed) {
                metrics::counter!(m::PROVIDER_BREAKER_OPENED_TOTAL, "provider" => guard.name.clone())
                    .increment(1);
                tracing::warn!(provider = %guard.name, "circuit breaker open");
            } else if state == BreakerState::Closed && was_probe {
                tracing::info!(provider = %guard.name, "circuit breaker closed after a probe");
            }
            metrics::gauge!(m::PROVIDER_BREAKER_STATE, "provider" => guard.name.clone())
                .set(state.gauge());
        }
        outcomes
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct TokenCounts {
    prompt: u64,
    completion: u64,
    total: u64,
}

/// The versions of one model name.
#[derive(Default)]
struct Family {
    versions: BTreeMap<String, ResolvedModel>,
}

#[derive(Default)]
struct Registry {
    providers: BTreeMap<String, Guarded>,
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

    /// Registers `provider` as `name`, with no circuit breaker and no rate limit, replacing
    /// any provider of that name for models loaded from now on (loaded models keep the
    /// provider they were loaded with).
    pub fn register_provider(&self, name: impl Into<String>, provider: Arc<dyn Provider>) {
        let name = name.into();
        let guard = Arc::new(Guard::new(name.clone(), ProviderPolicy::default()));
        self.write()
            .providers
            .insert(name, Guarded { provider, guard });
    }

    /// Registers `provider` as `name` behind the circuit breaker and rate limits of `policy`
    /// (see [`register_provider`](Self::register_provider)). Fails when the policy has values
    /// out of range.
    pub fn register_provider_with_policy(
        &self,
        name: impl Into<String>,
        provider: Arc<dyn Provider>,
        policy: ProviderPolicy,
    ) -> Result<(), BuildError> {
        let problems = policy.problems();
        if !problems.is_empty() {
            return Err(BuildError::InvalidConfig { problems });
        }
        let name = name.into();
        let guard = Arc::new(Guard::new(name.clone(), policy));
        self.write()
            .providers
            .insert(name, Guarded { provider, guard });
        Ok(())
    }

    /// The state of `provider`'s circuit breaker, when it has one.
    pub fn breaker_state(&self, provider: &str) -> Option<BreakerState> {
        let registry = self.read();
        let breaker = registry.providers.get(provider)?.guard.breaker.clone()?;
        drop(registry);
        Some(breaker.state())
    }

    /// A reason to stop fetching requests now: a provider's circuit breaker is open (and not
    /// yet due for its probe). Cheap: a read lock and two atomic loads per provider.
    pub fn hold(&self) -> Option<String> {
        let registry = self.read();
        registry.providers.values().find_map(|g| {
            let left = g.guard.breaker.as_ref()?.is_open()?;
            Some(format!(
                "circuit breaker open for provider `{}` (probe in {} ms)",
                g.guard.name,
                left.as_millis()
            ))
        })
    }

    /// Waits until `requests` requests for model `id` may be executed: loads the model if it
    /// was unloaded for idleness, waits while its provider's breaker is open, and reserves
    /// rate-limit capacity for the batch (which its calls then draw on). Returns at once for
    /// unknown models; never fails.
    pub async fn admit(&self, id: &str, requests: usize) {
        let Ok(model) = self.resolve(id) else { return };
        if requests == 0 {
            return;
        }
        {
            let _in_flight = InFlight::new(&model.life);
            // A failed load is reported by the batch itself.
            let _ = model.ensure_loaded().await;
        }
        let guard = &model.guard;
        if let Some(breaker) = &guard.breaker {
            let waiting = Instant::now();
            breaker.wait_closed().await;
            guard.record_wait(waiting.elapsed(), "breaker", "admit");
        }
        if let Some(limiter) = &guard.limiter {
            let remote = &model.spec.remote_model;
            // Through the cache every miss is its own call.
            let calls = if self.cache.is_some() && model.spec.cache {
                requests * model.provider.api_calls(remote, 1)
            } else {
                model.provider.api_calls(remote, requests)
            };
            let tokens = guard.tokens_per_input.load(AtomicOrdering::Relaxed) * requests as u64;
            let waited = limiter.admit(calls as u64, tokens).await;
            guard.record_wait(waited, "rate_limit", "admit");
        }
    }

    /// Unloads every model with `unload_after_idle` that has been idle that long and is not
    /// running; returns their ids. [`spawn_idle_sweeper`](Self::spawn_idle_sweeper) runs it
    /// periodically.
    pub fn unload_idle(&self) -> Vec<String> {
        let candidates: Vec<ResolvedModel> = {
            let registry = self.read();
            registry
                .models
                .values()
                .flat_map(|f| f.versions.values())
                .filter(|m| {
                    m.spec
                        .unload_after_idle
                        .is_some_and(|idle| m.is_loaded() && m.life.idle_for() >= idle)
                })
                .cloned()
                .collect()
        };
        let mut unloaded = Vec::new();
        for model in candidates {
            // A model being loaded or unloaded right now is left for the next sweep.
            let Ok(_transition) = model.life.transition.try_lock() else {
                continue;
            };
            if model.life.in_flight.load(AtomicOrdering::Acquire) > 0 || !model.is_loaded() {
                continue;
            }
            model.life.loaded.store(false, AtomicOrdering::Release);
            model.provider.unload_model(&model.spec.remote_model);
            add(&model.counters.idle_unloads, 1);
            metrics::counter!(m::MODEL_LIFECYCLE_TOTAL, "model" => model.id.clone(), "event" => "unload")
                .increment(1);
            tracing::info!(model = %model.id, "model unloaded after being idle");
            unloaded.push(model.id.clone());
        }
        unloaded
    }

    /// Runs [`unload_idle`](Self::unload_idle) every `every` on the current Tokio runtime,
    /// until the manager is dropped or the task is aborted.
    pub fn spawn_idle_sweeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let manager: Weak<ModelManager> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(manager) = manager.upgrade() else {
                    return;
                };
                manager.unload_idle();
            }
        })
    }

    /// The registered provider names, sorted.
    pub fn providers(&self) -> Vec<String> {
        self.read().providers.keys().cloned().collect()
    }

    fn check_spec(
        &self,
        spec: &ModelSpec,
    ) -> Result<(Arc<dyn Provider>, Arc<Guard>), ManagerError> {
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
            .map(|g| (Arc::clone(&g.provider), Arc::clone(&g.guard)))
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

    /// Registers the model; `loaded` says whether its provider has loaded it already.
    fn insert(
        &self,
        spec: ModelSpec,
        (provider, guard): (Arc<dyn Provider>, Arc<Guard>),
        loaded: bool,
    ) -> Result<(), ManagerError> {
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
                    guard,
                    life: {
                        let life = Lifecycle::new(loaded);
                        life.touch();
                        Arc::new(life)
                    },
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
    /// registered. The provider loads the model ([`Provider::load_model`]) on its first use,
    /// in [`admit`](Self::admit) or else in the first batch; use
    /// [`load_model_with_warmup`](Self::load_model_with_warmup) to load it now.
    pub fn load_model(&self, spec: ModelSpec) -> Result<(), ManagerError> {
        let provider = self.check_spec(&spec)?;
        self.insert(spec, provider, false)
    }

    /// Loads `spec` after asking its provider to load the model ([`Provider::load_model`]: a
    /// local model is read, optimised and run once) and calling it once with `sample`; fails,
    /// loading nothing, when either fails. The warm-up call is not counted in the statistics.
    pub async fn load_model_with_warmup(
        &self,
        spec: ModelSpec,
        sample: ProviderInput,
    ) -> Result<(), ManagerError> {
        let (provider, guard) = self.check_spec(&spec)?;
        if let Err(error) = provider.load_model(&spec.remote_model).await {
            return Err(ManagerError::WarmUp {
                id: spec.id(),
                error,
            });
        }
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
        self.insert(spec, (provider, guard), true)
    }

    /// Unloads `name@version` (the version is required), returning what it was loaded with.
    /// Its statistics go with it; a default version naming it stays set. The provider is asked
    /// to free the model ([`Provider::unload_model`]) unless another loaded id uses the same
    /// provider and remote model.
    pub fn unload_model(&self, id: &str) -> Result<ModelSpec, ManagerError> {
        let mut registry = self.write();
        let removed = id.split_once('@').and_then(|(name, version)| {
            let family = registry.models.get_mut(name)?;
            let model = family.versions.remove(version)?;
            if family.versions.is_empty() {
                registry.models.remove(name);
            }
            Some(model)
        });
        let Some(model) = removed else {
            return Err(ManagerError::NotLoaded {
                id: id.to_owned(),
                known: registry.known_ids(&[]),
            });
        };
        let shared = registry
            .models
            .values()
            .flat_map(|f| f.versions.values())
            .any(|m| {
                Arc::ptr_eq(&m.provider, &model.provider)
                    && m.spec.remote_model == model.spec.remote_model
            });
        drop(registry);
        if !shared {
            model.provider.unload_model(&model.spec.remote_model);
        }
        Ok(model.spec)
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
        self.infer_classified(model, requests)
            .await
            .into_iter()
            .map(|outcome| outcome.map_err(|failure| failure.body))
            .collect()
    }

    /// [`infer_resolved`](Self::infer_resolved) with each failure classified for retrying.
    async fn infer_classified(
        &self,
        model: &ResolvedModel,
        requests: Vec<ExecRequest>,
    ) -> Vec<ClassifiedResult> {
        let n = requests.len();
        let _in_flight = InFlight::new(&model.life);
        if let Err(error) = model.ensure_loaded().await {
            add(&model.counters.requests, n as u64);
            add(&model.counters.errors, n as u64);
            return vec![Err(ModelFailure::from_provider(error, &*model.provider)); n];
        }
        let outcomes: Vec<(Result<ProviderOutput, ProviderError>, bool, u64)> =
            match (&self.cache, model.spec.cache) {
                // A batch: the misses go to the provider in one call.
                (Some(cache), true) if n > 1 => {
                    let mut inputs: Vec<Option<ProviderInput>> = Vec::with_capacity(n);
                    let mut keys = Vec::with_capacity(n);
                    for r in requests {
                        let input = ProviderInput::with_parameters(r.data, r.parameters);
                        keys.push(CacheKey::new(r.tenant.as_deref(), &model.id, &input));
                        inputs.push(Some(input));
                    }
                    let started = Instant::now();
                    let answers = cache
                        .get_or_compute_batch(keys, |positions| {
                            let batch: Vec<ProviderInput> =
                                positions.iter().filter_map(|&i| inputs[i].take()).collect();
                            model.call(batch)
                        })
                        .await;
                    let latency = started.elapsed().as_micros() as u64;
                    answers
                        .into_iter()
                        .map(|(outcome, status)| (outcome, status.served_from_cache(), latency))
                        .collect()
                }
                // One request: it may wait for an identical call already running.
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
                        Err(ModelFailure::from_provider(error, &*model.provider))
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

    /// [`Executor::execute`] with each failure classified: whether the caller may try the
    /// request again ([`RetryAdvice`]). A pipeline step decides its retries from this.
    pub async fn execute_classified(
        &self,
        target: &Target,
        requests: Vec<ExecRequest>,
    ) -> Vec<ClassifiedResult> {
        let builtins = |outcomes: Vec<ExecResult>| -> Vec<ClassifiedResult> {
            outcomes
                .into_iter()
                .map(|o| o.map_err(ModelFailure::never))
                .collect()
        };
        let id = match target {
            Target::Model(id) => id,
            Target::Pipeline(_) => return builtins(self.builtins.execute(target, requests).await),
        };
        match self.manager.resolve_listing(id, &BUILTIN_MODELS) {
            Ok(model) => self.manager.infer_classified(&model, requests).await,
            Err(_) if BUILTIN_MODELS.contains(&id.as_str()) => {
                builtins(self.builtins.execute(target, requests).await)
            }
            Err(error) => vec![Err(ModelFailure::never(error)); requests.len()],
        }
    }

    /// Whether the provider answering `target` retries its transient failures itself
    /// ([`Provider::retries_itself`]); false for unknown models and the built-ins.
    pub fn retries_itself(&self, target: &Target) -> bool {
        match target {
            Target::Model(id) => self
                .manager
                .resolve(id)
                .is_ok_and(|model| model.provider.retries_itself()),
            Target::Pipeline(_) => false,
        }
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

    fn admit<'a>(&'a self, target: &'a Target, requests: usize) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Target::Model(id) = target {
                self.manager.admit(id, requests).await;
            }
        })
    }

    fn hold(&self) -> Option<String> {
        self.manager.hold()
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
