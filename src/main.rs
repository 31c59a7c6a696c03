//! The `inferflow` command: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use inferflow::config::{Config, Sources};

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
    /// Load and validate the configuration; print the effective configuration (secrets
    /// redacted), or every problem found and exit with code 2.
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
            let config = match Config::load(&Sources::standard(config)) {
                Ok(config) => config,
                Err(errors) => {
                    eprint!("{errors}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            inferflow::telemetry::init_logging(&config.log);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(err) => {
                    eprintln!("cannot start the Tokio runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(inferflow::app::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(error = format!("{err:#}"), "inferflow stopped on an error");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config } => match Config::load(&Sources::standard(config)) {
            Ok(config) => {
                print!("{}", config.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprint!("{errors}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
    }
}
