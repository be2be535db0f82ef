//! A pool: its backends, their selector and its settings, published as one immutable
//! snapshot.
//!
//! The connect path loads the snapshot (`ArcSwap`, no lock), asks the selector and
//! claims the backend. Anything that changes the backend set or a weight builds a new
//! snapshot off the data path and swaps it in; `Backend`s that stay are the same
//! `Arc`s, so their counters, health and operator state carry over.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::backend::{flag, ActiveGuard, Backend};
use crate::balance::{self, Pick, Selector};
use crate::config::{Algorithm, PoolConfig, WhenAllDown};
use crate::queue::SlotQueue;

pub struct Pool {
    /// Never reused (see [`crate::ids`]): the exporter's key for this object.
    pub id: u64,
    pub name: Arc<str>,
    snapshot: ArcSwap<Snapshot>,
    /// Backends a reload removed that still have connections draining; shown in the
    /// API until they are gone.
    retiring: Mutex<Vec<Arc<Backend>>>,
    /// Whether the last health change left no usable backend (logged once per episode).
    all_down: AtomicBool,
    /// Cursor for `when_all_down = "fail-open"`.
    fail_open_next: AtomicUsize,
    /// Woken whenever [`Pool::check_all_down`] finds a usable backend (see
    /// [`Pool::usable`]).
    usable: Notify,
    /// Clients waiting for a backend's `max_connections` slot (`queue_timeout`).
    pub queue: Arc<SlotQueue>,
}

/// What [`Pool::load_view`] shows.
#[derive(Debug, Clone, Copy)]
pub struct LoadView {
    pub score: f64,
    pub in_flight: usize,
    /// The last report when fresh (`stale_after`).
    pub report: Option<crate::load::Report>,
    /// Seconds since the last good report (None: never).
    pub report_age: Option<f64>,
    /// Mean time a request holds a slot relative to the pool's median.
    pub slowness: f64,
    /// Learned seconds to the first token on a free slot.
    pub first_token: f64,
    /// Learned seconds a request holds a slot.
    pub slot_time: f64,
    /// Concurrency learned from reports (None: not yet).
    pub concurrency: Option<u32>,
}

/// Why [`Pool::acquire`] found no backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// No usable backend (or every one was tried).
    NoBackend,
    /// Every usable backend was at its `max_connections`, and there is no queue
    /// or it was full (`max_queue`).
    Full,
    /// Waited `queue_timeout` in the queue without a slot freeing.
    QueueTimeout,
}

pub struct Snapshot {
    pub backends: Vec<Arc<Backend>>,
    pub config: Arc<PoolConfig>,
    selector: Box<dyn Selector>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("backends", &self.backends)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A new pool; with health checks configured its backends start down until their
    /// first successful probe.
    pub fn new(cfg: &PoolConfig) -> Arc<Pool> {
        let queue = Arc::new(SlotQueue::default());
        let backends: Vec<_> = cfg
            .backends
            .iter()
            .map(|b| new_backend(cfg, b, &queue))
            .collect();
        Arc::new(Pool {
            id: crate::ids::next(),
            queue,
            name: cfg.name.as_str().into(),
            snapshot: ArcSwap::from_pointee(Snapshot::new(Arc::new(cfg.clone()), backends)),
            retiring: Mutex::new(Vec::new()),
            all_down: AtomicBool::new(false),
            fail_open_next: AtomicUsize::new(0),
            usable: Notify::new(),
        })
    }

