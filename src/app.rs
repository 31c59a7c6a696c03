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
    let outcome = tokio::select! {
        () = shutdown_signal() => {
            stop.cancel();
            match tokio::time::timeout(margin, processor_join).await {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!("the processor did not stop within {margin:?}")),
            }
        }
        result = &mut processor_join => {
            result.and_then(|()| Err(anyhow::anyhow!("the processor stopped unexpectedly")))
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
