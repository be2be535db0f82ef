//! Latency mode (`runtime.busy_poll`): a worker that runs out of work keeps polling
//! its sockets (`epoll_wait` with a zero timeout) for up to the budget before it
//! sleeps, so an event that comes soon after is handled without the wake-up of a
//! sleeping thread (a scheduler wake-up costs tens of microseconds on a VM).
//!
//! Each worker (a current-thread runtime) runs one [`spin`] task. While spinning it
//! yields: tokio's current-thread scheduler then polls its I/O driver without
//! blocking before it runs the task again, and any socket found ready has its task
//! run first. The data path marks work with [`note_work`] (a thread-local counter:
//! a TCP session's transfer polled, a connection accepted, a UDP batch read); work
//! seen while spinning restarts the budget. When the budget runs out with no work,
//! the task waits for a real wake-up of the worker (the runtime's `after_unpark`
//! hook calls [`unparked`]) after which the data path did something, so an idle
//! worker sleeps as usual and timer wake-ups do not set it spinning.
//!
//! The same setting asks the kernel to busy-poll too (`SO_BUSY_POLL` on the
//! listening sockets, which accepted ones inherit, and on backend sockets): that
//! only matters with a NIC driver that supports busy polling and
//! `net.core.busy_poll` set, never on loopback.

use std::cell::{Cell, RefCell};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

thread_local! {
    /// Work done on this thread's data path (wraps; only changes are compared).
    static WORK: Cell<u32> = const { Cell::new(0) };
    /// The spin task, waiting for a real wake-up of its worker.
    static PARKED: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// Marks that the data path did something on this thread.
#[inline]
pub(crate) fn note_work() {
    WORK.with(|w| w.set(w.get().wrapping_add(1)));
}

/// The worker's `after_unpark` hook: its driver returned from a real (blocking)
/// park, so the spin task starts a new budget.
pub fn unparked() {
    if let Some(w) = PARKED.with_borrow_mut(Option::take) {
        w.wake();
    }
}

/// Runs on each worker for its whole life (see the module documentation).
pub async fn spin(budget: Duration) {
    let mut seen = WORK.with(Cell::get);
    loop {
        let mut until = Instant::now() + budget;
        loop {
            tokio::task::yield_now().await;
            let work = WORK.with(Cell::get);
            let now = Instant::now();
            if work != seen {
                seen = work;
                until = now + budget;
            } else if now >= until {
                break;
            }
        }
        // Out of budget with nothing to do: sleep until a real wake-up brings data-path
        // work. A wake-up for a timer alone (the tick, the timer wheel's own steps)
        // does not restart the spinning: the tasks it woke run before this one, and
        // only they mark work.
        loop {
            let mut registered = false;
            std::future::poll_fn(|cx| {
                if registered && PARKED.with_borrow(Option::is_none) {
                    return Poll::Ready(());
                }
                registered = true;
                PARKED.with_borrow_mut(|p| *p = Some(cx.waker().clone()));
                Poll::Pending
            })
            .await;
            if WORK.with(Cell::get) != seen {
                seen = WORK.with(Cell::get);
                break;
            }
        }
    }
}

/// `SO_BUSY_POLL` on a data-path socket, best effort (Linux; 0: off).
pub(crate) fn set_socket(s: socket2::SockRef<'_>, us: u32) {
    #[cfg(target_os = "linux")]
    if us > 0 {
        let _ = s.set_busy_poll(us);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (s, us);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// An idle worker stops spinning once the budget is spent and sleeps, and the
    /// timer wake-ups that follow (no data-path work) do not set it spinning again.
    #[test]
    fn spinning_stops_when_idle() {
        let parks = Arc::new(AtomicUsize::new(0));
        let p = parks.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_unpark(unparked)
            .on_thread_park(move || {
                p.fetch_add(1, Ordering::Relaxed);
            })
            .build()
            .unwrap();
        rt.spawn(spin(Duration::from_millis(20)));
        rt.block_on(async {
            // While spinning, the worker never parks for real.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let during = parks.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            // After the budget, the 100 ms sleep is slept, not spun: a few parks.
            let after = parks.load(Ordering::Relaxed);
            assert!(during <= 2, "{during} parks while spinning");
            assert!(after > during, "the worker never slept after the budget");
        });
    }

    #[test]
    fn work_restarts_the_budget() {
        let before = WORK.with(Cell::get);
        note_work();
        assert_ne!(WORK.with(Cell::get), before);
    }
}
