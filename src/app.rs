//! Builds the running service from configuration (models, processor, feature ingestion, HTTP
//! server) and runs it until SIGINT or SIGTERM.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::feature_store::{FeatureStore, coherence};
use crate::metrics::{RELOADS_TOTAL, SHADOW_REQUESTS_TOTAL};
use crate::pipeline::{PipelineDef, PipelineExecutor, PipelineManager, StepDef, StepType};
use crate::providers::manager::ShadowSink;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};

use crate::access::Access;
use crate::access::tls::{RELOAD_POLL, Reloading};
use crate::config::{Config, Sources};
use crate::http::api::Api;
use crate::http::listen::{self, Peer};
use crate::http::{AppState, Readiness, SharedStore, api_router, ops_router};

/// Serves HTTP on an already bound listener until `shutdown` completes: `/metrics`,
/// `/healthz` and `/readyz` only (on `http.ops_listen` instead, when it is set).
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(config, listener, metrics, None, None, shutdown).await
}

/// [`serve`], plus the inference and feature API when `api` is given. Readiness checks the
/// API's feature store, or `store` when given without an API, or the configured one. With
/// `http.ops_listen` set, that address is bound here for `/metrics`, `/healthz` and `/readyz`.
pub async fn serve_with(
    config: &Config,
    listener: TcpListener,
    metrics: PrometheusHandle,
    api: Option<Arc<Api>>,
    store: Option<Arc<FeatureStore>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ops = bind_ops(config).await?;
    serve_listeners(
        config,
        Listeners { api: listener, ops },
        metrics,
        api,
        store,
        shutdown,
    )
    .await
}

/// The HTTP server's bound listeners.
pub struct Listeners {
    /// `http.listen`: the `/v1` API (plain or TLS), and the ops routes when `ops` is `None`.
    pub api: TcpListener,
    /// `http.ops_listen`: `/metrics`, `/healthz` and `/readyz`, plain, without access control.
    pub ops: Option<TcpListener>,
}

/// Binds `http.ops_listen`, when set.
async fn bind_ops(config: &Config) -> anyhow::Result<Option<TcpListener>> {
    match &config.http.ops_listen {
        Some(addr) => {
            Ok(Some(TcpListener::bind(addr).await.with_context(|| {
                format!("binding http.ops_listen = {addr}")
            })?))
        }
        None => Ok(None),
    }
}

/// [`serve_with`] on listeners bound by the caller: the API's (TLS when `[http.tls]` is set,
/// behind the tokens and client certificates of `[http]`) and, optionally, the ops listener.
pub async fn serve_listeners(
    config: &Config,
    listeners: Listeners,
    metrics: PrometheusHandle,
    api: Option<Arc<Api>>,
    store: Option<Arc<FeatureStore>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut readiness = Readiness::new(&config.kafka, &config.feature_store)
        .context("creating the Kafka client for readiness checks")?;
    // Readiness checks the store the API uses (one store: an embedded file opens once).
    match (&api, store) {
        (Some(api), _) => readiness = readiness.with_shared_store(Arc::clone(&api.features)),
        (None, Some(store)) => readiness = readiness.with_store(store),
        (None, None) => {}
    }
    let access = Arc::new(Access::from_config(&config.http).map_err(anyhow::Error::msg)?);
    let tls = match &config.http.tls {
        Some(tls) => Some(Arc::new(
            Reloading::new(tls)
                .map_err(|(key, message)| anyhow::anyhow!("http.tls.{key}: {message}"))?,
        )),
        None => None,
    };
    let serving_api = api.is_some();
    let state = AppState {
        metrics,
        readiness: Arc::new(readiness),
        started: Instant::now(),
        api,
    };
    let local = listeners.api.local_addr()?;
    let ops_addr = listeners
        .ops
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    match (access.as_ref(), serving_api) {
        (Access::Open, true) if local.ip().is_loopback() => tracing::info!(
            listen = %local,
            "the /v1 API is unauthenticated (no http.tokens) and listens on loopback only"
        ),
        (Access::Open, true) => tracing::warn!(
            listen = %local,
            "the /v1 API is unauthenticated (http.allow_unauthenticated) on a non-loopback address"
        ),
        _ => {}
    }
    tracing::info!(
        listen = %local,
        tls = tls.is_some(),
        mtls = config.http.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()),
        api = serving_api,
        tokens = config.http.tokens.len(),
        ops_listen = ops_addr.map(|a| a.to_string()),
        "serving HTTP"
    );
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
    }
    let app = api_router(state.clone(), access, listeners.ops.is_none())
        .into_make_service_with_connect_info::<Peer>();
    let api_server = async {
        match &tls {
            Some(tls) => {
                tokio::spawn(Arc::clone(tls).watch(RELOAD_POLL, stop.clone()));
                let listener = listen::Tls::new(listeners.api, Arc::clone(tls))?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop.clone().cancelled_owned())
                    .await
            }
            None => {
                axum::serve(listen::Plain(listeners.api), app)
                    .with_graceful_shutdown(stop.clone().cancelled_owned())
                    .await
            }
        }
        .context("HTTP server")
    };
    let ops_server = async {
        match listeners.ops {
            Some(ops) => axum::serve(ops, ops_router(state))
                .with_graceful_shutdown(stop.clone().cancelled_owned())
                .await
                .context("HTTP ops server"),
            None => Ok(()),
        }
    };
    let outcome = tokio::try_join!(api_server, ops_server).map(|_| ());
    stop.cancel();
    tracing::info!("stopped");
    outcome
}

