//! Process-wide "out of file descriptors" state, shared by the accept loops and the
//! backend connect path.
//!
//! Descriptors can run out at `accept` or, just after, at the backend `connect`. Either
//! way the whole process is in the same episode: it is logged once, every accept loop
//! slows to one accept per pause (so clients wait in the kernel backlog instead of
//! being accepted and dropped), and a connect that failed for lack of a descriptor is
//! retried on the same backend after a pause instead of being blamed on the backend.
//! The episode ends at the first backend connect that succeeds.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{info, warn};

/// How long to pause when descriptors are exhausted (HAProxy pauses ~100 ms).
pub const PAUSE: Duration = Duration::from_millis(100);

static EXHAUSTED: AtomicBool = AtomicBool::new(false);

/// EMFILE or ENFILE (or the allocation failure some systems report instead).
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE
    ) || e.kind() == io::ErrorKind::OutOfMemory
}

/// Records that descriptors ran out; logs once per episode.
pub fn exhausted(during: &str, e: &io::Error) {
    if !EXHAUSTED.swap(true, Ordering::AcqRel) {
        warn!(
            during,
            error = %e,
            "out of file descriptors; slowing accepts to one per {PAUSE:?} until they are available again"
        );
    }
}

/// Whether an episode is under way.
pub fn is_exhausted() -> bool {
    EXHAUSTED.load(Ordering::Relaxed)
}

/// A descriptor-using operation succeeded: ends the episode, if any.
pub fn available() {
    if EXHAUSTED.load(Ordering::Relaxed) && EXHAUSTED.swap(false, Ordering::AcqRel) {
        info!("file descriptors available again: accepting again at full speed");
    }
}

/// The soft open-files limit (1024 when it cannot be read).
pub fn limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

/// Raises the soft open-files limit to the hard one (systemd's default soft limit is
/// 1024, far below what a balancer needs); returns `(before, now)`.
pub fn raise_limit() -> (u64, u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (1024, 1024);
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return (soft, hard);
    }
    (soft, soft)
}

/// Says at startup what the descriptors are for, and warns when the configured
/// limits cannot all be met: each TCP connection holds two sockets (a stalled bulk
/// one four: two sockets and a pipe), each UDP session one.
pub fn report_budget(tcp_max_connections: Option<u64>, udp_max_sessions: u64) {
    let limit = limit();
    match tcp_max_connections {
        Some(tcp) => {
            let need = tcp.saturating_mul(2).saturating_add(udp_max_sessions);
            if need > limit {
                warn!(
                    open_files = limit,
                    needed = need,
                    "max_connections (2 descriptors each, 4 while a stalled bulk transfer holds a pipe) and max_sessions (1 each) do not fit the open-files limit: raise it (LimitNOFILE=) or lower them"
                );
            } else {
                info!(open_files = limit, needed = need, "descriptor budget");
            }
        }
        None => info!(
            open_files = limit,
            udp_sessions = udp_max_sessions,
            "descriptor budget: TCP listeners without max_connections take what is left (2 descriptors per connection, 4 while a stalled bulk transfer holds a pipe)"
        ),
    }
}
