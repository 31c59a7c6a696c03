//! What executes a request: the [`Executor`] trait, and the built-in `identity` pipeline and
//! `echo` model.
//!
//! The processor hands an executor the decoded requests of one batch that share a target, and
//! gets back one outcome per request, in order. Pipelines and model providers plug in behind
//! this trait; the built-ins stay for tests and benchmarks.

use std::num::{NonZeroU64, NonZeroUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::{Entity, ErrorBody, ErrorKind, StepRecord, Target};
use crate::section::Section;

/// One request, as an executor sees it.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// The request's id.
    pub request_id: String,
    /// The input.
    pub data: Value,
    /// Parameters, if any.
    pub parameters: Option<Map<String, Value>>,
    /// The entity, if any.
    pub entity: Option<Entity>,
    /// The tenant, if any.
    pub tenant: Option<String>,
}

/// A successful execution.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExecOutput {
    /// The output document.
    pub output: Value,
    /// Version of the model that answered, if a model did.
    pub model_version: Option<String>,
    /// Whether the answer came from a cache.
    pub cached: bool,
    /// Per-step records.
    pub steps: Vec<StepRecord>,
}

/// One outcome per request.
pub type ExecResult = Result<ExecOutput, ErrorBody>;

/// Executes requests. Implementations must return exactly one outcome per request, in the
/// order given, and must not panic: failures are outcomes with an [`ErrorKind`].
pub trait Executor: Send + Sync + 'static {
    /// Runs `requests`, which all name `target`.
    fn execute<'a>(
        &'a self,
        target: &'a Target,
        requests: Vec<ExecRequest>,
    ) -> BoxFuture<'a, Vec<ExecResult>>;

    /// Waits until `requests` requests for `target` may be executed: for rate-limit capacity,
    /// for an open circuit breaker to let calls through again, for an idle-unloaded model to
    /// load. The caller awaits it *before* its execute timeout starts, so waiting here never
    /// turns into a timeout. It never fails: whatever cannot be admitted is answered by
    /// [`execute`](Self::execute). The default admits at once.
    fn admit<'a>(&'a self, target: &'a Target, requests: usize) -> BoxFuture<'a, ()> {
        let _ = (target, requests);
        Box::pin(async {})
    }

    /// A reason to stop fetching new requests now (for instance "circuit breaker open for
    /// provider `x`"), or `None`. Polled often (about ten times a second) from the consumer
    /// thread, so it must be cheap and must not block. The default never holds.
    fn hold(&self) -> Option<String> {
        None
    }
}

impl<E: Executor + ?Sized> Executor for Arc<E> {
    fn execute<'a>(
        &'a self,
        target: &'a Target,
        requests: Vec<ExecRequest>,
    ) -> BoxFuture<'a, Vec<ExecResult>> {
        (**self).execute(target, requests)
    }

    fn admit<'a>(&'a self, target: &'a Target, requests: usize) -> BoxFuture<'a, ()> {
        (**self).admit(target, requests)
    }

    fn hold(&self) -> Option<String> {
        (**self).hold()
    }
}

/// The built-in targets: the `identity` pipeline (output = input) and the `echo` model
/// (`echo` or `echo@1`; output = input). `echo` honours a `delay_ms` parameter, sleeping that
/// long per request, which makes it a deliberately slow model for tests.
#[derive(Debug, Default, Clone)]
pub struct Builtins;

/// The only version of the built-in `echo` model.
pub const ECHO_VERSION: &str = "1";
/// Model ids the [`Builtins`] answer without a provider: the model manager falls back to them
/// and pipeline validation knows them.
pub(crate) const BUILTIN_MODELS: [&str; 2] = ["echo", "echo@1"];
/// Longest `delay_ms` the echo model accepts.
const MAX_ECHO_DELAY_MS: u64 = 60_000;

impl Builtins {
    fn identity(requests: Vec<ExecRequest>) -> Vec<ExecResult> {
        // The step does no work: its latency is the same for every request, read once.
        let latency_us = Instant::now().elapsed().as_micros() as u64;
        requests
            .into_iter()
            .map(|r| {
                Ok(ExecOutput {
                    output: r.data,
                    model_version: None,
                    cached: false,
                    steps: vec![StepRecord {
                        name: "identity".to_owned(),
                        latency_us,
                        cached: false,
                        output: None,
                        features: Vec::new(),
                    }],
                })
            })
            .collect()
    }

