//! One run of a candidate: from a backlog (phase 1, throughput), or live with the generator
//! producing (phase 2, latency at a paced load; and the passthrough's capacity).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::collector::{Arrivals, Collector};
use super::kafka::{Admin, unique};
use super::load::{Requests, generator, send};
use super::lock;
use super::process::{CacheCounts, CpuMark, RunTopics, cache_counts, cpu_mark, spawn};
use super::settings::{Candidate, Settings};
use super::stats::percentile;

// ---------------------------------------------------------------------------------------------
// phase 1: throughput from a backlog

#[derive(Debug, Clone, Copy)]
pub(crate) struct ThroughputSample {
    /// Requests per second between the broker appending the results of the first tenth and of
    /// the last request (the results' Kafka timestamps, `LogAppendTime`).
    pub(crate) rate: f64,
    /// CPU seconds per 1,000 requests over that same interval (sampled CPU time, interpolated
    /// at its ends).
    pub(crate) cpu_candidate: f64,
    pub(crate) cpu_broker: f64,
    /// Requests per second as the collector received them (its arrival times): lower than
    /// `rate` when the candidate is slower, higher when the collector fell behind and caught up
    /// on a backlog of results the candidate had already produced.
    pub(crate) arrival_rate: f64,
    /// The realistic candidate's cache counters at the end of the run.
    pub(crate) caches: Option<CacheCounts>,
}

pub(crate) fn throughput_run(
    s: &Settings,
    admin: &Admin,
    candidate: Candidate,
    backlog: &str,
    tag: &str,
) -> ThroughputSample {
    let n = s.messages;
    let warm = n / 10;
    let t = RunTopics {
        requests: backlog.to_owned(),
        results: unique("results"),
        dlq: unique("dlq"),
        group: unique(candidate.name()),
    };
    // The results' timestamps are the broker's append times: when each result was durable
    // and readable. A producer's create time is when the candidate handed the record to its
    // client library, which can queue far ahead of the broker (the passthrough's librdkafka
    // queue holds up to 100,000 records, half the backlog).
    admin.create_with(
        &t.results,
        s.partitions,
        &[("message.timestamp.type", "LogAppendTime")],
    );
    admin.create(&t.dlq, 1);
    let pid = Arc::new(AtomicU64::new(0));
    let collector = Collector::start(
        s,
        &t.results,
        n,
        Instant::now(),
        vec![warm, n],
        (Arc::clone(&pid), s.broker_pid),
    );
    let mut running = spawn(s, candidate, &t, tag);
    pid.store(u64::from(running.pid()), Ordering::Release);
    let sampler = CpuSampler::start(Arc::clone(&pid), s.broker_pid);
    let deadline = Instant::now() + s.run_timeout;
    while collector.arrivals.unique.load(Ordering::Acquire) < n {
        running.check_alive();
        if Instant::now() > deadline {
            eprintln!(
                "[e2e] {tag} {}: only {} of {n} results within {:?}",
                candidate.name(),
                collector.arrivals.unique.load(Ordering::Acquire),
                s.run_timeout
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let caches = running.metrics.as_deref().and_then(cache_counts);
    if let Some(c) = &caches {
        eprintln!("[e2e] {tag} {}: {}", candidate.name(), c.describe());
    }
    let samples = sampler.finish();
    running.stop();
    let arrivals = collector.finish();
    admin.delete(&[&t.results, &t.dlq], Some(&t.group));
    check_outputs(&arrivals, candidate, tag);
    let requests = (n - warm) as f64;
    let marks = lock(&arrivals.marks).clone();
    let arrival_rate = match (marks.first(), marks.get(1)) {
        (Some((_, a)), Some((_, b))) => requests / b.at.duration_since(a.at).as_secs_f64(),
        _ => f64::NAN,
    };
    let mut appended = lock(&arrivals.appended).clone();
    appended.sort_unstable();
    let (Some(&a), Some(&b)) = (appended.get(warm.saturating_sub(1)), appended.get(n - 1)) else {
        return ThroughputSample {
            rate: f64::NAN,
            cpu_candidate: f64::NAN,
            cpu_broker: f64::NAN,
            arrival_rate,
            caches,
        };
    };
    let (a, b) = (a as f64, b as f64);
    let cpu = |at: f64| cpu_at(&samples, at);
    let (cpu_a, cpu_b) = (cpu(a), cpu(b));
    ThroughputSample {
        // Millisecond timestamps: over the 180,000 requests timed, a bound of ±1 ms each end.
        rate: requests / ((b - a).max(1.0) / 1000.0),
        cpu_candidate: (cpu_b.0 - cpu_a.0) / requests * 1000.0,
        cpu_broker: (cpu_b.1 - cpu_a.1) / requests * 1000.0,
        arrival_rate,
        caches,
    }
}

/// Samples the candidate's and the broker's CPU time every [`CPU_SAMPLE_EVERY`], stamped with
/// the wall clock in milliseconds since the epoch (the clock of Kafka's record timestamps), so
/// the CPU spent between two results' appends can be read off afterwards.
struct CpuSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(f64, f64, f64)>>,
}

const CPU_SAMPLE_EVERY: Duration = Duration::from_millis(5);

fn epoch_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

impl CpuSampler {
    fn start(pid: Arc<AtomicU64>, broker: Option<u32>) -> CpuSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut samples = Vec::new();
                let sample = |samples: &mut Vec<_>| {
                    let mark = cpu_mark(pid.load(Ordering::Acquire) as u32, broker);
                    samples.push((epoch_ms(), mark.candidate, mark.broker));
                };
                while !stop.load(Ordering::Acquire) {
                    sample(&mut samples);
                    std::thread::sleep(CPU_SAMPLE_EVERY);
                }
                // After the stop (every result has arrived, so was appended): the window's
                // end lies between two samples even when it fell in the last sleep.
                sample(&mut samples);
                samples
            }
        });
        CpuSampler { stop, thread }
    }

    /// The samples: (wall clock ms, candidate CPU s, broker CPU s), in time order.
    fn finish(self) -> Vec<(f64, f64, f64)> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the CPU sampler")
    }
}

