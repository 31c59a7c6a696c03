//! The HTTP behaviour the remote providers share (their endpoint, `src/providers/endpoint.rs`),
//! checked through both of them, the OpenAI-compatible and the Hugging Face provider, against
//! one scripted server: `Retry-After` as an HTTP-date, credentials refused, 503 retried up to
//! the attempt limit with the same body each time, error bodies read only up to the cap,
//! timeouts, and answers that are not JSON.
//!
//! Like `tests/providers.rs`, these run in real time (reqwest's timers and real sockets do not
//! mix with a paused clock) and assert attempt counts and lower bounds on elapsed time; the only
//! upper bounds are far below a timeout the behaviour must not wait for.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::future::join_all;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use inferflow::config::Secret;
use inferflow::providers::huggingface::{HfModelConfig, HfTask, HuggingFaceConfig};
use inferflow::providers::{
    OpenAiConfig, OpenAiModelConfig, OpenAiProvider, Provider, ProviderError, ProviderInput,
    ProviderOutput, RetryConfig, RetryStats,
};

/// The credential both providers send.
const KEY: &str = "sk-endpoint-test-key";

/// Most bytes of an error body a provider reads (`MAX_ERROR_BODY_BYTES`).
const ERROR_BODY_CAP: usize = 64 * 1024;

/// What the server does with the next request; with the script empty, it answers normally.
#[derive(Clone)]
enum Step {
    /// This status, body and headers.
    Fail {
        status: u16,
        body: String,
        headers: Vec<(&'static str, String)>,
    },
    /// 500 whose body sends this many bytes and then stalls, never ending.
    StallingError(usize),
    /// Never answer.
    Hang,
    /// 200 with a body that is not JSON.
    Garbage,
}

/// An error status with the `{"error": message}` body both APIs understand.
fn fail(status: u16, message: &str) -> Step {
    Step::Fail {
        status,
        body: json!({ "error": message }).to_string(),
        headers: Vec::new(),
    }
}

/// 429 with `Retry-After` as the HTTP-date `secs` seconds from now.
fn rate_limited_for(secs: u64) -> Step {
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(secs));
    Step::Fail {
        status: 429,
        body: json!({ "error": "slow down" }).to_string(),
        headers: vec![("retry-after", date)],
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    authorization: Option<String>,
    body: Bytes,
}

struct Scripted {
    script: Mutex<VecDeque<Step>>,
    seen: Mutex<Vec<Seen>>,
    /// The normal answer.
    ok: Value,
}

async fn answer(State(server): State<Arc<Scripted>>, headers: HeaderMap, body: Bytes) -> Response {
    let authorization = headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned());
    server.seen.lock().unwrap().push(Seen {
        authorization,
        body,
    });
    let step = server.script.lock().unwrap().pop_front();
    match step {
        None => axum::Json(server.ok.clone()).into_response(),
        Some(Step::Fail {
            status,
            body,
            headers,
        }) => {
            let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
            for (name, value) in headers {
                response.headers_mut().insert(name, value.parse().unwrap());
            }
            response
        }
        Some(Step::StallingError(bytes)) => {
            let chunks =
                vec![Ok::<_, Infallible>(Bytes::from(vec![b'x'; 16 * 1024])); bytes / (16 * 1024)];
            let stream = futures::stream::StreamExt::chain(
                futures::stream::iter(chunks),
                futures::stream::pending(),
            );
            (StatusCode::INTERNAL_SERVER_ERROR, Body::from_stream(stream)).into_response()
        }
        Some(Step::Hang) => std::future::pending().await,
        Some(Step::Garbage) => (StatusCode::OK, "<html>proxy</html>").into_response(),
    }
}

/// The two providers, each built on the shared endpoint.
#[derive(Debug, Clone, Copy)]
enum Kind {
    OpenAi,
    HuggingFace,
}

const BOTH: [Kind; 2] = [Kind::OpenAi, Kind::HuggingFace];