/// The API over the service's executor and store: `features` when the service opened one,
/// otherwise the configured store, opened on the first feature request.
pub fn api(
    config: &Config,
    executor: Arc<dyn crate::executor::Executor>,
    features: Option<Arc<FeatureStore>>,
) -> Api {
    Api {
        executor,
        features: Arc::new(SharedStore::new(&config.feature_store, features)),
        rules: crate::decode::DecodeRules {
            max_request_bytes: config.executor.max_request_bytes.get(),
            reply_to_allowed: config.topics.reply_to_allowed.iter().cloned().collect(),
        },
        execute_timeout: Duration::from_millis(config.executor.execute_timeout_ms.get()),
        permits: Arc::new(tokio::sync::Semaphore::new(
            config.http.max_in_flight_requests.get(),
        )),
        pipelines: None,
    }
}

/// Runs the processor and the HTTP server until SIGINT or SIGTERM, then shuts down in order:
/// the processor drains, delivers and commits within `executor.shutdown_timeout_ms`, then the
/// HTTP server stops. Pipelines and models reload from `sources` on SIGHUP (and on file
/// changes when `pipelines.watch` is set).
pub async fn run(config: Config, sources: Sources) -> anyhow::Result<()> {
    let metrics = crate::metrics::install().context("installing the Prometheus recorder")?;
    for warning in config.http.warnings() {
        tracing::warn!("{warning}");
    }
    let traces = crate::tracing_otel::init(&config.tracing)
        .map_err(|e| anyhow::anyhow!("starting the trace exporter of [tracing]: {e}"))?;
    let listener = TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| format!("binding http.listen = {}", config.http.listen))?;
    let ops = bind_ops(&config).await?;
    let stop = CancellationToken::new();
    let models = crate::providers::build::build_manager(
        &config.providers,
        &config.models,
        &config.result_cache,
    )
    .await
    .context("starting the models of [providers] and [models]")?;
    if let Some(sink) = shadow_sink(&config)? {
        models.set_shadow_sink(sink);
    }
    let models = crate::providers::build::with_routes(&models, &config.routes)?;
    let defs = config.pipelines.load().map_err(|errs| {
        anyhow::anyhow!("loading pipelines from {}: {errs}", config.pipelines.dir)
    })?;
    // The store is opened when ingestion or a pipeline needs it, so a deployment without
    // features runs without a database.
    let store = if config.ingest.enabled || defs.iter().any(uses_features) {
        Some(Arc::new(FeatureStore::open(&config.feature_store).await.context(
            "opening the feature store (needed by [ingest] and by pipelines with a features step)",
        )?))
    } else {
        None
    };
    let mut pipelines = PipelineManager::new(models);
    if let Some(store) = &store {
        pipelines = pipelines.with_feature_store(Arc::clone(store));
        tokio::spawn(Arc::clone(store).maintain(stop.clone()));
    }
    let pipelines = Arc::new(pipelines);
    let ids: Vec<String> = defs.iter().map(|d| d.id.clone()).collect();
    pipelines
        .replace_all(None, defs)
        .map_err(|errs| anyhow::anyhow!("pipelines in {}: {errs}", config.pipelines.dir))?;
    tracing::info!(pipelines = ?ids, dir = %config.pipelines.dir, "pipelines loaded");
    let executor: Arc<dyn crate::executor::Executor> =
        Arc::new(PipelineExecutor::new(Arc::clone(&pipelines)));
    let processor = crate::processor::start(&config, Arc::clone(&executor), stop.clone()).await?;
    let margin = processor.shutdown_timeout() + Duration::from_secs(15);
    let ingestion = match (&store, config.ingest.enabled) {
        (Some(store), true) => Some(start_features(&config, Arc::clone(store), &stop)?),
        _ => None,
    };
    // Listening for SIGHUP starts here, before the HTTP server answers, so a SIGHUP sent
    // once the service is up reloads instead of ending the process.
    tokio::spawn(reloader(
        config.clone(),
        sources,
        Arc::clone(&pipelines),
        hangups(),
        stop.clone(),
    ));
    let http_stop = CancellationToken::new();
    let api = Arc::new(Api {
        pipelines: Some(Arc::clone(&pipelines)),
        ..api(&config, Arc::clone(&executor), store.clone())
    });
    let http = {
        let http_stop = http_stop.clone();
        let config = config.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let listeners = Listeners { api: listener, ops };
            serve_listeners(&config, listeners, metrics, Some(api), store, async move {
                http_stop.cancelled().await
            })
            .await
        })
    };
    tracing::info!(topic = %config.topics.requests, group = %config.kafka.group_id, "processing requests");
    let mut processor_join = std::pin::pin!(processor.join());
    let ingestion_stop = stop.clone();
    let mut ingestion_join = std::pin::pin!(async move {
        match ingestion {
            Some(handle) => handle.join().await,
            // Nothing to join: done once everything is told to stop, so a shutdown does not
            // wait for it (it never ends first: `stop` is cancelled only after a branch won).
            None => {
                ingestion_stop.cancelled().await;
                Ok(())
            }
        }
    });
    let outcome = tokio::select! {
        () = shutdown_signal() => {
            stop.cancel();
            let both = async { tokio::join!(processor_join, ingestion_join) };
            match tokio::time::timeout(margin, both).await {
                Ok((processor, ingestion)) => processor.and(ingestion),
                Err(_) => Err(anyhow::anyhow!("the processor did not stop within {margin:?}")),
            }
        }
        result = &mut processor_join => {
            stop.cancel();
            result.and_then(|()| Err(anyhow::anyhow!("the processor stopped unexpectedly")))
        }
        result = &mut ingestion_join => {
            stop.cancel();
            result.and_then(|()| Err(anyhow::anyhow!("feature ingestion stopped unexpectedly")))
        }
    };
    http_stop.cancel();
    match http.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = format!("{err:#}"), "HTTP server error"),
        Err(err) => tracing::warn!(error = %err, "HTTP server task failed"),
    }
    if let Some(traces) = traces {
        // Export the spans still buffered (blocking: off the runtime's workers).
        let _ = tokio::task::spawn_blocking(move || traces.shutdown(Duration::from_secs(5))).await;
    }
    outcome
}

