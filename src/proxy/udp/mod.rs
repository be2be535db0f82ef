//! UDP load balancing: sessions keyed by the client's address and port.
//!
//! Each worker has its own SO_REUSEPORT socket per UDP listener; the kernel hashes a
//! client's 4-tuple to one of them, so a client's datagrams always reach the same
//! worker, and each worker keeps its own session table (a lock only that worker and
//! its sessions touch).
//!
//! - **client -> backend**: the worker's receive loop reads a datagram, finds (or
//!   creates) the client's session and sends it on the session's *connected* upstream
//!   socket (one `send`, no queue in between).
//! - **backend -> client**: a task per session reads the upstream socket and sends
//!   each reply to the client from the listener's own socket, so it comes from the
//!   address and port the client sent to.
//! - **expiry**: a session's task sleeps on tokio's timer wheel until its idle
//!   deadline, checked lazily against the last datagram time (no scan over sessions).
//! - **failure**: when the backend answers with ICMP port unreachable (the connected
//!   socket reports `ECONNREFUSED`) or health checks take it down, the session is
//!   marked failed and the client's next datagram picks another backend.
//!
//! Nothing is dropped silently: every datagram that is not forwarded is counted in
//! `flowgate_udp_dropped_total{reason}`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use crossbeam_utils::CachePadded;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Activity;
use crate::access_log;
use crate::backend::{flag, ActiveGuard, Backend};
use crate::config::ListenerConfig;
use crate::metrics::names;
use crate::pool::Pool;

/// Receive buffers hold any datagram (IPv6 payloads can be a little larger).
const RECV_BUF: usize = 65_536;

/// Why a datagram was not forwarded: the `reason` label of
/// `flowgate_udp_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No usable backend in the pool.
    NoBackend,
    /// The listener's `max_sessions` is reached.
    MaxSessions,
    /// The client's IP has `max_sessions_per_source` sessions already.
    MaxSessionsPerSource,
    /// No upstream socket could be made (out of descriptors, usually).
    SocketFailed,
    /// The upstream socket would not take the datagram (buffer full, error).
    SendFailed,
    /// A reply could not be sent to the client (buffer full, error).
    ReplyFailed,
}

impl DropReason {
    const ALL: [DropReason; 6] = [
        DropReason::NoBackend,
        DropReason::MaxSessions,
        DropReason::MaxSessionsPerSource,
        DropReason::SocketFailed,
        DropReason::SendFailed,
        DropReason::ReplyFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoBackend => "no_backend",
            DropReason::MaxSessions => "max_sessions",
            DropReason::MaxSessionsPerSource => "max_sessions_per_source",
            DropReason::SocketFailed => "socket_failed",
            DropReason::SendFailed => "send_failed",
            DropReason::ReplyFailed => "reply_failed",
        }
    }
}

/// Why a session ended: the access log's termination reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    IdleTimeout,
    /// `responses` replies came back.
    Responses,
    /// ICMP port unreachable (or another socket error) from the backend.
    BackendUnreachable,
    /// Health checks or passive ejection took the backend out; re-picked.
    BackendDown,
    /// The backend's drain deadline passed.
    Drained,
    /// Hard stop, graceful stop or the listener was removed.
    Shutdown,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::IdleTimeout => "idle_timeout",
            End::Responses => "responses",
            End::BackendUnreachable => "backend_unreachable",
            End::BackendDown => "backend_down",
            End::Drained => "drained",
            End::Shutdown => "shutdown",
        }
    }
}

/// Datagram counters of one worker (summed over workers when read), padded so two
/// workers never share a cache line.
#[derive(Debug, Default)]
pub struct UdpCounters {
    pub datagrams_to: AtomicU64,
    pub datagrams_from: AtomicU64,
    pub bytes_to: AtomicU64,
    pub bytes_from: AtomicU64,
    dropped: [AtomicU64; 6],
}

impl UdpCounters {
    fn dropped(&self, r: DropReason, n: u64) {
        self.dropped[r as usize].fetch_add(n, Relaxed);
    }
}

/// A UDP listener's settings as of the last (re)load.
pub struct UdpSettings {
    pub pool: Arc<Pool>,
    pub idle_timeout: Duration,
    pub max_sessions: Option<usize>,
    pub max_sessions_per_source: Option<usize>,
    pub responses: u64,
    pub bind: SocketAddr,
}

impl UdpSettings {
    /// `default_max` is what `max_sessions` is when the config leaves it out (see
    /// [`default_max_sessions`]).
    pub fn new(cfg: &ListenerConfig, pool: Arc<Pool>, default_max: usize) -> UdpSettings {
        UdpSettings {
            pool,
            idle_timeout: cfg.idle_timeout,
            max_sessions: Some(cfg.max_sessions.unwrap_or(default_max)),
            max_sessions_per_source: cfg.max_sessions_per_source,
            responses: cfg.responses,
            bind: cfg.bind,
        }
    }
}

