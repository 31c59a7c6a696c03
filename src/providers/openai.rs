//! The OpenAI-compatible provider: chat completions and embeddings over HTTP, for OpenAI itself
//! and for servers that speak its API (vLLM, TGI, Ollama, llama.cpp).
//!
//! The HTTP plumbing is the provider's endpoint (`endpoint.rs`, shared with the Hugging Face
//! provider): one pooled `reqwest` client with a connect timeout and a per-attempt timeout, a
//! semaphore bounding the HTTP requests in flight (a permit is held for one attempt, not across
//! retry sleeps, so waiting calls do not hold capacity), every call under the provider's
//! [`RetryPolicy`] with `Retry-After` honoured, and HTTP failures classified into
//! [`ProviderError`]s. This module has the request shapes, the response parsing and OpenAI's
//! error format.
//!
//! - **Chat** (`POST {base_url}/chat/completions`): one HTTP call per input; the inputs of a
//!   batch run concurrently. The input's `data` is the user message (a string), or an object
//!   with `prompt` (a string) or `messages` (OpenAI's message list). The output is
//!   `{"content": …, "finish_reason": …}`, where `content` is parsed JSON when JSON output was
//!   asked for and a string otherwise.
//! - **Embeddings** (`POST {base_url}/embeddings`): the inputs of a batch are packed into one
//!   call (up to `max_embedding_inputs` each) and the vectors are mapped back by their `index`,
//!   whatever order the server returns them in. `data` is the text (a string, or
//!   `{"text": …}`); the output is `{"embedding": [...]}`.
//!
//! The API key is read from the environment variable named in the configuration when the
//! provider is built, kept in a [`Secret`], and sent as `Authorization: Bearer …` in a header
//! marked sensitive. It never appears in logs or errors: transport errors are reported without
//! their URL, and provider messages (which sometimes quote the key back) are redacted and
//! truncated.

use std::collections::BTreeMap;
use std::fmt;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};

use futures::future::{BoxFuture, join_all};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::endpoint::{Endpoint, EndpointSettings, ErrorReport, check_base_url, secret_from_env};
use super::retry::{RetryConfig, RetryPolicy, RetryStats};
use super::{BuildError, Provider, ProviderError, ProviderInput, ProviderOutput, TokenUsage};
use crate::secret::Secret;

/// Settings of one OpenAI-compatible endpoint. Every key but `models` has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    /// API root; `/chat/completions` and `/embeddings` are appended. Default
    /// `https://api.openai.com/v1`; e.g. `http://localhost:8000/v1` for vLLM.
    pub base_url: String,
    /// Name of the environment variable holding the API key, e.g. `OPENAI_API_KEY`. Leave it
    /// out for servers without authentication. The key is read once, when the provider is
    /// built; a named variable that is unset or empty is an error.
    pub api_key_env: Option<String>,
    /// Longest time to open a connection (TCP and TLS). Default 2000 ms.
    pub connect_timeout_ms: NonZeroU64,
    /// Longest time for one attempt, from sending the request to the end of the response
    /// body. Default 10000 ms: with three attempts and their backoff a call stays inside the
    /// executor's default 30 s.
    pub timeout_ms: NonZeroU64,
    /// HTTP requests in flight at once, across all models of this provider. Default 16.
    pub max_concurrency: NonZeroUsize,
    /// Most texts packed into one embeddings request; larger batches are split. Default 256
    /// (OpenAI accepts up to 2048).
    pub max_embedding_inputs: NonZeroUsize,
    /// Retries, backoff and the retry budget.
    pub retry: RetryConfig,
    /// The models this provider answers for, by the name callers use.
    pub models: BTreeMap<String, OpenAiModelConfig>,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "https://api.openai.com/v1".to_owned(),
            api_key_env: None,
            connect_timeout_ms: NonZeroU64::new(2_000).unwrap_or(NonZeroU64::MIN),
            timeout_ms: NonZeroU64::new(10_000).unwrap_or(NonZeroU64::MIN),
            max_concurrency: NonZeroUsize::new(16).unwrap_or(NonZeroUsize::MIN),
            max_embedding_inputs: NonZeroUsize::new(256).unwrap_or(NonZeroUsize::MIN),
            retry: RetryConfig::default(),
            models: BTreeMap::new(),
        }
    }
}

