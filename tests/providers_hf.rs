//! The Hugging Face provider against a fake server inside the test: an axum app on
//! 127.0.0.1:0 that speaks the serverless Inference API (`POST /models/{model}`) and TEI
//! (`POST /predict`, `POST /embed`) request and response formats, and fails on cue (503 while
//! the model loads, 429 with `Retry-After`, 400, 401 quoting the token back).
//!
//! Like `tests/providers.rs`, these run in real time with small waits and assert attempt
//! counts and lower bounds on elapsed time, never tight upper bounds.

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use inferflow::config::Secret;
use inferflow::model::ErrorKind;
use inferflow::providers::huggingface::{
    HfFlavour, HfModelConfig, HfTask, HuggingFaceConfig, HuggingFaceProvider,
};
use inferflow::providers::{
    BuildError, Provider, ProviderError, ProviderInput, ProviderOutput, RetryConfig,
};

/// The token every test provider sends. Tests assert it never shows up where it must not.
const TOKEN: &str = "hf_test_Zx81KqPw0-DO-NOT-LEAK";

/// What the fake server does with the next request. When the script is empty it answers
/// normally.
#[derive(Clone)]
enum Step {
    /// 503 with the Inference API's "model loading" body.
    Loading(f64),
    /// An error status with `{"error": …}`, and `Retry-After` when given.
    Fail(u16, Option<&'static str>),
    /// 401 whose message quotes the Authorization header back.
    EchoToken401,
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
}

struct Fake {
    state: Arc<FakeState>,
    addr: SocketAddr,
}

impl Fake {
    async fn start(script: impl IntoIterator<Item = Step>) -> Fake {
        let state = Arc::new(FakeState::default());
        state.script.lock().unwrap().extend(script);
        let app = Router::new()
            .route("/models/{*model}", post(serverless))
            .route("/predict", post(tei_predict))
            .route("/embed", post(tei_embed))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Fake { state, addr }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    fn attempts(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }
}

/// Records the request and plays the next scripted failure, if any.
fn begin(state: &FakeState, path: &str, headers: &HeaderMap, body: &Value) -> Option<Response> {
    state.seen.lock().unwrap().push(Seen {
        path: path.to_owned(),
        authorization: headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned()),
        body: body.clone(),
    });
    let step = state.script.lock().unwrap().pop_front()?;
    Some(match step {
        Step::Loading(estimated_time) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "error": "Model org/classifier is currently loading",
                "estimated_time": estimated_time
            })),
        )
            .into_response(),
        Step::Fail(status, retry_after) => {
            let message = match status {
                400 => "Input should be a valid string",
                429 => "Rate limit reached. You reached free usage limit (reset hourly).",
                _ => "Internal Server Error",
            };
            let mut response = (
                StatusCode::from_u16(status).unwrap(),
                Json(json!({ "error": message })),
            )
                .into_response();
            if let Some(wait) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", wait.parse().unwrap());
            }
            response
        }
        Step::EchoToken401 => {
            let presented = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({ "error": format!("Invalid credentials in Authorization header: {presented}") })),
            )
                .into_response()
        }
    })
}

fn texts(body: &Value) -> Vec<String> {
    body["inputs"]
        .as_array()
        .expect("inputs is a list")
        .iter()
        .map(|t| t.as_str().expect("inputs are strings").to_owned())
        .collect()
}

/// A sentiment classifier's labels for `text`, best first, as transformers returns them.
fn sentiment(text: &str) -> Value {
    let positive = if text.contains("good") { 0.98 } else { 0.03 };
    let mut labels = vec![
        json!({"label": "POSITIVE", "score": positive}),
        json!({"label": "NEGATIVE", "score": 1.0 - positive}),
    ];
    if positive < 0.5 {
        labels.reverse();
    }
    Value::Array(labels)
}

/// Capitalised words as entities, with aggregation (`entity_group`) as the API defaults to.
fn entities(text: &str) -> Value {
    let mut out = Vec::new();
    let mut offset = 0;
    for word in text.split(' ') {
        if word.starts_with(char::is_uppercase) {
            out.push(json!({
                "entity_group": if word == "London" { "LOC" } else { "PER" },
                "score": 0.997,
                "word": word,
                "start": offset,
                "end": offset + word.len(),
            }));
        }
        offset += word.len() + 1;
    }
    Value::Array(out)
}