    /// Applies a new config for this pool (reload). Backends whose address stays are
    /// kept as they are (health, counters, operator state; a weight set through the API
    /// keeps winning over the file). Returns the backends that were removed; they are
    /// retiring (a fallback, see [`Pool::pick`]) before the new snapshot is visible,
    /// so no pick in between finds neither the old backends nor usable new ones.
    pub fn update(&self, cfg: &PoolConfig) -> Vec<Arc<Backend>> {
        let old = self.snapshot.load_full();
        // Held until the new snapshot is stored: a drain finishing meanwhile
        // (`finish_retiring`) sees either the backend retiring or current again.
        let mut retiring = self.retiring.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept = Vec::with_capacity(cfg.backends.len());
        for bc in &cfg.backends {
            let same = |b: &&Arc<Backend>| *b.name == *bc.name && b.addr == bc.addr;
            let b = match old.backends.iter().find(same) {
                Some(b) => b.clone(),
                // Removed by an earlier reload and still draining: it comes back as
                // it is, connections included, and its drain is called off.
                None => match retiring.iter().position(|b| same(&b) && !b.is_closed()) {
                    Some(i) => {
                        let b = retiring.remove(i);
                        b.clear_flag(flag::DRAINING);
                        b
                    }
                    None => {
                        kept.push(new_backend(cfg, bc, &self.queue));
                        continue;
                    }
                },
            };
            b.set_config_weight(bc.weight);
            b.set_max_connections(bc.max_connections);
            if cfg.health_check.is_none() {
                b.clear_flag(flag::UNHEALTHY);
            }
            kept.push(b);
        }
        let removed: Vec<_> = old
            .backends
            .iter()
            .filter(|b| !kept.iter().any(|k| Arc::ptr_eq(k, b)))
            .cloned()
            .collect();
        retiring.extend(removed.iter().cloned());
        self.snapshot
            .store(Arc::new(Snapshot::new(Arc::new(cfg.clone()), kept)));
        drop(retiring);
        // New backends, raised caps: whoever waits may find a slot now.
        self.queue.wake_one();
        removed
    }

    /// Ends a removed backend's time as a fallback once its drain is over: drops it
    /// from the retiring list and returns true, unless a reload took it back
    /// meanwhile (it is current again; false).
    pub fn finish_retiring(&self, b: &Arc<Backend>) -> bool {
        let mut retiring = self.retiring.lock().unwrap_or_else(|e| e.into_inner());
        if self.contains(b) {
            return false;
        }
        retiring.retain(|r| !Arc::ptr_eq(r, b));
        true
    }

    /// Rebuilds the selector with the backends' current weights.
    pub fn reweigh(&self) {
        let old = self.snapshot.load_full();
        self.snapshot.store(Arc::new(Snapshot::new(
            old.config.clone(),
            old.backends.clone(),
        )));
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// `connect_attempts`, read without touching the config's shared refcount (this is
    /// on every connect).
    pub fn connect_attempts(&self) -> usize {
        self.snapshot.load().config.connect_attempts
    }

    /// `source`: the local address backend connections come from, if one is set
    /// (`None` also for `source = "client"`: see [`Pool::transparent`]).
    pub fn source(&self) -> Option<std::net::IpAddr> {
        match self.snapshot.load().config.source {
            Some(crate::config::PoolSource::Address(ip)) => Some(ip),
            _ => None,
        }
    }

    /// `source = "client"`: tcp and udp sessions come from the client's address.
    pub fn transparent(&self) -> bool {
        self.snapshot.load().config.source == Some(crate::config::PoolSource::Client)
    }

    /// `send_proxy`, read the same way (every TCP session asks).
    pub fn send_proxy(&self) -> crate::config::SendProxy {
        self.snapshot.load().config.send_proxy
    }

    pub fn config(&self) -> Arc<PoolConfig> {
        self.snapshot.load().config.clone()
    }

    /// The current backends, in config order.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.snapshot.load().backends.clone()
    }

    /// Whether `b` (this very object) is one of the current backends.
    pub fn contains(&self, b: &Arc<Backend>) -> bool {
        self.snapshot
            .load()
            .backends
            .iter()
            .any(|x| Arc::ptr_eq(x, b))
    }

    pub fn find(&self, name: &str) -> Option<Arc<Backend>> {
        self.snapshot
            .load()
            .backends
            .iter()
            .find(|b| &*b.name == name)
            .cloned()
    }

