//! End-to-end benchmark against the real broker of `scripts/stack`: inferflow beside the raw
//! Kafka limit and a peer, in one run, every figure a ratio of runs measured side by side.
//!
//! Candidates, each a separate process reading the same requests (same topic layout, message
//! sizes and partition count) and writing one output per request, keyed by its request id:
//!
//! - **passthrough**: a minimal rdkafka consume → produce loop (this binary, re-run with
//!   `--role passthrough`): each record's key and bytes copied to the results topic, no
//!   parsing, librdkafka's auto-commit, and the same 20 ms fetch backoff as inferflow's
//!   consumer. The practical limit of this broker on this machine.
//! - **peer**: the same identity job in Python with confluent-kafka (`benches/peer/identity.py`):
//!   parse, check, answer `{request_id, status, output, …}`, at least once.
//! - **inferflow**: the real `inferflow run` binary (`E2E_INFERFLOW_BIN`, by default the one
//!   cargo built for this bench; `scripts/bench` passes the release build) with the `identity`
//!   pipeline, configured by `INFERFLOW__…` variables (and `E2E_INFERFLOW_CONFIG`, a TOML file
//!   given with `--config`). Variables set in the environment pass through, so
//!   `INFERFLOW__BATCH__LINGER_MS=2 scripts/bench` measures another configuration.
//! - **realistic**: the same binary with `--config benches/e2e/realistic.toml`
//!   (`E2E_REALISTIC_CONFIG`) and the `realistic` pipeline of `benches/e2e/pipelines/`: a
//!   customer review cleaned (preprocess), the reviewer's profile read from the feature store
//!   (Cassandra, `feature_store.backend = "scylla"`; after each user's first read the
//!   in-process cache answers), scored by the local VADER model, and routed (postprocess). Its
//!   requests carry a user (`E2E_ENTITIES` of them, 1,000 by default, profiles written by the
//!   driver before the runs) and a review text unique to the request (so the result cache
//!   never answers), padded to the same `E2E_PAYLOAD_BYTES`. Its ratio to the peer is against
//!   the peer's identity job: the peer has no realistic version.
//!
//! Two phases, each interleaved (A B C A B C …), medians reported:
//!
//! 1. **Throughput**: `E2E_MESSAGES` requests pre-loaded in one topic; each run reads them in
//!    a fresh consumer group and writes to a fresh results topic. The driver counts distinct
//!    results; the rate is taken from the 10 % mark to the last result (start-up and group
//!    join excluded) **as the broker appended them**: by the results' Kafka timestamps (the
//!    results topics use `LogAppendTime`), sorted. CPU seconds per 1,000 requests
//!    are over the same window, from `/proc/PID/stat` (utime + stime) of the candidate and of
//!    the broker, sampled every 5 ms and interpolated at the window's ends. (The rate at which
//!    the driver *received* them is printed beside it: when the driver's collector falls behind
//!    a fast candidate, that figure measures the collector catching up.) Each round ends
//!    with the passthrough's **capacity**: its throughput while the driver produces
//!    `E2E_MESSAGES` requests as fast as it can.
//! 2. **Latency** at fixed offered loads, `E2E_LOADS` percent of the median capacity of
//!    phase 1: requests paced by the driver (1 s warm-up, then
//!    `E2E_LATENCY_SECS` measured); latency = time the driver consumed the result − time it
//!    produced the request, both on this machine's monotonic clock. Results missing after the
//!    drain count as infinitely late.
//!
//! Run with `scripts/bench` (builds, prepares the peer, checks the broker, writes the table),
//! or `cargo bench --bench e2e` once the peer's virtual environment exists. Under `cargo test`
//! (no `--bench` argument) it does nothing. Settings (environment): `E2E_MESSAGES` (200000),
//! `E2E_PAYLOAD_BYTES` (256), `E2E_PARTITIONS` (6), `E2E_REPEATS` (3), `E2E_LOADS` (10,50,80),
//! `E2E_LOAD_RATES` (fixed loads in requests/s instead of `E2E_LOADS`, e.g. 3000,7000),
//! `E2E_LATENCY_SECS` (8), `E2E_CANDIDATES` (passthrough,peer,inferflow,realistic),
//! `E2E_ENTITIES` (1000), `E2E_REALISTIC_CONFIG` (benches/e2e/realistic.toml), `E2E_PYTHON`
//! (.bench/venv/bin/python), `E2E_BOOTSTRAP` (127.0.0.1:9092), `E2E_BROKER_PID` (found by
//! its `kafka.Kafka` command line), `E2E_OUT` (also write the report there), `E2E_LOGS`
//! (candidates' stderr, .bench/logs), `E2E_RUN_TIMEOUT_SECS` (180).
//!
//! This file runs the phases; its modules are in `benches/e2e/`: `settings.rs` (the settings
//! above and the candidates), `process.rs` (starting, checking and stopping a candidate; CPU
//! time from `/proc`), `passthrough.rs` (the passthrough role), `kafka.rs` (clients, topics),
//! `load.rs` (the requests, the generator, pre-loading, the realistic users' profiles),
//! `collector.rs` (when each result arrived), `runs.rs` (one run of either phase), `stats.rs`
//! and `report.rs` (the tables). The realistic workload's requests and profiles are
//! `benches/support/realistic.rs`, shared with `benches/realistic.rs`.

