//! Startup: bind everything (failing fast), then start the threads' work: accept
//! and receive loops, probes, metrics upkeep.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::threads::spawn_threads;
use super::StartError;
use super::{
    AccessLogError, BindError, Inherited, Inner, ListenerKey, RunningListener, RunningUdp, Runtime,
    State,
};
use crate::access_log::AccessLog;
use crate::config::{Config, ListenerConfig, LogConfig, Protocol, WorkerModel};
use crate::health;
use crate::metrics::Exporter;
use crate::pool::Pool;
use crate::proxy::busy;
use crate::proxy::tcp::{self, ListenerShared};
use crate::proxy::udp::{self, UdpListenerShared, UdpSettings};
use crate::tasks::Tasks;

/// Sockets bound for one listener, one per worker (or one).
pub(super) enum Bound {
    Tcp(Vec<std::net::TcpListener>),
    Udp(Vec<std::net::UdpSocket>),
}

impl Runtime {
    pub fn start(config: Config) -> Result<Runtime, StartError> {
        Runtime::start_with(config, Inherited::default())
    }

    /// [`Runtime::start`] on the sockets a binary upgrade handed over: listeners
    /// found in `inherited` are served on its sockets, the others bound.
    pub fn start_with(config: Config, mut inherited: Inherited) -> Result<Runtime, StartError> {
        // Before any backend or listener exists: they register their histograms.
        let metrics = match config.admin {
            Some(_) => Exporter::new(),
            None => None,
        };
        crate::proxy::check_transparent(&config.pools)?;
        let access_log = AccessLog::new();
        configure_access_log(&access_log, &config.log)?;
        let stop_threads = CancellationToken::new();
        let (handles, control) = spawn_threads(
            config.runtime.worker_model,
            config.runtime.workers,
            config.runtime.busy_poll,
            &stop_threads,
        )
        .map_err(StartError::Workers)?;
        let inner = Arc::new(Inner {
            worker_model: config.runtime.worker_model,
            workers: config.runtime.workers,
            splice: config.runtime.splice,
            busy_poll_us: config
                .runtime
                .busy_poll
                .map_or(0, |d| d.as_micros().clamp(1, u32::MAX as u128) as u32),
            handles,
            control: Tasks::new(control),
            stop_accept: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            stop_threads,
            accept_loops: TaskTracker::new(),
            sessions: TaskTracker::new(),
            shutting_down: AtomicBool::new(false),
            handed_over: Arc::new(AtomicBool::new(false)),
            started: SystemTime::now(),
            upgraded_from: inherited.upgraded_from,
            admin_token: ArcSwapOption::from(
                config
                    .admin
                    .as_ref()
                    .and_then(|a| a.token.clone())
                    .map(Arc::new),
            ),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_load: Mutex::new(SystemTime::now()),
            access_log,
            upstreams: crate::proxy::http::Upstreams::new(),
            metrics,
            level_hook: OnceLock::new(),
            resolver: Default::default(),
            state: Mutex::new(State {
                config: config.clone(),
                listeners: Vec::new(),
                udp_listeners: Vec::new(),
                pools: HashMap::new(),
                probes: HashMap::new(),
                loads: HashMap::new(),
                removed_pools: Vec::new(),
                overrides: Default::default(),
                sockets: HashMap::new(),
            }),
        });
        let rt = Runtime { inner };

        // Bind everything before serving anything, so a bad address fails fast.
        // Each address must be free first: SO_REUSEPORT would otherwise let a
        // second flowgate with the same config start and silently share it.
        // (All probes first: once this config's own sockets exist, an overlapping
        // listener of it, 0.0.0.0:P beside 127.0.0.1:P, would look taken.)
        let mut taken: HashMap<&str, _> = HashMap::new();
        for l in &config.listeners {
            match inherited.listeners.remove(&ListenerKey::of(l)) {
                Some(fds) => {
                    taken.insert(l.name.as_str(), fds);
                }
                None => ensure_free(l)?,
            }
        }
        // What the old process served and this config lacks is not taken: closed here.
        for key in inherited.listeners.keys() {
            info!(listener = %key.name, addr = %key.bind, "not in the new config: not taken over");
        }
        drop(inherited.listeners);
        let mut bound = Vec::new();
        for l in &config.listeners {
            let sockets = match taken.remove(l.name.as_str()) {
                Some(fds) => rt.adopt_listener(l, fds)?,
                None => rt.bind_listener(l)?,
            };
            bound.push((l, sockets));
        }

        let mut st = rt.inner.lock();
        for p in &config.pools {
            let pool = rt.scoped(|| Pool::new(p));
            rt.start_probes(&mut st, &pool, true);
            st.pools.insert(p.name.clone(), pool);
        }
        let udp_max = udp_default_max(&config);
        report_budget(&config, udp_max);
        for (l, sockets) in bound {
            rt.start_listener(&mut st, l, sockets, udp_max);
        }
        // Only TCP backends can be tried with a connect.
        let tcp_pools: HashSet<&str> = config
            .listeners
            .iter()
            .filter(|l| l.protocol != Protocol::Udp)
            .flat_map(|l| {
                let routed = l
                    .http
                    .iter()
                    .flat_map(|h| h.routes.iter().map(|r| r.pool.as_str()));
                l.pool.as_deref().into_iter().chain(routed)
            })
            .collect();
        let unchecked: Vec<_> = st
            .pools
            .values()
            .filter(|p| p.config().health_check.is_none() && tcp_pools.contains(&*p.name))
            .cloned()
            .collect();
        let all: Vec<_> = st.pools.values().cloned().collect();
        drop(st);
        rt.inner
            .control
            .spawn_until_stop(report_unreachable(unchecked));
        rt.inner.control.spawn_until_stop(report_states(all));
        rt.inner
            .control
            .spawn_until_stop(super::dns::resolve_loop(rt.downgrade()));
        // Idle upstream HTTP connections past their pool's keepalive_timeout.
        rt.inner
            .control
            .spawn_until_stop(rt.inner.upstreams.clone().sweep_loop());
        if let Some(m) = &rt.inner.metrics {
            let stop = rt.inner.control.stop_token().clone();
            rt.inner.control.spawn(m.clone().upkeep(stop));
        }
        Ok(rt)
    }

