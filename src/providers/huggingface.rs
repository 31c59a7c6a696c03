//! The Hugging Face provider: text classification, token classification (NER) and feature
//! extraction over HTTP, against the serverless Inference API or a self-hosted Text Embeddings
//! Inference (TEI) server.
//!
//! The HTTP plumbing is the endpoint it shares with the [OpenAI-compatible
//! provider](super::openai) (`endpoint.rs`): one pooled `reqwest` client, a connect and a
//! per-attempt timeout, a semaphore bounding the HTTP requests in flight (held for one attempt,
//! not across retry sleeps), every call under the provider's [`RetryPolicy`], and HTTP failures
//! classified into [`ProviderError`]s. This module has the request shapes, the response parsing
//! and Hugging Face's error format.
//!
//! Every task is batch-aware: the inputs of a batch are packed into one request (up to
//! `max_batch_inputs` each; larger batches are split and the requests run concurrently) and
//! the answers, which come back as one entry per input in order, are mapped back. Inputs whose
//! parameters differ go in different requests, since a request has one set of parameters.
//!
//! | flavour         | task                   | request                                   |
//! |-----------------|------------------------|-------------------------------------------|
//! | `inference_api` | any                    | `POST {base_url}/models/{model}` with `{"inputs": [...], "parameters": {...}, "options": {"wait_for_model": true}}` |
//! | `tei`           | `text_classification`  | `POST {base_url}/predict` with `{"inputs": [...], ...parameters}` |
//! | `tei`           | `feature_extraction`   | `POST {base_url}/embed` with `{"inputs": [...], "normalize": true, ...parameters}` (`normalize` unless a parameter says otherwise) |
//!
//! TEI has no token classification. TEI reads an `inputs` list of exactly two strings as one
//! sentence *pair*, so a TEI classification request never carries exactly two inputs (two are
//! sent as two requests of one).
//!
//! An input's `data` is the text (a string, or `{"text": …}`). Outputs:
//!
//! - text classification: `{"label": …, "score": …, "scores": [{"label", "score"}, …]}`, the
//!   scores sorted best first and `label`/`score` the best of them;
//! - token classification: `{"entities": [{"entity_group", "score", "word", "start", "end"}, …]}`
//!   as the API returns them (`entity` instead of `entity_group` without aggregation);
//! - feature extraction: `{"embedding": …}`, the vector (or, for models without pooling, the
//!   per-token vectors) as returned.
//!
//! Errors: HF's `{"error": "…", "estimated_time": 20.0}` with 503 (model loading) is a
//! retryable [`ProviderError::Unavailable`] whose wait is `estimated_time`, capped at the retry
//! policy's `max_retry_after_ms` (the model is often ready sooner than estimated, so a loading
//! model is waited for up to the cap and tried again rather than given up on); 429 honours
//! `Retry-After`; other 4xx are not retried.
//!
//! The token is read from the variable named by `token_env` when the provider is built, kept
//! in a [`Secret`], and sent as `Authorization: Bearer …` in a header marked sensitive. It never
//! appears in logs or errors: transport errors are reported without their URL, and provider
//! messages are redacted and truncated.

use std::collections::BTreeMap;
use std::fmt;
use std::num::{NonZeroU64, NonZeroUsize};
use std::time::Duration;

use futures::future::{BoxFuture, join_all};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::endpoint::{Endpoint, EndpointSettings, ErrorReport, check_base_url, secret_from_env};
use super::retry::{RetryConfig, RetryPolicy, RetryStats};
use super::{BuildError, Provider, ProviderError, ProviderInput, ProviderOutput};
use crate::secret::Secret;

/// Which HTTP API the endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HfFlavour {
    /// The serverless Inference API (or a server speaking it): `POST /models/{model}`.
    #[default]
    InferenceApi,
    /// Text Embeddings Inference: `POST /predict` and `POST /embed`, one model per server.
    Tei,
}

/// What a model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HfTask {
    /// Labels with scores for the whole text (sentiment, topics).
    TextClassification,
    /// Labelled spans of the text (named entities). Inference API only.
    TokenClassification,
    /// Embeddings.
    FeatureExtraction,
}

