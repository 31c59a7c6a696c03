//! The OpenAI-compatible provider against a fake server inside the test: an axum app on
//! 127.0.0.1:0 that speaks OpenAI's request and response formats and fails on cue (5xx, 429
//! with `Retry-After`, 400, 401, hangs), plus a raw TCP listener that resets connections.
//!
//! Real sockets and reqwest's timers do not mix with Tokio's paused clock (it would jump past
//! every timeout while the runtime waits on the network), so these tests run in real time
//! with small timeouts. They assert attempt counts and lower bounds on elapsed time, never
//! tight upper bounds; exact backoff timing is tested with paused time in `providers::retry`.

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use inferflow::config::Secret;
use inferflow::model::ErrorKind;
use inferflow::providers::{
    BuildError, OpenAiConfig, OpenAiModelConfig, OpenAiProvider, Provider, ProviderError,
    ProviderInput, ProviderOutput, RetryConfig,
};

/// The key every test provider sends. Tests assert it never shows up where it must not.
const KEY: &str = "sk-test-9f8e7d6c5b4a-DO-NOT-LEAK";

/// What the fake server does with the next request. When the script is empty it answers
/// normally.
#[derive(Clone)]
enum Step {
    /// A normal answer.
    Answer,
    /// A normal answer after a pause.
    AnswerAfter(Duration),
    /// An error status with OpenAI's error body, and `Retry-After` when given.
    Fail(u16, Option<&'static str>),
    /// 401 whose message quotes the Authorization header back, as careless servers do.
    EchoKey401,
    /// A chat answer whose content is this text.
    Content(&'static str),
    /// Never answer.
    Hang,
    /// 200 with a body that is not JSON.
    Garbage,
}

/// One request as the fake server saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Option<String>,
    body: Value,
}

#[derive(Default)]
struct FakeState {
    script: Mutex<VecDeque<Step>>,
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// The fake OpenAI-compatible server.
struct Fake {
    state: Arc<FakeState>,
    addr: SocketAddr,
}

impl Fake {
    async fn start(script: impl IntoIterator<Item = Step>) -> Fake {
        let state = Arc::new(FakeState::default());
        state.script.lock().unwrap().extend(script);
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/embeddings", post(embeddings))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Fake { state, addr }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    fn attempts(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }
}

/// Records the request, takes the next step, and handles everything but a normal answer.
/// `Ok` carries the chat content override, if any.
async fn begin(
    state: &FakeState,
    path: &str,
    headers: &HeaderMap,
    body: &Value,
) -> Result<Option<&'static str>, Response> {
    state.seen.lock().unwrap().push(Seen {
        path: path.to_owned(),
        authorization: headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned()),
        body: body.clone(),
    });
    let step = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Step::Answer);
    match step {
        Step::Answer => Ok(None),
        Step::Content(text) => Ok(Some(text)),
        Step::AnswerAfter(pause) => {
            let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            state.max_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(pause).await;
            state.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(None)
        }
        Step::Hang => std::future::pending().await,
        Step::Garbage => Err((StatusCode::OK, "<html>upstream proxy</html>").into_response()),
        Step::Fail(status, retry_after) => {
            let (kind, code, message) = match status {
                400 => (
                    "invalid_request_error",
                    "context_length_exceeded",
                    "This model's maximum context length is 8192 tokens.",
                ),
                429 => (
                    "requests",
                    "rate_limit_exceeded",
                    "Rate limit reached for requests per min.",
                ),
                _ => (
                    "server_error",
                    "server_error",
                    "The server had an error while processing your request.",
                ),
            };
            let mut response = (
                StatusCode::from_u16(status).unwrap(),
                Json(json!({
                    "error": {"message": message, "type": kind, "param": null, "code": code}
                })),
            )
                .into_response();
            if let Some(wait) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", wait.parse().unwrap());
            }
            Err(response)
        }
        Step::EchoKey401 => {
            let presented = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            Err((
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": {
                    "message": format!("Incorrect API key provided: {presented}."),
                    "type": "invalid_request_error", "param": null, "code": "invalid_api_key"
                }})),
            )
                .into_response())
        }
    }
}

