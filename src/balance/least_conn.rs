//! least-connections: fewest active connections relative to weight; ties are broken
//! round-robin by starting each scan one backend further on.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{less_loaded, Pick, Selector};

#[derive(Default)]
pub struct LeastConnections {
    next: AtomicUsize,
}

impl Selector for LeastConnections {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        let n = pick.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let mut best: Option<usize> = None;
        for i in (0..n).map(|k| (start + k) % n) {
            if !(pick.usable)(i) {
                continue;
            }
            match best {
                Some(b) if !less_loaded(&pick.backends[i], &pick.backends[b]) => {}
                _ => best = Some(i),
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn held_connections_split_then_refill() {
        let bs = backends(&[1, 1]);
        let lc = LeastConnections::default();
        let all = |_: usize| true;
        let mut held = Vec::new();
        for _ in 0..10 {
            let i = lc
                .select(&Pick {
                    backends: &bs,
                    client: "::1".parse().unwrap(),
                    usable: &all,
                })
                .unwrap();
            held.push(bs[i].claim());
        }
        assert_eq!(bs[0].active(), 5);
        assert_eq!(bs[1].active(), 5);
        held.retain(|g| g.backend().name != bs[0].name);
        for _ in 0..4 {
            let i = lc
                .select(&Pick {
                    backends: &bs,
                    client: "::1".parse().unwrap(),
                    usable: &all,
                })
                .unwrap();
            assert_eq!(i, 0);
            held.push(bs[i].claim());
        }
    }

    #[test]
    fn respects_weight() {
        let bs = backends(&[1, 3]);
        let lc = LeastConnections::default();
        let all = |_: usize| true;
        let mut held = Vec::new();
        for _ in 0..8 {
            let i = lc
                .select(&Pick {
                    backends: &bs,
                    client: "::1".parse().unwrap(),
                    usable: &all,
                })
                .unwrap();
            held.push(bs[i].claim());
        }
        assert_eq!((bs[0].active(), bs[1].active()), (2, 6));
    }
}