#![allow(missing_docs, unreachable_pub)]

#[path = "e2e/collector.rs"]
mod collector;
#[path = "e2e/kafka.rs"]
mod kafka;
#[path = "e2e/load.rs"]
mod load;
#[path = "e2e/passthrough.rs"]
mod passthrough;
#[path = "e2e/process.rs"]
mod process;
#[path = "support/realistic.rs"]
mod realistic;
#[path = "e2e/report.rs"]
mod report;
#[path = "e2e/runs.rs"]
mod runs;
#[path = "e2e/settings.rs"]
mod settings;
#[path = "e2e/stats.rs"]
mod stats;

use std::sync::Mutex;
use std::time::Instant;

use kafka::{Admin, unique};
use load::{preload, seed_features};
use report::{Measured, ms};
use runs::{LatencySample, ThroughputSample, capacity_run, latency_run, throughput_run};
use settings::{Candidate, Settings, Workload};
use stats::median;

const START_HINT: &str = "start it with `scripts/stack up` (from the main checkout)";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Both phases, then the report.
fn run(s: &Settings, admin: &Admin) {
    let started = Instant::now();
    let machine = report::machine(s);
    eprintln!("[e2e] {machine}");
    for c in &s.candidates {
        if *c == Candidate::Peer && !s.python.exists() {
            panic!(
                "the peer's Python ({}) does not exist: run scripts/bench, which creates its virtual environment, or set E2E_PYTHON",
                s.python.display()
            );
        }
    }

    if s.candidates.contains(&Candidate::Realistic) {
        seed_features(s);
    }

    let (tp, capacity) = throughput_phase(s, admin);
    let max_rate = median(capacity.iter().copied());
    assert!(
        max_rate.is_finite(),
        "the passthrough produced no throughput figure"
    );
    let levels = latency_levels(s, max_rate);
    let lat = latency_phase(s, admin, &levels);
    let measured = Measured {
        tp,
        capacity,
        max_rate,
        levels,
        lat,
    };
    report::write(s, &machine, started, &measured);
}

