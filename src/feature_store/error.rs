//! [`FeatureStoreError`]: why a feature store operation failed.

use std::path::PathBuf;

use scylla::errors::{DbError, ExecutionError, PrepareError, RequestAttemptError};

use super::ConnectError;

/// Why a feature store operation failed. Each message says what to check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FeatureStoreError {
    /// The input breaks a rule of the data model: an empty or oversized name, a version or TTL
    /// out of range, a malformed group. Retrying the same input fails the same way.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was being checked, e.g. `feature update`.
        what: &'static str,
        /// Which rule it breaks.
        reason: String,
    },

    /// The database could not be reached at start-up.
    #[error(transparent)]
    Connect(Box<ConnectError>),

    /// A statement creating or migrating the schema failed.
    #[error(
        "could not apply schema version {version} to keyspace {keyspace} (`{statement}`): {source}; check that the CQL user may create keyspaces and tables, or set feature_store.create_schema = false and apply schemas/cql/ by hand"
    )]
    Schema {
        /// The keyspace.
        keyspace: String,
        /// The schema version being applied.
        version: u32,
        /// The start of the failing statement.
        statement: String,
        /// The driver's error.
        #[source]
        source: Box<ExecutionError>,
    },

    /// A statement could not be prepared at start-up, usually because the schema is missing or
    /// older than this inferflow.
    #[error(
        "could not prepare the {statement} statement on keyspace {keyspace}: {source}; check that the schema exists and is current (feature_store.create_schema = true, or apply schemas/cql/ by hand) and that feature_store.keyspace is right"
    )]
    Prepare {
        /// Which statement.
        statement: &'static str,
        /// The keyspace.
        keyspace: String,
        /// The driver's error.
        #[source]
        source: Box<PrepareError>,
    },

    /// A read or write failed in the database or on the way to it.
    #[error(
        "CQL {operation} failed: {source}; check that the database is reachable and that enough replicas are up for feature_store.consistency"
    )]
    Query {
        /// Which operation, e.g. `feature write`.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: Box<ExecutionError>,
    },

    /// A result did not have the expected shape: a row that does not decode, stored JSON that
    /// is not an object, a negative version.
    #[error(
        "unexpected data from {operation}: {reason}; check that the data is written only by inferflow (and, on CQL, that the tables match schemas/cql/)"
    )]
    Decode {
        /// Which operation.
        operation: &'static str,
        /// What was wrong.
        reason: String,
    },

    /// The embedded database file could not be opened: it is locked by another process, not a
    /// database inferflow wrote, of a layout version this inferflow does not read, or the path is
    /// not usable.
    #[error("could not open the embedded feature store {}: {reason}", path.display())]
    EmbeddedOpen {
        /// The database file.
        path: PathBuf,
        /// Why, and what to do about it.
        reason: String,
    },

    /// A read or write of the embedded database failed.
    #[error(
        "embedded feature store {operation} failed: {source}; check that the disk holding feature_store.path is healthy and has room"
    )]
    Embedded {
        /// Which operation, e.g. `feature write`.
        operation: &'static str,
        /// redb's error.
        #[source]
        source: Box<redb::Error>,
    },

    /// A statement creating or migrating a SQL schema failed.
    #[error(
        "could not apply {database} schema version {version} (`{statement}`): {reason}; check that the user may create tables, or set feature_store.create_schema = false and apply schemas/sql/ by hand"
    )]
    SqlSchema {
        /// PostgreSQL or MySQL.
        database: &'static str,
        /// The schema version being applied.
        version: u32,
        /// The start of the failing statement.
        statement: String,
        /// The database's error.
        reason: String,
    },

    /// A statement on PostgreSQL or MySQL failed, in the database or on the way to it.
    #[error(
        "{database} {operation} failed: {source}; check that the database is reachable and the schema is current"
    )]
    Sql {
        /// PostgreSQL or MySQL.
        database: &'static str,
        /// Which operation, e.g. `feature write`.
        operation: &'static str,
        /// sqlx's error.
        #[source]
        source: Box<sqlx::Error>,
    },

    /// A statement on PostgreSQL or MySQL took longer than `feature_store.request_timeout_ms`.
    #[error(
        "{database} {operation} took longer than {timeout_ms} ms (feature_store.request_timeout_ms); check that the database is reachable and not overloaded"
    )]
    SqlTimeout {
        /// PostgreSQL or MySQL.
        database: &'static str,
        /// Which operation.
        operation: &'static str,
        /// The timeout.
        timeout_ms: u64,
    },

    /// A group version already exists with a different definition. Group versions never change.
    #[error(
        "feature group {name} version {version} already exists with a different definition; create a new version instead"
    )]
    GroupConflict {
        /// The group's name.
        name: String,
        /// The version.
        version: u32,
    },

    /// A feature is older than the `max_age` of the lookup, whose rule says to fail.
    #[error(
        "feature {name} is {age_ms} ms old, older than its max_age of {max_age_ms} ms; it needs a fresher update, or a rule that skips it or uses a default"
    )]
    Stale {
        /// The feature's name.
        name: String,
        /// Its age at the read.
        age_ms: u64,
        /// The rule's limit.
        max_age_ms: u64,
    },
}

