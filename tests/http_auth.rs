//! Access control of the HTTP API against the real listener (`app::serve_listeners` on
//! port-0 loopback sockets, plain, TLS and mTLS): every `/v1` route with no token, a wrong
//! token, a token without the scope and a token bound to another tenant (refused with the
//! right status, nothing executed, nothing written to the store); per-token limits (429 with
//! `Retry-After`); the ops listener; TLS and mTLS handshakes, certificate reload; and token
//! values nowhere in TRACE logs, `/metrics` or error bodies.
//!
//! Needs no server of the stack: the feature store is an embedded file, and the executor
//! records the tenant each request ran for (readiness, which would ask Kafka, is not called).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use inferflow::app::{Listeners, serve_listeners};
use inferflow::config::Config;
use inferflow::executor::{ExecOutput, ExecRequest, ExecResult, Executor};
use inferflow::feature_store::FeatureStore;
use inferflow::http::api::Api;
use inferflow::model::Target;
use inferflow::pipeline::PipelineManager;
use inferflow::providers::build::{build_manager, with_routes};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

/// The tokens of the tests, in clear. None of them may ever show in a log line, a metric or
/// an error body.
const ALL: &str = "tok-all-6b1f0c2e9d";
const PREDICT_ONLY: &str = "tok-predict-77aa31";
const READER: &str = "tok-reader-5c0d12";
const ACME: &str = "tok-acme-e81b44";
const LIMITED: &str = "tok-limited-90cc7e";
const FROM_FILE: &str = "tok-file-1d2e3f";
const WRONG: &str = "tok-wrong-000000";
const SECRETS: [&str; 7] = [ALL, PREDICT_ONLY, READER, ACME, LIMITED, FROM_FILE, WRONG];

fn hex_sha256(token: &str) -> String {
    inferflow::access::sha256(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every log line of this test binary, at TRACE.
fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Sink(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        logs
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Answers every request with the tenant it ran for; `{"sleep_ms": N}` as data makes it wait.
struct Recorder;

impl Executor for Recorder {
    fn execute<'a>(
        &'a self,
        _target: &'a Target,
        requests: Vec<ExecRequest>,
    ) -> BoxFuture<'a, Vec<ExecResult>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for r in requests {
                if let Some(ms) = r.data.get("sleep_ms").and_then(Value::as_u64) {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                out.push(Ok(ExecOutput {
                    output: json!({"tenant": r.tenant}),
                    model_version: None,
                    cached: false,
                    steps: Vec::new(),
                }));
            }
            out
        })
    }
}

/// The models of the route administration: `sentiment` routed to VADER and watched, `plain`
/// routed without a monitor.
const MODELS: &str = r#"
[providers.local.local.models.vader]
kind = "vader"
path = "models/vader"
[models."sentiment@1"]
provider = "local"
remote_model = "vader"
cache = false
[models."plain@1"]
provider = "local"
remote_model = "vader"
cache = false
[routes.sentiment]
versions = { "1" = 100 }
[routes.sentiment.monitor]
labels = ["label"]
reference_secs = 3600
current_secs = 3600
[routes.plain]
versions = { "1" = 100 }
"#;

/// A served API: its URLs, its store, its models, and what stops it.
struct Served {
    url: String,
    ops_url: Option<String>,
    store: Arc<FeatureStore>,
    pipelines: Arc<PipelineManager>,
    _dir: tempfile::TempDir,
    _stop: DropGuard,
}

