//! Shadow versions: a route's shadows get a copy of each batch after the primary answered, off
//! the request path, and their answers are compared with the primary's.
//!
//! A route with a [`ShadowConfig`] gets a *lane* when it is installed: a bounded queue of
//! batches (`queue_batches`) and one task that takes them in turn. After a routed batch's
//! primary versions answered, [`ModelManager`]'s executor puts the requests and the primary
//! outcomes on the lane with `try_send` and returns: a full queue drops the batch (counted,
//! `outcome="dropped"`), nothing waits. The task calls each shadow version under its own
//! `timeout` (a hung provider is cut off and counted, `outcome="timeout"`; failures are
//! `outcome="error"`), never through the result cache, and never retried beyond what the
//! provider does itself. For each request whose primary succeeded it compares the two outputs
//! ([`agreement`]: at `compare_path`, numbers within `tolerance`, anything else equal), counts
//! the result (`agreed`, `disagreed`, or `incomparable` when the path is missing), and hands a
//! comparison document to the [`ShadowSink`] (the service's sink produces it to
//! `topics.shadow_results`, keyed by the request id).
//!
//! The primary's result never depends on a shadow: the lane gets the batch after the primary
//! answered, the queue never blocks, and the shadow task holds no permit, no execute timeout
//! and no lock the primary needs: its provider calls take the providers' shadow permits
//! ([`lane`]), never the request path's. Each comparison is serialised straight from the
//! lane's values ([`Comparison`]), the comparisons of a batch into one reused buffer, and the
//! outcomes are counted once per batch. A shadow version's provider is also left out of
//! [`ModelManager::hold`] when only shadows use it, so its open breaker does not pause the
//! stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use super::registry::ModelManager;
use crate::executor::ExecRequest;
use crate::metrics::SHADOW_REQUESTS_TOTAL;
use crate::providers::lane;

/// Where shadow comparisons go. [`publish`](Self::publish) must not block; it may drop (and
/// should count what it drops).
pub trait ShadowSink: Send + Sync + 'static {
    /// One comparison: `comparison` is a `shadow_result.v1` JSON document
    /// (`schemas/shadow_result.v1.json`) of the shadow version `shadow` (`name@version`, to
    /// count what is dropped), keyed by `request_id`. The bytes are borrowed from a buffer
    /// the lane reuses: copy what is kept.
    fn publish(&self, request_id: &str, shadow: &str, comparison: &[u8]);
}

/// The shadows of a route and how their answers are compared.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowConfig {
    /// Versions of the route's model that get a copy of each batch.
    pub versions: Vec<String>,
    /// The output value compared, as a dotted path (`label`, `scores.0`); `None` compares the
    /// whole outputs.
    pub compare_path: Option<String>,
    /// Two numbers agree when they differ by at most this.
    pub tolerance: f64,
    /// Batches waiting for the shadows at most; beyond that a batch is dropped.
    pub queue_batches: usize,
    /// Longest time one shadow call may take.
    pub timeout: Duration,
}