impl HfTask {
    fn name(self) -> &'static str {
        match self {
            HfTask::TextClassification => "text_classification",
            HfTask::TokenClassification => "token_classification",
            HfTask::FeatureExtraction => "feature_extraction",
        }
    }
}

/// Settings of one Hugging Face endpoint. Every key but `models` has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HuggingFaceConfig {
    /// API root. Default `https://api-inference.huggingface.co`; e.g. `http://localhost:8080`
    /// for TEI.
    pub base_url: String,
    /// `inference_api` (default) or `tei`.
    pub flavour: HfFlavour,
    /// Name of the environment variable holding the Hugging Face token, e.g. `HF_TOKEN`.
    /// Required for `inference_api`; optional for `tei` (leave it out for servers without
    /// authentication). Read once, when the provider is built; a named variable that is unset
    /// or empty is an error.
    pub token_env: Option<String>,
    /// Longest time to open a connection (TCP and TLS). Default 2000 ms.
    pub connect_timeout_ms: NonZeroU64,
    /// Longest time for one attempt, from sending the request to the end of the response
    /// body. Default 10000 ms.
    pub timeout_ms: NonZeroU64,
    /// HTTP requests in flight at once, across all models of this provider. Default 8.
    pub max_concurrency: NonZeroUsize,
    /// Most inputs packed into one request; larger batches are split. Default 32 (TEI's own
    /// default `max_client_batch_size`).
    pub max_batch_inputs: NonZeroUsize,
    /// Retries, backoff and the retry budget.
    pub retry: RetryConfig,
    /// The models this provider answers for, by the name callers use.
    pub models: BTreeMap<String, HfModelConfig>,
}

impl Default for HuggingFaceConfig {
    fn default() -> Self {
        HuggingFaceConfig {
            base_url: "https://api-inference.huggingface.co".to_owned(),
            flavour: HfFlavour::InferenceApi,
            token_env: None,
            connect_timeout_ms: NonZeroU64::new(2_000).unwrap_or(NonZeroU64::MIN),
            timeout_ms: NonZeroU64::new(10_000).unwrap_or(NonZeroU64::MIN),
            max_concurrency: NonZeroUsize::new(8).unwrap_or(NonZeroUsize::MIN),
            max_batch_inputs: NonZeroUsize::new(32).unwrap_or(NonZeroUsize::MIN),
            retry: RetryConfig::default(),
            models: BTreeMap::new(),
        }
    }
}

/// One model of a Hugging Face provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HfModelConfig {
    /// What the model does.
    pub task: HfTask,
    /// Inference API: the repository id sent in the URL (e.g.
    /// `distilbert/distilbert-base-uncased-finetuned-sst-2-english`), when it differs from the
    /// name callers use. Not allowed with `tei`, which serves one model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_model: Option<String>,
    /// Default parameters, which a request's parameters of the same name override. Which are
    /// known depends on the flavour and the task (see [`known_parameters`]).
    /// (Printed as TOML through `numbers::Plain`.)
    #[serde(
        default,
        skip_serializing_if = "Map::is_empty",
        serialize_with = "crate::numbers::serialize_plain_map"
    )]
    pub parameters: Map<String, Value>,
}

impl HfModelConfig {
    /// A model for `task` without default parameters.
    pub fn new(task: HfTask) -> Self {
        HfModelConfig {
            task,
            remote_model: None,
            parameters: Map::new(),
        }
    }
}

/// The parameters a request for `task` may set on `flavour`.
pub fn known_parameters(flavour: HfFlavour, task: HfTask) -> &'static [&'static str] {
    match (flavour, task) {
        (HfFlavour::InferenceApi, HfTask::TextClassification) => &["top_k", "function_to_apply"],
        (HfFlavour::InferenceApi, HfTask::TokenClassification) => {
            &["aggregation_strategy", "ignore_labels", "stride"]
        }
        (HfFlavour::InferenceApi, HfTask::FeatureExtraction) => &[
            "normalize",
            "truncate",
            "truncation_direction",
            "prompt_name",
        ],
        (HfFlavour::Tei, HfTask::TextClassification) => &["raw_scores", "truncate"],
        (HfFlavour::Tei, HfTask::TokenClassification) => &[],
        (HfFlavour::Tei, HfTask::FeatureExtraction) => &[
            "normalize",
            "truncate",
            "truncation_direction",
            "prompt_name",
        ],
    }
}

