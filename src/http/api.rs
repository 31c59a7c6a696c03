//! The inference and feature API beside Kafka: `POST /v1/predict`,
//! `POST /v1/pipelines/{id}/execute`, and reads and writes of features
//! (`schemas/openapi/inferflow.v1.json` describes them).
//!
//! A request over HTTP goes through the same decoding ([`crate::decode`]), the same executor
//! (so the same models, result cache, rate limits, breakers and provider concurrency), the
//! same execute timeout and the same result document ([`crate::processor::result_document`])
//! as a request from Kafka; only `source` is absent. Requests in flight over HTTP are bounded
//! by `http.max_in_flight_requests`: beyond it the answer is 429 at once, never a queue.
//!
//! Each route needs a scope ([`routes`]): `predict` for the inference routes, `features:read`
//! for the feature reads, `features:write` for the feature writes, `models:admin` for
//! `POST /v1/routes/{route}/drift/reference` ([`super::auth`]). A
//! principal bound to a tenant acts for that tenant only ([`super::auth::bind_tenant`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::Semaphore;

use super::auth::{Gate, authorize, bind_tenant, forbidden};
use crate::access::{Access, Principal, Scope};
use crate::decode::{DecodeRules, Decoded, decode};
use crate::executor::{ExecRequest, ExecResult, Executor};
use crate::feature_store::FeatureStore;
use crate::model::{ErrorBody, ErrorKind, InferenceResult, Target};
use crate::pipeline::PipelineManager;
use crate::processor::result_document;
use crate::tracing_otel::{self as otel, Arrival, TraceHeaders};

/// What the API needs; built once by the service and shared with the Kafka path.
pub struct Api {
    /// The executor the processor uses too.
    pub executor: Arc<dyn Executor>,
    /// The feature store: the one the service opened, or the configured one, opened on first
    /// use. Readiness checks the same one.
    pub features: Arc<super::SharedStore>,
    /// Decoding rules (size limit, `reply_to` allow-list), as for Kafka.
    pub rules: DecodeRules,
    /// `executor.execute_timeout_ms`.
    pub execute_timeout: Duration,
    /// `http.max_in_flight_requests` permits.
    pub permits: Arc<Semaphore>,
    /// The pipelines, whose snapshot holds the current model manager and its routes (a reload
    /// installs another), for the route administration; `None` answers 404 there.
    pub pipelines: Option<Arc<PipelineManager>>,
}

/// The HTTP status for an error kind.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidJson | ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::UnknownPipeline | ErrorKind::UnknownModel => StatusCode::NOT_FOUND,
        ErrorKind::ReplyToNotAllowed => StatusCode::FORBIDDEN,
        ErrorKind::DeadlineExceeded | ErrorKind::ProviderTimeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::ProviderError => StatusCode::BAD_GATEWAY,
        ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::FeatureStoreError => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::StepFailed => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `{"error": {"kind": ..., "message": ...}}` with the kind's status.
fn error_response(error: ErrorBody) -> Response {
    let status = status_for(error.kind);
    (status, Json(serde_json::json!({ "error": error }))).into_response()
}

/// A result document, with 200 when it is `ok` and the error kind's status otherwise.
fn result_response(doc: InferenceResult) -> Response {
    let status = doc
        .error
        .as_ref()
        .map_or(StatusCode::OK, |e| status_for(e.kind));
    (status, Json(doc)).into_response()
}

