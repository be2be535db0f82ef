//! The data path: what moves a client's bytes to a backend and back.
//!
//! - [`tcp`]: listening sockets and accept loops, one session per client (connect
//!   with retries, splice/copy both ways, half-close, reset propagation, idle
//!   timeout), and what a listener's sessions share (settings, counters).
//! - [`http`]: the L7 mode, served from TCP listeners whose settings say so.
//! - [`udp`]: per-worker receive loops, sessions keyed by client address, batched
//!   sends both ways.
//!
//! This module holds what both share: why a session ended ([`Termination`]), the
//! session clock ([`now_us`], [`Activity`]) and passive outlier detection
//! ([`passive_failure`]). The data path reads the model (pools, backends) and never
//! the control plane: what it counts, the control plane reads from the objects it
//! was handed.

pub mod busy;
pub mod http;
pub mod tcp;
pub mod udp;

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::access_log::AccessLog;
use crate::backend::{flag, Backend};
use crate::pool::Pool;
use crate::tasks::Tasks;

thread_local! {
    static REACTOR: Cell<usize> = const { Cell::new(0) };
}

/// Names the calling thread's own I/O reactor: set once by a worker thread of the
/// per-core model (one reactor each, numbered from 1). Threads that set nothing
/// (the shared model's, whose reactor all share; the control thread) read 0.
pub fn set_reactor(n: usize) {
    REACTOR.with(|r| r.set(n));
}

/// The calling thread's reactor (see [`set_reactor`]); 0 for none of its own.
pub fn reactor() -> usize {
    REACTOR.with(|r| r.get())
}

/// What the runtime gives every listener, TCP or UDP, for its whole life.
#[derive(Clone, Debug)]
pub struct Context {
    /// Where finished sessions are logged.
    pub access_log: Arc<AccessLog>,
    /// Where side work (passive-ejection timers) runs, tracked.
    pub control: Tasks,
    /// Whether TCP bulk transfers may switch to splice(2) (`runtime.splice`).
    pub splice: bool,
    /// `runtime.busy_poll` in microseconds, for `SO_BUSY_POLL` on backend sockets
    /// (0: off).
    pub busy_poll_us: u32,
    /// Pooled upstream HTTP connections (http listeners).
    pub upstreams: Arc<http::Upstreams>,
    /// Set when a new process took the listening sockets over (binary upgrade):
    /// UDP receive loops then stop without ending their sessions.
    pub handed_over: Arc<std::sync::atomic::AtomicBool>,
}

#[cfg(test)]
impl Context {
    /// A context of its own, on the current tokio runtime, access log off.
    pub(crate) fn for_tests() -> Context {
        Context {
            access_log: AccessLog::new(),
            control: Tasks::new(tokio::runtime::Handle::current()),
            splice: true,
            busy_poll_us: 0,
            upstreams: http::Upstreams::new(),
            handed_over: Default::default(),
        }
    }
}

/// A TCP connection to `addr`, from the pool's `source` address when it has one.
/// The source port is left to the connect (IP_BIND_ADDRESS_NO_PORT, Linux), so the
/// 4-tuple only has to be unique per destination, as for an unbound socket, instead
/// of a bind reserving one port of the source address for every destination.
pub(crate) async fn connect_tcp(
    addr: std::net::SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    match source {
        None => tokio::net::TcpStream::connect(addr).await,
        Some(ip) => connect_from(addr, ip, false).await,
    }
}

/// A TCP connection to `addr` from `ip`: with `transparent`, an address that is not
/// this host's (the client's, `source = "client"`), through IP_TRANSPARENT.
pub(crate) async fn connect_from(
    addr: std::net::SocketAddr,
    ip: std::net::IpAddr,
    transparent: bool,
) -> std::io::Result<tokio::net::TcpStream> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    bind_source(&sock, addr, ip, transparent)?;
    sock.connect(addr).await
}

/// Binds `sock`, about to connect to `addr`, to `ip` (any port, chosen at the
/// connect: IP_BIND_ADDRESS_NO_PORT on Linux); with `transparent`, through
/// IP_TRANSPARENT.
fn bind_source(
    sock: &impl std::os::fd::AsFd,
    addr: std::net::SocketAddr,
    ip: std::net::IpAddr,
    transparent: bool,
) -> std::io::Result<()> {
    if transparent {
        set_transparent(sock, addr.is_ipv4())?;
    }
    #[cfg(target_os = "linux")]
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
        .map_err(std::io::Error::from)?;
    socket2::SockRef::from(sock).bind(&std::net::SocketAddr::new(ip, 0).into())
}

