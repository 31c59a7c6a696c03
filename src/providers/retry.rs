//! Retries for remote providers: bounded attempts, capped exponential backoff with full jitter,
//! `Retry-After` honoured, and a retry budget.
//!
//! [`RetryPolicy::run`] calls an operation until it succeeds, fails with an error that is not
//! [retryable](super::ProviderError::retryable), or one of the limits below stops it:
//!
//! - **Attempts.** At most `max_attempts` calls in all, the first included.
//! - **Backoff.** Before retry `n` (1 for the first retry) it sleeps a random time between zero
//!   and `min(max_backoff_ms, initial_backoff_ms × 2ⁿ⁻¹)` ("full jitter"), so clients that
//!   failed together do not come back together.
//! - **`Retry-After`.** When the provider says how long to wait, the sleep is at least that
//!   long. When it asks for more than `max_retry_after_ms`, the call is not retried at all:
//!   the error, which carries the wait, goes back to the caller, whose job it is to slow down
//!   (later, the rate limiter pauses the stream). Sleeping that long inside a batch would only
//!   run into the executor's timeout.
//! - **Budget.** Retries draw from a token bucket shared by every call of the policy (one per
//!   provider). Each call adds `budget_percent`/100 of a token, time adds
//!   `budget_min_retries_per_sec` tokens a second, and the bucket holds at most
//!   `budget_burst_retries`. A retry takes one token, or does not happen. Against a provider
//!   that fails everything, retries therefore add at most `budget_percent` to the request
//!   volume (plus the small time-based floor) instead of multiplying it by `max_attempts`.
//!
//! One retry layer per dependency owns the attempt count: callers of a provider do not retry
//! again. A provider using this policy says so ([`Provider::retries_itself`](super::Provider::retries_itself)),
//! and the model manager then classifies its transient errors as spent
//! ([`RetryAdvice::Spent`](super::manager::RetryAdvice::Spent)), so a pipeline step's `retries` do not
//! multiply its attempts. Sleeping uses `tokio::time`, so tests can pause the clock.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::ProviderError;
use crate::backoff::Backoff;

/// Retry settings of one remote provider. Every key is optional; the defaults are below.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Calls in all, the first included; 1 turns retries off. Default 3, as in OpenAI's own
    /// client (two retries).
    pub max_attempts: NonZeroU32,
    /// Upper bound of the first retry's random backoff. Default 200 ms.
    pub initial_backoff_ms: u64,
    /// Cap on the backoff's upper bound, however many retries came before. Default 5000 ms.
    pub max_backoff_ms: u64,
    /// Longest `Retry-After` honoured by waiting; a longer one ends the call with its error.
    /// Default 10000 ms, which with the defaults above keeps a call well inside the executor's
    /// default 30 s timeout.
    pub max_retry_after_ms: u64,
    /// Retries may add at most this share of the calls, in percent. Default 10.
    pub budget_percent: u32,
    /// Retries allowed per second however few calls there are, so a quiet provider can still
    /// retry. Default 1.
    pub budget_min_retries_per_sec: u32,
    /// Size of the bucket: the most retries that can happen in a burst. The bucket starts
    /// full. 0 turns retries off. Default 10.
    pub budget_burst_retries: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN),
            initial_backoff_ms: 200,
            max_backoff_ms: 5_000,
            max_retry_after_ms: 10_000,
            budget_percent: 10,
            budget_min_retries_per_sec: 1,
            budget_burst_retries: 10,
        }
    }
}

impl RetryConfig {
    /// Checks what the types cannot express. `prefix` is the key path of this table, e.g.
    /// `retry`; every problem found is pushed with its key.
    pub fn validate(&self, prefix: &str, problems: &mut Vec<String>) {
        if self.initial_backoff_ms > self.max_backoff_ms {
            problems.push(format!(
                "{prefix}.initial_backoff_ms ({}) is larger than {prefix}.max_backoff_ms ({})",
                self.initial_backoff_ms, self.max_backoff_ms
            ));
        }
        if self.budget_percent > 100 {
            problems.push(format!(
                "{prefix}.budget_percent ({}) must be at most 100",
                self.budget_percent
            ));
        }
    }
}

