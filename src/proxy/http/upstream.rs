//! Upstream HTTP connections, pooled per backend and reused.
//!
//! A backend object belongs to one pool, so keying by backend keeps pools from
//! ever sharing a connection. HTTP/1.1 connections wait idle in a LIFO list (at
//! most the pool's `max_idle_per_backend`) and go back to it only once their
//! response ended cleanly; one HTTP/2 connection per backend and worker carries
//! that worker's h2c requests (as Envoy's per-worker pools: a stream's request
//! task, the connection's driver task and the socket's readiness all stay on the
//! worker; with one connection for all, every stream from another worker crossed
//! threads twice).
//!
//! **An HTTP/1.1 connection has no task of its own.** It is flowgate's own client
//! ([`super::h1`]): the request that uses it writes the request and reads the
//! response head in its task, then the response body ([`super::body::RespBody`])
//! reads on, so one request is one task. An idle pooled connection is read by
//! nobody; the next request that takes it tries one read first, which notices a
//! close that came while it waited (a system call only if the reactor saw the
//! socket readable), and a close that comes later is the "pooled connection dead"
//! retry of [`super::forward`]. Idle connections are handed out to the worker that
//! last used them first, so the socket's readiness events and the task they wake
//! stay on one thread; one taken by another worker moves its socket to that
//! worker's reactor ([`UpIo`]). A WebSocket handshake goes through hyper's client
//! on a connection of its own, with a driver task (hyper hands the upgraded
//! connection over after the `101`); it is never pooled. An h2c connection's
//! driver task runs on the worker that opened it (the one whose requests it
//! carries), until the connection closes or the instance stops. Built on
//! `hyper::client::conn` (h2c, upgrades) rather than hyper-util's pooled client: a
//! request must move to another backend when a connect fails, and hyper-util's
//! client consumes the request then.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustc_hash::FxHashMap;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::h1;
use super::request_body::UpBody;
use crate::backend::Backend;

/// How a request goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.1 on a pooled connection ([`super::h1`]).
    Http1,
    /// HTTP/1.1 through hyper on a connection of its own, never pooled: a
    /// WebSocket handshake (hyper hands the upgraded connection over).
    Upgrade,
    H2c,
}

/// A connection ready for one request.
#[derive(Debug)]
pub enum Sender {
    /// Boxed (once per connection, for its whole life): its buffers and state
    /// would size every request's future.
    Http1(Box<H1>),
    Upgrade(http1::SendRequest<UpBody>),
    H2(http2::SendRequest<UpBody>),
}

/// A pooled HTTP/1.1 upstream connection. It has no task of its own: the request
/// that uses it writes and reads it, in the request's task (see [`super::h1`]).
pub struct H1 {
    pub conn: h1::Conn<UpIo>,
    /// Its backend's idle list, where it goes back to after a clean exchange
    /// (no look-up in [`Upstreams`]' map for that).
    home: Arc<BackendConns>,
}

impl std::fmt::Debug for H1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1")
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

/// How often idle connections past their `keepalive_timeout` are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// An upstream HTTP/1.1 socket that follows the worker polling it. With the
/// per-core model each worker has a reactor of its own, and a socket's readiness
/// events reach the reactor it was registered with: an idle connection taken by
/// another worker would have every event of its next exchange cross threads (an
/// eventfd write and a wake-up of the other worker each time). The first poll on
/// another worker moves the registration there instead (two `epoll_ctl` calls,
/// once per move). With the shared model (one reactor) it never moves.
#[derive(Debug)]
pub struct UpIo {
    /// None only if moving it failed (the connection then fails).
    tcp: Option<TcpStream>,
    /// The worker whose reactor the socket is registered with (see
    /// [`crate::proxy::reactor`]).
    reactor: usize,
}

impl UpIo {
    fn new(tcp: TcpStream) -> UpIo {
        UpIo {
            tcp: Some(tcp),
            reactor: crate::proxy::reactor(),
        }
    }

    /// The socket, registered with the calling worker's reactor.
    fn here(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        let me = crate::proxy::reactor();
        if me != 0 && me != self.reactor {
            if let Some(tcp) = self.tcp.take() {
                // Deregisters from the old reactor, registers with this one.
                self.tcp = Some(TcpStream::from_std(tcp.into_std()?)?);
            }
            self.reactor = me;
        }
        match self.tcp.as_mut() {
            Some(t) => Ok(Pin::new(t)),
            None => Err(io::Error::other(
                "upstream socket lost moving between workers",
            )),
        }
    }
}