/// A made-up sentence embedding that identifies the text: `[len, 1, 0]`.
fn embedding(text: &str, normalize: bool) -> Value {
    let v = [text.len() as f64, 1.0, 0.0];
    let norm = if normalize {
        v.iter().map(|x| x * x).sum::<f64>().sqrt()
    } else {
        1.0
    };
    json!(v.iter().map(|x| x / norm).collect::<Vec<_>>())
}

async fn serverless(
    State(state): State<Arc<FakeState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(response) = begin(&state, &format!("/models/{model}"), &headers, &body) {
        return response;
    }
    let answer: Vec<Value> = texts(&body)
        .iter()
        .map(|t| match model.as_str() {
            "org/classifier" => sentiment(t),
            "org/ner" => entities(t),
            "org/embedder" => embedding(t, body["parameters"]["normalize"] == true),
            other => panic!("unexpected model {other}"),
        })
        .collect();
    Json(answer).into_response()
}

async fn tei_predict(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(response) = begin(&state, "/predict", &headers, &body) {
        return response;
    }
    let answer: Vec<Value> = texts(&body).iter().map(|t| sentiment(t)).collect();
    Json(answer).into_response()
}

async fn tei_embed(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(response) = begin(&state, "/embed", &headers, &body) {
        return response;
    }
    let normalize = body
        .get("normalize")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let answer: Vec<Value> = texts(&body)
        .iter()
        .map(|t| embedding(t, normalize))
        .collect();
    Json(answer).into_response()
}

fn retry(max_retry_after_ms: u64) -> RetryConfig {
    RetryConfig {
        max_attempts: NonZeroU32::new(3).unwrap(),
        initial_backoff_ms: 10,
        max_backoff_ms: 50,
        max_retry_after_ms,
        ..RetryConfig::default()
    }
}

fn model(task: HfTask, remote: &str) -> HfModelConfig {
    HfModelConfig {
        remote_model: Some(remote.into()),
        ..HfModelConfig::new(task)
    }
}

fn serverless_config(base_url: String) -> HuggingFaceConfig {
    let mut config = HuggingFaceConfig {
        base_url,
        flavour: HfFlavour::InferenceApi,
        token_env: Some("HF_TOKEN".into()),
        connect_timeout_ms: NonZeroU64::new(1_000).unwrap(),
        timeout_ms: NonZeroU64::new(3_000).unwrap(),
        retry: retry(5_000),
        ..HuggingFaceConfig::default()
    };
    config.models.insert(
        "sentiment".into(),
        model(HfTask::TextClassification, "org/classifier"),
    );
    config
        .models
        .insert("ner".into(), model(HfTask::TokenClassification, "org/ner"));
    config.models.insert(
        "embed".into(),
        model(HfTask::FeatureExtraction, "org/embedder"),
    );
    config
}

fn tei_config(base_url: String) -> HuggingFaceConfig {
    let mut config = HuggingFaceConfig {
        base_url,
        flavour: HfFlavour::Tei,
        token_env: None,
        timeout_ms: NonZeroU64::new(3_000).unwrap(),
        retry: retry(5_000),
        ..HuggingFaceConfig::default()
    };
    config.models.insert(
        "sentiment".into(),
        HfModelConfig::new(HfTask::TextClassification),
    );
    config.models.insert(
        "embed".into(),
        HfModelConfig::new(HfTask::FeatureExtraction),
    );
    config
}

fn provider(config: HuggingFaceConfig) -> HuggingFaceProvider {
    HuggingFaceProvider::with_token(config, Some(Secret::new(TOKEN))).unwrap()
}

fn inputs(texts: &[&str]) -> Vec<ProviderInput> {
    texts.iter().map(|t| ProviderInput::new(json!(t))).collect()
}

