//! Traces across Kafka (README, "Tracing"): W3C trace context from a request's headers to its
//! result, its dead letter and the provider's HTTP request, and the spans `inferflow run`
//! exports, decoded from real OTLP/HTTP protobuf by a receiver in the test.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use inferflow::executor::Builtins;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::fake_openai::{FakeOpenAi, Mode};
use crate::harness::{Captured, Running, Topics, collect, config, inferflow_run};
use crate::utils::{self, free_port, kafka_config, unique_name};

/// One exported span, as the receiver decoded it (ids in hex).
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    service: String,
}

/// An OTLP/HTTP traces receiver on loopback: decodes every `ExportTraceServiceRequest`.
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    url: String,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let app = axum::Router::new()
            .route("/v1/traces", post(export))
            .with_state(Arc::clone(&spans));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("receiver") });
        Receiver {
            spans,
            url: format!("http://{addr}/v1/traces"),
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

async fn export(
    State(spans): State<Arc<Mutex<Vec<Span>>>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, Vec<u8>) {
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/x-protobuf"),
        "OTLP/HTTP with protobuf"
    );
    let request = match ExportTraceServiceRequest::decode(body) {
        Ok(r) => r,
        Err(_) => return (StatusCode::BAD_REQUEST, Vec::new()),
    };
    let mut out = spans.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .map(|v| format!("{:?}", v.value))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                out.push(Span {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    service: service.clone(),
                });
            }
        }
    }
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `00-TRACE-SPAN-FLAGS` → (trace id, parent span id).
fn parts(traceparent: &str) -> (String, String) {
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "a W3C traceparent: {traceparent}");
    (fields[1].to_owned(), fields[2].to_owned())
}

