//! inferflow: machine-learning inference on Kafka event streams.
//!
//! Requests arrive on a Kafka topic, are micro-batched, enriched with features from a CQL
//! database (ScyllaDB in production) through an in-process cache, answered by a model provider,
//! and published to a results topic keyed by request id. `ARCHITECTURE.md` at the repository
//! root has the bird's-eye view; this crate is laid out as follows:
//!
//! - [`backoff`]: the one retry-pacing rule (capped exponential backoff, full jitter, budget).
//! - [`config`]: layered configuration (embedded defaults, a user file, `INFERFLOW__*`
//!   environment variables), strict parsing and one validation pass reporting every problem.
//!   Each component owns the types of its own sections; `config` aggregates them into
//!   [`config::Config`] (and re-exports them). [`secret`] (passwords, redacted when printed) and
//!   [`section`] (what a section is, and configuration errors) are leaves every layer uses.
//!   `ARCHITECTURE.md` ("Layers") has the import rule, which `tests/module_layers.rs` checks.
//! - [`kafka`]: building librdkafka clients from configuration.
//! - [`feature_store`]: the feature store (CQL and embedded backends, schema, TTL cache,
//!   ingestion from Kafka, cross-instance invalidation, freshness).
//! - [`providers`]: model providers (the `Provider` trait; OpenAI-compatible and Hugging Face
//!   HTTP; local ONNX and VADER models), their retry policy, circuit breaker and rate limits,
//!   the result cache, the model manager, and building all of it from configuration.
//! - [`pipeline`]: config-driven pipelines (preprocess, features, model, postprocess, chaining,
//!   map), their validation, hot reload, and the executor the processor and HTTP API drive.
//! - [`replay`]: earlier results by request id, reused for redelivered requests.
//! - [`telemetry`]: logging set-up; [`metrics`]: metric names and the Prometheus exporter;
//!   [`tracing_otel`]: distributed traces (W3C trace context, OTLP/HTTP export, `[tracing]`).
//! - [`access`]: who may use the HTTP API (the `[http]` section: tokens, client certificates,
//!   scopes, tenants, per-token limits, TLS).
//! - [`http`]: `/metrics`, `/healthz`, `/readyz` and the `/v1` API, with access control;
//!   [`app`]: wires the service and runs it.

pub mod access;
pub mod app;
pub mod backoff;
pub mod batching;
pub mod client;
pub mod config;
pub mod decode;
pub mod executor;
pub mod feature_store;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod numbers;
pub mod pipeline;
pub mod processor;
pub mod providers;
pub mod replay;
pub mod secret;
pub mod section;
pub mod telemetry;
pub mod tracing_otel;
