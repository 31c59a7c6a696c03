//! [`PostgresBackend`] and [`MysqlBackend`]: the feature store on PostgreSQL and on MySQL or
//! MariaDB, through `sqlx` (a pool of connections, each statement prepared once per
//! connection and cached). Both are written once, by [`sql_backend!`]; only the SQL text
//! differs ([`Statements`]). The semantics are those of the CQL backend (see
//! [`super::FeatureBackend`] and `scylla.rs`).
//!
//! # Layout
//!
//! `schemas/sql/postgres/` and `schemas/sql/mysql/`, one file per schema version, applied at
//! start-up when `feature_store.create_schema` is on, in order, each once: applied versions are
//! recorded in `inferflow_schema_migrations`, and instances starting together take turns through
//! a database lock (`pg_advisory_lock`, `GET_LOCK`). Rows are keyed by the SHA-256 of the
//! length-prefixed key parts ([`key_hash`]), since a key may be longer than a B-tree index
//! entry holds; the parts are kept beside it. Values are the compact JSON text written, in a
//! text column compared byte by byte (`COLLATE "C"`, `utf8mb4_bin`): not JSONB or MySQL's
//! JSON, which respell numbers (JSONB writes `1e400` as 401 digits and `-0` as `0`; MySQL's
//! JSON rounds `12345678901234567890123` to a double), where inferflow returns numbers exactly
//! as written.
//!
//! # Highest version wins, in one statement
//!
//! A write is an upsert (`INSERT … ON CONFLICT DO UPDATE … WHERE` on PostgreSQL, `INSERT … ON
//! DUPLICATE KEY UPDATE` on MySQL) that replaces the stored row only with a higher version, or
//! — for the same version, while it has not expired — keeps the greater values (compared as
//! text, byte by byte) and the later `updated_at`: the rule of [`super::model::same_version_wins`],
//! as the other backends apply it. The database applies it atomically under the row's lock, so
//! concurrent writes of one feature converge whatever their order, and a repeated write
//! changes nothing. The history row (`feature_history`, keyed by the version too) is written by
//! the same kind of upsert, concurrently, on another connection of the pool; a failed write
//! returns an error and is safe to repeat.
//!
//! # TTLs and the purge
//!
//! A TTL counts from the write, by this instance's clock: rows store `expires_at_ms`, and reads
//! skip rows past it (current values and history alike). An expired current value stays in its
//! table, so its version still outranks late writes of older versions, until the purge deletes
//! it [`super::TOMBSTONE_GRACE_SECS`] after it expired (as an expired cell is kept on a CQL
//! database until `gc_grace_seconds`); expired history rows are purged at once. The purge runs
//! every [`PURGE_INTERVAL`] in the background, and on request ([`PostgresBackend::purge_expired`]),
//! in transactions of [`PURGE_BATCH`] rows found through an index on `expires_at_ms`. On
//! PostgreSQL it skips rows a writer holds (`FOR UPDATE SKIP LOCKED`), so it never waits for a
//! write and a write waits at most for one small batch; on MySQL the batch is a
//! `DELETE … LIMIT`.
//!
//! # Timeouts
//!
//! The pool holds at most `max_connections` connections and waits at most
//! `connect_timeout_ms` for one; each statement is given `feature_store.request_timeout_ms`.

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use super::embedded::TOMBSTONE_GRACE_SECS;
use super::model::{
    unix_now_ms, validate_key, validate_part, validate_vector_key, validate_version,
};
use super::{
    ConnectError, Feature, FeatureGroup, FeatureStoreConfig, FeatureStoreError, FeatureUpdate,
    SqlConfig,
};

/// How often the background purge runs.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// Rows deleted per purge transaction at most.
pub const PURGE_BATCH: i64 = 1000;

/// The lock that serialises schema migrations between instances (a PostgreSQL advisory lock
/// key; MySQL's `GET_LOCK` takes its name).
const MIGRATION_LOCK: i64 = 0x696e_6665_7266_6c77; // "inferflw"