/// Produces `value` with `headers` and waits for the acknowledgement.
async fn produce_with_headers(topic: &str, value: &[u8], headers: &[(&str, &str)]) {
    let producer: FutureProducer = kafka_config().create().expect("producer");
    let mut owned = OwnedHeaders::new();
    for (key, value) in headers {
        owned = owned.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    let record: FutureRecord<'_, [u8], [u8]> =
        FutureRecord::to(topic).payload(value).headers(owned);
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

const TRACE_A: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN_A: &str = "00f067aa0ba902b7";
const TRACE_B: &str = "0af7651916cd43dd8448eb211c80319c";
const PRODUCER_SPAN_B: &str = "b7ad6b7169203331";
const TRACE_C: &str = "5bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN_C: &str = "10f067aa0ba902b7";

/// A request produced with a `traceparent` gets a result (and a bad one a dead letter) in the
/// same trace, with the request span as parent; the provider's HTTP request names the model
/// call; and the exported spans nest: request under the producer's span, steps under the
/// request, the feature read and the model call under their steps. Over HTTP, the trace
/// comes from the request's headers and goes back on the response's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_trace_reaches_its_result_dead_letter_provider_and_the_otlp_receiver() {
    utils::init_tracing();
    utils::require_kafka().await;
    let receiver = Receiver::start().await;
    let provider = FakeOpenAi::start(Mode::Healthy).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/traced.toml"),
        r#"
id = "traced"

[[steps]]
type = "features"
name = "profile"
entity_type = "user"
features = ["profile"]
entity_id = "data.user"

[[steps]]
type = "preprocess"
name = "clean"
transforms = [{ op = "clean", field = "text", max_chars = 100 }]

[[steps]]
type = "model"
name = "chat"
model = "chat@1"
input = "data.text"
"#,
    )
    .unwrap();
    let config_file = dir.path().join("inferflow.toml");
    std::fs::write(
        &config_file,
        format!(
            r#"
[pipelines]
dir = {pipelines:?}

[feature_store]
backend = "embedded"
path = {store:?}

[tracing]
enabled = true
endpoint = "{endpoint}"
sampling_ratio = 0.0
service_name = "inferflow-under-test"

[providers.fake.openai]
base_url = "{base_url}"
api_key_env = "INFERFLOW_TEST_TRACE_KEY"
[providers.fake.openai.models.chat]
task = "chat"

[models."chat@1"]
provider = "fake"
cache = false
"#,
            pipelines = dir.path().join("pipelines").to_str().unwrap(),
            store = dir.path().join("features.redb").to_str().unwrap(),
            endpoint = receiver.url,
            base_url = provider.base_url,
        ),
    )
    .unwrap();
    let topics = Topics::create("trace", 1).await;
    let group = unique_name("trace");
    let port = free_port();
    let mut child = Killed(
        inferflow_run(&topics, &group, Some(&config_file), "warn")
            .env("INFERFLOW_TEST_TRACE_KEY", "sk-test")
            .env("INFERFLOW__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .spawn()
            .expect("start inferflow run"),
    );

    // Sampled by its parent (`-01`), though `sampling_ratio` is 0 for new traces.
    let request = json!({"request_id": "traced-1", "pipeline": "traced", "data": {"text": "  hello  ", "user": "u1"}});
    produce_with_headers(
        &topics.requests,
        request.to_string().as_bytes(),
        &[
            ("traceparent", &format!("00-{TRACE_A}-{PRODUCER_SPAN_A}-01")),
            ("tracestate", "vendor=abc"),
        ],
    )
    .await;
    produce_with_headers(
        &topics.requests,
        b"not json",
        &[("traceparent", &format!("00-{TRACE_B}-{PRODUCER_SPAN_B}-01"))],
    )
    .await;
    let out = collect(
        &[&topics.results, &topics.dlq],
        2,
        Duration::from_secs(90),
        Duration::from_millis(300),
    )
    .await;
    let by_topic: HashMap<&str, &Captured> = out.iter().map(|c| (c.topic.as_str(), c)).collect();
    let result = by_topic[topics.results.as_str()];
    let doc: Value = serde_json::from_slice(result.value.as_deref().unwrap()).unwrap();
    assert_eq!(doc["status"], "ok", "{doc}");
    assert!(doc["output"].to_string().contains("echo: hello"), "{doc}");
    let (trace, request_span) = parts(&result.headers["traceparent"]);
    assert_eq!(trace, TRACE_A, "the result is in the request's trace");
    assert_ne!(
        request_span, PRODUCER_SPAN_A,
        "its parent is inferflow's request span"
    );
    assert_eq!(result.headers["tracestate"], "vendor=abc");
    let dead = by_topic[topics.dlq.as_str()];
    let (dead_trace, dead_parent) = parts(&dead.headers["traceparent"]);
    assert_eq!(
        dead_trace, TRACE_B,
        "the dead letter is in its record's trace"
    );
    assert_ne!(dead_parent, PRODUCER_SPAN_B);

    // The provider's HTTP request, in the same trace.
    let calls = provider.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let (provider_trace, model_span) =
        parts(calls[0].traceparent.as_deref().expect("a traceparent"));
    assert_eq!(provider_trace, TRACE_A);

    // Over HTTP: the trace comes from the request's headers and goes out on the response's.
    let response = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{port}/v1/pipelines/traced/execute"
        ))
        .header("traceparent", format!("00-{TRACE_C}-{PRODUCER_SPAN_C}-01"))
        .json(&json!({"data": {"text": "over http", "user": "u2"}}))
        .send()
        .await
        .expect("POST /v1/pipelines/traced/execute");
    assert!(response.status().is_success(), "{response:?}");
    let (http_trace, http_span) = parts(
        response.headers()["traceparent"]
            .to_str()
            .expect("a text header"),
    );
    assert_eq!(http_trace, TRACE_C);
    let calls = provider.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let (provider_trace, _) = parts(calls[1].traceparent.as_deref().expect("a traceparent"));
    assert_eq!(provider_trace, TRACE_C);

    // A graceful stop exports what is still buffered.
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        child.0.wait().unwrap().success(),
        "inferflow run exits cleanly"
    );
    let spans: Vec<Span> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == TRACE_A)
        .collect();
    let named = |name: &str| -> Span {
        let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one `{name}` span in {spans:#?}");
        found[0].clone()
    };
    let request = named("inferflow.request");
    assert_eq!(
        request.parent_span_id, PRODUCER_SPAN_A,
        "child of the producer's span"
    );
    assert_eq!(
        request.span_id, request_span,
        "the result names the request span"
    );
    assert!(
        request.service.contains("inferflow-under-test"),
        "{request:?}"
    );
    let profile = named("step profile");
    assert_eq!(profile.parent_span_id, request.span_id);
    let read = named("feature read");
    assert_eq!(
        read.parent_span_id, profile.span_id,
        "the feature read is under its step"
    );
    let clean = named("step clean");
    let chat = named("step chat");
    assert_eq!(clean.parent_span_id, request.span_id);
    assert_eq!(chat.parent_span_id, request.span_id);
    let model = named("model chat@1");
    assert_eq!(
        model.parent_span_id, chat.span_id,
        "the model call is under its step"
    );
    assert_eq!(
        model.span_id, model_span,
        "the provider request names the model call"
    );
    // The dead letter's request span is exported too, under its producer's span.
    let dead_spans: Vec<Span> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == TRACE_B)
        .collect();
    assert_eq!(dead_spans.len(), 1, "{dead_spans:#?}");
    assert_eq!(dead_spans[0].parent_span_id, PRODUCER_SPAN_B);
    assert_eq!(dead_spans[0].span_id, dead_parent);
    let http_request: Vec<Span> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == TRACE_C && s.name == "inferflow.request")
        .collect();
    assert_eq!(http_request.len(), 1, "{http_request:#?}");
    assert_eq!(http_request[0].parent_span_id, PRODUCER_SPAN_C);
    assert_eq!(http_request[0].span_id, http_span);
}

