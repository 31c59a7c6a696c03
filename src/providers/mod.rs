//! Model providers: what answers a model call, behind the [`Provider`] trait.
//!
//! A provider takes the inputs of one batch for one model and returns one outcome per input, in
//! order. Remote providers (`openai`, `huggingface`) each own one HTTP endpoint (`endpoint.rs`:
//! the client, credential, concurrency limit, retries ([`retry`]) and the classification of
//! HTTP failures), with their own request and error formats on top; the [`local`] provider
//! runs ONNX models (tract) and the VADER sentiment analyser ([`vader`]) in-process. Failures
//! are outcomes carrying a [`ProviderError`], which maps to the wire's [`ErrorKind`]. Nothing
//! here knows about Kafka, and the model registry, rate limits ([`ratelimit`]), circuit
//! breaking ([`breaker`]) and the result cache ([`cache`]) sit in front of this trait, not
//! inside it. The model registry is
//! [`manager::ModelManager`]: versioned models, usage stats, idle unload, an executor.
//!
//! A custom provider only needs [`Provider::infer_batch`]:
//!
//! ```
//! use futures::future::BoxFuture;
//! use inferflow::providers::{Provider, ProviderError, ProviderInput, ProviderOutput};
//!
//! /// Answers every input with its length in characters, when it is a string.
//! struct Length;
//!
//! impl Provider for Length {
//!     fn infer_batch(
//!         &self,
//!         _model: &str,
//!         inputs: Vec<ProviderInput>,
//!     ) -> BoxFuture<'_, Vec<Result<ProviderOutput, ProviderError>>> {
//!         Box::pin(async move {
//!             inputs
//!                 .into_iter()
//!                 .map(|input| match input.data.as_str() {
//!                     Some(s) => Ok(ProviderOutput::new(s.chars().count().into())),
//!                     None => Err(ProviderError::InvalidInput {
//!                         message: "data must be a string".into(),
//!                     }),
//!                 })
//!                 .collect()
//!         })
//!     }
//! }
//! ```

pub mod breaker;
pub mod build;
pub mod cache;
mod config;
mod endpoint;
pub mod huggingface;
pub(crate) mod lane;
pub mod local;
pub mod manager;
pub mod openai;
pub mod ratelimit;
pub mod retry;
pub mod vader;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::{ErrorBody, ErrorKind};

pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker};
pub use config::{
    ModelSection, ModelsConfig, MonitorSection, ProviderSection, ProvidersConfig, RouteSection,
    RoutesConfig, ShadowSection,
};
pub(crate) use config::{check_models_against_providers, check_routes_against_models};
pub use local::{LocalConfig, LocalModelConfig, LocalModelKind, LocalProvider};
pub use openai::{OpenAiConfig, OpenAiModelConfig, OpenAiProvider, OpenAiTask};
pub use ratelimit::{RateLimitConfig, RateLimiter};
pub use retry::{RetryBudget, RetryConfig, RetryPolicy, RetryStats};

/// Answers model calls. Implementations return exactly one outcome per input, in the order
/// given, and never panic: failures are outcomes. Used as `Arc<dyn Provider>`.
pub trait Provider: Send + Sync + 'static {
    /// Runs `inputs` through `model`. Providers that can answer many inputs with one call
    /// (embeddings, local models) should; the others may run the inputs concurrently.
    fn infer_batch(
        &self,
        model: &str,
        inputs: Vec<ProviderInput>,
    ) -> BoxFuture<'_, Vec<Result<ProviderOutput, ProviderError>>>;

    /// How many requests to the provider's API one [`infer_batch`](Self::infer_batch) of
    /// `inputs` inputs makes, for the requests-per-minute limit. The default, one per input,
    /// suits providers that call once per input; providers that pack inputs (embeddings)
    /// should say how many calls they pack them into.
    fn api_calls(&self, model: &str, inputs: usize) -> usize {
        let _ = model;
        inputs
    }

    /// Whether the provider retries its [retryable](ProviderError::retryable) failures itself,
    /// under its own attempt limit (the remote providers' `retry` policy). Such a provider owns
    /// the attempt count of a model call: an error it returns has had every attempt it is
    /// going to get, and callers do not try again (a pipeline step's `retries` leave it alone).
    /// The default, false, suits providers without retries; callers may retry their retryable
    /// errors.
    fn retries_itself(&self) -> bool {
        false
    }

    /// Makes `model` ready to answer (reads and optimises a local model, for instance), so
    /// the first request does not pay for it. The default does nothing: remote models need no
    /// loading.
    fn load_model(&self, model: &str) -> BoxFuture<'_, Result<(), ProviderError>> {
        let _ = model;
        Box::pin(async { Ok(()) })
    }

    /// Frees what [`load_model`](Self::load_model) took; the next call loads the model again.
    /// Returns true when something was freed. The default frees nothing.
    fn unload_model(&self, model: &str) -> bool {
        let _ = model;
        false
    }
}