/// A provider of `kind` in front of a scripted server.
struct Setup {
    kind: Kind,
    server: Arc<Scripted>,
    provider: Box<dyn Provider>,
    stats: Box<dyn Fn() -> RetryStats + Send + Sync>,
}

impl Setup {
    /// `timeout_ms` per attempt, `max_attempts`, and `Retry-After` honoured up to 5 s.
    async fn start(
        kind: Kind,
        script: impl IntoIterator<Item = Step>,
        timeout_ms: u64,
        max_attempts: u32,
    ) -> Setup {
        let ok = match kind {
            Kind::OpenAi => {
                json!({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]})
            }
            Kind::HuggingFace => json!([[{"label": "ok", "score": 1.0}]]),
        };
        let server = Arc::new(Scripted {
            script: Mutex::new(script.into_iter().collect()),
            seen: Mutex::default(),
            ok,
        });
        let app = Router::new().fallback(answer).with_state(server.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let retry = RetryConfig {
            max_attempts: NonZeroU32::new(max_attempts).unwrap(),
            initial_backoff_ms: 10,
            max_backoff_ms: 50,
            max_retry_after_ms: 5_000,
            ..RetryConfig::default()
        };
        let timeout_ms = NonZeroU64::new(timeout_ms).unwrap();
        let key = Some(Secret::new(KEY));
        let (provider, stats): (Box<dyn Provider>, Box<dyn Fn() -> RetryStats + Send + Sync>) =
            match kind {
                Kind::OpenAi => {
                    let mut config = OpenAiConfig {
                        base_url: format!("http://{addr}/v1"),
                        timeout_ms,
                        retry,
                        ..OpenAiConfig::default()
                    };
                    config.models.insert("m".into(), OpenAiModelConfig::chat());
                    let provider = Arc::new(OpenAiProvider::with_api_key(config, key).unwrap());
                    let counted = provider.clone();
                    (Box::new(provider), Box::new(move || counted.retry_stats()))
                }
                Kind::HuggingFace => {
                    let mut config = HuggingFaceConfig {
                        base_url: format!("http://{addr}"),
                        token_env: Some("HF_TOKEN".into()),
                        timeout_ms,
                        retry,
                        ..HuggingFaceConfig::default()
                    };
                    let model = HfModelConfig::new(HfTask::TextClassification);
                    config.models.insert("m".into(), model);
                    let provider = Arc::new(
                        inferflow::providers::huggingface::HuggingFaceProvider::with_token(
                            config, key,
                        )
                        .unwrap(),
                    );
                    let counted = provider.clone();
                    (Box::new(provider), Box::new(move || counted.retry_stats()))
                }
            };
        Setup {
            kind,
            server,
            provider,
            stats,
        }
    }

    async fn call(&self) -> Result<ProviderOutput, ProviderError> {
        let mut out = self
            .provider
            .infer_batch("m", vec![ProviderInput::new(json!("hi"))])
            .await;
        assert_eq!(out.len(), 1, "{:?}", self.kind);
        out.pop().unwrap()
    }

    fn seen(&self) -> Vec<Seen> {
        self.server.seen.lock().unwrap().clone()
    }
}