/// `max_sessions` when the config leaves it out: half the open-files limit shared
/// by the `udp_listeners` UDP listeners (each session holds a socket), so a flood of
/// source ports is refused and counted before it takes the descriptors TCP clients
/// and health checks need.
pub fn default_max_sessions(udp_listeners: usize) -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    ((soft / 2) as usize / udp_listeners.max(1)).clamp(256, 1 << 20)
}

/// What every worker of a UDP listener shares.
pub struct UdpListenerShared {
    pub name: Arc<str>,
    settings: ArcSwap<UdpSettings>,
    /// Stops the receive loops (listener removed by a reload, or shutdown).
    pub stop: CancellationToken,
    /// Ends every session (a child of the process-wide hard stop).
    pub cut: CancellationToken,
    /// Sessions open now, all workers together.
    pub active: AtomicUsize,
    /// Sessions started.
    pub sessions: AtomicU64,
    /// Sessions per client IP, for `max_sessions_per_source` (touched only when a
    /// session starts or ends).
    per_source: Mutex<HashMap<IpAddr, usize>>,
    /// One set of counters per worker socket.
    counters: Mutex<Vec<Arc<CachePadded<UdpCounters>>>>,
    session_duration: metrics::Histogram,
}

impl UdpListenerShared {
    pub fn new(
        cfg: &ListenerConfig,
        settings: UdpSettings,
        stop: CancellationToken,
        cut: CancellationToken,
    ) -> Arc<UdpListenerShared> {
        Arc::new(UdpListenerShared {
            name: cfg.name.as_str().into(),
            settings: ArcSwap::from_pointee(settings),
            stop,
            cut,
            active: AtomicUsize::new(0),
            sessions: AtomicU64::new(0),
            per_source: Mutex::new(HashMap::new()),
            counters: Mutex::new(Vec::new()),
            session_duration: metrics::histogram!(
                names::SESSION_DURATION,
                "listener" => cfg.name.clone()
            ),
        })
    }

    pub fn settings(&self) -> Arc<UdpSettings> {
        self.settings.load_full()
    }

    pub fn set_settings(&self, s: UdpSettings) {
        self.settings.store(Arc::new(s));
    }

    fn new_counters(&self) -> Arc<CachePadded<UdpCounters>> {
        let c = Arc::new(CachePadded::new(UdpCounters::default()));
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c.clone());
        c
    }

    /// Totals over workers: (datagrams to, from, bytes to, from, drops by reason).
    pub fn totals(&self) -> UdpTotals {
        let mut t = UdpTotals::default();
        for c in self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            t.datagrams_to += c.datagrams_to.load(Relaxed);
            t.datagrams_from += c.datagrams_from.load(Relaxed);
            t.bytes_to += c.bytes_to.load(Relaxed);
            t.bytes_from += c.bytes_from.load(Relaxed);
            for r in DropReason::ALL {
                t.dropped[r as usize].1 += c.dropped[r as usize].load(Relaxed);
            }
        }
        for r in DropReason::ALL {
            t.dropped[r as usize].0 = r.as_str();
        }
        t
    }
}

