//! Weighted routes: a model name served by several versions, each request sent to one of them
//! by weight, the same one every time for the same sticky key.
//!
//! A [`Route`] for `sentiment` with versions `1` = 90 and `2` = 10 sends a request for the bare
//! name `sentiment` to `sentiment@1` or `sentiment@2`. The choice hashes the model name and the
//! request's sticky key ([`StickyKey`]: its entity, `type` and `id`, falling back to the request
//! id when it has none; or always the request id) with XXH64 under a fixed seed
//! ([`ROUTE_HASH_SEED`]), maps the hash onto `[0, total weight)` and takes the version whose
//! share covers that point. The hash is the same in every process, instance and release, so
//! one entity is answered by one version everywhere, and a restart moves nobody. An explicit
//! `name@version` in a request is never routed.
//!
//! Versions are laid out in their natural order (`1` < `2` < `10`), so when the newest
//! version's weight grows (10 → 50 → 100) the keys it already had stay with it and only keys
//! of the older versions move to it.
//!
//! A manager's routes are replaced whole ([`ModelManager::set_route`] for library users,
//! [`ModelManager::with_routes`] for a reload, which derives a manager sharing the models), and
//! a batch reads them once, so every request of a batch is routed by one table.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hasher;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use twox_hash::XxHash64;

use super::ManagerError;
use super::monitor::{Monitor, MonitorConfig};
use super::registry::{ModelManager, compare_versions};
use super::shadow::{ShadowConfig, ShadowLane, ShadowSink};
use crate::executor::ExecRequest;
use crate::metrics::ROUTE_REQUESTS_TOTAL;

/// The XXH64 seed of the routing hash. Changing it moves every sticky key to another point, so
/// it never changes.
pub const ROUTE_HASH_SEED: u64 = 0x6966_6c6f_7772_7465; // "iflowrte" in ASCII

/// The routes of a manager, by model name.
pub(super) type RouteTable = BTreeMap<String, Arc<RouteEntry>>;

/// An installed route: the route, and its shadow lane when it has shadows.
pub(super) struct RouteEntry {
    pub(super) route: Route,
    pub(super) lane: Option<ShadowLane>,
    pub(super) monitor: Option<Monitor>,
}

/// What keeps a caller on one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StickyKey {
    /// The request's entity (`type` and `id`); the request id when it has none.
    #[default]
    Entity,
    /// The request id: every request is drawn on its own.
    RequestId,
}

/// Why a route cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// No versions at all.
    #[error("names no version")]
    NoVersions,
    /// Every weight is zero.
    #[error("the weights add up to 0; give at least one version a positive weight")]
    ZeroTotal,
    /// A version is empty or contains `@` or whitespace.
    #[error("`{version}` is not a version (non-empty, no `@`, no spaces)")]
    InvalidVersion {
        /// The version as given.
        version: String,
    },
}

/// Versions of one model name with their weights, the sticky key, and the shadows.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// In natural version order; zero weights kept (they get no traffic).
    versions: Vec<(String, u32)>,
    total: u64,
    sticky: StickyKey,
    shadow: Option<ShadowConfig>,
    monitor: Option<MonitorConfig>,
}

