//! Upstream HTTP connections, pooled per backend and reused.
//!
//! A backend object belongs to one pool, so keying by backend keeps pools from
//! ever sharing a connection. HTTP/1.1 connections wait idle in a LIFO list (at
//! most the pool's `max_idle_per_backend`) and go back to it only once their
//! response ended cleanly; one HTTP/2 connection per backend carries every h2c
//! request.
//!
//! **An HTTP/1.1 connection has no task of its own.** The request that uses it
//! polls its hyper `Connection` (the state machine that writes the request and
//! reads the response) together with the response future, then inside the
//! response body ([`super::body::RespBody`]), so one request is one task: no
//! hand-off to a driver task and back, twice per request. An idle pooled
//! connection is polled by nobody; the next request that takes it polls it once
//! first, which notices a close that came while it waited (a read already
//! signalled by the reactor, no extra syscall otherwise), and a close that comes
//! later is the "pooled connection dead" retry of [`super::forward`]. Idle
//! connections are handed out to the worker that last drove them first, so the
//! socket's readiness events and the task it wakes stay on one thread. Only a
//! `101 Switching Protocols` gets a task: the rest of the upgrade. An h2c
//! connection's driver task runs on the worker that opened it, until the
//! connection closes or the instance stops. Built on `hyper::client::conn`
//! rather than hyper-util's pooled client: a request must move to another backend
//! when a connect fails, and hyper-util's client consumes the request then.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::request_body::UpBody;
use crate::backend::Backend;

/// Which HTTP version a request goes upstream in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    H2c,
}

/// A connection ready for one request.
#[derive(Debug)]
pub enum Sender {
    Http1(H1),
    H2(http2::SendRequest<UpBody>),
}

/// hyper's HTTP/1.1 client connection state machine, with WebSocket upgrades
/// (hyper does not name that type: boxed once per connection).
type H1Conn = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// An HTTP/1.1 upstream connection: the handle requests go in by, and the
/// connection itself, polled by whoever uses it (there is no driver task).
pub struct H1 {
    pub send: http1::SendRequest<UpBody>,
    /// None once it has ended (polling it again would panic).
    conn: Option<H1Conn>,
    /// The worker that last polled it (see [`worker`]).
    worker: usize,
    /// What the connection, the response future and the response body are
    /// polled with (see [`Quiet`]); `quiet` is its state.
    waker: Waker,
    quiet: Arc<Quiet>,
}

impl std::fmt::Debug for H1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1").finish_non_exhaustive()
    }
}

impl H1 {
    fn new(send: http1::SendRequest<UpBody>, conn: H1Conn) -> H1 {
        let quiet = Arc::new(Quiet {
            state: AtomicU8::new(IDLE),
            task: Mutex::new(None),
        });
        H1 {
            send,
            conn: Some(conn),
            worker: worker(),
            waker: Waker::from(quiet.clone()),
            quiet,
        }
    }

    /// Runs `round` (which polls this connection and what it feeds: the
    /// response future, the response body) with the connection's own waker, and
    /// again while something woke it during the round. The connection and its
    /// channels to the response wake each other as they hand things over; all
    /// of them are polled here, in one task, so those wake-ups only ask for
    /// another round instead of a needless poll of the whole client connection.
    /// Wake-ups from elsewhere (the socket, a timer) reach the task.
    pub fn drive<R>(
        &mut self,
        cx: &mut Context<'_>,
        mut round: impl FnMut(&mut H1, &mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        self.quiet.register(cx.waker());
        // Taken out for the rounds, so that `round` can have the rest.
        let waker = std::mem::replace(&mut self.waker, Waker::noop().clone());
        let mut qcx = Context::from_waker(&waker);
        let mut r = Poll::Pending;
        for _ in 0..ROUNDS {
            self.quiet.state.store(POLLING, Ordering::SeqCst);
            r = round(self, &mut qcx);
            let woken = self.quiet.state.swap(IDLE, Ordering::SeqCst) == WOKEN;
            if r.is_ready() || !woken {
                self.waker = waker;
                return r;
            }
        }
        // Still being woken: let the task come back to it.
        self.waker = waker;
        cx.waker().wake_by_ref();
        r
    }

    /// Queues `req` on the connection. Queuing wakes the connection's side of
    /// the channel; that wake-up is kept for the round that polls it next
    /// (the caller's, at once) rather than sent to the task.
    pub fn send(
        &mut self,
        req: hyper::Request<UpBody>,
    ) -> impl Future<
        Output = Result<
            hyper::Response<hyper::body::Incoming>,
            hyper::client::conn::TrySendError<hyper::Request<UpBody>>,
        >,
    > {
        self.quiet.state.store(POLLING, Ordering::SeqCst);
        let f = self.send.try_send_request(req);
        self.quiet.state.store(IDLE, Ordering::SeqCst);
        f
    }

    /// Drives the connection (writes what is queued, reads what came). Ready
    /// once the connection has ended, with its error if any; it is dropped
    /// then, which fails whatever was still queued on it.
    pub fn poll_conn(&mut self, cx: &mut Context<'_>) -> Poll<hyper::Result<()>> {
        let Some(c) = self.conn.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let r = std::task::ready!(c.as_mut().poll(cx));
        self.conn = None;
        Poll::Ready(r)
    }

    /// Whether the connection can take a request now: polled once, so that a
    /// close that arrived while it idled is seen.
    fn poll_usable(&mut self, cx: &mut Context<'_>) -> bool {
        let r = self.drive(cx, |h, cx| {
            if h.poll_conn(cx).is_ready() || h.send.is_closed() {
                return Poll::Ready(false);
            }
            match h.send.poll_ready(cx) {
                Poll::Ready(r) => Poll::Ready(r.is_ok()),
                Poll::Pending => Poll::Pending,
            }
        });
        r == Poll::Ready(true)
    }

    /// The rest of the connection's life runs in a task of its own (after a
    /// `101`, the upgrade is handed over when the connection is polled on).
    pub fn detach(mut self, ups: &Upstreams) {
        let Some(conn) = self.conn.take() else { return };
        let stop = ups.stop.clone();
        ups.drivers.spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    debug!(error = %e, "upstream connection ended");
                },
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Rounds of [`H1::drive`] in one poll at most.
const ROUNDS: usize = 4;

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN: u8 = 2;

/// The waker an HTTP/1.1 exchange is polled with: a wake-up during a round of
/// [`H1::drive`] (IDLE -> POLLING on entry) only marks it WOKEN, for another
/// round; any other wakes the task that last drove it. The state changes are
/// single atomic steps, so a wake-up racing the end of a round is either seen
/// by the round (WOKEN) or passed on (IDLE): never lost.
struct Quiet {
    state: AtomicU8,
    task: Mutex<Option<Waker>>,
}

impl Quiet {
    fn register(&self, w: &Waker) {
        let mut task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        match &*task {
            Some(t) if t.will_wake(w) => {}
            _ => *task = Some(w.clone()),
        }
    }
}

impl Wake for Quiet {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Mid-round (or already marked): the round goes again.
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) | Err(WOKEN) => return,
            Err(_) => {}
        }
        if let Some(t) = &*self.task.lock().unwrap_or_else(|e| e.into_inner()) {
            t.wake_by_ref();
        }
    }
}

