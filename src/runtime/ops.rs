//! Operator actions on one backend (the admin API's POST, PUT and DELETE).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::info;

use super::reload::Cause;
use super::{OpError, Runtime};
use crate::backend::{flag, Backend};
use crate::config::{resolve_address, BackendConfig, Overrides};
use crate::pool::Pool;

impl Runtime {
    fn backend(&self, pool: &str, backend: &str) -> Result<(Arc<Pool>, Arc<Backend>), OpError> {
        let p = self
            .pool(pool)
            .ok_or_else(|| OpError::NoPool(pool.into()))?;
        let b = p.find(backend).ok_or_else(|| OpError::NoBackend {
            pool: pool.into(),
            backend: backend.into(),
        })?;
        Ok((p, b))
    }

    /// Operator drain: no new connections; open ones finish or are cut at the pool's
    /// `drain_timeout`. Stays draining until `enable`.
    pub fn drain(&self, pool: &str, backend: &str) -> Result<(), OpError> {
        let (p, b) = self.backend(pool, backend)?;
        if b.flags() & flag::DRAINING == 0 {
            info!(pool, backend, "backend draining (API)");
            let t = p.config().drain_timeout;
            self.drain_backend(p.clone(), b, t, false);
            p.report_all_down();
        }
        Ok(())
    }

    /// Operator maintenance mode: no new connections, nothing is closed.
    pub fn disable(&self, pool: &str, backend: &str) -> Result<(), OpError> {
        let (p, b) = self.backend(pool, backend)?;
        if b.set_flag(flag::DISABLED) {
            info!(pool, backend, "backend disabled (API)");
            self.inner.upstreams.forget(&b);
            p.report_all_down();
        }
        Ok(())
    }

    /// Clears drain and disable.
    pub fn enable(&self, pool: &str, backend: &str) -> Result<(), OpError> {
        let (p, b) = self.backend(pool, backend)?;
        if b.clear_flag(flag::DRAINING | flag::DISABLED) {
            info!(pool, backend, "backend enabled (API)");
            p.report_all_down();
        }
        Ok(())
    }

    /// Runtime weight; kept across reloads for as long as the backend stays.
    pub fn set_weight(&self, pool: &str, backend: &str, weight: u32) -> Result<(), OpError> {
        if !(1..=1000).contains(&weight) {
            return Err(OpError::BadWeight(weight));
        }
        let (p, b) = self.backend(pool, backend)?;
        b.set_override_weight(weight);
        p.reweigh();
        info!(pool, backend, weight, "backend weight set (API)");
        Ok(())
    }

    /// Adds a backend to `pool` at runtime, as if the file listed it last: probed
    /// like the others, kept across reloads (see [`Overrides`]), gone on restart.
    /// A backend still draining from an earlier removal takes its connections back.
    /// `address` may be a hostname (resolved now, so call this off the runtime).
    pub fn add_backend(&self, pool: &str, address: &str, weight: u32) -> Result<(), OpError> {
        if !(1..=1000).contains(&weight) {
            return Err(OpError::BadWeight(weight));
        }
        let addr = resolve_address(address).map_err(OpError::BadBackend)?;
        if let Some(listener) = self.own_listener(pool, addr) {
            return Err(OpError::BadBackend(format!(
                "{address} is listener {listener:?}'s own address: it would connect to itself"
            )));
        }
        self.change(|cfg, ov| {
            let p = cfg.pools.iter_mut().find(|p| p.name == pool);
            let p = p.ok_or_else(|| OpError::NoPool(pool.into()))?;
            if p.backends.iter().any(|b| b.name == address) {
                return Err(OpError::Conflict(format!(
                    "pool {pool:?} already has backend {address:?}"
                )));
            }
            if let Some(crate::config::PoolSource::Address(src)) = p.source {
                if src.is_ipv4() != addr.is_ipv4() {
                    return Err(OpError::BadBackend(format!(
                        "{address} and the pool's source {src} are of different IP families"
                    )));
                }
            }
            let b = BackendConfig {
                name: address.to_string(),
                addr,
                weight,
                max_connections: None,
                hostname: None,
            };
            p.backends.push(b.clone());
            ov.add(pool, b);
            Ok(())
        })?;
        info!(pool, backend = address, weight, "backend added (API)");
        Ok(())
    }

    /// Removes a backend from `pool` at runtime: it drains under the pool's
    /// `drain_timeout`, as a reload that dropped it would. A pool keeps at least one
    /// backend (drain or disable the last one instead).
    pub fn remove_backend(&self, pool: &str, backend: &str) -> Result<(), OpError> {
        self.change(|cfg, ov| {
            let p = cfg.pools.iter_mut().find(|p| p.name == pool);
            let p = p.ok_or_else(|| OpError::NoPool(pool.into()))?;
            let Some(i) = p.backends.iter().position(|b| b.name == backend) else {
                return Err(OpError::NoBackend {
                    pool: pool.into(),
                    backend: backend.into(),
                });
            };
            if p.backends.len() == 1 {
                return Err(OpError::Conflict(format!(
                    "{backend} is pool {pool:?}'s last backend: a pool keeps at least one (drain or disable it instead)"
                )));
            }
            p.backends.remove(i);
            ov.remove(pool, backend);
            Ok(())
        })
    }

    /// The name of a listener feeding `pool` that `addr` would reach: the sockets as
    /// bound (a file's port 0 is a real port now), and a listener on 0.0.0.0 or
    /// [::] at every address of its port.
    fn own_listener(&self, pool: &str, addr: std::net::SocketAddr) -> Option<Arc<str>> {
        let tcp = self.listeners().into_iter().map(|l| {
            (
                l.shared.name.clone(),
                l.shared.settings().pools(),
                l.local_addr,
            )
        });
        let udp = self.udp_listeners().into_iter().map(|l| {
            (
                l.shared.name.clone(),
                vec![l.shared.settings().pool.clone()],
                l.local_addr,
            )
        });
        tcp.chain(udp)
            .find(|(_, pools, bound)| {
                pools.iter().any(|p| *p.name == *pool)
                    && bound.port() == addr.port()
                    && (bound.ip() == addr.ip() || bound.ip().is_unspecified())
            })
            .map(|(name, _, _)| name)
    }

    /// The running config and the overrides behind it (`GET /api/v1/config`).
    pub fn running_config(&self) -> (crate::config::Config, Overrides) {
        let st = self.inner.lock();
        (st.config.clone(), st.overrides.clone())
    }

    /// Edits a copy of the running config and its overrides with `edit`, then runs
    /// it; nothing changes if `edit` or the run fails.
    fn change(
        &self,
        edit: impl FnOnce(&mut crate::config::Config, &mut Overrides) -> Result<(), OpError>,
    ) -> Result<(), OpError> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(OpError::ShuttingDown);
        }
        let mut st = self.inner.lock();
        let mut cfg = st.config.clone();
        let mut ov = st.overrides.clone();
        edit(&mut cfg, &mut ov)?;
        // Only pools change: nothing in the run can fail (no socket, no file).
        self.execute(&mut st, cfg, Cause::Api)
            .map_err(|e| OpError::Conflict(e.to_string()))?;
        st.overrides = ov;
        Ok(())
    }
}
