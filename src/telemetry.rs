//! Logging set-up: `tracing` with a filter from configuration (or `RUST_LOG`), as text or JSON.

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

use crate::section::{Problems, Section};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`. Logs go to
/// stderr so that stdout stays free for command output such as `check-config`.
pub fn init_logging(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests, embedding) keeps the first subscriber.
    let _ = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// `[log]`: logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogConfig {
    /// tracing-subscriber filter directive.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Section for LogConfig {
    fn validate(&self, p: &mut Problems) {
        if let Err(err) = EnvFilter::try_new(&self.level) {
            p.push(
                "log.level",
                format!("`{}` is not a valid filter: {err}", self.level),
            );
        }
    }
}
