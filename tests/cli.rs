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

#[test]
fn check_config_reports_a_missing_file() {
    let out = inferflow(&["check-config", "--config", "/nonexistent/x.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.toml: no such file"));
}
