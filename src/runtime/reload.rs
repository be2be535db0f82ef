//! Reload: plan, then execute.
//!
//! [`crate::config::diff`] turns the running config and the new one into a
//! [`ReloadPlan`] (pure, unit-tested on its own). Execution first does everything
//! that can fail (the access log's new file, binding new listeners): if any of it
//! fails, nothing has changed. Only then does it swap pools, listeners and settings,
//! none of which can fail.
//!
//! What stays is not touched: kept listeners keep their sockets and accept loops,
//! kept backends keep their `Arc` (health, counters, operator state). Removed
//! backends and listeners drain under the pool's `drain_timeout`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use tracing::{info, warn};

use super::startup::{udp_default_max, Bound};
use super::{AccessLogError, ReloadError, Runtime, State};
use crate::config::{self, Config, ListenerConfig, ReloadPlan, RestartKey};
use crate::pool::Pool;
use crate::proxy::tcp::ListenerSettings;
use crate::proxy::udp::UdpSettings;

impl Runtime {
    /// Re-reads the file the running config came from and applies it.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let r = (|| {
            let source = self.inner.lock().config.source.clone();
            let path = source.ok_or(ReloadError::NoSource)?;
            let cfg = Config::load(&path)?;
            self.apply(cfg)
        })();
        match &r {
            Ok(()) => {
                self.inner.reloads_ok.fetch_add(1, Ordering::Relaxed);
                *self
                    .inner
                    .last_load
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = SystemTime::now();
            }
            Err(_) => {
                self.inner.reloads_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// Applies `new` atomically with respect to errors: if the access log's file
    /// cannot be opened or a new listener cannot bind, nothing changes.
    ///
    /// `new` is a file's config: the admin API's runtime overrides that it does not
    /// make moot are applied on top (see [`crate::config::Overrides`]).
    pub fn apply(&self, mut new: Config) -> Result<(), ReloadError> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(ReloadError::ShuttingDown);
        }
        let mut st = self.inner.lock();
        if new.source.is_none() {
            new.source = st.config.source.clone();
        }
        let mut overrides = st.overrides.clone();
        let dropped = overrides.prune(&new);
        let new = overrides.applied(new);
        self.execute(&mut st, new, Cause::Reload)?;
        for line in dropped {
            info!("runtime override dropped by reload: {line}");
        }
        st.overrides = overrides;
        info!("configuration reloaded");
        Ok(())
    }

    /// Makes `new` (a complete running config) the running one: see the module
    /// comment. `cause` words the log lines.
    pub(super) fn execute(
        &self,
        st: &mut State,
        new: Config,
        cause: Cause,
    ) -> Result<(), ReloadError> {
        let plan = config::diff(&st.config, &new);

        // The admin API listens where it started until restart: a token may not go
        // away while that address is not loopback.
        if let Some(running) = &st.config.admin {
            let cleared = new.admin.as_ref().is_some_and(|a| a.token.is_none());
            if cleared && running.token.is_some() && !running.bind.ip().is_loopback() {
                return Err(ReloadError::AdminUnprotected(running.bind));
            }
        }

        // 1. Everything fallible. Nothing has changed yet: sockets bound here close
        // again if a later step fails; the access log's file (which opening may
        // create) comes last.
        crate::proxy::check_transparent(&new.pools)?;
        let mut fresh = Vec::new();
        for name in &plan.listeners.added {
            let l = listener_config(&new, name);
            fresh.push((l.clone(), self.bind_listener(l)?));
        }
        if plan.access_log_changed {
            // Opens (and may create) the new file and starts the writer thread if
            // none runs yet: all that can fail about the access log.
            self.inner
                .access_log
                .prepare(&new.log.access_log)
                .map_err(|error| AccessLogError {
                    path: new.log.access_log.to_string(),
                    error,
                })?;
        }

        // 2. The swap: nothing below fails.
        self.swap_pools(st, &new, &plan, cause);
        self.swap_listeners(st, &new, &plan, fresh);
        self.apply_settings(&st.config, &new, &plan);
        st.config = new;
        // The resolver follows the new config's hostname entries.
        self.inner.resolver.notify_one();
        Ok(())
    }

    /// Pools: update kept ones (draining the backends they lose), create new ones,
    /// drain removed ones; restart every pool's probes.
    fn swap_pools(&self, st: &mut State, new: &Config, plan: &ReloadPlan, cause: Cause) {
        // Pools removed earlier are kept only while a connection may still need
        // cutting at a hard stop (pool churn must not grow this list).
        st.removed_pools.retain(|p| {
            p.backends()
                .iter()
                .chain(&p.retiring())
                .any(|b| b.active() > 0)
        });
        let mut pools = HashMap::new();
        // Pools whose probes start anew: new ones, and those whose check changed.
        let mut restart = Vec::new();
        for p in &new.pools {
            let pool = match st.pools.get(&p.name) {
                Some(pool) => {
                    if pool.config().health_check != p.health_check {
                        restart.push(p.name.clone());
                    }
                    let removed = self.scoped(|| pool.update(p));
                    for b in removed {
                        info!(pool = %p.name, backend = %b.name, "backend removed by {}: draining", cause.by());
                        self.drain_backend(pool.clone(), b, p.drain_timeout, true);
                    }
                    pool.clone()
                }
                None => {
                    restart.push(p.name.clone());
                    self.scoped(|| Pool::new(p))
                }
            };
            pools.insert(p.name.clone(), pool);
        }
        for name in &plan.pools.removed {
            let Some(old) = st.pools.remove(name) else {
                continue;
            };
            info!(pool = %name, "pool removed by reload: draining its backends");
            let drain = old.config().drain_timeout;
            for b in old.backends() {
                self.drain_backend(old.clone(), b, drain, false);
            }
            for stops in [&mut st.probes, &mut st.loads] {
                if let Some(stop) = stops.remove(name) {
                    stop.cancel();
                }
            }
            st.removed_pools.push(old);
        }
        st.pools = pools;
        let all: Vec<_> = st.pools.values().cloned().collect();
        self.inner
            .control
            .spawn_until_stop(super::startup::report_states(all.clone()));
        for pool in &all {
            self.start_probes(st, pool, restart.contains(&pool.name.to_string()));
            pool.report_all_down();
        }
    }

    /// Listeners: kept ones keep their sockets and take new settings, removed ones
    /// stop accepting and drain, new ones (bound in step 1) start.
    fn swap_listeners(
        &self,
        st: &mut State,
        new: &Config,
        plan: &ReloadPlan,
        fresh: Vec<(ListenerConfig, Bound)>,
    ) {
        let udp_max = udp_default_max(new);
        let kept = |name: &str| plan.listeners.kept.iter().any(|k| k == name);
        for old in std::mem::take(&mut st.listeners) {
            if kept(&old.shared.name) {
                let l = listener_config(new, &old.shared.name);
                let settings = self.scoped(|| ListenerSettings::new(l, &st.pools));
                old.shared.set_settings(settings);
                st.listeners.push(old);
            } else {
                let grace = old
                    .shared
                    .settings()
                    .pools()
                    .iter()
                    .map(|p| p.config().drain_timeout)
                    .max()
                    .unwrap_or_default();
                info!(listener = %old.shared.name, "listener removed by reload: closing it, draining its connections");
                self.retire_listener(old.shared, grace);
            }
        }
        for old in std::mem::take(&mut st.udp_listeners) {
            if kept(&old.shared.name) {
                let l = listener_config(new, &old.shared.name);
                match l.pool.as_ref().and_then(|p| st.pools.get(p)) {
                    Some(pool) => {
                        old.shared
                            .set_settings(UdpSettings::new(l, pool.clone(), udp_max))
                    }
                    None => warn!(listener = %l.name, "udp listener without a pool: settings kept"),
                }
                st.udp_listeners.push(old);
            } else {
                info!(listener = %old.shared.name, "UDP listener removed by reload: closing it and its sessions");
                old.shared.stop.cancel();
            }
        }
        // Removed listeners' sockets close (kept copies for an upgrade included).
        st.sockets.retain(|name, _| kept(name));
        for (l, sockets) in fresh {
            self.start_listener(st, &l, sockets, udp_max);
        }
        // Idle upstream HTTP connections of backends gone or draining close.
        let live: Vec<_> = st.pools.values().flat_map(|p| p.backends()).collect();
        self.inner.upstreams.retain(&live);
    }

    /// Logging, the admin token, and what only a restart can change.
    fn apply_settings(&self, old: &Config, new: &Config, plan: &ReloadPlan) {
        let restart = |k| plan.restart_only.contains(&k);
        if restart(RestartKey::Workers) || restart(RestartKey::WorkerModel) {
            warn!("runtime.workers and runtime.worker_model only change on restart");
        }
        if restart(RestartKey::AdminBind) {
            warn!("admin.bind only changes on restart");
        }
        if restart(RestartKey::Splice) {
            warn!("runtime.splice only changes on restart");
        }
        if restart(RestartKey::BusyPoll) {
            warn!("runtime.busy_poll only changes on restart");
        }
        if restart(RestartKey::LogFormat) {
            warn!("log.format changes the access log now; flowgate's own log changes on restart");
        }
        if plan.access_log_changed {
            // Prepared in step 1 (file opened, writer running): this only switches.
            self.inner
                .access_log
                .switch(&new.log.access_log, new.log.format);
        }
        if plan.log_level_changed {
            if let Some(hook) = self.inner.level_hook.get() {
                hook(&new.log.level);
            }
        }
        if new.admin.is_some() && self.inner.metrics.is_none() {
            warn!("metrics start with the admin listener, on restart");
        }
        match &new.admin {
            // The admin API keeps running until restart: so does its token.
            None if old.admin.is_some() => {
                warn!("[admin] removed: the admin API stops on restart; its token stays until then")
            }
            None => {}
            Some(a) if plan.admin_token_changed => {
                self.inner.admin_token.store(a.token.clone().map(Arc::new))
            }
            Some(_) => {}
        }
    }
}