/// The tokens of most tests, as `[[http.tokens]]` tables.
fn tokens_toml(dir: &std::path::Path) -> String {
    let file = dir.join("file-token");
    std::fs::write(&file, format!("{FROM_FILE}\n")).unwrap();
    format!(
        r#"
        [[http.tokens]]
        name = "all"
        sha256 = "{}"
        scopes = ["predict", "features:read", "features:write", "models:admin"]
        [[http.tokens]]
        name = "predict-only"
        sha256 = "{}"
        scopes = ["predict"]
        [[http.tokens]]
        name = "reader"
        sha256 = "{}"
        scopes = ["features:read"]
        [[http.tokens]]
        name = "acme"
        sha256 = "{}"
        scopes = ["predict", "features:read", "features:write", "models:admin"]
        tenant = "acme"
        [[http.tokens]]
        name = "limited"
        sha256 = "{}"
        scopes = ["predict"]
        max_requests_per_second = 2
        max_in_flight = 1
        [[http.tokens]]
        name = "from-file"
        file = "{}"
        scopes = ["features:read"]
        "#,
        hex_sha256(ALL),
        hex_sha256(PREDICT_ONLY),
        hex_sha256(READER),
        hex_sha256(ACME),
        hex_sha256(LIMITED),
        file.display(),
    )
}

/// Serves the API with `http` (TOML for `[http]` and its tables, given the temporary
/// directory) on loopback, with an ops listener when `ops` is set.
async fn serve(http: impl FnOnce(&std::path::Path) -> String, ops: bool) -> Served {
    captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[kafka]\nbootstrap_servers = \"127.0.0.1:1\"\n[feature_store]\nbackend = \"embedded\"\npath = \"{}/features.redb\"\n{MODELS}\n{}",
        dir.path().display(),
        http(dir.path())
    );
    let config = Config::from_toml_str(&toml).expect("valid config");
    let store = Arc::new(FeatureStore::open(&config.feature_store).await.unwrap());
    let models = build_manager(&config.providers, &config.models, &config.result_cache)
        .await
        .expect("models start");
    let models = with_routes(&models, &config.routes).expect("routes");
    let pipelines = Arc::new(PipelineManager::new(models));
    let api = Arc::new(Api {
        pipelines: Some(Arc::clone(&pipelines)),
        ..inferflow::app::api(&config, Arc::new(Recorder), Some(Arc::clone(&store)))
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if config.http.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{}", listener.local_addr().unwrap());
    let ops_listener = if ops {
        Some(TcpListener::bind("127.0.0.1:0").await.unwrap())
    } else {
        None
    };
    let ops_url = ops_listener
        .as_ref()
        .map(|l| format!("http://{}", l.local_addr().unwrap()));
    let stop = CancellationToken::new();
    let cancelled = stop.clone();
    let served_store = Arc::clone(&store);
    tokio::spawn(async move {
        serve_listeners(
            &config,
            Listeners {
                api: listener,
                ops: ops_listener,
            },
            inferflow::metrics::local(),
            Some(api),
            Some(served_store),
            async move { cancelled.cancelled().await },
        )
        .await
        .expect("serve");
    });
    Served {
        url,
        ops_url,
        store,
        pipelines,
        _dir: dir,
        _stop: stop.drop_guard(),
    }
}

/// A route of the API, a body that makes it succeed, and the scope it needs.
struct Route {
    method: &'static str,
    /// As in the OpenAPI document.
    template: &'static str,
    path: &'static str,
    body: Option<Value>,
    scope: &'static str,
}

fn routes() -> Vec<Route> {
    vec![
        Route {
            method: "POST",
            template: "/v1/predict",
            path: "/v1/predict",
            body: Some(json!({"pipeline": "p", "data": {"x": 1}})),
            scope: "predict",
        },
        Route {
            method: "POST",
            template: "/v1/pipelines/{id}/execute",
            path: "/v1/pipelines/p/execute",
            body: Some(json!({"data": {"x": 1}})),
            scope: "predict",
        },
        Route {
            method: "PUT",
            template: "/v1/features",
            path: "/v1/features",
            body: Some(
                json!({"entity_type": "user", "entity_id": "u1", "feature": "profile", "values": {"segment": "gold"}, "version": 1}),
            ),
            scope: "features:write",
        },
        Route {
            method: "GET",
            template: "/v1/features/{entity_type}/{entity_id}",
            path: "/v1/features/user/u1?names=profile",
            body: None,
            scope: "features:read",
        },
        Route {
            method: "GET",
            template: "/v1/features/{entity_type}/{entity_id}/{feature}",
            path: "/v1/features/user/u1/profile",
            body: None,
            scope: "features:read",
        },
        Route {
            method: "GET",
            template: "/v1/feature-groups/{group}/vectors/{entity_id}",
            path: "/v1/feature-groups/g/vectors/u1",
            body: None,
            scope: "features:read",
        },
        Route {
            method: "POST",
            template: "/v1/routes/{route}/drift/reference",
            path: "/v1/routes/sentiment/drift/reference",
            body: None,
            scope: "models:admin",
        },
    ]
}

/// The routes these tests send are every `/v1` operation of the OpenAPI document, with the
/// scope it documents.
#[test]
fn the_routes_tested_are_the_documented_ones_with_their_scopes() {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("schemas/openapi/inferflow.v1.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut documented = Vec::new();
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            if path.starts_with("/v1/") {
                let scope = operation["x-scope"].as_str().unwrap_or("none").to_owned();
                documented.push((method.to_ascii_uppercase(), path.clone(), scope));
            }
        }
    }
    let mut tested: Vec<_> = routes()
        .into_iter()
        .map(|r| {
            (
                r.method.to_owned(),
                r.template.to_owned(),
                r.scope.to_owned(),
            )
        })
        .collect();
    documented.sort();
    tested.sort();
    assert_eq!(documented, tested);
}

