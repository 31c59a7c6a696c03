//! The model manager: version resolution, batching, the result cache, error mapping, usage
//! statistics and the lifecycle, against an in-test provider that records its calls.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use inferflow::executor::{ExecRequest, ExecResult, Executor};
use inferflow::model::{ErrorKind, Target};
use inferflow::providers::cache::{ResultCache, ResultCacheConfig};
use inferflow::providers::manager::{
    ManagerError, ModelExecutor, ModelManager, ModelSpec, ProviderPolicy,
};
use inferflow::providers::{
    BreakerConfig, BreakerState, Provider, ProviderError, ProviderInput, ProviderOutput,
    RateLimitConfig, TokenUsage,
};
use serde_json::{Value, json};

/// Answers `{"model": <remote model>, "echo": <data>}` with 1 prompt + 2 completion tokens, or
/// fails for the data strings `fail:rate`, `fail:timeout` and `fail:input`. Records every call.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<(String, usize)>>,
}

impl Fake {
    fn calls(&self) -> Vec<(String, usize)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Provider for Fake {
    fn infer_batch(
        &self,
        model: &str,
        inputs: Vec<ProviderInput>,
    ) -> BoxFuture<'_, Vec<Result<ProviderOutput, ProviderError>>> {
        self.calls
            .lock()
            .unwrap()
            .push((model.to_owned(), inputs.len()));
        let model = model.to_owned();
        Box::pin(async move {
            inputs
                .into_iter()
                .map(|input| match input.data.as_str() {
                    Some("fail:rate") => Err(ProviderError::RateLimited {
                        message: "slow down".into(),
                        retry_after: None,
                    }),
                    Some("fail:timeout") => Err(ProviderError::Timeout {
                        after: Duration::from_millis(10),
                    }),
                    Some("fail:input") => Err(ProviderError::InvalidInput {
                        message: "bad".into(),
                    }),
                    _ => Ok(ProviderOutput {
                        output: json!({"model": model, "echo": input.data}),
                        usage: Some(TokenUsage {
                            prompt_tokens: 1,
                            completion_tokens: 2,
                            total_tokens: 3,
                        }),
                        model: None,
                    }),
                })
                .collect()
        })
    }
}

fn spec(name: &str, version: &str, remote: &str, cache: bool) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        version: version.into(),
        provider: "fake".into(),
        remote_model: remote.into(),
        cache,
        unload_after_idle: None,
    }
}

fn req(data: Value, tenant: Option<&str>) -> ExecRequest {
    ExecRequest {
        request_id: "r".into(),
        data,
        parameters: None,
        entity: None,
        tenant: tenant.map(str::to_owned),
    }
}

fn setup(cache: bool) -> (Arc<Fake>, Arc<ModelManager>, ModelExecutor) {
    let fake = Arc::new(Fake::default());
    let manager = if cache {
        ModelManager::with_cache(ResultCache::new(ResultCacheConfig::default()).unwrap())
    } else {
        ModelManager::new()
    };
    let manager = Arc::new(manager);
    manager.register_provider("fake", fake.clone());
    let executor = ModelExecutor::new(Arc::clone(&manager));
    (fake, manager, executor)
}

async fn run(executor: &ModelExecutor, model: &str, requests: Vec<ExecRequest>) -> Vec<ExecResult> {
    let target = Target::Model(model.into());
    let out = executor.execute(&target, requests.clone()).await;
    assert_eq!(out.len(), requests.len(), "one outcome per request");
    out
}

fn version_of(out: &ExecResult) -> &str {
    out.as_ref().unwrap().model_version.as_deref().unwrap()
}

