//! Rate limits per provider: requests per minute and tokens per minute, as token buckets that
//! make callers wait instead of failing.
//!
//! Each limit is a bucket holding at most its burst (by default a whole minute's worth) and
//! refilled continuously at the per-minute rate. Taking from it is a *reservation*: the amount
//! is subtracted at once, possibly into debt, and the caller sleeps until the refill has paid
//! the debt back. So concurrent callers are spaced in the order they asked, with no queue, and
//! one call's amount larger than the burst is clamped to the burst, so it waits no longer than
//! a full refill. A caller dropped while waiting gives its reservation back.
//!
//! Tokens are charged twice over a call's life:
//!
//! 1. **Before the call**, an estimate ([`super::estimate_tokens`]: a quarter of the input's
//!    characters plus a small overhead, plus `max_tokens` when set).
//! 2. **After the call**, the difference between what the provider reported
//!    ([`TokenUsage::total_tokens`](super::TokenUsage)) and the estimate is charged or
//!    refunded ([`RateLimiter::correct_tokens`]), so the bucket follows real usage.
//!
//! [`RateLimiter::admit`] takes the reservation for a whole batch before the executor's
//! timeout starts (the processor calls it through `Executor::admit`), and what it took is
//! kept as *prepaid* credit that the batch's calls ([`RateLimiter::acquire`]) draw from first;
//! a call only waits for what the credit does not cover. `admit` does not see the inputs, so
//! the model manager asks it for the batch's size times the provider's recent average tokens
//! per input. Credit left over (a batch answered from the cache) pays for later calls, and is
//! capped at the larger of the burst and the batch. Time is `tokio::time`, so tests can pause
//! the clock.

use std::num::{NonZeroU32, NonZeroU64};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Rate limits of one provider. Leave a limit out for none.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests to the provider's API per minute (an embeddings request packing many inputs
    /// is one).
    pub requests_per_minute: Option<NonZeroU32>,
    /// Tokens per minute, estimated before each call and corrected by the reported usage.
    pub tokens_per_minute: Option<NonZeroU64>,
    /// Most requests sent in a burst after a quiet spell. Default: `requests_per_minute`.
    pub burst_requests: Option<NonZeroU32>,
    /// Most tokens spent in a burst after a quiet spell. Default: `tokens_per_minute`.
    pub burst_tokens: Option<NonZeroU64>,
}

impl RateLimitConfig {
    /// True when no limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.requests_per_minute.is_none() && self.tokens_per_minute.is_none()
    }

    /// Checks what the types cannot express, pushing each problem with its key under `prefix`.
    pub fn validate(&self, prefix: &str, problems: &mut Vec<String>) {
        if self.burst_requests.is_some() && self.requests_per_minute.is_none() {
            problems.push(format!(
                "{prefix}.burst_requests is set without {prefix}.requests_per_minute"
            ));
        }
        if self.burst_tokens.is_some() && self.tokens_per_minute.is_none() {
            problems.push(format!(
                "{prefix}.burst_tokens is set without {prefix}.tokens_per_minute"
            ));
        }
    }
}

/// One token bucket. Amounts are `f64` so that fractional refills are kept exactly enough.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    per_sec: f64,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    /// Available amount; negative while reservations are waiting for the refill.
    balance: f64,
    refilled_at: Instant,
    /// Reserved ahead of calls by [`RateLimiter::admit`] and not yet drawn on.
    prepaid: f64,
}

