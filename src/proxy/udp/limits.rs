//! A UDP listener's limits on sessions: `max_sessions` (one atomic per listener) and
//! `max_sessions_per_source` (a small map per listener, touched only when a session
//! starts or ends). A session holds its place as a [`Slot`] and gives it back by
//! dropping it.

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::{DropReason, UdpListenerShared, UdpSettings};

/// A counted place under `max_sessions` and `max_sessions_per_source`.
pub(super) struct Slot {
    shared: Arc<UdpListenerShared>,
    ip: IpAddr,
    per_source: bool,
}

impl Slot {
    /// A place for a new session from `ip`, or the limit that refuses it.
    pub(super) fn take(
        shared: &Arc<UdpListenerShared>,
        settings: &UdpSettings,
        ip: IpAddr,
    ) -> Result<Slot, DropReason> {
        // A compare-and-swap, so the count never shows more than the limit.
        let max = settings.max_sessions.unwrap_or(usize::MAX);
        shared
            .active
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .map_err(|_| DropReason::MaxSessions)?;
        let mut slot = Slot {
            shared: shared.clone(),
            ip,
            per_source: false,
        };
        if let Some(max) = settings.max_sessions_per_source {
            let mut m = shared.per_source.lock().unwrap_or_else(|e| e.into_inner());
            let n = m.entry(ip).or_insert(0);
            if *n >= max {
                drop(m);
                return Err(DropReason::MaxSessionsPerSource);
            }
            *n += 1;
            slot.per_source = true;
        }
        Ok(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.active.fetch_sub(1, Relaxed);
        if self.per_source {
            let mut m = self
                .shared
                .per_source
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}