    /// Picks a usable backend for `client` that is not in `tried`, and counts the
    /// connection against it. `None` when no usable backend is left. With
    /// `when_all_down = "fail-open"` and no healthy backend at all, health is ignored
    /// (operator drain/disable still count).
    pub fn pick(&self, client: IpAddr, tried: &[Arc<Backend>]) -> Option<ActiveGuard> {
        self.pick_for(client, None, tried)
    }

    /// [`Pool::pick`], for a request of session `session` (a `[pools.affinity]` key,
    /// see [`balance::affinity`]): that session's backend, unless it is unusable
    /// or at the load bound. Without a session, the pool's algorithm.
    pub fn pick_for(
        &self,
        client: IpAddr,
        session: Option<u64>,
        tried: &[Arc<Backend>],
    ) -> Option<ActiveGuard> {
        let snap = self.snapshot.load();
        let untried = |b: &Arc<Backend>| !tried.iter().any(|t| Arc::ptr_eq(t, b));
        let usable = |i: usize| {
            let b = &snap.backends[i];
            b.is_usable() && !b.is_full() && untried(b)
        };
        if let (Some(key), Some(a)) = (session, &snap.config.affinity) {
            if snap.config.algorithm == Algorithm::LeastLoad {
                // Bounded by the load score; past the bound, least-load picks.
                let r = snap.config.load_report.as_ref();
                let (weights, stale_after) = (
                    r.map(|r| r.weights).unwrap_or_default(),
                    r.map(|r| r.stale_after),
                );
                let score = |i: usize| {
                    let b = &snap.backends[i];
                    b.load.score(b.active(), b.weight(), &weights, stale_after)
                };
                let free = |i: usize| {
                    let b = &snap.backends[i];
                    b.load.has_free_slot(b.active(), stale_after)
                };
                let home = balance::affinity::home_by_score(
                    &snap.backends,
                    &usable,
                    key,
                    a.max_load_factor,
                    &score,
                    &free,
                );
                if let Some(g) = home.and_then(|i| snap.backends[i].try_claim()) {
                    return Some(g);
                }
            } else {
                let order =
                    balance::affinity::pick(&snap.backends, &usable, key, a.max_load_factor);
                if let Some(g) = order.iter().find_map(|&i| snap.backends[i].try_claim()) {
                    return Some(g);
                }
            }
        }
        let pick = Pick {
            backends: &snap.backends,
            client,
            usable: &usable,
        };
        // A backend at its `max_connections` is skipped; one that filled between the
        // selector's look and the claim is looked past on the next round.
        for _ in 0..=snap.backends.len() {
            let Some(i) = snap.selector.select(&pick) else {
                break;
            };
            if let Some(g) = snap.backends[i].try_claim() {
                return Some(g);
            }
        }
        if snap.config.when_all_down == WhenAllDown::FailOpen
            && !snap.backends.iter().any(|b| b.is_usable())
        {
            // Fail open: round-robin over every backend the operator has not taken out,
            // healthy or not (the selector's own cursor already moved for this client).
            let n = snap.backends.len();
            let start = self.fail_open_next.fetch_add(1, Ordering::Relaxed);
            return (0..n)
                .map(|k| &snap.backends[(start + k) % n])
                .filter(|b| b.is_admin_usable() && untried(b))
                .find_map(|b| b.try_claim());
        }
        // A reload replaced the backends and the new ones have not passed a health
        // check yet: keep sending to healthy backends being retired rather than
        // refuse clients because of a reload.
        let retiring = self.retiring.lock().unwrap_or_else(|e| e.into_inner());
        retiring
            .iter()
            .filter(|b| {
                b.is_healthy()
                    && b.flags() & (flag::DISABLED | flag::CLOSED) == 0
                    && !b.is_full()
                    && untried(b)
            })
            .min_by_key(|b| b.active())
            .and_then(|b| b.try_claim())
    }