/// The API routes, merged into the server's router, each group behind the scope it needs:
/// `predict` for inference, `features:read` for the `GET` feature routes, `features:write`
/// for `PUT /v1/features`, `models:admin` for the route administration.
pub fn routes(api: Arc<Api>, access: Arc<Access>) -> Router {
    let gate = |scope| {
        axum::middleware::from_fn_with_state(
            Gate {
                access: Arc::clone(&access),
                scope,
            },
            authorize,
        )
    };
    let predict_routes = Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/pipelines/{id}/execute", post(execute_pipeline))
        .route_layer(gate(Scope::Predict));
    let write_routes = Router::new()
        .route("/v1/features", put(put_feature))
        .route_layer(gate(Scope::FeaturesWrite));
    let read_routes = Router::new()
        .route("/v1/features/{entity_type}/{entity_id}", get(get_vector))
        .route(
            "/v1/features/{entity_type}/{entity_id}/{feature}",
            get(get_feature),
        )
        .route(
            "/v1/feature-groups/{group}/vectors/{entity_id}",
            get(get_group_vector),
        )
        .route_layer(gate(Scope::FeaturesRead));
    let admin_routes = Router::new()
        .route("/v1/routes/{route}/drift/reference", post(rebase_reference))
        .route_layer(gate(Scope::ModelsAdmin));
    predict_routes
        .merge(write_routes)
        .merge(read_routes)
        .merge(admin_routes)
        .with_state(api)
}

/// The principal the access gate let through, if any (none when the API is open).
type Caller = Option<Extension<Arc<Principal>>>;

/// Reads the body, refusing more than `limit` bytes with a `payload_too_large` error.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ErrorBody> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ErrorBody::new(
            ErrorKind::PayloadTooLarge,
            format!("the request body is larger than the {limit} bytes allowed (executor.max_request_bytes)"),
        )
    })
}

/// `POST /v1/predict`: the body is an inference request, as on the requests topic;
/// `request_id` may be left out (one is generated).
/// A principal bound to a tenant sets `tenant` when it is absent, and is refused (403) when
/// the body names another.
async fn predict(
    State(api): State<Arc<Api>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let bytes = match read_body(body, api.rules.max_request_bytes).await {
        Ok(b) => b,
        Err(error) => return error_response(error),
    };
    let principal = caller.as_ref().map(|Extension(p)| p);
    match prepare(&bytes, principal) {
        Ok(bytes) => traced(&headers, |trace| run(&api, bytes, trace)).await,
        Err(refused) => forbidden(refused),
    }
}

/// Runs `answer` with the request's span (tracing on: a child of the `traceparent` and
/// `tracestate` HTTP headers), and puts the trace headers on the response: the request span's
/// when tracing is on, the request's own, unchanged, when it is off.
async fn traced<F, Fut>(headers: &HeaderMap, answer: F) -> Response
where
    F: FnOnce(Option<otel::Context>) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let incoming = TraceHeaders::from_bytes(
        headers.get(otel::TRACEPARENT).map(|v| v.as_bytes()),
        headers.get(otel::TRACESTATE).map(|v| v.as_bytes()),
    );
    let span = otel::request_span(incoming.as_ref(), Arrival::Http);
    let mut response = answer(span.clone()).await;
    let outgoing = match &span {
        Some(cx) => {
            let error = (!response.status().is_success()).then_some("error");
            otel::finish_request(cx, error)
        }
        None => incoming,
    };
    if let Some(trace) = outgoing {
        trace.each(|key, value| {
            if let Ok(value) = HeaderValue::from_str(value) {
                response.headers_mut().insert(key, value);
            }
        });
    }
    response
}

/// `POST /v1/routes/{route}/drift/reference`: the current window of every version and output
/// path of the route's monitor becomes its drift reference, frozen
/// ([`crate::providers::manager::ModelManager::rebase_reference`]). Answers what each
/// reference holds; 404 (`unknown_model`) for a route that does not exist or has no
/// `monitor`.
async fn rebase_reference(State(api): State<Arc<Api>>, Path(route): Path<String>) -> Response {
    let models = api.pipelines.as_ref().map(|p| p.models());
    let Some(models) = models else {
        return error_response(ErrorBody::new(
            ErrorKind::UnknownModel,
            format!("no route `{route}`: this server has no models"),
        ));
    };
    match models.rebase_reference(&route) {
        Some(references) => (
            StatusCode::OK,
            Json(serde_json::json!({ "route": route, "references": references })),
        )
            .into_response(),
        None => {
            let why = if models.route(&route).is_some() {
                format!(
                    "route `{route}` has no monitor ([routes.{route}.monitor]): it keeps no drift reference"
                )
            } else {
                format!("no route `{route}` ([routes] of the configuration)")
            };
            error_response(ErrorBody::new(ErrorKind::UnknownModel, why))
        }
    }
}

