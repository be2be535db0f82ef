//! least-load: the lowest load score (see [`crate::load`]) wins. In a pool of up to
//! [`FULL_SCAN`] backends every usable one is compared (scores within 5% of the
//! lowest count as equal); in a larger one, two
//! weighted random candidates (power of two choices). Equal scores go either way
//! at random.
//!
//! Why not power of two everywhere: with four inference servers of two slots each,
//! two random candidates are both full while another has a free slot often enough
//! that half the requests waited in a server queue, and p50 time to first token
//! doubled (`scripts/bench.sh inference`). Herding is what power of two prevents;
//! here the requests dispatched since a backend's last report count in its score at
//! once, so a burst between two reports spreads anyway.

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

/// Pools up to this many usable backends compare them all.
pub const FULL_SCAN: usize = 8;

impl LeastLoad {
    fn score(&self, pick: &Pick<'_>, i: usize) -> f64 {
        let be = &pick.backends[i];
        be.load
            .score(be.active(), be.weight(), &self.weights, self.stale_after)
    }

    /// The lowest score among every usable backend. Scores within [`NEAR`] of the
    /// lowest count as equal and one of them is taken at random: the learned
    /// speeds are estimates, and a backend must not win every request on noise
    /// (nor an idle one never be tried).
    fn scan(&self, pick: &Pick<'_>, rng: &mut impl Rng) -> Option<usize> {
        let mut scored: [(f64, usize); FULL_SCAN] = [(0.0, 0); FULL_SCAN];
        let mut n = 0;
        for i in (0..pick.backends.len()).filter(|&i| (pick.usable)(i)) {
            scored[n] = (self.score(pick, i), i);
            n += 1;
        }
        let scored = &scored[..n];
        let best = scored.iter().map(|&(s, _)| s).min_by(f64::total_cmp)?;
        let near: u32 = scored.iter().filter(|&&(s, _)| s <= best * NEAR).count() as u32;
        if near == 0 {
            // Only where no score compares (NaN): still a pick, never "no backend".
            return scored.first().map(|&(_, i)| i);
        }
        let mut k = rng.gen_range(0..near);
        scored
            .iter()
            .filter(|&&(s, _)| s <= best * NEAR)
            .find(|_| {
                let hit = k == 0;
                k = k.saturating_sub(1);
                hit
            })
            .map(|&(_, i)| i)
    }
}

/// Scores within this factor of the lowest are taken as equal.
const NEAR: f64 = 1.05;

impl Selector for LeastLoad {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        let mut rng = rand::thread_rng();
        if pick.backends.len() <= FULL_SCAN {
            return self.scan(pick, &mut rng);
        }
        let a = self.random.sample_usable(pick, &mut rng)?;
        let not_a = |i: usize| i != a && (pick.usable)(i);
        let others = Pick {
            usable: &not_a,
            ..*pick
        };
        let Some(b) = self.random.sample_usable(&others, &mut rng) else {
            return Some(a);
        };
        let (sa, sb) = (self.score(pick, a), self.score(pick, b));
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
        // 20 waiting that flowgate did not send (another client of the server).
        bs[0].load.report(
            Report {
                waiting: 20.0,
                ..Report::default()
            },
            0,
        );
        bs[1].load.report(Report::default(), 0);
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
