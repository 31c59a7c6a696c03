//! What each version of a routed model outputs, over time: labels counted, scores in
//! histograms, error and empty rates, and drift as a population stability index (PSI).
//!
//! A route with a [`MonitorConfig`] watches every answer of its versions (routed or named
//! explicitly). For each version:
//!
//! - `inferflow_model_outputs_total{model, outcome}`: `ok`, `error`, `empty` (a null or empty
//!   output, or nothing at a configured path);
//! - for each `labels` path, `inferflow_model_output_labels_total{model, path, label}` (the
//!   first [`MAX_LABELS`] distinct values of a path, later ones as `other`, so a free-text
//!   path cannot flood the series);
//! - for each `scores` path, `inferflow_model_output_score{model, path}` (a histogram);
//! - for every path, `inferflow_model_output_psi{model, path}`: the PSI between the
//!   *reference* window (the first `reference_secs` after the route was installed, then frozen;
//!   or frozen on demand with [`ModelManager::freeze_reference`]; or replaced by the current
//!   window, frozen, with [`ModelManager::rebase_reference`], which
//!   `POST /v1/routes/{route}/drift/reference` calls) and the *current* window (the
//!   last `current_secs`, sliding in tenths). Labels are their own bins; scores fall into the
//!   bins `score_bins` bounds (edges, ascending; below the first and above the last are bins
//!   too).
//!
//! PSI = Σ (cᵢ − rᵢ) · ln(cᵢ / rᵢ) over the bins, with cᵢ and rᵢ the current and reference
//! shares, each at least [`PSI_FLOOR`] so an empty bin does not make it infinite. Below 0.1 is
//! usually read as stable, 0.1 to 0.25 as a moderate shift, above 0.25 as a large one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::registry::ModelManager;
use super::shadow::lookup;
use crate::executor::ExecOutput;
use crate::metrics::{
    MODEL_OUTPUT_LABELS_TOTAL, MODEL_OUTPUT_PSI, MODEL_OUTPUT_SCORE, MODEL_OUTPUTS_TOTAL,
};

/// Distinct label values counted per version and path; later ones count as `other`.
pub const MAX_LABELS: usize = 32;
/// The smallest share a bin counts with in the PSI.
pub const PSI_FLOOR: f64 = 1e-4;
/// Slices of the current window.
const SLICES: u32 = 10;

/// Which outputs of a route's versions are watched, and the drift windows.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    /// Dotted output paths with categorical values (`label`).
    pub labels: Vec<String>,
    /// Dotted output paths with numbers (`compound`, `scores.0`).
    pub scores: Vec<String>,
    /// Bin edges of the scores for the PSI, ascending.
    pub score_bins: Vec<f64>,
    /// The reference window: this long after the route is installed, then frozen.
    pub reference: Duration,
    /// The current window, sliding.
    pub current: Duration,
}

/// The population stability index of `current` against `reference` (counts per bin, same
/// bins). `None` when either has no observation.
pub fn psi(reference: &[u64], current: &[u64]) -> Option<f64> {
    let (rt, ct) = (
        reference.iter().sum::<u64>() as f64,
        current.iter().sum::<u64>() as f64,
    );
    if rt == 0.0 || ct == 0.0 {
        return None;
    }
    let n = reference.len().max(current.len());
    let share =
        |v: &[u64], i: usize, t: f64| (v.get(i).copied().unwrap_or(0) as f64 / t).max(PSI_FLOOR);
    Some(
        (0..n)
            .map(|i| {
                let (r, c) = (share(reference, i, rt), share(current, i, ct));
                (c - r) * (c / r).ln()
            })
            .sum(),
    )
}

/// Bins of one path: counts in the reference window and in the slices of the current one.
#[derive(Debug)]
struct Drift {
    reference: Vec<u64>,
    frozen: bool,
    slices: VecDeque<(Instant, Vec<u64>)>,
}

impl Drift {
    fn new() -> Self {
        Drift {
            reference: Vec::new(),
            frozen: false,
            slices: VecDeque::new(),
        }
    }

    /// Counts an observation in bin `bin` at `now`; returns the PSI.
    fn observe(
        &mut self,
        bin: usize,
        now: Instant,
        started: Instant,
        cfg: &MonitorConfig,
    ) -> Option<f64> {
        if !self.frozen && now.duration_since(started) >= cfg.reference {
            self.frozen = true;
        }
        if !self.frozen {
            bump(&mut self.reference, bin);
        }
        let slice = cfg.current / SLICES;
        while self
            .slices
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= cfg.current)
        {
            self.slices.pop_front();
        }
        match self.slices.back_mut() {
            Some((at, counts)) if now.duration_since(*at) < slice => bump(counts, bin),
            _ => {
                let mut counts = Vec::new();
                bump(&mut counts, bin);
                self.slices.push_back((now, counts));
            }
        }
        let current = self.current(now, cfg);
        // Only a frozen reference is compared: while it fills, the two windows overlap.
        self.frozen
            .then(|| psi(&self.reference, &current))
            .flatten()
    }

    /// The counts of the current window at `now`: the slices of the last `cfg.current`.
    fn current(&self, now: Instant, cfg: &MonitorConfig) -> Vec<u64> {
        let mut current: Vec<u64> = Vec::new();
        for (_, counts) in self
            .slices
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) < cfg.current)
        {
            for (i, c) in counts.iter().enumerate() {
                if current.len() <= i {
                    current.resize(i + 1, 0);
                }
                current[i] += c;
            }
        }
        current
    }

    /// Makes the current window at `now` the reference, frozen; returns the PSI of the
    /// current window against it (0, or `None` without observations).
    fn rebase(&mut self, now: Instant, cfg: &MonitorConfig) -> Option<f64> {
        self.reference = self.current(now, cfg);
        self.frozen = true;
        psi(&self.reference, &self.reference)
    }
}