/// Sends `route` with `token`, and the body's `tenant` when given; returns the status, the
/// headers and the body.
async fn send(
    http: &reqwest::Client,
    base: &str,
    route: &Route,
    token: Option<&str>,
    tenant: Option<&str>,
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let method = reqwest::Method::from_bytes(route.method.as_bytes()).unwrap();
    let mut request = http.request(method, format!("{base}{}", route.path));
    if let Some(mut body) = route.body.clone() {
        if let Some(tenant) = tenant {
            body["tenant"] = json!(tenant);
        }
        request = request.json(&body);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("an HTTP answer");
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

async fn profile_written(store: &FeatureStore) -> bool {
    let vector = store
        .get_feature_vector("user", "u1", &["profile"])
        .await
        .unwrap();
    vector.features.contains_key("profile")
}

fn assert_no_token(text: &str, what: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "a token shows in {what}: {text}");
    }
}

/// A token that lacks `scope` (and is not bound to a tenant).
fn without(scope: &str) -> &'static str {
    if scope == "predict" {
        READER
    } else {
        PREDICT_ONLY
    }
}

#[tokio::test]
async fn every_route_refuses_who_it_should_and_lets_in_who_it_should() {
    let served = serve(tokens_toml, false).await;
    let http = reqwest::Client::new();
    for route in routes() {
        let name = format!("{} {}", route.method, route.path);
        let mut refusals = vec![
            (None, None, StatusCode::UNAUTHORIZED, "no token"),
            (Some(WRONG), None, StatusCode::UNAUTHORIZED, "a wrong token"),
            (
                Some(without(route.scope)),
                None,
                StatusCode::FORBIDDEN,
                "a token without the scope",
            ),
        ];
        if route.scope == "predict" {
            refusals.push((
                Some(ACME),
                Some("globex"),
                StatusCode::FORBIDDEN,
                "a token bound to another tenant",
            ));
        } else {
            // The feature store has no tenants: a tenant-bound token would reach every one.
            refusals.push((
                Some(ACME),
                None,
                StatusCode::FORBIDDEN,
                "a token bound to a tenant, on the shared store",
            ));
        }
        for (token, tenant, expected, what) in refusals {
            let (status, headers, body) = send(&http, &served.url, &route, token, tenant).await;
            assert_eq!(status, expected, "{name} with {what}: {body}");
            let doc: Value = serde_json::from_str(&body).expect("a JSON error body");
            let kind = if expected == StatusCode::UNAUTHORIZED {
                let challenge = headers["www-authenticate"].to_str().unwrap();
                assert!(challenge.starts_with("Bearer"), "{name}: {challenge}");
                "unauthorized"
            } else {
                "forbidden"
            };
            assert_eq!(doc["error"]["kind"], kind, "{name} with {what}: {body}");
            assert_no_token(&body, "an error body");
            assert!(
                !profile_written(&served.store).await,
                "{name} with {what} wrote to the store"
            );
        }
    }
    // The good tokens: everything answers, and the write lands.
    for route in routes() {
        let name = format!("{} {}", route.method, route.path);
        let (status, _, body) = send(&http, &served.url, &route, Some(ALL), None).await;
        assert!(
            status == StatusCode::OK
                || (route.path.starts_with("/v1/feature-groups") && status == 404),
            "{name}: {status} {body}"
        );
    }
    assert!(profile_written(&served.store).await);
    let read = &routes()[4];
    let (status, _, body) = send(&http, &served.url, read, Some(FROM_FILE), None).await;
    assert_eq!(status, StatusCode::OK, "a token read from a file: {body}");
    assert!(body.contains("gold"), "{body}");
}

