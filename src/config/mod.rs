//! Configuration: layered loading, strict parsing, and one validation pass that reports every
//! problem with its key path.
//!
//! # Precedence
//!
//! Lowest to highest, implemented by [`figment()`] and nowhere else:
//!
//! 1. `config/default.toml`, embedded in the binary ([`DEFAULT_TOML`]);
//! 2. the user's file, if one is named (`--config FILE`);
//! 3. environment variables `INFERFLOW__<SECTION>__<KEY>` (`__` separates the levels), e.g.
//!    `INFERFLOW__KAFKA__BOOTSTRAP_SERVERS=broker:9092`.
//!
//! Environment values are parsed like TOML values (`5` is a number, `true` a boolean), except
//! the secrets in [`SECRET_KEYS`], which are always taken as the exact string: a password such
//! as `0042` stays `0042`.
//!
//! # Errors
//!
//! Unknown keys, wrong types and invalid values are all errors. [`Config::load`] does not stop at
//! the first one: each section is parsed on its own, unknown keys are collected rather than
//! rejected one at a time, and the semantic checks run on whatever parsed. The result is a
//! [`ConfigErrors`] listing every problem, each with its key path and where the value came from.
//!
//! # Where the sections are defined
//!
//! Each component defines the tables it reads, with their own checks: `[kafka]` and `[topics]`
//! in [`crate::kafka`], `[feature_store]` and `[ingest]` in [`crate::feature_store`],
//! `[replay]` in [`crate::replay`], `[providers]`, `[models]`, `[routes]` and `[result_cache]` in
//! [`crate::providers`], `[pipelines]` in [`crate::pipeline`], `[batch]` in
//! [`crate::batching`], `[executor]` in [`crate::executor`], `[log]` in [`crate::telemetry`],
//! `[http]` in [`crate::access`], `[tracing]` in [`crate::tracing_otel`].
//! This module aggregates them into [`Config`] (re-exporting them here too), and defines only
//! the table no component reads (`[processing]`) and the checks across tables. It
//! depends on the components; they never depend on it.

mod sections;

use std::collections::BTreeSet;
use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use figment::value::Value;
use serde_path_to_error::Segment;

pub use crate::access::{HttpConfig, Scope, TlsConfig, TokenConfig};
pub use sections::{Config, Guarantee, ProcessingConfig};
// The sections the components own, and the leaf types, where library users have found them.
pub use crate::batching::BatchConfig;
pub use crate::executor::{ExecutorConfig, KeyOrdering};
pub use crate::feature_store::{
    Consistency, FeatureStoreBackend, FeatureStoreConfig, IngestConfig, SqlConfig,
};
pub use crate::kafka::{
    KafkaConfig, OffsetReset, RESERVED_KAFKA_PROPERTIES, SaslMechanism, SecurityProtocol,
    TopicsConfig, check_topic_name,
};
pub use crate::pipeline::PipelinesConfig;
pub use crate::providers::{
    ModelSection, ModelsConfig, MonitorSection, ProviderSection, ProvidersConfig, RouteSection,
    RoutesConfig, ShadowSection,
};
pub use crate::replay::{ReplayConfig, ReplayStoreKind};
pub use crate::secret::{REDACTED, Secret, SecretUrl};
pub use crate::section::{ConfigError, ConfigErrors};
pub use crate::telemetry::{LogConfig, LogFormat};
pub use crate::tracing_otel::TracingConfig;

use crate::providers::cache::ResultCacheConfig;
use crate::providers::{check_models_against_providers, check_routes_against_models};
use crate::section::{Problems, Section};

/// The defaults, embedded at build time.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "INFERFLOW__";

/// Keys holding a [`Secret`], whose environment overrides are read as exact strings.
pub const SECRET_KEYS: &[&str] = &[
    "kafka.sasl_password",
    "feature_store.password",
    "feature_store.postgres.url",
    "feature_store.mysql.url",
];

/// The environment overrides of [`SECRET_KEYS`], as strings, never parsed as TOML values
/// (figment's `Env` would turn `12345` into a number, `0042` into 42, `true` into a boolean).
struct SecretEnv;

