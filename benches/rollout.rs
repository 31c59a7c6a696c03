//! A route's primary latency with and without a healthy shadow version (issue #18, "Done
//! when": the primary's p99 with a healthy shadow within 10 % of the run without it).
//!
//! Both routes serve `sentiment` from version 1 (the shipped VADER model, local provider,
//! result cache off); the second also names version 2 (the same VADER model) as a shadow, whose
//! comparisons are produced to Kafka as in production (`inferflow::app::shadow_sink`, topic
//! `inferflow.bench.rollout.shadow-results` on 127.0.0.1:9092). Batches go through
//! `ModelManager::infer("sentiment", …)`, the call the pipeline's model step makes, on a
//! two-worker Tokio runtime (the machine's two cores).
//!
//! Load: batches of 32 requests (unique review texts, so no cache could answer) at a fixed
//! rate, open loop: each batch starts at its scheduled time whether or not the previous one
//! finished, and its latency is counted from that time (no coordinated omission). The rate
//! comes from a calibration: the process CPU time (all threads, Kafka's included) per batch
//! on the shadowed route, closed loop, the shadow drained as it goes. One batch is then
//! started every `cost / (2 × ROLLOUT_LOAD)`: with the default `ROLLOUT_LOAD` of 0.5, the
//! primary and its shadow together keep half of the two cores busy and half idle, as an
//! instance with headroom runs (the shadow costs CPU too: at a rate that saturates the cores
//! the bench would only show the shadow's CPU taking the primary's, not the request path).
//! The run without the shadow has the same rate, so it keeps the cores less busy.
//!
//! `ROLLOUT_SINK=count` builds every comparison but does not produce it (a diagnostic: what
//! the shadow costs the primary without Kafka's share, the broker being on the same cores).
//!
//! Rounds alternate without / with the shadow (`ROLLOUT_ROUNDS` pairs, default 3, of
//! `ROLLOUT_SECS` seconds each, default 10). After each shadow round the bench waits until
//! every copied request was compared (the sink counts them), so no shadow work spills into
//! the next round. It prints each round's p50, p99 and max batch latency, the shadow
//! comparisons, and the ratio of the medians of the rounds' p99s.
//!
//! `cargo bench --bench rollout` (needs `scripts/stack up`); without `--bench` (under `cargo
//! test`) it does nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use inferflow::config::Config;
use inferflow::executor::ExecRequest;
use inferflow::providers::build::{build_manager, with_routes};
use inferflow::providers::manager::{ModelManager, ShadowSink};
use serde_json::json;

/// Requests per batch.
const BATCH: usize = 32;

/// The shipped VADER model under two versions, without the result cache, and the topics.
const CONFIG: &str = r#"
[kafka]
bootstrap_servers = "127.0.0.1:9092"
group_id = "inferflow-bench-rollout"
statistics_interval_ms = 0
[topics]
requests = "inferflow.bench.rollout.requests"
results = "inferflow.bench.rollout.results"
dlq = "inferflow.bench.rollout.dlq"
features = "inferflow.bench.rollout.features"
shadow_results = "inferflow.bench.rollout.shadow-results"
# One provider for both versions: they share its `max_concurrency` permits (the cores), as
# two versions of one local model do in production.
[providers.local.local.models.vader]
kind = "vader"
path = "models/vader"
[models."sentiment@1"]
provider = "local"
remote_model = "vader"
cache = false
# The shadow: the same VADER, so every comparison agrees.
[models."sentiment@2"]
provider = "local"
remote_model = "vader"
cache = false
"#;

/// Counts the comparisons, then hands them to the service's Kafka sink.
struct Counting {
    /// The service's Kafka sink; `None` with `ROLLOUT_SINK=count` (comparisons only counted).
    inner: Option<Arc<dyn ShadowSink>>,
    seen: AtomicU64,
}

impl ShadowSink for Counting {
    fn publish(&self, request_id: &str, shadow: &str, comparison: &[u8]) {
        self.seen.fetch_add(1, Ordering::Relaxed);
        if let Some(inner) = &self.inner {
            inner.publish(request_id, shadow, comparison);
        }
    }
}

