//! From configuration to a running [`ModelManager`]: the providers of `[providers.*]` with
//! their breakers and rate limits, the models of `[models.*]` (warmed up when they have a
//! `warmup` sample), their default versions, the result cache of `[result_cache]`, and the
//! idle sweeper when a model unloads after idle time; then the weighted routes of `[routes.*]`
//! ([`with_routes`]).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::cache::{ResultCache, ResultCacheConfig};
use super::huggingface::HuggingFaceProvider;
use super::local::LocalProvider;
use super::manager::{ModelManager, ModelSpec, ProviderPolicy};
use super::openai::OpenAiProvider;
use super::{
    ModelsConfig, Provider, ProviderInput, ProviderSection, ProvidersConfig, RoutesConfig,
};

/// How often idle models are looked for.
const IDLE_SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Builds one configured provider.
fn provider(name: &str, section: &ProviderSection) -> anyhow::Result<Arc<dyn Provider>> {
    let built: Arc<dyn Provider> = if let Some(cfg) = &section.openai {
        Arc::new(
            OpenAiProvider::new(cfg.clone()).with_context(|| format!("providers.{name}.openai"))?,
        )
    } else if let Some(cfg) = &section.huggingface {
        Arc::new(
            HuggingFaceProvider::new(cfg.clone())
                .with_context(|| format!("providers.{name}.huggingface"))?,
        )
    } else if let Some(cfg) = &section.local {
        Arc::new(
            LocalProvider::new(cfg.clone()).with_context(|| format!("providers.{name}.local"))?,
        )
    } else {
        // Configuration validation refuses a provider without a kind.
        anyhow::bail!("providers.{name}: no kind (openai, huggingface or local)");
    };
    Ok(built)
}

/// Builds the model manager the `[providers]`, `[models]` and `[result_cache]` sections
/// describe: registers every provider, loads every model (warm-ups run one after another; a
/// failing warm-up fails start-up, naming the model), and sets default versions.
pub async fn build_manager(
    providers: &ProvidersConfig,
    models: &ModelsConfig,
    result_cache: &ResultCacheConfig,
) -> anyhow::Result<Arc<ModelManager>> {
    let cache = ResultCache::new(result_cache.clone()).context("result_cache")?;
    let manager = Arc::new(ModelManager::with_cache(cache));
    for (name, section) in &providers.0 {
        let built = provider(name, section)?;
        let policy = ProviderPolicy {
            breaker: section.breaker.clone(),
            rate_limit: section.rate_limit.clone(),
        };
        manager
            .register_provider_with_policy(name.clone(), built, policy)
            .with_context(|| format!("providers.{name}"))?;
    }
    let mut idle_unload = false;
    for (id, model) in &models.0 {
        let Some((name, version)) = ModelsConfig::split_id(id) else {
            anyhow::bail!("models.\"{id}\": not a name@version id");
        };
        let mut spec = ModelSpec::new(
            name,
            version,
            &model.provider,
            model.remote_model.as_deref().unwrap_or(name),
        );
        spec.cache = model.cache;
        if model.unload_after_idle_secs > 0 {
            spec.unload_after_idle = Some(Duration::from_secs(model.unload_after_idle_secs));
            idle_unload = true;
        }
        match &model.warmup {
            Some(sample) => manager
                .load_model_with_warmup(spec, ProviderInput::new(sample.clone()))
                .await
                .with_context(|| format!("loading models.\"{id}\" (warm-up)"))?,
            None => manager
                .load_model(spec)
                .with_context(|| format!("loading models.\"{id}\""))?,
        }
        tracing::info!(model = %id, provider = %model.provider, "model loaded");
    }
    for (name, version) in models.default_versions() {
        manager.set_default_version(name, version);
    }
    if idle_unload {
        manager.spawn_idle_sweeper(IDLE_SWEEP_EVERY);
    }
    Ok(manager)
}

/// `manager` with the routes of `[routes]` (a manager sharing its models: see
/// [`ModelManager::with_routes`]). What start-up does after [`build_manager`], and all a reload
/// that changes only `[routes]` does.
pub fn with_routes(
    manager: &ModelManager,
    routes: &RoutesConfig,
) -> anyhow::Result<Arc<ModelManager>> {
    let routes = routes.routes().map_err(anyhow::Error::msg)?;
    let names: Vec<String> = routes.keys().cloned().collect();
    let routed = manager.with_routes(routes).context("routes")?;
    if !names.is_empty() {
        tracing::info!(routes = ?names, "weighted routes installed");
    }
    Ok(Arc::new(routed))
}
