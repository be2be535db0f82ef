//! Process-unique ids for the objects whose counters are exported (backends and
//! listeners): unlike an address, an id is never reused, so the exporter can tell
//! a new object from a freed one.

use std::sync::atomic::{AtomicU64, Ordering};

/// A new id, never handed out before in this process.
pub fn next() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