/// Phase 1: throughput from one pre-loaded backlog per workload, every candidate once a round;
/// each round ends with the passthrough's capacity. Returns the samples per candidate and the
/// capacities.
fn throughput_phase(s: &Settings, admin: &Admin) -> (Vec<Vec<ThroughputSample>>, Vec<f64>) {
    let mut workloads: Vec<Workload> = s.candidates.iter().map(|c| c.workload()).collect();
    workloads.sort_by_key(|w| *w as u8);
    workloads.dedup();
    let backlogs: Vec<(Workload, String)> = workloads
        .into_iter()
        .map(|w| {
            let backlog = unique("backlog");
            admin.create(&backlog, s.partitions);
            let t0 = Instant::now();
            preload(s, &backlog, s.messages, w);
            eprintln!(
                "[e2e] pre-loaded {} {w:?} requests of ~{} B in {:.1} s",
                s.messages,
                s.payload_bytes,
                t0.elapsed().as_secs_f64()
            );
            (w, backlog)
        })
        .collect();
    let backlog_of = |c: Candidate| {
        backlogs
            .iter()
            .find(|(w, _)| *w == c.workload())
            .map(|(_, b)| b.as_str())
            .expect("a backlog per workload")
    };
    let cands = &s.candidates;
    let mut tp: Vec<Vec<ThroughputSample>> = vec![Vec::new(); cands.len()];
    let mut capacity: Vec<f64> = Vec::new();
    for round in 0..s.repeats {
        for (ci, c) in cands.iter().enumerate() {
            let tag = format!("tp{round}");
            let sample = throughput_run(s, admin, *c, backlog_of(*c), &tag);
            eprintln!(
                "[e2e] throughput round {}/{} {:<11}: {:>8.0} req/s, CPU s per 1k req: candidate {:.4}, broker {:.4} (received at {:.0} req/s)",
                round + 1,
                s.repeats,
                c.name(),
                sample.rate,
                sample.cpu_candidate,
                sample.cpu_broker,
                sample.arrival_rate
            );
            tp[ci].push(sample);
        }
        let live = capacity_run(s, admin, &format!("cap{round}"));
        eprintln!(
            "[e2e] throughput round {}/{} passthrough with the generator producing alongside: {live:>8.0} req/s",
            round + 1,
            s.repeats
        );
        capacity.push(live);
    }
    let names: Vec<&str> = backlogs.iter().map(|(_, b)| b.as_str()).collect();
    admin.delete(&names, None);
    (tp, capacity)
}

/// Phase 2's loads: fixed fractions of the passthrough's capacity `max_rate` (`E2E_LOADS`), or
/// fixed rates (`E2E_LOAD_RATES`). Each level: its label, its rate, and its percentage.
fn latency_levels(s: &Settings, max_rate: f64) -> Vec<(String, f64, Option<u32>)> {
    if s.load_rates.is_empty() {
        s.loads
            .iter()
            .map(|p| {
                let rate = max_rate * f64::from(*p) / 100.0;
                (format!("{p} % ({rate:.0}/s)"), rate, Some(*p))
            })
            .collect()
    } else {
        s.load_rates
            .iter()
            .map(|r| (format!("{r:.0}/s"), *r, None))
            .collect()
    }
}

/// Phase 2: latency at each of `levels`, every candidate once a round. Returns the samples per
/// level, per candidate.
fn latency_phase(
    s: &Settings,
    admin: &Admin,
    levels: &[(String, f64, Option<u32>)],
) -> Vec<Vec<Vec<LatencySample>>> {
    let cands = &s.candidates;
    let mut lat: Vec<Vec<Vec<LatencySample>>> = vec![vec![Vec::new(); cands.len()]; levels.len()];
    for (li, (label, rate, _)) in levels.iter().enumerate() {
        let rate = *rate;
        for round in 0..s.repeats {
            for (ci, c) in cands.iter().enumerate() {
                let tag = format!("lat{li}r{round}");
                let sample = latency_run(s, admin, *c, rate, &tag);
                eprintln!(
                    "[e2e] latency {label} round {}/{} {:<11}: p50 {} ms, p99 {} ms, p99.9 {} ms, missing {}",
                    round + 1,
                    s.repeats,
                    c.name(),
                    ms(sample.p50),
                    ms(sample.p99),
                    ms(sample.p999),
                    sample.missing
                );
                lat[li][ci].push(sample);
            }
        }
    }
    lat
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--role") {
        match args.get(i + 1).map(String::as_str) {
            Some("passthrough") => return passthrough::run(&args[i + 2..]),
            other => panic!("unknown role {other:?}"),
        }
    }
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "e2e: run with `scripts/bench` or `cargo bench --bench e2e` (needs scripts/stack up)"
        );
        return;
    }
    let settings = Settings::from_env();
    let admin = Admin::new(&settings);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&settings, &admin)));
    // The topics of a failed run are deleted too (candidates were killed while unwinding).
    admin.clean_up();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