/// The (candidate, broker) CPU seconds at wall-clock time `at` (ms), interpolated between the
/// samples around it; NaN outside the samples.
fn cpu_at(samples: &[(f64, f64, f64)], at: f64) -> (f64, f64) {
    let after = samples.partition_point(|s| s.0 < at);
    let (Some(lo), Some(hi)) = (
        after.checked_sub(1).and_then(|i| samples.get(i)),
        samples.get(after),
    ) else {
        return (f64::NAN, f64::NAN);
    };
    let f = if hi.0 > lo.0 {
        (at - lo.0) / (hi.0 - lo.0)
    } else {
        0.0
    };
    (lo.1 + (hi.1 - lo.1) * f, lo.2 + (hi.2 - lo.2) * f)
}

fn check_outputs(arrivals: &Arrivals, candidate: Candidate, tag: &str) {
    let errors = arrivals.errors.load(Ordering::Relaxed);
    assert_eq!(
        errors,
        0,
        "{tag} {}: {errors} error results",
        candidate.name()
    );
    let strays = arrivals.strays.load(Ordering::Relaxed);
    let dups = arrivals.duplicates.load(Ordering::Relaxed);
    if strays + dups > 0 {
        eprintln!(
            "[e2e] {tag} {}: {dups} duplicate and {strays} unexpected results",
            candidate.name()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// phase 2: latency at a fixed offered load

#[derive(Debug, Clone, Copy)]
pub(crate) struct LatencySample {
    /// Percentiles in milliseconds (infinite when more results than that are missing).
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) missing: usize,
    pub(crate) cpu_candidate: f64,
    pub(crate) cpu_broker: f64,
}

const WARM_UP: Duration = Duration::from_secs(1);
/// Requests sent until the candidate first answers, at most.
const PROBES: usize = 2_000;

/// How a live run offers its requests.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Load {
    /// Paced at this many requests per second: `WARM_UP`, then `E2E_LATENCY_SECS` measured.
    Paced(f64),
    /// This many requests, as fast as the generator sends them (the first tenth a warm-up).
    Flood(usize),
}

/// What a live run saw, per request after the probes.
struct LiveOutcome {
    /// When each request was produced and its result consumed: microseconds after the
    /// collector's base, 0 = never.
    sent: Vec<u64>,
    received: Vec<u64>,
    /// Requests before this one are the warm-up.
    measured_from: usize,
    /// CPU at the first measured request and after the last one was sent.
    cpu: (CpuMark, CpuMark),
}

/// Fresh topics, the candidate started and answering, then requests produced while it runs.
fn live_run(
    s: &Settings,
    admin: &Admin,
    candidate: Candidate,
    load: Load,
    tag: &str,
) -> LiveOutcome {
    let t = RunTopics {
        requests: unique("requests"),
        results: unique("results"),
        dlq: unique("dlq"),
        group: unique(candidate.name()),
    };
    admin.create(&t.requests, s.partitions);
    admin.create(&t.results, s.partitions);
    admin.create(&t.dlq, 1);
    let (count, rate, measured_from, drain_for) = match load {
        Load::Paced(rate) => (
            ((WARM_UP.as_secs_f64() + s.latency_secs) * rate).ceil() as usize,
            rate,
            (WARM_UP.as_secs_f64() * rate) as usize,
            Duration::from_secs_f64(s.latency_secs.max(5.0)),
        ),
        Load::Flood(n) => (n, f64::INFINITY, n / 10, s.run_timeout),
    };
    let base = Instant::now();
    let pid = Arc::new(AtomicU64::new(0));
    let collector = Collector::start(
        s,
        &t.results,
        PROBES + count,
        base,
        Vec::new(),
        (Arc::clone(&pid), s.broker_pid),
    );
    let mut running = spawn(s, candidate, &t, tag);
    pid.store(u64::from(running.pid()), Ordering::Release);
    let producer = generator(s);
    let requests = Requests::new(s, candidate.workload(), "l");
    // Wait until the candidate answers (group joined, partitions assigned), probing every 50 ms.
    let ready_by = Instant::now() + Duration::from_secs(90);
    let mut probe = 0;
    while collector.arrivals.unique.load(Ordering::Acquire) == 0 {
        running.check_alive();
        assert!(
            Instant::now() < ready_by,
            "{} did not answer within 90 s",
            candidate.name()
        );
        assert!(probe < PROBES, "too many probes");
        send(
            &producer,
            &t.requests,
            &requests.key(probe),
            &requests.body(probe),
        );
        probe += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    // Every 250 µs, send what the rate owes since the start (everything at once for a flood).
    let mut sent: Vec<u64> = vec![0; count];
    let start = Instant::now();
    let mut cpu_start = None;
    let mut i = 0;
    while i < count {
        let owed = if rate.is_finite() {
            ((start.elapsed().as_secs_f64() * rate) as usize).min(count)
        } else {
            count
        };
        while i < owed {
            if i == measured_from {
                cpu_start = Some(cpu_mark(running.pid(), s.broker_pid));
            }
            let seq = PROBES + i;
            sent[i] = collector.arrivals.micros(Instant::now());
            send(
                &producer,
                &t.requests,
                &requests.key(seq),
                &requests.body(seq),
            );
            i += 1;
        }
        std::thread::sleep(Duration::from_micros(250));
    }
    let cpu_end = cpu_mark(running.pid(), s.broker_pid);
    // Drain: wait until every request is answered, or give up after `drain_for`.
    let drain_by = Instant::now() + drain_for;
    let received = |i: usize| collector.arrivals.received[PROBES + i].load(Ordering::Acquire);
    let mut pending_from = 0;
    while Instant::now() < drain_by {
        while pending_from < count && received(pending_from) != 0 {
            pending_from += 1;
        }
        if pending_from == count {
            break;
        }
        running.check_alive();
        std::thread::sleep(Duration::from_millis(20));
    }
    running.stop();
    let arrivals = collector.finish();
    drop(producer);
    admin.delete(&[&t.requests, &t.results, &t.dlq], Some(&t.group));
    check_outputs(&arrivals, candidate, tag);
    LiveOutcome {
        received: (0..count)
            .map(|i| arrivals.received[PROBES + i].load(Ordering::Acquire))
            .collect(),
        sent,
        measured_from,
        cpu: (cpu_start.expect("a measured window"), cpu_end),
    }
}

/// The passthrough's throughput while the generator produces at the same time, as fast as it
/// can (a live stream has its production on the same cores): the 100 % of the latency loads.
pub(crate) fn capacity_run(s: &Settings, admin: &Admin, tag: &str) -> f64 {
    let outcome = live_run(
        s,
        admin,
        Candidate::Passthrough,
        Load::Flood(s.messages),
        tag,
    );
    let mut times: Vec<u64> = outcome
        .received
        .iter()
        .copied()
        .filter(|t| *t != 0)
        .collect();
    times.sort_unstable();
    let from = times.len() / 10;
    match (times.get(from), times.last()) {
        (Some(a), Some(b)) if b > a => (times.len() - 1 - from) as f64 / ((b - a) as f64 / 1e6),
        _ => f64::NAN,
    }
}

pub(crate) fn latency_run(
    s: &Settings,
    admin: &Admin,
    candidate: Candidate,
    rate: f64,
    tag: &str,
) -> LatencySample {
    let o = live_run(s, admin, candidate, Load::Paced(rate), tag);
    let mut latencies: Vec<f64> = (o.measured_from..o.sent.len())
        .map(|i| {
            if o.received[i] == 0 {
                f64::INFINITY
            } else {
                o.received[i].saturating_sub(o.sent[i]) as f64 / 1000.0
            }
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let missing = latencies.iter().filter(|l| l.is_infinite()).count();
    let (cpu_start, cpu_end) = o.cpu;
    let sent_requests = (o.sent.len() - o.measured_from) as f64;
    LatencySample {
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        p999: percentile(&latencies, 0.999),
        missing,
        cpu_candidate: (cpu_end.candidate - cpu_start.candidate) / sent_requests * 1000.0,
        cpu_broker: (cpu_end.broker - cpu_start.broker) / sent_requests * 1000.0,
    }
}
