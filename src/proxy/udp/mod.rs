//! UDP load balancing: sessions keyed by the client's address and port. This file
//! is the public surface (settings, shared listener state, counters, `bind`); the
//! work is in the files below.
//!
//! Each worker has its own SO_REUSEPORT socket per UDP listener; the kernel hashes a
//! client's 4-tuple to one of them, so a client's datagrams always reach the same
//! worker, and each worker keeps its own session table (a lock only that worker and
//! its sessions touch).
//!
//! # Where a datagram goes
//!
//! 1. **receive a batch** (`recv.rs`, [`recv_loop`]): the worker's receive loop takes
//!    up to 16 datagrams with one `recvmmsg` (Linux; `batch.rs`), and with them the
//!    socket's drops for a full buffer.
//! 2. **find or start the session** (`recv.rs`, `Worker::forward`): the client's
//!    session from the worker's table, or a new one: limits (`limits.rs`), the pool's
//!    pick, an upstream socket *connected* to the backend, and a task for its replies.
//! 3. **forward** (`send.rs`): consecutive same-size datagrams of one client go on the
//!    session's upstream socket as one `sendmsg` with `UDP_SEGMENT` (GSO), or one
//!    `send` each; no queue in between.
//! 4. **replies** (`session.rs`): the session's task reads its upstream socket the
//!    same way and relays runs to the client from the listener's own socket, so they
//!    come from the address and port the client sent to.
//! 5. **end** (`session.rs`, `SessionTask::end`): idle expiry (a timer checked lazily
//!    against the last datagram, no scan over sessions), `responses` reached,
//!    replacement by the receive loop (the backend failed with ICMP unreachable, went
//!    down or drained: the client's next datagram re-picks), a cut, or shutdown. One
//!    method turns that into the termination reason and accounts for the session.
//!
//! Nothing is dropped silently: every datagram that is not forwarded is counted in
//! `flowgate_udp_dropped_total{reason}`, including those the kernel drops for a
//! full receive buffer on the listener's or a session's socket (SO_RXQ_OVFL, Linux;
//! see `batch::RecvState`).

mod batch;
mod limits;
mod recv;
mod replies;
mod send;
mod session;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use crossbeam_utils::CachePadded;
use tokio_util::sync::CancellationToken;

use crate::config::ListenerConfig;
use crate::metrics::names;
use crate::pool::Pool;
use crate::proxy::Context;

pub use recv::recv_loop;

/// Receive buffers hold any datagram (IPv6 payloads can be a little larger).
const RECV_BUF: usize = 65_536;

/// Datagrams per recvmmsg call (Linux), and so the most one GSO run holds.
#[cfg(target_os = "linux")]
const BATCH: usize = 16;

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
    /// A datagram from one of flowgate's own addresses (the listener's, or a
    /// backend's): forwarding it would feed a loop.
    Loop,
    /// A reply beyond `responses` (or `max_replies_per_request`) per client datagram.
    ReplyLimit,
    /// The kernel dropped a client datagram: the listener socket's receive buffer
    /// was full (SO_RXQ_OVFL, Linux).
    ListenerRecvBuffer,
    /// The kernel dropped a backend's reply: the session's upstream socket's
    /// receive buffer (`session_recv_buffer`) was full (SO_RXQ_OVFL, Linux).
    SessionRecvBuffer,
}

impl DropReason {
    const COUNT: usize = 10;
    const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::NoBackend,
        DropReason::MaxSessions,
        DropReason::MaxSessionsPerSource,
        DropReason::SocketFailed,
        DropReason::SendFailed,
        DropReason::ReplyFailed,
        DropReason::Loop,
        DropReason::ReplyLimit,
        DropReason::ListenerRecvBuffer,
        DropReason::SessionRecvBuffer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoBackend => "no_backend",
            DropReason::MaxSessions => "max_sessions",
            DropReason::MaxSessionsPerSource => "max_sessions_per_source",
            DropReason::SocketFailed => "socket_failed",
            DropReason::SendFailed => "send_failed",
            DropReason::ReplyFailed => "reply_failed",
            DropReason::Loop => "loop",
            DropReason::ReplyLimit => "reply_limit",
            DropReason::ListenerRecvBuffer => "listener_recv_buffer",
            DropReason::SessionRecvBuffer => "session_recv_buffer",
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
    dropped: [AtomicU64; DropReason::COUNT],
}

impl UdpCounters {
    fn dropped(&self, r: DropReason, n: u64) {
        self.dropped[r as usize].fetch_add(n, Relaxed);
    }
}

/// A UDP listener's settings as of the last (re)load.
#[derive(Debug)]
pub struct UdpSettings {
    pub pool: Arc<Pool>,
    pub idle_timeout: Duration,
    pub max_sessions: Option<usize>,
    pub max_sessions_per_source: Option<usize>,
    pub responses: u64,
    /// Replies passed on per client datagram at most (0: no limit): `responses`
    /// when set, else `max_replies_per_request`.
    pub reply_limit: u64,
    /// Receive buffer of each session's upstream socket (`session_recv_buffer`).
    pub session_recv_buffer: usize,
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
            session_recv_buffer: cfg.session_recv_buffer,
            reply_limit: if cfg.responses > 0 {
                cfg.responses
            } else {
                cfg.max_replies_per_request
            },
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
    /// Never reused (see [`crate::ids`]).
    pub id: u64,
    pub name: Arc<str>,
    /// What the runtime gave this listener: access log, control tasks.
    pub ctx: Context,
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
    /// Whether UDP GSO works for this listener's sockets; turned off for good by
    /// the first send that finds it unsupported (see `send::send_run`).
    /// Padded: read on every send run, it must not share a line with the
    /// counters written at every session start.
    gso: CachePadded<AtomicBool>,
}

impl std::fmt::Debug for UdpListenerShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpListenerShared")
            .field("name", &self.name)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl UdpListenerShared {
    pub fn new(
        cfg: &ListenerConfig,
        settings: UdpSettings,
        ctx: Context,
        stop: CancellationToken,
        cut: CancellationToken,
    ) -> Arc<UdpListenerShared> {
        Arc::new(UdpListenerShared {
            id: crate::ids::next(),
            name: cfg.name.as_str().into(),
            ctx,
            settings: ArcSwap::from_pointee(settings),
            stop,
            cut,
            active: AtomicUsize::new(0),
            sessions: AtomicU64::new(0),
            per_source: Mutex::new(HashMap::new()),
            counters: Mutex::new(Vec::new()),
            gso: CachePadded::new(AtomicBool::new(true)),
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
    pub dropped: [(&'static str, u64); DropReason::COUNT],
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
    // What still overflows it is counted (`listener_recv_buffer`).
    batch::report_drops(&socket);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