#[tokio::test]
async fn versions_resolve_by_default_explicit_only_and_highest() {
    let (fake, manager, executor) = setup(false);
    for (version, remote) in [("1", "r1"), ("2", "r2"), ("10", "r10")] {
        manager
            .load_model(spec("m", version, remote, false))
            .unwrap();
    }
    manager
        .load_model(spec("solo", "beta", "rs", false))
        .unwrap();

    // No default: the highest version, numerically (10 > 2, though "10" < "2" as text).
    let out = run(&executor, "m", vec![req(json!("x"), None)]).await;
    assert_eq!(version_of(&out[0]), "10");
    assert_eq!(out[0].as_ref().unwrap().output["model"], "r10");
    assert_eq!(out[0].as_ref().unwrap().steps[0].name, "model:m@10");

    // Explicit versions win.
    let out = run(&executor, "m@1", vec![req(json!("x"), None)]).await;
    assert_eq!(version_of(&out[0]), "1");
    assert_eq!(out[0].as_ref().unwrap().output["model"], "r1");

    // A default version wins over the highest.
    manager.set_default_version("m", "2");
    let out = run(&executor, "m", vec![req(json!("x"), None)]).await;
    assert_eq!(version_of(&out[0]), "2");
    assert_eq!(manager.resolve("m").unwrap().id(), "m@2");

    // The only loaded version.
    assert_eq!(manager.resolve("solo").unwrap().id(), "solo@beta");

    // A default naming a version that is not loaded fails instead of falling back.
    manager.set_default_version("m", "7");
    let err = manager.resolve("m").unwrap_err();
    assert_eq!(err.kind, ErrorKind::UnknownModel);
    assert!(err.message.contains("`7`"), "{}", err.message);
    assert_eq!(manager.clear_default_version("m").as_deref(), Some("7"));
    assert_eq!(manager.resolve("m").unwrap().id(), "m@10");

    // Unknown names and versions list the known ids (and the built-ins, through the executor).
    for unknown in ["nope", "m@3", "solo@1"] {
        let out = run(
            &executor,
            unknown,
            vec![req(json!(1), None), req(json!(2), None)],
        )
        .await;
        for o in &out {
            let err = o.as_ref().unwrap_err();
            assert_eq!(err.kind, ErrorKind::UnknownModel);
            for id in ["m@1", "m@2", "m@10", "solo@beta", "echo"] {
                assert!(err.message.contains(id), "{id} in {}", err.message);
            }
            assert!(err.message.contains(unknown), "{}", err.message);
        }
    }
    assert_eq!(
        fake.calls().len(),
        3,
        "unknown models never reach the provider"
    );
}

#[tokio::test]
async fn a_batch_for_an_uncached_model_is_one_provider_call() {
    let (fake, manager, executor) = setup(true);
    manager
        .load_model(spec("emb", "1", "embed-small", false))
        .unwrap();
    let requests: Vec<_> = (0..5).map(|i| req(json!(i), Some("t"))).collect();
    let out = run(&executor, "emb@1", requests).await;
    assert_eq!(fake.calls(), vec![("embed-small".to_owned(), 5)]);
    for (i, o) in out.iter().enumerate() {
        let o = o.as_ref().unwrap();
        assert_eq!(o.output["echo"], json!(i), "answers stay in order");
        assert!(!o.cached);
    }
    // Identical requests are not cached either: the model opted out.
    run(&executor, "emb@1", vec![req(json!(0), Some("t"))]).await;
    assert_eq!(fake.calls().len(), 2);
    assert_eq!(manager.cache().unwrap().stats().hits, 0);
}

#[tokio::test]
async fn a_manager_without_cache_batches_even_cache_enabled_models() {
    let (fake, manager, executor) = setup(false);
    manager.load_model(spec("m", "1", "r", true)).unwrap();
    let out = run(
        &executor,
        "m",
        vec![req(json!(1), None), req(json!(1), None)],
    )
    .await;
    assert_eq!(fake.calls(), vec![("r".to_owned(), 2)]);
    assert!(out.iter().all(|o| !o.as_ref().unwrap().cached));
}