    /// [`Pool::pick`], waiting in the pool's queue when every usable backend is at its
    /// `max_connections` and the pool has a `queue_timeout`: first come, first
    /// served, each waiter taking the first slot that frees on any usable backend.
    /// Without a queue, or with every backend down, it answers at once.
    pub async fn acquire(
        &self,
        client: IpAddr,
        session: Option<u64>,
        tried: &[Arc<Backend>],
    ) -> Result<ActiveGuard, NoSlot> {
        // Nobody waits: the pick is all (no lock). With waiters, a newcomer takes its
        // turn behind them.
        if self.queue.is_empty() {
            if let Some(g) = self.pick_for(client, session, tried) {
                return Ok(g);
            }
        }
        let (timeout, max_queue) = {
            let c = &self.snapshot.load().config;
            (c.queue_timeout, c.max_queue)
        };
        let Some(timeout) = timeout else {
            return Err(self.why_none(tried));
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut front = false;
        loop {
            let ticket = {
                let line = self.queue.lock();
                // Under the line's lock: a slot freed after this pick wakes the line
                // after this waiter has joined it. A newcomer with others waiting
                // does not pick: a slot free now is theirs (a wake-up is on its way).
                let my_turn = front || line.is_empty();
                if let Some(g) = my_turn
                    .then(|| self.pick_for(client, session, tried))
                    .flatten()
                {
                    let more = !line.is_empty();
                    drop(line);
                    if front && more {
                        // Pass the turn on: more than one slot may have freed.
                        self.queue.wake_one();
                    }
                    return Ok(g);
                }
                if !self.any_usable(tried) {
                    return Err(NoSlot::NoBackend);
                }
                if !front && line.len() >= max_queue {
                    return Err(NoSlot::Full);
                }
                line.join(front)
            };
            if !self.queue.wait(ticket, deadline).await {
                return Err(NoSlot::QueueTimeout);
            }
            front = true;
        }
    }

    /// Why a pick found nothing: a usable, untried backend is at its cap (`Full`), or
    /// none is usable.
    fn why_none(&self, tried: &[Arc<Backend>]) -> NoSlot {
        if self.any_usable(tried) {
            NoSlot::Full
        } else {
            NoSlot::NoBackend
        }
    }

    /// `least-load` pools: the live score inputs of `b` and its score (API, metrics,
    /// status page). `None` for other algorithms.
    pub fn load_view(&self, b: &Backend) -> Option<LoadView> {
        let cfg = self.config();
        if cfg.algorithm != Algorithm::LeastLoad {
            return None;
        }
        let r = cfg.load_report.as_ref();
        let weights = r.map(|r| r.weights).unwrap_or_default();
        let stale_after = r.map(|r| r.stale_after);
        let report = stale_after.and_then(|s| b.load.fresh(s));
        Some(LoadView {
            score: b.load.score(b.active(), b.weight(), &weights, stale_after),
            in_flight: b.active(),
            report,
            report_age: b.load.age(),
            slowness: b.load.slowness(),
            first_token: b.load.first_token(),
            slot_time: b.load.slot_time(),
            concurrency: b.load.concurrency(),
        })
    }

    /// Whether a current backend not in `tried` takes new connections, full or not.
    fn any_usable(&self, tried: &[Arc<Backend>]) -> bool {
        self.snapshot
            .load()
            .backends
            .iter()
            .any(|b| b.is_usable() && !tried.iter().any(|t| Arc::ptr_eq(t, b)))
    }

    /// Re-evaluates "every backend is down"; returns `Some(now_all_down)` when that
    /// changed, so the caller logs the edge once.
    pub fn check_all_down(&self) -> Option<bool> {
        let down = !self.snapshot.load().backends.iter().any(|b| b.is_usable());
        if !down {
            self.usable.notify_waiters();
            // A backend back up (or enabled) has free slots.
            self.queue.wake_one();
        }
        (self.all_down.swap(down, Ordering::AcqRel) != down).then_some(down)
    }

    /// Resolves once a current backend takes new connections, as seen by the next
    /// health verdict or operator action ([`Pool::check_all_down`]).
    pub async fn usable(&self) {
        crate::tasks::wait_for(&self.usable, || self.has_usable()).await
    }

    /// Logs the edge into and out of "no backend usable" (health verdicts, operator
    /// actions, a backend back from passive ejection, reload), and wakes whoever
    /// waits for a usable backend ([`Pool::usable`]).
    pub fn report_all_down(&self) {
        match self.check_all_down() {
            Some(true) => warn!(
                pool = %self.name,
                policy = self.config().when_all_down.as_str(),
                "every backend of the pool is down"
            ),
            Some(false) => info!(pool = %self.name, "pool has a usable backend again"),
            None => {}
        }
    }

    /// Whether any current backend takes new connections.
    /// Whether a new client would get a backend now: one is usable, or the pool is
    /// `fail-open` and one is not drained or disabled (health aside).
    pub fn can_serve(&self) -> bool {
        let snap = self.snapshot.load();
        snap.backends.iter().any(|b| b.is_usable())
            || (snap.config.when_all_down == WhenAllDown::FailOpen
                && snap.backends.iter().any(|b| b.is_admin_usable()))
    }

    pub fn has_usable(&self) -> bool {
        self.snapshot.load().backends.iter().any(|b| b.is_usable())
    }

    pub fn all_down(&self) -> bool {
        self.all_down.load(Ordering::Acquire)
    }

    /// Drops `b` from the retiring backends if it has no connection left. Checked
    /// under the same lock as the fallback pick claims under, so no connection can
    /// land on `b` after this says yes.
    pub fn retire_if_idle(&self, b: &Arc<Backend>) -> bool {
        let mut retiring = self.retiring.lock().unwrap_or_else(|e| e.into_inner());
        if b.active() != 0 {
            return false;
        }
        retiring.retain(|r| !Arc::ptr_eq(r, b));
        true
    }

    pub fn retiring(&self) -> Vec<Arc<Backend>> {
        self.retiring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn new_backend(
    pool: &PoolConfig,
    cfg: &crate::config::BackendConfig,
    queue: &Arc<SlotQueue>,
) -> Arc<Backend> {
    let b = Backend::new(cfg, &pool.name);
    b.set_queue(queue);
    if pool.health_check.is_some() {
        b.set_flag(flag::UNHEALTHY);
    } else {
        b.set_been_up();
    }
    b
}

impl Snapshot {
    fn new(config: Arc<PoolConfig>, backends: Vec<Arc<Backend>>) -> Snapshot {
        let selector = balance::build_for(&config, &backends);
        Snapshot {
            backends,
            config,
            selector,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(backend: &str) -> PoolConfig {
        let text = format!(
            "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\
             [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"{backend}\" }} ]\n\
             [pools.health_check]\nkind = \"tcp\"\n"
        );
        let cfg = Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        cfg.pools[0].clone()
    }

    /// A reload that replaces every backend of a health-checked pool: the new ones
    /// are down until probed, and the old one must already be a fallback when the
    /// new snapshot shows, or a client picking in between finds no backend at all.
    #[test]
    fn replaced_backends_are_a_fallback_as_soon_as_the_new_set_shows() {
        let pool = Pool::new(&config("127.0.0.1:1"));
        let old = pool.backends()[0].clone();
        old.clear_flag(flag::UNHEALTHY);
        let client: IpAddr = "127.0.0.9".parse().unwrap();

        let removed = pool.update(&config("127.0.0.1:2"));
        assert_eq!(removed.len(), 1);
        assert!(Arc::ptr_eq(&removed[0], &old));
        assert!(
            !pool.has_usable(),
            "the new backend waits for its first probe"
        );
        let picked = pool
            .pick(client, &[])
            .expect("the old backend takes the client");
        assert!(Arc::ptr_eq(picked.backend(), &old));
        assert_eq!(pool.retiring().len(), 1);
    }
}
