//! TEMPORARY stand-in for the reload plan (replaced by the real diff on merge).

use super::Config;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub kept: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartKey {
    Workers,
}

impl RestartKey {
    pub fn key(&self) -> &'static str {
        "runtime.workers"
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    pub listeners: Changes,
    pub pools: Changes,
    pub restart_only: Vec<RestartKey>,
    pub access_log_changed: bool,
    pub log_level_changed: bool,
    pub admin_token_changed: bool,
    pub metrics_need_restart: bool,
}

pub fn diff(old: &Config, new: &Config) -> ReloadPlan {
    let mut p = ReloadPlan::default();
    for l in &new.listeners {
        if old
            .listeners
            .iter()
            .any(|o| o.name == l.name && o.bind == l.bind && o.protocol == l.protocol)
        {
            p.listeners.kept.push(l.name.clone());
        } else {
            p.listeners.added.push(l.name.clone());
        }
    }
    for o in &old.listeners {
        if !p.listeners.kept.contains(&o.name) {
            p.listeners.removed.push(o.name.clone());
        }
    }
    for o in &old.pools {
        if !new.pools.iter().any(|n| n.name == o.name) {
            p.pools.removed.push(o.name.clone());
        }
    }
    p.access_log_changed =
        old.log.access_log != new.log.access_log || old.log.format != new.log.format;
    p.log_level_changed = old.log.level != new.log.level;
    p.admin_token_changed = true;
    p.metrics_need_restart = old.admin.is_none() && new.admin.is_some();
    p
}
