//! The feature store's CQL schema: the files in `schemas/cql/`, rendered for a configuration and
//! applied at start-up when `feature_store.create_schema` is on.
//!
//! Each schema version is one file, `schemas/cql/v<N>.cql`, embedded here. Version 1 creates
//! the keyspace and every table with `IF NOT EXISTS`, so it is applied on every start and by
//! every instance; it also records itself in `schema_migrations`. Later versions are applied
//! once each, in order, when `schema_migrations` does not list them, and then recorded there;
//! since instances may start together, each must also be safe to apply twice. Version 2 adds
//! the tables of replay-safe inference (`replay.store = "cql"`, [`crate::replay`]).

use std::time::Duration;

use scylla::client::session::Session;

use super::FeatureStoreConfig;
use super::FeatureStoreError;

/// The least time a schema statement may take (`feature_store.request_timeout_ms` when longer).
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(30);

/// One schema version.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The version number, from 1.
    pub version: u32,
    /// The CQL template (`{{keyspace}}` and `{{replication_factor}}` placeholders).
    pub cql: &'static str,
}

/// Every schema version, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        cql: include_str!("../../schemas/cql/v1.cql"),
    },
    Migration {
        version: 2,
        cql: include_str!("../../schemas/cql/v2.cql"),
    },
];

/// The newest schema version this inferflow knows.
pub fn current_version() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// The statements of `migration` for this configuration, in order, without comments.
pub fn statements(migration: &Migration, cfg: &FeatureStoreConfig) -> Vec<String> {
    let rendered = migration
        .cql
        .replace("{{keyspace}}", &cfg.keyspace)
        .replace(
            "{{replication_factor}}",
            &cfg.replication_factor.to_string(),
        );
    let mut out = Vec::new();
    let mut current = String::new();
    for line in rendered.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with("--") {
            continue;
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(trimmed);
        if let Some(statement) = current.strip_suffix(';') {
            out.push(statement.trim().to_owned());
            current.clear();
        }
    }
    debug_assert!(current.is_empty(), "unterminated statement: {current}");
    out
}

/// Creates the keyspace and tables, and applies any migration not yet applied.
pub async fn apply(session: &Session, cfg: &FeatureStoreConfig) -> Result<(), FeatureStoreError> {
    let Some((first, later)) = MIGRATIONS.split_first() else {
        return Ok(());
    };
    run(session, cfg, first).await?;
    if later.is_empty() {
        return Ok(());
    }
    let applied = applied_versions(session, cfg).await?;
    for migration in later.iter().filter(|m| !applied.contains(&m.version)) {
        run(session, cfg, migration).await?;
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {}.schema_migrations (version, description) VALUES (?, ?)",
                    cfg.keyspace
                ),
                (
                    i32::try_from(migration.version).unwrap_or(i32::MAX),
                    format!("v{}", migration.version),
                ),
            )
            .await
            .map_err(|source| {
                schema_error(cfg, migration, "INSERT INTO schema_migrations", source)
            })?;
    }
    Ok(())
}

/// The versions `schema_migrations` lists.
async fn applied_versions(
    session: &Session,
    cfg: &FeatureStoreConfig,
) -> Result<Vec<u32>, FeatureStoreError> {
    const OPERATION: &str = "schema version read";
    let rows = session
        .query_unpaged(
            format!("SELECT version FROM {}.schema_migrations", cfg.keyspace),
            &[],
        )
        .await
        .map_err(|e| FeatureStoreError::query(OPERATION, e))?
        .into_rows_result()
        .map_err(|e| FeatureStoreError::decode(OPERATION, e))?;
    let versions = rows
        .rows::<(i32,)>()
        .map_err(|e| FeatureStoreError::decode(OPERATION, e))?
        .map(|row| {
            row.map(|(v,)| u32::try_from(v).unwrap_or(0))
                .map_err(|e| FeatureStoreError::decode(OPERATION, e))
        })
        .collect::<Result<_, _>>()?;
    Ok(versions)
}

async fn run(
    session: &Session,
    cfg: &FeatureStoreConfig,
    migration: &Migration,
) -> Result<(), FeatureStoreError> {
    for statement in statements(migration, cfg) {
        tracing::debug!(version = migration.version, statement = %statement, "applying schema");
        // Schema changes wait for agreement between nodes and take much longer than reads and
        // writes, especially on a busy database: they get their own, longer timeout.
        let mut query = scylla::statement::unprepared::Statement::new(statement.as_str());
        query.set_request_timeout(Some(
            SCHEMA_TIMEOUT.max(Duration::from_millis(cfg.request_timeout_ms.get())),
        ));
        session
            .query_unpaged(query, &[])
            .await
            .map_err(|source| schema_error(cfg, migration, &statement, source))?;
    }
    Ok(())
}

fn schema_error(
    cfg: &FeatureStoreConfig,
    migration: &Migration,
    statement: &str,
    source: scylla::errors::ExecutionError,
) -> FeatureStoreError {
    let mut statement = statement.to_owned();
    if statement.len() > 80 {
        let mut end = 80;
        while !statement.is_char_boundary(end) {
            end -= 1;
        }
        statement.truncate(end);
        statement.push('…');
    }
    FeatureStoreError::Schema {
        keyspace: cfg.keyspace.clone(),
        version: migration.version,
        statement,
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::defaults_with;

    fn cfg() -> FeatureStoreConfig {
        defaults_with(
            "feature_store",
            "[feature_store]\nkeyspace = \"ks_test\"\nreplication_factor = 3\n",
        )
    }

    #[test]
    fn v1_renders_to_complete_statements_for_the_configured_keyspace() {
        let statements = statements(&MIGRATIONS[0], &cfg());
        let expected_prefixes = [
            "CREATE KEYSPACE IF NOT EXISTS ks_test WITH",
            "CREATE TABLE IF NOT EXISTS ks_test.schema_migrations (",
            "CREATE TABLE IF NOT EXISTS ks_test.features (",
            "CREATE TABLE IF NOT EXISTS ks_test.feature_history (",
            "CREATE TABLE IF NOT EXISTS ks_test.feature_groups (",
            "INSERT INTO ks_test.schema_migrations (version, description) VALUES (1,",
        ];
        assert_eq!(statements.len(), expected_prefixes.len(), "{statements:#?}");
        for (statement, prefix) in statements.iter().zip(expected_prefixes) {
            assert!(
                statement.starts_with(prefix),
                "{statement} should start with {prefix}"
            );
        }
        assert!(
            statements[0].contains("'replication_factor': 3"),
            "{}",
            statements[0]
        );
        for statement in &statements {
            assert!(!statement.contains("{{"), "placeholder left in {statement}");
            assert!(
                !statement.contains(';'),
                "two statements in one: {statement}"
            );
        }
    }

    #[test]
    fn v2_creates_the_replay_tables_without_recording_itself() {
        let statements = statements(&MIGRATIONS[1], &cfg());
        assert_eq!(statements.len(), 2, "{statements:#?}");
        assert!(statements[0].starts_with("CREATE TABLE IF NOT EXISTS ks_test.replay_results ("));
        assert!(statements[1].starts_with("CREATE TABLE IF NOT EXISTS ks_test.replay_marks ("));
    }

    #[test]
    fn versions_are_consecutive_from_one() {
        for (i, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version as usize, i + 1);
        }
        assert_eq!(current_version() as usize, MIGRATIONS.len());
    }
}
