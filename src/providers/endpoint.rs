//! The HTTP endpoint of a remote provider: what the OpenAI-compatible and the Hugging Face
//! providers share below their request shapes, response parsing and error-body formats.
//!
//! An [`Endpoint`] owns
//!
//! - one pooled `reqwest` client, built once, with a connect timeout, a per-attempt timeout (to
//!   the end of the response body), up to `max_concurrency` idle connections kept for 90 s, and
//!   `inferflow/<version>` as its user agent;
//! - the base URL, without a trailing slash, to which each call appends its path;
//! - the credential, if any: a [`Secret`] sent as `Authorization: Bearer …` in a header marked
//!   sensitive (so `Debug` of a request masks it), also used to redact provider messages that
//!   quote it back;
//! - a semaphore of `max_concurrency` permits, one per HTTP request in flight, held for one
//!   attempt until its body has been read, not across retry sleeps (waiting calls hold no
//!   capacity); calls of a route's shadow versions take another `max_concurrency` of their own
//!   ([`lane`](super::lane)), so a shadow never holds a permit the request path waits for;
//! - the provider's [`RetryPolicy`], whose attempt limit, backoff and budget every call shares.
//!
//! With tracing on, every attempt carries `traceparent` (and `tracestate`) naming the model
//! call's span, the current OpenTelemetry context's ([`crate::tracing_otel::current_headers`]).
//!
//! [`Endpoint::post_json`] sends a request as JSON, serialised once into [`Bytes`] that every
//! attempt shares, under the retry policy, and returns a successful response's body for the
//! provider to parse. A failed attempt becomes a [`ProviderError`]:
//!
//! - an error status is classified by [`ProviderError::from_status`]: 401 and 403
//!   `Unauthorized`, 429 `RateLimited`, 408, 409 and 5xx `Unavailable` (these two retried),
//!   other 4xx `Rejected`. At most [`MAX_ERROR_BODY_BYTES`] of its body are read (the rest is
//!   never waited for), and the provider's [`ErrorFormat`] finds the message in it when it is
//!   JSON; otherwise the message is the body's text, or the status's reason when the body is
//!   empty. The message is redacted and truncated ([`sanitize_message`]). The wait it carries
//!   is the response's `retry-after-ms` or `Retry-After` (delay-seconds or an HTTP-date), else
//!   a wait the body asks for (Hugging Face's `estimated_time` while a model loads) capped at
//!   the policy's `max_retry_after_ms`, so that such a wait is waited out rather than refused;
//! - a transport failure is a `Timeout` (naming the connect timeout or the per-attempt one) or
//!   a `Connection` error, described with its causes but without the URL.

use std::fmt;
use std::num::{NonZeroU64, NonZeroUsize};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::Serialize;
use serde_json::Value;

use super::lane::Permits;
use super::retry::{RetryConfig, RetryPolicy, parse_retry_after};
use super::{BuildError, ProviderError, sanitize_message};
use crate::secret::Secret;

/// Most bytes of an error response body read to find the provider's message.
pub(crate) const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// What a provider's error body says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ErrorReport {
    /// The message, not yet redacted or truncated.
    pub(crate) message: String,
    /// A wait the body asks for, used when the response has no `Retry-After`; capped at the
    /// retry policy's `max_retry_after_ms`.
    pub(crate) wait: Option<Duration>,
}

/// Reads a provider's error body once it has been parsed as JSON, with the response's status.
pub(crate) type ErrorFormat = fn(&Value, StatusCode) -> ErrorReport;

/// What an [`Endpoint`] is built from: the HTTP keys every remote provider has, and its error
/// format.
pub(crate) struct EndpointSettings<'a> {
    /// API root; a trailing slash is dropped.
    pub(crate) base_url: &'a str,
    /// Longest time to open a connection.
    pub(crate) connect_timeout_ms: NonZeroU64,
    /// Longest time for one attempt, to the end of the response body.
    pub(crate) timeout_ms: NonZeroU64,
    /// HTTP requests in flight at once.
    pub(crate) max_concurrency: NonZeroUsize,
    /// Retries, backoff and the retry budget.
    pub(crate) retry: RetryConfig,
    /// How the provider says what went wrong.
    pub(crate) error_format: ErrorFormat,
}

/// The key or token and the header that carries it.
struct Credential {
    /// Used only to build `header` and to redact provider messages that quote it.
    secret: Secret,
    /// `Bearer <secret>`, marked sensitive.
    header: HeaderValue,
}

