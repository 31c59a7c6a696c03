//! `inferflow batch`: offline scoring of a JSON Lines file of requests, with no Kafka.
//!
//! Each input line is a request as on the requests topic (`schemas/inference_request.v1.json`);
//! a line without `pipeline` and `model` runs `--pipeline` (or `--model`). Each input line
//! gets exactly one output line, the result document of the stream without `source`, in input
//! order: an unreadable line gets an error result (`invalid_json`, `invalid_request`) under its
//! `request_id`, or `line-N` when no id can be read. `reply_to` and `deadline_ms` are ignored:
//! there is no topic to reply to, and offline scoring of old requests would find every
//! deadline passed.
//!
//! Resuming: the output file is read first and every request id in it is skipped, so running
//! the same command again after a crash finishes the work without repeating it. A crash can
//! leave the last output line cut short (it has no final newline); that fragment is removed
//! before appending and its request is scored again. Any other line of the output that is not
//! a result stops the run before anything is written, since appending to a file that is not
//! ours could destroy data.
//!
//! Features come from the embedded (redb) store at `feature_store.path` by default, the same
//! file `inferflow features` uses with `feature_store.backend = "embedded"`;
//! `--feature-store configured` uses the configured backend instead. The store is opened only
//! when a pipeline has a features step.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Read, Seek, SeekFrom, Write};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use inferflow::config::{Config, FeatureStoreBackend};
use inferflow::decode::{DecodeRules, Decoded, decode};
use inferflow::executor::{ExecRequest, Executor};
use inferflow::feature_store::FeatureStore;
use inferflow::model::{ErrorBody, ErrorKind, InferenceResult, Status, Target};
use inferflow::pipeline::{IDENTITY, PipelineDef, PipelineExecutor, PipelineManager, StepDef};
use inferflow::processor::result_document;
use serde_json::Value;

/// `inferflow batch`.
#[derive(Debug, Args)]
pub(crate) struct BatchArgs {
    /// TOML file layered over the built-in defaults; INFERFLOW__SECTION__KEY environment
    /// variables override both.
    #[arg(long, short, env = "INFERFLOW_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Pipeline for lines that name neither a pipeline nor a model.
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pipeline: Option<String>,
    /// Model (`name` or `name@version`) for lines that name neither a pipeline nor a model.
    #[arg(long)]
    model: Option<String>,
    /// Requests, one JSON document per line.
    #[arg(long)]
    input: PathBuf,
    /// Results are appended here, one per input line; request ids already in it are skipped.
    #[arg(long)]
    output: PathBuf,
    /// Batches running at once.
    #[arg(long, default_value = "4")]
    concurrency: NonZeroUsize,
    /// Requests per batch (one batched model call per model step).
    #[arg(long, default_value = "64")]
    batch_size: NonZeroUsize,
    /// Which feature store pipelines with a features step read.
    #[arg(long, value_enum, default_value_t = StoreChoice::Embedded)]
    feature_store: StoreChoice,
}

/// `--feature-store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreChoice {
    /// The embedded redb file at `feature_store.path`, whatever `feature_store.backend` says.
    Embedded,
    /// The configured `feature_store.backend` (e.g. ScyllaDB).
    Configured,
}

/// Counts for the summary.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    ok: u64,
    error: u64,
    /// Already in the output (an earlier run), or a repeated id in the input.
    skipped: u64,
    /// Blank input lines, which are not requests.
    blank: u64,
}

