//! Kafka over TLS with SASL/SCRAM-SHA-512, configured from a file alone, against the secure
//! broker of `scripts/stack` (`kafka-secure`, 127.0.0.1:9094, settings generated into
//! `.stack/secure/client.properties`); and secrets (the SASL password, a provider's API key)
//! never showing in logs at trace level with librdkafka's debug output on, in `/metrics`, in
//! error results, in error messages or in the printed configuration.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferflow::executor::Builtins;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::fake_openai::{FakeOpenAi, Mode};
use crate::utils::{self, unique_name};

/// How to start the secure broker.
const SECURE_HINT: &str = "start it with `scripts/stack up` (or `scripts/stack start kafka-secure` \
     next to servers that are already running)";

/// The secure broker's client settings, as `scripts/stack` wrote them.
struct Secure {
    bootstrap: String,
    username: String,
    password: String,
    ca: String,
}

/// `INFERFLOW_TEST_KAFKA_SECURE` (a client.properties file), or `$STACK_DIR/secure/…`, or the
/// repository's `.stack/secure/client.properties`.
fn settings_file() -> PathBuf {
    if let Ok(file) = std::env::var("INFERFLOW_TEST_KAFKA_SECURE") {
        return PathBuf::from(file);
    }
    let stack = std::env::var("STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".stack"));
    stack.join("secure/client.properties")
}

/// The settings, once the secure broker has answered a metadata request through them; panics
/// with the command that starts it otherwise.
async fn require_secure_kafka() -> Secure {
    let file = settings_file();
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "the secure Kafka broker's settings are not at {} ({e}); {SECURE_HINT}, or point INFERFLOW_TEST_KAFKA_SECURE at a client.properties file",
            file.display()
        )
    });
    let props: HashMap<&str, &str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let get = |key: &str| {
        props
            .get(key)
            .unwrap_or_else(|| panic!("{} has no {key}", file.display()))
            .to_string()
    };
    let secure = Secure {
        bootstrap: get("bootstrap.servers"),
        username: get("sasl.username"),
        password: get("sasl.password"),
        ca: get("ssl.ca.location"),
    };
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &secure.bootstrap)
        .set("security.protocol", "sasl_ssl")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", &secure.username)
        .set("sasl.password", &secure.password)
        .set("ssl.ca.location", &secure.ca);
    let bootstrap = secure.bootstrap.clone();
    let probe = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
        consumer
            .fetch_metadata(None, Duration::from_secs(15))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
    .expect("probe task");
    if let Err(err) = probe {
        panic!("the secure Kafka broker does not answer at {bootstrap} ({err}); {SECURE_HINT}");
    }
    secure
}

/// The provider key the tests hand to `inferflow run`.
const API_KEY: &str = "sk-live-7c1d0e9a44b2-NEVER-PRINT-ME";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A configuration file for the secure broker with `password`, a provider `leaky` at
/// `provider_url` whose key comes from `INFERFLOW_TEST_LEAKY_KEY`, and librdkafka's debug
/// output on for every context.
fn write_config(
    dir: &Path,
    secure: &Secure,
    password: &str,
    base: &str,
    port: u16,
    provider_url: &str,
) -> PathBuf {
    let file = dir.join(format!("{base}.toml"));
    std::fs::write(
        &file,
        format!(
            r#"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{base}"
security_protocol = "sasl_ssl"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "{user}"
sasl_password = "{password}"
ssl_ca_location = "{ca}"

[kafka.extra]
debug = "all"

[topics]
requests = "{base}.requests"
results = "{base}.results"
dlq = "{base}.dlq"
features = "{base}.features"
feature_invalidations = ""

[ingest]
enabled = false

[http]
listen = "127.0.0.1:{port}"

[providers.leaky.openai]
base_url = "{provider_url}"
api_key_env = "INFERFLOW_TEST_LEAKY_KEY"
[providers.leaky.openai.retry]
max_attempts = 1
[providers.leaky.openai.models.leaky]
task = "chat"

[models."leaky@1"]
provider = "leaky"
cache = false
"#,
            bootstrap = secure.bootstrap,
            user = secure.username,
            ca = secure.ca,
        ),
    )
    .expect("write config");
    file
}