#[tokio::test]
async fn repeated_requests_are_served_from_cache_per_tenant() {
    let (fake, manager, executor) = setup(true);
    manager
        .load_model(spec("clf", "3", "remote-clf", true))
        .unwrap();

    let first = run(
        &executor,
        "clf",
        vec![req(json!({"text": "hi"}), Some("a"))],
    )
    .await;
    let second = run(
        &executor,
        "clf@3",
        vec![req(json!({"text": "hi"}), Some("a"))],
    )
    .await;
    assert_eq!(fake.calls().len(), 1, "the second request is a cache hit");
    let (first, second) = (first[0].as_ref().unwrap(), second[0].as_ref().unwrap());
    assert!(!first.cached && !first.steps[0].cached);
    assert!(second.cached && second.steps[0].cached);
    assert_eq!(first.output, second.output);
    assert_eq!(second.model_version.as_deref(), Some("3"));

    // Another tenant (and no tenant) do not share tenant a's entry.
    let out = run(
        &executor,
        "clf",
        vec![req(json!({"text": "hi"}), Some("b"))],
    )
    .await;
    assert!(!out[0].as_ref().unwrap().cached);
    let out = run(&executor, "clf", vec![req(json!({"text": "hi"}), None)]).await;
    assert!(!out[0].as_ref().unwrap().cached);
    assert_eq!(fake.calls().len(), 3);

    // Identical requests in one batch share one provider call.
    let out = run(
        &executor,
        "clf",
        (0..4).map(|_| req(json!("same"), Some("c"))).collect(),
    )
    .await;
    assert_eq!(fake.calls().len(), 4);
    assert_eq!(out.iter().filter(|o| o.as_ref().unwrap().cached).count(), 3);

    let stats = manager.stats("clf@3").unwrap();
    assert_eq!(stats.requests, 8);
    assert_eq!(stats.cache_hits, 4);
    assert_eq!(stats.provider_calls, 4);
    assert_eq!(stats.total_tokens, 12, "cache hits cost no tokens");
}

#[tokio::test]
async fn the_misses_of_a_batch_go_to_the_provider_in_one_call() {
    let (fake, manager, executor) = setup(true);
    manager
        .load_model(spec("clf", "1", "remote", true))
        .unwrap();
    run(&executor, "clf", vec![req(json!("a"), None)]).await;
    assert_eq!(fake.calls(), vec![("remote".to_owned(), 1)]);

    // `a` is cached and `c` comes twice: the distinct misses b, c, d make one call.
    let out = run(
        &executor,
        "clf",
        ["a", "b", "c", "c", "d"]
            .iter()
            .map(|t| req(json!(t), None))
            .collect(),
    )
    .await;
    assert_eq!(
        fake.calls(),
        vec![("remote".to_owned(), 1), ("remote".to_owned(), 3)]
    );
    let cached: Vec<bool> = out.iter().map(|o| o.as_ref().unwrap().cached).collect();
    assert_eq!(cached, [true, false, false, true, false]);
    for (o, t) in out.iter().zip(["a", "b", "c", "c", "d"]) {
        assert_eq!(o.as_ref().unwrap().output["echo"], t);
    }
    // And they are cached now.
    run(
        &executor,
        "clf",
        vec![req(json!("d"), None), req(json!("b"), None)],
    )
    .await;
    assert_eq!(fake.calls().len(), 2);
}

#[tokio::test]
async fn provider_errors_map_to_their_kinds_and_are_not_cached() {
    for cache in [false, true] {
        let (fake, manager, executor) = setup(cache);
        manager.load_model(spec("m", "1", "r", cache)).unwrap();
        let batch = || {
            vec![
                req(json!("fail:rate"), None),
                req(json!("ok"), None),
                req(json!("fail:timeout"), None),
                req(json!("fail:input"), None),
            ]
        };
        let out = run(&executor, "m", batch()).await;
        let kind = |o: &ExecResult| o.as_ref().unwrap_err().kind;
        assert_eq!(kind(&out[0]), ErrorKind::RateLimited);
        assert_eq!(out[1].as_ref().unwrap().output["echo"], "ok");
        assert_eq!(kind(&out[2]), ErrorKind::ProviderTimeout);
        assert_eq!(kind(&out[3]), ErrorKind::InvalidRequest);
        assert!(out[0].as_ref().unwrap_err().message.contains("slow down"));

        // Errors are never cached: the same failing input calls the provider again.
        let before: usize = fake.calls().iter().map(|c| c.1).sum();
        let again = run(&executor, "m", vec![req(json!("fail:rate"), None)]).await;
        assert_eq!(kind(&again[0]), ErrorKind::RateLimited);
        let after: usize = fake.calls().iter().map(|c| c.1).sum();
        assert_eq!(after, before + 1, "cache={cache}");
    }
}