/// The body of `POST /v1/pipelines/{id}/execute`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecuteBody {
    #[serde(default)]
    request_id: Option<String>,
    data: Value,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    entity: Option<Value>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    deadline_ms: Option<i64>,
}

/// `POST /v1/pipelines/{id}/execute`: the body holds `data` (and optionally `request_id`,
/// `parameters`, `entity`, `tenant`, `deadline_ms`); the pipeline comes from the path.
async fn execute_pipeline(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let bytes = match read_body(body, api.rules.max_request_bytes).await {
        Ok(b) => b,
        Err(error) => return error_response(error),
    };
    let parsed: ExecuteBody = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) if e.is_syntax() || e.is_eof() => {
            return error_response(ErrorBody::new(
                ErrorKind::InvalidJson,
                format!("not valid JSON: {e}"),
            ));
        }
        Err(e) => {
            return error_response(ErrorBody::new(
                ErrorKind::InvalidRequest,
                format!("invalid body: {e}"),
            ));
        }
    };
    let tenant = match bind_tenant(caller.as_ref().map(|Extension(p)| p), parsed.tenant) {
        Ok(t) => t,
        Err(refused) => return forbidden(refused),
    };
    let mut request = Map::new();
    request.insert(
        "request_id".into(),
        Value::String(parsed.request_id.unwrap_or_else(new_request_id)),
    );
    request.insert("pipeline".into(), Value::String(id));
    request.insert("data".into(), parsed.data);
    let optional = [
        ("parameters", parsed.parameters.map(Value::Object)),
        ("entity", parsed.entity),
        ("tenant", tenant.map(Value::String)),
        ("deadline_ms", parsed.deadline_ms.map(Value::from)),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            request.insert(key.into(), v);
        }
    }
    let bytes = serde_json::to_vec(&Value::Object(request)).unwrap_or_default();
    traced(&headers, |trace| run(&api, bytes, trace)).await
}

fn new_request_id() -> String {
    format!("http-{}", uuid::Uuid::new_v4())
}

/// The body of `POST /v1/predict` with a generated `request_id` when it is a JSON object
/// without one, and the tenant of `principal` when it is bound to one; otherwise the body as
/// it is (decoding then reports what is wrong). A body naming another tenant than the
/// principal's is refused: the message for the 403.
fn prepare(bytes: &[u8], principal: Option<&Arc<Principal>>) -> Result<Vec<u8>, String> {
    let bound = principal.is_some_and(|p| p.tenant.is_some());
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(mut map)) if bound || !map.contains_key("request_id") => {
            if bound {
                let named = match map.remove("tenant") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(t)) => Some(t),
                    // Not a tenant at all: never one the principal may name.
                    Some(_) => Some(String::new()),
                };
                if let Some(tenant) = bind_tenant(principal, named)? {
                    map.insert("tenant".into(), Value::String(tenant));
                }
            }
            if !map.contains_key("request_id") {
                map.insert("request_id".into(), Value::String(new_request_id()));
            }
            Ok(serde_json::to_vec(&Value::Object(map)).unwrap_or_else(|_| bytes.to_vec()))
        }
        _ => Ok(bytes.to_vec()),
    }
}