/// Makes batches of review texts never seen before.
struct Requests(u64);

impl Requests {
    fn batch(&mut self) -> Vec<ExecRequest> {
        (0..BATCH)
            .map(|_| {
                self.0 += 1;
                let n = self.0;
                let text = format!(
                    "Review {n}: the delivery was {} and the product is {}, honestly {} overall!",
                    ["late", "quick", "fine", "terrible"][(n % 4) as usize],
                    ["great", "broken", "okay", "not bad at all"][(n / 4 % 4) as usize],
                    ["disappointing", "good", "amazing"][(n / 16 % 3) as usize],
                );
                ExecRequest {
                    request_id: format!("r{n}"),
                    data: json!({ "text": text }),
                    parameters: None,
                    entity: None,
                    tenant: None,
                }
            })
            .collect()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Waits until `target` comparisons were seen, or none came for 200 ms (dropped batches never
/// come).
async fn drain(counting: &Counting, target: u64) {
    let mut last = (counting.seen.load(Ordering::Relaxed), Instant::now());
    loop {
        let seen = counting.seen.load(Ordering::Relaxed);
        if seen >= target {
            return;
        }
        if seen != last.0 {
            last = (seen, Instant::now());
        } else if last.1.elapsed() > Duration::from_millis(200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The process's CPU time (user and system, all threads), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The fields after the command's closing parenthesis; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // Linux reports them in USER_HZ, 100 per second.
    Duration::from_millis(ticks * 10)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One round: batches every `interval` for `secs`, each on a task of its own; the batch
/// latencies from their scheduled start.
async fn round(
    models: &Arc<ModelManager>,
    requests: &mut Requests,
    interval: Duration,
    secs: f64,
) -> Vec<Duration> {
    let count = (secs / interval.as_secs_f64()) as u32;
    let start = tokio::time::Instant::now() + Duration::from_millis(5);
    let mut tasks = Vec::with_capacity(count as usize);
    for k in 0..count {
        let due = start + interval * k;
        let batch = requests.batch();
        tokio::time::sleep_until(due).await;
        let models = Arc::clone(models);
        tasks.push(tokio::spawn(async move {
            let outcomes = models.infer("sentiment", batch).await;
            let took = due.elapsed();
            assert!(
                outcomes.iter().all(Result::is_ok),
                "the primary answered every request"
            );
            took
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    for task in tasks {
        latencies.push(task.await.expect("a batch task"));
    }
    latencies.sort();
    latencies
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("rollout: run with `cargo bench --bench rollout` (needs scripts/stack up)");
        return;
    }
    let rounds: usize = env_or("ROLLOUT_ROUNDS", 3);
    let secs: f64 = env_or("ROLLOUT_SECS", 10.0);
    let load: f64 = env_or("ROLLOUT_LOAD", 0.5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let config = Config::from_toml_str(CONFIG).expect("the bench's config");
        inferflow::processor::ensure_topics(&config)
            .await
            .expect("topics (is scripts/stack up?)");
        let models = build_manager(&config.providers, &config.models, &config.result_cache)
            .await
            .expect("models start");
        // `ROLLOUT_SINK=count`: comparisons are built but not produced, to tell the shadow's
        // own cost from Kafka's (the broker shares the two cores here).
        let kafka = match std::env::var("ROLLOUT_SINK").as_deref() {
            Ok("count") => None,
            _ => Some(
                inferflow::app::shadow_sink(&config)
                    .expect("the shadow sink")
                    .expect("a shadow results topic"),
            ),
        };
        let counting = Arc::new(Counting {
            inner: kafka,
            seen: AtomicU64::new(0),
        });
        models.set_shadow_sink(Arc::clone(&counting) as Arc<dyn ShadowSink>);
        let route = |extra: &str| {
            let toml = format!("{CONFIG}\n[routes.sentiment]\nversions = {{ \"1\" = 100 }}\n{extra}");
            let config = Config::from_toml_str(&toml).expect("the route");
            with_routes(&models, &config.routes).expect("routes")
        };
        let plain = route("");
        let shadowed = route("[routes.sentiment.shadow]\nversions = [\"2\"]\ncompare_path = \"label\"\n");

        // Calibration: the process CPU per batch with the shadow (closed loop, the shadow
        // drained every 16 batches so that nothing is dropped), Kafka's threads included.
        let mut requests = Requests(0);
        for _ in 0..100 {
            let _ = shadowed.infer("sentiment", requests.batch()).await;
        }
        drain(&counting, 100 * BATCH as u64).await;
        let seen = counting.seen.load(Ordering::Relaxed);
        let (cpu0, wall0) = (cpu_time(), Instant::now());
        let batches = 1600u64;
        for k in 1..=batches {
            let _ = shadowed.infer("sentiment", requests.batch()).await;
            if k % 16 == 0 {
                drain(&counting, seen + k * BATCH as u64).await;
            }
        }
        let cost = (cpu_time() - cpu0) / batches as u32;
        let compared = counting.seen.load(Ordering::Relaxed) - seen;
        // `load` of two cores: one batch's CPU (with its shadow) every `cost / (2 load)`.
        let interval = cost.div_f64(2.0 * load);
        println!(
            "rollout: a batch of {BATCH} with its shadow costs {cost:?} of CPU (mean of {batches}, \
             {compared} comparisons, {:?} wall); one batch every {interval:?} ({:.0} requests/s, \
             {:.0} % of 2 cores with the shadow); {rounds} rounds of {secs} s each",
            wall0.elapsed(),
            BATCH as f64 / interval.as_secs_f64(),
            load * 100.0
        );
        // Warm-up of both.
        round(&plain, &mut requests, interval, 1.0).await;
        let seen = counting.seen.load(Ordering::Relaxed);
        let lat = round(&shadowed, &mut requests, interval, 1.0).await;
        drain(&counting, seen + (lat.len() * BATCH) as u64).await;

        let mut p99 = [Vec::new(), Vec::new()];
        let mut p50 = [Vec::new(), Vec::new()];
        for r in 1..=rounds {
            for (i, (name, models)) in [("without shadow", &plain), ("with shadow", &shadowed)]
                .into_iter()
                .enumerate()
            {
                let before = counting.seen.load(Ordering::Relaxed);
                let (cpu0, wall0) = (cpu_time(), Instant::now());
                let lat = round(models, &mut requests, interval, secs).await;
                let sent = (lat.len() * BATCH) as u64;
                if i == 1 {
                    // Let the shadow finish what was copied before the next round starts.
                    drain(&counting, before + sent).await;
                }
                let compared = counting.seen.load(Ordering::Relaxed) - before;
                let busy = (cpu_time() - cpu0).as_secs_f64() / wall0.elapsed().as_secs_f64() / 2.0;
                let (a, b, m) = (
                    percentile(&lat, 0.5),
                    percentile(&lat, 0.99),
                    percentile(&lat, 1.0),
                );
                println!(
                    "round {r} {name:>14}: {} batches, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; \
                     shadow comparisons {compared} of {sent} requests; process CPU {:.0} % of 2 cores",
                    lat.len(),
                    a.as_secs_f64() * 1e3,
                    b.as_secs_f64() * 1e3,
                    m.as_secs_f64() * 1e3,
                    busy * 100.0,
                );
                p50[i].push(a.as_secs_f64() * 1e3);
                p99[i].push(b.as_secs_f64() * 1e3);
            }
        }
        let (p50_a, p50_b) = (median(&mut p50[0]), median(&mut p50[1]));
        let (p99_a, p99_b) = (median(&mut p99[0]), median(&mut p99[1]));
        println!(
            "medians of {rounds} rounds: p50 {p50_a:.3} → {p50_b:.3} ms (ratio {:.3}), \
             p99 {p99_a:.3} → {p99_b:.3} ms (ratio {:.3})",
            p50_b / p50_a,
            p99_b / p99_a
        );
    });
}