/// A TCP connection to `addr` that starts with `first` (a PROXY header, a replayed
/// ClientHello), from `source` when set (`(ip, transparent)`, as [`connect_from`]).
///
/// The bytes are sent right after the connect call, as HAProxy does, instead of
/// after the reactor reports the socket writable: on loopback or a LAN the
/// handshake is usually complete by the time `connect` returns, and then the
/// send goes at once, and neither a poll round nor the `getsockopt(SO_ERROR)` of a
/// plain connect is spent. A socket still connecting takes nothing (EAGAIN in
/// SYN_SENT) and the rest waits for writability as usual; a refused one reports
/// the refusal from the send.
pub(crate) async fn connect_with(
    addr: std::net::SocketAddr,
    source: Option<(std::net::IpAddr, bool)>,
    first: &[u8],
) -> std::io::Result<tokio::net::TcpStream> {
    use std::io::ErrorKind;
    use tokio::io::AsyncWriteExt;
    let domain = socket2::Domain::for_address(addr);
    #[cfg(target_os = "linux")]
    let s = socket2::Socket::new(domain, socket2::Type::STREAM.nonblocking(), None)?;
    #[cfg(not(target_os = "linux"))]
    let s = {
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        s
    };
    if let Some((ip, transparent)) = source {
        bind_source(&s, addr, ip, transparent)?;
    }
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) => {}
        Err(e) => return Err(e),
    }
    let sent = match s.send(first) {
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    let mut stream = tokio::net::TcpStream::from_std(std::net::TcpStream::from(s))?;
    if sent < first.len() {
        if sent == 0 {
            // Still connecting: writable once the handshake ends either way.
            stream.writable().await?;
            if let Some(e) = stream.take_error()? {
                return Err(e);
            }
        }
        stream.write_all(&first[sent..]).await?;
    }
    Ok(stream)
}

/// Sets IP_TRANSPARENT (IPV6_TRANSPARENT when not `v4`) on `sock`: it may then bind
/// an address of another host. Needs CAP_NET_ADMIN (or CAP_NET_RAW); Linux only.
pub(crate) fn set_transparent(sock: &impl std::os::fd::AsFd, v4: bool) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let s = socket2::SockRef::from(sock);
        if v4 {
            s.set_ip_transparent_v4(true)
        } else {
            s.set_ip_transparent_v6(true)
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (sock, v4);
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "source = \"client\" (IP_TRANSPARENT) is built for Linux only",
        ))
    }
}

/// Whether this process may use `source = "client"`: sets IP_TRANSPARENT on a
/// throwaway socket, as each backend connection of such a pool will. Startup and
/// reload ask before they run such a pool, so a missing privilege (EPERM without
/// CAP_NET_ADMIN) is said once, at once, instead of failing every connection.
fn transparent_allowed() -> std::io::Result<()> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    set_transparent(&s, true)
}

/// Why a pool with `source = "client"` cannot run: IP_TRANSPARENT is refused.
#[derive(Debug, thiserror::Error)]
#[error("pool {pool:?} has source = \"client\", which needs IP_TRANSPARENT: {error} (run flowgate with CAP_NET_ADMIN; see docs/operations.md, \"Client address preservation\")")]
pub struct TransparentError {
    pub pool: String,
    pub error: std::io::Error,
}

/// Refuses `pools` if one has `source = "client"` and this process cannot set
/// IP_TRANSPARENT.
pub fn check_transparent(pools: &[crate::config::PoolConfig]) -> Result<(), TransparentError> {
    let Some(p) = pools
        .iter()
        .find(|p| p.source == Some(crate::config::PoolSource::Client))
    else {
        return Ok(());
    };
    transparent_allowed().map_err(|error| TransparentError {
        pool: p.name.clone(),
        error,
    })
}

/// Why a TCP session or a UDP session ended; the names are the access log's
/// termination reasons (docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    ClientClosed,
    BackendClosed,
    ClientReset,
    BackendReset,
    IdleTimeout,
    ConnectFailed,
    NoBackend,
    /// Every usable backend was at its `max_connections`, with no queue
    /// (`queue_timeout` unset) or a full one (`max_queue`).
    BackendsFull,
    /// Waited `queue_timeout` for a backend's slot; none freed.
    QueueTimeout,
    /// TCP: the peer's PROXY header was missing, malformed, too long, too slow, or
    /// the peer is not in `proxy_trusted`.
    ProxyHeader,
    /// TCP, with `sni_routes`: no complete ClientHello in time, bytes that are not
    /// TLS, or no route for the client's SNI where one is required.
    Sni,
    /// Refused by `allow`/`deny`.
    Acl,
    /// Refused: the source is at `max_connections_per_source`.
    SourceLimit,
    /// Refused: the source is over `max_rate_per_source`.
    SourceRate,
    /// A drain deadline passed (backend drained, or listener/backend removed by reload).
    Drained,
    /// Hard stop or graceful stop (UDP: also the listener was removed).
    Shutdown,
    /// UDP: `responses` replies came back.
    Responses,
    /// UDP: ICMP port unreachable (or another socket error) from the backend.
    BackendUnreachable,
    /// UDP: health checks or passive ejection took the backend out; re-picked.
    BackendDown,
}

