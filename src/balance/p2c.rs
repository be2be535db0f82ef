//! power-of-two: two weighted random candidates, the less loaded (active connections
//! relative to weight) wins.

use super::random::WeightedRandom;
use super::{less_loaded, Pick, Selector};

pub struct PowerOfTwo {
    random: WeightedRandom,
}

impl PowerOfTwo {
    pub fn new(weights: &[u32]) -> PowerOfTwo {
        PowerOfTwo {
            random: WeightedRandom::new(weights),
        }
    }
}

impl Selector for PowerOfTwo {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        let mut rng = rand::thread_rng();
        let a = self.random.sample_usable(pick, &mut rng)?;
        // A second, distinct candidate when there is one.
        let not_a = |i: usize| i != a && (pick.usable)(i);
        let others = Pick {
            usable: &not_a,
            ..*pick
        };
        let b = self.random.sample_usable(&others, &mut rng);
        match b {
            Some(b) if less_loaded(&pick.backends[b], &pick.backends[a]) => Some(b),
            _ => Some(a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn prefers_idle_backend() {
        let bs = backends(&[1, 1]);
        let _held: Vec<_> = (0..10).map(|_| bs[0].claim()).collect();
        let picks = pick_n(&PowerOfTwo::new(&[1, 1]), &bs, 100);
        assert!(picks.iter().all(|&p| p == 1));
    }
}
