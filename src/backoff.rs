//! Retry pacing, one rule for every retry loop: capped exponential backoff with full jitter,
//! and an optional budget.
//!
//! Before retry `n` (0 for the first retry) a loop waits a random time, uniform between zero
//! and `min(cap, base × 2ⁿ)` ("full jitter", as in the AWS Architecture Blog's *Exponential
//! Backoff And Jitter*). Clients that failed together then spread out instead of retrying in
//! lockstep, and the expected wait is half the ceiling. A budget stops a loop: at most
//! `max_retries` retries, and no retry once `max_elapsed` has passed since the loop started
//! (a wait is cut so that it never runs past that).
//!
//! [`Backoff::delay`] is the stateless form, for loops that count their own attempts;
//! [`Backoff::start`] returns a [`Retries`], which counts them and applies the budget.
//!
//! A leaf module: it uses nothing else of the crate, so every component can use it.

use std::time::{Duration, Instant};

/// A backoff rule: base, cap and an optional budget. Cheap to copy; build it in a `const`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    max_retries: Option<u32>,
    max_elapsed: Option<Duration>,
}

impl Backoff {
    /// Waits doubling from `base` (the ceiling of the first retry's wait) up to `cap`, without
    /// a budget.
    pub const fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            max_retries: None,
            max_elapsed: None,
        }
    }

    /// The same, with at most `retries` retries (so `retries + 1` attempts in all).
    #[must_use]
    pub const fn with_max_retries(self, retries: u32) -> Backoff {
        Backoff {
            max_retries: Some(retries),
            ..self
        }
    }

    /// The same, with no retry once `budget` has passed since the loop started.
    #[must_use]
    pub const fn with_max_elapsed(self, budget: Duration) -> Backoff {
        Backoff {
            max_elapsed: Some(budget),
            ..self
        }
    }

    /// The ceiling of the first retry's wait.
    pub const fn base(&self) -> Duration {
        self.base
    }

    /// The ceiling of any wait.
    pub const fn cap(&self) -> Duration {
        self.cap
    }

    /// The upper bound of the wait before retry `retry` (0 for the first retry):
    /// `min(cap, base × 2^retry)`, saturating for any `retry`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let doubled = match 1u32.checked_shl(retry) {
            Some(factor) => self.base.saturating_mul(factor),
            None if self.base.is_zero() => Duration::ZERO,
            None => Duration::MAX,
        };
        doubled.min(self.cap)
    }

    /// The random wait before retry `retry` (0 for the first retry), uniform between zero and
    /// [`ceiling`](Self::ceiling).
    pub fn delay(&self, retry: u32) -> Duration {
        self.delay_with(retry, &mut fastrand::Rng::new())
    }

    /// [`delay`](Self::delay), drawing from `rng` (seed it for reproducible tests).
    pub fn delay_with(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = u64::try_from(self.ceiling(retry).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.u64(0..=ceiling))
    }

    /// A loop starting now.
    pub fn start(&self) -> Retries {
        self.start_at(Instant::now())
    }

    /// A loop that started at `started`.
    pub fn start_at(&self, started: Instant) -> Retries {
        Retries {
            backoff: *self,
            made: 0,
            started,
            rng: fastrand::Rng::new(),
        }
    }
}

/// The retries of one loop under a [`Backoff`]: counts them and applies its budget.
#[derive(Debug, Clone)]
pub struct Retries {
    backoff: Backoff,
    made: u32,
    started: Instant,
    rng: fastrand::Rng,
}