/// One remote provider's HTTP endpoint. See the [module documentation](self).
pub(crate) struct Endpoint {
    /// The one pooled client; connections are reused across calls and models.
    client: reqwest::Client,
    /// API root, without a trailing slash.
    base_url: String,
    credential: Option<Credential>,
    /// The per-attempt timeout, reported in [`ProviderError::Timeout`].
    timeout: Duration,
    /// The connect timeout, reported when connecting is what timed out.
    connect_timeout: Duration,
    /// One permit per HTTP request in flight, per lane.
    permits: Permits,
    /// Kept for `Debug` only.
    max_concurrency: usize,
    /// Attempts, backoff and the budget shared by every call.
    retry: RetryPolicy,
    error_format: ErrorFormat,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("base_url", &self.base_url)
            .field("credential", &self.credential.as_ref().map(|c| &c.secret))
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_concurrency", &self.max_concurrency)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Builds the client. `secret`, when given, is sent as a bearer credential; an empty one,
    /// or one a header cannot carry, is [`BuildError::InvalidApiKey`] (which does not quote
    /// it).
    pub(crate) fn new(
        settings: EndpointSettings<'_>,
        secret: Option<Secret>,
    ) -> Result<Self, BuildError> {
        let credential = match secret {
            None => None,
            Some(secret) if secret.is_empty() => return Err(BuildError::InvalidApiKey),
            Some(secret) => {
                let mut header = HeaderValue::from_str(&format!("Bearer {}", secret.expose()))
                    .map_err(|_| BuildError::InvalidApiKey)?;
                header.set_sensitive(true);
                Some(Credential { secret, header })
            }
        };
        let timeout = Duration::from_millis(settings.timeout_ms.get());
        let connect_timeout = Duration::from_millis(settings.connect_timeout_ms.get());
        let max_concurrency = settings.max_concurrency.get();
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .pool_max_idle_per_host(max_concurrency)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("inferflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BuildError::Client {
                message: e.without_url().to_string(),
            })?;
        Ok(Endpoint {
            client,
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            credential,
            timeout,
            connect_timeout,
            permits: Permits::new(max_concurrency, max_concurrency),
            max_concurrency,
            retry: RetryPolicy::new(settings.retry),
            error_format: settings.error_format,
        })
    }

    /// The retry policy, whose budget and counters every call shares.
    pub(crate) fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// `text` from the provider, fit for an error message: the credential masked, truncated.
    pub(crate) fn sanitize(&self, text: &str) -> String {
        sanitize_message(text, self.secret())
    }

    fn secret(&self) -> Option<&str> {
        self.credential.as_ref().map(|c| c.secret.expose())
    }

    /// POSTs `request` as JSON to `{base_url}{path}` under the retry policy and returns the
    /// body of the successful answer. The request is serialised once, before the first attempt.
    pub(crate) async fn post_json(
        &self,
        path: &str,
        request: &impl Serialize,
    ) -> Result<Bytes, ProviderError> {
        self.post(path, json_body(request)?).await
    }

    /// POSTs `body` (JSON) to `{base_url}{path}` under the retry policy and returns the body of
    /// the successful answer. Every attempt sends the same bytes, without copying them.
    async fn post(&self, path: &str, body: Bytes) -> Result<Bytes, ProviderError> {
        let url = format!("{}{path}", self.base_url);
        self.retry
            .run(|_attempt| self.attempt(&url, body.clone()))
            .await
    }

    /// One HTTP request, holding a concurrency permit until its body has been read.
    async fn attempt(&self, url: &str, body: Bytes) -> Result<Bytes, ProviderError> {
        let _permit =
            self.permits
                .current()
                .acquire()
                .await
                .map_err(|_| ProviderError::Connection {
                    message: "the provider has been shut down".to_owned(),
                })?;
        let mut request = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(credential) = &self.credential {
            request = request.header(AUTHORIZATION, credential.header.clone());
        }
        // The model call this request belongs to, as its parent (tracing on only).
        if let Some(trace) = crate::tracing_otel::current_headers() {
            request = request.header(crate::tracing_otel::TRACEPARENT, trace.traceparent);
            if let Some(state) = trace.tracestate {
                request = request.header(crate::tracing_otel::TRACESTATE, state);
            }
        }
        let mut response = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        if status.is_success() {
            return response.bytes().await.map_err(|e| self.transport_error(e));
        }
        let header_wait = parse_retry_after(response.headers(), SystemTime::now());
        let body = read_capped(&mut response).await;
        let report = error_report(&body, status, self.error_format);
        let max_wait = Duration::from_millis(self.retry.config().max_retry_after_ms);
        let retry_after = header_wait.or_else(|| report.wait.map(|wait| wait.min(max_wait)));
        tracing::debug!(status = status.as_u16(), "provider answered with an error");
        Err(ProviderError::from_status(
            status.as_u16(),
            self.sanitize(&report.message),
            retry_after,
        ))
    }

    /// Classifies a transport failure (no HTTP status): a timeout, after the connect timeout or
    /// the per-attempt one depending on the phase, or a connection error described with its
    /// causes but without the URL, and with the credential masked.
    fn transport_error(&self, error: reqwest::Error) -> ProviderError {
        use std::error::Error as _;
        if error.is_timeout() {
            let after = if error.is_connect() {
                self.connect_timeout
            } else {
                self.timeout
            };
            return ProviderError::Timeout { after };
        }
        let error = error.without_url();
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        ProviderError::Connection {
            message: self.sanitize(&text),
        }
    }
}

