//! The registry: registered providers, loaded models by name and version, default versions,
//! resolving a request's model id, and reading the statistics.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::ModelSpec;
use super::guard::{Guard, Guarded};
use super::lifecycle::Lifecycle;
use super::routing::RouteTable;
use super::shadow::ShadowSink;
use super::stats::{Counters, ModelStats};
use crate::model::{ErrorBody, ErrorKind};
use crate::providers::Provider;
use crate::providers::cache::ResultCache;

/// A loaded model, as a request resolved to it.
#[derive(Clone)]
pub struct ResolvedModel {
    pub(super) spec: ModelSpec,
    pub(super) id: String,
    pub(super) provider: Arc<dyn Provider>,
    pub(super) guard: Arc<Guard>,
    pub(super) life: Arc<Lifecycle>,
    pub(super) counters: Arc<Counters>,
}

impl fmt::Debug for ResolvedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedModel")
            .field("id", &self.id)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl ResolvedModel {
    /// `name@version`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What it was loaded with.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }
}

/// The versions of one model name.
#[derive(Default)]
pub(super) struct Family {
    pub(super) versions: BTreeMap<String, ResolvedModel>,
}

#[derive(Default)]
pub(super) struct Registry {
    pub(super) providers: BTreeMap<String, Guarded>,
    pub(super) models: BTreeMap<String, Family>,
    pub(super) defaults: HashMap<String, String>,
    /// Every id ever loaded, so reloading one clears the cache of the old answers.
    pub(super) ever_loaded: HashSet<String>,
}

impl Registry {
    /// The loaded ids and then `extra`, comma-separated, or `none`.
    pub(super) fn known_ids(&self, extra: &[&str]) -> String {
        let ids: Vec<String> = self
            .models
            .values()
            .flat_map(|f| f.versions.values().map(|m| m.id.clone()))
            .chain(extra.iter().map(|s| (*s).to_owned()))
            .collect();
        if ids.is_empty() {
            "none".to_owned()
        } else {
            ids.join(", ")
        }
    }
}

/// Providers, loaded models, default versions, routes and usage statistics. Share it as
/// `Arc<ModelManager>`; every method takes `&self`.
#[derive(Default)]
pub struct ModelManager {
    /// Shared with the managers [`ModelManager::with_routes`] derives: the models are the same,
    /// only the routes differ.
    pub(super) registry: Arc<RwLock<Registry>>,
    pub(super) cache: Option<ResultCache>,
    /// The weighted routes by model name; replaced whole, read once per batch.
    pub(super) routes: RwLock<Arc<RouteTable>>,
    /// Where the shadows of routes installed from now on send their comparisons.
    pub(super) shadow_sink: RwLock<Option<Arc<dyn ShadowSink>>>,
}

impl fmt::Debug for ModelManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let registry = self.read();
        f.debug_struct("ModelManager")
            .field("providers", &registry.providers.keys().collect::<Vec<_>>())
            .field("models", &registry.known_ids(&[]))
            .field("cache", &self.cache.is_some())
            .finish()
    }
}

impl ModelManager {
    /// A manager without providers, models or result cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// A manager whose models with `cache` on use `cache`.
    pub fn with_cache(cache: ResultCache) -> Self {
        ModelManager {
            registry: Arc::default(),
            cache: Some(cache),
            ..ModelManager::default()
        }
    }

    /// The result cache, if any.
    pub fn cache(&self) -> Option<&ResultCache> {
        self.cache.as_ref()
    }

    // The lock is never held across an await, and a panic while holding it leaves the registry
    // consistent (every update is a single insert or remove), so poisoning is ignored.
    pub(super) fn read(&self) -> RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn write(&self) -> RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The registered provider names, sorted.
    pub fn providers(&self) -> Vec<String> {
        self.read().providers.keys().cloned().collect()
    }

    /// Makes `version` what a bare `name` resolves to. It may be set before that version is
    /// loaded; while it is not loaded, requests for the bare name fail with `unknown_model`.
    pub fn set_default_version(&self, name: impl Into<String>, version: impl Into<String>) {
        self.write().defaults.insert(name.into(), version.into());
    }

