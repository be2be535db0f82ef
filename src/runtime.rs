//! Workers, startup, reload, operator actions and graceful shutdown.
//!
//! `Flowgate::start` binds every listener (failing fast with the address and OS
//! error), starts the workers and their accept loops, the control runtime (health
//! probes, drains, admin API) and returns a handle. Workers are OS threads, each
//! driving a tokio runtime: with `worker_model = "per-core"` (default) one
//! single-threaded runtime per worker with its own SO_REUSEPORT socket per listener;
//! with `"shared"` one multi-threaded runtime and one socket per listener.
//! docs/architecture.md has the measurements behind the default.
//!
//! Reload applies a new config without touching what stays: kept listeners keep their
//! sockets and accept loops, kept backends keep their `Arc` (health, counters,
//! operator state). Removed backends and listeners drain under the pool's
//! `drain_timeout`.
//!
//! Shutdown: stop accepting (close the listening sockets), let sessions finish for up
//! to the grace period (`TaskTracker::wait`), then cancel the rest.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::{flag, Backend};
use crate::config::Protocol;
use crate::config::{Config, ConfigError, ListenerConfig, WorkerModel};
use crate::health;
use crate::listener::{self, ListenerSettings, ListenerShared};
use crate::pool::Pool;
use crate::proxy::udp::{self, UdpListenerShared, UdpSettings};