impl SecretEnv {
    fn var_name(key: &str) -> String {
        format!(
            "{ENV_PREFIX}{}",
            key.replace('.', "__").to_ascii_uppercase()
        )
    }
}

/// Puts `value` at `path` in `dict`: `["a", "b", "c"]` is the key `c` of the table `a.b`, made
/// if missing.
fn insert_at(dict: &mut figment::value::Dict, path: &[&str], value: Value) {
    match path {
        [] => {}
        [name] => {
            dict.insert((*name).to_owned(), value);
        }
        [table, rest @ ..] => {
            let entry = dict
                .entry((*table).to_owned())
                .or_insert_with(|| Value::from(figment::value::Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_at(inner, rest, value);
            }
        }
    }
}

impl figment::Provider for SecretEnv {
    fn metadata(&self) -> figment::Metadata {
        // The same name as the `Env` layer, so problems say where the value came from.
        figment::Metadata::named(format!("`{ENV_PREFIX}` environment variable(s)"))
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let mut dict = figment::value::Dict::new();
        for key in SECRET_KEYS {
            // Not UTF-8: left out here, so the variable is simply absent (and a required
            // password is reported missing).
            let Ok(value) = std::env::var(Self::var_name(key)) else {
                continue;
            };
            let path: Vec<&str> = key.split('.').collect();
            insert_at(&mut dict, &path, Value::from(value));
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

/// The top-level tables, in the order they are printed.
const SECTIONS: &[&str] = &[
    "kafka",
    "topics",
    "batch",
    "executor",
    "feature_store",
    "ingest",
    "processing",
    "replay",
    "providers",
    "models",
    "routes",
    "result_cache",
    "pipelines",
    "http",
    "log",
    "tracing",
];

/// Where the configuration comes from, besides the embedded defaults.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// A TOML file layered over the defaults.
    pub file: Option<PathBuf>,
    /// Read `INFERFLOW__*` environment variables (on by default in the binary; tests turn it off).
    pub env: bool,
}

impl Sources {
    /// Defaults, the optional file, and the process environment: what the binary uses.
    pub fn standard(file: Option<PathBuf>) -> Self {
        Sources { file, env: true }
    }
}

/// Builds the layered figment. This is the one place the precedence is implemented.
pub fn figment(sources: &Sources) -> Figment {
    let mut fig = Figment::from(Toml::string(DEFAULT_TOML));
    if let Some(file) = &sources.file {
        fig = fig.merge(Toml::file_exact(file));
    }
    if sources.env {
        fig = fig
            .merge(
                Env::prefixed(ENV_PREFIX)
                    .split("__")
                    .filter(|key| !SECRET_KEYS.iter().any(|s| key.as_str() == *s)),
            )
            .merge(SecretEnv);
    }
    fig
}

impl Config {
    /// Loads, parses and validates the configuration, reporting every problem at once.
    pub fn load(sources: &Sources) -> Result<Config, ConfigErrors> {
        let mut problems = Problems::default();
        if let Some(file) = &sources.file
            && !file.is_file()
        {
            problems.push("--config", format!("{}: no such file", file.display()));
            return Err(ConfigErrors(problems.0));
        }
        let fig = figment(sources);
        Self::from_figment(&fig, &mut problems)
            .filter(|_| problems.0.is_empty())
            .ok_or(ConfigErrors(problems.0))
    }

    /// Loads a configuration from TOML text layered over the defaults, without the environment.
    /// Meant for tests and for embedding inferflow as a library.
    pub fn from_toml_str(toml: &str) -> Result<Config, ConfigErrors> {
        let fig = figment(&Sources::default()).merge(Toml::string(toml));
        let mut problems = Problems::default();
        Self::from_figment(&fig, &mut problems)
            .filter(|_| problems.0.is_empty())
            .ok_or(ConfigErrors(problems.0))
    }

    fn from_figment(fig: &Figment, problems: &mut Problems) -> Option<Config> {
        // Unknown top-level keys (and syntax errors in any layer) show up here.
        match fig.extract::<figment::value::Dict>() {
            Ok(root) => {
                for key in root.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
                    problems.push(
                        key.clone(),
                        format!(
                            "unknown section{}; known sections are {}",
                            source_suffix(fig, key),
                            SECTIONS.join(", ")
                        ),
                    );
                }
            }
            Err(err) => {
                for e in err {
                    problems.push(
                        e.path.join("."),
                        without_quoted_source(&e.kind.to_string()) + &origin(&e),
                    );
                }
                return None;
            }
        }
        let kafka = section::<KafkaConfig>(fig, "kafka", problems);
        let topics = section::<TopicsConfig>(fig, "topics", problems);
        let batch = section::<BatchConfig>(fig, "batch", problems);
        let executor = section::<ExecutorConfig>(fig, "executor", problems);
        let feature_store = section::<FeatureStoreConfig>(fig, "feature_store", problems);
        let ingest = section::<IngestConfig>(fig, "ingest", problems);
        let processing = section::<ProcessingConfig>(fig, "processing", problems);
        let replay = section::<ReplayConfig>(fig, "replay", problems);
        let providers = section::<ProvidersConfig>(fig, "providers", problems);
        let models = section::<ModelsConfig>(fig, "models", problems);
        let routes = section::<RoutesConfig>(fig, "routes", problems);
        let result_cache = section::<ResultCacheConfig>(fig, "result_cache", problems);
        let pipelines = section::<PipelinesConfig>(fig, "pipelines", problems);
        let http = section::<HttpConfig>(fig, "http", problems);
        let log = section::<LogConfig>(fig, "log", problems);
        let tracing = section::<TracingConfig>(fig, "tracing", problems);
        let config = Config {
            kafka: kafka?,
            topics: topics?,
            batch: batch?,
            executor: executor?,
            feature_store: feature_store?,
            ingest: ingest?,
            processing: processing?,
            replay: replay?,
            providers: providers?,
            models: models?,
            routes: routes?,
            result_cache: result_cache?,
            pipelines: pipelines?,
            http: http?,
            log: log?,
            tracing: tracing?,
        };
        config.validate_across_sections(problems);
        check_models_against_providers(&config.models, &config.providers, problems);
        check_routes_against_models(&config.routes, &config.models, problems);
        Some(config)
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(self)
            .unwrap_or_else(|e| format!("# could not print the configuration: {e}\n"))
    }
}

/// Parses one section, collecting unknown keys and type errors with their paths.
///
/// serde stops at the first error, so after each error the offending key is put back to its
/// default (or removed when it has none) and the section is parsed again, until it parses or
/// nothing more can be repaired. Every problem is recorded on the way; the repaired value is
/// never used.
fn section<T: Section>(fig: &Figment, name: &str, problems: &mut Problems) -> Option<T> {
    let Ok(mut value) = fig.find_value(name) else {
        problems.push(name, "missing section");
        return None;
    };
    let defaults = Figment::from(Toml::string(DEFAULT_TOML));
    let mut reported_unknown = BTreeSet::new();
    let mut failed = false;
    // Each round repairs one key, so the number of keys bounds the rounds.
    for _ in 0..=count_leaves(&value) {
        let mut unknown = Vec::new();
        let mut on_unknown = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let parsed: Result<T, _> = serde_path_to_error::deserialize(
            serde_ignored::Deserializer::new(&value, &mut on_unknown),
        );
        for path in unknown {
            if reported_unknown.insert(path.clone()) {
                let full = format!("{name}.{path}");
                let suffix = source_suffix(fig, &full);
                problems.push(full, format!("unknown key{suffix}"));
            }
        }
        let err = match parsed {
            Ok(v) if !failed => {
                v.validate(problems);
                return Some(v);
            }
            Ok(_) => return None,
            Err(err) => err,
        };
        failed = true;
        let mut keys = Vec::new();
        let mut display = name.to_owned();
        for segment in err.path().iter() {
            match segment {
                Segment::Map { key } => {
                    keys.push(key.clone());
                    display = format!("{display}.{key}");
                }
                Segment::Seq { index } => display = format!("{display}[{index}]"),
                _ => {}
            }
        }
        let suffix = source_suffix(fig, &display);
        problems.push(
            display,
            format!("{}{suffix}", err.inner().kind).replace("``", "`"),
        );
        if keys.is_empty() {
            return None;
        }
        let default = defaults
            .find_value(&format!("{name}.{}", keys.join(".")))
            .ok();
        if !replace_at(&mut value, &keys, default) {
            return None;
        }
    }
    None
}

/// Sets (or with `None`, removes) the value at `keys` inside nested tables. False when the path
/// does not lead through tables.
fn replace_at(value: &mut Value, keys: &[String], replacement: Option<Value>) -> bool {
    let Some((last, parents)) = keys.split_last() else {
        return false;
    };
    let mut current = value;
    for key in parents {
        match current {
            Value::Dict(_, dict) => match dict.get_mut(key) {
                Some(next) => current = next,
                None => return false,
            },
            _ => return false,
        }
    }
    let Value::Dict(_, dict) = current else {
        return false;
    };
    match replacement {
        Some(v) => dict.insert(last.clone(), v),
        None => dict.remove(last),
    };
    true
}

/// The number of values in a tree of tables and arrays.
fn count_leaves(value: &Value) -> usize {
    match value {
        Value::Dict(_, dict) => dict.values().map(count_leaves).sum::<usize>() + 1,
        Value::Array(_, items) => items.iter().map(count_leaves).sum::<usize>() + 1,
        _ => 1,
    }
}

/// " (set by <source>)" for a key, when figment knows where it came from.
fn source_suffix(fig: &Figment, path: &str) -> String {
    fig.find_metadata(path)
        .map(|md| match &md.source {
            Some(src) => format!(" (set in {src})"),
            None => format!(" (set by {})", md.name),
        })
        .unwrap_or_default()
}

/// A TOML syntax error without the excerpt of the file the parser quotes (`2 | key = value`
/// and the caret line under it), on one line. The excerpt could be an unquoted password; the
/// line and column stay in the message.
fn without_quoted_source(message: &str) -> String {
    let is_excerpt = |line: &str| {
        let t = line.trim_start();
        t.trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start()
            .starts_with('|')
    };
    let kept: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !is_excerpt(line))
        .collect();
    if kept.len() == message.lines().filter(|l| !l.trim().is_empty()).count() {
        return message.trim_end().to_owned();
    }
    match kept.split_first() {
        Some((head, rest)) if !rest.is_empty() => format!(
            "{head}: {} (the line is not shown: it may hold a secret)",
            rest.join("; ")
        ),
        _ => format!(
            "{} (the line is not shown: it may hold a secret)",
            kept.join("; ")
        ),
    }
}

fn origin(e: &figment::Error) -> String {
    match e.metadata.as_ref().and_then(|md| md.source.as_ref()) {
        Some(src) => format!(" (in {src})"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_syntax_error_does_not_quote_the_line() {
        let found = problems("[kafka]\nsasl_password = hunter2-unquoted\n");
        assert_eq!(found.len(), 1, "{found:?}");
        let message = found[0].to_string();
        assert!(!message.contains("hunter2"), "the value leaked: {message}");
        assert!(message.contains("line 2"), "{message}");
        assert!(!message.contains('\n'), "one line: {message}");
    }

    fn problems(toml: &str) -> Vec<ConfigError> {
        Config::from_toml_str(toml)
            .expect_err("config should be rejected")
            .0
    }

    fn paths(errs: &[ConfigError]) -> Vec<&str> {
        errs.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let config = Config::from_toml_str("").expect("defaults must validate");
        assert_eq!(config.kafka.bootstrap_servers, "127.0.0.1:9092");
        assert_eq!(config.topics.requests, "inferflow.requests");
        assert_eq!(config.kafka.auto_offset_reset, OffsetReset::Earliest);
    }

    #[test]
    fn user_values_override_defaults() {
        let config = Config::from_toml_str("[batch]\nmax_records = 7\n").unwrap();
        assert_eq!(config.batch.max_records.get(), 7);
        assert_eq!(
            config.batch.linger_ms, 20,
            "untouched keys keep their defaults"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_path() {
        let errs = problems(
            r#"
            colour = "blue"
            [kafka]
            bootstrap_servers = "no-port"
            group_idd = "typo"
            auto_offset_reset = "middle"
            [topics]
            results = "bad topic!"
            [http]
            listen = "nowhere"
            [feature_store]
            keyspace = "has-dash"
            "#,
        );
        let p = paths(&errs);
        for expected in [
            "colour",
            "kafka.group_idd",
            "kafka.auto_offset_reset",
            "topics.results",
            "http.listen",
            "feature_store.keyspace",
        ] {
            assert!(p.contains(&expected), "missing {expected} in {errs:#?}");
        }
        let reset = errs
            .iter()
            .find(|e| e.path == "kafka.auto_offset_reset")
            .unwrap();
        assert!(reset.message.contains("earliest"), "{reset}");
    }

    #[test]
    fn semantic_checks_name_the_key() {
        let errs = problems(
            r#"
            [kafka]
            bootstrap_servers = "host:notaport"
            security_protocol = "sasl_ssl"
            [kafka.extra]
            "enable.auto.offset.store" = "true"
            [executor]
            max_in_flight_records = 10
            "#,
        );
        let p = paths(&errs);
        for expected in [
            "kafka.bootstrap_servers",
            "kafka.sasl_mechanism",
            "kafka.sasl_username",
            "kafka.sasl_password",
            "kafka.extra.\"enable.auto.offset.store\"",
            "executor.max_in_flight_records",
        ] {
            assert!(p.contains(&expected), "missing {expected} in {errs:#?}");
        }
    }

    #[test]
    fn tracing_is_off_by_default_and_its_keys_are_checked() {
        let defaults = Config::from_toml_str("").expect("defaults");
        assert!(!defaults.tracing.enabled);
        let errs = problems(
            "[tracing]\nenabled = true\nendpoint = \"collector:4318\"\nsampling_ratio = 2.0\nservice_name = \"\"\nextra = 1\n",
        );
        let p = paths(&errs);
        for expected in [
            "tracing.endpoint",
            "tracing.sampling_ratio",
            "tracing.service_name",
            "tracing.extra",
        ] {
            assert!(p.contains(&expected), "missing {expected} in {errs:#?}");
        }
    }

    #[test]
    fn zero_where_nonzero_is_required_is_rejected() {
        let errs = problems("[batch]\nmax_records = 0\n");
        assert_eq!(paths(&errs), ["batch.max_records"], "{errs:#?}");
    }

    #[test]
    fn exactly_once_settings_are_checked() {
        let errs = problems(
            r#"
            [kafka]
            commit_interval_ms = 20000
            [processing]
            guarantee = "exactly_once"
            transactional_id = " "
            transaction_timeout_ms = 10000
            "#,
        );
        assert_eq!(
            paths(&errs),
            ["processing.transactional_id", "kafka.commit_interval_ms"],
            "{errs:#?}"
        );
        let errs = problems("[processing]\nguarantee = \"twice\"\n");
        assert_eq!(paths(&errs), ["processing.guarantee"], "{errs:#?}");
        let errs = problems("[processing]\ntransaction_timeout_ms = 999\n");
        assert_eq!(
            paths(&errs),
            ["processing.transaction_timeout_ms"],
            "{errs:#?}"
        );
        let errs = problems("[kafka.extra]\n\"transactional.id\" = \"x\"\n");
        assert_eq!(
            paths(&errs),
            ["kafka.extra.\"transactional.id\""],
            "{errs:#?}"
        );
    }

    #[test]
    fn an_exactly_once_commit_must_fit_in_half_the_poll_interval() {
        let eos = |extra: &str| format!("[processing]\nguarantee = \"exactly_once\"\n{extra}");
        Config::from_toml_str(&eos("")).expect("exactly-once defaults must validate");
        // Half of the default kafka.max_poll_interval_ms (300000) fits; a millisecond more
        // does not.
        Config::from_toml_str(&eos("transaction_timeout_ms = 150000\n")).unwrap();
        let errs = problems(&eos("transaction_timeout_ms = 150001\n"));
        assert_eq!(
            paths(&errs),
            ["processing.transaction_timeout_ms"],
            "{errs:#?}"
        );
        let message = &errs[0].message;
        for part in [
            "kafka.max_poll_interval_ms",
            "at most 150000",
            "at least 300002",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
        // The brokers' ceiling needs a poll interval twice as long.
        let errs = problems(&eos("transaction_timeout_ms = 900000\n"));
        assert_eq!(
            paths(&errs),
            ["processing.transaction_timeout_ms"],
            "{errs:#?}"
        );
        Config::from_toml_str(&format!(
            "[kafka]\nmax_poll_interval_ms = 1800000\n{}",
            eos("transaction_timeout_ms = 900000\n")
        ))
        .unwrap();
        // At least once, the transaction timeout is not used.
        Config::from_toml_str("[processing]\ntransaction_timeout_ms = 900000\n").unwrap();
    }

    #[test]
    fn producer_linger_is_a_key_of_its_own() {
        let config = Config::from_toml_str("").unwrap();
        assert_eq!(config.kafka.producer_linger_ms, 5);
        let config = Config::from_toml_str("[kafka]\nproducer_linger_ms = 20\n").unwrap();
        assert_eq!(config.kafka.producer_linger_ms, 20);
        let errs = problems("[kafka]\nproducer_linger_ms = 900001\n");
        assert_eq!(paths(&errs), ["kafka.producer_linger_ms"], "{errs:#?}");
        for property in ["linger.ms", "queue.buffering.max.ms"] {
            let errs = problems(&format!("[kafka.extra]\n\"{property}\" = \"20\"\n"));
            let key = format!("kafka.extra.\"{property}\"");
            assert_eq!(paths(&errs), [key.as_str()], "{errs:#?}");
            assert!(
                errs[0].message.contains("kafka.producer_linger_ms"),
                "{errs:#?}"
            );
        }
    }

    #[test]
    fn transactional_id_is_stable_with_static_membership_and_unique_without() {
        let config =
            Config::from_toml_str("[kafka]\ngroup_id = \"g\"\ngroup_instance_id = \"pod-0\"\n")
                .unwrap();
        assert_eq!(
            config.processing.transactional_id_for(&config.kafka),
            "g-pod-0"
        );
        let config = Config::from_toml_str("[kafka]\ngroup_id = \"g\"\n").unwrap();
        let a = config.processing.transactional_id_for(&config.kafka);
        let b = config.processing.transactional_id_for(&config.kafka);
        assert!(a.starts_with("g-inferflow-") && a != b, "{a} {b}");
        let config = Config::from_toml_str("[processing]\ntransactional_id = \"mine\"\n").unwrap();
        assert_eq!(
            config.processing.transactional_id_for(&config.kafka),
            "mine"
        );
        assert_eq!(config.processing.guarantee, Guarantee::AtLeastOnce);
        assert!(config.replay.enabled);
    }

    #[test]
    fn secrets_are_redacted_in_printed_config() {
        let config = Config::from_toml_str(
            r#"
            [kafka]
            security_protocol = "sasl_ssl"
            sasl_mechanism = "SCRAM-SHA-512"
            sasl_username = "svc"
            sasl_password = "s3cr3t-kafka"
            [feature_store]
            username = "cql"
            password = "s3cr3t-cql"
            "#,
        )
        .unwrap();
        let printed = config.to_redacted_toml();
        let debugged = format!("{config:?}");
        for out in [&printed, &debugged] {
            assert!(!out.contains("s3cr3t"), "secret leaked:\n{out}");
            assert!(out.contains(REDACTED));
        }
        assert_eq!(config.kafka.sasl_password.unwrap().expose(), "s3cr3t-kafka");
    }

    #[test]
    fn json_values_in_the_config_print_as_plain_toml() {
        // serde_json's exact numbers would print as a private struct through TOML.
        let config = Config::from_toml_str(
            r#"
            [providers.local.local.models.iris]
            kind = "onnx"
            path = "models/iris"
            [providers.hf.huggingface]
            base_url = "http://127.0.0.1:1"
            [providers.hf.huggingface.models.m]
            task = "text_classification"
            parameters = { top_k = 2 }
            [models."iris@1"]
            provider = "local"
            warmup = { features = [5.1, 3.5, 1.4, 0.2], n = 7 }
            "#,
        )
        .unwrap();
        let printed = config.to_redacted_toml();
        assert!(!printed.contains("serde_json"), "{printed}");
        let back: toml::Value = toml::from_str(&printed).unwrap();
        let warmup = &back["models"]["iris@1"]["warmup"];
        assert_eq!(warmup["features"][0].as_float(), Some(5.1), "{printed}");
        assert_eq!(warmup["n"].as_integer(), Some(7), "{printed}");
        assert_eq!(
            back["providers"]["hf"]["huggingface"]["models"]["m"]["parameters"]["top_k"]
                .as_integer(),
            Some(2),
            "{printed}"
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours.
    fn environment_overrides_file_and_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "user.toml",
                "[kafka]\ngroup_id = \"from-file\"\nclient_id = \"file\"\n",
            )?;
            jail.set_env("INFERFLOW__KAFKA__GROUP_ID", "from-env");
            let config = Config::load(&Sources::standard(Some("user.toml".into()))).unwrap();
            assert_eq!(config.kafka.group_id, "from-env");
            assert_eq!(config.kafka.client_id, "file");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours.
    fn passwords_from_the_environment_are_exact_strings_and_override_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "user.toml",
                "[kafka]\nsecurity_protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\n\
                 sasl_username = \"svc\"\nsasl_password = \"from-file\"\n\
                 [feature_store]\nusername = \"cql\"\n",
            )?;
            jail.set_env("INFERFLOW__KAFKA__SASL_PASSWORD", "0042");
            jail.set_env("INFERFLOW__FEATURE_STORE__PASSWORD", "true");
            jail.set_env("INFERFLOW__KAFKA__CLIENT_ID", "still-parsed");
            let config = Config::load(&Sources::standard(Some("user.toml".into()))).unwrap();
            assert_eq!(config.kafka.sasl_password.unwrap().expose(), "0042");
            assert_eq!(config.feature_store.password.unwrap().expose(), "true");
            assert_eq!(config.kafka.client_id, "still-parsed");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours.
    fn unknown_env_key_is_reported_with_its_origin() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("INFERFLOW__KAFKA__BOOTSTRAP_SERVERZ", "x:1");
            let errs = Config::load(&Sources::standard(None)).unwrap_err().0;
            assert_eq!(paths(&errs), ["kafka.bootstrap_serverz"]);
            assert!(errs[0].message.contains("INFERFLOW__"), "{}", errs[0]);
            Ok(())
        });
    }

    #[test]
    fn the_feature_store_backend_defaults_to_scylla_and_embedded_needs_a_path() {
        let config = Config::from_toml_str("").unwrap();
        assert_eq!(config.feature_store.backend, FeatureStoreBackend::Scylla);
        assert_eq!(
            config.feature_store.path,
            PathBuf::from("data/features.redb")
        );

        let embedded = Config::from_toml_str(
            "[feature_store]\nbackend = \"embedded\"\npath = \"/tmp/f.redb\"\n",
        )
        .unwrap();
        assert_eq!(
            embedded.feature_store.backend,
            FeatureStoreBackend::Embedded
        );
        assert_eq!(embedded.feature_store.path, PathBuf::from("/tmp/f.redb"));

        let errs = problems("[feature_store]\nbackend = \"embedded\"\npath = \"  \"\n");
        assert_eq!(paths(&errs), ["feature_store.path"], "{errs:#?}");
        assert!(
            errs[0].message.contains("embedded database file"),
            "{}",
            errs[0]
        );

        let errs = problems("[feature_store]\nbackend = \"sqlite\"\n");
        assert_eq!(paths(&errs), ["feature_store.backend"], "{errs:#?}");
        assert!(
            errs[0].message.contains("scylla") && errs[0].message.contains("embedded"),
            "the message lists the backends: {}",
            errs[0]
        );
    }

    #[test]
    fn cql_keys_are_checked_for_scylla_only_and_path_for_embedded_only() {
        let cql_trouble = "contact_points = []\nkeyspace = \"has-dash\"\npassword = \"pw\"\n";
        let errs = problems(&format!("[feature_store]\n{cql_trouble}path = \"\"\n"));
        assert_eq!(
            paths(&errs),
            [
                "feature_store.contact_points",
                "feature_store.keyspace",
                "feature_store.username"
            ],
            "{errs:#?}"
        );
        let embedded = Config::from_toml_str(&format!(
            "[feature_store]\nbackend = \"embedded\"\n{cql_trouble}"
        ))
        .expect("the CQL keys are ignored by the embedded backend");
        assert_eq!(
            embedded.feature_store.backend,
            FeatureStoreBackend::Embedded
        );
        // Checks shared by both backends still apply.
        let errs = problems(
            "[feature_store]\nbackend = \"embedded\"\nhistory_retention_secs = 999999999999\n",
        );
        assert_eq!(
            paths(&errs),
            ["feature_store.history_retention_secs"],
            "{errs:#?}"
        );
    }

    #[test]
    fn replay_in_the_database_needs_the_cql_backend_and_a_cql_ttl() {
        let config = Config::from_toml_str("[replay]\nstore = \"cql\"\n").expect("valid");
        assert_eq!(config.replay.store, ReplayStoreKind::Cql);
        let errs = problems(
            "[feature_store]\nbackend = \"embedded\"\npath = \"/tmp/x\"\n[replay]\nstore = \"cql\"\n",
        );
        assert_eq!(paths(&errs), ["replay.store"], "{errs:#?}");
        assert!(
            errs[0].to_string().contains("feature_store.backend"),
            "{errs:#?}"
        );
        let errs = problems("[replay]\nstore = \"cql\"\nttl_secs = 999999999999\n");
        assert_eq!(paths(&errs), ["replay.ttl_secs"], "{errs:#?}");
        let errs = problems("[replay]\nstore = \"disk\"\n");
        assert_eq!(paths(&errs), ["replay.store"], "{errs:#?}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let errs = Config::load(&Sources::standard(Some(
            "/nonexistent/inferflow.toml".into(),
        )))
        .unwrap_err()
        .0;
        assert_eq!(errs[0].path, "--config");
    }

    #[test]
    fn providers_and_models_parse_and_defaults_are_derived() {
        let config = Config::from_toml_str(
            r#"
            [providers.local.local.models.iris]
            kind = "onnx"
            path = "models/iris"
            [providers.gpt.openai]
            base_url = "http://127.0.0.1:9/v1"
            [providers.gpt.openai.models.chat]
            task = "chat"
            [providers.gpt.breaker]
            failure_threshold = 3
            [providers.gpt.rate_limit]
            requests_per_minute = 60
            [models."iris@1"]
            provider = "local"
            [models."chat@1"]
            provider = "gpt"
            cache = false
            [models."chat@2"]
            provider = "gpt"
            remote_model = "chat"
            default = true
            "#,
        )
        .expect("valid");
        assert_eq!(config.providers.0.len(), 2);
        assert!(config.providers.0["gpt"].breaker.is_some());
        assert!(!config.models.0["chat@1"].cache);
        let defaults = config.models.default_versions();
        assert_eq!(defaults["iris"], "1");
        assert_eq!(defaults["chat"], "2");
    }

    #[test]
    fn mistakes_are_reported_with_their_keys() {
        let errors = Config::from_toml_str(
            r#"
            [providers.none]
            [providers.both.openai]
            [providers.both.local]
            [providers.local.local.models.iris]
            kind = "onnx"
            path = "models/iris"
            [models.noversion]
            provider = "local"
            [models."ghost@1"]
            provider = "missing"
            [models."tulip@1"]
            provider = "local"
            [models."x@1"]
            provider = "local"
            remote_model = "iris"
            default = true
            [models."x@2"]
            provider = "local"
            remote_model = "iris"
            default = true
            "#,
        )
        .expect_err("invalid");
        let text = errors.to_string();
        for needle in [
            "providers.none",
            "names no kind",
            "providers.both",
            "more than one kind",
            "models.\"noversion\"",
            "models.\"ghost@1\".provider",
            "`missing` is not a configured provider",
            "models.\"tulip@1\".remote_model",
            "2 versions marked default",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }
}
