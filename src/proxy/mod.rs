//! One TCP session, start to end: pick a backend -> connect (with retries on other
//! backends) -> move bytes both ways -> account -> close.
//!
//! Bytes move in [`pump`]: on Linux, bulk transfers go through splice(2) and small
//! messages through a plain read/write with a per-thread buffer; elsewhere only the
//! copy path exists. Neither holds a user-space buffer while a connection is idle.

#[cfg(target_os = "linux")]
mod pipe;
mod pump;

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backend::{flag, ActiveGuard, Backend};
use crate::listener::ListenerSettings;
use crate::pool::Pool;
use pump::{pump, PumpEnd};

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

/// Time of the last byte moved, shared by both directions of a session.
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Serves one accepted client until both directions end.
///
/// `cut` ends the session early: the process's hard stop, or the listener's drain
/// deadline after a reload removed it.
pub async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    listener: &str,
    settings: Arc<ListenerSettings>,
    cut: CancellationToken,
) -> Termination {
    let _ = client.set_nodelay(true);
    let connected = tokio::select! {
        biased;
        _ = cut.cancelled() => return Termination::Shutdown,
        r = connect(&settings, peer) => r,
    };
    let (backend, guard) = match connected {
        Ok(c) => c,
        Err(t) => {
            debug!(listener, client = %peer, reason = t.as_str(), "no backend connection");
            return t;
        }
    };
    let _ = backend.set_nodelay(true);
    let stops = Stops {
        listener: cut,
        backend: guard.backend().cut_token(),
    };
    let (end, up, down) = splice_both(&client, &backend, settings.idle_timeout, &stops).await;
    // Passive outlier detection counts resets as failures, and only a session
    // that ended otherwise as a success (a backend that accepts and resets every
    // connection must still be ejected).
    if end == Termination::BackendReset {
        passive_failure(&settings.pool, guard.backend());
    } else {
        guard.backend().passive_success();
    }
    debug!(
        listener,
        client = %peer,
        backend = %guard.backend().name,
        to_backend = up,
        from_backend = down,
        reason = end.as_str(),
        "session closed"
    );
    end
}

/// What can end a session from outside.
struct Stops {
    /// Hard stop of the process or of the listener.
    listener: CancellationToken,
    /// The backend's drain deadline.
    backend: CancellationToken,
}

/// Connects to a backend, moving on to the next distinct one on failure, up to the
/// pool's `connect_attempts`.
async fn connect(
    settings: &ListenerSettings,
    peer: SocketAddr,
) -> Result<(TcpStream, ActiveGuard), Termination> {
    let pool = &settings.pool;
    let attempts = pool.config().connect_attempts;
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    for _ in 0..attempts {
        let Some(guard) = pool.pick(peer.ip(), &tried) else {
            break;
        };
        let b = guard.backend();
        match connect_one(b.addr, settings.connect_timeout).await {
            Ok(stream) => return Ok((stream, guard)),
            Err(e) => debug!(pool = %pool.name, backend = %b.name, error = %e, "connect failed"),
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
fn passive_failure(pool: &Arc<Pool>, b: &Arc<Backend>) {
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

/// Moves bytes both ways until both directions have ended, one side resets, the
/// session idles out or a hard stop comes. Returns why, and bytes (up, down).
async fn splice_both(
    client: &TcpStream,
    backend: &TcpStream,
    idle_timeout: Duration,
    stops: &Stops,
) -> (Termination, u64, u64) {
    let activity = Activity::new();
    let (up_bytes, down_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let up = pump(client, backend, &activity, &up_bytes);
    let down = pump(backend, client, &activity, &down_bytes);
    tokio::pin!(up, down);
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let (mut up_done, mut down_done) = (false, false);
    let mut first_close = None;

    let end = loop {
        tokio::select! {
            biased;
            _ = stops.listener.cancelled() => break Termination::Shutdown,
            _ = stops.backend.cancelled() => break Termination::Drained,
            e = &mut up, if !up_done => match e {
                PumpEnd::Eof => {
                    shutdown_write(backend);
                    up_done = true;
                    first_close.get_or_insert(Termination::ClientClosed);
                }
                PumpEnd::ReadError(e) => break reset(backend, Termination::ClientReset, e),
                PumpEnd::WriteError(e) => break reset(client, Termination::BackendReset, e),
            },
            e = &mut down, if !down_done => match e {
                PumpEnd::Eof => {
                    shutdown_write(client);
                    down_done = true;
                    first_close.get_or_insert(Termination::BackendClosed);
                }
                PumpEnd::ReadError(e) => break reset(client, Termination::BackendReset, e),
                PumpEnd::WriteError(e) => break reset(backend, Termination::ClientReset, e),
            },
            _ = &mut idle => {
                let deadline = activity.last() + idle_timeout;
                if Instant::now() >= deadline {
                    break Termination::IdleTimeout;
                }
                idle.as_mut().reset(deadline.into());
            }
        }
        if up_done && down_done {
            break first_close.unwrap_or(Termination::ClientClosed);
        }
    };
    (
        end,
        up_bytes.load(Ordering::Relaxed),
        down_bytes.load(Ordering::Relaxed),
    )
}

fn shutdown_write(s: &TcpStream) {
    let _ = SockRef::from(s).shutdown(Shutdown::Write);
}

/// One side failed: pass it on to the other side as a reset (SO_LINGER 0, then the
/// close when the session drops the socket), not as a FIN.
fn reset(other: &TcpStream, why: Termination, e: io::Error) -> Termination {
    debug!(error = %e, reason = why.as_str(), "passing on reset");
    let _ = SockRef::from(other).set_linger(Some(Duration::ZERO));
    why
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let a = TcpStream::from_std(c).unwrap();
        let accepted = std_l.accept().unwrap().0;
        accepted.set_nonblocking(true).unwrap();
        let b = TcpStream::from_std(accepted).unwrap();
        let token = CancellationToken::new();
        let stops = Stops {
            listener: token.clone(),
            backend: token.clone(),
        };
        let f = splice_both(&a, &b, Duration::from_secs(1), &stops);
        let n = size(&f);
        eprintln!("splice_both future: {n} bytes");
        assert!(n < 1024, "splice_both future is {n} bytes");
        drop(f);
        let cfg = crate::config::Config::parse(
            "[[listeners]]\nname='l'\nbind='127.0.0.1:0'\npool='p'\n[[pools]]\nname='p'\nbackends=[{address='127.0.0.1:1'}]",
            std::path::Path::new("t"),
        )
        .unwrap();
        let pool = crate::pool::Pool::new(&cfg.pools[0]);
        let settings = Arc::new(ListenerSettings::new(&cfg.listeners[0], pool));
        let whole = serve(
            a,
            "127.0.0.1:2".parse().unwrap(),
            "l",
            settings,
            token.clone(),
        );
        let n = size(&whole);
        eprintln!("serve future: {n} bytes");
        assert!(n < 1536, "serve future is {n} bytes");
    }
}
