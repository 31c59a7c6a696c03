//! The HTTP server: `/metrics` (Prometheus), `/healthz` (the process is alive), `/readyz`
//! (Kafka and the feature store both answer a real request, and the report says what was
//! checked), and, when the service runs, the inference and feature API of [`api`] (`/v1/...`).
//! The feature routes and readiness share one [`SharedStore`]: the store the service opened,
//! or the configured one, opened on first use.
//!
//! Access control ([`auth`]) guards the `/v1` routes; `/metrics`, `/healthz` and `/readyz`
//! are never guarded, and are served either beside the API or, with `http.ops_listen`, on a
//! listener of their own and not on the API's ([`ops_router`], [`api_router`]). The API's
//! listener is plain TCP or TLS ([`listen`]).
//!
//! The routers are built here so tests can serve them on port-0 listeners.

pub mod api;
pub mod auth;
pub mod listen;

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

use crate::access::Access;
use crate::config::{FeatureStoreBackend, FeatureStoreConfig, KafkaConfig};
use crate::feature_store::{FeatureStore, FeatureStoreError};
use crate::metrics::{READINESS_CHECKS_TOTAL, UPTIME_SECONDS};

/// The feature store of the HTTP routes and of readiness: the one the service opened (for
/// ingestion or a features step), or the configured one, opened on first use so a deployment
/// that never reads features needs no database at start-up. A failed open is tried again on
/// the next use. A store opened here gets its cache maintenance until this is dropped.
pub struct SharedStore {
    config: FeatureStoreConfig,
    cell: OnceCell<Arc<FeatureStore>>,
    stop: tokio_util::sync::CancellationToken,
}

impl SharedStore {
    /// `opened` when the service has a store open already; otherwise the store of `config`,
    /// opened on first use.
    pub fn new(config: &FeatureStoreConfig, opened: Option<Arc<FeatureStore>>) -> Self {
        SharedStore {
            config: config.clone(),
            cell: OnceCell::new_with(opened),
            stop: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// The store, opened now if it is not open yet.
    pub async fn get(&self) -> Result<&Arc<FeatureStore>, FeatureStoreError> {
        self.cell
            .get_or_try_init(|| async {
                let store = Arc::new(FeatureStore::open(&self.config).await?);
                tokio::spawn(Arc::clone(&store).maintain(self.stop.clone()));
                tracing::info!(store = %self.describe(), "feature store opened for the HTTP API");
                Ok(store)
            })
            .await
    }

    /// The store, if it is open.
    pub fn opened(&self) -> Option<&Arc<FeatureStore>> {
        self.cell.get()
    }

    /// Which store this is, for people: the backend and where it keeps its data.
    pub fn describe(&self) -> String {
        match self.config.backend {
            FeatureStoreBackend::Scylla => format!(
                "scylla keyspace `{}` at {}",
                self.config.keyspace,
                self.config.contact_points.join(", ")
            ),
            FeatureStoreBackend::Embedded => {
                format!("embedded file {}", self.config.path.display())
            }
            FeatureStoreBackend::Postgres => format!(
                "postgres database at {}",
                self.config
                    .postgres
                    .url
                    .as_ref()
                    .map(|u| u.redacted())
                    .unwrap_or_default()
            ),
            FeatureStoreBackend::Mysql => format!(
                "mysql database at {}",
                self.config
                    .mysql
                    .url
                    .as_ref()
                    .map(|u| u.redacted())
                    .unwrap_or_default()
            ),
        }
    }
}

impl Drop for SharedStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// How long one dependency check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Checks that inferflow's dependencies answer real requests: a Kafka metadata request and a
/// CQL query on `system.local` (valid on ScyllaDB and Cassandra).
pub struct Readiness {
    /// A client without a group, used only for metadata requests.
    kafka: Arc<BaseConsumer>,
    /// The feature store the API uses: checked through its own backend once open; before
    /// that, a CQL store is checked with a query of its own (opening it could create its
    /// schema) and an embedded one is opened (it is a local file).
    store: Arc<SharedStore>,
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
    /// What the feature-store check did, e.g. `a read through the embedded file
    /// data/features.redb` or `a CQL query on system.local at 127.0.0.1:9042 (the store is not
    /// open yet; the /v1/features routes open it on first use)`.
    pub feature_store_check: String,
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
            store: Arc::new(SharedStore::new(feature_store, None)),
            session: OnceCell::new(),
        })
    }

    /// Checks `store` (a real read through its backend), an open store.
    pub fn with_store(mut self, store: Arc<FeatureStore>) -> Self {
        self.store = Arc::new(SharedStore::new(&self.store.config, Some(store)));
        self
    }

    /// Checks the store the API uses.
    pub fn with_shared_store(mut self, store: Arc<SharedStore>) -> Self {
        self.store = store;
        self
    }

    /// Checks both dependencies concurrently.
    pub async fn check(&self) -> ReadinessReport {
        let (kafka, (cql, checked)) = tokio::join!(self.check_kafka(), self.check_feature_store());
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
            feature_store_check: checked,
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

    /// The outcome, and what was checked.
    async fn check_feature_store(&self) -> (Result<(), String>, String) {
        let shared = &self.store;
        if shared.opened().is_none() && shared.config.backend == FeatureStoreBackend::Scylla {
            let checked = format!(
                "a CQL query on system.local at {} (the store is not open yet; the /v1/features routes open it on first use)",
                shared.config.contact_points.join(", ")
            );
            let attempt = async {
                let session = self
                    .session
                    .get_or_try_init(|| crate::feature_store::connect(&shared.config))
                    .await
                    .map_err(|e| e.to_string())?;
                session
                    .query_unpaged("SELECT release_version FROM system.local", &[])
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("query failed: {e}"))
            };
            let outcome = tokio::time::timeout(CHECK_TIMEOUT * 2, attempt)
                .await
                .unwrap_or_else(|_| Err("no answer in time".to_owned()));
            return (outcome, checked);
        }
        let checked = format!("a read through the {}", shared.describe());
        let attempt = async {
            let store = shared
                .get()
                .await
                .map_err(|e| format!("could not open the store: {e}"))?;
            // Any read through the backend; a group of this name never exists.
            store
                .get_feature_group("inferflow-readiness-probe", Some(1))
                .await
                .map(|_| ())
                .map_err(|err| format!("read failed: {err}"))
        };
        let outcome = tokio::time::timeout(CHECK_TIMEOUT * 2, attempt)
            .await
            .unwrap_or_else(|_| Err("no answer in time".to_owned()));
        (outcome, checked)
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

/// `/metrics`, `/healthz` and `/readyz`, without access control.
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The routes of the API listener: the `/v1` API (when the service runs one) behind `access`,
/// and, when `with_ops`, [`ops_router`]'s routes too.
pub fn api_router(state: AppState, access: Arc<Access>, with_ops: bool) -> Router {
    let api = state.api.clone();
    let base = if with_ops {
        ops_router(state)
    } else {
        Router::new()
    };
    match api {
        Some(api) => base.merge(api::routes(api, access)),
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
