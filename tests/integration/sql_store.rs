//! The PostgreSQL and MySQL feature stores through the `inferflow` binary, on the servers of
//! `scripts/stack`: start-up errors that name the key and never the password.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::feature_store::Sql;
use crate::utils::free_port;

/// A password that appears nowhere else: any occurrence in the output is a leak.
const PASSWORD: &str = "Zq7-leak-canary-Pw0rd";

impl Sql {
    /// `feature_store.backend` and the environment variable of the DSN.
    fn backend(self) -> (&'static str, &'static str) {
        match self {
            Sql::Postgres => ("postgres", "INFERFLOW__FEATURE_STORE__POSTGRES__URL"),
            Sql::Mysql => ("mysql", "INFERFLOW__FEATURE_STORE__MYSQL__URL"),
        }
    }

    /// The scheme and `host:port` of the test server.
    fn server(self) -> (String, String) {
        let url = self.url("inferflow");
        let (scheme, rest) = url.split_once("://").expect("scheme://");
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let host = host.split_once('/').map_or(host, |(host, _)| host);
        (scheme.to_owned(), host.to_owned())
    }
}

/// Runs `inferflow run` with `backend` at `url` (ingestion on, so the store opens at start-up)
/// until it exits, at most 60 s; returns its exit code and stderr.
fn run_until_exit(sql: Sql, url: &str) -> (Option<i32>, String) {
    let (backend, url_var) = sql.backend();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inferflow"));
    cmd.arg("run");
    for (key, _) in std::env::vars() {
        if key.starts_with("INFERFLOW__") || key == "INFERFLOW_CONFIG" {
            cmd.env_remove(key);
        }
    }
    let section = url_var.trim_end_matches("URL");
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .env("INFERFLOW__FEATURE_STORE__BACKEND", backend)
        .env(url_var, url)
        .env(format!("{section}CONNECT_TIMEOUT_MS"), "2000")
        .env("INFERFLOW__INGEST__ENABLED", "true")
        .env(
            "INFERFLOW__HTTP__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start inferflow run");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("inferflow run with {url} did not stop at start-up within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("inferflow's output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A malformed DSN, a server that does not answer and wrong credentials each stop
/// `inferflow run` at start-up with the reason and the key to fix, and never the password:
/// in the DSN's user-info, in a `password=` parameter, or written without percent-encoding.
#[test]
fn start_up_errors_name_the_key_and_never_the_password() {
    for sql in [Sql::Postgres, Sql::Mysql] {
        let (scheme, server) = sql.server();
        let key = format!("feature_store.{}.url", sql.backend().0);
        let nobody = format!("127.0.0.1:{}", free_port());
        let wrong_login = match sql {
            Sql::Postgres => "password authentication failed",
            Sql::Mysql => "Access denied",
        };
        let cases = [
            (
                format!("{scheme}://inferflow:{PASSWORD}@127.0.0.1:notaport/inferflow"),
                "invalid port",
            ),
            // An unencoded `/` in the password: the driver reads a port out of the password.
            (
                format!("{scheme}://inferflow:{PASSWORD}/x@{server}/inferflow"),
                "invalid port",
            ),
            (
                format!("{scheme}://inferflow:{PASSWORD}@{nobody}/inferflow"),
                "refused",
            ),
            (
                format!("{scheme}://inferflow:{PASSWORD}@{server}/inferflow"),
                wrong_login,
            ),
            (
                format!(
                    "{scheme}://inferflow:%5A{}@{server}/inferflow",
                    &PASSWORD[1..]
                ),
                wrong_login,
            ),
        ];
        let query_password = (sql == Sql::Postgres).then(|| {
            (
                format!("{scheme}://inferflow@{server}/inferflow?password={PASSWORD}"),
                wrong_login,
            )
        });
        for (url, reason) in cases.into_iter().chain(query_password) {
            let started = Instant::now();
            let (code, stderr) = run_until_exit(sql, &url);
            assert_eq!(code, Some(1), "{url}: {stderr}");
            assert!(
                stderr.contains(&key) && stderr.contains(reason),
                "{url}: expected the key {key} and `{reason}` in:\n{stderr}"
            );
            assert!(
                !stderr.contains(PASSWORD) && !stderr.contains(&PASSWORD[1..]),
                "{url}: the password leaked:\n{stderr}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{url}: took {:?}",
                started.elapsed()
            );
        }
    }
}
