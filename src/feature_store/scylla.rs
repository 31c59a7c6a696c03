//! [`ScyllaBackend`]: the feature store on ScyllaDB (or any CQL database accepting the same
//! CQL), through the `scylla` driver.
//!
//! The tables are in `schemas/cql/v1.cql`. Every statement is prepared once, in
//! [`ScyllaBackend::new`], and marked idempotent so the driver may retry it. Reads and writes use
//! the session's consistency (`feature_store.consistency`).
//!
//! # Highest version wins, without reading first
//!
//! Every write of a feature carries `USING TIMESTAMP version * 1000`. CQL keeps, for every
//! cell, the value with the highest write timestamp, on every replica and whatever the arrival
//! order, so the stored value is the one with the highest version: writing versions 3, 1, 2 and
//! 3 again leaves version 3. A replay of a version writes identical cells, which changes
//! nothing. Why `* 1000`: write timestamps are microseconds, versions are often event times in
//! milliseconds, so the cells then carry their event time as ordinary timestamps (sensible next
//! to writes from other tools, and never far in the future). The mapping is strictly increasing
//! and fits an `i64` for every version up to [`MAX_VERSION`] (2^53 − 1), which
//! [`FeatureUpdate::validate`] enforces.
//!
//! Assumptions, which hold while only inferflow writes these tables:
//! - every write and delete uses a version-derived timestamp; a plain `DELETE` or `INSERT`
//!   stamped with the current time outranks every version whose millisecond value is older;
//! - one version means one content. Two different contents written with the same version tie
//!   on the timestamp; the database then keeps, cell by cell, the larger value: the greater
//!   `values_json` and the later `updated_at`, in every order and on every replica. That is the
//!   store-wide rule ([`super::model::same_version_wins`]), which the embedded backend applies
//!   too. (With TTLs that differ between the two writes, which expiry the database keeps is its
//!   own business.)
//! - once a version has expired (TTL), older versions written afterwards stay hidden until the
//!   expired cells are purged (`gc_grace_seconds` after expiry), then they can reappear.
//!
//! History rows (`feature_history`) are written with the same timestamp, beside the current
//! value and concurrently with it; a failed write returns an error and is safe to repeat.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::try_join_all;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use serde_json::{Map, Value};

use super::FeatureStoreConfig;
use super::model::{
    MAX_VERSION, unix_now_ms, validate_key, validate_part, validate_vector_key, validate_version,
};
use super::{Feature, FeatureGroup, FeatureStoreError, FeatureUpdate, connect, schema};

/// Most feature names read in one `IN` query. ScyllaDB refuses more than 100 clustering keys
/// per query by default (`max_clustering_key_restrictions_per_query`); longer lists are split
/// into queries of this size, sent concurrently.
pub const MAX_NAMES_PER_QUERY: usize = 100;

/// The CQL write timestamp of a feature version: `version * 1000`, see the module documentation.
pub fn write_timestamp(version: u64) -> Result<i64, FeatureStoreError> {
    validate_version(version)?;
    // MAX_VERSION * 1000 < i64::MAX, so neither step can fail after the check.
    i64::try_from(version)
        .ok()
        .and_then(|v| v.checked_mul(1000))
        .ok_or_else(|| {
            FeatureStoreError::invalid("feature version", format!("{version} > {MAX_VERSION}"))
        })
}

/// The prepared statements, one per operation.
#[derive(Debug)]
struct Statements {
    insert_feature: PreparedStatement,
    insert_history: PreparedStatement,
    select_feature: PreparedStatement,
    select_features: PreparedStatement,
    select_history: PreparedStatement,
    insert_group: PreparedStatement,
    select_group: PreparedStatement,
    select_latest_group: PreparedStatement,
}

/// The feature store on a CQL database. Cheap to share behind an `Arc`; the session inside is
/// shared too.
#[derive(Debug)]
pub struct ScyllaBackend {
    session: Arc<Session>,
    statements: Statements,
    /// TTL of history rows in seconds; 0 keeps them.
    history_ttl_secs: i32,
}