impl From<ConnectError> for FeatureStoreError {
    fn from(err: ConnectError) -> Self {
        FeatureStoreError::Connect(Box::new(err))
    }
}

impl FeatureStoreError {
    /// An [`FeatureStoreError::Invalid`].
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        FeatureStoreError::Invalid {
            what,
            reason: reason.into(),
        }
    }

    /// A [`FeatureStoreError::Query`].
    pub(crate) fn query(operation: &'static str, source: ExecutionError) -> Self {
        FeatureStoreError::Query {
            operation,
            source: Box::new(source),
        }
    }

    /// A [`FeatureStoreError::Embedded`].
    pub(crate) fn embedded(operation: &'static str, source: redb::Error) -> Self {
        FeatureStoreError::Embedded {
            operation,
            source: Box::new(source),
        }
    }

    /// A [`FeatureStoreError::Decode`].
    pub(crate) fn decode(operation: &'static str, reason: impl ToString) -> Self {
        FeatureStoreError::Decode {
            operation,
            reason: reason.to_string(),
        }
    }

    /// Whether the same call may succeed later: the database was unreachable, overloaded, short
    /// of replicas or slow, or the embedded database's disk failed to read or write (it may be
    /// full). Invalid input, schema problems, conflicts, corrupt data and a database that did not
    /// open are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            FeatureStoreError::Connect(_) => true,
            FeatureStoreError::Embedded { source, .. } => matches!(**source, redb::Error::Io(_)),
            FeatureStoreError::SqlTimeout { .. } => true,
            FeatureStoreError::Sql { source, .. } => sql_is_retryable(source),
            FeatureStoreError::Query { source, .. } => match source.as_ref() {
                ExecutionError::BadQuery(_) | ExecutionError::PrepareError(_) => false,
                ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => !matches!(
                    db,
                    DbError::SyntaxError
                        | DbError::Invalid
                        | DbError::AlreadyExists { .. }
                        | DbError::FunctionFailure { .. }
                        | DbError::AuthenticationError
                        | DbError::Unauthorized
                        | DbError::ConfigError
                        | DbError::ProtocolError
                ),
                ExecutionError::LastAttemptError(
                    RequestAttemptError::SerializationError(_)
                    | RequestAttemptError::CqlRequestSerialization(_),
                ) => false,
                _ => true,
            },
            _ => false,
        }
    }
}

/// Whether a sqlx error may go away by itself: the connection or the pool failed, or the
/// database reports a transient condition (PostgreSQL SQLSTATE classes 08, 40, 53, 57 and 58;
/// MySQL's deadlock, lock wait timeout, too many connections, server gone or shutting down).
fn sql_is_retryable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class))
                || ["1040", "1053", "1205", "1213", "2006", "2013", "HY000"]
                    .contains(&code.as_ref())
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_trouble_is_retryable_and_bad_input_is_not() {
        let unavailable = FeatureStoreError::query(
            "feature read",
            ExecutionError::LastAttemptError(RequestAttemptError::DbError(
                DbError::Overloaded,
                "busy".into(),
            )),
        );
        assert!(unavailable.is_retryable());
        let timeout = FeatureStoreError::query(
            "feature read",
            ExecutionError::RequestTimeout(std::time::Duration::from_secs(2)),
        );
        assert!(timeout.is_retryable());
        let invalid_query = FeatureStoreError::query(
            "feature read",
            ExecutionError::LastAttemptError(RequestAttemptError::DbError(
                DbError::Invalid,
                "no".into(),
            )),
        );
        assert!(!invalid_query.is_retryable());
        assert!(!FeatureStoreError::invalid("feature key", "entity_id is empty").is_retryable());
        assert!(
            unavailable
                .to_string()
                .contains("feature_store.consistency"),
            "{unavailable}"
        );
    }
}
