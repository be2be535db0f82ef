//! Backend state shared by every connection and every pool snapshot: identity,
//! address, weight, state flags, live connection count and the drain cut-off.
//!
//! A `Backend` is created once per configured address and kept behind an `Arc`, so
//! pool snapshots can be rebuilt (reload, weight change) without resetting health,
//! counters or operator state.
//!
//! State is a set of independent flags in one atomic byte, so the connect path checks
//! usability with one load: an operator's drain or disable, the health checker's
//! verdict and passive ejection never overwrite each other. The state shown to
//! operators is derived: disabled > draining > down > up.
//!
//! A backend that leaves goes Normal -> Draining (no new connections) -> Closed
//! (removed by a reload and drained or cut): the last connection's guard wakes
//! the drain ([`Backend::drained`]).
//!
//! Counters ([`BackendStats`]) are plain atomics bumped on the data path; the API and
//! `GET /metrics` read them (see `crate::metrics`). Histograms are `metrics` handles
//! registered once per backend, so recording one is a lock-free push.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::BackendConfig;
use crate::load::LoadState;
use crate::metrics::names;
use crate::queue::SlotQueue;

/// Whether a backend takes new connections. Only `Up` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    Up,
    Down,
    Draining,
    Disabled,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
            BackendState::Disabled => "disabled",
        }
    }
}

/// State flags; a backend is usable when none is set.
pub mod flag {
    /// Operator (or reload) drain: no new connections, open ones may finish.
    pub const DRAINING: u8 = 1;
    /// Operator maintenance mode: no new connections, nothing is closed.
    pub const DISABLED: u8 = 2;
    /// Active health checks say down (or have not said up yet).
    pub const UNHEALTHY: u8 = 4;
    /// Passive outlier detection ejected it for a while.
    pub const EJECTED: u8 = 8;
    /// A reload removed it and its drain is over: it never takes a connection
    /// again. The end of the lifecycle Normal -> Draining -> Closed.
    pub const CLOSED: u8 = 16;
    /// Flags an operator sets; `fail-open` ignores the others.
    pub const ADMIN: u8 = DRAINING | DISABLED | CLOSED;
}

/// The last active health check, for the API.
#[derive(Debug, Clone)]
pub struct CheckRecord {
    pub ok: bool,
    pub at: SystemTime,
    /// "ok", or why it failed (refused, timeout, bad status 503, unexpected reply).
    pub detail: String,
}

#[derive(Debug)]
pub struct Backend {
    /// Never reused (see [`crate::ids`]): the exporter's key for this object.
    pub id: u64,
    /// The address as written in the config: identity for logs, hashing, the API and
    /// the `backend` metric label.
    pub name: Arc<str>,
    /// The pool this backend belongs to (the `pool` metric label).
    pub pool: Arc<str>,
    pub addr: SocketAddr,
    /// The entry as written (`HOST:PORT`) when this backend is one of a hostname's
    /// addresses.
    pub hostname: Option<Arc<str>>,
    /// Weight from the config file.
    config_weight: AtomicU32,
    /// Weight set through the API (0: none); wins over the file, survives reloads.
    override_weight: AtomicU32,
    /// Slow-start ramp in per-mille of the weight (1000 = full).
    ramp: AtomicU32,
    flags: AtomicU8,
    /// Connections picked for this backend and not yet closed (including those still
    /// connecting), so least-connections sees a connect in progress.
    active: AtomicUsize,
    /// `max_connections`: the most counted connections (HTTP: requests in flight) at
    /// once; 0 is no cap.
    cap: AtomicUsize,
    /// The pool's wait line, woken when a counted connection ends (set by the pool).
    queue: OnceLock<Arc<SlotQueue>>,
    /// Cancelled (and replaced) to wake this backend's sessions: they then check
    /// `drain_epoch` and their listener, and end or wait on the new token. One wake
    /// source per session keeps the per-connection footprint small.
    cut: ArcSwap<CancellationToken>,
    /// Bumped when a drain deadline passes: sessions started before it end.
    drain_epoch: AtomicU64,
    /// Woken when the last connection of a draining backend closes (see
    /// [`Backend::drained`]), so a drain waits on an event, not a timer.
    idle: Notify,
    /// Consecutive connect failures or resets, for passive ejection.
    passive_failures: AtomicU32,
    /// Health checks have seen it up at least once (or it needs none): a first
    /// success is enough to bring it up, and slow start is for coming *back*.
    been_up: AtomicBool,
    /// Probe loops running for it: a reload starts one only where none runs.
    probes: AtomicUsize,
    last_check: Mutex<Option<CheckRecord>>,
    pub stats: BackendStats,
    pub histograms: BackendHistograms,
    /// What `least-load` scores: reports, dispatches, completions, learned speed.
    pub load: LoadState,
}