async fn classify_one(provider: &HuggingFaceProvider) -> Result<ProviderOutput, ProviderError> {
    let mut out = provider
        .infer_batch("sentiment", inputs(&["a good film"]))
        .await;
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

#[tokio::test]
async fn classification_of_three_inputs_is_one_call_mapped_back_in_order() {
    let fake = Fake::start([]).await;
    let provider = provider(serverless_config(fake.base_url()));
    let out = provider
        .infer_batch(
            "sentiment",
            inputs(&["a good film", "a dull film", "dull acting"]),
        )
        .await;
    let labels: Vec<&str> = out
        .iter()
        .map(|o| o.as_ref().unwrap().output["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["POSITIVE", "NEGATIVE", "NEGATIVE"]);
    let first = &out[0].as_ref().unwrap().output;
    assert_eq!(first["score"], 0.98);
    assert_eq!(first["scores"].as_array().unwrap().len(), 2);
    assert_eq!(first["scores"][1]["label"], "NEGATIVE");

    let seen = fake.seen();
    assert_eq!(seen.len(), 1, "one HTTP call for the batch");
    assert_eq!(seen[0].path, "/models/org/classifier");
    assert_eq!(
        seen[0].body,
        json!({
            "inputs": ["a good film", "a dull film", "dull acting"],
            "options": {"wait_for_model": true}
        })
    );
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
}

#[tokio::test]
async fn large_batches_are_split_and_parameters_group_requests() {
    let fake = Fake::start([]).await;
    let mut config = serverless_config(fake.base_url());
    config.max_batch_inputs = NonZeroUsize::new(2).unwrap();
    let provider = provider(config);
    let texts = ["good 1", "bad 2", "good 3", "bad 4", "good 5"];
    let out = provider.infer_batch("sentiment", inputs(&texts)).await;
    let labels: Vec<&str> = out
        .iter()
        .map(|o| o.as_ref().unwrap().output["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        ["POSITIVE", "NEGATIVE", "POSITIVE", "NEGATIVE", "POSITIVE"]
    );
    let mut sizes: Vec<usize> = fake.seen().iter().map(|s| texts_len(&s.body)).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [1, 2, 2]);

    // Inputs with different parameters cannot share a request; invalid ones make no call.
    let fake = Fake::start([]).await;
    let provider = self::provider(serverless_config(fake.base_url()));
    let top1 = json!({"top_k": 1}).as_object().cloned();
    let batch = vec![
        ProviderInput::new(json!("good a")),
        ProviderInput::with_parameters(json!({"text": "good b"}), top1.clone()),
        ProviderInput::new(json!("bad c")),
        ProviderInput::with_parameters(json!("x"), json!({"top_p": 1}).as_object().cloned()),
        ProviderInput::new(json!(42)),
    ];
    let out = provider.infer_batch("sentiment", batch).await;
    assert_eq!(out[2].as_ref().unwrap().output["label"], "NEGATIVE");
    assert_eq!(out[1].as_ref().unwrap().output["label"], "POSITIVE");
    for bad in &out[3..] {
        assert_eq!(
            bad.as_ref().unwrap_err().kind(),
            ErrorKind::InvalidRequest,
            "{bad:?}"
        );
    }
    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(texts_len(&seen[0].body) + texts_len(&seen[1].body), 3);
    assert!(
        seen.iter()
            .any(|s| s.body["parameters"] == json!({"top_k": 1}) && texts_len(&s.body) == 1)
    );

    let unknown = provider.infer_batch("nope", inputs(&["x", "y"])).await;
    assert!(matches!(
        unknown[1],
        Err(ProviderError::UnknownModel { .. })
    ));
    assert_eq!(fake.attempts(), 2);
}

fn texts_len(body: &Value) -> usize {
    body["inputs"].as_array().unwrap().len()
}

#[tokio::test]
async fn ner_entities_are_parsed_per_input() {
    let fake = Fake::start([]).await;
    let provider = provider(serverless_config(fake.base_url()));
    let out = provider
        .infer_batch("ner", inputs(&["Ada lives in London", "no names here"]))
        .await;
    assert_eq!(fake.attempts(), 1);
    let first = &out[0].as_ref().unwrap().output["entities"];
    assert_eq!(
        *first,
        json!([
            {"entity_group": "PER", "score": 0.997, "word": "Ada", "start": 0, "end": 3},
            {"entity_group": "LOC", "score": 0.997, "word": "London", "start": 13, "end": 19},
        ])
    );
    assert_eq!(out[1].as_ref().unwrap().output["entities"], json!([]));
    assert_eq!(fake.seen()[0].path, "/models/org/ner");
}

#[tokio::test]
async fn feature_extraction_works_for_both_flavours() {
    // Serverless: parameters go under "parameters".
    let fake = Fake::start([]).await;
    let provider = provider(serverless_config(fake.base_url()));
    let normalize = json!({"normalize": false}).as_object().cloned();
    let batch = vec![
        ProviderInput::with_parameters(json!("abcd"), normalize.clone()),
        ProviderInput::with_parameters(json!("ab"), normalize),
    ];
    let out = provider.infer_batch("embed", batch).await;
    assert_eq!(
        out[0].as_ref().unwrap().output["embedding"],
        json!([4.0, 1.0, 0.0])
    );
    assert_eq!(
        out[1].as_ref().unwrap().output["embedding"],
        json!([2.0, 1.0, 0.0])
    );
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/models/org/embedder");
    assert_eq!(seen[0].body["parameters"], json!({"normalize": false}));

    // TEI: `POST /embed` with `normalize: true`, no token configured, no header sent.
    let fake = Fake::start([]).await;
    let provider = HuggingFaceProvider::with_token(tei_config(fake.base_url()), None).unwrap();
    let out = provider
        .infer_batch("embed", inputs(&["abc", "abcd", "a"]))
        .await;
    let v = out[1].as_ref().unwrap().output["embedding"].clone();
    let v: Vec<f64> = serde_json::from_value(v).unwrap();
    assert!((v[0] - 4.0 / 17f64.sqrt()).abs() < 1e-9, "{v:?}");
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(Result::is_ok));
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/embed");
    assert_eq!(
        seen[0].body,
        json!({"inputs": ["abc", "abcd", "a"], "normalize": true})
    );
    assert_eq!(seen[0].authorization, None);
}

#[tokio::test]
async fn tei_classification_uses_predict_and_never_sends_a_pair() {
    let fake = Fake::start([]).await;
    let provider = provider(tei_config(fake.base_url()));
    let out = provider
        .infer_batch("sentiment", inputs(&["bad", "good", "so good"]))
        .await;
    let labels: Vec<&str> = out
        .iter()
        .map(|o| o.as_ref().unwrap().output["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["NEGATIVE", "POSITIVE", "POSITIVE"]);
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/predict");
    assert_eq!(seen[0].body, json!({"inputs": ["bad", "good", "so good"]}));
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );

    // Two strings would be one sentence pair to TEI: they go as two requests.
    let out = provider
        .infer_batch("sentiment", inputs(&["good", "bad"]))
        .await;
    assert_eq!(out[0].as_ref().unwrap().output["label"], "POSITIVE");
    assert_eq!(out[1].as_ref().unwrap().output["label"], "NEGATIVE");
    let seen = fake.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen[1..].iter().all(|s| texts_len(&s.body) == 1));
}

#[tokio::test]
async fn a_loading_model_is_waited_for_then_retried() {
    let fake = Fake::start([Step::Loading(1.0)]).await;
    let provider = provider(serverless_config(fake.base_url()));
    let started = Instant::now();
    let out = classify_one(&provider).await.unwrap();
    assert_eq!(out.output["label"], "POSITIVE");
    assert_eq!(fake.attempts(), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited only {:?}",
        started.elapsed()
    );
    assert_eq!(provider.retry_stats().retries, 1);
}

#[tokio::test]
async fn a_long_loading_estimate_is_capped_by_the_retry_policy() {
    let fake = Fake::start([Step::Loading(30.0)]).await;
    let mut config = serverless_config(fake.base_url());
    config.retry = retry(300);
    let provider = provider(config);
    let started = Instant::now();
    classify_one(&provider).await.unwrap();
    assert_eq!(fake.attempts(), 2);
    assert!(started.elapsed() >= Duration::from_millis(280));

    // Loading on every attempt: the error is retryable `Unavailable` and says so.
    let fake = Fake::start([Step::Loading(0.1), Step::Loading(0.1), Step::Loading(0.1)]).await;
    let provider = self::provider(serverless_config(fake.base_url()));
    let err = classify_one(&provider).await.unwrap_err();
    assert_eq!(fake.attempts(), 3);
    match &err {
        ProviderError::Unavailable {
            status: 503,
            message,
            retry_after,
        } => {
            assert!(message.contains("currently loading"), "{message}");
            assert_eq!(*retry_after, Some(Duration::from_millis(100)));
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn rate_limit_waits_for_retry_after() {
    let fake = Fake::start([Step::Fail(429, Some("1"))]).await;
    let provider = provider(serverless_config(fake.base_url()));
    let started = Instant::now();
    classify_one(&provider).await.unwrap();
    assert_eq!(fake.attempts(), 2);
    assert!(started.elapsed() >= Duration::from_millis(950));
}

#[tokio::test]
async fn bad_request_is_not_retried() {
    let fake = Fake::start([Step::Fail(400, None)]).await;
    let provider = provider(serverless_config(fake.base_url()));
    let err = classify_one(&provider).await.unwrap_err();
    assert_eq!(fake.attempts(), 1);
    assert_eq!(
        err,
        ProviderError::Rejected {
            status: 400,
            message: "Input should be a valid string".into()
        }
    );
    assert_eq!(provider.retry_stats().retries, 0);
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
async fn the_token_never_appears_in_errors_debug_output_or_logs() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // Other tests in this binary hit the same callsites at the same time without a
    // subscriber; one that registers a callsite while this one is being installed can leave
    // it cached as "never enabled". Recompute, so the retry events really are captured.
    tracing::callsite::rebuild_interest_cache();

    let fake = Fake::start([
        Step::Fail(503, None),
        Step::EchoToken401,
        Step::Fail(500, None),
        Step::Fail(500, None),
        Step::Fail(500, None),
    ])
    .await;
    let provider = provider(serverless_config(fake.base_url()));
    let mut texts = vec![format!("{provider:?}")];
    tracing::callsite::rebuild_interest_cache();
    let unauthorized = classify_one(&provider).await.unwrap_err();
    assert!(matches!(
        unauthorized,
        ProviderError::Unauthorized { status: 401, .. }
    ));
    assert!(
        unauthorized.to_string().contains("Bearer <redacted>"),
        "{unauthorized}"
    );
    assert_eq!(fake.attempts(), 2);
    let failed = classify_one(&provider).await.unwrap_err();
    assert_eq!(fake.attempts(), 5);
    // Nothing listens on port 9 of localhost: a connection error.
    let unreachable = self::provider(serverless_config("http://127.0.0.1:9".into()));
    let refused = classify_one(&unreachable).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ProviderError);
    let bad_token = HuggingFaceProvider::with_token(
        serverless_config(fake.base_url()),
        Some(Secret::new(format!("{TOKEN}\n"))),
    )
    .unwrap_err();
    assert_eq!(bad_token, BuildError::InvalidApiKey);

    for err in [&unauthorized, &failed, &refused] {
        texts.push(err.to_string());
        texts.push(format!("{err:?}"));
        texts.push(format!("{:?}", err.to_error_body()));
    }
    texts.push(format!("{bad_token} {bad_token:?}"));
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("retrying provider call"), "{logs}");
    texts.push(logs);
    for text in &texts {
        assert!(!text.contains(TOKEN), "the token leaked into: {text}");
        assert!(
            !text.contains("DO-NOT-LEAK"),
            "part of the token leaked into: {text}"
        );
    }
}

#[test]
fn a_missing_token_variable_fails_the_build_and_names_it() {
    let mut config = serverless_config("http://127.0.0.1:9".into());
    config.token_env = Some("INFERFLOW_TEST_HF_UNSET_TOKEN".into());
    let err = HuggingFaceProvider::new(config).unwrap_err();
    assert_eq!(
        err,
        BuildError::MissingApiKey {
            env: "INFERFLOW_TEST_HF_UNSET_TOKEN".into()
        }
    );
    // The serverless API needs a token; TEI does not.
    let mut config = serverless_config("http://127.0.0.1:9".into());
    config.token_env = None;
    assert!(matches!(
        HuggingFaceProvider::new(config),
        Err(BuildError::InvalidConfig { .. })
    ));
    assert!(HuggingFaceProvider::new(tei_config("http://127.0.0.1:9".into())).is_ok());
}