/// A listening socket that could not be bound (at start or on reload).
#[derive(Debug, thiserror::Error)]
#[error("listener {listener:?}: cannot bind {addr}: {source}")]
pub struct BindError {
    pub listener: String,
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// The access log's file could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("log.access_log: cannot open {path}: {source}")]
pub struct AccessLogError {
    pub path: String,
    #[source]
    pub source: io::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
    #[error("cannot start worker threads: {0}")]
    Workers(#[source] io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
    #[error("no configuration file to reload from (started from an in-memory config)")]
    NoSource,
    #[error("shutting down")]
    ShuttingDown,
}

/// What an operator action on one backend can fail with.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("no pool named {0:?}")]
    NoPool(String),
    #[error("pool {pool:?} has no backend {backend:?}")]
    NoBackend { pool: String, backend: String },
    #[error("weight {0} is out of range: expected 1..=1000")]
    BadWeight(u32),
}

/// A running balancer. Cheap to clone: clones share the same instance. Dropping the
/// last clone stops it at once (use [`Flowgate::shutdown`] for a graceful stop).
#[derive(Clone)]
pub struct Flowgate {
    inner: Arc<Inner>,
}

/// A handle that does not keep the balancer alive (for the admin server).
#[derive(Clone)]
pub struct WeakFlowgate(std::sync::Weak<Inner>);

impl WeakFlowgate {
    pub fn upgrade(&self) -> Option<Flowgate> {
        self.0.upgrade().map(|inner| Flowgate { inner })
    }
}

struct Inner {
    worker_model: WorkerModel,
    workers: usize,
    /// Runtimes of the data-path workers (one per worker, or one shared).
    handles: Vec<Handle>,
    /// The control runtime: health probes, drains, admin API.
    control: Handle,
    /// Parent of every listener's `stop_accept`.
    stop_accept: CancellationToken,
    /// Parent of every listener's `cut`: ends every session at once.
    hard_stop: CancellationToken,
    /// Lets worker threads and the control thread return.
    stop_threads: CancellationToken,
    accept_loops: TaskTracker,
    sessions: TaskTracker,
    shutting_down: AtomicBool,
    admin_token: ArcSwapOption<String>,
    admin_addr: Mutex<Option<SocketAddr>>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    last_load: Mutex<SystemTime>,
    state: Mutex<State>,
}

/// Reload outcomes, for `flowgate_config_reloads_total`.
pub struct ReloadStats {
    pub ok: u64,
    pub failed: u64,
    /// The last successful load: startup or reload.
    pub last_success: SystemTime,
}

/// The default `max_sessions` of each UDP listener of `cfg`.
fn udp_default_max(cfg: &Config) -> usize {
    let n = cfg
        .listeners
        .iter()
        .filter(|l| l.protocol == Protocol::Udp)
        .count();
    udp::default_max_sessions(n)
}

/// Applies a new `[log] level`; set by the binary, which owns the subscriber.
type LevelHook = Box<dyn Fn(&str) + Send + Sync>;
static LOG_LEVEL_HOOK: std::sync::OnceLock<LevelHook> = std::sync::OnceLock::new();

/// Lets a reload change the log level: `f` gets the new `[log] level`.
pub fn set_log_level_hook(f: impl Fn(&str) + Send + Sync + 'static) {
    let _ = LOG_LEVEL_HOOK.set(Box::new(f));
}

/// Applies the access-log part of `[log]`; a file that cannot be opened is an error.
fn configure_access_log(log: &crate::config::LogConfig) -> Result<(), AccessLogError> {
    crate::access_log::configure(&log.access_log, log.format).map_err(|source| AccessLogError {
        path: match &log.access_log {
            crate::config::AccessLogDest::File(p) => p.display().to_string(),
            d => format!("{d:?}"),
        },
        source,
    })
}

struct State {
    config: Config,
    listeners: Vec<RunningListener>,
    udp_listeners: Vec<RunningUdp>,
    pools: HashMap<String, Arc<Pool>>,
    /// Per pool: stops its probe tasks.
    probes: HashMap<String, CancellationToken>,
    /// Pools a reload removed; their backends may still have sessions to cut on a
    /// hard stop.
    removed_pools: Vec<Arc<Pool>>,
}

#[derive(Clone)]
pub struct RunningListener {
    pub shared: Arc<ListenerShared>,
    pub local_addr: SocketAddr,
}

/// A UDP listener being served.
#[derive(Clone)]
pub struct RunningUdp {
    pub shared: Arc<UdpListenerShared>,
    pub local_addr: SocketAddr,
}

/// Sockets bound for one listener, one per worker (or one).
enum Bound {
    Tcp(Vec<std::net::TcpListener>),
    Udp(Vec<std::net::UdpSocket>),
}

impl Flowgate {
    pub fn start(config: Config) -> Result<Flowgate, StartError> {
        crate::proxy::set_splice(config.runtime.splice);
        // Before any backend or listener exists: they register their histograms.
        if config.admin.is_some() {
            crate::metrics::install();
        }
        configure_access_log(&config.log)?;
        let stop_threads = CancellationToken::new();
        let (handles, control) = spawn_threads(
            config.runtime.worker_model,
            config.runtime.workers,
            &stop_threads,
        )
        .map_err(StartError::Workers)?;
        let inner = Arc::new(Inner {
            worker_model: config.runtime.worker_model,
            workers: config.runtime.workers,
            handles,
            control,
            stop_accept: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            stop_threads,
            accept_loops: TaskTracker::new(),
            sessions: TaskTracker::new(),
            shutting_down: AtomicBool::new(false),
            admin_token: ArcSwapOption::from(
                config
                    .admin
                    .as_ref()
                    .and_then(|a| a.token.clone())
                    .map(Arc::new),
            ),
            admin_addr: Mutex::new(None),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_load: Mutex::new(SystemTime::now()),
            state: Mutex::new(State {
                config: config.clone(),
                listeners: Vec::new(),
                udp_listeners: Vec::new(),
                pools: HashMap::new(),
                probes: HashMap::new(),
                removed_pools: Vec::new(),
            }),
        });
        let fg = Flowgate { inner };

        // Bind everything before serving anything, so a bad address fails fast.
        let mut bound = Vec::new();
        for l in &config.listeners {
            let sockets = fg.bind_listener(l)?;
            bound.push((l, sockets));
        }
        let admin = match &config.admin {
            Some(a) => Some(listener::bind(a.bind, 128).map_err(|source| BindError {
                listener: "admin".into(),
                addr: a.bind,
                source,
            })?),
            None => None,
        };

        {
            let mut st = fg.inner.lock();
            for p in &config.pools {
                let pool = Pool::new(p);
                fg.start_probes(&mut st, &pool);
                st.pools.insert(p.name.clone(), pool);
            }
            for (l, sockets) in bound {
                let pool = st.pools[&l.pool].clone();
                fg.serve(&mut st, l, pool, sockets, udp_default_max(&config));
            }
            // Only TCP backends can be tried with a connect.
            let tcp_pools: std::collections::HashSet<&str> = config
                .listeners
                .iter()
                .filter(|l| l.protocol == Protocol::Tcp)
                .map(|l| l.pool.as_str())
                .collect();
            let pools: Vec<_> = st.pools.values().cloned().collect();
            let unchecked: Vec<_> = pools
                .into_iter()
                .filter(|p| p.config().health_check.is_none() && tcp_pools.contains(&*p.name))
                .collect();
            fg.inner.control.spawn(report_unreachable(unchecked));
        }
        if let Some(sock) = admin {
            let addr = sock.local_addr().ok();
            *fg.inner
                .admin_addr
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = addr;
            let weak = WeakFlowgate(Arc::downgrade(&fg.inner));
            fg.inner
                .control
                .spawn(async move { crate::admin::serve(sock, weak).await });
            fg.inner.control.spawn(crate::metrics::upkeep());
            info!(addr = ?addr, "admin API listening");
        }
        Ok(fg)
    }

