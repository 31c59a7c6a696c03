//! `[pipelines]`: where pipeline files live and whether to watch them. Every key is documented
//! in `config/default.toml`.

use serde::{Deserialize, Serialize};

use super::{PipelineDef, load_dir};
use crate::section::{ConfigErrors, Problems, Section};

/// `[pipelines]`: where pipeline files live and whether to watch them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelinesConfig {
    /// Directory of `*.toml` pipeline files (relative to the working directory). Empty (the
    /// default) or a missing directory: no pipeline files, only the built-in `identity`.
    pub dir: String,
    /// Also reload when a pipeline file or the configuration file changes (polled), besides
    /// on SIGHUP.
    pub watch: bool,
    /// How often the watch looks, milliseconds.
    pub watch_interval_ms: u64,
}

impl PipelinesConfig {
    /// The watch interval.
    pub fn watch_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.watch_interval_ms)
    }

    /// Loads the definitions in [`dir`](Self::dir).
    pub fn load(&self) -> Result<Vec<PipelineDef>, ConfigErrors> {
        if self.dir.trim().is_empty() {
            return Ok(Vec::new());
        }
        load_dir(std::path::Path::new(&self.dir)).map_err(ConfigErrors)
    }
}

impl Section for PipelinesConfig {
    fn validate(&self, p: &mut Problems) {
        if self.watch_interval_ms < 100 {
            p.push("pipelines.watch_interval_ms", "must be at least 100");
        }
    }
}