impl Route {
    /// A route over `versions` (version, weight); the weights are relative (90/10 is the same
    /// split as 9/1) and must add up to more than zero.
    pub fn new<V: Into<String>>(
        versions: impl IntoIterator<Item = (V, u32)>,
        sticky: StickyKey,
    ) -> Result<Route, RouteError> {
        let mut versions: Vec<(String, u32)> =
            versions.into_iter().map(|(v, w)| (v.into(), w)).collect();
        if versions.is_empty() {
            return Err(RouteError::NoVersions);
        }
        if let Some((bad, _)) = versions
            .iter()
            .find(|(v, _)| v.is_empty() || v.contains('@') || v.chars().any(char::is_whitespace))
        {
            return Err(RouteError::InvalidVersion {
                version: bad.clone(),
            });
        }
        versions.sort_by(|a, b| compare_versions(&a.0, &b.0).then_with(|| a.0.cmp(&b.0)));
        versions.dedup_by(|a, b| a.0 == b.0);
        let total = versions.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return Err(RouteError::ZeroTotal);
        }
        Ok(Route {
            versions,
            total,
            sticky,
            shadow: None,
            monitor: None,
        })
    }

    /// The route with shadows (see [`ShadowConfig`]): versions that get a copy of each batch
    /// after the primary answered.
    pub fn with_shadow(mut self, shadow: ShadowConfig) -> Result<Route, RouteError> {
        if let Some(bad) = shadow
            .versions
            .iter()
            .find(|v| v.is_empty() || v.contains('@') || v.chars().any(char::is_whitespace))
        {
            return Err(RouteError::InvalidVersion {
                version: bad.clone(),
            });
        }
        self.shadow = (!shadow.versions.is_empty()).then_some(shadow);
        Ok(self)
    }

    /// The route with its versions' outputs watched (see [`MonitorConfig`]).
    pub fn with_monitor(mut self, monitor: MonitorConfig) -> Route {
        self.monitor = Some(monitor);
        self
    }

    /// The monitor's configuration, if any.
    pub fn monitor(&self) -> Option<&MonitorConfig> {
        self.monitor.as_ref()
    }

    /// The shadows, if any.
    pub fn shadow(&self) -> Option<&ShadowConfig> {
        self.shadow.as_ref()
    }

    /// The versions and their weights, in natural version order.
    pub fn versions(&self) -> impl Iterator<Item = (&str, u32)> {
        self.versions.iter().map(|(v, w)| (v.as_str(), *w))
    }

    /// What keeps a caller on one version.
    pub fn sticky_key(&self) -> StickyKey {
        self.sticky
    }

    /// The version that answers `request` for model `name`.
    pub fn choose(&self, name: &str, request: &ExecRequest) -> &str {
        let mut h = XxHash64::with_seed(ROUTE_HASH_SEED);
        h.write(name.as_bytes());
        h.write(&[0xff]);
        match (self.sticky, &request.entity) {
            (StickyKey::Entity, Some(entity)) => {
                h.write(b"e");
                h.write(entity.entity_type.as_bytes());
                h.write(&[0]);
                h.write(entity.id.as_bytes());
            }
            _ => {
                h.write(b"r");
                h.write(request.request_id.as_bytes());
            }
        }
        self.version_at(h.finish())
    }

    /// The version whose share of the hash space holds `hash`.
    fn version_at(&self, hash: u64) -> &str {
        // `hash × total / 2⁶⁴`: a point in [0, total), uniform when the hash is.
        let mut point = ((u128::from(hash) * u128::from(self.total)) >> 64) as u64;
        for (version, weight) in &self.versions {
            let weight = u64::from(*weight);
            if point < weight {
                return version;
            }
            point -= weight;
        }
        // Unreachable (point < total), but the last positive version is always a safe answer.
        self.versions
            .iter()
            .rev()
            .find(|(_, w)| *w > 0)
            .map_or("", |(v, _)| v.as_str())
    }
}

/// A batch for one model id, split by the version each request is routed to.
pub(super) enum Routed {
    /// No route applies (an explicit `name@version`, or a name without a route): the batch
    /// goes whole to whatever the id resolves to.
    Whole(Vec<ExecRequest>),
    /// Groups by `name@version`, each with the positions of its requests in the batch.
    Split {
        /// The batch's size.
        n: usize,
        /// `(name@version, positions, requests)`, in natural version order.
        groups: Vec<(String, Vec<usize>, Vec<ExecRequest>)>,
        /// The route, for its shadows.
        entry: Arc<RouteEntry>,
    },
}

impl ModelManager {
    /// Routes the bare name `name` by `route` from now on (replacing its route, if any). Every
    /// version with a positive weight must be loaded. Batches already running keep the routes
    /// they started with.
    pub fn set_route(&self, name: impl Into<String>, route: Route) -> Result<(), ManagerError> {
        let name = name.into();
        self.check_route(&name, &route)?;
        let entry = self.install_entry(&name, route);
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        let mut next = RouteTable::clone(&routes);
        next.insert(name, Arc::new(entry));
        *routes = Arc::new(next);
        Ok(())
    }

    /// Stops routing `name` (it resolves by the default version again), returning its route.
    pub fn remove_route(&self, name: &str) -> Option<Route> {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        let mut next = RouteTable::clone(&routes);
        let removed = next.remove(name)?;
        *routes = Arc::new(next);
        Some(removed.route.clone())
    }

    /// The route of `name`, if it has one.
    pub fn route(&self, name: &str) -> Option<Route> {
        self.route_table().get(name).map(|e| e.route.clone())
    }