/// A UDP listener's counters summed over its workers.
#[derive(Debug, Default)]
pub struct UdpTotals {
    pub datagrams_to: u64,
    pub datagrams_from: u64,
    pub bytes_to: u64,
    pub bytes_from: u64,
    /// (reason, count).
    pub dropped: [(&'static str, u64); 6],
}

/// Creates a non-blocking UDP socket bound to `addr` with SO_REUSEADDR and
/// SO_REUSEPORT (one per worker).
pub fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Bursts of small datagrams: a larger receive buffer absorbs them while a worker
    // is busy (the kernel caps it at net.core.rmem_max).
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Session state bits.
mod state {
    /// The backend failed (ICMP unreachable): the next datagram re-picks.
    pub const FAILED: u8 = 1;
    /// The receive loop replaced the session (backend down): its task ends.
    pub const REPLACED: u8 = 2;
}

/// One client's session.
struct Session {
    client: SocketAddr,
    upstream: UdpSocket,
    guard: ActiveGuard,
    /// The backend's drain epoch when the session started.
    epoch: u64,
    start: Instant,
    activity: Activity,
    state: AtomicU8,
    /// Wakes the session's task when the receive loop replaces it.
    replaced: Notify,
    to_backend: AtomicU64,
    from_backend: AtomicU64,
    /// Client datagrams taken for this session, counted under the table lock, so
    /// the session never ends with a request still unanswered (`responses`).
    requests: AtomicU64,
    /// Its place under `max_sessions` and `max_sessions_per_source`.
    slot: Mutex<Option<Slot>>,
}

impl Session {
    fn backend(&self) -> &Arc<Backend> {
        self.guard.backend()
    }

    /// Whether the client's next datagram should go to a new backend instead. A
    /// backend that is down is left only if the pool has a usable one (with
    /// `fail-open` and everything down, sessions stay where they are).
    fn must_repick(&self, pool: &Pool) -> Option<End> {
        let b = self.backend();
        if self.state.load(Relaxed) & state::FAILED != 0 {
            Some(End::BackendUnreachable)
        } else if b.drain_epoch() != self.epoch || b.pool != pool.name {
            // Drained past its deadline, or a reload pointed the listener at
            // another pool.
            Some(End::Drained)
        } else if b.flags() & (flag::UNHEALTHY | flag::EJECTED) != 0 && pool.has_usable() {
            Some(End::BackendDown)
        } else {
            None
        }
    }

    /// Gives back the session's place under the listener's limits (when it ends or
    /// is replaced, whichever comes first).
    fn release(&self) {
        drop(self.slot.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

type Table = Mutex<HashMap<SocketAddr, Arc<Session>>>;

/// One worker's receive loop and session table for a UDP listener.
struct Worker {
    shared: Arc<UdpListenerShared>,
    socket: Arc<UdpSocket>,
    table: Arc<Table>,
    counters: Arc<CachePadded<UdpCounters>>,
}

#[cfg(not(target_os = "linux"))]
thread_local! {
    /// Where a datagram is received when there is no recvmmsg.
    static BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; RECV_BUF].into_boxed_slice());
}

/// Receive batches taken per wake-up before the loop yields to other tasks.
const BATCHES_PER_TURN: usize = 8;

/// Receives what is queued on `socket` without blocking, up to a batch, and calls
/// `f` for each datagram. `WouldBlock` when nothing was queued.
#[cfg(target_os = "linux")]
fn recv_batch(socket: &UdpSocket, f: impl FnOnce(&[(&[u8], SocketAddr)])) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    mmsg::recv(socket.as_raw_fd(), f)
}

#[cfg(not(target_os = "linux"))]
fn recv_batch(socket: &UdpSocket, f: impl FnOnce(&[(&[u8], SocketAddr)])) -> io::Result<usize> {
    BUF.with_borrow_mut(|buf| {
        let (n, from) = socket.try_recv_from(buf)?;
        f(&[(&buf[..n], from)]);
        Ok(1)
    })
}

/// recvmmsg(2): one syscall for up to [`mmsg::BATCH`] datagrams (Linux).
#[cfg(target_os = "linux")]
mod mmsg {
    use std::cell::RefCell;
    use std::io::{self, IoSliceMut};
    use std::net::SocketAddr;
    use std::os::fd::RawFd;

    use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};

    use super::RECV_BUF;

    /// Datagrams per recvmmsg call.
    pub const BATCH: usize = 16;

    struct Batch {
        headers: MultiHeaders<SockaddrStorage>,
        /// `BATCH` slots of `RECV_BUF` bytes: any datagram fits whole.
        buf: Box<[u8]>,
    }

    thread_local! {
        /// Per worker thread: the headers hold raw pointers and cannot move between
        /// threads, and a batch never outlives one call.
        static STATE: RefCell<Batch> = RefCell::new(Batch {
            headers: MultiHeaders::preallocate(BATCH, None),
            buf: vec![0; BATCH * RECV_BUF].into_boxed_slice(),
        });
    }

    fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
        if let Some(v4) = a.as_sockaddr_in() {
            return Some(SocketAddr::V4((*v4).into()));
        }
        a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
    }

    pub fn recv(fd: RawFd, f: impl FnOnce(&[(&[u8], SocketAddr)])) -> io::Result<usize> {
        STATE.with_borrow_mut(|st| {
            let mut got = [(0usize, None::<SocketAddr>); BATCH];
            let n = {
                let mut chunks = st.buf.chunks_mut(RECV_BUF);
                let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
                    std::array::from_fn(|_| [IoSliceMut::new(chunks.next().expect("BATCH slots"))]);
                let results = recvmmsg(
                    fd,
                    &mut st.headers,
                    iovs.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                )
                .map_err(io::Error::from)?;
                let mut n = 0;
                for (slot, r) in got.iter_mut().zip(results) {
                    *slot = (r.bytes, r.address.as_ref().and_then(to_std));
                    n += 1;
                }
                n
            };
            let mut batch = [(&[][..], SocketAddr::from(([0, 0, 0, 0], 0))); BATCH];
            let mut k = 0;
            for (i, (len, from)) in got[..n].iter().enumerate() {
                if let Some(from) = from {
                    let start = i * RECV_BUF;
                    batch[k] = (&st.buf[start..start + len], *from);
                    k += 1;
                }
            }
            f(&batch[..k]);
            Ok(n)
        })
    }
}