impl ShadowConfig {
    /// Shadows `versions`, comparing whole outputs exactly, 64 batches queued, 10 s timeout.
    pub fn new<V: Into<String>>(versions: impl IntoIterator<Item = V>) -> Self {
        ShadowConfig {
            versions: versions.into_iter().map(Into::into).collect(),
            compare_path: None,
            tolerance: 0.0,
            queue_batches: 64,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What the primary answered for one request: the version (an index into
/// [`ShadowJob::versions`]), the output, the call's latency.
pub(super) struct PrimaryAnswer {
    pub(super) version: usize,
    pub(super) output: Value,
    pub(super) latency_us: u64,
}

/// A batch for the shadows: requests and, per request, the primary's answer when it
/// succeeded. The requests are moved to the lane; only their inputs were copied, before the
/// primary's call consumed its own.
pub(super) struct ShadowJob {
    pub(super) requests: Vec<ExecRequest>,
    pub(super) primary: Vec<Option<PrimaryAnswer>>,
    /// The primary versions that answered the batch (`1`, not `sentiment@1`).
    pub(super) versions: Vec<String>,
}

/// A route's queue to its shadow task. Dropping it (with the route table that holds it) ends
/// the task once the queued batches are done.
pub(super) struct ShadowLane {
    tx: mpsc::Sender<ShadowJob>,
    name: String,
    versions: Vec<String>,
}

impl ShadowLane {
    /// Starts the task of `name`'s shadows, calling them through `manager`. `None` (logged)
    /// outside a Tokio runtime.
    pub(super) fn start(
        name: &str,
        config: &ShadowConfig,
        manager: ModelManager,
        sink: Option<Arc<dyn ShadowSink>>,
    ) -> Option<ShadowLane> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(model = %name, "no Tokio runtime: the route's shadows are off");
            return None;
        };
        let (tx, rx) = mpsc::channel(config.queue_batches.max(1));
        runtime.spawn(run(name.to_owned(), config.clone(), manager, sink, rx));
        Some(ShadowLane {
            tx,
            name: name.to_owned(),
            versions: config.versions.clone(),
        })
    }

    /// Queues `job` without waiting; a full queue drops it (counted per shadow version).
    pub(super) fn offer(&self, job: ShadowJob) {
        let n = job.primary.iter().filter(|p| p.is_some()).count() as u64;
        if n == 0 {
            return;
        }
        if self.tx.try_send(job).is_err() {
            for version in &self.versions {
                metrics::counter!(SHADOW_REQUESTS_TOTAL, "model" => format!("{}@{version}", self.name), "outcome" => "dropped")
                    .increment(n);
            }
        }
    }
}

/// One comparison as it is produced (`schemas/shadow_result.v1.json`), serialised straight
/// from the lane's borrowed values.
#[derive(Serialize)]
struct Comparison<'a> {
    request_id: &'a str,
    model: &'a str,
    primary: Answer<'a>,
    shadow: Answer<'a>,
    compare_path: Option<&'a str>,
    agreement: Option<bool>,
}

/// One side of a [`Comparison`].
#[derive(Serialize)]
struct Answer<'a> {
    version: &'a str,
    output: &'a Value,
    latency_us: u64,
}

/// The outcomes of one shadow version over one batch, counted once per batch.
#[derive(Default)]
struct Tally {
    agreed: u64,
    disagreed: u64,
    incomparable: u64,
    error: u64,
    timeout: u64,
}

impl Tally {
    fn add(&mut self, agreed: Option<bool>) {
        match agreed {
            Some(true) => self.agreed += 1,
            Some(false) => self.disagreed += 1,
            None => self.incomparable += 1,
        }
    }

    fn record(&self, id: &str) {
        for (outcome, n) in [
            ("agreed", self.agreed),
            ("disagreed", self.disagreed),
            ("incomparable", self.incomparable),
            ("error", self.error),
            ("timeout", self.timeout),
        ] {
            if n > 0 {
                metrics::counter!(SHADOW_REQUESTS_TOTAL, "model" => id.to_owned(), "outcome" => outcome)
                    .increment(n);
            }
        }
    }
}

