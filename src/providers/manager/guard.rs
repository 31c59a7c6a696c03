//! The call guard: each provider's circuit breaker and rate limiter, the guarded provider call
//! that records a call in the statistics, the breaker and the metrics, and admitting a batch
//! ahead of its execute timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::lifecycle::InFlight;
use super::registry::{ModelManager, ResolvedModel};
use super::stats::add;
use crate::metrics as m;
use crate::providers::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use crate::providers::ratelimit::{RateLimitConfig, RateLimiter};
use crate::providers::{
    BuildError, Provider, ProviderError, ProviderInput, ProviderOutput, estimate_tokens,
};

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
pub(super) struct Guarded {
    pub(super) provider: Arc<dyn Provider>,
    pub(super) guard: Arc<Guard>,
}

/// The breaker and limiter of one provider, shared by its models.
pub(super) struct Guard {
    pub(super) name: String,
    pub(super) breaker: Option<Arc<CircuitBreaker>>,
    pub(super) limiter: Option<RateLimiter>,
    /// Estimated tokens per input over recent calls (a moving average), for admitting a batch
    /// before its inputs are looked at.
    pub(super) tokens_per_input: AtomicU64,
}

impl Guard {
    pub(super) fn new(name: String, policy: ProviderPolicy) -> Self {
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

impl ResolvedModel {
    /// Calls the provider once with `inputs`, after the breaker and the rate limiter let it,
    /// recording the call in the model's statistics, the breaker and the metrics. Always
    /// returns one outcome per input.
    pub(super) async fn call(
        &self,
        inputs: Vec<ProviderInput>,
    ) -> Vec<Result<ProviderOutput, ProviderError>> {
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

impl ModelManager {
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
    /// A provider only shadow versions use is left out: a failing shadow never pauses the
    /// stream.
    pub fn hold(&self) -> Option<String> {
        let shadow_only = self.shadow_only_providers();
        let registry = self.read();
        registry.providers.values().find_map(|g| {
            if shadow_only.contains(&g.guard.name) {
                return None;
            }
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
        if let Some(shares) = self.route_shares(id, requests) {
            // A routed name: each version for its share of the batch, by weight.
            for (version_id, share) in shares {
                Box::pin(self.admit(&version_id, share)).await;
            }
            return;
        }
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
}
