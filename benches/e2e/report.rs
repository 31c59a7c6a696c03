//! The report: Markdown tables of what the runs measured (medians, ratios to the passthrough
//! and the peer, the targets), printed and written to `E2E_OUT`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use super::process::{CacheCounts, inferflow_overrides};
use super::runs::{LatencySample, ThroughputSample};
use super::settings::{Candidate, Settings};
use super::stats::median;

/// What the two phases measured; candidates in the order of `Settings::candidates`.
pub(crate) struct Measured {
    /// Throughput from a backlog, per candidate, one sample per round.
    pub(crate) tp: Vec<Vec<ThroughputSample>>,
    /// The passthrough's throughput with the generator producing alongside, one per round.
    pub(crate) capacity: Vec<f64>,
    /// Their median: the 100 % of the latency loads.
    pub(crate) max_rate: f64,
    /// The latency loads: label, requests per second, percentage of `max_rate`.
    pub(crate) levels: Vec<(String, f64, Option<u32>)>,
    /// Latency, per load, per candidate, one sample per round.
    pub(crate) lat: Vec<Vec<Vec<LatencySample>>>,
}

/// Prints the report of `measured`, and writes it to `E2E_OUT` when set.
pub(crate) fn write(s: &Settings, machine: &str, started: Instant, measured: &Measured) {
    let Measured {
        tp,
        capacity,
        max_rate,
        levels,
        lat,
    } = measured;
    let cands = &s.candidates;
    let idx = |c: Candidate| cands.iter().position(|x| *x == c);
    let pass = idx(Candidate::Passthrough).expect("passthrough is a candidate");
    // Loads given as percentages of the passthrough's capacity (issue #14's "Done when").
    let level = |percent: u32| levels.iter().position(|l| l.2 == Some(percent));
    let (at_10, at_50) = (level(10), level(50));
    let mut report = Report {
        text: String::new(),
    };
    let overrides = inferflow_overrides();
    report.line("## End-to-end results");
    report.line("");
    report.line(format!(
        "- Machine: {machine}; at the end: {}.",
        read_trimmed("/proc/loadavg")
    ));
    report.line(format!(
        "- Workload: {} pre-loaded requests of ~{} B for the `identity` pipeline{}, {} partitions (requests and results); {} interleaved repeats of every run; whole run {:.1} min.",
        s.messages,
        s.payload_bytes,
        if cands.contains(&Candidate::Realistic) {
            format!(
                " (and as many of the same size for the `realistic` one: a review text unique to each request, by one of {} users)",
                s.entities
            )
        } else {
            String::new()
        },
        s.partitions,
        s.repeats,
        started.elapsed().as_secs_f64() / 60.0
    ));
    report.line(format!(
        "- inferflow: `{}`{}; configuration: {}.",
        s.inferflow_bin.display(),
        s.inferflow_config
            .as_ref()
            .map_or(String::new(), |c| format!(" --config {}", c.display())),
        if overrides.is_empty() {
            "the built-in defaults".to_owned()
        } else {
            format!("defaults plus `{}`", overrides.join(" "))
        }
    ));
    if cands.contains(&Candidate::Realistic) {
        report.line(format!(
            "- realistic: the same binary with `--config {}` (pipeline `realistic`: clean → `profile` features of the request's user from the feature store, cached in process → VADER → route), the same overrides; {} users' profiles written before the runs.",
            s.realistic_config
                .strip_prefix(&s.root)
                .unwrap_or(&s.realistic_config)
                .display(),
            s.entities
        ));
    }
    report.line("");
    report.line("### Throughput from a backlog (medians)");
    report.line("");
    report.line("| candidate | requests/s | × passthrough | × peer | CPU s / 1k req, processor | CPU s / 1k req, broker | requests per processor CPU-second |");
    report.line("|---|---|---|---|---|---|---|");
    let peer = idx(Candidate::Peer);
    let per_round_ratio = |a: usize, b: usize, f: &dyn Fn(&ThroughputSample) -> f64| {
        median(tp[a].iter().zip(&tp[b]).map(|(x, y)| f(x) / f(y)))
    };
    // The median over the rounds of candidate `ci`'s percentile minus the passthrough's, at
    // load `li`.
    let added = |li: usize, ci: usize, pick: &dyn Fn(&LatencySample) -> f64| {
        median(
            lat[li][ci]
                .iter()
                .zip(&lat[li][pass])
                .map(|(x, y)| pick(x) - pick(y)),
        )
    };
    let p99_added = |li: usize, ci: usize| added(li, ci, &|x| x.p99);
    for (ci, c) in cands.iter().enumerate() {
        let rate = median(tp[ci].iter().map(|x| x.rate));
        let cpu = median(tp[ci].iter().map(|x| x.cpu_candidate));
        let broker = median(tp[ci].iter().map(|x| x.cpu_broker));
        let vs_peer = peer.map_or(f64::NAN, |p| per_round_ratio(ci, p, &|x| x.rate));
        report.line(format!(
            "| {} | {:.0} | {} | {} | {:.4} | {:.4} | {:.0} |",
            c.label(),
            rate,
            ratio(per_round_ratio(ci, pass, &|x| x.rate)),
            ratio(vs_peer),
            cpu,
            broker,
            1000.0 / cpu
        ));
    }
    report.line("");
    report.line(
        "Ratios are medians of the per-round ratios (each round runs the candidates back to back).",
    );
    if cands.contains(&Candidate::Realistic) && peer.is_some() {
        report.line("The peer does the identity job only: the realistic pipeline's ratio to it is against the peer's identity job.");
    }
    report.line("");
    report.line("### End-to-end latency at fixed offered loads (medians, ms)");
    report.line("");
    if s.load_rates.is_empty() {
        report.line(format!("Loads are percentages of the passthrough's median throughput while the load generator produces at the same time, as fast as it can ({max_rate:.0} requests/s; all runs: {capacity:.0?}): a live stream has its production on the same cores."));
    } else {
        report.line(format!("Loads are fixed rates (`E2E_LOAD_RATES`); for scale, the passthrough's median throughput while the load generator produces at the same time was {max_rate:.0} requests/s (all runs: {capacity:.0?})."));
    }
    report.line("");
    report.line("| load | candidate | p50 | p99 | p99.9 | p99 added over passthrough | CPU s / 1k req, processor | CPU s / 1k req, broker |");
    report.line("|---|---|---|---|---|---|---|---|");
    for (li, (label, _, _)) in levels.iter().enumerate() {
        for (ci, c) in cands.iter().enumerate() {
            let runs = &lat[li][ci];
            let added = p99_added(li, ci);
            report.line(format!(
                "| {label} | {} | {} | {} | {} | {} | {:.4} | {:.4} |",
                c.name(),
                ms(median(runs.iter().map(|x| x.p50))),
                ms(median(runs.iter().map(|x| x.p99))),
                ms(median(runs.iter().map(|x| x.p999))),
                if ci == pass { "–".into() } else { ms(added) },
                median(runs.iter().map(|x| x.cpu_candidate)),
                median(runs.iter().map(|x| x.cpu_broker)),
            ));
        }
    }
    report.line("");
    let inferflow = idx(Candidate::Inferflow);
    let realistic = idx(Candidate::Realistic);
    if inferflow.is_some() || realistic.is_some() {
        report.line("### Targets");
        report.line("");
        report.line("| target | aim | measured | met |");
        report.line("|---|---|---|---|");
    }
    let p50_added = |li: usize, ci: usize| added(li, ci, &|x| x.p50);
    let latency_target = |report: &mut Report, target: &str, aim_ms: f64, measured: f64| {
        report.target(
            target,
            &format!("≤ {aim_ms} ms"),
            format!("{} ms", ms(measured)),
            Some(measured <= aim_ms),
        );
    };
    if let Some(inf) = inferflow {
        let r = per_round_ratio(inf, pass, &|x| x.rate);
        report.target(
            "identity throughput / passthrough",
            "≥ 0.90×",
            ratio(r),
            Some(r >= 0.9),
        );
        let c = per_round_ratio(inf, pass, &|x| x.cpu_candidate);
        report.target(
            "identity processor CPU per request / passthrough's",
            "≤ 4×",
            ratio(c),
            Some(c <= 4.0),
        );
        if let Some(li) = at_10 {
            latency_target(
                &mut report,
                "identity at 10 % load: p50 added",
                1.0,
                p50_added(li, inf),
            );
            latency_target(
                &mut report,
                "identity at 10 % load: p99 added",
                5.0,
                p99_added(li, inf),
            );
        }
        if let Some(li) = at_50 {
            latency_target(
                &mut report,
                "identity at 50 % load: p99 added",
                10.0,
                p99_added(li, inf),
            );
        }
        if let Some(p) = peer {
            let e = per_round_ratio(p, inf, &|x| x.cpu_candidate);
            report.target(
                "identity requests per processor CPU-second / peer's (the issue: about 3×)",
                "–",
                ratio(e),
                None,
            );
        }
    }
    if let Some(real) = realistic {
        let r = per_round_ratio(real, pass, &|x| x.rate);
        report.target(
            "realistic throughput / passthrough",
            "≥ 0.50×",
            ratio(r),
            Some(r >= 0.5),
        );
        if let Some(li) = at_10 {
            latency_target(
                &mut report,
                "realistic at 10 % load: p99 added",
                20.0,
                p99_added(li, real),
            );
        }
    }
    if inferflow.is_some() || realistic.is_some() {
        report.line("");
    }
    report.line("<details><summary>Every run</summary>");
    report.line("");
    for (ci, c) in cands.iter().enumerate() {
        let runs: Vec<String> = tp[ci]
            .iter()
            .map(|x| {
                format!(
                    "{:.0}/s ({:.4}, {:.4})",
                    x.rate, x.cpu_candidate, x.cpu_broker
                )
            })
            .collect();
        report.line(format!(
            "- throughput {}: {} (CPU s / 1k req: processor, broker)",
            c.name(),
            runs.join(", ")
        ));
        let caches: Vec<String> = tp[ci]
            .iter()
            .filter_map(|x| x.caches.as_ref().map(CacheCounts::describe))
            .collect();
        if !caches.is_empty() {
            report.line(format!(
                "- throughput {}, whole runs (start-up included): {}",
                c.name(),
                caches.join("; ")
            ));
        }
    }
    for (li, (label, _, _)) in levels.iter().enumerate() {
        for (ci, c) in cands.iter().enumerate() {
            let runs: Vec<String> = lat[li][ci]
                .iter()
                .map(|x| {
                    let mut t = format!("{}/{}/{}", ms(x.p50), ms(x.p99), ms(x.p999));
                    if x.missing > 0 {
                        let _ = write!(t, " ({} missing)", x.missing);
                    }
                    t
                })
                .collect();
            report.line(format!(
                "- latency {label} {}: {} (p50/p99/p99.9 ms)",
                c.name(),
                runs.join(", ")
            ));
        }
    }
    report.line("");
    report.line("</details>");
    if let Some(out) = &s.out {
        if let Some(dir) = out.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(out, &report.text).expect("writing E2E_OUT");
        eprintln!("[e2e] report written to {}", out.display());
    }
}