    /// Binds the sockets for one listener: one per worker (SO_REUSEPORT), or one.
    pub(super) fn bind_listener(&self, l: &ListenerConfig) -> Result<Bound, BindError> {
        let count = self.sockets_per_listener();
        let err = |addr, error| BindError {
            listener: l.name.clone(),
            addr,
            error,
        };
        if l.protocol == Protocol::Udp {
            let first = udp::bind(l.bind).map_err(|e| err(l.bind, e))?;
            let local = first.local_addr().map_err(|e| err(l.bind, e))?;
            let mut sockets = vec![first];
            for _ in 1..count {
                sockets.push(udp::bind(local).map_err(|e| err(local, e))?);
            }
            for s in &sockets {
                busy::set_socket(s.into(), self.inner.busy_poll_us);
            }
            return Ok(Bound::Udp(sockets));
        }
        let first = tcp::bind(l.bind, l.backlog).map_err(|e| err(l.bind, e))?;
        let local = first.local_addr().map_err(|e| err(l.bind, e))?;
        let mut sockets = vec![first];
        for _ in 1..count {
            sockets.push(tcp::bind(local, l.backlog).map_err(|e| err(local, e))?);
        }
        // Accepted sockets inherit SO_BUSY_POLL from the listening socket.
        for s in &sockets {
            busy::set_socket(s.into(), self.inner.busy_poll_us);
        }
        Ok(Bound::Tcp(sockets))
    }

    /// Sockets bound per listener: one per worker (`per-core`), or one (`shared`).
    pub(super) fn sockets_per_listener(&self) -> usize {
        match self.inner.worker_model {
            WorkerModel::PerCore => self.inner.workers,
            WorkerModel::Shared => 1,
        }
    }

