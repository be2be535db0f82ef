//! random: weighted random choice.

use rand::Rng;

use super::{Pick, Selector};

pub struct WeightedRandom {
    /// Running sums of the weights; `cumulative[i]` = sum of weights[..=i].
    cumulative: Vec<u64>,
}

impl WeightedRandom {
    pub fn new(weights: &[u32]) -> WeightedRandom {
        let mut sum = 0u64;
        let cumulative = weights
            .iter()
            .map(|&w| {
                sum += u64::from(w);
                sum
            })
            .collect();
        WeightedRandom { cumulative }
    }

    /// One weighted random index, ignoring usability.
    pub fn sample(&self, rng: &mut impl Rng) -> Option<usize> {
        let total = *self.cumulative.last()?;
        let r = rng.gen_range(0..total);
        Some(self.cumulative.partition_point(|&c| c <= r))
    }

    fn weight(&self, i: usize) -> u64 {
        self.cumulative[i] - if i == 0 { 0 } else { self.cumulative[i - 1] }
    }

    /// A weighted random index among usable backends only.
    pub fn sample_usable(&self, pick: &Pick<'_>, rng: &mut impl Rng) -> Option<usize> {
        if let Some(i) = self.sample(rng) {
            if (pick.usable)(i) {
                return Some(i);
            }
        }
        let n = self.cumulative.len();
        let total: u64 = (0..n)
            .filter(|&i| (pick.usable)(i))
            .map(|i| self.weight(i))
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = rng.gen_range(0..total);
        for i in (0..n).filter(|&i| (pick.usable)(i)) {
            let w = self.weight(i);
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }
}

impl Selector for WeightedRandom {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        self.sample_usable(pick, &mut rand::thread_rng())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn follows_weights() {
        let bs = backends(&[1, 3]);
        let picks = pick_n(&WeightedRandom::new(&[1, 3]), &bs, 40000);
        let b = picks.iter().filter(|&&p| p == 1).count() as f64 / 40000.0;
        assert!((b - 0.75).abs() < 0.02, "{b}");
    }

    #[test]
    fn only_usable() {
        let bs = backends(&[5, 1, 5]);
        let wr = WeightedRandom::new(&[5, 1, 5]);
        let only_1 = |i: usize| i == 1;
        for _ in 0..100 {
            let p = wr.select(&Pick {
                backends: &bs,
                client: "::1".parse().unwrap(),
                usable: &only_1,
            });
            assert_eq!(p, Some(1));
        }
    }
}