#[tokio::test]
async fn usage_statistics_count_calls_errors_latency_and_tokens() {
    let (_fake, manager, executor) = setup(false);
    manager.load_model(spec("m", "1", "r", false)).unwrap();
    manager.load_model(spec("m", "2", "r", false)).unwrap();
    assert_eq!(manager.stats("m@1").unwrap().requests, 0);

    run(
        &executor,
        "m@1",
        vec![
            req(json!("a"), None),
            req(json!("fail:rate"), None),
            req(json!("b"), None),
        ],
    )
    .await;
    run(&executor, "m@1", vec![req(json!("c"), None)]).await;
    run(&executor, "m@1", vec![]).await;

    let s = manager.stats("m@1").unwrap();
    assert_eq!(s.requests, 4);
    assert_eq!(s.errors, 1);
    assert_eq!(s.provider_calls, 2, "an empty batch calls nobody");
    assert_eq!(s.provider_inputs, 4);
    assert_eq!(s.provider_errors, 1);
    assert_eq!(
        (s.prompt_tokens, s.completion_tokens, s.total_tokens),
        (3, 6, 9)
    );
    assert_eq!(s.cache_hits, 0);
    assert_eq!(s.mean_latency_us(), s.total_latency_us / 2);

    let all = manager.all_stats();
    assert_eq!(all.keys().collect::<Vec<_>>(), ["m@1", "m@2"]);
    assert_eq!(all["m@1"], s);
    assert_eq!(all["m@2"].requests, 0);
    assert_eq!(all["m@2"].mean_latency_us(), 0);
    assert!(manager.stats("m").is_none(), "stats take an exact id");
}

#[tokio::test]
async fn unloading_makes_the_model_unknown() {
    let (fake, manager, executor) = setup(false);
    manager.load_model(spec("m", "1", "r", false)).unwrap();
    manager.load_model(spec("m", "2", "r", false)).unwrap();
    let unloaded = manager.unload_model("m@2").unwrap();
    assert_eq!(unloaded.remote_model, "r");
    assert_eq!(manager.model_ids(), ["m@1"]);
    assert!(manager.stats("m@2").is_none());

    let out = run(&executor, "m@2", vec![req(json!(1), None)]).await;
    assert_eq!(out[0].as_ref().unwrap_err().kind, ErrorKind::UnknownModel);
    let out = run(&executor, "m", vec![req(json!(1), None)]).await;
    assert_eq!(version_of(&out[0]), "1");

    manager.unload_model("m@1").unwrap();
    let out = run(&executor, "m", vec![req(json!(1), None)]).await;
    let err = out[0].as_ref().unwrap_err();
    assert_eq!(err.kind, ErrorKind::UnknownModel);
    assert!(!err.message.contains("m@1"), "{}", err.message);
    assert!(matches!(
        manager.unload_model("m@1"),
        Err(ManagerError::NotLoaded { .. })
    ));
    assert!(matches!(
        manager.unload_model("m"),
        Err(ManagerError::NotLoaded { .. })
    ));
    assert_eq!(fake.calls().len(), 1);

    // It can be loaded again, with fresh statistics.
    manager.load_model(spec("m", "1", "r", false)).unwrap();
    assert_eq!(manager.stats("m@1").unwrap().requests, 0);
}

