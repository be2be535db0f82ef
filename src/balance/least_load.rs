//! least-load: power-of-two choices on the load score (see [`crate::load`]): two
//! weighted random candidates, the lower score wins, a tie goes either way at
//! random.

use std::time::Duration;

use rand::Rng;

use super::random::WeightedRandom;
use super::{Pick, Selector};
use crate::config::LoadWeights;

pub struct LeastLoad {
    random: WeightedRandom,
    weights: LoadWeights,
    /// Reports older than this are ignored (None: no reports configured).
    stale_after: Option<Duration>,
}

impl LeastLoad {
    pub fn new(weights: &[u32], load: LoadWeights, stale_after: Option<Duration>) -> LeastLoad {
        LeastLoad {
            random: WeightedRandom::new(weights),
            weights: load,
            stale_after,
        }
    }
}

impl Selector for LeastLoad {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        let mut rng = rand::thread_rng();
        let a = self.random.sample_usable(pick, &mut rng)?;
        let not_a = |i: usize| i != a && (pick.usable)(i);
        let others = Pick {
            usable: &not_a,
            ..*pick
        };
        let Some(b) = self.random.sample_usable(&others, &mut rng) else {
            return Some(a);
        };
        let score = |i: usize| {
            let be = &pick.backends[i];
            be.load
                .score(be.active(), be.weight(), &self.weights, self.stale_after)
        };
        let (sa, sb) = (score(a), score(b));
        Some(if sb < sa || (sb == sa && rng.gen_bool(0.5)) {
            b
        } else {
            a
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::load::Report;

    #[test]
    fn prefers_the_backend_reporting_the_shorter_queue() {
        let bs = backends(&[1, 1]);
        let fresh = Some(Duration::from_secs(60));
        bs[0].load.report(Report {
            waiting: 20.0,
            ..Report::default()
        });
        bs[1].load.report(Report::default());
        let picks = pick_n(
            &LeastLoad::new(&[1, 1], LoadWeights::default(), fresh),
            &bs,
            100,
        );
        assert!(picks.iter().all(|&p| p == 1), "{picks:?}");
    }

    #[test]
    fn equal_scores_split_at_random() {
        let bs = backends(&[1, 1]);
        let picks = pick_n(
            &LeastLoad::new(&[1, 1], LoadWeights::default(), None),
            &bs,
            400,
        );
        let ones = picks.iter().filter(|&&p| p == 1).count();
        assert!((100..300).contains(&ones), "{ones} of 400");
    }
}
