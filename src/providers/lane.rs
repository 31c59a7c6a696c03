//! Which lane a provider call is on: the request path, or a route's shadows.
//!
//! A route's shadow lane ([`manager`](super::manager)) makes its calls inside [`shadow`]. The
//! providers that bound their concurrency with permits (the local provider's
//! `max_concurrency` batches, an HTTP endpoint's `max_concurrency` requests in flight) keep
//! a separate set for those calls ([`Permits`]), so a shadow never holds a permit the primary
//! waits for: a shadow of the same provider as the primary waits for the shadow permits
//! only, and the primary's are the primary's alone.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;

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
}