    /// Binds the sockets for one listener: one per worker (SO_REUSEPORT), or one.
    fn bind_listener(&self, l: &ListenerConfig) -> Result<Bound, BindError> {
        let count = match self.inner.worker_model {
            WorkerModel::PerCore => self.inner.workers,
            WorkerModel::Shared => 1,
        };
        let err = |addr, source| BindError {
            listener: l.name.clone(),
            addr,
            source,
        };
        if l.protocol == Protocol::Udp {
            let first = udp::bind(l.bind).map_err(|e| err(l.bind, e))?;
            let local = first.local_addr().map_err(|e| err(l.bind, e))?;
            let mut sockets = vec![first];
            for _ in 1..count {
                sockets.push(udp::bind(local).map_err(|e| err(local, e))?);
            }
            return Ok(Bound::Udp(sockets));
        }
        let first = listener::bind(l.bind, l.backlog).map_err(|e| err(l.bind, e))?;
        let local = first.local_addr().map_err(|e| err(l.bind, e))?;
        let mut sockets = vec![first];
        for _ in 1..count {
            sockets.push(listener::bind(local, l.backlog).map_err(|e| err(local, e))?);
        }
        Ok(Bound::Tcp(sockets))
    }

    /// Serves a freshly bound listener and enters it in `st`.
    /// `udp_max` is the default `max_sessions` (see [`udp_default_max`]).
    fn serve(
        &self,
        st: &mut State,
        l: &ListenerConfig,
        pool: Arc<Pool>,
        sockets: Bound,
        udp_max: usize,
    ) {
        match sockets {
            Bound::Tcp(s) => {
                let running = self.serve_listener(l, pool, s);
                st.listeners.push(running);
            }
            Bound::Udp(s) => {
                let running = self.serve_udp(l, pool, s, udp_max);
                st.udp_listeners.push(running);
            }
        }
    }

    /// Runs `task` for each socket, the sockets spread over the workers in turn.
    fn spawn_per_worker<S, F>(&self, sockets: Vec<S>, mut task: impl FnMut(S) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        for (i, socket) in sockets.into_iter().enumerate() {
            let handle = &self.inner.handles[i % self.inner.handles.len()];
            self.inner.accept_loops.spawn_on(task(socket), handle);
        }
    }

    /// Starts a UDP listener's receive loops on bound sockets.
    fn serve_udp(
        &self,
        l: &ListenerConfig,
        pool: Arc<Pool>,
        sockets: Vec<std::net::UdpSocket>,
        default_max: usize,
    ) -> RunningUdp {
        let local_addr = sockets[0].local_addr().unwrap_or(l.bind);
        let shared = UdpListenerShared::new(
            l,
            UdpSettings::new(l, pool, default_max),
            self.inner.stop_accept.child_token(),
            self.inner.hard_stop.child_token(),
        );
        self.spawn_per_worker(sockets, |socket| {
            udp::recv_loop(socket, shared.clone(), self.inner.sessions.clone())
        });
        info!(listener = %l.name, addr = %local_addr, pool = %l.pool, protocol = "udp", "listening");
        RunningUdp { shared, local_addr }
    }

    /// Starts accept loops on bound sockets.
    fn serve_listener(
        &self,
        l: &ListenerConfig,
        pool: Arc<Pool>,
        sockets: Vec<std::net::TcpListener>,
    ) -> RunningListener {
        let local_addr = sockets[0].local_addr().unwrap_or(l.bind);
        let shared = ListenerShared::new(
            l,
            pool,
            self.inner.stop_accept.child_token(),
            self.inner.hard_stop.child_token(),
        );
        self.spawn_per_worker(sockets, |socket| {
            listener::accept_loop(socket, shared.clone(), self.inner.sessions.clone())
        });
        info!(listener = %l.name, addr = %local_addr, pool = %l.pool, "listening");
        RunningListener { shared, local_addr }
    }

