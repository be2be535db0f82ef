//! The backend -> client half of a UDP session: its task's wait for replies, the
//! receive loop replacing it, a cut, or its idle deadline, all in one future with no
//! allocation of its own. Each poll runs named steps over the pinned futures in
//! [`Wait`]; the first that ends the wait returns the [`Event`], which
//! `SessionTask::end` (session.rs) turns into the session's end.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::futures::Notified;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tracing::debug;

use super::batch::recv_drain;
use super::send::{for_each_run, send_run, unreachable};
use super::session::{remove, state, Event, SessionTask};
use super::DropReason;

impl SessionTask {
    /// Passes a batch of replies to the client from the listener's socket, counting
    /// what went and what did not.
    fn relay(&self, batch: &[(&[u8], SocketAddr)]) {
        let s = &self.session;
        for_each_run(batch, |run, _| {
            let (k, err) = send_run(&self.socket, run, Some(s.client), &self.shared.gso);
            let bytes: u64 = run[..k].iter().map(|d| d.len() as u64).sum();
            s.from_backend.fetch_add(bytes, Relaxed);
            s.backend().stats.bytes_from.fetch_add(bytes, Relaxed);
            self.counters.datagrams_from.fetch_add(k as u64, Relaxed);
            self.counters.bytes_from.fetch_add(bytes, Relaxed);
            if let Some(e) = err {
                debug!(client = %s.client, error = %e, "UDP reply to client failed");
                self.counters
                    .dropped(DropReason::ReplyFailed, (run.len() - k) as u64);
            }
        });
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
        remove(&mut t, s);
        true
    }

    /// Relays replies until the session's wait ends; returns what ended it.
    pub(super) async fn replies(&self, first_reply: &mut Option<Duration>) -> Event {
        let s = &self.session;
        let idle = tokio::time::sleep(self.settings.idle_timeout);
        let replaced = s.replaced.notified();
        let cut = s.backend().cut_token().cancelled_owned();
        // ICMP port unreachable shows up as a socket error (EPOLLERR), which does
        // not wake a reader: wait for it on its own.
        let error = s.upstream.ready(tokio::io::Interest::ERROR);
        tokio::pin!(idle, replaced, cut, error);
        let mut wait = Wait {
            task: self,
            replaced,
            cut,
            error,
            idle,
            error_seen: false,
            replies: 0,
            seen_requests: s.requests.load(Relaxed),
            first_reply,
        };
        std::future::poll_fn(|cx| wait.poll(cx)).await
    }
}

/// What a session's task waits on, pinned in its future, and the little state the
/// wait keeps; each poll runs the steps in order.
struct Wait<'t, 'p, E> {
    task: &'t SessionTask,
    replaced: Pin<&'p mut Notified<'t>>,
    /// The backend's cut token, re-armed each time it fires.
    cut: Pin<&'p mut WaitForCancellationFutureOwned>,
    /// The upstream socket's error readiness.
    error: Pin<&'p mut E>,
    idle: Pin<&'p mut Sleep>,
    /// The error future has completed (a future must not be polled once done).
    error_seen: bool,
    /// Replies received, for `responses`.
    replies: u64,
    /// Requests counted when the idle timer last looked (see [`Wait::idle`]).
    seen_requests: u64,
    first_reply: &'p mut Option<Duration>,
}

