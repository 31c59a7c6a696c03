//! A circuit breaker per provider: stop calling a provider that keeps failing, try it again
//! after a cool-down with one probe call, and resume when the probe succeeds.
//!
//! States:
//!
//! - **Closed**: calls go through. Each finished provider call is recorded as a success or a
//!   failure (every outcome a [retryable](super::ProviderError::retryable) error: 5xx, 408,
//!   409, 429, timeouts, connection failures, after the provider's own retries). The breaker
//!   opens after `failure_threshold` consecutive failures, or, when `failure_ratio` is set,
//!   when at least that share of the last `window_calls` calls failed.
//! - **Open** for a cool-down (`open_ms`, doubled after each failed probe up to
//!   `max_open_ms`): no call goes through. Nothing fails because of it: callers *wait*
//!   ([`CircuitBreaker::wait_closed`], [`CircuitBreaker::acquire`]), and
//!   [`CircuitBreaker::is_open`] tells the consumer to stop fetching meanwhile.
//! - **Half-open** once the cool-down has passed: one call at a time goes through as a probe
//!   while the others wait. A successful probe closes the breaker (and resets the cool-down);
//!   a failed one opens it again. A probe whose caller gives up without recording (its future
//!   was dropped) hands the probe slot to the next caller.
//!
//! Time is `tokio::time`, so tests can pause the clock. The state sits under a std mutex held
//! for a few assignments, never across an `.await`; [`CircuitBreaker::is_open`] reads two
//! atomics only, so the consumer thread can poll it cheaply.

use std::num::{NonZeroU32, NonZeroU64};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Breaker settings of one provider. Every key is optional; the defaults are below.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failed calls that open the breaker. Default 5.
    pub failure_threshold: NonZeroU32,
    /// Also open when at least this share (0 to 1) of the last `window_calls` calls failed;
    /// off when absent (the default).
    pub failure_ratio: Option<f64>,
    /// The calls the ratio looks at; the ratio only applies once that many were made. Default
    /// 20.
    pub window_calls: NonZeroU32,
    /// How long the breaker stays open before a probe. Default 5000 ms.
    pub open_ms: NonZeroU64,
    /// Cap on the cool-down, which doubles after each failed probe. Default 60000 ms.
    pub max_open_ms: NonZeroU64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN),
            failure_ratio: None,
            window_calls: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            open_ms: NonZeroU64::new(5_000).unwrap_or(NonZeroU64::MIN),
            max_open_ms: NonZeroU64::new(60_000).unwrap_or(NonZeroU64::MIN),
        }
    }
}

impl BreakerConfig {
    /// Checks what the types cannot express, pushing each problem with its key under `prefix`.
    pub fn validate(&self, prefix: &str, problems: &mut Vec<String>) {
        if let Some(ratio) = self.failure_ratio
            && !(ratio > 0.0 && ratio <= 1.0)
        {
            problems.push(format!(
                "{prefix}.failure_ratio ({ratio}) must be above 0 and at most 1"
            ));
        }
        if self.open_ms > self.max_open_ms {
            problems.push(format!(
                "{prefix}.open_ms ({}) is larger than {prefix}.max_open_ms ({})",
                self.open_ms, self.max_open_ms
            ));
        }
    }
}

/// Where a breaker is, as [`CircuitBreaker::state`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// No call goes through until the cool-down has passed.
    Open,
    /// The cool-down has passed: one probe call at a time.
    HalfOpen,
}

