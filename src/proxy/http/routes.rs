//! The route table of an http listener: host, then the longest path prefix.
//!
//! Host classes are tried in order: exact host routes, then wildcard host routes
//! (`*.x` matches `a.x` and `a.b.x`, never `x`), then routes without a host. In
//! the first class with a route whose prefix matches, the longest prefix wins;
//! ties go to the first in file order. A prefix matches segment-wise: `/v1`
//! matches `/v1` and `/v1/…` but not `/v10`; `/v1/` matches only below `/v1/`.
//! Pure: generic over what a route leads to, so it is tested on its own.

use std::collections::HashMap;

use crate::config::RouteConfig;

/// Routes in file order, indexed by host class.
#[derive(Debug)]
pub struct RouteTable<T> {
    routes: Vec<(RouteConfig, T)>,
    exact: HashMap<String, Vec<usize>>,
    /// (suffix with its leading dot, e.g. ".example.com", route indexes).
    wildcard: Vec<(String, Vec<usize>)>,
    any: Vec<usize>,
}

impl<T> RouteTable<T> {
    /// `routes` in file order (hosts already lower case, as config gives them).
    pub fn new(routes: Vec<(RouteConfig, T)>) -> RouteTable<T> {
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard: Vec<(String, Vec<usize>)> = Vec::new();
        let mut any = Vec::new();
        for (i, (r, _)) in routes.iter().enumerate() {
            match r.host.as_deref() {
                None => any.push(i),
                Some(h) => match h.strip_prefix('*') {
                    Some(suffix) => match wildcard.iter_mut().find(|(s, _)| s == suffix) {
                        Some((_, v)) => v.push(i),
                        None => wildcard.push((suffix.to_string(), vec![i])),
                    },
                    None => exact.entry(h.to_string()).or_default().push(i),
                },
            }
        }
        RouteTable {
            routes,
            exact,
            wildcard,
            any,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &(RouteConfig, T)> {
        self.routes.iter()
    }

    /// The route for `host` (lower case, no port; `None` when the request has
    /// none) and `path` (normalized, without the query).
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&(RouteConfig, T)> {
        if let Some(h) = host {
            if let Some(i) = self.exact.get(h).and_then(|c| self.longest(c.iter(), path)) {
                return Some(&self.routes[i]);
            }
            let wild = self
                .wildcard
                .iter()
                .filter(|(suffix, _)| h.len() > suffix.len() && h.ends_with(suffix.as_str()))
                .flat_map(|(_, v)| v.iter());
            let mut wild: Vec<usize> = wild.copied().collect();
            wild.sort_unstable();
            if let Some(i) = self.longest(wild.iter(), path) {
                return Some(&self.routes[i]);
            }
        }
        self.longest(self.any.iter(), path).map(|i| &self.routes[i])
    }

    /// Of `candidates` (in file order), the one with the longest prefix matching
    /// `path`; the first on a tie.
    fn longest<'a>(
        &self,
        candidates: impl Iterator<Item = &'a usize>,
        path: &str,
    ) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None;
        for &i in candidates {
            let p = &self.routes[i].0.path_prefix;
            if prefix_matches(p, path) && best.is_none_or(|(_, len)| p.len() > len) {
                best = Some((i, p.len()));
            }
        }
        best.map(|(i, _)| i)
    }
}

/// Whether `prefix` matches `path` on segment boundaries.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn table(routes: &[(Option<&str>, &str)]) -> RouteTable<usize> {
        RouteTable::new(
            routes
                .iter()
                .enumerate()
                .map(|(i, (host, prefix))| {
                    (
                        RouteConfig {
                            host: host.map(String::from),
                            path_prefix: prefix.to_string(),
                            pool: format!("p{i}"),
                            strip_prefix: false,
                            first_byte_timeout: Duration::from_secs(1),
                            stream_idle_timeout: Duration::from_secs(1),
                        },
                        i,
                    )
                })
                .collect(),
        )
    }

    fn pick(t: &RouteTable<usize>, host: Option<&str>, path: &str) -> Option<usize> {
        t.find(host, path).map(|(_, i)| *i)
    }

    #[test]
    fn segment_aware_prefixes() {
        assert!(prefix_matches("/v1", "/v1"));
        assert!(prefix_matches("/v1", "/v1/chat"));
        assert!(!prefix_matches("/v1", "/v10"));
        assert!(!prefix_matches("/v1/", "/v1"));
        assert!(prefix_matches("/v1/", "/v1/x"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn longest_prefix_wins_and_ties_go_to_the_first() {
        let t = table(&[
            (None, "/"),
            (None, "/v1"),
            (None, "/v1/chat"),
            (None, "/v1"),
        ]);
        assert_eq!(pick(&t, None, "/v1/chat/completions"), Some(2));
        assert_eq!(pick(&t, None, "/v1/models"), Some(1));
        assert_eq!(pick(&t, None, "/v10"), Some(0));
        assert_eq!(pick(&t, Some("x"), "/"), Some(0));
    }

    #[test]
    fn host_classes_in_order() {
        let t = table(&[
            (None, "/"),
            (Some("*.example.com"), "/"),
            (Some("api.example.com"), "/v1"),
            (Some("*.example.com"), "/v1/admin"),
        ]);
        // Exact host with a matching prefix.
        assert_eq!(pick(&t, Some("api.example.com"), "/v1/x"), Some(2));
        // Exact host whose prefixes do not match: the wildcard class next.
        assert_eq!(pick(&t, Some("api.example.com"), "/other"), Some(1));
        assert_eq!(pick(&t, Some("a.b.example.com"), "/v1/admin/x"), Some(3));
        // A wildcard never matches the bare domain.
        assert_eq!(pick(&t, Some("example.com"), "/v1"), Some(0));
        assert_eq!(pick(&t, None, "/v1"), Some(0));
    }

    #[test]
    fn no_match_without_a_catch_all() {
        let t = table(&[(Some("a.x"), "/"), (None, "/v1")]);
        assert_eq!(pick(&t, Some("b.x"), "/v2"), None);
        assert_eq!(pick(&t, Some("a.x"), "/v2"), Some(0));
    }
}
