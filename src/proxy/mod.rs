//! One TCP session, start to end: pick a backend -> connect (with retries on other
//! backends) -> move bytes both ways -> account -> close.
//!
//! Bytes move in [`pump`]: on Linux, bulk transfers go through splice(2) and small
//! messages through a plain read/write with a per-thread buffer; elsewhere only the
//! copy path exists. Neither holds a user-space buffer while a connection is idle.

#[doc(hidden)]
pub mod bench_api;
#[cfg(target_os = "linux")]
mod pipe;
mod pump;
pub mod udp;

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use socket2::SockRef;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::access_log;
use crate::backend::{flag, ActiveGuard, Backend, ConnectError};
use crate::listener::{ListenerSettings, ListenerShared};
use crate::pool::Pool;
pub use pump::set_splice;
use pump::{Pump, PumpEnd};

/// Why a session ended; the names are the access log's termination reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    ClientClosed,
    BackendClosed,
    ClientReset,
    BackendReset,
    IdleTimeout,
    ConnectFailed,
    NoBackend,
    /// A drain deadline passed (backend drained, or listener/backend removed by reload).
    Drained,
    Shutdown,
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
            Termination::Drained => "drained",
            Termination::Shutdown => "shutdown",
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
    first_us: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds since the process-wide epoch: a timestamp in one word.
pub(crate) fn now_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

