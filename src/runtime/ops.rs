//! Operator actions on one backend (the admin API's POST and PUT).

use std::sync::Arc;

use tracing::info;

use super::{OpError, Runtime};
use crate::backend::{flag, Backend};
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
}