#[tokio::test]
async fn loading_is_validated() {
    let (_fake, manager, _executor) = setup(false);
    manager.load_model(spec("m", "1", "r", false)).unwrap();
    assert_eq!(
        manager.load_model(spec("m", "1", "other", false)),
        Err(ManagerError::AlreadyLoaded { id: "m@1".into() })
    );
    for (name, version) in [("", "1"), ("m", ""), ("a@b", "1"), ("m", "1@2")] {
        assert!(
            matches!(
                manager.load_model(spec(name, version, "r", false)),
                Err(ManagerError::InvalidId { .. })
            ),
            "{name:?} {version:?}"
        );
    }
    let mut s = spec("n", "1", "r", false);
    s.provider = "missing".into();
    let err = manager.load_model(s).unwrap_err();
    assert!(matches!(err, ManagerError::UnknownProvider { .. }));
    assert!(err.to_string().contains("fake"), "{err}");
    assert_eq!(manager.model_ids(), ["m@1"]);
}

#[tokio::test]
async fn warm_up_calls_the_provider_once_and_fails_the_load_on_error() {
    let (fake, manager, _executor) = setup(false);
    let err = manager
        .load_model_with_warmup(
            spec("w", "1", "rw", false),
            ProviderInput::new(json!("fail:timeout")),
        )
        .await
        .unwrap_err();
    match &err {
        ManagerError::WarmUp { id, error } => {
            assert_eq!(id, "w@1");
            assert_eq!(error.kind(), ErrorKind::ProviderTimeout);
        }
        other => panic!("expected a warm-up error, got {other:?}"),
    }
    assert!(manager.model_ids().is_empty());

    manager
        .load_model_with_warmup(spec("w", "1", "rw", false), ProviderInput::new(json!("hi")))
        .await
        .unwrap();
    assert_eq!(manager.model_ids(), ["w@1"]);
    assert_eq!(fake.calls(), vec![("rw".into(), 1), ("rw".into(), 1)]);
    assert_eq!(manager.stats("w@1").unwrap().provider_calls, 0);
}

#[tokio::test]
async fn builtins_remain_the_fallback() {
    let (fake, manager, executor) = setup(false);
    let out = executor
        .execute(
            &Target::Pipeline("identity".into()),
            vec![req(json!({"a": 1}), None)],
        )
        .await;
    assert_eq!(out[0].as_ref().unwrap().output, json!({"a": 1}));
    let out = run(&executor, "echo", vec![req(json!(5), None)]).await;
    assert_eq!(version_of(&out[0]), "1");
    assert_eq!(out[0].as_ref().unwrap().output, json!(5));

    // A loaded model named `echo` takes precedence over the built-in.
    manager.load_model(spec("echo", "9", "r", false)).unwrap();
    let out = run(&executor, "echo", vec![req(json!(5), None)]).await;
    assert_eq!(version_of(&out[0]), "9");
    assert_eq!(fake.calls().len(), 1);
}

#[tokio::test]
async fn parameters_reach_the_provider_and_the_cache_key() {
    let (fake, manager, executor) = setup(true);
    manager.load_model(spec("m", "1", "r", true)).unwrap();
    let with = |t: f64| ExecRequest {
        parameters: json!({"temperature": t}).as_object().cloned(),
        ..req(json!("q"), None)
    };
    run(&executor, "m", vec![with(0.1)]).await;
    let out = run(&executor, "m", vec![with(0.9)]).await;
    assert!(
        !out[0].as_ref().unwrap().cached,
        "other parameters, other entry"
    );
    let out = run(&executor, "m", vec![with(0.1)]).await;
    assert!(out[0].as_ref().unwrap().cached);
    assert_eq!(fake.calls().len(), 2);
}

#[tokio::test]
async fn reloading_an_id_drops_its_cached_answers() {
    let (fake, manager, executor) = setup(true);
    manager.load_model(spec("m", "1", "old", true)).unwrap();
    let out = run(&executor, "m@1", vec![req(json!("q"), None)]).await;
    assert_eq!(out[0].as_ref().unwrap().output["model"], "old");
    manager.unload_model("m@1").unwrap();
    manager.load_model(spec("m", "1", "new", true)).unwrap();
    let out = run(&executor, "m@1", vec![req(json!("q"), None)]).await;
    let out = out[0].as_ref().unwrap();
    assert!(!out.cached);
    assert_eq!(out.output["model"], "new");
    assert_eq!(fake.calls().len(), 2);
}

