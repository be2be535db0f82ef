//! Drains: a backend or listener that leaves stops taking new connections, its
//! open ones finish, and a deadline cuts what is left.
//!
//! A backend goes Normal -> Draining -> Closed (when a reload removed it). The
//! drain waits on events, not a timer: the backend's last connection wakes it
//! ([`Backend::drained`]), and so does a pool that has a usable backend again
//! ([`Pool::usable`]), for a removed backend that stays as a fallback meanwhile.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::Runtime;
use crate::backend::{flag, Backend};
use crate::pool::Pool;
use crate::proxy::tcp::ListenerShared;

impl Runtime {
    /// Marks `b` draining and, on the control runtime, waits for its last connection
    /// or the deadline, then cuts what is left. `retire` (a reload removed it) closes
    /// it afterwards and drops it from the API.
    pub(super) fn drain_backend(
        &self,
        pool: Arc<Pool>,
        b: Arc<Backend>,
        timeout: Duration,
        retire: bool,
    ) {
        b.set_flag(flag::DRAINING);
        // Its idle upstream HTTP connections close now; requests in flight finish.
        self.inner.upstreams.forget(&b);
        self.inner.control.spawn_until_stop(async move {
            let drained = async {
                loop {
                    settle(&pool, &b, retire).await;
                    // A removed backend leaves the fallback list only once idle,
                    // checked under the lock that fallback picks claim under.
                    if !retire || b.flags() & flag::DRAINING == 0 || pool.retire_if_idle(&b) {
                        // (DRAINING cleared: an operator enabled it, or a reload
                        // took a removed backend back.)
                        return;
                    }
                }
            };
            // Only a backend still draining at the deadline is cut: not one an
            // operator enabled, or a reload took back, meanwhile.
            if tokio::time::timeout(timeout, drained).await.is_err() && b.flags() & flag::DRAINING != 0 {
                warn!(pool = %pool.name, backend = %b.name, open = b.active(), "drain_timeout passed: closing remaining connections");
                b.cut_sessions();
            }
            if b.flags() & flag::DRAINING != 0 {
                info!(pool = %pool.name, backend = %b.name, "drain complete");
            }
            if retire && pool.finish_retiring(&b) {
                b.close();
            }
        });
    }

    /// Stops a listener's accept loops now and cuts its sessions after `grace`.
    pub(super) fn retire_listener(&self, shared: Arc<ListenerShared>, grace: Duration) {
        shared.stop_accept.cancel();
        self.inner.control.spawn_until_stop(async move {
            if tokio::time::timeout(grace, shared.drained()).await.is_err() {
                warn!(listener = %shared.name, "drain_timeout passed: closing the removed listener's connections");
                shared.retired.store(true, std::sync::atomic::Ordering::Relaxed);
                shared.cut.cancel();
                wake_all(&shared.settings().pools());
            }
        });
    }
}

/// Resolves when `b` has no connection left (or an operator enabled it again).
/// A backend a reload removed also stays as a fallback (see `Pool::pick`) until
/// its replacements are usable, so a reload never refuses a client: it is not done
/// before then.
async fn settle(pool: &Pool, b: &Backend, retire: bool) {
    loop {
        b.drained().await;
        if b.flags() & flag::DRAINING == 0 {
            return;
        }
        if !retire || pool.has_usable() {
            if b.active() == 0 {
                return;
            }
            continue;
        }
        // Until a backend of the pool is usable, or this one is taken back.
        tokio::select! {
            _ = pool.usable() => {}
            _ = b.undrained() => {}
        }
    }
}

/// Wakes every session of these pools' backends (current and retiring) so they
/// re-check their listener's cut.
pub(super) fn wake_all(pools: &[Arc<Pool>]) {
    for p in pools {
        for b in p.backends().iter().chain(&p.retiring()) {
            b.wake_sessions();
        }
    }
}
