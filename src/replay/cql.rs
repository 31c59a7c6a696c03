//! The durable tier of the replay store: results and marks in the feature store's CQL database
//! (tables `replay_results` and `replay_marks`, `schemas/cql/v2.cql`).
//!
//! Rows are keyed by consumer group, so deployments sharing a keyspace never answer with each
//! other's results. Every row carries `USING TTL replay.ttl_secs`. A mark is written with
//! `USING TIMESTAMP next_offset`: writes from batches finishing out of order leave the highest
//! offset, on every replica.

use std::sync::Arc;

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use crate::executor::ExecOutput;
use crate::feature_store::FeatureStoreConfig;
use crate::feature_store::{FeatureStoreError, connect, prepare_idempotent, schema};

/// Results and marks of one consumer group in a CQL database.
pub struct CqlReplay {
    session: Arc<Session>,
    group: String,
    ttl_secs: i32,
    insert_result: PreparedStatement,
    select_result: PreparedStatement,
    insert_mark: PreparedStatement,
    select_mark: PreparedStatement,
}

impl std::fmt::Debug for CqlReplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlReplay")
            .field("group", &self.group)
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl CqlReplay {
    /// Connects to the feature store's database (applying the schema when
    /// `feature_store.create_schema` is on) and prepares the statements.
    pub async fn open(
        cfg: &FeatureStoreConfig,
        group: &str,
        ttl_secs: u64,
    ) -> Result<CqlReplay, FeatureStoreError> {
        let session = Arc::new(connect(cfg).await.map_err(FeatureStoreError::from)?);
        if cfg.create_schema {
            schema::apply(&session, cfg).await?;
        }
        let ttl_secs = i32::try_from(ttl_secs).map_err(|_| {
            FeatureStoreError::invalid(
                "configuration",
                format!("replay.ttl_secs {ttl_secs} is too large"),
            )
        })?;
        let ks = &cfg.keyspace;
        // Writes carry their own timestamp or identical content: repeating one is safe.
        let prepare = |name: &'static str, cql: String| prepare_idempotent(&session, ks, name, cql);
        Ok(CqlReplay {
            insert_result: prepare(
                "replay result write",
                format!(
                    "INSERT INTO {ks}.replay_results (consumer_group, request_id, fingerprint, output_json) \
                     VALUES (?, ?, ?, ?) USING TTL ?"
                ),
            )
            .await?,
            select_result: prepare(
                "replay result read",
                format!(
                    "SELECT fingerprint, output_json FROM {ks}.replay_results \
                     WHERE consumer_group = ? AND request_id = ?"
                ),
            )
            .await?,
            insert_mark: prepare(
                "replay mark write",
                format!(
                    "INSERT INTO {ks}.replay_marks (consumer_group, topic, partition, next_offset) \
                     VALUES (?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?"
                ),
            )
            .await?,
            select_mark: prepare(
                "replay mark read",
                format!(
                    "SELECT next_offset FROM {ks}.replay_marks \
                     WHERE consumer_group = ? AND topic = ? AND partition = ?"
                ),
            )
            .await?,
            session,
            group: group.to_owned(),
            ttl_secs,
        })
    }

    /// Stores the output of request `id` (message fingerprint `fingerprint`).
    pub async fn put(
        &self,
        id: &str,
        fingerprint: u64,
        output: &ExecOutput,
    ) -> Result<(), FeatureStoreError> {
        let json = serde_json::to_string(output)
            .map_err(|e| FeatureStoreError::invalid("replay result", e.to_string()))?;
        self.put_json(id, fingerprint, &json).await
    }

    /// [`CqlReplay::put`] of an output already serialised (as JSON, from an [`ExecOutput`]).
    pub async fn put_json(
        &self,
        id: &str,
        fingerprint: u64,
        json: &str,
    ) -> Result<(), FeatureStoreError> {
        const OPERATION: &str = "replay result write";
        self.session
            .execute_unpaged(
                &self.insert_result,
                (
                    &self.group,
                    id,
                    fingerprint_column(fingerprint),
                    json,
                    self.ttl_secs,
                ),
            )
            .await
            .map_err(|e| FeatureStoreError::query(OPERATION, e))?;
        Ok(())
    }

    /// The stored output of request `id`, if its fingerprint is `fingerprint`.
    pub async fn get(
        &self,
        id: &str,
        fingerprint: u64,
    ) -> Result<Option<ExecOutput>, FeatureStoreError> {
        const OPERATION: &str = "replay result read";
        let rows = self
            .session
            .execute_unpaged(&self.select_result, (&self.group, id))
            .await
            .map_err(|e| FeatureStoreError::query(OPERATION, e))?
            .into_rows_result()
            .map_err(|e| FeatureStoreError::decode(OPERATION, e))?;
        let row = rows
            .maybe_first_row::<(Option<i64>, Option<String>)>()
            .map_err(|e| FeatureStoreError::decode(OPERATION, e))?;
        let Some((Some(stored), Some(json))) = row else {
            return Ok(None);
        };
        if stored != fingerprint_column(fingerprint) {
            return Ok(None);
        }
        serde_json::from_str(&json).map(Some).map_err(|e| {
            FeatureStoreError::decode(
                OPERATION,
                format!("output_json of request {id} is not a stored output: {e}"),
            )
        })
    }

    /// Records that outputs of `topic`/`partition` below `next_offset` may be stored.
    pub async fn set_mark(
        &self,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), FeatureStoreError> {
        const OPERATION: &str = "replay mark write";
        self.session
            .execute_unpaged(
                &self.insert_mark,
                (
                    &self.group,
                    topic,
                    partition,
                    next_offset,
                    self.ttl_secs,
                    next_offset,
                ),
            )
            .await
            .map_err(|e| FeatureStoreError::query(OPERATION, e))?;
        Ok(())
    }

    /// The offset below which outputs of `topic`/`partition` may be stored (0 when none are).
    pub async fn mark(&self, topic: &str, partition: i32) -> Result<i64, FeatureStoreError> {
        const OPERATION: &str = "replay mark read";
        let rows = self
            .session
            .execute_unpaged(&self.select_mark, (&self.group, topic, partition))
            .await
            .map_err(|e| FeatureStoreError::query(OPERATION, e))?
            .into_rows_result()
            .map_err(|e| FeatureStoreError::decode(OPERATION, e))?;
        let row = rows
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(|e| FeatureStoreError::decode(OPERATION, e))?;
        Ok(row.and_then(|(offset,)| offset).unwrap_or(0))
    }
}

/// A fingerprint as the signed bigint column holds it (the same 64 bits).
fn fingerprint_column(fingerprint: u64) -> i64 {
    i64::from_ne_bytes(fingerprint.to_ne_bytes())
}