/// Why a connect to a backend failed: the `reason` label of
/// `flowgate_backend_connect_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    Refused,
    Timeout,
    Reset,
    Other,
}

impl ConnectError {
    pub const ALL: [ConnectError; 4] = [
        ConnectError::Refused,
        ConnectError::Timeout,
        ConnectError::Reset,
        ConnectError::Other,
    ];

    pub fn classify(e: &std::io::Error) -> ConnectError {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => ConnectError::Refused,
            TimedOut => ConnectError::Timeout,
            ConnectionReset | ConnectionAborted => ConnectError::Reset,
            _ => ConnectError::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectError::Refused => "refused",
            ConnectError::Timeout => "timeout",
            ConnectError::Reset => "reset",
            ConnectError::Other => "other",
        }
    }
}

/// Exact counters of one backend, kept across reloads with the backend. Relaxed
/// atomics: each is independent, and readers only need eventually-exact totals.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// TCP connections established to the backend.
    pub connections: AtomicU64,
    /// Failed connect attempts, indexed like [`ConnectError::ALL`].
    pub connect_errors: [AtomicU64; 4],
    /// Bytes written to the backend, counted as they move.
    pub bytes_to: AtomicU64,
    /// Bytes read from the backend and written to clients, counted as they move.
    pub bytes_from: AtomicU64,
    pub checks_ok: AtomicU64,
    pub checks_failed: AtomicU64,
    /// UDP sessions started on this backend, and those still open.
    pub udp_sessions: AtomicU64,
    pub udp_active: AtomicU64,
    /// HTTP requests sent to this backend, and those whose response has not ended.
    pub http_requests: AtomicU64,
    pub http_in_flight: AtomicU64,
}

