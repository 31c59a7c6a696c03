//! Running compiled pipelines over a batch of requests.
//!
//! A batch goes through the steps together: a model step makes one batched call for every
//! request still alive, a features step one batched read. Each step computes its outcomes
//! first and applies them after, so a timeout (which drops the step's future) or a failure
//! never leaves a request half-changed. Per request, a failed step either fails the request,
//! is skipped, or substitutes a default (`on_error`).

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use futures::future::BoxFuture;
use serde_json::{Map, Value};

use super::Snapshot;
use super::def::{FeatureSource, MAX_DEPTH, OnError, Pipeline, Step, StepKind};
use super::path::JsonPath;
use super::transform::{Transform, TransformContext};
use crate::executor::ExecRequest;
use crate::feature_store::{CachedRead, FeatureStoreError, FeatureVector, PendingRead};
use crate::metrics::{PIPELINE_MODEL_REQUESTS_TOTAL, PIPELINE_STEP_ERRORS_TOTAL};
use crate::model::{Entity, ErrorBody, ErrorKind, FeatureRead, StepRecord, Target};
use crate::providers::manager::{ModelExecutor, RetryAdvice};
use crate::tracing_otel::{self as otel, SpanKind};

/// One request on its way through a pipeline.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub(crate) request_id: String,
    /// The pipeline's input, before any step.
    pub(crate) input: Value,
    /// The value flowing through the steps.
    pub(crate) data: Value,
    pub(crate) parameters: Option<Map<String, Value>>,
    pub(crate) entity: Option<Entity>,
    pub(crate) tenant: Option<String>,
    /// Features looked up so far, by name.
    pub(crate) features: Map<String, Value>,
    pub(crate) steps: Vec<StepRecord>,
    /// Version of the last model that answered.
    pub(crate) model_version: Option<String>,
    /// Whether every model step so far answered from the result cache (false before any).
    pub(crate) cached: Option<bool>,
    pub(crate) error: Option<ErrorBody>,
    /// Tracing on: the span the request's current work belongs to (its request span, or
    /// during a step the step's span). `None` when tracing is off.
    pub(crate) trace: Option<otel::Context>,
}

impl Item {
    pub(crate) fn from_request(r: ExecRequest) -> Self {
        Item {
            request_id: r.request_id,
            input: r.data.clone(),
            data: r.data,
            parameters: r.parameters,
            entity: r.entity,
            tenant: r.tenant,
            features: Map::new(),
            steps: Vec::new(),
            model_version: None,
            cached: None,
            error: None,
            trace: None,
        }
    }

    fn context<'a>(&'a self, pipeline: &'a str) -> TransformContext<'a> {
        TransformContext {
            pipeline,
            request_id: &self.request_id,
            input: &self.input,
            features: &self.features,
            parameters: self.parameters.as_ref(),
            entity: self.entity.as_ref(),
        }
    }

    /// A child running a chained pipeline or a map element on `data`.
    fn child(&self, data: Value) -> Item {
        Item {
            request_id: self.request_id.clone(),
            input: data.clone(),
            data,
            parameters: self.parameters.clone(),
            entity: self.entity.clone(),
            tenant: self.tenant.clone(),
            features: self.features.clone(),
            steps: Vec::new(),
            model_version: None,
            cached: None,
            error: None,
            trace: self.trace.clone(),
        }
    }
}

/// What a step changes in one request when it succeeds.
#[derive(Debug, Default, Clone)]
struct Delta {
    data: Option<Value>,
    features: Option<Map<String, Value>>,
    /// Whether the answer came from a cache (the request's `cached` too).
    cached: Option<bool>,
    /// Whether this step's reads all came from a cache, for its step record only: a request
    /// whose features were cached still had its answer computed.
    step_cached: Option<bool>,
    model_version: Option<String>,
    /// Steps of a chained pipeline, recorded under this step's name.
    sub_steps: Vec<StepRecord>,
    /// The feature versions a features step read, for its step record (the audit).
    feature_reads: Vec<FeatureRead>,
}

