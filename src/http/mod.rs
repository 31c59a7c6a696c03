//! The HTTP server: `/metrics` (Prometheus), `/healthz` (the process is alive), `/readyz`
//! (Kafka and the feature store both answer a real request), and, when the service runs, the
//! inference and feature API of [`api`] (`/v1/...`).
//!
//! The router is built by [`router`] so tests can serve it on a port-0 listener.

pub mod api;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{BaseConsumer, Consumer};
use scylla::client::session::Session;
use serde::Serialize;
use tokio::sync::OnceCell;

use crate::config::{FeatureStoreConfig, KafkaConfig};
use crate::metrics::{READINESS_CHECKS_TOTAL, UPTIME_SECONDS};

/// How long one dependency check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Checks that inferflow's dependencies answer real requests: a Kafka metadata request and a
/// CQL query on `system.local` (valid on ScyllaDB and Cassandra).
pub struct Readiness {
    /// A client without a group, used only for metadata requests.
    kafka: Arc<BaseConsumer>,
    feature_store: FeatureStoreConfig,
    /// The open feature store, when the service has one: checked through its own backend
    /// (CQL or the embedded file) instead of a separate CQL connection.
    store: Option<Arc<crate::feature_store::FeatureStore>>,
    /// Connected on the first successful check and kept; a failed connect is retried next time.
    session: OnceCell<Session>,
}

/// The outcome of one readiness check, as served by `/readyz`.
#[derive(Debug, Serialize)]
pub struct ReadinessReport {
    /// True when every dependency answered.
    pub ready: bool,
    /// `"ok"` or the error from Kafka.
    pub kafka: String,
    /// `"ok"` or the error from the feature store.
    pub feature_store: String,
}

impl Readiness {
    /// Builds the checker. Nothing is contacted until the first check.
    pub fn new(
        kafka: &KafkaConfig,
        feature_store: &FeatureStoreConfig,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let consumer: BaseConsumer = crate::kafka::base_client_config(kafka).create()?;
        Ok(Readiness {
            kafka: Arc::new(consumer),
            feature_store: feature_store.clone(),
            store: None,
            session: OnceCell::new(),
        })
    }

    /// Checks `store` (a real read through its backend) instead of connecting to CQL.
    pub fn with_store(mut self, store: Arc<crate::feature_store::FeatureStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Checks both dependencies concurrently.
    pub async fn check(&self) -> ReadinessReport {
        let (kafka, cql) = tokio::join!(self.check_kafka(), self.check_feature_store());
        for (dependency, result) in [("kafka", &kafka), ("feature_store", &cql)] {
            let outcome = if result.is_ok() { "ok" } else { "error" };
            metrics::counter!(READINESS_CHECKS_TOTAL, "dependency" => dependency, "outcome" => outcome)
                .increment(1);
        }
        let describe = |r: Result<(), String>| r.err().unwrap_or_else(|| "ok".to_owned());
        ReadinessReport {
            ready: kafka.is_ok() && cql.is_ok(),
            kafka: describe(kafka),
            feature_store: describe(cql),
        }
    }

    async fn check_kafka(&self) -> Result<(), String> {
        let consumer = Arc::clone(&self.kafka);
        // fetch_metadata blocks; keep it off the async workers.
        tokio::task::spawn_blocking(move || consumer.fetch_metadata(None, CHECK_TIMEOUT))
            .await
            .map_err(|e| format!("metadata task failed: {e}"))?
            .map(|_| ())
            .map_err(|e| format!("metadata request failed: {e}"))
    }

    async fn check_feature_store(&self) -> Result<(), String> {
        if let Some(store) = &self.store {
            // Any read through the backend; a group of this name never exists.
            let read = store.get_feature_group("inferflow-readiness-probe", Some(1));
            return match tokio::time::timeout(CHECK_TIMEOUT * 2, read).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(err)) => Err(format!("read failed: {err}")),
                Err(_) => Err("no answer in time".to_owned()),
            };
        }
        let attempt = async {
            let session = self
                .session
                .get_or_try_init(|| crate::feature_store::connect(&self.feature_store))
                .await
                .map_err(|e| e.to_string())?;
            session
                .query_unpaged("SELECT release_version FROM system.local", &[])
                .await
                .map(|_| ())
                .map_err(|e| format!("query failed: {e}"))
        };
        tokio::time::timeout(CHECK_TIMEOUT * 2, attempt)
            .await
            .unwrap_or_else(|_| Err("no answer in time".to_owned()))
    }
}

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Answers `/readyz`.
    pub readiness: Arc<Readiness>,
    /// When the server started.
    pub started: Instant,
    /// The inference and feature API, when the service runs one.
    pub api: Option<Arc<api::Api>>,
}

/// The HTTP routes.
pub fn router(state: AppState) -> Router {
    let api = state.api.clone();
    let base = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    match api {
        Some(api) => base.merge(api::routes(api)),
        None => base,
    }
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    metrics::gauge!(UPTIME_SECONDS).set(state.started.elapsed().as_secs_f64());
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let report = state.readiness.check().await;
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}