impl Activity {
    fn new() -> Activity {
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

    fn last(&self) -> Instant {
        epoch() + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Serves one accepted client until both directions end, then accounts for it
/// (session histogram, rejection counters, access log).
///
/// `cut` ends the session early: the process's hard stop, or the listener's drain
/// deadline after a reload removed it.
pub async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    listener: &Arc<ListenerShared>,
    settings: Arc<ListenerSettings>,
) -> Termination {
    // Times are microseconds on the process clock (8 bytes, not an `Instant`'s
    // 16): they live in every connection's task for its whole life.
    let start = now_us();
    // TCP_NODELAY: accepted sockets inherit it from the listening socket
    // (listener::bind sets it), which saves a syscall per connection.
    let connected = tokio::select! {
        biased;
        _ = listener.cut.cancelled() => Err(if listener.retired.load(Ordering::Relaxed) {
            Termination::Drained
        } else {
            Termination::Shutdown
        }),
        // Boxed: the connect phase is larger than the transfer phase, and a task is
        // sized for its largest phase.
        r = Box::pin(connect(&settings, peer)) => r,
    };
    let (mut backend, guard) = match connected {
        Ok(c) => c,
        Err(t) => {
            debug!(listener = %listener.name, client = %peer, reason = t.as_str(), "no backend connection");
            let rejected = match t {
                Termination::NoBackend => Some(&listener.rejected_no_backend),
                Termination::ConnectFailed => Some(&listener.rejected_connect_failed),
                _ => None,
            };
            if let Some(r) = rejected {
                r.fetch_add(1, Ordering::Relaxed);
            }
            finish(listener, &settings, peer, start, None, t);
            return t;
        }
    };
    // Accept to connected, failed attempts on other backends included, so the
    // first-byte time below starts where the connect ended. (One u32 of state.)
    let connect_time = now_us().saturating_sub(start).min(u32::MAX as u64) as u32;
    let _ = backend.set_nodelay(true);
    let stops = Stops {
        listener: listener.clone(),
        epoch: guard.backend().drain_epoch(),
        guard,
    };
    let guard = &stops.guard;
    let moved = splice_both(&mut client, &mut backend, &settings, &stops).await;
    let end = moved.end;
    // Passive outlier detection counts resets as failures, and only a session
    // that ended otherwise as a success (a backend that accepts and resets every
    // connection must still be ejected).
    if end == Termination::BackendReset {
        passive_failure(&settings.pool, guard.backend());
    } else {
        guard.backend().passive_success();
    }
    let first_byte = (moved.first_byte != 0).then(|| {
        Duration::from_micros(moved.first_byte.saturating_sub(start + connect_time as u64))
    });
    if let Some(fb) = first_byte {
        guard.backend().histograms.first_byte.record(fb);
    }
    finish(
        listener,
        &settings,
        peer,
        start,
        Some(Connected {
            backend: guard.backend(),
            connect: Duration::from_micros(connect_time as u64),
            first_byte,
            up: moved.up,
            down: moved.down,
        }),
        end,
    );
    end
}

/// What a session that reached a backend adds to its access-log line.
struct Connected<'a> {
    backend: &'a Arc<Backend>,
    connect: Duration,
    first_byte: Option<Duration>,
    up: u64,
    down: u64,
}

/// Records the end of a session: the duration histogram and the access-log line.
fn finish(
    listener: &ListenerShared,
    settings: &ListenerSettings,
    peer: SocketAddr,
    start: u64,
    c: Option<Connected<'_>>,
    end: Termination,
) {
    let duration = Duration::from_micros(now_us().saturating_sub(start));
    listener.session_duration.record(duration);
    if let Some(c) = &c {
        debug!(
            listener = %listener.name,
            client = %peer,
            backend = %c.backend.name,
            to_backend = c.up,
            from_backend = c.down,
            reason = end.as_str(),
            "session closed"
        );
    }
    if !access_log::enabled() {
        return;
    }
    access_log::log(entry(
        listener,
        settings,
        peer,
        c.as_ref(),
        duration,
        end.as_str(),
    ));
}

/// The access-log line of a client closed at once (`max_connections`).
pub fn log_rejected(listener: &ListenerShared, settings: &ListenerSettings, peer: SocketAddr) {
    if access_log::enabled() {
        access_log::log(entry(
            listener,
            settings,
            peer,
            None,
            Duration::ZERO,
            "rejected",
        ));
    }
}

/// A TCP access-log entry; `c` when a backend was connected.
fn entry(
    listener: &ListenerShared,
    settings: &ListenerSettings,
    peer: SocketAddr,
    c: Option<&Connected<'_>>,
    duration: Duration,
    reason: &'static str,
) -> access_log::Entry {
    access_log::Entry {
        time: SystemTime::now(),
        protocol: "tcp",
        listener: listener.name.clone(),
        client: peer,
        pool: settings.pool.name.clone(),
        backend: c.map(|c| c.backend.name.clone()),
        to_backend: c.map_or(0, |c| c.up),
        from_backend: c.map_or(0, |c| c.down),
        connect: c.map(|c| c.connect),
        first_byte: c.and_then(|c| c.first_byte),
        duration,
        reason,
    }
}

/// What can end a session from outside. A session waits on one wake-up source only,
/// its backend's token; when woken it checks whether its listener was cut (hard stop,
/// or a removed listener's deadline) or its backend's drain deadline passed since the
/// session started, and otherwise waits again.
struct Stops {
    /// Its `cut`: hard stop of the process or of the listener (checked, not awaited).
    listener: Arc<ListenerShared>,
    /// The session's place on its backend (and so the backend).
    guard: ActiveGuard,
    /// The backend's drain epoch when the session started.
    epoch: u64,
}

impl Stops {
    fn reason(&self) -> Option<Termination> {
        if self.listener.cut.is_cancelled() {
            Some(if self.listener.retired.load(Ordering::Relaxed) {
                Termination::Drained
            } else {
                Termination::Shutdown
            })
        } else if self.guard.backend().drain_epoch() != self.epoch {
            Some(Termination::Drained)
        } else {
            None
        }
    }
}

/// Connects to a backend, moving on to the next distinct one on failure, up to the
/// pool's `connect_attempts`.
async fn connect(
    settings: &ListenerSettings,
    peer: SocketAddr,
) -> Result<(TcpStream, ActiveGuard), Termination> {
    let pool = &settings.pool;
    let attempts = pool.connect_attempts();
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    for _ in 0..attempts {
        let Some(guard) = pool.pick(peer.ip(), &tried) else {
            break;
        };
        let b = guard.backend();
        let t0 = Instant::now();
        match connect_one(b.addr, settings.connect_timeout).await {
            Ok(stream) => {
                let took = t0.elapsed();
                b.stats.connections.fetch_add(1, Ordering::Relaxed);
                b.histograms.connect.record(took);
                return Ok((stream, guard));
            }
            Err(e) => {
                debug!(pool = %pool.name, backend = %b.name, error = %e, "connect failed");
                b.stats.connect_error(ConnectError::classify(&e));
            }
        }
        passive_failure(pool, b);
        tried.push(b.clone());
    }
    Err(if tried.is_empty() {
        Termination::NoBackend
    } else {
        Termination::ConnectFailed
    })
}

/// Counts a failure for passive outlier detection and ejects the backend when it
/// reaches the pool's `passive.consecutive_failures`.
pub(crate) fn passive_failure(pool: &Arc<Pool>, b: &Arc<Backend>) {
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
        tokio::spawn(async move {
            tokio::time::sleep(passive.eject_for).await;
            b.passive_success();
            if b.clear_flag(flag::EJECTED) {
                info!(pool = %pool.name, backend = %b.name, "backend back from passive ejection");
            }
        });
    }
}