impl Bucket {
    fn new(per_minute: f64, burst: f64) -> Self {
        Bucket {
            capacity: burst,
            per_sec: per_minute / 60.0,
            state: Mutex::new(BucketState {
                balance: burst,
                refilled_at: Instant::now(),
                prepaid: 0.0,
            }),
        }
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut BucketState) -> R) -> R {
        // Every update is a few assignments, so a poisoned lock is still consistent.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let elapsed = now
            .saturating_duration_since(state.refilled_at)
            .as_secs_f64();
        state.balance = (state.balance + elapsed * self.per_sec).min(self.capacity);
        state.refilled_at = now;
        f(&mut state)
    }

    /// Subtracts `amount` (clamped to the capacity) and returns it with the wait until the
    /// balance is no longer negative.
    fn reserve(&self, amount: f64) -> (f64, Duration) {
        let amount = amount.min(self.capacity);
        self.with_state(|s| {
            s.balance -= amount;
            (amount, self.debt_wait(s.balance))
        })
    }

    fn debt_wait(&self, balance: f64) -> Duration {
        if balance >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-balance / self.per_sec)
        }
    }

    /// Gives `amount` back (a cancelled reservation, or an over-estimate).
    fn refund(&self, amount: f64) {
        self.with_state(|s| s.balance = (s.balance + amount).min(self.capacity));
    }

    /// Takes `amount` more (an under-estimate found after the call); may go into debt.
    fn charge(&self, amount: f64) {
        self.with_state(|s| s.balance -= amount);
    }

    /// Reserves `amount` for later calls and records it as prepaid credit. Unlike one call's
    /// amount, a batch's is not clamped to the burst: its calls will take all of it. Unused
    /// credit is capped at the larger of the burst and this amount.
    fn prepay(&self, amount: f64) -> (f64, Duration) {
        self.with_state(|s| {
            s.balance -= amount;
            s.prepaid = (s.prepaid + amount).min(self.capacity.max(amount));
            (amount, self.debt_wait(s.balance))
        })
    }

    /// Draws up to `amount` from the prepaid credit; returns what is left to reserve.
    fn draw_prepaid(&self, amount: f64) -> f64 {
        self.with_state(|s| {
            let drawn = s.prepaid.min(amount);
            s.prepaid -= drawn;
            amount - drawn
        })
    }

    fn balance(&self) -> f64 {
        self.with_state(|s| s.balance)
    }
}

/// The requests and tokens buckets of one provider. See the [module documentation](self).
#[derive(Debug)]
pub struct RateLimiter {
    config: RateLimitConfig,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// Reservations taken but not yet slept out: given back when dropped early.
struct Reservation<'a> {
    limiter: &'a RateLimiter,
    requests: f64,
    tokens: f64,
    prepaid: bool,
    done: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for (bucket, amount) in [
            (&self.limiter.requests, self.requests),
            (&self.limiter.tokens, self.tokens),
        ] {
            if let Some(bucket) = bucket
                && amount > 0.0
            {
                bucket.refund(amount);
                if self.prepaid {
                    bucket.draw_prepaid(amount);
                }
            }
        }
    }
}

impl RateLimiter {
    /// Full buckets for `config`.
    pub fn new(config: RateLimitConfig) -> Self {
        let requests = config.requests_per_minute.map(|rpm| {
            let burst = config.burst_requests.map_or(rpm.get(), NonZeroU32::get);
            Bucket::new(f64::from(rpm.get()), f64::from(burst))
        });
        let tokens = config.tokens_per_minute.map(|tpm| {
            let burst = config.burst_tokens.map_or(tpm.get(), NonZeroU64::get);
            Bucket::new(tpm.get() as f64, burst as f64)
        });
        RateLimiter {
            config,
            requests,
            tokens,
        }
    }

    /// The settings.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Requests available now (negative while callers wait), when requests are limited.
    pub fn available_requests(&self) -> Option<f64> {
        self.requests.as_ref().map(Bucket::balance)
    }

    /// Tokens available now (negative while callers wait), when tokens are limited.
    pub fn available_tokens(&self) -> Option<f64> {
        self.tokens.as_ref().map(Bucket::balance)
    }

    async fn sleep_out(&self, mut reservation: Reservation<'_>, wait: Duration) -> Duration {
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        reservation.done = true;
        wait
    }

    /// Reserves `requests` API requests and `tokens` tokens for a batch about to be executed
    /// and waits until the buckets have paid for them; the amounts become prepaid credit for
    /// the batch's calls. Returns how long it waited.
    pub async fn admit(&self, requests: u64, tokens: u64) -> Duration {
        let mut reservation = Reservation {
            limiter: self,
            requests: 0.0,
            tokens: 0.0,
            prepaid: true,
            done: false,
        };
        let mut wait = Duration::ZERO;
        if let Some(bucket) = &self.requests {
            let (taken, w) = bucket.prepay(requests as f64);
            reservation.requests = taken;
            wait = wait.max(w);
        }
        if let Some(bucket) = &self.tokens {
            let (taken, w) = bucket.prepay(tokens as f64);
            reservation.tokens = taken;
            wait = wait.max(w);
        }
        self.sleep_out(reservation, wait).await
    }