/// Checks the parameters of a request or a model against the known ones.
fn check_parameters(
    flavour: HfFlavour,
    task: HfTask,
    parameters: &Map<String, Value>,
) -> Result<(), String> {
    let known = known_parameters(flavour, task);
    for (name, value) in parameters {
        if !known.contains(&name.as_str()) {
            return Err(format!(
                "unknown parameter `{name}` for a {} model (known: {})",
                task.name(),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        }
        let ok = match name.as_str() {
            "top_k" | "stride" => value.as_u64().is_some_and(|n| n > 0),
            "normalize" | "truncate" | "raw_scores" => value.is_boolean(),
            "ignore_labels" => value
                .as_array()
                .is_some_and(|l| l.iter().all(Value::is_string)),
            _ => value.is_string(),
        };
        if !ok {
            let expected = match name.as_str() {
                "top_k" | "stride" => "a positive integer",
                "normalize" | "truncate" | "raw_scores" => "a boolean",
                "ignore_labels" => "a list of strings",
                _ => "a string",
            };
            return Err(format!("parameters.{name} must be {expected}"));
        }
    }
    Ok(())
}

impl HuggingFaceConfig {
    /// Checks what the types cannot express and returns every problem, each naming its key.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        check_base_url(
            &self.base_url,
            "the token's variable in token_env",
            &mut problems,
        );
        match (&self.token_env, self.flavour) {
            (Some(env), _) if env.is_empty() => problems.push(
                "token_env is empty; leave it out for servers without authentication".to_owned(),
            ),
            (None, HfFlavour::InferenceApi) => problems.push(
                "token_env is required with flavour inference_api (e.g. token_env = \"HF_TOKEN\")"
                    .to_owned(),
            ),
            _ => {}
        }
        self.retry.validate("retry", &mut problems);
        for (name, model) in &self.models {
            let key = format!("models.{name}");
            match (self.flavour, &model.remote_model) {
                (HfFlavour::InferenceApi, Some(remote)) if remote.is_empty() => {
                    problems.push(format!("{key}.remote_model is empty"));
                }
                (HfFlavour::Tei, Some(_)) => problems.push(format!(
                    "{key}.remote_model applies to flavour inference_api only (a TEI server \
                     serves one model)"
                )),
                _ => {}
            }
            if self.flavour == HfFlavour::Tei && model.task == HfTask::TokenClassification {
                problems.push(format!(
                    "{key}.task token_classification is not available with flavour tei"
                ));
            } else if let Err(problem) =
                check_parameters(self.flavour, model.task, &model.parameters)
            {
                problems.push(format!("{key}: {problem}"));
            }
        }
        problems
    }
}

/// A Hugging Face provider. See the [module documentation](self).
pub struct HuggingFaceProvider {
    /// Client, token, concurrency limit and retry policy, shared by every model.
    endpoint: Endpoint,
    flavour: HfFlavour,
    /// Most inputs per request.
    max_batch_inputs: usize,
    /// The models, by the name callers use.
    models: BTreeMap<String, HfModelConfig>,
}

impl fmt::Debug for HuggingFaceProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HuggingFaceProvider")
            .field("endpoint", &self.endpoint)
            .field("flavour", &self.flavour)
            .field("max_batch_inputs", &self.max_batch_inputs)
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// An input's text with its position in the batch.
type Indexed = (usize, String);

impl HuggingFaceProvider {
    /// Builds the provider, reading the token from the variable named by `token_env`.
    pub fn new(config: HuggingFaceConfig) -> Result<Self, BuildError> {
        let token = secret_from_env(config.token_env.as_deref())?;
        Self::with_token(config, token)
    }