impl Retries {
    /// Counts one more retry and returns the wait before it, or `None` when the budget is
    /// spent: `max_retries` made, or `max_elapsed` passed. The wait never runs past the end of
    /// `max_elapsed`.
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.next_delay_at(Instant::now())
    }

    /// [`next_delay`](Self::next_delay) at `now`.
    pub fn next_delay_at(&mut self, now: Instant) -> Option<Duration> {
        if self.backoff.max_retries.is_some_and(|max| self.made >= max) {
            return None;
        }
        let left = self.remaining_at(now);
        if left.is_some_and(|left| left.is_zero()) {
            return None;
        }
        let delay = self.backoff.delay_with(self.made, &mut self.rng);
        self.made = self.made.saturating_add(1);
        Some(left.map_or(delay, |left| delay.min(left)))
    }

    /// Retries counted so far.
    pub fn made(&self) -> u32 {
        self.made
    }

    /// When the time budget ends, if there is one (`None` too if it is beyond what an
    /// `Instant` can hold).
    pub fn deadline(&self) -> Option<Instant> {
        self.backoff
            .max_elapsed
            .and_then(|budget| self.started.checked_add(budget))
    }

    /// The time left in the budget at `now` (zero once it has passed), or `None` without a time
    /// budget.
    pub fn remaining_at(&self, now: Instant) -> Option<Duration> {
        let budget = self.backoff.max_elapsed?;
        Some(budget.saturating_sub(now.saturating_duration_since(self.started)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_are_full_jitter_under_the_capped_doubling_ceiling() {
        let b = Backoff::new(100 * MS, 5000 * MS);
        let mut rng = fastrand::Rng::with_seed(3);
        for retry in 0..12 {
            let ceiling = (100 * MS * (1 << retry)).min(5000 * MS);
            assert_eq!(b.ceiling(retry), ceiling, "retry {retry}");
            let samples: Vec<Duration> = (0..400).map(|_| b.delay_with(retry, &mut rng)).collect();
            assert!(samples.iter().all(|d| *d <= ceiling), "retry {retry}");
            // Full jitter: the whole range is used, down to near zero (no floor).
            assert!(samples.iter().any(|d| *d < ceiling / 10), "retry {retry}");
            assert!(
                samples.iter().any(|d| *d > ceiling * 9 / 10),
                "retry {retry}"
            );
        }
    }

    #[test]
    fn the_cap_holds_and_nothing_overflows_at_large_retry_numbers() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for retry in [5, 31, 32, 63, 64, 1000, u32::MAX] {
            assert_eq!(b.ceiling(retry), Duration::from_secs(30), "retry {retry}");
            assert!(b.delay(retry) <= Duration::from_secs(30), "retry {retry}");
        }
        // A cap beyond what nanoseconds in a u64 hold still draws a wait.
        let huge = Backoff::new(Duration::from_secs(1), Duration::MAX);
        assert_eq!(huge.ceiling(u32::MAX), Duration::MAX);
        let _ = huge.delay(u32::MAX);
        let zero = Backoff::new(Duration::ZERO, Duration::MAX);
        assert_eq!(zero.ceiling(u32::MAX), Duration::ZERO);
        assert_eq!(zero.delay(u32::MAX), Duration::ZERO);
        // A cap below the base wins.
        assert_eq!(Backoff::new(10 * MS, 5 * MS).ceiling(0), 5 * MS);
    }

    #[test]
    fn the_retry_budget_stops_the_loop() {
        let b = Backoff::new(10 * MS, 40 * MS).with_max_retries(3);
        let mut retries = b.start();
        let waits: Vec<Duration> = std::iter::from_fn(|| retries.next_delay()).collect();
        assert_eq!(waits.len(), 3);
        assert_eq!(retries.made(), 3);
        for (retry, wait) in waits.iter().enumerate() {
            assert!(*wait <= b.ceiling(retry as u32), "{retry}: {wait:?}");
        }
        assert_eq!(retries.next_delay(), None, "a spent budget stays spent");
        assert_eq!(b.with_max_retries(0).start().next_delay(), None);
    }

    #[test]
    fn the_time_budget_stops_the_loop_and_cuts_the_last_wait() {
        let start = Instant::now();
        let b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10))
            .with_max_elapsed(Duration::from_secs(3));
        let mut retries = b.start_at(start);
        assert_eq!(retries.deadline(), Some(start + Duration::from_secs(3)));
        for _ in 0..50 {
            let wait = retries.next_delay_at(start).unwrap();
            assert!(wait <= Duration::from_secs(3), "{wait:?}");
        }
        let late = start + Duration::from_millis(2900);
        assert_eq!(retries.remaining_at(late), Some(100 * MS));
        assert!(retries.next_delay_at(late).unwrap() <= 100 * MS);
        let over = start + Duration::from_secs(3);
        assert_eq!(retries.remaining_at(over), Some(Duration::ZERO));
        assert_eq!(retries.next_delay_at(over), None);
        assert_eq!(retries.next_delay_at(over + Duration::from_secs(60)), None);
        // Without a time budget there is no deadline and retries go on.
        let mut open = Backoff::new(MS, MS).start_at(start);
        assert_eq!((open.deadline(), open.remaining_at(start)), (None, None));
        assert!(
            open.next_delay_at(start + Duration::from_secs(86_400))
                .is_some()
        );
    }
}