impl<P: Provider + ?Sized> Provider for Arc<P> {
    fn infer_batch(
        &self,
        model: &str,
        inputs: Vec<ProviderInput>,
    ) -> BoxFuture<'_, Vec<Result<ProviderOutput, ProviderError>>> {
        (**self).infer_batch(model, inputs)
    }

    fn api_calls(&self, model: &str, inputs: usize) -> usize {
        (**self).api_calls(model, inputs)
    }

    fn retries_itself(&self) -> bool {
        (**self).retries_itself()
    }

    fn load_model(&self, model: &str) -> BoxFuture<'_, Result<(), ProviderError>> {
        (**self).load_model(model)
    }

    fn unload_model(&self, model: &str) -> bool {
        (**self).unload_model(model)
    }
}

/// Tokens an input will probably cost, before the call: a quarter of the characters of every
/// string in its `data` (about four characters a token for English text), plus a small
/// per-message overhead, plus the `max_tokens` parameter when the request sets one. The rate
/// limiter charges this before the call and corrects it by the usage the provider reports.
pub fn estimate_tokens(input: &ProviderInput) -> u64 {
    fn chars(value: &Value) -> u64 {
        match value {
            Value::String(s) => s.chars().count() as u64,
            Value::Array(items) => items.iter().map(chars).sum(),
            Value::Object(map) => map.values().map(chars).sum(),
            _ => 0,
        }
    }
    let completion = input
        .parameters
        .get("max_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    chars(&input.data).div_ceil(4) + 4 + completion
}

/// One input to a model call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProviderInput {
    /// The request's `data`. What shapes a model accepts is up to its provider.
    pub data: Value,
    /// The request's `parameters` (empty when it had none). Providers reject the ones they do
    /// not know, so a typo fails loudly instead of being ignored.
    pub parameters: Map<String, Value>,
}

impl ProviderInput {
    /// An input without parameters.
    pub fn new(data: Value) -> Self {
        ProviderInput {
            data,
            parameters: Map::new(),
        }
    }

    /// An input with parameters (`None` is the same as none).
    pub fn with_parameters(data: Value, parameters: Option<Map<String, Value>>) -> Self {
        ProviderInput {
            data,
            parameters: parameters.unwrap_or_default(),
        }
    }
}

/// One successful answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderOutput {
    /// The output document.
    pub output: Value,
    /// Tokens the call consumed, when the provider reports them. For inputs answered together
    /// in one call (embeddings), the call's usage is shared out among them in proportion to
    /// their length, so the shares add up to what the provider reported.
    pub usage: Option<TokenUsage>,
    /// The model the provider says answered (often more specific than the name asked for,
    /// e.g. a dated snapshot), when it says.
    pub model: Option<String>,
}

impl ProviderOutput {
    /// An output without usage or model information.
    pub fn new(output: Value) -> Self {
        ProviderOutput {
            output,
            usage: None,
            model: None,
        }
    }
}

/// Token counts of one call, as OpenAI-compatible APIs report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenUsage {
    /// Tokens in the input.
    pub prompt_tokens: u64,
    /// Tokens generated (zero for embeddings).
    pub completion_tokens: u64,
    /// Tokens billed in all.
    pub total_tokens: u64,
}