#[tokio::test]
async fn a_tenant_bound_token_acts_for_its_tenant_only() {
    let served = serve(tokens_toml, false).await;
    let http = reqwest::Client::new();
    for route in &routes()[..2] {
        let name = route.path;
        // No tenant named: the token's.
        let (status, _, body) = send(&http, &served.url, route, Some(ACME), None).await;
        assert_eq!(status, 200, "{name}: {body}");
        let doc: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["output"]["tenant"], "acme", "{name}: {body}");
        // Its own tenant named: fine.
        let (status, _, body) = send(&http, &served.url, route, Some(ACME), Some("acme")).await;
        assert_eq!(status, 200, "{name}: {body}");
        // An unbound token names any tenant.
        let (status, _, body) = send(&http, &served.url, route, Some(ALL), Some("globex")).await;
        assert_eq!(status, 200, "{name}: {body}");
        let doc: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["output"]["tenant"], "globex", "{name}: {body}");
    }
    // A tenant that is not a string is not the token's tenant either.
    let response = http
        .post(format!("{}/v1/predict", served.url))
        .bearer_auth(ACME)
        .json(&json!({"pipeline": "p", "data": 1, "tenant": ["acme"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn per_token_limits_answer_429_with_retry_after() {
    let served = serve(tokens_toml, false).await;
    let http = reqwest::Client::new();
    let predict = |data: Value| {
        http.post(format!("{}/v1/predict", served.url))
            .bearer_auth(LIMITED)
            .json(&json!({"pipeline": "p", "data": data}))
            .send()
    };
    // max_in_flight = 1: a second request while the first runs is refused.
    let slow = tokio::spawn(predict(json!({"sleep_ms": 1500})));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = predict(json!(1)).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "rate_limited");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_in_flight"),
        "{body}"
    );
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    // max_requests_per_second = 2: the bucket (two, minus the two requests above, refilled
    // meanwhile) runs dry within a few quick requests.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = predict(json!(1)).await.unwrap();
        statuses.push(response.status());
        if response.status() == 429 {
            let retry: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=1).contains(&retry), "{retry}");
            let body: Value = response.json().await.unwrap();
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("max_requests_per_second"),
                "{body}"
            );
        }
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    // Other tokens are not limited by it.
    let other = http
        .post(format!("{}/v1/predict", served.url))
        .bearer_auth(PREDICT_ONLY)
        .json(&json!({"pipeline": "p", "data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
}

#[tokio::test]
async fn the_ops_listener_serves_metrics_and_probes_and_the_api_listener_does_not() {
    let served = serve(tokens_toml, true).await;
    let http = reqwest::Client::new();
    let ops = served.ops_url.as_deref().unwrap();
    for path in ["/metrics", "/healthz"] {
        let on_ops = http.get(format!("{ops}{path}")).send().await.unwrap();
        assert_eq!(on_ops.status(), 200, "{path} on the ops listener");
        let on_api = http
            .get(format!("{}{path}", served.url))
            .bearer_auth(ALL)
            .send()
            .await
            .unwrap();
        assert_eq!(on_api.status(), 404, "{path} on the API listener");
    }
    let api_on_ops = http
        .post(format!("{ops}/v1/predict"))
        .bearer_auth(ALL)
        .json(&json!({"pipeline": "p", "data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        api_on_ops.status(),
        404,
        "the API is not on the ops listener"
    );
}

#[tokio::test]
async fn without_ops_listen_probes_stay_on_the_api_listener_without_auth() {
    let served = serve(tokens_toml, false).await;
    let health = reqwest::get(format!("{}/healthz", served.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = reqwest::get(format!("{}/metrics", served.url))
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
}

#[tokio::test]
async fn an_api_without_tokens_is_open_on_loopback() {
    let served = serve(|_| String::new(), false).await;
    let response = reqwest::Client::new()
        .post(format!("{}/v1/predict", served.url))
        .json(&json!({"pipeline": "p", "data": 1, "tenant": "any"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert!(
        logs.contains(
            "the /v1 API is unauthenticated (no http.tokens) and listens on loopback only"
        ),
        "start-up says the API is open and loopback-only: {logs}"
    );
}

/// Sends every token of this file to every route (the other tests of this binary send them
/// too, into the same log capture): none is in any log line at TRACE, in `/metrics`, or in an
/// error body.
#[tokio::test]
async fn tokens_never_show_in_logs_metrics_or_error_bodies() {
    let served = serve(tokens_toml, true).await;
    let http = reqwest::Client::new();
    for token in SECRETS {
        for route in routes() {
            let (_, _, body) = send(&http, &served.url, &route, Some(token), Some("x")).await;
            assert_no_token(&body, "an error body");
        }
    }
    let malformed = http
        .get(format!("{}/v1/features/user/u1/profile", served.url))
        .header("authorization", format!("Basic {WRONG}"))
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 401);
    assert_no_token(&malformed.text().await.unwrap(), "an error body");
    let metrics = http
        .get(format!("{}/metrics", served.ops_url.as_deref().unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_no_token(&metrics, "/metrics");
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert!(
        logs.contains("HTTP request refused") && logs.contains("token reader"),
        "the refusals are logged, by name: {logs}"
    );
    assert_no_token(&logs, "the logs");
}

mod tls {
    //! TLS and mTLS against the real listener, with certificates made here.

    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };

    /// A CA that signs server and client certificates.
    struct Ca {
        issuer: CertifiedIssuer<'static, KeyPair>,
    }

    /// A certificate and its key, PEM.
    struct Pair {
        cert: String,
        key: String,
    }

    impl Ca {
        fn new(name: &str) -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let issuer =
                CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
            Ca { issuer }
        }

        fn pem(&self) -> String {
            self.issuer.pem()
        }

        fn server(&self) -> Pair {
            let mut params =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                    .unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, "inferflow");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            self.sign(params)
        }

        fn client(&self, common_name: &str) -> Pair {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            self.sign(params)
        }

        fn sign(&self, params: CertificateParams) -> Pair {
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            Pair {
                cert: cert.pem(),
                key: key.serialize_pem(),
            }
        }
    }

    /// Writes the server's files into `dir` and returns the `[http.tls]` tables.
    fn tls_toml(dir: &std::path::Path, ca: &Ca, server: &Pair, mtls: bool) -> String {
        std::fs::write(dir.join("tls.crt"), &server.cert).unwrap();
        std::fs::write(dir.join("tls.key"), &server.key).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        let mut toml = format!(
            "[http.tls]\ncert_file = \"{0}/tls.crt\"\nkey_file = \"{0}/tls.key\"\n",
            dir.display()
        );
        if mtls {
            toml.push_str(&format!(
                "client_ca_file = \"{}/ca.crt\"\n[[http.tls.clients]]\ncommon_name = \"batch-scorer\"\nscopes = [\"predict\"]\ntenant = \"acme\"\n",
                dir.display()
            ));
        }
        toml
    }

    /// A client trusting only `ca`, presenting `identity` when given.
    fn client(ca: &Ca, identity: Option<&Pair>) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap()]);
        if let Some(pair) = identity {
            builder = builder.identity(
                reqwest::Identity::from_pkcs8_pem(pair.cert.as_bytes(), pair.key.as_bytes())
                    .unwrap(),
            );
        }
        builder.build().unwrap()
    }

    async fn predict(
        client: &reqwest::Client,
        url: &str,
        token: Option<&str>,
    ) -> reqwest::Result<reqwest::Response> {
        let mut request = client
            .post(format!("{url}/v1/predict"))
            .json(&json!({"pipeline": "p", "data": 1}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await
    }

    #[tokio::test]
    async fn tls_serves_the_api_and_reloads_a_changed_certificate() {
        let ca = Ca::new("test CA");
        let server = ca.server();
        let served = serve(
            |dir| format!("{}{}", tokens_toml(dir), tls_toml(dir, &ca, &server, false)),
            false,
        )
        .await;
        assert!(served.url.starts_with("https://"));
        let trusting = client(&ca, None);
        let ok = predict(&trusting, &served.url, Some(ALL)).await.unwrap();
        assert_eq!(ok.status(), 200);
        let no_token = predict(&trusting, &served.url, None).await.unwrap();
        assert_eq!(no_token.status(), 401);
        // Plain HTTP to the TLS port gets no HTTP answer.
        let plain = served.url.replace("https://", "http://");
        let plain_answer = predict(&reqwest::Client::new(), &plain, Some(ALL)).await;
        assert!(
            plain_answer.as_ref().map_or(true, |r| r.status() != 200),
            "{plain_answer:?}"
        );

        // A new pair from another CA replaces the files: new connections get it.
        let dir = served._dir.path();
        let other = Ca::new("next CA");
        let next = other.server();
        std::fs::write(dir.join("tls.key"), &next.key).unwrap();
        std::fs::write(dir.join("tls.crt"), &next.cert).unwrap();
        let reloaded = client(&other, None);
        let mut answered = None;
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if let Ok(r) = predict(&reloaded, &served.url, Some(ALL)).await {
                answered = Some(r.status());
                break;
            }
        }
        assert_eq!(
            answered,
            Some(StatusCode::OK),
            "the new certificate is served"
        );
        // A broken certificate file is not taken: the last good pair stays.
        std::fs::write(dir.join("tls.crt"), "not a certificate").unwrap();
        tokio::time::sleep(inferflow::access::tls::RELOAD_POLL * 2).await;
        let kept = predict(&client(&other, None), &served.url, Some(ALL))
            .await
            .unwrap();
        assert_eq!(kept.status(), 200);
        let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
        assert!(logs.contains("TLS certificate reloaded"), "{logs}");
        assert!(logs.contains("keep the previous certificate"), "{logs}");
    }

    #[tokio::test]
    async fn mtls_requires_a_certificate_from_the_ca_and_maps_its_cn_to_scopes() {
        let ca = Ca::new("test CA");
        let server = ca.server();
        let served = serve(
            |dir| format!("{}{}", tokens_toml(dir), tls_toml(dir, &ca, &server, true)),
            false,
        )
        .await;
        let url = &served.url;
        // No client certificate: the handshake is refused.
        let none = predict(&client(&ca, None), url, Some(ALL)).await;
        assert!(none.is_err(), "no client certificate: {none:?}");
        // A certificate with the mapped CN from another CA: refused too.
        let stranger = Ca::new("stranger CA");
        let forged = stranger.client("batch-scorer");
        let forged_answer = predict(&client(&ca, Some(&forged)), url, None).await;
        assert!(
            forged_answer.is_err(),
            "a certificate from another CA: {forged_answer:?}"
        );
        // The mapped certificate: its scopes and tenant, no token needed.
        let mapped = ca.client("batch-scorer");
        let http = client(&ca, Some(&mapped));
        let answer = predict(&http, url, None).await.unwrap();
        assert_eq!(answer.status(), 200);
        let doc: Value = answer.json().await.unwrap();
        assert_eq!(doc["output"]["tenant"], "acme");
        let read = http
            .get(format!("{url}/v1/features/user/u1/profile"))
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), 403, "not in the certificate's scopes");
        let write = http
            .put(format!("{url}/v1/features"))
            .json(&routes()[2].body)
            .send()
            .await
            .unwrap();
        assert_eq!(write.status(), 403);
        assert!(!profile_written(&served.store).await);
        // A token, when sent, decides.
        let with_token = http
            .put(format!("{url}/v1/features"))
            .bearer_auth(ALL)
            .json(&routes()[2].body)
            .send()
            .await
            .unwrap();
        assert_eq!(with_token.status(), 200);
        // A certificate of the CA whose CN is not mapped: no principal.
        let unmapped = client(&ca, Some(&ca.client("somebody-else")));
        let answer = predict(&unmapped, url, None).await.unwrap();
        assert_eq!(answer.status(), 401);
    }
}

/// Sends `n` reviews through the routed `sentiment` model: `positive` of them praise, the
/// others complain.
async fn reviews(pipelines: &PipelineManager, n: usize, positive: usize) {
    let batch = (0..n)
        .map(|i| ExecRequest {
            request_id: format!("r{i}"),
            data: json!(if i < positive {
                "great, I love it"
            } else {
                "terrible, I hate it"
            }),
            parameters: None,
            entity: None,
            tenant: None,
        })
        .collect();
    let outcomes = pipelines.models().infer("sentiment", batch).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
}

/// `POST /v1/routes/{route}/drift/reference` makes the current window of the route's monitor
/// its reference and says what it holds; 404 for a route that is not there or not watched.
#[tokio::test]
async fn the_drift_reference_route_takes_the_current_window() {
    let served = serve(tokens_toml, false).await;
    let http = reqwest::Client::new();
    let post = |route: &str| {
        http.post(format!("{}/v1/routes/{route}/drift/reference", served.url))
            .bearer_auth(ALL)
            .send()
    };
    for (route, why) in [
        ("nope", "no route `nope`"),
        ("plain", "route `plain` has no monitor"),
    ] {
        let response = post(route).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{route}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["kind"], "unknown_model", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{route}: {message}");
    }
    let references = |body: Value| -> Vec<(String, String, u64)> {
        assert_eq!(body["route"], "sentiment", "{body}");
        body["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["model"].as_str().unwrap().to_owned(),
                    r["path"].as_str().unwrap().to_owned(),
                    r["observations"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    // Nothing answered yet: nothing to take.
    let response = post("sentiment").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(references(response.json().await.unwrap()), []);
    // 30 answers in the current window (the hour): the reference holds them.
    reviews(&served.pipelines, 30, 20).await;
    let response = post("sentiment").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let label = |n| vec![("sentiment@1".to_owned(), "label".to_owned(), n)];
    assert_eq!(references(response.json().await.unwrap()), label(30));
    // Taken again later: the current window has grown.
    reviews(&served.pipelines, 12, 0).await;
    let response = post("sentiment").await.unwrap();
    assert_eq!(references(response.json().await.unwrap()), label(42));
}
