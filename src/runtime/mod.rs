//! The engine of a running balancer: threads, listeners, pools, reload, drains,
//! operator actions and shutdown. It knows nothing of the admin API: whoever owns
//! it ([`crate::Flowgate`]) serves that, through this handle.
//!
//! # Layout
//! - [`startup`](self): bind every listener (failing fast with the address and OS
//!   error), start the workers and their accept or receive loops, the probes.
//! - `reload`: a pure [`crate::config::diff`] gives the plan; executing it does
//!   everything fallible (opening the access log, binding new listeners) before it
//!   changes anything.
//! - `drain`: a leaving backend goes Normal -> Draining -> Closed; its last
//!   connection wakes the drain, a deadline cuts what is left.
//! - `ops`: operator actions on one backend (drain, disable, enable, weight).
//! - `shutdown`: stop accepting, let sessions finish for up to the grace period,
//!   cut the rest, stop the control tasks, end the threads.
//! - `threads`: worker threads and the control thread.
//!
//! Workers are OS threads, each driving a tokio runtime: with `worker_model =
//! "per-core"` (default) one single-threaded runtime per worker with its own
//! SO_REUSEPORT socket per listener; with `"shared"` one multi-threaded runtime and
//! one socket per listener. docs/architecture.md has the measurements behind the
//! default. Work beside the sessions (probes, drains, timers, the admin API's
//! connections) runs on the control thread, on one tracker ([`Tasks`]).

mod dns;
mod drain;
mod errors;
mod holder;
mod inherit;
mod ops;
mod reload;
mod shutdown;
mod startup;
mod threads;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::config::{Config, WorkerModel};
use crate::metrics::{Exporter, Inventory};
use crate::pool::Pool;
use crate::proxy::tcp::ListenerShared;
use crate::proxy::udp::UdpListenerShared;
use crate::proxy::Context;
use crate::tasks::Tasks;

pub use crate::metrics::ReloadStats;
pub use errors::{AccessLogError, BindError, OpError, ReloadError, StartError};
pub use holder::holder;
pub use inherit::{Inherited, ListenerKey};

/// A running balancer's engine. Cheap to clone: clones share the same instance.
/// Dropping the last clone stops it at once (use [`Runtime::shutdown`] for a
/// graceful stop).
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("workers", &self.inner.workers)
            .field("worker_model", &self.inner.worker_model)
            .finish_non_exhaustive()
    }
}

/// A handle that does not keep the balancer alive (for the admin server).
#[derive(Clone, Debug)]
pub struct WeakRuntime(std::sync::Weak<Inner>);

impl WeakRuntime {
    pub fn upgrade(&self) -> Option<Runtime> {
        self.0.upgrade().map(|inner| Runtime { inner })
    }
}

/// Applies a new `[log] level`; set by the binary, which owns the subscriber.
type LevelHook = Box<dyn Fn(&str) + Send + Sync>;

struct Inner {
    worker_model: WorkerModel,
    workers: usize,
    /// `runtime.splice` as started (only a restart changes it).
    splice: bool,
    /// `runtime.busy_poll` as started, in microseconds (0: off).
    busy_poll_us: u32,
    /// Runtimes of the data-path workers (one per worker, or one shared).
    handles: Vec<Handle>,
    /// The control runtime's tracked tasks: probes, drains, timers, admin API.
    control: Tasks,
    /// Parent of every listener's `stop_accept`.
    stop_accept: CancellationToken,
    /// Parent of every listener's `cut`: ends every session at once.
    hard_stop: CancellationToken,
    /// Lets worker threads and the control thread return.
    stop_threads: CancellationToken,
    accept_loops: TaskTracker,
    /// Every client session, TCP and UDP.
    sessions: TaskTracker,
    shutting_down: AtomicBool,
    /// A new process took the listening sockets over (see [`Inherited`]); also in
    /// every listener's [`Context`], so UDP sessions outlive their receive loops.
    handed_over: Arc<AtomicBool>,
    /// When this process started, and the process it upgraded, if any.
    started: SystemTime,
    upgraded_from: Option<u32>,
    admin_token: ArcSwapOption<String>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    last_load: Mutex<SystemTime>,
    access_log: Arc<AccessLog>,
    /// Pooled upstream HTTP connections of every http listener.
    upstreams: Arc<crate::proxy::http::Upstreams>,
    /// This instance's metrics recorder (with `[admin]`).
    metrics: Option<Arc<Exporter>>,
    level_hook: OnceLock<LevelHook>,
    /// Wakes the resolver loop (`dns`): the config changed.
    resolver: Arc<tokio::sync::Notify>,
    state: Mutex<State>,
}

struct State {
    config: Config,
    listeners: Vec<RunningListener>,
    udp_listeners: Vec<RunningUdp>,
    pools: HashMap<String, Arc<Pool>>,
    /// Per pool: stops its probe tasks.
    probes: HashMap<String, CancellationToken>,
    /// Per least-load pool: stops its load feed.
    loads: HashMap<String, CancellationToken>,
    /// Pools a reload removed; their backends may still have sessions to cut on a
    /// hard stop.
    removed_pools: Vec<Arc<Pool>>,
    /// Backends the admin API added or removed; `config` has them applied.
    overrides: crate::config::Overrides,
    /// Per listener name: a duplicate of each socket it serves, for an upgrade.
    sockets: HashMap<String, (ListenerKey, Vec<std::os::fd::OwnedFd>)>,
}