/// How long the shadow comparisons' producer waits to fill a batch, at least: comparisons are
/// off the request path, and fewer, larger produce requests leave more of the CPU (the
/// producer's threads and the broker's) to the primary.
pub const SHADOW_LINGER_MS: u64 = 100;

/// Comparisons waiting for the publishing thread, at most; more are dropped (counted).
const SHADOW_QUEUE: usize = 16_384;

/// The sink of the routes' shadow comparisons: produced to `topics.shadow_results`, keyed by
/// request id, in batches of up to [`SHADOW_LINGER_MS`] (or `kafka.producer_linger_ms` when
/// longer). `None` when the topic is empty.
///
/// Everything Kafka does for comparisons runs at idle CPU priority (Linux `SCHED_IDLE`), like
/// a local shadow's computation: one thread of that class creates the producer (so that
/// librdkafka's threads, which inherit their creator's scheduling class, are idle-class too)
/// and produces what [`ShadowSink::publish`] queued for it. `publish` never blocks: a
/// comparison that finds the queue ([`SHADOW_QUEUE`]) or the producer's own queue full is
/// dropped and counted (`outcome="unpublished"`). No thread of normal priority ever takes one
/// of that producer's locks, so a starved idle thread cannot hold up the request path.
pub fn shadow_sink(config: &Config) -> anyhow::Result<Option<Arc<dyn ShadowSink>>> {
    if config.topics.shadow_results.is_empty() {
        return Ok(None);
    }
    let client = shadow_producer_config(config);
    let topic = config.topics.shadow_results.clone();
    let (queue, comparisons) = std::sync::mpsc::sync_channel::<Comparison>(SHADOW_QUEUE);
    let (created, creation) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    std::thread::Builder::new()
        .name("inferflow-shadow-kafka".into())
        .spawn(move || {
            crate::providers::lane::idle_priority();
            let producer: ThreadedProducer<DefaultProducerContext> = match client
                .create()
                .context("creating the producer of topics.shadow_results")
            {
                Ok(producer) => producer,
                Err(err) => {
                    let _ = created.send(Err(err));
                    return;
                }
            };
            let _ = created.send(Ok(()));
            for comparison in comparisons {
                let record = BaseRecord::to(&topic)
                    .key(&*comparison.request_id)
                    .payload(&*comparison.document);
                if let Err((err, _)) = producer.send(record) {
                    unpublished(&comparison.shadow);
                    tracing::debug!(error = %err, "shadow comparison not produced");
                }
            }
        })
        .context("starting the thread of topics.shadow_results")?;
    creation
        .recv()
        .context("the thread of topics.shadow_results stopped")??;
    Ok(Some(Arc::new(KafkaShadowSink { queue })))
}