/// The SHA-256 of the key parts, each preceded by its length (big-endian `u32`), so that
/// `("ab", "c")` and `("a", "bc")` differ: the primary key of a feature's rows.
pub fn key_hash(parts: &[&str]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    for part in parts {
        // Parts are at most MAX_KEY_BYTES long (validated), far below u32::MAX.
        hasher.update(u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().to_vec()
}

/// One schema version of a SQL dialect.
#[derive(Debug, Clone, Copy)]
pub struct SqlMigration {
    /// The version number, from 1.
    pub version: u32,
    /// The statements, separated by `;` at the end of a line.
    pub sql: &'static str,
}

/// PostgreSQL's schema versions, oldest first.
pub const POSTGRES_MIGRATIONS: &[SqlMigration] = &[SqlMigration {
    version: 1,
    sql: include_str!("../../schemas/sql/postgres/v1.sql"),
}];

/// MySQL's schema versions, oldest first.
pub const MYSQL_MIGRATIONS: &[SqlMigration] = &[SqlMigration {
    version: 1,
    sql: include_str!("../../schemas/sql/mysql/v1.sql"),
}];

/// The statements of one migration file: comments dropped, split at `;` ending a line.
fn statements_of(sql: &str) -> Vec<String> {
    let text: String = sql
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(";\n")
        .map(|s| s.trim().trim_end_matches(';').trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The SQL text of one dialect.
#[derive(Debug)]
struct Statements {
    /// For messages: "PostgreSQL" or "MySQL".
    database: &'static str,
    /// The config section, e.g. `feature_store.postgres`.
    key: &'static str,
    migrations: &'static [SqlMigration],
    create_migrations: String,
    select_migrations: String,
    record_migration: String,
    lock: String,
    unlock: String,
    upsert_current: String,
    upsert_history: String,
    /// How many times the upserts take the current time after the eight values.
    now_binds: usize,
    select_current: String,
    select_history: String,
    insert_group: String,
    select_group: String,
    select_latest_group: String,
    purge_current: String,
    purge_history: String,
}

const COLUMNS: &str =
    "entity_type, entity_id, name, values_json, version, updated_at_ms, expires_at_ms";
const GROUP_COLUMNS: &str = "name, version, entity_type, features_json, description";
/// MySQL's select lists: the binary-collated text columns converted, since a `_bin` collation
/// marks them binary on the wire and they would not decode as strings.
const MYSQL_COLUMNS: &str = "CONVERT(entity_type USING utf8mb4), CONVERT(entity_id USING utf8mb4), \
     CONVERT(name USING utf8mb4), CONVERT(values_json USING utf8mb4), version, updated_at_ms, expires_at_ms";
const MYSQL_GROUP_COLUMNS: &str = "CONVERT(name USING utf8mb4), version, CONVERT(entity_type USING utf8mb4), \
     CONVERT(features_json USING utf8mb4), CONVERT(description USING utf8mb4)";
const MIGRATIONS_TABLE: &str = "inferflow_schema_migrations";

impl Statements {
    fn postgres() -> Self {
        let upsert = |table: &str, conflict: &str| {
            format!(
                "INSERT INTO {table} AS f (key_hash, {COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT ({conflict}) DO UPDATE SET \
                 values_json = CASE WHEN EXCLUDED.version > f.version OR EXCLUDED.values_json > f.values_json \
                   THEN EXCLUDED.values_json ELSE f.values_json END, \
                 expires_at_ms = CASE WHEN EXCLUDED.version > f.version OR EXCLUDED.values_json > f.values_json \
                   THEN EXCLUDED.expires_at_ms ELSE f.expires_at_ms END, \
                 updated_at_ms = CASE WHEN EXCLUDED.version > f.version THEN EXCLUDED.updated_at_ms \
                   ELSE GREATEST(f.updated_at_ms, EXCLUDED.updated_at_ms) END, \
                 version = EXCLUDED.version \
                 WHERE EXCLUDED.version > f.version OR (EXCLUDED.version = f.version \
                   AND (f.expires_at_ms IS NULL OR f.expires_at_ms > $9) \
                   AND (EXCLUDED.values_json > f.values_json OR EXCLUDED.updated_at_ms > f.updated_at_ms))"
            )
        };
        let purge = |table: &str, key: &str| {
            format!(
                "DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} \
                 WHERE expires_at_ms <= $1 LIMIT {PURGE_BATCH} FOR UPDATE SKIP LOCKED)"
            )
        };
        Statements {
            database: "PostgreSQL",
            key: "feature_store.postgres",
            migrations: POSTGRES_MIGRATIONS,
            create_migrations: format!(
                "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)"
            ),
            select_migrations: format!("SELECT version FROM {MIGRATIONS_TABLE}"),
            record_migration: format!(
                "INSERT INTO {MIGRATIONS_TABLE} (version, applied_at_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            ),
            lock: format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"),
            unlock: format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"),
            upsert_current: upsert("features", "key_hash"),
            upsert_history: upsert("feature_history", "key_hash, version"),
            now_binds: 1,
            select_current: format!(
                "SELECT {COLUMNS} FROM features WHERE key_hash = $1 AND (expires_at_ms IS NULL OR expires_at_ms > $2)"
            ),
            select_history: format!(
                "SELECT {COLUMNS} FROM feature_history WHERE key_hash = $1 AND version = $2 \
                 AND (expires_at_ms IS NULL OR expires_at_ms > $3)"
            ),
            insert_group: format!(
                "INSERT INTO feature_groups (name_hash, {GROUP_COLUMNS}, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING"
            ),
            select_group: format!(
                "SELECT {GROUP_COLUMNS} FROM feature_groups WHERE name_hash = $1 AND version = $2"
            ),
            select_latest_group: format!(
                "SELECT {GROUP_COLUMNS} FROM feature_groups WHERE name_hash = $1 ORDER BY version DESC LIMIT 1"
            ),
            purge_current: purge("features", "key_hash"),
            purge_history: purge("feature_history", "key_hash, version"),
        }
    }

    fn mysql() -> Self {
        // MySQL evaluates the assignments left to right, each seeing the ones before: the
        // conditions are written so that the columns they read are still the old ones, or
        // (expires_at_ms, before values_json) changed only when the same condition holds
        // again afterwards. `version` comes last.
        let live = "(expires_at_ms IS NULL OR expires_at_ms > ?)";
        let wins = format!(
            "(VALUES(version) > version OR (VALUES(version) = version AND {live} \
             AND VALUES(values_json) > values_json))"
        );
        let upsert = |table: &str| {
            format!(
                "INSERT INTO {table} (key_hash, {COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
                 ON DUPLICATE KEY UPDATE \
                 updated_at_ms = IF(VALUES(version) > version, VALUES(updated_at_ms), \
                   IF(VALUES(version) = version AND {live}, GREATEST(updated_at_ms, VALUES(updated_at_ms)), updated_at_ms)), \
                 expires_at_ms = IF({wins}, VALUES(expires_at_ms), expires_at_ms), \
                 values_json = IF({wins}, VALUES(values_json), values_json), \
                 version = GREATEST(version, VALUES(version))"
            )
        };
        let purge = |table: &str| {
            format!(
                "DELETE FROM {table} WHERE expires_at_ms <= ? ORDER BY expires_at_ms LIMIT {PURGE_BATCH}"
            )
        };
        Statements {
            database: "MySQL",
            key: "feature_store.mysql",
            migrations: MYSQL_MIGRATIONS,
            create_migrations: format!(
                "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL) ENGINE = InnoDB"
            ),
            select_migrations: format!("SELECT version FROM {MIGRATIONS_TABLE}"),
            record_migration: format!(
                "INSERT INTO {MIGRATIONS_TABLE} (version, applied_at_ms) VALUES (?, ?) \
                 ON DUPLICATE KEY UPDATE version = version"
            ),
            lock: format!("SELECT GET_LOCK('inferflow_{MIGRATION_LOCK}', 60)"),
            unlock: format!("SELECT RELEASE_LOCK('inferflow_{MIGRATION_LOCK}')"),
            upsert_current: upsert("features"),
            upsert_history: upsert("feature_history"),
            now_binds: 3,
            select_current: format!(
                "SELECT {MYSQL_COLUMNS} FROM features WHERE key_hash = ? AND (expires_at_ms IS NULL OR expires_at_ms > ?)"
            ),
            select_history: format!(
                "SELECT {MYSQL_COLUMNS} FROM feature_history WHERE key_hash = ? AND version = ? \
                 AND (expires_at_ms IS NULL OR expires_at_ms > ?)"
            ),
            insert_group: format!(
                "INSERT INTO feature_groups (name_hash, {GROUP_COLUMNS}, created_at_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE version = version"
            ),
            select_group: format!(
                "SELECT {MYSQL_GROUP_COLUMNS} FROM feature_groups WHERE name_hash = ? AND version = ?"
            ),
            select_latest_group: format!(
                "SELECT {MYSQL_GROUP_COLUMNS} FROM feature_groups WHERE name_hash = ? ORDER BY version DESC LIMIT 1"
            ),
            purge_current: purge("features"),
            purge_history: purge("feature_history"),
        }
    }
}

/// PostgreSQL's batch read: every key in one array parameter.
fn postgres_select_many(_: usize) -> String {
    format!(
        "SELECT {COLUMNS} FROM features WHERE key_hash = ANY($1) AND (expires_at_ms IS NULL OR expires_at_ms > $2)"
    )
}

/// MySQL's batch read: an `IN` list of `n` placeholders. Callers round `n` up to a power of two
/// (repeating a key), so a few statements serve every length and stay in the statement cache.
fn mysql_select_many(n: usize) -> String {
    let marks = vec!["?"; n].join(", ");
    format!(
        "SELECT {MYSQL_COLUMNS} FROM features WHERE key_hash IN ({marks}) AND (expires_at_ms IS NULL OR expires_at_ms > ?)"
    )
}

type PgQueryAs<'q> =
    sqlx::query::QueryAs<'q, sqlx::Postgres, FeatureRow, sqlx::postgres::PgArguments>;
type MySqlQueryAs<'q> =
    sqlx::query::QueryAs<'q, sqlx::MySql, FeatureRow, sqlx::mysql::MySqlArguments>;

fn bind_postgres_keys<'q>(query: PgQueryAs<'q>, keys: &'q [Vec<u8>]) -> PgQueryAs<'q> {
    query.bind(keys)
}

fn bind_mysql_keys<'q>(query: MySqlQueryAs<'q>, keys: &'q [Vec<u8>]) -> MySqlQueryAs<'q> {
    keys.iter().fold(query, |q, key| q.bind(key.as_slice()))
}

/// The keys to bind for a batch read of `keys`: as they are on PostgreSQL; on MySQL padded to a
/// power of two with copies of the first.
fn postgres_pad(keys: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    keys
}

fn mysql_pad(mut keys: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let target = keys.len().next_power_of_two();
    if let Some(first) = keys.first().cloned() {
        keys.resize(target, first);
    }
    keys
}

/// What both upserts of one write bind.
struct UpsertRow<'a> {
    key: &'a [u8],
    update: &'a FeatureUpdate,
    values_json: &'a str,
    version: i64,
    updated_at: i64,
    now: i64,
}

/// A feature row: entity_type, entity_id, name, values_json, version, updated_at_ms,
/// expires_at_ms.
type FeatureRow = (String, String, String, String, i64, i64, Option<i64>);

/// The feature of a row read at `now_ms`.
fn decode_feature(
    operation: &'static str,
    row: FeatureRow,
    now_ms: u64,
) -> Result<Feature, FeatureStoreError> {
    let (entity_type, entity_id, name, values_json, version, updated_at, expires_at) = row;
    let values: Map<String, Value> = serde_json::from_str(&values_json).map_err(|e| {
        FeatureStoreError::decode(
            operation,
            format!("values_json of {entity_type}/{entity_id}/{name} is not a JSON object: {e}"),
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
    // The time left, rounded up to whole seconds (as the embedded backend reports it).
    let ttl_secs = expires_at.map(|at| {
        let left = u64::try_from(at).unwrap_or(0).saturating_sub(now_ms);
        u32::try_from(left.div_ceil(1000)).unwrap_or(u32::MAX)
    });
    Ok(Feature {
        version: non_negative("version", version)?,
        updated_at_ms: non_negative("updated_at_ms", updated_at)?,
        ttl_secs,
        entity_type,
        entity_id,
        name,
        values,
    })
}

/// A group row: name, version, entity_type, features_json, description.
type GroupRow = (String, i64, String, String, String);

fn decode_group(operation: &'static str, row: GroupRow) -> Result<FeatureGroup, FeatureStoreError> {
    let (name, version, entity_type, features_json, description) = row;
    let features: Vec<String> = serde_json::from_str(&features_json).map_err(|e| {
        FeatureStoreError::decode(operation, format!("features of group {name}: {e}"))
    })?;
    let version = u32::try_from(version).map_err(|_| {
        FeatureStoreError::decode(operation, format!("group version {version} out of range"))
    })?;
    Ok(FeatureGroup {
        name,
        version,
        entity_type,
        features,
        description,
    })
}

/// The expiry of a write's current row and of its history row (the earlier of the feature's
/// TTL and the retention; `retention_ms` 0 keeps history as long as the feature).
fn expiries(update: &FeatureUpdate, now_ms: u64, retention_ms: u64) -> (Option<i64>, Option<i64>) {
    let to_i64 = |ms: u64| i64::try_from(ms).unwrap_or(i64::MAX);
    let current = update
        .ttl_secs
        .map(|ttl| now_ms.saturating_add(u64::from(ttl) * 1000));
    let history = match (current, retention_ms) {
        (at, 0) => at,
        (None, retention) => Some(now_ms.saturating_add(retention)),
        (Some(at), retention) => Some(at.min(now_ms.saturating_add(retention))),
    };
    (current.map(to_i64), history.map(to_i64))
}

/// Runs a statement with the request timeout, turning its failure into a
/// [`FeatureStoreError`].
async fn timed<T>(
    database: &'static str,
    operation: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, FeatureStoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result.map_err(|source| FeatureStoreError::Sql {
            database,
            operation,
            source: Box::new(source),
        }),
        Err(_) => Err(FeatureStoreError::SqlTimeout {
            database,
            operation,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }),
    }
}

/// The connection error for `cfg`'s DSN: the server, user and database it names (password
/// redacted), and `reason` with any occurrence of the password taken out.
fn connect_error(statements: &Statements, cfg: &SqlConfig, reason: &str) -> FeatureStoreError {
    let url = cfg.url.as_ref().map(|u| u.redacted()).unwrap_or_default();
    let mut reason = reason.to_owned();
    if let Some(url) = &cfg.url {
        for password in dsn_passwords(url.expose()) {
            reason = reason.replace(&password, crate::secret::REDACTED);
        }
    }
    FeatureStoreError::from(ConnectError::Sql {
        database: statements.database,
        key: statements.key,
        url,
        reason,
    })
}

/// The passwords a DSN holds (in its user-info part or a `password=` parameter), as written
/// and percent-decoded, longest first: what a driver's message could repeat.
fn dsn_passwords(url: &str) -> Vec<String> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let in_query = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(name, _)| name.eq_ignore_ascii_case("password"))
        .map(|(_, value)| value);
    let mut found: Vec<String> = crate::secret::url_password(url)
        .into_iter()
        .chain(in_query)
        .flat_map(|p| [p.to_owned(), percent_decode(p)])
        .filter(|p| !p.is_empty())
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.len()));
    found.dedup();
    found
}

/// `text` with its `%XX` escapes decoded (invalid ones kept as written; bytes that do not
/// form UTF-8 replaced).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a failed connection attempt may succeed if repeated: the server refused or dropped
/// the connection (it may be starting), or said so itself. A malformed DSN, wrong credentials
/// or a missing database fail the same way every time.
fn transient_connect_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(e) => e.is_transient_in_connect_phase(),
        _ => false,
    }
}