    /// Serves a freshly bound listener and enters it in `st`.
    /// `udp_max` is the default `max_sessions` (see [`udp_default_max`]).
    pub(super) fn start_listener(
        &self,
        st: &mut State,
        l: &ListenerConfig,
        sockets: Bound,
        udp_max: usize,
    ) {
        self.keep_sockets(st, l, &sockets);
        match sockets {
            Bound::Tcp(s) => {
                let running = self.start_tcp(l, &st.pools, s);
                st.listeners.push(running);
            }
            Bound::Udp(s) => {
                // Config checked that a udp listener names a pool.
                let Some(pool) = l.pool.as_ref().and_then(|p| st.pools.get(p)).cloned() else {
                    warn!(listener = %l.name, "udp listener without a pool: not started");
                    return;
                };
                let running = self.start_udp(l, pool, s, udp_max);
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
    fn start_udp(
        &self,
        l: &ListenerConfig,
        pool: Arc<Pool>,
        sockets: Vec<std::net::UdpSocket>,
        default_max: usize,
    ) -> RunningUdp {
        let local_addr = sockets[0].local_addr().unwrap_or(l.bind);
        let shared = self.scoped(|| {
            UdpListenerShared::new(
                l,
                UdpSettings::new(l, pool, default_max),
                self.context(),
                self.inner.stop_accept.child_token(),
                self.inner.hard_stop.child_token(),
            )
        });
        self.spawn_per_worker(sockets, |socket| {
            udp::recv_loop(socket, shared.clone(), self.inner.sessions.clone())
        });
        info!(listener = %l.name, addr = %local_addr, pool = l.pool.as_deref().unwrap_or("-"), protocol = "udp", "listening");
        RunningUdp { shared, local_addr }
    }

    /// Starts accept loops on bound sockets.
    fn start_tcp(
        &self,
        l: &ListenerConfig,
        pools: &crate::proxy::tcp::Pools,
        sockets: Vec<std::net::TcpListener>,
    ) -> RunningListener {
        let local_addr = sockets[0].local_addr().unwrap_or(l.bind);
        let shared = self.scoped(|| {
            ListenerShared::new(
                l,
                pools,
                self.context(),
                self.inner.stop_accept.child_token(),
                self.inner.hard_stop.child_token(),
            )
        });
        self.spawn_per_worker(sockets, |socket| {
            tcp::accept_loop(socket, shared.clone(), self.inner.sessions.clone())
        });
        let routes = l.http.as_ref().map_or(0, |h| h.routes.len());
        info!(listener = %l.name, addr = %local_addr, pool = l.pool.as_deref().unwrap_or("-"), protocol = l.protocol.as_str(), routes, "listening");
        RunningListener { shared, local_addr }
    }

    /// Starts the probes of `pool` on the control tasks. With `restart` (a new
    /// pool, or its health check changed) every backend's probe starts anew;
    /// otherwise running probes go on, with their rise/fall counts, and only
    /// backends without one (added by a reload) get theirs.
    pub(super) fn start_probes(&self, st: &mut State, pool: &Arc<Pool>, restart: bool) {
        let name = pool.name.to_string();
        // The load feed of a least-load pool starts anew with each change: its
        // state (reports, learned speed) lives in the backends.
        if let Some(old) = st.loads.remove(&name) {
            old.cancel();
        }
        let cfg = pool.config();
        let slow_watch = cfg.passive.as_ref().is_some_and(|p| p.slow.is_some());
        if cfg.algorithm == crate::config::Algorithm::LeastLoad || slow_watch {
            let stop = self.inner.control.stop_token().child_token();
            health::load_report::spawn(pool, &stop, &self.inner.control);
            st.loads.insert(name.clone(), stop);
        }
        if restart {
            if let Some(old) = st.probes.remove(&name) {
                old.cancel();
            }
        }
        let Some(hc) = pool.config().health_check.clone() else {
            if let Some(old) = st.probes.remove(&name) {
                old.cancel();
            }
            return;
        };
        let control = &self.inner.control;
        let (stop, all) = match st.probes.get(&name) {
            Some(stop) => (stop.clone(), false),
            None => (control.stop_token().child_token(), true),
        };
        health::spawn(pool, Arc::new(hc), &stop, control, all);
        st.probes.insert(name, stop);
    }
}

/// Fails if another socket holds `l`'s address: binds it once without
/// SO_REUSEPORT (nor, for UDP, SO_REUSEADDR), which any holder's socket refuses,
/// and lets go at once. Port 0 always gets a free port.
fn ensure_free(l: &ListenerConfig) -> Result<(), BindError> {
    use socket2::{Domain, Socket, Type};
    if l.bind.port() == 0 {
        return Ok(());
    }
    let probe = || -> std::io::Result<()> {
        let (ty, proto) = match l.protocol {
            Protocol::Udp => (Type::DGRAM, socket2::Protocol::UDP),
            _ => (Type::STREAM, socket2::Protocol::TCP),
        };
        let s = Socket::new(Domain::for_address(l.bind), ty, Some(proto))?;
        if l.protocol != Protocol::Udp {
            // A port whose last connections linger in TIME_WAIT is free.
            s.set_reuse_address(true)?;
        }
        if l.bind.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.bind(&l.bind.into())
    };
    probe().map_err(|error| BindError {
        listener: l.name.clone(),
        addr: l.bind,
        error: if error.kind() == std::io::ErrorKind::AddrInUse {
            let who = super::holder::holder(l.bind, l.protocol == Protocol::Udp)
                .unwrap_or_else(|| "another process (another flowgate?)".to_string());
            std::io::Error::new(error.kind(), format!("{error}: {who} holds it"))
        } else {
            error
        },
    })
}

/// Logs the descriptor budget of `cfg` (see [`crate::fd::report_budget`]).
fn report_budget(cfg: &Config, udp_default: usize) {
    let tcp: Vec<_> = cfg
        .listeners
        .iter()
        .filter(|l| l.protocol == Protocol::Tcp)
        .collect();
    let tcp_max = tcp
        .iter()
        .map(|l| l.max_connections.map(|m| m as u64))
        .sum::<Option<u64>>();
    let udp: u64 = cfg
        .listeners
        .iter()
        .filter(|l| l.protocol == Protocol::Udp)
        .map(|l| l.max_sessions.unwrap_or(udp_default) as u64)
        .sum();
    crate::fd::report_budget(tcp_max, udp);
}

/// The default `max_sessions` of each UDP listener of `cfg`.
pub(super) fn udp_default_max(cfg: &Config) -> usize {
    let n = cfg
        .listeners
        .iter()
        .filter(|l| l.protocol == Protocol::Udp)
        .count();
    udp::default_max_sessions(n)
}

/// Applies the access-log part of `[log]`; a file that cannot be opened is an error.
pub(super) fn configure_access_log(log: &AccessLog, cfg: &LogConfig) -> Result<(), AccessLogError> {
    log.configure(&cfg.access_log, cfg.format)
        .map_err(|error| AccessLogError {
            path: cfg.access_log.to_string(),
            error,
        })
}

/// Once the first probes are in (each new backend is probed at once), logs each
/// pool's state and every backend that takes no connections, with why (its last
/// check, or that it never answered one): at startup and after a reload, so an
/// operator sees what is down without waiting for a flip that may never come.
pub(super) async fn report_states(pools: Vec<Arc<Pool>>) {
    let first_verdict = pools
        .iter()
        .filter_map(|p| p.config().health_check.as_ref().map(|h| h.timeout))
        .max()
        .unwrap_or_default();
    tokio::time::sleep(first_verdict + Duration::from_millis(200)).await;
    for pool in pools {
        let backends = pool.backends();
        let up = backends.iter().filter(|b| b.is_usable()).count();
        info!(pool = %pool.name, up, backends = backends.len(), "pool state");
        for b in backends.iter().filter(|b| !b.is_usable()) {
            use crate::backend::{flag, BackendState};
            let why = match b.state() {
                BackendState::Disabled => "disabled through the API".to_string(),
                BackendState::Draining => "draining".to_string(),
                _ if b.flags() & flag::EJECTED != 0 => "passive ejection".to_string(),
                _ => match b.last_check() {
                    Some(c) if !c.ok => c.detail,
                    Some(_) => "health check passed, not yet `rise` times".to_string(),
                    None => "no health check answered yet".to_string(),
                },
            };
            warn!(pool = %pool.name, backend = %b.name, state = %b.state().as_str(), reason = %why, "backend not taking connections");
        }
    }
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
                Ok(Ok(s)) => {
                    // Behind send_proxy a backend expects a header: this connection
                    // is our own (v2 LOCAL), as health probes say.
                    if let Some(h) = crate::proxy::tcp::probe_header(pool.send_proxy()) {
                        let _ = s.try_write(&h);
                    }
                }
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
