//! Graceful shutdown: stop accepting, let sessions finish for up to the grace
//! period (`TaskTracker::wait`), cut the rest, stop the control tasks, end the
//! threads.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{info, warn};

use super::drain::wake_all;
use super::Runtime;

/// How long the control tasks (probes, drains, the admin API) get to stop.
const CONTROL_STOP: Duration = Duration::from_secs(2);

impl Runtime {
    /// Stops accepting, waits up to `shutdown_timeout` for sessions to finish, then
    /// closes the rest. Returns whether every session finished within the grace period.
    pub async fn shutdown(self) -> bool {
        let inner = &self.inner;
        inner.shutting_down.store(true, Ordering::Release);
        let (grace, delay) = {
            let rt = &inner.lock().config.runtime;
            (rt.shutdown_timeout, rt.shutdown_delay)
        };
        // /healthz answers 503 from here on: with a delay, keep serving new clients
        // meanwhile, so the keepalived or BGP check moves the address away before
        // anything is refused. A process that handed its sockets to a new one
        // (a binary upgrade) has no clients to wait for.
        if !delay.is_zero() && !self.handed_over() {
            info!(delay = ?delay, "shutting down: /healthz answers 503; still accepting for shutdown_delay");
            tokio::time::sleep(delay).await;
        }
        inner.stop_accept.cancel();
        // Once the accept loops let go, the listening sockets close (unless a new
        // process holds them: a binary upgrade).
        inner.lock().sockets.clear();
        inner.accept_loops.close();
        inner.accept_loops.wait().await;
        // The receive loops have told their UDP sessions to end (UDP has nothing to
        // drain); those are on the same tracker as the TCP sessions.
        inner.sessions.close();
        let open = inner.sessions.len();
        if open > 0 {
            info!(connections = open, grace = ?grace, "stopped accepting; waiting for open connections");
        }
        let graceful = tokio::time::timeout(grace, inner.sessions.wait())
            .await
            .is_ok();
        if !graceful {
            warn!(
                connections = inner.sessions.len(),
                "shutdown_timeout expired; closing the remaining connections"
            );
            inner.hard_stop.cancel();
            let pools: Vec<_> = {
                let st = inner.lock();
                st.pools
                    .values()
                    .chain(&st.removed_pools)
                    .cloned()
                    .collect()
            };
            wake_all(&pools);
            let _ = tokio::time::timeout(Duration::from_secs(5), inner.sessions.wait()).await;
        }
        // Idle upstream HTTP connections and WebSocket tunnels go with the sessions.
        inner.upstreams.close();
        let left = inner.control.stop(CONTROL_STOP).await;
        if left > 0 {
            warn!(tasks = left, "control tasks still running at exit");
        }
        inner.stop_threads.cancel();
        graceful
    }
}