/// Runs `inferflow batch` and returns the process's exit code: 0 when every line has a
/// result (error results included), 1 on a setup or I/O error.
pub(crate) fn run(config: Config, args: BatchArgs) -> ExitCode {
    let result = tokio::runtime::Runtime::new()
        .context("starting the Tokio runtime")
        .and_then(|runtime| runtime.block_on(execute(config, args)));
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(mut config: Config, args: BatchArgs) -> anyhow::Result<Counts> {
    if args.feature_store == StoreChoice::Embedded {
        config.feature_store.backend = FeatureStoreBackend::Embedded;
    }
    let default_target = match (&args.pipeline, &args.model) {
        (Some(p), _) => Target::Pipeline(p.clone()),
        (None, Some(m)) => Target::Model(m.clone()),
        // clap requires one of them.
        (None, None) => bail!("name a --pipeline or a --model"),
    };
    let executor = build_executor(&config).await?;
    check_target(executor.pipelines(), &default_target, &config)?;

    let mut done = read_done(&args.output)?;
    let total = count_lines(&args.input)?;
    let input = File::open(&args.input)
        .with_context(|| format!("opening the input {}", args.input.display()))?;
    let output = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.output)
        .with_context(|| format!("opening the output {}", args.output.display()))?;
    let mut output = BufWriter::new(output);

    let progress = progress_bar(total);
    let rules = DecodeRules {
        max_request_bytes: config.executor.max_request_bytes.get(),
        reply_to_allowed: HashSet::new(),
    };
    let (mut ok, mut error, mut skipped, mut blank) = (0, 0, 0, 0);
    let mut lines = Lines::new(BufReader::new(input));
    let mut read_error = None;
    // Batches of work, read lazily so that memory stays bounded by concurrency × batch size.
    let batches = std::iter::from_fn(|| {
        let mut batch = Vec::with_capacity(args.batch_size.get());
        while batch.len() < args.batch_size.get() {
            let (number, bytes) = match lines.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(err) => {
                    read_error = Some(err);
                    break;
                }
            };
            if bytes.iter().all(u8::is_ascii_whitespace) {
                blank += 1;
                progress.inc(1);
                continue;
            }
            let work = prepare(number, &bytes, &default_target, &rules);
            if !done.insert(work.request_id().to_owned()) {
                skipped += 1;
                progress.inc(1);
                continue;
            }
            batch.push(work);
        }
        (!batch.is_empty()).then_some(batch)
    });
    // Each batch is a task of its own, so CPU-bound steps use every core; `buffered` hands
    // the batches back in input order.
    let mut results = futures::stream::iter(batches)
        .map(|batch| {
            let ids: Vec<String> = batch.iter().map(|w| w.request_id().to_owned()).collect();
            let executor = executor.clone();
            let task = tokio::spawn(async move { score(&executor, batch).await });
            async move {
                task.await.unwrap_or_else(|err| {
                    let error =
                        ErrorBody::new(ErrorKind::Internal, format!("scoring failed: {err}"));
                    ids.iter()
                        .map(|id| {
                            result_document(id, None, Err(error.clone()), None, Duration::ZERO)
                        })
                        .collect()
                })
            }
        })
        .buffered(args.concurrency.get());
    while let Some(batch) = results.next().await {
        for result in batch {
            match result.status {
                Status::Ok => ok += 1,
                Status::Error => error += 1,
            }
            serde_json::to_writer(&mut output, &result).context("serialising a result")?;
            output.write_all(b"\n").context("writing the output")?;
            progress.inc(1);
        }
        // A whole batch reaches the file before the next one is awaited, so a crash loses at
        // most the batches in flight (and perhaps cuts the last line, repaired on resume).
        output.flush().context("writing the output")?;
    }
    drop(results);
    progress.finish_and_clear();
    let counts = Counts {
        ok,
        error,
        skipped,
        blank,
    };
    if let Some(err) = read_error {
        return Err(err).with_context(|| format!("reading the input {}", args.input.display()));
    }
    output
        .into_inner()
        .map_err(|e| e.into_error())
        .and_then(|file| file.sync_all())
        .context("writing the output")?;
    let elapsed = progress.elapsed().as_secs_f64();
    let scored = counts.ok + counts.error;
    eprintln!(
        "{} lines: {} ok, {} error, {} skipped (already in the output or repeated ids){}; {} scored in {:.1} s ({:.0}/s) -> {}",
        total,
        counts.ok,
        counts.error,
        counts.skipped,
        if counts.blank > 0 {
            format!(", {} blank", counts.blank)
        } else {
            String::new()
        },
        scored,
        elapsed,
        if elapsed > 0.0 {
            scored as f64 / elapsed
        } else {
            0.0
        },
        args.output.display()
    );
    Ok(counts)
}