/// The shadow comparisons' producer: the results producer's settings, lingering at least
/// [`SHADOW_LINGER_MS`], and compressing with LZ4: the compression runs on the producer's
/// idle-priority threads and spares the broker (often on the same machine in small set-ups)
/// most of the bytes. In the rollout bench, where the broker shares the two cores, it took the
/// primary's p99 ratio with / without a shadow from a median of 1.17 to 1.08 (BENCHMARKS.md).
fn shadow_producer_config(config: &Config) -> rdkafka::ClientConfig {
    let mut client = crate::kafka::producer_config(&config.kafka);
    let linger = config.kafka.producer_linger_ms.max(SHADOW_LINGER_MS);
    client.set("linger.ms", linger.to_string());
    client.set("compression.type", "lz4");
    client
}

/// One comparison on its way to the publishing thread.
struct Comparison {
    request_id: Box<str>,
    shadow: Box<str>,
    document: Box<[u8]>,
}

fn unpublished(shadow: &str) {
    metrics::counter!(SHADOW_REQUESTS_TOTAL, "model" => shadow.to_owned(), "outcome" => "unpublished")
        .increment(1);
}

struct KafkaShadowSink {
    queue: std::sync::mpsc::SyncSender<Comparison>,
}

impl ShadowSink for KafkaShadowSink {
    fn publish(&self, request_id: &str, shadow: &str, comparison: &[u8]) {
        let comparison = Comparison {
            request_id: request_id.into(),
            shadow: shadow.into(),
            document: comparison.into(),
        };
        if self.queue.try_send(comparison).is_err() {
            unpublished(shadow);
        }
    }
}

/// True when a pipeline has a `features` step (at any depth).
fn uses_features(def: &PipelineDef) -> bool {
    fn step(s: &StepDef) -> bool {
        s.step_type == StepType::Features || s.step.as_deref().is_some_and(step)
    }
    def.steps.iter().any(step)
}