/// Writes one backend type over a sqlx database: the struct, its connection and schema set-up,
/// the six operations of [`super::FeatureBackend`] and the purge.
macro_rules! sql_backend {
    (
        $(#[$doc:meta])*
        $backend:ident,
        db: $db:ty,
        pool_options: $pool_options:ty,
        connect_options: $connect_options:ty,
        connection: $conn:ty,
        statements: $statements:expr,
        section: $section:ident,
        select_many: $select_many:path,
        pad: $pad:path,
        bind_keys: $bind_keys:path $(,)?
    ) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $backend {
            pool: sqlx::Pool<$db>,
            sql: Arc<Statements>,
            request_timeout: Duration,
            history_retention_ms: u64,
            /// Stops the background purge when the backend is dropped.
            stop: CancellationToken,
        }

        impl Drop for $backend {
            fn drop(&mut self) {
                self.stop.cancel();
            }
        }

        impl $backend {
            /// Opens the pool on the configured DSN (failing if the server does not answer or
            /// refuses the credentials), applies the schema if `feature_store.create_schema` is
            /// on, and starts the background purge.
            pub async fn connect(cfg: &FeatureStoreConfig) -> Result<Self, FeatureStoreError> {
                let sql = Arc::new($statements);
                let section = &cfg.$section;
                let Some(url) = &section.url else {
                    return Err(FeatureStoreError::invalid(
                        "configuration",
                        format!("{}.url is not set", sql.key),
                    ));
                };
                let options = <$connect_options>::from_str(url.expose())
                    .map_err(|e| connect_error(&sql, section, &e.to_string()))?;
                let timeout = Duration::from_millis(section.connect_timeout_ms.get());
                Self::probe(&sql, section, &options, timeout).await?;
                let pool = <$pool_options>::new()
                    .max_connections(section.max_connections.get())
                    .acquire_timeout(timeout)
                    .connect_with(options)
                    .await
                    .map_err(|e| connect_error(&sql, section, &e.to_string()))?;
                let backend = $backend {
                    pool,
                    sql,
                    request_timeout: Duration::from_millis(cfg.request_timeout_ms.get()),
                    history_retention_ms: cfg.history_retention_secs.saturating_mul(1000),
                    stop: CancellationToken::new(),
                };
                if cfg.create_schema {
                    backend.migrate().await?;
                }
                backend.spawn_purge();
                Ok(backend)
            }

            /// Opens one connection outside the pool and closes it, retrying while the server
            /// refuses connections (it may be starting) for at most `timeout`: the pool would
            /// retry the same way but then report only that it timed out, where this says why
            /// (refused, unknown host, wrong password, no such database).
            async fn probe(
                sql: &Statements,
                section: &SqlConfig,
                options: &$connect_options,
                timeout: Duration,
            ) -> Result<(), FeatureStoreError> {
                use sqlx::{ConnectOptions as _, Connection as _};
                let deadline = tokio::time::Instant::now() + timeout;
                let mut backoff = Duration::from_millis(10);
                let mut last = None;
                loop {
                    match tokio::time::timeout_at(deadline, options.connect()).await {
                        Ok(Ok(conn)) => {
                            // Only a courtesy to the server: the connection was good.
                            let _ = conn.close().await;
                            return Ok(());
                        }
                        Ok(Err(e)) if transient_connect_error(&e)
                            && tokio::time::Instant::now() + backoff < deadline =>
                        {
                            last = Some(e.to_string());
                        }
                        Ok(Err(e)) => return Err(connect_error(sql, section, &e.to_string())),
                        Err(_) => {
                            let waited = format!(
                                "no connection within {} ms ({}.connect_timeout_ms)",
                                timeout.as_millis(),
                                sql.key
                            );
                            let reason = match last {
                                Some(last) => format!("{waited}; the last attempt: {last}"),
                                None => waited,
                            };
                            return Err(connect_error(sql, section, &reason));
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }

            /// Applies the schema versions not yet recorded, in order, holding the migration
            /// lock on one connection; the whole takes at most a minute (or the request
            /// timeout, if longer).
            async fn migrate(&self) -> Result<(), FeatureStoreError> {
                let database = self.sql.database;
                let slow = self.request_timeout.max(Duration::from_secs(60));
                let mut conn = timed(database, "schema migration", slow, self.pool.acquire()).await?;
                let conn: &mut $conn = &mut conn;
                match tokio::time::timeout(slow, self.migrate_on(conn)).await {
                    Ok(result) => result,
                    Err(_) => Err(FeatureStoreError::SqlTimeout {
                        database,
                        operation: "schema migration",
                        timeout_ms: u64::try_from(slow.as_millis()).unwrap_or(u64::MAX),
                    }),
                }
            }

            async fn migrate_on(
                &self,
                conn: &mut $conn,
            ) -> Result<(), FeatureStoreError> {
                let sql = &self.sql;
                let failed = |source: sqlx::Error| FeatureStoreError::Sql {
                    database: sql.database,
                    operation: "schema migration",
                    source: Box::new(source),
                };
                sqlx::query(&sql.lock).execute(&mut *conn).await.map_err(failed)?;
                let mut result = Ok(());
                let applied: Vec<i64> = match sqlx::query(&sql.create_migrations).execute(&mut *conn).await {
                    Ok(_) => sqlx::query_scalar(&sql.select_migrations)
                        .fetch_all(&mut *conn)
                        .await
                        .unwrap_or_else(|e| {
                            result = Err(failed(e));
                            Vec::new()
                        }),
                    Err(e) => {
                        result = Err(failed(e));
                        Vec::new()
                    }
                };
                for migration in sql.migrations {
                    if result.is_err() || applied.contains(&i64::from(migration.version)) {
                        continue;
                    }
                    for statement in statements_of(migration.sql) {
                        if let Err(e) = sqlx::query(&statement).persistent(false).execute(&mut *conn).await {
                            result = Err(FeatureStoreError::SqlSchema {
                                database: sql.database,
                                version: migration.version,
                                statement: statement.chars().take(80).collect(),
                                reason: e.to_string(),
                            });
                            break;
                        }
                    }
                    if result.is_err() {
                        break;
                    }
                    if let Err(e) = sqlx::query(&sql.record_migration)
                        .bind(i64::from(migration.version))
                        .bind(i64::try_from(unix_now_ms()).unwrap_or(i64::MAX))
                        .execute(&mut *conn)
                        .await
                    {
                        result = Err(failed(e));
                        break;
                    }
                    tracing::info!(
                        database = sql.database,
                        version = migration.version,
                        "feature store: applied a schema version"
                    );
                }
                // Released whatever happened; the lock also ends with the connection.
                let unlocked = sqlx::query(&sql.unlock).execute(&mut *conn).await.map_err(failed);
                result.and(unlocked.map(|_| ()))
            }

            fn spawn_purge(&self) {
                let purger = Purger {
                    pool: self.pool.clone(),
                    sql: self.sql.clone(),
                    request_timeout: self.request_timeout,
                };
                let stop = self.stop.clone();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(PURGE_INTERVAL);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = tick.tick() => {}
                            () = stop.cancelled() => return,
                        }
                        if let Err(err) = purger.purge(unix_now_ms()).await {
                            tracing::warn!(error = %err, "feature store: purging expired rows failed; will retry");
                        }
                    }
                });
            }

            /// Deletes expired history rows and current values expired more than
            /// [`TOMBSTONE_GRACE_SECS`] ago, in batches of [`PURGE_BATCH`]; returns how many
            /// rows went. The background purge does this every [`PURGE_INTERVAL`].
            pub async fn purge_expired(&self) -> Result<u64, FeatureStoreError> {
                Purger {
                    pool: self.pool.clone(),
                    sql: self.sql.clone(),
                    request_timeout: self.request_timeout,
                }
                .purge(unix_now_ms())
                .await
            }

            /// The connection pool, for callers that share it (tests, tools).
            pub fn pool(&self) -> &sqlx::Pool<$db> {
                &self.pool
            }

            async fn fetch_features<'q>(
                &self,
                operation: &'static str,
                query: sqlx::query::QueryAs<'q, $db, FeatureRow, <$db as sqlx::Database>::Arguments<'q>>,
                now_ms: u64,
            ) -> Result<Vec<Feature>, FeatureStoreError> {
                let rows = timed(self.sql.database, operation, self.request_timeout, query.fetch_all(&self.pool)).await?;
                rows.into_iter()
                    .map(|row| decode_feature(operation, row, now_ms))
                    .collect()
            }

            async fn put(&self, update: &FeatureUpdate) -> Result<(), FeatureStoreError> {
                const OPERATION: &str = "feature write";
                update.validate()?;
                let values_json = serde_json::to_string(&update.values)
                    .map_err(|e| FeatureStoreError::invalid("feature update", e.to_string()))?;
                let key = key_hash(&[&update.entity_type, &update.entity_id, &update.name]);
                let now = unix_now_ms();
                let (expires, history_expires) = expiries(update, now, self.history_retention_ms);
                // validate() bounds both; the conversions cannot fail.
                let version = i64::try_from(update.version).unwrap_or(i64::MAX);
                let updated_at = i64::try_from(update.updated_at_ms).unwrap_or(i64::MAX);
                let now = i64::try_from(now).unwrap_or(i64::MAX);
                let row = UpsertRow {
                    key: &key,
                    update,
                    values_json: &values_json,
                    version,
                    updated_at,
                    now,
                };
                let current = self.upsert(OPERATION, &self.sql.upsert_current, &row, expires);
                let history = self.upsert(OPERATION, &self.sql.upsert_history, &row, history_expires);
                futures::try_join!(current, history)?;
                Ok(())
            }

            /// Runs one of the two upserts of a write.
            async fn upsert(
                &self,
                operation: &'static str,
                sql: &str,
                row: &UpsertRow<'_>,
                expires: Option<i64>,
            ) -> Result<(), FeatureStoreError> {
                let mut query = sqlx::query(sql)
                    .bind(row.key)
                    .bind(row.update.entity_type.as_str())
                    .bind(row.update.entity_id.as_str())
                    .bind(row.update.name.as_str())
                    .bind(row.values_json)
                    .bind(row.version)
                    .bind(row.updated_at)
                    .bind(expires);
                for _ in 0..self.sql.now_binds {
                    query = query.bind(row.now);
                }
                timed(self.sql.database, operation, self.request_timeout, query.execute(&self.pool)).await?;
                Ok(())
            }

            async fn get(
                &self,
                entity_type: &str,
                entity_id: &str,
                name: &str,
            ) -> Result<Option<Feature>, FeatureStoreError> {
                validate_key(entity_type, entity_id, name)?;
                let now = unix_now_ms();
                let query = sqlx::query_as(&self.sql.select_current)
                    .bind(key_hash(&[entity_type, entity_id, name]))
                    .bind(i64::try_from(now).unwrap_or(i64::MAX));
                Ok(self.fetch_features("feature read", query, now).await?.pop())
            }

            async fn get_at_version(
                &self,
                entity_type: &str,
                entity_id: &str,
                name: &str,
                version: u64,
            ) -> Result<Option<Feature>, FeatureStoreError> {
                validate_key(entity_type, entity_id, name)?;
                validate_version(version)?;
                let now = unix_now_ms();
                let query = sqlx::query_as(&self.sql.select_history)
                    .bind(key_hash(&[entity_type, entity_id, name]))
                    .bind(i64::try_from(version).unwrap_or(i64::MAX))
                    .bind(i64::try_from(now).unwrap_or(i64::MAX));
                let history = self.fetch_features("feature history read", query, now).await?.pop();
                super::history_or_current(history, version, self.get(entity_type, entity_id, name)).await
            }

            async fn get_many(
                &self,
                entity_type: &str,
                entity_id: &str,
                names: &[&str],
            ) -> Result<Vec<Option<Feature>>, FeatureStoreError> {
                validate_vector_key(entity_type, entity_id, names)?;
                if names.is_empty() {
                    return Ok(Vec::new());
                }
                let keys: Vec<Vec<u8>> = names
                    .iter()
                    .map(|name| key_hash(&[entity_type, entity_id, name]))
                    .collect();
                let keys = $pad(keys);
                let sql = $select_many(keys.len());
                let now = unix_now_ms();
                // One round trip for every name.
                let query = $bind_keys(sqlx::query_as(&sql), &keys)
                    .bind(i64::try_from(now).unwrap_or(i64::MAX));
                let found = self.fetch_features("feature vector read", query, now).await?;
                Ok(names
                    .iter()
                    .map(|name| found.iter().find(|f| f.name == *name).cloned())
                    .collect())
            }

            async fn create_group(&self, group: &FeatureGroup) -> Result<(), FeatureStoreError> {
                const OPERATION: &str = "feature group write";
                group.validate()?;
                let features_json = serde_json::to_string(&group.features)
                    .map_err(|e| FeatureStoreError::invalid("feature group", e.to_string()))?;
                let query = sqlx::query(&self.sql.insert_group)
                    .bind(key_hash(&[&group.name]))
                    .bind(group.name.as_str())
                    .bind(i64::from(group.version))
                    .bind(group.entity_type.as_str())
                    .bind(features_json.as_str())
                    .bind(group.description.as_str())
                    .bind(i64::try_from(unix_now_ms()).unwrap_or(i64::MAX));
                timed(self.sql.database, OPERATION, self.request_timeout, query.execute(&self.pool)).await?;
                // The insert does nothing when the version exists: what is stored decides.
                // Versions never change once inserted, so this read is not racy.
                match self.get_group(&group.name, Some(group.version)).await? {
                    Some(stored) if stored == *group => Ok(()),
                    _ => Err(FeatureStoreError::GroupConflict {
                        name: group.name.clone(),
                        version: group.version,
                    }),
                }
            }

            async fn get_group(
                &self,
                name: &str,
                version: Option<u32>,
            ) -> Result<Option<FeatureGroup>, FeatureStoreError> {
                const OPERATION: &str = "feature group read";
                validate_part("feature group", "name", name)?;
                let query = match version {
                    Some(version) => sqlx::query_as(&self.sql.select_group)
                        .bind(key_hash(&[name]))
                        .bind(i64::from(version)),
                    None => sqlx::query_as(&self.sql.select_latest_group).bind(key_hash(&[name])),
                };
                let row: Option<GroupRow> =
                    timed(self.sql.database, OPERATION, self.request_timeout, query.fetch_optional(&self.pool)).await?;
                row.map(|row| decode_group(OPERATION, row)).transpose()
            }
        }

        super::forward_backend!($backend);
    };
}