/// What a model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpenAiTask {
    /// Chat completions.
    Chat,
    /// Embeddings.
    Embeddings,
}

/// One model of an OpenAI-compatible provider. The chat settings are defaults that a request's
/// parameters of the same name override (`system_prompt`, `temperature`, `max_tokens`, and
/// `response_format` for `json_output`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiModelConfig {
    /// Chat or embeddings.
    pub task: OpenAiTask,
    /// The model name sent to the API, when it differs from the name callers use (e.g.
    /// `gpt-4o-mini-2024-07-18` behind `summariser`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_model: Option<String>,
    /// Chat: system message put before the conversation, unless it starts with its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Chat: sampling temperature, 0 to 2; the server's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Chat: most tokens to generate; the server's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<NonZeroU32>,
    /// Chat: ask for a JSON object (`response_format: {"type": "json_object"}`) and parse it.
    #[serde(default)]
    pub json_output: bool,
    /// Embeddings: vector length, for models that can shorten theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<NonZeroU32>,
}

impl OpenAiModelConfig {
    /// A chat model with the server's defaults.
    pub fn chat() -> Self {
        OpenAiModelConfig {
            task: OpenAiTask::Chat,
            remote_model: None,
            system_prompt: None,
            temperature: None,
            max_tokens: None,
            json_output: false,
            dimensions: None,
        }
    }

    /// An embeddings model with the server's defaults.
    pub fn embeddings() -> Self {
        OpenAiModelConfig {
            task: OpenAiTask::Embeddings,
            ..Self::chat()
        }
    }
}

impl OpenAiConfig {
    /// Checks what the types cannot express and returns every problem, each naming its key.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        check_base_url(
            &self.base_url,
            "the key's variable in api_key_env",
            &mut problems,
        );
        if self.api_key_env.as_deref() == Some("") {
            problems.push(
                "api_key_env is empty; leave it out for servers without authentication".to_owned(),
            );
        }
        self.retry.validate("retry", &mut problems);
        for (name, model) in &self.models {
            let key = format!("models.{name}");
            if let Some(t) = model.temperature
                && !(0.0..=2.0).contains(&t)
            {
                problems.push(format!("{key}.temperature ({t}) must be from 0 to 2"));
            }
            if model.remote_model.as_deref() == Some("") {
                problems.push(format!("{key}.remote_model is empty"));
            }
            let chat_only = [
                ("system_prompt", model.system_prompt.is_some()),
                ("temperature", model.temperature.is_some()),
                ("max_tokens", model.max_tokens.is_some()),
                ("json_output", model.json_output),
            ];
            match model.task {
                OpenAiTask::Embeddings => {
                    for (field, set) in chat_only {
                        if set {
                            problems.push(format!(
                                "{key}.{field} applies to chat models only (task is embeddings)"
                            ));
                        }
                    }
                }
                OpenAiTask::Chat => {
                    if model.dimensions.is_some() {
                        problems.push(format!(
                            "{key}.dimensions applies to embeddings models only (task is chat)"
                        ));
                    }
                }
            }
        }
        problems
    }
}

/// An OpenAI-compatible provider. See the [module documentation](self).
pub struct OpenAiProvider {
    /// Client, key, concurrency limit and retry policy, shared by every model.
    endpoint: Endpoint,
    /// Most texts per embeddings request.
    max_embedding_inputs: usize,
    /// The models, by the name callers use.
    models: BTreeMap<String, OpenAiModelConfig>,
}

