//! Loading and unloading models: loads (with or without warm-up), unloads, and the idle
//! unload with its transparent reload.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::time::Duration;

use super::guard::Guard;
use super::registry::{ModelManager, ResolvedModel};
use super::stats::add;
use super::{ManagerError, ModelSpec};
use crate::metrics as m;
use crate::providers::{Provider, ProviderError, ProviderInput};

/// Load state of a model with idle unload.
pub(super) struct Lifecycle {
    /// False after an idle unload, until the next load.
    pub(super) loaded: AtomicBool,
    /// When it was last used, in nanoseconds after `epoch`.
    last_used_ns: AtomicU64,
    epoch: tokio::time::Instant,
    /// Batches running now; the sweeper leaves a busy model alone.
    pub(super) in_flight: AtomicUsize,
    /// Held while loading or unloading.
    pub(super) transition: tokio::sync::Mutex<()>,
}

impl Lifecycle {
    pub(super) fn new(loaded: bool) -> Self {
        Lifecycle {
            loaded: AtomicBool::new(loaded),
            last_used_ns: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            transition: tokio::sync::Mutex::new(()),
        }
    }

    pub(super) fn touch(&self) {
        let ns = self.epoch.elapsed().as_nanos();
        self.last_used_ns.store(
            u64::try_from(ns).unwrap_or(u64::MAX),
            AtomicOrdering::Relaxed,
        );
    }

    fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed();
        now.saturating_sub(Duration::from_nanos(
            self.last_used_ns.load(AtomicOrdering::Relaxed),
        ))
    }
}

/// Counts a batch in flight while alive.
pub(super) struct InFlight<'a>(&'a Lifecycle);

impl<'a> InFlight<'a> {
    pub(super) fn new(life: &'a Lifecycle) -> Self {
        life.in_flight.fetch_add(1, AtomicOrdering::AcqRel);
        life.touch();
        InFlight(life)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, AtomicOrdering::AcqRel);
    }
}

impl ResolvedModel {
    /// True once the provider has loaded the model: after a warm-up load or the first use, and
    /// until an idle unload.
    pub fn is_loaded(&self) -> bool {
        self.life.loaded.load(AtomicOrdering::Acquire)
    }

    /// Asks the provider to load the model when it has not yet (a model registered without
    /// warm-up) or was unloaded for idleness. A no-op for remote providers.
    pub(super) async fn ensure_loaded(&self) -> Result<(), ProviderError> {
        if self.is_loaded() {
            return Ok(());
        }
        let _transition = self.life.transition.lock().await;
        if self.is_loaded() {
            return Ok(());
        }
        self.provider.load_model(&self.spec.remote_model).await?;
        self.life.loaded.store(true, AtomicOrdering::Release);
        if self.counters.idle_unloads.load(AtomicOrdering::Relaxed) > 0 {
            add(&self.counters.reloads, 1);
            metrics::counter!(m::MODEL_LIFECYCLE_TOTAL, "model" => self.id.clone(), "event" => "reload")
                .increment(1);
            tracing::info!(model = %self.id, "model loaded again after an idle unload");
        }
        Ok(())
    }
}

fn valid_part(s: &str) -> bool {
    !s.is_empty() && !s.contains('@')
}

impl ModelManager {
    /// Unloads every model with `unload_after_idle` that has been idle that long and is not
    /// running; returns their ids. [`spawn_idle_sweeper`](Self::spawn_idle_sweeper) runs it
    /// periodically.
    pub fn unload_idle(&self) -> Vec<String> {
        let candidates: Vec<ResolvedModel> = {
            let registry = self.read();
            registry
                .models
                .values()
                .flat_map(|f| f.versions.values())
                .filter(|m| {
                    m.spec
                        .unload_after_idle
                        .is_some_and(|idle| m.is_loaded() && m.life.idle_for() >= idle)
                })
                .cloned()
                .collect()
        };
        let mut unloaded = Vec::new();
        for model in candidates {
            // A model being loaded or unloaded right now is left for the next sweep.
            let Ok(_transition) = model.life.transition.try_lock() else {
                continue;
            };
            if model.life.in_flight.load(AtomicOrdering::Acquire) > 0 || !model.is_loaded() {
                continue;
            }
            model.life.loaded.store(false, AtomicOrdering::Release);
            model.provider.unload_model(&model.spec.remote_model);
            add(&model.counters.idle_unloads, 1);
            metrics::counter!(m::MODEL_LIFECYCLE_TOTAL, "model" => model.id.clone(), "event" => "unload")
                .increment(1);
            tracing::info!(model = %model.id, "model unloaded after being idle");
            unloaded.push(model.id.clone());
        }
        unloaded
    }