impl Termination {
    pub fn as_str(self) -> &'static str {
        match self {
            Termination::ClientClosed => "client_closed",
            Termination::BackendClosed => "backend_closed",
            Termination::ClientReset => "client_reset",
            Termination::BackendReset => "backend_reset",
            Termination::IdleTimeout => "idle_timeout",
            Termination::ConnectFailed => "connect_failed",
            Termination::NoBackend => "no_backend",
            Termination::BackendsFull => "backends_full",
            Termination::QueueTimeout => "queue_timeout",
            Termination::ProxyHeader => "proxy_header",
            Termination::Sni => "sni",
            Termination::Acl => "acl",
            Termination::SourceLimit => "source_limit",
            Termination::SourceRate => "source_rate",
            Termination::Drained => "drained",
            Termination::Shutdown => "shutdown",
            Termination::Responses => "responses",
            Termination::BackendUnreachable => "backend_unreachable",
            Termination::BackendDown => "backend_down",
        }
    }
}

/// Time of the last byte moved, shared by both directions of a session: milliseconds
/// since a process-wide epoch, so a session stores one word.
pub(crate) struct Activity {
    last_ms: AtomicU64,
    /// When the backend's first byte reached the client ([`now_us`]; 0: not yet).
    /// Kept here rather than in a local of the session's future, which would cost
    /// that future a word more (see the size test below).
    pub(crate) first_us: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds since the process-wide epoch: a timestamp in one word.
pub(crate) fn now_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

/// The instant a [`now_us`] timestamp stands for (no clock read).
pub(crate) fn instant_of_us(us: u64) -> Instant {
    epoch() + std::time::Duration::from_micros(us)
}

impl Activity {
    pub(crate) fn new() -> Activity {
        let a = Activity {
            last_ms: AtomicU64::new(0),
            first_us: AtomicU64::new(0),
        };
        a.touch();
        a
    }

    pub(crate) fn touch(&self) {
        let ms = epoch().elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn last(&self) -> Instant {
        epoch() + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Counts a failure for passive outlier detection and ejects the backend when it
/// reaches the pool's `passive.consecutive_failures`.
/// The timer that ends the ejection runs on `control`, tracked.
pub(crate) fn passive_failure(pool: &Arc<Pool>, b: &Arc<Backend>, control: &Tasks) {
    let Some(passive) = pool.config().passive.clone() else {
        return;
    };
    if b.passive_failure() >= passive.consecutive_failures && b.set_flag(flag::EJECTED) {
        warn!(
            pool = %pool.name,
            backend = %b.name,
            failures = passive.consecutive_failures,
            eject_for = ?passive.eject_for,
            "backend ejected: consecutive connect failures or resets"
        );
        let (pool, b) = (pool.clone(), b.clone());
        control.spawn_until_stop(async move {
            tokio::time::sleep(passive.eject_for).await;
            b.passive_success();
            if b.clear_flag(flag::EJECTED) {
                info!(pool = %pool.name, backend = %b.name, "backend back from passive ejection");
                pool.report_all_down();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A backend back from passive ejection wakes whoever waits for the pool to
    /// have a usable backend (a drain keeping a removed backend as a fallback):
    /// nothing polls for it.
    #[tokio::test(start_paused = true)]
    async fn the_end_of_an_ejection_wakes_waiters_for_a_usable_backend() {
        let cfg = Config::parse(
            "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\
             [[pools]]\nname = \"p\"\nbackends = [ { address = \"127.0.0.1:1\" } ]\n\
             [pools.passive]\nconsecutive_failures = 1\neject_for = \"1s\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let pool = Pool::new(&cfg.pools[0]);
        let b = pool.backends()[0].clone();
        let control = Tasks::new(tokio::runtime::Handle::current());
        passive_failure(&pool, &b, &control);
        pool.report_all_down();
        assert!(!pool.has_usable(), "ejected");
        tokio::time::timeout(Duration::from_secs(30), pool.usable())
            .await
            .expect("woken when the ejection ends");
        assert!(b.is_usable());
    }
}
