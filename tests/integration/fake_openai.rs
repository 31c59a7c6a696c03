//! A fake OpenAI-compatible chat server for tests that run `inferflow run` against it: an axum
//! app on 127.0.0.1:0 whose behaviour ([`Mode`]) the test switches while it runs, and which
//! records every call (when, in which mode, the prompt, the `Authorization` header), so tests
//! can count attempts per request at the server.

// Shared with the fault suite, which uses the modes this binary does not.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// What the server does with each call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A normal chat answer, `echo: <prompt>`.
    Healthy,
    /// 500 with OpenAI's error body.
    ServerError,
    /// 429 with `Retry-After` in seconds.
    RateLimited { retry_after_secs: u64 },
    /// Never answers.
    Hang,
    /// 401 whose message quotes the `Authorization` header back, as careless servers do.
    EchoKey401,
}

/// One call as the server saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub at: Instant,
    pub mode: Mode,
    /// The last message's content: the request's `data` when it is a string.
    pub prompt: String,
    pub authorization: Option<String>,
    /// The W3C `traceparent` header, when the call carried one.
    pub traceparent: Option<String>,
}

struct Shared {
    mode: Mutex<Mode>,
    calls: Mutex<Vec<Call>>,
}

/// The running server.
pub struct FakeOpenAi {
    shared: Arc<Shared>,
    pub base_url: String,
}

impl FakeOpenAi {
    pub async fn start(mode: Mode) -> FakeOpenAi {
        let shared = Arc::new(Shared {
            mode: Mutex::new(mode),
            calls: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(Arc::clone(&shared));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("fake server") });
        FakeOpenAi {
            shared,
            base_url: format!("http://{addr}/v1"),
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().unwrap().clone()
    }
}

fn error(status: u16, kind: &str, code: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).expect("status"),
        Json(json!({"error": {"message": message, "type": kind, "param": null, "code": code}})),
    )
        .into_response()
}

async fn chat(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let prompt = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mode = *shared.mode.lock().unwrap();
    shared.calls.lock().unwrap().push(Call {
        at: Instant::now(),
        mode,
        prompt: prompt.clone(),
        authorization: authorization.clone(),
        traceparent,
    });
    match mode {
        Mode::Healthy => Json(json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": body["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": format!("echo: {prompt}")},
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        }))
        .into_response(),
        Mode::ServerError => error(
            500,
            "server_error",
            "server_error",
            "The server had an error while processing your request.",
        ),
        Mode::RateLimited { retry_after_secs } => {
            let mut response = error(
                429,
                "requests",
                "rate_limit_exceeded",
                "Rate limit reached for requests per min.",
            );
            response.headers_mut().insert(
                "retry-after",
                retry_after_secs.to_string().parse().expect("header value"),
            );
            response
        }
        Mode::Hang => std::future::pending().await,
        Mode::EchoKey401 => error(
            401,
            "invalid_request_error",
            "invalid_api_key",
            &format!(
                "Incorrect API key provided: {}. You can find your API key at https://example.invalid/keys.",
                authorization.unwrap_or_default()
            ),
        ),
    }
}