/// Starts feature ingestion, and the invalidation listener; both stop with `stop`.
fn start_features(
    config: &Config,
    store: Arc<FeatureStore>,
    stop: &CancellationToken,
) -> anyhow::Result<crate::kafka::source::SourceHandle> {
    if !config.topics.feature_invalidations.is_empty() {
        let (kafka, topic, store, stop) = (
            config.kafka.clone(),
            config.topics.feature_invalidations.clone(),
            Arc::clone(&store),
            stop.clone(),
        );
        tokio::spawn(async move {
            if let Err(err) = coherence::listen(&kafka, topic, store, stop).await {
                tracing::error!(
                    error = format!("{err:#}"),
                    "the feature-cache invalidation listener stopped; caches now rely on their TTL"
                );
            }
        });
    }
    let handle = crate::feature_store::ingest::start(config.into(), store, stop.clone())?;
    tracing::info!(topic = %config.topics.features, group = %config.ingest.group_id, "ingesting feature updates");
    Ok(handle)
}

/// What the reload watch compares: the configuration file and the pipeline files, with their
/// modification times and sizes.
fn fingerprint(sources: &Sources, dir: &str) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let stat = |p: &Path| {
        let meta = std::fs::metadata(p).ok();
        (
            p.to_owned(),
            meta.as_ref().and_then(|m| m.modified().ok()),
            meta.map(|m| m.len()).unwrap_or(0),
        )
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.extend(sources.file.iter().cloned());
    files.sort();
    files.iter().map(|p| stat(p)).collect()
}

#[cfg(unix)]
type Hangups = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangups = ();

/// Starts listening for SIGHUP (from this call on, SIGHUP no longer ends the process).
fn hangups() -> Option<Hangups> {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGHUP; reload on SIGHUP is off");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// Reloads pipelines and models on SIGHUP and, with `pipelines.watch`, when a file changes.
/// A configuration with problems is refused (each problem logged) and the running one stays.
async fn reloader(
    mut current: Config,
    sources: Sources,
    pipelines: Arc<PipelineManager>,
    mut hup: Option<Hangups>,
    stop: CancellationToken,
) {
    let mut last = fingerprint(&sources, &current.pipelines.dir);
    let mut ticks = tokio::time::interval(current.pipelines.watch_interval());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = {
            let _ = &mut hup;
            std::future::pending::<()>()
        };
        let cause = tokio::select! {
            () = stop.cancelled() => return,
            () = hangup => "SIGHUP",
            _ = ticks.tick(), if current.pipelines.watch => {
                let now = fingerprint(&sources, &current.pipelines.dir);
                if now == last {
                    continue;
                }
                last = now;
                "a changed file"
            }
        };
        tracing::info!(cause, "reloading pipelines and models");
        match reload(&sources, &current, &pipelines).await {
            Ok(next) => {
                metrics::counter!(RELOADS_TOTAL, "outcome" => "applied").increment(1);
                tracing::info!(pipelines = ?pipelines.pipeline_ids(), "reloaded");
                current = next;
                last = fingerprint(&sources, &current.pipelines.dir);
            }
            Err(err) => {
                metrics::counter!(RELOADS_TOTAL, "outcome" => "rejected").increment(1);
                tracing::error!(
                    problems = format!("{err:#}"),
                    "reload refused; the running pipelines and models stay"
                );
            }
        }
    }
}

