//! Distributed traces: W3C trace context across Kafka and HTTP, spans exported over OTLP/HTTP.
//!
//! The `[tracing]` section ([`TracingConfig`]) is off by default. When it is on, [`init`]
//! installs an OpenTelemetry tracer (parent-based ratio sampling, a batch span processor on
//! its own thread, the OTLP/HTTP protobuf exporter on a blocking reqwest client) and from then
//! on:
//!
//! - each request gets one span, `inferflow.request` ([`request_span`]), whose parent is the
//!   `traceparent` (and `tracestate`) the request came with, in its Kafka headers or its HTTP
//!   headers, or a new trace when it came with none;
//! - each pipeline step gets a child span of it (`step NAME`), each model call a child of its
//!   step (`model ID`), each feature read a child of its step (`feature read`);
//! - the request span's context goes out again as `traceparent`/`tracestate` on the request's
//!   result or dead letter ([`outgoing`]), and the model call's on the provider's HTTP request
//!   ([`current_headers`], read by `providers::endpoint`).
//!
//! The processor hands the executor its requests' contexts as a value of the OpenTelemetry
//! [`Context`] the execute future runs in ([`with_request_traces`], one per request, in the
//! order of the requests), so the `Executor` trait and `ExecRequest` stay as they are; the
//! pipeline engine reads them ([`request_traces`]).
//!
//! **Off costs nothing on the request path**: [`enabled`] is one atomic load, and every caller
//! checks it before it creates, parses or formats anything. What remains when off is the
//! consumer's look for a `traceparent` header, which only runs on records that have headers:
//! a record that carries one has its `traceparent` and `tracestate` bytes copied
//! ([`TraceHeaders`]) and written unchanged onto its result or dead letter, so a trace still
//! joins up across an instance that does not export spans.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::Duration;

pub use opentelemetry::Context;
use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
pub use opentelemetry::trace::SpanKind;
use opentelemetry::trace::{TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use serde::{Deserialize, Serialize};

pub use opentelemetry::context::FutureExt;

use crate::section::{Problems, Section};

/// The W3C trace-context header that names the trace and the parent span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C trace-context header with vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// `[tracing]`: distributed traces over OTLP/HTTP.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TracingConfig {
    /// Whether spans are created and exported. Off: no span, no parsing; a request's
    /// `traceparent` is still copied onto its output unchanged.
    pub enabled: bool,
    /// The OTLP/HTTP (protobuf) URL spans are posted to, used as it is (include the path, as a
    /// collector's `/v1/traces`).
    pub endpoint: String,
    /// Share of new traces recorded, 0 to 1; a request whose `traceparent` says sampled (or
    /// not) is followed as its parent decided.
    pub sampling_ratio: f64,
    /// The `service.name` of the exported spans.
    pub service_name: String,
}

impl Section for TracingConfig {
    fn validate(&self, p: &mut Problems) {
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://"))
            || reqwest::Url::parse(&self.endpoint).is_err()
        {
            p.push(
                "tracing.endpoint",
                format!(
                    "`{}` is not an http:// or https:// URL (e.g. http://127.0.0.1:4318/v1/traces)",
                    self.endpoint
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            p.push(
                "tracing.sampling_ratio",
                format!("{} is out of range: use 0 to 1", self.sampling_ratio),
            );
        }
        if self.service_name.trim().is_empty() {
            p.push("tracing.service_name", "is empty");
        }
    }
}

/// The installed tracer; set once by [`init`].
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Whether tracing is on in this process: one atomic load.
#[inline]
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// The exporter's owner: [`Tracing::shutdown`] exports the spans still buffered.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Exports what is buffered and stops the exporter (blocking: call it off the async
    /// runtime, e.g. in `spawn_blocking`), waiting at most `timeout`.
    pub fn shutdown(&self, timeout: Duration) {
        if let Err(err) = self.provider.shutdown_with_timeout(timeout) {
            tracing::warn!(error = %err, "exporting the last spans failed");
        }
    }
}

/// Installs the tracer when `cfg.enabled` (once per process: a second call keeps the first
/// tracer and returns `None`). Errors name the key to fix.
pub fn init(cfg: &TracingConfig) -> Result<Option<Tracing>, String> {
    if !cfg.enabled || TRACER.get().is_some() {
        return Ok(None);
    }
    use opentelemetry_otlp::{Protocol, WithExportConfig as _};
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(cfg.endpoint.clone())
        .build()
        .map_err(|e| format!("tracing.endpoint `{}`: {e}", cfg.endpoint))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sampling_ratio,
        ))))
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("inferflow");
    if TRACER.set(tracer).is_err() {
        return Ok(None);
    }
    tracing::info!(endpoint = %cfg.endpoint, sampling_ratio = cfg.sampling_ratio, "exporting traces over OTLP/HTTP");
    Ok(Some(Tracing { provider }))
}