/// `inferflow ARGS` with a clean environment plus the provider key.
fn inferflow(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inferflow"));
    cmd.args(args).stdin(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("INFERFLOW__") || key == "INFERFLOW_CONFIG" || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.env("INFERFLOW_TEST_LEAKY_KEY", API_KEY);
    cmd
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Fails if `haystack` holds `secret` or a 10-character piece of its start or end (a
/// truncated or partly masked copy).
fn assert_no_secret(haystack: &str, secret: &str, what: &str) {
    let n = secret.len().min(10);
    for piece in [secret, &secret[..n], &secret[secret.len() - n..]] {
        assert!(
            !haystack.contains(piece),
            "{what} contains (part of) a secret: `{piece}`"
        );
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("inferflow did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The single JSON result `inferflow request` printed.
fn result_of(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", text(output)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_scram_from_configuration_alone_and_no_secret_in_any_output() {
    utils::init_tracing();
    let secure = require_secure_kafka().await;
    let provider = FakeOpenAi::start(Mode::EchoKey401).await;
    let dir = tempfile::tempdir().unwrap();
    let base = unique_name("secure");
    let port = free_port();
    let config = write_config(
        dir.path(),
        &secure,
        &secure.password,
        &base,
        port,
        &provider.base_url,
    );
    let config = config.to_str().unwrap();

    // Everything logged, librdkafka's debug contexts included (security, broker, protocol…).
    let stdout_file = dir.path().join("run.stdout");
    let stderr_file = dir.path().join("run.stderr");
    let mut run = inferflow(&["run", "--config", config])
        .env("RUST_LOG", "trace")
        .stdout(std::fs::File::create(&stdout_file).unwrap())
        .stderr(std::fs::File::create(&stderr_file).unwrap())
        .spawn()
        .expect("start inferflow run");

    // A request produced and its result read through the SASL_SSL listener, from the same file.
    // `run` creates the topics; until it has, `request` fails, so try again for a while.
    let deadline = Instant::now() + Duration::from_secs(90);
    let ok = loop {
        let out = inferflow(&[
            "request",
            "--config",
            config,
            "--pipeline",
            "identity",
            "--data",
            r#"{"hello":"secure"}"#,
            "--timeout-secs",
            "30",
        ])
        .output()
        .unwrap();
        if out.status.success() {
            break out;
        }
        assert!(
            run.try_wait().unwrap().is_none(),
            "inferflow run exited early; its log is in {}",
            stderr_file.display()
        );
        assert!(
            Instant::now() < deadline,
            "no result over SASL_SSL: {}",
            text(&out)
        );
        assert_no_secret(&text(&out), &secure.password, "inferflow request");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let result = result_of(&ok);
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["output"], json!({"hello": "secure"}));
    assert_no_secret(&text(&ok), &secure.password, "inferflow request");

    // A provider refusing the key and quoting it back: an error result without the key.
    let refused = inferflow(&[
        "request",
        "--config",
        config,
        "--model",
        "leaky@1",
        "--data",
        r#""hello""#,
    ])
    .output()
    .unwrap();
    assert!(refused.status.success(), "{}", text(&refused));
    let result = result_of(&refused);
    assert_eq!(result["status"], "error", "{result}");
    let message = result["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("Incorrect API key"), "{result}");
    assert_no_secret(&text(&refused), API_KEY, "the provider's error result");
    let calls = provider.calls();
    assert!(!calls.is_empty(), "the provider was called");
    assert_eq!(
        calls[0].authorization.as_deref(),
        Some(format!("Bearer {API_KEY}").as_str()),
        "the key did reach the provider"
    );

    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("inferflow_provider_errors_total"),
        "{metrics}"
    );
    assert_no_secret(&metrics, &secure.password, "/metrics");
    let ready: Value = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .expect("GET /readyz")
        .json()
        .await
        .unwrap();
    assert_eq!(
        ready["kafka"], "ok",
        "/readyz reaches Kafka over SASL_SSL: {ready}"
    );
    assert_no_secret(&metrics, API_KEY, "/metrics");

    let printed = inferflow(&["check-config", "--config", config])
        .output()
        .unwrap();
    assert!(printed.status.success(), "{}", text(&printed));
    assert!(
        String::from_utf8_lossy(&printed.stdout).contains("sasl_password = \"<redacted>\""),
        "{}",
        text(&printed)
    );
    assert_no_secret(&text(&printed), &secure.password, "check-config");
    assert_no_secret(&text(&printed), API_KEY, "check-config");

    sigterm(&run);
    let status = wait_exit(&mut run, Duration::from_secs(60));
    assert!(status.success(), "inferflow run exited with {status}");
    let logs = format!(
        "{}{}",
        std::fs::read_to_string(&stdout_file).unwrap(),
        std::fs::read_to_string(&stderr_file).unwrap()
    );
    // The logs did cover the login: librdkafka's SASL debug lines are there.
    assert!(
        logs.contains("SCRAM-SHA-512") && logs.contains("Authenticated"),
        "trace logs without librdkafka's SASL lines ({} bytes)",
        logs.len()
    );
    assert_no_secret(&logs, &secure.password, "the logs");
    assert_no_secret(&logs, API_KEY, "the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sasl_password_stops_at_once_with_a_clear_error_that_does_not_print_it() {
    utils::init_tracing();
    let secure = require_secure_kafka().await;
    const WRONG: &str = "wrong-Zq81xK3mP0-password";
    let dir = tempfile::tempdir().unwrap();
    let base = unique_name("badpw");
    let config = write_config(
        dir.path(),
        &secure,
        WRONG,
        &base,
        free_port(),
        "http://127.0.0.1:1/v1",
    );
    let config = config.to_str().unwrap();

    for args in [
        vec!["run", "--config", config],
        vec![
            "request",
            "--config",
            config,
            "--pipeline",
            "identity",
            "--data",
            "1",
        ],
    ] {
        // Files, not pipes: librdkafka's debug output would fill a pipe nobody reads yet.
        let (out_file, err_file) = (dir.path().join("out"), dir.path().join("err"));
        let started = Instant::now();
        let mut child = inferflow(&args)
            .env("RUST_LOG", "debug")
            .stdout(std::fs::File::create(&out_file).unwrap())
            .stderr(std::fs::File::create(&err_file).unwrap())
            .spawn()
            .unwrap();
        let status = wait_exit(&mut child, Duration::from_secs(30));
        let all = std::fs::read_to_string(&out_file).unwrap()
            + &std::fs::read_to_string(&err_file).unwrap();
        assert_eq!(status.code(), Some(1), "{}: {all}", args[0]);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}: took {:?}",
            args[0],
            started.elapsed()
        );
        for expected in [
            "refused the credentials of kafka.sasl_username `inferflow`",
            "SASL authentication error",
            "SCRAM-SHA-512",
        ] {
            assert!(
                all.contains(expected),
                "{}: no `{expected}` in {all}",
                args[0]
            );
        }
        assert_no_secret(&all, WRONG, args[0]);
    }

    // The library says the same.
    let loaded = inferflow::config::Config::load(&inferflow::config::Sources {
        file: Some(PathBuf::from(config)),
        env: false,
    })
    .expect("valid config");
    let err = inferflow::processor::start(&loaded, Arc::new(Builtins), CancellationToken::new())
        .await
        .err()
        .expect("a wrong password is an error");
    let message = format!("{err:#}");
    assert!(message.contains("SASL authentication error"), "{message}");
    assert_no_secret(&message, WRONG, "the error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_does_not_sign_the_broker_certificate_is_a_clear_tls_error() {
    utils::init_tracing();
    let mut secure = require_secure_kafka().await;
    // The broker's own certificate is no CA: verification fails as with a foreign CA.
    let broker_pem = Path::new(&secure.ca).with_file_name("broker.pem");
    assert!(broker_pem.is_file(), "{} is missing", broker_pem.display());
    secure.ca = broker_pem.to_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let base = unique_name("badca");
    let password = secure.password.clone();
    let config = write_config(
        dir.path(),
        &secure,
        &password,
        &base,
        free_port(),
        "http://127.0.0.1:1/v1",
    );
    let started = Instant::now();
    let out = inferflow(&[
        "request",
        "--config",
        config.to_str().unwrap(),
        "--pipeline",
        "identity",
        "--data",
        "1",
    ])
    .output()
    .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(
        all.contains("TLS with Kafka at") && all.contains("certificate verify failed"),
        "{all}"
    );
    assert_no_secret(&all, &password, "the TLS error");
}
