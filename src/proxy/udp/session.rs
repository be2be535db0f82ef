//! One client's UDP session: its state, its task, and its end.
//!
//! The task relays replies until something ends its wait (replies.rs): the receive
//! loop replacing the session (re-pick or stop), the backend's sessions being cut
//! (hard stop, drain deadline), every request answered (`responses`), or the idle
//! deadline. That is an [`Event`]; [`SessionTask::end`] is the one place that turns
//! it into the session's [`Termination`] (the access log's reason) and accounts for the
//! session.
//!
//! An ICMP error from the backend does not end a session by itself: [`Session::fail`]
//! marks it failed (counted once toward passive ejection), and the client's next
//! datagram re-picks ([`Session::must_repick`]), or the session expires.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_utils::CachePadded;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tracing::debug;

use super::batch::RecvState;
use super::limits::Slot;
use super::{UdpCounters, UdpListenerShared, UdpSettings};
use crate::access_log;
use crate::backend::{flag, ActiveGuard, Backend};
use crate::pool::Pool;
use crate::proxy::{Activity, Termination};
use crate::tasks::Tasks;

/// What ended a session's wait for replies; [`SessionTask::end`] says which [`Termination`]
/// that is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
    /// The receive loop replaced the session (its backend must be re-picked) or
    /// stopped (listener removed, shutdown).
    Replaced,
    /// The backend's sessions were cut and this one is concerned: the process's
    /// hard stop, or the backend's drain deadline.
    Cut,
    /// Every request has its `responses` replies.
    Answered,
    /// Nothing moved either way for `idle_timeout`.
    Idle,
    /// The backend answered with an ICMP error: the session ends at once, and the
    /// client's next datagram starts one on another backend.
    Failed,
}

/// Per worker: clients whose session just ended on an unreachable backend, and that
/// backend, so their next datagram avoids it. Bounded: cleared when full.
pub(super) type Failed = Mutex<HashMap<SocketAddr, Arc<Backend>>>;

/// Most clients remembered in [`Failed`].
const FAILED_MAX: usize = 4096;

/// Session state bits.
pub(super) mod state {
    /// The backend failed (ICMP unreachable): the next datagram re-picks.
    pub const FAILED: u8 = 1;
    /// The receive loop replaced the session (backend down): its task ends.
    pub const REPLACED: u8 = 2;
}

/// A worker's sessions by client address.
pub(super) type Table = Mutex<HashMap<SocketAddr, Arc<Session>>>;

/// Takes `s` out of a worker's table, unless a newer session has its place.
pub(super) fn remove(t: &mut HashMap<SocketAddr, Arc<Session>>, s: &Arc<Session>) {
    if t.get(&s.client).is_some_and(|cur| Arc::ptr_eq(cur, s)) {
        t.remove(&s.client);
    }
}

/// One client's session.
pub(super) struct Session {
    pub(super) client: SocketAddr,
    pub(super) upstream: UdpSocket,
    guard: ActiveGuard,
    /// The backend's drain epoch when the session started.
    pub(super) epoch: u64,
    pub(super) start: Instant,
    pub(super) activity: Activity,
    pub(super) state: AtomicU8,
    /// Wakes the session's task when the receive loop replaces it.
    pub(super) replaced: Notify,
    pub(super) to_backend: AtomicU64,
    pub(super) from_backend: AtomicU64,
    /// Client datagrams taken for this session, counted under the table lock, so
    /// the session never ends with a request still unanswered (`responses`).
    pub(super) requests: AtomicU64,
    /// Its place under `max_sessions` and `max_sessions_per_source`.
    slot: Mutex<Option<Slot>>,
    /// Sessions on the listener and on the backend when it started, itself
    /// included (for the access log).
    pub(super) conns: (u32, u32),
    /// What reading `upstream` keeps: its family, what the kernel dropped on it
    /// (`session_recv_buffer` full).
    pub(super) rx: RecvState,
}

impl Session {
    /// A session of `client` on `upstream`, with `requests` datagrams taken for it.
    pub(super) fn new(
        client: SocketAddr,
        upstream: UdpSocket,
        guard: ActiveGuard,
        requests: u64,
        slot: Slot,
        conns: (u32, u32),
    ) -> Session {
        let rx = RecvState::new(guard.backend().addr);
        Session {
            rx,
            conns,
            client,
            upstream,
            epoch: guard.backend().drain_epoch(),
            guard,
            start: Instant::now(),
            activity: Activity::new(),
            state: AtomicU8::new(0),
            replaced: Notify::new(),
            to_backend: AtomicU64::new(0),
            from_backend: AtomicU64::new(0),
            requests: AtomicU64::new(requests),
            slot: Mutex::new(Some(slot)),
        }
    }

    pub(super) fn backend(&self) -> &Arc<Backend> {
        self.guard.backend()
    }

    pub(super) fn failed(&self) -> bool {
        self.state.load(Relaxed) & state::FAILED != 0
    }

    /// The backend cannot be reached (`e`, an ICMP error): the client's next
    /// datagram goes elsewhere, and the backend's failure counts toward passive
    /// ejection, once per session.
    pub(super) fn fail(&self, pool: &Arc<Pool>, control: &Tasks, e: &io::Error) {
        debug!(backend = %self.backend().name, error = %e, "UDP backend unreachable");
        if self.state.fetch_or(state::FAILED, Relaxed) & state::FAILED == 0 {
            crate::proxy::passive_failure(pool, self.backend(), control);
        }
    }