    async fn echo(requests: Vec<ExecRequest>) -> Vec<ExecResult> {
        let started = Instant::now();
        let mut delay = Duration::ZERO;
        let parsed: Vec<Result<ExecRequest, ErrorBody>> = requests
            .into_iter()
            .map(|r| {
                let ms = match r.parameters.as_ref().and_then(|p| p.get("delay_ms")) {
                    None => 0,
                    Some(v) => match v.as_u64() {
                        Some(ms) if ms <= MAX_ECHO_DELAY_MS => ms,
                        _ => {
                            return Err(ErrorBody::new(
                                ErrorKind::InvalidRequest,
                                format!("parameters.delay_ms must be an integer from 0 to {MAX_ECHO_DELAY_MS}"),
                            ));
                        }
                    },
                };
                delay += Duration::from_millis(ms);
                Ok(r)
            })
            .collect();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let latency_us = started.elapsed().as_micros() as u64;
        parsed
            .into_iter()
            .map(|r| {
                r.map(|r| ExecOutput {
                    output: r.data,
                    model_version: Some(ECHO_VERSION.to_owned()),
                    cached: false,
                    steps: vec![StepRecord {
                        name: "model:echo".to_owned(),
                        latency_us,
                        cached: false,
                        output: None,
                        features: Vec::new(),
                    }],
                })
            })
            .collect()
    }
}

/// Every request fails with the same error.
fn all_fail(n: usize, error: ErrorBody) -> Vec<ExecResult> {
    vec![Err(error); n]
}

impl Executor for Builtins {
    fn execute<'a>(
        &'a self,
        target: &'a Target,
        requests: Vec<ExecRequest>,
    ) -> BoxFuture<'a, Vec<ExecResult>> {
        Box::pin(async move {
            match target {
                Target::Pipeline(id) if id == "identity" => Self::identity(requests),
                Target::Model(id) if BUILTIN_MODELS.contains(&id.as_str()) => {
                    Self::echo(requests).await
                }
                Target::Pipeline(id) => all_fail(
                    requests.len(),
                    ErrorBody::new(
                        ErrorKind::UnknownPipeline,
                        format!("no pipeline `{id}` (known: identity)"),
                    ),
                ),
                Target::Model(id) => all_fail(
                    requests.len(),
                    ErrorBody::new(
                        ErrorKind::UnknownModel,
                        format!("no model `{id}` (known: {})", BUILTIN_MODELS.join(", ")),
                    ),
                ),
            }
        })
    }
}

/// `[executor]`: how much work is in flight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutorConfig {
    /// Batches processed concurrently.
    pub max_in_flight_batches: NonZeroUsize,
    /// Records consumed but not yet answered; at it the consumer stops taking records.
    pub max_in_flight_records: NonZeroUsize,
    /// Largest accepted message value.
    pub max_request_bytes: NonZeroUsize,
    /// Longest time a batch may spend in the executor.
    pub execute_timeout_ms: NonZeroU64,
    /// Time to drain and commit on shutdown.
    pub shutdown_timeout_ms: NonZeroU64,
    /// Whether records with the same Kafka key run in order.
    pub ordering: KeyOrdering,
}

/// `executor.ordering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyOrdering {
    /// Batches run concurrently; records of one key may finish in any order.
    Unordered,
    /// Records with the same key run one after another, in consumption order; different keys
    /// still run concurrently (in `executor.max_in_flight_batches` lanes).
    PerKey,
}

impl Section for ExecutorConfig {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(data: Value, params: Option<Value>) -> ExecRequest {
        ExecRequest {
            request_id: "r".into(),
            data,
            parameters: params.and_then(|p| p.as_object().cloned()),
            entity: None,
            tenant: None,
        }
    }

    #[tokio::test]
    async fn builtins_answer_known_targets_and_reject_unknown_ones() {
        let b = Builtins;
        let out = b
            .execute(
                &Target::Pipeline("identity".into()),
                vec![req(json!({"a": 1}), None)],
            )
            .await;
        assert_eq!(out[0].as_ref().unwrap().output, json!({"a": 1}));
        let out = b
            .execute(&Target::Model("echo@1".into()), vec![req(json!(2), None)])
            .await;
        assert_eq!(out[0].as_ref().unwrap().model_version.as_deref(), Some("1"));
        let out = b
            .execute(
                &Target::Model("gpt".into()),
                vec![req(json!(1), None), req(json!(2), None)],
            )
            .await;
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].as_ref().unwrap_err().kind, ErrorKind::UnknownModel);
        let out = b
            .execute(&Target::Pipeline("nope".into()), vec![req(json!(1), None)])
            .await;
        assert_eq!(
            out[0].as_ref().unwrap_err().kind,
            ErrorKind::UnknownPipeline
        );
    }

    #[tokio::test(start_paused = true)]
    async fn echo_delay_is_per_request_and_validated() {
        let b = Builtins;
        let started = tokio::time::Instant::now();
        let out = b
            .execute(
                &Target::Model("echo".into()),
                vec![
                    req(json!(1), Some(json!({"delay_ms": 30}))),
                    req(json!(2), Some(json!({"delay_ms": 20}))),
                    req(json!(3), Some(json!({"delay_ms": "soon"}))),
                ],
            )
            .await;
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        assert!(out[0].is_ok() && out[1].is_ok());
        assert_eq!(out[2].as_ref().unwrap_err().kind, ErrorKind::InvalidRequest);
    }
}
