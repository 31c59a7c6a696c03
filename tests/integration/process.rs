//! The `inferflow run` binary as a separate process: SIGKILL mid-stream and restart loses
//! nothing, SIGTERM exits 0, and a slow model with a deep backlog keeps memory bounded while the
//! consumer stays in its group.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::harness::{Raw, Topics, collect, collect_until, inferflow_run, produce};
use crate::utils::{self, kafka_config, unique_name};

/// Starts `inferflow run` on `topics` in `group`, with extra environment overrides.
fn spawn(topics: &Topics, group: &str, extra: &[(&str, String)]) -> Child {
    let mut cmd = inferflow_run(topics, group, None, "warn");
    for (k, v) in extra {
        cmd.env(format!("INFERFLOW__{k}"), v);
    }
    cmd.spawn().expect("start inferflow run")
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

fn rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// `n` requests `{prefix}{i}` keyed `k{i}` for `echo`, sleeping `delay_ms` each, with `pad`
/// bytes of padding in their data.
pub fn requests(prefix: &str, n: usize, delay_ms: u64, pad: usize) -> Vec<Raw> {
    let padding = "p".repeat(pad);
    (0..n)
        .map(|i| {
            let v = format!(
                r#"{{"request_id":"{prefix}{i}","model":"echo","data":{{"i":{i},"pad":"{padding}"}},"parameters":{{"delay_ms":{delay_ms}}}}}"#
            );
            (Some(format!("k{i}").into_bytes()), Some(v.into_bytes()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing_and_sigterm_exits_0() {
    utils::init_tracing();
    utils::require_kafka().await;
    let topics = Topics::create("kill", 6).await;
    let group = unique_name("kill");
    const N: usize = 20_000;
    produce(&topics.requests, &requests("s", N, 2, 0)).await;

    let mut first = spawn(&topics, &group, &[]);
    // Kill once a first share of the results is out, however long start-up took.
    collect(
        &[&topics.results],
        2_000,
        Duration::from_secs(120),
        Duration::ZERO,
    )
    .await;
    first.kill().expect("SIGKILL");
    first.wait().unwrap();
    let before_restart = collect(
        &[&topics.results],
        1,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await
    .len();

    let mut second = spawn(&topics, &group, &[]);
    let mut unique = std::collections::HashSet::new();
    let outputs = collect_until(
        &[&topics.results, &topics.dlq],
        Duration::from_secs(180),
        Duration::from_secs(3),
        |out| {
            if let Some(c) = out.last() {
                unique.insert(c.key.clone());
            }
            unique.len() >= N
        },
    )
    .await;
    sigterm(&second);
    let status = wait_exit(&mut second, Duration::from_secs(60));
    assert!(
        status.success(),
        "SIGTERM must lead to a clean exit, got {status}"
    );

    let mut counts: HashMap<String, usize> = HashMap::new();
    for c in outputs.iter().filter(|c| c.topic == topics.results) {
        let key = String::from_utf8(c.key.clone().unwrap()).unwrap();
        *counts.entry(key).or_default() += 1;
    }
    let lost = (0..N)
        .filter(|i| !counts.contains_key(&format!("s{i}")))
        .count();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    println!(
        "SIGKILL after 2,000+ results: {before_restart} results before the restart, {lost} lost, {duplicates} duplicates of {N} requests"
    );
    assert_eq!(lost, 0, "requests lost after SIGKILL");
    assert!(
        before_restart > 0 && before_restart < N,
        "the kill must land mid-stream ({before_restart} of {N} answered)"
    );
    assert_eq!(outputs.len() - duplicates, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_model_and_deep_backlog_keep_memory_bounded_and_the_group_stable() {
    utils::init_tracing();
    utils::require_kafka().await;
    let topics = Topics::create("mem", 6).await;
    let group = unique_name("mem");
    // 50,000 queued requests of about 4 KiB each (some 200 MiB), answered by a model that takes
    // 20 ms per request. Without backpressure the consumer would pull the whole backlog into
    // memory; with it, at most max_in_flight_records (500, about 2 MiB) plus librdkafka's
    // prefetch (consumer_queue_kbytes, 2 MiB) are held.
    const N: usize = 50_000;
    produce(&topics.requests, &requests("m", N, 20, 4000)).await;
    let port = crate::utils::free_port();
    let mut child = spawn(
        &topics,
        &group,
        &[
            ("HTTP__LISTEN", format!("127.0.0.1:{port}")),
            ("EXECUTOR__MAX_IN_FLIGHT_RECORDS", "500".into()),
            ("EXECUTOR__MAX_IN_FLIGHT_BATCHES", "2".into()),
            ("BATCH__MAX_RECORDS", "100".into()),
            ("KAFKA__CONSUMER_QUEUE_KBYTES", "2048".into()),
        ],
    );
    const BOUND_MIB: u64 = 150;
    let mut peak = 0;
    let mut paused_seen = false;
    let mut max_in_flight = 0.0_f64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "inferflow exited under load"
        );
        peak = peak.max(rss_mib(child.id()).unwrap_or(0));
        if let Ok(resp) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            let text = resp.text().await.unwrap_or_default();
            for line in text.lines() {
                if let Some(v) =
                    line.strip_prefix("inferflow_paused_partitions{source=\"requests\"} ")
                {
                    paused_seen |= v.trim().parse::<f64>().unwrap_or(0.0) > 0.0;
                }
                if let Some(v) =
                    line.strip_prefix("inferflow_in_flight_records{source=\"requests\"} ")
                {
                    max_in_flight = max_in_flight.max(v.trim().parse().unwrap_or(0.0));
                }
            }
        }
    }
    // The consumer is still a member of a stable group.
    let consumer: BaseConsumer = kafka_config().create().unwrap();
    let groups = consumer
        .fetch_group_list(Some(&group), Duration::from_secs(10))
        .unwrap();
    let info = groups.groups().first().expect("group exists");
    let (state, members) = (info.state().to_owned(), info.members().len());
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(90));

    println!(
        "deep backlog: peak RSS {peak} MiB (bound {BOUND_MIB}), max in-flight {max_in_flight}, group {state} with {members} member(s)"
    );
    assert!(
        peak > 0 && peak < BOUND_MIB,
        "peak RSS {peak} MiB exceeds {BOUND_MIB} MiB"
    );
    // The budget stays full for seconds at a time with this slow model, so the source pauses
    // after its one-second stall limit (short stalls only stop taking records).
    assert!(paused_seen, "backpressure never paused the partitions");
    assert!(
        max_in_flight <= 600.0,
        "in-flight records {max_in_flight} above the budget of 500 plus one batch"
    );
    assert_eq!(
        (state.as_str(), members),
        ("Stable", 1),
        "the consumer must stay in its group"
    );
    assert!(
        status.success(),
        "SIGTERM under load must still exit 0, got {status}"
    );
}

/// With feature ingestion turned off, SIGTERM still ends the process promptly with exit 0 (the
/// shutdown waits for ingestion only when it runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_without_feature_ingestion_exits_0_promptly() {
    utils::init_tracing();
    utils::require_kafka().await;
    let topics = Topics::create("noingest", 2).await;
    let group = unique_name("noingest");
    produce(&topics.requests, &requests("n", 10, 0, 0)).await;
    let mut child = spawn(&topics, &group, &[("INGEST__ENABLED", "false".into())]);
    let outputs = collect(
        &[&topics.results],
        10,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    assert_eq!(outputs.len(), 10);
    let asked = Instant::now();
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(60));
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "shutdown took {:?}; it must not wait out the shutdown margin",
        asked.elapsed()
    );
}

/// The members of `group` the broker lists.
fn group_members(group: &str) -> usize {
    let consumer: BaseConsumer = kafka_config().create().expect("consumer");
    let groups = consumer
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .expect("group list");
    groups.groups().first().map_or(0, |g| g.members().len())
}

/// SIGTERM with static membership (`kafka.group_instance_id`, as the Helm chart's StatefulSet
/// sets it) keeps the membership: the broker still lists the member after the process exits,
/// so a restart within `kafka.session_timeout_ms` takes its partitions back without a
/// rebalance. A dynamic member leaves its group at once, so its partitions move without
/// waiting for the session timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_a_static_membership_and_leaves_a_dynamic_one() {
    utils::init_tracing();
    utils::require_kafka().await;
    let topics = Topics::create("membership", 2).await;
    produce(&topics.requests, &requests("s", 10, 0, 0)).await;
    for (instance_id, members_after_stop) in [(Some("static-0"), 1), (None, 0)] {
        let group = unique_name("membership");
        let mut extra = vec![
            ("INGEST__ENABLED", "false".to_owned()),
            ("KAFKA__SESSION_TIMEOUT_MS", "45000".to_owned()),
        ];
        extra.extend(instance_id.map(|id| ("KAFKA__GROUP_INSTANCE_ID", id.to_owned())));
        let mut child = spawn(&topics, &group, &extra);
        let deadline = Instant::now() + Duration::from_secs(60);
        while group_members(&group) != 1 {
            assert!(
                Instant::now() < deadline,
                "the instance never joined {group}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        sigterm(&child);
        let status = wait_exit(&mut child, Duration::from_secs(60));
        assert!(status.success(), "SIGTERM must exit 0, got {status}");
        assert_eq!(
            group_members(&group),
            members_after_stop,
            "members of the group right after a graceful stop, group_instance_id {instance_id:?}"
        );
    }
}