/// A small number naming the calling thread (a worker, with the per-core model).
fn worker() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static ME: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    ME.with(|w| *w)
}

/// Every backend's pooled connections, for one instance.
pub struct Upstreams {
    backends: Mutex<HashMap<u64, Arc<BackendConns>>>,
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
    idle: Mutex<Vec<H1>>,
    h2: Mutex<Option<http2::SendRequest<UpBody>>>,
}

impl Upstreams {
    pub fn new() -> Arc<Upstreams> {
        Arc::new(Upstreams {
            backends: Mutex::new(HashMap::new()),
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
                let me = worker();
                loop {
                    let next = {
                        let mut idle = conns.idle.lock().unwrap_or_else(|e| e.into_inner());
                        // The newest of this worker's, else the newest.
                        match idle.iter().rposition(|h| h.worker == me) {
                            Some(i) => Some(idle.remove(i)),
                            None => idle.pop(),
                        }
                    };
                    let mut h = next?;
                    h.worker = me;
                    // One poll: an idle connection is left as its last exchange
                    // left it, and takes the next request once polled.
                    if std::future::poll_fn(|cx| Poll::Ready(h.poll_usable(cx))).await {
                        return Some(Sender::Http1(h));
                    }
                }
            }
            Version::H2c => {
                let mut h2 = conns.h2.lock().unwrap_or_else(|e| e.into_inner());
                match h2.as_ref() {
                    Some(s) if !s.is_closed() => Some(Sender::H2(s.clone())),
                    _ => {
                        *h2 = None;
                        None
                    }
                }
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
        let io = TokioIo::new(tcp);
        match v {
            Version::Http1 => {
                let (send, conn) = http1::Builder::new()
                    .handshake::<_, UpBody>(io)
                    .await
                    .map_err(io::Error::other)?;
                Ok(Sender::Http1(H1::new(send, Box::pin(conn.with_upgrades()))))
            }
            Version::H2c => {
                let stop = self.stop.clone();
                let name = b.name.clone();
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .handshake::<_, UpBody>(io)
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
                let conns = self.conns(b);
                *conns.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender.clone());
                Ok(Sender::H2(sender))
            }
        }
    }

    /// Takes back an HTTP/1.1 connection whose exchange ended cleanly, unless the
    /// backend no longer takes requests or `max_idle` are waiting already.
    pub fn put_back(&self, b: &Backend, s: H1, max_idle: usize) {
        if s.conn.is_none() || s.send.is_closed() || !b.is_admin_usable() {
            return;
        }
        // Nobody waits on an idle connection: what its last exchange leaves
        // behind (the response body's channel closing) wakes no task.
        *s.quiet.task.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let conns = self.conns(b);
        let mut idle = conns.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < max_idle {
            idle.push(s);
        }
    }

    /// Closes the idle connections of backends not in `live` (ids), and those of
    /// backends that take no new requests (draining, disabled): a drained backend's
    /// pooled connections close.
    pub fn retain(&self, live: &[Arc<Backend>]) {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|id, _| live.iter().any(|b| b.id == *id && b.is_admin_usable()));
    }

    /// Closes `b`'s idle connections (it drains, or was disabled).
    pub fn forget(&self, b: &Backend) {
        self.backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&b.id);
    }

    /// Closes every upstream connection (the instance stops).
    pub fn close(&self) {
        self.stop.cancel();
        self.backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
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