/// One connect attempt within `timeout`. Running out of descriptors is our problem,
/// not the backend's: it pauses and tries the same backend again, within the same
/// timeout.
async fn connect_one(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let attempt = async {
        loop {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    crate::fd::available();
                    return Ok(s);
                }
                Err(e) if crate::fd::is_exhaustion(&e) => {
                    crate::fd::exhausted("backend connect", &e);
                    tokio::time::sleep(crate::fd::PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// How a session's transfer phase ended.
struct Moved {
    end: Termination,
    /// Bytes written to the backend and to the client.
    up: u64,
    down: u64,
    /// When the backend's first byte reached the client ([`now_us`]; 0: never).
    first_byte: u64,
}

/// Moves bytes both ways until both directions have ended, one side resets, the
/// session idles out or a hard stop comes. Bytes are added to the backend's
/// counters as they move (one atomic add per wake-up that moved any).
///
/// The whole session is one `poll_fn`: two [`Pump`]s, the idle timer and the stop
/// signal, a few hundred bytes in all (see the size test below).
async fn splice_both(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    // The settings by reference (one word; the idle timeout alone is two).
    settings: &ListenerSettings,
    stops: &Stops,
) -> Moved {
    let activity = Activity::new();
    let (mut up, mut down) = (Pump::default(), Pump::default());
    let mut first_close = None;
    // Which side to reset (SO_LINGER 0) once the halves are released.
    let mut reset_side: Option<Side> = None;
    let end = {
        let (mut cr, mut cw) = client.split();
        let (mut br, mut bw) = backend.split();
        let idle = tokio::time::sleep(settings.idle_timeout);
        let wake = stops.guard.backend().cut_token().cancelled_owned();
        tokio::pin!(idle, wake);
        // Alternate which direction goes first, so a bulk direction that uses up the
        // task's budget cannot starve the other one.
        let mut up_first = true;
        std::future::poll_fn(|cx| {
            while wake.as_mut().poll(cx).is_ready() {
                // Load the next token before re-checking, so a cut in between is seen.
                wake.set(stops.guard.backend().cut_token().cancelled_owned());
                if let Some(why) = stops.reason() {
                    return Poll::Ready(why);
                }
            }
            up_first = !up_first;
            for dir in [up_first, !up_first] {
                let (pump, src, dst) = if dir {
                    (&mut up, &mut cr, &mut bw)
                } else {
                    (&mut down, &mut br, &mut cw)
                };
                if pump.done {
                    continue;
                }
                // (who read, who was written) for this direction.
                let (from, to) = if dir {
                    (Side::Client, Side::Backend)
                } else {
                    (Side::Backend, Side::Client)
                };
                let before = pump.moved;
                let polled = pump.poll(cx, src, dst, &activity);
                if pump.moved != before {
                    let stats = &stops.guard.backend().stats;
                    let counter = if dir {
                        &stats.bytes_to
                    } else {
                        &stats.bytes_from
                    };
                    counter.fetch_add(pump.moved - before, Ordering::Relaxed);
                    if !dir && before == 0 {
                        activity.first_us.store(now_us().max(1), Ordering::Relaxed);
                    }
                }
                match polled {
                    Poll::Pending => {}
                    Poll::Ready(PumpEnd::Eof) => {
                        pump.done = true;
                        shutdown_write(dst.as_ref());
                        first_close.get_or_insert(from.closed());
                    }
                    Poll::Ready(PumpEnd::ReadError(e)) => {
                        debug!(error = %e, "read failed");
                        reset_side = Some(to);
                        return Poll::Ready(from.reset());
                    }
                    Poll::Ready(PumpEnd::WriteError(e)) => {
                        debug!(error = %e, "write failed");
                        reset_side = Some(from);
                        return Poll::Ready(to.reset());
                    }
                }
            }
            if up.done && down.done {
                return Poll::Ready(first_close.unwrap_or(Termination::ClientClosed));
            }
            while idle.as_mut().poll(cx).is_ready() {
                let deadline = activity.last() + settings.idle_timeout;
                if Instant::now() >= deadline {
                    return Poll::Ready(Termination::IdleTimeout);
                }
                idle.as_mut().reset(deadline.into());
            }
            Poll::Pending
        })
        .await
    };
    // One side failed: pass it on to the other as a reset (SO_LINGER 0, then the
    // close when the caller drops the socket), not as a FIN.
    if let Some(side) = reset_side {
        let s = match side {
            Side::Client => &*client,
            Side::Backend => &*backend,
        };
        let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
    }
    Moved {
        end,
        up: up.moved,
        down: down.moved,
        first_byte: activity.first_us.load(Ordering::Relaxed),
    }
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Backend,
}

impl Side {
    fn closed(self) -> Termination {
        match self {
            Side::Client => Termination::ClientClosed,
            Side::Backend => Termination::BackendClosed,
        }
    }

    fn reset(self) -> Termination {
        match self {
            Side::Client => Termination::ClientReset,
            Side::Backend => Termination::BackendReset,
        }
    }
}

fn shutdown_write(s: &TcpStream) {
    let _ = SockRef::from(s).shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    /// What an idle connection costs in user space is mostly this future (the task
    /// stores it inline); keep it small. Two sockets, two directions, a timer.
    #[test]
    fn session_future_is_small() {
        fn size<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(std_l.local_addr().unwrap()).unwrap();
        c.set_nonblocking(true).unwrap();
        let mut a = TcpStream::from_std(c).unwrap();
        let accepted = std_l.accept().unwrap().0;
        accepted.set_nonblocking(true).unwrap();
        let mut b = TcpStream::from_std(accepted).unwrap();
        let token = CancellationToken::new();
        let backend = crate::backend::Backend::new(
            &crate::config::BackendConfig {
                name: "127.0.0.1:1".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
                weight: 1,
            },
            "p",
        );
        let cfg = crate::config::Config::parse(
            "[[listeners]]\nname='l'\nbind='127.0.0.1:0'\npool='p'\n[[pools]]\nname='p'\nbackends=[{address='127.0.0.1:1'}]",
            std::path::Path::new("t"),
        )
        .unwrap();
        let pool = crate::pool::Pool::new(&cfg.pools[0]);
        let settings = Arc::new(ListenerSettings::new(&cfg.listeners[0], pool));
        let shared = ListenerShared::new(
            &cfg.listeners[0],
            settings.pool.clone(),
            token.clone(),
            token.clone(),
        );
        let stops = Stops {
            listener: shared.clone(),
            guard: backend.claim(),
            epoch: 0,
        };
        let f = splice_both(&mut a, &mut b, &settings, &stops);
        let n = size(&f);
        eprintln!("splice_both future: {n} bytes");
        assert!(n < 640, "splice_both future is {n} bytes");
        drop(f);
        let whole = serve(a, "127.0.0.1:2".parse().unwrap(), &shared, settings);
        let n = size(&whole);
        {
            let st = Arc::new(ListenerSettings::new(
                &cfg.listeners[0],
                crate::pool::Pool::new(&cfg.pools[0]),
            ));
            let c = connect(&st, "127.0.0.1:2".parse().unwrap());
            eprintln!("connect future: {} bytes", size(&c));
        }
        eprintln!("serve future: {n} bytes");
        assert!(n < 1000, "serve future is {n} bytes");
    }
}