/// Models from `[providers]`/`[models]` with the `[routes]`, pipelines from `pipelines.dir`, and the feature store
/// when a pipeline needs one.
async fn build_executor(config: &Config) -> anyhow::Result<PipelineExecutor> {
    let models = inferflow::providers::build::build_manager(
        &config.providers,
        &config.models,
        &config.result_cache,
    )
    .await
    .context("starting the models of [providers] and [models]")?;
    let models = inferflow::providers::build::with_routes(&models, &config.routes)?;
    let defs = config.pipelines.load().map_err(|errs| {
        anyhow::anyhow!("loading pipelines from {}: {errs}", config.pipelines.dir)
    })?;
    let mut pipelines = PipelineManager::new(models);
    if defs.iter().any(uses_features) {
        let store = FeatureStore::open(&config.feature_store)
            .await
            .with_context(|| match config.feature_store.backend {
                FeatureStoreBackend::Embedded => format!(
                    "opening the embedded feature store {} (needed by pipelines with a features step)",
                    config.feature_store.path.display()
                ),
                _ => "opening the configured feature store (needed by pipelines with a features step)"
                    .to_owned(),
            })?;
        pipelines = pipelines.with_feature_store(Arc::new(store));
    }
    pipelines
        .replace_all(None, defs)
        .map_err(|errs| anyhow::anyhow!("pipelines in {}: {errs}", config.pipelines.dir))?;
    Ok(PipelineExecutor::new(Arc::new(pipelines)))
}

fn uses_features(def: &PipelineDef) -> bool {
    fn step(s: &StepDef) -> bool {
        s.step_type == inferflow::pipeline::StepType::Features
            || s.step.as_deref().is_some_and(step)
    }
    def.steps.iter().any(step)
}

/// Fails before anything is read or written when the default target does not exist.
fn check_target(
    pipelines: &PipelineManager,
    target: &Target,
    config: &Config,
) -> anyhow::Result<()> {
    match target {
        Target::Pipeline(id) => {
            let ids = pipelines.pipeline_ids();
            if !ids.contains(id) && id != IDENTITY {
                let dir = if config.pipelines.dir.is_empty() {
                    "no pipelines.dir is configured".to_owned()
                } else {
                    format!("pipelines in {}: {}", config.pipelines.dir, ids.join(", "))
                };
                bail!("no pipeline `{id}` ({dir}; built in: {IDENTITY})");
            }
        }
        Target::Model(id) => {
            let models = pipelines.models();
            if !matches!(id.as_str(), "echo" | "echo@1")
                && let Err(e) = models.resolve(id)
            {
                bail!("{}", e.message);
            }
        }
    }
    Ok(())
}

/// One input line, ready to score or already answered.
enum Work {
    Run {
        request: ExecRequest,
        target: Target,
    },
    Answered(Box<InferenceResult>),
}

impl Work {
    fn request_id(&self) -> &str {
        match self {
            Work::Run { request, .. } => &request.request_id,
            Work::Answered(result) => &result.request_id,
        }
    }
}

/// Decodes input line `number` (from 1) with the stream's rules, after filling in the default
/// target and dropping the keys that mean nothing offline.
fn prepare(number: u64, bytes: &[u8], default: &Target, rules: &DecodeRules) -> Work {
    let line_id = || format!("line-{number}");
    let rejected = |request_id: String, target: Option<Target>, error: ErrorBody| {
        Work::Answered(Box::new(result_document(
            &request_id,
            target.as_ref(),
            Err(error),
            None,
            Duration::ZERO,
        )))
    };
    let bytes = match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(mut object)) => {
            if !object.contains_key("pipeline") && !object.contains_key("model") {
                let (key, id) = match default {
                    Target::Pipeline(id) => ("pipeline", id),
                    Target::Model(id) => ("model", id),
                };
                object.insert(key.to_owned(), Value::String(id.clone()));
            }
            object.remove("reply_to");
            object.remove("deadline_ms");
            match serde_json::to_vec(&Value::Object(object)) {
                Ok(b) => b,
                Err(e) => {
                    return rejected(
                        line_id(),
                        None,
                        ErrorBody::new(ErrorKind::Internal, e.to_string()),
                    );
                }
            }
        }
        // Not an object, or not JSON: decode reports it as the stream would.
        _ => bytes.to_vec(),
    };
    match decode(Some(&bytes), rules, 0) {
        Decoded::Request { request, target } => Work::Run {
            request: ExecRequest {
                request_id: request.request_id,
                data: request.data,
                parameters: request.parameters,
                entity: request.entity,
                tenant: request.tenant,
            },
            target,
        },
        Decoded::Reject {
            request_id,
            target,
            error,
        } => rejected(request_id, target, error),
        Decoded::DeadLetter(error) => rejected(line_id(), None, error),
    }
}