/// With tracing off (the default) nothing is parsed or created, but a request's
/// `traceparent` and `tracestate` reach its result and its dead letter unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tracing_off_the_trace_headers_are_copied_unchanged() {
    utils::init_tracing();
    let topics = Topics::create("traceoff", 1).await;
    let group = unique_name("traceoff");
    let running = Running::start(&config(&topics, &group, ""), Arc::new(Builtins)).await;
    let parent = format!("00-{TRACE_A}-{PRODUCER_SPAN_A}-01");
    let request = json!({"request_id": "plain-1", "pipeline": "identity", "data": 1});
    produce_with_headers(
        &topics.requests,
        request.to_string().as_bytes(),
        &[("traceparent", &parent), ("tracestate", "vendor=abc")],
    )
    .await;
    produce_with_headers(&topics.requests, b"{", &[("traceparent", &parent)]).await;
    let untraced = json!({"request_id": "plain-2", "pipeline": "identity", "data": 2});
    produce_with_headers(&topics.requests, untraced.to_string().as_bytes(), &[]).await;
    let out = collect(
        &[&topics.results, &topics.dlq],
        3,
        Duration::from_secs(60),
        Duration::from_millis(300),
    )
    .await;
    running.stop().await;
    let key = |c: &Captured| {
        c.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    };
    for c in &out {
        match (c.topic == topics.dlq, key(c).as_deref()) {
            (false, Some("plain-1")) | (true, _) => {
                assert_eq!(c.headers.get("traceparent"), Some(&parent), "{c:?}");
            }
            (false, Some("plain-2")) => {
                assert!(!c.headers.contains_key("traceparent"), "{c:?}");
            }
            other => panic!("unexpected output {other:?}: {c:?}"),
        }
    }
    let result = out
        .iter()
        .find(|c| key(c).as_deref() == Some("plain-1"))
        .unwrap();
    assert_eq!(result.headers["tracestate"], "vendor=abc");
}

/// The child process, killed if the test fails before it stops it.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
