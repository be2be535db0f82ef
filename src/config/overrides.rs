//! Runtime overrides: backends added or removed through the admin API.
//!
//! The running config is the file's config with these applied. They are kept across
//! reloads, pruned by what the new file says: an added backend the file now lists
//! is the file's again (the file wins), a removed backend the file no longer lists
//! needs no removal, and a pool the file drops takes its overrides with it. A
//! restart starts from the file alone. Pure data: the runtime applies it, the admin
//! API renders it.

use std::collections::BTreeMap;

use super::{BackendConfig, Config, PoolConfig};

/// Per pool (by name): what the API changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pools: BTreeMap<String, PoolOverrides>,
}

/// One pool's overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolOverrides {
    /// Backends added at runtime, in the order they were added.
    pub added: Vec<BackendConfig>,
    /// Names of file backends removed at runtime.
    pub removed: Vec<String>,
}

impl PoolOverrides {
    fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// The overrides of pool `name`, if it has any.
    pub fn pool(&self, name: &str) -> Option<&PoolOverrides> {
        self.pools.get(name)
    }

    /// Records a backend added to `pool`. Re-adding a removed file backend cancels
    /// the removal (and keeps the weight given now).
    pub fn add(&mut self, pool: &str, backend: BackendConfig) {
        let o = self.pools.entry(pool.to_string()).or_default();
        o.removed.retain(|n| *n != backend.name);
        o.added.retain(|b| b.name != backend.name);
        o.added.push(backend);
    }

    /// Records a backend removed from `pool`: an added one is forgotten, a file
    /// one is marked removed.
    pub fn remove(&mut self, pool: &str, name: &str) {
        let o = self.pools.entry(pool.to_string()).or_default();
        let before = o.added.len();
        o.added.retain(|b| b.name != name);
        if o.added.len() == before && !o.removed.iter().any(|n| n == name) {
            o.removed.push(name.to_string());
        }
        if o.is_empty() {
            self.pools.remove(pool);
        }
    }

    /// Drops what `file` makes moot (see the module comment). Returns a line for
    /// each override dropped, for the log.
    pub fn prune(&mut self, file: &Config) -> Vec<String> {
        let mut dropped = Vec::new();
        self.pools.retain(|name, o| {
            let Some(p) = file.pool(name) else {
                dropped.push(format!(
                    "pool {name:?} is gone from the file: its runtime changes are dropped"
                ));
                return false;
            };
            let listed = |n: &str| p.backends.iter().any(|b| b.name == n);
            o.added.retain(|b| {
                let keep = !listed(&b.name);
                if !keep {
                    dropped.push(format!(
                        "pool {name:?}: backend {} added at runtime is now in the file, which wins",
                        b.name
                    ));
                }
                keep
            });
            o.removed.retain(|n| listed(n));
            !o.is_empty()
        });
        dropped
    }

    /// `file` with the overrides applied. A removal that would leave a pool with
    /// no backend is not applied (the API refuses to make one, but the file may
    /// have changed under it).
    pub fn applied(&self, mut file: Config) -> Config {
        for p in &mut file.pools {
            if let Some(o) = self.pools.get(&p.name) {
                apply_pool(p, o);
            }
        }
        file
    }
}

fn apply_pool(p: &mut PoolConfig, o: &PoolOverrides) {
    let remaining = p
        .backends
        .iter()
        .filter(|b| !o.removed.contains(&b.name))
        .count();
    if remaining + o.added.len() > 0 {
        p.backends.retain(|b| !o.removed.contains(&b.name));
    }
    // An added backend the file lists too (re-added after a removal) takes the
    // weight it was added with.
    p.backends
        .retain(|b| !o.added.iter().any(|a| a.name == b.name));
    p.backends.extend(o.added.iter().cloned());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(backends: &[&str]) -> Config {
        let list: Vec<String> = backends
            .iter()
            .map(|b| format!("{{ address = \"{b}\" }}"))
            .collect();
        let text = format!(
            "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:1000\"\npool = \"p\"\n\
             [[pools]]\nname = \"p\"\nbackends = [{}]\n",
            list.join(", ")
        );
        Config::parse(&text, Path::new("t.toml")).unwrap()
    }

    fn names(c: &Config) -> Vec<String> {
        c.pools[0].backends.iter().map(|b| b.name.clone()).collect()
    }

    fn backend(name: &str, weight: u32) -> BackendConfig {
        BackendConfig {
            name: name.into(),
            addr: name.parse().unwrap(),
            weight,
            max_connections: None,
            hostname: None,
        }
    }

    #[test]
    fn add_and_remove_apply_in_order() {
        let mut o = Overrides::default();
        o.add("p", backend("127.0.0.1:3", 5));
        o.remove("p", "127.0.0.1:1");
        let c = o.applied(cfg(&["127.0.0.1:1", "127.0.0.1:2"]));
        assert_eq!(names(&c), ["127.0.0.1:2", "127.0.0.1:3"]);
        assert_eq!(c.pools[0].backends[1].weight, 5);
    }

    #[test]
    fn removing_an_added_backend_forgets_it() {
        let mut o = Overrides::default();
        o.add("p", backend("127.0.0.1:3", 1));
        o.remove("p", "127.0.0.1:3");
        assert!(o.is_empty());
    }

    #[test]
    fn re_adding_a_removed_backend_cancels_the_removal() {
        let mut o = Overrides::default();
        o.remove("p", "127.0.0.1:1");
        o.add("p", backend("127.0.0.1:1", 7));
        assert!(o.pool("p").unwrap().removed.is_empty());
        let c = o.applied(cfg(&["127.0.0.1:1", "127.0.0.1:2"]));
        assert_eq!(names(&c), ["127.0.0.1:2", "127.0.0.1:1"]);
        assert_eq!(c.pools[0].backends[1].weight, 7);
    }

    #[test]
    fn prune_lets_the_file_win() {
        let mut o = Overrides::default();
        o.add("p", backend("127.0.0.1:3", 1));
        o.add("p", backend("127.0.0.1:4", 1));
        o.remove("p", "127.0.0.1:1");
        o.remove("p", "127.0.0.1:2");
        // The new file lists :3 itself and no longer lists :2.
        let file = cfg(&["127.0.0.1:1", "127.0.0.1:3"]);
        let dropped = o.prune(&file);
        assert_eq!(dropped.len(), 1, "{dropped:?}");
        let p = o.pool("p").unwrap();
        assert_eq!(p.added, [backend("127.0.0.1:4", 1)]);
        assert_eq!(p.removed, ["127.0.0.1:1"]);
        assert_eq!(names(&o.applied(file)), ["127.0.0.1:3", "127.0.0.1:4"]);
    }

    #[test]
    fn prune_drops_a_vanished_pool() {
        let mut o = Overrides::default();
        o.add("gone", backend("127.0.0.1:3", 1));
        assert_eq!(o.prune(&cfg(&["127.0.0.1:1"])).len(), 1);
        assert!(o.is_empty());
    }

    #[test]
    fn a_removal_never_empties_a_pool() {
        let mut o = Overrides::default();
        o.remove("p", "127.0.0.1:1");
        assert_eq!(names(&o.applied(cfg(&["127.0.0.1:1"]))), ["127.0.0.1:1"]);
    }
}
