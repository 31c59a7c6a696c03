//! `inferflow run` as child processes for the kill, restart and rebalance tests, in either
//! delivery mode, and the accounting of what reached the output topics. These tests kill and
//! stop only the processes they start, never the shared servers.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use inferflow::model::InferenceResult;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::harness::{Captured, Raw, Topics, collect_until};
use crate::utils::kafka_config;

/// The delivery guarantee a test runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    AtLeastOnce,
    ExactlyOnce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::AtLeastOnce => "at_least_once",
            Mode::ExactlyOnce => "exactly_once",
        }
    }
}

/// One `inferflow run` process.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `inferflow run` on `topics` in `group` as instance `name` (its static membership
    /// id when `static_member`, and its transactional id either way), with `extra` overrides.
    pub fn spawn(
        topics: &Topics,
        group: &str,
        mode: Mode,
        name: &str,
        static_member: bool,
        extra: &[(&str, String)],
    ) -> Proc {
        Proc::spawn_with_config(topics, group, mode, name, static_member, None, extra)
    }

    /// Like [`Proc::spawn`], reading the configuration file `config` too (the overrides win).
    pub fn spawn_with_config(
        topics: &Topics,
        group: &str,
        mode: Mode,
        name: &str,
        static_member: bool,
        config: Option<&std::path::Path>,
        extra: &[(&str, String)],
    ) -> Proc {
        let log = std::env::var("INFERFLOW_TEST_CHILD_LOG")
            .unwrap_or_else(|_| "warn,librdkafka=error".to_owned());
        let mut cmd = crate::harness::inferflow_run(topics, group, config, &log);
        let mut vars: Vec<(&str, String)> = vec![
            ("INGEST__ENABLED", "false".into()),
            ("KAFKA__SESSION_TIMEOUT_MS", "6000".into()),
            ("KAFKA__CLIENT_ID", format!("inferflow-{name}")),
            ("PROCESSING__GUARANTEE", mode.as_str().into()),
            ("PROCESSING__TRANSACTIONAL_ID", format!("{group}-{name}")),
        ];
        if static_member {
            vars.push(("KAFKA__GROUP_INSTANCE_ID", name.to_owned()));
        }
        vars.extend(extra.iter().cloned());
        for (k, v) in vars {
            cmd.env(format!("INFERFLOW__{k}"), v);
        }
        let child = cmd.spawn().expect("start inferflow run");
        Proc {
            name: name.to_owned(),
            child,
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    /// Sends SIGTERM without waiting.
    pub fn term(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self, timeout: Duration) {
        self.term();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(
                    status.success(),
                    "{} exited with {status} after SIGTERM",
                    self.name
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A failing test must not leave processes behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Identity requests `{prefix}{i}` for `range`, keyed `k{i}`.
pub fn requests(prefix: &str, range: std::ops::Range<usize>) -> Vec<Raw> {
    range
        .map(|i| {
            (
                Some(format!("k{i}").into_bytes()),
                Some(
                    format!(
                        r#"{{"request_id":"{prefix}{i}","pipeline":"identity","data":{{"i":{i}}}}}"#
                    )
                    .into_bytes(),
                ),
            )
        })
        .collect()
}

/// Records written to `topic` (the sum of its partitions' high watermarks; in exactly-once
/// mode this includes aborted records and transaction markers).
pub async fn written(topic: &str) -> i64 {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka_config().create().expect("watermark reader");
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| {
                consumer
                    .fetch_watermarks(&topic, p.id(), Duration::from_secs(5))
                    .map_or(0, |(_, high)| high)
            })
            .sum()
    })
    .await
    .expect("watermark task")
}

/// Waits until at least `n` records were written to `topic`.
pub async fn wait_written(topic: &str, n: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while written(topic).await < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} records in {topic} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the output topics hold for the requests `{prefix}0..n`.
#[derive(Debug)]
pub struct Accounting {
    pub lost: Vec<String>,
    pub duplicates: usize,
    pub outputs: usize,
}

/// Reads the results and dead-letter topics (read_committed, the collector's isolation level)
/// until every one of the `n` request ids has an output, then 3 s more to catch late
/// duplicates, or until `timeout`; then counts lost ids (acknowledged, with neither a result
/// nor a dead letter) and duplicates.
pub async fn account(topics: &Topics, prefix: &str, n: usize, timeout: Duration) -> Accounting {
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let outputs = collect_until_or_timeout(topics, timeout, |c| {
        if let Some(k) = &c.key {
            seen.insert(k.clone());
        }
        seen.len() >= n
    })
    .await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for c in &outputs {
        let id = if c.topic == topics.results {
            let doc: InferenceResult =
                serde_json::from_slice(c.value.as_deref().expect("value")).expect("result");
            doc.request_id
        } else {
            // Dead letters keep the request's key; these requests are all valid, so none is
            // expected, but one would still count as the request's output.
            String::from_utf8_lossy(c.key.as_deref().unwrap_or_default()).replacen('k', prefix, 1)
        };
        *counts.entry(id).or_insert(0) += 1;
    }
    let lost = (0..n)
        .map(|i| format!("{prefix}{i}"))
        .filter(|id| !counts.contains_key(id))
        .collect();
    Accounting {
        lost,
        duplicates: counts.values().map(|c| c - 1).sum(),
        outputs: outputs.len(),
    }
}

/// Like `collect_until`, but returns what it has at the timeout instead of panicking, so a
/// loss is reported as a loss.
async fn collect_until_or_timeout(
    topics: &Topics,
    timeout: Duration,
    mut done: impl FnMut(&Captured) -> bool,
) -> Vec<Captured> {
    let mut finished = false;
    let started = Instant::now();
    let result = tokio::time::timeout(
        timeout + Duration::from_secs(10),
        collect_until(
            &[&topics.results, &topics.dlq],
            timeout,
            Duration::from_secs(3),
            |out| {
                if let Some(last) = out.last() {
                    finished |= done(last);
                }
                finished || started.elapsed() >= timeout
            },
        ),
    )
    .await;
    result.expect("collecting outputs")
}
