//! Backend selection: one trait, one file per algorithm.
//!
//! A selector is built from a pool's backend set (off the data path, whenever the set
//! or a weight changes) and then only *read* on the connect path: its mutable state is
//! atomics. It is asked for a backend given the client address and a filter of usable
//! backends; health, draining and retries live outside it, in that filter.

pub mod affinity;
mod least_conn;
mod least_load;
mod maglev;
mod p2c;
mod random;
mod round_robin;
mod weighted;

use std::net::IpAddr;
use std::sync::Arc;

use crate::backend::Backend;
use crate::config::{Algorithm, PoolConfig};

pub use maglev::Maglev;

/// What a selector is asked.
#[derive(Clone, Copy)]
pub struct Pick<'a> {
    /// The backends the selector was built for, in the same order.
    pub backends: &'a [Arc<Backend>],
    /// The client's address: the key for ip-hash.
    pub client: IpAddr,
    /// Whether backend `i` may take this connection (up, not already tried).
    pub usable: &'a dyn Fn(usize) -> bool,
}

impl std::fmt::Debug for Pick<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pick")
            .field("backends", &self.backends.len())
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

pub trait Selector: Send + Sync {
    /// Index into `pick.backends` of the chosen backend, or `None` when no usable
    /// backend is left.
    fn select(&self, pick: &Pick<'_>) -> Option<usize>;
}

/// Builds the selector of pool `cfg` over `backends` (their weights as of now).
pub fn build_for(cfg: &PoolConfig, backends: &[Arc<Backend>]) -> Box<dyn Selector> {
    match (cfg.algorithm, &cfg.load_report) {
        (Algorithm::LeastLoad, Some(r)) => {
            let weights: Vec<u32> = backends.iter().map(|b| b.weight()).collect();
            Box::new(least_load::LeastLoad::new(
                &weights,
                r.weights,
                Some(r.stale_after),
            ))
        }
        (algorithm, _) => build(algorithm, backends),
    }
}

/// Builds the selector for `algorithm` over `backends` (their weights as of now);
/// `least-load` without reports (in-flight counts and learned speed).
pub fn build(algorithm: Algorithm, backends: &[Arc<Backend>]) -> Box<dyn Selector> {
    let weights: Vec<u32> = backends.iter().map(|b| b.weight()).collect();
    match algorithm {
        Algorithm::LeastLoad => Box::new(least_load::LeastLoad::new(
            &weights,
            crate::config::LoadWeights::default(),
            None,
        )),
        Algorithm::RoundRobin => Box::new(round_robin::RoundRobin::default()),
        Algorithm::WeightedRoundRobin => Box::new(weighted::SmoothWeighted::new(&weights)),
        Algorithm::LeastConnections => Box::new(least_conn::LeastConnections::default()),
        Algorithm::IpHash => {
            let names: Vec<&str> = backends.iter().map(|b| &*b.name).collect();
            Box::new(Maglev::new(&names, &weights))
        }
        Algorithm::Random => Box::new(random::WeightedRandom::new(&weights)),
        Algorithm::PowerOfTwo => Box::new(p2c::PowerOfTwo::new(&weights)),
    }
}

/// First usable index scanning from `start`, wrapping around.
fn first_usable_from(pick: &Pick<'_>, start: usize) -> Option<usize> {
    let n = pick.backends.len();
    (0..n).map(|i| (start + i) % n).find(|&i| (pick.usable)(i))
}

/// `a` carries less load than `b`: active connections relative to weight.
fn less_loaded(a: &Backend, b: &Backend) -> bool {
    (a.active() as u64) * u64::from(b.weight()) < (b.active() as u64) * u64::from(a.weight())
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use crate::config::BackendConfig;

    pub fn backends(weights: &[u32]) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Backend::new(
                    &BackendConfig {
                        name: format!("10.0.0.{}:80", i + 1),
                        addr: format!("10.0.0.{}:80", i + 1).parse().unwrap(),
                        weight: w,
                        max_connections: None,
                        hostname: None,
                    },
                    "p",
                )
            })
            .collect()
    }

    pub fn pick_n(sel: &dyn Selector, bs: &[Arc<Backend>], n: usize) -> Vec<usize> {
        let all = |_: usize| true;
        (0..n)
            .map(|_| {
                sel.select(&Pick {
                    backends: bs,
                    client: "192.0.2.1".parse().unwrap(),
                    usable: &all,
                })
                .unwrap()
            })
            .collect()
    }
}