impl<E: Future<Output = io::Result<tokio::io::Ready>>> Wait<'_, '_, E> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let what = self
            .replaced(cx)
            .or_else(|| self.cut(cx))
            .or_else(|| {
                self.error(cx);
                self.receive(cx)
            })
            // ICMP unreachable ends the session at once (its socket and place are
            // given back); the client's next datagram goes elsewhere.
            .or_else(|| self.task.session.failed().then_some(Event::Failed))
            .or_else(|| self.idle(cx));
        what.map_or(Poll::Pending, Poll::Ready)
    }

    /// The receive loop replaced or stopped the session.
    fn replaced(&mut self, cx: &mut Context<'_>) -> Option<Event> {
        let s = &self.task.session;
        (self.replaced.as_mut().poll(cx).is_ready() || s.state.load(Relaxed) & state::REPLACED != 0)
            .then_some(Event::Replaced)
    }

    /// The backend's sessions were cut: this one ends if its listener is cut or its
    /// backend drained past the deadline (a wake-up for another listener's sessions
    /// is not for it).
    fn cut(&mut self, cx: &mut Context<'_>) -> Option<Event> {
        let s = &self.task.session;
        while self.cut.as_mut().poll(cx).is_ready() {
            self.cut.set(s.backend().cut_token().cancelled_owned());
            if self.task.shared.cut.is_cancelled() || s.backend().drain_epoch() != s.epoch {
                return Some(Event::Cut);
            }
        }
        None
    }

    /// A socket error on the upstream socket: ICMP unreachable fails the session.
    fn error(&mut self, cx: &mut Context<'_>) {
        let s = &self.task.session;
        if self.error_seen || s.failed() || self.error.as_mut().poll(cx).is_pending() {
            return;
        }
        self.error_seen = true;
        match s.upstream.take_error() {
            Ok(Some(e)) if unreachable(&e) => {
                s.fail(&self.task.settings.pool, &self.task.shared.ctx.control, &e)
            }
            // Another error (a client's oversized datagram meeting a smaller MTU,
            // say) is no verdict on the backend.
            Ok(Some(e)) => {
                debug!(backend = %s.backend().name, error = %e, "UDP upstream socket error")
            }
            _ => {}
        }
    }

    /// Receives and relays replies until the upstream socket has no more. A failed
    /// session only waits to be replaced or to expire.
    fn receive(&mut self, cx: &mut Context<'_>) -> Option<Event> {
        let s = &self.task.session;
        while !s.failed() {
            match s.upstream.poll_recv_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => {
                    debug!(backend = %s.backend().name, error = %e, "UDP upstream readiness failed");
                    break;
                }
                Poll::Ready(Ok(())) => {}
            }
            match self.relay_batch() {
                Ok(got) => {
                    if self.replied(got) {
                        return Some(Event::Answered);
                    }
                }
                // Readiness was stale and is cleared now: poll again to wait.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if unreachable(&e) => {
                    s.fail(&self.task.settings.pool, &self.task.shared.ctx.control, &e)
                }
                Err(e) => {
                    debug!(backend = %s.backend().name, error = %e, "UDP upstream receive failed");
                }
            }
        }
        None
    }

    /// Reads one batch of replies and relays it to the client (runs of same-size
    /// datagrams as one GSO send, like the other direction); returns how many.
    fn relay_batch(&self) -> io::Result<u64> {
        let (task, s) = (self.task, &self.task.session);
        let mut got = 0u64;
        let limit = task.settings.reply_limit;
        let replies = self.replies;
        let r = s.upstream.try_io(tokio::io::Interest::READABLE, || {
            recv_drain(&s.upstream, &s.rx, |batch, lost| {
                if lost > 0 {
                    task.counters.dropped(DropReason::SessionRecvBuffer, lost);
                }
                got = batch.len() as u64;
                // Each client datagram gets its replies, and no more: checked per
                // reply, not per batch (one batch can hold many).
                let pass = if limit == 0 {
                    batch.len()
                } else {
                    let allowed = limit
                        .saturating_mul(s.requests.load(Relaxed))
                        .saturating_sub(replies);
                    batch.len().min(allowed.min(usize::MAX as u64) as usize)
                };
                task.relay(&batch[..pass]);
                let over = (batch.len() - pass) as u64;
                if over > 0 {
                    task.counters.dropped(DropReason::ReplyLimit, over);
                }
            })
        });
        match r {
            // A short batch: relayed, and the socket drained (readiness cleared).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
            r => r.map(|_| got),
        }
    }

    /// `got` replies came: the session is alive and the backend answers. Whether
    /// every request is now answered (`responses`).
    fn replied(&mut self, got: u64) -> bool {
        let s = &self.task.session;
        s.activity.touch();
        if self.first_reply.is_none() {
            *self.first_reply = Some(s.start.elapsed());
            // An answer: the backend's failures are no longer "in a row" (passive
            // ejection).
            s.backend().passive_success();
        }
        // Every reply answers a request, for `responses`, also one that could not
        // be passed on.
        self.replies += got;
        self.task.answered(self.replies)
    }

    /// The idle deadline: checked against the last datagram either way, and moved
    /// on if something moved since.
    fn idle(&mut self, cx: &mut Context<'_>) -> Option<Event> {
        let (s, idle_timeout) = (&self.task.session, self.task.settings.idle_timeout);
        while self.idle.as_mut().poll(cx).is_ready() {
            let mut deadline = s.activity.last() + idle_timeout;
            if Instant::now() >= deadline {
                // Decide under the table lock, which new requests are counted
                // under: one the receive loop took since the last look (on another
                // thread, in the shared worker model) keeps the session.
                let mut t = self.task.table.lock().unwrap_or_else(|e| e.into_inner());
                let now_requests = s.requests.load(Relaxed);
                if now_requests == self.seen_requests {
                    remove(&mut t, s);
                    return Some(Event::Idle);
                }
                self.seen_requests = now_requests;
                deadline = Instant::now() + idle_timeout;
            }
            self.idle.as_mut().reset(deadline.into());
        }
        None
    }
}
