//! The `inferflow` command line, run as a user would run it.

use std::process::{Command, Output};

fn inferflow(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inferflow"));
    cmd.args(args);
    // Start from a clean slate: no overrides leaking in from the developer's shell.
    for (key, _) in std::env::vars() {
        if key.starts_with("INFERFLOW__") || key == "INFERFLOW_CONFIG" {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run inferflow")
}

#[test]
fn check_config_prints_effective_config_with_secrets_redacted() {
    let out = inferflow(
        &["check-config"],
        &[
            ("INFERFLOW__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"),
            ("INFERFLOW__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
            ("INFERFLOW__KAFKA__SASL_USERNAME", "svc"),
            ("INFERFLOW__KAFKA__SASL_PASSWORD", "pw-should-not-show"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(
        stdout.contains("bootstrap_servers = \"127.0.0.1:9092\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("sasl_password = \"<redacted>\""),
        "{stdout}"
    );
    assert!(!stdout.contains("pw-should-not-show") && !stderr.contains("pw-should-not-show"));
}

#[test]
fn check_config_lists_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[kafka]\ngroup_idd = \"x\"\n[batch]\nmax_records = 0\n[http]\nlisten = \"nowhere\"\n",
    )
    .unwrap();
    let out = inferflow(
        &["check-config", "--config", file.to_str().unwrap()],
        &[("INFERFLOW__LOG__FORMAT", "yaml")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    for key in [
        "kafka.group_idd",
        "batch.max_records",
        "http.listen",
        "log.format",
    ] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }
    assert!(stderr.contains("4 problems"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing printed on stdout for an invalid config"
    );
}

/// The HTTP API listens on loopback by default; a non-loopback address without tokens is
/// refused (naming `http.allow_unauthenticated` and how to open it), and opening it explicitly
/// is allowed with a warning.
#[test]
fn check_config_refuses_an_open_api_on_a_public_address() {
    let default = inferflow(&["check-config"], &[]);
    let stderr = String::from_utf8_lossy(&default.stderr);
    assert!(default.status.success(), "stderr: {stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&default.stdout).contains("listen = \"127.0.0.1:8080\""),
        "the default listen address is loopback"
    );

    let public = [("INFERFLOW__HTTP__LISTEN", "0.0.0.0:8080")];
    let refused = inferflow(&["check-config"], &public);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("http.allow_unauthenticated:"), "{stderr}");
    assert!(
        stderr.contains("[[http.tokens]]") && stderr.contains("allow_unauthenticated = true"),
        "says how to open it: {stderr}"
    );

    // `run` refuses it the same way, before connecting to anything.
    let run = inferflow(&["run"], &public);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("http.allow_unauthenticated:"), "{stderr}");

    let open = inferflow(
        &["check-config"],
        &[
            public[0],
            ("INFERFLOW__HTTP__ALLOW_UNAUTHENTICATED", "true"),
        ],
    );
    let stderr = String::from_utf8_lossy(&open.stderr);
    assert!(open.status.success(), "stderr: {stderr}");
    assert!(
        stderr.contains("warning: http.allow_unauthenticated = true"),
        "{stderr}"
    );

    let guarded = inferflow(
        &["check-config"],
        &[
            public[0],
            (
                "INFERFLOW__HTTP__TOKENS",
                r#"[{name="scorer", env="CLI_TEST_TOKEN", scopes=["predict"]}]"#,
            ),
            ("CLI_TEST_TOKEN", "cli-test-token-value"),
        ],
    );
    let stdout = String::from_utf8_lossy(&guarded.stdout);
    let stderr = String::from_utf8_lossy(&guarded.stderr);
    assert!(guarded.status.success(), "stderr: {stderr}");
    assert!(!stdout.contains("cli-test-token-value") && !stderr.contains("cli-test-token-value"));
}

#[test]
fn check_config_refuses_routes_to_unconfigured_versions_or_without_weight() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.toml");
    let models = r#"
[providers.local.local.models.vader]
kind = "vader"
path = "models/vader"
[models."sentiment@1"]
provider = "local"
remote_model = "vader"
[models."sentiment@2"]
provider = "local"
remote_model = "vader"
"#;
    std::fs::write(
        &file,
        format!(
            "{models}\n[routes.sentiment]\nversions = {{ \"1\" = 90, \"3\" = 10 }}\n\
             [routes.iris]\nversions = {{ \"1\" = 0 }}\n"
        ),
    )
    .unwrap();
    let out = inferflow(&["check-config", "--config", file.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    for expected in [
        "routes.sentiment.versions.\"3\": `sentiment@3` is not a configured model (configured versions of `sentiment`: 1, 2)",
        "routes.iris.versions: the weights add up to 0",
        "routes.iris.versions.\"1\": `iris@1` is not a configured model",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected} missing from:\n{stderr}"
        );
    }
    // The same routes over configured versions pass, and are printed.
    std::fs::write(
        &file,
        format!("{models}\n[routes.sentiment]\nversions = {{ \"1\" = 90, \"2\" = 10 }}\n"),
    )
    .unwrap();
    let out = inferflow(&["check-config", "--config", file.to_str().unwrap()], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[routes.sentiment]"), "{stdout}");
}

#[test]
fn check_config_reports_a_missing_file() {
    let out = inferflow(&["check-config", "--config", "/nonexistent/x.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.toml: no such file"));
}

/// Runs `inferflow features ARGS` on the embedded store at `db` and returns its exit code,
/// stdout parsed as JSON (`Null` when empty) and stderr.
fn features(db: &std::path::Path, args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let mut all = vec!["features"];
    all.extend_from_slice(args);
    let out = inferflow(
        &all,
        &[
            ("INFERFLOW__FEATURE_STORE__BACKEND", "embedded"),
            ("INFERFLOW__FEATURE_STORE__PATH", db.to_str().unwrap()),
            // The CQL keys are ignored by the embedded backend: nothing listens here.
            (
                "INFERFLOW__FEATURE_STORE__CONTACT_POINTS",
                "[\"127.0.0.1:1\"]",
            ),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = if stdout.trim().is_empty() {
        serde_json::Value::Null
    } else {
        assert_eq!(stdout.lines().count(), 1, "one JSON document: {stdout}");
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
    };
    (
        out.status.code(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn features_commands_put_get_vector_and_groups_on_the_embedded_store() {
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store/features.redb");
    let key = [
        "--entity-type",
        "user",
        "--entity-id",
        "u1",
        "--name",
        "activity",
    ];
    let with_key = |rest: &[&'static str]| -> Vec<&str> {
        key.iter().copied().chain(rest.iter().copied()).collect()
    };

    // put: the version written and the current value after the write.
    let mut args = vec!["put"];
    args.extend(with_key(&[
        "--values",
        r#"{"clicks":3,"tags":["a"]}"#,
        "--version",
        "2",
        "--updated-at-ms",
        "1700000000000",
    ]));
    let (code, out, err) = features(&db, &args);
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(out["written"]["version"], 2);
    assert_eq!(out["current"]["version"], 2);
    assert_eq!(
        out["current"]["values"],
        json!({"clicks": 3, "tags": ["a"]})
    );
    assert_eq!(out["current"]["updated_at_ms"], 1_700_000_000_000_u64);
    assert!(
        db.is_file(),
        "the database file and its directory were created"
    );

    // A late, older version is written to the history only; the current value stays.
    let mut args = vec!["put"];
    args.extend(with_key(&["--values", r#"{"clicks":1}"#, "--version", "1"]));
    let (code, out, err) = features(&db, &args);
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(
        (&out["written"]["version"], &out["current"]["version"]),
        (&json!(1), &json!(2))
    );
    let mut args = vec!["put"];
    args.extend_from_slice(&[
        "--entity-type",
        "user",
        "--entity-id",
        "u1",
        "--name",
        "session",
        "--values",
        r#"{"open":true}"#,
        "--version",
        "5",
        "--ttl-secs",
        "600",
    ]);
    let (code, out, err) = features(&db, &args);
    assert_eq!(code, Some(0), "stderr: {err}");
    let ttl = out["current"]["ttl_secs"].as_u64().expect("a TTL");
    assert!((599..=600).contains(&ttl), "{out}");

    // get: the current value, or a version from the history.
    let mut args = vec!["get"];
    args.extend(with_key(&[]));
    let (code, out, err) = features(&db, &args);
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(
        out,
        json!({
            "entity_type": "user",
            "entity_id": "u1",
            "name": "activity",
            "values": {"clicks": 3, "tags": ["a"]},
            "version": 2,
            "updated_at_ms": 1_700_000_000_000_u64
        })
    );
    let mut args = vec!["get"];
    args.extend(with_key(&["--version", "1"]));
    let (code, out, err) = features(&db, &args);
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(
        (&out["version"], &out["values"]),
        (&json!(1), &json!({"clicks": 1}))
    );

    // vector: found features by name, and the missing ones.
    let (code, out, err) = features(
        &db,
        &[
            "vector",
            "--entity-type",
            "user",
            "--entity-id",
            "u1",
            "--names",
            "activity,nope,session",
        ],
    );
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(out["entity_id"], "u1");
    assert_eq!(out["features"]["activity"]["version"], 2);
    assert_eq!(out["features"]["activity"]["values"]["clicks"], 3);
    assert_eq!(out["features"]["session"]["values"], json!({"open": true}));
    assert_eq!(out["missing"], json!(["nope"]));

    // group create, then group get (latest by default) and a vector of the group.
    let create = |version: &'static str, features_list: &'static str| {
        features(
            &db,
            &[
                "group",
                "create",
                "--name",
                "fraud",
                "--version",
                version,
                "--entity-type",
                "user",
                "--features",
                features_list,
                "--description",
                "fraud signals",
            ],
        )
    };
    let (code, out, err) = create("1", "activity,nope");
    assert_eq!(code, Some(0), "stderr: {err}");
    let v1 = json!({
        "name": "fraud",
        "version": 1,
        "entity_type": "user",
        "features": ["activity", "nope"],
        "description": "fraud signals"
    });
    assert_eq!(out, v1);
    let (code, out, err) = create("2", "activity,session");
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(out["version"], 2);
    let (code, out, err) = features(&db, &["group", "get", "--name", "fraud"]);
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(
        (&out["version"], &out["features"]),
        (&json!(2), &json!(["activity", "session"]))
    );
    let (code, out, err) = features(&db, &["group", "get", "--name", "fraud", "--version", "1"]);
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(out, v1);
    let (code, out, err) = features(
        &db,
        &[
            "vector",
            "--entity-id",
            "u1",
            "--group",
            "fraud",
            "--group-version",
            "1",
        ],
    );
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(out["features"]["activity"]["version"], 2);
    assert_eq!(out["missing"], json!(["nope"]));

    // Errors: stderr and a nonzero exit, nothing on stdout; absent things exit 3.
    let (code, out, err) = create("1", "other");
    assert_eq!(code, Some(1), "a different definition under version 1");
    assert_eq!(out, serde_json::Value::Null);
    assert!(err.contains("different definition"), "{err}");
    let (code, out, err) = features(&db, &["group", "get", "--name", "nope"]);
    assert_eq!((code, &out), (Some(3), &serde_json::Value::Null));
    assert!(err.contains("feature group nope"), "{err}");
    let mut args = vec!["get"];
    args.extend(with_key(&["--version", "9"]));
    let (code, _, err) = features(&db, &args);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("user/u1/activity at version 9"), "{err}");
    let mut args = vec!["put"];
    args.extend(with_key(&["--values", "[1,2]", "--version", "3"]));
    let (code, _, err) = features(&db, &args);
    assert_eq!(code, Some(1));
    assert!(err.contains("--values must be a JSON object"), "{err}");
    let (code, _, err) = features(
        &db,
        &[
            "put",
            "--entity-type",
            "user",
            "--entity-id",
            "",
            "--name",
            "x",
            "--values",
            "{}",
            "--version",
            "1",
        ],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("entity_id is empty"), "{err}");
}

#[test]
fn features_commands_report_a_locked_or_misconfigured_store() {
    let dir = tempfile::tempdir().unwrap();
    // An empty path is a configuration problem: exit code 2 and the key named.
    let out = inferflow(
        &[
            "features",
            "get",
            "--entity-type",
            "u",
            "--entity-id",
            "1",
            "--name",
            "f",
        ],
        &[
            ("INFERFLOW__FEATURE_STORE__BACKEND", "embedded"),
            ("INFERFLOW__FEATURE_STORE__PATH", ""),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("feature_store.path"));

    // A file that is not a database: exit code 1, and the message names the file.
    let junk = dir.path().join("junk.redb");
    std::fs::write(&junk, vec![7u8; 8192]).unwrap();
    let (code, out, err) = features(
        &junk,
        &[
            "get",
            "--entity-type",
            "u",
            "--entity-id",
            "1",
            "--name",
            "f",
        ],
    );
    assert_eq!((code, out), (Some(1), serde_json::Value::Null));
    assert!(err.contains("junk.redb"), "{err}");
}

#[test]
fn secrets_never_appear_in_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    // An unquoted password is a TOML syntax error; the parser's excerpt of the line is left out.
    let syntax = dir.path().join("syntax.toml");
    std::fs::write(&syntax, "[kafka]\nsasl_password = hunter2-unquoted\n").unwrap();
    // A number where the password belongs: the type is named, the value is not.
    let number = dir.path().join("number.toml");
    std::fs::write(&number, "[kafka]\nsasl_password = 918273645\n").unwrap();
    // API keys are never read from the file: the key is refused, and its value not quoted.
    let api_key = dir.path().join("api_key.toml");
    std::fs::write(
        &api_key,
        "[providers.x.openai]\napi_key = \"sk-file-key-3141592\"\n[providers.x.openai.models.m]\ntask = \"chat\"\n",
    )
    .unwrap();
    for (file, secret, expect) in [
        (&syntax, "hunter2", "line 2"),
        (&number, "918273645", "expected a string"),
        (
            &api_key,
            "sk-file-key-3141592",
            "providers.x.openai.api_key",
        ),
    ] {
        let out = inferflow(&["check-config", "--config", file.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expect), "{stderr}");
        assert!(
            !stderr.contains(secret) && !stdout.contains(secret),
            "the secret leaked: {stderr}{stdout}"
        );
    }
}

#[test]
fn a_password_from_the_environment_is_taken_as_the_exact_string() {
    // Environment values are otherwise parsed as TOML values: `0042` would become the number 42
    // (and be refused, or worse, change). A password is always the exact string.
    for password in ["0042", "918273645", "true", "1e5"] {
        let out = inferflow(
            &["check-config"],
            &[
                ("INFERFLOW__KAFKA__SECURITY_PROTOCOL", "sasl_plaintext"),
                ("INFERFLOW__KAFKA__SASL_MECHANISM", "PLAIN"),
                ("INFERFLOW__KAFKA__SASL_USERNAME", "svc"),
                ("INFERFLOW__KAFKA__SASL_PASSWORD", password),
                ("INFERFLOW__FEATURE_STORE__USERNAME", "cql"),
                ("INFERFLOW__FEATURE_STORE__PASSWORD", password),
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{password}: {stderr}");
        assert!(
            stdout.contains("sasl_password = \"<redacted>\""),
            "{stdout}"
        );
        // (`true` and `1e5` appear in any printed configuration; the digits do not.)
        if password.len() > 3 && password.bytes().all(|b| b.is_ascii_digit()) {
            assert!(!stdout.contains(password) && !stderr.contains(password));
        }
    }
}