fn bump(counts: &mut Vec<u64>, bin: usize) {
    if counts.len() <= bin {
        counts.resize(bin + 1, 0);
    }
    counts[bin] += 1;
}

/// One path's state for one version: its drift and, for labels, the bin of each label.
#[derive(Debug)]
struct PathState {
    drift: Drift,
    labels: BTreeMap<String, usize>,
}

/// A route's monitor: its configuration and the state per version and path.
pub(super) struct Monitor {
    pub(super) config: MonitorConfig,
    started: Instant,
    state: Mutex<HashMap<(String, String), PathState>>,
}

impl Monitor {
    pub(super) fn new(config: MonitorConfig) -> Self {
        Monitor {
            config,
            started: Instant::now(),
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Makes each version's and path's current window its reference, frozen, and sets the
    /// PSI gauges accordingly; what each reference holds now, sorted by model and path.
    pub(super) fn rebase(&self) -> Vec<ReferenceWindow> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<ReferenceWindow> = state
            .iter_mut()
            .map(|((model, path), s)| {
                if let Some(psi) = s.drift.rebase(now, &self.config) {
                    metrics::gauge!(MODEL_OUTPUT_PSI, "model" => model.clone(), "path" => path.clone())
                        .set(psi);
                }
                ReferenceWindow {
                    model: model.clone(),
                    path: path.clone(),
                    observations: s.drift.reference.iter().sum(),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.model, &a.path).cmp(&(&b.model, &b.path)));
        out
    }

    /// Freezes every reference window now (those still filling).
    pub(super) fn freeze(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for path in state.values_mut() {
            path.drift.frozen = true;
        }
    }

    /// Records what `model` (`name@version`) answered: each outcome's output, `None` for a
    /// failure.
    pub(super) fn record<'a>(
        &self,
        model: &str,
        outcomes: impl Iterator<Item = Option<&'a ExecOutput>>,
    ) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (mut ok, mut errors, mut empty) = (0u64, 0u64, 0u64);
        for outcome in outcomes {
            let Some(out) = outcome else {
                errors += 1;
                continue;
            };
            let mut missing = is_empty(&out.output);
            for path in &self.config.labels {
                let Some(value) = lookup(&out.output, path) else {
                    missing = true;
                    continue;
                };
                let text = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let entry = state
                    .entry((model.to_owned(), path.clone()))
                    .or_insert_with(|| PathState {
                        drift: Drift::new(),
                        labels: BTreeMap::new(),
                    });
                let next = entry.labels.len();
                let (label, bin) = match entry.labels.get(&text) {
                    Some(&bin) => (text, bin),
                    None if next < MAX_LABELS => {
                        entry.labels.insert(text.clone(), next);
                        (text, next)
                    }
                    None => ("other".to_owned(), MAX_LABELS),
                };
                metrics::counter!(MODEL_OUTPUT_LABELS_TOTAL, "model" => model.to_owned(), "path" => path.clone(), "label" => label)
                    .increment(1);
                if let Some(psi) = entry.drift.observe(bin, now, self.started, &self.config) {
                    metrics::gauge!(MODEL_OUTPUT_PSI, "model" => model.to_owned(), "path" => path.clone())
                        .set(psi);
                }
            }
            for path in &self.config.scores {
                let Some(score) = lookup(&out.output, path).and_then(Value::as_f64) else {
                    missing = true;
                    continue;
                };
                metrics::histogram!(MODEL_OUTPUT_SCORE, "model" => model.to_owned(), "path" => path.clone())
                    .record(score);
                let bin = self
                    .config
                    .score_bins
                    .partition_point(|edge| *edge <= score);
                let entry = state
                    .entry((model.to_owned(), path.clone()))
                    .or_insert_with(|| PathState {
                        drift: Drift::new(),
                        labels: BTreeMap::new(),
                    });
                if let Some(psi) = entry.drift.observe(bin, now, self.started, &self.config) {
                    metrics::gauge!(MODEL_OUTPUT_PSI, "model" => model.to_owned(), "path" => path.clone())
                        .set(psi);
                }
            }
            if missing {
                empty += 1;
            } else {
                ok += 1;
            }
        }
        for (outcome, n) in [("ok", ok), ("error", errors), ("empty", empty)] {
            if n > 0 {
                metrics::counter!(MODEL_OUTPUTS_TOTAL, "model" => model.to_owned(), "outcome" => outcome)
                    .increment(n);
            }
        }
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// One version's and path's drift reference, as [`ModelManager::rebase_reference`] left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReferenceWindow {
    /// The version, `name@version`.
    pub model: String,
    /// The output path.
    pub path: String,
    /// Outputs the reference counts.
    pub observations: u64,
}

impl ModelManager {
    /// Makes the current window of every version and path of `name`'s route monitor its
    /// reference, frozen (see [`MonitorConfig`]): from here on the PSI compares the current
    /// window with what it held now, and is 0 at once. What each reference holds, or `None`
    /// when `name` has no monitored route. Paths not observed yet start their reference
    /// window as usual.
    pub fn rebase_reference(&self, name: &str) -> Option<Vec<ReferenceWindow>> {
        let table = self.route_table();
        let monitor = table.get(name)?.monitor.as_ref()?;
        Some(monitor.rebase())
    }

