//! The feature store's domain types: what a feature, a feature group and a feature vector are,
//! and the rules every backend enforces on them.
//!
//! A feature is a JSON object of values for one `(entity_type, entity_id, name)`, with a version
//! chosen by the writer. The store keeps, for every feature, the value with the highest version
//! it has seen, whatever the order in which versions arrive. Versions are at most
//! [`MAX_VERSION`] (2^53 − 1): the largest integer every JSON producer represents exactly, and
//! small enough that `version * 1000` fits a CQL write timestamp (see `scylla.rs`).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::FeatureStoreError;

/// The largest version a feature may have: 2^53 − 1 (JavaScript's `Number.MAX_SAFE_INTEGER`).
pub const MAX_VERSION: u64 = (1 << 53) - 1;

/// The longest TTL a feature may have, in seconds: 20 years, CQL's limit on ScyllaDB and
/// Cassandra alike.
pub const MAX_TTL_SECS: u32 = 630_720_000;

/// The longest entity type, entity id, feature name or group name, in bytes. CQL limits a key
/// component to 64 KiB; inferflow keeps keys much smaller than that.
pub const MAX_KEY_BYTES: usize = 8192;

/// The identity of one feature: which entity, and which of its features.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FeatureKey {
    /// The kind of entity, e.g. `user`.
    pub entity_type: String,
    /// The entity's id within its type.
    pub entity_id: String,
    /// The feature's name.
    pub name: String,
}

impl FeatureKey {
    /// A key from its three parts.
    pub fn new(
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        FeatureKey {
            entity_type: entity_type.into(),
            entity_id: entity_id.into(),
            name: name.into(),
        }
    }
}

/// A write of one feature version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureUpdate {
    /// The kind of entity.
    pub entity_type: String,
    /// The entity's id.
    pub entity_id: String,
    /// The feature's name.
    pub name: String,
    /// The values, a JSON object.
    pub values: Map<String, Value>,
    /// The version; the highest version written is the one read. At most [`MAX_VERSION`].
    pub version: u64,
    /// When the values were produced, Unix time in milliseconds.
    pub updated_at_ms: u64,
    /// Seconds after the write at which the value disappears, if it should; 1 to
    /// [`MAX_TTL_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u32>,
}

impl FeatureUpdate {
    /// An update without TTL, stamped with the current time.
    pub fn new(
        entity_type: impl Into<String>,
        entity_id: impl Into<String>,
        name: impl Into<String>,
        values: Map<String, Value>,
        version: u64,
    ) -> Self {
        FeatureUpdate {
            entity_type: entity_type.into(),
            entity_id: entity_id.into(),
            name: name.into(),
            values,
            version,
            updated_at_ms: unix_now_ms(),
            ttl_secs: None,
        }
    }

    /// The same update with a TTL.
    pub fn with_ttl_secs(mut self, ttl_secs: u32) -> Self {
        self.ttl_secs = Some(ttl_secs);
        self
    }

    /// The feature this update writes.
    pub fn key(&self) -> FeatureKey {
        FeatureKey::new(&self.entity_type, &self.entity_id, &self.name)
    }

    /// Checks the rules every backend relies on: non-empty key parts of bounded length, a
    /// version up to [`MAX_VERSION`], a timestamp that fits a signed 64-bit integer, and a TTL
    /// from 1 to [`MAX_TTL_SECS`] seconds.
    pub fn validate(&self) -> Result<(), FeatureStoreError> {
        validate_key(&self.entity_type, &self.entity_id, &self.name)?;
        validate_version(self.version)?;
        if i64::try_from(self.updated_at_ms).is_err() {
            return Err(FeatureStoreError::invalid(
                "feature update",
                format!(
                    "updated_at_ms {} does not fit in 63 bits",
                    self.updated_at_ms
                ),
            ));
        }
        if let Some(ttl) = self.ttl_secs
            && (ttl == 0 || ttl > MAX_TTL_SECS)
        {
            return Err(FeatureStoreError::invalid(
                "feature update",
                format!(
                    "ttl_secs {ttl} is out of range: use 1 to {MAX_TTL_SECS}, or no TTL at all"
                ),
            ));
        }
        Ok(())
    }
}

