//! Executing model calls: a batch through the result cache and the guarded provider call, each
//! failure classified for retrying, and the [`ModelExecutor`] that serves `Target::Model`.

use std::sync::Arc;
use std::time::Instant;

use futures::future::{BoxFuture, join_all};

use super::lifecycle::InFlight;
use super::registry::{ModelManager, ResolvedModel};
use super::routing::Routed;
use super::shadow::{PrimaryAnswer, ShadowJob};
use super::stats::add;
use crate::executor::{BUILTIN_MODELS, Builtins, ExecOutput, ExecRequest, ExecResult, Executor};
use crate::model::{ErrorBody, ErrorKind, StepRecord, Target};
use crate::providers::cache::{CacheKey, CachePolicy};
use crate::providers::{Provider, ProviderError, ProviderInput, ProviderOutput};

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

impl ModelManager {
    /// Runs `requests` through the model `id` resolves to (a routed name: each request through
    /// the version its route picks); one outcome per request, in order.
    pub async fn infer(&self, id: &str, requests: Vec<ExecRequest>) -> Vec<ExecResult> {
        self.infer_routed(id, requests, &[])
            .await
            .into_iter()
            .map(|outcome| outcome.map_err(|failure| failure.body))
            .collect()
    }

    /// Runs `requests` for `id`: split by its route when it has one, each group through the
    /// version it was routed to (the groups concurrently), otherwise whole through what `id`
    /// resolves to. `extra` are ids named as known in an `unknown_model` error.
    async fn infer_routed(
        &self,
        id: &str,
        requests: Vec<ExecRequest>,
        extra: &[&str],
    ) -> Vec<ClassifiedResult> {
        match self.route_batch(id, requests) {
            Routed::Whole(requests) => match self.resolve_listing(id, extra) {
                Ok(model) => {
                    let outcomes = self.infer_classified(&model, requests).await;
                    if let Some(monitor) =
                        self.monitored(id).as_ref().and_then(|e| e.monitor.as_ref())
                    {
                        monitor.record(&model.id, outcomes.iter().map(|o| o.as_ref().ok()));
                    }
                    outcomes
                }
                Err(error) => vec![Err(ModelFailure::never(error)); requests.len()],
            },
            Routed::Split { n, groups, entry } => {
                // The shadows get the requests: the primary's calls consume their inputs, so
                // with a lane they run on copies of only what a call reads (data, parameters,
                // tenant), and the requests move to the lane afterwards.
                let mut copies: Option<Vec<ExecRequest>> = None;
                let groups = match &entry.lane {
                    None => groups,
                    Some(_) => {
                        let mut originals = Vec::with_capacity(n);
                        let groups = groups
                            .into_iter()
                            .map(|(version_id, idx, requests)| {
                                let inputs = requests.iter().map(call_input).collect();
                                originals.extend(requests);
                                (version_id, idx, inputs)
                            })
                            .collect();
                        copies = Some(originals);
                        groups
                    }
                };
                let runs = groups
                    .into_iter()
                    .map(|(version_id, idx, requests)| async move {
                        let outcomes = match self.resolve_listing(&version_id, extra) {
                            Ok(model) => self.infer_classified(&model, requests).await,
                            Err(error) => vec![Err(ModelFailure::never(error)); requests.len()],
                        };
                        (version_id, idx, outcomes)
                    });
                let done = join_all(runs).await;
                if let Some(monitor) = &entry.monitor {
                    for (version_id, _, outcomes) in &done {
                        monitor.record(version_id, outcomes.iter().map(|o| o.as_ref().ok()));
                    }
                }
                if let (Some(lane), Some(requests)) = (&entry.lane, copies) {
                    let versions = done
                        .iter()
                        .map(|(version_id, _, _)| {
                            version_id.rsplit('@').next().unwrap_or_default().to_owned()
                        })
                        .collect();
                    let primary = done
                        .iter()
                        .enumerate()
                        .flat_map(|(version, (_, _, outcomes))| {
                            outcomes.iter().map(move |o| {
                                o.as_ref().ok().map(|out| PrimaryAnswer {
                                    version,
                                    output: out.output.clone(),
                                    latency_us: out.steps.first().map_or(0, |s| s.latency_us),
                                })
                            })
                        })
                        .collect();
                    lane.offer(ShadowJob {
                        requests,
                        primary,
                        versions,
                    });
                }
                let mut slots: Vec<Option<ClassifiedResult>> = vec![None; n];
                for (_, idx, outcomes) in done {
                    for (i, outcome) in idx.into_iter().zip(outcomes) {
                        slots[i] = Some(outcome);
                    }
                }
                slots
                    .into_iter()
                    .map(|slot| {
                        slot.unwrap_or_else(|| {
                            Err(ModelFailure::never(ErrorBody::new(
                                ErrorKind::Internal,
                                "the routed model returned no outcome",
                            )))
                        })
                    })
                    .collect()
            }
        }
    }

    /// Runs `requests` through `model`, each failure classified for retrying. Only a
    /// request's `data`, `parameters` and `tenant` are read.
    pub(super) async fn infer_classified(
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
                            features: Vec::new(),
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

/// What [`ModelManager::infer_classified`] reads of `request`, copied: its data, parameters
/// and tenant.
fn call_input(request: &ExecRequest) -> ExecRequest {
    ExecRequest {
        request_id: String::new(),
        data: request.data.clone(),
        parameters: request.parameters.clone(),
        entity: None,
        tenant: request.tenant.clone(),
    }
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

    /// Whether the [`Builtins`] answer `id`: a built-in id (`echo`) the manager neither
    /// loaded nor routes.
    fn builtin_answers(&self, id: &str) -> bool {
        BUILTIN_MODELS.contains(&id)
            && self.manager.route_shares(id, 0).is_none()
            && self.manager.resolve(id).is_err()
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
        if !self.builtin_answers(id) {
            self.manager
                .infer_routed(id, requests, &BUILTIN_MODELS)
                .await
        } else {
            builtins(self.builtins.execute(target, requests).await)
        }
    }

    /// Whether the provider answering `target` retries its transient failures itself
    /// ([`Provider::retries_itself`]); false for unknown models and the built-ins.
    pub fn retries_itself(&self, target: &Target) -> bool {
        match target {
            Target::Model(id) => {
                // A routed name: what its first version with traffic does (the versions of
                // one name normally share a provider).
                let id = match self.manager.route_shares(id, 1) {
                    Some(shares) => shares.into_iter().next().map(|(v, _)| v),
                    None => Some(id.clone()),
                };
                id.and_then(|id| self.manager.resolve(&id).ok())
                    .is_some_and(|model| model.provider.retries_itself())
            }
            Target::Pipeline(_) => false,
        }
    }
}

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
            if !self.builtin_answers(id) {
                self.manager
                    .infer_routed(id, requests, &BUILTIN_MODELS)
                    .await
                    .into_iter()
                    .map(|outcome| outcome.map_err(|failure| failure.body))
                    .collect()
            } else {
                self.builtins.execute(target, requests).await
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
