//! The candidates' processes: starting each (with the topics and configuration of one run),
//! checking and stopping it, its CPU time and the broker's from `/proc`, and the realistic
//! candidate's cache counters from its `/metrics`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::settings::{Candidate, Settings};

/// The broker's pid: the one java process whose command line runs `kafka.Kafka`.
pub(crate) fn find_broker_pid() -> Option<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.iter().any(|a| *a == b"kafka.Kafka") {
            found.push(pid);
        }
    }
    if found.len() > 1 {
        eprintln!(
            "[e2e] several Kafka brokers run ({found:?}); measuring {}; set E2E_BROKER_PID to choose",
            found[0]
        );
    }
    found.first().copied()
}

fn clock_ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of a process (all its threads) so far.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the first, utime the
    // 12th and stime the 13th.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_sec())
}

/// CPU seconds of the candidate and of the broker at one moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuMark {
    pub(crate) at: Instant,
    pub(crate) candidate: f64,
    pub(crate) broker: f64,
}

pub(crate) fn cpu_mark(candidate: u32, broker: Option<u32>) -> CpuMark {
    CpuMark {
        at: Instant::now(),
        candidate: cpu_secs(candidate).unwrap_or(f64::NAN),
        broker: broker.and_then(cpu_secs).unwrap_or(f64::NAN),
    }
}

/// A candidate process; killed if the driver unwinds.
pub(crate) struct Running {
    child: Child,
    log: PathBuf,
    what: String,
    /// `host:port` of its `/metrics` (the realistic candidate, unless the user chose the port).
    pub(crate) metrics: Option<String>,
}

impl Running {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails loudly if the process has exited.
    pub(crate) fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let tail = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "{} exited early ({status}); end of {}:\n{}",
                self.what,
                self.log.display(),
                tail.join("\n")
            );
        }
    }

    /// SIGTERM, then SIGKILL after 40 s.
    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("[e2e] {} did not stop within 40 s; killing it", self.what);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The topics and group of one run.
pub(crate) struct RunTopics {
    pub(crate) requests: String,
    pub(crate) results: String,
    pub(crate) dlq: String,
    pub(crate) group: String,
}

pub(crate) fn spawn(s: &Settings, candidate: Candidate, t: &RunTopics, tag: &str) -> Running {
    std::fs::create_dir_all(&s.logs).expect("creating the log directory");
    let log = s.logs.join(format!("{tag}-{}.log", candidate.name()));
    let stderr = std::fs::File::create(&log).expect("creating a log file");
    let mut metrics = None;
    let mut cmd = match candidate {
        Candidate::Passthrough => {
            let mut cmd = Command::new(std::env::current_exe().expect("this executable"));
            cmd.args([
                "--role",
                "passthrough",
                &s.bootstrap,
                &t.group,
                &t.requests,
                &t.results,
            ]);
            cmd
        }
        Candidate::Peer => {
            let mut cmd = Command::new(&s.python);
            cmd.arg(&s.peer_script)
                .args([&s.bootstrap, &t.group, &t.requests, &t.results, &t.dlq]);
            cmd
        }
        Candidate::Inferflow | Candidate::Realistic => {
            let mut cmd = Command::new(&s.inferflow_bin);
            cmd.arg("run");
            let config = match candidate {
                Candidate::Realistic => Some(&s.realistic_config),
                _ => s.inferflow_config.as_ref(),
            };
            if let Some(config) = config {
                cmd.arg("--config").arg(config);
            }
            if candidate == Candidate::Realistic {
                // Its configuration's paths (models, pipelines) start at the repository.
                cmd.current_dir(&s.root);
            }
            for (key, value) in inferflow_env(s, t) {
                cmd.env(key, value);
            }
            if candidate == Candidate::Realistic
                && std::env::var_os("INFERFLOW__HTTP__LISTEN").is_none()
            {
                // A known port, to read its feature and result cache counters after a run.
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port")
                    .port();
                let addr = format!("127.0.0.1:{port}");
                cmd.env("INFERFLOW__HTTP__LISTEN", &addr);
                metrics = Some(addr);
            }
            cmd
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {} ({cmd:?}): {e}", candidate.name()));
    Running {
        child,
        log,
        what: candidate.name().to_owned(),
        metrics,
    }
}

/// Feature reads (from the cache, from the store) and result cache lookups (hits, misses) of
/// a running inferflow, from its `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CacheCounts {
    features_cached: f64,
    features_store: f64,
    results_hit: f64,
    results_miss: f64,
}

impl CacheCounts {
    pub(crate) fn describe(&self) -> String {
        format!(
            "feature reads {:.0} from the cache, {:.0} from the store; result cache {:.0} hits, {:.0} misses",
            self.features_cached, self.features_store, self.results_hit, self.results_miss
        )
    }
}

pub(crate) fn cache_counts(addr: &str) -> Option<CacheCounts> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let value = |series: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Some(CacheCounts {
        features_cached: value("inferflow_feature_reads_total{source=\"cache\"}"),
        features_store: value("inferflow_feature_reads_total{source=\"store\"}"),
        results_hit: value("inferflow_cache_lookups_total{outcome=\"hit\"}"),
        results_miss: value("inferflow_cache_lookups_total{outcome=\"miss\"}"),
    })
}

/// What the driver sets for `inferflow run`: topics, group, no feature ingestion. Tuning
/// variables in the driver's environment (batch, executor, kafka.extra …) pass through.
fn inferflow_env(s: &Settings, t: &RunTopics) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("KAFKA__BOOTSTRAP_SERVERS", s.bootstrap.clone()),
        ("KAFKA__GROUP_ID", t.group.clone()),
        ("TOPICS__REQUESTS", t.requests.clone()),
        ("TOPICS__RESULTS", t.results.clone()),
        ("TOPICS__DLQ", t.dlq.clone()),
        (
            "TOPICS__FEATURES",
            format!("{}.unused-features", t.requests),
        ),
        ("TOPICS__CREATE_MISSING", "false".to_owned()),
        ("INGEST__ENABLED", "false".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("INFERFLOW__{k}"), v))
    .collect();
    // Defaults the caller may override (e.g. a fixed port to read /metrics during a run).
    if std::env::var_os("INFERFLOW__HTTP__LISTEN").is_none() {
        env.push(("INFERFLOW__HTTP__LISTEN".into(), "127.0.0.1:0".into()));
    }
    if std::env::var_os("INFERFLOW__LOG__LEVEL").is_none() && std::env::var_os("RUST_LOG").is_none()
    {
        env.push(("INFERFLOW__LOG__LEVEL".into(), "warn".into()));
    }
    env
}

/// The `INFERFLOW__…` variables the user set (the configuration under test).
pub(crate) fn inferflow_overrides() -> Vec<String> {
    let mut vars: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("INFERFLOW__"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    vars.sort();
    vars
}