/// Receives until the listener's `stop` fires; spawns session tasks on the current
/// runtime.
pub async fn recv_loop(socket: std::net::UdpSocket, shared: Arc<UdpListenerShared>) {
    let socket = match UdpSocket::from_std(socket) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            warn!(listener = %shared.name, error = %e, "cannot register UDP socket");
            return;
        }
    };
    let w = Worker {
        counters: shared.new_counters(),
        shared,
        socket,
        table: Arc::new(Mutex::new(HashMap::new())),
    };
    let stop = w.shared.stop.clone();
    loop {
        let ready = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = w.socket.readable() => r,
        };
        if let Err(e) = ready {
            warn!(listener = %w.shared.name, error = %e, "UDP socket failed");
            break;
        }
        // Drain what is queued, a bounded number of batches at a time; if there is
        // more, let the worker's other tasks (the sessions' reply paths) run first.
        // (Only then: a yield costs an extra poll of the I/O driver.)
        let mut more = true;
        for _ in 0..BATCHES_PER_TURN {
            match w.socket.try_io(tokio::io::Interest::READABLE, || {
                recv_batch(&w.socket, |batch| w.forward_batch(batch))
            }) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    more = false;
                    break;
                }
                Err(e) if crate::fd::is_exhaustion(&e) => {
                    crate::fd::exhausted("UDP receive", &e);
                    tokio::time::sleep(crate::fd::PAUSE).await;
                    break;
                }
                // ICMP errors for the listening socket and the like concern one peer.
                Err(e) => debug!(listener = %w.shared.name, error = %e, "UDP receive failed"),
            }
        }
        if more {
            tokio::task::yield_now().await;
        }
    }
    // End this worker's sessions now: the listener is gone or the process stops.
    let sessions: Vec<_> = w
        .table
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    for s in sessions {
        s.state.fetch_or(state::REPLACED, Relaxed);
        s.replaced.notify_one();
    }
    debug!(listener = %w.shared.name, "UDP receive loop stopped");
}

impl Worker {
    /// Forwards a received batch: consecutive datagrams from one client form a run
    /// that goes to its session in one send (UDP GSO on Linux).
    fn forward_batch(&self, batch: &[(&[u8], SocketAddr)]) {
        let mut i = 0;
        while i < batch.len() {
            let client = batch[i].1;
            let n = run_len(&batch[i..]);
            let mut run = [&[][..]; MAX_RUN];
            for (k, (d, _)) in batch[i..i + n].iter().enumerate() {
                run[k] = d;
            }
            self.forward(&run[..n], client);
            i += n;
        }
    }