    fn start_probes(&self, st: &mut State, pool: &Arc<Pool>) {
        if let Some(old) = st.probes.remove(&*pool.name) {
            old.cancel();
        }
        if let Some(hc) = pool.config().health_check.clone() {
            let stop = CancellationToken::new();
            health::spawn(pool, Arc::new(hc), &stop, &self.inner.control);
            st.probes.insert(pool.name.to_string(), stop);
        }
    }

    /// Re-reads the file the running config came from and applies it.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let r = (|| {
            let source = self.inner.lock().config.source.clone();
            let path = source.ok_or(ReloadError::NoSource)?;
            let cfg = Config::load(&path)?;
            self.apply(cfg)
        })();
        match &r {
            Ok(()) => {
                self.inner.reloads_ok.fetch_add(1, Ordering::Relaxed);
                *self
                    .inner
                    .last_load
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = SystemTime::now();
            }
            Err(_) => {
                self.inner.reloads_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
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

    /// Applies `new` atomically with respect to errors: if a new listener cannot bind,
    /// nothing changes.
    pub fn apply(&self, mut new: Config) -> Result<(), ReloadError> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(ReloadError::ShuttingDown);
        }
        let mut st = self.inner.lock();
        if new.source.is_none() {
            new.source = st.config.source.clone();
        }
        let same_socket = |old: &RunningListener, l: &ListenerConfig| {
            l.protocol == Protocol::Tcp
                && *old.shared.name == *l.name
                && old.shared.settings().bind == l.bind
        };
        let same_udp = |old: &RunningUdp, l: &ListenerConfig| {
            l.protocol == Protocol::Udp
                && *old.shared.name == *l.name
                && old.shared.settings().bind == l.bind
        };

        // 0. A new access-log file must open, or nothing changes.
        if new.log.access_log != st.config.log.access_log {
            if let crate::config::AccessLogDest::File(p) = &new.log.access_log {
                crate::access_log::check(p).map_err(|source| AccessLogError {
                    path: p.display().to_string(),
                    source,
                })?;
            }
        }

        // 1. Bind new listeners first; failure leaves everything as it was.
        let mut fresh = Vec::new();
        for l in &new.listeners {
            let kept = st.listeners.iter().any(|o| same_socket(o, l))
                || st.udp_listeners.iter().any(|o| same_udp(o, l));
            if !kept {
                let sockets = self.bind_listener(l)?;
                fresh.push((l.clone(), sockets));
            }
        }

        // 2. Pools: update kept ones, create new ones, drain removed ones.
        let mut pools = HashMap::new();
        for p in &new.pools {
            let pool = match st.pools.get(&p.name) {
                Some(pool) => {
                    let removed = pool.update(p);
                    for b in removed {
                        info!(pool = %p.name, backend = %b.name, "backend removed by reload: draining");
                        pool.add_retiring(b.clone());
                        self.drain_backend(pool.clone(), b, p.drain_timeout, true);
                    }
                    pool.clone()
                }
                None => Pool::new(p),
            };
            pools.insert(p.name.clone(), pool);
        }
        let old_pools: Vec<_> = st.pools.drain().collect();
        for (name, old) in old_pools {
            if !pools.contains_key(&name) {
                info!(pool = %name, "pool removed by reload: draining its backends");
                let drain = old.config().drain_timeout;
                for b in old.backends() {
                    self.drain_backend(old.clone(), b, drain, false);
                }
                if let Some(stop) = st.probes.remove(&name) {
                    stop.cancel();
                }
                st.removed_pools.push(old);
            }
        }
        st.pools = pools;
        let all: Vec<_> = st.pools.values().cloned().collect();
        for pool in &all {
            self.start_probes(&mut st, pool);
            health::report_all_down(pool);
        }

        // 3. Listeners: keep sockets of kept ones, stop removed ones, start new ones.
        let mut listeners = Vec::new();
        for old in std::mem::take(&mut st.listeners) {
            match new.listeners.iter().find(|l| same_socket(&old, l)) {
                Some(l) => {
                    old.shared
                        .set_settings(ListenerSettings::new(l, st.pools[&l.pool].clone()));
                    listeners.push(old);
                }
                None => {
                    let grace = old.shared.settings().pool.config().drain_timeout;
                    info!(listener = %old.shared.name, "listener removed by reload: closing it, draining its connections");
                    self.retire_listener(old.shared, grace);
                }
            }
        }
        st.listeners = listeners;
        let mut udp_listeners = Vec::new();
        for old in std::mem::take(&mut st.udp_listeners) {
            match new.listeners.iter().find(|l| same_udp(&old, l)) {
                Some(l) => {
                    old.shared.set_settings(UdpSettings::new(
                        l,
                        st.pools[&l.pool].clone(),
                        udp_default_max(&new),
                    ));
                    udp_listeners.push(old);
                }
                None => {
                    info!(listener = %old.shared.name, "UDP listener removed by reload: closing it and its sessions");
                    old.shared.stop.cancel();
                }
            }
        }
        st.udp_listeners = udp_listeners;
        for (l, sockets) in fresh {
            let pool = st.pools[&l.pool].clone();
            self.serve(&mut st, &l, pool, sockets, udp_default_max(&new));
        }

        // 4. What only a restart can change.
        if new.runtime.workers != st.config.runtime.workers
            || new.runtime.worker_model != st.config.runtime.worker_model
        {
            warn!("runtime.workers and runtime.worker_model only change on restart");
        }
        if new.admin.as_ref().map(|a| a.bind) != st.config.admin.as_ref().map(|a| a.bind) {
            warn!("admin.bind only changes on restart");
        }
        if new.runtime.splice != st.config.runtime.splice {
            warn!("runtime.splice only changes on restart");
        }
        if new.log.format != st.config.log.format {
            warn!("log.format changes the access log now; flowgate's own log changes on restart");
        }
        if new.log.access_log != st.config.log.access_log || new.log.format != st.config.log.format
        {
            configure_access_log(&new.log)?;
        }
        if new.log.level != st.config.log.level {
            if let Some(hook) = LOG_LEVEL_HOOK.get() {
                hook(&new.log.level);
            }
        }
        if new.admin.is_some() && !crate::metrics::enabled() {
            warn!("metrics start with the admin listener, on restart");
        }
        self.inner.admin_token.store(
            new.admin
                .as_ref()
                .and_then(|a| a.token.clone())
                .map(Arc::new),
        );
        st.config = new;
        info!("configuration reloaded");
        Ok(())
    }

    /// Marks `b` draining and, on the control runtime, waits for its last connection or
    /// the deadline, then cuts what is left. `retire` drops it from the API afterwards.
    fn drain_backend(&self, pool: Arc<Pool>, b: Arc<Backend>, timeout: Duration, retire: bool) {
        b.set_flag(flag::DRAINING);
        self.inner.control.spawn(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            // A backend removed by a reload also stays as a fallback (see Pool::pick)
            // until its replacements are usable, so a reload never refuses a client.
            let busy = |b: &Backend| b.active() > 0 || (retire && !pool.has_usable());
            while busy(&b) && b.flags() & flag::DRAINING != 0 {
                if tokio::time::Instant::now() >= deadline {
                    warn!(pool = %pool.name, backend = %b.name, open = b.active(), "drain_timeout passed: closing remaining connections");
                    b.cut_sessions();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if b.flags() & flag::DRAINING != 0 {
                info!(pool = %pool.name, backend = %b.name, "drain complete");
            }
            if retire {
                pool.remove_retiring(&b);
            }
        });
    }

    /// Stops a listener's accept loops now and cuts its sessions after `grace`.
    fn retire_listener(&self, shared: Arc<ListenerShared>, grace: Duration) {
        shared.stop_accept.cancel();
        self.inner.control.spawn(async move {
            let deadline = tokio::time::Instant::now() + grace;
            while shared.active.load(Ordering::Acquire) > 0 {
                if tokio::time::Instant::now() >= deadline {
                    warn!(listener = %shared.name, "drain_timeout passed: closing the removed listener's connections");
                    shared.retired.store(true, Ordering::Relaxed);
                    shared.cut.cancel();
                    let pool = shared.settings().pool.clone();
                    wake_all(&[pool]);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }

    fn backend(&self, pool: &str, backend: &str) -> Result<(Arc<Pool>, Arc<Backend>), OpError> {
        let p = self
            .pool(pool)
            .ok_or_else(|| OpError::NoPool(pool.into()))?;
        let b = p.find(backend).ok_or_else(|| OpError::NoBackend {
            pool: pool.into(),
            backend: backend.into(),
        })?;
        Ok((p, b))
    }

    /// Operator drain: no new connections; open ones finish or are cut at the pool's
    /// `drain_timeout`. Stays draining until `enable`.
    pub fn drain(&self, pool: &str, backend: &str) -> Result<(), OpError> {
        let (p, b) = self.backend(pool, backend)?;
        if b.flags() & flag::DRAINING == 0 {
            info!(pool, backend, "backend draining (API)");
            let t = p.config().drain_timeout;
            self.drain_backend(p.clone(), b, t, false);
            health::report_all_down(&p);
        }
        Ok(())
    }

    /// Operator maintenance mode: no new connections, nothing is closed.
    pub fn disable(&self, pool: &str, backend: &str) -> Result<(), OpError> {
        let (p, b) = self.backend(pool, backend)?;
        if b.set_flag(flag::DISABLED) {
            info!(pool, backend, "backend disabled (API)");
            health::report_all_down(&p);
        }
        Ok(())
    }

    /// Clears drain and disable.
    pub fn enable(&self, pool: &str, backend: &str) -> Result<(), OpError> {
        let (p, b) = self.backend(pool, backend)?;
        if b.clear_flag(flag::DRAINING | flag::DISABLED) {
            info!(pool, backend, "backend enabled (API)");
            health::report_all_down(&p);
        }
        Ok(())
    }

    /// Runtime weight; kept across reloads for as long as the backend stays.
    pub fn set_weight(&self, pool: &str, backend: &str, weight: u32) -> Result<(), OpError> {
        if !(1..=1000).contains(&weight) {
            return Err(OpError::BadWeight(weight));
        }
        let (p, b) = self.backend(pool, backend)?;
        b.set_override_weight(weight);
        p.reweigh();
        info!(pool, backend, weight, "backend weight set (API)");
        Ok(())
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
        let mut v: Vec<_> = self.inner.lock().pools.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        *self
            .inner
            .admin_addr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
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

    /// Stops accepting, waits up to `shutdown_timeout` for sessions to finish, then
    /// closes the rest. Returns whether every session finished within the grace period.
    pub async fn shutdown(self) -> bool {
        let inner = &self.inner;
        inner.shutting_down.store(true, Ordering::Release);
        let grace = inner.lock().config.runtime.shutdown_timeout;
        inner.stop_accept.cancel();
        inner.accept_loops.close();
        inner.accept_loops.wait().await;
        // The receive loops have told their UDP sessions to end (UDP has nothing to
        // drain); `sessions` tracks those too, so the wait below covers them.
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
        inner.stop_threads.cancel();
        graceful
    }
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
        self.stop_threads.cancel();
    }
}

/// Wakes every session of these pools' backends (current and retiring) so they
/// re-check their listener's cut.
fn wake_all(pools: &[Arc<Pool>]) {
    for p in pools {
        for b in p.backends().iter().chain(&p.retiring()) {
            b.wake_sessions();
        }
    }
}

/// Starts the worker threads and the control thread; returns the workers' runtime
/// handles and the control runtime's.
fn spawn_threads(
    model: WorkerModel,
    workers: usize,
    stop: &CancellationToken,
) -> io::Result<(Vec<Handle>, Handle)> {
    let runtimes = match model {
        WorkerModel::PerCore => workers,
        WorkerModel::Shared => 1,
    };
    let mut handles = Vec::with_capacity(runtimes);
    for i in 0..runtimes {
        let rt = match model {
            WorkerModel::PerCore => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            WorkerModel::Shared => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("flowgate-worker")
                .enable_all()
                .build()?,
        };
        handles.push(rt.handle().clone());
        run_on_thread(format!("flowgate-w{i}"), rt, stop.clone())?;
    }
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let control_handle = control.handle().clone();
    run_on_thread("flowgate-control".into(), control, stop.clone())?;
    Ok((handles, control_handle))
}

fn run_on_thread(
    name: String,
    rt: tokio::runtime::Runtime,
    stop: CancellationToken,
) -> io::Result<()> {
    std::thread::Builder::new().name(name).spawn(move || {
        rt.block_on(stop.cancelled());
        rt.shutdown_timeout(Duration::from_millis(100));
    })?;
    Ok(())
}

/// Tries each backend of pools without health checks once at startup and says which
/// are unreachable, so an operator sees a typo'd port in the log right away. Traffic
/// does not wait for it. (Pools with health checks log their own verdicts.)
async fn report_unreachable(pools: Vec<Arc<Pool>>) {
    for pool in pools {
        for b in pool.backends() {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(b.addr),
            )
            .await;
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    warn!(pool = %pool.name, backend = %b.name, error = %e, "backend unreachable")
                }
                Err(_) => {
                    warn!(pool = %pool.name, backend = %b.name, "backend unreachable: connect timed out")
                }
            }
        }
    }
}
