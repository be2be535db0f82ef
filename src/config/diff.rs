//! The reload plan: `diff(old, new)` says, without touching a socket or a file, what
//! a reload from `old` to `new` keeps, adds and removes, and what it cannot change
//! until a restart (sozu's `ConfigState::diff`: plan, then execute). The rules are the
//! ones `Runtime::apply` (src/runtime/reload.rs) and `Pool::update` (src/pool.rs) follow.

use super::{BackendConfig, Config, ListenerConfig};

/// What a reload from one config to another changes. Plain data, so a test can
/// compare whole plans.
///
/// Settings of kept listeners and pools (timeouts, limits, algorithm, weights, health
/// checks) are not listed: a reload hands every kept listener and pool its new
/// settings whether they changed or not.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReloadPlan {
    /// Listener names. Kept: same name, protocol and bind in both, so the socket stays.
    /// A listener whose bind or protocol changed is removed and added under one name.
    pub listeners: Changes,
    /// Pool names, matched by name alone.
    pub pools: Changes,
    /// Backends added and removed in each kept pool (new config order), only pools
    /// where there is one; a backend is kept when its name and address are both equal.
    pub backends: Vec<PoolBackends>,
    /// Keys that differ but only take effect on restart, in the order of
    /// `RestartKey`'s variants.
    pub restart_only: Vec<RestartKey>,
    /// `log.access_log` or `log.format` differ: the access log is reopened.
    pub access_log_changed: bool,
    /// `log.level` differs: flowgate's own log filter changes now.
    pub log_level_changed: bool,
    /// The admin token (read from `admin.token_file`) differs; no token (no
    /// `token_file`, or no `[admin]`) counts as a value of its own.
    pub admin_token_changed: bool,
}

/// Names of what is kept, added and removed. `kept` and `added` are in the new
/// config's order, `removed` in the old one's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Changes {
    pub kept: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl Changes {
    /// Nothing added or removed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// The backend changes of one kept pool, by backend name (the address as written).
/// A backend whose address resolves differently is both removed and added.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolBackends {
    pub pool: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// A key whose change only takes effect on restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestartKey {
    Workers,
    WorkerModel,
    AdminBind,
    Splice,
    BusyPoll,
    /// The access log switches format at once; flowgate's own log on restart.
    LogFormat,
}

impl RestartKey {
    /// The dotted key in the config file, e.g. `runtime.workers`.
    pub fn key(&self) -> &'static str {
        match self {
            RestartKey::Workers => "runtime.workers",
            RestartKey::WorkerModel => "runtime.worker_model",
            RestartKey::AdminBind => "admin.bind",
            RestartKey::Splice => "runtime.splice",
            RestartKey::BusyPoll => "runtime.busy_poll",
            RestartKey::LogFormat => "log.format",
        }
    }
}

impl std::fmt::Display for RestartKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

impl ReloadPlan {
    /// True when the reload binds, closes, creates and drains nothing, changes no log
    /// or token, and leaves no key waiting for a restart. Kept listeners and pools may
    /// still get new settings (see the type's documentation).
    pub fn is_noop(&self) -> bool {
        self.listeners.is_empty()
            && self.pools.is_empty()
            && self.backends.is_empty()
            && self.restart_only.is_empty()
            && !self.access_log_changed
            && !self.log_level_changed
            && !self.admin_token_changed
    }
}

/// Plans a reload from `old` to `new`. Pure: reads the two configs only.
pub fn diff(old: &Config, new: &Config) -> ReloadPlan {
    let same_socket = |a: &ListenerConfig, b: &ListenerConfig| {
        a.name == b.name && a.protocol == b.protocol && a.bind == b.bind
    };
    let listeners = changes(&old.listeners, &new.listeners, |l| &l.name, same_socket);
    let pools = changes(&old.pools, &new.pools, |p| &p.name, |a, b| a.name == b.name);
    let backends = new
        .pools
        .iter()
        .filter_map(|p| {
            let before = old.pool(&p.name)?;
            let c = changes(
                &before.backends,
                &p.backends,
                |b| &b.name,
                |a: &BackendConfig, b| a.name == b.name && a.addr == b.addr,
            );
            (!c.is_empty()).then(|| PoolBackends {
                pool: p.name.clone(),
                added: c.added,
                removed: c.removed,
            })
        })
        .collect();

    let (o, n) = (&old.runtime, &new.runtime);
    let admin_bind = |c: &Config| c.admin.as_ref().map(|a| a.bind);
    let restart_only = [
        (RestartKey::Workers, o.workers != n.workers),
        (RestartKey::WorkerModel, o.worker_model != n.worker_model),
        (RestartKey::AdminBind, admin_bind(old) != admin_bind(new)),
        (RestartKey::Splice, o.splice != n.splice),
        (RestartKey::BusyPoll, o.busy_poll != n.busy_poll),
        (RestartKey::LogFormat, old.log.format != new.log.format),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect();

    let token = |c: &Config| c.admin.as_ref().and_then(|a| a.token.clone());
    ReloadPlan {
        listeners,
        pools,
        backends,
        restart_only,
        access_log_changed: old.log.access_log != new.log.access_log
            || old.log.format != new.log.format,
        log_level_changed: old.log.level != new.log.level,
        admin_token_changed: token(old) != token(new),
    }
}

/// Splits two lists into kept, added and removed names; `same` says whether an old
/// item survives as a new one.
fn changes<T>(
    old: &[T],
    new: &[T],
    name: impl Fn(&T) -> &String,
    same: impl Fn(&T, &T) -> bool,
) -> Changes {
    let mut out = Changes::default();
    for n in new {
        let list = if old.iter().any(|o| same(o, n)) {
            &mut out.kept
        } else {
            &mut out.added
        };
        list.push(name(n).clone());
    }
    out.removed = old
        .iter()
        .filter(|o| !new.iter().any(|n| same(o, n)))
        .map(|o| name(o).clone())
        .collect();
    out
}

#[cfg(test)]
mod tests;
