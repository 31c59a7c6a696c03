//! Metric names and the Prometheus exporter.
//!
//! Names follow `inferflow_<area>_<what>_<unit>`, with `_total` for counters. They are constants
//! here so that every emitter and every dashboard agree; each is described once at start-up.
//! The alerts and the dashboard in `deploy/` use these names; `tests/integration/monitoring.rs`
//! runs them on a real Prometheus scraping `inferflow run`, so a rename here fails it.
//! Labels stay low-cardinality: no request ids, keys or error text.
//!
//! The recorder keeps every histogram sample until its upkeep folds them into the buckets.
//! [`install`] runs that upkeep every [`UPKEEP_INTERVAL`] on a thread of its own ([`Upkeep`]), so
//! memory stays flat whether or not anything scrapes `/metrics` (`inferflow run`, and library
//! users who install the recorder). A recorder from [`local`] needs its own [`Upkeep`].

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Seconds since the process started serving (gauge).
pub const UPTIME_SECONDS: &str = "inferflow_uptime_seconds";
/// Readiness probes by outcome and dependency (counter; labels `dependency`, `outcome`).
pub const READINESS_CHECKS_TOTAL: &str = "inferflow_readiness_checks_total";
/// Messages consumed from the requests topic (counter).
pub const REQUESTS_CONSUMED_TOTAL: &str = "inferflow_requests_consumed_total";
/// Results acknowledged by the broker (counter; labels `status`, `error_kind`).
pub const RESULTS_TOTAL: &str = "inferflow_results_total";
/// Dead letters acknowledged by the broker (counter; label `error_kind`).
pub const DEAD_LETTERS_TOTAL: &str = "inferflow_dead_letters_total";
/// From the request's Kafka timestamp to its output's acknowledgement (histogram, seconds).
pub const END_TO_END_LATENCY_SECONDS: &str = "inferflow_end_to_end_latency_seconds";
/// Records per batch (histogram).
pub const BATCH_SIZE_RECORDS: &str = "inferflow_batch_size_records";
/// Time a batch stayed open, first record to flush (histogram, seconds).
pub const BATCH_LINGER_SECONDS: &str = "inferflow_batch_linger_seconds";
/// Records consumed and not yet answered (gauge).
pub const IN_FLIGHT_RECORDS: &str = "inferflow_in_flight_records";
/// Partitions paused for a hold, or for a backpressure stall over a second (gauge).
pub const PAUSED_PARTITIONS: &str = "inferflow_paused_partitions";
/// Consumer lag per partition, from librdkafka statistics (gauge; labels `topic`, `partition`);
/// 0 for a partition this instance does not own (any more).
pub const CONSUMER_LAG_RECORDS: &str = "inferflow_consumer_lag_records";
/// Rebalance events (counter; label `kind`: assign, revoke, lost).
pub const REBALANCES_TOTAL: &str = "inferflow_rebalances_total";
/// Produce attempts refused because librdkafka's queue was full (counter).
pub const PRODUCER_QUEUE_FULL_TOTAL: &str = "inferflow_producer_queue_full_total";
/// Produce attempts that failed and were retried (counter).
pub const PRODUCE_RETRIES_TOTAL: &str = "inferflow_produce_retries_total";
/// Kafka transactions of the exactly-once mode by outcome (counter; label `outcome`: committed,
/// aborted).
pub const TRANSACTIONS_TOTAL: &str = "inferflow_transactions_total";
/// Lookups in the replay store of earlier results (counter; labels `outcome`: hit, miss,
/// error; `tier`: memory, cql).
pub const REPLAY_LOOKUPS_TOTAL: &str = "inferflow_replay_lookups_total";
/// Results written to the replay store's database (counter; label `outcome`: ok, error,
/// skipped when `replay.max_pending_writes` were in flight).
pub const REPLAY_WRITES_TOTAL: &str = "inferflow_replay_writes_total";
/// Calls to a model provider, one per `infer_batch` (counter; labels `provider`, `model`).
pub const PROVIDER_CALLS_TOTAL: &str = "inferflow_provider_calls_total";
/// Inputs sent in provider calls (counter; labels `provider`, `model`).
pub const PROVIDER_INPUTS_TOTAL: &str = "inferflow_provider_inputs_total";
/// Provider outcomes that were errors (counter; labels `provider`, `model`, `kind`: the
/// `ProviderError::label`, e.g. `unavailable`, `timeout`, `invalid_input`).
pub const PROVIDER_ERRORS_TOTAL: &str = "inferflow_provider_errors_total";
/// Duration of one provider call (histogram, seconds; labels `provider`, `model`).
pub const PROVIDER_LATENCY_SECONDS: &str = "inferflow_provider_latency_seconds";
/// Tokens providers reported (counter; labels `provider`, `model`, `type`: prompt, completion).
pub const PROVIDER_TOKENS_TOTAL: &str = "inferflow_provider_tokens_total";
/// Circuit breaker state per provider (gauge: 0 closed, 1 half-open probe, 2 open; label
/// `provider`).
pub const PROVIDER_BREAKER_STATE: &str = "inferflow_provider_breaker_state";
/// Times a provider's circuit breaker opened (counter; label `provider`).
pub const PROVIDER_BREAKER_OPENED_TOTAL: &str = "inferflow_provider_breaker_opened_total";
/// Time spent waiting for a provider's rate limit or for its breaker to close (histogram,
/// seconds; labels `provider`, `wait`: rate_limit, breaker; `stage`: admit, call).
pub const PROVIDER_WAIT_SECONDS: &str = "inferflow_provider_wait_seconds";
/// Result cache lookups (counter; label `outcome`: hit, miss, coalesced, bypassed).
pub const CACHE_LOOKUPS_TOTAL: &str = "inferflow_cache_lookups_total";
/// Pipeline requests by outcome (counter; labels `pipeline`, `outcome`: ok, error).
pub const PIPELINE_REQUESTS_TOTAL: &str = "inferflow_pipeline_requests_total";
/// Time one batch took through a pipeline (histogram, seconds; label `pipeline`).
pub const PIPELINE_DURATION_SECONDS: &str = "inferflow_pipeline_duration_seconds";
/// Time one batch took in one step, retries included (histogram, seconds; labels `pipeline`,
/// `step`).
pub const PIPELINE_STEP_DURATION_SECONDS: &str = "inferflow_pipeline_step_duration_seconds";
/// Requests a step failed for, before `on_error` (counter; labels `pipeline`, `step`, `kind`).
pub const PIPELINE_STEP_ERRORS_TOTAL: &str = "inferflow_pipeline_step_errors_total";
/// Requests sent to a model by a pipeline's model steps (counter; labels `pipeline`, `model`).
pub const PIPELINE_MODEL_REQUESTS_TOTAL: &str = "inferflow_pipeline_model_requests_total";
/// Requests for a routed model name, by the version the route sent them to (counter; label
/// `model`: `name@version`).
pub const ROUTE_REQUESTS_TOTAL: &str = "inferflow_route_requests_total";
/// Requests copied to a route's shadow version, by outcome (counter; labels `model`:
/// `name@version` of the shadow; `outcome`: agreed, disagreed, incomparable, error, timeout,
/// dropped, unpublished).
pub const SHADOW_REQUESTS_TOTAL: &str = "inferflow_shadow_requests_total";
/// Answers of a monitored route's versions (counter; labels `model`, `outcome`: ok, error,
/// empty).
pub const MODEL_OUTPUTS_TOTAL: &str = "inferflow_model_outputs_total";
/// Values at a monitored label path (counter; labels `model`, `path`, `label`: the first 32
/// distinct values, then `other`).
pub const MODEL_OUTPUT_LABELS_TOTAL: &str = "inferflow_model_output_labels_total";
/// Numbers at a monitored score path (histogram, buckets every 0.1 from -1 to 1; labels
/// `model`, `path`).
pub const MODEL_OUTPUT_SCORE: &str = "inferflow_model_output_score";
/// Population stability index of a monitored path, current window against reference (gauge;
/// labels `model`, `path`).
pub const MODEL_OUTPUT_PSI: &str = "inferflow_model_output_psi";
/// Configuration reloads by outcome (counter; label `outcome`: applied, rejected).
pub const RELOADS_TOTAL: &str = "inferflow_reloads_total";
/// Models loaded again after an idle unload, and models unloaded for idleness (counter;
/// labels `model`, `event`: unload, reload).
pub const MODEL_LIFECYCLE_TOTAL: &str = "inferflow_model_lifecycle_total";

