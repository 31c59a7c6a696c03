//! Criterion's settings for the benches in `benches/`: a one-second warm-up, no plots.
//! Included by each bench with `#[path = "support/criterion.rs"] mod support;`.

use std::time::Duration;

use criterion::Criterion;

/// Criterion taking `samples` samples over `measurement_secs` seconds, after a one-second
/// warm-up, without plots.
pub(crate) fn config(samples: usize, measurement_secs: u64) -> Criterion {
    Criterion::default()
        .sample_size(samples)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(measurement_secs))
        .without_plots()
}