async fn chat(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let content = match begin(&state, "/v1/chat/completions", &headers, &body).await {
        Ok(content) => content,
        Err(response) => return response,
    };
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    let json_mode = body["response_format"]["type"] == "json_object";
    let content = match content {
        Some(text) => text.to_owned(),
        None if json_mode => json!({"echo": last}).to_string(),
        None => format!("echo: {last}"),
    };
    let prompt_tokens = last.split_whitespace().count() + 5;
    Json(json!({
        "id": "chatcmpl-fake123",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": format!("{}-2024-07-18", body["model"].as_str().unwrap_or("model")),
        "system_fingerprint": "fp_fake",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 4,
            "total_tokens": prompt_tokens + 4
        }
    }))
    .into_response()
}

/// Embeddings: input `i` gets `[i, chars, 0.5]`, and the list comes back in reverse order, so
/// only a client that maps by `index` gets them right.
async fn embeddings(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(response) = begin(&state, "/v1/embeddings", &headers, &body).await {
        return response;
    }
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(list) => list
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect(),
        _ => panic!("unexpected input"),
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .rev()
        .map(|(i, text)| {
            json!({
                "object": "embedding",
                "index": i,
                "embedding": [i as f64, text.chars().count() as f64, 0.5]
            })
        })
        .collect();
    let tokens: usize = inputs.iter().map(|t| t.split_whitespace().count()).sum();
    Json(json!({
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}
    }))
    .into_response()
}

/// A listener that resets the first `resets` connections (it reads a little of the request
/// and closes with the rest unread, which makes the kernel send RST) and forwards later ones
/// to `upstream`. Returns its address and its connection count.
async fn resetting_proxy(resets: usize, upstream: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                if n <= resets {
                    let mut first = [0u8; 8];
                    let _ = socket.read(&mut first).await;
                    drop(socket);
                } else {
                    let mut upstream = TcpStream::connect(upstream).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut socket, &mut upstream).await;
                }
            });
        }
    });
    (addr, connections)
}

fn config(base_url: String) -> OpenAiConfig {
    let mut config = OpenAiConfig {
        base_url,
        connect_timeout_ms: NonZeroU64::new(1_000).unwrap(),
        timeout_ms: NonZeroU64::new(3_000).unwrap(),
        retry: RetryConfig {
            max_attempts: NonZeroU32::new(3).unwrap(),
            initial_backoff_ms: 10,
            max_backoff_ms: 50,
            max_retry_after_ms: 5_000,
            ..RetryConfig::default()
        },
        ..OpenAiConfig::default()
    };
    config.models.insert(
        "chat".into(),
        OpenAiModelConfig {
            remote_model: Some("gpt-4o-mini".into()),
            ..OpenAiModelConfig::chat()
        },
    );
    config.models.insert(
        "extract".into(),
        OpenAiModelConfig {
            remote_model: Some("gpt-4o-mini".into()),
            system_prompt: Some("Extract the fields as JSON.".into()),
            temperature: Some(0.2),
            max_tokens: Some(NonZeroU32::new(256).unwrap()),
            json_output: true,
            ..OpenAiModelConfig::chat()
        },
    );
    config.models.insert(
        "embed".into(),
        OpenAiModelConfig {
            remote_model: Some("text-embedding-3-small".into()),
            ..OpenAiModelConfig::embeddings()
        },
    );
    config
}

fn provider(config: OpenAiConfig) -> OpenAiProvider {
    OpenAiProvider::with_api_key(config, Some(Secret::new(KEY))).unwrap()
}

async fn chat_once(
    provider: &OpenAiProvider,
    data: Value,
) -> Result<ProviderOutput, ProviderError> {
    let mut out = provider
        .infer_batch("chat", vec![ProviderInput::new(data)])
        .await;
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

#[tokio::test]
async fn chat_request_has_openai_shape_and_bearer_key() {
    let fake = Fake::start([]).await;
    let provider = provider(config(fake.base_url()));

    let params = json!({"max_tokens": 64}).as_object().cloned();
    let out = provider
        .infer_batch(
            "extract",
            vec![ProviderInput::with_parameters(
                json!({"prompt": "Ada Lovelace, born 1815"}),
                params,
            )],
        )
        .await;
    let out = out.into_iter().next().unwrap().unwrap();
    assert_eq!(
        out.output,
        json!({"content": {"echo": "Ada Lovelace, born 1815"}, "finish_reason": "stop"})
    );
    let usage = out.usage.unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (9, 4, 13)
    );
    assert_eq!(out.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));

    let plain = chat_once(&provider, json!("hello there")).await.unwrap();
    assert_eq!(plain.output["content"], "echo: hello there");

    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(
        seen[0].body,
        json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Extract the fields as JSON."},
                {"role": "user", "content": "Ada Lovelace, born 1815"}
            ],
            "temperature": 0.2,
            "max_tokens": 64,
            "response_format": {"type": "json_object"}
        })
    );
    // Nothing configured, nothing sent: the server's defaults apply.
    assert_eq!(
        seen[1].body,
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]})
    );
}

