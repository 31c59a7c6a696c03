//! Metric names and the Prometheus exporter.
//!
//! Names follow `inferflow_<area>_<what>_<unit>`, with `_total` for counters. They are constants
//! here so that every emitter and every dashboard agree; each is described once at start-up.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Seconds since the process started serving (gauge).
pub const UPTIME_SECONDS: &str = "inferflow_uptime_seconds";
/// Readiness probes by outcome and dependency (counter; labels `dependency`, `outcome`).
pub const READINESS_CHECKS_TOTAL: &str = "inferflow_readiness_checks_total";

/// Installs the global Prometheus recorder and describes inferflow's metrics. Returns the handle
/// `/metrics` renders from. Installing twice (tests, embedding) is an error.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    describe();
    Ok(handle)
}

/// A recorder that is not installed globally: for tests and for embedding next to another
/// recorder.
pub fn local() -> PrometheusHandle {
    PrometheusBuilder::new().build_recorder().handle()
}

fn describe() {
    metrics::describe_gauge!(
        UPTIME_SECONDS,
        metrics::Unit::Seconds,
        "Seconds since inferflow started serving."
    );
    metrics::describe_counter!(
        READINESS_CHECKS_TOTAL,
        "Readiness checks of a dependency (kafka, feature_store), by outcome (ok, error)."
    );
}