/// Why a model call failed. Messages name the HTTP status and quote (truncated) what the
/// provider said; they never contain credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The input cannot be sent to this model: its `data` has the wrong shape or a parameter
    /// is unknown or out of range. Fix the request; retrying cannot help.
    #[error("invalid input: {message}")]
    InvalidInput {
        /// What is wrong with the input.
        message: String,
    },
    /// The provider has no model by this name in its configuration.
    #[error("no model `{model}` in this provider's configuration")]
    UnknownModel {
        /// The name asked for.
        model: String,
    },
    /// The provider refused the credentials (HTTP 401 or 403): check the API key and its
    /// permissions. Not retried.
    #[error("provider refused the credentials (HTTP {status}): {message}; check the API key")]
    Unauthorized {
        /// HTTP status.
        status: u16,
        /// What the provider said.
        message: String,
    },
    /// The provider rejected the request (a 4xx status other than 401, 403, 408, 409 and 429):
    /// usually a wrong model name, a parameter out of range or an input that is too long. Not
    /// retried.
    #[error("provider rejected the request (HTTP {status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// What the provider said.
        message: String,
    },
    /// The provider is rate limiting us (HTTP 429). Retried, waiting at least `retry_after`.
    #[error("provider is rate limiting (HTTP 429): {message}")]
    RateLimited {
        /// What the provider said.
        message: String,
        /// How long the provider asked us to wait (`Retry-After`), if it said.
        retry_after: Option<Duration>,
    },
    /// The provider failed or is overloaded (HTTP 408, 409 or 5xx). Retried.
    #[error("provider failed (HTTP {status}): {message}")]
    Unavailable {
        /// HTTP status.
        status: u16,
        /// What the provider said.
        message: String,
        /// How long the provider asked us to wait (`Retry-After`), if it said.
        retry_after: Option<Duration>,
    },
    /// No complete answer within the request timeout. Retried.
    #[error("provider did not answer within {} ms", after.as_millis())]
    Timeout {
        /// The request timeout that expired.
        after: Duration,
    },
    /// The connection could not be made or broke before the answer was complete (refused,
    /// reset, closed early, TLS failure). Retried: check the base URL and the network if it
    /// persists.
    #[error("could not reach the provider: {message}")]
    Connection {
        /// The transport's description of the failure.
        message: String,
    },
    /// The provider answered with success but the body is not what its API promises (not JSON,
    /// fields missing, output not valid JSON when JSON was asked for). Not retried.
    #[error("provider sent an unexpected response: {message}")]
    InvalidResponse {
        /// What is wrong with the response.
        message: String,
    },
    /// A local model could not be loaded or failed while running. Not retried.
    #[error("local model failed: {message}")]
    LocalModel {
        /// What went wrong.
        message: String,
    },
}

impl ProviderError {
    /// Classifies an HTTP error status (anything but 2xx). `message` is what the provider said,
    /// already truncated and free of credentials.
    pub fn from_status(status: u16, message: String, retry_after: Option<Duration>) -> Self {
        match status {
            401 | 403 => ProviderError::Unauthorized { status, message },
            429 => ProviderError::RateLimited {
                message,
                retry_after,
            },
            408 | 409 | 500..=599 => ProviderError::Unavailable {
                status,
                message,
                retry_after,
            },
            _ => ProviderError::Rejected { status, message },
        }
    }

    /// The wire classification: `invalid_request`, `unknown_model`, `rate_limited`,
    /// `provider_timeout` or `provider_error`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProviderError::InvalidInput { .. } => ErrorKind::InvalidRequest,
            ProviderError::UnknownModel { .. } => ErrorKind::UnknownModel,
            ProviderError::RateLimited { .. } => ErrorKind::RateLimited,
            ProviderError::Timeout { .. } => ErrorKind::ProviderTimeout,
            ProviderError::Unauthorized { .. }
            | ProviderError::Rejected { .. }
            | ProviderError::Unavailable { .. }
            | ProviderError::Connection { .. }
            | ProviderError::InvalidResponse { .. }
            | ProviderError::LocalModel { .. } => ErrorKind::ProviderError,
        }
    }

    /// A short, stable name of the variant, for metric labels: `invalid_input`,
    /// `unknown_model`, `unauthorized`, `rejected`, `rate_limited`, `unavailable`, `timeout`,
    /// `connection`, `invalid_response` or `local_model`.
    pub fn label(&self) -> &'static str {
        match self {
            ProviderError::InvalidInput { .. } => "invalid_input",
            ProviderError::UnknownModel { .. } => "unknown_model",
            ProviderError::Unauthorized { .. } => "unauthorized",
            ProviderError::Rejected { .. } => "rejected",
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::Unavailable { .. } => "unavailable",
            ProviderError::Timeout { .. } => "timeout",
            ProviderError::Connection { .. } => "connection",
            ProviderError::InvalidResponse { .. } => "invalid_response",
            ProviderError::LocalModel { .. } => "local_model",
        }
    }

    /// True when trying the same call again may succeed: rate limits, 408, 409, 5xx, timeouts
    /// and connection failures.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited { .. }
                | ProviderError::Unavailable { .. }
                | ProviderError::Timeout { .. }
                | ProviderError::Connection { .. }
        )
    }

    /// How long the provider asked us to wait before trying again, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. }
            | ProviderError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The error as it goes on the wire.
    pub fn to_error_body(&self) -> ErrorBody {
        ErrorBody::new(self.kind(), self.to_string())
    }
}

impl From<ProviderError> for ErrorBody {
    fn from(error: ProviderError) -> Self {
        error.to_error_body()
    }
}

