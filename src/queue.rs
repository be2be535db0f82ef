//! A pool's wait line (`queue_timeout`): clients whose pick found every usable
//! backend at its `max_connections` wait here, first in first out, for a slot.
//!
//! The line holds only wake-ups, not slots. A waiter is woken when a slot may have
//! freed (a counted connection of a capped backend ended, a backend came back, a
//! reload changed the backends), takes its pick again under the line's lock, and
//! goes back to the front when the slot went elsewhere. A waiter that got its slot
//! passes the wake-up on, so several slots freed at once serve several waiters.
//!
//! Lost wake-ups cannot happen: a waiter's last failed pick and its place in line
//! are taken under the lock, and a freed slot is counted before the lock is taken
//! to wake the line.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;

#[derive(Debug, Default)]
pub struct SlotQueue {
    waiters: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
    /// `waiters.len()`, readable without the lock (checked on every connection close).
    len: AtomicUsize,
    next_id: AtomicU64,
    /// Waiters that gave up at `queue_timeout` (`flowgate_pool_queue_timeouts_total`).
    pub timeouts: AtomicU64,
}

/// The line, locked: what a waiter does between its last pick and taking a place.
#[derive(Debug)]
pub struct Locked<'a> {
    queue: &'a SlotQueue,
    waiters: MutexGuard<'a, VecDeque<(u64, oneshot::Sender<()>)>>,
}

/// A place in line: resolves when woken.
#[derive(Debug)]
pub struct Ticket {
    id: u64,
    rx: oneshot::Receiver<()>,
}

impl SlotQueue {
    /// Clients waiting now (`flowgate_pool_queue_length`).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn lock(&self) -> Locked<'_> {
        Locked {
            queue: self,
            waiters: self.waiters.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// A slot may have freed: wakes the longest waiter. Costs one atomic load when
    /// nobody waits.
    pub fn wake_one(&self) {
        if self.is_empty() {
            return;
        }
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((_, tx)) = w.pop_front() {
            self.len.fetch_sub(1, Ordering::AcqRel);
            // A waiter that timed out dropped its receiver: the next one gets it.
            if tx.send(()).is_ok() {
                break;
            }
        }
    }

    /// Waits until woken or `deadline`. On timeout the ticket's place is given up;
    /// a wake-up that raced with the timeout is passed on. Returns whether woken.
    pub async fn wait(&self, ticket: Ticket, deadline: tokio::time::Instant) -> bool {
        let Ticket { id, rx } = ticket;
        if tokio::time::timeout_at(deadline, rx).await.is_ok() {
            return true;
        }
        let queued = {
            let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            let before = w.len();
            w.retain(|(i, _)| *i != id);
            let removed = before != w.len();
            if removed {
                self.len.fetch_sub(1, Ordering::AcqRel);
            }
            removed
        };
        if !queued {
            // Popped by a waker just as the deadline passed: not ours to keep.
            self.wake_one();
        }
        self.timeouts.fetch_add(1, Ordering::Relaxed);
        false
    }
}

impl Locked<'_> {
    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// Takes a place: at the back for a newcomer, at the front for a waiter whose
    /// wake-up found no slot after all (it keeps its turn).
    pub fn join(mut self, front: bool) -> Ticket {
        let id = self.queue.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if front {
            self.waiters.push_front((id, tx));
        } else {
            self.waiters.push_back((id, tx));
        }
        self.queue.len.fetch_add(1, Ordering::AcqRel);
        Ticket { id, rx }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn later(ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test(start_paused = true)]
    async fn wakes_in_arrival_order_and_a_front_rejoin_keeps_its_turn() {
        let q = SlotQueue::default();
        let a = q.lock().join(false);
        let b = q.lock().join(false);
        assert_eq!(q.len(), 2);
        q.wake_one();
        assert!(q.wait(a, later(10)).await, "first in line is woken first");
        // a found no slot after all and goes back to the front, ahead of b.
        let a = q.lock().join(true);
        q.wake_one();
        assert!(q.wait(a, later(10)).await);
        assert_eq!(q.len(), 1);
        q.wake_one();
        assert!(q.wait(b, later(10)).await);
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_waiter_leaves_and_its_wake_goes_to_the_next() {
        let q = SlotQueue::default();
        let a = q.lock().join(false);
        let b = q.lock().join(false);
        assert!(!q.wait(a, later(5)).await, "nobody woke a");
        assert_eq!(q.len(), 1, "a left the line");
        assert_eq!(q.timeouts.load(Ordering::Relaxed), 1);
        q.wake_one();
        assert!(q.wait(b, later(5)).await);
        // A wake with nobody waiting is a no-op.
        q.wake_one();
        assert!(q.is_empty());
    }
}