#[tokio::test]
async fn server_errors_are_retried_until_success() {
    let fake = Fake::start([Step::Fail(500, None), Step::Fail(503, None)]).await;
    let provider = provider(config(fake.base_url()));
    let out = chat_once(&provider, json!("hi")).await.unwrap();
    assert_eq!(out.output["content"], "echo: hi");
    assert_eq!(fake.attempts(), 3);
    assert_eq!(provider.retry_stats().retries, 2);
}

#[tokio::test]
async fn retries_stop_at_max_attempts() {
    let fake = Fake::start([
        Step::Fail(500, None),
        Step::Fail(502, None),
        Step::Fail(500, None),
    ])
    .await;
    let provider = provider(config(fake.base_url()));
    let err = chat_once(&provider, json!("hi")).await.unwrap_err();
    assert_eq!(fake.attempts(), 3);
    assert_eq!(err.kind(), ErrorKind::ProviderError);
    assert!(err.retryable());
    assert_eq!(
        err.to_string(),
        "provider failed (HTTP 500): The server had an error while processing your request. \
         [server_error, server_error]"
    );
}

#[tokio::test]
async fn rate_limit_waits_for_retry_after() {
    let fake = Fake::start([Step::Fail(429, Some("1"))]).await;
    let provider = provider(config(fake.base_url()));
    let started = Instant::now();
    let out = chat_once(&provider, json!("hi")).await;
    let elapsed = started.elapsed();
    assert!(out.is_ok(), "{out:?}");
    assert_eq!(fake.attempts(), 2);
    // The backoff alone is at most 50 ms: only Retry-After explains a second's wait.
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
}

#[tokio::test]
async fn retry_after_beyond_the_cap_returns_the_error_at_once() {
    let fake = Fake::start([Step::Fail(429, Some("30"))]).await;
    let mut config = config(fake.base_url());
    config.retry.max_retry_after_ms = 2_000;
    let provider = provider(config);
    let started = Instant::now();
    let err = chat_once(&provider, json!("hi")).await.unwrap_err();
    assert_eq!(fake.attempts(), 1);
    assert_eq!(err.kind(), ErrorKind::RateLimited);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(provider.retry_stats().retry_after_too_long, 1);
}

#[tokio::test]
async fn bad_request_is_not_retried() {
    let fake = Fake::start([Step::Fail(400, None)]).await;
    let provider = provider(config(fake.base_url()));
    let err = chat_once(&provider, json!("a very long text"))
        .await
        .unwrap_err();
    assert_eq!(fake.attempts(), 1);
    assert_eq!(err.kind(), ErrorKind::ProviderError);
    assert!(!err.retryable());
    assert_eq!(
        err.to_string(),
        "provider rejected the request (HTTP 400): This model's maximum context length is 8192 \
         tokens. [invalid_request_error, context_length_exceeded]"
    );
}

#[tokio::test]
async fn a_hanging_server_times_out_and_is_retried() {
    let fake = Fake::start([Step::Hang, Step::Hang]).await;
    let mut config = config(fake.base_url());
    config.timeout_ms = NonZeroU64::new(200).unwrap();
    config.retry.max_attempts = NonZeroU32::new(2).unwrap();
    let provider = provider(config);
    let started = Instant::now();
    let err = chat_once(&provider, json!("hi")).await.unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(fake.attempts(), 2);
    assert_eq!(err.kind(), ErrorKind::ProviderTimeout);
    assert_eq!(err.to_string(), "provider did not answer within 200 ms");
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");

    // The next call finds the server answering again.
    assert!(chat_once(&provider, json!("hi")).await.is_ok());
}

#[tokio::test]
async fn connection_resets_are_retried() {
    let fake = Fake::start([]).await;
    let (proxy, connections) = resetting_proxy(2, fake.addr).await;
    let provider = provider(config(format!("http://{proxy}/v1")));
    let out = chat_once(&provider, json!("hi")).await.unwrap();
    assert_eq!(out.output["content"], "echo: hi");
    assert_eq!(connections.load(Ordering::SeqCst), 3);
    assert_eq!(fake.attempts(), 1);
}