/// One stored version of a feature, as read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feature {
    /// The kind of entity.
    pub entity_type: String,
    /// The entity's id.
    pub entity_id: String,
    /// The feature's name.
    pub name: String,
    /// The values, a JSON object.
    pub values: Map<String, Value>,
    /// The version.
    pub version: u64,
    /// When the values were produced, Unix time in milliseconds.
    pub updated_at_ms: u64,
    /// Seconds until the value expires, as the database reported it when it was read; `None`
    /// when it does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u32>,
}

impl Feature {
    /// The feature written by `update`, as it reads back right after the write.
    pub fn from_update(update: &FeatureUpdate) -> Self {
        Feature {
            entity_type: update.entity_type.clone(),
            entity_id: update.entity_id.clone(),
            name: update.name.clone(),
            values: update.values.clone(),
            version: update.version,
            updated_at_ms: update.updated_at_ms,
            ttl_secs: update.ttl_secs,
        }
    }

    /// How old the values are at `now_ms` (Unix milliseconds); 0 if they claim to come from the
    /// future.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.updated_at_ms)
    }
}

/// A named, versioned list of features of one entity type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureGroup {
    /// The group's name.
    pub name: String,
    /// The group's version, from 1. A version, once created, does not change.
    pub version: u32,
    /// The entity type all the features belong to.
    pub entity_type: String,
    /// The feature names, in order, without duplicates; at least one.
    pub features: Vec<String>,
    /// What the group is for.
    #[serde(default)]
    pub description: String,
}