    /// Takes `requests` API requests and `estimated_tokens` tokens for one call, drawing on
    /// prepaid credit first, and waits for whatever the credit did not cover. Returns how long
    /// it waited.
    pub async fn acquire(&self, requests: u64, estimated_tokens: u64) -> Duration {
        let mut reservation = Reservation {
            limiter: self,
            requests: 0.0,
            tokens: 0.0,
            prepaid: false,
            done: false,
        };
        let mut wait = Duration::ZERO;
        if let Some(bucket) = &self.requests {
            let rest = bucket.draw_prepaid(requests as f64);
            if rest > 0.0 {
                let (taken, w) = bucket.reserve(rest);
                reservation.requests = taken;
                wait = wait.max(w);
            }
        }
        if let Some(bucket) = &self.tokens {
            let rest = bucket.draw_prepaid(estimated_tokens as f64);
            if rest > 0.0 {
                let (taken, w) = bucket.reserve(rest);
                reservation.tokens = taken;
                wait = wait.max(w);
            }
        }
        self.sleep_out(reservation, wait).await
    }

    /// After a call: charges the tokens used beyond the estimate, or refunds the
    /// over-estimate.
    pub fn correct_tokens(&self, estimated: u64, used: u64) {
        if let Some(bucket) = &self.tokens {
            if used > estimated {
                bucket.charge((used - estimated) as f64);
            } else if estimated > used {
                bucket.refund((estimated - used) as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rpm: u32, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            requests_per_minute: NonZeroU32::new(rpm),
            burst_requests: NonZeroU32::new(burst),
            ..RateLimitConfig::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn requests_are_spaced_at_the_rate_after_the_burst() {
        // 120 a minute is one every 500 ms; a burst of 2 goes at once.
        let limiter = limiter(120, 2);
        let started = Instant::now();
        let mut at = Vec::new();
        for _ in 0..5 {
            limiter.acquire(1, 0).await;
            at.push(started.elapsed().as_millis());
        }
        assert_eq!(at, vec![0, 0, 500, 1000, 1500]);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_are_spaced_in_order() {
        let limiter = std::sync::Arc::new(limiter(60, 1));
        let started = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    limiter.acquire(1, 0).await;
                    started.elapsed().as_millis()
                })
            })
            .collect();
        let mut at = Vec::new();
        for h in handles {
            at.push(h.await.unwrap());
        }
        at.sort_unstable();
        assert_eq!(at, vec![0, 1000, 2000, 3000]);
    }

    #[tokio::test(start_paused = true)]
    async fn admitted_credit_pays_for_the_calls() {
        let limiter = limiter(60, 1);
        // The batch of three waits in admit (for the two beyond the burst)…
        let waited = limiter.admit(3, 0).await;
        assert_eq!(waited, Duration::from_secs(2));
        // …and its calls then go at once.
        let started = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.acquire(1, 0).await, Duration::ZERO);
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        // The next call pays for itself.
        assert_eq!(limiter.acquire(1, 0).await, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_corrected_by_the_reported_usage() {
        let limiter = RateLimiter::new(RateLimitConfig {
            tokens_per_minute: NonZeroU64::new(600),
            ..RateLimitConfig::default()
        });
        // Estimated 100, used 400: 300 more are charged.
        limiter.acquire(1, 100).await;
        limiter.correct_tokens(100, 400);
        assert_eq!(limiter.available_tokens(), Some(200.0));
        // Estimated 300, used 100: 200 come back.
        limiter.acquire(1, 300).await;
        limiter.correct_tokens(300, 100);
        assert_eq!(limiter.available_tokens(), Some(200.0));
        // 600 more than there is: into debt, paid back at 10 a second.
        limiter.correct_tokens(0, 600);
        let waited = limiter.acquire(1, 10).await;
        assert_eq!(waited, Duration::from_secs(41));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_gives_its_reservation_back() {
        let limiter = limiter(60, 1);
        limiter.acquire(1, 0).await;
        let waiting = limiter.acquire(1, 0);
        // Give up after 100 ms.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), waiting)
                .await
                .is_err()
        );
        // The next caller waits only for the first one's debt: 900 ms, not 1900.
        assert_eq!(limiter.acquire(1, 0).await, Duration::from_millis(900));
    }

    #[test]
    fn amounts_above_the_burst_are_clamped_and_configs_checked() {
        let limiter = limiter(60, 5);
        let (taken, _) = limiter.requests.as_ref().unwrap().reserve(50.0);
        assert_eq!(taken, 5.0);
        let mut problems = Vec::new();
        RateLimitConfig {
            burst_tokens: NonZeroU64::new(5),
            ..RateLimitConfig::default()
        }
        .validate("rate_limit", &mut problems);
        assert_eq!(problems.len(), 1, "{problems:?}");
    }
}
