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
    use std::sync::Arc;

    use super::super::testutil::*;
    use super::*;
    use crate::backend::{ActiveGuard, Backend};

    /// One pick among `bs`, every backend usable.
    fn select(lc: &LeastConnections, bs: &[Arc<Backend>]) -> usize {
        let all = |_: usize| true;
        lc.select(&Pick {
            backends: bs,
            client: "::1".parse().unwrap(),
            usable: &all,
        })
        .unwrap()
    }

    /// `n` picks, each one claimed (held open) before the next.
    fn claim_n(lc: &LeastConnections, bs: &[Arc<Backend>], n: usize) -> Vec<ActiveGuard> {
        (0..n).map(|_| bs[select(lc, bs)].claim()).collect()
    }

    #[test]
    fn held_connections_split_then_refill() {
        let bs = backends(&[1, 1]);
        let lc = LeastConnections::default();
        let mut held = claim_n(&lc, &bs, 10);
        assert_eq!(bs[0].active(), 5);
        assert_eq!(bs[1].active(), 5);
        held.retain(|g| g.backend().name != bs[0].name);
        for _ in 0..4 {
            let i = select(&lc, &bs);
            assert_eq!(i, 0);
            held.push(bs[i].claim());
        }
    }

    #[test]
    fn respects_weight() {
        let bs = backends(&[1, 3]);
        let lc = LeastConnections::default();
        let _held = claim_n(&lc, &bs, 8);
        assert_eq!((bs[0].active(), bs[1].active()), (2, 6));
    }
}