    /// Sends datagrams from one client on its session, starting or replacing the
    /// session as needed; counts them as forwarded or dropped.
    fn forward(&self, run: &[&[u8]], client: SocketAddr) {
        let n = run.len() as u64;
        let existing = self
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&client)
            .inspect(|s| {
                s.requests.fetch_add(n, Relaxed);
            })
            .cloned();
        let mut avoid = None;
        let session = match existing {
            // A guard, not a clone: no shared reference count to bump per datagram.
            Some(s) => match s.must_repick(&self.shared.settings.load().pool) {
                None => s,
                Some(why) => {
                    avoid = Some(s.backend().clone());
                    self.replace(&s, why);
                    match self.start_session(client, avoid.as_ref(), n) {
                        Ok(s) => s,
                        Err(r) => return self.counters.dropped(r, n),
                    }
                }
            },
            None => match self.start_session(client, None, n) {
                Ok(s) => s,
                Err(r) => return self.counters.dropped(r, n),
            },
        };
        let (k, err) = send_run(&session.upstream, run, None);
        self.sent(&session, &run[..k]);
        let Some(e) = err else { return };
        let rest = &run[k..];
        let left = rest.len() as u64;
        // Not sent, so never to be answered: `responses` must not wait for them.
        self.unrequest(&session, left);
        if e.kind() == io::ErrorKind::ConnectionRefused && avoid.is_none() {
            // The backend's ICMP port unreachable, reported on this send: re-pick
            // once, now, rather than lose the datagrams.
            session.state.fetch_or(state::FAILED, Relaxed);
            crate::proxy::passive_failure(&self.shared.settings().pool, session.backend());
            self.replace(&session, End::BackendUnreachable);
            match self.start_session(client, Some(session.backend()), left) {
                Ok(s) => {
                    let (k, err) = send_run(&s.upstream, rest, None);
                    self.sent(&s, &rest[..k]);
                    if err.is_some() {
                        let lost = (rest.len() - k) as u64;
                        self.unrequest(&s, lost);
                        self.counters.dropped(DropReason::SendFailed, lost);
                    }
                }
                Err(r) => self.counters.dropped(r, left),
            }
        } else {
            debug!(listener = %self.shared.name, client = %client, error = %e, "UDP send to backend failed");
            self.counters.dropped(DropReason::SendFailed, left);
        }
    }

    /// Takes back `n` requests counted for `s` that were never sent.
    fn unrequest(&self, s: &Session, n: u64) {
        let _t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let _ = s
            .requests
            .fetch_update(Relaxed, Relaxed, |r| Some(r.saturating_sub(n)));
    }

    fn sent(&self, s: &Session, run: &[&[u8]]) {
        let bytes: u64 = run.iter().map(|d| d.len() as u64).sum();
        s.activity.touch();
        s.to_backend.fetch_add(bytes, Relaxed);
        s.backend().stats.bytes_to.fetch_add(bytes, Relaxed);
        self.counters
            .datagrams_to
            .fetch_add(run.len() as u64, Relaxed);
        self.counters.bytes_to.fetch_add(bytes, Relaxed);
    }

    /// Takes `s` out of the table and tells its task to end with `why`.
    fn replace(&self, s: &Arc<Session>, why: End) {
        {
            let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            if t.get(&s.client).is_some_and(|cur| Arc::ptr_eq(cur, s)) {
                t.remove(&s.client);
            }
        }
        debug!(listener = %self.shared.name, client = %s.client, backend = %s.backend().name, reason = why.as_str(), "UDP session re-picks");
        s.state.fetch_or(state::REPLACED, Relaxed);
        s.release();
        s.replaced.notify_one();
    }

    /// Admits a new session for `client` (limits, backend pick, upstream socket),
    /// enters it in the table and spawns its reply task.
    fn start_session(
        &self,
        client: SocketAddr,
        avoid: Option<&Arc<Backend>>,
        requests: u64,
    ) -> Result<Arc<Session>, DropReason> {
        let shared = &self.shared;
        let settings = shared.settings();
        let slot = Slot::take(shared, &settings, client.ip())?;
        let tried: &[Arc<Backend>] = match avoid {
            Some(b) => std::slice::from_ref(b),
            None => &[],
        };
        let guard = settings
            .pool
            .pick(client.ip(), tried)
            .or_else(|| avoid.and_then(|_| settings.pool.pick(client.ip(), &[])))
            .ok_or(DropReason::NoBackend)?;
        let b = guard.backend().clone();
        let upstream = match connect_upstream(b.addr) {
            Ok(u) => {
                crate::fd::available();
                u
            }
            Err(e) => {
                if crate::fd::is_exhaustion(&e) {
                    crate::fd::exhausted("UDP upstream socket", &e);
                } else {
                    debug!(backend = %b.name, error = %e, "UDP upstream socket failed");
                }
                return Err(DropReason::SocketFailed);
            }
        };
        let session = Arc::new(Session {
            client,
            upstream,
            epoch: b.drain_epoch(),
            guard,
            start: Instant::now(),
            activity: Activity::new(),
            state: AtomicU8::new(0),
            replaced: Notify::new(),
            to_backend: AtomicU64::new(0),
            from_backend: AtomicU64::new(0),
            requests: AtomicU64::new(requests),
            slot: Mutex::new(Some(slot)),
        });
        shared.sessions.fetch_add(1, Relaxed);
        b.stats.udp_sessions.fetch_add(1, Relaxed);
        b.stats.udp_active.fetch_add(1, Relaxed);
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client, session.clone());
        let task = SessionTask {
            session: session.clone(),
            socket: self.socket.clone(),
            table: self.table.clone(),
            counters: self.counters.clone(),
            settings,
            shared: shared.clone(),
        };
        tokio::spawn(task.run());
        Ok(session)
    }
}

/// Datagrams one run may hold: a receive batch.
#[cfg(target_os = "linux")]
const MAX_RUN: usize = mmsg::BATCH;
#[cfg(not(target_os = "linux"))]
const MAX_RUN: usize = 1;

/// How many datagrams at the start of `batch` go out as one run: same client, all
/// the size of the first but the last (which may be shorter), at most 64 KiB in
/// all, none empty. What UDP GSO can send as one buffer.
fn run_len(batch: &[(&[u8], SocketAddr)]) -> usize {
    let (first, client) = (batch[0].0.len(), batch[0].1);
    if first == 0 {
        return 1;
    }
    let mut total = first;
    let mut n = 1;
    while n < batch.len().min(MAX_RUN) {
        let (d, c) = batch[n];
        if c != client || d.is_empty() || d.len() > first || total + d.len() > 65_507 {
            break;
        }
        total += d.len();
        n += 1;
        if d.len() < first {
            break;
        }
    }
    n
}