impl fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("endpoint", &self.endpoint)
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Appended to `base_url` for chat completions.
const CHAT_PATH: &str = "/chat/completions";
/// Appended to `base_url` for embeddings.
const EMBEDDINGS_PATH: &str = "/embeddings";

impl OpenAiProvider {
    /// Builds the provider, reading the API key from the variable named by `api_key_env`.
    pub fn new(config: OpenAiConfig) -> Result<Self, BuildError> {
        let api_key = secret_from_env(config.api_key_env.as_deref())?;
        Self::with_api_key(config, api_key)
    }

    /// Builds the provider with the key given here (`api_key_env` is ignored): for keys
    /// that come from somewhere other than the environment, and for tests.
    pub fn with_api_key(config: OpenAiConfig, api_key: Option<Secret>) -> Result<Self, BuildError> {
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
        Ok(OpenAiProvider {
            endpoint: Endpoint::new(settings, api_key)?,
            max_embedding_inputs: config.max_embedding_inputs.get(),
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

    /// POSTs `request` to `path` (under the retry policy) and parses a successful answer as `T`.
    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        request: &impl Serialize,
    ) -> Result<T, ProviderError> {
        let bytes = self.endpoint.post_json(path, request).await?;
        serde_json::from_slice(&bytes).map_err(|e| ProviderError::InvalidResponse {
            message: format!("the body is not the JSON the API describes: {e}"),
        })
    }

    async fn chat(
        &self,
        model_name: &str,
        model: &OpenAiModelConfig,
        input: ProviderInput,
    ) -> Result<ProviderOutput, ProviderError> {
        let settings = ChatSettings::new(model, &input.parameters)?;
        let messages = chat_messages(&input.data, settings.system_prompt.as_deref())?;
        let request = ChatRequest {
            model: model.remote_model.as_deref().unwrap_or(model_name),
            messages,
            temperature: settings.temperature,
            max_tokens: settings.max_tokens,
            response_format: settings.json_output.then_some(ResponseFormat {
                kind: "json_object",
            }),
        };
        let response: ChatResponse = self.post(CHAT_PATH, &request).await?;
        let choice =
            response
                .choices
                .into_iter()
                .next()
                .ok_or_else(|| ProviderError::InvalidResponse {
                    message: "the response has no choices".to_owned(),
                })?;
        let Some(content) = choice.message.content else {
            let message = match choice.message.refusal {
                Some(refusal) => {
                    format!("the model refused: {}", self.endpoint.sanitize(&refusal))
                }
                None => "the first choice has no message content".to_owned(),
            };
            return Err(ProviderError::InvalidResponse { message });
        };
        let content = if settings.json_output {
            serde_json::from_str(&content).map_err(|e| ProviderError::InvalidResponse {
                message: if choice.finish_reason.as_deref() == Some("length") {
                    "the JSON output was cut off at max_tokens".to_owned()
                } else {
                    format!("JSON output was asked for but the content is not JSON: {e}")
                },
            })?
        } else {
            Value::String(content)
        };
        Ok(ProviderOutput {
            output: json!({ "content": content, "finish_reason": choice.finish_reason }),
            usage: response.usage.map(Usage::into_token_usage),
            model: response.model,
        })
    }

    async fn embed(
        &self,
        model_name: &str,
        model: &OpenAiModelConfig,
        inputs: Vec<ProviderInput>,
    ) -> Vec<Result<ProviderOutput, ProviderError>> {
        let mut outcomes: Vec<Option<Result<ProviderOutput, ProviderError>>> =
            inputs.iter().map(|_| None).collect();
        // (position in the batch, text) of every input that can be sent. Invalid inputs fail
        // here, alone, instead of making the server reject the whole packed request.
        let mut texts = Vec::with_capacity(inputs.len());
        for (position, input) in inputs.into_iter().enumerate() {
            match embedding_text(input) {
                Ok(text) => texts.push((position, text)),
                Err(e) => outcomes[position] = Some(Err(e)),
            }
        }
        let remote = model.remote_model.as_deref().unwrap_or(model_name);
        let dimensions = model.dimensions.map(NonZeroU32::get);
        let chunks = texts
            .chunks(self.max_embedding_inputs)
            .map(|chunk| self.embed_chunk(remote, dimensions, chunk));
        for (chunk, results) in texts
            .chunks(self.max_embedding_inputs)
            .zip(join_all(chunks).await)
        {
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

    /// One embeddings request for `chunk`; one outcome per text, in order.
    async fn embed_chunk(
        &self,
        remote: &str,
        dimensions: Option<u32>,
        chunk: &[(usize, String)],
    ) -> Vec<Result<ProviderOutput, ProviderError>> {
        let all = |error: ProviderError| vec![Err(error); chunk.len()];
        let request = EmbeddingsRequest {
            model: remote,
            input: chunk.iter().map(|(_, text)| text.as_str()).collect(),
            dimensions,
        };
        let response: EmbeddingsResponse = match self.post(EMBEDDINGS_PATH, &request).await {
            Ok(response) => response,
            Err(e) => return all(e),
        };
        let mut vectors: Vec<Option<Value>> = vec![None; chunk.len()];
        for item in response.data {
            let Some(slot) = vectors.get_mut(item.index) else {
                return all(ProviderError::InvalidResponse {
                    message: format!(
                        "embedding index {} is out of range for {} inputs",
                        item.index,
                        chunk.len()
                    ),
                });
            };
            if slot.is_some() || !item.embedding.is_array() {
                return all(ProviderError::InvalidResponse {
                    message: format!(
                        "embedding index {} is repeated or not an array of numbers",
                        item.index
                    ),
                });
            }
            *slot = Some(item.embedding);
        }
        let weights: Vec<u64> = chunk
            .iter()
            .map(|(_, text)| text.chars().count() as u64)
            .collect();
        let usages: Vec<Option<TokenUsage>> = match response.usage.map(Usage::into_token_usage) {
            None => vec![None; chunk.len()],
            Some(usage) => {
                let prompt = apportion(usage.prompt_tokens, &weights);
                let total = apportion(usage.total_tokens, &weights);
                let completion = apportion(usage.completion_tokens, &weights);
                (0..chunk.len())
                    .map(|i| {
                        Some(TokenUsage {
                            prompt_tokens: prompt[i],
                            completion_tokens: completion[i],
                            total_tokens: total[i],
                        })
                    })
                    .collect()
            }
        };
        vectors
            .into_iter()
            .zip(usages)
            .enumerate()
            .map(|(index, (vector, usage))| match vector {
                Some(embedding) => Ok(ProviderOutput {
                    output: json!({ "embedding": embedding }),
                    usage,
                    model: response.model.clone(),
                }),
                None => Err(ProviderError::InvalidResponse {
                    message: format!("the response has no embedding for index {index}"),
                }),
            })
            .collect()
    }
}

impl Provider for OpenAiProvider {
    fn infer_batch(
        &self,
        model: &str,
        inputs: Vec<ProviderInput>,
    ) -> BoxFuture<'_, Vec<Result<ProviderOutput, ProviderError>>> {
        let model = model.to_owned();
        Box::pin(async move {
            let Some(config) = self.models.get(&model) else {
                return vec![Err(ProviderError::UnknownModel { model }); inputs.len()];
            };
            match config.task {
                OpenAiTask::Chat => {
                    join_all(
                        inputs
                            .into_iter()
                            .map(|input| self.chat(&model, config, input)),
                    )
                    .await
                }
                OpenAiTask::Embeddings => self.embed(&model, config, inputs).await,
            }
        })
    }

    /// Chat makes one request per input; embeddings pack up to `max_embedding_inputs`.
    fn api_calls(&self, model: &str, inputs: usize) -> usize {
        match self.models.get(model).map(|m| m.task) {
            Some(OpenAiTask::Embeddings) => inputs.div_ceil(self.max_embedding_inputs),
            _ => inputs,
        }
    }

    /// Retryable failures were retried under `retry` (`max_attempts`, budget, `Retry-After`).
    fn retries_itself(&self) -> bool {
        true
    }
}

/// The chat settings of one call: the model's, overridden by the request's parameters.
#[derive(Debug)]
struct ChatSettings {
    system_prompt: Option<String>,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    json_output: bool,
}

/// Parameters a chat request may set.
const CHAT_PARAMETERS: &str = "system_prompt, temperature, max_tokens, response_format";

impl ChatSettings {
    fn new(
        model: &OpenAiModelConfig,
        parameters: &Map<String, Value>,
    ) -> Result<Self, ProviderError> {
        let mut settings = ChatSettings {
            system_prompt: model.system_prompt.clone(),
            temperature: model.temperature,
            max_tokens: model.max_tokens.map(NonZeroU32::get),
            json_output: model.json_output,
        };
        let invalid = |message: String| ProviderError::InvalidInput { message };
        for (name, value) in parameters {
            match name.as_str() {
                "system_prompt" => {
                    let prompt = value.as_str().ok_or_else(|| {
                        invalid("parameters.system_prompt must be a string".to_owned())
                    })?;
                    settings.system_prompt = Some(prompt.to_owned());
                }
                "temperature" => match value.as_f64() {
                    Some(t) if (0.0..=2.0).contains(&t) => settings.temperature = Some(t),
                    _ => {
                        return Err(invalid(
                            "parameters.temperature must be a number from 0 to 2".to_owned(),
                        ));
                    }
                },
                "max_tokens" => match value.as_u64().and_then(|n| u32::try_from(n).ok()) {
                    Some(n) if n > 0 => settings.max_tokens = Some(n),
                    _ => {
                        return Err(invalid(
                            "parameters.max_tokens must be a positive integer".to_owned(),
                        ));
                    }
                },
                "response_format" => {
                    let kind = value
                        .as_str()
                        .or_else(|| value.get("type").and_then(Value::as_str));
                    settings.json_output = match kind {
                        Some("json_object") => true,
                        Some("text") => false,
                        _ => {
                            return Err(invalid(
                                "parameters.response_format must be \"text\" or \"json_object\" \
                                 (or {\"type\": …})"
                                    .to_owned(),
                            ));
                        }
                    };
                }
                other => {
                    return Err(invalid(format!(
                        "unknown parameter `{other}` for a chat model (known: {CHAT_PARAMETERS})"
                    )));
                }
            }
        }
        Ok(settings)
    }
}

/// The message list for `data`, with the system prompt first unless the conversation brings
/// its own.
fn chat_messages(data: &Value, system_prompt: Option<&str>) -> Result<Vec<Value>, ProviderError> {
    const SHAPE: &str = "data must be a string (the user message) or an object with `prompt` \
                         (a string) or `messages` (a list of {\"role\", \"content\"} objects)";
    let invalid = |message: &str| ProviderError::InvalidInput {
        message: message.to_owned(),
    };
    let mut messages = match data {
        Value::String(text) => vec![json!({ "role": "user", "content": text })],
        Value::Object(map) => {
            if map.keys().any(|k| k != "messages" && k != "prompt") {
                return Err(invalid(SHAPE));
            }
            match (map.get("messages"), map.get("prompt")) {
                (Some(Value::Array(list)), None)
                    if !list.is_empty()
                        && list
                            .iter()
                            .all(|m| m.get("role").is_some_and(Value::is_string)) =>
                {
                    list.clone()
                }
                (None, Some(Value::String(text))) => {
                    vec![json!({ "role": "user", "content": text })]
                }
                _ => return Err(invalid(SHAPE)),
            }
        }
        _ => return Err(invalid(SHAPE)),
    };
    if let Some(prompt) = system_prompt {
        let has_own = messages
            .first()
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
            == Some("system");
        if !has_own {
            messages.insert(0, json!({ "role": "system", "content": prompt }));
        }
    }
    Ok(messages)
}

/// The text to embed: `data` as a string, or its `text` field.
fn embedding_text(input: ProviderInput) -> Result<String, ProviderError> {
    if let Some(name) = input.parameters.keys().next() {
        return Err(ProviderError::InvalidInput {
            message: format!("unknown parameter `{name}`: embeddings models take none"),
        });
    }
    let text = match input.data {
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
            message: "the text to embed is empty".to_owned(),
        }),
        None => Err(ProviderError::InvalidInput {
            message: "data must be a string or an object with one field, `text` (a string)"
                .to_owned(),
        }),
    }
}

/// The endpoint's error format: what the provider said in a JSON error response.
fn read_error(value: &Value, _status: reqwest::StatusCode) -> ErrorReport {
    ErrorReport {
        message: provider_message(value),
        wait: None,
    }
}

/// OpenAI's `{"error": {"message", "type", "code"}}`, the `{"error": "…"}` or
/// `{"message": "…"}` some compatible servers send, or else the JSON itself. Not yet redacted
/// or truncated.
fn provider_message(value: &Value) -> String {
    let error = value.get("error");
    let detail = error.filter(|e| e.is_object()).unwrap_or(value);
    let message = detail
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| error.and_then(Value::as_str));
    let Some(message) = message else {
        return value.to_string();
    };
    let label = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let tags: Vec<String> = ["type", "code"]
        .iter()
        .filter_map(|k| detail.get(*k).and_then(label))
        .collect();
    if tags.is_empty() {
        message.to_owned()
    } else {
        format!("{message} [{}]", tags.join(", "))
    }
}

