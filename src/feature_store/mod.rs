//! The feature store's CQL connection.
//!
//! inferflow speaks CQL through the `scylla` driver. Production runs ScyllaDB; tests run a
//! single Cassandra node. Only CQL that both accept is used here: no Cassandra-only features.

use std::time::Duration;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::Consistency as CqlConsistency;

use crate::config::{Consistency, FeatureStoreConfig};

/// Why the feature store could not be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No contact point answered, or the handshake failed.
    #[error(
        "could not connect to the CQL database at {contact_points}: {source}; check feature_store.contact_points and that the database is running"
    )]
    Connect {
        /// The contact points tried.
        contact_points: String,
        /// The driver's error.
        #[source]
        source: scylla::errors::NewSessionError,
    },
}

impl From<Consistency> for CqlConsistency {
    fn from(c: Consistency) -> Self {
        match c {
            Consistency::One => CqlConsistency::One,
            Consistency::LocalOne => CqlConsistency::LocalOne,
            Consistency::Quorum => CqlConsistency::Quorum,
            Consistency::LocalQuorum => CqlConsistency::LocalQuorum,
            Consistency::All => CqlConsistency::All,
        }
    }
}

/// Opens a session with the configured contact points, credentials, consistency and timeout.
pub async fn connect(cfg: &FeatureStoreConfig) -> Result<Session, ConnectError> {
    let profile = ExecutionProfile::builder()
        .consistency(cfg.consistency.into())
        .request_timeout(Some(Duration::from_millis(cfg.request_timeout_ms.get())))
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&cfg.contact_points)
        .default_execution_profile_handle(profile.into_handle())
        .connection_timeout(Duration::from_secs(5));
    if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
        builder = builder.user(user, password.expose());
    }
    builder
        .build()
        .await
        .map_err(|source| ConnectError::Connect {
            contact_points: cfg.contact_points.join(","),
            source,
        })
}
