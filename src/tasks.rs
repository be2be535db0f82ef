//! Where control-plane work runs: one runtime handle, one tracker, one stop token.
//!
//! Everything that runs beside the sessions (health probes, slow-start ramps,
//! passive-ejection timers, drains, the admin API's connections, metrics upkeep) is
//! spawned through [`Tasks`], so shutdown can stop it and wait for it: no task
//! escapes tracking.

use std::future::Future;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A tracked place to run background work (cheap to clone).
#[derive(Clone, Debug)]
pub struct Tasks {
    handle: Handle,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    pub fn new(handle: Handle) -> Tasks {
        Tasks {
            handle,
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }

    /// Runs `f` to completion, tracked. `f` should watch [`Tasks::stop_token`]
    /// if it can run for long.
    /// The runtime these tasks run on.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub fn spawn<F>(&self, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn_on(f, &self.handle);
    }

    /// Runs `f`, tracked, and drops it when [`Tasks::stop`] is called.
    pub fn spawn_until_stop<F>(&self, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        self.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = f => {}
            }
        });
    }

    /// Fires when the owner stops this work.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Stops every task started with [`Tasks::spawn_until_stop`] (and those that
    /// watch the token) and waits up to `limit` for all of them to end. Returns
    /// how many were still running then.
    pub async fn stop(&self, limit: std::time::Duration) -> usize {
        self.stop.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(limit, self.tracker.wait()).await;
        self.tracker.len()
    }
}

/// Waits until `done()` holds, re-checking each time `notify` wakes its waiters.
/// The waiter registers before it checks, so a wake between the check and the wait
/// is not lost. The side that makes `done()` true calls `notify_waiters()`.
pub async fn wait_for(notify: &tokio::sync::Notify, done: impl Fn() -> bool) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}