/// Prepares `cql` (the statement `name`, on `keyspace`, for error messages) as idempotent:
/// every write of the feature store and the replay store carries its own timestamp or
/// identical content, so the driver may retry or speculate it.
pub(crate) async fn prepare_idempotent(
    session: &Session,
    keyspace: &str,
    name: &'static str,
    cql: String,
) -> Result<PreparedStatement, FeatureStoreError> {
    let mut statement =
        session
            .prepare(cql)
            .await
            .map_err(|source| FeatureStoreError::Prepare {
                statement: name,
                keyspace: keyspace.to_owned(),
                source: Box::new(source),
            })?;
    statement.set_is_idempotent(true);
    Ok(statement)
}

impl ScyllaBackend {
    /// Connects with [`connect`], then does what [`ScyllaBackend::new`] does.
    pub async fn connect(cfg: &FeatureStoreConfig) -> Result<Self, FeatureStoreError> {
        let session = connect(cfg).await.map_err(FeatureStoreError::from)?;
        Self::new(Arc::new(session), cfg).await
    }

    /// Uses `session`: applies the schema if `feature_store.create_schema` is on, then prepares
    /// every statement on `feature_store.keyspace`.
    pub async fn new(
        session: Arc<Session>,
        cfg: &FeatureStoreConfig,
    ) -> Result<Self, FeatureStoreError> {
        if cfg.create_schema {
            schema::apply(&session, cfg).await?;
        }
        let history_ttl_secs = i32::try_from(cfg.history_retention_secs).map_err(|_| {
            FeatureStoreError::invalid(
                "configuration",
                format!(
                    "feature_store.history_retention_secs {} is too large",
                    cfg.history_retention_secs
                ),
            )
        })?;
        let ks = &cfg.keyspace;
        let prepare = |name: &'static str, cql: String| prepare_idempotent(&session, ks, name, cql);
        let statements = Statements {
            insert_feature: prepare(
                "feature insert",
                format!(
                    "INSERT INTO {ks}.features (entity_type, entity_id, name, values_json, version, updated_at) \
                     VALUES (?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?"
                ),
            )
            .await?,
            insert_history: prepare(
                "history insert",
                format!(
                    "INSERT INTO {ks}.feature_history (entity_type, entity_id, name, version, values_json, updated_at) \
                     VALUES (?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?"
                ),
            )
            .await?,
            select_feature: prepare(
                "feature select",
                format!(
                    "SELECT name, values_json, version, updated_at, TTL(values_json) FROM {ks}.features \
                     WHERE entity_type = ? AND entity_id = ? AND name = ?"
                ),
            )
            .await?,
            select_features: prepare(
                "features select",
                format!(
                    "SELECT name, values_json, version, updated_at, TTL(values_json) FROM {ks}.features \
                     WHERE entity_type = ? AND entity_id = ? AND name IN ?"
                ),
            )
            .await?,
            select_history: prepare(
                "history select",
                format!(
                    "SELECT name, values_json, version, updated_at, TTL(values_json) FROM {ks}.feature_history \
                     WHERE entity_type = ? AND entity_id = ? AND name = ? AND version = ?"
                ),
            )
            .await?,
            insert_group: prepare(
                "group insert",
                format!(
                    "INSERT INTO {ks}.feature_groups (name, version, entity_type, features, description, created_at) \
                     VALUES (?, ?, ?, ?, ?, ?)"
                ),
            )
            .await?,
            select_group: prepare(
                "group select",
                format!(
                    "SELECT name, version, entity_type, features, description FROM {ks}.feature_groups \
                     WHERE name = ? AND version = ?"
                ),
            )
            .await?,
            select_latest_group: prepare(
                "latest group select",
                format!(
                    "SELECT name, version, entity_type, features, description FROM {ks}.feature_groups \
                     WHERE name = ? LIMIT 1"
                ),
            )
            .await?,
        };
        Ok(ScyllaBackend {
            session,
            statements,
            history_ttl_secs,
        })
    }