    /// Builds the provider with the token given here (`token_env` is checked but not read):
    /// for tokens that come from somewhere other than the environment, and for tests.
    pub fn with_token(
        config: HuggingFaceConfig,
        token: Option<Secret>,
    ) -> Result<Self, BuildError> {
        let problems = config.validate();
        if !problems.is_empty() {
            return Err(BuildError::InvalidConfig { problems });
        }
        let settings = EndpointSettings {
            base_url: &config.base_url,
            connect_timeout_ms: config.connect_timeout_ms,
            timeout_ms: config.timeout_ms,
            max_concurrency: config.max_concurrency,
            retry: config.retry,
            error_format: read_error,
        };
        Ok(HuggingFaceProvider {
            endpoint: Endpoint::new(settings, token)?,
            flavour: config.flavour,
            max_batch_inputs: config.max_batch_inputs.get(),
            models: config.models,
        })
    }

    /// Retry counters of this provider, across all its models.
    pub fn retry_stats(&self) -> RetryStats {
        self.endpoint.retry().stats()
    }

    /// The retry policy, whose budget every call shares.
    pub fn retry_policy(&self) -> &RetryPolicy {
        self.endpoint.retry()
    }

    /// Where requests for `model` go, below `base_url`.
    fn path(&self, model_name: &str, model: &HfModelConfig) -> String {
        match (self.flavour, model.task) {
            (HfFlavour::InferenceApi, _) => format!(
                "/models/{}",
                model.remote_model.as_deref().unwrap_or(model_name)
            ),
            (HfFlavour::Tei, HfTask::FeatureExtraction) => "/embed".to_owned(),
            (HfFlavour::Tei, _) => "/predict".to_owned(),
        }
    }

    /// The request body for `texts` with `parameters`.
    fn request_body(&self, task: HfTask, texts: &[&str], parameters: &Map<String, Value>) -> Value {
        match self.flavour {
            HfFlavour::InferenceApi => {
                let mut body = json!({
                    "inputs": texts,
                    "options": {"wait_for_model": true},
                });
                if !parameters.is_empty() {
                    body["parameters"] = Value::Object(parameters.clone());
                }
                body
            }
            HfFlavour::Tei => {
                let mut body = Map::new();
                body.insert("inputs".to_owned(), json!(texts));
                if task == HfTask::FeatureExtraction {
                    body.insert("normalize".to_owned(), Value::Bool(true));
                }
                for (k, v) in parameters {
                    body.insert(k.clone(), v.clone());
                }
                Value::Object(body)
            }
        }
    }

    /// One request for `chunk` (under the retry policy); one outcome per text, in order.
    async fn call_chunk(
        &self,
        path: &str,
        task: HfTask,
        parameters: &Map<String, Value>,
        chunk: &[(usize, String)],
    ) -> Vec<Result<ProviderOutput, ProviderError>> {
        let all = |error: ProviderError| vec![Err(error); chunk.len()];
        let texts: Vec<&str> = chunk.iter().map(|(_, t)| t.as_str()).collect();
        let request = self.request_body(task, &texts, parameters);
        let response = self.endpoint.post_json(path, &request).await;
        let response = match response.and_then(|bytes| {
            serde_json::from_slice::<Value>(&bytes).map_err(|e| ProviderError::InvalidResponse {
                message: format!("the body is not JSON: {e}"),
            })
        }) {
            Ok(response) => response,
            Err(e) => return all(e),
        };
        match per_input(response, chunk.len(), task) {
            Ok(items) => items
                .into_iter()
                .map(|item| to_output(task, item))
                .collect(),
            Err(message) => all(ProviderError::InvalidResponse { message }),
        }
    }