/// Counters of one policy, since it was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryStats {
    /// Calls to [`RetryPolicy::run`].
    pub calls: u64,
    /// Attempts made, first attempts included.
    pub attempts: u64,
    /// Retries made.
    pub retries: u64,
    /// Retries refused because the budget was empty.
    pub budget_exhausted: u64,
    /// Retries not made because `Retry-After` exceeded `max_retry_after_ms`.
    pub retry_after_too_long: u64,
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    attempts: AtomicU64,
    retries: AtomicU64,
    budget_exhausted: AtomicU64,
    retry_after_too_long: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> RetryStats {
        RetryStats {
            calls: self.calls.load(Ordering::Relaxed),
            attempts: self.attempts.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            budget_exhausted: self.budget_exhausted.load(Ordering::Relaxed),
            retry_after_too_long: self.retry_after_too_long.load(Ordering::Relaxed),
        }
    }
}

/// A token bucket that retries draw from. Amounts are kept in thousandths of a token, so
/// adding a tenth of a token ten times makes exactly one.
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a token each call adds.
    per_call_milli: u64,
    /// Thousandths of a token each millisecond adds (tokens per second, numerically).
    per_ms_milli: u64,
    /// Most thousandths the bucket holds.
    capacity_milli: u64,
    /// A std mutex: held for a few arithmetic operations, never across an `.await`.
    state: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    /// Thousandths of a token available.
    milli: u64,
    /// Time up to which the time-based refill has been added.
    refilled_to: Instant,
}

/// Thousandths per token.
const MILLI: u64 = 1000;

impl RetryBudget {
    /// A full bucket: `percent` of each call, `min_per_sec` tokens a second, at most `burst`.
    pub fn new(percent: u32, min_per_sec: u32, burst: u32) -> Self {
        let capacity_milli = u64::from(burst) * MILLI;
        RetryBudget {
            per_call_milli: u64::from(percent) * MILLI / 100,
            per_ms_milli: u64::from(min_per_sec),
            capacity_milli,
            state: Mutex::new(BudgetState {
                milli: capacity_milli,
                refilled_to: Instant::now(),
            }),
        }
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut BudgetState) -> R) -> R {
        // A panic while holding the lock cannot leave the counts inconsistent (each update
        // is one assignment), so a poisoned lock is still usable.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let whole_ms = now.saturating_duration_since(state.refilled_to).as_millis();
        let whole_ms = u64::try_from(whole_ms).unwrap_or(u64::MAX);
        if whole_ms > 0 {
            let added = whole_ms.saturating_mul(self.per_ms_milli);
            state.milli = state.milli.saturating_add(added).min(self.capacity_milli);
            // Advance by whole milliseconds only, so no fraction of the refill is lost.
            state.refilled_to += Duration::from_millis(whole_ms);
        }
        f(&mut state)
    }

    /// Credits one call.
    pub fn deposit(&self) {
        self.with_state(|s| s.milli = (s.milli + self.per_call_milli).min(self.capacity_milli));
    }

    /// Takes one retry's token, if there is one.
    pub fn try_withdraw(&self) -> bool {
        self.with_state(|s| match s.milli.checked_sub(MILLI) {
            Some(left) => {
                s.milli = left;
                true
            }
            None => false,
        })
    }

    /// Whole retries available now.
    pub fn available(&self) -> u64 {
        self.with_state(|s| s.milli / MILLI)
    }
}

/// A retry policy and its budget. Cheap to clone; clones share the budget and the counters.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    config: RetryConfig,
    /// `initial_backoff_ms` doubling up to `max_backoff_ms`, full jitter.
    backoff: Backoff,
    budget: Arc<RetryBudget>,
    counters: Arc<Counters>,
}