/// A TCP listener being served.
#[derive(Clone, Debug)]
pub struct RunningListener {
    pub shared: Arc<ListenerShared>,
    pub local_addr: SocketAddr,
}

/// A UDP listener being served.
#[derive(Clone, Debug)]
pub struct RunningUdp {
    pub shared: Arc<UdpListenerShared>,
    pub local_addr: SocketAddr,
}

impl Runtime {
    pub fn downgrade(&self) -> WeakRuntime {
        WeakRuntime(Arc::downgrade(&self.inner))
    }

    /// The control runtime's tracked tasks (the admin server runs there).
    pub fn control(&self) -> &Tasks {
        &self.inner.control
    }

    /// Runs `f` with this instance's metrics recorder, so histogram handles
    /// created in it (backends, listeners) record there.
    fn scoped<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.inner.metrics {
            Some(m) => m.scope(f),
            None => f(),
        }
    }

    /// What every listener gets from the runtime.
    fn context(&self) -> Context {
        Context {
            access_log: self.inner.access_log.clone(),
            control: self.inner.control.clone(),
            splice: self.inner.splice,
            busy_poll_us: self.inner.busy_poll_us,
            upstreams: self.inner.upstreams.clone(),
            handed_over: self.inner.handed_over.clone(),
        }
    }

    /// When this process started.
    pub fn started(&self) -> SystemTime {
        self.inner.started
    }

    /// The process id of the flowgate this one upgraded, if it did.
    pub fn upgraded_from(&self) -> Option<u32> {
        self.inner.upgraded_from
    }

    /// Lets a reload change the log level: `f` gets the new `[log] level`.
    pub fn set_log_level_hook(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.inner.level_hook.set(Box::new(f));
    }

    /// Reopens the access log's file (SIGUSR1, after logrotate moved it), or
    /// reconnects to syslog.
    pub fn reopen_access_log(&self) {
        self.inner.access_log.reopen();
    }

    /// This instance's access log (the binary flushes it after the instance has
    /// stopped).
    pub fn access_log(&self) -> Arc<AccessLog> {
        self.inner.access_log.clone()
    }

    pub fn reload_stats(&self) -> ReloadStats {
        ReloadStats {
            ok: self.inner.reloads_ok.load(Ordering::Relaxed),
            failed: self.inner.reloads_failed.load(Ordering::Relaxed),
            last_success: *self
                .inner
                .last_load
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// The Prometheus exposition of this instance, or `None` without `[admin]`.
    pub fn render_metrics(&self) -> Option<String> {
        let m = self.inner.metrics.as_ref()?;
        Some(m.render(&self.inventory()))
    }

    /// What a metrics scrape reads.
    pub fn inventory(&self) -> Inventory {
        let st = self.inner.lock();
        Inventory {
            listeners: st.listeners.iter().map(|l| l.shared.clone()).collect(),
            udp_listeners: st.udp_listeners.iter().map(|l| l.shared.clone()).collect(),
            pools: sorted(st.pools.values()),
            reloads: self.reload_stats(),
            access_log_dropped: self.inner.access_log.dropped(),
        }
    }

    /// The address a listener is bound to (its port when the config said 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listener(listener).map(|l| l.local_addr)
    }

    pub fn listener(&self, name: &str) -> Option<RunningListener> {
        self.inner
            .lock()
            .listeners
            .iter()
            .find(|l| &*l.shared.name == name)
            .cloned()
    }

    pub fn listeners(&self) -> Vec<RunningListener> {
        self.inner.lock().listeners.clone()
    }

    pub fn udp_listeners(&self) -> Vec<RunningUdp> {
        self.inner.lock().udp_listeners.clone()
    }

    /// The address UDP listener `name` is bound to.
    pub fn udp_local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.inner
            .lock()
            .udp_listeners
            .iter()
            .find(|l| &*l.shared.name == name)
            .map(|l| l.local_addr)
    }

    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.inner.lock().pools.get(name).cloned()
    }

    /// Pools sorted by name.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        sorted(self.inner.lock().pools.values())
    }

    pub fn admin_token(&self) -> Option<Arc<String>> {
        self.inner.admin_token.load_full()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }

    /// Sessions in progress, all listeners together.
    pub fn active_sessions(&self) -> usize {
        self.inner.sessions.len()
    }

    /// Whether every worker thread and the control thread runs a task within
    /// `within`: the systemd watchdog's question (a thread stuck in a loop or a
    /// blocking call does not answer). The probe tasks are tracked with the
    /// sessions, so shutdown waits for any still queued.
    pub async fn responsive(&self, within: std::time::Duration) -> bool {
        let mut answers = Vec::with_capacity(self.inner.handles.len() + 1);
        let handles = self
            .inner
            .handles
            .iter()
            .chain(std::iter::once(self.inner.control.handle()));
        for h in handles {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            self.inner.sessions.spawn_on(
                async move {
                    let _ = tx.send(());
                },
                h,
            );
            answers.push(rx);
        }
        tokio::time::timeout(within, async {
            for rx in answers {
                if rx.await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false)
    }
}

fn sorted<'a>(pools: impl Iterator<Item = &'a Arc<Pool>>) -> Vec<Arc<Pool>> {
    let mut v: Vec<_> = pools.cloned().collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_accept.cancel();
        self.hard_stop.cancel();
        self.control.stop_token().cancel();
        self.stop_threads.cancel();
    }
}