    /// Whether the client's next datagram should go to a new backend instead. A
    /// backend that is down is left only if the pool has a usable one (with
    /// `fail-open` and everything down, sessions stay where they are).
    pub(super) fn must_repick(&self, pool: &Pool) -> Option<Termination> {
        let b = self.backend();
        if self.failed() {
            Some(Termination::BackendUnreachable)
        } else if b.drain_epoch() != self.epoch || b.pool != pool.name {
            // Drained past its deadline, or a reload pointed the listener at
            // another pool.
            Some(Termination::Drained)
        } else if b.flags() & (flag::UNHEALTHY | flag::EJECTED) != 0 && pool.has_usable() {
            Some(Termination::BackendDown)
        } else {
            None
        }
    }

    /// Tells the session's task to end (the receive loop replaced it or stopped).
    pub(super) fn stop(&self) {
        self.state.fetch_or(state::REPLACED, Relaxed);
        self.replaced.notify_one();
    }

    /// Gives back the session's place under the listener's limits (when it ends or
    /// is replaced, whichever comes first).
    pub(super) fn release(&self) {
        drop(self.slot.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

/// A session's reply path and lifetime.
pub(super) struct SessionTask {
    pub(super) session: Arc<Session>,
    /// The listener's socket: replies go to the client from it.
    pub(super) socket: Arc<UdpSocket>,
    pub(super) table: Arc<Table>,
    /// The worker's [`Failed`] clients.
    pub(super) failed: Arc<Failed>,
    pub(super) counters: Arc<CachePadded<UdpCounters>>,
    pub(super) settings: Arc<UdpSettings>,
    pub(super) shared: Arc<UdpListenerShared>,
}

impl SessionTask {
    pub(super) async fn run(self) {
        let mut first_reply = None;
        let what = self.replies(&mut first_reply).await;
        self.end(what, first_reply);
    }

    /// Where a session's end is decided: turns what ended its wait into the
    /// session's [`Termination`], then accounts for the session, once (table, backend and
    /// listener counters, access log, its place under the limits).
    pub(super) fn end(&self, what: Event, first_reply: Option<Duration>) -> Termination {
        let s = &self.session;
        let shared = &self.shared;
        let end = match what {
            Event::Replaced if shared.cut.is_cancelled() || shared.stop.is_cancelled() => {
                Termination::Shutdown
            }
            Event::Replaced => s
                .must_repick(&self.settings.pool)
                .unwrap_or(Termination::BackendDown),
            Event::Cut if shared.cut.is_cancelled() => Termination::Shutdown,
            Event::Cut => Termination::Drained,
            Event::Answered => Termination::Responses,
            Event::Idle | Event::Failed if s.failed() => Termination::BackendUnreachable,
            Event::Idle | Event::Failed => Termination::IdleTimeout,
        };
        if end == Termination::BackendUnreachable {
            let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
            if f.len() >= FAILED_MAX {
                f.clear();
            }
            f.insert(s.client, s.backend().clone());
        }
        remove(&mut self.table.lock().unwrap_or_else(|e| e.into_inner()), s);
        let b = s.backend();
        b.stats.udp_active.fetch_sub(1, Relaxed);
        let duration = s.start.elapsed();
        shared.session_duration.record(duration);
        if let Some(fb) = first_reply {
            b.histograms.first_byte.record(fb);
        }
        debug!(listener = %shared.name, client = %s.client, backend = %b.name, reason = end.as_str(), "UDP session ended");
        if shared.ctx.access_log.enabled() {
            shared.ctx.access_log.log(access_log::Entry {
                time: SystemTime::now(),
                protocol: "udp",
                listener: shared.name.clone(),
                client: s.client,
                pool: b.pool.clone(),
                backend: Some(b.name.clone()),
                backend_addr: Some(b.addr),
                retries: 0,
                listener_conns: s.conns.0,
                backend_conns: s.conns.1,
                to_backend: s.to_backend.load(Relaxed),
                from_backend: s.from_backend.load(Relaxed),
                connect: None,
                first_byte: first_reply,
                duration,
                reason: end.as_str(),
                sni: None,
                http: None,
            });
        }
        // Last: a stopping process waits for this count to reach 0 before it
        // flushes the access log.
        s.release();
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::udp::bind;
    use tokio_util::sync::CancellationToken;

    /// An idle UDP session costs mostly its reply task's future (the task stores it
    /// inline); keep it small. 688 bytes before udp.rs was split, 608 after.
    #[tokio::test]
    async fn session_future_is_small() {
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
            crate::proxy::Context::for_tests(),
            token.clone(),
            token,
        );
        let backend = pool.backends()[0].clone();
        let slot = Slot::take(&shared, &settings, "127.0.0.1".parse().unwrap()).unwrap();
        let upstream =
            super::super::recv::connect_upstream(backend.addr, None, false, 1 << 20, 0).unwrap();
        let session = Arc::new(Session::new(
            "127.0.0.1:2".parse().unwrap(),
            upstream,
            backend.claim(),
            1,
            slot,
            (1, 1),
        ));
        let task = SessionTask {
            session,
            socket: Arc::new(
                UdpSocket::from_std(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap(),
            ),
            table: Arc::new(Mutex::new(HashMap::new())),
            failed: Arc::new(Mutex::new(HashMap::new())),
            counters: shared.new_counters(),
            settings,
            shared,
        };
        let f = task.run();
        let n = std::mem::size_of_val(&f);
        eprintln!("UDP session future: {n} bytes");
        assert!(n < 640, "UDP session future is {n} bytes");
    }
}