/// Messages consumed from the feature-updates topic (counter).
pub const FEATURE_UPDATES_CONSUMED_TOTAL: &str = "inferflow_feature_updates_consumed_total";
/// Feature update writes by outcome (counter; label `outcome`: written, retried, rejected).
pub const FEATURE_WRITES_TOTAL: &str = "inferflow_feature_writes_total";
/// Latency of one feature write to the store (histogram, seconds).
pub const FEATURE_STORE_WRITE_SECONDS: &str = "inferflow_feature_store_write_seconds";
/// Latency of one read from the store, cache misses only (histogram, seconds).
pub const FEATURE_STORE_READ_SECONDS: &str = "inferflow_feature_store_read_seconds";
/// Feature reads by where they were served from (counter; label `source`: cache, store).
pub const FEATURE_READS_TOTAL: &str = "inferflow_feature_reads_total";
/// Hit ratio of the feature cache since start (gauge).
pub const FEATURE_CACHE_HIT_RATIO: &str = "inferflow_feature_cache_hit_ratio";
/// Entries in the feature cache (gauge).
pub const FEATURE_CACHE_ENTRIES: &str = "inferflow_feature_cache_entries";
/// Entries evicted from the full feature cache since start (gauge).
pub const FEATURE_CACHE_EVICTIONS: &str = "inferflow_feature_cache_evictions";
/// From a feature update's Kafka timestamp to its write (histogram, seconds).
pub const FEATURE_INGEST_LAG_SECONDS: &str = "inferflow_feature_ingest_lag_seconds";
/// 1 while feature writes succeed, 0 while ingestion is paused on a failing store (gauge).
pub const FEATURE_STORE_AVAILABLE: &str = "inferflow_feature_store_available";
/// Cached features dropped by invalidations from other writes (counter).
pub const FEATURE_INVALIDATIONS_TOTAL: &str = "inferflow_feature_invalidations_total";
/// From a write's acknowledgement to its invalidation applied here (histogram, seconds).
pub const FEATURE_INVALIDATION_DELAY_SECONDS: &str = "inferflow_feature_invalidation_delay_seconds";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const FAST_LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];
/// Scores of model outputs: every 0.1 from -1 to 1 (signed scores such as VADER's compound,
/// probabilities); anything above 1 counts in `+Inf` only.
const SCORE_BUCKETS: &[f64] = &[
    -1.0, -0.9, -0.8, -0.7, -0.6, -0.5, -0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6,
    0.7, 0.8, 0.9, 1.0,
];
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