/// A manager whose provider `guarded` is the fake behind `policy`, with model `g@1` on it.
fn guarded(policy: ProviderPolicy) -> (Arc<Fake>, Arc<ModelManager>, ModelExecutor) {
    let (fake, manager, executor) = setup(false);
    manager
        .register_provider_with_policy("guarded", fake.clone(), policy)
        .unwrap();
    manager
        .load_model(ModelSpec {
            cache: false,
            ..ModelSpec::new("g", "1", "guarded", "remote-g")
        })
        .unwrap();
    (fake, manager, executor)
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_makes_requests_wait_and_holds_the_consumer_until_a_probe_succeeds() {
    let (fake, manager, executor) = guarded(ProviderPolicy {
        breaker: Some(BreakerConfig {
            failure_threshold: std::num::NonZeroU32::new(2).unwrap(),
            open_ms: std::num::NonZeroU64::new(1_000).unwrap(),
            ..BreakerConfig::default()
        }),
        ..ProviderPolicy::default()
    });
    let executor = Arc::new(executor);
    assert_eq!(executor.hold(), None);
    for _ in 0..2 {
        let out = run(&executor, "g", vec![req(json!("fail:timeout"), None)]).await;
        assert_eq!(
            out[0].as_ref().unwrap_err().kind,
            ErrorKind::ProviderTimeout
        );
    }
    assert_eq!(manager.breaker_state("guarded"), Some(BreakerState::Open));
    let reason = executor
        .hold()
        .expect("the consumer is held while the breaker is open");
    assert!(
        reason.contains("breaker open for provider `guarded`"),
        "{reason}"
    );

    // A batch arriving now waits in admit (not in execute, so not against its timeout) and
    // is not failed.
    let started = tokio::time::Instant::now();
    let waiting = {
        let executor = executor.clone();
        tokio::spawn(async move {
            let target = Target::Model("g".into());
            executor.admit(&target, 1).await;
            let admitted = started.elapsed();
            let out = executor
                .execute(&target, vec![req(json!("ok"), None)])
                .await;
            (admitted, out)
        })
    };
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(!waiting.is_finished());
    assert_eq!(fake.calls().len(), 2, "no call during the cool-down");
    assert!(executor.hold().is_some());

    let (admitted, out) = waiting.await.unwrap();
    assert_eq!(admitted, Duration::from_secs(1));
    assert_eq!(out[0].as_ref().unwrap().output["echo"], "ok");
    assert_eq!(fake.calls().len(), 3, "the probe");
    assert_eq!(manager.breaker_state("guarded"), Some(BreakerState::Closed));
    assert_eq!(executor.hold(), None);

    // Errors that retrying cannot fix say nothing about the provider's health.
    for _ in 0..3 {
        run(&executor, "g", vec![req(json!("fail:input"), None)]).await;
    }
    assert_eq!(manager.breaker_state("guarded"), Some(BreakerState::Closed));
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_spaces_calls_and_admit_waits_for_a_whole_batch() {
    let (fake, _manager, executor) = guarded(ProviderPolicy {
        rate_limit: RateLimitConfig {
            requests_per_minute: std::num::NonZeroU32::new(60),
            burst_requests: std::num::NonZeroU32::new(1),
            ..RateLimitConfig::default()
        },
        ..ProviderPolicy::default()
    });
    let started = tokio::time::Instant::now();
    let mut at = Vec::new();
    for i in 0..3 {
        let out = run(&executor, "g", vec![req(json!(i), None)]).await;
        assert!(out[0].is_ok(), "waiting never fails a request");
        at.push(started.elapsed());
    }
    let secs = |s| Duration::from_secs(s);
    assert_eq!(at, vec![secs(0), secs(1), secs(2)]);

    // admit takes the whole batch's capacity up front (three calls: the fake makes one per
    // input, the default), so execute then runs without waiting.
    let target = Target::Model("g".into());
    let before_admit = tokio::time::Instant::now();
    executor.admit(&target, 3).await;
    assert_eq!(before_admit.elapsed(), secs(3));
    let before_execute = tokio::time::Instant::now();
    let requests = (0..3).map(|i| req(json!(i), None)).collect();
    let out = executor.execute(&target, requests).await;
    assert_eq!(before_execute.elapsed(), Duration::ZERO);
    assert!(out.iter().all(Result::is_ok));
    assert_eq!(fake.calls().len(), 4);
}

#[tokio::test]
async fn admit_and_hold_are_free_without_policies() {
    let (_fake, manager, executor) = setup(false);
    manager.load_model(spec("m", "1", "r", false)).unwrap();
    for target in ["m", "echo", "nope"] {
        executor.admit(&Target::Model(target.into()), 10).await;
    }
    executor
        .admit(&Target::Pipeline("identity".into()), 10)
        .await;
    assert_eq!(executor.hold(), None);
    assert_eq!(manager.breaker_state("fake"), None);
    let bad = ProviderPolicy {
        breaker: Some(BreakerConfig {
            failure_ratio: Some(2.0),
            ..BreakerConfig::default()
        }),
        ..ProviderPolicy::default()
    };
    let fake: Arc<dyn Provider> = Arc::new(Fake::default());
    let error = manager
        .register_provider_with_policy("bad", fake, bad)
        .unwrap_err();
    assert!(
        error.to_string().contains("breaker.failure_ratio"),
        "{error}"
    );
}

#[tokio::test]
async fn provider_calls_errors_tokens_latency_breaker_and_cache_are_exported_as_metrics() {
    use inferflow::metrics as m;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // The test runs on one thread (current-thread runtime), where this recorder applies.
    let _recorder = metrics::set_default_local_recorder(&recorder);

    let (_fake, _manager, executor) = guarded(ProviderPolicy {
        breaker: Some(BreakerConfig {
            failure_threshold: std::num::NonZeroU32::new(1).unwrap(),
            ..BreakerConfig::default()
        }),
        ..ProviderPolicy::default()
    });
    run(
        &executor,
        "g",
        vec![req(json!("a"), None), req(json!("b"), None)],
    )
    .await;
    run(&executor, "g", vec![req(json!("fail:timeout"), None)]).await;
    let cached = ModelExecutor::new(Arc::new({
        let cached =
            ModelManager::with_cache(ResultCache::new(ResultCacheConfig::default()).unwrap());
        cached.register_provider("fake", Arc::new(Fake::default()));
        cached.load_model(spec("c", "1", "r", true)).unwrap();
        cached
    }));
    run(&cached, "c", vec![req(json!("x"), None)]).await;
    run(&cached, "c", vec![req(json!("x"), None)]).await;

    let text = handle.render();
    let line = |name: &str, labels: &[&str]| -> f64 {
        let found = text
            .lines()
            .find(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"));
        found.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let g = ["provider=\"guarded\"", "model=\"g@1\""];
    assert_eq!(line(m::PROVIDER_CALLS_TOTAL, &g), 2.0);
    assert_eq!(line(m::PROVIDER_INPUTS_TOTAL, &g), 3.0);
    let with = |extra: &'static str| [g[0], g[1], extra];
    assert_eq!(
        line(m::PROVIDER_ERRORS_TOTAL, &with("kind=\"timeout\"")),
        1.0
    );
    assert_eq!(
        line(m::PROVIDER_TOKENS_TOTAL, &with("type=\"prompt\"")),
        2.0
    );
    assert_eq!(
        line(m::PROVIDER_TOKENS_TOTAL, &with("type=\"completion\"")),
        4.0
    );
    assert_eq!(
        line(&format!("{}_count", m::PROVIDER_LATENCY_SECONDS), &g),
        2.0
    );
    assert_eq!(
        line(m::PROVIDER_BREAKER_STATE, &["provider=\"guarded\""]),
        2.0
    );
    assert_eq!(
        line(m::PROVIDER_BREAKER_OPENED_TOTAL, &["provider=\"guarded\""]),
        1.0
    );
    assert_eq!(line(m::CACHE_LOOKUPS_TOTAL, &["outcome=\"miss\""]), 1.0);
    assert_eq!(line(m::CACHE_LOOKUPS_TOTAL, &["outcome=\"hit\""]), 1.0);
}

/// A request from `user/{entity}`.
fn from(entity: &str, id: &str) -> ExecRequest {
    ExecRequest {
        request_id: id.into(),
        data: json!(id),
        parameters: None,
        entity: Some(inferflow::model::Entity {
            entity_type: "user".into(),
            id: entity.into(),
        }),
        tenant: None,
    }
}

#[tokio::test]
async fn a_route_splits_a_batch_by_weight_sticky_per_entity_and_explicit_versions_win() {
    use inferflow::providers::manager::{Route, StickyKey};

    let (fake, manager, executor) = setup(false);
    for version in ["1", "2"] {
        manager
            .load_model(spec("m", version, &format!("r{version}"), false))
            .unwrap();
    }
    // A route to a version that is not loaded is refused, and nothing changes.
    let refused = manager.set_route(
        "m",
        Route::new([("1", 50), ("3", 50)], StickyKey::Entity).unwrap(),
    );
    assert!(
        matches!(refused, Err(ManagerError::NotLoaded { .. })),
        "{refused:?}"
    );
    assert!(manager.route("m").is_none());

    manager
        .set_route(
            "m",
            Route::new([("1", 50), ("2", 50)], StickyKey::Entity).unwrap(),
        )
        .unwrap();
    // One batch of 200 requests from 20 entities: one provider call per version, outcomes in
    // request order, each entity on one version.
    let requests: Vec<ExecRequest> = (0..200)
        .map(|i| from(&format!("u{}", i % 20), &format!("q{i}")))
        .collect();
    let out = run(&executor, "m", requests).await;
    let mut by_entity = std::collections::HashMap::new();
    for (i, outcome) in out.iter().enumerate() {
        let output = &outcome.as_ref().unwrap().output;
        assert_eq!(output["echo"], format!("q{i}"), "outcome {i} in order");
        assert_eq!(output["model"], format!("r{}", version_of(outcome)));
        let first = by_entity
            .entry(i % 20)
            .or_insert_with(|| version_of(outcome).to_owned());
        assert_eq!(first, version_of(outcome), "entity u{} moved", i % 20);
    }
    let calls = fake.calls();
    assert_eq!(calls.len(), 2, "one call per version: {calls:?}");
    assert_eq!(calls.iter().map(|(_, n)| n).sum::<usize>(), 200);
    // The library's own entry point routes the same way.
    let again = manager.infer("m", vec![from("u3", "z")]).await;
    assert_eq!(version_of(&again[0]), by_entity[&3]);
    // An explicit version is never routed.
    let explicit = run(
        &executor,
        "m@1",
        (0..20).map(|e| from(&format!("u{e}"), "x")).collect(),
    )
    .await;
    assert!(explicit.iter().all(|o| version_of(o) == "1"));
    // A manager with other routes shares the models; the first keeps its route.
    let all_two = manager
        .with_routes(
            [(
                "m".to_owned(),
                Route::new([("1", 0), ("2", 1)], StickyKey::Entity).unwrap(),
            )]
            .into(),
        )
        .unwrap();
    let moved = all_two.infer("m", vec![from("u3", "z")]).await;
    assert_eq!(version_of(&moved[0]), "2");
    assert!(
        manager
            .route("m")
            .is_some_and(|r| r.versions().any(|(v, w)| v == "1" && w == 50))
    );
    assert_eq!(
        manager.remove_route("m").map(|r| r.sticky_key()),
        Some(StickyKey::Entity)
    );
    let unrouted = run(&executor, "m", vec![from("u3", "z")]).await;
    assert_eq!(version_of(&unrouted[0]), "2", "the highest version again");
}
