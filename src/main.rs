//! The `inferflow` command: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use inferflow::config::{Config, Sources};

/// mimalloc instead of the system allocator: the request path allocates per record, and glibc
/// malloc cost about a third of the CPU per request (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cli {
    //! Subcommands big enough for a file of their own.
    pub(crate) mod batch;
    pub(crate) mod features;
}

/// Machine-learning inference on Kafka event streams.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service until SIGINT or SIGTERM.
    Run {
        /// TOML file layered over the built-in defaults; INFERFLOW__SECTION__KEY environment
        /// variables override both.
        #[arg(long, short, env = "INFERFLOW_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Produce requests and print their results (one JSON document per line), waiting for each
    /// on the results topic. Either name a pipeline or model with --data, or give --file.
    Request {
        /// TOML file layered over the built-in defaults.
        #[arg(long, short, env = "INFERFLOW_CONFIG")]
        config: Option<PathBuf>,
        /// Pipeline to run.
        #[arg(long, conflicts_with_all = ["model", "file"])]
        pipeline: Option<String>,
        /// Model to call (`name` or `name@version`).
        #[arg(long, conflicts_with = "file")]
        model: Option<String>,
        /// The input, as JSON.
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        data: Option<String>,
        /// Parameters, as a JSON object.
        #[arg(long)]
        parameters: Option<String>,
        /// A file of requests, one JSON document per line (e.g. examples/requests.jsonl).
        #[arg(long)]
        file: Option<PathBuf>,
        /// How long to wait for the results.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// Read and write the feature store (the configured backend) as JSON: put, get, vector,
    /// group create, group get. A missing feature or group exits with code 3.
    Features(cli::features::FeaturesArgs),
    /// Score a JSON Lines file of requests offline (no Kafka) into a JSON Lines file of
    /// results, one per line, in order; resumable (request ids already in the output are
    /// skipped). Features come from the embedded store at `feature_store.path`.
    Batch(cli::batch::BatchArgs),
    /// Load and validate the configuration and the pipelines in `pipelines.dir`; print the
    /// effective configuration (secrets redacted), or every problem found and exit with code 2.
    CheckConfig {
        /// TOML file layered over the built-in defaults; INFERFLOW__SECTION__KEY environment
        /// variables override both.
        #[arg(long, short, env = "INFERFLOW_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// Exit code for an invalid configuration.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            let sources = Sources::standard(config.clone());
            let config = match load_config(config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            inferflow::telemetry::init_logging(&config.log);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(err) => {
                    eprintln!("cannot start the Tokio runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(inferflow::app::run(config, sources)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(error = format!("{err:#}"), "inferflow stopped on an error");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Request {
            config,
            pipeline,
            model,
            data,
            parameters,
            file,
            timeout_secs,
        } => {
            let config = match load_config(config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            match request(
                config,
                pipeline,
                model,
                data,
                parameters,
                file,
                timeout_secs,
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Features(args) => match load_config(args.config.clone()) {
            Ok(config) => cli::features::run(&config, args),
            Err(code) => code,
        },
        Command::Batch(args) => match load_config(args.config.clone()) {
            Ok(config) => cli::batch::run(config, args),
            Err(code) => code,
        },
        Command::CheckConfig { config } => match load_config(config) {
            Ok(config) => {
                // Pipelines are checked against the configured models (not loaded) and
                // reported the same way as configuration problems.
                let problems = match config.pipelines.load() {
                    Ok(defs) => {
                        let problems =
                            inferflow::pipeline::check_against_config(&config.models, &defs);
                        if problems.is_empty() {
                            let ids: Vec<&str> = defs.iter().map(|d| d.id.as_str()).collect();
                            eprintln!(
                                "{} pipeline(s) in {}: {}",
                                ids.len(),
                                config.pipelines.dir,
                                ids.join(", ")
                            );
                        }
                        problems
                    }
                    Err(errs) => errs.0,
                };
                if !problems.is_empty() {
                    eprint!("{}", inferflow::config::ConfigErrors(problems));
                    return ExitCode::from(EXIT_CONFIG);
                }
                for warning in config.http.warnings() {
                    eprintln!("warning: {warning}");
                }
                print!("{}", config.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}

/// Loads the configuration, or prints every problem and returns exit code 2.
fn load_config(file: Option<PathBuf>) -> Result<Config, ExitCode> {
    Config::load(&Sources::standard(file)).map_err(|errors| {
        eprint!("{errors}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn request(
    config: Config,
    pipeline: Option<String>,
    model: Option<String>,
    data: Option<String>,
    parameters: Option<String>,
    file: Option<PathBuf>,
    timeout_secs: u64,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use inferflow::client;
    let requests = match file {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            client::read_jsonl(&text)?
        }
        None => {
            if pipeline.is_none() && model.is_none() {
                anyhow::bail!("name a --pipeline or a --model");
            }
            let data = data.unwrap_or_default();
            vec![client::build_request(
                pipeline,
                model,
                &data,
                parameters.as_deref(),
            )?]
        }
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the Tokio runtime")?;
    let results = runtime.block_on(client::request_and_wait(
        &config,
        &requests,
        std::time::Duration::from_secs(timeout_secs),
    ))?;
    for result in results {
        println!("{}", serde_json::to_string(&result)?);
    }
    Ok(())
}