    /// Runs [`unload_idle`](Self::unload_idle) every `every` on the current Tokio runtime,
    /// until the manager (and every manager derived from it) is dropped or the task is aborted.
    pub fn spawn_idle_sweeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        // The registry, not this manager: managers derived for new routes
        // ([`with_routes`](Self::with_routes)) share it, and the sweep goes on while any does.
        let registry = Arc::downgrade(&self.registry);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                ModelManager {
                    registry,
                    ..ModelManager::default()
                }
                .unload_idle();
            }
        })
    }

    fn check_spec(
        &self,
        spec: &ModelSpec,
    ) -> Result<(Arc<dyn Provider>, Arc<Guard>), ManagerError> {
        if !valid_part(&spec.name) || !valid_part(&spec.version) {
            return Err(ManagerError::InvalidId { id: spec.id() });
        }
        let registry = self.read();
        if registry
            .models
            .get(&spec.name)
            .is_some_and(|f| f.versions.contains_key(&spec.version))
        {
            return Err(ManagerError::AlreadyLoaded { id: spec.id() });
        }
        registry
            .providers
            .get(&spec.provider)
            .map(|g| (Arc::clone(&g.provider), Arc::clone(&g.guard)))
            .ok_or_else(|| {
                let known: Vec<&str> = registry.providers.keys().map(String::as_str).collect();
                ManagerError::UnknownProvider {
                    provider: spec.provider.clone(),
                    known: if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    },
                }
            })
    }

    /// Registers the model; `loaded` says whether its provider has loaded it already.
    fn insert(
        &self,
        spec: ModelSpec,
        (provider, guard): (Arc<dyn Provider>, Arc<Guard>),
        loaded: bool,
    ) -> Result<(), ManagerError> {
        let id = spec.id();
        let reloaded = {
            let mut registry = self.write();
            let family = registry.models.entry(spec.name.clone()).or_default();
            if family.versions.contains_key(&spec.version) {
                return Err(ManagerError::AlreadyLoaded { id });
            }
            family.versions.insert(
                spec.version.clone(),
                ResolvedModel {
                    spec,
                    id: id.clone(),
                    provider,
                    guard,
                    life: {
                        let life = Lifecycle::new(loaded);
                        life.touch();
                        Arc::new(life)
                    },
                    counters: Arc::default(),
                },
            );
            !registry.ever_loaded.insert(id)
        };
        // The same id may now mean another provider or remote model: drop the old answers.
        if reloaded && let Some(cache) = &self.cache {
            cache.invalidate_all();
        }
        Ok(())
    }

    /// Loads `spec`. Fails when the id is invalid or already loaded, or the provider is not
    /// registered. The provider loads the model ([`Provider::load_model`]) on its first use,
    /// in [`admit`](Self::admit) or else in the first batch; use
    /// [`load_model_with_warmup`](Self::load_model_with_warmup) to load it now.
    pub fn load_model(&self, spec: ModelSpec) -> Result<(), ManagerError> {
        let provider = self.check_spec(&spec)?;
        self.insert(spec, provider, false)
    }

    /// Loads `spec` after asking its provider to load the model ([`Provider::load_model`]: a
    /// local model is read, optimised and run once) and calling it once with `sample`; fails,
    /// loading nothing, when either fails. The warm-up call is not counted in the statistics.
    pub async fn load_model_with_warmup(
        &self,
        spec: ModelSpec,
        sample: ProviderInput,
    ) -> Result<(), ManagerError> {
        let (provider, guard) = self.check_spec(&spec)?;
        if let Err(error) = provider.load_model(&spec.remote_model).await {
            return Err(ManagerError::WarmUp {
                id: spec.id(),
                error,
            });
        }
        let outcome = provider
            .infer_batch(&spec.remote_model, vec![sample])
            .await
            .into_iter()
            .next()
            .unwrap_or_else(|| {
                Err(ProviderError::InvalidResponse {
                    message: "provider returned no outcome for the warm-up input".to_owned(),
                })
            });
        if let Err(error) = outcome {
            return Err(ManagerError::WarmUp {
                id: spec.id(),
                error,
            });
        }
        self.insert(spec, (provider, guard), true)
    }

    /// Unloads `name@version` (the version is required), returning what it was loaded with.
    /// Its statistics go with it; a default version naming it stays set. The provider is asked
    /// to free the model ([`Provider::unload_model`]) unless another loaded id uses the same
    /// provider and remote model.
    pub fn unload_model(&self, id: &str) -> Result<ModelSpec, ManagerError> {
        let mut registry = self.write();
        let removed = id.split_once('@').and_then(|(name, version)| {
            let family = registry.models.get_mut(name)?;
            let model = family.versions.remove(version)?;
            if family.versions.is_empty() {
                registry.models.remove(name);
            }
            Some(model)
        });
        let Some(model) = removed else {
            return Err(ManagerError::NotLoaded {
                id: id.to_owned(),
                known: registry.known_ids(&[]),
            });
        };
        let shared = registry
            .models
            .values()
            .flat_map(|f| f.versions.values())
            .any(|m| {
                Arc::ptr_eq(&m.provider, &model.provider)
                    && m.spec.remote_model == model.spec.remote_model
            });
        drop(registry);
        if !shared {
            model.provider.unload_model(&model.spec.remote_model);
        }
        Ok(model.spec)
    }
}