/// Decodes, admits and executes one request the way the processor does, and answers with its
/// result document.
async fn run(api: &Api, bytes: Vec<u8>, trace: Option<otel::Context>) -> Response {
    let arrived = Instant::now();
    let Ok(_permit) = api.permits.try_acquire() else {
        return error_response(ErrorBody::new(
            ErrorKind::RateLimited,
            "too many HTTP requests in flight (http.max_in_flight_requests); retry shortly",
        ));
    };
    let now_ms = crate::feature_store::model::unix_now_ms() as i64;
    let (request, target) = match decode(Some(&bytes), &api.rules, now_ms) {
        Decoded::Request { request, target } => (request, target),
        Decoded::Reject {
            request_id,
            target,
            error,
        } => {
            let doc = result_document(
                &request_id,
                target.as_ref(),
                Err(error),
                None,
                arrived.elapsed(),
            );
            return result_response(doc);
        }
        Decoded::DeadLetter(error) => return error_response(error),
    };
    if request.reply_to.is_some() {
        // Over HTTP the answer is the response; a reply topic has no meaning here.
        let doc = result_document(
            &request.request_id,
            Some(&target),
            Err(ErrorBody::new(
                ErrorKind::InvalidRequest,
                "reply_to is for Kafka requests; over HTTP the result is the response",
            )),
            None,
            arrived.elapsed(),
        );
        return result_response(doc);
    }
    let request_id = request.request_id.clone();
    let execute = execute_one(api, &target, request_into_exec(request));
    let result = match trace {
        Some(cx) => otel::with_request_traces(execute, vec![Some(cx)]).await,
        None => execute.await,
    };
    result_response(result_document(
        &request_id,
        Some(&target),
        result,
        None,
        arrived.elapsed(),
    ))
}

fn request_into_exec(r: crate::model::InferenceRequest) -> ExecRequest {
    ExecRequest {
        request_id: r.request_id,
        data: r.data,
        parameters: r.parameters,
        entity: r.entity,
        tenant: r.tenant,
    }
}

/// Admission (outside the timeout), then execution under the execute timeout.
async fn execute_one(api: &Api, target: &Target, request: ExecRequest) -> ExecResult {
    api.executor.admit(target, 1).await;
    match tokio::time::timeout(
        api.execute_timeout,
        api.executor.execute(target, vec![request]),
    )
    .await
    {
        Ok(mut results) if results.len() == 1 => results.pop().unwrap_or_else(|| {
            Err(ErrorBody::new(
                ErrorKind::Internal,
                "the executor returned no outcome",
            ))
        }),
        Ok(results) => Err(ErrorBody::new(
            ErrorKind::Internal,
            format!(
                "the executor returned {} outcomes for 1 request",
                results.len()
            ),
        )),
        Err(_) => Err(ErrorBody::new(
            ErrorKind::ProviderTimeout,
            format!(
                "no answer within {} ms (executor.execute_timeout_ms)",
                api.execute_timeout.as_millis()
            ),
        )),
    }
}

/// The store, opened on first use; 503 (`feature_store_error`) when it cannot be opened.
async fn store(api: &Api) -> Result<&Arc<FeatureStore>, ErrorBody> {
    api.features.get().await.map_err(|e| {
        ErrorBody::new(
            ErrorKind::FeatureStoreError,
            format!(
                "could not open the feature store ({}): {e}",
                api.features.describe()
            ),
        )
    })
}

fn store_error(err: crate::feature_store::FeatureStoreError) -> Response {
    use crate::feature_store::FeatureStoreError as E;
    let kind = match &err {
        E::Invalid { .. } => ErrorKind::InvalidRequest,
        _ => ErrorKind::FeatureStoreError,
    };
    error_response(ErrorBody::new(kind, err.to_string()))
}

/// `PUT /v1/features`: one feature update, the same document as on the features topic
/// (`schemas/feature_update.v1.json`); `event_time` defaults to now.
async fn put_feature(State(api): State<Arc<Api>>, body: Body) -> Response {
    let store = match store(&api).await {
        Ok(s) => Arc::clone(s),
        Err(error) => return error_response(error),
    };
    let bytes = match read_body(body, api.rules.max_request_bytes).await {
        Ok(b) => b,
        Err(error) => return error_response(error),
    };
    let now = crate::feature_store::model::unix_now_ms() as i64;
    let update = match crate::feature_store::ingest::decode_update(
        Some(&bytes),
        api.rules.max_request_bytes,
        Some(now),
    ) {
        Ok(u) => u,
        Err(e) => return error_response(e),
    };
    match store.set_feature(&update).await {
        Ok(()) => (
            StatusCode::OK,
            Json(serde_json::json!({
                "entity_type": update.entity_type,
                "entity_id": update.entity_id,
                "feature": update.name,
                "version": update.version,
            })),
        )
            .into_response(),
        Err(e) => store_error(e),
    }
}