impl Runtime {
    /// Replaces the backends of the hostname entry `written` of `pool` (DNS, see
    /// `dns`) with one per address of `addrs`: those of the pool's source family,
    /// not already backends of the pool by another entry. Returns the names added
    /// and removed; both empty when nothing changed.
    pub(super) fn apply_records(
        &self,
        pool: &str,
        written: &str,
        addrs: &[std::net::SocketAddr],
    ) -> Result<(Vec<String>, Vec<String>), String> {
        let mut st = self.inner.lock();
        let mut cfg = st.config.clone();
        let Some(p) = cfg.pools.iter_mut().find(|p| p.name == pool) else {
            return Ok(Default::default());
        };
        let mine = |b: &crate::config::BackendConfig| b.hostname.as_deref() == Some(written);
        let Some(first) = p.backends.iter().position(mine) else {
            return Ok(Default::default());
        };
        let template = p.backends[first].clone();
        let family = match p.source {
            Some(crate::config::PoolSource::Address(ip)) => Some(ip.is_ipv4()),
            _ => None,
        };
        let fresh: Vec<crate::config::BackendConfig> = addrs
            .iter()
            .filter(|a| family.is_none_or(|v4| a.is_ipv4() == v4))
            .map(|a| crate::config::BackendConfig {
                name: a.to_string(),
                addr: *a,
                ..template.clone()
            })
            .filter(|b| !p.backends.iter().any(|o| !mine(o) && o.name == b.name))
            .collect();
        let old: Vec<&crate::config::BackendConfig> =
            p.backends.iter().filter(|b| mine(b)).collect();
        if fresh.is_empty() {
            return Err(format!(
                "{} has no usable address (none of the pool's source family, or all are other backends of the pool)",
                written
            ));
        }
        let added: Vec<String> = fresh
            .iter()
            .filter(|b| !old.iter().any(|o| o.name == b.name))
            .map(|b| b.name.clone())
            .collect();
        let removed: Vec<String> = old
            .iter()
            .filter(|o| !fresh.iter().any(|b| b.name == o.name))
            .map(|o| o.name.clone())
            .collect();
        if added.is_empty() && removed.is_empty() {
            return Ok((added, removed));
        }
        let rest: Vec<crate::config::BackendConfig> = p.backends.drain(..).collect();
        let mut at = 0;
        for (i, b) in rest.into_iter().enumerate() {
            if i == first {
                at = p.backends.len();
            }
            if !mine(&b) {
                p.backends.push(b);
            }
        }
        p.backends.splice(at..at, fresh);
        self.execute(&mut st, cfg, Cause::Dns)
            .map_err(|e| e.to_string())?;
        // New addresses join with slow start: behind a health check, the first
        // passing probe counts as coming back; without one, the ramp starts now.
        if let Some(pool) = st.pools.get(pool).cloned() {
            for b in pool
                .backends()
                .iter()
                .filter(|b| added.iter().any(|a| **a == *b.name))
            {
                if pool.config().health_check.is_some() {
                    b.set_been_up();
                } else {
                    crate::health::slow_start(&pool, b, &self.inner.control);
                }
            }
        }
        Ok((added, removed))
    }
}

/// What changes the running config.
#[derive(Clone, Copy, Debug)]
pub(super) enum Cause {
    Reload,
    Api,
    /// A hostname backend's records changed (`resolve_interval`).
    Dns,
}

impl Cause {
    fn by(self) -> &'static str {
        match self {
            Cause::Reload => "reload",
            Cause::Api => "the admin API",
            Cause::Dns => "DNS",
        }
    }
}

/// The listener `name` of `cfg`; the plan only names listeners that exist.
fn listener_config<'a>(cfg: &'a Config, name: &str) -> &'a ListenerConfig {
    cfg.listeners
        .iter()
        .find(|l| l.name == name)
        .expect("the reload plan names listeners of the new config")
}
