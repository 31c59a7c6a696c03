//! `inferflow features`: reads and writes the feature store from the command line, through
//! [`FeatureStore::open`] on the configured backend. Input values are JSON; every answer is one
//! JSON document on stdout. Errors go to stderr with exit code 1; a feature or group that does
//! not exist is exit code 3 (with nothing on stdout), so scripts can tell the two apart.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use inferflow::config::Config;
use inferflow::feature_store::{Feature, FeatureGroup, FeatureStore, FeatureUpdate};
use serde_json::{Map, Value, json};

/// Exit code when the feature or group asked for does not exist.
pub(crate) const EXIT_NOT_FOUND: u8 = 3;

/// `inferflow features`.
#[derive(Debug, Args)]
pub(crate) struct FeaturesArgs {
    /// TOML file layered over the built-in defaults; INFERFLOW__SECTION__KEY environment
    /// variables override both (e.g. INFERFLOW__FEATURE_STORE__BACKEND=embedded).
    #[arg(long, short, env = "INFERFLOW_CONFIG", global = true)]
    pub(crate) config: Option<PathBuf>,
    #[command(subcommand)]
    command: FeaturesCommand,
}

#[derive(Debug, Subcommand)]
enum FeaturesCommand {
    /// Write one version of a feature. Prints the version written and the feature's current
    /// value afterwards: a version lower than the stored one is kept in the history only.
    Put {
        #[command(flatten)]
        key: KeyArgs,
        /// The values, a JSON object, e.g. '{"clicks":3}'.
        #[arg(long)]
        values: String,
        /// The version; the highest version written is the one read.
        #[arg(long)]
        version: u64,
        /// Seconds after which the value expires.
        #[arg(long)]
        ttl_secs: Option<u32>,
        /// When the values were produced, Unix milliseconds (default: now).
        #[arg(long)]
        updated_at_ms: Option<u64>,
    },
    /// Print a feature's current value, or with --version one version from the history.
    Get {
        #[command(flatten)]
        key: KeyArgs,
        /// Read this version from the history instead of the current value.
        #[arg(long)]
        version: Option<u64>,
    },
    /// Print the current values of several features of one entity, and the names without a
    /// value. Name the features with --names, or use a feature group's with --group.
    Vector {
        /// The kind of entity, e.g. `user` (with --names).
        #[arg(long, required_unless_present = "group")]
        entity_type: Option<String>,
        /// The entity's id.
        #[arg(long)]
        entity_id: String,
        /// Feature names, comma-separated or repeated.
        #[arg(
            long,
            value_delimiter = ',',
            required_unless_present = "group",
            conflicts_with = "group"
        )]
        names: Vec<String>,
        /// A feature group whose features (and entity type) to read.
        #[arg(long, conflicts_with = "entity_type")]
        group: Option<String>,
        /// The group's version (default: its latest).
        #[arg(long, requires = "group")]
        group_version: Option<u32>,
    },
    /// Create or read feature groups.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Create a version of a feature group and print it. Repeating an identical creation
    /// succeeds; a different definition under an existing version is refused.
    Create {
        /// The group's name.
        #[arg(long)]
        name: String,
        /// The version, from 1.
        #[arg(long)]
        version: u32,
        /// The entity type of all its features.
        #[arg(long)]
        entity_type: String,
        /// Feature names, comma-separated or repeated, in order.
        #[arg(long, value_delimiter = ',', required = true)]
        features: Vec<String>,
        /// What the group is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Print a version of a feature group (default: its latest).
    Get {
        /// The group's name.
        #[arg(long)]
        name: String,
        /// The version (default: the latest).
        #[arg(long)]
        version: Option<u32>,
    },
}

/// Which feature.
#[derive(Debug, Args)]
struct KeyArgs {
    /// The kind of entity, e.g. `user`.
    #[arg(long)]
    entity_type: String,
    /// The entity's id.
    #[arg(long)]
    entity_id: String,
    /// The feature's name.
    #[arg(long)]
    name: String,
}

/// What a command found.
enum Outcome {
    /// A JSON document for stdout.
    Found(Value),
    /// Nothing under this description.
    NotFound(String),
}

