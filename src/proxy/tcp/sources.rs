//! A listener's source rules at connect time (`allow`, `deny`,
//! `max_connections_per_source`, `max_rate_per_source`): one bounded table per
//! listener, shared by its workers and kept across reloads, counting each client
//! IP's open connections (per /64 for IPv6) and its token bucket for new ones.
//!
//! The table holds at most `source_table_size` sources. When a new source finds it
//! full, the sources with no open connection are evicted (their rate history goes
//! with them); a source with open connections is never evicted. If every place is
//! held by a source with open connections, the new source is let in untracked, as
//! HAProxy does when a stick table is full: the cap bounds memory, and
//! `max_connections` still bounds the listener.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::SourcesConfig;
use crate::proxy::Termination;

/// One source's state.
struct Entry {
    /// Open connections counted against it.
    active: u32,
    /// Its token bucket (`max_rate_per_source`), as of `at`.
    tokens: f64,
    at: Instant,
}

/// The sources of one listener.
#[derive(Default)]
pub struct SourceTable {
    map: Mutex<HashMap<u128, Entry>>,
}

/// A connection counted against its source; dropping it frees its place.
#[derive(Debug)]
pub struct SourceGuard {
    table: Arc<SourceTable>,
    /// The source's key as two halves: a `u128` would align the guard, and so the
    /// session future holding it, to 16 bytes.
    key: [u64; 2],
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let key = (u128::from(self.key[0]) << 64) | u128::from(self.key[1]);
        if let Some(e) = self.table.lock().get_mut(&key) {
            e.active = e.active.saturating_sub(1);
        }
    }
}

/// The table's key: an IPv4 address (IPv4-mapped IPv6 included), or an IPv6 /64.
fn key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) | (1 << 127),
        IpAddr::V6(v6) => u128::from(v6) & !u128::from(u64::MAX),
    }
}

impl std::fmt::Debug for SourceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceTable")
            .field("sources", &self.len())
            .finish()
    }
}

impl SourceTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<u128, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sources tracked now (for tests and the status API).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Checks client `ip` against the rules `cfg`, counting in `table`: `Ok(Some(guard))`
/// counts the connection against its source until the guard drops, `Ok(None)` lets
/// it in uncounted (no limit set, or the table full of busy sources), and `Err` is
/// the refusal (`Acl`, `SourceLimit` or `SourceRate`). The listener counts refusals
/// (`ListenerShared::admit`).
pub fn check(
    table: &Arc<SourceTable>,
    cfg: &SourcesConfig,
    ip: IpAddr,
) -> Result<Option<SourceGuard>, Termination> {
    if !cfg.admits(ip) {
        return Err(Termination::Acl);
    }
    if !cfg.tracks() {
        return Ok(None);
    }
    let key = key(ip);
    let now = Instant::now();
    let mut map = table.lock();
    if map.len() >= cfg.table_size && !map.contains_key(&key) {
        map.retain(|_, e| e.active > 0);
        if map.len() >= cfg.table_size {
            tracing::debug!(client = %ip, "source table full of open connections: not tracked");
            return Ok(None);
        }
    }
    let e = map.entry(key).or_insert(Entry {
        active: 0,
        tokens: cfg.rate.map_or(0.0, |r| r.burst),
        at: now,
    });
    // The concurrency limit first: a refusal takes no token.
    if cfg.max_per_source.is_some_and(|max| e.active >= max) {
        return Err(Termination::SourceLimit);
    }
    if let Some(r) = cfg.rate {
        let refill = r.per_sec * now.saturating_duration_since(e.at).as_secs_f64();
        e.tokens = (e.tokens + refill).min(r.burst);
        e.at = now;
        if e.tokens < 1.0 {
            return Err(Termination::SourceRate);
        }
        e.tokens -= 1.0;
    }
    e.active += 1;
    drop(map);
    Ok(Some(SourceGuard {
        table: table.clone(),
        key: [(key >> 64) as u64, key as u64],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_group_ipv6_by_64_and_keep_ipv4_apart() {
        let k = |s: &str| key(s.parse().unwrap());
        assert_eq!(k("2001:db8::1"), k("2001:db8::ffff:1"));
        assert_ne!(k("2001:db8::1"), k("2001:db8:0:1::1"));
        assert_eq!(k("127.0.0.1"), k("::ffff:127.0.0.1"));
        assert_ne!(k("0.0.0.1"), k("::1"));
    }
}