/// Splits `total` in proportion to `weights` (equally when they are all zero) so that the
/// shares add up to `total` exactly: each gets its floor, and the remainder goes one by one to
/// the largest fractional parts.
fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    if weights.is_empty() {
        return Vec::new();
    }
    let ones = vec![1; weights.len()];
    let weights = if weights.iter().all(|&w| w == 0) {
        &ones
    } else {
        weights
    };
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let total_wide = u128::from(total);
    let mut shares: Vec<u64> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(weights.len());
    for (i, &w) in weights.iter().enumerate() {
        let product = total_wide * u128::from(w);
        shares.push(u64::try_from(product / sum).unwrap_or(u64::MAX));
        remainders.push((product % sum, i));
    }
    let given: u64 = shares.iter().sum();
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take((total - given) as usize) {
        shares[i] += 1;
    }
    shares
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<ResponseFormat>,
}

#[derive(Serialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct EmbeddingsRequest<'a> {
    model: &'a str,
    input: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
}

#[derive(Deserialize)]
struct ChatResponse {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<ChatChoice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChatChoice {
    message: ChatMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(Deserialize)]
struct EmbeddingsResponse {
    data: Vec<EmbeddingItem>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct EmbeddingItem {
    index: usize,
    embedding: Value,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
}

impl Usage {
    fn into_token_usage(self) -> TokenUsage {
        let completion = self.completion_tokens.unwrap_or(0);
        TokenUsage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion,
            total_tokens: self.total_tokens.unwrap_or(self.prompt_tokens + completion),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apportion_adds_up_and_follows_the_weights() {
        assert_eq!(apportion(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(apportion(9, &[1, 2, 0]), vec![3, 6, 0]);
        assert_eq!(apportion(5, &[0, 0]), vec![3, 2]);
        assert_eq!(apportion(0, &[3, 4]), vec![0, 0]);
        assert!(apportion(7, &[]).is_empty());
        let shares = apportion(1_000, &[13, 7, 29, 1, 50]);
        assert_eq!(shares.iter().sum::<u64>(), 1_000);
    }

    #[test]
    fn chat_inputs_take_three_shapes() {
        let user = |t: &str| json!({"role": "user", "content": t});
        assert_eq!(chat_messages(&json!("hi"), None).unwrap(), vec![user("hi")]);
        assert_eq!(
            chat_messages(&json!({"prompt": "hi"}), Some("be brief")).unwrap(),
            vec![json!({"role": "system", "content": "be brief"}), user("hi")]
        );
        let own = json!({"messages": [{"role": "system", "content": "mine"}, user("hi")]});
        assert_eq!(
            chat_messages(&own, Some("be brief")).unwrap().len(),
            2,
            "the conversation's own system message wins"
        );
        for bad in [
            json!(1),
            json!({"prompt": 1}),
            json!({"messages": []}),
            json!({"messages": [{"content": "no role"}]}),
            json!({"prompt": "a", "messages": [user("b")]}),
            json!({"prompt": "a", "extra": true}),
        ] {
            let e = chat_messages(&bad, None).unwrap_err();
            assert_eq!(e.kind(), crate::model::ErrorKind::InvalidRequest, "{bad}");
        }
    }

    #[test]
    fn chat_parameters_override_the_model_and_are_checked() {
        let model = OpenAiModelConfig {
            temperature: Some(0.2),
            ..OpenAiModelConfig::chat()
        };
        let params = |v: Value| v.as_object().unwrap().clone();
        let s = ChatSettings::new(
            &model,
            &params(json!({"temperature": 1.5, "max_tokens": 7, "response_format": {"type": "json_object"}})),
        )
        .unwrap();
        assert_eq!(
            (s.temperature, s.max_tokens, s.json_output),
            (Some(1.5), Some(7), true)
        );
        for bad in [
            json!({"temperature": 3}),
            json!({"max_tokens": 0}),
            json!({"response_format": "yaml"}),
            json!({"top_k": 5}),
        ] {
            assert!(
                ChatSettings::new(&model, &params(bad.clone())).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn provider_messages_are_found_in_every_error_format() {
        let status = reqwest::StatusCode::TOO_MANY_REQUESTS;
        let message = |body: Value| {
            let report = read_error(&body, status);
            assert_eq!(report.wait, None, "{body}");
            report.message
        };
        let openai = json!({"error": {"message": "Slow down", "type": "requests", "param": null,
            "code": "rate_limit_exceeded"}});
        assert_eq!(message(openai), "Slow down [requests, rate_limit_exceeded]");
        assert_eq!(
            message(json!({"error": "model not found"})),
            "model not found"
        );
        assert_eq!(
            message(
                json!({"object": "error", "message": "bad", "type": "BadRequestError",
                "code": 400})
            ),
            "bad [BadRequestError, 400]"
        );
        assert_eq!(message(json!({"detail": "x"})), r#"{"detail":"x"}"#);
    }

    #[test]
    fn config_problems_are_all_reported() {
        let mut config = OpenAiConfig {
            base_url: "ftp://user:pw@host/v1?x=1".into(),
            api_key_env: Some(String::new()),
            ..OpenAiConfig::default()
        };
        config.models.insert(
            "emb".into(),
            OpenAiModelConfig {
                temperature: Some(5.0),
                ..OpenAiModelConfig::embeddings()
            },
        );
        let problems = config.validate();
        assert_eq!(problems.len(), 6, "{problems:#?}");
        assert!(
            problems.contains(
                &"base_url must not contain credentials; name the key's variable in api_key_env"
                    .to_owned()
            ),
            "{problems:#?}"
        );
        assert!(OpenAiConfig::default().validate().is_empty());
    }

    #[test]
    fn config_deserialises_strictly() {
        let config: OpenAiConfig = serde_json::from_value(json!({
            "base_url": "http://localhost:8000/v1",
            "models": {"chat": {"task": "chat", "json_output": true}}
        }))
        .unwrap();
        assert_eq!(config.models["chat"].task, OpenAiTask::Chat);
        assert_eq!(config.retry, RetryConfig::default());
        let typo = serde_json::from_value::<OpenAiConfig>(json!({"base_ulr": "x"}));
        assert!(typo.unwrap_err().to_string().contains("unknown field"));
    }
}