/// Why a step failed for one request, and whether the step's `retries` may try it again.
///
/// One layer owns the attempt count of each call. For a model step that is the provider when
/// it retries its transient failures itself ([`RetryAdvice::Spent`]: the remote providers,
/// under their `retry` policy), and the step otherwise ([`RetryAdvice::Allowed`]: custom
/// providers, the built-ins). Failures retrying cannot fix ([`RetryAdvice::Never`]: 4xx,
/// malformed responses, bad input) are never retried. A features step owns its retries.
#[derive(Debug, Clone)]
struct StepError {
    body: ErrorBody,
    retryable: bool,
}

impl StepError {
    fn fatal(kind: ErrorKind, message: impl Into<String>) -> Self {
        StepError {
            body: ErrorBody::new(kind, message),
            retryable: false,
        }
    }

    /// A feature-store failure, which the step may retry.
    fn feature_store(message: impl Into<String>) -> Self {
        StepError {
            body: ErrorBody::new(ErrorKind::FeatureStoreError, message),
            retryable: true,
        }
    }
}

type Outcome = Result<Delta, StepError>;

/// One feature-vector read's outcome, and whether the cache answered it whole.
type VectorRead = Result<(FeatureVector, bool), FeatureStoreError>;

/// A feature-vector read that goes to the backend.
enum BackendRead {
    /// The names the cache did not hold.
    Rest(PendingRead),
    /// A traced request's whole read (entity id, parent span), under its own span.
    Traced(String, otel::Context),
}

/// Feature vectors a features step reads at once.
const FEATURE_READ_CONCURRENCY: usize = 32;

/// Runs pipelines against one snapshot of models, features and pipelines.
pub(crate) struct Engine<'s> {
    pub(crate) snapshot: &'s Snapshot,
}