    /// Forgets the default version of `name`, returning it.
    pub fn clear_default_version(&self, name: &str) -> Option<String> {
        self.write().defaults.remove(name)
    }

    /// The loaded ids (`name@version`), sorted by name, then version.
    pub fn model_ids(&self) -> Vec<String> {
        let registry = self.read();
        registry
            .models
            .values()
            .flat_map(|f| f.versions.values().map(|m| m.id.clone()))
            .collect()
    }

    /// Resolves `id` (`name` or `name@version`) to a loaded model, by the rules in the
    /// [module documentation](super).
    pub fn resolve(&self, id: &str) -> Result<ResolvedModel, ErrorBody> {
        self.resolve_listing(id, &[])
    }

    /// [`resolve`](Self::resolve), naming `extra` among the known ids in the error.
    pub(super) fn resolve_listing(
        &self,
        id: &str,
        extra: &[&str],
    ) -> Result<ResolvedModel, ErrorBody> {
        let registry = self.read();
        let unknown = |why: String| {
            ErrorBody::new(
                ErrorKind::UnknownModel,
                format!("{why} (known: {})", registry.known_ids(extra)),
            )
        };
        let (name, version) = match id.split_once('@') {
            Some((name, version)) => (name, Some(version)),
            None => (id, None),
        };
        let Some(family) = registry.models.get(name) else {
            return Err(unknown(format!("no model `{id}`")));
        };
        let found = match version {
            Some(version) => family.versions.get(version),
            None => match registry.defaults.get(name) {
                Some(default) => {
                    return family.versions.get(default).cloned().ok_or_else(|| {
                        unknown(format!(
                            "default version `{default}` of model `{name}` is not loaded"
                        ))
                    });
                }
                None => family
                    .versions
                    .iter()
                    .max_by(|a, b| compare_versions(a.0, b.0).then_with(|| a.0.cmp(b.0)))
                    .map(|(_, m)| m),
            },
        };
        found
            .cloned()
            .ok_or_else(|| unknown(format!("no model `{id}`")))
    }

    /// Usage of `name@version` since it was loaded, or `None` when it is not loaded.
    pub fn stats(&self, id: &str) -> Option<ModelStats> {
        let (name, version) = id.split_once('@')?;
        let registry = self.read();
        let model = registry.models.get(name)?.versions.get(version)?;
        Some(model.counters.snapshot())
    }

    /// Usage of every loaded model, by id.
    pub fn all_stats(&self) -> BTreeMap<String, ModelStats> {
        let registry = self.read();
        registry
            .models
            .values()
            .flat_map(|f| f.versions.values())
            .map(|m| (m.id.clone(), m.counters.snapshot()))
            .collect()
    }
}

/// Compares versions "naturally": digit runs as numbers, other runs byte by byte.
pub(super) fn compare_versions(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let (da, ra) = split_digits(a);
                let (db, rb) = split_digits(b);
                let (ta, tb) = (trim_zeros(da), trim_zeros(db));
                let ord = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb));
                if ord != Ordering::Equal {
                    return ord;
                }
                (a, b) = (ra, rb);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                (a, b) = (&a[1..], &b[1..]);
            }
        }
    }
}

fn split_digits(s: &[u8]) -> (&[u8], &[u8]) {
    let end = s
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(s.len());
    s.split_at(end)
}

fn trim_zeros(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&c| c != b'0').unwrap_or(s.len());
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_naturally() {
        let mut v = vec!["1.9", "1.10", "v2", "v10", "1.0.0", "1", "01.2", "1.2", "a"];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(
            v,
            ["1", "1.0.0", "01.2", "1.2", "1.9", "1.10", "a", "v2", "v10"]
        );
        assert_eq!(
            compare_versions("2024-06-01", "2024-05-31"),
            Ordering::Greater
        );
        assert_eq!(compare_versions("10", "9"), Ordering::Greater);
        assert_eq!(compare_versions("", "0"), Ordering::Less);
    }
}