    async fn infer(
        &self,
        model_name: &str,
        model: &HfModelConfig,
        inputs: Vec<ProviderInput>,
    ) -> Vec<Result<ProviderOutput, ProviderError>> {
        let mut outcomes: Vec<Option<Result<ProviderOutput, ProviderError>>> =
            inputs.iter().map(|_| None).collect();
        // Valid inputs grouped by their effective parameters (the model's, overridden by the
        // request's), in order of first appearance. Invalid inputs fail here, alone.
        let mut groups: Vec<(Map<String, Value>, Vec<Indexed>)> = Vec::new();
        for (position, input) in inputs.into_iter().enumerate() {
            let mut parameters = model.parameters.clone();
            parameters.extend(input.parameters.clone());
            let checked = check_parameters(self.flavour, model.task, &input.parameters)
                .map_err(|message| ProviderError::InvalidInput { message })
                .and_then(|()| input_text(input.data));
            match checked {
                Ok(text) => match groups.iter_mut().find(|(p, _)| *p == parameters) {
                    Some((_, texts)) => texts.push((position, text)),
                    None => groups.push((parameters, vec![(position, text)])),
                },
                Err(e) => outcomes[position] = Some(Err(e)),
            }
        }
        let path = self.path(model_name, model);
        let mut chunks: Vec<(&Map<String, Value>, &[Indexed])> = Vec::new();
        for (parameters, texts) in &groups {
            for chunk in texts.chunks(self.max_batch_inputs) {
                if self.flavour == HfFlavour::Tei
                    && model.task == HfTask::TextClassification
                    && chunk.len() == 2
                {
                    // Two strings would be read as one sentence pair.
                    chunks.push((parameters, &chunk[..1]));
                    chunks.push((parameters, &chunk[1..]));
                } else {
                    chunks.push((parameters, chunk));
                }
            }
        }
        let results = join_all(
            chunks
                .iter()
                .map(|(parameters, chunk)| self.call_chunk(&path, model.task, parameters, chunk)),
        )
        .await;
        for ((_, chunk), results) in chunks.iter().zip(results) {
            for ((position, _), result) in chunk.iter().zip(results) {
                outcomes[*position] = Some(result);
            }
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(ProviderError::InvalidResponse {
                        message: "no outcome was produced for this input".to_owned(),
                    })
                })
            })
            .collect()
    }
}

impl Provider for HuggingFaceProvider {
    fn infer_batch(
        &self,
        model: &str,
        inputs: Vec<ProviderInput>,
    ) -> BoxFuture<'_, Vec<Result<ProviderOutput, ProviderError>>> {
        let model = model.to_owned();
        Box::pin(async move {
            match self.models.get(&model) {
                Some(config) => self.infer(&model, config, inputs).await,
                None => vec![Err(ProviderError::UnknownModel { model }); inputs.len()],
            }
        })
    }

    /// Every task packs up to `max_batch_inputs` inputs into one request.
    fn api_calls(&self, _model: &str, inputs: usize) -> usize {
        inputs.div_ceil(self.max_batch_inputs)
    }

    /// Retryable failures were retried under `retry` (`max_attempts`, budget, `Retry-After`).
    fn retries_itself(&self) -> bool {
        true
    }
}

/// The text of an input: `data` as a string, or its `text` field.
fn input_text(data: Value) -> Result<String, ProviderError> {
    let text = match data {
        Value::String(text) => Some(text),
        Value::Object(mut map) if map.len() == 1 => match map.remove("text") {
            Some(Value::String(text)) => Some(text),
            _ => None,
        },
        _ => None,
    };
    match text {
        Some(text) if !text.is_empty() => Ok(text),
        Some(_) => Err(ProviderError::InvalidInput {
            message: "the text is empty".to_owned(),
        }),
        None => Err(ProviderError::InvalidInput {
            message: "data must be a string or an object with one field, `text` (a string)"
                .to_owned(),
        }),
    }
}

/// Splits a response into one item per input. The APIs answer a list of `n` inputs with a
/// list of `n` entries; a few answer a single input without the outer list (a flat list of
/// labels, entities or numbers), and classification with `top_k = 1` may answer one object
/// per input instead of a list of one.
fn per_input(response: Value, n: usize, task: HfTask) -> Result<Vec<Value>, String> {
    let Value::Array(items) = response else {
        return Err("the body is not a list".to_owned());
    };
    let nested = items.iter().all(Value::is_array);
    let items = if !items.is_empty() && nested {
        items
    } else if n == 1 {
        // A single input answered without the outer list.
        vec![Value::Array(items)]
    } else if task == HfTask::TextClassification && items.iter().all(Value::is_object) {
        items.into_iter().map(|i| Value::Array(vec![i])).collect()
    } else {
        return Err(format!("expected one list per input ({n} inputs)"));
    };
    if items.len() != n {
        return Err(format!(
            "the response has {} entries for {n} inputs",
            items.len()
        ));
    }
    Ok(items)
}