impl<'s> Engine<'s> {
    /// Runs `pipeline` over `items`, in place.
    pub(crate) fn run<'a>(
        &'a self,
        pipeline: &'a Pipeline,
        items: &'a mut [Item],
        depth: usize,
        record_outputs: bool,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let record = record_outputs || pipeline.def.record_outputs;
            match pipeline.def.batch.max_records {
                // `[batch] max_records`: disjoint chunks, run side by side.
                Some(max) if items.len() > max.get() => {
                    let chunks = items
                        .chunks_mut(max.get())
                        .map(|chunk| self.run_steps(pipeline, chunk, depth, record));
                    futures::future::join_all(chunks).await;
                }
                _ => self.run_steps(pipeline, items, depth, record).await,
            }
        })
    }

    /// Runs the pipeline's steps in order over `items`, each step over the requests still
    /// running.
    async fn run_steps(&self, pipeline: &Pipeline, items: &mut [Item], depth: usize, record: bool) {
        for step in &pipeline.steps {
            let live: Vec<usize> = (0..items.len())
                .filter(|&i| items[i].error.is_none())
                .collect();
            if live.is_empty() {
                break;
            }
            self.run_step(&pipeline.id, step, items, &live, depth, record)
                .await;
        }
    }

    /// Runs one step for the requests at `live`, with its retries and timeout, and applies the
    /// outcomes (or `on_error`).
    fn run_step<'a>(
        &'a self,
        pipeline: &'a str,
        step: &'a Step,
        items: &'a mut [Item],
        live: &'a [usize],
        depth: usize,
        record: bool,
    ) -> BoxFuture<'a, ()> {
        Box::pin(self.run_step_inner(pipeline, step, items, live, depth, record))
    }

    async fn run_step_inner(
        &self,
        pipeline: &str,
        step: &Step,
        items: &mut [Item],
        live: &[usize],
        depth: usize,
        record: bool,
    ) {
        let started = Instant::now();
        // Tracing on: a span per request for this step, the parent of what the step does
        // (model calls, feature reads, chained steps) while it runs.
        let mut request_spans: Vec<(usize, Option<otel::Context>)> = Vec::new();
        if otel::enabled() {
            for &i in live {
                let Some(parent) = &items[i].trace else {
                    continue;
                };
                let step_span =
                    otel::child(parent, format!("step {}", step.name), SpanKind::Internal);
                if step_span.is_some() {
                    request_spans.push((i, std::mem::replace(&mut items[i].trace, step_span)));
                }
            }
        }
        let mut outcomes: Vec<Option<Outcome>> = (0..items.len()).map(|_| None).collect();
        if let StepKind::Transforms(transforms) = &step.kind {
            // Transforms are synchronous, so no timeout can interrupt them, and their errors
            // are never retried: they run in place on each request's data, without the copy
            // that keeps the other steps all-or-nothing. The data is copied only when a
            // failure must leave it visible as it was: `on_error = "skip"`, or recorded
            // outputs.
            let keep = record || step.record_output || matches!(step.on_error, OnError::Skip);
            for &i in live {
                outcomes[i] = Some(transform_in_place(
                    pipeline,
                    transforms,
                    &mut items[i],
                    keep,
                ));
            }
        } else {
            let mut pending = live.to_vec();
            let mut attempt = 0;
            loop {
                let results = self.attempt(pipeline, step, items, &pending, depth).await;
                let mut retry = Vec::new();
                for (&i, result) in pending.iter().zip(results) {
                    match result {
                        Err(e) if e.retryable && attempt < step.retries => retry.push(i),
                        other => outcomes[i] = Some(other),
                    }
                }
                if retry.is_empty() {
                    break;
                }
                // Doubling, jittered waits: a store or provider that just failed gets a
                // moment to recover, and batches that failed together do not retry together.
                tokio::time::sleep(step.retry_backoff.delay(attempt)).await;
                attempt += 1;
                pending = retry;
            }
        }
        let elapsed = started.elapsed();
        step.latency.record(elapsed.as_secs_f64());
        let latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        for &i in live {
            let item = &mut items[i];
            let mut cached = false;
            let mut feature_reads = Vec::new();
            match outcomes[i].take() {
                Some(Ok(delta)) => {
                    if let Some(data) = delta.data {
                        item.data = data;
                    }
                    if let Some(features) = delta.features {
                        item.features.extend(features);
                    }
                    if let Some(c) = delta.cached {
                        cached = c;
                        item.cached = Some(item.cached.unwrap_or(true) && c);
                    }
                    if let Some(c) = delta.step_cached {
                        cached = c;
                    }
                    if delta.model_version.is_some() {
                        item.model_version = delta.model_version;
                    }
                    feature_reads = delta.feature_reads;
                    for mut sub in delta.sub_steps {
                        sub.name = format!("{}/{}", step.name, sub.name);
                        item.steps.push(sub);
                    }
                }
                Some(Err(mut e)) => {
                    // A chained pipeline's steps, up to the one that failed.
                    for mut sub in std::mem::take(&mut e.body.steps) {
                        sub.name = format!("{}/{}", step.name, sub.name);
                        item.steps.push(sub);
                    }
                    metrics::counter!(
                        PIPELINE_STEP_ERRORS_TOTAL,
                        "pipeline" => pipeline.to_owned(),
                        "step" => step.name.clone(),
                        "kind" => e.body.kind.as_str()
                    )
                    .increment(1);
                    match &step.on_error {
                        OnError::Fail => {
                            item.error = Some(ErrorBody::new(
                                e.body.kind,
                                format!("step `{}`: {}", step.name, e.body.message),
                            ));
                        }
                        OnError::Skip => {}
                        OnError::Default(value) => item.data = value.clone(),
                    }
                }
                // Every live request gets an outcome; nothing to apply otherwise.
                None => {}
            }
            item.steps.push(StepRecord {
                name: step.name.clone(),
                latency_us,
                cached,
                output: (record || step.record_output).then(|| item.data.clone()),
                features: feature_reads,
            });
        }
        for (i, request_span) in request_spans {
            if let Some(step_span) = std::mem::replace(&mut items[i].trace, request_span) {
                otel::end(&step_span);
            }
        }
    }

    /// One attempt of `step` for the requests at `idx`: one outcome each, in order.
    async fn attempt(
        &self,
        pipeline: &str,
        step: &Step,
        items: &[Item],
        idx: &[usize],
        depth: usize,
    ) -> Vec<Outcome> {
        let work = self.execute(pipeline, step, items, idx, depth);
        match step.timeout {
            None => work.await,
            Some(limit) => match tokio::time::timeout(limit, work).await {
                Ok(outcomes) => outcomes,
                Err(_) => {
                    // A model call over a provider that retries itself had its attempts cut
                    // short by the step's timeout, which bounds the call, retries included:
                    // trying again would multiply the provider's attempts.
                    let (kind, retryable) = match &step.kind {
                        StepKind::Model { model, .. } => (
                            ErrorKind::ProviderTimeout,
                            !ModelExecutor::new(Arc::clone(&self.snapshot.models))
                                .retries_itself(&Target::Model(model.clone())),
                        ),
                        StepKind::Features { .. } => (ErrorKind::FeatureStoreError, true),
                        _ => (ErrorKind::StepFailed, true),
                    };
                    let e = StepError {
                        body: ErrorBody::new(
                            kind,
                            format!("timed out after {} ms", limit.as_millis()),
                        ),
                        retryable,
                    };
                    vec![Err(e); idx.len()]
                }
            },
        }
    }

    fn execute<'a>(
        &'a self,
        pipeline: &'a str,
        step: &'a Step,
        items: &'a [Item],
        idx: &'a [usize],
        depth: usize,
    ) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            match &step.kind {
                // `run_step_inner` runs them in place, never through an attempt.
                StepKind::Transforms(_) => {
                    let e = StepError::fatal(
                        ErrorKind::Internal,
                        "transforms are not run through an attempt",
                    );
                    vec![Err(e); idx.len()]
                }
                StepKind::Model { model, input, into } => {
                    self.model(pipeline, model, input.as_ref(), into.as_ref(), items, idx)
                        .await
                }
                StepKind::Features {
                    source,
                    entity_id,
                    into,
                } => {
                    self.features(
                        pipeline,
                        source,
                        entity_id.as_ref(),
                        into.as_ref(),
                        items,
                        idx,
                    )
                    .await
                }
                StepKind::Pipeline { id } => self.chain(id, items, idx, depth).await,
                StepKind::Map {
                    over,
                    step: sub,
                    concurrency,
                    into,
                } => {
                    self.map(
                        pipeline,
                        over,
                        sub,
                        *concurrency,
                        into.as_ref(),
                        items,
                        idx,
                        depth,
                    )
                    .await
                }
            }
        })
    }

    async fn model(
        &self,
        pipeline: &str,
        model: &str,
        input: Option<&JsonPath>,
        into: Option<&JsonPath>,
        items: &[Item],
        idx: &[usize],
    ) -> Vec<Outcome> {
        let mut requests = Vec::with_capacity(idx.len());
        let mut slots: Vec<Option<Outcome>> = Vec::with_capacity(idx.len());
        for &i in idx {
            let item = &items[i];
            let data = match input {
                None => Some(item.data.clone()),
                Some(path) => item.context(pipeline).lookup(&item.data, path),
            };
            match data {
                Some(data) => {
                    requests.push(ExecRequest {
                        request_id: item.request_id.clone(),
                        data,
                        parameters: item.parameters.clone(),
                        entity: item.entity.clone(),
                        tenant: item.tenant.clone(),
                    });
                    slots.push(None);
                }
                None => slots.push(Some(Err(StepError::fatal(
                    ErrorKind::StepFailed,
                    format!(
                        "no model input at `{}`",
                        input.map(ToString::to_string).unwrap_or_default()
                    ),
                )))),
            }
        }
        metrics::counter!(
            PIPELINE_MODEL_REQUESTS_TOTAL,
            "pipeline" => pipeline.to_owned(),
            "model" => model.to_owned()
        )
        .increment(requests.len() as u64);
        let executor = ModelExecutor::new(Arc::clone(&self.snapshot.models));
        let mut answers = if requests.is_empty() {
            Vec::new()
        } else {
            let target = Target::Model(model.to_owned());
            let parents = idx.iter().filter_map(|&i| items[i].trace.as_ref());
            otel::in_model_call(
                parents,
                model,
                executor.execute_classified(&target, requests),
            )
            .await
        }
        .into_iter();
        slots
            .into_iter()
            .zip(idx)
            .map(|(slot, &i)| {
                if let Some(done) = slot {
                    return done;
                }
                match answers.next() {
                    Some(Ok(out)) => {
                        let data = place(&items[i].data, into, out.output)?;
                        Ok(Delta {
                            data: Some(data),
                            cached: Some(out.cached),
                            model_version: out.model_version,
                            ..Delta::default()
                        })
                    }
                    Some(Err(failure)) => Err(StepError {
                        body: failure.body,
                        retryable: failure.retry == RetryAdvice::Allowed,
                    }),
                    None => Err(StepError::fatal(
                        ErrorKind::Internal,
                        "the model returned fewer outcomes than requests",
                    )),
                }
            })
            .collect()
    }

    async fn features(
        &self,
        pipeline: &str,
        source: &FeatureSource,
        entity_id: Option<&JsonPath>,
        into: Option<&JsonPath>,
        items: &[Item],
        idx: &[usize],
    ) -> Vec<Outcome> {
        let fail_all = |message: String| -> Vec<Outcome> {
            vec![Err(StepError::feature_store(message)); idx.len()]
        };
        let Some(store) = &self.snapshot.features else {
            return fail_all("no feature store is attached".into());
        };
        let (entity_type, names) = match source {
            FeatureSource::Names { entity_type, names } => (entity_type.clone(), names.clone()),
            FeatureSource::Group { name, version } => {
                match store.get_feature_group(name, *version).await {
                    Ok(Some(group)) => (group.entity_type, group.features),
                    Ok(None) => {
                        return vec![
                            Err(StepError::fatal(
                                ErrorKind::FeatureStoreError,
                                format!("no feature group `{name}`")
                            ));
                            idx.len()
                        ];
                    }
                    Err(err) => return fail_all(err.to_string()),
                }
            }
        };
        // The entity id of each request, or why there is none.
        let ids: Vec<Result<String, StepError>> = idx
            .iter()
            .map(|&i| {
                let item = &items[i];
                let id = match entity_id {
                    Some(path) => item
                        .context(pipeline)
                        .lookup(&item.data, path)
                        .and_then(|v| match v {
                            Value::String(s) => Some(s),
                            Value::Number(n) => Some(n.to_string()),
                            _ => None,
                        }),
                    None => item.entity.as_ref().map(|e| e.id.clone()),
                };
                id.ok_or_else(|| {
                    StepError::fatal(
                        ErrorKind::InvalidRequest,
                        match entity_id {
                            Some(path) => format!("no entity id (a string or number) at `{path}`"),
                            None => "the request has no `entity`".to_owned(),
                        },
                    )
                })
            })
            .collect();
        // Each read is first tried in the store's cache, without a future: most are answered
        // there. Reads the cache cannot answer whole, and traced reads (which keep their
        // span), go to the backend below, at most FEATURE_READ_CONCURRENCY at once.
        let mut vectors: Vec<Option<VectorRead>> = Vec::with_capacity(idx.len());
        let mut backend: Vec<(usize, BackendRead)> = Vec::new();
        for (r, &i) in ids.iter().zip(idx) {
            let Ok(id) = r else { continue };
            let slot = vectors.len();
            match &items[i].trace {
                Some(parent) => {
                    backend.push((slot, BackendRead::Traced(id.clone(), parent.clone())));
                    vectors.push(None);
                }
                None => match store.read_cached(&entity_type, id, &names) {
                    Ok(CachedRead::Done(vector)) => vectors.push(Some(Ok((vector, true)))),
                    Ok(CachedRead::Pending(pending)) => {
                        backend.push((slot, BackendRead::Rest(pending)));
                        vectors.push(None);
                    }
                    Err(err) => vectors.push(Some(Err(err))),
                },
            }
        }
        if !backend.is_empty() {
            // Owned futures (not `get_feature_vectors`, whose borrowing closure the compiler
            // cannot prove `Send` inside this recursive, boxed future).
            let names = Arc::new(names);
            let entity_type = Arc::new(entity_type);
            let reads = backend.into_iter().map(|(slot, read)| {
                let (store, names, entity_type) = (
                    Arc::clone(store),
                    Arc::clone(&names),
                    Arc::clone(&entity_type),
                );
                async move {
                    let read = match read {
                        BackendRead::Rest(pending) => store.finish_read(pending).await,
                        BackendRead::Traced(id, parent) => {
                            let span = otel::child(&parent, "feature read", SpanKind::Client);
                            let read = store
                                .get_feature_vector_and_source(&entity_type, &id, &names)
                                .await;
                            if let Some(cx) = &span {
                                otel::set_attribute(
                                    cx,
                                    "inferflow.entity_type",
                                    entity_type.to_string(),
                                );
                                otel::end(cx);
                            }
                            read
                        }
                    };
                    (slot, read)
                }
            });
            let done = futures::stream::iter(reads)
                .buffered(FEATURE_READ_CONCURRENCY)
                .collect::<Vec<_>>()
                .await;
            for (slot, read) in done {
                vectors[slot] = Some(read);
            }
        }
        let mut vectors = vectors.into_iter();
        ids.into_iter()
            .zip(idx)
            .map(|(id, &i)| {
                id?;
                let (vector, from_cache): (FeatureVector, bool) = match vectors.next().flatten() {
                    Some(Ok(v)) => v,
                    Some(Err(err)) => return Err(StepError::feature_store(err.to_string())),
                    None => {
                        return Err(StepError::fatal(
                            ErrorKind::Internal,
                            "the feature store returned fewer vectors than entities",
                        ));
                    }
                };
                let read = |feature: &str, version: Option<u64>| FeatureRead {
                    entity_type: vector.entity_type.clone(),
                    entity_id: vector.entity_id.clone(),
                    feature: feature.to_owned(),
                    version,
                };
                let mut feature_reads: Vec<FeatureRead> = vector
                    .features
                    .iter()
                    .map(|(name, value)| read(name, Some(value.version)))
                    .collect();
                feature_reads.extend(vector.missing.iter().map(|name| read(name, None)));
                feature_reads.extend(
                    (vector.stale.iter())
                        .filter(|name| !vector.features.contains_key(*name))
                        .map(|name| read(name, None)),
                );
                let mut features = Map::new();
                for (name, value) in vector.features {
                    features.insert(name, Value::Object(value.values));
                }
                for name in vector.missing {
                    features.insert(name, Value::Null);
                }
                let data = match into {
                    Some(path) => Some(place(
                        &items[i].data,
                        Some(path),
                        Value::Object(features.clone()),
                    )?),
                    None => None,
                };
                Ok(Delta {
                    data,
                    features: Some(features),
                    step_cached: Some(from_cache),
                    feature_reads,
                    ..Delta::default()
                })
            })
            .collect()
    }

    async fn chain(&self, id: &str, items: &[Item], idx: &[usize], depth: usize) -> Vec<Outcome> {
        let Some(pipeline) = self.snapshot.pipelines.get(id) else {
            let e = StepError::fatal(ErrorKind::UnknownPipeline, format!("no pipeline `{id}`"));
            return vec![Err(e); idx.len()];
        };
        if depth + 1 >= MAX_DEPTH {
            let e = StepError::fatal(
                ErrorKind::StepFailed,
                format!("pipelines nest deeper than {MAX_DEPTH}"),
            );
            return vec![Err(e); idx.len()];
        }
        let mut children: Vec<Item> = idx
            .iter()
            .map(|&i| items[i].child(items[i].data.clone()))
            .collect();
        self.run(pipeline, &mut children, depth + 1, false).await;
        children
            .into_iter()
            .map(|child| match child.error {
                Some(mut body) => {
                    body.steps = child.steps;
                    Err(StepError {
                        body,
                        retryable: false,
                    })
                }
                None => Ok(Delta {
                    data: Some(child.data),
                    features: Some(child.features),
                    cached: child.cached,
                    step_cached: None,
                    model_version: child.model_version,
                    sub_steps: child.steps,
                    feature_reads: Vec::new(),
                }),
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    async fn map(
        &self,
        pipeline: &str,
        over: &JsonPath,
        sub: &Step,
        concurrency: usize,
        into: Option<&JsonPath>,
        items: &[Item],
        idx: &[usize],
        depth: usize,
    ) -> Vec<Outcome> {
        // Every element of every request, flattened, remembering whose it is.
        let mut owners = Vec::new();
        let mut elements = Vec::new();
        let mut early: Vec<Option<Outcome>> = Vec::with_capacity(idx.len());
        for (slot, &i) in idx.iter().enumerate() {
            match over.get(&items[i].data) {
                Some(Value::Array(values)) => {
                    for v in values {
                        owners.push(slot);
                        elements.push(items[i].child(v.clone()));
                    }
                    early.push(None);
                }
                other => early.push(Some(Err(StepError::fatal(
                    ErrorKind::StepFailed,
                    format!(
                        "expected an array at `{over}`, found {}",
                        other.map(super::path::describe).unwrap_or("nothing")
                    ),
                )))),
            }
        }
        // Bounded concurrency: at most `concurrency` elements are in the sub-step at once.
        for start in (0..elements.len()).step_by(concurrency.max(1)) {
            let end = (start + concurrency).min(elements.len());
            let chunk = &mut elements[start..end];
            let live: Vec<usize> = (0..chunk.len()).collect();
            self.run_step(pipeline, sub, chunk, &live, depth + 1, false)
                .await;
        }
        let mut outputs: Vec<Vec<Value>> = vec![Vec::new(); idx.len()];
        let mut errors: Vec<Option<ErrorBody>> = vec![None; idx.len()];
        let mut cached: Vec<Option<bool>> = vec![None; idx.len()];
        let mut versions: Vec<Option<String>> = vec![None; idx.len()];
        for (n, (owner, element)) in owners.into_iter().zip(elements).enumerate() {
            if let Some(err) = element.error {
                if errors[owner].is_none() {
                    errors[owner] = Some(ErrorBody::new(
                        err.kind,
                        format!("element {n}: {}", err.message),
                    ));
                }
                continue;
            }
            if let Some(c) = element.cached {
                cached[owner] = Some(cached[owner].unwrap_or(true) && c);
            }
            if element.model_version.is_some() {
                versions[owner] = element.model_version;
            }
            outputs[owner].push(element.data);
        }
        early
            .into_iter()
            .enumerate()
            .map(|(slot, done)| {
                if let Some(done) = done {
                    return done;
                }
                if let Some(body) = errors[slot].take() {
                    return Err(StepError {
                        body,
                        retryable: false,
                    });
                }
                let array = Value::Array(std::mem::take(&mut outputs[slot]));
                let target = into.unwrap_or(over);
                Ok(Delta {
                    data: Some(place(&items[idx[slot]].data, Some(target), array)?),
                    cached: cached[slot],
                    model_version: versions[slot].take(),
                    ..Delta::default()
                })
            })
            .collect()
    }
}

/// Applies `transforms` to `item.data` in place. On failure the data is restored when `keep`
/// (and otherwise left as `null`: the request fails, or takes the step's default).
fn transform_in_place(
    pipeline: &str,
    transforms: &[Transform],
    item: &mut Item,
    keep: bool,
) -> Outcome {
    let original = keep.then(|| item.data.clone());
    let mut data = std::mem::take(&mut item.data);
    let ctx = TransformContext {
        pipeline,
        request_id: &item.request_id,
        input: &item.input,
        features: &item.features,
        parameters: item.parameters.as_ref(),
        entity: item.entity.as_ref(),
    };
    for t in transforms {
        match t.apply(data, &ctx) {
            Ok(next) => data = next,
            Err(err) => {
                if let Some(original) = original {
                    item.data = original;
                }
                let kind = if err.invalid_request {
                    ErrorKind::InvalidRequest
                } else {
                    ErrorKind::StepFailed
                };
                return Err(StepError::fatal(kind, err.message));
            }
        }
    }
    item.data = data;
    Ok(Delta::default())
}

/// `data` with `new` at `into`, or `new` itself when `into` is absent or the root.
fn place(data: &Value, into: Option<&JsonPath>, new: Value) -> Result<Value, StepError> {
    match into {
        None => Ok(new),
        Some(p) if p.is_root() => Ok(new),
        Some(p) => {
            let mut out = data.clone();
            p.set(&mut out, new)
                .map_err(|m| StepError::fatal(ErrorKind::StepFailed, m))?;
            Ok(out)
        }
    }
}