/// A request's `traceparent` and `tracestate`, as they came (Kafka header bytes, or HTTP
/// header text), copied only when the request has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceHeaders {
    /// `traceparent`, as received.
    pub traceparent: String,
    /// `tracestate`, as received, if any.
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    /// From header values; `None` without a `traceparent` or when it is not UTF-8 (it would
    /// not parse as a trace context either).
    pub fn from_bytes(traceparent: Option<&[u8]>, tracestate: Option<&[u8]>) -> Option<Self> {
        let traceparent = std::str::from_utf8(traceparent?).ok()?.to_owned();
        let tracestate = tracestate
            .and_then(|b| std::str::from_utf8(b).ok())
            .map(str::to_owned);
        Some(TraceHeaders {
            traceparent,
            tracestate,
        })
    }

    /// Hands each header to `add`, as name and value.
    pub fn each(&self, mut add: impl FnMut(&'static str, &str)) {
        add(TRACEPARENT, &self.traceparent);
        if let Some(state) = &self.tracestate {
            add(TRACESTATE, state);
        }
    }
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(&self.traceparent),
            TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// Collects what the propagator injects.
#[derive(Default)]
struct Collect {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Collect {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = Some(value),
            TRACESTATE if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// Where a request came from, for its span's kind and attributes.
#[derive(Debug, Clone, Copy)]
pub enum Arrival<'a> {
    /// A Kafka record: topic, partition, offset.
    Kafka(&'a str, i32, i64),
    /// An HTTP request.
    Http,
}

/// Starts a request's span, child of the context in `incoming` (a new trace without one), and
/// returns the context holding it. `None` when tracing is off.
pub fn request_span(incoming: Option<&TraceHeaders>, arrival: Arrival<'_>) -> Option<Context> {
    let tracer = TRACER.get()?;
    let parent = match incoming {
        Some(headers) => TraceContextPropagator::new().extract(headers),
        None => Context::new(),
    };
    let mut builder = tracer.span_builder("inferflow.request");
    builder = match arrival {
        Arrival::Kafka(topic, partition, offset) => {
            builder.with_kind(SpanKind::Consumer).with_attributes([
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.destination.name", topic.to_owned()),
                KeyValue::new("messaging.destination.partition.id", i64::from(partition)),
                KeyValue::new("messaging.kafka.offset", offset),
            ])
        }
        Arrival::Http => builder.with_kind(SpanKind::Server),
    };
    let span = builder.start_with_context(tracer, &parent);
    Some(parent.with_span(span))
}

/// A child span of the span in `parent`, as a context. `None` when tracing is off.
pub fn child(
    parent: &Context,
    name: impl Into<Cow<'static, str>>,
    kind: SpanKind,
) -> Option<Context> {
    let tracer = TRACER.get()?;
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .start_with_context(tracer, parent);
    Some(parent.with_span(span))
}

/// Ends the span in `cx`.
pub fn end(cx: &Context) {
    cx.span().end();
}

/// Ends a request's span, with an error status when the request failed (`error`: its kind),
/// and returns the headers its output carries: the same trace, the request span as parent.
pub fn finish_request(cx: &Context, error: Option<&'static str>) -> Option<TraceHeaders> {
    let span = cx.span();
    if let Some(kind) = error {
        span.set_status(opentelemetry::trace::Status::error(kind));
    }
    span.end();
    outgoing(cx)
}

/// Sets an attribute on the span in `cx`.
pub fn set_attribute(cx: &Context, key: &'static str, value: impl Into<opentelemetry::Value>) {
    cx.span().set_attribute(KeyValue::new(key, value));
}

/// The `traceparent`/`tracestate` that name the span in `cx` as the parent: what a result,
/// dead letter or provider request carries. `None` when `cx` has no valid span.
pub fn outgoing(cx: &Context) -> Option<TraceHeaders> {
    let mut collect = Collect::default();
    TraceContextPropagator::new().inject_context(cx, &mut collect);
    Some(TraceHeaders {
        traceparent: collect.traceparent?,
        tracestate: collect.tracestate,
    })
}

/// The headers of the current context's span (the model call a provider request belongs to).
/// `None` when tracing is off or no span is current.
pub fn current_headers() -> Option<TraceHeaders> {
    if !enabled() {
        return None;
    }
    outgoing(&Context::current())
}

/// Runs `call`, a model call made for the requests whose (step) spans are `parents`, with a
/// `model ID` span per request; the call runs in the first one's context, so the provider's
/// HTTP request names it as parent (a batched call is one HTTP request). Off: just `call`.
pub async fn in_model_call<'a, F: std::future::Future>(
    parents: impl IntoIterator<Item = &'a Context>,
    model: &str,
    call: F,
) -> F::Output {
    let spans: Vec<Context> = if enabled() {
        parents
            .into_iter()
            .filter_map(|p| child(p, format!("model {model}"), SpanKind::Client))
            .collect()
    } else {
        Vec::new()
    };
    let out = match spans.first() {
        Some(cx) => call.with_context(cx.clone()).await,
        None => call.await,
    };
    for cx in &spans {
        set_attribute(cx, "inferflow.model", model.to_owned());
        end(cx);
    }
    out
}

/// The request contexts of a batch, one per request in the executor's order.
#[derive(Debug, Clone)]
struct RequestTraces(std::sync::Arc<[Option<Context>]>);

/// Runs `fut` with `traces` (one entry per request handed to the executor, in order) where
/// [`request_traces`] finds them.
pub fn with_request_traces<F: std::future::Future>(
    fut: F,
    traces: Vec<Option<Context>>,
) -> opentelemetry::context::WithContext<F> {
    fut.with_context(Context::current_with_value(RequestTraces(traces.into())))
}

/// The request contexts [`with_request_traces`] set for the running execute call; `None` when
/// tracing is off or none were set.
pub fn request_traces() -> Option<std::sync::Arc<[Option<Context>]>> {
    if !enabled() {
        return None;
    }
    Context::map_current(|cx| cx.get::<RequestTraces>().map(|t| t.0.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_the_propagator_when_off() {
        let h = TraceHeaders::from_bytes(
            Some(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some(b"vendor=x"),
        )
        .unwrap();
        let cx = TraceContextPropagator::new().extract(&h);
        let out = outgoing(&cx).unwrap();
        assert_eq!(out, h);
        assert!(TraceHeaders::from_bytes(None, Some(b"x")).is_none());
    }

    #[test]
    fn the_section_names_the_bad_keys() {
        let cfg = TracingConfig {
            enabled: true,
            endpoint: "127.0.0.1:4318".into(),
            sampling_ratio: 1.5,
            service_name: " ".into(),
        };
        let mut p = Problems::default();
        cfg.validate(&mut p);
        let paths: Vec<&str> = p.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "tracing.endpoint",
                "tracing.sampling_ratio",
                "tracing.service_name"
            ]
        );
    }
}
