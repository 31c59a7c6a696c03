//! The wire contract: inference requests, results and error kinds, as they appear on Kafka and
//! over HTTP. `schemas/*.json` describe the same documents as JSON Schema; `tests/schemas.rs`
//! fails when the two drift apart.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Stable, snake_case error kinds. They appear in results (`error.kind`), dead-letter headers
/// (`inferflow-error-kind`) and metric labels, so renaming one is a breaking change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The message value is not UTF-8 JSON (or nests too deeply).
    InvalidJson,
    /// The JSON is not a valid request: a field is missing, of the wrong type, or out of range.
    InvalidRequest,
    /// The message value is larger than `executor.max_request_bytes`.
    PayloadTooLarge,
    /// The named pipeline does not exist.
    UnknownPipeline,
    /// The named model does not exist.
    UnknownModel,
    /// `reply_to` names a topic outside `topics.reply_to_allowed`.
    ReplyToNotAllowed,
    /// The request's `deadline_ms` had passed before a model was called.
    DeadlineExceeded,
    /// The model provider answered with an error.
    ProviderError,
    /// The model provider did not answer in time.
    ProviderTimeout,
    /// The model provider refused the call for rate limiting.
    RateLimited,
    /// The feature store could not be read.
    FeatureStoreError,
    /// A pipeline step failed.
    StepFailed,
    /// A bug in inferflow.
    Internal,
}

impl ErrorKind {
    /// Every kind, in schema order.
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::InvalidJson,
        ErrorKind::InvalidRequest,
        ErrorKind::PayloadTooLarge,
        ErrorKind::UnknownPipeline,
        ErrorKind::UnknownModel,
        ErrorKind::ReplyToNotAllowed,
        ErrorKind::DeadlineExceeded,
        ErrorKind::ProviderError,
        ErrorKind::ProviderTimeout,
        ErrorKind::RateLimited,
        ErrorKind::FeatureStoreError,
        ErrorKind::StepFailed,
        ErrorKind::Internal,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidJson => "invalid_json",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::UnknownPipeline => "unknown_pipeline",
            ErrorKind::UnknownModel => "unknown_model",
            ErrorKind::ReplyToNotAllowed => "reply_to_not_allowed",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::ProviderError => "provider_error",
            ErrorKind::ProviderTimeout => "provider_timeout",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::FeatureStoreError => "feature_store_error",
            ErrorKind::StepFailed => "step_failed",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with its kind and a human-readable message (never containing secrets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ErrorBody {
    /// Stable kind.
    pub kind: ErrorKind,
    /// What went wrong, for people.
    pub message: String,
    /// The pipeline steps that ran before the request failed, the failed one last (empty when
    /// no step ran). Not part of the error on the wire: the result document puts them in its
    /// own `steps`.
    #[serde(skip)]
    pub steps: Vec<StepRecord>,
}

impl ErrorBody {
    /// Builds an error body.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorBody {
            kind,
            message: message.into(),
            steps: Vec::new(),
        }
    }
}

/// The entity a request is about; feature-lookup steps read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entity {
    /// Entity type, e.g. `user`.
    #[serde(rename = "type")]
    pub entity_type: String,
    /// Entity id.
    pub id: String,
}

/// An inference request, as produced to the requests topic (`schemas/inference_request.v1.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceRequest {
    /// Caller-chosen id, 1 to 128 characters; the result is keyed by it.
    pub request_id: String,
    /// The pipeline to run (exactly one of `pipeline` and `model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// The model to call, `name` or `name@version` (exactly one of `pipeline` and `model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The input.
    pub data: Value,
    /// Model or pipeline parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Map<String, Value>>,
    /// The entity the request is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<Entity>,
    /// Topic for the result, if not the default; must be allow-listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Unix milliseconds after which the request is not worth answering with a model call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
    /// Tenant; part of every cache key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// Longest accepted `request_id`, in characters.
pub const MAX_REQUEST_ID_CHARS: usize = 128;

/// What a request asks to run.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// A pipeline, by id.
    Pipeline(String),
    /// A model, by id (`name` or `name@version`).
    Model(String),
}

impl Target {
    /// The id, without saying which kind it is.
    pub fn id(&self) -> &str {
        match self {
            Target::Pipeline(id) | Target::Model(id) => id,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pipeline(id) => write!(f, "pipeline {id}"),
            Target::Model(id) => write!(f, "model {id}"),
        }
    }
}

/// Result status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The request was answered.
    Ok,
    /// The request failed; `error` says why.
    Error,
}

impl Status {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
        }
    }
}

/// One step of the work done for a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step name.
    pub name: String,
    /// Time spent in the step, microseconds.
    pub latency_us: u64,
    /// Whether the step's answer came from a cache.
    pub cached: bool,
    /// The step's output, when the pipeline asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The feature versions a features step read (the prediction audit: with the model's
    /// version, what it takes to reproduce the answer from the store's history). Empty, and
    /// left out of the JSON, for every other step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<FeatureRead>,
}

/// One feature a features step read, with the version it got: `inferflow features get
/// --version N` reads the same values back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureRead {
    /// The kind of entity.
    pub entity_type: String,
    /// The entity's id.
    pub entity_id: String,
    /// The feature's name.
    pub feature: String,
    /// The version read; 0 for a stale feature replaced by its `max_age` default, `None` (null)
    /// when the feature had no value.
    pub version: Option<u64>,
}

/// Where the request came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRef {
    /// Topic of the request.
    pub topic: String,
    /// Partition of the request.
    pub partition: i32,
    /// Offset of the request.
    pub offset: i64,
}

/// The answer to one request (`schemas/inference_result.v1.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceResult {
    /// The request's id; also the Kafka key of the result.
    pub request_id: String,
    /// `ok` or `error`.
    pub status: Status,
    /// The output, when `status` is `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why the request failed, when `status` is `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// The pipeline that ran, if the request named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// The model that ran, if the request named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The version of the model that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// Whether the answer came from the inference cache.
    pub cached: bool,
    /// Time from the request's arrival in inferflow to the result, milliseconds.
    pub latency_ms: u64,
    /// Per-step timings.
    pub steps: Vec<StepRecord>,
    /// Where the request came from (absent for HTTP requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceRef>,
}