    /// The session, for callers that share it.
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    async fn put(&self, update: &FeatureUpdate) -> Result<(), FeatureStoreError> {
        const OPERATION: &str = "feature write";
        update.validate()?;
        let timestamp = write_timestamp(update.version)?;
        let values_json = serde_json::to_string(&update.values)
            .map_err(|e| FeatureStoreError::invalid("feature update", e.to_string()))?;
        // validate() bounds all three; the conversions cannot fail.
        let version = i64::try_from(update.version).unwrap_or(i64::MAX);
        let updated_at = i64::try_from(update.updated_at_ms).unwrap_or(i64::MAX);
        let ttl = update
            .ttl_secs
            .map_or(0, |t| i32::try_from(t).unwrap_or(i32::MAX));
        // A history row lives as long as the retention, and no longer than the feature itself.
        let history_ttl = match (ttl, self.history_ttl_secs) {
            (0, retention) => retention,
            (ttl, 0) => ttl,
            (ttl, retention) => ttl.min(retention),
        };
        let current = self.session.execute_unpaged(
            &self.statements.insert_feature,
            (
                &update.entity_type,
                &update.entity_id,
                &update.name,
                &values_json,
                version,
                updated_at,
                ttl,
                timestamp,
            ),
        );
        let history = self.session.execute_unpaged(
            &self.statements.insert_history,
            (
                &update.entity_type,
                &update.entity_id,
                &update.name,
                version,
                &values_json,
                updated_at,
                history_ttl,
                timestamp,
            ),
        );
        futures::try_join!(current, history).map_err(|e| FeatureStoreError::query(OPERATION, e))?;
        Ok(())
    }

    async fn get(
        &self,
        entity_type: &str,
        entity_id: &str,
        name: &str,
    ) -> Result<Option<Feature>, FeatureStoreError> {
        const OPERATION: &str = "feature read";
        validate_key(entity_type, entity_id, name)?;
        let result = self
            .session
            .execute_unpaged(
                &self.statements.select_feature,
                (entity_type, entity_id, name),
            )
            .await
            .map_err(|e| FeatureStoreError::query(OPERATION, e))?;
        let mut features = decode_features(OPERATION, entity_type, entity_id, result)?;
        Ok(features.pop())
    }

    async fn get_at_version(
        &self,
        entity_type: &str,
        entity_id: &str,
        name: &str,
        version: u64,
    ) -> Result<Option<Feature>, FeatureStoreError> {
        const OPERATION: &str = "feature history read";
        validate_key(entity_type, entity_id, name)?;
        validate_version(version)?;
        let result = self
            .session
            .execute_unpaged(
                &self.statements.select_history,
                (
                    entity_type,
                    entity_id,
                    name,
                    i64::try_from(version).unwrap_or(i64::MAX),
                ),
            )
            .await
            .map_err(|e| FeatureStoreError::query(OPERATION, e))?;
        let history = decode_features(OPERATION, entity_type, entity_id, result)?.pop();
        super::history_or_current(history, version, self.get(entity_type, entity_id, name)).await
    }