impl tokio::io::AsyncRead for UpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().here() {
            Ok(t) => t.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl tokio::io::AsyncWrite for UpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().here() {
            Ok(t) => t.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().here() {
            Ok(t) => t.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().here() {
            Ok(t) => t.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().here() {
            Ok(t) => t.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// Every backend's pooled connections, for one instance.
pub struct Upstreams {
    /// By backend id (ours, sequential: a plain multiply hashes them).
    backends: Mutex<FxHashMap<u64, Arc<BackendConns>>>,
    /// Where connection drivers run, and what ends them all at stop.
    drivers: TaskTracker,
    stop: CancellationToken,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct BackendConns {
    /// Newest last, each with when it is closed if still unused.
    idle: Mutex<Vec<(Box<H1>, std::time::Instant)>>,
    /// Out of the map (the backend was removed or drains, or the instance
    /// stops): a connection in use then is closed after its exchange rather than
    /// kept where nobody looks.
    retired: AtomicBool,
    /// One h2c connection per worker reactor (see [`crate::proxy::reactor`]).
    h2: Mutex<Vec<(usize, http2::SendRequest<UpBody>)>>,
}

impl Upstreams {
    pub fn new() -> Arc<Upstreams> {
        Arc::new(Upstreams {
            backends: Mutex::new(FxHashMap::default()),
            drivers: TaskTracker::new(),
            stop: CancellationToken::new(),
        })
    }

    fn conns(&self, b: &Backend) -> Arc<BackendConns> {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(b.id).or_default().clone()
    }

    /// A pooled connection to `b` that is ready for a request, if one is.
    pub async fn pooled(&self, b: &Backend, v: Version) -> Option<Sender> {
        let conns = self.conns(b);
        match v {
            Version::Http1 => {
                let me = crate::proxy::reactor();
                loop {
                    let next = {
                        let mut idle = conns.idle.lock().unwrap_or_else(|e| e.into_inner());
                        // The newest of this worker's, else the newest (its socket
                        // moves here: see [`UpIo`]).
                        match idle.iter().rposition(|(h, _)| h.conn.io().reactor == me) {
                            Some(i) => Some(idle.remove(i)),
                            None => idle.pop(),
                        }
                    };
                    let (mut h, _) = next?;
                    // One read attempt: a close that came while it idled.
                    if std::future::poll_fn(|cx| Poll::Ready(h.conn.poll_usable(cx))).await {
                        return Some(Sender::Http1(h));
                    }
                }
            }
            Version::Upgrade => None,
            Version::H2c => {
                let me = crate::proxy::reactor();
                let mut h2 = conns.h2.lock().unwrap_or_else(|e| e.into_inner());
                h2.retain(|(_, s)| !s.is_closed());
                h2.iter()
                    .find(|(r, _)| *r == me)
                    .map(|(_, s)| Sender::H2(s.clone()))
            }
        }
    }

    /// Opens a connection to `b` within `timeout`, from `source` when its pool sets one.
    pub async fn connect(
        &self,
        b: &Backend,
        source: Option<std::net::IpAddr>,
        v: Version,
        timeout: Duration,
    ) -> io::Result<Sender> {
        let tcp = connect_tcp(b.addr, source, timeout).await?;
        match v {
            Version::Http1 => Ok(Sender::Http1(Box::new(H1 {
                conn: h1::Conn::new(UpIo::new(tcp)),
                home: self.conns(b),
            }))),
            Version::Upgrade => {
                let stop = self.stop.clone();
                let (send, conn) = http1::Builder::new()
                    .handshake::<_, UpBody>(TokioIo::new(tcp))
                    .await
                    .map_err(io::Error::other)?;
                // Its own driver task: after a `101` it hands the connection
                // over to the tunnel (hyper's upgrade).
                self.drivers.spawn(async move {
                    tokio::select! {
                        r = conn.with_upgrades() => if let Err(e) = r {
                            debug!(error = %e, "upstream connection ended");
                        },
                        _ = stop.cancelled() => {}
                    }
                });
                Ok(Sender::Upgrade(send))
            }
            Version::H2c => {
                let stop = self.stop.clone();
                let name = b.name.clone();
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .handshake::<_, UpBody>(TokioIo::new(tcp))
                    .await
                    .map_err(io::Error::other)?;
                self.drivers.spawn(async move {
                    tokio::select! {
                        r = conn => if let Err(e) = r {
                            debug!(backend = %name, error = %e, "upstream h2 connection ended");
                        },
                        _ = stop.cancelled() => {}
                    }
                });
                let me = crate::proxy::reactor();
                let conns = self.conns(b);
                let mut h2 = conns.h2.lock().unwrap_or_else(|e| e.into_inner());
                h2.retain(|(r, _)| *r != me);
                h2.push((me, sender.clone()));
                Ok(Sender::H2(sender))
            }
        }
    }

    /// Takes back an HTTP/1.1 connection whose exchange ended cleanly, unless the
    /// backend no longer takes requests or `max_idle` are waiting already; it is
    /// closed if still unused after `keepalive` (see [`Upstreams::sweep`]).
    pub fn put_back(b: &Backend, mut s: Box<H1>, max_idle: usize, keepalive: Duration) {
        if !s.conn.reusable() || !b.is_admin_usable() || s.home.retired.load(Ordering::Acquire) {
            return;
        }
        s.conn.idle();
        let home = s.home.clone();
        let mut idle = home.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Looked at again under the lock: retiring takes it too, so a connection
        // is never left in a list that was already emptied.
        if idle.len() < max_idle && !home.retired.load(Ordering::Acquire) {
            idle.push((s, std::time::Instant::now() + keepalive));
        }
    }

    /// Closes the idle connections whose `keepalive_timeout` has passed. Taken
    /// newest first, the connections a quieter spell no longer needs sink to the
    /// bottom of each list and are closed here: a burst's extra connections do not
    /// stay open for good, and neither does one the backend closed while it idled
    /// (its socket waits in CLOSE_WAIT until then).
    pub fn sweep(&self) {
        let now = std::time::Instant::now();
        let all: Vec<Arc<BackendConns>> = self
            .backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for conns in all {
            // Closed after the lock is let go (a close deregisters the socket).
            // The whole list is looked at: a reload that shortened the
            // keepalive_timeout leaves earlier deadlines above later ones.
            let mut expired = Vec::new();
            {
                let mut idle = conns.idle.lock().unwrap_or_else(|e| e.into_inner());
                if idle.iter().any(|(_, until)| *until <= now) {
                    let (gone, kept) = std::mem::take(&mut *idle)
                        .into_iter()
                        .partition(|(_, until)| *until <= now);
                    *idle = kept;
                    expired = gone;
                }
            }
            drop(expired);
        }
    }

    /// Runs [`Upstreams::sweep`] every second until the instance stops.
    pub async fn sweep_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => self.sweep(),
            }
        }
    }

    /// Closes the idle connections of backends not in `live` (ids), and those of
    /// backends that take no new requests (draining, disabled): a drained backend's
    /// pooled connections close.
    pub fn retain(&self, live: &[Arc<Backend>]) {
        let mut gone = Vec::new();
        self.backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, c| {
                let keep = live.iter().any(|b| b.id == *id && b.is_admin_usable());
                if !keep {
                    gone.push(c.clone());
                }
                keep
            });
        gone.iter().for_each(|c| c.retire());
    }

    /// Closes `b`'s idle connections (it drains, or was disabled).
    pub fn forget(&self, b: &Backend) {
        let gone = self
            .backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&b.id);
        if let Some(c) = gone {
            c.retire();
        }
    }

    /// Closes every upstream connection (the instance stops).
    pub fn close(&self) {
        self.stop.cancel();
        let all = std::mem::take(&mut *self.backends.lock().unwrap_or_else(|e| e.into_inner()));
        all.values().for_each(|c| c.retire());
    }
}

impl BackendConns {
    /// Taken out of the map: its idle connections close (after the lock is let
    /// go: a close deregisters the socket), and those in use close after their
    /// exchange ([`Upstreams::put_back`]).
    fn retire(&self) {
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            self.retired.store(true, Ordering::Release);
            std::mem::take(&mut *idle)
        };
        drop(idle);
    }
}

/// A TCP connection to `addr` (from `source`, if set) with TCP_NODELAY, within
/// `timeout`.
async fn connect_tcp(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let s = match tokio::time::timeout(timeout, crate::proxy::connect_tcp(addr, source)).await {
        Ok(r) => r?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    };
    s.set_nodelay(true)?;
    Ok(s)
}