/// `names=a,b,c` for vector reads.
#[derive(Debug, Deserialize)]
struct NamesQuery {
    names: Option<String>,
}

/// `GET /v1/features/{entity_type}/{entity_id}?names=a,b`: a feature vector.
async fn get_vector(
    State(api): State<Arc<Api>>,
    Path((entity_type, entity_id)): Path<(String, String)>,
    Query(query): Query<NamesQuery>,
) -> Response {
    let store = match store(&api).await {
        Ok(s) => s,
        Err(error) => return error_response(error),
    };
    let names: Vec<String> = query
        .names
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        return error_response(ErrorBody::new(
            ErrorKind::InvalidRequest,
            "name the features: ?names=a,b,c",
        ));
    }
    match store
        .get_feature_vector(&entity_type, &entity_id, &names)
        .await
    {
        Ok(vector) => Json(vector).into_response(),
        Err(e) => store_error(e),
    }
}

/// `GET /v1/features/{entity_type}/{entity_id}/{feature}`: one feature, 404 when absent.
async fn get_feature(
    State(api): State<Arc<Api>>,
    Path((entity_type, entity_id, feature)): Path<(String, String, String)>,
) -> Response {
    let store = match store(&api).await {
        Ok(s) => s,
        Err(error) => return error_response(error),
    };
    match store.get_feature_vector(&entity_type, &entity_id, &[feature.as_str()]).await {
        Ok(mut vector) => match vector.features.remove(&feature) {
            Some(value) => Json(value).into_response(),
            None => (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"error": {"kind": "not_found", "message": format!("no value for {entity_type}/{entity_id}/{feature}")}})),
            )
                .into_response(),
        },
        Err(e) => store_error(e),
    }
}

/// `version=N` for group reads.
#[derive(Debug, Deserialize)]
struct VersionQuery {
    version: Option<u32>,
}

/// `GET /v1/feature-groups/{group}/vectors/{entity_id}?version=N`: a group's vector.
async fn get_group_vector(
    State(api): State<Arc<Api>>,
    Path((group, entity_id)): Path<(String, String)>,
    Query(query): Query<VersionQuery>,
) -> Response {
    let store = match store(&api).await {
        Ok(s) => s,
        Err(error) => return error_response(error),
    };
    let found = match store.get_feature_group(&group, query.version).await {
        Ok(Some(g)) => g,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"error": {"kind": "not_found", "message": format!("no feature group `{group}`")}})),
            )
                .into_response();
        }
        Err(e) => return store_error(e),
    };
    match store.get_feature_group_vector(&found, &entity_id).await {
        Ok(vector) => Json(vector).into_response(),
        Err(e) => store_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_has_a_client_or_server_status() {
        for kind in ErrorKind::ALL {
            let status = status_for(kind);
            assert!(
                status.is_client_error() || status.is_server_error(),
                "{kind}: {status}"
            );
        }
        assert_eq!(
            status_for(ErrorKind::UnknownPipeline),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status_for(ErrorKind::RateLimited),
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[test]
    fn a_request_id_is_added_only_when_missing() {
        let with: Value =
            serde_json::from_slice(&prepare(br#"{"model":"echo","data":1}"#, None).unwrap())
                .unwrap();
        assert!(with["request_id"].as_str().unwrap().starts_with("http-"));
        let kept: Value =
            serde_json::from_slice(&prepare(br#"{"request_id":"a","data":1}"#, None).unwrap())
                .unwrap();
        assert_eq!(kept["request_id"], "a");
        assert_eq!(prepare(b"not json", None).unwrap(), b"not json");
    }
}