/// Loads the configuration again and installs its pipelines and, when `[providers]`,
/// `[models]` or `[result_cache]` changed, a new model manager; when only `[routes]` changed,
/// a manager with the new routes over the same models. Other sections take effect only after
/// a restart (logged).
async fn reload(
    sources: &Sources,
    current: &Config,
    pipelines: &PipelineManager,
) -> anyhow::Result<Config> {
    let next = Config::load(sources).map_err(|errs| anyhow::anyhow!("{errs}"))?;
    let defs = next
        .pipelines
        .load()
        .map_err(|errs| anyhow::anyhow!("{errs}"))?;
    let same = |a: &dyn erased::Ser, b: &dyn erased::Ser| a.toml() == b.toml();
    let models_changed = !same(&current.providers, &next.providers)
        || !same(&current.models, &next.models)
        || !same(&current.result_cache, &next.result_cache);
    let restart_only: Vec<&str> = [
        ("kafka", same(&current.kafka, &next.kafka)),
        ("topics", same(&current.topics, &next.topics)),
        ("batch", same(&current.batch, &next.batch)),
        ("executor", same(&current.executor, &next.executor)),
        (
            "feature_store",
            same(&current.feature_store, &next.feature_store),
        ),
        ("ingest", same(&current.ingest, &next.ingest)),
        ("processing", same(&current.processing, &next.processing)),
        ("replay", same(&current.replay, &next.replay)),
        ("http", same(&current.http, &next.http)),
        ("log", same(&current.log, &next.log)),
    ]
    .into_iter()
    .filter(|(_, same)| !same)
    .map(|(name, _)| name)
    .collect();
    if !restart_only.is_empty() {
        tracing::warn!(sections = ?restart_only, "changed sections take effect after a restart");
    }
    // New models get the new routes; unchanged models get them too when they changed (a
    // manager sharing the loaded models), so the routes swap with the snapshot.
    let models = if models_changed {
        let built = crate::providers::build::build_manager(
            &next.providers,
            &next.models,
            &next.result_cache,
        )
        .await
        .context("starting the new models")?;
        if let Some(sink) = pipelines.models().shadow_sink() {
            built.set_shadow_sink(sink);
        }
        Some(crate::providers::build::with_routes(&built, &next.routes)?)
    } else if !same(&current.routes, &next.routes) {
        Some(crate::providers::build::with_routes(
            &pipelines.models(),
            &next.routes,
        )?)
    } else {
        None
    };
    pipelines
        .replace_all(models, defs)
        .map_err(|errs| anyhow::anyhow!("{errs}"))?;
    Ok(next)
}

/// Comparing configuration sections by their serialised form.
mod erased {
    /// A section that can be printed as TOML.
    pub(super) trait Ser {
        fn toml(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn toml(&self) -> String {
            toml::to_string(self).unwrap_or_default()
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received, shutting down"),
        () = term => tracing::info!("SIGTERM received, shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_comparisons_linger_longer_than_results() {
        let config = Config::from_toml_str("").unwrap();
        assert_eq!(
            crate::kafka::producer_config(&config.kafka).get("linger.ms"),
            Some("5")
        );
        assert_eq!(
            shadow_producer_config(&config).get("linger.ms"),
            Some("100")
        );
        // A longer results linger is kept.
        let config = Config::from_toml_str("[kafka]\nproducer_linger_ms = 250\n").unwrap();
        assert_eq!(
            shadow_producer_config(&config).get("linger.ms"),
            Some("250")
        );
        // Compressed by the (idle-priority) producer, so the broker handles a fifth of the
        // bytes.
        assert_eq!(
            shadow_producer_config(&config).get("compression.type"),
            Some("lz4")
        );
        // Everything else is the results producer's.
        assert_eq!(shadow_producer_config(&config).get("acks"), Some("all"));
    }

    /// The threads of this process named `name*` and in the idle scheduling class.
    fn idle_threads(name: &str) -> usize {
        let tasks = std::fs::read_dir("/proc/self/task").unwrap();
        tasks
            .flatten()
            .filter(|task| {
                let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
                let tid: i32 = task.file_name().to_string_lossy().parse().unwrap_or(0);
                // SAFETY: reads the scheduling policy of a thread of this process.
                comm.starts_with(name)
                    && unsafe { libc::sched_getscheduler(tid) } == libc::SCHED_IDLE
            })
            .count()
    }

    /// The comparisons' producer, its librdkafka threads included, runs at idle priority, and
    /// a comparison the queue cannot take is dropped without blocking.
    #[test]
    fn shadow_comparisons_are_produced_by_idle_threads() {
        // No broker needed: the producer is created without connecting.
        let config = Config::from_toml_str(
            "[kafka]\nbootstrap_servers = \"127.0.0.1:1\"\n[topics]\nshadow_results = \"s\"\n",
        )
        .unwrap();
        let sink = shadow_sink(&config).unwrap().expect("a sink");
        // librdkafka's main and broker threads, started from the idle thread (other tests'
        // clients run at normal priority). Each names itself once running: wait for that.
        let named = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while idle_threads("rdk:") < 2 && std::time::Instant::now() < named {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            idle_threads("rdk:") >= 2,
            "librdkafka's threads are not idle-class"
        );
        let started = std::time::Instant::now();
        for i in 0..SHADOW_QUEUE * 2 {
            sink.publish(&format!("r{i}"), "m@2", b"{}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