    /// A manager with the same providers, models, statistics and result cache (shared, not
    /// copied: loading a model in one loads it in both) and `routes` instead of this one's.
    /// A reload that changes only routes installs one, so batches running on the old manager
    /// finish with the old routes. Fails, changing nothing, when a route names a version that
    /// is not loaded.
    pub fn with_routes(
        &self,
        routes: BTreeMap<String, Route>,
    ) -> Result<ModelManager, ManagerError> {
        for (name, route) in &routes {
            self.check_route(name, route)?;
        }
        let table: RouteTable = routes
            .into_iter()
            .map(|(name, route)| {
                let entry = self.install_entry(&name, route);
                (name, Arc::new(entry))
            })
            .collect();
        Ok(ModelManager {
            registry: Arc::clone(&self.registry),
            cache: self.cache.clone(),
            routes: RwLock::new(Arc::new(table)),
            shadow_sink: RwLock::new(self.shadow_sink()),
        })
    }

    /// Sends shadow comparisons to `sink` (routes installed from now on; see
    /// [`ShadowConfig`]). Without a sink shadows still run and are counted.
    pub fn set_shadow_sink(&self, sink: Arc<dyn ShadowSink>) {
        *self.shadow_sink.write().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    /// Where shadow comparisons go, if set.
    pub fn shadow_sink(&self) -> Option<Arc<dyn ShadowSink>> {
        self.shadow_sink
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `route` ready to serve: with its shadow lane started when it has shadows. The lane calls
    /// the shadows through a manager over the same models without the result cache.
    fn install_entry(&self, name: &str, route: Route) -> RouteEntry {
        let lane = route.shadow.as_ref().and_then(|shadow| {
            let view = ModelManager {
                registry: Arc::clone(&self.registry),
                ..ModelManager::default()
            };
            ShadowLane::start(name, shadow, view, self.shadow_sink())
        });
        let monitor = route.monitor.clone().map(Monitor::new);
        RouteEntry {
            route,
            lane,
            monitor,
        }
    }

    /// The route entry of `id`'s model name (`name` or `name@version`), when it is monitored.
    pub(super) fn monitored(&self, id: &str) -> Option<Arc<RouteEntry>> {
        let name = id.split_once('@').map_or(id, |(name, _)| name);
        self.route_table()
            .get(name)
            .filter(|e| e.monitor.is_some())
            .cloned()
    }

    pub(super) fn route_table(&self) -> Arc<RouteTable> {
        Arc::clone(&self.routes.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn check_route(&self, name: &str, route: &Route) -> Result<(), ManagerError> {
        if name.is_empty() || name.contains('@') {
            return Err(ManagerError::InvalidId {
                id: name.to_owned(),
            });
        }
        let registry = self.read();
        let shadows = route.shadow.iter().flat_map(|s| s.versions.iter());
        let needed = route
            .versions()
            .filter(|(_, w)| *w > 0)
            .map(|(v, _)| v)
            .chain(shadows.map(String::as_str));
        for version in needed {
            let loaded = registry
                .models
                .get(name)
                .is_some_and(|f| f.versions.contains_key(version));
            if !loaded {
                return Err(ManagerError::NotLoaded {
                    id: format!("{name}@{version}"),
                    known: registry.known_ids(&[]),
                });
            }
        }
        Ok(())
    }

    /// Splits a batch for `id` by route (see [`Routed`]).
    pub(super) fn route_batch(&self, id: &str, requests: Vec<ExecRequest>) -> Routed {
        if id.contains('@') {
            return Routed::Whole(requests);
        }
        let table = self.route_table();
        let Some(entry) = table.get(id) else {
            return Routed::Whole(requests);
        };
        let route = &entry.route;
        let n = requests.len();
        let mut groups: Vec<(String, Vec<usize>, Vec<ExecRequest>)> = route
            .versions()
            .map(|(v, _)| (format!("{id}@{v}"), Vec::new(), Vec::new()))
            .collect();
        for (i, request) in requests.into_iter().enumerate() {
            let version = route.choose(id, &request);
            if let Some(slot) = route.versions.iter().position(|(v, _)| v == version) {
                groups[slot].1.push(i);
                groups[slot].2.push(request);
            }
        }
        groups.retain(|(_, idx, _)| !idx.is_empty());
        for (model, idx, _) in &groups {
            metrics::counter!(ROUTE_REQUESTS_TOTAL, "model" => model.clone())
                .increment(idx.len() as u64);
        }
        Routed::Split {
            n,
            groups,
            entry: Arc::clone(entry),
        }
    }

    /// Providers that answer only shadow versions of routes (no model with traffic of its
    /// own), which [`hold`](Self::hold) leaves out. Empty, at once, without shadows.
    pub(super) fn shadow_only_providers(&self) -> HashSet<String> {
        let table = self.route_table();
        let mut shadows: HashSet<String> = HashSet::new();
        for (name, entry) in table.iter() {
            let weighted: HashSet<&str> = entry
                .route
                .versions()
                .filter(|(_, w)| *w > 0)
                .map(|(v, _)| v)
                .collect();
            for version in entry.route.shadow.iter().flat_map(|s| s.versions.iter()) {
                if !weighted.contains(version.as_str()) {
                    shadows.insert(format!("{name}@{version}"));
                }
            }
        }
        if shadows.is_empty() {
            return HashSet::new();
        }
        let registry = self.read();
        let mut only: HashSet<String> = HashSet::new();
        let mut primary: HashSet<&str> = HashSet::new();
        for model in registry.models.values().flat_map(|f| f.versions.values()) {
            if shadows.contains(&model.id) {
                only.insert(model.spec.provider.clone());
            } else {
                primary.insert(&model.spec.provider);
            }
        }
        only.retain(|p| !primary.contains(p.as_str()));
        only
    }

    /// For admission: how many of `requests` requests for `id` each `name@version` gets, by
    /// weight (rounded up), or `None` when `id` is not routed.
    pub(super) fn route_shares(&self, id: &str, requests: usize) -> Option<Vec<(String, usize)>> {
        if id.contains('@') {
            return None;
        }
        let table = self.route_table();
        let route = &table.get(id)?.route;
        Some(
            route
                .versions()
                .filter(|(_, w)| *w > 0)
                .map(|(v, w)| {
                    let share = (requests as u64 * u64::from(w)).div_ceil(route.total);
                    (format!("{id}@{v}"), share as usize)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Entity;

    fn request(id: &str, entity: Option<&str>) -> ExecRequest {
        ExecRequest {
            request_id: id.to_owned(),
            data: serde_json::Value::Null,
            parameters: None,
            entity: entity.map(|e| Entity {
                entity_type: "user".to_owned(),
                id: e.to_owned(),
            }),
            tenant: None,
        }
    }

    #[test]
    fn weights_are_checked() {
        assert_eq!(
            Route::new(Vec::<(String, u32)>::new(), StickyKey::Entity).err(),
            Some(RouteError::NoVersions)
        );
        assert_eq!(
            Route::new([("1", 0), ("2", 0)], StickyKey::Entity).err(),
            Some(RouteError::ZeroTotal)
        );
        assert!(matches!(
            Route::new([("a@b", 1)], StickyKey::Entity),
            Err(RouteError::InvalidVersion { .. })
        ));
        let route = Route::new([("10", 1), ("2", 1), ("1", 0)], StickyKey::Entity).unwrap();
        assert_eq!(
            route.versions().collect::<Vec<_>>(),
            [("1", 0), ("2", 1), ("10", 1)]
        );
    }

    #[test]
    fn choice_is_sticky_weighted_and_stable() {
        let route = Route::new([("1", 90), ("2", 10)], StickyKey::Entity).unwrap();
        let mut canary = 0;
        for e in 0..10_000 {
            let entity = format!("u{e}");
            let first = route.choose("sentiment", &request("a", Some(&entity)));
            // Another request of the same entity lands on the same version.
            assert_eq!(
                route.choose("sentiment", &request("b", Some(&entity))),
                first
            );
            canary += usize::from(first == "2");
        }
        assert!(
            (900..1100).contains(&canary),
            "{canary} of 10,000 on the 10 % version"
        );
        // Pinned: the hash never changes across processes and releases. If this fails, the
        // routing hash changed and every sticky key moved.
        let picks: String = (0..16)
            .map(|e| route.choose("sentiment", &request("x", Some(&format!("u{e}")))))
            .collect();
        assert_eq!(picks, "2111111111111111");
        // Without an entity the request id is the key; `request_id` ignores the entity.
        let by_id = Route::new([("1", 1), ("2", 1)], StickyKey::RequestId).unwrap();
        let ids: Vec<&str> = (0..64)
            .map(|i| by_id.choose("m", &request(&format!("r{i}"), Some("same"))))
            .collect();
        assert!(ids.contains(&"1") && ids.contains(&"2"));
    }

    #[test]
    fn a_growing_canary_keeps_its_keys() {
        let small = Route::new([("1", 90), ("2", 10)], StickyKey::Entity).unwrap();
        let half = Route::new([("1", 50), ("2", 50)], StickyKey::Entity).unwrap();
        let all = Route::new([("1", 0), ("2", 100)], StickyKey::Entity).unwrap();
        for e in 0..2_000 {
            let r = request("x", Some(&format!("u{e}")));
            if small.choose("m", &r) == "2" {
                assert_eq!(half.choose("m", &r), "2");
            }
            assert_eq!(all.choose("m", &r), "2");
        }
    }
}