/// The start of an error body: what arrives before the end, a transport error or
/// [`MAX_ERROR_BODY_BYTES`], whichever comes first. Enough to find the message; a server that
/// sends more, or stalls after the first bytes, is not waited for.
async fn read_capped(response: &mut reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ERROR_BODY_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ERROR_BODY_BYTES {
            break;
        }
    }
    body
}

/// What an error body says: read by `format` when it is JSON; otherwise its text, or the
/// status's reason when it is blank.
fn error_report(body: &[u8], status: StatusCode, format: ErrorFormat) -> ErrorReport {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        return format(&value, status);
    }
    let text = String::from_utf8_lossy(body);
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text.into_owned()
    };
    ErrorReport {
        message,
        wait: None,
    }
}

/// `request` as a JSON body, serialised once for every attempt.
fn json_body(request: &impl Serialize) -> Result<Bytes, ProviderError> {
    serde_json::to_vec(request)
        .map(Bytes::from)
        .map_err(|e| ProviderError::InvalidInput {
            message: format!("the request cannot be encoded: {e}"),
        })
}

/// The secret in the environment variable named by the provider's `key` (`api_key_env`,
/// `token_env`), read once when the provider is built: `None` when no variable is named, an
/// error naming the variable when it is unset, empty or not UTF-8.
pub(crate) fn secret_from_env(env: Option<&str>) -> Result<Option<Secret>, BuildError> {
    match env {
        Some(env) if !env.is_empty() => read_secret(env, |name| std::env::var(name).ok()).map(Some),
        _ => Ok(None),
    }
}

/// Reads the secret from the variable `env` through `lookup`.
fn read_secret(
    env: &str,
    lookup: impl FnOnce(&str) -> Option<String>,
) -> Result<Secret, BuildError> {
    match lookup(env) {
        Some(secret) if !secret.is_empty() => Ok(Secret::new(secret)),
        _ => Err(BuildError::MissingApiKey {
            env: env.to_owned(),
        }),
    }
}

/// Checks `base_url`, pushing every problem: it must be an http(s) URL without a query, a
/// fragment or credentials (those belong in the variable named by `secret_key`, e.g.
/// `"the key's variable in api_key_env"`).
pub(crate) fn check_base_url(base_url: &str, secret_key: &str, problems: &mut Vec<String>) {
    let url = match reqwest::Url::parse(base_url) {
        Ok(url) => url,
        Err(e) => {
            problems.push(format!("base_url is not a valid URL: {e}"));
            return;
        }
    };
    if !matches!(url.scheme(), "http" | "https") {
        problems.push("base_url must start with http:// or https://".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        problems.push(format!(
            "base_url must not contain credentials; name {secret_key}"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        problems.push("base_url must not have a query or a fragment".to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unused(_: &Value, _: StatusCode) -> ErrorReport {
        unreachable!("only JSON bodies reach the provider's format")
    }

    #[test]
    fn error_bodies_that_are_not_json_are_their_text_or_the_reason() {
        let status = StatusCode::SERVICE_UNAVAILABLE;
        let text = |body: &[u8]| error_report(body, status, unused);
        assert_eq!(text(b"upstream down").message, "upstream down");
        assert_eq!(text(b"").message, "Service Unavailable");
        assert_eq!(text(b" \n").message, "Service Unavailable");
        assert_eq!(text(b"{\"error\": cut").wait, None);
        let odd = error_report(b"", StatusCode::from_u16(599).unwrap(), unused);
        assert_eq!(odd.message, "error");
    }

    #[test]
    fn secrets_are_read_from_the_named_variable() {
        let found = read_secret("MY_KEY", |name| {
            assert_eq!(name, "MY_KEY");
            Some("sk-live".into())
        })
        .unwrap();
        assert_eq!(found.expose(), "sk-live");
        for missing in [None, Some(String::new())] {
            let e = read_secret("MY_KEY", |_| missing.clone()).unwrap_err();
            assert_eq!(
                e.to_string(),
                "environment variable `MY_KEY` (named by api_key_env) is not set or empty"
            );
        }
        assert!(secret_from_env(None).unwrap().is_none());
        assert!(secret_from_env(Some("")).unwrap().is_none());
    }

    #[test]
    fn base_urls_are_checked_for_every_problem() {
        let mut problems = Vec::new();
        check_base_url(
            "ftp://u:p@host/v1?x=1",
            "the key's variable in api_key_env",
            &mut problems,
        );
        assert_eq!(
            problems,
            [
                "base_url must start with http:// or https://",
                "base_url must not contain credentials; name the key's variable in api_key_env",
                "base_url must not have a query or a fragment",
            ]
        );
        problems.clear();
        check_base_url("not a url", "x", &mut problems);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("base_url is not a valid URL"));
        problems.clear();
        check_base_url("https://api.openai.com/v1/", "x", &mut problems);
        assert!(problems.is_empty());
    }
}
