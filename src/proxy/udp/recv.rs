//! The client -> backend half of a UDP listener: each worker's receive loop takes a
//! batch of datagrams at a time (`recvmmsg` on Linux), finds or starts each client's
//! session (limits, the pool's pick, a connected upstream socket) and forwards the
//! client's datagrams on it as runs (see `send`).
//!
//! It reads its socket through `batch::recv_drain`, as the sessions' reply path
//! reads theirs, so what the kernel drops on it for a full receive buffer is counted
//! too (`listener_recv_buffer`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use crossbeam_utils::CachePadded;
use tokio::net::UdpSocket;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::batch::{recv_drain, report_drops, RecvState};
use super::limits::Slot;
use super::send::{for_each_run, send_run};
use super::session::{remove, Failed, Session, SessionTask, Table};
use super::{DropReason, UdpCounters, UdpListenerShared};
use crate::backend::Backend;
use crate::proxy::Termination;

/// Receive batches taken per wake-up before the loop yields to other tasks.
const BATCHES_PER_TURN: usize = 8;

/// Receives until the listener's `stop` fires; spawns each session's task on
/// `sessions`, so a stopping process can wait for them to account for themselves.
pub async fn recv_loop(
    socket: std::net::UdpSocket,
    shared: Arc<UdpListenerShared>,
    sessions: TaskTracker,
) {
    let socket = match UdpSocket::from_std(socket) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            warn!(listener = %shared.name, error = %e, "cannot register UDP socket");
            return;
        }
    };
    let local = socket.local_addr().ok();
    let rx = RecvState::new(local.unwrap_or(shared.settings().bind));
    let w = Worker {
        local,
        counters: shared.new_counters(),
        shared,
        socket,
        table: Arc::new(Mutex::new(HashMap::new())),
        failed: Arc::new(Mutex::new(HashMap::new())),
        sessions,
        rx,
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
                recv_drain(&w.socket, &w.rx, |batch, lost| {
                    if lost > 0 {
                        w.counters.dropped(DropReason::ListenerRecvBuffer, lost);
                    }
                    for_each_run(batch, |run, client| w.forward(run, client))
                })
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
    // After a binary upgrade the new process reads the socket: this one's sessions
    // still relay replies until they are idle (shutdown's grace period bounds that).
    if w.shared
        .ctx
        .handed_over
        .load(std::sync::atomic::Ordering::Acquire)
    {
        debug!(listener = %w.shared.name, "UDP receive loop handed over");
        return;
    }
    // Termination this worker's sessions now: the listener is gone or the process stops.
    let sessions: Vec<_> = w
        .table
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    for s in sessions {
        s.stop();
    }
    debug!(listener = %w.shared.name, "UDP receive loop stopped");
}

/// One worker's receive loop and session table for a UDP listener.
struct Worker {
    /// The listener's own address: a datagram from it would start a loop.
    local: Option<SocketAddr>,
    shared: Arc<UdpListenerShared>,
    socket: Arc<UdpSocket>,
    table: Arc<Table>,
    /// Clients whose last session ended on an unreachable backend.
    failed: Arc<Failed>,
    counters: Arc<CachePadded<UdpCounters>>,
    /// Where session tasks are spawned: shutdown waits on it.
    sessions: TaskTracker,
    /// What reading `socket` keeps: its family, what the kernel dropped on it.
    rx: RecvState,
}