#[tokio::test]
async fn persistent_resets_end_in_a_connection_error() {
    let fake = Fake::start([]).await;
    let (proxy, connections) = resetting_proxy(usize::MAX, fake.addr).await;
    let provider = provider(config(format!("http://{proxy}/v1")));
    let err = chat_once(&provider, json!("hi")).await.unwrap_err();
    assert_eq!(connections.load(Ordering::SeqCst), 3);
    assert!(matches!(err, ProviderError::Connection { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::ProviderError);
    // Described without the URL.
    assert!(!err.to_string().contains(&proxy.to_string()), "{err}");
}

#[tokio::test]
async fn embeddings_are_one_call_mapped_back_by_index() {
    let fake = Fake::start([]).await;
    let provider = provider(config(fake.base_url()));
    let texts = [
        "one",
        "two words",
        "three small words",
        "four",
        "five is here",
    ];
    let mut inputs: Vec<ProviderInput> =
        texts.iter().map(|t| ProviderInput::new(json!(t))).collect();
    inputs[3] = ProviderInput::new(json!({"text": "four"}));
    let out = provider.infer_batch("embed", inputs).await;

    let seen = fake.seen();
    assert_eq!(seen.len(), 1, "five inputs, one HTTP call");
    assert_eq!(seen[0].path, "/v1/embeddings");
    assert_eq!(
        seen[0].body,
        json!({"model": "text-embedding-3-small", "input": texts})
    );
    let mut total = 0;
    for (i, (result, text)) in out.iter().zip(texts).enumerate() {
        let output = result.as_ref().unwrap();
        // The server answered in reverse order; each vector still lands on its own input.
        assert_eq!(
            output.output,
            json!({"embedding": [i as f64, text.len() as f64, 0.5]})
        );
        assert_eq!(output.model.as_deref(), Some("text-embedding-3-small"));
        total += output.usage.unwrap().total_tokens;
    }
    assert_eq!(total, 10, "shares of the call's usage add up to it");
}

#[tokio::test]
async fn embeddings_split_large_batches_and_fail_invalid_inputs_alone() {
    let fake = Fake::start([]).await;
    let mut config = config(fake.base_url());
    config.max_embedding_inputs = NonZeroUsize::new(2).unwrap();
    let provider = provider(config);
    let inputs = vec![
        ProviderInput::new(json!("a")),
        ProviderInput::new(json!(42)),
        ProviderInput::new(json!("b")),
        ProviderInput::new(json!("")),
        ProviderInput::new(json!("c")),
        ProviderInput::new(json!("d")),
        ProviderInput::new(json!("e")),
    ];
    let out = provider.infer_batch("embed", inputs).await;
    assert_eq!(out.len(), 7);
    for bad in [1, 3] {
        assert_eq!(
            out[bad].as_ref().unwrap_err().kind(),
            ErrorKind::InvalidRequest
        );
    }
    let mut inputs_sent: Vec<Value> = fake
        .seen()
        .into_iter()
        .map(|s| s.body["input"].clone())
        .collect();
    inputs_sent.sort_by_key(|v| v.to_string());
    assert_eq!(
        inputs_sent,
        vec![json!(["a", "b"]), json!(["c", "d"]), json!(["e"])]
    );
    let firsts: Vec<f64> = [0, 2, 4, 5, 6]
        .iter()
        .map(|&i| {
            out[i].as_ref().unwrap().output["embedding"][0]
                .as_f64()
                .unwrap()
        })
        .collect();
    // Indexes are per request: a, c, e are first in theirs, b and d second.
    assert_eq!(firsts, vec![0.0, 1.0, 0.0, 1.0, 0.0]);
}

#[tokio::test]
async fn chat_batches_run_concurrently_within_the_limit() {
    let pause = Duration::from_millis(150);
    let fake = Fake::start(vec![Step::AnswerAfter(pause); 6]).await;
    let mut config = config(fake.base_url());
    config.max_concurrency = NonZeroUsize::new(2).unwrap();
    let provider = provider(config);
    let inputs = (0..6)
        .map(|i| ProviderInput::new(json!(format!("q{i}"))))
        .collect();
    let started = Instant::now();
    let out = provider.infer_batch("chat", inputs).await;
    for (i, result) in out.iter().enumerate() {
        assert_eq!(
            result.as_ref().unwrap().output["content"],
            format!("echo: q{i}"),
            "outcomes stay in input order"
        );
    }
    assert_eq!(fake.state.max_in_flight.load(Ordering::SeqCst), 2);
    assert!(started.elapsed() >= pause * 3);
}

#[tokio::test]
async fn unknown_models_and_invalid_inputs_make_no_call() {
    let fake = Fake::start([]).await;
    let provider = provider(config(fake.base_url()));
    let out = provider
        .infer_batch("gpt-5", vec![ProviderInput::new(json!("hi")); 2])
        .await;
    assert_eq!(out.len(), 2);
    assert!(
        out.iter()
            .all(|r| r.as_ref().unwrap_err().kind() == ErrorKind::UnknownModel)
    );
    let out = provider
        .infer_batch(
            "chat",
            vec![
                ProviderInput::new(json!(7)),
                ProviderInput::with_parameters(
                    json!("hi"),
                    json!({"top_k": 3}).as_object().cloned(),
                ),
            ],
        )
        .await;
    for result in &out {
        assert_eq!(
            result.as_ref().unwrap_err().kind(),
            ErrorKind::InvalidRequest
        );
    }
    assert_eq!(fake.attempts(), 0);
}

#[tokio::test]
async fn json_output_that_is_not_json_is_an_invalid_response() {
    let fake = Fake::start([Step::Content("Sure! Here is the JSON you asked for")]).await;
    let provider = provider(config(fake.base_url()));
    let out = provider
        .infer_batch("extract", vec![ProviderInput::new(json!("x"))])
        .await;
    let err = out[0].as_ref().unwrap_err();
    assert!(
        matches!(err, ProviderError::InvalidResponse { .. }),
        "{err:?}"
    );
    assert_eq!(fake.attempts(), 1, "not retried");
}

#[tokio::test]
async fn retry_budget_stops_retries_when_exhausted() {
    let fake = Fake::start(vec![Step::Fail(500, None); 20]).await;
    let mut config = config(fake.base_url());
    // Two retries in the bucket, no refill: the first call uses both, the next get none.
    config.retry.budget_burst_retries = 2;
    config.retry.budget_percent = 0;
    config.retry.budget_min_retries_per_sec = 0;
    let provider = provider(config);
    for _ in 0..3 {
        let err = chat_once(&provider, json!("hi")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ProviderError);
    }
    assert_eq!(fake.attempts(), 3 + 1 + 1);
    let stats = provider.retry_stats();
    assert_eq!(
        (stats.calls, stats.retries, stats.budget_exhausted),
        (3, 2, 2)
    );
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_api_key_never_appears_in_errors_debug_output_or_logs() {
    // Alone in a process of its own: `tracing` caches per callsite whether any subscriber
    // listens, and another test of this binary hitting the retry callsite at the same moment
    // could leave it cached as "never enabled" for this test's subscriber (seen once in a
    // full run: no retry line captured).
    const CHILD: &str = "INFERFLOW_TEST_KEY_LOGS_ALONE";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "the_api_key_never_appears_in_errors_debug_output_or_logs",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .expect("run the test in a process of its own");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "the test failed in its own process:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // The test runtime has one thread, so the fake server's and the client's events all land
    // here.
    let _guard = tracing::subscriber::set_default(subscriber);
    // Other tests in this binary hit the same callsites at the same time without a subscriber;
    // one registering a callsite while this one is installed can leave it cached as "never
    // enabled". Recompute, so the retry events really are captured.
    tracing::callsite::rebuild_interest_cache();

    let fake = Fake::start([
        Step::Fail(503, None),
        Step::EchoKey401,
        Step::Fail(429, Some("0")),
        Step::Fail(500, None),
        Step::Fail(500, None),
    ])
    .await;
    let provider = provider(config(fake.base_url()));
    let mut texts = vec![format!("{provider:?}")];
    tracing::callsite::rebuild_interest_cache();

    // 503 then 401 quoting the key: not retried, and the quote is redacted.
    let unauthorized = chat_once(&provider, json!("hi")).await.unwrap_err();
    assert!(matches!(
        unauthorized,
        ProviderError::Unauthorized { status: 401, .. }
    ));
    assert!(
        unauthorized.to_string().contains("Bearer <redacted>"),
        "{unauthorized}"
    );
    // 429 then 500s: retried to the end.
    let failed = chat_once(&provider, json!("hi")).await.unwrap_err();
    // Resets.
    let (proxy, _) = resetting_proxy(usize::MAX, fake.addr).await;
    let resetting = self::provider(config(format!("http://{proxy}/v1")));
    let reset = chat_once(&resetting, json!("hi")).await.unwrap_err();
    // A key that cannot be a header value: the error names the problem, not the key.
    let bad_key = OpenAiProvider::with_api_key(
        config(fake.base_url()),
        Some(Secret::new(format!("{KEY}\n"))),
    )
    .unwrap_err();
    assert_eq!(bad_key, BuildError::InvalidApiKey);

    for err in [&unauthorized, &failed, &reset] {
        texts.push(err.to_string());
        texts.push(format!("{err:?}"));
        texts.push(format!("{:?}", err.to_error_body()));
    }
    texts.push(format!("{bad_key} {bad_key:?}"));
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("retrying provider call"), "{logs}");
    texts.push(logs);
    for text in &texts {
        assert!(!text.contains(KEY), "the key leaked into: {text}");
        assert!(
            !text.contains("DO-NOT-LEAK"),
            "part of the key leaked into: {text}"
        );
    }
}

#[test]
fn a_missing_key_variable_fails_the_build_and_names_it() {
    let mut config = config("http://127.0.0.1:9/v1".into());
    config.api_key_env = Some("INFERFLOW_TEST_PROVIDERS_UNSET_KEY".into());
    let err = OpenAiProvider::new(config).unwrap_err();
    assert_eq!(
        err,
        BuildError::MissingApiKey {
            env: "INFERFLOW_TEST_PROVIDERS_UNSET_KEY".into()
        }
    );
}

/// The circuit breaker in front of a real HTTP provider, through the model manager: 500s open
/// it, nothing reaches the server during the cool-down while callers wait (and `hold` tells the
/// consumer), a failed probe opens it again for longer, and a successful one closes it.
/// Real time (sockets), with a short cool-down; only lower bounds on time are asserted.
#[tokio::test]
async fn breaker_opens_on_500s_waits_out_the_cool_down_and_closes_after_a_probe() {
    use inferflow::executor::{ExecRequest, Executor};
    use inferflow::model::Target;
    use inferflow::providers::manager::{ModelExecutor, ModelManager, ModelSpec, ProviderPolicy};
    use inferflow::providers::{BreakerConfig, BreakerState};

    // Three failed calls, a failed probe, then normal answers.
    let fake = Fake::start(vec![Step::Fail(500, None); 4]).await;
    let mut config = config(fake.base_url());
    // One attempt per call, so the server's count is the breaker's count.
    config.retry.max_attempts = NonZeroU32::new(1).unwrap();
    let manager = Arc::new(ModelManager::new());
    manager
        .register_provider_with_policy(
            "openai",
            Arc::new(provider(config)),
            ProviderPolicy {
                breaker: Some(BreakerConfig {
                    failure_threshold: NonZeroU32::new(3).unwrap(),
                    open_ms: NonZeroU64::new(300).unwrap(),
                    max_open_ms: NonZeroU64::new(2_000).unwrap(),
                    ..BreakerConfig::default()
                }),
                ..ProviderPolicy::default()
            },
        )
        .unwrap();
    manager
        .load_model(ModelSpec {
            cache: false,
            ..ModelSpec::new("assistant", "1", "openai", "chat")
        })
        .unwrap();
    let executor = Arc::new(ModelExecutor::new(manager.clone()));
    let target = Target::Model("assistant".into());
    let request = |text: &str| ExecRequest {
        request_id: "r".into(),
        data: json!(text),
        parameters: None,
        entity: None,
        tenant: None,
    };

    for _ in 0..3 {
        let out = executor.execute(&target, vec![request("hi")]).await;
        assert_eq!(out[0].as_ref().unwrap_err().kind, ErrorKind::ProviderError);
    }
    assert_eq!(fake.attempts(), 3);
    assert_eq!(manager.breaker_state("openai"), Some(BreakerState::Open));
    let reason = executor.hold().expect("held while open");
    assert!(reason.contains("provider `openai`"), "{reason}");

    // A request now waits (it is not failed) and nothing reaches the server meanwhile.
    let opened = Instant::now();
    let waiting = {
        let executor = executor.clone();
        let target = target.clone();
        let request = request("after the cool-down");
        tokio::spawn(async move {
            executor.admit(&target, 1).await;
            executor.execute(&target, vec![request]).await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!waiting.is_finished());
    assert_eq!(fake.attempts(), 3, "no call while the breaker is open");
    // The probe (the fourth 500) fails: open again, for 600 ms this time.
    let out = waiting.await.unwrap();
    assert!(opened.elapsed() >= Duration::from_millis(300));
    assert_eq!(out[0].as_ref().unwrap_err().kind, ErrorKind::ProviderError);
    assert_eq!(fake.attempts(), 4, "exactly one probe");
    assert_eq!(manager.breaker_state("openai"), Some(BreakerState::Open));
    assert!(executor.hold().is_some());

    // Several requests wait for the next probe; it succeeds and they all go through.
    let reopened = Instant::now();
    let batch: Vec<_> = (0..3)
        .map(|i| {
            let executor = executor.clone();
            let target = target.clone();
            let request = request(&format!("later {i}"));
            tokio::spawn(async move {
                executor.admit(&target, 1).await;
                executor.execute(&target, vec![request]).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.attempts(), 4, "still open: the cool-down doubled");
    for handle in batch {
        let out = handle.await.unwrap();
        assert!(
            out[0].as_ref().unwrap().output["content"]
                .as_str()
                .unwrap()
                .starts_with("echo: later")
        );
    }
    assert!(reopened.elapsed() >= Duration::from_millis(600));
    assert_eq!(fake.attempts(), 7);
    assert_eq!(manager.breaker_state("openai"), Some(BreakerState::Closed));
    assert_eq!(executor.hold(), None);
}

/// A model step with `retries = 2` over the OpenAI provider (`retry.max_attempts = 3`): the
/// provider owns the attempt count. Failures retrying cannot fix (401, 400, a malformed
/// response) reach the server once; transient ones (503, a timeout) are retried by the
/// provider up to `max_attempts` and not again by the step, so no request makes more than the
/// documented bound of `retry.max_attempts` HTTP requests per model step.
#[tokio::test]
async fn pipeline_steps_do_not_retry_what_the_provider_owns() {
    use inferflow::pipeline::{PipelineManager, def};
    use inferflow::providers::manager::{ModelManager, ModelSpec};

    const MAX_ATTEMPTS: usize = 3;
    let cases: [(&str, Vec<Step>, usize, ErrorKind); 5] = [
        ("401", vec![Step::EchoKey401], 1, ErrorKind::ProviderError),
        (
            "400",
            vec![Step::Fail(400, None)],
            1,
            ErrorKind::ProviderError,
        ),
        (
            "malformed",
            vec![Step::Garbage],
            1,
            ErrorKind::ProviderError,
        ),
        (
            "503",
            vec![Step::Fail(503, None); 20],
            MAX_ATTEMPTS,
            ErrorKind::ProviderError,
        ),
        (
            "timeout",
            vec![Step::Hang; 20],
            MAX_ATTEMPTS,
            ErrorKind::ProviderTimeout,
        ),
    ];
    for (name, script, expected, kind) in cases {
        let fake = Fake::start(script).await;
        let mut config = config(fake.base_url());
        config.timeout_ms = NonZeroU64::new(150).unwrap();
        config.retry.max_attempts = NonZeroU32::new(MAX_ATTEMPTS as u32).unwrap();
        let models = Arc::new(ModelManager::new());
        models.register_provider("openai", Arc::new(provider(config)));
        models
            .load_model(ModelSpec {
                cache: false,
                ..ModelSpec::new("assistant", "1", "openai", "chat")
            })
            .unwrap();
        let pipelines = PipelineManager::new(models);
        let text = "id = \"ask\"\n[[steps]]\ntype = \"model\"\nmodel = \"assistant\"\nretries = 2\nretry_backoff_ms = 1\n";
        pipelines
            .create_pipeline(def::parse(text, "ask", "test").unwrap())
            .unwrap();
        let err = pipelines.execute("ask", json!("hi")).await.unwrap_err();
        assert_eq!(err.kind, kind, "{name}: {err}");
        assert_eq!(fake.attempts(), expected, "{name}: {err}");
        assert!(fake.attempts() <= MAX_ATTEMPTS, "{name}: over the bound");
    }
}