/// One input's answer as an output document.
fn to_output(task: HfTask, item: Value) -> Result<ProviderOutput, ProviderError> {
    let invalid = |message: String| ProviderError::InvalidResponse { message };
    match task {
        HfTask::TextClassification => {
            let scores: Vec<LabelScore> = serde_json::from_value(item).map_err(|e| {
                invalid(format!("expected a list of {{\"label\", \"score\"}}: {e}"))
            })?;
            let mut scores = scores;
            scores.sort_by(|a, b| b.score.total_cmp(&a.score));
            let best = scores
                .first()
                .ok_or_else(|| invalid("the model returned no labels".to_owned()))?;
            Ok(ProviderOutput::new(json!({
                "label": best.label,
                "score": best.score,
                "scores": scores,
            })))
        }
        HfTask::TokenClassification => {
            let Value::Array(entities) = item else {
                return Err(invalid("expected a list of entities".to_owned()));
            };
            for entity in &entities {
                let ok = entity.get("score").is_some_and(Value::is_number)
                    && (entity.get("entity_group").is_some_and(Value::is_string)
                        || entity.get("entity").is_some_and(Value::is_string));
                if !ok {
                    return Err(invalid(
                        "an entity lacks `entity_group` (or `entity`) or a numeric `score`"
                            .to_owned(),
                    ));
                }
            }
            Ok(ProviderOutput::new(json!({ "entities": entities })))
        }
        HfTask::FeatureExtraction => {
            if !is_numeric_tensor(&item) {
                return Err(invalid(
                    "expected a list of numbers (or nested lists of numbers)".to_owned(),
                ));
            }
            Ok(ProviderOutput::new(json!({ "embedding": item })))
        }
    }
}

/// True for a non-empty list of numbers, or of such lists, to any depth.
fn is_numeric_tensor(value: &Value) -> bool {
    match value {
        Value::Array(items) if !items.is_empty() => {
            items.iter().all(Value::is_number) || items.iter().all(is_numeric_tensor)
        }
        _ => false,
    }
}

#[derive(Serialize, Deserialize)]
struct LabelScore {
    label: String,
    score: f64,
}