impl FeatureGroup {
    /// Checks that the names are non-empty and bounded, the version is at least 1, and the
    /// feature list is non-empty and has no duplicates.
    pub fn validate(&self) -> Result<(), FeatureStoreError> {
        validate_part("feature group", "name", &self.name)?;
        validate_part("feature group", "entity_type", &self.entity_type)?;
        if self.version == 0 {
            return Err(FeatureStoreError::invalid(
                "feature group",
                "version 0 is not allowed; group versions start at 1",
            ));
        }
        if self.features.is_empty() {
            return Err(FeatureStoreError::invalid(
                "feature group",
                "features is empty; a group lists at least one feature",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for feature in &self.features {
            validate_part("feature group", "feature name", feature)?;
            if !seen.insert(feature.as_str()) {
                return Err(FeatureStoreError::invalid(
                    "feature group",
                    format!("feature `{feature}` is listed twice"),
                ));
            }
        }
        Ok(())
    }
}

/// The values of several features of one entity, each with its version and age, and the names
/// that had no value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureVector {
    /// The kind of entity.
    pub entity_type: String,
    /// The entity's id.
    pub entity_id: String,
    /// The features found, by name.
    pub features: BTreeMap<String, FeatureValue>,
    /// The names asked for that have no value (never written, or expired), in the order asked.
    pub missing: Vec<String>,
    /// Features older than their `max_age` that were skipped or replaced by their default
    /// ([`super::freshness`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stale: Vec<String>,
}

/// One feature inside a [`FeatureVector`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureValue {
    /// The values, a JSON object.
    pub values: Map<String, Value>,
    /// The version.
    pub version: u64,
    /// Milliseconds between `updated_at` and the read.
    pub age_ms: u64,
}

/// The rule for one feature version written again with *different* values: true when the
/// `incoming` values win over the `stored` ones, that is when their compact JSON text (as the
/// CQL backend stores it in `values_json`) is greater byte by byte. The later `updated_at` is
/// kept either way.
///
/// Why this rule: ingestion delivers at least once and writes run concurrently, so the two
/// writes can arrive in either order, on each CQL replica independently. A rule that depends
/// on the order (first or last write wins) cannot be applied without reading first, which CQL
/// can only do with a lightweight transaction (a Paxos round per write). Comparing the values
/// gives the same answer in every order, is idempotent, and is what a CQL database does by
/// itself with two cells of one write timestamp (the version's), so the embedded backend
/// applies it and both agree. A version should still mean one content: this only makes a
/// mistake converge.
pub fn same_version_wins(incoming: &Map<String, Value>, stored: &Map<String, Value>) -> bool {
    let text = |values: &Map<String, Value>| serde_json::to_vec(values).unwrap_or_default();
    text(incoming) > text(stored)
}

/// The current Unix time in milliseconds (0 if the clock is before 1970).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Checks the three parts of a feature key.
pub(crate) fn validate_key(
    entity_type: &str,
    entity_id: &str,
    name: &str,
) -> Result<(), FeatureStoreError> {
    validate_part("feature key", "entity_type", entity_type)?;
    validate_part("feature key", "entity_id", entity_id)?;
    validate_part("feature key", "feature name", name)
}

/// Checks an entity type and id.
pub(crate) fn validate_entity(entity_type: &str, entity_id: &str) -> Result<(), FeatureStoreError> {
    validate_part("feature key", "entity_type", entity_type)?;
    validate_part("feature key", "entity_id", entity_id)
}

/// Checks the entity and the feature names of a vector read.
pub(crate) fn validate_vector_key(
    entity_type: &str,
    entity_id: &str,
    names: &[&str],
) -> Result<(), FeatureStoreError> {
    validate_entity(entity_type, entity_id)?;
    names
        .iter()
        .try_for_each(|name| validate_part("feature key", "feature name", name))
}

/// Checks a version against [`MAX_VERSION`].
pub(crate) fn validate_version(version: u64) -> Result<(), FeatureStoreError> {
    if version > MAX_VERSION {
        return Err(FeatureStoreError::invalid(
            "feature version",
            format!("{version} is above the largest supported version {MAX_VERSION} (2^53 - 1)"),
        ));
    }
    Ok(())
}

/// Checks one name: non-empty and at most [`MAX_KEY_BYTES`] bytes.
pub(crate) fn validate_part(
    what: &'static str,
    field: &str,
    value: &str,
) -> Result<(), FeatureStoreError> {
    if value.is_empty() {
        return Err(FeatureStoreError::invalid(
            what,
            format!("{field} is empty"),
        ));
    }
    if value.len() > MAX_KEY_BYTES {
        return Err(FeatureStoreError::invalid(
            what,
            format!(
                "{field} has {} bytes; at most {MAX_KEY_BYTES} are allowed",
                value.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update() -> FeatureUpdate {
        let mut values = Map::new();
        values.insert("clicks".into(), 3.into());
        FeatureUpdate::new("user", "u1", "activity", values, 7)
    }

    #[test]
    fn a_plain_update_is_valid() {
        update().validate().expect("valid");
        update()
            .with_ttl_secs(MAX_TTL_SECS)
            .validate()
            .expect("valid");
    }

    #[test]
    fn updates_breaking_a_rule_are_rejected_with_the_reason() {
        let cases: Vec<(FeatureUpdate, &str)> = vec![
            (
                FeatureUpdate {
                    entity_type: String::new(),
                    ..update()
                },
                "entity_type is empty",
            ),
            (
                FeatureUpdate {
                    name: "x".repeat(MAX_KEY_BYTES + 1),
                    ..update()
                },
                "feature name has",
            ),
            (
                FeatureUpdate {
                    version: MAX_VERSION + 1,
                    ..update()
                },
                "largest supported version",
            ),
            (update().with_ttl_secs(0), "ttl_secs 0"),
            (update().with_ttl_secs(MAX_TTL_SECS + 1), "out of range"),
            (
                FeatureUpdate {
                    updated_at_ms: u64::MAX,
                    ..update()
                },
                "updated_at_ms",
            ),
        ];
        for (update, expected) in cases {
            let err = update.validate().expect_err("must be rejected");
            assert!(matches!(err, FeatureStoreError::Invalid { .. }), "{err:?}");
            assert!(err.to_string().contains(expected), "{err} lacks {expected}");
        }
    }

    #[test]
    fn groups_need_a_version_and_distinct_features() {
        let group = FeatureGroup {
            name: "g".into(),
            version: 1,
            entity_type: "user".into(),
            features: vec!["a".into(), "b".into()],
            description: String::new(),
        };
        group.validate().expect("valid");
        for (bad, expected) in [
            (
                FeatureGroup {
                    version: 0,
                    ..group.clone()
                },
                "version 0",
            ),
            (
                FeatureGroup {
                    features: vec![],
                    ..group.clone()
                },
                "features is empty",
            ),
            (
                FeatureGroup {
                    features: vec!["a".into(), "a".into()],
                    ..group.clone()
                },
                "listed twice",
            ),
        ] {
            let err = bad.validate().expect_err("must be rejected");
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    #[test]
    fn age_never_goes_negative() {
        let feature = Feature::from_update(&FeatureUpdate {
            updated_at_ms: 1_000,
            ..update()
        });
        assert_eq!(feature.age_ms(1_500), 500);
        assert_eq!(feature.age_ms(500), 0);
    }
}