/// Whether UDP GSO works here; turned off for good by the first send it fails.
#[cfg(target_os = "linux")]
static GSO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Sends a run (see [`run_len`]) now, on a connected socket (`to` = `None`) or to
/// `to`: one sendmsg with
/// UDP_SEGMENT, the kernel cutting it into the datagrams (Linux), or one send each.
/// Returns how many went, and the error that stopped the rest.
fn send_run(s: &UdpSocket, run: &[&[u8]], to: Option<SocketAddr>) -> (usize, Option<io::Error>) {
    #[cfg(target_os = "linux")]
    if run.len() > 1 && GSO.load(Relaxed) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
        use std::os::fd::AsRawFd;
        let seg = run[0].len() as u16;
        let mut iov = [std::io::IoSlice::new(&[]); MAX_RUN];
        for (k, d) in run.iter().enumerate() {
            iov[k] = std::io::IoSlice::new(d);
        }
        let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
        let dest = to.map(SockaddrStorage::from);
        match sendmsg::<SockaddrStorage>(
            s.as_raw_fd(),
            &iov[..run.len()],
            &cmsg,
            MsgFlags::MSG_DONTWAIT,
            dest.as_ref(),
        ) {
            // All or nothing: the kernel takes the whole buffer or none of it.
            Ok(_) => return (run.len(), None),
            // No GSO here (kernel or device): never again.
            Err(e @ (nix::Error::EIO | nix::Error::EOPNOTSUPP | nix::Error::ENOPROTOOPT)) => {
                warn!(error = %e, "UDP GSO is not available; sending datagrams one by one");
                GSO.store(false, Relaxed);
            }
            // This run does not fit (a segment over the path MTU, say): send it
            // datagram by datagram; the next run may well fit.
            Err(nix::Error::EINVAL | nix::Error::EMSGSIZE) => {}
            Err(e) => return (0, Some(e.into())),
        }
    }
    for (k, d) in run.iter().enumerate() {
        let r = match to {
            None => send(s, d),
            Some(to) => send_to(s, d, to),
        };
        if let Err(e) = r {
            return (k, Some(e));
        }
    }
    (run.len(), None)
}

/// Whether a socket error says the backend cannot be reached (ICMP port or host
/// unreachable), as opposed to trouble with one datagram.
fn unreachable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::ECONNREFUSED | nix::libc::EHOSTUNREACH | nix::libc::ENETUNREACH)
    )
}

/// Sends on a connected socket now, or fails with `WouldBlock`. A direct syscall:
/// tokio's `try_send` would refuse until it has seen the socket writable once, and
/// a datagram that cannot go now is dropped (and counted) anyway, never queued.
fn send(s: &UdpSocket, data: &[u8]) -> io::Result<usize> {
    socket2::SockRef::from(s).send(data)
}

/// Sends a reply to `to` from the listener's socket now (see [`send`]).
fn send_to(s: &UdpSocket, data: &[u8], to: SocketAddr) -> io::Result<usize> {
    socket2::SockRef::from(s).send_to(data, &to.into())
}

