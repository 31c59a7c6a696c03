//! Freshness: an optional `max_age` per feature (or for every feature of a lookup, e.g. a
//! group's), and what a lookup does with a feature older than that: fail, skip it, or use a
//! default value.
//!
//! A feature's age is measured from its `updated_at` (the update's event time) to the read.
//! Freshness applies to features that have a value; features with none are reported in
//! [`FeatureVector::missing`] whatever the rules say.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{FeatureStoreError, FeatureVector};

/// What a lookup does with a feature older than its `max_age`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStale {
    /// The lookup fails with [`FeatureStoreError::Stale`].
    Fail,
    /// The feature is left out of the vector and listed in [`FeatureVector::stale`].
    Skip,
    /// The feature's values are replaced by these (version 0), and it is listed in
    /// [`FeatureVector::stale`].
    Default(Map<String, Value>),
}

/// A freshness rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Freshness {
    /// The oldest a value may be.
    pub max_age: Duration,
    /// What happens to an older one.
    pub on_stale: OnStale,
}

/// Freshness rules of one lookup: one for every feature, overridden per feature.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FreshnessRules {
    /// The rule of features without a rule of their own (e.g. a group's `max_age`).
    pub all: Option<Freshness>,
    /// Rules by feature name.
    pub features: BTreeMap<String, Freshness>,
}

impl FreshnessRules {
    /// No rules: every value is fresh enough.
    pub fn none() -> Self {
        Self::default()
    }

    /// One rule for every feature.
    pub fn all(max_age: Duration, on_stale: OnStale) -> Self {
        FreshnessRules {
            all: Some(Freshness { max_age, on_stale }),
            features: BTreeMap::new(),
        }
    }

    /// The same rules with `name` ruled by `max_age` and `on_stale`.
    pub fn with_feature(
        mut self,
        name: impl Into<String>,
        max_age: Duration,
        on_stale: OnStale,
    ) -> Self {
        self.features
            .insert(name.into(), Freshness { max_age, on_stale });
        self
    }

    /// The rule of `name`, if any.
    pub fn rule(&self, name: &str) -> Option<&Freshness> {
        self.features.get(name).or(self.all.as_ref())
    }

    /// Applies the rules to `vector`: stale features are skipped or replaced by their default
    /// (and listed in `stale`), or the first stale feature ruled `fail` fails the lookup.
    pub fn apply(&self, vector: &mut FeatureVector) -> Result<(), FeatureStoreError> {
        if self.all.is_none() && self.features.is_empty() {
            return Ok(());
        }
        let stale: Vec<String> = vector
            .features
            .iter()
            .filter(|(name, value)| {
                self.rule(name)
                    .is_some_and(|r| u128::from(value.age_ms) > r.max_age.as_millis())
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            let Some(rule) = self.rule(&name) else {
                continue;
            };
            match &rule.on_stale {
                OnStale::Fail => {
                    let age_ms = vector.features[&name].age_ms;
                    return Err(FeatureStoreError::Stale {
                        name,
                        age_ms,
                        max_age_ms: u64::try_from(rule.max_age.as_millis()).unwrap_or(u64::MAX),
                    });
                }
                OnStale::Skip => {
                    vector.features.remove(&name);
                }
                OnStale::Default(values) => {
                    if let Some(value) = vector.features.get_mut(&name) {
                        value.values = values.clone();
                        value.version = 0;
                    }
                }
            }
            vector.stale.push(name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::feature_store::FeatureValue;

    fn vector() -> FeatureVector {
        let value = |age_ms, v| FeatureValue {
            values: json!({ "x": v }).as_object().cloned().unwrap_or_default(),
            version: 3,
            age_ms,
        };
        FeatureVector {
            entity_type: "user".into(),
            entity_id: "1".into(),
            features: BTreeMap::from([
                ("fresh".to_owned(), value(1_000, 1)),
                ("old".to_owned(), value(60_000, 2)),
            ]),
            missing: vec!["absent".into()],
            stale: Vec::new(),
        }
    }

    #[test]
    fn no_rules_change_nothing() {
        let mut v = vector();
        FreshnessRules::none().apply(&mut v).expect("no rules");
        assert_eq!(v, vector());
    }

    #[test]
    fn stale_features_are_skipped_defaulted_or_fail_the_lookup() {
        let max = Duration::from_secs(30);
        let mut v = vector();
        FreshnessRules::all(max, OnStale::Skip)
            .apply(&mut v)
            .expect("skip");
        assert_eq!(v.features.keys().collect::<Vec<_>>(), ["fresh"]);
        assert_eq!(v.stale, ["old"]);
        assert_eq!(v.missing, ["absent"], "missing stays missing");

        let mut v = vector();
        let default = json!({"x": 0}).as_object().cloned().unwrap_or_default();
        FreshnessRules::all(max, OnStale::Default(default.clone()))
            .apply(&mut v)
            .expect("default");
        assert_eq!(v.features["old"].values, default);
        assert_eq!(v.features["old"].version, 0);
        assert_eq!(v.features["fresh"].version, 3);
        assert_eq!(v.stale, ["old"]);

        let err = FreshnessRules::all(max, OnStale::Fail)
            .apply(&mut vector())
            .expect_err("stale");
        assert!(
            matches!(&err, FeatureStoreError::Stale { name, age_ms: 60_000, max_age_ms: 30_000 } if name == "old"),
            "{err:?}"
        );
        assert!(err.to_string().contains("old"), "{err}");
    }

    #[test]
    fn a_feature_rule_overrides_the_rule_for_all() {
        let mut v = vector();
        FreshnessRules::all(Duration::from_secs(30), OnStale::Fail)
            .with_feature("old", Duration::from_secs(120), OnStale::Fail)
            .apply(&mut v)
            .expect("old is fresh enough under its own rule");
        assert!(v.stale.is_empty());
        let mut v = vector();
        FreshnessRules::none()
            .with_feature("fresh", Duration::from_millis(500), OnStale::Skip)
            .apply(&mut v)
            .expect("skip");
        assert_eq!(v.features.keys().collect::<Vec<_>>(), ["old"]);
    }
}