impl BackendStats {
    pub fn connect_error(&self, e: ConnectError) {
        self.connect_errors[e as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Per-backend histograms (no-ops when no metrics recorder is installed).
#[derive(Debug)]
pub struct BackendHistograms {
    pub connect: metrics::Histogram,
    pub first_byte: metrics::Histogram,
    pub health_check: metrics::Histogram,
}

impl BackendHistograms {
    fn new(pool: &str, backend: &str) -> BackendHistograms {
        let labels = [("pool", pool.to_string()), ("backend", backend.to_string())];
        BackendHistograms {
            connect: metrics::histogram!(names::BACKEND_CONNECT_DURATION, &labels),
            first_byte: metrics::histogram!(names::BACKEND_FIRST_BYTE_DURATION, &labels),
            health_check: metrics::histogram!(names::HEALTH_CHECK_DURATION, &labels),
        }
    }
}

impl Backend {
    pub fn new(cfg: &BackendConfig, pool: &str) -> Arc<Backend> {
        Arc::new(Backend {
            id: crate::ids::next(),
            name: cfg.name.as_str().into(),
            pool: pool.into(),
            stats: BackendStats::default(),
            histograms: BackendHistograms::new(pool, &cfg.name),
            addr: cfg.addr,
            hostname: cfg.hostname.as_deref().map(Into::into),
            config_weight: AtomicU32::new(cfg.weight),
            override_weight: AtomicU32::new(0),
            ramp: AtomicU32::new(1000),
            flags: AtomicU8::new(0),
            active: AtomicUsize::new(0),
            cap: AtomicUsize::new(cfg.max_connections.unwrap_or(0)),
            queue: OnceLock::new(),
            cut: ArcSwap::from_pointee(CancellationToken::new()),
            drain_epoch: AtomicU64::new(0),
            idle: Notify::new(),
            passive_failures: AtomicU32::new(0),
            been_up: AtomicBool::new(false),
            probes: AtomicUsize::new(0),
            last_check: Mutex::new(None),
            load: LoadState::default(),
        })
    }

    /// The configured (or API-set) weight, ignoring slow start.
    pub fn base_weight(&self) -> u32 {
        match self.override_weight.load(Ordering::Relaxed) {
            0 => self.config_weight.load(Ordering::Relaxed),
            w => w,
        }
    }

    /// The weight selection uses now: the base weight, scaled down during slow start
    /// (never below 1).
    pub fn weight(&self) -> u32 {
        let w = u64::from(self.base_weight());
        let ramp = u64::from(self.ramp.load(Ordering::Relaxed));
        let slow = u64::from(self.load.slow_penalty());
        ((w * ramp * slow) / 1_000_000).max(1) as u32
    }

    pub fn set_config_weight(&self, w: u32) {
        self.config_weight.store(w, Ordering::Relaxed);
    }

    /// The weight the API set, if it did.
    pub fn override_weight(&self) -> Option<u32> {
        match self.override_weight.load(Ordering::Relaxed) {
            0 => None,
            w => Some(w),
        }
    }

    /// Sets the runtime weight (API); it outlives reloads.
    pub fn set_override_weight(&self, w: u32) {
        self.override_weight.store(w, Ordering::Relaxed);
    }

    pub fn set_ramp(&self, per_mille: u32) {
        self.ramp.store(per_mille.min(1000), Ordering::Relaxed);
    }

    pub fn flags(&self) -> u8 {
        self.flags.load(Ordering::Acquire)
    }

    /// Sets `f`; returns whether it was clear before (a state change).
    pub fn set_flag(&self, f: u8) -> bool {
        // SeqCst, with the last guard's decrement and flags check (see
        // `ActiveGuard::drop`): a drain that sets DRAINING and then reads `active`
        // cannot miss the last connection closing meanwhile.
        self.flags.fetch_or(f, Ordering::SeqCst) & f == 0
    }

    /// Clears `f`; returns whether it was set before (a state change).
    pub fn clear_flag(&self, f: u8) -> bool {
        let before = self.flags.fetch_and(!f, Ordering::SeqCst);
        if before & f & flag::DRAINING != 0 {
            // A drain called off (enable): its waiter stops waiting.
            self.idle.notify_waiters();
        }
        before & f != 0
    }

    pub fn state(&self) -> BackendState {
        let f = self.flags();
        if f & flag::DISABLED != 0 {
            BackendState::Disabled
        } else if f & (flag::DRAINING | flag::CLOSED) != 0 {
            BackendState::Draining
        } else if f != 0 {
            BackendState::Down
        } else {
            BackendState::Up
        }
    }

    /// Takes new connections: up, not drained, disabled or ejected.
    pub fn is_usable(&self) -> bool {
        self.flags() == 0
    }

    /// Healthy or not, the operator has not taken it out (for `fail-open`).
    pub fn is_admin_usable(&self) -> bool {
        self.flags() & flag::ADMIN == 0
    }

    /// Whether the health checker considers it up (ignores operator flags).
    pub fn is_healthy(&self) -> bool {
        self.flags() & (flag::UNHEALTHY | flag::EJECTED) == 0
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Resolves once the backend has no connection left, or is no longer
    /// draining (an operator enabled it again): the last connection's guard, or
    /// the enable, wakes it. Nothing polls.
    pub async fn drained(&self) {
        crate::tasks::wait_for(&self.idle, || {
            self.flags() & flag::DRAINING == 0 || self.active.load(Ordering::SeqCst) == 0
        })
        .await
    }

    /// Resolves once the backend is no longer draining (an operator enabled it, or
    /// a reload took a removed backend back).
    pub async fn undrained(&self) {
        crate::tasks::wait_for(&self.idle, || self.flags() & flag::DRAINING == 0).await
    }

    /// Ends the lifecycle: a backend a reload removed, drained or cut, never takes
    /// a connection again.
    pub fn close(&self) {
        self.set_flag(flag::CLOSED);
    }

    pub fn is_closed(&self) -> bool {
        self.flags() & flag::CLOSED != 0
    }

    /// Counts a connection against this backend until the guard drops.
    pub fn claim(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    /// Counts a connection like [`Backend::claim`], unless the backend is at its
    /// `max_connections`: `None` then. Exact under concurrent picks.
    pub fn try_claim(self: &Arc<Self>) -> Option<ActiveGuard> {
        let cap = self.cap.load(Ordering::Relaxed);
        if cap == 0 {
            return Some(self.claim());
        }
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |a| {
                (a < cap).then_some(a + 1)
            })
            .ok()
            .map(|_| ActiveGuard(self.clone()))
    }

    /// Whether the backend is at its `max_connections` (false without one).
    pub fn is_full(&self) -> bool {
        let cap = self.cap.load(Ordering::Relaxed);
        cap != 0 && self.active() >= cap
    }

    /// `max_connections` (None: no cap).
    pub fn max_connections(&self) -> Option<usize> {
        Some(self.cap.load(Ordering::Relaxed)).filter(|&c| c != 0)
    }

    /// A reload's `max_connections`.
    pub fn set_max_connections(&self, cap: Option<usize>) {
        self.cap.store(cap.unwrap_or(0), Ordering::Relaxed);
    }

    /// Joins the backend to its pool's wait line (once; a backend never changes pool).
    pub fn set_queue(&self, q: &Arc<SlotQueue>) {
        let _ = self.queue.set(q.clone());
    }

    /// The token that wakes this backend's sessions (see `cut`).
    pub fn cut_token(&self) -> CancellationToken {
        CancellationToken::clone(&self.cut.load())
    }

    pub fn drain_epoch(&self) -> u64 {
        self.drain_epoch.load(Ordering::Acquire)
    }

    /// Closes every open session on this backend now (drain deadline). Sessions that
    /// start later are not affected.
    pub fn cut_sessions(&self) {
        self.drain_epoch.fetch_add(1, Ordering::AcqRel);
        self.wake_sessions();
    }

    /// Wakes every session on this backend so it re-checks why it might have to end
    /// (its listener was cut); sessions with no reason carry on.
    pub fn wake_sessions(&self) {
        let old = self.cut.swap(Arc::new(CancellationToken::new()));
        old.cancel();
    }

    /// Records a failed connect or a reset; returns the count of failures in a row.
    pub fn passive_failure(&self) -> u32 {
        self.passive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn passive_success(&self) {
        if self.passive_failures.load(Ordering::Relaxed) != 0 {
            self.passive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Whether health checks have seen it up (or it needs none).
    pub fn been_up(&self) -> bool {
        self.been_up.load(Ordering::Relaxed)
    }

    pub fn set_been_up(&self) {
        self.been_up.store(true, Ordering::Relaxed);
    }

    /// Counts a probe loop for this backend until the guard drops.
    pub fn probe_guard(self: &Arc<Self>) -> ProbeGuard {
        self.probes.fetch_add(1, Ordering::AcqRel);
        ProbeGuard(self.clone())
    }

    /// Whether a probe loop runs for it.
    pub fn is_probed(&self) -> bool {
        self.probes.load(Ordering::Acquire) > 0
    }

    pub fn record_check(&self, r: CheckRecord) {
        *self.last_check.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    pub fn last_check(&self) -> Option<CheckRecord> {
        self.last_check
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One running probe loop of a backend.
#[derive(Debug)]
pub struct ProbeGuard(Arc<Backend>);

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        self.0.probes.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One counted connection on a backend.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let b = &self.0;
        b.load.completed.fetch_add(1, Ordering::Relaxed);
        // SeqCst costs nothing more than Relaxed for a read-modify-write on x86; it
        // pairs with `set_flag` (see there).
        if b.active.fetch_sub(1, Ordering::SeqCst) == 1
            && b.flags.load(Ordering::SeqCst) & flag::DRAINING != 0
        {
            b.idle.notify_waiters();
        }
        if let Some(q) = b.queue.get() {
            q.wake_one();
        }
    }
}

#[cfg(test)]
mod drain_tests {
    use super::*;

    fn backend() -> Arc<Backend> {
        Backend::new(
            &BackendConfig {
                name: "127.0.0.1:1".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
                weight: 1,
                max_connections: None,
                hostname: None,
            },
            "p",
        )
    }

    /// Polls `f` once; true if it finished.
    async fn ready(f: std::pin::Pin<&mut impl std::future::Future<Output = ()>>) -> bool {
        tokio::select! {
            biased;
            _ = f => true,
            _ = std::future::ready(()) => false,
        }
    }

    /// The last connection's guard ends the drain, with no timer: on a paused clock
    /// the drain finishes without time moving at all.
    #[tokio::test(start_paused = true)]
    async fn the_last_connection_wakes_the_drain() {
        let b = backend();
        let (g1, g2) = (b.claim(), b.claim());
        b.set_flag(flag::DRAINING);
        let t0 = tokio::time::Instant::now();
        let drained = b.drained();
        tokio::pin!(drained);
        assert!(!ready(drained.as_mut()).await, "two connections open");
        drop(g1);
        assert!(!ready(drained.as_mut()).await, "one connection open");
        drop(g2);
        drained.await;
        assert_eq!(tokio::time::Instant::now(), t0, "woken, not polled");
        b.close();
        assert!(b.is_closed() && !b.is_usable());
        assert_eq!(b.state(), BackendState::Draining);
    }

    /// An operator's enable calls a drain off: the drain stops waiting.
    #[tokio::test(start_paused = true)]
    async fn enable_ends_the_wait() {
        let b = backend();
        let _g = b.claim();
        b.set_flag(flag::DRAINING);
        let drained = b.drained();
        tokio::pin!(drained);
        assert!(!ready(drained.as_mut()).await);
        b.clear_flag(flag::DRAINING);
        assert!(ready(drained.as_mut()).await, "enable wakes the drain");
        assert_eq!(b.active(), 1, "the connection stays");
    }
}