/// A new socket connected to `addr`, so only that backend's datagrams are read and
/// its ICMP errors are reported.
fn connect_upstream(addr: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let s = std::net::UdpSocket::bind(local)?;
    s.connect(addr)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// A counted place under `max_sessions` and `max_sessions_per_source`.
struct Slot {
    shared: Arc<UdpListenerShared>,
    ip: IpAddr,
    per_source: bool,
}

impl Slot {
    fn take(
        shared: &Arc<UdpListenerShared>,
        settings: &UdpSettings,
        ip: IpAddr,
    ) -> Result<Slot, DropReason> {
        // A compare-and-swap, so the count never shows more than the limit.
        let max = settings.max_sessions.unwrap_or(usize::MAX);
        shared
            .active
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .map_err(|_| DropReason::MaxSessions)?;
        let mut slot = Slot {
            shared: shared.clone(),
            ip,
            per_source: false,
        };
        if let Some(max) = settings.max_sessions_per_source {
            let mut m = shared.per_source.lock().unwrap_or_else(|e| e.into_inner());
            let n = m.entry(ip).or_insert(0);
            if *n >= max {
                drop(m);
                return Err(DropReason::MaxSessionsPerSource);
            }
            *n += 1;
            slot.per_source = true;
        }
        Ok(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.active.fetch_sub(1, Relaxed);
        if self.per_source {
            let mut m = self
                .shared
                .per_source
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

/// A session's reply path and lifetime.
struct SessionTask {
    session: Arc<Session>,
    socket: Arc<UdpSocket>,
    table: Arc<Table>,
    counters: Arc<CachePadded<UdpCounters>>,
    settings: Arc<UdpSettings>,
    shared: Arc<UdpListenerShared>,
}

impl SessionTask {
    async fn run(self) {
        let s = &self.session;
        let mut first_reply = None;
        let end = self.replies(&mut first_reply).await;
        {
            let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            if t.get(&s.client).is_some_and(|cur| Arc::ptr_eq(cur, s)) {
                t.remove(&s.client);
            }
        }
        let b = s.backend();
        b.stats.udp_active.fetch_sub(1, Relaxed);
        let duration = s.start.elapsed();
        self.shared.session_duration.record(duration);
        if let Some(fb) = first_reply {
            b.histograms.first_byte.record(fb);
        }
        debug!(listener = %self.shared.name, client = %s.client, backend = %b.name, reason = end.as_str(), "UDP session ended");
        if access_log::enabled() {
            access_log::log(access_log::Entry {
                time: SystemTime::now(),
                protocol: "udp",
                listener: self.shared.name.clone(),
                client: s.client,
                pool: b.pool.clone(),
                backend: Some(b.name.clone()),
                to_backend: s.to_backend.load(Relaxed),
                from_backend: s.from_backend.load(Relaxed),
                connect: None,
                first_byte: first_reply,
                duration,
                reason: end.as_str(),
            });
        }
        // Last: a stopping process waits for this count to reach 0 before it
        // flushes the access log.
        s.release();
    }

    /// Passes a batch of replies to the client from the listener's socket, counting
    /// what went and what did not.
    fn relay(&self, batch: &[(&[u8], SocketAddr)]) {
        let s = &self.session;
        let mut i = 0;
        while i < batch.len() {
            let n = run_len(&batch[i..]);
            let mut run = [&[][..]; MAX_RUN];
            for (k, (d, _)) in batch[i..i + n].iter().enumerate() {
                run[k] = d;
            }
            let (k, err) = send_run(&self.socket, &run[..n], Some(s.client));
            let bytes: u64 = run[..k].iter().map(|d| d.len() as u64).sum();
            s.from_backend.fetch_add(bytes, Relaxed);
            s.backend().stats.bytes_from.fetch_add(bytes, Relaxed);
            self.counters.datagrams_from.fetch_add(k as u64, Relaxed);
            self.counters.bytes_from.fetch_add(bytes, Relaxed);
            if let Some(e) = err {
                debug!(client = %s.client, error = %e, "UDP reply to client failed");
                self.counters
                    .dropped(DropReason::ReplyFailed, (n - k) as u64);
            }
            i += n;
        }
    }

    /// With `responses = N`: whether every request has its N replies, in which case
    /// the session leaves the table (under the lock that new requests are counted
    /// under, so none can slip in unanswered).
    fn answered(&self, replies: u64) -> bool {
        let n = self.settings.responses;
        if n == 0 {
            return false;
        }
        let s = &self.session;
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if replies < n.saturating_mul(s.requests.load(Relaxed)) {
            return false;
        }
        if t.get(&s.client).is_some_and(|cur| Arc::ptr_eq(cur, s)) {
            t.remove(&s.client);
        }
        true
    }

    /// Relays replies until the session ends; returns why.
    async fn replies(&self, first_reply: &mut Option<Duration>) -> End {
        let s = &self.session;
        let idle_timeout = self.settings.idle_timeout;
        let idle = tokio::time::sleep(idle_timeout);
        let replaced = s.replaced.notified();
        let wake = s.backend().cut_token().cancelled_owned();
        // ICMP port unreachable shows up as a socket error (EPOLLERR), which does
        // not wake a reader: wait for it on its own.
        let error = s.upstream.ready(tokio::io::Interest::ERROR);
        tokio::pin!(idle, replaced, wake, error);
        let mut error_seen = false;
        let mut replies = 0u64;
        // Requests counted when the idle timer last looked (see below).
        let mut seen_requests = s.requests.load(Relaxed);
        std::future::poll_fn(|cx| {
            if replaced.as_mut().poll(cx).is_ready() || s.state.load(Relaxed) & state::REPLACED != 0
            {
                return Poll::Ready(if self.shared.cut.is_cancelled() || self.shared.stop.is_cancelled() {
                    End::Shutdown
                } else if s.state.load(Relaxed) & state::FAILED != 0 {
                    End::BackendUnreachable
                } else {
                    s.must_repick(&self.settings.pool).unwrap_or(End::BackendDown)
                });
            }
            while wake.as_mut().poll(cx).is_ready() {
                wake.set(s.backend().cut_token().cancelled_owned());
                if self.shared.cut.is_cancelled() {
                    return Poll::Ready(End::Shutdown);
                }
                if s.backend().drain_epoch() != s.epoch {
                    return Poll::Ready(End::Drained);
                }
            }
            // (An async fn's future must not be polled again once it is done.)
            if !error_seen
                && s.state.load(Relaxed) & state::FAILED == 0
                && error.as_mut().poll(cx).is_ready()
            {
                error_seen = true;
                match s.upstream.take_error() {
                    Ok(Some(e)) if unreachable(&e) => {
                        debug!(backend = %s.backend().name, error = %e, "UDP backend unreachable");
                        s.state.fetch_or(state::FAILED, Relaxed);
                        crate::proxy::passive_failure(&self.settings.pool, s.backend());
                    }
                    // Another error (a client's oversized datagram meeting a
                    // smaller MTU, say) is no verdict on the backend.
                    Ok(Some(e)) => debug!(backend = %s.backend().name, error = %e, "UDP upstream socket error"),
                    _ => {}
                }
            }
            // A failed session only waits to be replaced or to expire.
            if s.state.load(Relaxed) & state::FAILED == 0 {
                loop {
                    match s.upstream.poll_recv_ready(cx) {
                        Poll::Pending => break,
                        Poll::Ready(Err(e)) => {
                            debug!(backend = %s.backend().name, error = %e, "UDP upstream readiness failed");
                            break;
                        }
                        Poll::Ready(Ok(())) => {}
                    }
                    // A batch of replies at once; runs of same-size datagrams go to
                    // the client as one GSO send, like the other direction.
                    let mut got = 0u64;
                    let r = s.upstream.try_io(tokio::io::Interest::READABLE, || {
                        recv_batch(&s.upstream, |batch| {
                            got = batch.len() as u64;
                            self.relay(batch);
                        })
                    });
                    match r {
                        Ok(_) => {
                            s.activity.touch();
                            if first_reply.is_none() {
                                *first_reply = Some(s.start.elapsed());
                                // An answer: the backend's failures are no longer
                                // "in a row" (passive ejection).
                                s.backend().passive_success();
                            }
                            // Every reply answers a request, for `responses`, also
                            // one that could not be passed on.
                            replies += got;
                            if self.answered(replies) {
                                return Poll::Ready(End::Responses);
                            }
                        }
                        // Readiness was stale and is cleared now: poll again to wait.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if unreachable(&e) => {
                            debug!(backend = %s.backend().name, error = %e, "UDP backend unreachable");
                            s.state.fetch_or(state::FAILED, Relaxed);
                            crate::proxy::passive_failure(&self.settings.pool, s.backend());
                            break;
                        }
                        Err(e) => {
                            debug!(backend = %s.backend().name, error = %e, "UDP upstream receive failed");
                        }
                    }
                }
            }
            while idle.as_mut().poll(cx).is_ready() {
                let mut deadline = s.activity.last() + idle_timeout;
                if Instant::now() >= deadline {
                    // Decide under the table lock, which new requests are counted
                    // under: one the receive loop took since the last look (on
                    // another thread, in the shared worker model) keeps the session.
                    let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
                    let now_requests = s.requests.load(Relaxed);
                    if now_requests == seen_requests {
                        if t.get(&s.client).is_some_and(|cur| Arc::ptr_eq(cur, s)) {
                            t.remove(&s.client);
                        }
                        return Poll::Ready(if s.state.load(Relaxed) & state::FAILED != 0 {
                            End::BackendUnreachable
                        } else {
                            End::IdleTimeout
                        });
                    }
                    seen_requests = now_requests;
                    deadline = Instant::now() + idle_timeout;
                }
                idle.as_mut().reset(deadline.into());
            }
            Poll::Pending
        })
        .await
    }
}

/// Copies a UDP listener's counters into the metrics registry (at scrape time).
pub fn export(
    l: &UdpListenerShared,
    export: impl Fn(&'static str, &[(&'static str, String)], u64),
) {
    let name = l.name.to_string();
    let t = l.totals();
    let labels = [("listener", name.clone())];
    metrics::gauge!(names::UDP_SESSIONS_ACTIVE, &labels).set(l.active.load(Relaxed) as f64);
    export(names::UDP_SESSIONS, &labels, l.sessions.load(Relaxed));
    for (dir, d, b) in [
        ("to_backend", t.datagrams_to, t.bytes_to),
        ("from_backend", t.datagrams_from, t.bytes_from),
    ] {
        let l = [("listener", name.clone()), ("direction", dir.to_string())];
        export(names::UDP_DATAGRAMS, &l, d);
        export(names::UDP_BYTES, &l, b);
    }
    for (reason, n) in t.dropped {
        let l = [("listener", name.clone()), ("reason", reason.to_string())];
        export(names::UDP_DROPPED, &l, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle UDP session costs mostly its reply task's future; keep it small.
    #[test]
    fn session_future_is_small() {
        fn size<F: Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let cfg = crate::config::Config::parse(
            "[[listeners]]\nname='l'\nbind='127.0.0.1:0'\nprotocol='udp'\npool='p'\n[[pools]]\nname='p'\nbackends=[{address='127.0.0.1:1'}]",
            std::path::Path::new("t"),
        )
        .unwrap();
        let pool = crate::pool::Pool::new(&cfg.pools[0]);
        let settings = Arc::new(UdpSettings::new(&cfg.listeners[0], pool.clone(), 256));
        let token = CancellationToken::new();
        let shared = UdpListenerShared::new(
            &cfg.listeners[0],
            UdpSettings::new(&cfg.listeners[0], pool.clone(), 256),
            token.clone(),
            token,
        );
        let backend = pool.backends()[0].clone();
        let session = Arc::new(Session {
            client: "127.0.0.1:2".parse().unwrap(),
            upstream: connect_upstream(backend.addr).unwrap(),
            guard: backend.claim(),
            epoch: 0,
            start: Instant::now(),
            activity: Activity::new(),
            state: AtomicU8::new(0),
            replaced: Notify::new(),
            to_backend: AtomicU64::new(0),
            from_backend: AtomicU64::new(0),
            requests: AtomicU64::new(1),
            slot: Mutex::new(None),
        });
        let task = SessionTask {
            session,
            socket: Arc::new(
                UdpSocket::from_std(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap(),
            ),
            table: Arc::new(Mutex::new(HashMap::new())),
            counters: shared.new_counters(),
            settings,
            shared,
        };
        let f = task.run();
        let n = size(&f);
        eprintln!("UDP session future: {n} bytes");
        assert!(n < 700, "UDP session future is {n} bytes");
    }
}
