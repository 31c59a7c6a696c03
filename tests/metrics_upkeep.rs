//! The installed Prometheus recorder keeps histogram samples until its upkeep folds them into
//! buckets. Without a scraper nothing else does, so this runs steady load with nothing reading
//! `/metrics` and measures, with a counting global allocator (this test binary's own), how much
//! of what was recorded is still held: bounded by a few upkeep intervals, not growing with the
//! run. A test binary of its own, because it installs the global recorder and allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use inferflow::metrics::{PIPELINE_DURATION_SECONDS, UPKEEP_INTERVAL, install};

/// Bytes allocated and not freed, process-wide.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which is `System.alloc`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn histogram_samples_do_not_pile_up_without_a_scraper() {
    let _handle = install().expect("the first recorder installs");
    let histogram = metrics::histogram!(PIPELINE_DURATION_SECONDS, "pipeline" => "upkeep");
    // Warm-up: the histogram, its buckets and the upkeep thread exist before the baseline.
    histogram.record(0.001);
    std::thread::sleep(UPKEEP_INTERVAL * 2);
    let baseline = LIVE.load(Ordering::Relaxed);

    // Steady load for sixteen upkeep intervals, 20,000 samples every 50 ms, never rendered.
    const PER_ROUND: usize = 20_000;
    let run = UPKEEP_INTERVAL * 16;
    let started = Instant::now();
    let mut recorded = 0usize;
    let mut peak = baseline;
    while started.elapsed() < run {
        for i in 0..PER_ROUND {
            histogram.record((i % 1000) as f64 / 1000.0);
        }
        recorded += PER_ROUND;
        peak = peak.max(LIVE.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(50));
    }
    let held = LIVE.load(Ordering::Relaxed) - baseline;
    let peak = peak - baseline;
    // Every sample kept would be at least 8 bytes each.
    let all = (recorded * std::mem::size_of::<f64>()) as isize;
    eprintln!(
        "recorded {recorded} samples ({} KiB as f64): held {} KiB at the end, peak {} KiB",
        all / 1024,
        held / 1024,
        peak / 1024
    );
    assert!(
        held < all / 4 && peak < all / 3,
        "the recorder holds {held} bytes (peak {peak}) of {all} bytes of samples: nothing drains them"
    );
}
