//! A pool: its backends and their selector, published as one immutable snapshot.
//!
//! The connect path loads the snapshot (`ArcSwap`, no lock), asks the selector and
//! claims the backend. Anything that changes the backend set or a weight builds a new
//! snapshot off the data path and swaps it in; `Backend`s that stay are the same
//! `Arc`s, so their counters and state carry over.

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::backend::{ActiveGuard, Backend};
use crate::balance::{self, Pick, Selector};
use crate::config::{Algorithm, PoolConfig};

pub struct Pool {
    pub name: String,
    pub algorithm: Algorithm,
    /// Distinct backends tried for one client before giving up.
    pub connect_attempts: usize,
    snapshot: ArcSwap<Snapshot>,
}

pub struct Snapshot {
    pub backends: Vec<Arc<Backend>>,
    selector: Box<dyn Selector>,
}

impl Pool {
    pub fn new(cfg: &PoolConfig) -> Arc<Pool> {
        let backends: Vec<_> = cfg.backends.iter().map(Backend::new).collect();
        Arc::new(Pool {
            name: cfg.name.clone(),
            algorithm: cfg.algorithm,
            connect_attempts: cfg.connect_attempts,
            snapshot: ArcSwap::from_pointee(Snapshot::new(cfg.algorithm, backends)),
        })
    }

    /// The current backends, in config order.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.snapshot.load().backends.clone()
    }

    /// Picks a usable backend for `client` that is not in `tried`, and counts the
    /// connection against it. `None` when no usable backend is left.
    pub fn pick(&self, client: IpAddr, tried: &[Arc<Backend>]) -> Option<ActiveGuard> {
        let snap = self.snapshot.load();
        let usable = |i: usize| {
            let b = &snap.backends[i];
            b.is_usable() && !tried.iter().any(|t| Arc::ptr_eq(t, b))
        };
        let i = snap.selector.select(&Pick {
            backends: &snap.backends,
            client,
            usable: &usable,
        })?;
        Some(snap.backends[i].claim())
    }
}

impl Snapshot {
    fn new(algorithm: Algorithm, backends: Vec<Arc<Backend>>) -> Snapshot {
        let selector = balance::build(algorithm, &backends);
        Snapshot { backends, selector }
    }
}