fn builder() -> PrometheusBuilder {
    let builder = PrometheusBuilder::new();
    // Bucket lists are constants and valid, so these cannot fail; fall back to summaries if
    // they ever did.
    let with = |b: PrometheusBuilder, name: &str, buckets: &[f64]| {
        b.set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
            .unwrap_or_else(|_| PrometheusBuilder::new())
    };
    let builder = with(builder, END_TO_END_LATENCY_SECONDS, LATENCY_BUCKETS);
    let builder = with(builder, BATCH_LINGER_SECONDS, LATENCY_BUCKETS);
    let builder = with(builder, FEATURE_STORE_WRITE_SECONDS, FAST_LATENCY_BUCKETS);
    let builder = with(builder, FEATURE_STORE_READ_SECONDS, FAST_LATENCY_BUCKETS);
    let builder = with(builder, FEATURE_INGEST_LAG_SECONDS, LATENCY_BUCKETS);
    let builder = with(builder, FEATURE_INVALIDATION_DELAY_SECONDS, LATENCY_BUCKETS);
    let builder = with(builder, PROVIDER_LATENCY_SECONDS, LATENCY_BUCKETS);
    let builder = with(builder, PROVIDER_WAIT_SECONDS, LATENCY_BUCKETS);
    let builder = with(builder, PIPELINE_DURATION_SECONDS, FAST_LATENCY_BUCKETS);
    let builder = with(
        builder,
        PIPELINE_STEP_DURATION_SECONDS,
        FAST_LATENCY_BUCKETS,
    );
    let builder = with(builder, MODEL_OUTPUT_SCORE, SCORE_BUCKETS);
    with(builder, BATCH_SIZE_RECORDS, BATCH_SIZE_BUCKETS)
}

/// How often [`install`]'s upkeep drains the recorded histogram samples into their buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Installs the global Prometheus recorder, describes inferflow's metrics and starts the
/// recorder's [`Upkeep`] for the rest of the process. Returns the handle `/metrics` renders
/// from. Installing twice (tests, embedding) is an error.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = builder().install_recorder()?;
    describe();
    // The global recorder lives as long as the process, and so does its upkeep.
    match Upkeep::start(handle.clone(), UPKEEP_INTERVAL) {
        Ok(upkeep) => upkeep.detach(),
        Err(e) => tracing::warn!(
            error = %e,
            "could not start the metrics upkeep thread: histogram samples are kept until /metrics is read"
        ),
    }
    Ok(handle)
}