/// Runs one `inferflow features` command with `config` and returns the process's exit code.
pub(crate) fn run(config: &Config, args: FeaturesArgs) -> ExitCode {
    let result = tokio::runtime::Runtime::new()
        .context("starting the Tokio runtime")
        .and_then(|runtime| runtime.block_on(execute(config, args.command)));
    match result {
        Ok(Outcome::Found(document)) => {
            println!("{document}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::NotFound(what)) => {
            eprintln!("not found: {what}");
            ExitCode::from(EXIT_NOT_FOUND)
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(config: &Config, command: FeaturesCommand) -> anyhow::Result<Outcome> {
    let store = FeatureStore::open(&config.feature_store)
        .await
        .context("opening the feature store")?;
    match command {
        FeaturesCommand::Put {
            key,
            values,
            version,
            ttl_secs,
            updated_at_ms,
        } => {
            let values: Map<String, Value> = serde_json::from_str(&values)
                .context("--values must be a JSON object, e.g. '{\"clicks\":3}'")?;
            let mut update =
                FeatureUpdate::new(key.entity_type, key.entity_id, key.name, values, version);
            if let Some(ms) = updated_at_ms {
                update.updated_at_ms = ms;
            }
            if let Some(ttl) = ttl_secs {
                update = update.with_ttl_secs(ttl);
            }
            store.set_feature(&update).await?;
            let current = store
                .get_feature(&update.entity_type, &update.entity_id, &update.name)
                .await?;
            Ok(Outcome::Found(json!({
                "written": Feature::from_update(&update),
                "current": current.as_deref(),
            })))
        }
        FeaturesCommand::Get { key, version } => {
            let feature = match version {
                Some(version) => {
                    store
                        .get_feature_at_version(
                            &key.entity_type,
                            &key.entity_id,
                            &key.name,
                            version,
                        )
                        .await?
                }
                None => store
                    .get_feature(&key.entity_type, &key.entity_id, &key.name)
                    .await?
                    .map(|f| (*f).clone()),
            };
            let what = || {
                let at = version
                    .map(|v| format!(" at version {v}"))
                    .unwrap_or_default();
                format!(
                    "feature {}/{}/{}{at} has no value",
                    key.entity_type, key.entity_id, key.name
                )
            };
            found(feature, what)
        }
        FeaturesCommand::Vector {
            entity_type,
            entity_id,
            names,
            group,
            group_version,
        } => {
            let vector = match group {
                Some(name) => {
                    let Some(group) = store.get_feature_group(&name, group_version).await? else {
                        return Ok(Outcome::NotFound(describe_group(&name, group_version)));
                    };
                    store.get_feature_group_vector(&group, &entity_id).await?
                }
                None => {
                    // clap requires --entity-type without --group.
                    let entity_type = entity_type.unwrap_or_default();
                    store
                        .get_feature_vector(&entity_type, &entity_id, &names)
                        .await?
                }
            };
            Ok(Outcome::Found(serde_json::to_value(vector)?))
        }
        FeaturesCommand::Group {
            command:
                GroupCommand::Create {
                    name,
                    version,
                    entity_type,
                    features,
                    description,
                },
        } => {
            let group = FeatureGroup {
                name,
                version,
                entity_type,
                features,
                description,
            };
            store.create_feature_group(&group).await?;
            let stored = store
                .get_feature_group(&group.name, Some(group.version))
                .await?;
            found(stored, || {
                format!(
                    "{} right after creating it",
                    describe_group(&group.name, Some(group.version))
                )
            })
        }
        FeaturesCommand::Group {
            command: GroupCommand::Get { name, version },
        } => {
            let group = store.get_feature_group(&name, version).await?;
            found(group, || describe_group(&name, version))
        }
    }
}

/// `Found` with the JSON of `value`, or `NotFound` with `what()`.
fn found<T: serde::Serialize>(
    value: Option<T>,
    what: impl FnOnce() -> String,
) -> anyhow::Result<Outcome> {
    Ok(match value {
        Some(value) => Outcome::Found(serde_json::to_value(value)?),
        None => Outcome::NotFound(what()),
    })
}

fn describe_group(name: &str, version: Option<u32>) -> String {
    match version {
        Some(v) => format!("feature group {name} version {v}"),
        None => format!("feature group {name}"),
    }
}
