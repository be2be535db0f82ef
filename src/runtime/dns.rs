//! Backends given by hostname follow their DNS records (`resolve_interval`).
//!
//! One task on the control runtime resolves each hostname entry of each pool at
//! its pool's interval, through the system resolver (`getaddrinfo` on the control
//! runtime's blocking threads, never on a worker). A changed record set is applied
//! like an API change to the running config: new addresses join (behind a health
//! check when the pool has one, then with `slow_start`), vanished ones drain under
//! `drain_timeout`. A failing resolver keeps the last good addresses; the failure
//! is logged once per episode, and the recovery once.
//!
//! A reload resolves every hostname itself (at load) and wakes the task, which then
//! follows the new config's entries.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::{Runtime, WeakRuntime};
use crate::config::resolve::{lookup, Lookup};

/// A resolver that answers nothing for this long has failed, this round.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// One hostname entry of one pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Entry {
    pool: String,
    /// As written: `HOST:PORT`.
    written: String,
}

impl Runtime {
    /// Hostname entries of the running config, with their pool's interval.
    fn hostname_entries(&self) -> Vec<(Entry, Duration)> {
        let st = self.inner.lock();
        let mut v: Vec<(Entry, Duration)> = Vec::new();
        for p in &st.config.pools {
            for h in p.backends.iter().filter_map(|b| b.hostname.as_ref()) {
                let e = Entry {
                    pool: p.name.clone(),
                    written: h.clone(),
                };
                if !v.iter().any(|(x, _)| *x == e) {
                    v.push((e, p.resolve_interval));
                }
            }
        }
        v
    }
}

/// The resolver loop (one per runtime, on the control runtime). Sleeps until the
/// next entry is due, or, with no hostname entries, until a reload wakes it.
pub(super) async fn resolve_loop(rt: WeakRuntime) {
    let mut due: HashMap<Entry, Instant> = HashMap::new();
    let mut failing: HashSet<Entry> = HashSet::new();
    loop {
        let Some(runtime) = rt.upgrade() else {
            return;
        };
        let wake = runtime.inner.resolver.clone();
        let entries = runtime.hostname_entries();
        due.retain(|e, _| entries.iter().any(|(x, _)| x == e));
        failing.retain(|e| entries.iter().any(|(x, _)| x == e));
        let now = Instant::now();
        for (e, interval) in &entries {
            // Resolved at load: the first look is an interval away.
            let at = *due.entry(e.clone()).or_insert(now + *interval);
            if at > now {
                continue;
            }
            due.insert(e.clone(), now + *interval);
            match resolve(&e.written).await {
                Ok(addrs) => {
                    if failing.remove(e) {
                        info!(pool = %e.pool, hostname = %e.written, "hostname resolves again");
                    }
                    match runtime.apply_records(&e.pool, &e.written, &addrs) {
                        Ok((added, removed)) if !added.is_empty() || !removed.is_empty() => {
                            info!(pool = %e.pool, hostname = %e.written, ?added, ?removed, "backend addresses changed (DNS)");
                        }
                        Ok(_) => {}
                        Err(why) => {
                            if failing.insert(e.clone()) {
                                warn!(pool = %e.pool, hostname = %e.written, error = %why, "keeping the last good addresses");
                            }
                        }
                    }
                }
                Err(why) => {
                    if failing.insert(e.clone()) {
                        warn!(pool = %e.pool, hostname = %e.written, error = %why, "cannot resolve; keeping the last good addresses");
                    }
                }
            }
        }
        let next = due.values().min().copied();
        drop(runtime);
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// Every address `written` (`HOST:PORT`) resolves to, ascending, without repeats.
async fn resolve(written: &str) -> Result<Vec<SocketAddr>, String> {
    let (host, port) = match lookup(written)? {
        Lookup::Host(h, p) => (h, p),
        Lookup::Literal(a) => return Ok(vec![a]),
    };
    let found = tokio::time::timeout(
        LOOKUP_TIMEOUT,
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    .map_err(|_| format!("no answer within {LOOKUP_TIMEOUT:?}"))?
    .map_err(|e| e.to_string())?;
    let mut v: Vec<SocketAddr> = found.collect();
    v.sort();
    v.dedup();
    if v.is_empty() {
        return Err("no address".into());
    }
    Ok(v)
}
