//! `[replay]`: results kept by request id. Every key is documented in `config/default.toml`.

use std::num::{NonZeroU64, NonZeroUsize};

use serde::{Deserialize, Serialize};

use crate::section::Section;

/// `[replay]`: results kept by request id, so a redelivered request is answered again without
/// calling its model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayConfig {
    /// Keep results and reuse them for redelivered requests.
    pub enabled: bool,
    /// Results kept in process at most (least recently used go first).
    pub max_entries: NonZeroU64,
    /// How long a result is kept after it was computed (in process and in the database).
    pub ttl_secs: NonZeroU64,
    /// Where results are kept besides this process.
    pub store: ReplayStoreKind,
    /// With `store = "cql"`: result writes in flight at most; beyond that a result is not
    /// stored (counted in `inferflow_replay_writes_total{outcome="skipped"}`).
    pub max_pending_writes: NonZeroUsize,
}

/// Where [`ReplayConfig`] keeps results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayStoreKind {
    /// In process only: covers rebalances back to the same instance and aborted transactions.
    Memory,
    /// Also in the feature store's CQL database: covers crashes and partitions moved to
    /// another instance too.
    Cql,
}

impl Section for ReplayConfig {}