/// A recorder that is not installed globally: for tests and for embedding next to another
/// recorder. Nothing drains its histogram samples but rendering; run an [`Upkeep`] for it when
/// nothing renders it regularly.
pub fn local() -> PrometheusHandle {
    builder().build_recorder().handle()
}

/// A thread that runs a recorder's upkeep ([`PrometheusHandle::run_upkeep`]: folding the
/// histogram samples recorded since into their buckets, and freeing them) every interval. It
/// stops when dropped, unless [detached](Self::detach).
#[derive(Debug)]
pub struct Upkeep {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Upkeep {
    /// Starts the thread. Fails only when the operating system refuses a thread.
    pub fn start(handle: PrometheusHandle, interval: Duration) -> std::io::Result<Upkeep> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    handle.run_upkeep();
                }
            })?;
        Ok(Upkeep {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Lets the thread run until the process ends.
    pub fn detach(mut self) {
        // The thread stops when every sender is gone; this one never goes.
        std::mem::forget(self.stop.take());
        self.thread = None;
    }
}

impl Drop for Upkeep {
    fn drop(&mut self) {
        // Dropping the sender wakes and stops the thread.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        PIPELINE_REQUESTS_TOTAL,
        "Pipeline requests by pipeline and outcome."
    );
    describe_histogram!(
        PIPELINE_DURATION_SECONDS,
        Unit::Seconds,
        "Time one batch took through a pipeline."
    );
    describe_histogram!(
        PIPELINE_STEP_DURATION_SECONDS,
        Unit::Seconds,
        "Time one batch took in one pipeline step, retries included."
    );
    describe_counter!(
        PIPELINE_STEP_ERRORS_TOTAL,
        "Requests a pipeline step failed for, by error kind, before on_error."
    );
    describe_counter!(
        PIPELINE_MODEL_REQUESTS_TOTAL,
        "Requests sent to models by pipeline model steps."
    );
    describe_counter!(RELOADS_TOTAL, "Configuration reloads by outcome.");
    describe_counter!(
        ROUTE_REQUESTS_TOTAL,
        "Requests for a routed model name, by the version its weighted route chose."
    );
    describe_counter!(
        MODEL_OUTPUTS_TOTAL,
        "Answers of a monitored route's versions, by outcome (ok, error, empty)."
    );
    describe_counter!(
        MODEL_OUTPUT_LABELS_TOTAL,
        "Values at a monitored label path of a model version's outputs."
    );
    describe_histogram!(
        MODEL_OUTPUT_SCORE,
        "Numbers at a monitored score path of a model version's outputs."
    );
    describe_gauge!(
        MODEL_OUTPUT_PSI,
        "Population stability index of a monitored output path: current window against the reference window."
    );
    describe_counter!(
        SHADOW_REQUESTS_TOTAL,
        "Requests copied to a shadow version, by outcome (agreed, disagreed, incomparable, error, timeout, dropped, unpublished)."
    );
    describe_gauge!(
        UPTIME_SECONDS,
        Unit::Seconds,
        "Seconds since inferflow started serving."
    );
    describe_counter!(
        READINESS_CHECKS_TOTAL,
        "Readiness checks of a dependency, by outcome."
    );
    describe_counter!(
        REQUESTS_CONSUMED_TOTAL,
        "Messages consumed from the requests topic."
    );
    describe_counter!(
        RESULTS_TOTAL,
        "Results acknowledged by the broker, by status and error kind."
    );
    describe_counter!(
        DEAD_LETTERS_TOTAL,
        "Dead letters acknowledged by the broker, by error kind."
    );
    describe_histogram!(
        END_TO_END_LATENCY_SECONDS,
        Unit::Seconds,
        "From the request's Kafka timestamp to the acknowledgement of its result or dead letter."
    );
    describe_histogram!(BATCH_SIZE_RECORDS, Unit::Count, "Records per micro-batch.");
    describe_histogram!(
        BATCH_LINGER_SECONDS,
        Unit::Seconds,
        "Time a micro-batch stayed open."
    );
    describe_gauge!(IN_FLIGHT_RECORDS, "Records consumed and not yet answered.");
    describe_gauge!(
        PAUSED_PARTITIONS,
        "Partitions paused for a hold (failing store, open breaker) or a backpressure stall over 1 s."
    );
    describe_gauge!(
        CONSUMER_LAG_RECORDS,
        "Consumer lag per partition (librdkafka statistics); 0 where this instance does not own the partition."
    );
    describe_counter!(
        REBALANCES_TOTAL,
        "Rebalance events by kind (assign, revoke, lost)."
    );
    describe_counter!(
        PRODUCER_QUEUE_FULL_TOTAL,
        "Produce attempts refused by a full local queue."
    );
    describe_counter!(
        PRODUCE_RETRIES_TOTAL,
        "Failed produce attempts that were retried."
    );
    describe_counter!(
        TRANSACTIONS_TOTAL,
        "Kafka transactions of the exactly-once mode, by outcome (committed, aborted)."
    );
    describe_counter!(
        REPLAY_LOOKUPS_TOTAL,
        "Lookups of redelivered requests in the replay store, by outcome (hit, miss, error) and tier (memory, cql)."
    );
    describe_counter!(
        REPLAY_WRITES_TOTAL,
        "Results written to the replay store's database, by outcome (ok, error, skipped)."
    );
    describe_counter!(
        FEATURE_UPDATES_CONSUMED_TOTAL,
        "Messages consumed from the feature-updates topic."
    );
    describe_counter!(
        FEATURE_WRITES_TOTAL,
        "Feature update writes by outcome (written, retried, rejected)."
    );
    describe_histogram!(
        FEATURE_STORE_WRITE_SECONDS,
        Unit::Seconds,
        "Latency of one feature write to the store."
    );
    describe_histogram!(
        FEATURE_STORE_READ_SECONDS,
        Unit::Seconds,
        "Latency of one read from the feature store on a cache miss."
    );
    describe_counter!(
        FEATURE_READS_TOTAL,
        "Feature reads by where they were served from (cache, store)."
    );
    describe_gauge!(
        FEATURE_CACHE_HIT_RATIO,
        "Hit ratio of the in-process feature cache since start."
    );
    describe_gauge!(FEATURE_CACHE_ENTRIES, "Entries in the feature cache.");
    describe_gauge!(
        FEATURE_CACHE_EVICTIONS,
        "Entries evicted from the full feature cache since start."
    );
    describe_histogram!(
        FEATURE_INGEST_LAG_SECONDS,
        Unit::Seconds,
        "From a feature update's Kafka timestamp to its write."
    );
    describe_gauge!(
        FEATURE_STORE_AVAILABLE,
        "1 while feature writes succeed, 0 while ingestion is paused on a failing store."
    );
    describe_counter!(
        FEATURE_INVALIDATIONS_TOTAL,
        "Cached features dropped by invalidations of newer writes."
    );
    describe_histogram!(
        FEATURE_INVALIDATION_DELAY_SECONDS,
        Unit::Seconds,
        "From a feature write's acknowledgement to its invalidation applied on this instance."
    );
    describe_counter!(
        PROVIDER_CALLS_TOTAL,
        "Calls to a model provider (one per batch call)."
    );
    describe_counter!(PROVIDER_INPUTS_TOTAL, "Inputs sent in provider calls.");
    describe_counter!(
        PROVIDER_ERRORS_TOTAL,
        "Provider outcomes that were errors, by kind."
    );
    describe_histogram!(
        PROVIDER_LATENCY_SECONDS,
        Unit::Seconds,
        "Duration of one provider call, retries included."
    );
    describe_counter!(PROVIDER_TOKENS_TOTAL, "Tokens providers reported, by type.");
    describe_gauge!(
        PROVIDER_BREAKER_STATE,
        "Circuit breaker state: 0 closed, 1 half-open probe, 2 open."
    );
    describe_counter!(
        PROVIDER_BREAKER_OPENED_TOTAL,
        "Times a provider's circuit breaker opened."
    );
    describe_histogram!(
        PROVIDER_WAIT_SECONDS,
        Unit::Seconds,
        "Time waiting for a provider's rate limit or circuit breaker."
    );
    describe_counter!(CACHE_LOOKUPS_TOTAL, "Result cache lookups by outcome.");
    describe_counter!(
        MODEL_LIFECYCLE_TOTAL,
        "Models unloaded for idleness and loaded again."
    );
}
