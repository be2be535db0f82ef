//! Listening sockets and accept loops.
//!
//! Each worker gets its own socket for a listener (SO_REUSEPORT), so the kernel
//! spreads new connections over workers without a shared accept lock. An accept
//! loop never exits on an error: on EMFILE/ENFILE it pauses ~100 ms (as HAProxy
//! does) so it neither spins nor dies, and resumes by itself; see [`crate::fd`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::config::ListenerConfig;
use crate::fd;
use crate::pool::Pool;
use crate::proxy;

/// What every session of a listener shares.
pub struct ListenerShared {
    pub name: Arc<str>,
    /// Replaced whole by a reload; a session keeps the settings it started with.
    settings: ArcSwap<ListenerSettings>,
    /// Stops this listener's accept loops (reload removed it, or shutdown).
    pub stop_accept: CancellationToken,
    /// Cuts this listener's sessions (a child of the process-wide hard stop).
    pub cut: CancellationToken,
    /// Set when a reload removed the listener: its sessions cut at the deadline end
    /// as `drained`, not `shutdown`.
    pub retired: std::sync::atomic::AtomicBool,
    /// Sessions in progress, across all workers.
    pub active: AtomicUsize,
    /// Accepted client connections, rejected ones included.
    pub accepted: AtomicU64,
    /// Clients closed at once because `max_connections` was reached.
    pub rejected_max_connections: AtomicU64,
    /// Clients closed because no backend was usable.
    pub rejected_no_backend: AtomicU64,
    /// Clients closed because every connect attempt failed.
    pub rejected_connect_failed: AtomicU64,
    /// `flowgate_session_duration_seconds{listener}`.
    pub session_duration: metrics::Histogram,
}

/// A listener's settings as of the last (re)load.
pub struct ListenerSettings {
    pub pool: Arc<Pool>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: Option<usize>,
    pub bind: SocketAddr,
}

impl ListenerSettings {
    pub fn new(cfg: &ListenerConfig, pool: Arc<Pool>) -> ListenerSettings {
        ListenerSettings {
            pool,
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            max_connections: cfg.max_connections,
            bind: cfg.bind,
        }
    }
}

impl ListenerShared {
    pub fn new(
        cfg: &ListenerConfig,
        pool: Arc<Pool>,
        stop_accept: CancellationToken,
        cut: CancellationToken,
    ) -> Arc<ListenerShared> {
        Arc::new(ListenerShared {
            name: cfg.name.as_str().into(),
            settings: ArcSwap::from_pointee(ListenerSettings::new(cfg, pool)),
            stop_accept,
            cut,
            active: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            retired: std::sync::atomic::AtomicBool::new(false),
            rejected_max_connections: AtomicU64::new(0),
            rejected_no_backend: AtomicU64::new(0),
            rejected_connect_failed: AtomicU64::new(0),
            session_duration: metrics::histogram!(
                crate::metrics::names::SESSION_DURATION,
                "listener" => cfg.name.clone()
            ),
        })
    }

    /// Rejected clients by reason (the `reason` label of
    /// `flowgate_connections_rejected_total`).
    pub fn rejected(&self) -> [(&'static str, u64); 3] {
        [
            (
                "max_connections",
                self.rejected_max_connections.load(Ordering::Relaxed),
            ),
            (
                "no_backend",
                self.rejected_no_backend.load(Ordering::Relaxed),
            ),
            (
                "connect_failed",
                self.rejected_connect_failed.load(Ordering::Relaxed),
            ),
        ]
    }

    pub fn settings(&self) -> Arc<ListenerSettings> {
        self.settings.load_full()
    }

    pub fn set_settings(&self, s: ListenerSettings) {
        self.settings.store(Arc::new(s));
    }
}

/// Creates a non-blocking listening socket with SO_REUSEADDR and SO_REUSEPORT.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Accepts until the listener's `stop_accept` fires; every session is spawned on
/// `tracker`.
pub async fn accept_loop(
    listener: std::net::TcpListener,
    shared: Arc<ListenerShared>,
    tracker: TaskTracker,
) {
    let stop = shared.stop_accept.clone();
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(listener = %shared.name, error = %e, "cannot register listening socket");
            return;
        }
    };
    loop {
        // While descriptors are exhausted, take one client per pause: the others wait
        // in the backlog rather than being accepted without a backend socket.
        if fd::is_exhausted() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(fd::PAUSE) => {}
            }
        }
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                let settings = shared.settings();
                if let Some(slot) = Slot::take(&shared, settings.max_connections) {
                    tracker
                        .spawn(async move { proxy::serve(stream, peer, &slot.0, settings).await });
                } else {
                    shared
                        .rejected_max_connections
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(listener = %shared.name, client = %peer, "max_connections reached, closing client");
                    reject(stream);
                    proxy::log_rejected(&shared, &settings, peer);
                }
            }
            Err(e) if fd::is_exhaustion(&e) => {
                fd::exhausted("accept", &e);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(fd::PAUSE) => {}
                }
            }
            // ECONNABORTED and friends concern one client only.
            Err(e) => debug!(listener = %shared.name, error = %e, "accept failed"),
        }
    }
    debug!(listener = %shared.name, "accept loop stopped");
}

/// Closes a client we will not serve.
fn reject(stream: TcpStream) {
    drop(stream);
}

/// A counted place under the listener's `max_connections`.
struct Slot(Arc<ListenerShared>);

impl Slot {
    fn take(shared: &Arc<ListenerShared>, max: Option<usize>) -> Option<Slot> {
        let before = shared.active.fetch_add(1, Ordering::AcqRel);
        if max.is_some_and(|max| before >= max) {
            shared.active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(shared.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}