/// What the purge needs, apart from the backend (which the background task must not keep
/// alive).
struct Purger<DB: sqlx::Database> {
    pool: sqlx::Pool<DB>,
    sql: Arc<Statements>,
    request_timeout: Duration,
}

macro_rules! purger {
    ($db:ty) => {
        impl Purger<$db> {
            async fn purge(&self, now_ms: u64) -> Result<u64, FeatureStoreError> {
                const OPERATION: &str = "purge";
                let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
                let grace = i64::try_from(TOMBSTONE_GRACE_SECS * 1000).unwrap_or(i64::MAX);
                let mut deleted = 0;
                for (sql, before) in [
                    (&self.sql.purge_history, now),
                    (&self.sql.purge_current, now.saturating_sub(grace)),
                ] {
                    loop {
                        let done = timed(
                            self.sql.database,
                            OPERATION,
                            self.request_timeout,
                            sqlx::query(sql).bind(before).execute(&self.pool),
                        )
                        .await?
                        .rows_affected();
                        deleted += done;
                        if done < PURGE_BATCH.unsigned_abs() {
                            break;
                        }
                    }
                }
                Ok(deleted)
            }
        }
    };
}

purger!(sqlx::Postgres);
purger!(sqlx::MySql);

sql_backend!(
    /// The feature store on PostgreSQL (`feature_store.backend = "postgres"`).
    PostgresBackend,
    db: sqlx::Postgres,
    pool_options: sqlx::postgres::PgPoolOptions,
    connect_options: sqlx::postgres::PgConnectOptions,
    connection: sqlx::PgConnection,
    statements: Statements::postgres(),
    section: postgres,
    select_many: postgres_select_many,
    pad: postgres_pad,
    bind_keys: bind_postgres_keys,
);