impl BreakerState {
    /// The value of the breaker-state gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }

    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Counters since the breaker was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct BreakerStats {
    /// Times it opened (from closed, or again after a failed probe).
    pub opened: u64,
    /// Probes let through.
    pub probes: u64,
    /// Times it closed after a successful probe.
    pub closed: u64,
}

/// The mutable part.
#[derive(Debug)]
struct Inner {
    mode: Mode,
    consecutive_failures: u32,
    /// Outcomes of the last `window_calls` calls, true for a failure (a ring).
    window: Vec<bool>,
    window_next: usize,
    window_failures: u32,
    /// Calls counted since the ring was last reset; the ratio applies once it is full.
    window_calls: u64,
    /// The cool-down the next opening uses.
    cool_down: Duration,
    stats: BreakerStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Closed,
    /// Open until the instant; half-open after it.
    Open {
        until: Instant,
    },
    /// A probe is in flight: everyone else waits for its outcome.
    Probing,
}

/// Codes of [`CircuitBreaker::mode_code`].
const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const PROBING: u8 = 2;

/// A circuit breaker. Cheap to share through `Arc`; see the [module documentation](self).
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
    /// Mirrors the mode for lock-free reads: [`CLOSED`], [`OPEN`] or [`PROBING`].
    mode_code: AtomicU8,
    /// When `mode_code` is [`OPEN`]: the end of the cool-down, in nanoseconds after `epoch`.
    open_until_ns: AtomicU64,
    epoch: Instant,
    /// Woken whenever the mode changes.
    changed: Notify,
}

/// What [`CircuitBreaker::acquire`] handed out: a normal call, or the probe. Record its
/// outcome with [`CallPermit::record`]; dropping it unrecorded frees the probe slot.
#[derive(Debug)]
#[must_use = "record the call's outcome, or the breaker learns nothing from it"]
pub struct CallPermit {
    breaker: Arc<CircuitBreaker>,
    probe: bool,
    recorded: bool,
}

