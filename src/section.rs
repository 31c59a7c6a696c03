//! What a configuration section is, shared by `config/` and the components that own sections.
//!
//! Each component defines the types of its own tables (`kafka::KafkaConfig` for `[kafka]`,
//! `feature_store::FeatureStoreConfig` for `[feature_store]`...) and implements `Section` for
//! them: the checks the types cannot express, each problem pushed with its key path into
//! `Problems`. `config/` parses every table, runs these checks and the checks across sections,
//! and reports all problems at once as [`ConfigErrors`].
//!
//! This module imports nothing from the crate, so every layer can use it.

use std::fmt;

use serde::de::DeserializeOwned;

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path, e.g. `kafka.bootstrap_servers`.
    pub path: String,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found while loading a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

/// Collects problems during validation.
#[derive(Debug, Default)]
pub(crate) struct Problems(pub(crate) Vec<ConfigError>);

impl Problems {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// A top-level table of the configuration.
pub(crate) trait Section: DeserializeOwned {
    /// Checks what the types cannot express, pushing every problem with its key path.
    fn validate(&self, _problems: &mut Problems) {}
}

/// Checks a `host:port` pair: a non-empty host and a port number.
pub(crate) fn check_host_port(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("expected host:port".to_owned());
    };
    if host.is_empty() {
        return Err("the host is empty".to_owned());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{port}` is not a port number")),
    }
}

/// Section `name` of the embedded defaults (`config/default.toml`) with `toml` layered over
/// them, unchecked: for the unit tests of the components that own sections, which cannot use
/// `config::Config` (it sits above them).
#[cfg(test)]
pub(crate) fn defaults_with<T: DeserializeOwned>(name: &str, toml: &str) -> T {
    use figment::providers::{Format, Toml};
    figment::Figment::from(Toml::string(include_str!("../config/default.toml")))
        .merge(Toml::string(toml))
        .extract_inner(name)
        .expect("the section parses")
}
