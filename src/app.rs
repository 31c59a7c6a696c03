//! Builds the running service from configuration (processor, HTTP server) and runs it until
//! SIGINT or SIGTERM.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::executor::Builtins;
use crate::feature_store::{FeatureStore, coherence};

use crate::config::Config;
use crate::http::{AppState, Readiness, router};

/// Serves HTTP on an already bound listener until `shutdown` completes.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let readiness = Readiness::new(&config.kafka, &config.feature_store)
        .context("creating the Kafka client for readiness checks")?;
    let state = AppState {
        metrics,
        readiness: Arc::new(readiness),
        started: Instant::now(),
    };
    tracing::info!(listen = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("HTTP server")?;
    tracing::info!("stopped");
    Ok(())
}

/// Runs the processor and the HTTP server until SIGINT or SIGTERM, then shuts down in order:
/// the processor drains, delivers and commits within `executor.shutdown_timeout_ms`, then the
/// HTTP server stops.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let metrics = crate::metrics::install().context("installing the Prometheus recorder")?;
    let listener = TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| format!("binding http.listen = {}", config.http.listen))?;
    let stop = CancellationToken::new();
    let processor = crate::processor::start(&config, Arc::new(Builtins), stop.clone()).await?;
    let margin = processor.shutdown_timeout() + Duration::from_secs(15);
    let ingestion = if config.ingest.enabled {
        Some(start_features(&config, &stop).await?)
    } else {
        None
    };
    let http_stop = CancellationToken::new();
    let http = {
        let http_stop = http_stop.clone();
        let config = config.clone();
        tokio::spawn(async move {
            serve(&config, listener, metrics, async move {
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
    outcome
}

/// Opens the feature store and starts feature ingestion, the cache's maintenance and the
/// invalidation listener; all stop with `stop`.
async fn start_features(
    config: &Config,
    stop: &CancellationToken,
) -> anyhow::Result<crate::kafka::source::SourceHandle> {
    let store = Arc::new(
        FeatureStore::open(&config.feature_store)
            .await
            .context("opening the feature store (set ingest.enabled = false to run without it)")?,
    );
    tokio::spawn(Arc::clone(&store).maintain(stop.clone()));
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
    let handle = crate::feature_store::ingest::start(config, store, stop.clone())?;
    tracing::info!(topic = %config.topics.features, group = %config.ingest.group_id, "ingesting feature updates");
    Ok(handle)
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