impl CallPermit {
    /// True when this call is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Records the call: `failed` when every outcome was a retryable error. Returns the state
    /// afterwards.
    pub fn record(mut self, failed: bool) -> BreakerState {
        self.recorded = true;
        self.breaker.record(failed, self.probe)
    }
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            self.breaker.abandon_probe();
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        let window = vec![false; config.window_calls.get() as usize];
        let cool_down = Duration::from_millis(config.open_ms.get());
        CircuitBreaker {
            config,
            inner: Mutex::new(Inner {
                mode: Mode::Closed,
                consecutive_failures: 0,
                window,
                window_next: 0,
                window_failures: 0,
                window_calls: 0,
                cool_down,
                stats: BreakerStats::default(),
            }),
            mode_code: AtomicU8::new(CLOSED),
            open_until_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            changed: Notify::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the state consistent, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_mode(&self, inner: &mut Inner, mode: Mode) {
        inner.mode = mode;
        match mode {
            Mode::Closed => self.mode_code.store(CLOSED, Ordering::Release),
            Mode::Probing => self.mode_code.store(PROBING, Ordering::Release),
            Mode::Open { until } => {
                let ns = until.saturating_duration_since(self.epoch).as_nanos();
                self.open_until_ns
                    .store(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::Release);
                self.mode_code.store(OPEN, Ordering::Release);
            }
        }
        self.changed.notify_waiters();
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        match self.lock().mode {
            Mode::Closed => BreakerState::Closed,
            Mode::Open { until } if Instant::now() < until => BreakerState::Open,
            Mode::Open { .. } | Mode::Probing => BreakerState::HalfOpen,
        }
    }

    /// How much of the cool-down is left, when the breaker is open and not yet due for a
    /// probe. Lock-free: two atomic loads and a clock read.
    pub fn is_open(&self) -> Option<Duration> {
        if self.mode_code.load(Ordering::Acquire) != OPEN {
            return None;
        }
        let until = self.epoch + Duration::from_nanos(self.open_until_ns.load(Ordering::Acquire));
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Counters so far.
    pub fn stats(&self) -> BreakerStats {
        self.lock().stats
    }

    /// Waits until a call could go through now: the breaker is closed, or half-open with no
    /// probe in flight. Reserves nothing, so a caller that then calls [`acquire`](Self::acquire)
    /// may still wait for another caller's probe.
    pub async fn wait_closed(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = match self.lock().mode {
                Mode::Closed => return,
                Mode::Open { until } if Instant::now() >= until => return,
                Mode::Open { until } => Some(until),
                Mode::Probing => None,
            };
            match deadline {
                Some(until) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = &mut notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Waits until this call may go through and returns its permit: at once when closed;
    /// after the cool-down when open; as the probe when half-open and no probe is in flight,
    /// else after the probe in flight has finished.
    pub async fn acquire(self: &Arc<Self>) -> CallPermit {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let mut inner = self.lock();
                match inner.mode {
                    Mode::Closed => {
                        return CallPermit {
                            breaker: Arc::clone(self),
                            probe: false,
                            recorded: false,
                        };
                    }
                    Mode::Open { until } if Instant::now() >= until => {
                        inner.stats.probes += 1;
                        self.set_mode(&mut inner, Mode::Probing);
                        return CallPermit {
                            breaker: Arc::clone(self),
                            probe: true,
                            recorded: false,
                        };
                    }
                    Mode::Open { until } => Some(until),
                    Mode::Probing => None,
                }
            };
            match deadline {
                Some(until) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = &mut notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    fn record(&self, failed: bool, probe: bool) -> BreakerState {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.push_outcome(failed);
        let max_cool_down = Duration::from_millis(self.config.max_open_ms.get());
        let base_cool_down = Duration::from_millis(self.config.open_ms.get());
        match inner.mode {
            Mode::Probing if probe => {
                if failed {
                    // The probe failed: open again, for longer.
                    inner.cool_down = (inner.cool_down * 2).min(max_cool_down);
                    self.open(inner);
                    BreakerState::Open
                } else {
                    inner.cool_down = base_cool_down;
                    inner.reset_counts();
                    inner.stats.closed += 1;
                    self.set_mode(inner, Mode::Closed);
                    BreakerState::Closed
                }
            }
            Mode::Closed => {
                let ratio_trips = self.config.failure_ratio.is_some_and(|ratio| {
                    let len = inner.window.len();
                    inner.window_calls >= len as u64
                        && f64::from(inner.window_failures) >= ratio * len as f64
                });
                if failed
                    && (inner.consecutive_failures >= self.config.failure_threshold.get()
                        || ratio_trips)
                {
                    self.open(inner);
                    BreakerState::Open
                } else {
                    BreakerState::Closed
                }
            }
            // A call that started before the breaker opened finished late: its outcome is
            // counted but changes nothing now.
            Mode::Open { until } if Instant::now() < until => BreakerState::Open,
            Mode::Open { .. } | Mode::Probing => BreakerState::HalfOpen,
        }
    }

    fn open(&self, inner: &mut Inner) {
        inner.stats.opened += 1;
        let until = Instant::now() + inner.cool_down;
        self.set_mode(inner, Mode::Open { until });
    }

    fn abandon_probe(&self) {
        let mut inner = self.lock();
        if inner.mode == Mode::Probing {
            // Due for a probe again at once.
            let now = Instant::now();
            self.set_mode(&mut inner, Mode::Open { until: now });
        }
    }
}

impl Inner {
    /// Counts one finished call.
    fn push_outcome(&mut self, failed: bool) {
        let slot = self.window_next;
        if self.window[slot] {
            self.window_failures -= 1;
        }
        self.window[slot] = failed;
        if failed {
            self.window_failures += 1;
        }
        self.window_next = (slot + 1) % self.window.len();
        self.window_calls = self.window_calls.saturating_add(1);
        self.consecutive_failures = if failed {
            self.consecutive_failures.saturating_add(1)
        } else {
            0
        };
    }

    /// Forgets past failures (after a successful probe).
    fn reset_counts(&mut self) {
        self.consecutive_failures = 0;
        self.window.iter_mut().for_each(|f| *f = false);
        self.window_failures = 0;
        self.window_next = 0;
        self.window_calls = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, open_ms: u64) -> Arc<CircuitBreaker> {
        Arc::new(CircuitBreaker::new(BreakerConfig {
            failure_threshold: NonZeroU32::new(threshold).unwrap(),
            open_ms: NonZeroU64::new(open_ms).unwrap(),
            max_open_ms: NonZeroU64::new(open_ms * 4).unwrap(),
            ..BreakerConfig::default()
        }))
    }

    async fn fail(b: &Arc<CircuitBreaker>) -> BreakerState {
        b.acquire().await.record(true)
    }

    async fn succeed(b: &Arc<CircuitBreaker>) -> BreakerState {
        b.acquire().await.record(false)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_a_success_resets_the_count() {
        let b = breaker(3, 1_000);
        assert_eq!(fail(&b).await, BreakerState::Closed);
        assert_eq!(fail(&b).await, BreakerState::Closed);
        assert_eq!(succeed(&b).await, BreakerState::Closed);
        assert_eq!(fail(&b).await, BreakerState::Closed);
        assert_eq!(fail(&b).await, BreakerState::Closed);
        assert_eq!(fail(&b).await, BreakerState::Open);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.is_open(), Some(Duration::from_secs(1)));
        assert_eq!(b.stats().opened, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_wait_out_the_cool_down_then_one_probe_goes_first() {
        let b = breaker(1, 1_000);
        fail(&b).await;
        let started = Instant::now();
        let probe = b.acquire().await;
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert!(probe.is_probe());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.is_open(), None, "half-open does not hold the consumer");

        // A second caller waits for the probe's outcome.
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move {
                let permit = b.acquire().await;
                (permit.is_probe(), Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished());
        assert_eq!(probe.record(false), BreakerState::Closed);
        let (was_probe, at) = waiter.await.unwrap();
        assert!(!was_probe);
        assert_eq!(at - started, Duration::from_millis(1_300));
        assert_eq!(b.stats().closed, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
        let b = breaker(1, 1_000);
        fail(&b).await;
        for expected in [2_000, 4_000, 4_000] {
            let probe = b.acquire().await;
            assert!(probe.is_probe());
            assert_eq!(probe.record(true), BreakerState::Open);
            assert_eq!(b.is_open(), Some(Duration::from_millis(expected)));
        }
        // A successful probe closes it and resets the cool-down.
        let started = Instant::now();
        assert_eq!(succeed(&b).await, BreakerState::Closed);
        assert_eq!(started.elapsed(), Duration::from_secs(4));
        fail(&b).await;
        assert_eq!(b.is_open(), Some(Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_hands_over_to_the_next_caller() {
        let b = breaker(1, 1_000);
        fail(&b).await;
        let probe = b.acquire().await;
        drop(probe);
        let next = tokio::time::timeout(Duration::from_millis(1), b.acquire())
            .await
            .expect("the slot is free at once");
        assert!(next.is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_closed_returns_once_a_call_could_go() {
        let b = breaker(1, 2_000);
        b.wait_closed().await;
        fail(&b).await;
        let started = Instant::now();
        b.wait_closed().await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        // Half-open with a probe in flight: wait for its outcome.
        let probe = b.acquire().await;
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.wait_closed().await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished());
        probe.record(false);
        waiter.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_ratio_over_the_window_opens_it_too() {
        let b = Arc::new(CircuitBreaker::new(BreakerConfig {
            failure_threshold: NonZeroU32::new(100).unwrap(),
            failure_ratio: Some(0.5),
            window_calls: NonZeroU32::new(4).unwrap(),
            ..BreakerConfig::default()
        }));
        // Alternating: never two failures in a row, but half of the window.
        assert_eq!(fail(&b).await, BreakerState::Closed);
        assert_eq!(succeed(&b).await, BreakerState::Closed);
        assert_eq!(fail(&b).await, BreakerState::Closed, "window not full yet");
        assert_eq!(
            succeed(&b).await,
            BreakerState::Closed,
            "only failures open it"
        );
        assert_eq!(fail(&b).await, BreakerState::Open);
    }

    #[test]
    fn config_checks_report_every_problem() {
        let mut problems = Vec::new();
        BreakerConfig {
            failure_ratio: Some(1.5),
            open_ms: NonZeroU64::new(10).unwrap(),
            max_open_ms: NonZeroU64::new(5).unwrap(),
            ..BreakerConfig::default()
        }
        .validate("breaker", &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
