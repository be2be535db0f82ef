//! weighted-round-robin: nginx's smooth weighted round-robin.
//!
//! nginx keeps a mutable "current weight" per backend and updates all of them on every
//! pick, under a lock. The sequence it produces only depends on the weights, so we run
//! the same algorithm once when the selector is built and store one cycle of it
//! (length = sum of weights / their gcd). Picking is then an atomic increment and an
//! index: the same order nginx gives, with no lock on the connect path.
//!
//! Building the cycle costs (cycle length) x (backends), so the cycle is bounded:
//! weights that still add up to more than [`CYCLE_CAP`] after dividing by their gcd
//! are scaled down in proportion (each at least 1). Shares then match the
//! configured ones to within one part in the scaled weight (a 1,000-backend pool of
//! weights near 1,000 rebuilds in milliseconds instead of over a second).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{first_usable_from, Pick, Selector};

pub struct SmoothWeighted {
    cycle: Vec<u32>,
    next: AtomicUsize,
}

impl SmoothWeighted {
    pub fn new(weights: &[u32]) -> SmoothWeighted {
        SmoothWeighted {
            cycle: smooth_cycle(weights),
            next: AtomicUsize::new(0),
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Longest cycle built (see the module docs).
pub const CYCLE_CAP: i64 = 65_536;

/// One full cycle of nginx's smooth weighted round-robin over `weights`.
fn smooth_cycle(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<i64> = weights.iter().map(|&x| i64::from(x / g)).collect();
    let mut total: i64 = w.iter().sum();
    if total > CYCLE_CAP {
        for x in &mut w {
            *x = (*x * CYCLE_CAP / total).max(1);
        }
        total = w.iter().sum();
    }
    let mut current = vec![0i64; w.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best as u32);
    }
    cycle
}

impl Selector for SmoothWeighted {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        if self.cycle.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.cycle.len();
        let i = self.cycle[n] as usize;
        if (pick.usable)(i) {
            return Some(i);
        }
        // The preferred one is out: walk on through the cycle, then any usable.
        (1..self.cycle.len())
            .map(|k| self.cycle[(n + k) % self.cycle.len()] as usize)
            .find(|&i| (pick.usable)(i))
            .or_else(|| first_usable_from(pick, i))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn one_to_two_is_exact_and_smooth() {
        let bs = backends(&[1, 2]);
        let picks = pick_n(&SmoothWeighted::new(&[1, 2]), &bs, 30);
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 10);
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 20);
        assert!(!picks.windows(3).any(|w| w.iter().all(|&p| p == 1)));
    }

    #[test]
    fn matches_nginx_order() {
        // nginx's documented example: weights 5,1,1 -> a a b a c a a
        assert_eq!(smooth_cycle(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn gcd_shortens_cycle() {
        assert_eq!(smooth_cycle(&[200, 400]).len(), 3);
    }

    /// 1,000 backends with weights near 1,000 (the issue 10 case: 1.18 s per
    /// rebuild, as the weights have no common divisor): the cycle is bounded, every
    /// backend is in it, and shares follow the weights to within the scaling's
    /// rounding (one part in the scaled weight, here about 1 in 65).
    #[test]
    fn large_weights_are_scaled_to_a_bounded_cycle() {
        let weights: Vec<u32> = (0..1000).map(|i| 993 + (i % 8)).collect();
        let cycle = smooth_cycle(&weights);
        assert!(cycle.len() as i64 <= CYCLE_CAP, "{}", cycle.len());
        let mut count = vec![0u32; weights.len()];
        for &i in &cycle {
            count[i as usize] += 1;
        }
        let (min, max) = (count.iter().min().unwrap(), count.iter().max().unwrap());
        assert!(*min > 0);
        // Weights differ by at most 1%: so do the shares, give or take one slot.
        assert!(max - min <= 1, "{min}..{max}");
        // And unequal weights far apart keep their ratio.
        let mut w2 = vec![1000u32; 999];
        w2.push(3);
        let c2 = smooth_cycle(&w2);
        let last = c2.iter().filter(|&&i| i == 999).count();
        let first = c2.iter().filter(|&&i| i == 0).count();
        assert!(last >= 1 && first >= 60 * last, "{first} vs {last}");
    }
}