async fn run(
    name: String,
    config: ShadowConfig,
    manager: ModelManager,
    sink: Option<Arc<dyn ShadowSink>>,
    mut rx: mpsc::Receiver<ShadowJob>,
) {
    let ids: Vec<String> = config
        .versions
        .iter()
        .map(|v| format!("{name}@{v}"))
        .collect();
    // The comparisons of one batch and version, serialised one after the other; reused.
    let mut buffer: Vec<u8> = Vec::new();
    let mut ends: Vec<(usize, usize)> = Vec::new();
    while let Some(mut job) = rx.recv().await {
        let last = config.versions.len().saturating_sub(1);
        for (v, (version, id)) in config.versions.iter().zip(&ids).enumerate() {
            let mut tally = Tally::default();
            // Requests the primary answered, by another version than this shadow.
            let picks: Vec<usize> = (0..job.requests.len())
                .filter(|&i| {
                    job.primary
                        .get(i)
                        .and_then(Option::as_ref)
                        .and_then(|p| job.versions.get(p.version))
                        .is_some_and(|p| p != version)
                })
                .collect();
            if picks.is_empty() {
                continue;
            }
            let Ok(model) = manager.resolve(id) else {
                tally.error = picks.len() as u64;
                tally.record(id);
                continue;
            };
            // The shadow's inputs: the last version takes them, the others copy them. The
            // request ids stay for the comparisons (the call does not read them).
            let requests: Vec<ExecRequest> = picks
                .iter()
                .map(|&i| {
                    let r = &mut job.requests[i];
                    if v == last {
                        ExecRequest {
                            request_id: String::new(),
                            data: r.data.take(),
                            parameters: r.parameters.take(),
                            entity: r.entity.take(),
                            tenant: r.tenant.take(),
                        }
                    } else {
                        ExecRequest {
                            request_id: String::new(),
                            ..r.clone()
                        }
                    }
                })
                .collect();
            let started = Instant::now();
            // On the providers' shadow permits (`lane`), never the request path's.
            let call = lane::shadow(manager.infer_classified(&model, requests));
            let Ok(outcomes) = tokio::time::timeout(config.timeout, call).await else {
                tally.timeout = picks.len() as u64;
                tally.record(id);
                continue;
            };
            let latency_us = started.elapsed().as_micros() as u64;
            buffer.clear();
            ends.clear();
            for (&i, outcome) in picks.iter().zip(outcomes) {
                let (Some(primary), Ok(shadow)) = (&job.primary[i], outcome) else {
                    tally.error += 1;
                    continue;
                };
                let agreed = agreement(
                    &primary.output,
                    &shadow.output,
                    config.compare_path.as_deref(),
                    config.tolerance,
                );
                tally.add(agreed);
                if sink.is_some() {
                    let comparison = Comparison {
                        request_id: &job.requests[i].request_id,
                        model: &name,
                        primary: Answer {
                            version: job.versions.get(primary.version).map_or("", String::as_str),
                            output: &primary.output,
                            latency_us: primary.latency_us,
                        },
                        shadow: Answer {
                            version,
                            output: &shadow.output,
                            latency_us,
                        },
                        compare_path: config.compare_path.as_deref(),
                        agreement: agreed,
                    };
                    let start = buffer.len();
                    // Serialising a `Value` into memory cannot fail; if it ever did, the
                    // comparison is counted as not produced.
                    if serde_json::to_writer(&mut buffer, &comparison).is_ok() {
                        ends.push((i, buffer.len()));
                    } else {
                        buffer.truncate(start);
                        metrics::counter!(SHADOW_REQUESTS_TOTAL, "model" => id.clone(), "outcome" => "unpublished")
                            .increment(1);
                    }
                }
            }
            tally.record(id);
            if let Some(sink) = &sink {
                let mut start = 0;
                for &(i, end) in &ends {
                    sink.publish(&job.requests[i].request_id, id, &buffer[start..end]);
                    start = end;
                }
            }
        }
    }
}

/// Whether two outputs agree: the values at `path` (dotted; the whole outputs without one),
/// numbers within `tolerance`, anything else equal. `None` when either output has nothing
/// at the path.
pub fn agreement(
    primary: &Value,
    shadow: &Value,
    path: Option<&str>,
    tolerance: f64,
) -> Option<bool> {
    let (a, b) = match path {
        Some(path) => (lookup(primary, path)?, lookup(shadow, path)?),
        None => (primary, shadow),
    };
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => Some((x - y).abs() <= tolerance),
        _ => Some(a == b),
    }
}

/// The value at a dotted path: object keys, and array indexes as numbers.
pub(crate) fn lookup<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(value, |v, segment| match v {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn agreement_compares_labels_and_numbers_within_the_tolerance() {
        let a = json!({"label": "positive", "compound": 0.51, "scores": [0.1, 0.9]});
        let b = json!({"label": "positive", "compound": 0.55, "scores": [0.2, 0.8]});
        assert_eq!(agreement(&a, &b, Some("label"), 0.0), Some(true));
        assert_eq!(agreement(&a, &b, Some("compound"), 0.05), Some(true));
        assert_eq!(agreement(&a, &b, Some("compound"), 0.01), Some(false));
        assert_eq!(agreement(&a, &b, Some("scores.1"), 0.0), Some(false));
        assert_eq!(agreement(&a, &b, Some("missing"), 0.0), None);
        assert_eq!(agreement(&a, &b, None, 0.0), Some(false));
        assert_eq!(agreement(&a, &a, None, 0.0), Some(true));
    }
}