fn yes(met: bool) -> &'static str {
    if met { "yes" } else { "**no**" }
}

pub(crate) fn ms(x: f64) -> String {
    if x.is_infinite() {
        "∞ (overloaded)".into()
    } else if x.is_nan() {
        "–".into()
    } else if x < 10.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.1}")
    }
}

pub(crate) fn ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}×")
    } else {
        "–".into()
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

pub(crate) fn machine(s: &Settings) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kafka = s
        .broker_pid
        .and_then(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .and_then(|cmdline| {
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let cp = args
                .iter()
                .position(|a| a == "-cp")
                .and_then(|i| args.get(i + 1))?;
            let dir = Path::new(cp.trim_end_matches('*'));
            std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix("kafka_2.13-")
                    .and_then(|v| v.strip_suffix(".jar"))
                    .map(str::to_owned)
            })
        })
        .unwrap_or_else(|| "?".into());
    format!(
        "{cores} cores ({cpu}), Linux {}, single-node Kafka {kafka} on loopback (broker pid {}); load average at the start: {}",
        read_trimmed("/proc/sys/kernel/osrelease"),
        s.broker_pid.map_or("not found".into(), |p| p.to_string()),
        read_trimmed("/proc/loadavg"),
    )
}

struct Report {
    text: String,
}

impl Report {
    fn line(&mut self, line: impl AsRef<str>) {
        println!("{}", line.as_ref());
        self.text.push_str(line.as_ref());
        self.text.push('\n');
    }

    /// A row of the targets table; `met` is `None` for a figure given for reference.
    fn target(&mut self, target: &str, aim: &str, measured: String, met: Option<bool>) {
        let met = met.map_or("–", yes);
        self.line(format!("| {target} | {aim} | {measured} | {met} |"));
    }
}