/// Why a provider could not be built from its configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The environment variable named by `api_key_env` is not set, is empty or is not UTF-8.
    #[error("environment variable `{env}` (named by api_key_env) is not set or empty")]
    MissingApiKey {
        /// The variable's name.
        env: String,
    },
    /// The API key contains characters an HTTP header cannot carry (a stray newline, say).
    #[error("the API key contains characters not allowed in an HTTP header")]
    InvalidApiKey,
    /// Configuration values that are out of range; every problem is listed.
    #[error("invalid provider configuration: {}", problems.join("; "))]
    InvalidConfig {
        /// One entry per problem, each naming its key.
        problems: Vec<String>,
    },
    /// The HTTP client could not be created (for instance, the TLS backend failed to load).
    #[error("could not build the HTTP client: {message}")]
    Client {
        /// The HTTP library's description.
        message: String,
    },
}

/// Longest provider message, in characters, kept in an error.
pub(crate) const MAX_MESSAGE_CHARS: usize = 300;

/// Makes provider-supplied text fit for an error message: every occurrence of `secret` is
/// replaced by a mask *before* truncating to [`MAX_MESSAGE_CHARS`], so no cut can leave part of
/// the secret behind. Providers echo credentials back more often than one would hope.
pub(crate) fn sanitize_message(text: &str, secret: Option<&str>) -> String {
    let text = text.trim();
    let cleaned = match secret {
        Some(secret) if !secret.is_empty() && text.contains(secret) => {
            text.replace(secret, crate::secret::REDACTED)
        }
        _ => text.to_owned(),
    };
    match cleaned.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &cleaned[..cut]),
        None => cleaned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_and_mapped_to_kinds() {
        let cases = [
            (400, ErrorKind::ProviderError, false),
            (401, ErrorKind::ProviderError, false),
            (403, ErrorKind::ProviderError, false),
            (404, ErrorKind::ProviderError, false),
            (408, ErrorKind::ProviderError, true),
            (409, ErrorKind::ProviderError, true),
            (422, ErrorKind::ProviderError, false),
            (429, ErrorKind::RateLimited, true),
            (500, ErrorKind::ProviderError, true),
            (503, ErrorKind::ProviderError, true),
        ];
        for (status, kind, retryable) in cases {
            let e = ProviderError::from_status(status, "m".into(), None);
            assert_eq!(e.kind(), kind, "{status}");
            assert_eq!(e.retryable(), retryable, "{status}");
        }
        let timeout = ProviderError::Timeout {
            after: Duration::from_millis(1500),
        };
        assert_eq!(timeout.kind(), ErrorKind::ProviderTimeout);
        assert!(timeout.retryable());
        assert_eq!(
            timeout.to_string(),
            "provider did not answer within 1500 ms"
        );
        let invalid = ProviderError::InvalidInput {
            message: "x".into(),
        };
        assert_eq!(invalid.to_error_body().kind, ErrorKind::InvalidRequest);
        assert!(!invalid.retryable());
        let wait = Some(Duration::from_secs(2));
        assert_eq!(
            ProviderError::from_status(429, String::new(), wait).retry_after(),
            wait
        );
    }

    #[test]
    fn token_estimates_count_every_string_and_max_tokens() {
        use serde_json::json;
        // 16 characters: 4 tokens, plus the overhead of 4.
        assert_eq!(
            estimate_tokens(&ProviderInput::new(json!("abcdefghijklmnop"))),
            8
        );
        let nested = json!({"messages": [{"role": "user", "content": "hello"}], "n": 3});
        // "user" + "hello" = 9 characters: 3 tokens; numbers do not count.
        assert_eq!(estimate_tokens(&ProviderInput::new(nested)), 7);
        let with_max = ProviderInput::with_parameters(
            json!("hi"),
            json!({"max_tokens": 100}).as_object().cloned(),
        );
        assert_eq!(estimate_tokens(&with_max), 105);
    }

    #[test]
    fn sanitize_redacts_before_truncating() {
        let key = "sk-0123456789";
        assert_eq!(
            sanitize_message(" bad key sk-0123456789 given ", Some(key)),
            "bad key <redacted> given"
        );
        // The key straddles the truncation point: redaction happens first, so no prefix of
        // it survives.
        let long = format!("{}{key}", "x".repeat(MAX_MESSAGE_CHARS - 4));
        let out = sanitize_message(&long, Some(key));
        assert!(!out.contains("sk-0"), "{out}");
        assert_eq!(out.chars().count(), MAX_MESSAGE_CHARS + 1);
        // Multi-byte characters are cut on a character boundary.
        let out = sanitize_message(&"é".repeat(MAX_MESSAGE_CHARS + 10), None);
        assert_eq!(out.chars().count(), MAX_MESSAGE_CHARS + 1);
    }
}
