//! The inference result cache: hits, coalescing of concurrent identical calls, tenant
//! isolation, key normalisation, errors not cached, expiry, the memory bound, scan resistance
//! and opt-out.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use inferflow::providers::cache::{
    CacheKey, CachePolicy, CacheStatus, ResultCache, ResultCacheConfig,
};
use inferflow::providers::{ProviderError, ProviderInput, ProviderOutput};
use serde_json::{Value, json};

fn cache(max_entries: u64, max_bytes: u64, ttl_secs: u64) -> ResultCache {
    ResultCache::new(ResultCacheConfig {
        max_entries,
        max_bytes,
        ttl_secs,
    })
    .unwrap()
}

fn key(tenant: Option<&str>, data: Value) -> CacheKey {
    CacheKey::new(tenant, "sentiment@1", &ProviderInput::new(data))
}

/// Calls `cache` for `key`, with a compute that counts its runs and answers `answer`.
async fn call(
    cache: &ResultCache,
    key: CacheKey,
    calls: &AtomicUsize,
    answer: Value,
) -> (Result<ProviderOutput, ProviderError>, CacheStatus) {
    cache
        .get_or_compute(key, CachePolicy::ENABLED, || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(ProviderOutput::new(answer))
        })
        .await
}

#[tokio::test]
async fn identical_repeated_requests_are_served_from_cache() {
    let cache = cache(100, 1 << 20, 60);
    let calls = AtomicUsize::new(0);
    let (out, status) = call(&cache, key(None, json!("good")), &calls, json!("pos")).await;
    assert_eq!(out.unwrap().output, json!("pos"));
    assert_eq!(status, CacheStatus::Miss);
    for _ in 0..5 {
        let (out, status) = call(&cache, key(None, json!("good")), &calls, json!("other")).await;
        assert_eq!(out.unwrap().output, json!("pos"));
        assert_eq!(status, CacheStatus::Hit);
        assert!(status.served_from_cache());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.coalesced), (5, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn hundred_concurrent_identical_requests_make_one_call() {
    let cache = cache(100, 1 << 20, 60);
    let calls = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (cache, calls, start) = (cache.clone(), Arc::clone(&calls), Arc::clone(&start));
            tokio::spawn(async move {
                start.wait().await;
                cache
                    .get_or_compute(
                        key(Some("acme"), json!({"text": "hello"})),
                        CachePolicy::ENABLED,
                        || async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok(ProviderOutput::new(json!({"label": "pos"})))
                        },
                    )
                    .await
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        let (out, status) = task.await.unwrap();
        assert_eq!(out.unwrap().output, json!({"label": "pos"}));
        statuses.push(status);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let count = |s: CacheStatus| statuses.iter().filter(|&&x| x == s).count();
    assert_eq!(count(CacheStatus::Miss), 1, "{statuses:?}");
    assert_eq!(
        count(CacheStatus::Coalesced) + count(CacheStatus::Hit),
        99,
        "{statuses:?}"
    );
    // All 100 started together and the call took 50 ms, so most of them waited on it.
    assert!(count(CacheStatus::Coalesced) > 0, "{statuses:?}");
    let stats = cache.stats();
    assert_eq!(stats.misses, 1);
    assert_eq!(stats.hits + stats.coalesced, 99);
}

#[tokio::test]
async fn different_tenants_never_share_entries() {
    let cache = cache(100, 1 << 20, 60);
    let calls = AtomicUsize::new(0);
    let data = json!({"text": "same"});
    let (a, sa) = call(&cache, key(Some("a"), data.clone()), &calls, json!("for a")).await;
    let (b, sb) = call(&cache, key(Some("b"), data.clone()), &calls, json!("for b")).await;
    let (none, sn) = call(&cache, key(None, data.clone()), &calls, json!("for none")).await;
    let (empty, se) = call(
        &cache,
        key(Some(""), data.clone()),
        &calls,
        json!("for empty"),
    )
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!([sa, sb, sn, se], [CacheStatus::Miss; 4]);
    assert_eq!(a.unwrap().output, json!("for a"));
    assert_eq!(b.unwrap().output, json!("for b"));
    assert_eq!(none.unwrap().output, json!("for none"));
    assert_eq!(empty.unwrap().output, json!("for empty"));
    // And each tenant gets its own answer back.
    let (b, sb) = call(&cache, key(Some("b"), data), &calls, json!("x")).await;
    assert_eq!((b.unwrap().output, sb), (json!("for b"), CacheStatus::Hit));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn reordered_object_keys_share_an_entry() {
    let cache = cache(100, 1 << 20, 60);
    let calls = AtomicUsize::new(0);
    let params = |v: Value| v.as_object().cloned();
    let first = CacheKey::new(
        None,
        "m@1",
        &ProviderInput::with_parameters(
            serde_json::from_str(r#"{"a":1,"b":{"x":[1,2],"y":null}}"#).unwrap(),
            params(json!({"temperature": 0, "max_tokens": 5})),
        ),
    );
    let second = CacheKey::new(
        None,
        "m@1",
        &ProviderInput::with_parameters(
            serde_json::from_str(r#"{ "b" : { "y" : null, "x" : [1, 2] }, "a" : 1 }"#).unwrap(),
            params(json!({"max_tokens": 5, "temperature": 0})),
        ),
    );
    let (_, s1) = call(&cache, first, &calls, json!(1)).await;
    let (out, s2) = call(&cache, second, &calls, json!(2)).await;
    assert_eq!((s1, s2), (CacheStatus::Miss, CacheStatus::Hit));
    assert_eq!(out.unwrap().output, json!(1));
    // Array order and parameters do matter.
    let (_, s3) = call(
        &cache,
        key(None, json!({"a": 1, "b": {"x": [2, 1], "y": null}})),
        &calls,
        json!(3),
    )
    .await;
    assert_eq!(s3, CacheStatus::Miss);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn errors_are_not_cached() {
    let cache = cache(100, 1 << 20, 60);
    let calls = AtomicUsize::new(0);
    let k = || key(None, json!("flaky"));
    let (out, status) = cache
        .get_or_compute(k(), CachePolicy::ENABLED, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(ProviderError::Connection {
                message: "reset".into(),
            })
        })
        .await;
    assert_eq!(status, CacheStatus::Miss);
    assert!(matches!(out, Err(ProviderError::Connection { .. })));
    let (out, status) = call(&cache, k(), &calls, json!("ok")).await;
    assert_eq!(status, CacheStatus::Miss);
    assert_eq!(out.unwrap().output, json!("ok"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let (_, status) = call(&cache, k(), &calls, json!("again")).await;
    assert_eq!(status, CacheStatus::Hit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_on_a_failed_call_get_its_error() {
    let cache = cache(100, 1 << 20, 60);
    let calls = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (cache, calls) = (cache.clone(), Arc::clone(&calls));
            tokio::spawn(async move {
                cache
                    .get_or_compute(
                        key(None, json!("down")),
                        CachePolicy::ENABLED,
                        || async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            Err::<ProviderOutput, _>(ProviderError::Timeout {
                                after: Duration::from_millis(100),
                            })
                        },
                    )
                    .await
            })
        })
        .collect();
    for task in tasks {
        let (out, _) = task.await.unwrap();
        assert!(matches!(out, Err(ProviderError::Timeout { .. })), "{out:?}");
    }
    // Started within microseconds of one another against a 100 ms call: all shared it.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().coalesced, 9);
    cache.run_pending_tasks().await;
    assert_eq!(cache.stats().entries, 0);
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let cache = cache(100, 1 << 20, 1);
    let calls = AtomicUsize::new(0);
    let (_, s1) = call(&cache, key(None, json!(1)), &calls, json!("a")).await;
    let (_, s2) = call(&cache, key(None, json!(1)), &calls, json!("b")).await;
    assert_eq!((s1, s2), (CacheStatus::Miss, CacheStatus::Hit));
    // Expiry is measured with the real clock.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (out, s3) = call(&cache, key(None, json!(1)), &calls, json!("c")).await;
    assert_eq!(s3, CacheStatus::Miss);
    assert_eq!(out.unwrap().output, json!("c"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn expired_entries_are_dropped_and_counted() {
    let cache = cache(100, 1 << 20, 1);
    let calls = AtomicUsize::new(0);
    for i in 0..3 {
        let (out, _) = call(&cache, key(None, json!(i)), &calls, json!("a")).await;
        out.unwrap();
    }
    assert_eq!(cache.stats().entries, 3);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // One found expired by a lookup, the others by the sweep.
    let (_, status) = call(&cache, key(None, json!(0)), &calls, json!("b")).await;
    assert_eq!(status, CacheStatus::Miss);
    cache.run_pending_tasks().await;
    let stats = cache.stats();
    assert_eq!((stats.entries, stats.expirations), (1, 3), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_takes_over_when_the_computing_call_is_dropped() {
    let cache = cache(100, 1 << 20, 60);
    let leader = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_compute(key(None, json!("slow")), CachePolicy::ENABLED, || async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(ProviderOutput::new(json!("never")))
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_compute(key(None, json!("slow")), CachePolicy::ENABLED, || async {
                    Ok(ProviderOutput::new(json!("from the waiter")))
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter should wait for the leader"
    );
    leader.abort();
    let (out, status) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter takes over")
        .unwrap();
    assert_eq!(out.unwrap().output, json!("from the waiter"));
    assert_eq!(status, CacheStatus::Miss);
}

#[tokio::test]
async fn inputs_seen_once_do_not_push_out_repeated_ones() {
    // Room for 100 entries: 20 answers read again and again, then 1,000 inputs seen once each.
    let cache = cache(100, 1 << 20, 60);
    let calls = AtomicUsize::new(0);
    for _ in 0..3 {
        for i in 0..20 {
            let (out, _) = call(
                &cache,
                key(None, json!(format!("hot {i}"))),
                &calls,
                json!(i),
            )
            .await;
            out.unwrap();
        }
    }
    for i in 0..1000 {
        let (out, _) = call(
            &cache,
            key(None, json!(format!("once {i}"))),
            &calls,
            json!(i),
        )
        .await;
        out.unwrap();
    }
    let before = calls.load(Ordering::SeqCst);
    for i in 0..20 {
        let (_, status) = call(
            &cache,
            key(None, json!(format!("hot {i}"))),
            &calls,
            json!(i),
        )
        .await;
        assert_eq!(status, CacheStatus::Hit, "hot {i}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), before);
    assert!(cache.stats().entries <= 100, "{:?}", cache.stats());
}

#[tokio::test]
async fn the_memory_bound_evicts() {
    let max_bytes = 64 * 1024;
    let cache = cache(1000, max_bytes, 60);
    let calls = AtomicUsize::new(0);
    let big = "x".repeat(10 * 1024);
    for i in 0..20 {
        let (out, _) = call(&cache, key(None, json!(i)), &calls, json!(big)).await;
        assert_eq!(out.unwrap().output, json!(big));
        cache.run_pending_tasks().await;
        let stats = cache.stats();
        assert!(stats.weighted_bytes <= max_bytes, "{i}: {stats:?}");
    }
    let stats = cache.stats();
    // Ten-kilobyte answers in 64 KiB: at most six fit.
    assert!(stats.entries <= 6, "{stats:?}");
    assert!(stats.evictions >= 14, "{stats:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 20);
}

#[tokio::test]
async fn an_answer_larger_than_the_cache_is_returned_but_not_kept() {
    let cache = cache(10, 1024, 60);
    let calls = AtomicUsize::new(0);
    let big = json!("y".repeat(4096));
    let (out, _) = call(&cache, key(None, json!(1)), &calls, big.clone()).await;
    assert_eq!(out.unwrap().output, big);
    cache.run_pending_tasks().await;
    assert_eq!(cache.stats().entries, 0);
    assert!(cache.stats().weighted_bytes <= 1024);
}

#[tokio::test]
async fn opt_out_bypasses_the_cache() {
    let cache = cache(100, 1 << 20, 60);
    let calls = AtomicUsize::new(0);
    for i in 0..3 {
        let (out, status) = cache
            .get_or_compute(
                key(None, json!("hot chat")),
                CachePolicy::BYPASS,
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok(ProviderOutput::new(json!(i)))
                },
            )
            .await;
        assert_eq!(status, CacheStatus::Bypassed);
        assert!(!status.served_from_cache());
        assert_eq!(out.unwrap().output, json!(i));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Bypassed calls do not fill the cache either.
    let (_, status) = call(&cache, key(None, json!("hot chat")), &calls, json!("x")).await;
    assert_eq!(status, CacheStatus::Miss);
    assert_eq!(cache.stats().bypassed, 3);
}