    async fn get_many(
        &self,
        entity_type: &str,
        entity_id: &str,
        names: &[&str],
    ) -> Result<Vec<Option<Feature>>, FeatureStoreError> {
        const OPERATION: &str = "feature vector read";
        validate_vector_key(entity_type, entity_id, names)?;
        let mut unique: Vec<&str> = names.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let chunks = unique.chunks(MAX_NAMES_PER_QUERY).map(|chunk| async move {
            let result = self
                .session
                .execute_unpaged(
                    &self.statements.select_features,
                    (entity_type, entity_id, chunk),
                )
                .await
                .map_err(|e| FeatureStoreError::query(OPERATION, e))?;
            decode_features(OPERATION, entity_type, entity_id, result)
        });
        let mut found: HashMap<String, Feature> = try_join_all(chunks)
            .await?
            .into_iter()
            .flatten()
            .map(|f| (f.name.clone(), f))
            .collect();
        // Names asked for twice get the value twice.
        let mut out = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let again = names[i + 1..].contains(name);
            out.push(if again {
                found.get(*name).cloned()
            } else {
                found.remove(*name)
            });
        }
        Ok(out)
    }

    async fn create_group(&self, group: &FeatureGroup) -> Result<(), FeatureStoreError> {
        const OPERATION: &str = "feature group write";
        group.validate()?;
        // Without a lightweight transaction this check and the insert are not atomic: two
        // instances creating the same version with different definitions at the same moment
        // can both succeed, and the later write wins. It catches the common mistake (reusing a
        // version) and makes an identical repeat a no-op.
        if let Some(existing) = self.get_group(&group.name, Some(group.version)).await? {
            return if existing == *group {
                Ok(())
            } else {
                Err(FeatureStoreError::GroupConflict {
                    name: group.name.clone(),
                    version: group.version,
                })
            };
        }
        let created_at = i64::try_from(unix_now_ms()).unwrap_or(i64::MAX);
        self.session
            .execute_unpaged(
                &self.statements.insert_group,
                (
                    &group.name,
                    i64::from(group.version),
                    &group.entity_type,
                    &group.features,
                    &group.description,
                    created_at,
                ),
            )
            .await
            .map_err(|e| FeatureStoreError::query(OPERATION, e))?;
        Ok(())
    }

    async fn get_group(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<FeatureGroup>, FeatureStoreError> {
        const OPERATION: &str = "feature group read";
        validate_part("feature group", "name", name)?;
        let result = match version {
            Some(version) => {
                self.session
                    .execute_unpaged(&self.statements.select_group, (name, i64::from(version)))
                    .await
            }
            None => {
                self.session
                    .execute_unpaged(&self.statements.select_latest_group, (name,))
                    .await
            }
        }
        .map_err(|e| FeatureStoreError::query(OPERATION, e))?;
        let rows = result
            .into_rows_result()
            .map_err(|e| FeatureStoreError::decode(OPERATION, e))?;
        let row = rows
            .maybe_first_row::<(String, i64, String, Option<Vec<String>>, Option<String>)>()
            .map_err(|e| FeatureStoreError::decode(OPERATION, e))?;
        let Some((name, version, entity_type, features, description)) = row else {
            return Ok(None);
        };
        let version = u32::try_from(version).map_err(|_| {
            FeatureStoreError::decode(OPERATION, format!("group version {version} out of range"))
        })?;
        Ok(Some(FeatureGroup {
            name,
            version,
            entity_type,
            features: features.unwrap_or_default(),
            description: description.unwrap_or_default(),
        }))
    }
}

/// A row of `features` or `feature_history`: name, values_json, version, updated_at, TTL.
type FeatureRow = (String, String, i64, i64, Option<i32>);

/// The features in `result`, in row order.
fn decode_features(
    operation: &'static str,
    entity_type: &str,
    entity_id: &str,
    result: scylla::response::query_result::QueryResult,
) -> Result<Vec<Feature>, FeatureStoreError> {
    let rows = result
        .into_rows_result()
        .map_err(|e| FeatureStoreError::decode(operation, e))?;
    rows.rows::<FeatureRow>()
        .map_err(|e| FeatureStoreError::decode(operation, e))?
        .map(|row| {
            let (name, values_json, version, updated_at, ttl) =
                row.map_err(|e| FeatureStoreError::decode(operation, e))?;
            let values: Map<String, Value> = serde_json::from_str(&values_json).map_err(|e| {
                FeatureStoreError::decode(
                    operation,
                    format!(
                        "values_json of {entity_type}/{entity_id}/{name} is not a JSON object: {e}"
                    ),
                )
            })?;
            let non_negative = |what: &str, v: i64| {
                u64::try_from(v).map_err(|_| {
                    FeatureStoreError::decode(
                        operation,
                        format!("{what} {v} of {entity_type}/{entity_id}/{name} is negative"),
                    )
                })
            };
            Ok(Feature {
                entity_type: entity_type.to_owned(),
                entity_id: entity_id.to_owned(),
                version: non_negative("version", version)?,
                updated_at_ms: non_negative("updated_at", updated_at)?,
                ttl_secs: ttl.and_then(|t| u32::try_from(t).ok()),
                name,
                values,
            })
        })
        .collect()
}

super::forward_backend!(ScyllaBackend);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_timestamps_grow_with_the_version_and_fit_a_cql_timestamp() {
        assert_eq!(write_timestamp(0).unwrap(), 0);
        assert_eq!(write_timestamp(1).unwrap(), 1000);
        assert!(write_timestamp(2).unwrap() > write_timestamp(1).unwrap());
        // An event time in milliseconds becomes the same instant in microseconds.
        assert_eq!(
            write_timestamp(1_700_000_000_000).unwrap(),
            1_700_000_000_000_000
        );
        let max = write_timestamp(MAX_VERSION).unwrap();
        assert!(max > write_timestamp(MAX_VERSION - 1).unwrap());
        assert!(write_timestamp(MAX_VERSION + 1).is_err());
    }
}
