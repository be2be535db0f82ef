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