sql_backend!(
    /// The feature store on MySQL or MariaDB (`feature_store.backend = "mysql"`).
    MysqlBackend,
    db: sqlx::MySql,
    pool_options: sqlx::mysql::MySqlPoolOptions,
    connect_options: sqlx::mysql::MySqlConnectOptions,
    connection: sqlx::MySqlConnection,
    statements: Statements::mysql(),
    section: mysql,
    select_many: mysql_select_many,
    pad: mysql_pad,
    bind_keys: bind_mysql_keys,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hashes_are_unambiguous() {
        assert_ne!(key_hash(&["ab", "c"]), key_hash(&["a", "bc"]));
        assert_eq!(key_hash(&["a", "b"]), key_hash(&["a", "b"]));
        assert_eq!(key_hash(&["a"]).len(), 32);
    }

    #[test]
    fn dsn_passwords_are_found_as_written_and_decoded() {
        assert_eq!(
            dsn_passwords("postgres://u:p%40ss@h/db?password=q%2Fw&x=1"),
            ["p%40ss", "q%2Fw", "p@ss", "q/w"]
        );
        assert_eq!(dsn_passwords("mysql://u:pa/ss@h/db"), ["pa/ss"]);
        assert!(dsn_passwords("postgres://u@h/db").is_empty());
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
    }

    #[test]
    fn migration_files_split_into_statements() {
        for migration in POSTGRES_MIGRATIONS.iter().chain(MYSQL_MIGRATIONS) {
            let statements = statements_of(migration.sql);
            assert_eq!(
                statements.len(),
                if migration.sql.contains("INDEX IF NOT EXISTS") {
                    5
                } else {
                    3
                }
            );
            assert!(
                statements.iter().all(|s| s.starts_with("CREATE")),
                "{statements:#?}"
            );
        }
    }

    #[test]
    fn mysql_batch_reads_use_a_few_statement_shapes() {
        let keys = |n: usize| {
            (0..n)
                .map(|i| vec![u8::try_from(i).unwrap()])
                .collect::<Vec<_>>()
        };
        assert_eq!(mysql_pad(keys(3)).len(), 4);
        assert_eq!(mysql_pad(keys(4)).len(), 4);
        assert_eq!(mysql_pad(keys(250)).len(), 256);
        assert_eq!(mysql_pad(keys(3))[3], vec![0]);
    }
}

#[cfg(test)]
mod send_check {
    use super::*;
    fn is_send<T: Send>(_: T) {}
    #[allow(dead_code)]
    fn futures_are_send(cfg: &FeatureStoreConfig, b: &PostgresBackend, u: &FeatureUpdate) {
        is_send(PostgresBackend::connect(cfg));
        is_send(b.put(u));
        is_send(b.get("a", "b", "c"));
        is_send(b.get_many("a", "b", &[]));
        is_send(b.migrate());
    }
}
