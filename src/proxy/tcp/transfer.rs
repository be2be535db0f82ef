//! The transfer phase of a TCP session: both directions pumped in one future until
//! both end, one side resets, the session idles out or something stops it.

use std::future::Future;
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::net::TcpStream;
use tracing::debug;

use super::pump::{Pump, PumpEnd};
use super::shared::{ListenerSettings, ListenerShared};
use crate::backend::ActiveGuard;
use crate::proxy::{now_us, Activity, Termination};

/// What can end a session from outside. A session waits on one wake-up source only,
/// its backend's token; when woken it checks whether its listener was cut (hard stop,
/// or a removed listener's deadline) or its backend's drain deadline passed since the
/// session started, and otherwise waits again.
pub(super) struct Stops {
    /// Its `cut`: hard stop of the process or of the listener (checked, not awaited).
    pub(super) listener: Arc<ListenerShared>,
    /// The session's place on its backend (and so the backend).
    pub(super) guard: ActiveGuard,
    /// The backend's drain epoch when the session started.
    pub(super) epoch: u64,
}

impl Stops {
    pub(super) fn reason(&self) -> Option<Termination> {
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

/// How a session's transfer phase ended.
pub(super) struct Moved {
    pub(super) end: Termination,
    /// Bytes written to the backend and to the client.
    pub(super) up: u64,
    pub(super) down: u64,
    /// When the backend's first byte reached the client ([`now_us`]; 0: never).
    pub(super) first_byte: u64,
}

/// Moves bytes both ways until both directions have ended, one side resets, the
/// session idles out or a hard stop comes. Bytes are added to the backend's
/// counters as they move (one atomic add per wake-up that moved any).
///
/// The whole session is one `poll_fn`: two [`Pump`]s, the idle timer and the stop
/// signal, a few hundred bytes in all (see the size test below).
pub(super) async fn splice_both(
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
            crate::proxy::busy::note_work();
            while wake.as_mut().poll(cx).is_ready() {
                // Load the next token before re-checking, so a cut in between is seen.
                wake.set(stops.guard.backend().cut_token().cancelled_owned());
                if let Some(why) = stops.reason() {
                    return Poll::Ready(why);
                }
            }
            up_first = !up_first;
            for dir in [up_first, !up_first] {
                // Whether the other direction already ended (read EOF, passed on).
                let other_done = if dir { down.done } else { up.done };
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
                let polled = pump.poll(cx, src, dst, &activity, stops.listener.ctx.splice);
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
                        // Pass the FIN on. When the other direction has ended too, the
                        // session is over and both sockets are closed next: `dst`'s
                        // own EOF was read, so nothing unread is left in it and the
                        // close sends the FIN (after any unsent bytes), not a reset.
                        // That saves one shutdown(2) per connection (issue 12).
                        if !other_done {
                            shutdown_write(dst.as_ref());
                        }
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
