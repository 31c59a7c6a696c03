//! Usage statistics of loaded models: the counters each model keeps in atomics.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

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
    /// Calls made to the provider
    /// ([`Provider::infer_batch`](crate::providers::Provider::infer_batch)).
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
pub(super) struct Counters {
    pub(super) requests: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) cache_hits: AtomicU64,
    pub(super) provider_calls: AtomicU64,
    pub(super) provider_inputs: AtomicU64,
    pub(super) provider_errors: AtomicU64,
    pub(super) total_latency_us: AtomicU64,
    pub(super) prompt_tokens: AtomicU64,
    pub(super) completion_tokens: AtomicU64,
    pub(super) total_tokens: AtomicU64,
    pub(super) idle_unloads: AtomicU64,
    pub(super) reloads: AtomicU64,
}

pub(super) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, AtomicOrdering::Relaxed);
}

impl Counters {
    pub(super) fn snapshot(&self) -> ModelStats {
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
