//! round-robin: each backend in turn, ignoring weights.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{first_usable_from, Pick, Selector};

#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Selector for RoundRobin {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        first_usable_from(pick, start % pick.backends.len().max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn even_split() {
        let bs = backends(&[1, 1, 1]);
        let picks = pick_n(&RoundRobin::default(), &bs, 30);
        for i in 0..3 {
            assert_eq!(picks.iter().filter(|&&p| p == i).count(), 10);
        }
    }

    #[test]
    fn skips_unusable() {
        let bs = backends(&[1, 1, 1]);
        let rr = RoundRobin::default();
        let not_1 = |i: usize| i != 1;
        for _ in 0..10 {
            let p = rr.select(&Pick {
                backends: &bs,
                client: "::1".parse().unwrap(),
                usable: &not_1,
            });
            assert_ne!(p, Some(1));
        }
        let none = |_: usize| false;
        assert_eq!(
            rr.select(&Pick {
                backends: &bs,
                client: "::1".parse().unwrap(),
                usable: &none
            }),
            None
        );
    }
}