/// The endpoint's error format: `{"error": "…", "estimated_time": …}` (the Inference API),
/// `{"error": [...]}`, or `{"error": "…", "error_type": "…"}` (TEI). On 503, `estimated_time`
/// (the Inference API's guess of how long the model takes to load) is the wait.
fn read_error(value: &Value, status: reqwest::StatusCode) -> ErrorReport {
    let message = match value.get("error") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join("; "),
        _ => value.to_string(),
    };
    let message = match value.get("error_type").and_then(Value::as_str) {
        Some(kind) => format!("{message} [{kind}]"),
        None => message,
    };
    let estimated_time = value
        .get("estimated_time")
        .and_then(Value::as_f64)
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(86_400.0)));
    ErrorReport {
        message,
        wait: estimated_time.filter(|_| status == reqwest::StatusCode::SERVICE_UNAVAILABLE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tei_config() -> HuggingFaceConfig {
        HuggingFaceConfig {
            base_url: "http://localhost:8080".into(),
            flavour: HfFlavour::Tei,
            ..HuggingFaceConfig::default()
        }
    }

    #[test]
    fn error_bodies_are_read_in_every_format() {
        let status = reqwest::StatusCode::SERVICE_UNAVAILABLE;
        let loading = json!({"error": "Model x is currently loading", "estimated_time": 20.5});
        assert_eq!(
            read_error(&loading, status),
            ErrorReport {
                message: "Model x is currently loading".into(),
                wait: Some(Duration::from_millis(20_500)),
            }
        );
        // Only a 503 waits for the model.
        let failed = read_error(&loading, reqwest::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(failed.wait, None);
        let tei = json!({"error": "Input validation error", "error_type": "validation"});
        assert_eq!(
            read_error(&tei, status).message,
            "Input validation error [validation]"
        );
        let list = json!({"error": ["a", "b"]});
        assert_eq!(read_error(&list, status).message, "a; b");
        assert_eq!(read_error(&json!({"x": 1}), status).message, r#"{"x":1}"#);
        let negative = json!({"error": "x", "estimated_time": -1});
        assert_eq!(read_error(&negative, status).wait, None);
    }

    #[test]
    fn responses_are_split_per_input_in_every_shape() {
        let tc = HfTask::TextClassification;
        let two = json!([[{"label": "a", "score": 0.9}], [{"label": "b", "score": 0.8}]]);
        assert_eq!(per_input(two, 2, tc).unwrap().len(), 2);
        // A single input without the outer list.
        let flat = json!([{"label": "a", "score": 0.9}, {"label": "b", "score": 0.1}]);
        let one = per_input(flat, 1, tc).unwrap();
        assert_eq!(one[0].as_array().unwrap().len(), 2);
        // top_k = 1: one object per input.
        let objects = json!([{"label": "a", "score": 0.9}, {"label": "b", "score": 0.8}]);
        assert_eq!(per_input(objects, 2, tc).unwrap()[1][0]["label"], "b");
        assert!(per_input(json!([[1.0], [2.0]]), 3, HfTask::FeatureExtraction).is_err());
        assert!(per_input(json!({"x": 1}), 1, tc).is_err());
        let vector = per_input(json!([0.1, 0.2]), 1, HfTask::FeatureExtraction).unwrap();
        assert_eq!(vector, vec![json!([0.1, 0.2])]);
    }

    #[test]
    fn outputs_are_checked_and_classification_is_sorted() {
        let out = to_output(
            HfTask::TextClassification,
            json!([{"label": "NEG", "score": 0.1}, {"label": "POS", "score": 0.9}]),
        )
        .unwrap();
        assert_eq!(out.output["label"], "POS");
        assert_eq!(out.output["scores"][1]["label"], "NEG");
        assert!(to_output(HfTask::TextClassification, json!([])).is_err());
        assert!(to_output(HfTask::TokenClassification, json!([{"word": "x"}])).is_err());
        assert!(to_output(HfTask::FeatureExtraction, json!([[0.1], ["x"]])).is_err());
        assert!(to_output(HfTask::FeatureExtraction, json!([[0.1, 0.2], [0.3, 0.4]])).is_ok());
    }

    #[test]
    fn config_problems_are_all_reported() {
        let mut config = HuggingFaceConfig {
            base_url: "ftp://u:p@host?x".into(),
            ..tei_config()
        };
        config.models.insert(
            "ner".into(),
            HfModelConfig {
                remote_model: Some("dslim/bert-base-NER".into()),
                ..HfModelConfig::new(HfTask::TokenClassification)
            },
        );
        let mut emb = HfModelConfig::new(HfTask::FeatureExtraction);
        emb.parameters.insert("normalize".into(), json!("yes"));
        config.models.insert("emb".into(), emb);
        let problems = config.validate();
        assert_eq!(problems.len(), 6, "{problems:#?}");
        assert!(tei_config().validate().is_empty());
        let api = HuggingFaceConfig::default().validate();
        assert_eq!(api.len(), 1, "{api:?}");
        assert!(api[0].starts_with("token_env is required"));
    }

    #[test]
    fn config_deserialises_strictly() {
        let config: HuggingFaceConfig = serde_json::from_value(json!({
            "base_url": "http://localhost:8080",
            "flavour": "tei",
            "max_batch_inputs": 16,
            "retry": {"max_attempts": 2},
            "models": {"emb": {"task": "feature_extraction", "parameters": {"normalize": false}}}
        }))
        .unwrap();
        assert_eq!(config.flavour, HfFlavour::Tei);
        assert_eq!(config.models["emb"].task, HfTask::FeatureExtraction);
        assert!(config.validate().is_empty());
        let typo = serde_json::from_value::<HuggingFaceConfig>(json!({"flavor": "tei"}));
        assert!(typo.unwrap_err().to_string().contains("unknown field"));
    }
}