    /// Freezes the reference windows of `name`'s route monitor now (see [`MonitorConfig`]):
    /// from here on its PSI compares the current window with what was seen so far. False
    /// when `name` has no monitored route.
    pub fn freeze_reference(&self, name: &str) -> bool {
        let table = self.route_table();
        match table.get(name).and_then(|e| e.monitor.as_ref()) {
            Some(monitor) => {
                monitor.freeze();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_matches_a_hand_computed_value() {
        // Reference shares 0.5 / 0.3 / 0.2, current 0.3 / 0.3 / 0.4:
        // (0.3-0.5)·ln(0.3/0.5) + 0 + (0.4-0.2)·ln(0.4/0.2)
        // = 0.2·0.510826 + 0.2·0.693147 = 0.240795
        let value = psi(&[50, 30, 20], &[30, 30, 40]).unwrap();
        assert!((value - 0.240_795).abs() < 1e-5, "{value}");
        assert_eq!(psi(&[1, 2, 3], &[2, 4, 6]), Some(0.0));
        assert_eq!(psi(&[], &[1]), None);
        // An empty bin counts at the floor, not as infinity.
        assert!(psi(&[10, 0], &[5, 5]).unwrap().is_finite());
    }

    #[test]
    fn drift_stays_near_zero_when_stable_and_rises_when_the_outputs_shift() {
        let cfg = MonitorConfig {
            labels: vec![],
            scores: vec![],
            score_bins: vec![],
            reference: Duration::from_secs(10),
            current: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let mut d = Drift::new();
        // Reference: bins 0..4 evenly over the first 10 s.
        for i in 0..1000u64 {
            d.observe(
                (i % 4) as usize,
                t0 + Duration::from_millis(i * 9),
                t0,
                &cfg,
            );
        }
        // Stable: the same distribution for the next 10 s.
        let mut last = None;
        for i in 0..1000u64 {
            last = d.observe(
                (i % 4) as usize,
                t0 + Duration::from_millis(10_000 + i * 10),
                t0,
                &cfg,
            );
        }
        let stable = last.unwrap();
        assert!(stable < 0.01, "stable PSI {stable}");
        // Shifted: most outputs in bin 3 for the next 10 s; the window slides onto them.
        for i in 0..1000u64 {
            let bin = if i % 10 < 7 { 3 } else { (i % 3) as usize };
            last = d.observe(bin, t0 + Duration::from_millis(20_000 + i * 10), t0, &cfg);
        }
        let shifted = last.unwrap();
        assert!(shifted > 0.25, "shifted PSI {shifted}");
    }

    #[test]
    fn a_rebased_reference_is_the_current_window() {
        let cfg = MonitorConfig {
            labels: vec![],
            scores: vec![],
            score_bins: vec![],
            reference: Duration::from_secs(3600),
            current: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let mut d = Drift::new();
        // 20 s of bin 0, then 10 s of bins 1 and 2: the current window holds only the latter.
        for i in 0..200u64 {
            assert_eq!(
                d.observe(0, t0 + Duration::from_millis(i * 100), t0, &cfg),
                None
            );
        }
        for i in 0..100u64 {
            let bin = 1 + (i % 2) as usize;
            d.observe(bin, t0 + Duration::from_millis(20_000 + i * 100), t0, &cfg);
        }
        // Just before the first slice of bins 1 and 2 leaves the window (slices of 1 s).
        let now = t0 + Duration::from_millis(29_950);
        assert_eq!(d.rebase(now, &cfg), Some(0.0));
        assert_eq!(d.reference.iter().sum::<u64>(), 100, "{:?}", d.reference);
        assert_eq!(d.reference.first(), Some(&0), "bin 0 left the window");
        // The same mix stays near 0; all in bin 0 again is a large shift.
        let same = d.observe(1, now, t0, &cfg).unwrap();
        assert!(same < 0.01, "{same}");
        let mut last = None;
        for i in 0..100u64 {
            last = d.observe(0, now + Duration::from_millis(i * 100), t0, &cfg);
        }
        assert!(last.unwrap() > 0.25, "{last:?}");
    }
}
