//! Which lane a provider call is on: the request path, or a route's shadows.
//!
//! A route's shadow lane ([`manager`](super::manager)) makes its calls inside [`shadow`]. The
//! providers that bound their concurrency with permits (the local provider's
//! `max_concurrency` batches, an HTTP endpoint's `max_concurrency` requests in flight) keep
//! a separate set for those calls ([`Permits`]), so a shadow never holds a permit the primary
//! waits for: a shadow of the same provider as the primary waits for the shadow permits
//! only, and the primary's are the primary's alone.

use std::future::Future;
use std::sync::{Arc, OnceLock, mpsc};

use tokio::sync::{Semaphore, oneshot};

tokio::task_local! {
    /// Set while a shadow lane's call runs.
    static SHADOW: ();
}

/// Runs `call` as a shadow call: the providers it reaches take their shadow permits.
pub(crate) async fn shadow<F: Future>(call: F) -> F::Output {
    SHADOW.scope((), call).await
}

/// Whether the running task is a shadow call.
pub(crate) fn is_shadow() -> bool {
    SHADOW.try_with(|_| ()).is_ok()
}

/// A provider's concurrency permits: the request path's, and the shadows' own.
#[derive(Debug)]
pub(crate) struct Permits {
    primary: Arc<Semaphore>,
    shadow: Arc<Semaphore>,
}

impl Permits {
    /// `primary` permits for the request path, `shadow` for shadow calls.
    pub(crate) fn new(primary: usize, shadow: usize) -> Self {
        Permits {
            primary: Arc::new(Semaphore::new(primary)),
            shadow: Arc::new(Semaphore::new(shadow)),
        }
    }

    /// The permits of the running call's lane.
    pub(crate) fn current(&self) -> &Arc<Semaphore> {
        if is_shadow() {
            &self.shadow
        } else {
            &self.primary
        }
    }
}

/// A piece of CPU work for the idle-priority thread.
type Job = Box<dyn FnOnce() + Send>;

/// Runs a provider's CPU work (a local model's batch) off the async runtime: a shadow call's
/// on the one thread of idle CPU priority (Linux `SCHED_IDLE`), so that a shadow only gets the
/// CPU the request path leaves unused and cannot lengthen the primary's tail by taking a core
/// from it; any other call's on Tokio's blocking pool. Only the computation moves there: the
/// shadow's I/O (HTTP providers, its Kafka comparisons) stays on the runtime.
///
/// The thread's queue holds at most one job per shadow permit (the caller moves its permit
/// into `work`). On a saturated machine a shadow waits, its lane's queue fills and the lane
/// drops (and counts) batches, as it does for a slow shadow. `Err` when the work panicked.
pub(crate) async fn compute<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    if !is_shadow() {
        return tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| e.to_string());
    }
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
        let _ = tx.send(outcome.map_err(|_| "the computation panicked".to_owned()));
    });
    match idle_thread().and_then(|jobs| jobs.send(job).ok()) {
        Some(()) => rx
            .await
            .unwrap_or_else(|_| Err("the idle-priority thread stopped".into())),
        // No idle thread (it could not be started, logged): the shadow call fails, counted
        // as a shadow error; the request path never runs here.
        None => Err("no idle-priority thread for shadow computations".into()),
    }
}

/// The idle-priority thread's queue, started on first use; `None` if it cannot be started.
fn idle_thread() -> Option<&'static mpsc::Sender<Job>> {
    static JOBS: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();
    JOBS.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("inferflow-shadow-cpu".into())
            .spawn(move || {
                idle_priority();
                for job in rx {
                    job();
                }
            });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "no thread for shadow computations: local shadows fail");
                None
            }
        }
    })
    .as_ref()
}

/// Puts the calling thread in the idle scheduling class (Linux `SCHED_IDLE`); elsewhere, or
/// when the kernel refuses, it keeps its priority (logged). Threads it starts afterwards
/// inherit the class.
pub(crate) fn idle_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid parameter.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if rc != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "a shadow thread keeps normal priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_shadow_call_takes_the_shadow_permits_only() {
        let permits = Permits::new(1, 1);
        let held = Arc::clone(permits.current()).acquire_owned().await.unwrap();
        assert_eq!(permits.primary.available_permits(), 0);
        // The primary's only permit is taken: a shadow call still gets one of its own.
        let shadow = shadow(async { Arc::clone(permits.current()).try_acquire_owned() }).await;
        assert!(
            shadow.is_ok(),
            "a shadow call waited for the primary's permit"
        );
        assert_eq!(permits.shadow.available_permits(), 0);
        drop((held, shadow));
        assert_eq!(permits.primary.available_permits(), 1);
    }

    /// A shadow call's computation runs on the idle-priority thread, a primary call's on the
    /// blocking pool.
    #[tokio::test]
    async fn a_shadow_computation_runs_at_idle_priority() {
        fn policy() -> (String, i32) {
            let name = std::thread::current().name().unwrap_or_default().to_owned();
            // SAFETY: reads the calling thread's scheduling policy.
            (name, unsafe { libc::sched_getscheduler(0) })
        }
        let (name, class) = shadow(compute(policy)).await.unwrap();
        assert_eq!(name, "inferflow-shadow-cpu");
        assert_eq!(class, libc::SCHED_IDLE);
        let (name, class) = compute(policy).await.unwrap();
        assert_ne!(name, "inferflow-shadow-cpu");
        assert_eq!(class, libc::SCHED_OTHER);
        let panicked = shadow(compute(|| panic!("boom"))).await;
        assert!(panicked.is_err());
        // The thread survives a panicking job.
        assert!(shadow(compute(|| 1)).await.is_ok());
    }
}