/// Scores one batch: the requests of each target together (admitted first, as the stream
/// does), and returns one result per line, in order.
async fn score(executor: &PipelineExecutor, batch: Vec<Work>) -> Vec<InferenceResult> {
    let started = Instant::now();
    let mut results: Vec<Option<InferenceResult>> = Vec::with_capacity(batch.len());
    let mut groups: HashMap<Target, Vec<(usize, ExecRequest)>> = HashMap::new();
    for (i, work) in batch.into_iter().enumerate() {
        match work {
            Work::Answered(result) => results.push(Some(*result)),
            Work::Run { request, target } => {
                results.push(None);
                groups.entry(target).or_default().push((i, request));
            }
        }
    }
    let runs = groups.into_iter().map(|(target, requests)| async move {
        let (slots, requests): (Vec<usize>, Vec<ExecRequest>) = requests.into_iter().unzip();
        let ids: Vec<String> = requests.iter().map(|r| r.request_id.clone()).collect();
        executor.admit(&target, requests.len()).await;
        let mut outcomes = executor.execute(&target, requests).await.into_iter();
        let latency = started.elapsed();
        slots
            .into_iter()
            .zip(ids)
            .map(|(slot, id)| {
                let outcome = outcomes.next().unwrap_or_else(|| {
                    Err(ErrorBody::new(
                        ErrorKind::Internal,
                        "the executor returned fewer outcomes than requests",
                    ))
                });
                (
                    slot,
                    result_document(&id, Some(&target), outcome, None, latency),
                )
            })
            .collect::<Vec<_>>()
    });
    for (slot, result) in futures::future::join_all(runs).await.into_iter().flatten() {
        results[slot] = Some(result);
    }
    results.into_iter().flatten().collect()
}

/// Request ids already in the output file. A last line without its newline (a write cut short
/// by a crash) is truncated away; any other line that is not a result is an error.
fn read_done(path: &Path) -> anyhow::Result<HashSet<String>> {
    let mut done = HashSet::new();
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(e).with_context(|| format!("opening the output {}", path.display())),
    };
    let mut text = Vec::new();
    file.read_to_end(&mut text)
        .with_context(|| format!("reading the output {}", path.display()))?;
    // Everything up to the last newline is complete lines; anything after it is a fragment.
    let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    #[derive(serde::Deserialize)]
    struct Head {
        request_id: String,
    }
    for (n, line) in text[..complete].split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Head>(line) {
            Ok(head) => {
                done.insert(head.request_id);
            }
            Err(e) => bail!(
                "the output {} has a line that is not a result (line {}: {e}); not appending to it",
                path.display(),
                n + 1
            ),
        }
    }
    if complete < text.len() {
        eprintln!(
            "note: removing an incomplete last line ({} bytes) from {}, left by an interrupted run; its request is scored again",
            text.len() - complete,
            path.display()
        );
        file.set_len(complete as u64)
            .and_then(|()| file.seek(SeekFrom::End(0)).map(|_| ()))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("truncating the output {}", path.display()))?;
    }
    Ok(done)
}

/// Lines in the input, for the progress bar's length and ETA.
fn count_lines(path: &Path) -> anyhow::Result<u64> {
    let mut reader = BufReader::new(
        File::open(path).with_context(|| format!("opening the input {}", path.display()))?,
    );
    let mut lines = 0;
    let mut last = b'\n';
    loop {
        let buf = reader
            .fill_buf()
            .with_context(|| format!("reading the input {}", path.display()))?;
        if buf.is_empty() {
            break;
        }
        lines += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        last = buf[buf.len() - 1];
        let n = buf.len();
        reader.consume(n);
    }
    Ok(lines + u64::from(last != b'\n'))
}

/// Input lines as bytes (so a line that is not UTF-8 becomes an `invalid_json` result rather
/// than a read error), numbered from 1.
struct Lines<R> {
    reader: R,
    number: u64,
}

impl<R: BufRead> Lines<R> {
    fn new(reader: R) -> Self {
        Lines { reader, number: 0 }
    }

    fn next_line(&mut self) -> std::io::Result<Option<(u64, Vec<u8>)>> {
        let mut line = Vec::new();
        if self.reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        self.number += 1;
        Ok(Some((self.number, line)))
    }
}

/// The bar on stderr (count, rate, ETA), hidden when stderr is not a terminal.
fn progress_bar(total: u64) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {pos}/{len} lines  {rate}  elapsed {elapsed}  ETA {eta}",
    ) {
        bar.set_style(style.with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", state.per_sec());
            },
        ));
    }
    bar
}