impl Worker {
    /// Sends a run of datagrams from one client (consecutive in a receive batch) on
    /// its session, in one send (UDP GSO on Linux), starting or replacing the session
    /// as needed; counts them as forwarded or dropped.
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
            None => match self.start_session(client, self.avoid(client).as_ref(), n) {
                Ok(s) => s,
                Err(r) => return self.counters.dropped(r, n),
            },
        };
        let (k, err) = send_run(&session.upstream, run, None, &self.shared.gso);
        self.sent(&session, &run[..k]);
        let Some(e) = err else { return };
        let rest = &run[k..];
        let left = rest.len() as u64;
        // Not sent, so never to be answered: `responses` must not wait for them.
        self.unrequest(&session, left);
        if e.kind() == io::ErrorKind::ConnectionRefused && avoid.is_none() {
            // The backend's ICMP port unreachable, reported on this send: re-pick
            // once, now, rather than lose the datagrams.
            session.fail(&self.shared.settings().pool, &self.shared.ctx.control, &e);
            self.replace(&session, Termination::BackendUnreachable);
            match self.start_session(client, Some(session.backend()), left) {
                Ok(s) => {
                    let (k, err) = send_run(&s.upstream, rest, None, &self.shared.gso);
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

    /// Whether `client` is flowgate itself: this listener's address (as seen on
    /// loopback when it listens on every address) or one of its pool's backends.
    /// Checked when a session would start, not per datagram.
    fn is_loop(&self, client: SocketAddr, pool: &crate::pool::Pool) -> bool {
        let own = self.local.is_some_and(|l| {
            l.port() == client.port()
                && (l.ip() == client.ip() || (l.ip().is_unspecified() && client.ip().is_loopback()))
        });
        own || pool.snapshot().backends.iter().any(|b| b.addr == client)
    }

    /// The backend `client`'s last session failed on, if it just did (taken: only
    /// the next session avoids it).
    fn avoid(&self, client: SocketAddr) -> Option<Arc<Backend>> {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_empty() {
            return None;
        }
        f.remove(&client)
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

    /// Takes `s` out of the table and tells its task to end; `why` is what
    /// [`Session::must_repick`] said.
    fn replace(&self, s: &Arc<Session>, why: Termination) {
        remove(&mut self.table.lock().unwrap_or_else(|e| e.into_inner()), s);
        debug!(listener = %self.shared.name, client = %s.client, backend = %s.backend().name, reason = why.as_str(), "UDP session re-picks");
        s.release();
        s.stop();
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
        if self.is_loop(client, &settings.pool) {
            return Err(DropReason::Loop);
        }
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
        // `source = "client"`: from the client's address (any port); a client of
        // another family than the backend's fails the bind, as SocketFailed.
        let transparent = settings.pool.transparent();
        let source = match transparent {
            true => Some(client.ip().to_canonical()),
            false => settings.pool.source(),
        };
        let upstream = match connect_upstream(
            b.addr,
            source,
            transparent,
            settings.session_recv_buffer,
            shared.ctx.busy_poll_us,
        ) {
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
        shared.sessions.fetch_add(1, Relaxed);
        b.stats.udp_sessions.fetch_add(1, Relaxed);
        let on_backend = b.stats.udp_active.fetch_add(1, Relaxed) + 1;
        let conns = (
            shared.active.load(Relaxed).min(u32::MAX as usize) as u32,
            on_backend.min(u64::from(u32::MAX)) as u32,
        );
        let session = Arc::new(Session::new(client, upstream, guard, requests, slot, conns));
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client, session.clone());
        let task = SessionTask {
            session: session.clone(),
            socket: self.socket.clone(),
            table: self.table.clone(),
            failed: self.failed.clone(),
            counters: self.counters.clone(),
            settings,
            shared: shared.clone(),
        };
        self.sessions.spawn(task.run());
        Ok(session)
    }
}

/// A new socket connected to `addr`, so only that backend's datagrams are read and
/// its ICMP errors are reported.
pub(super) fn connect_upstream(
    addr: SocketAddr,
    // The pool's `source`, if set: the address the session's datagrams come from.
    source: Option<std::net::IpAddr>,
    // `source = "client"`: `source` is the client's, bound through IP_TRANSPARENT.
    transparent: bool,
    recv_buffer: usize,
    busy_poll_us: u32,
) -> io::Result<UdpSocket> {
    let local: SocketAddr = match source {
        Some(ip) => SocketAddr::new(ip, 0),
        None if addr.is_ipv6() => "[::]:0".parse().expect("literal"),
        None => "0.0.0.0:0".parse().expect("literal"),
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    report_drops(&s);
    crate::proxy::busy::set_socket((&s).into(), busy_poll_us);
    // A burst of large replies must not overflow the default (~208 KiB) buffer
    // before the session's task relays it. Past net.core.rmem_max only with
    // CAP_NET_ADMIN (SO_RCVBUFFORCE); otherwise the kernel caps it. Best effort.
    #[cfg(target_os = "linux")]
    let forced =
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &recv_buffer)
            .is_ok();
    #[cfg(not(target_os = "linux"))]
    let forced = false;
    if !forced {
        let _ = s.set_recv_buffer_size(recv_buffer);
    }
    s.set_nonblocking(true)?;
    if transparent {
        crate::proxy::set_transparent(&s, addr.is_ipv4())?;
    }
    s.bind(&local.into())?;
    s.connect(&addr.into())?;
    UdpSocket::from_std(s.into())
}