impl RetryPolicy {
    /// A policy with a full budget.
    pub fn new(config: RetryConfig) -> Self {
        let budget = RetryBudget::new(
            config.budget_percent,
            config.budget_min_retries_per_sec,
            config.budget_burst_retries,
        );
        RetryPolicy {
            backoff: Backoff::new(
                Duration::from_millis(config.initial_backoff_ms),
                Duration::from_millis(config.max_backoff_ms),
            ),
            config,
            budget: Arc::new(budget),
            counters: Arc::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &RetryConfig {
        &self.config
    }

    /// The shared budget.
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    /// The counters so far.
    pub fn stats(&self) -> RetryStats {
        self.counters.snapshot()
    }

    /// The random backoff before retry `retry` (1 for the first retry), ignoring
    /// `Retry-After`: uniform between zero and the capped exponential bound ([`Backoff`]).
    pub fn backoff(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        self.backoff.delay_with(retry.saturating_sub(1), rng)
    }

    /// How long to wait before retry `retry` after `error`, or `None` when the error forbids
    /// waiting that long. Does not consult the attempt limit or the budget.
    pub fn delay(
        &self,
        error: &ProviderError,
        retry: u32,
        rng: &mut fastrand::Rng,
    ) -> Option<Duration> {
        let backoff = self.backoff(retry, rng);
        match error.retry_after() {
            None => Some(backoff),
            Some(wait) if wait > Duration::from_millis(self.config.max_retry_after_ms) => None,
            Some(wait) => Some(wait.max(backoff)),
        }
    }

    /// Calls `operation` (with the attempt number, from 1) until it succeeds or the policy
    /// gives up, and returns the last outcome.
    pub async fn run<T, F, Fut>(&self, mut operation: F) -> Result<T, ProviderError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        Counters::bump(&self.counters.calls);
        self.budget.deposit();
        let mut rng = fastrand::Rng::new();
        let mut attempt = 1;
        loop {
            Counters::bump(&self.counters.attempts);
            let error = match operation(attempt).await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            if !error.retryable() || attempt >= self.config.max_attempts.get() {
                return Err(error);
            }
            let Some(delay) = self.delay(&error, attempt, &mut rng) else {
                Counters::bump(&self.counters.retry_after_too_long);
                tracing::debug!(attempt, error = %error, "not retrying: Retry-After too long");
                return Err(error);
            };
            if !self.budget.try_withdraw() {
                Counters::bump(&self.counters.budget_exhausted);
                tracing::debug!(attempt, error = %error, "not retrying: retry budget exhausted");
                return Err(error);
            }
            Counters::bump(&self.counters.retries);
            tracing::debug!(
                attempt,
                delay_ms = delay.as_millis() as u64,
                error = %error,
                "retrying provider call"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// The wait a response asks for: `retry-after-ms` (milliseconds, sent by OpenAI and Azure)
/// when present, else `Retry-After` as delay-seconds or an HTTP-date (relative to `now`; a
/// date in the past means no wait). Unparseable values are ignored.
pub fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let value = text(RETRY_AFTER.as_str())?;
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn config(max_attempts: u32) -> RetryConfig {
        RetryConfig {
            max_attempts: NonZeroU32::new(max_attempts).unwrap(),
            initial_backoff_ms: 100,
            max_backoff_ms: 400,
            max_retry_after_ms: 5_000,
            budget_percent: 10,
            budget_min_retries_per_sec: 0,
            budget_burst_retries: 100,
        }
    }

    fn unavailable() -> ProviderError {
        ProviderError::from_status(503, "busy".into(), None)
    }

    #[test]
    fn backoff_is_full_jitter_under_a_capped_exponential_bound() {
        let policy = RetryPolicy::new(config(10));
        let mut rng = fastrand::Rng::with_seed(7);
        for (retry, bound) in [(1, 100), (2, 200), (3, 400), (4, 400), (40, 400)] {
            let samples: Vec<u64> = (0..500)
                .map(|_| policy.backoff(retry, &mut rng).as_millis() as u64)
                .collect();
            assert!(samples.iter().all(|&ms| ms <= bound), "retry {retry}");
            // Full jitter spreads over the whole range, not just near the bound.
            assert!(samples.iter().any(|&ms| ms < bound / 4), "retry {retry}");
            assert!(
                samples.iter().any(|&ms| ms > bound * 3 / 4),
                "retry {retry}"
            );
        }
    }

    #[test]
    fn retry_after_is_a_floor_and_too_long_a_wait_is_refused() {
        let policy = RetryPolicy::new(config(10));
        let mut rng = fastrand::Rng::with_seed(1);
        let wait = |secs| ProviderError::RateLimited {
            message: String::new(),
            retry_after: Some(Duration::from_secs(secs)),
        };
        for _ in 0..100 {
            let d = policy.delay(&wait(2), 1, &mut rng).unwrap();
            assert_eq!(d, Duration::from_secs(2));
        }
        assert_eq!(policy.delay(&wait(6), 1, &mut rng), None);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_within_the_backoff_bounds() {
        let policy = RetryPolicy::new(config(4));
        let calls = Cell::new(0);
        let started = Instant::now();
        let out = policy
            .run(|attempt| {
                calls.set(calls.get() + 1);
                assert_eq!(attempt, calls.get());
                async move {
                    if attempt < 4 {
                        Err(unavailable())
                    } else {
                        Ok(attempt)
                    }
                }
            })
            .await;
        assert_eq!(out, Ok(4));
        // Three sleeps, bounded by 100 + 200 + 400 ms.
        assert!(started.elapsed() <= Duration::from_millis(700));
        let stats = policy.stats();
        assert_eq!((stats.calls, stats.attempts, stats.retries), (1, 4, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_and_never_retries_permanent_errors() {
        let policy = RetryPolicy::new(config(3));
        let calls = Cell::new(0);
        let out: Result<(), _> = policy
            .run(|_| {
                calls.set(calls.get() + 1);
                async { Err(unavailable()) }
            })
            .await;
        assert_eq!(out, Err(unavailable()));
        assert_eq!(calls.get(), 3);

        calls.set(0);
        let rejected = ProviderError::from_status(400, "bad".into(), None);
        let out: Result<(), _> = policy
            .run(|_| {
                calls.set(calls.get() + 1);
                let e = rejected.clone();
                async move { Err(e) }
            })
            .await;
        assert_eq!(out, Err(rejected));
        assert_eq!(calls.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn sleeps_exactly_retry_after_when_it_exceeds_the_backoff() {
        let policy = RetryPolicy::new(config(2));
        let started = Instant::now();
        let out = policy
            .run(|attempt| async move {
                if attempt == 1 {
                    Err(ProviderError::RateLimited {
                        message: String::new(),
                        retry_after: Some(Duration::from_secs(3)),
                    })
                } else {
                    Ok(())
                }
            })
            .await;
        assert_eq!(out, Ok(()));
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_limits_retries_to_a_share_of_calls() {
        // A bucket of 2, refilled by 50% of each call and nothing over time.
        let policy = RetryPolicy::new(RetryConfig {
            budget_percent: 50,
            budget_burst_retries: 2,
            ..config(3)
        });
        let attempts = Cell::new(0);
        let fail = || {
            policy.run(|_| {
                attempts.set(attempts.get() + 1);
                async { Err::<(), _>(unavailable()) }
            })
        };
        // Call 1: deposit (bucket stays full at 2), two retries empty it.
        fail().await.unwrap_err();
        assert_eq!(attempts.get(), 3);
        // Call 2: half a token; no retry.
        fail().await.unwrap_err();
        assert_eq!(attempts.get(), 4);
        // Call 3: a whole token again; one retry, then none left.
        fail().await.unwrap_err();
        assert_eq!(attempts.get(), 6);
        let stats = policy.stats();
        assert_eq!(stats.retries, 3);
        assert_eq!(stats.budget_exhausted, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_refills_over_time_up_to_its_capacity() {
        let budget = RetryBudget::new(0, 2, 3);
        assert!(budget.try_withdraw() && budget.try_withdraw() && budget.try_withdraw());
        assert!(!budget.try_withdraw());
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(!budget.try_withdraw(), "0.998 tokens is not a retry");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(budget.try_withdraw());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(budget.available(), 3);
        // Tenths add up exactly.
        let budget = RetryBudget::new(10, 0, 1);
        assert!(budget.try_withdraw());
        for _ in 0..9 {
            budget.deposit();
        }
        assert!(!budget.try_withdraw());
        budget.deposit();
        assert!(budget.try_withdraw());
    }

    #[test]
    fn retry_after_headers_are_parsed_in_every_form() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        let parse = |pairs: &[(&'static str, &str)]| parse_retry_after(&headers(pairs), now);
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(parse(&[("retry-after", " 0 ")]), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse(&[("retry-after", &later)]),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse(&[("retry-after", &earlier)]), Some(Duration::ZERO));
        assert_eq!(parse(&[("retry-after", "soon")]), None);
        assert_eq!(parse(&[("retry-after", "-3")]), None);
        assert_eq!(
            parse(&[("retry-after", "7"), ("retry-after-ms", "250")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse(&[("retry-after", "7"), ("retry-after-ms", "junk")]),
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn config_checks_report_every_problem() {
        let mut problems = Vec::new();
        RetryConfig {
            initial_backoff_ms: 10,
            max_backoff_ms: 5,
            budget_percent: 101,
            ..RetryConfig::default()
        }
        .validate("models.retry", &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("models.retry.initial_backoff_ms"));
        let mut none = Vec::new();
        RetryConfig::default().validate("retry", &mut none);
        assert!(none.is_empty());
    }
}