/// Runs `case` for both providers at once.
async fn for_both<F, Fut>(case: F)
where
    F: Fn(Kind) -> Fut,
    Fut: Future<Output = ()>,
{
    join_all(BOTH.map(case)).await;
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_waited_out_unless_too_far() {
    for_both(|kind| async move {
        // Three seconds ahead, to the second (an HTTP date drops the fraction): more than two
        // seconds ahead when written, so still more than one second when the client reads it.
        let setup = Setup::start(kind, [rate_limited_for(3)], 3_000, 3).await;
        let started = Instant::now();
        let out = setup.call().await;
        assert!(out.is_ok(), "{kind:?}: {out:?}");
        assert_eq!(setup.seen().len(), 2, "{kind:?}");
        // The backoff alone is at most 50 ms.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(1), "{kind:?}: {waited:?}");

        // A date beyond max_retry_after_ms: the error at once, carrying the wait.
        let setup = Setup::start(kind, [rate_limited_for(60)], 3_000, 3).await;
        let err = setup.call().await.unwrap_err();
        assert_eq!(setup.seen().len(), 1, "{kind:?}");
        let wait = err.retry_after().unwrap();
        assert!(wait > Duration::from_secs(55), "{kind:?}: {wait:?}");
        assert_eq!((setup.stats)().retry_after_too_long, 1, "{kind:?}");
    })
    .await;
}

#[tokio::test]
async fn refused_credentials_are_attempted_once() {
    for_both(|kind| async move {
        for status in [401, 403] {
            let setup = Setup::start(kind, [fail(status, "invalid token")], 3_000, 3).await;
            let err = setup.call().await.unwrap_err();
            assert_eq!(
                err,
                ProviderError::Unauthorized {
                    status,
                    message: "invalid token".into()
                },
                "{kind:?}"
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "provider refused the credentials (HTTP {status}): invalid token; check the \
                     API key"
                )
            );
            assert_eq!(setup.seen().len(), 1, "{kind:?}");
            assert_eq!((setup.stats)().retries, 0, "{kind:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_503_is_retried_up_to_the_limit_sending_the_same_request() {
    for_both(|kind| async move {
        let script = [
            fail(503, "overloaded"),
            fail(503, "overloaded"),
            fail(503, "overloaded"),
        ];
        let setup = Setup::start(kind, script, 3_000, 3).await;
        let err = setup.call().await.unwrap_err();
        assert_eq!(
            err,
            ProviderError::Unavailable {
                status: 503,
                message: "overloaded".into(),
                retry_after: None
            },
            "{kind:?}"
        );
        let seen = setup.seen();
        assert_eq!(seen.len(), 3, "{kind:?}");
        assert_eq!((setup.stats)().retries, 2, "{kind:?}");
        assert!(!seen[0].body.is_empty());
        assert!(seen.iter().all(|s| *s == seen[0]), "{kind:?}: {seen:?}");
        assert_eq!(
            seen[0].authorization.as_deref(),
            Some(format!("Bearer {KEY}").as_str())
        );
    })
    .await;
}

#[tokio::test]
async fn an_error_body_is_read_only_up_to_the_cap() {
    for_both(|kind| async move {
        // Four times the cap, then nothing: reading past the cap would wait for the timeout.
        let setup = Setup::start(kind, [Step::StallingError(4 * ERROR_BODY_CAP)], 5_000, 1).await;
        let started = Instant::now();
        let err = setup.call().await.unwrap_err();
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_millis(2_500),
            "{kind:?}: {elapsed:?}"
        );
        // Not JSON: the message is the body's text, truncated.
        assert_eq!(
            err,
            ProviderError::Unavailable {
                status: 500,
                message: format!("{}…", "x".repeat(300)),
                retry_after: None
            },
            "{kind:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_and_is_retried() {
    for_both(|kind| async move {
        let setup = Setup::start(kind, [Step::Hang, Step::Hang], 200, 2).await;
        let started = Instant::now();
        let err = setup.call().await.unwrap_err();
        assert_eq!(
            err,
            ProviderError::Timeout {
                after: Duration::from_millis(200)
            },
            "{kind:?}"
        );
        // Counted by the client: under load a request may time out before the server sees it.
        assert_eq!((setup.stats)().attempts, 2, "{kind:?}");
        assert!(started.elapsed() >= Duration::from_millis(400), "{kind:?}");
    })
    .await;
}

#[tokio::test]
async fn an_answer_that_is_not_json_is_an_invalid_response_not_retried() {
    for_both(|kind| async move {
        let setup = Setup::start(kind, [Step::Garbage], 3_000, 3).await;
        let err = setup.call().await.unwrap_err();
        assert!(
            matches!(err, ProviderError::InvalidResponse { .. }),
            "{kind:?}: {err:?}"
        );
        assert!(!err.retryable());
        assert_eq!(setup.seen().len(), 1, "{kind:?}");
    })
    .await;
}
